//! Turns (responses) and conversation items as stored: the queries the api
//! and the workers share, and the mapping to the wire `Response`.

use serde::{Deserialize, Serialize};
use sqlx::types::Json as SqlJson;
use turnpike_protocol::item::Item;
use turnpike_protocol::response::{Response, ResponseConversation, ResponseStatus, Usage};
use turnpike_protocol::{Metadata, ids as prefixes};
use uuid::Uuid;

use crate::db::DbConn;
use crate::db::statement::{self, Arg};
use crate::ids;

/// The creation parameters kept with a response.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StoredRequest {
    pub instructions: Option<String>,
    #[serde(default)]
    pub tools: Vec<serde_json::Value>,
    pub tool_choice: Option<serde_json::Value>,
    #[serde(default)]
    pub metadata: Metadata,
    pub parallel_tool_calls: Option<bool>,
    pub max_output_tokens: Option<u32>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub store: Option<bool>,
    pub truncation: Option<String>,
    pub context_management: Option<Vec<serde_json::Value>>,
    /// Passed to the model as given (`effort`, `summary`).
    #[serde(default)]
    pub reasoning: Option<serde_json::Value>,
    /// Passed to the model as given (`format`, `verbosity`).
    #[serde(default)]
    pub text: Option<serde_json::Value>,
    /// The response this one continues, as the client named it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_response_id: Option<String>,
    /// The most server-side tool calls the turn runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tool_calls: Option<u32>,
    /// The client's cache key; the conversation's id when it gave none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_cache_key: Option<String>,
    /// Whether streamed deltas keep the provider's `obfuscation` padding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include_obfuscation: Option<bool>,
    /// Parameters passed to the provider as given (`service_tier`,
    /// `safety_identifier`, `user`, `top_logprobs`, `prompt_cache_retention`,
    /// `client_metadata`, `prompt`, …) and echoed on the response.
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub provider_params: serde_json::Map<String, serde_json::Value>,
    /// A `POST /v1/responses/compact` turn: its one step compacts the
    /// context; its output is the compacted window.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub compact: bool,
}

impl StoredRequest {
    /// A provider parameter the client set, as a string.
    pub fn provider_str(&self, key: &str) -> Option<String> {
        self.provider_params
            .get(key)
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
    }
}

/// A response row as stored.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ResponseRow {
    pub id: Uuid,
    pub conversation_id: Uuid,
    pub user_id: Uuid,
    pub status: String,
    pub model: String,
    pub background: bool,
    pub request: SqlJson<StoredRequest>,
    pub output: SqlJson<Vec<Item>>,
    pub usage: Option<SqlJson<Usage>>,
    pub error: Option<serde_json::Value>,
    /// Why the response ended `incomplete`, when it did.
    pub incomplete_details: Option<serde_json::Value>,
    pub input_first_seq: i64,
    pub input_last_seq: i64,
    /// The input of a turn waiting behind another, appended when it starts.
    pub pending_input: Option<SqlJson<Vec<Item>>>,
    pub created_at: i64,
}

crate::statement_row!(ResponseRow {
    id,
    conversation_id,
    user_id,
    status,
    model,
    background,
    request,
    output,
    usage,
    error,
    incomplete_details,
    input_first_seq,
    input_last_seq,
    pending_input,
    created_at,
});

impl ResponseRow {
    pub fn public_id(&self) -> String {
        ids::encode(prefixes::RESPONSE, self.id)
    }

    pub fn status(&self) -> ResponseStatus {
        ResponseStatus::parse(&self.status).unwrap_or(ResponseStatus::Failed)
    }

    /// The wire object.
    pub fn to_api(&self) -> Response {
        let request = &self.request.0;
        Response {
            id: self.public_id(),
            object: "response".into(),
            created_at: self.created_at,
            status: self.status(),
            background: self.background,
            conversation: ResponseConversation {
                id: ids::encode(prefixes::CONVERSATION, self.conversation_id),
            },
            model: self.model.clone(),
            instructions: request.instructions.clone(),
            output: self.output.0.clone(),
            tools: request.tools.clone(),
            tool_choice: request.tool_choice.clone().unwrap_or_else(|| "auto".into()),
            parallel_tool_calls: request.parallel_tool_calls.unwrap_or(true),
            metadata: request.metadata.clone(),
            usage: self.usage.as_ref().map(|u| u.0.clone()),
            error: self.error.clone(),
            incomplete_details: self.incomplete_details.clone(),
            previous_response_id: request.previous_response_id.clone(),
            max_output_tokens: request.max_output_tokens,
            temperature: request.temperature,
            top_p: request.top_p,
            store: request.store.unwrap_or(true),
            truncation: request
                .truncation
                .clone()
                .unwrap_or_else(|| "disabled".into()),
            max_tool_calls: request.max_tool_calls,
            service_tier: request.provider_str("service_tier"),
            top_logprobs: request
                .provider_params
                .get("top_logprobs")
                .and_then(serde_json::Value::as_u64)
                .and_then(|v| u32::try_from(v).ok()),
            prompt_cache_key: request.prompt_cache_key.clone(),
            prompt_cache_retention: request.provider_str("prompt_cache_retention"),
            safety_identifier: request.provider_str("safety_identifier"),
            user: request.provider_str("user"),
            reasoning: request.reasoning.clone(),
            text: request.text.clone(),
        }
    }
}

