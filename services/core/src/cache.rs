//! The read cache in front of Postgres, per conversation: L1 in process
//! (moka, bounded by bytes, short TTL), L2 in Redis (one hash per
//! conversation), with leases so that a miss storm costs one query.
//!
//! - **Coalescing.** Concurrent misses of one key in a process wait for one
//!   load (moka's `try_get_with`).
//! - **Leases.** A load that misses L2 asks Redis for the key's lease. The
//!   holder reads Postgres and fills L2; everyone else, in every process,
//!   waits up to `lease_wait_ms` for the fill, then reads through.
//! - **Stale-set protection.** A write deletes the conversation's L2 hash
//!   and its leases, and records the write's LSN as the conversation's
//!   floor. A fill only lands while its lease is still there, so a slow
//!   filler that read before the write cannot overwrite what came after; and
//!   a fill reads at least at the floor, so a lagging replica cannot put old
//!   rows back.
//! - **Invalidation.** The write also publishes the conversation id; every
//!   process drops its L1 entries for it (an entry stamped before the
//!   invalidation is never served again). A lost subscription clears L1.
//! - **Read-your-writes.** An L1 entry older than the reader's session
//!   token is skipped (another process's invalidation may still be in
//!   flight); L2 is deleted before a write answers, so L2 never hides it.
//! - **Negative caching.** "No such conversation" is cached too, briefly.
//! - **Redis outage.** Any L2 failure opens a breaker: for a second, reads
//!   bypass both levels and go to Postgres (L1 could not be invalidated
//!   meanwhile). Invalidations that could not reach Redis are retried in the
//!   background until it answers; L2's TTL bounds what a crash loses.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use redis::Script;
use std::sync::LazyLock;
use uuid::Uuid;

use crate::config::CacheSettings;
use crate::db::Lsn;
use crate::kv::{Kv, KvError};

/// The channel invalidations are broadcast on.
const CHANNEL: &str = "tp:cache:invalidate";

/// Reads L2; on a miss, takes the lease or reports who holds it.
/// Returns {1, value} | {2, token, floor} (lease taken) | {3, floor} (held).
const LOOKUP: &str = r"
local v = redis.call('HGET', KEYS[1], ARGV[1])
if v then return {1, v} end
local floor = redis.call('GET', KEYS[3]) or '0'
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local held = redis.call('HGET', KEYS[2], ARGV[1])
if held then
  local deadline = tonumber(string.match(held, '|(%d+)$'))
  if deadline and deadline > now_ms then return {3, floor} end
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2] .. '|' .. (now_ms + tonumber(ARGV[3])))
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return {2, ARGV[2], floor}
";
static LOOKUP_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(LOOKUP));

/// Fills L2 if the lease is still ours. Returns 1 when filled.
const FILL: &str = r"
local held = redis.call('HGET', KEYS[2], ARGV[1])
if not held or string.sub(held, 1, string.len(ARGV[2]) + 1) ~= ARGV[2] .. '|' then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('HDEL', KEYS[2], ARGV[1])
return 1
";
static FILL_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(FILL));

/// Drops a conversation's L2 entries and leases, raises its floor, and
/// tells every process.
const INVALIDATE: &str = r"
redis.call('DEL', KEYS[1], KEYS[2])
local floor = tonumber(redis.call('GET', KEYS[3]) or '0')
if tonumber(ARGV[1]) > floor then
  redis.call('SET', KEYS[3], ARGV[1], 'PX', ARGV[2])
else
  redis.call('PEXPIRE', KEYS[3], ARGV[2])
end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
";
static INVALIDATE_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(INVALIDATE));

fn keys(conversation: Uuid) -> [String; 3] {
    let tag = conversation.simple();
    [
        format!("tp:{{conv_{tag}}}:cache"),
        format!("tp:{{conv_{tag}}}:leases"),
        format!("tp:{{conv_{tag}}}:floor"),
    ]
}

/// A cached answer.
#[derive(Debug)]
pub struct Entry {
    /// The conversation's last write known when it was read: the entry
    /// reflects every write up to here.
    pub as_of: Lsn,
    /// The answer; `None` when the thing does not exist (for this caller).
    pub body: Option<bytes::Bytes>,
    /// The process-local moment its load began (see [`Cache::stamp`]).
    stamp: u64,
}

