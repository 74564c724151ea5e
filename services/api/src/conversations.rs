//! Conversations: create (with up to 20 items), list (extension, keyset on
//! id), retrieve, update metadata, delete (soft).

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use sqlx::types::Json as SqlJson;
use turnpike_core::db::DbConn;
use turnpike_core::db::statement::{self, Arg};
use turnpike_protocol::{
    Conversation, ConversationDeleted, CreateConversation, List, Metadata, UpdateConversation,
    ids as prefixes,
};
use uuid::Uuid;

use crate::error::ApiError;
use crate::extract::{Auth, Json, Query, ReadConsistency};
use crate::items::{self, Order, page_limit};
use crate::{AppState, Path, ids, written};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/conversations", get(list).post(create))
        .route(
            "/v1/conversations/{conversation_id}",
            get(retrieve).post(update).delete(delete),
        )
}

/// Checks OpenAI's metadata limits: ≤ 16 pairs, keys ≤ 64 chars, values ≤ 512.
pub fn check_metadata(metadata: &Metadata) -> Result<(), ApiError> {
    if metadata.len() > 16 {
        return Err(ApiError::invalid(
            "metadata",
            format!(
                "metadata may hold at most 16 pairs; got {}.",
                metadata.len()
            ),
        ));
    }
    for (key, value) in metadata {
        if key.chars().count() > 64 {
            return Err(ApiError::invalid(
                format!("metadata.{key}"),
                "metadata keys may be at most 64 characters.",
            ));
        }
        if value.chars().count() > 512 {
            return Err(ApiError::invalid(
                format!("metadata.{key}"),
                "metadata values may be at most 512 characters.",
            ));
        }
    }
    Ok(())
}

/// Create a conversation, optionally with initial items.
#[utoipa::path(post, path = "/v1/conversations", tag = "conversations",
    request_body = CreateConversation,
    responses((status = 200, body = Conversation), (status = 400, body = turnpike_protocol::ErrorBody),
        (status = 401, body = turnpike_protocol::ErrorBody), (status = 413, body = turnpike_protocol::ErrorBody),
        (status = 422, body = turnpike_protocol::ErrorBody), (status = 503, body = turnpike_protocol::ErrorBody)))]
pub async fn create(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Json(body): Json<CreateConversation>,
) -> Result<Response, ApiError> {
    let metadata = body.metadata.unwrap_or_default();
    check_metadata(&metadata)?;
    let inputs = body.items.unwrap_or_default();
    let bytes = items::check_items(
        "items",
        &inputs,
        0,
        items::MAX_ITEMS_PER_CALL,
        app.settings.limits.max_item_bytes,
    )?;
    let mut tx = app.router.write().await?;
    if !inputs.is_empty() {
        crate::limits::check_storage(&app, &mut tx, principal.user_id, bytes).await?;
    }
    let row = insert(&mut tx, principal.user_id, &metadata, inputs.len()).await?;
    let resolved = items::resolve_references(&mut tx, principal.user_id, "items", &inputs).await?;
    items::append(
        &mut tx,
        row.id,
        1,
        resolved.as_deref().unwrap_or(&inputs),
        None,
    )
    .await?;
    let lsn = app.commit_and_record(&principal, row.id, tx).await?;
    Ok(written(lsn, StatusCode::OK, &row.into_api()))
}

#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// 1 to 100, default 20.
    pub limit: Option<i64>,
    /// A conversation id: the page starts after it, in the list's order.
    pub after: Option<String>,
    /// `asc` or `desc` (default, newest first).
    pub order: Option<Order>,
    /// `eventual`, `bounded`, `session` (default) or `strong`.
    // Read by `ReadConsistency`; named here for the API's description
    // only, and skipped unread.
    #[allow(dead_code)]
    #[param(value_type = Option<String>)]
    pub consistency: Option<serde::de::IgnoredAny>,
}

/// List the caller's conversations (extension: OpenAI has no list call).
#[utoipa::path(get, path = "/v1/conversations", tag = "conversations", params(ListParams),
    responses((status = 200, body = List<Conversation>), (status = 400, body = turnpike_protocol::ErrorBody),
        (status = 401, body = turnpike_protocol::ErrorBody), (status = 503, body = turnpike_protocol::ErrorBody)))]
pub async fn list(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Query(params): Query<ListParams>,
    read: ReadConsistency,
) -> Result<Response, ApiError> {
    let limit = page_limit(params.limit)?;
    let after = params
        .after
        .as_deref()
        .map(|a| ids::decode(prefixes::CONVERSATION, "conversation", a))
        .transpose()
        .map_err(|_| ApiError::invalid("after", "after must be a conversation id."))?;
    let order = params.order.unwrap_or_default();
    let user = principal.user_id;
    let consistency = app.consistency(&principal, read).await;
    let mut rows = app
        .router
        .read_one_message(consistency, move |db| {
            Box::pin(async move { list_rows(db, user, after, order, limit + 1).await })
        })
        .await?;
    let has_more = i64::try_from(rows.len()).unwrap_or(i64::MAX) > limit;
    rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    let data: Vec<Conversation> = rows.into_iter().map(ConversationRow::into_api).collect();
    Ok(axum::Json(List::new(data, has_more, |c| c.id.clone())).into_response())
}

