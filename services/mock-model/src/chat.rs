//! `POST /v1/chat/completions`: the mock model's Chat Completions face, for
//! the worker's `chat_completions` provider. The messages are translated
//! into the Responses-shaped input the Responses handler reads, so the same
//! directives, answers, faults, pacing and prompt-cache accounting apply.
//! Streamed answers are `chat.completion.chunk` objects (tool-call arguments
//! in small fragments, as OpenAI sends them), then a usage chunk when
//! `stream_options.include_usage` asks for one, then `data: [DONE]`.
//! The prompt cache key is `prompt_cache_key`, or else `user`, which older
//! clients use for the same purpose.

use std::convert::Infallible;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tokio::sync::mpsc::Sender;
use tokio_stream::wrappers::ReceiverStream;

use crate::{
    MockState, Plan, TOKEN_BYTES, Usage, cached_tokens, error, first_token_wait, fnv,
    injected_fault, latest_user_text, plan, prompt_tokens,
};

pub(crate) async fn chat_completions(
    State(state): State<MockState>,
    body: axum::body::Bytes,
) -> Response {
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid JSON",
            "invalid_request_error",
        );
    };
    let Some(messages) = body.get("messages").and_then(Value::as_array) else {
        return error(
            StatusCode::BAD_REQUEST,
            "messages is required",
            "invalid_request_error",
        );
    };
    let request = responses_form(messages, body.get("tools"));
    let text = latest_user_text(&request["input"]);
    let directive = text.trim();
    if let Some(fault) = injected_fault(directive) {
        return fault;
    }
    let disconnect = directive == "/fail disconnect";

    let tokens = prompt_tokens(&request);
    let key = ["prompt_cache_key", "user"]
        .iter()
        .find_map(|k| body.get(*k).and_then(Value::as_str));
    let usage = Usage {
        input_tokens: tokens.len(),
        cached_tokens: key.map_or(0, |key| cached_tokens(&state, key, tokens)),
    };
    let plan = plan(&request, directive, state.settings.answer_tokens);
    let model = body
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or("mock-1")
        .to_owned();
    let id = format!("chatcmpl-mock{}", uuid::Uuid::now_v7().simple());
    if body.get("stream").and_then(Value::as_bool) != Some(true) {
        if disconnect {
            // Without a stream to cut, the closest fault is a failed gateway.
            return error(
                StatusCode::BAD_GATEWAY,
                "injected disconnect",
                "server_error",
            );
        }
        return axum::Json(completion(&id, &model, &plan, &usage)).into_response();
    }
    let include_usage = body
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(64);
    let settings = state.settings.clone();
    tokio::spawn(async move {
        let chunks = Chunks { tx, id, model };
        let output_tokens = match &plan {
            Plan::Text(pieces) => {
                if !chunks.answer(&settings, pieces, disconnect).await {
                    return;
                }
                pieces.len()
            }
            Plan::Calls(calls) => {
                if !chunks.calls(calls).await {
                    return;
                }
                output_tokens_of(calls)
            }
        };
        if include_usage {
            let mut last = chunks.base();
            last["choices"] = json!([]);
            last["usage"] = chat_usage(&usage, output_tokens);
            if !chunks.send(&last).await {
                return;
            }
        }
        let _ = chunks.tx.send(Ok(Event::default().data("[DONE]"))).await;
    });
    Sse::new(ReceiverStream::new(rx)).into_response()
}

/// Chat messages and tools in the Responses shape the shared planner and
/// tokenizer read: `input` items and `tools` with top-level names.
fn responses_form(messages: &[Value], tools: Option<&Value>) -> Value {
    let mut input = Vec::new();
    for message in messages {
        let role = message
            .get("role")
            .and_then(Value::as_str)
            .unwrap_or("user");
        let content = message.get("content").unwrap_or(&Value::Null);
        match role {
            "tool" => input.push(json!({
                "type": "function_call_output",
                "call_id": message.get("tool_call_id").and_then(Value::as_str).unwrap_or(""),
                "output": text_of(content),
            })),
            "assistant" => {
                let text = text_of(content);
                if !text.is_empty() {
                    input.push(json!({"type": "message", "role": "assistant",
                        "content": [{"type": "output_text", "text": text}]}));
                }
                for call in message
                    .get("tool_calls")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    let field = |pointer: &str| {
                        call.pointer(pointer)
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_owned()
                    };
                    input.push(json!({"type": "function_call", "call_id": field("/id"),
                        "name": field("/function/name"), "arguments": field("/function/arguments")}));
                }
            }
            role => {
                let content = match content {
                    Value::Array(parts) => Value::Array(
                        parts
                            .iter()
                            .map(|part| match part.get("type").and_then(Value::as_str) {
                                Some("text") => json!({"type": "input_text", "text": part["text"]}),
                                _ => part.clone(),
                            })
                            .collect(),
                    ),
                    other => Value::String(text_of(other)),
                };
                input.push(json!({"type": "message", "role": role, "content": content}));
            }
        }
    }
    let tools: Vec<Value> = tools
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|tool| {
            let function = tool.get("function")?.as_object()?;
            let mut flat = Map::new();
            flat.insert("type".into(), json!("function"));
            flat.extend(function.iter().map(|(k, v)| (k.clone(), v.clone())));
            Some(Value::Object(flat))
        })
        .collect();
    let mut request = json!({"input": input});
    if !tools.is_empty() {
        request["tools"] = json!(tools);
    }
    request
}

