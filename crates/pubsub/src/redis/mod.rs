//! The Redis backbone: topics are Redis pub/sub channels, reached with `fred` over two
//! connections that reconnect forever, one that PUBLISHes and one that SUBSCRIBEs.
//!
//! Redis channel names are binary safe, so topics are used as they are.
//!
//! With a `redis-cluster://` URL the same adapter talks to a Redis Cluster with sharded
//! pub/sub: SPUBLISH, and SSUBSCRIBE/SUNSUBSCRIBE grouped by hash slot, each sent (and
//! confirmed by a PING routed by the same slot) on the connection to the slot's node.
//! Several `redis://` servers are shards of one [`ShardedBackbone`] ([`connect_shards`]).
//!
//! Work is done by the adapter's own tasks, fed by bounded queues:
//! - the publisher task sends queued publications as one pipeline per batch, and waits
//!   for a batch before sending the next, so one topic's messages leave in order; a
//!   flush request in the queue is answered once everything before it was sent;
//! - the subscription task applies (un)subscriptions in the order they were asked for,
//!   many per command, keeps the set of topics the adapter should hold, subscribes to
//!   all of it again after every (re)connection, and confirms each subscription once
//!   Redis has answered a PING sent right behind its SUBSCRIBE;
//! - the receiver task hands every message to the `incoming` channel, waiting when it is
//!   full;
//! - a heartbeat task per connection pings it, so that a peer that vanished without
//!   closing the socket is noticed (fred's unresponsive check then reconnects).
//!
//! The client settings, the connection and heartbeat tasks and the address check are
//! shared with the Redis stores, in `link`.
//!
//! fred's `SubscriberClient::manage_subscriptions` is deliberately not used: it only
//! re-subscribes channels whose SUBSCRIBE succeeded, so a topic subscribed while the
//! backbone was down would be forgotten, and its resubscription races with an
//! UNSUBSCRIBE issued around a reconnect. The subscription task owns that state instead.

use std::collections::BTreeSet;
use std::mem;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use fred::clients::SubscriberClient;
use fred::prelude::{ClientLike, Config, EventInterface, PubsubInterface, Value};
use fred::types::{Message, RespVersion};
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::shards::ShardedBackbone;
use crate::{AbortOnDrop, Backbone, Held, Incoming, Pending, PubsubError, Throttle, redact_url};

pub(crate) mod link;

use link::{NAME, builder, heartbeat, is_cluster, keep_connected, parse_config, spawn};
pub use link::{shard_urls, validate_url};

/// Publications waiting for the publisher task; more are refused as `Backlogged`.
const PUBLISH_QUEUE: usize = 8192;
/// (Un)subscriptions waiting for the subscription task.
const SUBSCRIPTION_QUEUE: usize = 4096;
/// Most publications sent in one pipeline.
const MAX_BATCH: usize = 256;
/// Most channels named in one SUBSCRIBE or UNSUBSCRIBE.
const MAX_CHANNELS_PER_COMMAND: usize = 512;
/// Messages fred buffers between the subscriber socket and the receiver task. fred
/// allocates every broadcast channel of a client at this size, so it is a compromise
/// between surviving a burst and memory (a few MB).
const SUBSCRIBER_BROADCAST_CAPACITY: usize = 4096;
/// How often a subscription state that failed to apply is tried again.
const RESYNC_RETRY: Duration = Duration::from_secs(1);
/// How often a repeated warning (lag, lost publications) is logged at most.
const LOG_EVERY: Duration = Duration::from_secs(10);

enum SubscriptionOp {
    /// Subscribe, and say on the sender once Redis holds it.
    Subscribe(String, oneshot::Sender<bool>),
    Unsubscribe(String),
}

/// What the publisher task is asked to do, in order.
enum Outbound {
    Publish(String, Bytes),
    /// Answer once everything queued before has been sent.
    Flush(oneshot::Sender<()>),
}

/// Counters of what the adapter had to give up on.
#[derive(Default)]
struct Losses {
    /// Received messages fred dropped because the receiver task fell behind.
    received: AtomicU64,
    /// Accepted publications that never reached Redis (connection lost or command failed).
    published: AtomicU64,
}

