//! The `chat_completions` provider, for older OpenAI-compatible servers that
//! do not speak the Responses API. The turn builds one Responses-shaped
//! request whatever the provider; this module translates it into
//! `POST {base_url}/chat/completions` (streaming) and translates the
//! `chat.completion.chunk` stream back into Responses-shaped progress and
//! output items, so the turn cannot tell the two wire protocols apart.
//! Failures are classified exactly as on the Responses path; what Chat
//! Completions cannot carry (encrypted reasoning, opaque compactions, hosted
//! tools) is left out.

use std::collections::HashMap;
use std::time::Duration;

use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use secrecy::ExposeSecret;
use serde_json::{Map, Value, json};
use turnpike_core::config::ModelSettings;

use crate::provider::{ModelOutput, Progress, ProviderError, http_error, retry_after};

/// One streamed Chat Completions call: the counterpart of the Responses
/// path's attempt, with the same result and retry-delay contract.
pub(crate) async fn attempt(
    http: &reqwest::Client,
    settings: &ModelSettings,
    request: &Value,
    on_progress: &mut impl FnMut(Progress<'_>),
) -> (Result<ModelOutput, ProviderError>, Option<Duration>) {
    let url = format!(
        "{}/chat/completions",
        settings.base_url.trim_end_matches('/')
    );
    let mut call = http
        .post(url)
        .json(&chat_request(request))
        .header("accept", "text/event-stream");
    // The model call joins the turn's trace.
    if let Some(traceparent) = turnpike_core::telemetry::traceparent() {
        call = call.header("traceparent", traceparent);
    }
    if let Some(key) = &settings.api_key {
        call = call.bearer_auth(key.expose_secret());
    }
    let response = match call.send().await {
        Ok(response) => response,
        Err(e) => {
            let error =
                ProviderError::Transient(format!("model request failed: {}", e.without_url()));
            return (Err(error), None);
        }
    };
    let status = response.status();
    if !status.is_success() {
        let delay = retry_after(response.headers());
        let body = response.text().await.unwrap_or_default();
        return (Err(http_error(status, &body)), delay);
    }
    let idle = Duration::from_millis(settings.idle_timeout_ms);
    let mut events = response.bytes_stream().eventsource();
    let mut assembly = Assembly::default();
    loop {
        let event = match tokio::time::timeout(idle, events.next()).await {
            Err(_) => {
                let error = ProviderError::Transient("the model stream went idle".into());
                return (Err(error), None);
            }
            // Some servers close the stream after the finish_reason without
            // `[DONE]`; the answer is whole by then.
            Ok(None) | Ok(Some(Err(_))) if assembly.finished => {
                return (Ok(assembly.finish(on_progress)), None);
            }
            Ok(None) => {
                let error = ProviderError::Transient(
                    "the model stream ended without [DONE] or a finish_reason".into(),
                );
                return (Err(error), None);
            }
            Ok(Some(Err(_))) => {
                let error = ProviderError::Transient("the model stream broke off".to_owned());
                return (Err(error), None);
            }
            Ok(Some(Ok(event))) => event,
        };
        if event.data.trim() == "[DONE]" {
            return (Ok(assembly.finish(on_progress)), None);
        }
        let Ok(chunk) = serde_json::from_str::<Value>(&event.data) else {
            continue;
        };
        if let Some(error) = chunk.get("error").filter(|e| !e.is_null()) {
            return (Err(stream_error(error)), None);
        }
        assembly.apply(&chunk, on_progress);
    }
}

/// An error reported inside a stream that had already started: retried like
/// a stream cut short, unless no retry can help.
fn stream_error(error: &Value) -> ProviderError {
    let text = error.to_string();
    let message = error
        .get("message")
        .and_then(Value::as_str)
        .unwrap_or("the model failed")
        .to_owned();
    if text.contains("context_length_exceeded") || text.contains("insufficient_quota") {
        ProviderError::Fatal(message)
    } else {
        ProviderError::Transient(message)
    }
}

/// The Chat Completions request for the turn's Responses request.
pub(crate) fn chat_request(request: &Value) -> Value {
    let mut body = Map::new();
    if let Some(model) = request.get("model") {
        body.insert("model".into(), model.clone());
    }
    body.insert("messages".into(), Value::Array(messages(request)));
    let tools = function_tools(request);
    if !tools.is_empty() {
        body.insert("tools".into(), Value::Array(tools));
        if let Some(choice) = request.get("tool_choice").and_then(tool_choice) {
            body.insert("tool_choice".into(), choice);
        }
        if let Some(parallel) = request
            .get("parallel_tool_calls")
            .filter(|v| v.is_boolean())
        {
            body.insert("parallel_tool_calls".into(), parallel.clone());
        }
    }
    // `max_tokens`, not `max_completion_tokens`: the older servers this
    // provider exists for know only the former.
    if let Some(max) = request.get("max_output_tokens").filter(|v| v.is_number()) {
        body.insert("max_tokens".into(), max.clone());
    }
    for key in [
        "temperature",
        "top_p",
        "prompt_cache_key",
        "service_tier",
        "safety_identifier",
        "user",
    ] {
        if let Some(value) = request.get(key).filter(|v| !v.is_null()) {
            body.insert(key.into(), value.clone());
        }
    }
    if let Some(effort) = request
        .pointer("/reasoning/effort")
        .filter(|e| e.is_string())
    {
        body.insert("reasoning_effort".into(), effort.clone());
    }
    if let Some(format) = request.pointer("/text/format").and_then(response_format) {
        body.insert("response_format".into(), format);
    }
    body.insert("stream".into(), Value::Bool(true));
    body.insert("stream_options".into(), json!({"include_usage": true}));
    Value::Object(body)
}

/// Instructions as the system message, then the input items as messages.
fn messages(request: &Value) -> Vec<Value> {
    let mut messages = Vec::new();
    if let Some(instructions) = request
        .get("instructions")
        .and_then(Value::as_str)
        .filter(|i| !i.is_empty())
    {
        messages.push(json!({"role": "system", "content": instructions}));
    }
    let items = match request.get("input") {
        Some(Value::String(text)) => {
            messages.push(json!({"role": "user", "content": text}));
            return messages;
        }
        Some(Value::Array(items)) => items.as_slice(),
        _ => &[],
    };
    for item in items {
        let kind = match item.get("type").and_then(Value::as_str) {
            Some(kind) => kind,
            None if item.get("role").is_some() => "message",
            None => "",
        };
        match kind {
            "message" => messages.push(message(item)),
            "function_call" => {
                let call = json!({"id": text_field(item, "call_id"), "type": "function",
                    "function": {"name": text_field(item, "name"), "arguments": text_field(item, "arguments")}});
                // Calls made together, and the text the model wrote with
                // them, are one assistant message in Chat Completions.
                match messages.last_mut() {
                    Some(last) if last["role"] == "assistant" => {
                        match last.get_mut("tool_calls").and_then(Value::as_array_mut) {
                            Some(calls) => calls.push(call),
                            None => last["tool_calls"] = json!([call]),
                        }
                    }
                    _ => messages
                        .push(json!({"role": "assistant", "content": null, "tool_calls": [call]})),
                }
            }
            "function_call_output" => messages.push(json!({
                "role": "tool",
                "tool_call_id": text_field(item, "call_id"),
                "content": item.get("output").map(text_of).unwrap_or_default(),
            })),
            "compaction" => {
                // Only a readable summary can be carried over; an opaque
                // `encrypted_content` means something to the Responses API alone.
                let summary = ["summary", "content"]
                    .iter()
                    .filter_map(|key| item.get(*key))
                    .map(text_of)
                    .find(|text| !text.is_empty());
                if let Some(summary) = summary {
                    messages.push(json!({"role": "system",
                        "content": format!("Summary of the conversation so far:\n{summary}")}));
                }
            }
            // `reasoning` items carry encrypted reasoning that only the
            // Responses API can read back.
            other => tracing::debug!(
                kind = other,
                "not sending an item kind Chat Completions cannot express"
            ),
        }
    }
    messages
}

/// A Responses message as a Chat Completions message. `developer` becomes
/// `system`, the role older servers know.
fn message(item: &Value) -> Value {
    let role = match item.get("role").and_then(Value::as_str) {
        Some("assistant") => "assistant",
        Some("system" | "developer") => "system",
        _ => "user",
    };
    let content = match item.get("content") {
        Some(Value::Array(parts)) if role == "user" && parts.iter().any(is_image) => {
            // Images need the parts form; text-only content stays a plain
            // string, which every server accepts.
            Value::Array(
                parts
                    .iter()
                    .filter_map(|part| {
                        if is_image(part) {
                            let mut image = Map::new();
                            let url = part.get("image_url").and_then(|u| {
                                u.as_str().map(str::to_owned).or_else(|| {
                                    u.get("url").and_then(Value::as_str).map(str::to_owned)
                                })
                            })?;
                            image.insert("url".into(), Value::String(url));
                            if let Some(detail) = part.get("detail").filter(|d| d.is_string()) {
                                image.insert("detail".into(), detail.clone());
                            }
                            Some(json!({"type": "image_url", "image_url": image}))
                        } else {
                            let text = text_of(part);
                            (!text.is_empty()).then(|| json!({"type": "text", "text": text}))
                        }
                    })
                    .collect(),
            )
        }
        Some(content) => Value::String(text_of(content)),
        None => Value::String(String::new()),
    };
    json!({"role": role, "content": content})
}

fn is_image(part: &Value) -> bool {
    matches!(
        part.get("type").and_then(Value::as_str),
        Some("input_image" | "image_url")
    )
}

/// The text of a string, a content part or a list of parts (images left out).
fn text_of(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        Value::Array(parts) => parts.iter().map(text_of).collect(),
        Value::Object(part) => ["text", "refusal"]
            .iter()
            .find_map(|key| part.get(*key).and_then(Value::as_str))
            .unwrap_or("")
            .to_owned(),
        _ => String::new(),
    }
}

