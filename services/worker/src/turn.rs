//! One turn: start it, then loop (model call, server-side tool calls, model
//! call, … compacting the context when it grows too long) while publishing
//! every event, storing each completed step so a redelivered turn resumes
//! after it; persist the outcome, acknowledge.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use futures_util::FutureExt;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;
use turnpike_core::db::{Consistency, Lsn};
use turnpike_core::kv::KvError;
use turnpike_core::queue::Delivery;
use turnpike_core::steps::{self, Frozen, Step, StepKind};
use turnpike_core::turns::{self, Outcome, ResponseRow};
use turnpike_core::{cache, events, ids, limits, queue};
use turnpike_protocol::ids as prefixes;
use turnpike_protocol::item::{ContentPart, Item, Role};
use turnpike_protocol::response::{ResponseStatus, Usage};
use uuid::Uuid;

use crate::provider::{ModelOutput, Progress, ProviderError};
use crate::tools::{self, CallScope, ServerTool};
use crate::{AbortOnDrop, Context, compact, prompt};
use turnpike_core::tokens;

/// How long the event log of a `store: false` turn is kept after its last
/// event.
const UNSTORED_EVENTS_RETENTION: Duration = Duration::from_secs(60);

/// Runs a delivered turn to its end; never panics the worker.
pub(crate) async fn run(ctx: &Context, delivery: Delivery) {
    let heartbeat = AbortOnDrop(tokio::spawn(heartbeat(
        ctx.kv.clone(),
        ctx.settings.worker.queue.clone(),
        ctx.consumer_name.clone(),
        delivery.entry.clone(),
        Duration::from_millis(ctx.settings.worker.heartbeat_ms),
    )));
    if delivery.deliveries > 1 {
        metrics::counter!("turnpike_turn_redeliveries_total").increment(1);
    }
    let started = std::time::Instant::now();
    // The turn's span continues the trace that queued it.
    let span = tracing::info_span!("turn", response = %delivery.response,
        deliveries = delivery.deliveries, trace_id = tracing::field::Empty);
    turnpike_core::telemetry::continue_trace(&span, delivery.trace.as_deref());
    let result = {
        use tracing::Instrument;
        run_turn(ctx, &delivery).instrument(span).await
    };
    drop(heartbeat);
    metrics::histogram!("turnpike_turn_run_seconds").record(started.elapsed().as_secs_f64());
    match result {
        Ok(()) => {
            if let Err(e) = queue::ack(&ctx.kv, &ctx.settings.worker.queue, &delivery.entry).await {
                tracing::warn!(error = %e, entry = %delivery.entry, "ack failed; the turn may be delivered again");
            }
        }
        // Left unacknowledged: another worker reclaims it after `reclaim_idle_ms`.
        Err(e) => {
            tracing::warn!(error = %e, response = %delivery.response, "turn interrupted; leaving it for redelivery")
        }
    }
}

