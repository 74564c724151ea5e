//! Rate limits at the HTTP edge, cheapest first: per API key in this
//! process (governor), then per user across every process (a GCRA in Redis:
//! one round trip, shared by the user's concurrent requests in this process,
//! or, when a turn is created, one that also reads the user's token
//! counter), and, inside `POST /v1/responses`' transaction on the primary,
//! the cap on the user's active turns.
//!
//! A refusal is a 429 in the one error shape with `Retry-After` and the
//! `RateLimit-Policy` / `RateLimit` fields of the IETF httpapi draft
//! (`"user";q=20000;w=2` and `"user";r=0;t=1`); admitted requests carry the
//! same fields. Policies are named after what they count: `key`, `user`,
//! `turns`, `tokens`. While Redis is unreachable the Redis-backed limits
//! follow `limits.redis_failure_policy`; the per-key limit holds either way.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant, SystemTime};

use axum::extract::{FromRequestParts, Request};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use tokio::sync::oneshot;
use turnpike_core::auth::Principal;
use turnpike_core::config::{LimitSettings, RedisFailurePolicy};
use turnpike_core::db::DbConn;
use turnpike_core::kv::{Kv, KvError};
use turnpike_core::limits::{self as state, Gcra, RateDecision, UtcDay};
use turnpike_protocol::ErrorType;
use uuid::Uuid;

use crate::AppState;
use crate::error::ApiError;
use crate::extract::{Auth, Authenticated};

/// `RateLimit-Policy`: the quota policies that apply to the request.
pub const POLICY_HEADER: HeaderName = HeaderName::from_static("ratelimit-policy");
/// `RateLimit`: what is left of each policy's quota.
pub const STATE_HEADER: HeaderName = HeaderName::from_static("ratelimit");

/// Rejections by limit: `key`, `user`, `turns`, `tokens`.
const REJECTED_METRIC: &str = "turnpike_rate_limited_total";
/// Requests decided by `redis_failure_policy` because Redis did not answer.
const REDIS_FAILURE_METRIC: &str = "turnpike_rate_limit_redis_failures_total";

/// How long a client refused for too many active turns is told to wait:
/// no one knows when a turn ends, and a second is a polite poll.
const ACTIVE_TURNS_RETRY_S: u64 = 1;

/// The hasher of the per-key and per-user maps: their keys are ids from
/// the database, which no caller can choose, so SipHash's defence against
/// chosen keys would cost every request and buy nothing.
type Hasher = foldhash::fast::RandomState;

type KeyLimiter = RateLimiter<
    Uuid,
    DefaultKeyedStateStore<Uuid, Hasher>,
    DefaultClock,
    StateInformationMiddleware,
>;

/// The limits of one api process.
pub struct Limits {
    settings: LimitSettings,
    kv: Kv,
    key_quota: Option<Gcra>,
    keys: Option<Arc<KeyLimiter>>,
    user_quota: Option<Gcra>,
    /// The per-user rate checks, coalesced per user.
    users: Option<Arc<UserRate>>,
    breaker: Breaker,
    /// `RateLimit-Policy` of an ordinary request, of a turn's creation,
    /// and of an admin route (no per-user limit).
    policy: Option<HeaderValue>,
    policy_creating_turn: Option<HeaderValue>,
    policy_admin: Option<HeaderValue>,
    /// Open event streams per user in this process.
    streams: OpenStreams,
}

type OpenStreams = Arc<std::sync::Mutex<std::collections::HashMap<uuid::Uuid, u32>>>;

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Which Redis-backed checks a request needs.
#[derive(Debug, Clone, Copy)]
struct Needs {
    /// The per-user request rate (not on admin routes: operators must reach
    /// them whatever Redis does).
    user_rate: bool,
    /// The daily token budget (when a turn is created).
    tokens: bool,
}

