//! The model provider: OpenAI's Responses API over streaming SSE, with
//! retries (exponential backoff with jitter; a 429's own delay honoured) for
//! 5xx, 429, transport errors and streams cut short, an idle timeout on the
//! stream, and no retry for context-length or quota errors.

use std::time::Duration;

use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use rand::Rng;
use secrecy::ExposeSecret;
use serde_json::Value;
use turnpike_core::config::ModelSettings;

/// Why a model call failed.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// 5xx, 429, a transport error, an idle stream or one that ended without
    /// its completion event. Retried; surfaced when retries run out.
    #[error("{0}")]
    Transient(String),
    /// The provider refused the request (4xx, context length, quota). Not retried.
    #[error("{0}")]
    Fatal(String),
    /// The provider failed the response with one of OpenAI's error codes
    /// that no retry can fix (an invalid prompt, a policy violation, a bad
    /// image). Not retried; the code reaches the client as it came.
    #[error("{message}")]
    Refused { code: &'static str, message: String },
}

/// The error codes of OpenAI's response object (`ResponseError.code`): the
/// only codes a failed response carries, so that SDKs can read them.
pub const OPENAI_ERROR_CODES: [&str; 21] = [
    "server_error",
    "rate_limit_exceeded",
    "invalid_prompt",
    "data_residency_mismatch",
    "bio_policy",
    "misalignment_policy_violation",
    "vector_store_timeout",
    "invalid_image",
    "invalid_image_format",
    "invalid_base64_image",
    "invalid_image_url",
    "image_too_large",
    "image_too_small",
    "image_parse_error",
    "image_content_policy_violation",
    "invalid_image_mode",
    "image_file_too_large",
    "unsupported_image_media_type",
    "empty_image_file",
    "failed_to_download_image",
    "image_file_not_found",
];

impl ProviderError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Transient(_))
    }

    /// The failed response's `error.code`: the provider's own when it is
    /// one of OpenAI's, else `server_error` (the message says more).
    pub fn code(&self) -> &'static str {
        match self {
            Self::Refused { code, .. } => code,
            Self::Transient(_) | Self::Fatal(_) => "server_error",
        }
    }
}

/// What the model produced in one call.
#[derive(Debug, Default)]
pub struct ModelOutput {
    /// Output items as the provider returned them.
    pub items: Vec<Value>,
    pub usage: Option<Value>,
    /// Set when the provider ended the response `incomplete` (its
    /// `incomplete_details`, e.g. `{"reason": "max_output_tokens"}`).
    pub incomplete: Option<Value>,
}

