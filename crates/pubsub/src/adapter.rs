//! The machinery the Redis and NATS adapters share: the command queues their own tasks
//! read (publications in order, flush markers, (un)subscriptions), the loss counters,
//! and the split of received topics over receive workers.
//!
//! Each adapter keeps only what its client library makes different: how a batch of
//! publications is written, how a subscription is confirmed, and how it reads.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use crate::{Held, Pending, PubsubError, Throttle};

/// Publications waiting for an adapter's publisher task; more are refused as `Backlogged`.
const PUBLISH_QUEUE: usize = 8192;
/// (Un)subscriptions waiting for an adapter's subscription task.
const SUBSCRIPTION_QUEUE: usize = 4096;
/// How often a repeated warning (lag, lost publications) is logged at most.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// What the subscription task is asked to do, in order.
pub(crate) enum SubscriptionOp {
    /// Subscribe, and say on the sender once the backbone holds it.
    Subscribe(String, oneshot::Sender<bool>),
    Unsubscribe(String),
    /// Many topics in one request, answering nobody (topics moving between servers).
    SubscribeAll(Vec<String>),
    UnsubscribeAll(Vec<String>),
}

/// What the publisher task is asked to do, in order.
pub(crate) enum Outbound {
    Publish(String, Bytes),
    /// Answer once everything queued before has been handed to the backbone.
    Flush(oneshot::Sender<()>),
}

/// The adapter's side of its tasks' queues: every [`crate::Backbone`] call that is not a
/// state query becomes one queued command, so a call never waits for the network.
pub(crate) struct Commands {
    adapter: &'static str,
    publications: mpsc::Sender<Outbound>,
    subscriptions: mpsc::Sender<SubscriptionOp>,
    queued: Queued,
}

/// The tasks' side of [`Commands`].
pub(crate) struct CommandQueues {
    pub(crate) publications: mpsc::Receiver<Outbound>,
    pub(crate) subscriptions: mpsc::Receiver<SubscriptionOp>,
    /// The publisher task tells it what it handed to the client library.
    pub(crate) queued: Queued,
}

/// Publications in the queue that the publisher task has not yet handed to the client
/// library. While there are any, a publication may not skip the queue: it would
/// overtake them.
#[derive(Clone, Default)]
pub(crate) struct Queued(Arc<AtomicUsize>);

impl Queued {
    pub(crate) fn is_empty(&self) -> bool {
        self.0.load(Ordering::Acquire) == 0
    }

    /// `count` publications left the queue (handed over, or lost).
    pub(crate) fn handed_over(&self, count: usize) {
        self.0.fetch_sub(count, Ordering::AcqRel);
    }
}

impl Commands {
    pub(crate) fn new(adapter: &'static str) -> (Self, CommandQueues) {
        let (publications, publication_rx) = mpsc::channel(PUBLISH_QUEUE);
        let (subscriptions, subscription_rx) = mpsc::channel(SUBSCRIPTION_QUEUE);
        let queued = Queued::default();
        (
            Self {
                adapter,
                publications,
                subscriptions,
                queued: queued.clone(),
            },
            CommandQueues {
                publications: publication_rx,
                subscriptions: subscription_rx,
                queued,
            },
        )
    }

    /// Whether no queued publication waits for the publisher task, so that one handed
    /// straight to the client library keeps its topic's order.
    pub(crate) fn nothing_queued(&self) -> bool {
        self.queued.is_empty()
    }

    /// Queues a publication of `payload` on `destination` (the adapter's name for the topic).
    pub(crate) fn publish(&self, destination: String, payload: Bytes) -> Result<(), PubsubError> {
        self.queued.0.fetch_add(1, Ordering::AcqRel);
        enqueue(
            self.adapter,
            &self.publications,
            Outbound::Publish(destination, payload),
        )
        .inspect_err(|_| self.queued.handed_over(1))
    }

    pub(crate) fn subscribe(&self, topic: &str) -> Result<Held, PubsubError> {
        let (held, answer) = oneshot::channel();
        enqueue(
            self.adapter,
            &self.subscriptions,
            SubscriptionOp::Subscribe(topic.to_owned(), held),
        )?;
        Ok(answer)
    }

    pub(crate) fn unsubscribe(&self, topic: &str) -> Result<(), PubsubError> {
        enqueue(
            self.adapter,
            &self.subscriptions,
            SubscriptionOp::Unsubscribe(topic.to_owned()),
        )
    }

    pub(crate) fn subscribe_all(&self, topics: Vec<String>) -> Result<(), PubsubError> {
        enqueue(
            self.adapter,
            &self.subscriptions,
            SubscriptionOp::SubscribeAll(topics),
        )
    }

