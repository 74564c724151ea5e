//! What a load run cost, per process and per request: CPU seconds of every
//! process of the local stack (from `/proc`), statements per Postgres node
//! (`pg_stat_statements`), Redis commands (`INFO commandstats`), the api's
//! cache results by level (its `/metrics`) and replication lag sampled
//! while the run goes on. Snapshots are taken before and after; the report
//! is their difference.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;
use sqlx::postgres::PgPoolOptions;
use sqlx::{PgPool, Row};

/// Linux reports process times in clock ticks of 1/100 s (USER_HZ).
const TICKS_PER_SECOND: f64 = 100.0;

/// A process of the stack, named by its kind (`api`, `worker`,
/// `postgres-primary`, `pgbouncer-replica1`, `redis`, …).
#[derive(Debug, Clone)]
pub struct Process {
    pub kind: String,
    pub pid: u32,
    /// Count its children too (a Postgres postmaster and its backends).
    pub tree: bool,
}

/// The processes `scripts/dev` started under `dev_dir`: `run/*.pid`
/// (api, api-2…, worker, worker-2…, mock-model, redis), each Postgres
/// node's postmaster with its backends, and each PgBouncer.
pub fn discover(dev_dir: &Path) -> Vec<Process> {
    let mut found = Vec::new();
    let mut read = |kind: String, file: PathBuf, tree: bool| {
        let Ok(text) = std::fs::read_to_string(&file) else {
            return;
        };
        let Some(pid) = text.lines().next().and_then(|l| l.trim().parse().ok()) else {
            return;
        };
        if Path::new(&format!("/proc/{pid}")).exists() {
            found.push(Process { kind, pid, tree });
        }
    };
    for (dir, tree) in [
        (dev_dir.join("run"), false),
        (dev_dir.join("pg/pgbouncer"), false),
    ] {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "pid") {
                let stem = path
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                // api-2, worker-3: more processes of one kind.
                let base = stem.split('-').next().unwrap_or(&stem).to_owned();
                let kind = if dir.ends_with("pgbouncer") {
                    format!("pgbouncer-{stem}")
                } else if base == "api" || base == "worker" {
                    base
                } else {
                    stem
                };
                read(kind, path, tree);
            }
        }
    }
    if let Ok(entries) = std::fs::read_dir(dev_dir.join("pg")) {
        for entry in entries.flatten() {
            let file = entry.path().join("postmaster.pid");
            let node = entry.file_name().to_string_lossy().into_owned();
            read(format!("postgres-{node}"), file, true);
        }
    }
    found.sort_by(|a, b| a.kind.cmp(&b.kind).then(a.pid.cmp(&b.pid)));
    found
}

/// utime + stime (+ the reaped children's, for a tree) of a process, in
/// ticks, and its parent.
fn ticks(pid: u32) -> Option<(u64, u64, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let number = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    // Fields after the name, from 0: state, ppid(1) … utime(11) stime(12)
    // cutime(13) cstime(14).
    let own = number(11)? + number(12)?;
    let reaped = number(13)? + number(14)?;
    Some((own, reaped, u32::try_from(number(1)?).ok()?))
}

/// CPU seconds a process has used; for a tree, with its live children and
/// those it has reaped (a backend that exited during the run counts).
fn cpu_seconds(process: &Process) -> f64 {
    let Some((own, reaped, _)) = ticks(process.pid) else {
        return 0.0;
    };
    let mut total = own;
    if process.tree {
        total += reaped;
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for entry in entries.flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<u32>().ok())
                else {
                    continue;
                };
                if let Some((child, _, parent)) = ticks(pid)
                    && parent == process.pid
                {
                    total += child;
                }
            }
        }
    }
    total as f64 / TICKS_PER_SECOND
}

/// This process's own CPU seconds (the load generator).
pub fn own_cpu_seconds() -> f64 {
    cpu_seconds(&Process {
        kind: "loadgen".into(),
        pid: std::process::id(),
        tree: false,
    })
}

