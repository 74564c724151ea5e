//! Operator kill switches: throttle or block a route, or every route of a
//! query class, on every api process at runtime.
//!
//! The switches live in one Redis hash (`overload.switches_key`, field =
//! name, value = the [`Switch`] as JSON). A change is written there and
//! announced on `<key>:changed`; each process follows the announcements on
//! a pub/sub connection of its own and re-reads the hash, so a change is in
//! force everywhere within milliseconds, and re-reads it every
//! `overload.switch_refresh_ms` in case an announcement was lost. The
//! request path reads only the in-process snapshot: with Redis unreachable
//! the last known switches stay in force, and the process catches up by
//! itself when Redis returns.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use metrics::Counter;
use turnpike_protocol::{QueryClass, SetSwitch, Switch, SwitchAction};

use crate::config::OverloadSettings;
use crate::kv::{Kv, KvError};

/// Longest switch name.
const MAX_NAME_LEN: usize = 64;
/// Longest `reason`.
const MAX_REASON_LEN: usize = 512;
/// Longest `retry_after_s`.
const MAX_RETRY_AFTER_S: u64 = 3_600;
/// A field of the hash that no switch name can take, bumped on every
/// change: the hash exists from the first change on, so its absence means
/// Redis lost its data (a restart without persistence), not "no switches".
const VERSION_FIELD: &str = "#version";

/// Why a switch could not be read, set or removed.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    /// The switch as given cannot be applied; `param` names the field. Fix
    /// the request (400), do not retry it.
    #[error("{message}")]
    Invalid {
        param: &'static str,
        message: String,
    },
    /// Redis could not be read or written; nothing changed. Retryable (503).
    #[error(transparent)]
    Store(#[from] KvError),
}

impl SwitchError {
    /// Whether the same call may succeed later.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Store(_))
    }

    fn invalid(param: &'static str, message: impl Into<String>) -> Self {
        Self::Invalid {
            param,
            message: message.into(),
        }
    }
}

/// A route pattern was not `METHOD /path`, `/path`, `/prefix*` or `*`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("route pattern {0:?}: expected `METHOD /path/{{param}}`, `/path`, `/prefix*` or `*`")]
pub struct RoutePatternError(pub String);

/// Which requests a switch or a class setting means: a method (or any)
/// and a route template as declared (`/v1/conversations/{conversation_id}`),
/// exactly or as a prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePattern {
    method: Option<String>,
    path: String,
    prefix: bool,
}

impl RoutePattern {
    /// Parses `GET /v1/conversations`, `/v1/conversations` (any method),
    /// `/v1/admin/*` (a prefix) or `*` (everything).
    pub fn parse(text: &str) -> Result<Self, RoutePatternError> {
        let error = || RoutePatternError(text.to_owned());
        let text = text.trim();
        let (method, path) = match text.split_once(' ') {
            Some((method, path)) => {
                if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
                    return Err(error());
                }
                (Some(method.to_owned()), path.trim())
            }
            None => (None, text),
        };
        let (path, prefix) = match path.strip_suffix('*') {
            Some(stem) => (stem, true),
            None => (path, false),
        };
        let well_formed = (path.is_empty() && prefix) || path.starts_with('/');
        if !well_formed || path.contains(char::is_whitespace) || path.contains('*') {
            return Err(error());
        }
        Ok(Self {
            method,
            path: path.to_owned(),
            prefix,
        })
    }

    /// Whether a request to `route` (its template, or its path when no
    /// route matched) with `method` is meant.
    pub fn matches(&self, method: &str, route: &str) -> bool {
        self.method.as_deref().is_none_or(|m| m == method)
            && if self.prefix {
                route.starts_with(&self.path)
            } else {
                route == self.path
            }
    }
}

/// A refused request: which switch refused it, and what to tell the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub switch: String,
    pub action: SwitchAction,
    pub retry_after_s: u64,
}

/// What a switch applies to.
#[derive(Debug)]
enum Target {
    Route(RoutePattern),
    Class(QueryClass),
}

