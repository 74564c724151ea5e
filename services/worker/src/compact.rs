//! Compaction: when a turn's prompt grows past its threshold, the context is
//! replaced by a shorter window that stands for it. With a provider that has
//! `/responses/compact`, the window is what that endpoint returns (the user
//! messages, then a `compaction` item whose opaque `encrypted_content` is kept
//! as-is). Otherwise the model summarises the conversation (the request keeps
//! the usual prefix, so even this call hits the prompt cache) and the window is
//! the latest user messages followed by the summary.

use serde_json::{Value, json};
use turnpike_core::config::{CompactionMode, ProviderKind};
use turnpike_core::ids;
use turnpike_protocol::ids as prefixes;
use turnpike_protocol::item::Item;
use turnpike_protocol::response::Usage;
use uuid::Uuid;

use crate::Context;
use crate::provider::ProviderError;

/// Asked of the model when the provider cannot compact.
const SUMMARY_PROMPT: &str = "Context checkpoint: the conversation so far is about to be replaced by a summary. \
Write that summary now, for yourself: the user's goals and preferences, decisions made, facts learned \
(including from tool results), open questions and what was about to happen next. Be complete but brief; \
do not address the user and do not call tools.";

/// A compaction's result.
pub(crate) struct Compaction {
    /// The `compaction` item the response's output and the conversation get.
    pub item: Item,
    /// The prompt input that replaces everything before the item.
    pub window: Vec<Value>,
    /// The items of the window a client sees beside the compaction item
    /// (the user messages kept), as the provider sent them.
    pub kept: Vec<Value>,
    pub usage: Option<Usage>,
}

/// Compacts `request` (a model request whose `input` is the current window).
pub(crate) async fn compact(ctx: &Context, request: &Value) -> Result<Compaction, ProviderError> {
    let model = &ctx.settings.model;
    let endpoint = model.provider == ProviderKind::Responses
        && matches!(
            model.compaction,
            CompactionMode::Auto | CompactionMode::Endpoint
        );
    if endpoint {
        let mut body = json!({"model": request["model"], "input": request["input"]});
        for key in ["instructions", "prompt_cache_key"] {
            if let Some(value) = request.get(key) {
                body[key] = value.clone();
            }
        }
        match ctx.provider.compact(&body).await? {
            Some(compacted) => return Ok(from_endpoint(compacted.output, compacted.usage)),
            None if model.compaction == CompactionMode::Endpoint => {
                return Err(ProviderError::Fatal(
                    "the provider has no /responses/compact endpoint (model.compaction = \"endpoint\")"
                        .into(),
                ));
            }
            None => tracing::info!("the provider cannot compact; summarising instead"),
        }
    }
    summarise(ctx, request).await
}

/// What a summary compaction item's `encrypted_content` starts with: the
/// summary follows, readable, so the item means the same sent back by a
/// client to any provider.
const SUMMARY_PREFIX: &str = "turnpike-summary-v1:";

/// The summary a compaction item made by summarising carries, if it is one.
pub(crate) fn summary_of(encrypted_content: &str) -> Option<&str> {
    encrypted_content.strip_prefix(SUMMARY_PREFIX)
}

/// The summary as the prompt input that stands for what came before.
pub(crate) fn summary_message(summary: &str) -> Value {
    json!({"type": "message", "role": "developer", "content": [{"type": "input_text",
        "text": format!("Summary of the conversation before this point:\n{summary}")}]})
}

fn new_id() -> String {
    ids::encode(prefixes::COMPACTION, Uuid::now_v7())
}

fn parse_usage(usage: Option<Value>) -> Option<Usage> {
    usage.and_then(|u| serde_json::from_value(u).ok())
}