/// Retrieve a conversation.
#[utoipa::path(get, path = "/v1/conversations/{conversation_id}", tag = "conversations",
    params(("conversation_id" = String, Path)),
    responses((status = 200, body = Conversation), (status = 401, body = turnpike_protocol::ErrorBody),
        (status = 404, body = turnpike_protocol::ErrorBody), (status = 503, body = turnpike_protocol::ErrorBody)))]
pub async fn retrieve(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(conversation_id): Path<String>,
    read: ReadConsistency,
) -> Result<Response, ApiError> {
    let id = ids::decode(prefixes::CONVERSATION, "conversation", &conversation_id)?;
    let user = principal.user_id;
    let consistency = app.consistency(&principal, read).await;
    let router = std::sync::Arc::clone(&app.router);
    let field = format!("conversation:{}", user.simple());
    let body = app
        .cached(id, &field, consistency, move |at| async move {
            let row = router
                .read_one_message(at, move |db| {
                    Box::pin(async move { find(db, id, user).await })
                })
                .await?;
            Ok(row.and_then(|row| {
                serde_json::to_vec(&row.into_api())
                    .ok()
                    .map(bytes::Bytes::from)
            }))
        })
        .await?
        .ok_or_else(|| ApiError::not_found("conversation", &conversation_id))?;
    Ok(crate::stored_json::response(body))
}

/// Replace a conversation's metadata.
#[utoipa::path(post, path = "/v1/conversations/{conversation_id}", tag = "conversations",
    params(("conversation_id" = String, Path)), request_body = UpdateConversation,
    responses((status = 200, body = Conversation), (status = 400, body = turnpike_protocol::ErrorBody),
        (status = 401, body = turnpike_protocol::ErrorBody), (status = 404, body = turnpike_protocol::ErrorBody),
        (status = 503, body = turnpike_protocol::ErrorBody)))]
pub async fn update(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(conversation_id): Path<String>,
    Json(body): Json<UpdateConversation>,
) -> Result<Response, ApiError> {
    let id = ids::decode(prefixes::CONVERSATION, "conversation", &conversation_id)?;
    check_metadata(&body.metadata)?;
    let mut tx = app.router.write().await?;
    let row = set_metadata(&mut tx, id, principal.user_id, &body.metadata)
        .await?
        .ok_or_else(|| ApiError::not_found("conversation", &conversation_id))?;
    let lsn = app.commit_and_record(&principal, id, tx).await?;
    Ok(written(lsn, StatusCode::OK, &row.into_api()))
}

/// Delete a conversation. Its items stay stored but can no longer be read.
#[utoipa::path(delete, path = "/v1/conversations/{conversation_id}", tag = "conversations",
    params(("conversation_id" = String, Path)),
    responses((status = 200, body = ConversationDeleted), (status = 401, body = turnpike_protocol::ErrorBody),
        (status = 404, body = turnpike_protocol::ErrorBody), (status = 503, body = turnpike_protocol::ErrorBody)))]
pub async fn delete(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(conversation_id): Path<String>,
) -> Result<Response, ApiError> {
    let id = ids::decode(prefixes::CONVERSATION, "conversation", &conversation_id)?;
    let mut tx = app.router.write().await?;
    if !soft_delete(&mut tx, id, principal.user_id).await? {
        return Err(ApiError::not_found("conversation", &conversation_id));
    }
    // Its queued and running turns end with it.
    let cancelled = turnpike_core::turns::cancel_active(&mut tx, id).await?;
    let lsn = app.commit_and_record(&principal, id, tx).await?;
    for (response, previous) in cancelled {
        let public = ids::encode(prefixes::RESPONSE, response);
        crate::responses::announce_cancel(&app, &public, &previous).await;
    }
    let body = ConversationDeleted {
        id: conversation_id,
        object: "conversation.deleted".into(),
        deleted: true,
    };
    Ok(written(lsn, StatusCode::OK, &body))
}

/// A conversation row as stored.
#[derive(Debug, sqlx::FromRow)]
pub struct ConversationRow {
    pub id: Uuid,
    pub metadata: SqlJson<Metadata>,
    pub created_at: i64,
}

turnpike_core::statement_row!(ConversationRow {
    id,
    metadata,
    created_at
});

impl ConversationRow {
    pub fn into_api(self) -> Conversation {
        Conversation {
            id: ids::encode(prefixes::CONVERSATION, self.id),
            object: "conversation".into(),
            created_at: self.created_at,
            metadata: self.metadata.0,
        }
    }
}

const COLUMNS: &str = "id, metadata, extract(epoch FROM created_at)::int8 AS created_at";