fn text_field<'a>(item: &'a Value, name: &str) -> &'a str {
    item.get(name).and_then(Value::as_str).unwrap_or("")
}

/// Responses function tools (`{type, name, description, parameters}`) as
/// Chat Completions tools; hosted tools have no Chat Completions form.
fn function_tools(request: &Value) -> Vec<Value> {
    let Some(tools) = request.get("tools").and_then(Value::as_array) else {
        return Vec::new();
    };
    tools
        .iter()
        .filter(|tool| tool.get("type").and_then(Value::as_str) == Some("function"))
        .map(|tool| {
            let mut function = Map::new();
            for key in ["name", "description", "parameters", "strict"] {
                if let Some(value) = tool.get(key).filter(|v| !v.is_null()) {
                    function.insert(key.into(), value.clone());
                }
            }
            json!({"type": "function", "function": function})
        })
        .collect()
}

/// `auto`, `none` and `required` as they are; a named function or custom
/// tool in the Chat Completions shape; an `allowed_tools` choice as its mode.
fn tool_choice(choice: &Value) -> Option<Value> {
    match choice {
        Value::String(_) => Some(choice.clone()),
        Value::Object(object) => match object.get("type").and_then(Value::as_str) {
            Some("function") => {
                let name = object.get("name").and_then(Value::as_str)?;
                Some(json!({"type": "function", "function": {"name": name}}))
            }
            Some("custom") => {
                let name = object.get("name").and_then(Value::as_str)?;
                Some(json!({"type": "custom", "custom": {"name": name}}))
            }
            Some("allowed_tools") => object.get("mode").filter(|m| m.is_string()).cloned(),
            _ => None,
        },
        _ => None,
    }
}