    pub(crate) fn unsubscribe_all(&self, topics: Vec<String>) -> Result<(), PubsubError> {
        enqueue(
            self.adapter,
            &self.subscriptions,
            SubscriptionOp::UnsubscribeAll(topics),
        )
    }

    /// Resolves once the publisher task handled everything queued before.
    pub(crate) fn flush(&self) -> Pending {
        let (done, flushed) = oneshot::channel();
        let queued = self.publications.clone();
        Box::pin(async move {
            // Waits for room: the queue drains unless the task is gone.
            if queued.send(Outbound::Flush(done)).await.is_ok() {
                let _ = flushed.await;
            }
        })
    }
}

/// Queues `item` for an adapter's own task without waiting: a full queue is
/// [`PubsubError::Backlogged`], a stopped task [`PubsubError::Stopped`].
pub(crate) fn enqueue<T>(
    adapter: &'static str,
    queue: &mpsc::Sender<T>,
    item: T,
) -> Result<(), PubsubError> {
    queue.try_send(item).map_err(|error| match error {
        mpsc::error::TrySendError::Full(_) => PubsubError::Backlogged(adapter),
        mpsc::error::TrySendError::Closed(_) => PubsubError::Stopped(adapter),
    })
}

/// What an adapter had to give up on, counted and logged at most once per interval.
pub(crate) struct Losses {
    adapter: &'static str,
    /// Received messages dropped below or inside the adapter because they were read
    /// too slowly. Shared with a client library's event callback where it reports them.
    pub(crate) received: Arc<AtomicU64>,
    /// Accepted publications that never reached the backbone.
    published: AtomicU64,
    received_log: Throttle,
    published_log: Throttle,
}

impl Losses {
    pub(crate) fn new(adapter: &'static str) -> Self {
        Self {
            adapter,
            received: Arc::default(),
            published: AtomicU64::new(0),
            received_log: Throttle::new(LOG_EVERY),
            published_log: Throttle::new(LOG_EVERY),
        }
    }

    pub(crate) fn lost_publications(&self, count: usize, why: &str) {
        let count = u64::try_from(count).unwrap_or(u64::MAX);
        self.published.fetch_add(count, Ordering::Relaxed);
        if let Some(lost) = self.published_log.record(count) {
            tracing::warn!(adapter = self.adapter, lost, why, "publications lost");
        }
    }

    pub(crate) fn lost_received(&self, count: u64) {
        self.received.fetch_add(count, Ordering::Relaxed);
        if let Some(lost) = self.received_log.record(count) {
            tracing::warn!(
                adapter = self.adapter,
                lost,
                "received messages lost: this replica reads them too slowly"
            );
        }
    }

    pub(crate) fn published(&self) -> u64 {
        self.published.load(Ordering::Relaxed)
    }

    pub(crate) fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

/// Which of `workers` receive workers handles `topic`: always the same one, so one
/// topic's messages stay in order, and topics spread evenly (the shards' stable hash).
pub(crate) fn worker_of(topic: &[u8], workers: usize) -> usize {
    if workers <= 1 {
        return 0;
    }
    // The remainder is below `workers`, so it fits.
    usize::try_from(crate::shards::hash(topic) % workers as u64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_spread_over_workers_and_stay_put() {
        let mut counts = [0usize; 4];
        for index in 0..4000 {
            let topic = format!("chorus.c.room:{index}");
            let worker = worker_of(topic.as_bytes(), 4);
            assert_eq!(worker, worker_of(topic.as_bytes(), 4));
            counts[worker] += 1;
        }
        assert!(
            counts.iter().all(|count| (800..1200).contains(count)),
            "{counts:?}"
        );
        assert_eq!(worker_of(b"anything", 1), 0);
        assert_eq!(worker_of(b"anything", 0), 0);
    }

    #[tokio::test]
    async fn a_full_queue_is_backlogged_and_a_stopped_task_is_stopped() {
        let (commands, mut queues) = Commands::new("test");
        for index in 0..PUBLISH_QUEUE {
            commands
                .publish(format!("t{index}"), Bytes::new())
                .expect("room");
        }
        assert_eq!(
            commands.publish("t".into(), Bytes::new()),
            Err(PubsubError::Backlogged("test"))
        );
        queues.subscriptions.close();
        assert!(matches!(
            commands.subscribe("t"),
            Err(PubsubError::Stopped("test"))
        ));
        let flushed = commands.flush();
        drop(queues);
        // The task is gone: the flush ends instead of waiting forever.
        flushed.await;
    }
}
