//! The Chat Completions front door, for clients that speak only that
//! protocol (many UIs): `POST /v1/chat/completions` and `GET /v1/models`.
//!
//! Each request runs as a turn, through the same checks, limits, queue and
//! workers as `POST /v1/responses`, so such clients get Turnpike's
//! server-side tools, quotas and storage. Chat Completions is stateless (a
//! client resends the whole conversation each time), so each request is a
//! conversation of its own, holding the messages it was sent and the answer
//! (`store: false` keeps nothing); its id is in the `Turnpike-Conversation`
//! header. The answer is translated back: text, refusal and client-side
//! tool calls; server-side tool calls stay inside the turn.

use std::collections::{BTreeSet, HashMap};
use std::convert::Infallible;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use turnpike_protocol::chat::CreateChatCompletion;
use turnpike_protocol::item::InputItem;
use turnpike_protocol::response::{CreateResponse, ResponseInput};

use crate::error::ApiError;
use crate::extract::{Auth, CONSISTENCY_HEADER, Json};
use crate::{AppState, Path, events, responses, written};

/// The header naming the conversation a chat completion was stored in.
pub const CONVERSATION_HEADER: &str = "turnpike-conversation";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/chat/completions", post(create))
        .route("/v1/models", get(models))
        .route("/v1/models/{model}", get(model))
}

/// Create a chat completion.
#[utoipa::path(post, path = "/v1/chat/completions", tag = "chat", request_body = CreateChatCompletion,
    responses((status = 200, description = "a `chat.completion`; with `stream: true`, `chat.completion.chunk`s (SSE) ending with `[DONE]`",
            content((Object = "application/json"), (crate::events::SseEvent = "text/event-stream"))),
        (status = 400, body = turnpike_protocol::ErrorBody), (status = 401, body = turnpike_protocol::ErrorBody),
        (status = 413, body = turnpike_protocol::ErrorBody), (status = 502, body = turnpike_protocol::ErrorBody),
        (status = 503, body = turnpike_protocol::ErrorBody)))]
pub async fn create(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Json(body): Json<CreateChatCompletion>,
) -> Result<HttpResponse, ApiError> {
    let request = to_response_request(&body)?;
    let client_tools = client_tool_names(request.tools.as_deref().unwrap_or_default());
    // Taken before the turn exists: a refused stream creates nothing.
    let slot = (body.stream == Some(true))
        .then(|| crate::limits::open_stream(&app, principal.user_id))
        .transpose()?;
    let started = responses::start(&app, &principal, &request).await?;
    let conversation = turnpike_core::ids::encode(
        turnpike_protocol::ids::CONVERSATION,
        started.row.conversation_id,
    );
    let model = started.row.model.clone();
    let mut response = if let Some(slot) = slot {
        let include_usage = body
            .stream_options
            .as_ref()
            .and_then(|o| o.get("include_usage"))
            .and_then(Value::as_bool)
            == Some(true);
        let translation = Translation::new(&started.row, client_tools, include_usage);
        let mut response = stream(&app, started.row, translation, slot);
        if let Ok(value) = HeaderValue::from_str(&started.lsn.to_string()) {
            response.headers_mut().insert(CONSISTENCY_HEADER, value);
        }
        response
    } else {
        let done = responses::wait(&app, &started.row).await;
        match done["status"].as_str() {
            Some("completed" | "incomplete") => written(
                started.lsn,
                StatusCode::OK,
                &completion(&done, &model, &client_tools),
            ),
            Some("failed") => {
                return Err(ApiError::upstream(
                    done["error"]["message"]
                        .as_str()
                        .unwrap_or("The model failed."),
                ));
            }
            Some("cancelled") => {
                return Err(ApiError::conflict(
                    "The completion was cancelled.",
                    "response_cancelled",
                ));
            }
            _ => {
                return Err(ApiError::unavailable(
                    "The completion did not finish in time; try again.",
                    1,
                ));
            }
        }
    };
    if let Ok(value) = HeaderValue::from_str(&conversation) {
        response.headers_mut().insert(CONVERSATION_HEADER, value);
    }
    Ok(response)
}

/// The models this server answers with.
#[utoipa::path(get, path = "/v1/models", tag = "chat",
    responses((status = 200, description = "the models, in OpenAI's list shape"),
        (status = 401, body = turnpike_protocol::ErrorBody)))]
pub async fn models(State(app): State<AppState>, Auth(_): Auth) -> HttpResponse {
    axum::Json(json!({"object": "list", "data": [model_object(&app.settings.api.default_model)]}))
        .into_response()
}

