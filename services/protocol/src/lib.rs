//! Wire types shared by every Turnpike service.
//!
//! The shapes follow OpenAI's Conversations and Responses APIs where the two
//! overlap, so that an unmodified official SDK can talk to Turnpike. The api
//! serializes them, the tests and the load test deserialize them: one
//! definition keeps both sides honest.

pub mod chat;
pub mod conversation;
pub mod error;
pub mod ids;
pub mod item;
pub mod list;
pub mod response;
pub mod switch;

pub use conversation::{
    Conversation, ConversationDeleted, CreateConversation, Metadata, UpdateConversation,
};
pub use error::{ErrorBody, ErrorObject, ErrorType};
pub use item::{ContentPart, CreateItems, InputItem, Item, ItemContent, Role};
pub use list::List;
pub use response::{CreateResponse, Response, ResponseInput, ResponseStatus};
pub use switch::{QueryClass, SetSwitch, Switch, SwitchAction, SwitchDeleted};
