//! Idle-stream memory: the api's resident memory per open SSE connection on
//! a queued response (no worker, so no events flow), read from the api
//! process's `/proc/<pid>/status` before and after opening the streams.
//!
//! The api should be freshly started after the responses were created, so
//! the figure before is a warmed-up process, not one holding memory freed by
//! earlier work that the streams would then reuse unnoticed. The api's CPU
//! while the streams idle is reported beside the memory: an idle stream is
//! not free, it re-reads its response's log once a second.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{StreamExt, TryStreamExt};

use crate::Api;

/// Time for every stream to pass the api's idle resync (once a second) a
/// few times before memory is read.
const SETTLE: Duration = Duration::from_secs(5);
/// Readings of the api's RSS after settling; their median is the figure.
const READINGS: usize = 5;
/// Linux's USER_HZ, the unit of the CPU times in `/proc/<pid>/stat`.
const TICKS_PER_S: f64 = 100.0;

/// Opens one stream per id on the api process `pid` and returns the bench line.
pub async fn run(
    api: &Api,
    ids: &[String],
    pid: u32,
    per_h2_connection: Option<usize>,
) -> anyhow::Result<serde_json::Value> {
    let n = ids.len();
    if let Some(limit) = open_files_limit(pid)?
        && limit < n as u64 + 256
    {
        bail!(
            "the api may open {limit} files, too few for {n} streams; raise `ulimit -n` and restart it"
        );
    }

    // The paths a stream takes (auth cache, database pools, the pub/sub
    // connection) are warmed first so that their one-time cost is not
    // charged to the streams.
    let warm = &ids[..n.min(64)];
    futures_util::stream::iter(warm)
        .map(|id| api.retrieve(id))
        .buffer_unordered(16)
        .try_collect::<Vec<()>>()
        .await
        .context("warming up the api")?;
    for opened in api.open_streams(&warm[..warm.len().min(16)]).await {
        drop(opened.context("warming up the api")?);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    let before_kib = rss_kib(pid)?;
    let opening = Instant::now();
    let mut streams = Vec::with_capacity(n);
    let mut first_error = None;
    let opened = match per_h2_connection {
        None => api.open_streams(ids).await,
        Some(k) => {
            // One client, so one connection, per `k` streams.
            let mut all = Vec::with_capacity(n);
            for chunk in ids.chunks(k.max(1)) {
                all.extend(api.http2()?.open_streams(chunk).await);
            }
            all
        }
    };
    for opened in opened {
        match opened {
            Ok(response) => streams.push(tokio::spawn(drain(response))),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    let open_s = opening.elapsed().as_secs_f64();
    if let Some(e) = &first_error {
        eprintln!("{} of {n} streams did not open: {e:#}", n - streams.len());
    }
    tokio::time::sleep(SETTLE).await;

    let cpu_before = cpu_ticks(pid)?;
    let measuring = Instant::now();
    let mut readings = Vec::with_capacity(READINGS);
    for _ in 0..READINGS {
        tokio::time::sleep(Duration::from_secs(1)).await;
        readings.push(rss_kib(pid)?);
    }
    let cpu_percent =
        (cpu_ticks(pid)? - cpu_before) as f64 / TICKS_PER_S / measuring.elapsed().as_secs_f64()
            * 100.0;
    readings.sort_unstable();
    let after_kib = readings[READINGS / 2];
    let closed = streams.iter().filter(|s| s.is_finished()).count();
    for stream in &streams {
        stream.abort();
    }
    let open = streams.len() - closed;
    if open == 0 {
        bail!("no stream stayed open");
    }
    let per_connection_kib = after_kib.saturating_sub(before_kib) as f64 / open as f64;
    Ok(serde_json::json!({
        "streams": n,
        "protocol": per_h2_connection.map_or_else(
            || "HTTP/1.1, one connection per stream".to_owned(),
            |k| format!("HTTP/2, {k} streams per connection"),
        ),
        "open": open,
        "per_connection_kib": per_connection_kib,
        "rss_before_mib": before_kib as f64 / 1024.0,
        "rss_after_mib": after_kib as f64 / 1024.0,
        "open_s": open_s,
        "idle_cpu_percent": cpu_percent,
    }))
}

/// Keeps a stream's connection read, as a browser would (keepalives only).
async fn drain(response: reqwest::Response) {
    let mut body = response.bytes_stream();
    while let Some(Ok(_)) = body.next().await {}
}

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status (is the api running?)"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/<pid>/status")
}

/// User plus system CPU time of the process, in ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name, which may hold spaces:
    // state is field 3, utime 14 and stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> anyhow::Result<u64> {
        fields
            .get(n - 3)
            .and_then(|f| f.parse().ok())
            .context("malformed /proc/<pid>/stat")
    };
    Ok(field(14)? + field(15)?)
}

/// The soft limit on open files of the process, if it is readable.
fn open_files_limit(pid: u32) -> anyhow::Result<Option<u64>> {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits"))
        .with_context(|| format!("reading /proc/{pid}/limits (is the api running?)"))?;
    Ok(limits
        .lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|soft| soft.parse().ok()))
}