/// Inserts a conversation with `item_count` seqs already reserved. Primary only.
#[tracing::instrument(level = "debug", skip(db, metadata))]
pub async fn insert(
    db: &mut impl DbConn,
    user: Uuid,
    metadata: &Metadata,
    item_count: usize,
) -> Result<ConversationRow, sqlx::Error> {
    let metadata = statement::json(metadata)?;
    statement::fetch_optional(
        db,
        &format!(
            "INSERT INTO conversations (id, user_id, metadata, last_seq)
             VALUES ($1, $2, $3::jsonb, $4) RETURNING {COLUMNS}"
        ),
        &[
            Arg::from(Uuid::now_v7()),
            Arg::from(user),
            Arg::from(metadata.as_str()),
            Arg::from(i64::try_from(item_count).unwrap_or(i64::MAX)),
        ],
    )
    .await?
    .ok_or(sqlx::Error::RowNotFound)
}

/// A conversation the user owns. Replica or primary.
#[tracing::instrument(level = "debug", skip(db))]
pub async fn find(
    db: &mut impl DbConn,
    id: Uuid,
    user: Uuid,
) -> Result<Option<ConversationRow>, sqlx::Error> {
    statement::fetch_optional(
        db,
        &format!(
            "SELECT {COLUMNS} FROM conversations WHERE id = $1 AND user_id = $2 AND deleted_at IS NULL"
        ),
        &[Arg::from(id), Arg::from(user)],
    )
    .await
}

/// A keyset page of the user's conversations. Replica or primary.
#[tracing::instrument(level = "debug", skip(db))]
async fn list_rows(
    db: &mut impl DbConn,
    user: Uuid,
    after: Option<Uuid>,
    order: Order,
    limit: i64,
) -> Result<Vec<ConversationRow>, sqlx::Error> {
    let (cmp, dir) = match order {
        Order::Asc => (">", "ASC"),
        Order::Desc => ("<", "DESC"),
    };
    let sql = if after.is_some() {
        format!(
            "SELECT {COLUMNS} FROM conversations WHERE user_id = $1 AND deleted_at IS NULL AND id {cmp} $3
             ORDER BY id {dir} LIMIT $2"
        )
    } else {
        format!(
            "SELECT {COLUMNS} FROM conversations WHERE user_id = $1 AND deleted_at IS NULL
             ORDER BY id {dir} LIMIT $2"
        )
    };
    let mut args = vec![Arg::from(user), Arg::from(limit)];
    if let Some(after) = after {
        args.push(Arg::from(after));
    }
    statement::fetch_all(db, &sql, &args).await
}

/// Bumps the conversation's version, locking it, if the user owns it. Primary only.
#[tracing::instrument(level = "debug", skip(db))]
pub async fn touch(
    db: &mut impl DbConn,
    id: Uuid,
    user: Uuid,
) -> Result<Option<ConversationRow>, sqlx::Error> {
    let prepared = db.prepared();
    sqlx::query_as(&format!(
        "UPDATE conversations SET version = version + 1, updated_at = now()
         WHERE id = $1 AND user_id = $2 AND deleted_at IS NULL RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(user)
    .persistent(prepared)
    .fetch_optional(db.conn())
    .await
}

/// Replaces the metadata. Primary only.
#[tracing::instrument(level = "debug", skip(db, metadata))]
async fn set_metadata(
    db: &mut impl DbConn,
    id: Uuid,
    user: Uuid,
    metadata: &Metadata,
) -> Result<Option<ConversationRow>, sqlx::Error> {
    let prepared = db.prepared();
    sqlx::query_as(&format!(
        "UPDATE conversations SET metadata = $3, version = version + 1, updated_at = now()
         WHERE id = $1 AND user_id = $2 AND deleted_at IS NULL RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(user)
    .bind(SqlJson(metadata))
    .persistent(prepared)
    .fetch_optional(db.conn())
    .await
}

/// Marks the conversation deleted. Primary only.
#[tracing::instrument(level = "debug", skip(db))]
async fn soft_delete(db: &mut impl DbConn, id: Uuid, user: Uuid) -> Result<bool, sqlx::Error> {
    let prepared = db.prepared();
    let done = sqlx::query(
        "UPDATE conversations SET deleted_at = now(), version = version + 1
         WHERE id = $1 AND user_id = $2 AND deleted_at IS NULL",
    )
    .bind(id)
    .bind(user)
    .persistent(prepared)
    .execute(db.conn())
    .await?;
    if done.rows_affected() != 1 {
        return Ok(false);
    }
    // Its items count against the user's storage no more.
    sqlx::query(
        "UPDATE user_stored_bytes SET bytes = greatest(bytes - (
           SELECT coalesce(sum(octet_length(body::text) + coalesce(octet_length(prompt::text), 0)), 0)
             FROM items WHERE conversation_id = $1), 0)
         WHERE user_id = $2 AND stripe = turnpike_storage_stripe($1)",
    )
    .bind(id)
    .bind(user)
    .persistent(prepared)
    .execute(db.conn())
    .await?;
    Ok(true)
}
