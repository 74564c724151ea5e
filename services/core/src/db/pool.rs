//! A connection pool per node, on deadpool.
//!
//! sqlx's own pool pings every connection when it is returned (an extra
//! round trip and a spawned task per query, doubling a read's cost). Here a
//! connection goes back to the pool as it is after a clean use; only one
//! abandoned mid-operation (an error, a timeout, a dropped future) is
//! checked first: drained and rolled back on a background task, or closed
//! if that fails.

use std::time::Duration;

use deadpool::managed::{self, Metrics, Object, RecycleResult};
use sqlx::postgres::{PgConnectOptions, PgRow};
use sqlx::{Connection, PgConnection};

/// Creates connections to one node.
#[derive(Debug)]
pub(super) struct PgManager {
    options: PgConnectOptions,
}

impl managed::Manager for PgManager {
    type Type = PgConnection;
    type Error = sqlx::Error;

    async fn create(&self) -> Result<PgConnection, sqlx::Error> {
        PgConnection::connect_with(&self.options).await
    }

    async fn recycle(&self, _conn: &mut PgConnection, _: &Metrics) -> RecycleResult<sqlx::Error> {
        // Connections return clean (see `Pooled`); the node monitor finds dead nodes.
        Ok(())
    }
}

/// One node's pool.
#[derive(Debug, Clone)]
pub(super) struct NodePool {
    pool: managed::Pool<PgManager>,
}

/// Pool statistics.
pub(super) struct Usage {
    pub size: usize,
    pub available: usize,
    pub max: usize,
}

impl NodePool {
    pub(super) fn new(
        options: PgConnectOptions,
        max_size: usize,
        acquire_timeout: Duration,
    ) -> Self {
        // `build` fails only without a runtime or with a zero size, both set here.
        let pool = managed::Pool::builder(PgManager { options })
            .max_size(max_size.max(1))
            .runtime(deadpool::Runtime::Tokio1)
            .wait_timeout(Some(acquire_timeout))
            .create_timeout(Some(acquire_timeout))
            .build()
            .unwrap_or_else(|e| unreachable!("pool builder: {e}"));
        Self { pool }
    }

    /// A connection, within the acquire timeout.
    pub(super) async fn get(&self) -> Result<Pooled, sqlx::Error> {
        match self.pool.get().await {
            Ok(object) => Ok(Pooled {
                object: Some(object),
                in_transaction: false,
                clean: false,
            }),
            Err(managed::PoolError::Backend(e)) => Err(e),
            Err(managed::PoolError::Closed) => Err(sqlx::Error::PoolClosed),
            Err(_) => Err(sqlx::Error::PoolTimedOut),
        }
    }

    /// Runs one parameterless statement with the simple protocol (no
    /// prepared statement, safe through PgBouncer) and returns its first row.
    pub(super) async fn simple_row(&self, sql: &'static str) -> Result<PgRow, sqlx::Error> {
        let mut conn = self.get().await?;
        let row = sqlx::Executor::fetch_one(conn.conn(), sql).await?;
        conn.done();
        Ok(row)
    }

    pub(super) fn usage(&self) -> Usage {
        let status = self.pool.status();
        Usage {
            size: status.size,
            available: status.available,
            max: status.max_size,
        }
    }
}

/// A checked-out connection. Call [`Pooled::done`] after a clean use;
/// dropped without it, the connection is recovered or closed in the background.
pub(super) struct Pooled {
    object: Option<Object<PgManager>>,
    /// A transaction was opened with `BEGIN` and not yet ended.
    pub(super) in_transaction: bool,
    clean: bool,
}

impl Pooled {
    pub(super) fn conn(&mut self) -> &mut PgConnection {
        match self.object.as_mut() {
            Some(object) => object,
            None => unreachable!("a Pooled connection is only emptied by Drop"),
        }
    }

    /// The last operation completed: the connection may go back as it is.
    pub(super) fn done(mut self) {
        self.clean = !self.in_transaction;
    }

    /// Closes the connection instead of returning it (it failed).
    pub(super) fn discard(mut self) {
        if let Some(object) = self.object.take() {
            drop(Object::take(object));
        }
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if self.clean {
            return;
        }
        let Some(mut object) = self.object.take() else {
            return;
        };
        let in_transaction = self.in_transaction;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            drop(Object::take(object));
            return;
        };
        runtime.spawn(async move {
            let recover = async {
                if in_transaction {
                    sqlx::Executor::execute(&mut *object, "ROLLBACK")
                        .await
                        .map(|_| ())
                } else {
                    // Drains whatever an abandoned query left unread.
                    object.ping().await
                }
            };
            match tokio::time::timeout(Duration::from_secs(2), recover).await {
                Ok(Ok(())) => drop(object),
                _ => drop(Object::take(object)),
            }
        });
    }
}
