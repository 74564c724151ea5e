//! `Idempotency-Key` on POSTs: the first request with a key is claimed and
//! its answer stored; a retry with the same key and body gets that answer
//! back (`Idempotent-Replayed: true`); the same key with another body is a
//! 422; a retry while the first is still running is a 409. 5xx and 429
//! answers are not stored, so a retry after a failure or a refusal by a
//! rate limit runs again.
//!
//! A `POST /v1/responses` whose answer is a stream, or whose client left
//! before the answer, leaves a record naming the response it created: a
//! retry attaches to that response (its stream from the start, or its
//! end) instead of creating another turn. A claim whose request never
//! answered (its process died) lapses after `api.idempotency_claim_ms`;
//! records are deleted after `api.idempotency_retention_ms`.

use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, Request};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use sqlx::types::Json as SqlJson;
use turnpike_core::db::DbConn;
use uuid::Uuid;

use crate::AppState;
use crate::error::ApiError;
use crate::extract::{Auth, CONSISTENCY_HEADER};

const HEADER: &str = "idempotency-key";
/// In a stored record's headers: the response a retry attaches to.
const ATTACH: &str = "turnpike-attach";
const MAX_KEY_LEN: usize = 255;
/// Response headers kept with the stored answer.
const KEPT_HEADERS: [&str; 2] = ["content-type", CONSISTENCY_HEADER];

/// A POST with an `Idempotency-Key` runs `next` once per key; a retry gets
/// the stored answer (or attaches to the stream it created).
pub async fn around<F, Fut>(app: &AppState, req: Request, next: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    if req.method() != Method::POST || !req.headers().contains_key(HEADER) {
        return next(req).await;
    }
    // Boxed: its state (the buffered body, the stored answer) would
    // otherwise make every request's future as large as a keyed POST's.
    Box::pin(handle(app.clone(), req, next))
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn handle<F, Fut>(app: AppState, req: Request, next: F) -> Result<Response, ApiError>
where
    F: FnOnce(Request) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
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
    let bytes = crate::body::read(body).await?;
    let fingerprint = fingerprint(&parts.method, parts.uri.path(), &bytes);

    let mut tx = app.router.write().await?;
    let claimed = claim(
        &mut tx,
        principal.user_id,
        &key,
        &fingerprint,
        &app.settings.api,
    )
    .await?;
    if !claimed {
        let stored = find(&mut tx, principal.user_id, &key).await?;
        drop(tx);
        return match stored {
            Some(stored) if stored.request_hash != fingerprint => Err(ApiError::unprocessable(
                "Idempotency-Key",
                "This Idempotency-Key was used with a different request.",
                "idempotency_key_reused",
            )),
            Some(stored) => replay(&app, principal.user_id, stored, &bytes).await,
            // Claimed and released between our two statements: treat as in progress.
            None => Err(in_progress()),
        };
    }
    tx.commit().await?;

    let created = CreatedResponse::default();
    parts.extensions.insert(created.clone());
    let mut held = Claim {
        app: app.clone(),
        user: principal.user_id,
        key: key.clone(),
        created: created.clone(),
        armed: true,
    };
    let response = next(Request::from_parts(parts, Body::from(bytes))).await;
    let status = response.status();
    let streaming = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|ct| ct.as_bytes().starts_with(b"text/event-stream"));
    if streaming {
        // A retry attaches to the stream of the response this created.
        held.settle().await;
        return Ok(response);
    }
    if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
        held.armed = false;
        release(&app, principal.user_id, &key).await;
        return Ok(response);
    }
    held.armed = false;
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

/// The response a `POST /v1/responses` created, set by its handler as soon
/// as the turn exists, so that a retry can attach to it.
#[derive(Clone, Default)]
pub struct CreatedResponse(std::sync::Arc<std::sync::Mutex<Option<String>>>);

