//! Delta latency: the time from the worker's emit of a
//! `response.output_text.delta` (an `events::append` into the response's
//! log, which also publishes it) to its arrival at an SSE client of the api.
//!
//! This program plays both ends. Its emitters call the same
//! `turnpike_core::events::append` the worker's `Emitter` calls, on the
//! stack's Redis, one task per response appending in sequence order as a
//! turn does, at a steady total rate spread evenly over the responses. Each
//! delta's text is its emit instant in microseconds on this process's clock,
//! so a client subtracts it from its arrival time with no clock skew in
//! between. The clients share the machine's cores with the api, Redis and
//! the emitters, as every other `make bench` figure does.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use eventsource_stream::Eventsource;
use futures_util::{StreamExt, TryStreamExt};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use turnpike_core::Settings;
use turnpike_core::events;
use turnpike_core::kv::Kv;

use crate::Api;

/// How long the streams may take to deliver `response.created`, and to end
/// after the last `response.completed` was appended.
const SETTLE: Duration = Duration::from_secs(30);

/// What one client saw on its stream.
#[derive(Default)]
struct Received {
    latencies_us: Vec<u64>,
    /// Events whose sequence number was not the one after the previous event.
    out_of_order: u64,
    completed: bool,
}

/// What one emitter appended.
#[derive(Default)]
struct Emitted {
    deltas: u64,
    /// Appends that failed or found the sequence number taken: gaps.
    failed: u64,
}

/// When one emitter appends: `deltas` times, every `period` from `first`.
/// A count, not a deadline: a late timer near the end must not drop a delta
/// that the client would then be blamed for not receiving.
struct Schedule {
    origin: Instant,
    first: Instant,
    period: Duration,
    deltas: u64,
    retention: Duration,
}

fn micros_since(origin: Instant) -> u64 {
    u64::try_from(origin.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// Streams `ids` (queued responses nobody else emits for) with `rate`
/// deltas per second in all for `duration`; returns the bench line.
pub async fn run(
    api: &Api,
    settings: &Settings,
    ids: &[String],
    rate: u64,
    duration: Duration,
) -> anyhow::Result<Value> {
    if rate == 0 {
        bail!("RATE must be at least 1 delta per second");
    }
    let kv = Kv::new(&settings.redis)?;
    let retention = Duration::from_millis(settings.events.retention_ms);
    let origin = Instant::now();
    let n = ids.len();

    // A client reports once it has seen `response.created`: from then on the
    // api is subscribed to that response and forwarding live events.
    let (created_tx, mut created_rx) = mpsc::channel::<()>(n);
    let mut clients = Vec::with_capacity(n);
    for opened in api.open_streams(ids).await {
        let response = opened.context("opening an event stream")?;
        clients.push(tokio::spawn(follow(response, origin, created_tx.clone())));
    }
    drop(created_tx);
    futures_util::stream::iter(ids)
        .map(|id| {
            let kv = kv.clone();
            async move {
                let created = json!({"type": "response.created", "sequence_number": 0,
                    "response": {"id": id, "object": "response", "status": "in_progress"}});
                events::append(&kv, id, 0, &created.to_string(), retention).await
            }
        })
        .buffer_unordered(64)
        .try_collect::<Vec<bool>>()
        .await?;
    for ready in 0..n {
        if !matches!(
            tokio::time::timeout(SETTLE, created_rx.recv()).await,
            Ok(Some(()))
        ) {
            bail!("only {ready} of {n} streams delivered response.created");
        }
    }

    let period = Duration::from_secs_f64(n as f64 / rate as f64);
    let per_stream = (rate * duration.as_secs() / n as u64).max(1);
    let start = Instant::now() + Duration::from_millis(100);
    let emitters: Vec<_> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            let schedule = Schedule {
                origin,
                first: start + period.mul_f64(i as f64 / n as f64),
                period,
                deltas: per_stream,
                retention,
            };
            tokio::spawn(emit(kv.clone(), id.clone(), schedule))
        })
        .collect();
    let mut emitted = Emitted::default();
    for emitter in emitters {
        let one = emitter.await?;
        emitted.deltas += one.deltas;
        emitted.failed += one.failed;
    }

    let deadline = tokio::time::Instant::now() + SETTLE;
    let mut latencies_us = Vec::with_capacity(usize::try_from(emitted.deltas).unwrap_or(0));
    let (mut out_of_order, mut unfinished) = (0, 0);
    for client in clients {
        match tokio::time::timeout_at(deadline, client).await {
            Ok(Ok(received)) => {
                latencies_us.extend(received.latencies_us);
                out_of_order += received.out_of_order;
                unfinished += u64::from(!received.completed);
            }
            _ => unfinished += 1,
        }
    }
    if latencies_us.is_empty() {
        bail!("no delta reached a client");
    }
    latencies_us.sort_unstable();
    let received = latencies_us.len() as u64;
    Ok(json!({
        "streams": n,
        "seconds": duration.as_secs(),
        "sent": per_stream * n as u64,
        "appended": emitted.deltas,
        "received": received,
        "lost": emitted.deltas.saturating_sub(received),
        "appends_failed": emitted.failed,
        "out_of_order": out_of_order,
        "unfinished": unfinished,
        "deltas_per_s": emitted.deltas as f64 / duration.as_secs_f64(),
        "p50_ms": percentile_ms(&latencies_us, 0.50),
        "p99_ms": percentile_ms(&latencies_us, 0.99),
        "max_ms": percentile_ms(&latencies_us, 1.0),
    }))
}

