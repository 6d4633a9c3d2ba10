//! The Redis backbone: topics are Redis pub/sub channels, reached with `fred` over two
//! connections that reconnect forever, one that PUBLISHes and one that SUBSCRIBEs.
//!
//! Redis channel names are binary safe, so topics are used as they are.
//!
//! With a `redis-cluster://` URL, [`connect_shards`] gives a Redis Cluster backbone
//! (`cluster`): one such adapter per master, in sharded pub/sub mode (SPUBLISH, and
//! SSUBSCRIBE/SUNSUBSCRIBE grouped by hash slot), each topic on the master of its slot
//! by our own slot table (`slots`). Several `redis://` servers are shards of one
//! [`ShardedBackbone`].
//!
//! Work is done by the adapter's own tasks, fed by the queues of `crate::adapter`:
//! - a publication made while none is queued or awaiting its reply goes straight into
//!   fred's command queue, so at light load it makes no hop of our own; a task awaits
//!   its reply to count a failure;
//! - otherwise it waits in our queue: the publisher task sends queued publications as
//!   one pipeline per batch, and waits for a batch before sending the next, so one
//!   topic's messages leave in order, and later publications queue behind them; a
//!   flush request in the queue is answered once everything before it was sent;
//! - the subscription task applies (un)subscriptions in the order they were asked for,
//!   many per command, keeps the set of topics the adapter should hold, subscribes to
//!   all of it again after every (re)connection, and confirms each subscription once
//!   Redis has answered a PING sent right behind its SUBSCRIBE;
//! - the receive workers each read fred's message broadcast, keep the topics that hash
//!   to them and deliver those to the [`Inbox`] themselves: a message makes no hop
//!   between fred's reader and the worker that hands it to the hub, and a topic whose
//!   delivery is slow delays only the topics of its own worker;
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
use std::future::Future;
use std::mem;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use fred::clients::SubscriberClient;
use fred::prelude::{ClientLike, Config, EventInterface, PubsubInterface, Value};
use fred::types::{Message, RespVersion};
use futures_util::FutureExt;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::adapter::{
    CommandQueues, Commands, Losses, Outbound, Queued, SubscriptionOp, worker_of,
};
use crate::shards::ShardedBackbone;
use crate::{AbortOnDrop, Backbone, Held, Inbox, Pending, PubsubError, redact_url, spawn};

mod cluster;
pub(crate) mod link;
mod slots;

use link::{COMMAND_TIMEOUT, NAME, builder, heartbeat, is_cluster, keep_connected, parse_config};
pub use link::{shard_urls, validate_url};

/// In a Redis Cluster, the hash tags a cluster's channels are spread over: a channel's
/// topic, history keys and presence keys all carry the same one ([`channel_tag`]), so
/// they share one slot and one master, through failovers and slot migrations alike,
/// and a master that is down stops its channels entirely and no other's. Fixed:
/// changing it would move most channels.
pub const CLUSTER_SHARDS: usize = 64;

/// The hash tag of cluster shard `index` (below [`CLUSTER_SHARDS`]) of the cluster
/// whose topic prefix is `prefix`: `{<prefix>}` for 0, which also holds connection
/// records and replica liveness, `{<prefix>|<index>}` for the others. A prefix
/// cannot contain `|` or braces, so no other cluster's tag is the same.
pub fn cluster_tag(prefix: &str, index: usize) -> String {
    if index == 0 {
        format!("{{{prefix}}}")
    } else {
        format!("{{{prefix}|{index}}}")
    }
}

/// The hash tag of everything about the channel named `key` (a topic's
/// [`crate::shards::shard_key`]) in a Redis Cluster.
pub fn channel_tag(prefix: &str, key: &str) -> String {
    cluster_tag(prefix, crate::shards::shard_of(key, CLUSTER_SHARDS))
}

/// Most publications sent in one pipeline.
const MAX_BATCH: usize = 256;
/// Most channels named in one SUBSCRIBE or UNSUBSCRIBE.
const MAX_CHANNELS_PER_COMMAND: usize = 512;
/// How often a subscription state that failed to apply is tried again.
const RESYNC_RETRY: Duration = Duration::from_secs(1);
/// Direct publications whose reply may be awaited at once; past it a reply goes
/// unchecked.
const REPLY_QUEUE: usize = 1024;

