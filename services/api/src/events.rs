//! Response event streams (SSE): replay the logged events after the
//! client's cursor, then forward live ones, de-duplicated by sequence
//! number, until the terminal event. When the log has expired, the events
//! are rebuilt from the stored response, so a finished turn can always be
//! replayed.

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use turnpike_core::db::Consistency;
use turnpike_core::events::{self, Live};
use turnpike_core::turns::{self, ResponseRow};
use turnpike_protocol::item::{ContentPart, Item};

use crate::AppState;
use crate::limits::StreamSlot;

/// Event types that end a response's stream.
const TERMINAL: [&str; 4] = [
    "response.completed",
    "response.failed",
    "response.incomplete",
    "response.cancelled",
];

/// How soon an idle stream first re-reads the log, in case a live event was
/// missed (pub/sub is reliable while connected; a reconnect or a gap
/// triggers a re-read at once). Doubles while the stream stays idle, up to
/// `RESYNC_MAX`, so thousands of idle streams cost little.
const RESYNC_EVERY: Duration = Duration::from_secs(1);
const RESYNC_MAX: Duration = Duration::from_secs(30);

#[derive(Deserialize)]
struct Header<'a> {
    #[serde(rename = "type", borrow)]
    kind: &'a str,
    sequence_number: u64,
}

fn header(data: &str) -> Option<(String, u64)> {
    let header: Header<'_> = serde_json::from_str(data).ok()?;
    Some((header.kind.to_owned(), header.sequence_number))
}

/// The response a stream follows: all its pump keeps of the row, whose
/// request (instructions, tools) may be large and is not needed to follow it.
#[derive(Clone, Copy)]
struct Followed {
    id: uuid::Uuid,
    user: uuid::Uuid,
}

/// One event of a response's stream, as logged.
pub struct Logged {
    pub kind: String,
    pub seq: u64,
    /// The event's JSON.
    pub data: String,
}

/// `row`'s events after `after`, in order, ending with the terminal event;
/// dropping the receiver stops the stream.
/// `slot` is the user's open-stream slot, held until the stream ends.
///
/// An idle stream's memory is mostly what is held here for its whole life:
/// the pump keeps two ids of the row, its rarely taken paths are boxed
/// only while they run (`pump`), and the channel carries boxed events (a
/// channel allocates its slots 32 at a time).
pub fn follow(
    app: &AppState,
    row: ResponseRow,
    after: Option<u64>,
    slot: StreamSlot,
) -> mpsc::Receiver<Box<Logged>> {
    let (tx, rx) = mpsc::channel::<Box<Logged>>(256);
    let app = app.clone();
    let followed = Followed {
        id: row.id,
        user: row.user_id,
    };
    let response = row.public_id();
    drop(row);
    tokio::spawn(async move {
        pump(app, followed, response, after, tx).await;
        drop(slot);
    });
    rx
}

/// An SSE response streaming `row`'s events after `after`.
pub fn stream(app: &AppState, row: ResponseRow, after: Option<u64>, slot: StreamSlot) -> Response {
    use tokio_stream::StreamExt;
    let keepalive = Duration::from_millis(app.settings.events.keepalive_ms);
    let events = ReceiverStream::new(follow(app, row, after, slot)).map(|logged| {
        let Logged { kind, seq, data } = *logged;
        Ok::<_, Infallible>(Event::default().event(kind).id(seq.to_string()).data(data))
    });
    Sse::new(events)
        .keep_alive(KeepAlive::new().interval(keepalive))
        .into_response()
}

/// Sends one logged event; false when the client is gone.
async fn send(tx: &mpsc::Sender<Box<Logged>>, kind: &str, seq: u64, data: &str) -> bool {
    let logged = Box::new(Logged {
        kind: kind.to_owned(),
        seq,
        data: data.to_owned(),
    });
    tx.send(logged).await.is_ok()
}

enum Step {
    /// Keep streaming; the last sequence number sent.
    Continue(Option<u64>),
    /// The terminal event was sent, or the client left.
    Done,
}