impl Limits {
    /// Builds the limiters; must run inside the runtime (it starts the task
    /// that forgets idle keys).
    pub fn new(settings: &LimitSettings, kv: Kv, redis_timeout: Duration) -> Self {
        let key_quota = Gcra::new(settings.key_requests_per_s, settings.key_burst);
        let keys = key_quota.and_then(|quota| {
            let limiter =
                Quota::with_period(quota.interval())?.allow_burst(NonZeroU32::new(quota.burst)?);
            let limiter = Arc::new(
                RateLimiter::dashmap_with_clock_and_hasher(
                    limiter,
                    DefaultClock::default(),
                    Hasher::default(),
                )
                .with_middleware::<StateInformationMiddleware>(),
            );
            tokio::spawn(forget_idle_keys(Arc::downgrade(&limiter)));
            Some(limiter)
        });
        let user_quota = Gcra::new(settings.user_requests_per_s, settings.user_burst);
        let mut policies: Vec<String> = [("key", key_quota), ("user", user_quota)]
            .into_iter()
            .filter_map(|(name, quota)| {
                let quota = quota?;
                Some(format!(
                    "\"{name}\";q={};w={}",
                    quota.burst,
                    ceil_s(quota.window())
                ))
            })
            .collect();
        let policy = header_list(&policies);
        let policy_admin = header_list(&policies[..usize::from(key_quota.is_some())]);
        if settings.daily_tokens_per_user > 0 {
            policies.push(format!(
                "\"tokens\";q={};qu=\"tokens\";w=86400",
                settings.daily_tokens_per_user
            ));
        }
        let policy_creating_turn = header_list(&policies);
        let users =
            user_quota.map(|quota| Arc::new(UserRate::new(kv.clone(), quota, redis_timeout)));
        Self {
            settings: settings.clone(),
            kv,
            key_quota,
            keys,
            user_quota,
            users,
            breaker: Breaker::new(Duration::from_millis(settings.redis_breaker_ms)),
            policy,
            policy_creating_turn,
            policy_admin,
            streams: OpenStreams::default(),
        }
    }

    /// Checks one request; on success, the RateLimit fields to answer with.
    async fn check(&self, principal: &Principal, needs: Needs) -> Result<Granted, ApiError> {
        // The `RateLimit` field's items, written into one buffer.
        let mut remaining = FieldList::default();
        if let (Some(keys), Some(quota)) = (&self.keys, self.key_quota) {
            match keys.check_key(&principal.key_id) {
                Ok(snapshot) => remaining.item(
                    "key",
                    snapshot.remaining_burst_capacity(),
                    ceil_s(quota.interval()),
                ),
                Err(refused) => {
                    let wait = refused.wait_time_from(keys.clock().now());
                    return Err(rate_limited("key", quota, wait));
                }
            }
        }
        let user_quota = self.user_quota.filter(|_| needs.user_rate);
        let budget = Some(self.settings.daily_tokens_per_user).filter(|b| *b > 0 && needs.tokens);
        if user_quota.is_some() || budget.is_some() {
            let day = UtcDay::of(SystemTime::now());
            let checked = if self.breaker.is_open() {
                None
            } else {
                let result = match (&self.users, budget) {
                    // The common case, coalesced with the user's concurrent requests.
                    (Some(users), None) => users
                        .check(principal.user_id)
                        .await
                        .map(|rate| (Some(rate), None)),
                    _ => {
                        let date = budget.map(|_| day.date());
                        let user = principal.user_id;
                        // Boxed: the script call's state would otherwise
                        // weigh on every request's future.
                        Box::pin(state::check_user(
                            &self.kv,
                            user,
                            user_quota,
                            1,
                            date.as_deref(),
                        ))
                        .await
                        .map(|c| (c.rate.map(|r| r.decision(0)), c.tokens_today))
                        .map_err(Arc::new)
                    }
                };
                match result {
                    Ok(checked) => Some(checked),
                    Err(e) => {
                        // Once per episode: a storm of failing requests logs one line.
                        if self.breaker.trip() {
                            tracing::warn!(error = %e, policy = ?self.settings.redis_failure_policy,
                                "rate limits: redis unavailable; applying the failure policy");
                        } else {
                            tracing::debug!(error = %e, "rate limits: redis unavailable");
                        }
                        None
                    }
                }
            };
            match checked {
                None => self.redis_failed()?,
                Some((rate, tokens_today)) => {
                    if let (Some(quota), Some(rate)) = (user_quota, rate) {
                        if !rate.allowed {
                            return Err(rate_limited("user", quota, rate.retry_after));
                        }
                        remaining.item("user", rate.remaining, ceil_s(rate.next_unit));
                    }
                    if let (Some(budget), Some(used)) = (budget, tokens_today) {
                        if used >= budget {
                            return Err(tokens_exhausted(budget, day.left()));
                        }
                        remaining.item("tokens", budget - used, day.left().as_secs());
                    }
                }
            }
        }
        let policy = if needs.tokens {
            &self.policy_creating_turn
        } else if needs.user_rate {
            &self.policy
        } else {
            &self.policy_admin
        };
        Ok(Granted {
            policy: policy.clone(),
            state: remaining.into_value(),
        })
    }