/// A PUBLISH already in fred's command queue, its reply still to come.
type Reply = Pin<Box<dyn Future<Output = Result<Value, fred::error::Error>> + Send>>;

/// A replica's connection to a Redis server used as the cluster backbone.
pub struct RedisBackbone {
    /// A Redis Cluster: SPUBLISH instead of PUBLISH.
    sharded: bool,
    publisher: fred::clients::Client,
    subscriber: SubscriberClient,
    commands: Commands,
    /// Direct publications whose reply has not come yet: while there are any, a
    /// publication queues behind them, so that under load publications pipeline.
    unanswered: Arc<AtomicUsize>,
    replies: mpsc::Sender<Reply>,
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
/// all delivering to `inbox`. Fails only for a malformed list.
///
/// `prefix` is the topics' prefix (the history and presence stores' too): on a Redis
/// Cluster each topic travels under its channel's [`channel_tag`].
pub async fn connect_shards(
    urls: &str,
    prefix: &str,
    inbox: Inbox,
) -> Result<Box<dyn Backbone>, PubsubError> {
    let mut urls = shard_urls(urls)?;
    if urls.len() == 1 && is_cluster(&parse_config(&urls[0])?) {
        return Ok(Box::new(cluster::ClusterBackbone::connect(
            &urls[0], prefix, inbox,
        )?));
    }
    if urls.len() == 1 {
        let url = urls.remove(0);
        return Ok(Box::new(RedisBackbone::connect(&url, inbox).await?));
    }
    let mut shards: Vec<Box<dyn Backbone>> = Vec::with_capacity(urls.len());
    for url in &urls {
        shards.push(Box::new(RedisBackbone::connect(url, inbox.clone()).await?));
    }
    Ok(Box::new(ShardedBackbone::new(shards)))
}

impl RedisBackbone {
    /// Starts connecting to the Redis server at `url` and returns at once; messages on
    /// subscribed topics go to `inbox`.
    ///
    /// Fails only for a malformed URL. A server that is down is retried forever: the
    /// adapter reports itself disconnected until it gets through.
    pub async fn connect(url: &str, inbox: Inbox) -> Result<Self, PubsubError> {
        let config = parse_config(url)?;
        if is_cluster(&config) {
            return Err(PubsubError::InvalidUrl(format!(
                "{}: a Redis Cluster is reached with connect_shards",
                redact_url(url)
            )));
        }
        Self::start(config, false, inbox)
    }

    /// Starts the connections to the one server `config` names; `sharded` for a Redis
    /// Cluster master (SPUBLISH, SSUBSCRIBE).
    fn start(config: Config, sharded: bool, inbox: Inbox) -> Result<Self, PubsubError> {
        let invalid = |error: fred::error::Error| {
            PubsubError::InvalidUrl(format!("invalid Redis configuration: {}", error.details()))
        };
        let publisher = builder(config.clone(), None).build().map_err(invalid)?;
        // RESP3 lets the subscriber connection answer PING while subscribed.
        let subscriber_config = Config {
            version: RespVersion::RESP3,
            ..config
        };
        // fred allocates every broadcast channel of the client at this size, and the
        // message channel is where received messages wait for the workers.
        let subscriber = builder(subscriber_config, Some(inbox.buffer_size()))
            .build_subscriber_client()
            .map_err(invalid)?;

        // Taken before connecting, so that neither the first connection nor the first
        // message can be missed.
        let workers = inbox.worker_count();
        let receivers: Vec<_> = (0..workers).map(|_| subscriber.message_rx()).collect();
        let reconnects = subscriber.reconnect_rx();

        let losses = Arc::new(Losses::new(NAME));
        let generation = Arc::new(AtomicU64::new(0));
        let unanswered = Arc::new(AtomicUsize::new(0));
        let (replies, reply_rx) = mpsc::channel(REPLY_QUEUE);
        let (
            commands,
            CommandQueues {
                publications,
                subscriptions,
                queued,
            },
        ) = Commands::new(NAME);
        let mut tasks = vec![
            spawn(keep_connected(publisher.clone(), "publisher")),
            spawn(keep_connected(subscriber.clone(), "subscriber")),
            spawn(publish_loop(
                publisher.clone(),
                publications,
                queued,
                Arc::clone(&unanswered),
                Arc::clone(&losses),
                sharded,
            )),
            spawn(await_replies(
                reply_rx,
                Arc::clone(&unanswered),
                Arc::clone(&losses),
            )),
            spawn(subscription_loop(
                sharded,
                subscriber.clone(),
                subscriptions,
                reconnects,
                Arc::clone(&generation),
            )),
            spawn(heartbeat(publisher.clone())),
            spawn(heartbeat(subscriber.clone())),
        ];
        for (worker, messages) in receivers.into_iter().enumerate() {
            tasks.push(spawn(receive_worker(
                Worker {
                    index: worker,
                    count: workers,
                },
                messages,
                inbox.clone(),
                Arc::clone(&losses),
            )));
        }
        Ok(Self {
            sharded,
            publisher,
            subscriber,
            commands,
            unanswered,
            replies,
            losses,
            generation,
            _tasks: tasks,
        })
    }

