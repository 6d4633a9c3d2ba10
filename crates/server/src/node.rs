//! This replica as handlers see it: local delivery through the hub, and the backbone
//! for every other replica (envelopes out, envelopes in, channel interest and its
//! confirmation, heartbeats that reveal a twin node id).

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chorus_hub::{ClientHandle, Frame, Hub};
use chorus_pubsub::{Backbone, Envelope, Kind, MessageIds, RecentIds, now_ms};
use chorus_rpc::{Delivery, Node, Subscribed};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::metrics::{BackboneSnapshot, PubsubMetrics};

/// How many recent envelope ids each replica remembers to drop duplicates.
const RECENT_IDS: usize = 65_536;
/// Pause before a refused backbone (un)subscription is tried again.
const INTEREST_RETRY: Duration = Duration::from_millis(200);
/// Longest wait for the backbone to confirm a subscription before `subscribe` answers
/// that it holds on this replica only.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a replica says it is alive on the broadcast topic.
const HEARTBEAT: Duration = Duration::from_secs(5);
/// How long `/health` stays degraded after a twin node id was last seen.
const TWIN_MEMORY: Duration = Duration::from_secs(60);
const SHARDS: usize = 32;

/// Topic names for one cluster: the broadcast topic is the prefix itself, and a
/// channel's topic is `prefix/channel`. The prefix cannot contain `/`, so no channel
/// topic of one cluster can equal a topic of a cluster with another prefix.
#[derive(Clone, Debug)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    pub fn broadcast(&self) -> &str {
        &self.prefix
    }

    pub fn channel(&self, channel: &str) -> String {
        format!("{}/{channel}", self.prefix)
    }
}

/// Channels whose local interest changed and must be reconciled with the backbone.
/// A set, not a queue: bounded by the number of channels, and repeated changes to one
/// channel collapse into one check.
#[derive(Default)]
struct InterestChanges {
    channels: Mutex<HashSet<Arc<str>>>,
    wake: Notify,
}

impl InterestChanges {
    fn mark(&self, channel: &str) {
        lock(&self.channels).insert(Arc::from(channel));
        self.wake.notify_one();
    }

    fn take(&self) -> Vec<Arc<str>> {
        lock(&self.channels).drain().collect()
    }
}

/// Whether the backbone confirmed a channel, and who waits for it to.
#[derive(Default)]
struct Confirmation {
    /// The backbone connection ([`Backbone::generation`]) that confirmed it.
    generation: Option<u64>,
    waiters: Vec<oneshot::Sender<bool>>,
}

type ConfirmationShard = Mutex<HashMap<Arc<str>, Confirmation>>;

/// Per-channel confirmations, sharded like the hub's channel index.
struct Confirmations {
    shards: Box<[ConfirmationShard]>,
    hasher: RandomState,
}

impl Confirmations {
    fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
        }
    }

    fn shard(&self, channel: &str) -> MutexGuard<'_, HashMap<Arc<str>, Confirmation>> {
        #[allow(clippy::cast_possible_truncation)]
        let index = (self.hasher.hash_one(channel) as usize) % SHARDS;
        lock(&self.shards[index])
    }

    /// Records the backbone's answer for `channel` and passes it to every waiter.
    fn settle(&self, channel: &str, generation: u64, held: bool) {
        let mut shard = self.shard(channel);
        if let Some(confirmation) = shard.get_mut(channel) {
            if held {
                confirmation.generation = Some(generation);
            }
            for waiter in confirmation.waiters.drain(..) {
                let _ = waiter.send(held);
            }
        }
    }

    fn needs_answer(&self, channel: &str, generation: u64) -> bool {
        self.shard(channel)
            .get(channel)
            .is_some_and(|c| !c.waiters.is_empty() || c.generation != Some(generation))
    }

    fn forget(&self, channel: &str) {
        if let Some(confirmation) = self.shard(channel).remove(channel) {
            for waiter in confirmation.waiters {
                let _ = waiter.send(false);
            }
        }
    }
}

