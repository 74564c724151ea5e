//! The reconciler: re-queues turns whose enqueue was lost (Redis was down
//! when the turn was created, or a worker died between finishing a turn and
//! dispatching the conversation's next one), and turns that were running
//! when Redis lost its data (their entry, and with it any reclaim, is
//! gone). Every worker runs it; a turn queued twice still runs once (see
//! `turns::start`).

use std::sync::Arc;
use std::time::Duration;

use turnpike_core::turns;
use turnpike_core::{ids, queue};
use turnpike_protocol::ids as prefixes;

use crate::Context;

pub(crate) async fn run(ctx: Arc<Context>) {
    // The queue's depth every two seconds, a reconciling pass every
    // `worker.reconcile_every_ms`.
    let every = Duration::from_millis(ctx.settings.worker.reconcile_every_ms.max(100));
    let mut tick = tokio::time::interval(every.min(Duration::from_secs(2)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_pass: Option<tokio::time::Instant> = None;
    loop {
        tick.tick().await;
        report_depth(&ctx).await;
        if last_pass.is_none_or(|at| at.elapsed() >= every) {
            last_pass = Some(tokio::time::Instant::now());
            if let Err(e) = pass(&ctx).await {
                tracing::warn!(error = %e, "reconciler pass failed");
            }
        }
    }
}

/// The queue's depth as gauges (every worker reports the same stream;
/// dashboards take the max).
async fn report_depth(ctx: &Context) {
    match queue::depth(&ctx.kv, &ctx.settings.worker.queue).await {
        Ok(depth) => depth.record(),
        Err(e) => tracing::debug!(error = %e, "could not read the queue's depth"),
    }
}

async fn pass(ctx: &Context) -> Result<(), turnpike_core::db::DbError> {
    // While turns wait in the queue undelivered, a turn queued for long is
    // most likely among them (the fleet is behind, not the enqueue lost):
    // adding it again would grow the queue fastest under overload.
    match queue::depth(&ctx.kv, &ctx.settings.worker.queue)
        .await
        .map(|depth| depth.undelivered())
    {
        Ok(0) => {}
        Ok(waiting) => {
            tracing::debug!(
                waiting,
                "turns wait in the queue; the reconciler skips this pass"
            );
            return Ok(());
        }
        Err(e) => {
            tracing::debug!(error = %e, "queue unreadable; the reconciler skips this pass");
            return Ok(());
        }
    }
    // What the queue holds, read before the database: a turn that starts
    // after this read is too recent to be a candidate below.
    let held = match queue::responses_held(&ctx.kv, &ctx.settings.worker.queue, 10_000).await {
        Ok(held) => held,
        Err(e) => {
            tracing::debug!(error = %e, "queue unreadable; the reconciler skips this pass");
            return Ok(());
        }
    };
    let mut tx = ctx.router.write().await?;
    let after = i64::try_from(ctx.settings.worker.stranded_after_ms).unwrap_or(i64::MAX);
    let stranded = turns::stranded(&mut tx, after, 100).await?;
    let running = turns::running_since(&mut tx, after, 100).await?;
    let lsn = tx.commit().await?;
    for id in stranded {
        let public = ids::encode(prefixes::RESPONSE, id);
        tracing::info!(response = %public, "re-queueing a stranded turn");
        if let Err(e) = queue::enqueue(&ctx.kv, &ctx.settings.worker.queue, &public, lsn).await {
            tracing::warn!(error = %e, "reconciler could not enqueue");
            return Ok(());
        }
    }
    // A turn marked running that the queue no longer holds lost its entry
    // with Redis's data: no worker runs it and none will reclaim it. It is
    // queued again as a redelivery, taken over after its last stored step
    // (a turn that finished meanwhile is not started again).
    let Some(held) = held else { return Ok(()) };
    for id in running {
        let public = ids::encode(prefixes::RESPONSE, id);
        if held.contains(&public) {
            continue;
        }
        match queue::enqueue_redelivery(&ctx.kv, &ctx.settings.worker.queue, &public, lsn).await {
            Ok(true) => {
                tracing::warn!(response = %public, "a running turn's queue entry is gone; queued it again");
            }
            Ok(false) => {
                tracing::debug!(response = %public, "a lost running turn was queued again by another reconciler");
            }
            Err(e) => {
                tracing::warn!(error = %e, "reconciler could not enqueue");
                return Ok(());
            }
        }
    }
    Ok(())
}
