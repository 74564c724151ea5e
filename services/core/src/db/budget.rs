//! Admission to a node: a concurrency budget per node and query class,
//! with a short, bounded queue in front of it.
//!
//! A query that finds its class's slots taken waits at most
//! `queue_timeout_ms`, behind at most `max_queued_per_node` others; past
//! either it is shed (503 `overloaded`) instead of piling up. The budget of
//! queries on pooled connections never exceeds the node's pool, so an
//! admitted query does not wait for a connection; reads on the node's
//! pipelined connections have a budget of their own, the connections' depth. On a node that serves both classes the budget is split:
//! background queries use their share only, interactive ones their own
//! share and any idle background slot.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use metrics::{Counter, Gauge};
use serde::Serialize;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::QueryClass;
use crate::config::{DatabaseSettings, NodeGroup};

/// Why a query was shed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ShedReason {
    /// `max_queued_per_node` queries were already waiting.
    QueueFull,
    /// No slot freed up within `queue_timeout_ms`.
    QueueTimeout,
    /// The node takes no queries of this class.
    NotServed,
}

/// One class's slots on one node.
#[derive(Debug)]
struct Lane {
    slots: Arc<Semaphore>,
    limit: usize,
    queued: AtomicUsize,
}

impl Lane {
    fn new(limit: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(limit)),
            limit,
            queued: AtomicUsize::new(0),
        }
    }

    fn status(&self) -> LaneStatus {
        LaneStatus {
            limit: self.limit,
            in_use: self.limit.saturating_sub(self.slots.available_permits()),
            queued: self.queued.load(Ordering::Relaxed),
        }
    }
}

/// Metric handles for one class on one node, resolved once.
#[derive(Debug)]
struct ClassMetrics {
    in_flight: Gauge,
    queue_full: Counter,
    queue_timeout: Counter,
    not_served: Counter,
}

impl ClassMetrics {
    fn new(node: &str, class: QueryClass) -> Self {
        let shed = |reason: &'static str| {
            metrics::counter!("turnpike_db_shed_total",
                "node" => node.to_owned(), "class" => class.as_str(), "reason" => reason)
        };
        Self {
            in_flight: metrics::gauge!("turnpike_db_in_flight",
                "node" => node.to_owned(), "class" => class.as_str()),
            queue_full: shed("queue_full"),
            queue_timeout: shed("queue_timeout"),
            not_served: shed("not_served"),
        }
    }
}

/// A node's budgets.
#[derive(Debug)]
pub(super) struct Budget {
    interactive: Option<Lane>,
    background: Option<Lane>,
    queue_timeout: Duration,
    max_queued: usize,
    metrics: [ClassMetrics; 2],
}

/// A query's place in a node's budget; the slot frees when it is dropped.
#[derive(Debug)]
pub(super) struct Admission {
    _permit: OwnedSemaphorePermit,
    in_flight: Gauge,
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.in_flight.decrement(1.0);
    }
}

/// One class's slots on a node, as the topology endpoint shows them.
#[derive(Debug, Clone, Serialize)]
pub struct LaneStatus {
    /// Slots reserved for the class.
    pub limit: usize,
    /// Slots taken (an interactive query may hold a background slot).
    pub in_use: usize,
    /// Queries waiting for a slot.
    pub queued: usize,
}

/// A node's budget as the topology endpoint shows it; a class the node
/// does not serve is absent.
#[derive(Debug, Clone, Serialize)]
pub struct BudgetStatus {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interactive: Option<LaneStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub background: Option<LaneStatus>,
}