pub const COLUMNS: &str =
    "id, conversation_id, user_id, status, model, background, request, output, usage, error,
    incomplete_details, input_first_seq, input_last_seq, pending_input, extract(epoch FROM created_at)::int8 AS created_at";

/// A response the user owns. Any node.
#[tracing::instrument(level = "debug", skip(db))]
pub async fn find(
    db: &mut impl DbConn,
    id: Uuid,
    user: Uuid,
) -> Result<Option<ResponseRow>, sqlx::Error> {
    // A deleted conversation's responses are gone with it.
    statement::fetch_optional(
        db,
        &format!(
            "SELECT {COLUMNS} FROM responses r WHERE id = $1 AND user_id = $2
               AND EXISTS (SELECT 1 FROM conversations c
                            WHERE c.id = r.conversation_id AND c.deleted_at IS NULL)"
        ),
        &[Arg::from(id), Arg::from(user)],
    )
    .await
}

/// A response by id, whoever owns it (workers). Any node.
#[tracing::instrument(level = "debug", skip(db))]
pub async fn find_any(db: &mut impl DbConn, id: Uuid) -> Result<Option<ResponseRow>, sqlx::Error> {
    let prepared = db.prepared();
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM responses WHERE id = $1"))
        .bind(id)
        .persistent(prepared)
        .fetch_optional(db.conn())
        .await
}

/// Where a new turn goes.
#[derive(Debug, Clone, Copy)]
pub enum Destination {
    /// A new conversation, of this id.
    New(Uuid),
    /// The user's conversation.
    Conversation(Uuid),
    /// The conversation holding the user's response, after it.
    After(Uuid),
}

/// Where a new turn goes and what it must find there to be created in one
/// call ([`create`]).
#[derive(Debug, Clone, Copy)]
pub struct Placement {
    pub destination: Destination,
    /// Whether a busy conversation refuses the turn rather than queueing it.
    pub reject_busy: bool,
    /// The user has fewer queued or running turns than this (`None`: not
    /// counted) ...
    pub active_below: Option<i64>,
    /// ... and their stored items with the turn's come to at most this
    /// (`None`: not counted).
    pub storage_cap: Option<i64>,
}

/// A new turn, as [`create`] stores it.
pub struct NewTurn<'a> {
    pub user: Uuid,
    pub placement: Placement,
    pub response: Uuid,
    pub model: &'a str,
    pub background: bool,
    pub request: &'a StoredRequest,
    /// The input, in order.
    pub items: &'a [Item],
    /// The input's size, as the storage limit counts it.
    pub incoming: i64,
}

/// Creates a turn on the common path (`turnpike_create_turn`: a new
/// conversation, or the user's conversation or response, the turn running
/// at once or waiting behind the active one, the user clear of the limits)
/// and commits, in one round trip after `tx`'s `BEGIN`. `None` when the
/// turn is off that path: nothing was written, and the caller creates it
/// statement by statement in a new transaction, with the answers that path
/// gives (not found, busy, a fork, a limit).
#[tracing::instrument(level = "debug", skip_all, fields(id = %turn.response))]
pub async fn create(
    tx: crate::db::Writer,
    turn: &NewTurn<'_>,
) -> Result<Option<(ResponseRow, crate::db::Lsn)>, crate::db::DbError> {
    let request = statement::json(turn.request)?;
    let items = ItemColumns::of(turn.items, &[])?;
    let placement = &turn.placement;
    let (conversation, previous, new) = match placement.destination {
        Destination::New(id) => (None, None, Some(id)),
        Destination::Conversation(id) => (Some(id), None, None),
        Destination::After(id) => (None, Some(id), None),
    };
    let (rows, lsn) = tx
        .commit_after::<ResponseRow>(
            &format!(
                "SELECT {COLUMNS} FROM turnpike_create_turn($1, $2, $3, $4, $5, $6, $7, $8,
                     $9, $10, $11, $12::jsonb, $13::uuid[], $14::text[], $15::text[]::jsonb[])"
            ),
            &[
                Arg::from(turn.user),
                Arg::from(conversation),
                Arg::from(previous),
                Arg::from(new),
                Arg::from(placement.reject_busy),
                Arg::Int(placement.active_below),
                Arg::Int(placement.storage_cap),
                Arg::from(turn.incoming),
                Arg::from(turn.response),
                Arg::from(turn.model),
                Arg::from(turn.background),
                Arg::from(request.as_str()),
                Arg::Uuids(&items.ids),
                Arg::Texts(&items.kinds),
                Arg::Texts(&items.bodies),
            ],
        )
        .await?;
    Ok(rows.into_iter().next().map(|row| (row, lsn)))
}

