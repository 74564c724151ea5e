//! Responses (turns): create one in a conversation (its input items and a
//! `queued` response in one transaction on the primary), retrieve it, list
//! its input items, cancel it.

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response as HttpResponse};
use axum::routing::{get, post};
use serde::Deserialize;
use turnpike_core::db::DbConn;
use turnpike_core::db::statement::{self, Arg};
use turnpike_protocol::item::{InputItem, Item, ItemContent, Role};
use turnpike_protocol::response::{
    CompactRequest, CompactedResponse, CreateResponse, Multitask, Response, ResponseInput,
};
use turnpike_protocol::{List, Metadata, ids as prefixes};
use uuid::Uuid;

use turnpike_core::turns::{self, COLUMNS, ResponseRow, StoredRequest, find};

use std::time::Duration;

use turnpike_core::db::Consistency;
use turnpike_core::queue;

use crate::conversations::{self, check_metadata};
use crate::error::ApiError;
use crate::events;
use crate::extract::{Auth, Json, Query, ReadConsistency};
use crate::items::{self, ItemRow, Order, page_limit};
use crate::stored_json::StoredJson;
use crate::{AppState, Path, ids, written};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/responses", post(create))
        .route("/v1/responses/input_tokens", post(input_tokens))
        .route("/v1/responses/compact", post(compact))
        .route("/v1/responses/{response_id}", get(retrieve).delete(delete))
        .route("/v1/responses/{response_id}/input_items", get(input_items))
        .route("/v1/responses/{response_id}/cancel", post(cancel))
}

/// Create a response (a turn) in a conversation.
#[utoipa::path(post, path = "/v1/responses", tag = "responses", request_body = CreateResponse,
    responses((status = 200, description = "the response; with `stream: true` its events (SSE, one JSON event per `data:` line)",
            content((Response = "application/json"), (crate::events::SseEvent = "text/event-stream"))),
        (status = 400, body = turnpike_protocol::ErrorBody),
        (status = 401, body = turnpike_protocol::ErrorBody), (status = 404, body = turnpike_protocol::ErrorBody),
        (status = 409, body = turnpike_protocol::ErrorBody), (status = 413, body = turnpike_protocol::ErrorBody),
        (status = 422, body = turnpike_protocol::ErrorBody), (status = 503, body = turnpike_protocol::ErrorBody)))]
pub async fn create(
    State(app): State<AppState>,
    Auth(principal): Auth,
    created: Option<axum::Extension<crate::idempotency::CreatedResponse>>,
    Json(body): Json<CreateResponse>,
) -> Result<HttpResponse, ApiError> {
    // Taken before the turn exists: a refused stream creates nothing.
    let slot = (body.stream == Some(true))
        .then(|| crate::limits::open_stream(&app, principal.user_id))
        .transpose()?;
    let started = start(&app, &principal, &body).await?;
    let (row, lsn) = (started.row, started.lsn);
    // A retry with the same Idempotency-Key attaches to this response.
    if let Some(axum::Extension(created)) = &created {
        created.set(&row.public_id());
    }
    if let Some(slot) = slot {
        let mut response = events::stream(&app, row, None, slot);
        if let Ok(value) = axum::http::HeaderValue::from_str(&lsn.to_string()) {
            response
                .headers_mut()
                .insert(crate::extract::CONSISTENCY_HEADER, value);
        }
        return Ok(response);
    }
    if started.waiting.is_some() {
        let done = wait(&app, &row).await;
        return Ok(written(lsn, StatusCode::OK, &done));
    }
    Ok(written(lsn, StatusCode::OK, &row.to_api()))
}

/// A turn created and queued.
pub(crate) struct Started {
    pub row: ResponseRow,
    /// The consistency token of the create.
    pub lsn: turnpike_core::db::Lsn,
    /// Held from before the turn could start when the caller will wait for
    /// its end, so a fast turn's end is not missed.
    pub waiting: Option<turnpike_core::events::Subscription>,
}

/// Waits for a turn's end (up to `api.response_wait_ms`) and returns the
/// response as it then is.
pub(crate) async fn wait(app: &AppState, row: &ResponseRow) -> serde_json::Value {
    let public = row.public_id();
    let timeout = Duration::from_millis(app.settings.api.response_wait_ms);
    if let Some(done) = events::wait_for_end(app, &public, timeout).await {
        return done;
    }
    let (id, user) = (row.id, row.user_id);
    let current = app
        .router
        .read_one_message(Consistency::Strong, move |db| {
            Box::pin(async move { find(db, id, user).await })
        })
        .await;
    let api = match current {
        Ok(Some(current)) => current.to_api(),
        _ => row.to_api(),
    };
    serde_json::to_value(api).unwrap_or_default()
}

/// Checks a create request, stores the turn (its input items and a
/// `queued` response, in one transaction on the primary) and queues it:
/// what `POST /v1/responses` and the Chat Completions front door share.
pub(crate) async fn start(
    app: &AppState,
    principal: &turnpike_core::auth::Principal,
    body: &CreateResponse,
) -> Result<Started, ApiError> {
    begin(app, principal, body, false).await
}

