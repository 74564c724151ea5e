//! The replica-aware router: health and lag monitoring, bans with backoff,
//! power-of-two-choices balancing, consistency-aware replica choice and one
//! retry on another node for reads that hit a failing node.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use rand::Rng;
use secrecy::ExposeSecret;
use sqlx::ConnectOptions as _;
use sqlx::Row;
use sqlx::postgres::PgConnectOptions;

use super::budget::{Admission, Budget, ShedReason};
use super::node::{InFlight, Node};
use super::pipeline::{Mode, Pipeline, Pipelined};
use super::pool::{NodePool, Pooled};
use super::{
    Consistency, DbConn, DbError, Lsn, NodeState, NodeStatus, QueryClass, current_class,
    is_connection_error,
};
use crate::config::{ConfigError, ConnectPath, DatabaseSettings, NodeRole, NodeSettings};

/// A boxed, sendable future borrowing the reader it runs on.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// How long the primary's WAL history is kept for lag-in-time estimates.
const LSN_HISTORY: Duration = Duration::from_secs(300);
const LSN_HISTORY_MAX: usize = 4096;

/// Routes reads to replicas and writes to the primary. Cheap to share: hold it in an `Arc`.
#[derive(Debug)]
pub struct Router {
    primary: Arc<Node>,
    replicas: Vec<Arc<Node>>,
    settings: DatabaseSettings,
    /// The primary's WAL position at the last probe.
    primary_lsn: AtomicU64,
    /// When the primary was first seen at each WAL position: a replica at
    /// position P is as stale as the first sample past P is old.
    primary_history: Mutex<VecDeque<(Lsn, Instant)>>,
}

impl Router {
    /// Builds one lazily connecting pool per node; nothing is contacted yet,
    /// so a process starts even while a node is down. Call
    /// [`Router::spawn_monitor`] to start health checks.
    pub fn new(settings: &DatabaseSettings) -> Result<Arc<Self>, ConfigError> {
        let mut primary = None;
        let mut replicas = Vec::new();
        for (name, node) in &settings.nodes {
            let path = match node.role {
                NodeRole::Primary => settings.primary_path,
                NodeRole::Replica => settings.replica_path,
            };
            let built = Arc::new(build_node(name, node, path, settings)?);
            match node.role {
                NodeRole::Primary => primary = Some(built),
                NodeRole::Replica => replicas.push(built),
            }
        }
        let primary = primary.ok_or_else(|| {
            ConfigError::Invalid("database.nodes has no node with role = \"primary\"".into())
        })?;
        Ok(Arc::new(Self {
            primary,
            replicas,
            settings: settings.clone(),
            primary_lsn: AtomicU64::new(0),
            primary_history: Mutex::new(VecDeque::new()),
        }))
    }

    /// Probes every node once, then keeps probing each on its own task every
    /// `health_interval_ms` until the router is dropped.
    pub async fn spawn_monitor(self: &Arc<Self>) {
        // Probe the primary first so replica lag has a reference point.
        self.probe(&self.primary).await;
        for replica in &self.replicas {
            self.probe(replica).await;
        }
        for node in std::iter::once(&self.primary).chain(&self.replicas) {
            tokio::spawn(monitor(Arc::downgrade(self), Arc::clone(node)));
        }
    }

    /// The primary node.
    pub fn primary(&self) -> &Arc<Node> {
        &self.primary
    }

    /// Every node, primary first, as the topology endpoint shows them.
    pub fn topology(&self) -> Vec<NodeStatus> {
        std::iter::once(&self.primary)
            .chain(&self.replicas)
            .map(|n| n.status())
            .collect()
    }