impl Entry {
    fn encode(&self) -> Vec<u8> {
        let mut out = format!("{}:", self.as_of.0).into_bytes();
        match &self.body {
            Some(body) => {
                out.push(b'v');
                out.extend_from_slice(body);
            }
            None => out.push(b'n'),
        }
        out
    }

    fn decode(raw: &[u8], stamp: u64) -> Option<Entry> {
        let colon = raw.iter().position(|b| *b == b':')?;
        let as_of = std::str::from_utf8(&raw[..colon]).ok()?.parse().ok()?;
        let body = match raw.get(colon + 1)? {
            b'v' => Some(bytes::Bytes::copy_from_slice(&raw[colon + 2..])),
            b'n' => None,
            _ => return None,
        };
        Some(Entry {
            as_of: Lsn(as_of),
            body,
            stamp,
        })
    }
}

/// What a lookup asks for.
pub struct Lookup<'a> {
    pub conversation: Uuid,
    /// The answer's name within the conversation, e.g. `items:<user>:desc:-:20`.
    pub field: &'a str,
    /// The reader's read-your-writes floor: L1 entries older are skipped.
    pub session: Option<Lsn>,
}

/// The two-level cache of one process.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

/// What became of a cached read, as `turnpike_cache_requests_total` counts it.
#[derive(Clone, Copy)]
enum Outcome {
    Bypass,
    L1Hit,
    L2Hit,
    Miss,
    LeaseHit,
    LeaseTimeout,
}

/// The `result` labels of `turnpike_cache_requests_total`, in [`Outcome`]'s order.
pub(crate) const RESULTS: [&str; 6] = [
    "bypass",
    "l1_hit",
    "l2_hit",
    "miss",
    "lease_hit",
    "lease_timeout",
];

/// Counts a read's outcome, with handles registered once.
fn count(outcome: Outcome) {
    static COUNTERS: [std::sync::OnceLock<metrics::Counter>; 6] =
        [const { std::sync::OnceLock::new() }; 6];
    let index = outcome as usize;
    crate::telemetry::kept(
        &COUNTERS[index],
        || metrics::counter!("turnpike_cache_requests_total", "result" => RESULTS[index]),
    )
    .increment(1);
}

/// The hasher of L1 and of the per-conversation maps. Callers choose the
/// ids in L1's keys (a conversation that may not exist, a page's `after`),
/// so the hash is seeded at random per process and mixes well: no answer
/// shows the seed, and without it no one can aim keys at one bucket.
/// Cheaper than SipHash for a key of a hundred bytes on every hit.
type Hasher = foldhash::quality::RandomState;

struct Inner {
    settings: CacheSettings,
    kv: Kv,
    l1: moka::future::Cache<String, Arc<Entry>, Hasher>,
    /// Stamps are taken from here: an entry is valid only if its load began
    /// after its conversation's last invalidation in this process.
    clock: AtomicU64,
    /// Conversation → (stamp of its last invalidation, when). Entries older
    /// than the L1 TTL are swept: by then every L1 entry they guard expired.
    invalidated: Mutex<HashMap<Uuid, (u64, Instant), Hasher>>,
    /// L2 is skipped until this many ms after `epoch`.
    breaker_until_ms: AtomicU64,
    epoch: Instant,
    /// Invalidations Redis did not take yet: retried in the background.
    pending: Mutex<HashMap<Uuid, Lsn, Hasher>>,
    /// Whether `pending` has anything: reads skip its lock while it does not.
    any_pending: std::sync::atomic::AtomicBool,
    /// Whether this process hears invalidations now. Until it does (at
    /// start, after a lost subscription) L1 is neither read nor filled.
    listening: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Cache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache").finish_non_exhaustive()
    }
}

