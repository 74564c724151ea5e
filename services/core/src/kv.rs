//! Redis access through a deadpool connection pool. Every command runs under
//! the configured time budget, so a slow or absent Redis costs callers a
//! bounded delay and a `KvError` they degrade on, never a hang.

use std::future::Future;
use std::time::Duration;

use deadpool_redis::{Config, Pool, Runtime};

use crate::config::RedisSettings;

/// Why a Redis operation failed. Callers fall back as documented per feature.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// The pool could not be built from the configured URL; fix `redis.url`.
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

/// A shared Redis pool.
#[derive(Clone)]
pub struct Kv {
    pool: Pool,
    timeout: Duration,
}

impl std::fmt::Debug for Kv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kv")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Kv {
    /// Builds the pool; connects lazily.
    pub fn new(settings: &RedisSettings) -> Result<Self, KvError> {
        let timeout = Duration::from_millis(settings.timeout_ms);
        let pool = Config::from_url(settings.url())
            .builder()
            .map_err(|e| KvError::Config(e.to_string()))?
            .max_size(settings.max_connections)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout))
            .recycle_timeout(Some(timeout))
            .build()
            .map_err(|e| KvError::Config(e.to_string()))?;
        Ok(Self { pool, timeout })
    }

    /// Runs `op` on a pooled connection within the time budget.
    pub async fn run<T, F, Fut>(&self, op: F) -> Result<T, KvError>
    where
        F: FnOnce(deadpool_redis::Connection) -> Fut,
        Fut: Future<Output = Result<T, redis::RedisError>>,
    {
        let work = async {
            let conn = self
                .pool
                .get()
                .await
                .map_err(|e| KvError::Unavailable(e.to_string()))?;
            Ok(op(conn).await?)
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .unwrap_or(Err(KvError::Timeout))
    }
}
