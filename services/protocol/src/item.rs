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

/// One part of a message's content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ContentPart {
    /// Text written by the user, system or developer.
    InputText { text: String },
    /// Text written by the model.
    OutputText {
        text: String,
        #[serde(default)]
        annotations: Vec<serde_json::Value>,
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
}

impl ContentPart {
    /// The part's text, if it has any.
    pub fn text(&self) -> Option<&str> {
        match self {
            Self::InputText { text } | Self::OutputText { text, .. } => Some(text),
            Self::Refusal { refusal } => Some(refusal),
            Self::InputImage { .. } => None,
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
    FunctionCallOutput { call_id: String, output: String },
}

/// The tagged shape `InputItem` parses through, with unknown fields refused.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum StrictInputItem {
    Message {
        role: Role,
        content: ItemContent,
        #[serde(default)]
        #[allow(dead_code)]
        id: Option<String>,
        #[serde(default)]
        #[allow(dead_code)]
        status: Option<String>,
    },
    FunctionCall {
        call_id: String,
        name: String,
        arguments: String,
        #[serde(default)]
        #[allow(dead_code)]
        id: Option<String>,
        #[serde(default)]
        #[allow(dead_code)]
        status: Option<String>,
    },
    FunctionCallOutput {
        call_id: String,
        output: String,
        #[serde(default)]
        #[allow(dead_code)]
        id: Option<String>,
        #[serde(default)]
        #[allow(dead_code)]
        status: Option<String>,
    },
}

impl<'de> Deserialize<'de> for InputItem {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let mut value = serde_json::Value::deserialize(deserializer)?;
        if let Some(object) = value.as_object_mut() {
            if !object.contains_key("type") && object.contains_key("role") {
                object.insert("type".into(), "message".into());
            }
        } else {
            return Err(D::Error::custom("an item must be a JSON object"));
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

/// A stored conversation item, as the API returns it.
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
    },
    /// A function tool call emitted by the model.
    FunctionCall {
        /// `fc_…`
        id: String,
        status: String,
        call_id: String,
        name: String,
        arguments: String,
    },
    /// The output of a function tool call.
    FunctionCallOutput {
        /// `fco_…`
        id: String,
        status: String,
        call_id: String,
        output: String,
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
    },
    /// The conversation up to here, compacted: later prompts start from it
    /// instead of the items before it (which stay listed).
    Compaction {
        /// `cmp_…`
        id: String,
        /// Opaque; passed back to the provider exactly as received.
        encrypted_content: String,
    },
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
        }
    }
}
