//! `POST /mcp`: a minimal MCP server over streamable HTTP, so the worker's
//! MCP client runs against a real server in development and tests. Tools:
//! `add` ({a, b} numbers → their sum) and `shout` ({text} → upper case).
//!
//! `initialize` answers with an `Mcp-Session-Id` header, and every later
//! request must carry it (400 without it). `tools/list` answers with a JSON
//! body; `tools/call` with an SSE stream of one `message` event carrying the
//! JSON-RPC response, so both answer shapes a client must read are exercised.

use std::convert::Infallible;

use axum::Json;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

const SESSION_HEADER: &str = "mcp-session-id";

/// The session ids this server hands out start with this; no state is kept.
const SESSION_PREFIX: &str = "mock-mcp-";

pub(crate) async fn mcp(headers: HeaderMap, Json(message): Json<Value>) -> Response {
    let method = message.get("method").and_then(Value::as_str).unwrap_or("");
    let id = message.get("id").cloned();
    if method == "initialize" {
        let session = format!("{SESSION_PREFIX}{}", uuid::Uuid::now_v7().simple());
        let result = json!({
            "protocolVersion": "2025-06-18",
            "capabilities": {"tools": {}},
            "serverInfo": {"name": "turnpike-mock-model", "version": env!("CARGO_PKG_VERSION")},
        });
        let mut response = Json(reply(id, result)).into_response();
        if let Ok(value) = HeaderValue::from_str(&session) {
            response.headers_mut().insert(SESSION_HEADER, value);
        }
        return response;
    }
    let in_session = headers
        .get(SESSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with(SESSION_PREFIX));
    if !in_session {
        return (StatusCode::BAD_REQUEST, "missing or unknown Mcp-Session-Id").into_response();
    }
    let Some(id) = id else {
        // A notification (`notifications/initialized`, …): nothing to answer.
        return StatusCode::ACCEPTED.into_response();
    };
    let params = message.get("params").cloned().unwrap_or(Value::Null);
    match method {
        "tools/list" => Json(reply(Some(id), json!({"tools": tools()}))).into_response(),
        "tools/call" => {
            let answer = reply(Some(id), call(&params)).to_string();
            let event = Event::default().event("message").data(answer);
            Sse::new(tokio_stream::once(Ok::<_, Infallible>(event))).into_response()
        }
        other => Json(json!({"jsonrpc": "2.0", "id": id,
            "error": {"code": -32601, "message": format!("method not found: {other}")}}))
        .into_response(),
    }
}

fn reply(id: Option<Value>, result: Value) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "result": result})
}

fn tools() -> Value {
    json!([
        {
            "name": "add",
            "description": "Add two numbers.",
            "inputSchema": {
                "type": "object",
                "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                "required": ["a", "b"]
            }
        },
        {
            "name": "shout",
            "description": "Repeat a text in upper case.",
            "inputSchema": {
                "type": "object",
                "properties": {"text": {"type": "string"}},
                "required": ["text"]
            }
        }
    ])
}

/// A `tools/call` result; a bad call is a tool error (`isError`), as MCP
/// servers report them.
fn call(params: &Value) -> Value {
    let arguments = params.get("arguments").cloned().unwrap_or(Value::Null);
    let outcome = match params.get("name").and_then(Value::as_str) {
        Some("add") => {
            let (a, b) = (arguments.get("a"), arguments.get("b"));
            match (
                a.and_then(Value::as_i64),
                b.and_then(Value::as_i64),
                a.and_then(Value::as_f64),
                b.and_then(Value::as_f64),
            ) {
                (Some(a), Some(b), ..) => a
                    .checked_add(b)
                    .map(|sum| sum.to_string())
                    .ok_or_else(|| "the sum overflows".to_owned()),
                (_, _, Some(a), Some(b)) => Ok((a + b).to_string()),
                _ => Err("add needs numbers a and b".to_owned()),
            }
        }
        Some("shout") => arguments
            .get("text")
            .and_then(Value::as_str)
            .map(str::to_uppercase)
            .ok_or_else(|| "shout needs a text".to_owned()),
        other => Err(format!("unknown tool: {}", other.unwrap_or(""))),
    };
    match outcome {
        Ok(text) => json!({"content": [{"type": "text", "text": text}], "isError": false}),
        Err(text) => json!({"content": [{"type": "text", "text": text}], "isError": true}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tools_answer() {
        let sum = call(&json!({"name": "add", "arguments": {"a": 2, "b": 3}}));
        assert_eq!(sum["content"][0]["text"], "5");
        let loud = call(&json!({"name": "shout", "arguments": {"text": "hi"}}));
        assert_eq!(loud["content"][0]["text"], "HI");
        assert_eq!(call(&json!({"name": "nope"}))["isError"], true);
    }
}