/// Why a turn stopped without an outcome (it will be redelivered).
#[derive(Debug, thiserror::Error)]
enum TurnError {
    #[error(transparent)]
    Db(#[from] turnpike_core::db::DbError),
    #[error(transparent)]
    Query(#[from] sqlx::Error),
    /// Another worker stored this turn's next step first: it runs the turn now.
    #[error("another worker has taken the turn over")]
    Superseded,
}

async fn heartbeat(
    kv: turnpike_core::kv::Kv,
    stream: String,
    consumer: String,
    entry: String,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tick.tick().await;
        if let Err(e) = queue::heartbeat(&kv, &stream, &consumer, &entry).await {
            tracing::warn!(error = %e, "heartbeat failed");
        }
    }
}

async fn run_turn(ctx: &Context, delivery: &Delivery) -> Result<(), TurnError> {
    let Some(id) = ids::parse(prefixes::RESPONSE, &delivery.response) else {
        tracing::warn!(response = %delivery.response, "queue entry names no response; dropping it");
        return Ok(());
    };
    // Listed before the start's transaction, which locks the conversation:
    // a slow MCP server must not hold that lock.
    let mcp_tools = mcp_tools(ctx, id, delivery.lsn).await?;
    let bounds = turns::HistoryBounds::of(&ctx.settings.worker);
    // What the start does not decide is read while it runs: the event log's
    // end and, for a first delivery whose entry says where its input ends,
    // the user's tokens today and the history (a start that appends to the
    // conversation has the history read again). The history may take longer
    // than the start, and the turn announces itself without waiting for it.
    let early = delivery.input.filter(|_| delivery.deliveries == 1);
    let mut early_history = std::pin::pin!(futures_util::future::maybe_done(async {
        let input = early?;
        Some(
            read_history(
                ctx,
                input.conversation,
                input.last_seq,
                delivery.lsn,
                bounds,
            )
            .await,
        )
    }));
    let started = std::pin::pin!(async {
        tokio::join!(
            begin(ctx, delivery, id, &mcp_tools),
            events::last_sequence(&ctx.kv, &delivery.response),
            async { tokens_today(ctx, early?.user).await },
        )
    });
    let (begun, logged, early_tokens) =
        match futures_util::future::select(started, early_history.as_mut()).await {
            futures_util::future::Either::Left((started, _)) => started,
            futures_util::future::Either::Right(((), started)) => started.await,
        };
    let Some(Begun {
        row,
        first_frozen,
        frozen,
        done,
        lsn,
        rewritten,
    }) = begun?
    else {
        return Ok(());
    };

    // How long the turn waited, created to started (first delivery only).
    if delivery.deliveries == 1 {
        let waited = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            .saturating_sub(u64::try_from(row.created_at).unwrap_or(0));
        metrics::histogram!("turnpike_turn_queue_wait_seconds").record(waited as f64);
    }
    let cancelled = ctx.cancels.register(&delivery.response);
    let logged = logged.ok().flatten();
    let first_seq = logged.map_or(0, |s| s + 1);
    // A `store: false` turn's events outlive it only long enough for a
    // client that lost its connection at the end to resume.
    let mut retention = Duration::from_millis(ctx.settings.events.retention_ms);
    if row.request.0.store == Some(false) {
        retention = retention.min(UNSTORED_EVENTS_RETENTION);
    }
    let (emitter, events_tx) = Emitter::start(ctx, delivery.response.clone(), first_seq, retention);

    if delivery.deliveries > ctx.settings.worker.max_deliveries {
        let error = json!({"code": "server_error",
            "message": format!("too_many_deliveries: the turn was interrupted {} times and will not be retried.", delivery.deliveries - 1)});
        return fail(
            ctx,
            &row,
            emitter,
            events_tx,
            &error,
            None,
            first_frozen.as_ref(),
        )
        .await;
    }

    let snapshot = serde_json::to_value(row.to_api()).unwrap_or(Value::Null);
    if logged.is_none() {
        events_tx.send(json!({"type": "response.created", "response": snapshot}));
    }
    events_tx.send(json!({"type": "response.in_progress", "response": snapshot}));

    let read_early = early.is_some_and(|input| {
        !rewritten
            && input.conversation == row.conversation_id
            && input.last_seq == row.input_last_seq
    });
    let early_history = if read_early {
        early_history.as_mut().await;
        early_history.as_mut().take_output().flatten()
    } else {
        // Not needed: dropped now, with the read's slot in its node's budget.
        early_history.set(futures_util::future::MaybeDone::Gone);
        None
    };
    let history = match early_history {
        Some(Ok(history)) => history,
        // Read again where a replica has what the start appended, or
        // elsewhere after a failed early read.
        _ => read_history(ctx, row.conversation_id, row.input_last_seq, lsn, bounds).await?,
    };

    let mut turn = Loop::new(
        ctx,
        &row,
        &mcp_tools,
        frozen,
        prompt::window_of(&history),
        events_tx.clone(),
        lsn,
    );
    if early.is_some_and(|input| input.user == row.user_id) {
        turn.tokens_read = early_tokens;
    }
    for step in done {
        turn.apply(step);
    }
    if logged.is_some() {
        turn.take_over(&delivery.response).await;
    }
    // A cancellation drops the loop at once: the model stream and running
    // tools stop with it, and `finish` finds the turn cancelled.
    let result = tokio::select! {
        result = turn.run() => Some(result),
        () = cancelled.notified() => None,
    };
    ctx.cancels.forget(&delivery.response);
    // An answer's last step is stored with the outcome, in one transaction.
    // A failed or cancelled turn keeps no output: its last step is not
    // stored (the response may be gone), only its tokens counted; an
    // interrupted one leaves it to the redelivery.
    let last_step = match &result {
        Some(Ok(())) => turn.pending.take(),
        Some(Err(LoopError::Turn(_))) => None,
        _ => {
            if let Some(Pending { step, .. }) = turn.pending.take() {
                record_usage(ctx, row.user_id, step.usage.as_ref()).await;
            }
            None
        }
    };
    // The loop's event sender goes with it: `finish` waits for the emitter,
    // which ends once every sender is gone.
    let Loop {
        output,
        prompts,
        usage,
        events,
        incomplete,
        ..
    } = turn;
    drop(events);
    let error = match result {
        Some(Ok(())) => {
            let (status, terminal) = match incomplete {
                Some(_) => (ResponseStatus::Incomplete, "response.incomplete"),
                None => (ResponseStatus::Completed, "response.completed"),
            };
            let outcome = Outcome {
                status,
                output: &output,
                prompts: &prompts,
                usage: usage.as_ref(),
                error: None,
                incomplete_details: incomplete.as_ref(),
            };
            let ending = Ending {
                outcome: &outcome,
                terminal,
                last_step,
                first_frozen: first_frozen.as_ref(),
            };
            return finish(ctx, &row, emitter, events_tx, ending).await;
        }
        Some(Err(LoopError::Turn(e))) => return Err(e),
        None => json!({"code": "cancelled", "message": "The response was cancelled."}),
        Some(Err(LoopError::Provider(e))) => {
            json!({"code": e.code(), "message": e.to_string()})
        }
        Some(Err(LoopError::TooManySteps(n))) => json!({"code": "server_error",
            "message": format!("max_steps_exceeded: the turn made {n} model calls without reaching an answer (worker.max_steps).")}),
        Some(Err(LoopError::BudgetExhausted)) => json!({"code": "token_budget_exhausted",
            "message": "The daily token budget (limits.daily_tokens_per_user) is spent; the turn stopped before its next model call."}),
    };
    let (usage, first_frozen) = (usage.as_ref(), first_frozen.as_ref());
    fail(ctx, &row, emitter, events_tx, &error, usage, first_frozen).await
}

/// A started turn, as [`begin`] leaves it.
struct Begun {
    row: ResponseRow,
    /// The prompt settings a conversation's first turn froze, stored by its
    /// finish.
    first_frozen: Option<Frozen>,
    frozen: Frozen,
    /// The steps an interrupted run of the turn stored.
    done: Vec<Step>,
    /// Where a replica has the turn's input.
    lsn: Lsn,
    /// The start added to the conversation (pending input, a note).
    rewritten: bool,
}

/// Starts a delivered turn: moves it to `in_progress`, appends its pending
/// input and a note of changed prompt settings. `None` when there is
/// nothing to run (the conversation's next queued turn, if any, is
/// dispatched).
///
/// A first delivery whose queue entry says where its input ends (its input
/// is in the conversation: it did not wait behind another turn) starts in
/// one statement that is a transaction of its own: one round trip to the
/// primary instead of three (`BEGIN`, the start, `COMMIT`). Most such turns
/// write nothing else; one that does (prompt settings that changed) has
/// it written by the transaction below, which takes the turn over as a
/// redelivery would if its worker died in between. A turn that ended in
/// between (cancelled, deleted, interrupted) runs as one that ended just
/// after its start always has: its finish finds it ended, and dispatches
/// the conversation's next turn.
async fn begin(
    ctx: &Context,
    delivery: &Delivery,
    id: Uuid,
    mcp_tools: &[Value],
) -> Result<Option<Begun>, TurnError> {
    let mut take_over = delivery.deliveries > 1;
    let mut started_alone = None;
    if !take_over
        && delivery.input.is_some()
        && let Some(started) = start_alone(ctx, id).await?
    {
        let settled = Settled::of(started.frozen, &started.row, mcp_tools);
        let begun = Begun {
            row: started.row,
            first_frozen: settled.first_frozen,
            frozen: settled.frozen,
            done: Vec::new(),
            lsn: delivery.lsn,
            rewritten: false,
        };
        if begun.row.pending_input.is_none() && settled.changed.is_none() {
            return Ok(Some(begun));
        }
        started_alone = Some(begun);
        take_over = true;
    }
    let mut tx = ctx.router.write().await?;
    let started = turns::start(&mut tx, id, take_over).await?;
    let Some(turns::Started {
        mut row,
        appended,
        frozen: before,
    }) = started
    else {
        if let Some(begun) = started_alone {
            // Ended since its start: it runs to its finish, as before.
            drop(tx);
            return Ok(Some(begun));
        }
        // Cancelled before it started, finished already, or a duplicate
        // delivery of a running turn: nothing to run. A cancelled turn's
        // successor may be waiting.
        let conversation = turns::find_any(&mut tx, id)
            .await?
            .map(|r| r.conversation_id);
        let next = match conversation {
            Some(conversation) => {
                turns::lock_conversation(&mut tx, conversation).await?;
                turns::next_queued(&mut tx, conversation).await?
            }
            None => None,
        };
        let lsn = tx.commit().await?;
        dispatch(ctx, next, lsn).await;
        return Ok(None);
    };
    let Settled {
        first_frozen,
        changed: refrozen,
        note,
        frozen,
    } = Settled::of(before, &row, mcp_tools);
    if let Some(changed) = &refrozen {
        steps::freeze(&mut tx, row.conversation_id, changed).await?;
    }
    if let Some(note) = &note
        && let Some(seq) = turns::reserve_seqs(&mut tx, row.conversation_id, row.user_id, 1).await?
    {
        let item = Item::Message {
            id: ids::encode(prefixes::MESSAGE, Uuid::now_v7()),
            status: "completed".into(),
            role: Role::Developer,
            content: vec![ContentPart::InputText { text: note.clone() }],
            extra: Default::default(),
        };
        turns::insert_items(&mut tx, row.conversation_id, seq, &[item], Some(row.id)).await?;
        turns::extend_input(&mut tx, row.id, seq).await?;
        row.input_last_seq = seq;
    }
    let done = if delivery.deliveries > 1 {
        steps::load(&mut tx, row.id).await?
    } else {
        Vec::new()
    };
    let start_lsn = tx.commit().await?;
    // History is read on a replica that has replayed the turn's input,
    // including anything this start appended.
    let rewritten = appended || note.is_some();
    let lsn = if rewritten {
        changed(ctx, row.conversation_id, start_lsn).await;
        start_lsn
    } else {
        delivery.lsn
    };
    Ok(Some(Begun {
        row,
        first_frozen,
        frozen,
        done,
        lsn,
        rewritten,
    }))
}

/// [`turns::start_alone`] on a connection of its own, bounded as the
/// transaction it stands for is (`database.statement_timeout_ms`).
async fn start_alone(ctx: &Context, id: Uuid) -> Result<Option<turns::Started>, TurnError> {
    let limit = Duration::from_millis(ctx.settings.database.statement_timeout_ms);
    let mut db = ctx.router.write_one_message().await?;
    // Out of time, the statement may still have started the turn: left
    // unacknowledged, it is redelivered and taken over.
    let started = tokio::time::timeout(limit, turns::start_alone(&mut db, id, false))
        .await
        .map_err(|_elapsed| turnpike_core::db::DbError::PrimaryUnavailable)??;
    db.done();
    Ok(started)
}

/// A turn's prompt settings against the conversation's frozen ones, which
/// are frozen at its first turn; what a later turn changes is told to the
/// model in a developer message that joins the turn's input.
struct Settled {
    /// A first turn's settings, stored by its finish (the migration of the
    /// turn functions says why).
    first_frozen: Option<Frozen>,
    /// A later turn's change, stored by its start with the note that
    /// announces it.
    changed: Option<Frozen>,
    note: Option<String>,
    /// What the turn's prompt is built from.
    frozen: Frozen,
}

impl Settled {
    fn of(before: Option<Frozen>, row: &ResponseRow, mcp_tools: &[Value]) -> Self {
        let request = &row.request.0;
        let (refrozen, note) = prompt::refreeze(
            before.clone(),
            request.instructions.as_deref(),
            &request.tools,
            mcp_tools,
        );
        let (first_frozen, changed) = match (&before, &refrozen) {
            (None, first) => (first.clone(), None),
            (Some(_), changed) => (None, changed.clone()),
        };
        Self {
            first_frozen,
            changed,
            note,
            frozen: refrozen.or(before).unwrap_or_default(),
        }
    }
}

/// The history of a turn whose input ends at `last_seq`, from a replica
/// that has replayed `lsn`.
async fn read_history(
    ctx: &Context,
    conversation: Uuid,
    last_seq: i64,
    lsn: Lsn,
    bounds: turns::HistoryBounds,
) -> Result<Vec<turns::HistoryItem>, TurnError> {
    Ok(ctx
        .router
        .read_one_message(Consistency::Session(Some(lsn)), move |db| {
            Box::pin(async move { turns::history(db, conversation, last_seq, bounds).await })
        })
        .await?)
}

/// The user's tokens counted today, when a daily budget is set.
async fn tokens_today(ctx: &Context, user: Uuid) -> Option<Result<u64, KvError>> {
    if ctx.settings.limits.daily_tokens_per_user == 0 {
        return None;
    }
    Some(limits::tokens_today(&ctx.kv, user, std::time::SystemTime::now()).await)
}

/// The function definitions of the MCP tools the turn's request offers.
/// Only read when MCP servers are configured (the api refuses `mcp` tools
/// otherwise), so other deployments pay nothing for it; a request's tools
/// never change, so a replica that has the response serves.
async fn mcp_tools(ctx: &Context, id: Uuid, lsn: Lsn) -> Result<Vec<Value>, TurnError> {
    if ctx.settings.tools.mcp_servers.is_empty() {
        return Ok(Vec::new());
    }
    let row = ctx
        .router
        .read(Consistency::Session(Some(lsn)), move |db| {
            Box::pin(async move { turns::find_any(db, id).await })
        })
        .await?;
    let Some(row) = row else {
        return Ok(Vec::new());
    };
    Ok(ctx
        .mcp
        .definitions(&ctx.settings.tools, &row.request.0.tools)
        .await)
}

/// Why the loop stopped without an answer.
#[derive(Debug, thiserror::Error)]
enum LoopError {
    /// The model failed and retries ran out: the turn fails.
    #[error(transparent)]
    Provider(#[from] ProviderError),
    /// `worker.max_steps` model calls without an answer: the turn fails.
    #[error("too many steps ({0})")]
    TooManySteps(u32),
    /// The user's daily token budget is spent: the turn fails before its
    /// next model call.
    #[error("token budget exhausted")]
    BudgetExhausted,
    /// Postgres failed, or another worker took the turn over: left for redelivery.
    #[error(transparent)]
    Turn(#[from] TurnError),
}

impl From<turnpike_core::db::DbError> for LoopError {
    fn from(e: turnpike_core::db::DbError) -> Self {
        Self::Turn(e.into())
    }
}

impl From<sqlx::Error> for LoopError {
    fn from(e: sqlx::Error) -> Self {
        Self::Turn(e.into())
    }
}

/// A function call in the model's output, and who answers it.
#[derive(Clone)]
enum Call {
    /// A server-side tool this turn offers: the worker runs it.
    Server(ServerTool, String, String),
    /// An MCP tool this turn offers (call id, `<label>__<tool>`, arguments):
    /// the worker calls its server.
    Mcp(String, String, String),
    /// A client-side function this turn offers: the turn ends with it.
    Client,
    /// A tool this turn does not offer: answered with an error at once.
    Unavailable(String, String),
    /// A server-side call past the request's `max_tool_calls`: answered
    /// with an error, not run.
    Refused(String),
}

/// The agent loop of one turn: model call, tool calls, model call, … until
/// an answer, compacting the context when it grows past its threshold.
/// Every completed step is stored before the loop acts on it (the next
/// model call, tool run or compaction); the last one with the turn's
/// outcome, in the finish's transaction.
struct Loop<'a> {
    ctx: &'a Context,
    row: &'a ResponseRow,
    frozen: Frozen,
    /// Tool names this turn offers.
    offered: BTreeSet<String>,
    /// The offered names that are MCP tools.
    mcp_offered: BTreeSet<String>,
    /// The prompt input so far.
    window: Vec<Value>,
    /// The response's output so far.
    output: Vec<Item>,
    /// Compaction windows by compaction item id.
    prompts: Vec<(String, Vec<Value>)>,
    usage: Option<Usage>,
    next_step: i64,
    model_calls: u32,
    last: Option<StepKind>,
    /// Where the latest model step's items start in `output`.
    last_model_from: usize,
    /// Prompt tokens the provider measured, and the window length they cover.
    measured: Option<(u64, usize)>,
    events: Events,
    lsn: Lsn,
    /// Set when the model ended its answer `incomplete`: the turn ends so.
    incomplete: Option<Value>,
    /// Server-side tool calls answered so far (`max_tool_calls` bounds them).
    tool_calls: u32,
    /// Events an interrupted worker sent of the model call this one redoes.
    resumed: Vec<Value>,
    /// The step taken in last, while it is not stored yet.
    pending: Option<Pending>,
    /// The user's tokens today, read while the turn started: the first
    /// budget check's answer.
    tokens_read: Option<Result<u64, KvError>>,
}

/// A step the loop has taken in but not stored, with the events that
/// announce its items: clients see an item done only once it is stored.
struct Pending {
    step: Step,
    announce: Vec<Value>,
}

impl<'a> Loop<'a> {
    fn new(
        ctx: &'a Context,
        row: &'a ResponseRow,
        mcp_tools: &[Value],
        frozen: Frozen,
        window: Vec<Value>,
        events: Events,
        lsn: Lsn,
    ) -> Self {
        // Functions inside a client's `namespace` tools are offered too.
        let offered = prompt::model_tools(&row.request.0.tools, mcp_tools)
            .iter()
            .flat_map(|t| {
                let nested = t.get("tools").and_then(Value::as_array);
                std::iter::once(t).chain(nested.into_iter().flatten())
            })
            .map(|t| prompt::tool_name(t).to_owned())
            .collect();
        let mcp_offered = mcp_tools
            .iter()
            .map(|t| prompt::tool_name(t).to_owned())
            .collect();
        Self {
            ctx,
            row,
            frozen,
            offered,
            mcp_offered,
            window,
            output: Vec::new(),
            prompts: Vec::new(),
            usage: None,
            next_step: 0,
            model_calls: 0,
            last: None,
            last_model_from: 0,
            measured: None,
            events,
            lsn,
            incomplete: None,
            tool_calls: 0,
            resumed: Vec::new(),
            pending: None,
            tokens_read: None,
        }
    }