/// The replica: hub plus (optionally) a backbone.
pub struct ClusterNode {
    node_id: String,
    hub: Arc<Hub>,
    backbone: Option<Arc<dyn Backbone>>,
    topics: Topics,
    ids: MessageIds,
    interest: Arc<InterestChanges>,
    confirmations: Confirmations,
    /// Milliseconds since `started` when an envelope from another process with this
    /// node id was last seen, plus one; 0 for never.
    twin_seen_ms: AtomicU64,
    started: Instant,
    metrics: PubsubMetrics,
}

impl std::fmt::Debug for ClusterNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterNode")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

impl ClusterNode {
    /// Builds the node and, with a backbone, starts its receive, interest and
    /// heartbeat tasks. `incoming` is the receiving end of the channel the backbone
    /// delivers into.
    pub fn start(
        node_id: String,
        hub: Arc<Hub>,
        backbone: Option<(Arc<dyn Backbone>, mpsc::Receiver<Bytes>)>,
        topics: Topics,
        metrics: PubsubMetrics,
    ) -> Arc<Self> {
        let (backbone, incoming) = backbone.map_or((None, None), |(b, rx)| (Some(b), Some(rx)));
        let node = Arc::new(Self {
            node_id,
            hub,
            backbone,
            topics,
            ids: MessageIds::new(),
            interest: Arc::default(),
            confirmations: Confirmations::new(),
            twin_seen_ms: AtomicU64::new(0),
            started: Instant::now(),
            metrics,
        });
        if let (Some(backbone), Some(incoming)) = (&node.backbone, incoming) {
            if let Err(err) = backbone.subscribe(node.topics.broadcast()) {
                tracing::error!(%err, "could not subscribe to the broadcast topic");
                node.metrics.errors.inc();
            }
            tokio::spawn(receive(Arc::clone(&node), incoming));
            tokio::spawn(reconcile_interest(
                Arc::downgrade(&node),
                Arc::clone(&node.interest),
                Arc::clone(backbone),
            ));
            tokio::spawn(heartbeat(Arc::downgrade(&node)));
        }
        node
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// `Some(connected)` when a backbone is configured, `None` when standalone.
    pub fn backbone_connected(&self) -> Option<bool> {
        self.backbone
            .as_ref()
            .map(|backbone| backbone.is_connected())
    }

    /// Whether another process with this node id was heard from recently: two
    /// replicas sharing an id drop each other's echoes and confuse every operator.
    pub fn twin_node_id_seen(&self) -> bool {
        let seen = self.twin_seen_ms.load(Ordering::Relaxed);
        seen > 0 && self.elapsed_ms().saturating_sub(seen - 1) < millis(TWIN_MEMORY)
    }

    /// What `/metrics` reports about the backbone; standalone counts as connected.
    pub fn backbone_snapshot(&self) -> BackboneSnapshot {
        self.backbone.as_ref().map_or(
            BackboneSnapshot {
                connected: true,
                dropped_published: 0,
                dropped_received: 0,
            },
            |backbone| BackboneSnapshot {
                connected: backbone.is_connected(),
                dropped_published: backbone.dropped_published(),
                dropped_received: backbone.dropped_received(),
            },
        )
    }

    /// Removes a disconnected client and drops interest in channels it was the last
    /// local subscriber of.
    pub fn disconnect(&self, client: &ClientHandle) {
        for channel in self.hub.remove(client) {
            self.interest.mark(&channel);
        }
    }

    /// Waits, at most `timeout`, until every publication accepted so far has left for
    /// the backbone.
    pub async fn flush_backbone(&self, timeout: Duration) {
        if let Some(backbone) = &self.backbone
            && tokio::time::timeout(timeout, backbone.flush())
                .await
                .is_err()
        {
            tracing::warn!(
                ?timeout,
                "the backbone did not take every publication in time"
            );
        }
    }

    fn elapsed_ms(&self) -> u64 {
        millis(self.started.elapsed())
    }

    fn send_to_cluster(&self, kind: Kind, target: &str, topic: &str, payload: Bytes) -> Delivery {
        let Some(backbone) = &self.backbone else {
            return Delivery::Cluster;
        };
        if !backbone.is_connected() {
            self.metrics.errors.inc();
            return Delivery::LocalOnly;
        }
        let envelope = Envelope {
            id: self.ids.next_id(),
            origin: self.node_id.clone(),
            origin_ts_ms: now_ms(),
            kind,
            target: target.to_owned(),
            payload,
        };
        let published = envelope
            .encode()
            .map_err(|err| err.to_string())
            .and_then(|bytes| {
                backbone
                    .publish(topic, bytes)
                    .map_err(|err| err.to_string())
            });
        match published {
            Ok(()) => {
                if kind != Kind::Heartbeat {
                    self.metrics.published.inc();
                }
                Delivery::Cluster
            }
            Err(err) => {
                self.metrics.errors.inc();
                tracing::debug!(%err, topic, "publication stayed local");
                Delivery::LocalOnly
            }
        }
    }

    /// Delivers an envelope that came from another replica.
    fn deliver_remote(&self, bytes: &Bytes, recent: &mut RecentIds) {
        let envelope = match Envelope::decode(bytes) {
            Ok(envelope) => envelope,
            Err(err) => {
                self.metrics.errors.inc();
                tracing::warn!(%err, "dropping an undecodable envelope");
                return;
            }
        };
        if envelope.origin == self.node_id {
            // Our own publications come back from the backbone; we delivered them already.
            if self.ids.is_own(envelope.id) {
                return;
            }
            self.twin_seen();
        }
        if !recent.insert(envelope.id) {
            return;
        }
        if envelope.kind == Kind::Heartbeat {
            return;
        }
        self.metrics.received.inc();
        let Ok(frame) = Frame::try_from_bytes(envelope.payload) else {
            self.metrics.errors.inc();
            tracing::warn!(
                origin = envelope.origin,
                "dropping an envelope whose payload is not UTF-8"
            );
            return;
        };
        match envelope.kind {
            Kind::Broadcast => {
                self.hub.broadcast(&frame);
            }
            Kind::Channel => {
                self.hub.publish(&envelope.target, &frame);
            }
            other => tracing::debug!(
                ?other,
                "ignoring an envelope kind this replica does not handle"
            ),
        }
        let latency_ms = now_ms().saturating_sub(envelope.origin_ts_ms);
        self.metrics
            .latency
            .observe(Duration::from_millis(latency_ms).as_secs_f64());
    }

    fn twin_seen(&self) {
        let previous = self
            .twin_seen_ms
            .swap(self.elapsed_ms() + 1, Ordering::Relaxed);
        self.metrics.node_id_conflicts.inc();
        // One line per episode, not one per envelope.
        if previous == 0 || self.elapsed_ms().saturating_sub(previous - 1) >= millis(TWIN_MEMORY) {
            tracing::error!(
                node_id = self.node_id,
                "another replica uses this node id (WS_NODE_ID): give every replica its own"
            );
        }
    }
}

impl Node for ClusterNode {
    fn broadcast(&self, frame: Frame) -> Delivery {
        self.hub.broadcast(&frame);
        self.send_to_cluster(
            Kind::Broadcast,
            "",
            self.topics.broadcast(),
            frame.as_bytes().clone(),
        )
    }