/// A throttle's admission state in this process.
#[derive(Debug)]
enum Throttle {
    /// A token bucket: `rate` per second, bursts of up to `max(rate, 1)`.
    Rate { rate: f64, bucket: Mutex<Bucket> },
    /// Admit `percent` of requests, evenly spread: of every 100 in a row, exactly `percent`.
    Share { percent: u64, seen: AtomicU64 },
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Throttle {
    fn for_switch(switch: &Switch) -> Option<Self> {
        if switch.action != SwitchAction::Throttle {
            return None;
        }
        match (switch.rate_per_s, switch.share_percent) {
            (Some(rate), _) => Some(Self::Rate {
                rate,
                bucket: Mutex::new(Bucket {
                    tokens: rate.max(1.0),
                    at: Instant::now(),
                }),
            }),
            (None, Some(percent)) => Some(Self::Share {
                percent: u64::from(percent.min(100)),
                seen: AtomicU64::new(0),
            }),
            (None, None) => None,
        }
    }

    /// `Ok` to admit one request, or the seconds until one would be.
    fn admit(&self) -> Result<(), u64> {
        match self {
            Self::Rate { rate, bucket } => {
                let mut bucket = bucket.lock().unwrap_or_else(|p| p.into_inner());
                let now = Instant::now();
                let refill = now.duration_since(bucket.at).as_secs_f64() * rate;
                bucket.tokens = (bucket.tokens + refill).min(rate.max(1.0));
                bucket.at = now;
                if bucket.tokens >= 1.0 {
                    bucket.tokens -= 1.0;
                    Ok(())
                } else {
                    let wait_s = ((1.0 - bucket.tokens) / rate).ceil();
                    // Saturating float-to-int: a NaN or huge wait reads as the cap.
                    Err((wait_s as u64).clamp(1, MAX_RETRY_AFTER_S))
                }
            }
            Self::Share { percent, seen } => {
                let n = seen.fetch_add(1, Ordering::Relaxed);
                if (n + 1) * percent / 100 > n * percent / 100 {
                    Ok(())
                } else {
                    Err(1)
                }
            }
        }
    }
}

/// One switch in force in this process.
#[derive(Debug)]
struct Active {
    switch: Switch,
    /// The stored JSON: an unchanged switch keeps its throttle state across re-reads.
    stored: String,
    target: Target,
    throttle: Option<Throttle>,
    rejections: Counter,
}

impl Active {
    fn new(switch: Switch, stored: String) -> Result<Self, SwitchError> {
        let target = match (&switch.route, switch.class) {
            (Some(route), None) => Target::Route(
                RoutePattern::parse(route)
                    .map_err(|e| SwitchError::invalid("route", e.to_string()))?,
            ),
            (None, Some(class)) => Target::Class(class),
            _ => {
                return Err(SwitchError::invalid(
                    "route",
                    "a switch names exactly one of route and class.",
                ));
            }
        };
        let action = match switch.action {
            SwitchAction::Block => "block",
            SwitchAction::Throttle => "throttle",
        };
        let rejections = metrics::counter!("turnpike_switch_rejections_total",
            "switch" => switch.name.clone(), "action" => action);
        Ok(Self {
            throttle: Throttle::for_switch(&switch),
            switch,
            stored,
            target,
            rejections,
        })
    }