    /// Runs a read in the current task's query class ([`current_class`]:
    /// the class of the route being served, else interactive); see
    /// [`Router::read_as`].
    pub async fn read<T, F>(&self, consistency: Consistency, op: F) -> Result<T, DbError>
    where
        F: for<'c> Fn(&'c mut Reader) -> BoxFuture<'c, Result<T, sqlx::Error>>,
    {
        self.read_as(current_class(), consistency, op).await
    }

    /// Runs a read of `class` on a node of that class's group that
    /// satisfies `consistency`, within the node's budget for the class: a
    /// read that finds the budget full and no slot freed within the queue
    /// wait fails at once with [`DbError::Overloaded`]. After a connection
    /// error the node is banned and the read runs once more on another
    /// node, so `op` must be idempotent: reads are. A read that runs past
    /// `read_attempt_timeout_ms` fails alone ([`DbError::Timeout`]): a slow
    /// query says nothing about the node's health.
    pub async fn read_as<T, F>(
        &self,
        class: QueryClass,
        consistency: Consistency,
        op: F,
    ) -> Result<T, DbError>
    where
        F: for<'c> Fn(&'c mut Reader) -> BoxFuture<'c, Result<T, sqlx::Error>>,
    {
        self.read_on_node(class, consistency, false, op).await
    }

    /// [`Router::read`] for an `op` that sends each statement as one
    /// message ([`super::statement`]): through PgBouncer it runs without a
    /// transaction around it, one round trip per statement instead of four
    /// for a single read. Any other statement on its [`Reader`] is a bug,
    /// and panics.
    pub async fn read_one_message<T, F>(
        &self,
        consistency: Consistency,
        op: F,
    ) -> Result<T, DbError>
    where
        F: for<'c> Fn(&'c mut Reader) -> BoxFuture<'c, Result<T, sqlx::Error>>,
    {
        self.read_on_node(current_class(), consistency, true, op)
            .await
    }

    #[tracing::instrument(level = "debug", skip(self, op), fields(node))]
    async fn read_on_node<T, F>(
        &self,
        class: QueryClass,
        consistency: Consistency,
        one_message: bool,
        op: F,
    ) -> Result<T, DbError>
    where
        F: for<'c> Fn(&'c mut Reader) -> BoxFuture<'c, Result<T, sqlx::Error>>,
    {
        if let (true, Consistency::Session(Some(lsn))) = (one_message, consistency)
            && let Some(value) = self.read_checked(class, lsn, &op).await?
        {
            return Ok(value);
        }
        let first = self
            .pick(class, consistency, None)
            .await
            .ok_or(DbError::NoNodeAvailable)?;
        tracing::Span::current().record("node", first.name.as_str());
        let (admission, pipelined) = self.admit_read(&first, class, one_message).await?;
        let result = self.attempt(&first, one_message, pipelined, &op).await;
        drop(admission);
        let error = match result {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(e)) if is_connection_error(&e) => e,
            Ok(Err(e)) => return Err(DbError::Query(e)),
            Err(_elapsed) => {
                return Err(DbError::Timeout {
                    node: first.name.clone(),
                });
            }
        };
        tracing::warn!(node = %first.name, error = %error, "read failed on node; retrying once elsewhere");
        self.ban(&first, &error);
        let second = self
            .pick(class, consistency, Some(&first.name))
            .await
            .filter(|second| !Arc::ptr_eq(&first, second))
            .ok_or(DbError::NoNodeAvailable)?;
        let (_admission, pipelined) = self.admit_read(&second, class, one_message).await?;
        match self.attempt(&second, one_message, pipelined, &op).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) if is_connection_error(&e) => {
                self.ban(&second, &e);
                Err(DbError::NoNodeAvailable)
            }
            Ok(Err(e)) => Err(DbError::Query(e)),
            Err(_elapsed) => Err(DbError::Timeout {
                node: second.name.clone(),
            }),
        }
    }

    /// A session read that no replica is known to have replayed far enough
    /// for: rather than asking replicas for their replay position and then
    /// reading, one round trip after the other, the read goes to a replica
    /// on one of its pipelined connections right behind a question for its
    /// replay position. The server answers the two in order, so the read
    /// saw at least what the answer says was replayed: far enough, it is
    /// the read's value (the usual case, the replica a few milliseconds
    /// behind the commit at most); not far enough, the read is thrown away
    /// and goes the usual way, which waits for a replica (`None`, as when
    /// a replica is known to have replayed far enough, or no pipelined
    /// connection has room).
    async fn read_checked<T, F>(
        &self,
        class: QueryClass,
        lsn: Lsn,
        op: &F,
    ) -> Result<Option<T>, DbError>
    where
        F: for<'c> Fn(&'c mut Reader) -> BoxFuture<'c, Result<T, sqlx::Error>>,
    {
        let up: Vec<&Arc<Node>> = self
            .replicas
            .iter()
            .filter(|n| n.state() == NodeState::Up && n.budget.serves(class))
            .collect();
        if up.iter().any(|n| n.replay_lsn() >= lsn) {
            return Ok(None);
        }
        let roomy: Vec<&Arc<Node>> = up.into_iter().filter(|n| pipeline_has_room(n)).collect();
        let Some(node) = p2c(&roomy) else {
            return Ok(None);
        };
        // A slot in the pipelined reads' budget, or the usual way.
        let Ok(admission) = self.admit(node, class, true).await else {
            return Ok(None);
        };
        tracing::Span::current().record("node", node.name.as_str());
        let run = async {
            let mut reader = Reader::open(node, true, true).await?;
            let ReaderConn::Pipelined { connection, .. } = &reader.conn else {
                return Ok(None);
            };
            let lane = Arc::clone(connection);
            // The question goes out first: `join` polls it first.
            let answers = futures_util::future::join(lane.replay_lsn(), op(&mut reader)).await;
            Ok::<_, sqlx::Error>(Some(answers))
        };
        let limit = Duration::from_millis(self.settings.read_attempt_timeout_ms);
        let result = tokio::time::timeout(limit, run).await;
        drop(admission);
        let (replayed, value) = match result {
            Ok(Ok(Some(answers))) => answers,
            Ok(Ok(None)) => return Ok(None),
            Ok(Err(e)) => return self.retry_elsewhere(node, e),
            Err(_elapsed) => {
                return Err(DbError::Timeout {
                    node: node.name.clone(),
                });
            }
        };
        match replayed {
            Ok(Some(replayed)) => {
                node.observe_replay_lsn(replayed);
                let kept = replayed >= lsn;
                metrics::counter!("turnpike_db_session_reads_checked_total",
                    "node" => node.name.clone(),
                    "outcome" => if kept { "kept" } else { "behind" })
                .increment(1);
                if !kept {
                    return Ok(None);
                }
            }
            Ok(None) => return Ok(None),
            Err(e) => {
                if is_connection_error(&e) {
                    self.ban(node, &e);
                }
                return Ok(None);
            }
        }
        match value {
            Ok(value) => Ok(Some(value)),
            Err(e) => self.retry_elsewhere(node, e),
        }
    }

    /// A checked read that failed: on a connection error the node is
    /// banned and the read goes the usual way, to another; any other error
    /// is the read's.
    fn retry_elsewhere<T>(&self, node: &Node, error: sqlx::Error) -> Result<Option<T>, DbError> {
        if !is_connection_error(&error) {
            return Err(DbError::Query(error));
        }
        tracing::warn!(node = %node.name, error = %error, "read failed on node; retrying elsewhere");
        self.ban(node, &error);
        Ok(None)
    }

    /// Opens a transaction on the primary. Fails fast with
    /// [`DbError::PrimaryUnavailable`] while the primary is down.
    pub async fn write(&self) -> Result<Writer, DbError> {
        let node = &self.primary;
        if node.state() == NodeState::Down {
            return Err(DbError::PrimaryUnavailable);
        }
        let admission = self.admit(node, QueryClass::Interactive, false).await?;
        let guard = InFlight::enter(node);
        let begin = async {
            let mut conn = node.pool.get().await?;
            // Counted as open from before it is sent: given up while on the
            // wire (the timeout below, or the caller gone), the `BEGIN` may
            // still run, and the connection's recovery rolls it back.
            conn.in_transaction = true;
            sqlx::Executor::execute(conn.conn(), "BEGIN").await?;
            Ok::<Pooled, sqlx::Error>(conn)
        };
        match tokio::time::timeout(self.acquire_timeout(), begin).await {
            Ok(Ok(conn)) => Ok(Writer {
                conn,
                commit_timeout: Duration::from_millis(self.settings.read_attempt_timeout_ms),
                statement_timeout: Duration::from_millis(self.settings.statement_timeout_ms),
                node: guard,
                _admission: admission,
            }),
            Ok(Err(e)) if is_connection_error(&e) => {
                self.ban(node, &e);
                Err(DbError::PrimaryUnavailable)
            }
            Ok(Err(e)) => Err(DbError::Query(e)),
            // Busy (every connection taken by slow work), not necessarily
            // dead: the probes tell which, so the node is not blamed here.
            Err(_elapsed) => Err(DbError::Timeout {
                node: node.name.clone(),
            }),
        }
    }

    /// A connection to the primary for one statement that is a transaction
    /// of its own: no BEGIN and COMMIT around it, two round trips fewer
    /// than [`Router::write`]. Through PgBouncer the statement must go as
    /// one message ([`super::statement`]). Fails fast as `write` does.
    pub async fn write_one_message(&self) -> Result<OneStatement, DbError> {
        let node = &self.primary;
        if node.state() == NodeState::Down {
            return Err(DbError::PrimaryUnavailable);
        }
        let admission = self.admit(node, QueryClass::Interactive, false).await?;
        let guard = InFlight::enter(node);
        match tokio::time::timeout(self.acquire_timeout(), node.pool.get()).await {
            Ok(Ok(conn)) => Ok(OneStatement {
                session: Session {
                    conn,
                    node: guard,
                    one_message_only: node.path == ConnectPath::Pgbouncer,
                },
                _admission: admission,
            }),
            Ok(Err(e)) if is_connection_error(&e) => {
                self.ban(node, &e);
                Err(DbError::PrimaryUnavailable)
            }
            Ok(Err(e)) => Err(DbError::Query(e)),
            Err(_elapsed) => Err(DbError::Timeout {
                node: node.name.clone(),
            }),
        }
    }

    fn acquire_timeout(&self) -> Duration {
        Duration::from_millis(self.settings.acquire_timeout_ms)
    }

    /// A slot for a read of `class` on `node`, and whether the read goes on
    /// a pipelined connection: a single-statement read does while one is
    /// not stalled (checked again once admitted, as the wait may be long),
    /// in their budget; any other read takes a pooled connection, in the pool's.
    async fn admit_read(
        &self,
        node: &Arc<Node>,
        class: QueryClass,
        one_message: bool,
    ) -> Result<(Admission, bool), DbError> {
        if one_message && pipeline_has_room(node) {
            let admission = self.admit(node, class, true).await?;
            if pipeline_has_room(node) {
                return Ok((admission, true));
            }
        }
        Ok((self.admit(node, class, false).await?, false))
    }

    /// A slot in `node`'s budget for `class` (its pipelined reads' budget
    /// for a read going there), or the query is shed.
    async fn admit(
        &self,
        node: &Arc<Node>,
        class: QueryClass,
        pipelined: bool,
    ) -> Result<Admission, DbError> {
        let budget = match (&node.pipeline, pipelined) {
            (Some((_, budget)), true) => budget,
            _ => &node.budget,
        };
        budget.admit(class).await.map_err(|reason| {
            if reason == ShedReason::NotServed {
                return DbError::NoNodeAvailable;
            }
            tracing::debug!(node = %node.name, class = class.as_str(), ?reason, "query shed");
            DbError::Overloaded {
                node: node.name.clone(),
                class,
            }
        })
    }

    fn ban(&self, node: &Node, error: &sqlx::Error) {
        node.record_failure(
            &error.to_string(),
            self.settings.ban_base_ms,
            self.settings.ban_max_ms,
        );
    }

    /// One try of a read on `node`, bounded by `read_attempt_timeout_ms`
    /// (the outer error: it ran out of time).
    async fn attempt<T, F>(
        &self,
        node: &Arc<Node>,
        one_message: bool,
        pipelined: bool,
        op: &F,
    ) -> Result<Result<T, sqlx::Error>, tokio::time::error::Elapsed>
    where
        F: for<'c> Fn(&'c mut Reader) -> BoxFuture<'c, Result<T, sqlx::Error>>,
    {
        let run = async {
            let mut reader = Reader::open(node, one_message, pipelined).await?;
            let value = op(&mut reader).await?;
            reader.finish().await?;
            Ok(value)
        };
        let limit = Duration::from_millis(self.settings.read_attempt_timeout_ms);
        tokio::time::timeout(limit, run).await
    }

    /// Chooses the node for a read of `class`. Replicas of the class's
    /// group are preferred whenever one satisfies the consistency; the
    /// primary is the last resort, if its group takes the class.
    async fn pick(
        &self,
        class: QueryClass,
        consistency: Consistency,
        exclude: Option<&str>,
    ) -> Option<Arc<Node>> {
        let usable = |n: &&Arc<Node>, state: NodeState| {
            n.state() == state
                && n.budget.serves(class)
                && exclude.is_none_or(|name| n.name != name)
        };
        let up: Vec<&Arc<Node>> = self
            .replicas
            .iter()
            .filter(|n| usable(n, NodeState::Up))
            .collect();
        let chosen = match consistency {
            Consistency::Strong => None,
            Consistency::Eventual | Consistency::Session(None) => p2c(&up).or_else(|| {
                let lagging: Vec<&Arc<Node>> = self
                    .replicas
                    .iter()
                    .filter(|n| usable(n, NodeState::Lagging))
                    .collect();
                p2c(&lagging)
            }),
            Consistency::Bounded => {
                let fresh: Vec<&Arc<Node>> = up
                    .iter()
                    .copied()
                    .filter(|n| n.lag_ms() <= self.settings.bounded_staleness_ms)
                    .collect();
                p2c(&fresh)
            }
            Consistency::Session(Some(lsn)) => {
                let caught_up: Vec<&Arc<Node>> = up
                    .iter()
                    .copied()
                    .filter(|n| n.replay_lsn() >= lsn)
                    .collect();
                match p2c(&caught_up) {
                    Some(node) => Some(node),
                    None => self.wait_for_replay(&up, lsn).await,
                }
            }
        };
        match chosen {
            Some(node) => Some(Arc::clone(node)),
            None => self
                .primary
                .budget
                .serves(class)
                .then(|| Arc::clone(&self.primary)),
        }
    }

    /// Asks `candidates` for their replay position until one has reached
    /// `lsn` or `session_wait_ms` has passed.
    async fn wait_for_replay<'n>(
        &self,
        candidates: &[&'n Arc<Node>],
        lsn: Lsn,
    ) -> Option<&'n Arc<Node>> {
        if candidates.is_empty() {
            return None;
        }
        let deadline = Instant::now() + Duration::from_millis(self.settings.session_wait_ms);
        let probe_timeout = Duration::from_millis(self.settings.probe_timeout_ms);
        let mut order: Vec<&Arc<Node>> = candidates.to_vec();
        order.sort_by_key(|n| n.load());
        loop {
            for node in &order {
                let probe = node.pool.simple_row(super::pipeline::REPLAY_LSN);
                if let Ok(Ok(row)) = tokio::time::timeout(probe_timeout, probe).await {
                    let replayed = row.try_get::<Option<i64>, _>(0).ok().flatten().unwrap_or(0);
                    let replayed = Lsn(u64::try_from(replayed).unwrap_or(0));
                    node.observe_replay_lsn(replayed);
                    if replayed >= lsn {
                        return Some(node);
                    }
                }
            }
            if Instant::now() >= deadline {
                return None;
            }
            // Replay on a healthy async replica is a few milliseconds behind.
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// One health probe of one node.
    async fn probe(&self, node: &Node) {
        self.probe_once(node).await;
        // Each node's health, as the router sees it after the probe.
        let name = node.name.clone();
        metrics::gauge!("turnpike_db_node_lag_bytes", "node" => name.clone())
            .set(node.lag_bytes() as f64);
        metrics::gauge!("turnpike_db_node_lag_seconds", "node" => name.clone())
            .set(node.lag_ms() as f64 / 1000.0);
        // Its pool and its query budget's queue, as of now.
        let status = node.status();
        let in_use = status.pool.size.saturating_sub(status.pool.idle);
        let waiting = std::iter::once(&status.budget)
            .chain(&status.pipelined_budget)
            .flat_map(|budget| [&budget.interactive, &budget.background])
            .flatten()
            .map(|lane| lane.queued)
            .sum::<usize>();
        for (state, n) in [
            ("in_use", in_use),
            ("idle", status.pool.idle),
            ("waiting", waiting),
        ] {
            metrics::gauge!("turnpike_db_pool_connections", "node" => name.clone(), "state" => state)
                .set(n as f64);
        }
        for state in [
            NodeState::Up,
            NodeState::Lagging,
            NodeState::Down,
            NodeState::Banned,
        ] {
            let label = format!("{state:?}").to_lowercase();
            metrics::gauge!("turnpike_db_node_state", "node" => name.clone(), "state" => label)
                .set(if node.state() == state { 1.0 } else { 0.0 });
        }
    }

    async fn probe_once(&self, node: &Node) {
        let timeout = Duration::from_millis(self.settings.probe_timeout_ms);
        let sql = match node.role {
            NodeRole::Primary => {
                "SELECT pg_is_in_recovery(), (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8, NULL::int8"
            }
            NodeRole::Replica => {
                "SELECT pg_is_in_recovery(), (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::int8, \
                 (pg_last_wal_receive_lsn() - '0/0'::pg_lsn)::int8"
            }
        };
        let row = match tokio::time::timeout(timeout, node.pool.simple_row(sql)).await {
            Ok(Ok(row)) => row,
            Ok(Err(e)) => return self.probe_failed(node, &e.to_string()),
            Err(_elapsed) => return self.probe_failed(node, "health probe timed out"),
        };
        let in_recovery: bool = row.try_get(0).unwrap_or(false);
        let position = row
            .try_get::<Option<i64>, _>(1)
            .ok()
            .flatten()
            .and_then(|v| u64::try_from(v).ok())
            .map(Lsn)
            .unwrap_or_default();
        match node.role {
            NodeRole::Primary => {
                if in_recovery {
                    return self.probe_failed(node, "the primary is in recovery");
                }
                self.primary_lsn.fetch_max(position.0, Ordering::Relaxed);
                self.remember_primary_position(position);
                node.record_probe(
                    position,
                    0,
                    0,
                    false,
                    self.settings.ban_base_ms,
                    self.settings.ban_max_ms,
                );
            }
            NodeRole::Replica => {
                if !in_recovery {
                    return self.probe_failed(node, "the replica is not in recovery (promoted?)");
                }
                let primary = Lsn(self.primary_lsn.load(Ordering::Relaxed));
                let lag_bytes = primary.0.saturating_sub(position.0);
                let lag_ms = self.staleness_ms(position);
                let lagging =
                    lag_ms > self.settings.max_lag_ms || lag_bytes > self.settings.max_lag_bytes;
                node.record_probe(
                    position,
                    lag_bytes,
                    lag_ms,
                    lagging,
                    self.settings.ban_base_ms,
                    self.settings.ban_max_ms,
                );
            }
        }
    }

    fn probe_failed(&self, node: &Node, error: &str) {
        if node.state() != NodeState::Down {
            tracing::warn!(node = %node.name, error, "health probe failed; node is down");
        }
        node.record_failure(error, self.settings.ban_base_ms, self.settings.ban_max_ms);
    }

    fn remember_primary_position(&self, lsn: Lsn) {
        let mut history = self
            .primary_history
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if history.back().is_none_or(|(last, _)| *last < lsn) {
            history.push_back((lsn, now));
        }
        while history.len() > LSN_HISTORY_MAX
            || history
                .front()
                .is_some_and(|(_, at)| now.duration_since(*at) > LSN_HISTORY)
        {
            history.pop_front();
        }
    }

    /// How long ago the primary first passed `replayed`: the age of the
    /// newest data a replica at `replayed` is missing.
    fn staleness_ms(&self, replayed: Lsn) -> u64 {
        let history = self
            .primary_history
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        history
            .iter()
            .find(|(lsn, _)| *lsn > replayed)
            .map_or(0, |(_, at)| {
                u64::try_from(at.elapsed().as_millis()).unwrap_or(u64::MAX)
            })
    }
}

