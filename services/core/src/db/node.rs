//! One Postgres node: its pool, its in-flight count and what the last health
//! probe learned about it. The hot path reads only atomics; the monitor and
//! failing queries write them.

use std::sync::atomic::{AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::Lsn;
use super::budget::{Budget, BudgetStatus};
use super::pipeline::Pipeline;
use super::pool::NodePool;
use crate::config::{ConnectPath, NodeGroup, NodeRole};

/// What the router thinks of a node right now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Healthy and within the lag threshold.
    Up,
    /// Healthy but further behind than `max_lag_ms`/`max_lag_bytes`.
    Lagging,
    /// Answering again after a failure, but still serving its ban (backoff).
    Banned,
    /// The last probe failed.
    Down,
}

impl NodeState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::Up,
            1 => Self::Lagging,
            2 => Self::Banned,
            _ => Self::Down,
        }
    }

    fn as_u8(self) -> u8 {
        match self {
            Self::Up => 0,
            Self::Lagging => 1,
            Self::Banned => 2,
            Self::Down => 3,
        }
    }
}

/// Ban bookkeeping, touched only on failures and probes.
#[derive(Debug, Default)]
struct Ban {
    until: Option<Instant>,
    /// Length of the current episode's ban.
    current_ms: u64,
    /// Length of the next episode's ban.
    next_ms: u64,
    healthy_since: Option<Instant>,
    last_error: Option<String>,
}

/// A node and its pool.
#[derive(Debug)]
pub struct Node {
    pub name: String,
    pub role: NodeRole,
    /// `host:port` the pool connects to.
    pub addr: String,
    pub path: ConnectPath,
    /// Which query classes it serves.
    pub group: NodeGroup,
    pub(super) pool: NodePool,
    /// Shared connections for single-statement reads, on a direct path,
    /// and those reads' own budget.
    pub(super) pipeline: Option<(Pipeline, Budget)>,
    /// Admission: how many queries of each class may run here at once.
    pub(super) budget: Budget,
    in_flight: AtomicUsize,
    state: AtomicU8,
    replay_lsn: AtomicU64,
    lag_bytes: AtomicU64,
    lag_ms: AtomicU64,
    ban: Mutex<Ban>,
}

/// Pool statistics for the topology endpoint.
#[derive(Debug, Clone, Serialize)]
pub struct PoolStatus {
    /// Open connections.
    pub size: usize,
    /// Open connections not in use.
    pub idle: usize,
    pub max: usize,
    /// Open pipelined connections (shared by single-statement reads).
    pub pipelined: usize,
}

/// One node as `GET /v1/admin/topology` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    pub name: String,
    pub role: &'static str,
    pub state: NodeState,
    pub addr: String,
    pub path: &'static str,
    /// WAL bytes between the primary's position and this node's replay position.
    pub lag_bytes: u64,
    /// How long this node's data has been behind the primary.
    pub lag_ms: u64,
    /// The node's replayed (replica) or current (primary) WAL position.
    pub lsn: String,
    pub in_flight: usize,
    /// `both`, `interactive` or `background`.
    pub group: &'static str,
    /// Each served class's slots, in use and queued.
    pub budget: BudgetStatus,
    /// The same for reads on pipelined connections, where the node has them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pipelined_budget: Option<BudgetStatus>,
    pub pool: PoolStatus,
    pub last_error: Option<String>,
}

/// Counts a query as in flight on its node until dropped.
#[derive(Debug)]
pub(super) struct InFlight(Arc<Node>);

