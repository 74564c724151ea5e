//! Conversation items: list (keyset on seq, both orders), add (≤ 20 per
//! call), retrieve and delete. Also the append path shared with
//! conversation and response creation.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use turnpike_core::db::DbConn;
use turnpike_core::db::statement::{self, Arg};
use turnpike_protocol::item::{
    ContentPart, CreateItems, Extra, InputItem, Item, ItemContent, OPENAI_PART_TYPES, Role,
};
use turnpike_protocol::{Conversation, List, ids as prefixes};
use uuid::Uuid;

use crate::conversations;
use crate::error::ApiError;
use crate::extract::{Auth, Json, Query, ReadConsistency};
use crate::ids;
use crate::stored_json::{self, StoredJson};
use crate::{AppState, Path, written};

/// Most items one call may add.
pub const MAX_ITEMS_PER_CALL: usize = 20;

/// Most items in a response's `input`: a stateless client resends its whole
/// history each time, so this is bounded by the body size rather than by a
/// small count.
pub const MAX_INPUT_ITEMS: usize = 10_000;

pub fn router() -> Router<AppState> {
    Router::new()
        .route(
            "/v1/conversations/{conversation_id}/items",
            get(list).post(create),
        )
        .route(
            "/v1/conversations/{conversation_id}/items/{item_id}",
            get(retrieve).delete(delete),
        )
}

/// List order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Order {
    Asc,
    #[default]
    Desc,
}

/// `include` is no field: clients send it once, repeated or as `include[]`,
/// and every form is accepted and ignored (an unknown parameter is); the
/// path's `params` describe it.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ListParams {
    /// 1 to 100, default 20.
    pub limit: Option<i64>,
    /// An item id: the page starts after it, in the list's order.
    pub after: Option<String>,
    /// `asc` or `desc` (default).
    pub order: Option<Order>,
    /// `eventual`, `bounded`, `session` (default) or `strong`.
    // Read by `ReadConsistency`; named here for the API's description
    // only, and skipped unread.
    #[allow(dead_code)]
    #[param(value_type = Option<String>)]
    pub consistency: Option<serde::de::IgnoredAny>,
}

/// Validates `limit` (1–100, default 20).
pub fn page_limit(limit: Option<i64>) -> Result<i64, ApiError> {
    match limit {
        None => Ok(20),
        Some(n) if (1..=100).contains(&n) => Ok(n),
        Some(_) => Err(ApiError::invalid(
            "limit",
            "limit must be between 1 and 100.",
        )),
    }
}

/// List a conversation's items.
#[utoipa::path(get, path = "/v1/conversations/{conversation_id}/items", tag = "items",
    params(("conversation_id" = String, Path), ListParams, ("include" = Option<Vec<String>>, Query, description = "Accepted for compatibility and ignored.")),
    responses((status = 200, body = List<Item>), (status = 400, body = turnpike_protocol::ErrorBody),
        (status = 401, body = turnpike_protocol::ErrorBody), (status = 404, body = turnpike_protocol::ErrorBody),
        (status = 503, body = turnpike_protocol::ErrorBody)))]
pub async fn list(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(conversation_id): Path<String>,
    Query(params): Query<ListParams>,
    read: ReadConsistency,
) -> Result<Response, ApiError> {
    let conversation = ids::decode(prefixes::CONVERSATION, "conversation", &conversation_id)?;
    let limit = page_limit(params.limit)?;
    let after = params
        .after
        .as_deref()
        .map(ids::decode_item)
        .transpose()
        .map_err(|_| {
            ApiError::invalid(
                "after",
                "after must be the id of an item in this conversation.",
            )
        })?;
    let page = PageQuery {
        conversation,
        user: principal.user_id,
        after,
        order: params.order.unwrap_or_default(),
        limit,
    };
    let consistency = app.consistency(&principal, read).await;
    let field = page_field(&page);
    let router = std::sync::Arc::clone(&app.router);
    let max_bytes = app.settings.limits.max_page_bytes;
    let body = app
        .cached(conversation, &field, consistency, move |at| async move {
            let rows = router
                .read_one_message(at, move |db| {
                    Box::pin(async move { list_page(db, &page).await })
                })
                .await?;
            Ok(rows.map(|rows| bytes::Bytes::from(page_of(rows, limit, max_bytes).0)))
        })
        .await?;
    match body {
        Some(body) => Ok(stored_json::response(body)),
        None => Err(ApiError::not_found("conversation", &conversation_id)),
    }
}