async fn monitor(router: Weak<Router>, node: Arc<Node>) {
    let Some(interval) = router.upgrade().map(|r| r.settings.health_interval()) else {
        return;
    };
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(router) = router.upgrade() else {
            return;
        };
        router.probe(&node).await;
    }
}

/// Whether a single-statement read on `node` goes on a pipelined
/// connection: it has them, and one is not stalled.
fn pipeline_has_room(node: &Node) -> bool {
    node.pipeline
        .as_ref()
        .is_some_and(|(pipeline, _)| pipeline.has_room())
}

/// Power of two choices: of two random candidates, the one with fewer
/// queries in flight or waiting for a slot.
fn p2c<'n>(candidates: &[&'n Arc<Node>]) -> Option<&'n Arc<Node>> {
    match candidates.len() {
        0 => None,
        1 => Some(candidates[0]),
        n => {
            let mut rng = rand::rng();
            let a = rng.random_range(0..n);
            let mut b = rng.random_range(0..n - 1);
            if b >= a {
                b += 1;
            }
            let (a, b) = (candidates[a], candidates[b]);
            Some(if b.load() < a.load() { b } else { a })
        }
    }
}

fn build_node(
    name: &str,
    node: &NodeSettings,
    path: ConnectPath,
    settings: &DatabaseSettings,
) -> Result<Node, ConfigError> {
    let url = match path {
        ConnectPath::Direct => &node.url,
        ConnectPath::Pgbouncer => node.pooled_url.as_ref().ok_or_else(|| {
            ConfigError::Invalid(format!(
                "database.nodes.{name}.pooled_url is required: its node class uses path = \"pgbouncer\""
            ))
        })?,
    };
    let mut options = PgConnectOptions::from_str(url.expose_secret())
        .map_err(|e| ConfigError::Invalid(format!("database.nodes.{name}: {e}")))?
        .application_name("turnpike");
    // Statements sent as one message carry their values (a user's text
    // among them): through PgBouncer every statement, on either path a
    // transaction's last one sent with its commit. sqlx's warning about a
    // slow statement quotes it whole, so it is a debug line.
    options = options.log_slow_statements(tracing::log::LevelFilter::Debug, Duration::from_secs(1));
    options = match path {
        // Direct: prepared statements cached per connection; the timeouts ride on the startup packet.
        ConnectPath::Direct => options.options([
            (
                "statement_timeout",
                format!("{}ms", settings.statement_timeout_ms),
            ),
            ("idle_in_transaction_session_timeout", "10s".to_owned()),
        ]),
        // PgBouncer 1.18 in transaction mode: no named statements survive a
        // transaction, and it refuses unknown startup options, so the
        // timeouts are set on the role (`turnpike migrate` does that).
        ConnectPath::Pgbouncer => options.statement_cache_capacity(0),
    };
    let addr = format!("{}:{}", options.get_host(), options.get_port());
    let mode = match path {
        ConnectPath::Direct => Some(Mode::Prepared),
        ConnectPath::Pgbouncer => settings.pipeline_through_pgbouncer.then_some(Mode::Simple),
    };
    let pipeline = match mode {
        Some(mode) if settings.pipelined_connections_per_node > 0 => {
            // The pool's options say where and as whom; the password is
            // the one part they do not give back (tokio-postgres's parser
            // refuses some of sqlx's query parameters: the URL goes to it
            // without them).
            let without_query = url.expose_secret().split('?').next().unwrap_or_default();
            let password = tokio_postgres::Config::from_str(without_query)
                .ok()
                .and_then(|c| {
                    c.get_password()
                        .map(|p| String::from_utf8_lossy(p).into_owned())
                });
            let pipeline = Pipeline::new(
                mode,
                &options,
                password.as_deref(),
                usize::try_from(settings.pipelined_connections_per_node).unwrap_or(usize::MAX),
                usize::try_from(settings.pipeline_depth).unwrap_or(usize::MAX),
                Duration::from_millis(settings.pipeline_stalled_after_ms),
                Duration::from_millis(settings.statement_timeout_ms),
                Duration::from_millis(settings.acquire_timeout_ms),
            );
            let budget = Budget::new(name, node.group, settings, settings.pipeline_budget());
            Some((pipeline, budget))
        }
        _ => None,
    };
    let pool = NodePool::new(
        options,
        usize::try_from(settings.max_connections_per_node).unwrap_or(usize::MAX),
        Duration::from_millis(settings.acquire_timeout_ms),
    );
    let budget = Budget::new(name, node.group, settings, settings.node_budget());
    Ok(Node::new(
        name.to_owned(),
        node.role,
        addr,
        path,
        node.group,
        pool,
        budget,
    )
    .with_pipeline(pipeline))
}