impl Cache {
    /// Builds the cache and starts its invalidation listener and retrier.
    pub fn start(settings: CacheSettings, kv: Kv, redis_url: &str) -> Result<Self, KvError> {
        let client = redis::Client::open(redis_url).map_err(|e| KvError::Config(e.to_string()))?;
        let l1 = moka::future::Cache::builder()
            .max_capacity(settings.l1_max_bytes)
            .weigher(|key: &String, entry: &Arc<Entry>| {
                let size = key.len() + entry.body.as_ref().map_or(0, bytes::Bytes::len) + 96;
                u32::try_from(size).unwrap_or(u32::MAX)
            })
            .time_to_live(Duration::from_millis(settings.l1_ttl_ms))
            .build_with_hasher(Hasher::default());
        let cache = Cache {
            inner: Arc::new(Inner {
                settings,
                kv,
                l1,
                clock: AtomicU64::new(1),
                invalidated: Mutex::new(HashMap::default()),
                breaker_until_ms: AtomicU64::new(0),
                epoch: Instant::now(),
                pending: Mutex::new(HashMap::default()),
                any_pending: std::sync::atomic::AtomicBool::new(false),
                listening: std::sync::atomic::AtomicBool::new(false),
            }),
        };
        tokio::spawn(listen(client, Arc::downgrade(&cache.inner)));
        tokio::spawn(retry_pending(Arc::downgrade(&cache.inner)));
        Ok(cache)
    }

    fn stamp(&self) -> u64 {
        self.inner.clock.fetch_add(1, Ordering::Relaxed)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.inner.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn l2_open(&self) -> bool {
        self.now_ms() < self.inner.breaker_until_ms.load(Ordering::Relaxed)
    }

    fn trip(&self, error: &KvError) {
        let until = self.now_ms() + self.inner.settings.breaker_ms;
        if self.inner.breaker_until_ms.swap(until, Ordering::Relaxed) < self.now_ms() {
            tracing::warn!(error = %error, "redis cache unavailable; reading Postgres directly");
        }
        metrics::counter!("turnpike_cache_redis_errors_total").increment(1);
    }

    /// Whether `entry` may still be served from L1.
    fn valid(&self, conversation: Uuid, entry: &Entry, session: Option<Lsn>) -> bool {
        let invalidated = self
            .inner
            .invalidated
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&conversation)
            .map(|(stamp, _)| *stamp);
        // Stamp 0: read through while Redis failed, never served again.
        entry.stamp != 0
            && invalidated.is_none_or(|at| entry.stamp > at)
            && session.is_none_or(|s| entry.as_of >= s)
    }