impl CreatedResponse {
    pub fn set(&self, response: &str) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(response.to_owned());
    }

    fn get(&self) -> Option<String> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A claimed key whose request has not answered yet. Dropped armed (the
/// client left and the handler with it), it settles in the background.
struct Claim {
    app: AppState,
    user: Uuid,
    key: String,
    created: CreatedResponse,
    armed: bool,
}

impl Claim {
    /// Records the response the request created, for retries to attach
    /// to; without one, releases the key so that a retry runs again.
    async fn settle(&mut self) {
        self.armed = false;
        settle(&self.app, self.user, &self.key, self.created.get()).await;
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (app, user, key) = (self.app.clone(), self.user, std::mem::take(&mut self.key));
        let created = self.created.get();
        runtime.spawn(async move { settle(&app, user, &key, created).await });
    }
}

async fn settle(app: &AppState, user: Uuid, key: &str, created: Option<String>) {
    let Some(response) = created else {
        release(app, user, key).await;
        return;
    };
    let marker = [(ATTACH.to_owned(), response)];
    if let Err(e) = store(app, user, key, StatusCode::OK, &marker, &[]).await {
        tracing::warn!(error = %e, "could not record an idempotent response; a retry will run again");
        release(app, user, key).await;
    }
}

/// A retry of a request that created `response`: its events from the
/// start when the request streamed, else the response once it ends.
async fn attach(
    app: &AppState,
    user: Uuid,
    response: &str,
    stream: bool,
) -> Result<Response, ApiError> {
    let not_found = || ApiError::not_found("response", response);
    let id = turnpike_core::ids::parse(turnpike_protocol::ids::RESPONSE, response)
        .ok_or_else(not_found)?;
    let row = app
        .router
        .read_one_message(turnpike_core::db::Consistency::Strong, move |db| {
            Box::pin(async move { turnpike_core::turns::find(db, id, user).await })
        })
        .await?
        .ok_or_else(not_found)?;
    let mut answer = if stream {
        let slot = crate::limits::open_stream(app, user)?;
        crate::events::stream(app, row, None, slot)
    } else {
        axum::Json(crate::responses::wait(app, &row).await).into_response()
    };
    answer
        .headers_mut()
        .insert("idempotent-replayed", HeaderValue::from_static("true"));
    Ok(answer)
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

/// The stored answer; for a record naming a response, that response,
/// streamed when the retried request (`body`) asks for a stream.
async fn replay(
    app: &AppState,
    user: Uuid,
    stored: Stored,
    body: &Bytes,
) -> Result<Response, ApiError> {
    let Some(code) = stored.status_code else {
        return Err(in_progress());
    };
    let attached = stored.response_headers.as_ref().and_then(|headers| {
        headers
            .0
            .iter()
            .find(|(name, _)| name == ATTACH)
            .map(|(_, value)| value.clone())
    });
    if let Some(response) = attached {
        let stream = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|body| body.get("stream").and_then(serde_json::Value::as_bool))
            == Some(true);
        return attach(app, user, &response, stream).await;
    }
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

/// Claims the key; false when it is held. A record past its retention, or
/// a claim whose request never answered within its time, is taken over.
/// Primary only.
async fn claim(
    db: &mut impl DbConn,
    user: Uuid,
    key: &str,
    hash: &[u8],
    settings: &turnpike_core::config::ApiSettings,
) -> Result<bool, sqlx::Error> {
    let prepared = db.prepared();
    let seconds = |ms: u64| ms as f64 / 1000.0;
    let row: Option<(i32,)> = sqlx::query_as(
        "INSERT INTO idempotency_keys (user_id, key, request_hash) VALUES ($1, $2, $3)
         ON CONFLICT (user_id, key) DO UPDATE
            SET request_hash = EXCLUDED.request_hash, status_code = NULL,
                response_headers = NULL, response_body = NULL, created_at = now()
          WHERE idempotency_keys.created_at < now() - make_interval(secs => $4)
             OR (idempotency_keys.status_code IS NULL
                 AND idempotency_keys.created_at < now() - make_interval(secs => $5))
         RETURNING 1",
    )
    .bind(user)
    .bind(key)
    .bind(hash)
    .bind(seconds(settings.idempotency_retention_ms))
    .bind(seconds(settings.idempotency_claim_ms))
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

/// Deletes expired records, a batch at a time, for as long as the process
/// runs (every api process does; the batches are small and idempotent).
pub async fn sweep(app: AppState) {
    let retention = app.settings.api.idempotency_retention_ms;
    let every = std::time::Duration::from_millis((retention / 2).clamp(100, 60_000));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let result = async {
            let mut tx = app.router.write().await?;
            let prepared = tx.prepared();
            sqlx::query(
                "DELETE FROM idempotency_keys WHERE ctid = ANY(ARRAY(
                   SELECT ctid FROM idempotency_keys
                    WHERE created_at < now() - make_interval(secs => $1)
                    ORDER BY created_at LIMIT 1000))",
            )
            .bind(retention as f64 / 1000.0)
            .persistent(prepared)
            .execute(tx.conn())
            .await?;
            tx.commit().await?;
            Ok::<(), turnpike_core::db::DbError>(())
        }
        .await;
        if let Err(e) = result {
            tracing::debug!(error = %e, "could not delete expired idempotency records");
        }
    }
}