/// A read session on one node. Through PgBouncer a read made with
/// [`Router::read`] is an explicit transaction, because an unnamed
/// statement's Parse and Execute are separate round trips that transaction
/// pooling may send to different servers otherwise; one made with
/// [`Router::read_one_message`] is not, and may only send statements as one
/// message each ([`super::statement`]): anything else panics. On a node
/// with pipelined connections a `read_one_message` runs on one of them, and
/// the same holds: only [`super::statement`]'s functions may use it.
pub struct Reader {
    conn: ReaderConn,
}

enum ReaderConn {
    Pooled(Session),
    Pipelined {
        connection: Arc<Pipelined>,
        node: InFlight,
    },
}

impl Reader {
    /// A read on `node`: on one of its pipelined connections when
    /// `pipelined` (a single-statement read admitted to their budget), else
    /// on a pooled connection.
    async fn open(
        node: &Arc<Node>,
        one_message: bool,
        pipelined: bool,
    ) -> Result<Self, sqlx::Error> {
        let guard = InFlight::enter(node);
        if let (true, Some((pipeline, _))) = (pipelined, &node.pipeline) {
            return Ok(Self {
                conn: ReaderConn::Pipelined {
                    connection: pipeline.connection().await?,
                    node: guard,
                },
            });
        }
        let mut conn = node.pool.get().await?;
        let through_pgbouncer = node.path == ConnectPath::Pgbouncer;
        if through_pgbouncer && !one_message {
            // Open from before it is sent, as a write's (`Router::write`).
            conn.in_transaction = true;
            sqlx::Executor::execute(conn.conn(), "BEGIN").await?;
        }
        Ok(Self {
            conn: ReaderConn::Pooled(Session {
                conn,
                node: guard,
                one_message_only: through_pgbouncer && one_message,
            }),
        })
    }