    /// Redis did not answer: the configured policy decides.
    fn redis_failed(&self) -> Result<(), ApiError> {
        match self.settings.redis_failure_policy {
            RedisFailurePolicy::FailOpen => {
                metrics::counter!(REDIS_FAILURE_METRIC, "decision" => "fail_open").increment(1);
                Ok(())
            }
            RedisFailurePolicy::FailClosed => {
                metrics::counter!(REDIS_FAILURE_METRIC, "decision" => "fail_closed").increment(1);
                let mut e = ApiError::unavailable(
                    "Rate limits cannot be checked right now, so requests are refused. Retry shortly.",
                    1,
                );
                e.code = Some("rate_limits_unavailable");
                Err(e)
            }
        }
    }
}

/// The layer: authenticates `/v1/` requests (handing the caller on, so
/// handlers do not look the key up again) and applies the limits. Requests
/// that fail authentication pass through untouched: the handler answers
/// them as it would without this layer.
pub async fn around<F, Fut>(app: &AppState, request: Request, next: F) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    let path = request.uri().path();
    if !path.starts_with("/v1/") {
        return next(request).await;
    }
    let needs = Needs {
        user_rate: !path.starts_with("/v1/admin/"),
        tokens: request.method() == Method::POST && path == "/v1/responses",
    };
    let (mut parts, body) = request.into_parts();
    let Ok(Auth(principal)) = Auth::from_request_parts(&mut parts, app).await else {
        return next(Request::from_parts(parts, body)).await;
    };
    parts.extensions.insert(Authenticated(principal));
    match app.limits.check(&principal, needs).await {
        Err(refused) => refused.into_response(),
        Ok(granted) => {
            let mut response = next(Request::from_parts(parts, body)).await;
            let fields = response.headers_mut();
            // Appended: a refusal from inside (too many active turns) keeps its own items.
            if let Some(policy) = granted.policy {
                fields.append(POLICY_HEADER, policy);
            }
            if let Some(state) = granted.state {
                fields.append(STATE_HEADER, state);
            }
            response
        }
    }
}

/// Refuses a new turn when the user already has `active_turns_per_user`
/// queued or running, counted under the user's lock, so concurrent creates
/// cannot overshoot. Runs in the creating transaction on the primary, when
/// the striped count did not show the user clear of the cap
/// ([`check_new_turn`]): far from it the lock would serialize every create
/// of a busy user for nothing (only more than a quarter of the cap racing
/// at once from far below could overshoot).
pub async fn check_active_turns(
    app: &AppState,
    tx: &mut impl DbConn,
    user: Uuid,
) -> Result<(), ApiError> {
    let cap = app.settings.limits.active_turns_per_user;
    if cap == 0 {
        return Ok(());
    }
    state::lock_user_turns(tx, user).await?;
    let active = state::active_turns(tx, user).await?;
    if active < i64::from(cap) {
        return Ok(());
    }
    metrics::counter!(REJECTED_METRIC, "limit" => "turns").increment(1);
    let mut headers = HeaderMap::new();
    if let Ok(policy) =
        HeaderValue::try_from(format!("\"turns\";q={cap};qu=\"concurrent-requests\""))
    {
        headers.insert(POLICY_HEADER, policy);
    }
    headers.insert(STATE_HEADER, HeaderValue::from_static("\"turns\";r=0"));
    Err(too_many(
        format!(
            "You have {cap} responses queued or in progress, the most allowed at once. \
             Wait for one to finish (or cancel one) and retry."
        ),
        "too_many_active_turns",
        ACTIVE_TURNS_RETRY_S,
    )
    .with_headers(headers))
}

