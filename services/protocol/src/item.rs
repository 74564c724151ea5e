//! Conversation items: what a client sends (`InputItem`) and what the API
//! stores and returns (`Item`).

use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    User,
    Assistant,
    System,
    Developer,
}

/// Fields a provider sent that Turnpike does not act on, kept as received
/// so that nothing is lost and everything goes back as it came.
pub type Extra = std::collections::BTreeMap<String, serde_json::Value>;

/// An item or content part of a kind Turnpike does not model: every field
/// as received, `type` included.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Verbatim(pub Extra);

impl utoipa::PartialSchema for Verbatim {
    fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
        utoipa::openapi::ObjectBuilder::new()
            .description(Some("An object of a kind Turnpike keeps as received."))
            .into()
    }
}

impl ToSchema for Verbatim {}

impl std::ops::Deref for Verbatim {
    type Target = Extra;

    fn deref(&self) -> &Extra {
        &self.0
    }
}

impl std::ops::DerefMut for Verbatim {
    fn deref_mut(&mut self) -> &mut Extra {
        &mut self.0
    }
}

impl FromIterator<(String, serde_json::Value)> for Verbatim {
    fn from_iter<I: IntoIterator<Item = (String, serde_json::Value)>>(iter: I) -> Self {
        Self(iter.into_iter().collect())
    }
}

/// One part of a message's content. Parts arrive from clients and from
/// model providers, which add fields and kinds over time: fields Turnpike
/// does not model are kept in `extra`, kinds it does not model in `Other`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ContentPart {
    /// Text written by the user, system or developer.
    InputText { text: String },
    /// Text written by the model.
    OutputText {
        text: String,
        #[serde(default)]
        annotations: Vec<serde_json::Value>,
        /// What else the provider sent with the part (`logprobs`, …).
        #[serde(flatten)]
        #[schema(value_type = Object)]
        extra: Extra,
    },
    /// An image, by URL (`data:` URLs included) or file id.
    InputImage {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        image_url: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        file_id: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        detail: Option<String>,
    },
    /// The model declined to answer.
    Refusal { refusal: String },
    /// A part of another kind (`input_file`, `input_audio`, `reasoning_text`,
    /// or one a provider introduces later), kept verbatim.
    #[serde(untagged)]
    Other(Verbatim),
}

/// Content part kinds OpenAI defines that a client may send, beyond the
/// ones Turnpike models; they reach the provider as sent.
pub const OPENAI_PART_TYPES: [&str; 5] = [
    "input_file",
    "input_audio",
    "summary_text",
    "reasoning_text",
    "text",
];

impl ContentPart {
    /// The part's text, if it has any.
    pub fn text(&self) -> Option<&str> {
        match self {
            Self::InputText { text } | Self::OutputText { text, .. } => Some(text),
            Self::Refusal { refusal } => Some(refusal),
            Self::InputImage { .. } => None,
            Self::Other(fields) => fields.get("text").and_then(serde_json::Value::as_str),
        }
    }

    /// The part's kind, as its `type` says.
    pub fn kind(&self) -> &str {
        match self {
            Self::InputText { .. } => "input_text",
            Self::OutputText { .. } => "output_text",
            Self::InputImage { .. } => "input_image",
            Self::Refusal { .. } => "refusal",
            Self::Other(fields) => fields
                .get("type")
                .and_then(serde_json::Value::as_str)
                .unwrap_or(""),
        }
    }

    /// Model text with nothing else on it.
    pub fn output_text(text: impl Into<String>) -> Self {
        Self::OutputText {
            text: text.into(),
            annotations: Vec::new(),
            extra: Extra::new(),
        }
    }
}

/// A message's content as a client may send it: a plain string or parts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum ItemContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

/// An item a client sends: in `POST /v1/conversations`, `POST …/items` or a
/// response's `input`. A message may omit `"type": "message"`, as OpenAI's
/// "easy input message" does.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum InputItem {
    /// A message from the user, the assistant, the system or a developer.
    Message { role: Role, content: ItemContent },
    /// A call of a client-side function tool, as the model emitted it.
    FunctionCall {
        call_id: String,
        name: String,
        arguments: String,
    },
    /// The client's result for a function call.
    FunctionCallOutput {
        call_id: String,
        #[schema(value_type = Value)]
        output: FunctionOutput,
    },
    /// Another of OpenAI's item kinds (reasoning, custom, shell and patch
    /// tool calls and their outputs, hosted tool calls, …): a stateless
    /// client resends them with its history. Kept verbatim.
    #[serde(untagged)]
    Other(Verbatim),
}

/// A function call's output: text, or (as OpenAI allows) a list of
/// content parts, kept as sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum FunctionOutput {
    Text(String),
    Parts(Vec<serde_json::Value>),
}

impl FunctionOutput {
    /// The output's text: the string, or the text of its parts.
    pub fn text(&self) -> String {
        match self {
            Self::Text(text) => text.clone(),
            Self::Parts(parts) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(serde_json::Value::as_str))
                .collect(),
        }
    }
}