impl Budget {
    /// `total` slots (at least one), split between the classes `group` serves.
    pub(super) fn new(
        node: &str,
        group: NodeGroup,
        settings: &DatabaseSettings,
        total: u32,
    ) -> Self {
        let total = usize::try_from(total).unwrap_or(usize::MAX).max(1);
        let (interactive, background) = match group {
            NodeGroup::Interactive => (Some(total), None),
            NodeGroup::Background => (None, Some(total)),
            NodeGroup::Both => {
                let share = usize::try_from(settings.background_share_percent).unwrap_or(100);
                let background = (total * share.min(100)).div_ceil(100);
                // Each class keeps at least one slot: a budget of one is shared.
                let background = if share == 0 { 0 } else { background.max(1) };
                let interactive = total.saturating_sub(background).max(1);
                (Some(interactive), (background > 0).then_some(background))
            }
        };
        Self {
            interactive: interactive.map(Lane::new),
            background: background.map(Lane::new),
            queue_timeout: Duration::from_millis(settings.queue_timeout_ms),
            max_queued: usize::try_from(settings.max_queued_per_node).unwrap_or(usize::MAX),
            metrics: [
                ClassMetrics::new(node, QueryClass::Interactive),
                ClassMetrics::new(node, QueryClass::Background),
            ],
        }
    }

    fn lane(&self, class: QueryClass) -> Option<&Lane> {
        match class {
            QueryClass::Interactive => self.interactive.as_ref(),
            QueryClass::Background => self.background.as_ref(),
        }
    }

    fn metrics(&self, class: QueryClass) -> &ClassMetrics {
        match class {
            QueryClass::Interactive => &self.metrics[0],
            QueryClass::Background => &self.metrics[1],
        }
    }

    /// Queries of either class waiting for a slot.
    pub(super) fn queued(&self) -> usize {
        [&self.interactive, &self.background]
            .into_iter()
            .flatten()
            .map(|lane| lane.queued.load(Ordering::Relaxed))
            .sum()
    }

    /// Whether the node takes queries of `class` at all.
    pub(super) fn serves(&self, class: QueryClass) -> bool {
        self.lane(class).is_some()
    }

    /// A slot for one query of `class`: at once if one is free, else after
    /// a bounded wait, else the reason it was shed.
    pub(super) async fn admit(&self, class: QueryClass) -> Result<Admission, ShedReason> {
        let metrics = self.metrics(class);
        let admitted = |permit| {
            metrics.in_flight.increment(1.0);
            Admission {
                _permit: permit,
                in_flight: metrics.in_flight.clone(),
            }
        };
        let Some(lane) = self.lane(class) else {
            metrics.not_served.increment(1);
            return Err(ShedReason::NotServed);
        };
        if let Ok(permit) = Arc::clone(&lane.slots).try_acquire_owned() {
            return Ok(admitted(permit));
        }
        if class == QueryClass::Interactive
            && let Some(spare) = &self.background
            && let Ok(permit) = Arc::clone(&spare.slots).try_acquire_owned()
        {
            return Ok(admitted(permit));
        }
        let waiting = Waiting::enter(&lane.queued);
        if waiting.position > self.max_queued {
            metrics.queue_full.increment(1);
            return Err(ShedReason::QueueFull);
        }
        let acquire = Arc::clone(&lane.slots).acquire_owned();
        match tokio::time::timeout(self.queue_timeout, acquire).await {
            Ok(Ok(permit)) => Ok(admitted(permit)),
            // The semaphore is never closed; treat it like a timeout anyway.
            Ok(Err(_)) | Err(_) => {
                metrics.queue_timeout.increment(1);
                Err(ShedReason::QueueTimeout)
            }
        }
    }

    pub(super) fn status(&self) -> BudgetStatus {
        BudgetStatus {
            interactive: self.interactive.as_ref().map(Lane::status),
            background: self.background.as_ref().map(Lane::status),
        }
    }
}

/// Counts a query as queued until dropped.
struct Waiting<'a> {
    queued: &'a AtomicUsize,
    /// 1 for the first in the queue.
    position: usize,
}

