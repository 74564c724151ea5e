//! `POST /responses/compact`, as OpenAI's: the answer's `output` is every
//! user message of the input, then one `compaction` item whose opaque
//! `encrypted_content` stands for the rest. Deterministic: the same input
//! compacts to the same content.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::{MockState, error, fnv, prompt_tokens};

pub(crate) async fn compact(State(_state): State<MockState>, body: axum::body::Bytes) -> Response {
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid JSON",
            "invalid_request_error",
        );
    };
    let input = match body.get("input") {
        Some(Value::Array(items)) => items.clone(),
        Some(Value::String(text)) => {
            vec![json!({"type": "message", "role": "user", "content": text})]
        }
        _ => Vec::new(),
    };
    let mut output: Vec<Value> = input
        .iter()
        .filter(|item| {
            item.get("role").and_then(Value::as_str) == Some("user")
                && item
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("message")
                    == "message"
        })
        .map(|item| {
            let content = match item.get("content") {
                Some(Value::String(text)) => json!([{"type": "input_text", "text": text}]),
                Some(other) => other.clone(),
                None => json!([]),
            };
            json!({"type": "message", "role": "user", "content": content})
        })
        .collect();
    let tokens = prompt_tokens(&body);
    let digest = fnv(&Value::Array(input).to_string());
    output.push(json!({
        "type": "compaction",
        "id": format!("cmp_mock{}", uuid::Uuid::now_v7().simple()),
        "encrypted_content": format!("mock-compaction-{digest:016x}"),
    }));
    axum::Json(json!({
        "id": format!("resp_mock{}", uuid::Uuid::now_v7().simple()),
        "object": "response.compaction",
        "created_at": 0,
        "output": output,
        "usage": {
            "input_tokens": tokens.len(),
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 16,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": tokens.len() + 16,
        },
    }))
    .into_response()
}
