//! Turn events: a per-response log in a Redis Stream (for replay and
//! resume) and live fan-out through Redis pub/sub.
//!
//! Each api process holds ONE pub/sub connection ([`Hub`]) and subscribes to
//! a response's channel only while a local client streams it; events reach
//! local subscribers through an in-process broadcast. Keys share the
//! response's hash tag, so a Redis Cluster keeps them on one slot.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use redis::Script;
use std::sync::LazyLock;
use tokio::sync::broadcast;

use crate::kv::{Kv, KvError};

/// Live events buffered per response and process: a receiver further
/// behind gets `Lagged` and re-reads the log. Every idle stream holds one
/// such buffer (about 48 bytes a slot). A worker appends (and publishes)
/// at most this many events at once, so one append's burst fits.
pub const LIVE_BUFFER: usize = 32;

/// The stream holding a response's events, field `d` = the event's JSON.
fn log_key(response: &str) -> String {
    format!("tp:{{{response}}}:events")
}

/// The pub/sub channel a response's live events are published on.
fn channel(response: &str) -> String {
    format!("tp:{{{response}}}:live")
}

/// Appends an event. Returns false when an event with this sequence number
/// was already logged (a redelivered turn repeating itself), in which case
/// nothing is published.
pub async fn append(
    kv: &Kv,
    response: &str,
    sequence_number: u64,
    json: &str,
    retention: Duration,
) -> Result<bool, KvError> {
    append_all(kv, response, sequence_number, &[json.to_owned()], retention)
        .await
        .map(|added| added == 1)
}

/// Appends events with their sequence numbers as entry ids (`<seq+1>-0`),
/// publishing each one added (an id already logged fails its XADD and is
/// skipped), and keeps the log for the retention.
const APPEND_ALL: &str = r"
local added = 0
for i = 3, #ARGV, 2 do
  local ok = pcall(redis.call, 'XADD', KEYS[1], ARGV[i], 'd', ARGV[i + 1])
  if ok then
    redis.call('PUBLISH', ARGV[2], ARGV[i + 1])
    added = added + 1
  end
end
if added > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return added
";
/// Hashed once: `Script::new` computes the SHA-1 each `EVALSHA` sends.
static APPEND_ALL_SCRIPT: LazyLock<Script> = LazyLock::new(|| Script::new(APPEND_ALL));

/// Appends `events` with consecutive sequence numbers from `first` in one
/// round trip, in order, publishing each; an event whose sequence number
/// was already logged is skipped, not published. Returns how many were
/// added. A model streams its deltas in bursts, and one script call per
/// burst costs Redis and the worker a fraction of one per event.
pub async fn append_all(
    kv: &Kv,
    response: &str,
    first: u64,
    events: &[String],
    retention: Duration,
) -> Result<u64, KvError> {
    if events.is_empty() {
        return Ok(0);
    }
    let key = log_key(response);
    let retention_ms = u64::try_from(retention.as_millis()).unwrap_or(u64::MAX);
    let channel = channel(response);
    kv.run(|mut conn| async move {
        let script = &*APPEND_ALL_SCRIPT;
        let mut invocation = script.key(key);
        invocation.arg(retention_ms).arg(channel);
        for (seq, json) in (first..).zip(events) {
            invocation.arg(format!("{}-0", seq + 1)).arg(json);
        }
        invocation.invoke_async::<u64>(&mut conn).await
    })
    .await
}

/// Logged events with a sequence number above `after` (all, for `None`), in order.
pub async fn read_after(
    kv: &Kv,
    response: &str,
    after: Option<u64>,
) -> Result<Vec<(u64, String)>, KvError> {
    let key = log_key(response);
    let start = after.map_or_else(|| "-".to_owned(), |a| format!("{}-0", a + 2));
    let entries: Vec<(String, Vec<(String, String)>)> = kv
        .run(|mut conn| async move {
            redis::cmd("XRANGE")
                .arg(key)
                .arg(start)
                .arg("+")
                .query_async(&mut conn)
                .await
        })
        .await?;
    Ok(entries
        .into_iter()
        .filter_map(|(id, fields)| {
            let seq = id.split_once('-')?.0.parse::<u64>().ok()?.checked_sub(1)?;
            let data = fields.into_iter().find(|(k, _)| k == "d")?.1;
            Some((seq, data))
        })
        .collect())
}

