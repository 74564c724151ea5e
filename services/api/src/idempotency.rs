//! `Idempotency-Key` on POSTs: the first request with a key is claimed and
//! its answer stored; a retry with the same key and body gets that answer
//! back (`Idempotent-Replayed: true`); the same key with another body is a
//! 422; a retry while the first is still running is a 409. 5xx and 429
//! answers are not stored, so a retry after a failure or a refusal by a
//! rate limit runs again.

use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use sqlx::types::Json as SqlJson;
use turnpike_core::db::DbConn;
use uuid::Uuid;

use crate::AppState;
use crate::error::ApiError;
use crate::extract::{Auth, CONSISTENCY_HEADER};

const HEADER: &str = "idempotency-key";
const MAX_KEY_LEN: usize = 255;
/// Response headers kept with the stored answer.
const KEPT_HEADERS: [&str; 2] = ["content-type", CONSISTENCY_HEADER];

pub async fn layer(State(app): State<AppState>, req: Request, next: Next) -> Response {
    if req.method() != Method::POST || !req.headers().contains_key(HEADER) {
        return next.run(req).await;
    }
    handle(app, req, next)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn handle(app: AppState, req: Request, next: Next) -> Result<Response, ApiError> {
    let key = req
        .headers()
        .get(HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .filter(|k| !k.is_empty() && k.len() <= MAX_KEY_LEN)
        .ok_or_else(|| {
            ApiError::invalid(
                "Idempotency-Key",
                format!("Idempotency-Key must be 1 to {MAX_KEY_LEN} visible ASCII characters."),
            )
        })?;
    let (mut parts, body) = req.into_parts();
    let Auth(principal) = Auth::from_request_parts(&mut parts, &app).await?;
    let limit = crate::body_limit_for(&app.settings.api, parts.uri.path());
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::with_status(
            StatusCode::PAYLOAD_TOO_LARGE,
            "The request body is too large.",
            "invalid_body",
        )
    })?;
    let fingerprint = fingerprint(&parts.method, parts.uri.path(), &bytes);

    let mut tx = app.router.write().await?;
    if !claim(&mut tx, principal.user_id, &key, &fingerprint).await? {
        let stored = find(&mut tx, principal.user_id, &key).await?;
        drop(tx);
        return match stored {
            Some(stored) if stored.request_hash != fingerprint => Err(ApiError::unprocessable(
                "Idempotency-Key",
                "This Idempotency-Key was used with a different request.",
                "idempotency_key_reused",
            )),
            Some(stored) => replay(stored),
            // Claimed and released between our two statements: treat as in progress.
            None => Err(in_progress()),
        };
    }
    tx.commit().await?;

    let response = next
        .run(Request::from_parts(parts, Body::from(bytes)))
        .await;
    let status = response.status();
    let streaming = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|ct| ct.as_bytes().starts_with(b"text/event-stream"));
    if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS || streaming {
        release(&app, principal.user_id, &key).await;
        return Ok(response);
    }
    let (parts, body) = response.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .map_err(|e| ApiError::internal(&e))?;
    let kept: Vec<(String, String)> = KEPT_HEADERS
        .iter()
        .filter_map(|name| {
            let value = parts.headers.get(*name)?.to_str().ok()?;
            Some(((*name).to_owned(), value.to_owned()))
        })
        .collect();
    if let Err(e) = store(&app, principal.user_id, &key, status, &kept, &body).await {
        tracing::warn!(error = %e, "could not store an idempotent response; a retry will run again");
        release(&app, principal.user_id, &key).await;
    }
    Ok(Response::from_parts(parts, Body::from(body)))
}

fn in_progress() -> ApiError {
    ApiError::conflict(
        "A request with this Idempotency-Key is still being processed; retry shortly.",
        "idempotency_key_in_progress",
    )
}

fn fingerprint(method: &Method, path: &str, body: &Bytes) -> Vec<u8> {
    let mut hash = Sha256::new();
    hash.update(method.as_str().as_bytes());
    hash.update(b" ");
    hash.update(path.as_bytes());
    hash.update(b"\n");
    hash.update(body);
    hash.finalize().to_vec()
}

#[derive(sqlx::FromRow)]
struct Stored {
    request_hash: Vec<u8>,
    status_code: Option<i64>,
    response_headers: Option<SqlJson<Vec<(String, String)>>>,
    response_body: Option<Vec<u8>>,
}

fn replay(stored: Stored) -> Result<Response, ApiError> {
    let Some(code) = stored.status_code else {
        return Err(in_progress());
    };
    let status = u16::try_from(code)
        .ok()
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or_else(|| {
            ApiError::internal(&format!("stored status {code} is not an HTTP status"))
        })?;
    let mut headers = HeaderMap::new();
    for (name, value) in stored.response_headers.map(|h| h.0).unwrap_or_default() {
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(name), HeaderValue::try_from(value)) {
            headers.insert(name, value);
        }
    }
    headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    Ok((status, headers, stored.response_body.unwrap_or_default()).into_response())
}

/// Claims the key; false when it exists already. Primary only.
async fn claim(
    db: &mut impl DbConn,
    user: Uuid,
    key: &str,
    hash: &[u8],
) -> Result<bool, sqlx::Error> {
    let prepared = db.prepared();
    let row: Option<(i32,)> = sqlx::query_as(
        "INSERT INTO idempotency_keys (user_id, key, request_hash) VALUES ($1, $2, $3)
         ON CONFLICT (user_id, key) DO NOTHING RETURNING 1",
    )
    .bind(user)
    .bind(key)
    .bind(hash)
    .persistent(prepared)
    .fetch_optional(db.conn())
    .await?;
    Ok(row.is_some())
}

/// The stored record for a key. Primary only (it must see the latest claim).
async fn find(db: &mut impl DbConn, user: Uuid, key: &str) -> Result<Option<Stored>, sqlx::Error> {
    let prepared = db.prepared();
    sqlx::query_as(
        "SELECT request_hash, status_code, response_headers, response_body
         FROM idempotency_keys WHERE user_id = $1 AND key = $2",
    )
    .bind(user)
    .bind(key)
    .persistent(prepared)
    .fetch_optional(db.conn())
    .await
}

async fn store(
    app: &AppState,
    user: Uuid,
    key: &str,
    status: StatusCode,
    headers: &[(String, String)],
    body: &[u8],
) -> Result<(), turnpike_core::db::DbError> {
    let mut tx = app.router.write().await?;
    let prepared = tx.prepared();
    sqlx::query(
        "UPDATE idempotency_keys SET status_code = $3, response_headers = $4, response_body = $5
         WHERE user_id = $1 AND key = $2",
    )
    .bind(user)
    .bind(key)
    .bind(i64::from(status.as_u16()))
    .bind(SqlJson(headers))
    .bind(body)
    .persistent(prepared)
    .execute(tx.conn())
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Forgets a claim so that a retry runs again.
async fn release(app: &AppState, user: Uuid, key: &str) {
    let result = async {
        let mut tx = app.router.write().await?;
        let prepared = tx.prepared();
        sqlx::query("DELETE FROM idempotency_keys WHERE user_id = $1 AND key = $2")
            .bind(user)
            .bind(key)
            .persistent(prepared)
            .execute(tx.conn())
            .await?;
        tx.commit().await?;
        Ok::<(), turnpike_core::db::DbError>(())
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "could not release an idempotency key");
    }
}