/// Where to read the counters from.
pub struct Sources {
    pub processes: Vec<Process>,
    /// Superuser URLs of the Postgres nodes, by node name.
    pub nodes: BTreeMap<String, String>,
    pub redis_url: Option<String>,
    /// `/metrics` URLs of the api processes.
    pub metrics: Vec<String>,
}

pub struct Snapshot {
    cpu: BTreeMap<String, f64>,
    wal_bytes: i64,
    loadgen_cpu: f64,
    redis_calls: BTreeMap<String, u64>,
    cache: BTreeMap<String, f64>,
    at: std::time::Instant,
}

/// Statements run on one node during the run, with the busiest ones.
#[derive(Debug, Serialize)]
pub struct NodeQueries {
    pub calls: i64,
    pub top: Vec<(String, i64)>,
}

#[derive(Debug, Default, Serialize, Clone, Copy)]
pub struct Lag {
    pub max_seconds: f64,
    pub max_bytes: i64,
    pub samples: u64,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub seconds: f64,
    pub requests: u64,
    /// CPU seconds per process kind (all processes of that kind together).
    pub cpu_seconds: BTreeMap<String, f64>,
    /// CPU seconds per 1,000 requests, per process kind.
    pub cpu_seconds_per_1000_requests: BTreeMap<String, f64>,
    pub queries_per_node: BTreeMap<String, NodeQueries>,
    pub queries_per_request: BTreeMap<String, f64>,
    /// WAL the primary wrote during the run (what every replica receives).
    pub wal_bytes: i64,
    pub redis_commands: u64,
    pub redis_commands_per_request: f64,
    pub redis_top_commands: Vec<(String, u64)>,
    /// The api's read cache: lookups by result (`l1_hit`, `l2_hit`, `miss`,
    /// `bypass`…) and the share each took.
    pub cache_results: BTreeMap<String, f64>,
    pub cache_hit_ratio_by_level: BTreeMap<String, f64>,
    /// Replication lag during the run, per replica (application_name).
    pub replica_lag: BTreeMap<String, Lag>,
}

impl Sources {
    async fn superuser(url: &str) -> Result<PgPool> {
        PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await
            .with_context(|| format!("connect to {url}"))
    }

    /// Resets the statement counters and reads every other counter.
    pub async fn before(&self) -> Result<Snapshot> {
        for url in self.nodes.values() {
            let pool = Self::superuser(url).await?;
            sqlx::query("SELECT pg_stat_statements_reset()")
                .execute(&pool)
                .await
                .context("pg_stat_statements_reset (is pg_stat_statements loaded?)")?;
            pool.close().await;
        }
        self.snapshot().await
    }

    async fn snapshot(&self) -> Result<Snapshot> {
        let mut cpu = BTreeMap::new();
        for process in &self.processes {
            *cpu.entry(process.kind.clone()).or_insert(0.0) += cpu_seconds(process);
        }
        Ok(Snapshot {
            cpu,
            wal_bytes: self.wal_position().await?,
            loadgen_cpu: own_cpu_seconds(),
            redis_calls: self.redis_calls().await?,
            cache: self.cache_counters().await,
            at: std::time::Instant::now(),
        })
    }

    /// The primary's WAL position in bytes (0 without a primary).
    async fn wal_position(&self) -> Result<i64> {
        let Some(url) = self.nodes.get("primary") else {
            return Ok(0);
        };
        let pool = Self::superuser(url).await?;
        let (bytes,): (i64,) =
            sqlx::query_as("SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8")
                .fetch_one(&pool)
                .await?;
        pool.close().await;
        Ok(bytes)
    }