    fn publish(&self, channel: &str, frame: Frame) -> Delivery {
        self.hub.publish(channel, &frame);
        if self.backbone.is_none() {
            return Delivery::Cluster;
        }
        self.send_to_cluster(
            Kind::Channel,
            channel,
            &self.topics.channel(channel),
            frame.as_bytes().clone(),
        )
    }

    fn subscribe(&self, client: &ClientHandle, channel: &str) -> Subscribed {
        self.hub.subscribe(client, channel);
        let Some(backbone) = &self.backbone else {
            return Subscribed::Cluster;
        };
        if !backbone.is_connected() {
            // Taken as soon as the backbone is back.
            self.interest.mark(channel);
            return Subscribed::LocalOnly;
        }
        let generation = backbone.generation();
        let (waiter, answer) = oneshot::channel();
        {
            let mut shard = self.confirmations.shard(channel);
            let confirmation = shard.entry(Arc::from(channel)).or_default();
            if confirmation.generation == Some(generation) {
                return Subscribed::Cluster;
            }
            confirmation.waiters.push(waiter);
            if confirmation.waiters.len() > 1 {
                // The backbone is being asked already; its answer serves everyone.
                return Subscribed::Pending(pending(answer));
            }
        }
        self.interest.mark(channel);
        Subscribed::Pending(pending(answer))
    }