/// One model.
#[utoipa::path(get, path = "/v1/models/{model}", tag = "chat", params(("model" = String, Path)),
    responses((status = 200, description = "the model"), (status = 401, body = turnpike_protocol::ErrorBody),
        (status = 404, body = turnpike_protocol::ErrorBody)))]
pub async fn model(
    State(app): State<AppState>,
    Auth(_): Auth,
    Path(model): Path<String>,
) -> Result<HttpResponse, ApiError> {
    if model != app.settings.api.default_model {
        return Err(ApiError::not_found("model", &model));
    }
    Ok(axum::Json(model_object(&model)).into_response())
}

fn model_object(id: &str) -> Value {
    json!({"id": id, "object": "model", "created": 0, "owned_by": "turnpike"})
}

/// The turn a chat completion request asks for.
fn to_response_request(body: &CreateChatCompletion) -> Result<CreateResponse, ApiError> {
    if body.n.is_some_and(|n| n != 1) {
        return Err(ApiError::invalid("n", "only n: 1 is supported."));
    }
    if body
        .stop
        .as_ref()
        .is_some_and(|s| !(s.is_null() || s.as_array().is_some_and(Vec::is_empty)))
    {
        return Err(ApiError::invalid(
            "stop",
            "stop sequences are not supported (the Responses API the workers use has none).",
        ));
    }
    if body
        .modalities
        .as_ref()
        .is_some_and(|m| m.iter().any(|m| m != "text"))
    {
        return Err(ApiError::invalid(
            "modalities",
            "only the text modality is supported.",
        ));
    }
    for (name, cap) in [
        ("max_tokens", body.max_tokens),
        ("max_completion_tokens", body.max_completion_tokens),
    ] {
        if cap == Some(0) {
            return Err(ApiError::invalid(
                name,
                format!("{name} must be at least 1."),
            ));
        }
    }
    let (instructions, input) = messages_to_input(&body.messages)?;
    let tools = body
        .tools
        .as_ref()
        .map(|tools| {
            tools
                .iter()
                .enumerate()
                .map(|(i, tool)| chat_tool(i, tool))
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    let tool_choice = body.tool_choice.as_ref().map(|choice| {
        match (
            choice.pointer("/function/name"),
            choice.pointer("/custom/name"),
        ) {
            (Some(name), _) => json!({"type": "function", "name": name}),
            (None, Some(name)) => json!({"type": "custom", "name": name}),
            (None, None) => choice.clone(),
        }
    });
    let mut text = serde_json::Map::new();
    if let Some(format) = &body.response_format {
        match format.get("type").and_then(Value::as_str) {
            Some("text") | None => {}
            Some("json_object") => {
                text.insert("format".into(), json!({"type": "json_object"}));
            }
            Some("json_schema") => {
                let mut schema = format
                    .get("json_schema")
                    .and_then(Value::as_object)
                    .cloned()
                    .unwrap_or_default();
                schema.insert("type".into(), json!("json_schema"));
                text.insert("format".into(), Value::Object(schema));
            }
            Some(other) => {
                return Err(ApiError::invalid(
                    "response_format.type",
                    format!("unsupported response_format type '{other}'."),
                ));
            }
        }
    }
    if let Some(verbosity) = &body.verbosity {
        text.insert("verbosity".into(), json!(verbosity));
    }
    Ok(CreateResponse {
        model: body.model.clone(),
        input: Some(ResponseInput::Items(input)),
        instructions,
        tools,
        tool_choice,
        stream: body.stream,
        store: body.store,
        metadata: body.metadata.clone(),
        parallel_tool_calls: body.parallel_tool_calls,
        max_output_tokens: body.max_completion_tokens.or(body.max_tokens),
        temperature: body.temperature,
        top_p: body.top_p,
        user: body.user.clone(),
        safety_identifier: body.safety_identifier.clone(),
        prompt_cache_key: body.prompt_cache_key.clone(),
        prompt_cache_retention: body.prompt_cache_retention.clone(),
        service_tier: body.service_tier.clone(),
        top_logprobs: body.top_logprobs,
        reasoning: body
            .reasoning_effort
            .as_ref()
            .map(|effort| json!({"effort": effort})),
        text: (!text.is_empty()).then_some(Value::Object(text)),
        ..CreateResponse::default()
    })
}

/// The instructions (the leading system and developer messages) and the
/// input items of a chat's messages.
fn messages_to_input(messages: &[Value]) -> Result<(Option<String>, Vec<InputItem>), ApiError> {
    let mut instructions: Vec<String> = Vec::new();
    let mut input = Vec::new();
    // The ids of the assistant's tool calls so far: a tool message answers one.
    let mut calls: std::collections::HashSet<&str> = std::collections::HashSet::new();
    for (i, message) in messages.iter().enumerate() {
        let param = format!("messages[{i}]");
        let role = message.get("role").and_then(Value::as_str).ok_or_else(|| {
            ApiError::invalid(format!("{param}.role"), "every message needs a role.")
        })?;
        let content = message.get("content").filter(|c| !c.is_null());
        match role {
            "system" | "developer" if input.is_empty() => {
                instructions.push(plain_text(content));
            }
            "system" | "developer" | "user" => {
                let parts = match content {
                    Some(Value::String(text)) => json!(text),
                    Some(Value::Array(parts)) => json!(
                        parts
                            .iter()
                            .enumerate()
                            .map(|(j, part)| input_part(&format!("{param}.content[{j}]"), part))
                            .collect::<Result<Vec<_>, _>>()?
                    ),
                    _ => {
                        return Err(ApiError::invalid(
                            format!("{param}.content"),
                            "a message needs content.",
                        ));
                    }
                };
                input.push(item(
                    &param,
                    json!({"type": "message", "role": role, "content": parts}),
                )?);
            }
            "assistant" => {
                let text = plain_text(content);
                let refusal = message.get("refusal").and_then(Value::as_str);
                if !text.is_empty() || refusal.is_some() {
                    let mut parts = Vec::new();
                    if !text.is_empty() {
                        parts.push(json!({"type": "output_text", "text": text, "annotations": []}));
                    }
                    if let Some(refusal) = refusal {
                        parts.push(json!({"type": "refusal", "refusal": refusal}));
                    }
                    input.push(item(
                        &param,
                        json!({"type": "message", "role": "assistant", "content": parts}),
                    )?);
                }
                for (j, call) in message
                    .get("tool_calls")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .enumerate()
                {
                    let call_param = format!("{param}.tool_calls[{j}]");
                    if let Some(id) = call.get("id").and_then(Value::as_str) {
                        calls.insert(id);
                    }
                    let value = match call.get("type").and_then(Value::as_str) {
                        Some("custom") => json!({"type": "custom_tool_call", "call_id": call["id"],
                            "name": call.pointer("/custom/name"), "input": call.pointer("/custom/input")}),
                        _ => json!({"type": "function_call", "call_id": call["id"],
                            "name": call.pointer("/function/name"),
                            "arguments": call.pointer("/function/arguments").cloned().unwrap_or(json!("{}"))}),
                    };
                    input.push(item(&call_param, value)?);
                }
            }
            "tool" => {
                let call_id = message.get("tool_call_id").ok_or_else(|| {
                    ApiError::invalid(
                        format!("{param}.tool_call_id"),
                        "a tool message needs the tool_call_id it answers.",
                    )
                })?;
                if !call_id.as_str().is_some_and(|id| calls.contains(id)) {
                    return Err(ApiError::invalid(
                        format!("{param}.tool_call_id"),
                        format!(
                            "a message with role 'tool' must answer a tool call of an earlier assistant message; none has the id {call_id}."
                        ),
                    ));
                }
                input.push(item(
                    &param,
                    json!({"type": "function_call_output", "call_id": call_id, "output": plain_text(content)}),
                )?);
            }
            other => {
                return Err(ApiError::invalid(
                    format!("{param}.role"),
                    format!(
                        "unsupported role '{other}'; supported: system, developer, user, assistant, tool."
                    ),
                ));
            }
        }
    }
    let instructions = (!instructions.is_empty()).then(|| instructions.join("\n\n"));
    if input.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "messages must hold at least one user message.",
        ));
    }
    Ok((instructions, input))
}

