//! The per-user last-write window: every write records the caller's commit
//! LSN for `last_write_window_ms`, so a `session` read from a client that
//! sends no `Turnpike-Consistency` header (an SDK) still reads its own writes,
//! on whichever api process it lands.
//!
//! The window lives in Redis (shared by all processes) and in a local cache
//! (for this process's own writes while Redis is unreachable).

use std::time::Duration;

use moka::sync::Cache;
use redis::Script;
use std::sync::LazyLock;
use uuid::Uuid;

use crate::db::Lsn;
use crate::kv::Kv;

/// Sets the key only when the new position is higher, with a fresh expiry.
const SET_MAX: &str = r"
local current = redis.call('GET', KEYS[1])
if (not current) or tonumber(current) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return 1
";
static SET_MAX_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(SET_MAX));

/// Remembers each user's latest write position for a short window.
#[derive(Debug, Clone)]
pub struct LastWrites {
    local: Cache<Uuid, u64>,
    kv: Kv,
    window: Duration,
}

impl LastWrites {
    pub fn new(kv: Kv, window: Duration) -> Self {
        Self {
            local: Cache::builder()
                .max_capacity(1_000_000)
                .time_to_live(window)
                .build(),
            kv,
            window,
        }
    }

    fn key(user: Uuid) -> String {
        // The hash tag keeps a user's keys in one Redis Cluster slot.
        format!("tp:{{user_{}}}:last_write", user.simple())
    }

    /// Records a write. Redis trouble is logged, not returned: the local copy
    /// still covers this process.
    pub async fn record(&self, user: Uuid, lsn: Lsn) {
        let previous = self.local.get(&user).unwrap_or(0);
        if lsn.0 > previous {
            self.local.insert(user, lsn.0);
        }
        let window_ms = u64::try_from(self.window.as_millis()).unwrap_or(u64::MAX);
        let key = Self::key(user);
        let result = self
            .kv
            .run(|mut conn| async move {
                SET_MAX_SCRIPT
                    .key(key)
                    .arg(lsn.0)
                    .arg(window_ms)
                    .invoke_async::<i64>(&mut conn)
                    .await
            })
            .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not record the last-write position in redis");
        }
    }

    /// The user's latest write position within the window, if any.
    pub async fn get(&self, user: Uuid) -> Option<Lsn> {
        let local = self.local.get(&user);
        let key = Self::key(user);
        let shared = self
            .kv
            .run(|mut conn| async move {
                redis::cmd("GET")
                    .arg(key)
                    .query_async::<Option<u64>>(&mut conn)
                    .await
            })
            .await
            .unwrap_or_else(|e| {
                tracing::debug!(error = %e, "last-write lookup fell back to the local window");
                None
            });
        local.max(shared).map(Lsn)
    }
}