/// A replica's connection to a Redis server used as the cluster backbone.
pub struct RedisBackbone {
    publisher: fred::clients::Client,
    subscriber: SubscriberClient,
    publications: mpsc::Sender<Outbound>,
    subscriptions: mpsc::Sender<SubscriptionOp>,
    losses: Arc<Losses>,
    /// Subscriber connections made so far (see [`Backbone::generation`]).
    generation: Arc<AtomicU64>,
    _tasks: Vec<AbortOnDrop>,
}

impl std::fmt::Debug for RedisBackbone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBackbone")
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

/// Connects to every server in `urls`, a comma-separated list: one server is a
/// [`RedisBackbone`]; several are the shards of a [`ShardedBackbone`], in list order,
/// all delivering to `incoming`. Fails only for a malformed list.
pub async fn connect_shards(
    urls: &str,
    incoming: mpsc::Sender<Incoming>,
) -> Result<Box<dyn Backbone>, PubsubError> {
    let mut urls = shard_urls(urls)?;
    if urls.len() == 1 {
        let url = urls.remove(0);
        return Ok(Box::new(RedisBackbone::connect(&url, incoming).await?));
    }
    let mut shards: Vec<Box<dyn Backbone>> = Vec::with_capacity(urls.len());
    for url in &urls {
        shards.push(Box::new(
            RedisBackbone::connect(url, incoming.clone()).await?,
        ));
    }
    Ok(Box::new(ShardedBackbone::new(shards)))
}

impl RedisBackbone {
    /// Starts connecting to the Redis server at `url` and returns at once; messages on
    /// subscribed topics go to `incoming`.
    ///
    /// Fails only for a malformed URL. A server that is down is retried forever: the
    /// adapter reports itself disconnected until it gets through.
    pub async fn connect(url: &str, incoming: mpsc::Sender<Incoming>) -> Result<Self, PubsubError> {
        let config = parse_config(url)?;
        // A Redis Cluster: sharded pub/sub (SPUBLISH, SSUBSCRIBE), each channel on the
        // node of its slot.
        let sharded = is_cluster(&config);
        let invalid = |error: fred::error::Error| {
            PubsubError::InvalidUrl(format!("{}: {}", redact_url(url), error.details()))
        };
        let publisher = builder(config.clone(), None).build().map_err(invalid)?;
        // RESP3 lets the subscriber connection answer PING while subscribed.
        let subscriber_config = Config {
            version: RespVersion::RESP3,
            ..config
        };
        let subscriber = builder(subscriber_config, Some(SUBSCRIBER_BROADCAST_CAPACITY))
            .build_subscriber_client()
            .map_err(invalid)?;

        // Taken before connecting, so that neither the first connection nor the first
        // message can be missed.
        let messages = subscriber.message_rx();
        let reconnects = subscriber.reconnect_rx();

        let losses = Arc::new(Losses::default());
        let generation = Arc::new(AtomicU64::new(0));
        let (publications, publication_rx) = mpsc::channel(PUBLISH_QUEUE);
        let (subscriptions, subscription_rx) = mpsc::channel(SUBSCRIPTION_QUEUE);
        let tasks = vec![
            spawn(keep_connected(publisher.clone(), "publisher")),
            spawn(keep_connected(subscriber.clone(), "subscriber")),
            spawn(publish_loop(
                publisher.clone(),
                publication_rx,
                Arc::clone(&losses),
                sharded,
            )),
            spawn(subscription_loop(
                sharded,
                subscriber.clone(),
                subscription_rx,
                reconnects,
                Arc::clone(&generation),
            )),
            spawn(receive_loop(messages, incoming, Arc::clone(&losses))),
            spawn(heartbeat(publisher.clone())),
            spawn(heartbeat(subscriber.clone())),
        ];
        Ok(Self {
            publisher,
            subscriber,
            publications,
            subscriptions,
            losses,
            generation,
            _tasks: tasks,
        })
    }

    /// Waits until both connections are up, for at most `timeout`; returns whether they are.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        crate::poll_until(timeout, Duration::from_millis(10), || self.is_connected()).await
    }
}