/// Moves a queued response to `in_progress`. A redelivered turn
/// (`redelivery`: its worker died) also takes over one already in progress;
/// a first delivery never does, so a duplicate queue entry cannot run a turn
/// twice at once. `None` when there is nothing to run; otherwise the row,
/// whether its pending input was appended to the conversation now, and the
/// conversation's frozen prompt settings, all under the conversation's
/// lock. Primary only.
#[tracing::instrument(level = "debug", skip(db))]
pub async fn start(
    db: &mut impl DbConn,
    id: Uuid,
    redelivery: bool,
) -> Result<Option<Started>, sqlx::Error> {
    let prepared = db.prepared();
    let Some(started) = start_alone(db, id, redelivery).await? else {
        return Ok(None);
    };
    let Some(pending) = started.row.pending_input.as_ref().map(|p| p.0.clone()) else {
        return Ok(Some(started));
    };
    let Started { row, frozen, .. } = started;
    // Its turn has come: the input joins the conversation after everything before it.
    let Some(first) = reserve_seqs(db, row.conversation_id, row.user_id, pending.len()).await?
    else {
        return Ok(None);
    };
    insert_items(db, row.conversation_id, first, &pending, Some(row.id)).await?;
    let last = first + i64::try_from(pending.len()).unwrap_or(0) - 1;
    let row: Option<ResponseRow> = sqlx::query_as(&format!(
        "UPDATE responses SET input_first_seq = $2, input_last_seq = $3, pending_input = NULL
         WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .bind(first)
    .bind(last)
    .persistent(prepared)
    .fetch_optional(db.conn())
    .await?;
    Ok(row.map(|row| Started {
        row,
        appended: true,
        frozen,
    }))
}

/// The one statement of [`start`]: moves the turn to `in_progress` and
/// reads the conversation's frozen prompt settings, and leaves its pending
/// input (`row.pending_input`) where it is. On a connection of its own
/// ([`crate::db::Router::write_one_message`]) it is a transaction of its
/// own, one round trip. Primary only.
#[tracing::instrument(level = "debug", skip(db))]
pub async fn start_alone(
    db: &mut impl DbConn,
    id: Uuid,
    redelivery: bool,
) -> Result<Option<Started>, sqlx::Error> {
    // `turnpike_start_turn` locks the conversation first, as every other
    // writer of its turns does (an interrupting create locks the
    // conversation, then its responses; the turn goes on to append pending
    // input and freeze the prompt): one lock order, no deadlock. It also
    // reads the conversation's frozen prompt settings as of that lock: the
    // caller refreezes them under it. When nothing is started the caller
    // locks the conversation itself.
    let started: Option<StartedRow> = statement::fetch_optional(
        db,
        &format!(
            "SELECT {COLUMNS}, frozen FROM (
               SELECT (s.r).*, s.frozen FROM turnpike_start_turn($1, $2) s) AS started"
        ),
        &[Arg::from(id), Arg::from(redelivery)],
    )
    .await?;
    Ok(started.map(|StartedRow { row, frozen }| Started {
        row,
        appended: false,
        frozen: frozen.map(|f| f.0),
    }))
}

/// A turn [`start`] started.
pub struct Started {
    pub row: ResponseRow,
    /// Its pending input was appended to the conversation just now.
    pub appended: bool,
    /// The conversation's frozen prompt settings (locked with it).
    pub frozen: Option<crate::steps::Frozen>,
}

#[derive(sqlx::FromRow)]
struct StartedRow {
    #[sqlx(flatten)]
    row: ResponseRow,
    frozen: Option<SqlJson<crate::steps::Frozen>>,
}

impl statement::StatementRow for StartedRow {
    fn from_pipelined(row: &statement::PipelinedRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            row: ResponseRow::from_pipelined(row)?,
            frozen: statement::Column::column(row, "frozen")?,
        })
    }
}

/// Makes the turn's input end at `last_seq` (a developer message appended
/// after it joins it). Primary only.
#[tracing::instrument(level = "debug", skip(db))]
pub async fn extend_input(
    db: &mut impl DbConn,
    id: Uuid,
    last_seq: i64,
) -> Result<(), sqlx::Error> {
    let prepared = db.prepared();
    sqlx::query("UPDATE responses SET input_last_seq = $2 WHERE id = $1")
        .bind(id)
        .bind(last_seq)
        .persistent(prepared)
        .execute(db.conn())
        .await?;
    Ok(())
}

/// Whether the conversation has a queued or running turn. Primary, under
/// the conversation's lock.
#[tracing::instrument(level = "debug", skip(db))]
pub async fn has_active_turn(
    db: &mut impl DbConn,
    conversation: Uuid,
) -> Result<bool, sqlx::Error> {
    let row: Option<(i32,)> = statement::fetch_optional(
        db,
        "SELECT 1 FROM responses WHERE conversation_id = $1 AND status IN ('queued', 'in_progress') LIMIT 1",
        &[Arg::from(conversation)],
    )
    .await?;
    Ok(row.is_some())
}

