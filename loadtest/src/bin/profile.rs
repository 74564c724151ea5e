//! The read-heavy chat profile in goose, with its accounting.
//!
//! Every goose user loops: draw a tenant and one of its conversations (Zipf),
//! draw a request kind from the mix, make it. Turns are streamed to their
//! end; time to the first text delta and to the terminal event are goose
//! custom requests (`SSE first token`, `SSE terminal event`), since goose
//! itself times only the response headers. Every stream's sequence numbers
//! are checked; a lost, repeated or unfinished event fails the run.
//!
//! Usage: profile [goose options]   (e.g. --users 32 --run-time 30s
//!        --report-file out.html --report-file out.json)
//! Environment:
//!   LOADTEST_HOSTS     api base URLs, comma-separated (users spread over
//!                      them); default $TURNPIKE_URL
//!   LOADTEST_DATABASE_URL  where the seeded data set is read from
//!   LOADTEST_MIX       request mix in percent (default below)
//!   LOADTEST_ZIPF_S    Zipf exponent for tenants and conversations (1.1)
//!   LOADTEST_NODES     node=superuser URL,… for pg_stat_statements and lag
//!   LOADTEST_OUT       where accounting.json goes (target/loadtest)
//!   TURNPIKE_DEV_DIR   the stack whose processes are accounted
#![allow(clippy::print_stdout)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use eventsource_stream::Eventsource;
use futures_util::StreamExt;
use goose::goose::GooseResponse;
use goose::prelude::*;
use serde_json::{Value, json};
use turnpike_loadtest::accounting::{self, Sources};
use turnpike_loadtest::profile::{Draw, Kind, Mix, Profile, Sequence, StreamTally};

struct State {
    profile: Profile,
    hosts: Vec<String>,
    tally: StreamTally,
}

static STATE: OnceLock<State> = OnceLock::new();