/// A Responses `text.format` as a Chat Completions `response_format`; plain
/// text is the default and is left out.
fn response_format(format: &Value) -> Option<Value> {
    match format.get("type").and_then(Value::as_str)? {
        "json_object" => Some(json!({"type": "json_object"})),
        "json_schema" => {
            let mut schema = Map::new();
            for key in ["name", "description", "schema", "strict"] {
                if let Some(value) = format.get(key).filter(|v| !v.is_null()) {
                    schema.insert(key.into(), value.clone());
                }
            }
            Some(json!({"type": "json_schema", "json_schema": schema}))
        }
        _ => None,
    }
}

/// Chat Completions usage in the Responses shape the turn stores.
fn responses_usage(usage: &Value) -> Value {
    let count = |pointer: &str| usage.pointer(pointer).and_then(Value::as_u64).unwrap_or(0);
    let input = count("/prompt_tokens");
    let output = count("/completion_tokens");
    let total = usage
        .get("total_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(input + output);
    json!({
        "input_tokens": input,
        "input_tokens_details": {"cached_tokens": count("/prompt_tokens_details/cached_tokens")},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": count("/completion_tokens_details/reasoning_tokens")},
        "total_tokens": total,
    })
}

/// One Responses output item being assembled from chunk deltas.
enum Slot {
    /// The assistant message: its parts (`output_text`, `refusal`) in the
    /// order their first delta came, each with its text so far.
    Message { parts: Vec<(PartKind, String)> },
    Call {
        call_id: String,
        name: String,
        arguments: String,
    },
    /// The model's reasoning, as servers that show it send it
    /// (`reasoning_content` from vLLM, `reasoning` from Ollama and others).
    Reasoning { text: String },
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum PartKind {
    Text,
    Refusal,
}

impl PartKind {
    /// The part as OpenAI's Responses API shows it, with `text` in it.
    fn part(self, text: &str) -> Value {
        match self {
            Self::Text => {
                json!({"type": "output_text", "text": text, "annotations": [], "logprobs": []})
            }
            Self::Refusal => json!({"type": "refusal", "refusal": text}),
        }
    }
}

/// The answer being assembled from `chat.completion.chunk`s, streamed on as
/// the Responses API's events. Each output item (the message, each tool
/// call) takes the next output index when its first delta arrives, as the
/// Responses API numbers them.
#[derive(Default)]
struct Assembly {
    slots: Vec<Slot>,
    /// The text message's output index, once it has started.
    message: Option<usize>,
    /// The reasoning item's output index, once it has started.
    reasoning: Option<usize>,
    /// Output indexes by the chunk's tool-call index.
    calls: HashMap<u64, usize>,
    /// A finish_reason arrived: the answer is whole.
    finished: bool,
    /// Why the answer stopped short (`length`, `content_filter`), if it did.
    cut_short: Option<&'static str>,
    usage: Option<Value>,
}

impl Assembly {
    fn apply(&mut self, chunk: &Value, on_progress: &mut impl FnMut(Progress<'_>)) {
        if let Some(usage) = chunk.get("usage").filter(|u| u.is_object()) {
            self.usage = Some(responses_usage(usage));
        }
        let Some(choices) = chunk.get("choices").and_then(Value::as_array) else {
            return;
        };
        // The worker never asks for more than one choice.
        let choice = choices
            .iter()
            .find(|c| c.get("index").and_then(Value::as_u64).unwrap_or(0) == 0);
        let Some(choice) = choice else { return };
        if let Some(delta) = choice.get("delta") {
            for key in ["reasoning_content", "reasoning"] {
                if let Some(text) = delta
                    .get(key)
                    .and_then(Value::as_str)
                    .filter(|t| !t.is_empty())
                {
                    self.apply_reasoning(text, on_progress);
                }
            }
            for (key, kind) in [("content", PartKind::Text), ("refusal", PartKind::Refusal)] {
                if let Some(text) = delta
                    .get(key)
                    .and_then(Value::as_str)
                    .filter(|t| !t.is_empty())
                {
                    self.apply_text(kind, text, on_progress);
                }
            }
            for call in delta
                .get("tool_calls")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                self.apply_call(call, on_progress);
            }
        }
        if let Some(reason) = choice.get("finish_reason").and_then(Value::as_str) {
            self.finished = true;
            self.cut_short = match reason {
                "length" => Some("max_output_tokens"),
                "content_filter" => Some("content_filter"),
                _ => None,
            };
        }
    }

    fn message_slot(&mut self, on_progress: &mut impl FnMut(Progress<'_>)) -> usize {
        if let Some(index) = self.message {
            return index;
        }
        let index = self.slots.len();
        self.slots.push(Slot::Message { parts: Vec::new() });
        self.message = Some(index);
        let item =
            json!({"type": "message", "role": "assistant", "status": "in_progress", "content": []});
        on_progress(Progress::ItemAdded {
            output_index: index as u64,
            item: &item,
        });
        index
    }

    /// A text or refusal delta: the message and its part start on the
    /// first one, as the Responses API announces them.
    fn apply_text(
        &mut self,
        kind: PartKind,
        delta: &str,
        on_progress: &mut impl FnMut(Progress<'_>),
    ) {
        let index = self.message_slot(on_progress);
        let Some(Slot::Message { parts }) = self.slots.get_mut(index) else {
            return;
        };
        let content_index = match parts.iter().position(|(k, _)| *k == kind) {
            Some(at) => at,
            None => {
                parts.push((kind, String::new()));
                let event = json!({"type": "response.content_part.added", "output_index": index,
                    "content_index": parts.len() - 1, "part": kind.part("")});
                on_progress(Progress::Event {
                    output_index: index as u64,
                    event: &event,
                });
                parts.len() - 1
            }
        };
        if let Some((_, all)) = parts.get_mut(content_index) {
            all.push_str(delta);
        }
        let event = match kind {
            PartKind::Text => json!({"type": "response.output_text.delta", "output_index": index,
                "content_index": content_index, "delta": delta, "logprobs": []}),
            PartKind::Refusal => json!({"type": "response.refusal.delta", "output_index": index,
                "content_index": content_index, "delta": delta}),
        };
        on_progress(Progress::Event {
            output_index: index as u64,
            event: &event,
        });
    }

    /// A reasoning delta: the reasoning item starts on the first one.
    fn apply_reasoning(&mut self, delta: &str, on_progress: &mut impl FnMut(Progress<'_>)) {
        let index = match self.reasoning {
            Some(index) => index,
            None => {
                let index = self.slots.len();
                self.slots.push(Slot::Reasoning {
                    text: String::new(),
                });
                self.reasoning = Some(index);
                let item = json!({"type": "reasoning", "summary": [], "content": [], "status": "in_progress"});
                on_progress(Progress::ItemAdded {
                    output_index: index as u64,
                    item: &item,
                });
                index
            }
        };
        if let Some(Slot::Reasoning { text }) = self.slots.get_mut(index) {
            text.push_str(delta);
        }
        let event = json!({"type": "response.reasoning_text.delta", "output_index": index,
            "content_index": 0, "delta": delta});
        on_progress(Progress::Event {
            output_index: index as u64,
            event: &event,
        });
    }

    fn apply_call(&mut self, call: &Value, on_progress: &mut impl FnMut(Progress<'_>)) {
        let id = call
            .get("id")
            .and_then(Value::as_str)
            .filter(|id| !id.is_empty());
        // Servers that leave out `index` still send the id with a call's first delta.
        let key = match call.get("index").and_then(Value::as_u64) {
            Some(key) => key,
            None => match id {
                Some(id) => self
                    .calls
                    .iter()
                    .find(|(_, slot)| {
                        matches!(self.slots.get(**slot), Some(Slot::Call { call_id, .. }) if call_id == id)
                    })
                    .map_or(self.calls.len() as u64, |(key, _)| *key),
                None => (self.calls.len() as u64).saturating_sub(1),
            },
        };
        let function = call.get("function");
        let name = function
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .unwrap_or("");
        let index = match self.calls.get(&key) {
            Some(index) => *index,
            None => {
                let index = self.slots.len();
                let call_id = id.map_or_else(
                    || format!("call_{}", uuid::Uuid::now_v7().simple()),
                    str::to_owned,
                );
                let item = json!({"type": "function_call", "call_id": call_id, "name": name,
                    "arguments": "", "status": "in_progress"});
                self.slots.push(Slot::Call {
                    call_id,
                    name: name.to_owned(),
                    arguments: String::new(),
                });
                self.calls.insert(key, index);
                on_progress(Progress::ItemAdded {
                    output_index: index as u64,
                    item: &item,
                });
                index
            }
        };
        let arguments = function
            .and_then(|f| f.get("arguments"))
            .and_then(Value::as_str)
            .filter(|a| !a.is_empty());
        if let Some(Slot::Call {
            name: known,
            arguments: all,
            ..
        }) = self.slots.get_mut(index)
        {
            if known.is_empty() {
                name.clone_into(known);
            }
            if let Some(delta) = arguments {
                all.push_str(delta);
            }
        }
        if let Some(delta) = arguments {
            let event = json!({"type": "response.function_call_arguments.delta",
                "output_index": index, "delta": delta});
            on_progress(Progress::Event {
                output_index: index as u64,
                event: &event,
            });
        }
    }

    /// The events that close each item's parts and arguments, as the
    /// Responses API sends them before an item is done.
    fn close(&self, on_progress: &mut impl FnMut(Progress<'_>)) {
        for (index, slot) in self.slots.iter().enumerate() {
            let mut events = Vec::new();
            match slot {
                Slot::Message { parts } => {
                    for (content_index, (kind, text)) in parts.iter().enumerate() {
                        events.push(match kind {
                            PartKind::Text => json!({"type": "response.output_text.done",
                                "output_index": index, "content_index": content_index,
                                "text": text, "logprobs": []}),
                            PartKind::Refusal => json!({"type": "response.refusal.done",
                                "output_index": index, "content_index": content_index,
                                "refusal": text}),
                        });
                        events.push(json!({"type": "response.content_part.done",
                            "output_index": index, "content_index": content_index,
                            "part": kind.part(text)}));
                    }
                }
                Slot::Call { arguments, .. } => {
                    events.push(json!({"type": "response.function_call_arguments.done",
                        "output_index": index, "arguments": call_arguments(arguments)}));
                }
                Slot::Reasoning { text } => {
                    events.push(json!({"type": "response.reasoning_text.done",
                        "output_index": index, "content_index": 0, "text": text}));
                }
            }
            for event in &events {
                on_progress(Progress::Event {
                    output_index: index as u64,
                    event,
                });
            }
        }
    }

    /// The Responses-shaped output items, in output-index order.
    fn into_output(self) -> ModelOutput {
        let status = if self.cut_short.is_some() {
            "incomplete"
        } else {
            "completed"
        };
        let items = self
            .slots
            .into_iter()
            .map(|slot| match slot {
                Slot::Message { parts } => {
                    let mut content: Vec<Value> =
                        parts.iter().map(|(kind, text)| kind.part(text)).collect();
                    if content.is_empty() {
                        content.push(PartKind::Text.part(""));
                    }
                    json!({"type": "message", "role": "assistant", "status": status, "content": content})
                }
                Slot::Call {
                    call_id,
                    name,
                    arguments,
                } => json!({"type": "function_call", "call_id": call_id, "name": name,
                        "arguments": call_arguments(&arguments), "status": "completed"}),
                Slot::Reasoning { text } => json!({"type": "reasoning", "summary": [],
                    "content": [{"type": "reasoning_text", "text": text}], "status": "completed"}),
            })
            .collect();
        ModelOutput {
            items,
            usage: self.usage,
            incomplete: self.cut_short.map(|reason| json!({"reason": reason})),
        }
    }

    /// Closes the items and hands the answer over.
    fn finish(self, on_progress: &mut impl FnMut(Progress<'_>)) -> ModelOutput {
        self.close(on_progress);
        self.into_output()
    }
}

/// A call's arguments; one without any still has a JSON object of them.
fn call_arguments(arguments: &str) -> String {
    if arguments.trim().is_empty() {
        "{}".to_owned()
    } else {
        arguments.to_owned()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn requests_translate_to_chat_completions() {
        let request = json!({
            "model": "m",
            "instructions": "Be brief.",
            "input": [
                {"type": "compaction", "encrypted_content": "opaque"},
                {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "tools changed"}]},
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "weather?"}]},
                {"type": "reasoning", "summary": [], "encrypted_content": "secret"},
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking.", "annotations": []}]},
                {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": "{\"city\":\"Oslo\"}"},
                {"type": "function_call", "call_id": "c2", "name": "time", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
                {"type": "function_call_output", "call_id": "c2", "output": "noon"},
                {"type": "function_call", "call_id": "c3", "name": "time", "arguments": "{}"},
                {"role": "user", "content": [
                    {"type": "input_text", "text": "and this?"},
                    {"type": "input_image", "image_url": "data:image/png;base64,AA", "detail": "low"}
                ]}
            ],
            "tools": [
                {"type": "function", "name": "time", "description": null, "parameters": {"type": "object", "properties": {}}},
                {"type": "web_search"},
                {"type": "function", "name": "weather", "description": "Weather by city", "parameters": {"type": "object"}}
            ],
            "tool_choice": {"type": "function", "name": "weather"},
            "parallel_tool_calls": true,
            "max_output_tokens": 100,
            "temperature": 0.5,
            "top_p": null,
            "prompt_cache_key": "conv_1",
            "reasoning": {"effort": "low"},
            "text": {"format": {"type": "json_schema", "name": "answer", "schema": {"type": "object"}, "strict": true}},
            "include": ["reasoning.encrypted_content"],
            "stream": true,
            "store": false
        });
        assert_eq!(
            chat_request(&request),
            json!({
                "model": "m",
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "system", "content": "tools changed"},
                    {"role": "user", "content": "weather?"},
                    {"role": "assistant", "content": "Checking.", "tool_calls": [
                        {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Oslo\"}"}},
                        {"id": "c2", "type": "function", "function": {"name": "time", "arguments": "{}"}}
                    ]},
                    {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
                    {"role": "tool", "tool_call_id": "c2", "content": "noon"},
                    {"role": "assistant", "content": null, "tool_calls": [
                        {"id": "c3", "type": "function", "function": {"name": "time", "arguments": "{}"}}
                    ]},
                    {"role": "user", "content": [
                        {"type": "text", "text": "and this?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA", "detail": "low"}}
                    ]}
                ],
                "tools": [
                    {"type": "function", "function": {"name": "time", "parameters": {"type": "object", "properties": {}}}},
                    {"type": "function", "function": {"name": "weather", "description": "Weather by city", "parameters": {"type": "object"}}}
                ],
                "tool_choice": {"type": "function", "function": {"name": "weather"}},
                "parallel_tool_calls": true,
                "max_tokens": 100,
                "temperature": 0.5,
                "prompt_cache_key": "conv_1",
                "reasoning_effort": "low",
                "response_format": {"type": "json_schema",
                    "json_schema": {"name": "answer", "schema": {"type": "object"}, "strict": true}},
                "stream": true,
                "stream_options": {"include_usage": true}
            })
        );
    }

    #[test]
    fn named_tool_choices_take_the_chat_shape() {
        assert_eq!(
            tool_choice(&json!({"type": "function", "name": "weather"})),
            Some(json!({"type": "function", "function": {"name": "weather"}}))
        );
        assert_eq!(
            tool_choice(&json!({"type": "custom", "name": "grep"})),
            Some(json!({"type": "custom", "custom": {"name": "grep"}}))
        );
        assert_eq!(tool_choice(&json!("required")), Some(json!("required")));
        assert_eq!(
            tool_choice(&json!({"type": "allowed_tools", "mode": "auto", "tools": []})),
            Some(json!("auto"))
        );
        assert_eq!(tool_choice(&json!({"type": "web_search"})), None);
    }

    #[test]
    fn a_readable_compaction_summary_is_carried_over() {
        let request = json!({"input": [
            {"type": "compaction", "summary": [{"type": "summary_text", "text": "They asked about tolls."}]},
            {"role": "user", "content": "go on"}
        ]});
        assert_eq!(
            chat_request(&request)["messages"],
            json!([
                {"role": "system", "content": "Summary of the conversation so far:\nThey asked about tolls."},
                {"role": "user", "content": "go on"}
            ])
        );
    }

    /// What the turn would have seen, as comparable values.
    fn assemble(chunks: &[Value]) -> (Vec<Value>, ModelOutput, bool) {
        let mut seen = Vec::new();
        let mut assembly = Assembly::default();
        let mut on_progress = |progress: Progress<'_>| {
            seen.push(match progress {
                Progress::ItemAdded { output_index, item } => {
                    json!({"added": output_index, "item": item})
                }
                Progress::Event {
                    output_index,
                    event,
                } => {
                    assert_eq!(event["output_index"], output_index);
                    event.clone()
                }
                Progress::Retry => json!("retry"),
            });
        };
        for chunk in chunks {
            assembly.apply(chunk, &mut on_progress);
        }
        let finished = assembly.finished;
        let output = assembly.finish(&mut on_progress);
        (seen, output, finished)
    }

    fn chunk(delta: Value, finish_reason: Value) -> Value {
        json!({"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]})
    }

    #[test]
    fn text_chunks_become_a_message_with_usage() {
        let (seen, output, finished) = assemble(&[
            chunk(json!({"role": "assistant", "content": ""}), Value::Null),
            chunk(json!({"content": "Hel"}), Value::Null),
            chunk(json!({"content": "lo"}), Value::Null),
            chunk(json!({}), json!("stop")),
            json!({"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12,
                "prompt_tokens_details": {"cached_tokens": 8}, "completion_tokens_details": {"reasoning_tokens": 1}}}),
        ]);
        assert!(finished);
        assert_eq!(
            seen,
            [
                json!({"added": 0, "item": {"type": "message", "role": "assistant", "status": "in_progress", "content": []}}),
                json!({"type": "response.content_part.added", "output_index": 0, "content_index": 0,
                    "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}),
                json!({"type": "response.output_text.delta", "output_index": 0, "content_index": 0, "delta": "Hel", "logprobs": []}),
                json!({"type": "response.output_text.delta", "output_index": 0, "content_index": 0, "delta": "lo", "logprobs": []}),
                json!({"type": "response.output_text.done", "output_index": 0, "content_index": 0, "text": "Hello", "logprobs": []}),
                json!({"type": "response.content_part.done", "output_index": 0, "content_index": 0,
                    "part": {"type": "output_text", "text": "Hello", "annotations": [], "logprobs": []}}),
            ]
        );
        assert_eq!(
            output.items,
            [
                json!({"type": "message", "role": "assistant", "status": "completed",
                "content": [{"type": "output_text", "text": "Hello", "annotations": [], "logprobs": []}]})
            ]
        );
        assert_eq!(output.incomplete, None);
        assert_eq!(
            output.usage,
            Some(
                json!({"input_tokens": 10, "input_tokens_details": {"cached_tokens": 8},
                "output_tokens": 2, "output_tokens_details": {"reasoning_tokens": 1}, "total_tokens": 12})
            )
        );
    }

    #[test]
    fn tool_call_chunks_become_function_calls_in_order() {
        let (seen, output, finished) = assemble(&[
            chunk(
                json!({"role": "assistant", "content": null, "tool_calls": [
                {"index": 0, "id": "c1", "type": "function", "function": {"name": "weather", "arguments": ""}}]}),
                Value::Null,
            ),
            chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}),
                Value::Null,
            ),
            chunk(
                json!({"tool_calls": [{"index": 1, "id": "c2", "type": "function", "function": {"name": "time", "arguments": ""}}]}),
                Value::Null,
            ),
            chunk(
                json!({"tool_calls": [{"index": 0, "function": {"arguments": "\"Oslo\"}"}}]}),
                Value::Null,
            ),
            chunk(json!({}), json!("tool_calls")),
        ]);
        assert!(finished);
        assert_eq!(
            seen,
            [
                json!({"added": 0, "item": {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": "", "status": "in_progress"}}),
                json!({"type": "response.function_call_arguments.delta", "output_index": 0, "delta": "{\"city\":"}),
                json!({"added": 1, "item": {"type": "function_call", "call_id": "c2", "name": "time", "arguments": "", "status": "in_progress"}}),
                json!({"type": "response.function_call_arguments.delta", "output_index": 0, "delta": "\"Oslo\"}"}),
                json!({"type": "response.function_call_arguments.done", "output_index": 0, "arguments": "{\"city\":\"Oslo\"}"}),
                json!({"type": "response.function_call_arguments.done", "output_index": 1, "arguments": "{}"}),
            ]
        );
        assert_eq!(
            output.items,
            [
                json!({"type": "function_call", "call_id": "c1", "name": "weather", "arguments": "{\"city\":\"Oslo\"}", "status": "completed"}),
                json!({"type": "function_call", "call_id": "c2", "name": "time", "arguments": "{}", "status": "completed"}),
            ]
        );
        assert_eq!(output.usage, None);
    }

    #[test]
    fn a_refusal_and_an_answer_cut_at_its_length_are_kept() {
        let (seen, output, _) = assemble(&[
            chunk(json!({"refusal": "I can't"}), Value::Null),
            chunk(json!({"content": "Par"}), Value::Null),
            chunk(json!({}), json!("length")),
        ]);
        assert_eq!(
            output.items,
            [
                json!({"type": "message", "role": "assistant", "status": "incomplete", "content": [
                {"type": "refusal", "refusal": "I can't"},
                {"type": "output_text", "text": "Par", "annotations": [], "logprobs": []}]})
            ]
        );
        assert_eq!(
            output.incomplete,
            Some(json!({"reason": "max_output_tokens"}))
        );
        assert!(
            seen.contains(&json!({"type": "response.refusal.delta", "output_index": 0,
            "content_index": 0, "delta": "I can't"}))
        );
        assert!(seen.contains(
            &json!({"type": "response.output_text.delta", "output_index": 0,
            "content_index": 1, "delta": "Par", "logprobs": []})
        ));
    }

    /// Serves one canned HTTP response to the first connection.
    async fn canned(response: String) -> ModelSettings {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            // Read the head and the JSON body (whose end is a closing brace).
            while !request.ends_with(b"}") {
                let n = socket.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                request.extend_from_slice(&buf[..n]);
            }
            socket.write_all(response.as_bytes()).await.unwrap();
            socket.shutdown().await.unwrap();
        });
        ModelSettings {
            base_url: format!("http://127.0.0.1:{port}/v1"),
            idle_timeout_ms: 2_000,
            ..ModelSettings::default()
        }
    }

    async fn call(response: String) -> (Result<ModelOutput, ProviderError>, Option<Duration>) {
        let settings = canned(response).await;
        let request = json!({"model": "m", "input": [{"role": "user", "content": "hi"}]});
        attempt(&reqwest::Client::new(), &settings, &request, &mut |_| {}).await
    }

    fn sse_response(events: &[&str]) -> String {
        let body: String = events.iter().map(|e| format!("data: {e}\n\n")).collect();
        format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        )
    }

    #[tokio::test]
    async fn a_whole_stream_completes() {
        let (result, _) = call(sse_response(&[
            r#"{"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}"#,
            r#"{"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}"#,
            r#"{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1,"total_tokens":4}}"#,
            "[DONE]",
        ]))
        .await;
        let output = result.unwrap();
        assert_eq!(output.items[0]["content"][0]["text"], "hi");
        assert_eq!(output.usage.unwrap()["input_tokens"], 3);
    }

    #[tokio::test]
    async fn a_stream_cut_short_is_transient() {
        let (result, _) = call(sse_response(&[
            r#"{"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}"#,
        ]))
        .await;
        assert!(
            matches!(result, Err(ProviderError::Transient(_))),
            "{result:?}"
        );
    }

    #[tokio::test]
    async fn an_error_inside_the_stream_is_classified() {
        let (result, _) = call(sse_response(&[
            r#"{"error":{"message":"too long","code":"context_length_exceeded"}}"#,
        ]))
        .await;
        assert!(matches!(result, Err(ProviderError::Fatal(_))), "{result:?}");
    }

    #[tokio::test]
    async fn refusals_are_classified_and_a_429_delay_honoured() {
        let body = r#"{"error":{"message":"slow down"}}"#;
        let (result, delay) = call(format!(
            "HTTP/1.1 429 Too Many Requests\r\nretry-after-ms: 50\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        ))
        .await;
        assert!(
            matches!(result, Err(ProviderError::Transient(_))),
            "{result:?}"
        );
        assert_eq!(delay, Some(Duration::from_millis(50)));

        let body = r#"{"error":{"message":"too long","code":"context_length_exceeded"}}"#;
        let (result, _) = call(format!(
            "HTTP/1.1 400 Bad Request\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        ))
        .await;
        assert!(matches!(result, Err(ProviderError::Fatal(_))), "{result:?}");
    }
}