/// A new turn's limits, read together in one round trip (the striped
/// counts); a limit the user is not comfortably clear of ([`clear_bounds`])
/// is checked in full: the turns under the user's lock
/// ([`check_active_turns`]), the storage on its own ([`check_storage`]).
pub async fn check_new_turn(
    app: &AppState,
    tx: &mut impl DbConn,
    user: Uuid,
    incoming: usize,
) -> Result<(), ApiError> {
    let (turns_clear, storage_clear) = match clear_bounds(app) {
        Some((active_below, storage_cap)) => {
            let (active, stored) = state::active_turns_and_stored_bytes(tx, user).await?;
            let after = stored.saturating_add(i64::try_from(incoming).unwrap_or(i64::MAX));
            (
                active_below.is_none_or(|below| active < below),
                storage_cap.is_none_or(|cap| after <= cap),
            )
        }
        None => (false, false),
    };
    if !turns_clear {
        check_active_turns(app, tx, user).await?;
    }
    if !storage_clear {
        check_storage(app, tx, user, incoming).await?;
    }
    Ok(())
}

/// The bounds within which a new turn passes both limits at a glance, in
/// [`check_new_turn`] and in `turnpike_create_turn`: fewer queued or running turns
/// than the first, and stored bytes with the turn's at most the second
/// (`None`: that limit is off). `None` when the turn limit is too small to
/// leave headroom, so every new turn is counted under its lock.
pub fn clear_bounds(app: &AppState) -> Option<(Option<i64>, Option<i64>)> {
    let limits = &app.settings.limits;
    let turns = match limits.active_turns_per_user {
        0 => None,
        cap if cap / 4 == 0 => return None,
        cap => Some(i64::from(cap - cap / 4)),
    };
    let storage = match limits.storage_bytes_per_user {
        0 => None,
        cap => Some(i64::try_from(cap).unwrap_or(i64::MAX)),
    };
    Some((turns, storage))
}

/// Refuses to store `incoming` more bytes of items for a user whose stored
/// items would then pass `limits.storage_bytes_per_user`. Primary, in the
/// caller's transaction.
pub async fn check_storage(
    app: &AppState,
    tx: &mut impl turnpike_core::db::DbConn,
    user: uuid::Uuid,
    incoming: usize,
) -> Result<(), ApiError> {
    let cap = app.settings.limits.storage_bytes_per_user;
    if cap == 0 {
        return Ok(());
    }
    let summed: Option<(i64,)> = turnpike_core::db::statement::fetch_optional(
        tx,
        "SELECT coalesce(sum(bytes), 0)::int8 FROM user_stored_bytes WHERE user_id = $1",
        &[turnpike_core::db::statement::Arg::from(user)],
    )
    .await?;
    let stored = summed.map_or(0, |(stored,)| stored);
    let after = u64::try_from(stored).unwrap_or(0) + incoming as u64;
    if after <= cap {
        return Ok(());
    }
    metrics::counter!(REJECTED_METRIC, "limit" => "storage").increment(1);
    Err(ApiError::with_status(
        StatusCode::FORBIDDEN,
        format!(
            "Your conversations hold {stored} bytes of items, and this would bring them past your \
             storage quota of {cap} bytes. Delete conversations or items to make room."
        ),
        "storage_quota_exceeded",
    ))
}

/// One open event stream of a user's, counted against
/// `limits.open_streams_per_user` in this process until dropped.
pub struct StreamSlot {
    open: OpenStreams,
    user: uuid::Uuid,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        metrics::gauge!("turnpike_sse_streams_open").decrement(1.0);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = open.get_mut(&self.user) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.user);
            }
        }
    }
}

/// Takes one of the user's open-stream slots in this process, or answers
/// 429 `too_many_streams` when all are held.
pub fn open_stream(app: &AppState, user: uuid::Uuid) -> Result<StreamSlot, ApiError> {
    let cap = app.settings.limits.open_streams_per_user;
    let open = app.limits.streams.clone();
    {
        let mut counts = open.lock().unwrap_or_else(|p| p.into_inner());
        let count = counts.entry(user).or_insert(0);
        if cap > 0 && *count >= cap {
            drop(counts);
            metrics::counter!(REJECTED_METRIC, "limit" => "streams").increment(1);
            return Err(too_many(
                format!(
                    "You have {cap} event streams open on this server, the most allowed at once. \
                     Close one and retry."
                ),
                "too_many_streams",
                1,
            ));
        }
        *count += 1;
    }
    metrics::gauge!("turnpike_sse_streams_open").increment(1.0);
    Ok(StreamSlot { open, user })
}