/// What the turn sees while the model streams: OpenAI's streaming events
/// for one output item, as the provider sent them (or, for a provider that
/// speaks another protocol, as OpenAI would have).
pub enum Progress<'a> {
    /// An output item started (`response.output_item.added`).
    ItemAdded { output_index: u64, item: &'a Value },
    /// Any other event about the item at `output_index`: content parts,
    /// text, refusal and argument deltas, reasoning summaries, a hosted
    /// tool's progress. `response.output_item.done` is not one of them: the
    /// turn announces an item done once it is stored.
    Event { output_index: u64, event: &'a Value },
    /// The attempt failed and the call is retried: the next attempt's
    /// events start over from its first item.
    Retry,
}

/// A Responses API client.
#[derive(Clone)]
pub struct Provider {
    http: reqwest::Client,
    settings: ModelSettings,
}

impl Provider {
    pub fn new(settings: ModelSettings) -> Result<Self, ProviderError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(settings.connect_timeout_ms))
            .pool_max_idle_per_host(256)
            .build()
            .map_err(|e| ProviderError::Fatal(format!("http client: {e}")))?;
        Ok(Self { http, settings })
    }

    /// The delay before retry `attempt`: exponential from `retry_base_ms`,
    /// with up to half again of jitter so retrying workers spread out.
    fn backoff(&self, attempt: u32) -> Duration {
        let base = self
            .settings
            .retry_base_ms
            .saturating_mul(1 << attempt.min(10));
        let jitter = rand::rng().random_range(0..=base / 2);
        Duration::from_millis(base + jitter)
    }

    /// Streams one model call, retrying transient failures. `on_progress`
    /// sees every attempt's events, and `Progress::Retry` between attempts.
    pub async fn stream(
        &self,
        request: &Value,
        mut on_progress: impl FnMut(Progress<'_>),
    ) -> Result<ModelOutput, ProviderError> {
        let mut attempt = 0u32;
        loop {
            let (result, retry_after) = self.attempt(request, &mut on_progress).await;
            match result {
                Ok(output) => return Ok(output),
                Err(e) if e.is_retryable() && attempt < self.settings.max_retries => {
                    attempt += 1;
                    let delay = retry_after.unwrap_or_else(|| self.backoff(attempt));
                    tracing::warn!(error = %e, attempt, delay_ms = delay.as_millis() as u64, "model call failed; retrying");
                    on_progress(Progress::Retry);
                    tokio::time::sleep(delay).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn attempt(
        &self,
        request: &Value,
        on_progress: &mut impl FnMut(Progress<'_>),
    ) -> (Result<ModelOutput, ProviderError>, Option<Duration>) {
        if self.settings.provider == turnpike_core::config::ProviderKind::ChatCompletions {
            return crate::chat::attempt(&self.http, &self.settings, request, on_progress).await;
        }
        let url = format!("{}/responses", self.settings.base_url.trim_end_matches('/'));
        let mut call = self
            .http
            .post(url)
            .json(request)
            .header("accept", "text/event-stream");
        // The model call joins the turn's trace.
        if let Some(traceparent) = turnpike_core::telemetry::traceparent() {
            call = call.header("traceparent", traceparent);
        }
        if let Some(key) = &self.settings.api_key {
            call = call.bearer_auth(key.expose_secret());
        }
        let response = match call.send().await {
            Ok(response) => response,
            Err(e) => {
                return (
                    Err(ProviderError::Transient(format!(
                        "model request failed: {}",
                        e.without_url()
                    ))),
                    None,
                );
            }
        };
        let status = response.status();
        if !status.is_success() {
            let retry_after = retry_after(response.headers());
            let body = response.text().await.unwrap_or_default();
            return (Err(http_error(status, &body)), retry_after);
        }
        let idle = Duration::from_millis(self.settings.idle_timeout_ms);
        let mut events = response.bytes_stream().eventsource();
        let mut output = ModelOutput::default();
        loop {
            let event = match tokio::time::timeout(idle, events.next()).await {
                Err(_) => {
                    return (
                        Err(ProviderError::Transient(
                            "the model stream went idle".into(),
                        )),
                        None,
                    );
                }
                Ok(None) => {
                    return (
                        Err(ProviderError::Transient(
                            "the model stream ended without its completion event".into(),
                        )),
                        None,
                    );
                }
                Ok(Some(Err(_))) => {
                    return (
                        Err(ProviderError::Transient(
                            "the model stream broke off".to_owned(),
                        )),
                        None,
                    );
                }
                Ok(Some(Ok(event))) => event,
            };
            let Ok(data) = serde_json::from_str::<Value>(&event.data) else {
                continue;
            };
            let kind = data
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or(event.event.as_str());
            let index = data.get("output_index").and_then(Value::as_u64);
            match (kind, index) {
                ("response.output_item.added", Some(output_index)) => {
                    if let Some(item) = data.get("item") {
                        on_progress(Progress::ItemAdded { output_index, item });
                    }
                }
                ("response.output_item.done", Some(_)) => {
                    if let Some(item) = data.get("item") {
                        output.items.push(item.clone());
                    }
                }
                ("response.completed" | "response.incomplete", _) => {
                    output.usage = data
                        .pointer("/response/usage")
                        .cloned()
                        .filter(|u| !u.is_null());
                    // The final response object is the whole truth: items
                    // streamed without their `done` event are in it too.
                    if let Some(items) = data.pointer("/response/output").and_then(Value::as_array)
                        && items.len() >= output.items.len()
                    {
                        output.items = items.clone();
                    }
                    if kind == "response.incomplete" {
                        output.incomplete = Some(
                            data.pointer("/response/incomplete_details")
                                .cloned()
                                .filter(|d| !d.is_null())
                                .unwrap_or_else(|| serde_json::json!({"reason": "unknown"})),
                        );
                    }
                    return (Ok(output), None);
                }
                ("response.failed" | "error", _) => {
                    let error = data
                        .pointer("/response/error")
                        .or_else(|| data.get("error"))
                        .unwrap_or(&data);
                    return (Err(stream_error(error)), None);
                }
                (_, Some(output_index)) if kind.starts_with("response.") => {
                    on_progress(Progress::Event {
                        output_index,
                        event: &data,
                    });
                }
                _ => {}
            }
        }
    }
}

/// Error codes a provider reports in a failed response or an `error` event
/// that a retry may fix; every other code (an invalid prompt, a content
/// policy refusal, the context window, the quota) fails the turn at once.
const RETRYABLE_CODES: [&str; 4] = [
    "server_error",
    "rate_limit_exceeded",
    "vector_store_timeout",
    "internal_error",
];

/// The failure a provider reported inside its stream. Only its code and
/// message reach the turn's error: the message is the provider's own text
/// about the request, not transport detail.
fn stream_error(error: &Value) -> ProviderError {
    let code = error
        .get("code")
        .and_then(Value::as_str)
        .or_else(|| error.get("type").and_then(Value::as_str));
    let message = error
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("the model failed");
    let message: String = message.chars().take(300).collect();
    let message = match code {
        Some(code) => format!("the model failed ({code}): {message}"),
        None => format!("the model failed: {message}"),
    };
    match code {
        None => ProviderError::Transient(message),
        Some(c) if RETRYABLE_CODES.contains(&c) => ProviderError::Transient(message),
        Some(c) => match OPENAI_ERROR_CODES.iter().find(|known| **known == c) {
            Some(code) => ProviderError::Refused { code, message },
            None => ProviderError::Fatal(message),
        },
    }
}

/// The longest delay a provider's `Retry-After` is honoured for; a longer
/// one is cut to this, so a confused provider cannot park a turn for hours.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

/// A 429's requested delay: `retry-after-ms` or `retry-after` (seconds),
/// at most `MAX_RETRY_AFTER`.
pub(crate) fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let read = |name: &str| headers.get(name)?.to_str().ok()?.trim().parse::<f64>().ok();
    let delay = if let Some(ms) = read("retry-after-ms") {
        Duration::from_millis(ms.clamp(0.0, 1e9) as u64)
    } else {
        Duration::from_millis((read("retry-after")?.clamp(0.0, 1e6) * 1000.0) as u64)
    };
    Some(delay.min(MAX_RETRY_AFTER))
}

/// A refused request: 5xx and 429 are transient, unless the body names a
/// context-length or quota error, which no retry can fix; the rest is fatal.
/// The message names the status and the provider's error code, never the
/// provider's body (which can echo the prompt or carry internals).
pub(crate) fn http_error(status: reqwest::StatusCode, body: &str) -> ProviderError {
    let code = serde_json::from_str::<Value>(body).ok().and_then(|v| {
        v.pointer("/error/code")
            .or_else(|| v.pointer("/error/type"))
            .and_then(Value::as_str)
            .filter(|c| {
                c.len() <= 64 && c.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
            })
            .map(str::to_owned)
    });
    let message = match &code {
        Some(code) => format!("the model answered {status} ({code})"),
        None => format!("the model answered {status}"),
    };
    let fatal_kind =
        body.contains("context_length_exceeded") || body.contains("insufficient_quota");
    if (status.is_server_error() || status.as_u16() == 429) && !fatal_kind {
        ProviderError::Transient(message)
    } else {
        ProviderError::Fatal(message)
    }
}

/// What a provider's `/responses/compact` returned.
#[derive(Debug)]
pub struct Compacted {
    /// The new prompt window: the user messages, then the compaction item.
    pub output: Vec<Value>,
    pub usage: Option<Value>,
}

impl Provider {
    /// Compacts a prompt with the provider's `POST {base_url}/responses/compact`.
    /// `Ok(None)` when the provider has no such endpoint (404, 405, 501), so
    /// the caller can fall back to a summary. Transient failures are retried
    /// as model calls are.
    pub async fn compact(&self, request: &Value) -> Result<Option<Compacted>, ProviderError> {
        let url = format!(
            "{}/responses/compact",
            self.settings.base_url.trim_end_matches('/')
        );
        let mut attempt = 0u32;
        loop {
            let mut call = self
                .http
                .post(&url)
                .json(request)
                .timeout(Duration::from_millis(self.settings.idle_timeout_ms));
            if let Some(key) = &self.settings.api_key {
                call = call.bearer_auth(key.expose_secret());
            }
            let (error, delay) = match call.send().await {
                Ok(response) if response.status().is_success() => {
                    let body: Value = response.json().await.map_err(|e| {
                        ProviderError::Transient(format!("compaction answer: {}", e.without_url()))
                    })?;
                    let output = body
                        .get("output")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default();
                    if !output
                        .iter()
                        .any(|i| i.get("type").and_then(Value::as_str) == Some("compaction"))
                    {
                        return Err(ProviderError::Fatal(
                            "the compaction answer holds no compaction item".into(),
                        ));
                    }
                    return Ok(Some(Compacted {
                        output,
                        usage: body.get("usage").cloned().filter(|u| !u.is_null()),
                    }));
                }
                Ok(response) if matches!(response.status().as_u16(), 404 | 405 | 501) => {
                    return Ok(None);
                }
                Ok(response) => {
                    let status = response.status();
                    let delay = retry_after(response.headers());
                    let body = response.text().await.unwrap_or_default();
                    let message = format!("compaction: {}", http_error(status, &body));
                    if status.is_server_error() || status.as_u16() == 429 {
                        (ProviderError::Transient(message), delay)
                    } else {
                        return Err(ProviderError::Fatal(message));
                    }
                }
                Err(e) => (
                    ProviderError::Transient(format!(
                        "compaction request failed: {}",
                        e.without_url()
                    )),
                    None,
                ),
            };
            if attempt >= self.settings.max_retries {
                return Err(error);
            }
            attempt += 1;
            tokio::time::sleep(delay.unwrap_or_else(|| self.backoff(attempt))).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_providers_retry_after_is_honoured_up_to_thirty_seconds() {
        let headers = |name: &'static str, value: &'static str| {
            let mut headers = reqwest::header::HeaderMap::new();
            headers.insert(name, reqwest::header::HeaderValue::from_static(value));
            headers
        };
        assert_eq!(
            retry_after(&headers("retry-after", "2")),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            retry_after(&headers("retry-after-ms", "250")),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            retry_after(&headers("retry-after", "86400")),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(retry_after(&headers("retry-after", "soon")), None);
    }
}