    fn applies(&self, method: &str, route: &str, class: QueryClass) -> bool {
        match &self.target {
            Target::Route(pattern) => pattern.matches(method, route),
            Target::Class(target) => *target == class,
        }
    }
}

/// The switches, as this process applies them. Cheap to clone.
#[derive(Clone)]
pub struct Switches {
    inner: Arc<Inner>,
}

struct Inner {
    kv: Kv,
    key: String,
    active: RwLock<Arc<[Arc<Active>]>>,
    /// Whether any switch is in force: the request path's only cost otherwise.
    any: AtomicBool,
    /// Whether the last re-read reached Redis (for logging transitions only).
    reachable: AtomicBool,
    /// One re-read at a time, so an older read never replaces a newer one.
    refreshing: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for Switches {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Switches")
            .field("key", &self.inner.key)
            .finish_non_exhaustive()
    }
}

impl Switches {
    /// Reads the switches in `settings.switches_key` once (a process
    /// honours them from its first request; with Redis away it starts with
    /// none), then follows them: the announcement listener (it reconnects
    /// by itself, with backoff) and the periodic re-read. Both stop when the
    /// last clone is dropped.
    pub async fn start(
        kv: Kv,
        redis_url: &str,
        settings: &OverloadSettings,
    ) -> Result<Self, KvError> {
        let client = redis::Client::open(redis_url).map_err(|e| KvError::Config(e.to_string()))?;
        let switches = Self {
            inner: Arc::new(Inner {
                kv,
                key: settings.switches_key.clone(),
                active: RwLock::new(Arc::from(Vec::new())),
                any: AtomicBool::new(false),
                reachable: AtomicBool::new(true),
                refreshing: tokio::sync::Mutex::new(()),
            }),
        };
        if let Err(e) = switches.refresh().await {
            tracing::warn!(error = %e, "cannot read the kill switches at start; following them once Redis answers");
        }
        tokio::spawn(follow(
            client,
            changed_channel(&settings.switches_key),
            Arc::downgrade(&switches.inner),
            Duration::from_millis(settings.switch_refresh_ms.max(1)),
        ));
        Ok(switches)
    }

    /// Whether a request is refused by a switch in force: any matching
    /// block refuses it; otherwise each matching throttle must admit it.
    /// `route` is the request's route template (or path), `class` its
    /// route's query class.
    pub fn check(&self, method: &str, route: &str, class: QueryClass) -> Option<Refusal> {
        if !self.inner.any.load(Ordering::Relaxed) {
            return None;
        }
        let active = Arc::clone(&*self.inner.active.read().unwrap_or_else(|p| p.into_inner()));
        let matching = || active.iter().filter(|a| a.applies(method, route, class));
        let refuse = |active: &Active, retry_after_s: u64| {
            active.rejections.increment(1);
            Some(Refusal {
                switch: active.switch.name.clone(),
                action: active.switch.action,
                retry_after_s,
            })
        };
        if let Some(block) = matching().find(|a| a.switch.action == SwitchAction::Block) {
            return refuse(block, block.switch.retry_after_s);
        }
        for throttle in matching() {
            if let Some(state) = &throttle.throttle
                && let Err(wait_s) = state.admit()
            {
                return refuse(throttle, wait_s.max(throttle.switch.retry_after_s));
            }
        }
        None
    }

    /// The switches this process has in force, by name.
    pub fn in_force(&self) -> Vec<Switch> {
        let active = self.inner.active.read().unwrap_or_else(|p| p.into_inner());
        active.iter().map(|a| a.switch.clone()).collect()
    }

    /// Every stored switch, by name, as Redis has them now.
    pub async fn list(&self) -> Result<Vec<Switch>, SwitchError> {
        let mut switches: Vec<Switch> = self
            .read_stored()
            .await?
            .into_values()
            .filter_map(|raw| parse_stored(&raw))
            .collect();
        switches.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(switches)
    }