    async fn finish(self) -> Result<(), sqlx::Error> {
        let ReaderConn::Pooled(mut session) = self.conn else {
            return Ok(());
        };
        let conn = &mut session.conn;
        if conn.in_transaction {
            sqlx::Executor::execute(conn.conn(), "COMMIT").await?;
            conn.in_transaction = false;
        }
        session.conn.done();
        Ok(())
    }

    /// The name of the node this read runs on.
    pub fn node(&self) -> &str {
        match &self.conn {
            ReaderConn::Pooled(session) => &session.node.node().name,
            ReaderConn::Pipelined { node, .. } => &node.node().name,
        }
    }

    fn session(&mut self) -> &mut Session {
        match &mut self.conn {
            ReaderConn::Pooled(session) => session,
            // A bug, caught in the tests as the PgBouncer case is.
            ReaderConn::Pipelined { .. } => {
                panic!("a statement not sent through db::statement on a pipelined read")
            }
        }
    }
}

impl DbConn for Reader {
    fn prepared(&self) -> bool {
        match &self.conn {
            ReaderConn::Pooled(session) => session.prepared(),
            ReaderConn::Pipelined { .. } => true,
        }
    }

    fn conn(&mut self) -> &mut sqlx::PgConnection {
        self.session().conn()
    }