/// `start`, for a turn (`compact: false`) or a compaction (`compact: true`:
/// unstored, in a conversation of its own, forked at `previous_response_id`
/// when given, its input optional then).
async fn begin(
    app: &AppState,
    principal: &turnpike_core::auth::Principal,
    body: &CreateResponse,
    compact: bool,
) -> Result<Started, ApiError> {
    if body.previous_response_id.is_some() && body.conversation.is_some() {
        return Err(ApiError::invalid(
            "previous_response_id",
            "pass either conversation or previous_response_id, not both.",
        ));
    }
    let store = body.store.unwrap_or(true);
    if !store && !compact && (body.conversation.is_some() || body.previous_response_id.is_some()) {
        return Err(ApiError::invalid(
            "store",
            "store: false keeps nothing after the response, so it cannot add to a conversation; leave out conversation and previous_response_id, or store the response.",
        ));
    }
    let inputs = items_of_input(body.input.clone());
    let least = usize::from(!(compact && body.previous_response_id.is_some()));
    let input_bytes = items::check_items(
        "input",
        &inputs,
        least,
        items::MAX_INPUT_ITEMS,
        app.settings.limits.max_item_bytes,
    )?;
    let metadata = body.metadata.clone().unwrap_or_default();
    check_metadata(&metadata)?;
    if let Some(tools) = &body.tools {
        check_tools(tools, &app.settings.tools, app.settings.model.provider)?;
    }
    if let Some(entries) = &body.context_management {
        check_context_management(entries)?;
    }
    check_passed_through(body.reasoning.as_ref(), body.text.as_ref())?;
    check_sampling(body.temperature, body.top_p)?;
    check_choices(body, &app.settings.tools)?;
    let provider_params = provider_params(body)?;
    let mut model = body
        .model
        .clone()
        .unwrap_or_else(|| app.settings.api.default_model.clone());
    let background = body.background.unwrap_or(false);
    // Whether the caller waits for the turn's end (neither streamed nor in
    // the background).
    let wait = body.stream != Some(true) && !background;
    let mut stored = StoredRequest {
        instructions: body.instructions.clone(),
        tools: body.tools.clone().unwrap_or_default(),
        tool_choice: body.tool_choice.clone(),
        metadata,
        parallel_tool_calls: body.parallel_tool_calls,
        max_output_tokens: body.max_output_tokens,
        temperature: body.temperature,
        top_p: body.top_p,
        store: body.store,
        truncation: body.truncation.clone(),
        context_management: body.context_management.clone(),
        reasoning: body.reasoning.clone(),
        text: body.text.clone(),
        previous_response_id: body.previous_response_id.clone(),
        max_tool_calls: body.max_tool_calls,
        prompt_cache_key: body.prompt_cache_key.clone(),
        include_obfuscation: body
            .stream_options
            .as_ref()
            .and_then(|o| o.get("include_obfuscation"))
            .and_then(serde_json::Value::as_bool),
        provider_params,
        compact,
    };

    let mut tx = app.router.write().await?;
    let resolved = items::resolve_references(&mut tx, principal.user_id, "input", &inputs).await?;
    let inputs = resolved.unwrap_or(inputs);
    if body.conversation.is_none() && body.previous_response_id.is_none() {
        check_outputs_answer_calls(&inputs)?;
    }
    // The common path in one call, sent with the commit; off it (not found,
    // busy and rejecting, a fork, near a limit) nothing was written, and the
    // turn is created statement by statement below.
    if let Some(placement) = placement(app, body, compact) {
        let items: Vec<Item> = inputs
            .iter()
            .map(|input| items::to_item(input, Uuid::now_v7()))
            .collect();
        let (task_app, caller) = (app.clone(), *principal);
        let incoming = i64::try_from(input_bytes).unwrap_or(i64::MAX);
        // The call carries the commit: it and what follows run past the
        // caller's cancellation. Off the common path, the request and the
        // model come back for the statement-by-statement path below.
        let created = crate::past_the_commit(async move {
            let turn = turns::NewTurn {
                user: caller.user_id,
                placement,
                response: Uuid::now_v7(),
                model: &model,
                background,
                request: &stored,
                items: &items,
                incoming,
            };
            Ok::<_, turnpike_core::db::DbError>(match turns::create(tx, &turn).await? {
                Some((row, lsn)) => {
                    let dispatch_now = row.pending_input.is_none();
                    let started =
                        queued(&task_app, &caller, wait, row, lsn, Vec::new(), dispatch_now).await;
                    Ok(started)
                }
                None => Err((stored, model)),
            })
        })
        .await?;
        match created {
            Ok(started) => return Ok(started),
            Err(returned) => (stored, model) = returned,
        }
        tx = app.router.write().await?;
    }
    // A turn that starts a conversation creates it holding its input's
    // sequence numbers: nobody else can see it yet, so there is no active
    // turn to look for and no sequence to reserve (two round trips fewer
    // on the primary, on the path to the first token).
    let (conversation, fresh) = match (&body.conversation, &body.previous_response_id) {
        (None, Some(previous)) => (
            continue_from(&mut tx, principal.user_id, previous, compact).await?,
            false,
        ),
        (Some(reference), _) => {
            let id = ids::decode(prefixes::CONVERSATION, "conversation", reference.id())?;
            // Locks the conversation and checks that it is the caller's.
            items::reserve_seqs(&mut tx, id, principal.user_id, 0)
                .await?
                .ok_or_else(|| ApiError::not_found("conversation", reference.id()))?;
            (id, false)
        }
        (None, None) => {
            let created =
                conversations::insert(&mut tx, principal.user_id, &Metadata::new(), inputs.len())
                    .await?;
            (created.id, true)
        }
    };
    let mut interrupted = Vec::new();
    let dispatch_now = match body.multitask.unwrap_or_default() {
        _ if fresh => true,
        Multitask::Enqueue => !turns::has_active_turn(&mut tx, conversation).await?,
        Multitask::Reject => {
            if turns::has_active_turn(&mut tx, conversation).await? {
                return Err(ApiError::conflict(
                    "The conversation already has an active response (multitask: reject).",
                    "conversation_busy",
                ));
            }
            true
        }
        Multitask::Interrupt => {
            interrupted = turns::cancel_active(&mut tx, conversation).await?;
            true
        }
    };
    // Counted after an interrupt has cancelled the turn it replaces.
    crate::limits::check_new_turn(app, &mut tx, principal.user_id, input_bytes).await?;
    let id = Uuid::now_v7();
    // A turn that runs now appends its input at once; one waiting behind the
    // active turn keeps it pending, so it lands after that turn's output.
    let (input_seqs, pending) = if dispatch_now {
        let first = if fresh {
            1
        } else {
            items::reserve_seqs(&mut tx, conversation, principal.user_id, inputs.len())
                .await?
                .ok_or_else(|| {
                    ApiError::not_found(
                        "conversation",
                        &ids::encode(prefixes::CONVERSATION, conversation),
                    )
                })?
        };
        items::append(&mut tx, conversation, first, &inputs, Some(id)).await?;
        (
            (first, first + i64::try_from(inputs.len()).unwrap_or(0) - 1),
            None,
        )
    } else {
        let pending: Vec<Item> = inputs
            .iter()
            .map(|i| items::to_item(i, Uuid::now_v7()))
            .collect();
        ((0, -1), Some(pending))
    };
    let row = insert(
        &mut tx,
        &NewResponse {
            id,
            conversation,
            user: principal.user_id,
            model: &model,
            background,
            request: &stored,
            input_seqs,
            pending: pending.as_deref(),
        },
    )
    .await?;
    let (app, principal) = (app.clone(), *principal);
    crate::past_the_commit(async move {
        let lsn = tx.commit().await?;
        Ok(queued(&app, &principal, wait, row, lsn, interrupted, dispatch_now).await)
    })
    .await
}