/// Item kinds OpenAI defines that clients send back in their history and
/// that Turnpike keeps verbatim (`InputItem::Other`).
pub const OPENAI_ITEM_TYPES: [&str; 30] = [
    "item_reference",
    "additional_tools",
    "configuration_update",
    "compaction_trigger",
    "program",
    "program_output",
    "reasoning",
    "compaction",
    "custom_tool_call",
    "custom_tool_call_output",
    "local_shell_call",
    "local_shell_call_output",
    "shell_call",
    "shell_call_output",
    "apply_patch_call",
    "apply_patch_call_output",
    "web_search_call",
    "file_search_call",
    "computer_call",
    "computer_call_output",
    "code_interpreter_call",
    "image_generation_call",
    "mcp_call",
    "mcp_list_tools",
    "mcp_approval_request",
    "mcp_approval_response",
    "tool_search_call",
    "tool_search_output",
    "function_shell_call",
    "function_shell_call_output",
];

/// The tagged shape `InputItem` parses through, with unknown fields refused.
/// The optional fields are OpenAI's own, which SDKs send back as they got them.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
#[allow(dead_code)]
enum StrictInputItem {
    Message {
        role: Role,
        content: ItemContent,
        #[serde(default)]
        id: Option<String>,
        #[serde(default)]
        status: Option<String>,
        #[serde(default)]
        phase: Option<serde_json::Value>,
    },
    FunctionCall {
        call_id: String,
        name: String,
        arguments: String,
        #[serde(default)]
        id: Option<String>,
        #[serde(default)]
        status: Option<String>,
        #[serde(default)]
        namespace: Option<serde_json::Value>,
    },
    FunctionCallOutput {
        call_id: String,
        output: FunctionOutput,
        #[serde(default)]
        id: Option<String>,
        #[serde(default)]
        status: Option<String>,
    },
}

impl<'de> Deserialize<'de> for InputItem {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut value = serde_json::Value::deserialize(deserializer)?;
        let Some(object) = value.as_object_mut() else {
            return Err(D::Error::custom("an item must be a JSON object"));
        };
        if !object.contains_key("type") && object.contains_key("role") {
            object.insert("type".into(), "message".into());
        }
        // OpenAI's item reference may leave its type out: `{"id": …}`.
        if !object.contains_key("type") && object.len() == 1 && object.contains_key("id") {
            object.insert("type".into(), "item_reference".into());
        }
        if let Some(kind) = object.get("type").and_then(serde_json::Value::as_str)
            && OPENAI_ITEM_TYPES.contains(&kind)
        {
            return Ok(Self::Other(
                object.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            ));
        }
        let strict: StrictInputItem = serde_path_to_error_free(value).map_err(D::Error::custom)?;
        Ok(match strict {
            StrictInputItem::Message { role, content, .. } => Self::Message { role, content },
            StrictInputItem::FunctionCall {
                call_id,
                name,
                arguments,
                ..
            } => Self::FunctionCall {
                call_id,
                name,
                arguments,
            },
            StrictInputItem::FunctionCallOutput {
                call_id, output, ..
            } => Self::FunctionCallOutput { call_id, output },
        })
    }
}

/// Parses a JSON value, keeping serde's own message (which names unknown
/// and missing fields).
fn serde_path_to_error_free<T: serde::de::DeserializeOwned>(
    value: serde_json::Value,
) -> Result<T, String> {
    serde_json::from_value(value).map_err(|e| e.to_string())
}

/// `POST /v1/conversations/{id}/items`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateItems {
    /// One to 20 items, appended in order.
    pub items: Vec<InputItem>,
}

impl From<String> for FunctionOutput {
    fn from(text: String) -> Self {
        Self::Text(text)
    }
}

/// A stored conversation item, as the API returns it. Items come from
/// clients and from model providers; what a provider sends beyond the
/// fields Turnpike acts on is kept in `extra`, and item kinds Turnpike does
/// not model are kept whole in `Other`, so every item goes back to the
/// provider and out to clients as it came.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Item {
    /// A message; content is always a list of parts.
    Message {
        /// `msg_…`
        id: String,
        status: String,
        role: Role,
        content: Vec<ContentPart>,
        /// What else the provider sent with the message (`phase`, …).
        #[serde(flatten)]
        #[schema(value_type = Object)]
        extra: Extra,
    },
    /// A function tool call emitted by the model.
    FunctionCall {
        /// `fc_…`
        id: String,
        status: String,
        call_id: String,
        name: String,
        arguments: String,
        /// What else the provider sent with the call (`namespace`, …).
        #[serde(flatten)]
        #[schema(value_type = Object)]
        extra: Extra,
    },
    /// The output of a function tool call.
    FunctionCallOutput {
        /// `fco_…`
        id: String,
        status: String,
        call_id: String,
        #[schema(value_type = Value)]
        output: FunctionOutput,
    },
    /// The model's reasoning, kept so it can be passed back to the model on
    /// the next request (`store: false` providers need its encrypted form).
    Reasoning {
        /// `rs_…`
        id: String,
        #[serde(default)]
        summary: Vec<serde_json::Value>,
        /// Opaque; passed back to the provider exactly as received.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        encrypted_content: Option<String>,
        /// What else the provider sent (`content`, `status`, …).
        #[serde(flatten)]
        #[schema(value_type = Object)]
        extra: Extra,
    },
    /// The conversation up to here, compacted: later prompts start from it
    /// instead of the items before it (which stay listed).
    Compaction {
        /// `cmp_…`
        id: String,
        /// Opaque; passed back to the provider exactly as received.
        encrypted_content: String,
    },
    /// An item of another kind (hosted tool calls such as `web_search_call`,
    /// custom, shell and patch tool calls and their outputs, kinds a
    /// provider introduces later), kept whole: `type`, Turnpike's `id`, and
    /// everything else as received.
    #[serde(untagged)]
    Other(Verbatim),
}