fn item(param: &str, value: Value) -> Result<InputItem, ApiError> {
    serde_json::from_value(value)
        .map_err(|e| ApiError::invalid(param, format!("invalid message: {e}")))
}

/// A message's text: the string, or its text parts joined.
fn plain_text(content: Option<&Value>) -> String {
    match content {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join(""),
        _ => String::new(),
    }
}

/// A chat content part as a Responses input part.
fn input_part(param: &str, part: &Value) -> Result<Value, ApiError> {
    match part.get("type").and_then(Value::as_str) {
        Some("text") => Ok(
            json!({"type": "input_text", "text": part.get("text").cloned().unwrap_or(json!(""))}),
        ),
        Some("image_url") => {
            let mut image =
                json!({"type": "input_image", "image_url": part.pointer("/image_url/url")});
            if let Some(detail) = part.pointer("/image_url/detail") {
                image["detail"] = detail.clone();
            }
            Ok(image)
        }
        Some("file") => {
            let mut file = json!({"type": "input_file"});
            for key in ["file_id", "file_data", "filename"] {
                if let Some(value) = part.pointer(&format!("/file/{key}")) {
                    file[key] = value.clone();
                }
            }
            Ok(file)
        }
        other => Err(ApiError::invalid(
            format!("{param}.type"),
            format!(
                "unsupported content part type {}; supported: text, image_url, file.",
                other.unwrap_or("(none)")
            ),
        )),
    }
}

