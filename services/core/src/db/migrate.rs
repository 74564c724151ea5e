//! Schema migrations, embedded in the binary and applied by `turnpike
//! migrate` (a one-off Job in Kubernetes, never on every pod's start).

use std::str::FromStr;
use std::time::Duration;

use secrecy::ExposeSecret;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use crate::config::{DatabaseSettings, NodeRole};

/// The migrations under `migrations/`, compiled in.
pub static MIGRATOR: Migrator = sqlx::migrate!("../../migrations");

/// Why migrating failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// No primary is configured.
    #[error("no node with role = \"primary\" is configured")]
    NoPrimary,
    /// The primary's URL does not parse.
    #[error("database.nodes: {0}")]
    Url(sqlx::Error),
    /// Connecting or a statement failed; a lock wait past 5 s lands here. Safe to rerun.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    /// A migration failed or the applied history differs from this binary's.
    #[error(transparent)]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// An index build was interrupted (a concurrent build that failed leaves
    /// an invalid index behind, which `IF NOT EXISTS` would then skip).
    #[error(
        "invalid indexes {0:?}: an index build was interrupted; DROP INDEX CONCURRENTLY each, delete its migration's row from _sqlx_migrations, and migrate again"
    )]
    InvalidIndexes(Vec<String>),
}

/// Applies pending migrations on the primary over a direct connection
/// (migrations take a session advisory lock, which PgBouncer's transaction
/// mode cannot hold), with `lock_timeout` 5 s. Then sets the role's
/// `statement_timeout` and `idle_in_transaction_session_timeout`, which is how
/// they reach connections made through PgBouncer, and its `TimeZone` and
/// `DateStyle` to what sqlx asks for at start-up: PgBouncer sets a client's
/// values on the server it lends it when they differ from the server's, and
/// the pipelined connections (tokio-postgres, which sends neither) take the
/// server's; with the role's matching sqlx's, no server ever needs a `SET`
/// between the two kinds of client.
pub async fn run(settings: &DatabaseSettings) -> Result<(), MigrateError> {
    let primary = settings
        .nodes
        .values()
        .find(|n| n.role == NodeRole::Primary)
        .ok_or(MigrateError::NoPrimary)?;
    let options = PgConnectOptions::from_str(primary.url.expose_secret())
        .map_err(MigrateError::Url)?
        .application_name("turnpike-migrate")
        // No statement timeout: a concurrent index build on a large table
        // takes as long as it takes (the role's timeout, set below, would
        // otherwise apply from the second run on).
        .options([("lock_timeout", "5s"), ("statement_timeout", "0")]);
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect_with(options)
        .await?;
    MIGRATOR.run(&pool).await?;
    let invalid: Vec<(String,)> = sqlx::query_as(
        "SELECT c.relname::text FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
          JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE NOT i.indisvalid AND n.nspname = current_schema()",
    )
    .fetch_all(&pool)
    .await?;
    if !invalid.is_empty() {
        pool.close().await;
        return Err(MigrateError::InvalidIndexes(
            invalid.into_iter().map(|(name,)| name).collect(),
        ));
    }
    let statement_timeout = format!("{}ms", settings.statement_timeout_ms);
    sqlx::raw_sql(&format!(
        "ALTER ROLE CURRENT_USER SET statement_timeout = '{statement_timeout}';
         ALTER ROLE CURRENT_USER SET idle_in_transaction_session_timeout = '10s';
         ALTER ROLE CURRENT_USER SET timezone = 'UTC';
         ALTER ROLE CURRENT_USER SET datestyle = 'ISO, MDY';"
    ))
    .execute(&pool)
    .await?;
    pool.close().await;
    Ok(())
}