impl Backbone for RedisBackbone {
    fn adapter(&self) -> &'static str {
        NAME
    }

    fn is_connected(&self) -> bool {
        self.publisher.is_connected() && self.subscriber.is_connected()
    }

    fn publish(&self, topic: &str, payload: Bytes) -> Result<(), PubsubError> {
        if !self.is_connected() {
            return Err(PubsubError::Disconnected(NAME));
        }
        crate::enqueue(
            NAME,
            &self.publications,
            Outbound::Publish(topic.to_owned(), payload),
        )
    }

    fn subscribe(&self, topic: &str) -> Result<Held, PubsubError> {
        let (held, answer) = oneshot::channel();
        crate::enqueue(
            NAME,
            &self.subscriptions,
            SubscriptionOp::Subscribe(topic.to_owned(), held),
        )?;
        Ok(answer)
    }

    fn unsubscribe(&self, topic: &str) -> Result<(), PubsubError> {
        crate::enqueue(
            NAME,
            &self.subscriptions,
            SubscriptionOp::Unsubscribe(topic.to_owned()),
        )
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn flush(&self) -> Pending {
        let (done, flushed) = oneshot::channel();
        let queued = self.publications.clone();
        Box::pin(async move {
            // Waits for room: the queue drains unless the task is gone.
            if queued.send(Outbound::Flush(done)).await.is_ok() {
                let _ = flushed.await;
            }
        })
    }

    fn dropped_published(&self) -> u64 {
        self.losses.published.load(Ordering::Relaxed)
    }

    fn dropped_received(&self) -> u64 {
        self.losses.received.load(Ordering::Relaxed)
    }
}

async fn publish_loop(
    publisher: fred::clients::Client,
    mut queue: mpsc::Receiver<Outbound>,
    losses: Arc<Losses>,
    sharded: bool,
) {
    let throttle = Throttle::new(LOG_EVERY);
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut publications = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        for outbound in batch.drain(..) {
            match outbound {
                Outbound::Publish(topic, payload) => publications.push((topic, payload)),
                Outbound::Flush(done) => {
                    send_pipeline(&publisher, &mut publications, &losses, &throttle, sharded).await;
                    let _ = done.send(());
                }
            }
        }
        send_pipeline(&publisher, &mut publications, &losses, &throttle, sharded).await;
    }
}

/// Sends `publications` as one pipeline and waits for its replies, which keeps one
/// topic's publications in order even when fred retries a pipeline after a reconnect.
async fn send_pipeline(
    publisher: &fred::clients::Client,
    publications: &mut Vec<(String, Bytes)>,
    losses: &Losses,
    throttle: &Throttle,
    sharded: bool,
) {
    let count = publications.len();
    if count == 0 {
        return;
    }
    if !publisher.is_connected() {
        // At most once: what was accepted just before an outage is dropped rather
        // than delivered late.
        publications.clear();
        lost_publications(losses, throttle, count, "the connection is down");
        return;
    }
    let pipeline = publisher.pipeline();
    for (topic, payload) in publications.drain(..) {
        // Only queues the command in the pipeline's memory.
        let queued: Result<(), _> = if sharded {
            pipeline.spublish(topic, Value::Bytes(payload)).await
        } else {
            pipeline.publish(topic, Value::Bytes(payload)).await
        };
        if let Err(error) = queued {
            tracing::debug!(adapter = NAME, %error, "could not queue a publication");
        }
    }
    let failed = pipeline
        .try_all::<Value>()
        .await
        .iter()
        .filter(|result| result.is_err())
        .count();
    if failed > 0 {
        lost_publications(losses, throttle, failed, "PUBLISH failed");
    }
}

fn lost_publications(losses: &Losses, throttle: &Throttle, count: usize, why: &str) {
    let count = u64::try_from(count).unwrap_or(u64::MAX);
    losses.published.fetch_add(count, Ordering::Relaxed);
    if let Some(lost) = throttle.record(count) {
        tracing::warn!(adapter = NAME, lost, why, "publications lost");
    }
}