/// Takes the conversation's row lock, as a create does before it decides
/// whether its turn waits behind an active one. Every writer of a
/// conversation's turns takes it first: one lock order, and a turn's end
/// and a create are serialized (neither can miss the other).
pub async fn lock_conversation(
    db: &mut impl DbConn,
    conversation: Uuid,
) -> Result<(), sqlx::Error> {
    statement::execute(
        db,
        "SELECT 1 FROM conversations WHERE id = $1 FOR NO KEY UPDATE",
        &[Arg::from(conversation)],
    )
    .await?;
    Ok(())
}

/// The conversation's oldest queued turn, if no turn is in progress: the
/// one to dispatch next. Primary only; the caller holds the conversation's
/// lock ([`lock_conversation`], or [`finish`] which takes it), so a turn
/// created meanwhile either sees the ended turn (and dispatches itself) or
/// is seen here.
#[tracing::instrument(level = "debug", skip(db))]
pub async fn next_queued(
    db: &mut impl DbConn,
    conversation: Uuid,
) -> Result<Option<Uuid>, sqlx::Error> {
    let row: Option<(Uuid,)> = statement::fetch_optional(
        db,
        "SELECT id FROM responses q WHERE q.conversation_id = $1 AND q.status = 'queued'
           AND NOT EXISTS (SELECT 1 FROM responses a WHERE a.conversation_id = $1 AND a.status = 'in_progress')
         ORDER BY q.id LIMIT 1",
        &[Arg::from(conversation)],
    )
    .await?;
    Ok(row.map(|(id,)| id))
}

/// Turns queued longer than `older_than_ms` that should be running: the
/// oldest queued turn of a conversation with none in progress. Their enqueue
/// was lost (Redis down at creation, or a worker died between finishing a
/// turn and dispatching the next). Primary only.
#[tracing::instrument(level = "debug", skip(db))]
pub async fn stranded(
    db: &mut impl DbConn,
    older_than_ms: i64,
    limit: i64,
) -> Result<Vec<Uuid>, sqlx::Error> {
    ids_older_than(
        db,
        "SELECT r.id FROM responses r
         WHERE r.status = 'queued' AND r.created_at < now() - make_interval(secs => $1::float8 / 1000)
           AND r.id = (SELECT q.id FROM responses q WHERE q.conversation_id = r.conversation_id AND q.status = 'queued'
                       ORDER BY q.id LIMIT 1)
           AND NOT EXISTS (SELECT 1 FROM responses a WHERE a.conversation_id = r.conversation_id AND a.status = 'in_progress')
         LIMIT $2",
        older_than_ms,
        limit,
    )
    .await
}

/// The ids `sql` selects, its `$1` an age in milliseconds and `$2` a limit.
async fn ids_older_than(
    db: &mut impl DbConn,
    sql: &'static str,
    older_than_ms: i64,
    limit: i64,
) -> Result<Vec<Uuid>, sqlx::Error> {
    let prepared = db.prepared();
    let rows: Vec<(Uuid,)> = sqlx::query_as(sql)
        .bind(older_than_ms)
        .bind(limit)
        .persistent(prepared)
        .fetch_all(db.conn())
        .await?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

/// Turns marked running whose last change is older than `older_than_ms`:
/// candidates for a turn whose worker and queue entry are both gone (the
/// caller checks the queue). Primary only.
#[tracing::instrument(level = "debug", skip(db))]
pub async fn running_since(
    db: &mut impl DbConn,
    older_than_ms: i64,
    limit: i64,
) -> Result<Vec<Uuid>, sqlx::Error> {
    ids_older_than(
        db,
        "SELECT id FROM responses
         WHERE status = 'in_progress' AND updated_at < now() - make_interval(secs => $1::float8 / 1000)
         ORDER BY id LIMIT $2",
        older_than_ms,
        limit,
    )
    .await
}

/// Cancels the conversation's queued and running turns; returns them. Primary only.
#[tracing::instrument(level = "debug", skip(db))]
pub async fn cancel_active(
    db: &mut impl DbConn,
    conversation: Uuid,
) -> Result<Vec<(Uuid, String)>, sqlx::Error> {
    let prepared = db.prepared();
    sqlx::query_as(
        "WITH active AS (SELECT id, status FROM responses
                         WHERE conversation_id = $1 AND status IN ('queued', 'in_progress') FOR UPDATE)
         UPDATE responses r SET status = 'cancelled', updated_at = now()
         FROM active WHERE r.id = active.id RETURNING r.id, active.status",
    )
    .bind(conversation)
    .persistent(prepared)
    .fetch_all(db.conn())
    .await
}