    fn conn_for_one_message(&mut self) -> &mut sqlx::PgConnection {
        self.session().conn_for_one_message()
    }

    fn pipelined(&self) -> Option<&Arc<Pipelined>> {
        match &self.conn {
            ReaderConn::Pooled(_) => None,
            ReaderConn::Pipelined { connection, .. } => Some(connection),
        }
    }
}

/// A pooled connection of a [`Reader`] or a [`OneStatement`], and what may
/// be sent on it.
struct Session {
    conn: Pooled,
    node: InFlight,
    /// Opened without a transaction through PgBouncer: extended-protocol
    /// statements are not safe on it.
    one_message_only: bool,
}

impl Session {
    fn prepared(&self) -> bool {
        self.node.node().prepared()
    }

    fn conn(&mut self) -> &mut sqlx::PgConnection {
        // A bug, caught in the tests (every api test runs through PgBouncer
        // too); in production a panic is better than a Bind that could
        // reach another client's server connection.
        assert!(
            !self.one_message_only,
            "an extended-protocol statement through PgBouncer outside a transaction"
        );
        self.conn.conn()
    }

    fn conn_for_one_message(&mut self) -> &mut sqlx::PgConnection {
        self.conn.conn()
    }
}

/// A transaction on the primary. Commit it with [`Writer::commit`] to learn
/// the consistency token; dropping it rolls back.
pub struct Writer {
    conn: Pooled,
    commit_timeout: Duration,
    /// The bound on one statement: a statement sent with the commit runs
    /// under it on the server and is waited for that long before the
    /// commit's own bound starts, so a slow one fails on the server, rolled
    /// back, rather than here with its outcome unknown.
    statement_timeout: Duration,
    node: InFlight,
    /// The transaction's slot in the primary's budget, held until it ends.
    _admission: Admission,
}