    /// The cached answer for `lookup`, loading it with `load(floor)` on a
    /// miss. `load` must read at least at `floor` (a replica that has
    /// replayed it) and answer `None` for "does not exist".
    pub async fn get<E, F, Fut>(&self, lookup: Lookup<'_>, load: F) -> Result<Arc<Entry>, Arc<E>>
    where
        E: std::error::Error + Send + Sync + 'static,
        F: FnOnce(Lsn) -> Fut + Send,
        Fut: Future<Output = Result<Option<bytes::Bytes>, E>> + Send,
    {
        let unsettled = self.inner.any_pending.load(Ordering::Acquire)
            && self
                .inner
                .pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(&lookup.conversation);
        // Bypassed while Redis fails, and for a conversation whose
        // invalidation Redis has not taken yet (L2 may hold its old answers).
        // Every path but an L1 hit is boxed where it starts: a future is as
        // large as its largest state, and axum copies each handler's future
        // whole into a box, so the loads' states (moka's fill, the lease,
        // the caller's query) would otherwise be copied on every hit.
        if !self.inner.settings.enabled || unsettled || self.l2_open() {
            // Bypassed: nothing can be invalidated reliably right now.
            count(Outcome::Bypass);
            return Box::pin(self.read_through(load)).await;
        }
        if !self.inner.listening.load(Ordering::Acquire) {
            // Another process's invalidation could not reach L1: L2 only.
            return Box::pin(self.load_shared(lookup.conversation, lookup.field, load))
                .await
                .map_err(Arc::new);
        }
        // Not `format!`: its machinery costs a hit more than the copying.
        let mut key = String::with_capacity(33 + lookup.field.len());
        key.push_str(
            lookup
                .conversation
                .simple()
                .encode_lower(&mut Uuid::encode_buffer()),
        );
        key.push(':');
        key.push_str(lookup.field);
        let stale = match self.inner.l1.get(&key).await {
            Some(entry) if self.valid(lookup.conversation, &entry, lookup.session) => {
                count(Outcome::L1Hit);
                return Ok(entry);
            }
            found => found.is_some(),
        };
        Box::pin(self.fill_l1(
            key,
            stale,
            lookup.conversation,
            lookup.field.to_owned(),
            load,
        ))
        .await
    }

    /// A read past the cache, never served to anyone else.
    async fn read_through<E, F, Fut>(&self, load: F) -> Result<Arc<Entry>, Arc<E>>
    where
        F: FnOnce(Lsn) -> Fut,
        Fut: Future<Output = Result<Option<bytes::Bytes>, E>>,
    {
        let stamp = self.stamp();
        let body = load(Lsn(0)).await.map_err(Arc::new)?;
        Ok(Arc::new(Entry {
            as_of: Lsn(0),
            body,
            stamp,
        }))
    }

    /// An L1 miss (or an entry no longer valid, `stale`): one load per key
    /// in this process, shared by its concurrent readers.
    async fn fill_l1<E, F, Fut>(
        &self,
        key: String,
        stale: bool,
        conversation: Uuid,
        field: String,
        load: F,
    ) -> Result<Arc<Entry>, Arc<E>>
    where
        E: std::error::Error + Send + Sync + 'static,
        F: FnOnce(Lsn) -> Fut + Send,
        Fut: Future<Output = Result<Option<bytes::Bytes>, E>> + Send,
    {
        if stale {
            self.inner.l1.invalidate(&key).await;
        }
        let this = self.clone();
        self.inner
            .l1
            .try_get_with(key, async move {
                this.load_shared(conversation, &field, load).await
            })
            .await
    }

    /// One process's load of a key: L2, else the lease and Postgres.
    async fn load_shared<E, F, Fut>(
        &self,
        conversation: Uuid,
        field: &str,
        load: F,
    ) -> Result<Arc<Entry>, E>
    where
        F: FnOnce(Lsn) -> Fut,
        Fut: Future<Output = Result<Option<bytes::Bytes>, E>>,
    {
        let stamp = self.stamp();
        let token = Uuid::now_v7().simple().to_string();
        let [data, leases, floor_key] = keys(conversation);
        let lease_ms = self.inner.settings.lease_ms;
        let looked = self
            .inner
            .kv
            .run(|mut conn| {
                let (data, leases, floor_key, field, token) = (
                    data.clone(),
                    leases.clone(),
                    floor_key.clone(),
                    field.to_owned(),
                    token.clone(),
                );
                async move {
                    LOOKUP_SCRIPT
                        .key(data)
                        .key(leases)
                        .key(floor_key)
                        .arg(field)
                        .arg(token)
                        .arg(lease_ms)
                        .invoke_async::<redis::Value>(&mut conn)
                        .await
                }
            })
            .await;
        let looked = match looked {
            Ok(value) => parse_lookup(value),
            Err(e) => {
                self.trip(&e);
                None
            }
        };
        let Some(looked) = looked else {
            // Redis failed: read through, and keep the answer out of L1.
            let body = load(Lsn(0)).await?;
            return Ok(Arc::new(Entry {
                as_of: Lsn(0),
                body,
                stamp: 0,
            }));
        };
        match looked {
            Looked::Hit(raw) => {
                if let Some(entry) = Entry::decode(&raw, stamp) {
                    count(Outcome::L2Hit);
                    return Ok(Arc::new(entry));
                }
                let body = load(Lsn(0)).await?;
                Ok(Arc::new(Entry {
                    as_of: Lsn(0),
                    body,
                    stamp,
                }))
            }
            Looked::Lease(floor) => {
                count(Outcome::Miss);
                let body = load(floor).await?;
                let entry = Entry {
                    as_of: floor,
                    body,
                    stamp,
                };
                self.fill(conversation, field, &token, &entry).await;
                Ok(Arc::new(entry))
            }
            Looked::Held(floor) => {
                metrics::counter!("turnpike_cache_lease_waits_total").increment(1);
                let deadline =
                    Instant::now() + Duration::from_millis(self.inner.settings.lease_wait_ms);
                let mut pause = Duration::from_millis(2);
                while Instant::now() < deadline {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(20));
                    let field = field.to_owned();
                    let data = data.clone();
                    let raw: Result<Option<Vec<u8>>, KvError> = self
                        .inner
                        .kv
                        .run(|mut conn| async move {
                            redis::cmd("HGET")
                                .arg(data)
                                .arg(field)
                                .query_async(&mut conn)
                                .await
                        })
                        .await;
                    match raw {
                        Ok(Some(raw)) => {
                            if let Some(entry) = Entry::decode(&raw, stamp) {
                                count(Outcome::LeaseHit);
                                return Ok(Arc::new(entry));
                            }
                        }
                        Ok(None) => {}
                        Err(e) => {
                            self.trip(&e);
                            break;
                        }
                    }
                }
                // The holder is slow or gone: read through, without filling.
                count(Outcome::LeaseTimeout);
                let body = load(floor).await?;
                Ok(Arc::new(Entry {
                    as_of: floor,
                    body,
                    stamp,
                }))
            }
        }
    }

