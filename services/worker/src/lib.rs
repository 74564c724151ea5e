//! The agent-loop worker: claims queued turns from the Redis Stream consumer
//! group, loads the conversation from a replica that has replayed the turn's
//! input, builds a cache-friendly prompt, streams the model, publishes every
//! event to the response's log, persists the outcome on the primary, and
//! acknowledges. Heartbeats keep its claims; a crashed worker's turns are
//! reclaimed by another; SIGTERM stops claiming and lets running turns finish
//! within the grace period.

mod cancel;
mod chat;
mod compact;
mod mcp;
mod prompt;
pub mod provider;
mod reconcile;
mod tools;
mod turn;

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use turnpike_core::Settings;
use turnpike_core::db::Router;
use turnpike_core::kv::{Kv, KvError};
use turnpike_core::last_write::LastWrites;
use turnpike_core::queue::Consumer;

use crate::provider::{Provider, ProviderError};

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Config(#[from] turnpike_core::config::ConfigError),
    #[error(transparent)]
    Redis(#[from] KvError),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    /// The HTTP client for MCP servers could not be built (no TLS backend); not retryable.
    #[error("MCP http client: {0}")]
    McpClient(#[source] reqwest::Error),
}

/// What every turn of this process shares.
pub(crate) struct Context {
    pub settings: Settings,
    pub router: Arc<Router>,
    pub kv: Kv,
    pub last_writes: LastWrites,
    pub provider: Provider,
    pub consumer_name: String,
    pub cancels: cancel::Registry,
    pub mcp: mcp::Registry,
}

/// A worker process.
pub struct Worker {
    context: Arc<Context>,
}

impl Worker {
    pub async fn build(settings: Settings) -> Result<Self, WorkerError> {
        // Installs the metrics recorder before anything records.
        turnpike_core::telemetry::metrics();
        let router = Router::new(&settings.database)?;
        router.spawn_monitor().await;
        let kv = Kv::new(&settings.redis)?;
        let last_writes = LastWrites::new(
            kv.clone(),
            Duration::from_millis(settings.database.last_write_window_ms),
        );
        let provider = Provider::new(settings.model.clone())?;
        let consumer_name = format!("worker-{}", uuid::Uuid::now_v7().simple());
        let mcp = mcp::Registry::new().map_err(WorkerError::McpClient)?;
        Ok(Self {
            context: Arc::new(Context {
                settings,
                router,
                kv,
                last_writes,
                provider,
                consumer_name,
                cancels: cancel::Registry::default(),
                mcp,
            }),
        })
    }

    /// This worker's consumer name in the group.
    pub fn name(&self) -> &str {
        &self.context.consumer_name
    }

    /// Claims and runs turns until `shutdown` resolves, then waits up to the
    /// grace period for running turns. Turns still running after it stay
    /// claimed and are reclaimed by another worker.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send) {
        let ctx = self.context;
        let settings = &ctx.settings.worker;
        let metrics = (settings.metrics_port != 0).then(|| {
            AbortOnDrop(tokio::spawn(turnpike_core::telemetry::serve_metrics(
                ctx.settings.api.host.clone(),
                settings.metrics_port,
            )))
        });
        let permits = Arc::new(Semaphore::new(settings.concurrency.max(1)));
        let mut turns = JoinSet::new();
        let listener = AbortOnDrop(tokio::spawn(cancel::listen(
            ctx.settings.redis.url().to_owned(),
            ctx.cancels.clone(),
        )));
        let reconciler = AbortOnDrop(tokio::spawn(reconcile::run(Arc::clone(&ctx))));
        let mut consumer: Option<Consumer> = None;
        let mut last_reclaim = Instant::now();
        let mut stopping = false;
        let reclaim_every = Duration::from_millis((settings.reclaim_idle_ms / 4).max(100));
        tokio::pin!(shutdown);
        loop {
            while turns.try_join_next().is_some() {}
            let permit = tokio::select! {
                biased;
                () = &mut shutdown => break,
                permit = Arc::clone(&permits).acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            let conn = match consumer.as_mut() {
                Some(conn) => conn,
                None => match Consumer::connect(
                    ctx.settings.redis.url(),
                    &settings.queue,
                    &ctx.consumer_name,
                    settings.block_ms,
                )
                .await
                {
                    Ok(conn) => consumer.insert(conn),
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot reach the turn queue; retrying");
                        tokio::select! {
                            () = &mut shutdown => break,
                            () = tokio::time::sleep(Duration::from_millis(500)) => continue,
                        }
                    }
                },
            };
            // One read claims as many turns as there are free slots (up to
            // a bound): a busy queue is drained in one round trip, not one
            // per turn. A reclaim takes as many.
            let mut permits_held = vec![permit];
            while permits_held.len() < CLAIM_BATCH {
                match Arc::clone(&permits).try_acquire_owned() {
                    Ok(more) => permits_held.push(more),
                    Err(_) => break,
                }
            }
            let mut deliveries = Vec::new();
            if last_reclaim.elapsed() >= reclaim_every {
                last_reclaim = Instant::now();
                match conn
                    .reclaim(settings.reclaim_idle_ms, permits_held.len())
                    .await
                {
                    Ok(found) => deliveries = found,
                    Err(e) => tracing::warn!(error = %e, "reclaim failed"),
                }
            }
            if deliveries.is_empty() {
                // A read in flight when the worker is told to stop is
                // finished, not dropped: Redis may have claimed turns for
                // it already, and a dropped reply would leave them to wait
                // `reclaim_idle_ms` for another worker. What it claims runs
                // within the grace period; no read follows it, and none is
                // sent once the stop has come.
                let next = {
                    let sent = std::sync::atomic::AtomicBool::new(false);
                    let read = async {
                        sent.store(true, std::sync::atomic::Ordering::Relaxed);
                        conn.next_batch(settings.block_ms, permits_held.len()).await
                    };
                    tokio::pin!(read);
                    tokio::select! {
                        biased;
                        () = &mut shutdown => {
                            stopping = true;
                            if !sent.load(std::sync::atomic::Ordering::Relaxed) {
                                break;
                            }
                            read.await
                        }
                        next = &mut read => next,
                    }
                };
                match next {
                    Ok(found) => deliveries = found,
                    Err(e) => {
                        tracing::warn!(error = %e, "reading the turn queue failed; reconnecting");
                        consumer = None;
                        if stopping {
                            break;
                        }
                        continue;
                    }
                }
            }
            // Each claimed turn runs with one slot; the slots left over
            // go back when `permits_held` drops.
            debug_assert!(deliveries.len() <= permits_held.len());
            for (delivery, permit) in deliveries.into_iter().zip(permits_held.drain(..)) {
                let ctx = Arc::clone(&ctx);
                turns.spawn(async move {
                    turn::run(&ctx, delivery).await;
                    drop(permit);
                });
            }
            if stopping {
                break;
            }
        }
        drop(reconciler);
        drop(metrics);
        tracing::info!(
            running = turns.len(),
            "worker stopping; no new turns claimed"
        );
        let grace = Duration::from_millis(settings.shutdown_grace_ms);
        let drained =
            tokio::time::timeout(grace, async { while turns.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!(
                "grace period over; unfinished turns will be reclaimed by another worker"
            );
            turns.abort_all();
        }
        drop(listener);
    }
}

/// The most turns one read of the queue claims.
const CLAIM_BATCH: usize = 16;

/// Stops a helper task when its owner ends, however it ends: a turn's
/// heartbeat with the turn (an aborted turn must not keep heartbeating its
/// claim), the worker's reconciler, cancel listener and metrics server with
/// the worker (a `run_until` dropped mid-way included, or a killed worker's
/// reconciler would go on queueing turns beside its replacement's).
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