/// Where the turn goes, when the request can take the path
/// `turnpike_create_turn` takes in one call: not an interrupt, not a
/// compaction forked from a response, and limits with headroom.
fn placement(app: &AppState, body: &CreateResponse, compact: bool) -> Option<turns::Placement> {
    let multitask = body.multitask.unwrap_or_default();
    if matches!(multitask, Multitask::Interrupt) {
        return None;
    }
    let (active_below, storage_cap) = crate::limits::clear_bounds(app)?;
    // An id that does not parse is answered below, as any other miss.
    let parse = |prefix, id| turnpike_core::ids::parse(prefix, id);
    let destination = match (&body.conversation, &body.previous_response_id) {
        (Some(reference), _) => match parse(prefixes::CONVERSATION, reference.id()) {
            Some(id) => turns::Destination::Conversation(id),
            None => return None,
        },
        (None, Some(_)) if compact => return None,
        (None, Some(previous)) => match parse(prefixes::RESPONSE, previous) {
            Some(id) => turns::Destination::After(id),
            None => return None,
        },
        (None, None) => turns::Destination::New(Uuid::now_v7()),
    };
    Some(turns::Placement {
        destination,
        reject_busy: matches!(multitask, Multitask::Reject),
        active_below,
        storage_cap,
    })
}

/// After a turn's commit: the caller's session window and the
/// conversation's caches learn of it while the turns it interrupted are
/// told to stop and it is queued (when it runs now; a turn behind an active
/// one is dispatched by the worker that finishes that one).
async fn queued(
    app: &AppState,
    principal: &turnpike_core::auth::Principal,
    wait: bool,
    row: ResponseRow,
    lsn: turnpike_core::db::Lsn,
    interrupted: Vec<(Uuid, String)>,
    dispatch_now: bool,
) -> Started {
    let public = row.public_id();
    let dispatch = async {
        // Subscribe before the turn can start, so a fast turn's end is not missed.
        let waiting = if wait {
            Some(app.hub.subscribe(&public).await)
        } else {
            None
        };
        for (id, previous) in interrupted {
            announce_cancel(app, &ids::encode(prefixes::RESPONSE, id), &previous).await;
        }
        if dispatch_now {
            use tracing::Instrument;
            let span = tracing::info_span!("enqueue", response = %public);
            let input = queue::Input {
                conversation: row.conversation_id,
                last_seq: row.input_last_seq,
                user: row.user_id,
            };
            let queue = &app.settings.worker.queue;
            let enqueued = queue::enqueue_with_input(&app.kv, queue, &public, lsn, input)
                .instrument(span)
                .await;
            if let Err(e) = enqueued {
                tracing::warn!(error = %e, response = %public, "could not enqueue a turn; the reconciler will");
            }
        }
        waiting
    };
    let ((), waiting) = tokio::join!(app.wrote_to(principal, row.conversation_id, lsn), dispatch);
    Started { row, lsn, waiting }
}

/// A request's `input` as items: a plain string is one user message.
fn items_of_input(input: Option<ResponseInput>) -> Vec<InputItem> {
    match input {
        Some(ResponseInput::Text(text)) => vec![InputItem::Message {
            role: Role::User,
            content: ItemContent::Text(text),
        }],
        Some(ResponseInput::Items(items)) => items,
        None => Vec::new(),
    }
}

/// The conversation a `previous_response_id` continues: the response's own
/// when it is that conversation's latest turn (and `fork` is false),
/// otherwise a new conversation holding the items up to and including that
/// response's output. Locks the conversation it answers. Primary only.
async fn continue_from(
    tx: &mut impl DbConn,
    user: Uuid,
    previous: &str,
    fork: bool,
) -> Result<Uuid, ApiError> {
    let not_found = || ApiError::not_found("response", previous).with_param("previous_response_id");
    let id = turnpike_core::ids::parse(prefixes::RESPONSE, previous).ok_or_else(not_found)?;
    let row = find(tx, id, user).await?.ok_or_else(not_found)?;
    items::reserve_seqs(tx, row.conversation_id, user, 0)
        .await?
        .ok_or_else(not_found)?;
    if !fork && !turns::has_later_turn(tx, row.conversation_id, id).await? {
        return Ok(row.conversation_id);
    }
    Ok(turns::fork_after(tx, row.conversation_id, id).await?)
}

/// Provider parameters the client set, checked and kept as given; they go
/// to the provider with every model call of the turn and are echoed back.
fn provider_params(
    body: &CreateResponse,
) -> Result<serde_json::Map<String, serde_json::Value>, ApiError> {
    use serde_json::Value;
    const TIERS: [&str; 5] = ["auto", "default", "flex", "scale", "priority"];
    const RETENTIONS: [&str; 2] = ["in_memory", "24h"];
    if let Some(tier) = &body.service_tier
        && !TIERS.contains(&tier.as_str())
    {
        return Err(ApiError::invalid(
            "service_tier",
            format!("service_tier must be one of {}.", TIERS.join(", ")),
        ));
    }
    if let Some(retention) = &body.prompt_cache_retention
        && !RETENTIONS.contains(&retention.as_str())
    {
        return Err(ApiError::invalid(
            "prompt_cache_retention",
            "prompt_cache_retention must be in_memory or 24h.",
        ));
    }
    if body.top_logprobs.is_some_and(|n| n > 20) {
        return Err(ApiError::invalid(
            "top_logprobs",
            "top_logprobs must be between 0 and 20.",
        ));
    }
    if let Some(metadata) = &body.client_metadata
        && !metadata.as_object().is_some_and(|m| {
            m.len() <= 64
                && m.values()
                    .all(|v| v.as_str().is_some_and(|s| s.len() <= 4096))
        })
    {
        return Err(ApiError::invalid(
            "client_metadata",
            "client_metadata must be an object of at most 64 string values.",
        ));
    }
    for (name, value) in [
        ("prompt_cache_options", &body.prompt_cache_options),
        ("prompt", &body.prompt),
        ("moderation", &body.moderation),
        ("image", &body.image),
        ("access_programs", &body.access_programs),
        ("background_options", &body.background_options),
        ("stream_options", &body.stream_options),
    ] {
        if value.as_ref().is_some_and(|v| !v.is_object()) {
            return Err(ApiError::invalid(
                name,
                format!("{name} must be an object."),
            ));
        }
    }
    let mut params = serde_json::Map::new();
    let strings = [
        ("service_tier", &body.service_tier),
        ("prompt_cache_retention", &body.prompt_cache_retention),
        ("safety_identifier", &body.safety_identifier),
        ("user", &body.user),
    ];
    for (name, value) in strings {
        if let Some(value) = value {
            params.insert(name.into(), Value::String(value.clone()));
        }
    }
    if let Some(n) = body.top_logprobs {
        params.insert("top_logprobs".into(), Value::from(n));
    }
    for (name, value) in [
        ("prompt_cache_options", &body.prompt_cache_options),
        ("client_metadata", &body.client_metadata),
        ("prompt", &body.prompt),
        ("moderation", &body.moderation),
        ("image", &body.image),
        ("access_programs", &body.access_programs),
    ] {
        if let Some(value) = value {
            params.insert(name.into(), value.clone());
        }
    }
    Ok(params)
}