    /// Picks up from what an interrupted worker sent clients: the stored
    /// output's items it did not announce done are announced now, and the
    /// events of the model call it was running are taken in, so that call,
    /// run again, repeats none of them.
    async fn take_over(&mut self, response: &str) {
        let logged = match events::read_after(&self.ctx.kv, response, None).await {
            Ok(logged) => logged,
            Err(e) => {
                tracing::warn!(error = %e, response, "could not read the interrupted turn's events");
                return;
            }
        };
        let logged: Vec<Value> = logged
            .iter()
            .filter_map(|(_, data)| serde_json::from_str(data).ok())
            .collect();
        let stored = self.output.len() as u64;
        let announced: BTreeSet<u64> = logged
            .iter()
            .filter(|e| e["type"] == "response.output_item.done")
            .filter_map(|e| e["output_index"].as_u64())
            .collect();
        for (index, item) in (0..stored).zip(&self.output) {
            if !announced.contains(&index) {
                self.emit(done_event(index, item));
            }
        }
        self.resumed = logged
            .into_iter()
            .filter(|e| e["output_index"].as_u64().is_some_and(|i| i >= stored))
            .collect();
    }

    /// Takes a completed step into the loop's state.
    fn apply(&mut self, step: Step) {
        match step.kind {
            StepKind::Compaction => {
                let window = step.prompt.clone().unwrap_or_default();
                if let Some(item) = step
                    .items
                    .iter()
                    .find(|item| matches!(item, Item::Compaction { .. }))
                {
                    self.prompts.push((item.id().to_owned(), window.clone()));
                }
                self.window = window;
                self.measured = None;
            }
            StepKind::Model => {
                self.last_model_from = self.output.len();
                // The provider's items go back to it as it sent them.
                match &step.prompt {
                    Some(raw) if raw.len() == step.items.len() => {
                        self.window.extend(raw.iter().cloned());
                        for (item, raw) in step.items.iter().zip(raw) {
                            self.prompts.push((item.id().to_owned(), vec![raw.clone()]));
                        }
                    }
                    _ => self
                        .window
                        .extend(step.items.iter().filter_map(prompt::input_of)),
                }
                self.model_calls += 1;
                self.measured = step
                    .usage
                    .as_ref()
                    .map(|u| (u.input_tokens + u.output_tokens, self.window.len()));
            }
            StepKind::Tools => {
                self.window
                    .extend(step.items.iter().filter_map(prompt::input_of));
                self.tool_calls = self
                    .tool_calls
                    .saturating_add(u32::try_from(step.items.len()).unwrap_or(u32::MAX));
            }
        }
        if let Some(usage) = &step.usage {
            self.usage.get_or_insert_with(Usage::default).add(usage);
        }
        self.output.extend(step.items);
        self.next_step = step.index + 1;
        self.last = Some(step.kind);
    }

