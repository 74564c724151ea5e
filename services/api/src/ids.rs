//! Public ids in requests: anything that does not parse is a 404, as an id
//! that was never issued cannot name anything.

pub use turnpike_core::ids::{encode, item_prefix};
use uuid::Uuid;

use crate::error::ApiError;

pub fn decode(prefix: &str, what: &str, text: &str) -> Result<Uuid, ApiError> {
    turnpike_core::ids::parse(prefix, text).ok_or_else(|| ApiError::not_found(what, text))
}

pub fn decode_item(text: &str) -> Result<Uuid, ApiError> {
    turnpike_core::ids::parse_item(text).ok_or_else(|| ApiError::not_found("item", text))
}