    /// Hands a PUBLISH to fred now: its first poll puts the command in fred's queue (in
    /// the order of the calls), and the reply is awaited by another task.
    fn publish_directly(&self, topic: &str, payload: Bytes) {
        let publisher = self.publisher.clone();
        let topic = topic.to_owned();
        let sharded = self.sharded;
        let mut reply: Reply = Box::pin(async move {
            if sharded {
                publisher
                    .spublish::<Value, _, _>(topic, Value::Bytes(payload))
                    .await
            } else {
                publisher
                    .publish::<Value, _, _>(topic, Value::Bytes(payload))
                    .await
            }
        });
        match (&mut reply).now_or_never() {
            Some(Ok(_)) => {}
            Some(Err(_)) => self.losses.lost_publications(1, "PUBLISH failed"),
            None => {
                self.unanswered.fetch_add(1, Ordering::AcqRel);
                if self.replies.try_send(reply).is_err() {
                    // Sent all the same; only a failure would go uncounted.
                    self.unanswered.fetch_sub(1, Ordering::AcqRel);
                }
            }
        }
    }

    /// Subscribes to all of `topics` with one queued request, answering nobody: a
    /// Redis Cluster master taking over topics from another.
    fn hold_all(&self, topics: Vec<String>) -> Result<(), PubsubError> {
        self.commands.subscribe_all(topics)
    }

    /// Unsubscribes from all of `topics` with one queued request.
    fn release_all(&self, topics: Vec<String>) -> Result<(), PubsubError> {
        self.commands.unsubscribe_all(topics)
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
        if self.commands.nothing_queued() && self.unanswered.load(Ordering::Acquire) == 0 {
            self.publish_directly(topic, payload);
            return Ok(());
        }
        self.commands.publish(topic.to_owned(), payload)
    }

    fn subscribe(&self, topic: &str) -> Result<Held, PubsubError> {
        self.commands.subscribe(topic)
    }