    async fn redis_calls(&self) -> Result<BTreeMap<String, u64>> {
        let Some(url) = &self.redis_url else {
            return Ok(BTreeMap::new());
        };
        let client = redis::Client::open(url.as_str())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut conn)
            .await?;
        // cmdstat_get:calls=12,usec=...
        let mut calls = BTreeMap::new();
        for line in info.lines() {
            let Some(rest) = line.strip_prefix("cmdstat_") else {
                continue;
            };
            let Some((name, stats)) = rest.split_once(':') else {
                continue;
            };
            let count = stats
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            calls.insert(name.to_owned(), count);
        }
        Ok(calls)
    }

    /// turnpike_cache_requests_total by result, summed over the api
    /// processes (a process that does not answer counts nothing).
    async fn cache_counters(&self) -> BTreeMap<String, f64> {
        let mut sums = BTreeMap::new();
        let http = reqwest::Client::new();
        for url in &self.metrics {
            let Ok(reply) = http.get(url).send().await else {
                continue;
            };
            let Ok(text) = reply.text().await else {
                continue;
            };
            for line in text.lines() {
                let Some(rest) = line.strip_prefix("turnpike_cache_requests_total{") else {
                    continue;
                };
                let Some((labels, value)) = rest.split_once("} ") else {
                    continue;
                };
                let result = labels
                    .split(',')
                    .find_map(|kv| kv.strip_prefix("result=\""))
                    .map(|v| v.trim_end_matches('"').to_owned())
                    .unwrap_or_default();
                *sums.entry(result).or_insert(0.0) += value.trim().parse::<f64>().unwrap_or(0.0);
            }
        }
        sums
    }

    /// Samples `pg_stat_replication` on the primary every 250 ms until the
    /// returned handle is dropped or finished.
    pub fn sample_lag(&self) -> LagSampler {
        let lag = Arc::new(Mutex::new(BTreeMap::<String, Lag>::new()));
        let url = self.nodes.get("primary").cloned();
        let sink = lag.clone();
        let task = tokio::spawn(async move {
            let Some(url) = url else { return };
            let Ok(pool) = Self::superuser(&url).await else {
                return;
            };
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                let Ok(rows) = sqlx::query(
                    "SELECT application_name,
                            coalesce(extract(epoch FROM replay_lag), 0)::float8 AS seconds,
                            coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn), 0)::int8 AS bytes
                     FROM pg_stat_replication",
                )
                .fetch_all(&pool)
                .await
                else {
                    continue;
                };
                let mut lag = sink.lock().unwrap_or_else(|p| p.into_inner());
                for row in rows {
                    let name: String = row.try_get("application_name").unwrap_or_default();
                    let entry = lag.entry(name).or_default();
                    entry.max_seconds =
                        entry.max_seconds.max(row.try_get("seconds").unwrap_or(0.0));
                    entry.max_bytes = entry.max_bytes.max(row.try_get("bytes").unwrap_or(0));
                    entry.samples += 1;
                }
            }
        });
        LagSampler { lag, task }
    }

    /// The difference since `before`, per request.
    pub async fn after(&self, before: &Snapshot, requests: u64, lag: LagSampler) -> Result<Report> {
        let now = self.snapshot().await?;
        lag.task.abort();
        let replica_lag = lag.lag.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let per_1000 = |v: f64| v * 1000.0 / requests.max(1) as f64;

        let mut cpu_seconds = BTreeMap::new();
        for (kind, seconds) in &now.cpu {
            cpu_seconds.insert(
                kind.clone(),
                (seconds - before.cpu.get(kind).copied().unwrap_or(0.0)).max(0.0),
            );
        }
        cpu_seconds.insert("loadgen".into(), now.loadgen_cpu - before.loadgen_cpu);
        let cpu_seconds_per_1000_requests = cpu_seconds
            .iter()
            .map(|(k, v)| (k.clone(), per_1000(*v)))
            .collect();

        let mut queries_per_node = BTreeMap::new();
        let mut queries_per_request = BTreeMap::new();
        for (node, url) in &self.nodes {
            let pool = Self::superuser(url).await?;
            let rows = sqlx::query(
                "SELECT left(regexp_replace(query, '\\s+', ' ', 'g'), 120) AS query, calls
                 FROM pg_stat_statements
                 WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
                 ORDER BY calls DESC",
            )
            .fetch_all(&pool)
            .await?;
            pool.close().await;
            let mut calls = 0;
            let mut top = Vec::new();
            for row in rows {
                let query: String = row.try_get("query")?;
                let n: i64 = row.try_get("calls")?;
                calls += n;
                if top.len() < 8 {
                    top.push((query, n));
                }
            }
            queries_per_request.insert(node.clone(), calls as f64 / requests.max(1) as f64);
            queries_per_node.insert(node.clone(), NodeQueries { calls, top });
        }

        let mut redis_by_command: Vec<(String, u64)> = now
            .redis_calls
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.saturating_sub(before.redis_calls.get(k).copied().unwrap_or(0)),
                )
            })
            .filter(|(k, v)| *v > 0 && k != "info")
            .collect();
        redis_by_command.sort_by_key(|c| std::cmp::Reverse(c.1));
        let redis_commands: u64 = redis_by_command.iter().map(|(_, v)| v).sum();

        let cache_results: BTreeMap<String, f64> = now
            .cache
            .iter()
            .map(|(k, v)| (k.clone(), v - before.cache.get(k).copied().unwrap_or(0.0)))
            .collect();
        let lookups: f64 = cache_results.values().sum();
        let share = |key: &str| cache_results.get(key).copied().unwrap_or(0.0) / lookups.max(1.0);
        let l1 = share("l1_hit");
        let l2 = share("l2_hit");
        let cache_hit_ratio_by_level = BTreeMap::from([
            ("l1".to_owned(), l1),
            ("l2".to_owned(), l2),
            ("total".to_owned(), l1 + l2),
        ]);

        Ok(Report {
            seconds: now.at.duration_since(before.at).as_secs_f64(),
            requests,
            cpu_seconds,
            cpu_seconds_per_1000_requests,
            queries_per_node,
            queries_per_request,
            wal_bytes: now.wal_bytes - before.wal_bytes,
            redis_commands,
            redis_commands_per_request: redis_commands as f64 / requests.max(1) as f64,
            redis_top_commands: redis_by_command.into_iter().take(8).collect(),
            cache_results,
            cache_hit_ratio_by_level,
            replica_lag,
        })
    }
}