/// 429 for a spent request rate (`limit` is `key` or `user`).
fn rate_limited(limit: &'static str, quota: Gcra, wait: Duration) -> ApiError {
    metrics::counter!(REJECTED_METRIC, "limit" => limit).increment(1);
    let retry_after = ceil_s(wait).max(1);
    let whom = if limit == "key" {
        "this API key"
    } else {
        "your account"
    };
    let mut headers = HeaderMap::new();
    if let Ok(policy) = HeaderValue::try_from(format!(
        "\"{limit}\";q={};w={}",
        quota.burst,
        ceil_s(quota.window())
    )) {
        headers.insert(POLICY_HEADER, policy);
    }
    if let Ok(state) = HeaderValue::try_from(format!("\"{limit}\";r=0;t={retry_after}")) {
        headers.insert(STATE_HEADER, state);
    }
    too_many(
        format!(
            "Rate limit reached for {whom}: {} requests per second (bursts of {}). \
             Retry after {retry_after} s.",
            quota.per_s, quota.burst
        ),
        "rate_limited",
        retry_after,
    )
    .with_headers(headers)
}

/// 429 for a spent daily token budget; it comes back at midnight UTC.
fn tokens_exhausted(budget: u64, left: Duration) -> ApiError {
    metrics::counter!(REJECTED_METRIC, "limit" => "tokens").increment(1);
    let mut headers = HeaderMap::new();
    if let Ok(policy) =
        HeaderValue::try_from(format!("\"tokens\";q={budget};qu=\"tokens\";w=86400"))
    {
        headers.insert(POLICY_HEADER, policy);
    }
    if let Ok(state) = HeaderValue::try_from(format!("\"tokens\";r=0;t={}", left.as_secs())) {
        headers.insert(STATE_HEADER, state);
    }
    too_many(
        format!("Your daily budget of {budget} tokens is spent; it is renewed at midnight UTC."),
        "token_budget_exhausted",
        left.as_secs().max(1),
    )
    .with_headers(headers)
}

fn too_many(message: String, code: &'static str, retry_after_s: u64) -> ApiError {
    let mut e = ApiError::with_status(StatusCode::TOO_MANY_REQUESTS, message, code);
    e.kind = ErrorType::RateLimitError;
    e.retry_after = Some(retry_after_s);
    e
}

/// A Structured Fields list of the items, or `None` for none.
fn header_list(items: &[String]) -> Option<HeaderValue> {
    let mut list = FieldList::default();
    for item in items {
        list.raw(item);
    }
    list.into_value()
}

/// The RateLimit fields of a request that passed.
struct Granted {
    policy: Option<HeaderValue>,
    state: Option<HeaderValue>,
}

/// A Structured Fields list written into one buffer as its items are known
/// (a cached read's own work is a few microseconds; a string per item and
/// a map of headers were a measurable part of it).
#[derive(Default)]
struct FieldList(String);

impl FieldList {
    /// An item as given.
    fn raw(&mut self, item: &str) {
        if self.0.is_empty() {
            self.0.reserve(48);
        } else {
            self.0.push_str(", ");
        }
        self.0.push_str(item);
    }

    /// `"name";r=remaining;t=reset` (numbers written without `fmt`, which
    /// cost a cached read more than the rest of the field).
    fn item(&mut self, name: &str, remaining: impl itoa::Integer, reset: u64) {
        self.raw("\"");
        self.0.push_str(name);
        self.0.push_str("\";r=");
        self.0.push_str(itoa::Buffer::new().format(remaining));
        self.0.push_str(";t=");
        self.0.push_str(itoa::Buffer::new().format(reset));
    }

    fn into_value(self) -> Option<HeaderValue> {
        if self.0.is_empty() {
            return None;
        }
        HeaderValue::try_from(self.0).ok()
    }
}

/// Whole seconds, rounded up (the fields carry no fractions).
fn ceil_s(duration: Duration) -> u64 {
    let secs = duration.as_secs();
    if duration.subsec_nanos() > 0 {
        secs + 1
    } else {
        secs
    }
}

/// What one round of a user's coalesced rate checks tells each request.
type RoundResult = Result<RateDecision, Arc<KvError>>;