    /// Takes a completed step in; it is stored before the loop acts on it
    /// (`store_pending`), or with the turn's outcome when it is the last.
    async fn commit(&mut self, step: Step, announce: Vec<Value>) -> Result<(), LoopError> {
        self.store_pending().await?;
        self.apply(step.clone());
        self.pending = Some(Pending { step, announce });
        Ok(())
    }

    /// Stores the step taken in last, if it is not stored yet, then
    /// announces its items. A step already stored means another worker
    /// runs this turn now: stop without touching anything.
    async fn store_pending(&mut self) -> Result<(), TurnError> {
        let Some(Pending { step, announce }) = self.pending.take() else {
            return Ok(());
        };
        self.events.logged().await;
        if !store_step(self.ctx, self.row, &step).await? {
            return Err(TurnError::Superseded);
        }
        announce.into_iter().for_each(|event| self.emit(event));
        Ok(())
    }

    async fn run(&mut self) -> Result<(), LoopError> {
        // A compaction asked for by the client is the turn's only step.
        if self.row.request.0.compact {
            if self.last.is_none() {
                self.check_budget().await?;
                self.compact_only().await?;
            }
            return Ok(());
        }
        loop {
            if self.last == Some(StepKind::Model) {
                if self.incomplete.is_some() {
                    return Ok(());
                }
                let calls = self.calls_to_answer();
                if calls.iter().any(|c| !matches!(c, Call::Client)) {
                    self.run_tools(&calls).await?;
                }
                // The client answers its own calls in a new response.
                if calls.is_empty() || calls.iter().any(|c| matches!(c, Call::Client)) {
                    return Ok(());
                }
                continue;
            }
            if self.model_calls >= self.ctx.settings.worker.max_steps {
                return Err(LoopError::TooManySteps(self.model_calls));
            }
            self.check_budget().await?;
            if self.last != Some(StepKind::Compaction) && self.over_threshold().await {
                self.compact().await?;
                continue;
            }
            self.call_model().await?;
        }
    }

    /// The calls of the latest model step: function calls, and the other
    /// call kinds a client executes (custom, shell, patch calls), which end
    /// the turn like a client's function call.
    fn calls_to_answer(&self) -> Vec<Call> {
        self.output[self.last_model_from..]
            .iter()
            .filter_map(|item| match item {
                Item::FunctionCall {
                    call_id,
                    name,
                    arguments,
                    ..
                } => Some(match ServerTool::from_call(name) {
                    Some(tool) if self.offered.contains(name) => {
                        Call::Server(tool, call_id.clone(), arguments.clone())
                    }
                    None if self.mcp_offered.contains(name) => {
                        Call::Mcp(call_id.clone(), name.clone(), arguments.clone())
                    }
                    _ if self.offered.contains(name) || item_namespace(item).is_some() => {
                        Call::Client
                    }
                    _ => Call::Unavailable(call_id.clone(), name.clone()),
                }),
                other => other.client_call_id().map(|_| Call::Client),
            })
            .collect()
    }

    /// Refuses the next model call once the user's daily token budget is
    /// spent (turns already running included). When Redis cannot say, the
    /// call goes ahead: a running turn is not failed for a cache outage.
    async fn check_budget(&mut self) -> Result<(), LoopError> {
        let budget = self.ctx.settings.limits.daily_tokens_per_user;
        let read = match self.tokens_read.take() {
            Some(read) => Some(read),
            None => tokens_today(self.ctx, self.row.user_id).await,
        };
        match read {
            None => Ok(()),
            Some(Ok(used)) if used >= budget => Err(LoopError::BudgetExhausted),
            Some(Ok(_)) => Ok(()),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "could not read the token budget; the model call goes ahead");
                Ok(())
            }
        }
    }

    fn threshold(&self) -> u64 {
        prompt::compact_threshold(self.row).unwrap_or_else(|| {
            let model = &self.ctx.settings.model;
            model.context_window_tokens * model.auto_compact_percent / 100
        })
    }