    async fn fill(&self, conversation: Uuid, field: &str, token: &str, entry: &Entry) {
        let [data, leases, _] = keys(conversation);
        let ttl = if entry.body.is_some() {
            self.inner.settings.l2_ttl_ms
        } else {
            self.inner.settings.negative_ttl_ms
        };
        let value = entry.encode();
        let (field, token) = (field.to_owned(), token.to_owned());
        let filled = self
            .inner
            .kv
            .run(|mut conn| async move {
                FILL_SCRIPT
                    .key(data)
                    .key(leases)
                    .arg(field)
                    .arg(token)
                    .arg(value)
                    .arg(ttl)
                    .invoke_async::<i64>(&mut conn)
                    .await
            })
            .await;
        match filled {
            Ok(0) => {
                // An invalidation came first: our rows may predate it.
                metrics::counter!("turnpike_cache_stale_sets_refused_total").increment(1);
            }
            Ok(_) => {}
            Err(e) => self.trip(&e),
        }
    }

    /// After a committed write to `conversation` at `lsn`: drops this
    /// process's L1 entries at once, and L2's and every other process's
    /// through Redis (retried in the background if Redis is away).
    pub async fn invalidate(&self, conversation: Uuid, lsn: Lsn) {
        self.forget_local(conversation);
        if invalidate(
            &self.inner.kv,
            conversation,
            lsn,
            self.inner.settings.floor_ttl_ms,
        )
        .await
        .is_err()
        {
            let mut pending = self.inner.pending.lock().unwrap_or_else(|p| p.into_inner());
            let entry = pending.entry(conversation).or_insert(lsn);
            *entry = (*entry).max(lsn);
            self.inner.any_pending.store(true, Ordering::Release);
        }
    }

    fn forget_local(&self, conversation: Uuid) {
        let stamp = self.stamp();
        let mut invalidated = self
            .inner
            .invalidated
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        invalidated.insert(conversation, (stamp, Instant::now()));
        let ttl = Duration::from_millis(self.inner.settings.l1_ttl_ms);
        if invalidated.len() > 1024 {
            invalidated.retain(|_, (_, at)| at.elapsed() <= ttl);
        }
    }
}

/// Invalidates a conversation's L2 entries and broadcasts the change, for
/// processes without an L1 (workers). Errors when Redis did not take it.
pub async fn invalidate(
    kv: &Kv,
    conversation: Uuid,
    lsn: Lsn,
    floor_ttl_ms: u64,
) -> Result<(), KvError> {
    let [data, leases, floor] = keys(conversation);
    let result = kv
        .run(|mut conn| async move {
            INVALIDATE_SCRIPT
                .key(data)
                .key(leases)
                .key(floor)
                .arg(lsn.0)
                .arg(floor_ttl_ms)
                .arg(CHANNEL)
                .arg(conversation.simple().to_string())
                .invoke_async::<i64>(&mut conn)
                .await
        })
        .await;
    if let Err(e) = &result {
        tracing::warn!(error = %e, %conversation, "cache invalidation did not reach redis");
        metrics::counter!("turnpike_cache_invalidation_failures_total").increment(1);
    }
    result.map(|_| ())
}