fn state() -> &'static State {
    STATE
        .get()
        .unwrap_or_else(|| unreachable!("set before the attack starts"))
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> Result<()> {
    // Goose's options first: --help answers before anything is read.
    let attack = GooseAttack::initialize()?;
    let hosts: Vec<String> = env("LOADTEST_HOSTS")
        .or_else(|| env("TURNPIKE_URL"))
        .context("set LOADTEST_HOSTS or TURNPIKE_URL (source the dev stack's env file)")?
        .split(',')
        .map(|h| h.trim().trim_end_matches('/').to_owned())
        .filter(|h| !h.is_empty())
        .collect();
    let database = env("LOADTEST_DATABASE_URL")
        .or_else(|| env("TURNPIKE__DATABASE__NODES__PRIMARY__URL"))
        .context("set LOADTEST_DATABASE_URL")?;
    let mix = Mix::parse(&env("LOADTEST_MIX").unwrap_or_else(|| Mix::DEFAULT.to_owned()))?;
    let zipf_s: f64 = env("LOADTEST_ZIPF_S")
        .map(|s| s.parse())
        .transpose()
        .context("LOADTEST_ZIPF_S is a number")?
        .unwrap_or(1.1);
    let out = PathBuf::from(env("LOADTEST_OUT").unwrap_or_else(|| "target/loadtest".into()));
    std::fs::create_dir_all(&out)?;

    let profile = Profile::load(&database, mix.clone(), zipf_s).await?;
    let conversations: usize = profile.tenants.iter().map(|t| t.conversations.len()).sum();
    println!(
        "profile: {} tenants, {conversations} conversations, Zipf s={zipf_s}, api {}",
        profile.tenants.len(),
        hosts.join(" ")
    );
    println!(
        "mix: {}",
        Kind::ALL
            .iter()
            .map(|k| format!("{} {:.1}%", k.name(), mix.percent(*k)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let first_host = hosts[0].clone();
    let metrics = hosts.iter().map(|h| format!("{h}/metrics")).collect();
    if STATE
        .set(State {
            profile,
            hosts,
            tally: StreamTally::default(),
        })
        .is_err()
    {
        bail!("the profile was loaded twice");
    }

    let nodes: BTreeMap<String, String> = env("LOADTEST_NODES")
        .unwrap_or_default()
        .split(',')
        .filter_map(|pair| pair.split_once('='))
        .map(|(n, u)| (n.trim().to_owned(), u.trim().to_owned()))
        .collect();
    let sources = Sources {
        processes: env("TURNPIKE_DEV_DIR")
            .map(|d| accounting::discover(&PathBuf::from(d)))
            .unwrap_or_default(),
        nodes,
        redis_url: env("TURNPIKE__REDIS__URL"),
        metrics,
    };
    let before = sources.before().await?;
    let lag = sources.sample_lag();

    let attack = attack
        .register_scenario(
            scenario!("Chat")
                .register_transaction(transaction!(spread).set_on_start())
                .register_transaction(transaction!(one_request).set_name("request")),
        )
        .set_default(GooseDefault::Host, first_host.as_str())?
        .set_default(GooseDefault::Users, 32)?
        .set_default(GooseDefault::IncreaseRate, "32")?
        .set_default(GooseDefault::RunTime, 30)?
        .set_default(
            GooseDefault::CoordinatedOmissionMitigation,
            GooseCoordinatedOmissionMitigation::Average,
        )?;
    let started = Instant::now();
    let outcome = attack.execute().await;
    let seconds = started.elapsed().as_secs_f64();

    let tally = &state().tally;
    let streams = tally.summary();
    let report = sources.after(&before, streams.requests, lag).await?;
    for line in report.lines() {
        println!("{line}");
    }
    println!(
        "streams: {} streams, {} events, {} lost, {} repeated, {} unfinished; {} resumed; \
         cancels: {} cancelled, {} after the turn ended",
        streams.streams,
        streams.events,
        streams.lost,
        streams.repeated,
        streams.unfinished,
        streams.resumed,
        streams.cancelled,
        streams.cancel_too_late
    );
    let processes: Vec<Value> = sources
        .processes
        .iter()
        .map(|p| json!({"kind": p.kind, "pid": p.pid}))
        .collect();
    std::fs::write(
        out.join("accounting.json"),
        serde_json::to_vec_pretty(&json!({
            "wall_seconds": seconds,
            "mix_percent": Kind::ALL.iter().map(|k| (k.name(), mix.percent(*k))).collect::<BTreeMap<_, _>>(),
            "zipf_s": zipf_s,
            "api_processes": state().hosts.len(),
            "processes": processes,
            "streams": streams,
            "accounting": report,
        }))?,
    )?;
    println!(
        "accounting written to {}",
        out.join("accounting.json").display()
    );

    let faults = streams.lost + streams.repeated + streams.unfinished;
    let metrics = outcome.map_err(|e| anyhow::anyhow!("{e}"))?;
    if faults > 0 {
        bail!("{faults} stream events lost, repeated or unfinished");
    }
    drop(metrics);
    Ok(())
}

/// On start: each user talks to one api process, round robin.
async fn spread(user: &mut GooseUser) -> TransactionResult {
    let hosts = &state().hosts;
    let host = hosts[user.weighted_users_index % hosts.len()].clone();
    user.set_base_url(&host)
}

async fn one_request(user: &mut GooseUser) -> TransactionResult {
    let state = state();
    let draw = state.profile.draw(&mut rand::rng());
    state.tally.requests.fetch_add(1, Ordering::Relaxed);
    match draw.kind {
        Kind::Items => {
            let path = format!("/v1/conversations/{}/items?limit=20", draw.conversation);
            drain(get(user, &draw, &path, "items page").await?).await;
        }
        Kind::Conversation => {
            let path = format!("/v1/conversations/{}", draw.conversation);
            drain(get(user, &draw, &path, "conversation").await?).await;
        }
        Kind::List => {
            drain(
                get(
                    user,
                    &draw,
                    "/v1/conversations?limit=20",
                    "conversation list",
                )
                .await?,
            )
            .await;
        }
        Kind::Turn => turn(user, &draw, false).await?,
        Kind::Resume => turn(user, &draw, true).await?,
        Kind::Cancel => cancel(user, &draw).await?,
    }
    Ok(())
}

async fn get(
    user: &mut GooseUser,
    draw: &Draw<'_>,
    path: &str,
    name: &str,
) -> Result<GooseResponse, Box<TransactionError>> {
    let builder = user
        .get_request_builder(&GooseMethod::Get, path)?
        .header("authorization", &draw.tenant.authorization);
    user.request(
        GooseRequest::builder()
            .method(GooseMethod::Get)
            .path(path)
            .name(name)
            .set_request_builder(builder)
            .build(),
    )
    .await
}

async fn post(
    user: &mut GooseUser,
    draw: &Draw<'_>,
    path: &str,
    name: &str,
    body: &Value,
) -> Result<GooseResponse, Box<TransactionError>> {
    let builder = user
        .get_request_builder(&GooseMethod::Post, path)?
        .header("authorization", &draw.tenant.authorization)
        .json(body);
    user.request(
        GooseRequest::builder()
            .method(GooseMethod::Post)
            .path(path)
            .name(name)
            .set_request_builder(builder)
            .build(),
    )
    .await
}

/// Reads a body to its end, so the connection is reused.
async fn drain(goose: GooseResponse) {
    if let Ok(response) = goose.response {
        let _ = response.bytes().await;
    }
}

const QUESTION: &str = "Which roads charge a toll, and why?";

/// Where a followed stream got to.
struct Followed {
    sequence: Sequence,
    response_id: Option<String>,
    first_delta: Option<Duration>,
    terminal: Option<Duration>,
    /// The sequence number of the first delta, when following stopped there.
    stopped_at: Option<u64>,
    /// The type of the last event read.
    last: String,
}

/// Reads SSE events, checking sequence numbers, until a terminal event
/// (or, with `stop_at_first_delta`, the first text delta).
async fn follow(
    response: goose_reqwest::Response,
    mut sequence: Sequence,
    started: Instant,
    stop_at_first_delta: bool,
) -> Followed {
    let chunks = futures_util::stream::unfold(Some(response), |response| async move {
        let mut response = response?;
        match response.chunk().await {
            Ok(Some(bytes)) => Some((Ok(bytes), Some(response))),
            Ok(None) => None,
            Err(error) => Some((Err(error), None)),
        }
    });
    let mut events = Box::pin(chunks.eventsource());
    let mut followed = Followed {
        sequence: Sequence::starting_after(None),
        response_id: None,
        first_delta: None,
        terminal: None,
        stopped_at: None,
        last: String::new(),
    };
    while let Some(Ok(event)) = events.next().await {
        let Ok(data) = serde_json::from_str::<Value>(&event.data) else {
            continue;
        };
        if let Some(number) = data["sequence_number"].as_u64() {
            sequence.see(number);
        }
        let kind = data["type"].as_str().unwrap_or_default();
        followed.last = kind.to_owned();
        if kind == "response.created" {
            followed.response_id = data["response"]["id"].as_str().map(str::to_owned);
        }
        if kind == "response.output_text.delta" && followed.first_delta.is_none() {
            followed.first_delta = Some(started.elapsed());
            if stop_at_first_delta {
                followed.stopped_at = data["sequence_number"].as_u64();
                break;
            }
        }
        if matches!(
            kind,
            "response.completed"
                | "response.failed"
                | "response.incomplete"
                | "response.cancelled"
                | "error"
        ) {
            followed.terminal = Some(started.elapsed());
            break;
        }
    }
    followed.sequence = sequence;
    followed
}

/// A streamed turn, followed to its end; with `resume`, dropped after the
/// first delta and followed again from there.
async fn turn(user: &mut GooseUser, draw: &Draw<'_>, resume: bool) -> TransactionResult {
    let tally = &state().tally;
    let started = Instant::now();
    let body = json!({"conversation": draw.conversation, "input": QUESTION, "stream": true});
    let goose = post(user, draw, "/v1/responses", "turn (stream)", &body).await?;
    let Ok(response) = goose.response else {
        return Ok(());
    };
    if !response.status().is_success() {
        let _ = response.bytes().await;
        return Ok(());
    }
    tally.streams.fetch_add(1, Ordering::Relaxed);
    let mut followed = follow(response, Sequence::starting_after(None), started, resume).await;
    if let Some(ttft) = followed.first_delta {
        user.record_custom_request_duration("SSE", "first token", ttft, true, None, None)
            .await?;
    }
    if resume
        && followed.terminal.is_none()
        && let (Some(id), Some(at)) = (followed.response_id.clone(), followed.stopped_at)
    {
        let before = followed.sequence;
        let path = format!("/v1/responses/{id}?stream=true&starting_after={at}");
        let builder = user
            .get_request_builder(&GooseMethod::Get, &path)?
            .header("authorization", &draw.tenant.authorization);
        let goose = user
            .request(
                GooseRequest::builder()
                    .method(GooseMethod::Get)
                    .path(path.as_str())
                    .name("resume (stream)")
                    .set_request_builder(builder)
                    .build(),
            )
            .await?;
        tally.requests.fetch_add(1, Ordering::Relaxed);
        let Ok(response) = goose.response else {
            return Ok(());
        };
        tally.resumed.fetch_add(1, Ordering::Relaxed);
        followed = follow(response, Sequence::starting_after(Some(at)), started, false).await;
        followed.response_id = Some(id);
        followed.sequence.events += before.events;
        followed.sequence.lost += before.lost;
        followed.sequence.repeated += before.repeated;
    }
    tally
        .events
        .fetch_add(followed.sequence.events, Ordering::Relaxed);
    tally
        .lost
        .fetch_add(followed.sequence.lost, Ordering::Relaxed);
    tally
        .repeated
        .fetch_add(followed.sequence.repeated, Ordering::Relaxed);
    let name = if resume {
        "resumed to terminal event"
    } else {
        "terminal event"
    };
    match followed.terminal {
        Some(total) => {
            user.record_custom_request_duration("SSE", name, total, true, None, None)
                .await?
        }
        None => {
            tally.unfinished.fetch_add(1, Ordering::Relaxed);
            tally
                .unfinished_responses
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((
                    followed.response_id.clone().unwrap_or_default(),
                    followed.last.clone(),
                ));
            user.record_custom_request_duration(
                "SSE",
                name,
                started.elapsed(),
                false,
                None,
                Some("the stream ended without a terminal event"),
            )
            .await?
        }
    }
    Ok(())
}

/// A background turn, cancelled at once: 200 when the cancel caught it,
/// 409 when the (fast) turn had already ended — both are right answers.
async fn cancel(user: &mut GooseUser, draw: &Draw<'_>) -> TransactionResult {
    let tally = &state().tally;
    let body = json!({"conversation": draw.conversation, "input": QUESTION, "background": true});
    let goose = post(user, draw, "/v1/responses", "turn (background)", &body).await?;
    let Ok(response) = goose.response else {
        return Ok(());
    };
    let Ok(created) = response.json::<Value>().await else {
        return Ok(());
    };
    let Some(id) = created["id"].as_str() else {
        return Ok(());
    };
    tally.requests.fetch_add(1, Ordering::Relaxed);
    let path = format!("/v1/responses/{id}/cancel");
    let mut goose = post(user, draw, &path, "cancel", &json!({})).await?;
    let status = goose.response.as_ref().map(|r| r.status().as_u16()).ok();
    match status {
        Some(200) => {
            tally.cancelled.fetch_add(1, Ordering::Relaxed);
        }
        Some(409) => {
            tally.cancel_too_late.fetch_add(1, Ordering::Relaxed);
            user.set_success(&mut goose.request)?;
        }
        _ => {}
    }
    drain(goose).await;
    Ok(())
}