    /// Whether the next prompt passes the compaction threshold: the
    /// provider's measure of the prompt so far plus an estimate of what was
    /// appended since, or an estimate of the whole. A token covers at least
    /// one byte, so a prompt with fewer bytes than the threshold is under it
    /// without tokenizing; a long one is tokenized off the async threads.
    async fn over_threshold(&self) -> bool {
        if self.window.len() < 2 {
            return false;
        }
        let threshold = self.threshold();
        let (measured, pending): (u64, Vec<Value>) = match self.measured {
            Some((measured, covered)) => (
                measured,
                self.window.get(covered..).unwrap_or_default().to_vec(),
            ),
            None => {
                let mut whole: Vec<Value> = self
                    .frozen
                    .instructions
                    .iter()
                    .map(|text| Value::String(text.clone()))
                    .collect();
                whole.extend(self.frozen.tools.iter().cloned());
                whole.extend(self.window.iter().cloned());
                (0, whole)
            }
        };
        let texts: Vec<String> = pending.iter().map(Value::to_string).collect();
        let bytes: u64 = texts.iter().map(|t| t.len() as u64).sum();
        if measured + bytes <= threshold {
            return false;
        }
        let counted = tokio::task::spawn_blocking(move || {
            texts.iter().map(|t| tokens::count_text(t)).sum::<u64>()
        })
        .await
        .unwrap_or(bytes);
        measured + counted > threshold
    }

    fn request(&self) -> Value {
        prompt::request(
            self.row,
            &self.frozen,
            &self.ctx.settings.model,
            &self.window,
        )
    }

    fn emit(&self, event: Value) {
        self.events.send(event);
    }

    async fn compact(&mut self) -> Result<(), LoopError> {
        self.store_pending().await?;
        metrics::counter!("turnpike_compactions_total").increment(1);
        let index = self.output.len();
        self.emit(json!({"type": "response.compaction.compacting", "output_index": index}));
        let compaction = compact::compact(self.ctx, &self.request()).await?;
        let item_json = serde_json::to_value(&compaction.item).unwrap_or(Value::Null);
        let step = Step {
            index: self.next_step,
            kind: StepKind::Compaction,
            items: vec![compaction.item],
            usage: compaction.usage,
            prompt: Some(compaction.window),
        };
        let announce = vec![
            json!({"type": "response.output_item.added", "output_index": index, "item": item_json}),
            json!({"type": "response.output_item.done", "output_index": index, "item": item_json}),
        ];
        self.commit(step, announce).await
    }

    /// `POST /v1/responses/compact`: the output is the compacted window as
    /// a client sends it back, the user messages kept and then the
    /// compaction item.
    async fn compact_only(&mut self) -> Result<(), LoopError> {
        self.store_pending().await?;
        self.emit(json!({"type": "response.compaction.compacting", "output_index": 0}));
        let compaction = compact::compact(self.ctx, &self.request()).await?;
        let mut items: Vec<Item> = compaction
            .kept
            .iter()
            .map(|raw| stored_item(raw, Uuid::now_v7()))
            .collect();
        items.push(compaction.item);
        let announce = items
            .iter()
            .enumerate()
            .flat_map(|(index, item)| {
                let item = serde_json::to_value(item).unwrap_or(Value::Null);
                [
                    json!({"type": "response.output_item.added", "output_index": index, "item": item}),
                    json!({"type": "response.output_item.done", "output_index": index, "item": item}),
                ]
            })
            .collect();
        let step = Step {
            index: self.next_step,
            kind: StepKind::Compaction,
            items,
            usage: compaction.usage,
            prompt: Some(compaction.window),
        };
        self.commit(step, announce).await
    }

    async fn call_model(&mut self) -> Result<(), LoopError> {
        self.store_pending().await?;
        let request = self.request();
        let offset = self.output.len() as u64;
        let include_obfuscation = self.row.request.0.include_obfuscation != Some(false);
        let mut relay = Relay::new(&self.events, offset, include_obfuscation);
        relay.resume(&std::mem::take(&mut self.resumed));
        let started = std::time::Instant::now();
        let mut first = None;
        let span = tracing::info_span!("model call", model = %self.row.model,
            input_tokens = tracing::field::Empty, cached_tokens = tracing::field::Empty,
            output_tokens = tracing::field::Empty);
        let output = {
            use tracing::Instrument;
            self.ctx
                .provider
                .stream(&request, |progress| {
                    if first.is_none() && matches!(progress, Progress::Event { .. }) {
                        first = Some(started.elapsed());
                    }
                    relay.forward(progress);
                })
                .instrument(span.clone())
                .await
        };
        if let Ok(usage) = &output
            && let Some(usage) = usage.usage.as_ref()
        {
            for (field, pointer) in [
                ("input_tokens", "/input_tokens"),
                ("cached_tokens", "/input_tokens_details/cached_tokens"),
                ("output_tokens", "/output_tokens"),
            ] {
                if let Some(n) = usage.pointer(pointer).and_then(Value::as_u64) {
                    span.record(field, n);
                }
            }
        }
        let outcome = if output.is_ok() { "ok" } else { "error" };
        metrics::counter!("turnpike_model_calls_total", "outcome" => outcome).increment(1);
        metrics::histogram!("turnpike_model_call_seconds").record(started.elapsed().as_secs_f64());
        if let Some(first) = first {
            metrics::histogram!("turnpike_model_first_event_seconds").record(first.as_secs_f64());
        }
        let output = output?;
        let mut output = output;
        output.items.iter_mut().for_each(turns::escape_nul);
        let items = to_items(&output, &relay.item_ids);
        self.incomplete = output.incomplete;
        let usage: Option<Usage> = output.usage.and_then(|u| serde_json::from_value(u).ok());
        let announce = (offset..)
            .zip(&items)
            .map(|(index, item)| done_event(index, item))
            .collect();
        let step = Step {
            index: self.next_step,
            kind: StepKind::Model,
            items,
            usage,
            prompt: Some(output.items),
        };
        self.commit(step, announce).await
    }

