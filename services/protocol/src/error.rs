//! The one error body every failing request gets, in OpenAI's shape:
//! `{"error": {"message", "type", "param", "code"}}`.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The body of every error response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorObject,
}

/// What went wrong, for a person (`message`) and for a program (`type`, `code`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ErrorObject {
    /// Human-readable explanation; names the offending field where there is one.
    pub message: String,
    /// Broad class of the error.
    #[serde(rename = "type")]
    pub kind: ErrorType,
    /// The request field (JSON path or parameter name) the error is about.
    pub param: Option<String>,
    /// A stable machine-readable code, e.g. `unknown_field` or `not_found`.
    pub code: Option<String>,
}

/// The error classes, as OpenAI names them plus Turnpike's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorType {
    /// The request is malformed or asks for something impossible (400, 404, 405, 409, 413, 415, 422).
    InvalidRequestError,
    /// The API key is missing, unknown or revoked (401).
    AuthenticationError,
    /// The key is valid but may not do this (403).
    PermissionError,
    /// Too many requests; retry after `Retry-After` (429).
    RateLimitError,
    /// A dependency is unavailable; retry after `Retry-After` (503).
    ServiceUnavailable,
    /// A bug or an unexpected failure on the server (500); details are in the server log.
    ServerError,
}