/// The text of a message's content: a string, or the text of its parts.
fn text_of(content: &Value) -> String {
    match content {
        Value::String(text) => text.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect(),
        _ => String::new(),
    }
}

fn chat_usage(usage: &Usage, output_tokens: usize) -> Value {
    json!({
        "prompt_tokens": usage.input_tokens,
        "completion_tokens": output_tokens,
        "total_tokens": usage.input_tokens + output_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": 0},
    })
}

fn output_tokens_of(calls: &[(String, String)]) -> usize {
    calls
        .iter()
        .map(|(_, arguments)| arguments.len().div_ceil(TOKEN_BYTES))
        .sum()
}

fn call_id(id: &str, index: usize, name: &str) -> String {
    format!("call_{:016x}", fnv(&format!("{id}/{index}/{name}")))
}

/// The whole answer as one `chat.completion`, for `stream: false`.
fn completion(id: &str, model: &str, plan: &Plan, usage: &Usage) -> Value {
    let (message, finish_reason, output_tokens) = match plan {
        Plan::Text(pieces) => (
            json!({"role": "assistant", "content": pieces.concat(), "refusal": null}),
            "stop",
            pieces.len(),
        ),
        Plan::Calls(calls) => {
            let tool_calls: Vec<Value> = calls
                .iter()
                .enumerate()
                .map(|(index, (name, arguments))| {
                    json!({"id": call_id(id, index, name), "type": "function",
                        "function": {"name": name, "arguments": arguments}})
                })
                .collect();
            (
                json!({"role": "assistant", "content": null, "refusal": null, "tool_calls": tool_calls}),
                "tool_calls",
                output_tokens_of(calls),
            )
        }
    };
    json!({
        "id": id, "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": null, "finish_reason": finish_reason}],
        "usage": chat_usage(usage, output_tokens),
    })
}

/// A stream of `chat.completion.chunk`s for one completion.
struct Chunks {
    tx: Sender<Result<Event, Infallible>>,
    id: String,
    model: String,
}

impl Chunks {
    fn base(&self) -> Value {
        json!({"id": self.id, "object": "chat.completion.chunk", "created": 0,
               "model": self.model, "system_fingerprint": null})
    }

    fn chunk(&self, delta: Value, finish_reason: Option<&str>) -> Value {
        let mut chunk = self.base();
        chunk["choices"] = json!([{"index": 0, "delta": delta, "logprobs": null,
                                   "finish_reason": finish_reason}]);
        chunk
    }

    /// False once the client has gone.
    async fn send(&self, chunk: &Value) -> bool {
        self.tx
            .send(Ok(Event::default().data(chunk.to_string())))
            .await
            .is_ok()
    }

    /// Streams text at the configured pace; false if it stopped early.
    async fn answer(
        &self,
        settings: &turnpike_core::config::MockSettings,
        pieces: &[String],
        disconnect: bool,
    ) -> bool {
        if !self
            .send(&self.chunk(json!({"role": "assistant", "content": ""}), None))
            .await
        {
            return false;
        }
        let gap = first_token_wait(settings).await;
        for (i, piece) in pieces.iter().enumerate() {
            if disconnect && i == pieces.len() / 2 {
                // Drop the connection mid-stream: no finish_reason, no [DONE].
                return false;
            }
            if !self
                .send(&self.chunk(json!({"content": piece}), None))
                .await
            {
                return false;
            }
            if let Some(gap) = gap {
                tokio::time::sleep(gap).await;
            }
        }
        self.send(&self.chunk(json!({}), Some("stop"))).await
    }

