//! Lifecycle events POSTed to `WS_WEBHOOK_URL`: one event per request, signed, in
//! the order they happened, retried with backoff while the receiver fails, from a
//! bounded queue whose overflow is counted, never waited for.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use hmac::{Hmac, Mac};
use hyper::StatusCode;
use prometheus::{IntCounter, IntGauge};
use sha2::Sha256;
use tokio::sync::{Notify, mpsc};

use crate::config::WebhookSettings;
use crate::http_client::HttpClient;

/// First pause after a failed try; doubled per failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// The header that carries the signature.
pub const SIGNATURE_HEADER: &str = "x-chorus-signature";

/// What the sender counts.
#[derive(Clone)]
pub struct WebhookMetrics {
    /// Events the receiver accepted (2xx).
    pub sent: IntCounter,
    /// Tries that failed and were retried.
    pub retries: IntCounter,
    /// Events given up: the queue was full.
    pub dropped_full: IntCounter,
    /// Events given up: the receiver refused them for good (a 4xx other than 408/429).
    pub dropped_refused: IntCounter,
    pub queued: IntGauge,
}

/// `sha256=<lowercase hex HMAC-SHA256 of body>`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    // HMAC takes a key of any length.
    let mut mac = match Hmac::<Sha256>::new_from_slice(secret) {
        Ok(mac) => mac,
        Err(_) => return String::new(),
    };
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 2 * digest.len());
    out.push_str("sha256=");
    for byte in digest {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        out.push(char::from(HEX[usize::from(byte >> 4)]));
        out.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    out
}

/// The sending side: cheap to clone, never blocks.
#[derive(Clone)]
pub struct Webhook {
    queue: mpsc::Sender<Bytes>,
    /// Events queued or being sent.
    pending: Arc<AtomicUsize>,
    idle: Arc<Notify>,
    metrics: WebhookMetrics,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("pending", &self.pending.load(Ordering::Relaxed))
            .finish()
    }
}

impl Webhook {
    /// Starts the sender task.
    pub fn start(settings: &WebhookSettings, client: HttpClient, metrics: WebhookMetrics) -> Self {
        let (queue, events) = mpsc::channel(settings.queue);
        let webhook = Self {
            queue,
            pending: Arc::default(),
            idle: Arc::default(),
            metrics,
        };
        tokio::spawn(deliver(events, settings.clone(), client, webhook.clone()));
        webhook
    }

    /// Queues one event (its JSON body); a full queue drops it and counts the loss.
    pub fn enqueue(&self, body: Bytes) {
        self.pending.fetch_add(1, Ordering::AcqRel);
        if self.queue.try_send(body).is_err() {
            self.done();
            self.metrics.dropped_full.inc();
            tracing::warn!("webhook queue full (WS_WEBHOOK_QUEUE): a lifecycle event was dropped");
            return;
        }
        self.metrics.queued.inc();
    }

    /// Waits, at most `timeout`, until every queued event is sent or given up.
    pub async fn flush(&self, timeout: Duration) {
        let drained = async {
            loop {
                let idle = self.idle.notified();
                if self.pending.load(Ordering::Acquire) == 0 {
                    return;
                }
                idle.await;
            }
        };
        if tokio::time::timeout(timeout, drained).await.is_err() {
            tracing::warn!(
                left = self.pending.load(Ordering::Acquire),
                "webhook events still unsent at exit"
            );
        }
    }

    fn done(&self) {
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.idle.notify_waiters();
        }
    }
}

/// Sends events one at a time, in order: a failing event is retried (with backoff)
/// before any later one goes, so a receiver sees each device connect before it
/// disconnects.
async fn deliver(
    mut events: mpsc::Receiver<Bytes>,
    settings: WebhookSettings,
    client: HttpClient,
    webhook: Webhook,
) {
    let secret = settings.secret.as_bytes();
    while let Some(body) = events.recv().await {
        webhook.metrics.queued.dec();
        let signed = signature(secret, &body);
        let mut backoff = FIRST_BACKOFF;
        loop {
            let headers = [(SIGNATURE_HEADER, signed.clone())];
            match client
                .post_json(&settings.url, &headers, body.clone(), settings.timeout)
                .await
            {
                Ok(status) if status.is_success() => {
                    webhook.metrics.sent.inc();
                    break;
                }
                Ok(status) if refused_for_good(status) => {
                    webhook.metrics.dropped_refused.inc();
                    tracing::warn!(%status, "the webhook receiver refused a lifecycle event; not retried");
                    break;
                }
                Ok(status) => {
                    tracing::debug!(%status, ?backoff, "webhook try failed; retrying");
                }
                Err(why) => {
                    tracing::debug!(%why, ?backoff, "webhook try failed; retrying");
                }
            }
            webhook.metrics.retries.inc();
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
        webhook.done();
    }
}

/// A 4xx says the request itself is wrong: sending it again cannot help. 408 and 429
/// say "later".
fn refused_for_good(status: StatusCode) -> bool {
    status.is_client_error()
        && status != StatusCode::REQUEST_TIMEOUT
        && status != StatusCode::TOO_MANY_REQUESTS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_in_lowercase_hex() {
        // RFC 4231, test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn only_lasting_refusals_stop_retries() {
        assert!(refused_for_good(StatusCode::BAD_REQUEST));
        assert!(refused_for_good(StatusCode::UNAUTHORIZED));
        assert!(!refused_for_good(StatusCode::TOO_MANY_REQUESTS));
        assert!(!refused_for_good(StatusCode::REQUEST_TIMEOUT));
        assert!(!refused_for_good(StatusCode::SERVICE_UNAVAILABLE));
    }
}