    /// Runs the step's server-side calls at once (each bounded in time) and
    /// records every answer in call order; calls of tools the turn does not
    /// offer get an error answer.
    async fn run_tools(&mut self, calls: &[Call]) -> Result<(), LoopError> {
        self.store_pending().await?;
        let scope = CallScope {
            router: &self.ctx.router,
            conversation: self.row.conversation_id,
            before_seq: self.row.input_first_seq,
            lsn: self.lsn,
        };
        let settings = &self.ctx.settings.tools;
        let mcp = &self.ctx.mcp;
        // Calls past the request's `max_tool_calls` are answered, not run.
        let mut budget = self
            .row
            .request
            .0
            .max_tool_calls
            .map(|max| max.saturating_sub(self.tool_calls));
        let calls: Vec<Call> = calls
            .iter()
            .map(|call| match (call, budget.as_mut()) {
                (Call::Server(_, call_id, _) | Call::Mcp(call_id, _, _), Some(0)) => {
                    Call::Refused(call_id.clone())
                }
                (Call::Server(..) | Call::Mcp(..), Some(left)) => {
                    *left -= 1;
                    call.clone()
                }
                _ => call.clone(),
            })
            .collect();
        for call in &calls {
            let (tool, outcome) = match call {
                Call::Server(tool, ..) => (tool.name(), "ran"),
                Call::Mcp(..) => ("mcp", "ran"),
                Call::Refused(..) => ("-", "refused"),
                Call::Unavailable(..) => ("-", "unavailable"),
                Call::Client => continue,
            };
            metrics::counter!("turnpike_tool_calls_total", "tool" => tool, "outcome" => outcome)
                .increment(1);
        }
        let runs = calls.iter().filter_map(|call| match call {
            Call::Server(tool, call_id, arguments) => {
                let scope = &scope;
                let span = tracing::info_span!("tool call", tool = tool.name());
                Some(
                    async move {
                        (
                            call_id.clone(),
                            tools::run(settings, *tool, arguments, scope).await,
                        )
                    }
                    .instrument(span)
                    .boxed(),
                )
            }
            Call::Mcp(call_id, name, arguments) => {
                let span = tracing::info_span!("tool call", tool = %name);
                Some(
                    async move {
                        let call = mcp.call(settings, name, arguments);
                        (call_id.clone(), tools::bounded(settings, name, call).await)
                    }
                    .instrument(span)
                    .boxed(),
                )
            }
            Call::Refused(call_id) => {
                let output =
                    json!({"error": "max_tool_calls reached: this call was not run"}).to_string();
                Some(std::future::ready((call_id.clone(), output)).boxed())
            }
            Call::Unavailable(call_id, name) => {
                let output =
                    json!({"error": format!("the tool {name} is not available in this response")})
                        .to_string();
                Some(std::future::ready((call_id.clone(), output)).boxed())
            }
            Call::Client => None,
        });
        let answers = futures_util::future::join_all(runs).await;
        let items: Vec<Item> = answers
            .into_iter()
            .map(|(call_id, output)| Item::FunctionCallOutput {
                id: ids::encode(prefixes::FUNCTION_CALL_OUTPUT, Uuid::now_v7()),
                status: "completed".into(),
                call_id,
                // Tools may answer with text PostgreSQL cannot store.
                output: output.replace('\0', "\\u0000").into(),
            })
            .collect();
        let offset = self.output.len() as u64;
        let announce = (offset..)
            .zip(&items)
            .flat_map(|(index, item)| {
                let value = serde_json::to_value(item).unwrap_or(Value::Null);
                [
                    json!({"type": "response.output_item.added", "output_index": index, "item": value}),
                    json!({"type": "response.output_item.done", "output_index": index, "item": value}),
                ]
            })
            .collect();
        let step = Step {
            index: self.next_step,
            kind: StepKind::Tools,
            items,
            usage: None,
            prompt: None,
        };
        self.commit(step, announce).await
    }
}

/// The namespace a function call names (a function inside a `namespace`
/// tool the client offered), if any.
fn item_namespace(item: &Item) -> Option<&str> {
    match item {
        Item::FunctionCall { extra, .. } => extra.get("namespace").and_then(Value::as_str),
        _ => None,
    }
}

/// The ids Turnpike gives the output items of one model call, by the
/// provider's output index: the row id and the public id announced.
type ItemIds = HashMap<u64, (Uuid, String)>;

/// An event's type, output index and part of the item (its other indexes).
type EventKey = (String, u64, String);

/// Forwards the model's progress as the response's events: the provider's
/// own events, with Turnpike's item ids and output indexes numbered after
/// the response's earlier output.
///
/// A retried call starts its stream over; clients saw the failed attempt's
/// events already. The retry's items keep the ids they were announced
/// with, an event already sent is not sent again, and a delta is sent only
/// for the text beyond what clients have: a retry that repeats the
/// failed attempt shows each piece of text once.
struct Relay<'a> {
    events: &'a Events,
    offset: u64,
    include_obfuscation: bool,
    item_ids: ItemIds,
    /// The events other than deltas sent so far (type, output index, part).
    sent: BTreeSet<EventKey>,
    /// The text sent so far per delta stream.
    text: HashMap<EventKey, String>,
    /// After a retry: the text of the current attempt per delta stream.
    attempt: Option<HashMap<EventKey, String>>,
}

/// An event's key: its type, the provider's output index, and which part
/// of the item (its content, summary, annotation, … indexes).
fn event_key(fields: &serde_json::Map<String, Value>, output_index: u64) -> EventKey {
    let kind = fields.get("type").and_then(Value::as_str).unwrap_or("");
    let part: String = fields
        .iter()
        .filter(|(name, _)| name.ends_with("_index") && name.as_str() != "output_index")
        .map(|(name, value)| format!("{name}={value};"))
        .collect();
    (kind.to_owned(), output_index, part)
}

impl<'a> Relay<'a> {
    /// Takes in what clients were sent of this model call by a worker that
    /// was interrupted running it (its logged events at output indexes from
    /// `offset` on): the call now runs again as a retry of that one.
    fn resume(&mut self, logged: &[Value]) {
        if logged.is_empty() {
            return;
        }
        for event in logged {
            let Some(fields) = event.as_object() else {
                continue;
            };
            let Some(index) = fields
                .get("output_index")
                .and_then(Value::as_u64)
                .and_then(|i| i.checked_sub(self.offset))
            else {
                continue;
            };
            if fields.get("type").and_then(Value::as_str) == Some("response.output_item.added") {
                let public = event["item"]["id"].as_str().unwrap_or_default();
                if let Some(uuid) = ids::parse_item(public) {
                    self.item_ids.insert(index, (uuid, public.to_owned()));
                }
                continue;
            }
            let key = event_key(fields, index);
            match fields.get("delta").and_then(Value::as_str) {
                Some(delta) => self.text.entry(key).or_default().push_str(delta),
                None => {
                    self.sent.insert(key);
                }
            }
        }
        self.attempt = Some(HashMap::new());
    }

    fn new(events: &'a Events, offset: u64, include_obfuscation: bool) -> Self {
        Self {
            events,
            offset,
            include_obfuscation,
            item_ids: ItemIds::new(),
            sent: BTreeSet::new(),
            text: HashMap::new(),
            attempt: None,
        }
    }

    fn forward(&mut self, progress: Progress<'_>) {
        match progress {
            Progress::Retry => self.attempt = Some(HashMap::new()),
            Progress::ItemAdded { output_index, item } => {
                if self.item_ids.contains_key(&output_index) {
                    return;
                }
                let kind = item
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("message");
                let uuid = Uuid::now_v7();
                let public = ids::encode(ids::item_prefix(kind), uuid);
                let mut added = item.clone();
                added["id"] = json!(public);
                turns::escape_nul(&mut added);
                self.item_ids.insert(output_index, (uuid, public));
                self.events
                    .send(json!({"type": "response.output_item.added",
                    "output_index": self.offset + output_index, "item": added}));
            }
            Progress::Event {
                output_index,
                event,
            } => self.event(output_index, event),
        }
    }

    fn event(&mut self, output_index: u64, event: &Value) {
        let Some(fields) = event.as_object() else {
            return;
        };
        let key = event_key(fields, output_index);
        let mut forwarded = fields.clone();
        match fields.get("delta").and_then(Value::as_str) {
            Some(delta) => {
                let sent = self.text.entry(key.clone()).or_default();
                if let Some(attempt) = &mut self.attempt {
                    let now = attempt.entry(key).or_default();
                    now.push_str(delta);
                    if sent.starts_with(now.as_str()) {
                        return;
                    }
                    let new = now.strip_prefix(sent.as_str()).unwrap_or(now);
                    forwarded.insert("delta".into(), json!(new));
                    sent.clone_from(now);
                } else {
                    sent.push_str(delta);
                }
            }
            None => {
                if !self.sent.insert(key) && self.attempt.is_some() {
                    return;
                }
            }
        }
        let (_, public) = self.item_ids.entry(output_index).or_insert_with(|| {
            let uuid = Uuid::now_v7();
            (uuid, ids::encode(prefixes::MESSAGE, uuid))
        });
        forwarded.remove("sequence_number");
        if !self.include_obfuscation {
            forwarded.remove("obfuscation");
        }
        // OpenAI always sends logprobs on text events; some compatible
        // servers leave them out, and SDKs expect them.
        if matches!(
            forwarded.get("type").and_then(Value::as_str),
            Some("response.output_text.delta" | "response.output_text.done")
        ) {
            forwarded.entry("logprobs").or_insert_with(|| json!([]));
        }
        forwarded.insert("item_id".into(), json!(public));
        forwarded.insert("output_index".into(), json!(self.offset + output_index));
        // Streamed as it is stored.
        let mut forwarded = Value::Object(forwarded);
        turns::escape_nul(&mut forwarded);
        self.events.send(forwarded);
    }
}

