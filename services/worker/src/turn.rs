//! One turn: start it, build the prompt, stream the model while publishing
//! events, persist the outcome, acknowledge.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::mpsc;
use turnpike_core::db::{Consistency, Lsn};
use turnpike_core::queue::Delivery;
use turnpike_core::turns::{self, Outcome, ResponseRow};
use turnpike_core::{events, ids, queue};
use turnpike_protocol::ids as prefixes;
use turnpike_protocol::item::{ContentPart, Item, Role};
use turnpike_protocol::response::{ResponseStatus, Usage};
use uuid::Uuid;

use crate::Context;
use crate::provider::{ModelOutput, Progress, ProviderError};

/// Runs a delivered turn to its end; never panics the worker.
pub(crate) async fn run(ctx: &Context, delivery: Delivery) {
    let heartbeat = AbortOnDrop(tokio::spawn(heartbeat(
        ctx.kv.clone(),
        ctx.settings.worker.queue.clone(),
        ctx.consumer_name.clone(),
        delivery.entry.clone(),
        Duration::from_millis(ctx.settings.worker.heartbeat_ms),
    )));
    let result = run_turn(ctx, &delivery).await;
    drop(heartbeat);
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

/// Stops a helper task when the turn that owns it ends, however it ends
/// (an aborted turn must not keep heartbeating its claim).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Why a turn stopped without an outcome (it will be redelivered).
#[derive(Debug, thiserror::Error)]
enum TurnError {
    #[error(transparent)]
    Db(#[from] turnpike_core::db::DbError),
    #[error(transparent)]
    Query(#[from] sqlx::Error),
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
    let mut tx = ctx.router.write().await?;
    let started = turns::start(&mut tx, id, delivery.deliveries > 1).await?;
    let Some(row) = started else {
        // Cancelled before it started, finished already, or a duplicate
        // delivery of a running turn: nothing to run. A cancelled turn's
        // successor may be waiting.
        let conversation = turns::find_any(&mut tx, id)
            .await?
            .map(|r| r.conversation_id);
        let next = match conversation {
            Some(conversation) => turns::next_queued(&mut tx, conversation).await?,
            None => None,
        };
        let lsn = tx.commit().await?;
        dispatch(ctx, next, lsn).await;
        return Ok(());
    };
    tx.commit().await?;
    let cancelled = ctx.cancels.register(&delivery.response);
    let first_seq = events::last_sequence(&ctx.kv, &delivery.response)
        .await
        .ok()
        .flatten()
        .map_or(0, |s| s + 1);
    let (emitter, events_tx) = Emitter::start(ctx, delivery.response.clone(), first_seq);

    if delivery.deliveries > ctx.settings.worker.max_deliveries {
        let error = json!({"code": "too_many_deliveries",
            "message": format!("The turn was interrupted {} times and will not be retried.", delivery.deliveries - 1)});
        return fail(ctx, &row, emitter, events_tx, &error).await;
    }

    let snapshot = serde_json::to_value(row.to_api()).unwrap_or(Value::Null);
    let _ = events_tx.send(json!({"type": "response.created", "response": snapshot}));
    let _ = events_tx.send(json!({"type": "response.in_progress", "response": snapshot}));

    let lsn = delivery.lsn;
    let conversation = row.conversation_id;
    let last_seq = row.input_last_seq;
    let history = ctx
        .router
        .read(Consistency::Session(Some(lsn)), move |db| {
            Box::pin(async move { turns::history(db, conversation, last_seq).await })
        })
        .await?;
    let request = prompt(&row, &history);

    let mut item_ids: HashMap<u64, Uuid> = HashMap::new();
    let streaming = ctx.provider.stream(
        &request,
        |progress| match progress {
            Progress::ItemAdded { output_index, item } => {
                let kind = item
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("message");
                let uuid = *item_ids.entry(output_index).or_insert_with(Uuid::now_v7);
                let public = ids::encode(ids::item_prefix(kind), uuid);
                let mut added = item.clone();
                added["id"] = json!(public);
                let _ = events_tx.send(json!({"type": "response.output_item.added",
                        "output_index": output_index, "item": added}));
                if kind == "message" {
                    let _ = events_tx.send(
                        json!({"type": "response.content_part.added", "item_id": public,
                            "output_index": output_index, "content_index": 0,
                            "part": {"type": "output_text", "text": "", "annotations": []}}),
                    );
                }
            }
            Progress::ArgumentsDelta {
                output_index,
                delta,
            } => {
                let uuid = *item_ids.entry(output_index).or_insert_with(Uuid::now_v7);
                let _ = events_tx.send(json!({"type": "response.function_call_arguments.delta",
                        "item_id": ids::encode(prefixes::FUNCTION_CALL, uuid),
                        "output_index": output_index, "delta": delta}));
            }
            Progress::TextDelta {
                output_index,
                delta,
            } => {
                let uuid = *item_ids.entry(output_index).or_insert_with(Uuid::now_v7);
                let _ = events_tx.send(json!({"type": "response.output_text.delta",
                        "item_id": ids::encode(prefixes::MESSAGE, uuid),
                        "output_index": output_index, "content_index": 0, "delta": delta}));
            }
        },
        |_error: &ProviderError| {},
    );
    // A cancellation stops the model stream at once; `finish` then finds the
    // turn cancelled and ends the stream with `response.cancelled`.
    let result = tokio::select! {
        result = streaming => Some(result),
        () = cancelled.notified() => None,
    };
    ctx.cancels.forget(&delivery.response);
    let Some(result) = result else {
        let error = json!({"code": "cancelled", "message": "The response was cancelled."});
        return fail(ctx, &row, emitter, events_tx, &error).await;
    };

    match result {
        Ok(output) => complete(ctx, &row, emitter, events_tx, output, &item_ids).await,
        Err(e) => {
            let error = json!({"code": e.code(), "message": e.to_string()});
            fail(ctx, &row, emitter, events_tx, &error).await
        }
    }
}

/// The model request: frozen instructions, tools sorted by name, the
/// append-only history. Every turn's prompt is a prefix of the next one's,
/// which is what lets the provider's prompt cache hit.
fn prompt(row: &ResponseRow, history: &[Item]) -> Value {
    let request = &row.request.0;
    let mut tools = request.tools.clone();
    tools.sort_by(|a, b| tool_name(a).cmp(tool_name(b)));
    let input: Vec<Value> = history
        .iter()
        .filter_map(|item| {
            let mut value = serde_json::to_value(item).ok()?;
            // Stored ids mean nothing to a provider that stores nothing (`store: false`).
            if let Some(object) = value.as_object_mut() {
                object.remove("id");
                object.remove("status");
            }
            Some(value)
        })
        .collect();
    let mut body = json!({
        "model": row.model,
        "input": input,
        "stream": true,
        "store": false,
        "prompt_cache_key": ids::encode(prefixes::CONVERSATION, row.conversation_id),
    });
    if let Some(instructions) = &request.instructions {
        body["instructions"] = json!(instructions);
    }
    if !tools.is_empty() {
        body["tools"] = json!(tools);
        if let Some(choice) = &request.tool_choice {
            body["tool_choice"] = choice.clone();
        }
        if let Some(parallel) = request.parallel_tool_calls {
            body["parallel_tool_calls"] = json!(parallel);
        }
    }
    for (key, value) in [
        (
            "max_output_tokens",
            request.max_output_tokens.map(|v| json!(v)),
        ),
        ("temperature", request.temperature.map(|v| json!(v))),
        ("top_p", request.top_p.map(|v| json!(v))),
    ] {
        if let Some(value) = value {
            body[key] = value;
        }
    }
    body
}

fn tool_name(tool: &Value) -> &str {
    tool.get("name").and_then(Value::as_str).unwrap_or("")
}

/// The provider's output items as stored items, with the ids announced in
/// the stream.
fn to_items(output: &ModelOutput, item_ids: &HashMap<u64, Uuid>) -> Vec<Item> {
    let mut items = Vec::new();
    for (index, raw) in (0u64..).zip(&output.items) {
        let uuid = item_ids.get(&index).copied().unwrap_or_else(Uuid::now_v7);
        match raw.get("type").and_then(Value::as_str) {
            Some("message") => {
                let role = raw
                    .get("role")
                    .and_then(|r| serde_json::from_value::<Role>(r.clone()).ok())
                    .unwrap_or(Role::Assistant);
                let content: Vec<ContentPart> = raw
                    .get("content")
                    .and_then(Value::as_array)
                    .map(|parts| {
                        parts
                            .iter()
                            .filter_map(|p| serde_json::from_value(p.clone()).ok())
                            .collect()
                    })
                    .unwrap_or_default();
                items.push(Item::Message {
                    id: ids::encode(prefixes::MESSAGE, uuid),
                    status: "completed".into(),
                    role,
                    content,
                });
            }
            Some("function_call") => {
                let field = |name: &str| {
                    raw.get(name)
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_owned()
                };
                items.push(Item::FunctionCall {
                    id: ids::encode(prefixes::FUNCTION_CALL, uuid),
                    status: "completed".into(),
                    call_id: field("call_id"),
                    name: field("name"),
                    arguments: field("arguments"),
                });
            }
            other => {
                tracing::debug!(kind = ?other, "skipping an output item kind Turnpike does not store yet")
            }
        }
    }
    items
}

async fn complete(
    ctx: &Context,
    row: &ResponseRow,
    emitter: tokio::task::JoinHandle<()>,
    events_tx: mpsc::UnboundedSender<Value>,
    output: ModelOutput,
    item_ids: &HashMap<u64, Uuid>,
) -> Result<(), TurnError> {
    let items = to_items(&output, item_ids);
    let usage: Option<Usage> = output.usage.and_then(|u| serde_json::from_value(u).ok());
    for (index, item) in items.iter().enumerate() {
        if let Item::Message { id, content, .. } = item {
            let text: String = content.iter().filter_map(ContentPart::text).collect();
            let _ = events_tx.send(json!({"type": "response.output_text.done", "item_id": id,
                "output_index": index, "content_index": 0, "text": text}));
            let _ = events_tx.send(json!({"type": "response.content_part.done", "item_id": id,
                "output_index": index, "content_index": 0,
                "part": content.first().cloned().map_or(Value::Null, |p| serde_json::to_value(p).unwrap_or(Value::Null))}));
        }
        if let Item::FunctionCall { id, arguments, .. } = item {
            let _ = events_tx.send(json!({"type": "response.function_call_arguments.done",
                "item_id": id, "output_index": index, "arguments": arguments}));
        }
        let _ = events_tx.send(
            json!({"type": "response.output_item.done", "output_index": index,
            "item": serde_json::to_value(item).unwrap_or(Value::Null)}),
        );
    }
    let outcome = Outcome {
        status: ResponseStatus::Completed,
        output: &items,
        usage: usage.as_ref(),
        error: None,
    };
    finish(ctx, row, emitter, events_tx, &outcome, "response.completed").await
}

async fn fail(
    ctx: &Context,
    row: &ResponseRow,
    emitter: tokio::task::JoinHandle<()>,
    events_tx: mpsc::UnboundedSender<Value>,
    error: &Value,
) -> Result<(), TurnError> {
    let outcome = Outcome {
        status: ResponseStatus::Failed,
        output: &[],
        usage: None,
        error: Some(error),
    };
    finish(ctx, row, emitter, events_tx, &outcome, "response.failed").await
}

/// Persists the outcome, records the write for the user's session window,
/// then publishes the terminal event: a client that sees it and reads the
/// response finds the outcome stored.
async fn finish(
    ctx: &Context,
    row: &ResponseRow,
    emitter: tokio::task::JoinHandle<()>,
    events_tx: mpsc::UnboundedSender<Value>,
    outcome: &Outcome<'_>,
    terminal: &str,
) -> Result<(), TurnError> {
    let mut tx = ctx.router.write().await?;
    let finished = turns::finish(&mut tx, row, outcome).await?;
    let next = turns::next_queued(&mut tx, row.conversation_id).await?;
    let lsn: Lsn = tx.commit().await?;
    ctx.last_writes.record(row.user_id, lsn).await;
    dispatch(ctx, next, lsn).await;
    match finished {
        Some(done) => {
            let snapshot = serde_json::to_value(done.to_api()).unwrap_or(Value::Null);
            let _ = events_tx.send(json!({"type": terminal, "response": snapshot}));
        }
        None => {
            // Cancelled while running: the stream ends with the cancellation.
            let _ = events_tx.send(json!({"type": "response.cancelled",
                "response": {"id": row.public_id(), "status": "cancelled"}}));
        }
    }
    drop(events_tx);
    let _ = emitter.await;
    Ok(())
}

/// Queues a conversation's next turn, now that the previous one is over.
async fn dispatch(ctx: &Context, next: Option<Uuid>, lsn: Lsn) {
    let Some(next) = next else { return };
    let public = ids::encode(prefixes::RESPONSE, next);
    if let Err(e) = queue::enqueue(&ctx.kv, &ctx.settings.worker.queue, &public, lsn).await {
        tracing::warn!(error = %e, response = %public, "could not dispatch the next turn; the reconciler will");
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
    ) -> (tokio::task::JoinHandle<()>, mpsc::UnboundedSender<Value>) {
        let (tx, mut rx) = mpsc::unbounded_channel::<Value>();
        let kv = ctx.kv.clone();
        let retention = Duration::from_millis(ctx.settings.events.retention_ms);
        let task = tokio::spawn(async move {
            let mut seq = first_seq;
            while let Some(mut event) = rx.recv().await {
                event["sequence_number"] = json!(seq);
                let text = event.to_string();
                let mut delay = Duration::from_millis(20);
                // Retry briefly: an event lost here is a gap in every client's stream.
                for attempt in 0..5 {
                    match events::append(&kv, &response, seq, &text, retention).await {
                        Ok(_) => break,
                        Err(e) if attempt == 4 => {
                            tracing::warn!(error = %e, seq, "could not log an event; streams will have a gap");
                        }
                        Err(_) => {
                            tokio::time::sleep(delay).await;
                            delay *= 2;
                        }
                    }
                }
                seq += 1;
            }
        });
        (task, tx)
    }
}