/// Quota a round takes from Redis ahead of the requests that will follow:
/// as many as the process admitted for the user since its last round went
/// out, per this long (so never more than that many, and at most this much
/// of the sustained rate and a quarter of the burst). Unused, it expires
/// after the same time. The fleet-wide limit is never exceeded (the quota
/// was taken in Redis), and what a process takes and lets expire follows
/// what the user does there: a user busy on one process at a tenth of the
/// quota leaves the rest to the others, and a user whose requests stop
/// leaves at most one window's worth unused.
const PREFETCH: Duration = Duration::from_millis(10);

/// A user's state in this process: quota taken ahead, and how fast the
/// process admits the user's requests.
struct Credit {
    left: u64,
    until: Instant,
    decision: RateDecision,
    /// When the last round went out, and the requests admitted since (that
    /// round's and those that spent its credit).
    since: Instant,
    admitted: u64,
}

impl Credit {
    /// How many requests it still covers at `now`.
    fn available(&self, now: Instant) -> u64 {
        if self.until > now { self.left } else { 0 }
    }

    /// Takes one request's quota, if any is left and still valid.
    fn spend(&mut self, now: Instant) -> Option<RateDecision> {
        if self.available(now) == 0 {
            return None;
        }
        self.left -= 1;
        self.admitted += 1;
        Some(RateDecision {
            remaining: self.decision.remaining + self.left,
            ..self.decision
        })
    }
}

/// Coalesces the concurrent per-user rate checks of this process: while one
/// Redis call for a user is in flight, that user's new requests wait for the
/// next, which checks them all at once (the script admits as many as fit,
/// in arrival order). A busy user costs one round trip per round instead of
/// one per request; a round also takes quota ahead ([`PREFETCH`]), which
/// the next requests spend without asking Redis.
struct UserRate {
    kv: Kv,
    quota: Gcra,
    /// The most a round asks for beyond those waiting.
    prefetch: u64,
    credits: Mutex<HashMap<Uuid, Credit, Hasher>>,
    /// Past this a waiting request counts as a Redis failure (a round takes
    /// at most one Redis timeout, and a request waits for at most two).
    wait_limit: Duration,
    /// Users whose rounds are being driven, with the requests waiting for
    /// the next round.
    waiting: Mutex<HashMap<Uuid, Vec<oneshot::Sender<RoundResult>>, Hasher>>,
}

impl UserRate {
    fn new(kv: Kv, quota: Gcra, redis_timeout: Duration) -> Self {
        let ahead =
            u64::from(quota.per_s) * u64::try_from(PREFETCH.as_micros()).unwrap_or(0) / 1_000_000;
        Self {
            kv,
            quota,
            prefetch: ahead.min(u64::from(quota.burst) / 4),
            credits: Mutex::new(HashMap::default()),
            wait_limit: redis_timeout * 2 + Duration::from_millis(50),
            waiting: Mutex::new(HashMap::default()),
        }
    }

    async fn check(self: &Arc<Self>, user: Uuid) -> RoundResult {
        if let Some(decision) = self
            .credits
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(&user)
            .and_then(|credit| credit.spend(Instant::now()))
        {
            return Ok(decision);
        }
        let (sender, receiver) = oneshot::channel();
        let first = {
            let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
            match waiting.entry(user) {
                Entry::Occupied(mut queued) => {
                    queued.get_mut().push(sender);
                    false
                }
                Entry::Vacant(slot) => {
                    slot.insert(vec![sender]);
                    true
                }
            }
        };
        // Rounds run on their own task: a request that goes away (its client
        // hung up) must not strand the others waiting on its round.
        if first {
            tokio::spawn(Arc::clone(self).drive(user));
        }
        // Boxed: the timer's state would otherwise weigh on every
        // request's future, most of which spend a credit and never wait.
        match Box::pin(tokio::time::timeout(self.wait_limit, receiver)).await {
            Ok(Ok(result)) => result,
            _ => Err(Arc::new(KvError::Timeout)),
        }
    }