impl<'a> Waiting<'a> {
    fn enter(queued: &'a AtomicUsize) -> Self {
        let position = queued.fetch_add(1, Ordering::Relaxed) + 1;
        Self { queued, position }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.queued.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(budget: u32, share: u32, queued: u32, timeout_ms: u64) -> DatabaseSettings {
        DatabaseSettings {
            max_connections_per_node: 16,
            max_in_flight_per_node: budget,
            background_share_percent: share,
            max_queued_per_node: queued,
            queue_timeout_ms: timeout_ms,
            ..DatabaseSettings::default()
        }
    }

    /// The budget of a node's pooled queries.
    fn pooled(node: &str, group: NodeGroup, settings: &DatabaseSettings) -> Budget {
        Budget::new(node, group, settings, settings.node_budget())
    }

    fn limits(budget: &Budget) -> (Option<usize>, Option<usize>) {
        let status = budget.status();
        (
            status.interactive.map(|l| l.limit),
            status.background.map(|l| l.limit),
        )
    }

    #[test]
    fn a_shared_node_splits_its_budget_and_a_dedicated_one_gives_it_all() {
        let s = settings(8, 25, 0, 0);
        assert_eq!(
            limits(&pooled("n", NodeGroup::Both, &s)),
            (Some(6), Some(2))
        );
        assert_eq!(
            limits(&pooled("n", NodeGroup::Interactive, &s)),
            (Some(8), None)
        );
        assert_eq!(
            limits(&pooled("n", NodeGroup::Background, &s)),
            (None, Some(8))
        );
        let none = settings(8, 0, 0, 0);
        assert_eq!(
            limits(&pooled("n", NodeGroup::Both, &none)),
            (Some(8), None)
        );
        let tiny = settings(1, 25, 0, 0);
        assert_eq!(
            limits(&pooled("n", NodeGroup::Both, &tiny)),
            (Some(1), Some(1))
        );
        // 0 means the pool less the probes' connection; more is capped to that.
        assert_eq!(
            limits(&pooled("n", NodeGroup::Interactive, &settings(0, 25, 0, 0))).0,
            Some(15)
        );
        assert_eq!(
            limits(&pooled(
                "n",
                NodeGroup::Interactive,
                &settings(99, 25, 0, 0)
            ))
            .0,
            Some(15)
        );
    }

    #[tokio::test]
    async fn background_never_takes_interactive_slots_but_interactive_borrows_idle_background_ones()
    {
        let budget = pooled("n", NodeGroup::Both, &settings(4, 25, 0, 0));
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(
                budget
                    .admit(QueryClass::Interactive)
                    .await
                    .map_err(|r| format!("{r:?}")),
            );
        }
        assert!(
            held.iter().all(Result::is_ok),
            "interactive fills all four slots"
        );
        assert_eq!(
            budget.admit(QueryClass::Background).await.err(),
            Some(ShedReason::QueueFull)
        );
        held.clear();
        let background = budget.admit(QueryClass::Background).await;
        assert!(background.is_ok());
        assert_eq!(
            budget.admit(QueryClass::Background).await.err(),
            Some(ShedReason::QueueFull)
        );
        for _ in 0..3 {
            assert!(budget.admit(QueryClass::Interactive).await.is_ok_and(|a| {
                held.push(Ok(a));
                true
            }));
        }
    }

    #[tokio::test]
    async fn a_full_budget_queues_briefly_then_sheds() {
        let budget = Arc::new(pooled("n", NodeGroup::Interactive, &settings(1, 0, 1, 50)));
        let first = budget.admit(QueryClass::Interactive).await;
        assert!(first.is_ok());
        // One may wait; the second waiter is refused at once.
        let waiter = tokio::spawn({
            let budget = Arc::clone(&budget);
            async move { budget.admit(QueryClass::Interactive).await.err() }
        });
        tokio::task::yield_now().await;
        assert_eq!(budget.status().interactive.map(|l| l.queued), Some(1));
        assert_eq!(
            budget.admit(QueryClass::Interactive).await.err(),
            Some(ShedReason::QueueFull)
        );
        assert_eq!(waiter.await.ok().flatten(), Some(ShedReason::QueueTimeout));
        // A slot freed within the wait is taken.
        let waiter = tokio::spawn({
            let budget = Arc::clone(&budget);
            async move { budget.admit(QueryClass::Interactive).await.is_ok() }
        });
        tokio::task::yield_now().await;
        drop(first);
        assert_eq!(waiter.await.ok(), Some(true));
        assert_eq!(
            budget.admit(QueryClass::Background).await.err(),
            Some(ShedReason::NotServed)
        );
    }
}
