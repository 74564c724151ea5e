//! The turn queue: a Redis Stream (`worker.queue`, default `tp:turns`) read by the `workers`
//! consumer group. An entry names the response and the commit position of
//! its input, so the worker can read the history from a replica that has
//! replayed it. Delivery is at least once; workers acknowledge after the
//! turn's outcome is persisted.

use uuid::Uuid;

use crate::db::Lsn;
use crate::kv::{Kv, KvError};

/// The pub/sub channel cancellations are announced on; the payload is the
/// response's public id. Every worker listens.
pub const CANCEL_CHANNEL: &str = "tp:cancel";

/// Tells whichever worker runs the turn to stop it.
pub async fn announce_cancel(kv: &Kv, response: &str) -> Result<(), KvError> {
    let response = response.to_owned();
    kv.run(|mut conn| async move {
        redis::cmd("PUBLISH")
            .arg(CANCEL_CHANNEL)
            .arg(response)
            .query_async::<i64>(&mut conn)
            .await
    })
    .await
    .map(|_| ())
}

/// The workers' consumer group.
pub const GROUP: &str = "workers";

/// Queues a turn, with the current trace's context (W3C `traceparent`)
/// when traces are on: the worker's spans continue the same trace.
pub async fn enqueue(kv: &Kv, stream: &str, response: &str, lsn: Lsn) -> Result<(), KvError> {
    add(kv, stream, response, lsn, None, false).await
}

/// Where a queued turn's input ends and whose turn it is, as its create
/// stored them: a worker that knows reads the turn's history (and the
/// user's token count) while it starts the turn, instead of after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Input {
    pub conversation: Uuid,
    pub last_seq: i64,
    pub user: Uuid,
}

impl Input {
    fn field(&self) -> String {
        format!(
            "{}/{}/{}",
            self.conversation.simple(),
            self.last_seq,
            self.user.simple()
        )
    }

    fn parse(field: &str) -> Option<Self> {
        let mut parts = field.split('/');
        let input = Self {
            conversation: parts.next()?.parse().ok()?,
            last_seq: parts.next()?.parse().ok()?,
            user: parts.next()?.parse().ok()?,
        };
        parts.next().is_none().then_some(input)
    }
}

/// [`enqueue`] for a turn whose input is in the conversation already (it
/// runs at once), saying where that input ends.
pub async fn enqueue_with_input(
    kv: &Kv,
    stream: &str,
    response: &str,
    lsn: Lsn,
    input: Input,
) -> Result<(), KvError> {
    add(kv, stream, response, lsn, Some(input), false).await
}

/// Queues again a turn that was running when its entry was lost (Redis
/// lost its data): delivered as a redelivery, so the worker takes it over
/// after its last stored step. Every worker's reconciler finds such a turn
/// at about the same moment, and two redeliveries would run it twice at
/// once (each takes over a running turn), their events mixed in one log:
/// the first to mark it queues it, and the others are told `false`.
pub async fn enqueue_redelivery(
    kv: &Kv,
    stream: &str,
    response: &str,
    lsn: Lsn,
) -> Result<bool, KvError> {
    let marker = format!("tp:{{{response}}}:requeued");
    let marked: Option<String> = kv
        .run(|mut conn| {
            let marker = marker.clone();
            async move {
                redis::cmd("SET")
                    .arg(marker)
                    .arg(1)
                    .arg("NX")
                    .arg("PX")
                    .arg(REQUEUE_MARK_MS)
                    .query_async(&mut conn)
                    .await
            }
        })
        .await?;
    if marked.is_none() {
        return Ok(false);
    }
    add(kv, stream, response, lsn, None, true).await?;
    Ok(true)
}

/// How long a redelivery's mark keeps other reconcilers from queueing the
/// same turn again: far longer than the race it closes (a reconciler's
/// read of the queue to its write, a pass of at most a few hundred Redis
/// calls). A turn whose entry is lost again later (its mark gone with
/// Redis's data too) is queued again; one whose queueing failed after it
/// was marked waits out the mark (the mark is kept rather than deleted:
/// an add that timed out may still have been applied, and a second entry
/// would run the turn twice).
const REQUEUE_MARK_MS: u64 = 60_000;

/// The responses the stream holds (waiting or running), or `None` when it
/// holds more than `limit` entries.
pub async fn responses_held(
    kv: &Kv,
    stream: &str,
    limit: usize,
) -> Result<Option<std::collections::HashSet<String>>, KvError> {
    let stream = stream.to_owned();
    let entries: Vec<Entry> = kv
        .run(|mut conn| async move {
            redis::cmd("XRANGE")
                .arg(stream)
                .arg("-")
                .arg("+")
                .arg("COUNT")
                .arg(limit + 1)
                .query_async(&mut conn)
                .await
        })
        .await?;
    if entries.len() > limit {
        return Ok(None);
    }
    Ok(Some(
        entries
            .into_iter()
            .filter_map(|(_, fields)| fields.into_iter().find(|(k, _)| k == "r").map(|(_, v)| v))
            .collect(),
    ))
}