/// The endpoint's output as the new window (provider ids dropped: a provider
/// that stores nothing refuses ids it does not know).
fn from_endpoint(output: Vec<Value>, usage: Option<Value>) -> Compaction {
    let mut encrypted = String::new();
    let window: Vec<Value> = output
        .into_iter()
        .map(|mut item| {
            if item.get("type").and_then(Value::as_str) == Some("compaction") {
                encrypted = item
                    .get("encrypted_content")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned();
            }
            if let Some(object) = item.as_object_mut() {
                object.remove("id");
                object.remove("status");
            }
            item
        })
        .collect();
    let kept = window
        .iter()
        .filter(|item| item.get("type").and_then(Value::as_str) != Some("compaction"))
        .cloned()
        .collect();
    Compaction {
        item: Item::Compaction {
            id: new_id(),
            encrypted_content: encrypted,
        },
        window,
        kept,
        usage: parse_usage(usage),
    }
}

async fn summarise(ctx: &Context, request: &Value) -> Result<Compaction, ProviderError> {
    let mut ask = request.clone();
    let mut input = request["input"].as_array().cloned().unwrap_or_default();
    input.push(json!({"type": "message", "role": "user",
        "content": [{"type": "input_text", "text": SUMMARY_PROMPT}]}));
    ask["input"] = json!(input);
    if ask.get("tools").is_some() {
        ask["tool_choice"] = json!("none");
    }
    let output = ctx.provider.stream(&ask, |_| {}).await?;
    let summary: String = output
        .items
        .iter()
        .filter(|i| i.get("type").and_then(Value::as_str) == Some("message"))
        .flat_map(|i| i["content"].as_array().cloned().unwrap_or_default())
        .filter_map(|part| part.get("text").and_then(Value::as_str).map(str::to_owned))
        .collect();
    let keep = ctx.settings.model.compaction_keep_user_messages;
    let window = summary_window(
        request["input"].as_array().map_or(&[], Vec::as_slice),
        keep,
        &summary,
    );
    // The window without the summary (its last item).
    let kept = window[..window.len() - 1].to_vec();
    Ok(Compaction {
        item: Item::Compaction {
            id: new_id(),
            encrypted_content: format!("{SUMMARY_PREFIX}{summary}"),
        },
        window,
        kept,
        usage: parse_usage(output.usage),
    })
}

/// The latest `keep` user messages, then the summary as a developer message.
fn summary_window(input: &[Value], keep: usize, summary: &str) -> Vec<Value> {
    let users: Vec<&Value> = input
        .iter()
        .filter(|i| {
            i.get("role").and_then(Value::as_str) == Some("user")
                && i.get("type").and_then(Value::as_str).unwrap_or("message") == "message"
        })
        .collect();
    let mut window: Vec<Value> = users[users.len().saturating_sub(keep)..]
        .iter()
        .map(|v| (*v).clone())
        .collect();
    window.push(summary_message(summary));
    window
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_summary_keeps_the_latest_user_messages() {
        let input = vec![
            json!({"type": "message", "role": "user", "content": "one"}),
            json!({"type": "message", "role": "assistant", "content": "a"}),
            json!({"type": "function_call_output", "call_id": "c", "output": "x"}),
            json!({"type": "message", "role": "user", "content": "two"}),
            json!({"type": "message", "role": "user", "content": "three"}),
        ];
        let window = summary_window(&input, 2, "short story");
        assert_eq!(window.len(), 3);
        assert_eq!(window[0]["content"], "two");
        assert_eq!(window[1]["content"], "three");
        assert_eq!(window[2]["role"], "developer");
        assert!(
            window[2]["content"][0]["text"]
                .as_str()
                .unwrap()
                .ends_with("short story")
        );
    }

    #[test]
    fn the_endpoint_window_is_kept_without_ids() {
        let compaction = from_endpoint(
            vec![
                json!({"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}),
                json!({"type": "compaction", "id": "cmp_x", "encrypted_content": "opaque=="}),
            ],
            None,
        );
        assert_eq!(
            compaction.window[1],
            json!({"type": "compaction", "encrypted_content": "opaque=="})
        );
        match compaction.item {
            Item::Compaction {
                encrypted_content,
                id,
            } => {
                assert_eq!(encrypted_content, "opaque==");
                assert!(id.starts_with("cmp_"));
            }
            other => panic!("{other:?}"),
        }
    }
}
