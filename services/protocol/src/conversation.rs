//! Conversation bodies.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::item::InputItem;

/// Up to 16 string pairs; keys ≤ 64 characters, values ≤ 512, as OpenAI's.
pub type Metadata = BTreeMap<String, String>;

/// A conversation as the API returns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Conversation {
    /// `conv_…`
    pub id: String,
    /// Always `conversation`.
    pub object: String,
    /// Unix seconds.
    pub created_at: i64,
    pub metadata: Metadata,
}

/// `POST /v1/conversations`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateConversation {
    /// Initial items, at most 20.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub items: Option<Vec<InputItem>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Metadata>,
}

/// `POST /v1/conversations/{id}`: replaces the metadata.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateConversation {
    pub metadata: Metadata,
}

/// `DELETE /v1/conversations/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ConversationDeleted {
    pub id: String,
    /// Always `conversation.deleted`.
    pub object: String,
    pub deleted: bool,
}