    fn unsubscribe(&self, client: &ClientHandle, channel: &str) -> bool {
        let outcome = self.hub.unsubscribe(client, channel);
        if outcome.last_on_node && self.backbone.is_some() {
            self.interest.mark(channel);
        }
        outcome.removed
    }
}

fn pending(
    answer: oneshot::Receiver<bool>,
) -> std::pin::Pin<Box<dyn Future<Output = bool> + Send>> {
    Box::pin(async move {
        matches!(
            tokio::time::timeout(SUBSCRIBE_TIMEOUT, answer).await,
            Ok(Ok(true))
        )
    })
}

async fn receive(node: Arc<ClusterNode>, mut incoming: mpsc::Receiver<Bytes>) {
    let mut recent = RecentIds::new(RECENT_IDS);
    while let Some(bytes) = incoming.recv().await {
        node.deliver_remote(&bytes, &mut recent);
    }
}

/// Keeps the backbone subscribed to exactly the channels that have a local
/// subscriber, and answers the subscriptions waiting for the backbone. It compares
/// the hub's current state with what it holds instead of replaying events, so a
/// subscribe and an unsubscribe racing each other still end in the right state.
async fn reconcile_interest(
    node: Weak<ClusterNode>,
    changes: Arc<InterestChanges>,
    backbone: Arc<dyn Backbone>,
) {
    let mut held: HashSet<Arc<str>> = HashSet::new();
    let mut answers = FuturesUnordered::new();
    loop {
        let settled: Option<(Arc<str>, u64, bool)> = tokio::select! {
            () = changes.wake.notified() => None,
            Some(settled) = answers.next(), if !answers.is_empty() => Some(settled),
        };
        let Some(node) = node.upgrade() else { return };
        if let Some((channel, generation, confirmed)) = settled {
            node.confirmations.settle(&channel, generation, confirmed);
            continue;
        }
        let mut failed = Vec::new();
        for channel in changes.take() {
            let wanted = node.hub.has_subscribers(&channel);
            let topic = node.topics.channel(&channel);
            let generation = backbone.generation();
            if wanted
                && (!held.contains(&channel)
                    || node.confirmations.needs_answer(&channel, generation))
            {
                match backbone.subscribe(&topic) {
                    Ok(answer) => {
                        held.insert(Arc::clone(&channel));
                        answers.push(async move {
                            (channel, generation, answer.await.unwrap_or(false))
                        });
                    }
                    Err(err) => {
                        node.metrics.errors.inc();
                        tracing::warn!(%err, topic, "could not subscribe on the backbone; retrying");
                        failed.push(channel);
                    }
                }
            } else if !wanted && held.contains(&channel) {
                node.confirmations.forget(&channel);
                match backbone.unsubscribe(&topic) {
                    Ok(()) => {
                        held.remove(&channel);
                    }
                    Err(err) => {
                        node.metrics.errors.inc();
                        tracing::warn!(%err, topic, "could not unsubscribe on the backbone; retrying");
                        failed.push(channel);
                    }
                }
            }
        }
        drop(node);
        // A refused change (the adapter's queue full) is not forgotten: without a
        // retry the channel would stay unsubscribed until its interest changed again.
        if !failed.is_empty() {
            let changes = Arc::clone(&changes);
            tokio::spawn(async move {
                tokio::time::sleep(INTEREST_RETRY).await;
                for channel in failed {
                    changes.mark(&channel);
                }
            });
        }
    }
}

/// Publishes a heartbeat envelope now and then, so that a replica with the same node
/// id notices this one even when no client publishes anything.
async fn heartbeat(node: Weak<ClusterNode>) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(node) = node.upgrade() else { return };
        if node.backbone_connected() == Some(true) {
            node.send_to_cluster(Kind::Heartbeat, "", node.topics.broadcast(), Bytes::new());
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use chorus_hub::{Hub, Identity};
    use chorus_pubsub::local::LocalBus;
    use chorus_pubsub::{Held, PubsubError, held};
    use chorus_rpc::Node as _;

    use super::*;
    use crate::metrics::Metrics;

    /// Refuses the first `refusals` subscriptions as a full adapter queue would, then
    /// accepts; reports each accepted topic.
    struct RefusingBackbone {
        refusals: AtomicUsize,
        subscribed: mpsc::UnboundedSender<String>,
    }

    impl Backbone for RefusingBackbone {
        fn adapter(&self) -> &'static str {
            "refusing"
        }
        fn is_connected(&self) -> bool {
            true
        }
        fn publish(&self, _topic: &str, _payload: Bytes) -> Result<(), PubsubError> {
            Ok(())
        }
        fn subscribe(&self, topic: &str) -> Result<Held, PubsubError> {
            let left = self.refusals.load(Ordering::Acquire);
            if left > 0 {
                self.refusals.store(left - 1, Ordering::Release);
                return Err(PubsubError::Backlogged("refusing"));
            }
            let _ = self.subscribed.send(topic.to_owned());
            Ok(held(true))
        }
        fn unsubscribe(&self, _topic: &str) -> Result<(), PubsubError> {
            Ok(())
        }
    }

