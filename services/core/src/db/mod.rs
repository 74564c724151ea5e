//! Postgres access: one pool per node, and a router that sends every write to
//! the primary and every read to a replica that satisfies the read's
//! consistency (DESIGN §4).
//!
//! Query functions elsewhere take `&mut impl DbConn` and say which node class
//! they may run on; the router decides which node that is.

mod budget;
pub mod migrate;
mod node;
mod pipeline;
mod pool;
mod router;
pub mod statement;

use std::fmt;
use std::future::Future;
use std::str::FromStr;

pub use budget::{BudgetStatus, LaneStatus};
pub use node::{Node, NodeState, NodeStatus, PoolStatus};
pub use pipeline::Pipelined;
pub use router::{OneStatement, Reader, Router, Writer};
pub use turnpike_protocol::QueryClass;

tokio::task_local! {
    /// The class of the request being served, set around its handler.
    static CLASS: QueryClass;
}

/// The query class of the work this task does: the one set by the nearest
/// [`with_class`] around it, else `interactive`. [`Router::read`] uses it,
/// so every read a request makes (its key lookup, its cache fills, its
/// handler's queries) runs in the request's class without each call site
/// passing it; [`Router::read_as`] names a class explicitly.
pub fn current_class() -> QueryClass {
    CLASS
        .try_with(|class| *class)
        .unwrap_or(QueryClass::Interactive)
}

/// Runs `work` with `class` as its [`current_class`]. Work it spawns onto
/// other tasks does not inherit it. Not an `async fn`: that would hold
/// `work` twice (as its argument and inside the scope it awaits), and every
/// request's future, which has this inside, would be copied twice as large.
pub fn with_class<F: Future>(class: QueryClass, work: F) -> impl Future<Output = F::Output> {
    CLASS.scope(class, work)
}

/// A position in the primary's write-ahead log, in bytes since `0/0`.
/// On the wire it is Postgres' own text form, e.g. `0/16B3748`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Lsn(pub u64);

impl fmt::Display for Lsn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xFFFF_FFFF)
    }
}

/// The text was not an LSN (`<hex>/<hex>`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a WAL position: expected the form 16/B374D848")]
pub struct ParseLsnError;

impl FromStr for Lsn {
    type Err = ParseLsnError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (hi, lo) = s.split_once('/').ok_or(ParseLsnError)?;
        if hi.is_empty() || lo.is_empty() || hi.len() > 8 || lo.len() > 8 {
            return Err(ParseLsnError);
        }
        let hi = u64::from_str_radix(hi, 16).map_err(|_| ParseLsnError)?;
        let lo = u64::from_str_radix(lo, 16).map_err(|_| ParseLsnError)?;
        Ok(Lsn((hi << 32) | lo))
    }
}

/// How fresh a read must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// Any healthy replica.
    Eventual,
    /// A replica whose lag is under the configured staleness bound.
    Bounded,
    /// A replica that has replayed at least this position (the caller's last
    /// write); `None` when the caller has written nothing recently.
    Session(Option<Lsn>),
    /// The primary.
    Strong,
}

/// Why a database operation failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The primary is down or not answering in time: writes fail fast. Retry later (503).
    #[error("the primary database is unavailable")]
    PrimaryUnavailable,
    /// Every node that could serve the read failed. Retry later (503).
    #[error("no database node can serve this read")]
    NoNodeAvailable,
    /// The node chosen for the query already runs its class's budget of
    /// queries, and no slot freed up within the short queue wait (or the
    /// queue was full): the query was shed rather than piled up. Retry
    /// after a moment (503 + `Retry-After`, code `overloaded`).
    #[error("database node {node} is over its {} budget; query shed", class.as_str())]
    Overloaded { node: String, class: QueryClass },
    /// The query did not finish in time (it waited on a lock, or ran
    /// long): this request fails, the node is not blamed. Health comes
    /// from the probes and from connection errors, so one slow query never
    /// takes a node out for everyone. Retry later (504).
    #[error("the query on {node} did not finish in time")]
    Timeout { node: String },
    /// A query failed on a healthy node: a bug or a constraint the caller did not handle.
    #[error(transparent)]
    Query(#[from] sqlx::Error),
}

impl DbError {
    /// Whether the same operation may succeed if retried later.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::PrimaryUnavailable
            | Self::NoNodeAvailable
            | Self::Overloaded { .. }
            | Self::Timeout { .. } => true,
            Self::Query(e) => {
                is_connection_error(e) || is_query_timeout(e) || is_transaction_conflict(e)
            }
        }
    }

    /// The SQLSTATE of a database error, e.g. `23505` for a unique violation.
    pub fn sqlstate(&self) -> Option<String> {
        match self {
            Self::Query(sqlx::Error::Database(e)) => e.code().map(|c| c.into_owned()),
            _ => None,
        }
    }
}

/// Errors that say the query ran out of time on a healthy node: the
/// server's `statement_timeout` (57014) or `lock_timeout` (55P03).
pub fn is_query_timeout(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db)
        if db.code().is_some_and(|code| matches!(code.as_ref(), "57014" | "55P03")))
}

/// Errors that say the transaction collided with another and was rolled
/// back, so that the same request may succeed at once: a deadlock (40P01)
/// or a serialization failure (40001).
pub fn is_transaction_conflict(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db)
        if db.code().is_some_and(|code| matches!(code.as_ref(), "40P01" | "40001")))
}

/// Errors that say the node (or the path to it) failed, not the query:
/// the read may be retried on another node.
pub fn is_connection_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| {
            // 08: connection exceptions (PgBouncer reports its own failures here too);
            // 57P01-57P03: admin shutdown, crash shutdown, cannot connect now;
            // 25006: read-only transaction, a primary that was demoted.
            code.starts_with("08") || matches!(code.as_ref(), "57P01" | "57P02" | "57P03" | "25006")
        }),
        _ => false,
    }
}

/// A connection a query function runs on: a replica read or a primary
/// transaction. `prepared()` says whether statements may be named and cached
/// (direct connections) or must stay unnamed (PgBouncer transaction mode);
/// every query sets `.persistent(conn.prepared())`.
pub trait DbConn: Send {
    fn prepared(&self) -> bool;
    fn conn(&mut self) -> &mut sqlx::PgConnection;
    /// The connection for a statement sent as one simple-protocol message
    /// ([`statement`]), which needs no transaction around it even through
    /// PgBouncer.
    fn conn_for_one_message(&mut self) -> &mut sqlx::PgConnection {
        self.conn()
    }
    /// The node's pipelined connection this read runs on, if it runs on
    /// one ([`statement`] sends its statements there).
    fn pipelined(&self) -> Option<&std::sync::Arc<Pipelined>> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trips_through_postgres_text_form() {
        let lsn: Lsn = "16/B374D848".parse().unwrap_or_default();
        assert_eq!(lsn, Lsn(0x16_B374_D848));
        assert_eq!(lsn.to_string(), "16/B374D848");
        assert_eq!("0/0".parse::<Lsn>(), Ok(Lsn(0)));
    }

    #[test]
    fn lsn_rejects_garbage() {
        for bad in ["", "/", "1/", "/1", "xyz/1", "1/2/3", "123456789/0", "-1/0"] {
            assert_eq!(bad.parse::<Lsn>(), Err(ParseLsnError), "{bad}");
        }
    }
}