    /// Streams function calls: each opens with its id and name, then its
    /// arguments follow in fragments.
    async fn calls(&self, calls: &[(String, String)]) -> bool {
        let mut chunks = Vec::new();
        for (index, (name, arguments)) in calls.iter().enumerate() {
            let mut delta = json!({"tool_calls": [{"index": index, "id": call_id(&self.id, index, name),
                "type": "function", "function": {"name": name, "arguments": ""}}]});
            if index == 0 {
                delta["role"] = json!("assistant");
                delta["content"] = Value::Null;
            }
            chunks.push(self.chunk(delta, None));
            let characters: Vec<char> = arguments.chars().collect();
            for fragment in characters.chunks(TOKEN_BYTES) {
                let fragment: String = fragment.iter().collect();
                chunks.push(self.chunk(
                    json!({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]}),
                    None,
                ));
            }
        }
        chunks.push(self.chunk(json!({}), Some("tool_calls")));
        for chunk in &chunks {
            if !self.send(chunk).await {
                return false;
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};

    use turnpike_core::config::MockSettings;

    use super::*;

    #[test]
    fn messages_become_the_responses_input_the_planner_reads() {
        let messages = json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "/call weather {}"}]},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}
        ]);
        let tools = json!([{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]);
        let request = responses_form(messages.as_array().unwrap(), Some(&tools));
        assert_eq!(
            request,
            json!({
                "input": [
                    {"type": "message", "role": "system", "content": "Be brief."},
                    {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "/call weather {}"}]},
                    {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": "{}"},
                    {"type": "function_call_output", "call_id": "c1", "output": "sunny"}
                ],
                "tools": [{"type": "function", "name": "weather", "parameters": {"type": "object"}}]
            })
        );
        assert_eq!(latest_user_text(&request["input"]), "/call weather {}");
        assert_eq!(
            plan(&request, "/call weather {}", 4),
            Plan::Text(crate::answer("/echo tool said: sunny", 4))
        );
    }

    fn state() -> MockState {
        MockState {
            settings: MockSettings::default(),
            prompts: Arc::new(Mutex::new(HashMap::new())),
            requests: Arc::default(),
            failed_once: Arc::default(),
        }
    }

    /// The data lines of a streamed answer, parsed (`[DONE]` as a string).
    async fn stream(state: &MockState, body: Value) -> Vec<Value> {
        let response = chat_completions(State(state.clone()), body.to_string().into()).await;
        assert_eq!(response.status(), 200);
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        String::from_utf8(bytes.to_vec())
            .unwrap()
            .lines()
            .filter_map(|line| line.strip_prefix("data: "))
            .map(|data| serde_json::from_str(data).unwrap_or(json!(data)))
            .collect()
    }

    #[tokio::test]
    async fn parallel_calls_stream_as_chunks_with_usage_and_done() {
        let body = json!({
            "model": "m", "stream": true, "stream_options": {"include_usage": true},
            "messages": [{"role": "user", "content": "/call a {\"x\":1}\n/call b {}"}],
            "tools": [{"type": "function", "function": {"name": "a"}}, {"type": "function", "function": {"name": "b"}}]
        });
        let chunks = stream(&state(), body).await;
        assert_eq!(chunks.last().unwrap(), "[DONE]");
        let usage = &chunks[chunks.len() - 2];
        assert_eq!(usage["choices"], json!([]));
        assert!(usage["usage"]["prompt_tokens"].as_u64().unwrap() > 0);
        let deltas: Vec<&Value> = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].get(0))
            .collect();
        let arguments = |index: u64| -> String {
            deltas
                .iter()
                .filter(|d| d["index"] == index)
                .filter_map(|d| d["function"]["arguments"].as_str())
                .collect()
        };
        assert_eq!(arguments(0), "{\"x\":1}");
        assert_eq!(arguments(1), "{}");
        assert_eq!(deltas.iter().filter(|d| d["id"].is_string()).count(), 2);
        assert_eq!(
            chunks[chunks.len() - 3]["choices"][0]["finish_reason"],
            "tool_calls"
        );
    }

    #[tokio::test]
    async fn echo_streams_exactly_and_the_cache_key_may_be_the_user() {
        let state = state();
        let body = json!({
            "stream": true, "user": "conv_1",
            "messages": [{"role": "user", "content": "/echo Turnpikes charge tolls."}]
        });
        let chunks = stream(&state, body.clone()).await;
        let text: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, "Turnpikes charge tolls.");
        assert_eq!(chunks.last().unwrap(), "[DONE]");
        assert!(
            chunks.iter().all(|c| c.get("usage").is_none()),
            "usage only when asked for"
        );

        let mut again = body;
        again["stream_options"] = json!({"include_usage": true});
        let chunks = stream(&state, again).await;
        let usage = &chunks[chunks.len() - 2]["usage"];
        assert_eq!(
            usage["prompt_tokens_details"]["cached_tokens"],
            usage["prompt_tokens"]
        );
    }

    #[tokio::test]
    async fn without_stream_the_answer_is_one_completion() {
        let body = json!({"messages": [{"role": "user", "content": "/echo hi"}]});
        let response = chat_completions(State(state()), body.to_string().into()).await;
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        let completion: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(completion["object"], "chat.completion");
        assert_eq!(completion["choices"][0]["message"]["content"], "hi");
        assert_eq!(completion["choices"][0]["finish_reason"], "stop");
    }
}