    /// Runs rounds for `user` until no request waits.
    async fn drive(self: Arc<Self>, user: Uuid) {
        loop {
            let mut round = {
                let mut waiting = self.waiting.lock().unwrap_or_else(PoisonError::into_inner);
                match waiting.get_mut(&user) {
                    Some(queued) if !queued.is_empty() => std::mem::take(queued),
                    _ => {
                        waiting.remove(&user);
                        return;
                    }
                }
            };
            // Requests whose callers gave up take no quota.
            round.retain(|sender| !sender.is_closed());
            // Those who queued while the last round was out spend the
            // credit it brought back before another round goes.
            let prefetch = {
                let now = Instant::now();
                let mut credits = self.credits.lock().unwrap_or_else(PoisonError::into_inner);
                let mut previous = None;
                if let Some(credit) = credits.get_mut(&user) {
                    let covered = usize::try_from(credit.available(now))
                        .map_or(round.len(), |left| left.min(round.len()));
                    for sender in round.drain(..covered) {
                        if let Some(decision) = credit.spend(now) {
                            let _ = sender.send(Ok(decision));
                        }
                    }
                    previous = Some((credit.admitted, now.saturating_duration_since(credit.since)));
                }
                if round.is_empty() {
                    continue;
                }
                prefetch_after(self.prefetch, previous)
            };
            let waiting = u64::try_from(round.len()).unwrap_or(u64::MAX);
            let cost = waiting.saturating_add(prefetch);
            let sent = Instant::now();
            match state::check_user(&self.kv, user, Some(self.quota), cost, None).await {
                Ok(checked) => {
                    let mut credits = self.credits.lock().unwrap_or_else(PoisonError::into_inner);
                    let now = Instant::now();
                    if credits.len() > 10_000 {
                        // Idle users' expired credits.
                        credits.retain(|_, c| c.until > now);
                    }
                    match checked.rate {
                        Some(rate) => {
                            credits.insert(
                                user,
                                Credit {
                                    left: rate.admitted.saturating_sub(waiting),
                                    until: now + PREFETCH,
                                    decision: rate.decision(rate.admitted.saturating_sub(1)),
                                    since: sent,
                                    admitted: rate.admitted.min(waiting),
                                },
                            );
                        }
                        None => {
                            credits.remove(&user);
                        }
                    }
                    drop(credits);
                    for (index, sender) in (0..).zip(round) {
                        let decision = checked.rate.map_or(
                            RateDecision {
                                allowed: true,
                                remaining: 0,
                                retry_after: Duration::ZERO,
                                next_unit: Duration::ZERO,
                            },
                            |rate| rate.decision(index),
                        );
                        let _ = sender.send(Ok(decision));
                    }
                }
                Err(e) => {
                    let e = Arc::new(e);
                    for sender in round {
                        let _ = sender.send(Err(Arc::clone(&e)));
                    }
                }
            }
        }
    }
}

/// How much a round takes ahead: the requests admitted since the last
/// round went out (`admitted` over `over`), as a rate over [`PREFETCH`],
/// counting a window shorter than that as that long (so never more than
/// were admitted: a burst's end leaves little unused). None without a last
/// round; at most `cap`.
fn prefetch_after(cap: u64, previous: Option<(u64, Duration)>) -> u64 {
    let Some((admitted, over)) = previous else {
        return 0;
    };
    let window = u64::try_from(PREFETCH.as_micros()).unwrap_or(u64::MAX);
    let over = u64::try_from(over.as_micros())
        .unwrap_or(u64::MAX)
        .max(window);
    (admitted.saturating_mul(window) / over).min(cap)
}

/// Keeps a dead Redis from costing every request a timeout: after an
/// error, the Redis-backed limits skip Redis (and apply the failure policy)
/// for `redis_breaker_ms`, then try again.
struct Breaker {
    started: Instant,
    period: Duration,
    /// Milliseconds after `started` until which Redis is not asked.
    open_until_ms: AtomicU64,
}