async fn add(
    kv: &Kv,
    stream: &str,
    response: &str,
    lsn: Lsn,
    input: Option<Input>,
    redelivery: bool,
) -> Result<(), KvError> {
    let (stream, response) = (stream.to_owned(), response.to_owned());
    let lsn = lsn.to_string();
    let input = input.as_ref().map(Input::field);
    let trace = crate::telemetry::traceparent();
    kv.run(|mut conn| async move {
        let mut add = redis::cmd("XADD");
        add.arg(stream)
            .arg("*")
            .arg("r")
            .arg(response)
            .arg("l")
            .arg(lsn);
        if let Some(trace) = trace {
            add.arg("t").arg(trace);
        }
        if let Some(input) = input {
            add.arg("i").arg(input);
        }
        if redelivery {
            add.arg("d").arg(2);
        }
        add.query_async::<String>(&mut conn).await
    })
    .await
    .map(|_| ())
}

/// A stream entry as Redis returns it: id and field/value pairs.
type Entry = (String, Vec<(String, String)>);

/// One delivered turn.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The stream entry id, for XACK.
    pub entry: String,
    /// The response's public id (`resp_…`).
    pub response: String,
    /// The commit position of the turn's input.
    pub lsn: Lsn,
    /// How many times this entry has been delivered (1 on first delivery).
    pub deliveries: u64,
    /// The W3C `traceparent` of the trace that queued it, if traced.
    pub trace: Option<String>,
    /// Where its input ends, when the entry says.
    pub input: Option<Input>,
}

/// How much longer than its `BLOCK` a blocking read may take to answer
/// before the connection is taken for lost.
const BLOCK_MARGIN: std::time::Duration = std::time::Duration::from_secs(2);

/// A worker's consumer: a dedicated connection for its blocking reads,
/// whose response timeout outlives the longest block it is used for (a
/// shorter one fails every empty read and reconnects).
pub struct Consumer {
    conn: redis::aio::MultiplexedConnection,
    stream: String,
    name: String,
    /// Where the next `XAUTOCLAIM` scan of the pending entries starts: each
    /// scan looks at a bounded window, so it walks the whole list in turns.
    claim_cursor: String,
}

impl Consumer {
    /// Connects for blocking reads of up to `block_ms` and makes sure the
    /// group exists.
    pub async fn connect(
        redis_url: &str,
        stream: &str,
        name: &str,
        block_ms: u64,
    ) -> Result<Self, KvError> {
        let client = redis::Client::open(redis_url).map_err(|e| KvError::Config(e.to_string()))?;
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(Some(
            std::time::Duration::from_millis(block_ms) + BLOCK_MARGIN,
        ));
        let mut conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        let created: redis::RedisResult<String> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(stream)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        if let Err(e) = created
            && e.code() != Some("BUSYGROUP")
        {
            return Err(e.into());
        }
        Ok(Self {
            conn,
            stream: stream.to_owned(),
            name: name.to_owned(),
            claim_cursor: "0-0".to_owned(),
        })
    }

    /// Waits up to `block_ms` for new turns and claims up to `count` of
    /// them in one round trip. Under load, turns are queued faster than one
    /// read a round trip can claim them: each would wait behind the reads
    /// of all those before it.
    pub async fn next_batch(
        &mut self,
        block_ms: u64,
        count: usize,
    ) -> Result<Vec<Delivery>, KvError> {
        let reply: Option<Vec<(String, Vec<Entry>)>> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(&self.name)
            .arg("COUNT")
            .arg(count.max(1))
            .arg("BLOCK")
            .arg(block_ms)
            .arg("STREAMS")
            .arg(&self.stream)
            .arg(">")
            .query_async(&mut self.conn)
            .await?;
        Ok(reply
            .into_iter()
            .flatten()
            .flat_map(|(_, entries)| entries)
            .filter_map(|(entry, fields)| parse(entry, &fields, 1))
            .collect())
    }

    /// Claims up to `count` turns another consumer has held for longer
    /// than `idle_ms` (a crashed worker's, or turns whose read's reply was
    /// lost). Each call scans the next window of pending entries (Redis
    /// looks at ten per entry asked for), so claims held by running turns
    /// never hide a crashed worker's behind them.
    pub async fn reclaim(&mut self, idle_ms: u64, count: usize) -> Result<Vec<Delivery>, KvError> {
        let reply: (String, Vec<Entry>, Vec<String>) = redis::cmd("XAUTOCLAIM")
            .arg(&self.stream)
            .arg(GROUP)
            .arg(&self.name)
            .arg(idle_ms)
            .arg(&self.claim_cursor)
            .arg("COUNT")
            .arg(count.max(1))
            .query_async(&mut self.conn)
            .await?;
        self.claim_cursor = reply.0;
        if reply.1.is_empty() {
            return Ok(Vec::new());
        }
        // How often each was delivered (this claim counted), in one round trip.
        let mut pipe = redis::pipe();
        for (entry, _) in &reply.1 {
            pipe.cmd("XPENDING")
                .arg(&self.stream)
                .arg(GROUP)
                .arg(entry)
                .arg(entry)
                .arg(1);
        }
        let pending: Vec<Vec<(String, String, u64, u64)>> =
            pipe.query_async(&mut self.conn).await?;
        Ok(reply
            .1
            .into_iter()
            .zip(pending)
            .filter_map(|((entry, fields), pending)| {
                let deliveries = pending.first().map_or(2, |p| p.3);
                parse(entry, &fields, deliveries)
            })
            .collect())
    }
}