impl InFlight {
    pub(super) fn enter(node: &Arc<Node>) -> Self {
        node.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(node))
    }

    pub(super) fn node(&self) -> &Arc<Node> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Node {
    pub(super) fn new(
        name: String,
        role: NodeRole,
        addr: String,
        path: ConnectPath,
        group: NodeGroup,
        pool: NodePool,
        budget: Budget,
    ) -> Self {
        Self {
            name,
            role,
            addr,
            path,
            group,
            pool,
            pipeline: None,
            budget,
            in_flight: AtomicUsize::new(0),
            // Unknown until the first probe; `Up` lets the first requests try it.
            state: AtomicU8::new(NodeState::Up.as_u8()),
            replay_lsn: AtomicU64::new(0),
            lag_bytes: AtomicU64::new(0),
            lag_ms: AtomicU64::new(0),
            ban: Mutex::new(Ban::default()),
        }
    }

    /// Single-statement reads run on `pipeline`'s connections, admitted by its budget.
    pub(super) fn with_pipeline(mut self, pipeline: Option<(Pipeline, Budget)>) -> Self {
        self.pipeline = pipeline;
        self
    }

    pub fn state(&self) -> NodeState {
        NodeState::from_u8(self.state.load(Ordering::Relaxed))
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Queries running here plus those waiting for a slot: what balancing compares.
    pub fn load(&self) -> usize {
        let pipelined = self
            .pipeline
            .as_ref()
            .map_or(0, |(_, budget)| budget.queued());
        self.in_flight() + self.budget.queued() + pipelined
    }

    pub fn replay_lsn(&self) -> Lsn {
        Lsn(self.replay_lsn.load(Ordering::Relaxed))
    }

    pub fn lag_ms(&self) -> u64 {
        self.lag_ms.load(Ordering::Relaxed)
    }

    /// WAL bytes behind the primary, as last probed.
    pub fn lag_bytes(&self) -> u64 {
        self.lag_bytes.load(Ordering::Relaxed)
    }

    /// Statements are named and cached only on direct connections.
    pub fn prepared(&self) -> bool {
        self.path == ConnectPath::Direct
    }

    /// Records a replay position learned outside the monitor (an on-demand probe).
    pub(super) fn observe_replay_lsn(&self, lsn: Lsn) {
        self.replay_lsn.fetch_max(lsn.0, Ordering::Relaxed);
    }

    /// A probe or a query failed on this node: it is `down` and banned.
    /// Each new failure episode bans for twice as long as the last one (up
    /// to `max_ms`); failures within an episode only keep the ban running.
    pub(super) fn record_failure(&self, error: &str, base_ms: u64, max_ms: u64) {
        let mut ban = self.lock_ban();
        let now = Instant::now();
        let healthy_before = matches!(self.state(), NodeState::Up | NodeState::Lagging);
        if healthy_before || ban.current_ms == 0 {
            let ms = if ban.next_ms == 0 {
                base_ms
            } else {
                ban.next_ms
            };
            ban.current_ms = ms;
            ban.next_ms = ms.saturating_mul(2).min(max_ms);
        }
        let until = now + Duration::from_millis(ban.current_ms);
        ban.until = Some(ban.until.map_or(until, |u| u.max(until)));
        ban.healthy_since = None;
        ban.last_error = Some(error.to_owned());
        self.state.store(NodeState::Down.as_u8(), Ordering::Relaxed);
    }

    /// A probe succeeded: stores what it saw and derives the state. A node
    /// healthy for `max_ms` in a row starts its backoff over.
    pub(super) fn record_probe(
        &self,
        replay_lsn: Lsn,
        lag_bytes: u64,
        lag_ms: u64,
        lagging: bool,
        base_ms: u64,
        max_ms: u64,
    ) {
        self.replay_lsn.fetch_max(replay_lsn.0, Ordering::Relaxed);
        self.lag_bytes.store(lag_bytes, Ordering::Relaxed);
        self.lag_ms.store(lag_ms, Ordering::Relaxed);
        let mut ban = self.lock_ban();
        let now = Instant::now();
        let banned = ban.until.is_some_and(|until| now < until);
        if !banned {
            if ban.until.take().is_some() {
                tracing::info!(node = %self.name, "node recovered; ban lifted");
            }
            let since = *ban.healthy_since.get_or_insert(now);
            if now.duration_since(since) >= Duration::from_millis(max_ms) {
                ban.next_ms = base_ms;
                ban.current_ms = 0;
            }
        }
        let state = if banned {
            NodeState::Banned
        } else if lagging {
            NodeState::Lagging
        } else {
            NodeState::Up
        };
        self.state.store(state.as_u8(), Ordering::Relaxed);
    }

    pub(super) fn status(&self) -> NodeStatus {
        let usage = self.pool.usage();
        NodeStatus {
            name: self.name.clone(),
            role: match self.role {
                NodeRole::Primary => "primary",
                NodeRole::Replica => "replica",
            },
            state: self.state(),
            addr: self.addr.clone(),
            path: match self.path {
                ConnectPath::Direct => "direct",
                ConnectPath::Pgbouncer => "pgbouncer",
            },
            lag_bytes: self.lag_bytes.load(Ordering::Relaxed),
            lag_ms: self.lag_ms(),
            lsn: self.replay_lsn().to_string(),
            in_flight: self.in_flight(),
            group: match self.group {
                NodeGroup::Both => "both",
                NodeGroup::Interactive => "interactive",
                NodeGroup::Background => "background",
            },
            budget: self.budget.status(),
            pipelined_budget: self.pipeline.as_ref().map(|(_, budget)| budget.status()),
            pool: PoolStatus {
                size: usage.size,
                idle: usage.available,
                max: usage.max,
                pipelined: self.pipeline.as_ref().map_or(0, |(p, _)| p.open()),
            },
            last_error: self.lock_ban().last_error.clone(),
        }
    }

    fn lock_ban(&self) -> std::sync::MutexGuard<'_, Ban> {
        // A panic while holding this lock leaves only counters behind; keep going.
        self.ban.lock().unwrap_or_else(|p| p.into_inner())
    }
}