/// The last logged event of a response: its sequence number and JSON.
pub async fn last_event(kv: &Kv, response: &str) -> Result<Option<(u64, String)>, KvError> {
    let key = log_key(response);
    let entries: Vec<(String, Vec<(String, String)>)> = kv
        .run(|mut conn| async move {
            redis::cmd("XREVRANGE")
                .arg(key)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query_async(&mut conn)
                .await
        })
        .await?;
    Ok(entries.into_iter().next().and_then(|(id, fields)| {
        let seq = id.split_once('-')?.0.parse::<u64>().ok()?.checked_sub(1)?;
        let data = fields.into_iter().find(|(k, _)| k == "d")?.1;
        Some((seq, data))
    }))
}

/// The highest logged sequence number of a response, if any.
pub async fn last_sequence(kv: &Kv, response: &str) -> Result<Option<u64>, KvError> {
    Ok(last_event(kv, response).await?.map(|(seq, _)| seq))
}

/// What a subscriber receives: an event's JSON, or word that events may
/// have been missed (the pub/sub connection dropped, or the subscriber fell
/// behind) and the log must be read again.
#[derive(Debug, Clone)]
pub enum Live {
    Event(Arc<str>),
    Resync,
}

/// The process's shared pub/sub connection and its local subscribers.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

struct HubInner {
    /// The connection's command side, cloned out for each (un)subscribe so
    /// that no lock is held across a Redis round trip.
    sink: Mutex<Option<redis::aio::PubSubSink>>,
    channels: Mutex<HashMap<String, broadcast::Sender<Live>>>,
}

/// How long a (un)subscribe may wait for Redis; a stream whose subscribe
/// did not go through polls the log instead.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(1);

impl HubInner {
    fn sink(&self) -> Option<redis::aio::PubSubSink> {
        self.sink.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_sink(&self, sink: Option<redis::aio::PubSubSink>) {
        *self.sink.lock().unwrap_or_else(|p| p.into_inner()) = sink;
    }
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").finish_non_exhaustive()
    }
}

/// A local subscription to one response's live events; unsubscribes when
/// the last local subscriber of that response is dropped.
pub struct Subscription {
    pub receiver: broadcast::Receiver<Live>,
    channel: String,
    hub: Hub,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let last = {
            let mut channels = self.hub.lock_channels();
            match channels.get(&self.channel) {
                // This receiver still counts until it is dropped after us.
                Some(sender) if sender.receiver_count() <= 1 => {
                    channels.remove(&self.channel);
                    true
                }
                _ => false,
            }
        };
        if last {
            let hub = self.hub.clone();
            let channel = std::mem::take(&mut self.channel);
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                runtime.spawn(async move {
                    if let Some(mut sink) = hub.inner.sink() {
                        let _ = tokio::time::timeout(SUBSCRIBE_TIMEOUT, sink.unsubscribe(&channel))
                            .await;
                    }
                });
            }
        }
    }
}

impl Hub {
    /// Starts the connection task (it reconnects by itself, with backoff).
    pub fn start(redis_url: &str) -> Result<Self, KvError> {
        let client = redis::Client::open(redis_url).map_err(|e| KvError::Config(e.to_string()))?;
        let hub = Hub {
            inner: Arc::new(HubInner {
                sink: Mutex::new(None),
                channels: Mutex::new(HashMap::new()),
            }),
        };
        tokio::spawn(run_connection(client, Arc::downgrade(&hub.inner)));
        Ok(hub)
    }