enum Looked {
    Hit(Vec<u8>),
    Lease(Lsn),
    Held(Lsn),
}

fn parse_lookup(value: redis::Value) -> Option<Looked> {
    let redis::Value::Array(parts) = value else {
        return None;
    };
    let int = |v: &redis::Value| match v {
        redis::Value::Int(n) => Some(*n),
        redis::Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
        _ => None,
    };
    let lsn = |v: &redis::Value| -> Option<Lsn> {
        let n = int(v)?;
        Some(Lsn(u64::try_from(n).unwrap_or(0)))
    };
    match int(parts.first()?)? {
        1 => match parts.get(1)? {
            redis::Value::BulkString(raw) => Some(Looked::Hit(raw.clone())),
            _ => None,
        },
        2 => Some(Looked::Lease(lsn(parts.get(2)?)?)),
        3 => Some(Looked::Held(lsn(parts.get(1)?)?)),
        _ => None,
    }
}

/// Applies other processes' invalidations to this process's L1. While the
/// subscription is down L1 cannot be trusted: it is cleared on reconnect.
async fn listen(client: redis::Client, cache: std::sync::Weak<Inner>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if cache.strong_count() == 0 {
            return;
        }
        match client.get_async_pubsub().await {
            Ok(mut pubsub) => {
                if pubsub.subscribe(CHANNEL).await.is_ok() {
                    backoff = Duration::from_millis(100);
                    if let Some(inner) = cache.upgrade() {
                        inner.l1.invalidate_all();
                        inner.listening.store(true, Ordering::Release);
                    }
                    let mut messages = pubsub.on_message();
                    while let Some(message) = messages.next().await {
                        let Some(inner) = cache.upgrade() else { return };
                        let Ok(conversation) = Uuid::try_parse_ascii(message.get_payload_bytes())
                        else {
                            continue;
                        };
                        Cache { inner }.forget_local(conversation);
                    }
                    tracing::warn!("cache invalidation subscription lost; reconnecting");
                }
            }
            Err(e) => tracing::debug!(error = %e, "cache invalidation subscribe failed"),
        }
        if let Some(inner) = cache.upgrade() {
            // Invalidations may be missed until we are back.
            inner.listening.store(false, Ordering::Release);
            inner.l1.invalidate_all();
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Retries invalidations Redis missed, until it takes them.
async fn retry_pending(cache: std::sync::Weak<Inner>) {
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let Some(inner) = cache.upgrade() else { return };
        let pending: Vec<(Uuid, Lsn)> = inner
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(c, l)| (*c, *l))
            .collect();
        for (conversation, lsn) in pending {
            if invalidate(&inner.kv, conversation, lsn, inner.settings.floor_ttl_ms)
                .await
                .is_ok()
            {
                let mut pending = inner.pending.lock().unwrap_or_else(|p| p.into_inner());
                // A later write's invalidation may have been queued meanwhile.
                if pending.get(&conversation) == Some(&lsn) {
                    pending.remove(&conversation);
                }
                if pending.is_empty() {
                    inner.any_pending.store(false, Ordering::Release);
                }
            } else {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn entries_round_trip_through_their_l2_form() {
        let entry = Entry {
            as_of: Lsn(42),
            body: Some(bytes::Bytes::from_static(b"{\"a\":1}")),
            stamp: 7,
        };
        let back = Entry::decode(&entry.encode(), 9).unwrap();
        assert_eq!(back.as_of, Lsn(42));
        assert_eq!(back.body.as_deref(), Some(&b"{\"a\":1}"[..]));
        let missing = Entry {
            as_of: Lsn(3),
            body: None,
            stamp: 0,
        };
        let back = Entry::decode(&missing.encode(), 0).unwrap();
        assert!(back.body.is_none());
        assert!(Entry::decode(b"garbage", 0).is_none());
    }
}