    /// One stored switch.
    pub async fn get(&self, name: &str) -> Result<Option<Switch>, SwitchError> {
        let key = self.inner.key.clone();
        let name = name.to_owned();
        let raw: Option<String> = self
            .inner
            .kv
            .run(|mut conn| async move {
                redis::cmd("HGET")
                    .arg(key)
                    .arg(name)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        Ok(raw.as_deref().and_then(parse_stored))
    }

    /// Checks `spec`, stores it as switch `name` (replacing one of that
    /// name), announces the change and applies it in this process at once.
    pub async fn set(&self, name: &str, spec: SetSwitch) -> Result<Switch, SwitchError> {
        check_name(name)?;
        let switch = Switch::new(name.to_owned(), spec, now_ms());
        check_switch(&switch)?;
        let json = serde_json::to_string(&switch)
            .map_err(|e| SwitchError::invalid("name", e.to_string()))?;
        // Parsing what is about to be stored proves every process can apply it.
        Active::new(switch.clone(), json.clone())?;
        let (key, channel, field) = (
            self.inner.key.clone(),
            changed_channel(&self.inner.key),
            name.to_owned(),
        );
        self.inner
            .kv
            .run(|mut conn| async move {
                redis::pipe()
                    .atomic()
                    .hset(&key, &field, json)
                    .ignore()
                    .hincr(&key, VERSION_FIELD, 1)
                    .ignore()
                    .publish(channel, &field)
                    .ignore()
                    .query_async::<()>(&mut conn)
                    .await
            })
            .await?;
        self.refresh().await?;
        tracing::info!(switch = name, ?switch.action, route = ?switch.route, class = ?switch.class, "kill switch set");
        Ok(switch)
    }

    /// Removes switch `name`; false if there was none. Announced and
    /// applied here at once, like [`Switches::set`].
    pub async fn delete(&self, name: &str) -> Result<bool, SwitchError> {
        let (key, channel, field) = (
            self.inner.key.clone(),
            changed_channel(&self.inner.key),
            name.to_owned(),
        );
        let (removed,): (i64,) = self
            .inner
            .kv
            .run(|mut conn| async move {
                redis::pipe()
                    .atomic()
                    .hdel(&key, &field)
                    .hincr(&key, VERSION_FIELD, 1)
                    .ignore()
                    .publish(channel, &field)
                    .ignore()
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        self.refresh().await?;
        if removed > 0 {
            tracing::info!(switch = name, "kill switch removed");
        }
        Ok(removed > 0)
    }

    /// Re-reads the stored switches and puts them in force. On failure the
    /// switches in force stay as they were. A hash that is gone altogether
    /// while switches are in force means Redis lost its data: they are
    /// written back, so a block survives a Redis restart.
    pub async fn refresh(&self) -> Result<(), SwitchError> {
        let _one_at_a_time = self.inner.refreshing.lock().await;
        let mut stored = self.read_stored().await?;
        let current = Arc::clone(&*self.inner.active.read().unwrap_or_else(|p| p.into_inner()));
        if stored.is_empty() && !current.is_empty() {
            tracing::warn!(
                switches = current.len(),
                "the kill switches are gone from Redis (restarted without its data?); restoring those in force"
            );
            self.restore(&current).await?;
            stored = self.read_stored().await?;
        }
        let mut next: Vec<Arc<Active>> = Vec::with_capacity(stored.len());
        for (name, raw) in stored {
            if name == VERSION_FIELD {
                continue;
            }
            if let Some(same) = current
                .iter()
                .find(|a| a.switch.name == name && a.stored == raw)
            {
                next.push(Arc::clone(same));
                continue;
            }
            let Some(switch) = parse_stored(&raw) else {
                tracing::warn!(switch = %name, "a stored kill switch cannot be read; ignored");
                continue;
            };
            match Active::new(switch, raw) {
                Ok(active) => next.push(Arc::new(active)),
                Err(e) => {
                    tracing::warn!(switch = %name, error = %e, "a stored kill switch cannot be applied; ignored");
                }
            }
        }
        next.sort_by(|a, b| a.switch.name.cmp(&b.switch.name));
        let any = !next.is_empty();
        *self.inner.active.write().unwrap_or_else(|p| p.into_inner()) = Arc::from(next);
        self.inner.any.store(any, Ordering::Relaxed);
        Ok(())
    }

    /// Writes `active` back into an emptied hash, without overwriting what
    /// another process restored first, and announces it.
    async fn restore(&self, active: &[Arc<Active>]) -> Result<(), SwitchError> {
        let mut pipe = redis::pipe();
        pipe.atomic();
        for switch in active {
            pipe.hset_nx(&self.inner.key, &switch.switch.name, &switch.stored)
                .ignore();
        }
        pipe.hset_nx(&self.inner.key, VERSION_FIELD, 1)
            .ignore()
            .publish(changed_channel(&self.inner.key), VERSION_FIELD)
            .ignore();
        self.inner
            .kv
            .run(|mut conn| async move { pipe.query_async::<()>(&mut conn).await })
            .await?;
        Ok(())
    }

    async fn read_stored(&self) -> Result<HashMap<String, String>, SwitchError> {
        let key = self.inner.key.clone();
        Ok(self
            .inner
            .kv
            .run(|mut conn| async move {
                redis::cmd("HGETALL")
                    .arg(key)
                    .query_async::<HashMap<String, String>>(&mut conn)
                    .await
            })
            .await?)
    }

    /// [`Switches::refresh`], logging only when Redis stops or starts answering.
    async fn refresh_logged(&self) {
        let result = self.refresh().await;
        let reachable = result.is_ok();
        metrics::counter!("turnpike_switch_refreshes_total",
            "outcome" => if reachable { "ok" } else { "failed" })
        .increment(1);
        if self.inner.reachable.swap(reachable, Ordering::Relaxed) != reachable {
            match result {
                Ok(()) => tracing::info!("kill switches re-read from Redis again"),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot re-read the kill switches; the last known stay in force");
                }
            }
        }
    }
}

/// Follows the change announcements, and re-reads every `period` whatever
/// happens; returns once the switches are dropped.
async fn follow(client: redis::Client, channel: String, switches: Weak<Inner>, period: Duration) {
    let upgrade = || switches.upgrade().map(|inner| Switches { inner });
    let mut backoff = Duration::from_millis(100);
    loop {
        let subscribe = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        match tokio::time::timeout(Duration::from_secs(2), subscribe).await {
            Ok(Ok(pubsub)) => {
                backoff = Duration::from_millis(100);
                let mut messages = pubsub.into_on_message();
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    // The first tick is at once: catch up with what was missed while away.
                    let lost = tokio::select! {
                        message = messages.next() => message.is_none(),
                        _ = tick.tick() => false,
                    };
                    if lost {
                        break;
                    }
                    let Some(current) = upgrade() else { return };
                    current.refresh_logged().await;
                }
                tracing::warn!("kill switch announcements lost; reconnecting");
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "kill switch subscription failed"),
            Err(_elapsed) => tracing::debug!("kill switch subscription timed out"),
        }
        let Some(current) = upgrade() else { return };
        current.refresh_logged().await;
        drop(current);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(period);
    }
}

fn changed_channel(key: &str) -> String {
    format!("{key}:changed")
}

fn parse_stored(raw: &str) -> Option<Switch> {
    serde_json::from_str(raw).ok()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn check_name(name: &str) -> Result<(), SwitchError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(SwitchError::invalid(
            "name",
            format!("A switch name is 1 to {MAX_NAME_LEN} letters, digits, '_', '-' or '.'."),
        ))
    }
}

fn check_switch(switch: &Switch) -> Result<(), SwitchError> {
    match (&switch.route, switch.class) {
        (Some(_), None) | (None, Some(_)) => {}
        _ => {
            return Err(SwitchError::invalid(
                "route",
                "Name exactly one of route and class.",
            ));
        }
    }
    match (switch.action, switch.rate_per_s, switch.share_percent) {
        (SwitchAction::Block, None, None) => {}
        (SwitchAction::Block, _, _) => {
            return Err(SwitchError::invalid(
                "action",
                "A block takes no rate_per_s or share_percent; use action \"throttle\".",
            ));
        }
        (SwitchAction::Throttle, Some(rate), None) => {
            if !(rate.is_finite() && rate > 0.0) {
                return Err(SwitchError::invalid(
                    "rate_per_s",
                    "rate_per_s must be a positive number.",
                ));
            }
        }
        (SwitchAction::Throttle, None, Some(percent)) => {
            if percent > 100 {
                return Err(SwitchError::invalid(
                    "share_percent",
                    "share_percent must be between 0 and 100.",
                ));
            }
        }
        (SwitchAction::Throttle, _, _) => {
            return Err(SwitchError::invalid(
                "rate_per_s",
                "A throttle names exactly one of rate_per_s and share_percent.",
            ));
        }
    }
    if !(1..=MAX_RETRY_AFTER_S).contains(&switch.retry_after_s) {
        return Err(SwitchError::invalid(
            "retry_after_s",
            format!("retry_after_s must be between 1 and {MAX_RETRY_AFTER_S}."),
        ));
    }
    if switch
        .reason
        .as_ref()
        .is_some_and(|r| r.chars().count() > MAX_REASON_LEN)
    {
        return Err(SwitchError::invalid(
            "reason",
            format!("reason may be at most {MAX_REASON_LEN} characters."),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pattern(text: &str) -> RoutePattern {
        RoutePattern::parse(text).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn route_patterns_match_method_and_template() {
        let list = pattern("GET /v1/conversations");
        assert!(list.matches("GET", "/v1/conversations"));
        assert!(!list.matches("POST", "/v1/conversations"));
        assert!(!list.matches("GET", "/v1/conversations/{conversation_id}"));
        let any_method = pattern("/v1/conversations/{conversation_id}");
        assert!(any_method.matches("DELETE", "/v1/conversations/{conversation_id}"));
        let prefix = pattern("/v1/admin/*");
        assert!(prefix.matches("PUT", "/v1/admin/switches/{name}"));
        assert!(!prefix.matches("GET", "/v1/responses"));
        assert!(pattern("*").matches("GET", "/anything"));
        assert!(pattern("POST *").matches("POST", "/v1/responses"));
        for bad in ["", "get /v1", "GET", "GET v1", "/v1/*/x", "GET  /a b"] {
            assert!(RoutePattern::parse(bad).is_err(), "{bad:?}");
        }
    }

    fn switch(spec: SetSwitch) -> Switch {
        Switch::new("s".into(), spec, 0)
    }

    fn throttle_share(percent: u8) -> SetSwitch {
        SetSwitch {
            route: Some("*".into()),
            class: None,
            action: SwitchAction::Throttle,
            rate_per_s: None,
            share_percent: Some(percent),
            retry_after_s: None,
            reason: None,
        }
    }

    #[test]
    fn a_share_throttle_admits_exactly_its_share() {
        let throttle = Throttle::for_switch(&switch(throttle_share(25)));
        let admitted = (0..100)
            .filter(|_| throttle.as_ref().is_some_and(|t| t.admit().is_ok()))
            .count();
        assert_eq!(admitted, 25);
        let none = Throttle::for_switch(&switch(throttle_share(0)));
        assert!(none.is_some_and(|t| (0..10).all(|_| t.admit() == Err(1))));
    }

    #[test]
    fn a_rate_throttle_admits_a_burst_then_says_when_to_retry() {
        let spec = SetSwitch {
            rate_per_s: Some(2.0),
            share_percent: None,
            ..throttle_share(0)
        };
        let throttle = Throttle::for_switch(&switch(spec));
        let results: Vec<Result<(), u64>> = (0..3)
            .filter_map(|_| throttle.as_ref().map(Throttle::admit))
            .collect();
        assert_eq!(results, [Ok(()), Ok(()), Err(1)]);
    }

    #[test]
    fn switches_are_checked_before_they_are_stored() {
        let block = SetSwitch {
            action: SwitchAction::Block,
            share_percent: None,
            ..throttle_share(0)
        };
        assert!(check_switch(&switch(block.clone())).is_ok());
        let both = SetSwitch {
            class: Some(QueryClass::Background),
            ..block.clone()
        };
        assert!(matches!(
            check_switch(&switch(both)),
            Err(SwitchError::Invalid { param: "route", .. })
        ));
        let block_with_rate = SetSwitch {
            rate_per_s: Some(1.0),
            ..block.clone()
        };
        assert!(check_switch(&switch(block_with_rate)).is_err());
        let throttle_without_limit = SetSwitch {
            share_percent: None,
            ..throttle_share(0)
        };
        assert!(check_switch(&switch(throttle_without_limit)).is_err());
        assert!(check_switch(&switch(throttle_share(101))).is_err());
        assert!(check_name("reads.off-1").is_ok());
        assert!(check_name("no spaces").is_err());
        assert!(check_name("").is_err());
    }
}