/// The event that closes an output item, sent once the item is stored.
fn done_event(index: u64, item: &Item) -> Value {
    json!({"type": "response.output_item.done", "output_index": index,
        "item": serde_json::to_value(item).unwrap_or(Value::Null)})
}

/// The provider's output items as stored items, with the ids announced in
/// the stream. Nothing is dropped: an item Turnpike cannot model is kept
/// whole.
fn to_items(output: &ModelOutput, item_ids: &ItemIds) -> Vec<Item> {
    (0u64..)
        .zip(&output.items)
        .map(|(index, raw)| {
            let uuid = item_ids
                .get(&index)
                .map_or_else(Uuid::now_v7, |(uuid, _)| *uuid);
            stored_item(raw, uuid)
        })
        .collect()
}

/// One provider output item as Turnpike stores it: Turnpike's id in place
/// of the provider's (which means nothing once `store` is false), a status
/// when the provider gave none, everything else as received.
pub(crate) fn stored_item(raw: &Value, uuid: Uuid) -> Item {
    let mut fields = raw.as_object().cloned().unwrap_or_default();
    let kind = fields
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or("message")
        .to_owned();
    fields.insert("type".into(), json!(kind));
    fields.insert(
        "id".into(),
        json!(ids::encode(ids::item_prefix(&kind), uuid)),
    );
    if matches!(kind.as_str(), "message" | "function_call") && !fields.contains_key("status") {
        fields.insert("status".into(), json!("completed"));
    }
    if kind == "message" && !fields.contains_key("role") {
        fields.insert("role".into(), json!("assistant"));
    }
    serde_json::from_value(Value::Object(fields.clone()))
        .unwrap_or_else(|_| Item::Other(fields.into_iter().collect()))
}

/// Stores a step in a transaction of its own (one statement, bounded as a
/// commit is) and counts its usage; false when another worker stored it
/// first. Usage is counted as each step is stored, so every way a turn
/// ends (failed, cancelled, cut short, taken over) has counted what it
/// spent.
async fn store_step(ctx: &Context, row: &ResponseRow, step: &Step) -> Result<bool, TurnError> {
    use tracing::Instrument;
    let span = tracing::info_span!("persist", step = step.index, items = step.items.len());
    let limit = Duration::from_millis(ctx.settings.database.read_attempt_timeout_ms);
    let stored = async {
        let mut db = ctx.router.write_one_message().await?;
        let stored = tokio::time::timeout(limit, steps::save(&mut db, row.id, step))
            .await
            .map_err(|_elapsed| turnpike_core::db::DbError::PrimaryUnavailable)??;
        db.done();
        Ok::<bool, TurnError>(stored)
    }
    .instrument(span)
    .await?;
    if stored {
        record_usage(ctx, row.user_id, step.usage.as_ref()).await;
    }
    Ok(stored)
}

async fn fail(
    ctx: &Context,
    row: &ResponseRow,
    emitter: tokio::task::JoinHandle<()>,
    events_tx: Events,
    error: &Value,
    usage: Option<&Usage>,
    first_frozen: Option<&Frozen>,
) -> Result<(), TurnError> {
    let outcome = Outcome {
        status: ResponseStatus::Failed,
        output: &[],
        prompts: &[],
        usage,
        error: Some(error),
        incomplete_details: None,
    };
    let ending = Ending {
        outcome: &outcome,
        terminal: "response.failed",
        last_step: None,
        first_frozen,
    };
    finish(ctx, row, emitter, events_tx, ending).await
}

/// How a turn ends: what is recorded, the terminal event that says so, and
/// the loop's last step when it is stored with the outcome.
struct Ending<'a> {
    outcome: &'a Outcome<'a>,
    terminal: &'a str,
    last_step: Option<Pending>,
    /// The conversation's prompt settings when this turn is the first to
    /// freeze them.
    first_frozen: Option<&'a Frozen>,
}

/// Persists the outcome, records the write for the user's session window,
/// then publishes the terminal event: a client that sees it and reads the
/// response finds the outcome stored.
async fn finish(
    ctx: &Context,
    row: &ResponseRow,
    emitter: tokio::task::JoinHandle<()>,
    events_tx: Events,
    ending: Ending<'_>,
) -> Result<(), TurnError> {
    let Ending {
        outcome,
        terminal,
        last_step,
        first_frozen,
    } = ending;
    let unstored = row.request.0.store == Some(false);
    let step = last_step.as_ref().map(|pending| &pending.step);
    if step.is_some() {
        events_tx.logged().await;
    }
    let committed = async {
        let mut tx = ctx.router.write().await?;
        // Sent with the commit, unless the conversation goes too.
        if !unstored {
            let (finished, next, lsn) =
                turns::finish_and_commit(tx, row, outcome, step, first_frozen).await?;
            return match finished {
                turns::Finished::Done(done) => Ok((Some(done), next, lsn)),
                turns::Finished::Ended => Ok((None, next, lsn)),
                // It wrote nothing.
                turns::Finished::Superseded => Err(TurnError::Superseded),
            };
        }
        let (finished, next) = turns::finish(&mut tx, row, outcome, step, first_frozen).await?;
        let finished = match finished {
            turns::Finished::Done(done) => Some(done),
            turns::Finished::Ended => None,
            // Rolled back as `tx` drops.
            turns::Finished::Superseded => return Err(TurnError::Superseded),
        };
        // `store: false`: the turn ran and streamed; nothing of it is kept.
        // Such a turn always has a conversation of its own.
        turns::purge_conversation(&mut tx, row.conversation_id).await?;
        let lsn: Lsn = tx.commit().await?;
        Ok((finished, next, lsn))
    }
    .await;
    let (finished, next, lsn) = match committed {
        Ok(committed) => committed,
        Err(TurnError::Superseded) => return Err(TurnError::Superseded),
        Err(e) => {
            // The turn goes back for redelivery: its last step is kept on
            // its own if it can be, so the model is not asked again and no
            // tool runs twice (as when every step was stored before the
            // finish).
            if let Some(step) = step
                && let Err(stored) = store_step(ctx, row, step).await
            {
                tracing::warn!(error = %stored, "could not keep the last step of a turn whose finish failed");
            }
            return Err(e);
        }
    };
    let status = if finished.is_some() {
        format!("{:?}", outcome.status).to_lowercase()
    } else {
        "cancelled".to_owned()
    };
    metrics::counter!("turnpike_turns_total", "outcome" => status).increment(1);
    let age = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        .saturating_sub(u64::try_from(row.created_at).unwrap_or(0));
    metrics::histogram!("turnpike_turn_total_seconds").record(age as f64);
    // All before the terminal event, in parallel (independent Redis keys): a
    // client that saw the turn end reads its own write, finds no cached page
    // without the output, and sees its tokens counted against the budget.
    tokio::join!(ctx.last_writes.record(row.user_id, lsn), async {
        if !outcome.output.is_empty() || unstored {
            changed(ctx, row.conversation_id, lsn).await;
        }
    },);
    dispatch(ctx, next, lsn).await;
    // The last step's tokens were spent whether or not the turn was
    // cancelled meanwhile; its items are announced only when stored.
    if let Some(Pending { step, announce }) = last_step {
        record_usage(ctx, row.user_id, step.usage.as_ref()).await;
        if finished.is_some() {
            announce.into_iter().for_each(|event| events_tx.send(event));
        }
    }
    match finished {
        Some(done) => {
            let snapshot = serde_json::to_value(done.to_api()).unwrap_or(Value::Null);
            events_tx.send(json!({"type": terminal, "response": snapshot}));
        }
        None => {
            // Cancelled while running: the stream ends with the cancellation.
            events_tx.send(json!({"type": "response.cancelled",
                "response": {"id": row.public_id(), "status": "cancelled"}}));
        }
    }
    drop(events_tx);
    let _ = emitter.await;
    Ok(())
}