/// Cancels one queued or running response; returns it and the status it had.
/// Primary only.
#[tracing::instrument(level = "debug", skip(db))]
pub async fn cancel(
    db: &mut impl DbConn,
    id: Uuid,
    user: Uuid,
) -> Result<Option<(ResponseRow, String)>, sqlx::Error> {
    let prepared = db.prepared();
    let before: Option<(String,)> =
        sqlx::query_as("SELECT status FROM responses WHERE id = $1 AND user_id = $2 FOR UPDATE")
            .bind(id)
            .bind(user)
            .persistent(prepared)
            .fetch_optional(db.conn())
            .await?;
    let Some((previous,)) = before else {
        return Ok(None);
    };
    if previous != "queued" && previous != "in_progress" {
        return Ok(find(db, id, user).await?.map(|row| (row, previous)));
    }
    let row: Option<ResponseRow> = sqlx::query_as(&format!(
        "UPDATE responses SET status = 'cancelled', updated_at = now() WHERE id = $1 RETURNING {COLUMNS}"
    ))
    .bind(id)
    .persistent(prepared)
    .fetch_optional(db.conn())
    .await?;
    Ok(row.map(|row| (row, previous)))
}

/// A turn's outcome.
pub struct Outcome<'a> {
    pub status: ResponseStatus,
    pub output: &'a [Item],
    /// The prompt input standing for items of `output`, by item id: a
    /// compaction's window, a provider's item exactly as it was sent.
    pub prompts: &'a [(String, Vec<serde_json::Value>)],
    pub usage: Option<&'a Usage>,
    pub error: Option<&'a serde_json::Value>,
    /// With `ResponseStatus::Incomplete`: why.
    pub incomplete_details: Option<&'a serde_json::Value>,
}

/// How recording a turn's outcome went.
#[derive(Debug)]
pub enum Finished {
    /// Recorded: the response as it now stands.
    Done(Box<ResponseRow>),
    /// The response had ended meanwhile (cancelled while running): nothing
    /// was recorded.
    Ended,
    /// Another worker stored the turn's last step first and runs the turn
    /// now: the caller must roll back and stop.
    Superseded,
}

/// Records a turn's outcome: its last step, when the loop has not stored it
/// yet (one commit fewer per turn than storing it on its own), its output
/// items appended to the conversation, the conversation's prompt settings
/// when this turn is the first to freeze them (`first_frozen`, kept only if
/// nothing froze them meanwhile) and the response row updated; and finds the
/// conversation's next queued turn (none when superseded). One statement,
/// `turnpike_finish_turn`, whose plans the server keeps (its migration says
/// why). Primary only, in the caller's transaction.
#[tracing::instrument(level = "debug", skip(db, outcome, last_step, first_frozen))]
pub async fn finish(
    db: &mut impl DbConn,
    response: &ResponseRow,
    outcome: &Outcome<'_>,
    last_step: Option<&crate::steps::Step>,
    first_frozen: Option<&crate::steps::Frozen>,
) -> Result<(Finished, Option<Uuid>), sqlx::Error> {
    let call = FinishCall::of(outcome, last_step, first_frozen)?;
    let row: Option<(String, Option<Uuid>)> =
        statement::fetch_optional(db, FINISH, &call.args(response)).await?;
    let (status, next) = row.ok_or(sqlx::Error::RowNotFound)?;
    Ok((finished(&status, response, outcome), next))
}

/// [`finish`] as the last statement of `tx`, sent with its commit in one
/// message: the stripes of the user's counts it locks are held for no round
/// trip after it. Whatever the outcome, the transaction commits: a finish
/// that finds the turn ended or superseded writes nothing.
#[tracing::instrument(level = "debug", skip(tx, outcome, last_step, first_frozen))]
pub async fn finish_and_commit(
    tx: crate::db::Writer,
    response: &ResponseRow,
    outcome: &Outcome<'_>,
    last_step: Option<&crate::steps::Step>,
    first_frozen: Option<&crate::steps::Frozen>,
) -> Result<(Finished, Option<Uuid>, crate::db::Lsn), crate::db::DbError> {
    let call = FinishCall::of(outcome, last_step, first_frozen)?;
    let (rows, lsn) = tx
        .commit_after::<(String, Option<Uuid>)>(FINISH, &call.args(response))
        .await?;
    let (status, next) = rows.into_iter().next().ok_or(sqlx::Error::RowNotFound)?;
    Ok((finished(&status, response, outcome), next, lsn))
}

const FINISH: &str = "SELECT outcome, next_queued FROM turnpike_finish_turn($1, $2, $3, $4,
    $5::jsonb, $6::jsonb, $7::jsonb, $8::jsonb,
    $9, $10, $11::jsonb, $12::jsonb, $13::jsonb,
    $14::uuid[], $15::text[], $16::text[]::jsonb[], $17::text[]::jsonb[], $18, $19::jsonb)";