/// `include` is no field, as in [`crate::items::ListParams`].
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RetrieveParams {
    /// `true`: answer with the response's event stream (SSE) instead.
    pub stream: Option<bool>,
    /// With `stream`: resume after this sequence number (or send `Last-Event-ID`).
    pub starting_after: Option<u64>,
    #[allow(dead_code)]
    pub include_obfuscation: Option<bool>,
    /// `eventual`, `bounded`, `session` (default) or `strong`.
    // Read by `ReadConsistency`; named here for the API's description
    // only, and skipped unread.
    #[allow(dead_code)]
    #[param(value_type = Option<String>)]
    pub consistency: Option<serde::de::IgnoredAny>,
}

/// Retrieve a response.
#[utoipa::path(get, path = "/v1/responses/{response_id}", tag = "responses",
    params(("response_id" = String, Path), RetrieveParams, ("include" = Option<Vec<String>>, Query, description = "Accepted for compatibility and ignored.")),
    responses((status = 200, description = "the response; with `stream=true` its events (SSE, one JSON event per `data:` line)",
            content((Response = "application/json"), (crate::events::SseEvent = "text/event-stream"))),
        (status = 400, body = turnpike_protocol::ErrorBody),
        (status = 401, body = turnpike_protocol::ErrorBody),
        (status = 404, body = turnpike_protocol::ErrorBody), (status = 503, body = turnpike_protocol::ErrorBody)))]
pub async fn retrieve(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(response_id): Path<String>,
    Query(params): Query<RetrieveParams>,
    headers: axum::http::HeaderMap,
    read: ReadConsistency,
) -> Result<HttpResponse, ApiError> {
    let id = ids::decode(prefixes::RESPONSE, "response", &response_id)?;
    let user = principal.user_id;
    let consistency = app.consistency(&principal, read).await;
    let row = app
        .router
        .read_one_message(consistency, move |db| {
            Box::pin(async move { find(db, id, user).await })
        })
        .await?
        .ok_or_else(|| ApiError::not_found("response", &response_id))?;
    if params.stream == Some(true) {
        let last_event_id = headers
            .get("last-event-id")
            .map(|v| {
                v.to_str()
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .ok_or_else(|| {
                        ApiError::invalid(
                            "Last-Event-ID",
                            "Last-Event-ID must be a sequence number.",
                        )
                    })
            })
            .transpose()?;
        let slot = crate::limits::open_stream(&app, principal.user_id)?;
        return Ok(events::stream(
            &app,
            row,
            params.starting_after.or(last_event_id),
            slot,
        ));
    }
    Ok(axum::Json(row.to_api()).into_response())
}

/// `include` is no field, as in [`crate::items::ListParams`].
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct InputItemsParams {
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

/// List the items a response was created with.
#[utoipa::path(get, path = "/v1/responses/{response_id}/input_items", tag = "responses",
    params(("response_id" = String, Path), InputItemsParams, ("include" = Option<Vec<String>>, Query, description = "Accepted for compatibility and ignored.")),
    responses((status = 200, body = List<Item>), (status = 400, body = turnpike_protocol::ErrorBody),
        (status = 401, body = turnpike_protocol::ErrorBody), (status = 404, body = turnpike_protocol::ErrorBody),
        (status = 503, body = turnpike_protocol::ErrorBody)))]
pub async fn input_items(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(response_id): Path<String>,
    Query(params): Query<InputItemsParams>,
    read: ReadConsistency,
) -> Result<HttpResponse, ApiError> {
    let id = ids::decode(prefixes::RESPONSE, "response", &response_id)?;
    let limit = page_limit(params.limit)?;
    let after = params
        .after
        .as_deref()
        .map(ids::decode_item)
        .transpose()
        .map_err(|_| {
            ApiError::invalid(
                "after",
                "after must be the id of one of this response's input items.",
            )
        })?;
    let order = params.order.unwrap_or_default();
    let user = principal.user_id;
    let consistency = app.consistency(&principal, read).await;
    let rows = app
        .router
        .read_one_message(consistency, move |db| {
            Box::pin(async move {
                let Some(turn) = find(db, id, user).await? else {
                    return Ok(None);
                };
                if let Some(pending) = &turn.pending_input {
                    return Ok(Some(pending_page(&pending.0, after, order, limit + 1)));
                }
                let page = InputPage {
                    conversation: turn.conversation_id,
                    seqs: (turn.input_first_seq, turn.input_last_seq),
                    after,
                    order,
                    limit: limit + 1,
                };
                list_inputs(db, &page).await.map(Some)
            })
        })
        .await?
        .ok_or_else(|| ApiError::not_found("response", &response_id))?;
    Ok(items::page_of(rows, limit, app.settings.limits.max_page_bytes).into_response())
}

/// Cancel a queued or running response. Cancelling a cancelled response
/// returns it unchanged; a finished one is a 409.
#[utoipa::path(post, path = "/v1/responses/{response_id}/cancel", tag = "responses",
    params(("response_id" = String, Path)),
    responses((status = 200, body = Response), (status = 401, body = turnpike_protocol::ErrorBody),
        (status = 404, body = turnpike_protocol::ErrorBody), (status = 409, body = turnpike_protocol::ErrorBody),
        (status = 503, body = turnpike_protocol::ErrorBody)))]
pub async fn cancel(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(response_id): Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = ids::decode(prefixes::RESPONSE, "response", &response_id)?;
    let mut tx = app.router.write().await?;
    let (row, previous) = turns::cancel(&mut tx, id, principal.user_id)
        .await?
        .ok_or_else(|| ApiError::not_found("response", &response_id))?;
    match previous.as_str() {
        "queued" | "in_progress" => {}
        "cancelled" => return Ok(axum::Json(row.to_api()).into_response()),
        finished => {
            return Err(ApiError::conflict(
                format!("The response has already finished ({finished})."),
                "response_finished",
            ));
        }
    }
    let lsn = tx.commit().await?;
    app.wrote(&principal, lsn).await;
    announce_cancel(&app, &row.public_id(), &previous).await;
    Ok(written(lsn, StatusCode::OK, &row.to_api()))
}

