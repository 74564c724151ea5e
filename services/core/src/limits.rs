//! The shared state behind the per-user limits: a GCRA per user in Redis
//! (request rate across every api process), a per-user, per-UTC-day token
//! counter in Redis (fed by the workers from each finished turn's usage),
//! and the exact count of a user's active turns on the primary.
//!
//! A user's Redis keys share the `{user_<uuid>}` hash tag, so the one script
//! that checks the rate and reads the token counter touches a single Redis
//! Cluster slot. The script takes the time from Redis itself: every api
//! process judges against one clock.

use std::sync::LazyLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::Script;
use uuid::Uuid;

use crate::db::DbConn;
use crate::db::statement::{self, Arg};
use crate::kv::{Kv, KvError};

/// GCRA on `KEYS[1]` (the theoretical arrival time, in µs of Redis time)
/// for a batch of requests, plus a read of the token counter `KEYS[2]` when
/// given. ARGV: emission interval (µs), burst (0: no rate limit, only the
/// read), the batch's size. Admits as many of the batch as fit.
/// Returns `{admitted, remaining, retry_after_us, reset_us, tokens}`:
/// `retry_after_us` is for the batch's refused requests, `reset_us` the time
/// until the whole burst is back; `tokens` is -1 without `KEYS[2]`. Refused
/// requests leave no trace.
const CHECK: &str = r"
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local tokens = -1
if KEYS[2] then
  tokens = tonumber(redis.call('GET', KEYS[2]) or '0')
end
if burst == 0 then
  return {cost, 0, 0, 0, tokens}
end
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local admitted = math.floor((now - tat + burst * interval) / interval)
if admitted > cost then admitted = cost end
if admitted < 0 then admitted = 0 end
local new_tat = tat + admitted * interval
if admitted > 0 then
  redis.call('SET', KEYS[1], string.format('%d', new_tat), 'PX', math.ceil((new_tat - now) / 1000))
end
local remaining = math.floor((now - new_tat + burst * interval) / interval)
local retry_after = 0
if admitted < cost then retry_after = new_tat + interval - burst * interval - now end
return {admitted, remaining, retry_after, new_tat - now, tokens}
";

static CHECK_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(CHECK));

/// How long a day's token counter outlives its day: long enough for any
/// clock skew between processes, short enough that counters never pile up.
const TOKEN_COUNTER_TTL: Duration = Duration::from_secs(2 * 86_400);

/// A GCRA quota: `burst` requests at once, refilled at `per_s` a second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gcra {
    pub per_s: u32,
    pub burst: u32,
}

impl Gcra {
    /// The quota, or `None` when the rate is 0 (off). A burst of 0 means 1.
    pub fn new(per_s: u32, burst: u32) -> Option<Self> {
        (per_s > 0).then(|| Self {
            per_s,
            burst: burst.max(1),
        })
    }

    /// Time between two requests at the sustained rate.
    pub fn interval(&self) -> Duration {
        Duration::from_micros(1_000_000 / u64::from(self.per_s)).max(Duration::from_micros(1))
    }

    /// How long an idle user takes to get the whole burst back.
    pub fn window(&self) -> Duration {
        self.interval() * self.burst
    }
}

/// What Redis said about a batch of one user's requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserCheck {
    /// The request-rate decision; `None` when no rate was checked.
    pub rate: Option<RateBatch>,
    /// Tokens the user's turns used today, when asked for.
    pub tokens_today: Option<u64>,
}

/// A GCRA decision on a batch of requests: the first `admitted` pass, in
/// order, the rest are refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateBatch {
    pub admitted: u64,
    /// Requests still allowed at once after the batch.
    pub remaining: u64,
    /// For the refused requests: when the next one would be allowed.
    pub retry_after: Duration,
    /// When the whole burst is back.
    pub reset: Duration,
    /// The quota's emission interval.
    pub interval: Duration,
}

/// The decision on one request of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateDecision {
    pub allowed: bool,
    /// Requests still allowed at once after this one.
    pub remaining: u64,
    /// For a refused request: when the next one would be allowed.
    pub retry_after: Duration,
    /// When the next unit of quota comes back (for a refused request, the
    /// same as `retry_after`).
    pub next_unit: Duration,
}