impl Writer {
    /// Commits and returns the primary's WAL position after the commit (in
    /// the same round trip): a replica that has replayed it sees this
    /// transaction.
    pub async fn commit(self) -> Result<Lsn, DbError> {
        Ok(self.end(String::new()).await?.1)
    }

    /// Runs one statement (its arguments written in, as
    /// [`statement::render`](super::statement::render) writes them) and
    /// commits, in one message: one round trip for the transaction's last
    /// statement and its commit, on either path (through PgBouncer the
    /// server stays with the transaction until the whole message is
    /// answered). The statement's rows and the WAL position after the
    /// commit. When the statement fails nothing after it runs, and the
    /// transaction rolls back. The statement runs under this process's
    /// `statement_timeout_ms` (set for the transaction in the same message,
    /// whatever the role's is), and the message is waited for that long and
    /// then the commit's bound.
    pub async fn commit_after<T: super::statement::StatementRow>(
        self,
        sql: &str,
        args: &[super::statement::Arg<'_>],
    ) -> Result<(Vec<T>, Lsn), DbError> {
        let mut statement = super::statement::render(sql, args)?;
        statement.push_str("; ");
        let (rows, lsn) = self.end(statement).await?;
        let rows = rows.iter().map(T::from_row).collect::<Result<_, _>>()?;
        Ok((rows, lsn))
    }

    /// Sends `before` (empty, or statements ending in `; `) and the commit
    /// in one message: the rows `before` returned, and the WAL position.
    async fn end(mut self, before: String) -> Result<(Vec<sqlx::postgres::PgRow>, Lsn), DbError> {
        use futures_util::TryStreamExt as _;
        // A statement sent with the commit runs under the statement timeout
        // this process is configured with (not the role's, which may
        // differ), and is waited for that long before the commit's bound
        // starts; without one, it is waited for as long as it runs.
        let (message, bound) = if before.is_empty() {
            (before, Some(self.commit_timeout))
        } else if self.statement_timeout.is_zero() {
            (
                "SET LOCAL statement_timeout = 0; ".to_owned() + &before,
                None,
            )
        } else {
            let set = format!(
                "SET LOCAL statement_timeout = '{}ms'; ",
                self.statement_timeout.as_millis()
            );
            (
                set + &before,
                Some(self.commit_timeout + self.statement_timeout),
            )
        };
        let message = message + "COMMIT; SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::int8";
        let commit =
            sqlx::Executor::fetch_many(self.conn.conn(), message.as_str()).try_collect::<Vec<_>>();
        let answer = match bound {
            Some(bound) => tokio::time::timeout(bound, commit).await,
            None => Ok(commit.await),
        };
        let answer = match answer {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) if is_connection_error(&e) => {
                self.conn.discard();
                return Err(DbError::PrimaryUnavailable);
            }
            Ok(Err(e)) => return Err(DbError::Query(e)),
            Err(_elapsed) => return Err(DbError::PrimaryUnavailable),
        };
        self.conn.in_transaction = false;
        // Rows in order: those of `before`, then the position's (the commit
        // returns none).
        let mut rows: Vec<sqlx::postgres::PgRow> =
            answer.into_iter().filter_map(sqlx::Either::right).collect();
        let lsn: i64 = rows
            .pop()
            .ok_or_else(|| sqlx::Error::RowNotFound)?
            .try_get(0)?;
        self.conn.done();
        drop(self.node);
        Ok((rows, Lsn(u64::try_from(lsn).unwrap_or(0))))
    }
}

impl DbConn for Writer {
    fn prepared(&self) -> bool {
        self.node.node().prepared()
    }

    fn conn(&mut self) -> &mut sqlx::PgConnection {
        self.conn.conn()
    }
}

/// A connection to the primary for one statement in a transaction of its
/// own ([`Router::write_one_message`]). Call [`OneStatement::done`] after
/// the statement; dropped without it (the statement failed), the connection
/// is recovered or closed in the background.
pub struct OneStatement {
    session: Session,
    _admission: Admission,
}

impl OneStatement {
    /// The statement completed: the connection goes back to the pool.
    pub fn done(self) {
        self.session.conn.done();
    }
}

impl DbConn for OneStatement {
    fn prepared(&self) -> bool {
        self.session.prepared()
    }

    fn conn(&mut self) -> &mut sqlx::PgConnection {
        self.session.conn()
    }

    fn conn_for_one_message(&mut self) -> &mut sqlx::PgConnection {
        self.session.conn_for_one_message()
    }
}