/// Delete a response. An active one is cancelled first; the items it
/// added stay in its conversation.
#[utoipa::path(delete, path = "/v1/responses/{response_id}", tag = "responses",
    params(("response_id" = String, Path)),
    responses((status = 200, description = "`{id, object: \"response.deleted\", deleted: true}`"),
        (status = 401, body = turnpike_protocol::ErrorBody),
        (status = 404, body = turnpike_protocol::ErrorBody), (status = 503, body = turnpike_protocol::ErrorBody)))]
pub async fn delete(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Path(response_id): Path<String>,
) -> Result<HttpResponse, ApiError> {
    let id = ids::decode(prefixes::RESPONSE, "response", &response_id)?;
    let mut tx = app.router.write().await?;
    let (row, previous) = turns::cancel(&mut tx, id, principal.user_id)
        .await?
        .ok_or_else(|| ApiError::not_found("response", &response_id))?;
    turns::delete(&mut tx, id, principal.user_id).await?;
    let lsn = tx.commit().await?;
    app.wrote(&principal, lsn).await;
    if matches!(previous.as_str(), "queued" | "in_progress") {
        announce_cancel(&app, &row.public_id(), &previous).await;
    }
    Ok(written(
        lsn,
        StatusCode::OK,
        &serde_json::json!({"id": response_id, "object": "response.deleted", "deleted": true}),
    ))
}

/// `POST /v1/responses/input_tokens`: what a `responses.create` with these
/// fields would send the model, counted before it runs.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InputTokensRequest {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub input: Option<ResponseInput>,
    #[serde(default)]
    pub instructions: Option<String>,
    #[serde(default)]
    #[schema(value_type = Option<Vec<Object>>)]
    pub tools: Option<Vec<serde_json::Value>>,
    #[serde(default)]
    pub conversation: Option<turnpike_protocol::response::ConversationRef>,
    #[serde(default)]
    pub previous_response_id: Option<String>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub tool_choice: Option<serde_json::Value>,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub reasoning: Option<serde_json::Value>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    pub text: Option<serde_json::Value>,
    #[serde(default)]
    pub truncation: Option<String>,
}

/// Compact a context: the model replaces it with the user messages it keeps
/// and one `compaction` item standing for the rest, to send as the next
/// input instead of the whole history. Runs as an unstored turn through the
/// same limits, queue and workers as any other.
#[utoipa::path(post, path = "/v1/responses/compact", tag = "responses", request_body = CompactRequest,
    responses((status = 200, body = CompactedResponse),
        (status = 400, body = turnpike_protocol::ErrorBody), (status = 401, body = turnpike_protocol::ErrorBody),
        (status = 404, body = turnpike_protocol::ErrorBody), (status = 429, body = turnpike_protocol::ErrorBody),
        (status = 502, body = turnpike_protocol::ErrorBody), (status = 504, body = turnpike_protocol::ErrorBody)))]
pub async fn compact(
    State(app): State<AppState>,
    Auth(principal): Auth,
    Json(body): Json<CompactRequest>,
) -> Result<HttpResponse, ApiError> {
    let started = begin(&app, &principal, &body.as_turn(), true).await?;
    let done = wait(&app, &started.row).await;
    let status = done["status"].as_str().unwrap_or_default();
    match status {
        "completed" => {}
        "queued" | "in_progress" => {
            return Err(ApiError::turn_timeout(
                "The compaction did not finish in time; try again.",
            ));
        }
        _ => {
            let message = done["error"]["message"]
                .as_str()
                .or_else(|| done["incomplete_details"]["reason"].as_str())
                .unwrap_or(status);
            return Err(ApiError::upstream(&format!(
                "The model could not compact the context: {message}"
            )));
        }
    }
    let compacted = CompactedResponse {
        id: started.row.public_id(),
        object: "response.compaction".into(),
        created_at: done["created_at"].as_i64().unwrap_or_default(),
        output: serde_json::from_value(done["output"].clone()).unwrap_or_default(),
        usage: serde_json::from_value(done["usage"].clone()).unwrap_or_default(),
    };
    Ok(axum::Json(compacted).into_response())
}

/// Count a prompt's input tokens (OpenAI's `o200k_base` encoding over the
/// prompt's instructions, tools, history and input, as the worker would
/// send them).
#[utoipa::path(post, path = "/v1/responses/input_tokens", tag = "responses", request_body = InputTokensRequest,
    responses((status = 200, description = "`{object: \"response.input_tokens\", input_tokens}`"),
        (status = 400, body = turnpike_protocol::ErrorBody), (status = 401, body = turnpike_protocol::ErrorBody),
        (status = 404, body = turnpike_protocol::ErrorBody)))]
pub async fn input_tokens(
    State(app): State<AppState>,
    Auth(principal): Auth,
    read: ReadConsistency,
    Json(body): Json<InputTokensRequest>,
) -> Result<HttpResponse, ApiError> {
    let inputs = items_of_input(body.input.clone());
    items::check_items(
        "input",
        &inputs,
        0,
        items::MAX_INPUT_ITEMS,
        app.settings.limits.max_item_bytes,
    )?;
    let user = principal.user_id;
    // The history the prompt would start with.
    let conversation = match (&body.conversation, &body.previous_response_id) {
        (Some(reference), _) => Some(ids::decode(
            prefixes::CONVERSATION,
            "conversation",
            reference.id(),
        )?),
        (None, Some(previous)) => {
            let id = ids::decode(prefixes::RESPONSE, "previous_response_id", previous)?;
            let consistency = app.consistency(&principal, read).await;
            let row = app
                .router
                .read(consistency, move |db| {
                    Box::pin(async move { find(db, id, user).await })
                })
                .await?
                .ok_or_else(|| ApiError::not_found("response", previous))?;
            Some(row.conversation_id)
        }
        (None, None) => None,
    };
    let mut texts: Vec<String> = Vec::new();
    let bounds = turns::HistoryBounds::of(&app.settings.worker);
    if let Some(conversation) = conversation {
        let consistency = app.consistency(&principal, read).await;
        let history = app
            .router
            .read(consistency, move |db| {
                Box::pin(async move {
                    if conversations::find(db, conversation, user).await?.is_none() {
                        return Ok(None);
                    }
                    turns::history(db, conversation, i64::MAX, bounds)
                        .await
                        .map(Some)
                })
            })
            .await?
            .ok_or_else(|| {
                ApiError::not_found(
                    "conversation",
                    &ids::encode(prefixes::CONVERSATION, conversation),
                )
            })?;
        texts.extend(history.iter().map(|h| match &h.prompt {
            Some(prompt) => serde_json::to_string(prompt).unwrap_or_default(),
            None => serde_json::to_string(&h.item).unwrap_or_default(),
        }));
    }
    texts.extend(body.instructions.clone());
    texts.extend(
        body.tools
            .iter()
            .map(|t| serde_json::to_string(t).unwrap_or_default()),
    );
    texts.extend(
        inputs
            .iter()
            .map(|i| serde_json::to_string(i).unwrap_or_default()),
    );
    let count = tokio::task::spawn_blocking(move || {
        texts
            .iter()
            .map(|t| turnpike_core::tokens::count_text(t))
            .sum::<u64>()
    })
    .await
    .map_err(|e| ApiError::internal(&e))?;
    Ok(
        axum::Json(serde_json::json!({"object": "response.input_tokens", "input_tokens": count}))
            .into_response(),
    )
}