    fn unsubscribe(&self, topic: &str) -> Result<(), PubsubError> {
        self.commands.unsubscribe(topic)
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn flush(&self) -> Pending {
        self.commands.flush()
    }

    fn dropped_published(&self) -> u64 {
        self.losses.published()
    }

    fn dropped_received(&self) -> u64 {
        self.losses.received()
    }
}

async fn publish_loop(
    publisher: fred::clients::Client,
    mut queue: mpsc::Receiver<Outbound>,
    queued: Queued,
    unanswered: Arc<AtomicUsize>,
    losses: Arc<Losses>,
    sharded: bool,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut publications = Vec::with_capacity(MAX_BATCH);
    let send = async |publications: &mut Vec<(String, Bytes)>| {
        let count = publications.len();
        send_pipeline(&publisher, publications, &losses, sharded).await;
        // Answered (or lost): later publications may go straight to fred.
        queued.handed_over(count);
    };
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        for outbound in batch.drain(..) {
            match outbound {
                Outbound::Publish(topic, payload) => publications.push((topic, payload)),
                Outbound::Flush(done) => {
                    send(&mut publications).await;
                    // Direct publications left before this flush was asked for.
                    crate::poll_until(COMMAND_TIMEOUT, Duration::from_millis(1), || {
                        unanswered.load(Ordering::Acquire) == 0
                    })
                    .await;
                    let _ = done.send(());
                }
            }
        }
        send(&mut publications).await;
    }
}

/// Awaits the replies of direct publications, in order, to count the failures.
async fn await_replies(
    mut replies: mpsc::Receiver<Reply>,
    unanswered: Arc<AtomicUsize>,
    losses: Arc<Losses>,
) {
    while let Some(reply) = replies.recv().await {
        if reply.await.is_err() {
            losses.lost_publications(1, "PUBLISH failed");
        }
        unanswered.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Sends `publications` as one pipeline and waits for its replies, which keeps one
/// topic's publications in order even when fred retries a pipeline after a reconnect.
async fn send_pipeline(
    publisher: &fred::clients::Client,
    publications: &mut Vec<(String, Bytes)>,
    losses: &Losses,
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
        losses.lost_publications(count, "the connection is down");
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
        losses.lost_publications(failed, "PUBLISH failed");
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
    let mut subscribe: Vec<(String, Option<oneshot::Sender<bool>>)> = Vec::new();
    let mut unsubscribe: Vec<String> = Vec::new();
    let changes = batch.drain(..).flat_map(|op| -> Vec<Change> {
        match op {
            SubscriptionOp::Subscribe(topic, held) => vec![Change::Hold(topic, Some(held))],
            SubscriptionOp::SubscribeAll(topics) => {
                topics.into_iter().map(|t| Change::Hold(t, None)).collect()
            }
            SubscriptionOp::Unsubscribe(topic) => vec![Change::Release(topic)],
            SubscriptionOp::UnsubscribeAll(topics) => {
                topics.into_iter().map(Change::Release).collect()
            }
        }
    });
    for change in changes {
        match change {
            Change::Hold(topic, held) => {
                if !unsubscribe.is_empty() {
                    in_sync &=
                        unsubscribe_all(sharded, subscriber, mem::take(&mut unsubscribe)).await;
                }
                wanted.insert(topic.clone());
                subscribe.push((topic, held));
            }
            Change::Release(topic) => {
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

/// One topic's part of a [`SubscriptionOp`].
enum Change {
    /// Subscribe, answering on the sender if there is one.
    Hold(String, Option<oneshot::Sender<bool>>),
    Release(String),
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
    topics: Vec<(String, Option<oneshot::Sender<bool>>)>,
) -> bool {
    let (names, answers): (Vec<String>, Vec<Option<oneshot::Sender<bool>>>) =
        topics.into_iter().unzip();
    let done = subscriber.is_connected() && {
        match hold(sharded, subscriber, names, true).await {
            Ok(()) => true,
            Err(error) => {
                tracing::debug!(adapter = NAME, %error, "SUBSCRIBE failed, retrying");
                false
            }
        }
    };
    for answer in answers.into_iter().flatten() {
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

/// SUBSCRIBE `topics`, or on a Redis Cluster master SSUBSCRIBE them, one command per
/// slot (a sharded subscription names channels of one slot). With `confirm`, one PING
/// follows: the connection leads to one server, which answers its commands in order.
async fn hold(
    sharded: bool,
    subscriber: &SubscriberClient,
    topics: Vec<String>,
    confirm: bool,
) -> Result<(), fred::error::Error> {
    if sharded {
        for topics in by_slot(topics).into_values() {
            subscriber.ssubscribe(topics).await?;
        }
    } else {
        subscriber.subscribe(topics).await?;
    }
    if confirm {
        subscriber.ping::<Value>(None).await?;
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
    for topics in by_slot(topics).into_values() {
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

/// One receive worker's share of the topics.
#[derive(Clone, Copy)]
struct Worker {
    index: usize,
    count: usize,
}

/// Reads every message fred received, and delivers the ones whose topic hashes to
/// this worker.
async fn receive_worker(
    worker: Worker,
    mut messages: broadcast::Receiver<Message>,
    inbox: Inbox,
    losses: Arc<Losses>,
) {
    loop {
        match messages.recv().await {
            Ok(message) => {
                if worker_of(message.channel.as_bytes(), worker.count) != worker.index {
                    continue;
                }
                if let Some(payload) = payload(message.value) {
                    inbox.deliver(payload);
                }
            }
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                // The buffer holds every worker's messages: about 1/count of the
                // ones this worker missed were its own.
                let count = u64::try_from(worker.count).unwrap_or(1);
                losses.lost_received(missed.div_ceil(count));
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