/// Keeps a claim fresh so no other worker reclaims a turn still running.
pub async fn heartbeat(kv: &Kv, stream: &str, consumer: &str, entry: &str) -> Result<(), KvError> {
    let (stream, consumer, entry) = (stream.to_owned(), consumer.to_owned(), entry.to_owned());
    kv.run(|mut conn| async move {
        redis::cmd("XCLAIM")
            .arg(stream)
            .arg(GROUP)
            .arg(consumer)
            .arg(0)
            .arg(entry)
            .arg("JUSTID")
            .query_async::<Vec<String>>(&mut conn)
            .await
    })
    .await
    .map(|_| ())
}

/// Acknowledges a finished turn and deletes its entry: the stream holds
/// only turns not yet acknowledged (waiting or running), so it never grows
/// with history and no unacknowledged entry is ever dropped.
pub async fn ack(kv: &Kv, stream: &str, entry: &str) -> Result<(), KvError> {
    let (stream, entry) = (stream.to_owned(), entry.to_owned());
    kv.run(|mut conn| async move {
        redis::pipe()
            .cmd("XACK")
            .arg(&stream)
            .arg(GROUP)
            .arg(&entry)
            .ignore()
            .cmd("XDEL")
            .arg(&stream)
            .arg(&entry)
            .ignore()
            .query_async::<()>(&mut conn)
            .await
    })
    .await
}

fn parse(entry: String, fields: &[(String, String)], deliveries: u64) -> Option<Delivery> {
    let field = |name: &str| {
        fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    Some(Delivery {
        entry,
        response: field("r")?,
        lsn: field("l")?.parse().ok()?,
        // An entry queued again for a turn that was running counts as a
        // redelivery from its first delivery on.
        deliveries: deliveries.max(field("d").and_then(|d| d.parse().ok()).unwrap_or(0)),
        trace: field("t"),
        input: field("i").as_deref().and_then(Input::parse),
    })
}

/// The queue's state, for the metrics: entries not yet acknowledged
/// (waiting or running), those delivered and not yet acknowledged, and how
/// long the oldest of those has been idle.
#[derive(Debug, Clone, Copy, Default)]
pub struct Depth {
    pub length: u64,
    pub pending: u64,
    pub oldest_pending_idle_ms: u64,
}

impl Depth {
    /// Entries waiting to be delivered for the first time (acknowledged
    /// ones are deleted, so the rest of the stream is pending).
    pub fn undelivered(&self) -> u64 {
        self.length.saturating_sub(self.pending)
    }

    /// Sets the queue's gauges (every process reads the same stream;
    /// dashboards take the max).
    pub fn record(&self) {
        metrics::gauge!("turnpike_queue_length").set(self.length as f64);
        metrics::gauge!("turnpike_queue_pending").set(self.pending as f64);
        metrics::gauge!("turnpike_queue_oldest_pending_seconds")
            .set(self.oldest_pending_idle_ms as f64 / 1000.0);
    }
}

/// Reads the queue's depth: one round trip.
pub async fn depth(kv: &Kv, stream: &str) -> Result<Depth, KvError> {
    let stream = stream.to_owned();
    type Summary = (u64, redis::Value, redis::Value, redis::Value);
    type Oldest = Vec<(String, String, u64, u64)>;
    let (length, summary, oldest): (u64, Summary, Oldest) = kv
        .run(|mut conn| async move {
            redis::pipe()
                .cmd("XLEN")
                .arg(&stream)
                .cmd("XPENDING")
                .arg(&stream)
                .arg(GROUP)
                .cmd("XPENDING")
                .arg(&stream)
                .arg(GROUP)
                .arg("-")
                .arg("+")
                .arg(1)
                .query_async(&mut conn)
                .await
        })
        .await?;
    Ok(Depth {
        length,
        pending: summary.0,
        oldest_pending_idle_ms: oldest.first().map_or(0, |entry| entry.2),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entrys_input_reads_back_as_written() {
        let input = Input {
            conversation: Uuid::now_v7(),
            last_seq: 42,
            user: Uuid::now_v7(),
        };
        assert_eq!(Input::parse(&input.field()), Some(input));
        for bad in [
            "",
            "x/1/y",
            "a/b",
            &format!("{}/1", Uuid::nil().simple()),
            &format!("{}/-/{}/x", Uuid::nil(), Uuid::nil()),
        ] {
            assert_eq!(Input::parse(bad), None, "{bad}");
        }
    }
}