/// Makes a cancellation visible: a running turn's worker is told to stop
/// (and ends the stream); a queued turn's stream ends here.
pub(crate) async fn announce_cancel(app: &AppState, response: &str, previous: &str) {
    if previous == "in_progress" {
        if let Err(e) = queue::announce_cancel(&app.kv, response).await {
            tracing::warn!(error = %e, response, "could not signal a cancellation; the turn runs to its end");
        }
        return;
    }
    let seq = match turnpike_core::events::last_sequence(&app.kv, response).await {
        Ok(last) => last.map_or(0, |s| s + 1),
        Err(e) => {
            tracing::warn!(error = %e, response, "could not log a cancellation");
            return;
        }
    };
    let event = serde_json::json!({"type": "response.cancelled", "sequence_number": seq,
        "response": {"id": response, "status": "cancelled"}});
    let retention = Duration::from_millis(app.settings.events.retention_ms);
    if let Err(e) =
        turnpike_core::events::append(&app.kv, response, seq, &event.to_string(), retention).await
    {
        tracing::warn!(error = %e, response, "could not log a cancellation");
    }
}

struct NewResponse<'a> {
    id: Uuid,
    conversation: Uuid,
    user: Uuid,
    model: &'a str,
    background: bool,
    request: &'a StoredRequest,
    input_seqs: (i64, i64),
    pending: Option<&'a [Item]>,
}

/// Inserts a queued response. Primary only.
#[tracing::instrument(level = "debug", skip_all, fields(id = %new.id))]
async fn insert(db: &mut impl DbConn, new: &NewResponse<'_>) -> Result<ResponseRow, sqlx::Error> {
    let request = statement::json(new.request)?;
    let pending = new.pending.map(statement::json).transpose()?;
    statement::fetch_optional(
        db,
        &format!(
            "INSERT INTO responses (id, conversation_id, user_id, status, model, background, request,
                 input_first_seq, input_last_seq, pending_input)
             VALUES ($1, $2, $3, 'queued', $4, $5, $6::jsonb, $7, $8, $9::jsonb) RETURNING {COLUMNS}"
        ),
        &[
            Arg::from(new.id),
            Arg::from(new.conversation),
            Arg::from(new.user),
            Arg::from(new.model),
            Arg::from(new.background),
            Arg::from(request.as_str()),
            Arg::from(new.input_seqs.0),
            Arg::from(new.input_seqs.1),
            Arg::Text(pending.as_deref()),
        ],
    )
    .await?
    .ok_or(sqlx::Error::RowNotFound)
}

/// A page of a waiting turn's pending input (not yet in the conversation).
fn pending_page(pending: &[Item], after: Option<Uuid>, order: Order, limit: i64) -> Vec<ItemRow> {
    let mut rows: Vec<ItemRow> = pending
        .iter()
        .filter_map(|item| {
            let id = turnpike_core::ids::parse_item(item.id())?;
            let kind = turns::kind_of(item);
            let body = serde_json::to_string(item).ok()?;
            Some(ItemRow {
                id,
                kind: kind.to_owned(),
                body: StoredJson(body),
            })
        })
        .collect();
    if order == Order::Desc {
        rows.reverse();
    }
    if let Some(after) = after {
        match rows.iter().position(|r| r.id == after) {
            Some(at) => {
                rows.drain(..=at);
            }
            None => rows.clear(),
        }
    }
    rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    rows
}

struct InputPage {
    conversation: Uuid,
    seqs: (i64, i64),
    after: Option<Uuid>,
    order: Order,
    limit: i64,
}

/// A page of a response's input items. Replica or primary.
async fn list_inputs(db: &mut impl DbConn, page: &InputPage) -> Result<Vec<ItemRow>, sqlx::Error> {
    let (cmp, dir) = match page.order {
        Order::Asc => (">", "ASC"),
        Order::Desc => ("<", "DESC"),
    };
    let cursor = if page.after.is_some() {
        format!("AND seq {cmp} (SELECT seq FROM items WHERE conversation_id = $1 AND id = $5)")
    } else {
        String::new()
    };
    let sql = format!(
        "SELECT id, kind, body FROM items WHERE conversation_id = $1 AND seq BETWEEN $2 AND $3 {cursor}
         ORDER BY seq {dir} LIMIT $4"
    );
    let mut args = vec![
        Arg::from(page.conversation),
        Arg::from(page.seqs.0),
        Arg::from(page.seqs.1),
        Arg::from(page.limit),
    ];
    if let Some(after) = page.after {
        args.push(Arg::from(after));
    }
    let rows: Vec<(Uuid, String, StoredJson)> = statement::fetch_all(db, &sql, &args).await?;
    Ok(rows
        .into_iter()
        .map(|(id, kind, body)| ItemRow { id, kind, body })
        .collect())
}

/// Tool types a response may offer: Turnpike's server-side tools, then the
/// client-executed kinds (the turn ends with their call items, which the
/// client answers in its next request), then the kinds a provider hosts.
const SERVER_TOOL_TYPES: [&str; 3] = ["conversation_search", "http_fetch", "mcp"];
const CLIENT_TOOL_TYPES: [&str; 7] = [
    "function",
    "custom",
    "local_shell",
    "shell",
    "apply_patch",
    "computer",
    "computer_use_preview",
];
const HOSTED_TOOL_TYPES: [&str; 10] = [
    "web_search",
    "programmatic_tool_calling",
    "web_search_preview",
    "web_search_2025_08_26",
    "web_search_preview_2025_03_11",
    "file_search",
    "code_interpreter",
    "image_generation",
    "namespace",
    "tool_search",
];