/// Nearest-rank percentile of sorted microseconds, in milliseconds.
fn percentile_ms(sorted_us: &[u64], p: f64) -> f64 {
    let rank = ((p * sorted_us.len() as f64).ceil() as usize).clamp(1, sorted_us.len());
    sorted_us.get(rank - 1).copied().unwrap_or(0) as f64 / 1000.0
}

/// One response's emitter: deltas on schedule, then `response.completed`.
async fn emit(kv: Kv, id: String, schedule: Schedule) -> Emitted {
    let mut ticks = tokio::time::interval_at(schedule.first.into(), schedule.period);
    let mut out = Emitted::default();
    let mut seq = 1;
    for _ in 0..schedule.deltas {
        ticks.tick().await;
        let delta = json!({"type": "response.output_text.delta", "sequence_number": seq,
            "item_id": "msg_sse_bench", "output_index": 0, "content_index": 0,
            "delta": micros_since(schedule.origin).to_string()});
        match events::append(&kv, &id, seq, &delta.to_string(), schedule.retention).await {
            Ok(true) => out.deltas += 1,
            Ok(false) | Err(_) => out.failed += 1,
        }
        seq += 1;
    }
    let completed = json!({"type": "response.completed", "sequence_number": seq,
        "response": {"id": id, "object": "response", "status": "completed"}})
    .to_string();
    // The terminal event is what ends the client's stream: retry it as the
    // worker's emitter retries.
    for _ in 0..5 {
        if events::append(&kv, &id, seq, &completed, schedule.retention)
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    out
}

/// Reads one stream to its end, timing each delta on arrival.
async fn follow(
    response: reqwest::Response,
    origin: Instant,
    created: mpsc::Sender<()>,
) -> Received {
    let mut out = Received::default();
    let mut events = response.bytes_stream().eventsource();
    let mut last: Option<u64> = None;
    while let Some(Ok(event)) = events.next().await {
        let arrived_us = micros_since(origin);
        let Ok(data) = serde_json::from_str::<Value>(&event.data) else {
            continue;
        };
        let seq = data["sequence_number"].as_u64();
        if seq != Some(last.map_or(0, |l| l + 1)) {
            out.out_of_order += 1;
        }
        last = seq.or(last);
        match event.event.as_str() {
            "response.created" => {
                let _ = created.send(()).await;
            }
            "response.output_text.delta" => {
                if let Some(at_us) = data["delta"].as_str().and_then(|d| d.parse::<u64>().ok()) {
                    out.latencies_us.push(arrived_us.saturating_sub(at_us));
                }
            }
            "response.completed" => {
                out.completed = true;
                break;
            }
            _ => {}
        }
    }
    out
}
