//! Turnpike's shared machinery: configuration, telemetry, the replica-aware
//! database router, Redis access, API-key authentication and the per-user
//! last-write window that gives read-your-writes to clients sending no token.

pub mod auth;
pub mod cache;
pub mod config;
pub mod db;
pub mod events;
pub mod ids;
pub mod kv;
pub mod last_write;
pub mod limits;
pub mod net;
pub mod queue;
pub mod steps;
pub mod switches;
pub mod telemetry;
pub mod tokens;
pub mod turns;

pub use config::Settings;