impl RateBatch {
    /// The decision on the batch's `index`-th request (0-based, in order).
    pub fn decision(&self, index: u64) -> RateDecision {
        if index >= self.admitted {
            return RateDecision {
                allowed: false,
                remaining: 0,
                retry_after: self.retry_after,
                next_unit: self.retry_after,
            };
        }
        let interval = self.interval.as_micros().max(1);
        let next_unit = match self.reset.as_micros() % interval {
            0 => self.interval,
            rest => Duration::from_micros(u64::try_from(rest).unwrap_or(0)),
        };
        RateDecision {
            allowed: true,
            remaining: self.remaining + (self.admitted - 1 - index),
            retry_after: Duration::ZERO,
            next_unit,
        }
    }
}

/// The key holding a user's GCRA state.
pub fn rate_key(user: Uuid) -> String {
    format!("tp:{{user_{}}}:gcra", user.simple())
}

/// The key counting a user's tokens on one UTC day (`day` as `YYYY-MM-DD`).
pub fn tokens_key(user: Uuid, day: &str) -> String {
    format!("tp:{{user_{}}}:tokens:{day}", user.simple())
}

/// One round trip: checks (and counts the admitted of) `cost` requests of
/// the user against `rate`, and reads today's token counter when
/// `tokens_day` is given.
pub async fn check_user(
    kv: &Kv,
    user: Uuid,
    rate: Option<Gcra>,
    cost: u64,
    tokens_day: Option<&str>,
) -> Result<UserCheck, KvError> {
    let mut invocation = CHECK_SCRIPT.key(rate_key(user));
    if let Some(day) = tokens_day {
        invocation.key(tokens_key(user, day));
    }
    let interval = rate.map_or(Duration::from_micros(1), |r| r.interval());
    invocation
        .arg(u64::try_from(interval.as_micros()).unwrap_or(u64::MAX))
        .arg(rate.map_or(0, |r| r.burst))
        .arg(cost.max(1));
    let (admitted, remaining, retry_after_us, reset_us, tokens): (i64, i64, i64, i64, i64) = kv
        .run(|mut conn| async move { invocation.invoke_async(&mut conn).await })
        .await?;
    let micros = |us: i64| Duration::from_micros(u64::try_from(us).unwrap_or(0));
    let count = |n: i64| u64::try_from(n).unwrap_or(0);
    Ok(UserCheck {
        rate: rate.map(|_| RateBatch {
            admitted: count(admitted),
            remaining: count(remaining),
            retry_after: micros(retry_after_us),
            reset: micros(reset_us),
            interval,
        }),
        tokens_today: tokens_day.map(|_| count(tokens)),
    })
}

/// The tokens the user has used today (0 when none are counted).
pub async fn tokens_today(kv: &Kv, user: Uuid, now: SystemTime) -> Result<u64, KvError> {
    let key = tokens_key(user, &UtcDay::of(now).date());
    let used: Option<u64> = kv
        .run(|mut conn| async move { redis::cmd("GET").arg(key).query_async(&mut conn).await })
        .await?;
    Ok(used.unwrap_or(0))
}

/// Adds a finished turn's tokens to its user's counter for today; returns
/// the new total. One round trip; the counter expires two days later.
pub async fn record_tokens(
    kv: &Kv,
    user: Uuid,
    tokens: u64,
    now: SystemTime,
) -> Result<u64, KvError> {
    let key = tokens_key(user, &UtcDay::of(now).date());
    let (total,): (u64,) = kv
        .run(|mut conn| async move {
            redis::pipe()
                .cmd("INCRBY")
                .arg(&key)
                .arg(tokens)
                .cmd("EXPIRE")
                .arg(&key)
                .arg(TOKEN_COUNTER_TTL.as_secs())
                .ignore()
                .query_async(&mut conn)
                .await
        })
        .await?;
    Ok(total)
}

/// A UTC calendar day: what the daily token budget is counted per.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UtcDay {
    /// Days since 1970-01-01.
    days: u64,
    /// Seconds left until the next midnight UTC (1..=86400).
    left_s: u64,
}

impl UtcDay {
    pub fn of(now: SystemTime) -> Self {
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        Self {
            days: secs / 86_400,
            left_s: 86_400 - secs % 86_400,
        }
    }

    /// Time until the day is over (when a spent budget comes back).
    pub fn left(&self) -> Duration {
        Duration::from_secs(self.left_s)
    }

    /// `YYYY-MM-DD`, for the counter's key (readable in `redis-cli`).
    pub fn date(&self) -> String {
        // Howard Hinnant's civil-from-days, for days since the epoch.
        let z = i64::try_from(self.days).unwrap_or(0) + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z.rem_euclid(146_097);
        let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = doy - (153 * mp + 2) / 5 + 1;
        let month = if mp < 10 { mp + 3 } else { mp - 9 };
        let year = yoe + era * 400 + i64::from(month <= 2);
        format!("{year:04}-{month:02}-{day:02}")
    }
}

