//! The one HTTP error edge: every failure, from a bad body to a dead
//! primary, leaves as `ApiError` in OpenAI's error shape. 5xx details go to
//! the log, never to the client.

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use turnpike_core::db::DbError;
use turnpike_protocol::{ErrorBody, ErrorObject, ErrorType};

/// An error on its way to the client.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: ErrorType,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds, for 429 and 503.
    pub retry_after: Option<u64>,
    /// More headers the answer carries (a 429's `RateLimit-Policy` and
    /// `RateLimit`).
    pub headers: Option<Box<HeaderMap>>,
}

impl ApiError {
    fn new(status: StatusCode, kind: ErrorType, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            message: message.into(),
            param: None,
            code: None,
            retry_after: None,
            headers: None,
        }
    }

    /// The same error, answered with `headers` too.
    pub fn with_headers(mut self, headers: HeaderMap) -> Self {
        self.headers = Some(Box::new(headers));
        self
    }

    /// 400: the request names something invalid; `param` says what.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        let mut e = Self::new(
            StatusCode::BAD_REQUEST,
            ErrorType::InvalidRequestError,
            message,
        );
        e.param = Some(param.into());
        e.code = Some("invalid_value");
        e
    }

    /// 400 for a body that is not valid JSON or not the expected shape.
    pub fn bad_body(param: Option<String>, message: impl Into<String>, code: &'static str) -> Self {
        let mut e = Self::new(
            StatusCode::BAD_REQUEST,
            ErrorType::InvalidRequestError,
            message,
        );
        e.param = param;
        e.code = Some(code);
        e
    }

    /// 404 for a resource that does not exist or belongs to someone else.
    pub fn not_found(what: &str, id: &str) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            ErrorType::InvalidRequestError,
            format!("No {what} found with id '{id}'."),
        );
        e.code = Some("not_found");
        e
    }

    /// The same error, naming the request parameter it is about.
    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    /// 404 for a path no route serves.
    pub fn no_route(method: &str, path: &str) -> Self {
        let mut e = Self::new(
            StatusCode::NOT_FOUND,
            ErrorType::InvalidRequestError,
            format!("Invalid URL ({method} {path})"),
        );
        e.code = Some("unknown_url");
        e
    }

    /// 405 for a known path with the wrong method.
    pub fn method_not_allowed(method: &str, path: &str) -> Self {
        let mut e = Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            ErrorType::InvalidRequestError,
            format!("Method {method} is not allowed on {path}"),
        );
        e.code = Some("method_not_allowed");
        e
    }

    /// 401.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        let mut e = Self::new(
            StatusCode::UNAUTHORIZED,
            ErrorType::AuthenticationError,
            message,
        );
        e.code = Some("invalid_api_key");
        e
    }

    /// 403.
    pub fn forbidden(message: impl Into<String>) -> Self {
        let mut e = Self::new(StatusCode::FORBIDDEN, ErrorType::PermissionError, message);
        e.code = Some("forbidden");
        e
    }

    /// 409.
    pub fn conflict(message: impl Into<String>, code: &'static str) -> Self {
        let mut e = Self::new(
            StatusCode::CONFLICT,
            ErrorType::InvalidRequestError,
            message,
        );
        e.code = Some(code);
        e
    }

    /// 422.
    pub fn unprocessable(param: &str, message: impl Into<String>, code: &'static str) -> Self {
        let mut e = Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            ErrorType::InvalidRequestError,
            message,
        );
        e.param = Some(param.to_owned());
        e.code = Some(code);
        e
    }

    /// 503 with `Retry-After`.
    pub fn unavailable(message: impl Into<String>, retry_after_s: u64) -> Self {
        let mut e = Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorType::ServiceUnavailable,
            message,
        );
        e.code = Some("service_unavailable");
        e.retry_after = Some(retry_after_s);
        e
    }

    /// 502: the model failed the request; `message` is the turn's
    /// (sanitized) error, which names no internals.
    pub fn upstream(message: &str) -> Self {
        let mut e = Self::new(StatusCode::BAD_GATEWAY, ErrorType::ServerError, message);
        e.code = Some("model_error");
        e
    }

    /// 504 with `Retry-After`: this request's query ran out of time (a lock,
    /// a slow plan); other requests are unaffected.
    pub fn query_timeout() -> Self {
        let mut e = Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            ErrorType::ServiceUnavailable,
            "The database did not answer this request in time. Retry shortly.",
        );
        e.code = Some("query_timeout");
        e.retry_after = Some(1);
        e
    }

    /// 504: a turn the request waits for did not end within
    /// `api.response_wait_ms`.
    pub fn turn_timeout(message: &str) -> Self {
        let mut e = Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            ErrorType::ServiceUnavailable,
            message,
        );
        e.code = Some("timeout");
        e.retry_after = Some(1);
        e
    }

    /// 500; `cause` is logged and not shown.
    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorType::ServerError,
            "The server had an error while processing your request.",
        )
    }

    /// Any status with a message (extractor rejections keep their status).
    pub fn with_status(status: StatusCode, message: impl Into<String>, code: &'static str) -> Self {
        if status.is_server_error() {
            return Self::internal(&message.into());
        }
        let mut e = Self::new(status, ErrorType::InvalidRequestError, message);
        e.code = Some(code);
        e
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorObject {
                message: self.message.clone(),
                kind: self.kind,
                param: self.param.clone(),
                code: self.code.map(str::to_owned),
            },
        }
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::PrimaryUnavailable => Self::unavailable(
                "Writes are temporarily unavailable: the primary database is not answering. Retry shortly.",
                1,
            ),
            DbError::NoNodeAvailable => Self::unavailable(
                "No database node can serve this request right now. Retry shortly.",
                1,
            ),
            DbError::Overloaded { .. } => {
                let mut e = Self::unavailable(
                    "The service is over capacity and shed this request. Retry shortly.",
                    1,
                );
                e.code = Some("overloaded");
                e
            }
            DbError::Timeout { .. } => Self::query_timeout(),
            DbError::Query(e) if turnpike_core::db::is_query_timeout(&e) => Self::query_timeout(),
            DbError::Query(e) if turnpike_core::db::is_transaction_conflict(&e) => {
                tracing::warn!(error = %e, "a transaction collided with another and was rolled back");
                let mut e = Self::unavailable(
                    "The request collided with another on the same data and was rolled back; nothing was written. Retry it.",
                    1,
                );
                e.code = Some("conflict_retry");
                e
            }
            e if e.is_retryable() => {
                tracing::warn!(error = %e, "database unavailable");
                Self::unavailable("The database is temporarily unavailable. Retry shortly.", 1)
            }
            e => Self::internal(&e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let Some(headers) = self.headers {
            response.headers_mut().extend(*headers);
        }
        response
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        Self::from(DbError::Query(e))
    }
}