async fn subscription_loop(
    sharded: bool,
    subscriber: SubscriberClient,
    mut ops: mpsc::Receiver<SubscriptionOp>,
    mut reconnects: broadcast::Receiver<fred::prelude::Server>,
    generation: Arc<AtomicU64>,
) {
    // What the adapter should hold; Redis may hold less while `dirty`.
    let mut wanted = BTreeSet::new();
    let mut dirty = false;
    let mut batch = Vec::with_capacity(MAX_CHANNELS_PER_COMMAND);
    let mut retry = tokio::time::interval(RESYNC_RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            received = ops.recv_many(&mut batch, MAX_CHANNELS_PER_COMMAND) => {
                if received == 0 {
                    break;
                }
                if !apply(sharded, &subscriber, &mut wanted, &mut batch).await {
                    dirty = true;
                }
            }
            event = reconnects.recv() => match event {
                // Also sent for the first connection. A new connection holds nothing.
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {
                    generation.fetch_add(1, Ordering::AcqRel);
                    dirty = !resync(sharded, &subscriber, &wanted).await;
                }
                Err(broadcast::error::RecvError::Closed) => break,
            },
            _ = retry.tick(), if dirty && subscriber.is_connected() => {
                dirty = !resync(sharded, &subscriber, &wanted).await;
            }
        }
    }
}

/// Applies queued (un)subscriptions in order, each run of one kind as one command, and
/// answers each subscription. Returns false when Redis may now hold the wrong set.
async fn apply(
    sharded: bool,
    subscriber: &SubscriberClient,
    wanted: &mut BTreeSet<String>,
    batch: &mut Vec<SubscriptionOp>,
) -> bool {
    let mut in_sync = true;
    let mut subscribe: Vec<(String, oneshot::Sender<bool>)> = Vec::new();
    let mut unsubscribe: Vec<String> = Vec::new();
    for op in batch.drain(..) {
        match op {
            SubscriptionOp::Subscribe(topic, held) => {
                if !unsubscribe.is_empty() {
                    in_sync &=
                        unsubscribe_all(sharded, subscriber, mem::take(&mut unsubscribe)).await;
                }
                wanted.insert(topic.clone());
                subscribe.push((topic, held));
            }
            SubscriptionOp::Unsubscribe(topic) => {
                if !subscribe.is_empty() {
                    in_sync &= subscribe_all(sharded, subscriber, mem::take(&mut subscribe)).await;
                }
                if wanted.remove(&topic) {
                    unsubscribe.push(topic);
                }
            }
        }
    }
    if !unsubscribe.is_empty() {
        in_sync &= unsubscribe_all(sharded, subscriber, unsubscribe).await;
    }
    if !subscribe.is_empty() {
        in_sync &= subscribe_all(sharded, subscriber, subscribe).await;
    }
    in_sync
}

/// One SUBSCRIBE for all of them (again for any already held: harmless, and it proves
/// the current connection holds it). Answers each; false when it did not happen.
///
/// fred resolves a SUBSCRIBE as soon as it is written (its confirmations arrive out of
/// band and are dropped), so a PING follows it: Redis answers one connection's
/// commands in order, so the PONG means the SUBSCRIBE is in place.
async fn subscribe_all(
    sharded: bool,
    subscriber: &SubscriberClient,
    topics: Vec<(String, oneshot::Sender<bool>)>,
) -> bool {
    let (names, answers): (Vec<String>, Vec<oneshot::Sender<bool>>) = topics.into_iter().unzip();
    let done = subscriber.is_connected() && {
        match hold(sharded, subscriber, names, true).await {
            Ok(()) => true,
            Err(error) => {
                tracing::debug!(adapter = NAME, %error, "SUBSCRIBE failed, retrying");
                false
            }
        }
    };
    for answer in answers {
        let _ = answer.send(done);
    }
    done
}

async fn unsubscribe_all(
    sharded: bool,
    subscriber: &SubscriberClient,
    topics: Vec<String>,
) -> bool {
    if !subscriber.is_connected() {
        return false;
    }
    match release(sharded, subscriber, topics).await {
        Ok(()) => true,
        Err(error) => {
            tracing::debug!(adapter = NAME, %error, "UNSUBSCRIBE failed, retrying");
            false
        }
    }
}

/// SUBSCRIBE `topics`, or on a Redis Cluster SSUBSCRIBE them, one command per slot
/// (a sharded subscription names channels of one slot), on the connection to the node
/// that holds the slot. With `confirm`, a PING follows on that same connection.
async fn hold(
    sharded: bool,
    subscriber: &SubscriberClient,
    topics: Vec<String>,
    confirm: bool,
) -> Result<(), fred::error::Error> {
    if !sharded {
        subscriber.subscribe(topics).await?;
        if confirm {
            subscriber.ping::<Value>(None).await?;
        }
        return Ok(());
    }
    for (slot, topics) in by_slot(topics) {
        subscriber.ssubscribe(topics).await?;
        if confirm {
            // Routed by the slot: the node (and connection) the SSUBSCRIBE went to.
            let ping = fred::types::CustomCommand::new_static(
                "PING",
                fred::types::ClusterHash::Custom(slot),
                false,
            );
            subscriber.custom::<Value, Value>(ping, Vec::new()).await?;
        }
    }
    Ok(())
}

