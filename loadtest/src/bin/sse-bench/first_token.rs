//! Time to first token through the whole stack: a client creates a streamed
//! turn (`POST /v1/responses` with `stream: true`), the api queues it, a
//! worker claims it, calls the model (the zero-latency mock), and the first
//! `response.output_text.delta` travels back through the event log and the
//! api to the client. `concurrency` clients do this back to back until
//! `turns` turns have run; with `chain` above 1 each client goes on from its
//! last response (`previous_response_id`) for `chain` turns before it starts
//! a new conversation, as a chat does.
//!
//! Every stream is checked, not assumed: sequence numbers from 0 without a
//! gap or repeat, ending with `response.completed`, whose stored text equals
//! the deltas the client added up.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::Api;

/// One turn as its client saw it, in microseconds from sending the request.
#[derive(Default)]
struct Turn {
    headers_us: u64,
    first_event_us: u64,
    first_delta_us: Option<u64>,
    done_us: u64,
    /// What is wrong with the stream, if anything.
    problem: Option<String>,
    /// The response's id, as `response.completed` gave it.
    id: Option<String>,
}

/// Runs the turns and returns the figures as one JSON object. Client `n`
/// starts `n × stagger` after the first.
pub async fn run(
    api: &Api,
    turns: usize,
    concurrency: usize,
    stagger: Duration,
    chain: usize,
) -> anyhow::Result<Value> {
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let clients: Vec<_> = (0..concurrency.max(1))
        .map(|n| {
            let api = api.clone();
            let next = Arc::clone(&next);
            let start = tokio::time::Instant::from_std(started)
                + stagger * u32::try_from(n).unwrap_or(u32::MAX);
            tokio::spawn(async move {
                // The load's own pacing: when this client joins.
                tokio::time::sleep_until(start).await;
                let mut seen = Vec::new();
                let mut previous: Option<String> = None;
                while next.fetch_add(1, Ordering::Relaxed) < turns {
                    if seen.len() % chain.max(1) == 0 {
                        previous = None;
                    }
                    let turn = one_turn(&api, previous.as_deref()).await;
                    previous = turn.as_ref().ok().and_then(|turn| turn.id.clone());
                    seen.push(turn);
                }
                seen
            })
        })
        .collect();
    let mut all = Vec::with_capacity(turns);
    for client in clients {
        all.extend(client.await.context("a client task panicked")?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut problems: Vec<String> = Vec::new();
    let mut headers = Vec::new();
    let mut first_event = Vec::new();
    let mut first_delta = Vec::new();
    let mut done = Vec::new();
    for turn in all {
        match turn {
            Err(e) => problems.push(format!("{e:#}")),
            Ok(turn) => {
                if let Some(problem) = turn.problem {
                    problems.push(problem);
                    continue;
                }
                headers.push(turn.headers_us);
                first_event.push(turn.first_event_us);
                first_delta.extend(turn.first_delta_us);
                done.push(turn.done_us);
            }
        }
    }
    let failed = problems.len();
    problems.truncate(3);
    Ok(json!({
        "turns": turns,
        "concurrency": concurrency,
        "chain": chain.max(1),
        "checked": done.len(),
        "failed": failed,
        "examples": problems,
        "turns_per_s": turns as f64 / elapsed,
        "headers": percentiles(&mut headers),
        "first_event": percentiles(&mut first_event),
        "first_delta": percentiles(&mut first_delta),
        "done": percentiles(&mut done),
    }))
}

fn percentiles(us: &mut [u64]) -> Value {
    us.sort_unstable();
    let at = |p: f64| -> f64 {
        if us.is_empty() {
            return f64::NAN;
        }
        let rank = ((p * us.len() as f64).ceil() as usize).clamp(1, us.len());
        us[rank - 1] as f64 / 1000.0
    };
    json!({"p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": at(1.0)})
}

fn micros(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX)
}

async fn one_turn(api: &Api, previous: Option<&str>) -> anyhow::Result<Turn> {
    let mut body = json!({"input": "how far is the next gate?", "stream": true});
    if let Some(previous) = previous {
        body["previous_response_id"] = json!(previous);
    }
    let sent = Instant::now();
    let response = api
        .http
        .post(format!("{}/v1/responses", api.url))
        .bearer_auth(&api.key)
        .json(&body)
        .send()
        .await?
        .error_for_status()?;
    let mut turn = Turn {
        headers_us: micros(sent),
        ..Turn::default()
    };
    let mut events = response.bytes_stream().eventsource();
    let mut expected_seq = 0;
    let mut text = String::new();
    let mut stored: Option<String> = None;
    while let Some(event) = events.next().await {
        let event = event.context("reading the event stream")?;
        let at = micros(sent);
        let data: Value = serde_json::from_str(&event.data)
            .with_context(|| format!("event {} is not JSON", event.event))?;
        if expected_seq == 0 {
            turn.first_event_us = at;
        }
        if data["sequence_number"].as_u64() != Some(expected_seq) {
            turn.problem = Some(format!(
                "sequence number {} where {expected_seq} was next",
                data["sequence_number"]
            ));
            return Ok(turn);
        }
        expected_seq += 1;
        match event.event.as_str() {
            "response.output_text.delta" => {
                turn.first_delta_us.get_or_insert(at);
                text.push_str(data["delta"].as_str().unwrap_or_default());
            }
            "response.completed" => {
                turn.done_us = at;
                stored = Some(output_text(&data["response"]));
                turn.id = data["response"]["id"].as_str().map(str::to_owned);
                break;
            }
            "response.failed" | "response.incomplete" | "error" => {
                turn.problem = Some(format!("the stream ended with {}", event.event));
                return Ok(turn);
            }
            _ => {}
        }
    }
    match stored {
        None => turn.problem = Some("the stream ended without response.completed".into()),
        Some(stored) if stored != text => {
            turn.problem = Some(format!(
                "the deltas add up to {} bytes, the stored answer has {}",
                text.len(),
                stored.len()
            ));
        }
        Some(_) if turn.first_delta_us.is_none() => {
            turn.problem = Some("no delta before response.completed".into());
        }
        Some(_) => {}
    }
    Ok(turn)
}

/// The text of a response's message output, all parts together.
fn output_text(response: &Value) -> String {
    let mut text = String::new();
    for item in response["output"].as_array().into_iter().flatten() {
        if item["type"] == "message" {
            for part in item["content"].as_array().into_iter().flatten() {
                text.push_str(part["text"].as_str().unwrap_or_default());
            }
        }
    }
    text
}