/// Checks a request's tools: known types, named functions, configured MCP
/// servers, no duplicates; hosted kinds only with a provider that hosts
/// them (the Responses API).
fn check_tools(
    tools: &[serde_json::Value],
    settings: &turnpike_core::config::ToolSettings,
    provider: turnpike_core::config::ProviderKind,
) -> Result<(), ApiError> {
    let mut names = std::collections::BTreeSet::new();
    for (i, tool) in tools.iter().enumerate() {
        let Some(kind) = tool.get("type").and_then(|t| t.as_str()) else {
            return Err(ApiError::invalid(
                format!("tools[{i}].type"),
                "every tool needs a type.",
            ));
        };
        let name = match kind {
            "function" | "custom" | "namespace" => check_tool_name(i, kind, tool, settings)?,
            "mcp" => {
                let label = check_mcp_tool(i, tool, settings)?;
                if !names.insert(format!("mcp:{label}")) {
                    return Err(ApiError::invalid(
                        format!("tools[{i}]"),
                        format!("the MCP server '{label}' is offered twice."),
                    ));
                }
                continue;
            }
            "http_fetch" if !settings.http_fetch.enabled => {
                return Err(ApiError::invalid(
                    format!("tools[{i}].type"),
                    "the http_fetch tool is turned off on this server.",
                ));
            }
            _ if HOSTED_TOOL_TYPES.contains(&kind)
                && provider != turnpike_core::config::ProviderKind::Responses =>
            {
                return Err(ApiError::invalid(
                    format!("tools[{i}].type"),
                    format!(
                        "the '{kind}' tool is hosted by the model provider, and this server's provider (Chat Completions) hosts none."
                    ),
                ));
            }
            _ if SERVER_TOOL_TYPES.contains(&kind)
                || CLIENT_TOOL_TYPES.contains(&kind)
                || HOSTED_TOOL_TYPES.contains(&kind) =>
            {
                kind
            }
            other => {
                return Err(ApiError::invalid(
                    format!("tools[{i}].type"),
                    format!(
                        "unsupported tool type '{other}'; supported: {}, {}, {}.",
                        SERVER_TOOL_TYPES.join(", "),
                        CLIENT_TOOL_TYPES.join(", "),
                        HOSTED_TOOL_TYPES.join(", ")
                    ),
                ));
            }
        };
        // A client's tool never shadows a server-side one.
        if kind != name && SERVER_TOOL_TYPES.contains(&name) {
            return Err(ApiError::invalid(
                format!("tools[{i}].name"),
                format!(
                    "'{name}' is the name of a server-side tool; name the {kind} tool otherwise."
                ),
            ));
        }
        if !names.insert(name.to_owned()) {
            return Err(ApiError::invalid(
                format!("tools[{i}]"),
                format!("the tool '{name}' is offered twice."),
            ));
        }
    }
    Ok(())
}

/// The name of a named tool (function, custom, namespace): 1 to 64 letters,
/// digits, `_`, `-` (and `.` for namespaces); `<label>__` names belong to
/// the MCP server with that label.
fn check_tool_name<'a>(
    i: usize,
    kind: &str,
    tool: &'a serde_json::Value,
    settings: &turnpike_core::config::ToolSettings,
) -> Result<&'a str, ApiError> {
    let allowed = |c: char| {
        c.is_ascii_alphanumeric() || c == '_' || c == '-' || (kind == "namespace" && c == '.')
    };
    match tool.get("name").and_then(|n| n.as_str()) {
        Some(name) if !name.is_empty() && name.len() <= 64 && name.chars().all(allowed) => {
            if let Some((label, _)) = name.split_once("__")
                && settings.mcp_servers.contains_key(label)
            {
                return Err(ApiError::invalid(
                    format!("tools[{i}].name"),
                    format!(
                        "tool names starting with '{label}__' are reserved for the MCP server '{label}'."
                    ),
                ));
            }
            Ok(name)
        }
        _ => Err(ApiError::invalid(
            format!("tools[{i}].name"),
            format!("a {kind} tool needs a name of 1 to 64 letters, digits, '_' or '-'."),
        )),
    }
}

/// Checks an `mcp` tool entry against the configured servers and returns
/// its label. Servers come from the
/// configuration only, so a request cannot send the worker anywhere else.
fn check_mcp_tool<'a>(
    i: usize,
    tool: &'a serde_json::Value,
    settings: &turnpike_core::config::ToolSettings,
) -> Result<&'a str, ApiError> {
    let label = tool
        .get("server_label")
        .and_then(|l| l.as_str())
        .ok_or_else(|| {
            ApiError::invalid(
                format!("tools[{i}].server_label"),
                "an mcp tool needs a server_label.",
            )
        })?;
    let Some(server) = settings.mcp_servers.get(label) else {
        return Err(ApiError::invalid(
            format!("tools[{i}].server_label"),
            format!("no MCP server labelled '{label}' is configured on this server."),
        ));
    };
    if let Some(url) = tool.get("server_url")
        && url.as_str() != Some(server.url.as_str())
    {
        return Err(ApiError::invalid(
            format!("tools[{i}].server_url"),
            format!("server_url must be omitted or equal the configured URL of '{label}'."),
        ));
    }
    if let Some(approval) = tool.get("require_approval")
        && approval.as_str() != Some("never")
    {
        return Err(ApiError::invalid(
            format!("tools[{i}].require_approval"),
            "only require_approval: \"never\" is supported.",
        ));
    }
    if let Some(allowed) = tool.get("allowed_tools")
        && !allowed
            .as_array()
            .is_some_and(|names| names.iter().all(serde_json::Value::is_string))
    {
        return Err(ApiError::invalid(
            format!("tools[{i}].allowed_tools"),
            "allowed_tools must be a list of tool names.",
        ));
    }
    Ok(label)
}

/// Checks `context_management`: compaction entries with a positive threshold.
fn check_context_management(entries: &[serde_json::Value]) -> Result<(), ApiError> {
    for (i, entry) in entries.iter().enumerate() {
        if entry.get("type").and_then(|t| t.as_str()) != Some("compaction") {
            return Err(ApiError::invalid(
                format!("context_management[{i}].type"),
                "the only context_management type is 'compaction'.",
            ));
        }
        if let Some(threshold) = entry.get("compact_threshold")
            && threshold.as_u64().is_none_or(|t| t == 0)
        {
            return Err(ApiError::invalid(
                format!("context_management[{i}].compact_threshold"),
                "compact_threshold must be a positive number of tokens.",
            ));
        }
    }
    Ok(())
}

