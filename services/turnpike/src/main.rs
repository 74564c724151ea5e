//! The one Turnpike binary: parses the subcommand, loads configuration,
//! starts logging, and hands over to a library.
#![allow(clippy::print_stdout)]

use anyhow::Context;

/// mimalloc instead of glibc's malloc: the request path allocates from
/// several threads at once, and glibc's arena locks showed up in profiles
/// of the cached read path.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use clap::{Parser, Subcommand};
use turnpike_core::Settings;

#[derive(Parser)]
#[command(
    name = "turnpike",
    version,
    about = "A horizontally scaled chat backend"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API.
    Api,
    /// Run agent-loop turns from the queue.
    Worker,
    /// Serve the scripted mock model (OpenAI Responses API).
    MockModel,
    /// Apply database migrations on the primary, then exit.
    Migrate,
    /// Manage API keys.
    Keys {
        #[command(subcommand)]
        action: KeysCommand,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key for a user (created if new); prints the key as the last line.
    Create {
        /// The user's name.
        #[arg(long)]
        user: String,
        /// Allow the key to call /v1/admin routes.
        #[arg(long)]
        admin: bool,
    },
    /// Revoke a key, named by its id or by the key itself (`tp_…`). It
    /// stops working at once in api processes that have not cached it, and
    /// within `api.auth_cache_ttl_ms` in those that have.
    Revoke {
        /// The key's id (printed when it was created) or the key.
        #[arg(long)]
        key: String,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let settings = Settings::load()?;
    let service = match &cli.command {
        Command::Api => "turnpike-api",
        Command::Worker => "turnpike-worker",
        Command::MockModel => "turnpike-mock-model",
        Command::Migrate => "turnpike-migrate",
        Command::Keys { .. } => "turnpike-keys",
    };
    turnpike_core::telemetry::init(&settings.log, service);
    match cli.command {
        Command::Api => {
            let app = turnpike_api::Application::build(settings).await?;
            tracing::info!(port = app.port(), "api listening");
            app.run_until_stopped().await?;
        }
        Command::Worker => {
            let worker = turnpike_worker::Worker::build(settings).await?;
            tracing::info!(name = worker.name(), "worker running");
            worker.run_until(turnpike_api::shutdown_signal()).await;
        }
        Command::MockModel => {
            let mock = turnpike_mock_model::MockModel::build(settings.mock.clone()).await?;
            tracing::info!(port = mock.port(), "mock model listening");
            mock.run_until(turnpike_api::shutdown_signal()).await?;
        }
        Command::Migrate => {
            turnpike_core::db::migrate::run(&settings.database)
                .await
                .context("migrating the primary")?;
            tracing::info!("migrations applied");
        }
        Command::Keys {
            action: KeysCommand::Revoke { key },
        } => {
            let router = turnpike_core::db::Router::new(&settings.database)?;
            let mut tx = router.write().await?;
            let revoked = turnpike_core::auth::revoke_key(&mut tx, &key).await?;
            tx.commit().await?;
            let Some(hash) = revoked else {
                anyhow::bail!("no key in force matches {key}");
            };
            let kv = turnpike_core::kv::Kv::new(&settings.redis)?;
            if let Err(e) = turnpike_core::auth::forget_cached(&kv, &hash).await {
                tracing::warn!(error = %e, "could not drop the key's cached entry; it expires by itself");
            }
            println!(
                "revoked; it stops working within {} ms",
                settings.api.auth_cache_ttl_ms
            );
        }
        Command::Keys {
            action: KeysCommand::Create { user, admin },
        } => {
            let router = turnpike_core::db::Router::new(&settings.database)?;
            let mut tx = router.write().await?;
            let key = turnpike_core::auth::create_key(&mut tx, &user, admin).await?;
            tx.commit().await?;
            println!("user {} ({}), key id {}", user, key.user_id, key.key_id);
            println!("{}", key.secret);
        }
    }
    turnpike_core::telemetry::flush();
    Ok(())
}