/// Sends logged events after `last`.
async fn replay(
    app: &AppState,
    response: &str,
    last: Option<u64>,
    tx: &mpsc::Sender<Box<Logged>>,
) -> Step {
    let logged = match events::read_after(&app.kv, response, last).await {
        Ok(logged) => logged,
        Err(e) => {
            tracing::warn!(error = %e, "event log unreadable; retrying");
            return Step::Continue(last);
        }
    };
    if logged.is_empty() && last.is_some() {
        // Nothing after the cursor: if the cursor is at or past the terminal
        // event, the stream is already complete for this client.
        if let Ok(Some((seq, data))) = events::last_event(&app.kv, response).await {
            let ended = header(&data).is_some_and(|(kind, _)| TERMINAL.contains(&kind.as_str()));
            if ended && last.is_some_and(|l| l >= seq) {
                return Step::Done;
            }
        }
    }
    let mut last = last;
    for (seq, data) in logged {
        let Some((kind, _)) = header(&data) else {
            continue;
        };
        if !send(tx, &kind, seq, &data).await {
            return Step::Done;
        }
        last = Some(seq);
        if TERMINAL.contains(&kind.as_str()) {
            return Step::Done;
        }
    }
    Step::Continue(last)
}

/// Follows one response. Every path but the wait for the next live event is
/// boxed where it is taken, so the task an idle stream keeps is small.
async fn pump(
    app: AppState,
    followed: Followed,
    response: String,
    after: Option<u64>,
    tx: mpsc::Sender<Box<Logged>>,
) {
    // Subscribe before reading the log: nothing published in between is lost.
    let mut subscription = Box::pin(app.hub.subscribe(&response)).await;
    let mut last = match Box::pin(replay(&app, &response, after, &tx)).await {
        Step::Done => return,
        Step::Continue(last) => last,
    };
    // Resuming after the log expired: the stored response ends the stream.
    if after.is_some()
        && last == after
        && matches!(
            Box::pin(events::last_event(&app.kv, &response)).await,
            Ok(None)
        )
        && Box::pin(ended_elsewhere(&app, followed, last, &tx)).await
    {
        return;
    }
    let mut idle_wait = RESYNC_EVERY;
    loop {
        let next = tokio::select! {
            () = tx.closed() => return,
            next = tokio::time::timeout(idle_wait, subscription.receiver.recv()) => next,
        };
        idle_wait = if next.is_err() {
            (idle_wait * 2).min(RESYNC_MAX)
        } else {
            RESYNC_EVERY
        };
        let idle = next.is_err();
        let resync = match next {
            Ok(Ok(Live::Event(data))) => match header(&data) {
                Some((kind, seq)) if last.is_none_or(|l| seq == l + 1) => {
                    if !send(&tx, &kind, seq, &data).await {
                        return;
                    }
                    last = Some(seq);
                    if TERMINAL.contains(&kind.as_str()) {
                        return;
                    }
                    false
                }
                // Already sent (it arrived in the replay too).
                Some((_, seq)) if last.is_some_and(|l| seq <= l) => false,
                // A gap: something was missed; the log has it.
                _ => true,
            },
            Ok(Ok(Live::Resync)) | Ok(Err(RecvError::Lagged(_))) => true,
            Ok(Err(RecvError::Closed)) => return,
            Err(_idle) => true,
        };
        if resync {
            let before = last;
            last = match Box::pin(replay(&app, &response, last, &tx)).await {
                Step::Done => return,
                Step::Continue(last) => last,
            };
            // Long idle with nothing new: the response may have ended
            // without its terminal event reaching the log (a worker lost
            // at the very end), or the log may have expired under a
            // resuming client. The stored row decides.
            if idle
                && last == before
                && idle_wait >= ROW_CHECK_AFTER
                && Box::pin(ended_elsewhere(&app, followed, last, &tx)).await
            {
                return;
            }
            if last.is_none() && Box::pin(finished_without_log(&app, followed, after, &tx)).await {
                return;
            }
        }
    }
}

/// How long a stream must have been idle before it asks the database
/// whether its response ended (a stuck stream ends within about 15 s).
const ROW_CHECK_AFTER: Duration = Duration::from_secs(8);

/// For an idle stream at `last`: when the stored response has ended, sends
/// its terminal event (with the whole response) as the next event and
/// answers true; a stream that has sent nothing yet gets every event,
/// rebuilt from storage.
async fn ended_elsewhere(
    app: &AppState,
    followed: Followed,
    last: Option<u64>,
    tx: &mpsc::Sender<Box<Logged>>,
) -> bool {
    let Some(last) = last else {
        return finished_without_log(app, followed, None, tx).await;
    };
    let Some(current) = stored_if_ended(app, followed).await else {
        return false;
    };
    let Some(mut terminal) = synthesize(&current).pop() else {
        return false;
    };
    // Text the log never got (a worker lost after storing a step but
    // before logging all of its deltas) goes out as one delta per part,
    // so the client's deltas add up to what is stored.
    let mut seq = last + 1;
    for delta in missing_text(app, &current, last).await {
        let mut delta = delta;
        delta["sequence_number"] = json!(seq);
        if !send(tx, "response.output_text.delta", seq, &delta.to_string()).await {
            return true;
        }
        seq += 1;
    }
    terminal["sequence_number"] = json!(seq);
    let kind = terminal["type"]
        .as_str()
        .unwrap_or("response.completed")
        .to_owned();
    send(tx, &kind, seq, &terminal.to_string()).await;
    true
}