/// A page's name in the cache: everything it depends on, the caller
/// included (the query checks ownership). Written without `fmt`, which
/// took a tenth of a cached read's own instructions.
fn page_field(page: &PageQuery) -> String {
    let mut field = String::with_capacity(96);
    field.push_str("items:");
    field.push_str(page.user.simple().encode_lower(&mut Uuid::encode_buffer()));
    field.push_str(match page.order {
        Order::Asc => ":Asc:",
        Order::Desc => ":Desc:",
    });
    match page.after {
        Some(after) => field.push_str(after.simple().encode_lower(&mut Uuid::encode_buffer())),
        None => field.push('-'),
    }
    field.push(':');
    field.push_str(itoa::Buffer::new().format(page.limit));
    field
}

/// Turns `limit + 1` rows into a page of at most `max_bytes` of items
/// (always at least one; `limits.max_page_bytes`).
pub fn page_of(mut rows: Vec<ItemRow>, limit: i64, max_bytes: usize) -> StoredJson {
    let mut has_more = i64::try_from(rows.len()).unwrap_or(i64::MAX) > limit;
    rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    let mut bytes = 0usize;
    if let Some(fit) = rows.iter().position(|row| {
        bytes += row.body.0.len();
        bytes > max_bytes
    }) {
        rows.truncate(fit.max(1));
        has_more = true;
    }
    let id = |row: &ItemRow| ids::encode(ids::item_prefix(&row.kind), row.id);
    let first = rows.first().map(id);
    let last = rows.last().map(id);
    let bodies: Vec<StoredJson> = rows.into_iter().map(|r| r.body).collect();
    stored_json::list(&bodies, first.as_deref(), last.as_deref(), has_more)
}

/// Add items to a conversation.
#[utoipa::path(post, path = "/v1/conversations/{conversation_id}/items", tag = "items",
    params(("conversation_id" = String, Path)), request_body = CreateItems,
    responses((status = 200, body = List<Item>), (status = 400, body = turnpike_protocol::ErrorBody),
        (status = 401, body = turnpike_protocol::ErrorBody), (status = 404, body = turnpike_protocol::ErrorBody),
        (status = 413, body = turnpike_protocol::ErrorBody), (status = 503, body = turnpike_protocol::ErrorBody)))]
pub async fn create(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(conversation_id): Path<String>,
    Json(body): Json<CreateItems>,
) -> Result<Response, ApiError> {
    let conversation = ids::decode(prefixes::CONVERSATION, "conversation", &conversation_id)?;
    let bytes = check_items(
        "items",
        &body.items,
        1,
        MAX_ITEMS_PER_CALL,
        app.settings.limits.max_item_bytes,
    )?;
    let mut tx = app.router.write().await?;
    crate::limits::check_storage(&app, &mut tx, principal.user_id, bytes).await?;
    let Some(first_seq) =
        reserve_seqs(&mut tx, conversation, principal.user_id, body.items.len()).await?
    else {
        return Err(ApiError::not_found("conversation", &conversation_id));
    };
    let resolved = resolve_references(&mut tx, principal.user_id, "items", &body.items).await?;
    let inputs = resolved.as_deref().unwrap_or(&body.items);
    let items = append(&mut tx, conversation, first_seq, inputs, None).await?;
    let lsn = app.commit_and_record(&principal, conversation, tx).await?;
    let list = List::new(items, false, |i: &Item| i.id().to_owned());
    Ok(written(lsn, StatusCode::OK, &list))
}

/// Retrieve one item.
#[utoipa::path(get, path = "/v1/conversations/{conversation_id}/items/{item_id}", tag = "items",
    params(("conversation_id" = String, Path), ("item_id" = String, Path)),
    responses((status = 200, body = Item), (status = 401, body = turnpike_protocol::ErrorBody),
        (status = 404, body = turnpike_protocol::ErrorBody), (status = 503, body = turnpike_protocol::ErrorBody)))]
