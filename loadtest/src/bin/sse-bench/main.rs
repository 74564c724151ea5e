//! The SSE benchmarks of `make bench`, run against a stack whose worker is
//! stopped, so the responses stay `queued` and nothing but this program
//! writes their event logs:
//!
//! - `sse-bench create N`: creates N background responses through the API
//!   and prints their ids, one a line.
//! - `sse-bench latency IDS_FILE RATE SECONDS`: opens one SSE stream per id
//!   and, standing in for the worker's emitter, appends events to each
//!   response's log; prints the latency from append to arrival at the client.
//! - `sse-bench idle IDS_FILE API_PID [STREAMS_PER_H2_CONNECTION]`: opens one
//!   SSE stream per id, leaves them idle, and prints the api's resident
//!   memory per stream; each stream on its own HTTP/1.1 connection, or
//!   multiplexed, that many to an HTTP/2 connection.
//! - `sse-bench first-token TURNS CONCURRENCY [STAGGER_MS [CHAIN]]`: runs TURNS
//!   streamed turns, CONCURRENCY at a time, through the whole stack (a
//!   worker must run) and prints the time to the first delta, every stream
//!   checked. With STAGGER_MS, client n starts n × STAGGER_MS ms after the
//!   first, so that long turns (a paced model) overlap evenly instead of
//!   starting together.
//!
//! `latency`, `idle` and `first-token` print one JSON object.
//!
//! `TURNPIKE_URL`, `TURNPIKE_API_KEY` and the `TURNPIKE__…` settings come
//! from the stack's env file (`scripts/dev up -d` writes it).
#![allow(clippy::print_stdout)]

mod first_token;
mod idle;
mod latency;

use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::{StreamExt, TryStreamExt};

/// Requests in flight while creating responses or opening streams: enough
/// to keep the api busy, few enough that the listen backlog never overflows.
const OPEN_CONCURRENCY: usize = 256;
const CREATE_CONCURRENCY: usize = 32;

/// The HTTP API as the benchmarks' clients see it.
#[derive(Clone)]
pub struct Api {
    pub(crate) http: reqwest::Client,
    pub(crate) url: String,
    pub(crate) key: String,
}

impl Api {
    fn from_env() -> anyhow::Result<Self> {
        let url = std::env::var("TURNPIKE_URL").context("TURNPIKE_URL is not set")?;
        let key = std::env::var("TURNPIKE_API_KEY").context("TURNPIKE_API_KEY is not set")?;
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .build()?;
        Ok(Self { http, url, key })
    }

    /// The same API over one HTTP/2 connection (cleartext, prior
    /// knowledge), as a proxy that multiplexes its clients' streams would
    /// reach it.
    fn http2(&self) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .tcp_nodelay(true)
            .http2_prior_knowledge()
            .build()?;
        Ok(Self {
            http,
            url: self.url.clone(),
            key: self.key.clone(),
        })
    }

    /// Creates a background response (queued until a worker claims it).
    async fn create_response(&self, n: usize) -> anyhow::Result<String> {
        let body = serde_json::json!({"input": format!("sse bench {n}"), "background": true});
        let created: serde_json::Value = self
            .http
            .post(format!("{}/v1/responses", self.url))
            .bearer_auth(&self.key)
            .json(&body)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        created["id"]
            .as_str()
            .map(str::to_owned)
            .context("the created response has no id")
    }

    /// Retrieves a response as JSON (not streamed).
    async fn retrieve(&self, id: &str) -> anyhow::Result<()> {
        self.http
            .get(format!("{}/v1/responses/{id}", self.url))
            .bearer_auth(&self.key)
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await?;
        Ok(())
    }

    /// Opens a response's event stream; returns once the api has answered
    /// with its headers.
    pub async fn open_stream(&self, id: &str) -> anyhow::Result<reqwest::Response> {
        let response = self
            .http
            .get(format!("{}/v1/responses/{id}?stream=true", self.url))
            .bearer_auth(&self.key)
            .header(reqwest::header::ACCEPT, "text/event-stream")
            .send()
            .await?
            .error_for_status()?;
        Ok(response)
    }

    /// Opens one stream per id, [`OPEN_CONCURRENCY`] at a time, in any
    /// order; a stream that did not open is its error.
    pub async fn open_streams(&self, ids: &[String]) -> Vec<anyhow::Result<reqwest::Response>> {
        futures_util::stream::iter(ids)
            .map(|id| self.open_stream(id))
            .buffer_unordered(OPEN_CONCURRENCY)
            .collect()
            .await
    }
}

fn read_ids(path: &str) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let ids: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    if ids.is_empty() {
        bail!("{path} holds no response ids");
    }
    Ok(ids)
}

fn arg<T: std::str::FromStr>(args: &[String], index: usize, what: &str) -> anyhow::Result<T> {
    args.get(index)
        .with_context(|| format!("missing {what}"))?
        .parse()
        .map_err(|_| anyhow::anyhow!("{what} is not valid: {:?}", args.get(index)))
}

const USAGE: &str = "usage: sse-bench create N | latency IDS_FILE RATE SECONDS | \
                     idle IDS_FILE API_PID [STREAMS_PER_H2_CONNECTION] | first-token TURNS CONCURRENCY [STAGGER_MS [CHAIN]]";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let api = Api::from_env()?;
    match args.first().map(String::as_str) {
        Some("create") => {
            let n: usize = arg(&args, 1, "N")?;
            let ids: Vec<String> = futures_util::stream::iter(0..n)
                .map(|i| api.create_response(i))
                .buffer_unordered(CREATE_CONCURRENCY)
                .try_collect()
                .await?;
            println!("{}", ids.join("\n"));
        }
        Some("latency") => {
            let ids = read_ids(&arg::<String>(&args, 1, "IDS_FILE")?)?;
            let rate: u64 = arg(&args, 2, "RATE")?;
            let seconds: u64 = arg(&args, 3, "SECONDS")?;
            let settings = turnpike_core::Settings::load()?;
            println!(
                "{}",
                latency::run(&api, &settings, &ids, rate, Duration::from_secs(seconds)).await?
            );
        }
        Some("idle") => {
            let ids = read_ids(&arg::<String>(&args, 1, "IDS_FILE")?)?;
            let pid: u32 = arg(&args, 2, "API_PID")?;
            // Optional: streams per HTTP/2 connection (default: HTTP/1.1,
            // one connection per stream).
            let per_connection: Option<usize> = args
                .get(3)
                .map(|_| arg(&args, 3, "STREAMS_PER_H2_CONNECTION"))
                .transpose()?;
            println!("{}", idle::run(&api, &ids, pid, per_connection).await?);
        }
        Some("first-token") => {
            let turns: usize = arg(&args, 1, "TURNS")?;
            let concurrency: usize = arg(&args, 2, "CONCURRENCY")?;
            let stagger: u64 = args
                .get(3)
                .map(|_| arg(&args, 3, "STAGGER_MS"))
                .transpose()?
                .unwrap_or(0);
            let stagger = Duration::from_millis(stagger);
            let chain: usize = args
                .get(4)
                .map(|_| arg(&args, 4, "CHAIN"))
                .transpose()?
                .unwrap_or(1);
            println!(
                "{}",
                first_token::run(&api, turns, concurrency, stagger, chain).await?
            );
        }
        _ => bail!(USAGE),
    }
    Ok(())
}