    fn lock_channels(&self) -> std::sync::MutexGuard<'_, HashMap<String, broadcast::Sender<Live>>> {
        self.inner
            .channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Subscribes to a response's live events. Subscribe first, then read
    /// the log: an event published in between arrives twice and is
    /// de-duplicated by sequence number, never lost.
    pub async fn subscribe(&self, response: &str) -> Subscription {
        let channel = channel(response);
        let (receiver, first) = {
            let mut channels = self.lock_channels();
            match channels.get(&channel) {
                Some(sender) => (sender.subscribe(), false),
                None => {
                    // Small: a receiver that falls behind gets `Lagged` and
                    // re-reads the log, so this only smooths bursts.
                    let (sender, receiver) = broadcast::channel(LIVE_BUFFER);
                    channels.insert(channel.clone(), sender);
                    (receiver, true)
                }
            }
        };
        if first && let Some(mut sink) = self.inner.sink() {
            match tokio::time::timeout(SUBSCRIBE_TIMEOUT, sink.subscribe(&channel)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "pub/sub subscribe failed; the stream will poll the log");
                }
                Err(_) => {
                    tracing::warn!("pub/sub subscribe timed out; the stream will poll the log");
                }
            }
        }
        Subscription {
            receiver,
            channel,
            hub: self.clone(),
        }
    }
}

async fn run_connection(client: redis::Client, hub: std::sync::Weak<HubInner>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(inner) = hub.upgrade() else { return };
        match client.get_async_pubsub().await {
            Ok(pubsub) => {
                backoff = Duration::from_millis(100);
                let (mut sink, mut stream) = pubsub.split();
                let channels: Vec<String> = inner
                    .channels
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .keys()
                    .cloned()
                    .collect();
                for channel in &channels {
                    let _ = sink.subscribe(channel).await;
                }
                inner.set_sink(Some(sink));
                // Anything published while we were away is only in the logs.
                broadcast_all(&inner, Live::Resync);
                drop(inner);
                while let Some(message) = stream.next().await {
                    let Some(inner) = hub.upgrade() else { return };
                    let name = message.get_channel_name().to_owned();
                    let payload: Arc<str> =
                        String::from_utf8_lossy(message.get_payload_bytes()).into();
                    let channels = inner.channels.lock().unwrap_or_else(|p| p.into_inner());
                    if let Some(sender) = channels.get(&name) {
                        let _ = sender.send(Live::Event(payload));
                    }
                }
                tracing::warn!("pub/sub connection lost; reconnecting");
                if let Some(inner) = hub.upgrade() {
                    inner.set_sink(None);
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "pub/sub connect failed");
                drop(inner);
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

fn broadcast_all(inner: &HubInner, live: Live) {
    let channels = inner.channels.lock().unwrap_or_else(|p| p.into_inner());
    for sender in channels.values() {
        let _ = sender.send(live.clone());
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::expect_used)]
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A server that answers Redis's connection set-up with `+OK` and then
    /// never answers a (un)subscribe: a Redis that hangs.
    async fn hanging_redis() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("redis://{}", listener.local_addr().expect("address"));
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buffer = vec![0u8; 4096];
                    while let Ok(n) = socket.read(&mut buffer).await {
                        if n == 0 {
                            return;
                        }
                        let text = String::from_utf8_lossy(&buffer[..n]).to_ascii_uppercase();
                        let commands = text.lines().filter(|l| l.starts_with('*')).count();
                        if !text.contains("SUBSCRIBE") {
                            let _ = socket.write_all(&b"+OK\r\n".repeat(commands)).await;
                        }
                    }
                });
            }
        });
        url
    }

    #[tokio::test]
    async fn subscribes_to_a_hanging_redis_neither_hang_nor_queue_behind_each_other() {
        let hub = Hub::start(&hanging_redis().await).expect("hub");
        // Wait for the connection.
        for _ in 0..100 {
            if hub.inner.sink().is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(hub.inner.sink().is_some(), "connected to the fake Redis");
        let started = std::time::Instant::now();
        let names: Vec<String> = (0..8).map(|i| format!("resp_{i}")).collect();
        let subscriptions =
            futures_util::future::join_all(names.iter().map(|name| hub.subscribe(name))).await;
        // Each waited its own timeout, at the same time as the others.
        let took = started.elapsed();
        assert!(took >= SUBSCRIBE_TIMEOUT, "{took:?}");
        assert!(took < SUBSCRIBE_TIMEOUT * 3, "{took:?}");
        assert_eq!(subscriptions.len(), 8);
    }
}