/// Takes the lock that serializes the creation of one user's turns until
/// the caller's transaction ends, so that counting them and inserting one
/// is exact under concurrency. `FOR NO KEY UPDATE` does not conflict with
/// the `FOR KEY SHARE` locks that inserts referencing the user take.
/// Primary only.
#[tracing::instrument(level = "debug", skip(db))]
pub async fn lock_user_turns(db: &mut impl DbConn, user: Uuid) -> Result<(), sqlx::Error> {
    statement::execute(
        db,
        "SELECT 1 FROM users WHERE id = $1 FOR NO KEY UPDATE",
        &[Arg::from(user)],
    )
    .await?;
    Ok(())
}

/// The user's queued and running turns, as their striped count keeps them.
/// After [`lock_user_turns`] in the same transaction it has every turn of
/// the creates that took that lock: such a create counts its turn in
/// `user_active_turns` at its commit, which it reaches holding the lock,
/// and an end only lowers the count. (Creates far from the cap take no
/// lock, as before; only more than a quarter of the cap racing at once
/// from there could overshoot.) Counting the responses themselves needed
/// an index over every user's active turns, which the planner then chose
/// for questions about one conversation. Primary only.
#[tracing::instrument(level = "debug", skip(db))]
pub async fn active_turns(db: &mut impl DbConn, user: Uuid) -> Result<i64, sqlx::Error> {
    let counted: Option<(i64,)> = statement::fetch_optional(
        db,
        "SELECT coalesce(sum(turns), 0)::int8 FROM user_active_turns WHERE user_id = $1",
        &[Arg::from(user)],
    )
    .await?;
    Ok(counted.map_or(0, |(count,)| count))
}

/// The user's queued and running turns, as their striped count keeps them
/// (as of the statement's snapshot), and the bytes their items hold: a new
/// turn's two limits read in one round trip. Primary only.
#[tracing::instrument(level = "debug", skip(db))]
pub async fn active_turns_and_stored_bytes(
    db: &mut impl DbConn,
    user: Uuid,
) -> Result<(i64, i64), sqlx::Error> {
    let counted: Option<(i64, i64)> = statement::fetch_optional(
        db,
        "SELECT (SELECT coalesce(sum(turns), 0)::int8 FROM user_active_turns WHERE user_id = $1),
                (SELECT coalesce(sum(bytes), 0)::int8 FROM user_stored_bytes WHERE user_id = $1)",
        &[Arg::from(user)],
    )
    .await?;
    Ok(counted.unwrap_or((0, 0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_days_have_their_calendar_date() {
        let at = |secs: u64| UtcDay::of(UNIX_EPOCH + Duration::from_secs(secs));
        assert_eq!(at(0).date(), "1970-01-01");
        assert_eq!(at(0).left(), Duration::from_secs(86_400));
        assert_eq!(at(951_782_400).date(), "2000-02-29");
        assert_eq!(at(1_767_225_599).date(), "2025-12-31");
        assert_eq!(at(1_767_225_599).left(), Duration::from_secs(1));
        assert_eq!(at(1_767_225_600).date(), "2026-01-01");
    }

    #[test]
    fn a_batch_admits_its_first_requests_in_order() {
        let batch = RateBatch {
            admitted: 3,
            remaining: 1,
            retry_after: Duration::from_millis(700),
            reset: Duration::from_millis(2_300),
            interval: Duration::from_millis(500),
        };
        let decisions: Vec<(bool, u64)> = (0..5)
            .map(|i| batch.decision(i))
            .map(|d| (d.allowed, d.remaining))
            .collect();
        assert_eq!(
            decisions,
            [(true, 3), (true, 2), (true, 1), (false, 0), (false, 0)]
        );
        assert_eq!(batch.decision(0).next_unit, Duration::from_millis(300));
        assert_eq!(batch.decision(4).retry_after, Duration::from_millis(700));
    }

    #[test]
    fn a_gcra_refills_its_burst_over_its_window() {
        let quota = Gcra::new(4, 10).unwrap_or(Gcra { per_s: 0, burst: 0 });
        assert_eq!(quota.interval(), Duration::from_millis(250));
        assert_eq!(quota.window(), Duration::from_millis(2_500));
        assert_eq!(Gcra::new(0, 10), None);
        assert_eq!(Gcra::new(1, 0).map(|g| g.burst), Some(1));
    }
}