/// A request that starts a conversation has nothing but its own input for
/// a tool call's output to answer: an output whose `call_id` names no call
/// in the input is refused here, as OpenAI refuses it, rather than by the
/// provider once the turn runs.
fn check_outputs_answer_calls(inputs: &[InputItem]) -> Result<(), ApiError> {
    let calls: std::collections::HashSet<&str> = inputs
        .iter()
        .filter_map(|item| match item {
            InputItem::FunctionCall { call_id, .. } => Some(call_id.as_str()),
            // Custom and hosted tool calls, kept as sent.
            InputItem::Other(other) => other.get("call_id").and_then(|id| id.as_str()),
            _ => None,
        })
        .collect();
    for (i, item) in inputs.iter().enumerate() {
        if let InputItem::FunctionCallOutput { call_id, .. } = item
            && !calls.contains(call_id.as_str())
        {
            return Err(ApiError::invalid(
                format!("input[{i}].call_id"),
                format!(
                    "No tool call found for function call output with call_id {call_id}: a new conversation's input must hold the call it answers (or continue with previous_response_id or conversation)."
                ),
            ));
        }
    }
    Ok(())
}

/// `tool_choice`, `truncation` and `max_output_tokens` as OpenAI takes
/// them: a mode it knows, a function the request offers, a cap of at least
/// one token. An object `tool_choice` of another type (hosted tools,
/// `allowed_tools`) goes to the provider as given.
fn check_choices(
    body: &CreateResponse,
    settings: &turnpike_core::config::ToolSettings,
) -> Result<(), ApiError> {
    const MODES: [&str; 3] = ["none", "auto", "required"];
    match &body.tool_choice {
        None | Some(serde_json::Value::Null) => {}
        Some(serde_json::Value::String(mode)) if MODES.contains(&mode.as_str()) => {}
        Some(serde_json::Value::Object(choice)) => {
            let kind = choice.get("type").and_then(|t| t.as_str());
            if kind.is_none() {
                return Err(ApiError::invalid(
                    "tool_choice.type",
                    "tool_choice needs a type.",
                ));
            }
            if let Some(kind @ ("function" | "custom")) = kind {
                let name = choice.get("name").and_then(|n| n.as_str()).unwrap_or("");
                let offered = offered_names(body.tools.as_deref().unwrap_or_default())
                    .any(|offered| offered == name);
                // Tools of configured MCP servers are named only once the
                // worker lists them.
                if !offered && settings.mcp_servers.is_empty() {
                    return Err(ApiError::invalid(
                        "tool_choice.name",
                        format!("Tool choice '{kind}' names '{name}', which is not in tools."),
                    ));
                }
            }
        }
        Some(_) => {
            return Err(ApiError::invalid(
                "tool_choice",
                "tool_choice must be one of none, auto, required, or an object naming a tool.",
            ));
        }
    }
    if let Some(truncation) = &body.truncation
        && !["auto", "disabled"].contains(&truncation.as_str())
    {
        return Err(ApiError::invalid(
            "truncation",
            "truncation must be auto or disabled.",
        ));
    }
    if body.max_output_tokens == Some(0) {
        return Err(ApiError::invalid(
            "max_output_tokens",
            "max_output_tokens must be at least 1.",
        ));
    }
    Ok(())
}

/// The names a forced tool choice may give: each tool's name, a server-side
/// tool's type (the function the worker offers in its place), and the
/// functions of a namespace, bare and qualified (`crm.lookup`).
fn offered_names(tools: &[serde_json::Value]) -> impl Iterator<Item = String> + '_ {
    let text = |value: &serde_json::Value, key: &str| {
        value.get(key).and_then(|v| v.as_str()).map(str::to_owned)
    };
    tools.iter().flat_map(move |tool| {
        let mut names: Vec<String> = [text(tool, "name"), text(tool, "type")]
            .into_iter()
            .flatten()
            .collect();
        if let (Some(space), Some(inner)) = (
            text(tool, "name"),
            tool.get("tools").and_then(|t| t.as_array()),
        ) {
            for name in inner.iter().filter_map(|t| text(t, "name")) {
                names.push(format!("{space}.{name}"));
                names.push(name);
            }
        }
        names
    })
}

/// Sampling parameters within the ranges OpenAI accepts: a value outside
/// them is the caller's mistake, answered now rather than by a failed turn
/// once the provider refuses it.
fn check_sampling(temperature: Option<f64>, top_p: Option<f64>) -> Result<(), ApiError> {
    for (name, value, max) in [("temperature", temperature, 2.0), ("top_p", top_p, 1.0)] {
        if let Some(value) = value
            && !(0.0..=max).contains(&value)
        {
            return Err(ApiError::invalid(
                name,
                format!("{name} must be between 0 and {max}; got {value}."),
            ));
        }
    }
    Ok(())
}

/// `reasoning` and `text` go to the model as given: refuse what no provider
/// would take, so the mistake is a 400 now rather than a failed turn later.
fn check_passed_through(
    reasoning: Option<&serde_json::Value>,
    text: Option<&serde_json::Value>,
) -> Result<(), ApiError> {
    const EFFORTS: [&str; 6] = ["none", "minimal", "low", "medium", "high", "xhigh"];
    const SUMMARIES: [&str; 3] = ["auto", "concise", "detailed"];
    if let Some(reasoning) = reasoning {
        let Some(fields) = reasoning.as_object() else {
            return Err(ApiError::invalid(
                "reasoning",
                "reasoning must be an object.",
            ));
        };
        for (name, value) in fields {
            let allowed: &[&str] = match name.as_str() {
                "effort" => &EFFORTS,
                "summary" | "generate_summary" => &SUMMARIES,
                other => {
                    return Err(ApiError::invalid(
                        format!("reasoning.{other}"),
                        format!("unknown field `{other}`; expected `effort` or `summary`."),
                    ));
                }
            };
            if !value.is_null() && !value.as_str().is_some_and(|v| allowed.contains(&v)) {
                return Err(ApiError::invalid(
                    format!("reasoning.{name}"),
                    format!("reasoning.{name} must be one of {}.", allowed.join(", ")),
                ));
            }
        }
    }
    if let Some(text) = text
        && !text.is_object()
    {
        return Err(ApiError::invalid("text", "text must be an object."));
    }
    Ok(())
}