/// For each stored text part whose logged deltas (up to `last`) are a
/// strict beginning of it: a delta carrying the rest.
async fn missing_text(app: &AppState, row: &ResponseRow, last: u64) -> Vec<Value> {
    let response = row.public_id();
    let Ok(logged) = events::read_after(&app.kv, &response, None).await else {
        return Vec::new();
    };
    let mut sent: std::collections::HashMap<(u64, u64), String> = Default::default();
    for (seq, data) in logged {
        if seq > last {
            break;
        }
        let Ok(event) = serde_json::from_str::<Value>(&data) else {
            continue;
        };
        if event["type"] == "response.output_text.delta"
            && let (Some(item), Some(part), Some(delta)) = (
                event["output_index"].as_u64(),
                event["content_index"].as_u64(),
                event["delta"].as_str(),
            )
        {
            sent.entry((item, part)).or_default().push_str(delta);
        }
    }
    let mut out = Vec::new();
    for (index, item) in (0u64..).zip(row.to_api().output.iter()) {
        let Item::Message { id, content, .. } = item else {
            continue;
        };
        for (part_index, part) in (0u64..).zip(content.iter()) {
            let ContentPart::OutputText { text, .. } = part else {
                continue;
            };
            let Some(have) = sent.get(&(index, part_index)) else {
                continue;
            };
            if let Some(rest) = text.strip_prefix(have.as_str())
                && !rest.is_empty()
            {
                out.push(json!({"type": "response.output_text.delta", "item_id": id,
                    "output_index": index, "content_index": part_index,
                    "delta": rest, "logprobs": []}));
            }
        }
    }
    out
}

/// The stored response, when it has ended.
async fn stored_if_ended(app: &AppState, followed: Followed) -> Option<ResponseRow> {
    let Followed { id, user } = followed;
    let current = app
        .router
        .read_one_message(Consistency::Eventual, move |db| {
            Box::pin(async move { turns::find(db, id, user).await })
        })
        .await;
    let Ok(Some(current)) = current else {
        return None;
    };
    matches!(
        current.status.as_str(),
        "completed" | "failed" | "incomplete" | "cancelled"
    )
    .then_some(current)
}

/// For a response with no event log (expired, or finished before this
/// release): if it has finished, sends its events rebuilt from storage.
async fn finished_without_log(
    app: &AppState,
    followed: Followed,
    after: Option<u64>,
    tx: &mpsc::Sender<Box<Logged>>,
) -> bool {
    let Some(current) = stored_if_ended(app, followed).await else {
        return false;
    };
    for (seq, event) in (0u64..).zip(synthesize(&current)) {
        if after.is_some_and(|a| seq <= a) {
            continue;
        }
        let mut event = event;
        event["sequence_number"] = json!(seq);
        let kind = event["type"].as_str().unwrap_or("message").to_owned();
        if !send(tx, &kind, seq, &event.to_string()).await {
            return true;
        }
    }
    true
}

