//! API keys: generation, hashing at rest, and cached lookup.
//!
//! A key is `tp_` followed by 64 hex digits of randomness; only its SHA-256
//! is stored. Lookups read a replica and fall back to the primary on a miss
//! (a key created a moment ago may not have replicated yet); results are
//! cached in process for `api.auth_cache_ttl_ms`, which is also how long a
//! revoked key may keep working on a process that saw it.

use std::sync::Arc;
use std::time::Duration;

use moka::sync::Cache;
use rand::RngCore;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::db::{Consistency, DbConn, DbError, Router};

/// Who is calling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Principal {
    pub user_id: Uuid,
    /// The key presented: what the in-process per-key rate limit counts.
    pub key_id: Uuid,
    /// Admin keys may call `/v1/admin/*`.
    pub admin: bool,
}

/// A freshly created key; `secret` is shown once and never stored.
#[derive(Debug)]
pub struct NewKey {
    pub user_id: Uuid,
    pub key_id: Uuid,
    pub secret: String,
}

/// SHA-256 of a presented key.
pub fn hash_key(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

fn generate_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("tp_{}", hex::encode(bytes))
}

/// Looks up a key by hash. Runs on any node.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn find_key(
    db: &mut impl DbConn,
    hash: &[u8; 32],
) -> Result<Option<Principal>, sqlx::Error> {
    let prepared = db.prepared();
    let row: Option<(Uuid, Uuid, bool)> = sqlx::query_as(
        "SELECT id, user_id, admin FROM api_keys WHERE key_hash = $1 AND revoked_at IS NULL",
    )
    .bind(&hash[..])
    .persistent(prepared)
    .fetch_optional(db.conn())
    .await?;
    Ok(row.map(|(key_id, user_id, admin)| Principal {
        user_id,
        key_id,
        admin,
    }))
}

/// Creates the user if it does not exist, and a new key for it. Primary only.
#[tracing::instrument(level = "debug", skip(db))]
pub async fn create_key(
    db: &mut impl DbConn,
    user_name: &str,
    admin: bool,
) -> Result<NewKey, sqlx::Error> {
    let prepared = db.prepared();
    let (user_id,): (Uuid,) = sqlx::query_as(
        "INSERT INTO users (id, name) VALUES ($1, $2)
         ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name
         RETURNING id",
    )
    .bind(Uuid::now_v7())
    .bind(user_name)
    .persistent(prepared)
    .fetch_one(db.conn())
    .await?;
    let secret = generate_secret();
    let key_id = Uuid::now_v7();
    sqlx::query("INSERT INTO api_keys (id, user_id, key_hash, admin) VALUES ($1, $2, $3, $4)")
        .bind(key_id)
        .bind(user_id)
        .bind(&hash_key(&secret)[..])
        .bind(admin)
        .persistent(prepared)
        .execute(db.conn())
        .await?;
    Ok(NewKey {
        user_id,
        key_id,
        secret,
    })
}

/// Resolves bearer keys to principals, with an in-process cache.
#[derive(Debug, Clone)]
pub struct Authenticator {
    router: Arc<Router>,
    known: Cache<[u8; 32], Principal>,
    unknown: Cache<[u8; 32], ()>,
}

impl Authenticator {
    pub fn new(router: Arc<Router>, ttl: Duration) -> Self {
        Self {
            router,
            known: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(ttl)
                .build(),
            // Short: a key created on another process must start working quickly.
            unknown: Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(1))
                .build(),
        }
    }

    /// The principal for a presented key, or `None` for an unknown or revoked key.
    pub async fn authenticate(&self, secret: &str) -> Result<Option<Principal>, DbError> {
        let hash = hash_key(secret);
        if let Some(principal) = self.known.get(&hash) {
            return Ok(Some(principal));
        }
        if self.unknown.contains_key(&hash) {
            return Ok(None);
        }
        let mut found = self
            .router
            .read(Consistency::Eventual, move |db| {
                Box::pin(async move { find_key(db, &hash).await })
            })
            .await?;
        if found.is_none() {
            found = self
                .router
                .read(Consistency::Strong, move |db| {
                    Box::pin(async move { find_key(db, &hash).await })
                })
                .await?;
        }
        match found {
            Some(principal) => self.known.insert(hash, principal),
            None => self.unknown.insert(hash, ()),
        }
        Ok(found)
    }
}
