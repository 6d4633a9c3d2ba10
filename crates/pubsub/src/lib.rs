//! The cluster backbone: the [`Backbone`] trait every adapter implements, the
//! [`Envelope`] that crosses it, the recent-id set that drops duplicates, and the
//! adapters themselves (`local` for one process, `redis` and `nats` for a cluster).
//!
//! The [`presence`] and [`history`] stores follow the backbone: memory, Redis, NATS.
//!
//! Adapters move opaque bytes on named topics. Everything Chorus-specific (which
//! topic a channel maps to, what to do with a message) lives in the server.

mod adapter;
pub mod dedup;
pub mod envelope;
pub mod history;
pub mod local;
pub mod nats;
pub mod presence;
pub mod redis;
pub mod shards;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::oneshot;

pub use dedup::RecentIds;
pub use envelope::{Envelope, EnvelopeError, Kind, MessageId, MessageIds, now_ms};

/// Why a backbone operation did not happen.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PubsubError {
    #[error("the {0} backbone is disconnected")]
    Disconnected(&'static str),
    #[error("the {0} backbone's outbound queue is full")]
    Backlogged(&'static str),
    #[error("the {0} backbone has stopped")]
    Stopped(&'static str),
    /// The backbone address cannot be used; the text names it (password hidden) and says
    /// what was expected.
    #[error("invalid backbone URL {0}")]
    InvalidUrl(String),
}

/// What an adapter does with each message it receives, still encoded.
///
/// Called on the receive worker that owns the message's topic, with no queue or relay
/// task in between, so it must not block: the server fans the message out to its
/// clients' bounded queues right there. One topic's messages arrive in order on one
/// worker; different topics may arrive on different workers at the same time.
pub trait Deliver: Send + Sync + 'static {
    fn deliver(&self, message: Bytes);
}

impl<F: Fn(Bytes) + Send + Sync + 'static> Deliver for F {
    fn deliver(&self, message: Bytes) {
        self(message);
    }
}

/// How an adapter hands over what it receives: to whom, over how many workers, and
/// how much may wait for a busy worker before it is lost (and counted).
#[derive(Clone)]
pub struct Inbox {
    deliver: Arc<dyn Deliver>,
    buffer: usize,
    workers: usize,
}

impl std::fmt::Debug for Inbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbox")
            .field("buffer", &self.buffer)
            .field("workers", &self.workers)
            .finish_non_exhaustive()
    }
}

impl Inbox {
    /// Messages that may wait for a worker by default.
    pub const DEFAULT_BUFFER: usize = 4096;

    /// Delivers to `deliver`, with [`Inbox::DEFAULT_BUFFER`] and one worker per core (at
    /// most four: a worker only decodes and hands frames to queues).
    pub fn new(deliver: impl Deliver) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        Self {
            deliver: Arc::new(deliver),
            buffer: Self::DEFAULT_BUFFER,
            workers: cores.clamp(1, 4),
        }
    }

    /// Sets how many received messages may wait for a busy worker (at least 1).
    #[must_use]
    pub fn buffer(mut self, buffer: usize) -> Self {
        self.buffer = buffer.max(1);
        self
    }

    /// Sets how many workers share the topics (at least 1).
    #[must_use]
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers.max(1);
        self
    }

    /// Which worker delivers `topic`'s messages (by a hash of the topic, so always the
    /// same one). NATS gives every topic its own task; Redis splits topics by this.
    pub fn worker_for(&self, topic: &str) -> usize {
        adapter::worker_of(topic.as_bytes(), self.workers)
    }

    pub(crate) fn deliver(&self, message: Bytes) {
        self.deliver.deliver(message);
    }

    pub(crate) fn buffer_size(&self) -> usize {
        self.buffer
    }

    pub(crate) fn worker_count(&self) -> usize {
        self.workers
    }
}

/// Resolves to true once the adapter holds a topic on its current connection, so that
/// whatever anyone publishes on it from then on arrives here; false when it cannot
/// say so now (disconnected: the adapter keeps trying by itself).
pub type Held = oneshot::Receiver<bool>;

