//! API keys: generation, hashing at rest, and cached lookup.
//!
//! A key is `tp_` followed by 64 hex digits of randomness; only its SHA-256
//! is stored. Lookups read a replica and fall back to the primary on a miss
//! (a key created a moment ago may not have replicated yet); results are
//! cached in process and in Redis for `api.auth_cache_ttl_ms`, which is also
//! how long a revoked key may keep working.

use std::sync::Arc;
use std::time::Duration;

use std::num::NonZeroU32;

use rand::RngCore;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::db::{Consistency, DbConn, DbError, Router};
use crate::kv::Kv;

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

/// Revokes a key, named by its id or by the key itself. Answers the key's
/// hash, for [`forget_cached`], or `None` when no such key is in force.
/// Primary only.
#[tracing::instrument(level = "debug", skip_all)]
pub async fn revoke_key(
    db: &mut impl DbConn,
    which: &str,
) -> Result<Option<[u8; 32]>, sqlx::Error> {
    let prepared = db.prepared();
    let row: Option<(Vec<u8>,)> = if which.starts_with("tp_") {
        sqlx::query_as(
            "UPDATE api_keys SET revoked_at = now()
              WHERE key_hash = $1 AND revoked_at IS NULL RETURNING key_hash",
        )
        .bind(&hash_key(which)[..])
        .persistent(prepared)
        .fetch_optional(db.conn())
        .await?
    } else {
        let Ok(id) = Uuid::parse_str(which) else {
            return Ok(None);
        };
        sqlx::query_as(
            "UPDATE api_keys SET revoked_at = now()
              WHERE id = $1 AND revoked_at IS NULL RETURNING key_hash",
        )
        .bind(id)
        .persistent(prepared)
        .fetch_optional(db.conn())
        .await?
    };
    Ok(row.and_then(|(hash,)| hash.try_into().ok()))
}

/// Drops a key's shared (Redis) cache entry: a revoked key then stops
/// working at once in every api process that has not cached it itself,
/// and within `api.auth_cache_ttl_ms` in those that have.
pub async fn forget_cached(kv: &Kv, hash: &[u8; 32]) -> Result<(), crate::kv::KvError> {
    let key = format!("tp:key:{}", hex::encode(hash));
    kv.run(|mut conn| async move {
        redis::cmd("DEL")
            .arg(key)
            .query_async::<i64>(&mut conn)
            .await
    })
    .await
    .map(|_| ())
}

/// Resolves bearer keys to principals through two cache levels: in process
/// (moka, concurrent lookups of one key share one load) and Redis
/// (`tp:key:<sha256>`), then Postgres. Unknown keys are cached briefly at
/// both levels. A key missing on the replica is looked up on the primary (it
/// may have been created a moment ago), but at most
/// `PRIMARY_CHECKS_PER_S` times a second per process: a flood of made-up
/// keys cannot reach the primary.
#[derive(Clone)]
pub struct Authenticator {
    router: Arc<Router>,
    kv: Option<Kv>,
    known_ttl: Duration,
    keys: moka::future::Cache<[u8; 32], Option<Principal>, KeyHasher>,
    /// Keys found unknown, kept apart so that a flood of made-up keys
    /// never takes the place of real ones.
    unknown: moka::future::Cache<[u8; 32], (), KeyHasher>,
    primary_checks: Arc<governor::DefaultDirectRateLimiter>,
    /// Database look-ups of keys neither cache level knows, per process.
    lookups: Arc<governor::DefaultDirectRateLimiter>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator").finish_non_exhaustive()
    }
}

/// The key caches' hasher. Their keys are SHA-256 digests, which no caller
/// can aim at a bucket; SipHash's resistance would buy nothing but cost.
type KeyHasher = foldhash::fast::RandomState;

/// How long an unknown key stays unknown: short, so that a key created on
/// another process starts working quickly.
const UNKNOWN_TTL: Duration = Duration::from_secs(1);

/// Primary look-ups of keys the replica does not know, per second and process.
const PRIMARY_CHECKS_PER_S: u32 = 50;

/// Unknown keys remembered per process.
const UNKNOWN_KEYS_CACHED: u64 = 10_000;

struct KeyExpiry {
    known: Duration,
}

impl moka::Expiry<[u8; 32], Option<Principal>> for KeyExpiry {
    fn expire_after_create(
        &self,
        _key: &[u8; 32],
        value: &Option<Principal>,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(if value.is_some() {
            self.known
        } else {
            UNKNOWN_TTL
        })
    }
}