/// A committed write changed the conversation: its cached answers go. When
/// Redis does not take the invalidation it is retried in the background
/// for a while (the cache's L2 TTL bounds what is left after that).
async fn changed(ctx: &Context, conversation: Uuid, lsn: Lsn) {
    let floor_ttl_ms = ctx.settings.cache.floor_ttl_ms;
    if cache::invalidate(&ctx.kv, conversation, lsn, floor_ttl_ms)
        .await
        .is_ok()
    {
        return;
    }
    let kv = ctx.kv.clone();
    tokio::spawn(async move {
        for _ in 0..240 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if cache::invalidate(&kv, conversation, lsn, floor_ttl_ms)
                .await
                .is_ok()
            {
                return;
            }
        }
    });
}

/// Adds a stored step's tokens to its user's daily budget counter. The
/// tokens were spent even when the turn is cancelled meanwhile. A count
/// Redis does not take is lost (logged): the budget errs towards the user.
async fn record_usage(ctx: &Context, user: Uuid, usage: Option<&Usage>) {
    if let Some(usage) = usage {
        let cached = usage.input_tokens_details.cached_tokens;
        metrics::counter!("turnpike_model_tokens_total", "kind" => "input")
            .increment(usage.input_tokens);
        metrics::counter!("turnpike_model_tokens_total", "kind" => "cached").increment(cached);
        metrics::counter!("turnpike_model_tokens_total", "kind" => "output")
            .increment(usage.output_tokens);
    }
    let Some(tokens) = usage.map(|u| u.total_tokens).filter(|t| *t > 0) else {
        return;
    };
    let now = std::time::SystemTime::now();
    if let Err(e) = limits::record_tokens(&ctx.kv, user, tokens, now).await {
        tracing::warn!(error = %e, tokens, "could not count a turn's tokens against the daily budget");
    }
}

/// Queues a conversation's next turn, now that the previous one is over.
async fn dispatch(ctx: &Context, next: Option<Uuid>, lsn: Lsn) {
    let Some(next) = next else { return };
    let public = ids::encode(prefixes::RESPONSE, next);
    if let Err(e) = queue::enqueue(&ctx.kv, &ctx.settings.worker.queue, &public, lsn).await {
        tracing::warn!(error = %e, response = %public, "could not dispatch the next turn; the reconciler will");
    }
}

/// How long the emitter keeps retrying one event while Redis is away.
const EMIT_PATIENCE: Duration = Duration::from_secs(15);

/// The most events the emitter appends in one round trip: what an api's
/// per-response buffer holds, so a stream is never behind by one append.
const EMIT_BATCH: usize = events::LIVE_BUFFER;

/// What the emitter is sent: an event to log, or a request to be answered
/// once everything sent before it is logged.
enum Emit {
    Event(Value),
    Flush(oneshot::Sender<()>),
}

/// A turn's way to its event log, through its `Emitter`.
#[derive(Clone)]
struct Events(mpsc::UnboundedSender<Emit>);

impl Events {
    /// Queues an event; the emitter logs events in the order sent.
    fn send(&self, event: Value) {
        let _ = self.0.send(Emit::Event(event));
    }

    /// Waits until every event sent so far is logged, or given up by the
    /// emitter (see `append`). A step is stored only
    /// after this: a worker lost between the two leaves no stored step
    /// whose streamed text was not all logged for its clients, and the
    /// redelivery, which goes on from the stored steps, has none to fill in.
    async fn logged(&self) {
        let (done, logged) = oneshot::channel();
        if self.0.send(Emit::Flush(done)).is_ok() {
            let _ = tokio::time::timeout(2 * EMIT_PATIENCE, logged).await;
        }
    }
}

/// Appends events to the response's log in order, on its own task, so the
/// model stream never waits on Redis.
struct Emitter;

impl Emitter {
    fn start(
        ctx: &Context,
        response: String,
        first_seq: u64,
        retention: Duration,
    ) -> (tokio::task::JoinHandle<()>, Events) {
        let (tx, mut rx) = mpsc::unbounded_channel::<Emit>();
        let kv = ctx.kv.clone();
        let task = tokio::spawn(async move {
            let mut seq = first_seq;
            let mut batch = Vec::new();
            // Redis refused a batch for all of `EMIT_PATIENCE`: later batches
            // get one try each until one is taken, so that a turn waiting in
            // `Events::logged` to store a step does not wait out the
            // patience again for every batch.
            let mut away = false;
            while rx.recv_many(&mut batch, EMIT_BATCH).await > 0 {
                // What has queued up since the last append goes in one round
                // trip: nothing waits for a batch to fill.
                let mut flushes = Vec::new();
                let texts: Vec<String> = batch
                    .drain(..)
                    .filter_map(|emit| match emit {
                        Emit::Event(event) => Some(event),
                        Emit::Flush(done) => {
                            flushes.push(done);
                            None
                        }
                    })
                    .zip(seq..)
                    .map(|(mut event, n)| {
                        event["sequence_number"] = json!(n);
                        event.to_string()
                    })
                    .collect();
                if !texts.is_empty() {
                    let patience = if away { Duration::ZERO } else { EMIT_PATIENCE };
                    away = !append(&kv, &response, seq, &texts, retention, patience).await;
                    seq += texts.len() as u64;
                }
                // Whatever was sent before these requests is in this batch
                // or an earlier one.
                for done in flushes {
                    let _ = done.send(());
                }
            }
        });
        (task, Events(tx))
    }
}

/// Appends `texts` to the response's log from `seq`; false when it gave
/// up. An event lost here is a gap in every client's stream: it keeps
/// trying through a Redis restart (the events wait in the emitter, in
/// order; the model stream does not) for `patience`. A retried batch skips
/// what already made it.
async fn append(
    kv: &turnpike_core::kv::Kv,
    response: &str,
    seq: u64,
    texts: &[String],
    retention: Duration,
    patience: Duration,
) -> bool {
    let mut delay = Duration::from_millis(20);
    let since = tokio::time::Instant::now();
    loop {
        match events::append_all(kv, response, seq, texts, retention).await {
            Ok(_) => return true,
            Err(e) if since.elapsed() >= patience => {
                tracing::warn!(error = %e, seq, events = texts.len(), "could not log events; streams will have a gap");
                return false;
            }
            Err(_) => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_millis(500));
            }
        }
    }
}
