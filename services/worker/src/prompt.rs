//! The model request, built so that every request of a conversation is an
//! exact prefix of the next one: that is what makes the provider's prompt
//! cache hit. Instructions and tools are frozen at the conversation's first
//! turn (a later change becomes a developer message in the history, never an
//! edit of what came before; a new tool is appended after the frozen ones),
//! and the input only ever grows, until a compaction item replaces what came
//! before it.

use std::collections::BTreeSet;

use serde_json::{Value, json};
use turnpike_core::config::ModelSettings;
use turnpike_core::ids;
use turnpike_core::steps::Frozen;
use turnpike_core::turns::{HistoryItem, ResponseRow};
use turnpike_protocol::ids as prefixes;
use turnpike_protocol::item::Item;

use crate::tools::ServerTool;

/// The name of a tool as the model sees it: a named tool's name (function,
/// custom, namespace), else its type (`web_search`, `local_shell`, …), of
/// which a request offers one each.
pub(crate) fn tool_name(tool: &Value) -> &str {
    tool.get("name")
        .and_then(Value::as_str)
        .or_else(|| tool.get("type").and_then(Value::as_str))
        .unwrap_or("")
}

/// A request's tools as the model sees them: Turnpike's server-side tools as
/// the function definitions the worker runs, the definitions its `mcp`
/// entries were resolved to (listing a server is I/O, so the caller does it
/// and passes them in), and every other tool (client-executed and
/// provider-hosted kinds) as given.
pub(crate) fn model_tools(request_tools: &[Value], mcp_tools: &[Value]) -> Vec<Value> {
    request_tools
        .iter()
        .filter_map(|tool| match ServerTool::from_request(tool) {
            Some(server) => Some(server.definition()),
            None => (tool.get("type").and_then(Value::as_str) != Some("mcp")).then(|| tool.clone()),
        })
        .chain(mcp_tools.iter().cloned())
        .collect()
}

/// Folds a turn's instructions and tools into the conversation's frozen
/// ones. Returns the new frozen settings (when they changed) and the
/// developer message that tells the model what changed, if anything did.
pub(crate) fn refreeze(
    frozen: Option<Frozen>,
    instructions: Option<&str>,
    request_tools: &[Value],
    mcp_tools: &[Value],
) -> (Option<Frozen>, Option<String>) {
    let mut offered = model_tools(request_tools, mcp_tools);
    offered.sort_by(|a, b| tool_name(a).cmp(tool_name(b)));
    let offered_names: BTreeSet<String> = offered.iter().map(|t| tool_name(t).to_owned()).collect();
    let Some(before) = frozen else {
        // The first turn freezes what it sends.
        let first = Frozen {
            instructions: instructions.map(str::to_owned),
            current_instructions: instructions.map(str::to_owned),
            tools: offered,
            current_tools: offered_names.into_iter().collect(),
        };
        return (Some(first), None);
    };
    let mut after = before.clone();
    let mut notes = Vec::new();
    if instructions != after.current_instructions.as_deref() {
        after.current_instructions = instructions.map(str::to_owned);
        notes.push(match instructions {
            Some(text) => format!("The instructions have changed. From now on, follow these instead of the earlier ones:\n{text}"),
            None => "The earlier instructions no longer apply.".to_owned(),
        });
    }
    let known: BTreeSet<String> = after
        .tools
        .iter()
        .map(|t| tool_name(t).to_owned())
        .collect();
    let before_names: BTreeSet<String> = after.current_tools.iter().cloned().collect();
    for tool in offered {
        if !known.contains(tool_name(&tool)) {
            after.tools.push(tool);
        }
    }
    let removed: Vec<&str> = before_names
        .difference(&offered_names)
        .map(String::as_str)
        .collect();
    let restored: Vec<&str> = offered_names
        .difference(&before_names)
        .filter(|name| known.contains(*name))
        .map(String::as_str)
        .collect();
    if !removed.is_empty() {
        notes.push(format!(
            "These tools are no longer available; do not call them: {}.",
            removed.join(", ")
        ));
    }
    if !restored.is_empty() {
        notes.push(format!(
            "These tools are available again: {}.",
            restored.join(", ")
        ));
    }
    after.current_tools = offered_names.into_iter().collect();
    let note = (!notes.is_empty()).then(|| notes.join("\n\n"));
    ((after != before).then_some(after), note)
}

/// An item as prompt input: without Turnpike's ids and statuses (a provider
/// that stores nothing knows none of them), everything else as stored.
pub(crate) fn input_of(item: &Item) -> Option<Value> {
    // A compaction made by summarising stands for its summary, whichever
    // provider it goes to.
    if let Item::Compaction {
        encrypted_content, ..
    } = item
        && let Some(summary) = crate::compact::summary_of(encrypted_content)
    {
        return Some(crate::compact::summary_message(summary));
    }
    let mut value = serde_json::to_value(item).ok()?;
    if let Some(object) = value.as_object_mut() {
        object.remove("id");
        object.remove("status");
    }
    Some(value)
}