/// The arguments of a `turnpike_finish_turn` call, as text.
struct FinishCall<'a> {
    status: &'a str,
    output: String,
    usage: Option<String>,
    error: Option<String>,
    incomplete: Option<String>,
    step: Option<(i64, &'a str)>,
    step_items: Option<String>,
    step_usage: Option<String>,
    step_prompt: Option<String>,
    items: ItemColumns,
    first_frozen: Option<String>,
}

impl<'a> FinishCall<'a> {
    fn of(
        outcome: &'a Outcome<'_>,
        last_step: Option<&'a crate::steps::Step>,
        first_frozen: Option<&crate::steps::Frozen>,
    ) -> Result<Self, sqlx::Error> {
        let json = |value: Option<&serde_json::Value>| value.map(statement::json).transpose();
        Ok(Self {
            status: outcome.status.as_str(),
            output: statement::json(outcome.output)?,
            usage: outcome.usage.map(statement::json).transpose()?,
            error: json(outcome.error)?,
            incomplete: json(outcome.incomplete_details)?,
            step: last_step.map(|s| (s.index, s.kind.as_str())),
            step_items: last_step.map(|s| statement::json(&s.items)).transpose()?,
            step_usage: last_step
                .and_then(|s| s.usage.as_ref())
                .map(statement::json)
                .transpose()?,
            step_prompt: last_step
                .and_then(|s| s.prompt.as_ref())
                .map(statement::json)
                .transpose()?,
            items: ItemColumns::of(outcome.output, outcome.prompts)?,
            first_frozen: first_frozen.map(statement::json).transpose()?,
        })
    }

    fn args(&self, response: &ResponseRow) -> [Arg<'_>; 19] {
        [
            Arg::from(response.id),
            Arg::from(response.conversation_id),
            Arg::from(response.user_id),
            Arg::from(self.status),
            Arg::from(self.output.as_str()),
            Arg::Text(self.usage.as_deref()),
            Arg::Text(self.error.as_deref()),
            Arg::Text(self.incomplete.as_deref()),
            Arg::Int(self.step.map(|(index, _)| index)),
            Arg::Text(self.step.map(|(_, kind)| kind)),
            Arg::Text(self.step_items.as_deref()),
            Arg::Text(self.step_usage.as_deref()),
            Arg::Text(self.step_prompt.as_deref()),
            Arg::Uuids(&self.items.ids),
            Arg::Texts(&self.items.kinds),
            Arg::Texts(&self.items.bodies),
            Arg::Texts(&self.items.prompts),
            Arg::from(response.input_last_seq + 1),
            Arg::Text(self.first_frozen.as_deref()),
        ]
    }
}

/// What a finish's outcome means for the response.
fn finished(status: &str, response: &ResponseRow, outcome: &Outcome<'_>) -> Finished {
    match status {
        "done" => {
            let mut done = response.clone();
            done.status = outcome.status.as_str().to_owned();
            done.output = SqlJson(outcome.output.to_vec());
            done.usage = outcome.usage.cloned().map(SqlJson);
            done.error = outcome.error.cloned();
            done.incomplete_details = outcome.incomplete_details.cloned();
            Finished::Done(Box::new(done))
        }
        "superseded" => Finished::Superseded,
        _ => Finished::Ended,
    }
}

/// Items as the columns they are stored in, one array per column.
struct ItemColumns {
    ids: Vec<Uuid>,
    kinds: Vec<Option<String>>,
    bodies: Vec<Option<String>>,
    /// The prompt input standing for each item, when that is not the item.
    prompts: Vec<Option<String>>,
}

impl ItemColumns {
    fn of(
        items: &[Item],
        prompts: &[(String, Vec<serde_json::Value>)],
    ) -> Result<Self, sqlx::Error> {
        let mut columns = Self {
            ids: Vec::with_capacity(items.len()),
            kinds: Vec::with_capacity(items.len()),
            bodies: Vec::with_capacity(items.len()),
            prompts: Vec::with_capacity(items.len()),
        };
        for item in items {
            let prompt = prompts.iter().find(|(id, _)| id == item.id());
            columns.ids.push(item_uuid(item));
            columns.kinds.push(Some(kind_of(item).to_owned()));
            columns.bodies.push(Some(statement::json(item)?));
            columns.prompts.push(
                prompt
                    .map(|(_, prompt)| statement::json(prompt))
                    .transpose()?,
            );
        }
        Ok(columns)
    }
}

/// Reserves `n` item seqs in a conversation the user owns, returning the
/// first. Takes the conversation's row lock, which orders concurrent
/// appends. Primary only.
#[tracing::instrument(level = "debug", skip(db))]
pub async fn reserve_seqs(
    db: &mut impl DbConn,
    conversation: Uuid,
    user: Uuid,
    n: usize,
) -> Result<Option<i64>, sqlx::Error> {
    let n = i64::try_from(n).unwrap_or(i64::MAX);
    let last: Option<(i64,)> = statement::fetch_optional(
        db,
        "UPDATE conversations SET last_seq = last_seq + $3, version = version + 1, updated_at = now()
         WHERE id = $1 AND user_id = $2 AND deleted_at IS NULL
         RETURNING last_seq",
        &[Arg::from(conversation), Arg::from(user), Arg::from(n)],
    )
    .await?;
    Ok(last.map(|(last,)| last - n + 1))
}