    fn metrics() -> Arc<Metrics> {
        Arc::new(Metrics::new("test", &[]).expect("metrics"))
    }

    #[tokio::test]
    async fn a_refused_subscription_is_retried_and_then_confirmed() {
        let metrics = metrics();
        let hub = Arc::new(Hub::new(1 << 16, metrics.clone()));
        let (subscribed, mut accepted) = mpsc::unbounded_channel();
        // The broadcast topic is subscribed at start; the channel's first attempt fails.
        let backbone = Arc::new(RefusingBackbone {
            refusals: AtomicUsize::new(0),
            subscribed,
        });
        let (_incoming_tx, incoming) = mpsc::channel(1);
        let node = ClusterNode::start(
            "node".into(),
            Arc::clone(&hub),
            Some((backbone.clone() as Arc<dyn Backbone>, incoming)),
            Topics::new("test"),
            metrics.pubsub.clone(),
        );
        assert_eq!(accepted.recv().await.as_deref(), Some("test"));

        backbone.refusals.store(1, Ordering::Release);
        let (client, _outbox) = hub.create_client(Identity::default());
        hub.register(&client);
        let Subscribed::Pending(confirmed) = node.subscribe(&client, "items:42") else {
            panic!("the first subscription waits for the backbone");
        };
        let retried = tokio::time::timeout(Duration::from_secs(10), accepted.recv())
            .await
            .expect("the refused subscription is tried again");
        assert_eq!(retried.as_deref(), Some("test/items:42"));
        assert!(confirmed.await, "confirmed once the retry went through");
        assert_eq!(backbone.refusals.load(Ordering::Acquire), 0);
        let (second, _outbox) = hub.create_client(Identity::default());
        assert!(
            matches!(node.subscribe(&second, "items:42"), Subscribed::Cluster),
            "a confirmed channel needs no second round trip"
        );
    }

    #[tokio::test]
    async fn a_twin_node_id_is_noticed_and_its_messages_delivered() {
        let bus = LocalBus::new();
        let start = |bus: &LocalBus| {
            let metrics = metrics();
            let hub = Arc::new(Hub::new(1 << 16, metrics.clone()));
            let (incoming_tx, incoming) = mpsc::channel(16);
            let backbone: Arc<dyn Backbone> = Arc::new(bus.attach(incoming_tx));
            let node = ClusterNode::start(
                "same".into(),
                Arc::clone(&hub),
                Some((backbone, incoming)),
                Topics::new("t"),
                metrics.pubsub.clone(),
            );
            (node, hub, metrics)
        };
        let (a, _, a_metrics) = start(&bus);
        let (b, b_hub, _) = start(&bus);
        let (client, mut outbox) = b_hub.create_client(Identity::default());
        b_hub.register(&client);
        assert!(!b.twin_node_id_seen());
        a.broadcast(Frame::from_static("{}"));
        assert_eq!(
            outbox.next().await,
            chorus_hub::Outgoing::Frame(Frame::from_static("{}")),
            "the twin's broadcast is not mistaken for an echo"
        );
        assert!(b.twin_node_id_seen());
        b.broadcast(Frame::from_static("{}"));
        tokio::time::timeout(Duration::from_secs(10), async {
            while !a.twin_node_id_seen() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("a notices b");
        assert!(a_metrics.render().contains("ws_node_id_conflicts_total 1"));
    }
}