/// A finished response's events, rebuilt from what is stored.
pub fn synthesize(row: &ResponseRow) -> Vec<Value> {
    let api = row.to_api();
    let snapshot = serde_json::to_value(&api).unwrap_or(Value::Null);
    let mut started = snapshot.clone();
    started["status"] = json!("in_progress");
    started["output"] = json!([]);
    let mut out = vec![
        json!({"type": "response.created", "response": started}),
        json!({"type": "response.in_progress", "response": started}),
    ];
    for (index, item) in api.output.iter().enumerate() {
        let mut added = serde_json::to_value(item).unwrap_or(Value::Null);
        match item {
            Item::Message { id, content, .. } => {
                added["status"] = json!("in_progress");
                added["content"] = json!([]);
                out.push(json!({"type": "response.output_item.added", "output_index": index, "item": added}));
                for (part_index, part) in content.iter().enumerate() {
                    let at =
                        json!({"item_id": id, "output_index": index, "content_index": part_index});
                    out.extend(part_events(&at, part));
                }
            }
            Item::FunctionCall {
                id,
                name,
                arguments,
                ..
            } => {
                added["status"] = json!("in_progress");
                added["arguments"] = json!("");
                out.push(json!({"type": "response.output_item.added", "output_index": index, "item": added}));
                out.push(
                    json!({"type": "response.function_call_arguments.delta", "item_id": id,
                    "output_index": index, "delta": arguments}),
                );
                out.push(
                    json!({"type": "response.function_call_arguments.done", "item_id": id,
                    "output_index": index, "name": name, "arguments": arguments}),
                );
            }
            _ => out.push(
                json!({"type": "response.output_item.added", "output_index": index, "item": added}),
            ),
        }
        out.push(
            json!({"type": "response.output_item.done", "output_index": index,
            "item": serde_json::to_value(item).unwrap_or(Value::Null)}),
        );
    }
    let terminal = match row.status.as_str() {
        "failed" => "response.failed",
        "incomplete" => "response.incomplete",
        "cancelled" => "response.cancelled",
        _ => "response.completed",
    };
    out.push(json!({"type": terminal, "response": snapshot}));
    out
}

/// The events that stream one stored content part, as OpenAI sends them;
/// `at` holds the part's `item_id`, `output_index` and `content_index`.
fn part_events(at: &Value, part: &ContentPart) -> Vec<Value> {
    let with = |fields: Value| {
        let mut event = at.clone();
        if let (Some(event), Some(fields)) = (event.as_object_mut(), fields.as_object()) {
            event.extend(fields.clone());
        }
        event
    };
    let done_part = serde_json::to_value(part).unwrap_or(Value::Null);
    let (empty, middle) = match part {
        ContentPart::OutputText { text, .. } => (
            json!({"type": "output_text", "text": "", "annotations": [], "logprobs": []}),
            vec![
                json!({"type": "response.output_text.delta", "delta": text, "logprobs": []}),
                json!({"type": "response.output_text.done", "text": text, "logprobs": []}),
            ],
        ),
        ContentPart::Refusal { refusal } => (
            json!({"type": "refusal", "refusal": ""}),
            vec![
                json!({"type": "response.refusal.delta", "delta": refusal}),
                json!({"type": "response.refusal.done", "refusal": refusal}),
            ],
        ),
        _ => (done_part.clone(), Vec::new()),
    };
    let mut events = vec![with(
        json!({"type": "response.content_part.added", "part": empty}),
    )];
    events.extend(middle.into_iter().map(with));
    events.push(with(
        json!({"type": "response.content_part.done", "part": done_part}),
    ));
    events
}

/// Waits up to `timeout` for the response's terminal event and returns the
/// response object it carries.
pub async fn wait_for_end(app: &AppState, response: &str, timeout: Duration) -> Option<Value> {
    let mut subscription = app.hub.subscribe(response).await;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Ok(logged) = events::read_after(&app.kv, response, None).await
            && let Some((_, data)) = logged
                .iter()
                .rev()
                .find(|(_, d)| header(d).is_some_and(|(kind, _)| TERMINAL.contains(&kind.as_str())))
        {
            return serde_json::from_str::<Value>(data)
                .ok()?
                .get("response")
                .cloned();
        }
        let wait = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .min(RESYNC_EVERY);
        if wait.is_zero() {
            return None;
        }
        loop {
            match tokio::time::timeout(wait, subscription.receiver.recv()).await {
                Ok(Ok(Live::Event(data))) => {
                    if header(&data).is_some_and(|(kind, _)| TERMINAL.contains(&kind.as_str())) {
                        return serde_json::from_str::<Value>(&data)
                            .ok()?
                            .get("response")
                            .cloned();
                    }
                }
                Ok(Err(RecvError::Closed)) => return None,
                // Resync, lag or a quiet second: read the log again.
                _ => break,
            }
        }
    }
}

/// One Server-Sent Event of a stream, as its fields arrive: `data` is one
/// JSON event (`[DONE]` ends a Chat Completions stream), `event` its type,
/// `id` its sequence number (send it back as `Last-Event-ID` to resume).
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct SseEvent {
    /// The event as JSON.
    pub data: String,
    pub event: Option<String>,
    pub id: Option<String>,
    pub retry: Option<u64>,
}