/// A chat tool definition as a Responses tool.
fn chat_tool(i: usize, tool: &Value) -> Result<Value, ApiError> {
    let kind = tool
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("function");
    let inner = tool.get(kind).and_then(Value::as_object).ok_or_else(|| {
        ApiError::invalid(
            format!("tools[{i}].{kind}"),
            format!("a {kind} tool needs its definition under '{kind}'."),
        )
    })?;
    match kind {
        "function" | "custom" => {
            let mut converted = inner.clone();
            converted.insert("type".into(), json!(kind));
            Ok(Value::Object(converted))
        }
        other => Err(ApiError::invalid(
            format!("tools[{i}].type"),
            format!("unsupported tool type '{other}'; supported: function, custom."),
        )),
    }
}

/// The names of the tools the client runs itself (its function and custom
/// tools): only their calls come back to it.
fn client_tool_names(tools: &[Value]) -> BTreeSet<String> {
    tools
        .iter()
        .filter_map(|t| t.get("name").and_then(Value::as_str))
        .map(str::to_owned)
        .collect()
}

/// A finished response as a `chat.completion`.
fn completion(done: &Value, model: &str, client_tools: &BTreeSet<String>) -> Value {
    let output = done["output"].as_array().cloned().unwrap_or_default();
    let mut text = String::new();
    let mut refusal = String::new();
    let mut reasoning = String::new();
    let mut tool_calls = Vec::new();
    for item in &output {
        match item["type"].as_str() {
            Some("message") => {
                for part in item["content"].as_array().into_iter().flatten() {
                    match part["type"].as_str() {
                        Some("output_text") => text.push_str(part["text"].as_str().unwrap_or("")),
                        Some("refusal") => refusal.push_str(part["refusal"].as_str().unwrap_or("")),
                        _ => {}
                    }
                }
            }
            Some("reasoning") => {
                for part in item["content"].as_array().into_iter().flatten() {
                    reasoning.push_str(part["text"].as_str().unwrap_or(""));
                }
            }
            Some("function_call") if is_client_call(item, client_tools) => {
                tool_calls.push(json!({"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}));
            }
            Some("custom_tool_call") if is_client_call(item, client_tools) => {
                tool_calls.push(json!({"id": item["call_id"], "type": "custom",
                    "custom": {"name": item["name"], "input": item["input"]}}));
            }
            _ => {}
        }
    }
    let mut message = json!({"role": "assistant",
        "content": if text.is_empty() && (!tool_calls.is_empty() || !refusal.is_empty()) { Value::Null } else { json!(text) },
        "refusal": if refusal.is_empty() { Value::Null } else { json!(refusal) },
        "annotations": []});
    if !tool_calls.is_empty() {
        message["tool_calls"] = json!(tool_calls);
    }
    if !reasoning.is_empty() {
        message["reasoning_content"] = json!(reasoning);
    }
    json!({
        "id": completion_id(done["id"].as_str().unwrap_or("")),
        "object": "chat.completion",
        "created": done["created_at"],
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": null,
                     "finish_reason": finish_reason(done, !tool_calls.is_empty())}],
        "usage": chat_usage(&done["usage"]),
        "service_tier": done.get("service_tier").cloned().unwrap_or(Value::Null),
        "system_fingerprint": null,
    })
}

fn is_client_call(item: &Value, client_tools: &BTreeSet<String>) -> bool {
    item["name"]
        .as_str()
        .is_some_and(|n| client_tools.contains(n))
}

fn completion_id(response_id: &str) -> String {
    format!(
        "chatcmpl-{}",
        response_id.strip_prefix("resp_").unwrap_or(response_id)
    )
}

fn finish_reason(done: &Value, calls: bool) -> &'static str {
    match done["incomplete_details"]["reason"].as_str() {
        Some("content_filter") => "content_filter",
        Some(_) => "length",
        None if calls => "tool_calls",
        None => "stop",
    }
}