/// A future the caller awaits without borrowing the adapter.
pub type Pending = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A shared message bus between replicas.
///
/// Every method returns at once: publishing and (un)subscribing enqueue work for the
/// adapter's own task, so a slow or absent backbone never stalls a client. Received
/// messages go to the [`Inbox`] handed to the adapter when it was created, for every
/// subscribed topic, including the ones this replica published itself.
pub trait Backbone: Send + Sync + 'static {
    /// The adapter's name, used in metrics and `/health`.
    fn adapter(&self) -> &'static str;

    /// Whether the adapter currently holds a working connection (every one, when it
    /// spreads topics over several servers).
    fn is_connected(&self) -> bool;

    /// Whether the connection that carries `topic` works: with several servers, one
    /// that is down only stops its own topics.
    fn topic_connected(&self, topic: &str) -> bool {
        let _ = topic;
        self.is_connected()
    }

    /// Whether each server the adapter uses is connected, in configured order (one
    /// entry for an adapter with one server).
    fn shards_connected(&self) -> Vec<bool> {
        vec![self.is_connected()]
    }

    /// Queues `payload` for `topic`.
    fn publish(&self, topic: &str, payload: Bytes) -> Result<(), PubsubError>;

    /// Starts receiving `topic`. Idempotent, and kept across reconnects. The answer
    /// says when the backbone holds it: asking again for a topic already held asks the
    /// backbone again, so after a reconnect it confirms the new connection.
    fn subscribe(&self, topic: &str) -> Result<Held, PubsubError>;

    /// Stops receiving `topic`. Idempotent.
    fn unsubscribe(&self, topic: &str) -> Result<(), PubsubError>;

    /// Counts the adapter's connections: it changes when the adapter reconnected, so a
    /// holder of a confirmation from an older connection knows to ask again.
    fn generation(&self) -> u64 {
        0
    }

    /// [`Backbone::generation`] of the connection that carries `topic`.
    fn topic_generation(&self, topic: &str) -> u64 {
        let _ = topic;
        self.generation()
    }

    /// Resolves once every publication accepted so far has been handed to the
    /// backbone server (or given up on), e.g. before the process exits.
    fn flush(&self) -> Pending {
        Box::pin(std::future::ready(()))
    }

    /// Publications accepted by [`Backbone::publish`] that never reached the
    /// backbone (connection lost meanwhile, refused by the server), since start.
    fn dropped_published(&self) -> u64 {
        0
    }

    /// Messages for this replica lost below the adapter because it read them too
    /// slowly, since start.
    fn dropped_received(&self) -> u64 {
        0
    }
}

/// A URL (or a comma-separated list of them) as it may appear in logs and error
/// messages: any password or token replaced by `***`.
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(redact_one_url)
        .collect::<Vec<_>>()
        .join(",")
}

fn redact_one_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or("", |(user, _)| user);
            if userinfo.contains(':') {
                format!("{scheme}://{user}:***@{host}{tail}")
            } else {
                // A lone userinfo is a token (NATS), as secret as a password.
                format!("{scheme}://***@{host}{tail}")
            }
        }
        None => url.to_owned(),
    }
}

/// Says when a noisy event (a lagging receiver, a slow consumer) should be logged again,
/// so that a storm of them yields one line per interval carrying a count, not one each.
pub(crate) struct Throttle {
    start: std::time::Instant,
    next_ms: std::sync::atomic::AtomicU64,
    pending: std::sync::atomic::AtomicU64,
    every_ms: u64,
}

impl Throttle {
    pub(crate) fn new(every: std::time::Duration) -> Self {
        Self {
            start: std::time::Instant::now(),
            next_ms: std::sync::atomic::AtomicU64::new(0),
            pending: std::sync::atomic::AtomicU64::new(0),
            every_ms: u64::try_from(every.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// Counts `n` occurrences; returns how many happened since the last log line when it
    /// is time for another one.
    pub(crate) fn record(&self, n: u64) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        self.pending.fetch_add(n, Relaxed);
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        let next = self.next_ms.load(Relaxed);
        if now < next {
            return None;
        }
        self.next_ms
            .compare_exchange(next, now.saturating_add(self.every_ms), Relaxed, Relaxed)
            .ok()
            .map(|_| self.pending.swap(0, Relaxed))
    }
}

/// Checks `ready` every `tick` until it holds, for at most `timeout`; returns whether
/// it did. For the `wait_connected` family: the clients announce no state change that
/// could be awaited instead.
pub(crate) async fn poll_until(
    timeout: std::time::Duration,
    tick: std::time::Duration,
    ready: impl Fn() -> bool,
) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while !ready() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(tick).await;
    }
    true
}

/// A [`Held`] that is already decided.
pub fn held(answer: bool) -> Held {
    let (tx, rx) = oneshot::channel();
    let _ = tx.send(answer);
    rx
}

/// Runs `task` until the returned guard is dropped.
pub(crate) fn spawn<F>(task: F) -> AbortOnDrop
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    AbortOnDrop(tokio::spawn(task).abort_handle())
}

/// Aborts a task when dropped, so an adapter's background work ends with the adapter.
pub(crate) struct AbortOnDrop(pub(crate) tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_and_tokens_are_hidden() {
        assert_eq!(redact_url("redis://h:6379/0"), "redis://h:6379/0");
        assert_eq!(redact_url("redis://:pw@h:6379"), "redis://:***@h:6379");
        assert_eq!(redact_url("redis://u:p@ss@h/1"), "redis://u:***@h/1");
        assert_eq!(redact_url("nats://tok@h:4222"), "nats://***@h:4222");
        assert_eq!(redact_url("not a url"), "not a url");
        assert_eq!(
            redact_url("nats://u:a@h1,nats://u:b@h2"),
            "nats://u:***@h1,nats://u:***@h2"
        );
    }

    #[test]
    fn a_storm_is_logged_once_per_interval_with_its_count() {
        let throttle = Throttle::new(std::time::Duration::from_secs(3600));
        assert_eq!(throttle.record(1), Some(1), "the first one is logged");
        assert_eq!(throttle.record(5), None);
        assert_eq!(throttle.record(2), None);
    }
}