pub async fn retrieve(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path((conversation_id, item_id)): Path<(String, String)>,
    read: ReadConsistency,
) -> Result<Response, ApiError> {
    let conversation = ids::decode(prefixes::CONVERSATION, "conversation", &conversation_id)?;
    let item = ids::decode_item(&item_id)?;
    let user = principal.user_id;
    let consistency = app.consistency(&principal, read).await;
    let body = app
        .router
        .read_one_message(consistency, move |db| {
            Box::pin(async move { find_item(db, conversation, user, item).await })
        })
        .await?;
    match body {
        Some(body) => Ok(body.into_response()),
        None => Err(ApiError::not_found("item", &item_id)),
    }
}

/// Delete an item; returns the conversation.
#[utoipa::path(delete, path = "/v1/conversations/{conversation_id}/items/{item_id}", tag = "items",
    params(("conversation_id" = String, Path), ("item_id" = String, Path)),
    responses((status = 200, body = Conversation), (status = 401, body = turnpike_protocol::ErrorBody),
        (status = 404, body = turnpike_protocol::ErrorBody), (status = 503, body = turnpike_protocol::ErrorBody)))]
pub async fn delete(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path((conversation_id, item_id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let conversation = ids::decode(prefixes::CONVERSATION, "conversation", &conversation_id)?;
    let item = ids::decode_item(&item_id)?;
    let mut tx = app.router.write().await?;
    let Some(row) = conversations::touch(&mut tx, conversation, principal.user_id).await? else {
        return Err(ApiError::not_found("conversation", &conversation_id));
    };
    if !delete_item(&mut tx, conversation, item).await? {
        return Err(ApiError::not_found("item", &item_id));
    }
    let lsn = app.commit_and_record(&principal, conversation, tx).await?;
    Ok(written(lsn, StatusCode::OK, &row.into_api()))
}

/// Checks an item batch: `min..=max` items, each with sensible content
/// and OpenAI's part kinds only.
/// Checks a request's items: how many, each one's size (at most
/// `max_bytes` as JSON), their content parts. Answers their total size,
/// for the storage quota.
pub fn check_items(
    param: &str,
    items: &[InputItem],
    min: usize,
    max: usize,
    max_bytes: usize,
) -> Result<usize, ApiError> {
    if items.len() < min {
        return Err(ApiError::invalid(
            param,
            format!("{param} must hold at least {min} item."),
        ));
    }
    if items.len() > max {
        return Err(ApiError::invalid(
            param,
            format!("{param} may hold at most {max} items; got {}.", items.len()),
        ));
    }
    let mut total = 0;
    for (i, item) in items.iter().enumerate() {
        let size = serde_json::to_vec(item).map_or(0, |json| json.len());
        total += size;
        if size > max_bytes {
            return Err(ApiError::with_status(
                axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                format!("{param}[{i}] is {size} bytes; an item may be at most {max_bytes} bytes."),
                "item_too_large",
            )
            .with_param(format!("{param}[{i}]")));
        }
        match item {
            InputItem::Message {
                content: ItemContent::Parts(parts),
                ..
            } if parts.is_empty() => {
                return Err(ApiError::invalid(
                    format!("{param}[{i}].content"),
                    "content must not be an empty list.",
                ));
            }
            InputItem::FunctionCall { call_id, name, .. }
                if call_id.is_empty() || name.is_empty() =>
            {
                return Err(ApiError::invalid(
                    format!("{param}[{i}]"),
                    "a function_call needs a call_id and a name.",
                ));
            }
            InputItem::FunctionCallOutput { call_id, .. } if call_id.is_empty() => {
                return Err(ApiError::invalid(
                    format!("{param}[{i}].call_id"),
                    "a function_call_output needs the call_id it answers.",
                ));
            }
            InputItem::Message {
                content: ItemContent::Parts(parts),
                ..
            } => {
                for (j, part) in parts.iter().enumerate() {
                    if let ContentPart::InputImage {
                        image_url, file_id, ..
                    } = part
                    {
                        check_image(&format!("{param}[{i}].content[{j}]"), image_url, file_id)?;
                    }
                    if let ContentPart::Other(fields) = part
                        && !OPENAI_PART_TYPES.contains(&part.kind())
                    {
                        let kind = fields
                            .get("type")
                            .map_or_else(String::new, |t| t.to_string());
                        return Err(ApiError::invalid(
                            format!("{param}[{i}].content[{j}].type"),
                            format!(
                                "unsupported content part type {kind}; supported: input_text, output_text, input_image, refusal, {}.",
                                OPENAI_PART_TYPES.join(", ")
                            ),
                        ));
                    }
                }
            }
            _ => {}
        }
    }
    Ok(total)
}

/// An image part names its image: by an http(s) or `data:` URL, or by a
/// file id. Anything else would reach the provider and fail the turn.
fn check_image(
    param: &str,
    image_url: &Option<String>,
    file_id: &Option<String>,
) -> Result<(), ApiError> {
    match (image_url.as_deref(), file_id.as_deref()) {
        (Some(url), _) => {
            let lower = url.get(..8).unwrap_or(url).to_ascii_lowercase();
            if lower.starts_with("https://")
                || lower.starts_with("http://")
                || lower.starts_with("data:")
            {
                Ok(())
            } else {
                Err(ApiError::invalid(
                    format!("{param}.image_url"),
                    "image_url must be an http(s) URL or a data: URL.",
                ))
            }
        }
        (None, Some(id)) if !id.is_empty() => Ok(()),
        _ => Err(ApiError::invalid(
            param,
            "an input_image needs an image_url or a file_id.",
        )),
    }
}

/// The id an `item_reference` input names, if it is one.
fn reference_of(item: &InputItem) -> Option<&str> {
    match item {
        InputItem::Other(fields)
            if fields.get("type").and_then(serde_json::Value::as_str) == Some("item_reference") =>
        {
            fields.get("id").and_then(serde_json::Value::as_str)
        }
        _ => None,
    }
}

/// `item_reference` inputs replaced by the items they name, as stored (in
/// the provider's own form when the model wrote them), so a client that
/// replays its history by reference sends the model what it saw. `None`
/// when there is none. Only the caller's items are found; primary, in the
/// caller's transaction.
pub async fn resolve_references(
    db: &mut impl DbConn,
    user: Uuid,
    param: &str,
    inputs: &[InputItem],
) -> Result<Option<Vec<InputItem>>, ApiError> {
    let named: Vec<(usize, &str)> = inputs
        .iter()
        .enumerate()
        .filter_map(|(i, item)| reference_of(item).map(|id| (i, id)))
        .collect();
    if named.is_empty() {
        return Ok(None);
    }
    let missing =
        |i: usize, id: &str| ApiError::not_found("item", id).with_param(format!("{param}[{i}].id"));
    let mut uuids = Vec::with_capacity(named.len());
    for (i, id) in &named {
        uuids.push(turnpike_core::ids::parse_item(id).ok_or_else(|| missing(*i, id))?);
    }
    type Row = (
        Uuid,
        sqlx::types::Json<serde_json::Value>,
        Option<sqlx::types::Json<Vec<serde_json::Value>>>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT DISTINCT ON (i.id) i.id, i.body, i.prompt
           FROM items i JOIN conversations c ON c.id = i.conversation_id
          WHERE i.id = ANY($1) AND c.user_id = $2 AND c.deleted_at IS NULL",
    )
    .bind(&uuids)
    .bind(user)
    .persistent(db.prepared())
    .fetch_all(db.conn())
    .await?;
    let found: std::collections::HashMap<Uuid, serde_json::Value> = rows
        .into_iter()
        .map(|(id, body, prompt)| {
            let value = match prompt.map(|p| p.0) {
                Some(mut raw) if raw.len() == 1 => raw.remove(0),
                _ => body.0,
            };
            (id, value)
        })
        .collect();
    let mut resolved = inputs.to_vec();
    for ((i, id), uuid) in named.into_iter().zip(uuids) {
        let value = found.get(&uuid).ok_or_else(|| missing(i, id))?;
        resolved[i] = serde_json::from_value(value.clone()).map_err(|e| ApiError::internal(&e))?;
    }
    Ok(Some(resolved))
}

/// The stored form of an input item, with its new id.
pub fn to_item(input: &InputItem, id: Uuid) -> Item {
    let status = "completed".to_owned();
    match input {
        InputItem::Message { role, content } => Item::Message {
            id: ids::encode(prefixes::MESSAGE, id),
            status,
            role: *role,
            content: match content {
                ItemContent::Text(text) if *role == Role::Assistant => {
                    vec![ContentPart::output_text(text.clone())]
                }
                ItemContent::Text(text) => vec![ContentPart::InputText { text: text.clone() }],
                ItemContent::Parts(parts) => parts.clone(),
            },
            extra: Extra::new(),
        },
        InputItem::FunctionCall {
            call_id,
            name,
            arguments,
        } => Item::FunctionCall {
            id: ids::encode(prefixes::FUNCTION_CALL, id),
            status,
            call_id: call_id.clone(),
            name: name.clone(),
            arguments: arguments.clone(),
            extra: Extra::new(),
        },
        InputItem::FunctionCallOutput { call_id, output } => Item::FunctionCallOutput {
            id: ids::encode(prefixes::FUNCTION_CALL_OUTPUT, id),
            status,
            call_id: call_id.clone(),
            output: output.clone(),
        },
        // Kept as sent, under Turnpike's id: it goes back to the provider
        // as it came (ids are not sent), and out to clients likewise.
        InputItem::Other(fields) => {
            let mut fields = fields.clone();
            let kind = fields
                .get("type")
                .and_then(serde_json::Value::as_str)
                .unwrap_or("")
                .to_owned();
            fields.insert(
                "id".into(),
                serde_json::Value::String(ids::encode(ids::item_prefix(&kind), id)),
            );
            let value = serde_json::Value::Object(
                fields.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            );
            serde_json::from_value(value).unwrap_or(Item::Other(fields))
        }
    }
}

pub use turnpike_core::turns::reserve_seqs;

/// Stores input items at `first_seq..`, returning them as stored. Primary
/// only, in the caller's transaction.
pub async fn append(
    db: &mut impl DbConn,
    conversation: Uuid,
    first_seq: i64,
    inputs: &[InputItem],
    response: Option<Uuid>,
) -> Result<Vec<Item>, sqlx::Error> {
    let items: Vec<Item> = inputs
        .iter()
        .map(|input| to_item(input, Uuid::now_v7()))
        .collect();
    turnpike_core::turns::insert_items(db, conversation, first_seq, &items, response).await?;
    Ok(items)
}

/// One row of an item page; all NULL for the filler row of a conversation
/// with no items in range.
#[derive(sqlx::FromRow)]
struct PageRow {
    id: Option<Uuid>,
    kind: Option<String>,
    body: Option<StoredJson>,
}

turnpike_core::statement_row!(PageRow { id, kind, body });

pub struct ItemRow {
    pub id: Uuid,
    pub kind: String,
    pub body: StoredJson,
}

#[derive(Debug, Clone, Copy)]
pub struct PageQuery {
    pub conversation: Uuid,
    pub user: Uuid,
    pub after: Option<Uuid>,
    pub order: Order,
    pub limit: i64,
}

/// The conversation check and the page in one round trip: no row means no
/// such conversation for this user; one row of NULLs means no items.
const PAGE_ASC: &str = "SELECT i.id, i.kind, i.body FROM conversations c
LEFT JOIN LATERAL (SELECT id, kind, body FROM items WHERE conversation_id = c.id
  ORDER BY seq ASC LIMIT $3) i ON true
WHERE c.id = $1 AND c.user_id = $2 AND c.deleted_at IS NULL";
const PAGE_DESC: &str = "SELECT i.id, i.kind, i.body FROM conversations c
LEFT JOIN LATERAL (SELECT id, kind, body FROM items WHERE conversation_id = c.id
  ORDER BY seq DESC LIMIT $3) i ON true
WHERE c.id = $1 AND c.user_id = $2 AND c.deleted_at IS NULL";
const PAGE_ASC_AFTER: &str = "SELECT i.id, i.kind, i.body FROM conversations c
LEFT JOIN LATERAL (SELECT id, kind, body FROM items WHERE conversation_id = c.id
  AND seq > (SELECT seq FROM items WHERE conversation_id = $1 AND id = $4)
  ORDER BY seq ASC LIMIT $3) i ON true
WHERE c.id = $1 AND c.user_id = $2 AND c.deleted_at IS NULL";
const PAGE_DESC_AFTER: &str = "SELECT i.id, i.kind, i.body FROM conversations c
LEFT JOIN LATERAL (SELECT id, kind, body FROM items WHERE conversation_id = c.id
  AND seq < (SELECT seq FROM items WHERE conversation_id = $1 AND id = $4)
  ORDER BY seq DESC LIMIT $3) i ON true
WHERE c.id = $1 AND c.user_id = $2 AND c.deleted_at IS NULL";

/// A page of items (`limit + 1` rows, to tell whether there are more), or
/// `None` when the user has no such conversation. Replica or primary.
#[tracing::instrument(level = "debug", skip(db))]
pub async fn list_page(
    db: &mut impl DbConn,
    page: &PageQuery,
) -> Result<Option<Vec<ItemRow>>, sqlx::Error> {
    let sql = match (page.order, page.after.is_some()) {
        (Order::Asc, false) => PAGE_ASC,
        (Order::Desc, false) => PAGE_DESC,
        (Order::Asc, true) => PAGE_ASC_AFTER,
        (Order::Desc, true) => PAGE_DESC_AFTER,
    };
    let mut args = vec![
        Arg::from(page.conversation),
        Arg::from(page.user),
        Arg::from(page.limit + 1),
    ];
    if let Some(after) = page.after {
        args.push(Arg::from(after));
    }
    let rows: Vec<PageRow> = statement::fetch_all(db, sql, &args).await?;
    if rows.is_empty() {
        return Ok(None);
    }
    Ok(Some(
        rows.into_iter()
            .filter_map(|r| {
                Some(ItemRow {
                    id: r.id?,
                    kind: r.kind?,
                    body: r.body?,
                })
            })
            .collect(),
    ))
}

/// One item of a conversation the user owns. Replica or primary.
#[tracing::instrument(level = "debug", skip(db))]
async fn find_item(
    db: &mut impl DbConn,
    conversation: Uuid,
    user: Uuid,
    item: Uuid,
) -> Result<Option<StoredJson>, sqlx::Error> {
    let row: Option<(StoredJson,)> = statement::fetch_optional(
        db,
        "SELECT i.body FROM conversations c JOIN items i ON i.conversation_id = c.id AND i.id = $3
         WHERE c.id = $1 AND c.user_id = $2 AND c.deleted_at IS NULL",
        &[Arg::from(conversation), Arg::from(user), Arg::from(item)],
    )
    .await?;
    Ok(row.map(|(body,)| body))
}

/// Deletes one item; the caller has checked ownership. Primary only.
#[tracing::instrument(level = "debug", skip(db))]
async fn delete_item(
    db: &mut impl DbConn,
    conversation: Uuid,
    item: Uuid,
) -> Result<bool, sqlx::Error> {
    let prepared = db.prepared();
    let done = sqlx::query("DELETE FROM items WHERE conversation_id = $1 AND id = $2")
        .bind(conversation)
        .bind(item)
        .persistent(prepared)
        .execute(db.conn())
        .await?;
    Ok(done.rows_affected() == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pages_cache_field_names_everything_it_depends_on() {
        let user = Uuid::now_v7();
        let after = Uuid::now_v7();
        let page = |order, after, limit| PageQuery {
            conversation: Uuid::now_v7(),
            user,
            after,
            order,
            limit,
        };
        // The form every api release has written, so that L2 entries are
        // shared across a rolling update.
        assert_eq!(
            page_field(&page(Order::Desc, None, 20)),
            format!("items:{}:Desc:-:20", user.simple())
        );
        assert_eq!(
            page_field(&page(Order::Asc, Some(after), 100)),
            format!("items:{}:Asc:{}:100", user.simple(), after.simple())
        );
    }
}
