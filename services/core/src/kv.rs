//! Redis access over a few multiplexed connections, each reconnecting by
//! itself after a failure (redis-rs's `ConnectionManager`). Commands from
//! every task are pipelined on them: no per-command checkout, and no health
//! check round trip before each command, as a pool of exclusive connections
//! needs. Every command runs under the configured time budget, so a slow or
//! absent Redis costs callers a bounded delay and a `KvError` they degrade
//! on, never a hang. Blocking reads (the turn queue) and pub/sub use
//! connections of their own.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::config::RedisSettings;

/// Why a Redis operation failed. Callers fall back as documented per feature.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// The client could not be built from the configured URL; fix `redis.url`.
    #[error("redis configuration: {0}")]
    Config(String),
    /// No connection could be had within the budget (Redis down or saturated). Retryable.
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    /// The command failed or timed out. Retryable.
    #[error("redis command failed: {0}")]
    Command(#[from] redis::RedisError),
    /// The command did not answer within `redis.timeout_ms`. Retryable.
    #[error("redis command timed out")]
    Timeout,
}

/// Shared Redis connections.
#[derive(Clone)]
pub struct Kv {
    connections: Arc<[ConnectionManager]>,
    /// Set when a command on that connection found it broken: the next
    /// command waits for it to reconnect first.
    broken: Arc<[AtomicBool]>,
    next: Arc<AtomicUsize>,
    timeout: Duration,
}

impl std::fmt::Debug for Kv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kv")
            .field("connections", &self.connections.len())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Kv {
    /// Sets up `redis.connections` connections; they connect on first use
    /// (a process starts while Redis is down, and degrades until it is up).
    pub fn new(settings: &RedisSettings) -> Result<Self, KvError> {
        let timeout = Duration::from_millis(settings.timeout_ms);
        let client =
            redis::Client::open(settings.url()).map_err(|e| KvError::Config(e.to_string()))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            // One quick retry per reconnection; callers degrade meanwhile,
            // and the next command tries again.
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(20))
            .set_max_delay(Duration::from_millis(500));
        let connections = (0..settings.connections.max(1))
            .map(|_| ConnectionManager::new_lazy_with_config(client.clone(), config.clone()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| KvError::Config(e.to_string()))?;
        Ok(Self {
            broken: connections.iter().map(|_| AtomicBool::new(false)).collect(),
            connections: connections.into(),
            next: Arc::new(AtomicUsize::new(0)),
            timeout,
        })
    }

    /// Runs `op` on one of the shared connections within the time budget.
    pub async fn run<T, F, Fut>(&self, op: F) -> Result<T, KvError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = Result<T, redis::RedisError>>,
    {
        let at = self.next.fetch_add(1, Ordering::Relaxed) % self.connections.len();
        let conn = self.connections[at].clone();
        let work = async {
            if self.broken[at].load(Ordering::Relaxed) {
                self.reconnected(conn.clone()).await?;
                self.broken[at].store(false, Ordering::Relaxed);
            }
            op(conn).await
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) if broken(&e) => {
                self.broken[at].store(true, Ordering::Relaxed);
                Err(KvError::Unavailable(e.to_string()))
            }
            Ok(Err(e)) => Err(KvError::Command(e)),
            Err(_elapsed) => Err(KvError::Timeout),
        }
    }

    /// Waits for a broken connection to come back: the first PING meets the
    /// failure it last had (and starts a reconnection), the second waits
    /// for that reconnection. Without this, the first command on each
    /// connection after Redis returns would fail.
    async fn reconnected(&self, mut conn: ConnectionManager) -> Result<(), redis::RedisError> {
        let first: Result<(), _> = redis::cmd("PING").query_async(&mut conn).await;
        if first.is_ok() {
            return Ok(());
        }
        redis::cmd("PING").query_async(&mut conn).await
    }
}

/// Whether an error means the connection itself failed (rather than the
/// command).
fn broken(e: &redis::RedisError) -> bool {
    e.is_connection_refusal() || e.is_connection_dropped() || e.is_io_error() || e.is_timeout()
}