impl Authenticator {
    /// `kv`: the Redis level; `None` keeps lookups in process.
    /// `lookups_per_s`: database look-ups of keys no cache knows, per
    /// second and process (with a burst of as many); past it a request with
    /// such a key is shed (503) without touching the database.
    pub fn new(router: Arc<Router>, ttl: Duration, kv: Option<Kv>, lookups_per_s: u32) -> Self {
        let per_second = NonZeroU32::new(PRIMARY_CHECKS_PER_S).unwrap_or(NonZeroU32::MIN);
        Self {
            router,
            kv,
            known_ttl: ttl,
            keys: moka::future::Cache::builder()
                .max_capacity(100_000)
                .expire_after(KeyExpiry { known: ttl })
                .build_with_hasher(KeyHasher::default()),
            unknown: moka::future::Cache::builder()
                .max_capacity(UNKNOWN_KEYS_CACHED)
                .time_to_live(UNKNOWN_TTL)
                .build_with_hasher(KeyHasher::default()),
            primary_checks: Arc::new(governor::RateLimiter::direct(governor::Quota::per_second(
                per_second,
            ))),
            lookups: Arc::new(governor::RateLimiter::direct(governor::Quota::per_second(
                NonZeroU32::new(lookups_per_s).unwrap_or(NonZeroU32::MIN),
            ))),
        }
    }

    /// The principal for a presented key, or `None` for an unknown or revoked key.
    pub async fn authenticate(&self, secret: &str) -> Result<Option<Principal>, DbError> {
        let hash = hash_key(secret);
        if let Some(known) = self.keys.get(&hash).await {
            return Ok(known);
        }
        // Boxed: the look-up's state would otherwise make every request's
        // future (which the api's middleware boxes and moves) kilobytes
        // larger for the sake of a cache miss.
        Box::pin(self.authenticate_uncached(hash)).await
    }

    /// [`authenticate`](Self::authenticate) past the in-process cache.
    async fn authenticate_uncached(&self, hash: [u8; 32]) -> Result<Option<Principal>, DbError> {
        if self.unknown.contains_key(&hash) {
            return Ok(None);
        }
        let this = self.clone();
        let found = self
            .keys
            .try_get_with(hash, async move { this.load(hash).await })
            .await
            .map_err(|shared| {
                Arc::try_unwrap(shared).unwrap_or_else(|shared| match &*shared {
                    // Shared by several waiting look-ups: the same kind of error.
                    DbError::Overloaded { node, class } => DbError::Overloaded {
                        node: node.clone(),
                        class: *class,
                    },
                    DbError::PrimaryUnavailable => DbError::PrimaryUnavailable,
                    _ => DbError::NoNodeAvailable,
                })
            })?;
        if found.is_none() {
            // Remembered apart from the real keys (the shared load above
            // coalesced concurrent look-ups of it).
            self.keys.invalidate(&hash).await;
            self.unknown.insert(hash, ()).await;
        }
        Ok(found)
    }

    async fn load(&self, hash: [u8; 32]) -> Result<Option<Principal>, DbError> {
        let l2_key = format!("tp:key:{}", hex::encode(hash));
        if let Some(kv) = &self.kv {
            let key = l2_key.clone();
            let cached: Result<Option<String>, _> =
                kv.run(|mut conn| async move {
                    redis::cmd("GET").arg(key).query_async(&mut conn).await
                })
                .await;
            if let Ok(Some(text)) = cached {
                return Ok(decode_principal(&text));
            }
        }
        if self.lookups.check().is_err() {
            return Err(DbError::Overloaded {
                node: "api key look-ups".into(),
                class: crate::db::QueryClass::Interactive,
            });
        }
        let mut found = self
            .router
            .read(Consistency::Eventual, move |db| {
                Box::pin(async move { find_key(db, &hash).await })
            })
            .await?;
        if found.is_none() && self.primary_checks.check().is_ok() {
            found = self
                .router
                .read(Consistency::Strong, move |db| {
                    Box::pin(async move { find_key(db, &hash).await })
                })
                .await?;
        }
        if let Some(kv) = &self.kv {
            let ttl = if found.is_some() {
                self.known_ttl
            } else {
                UNKNOWN_TTL
            };
            let text = encode_principal(found.as_ref());
            let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
            // Best effort: a failed write only costs a later lookup.
            let _ = kv
                .run(|mut conn| async move {
                    redis::cmd("SET")
                        .arg(l2_key)
                        .arg(text)
                        .arg("PX")
                        .arg(ttl_ms)
                        .query_async::<()>(&mut conn)
                        .await
                })
                .await;
        }
        Ok(found)
    }
}

/// The Redis form of a lookup: `<user>:<key>:<admin 0|1>`, or `-` for unknown.
fn encode_principal(principal: Option<&Principal>) -> String {
    match principal {
        Some(p) => format!(
            "{}:{}:{}",
            p.user_id.simple(),
            p.key_id.simple(),
            u8::from(p.admin)
        ),
        None => "-".to_owned(),
    }
}

fn decode_principal(text: &str) -> Option<Principal> {
    let mut parts = text.split(':');
    let user_id = Uuid::try_parse(parts.next()?).ok()?;
    let key_id = Uuid::try_parse(parts.next()?).ok()?;
    let admin = parts.next()? == "1";
    Some(Principal {
        user_id,
        key_id,
        admin,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principals_round_trip_through_their_redis_form() {
        let principal = Principal {
            user_id: Uuid::now_v7(),
            key_id: Uuid::now_v7(),
            admin: true,
        };
        assert_eq!(
            decode_principal(&encode_principal(Some(&principal))),
            Some(principal)
        );
        assert_eq!(decode_principal(&encode_principal(None)), None);
    }
}