/// Responses usage in the Chat Completions shape.
fn chat_usage(usage: &Value) -> Value {
    if !usage.is_object() {
        return Value::Null;
    }
    let count = |p: &str| usage.pointer(p).and_then(Value::as_u64).unwrap_or(0);
    json!({
        "prompt_tokens": count("/input_tokens"),
        "completion_tokens": count("/output_tokens"),
        "total_tokens": count("/total_tokens"),
        "prompt_tokens_details": {"cached_tokens": count("/input_tokens_details/cached_tokens")},
        "completion_tokens_details": {"reasoning_tokens": count("/output_tokens_details/reasoning_tokens")},
    })
}

/// Turns a response's events into `chat.completion.chunk`s.
struct Translation {
    id: String,
    created: i64,
    model: String,
    client_tools: BTreeSet<String>,
    include_usage: bool,
    /// Client tool calls by output index: their index among `tool_calls`.
    calls: HashMap<u64, usize>,
}

impl Translation {
    fn new(
        row: &turnpike_core::turns::ResponseRow,
        client_tools: BTreeSet<String>,
        include_usage: bool,
    ) -> Self {
        Self {
            id: completion_id(&row.public_id()),
            created: row.created_at,
            model: row.model.clone(),
            client_tools,
            include_usage,
            calls: HashMap::new(),
        }
    }

    fn chunk(&self, delta: Value, finish_reason: Option<&str>) -> Value {
        json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
               "model": self.model, "system_fingerprint": null,
               "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish_reason}]})
    }

    /// The chunks one response event becomes, and whether it ended the stream.
    fn translate(&mut self, event: &Value) -> (Vec<Value>, bool) {
        let index = event["output_index"].as_u64().unwrap_or(0);
        let delta = |key: &str| json!({key: event["delta"]});
        match event["type"].as_str().unwrap_or("") {
            "response.created" => (
                vec![self.chunk(
                    json!({"role": "assistant", "content": "", "refusal": null}),
                    None,
                )],
                false,
            ),
            "response.output_text.delta" => (vec![self.chunk(delta("content"), None)], false),
            "response.refusal.delta" => (vec![self.chunk(delta("refusal"), None)], false),
            "response.reasoning_text.delta" | "response.reasoning_summary_text.delta" => {
                (vec![self.chunk(delta("reasoning_content"), None)], false)
            }
            "response.output_item.added"
                if event["item"]["type"] == "function_call"
                    && is_client_call(&event["item"], &self.client_tools) =>
            {
                let k = self.calls.len();
                self.calls.insert(index, k);
                let item = &event["item"];
                let call = json!({"index": k, "id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": ""}});
                (vec![self.chunk(json!({"tool_calls": [call]}), None)], false)
            }
            "response.function_call_arguments.delta" => match self.calls.get(&index) {
                Some(k) => {
                    let call = json!({"index": k, "function": {"arguments": event["delta"]}});
                    (vec![self.chunk(json!({"tool_calls": [call]}), None)], false)
                }
                None => (Vec::new(), false),
            },
            "response.completed" | "response.incomplete" => {
                let done = &event["response"];
                let mut chunks =
                    vec![self.chunk(json!({}), Some(finish_reason(done, !self.calls.is_empty())))];
                if self.include_usage {
                    let mut usage = self.chunk(json!({}), None);
                    usage["choices"] = json!([]);
                    usage["usage"] = chat_usage(&done["usage"]);
                    chunks.push(usage);
                }
                (chunks, true)
            }
            "response.failed" | "response.cancelled" => {
                let message = event["response"]["error"]["message"]
                    .as_str()
                    .unwrap_or("The completion was cancelled.");
                let error = json!({"error": {"message": message, "type": "server_error",
                    "param": null, "code": event["response"]["error"]["code"]}});
                (vec![error], true)
            }
            _ => (Vec::new(), false),
        }
    }
}

/// The chunks of a turn's events, as SSE `data:` lines ending with `[DONE]`.
fn stream(
    app: &AppState,
    row: turnpike_core::turns::ResponseRow,
    mut translation: Translation,
    slot: crate::limits::StreamSlot,
) -> HttpResponse {
    let (tx, rx) = mpsc::channel::<Result<Event, Infallible>>(256);
    let mut events = events::follow(app, row, None, slot);
    tokio::spawn(async move {
        while let Some(logged) = events.recv().await {
            let Ok(event) = serde_json::from_str::<Value>(&logged.data) else {
                continue;
            };
            let (chunks, ended) = translation.translate(&event);
            for chunk in chunks {
                if tx
                    .send(Ok(Event::default().data(chunk.to_string())))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            if ended {
                break;
            }
        }
        let _ = tx.send(Ok(Event::default().data("[DONE]"))).await;
    });
    let keepalive = Duration::from_millis(app.settings.events.keepalive_ms);
    Sse::new(ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(keepalive))
        .into_response()
}