/// UNSUBSCRIBE `topics`, or on a Redis Cluster SUNSUBSCRIBE them, one command per slot.
async fn release(
    sharded: bool,
    subscriber: &SubscriberClient,
    topics: Vec<String>,
) -> Result<(), fred::error::Error> {
    if !sharded {
        return subscriber.unsubscribe(topics).await;
    }
    for (_, topics) in by_slot(topics) {
        subscriber.sunsubscribe(topics).await?;
    }
    Ok(())
}

/// `topics` grouped by their Redis Cluster hash slot.
fn by_slot(topics: Vec<String>) -> std::collections::BTreeMap<u16, Vec<String>> {
    let mut slots: std::collections::BTreeMap<u16, Vec<String>> = Default::default();
    for topic in topics {
        let slot = fred::util::redis_keyslot(topic.as_bytes());
        slots.entry(slot).or_default().push(topic);
    }
    slots
}

/// Makes Redis hold exactly `wanted`; returns whether it worked.
async fn resync(sharded: bool, subscriber: &SubscriberClient, wanted: &BTreeSet<String>) -> bool {
    let mut ok = true;
    let wanted_list: Vec<&String> = wanted.iter().collect();
    for chunk in wanted_list.chunks(MAX_CHANNELS_PER_COMMAND) {
        let channels: Vec<String> = chunk.iter().map(|topic| (*topic).clone()).collect();
        if let Err(error) = hold(sharded, subscriber, channels, false).await {
            tracing::warn!(adapter = NAME, %error, "resubscribing failed, retrying");
            ok = false;
        }
    }
    let tracked = if sharded {
        subscriber.tracked_shard_channels()
    } else {
        subscriber.tracked_channels()
    };
    let stale: Vec<String> = tracked
        .iter()
        .filter(|channel| !wanted.contains(&***channel))
        .map(|channel| channel.to_string())
        .collect();
    for chunk in stale.chunks(MAX_CHANNELS_PER_COMMAND) {
        if let Err(error) = release(sharded, subscriber, chunk.to_vec()).await {
            tracing::warn!(adapter = NAME, %error, "unsubscribing failed, retrying");
            ok = false;
        }
    }
    if ok {
        tracing::info!(
            adapter = NAME,
            topics = wanted.len(),
            "subscriptions in place"
        );
    }
    ok
}

async fn receive_loop(
    mut messages: broadcast::Receiver<Message>,
    incoming: mpsc::Sender<Incoming>,
    losses: Arc<Losses>,
) {
    let throttle = Throttle::new(LOG_EVERY);
    loop {
        match messages.recv().await {
            Ok(message) => {
                let Some(payload) = payload(message.value) else {
                    continue;
                };
                if incoming.send(payload).await.is_err() {
                    break;
                }
            }
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                losses.received.fetch_add(missed, Ordering::Relaxed);
                if let Some(lost) = throttle.record(missed) {
                    tracing::warn!(
                        adapter = NAME,
                        lost,
                        "received messages lost: this replica reads them too slowly"
                    );
                }
            }
            Err(broadcast::error::RecvError::Closed) => break,
        }
    }
}

/// The raw bytes of a message, without copying them.
fn payload(value: Value) -> Option<Bytes> {
    match value {
        Value::Bytes(bytes) => Some(bytes),
        Value::String(text) => Some(text.into_inner()),
        Value::Null => Some(Bytes::new()),
        other => {
            tracing::debug!(adapter = NAME, kind = ?other.kind(), "ignoring a non-binary message");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_keep_their_bytes() {
        let raw = Bytes::from_static(&[0, 159, 146, 150]);
        assert_eq!(payload(Value::Bytes(raw.clone())), Some(raw));
        assert_eq!(
            payload(Value::String("{}".into())),
            Some(Bytes::from_static(b"{}"))
        );
        assert_eq!(payload(Value::Null), Some(Bytes::new()));
    }
}