/// The row id behind an item's public id.
fn item_uuid(item: &Item) -> Uuid {
    ids::parse_item(item.id()).unwrap_or_else(Uuid::now_v7)
}

/// Whether the conversation has a turn created after `response`. Primary
/// (the caller holds the conversation's lock).
#[tracing::instrument(level = "debug", skip(db))]
pub async fn has_later_turn(
    db: &mut impl DbConn,
    conversation: Uuid,
    response: Uuid,
) -> Result<bool, sqlx::Error> {
    let prepared = db.prepared();
    let (later,): (bool,) = sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM responses WHERE conversation_id = $1 AND id > $2)",
    )
    .bind(conversation)
    .bind(response)
    .persistent(prepared)
    .fetch_one(db.conn())
    .await?;
    Ok(later)
}

/// A new conversation holding `conversation`'s items up to and including
/// `response`'s (input and output), with its frozen prompt settings, so a
/// turn continuing from an earlier response sees exactly what that response
/// saw. Primary only, in the caller's transaction.
#[tracing::instrument(level = "debug", skip(db))]
pub async fn fork_after(
    db: &mut impl DbConn,
    conversation: Uuid,
    response: Uuid,
) -> Result<Uuid, sqlx::Error> {
    let prepared = db.prepared();
    let fork = Uuid::now_v7();
    let (upto,): (Option<i64>,) = sqlx::query_as(
        "SELECT max(seq) FROM items WHERE conversation_id = $1 AND response_id = $2",
    )
    .bind(conversation)
    .bind(response)
    .persistent(prepared)
    .fetch_one(db.conn())
    .await?;
    let upto = upto.unwrap_or(0);
    sqlx::query(
        "INSERT INTO conversations (id, user_id, metadata, last_seq, frozen)
         SELECT $1, user_id, '{}', $3, frozen FROM conversations WHERE id = $2",
    )
    .bind(fork)
    .bind(conversation)
    .bind(upto)
    .persistent(prepared)
    .execute(db.conn())
    .await?;
    sqlx::query(
        "INSERT INTO items (conversation_id, seq, id, kind, response_id, body, prompt)
         SELECT $1, seq, id, kind, response_id, body, prompt FROM items
         WHERE conversation_id = $2 AND seq <= $3",
    )
    .bind(fork)
    .bind(conversation)
    .bind(upto)
    .persistent(prepared)
    .execute(db.conn())
    .await?;
    Ok(fork)
}

/// Deletes one response (and its stored steps) of the user's; the items
/// it added stay in its conversation. The caller cancels it first if it is
/// active. Returns whether it existed. Primary only.
#[tracing::instrument(level = "debug", skip(db))]
pub async fn delete(db: &mut impl DbConn, id: Uuid, user: Uuid) -> Result<bool, sqlx::Error> {
    let prepared = db.prepared();
    sqlx::query(
        "DELETE FROM response_steps WHERE response_id = (SELECT id FROM responses WHERE id = $1 AND user_id = $2)",
    )
    .bind(id)
    .bind(user)
    .persistent(prepared)
    .execute(db.conn())
    .await?;
    let deleted = sqlx::query("DELETE FROM responses WHERE id = $1 AND user_id = $2")
        .bind(id)
        .bind(user)
        .persistent(prepared)
        .execute(db.conn())
        .await?;
    Ok(deleted.rows_affected() == 1)
}

/// Removes a conversation and everything in it, for good: what a
/// `store: false` response leaves once it has ended. Primary only, in the
/// caller's transaction.
#[tracing::instrument(level = "debug", skip(db))]
pub async fn purge_conversation(
    db: &mut impl DbConn,
    conversation: Uuid,
) -> Result<(), sqlx::Error> {
    let prepared = db.prepared();
    for sql in [
        "DELETE FROM response_steps WHERE response_id IN (SELECT id FROM responses WHERE conversation_id = $1)",
        "DELETE FROM items WHERE conversation_id = $1",
        "DELETE FROM responses WHERE conversation_id = $1",
        "DELETE FROM conversations WHERE id = $1",
    ] {
        sqlx::query(sql)
            .bind(conversation)
            .persistent(prepared)
            .execute(db.conn())
            .await?;
    }
    Ok(())
}

/// Makes text from a model or a tool storable: PostgreSQL's text and jsonb
/// cannot hold U+0000, so each one becomes the six characters `\u0000`,
/// escaped rather than dropped. Clients, which can be told, get a 400
/// instead (the api refuses such text).
pub fn escape_nul(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::String(text) if text.contains('\0') => {
            *text = text.replace('\0', "\\u0000");
        }
        serde_json::Value::Array(values) => values.iter_mut().for_each(escape_nul),
        serde_json::Value::Object(fields) => fields.values_mut().for_each(escape_nul),
        _ => {}
    }
}