/// The prompt input of a turn's history: from the latest compaction's
/// window on; a provider's output item as the provider sent it.
pub(crate) fn window_of(history: &[HistoryItem]) -> Vec<Value> {
    let mut window = Vec::new();
    for entry in history {
        match (&entry.item, &entry.prompt) {
            (Item::Compaction { .. }, Some(prompt)) => window.clone_from(prompt),
            (_, Some(prompt)) => window.extend(prompt.iter().cloned()),
            (item, None) => window.extend(input_of(item)),
        }
    }
    window
}

/// The request body for one model call.
pub(crate) fn request(
    row: &ResponseRow,
    frozen: &Frozen,
    model: &ModelSettings,
    input: &[Value],
) -> Value {
    let stored = &row.request.0;
    let mut body = json!({
        "model": row.model,
        "input": input,
        "stream": true,
        "store": false,
        "prompt_cache_key": stored.prompt_cache_key.clone()
            .unwrap_or_else(|| ids::encode(prefixes::CONVERSATION, row.conversation_id)),
    });
    for (key, value) in &stored.provider_params {
        body[key.as_str()] = value.clone();
    }
    if let Some(instructions) = &frozen.instructions {
        body["instructions"] = json!(instructions);
    }
    if !frozen.tools.is_empty() {
        body["tools"] = json!(frozen.tools);
        if let Some(choice) = &stored.tool_choice {
            body["tool_choice"] = choice.clone();
        }
        if let Some(parallel) = stored.parallel_tool_calls {
            body["parallel_tool_calls"] = json!(parallel);
        }
    }
    if model.include_encrypted_reasoning {
        body["include"] = json!(["reasoning.encrypted_content"]);
    }
    for (key, value) in [
        (
            "max_output_tokens",
            stored.max_output_tokens.map(|v| json!(v)),
        ),
        ("temperature", stored.temperature.map(|v| json!(v))),
        ("top_p", stored.top_p.map(|v| json!(v))),
        ("reasoning", stored.reasoning.clone()),
        ("text", stored.text.clone()),
    ] {
        if let Some(value) = value {
            body[key] = value;
        }
    }
    body
}

/// The request's `context_management` compaction threshold, if it set one.
pub(crate) fn compact_threshold(row: &ResponseRow) -> Option<u64> {
    row.request
        .0
        .context_management
        .as_ref()?
        .iter()
        .find(|entry| entry.get("type").and_then(Value::as_str) == Some("compaction"))?
        .get("compact_threshold")?
        .as_u64()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn function(name: &str) -> Value {
        json!({"type": "function", "name": name, "parameters": {"type": "object"}})
    }

    #[test]
    fn the_first_turn_freezes_sorted_tools() {
        let (frozen, note) = refreeze(None, Some("be brief"), &[function("b"), function("a")], &[]);
        let frozen = frozen.unwrap();
        assert_eq!(note, None);
        assert_eq!(frozen.instructions.as_deref(), Some("be brief"));
        let names: Vec<&str> = frozen.tools.iter().map(tool_name).collect();
        assert_eq!(names, ["a", "b"]);
    }

    #[test]
    fn later_changes_append_and_explain_never_edit() {
        let (first, _) = refreeze(None, Some("be brief"), &[function("b"), function("a")], &[]);
        let first = first.unwrap();
        // Same settings in another order: nothing changes.
        let (same, note) = refreeze(
            Some(first.clone()),
            Some("be brief"),
            &[function("a"), function("b")],
            &[],
        );
        assert_eq!((same, note), (None, None));
        // New instructions, one tool dropped, one added.
        let (changed, note) = refreeze(
            Some(first.clone()),
            Some("be verbose"),
            &[function("c"), function("a")],
            &[],
        );
        let changed = changed.unwrap();
        assert_eq!(changed.instructions.as_deref(), Some("be brief"));
        let names: Vec<&str> = changed.tools.iter().map(tool_name).collect();
        assert_eq!(names, ["a", "b", "c"], "frozen tools keep their place");
        let note = note.unwrap();
        assert!(
            note.contains("be verbose") && note.contains("do not call them: b"),
            "{note}"
        );
        // Offering b again says so, once.
        let (again, note) = refreeze(
            Some(changed),
            Some("be verbose"),
            &[function("a"), function("b"), function("c")],
            &[],
        );
        assert!(note.unwrap().contains("available again: b"));
        assert_eq!(again.unwrap().tools.len(), 3);
    }

    #[test]
    fn resolved_mcp_tools_are_frozen_with_the_others() {
        let mcp = [function("calc__shout"), function("calc__add")];
        let request = [
            json!({"type": "mcp", "server_label": "calc"}),
            function("b"),
        ];
        let (frozen, _) = refreeze(None, None, &request, &mcp);
        let frozen = frozen.unwrap();
        let names: Vec<&str> = frozen.tools.iter().map(tool_name).collect();
        assert_eq!(names, ["b", "calc__add", "calc__shout"]);
    }
}
