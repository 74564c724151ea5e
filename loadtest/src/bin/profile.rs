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
//!   LOADTEST_TENANT_ZIPF_S, LOADTEST_CONVERSATION_ZIPF_S  Zipf exponents
//!                      of tenants (0.8) and of a tenant's conversations (1.1)
//!   LOADTEST_NODES     node=superuser URL,… for pg_stat_statements and lag
//!   LOADTEST_OUT       where accounting.json goes (target/loadtest)
//!   LOADTEST_VERIFY    1: check each completed stream's text against the
//!                      stored response
//!   TURNPIKE_DEV_DIR   the stack whose processes are accounted
//! Besides accounting.json, LOADTEST_OUT gets timeline.jsonl: the running
//! totals (requests by status, stream faults) once a second.
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
    /// Check each completed stream against the stored response.
    verify: bool,
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
    let exponent = |name: &str, default: f64| -> Result<f64> {
        Ok(env(name)
            .map(|s| s.parse())
            .transpose()
            .with_context(|| format!("{name} is a number"))?
            .unwrap_or(default))
    };
    // A few tenants are much busier than most; within a tenant, the
    // latest conversations take most reads.
    let tenant_s = exponent("LOADTEST_TENANT_ZIPF_S", 0.8)?;
    let conversation_s = exponent("LOADTEST_CONVERSATION_ZIPF_S", 1.1)?;
    let out = PathBuf::from(env("LOADTEST_OUT").unwrap_or_else(|| "target/loadtest".into()));
    std::fs::create_dir_all(&out)?;

    let profile = Profile::load(&database, mix.clone(), tenant_s, conversation_s).await?;
    let conversations: usize = profile.tenants.iter().map(|t| t.conversations.len()).sum();
    println!(
        "profile: {} tenants (Zipf s={tenant_s}), {conversations} conversations (Zipf s={conversation_s}), api {}",
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
            verify: env("LOADTEST_VERIFY").is_some_and(|v| v == "1"),
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
    // Once a second, the running totals (chaos phases are judged on them).
    let timeline = {
        let path = out.join("timeline.jsonl");
        let _ = std::fs::remove_file(&path);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis());
                let line = json!({"t_ms": now, "totals": state().tally.summary()});
                let appended = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .and_then(|mut f| {
                        use std::io::Write;
                        writeln!(f, "{line}")
                    });
                if appended.is_err() {
                    return;
                }
            }
        })
    };
    let started = Instant::now();
    let outcome = attack.execute().await;
    timeline.abort();
    let seconds = started.elapsed().as_secs_f64();

    let tally = &state().tally;
    let streams = tally.summary();
    let report = sources.after(&before, streams.requests, lag).await?;
    for line in report.lines() {
        println!("{line}");
    }
    println!(
        "streams: {} streams, {} events, {} lost, {} repeated, {} unfinished; {} resumed, \
         {} reconnected after a break, {} differing from the stored response; \
         cancels: {} cancelled, {} after the turn ended",
        streams.streams,
        streams.events,
        streams.lost,
        streams.repeated,
        streams.unfinished,
        streams.resumed,
        streams.reconnects,
        streams.mismatched,
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
            "zipf_s": {"tenants": tenant_s, "conversations": conversation_s},
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

    let faults = streams.lost + streams.repeated + streams.unfinished + streams.mismatched;
    outcome.map_err(|e| anyhow::anyhow!("{e}"))?;
    if faults > 0 {
        bail!(
            "{faults} stream events lost or repeated, streams unfinished or differing from what was stored"
        );
    }
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

/// Makes one request and counts its status (0: no answer). When the api
/// process did not answer at all, the user moves to the next one, as a
/// load balancer would send it elsewhere.
async fn send(
    user: &mut GooseUser,
    method: GooseMethod,
    path: &str,
    name: &str,
    authorization: &str,
    body: Option<&Value>,
    idempotency_key: Option<&str>,
) -> Result<GooseResponse, Box<TransactionError>> {
    let verb = if matches!(method, GooseMethod::Get) {
        "GET"
    } else {
        "POST"
    };
    let mut builder = user
        .get_request_builder(&method, path)?
        .header("authorization", authorization);
    if let Some(body) = body {
        builder = builder.json(body);
    }
    if let Some(key) = idempotency_key {
        builder = builder.header("idempotency-key", key);
    }
    let goose = user
        .request(
            GooseRequest::builder()
                .method(method)
                .path(path)
                .name(name)
                .set_request_builder(builder)
                .build(),
        )
        .await?;
    let status = goose.response.as_ref().map_or(0, |r| r.status().as_u16());
    state().tally.count_status(verb, status);
    if status == 0 {
        next_host(user)?;
    }
    Ok(goose)
}

/// Moves the user to the next api process.
fn next_host(user: &mut GooseUser) -> TransactionResult {
    let hosts = &state().hosts;
    let current = user.base_url.as_str().trim_end_matches('/').to_owned();
    let at = hosts.iter().position(|h| *h == current).unwrap_or(0);
    user.set_base_url(&hosts[(at + 1) % hosts.len()])
}

async fn get(
    user: &mut GooseUser,
    draw: &Draw<'_>,
    path: &str,
    name: &str,
) -> Result<GooseResponse, Box<TransactionError>> {
    send(
        user,
        GooseMethod::Get,
        path,
        name,
        &draw.tenant.authorization,
        None,
        None,
    )
    .await
}

async fn post(
    user: &mut GooseUser,
    draw: &Draw<'_>,
    path: &str,
    name: &str,
    body: &Value,
    idempotency_key: Option<&str>,
) -> Result<GooseResponse, Box<TransactionError>> {
    send(
        user,
        GooseMethod::Post,
        path,
        name,
        &draw.tenant.authorization,
        Some(body),
        idempotency_key,
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

/// How long a client keeps reconnecting to a stream that broke.
const RECONNECT_FOR: Duration = Duration::from_secs(60);

/// Where a followed stream got to, across reconnections.
struct Followed {
    sequence: Sequence,
    response_id: Option<String>,
    first_delta: Option<Duration>,
    terminal: Option<Duration>,
    /// The terminal event's type.
    outcome: String,
    /// The type of the last event read.
    last: String,
    /// The text deltas, joined.
    text: String,
}

impl Followed {
    fn new() -> Followed {
        Followed {
            sequence: Sequence::starting_after(None),
            response_id: None,
            first_delta: None,
            terminal: None,
            outcome: String::new(),
            last: String::new(),
            text: String::new(),
        }
    }
}

/// Reads SSE events into `followed`, checking sequence numbers, until a
/// terminal event, the end of the body, or (with `stop_at_first_delta`)
/// the first text delta.
async fn follow(
    response: goose_reqwest::Response,
    followed: &mut Followed,
    started: Instant,
    stop_at_first_delta: bool,
) {
    let chunks = futures_util::stream::unfold(Some(response), |response| async move {
        let mut response = response?;
        match response.chunk().await {
            Ok(Some(bytes)) => Some((Ok(bytes), Some(response))),
            Ok(None) => None,
            Err(error) => Some((Err(error), None)),
        }
    });
    let mut events = Box::pin(chunks.eventsource());
    while let Some(Ok(event)) = events.next().await {
        let Ok(data) = serde_json::from_str::<Value>(&event.data) else {
            continue;
        };
        if let Some(number) = data["sequence_number"].as_u64() {
            followed.sequence.see(number);
        }
        let kind = data["type"].as_str().unwrap_or_default();
        followed.last = kind.to_owned();
        if kind == "response.created" {
            followed.response_id = data["response"]["id"].as_str().map(str::to_owned);
        }
        if kind == "response.output_text.delta" {
            followed
                .text
                .push_str(data["delta"].as_str().unwrap_or_default());
            if followed.first_delta.is_none() {
                followed.first_delta = Some(started.elapsed());
                if stop_at_first_delta {
                    return;
                }
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
            followed.outcome = kind.to_owned();
            return;
        }
    }
}

/// Opens the stream again after the last event seen (on whichever api
/// process the user talks to now) and follows it.
async fn reconnect(
    user: &mut GooseUser,
    draw: &Draw<'_>,
    followed: &mut Followed,
    started: Instant,
    name: &str,
) -> TransactionResult {
    let Some(id) = followed.response_id.clone() else {
        return Ok(());
    };
    let path = match followed.sequence.last() {
        Some(at) => format!("/v1/responses/{id}?stream=true&starting_after={at}"),
        None => format!("/v1/responses/{id}?stream=true"),
    };
    state().tally.requests.fetch_add(1, Ordering::Relaxed);
    let goose = get(user, draw, &path, name).await?;
    if let Ok(response) = goose.response {
        if response.status().is_success() {
            follow(response, followed, started, false).await;
        } else {
            let _ = response.bytes().await;
        }
    }
    Ok(())
}

/// A streamed turn, followed to its end; with `resume`, dropped after the
/// first delta and followed again from there. A stream that breaks is
/// reconnected from its last event, as a client would, for up to 30 s.
async fn turn(user: &mut GooseUser, draw: &Draw<'_>, resume: bool) -> TransactionResult {
    let tally = &state().tally;
    let started = Instant::now();
    // As the official SDKs do: a create retried after a broken connection
    // carries the same key, and attaches to the response the first made.
    let key = uuid::Uuid::now_v7().to_string();
    let body = json!({"conversation": draw.conversation, "input": QUESTION, "stream": true});
    let goose = post(
        user,
        draw,
        "/v1/responses",
        "turn (stream)",
        &body,
        Some(&key),
    )
    .await?;
    let Ok(response) = goose.response else {
        return Ok(());
    };
    if !response.status().is_success() {
        let _ = response.bytes().await;
        return Ok(());
    }
    tally.streams.fetch_add(1, Ordering::Relaxed);
    let mut followed = Followed::new();
    follow(response, &mut followed, started, resume).await;
    // Broken before the response was named: the create is sent again.
    while followed.response_id.is_none()
        && followed.terminal.is_none()
        && started.elapsed() < RECONNECT_FOR
    {
        tally.reconnects.fetch_add(1, Ordering::Relaxed);
        tally.requests.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(200)).await;
        next_host(user)?;
        if let Ok(response) = post(
            user,
            draw,
            "/v1/responses",
            "turn (stream)",
            &body,
            Some(&key),
        )
        .await?
        .response
            && response.status().is_success()
        {
            follow(response, &mut followed, started, false).await;
        }
    }
    if let Some(ttft) = followed.first_delta {
        user.record_custom_request_duration("SSE", "first token", ttft, true, None, None)
            .await?;
    }
    if resume && followed.terminal.is_none() && followed.first_delta.is_some() {
        tally.resumed.fetch_add(1, Ordering::Relaxed);
        reconnect(user, draw, &mut followed, started, "resume (stream)").await?;
    }
    while followed.terminal.is_none()
        && followed.response_id.is_some()
        && started.elapsed() < RECONNECT_FOR
    {
        tally.reconnects.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(200)).await;
        next_host(user)?;
        reconnect(user, draw, &mut followed, started, "reconnect (stream)").await?;
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
                .await?;
            if state().verify && followed.outcome == "response.completed" {
                verify(user, draw, &followed).await?;
            }
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

/// The stored response says what the stream said: its output text is the
/// deltas joined.
async fn verify(user: &mut GooseUser, draw: &Draw<'_>, followed: &Followed) -> TransactionResult {
    let Some(id) = &followed.response_id else {
        return Ok(());
    };
    state().tally.requests.fetch_add(1, Ordering::Relaxed);
    let goose = get(
        user,
        draw,
        &format!("/v1/responses/{id}"),
        "verify response",
    )
    .await?;
    let Ok(response) = goose.response else {
        return Ok(());
    };
    let Ok(stored) = response.json::<Value>().await else {
        return Ok(());
    };
    let text: String = stored["output"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|item| item["content"].as_array().into_iter().flatten())
        .filter_map(|part| part["text"].as_str())
        .collect();
    if text != followed.text {
        state().tally.mismatched.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

/// A background turn, cancelled at once: 200 when the cancel caught it,
/// 409 when the (fast) turn had already ended — both are right answers.
async fn cancel(user: &mut GooseUser, draw: &Draw<'_>) -> TransactionResult {
    let tally = &state().tally;
    let body = json!({"conversation": draw.conversation, "input": QUESTION, "background": true});
    let goose = post(
        user,
        draw,
        "/v1/responses",
        "turn (background)",
        &body,
        None,
    )
    .await?;
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
    let mut goose = post(user, draw, &path, "cancel", &json!({}), None).await?;
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