/// The stored `kind` of an item.
pub fn kind_of(item: &Item) -> &str {
    item.kind()
}

/// Inserts items at `first_seq..`. Primary only, in the caller's transaction.
#[tracing::instrument(level = "debug", skip(db, items))]
pub async fn insert_items(
    db: &mut impl DbConn,
    conversation: Uuid,
    first_seq: i64,
    items: &[Item],
    response: Option<Uuid>,
) -> Result<(), sqlx::Error> {
    let columns = ItemColumns::of(items, &[])?;
    let seqs: Vec<i64> = (first_seq..).take(items.len()).collect();
    statement::execute(
        db,
        "INSERT INTO items (conversation_id, seq, id, kind, body, response_id)
         SELECT $1, seq, id, kind, body, $6
         FROM UNNEST($2::int8[], $3::uuid[], $4::text[], $5::text[]::jsonb[])
              AS t (seq, id, kind, body)",
        &[
            Arg::from(conversation),
            Arg::Ints(&seqs),
            Arg::Uuids(&columns.ids),
            Arg::Texts(&columns.kinds),
            Arg::Texts(&columns.bodies),
            Arg::from(response),
        ],
    )
    .await?;
    Ok(())
}

/// One item of a turn's history, with the prompt input that stands for it
/// when that differs from the item (a compaction item's window, a
/// provider's output item as the provider sent it).
#[derive(Debug, Clone)]
pub struct HistoryItem {
    pub item: Item,
    pub prompt: Option<Vec<serde_json::Value>>,
}

/// A conversation's items up to `last_seq`, oldest first, from its latest
/// compaction on (what came before is summed up in its window): a turn's
/// history, bounded by `bounds` (the newest kept). A compaction a client sent (without a window) cuts
/// nothing: the client sent what it keeps beside it.
/// Any node that has replayed the turn's input.
#[tracing::instrument(level = "debug", skip(db))]
pub async fn history(
    db: &mut impl DbConn,
    conversation: Uuid,
    last_seq: i64,
    bounds: HistoryBounds,
) -> Result<Vec<HistoryItem>, sqlx::Error> {
    type Row = (SqlJson<Item>, Option<SqlJson<Vec<serde_json::Value>>>, i64);
    // The newest items that fit the bounds; `total` says whether any were
    // left out. Sizes as stored (pg_column_size reads no value whole):
    // every turn runs this, and a bound needs no exact count.
    let rows: Vec<Row> = statement::fetch_all(
        db,
        "SELECT body, prompt, total FROM (
           SELECT seq, body, prompt, count(*) OVER () AS total,
                  row_number() OVER newest AS newer_items,
                  sum(pg_column_size(body) + coalesce(pg_column_size(prompt), 0)) OVER newest
                    - pg_column_size(body) - coalesce(pg_column_size(prompt), 0) AS newer_bytes
             FROM items WHERE conversation_id = $1 AND seq <= $2
              AND seq >= coalesce((SELECT max(seq) FROM items
                                   WHERE conversation_id = $1 AND seq <= $2 AND kind = 'compaction'
                                     AND prompt IS NOT NULL), 0)
           WINDOW newest AS (ORDER BY seq DESC)) recent
         WHERE newer_items <= $3 AND newer_bytes < $4
         ORDER BY seq",
        &[
            Arg::from(conversation),
            Arg::from(last_seq),
            Arg::from(bounds.items),
            Arg::from(bounds.bytes),
        ],
    )
    .await?;
    let truncated = rows
        .first()
        .is_some_and(|(_, _, total)| usize::try_from(*total).unwrap_or(0) > rows.len());
    let mut history: Vec<HistoryItem> = rows
        .into_iter()
        .map(|(item, prompt, _)| HistoryItem {
            item: item.0,
            prompt: prompt.map(|p| p.0),
        })
        .collect();
    if truncated {
        // Cut at a user message, so the history starts where a turn did
        // (no tool output without its call).
        let start = history
            .iter()
            .position(|h| {
                matches!(
                    &h.item,
                    Item::Message {
                        role: turnpike_protocol::item::Role::User,
                        ..
                    }
                )
            })
            .unwrap_or(0);
        history.drain(..start);
        tracing::warn!(%conversation, kept = history.len(), "history past its bounds; the oldest items are left out of the prompt");
    }
    Ok(history)
}

/// How much of a conversation a turn's history holds at most.
#[derive(Debug, Clone, Copy)]
pub struct HistoryBounds {
    pub items: i64,
    pub bytes: i64,
}

impl HistoryBounds {
    pub fn of(settings: &crate::config::WorkerSettings) -> Self {
        Self {
            items: settings.history_max_items,
            bytes: settings.history_max_bytes,
        }
    }
}
