//! Cancellation reaching the worker: one pub/sub subscription per worker
//! process to the cancel channel, and a registry of the turns it runs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::Notify;
use turnpike_core::queue::CANCEL_CHANNEL;

/// The turns this process runs, by public response id.
#[derive(Clone, Default)]
pub(crate) struct Registry {
    running: Arc<Mutex<HashMap<String, Arc<Notify>>>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Notify>>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a running turn; the returned handle fires on cancellation.
    pub(crate) fn register(&self, response: &str) -> Arc<Notify> {
        let notify = Arc::new(Notify::new());
        self.lock().insert(response.to_owned(), Arc::clone(&notify));
        notify
    }

    pub(crate) fn forget(&self, response: &str) {
        self.lock().remove(response);
    }

    fn cancel(&self, response: &str) {
        if let Some(notify) = self.lock().get(response) {
            // A stored permit: a turn not yet waiting still sees it.
            notify.notify_one();
        }
    }
}

/// Listens for cancellations until aborted, reconnecting with backoff.
pub(crate) async fn listen(redis_url: String, registry: Registry) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let subscribed = async {
            let client = redis::Client::open(redis_url.as_str())?;
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(CANCEL_CHANNEL).await?;
            Ok::<_, redis::RedisError>(pubsub)
        }
        .await;
        match subscribed {
            Ok(mut pubsub) => {
                backoff = Duration::from_millis(100);
                let mut messages = pubsub.on_message();
                while let Some(message) = messages.next().await {
                    let response =
                        String::from_utf8_lossy(message.get_payload_bytes()).into_owned();
                    registry.cancel(&response);
                }
                tracing::warn!("cancel subscription lost; reconnecting");
            }
            Err(e) => tracing::debug!(error = %e, "cancel subscription failed"),
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}