impl Breaker {
    fn new(period: Duration) -> Self {
        Self {
            started: Instant::now(),
            period,
            open_until_ms: AtomicU64::new(0),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn is_open(&self) -> bool {
        self.now_ms() < self.open_until_ms.load(Ordering::Relaxed)
    }

    /// Opens the breaker; true when it was closed (a new episode).
    fn trip(&self) -> bool {
        let now = self.now_ms();
        let until = now.saturating_add(u64::try_from(self.period.as_millis()).unwrap_or(u64::MAX));
        self.open_until_ms.swap(until, Ordering::Relaxed) <= now
    }
}

/// Drops the state of keys idle long enough to have their whole burst
/// back, so the per-key table holds only recently active keys. Ends with
/// the limiter.
async fn forget_idle_keys(limiter: Weak<KeyLimiter>) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    tick.tick().await;
    loop {
        tick.tick().await;
        let Some(limiter) = limiter.upgrade() else {
            return;
        };
        limiter.retain_recent();
        limiter.shrink_to_fit();
    }
}

/// Documents, on every `/v1/` operation of the OpenAPI document, the 429
/// any of them may answer and the fields it carries.
pub struct RateLimitedResponses;

impl utoipa::Modify for RateLimitedResponses {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        use utoipa::openapi::{Content, HeaderBuilder, Ref, ResponseBuilder};
        let header = |kind: Type, description: &str| {
            HeaderBuilder::new()
                .schema(ObjectBuilder::new().schema_type(kind))
                .description(Some(description))
                .build()
        };
        let refused = ResponseBuilder::new()
            .description(
                "A rate limit refused the request; `code` says which: `rate_limited` \
                 (per key or per user), `too_many_active_turns`, `token_budget_exhausted`.",
            )
            .header("Retry-After", header(Type::Integer, "Seconds to wait."))
            .header(
                "RateLimit-Policy",
                header(
                    Type::String,
                    "The policy that refused, e.g. `\"user\";q=20000;w=2`.",
                ),
            )
            .header(
                "RateLimit",
                header(Type::String, "What is left of it, e.g. `\"user\";r=0;t=1`."),
            )
            .content(
                "application/json",
                Content::new(Some(Ref::from_schema_name("ErrorBody"))),
            )
            .build();
        for (path, item) in &mut openapi.paths.paths {
            if !path.starts_with("/v1/") {
                continue;
            }
            let operations = [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.patch,
                &mut item.delete,
            ];
            for operation in operations.into_iter().flatten() {
                operation
                    .responses
                    .responses
                    .entry("429".to_owned())
                    .or_insert_with(|| refused.clone().into());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn ratelimit_items_are_structured_field_items() {
        let mut list = FieldList::default();
        assert!(FieldList::default().into_value().is_none());
        list.item("key", 999_u32, 1);
        list.item("user", 0_i64, 60);
        list.raw("\"tokens\";r=5;t=86400");
        assert_eq!(
            list.into_value().unwrap(),
            "\"key\";r=999;t=1, \"user\";r=0;t=60, \"tokens\";r=5;t=86400"
        );
    }

    #[test]
    fn quota_is_taken_ahead_at_the_rate_it_was_spent() {
        let ms = Duration::from_millis;
        // No last round: nothing ahead.
        assert_eq!(prefetch_after(100, None), 0);
        // 5 admitted over the 10 ms a credit lasts: 5 again.
        assert_eq!(prefetch_after(100, Some((5, ms(10)))), 5);
        // A burst: 10 admitted in 2 ms counts as 10 per 10 ms, never more.
        assert_eq!(prefetch_after(100, Some((10, ms(2)))), 10);
        assert_eq!(prefetch_after(4, Some((10, ms(2)))), 4);
        // Fewer than one per 10 ms: nothing ahead (a credit would expire unused).
        assert_eq!(prefetch_after(100, Some((1, ms(12)))), 0);
        assert_eq!(prefetch_after(100, Some((5, ms(1000)))), 0);
        // 30 in 20 ms: 15 per 10 ms.
        assert_eq!(prefetch_after(100, Some((30, ms(20)))), 15);
    }

    #[test]
    fn durations_round_up_to_whole_seconds() {
        assert_eq!(ceil_s(Duration::ZERO), 0);
        assert_eq!(ceil_s(Duration::from_millis(1)), 1);
        assert_eq!(ceil_s(Duration::from_secs(2)), 2);
        assert_eq!(ceil_s(Duration::from_millis(2_001)), 3);
    }

    #[test]
    fn lists_join_items_as_structured_fields() {
        let items = vec!["\"key\";r=1;t=1".to_owned(), "\"user\";r=2;t=1".to_owned()];
        assert_eq!(
            header_list(&items).as_ref().and_then(|v| v.to_str().ok()),
            Some("\"key\";r=1;t=1, \"user\";r=2;t=1")
        );
        assert_eq!(header_list(&[]), None);
    }
}