impl Item {
    /// The item's public id.
    pub fn id(&self) -> &str {
        match self {
            Self::Message { id, .. }
            | Self::FunctionCall { id, .. }
            | Self::FunctionCallOutput { id, .. }
            | Self::Reasoning { id, .. }
            | Self::Compaction { id, .. } => id,
            Self::Other(fields) => fields
                .get("id")
                .and_then(serde_json::Value::as_str)
                .unwrap_or(""),
        }
    }

    /// The item's kind, as its `type` says.
    pub fn kind(&self) -> &str {
        match self {
            Self::Message { .. } => "message",
            Self::FunctionCall { .. } => "function_call",
            Self::FunctionCallOutput { .. } => "function_call_output",
            Self::Reasoning { .. } => "reasoning",
            Self::Compaction { .. } => "compaction",
            Self::Other(fields) => fields
                .get("type")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("unknown"),
        }
    }

    /// The call this item makes that the client must answer, if it is one:
    /// its call id. Function, custom, local shell, shell and patch calls.
    pub fn client_call_id(&self) -> Option<&str> {
        match self {
            Self::FunctionCall { call_id, .. } => Some(call_id),
            Self::Other(fields) if CLIENT_CALL_TYPES.contains(&self.kind()) => {
                fields.get("call_id").and_then(serde_json::Value::as_str)
            }
            _ => None,
        }
    }
}

/// Call item kinds that the client executes and answers with an `*_output`
/// item in its next request.
pub const CLIENT_CALL_TYPES: [&str; 5] = [
    "custom_tool_call",
    "local_shell_call",
    "shell_call",
    "apply_patch_call",
    "computer_call",
];

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use serde_json::json;

    /// What OpenAI's Responses API sends is stored and shown as it came.
    #[test]
    fn provider_items_keep_every_field_and_kind() {
        let message = json!({"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
            "phase": "final_answer",
            "content": [{"type": "output_text", "text": "hi", "annotations": [], "logprobs": []},
                        {"type": "refusal", "refusal": "no"},
                        {"type": "reasoning_text", "text": "hmm"}]});
        let item: Item = serde_json::from_value(message.clone()).unwrap();
        let Item::Message { content, extra, .. } = &item else {
            panic!("not a message: {item:?}")
        };
        assert_eq!(content[0].text(), Some("hi"));
        assert_eq!(content[2].kind(), "reasoning_text");
        assert_eq!(extra.get("phase"), Some(&json!("final_answer")));
        assert_eq!(serde_json::to_value(&item).unwrap(), message);

        let search = json!({"type": "web_search_call", "id": "ws_1", "status": "completed",
            "action": {"type": "search", "query": "toll roads"}});
        let item: Item = serde_json::from_value(search.clone()).unwrap();
        assert!(matches!(item, Item::Other(_)));
        assert_eq!(item.kind(), "web_search_call");
        assert_eq!(serde_json::to_value(&item).unwrap(), search);

        let shell = json!({"type": "local_shell_call", "id": "item_1", "call_id": "c1", "status": "completed",
            "action": {"type": "exec", "command": ["ls"]}});
        let item: Item = serde_json::from_value(shell).unwrap();
        assert_eq!(item.client_call_id(), Some("c1"));
    }

    #[test]
    fn clients_may_resend_openai_item_kinds_but_not_made_up_ones() {
        let items: Vec<InputItem> = serde_json::from_value(json!([
            {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "x"},
            {"type": "custom_tool_call_output", "call_id": "c1", "output": "done"},
            {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "ok"}]}
        ]))
        .unwrap();
        assert!(matches!(items[0], InputItem::Other(_)));
        assert!(matches!(items[2], InputItem::FunctionCallOutput { .. }));
        let error = serde_json::from_value::<InputItem>(json!({"type": "telegram", "text": "x"}))
            .unwrap_err()
            .to_string();
        assert!(error.contains("telegram"), "{error}");
    }
}