pub struct LagSampler {
    lag: Arc<Mutex<BTreeMap<String, Lag>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Report {
    /// The report as lines for a terminal.
    pub fn lines(&self) -> Vec<String> {
        let mut out = vec![format!(
            "accounting: {} requests in {:.1} s ({:.0} req/s)",
            self.requests,
            self.seconds,
            self.requests as f64 / self.seconds.max(0.001)
        )];
        for (kind, seconds) in &self.cpu_seconds {
            out.push(format!(
                "  cpu {kind:<20} {seconds:>8.2} s  {:>7.3} s per 1,000 requests",
                self.cpu_seconds_per_1000_requests[kind]
            ));
        }
        for (node, queries) in &self.queries_per_node {
            out.push(format!(
                "  queries {node:<16} {:>9}  {:.3} per request",
                queries.calls, self.queries_per_request[node]
            ));
        }
        out.push(format!(
            "  primary WAL             {:>9} bytes  {:.0} bytes/s",
            self.wal_bytes,
            self.wal_bytes as f64 / self.seconds.max(0.001)
        ));
        out.push(format!(
            "  redis commands          {:>9}  {:.3} per request",
            self.redis_commands, self.redis_commands_per_request
        ));
        out.push(format!(
            "  read cache hit ratio    l1 {:.3}  l2 {:.3}  total {:.3}  ({:.0} lookups)",
            self.cache_hit_ratio_by_level["l1"],
            self.cache_hit_ratio_by_level["l2"],
            self.cache_hit_ratio_by_level["total"],
            self.cache_results.values().sum::<f64>()
        ));
        for (replica, lag) in &self.replica_lag {
            out.push(format!(
                "  replica lag {replica:<12} max {:.1} ms, max {} bytes ({} samples)",
                lag.max_seconds * 1000.0,
                lag.max_bytes,
                lag.samples
            ));
        }
        out
    }
}
