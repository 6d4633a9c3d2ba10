//! This replica as handlers see it: local delivery through the hub, and the backbone
//! for every other replica (envelopes out, envelopes in, channel interest).

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use chorus_hub::{ClientHandle, Frame, Hub};
use chorus_pubsub::{Backbone, Envelope, Kind, MessageIds, RecentIds, now_ms};
use chorus_rpc::{Delivery, Node};
use tokio::sync::{Notify, mpsc};

use crate::metrics::{BackboneSnapshot, PubsubMetrics};

/// How many recent envelope ids each replica remembers to drop duplicates.
const RECENT_IDS: usize = 65_536;
/// Pause before a refused backbone (un)subscription is tried again.
const INTEREST_RETRY: Duration = Duration::from_millis(200);

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

/// The replica: hub plus (optionally) a backbone.
pub struct ClusterNode {
    node_id: String,
    hub: Arc<Hub>,
    backbone: Option<Arc<dyn Backbone>>,
    topics: Topics,
    ids: MessageIds,
    interest: Arc<InterestChanges>,
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
    /// Builds the node and, with a backbone, starts its receive and interest tasks.
    /// `incoming` is the receiving end of the channel the backbone delivers into.
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

    fn send_to_cluster(&self, kind: Kind, target: &str, topic: &str, frame: &Frame) -> Delivery {
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
            payload: frame.as_bytes().clone(),
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
                self.metrics.published.inc();
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
        // Our own publications come back from the backbone; we delivered them already.
        if envelope.origin == self.node_id || !recent.insert(envelope.id) {
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
}

impl Node for ClusterNode {
    fn broadcast(&self, frame: Frame) -> Delivery {
        self.hub.broadcast(&frame);
        self.send_to_cluster(Kind::Broadcast, "", self.topics.broadcast(), &frame)
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
            &frame,
        )
    }

    fn subscribe(&self, client: &ClientHandle, channel: &str) -> bool {
        let outcome = self.hub.subscribe(client, channel);
        if outcome.first_on_node && self.backbone.is_some() {
            self.interest.mark(channel);
        }
        outcome.added
    }

    fn unsubscribe(&self, client: &ClientHandle, channel: &str) -> bool {
        let outcome = self.hub.unsubscribe(client, channel);
        if outcome.last_on_node && self.backbone.is_some() {
            self.interest.mark(channel);
        }
        outcome.removed
    }
}

async fn receive(node: Arc<ClusterNode>, mut incoming: mpsc::Receiver<Bytes>) {
    let mut recent = RecentIds::new(RECENT_IDS);
    while let Some(bytes) = incoming.recv().await {
        node.deliver_remote(&bytes, &mut recent);
    }
}

/// Keeps the backbone subscribed to exactly the channels that have a local
/// subscriber. It compares the hub's current state with what it holds instead of
/// replaying events, so a subscribe and an unsubscribe racing each other still end in
/// the right state.
async fn reconcile_interest(
    node: std::sync::Weak<ClusterNode>,
    changes: Arc<InterestChanges>,
    backbone: Arc<dyn Backbone>,
) {
    let mut held: HashSet<Arc<str>> = HashSet::new();
    loop {
        changes.wake.notified().await;
        let Some(node) = node.upgrade() else { return };
        let mut failed = Vec::new();
        for channel in changes.take() {
            let wanted = node.hub.has_subscribers(&channel);
            let topic = node.topics.channel(&channel);
            let result = match (wanted, held.contains(&channel)) {
                (true, false) => backbone.subscribe(&topic).map(|()| {
                    held.insert(Arc::clone(&channel));
                }),
                (false, true) => backbone.unsubscribe(&topic).map(|()| {
                    held.remove(&channel);
                }),
                _ => Ok(()),
            };
            if let Err(err) = result {
                node.metrics.errors.inc();
                tracing::warn!(%err, topic, "could not change the backbone subscription; retrying");
                failed.push(channel);
            }
        }
        drop(node);
        // A refused change (the adapter's queue full) is not forgotten: without a
        // retry the channel would stay unsubscribed until its interest changed again.
        if !failed.is_empty() {
            tokio::time::sleep(INTEREST_RETRY).await;
            for channel in failed {
                changes.mark(&channel);
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use chorus_hub::{Hub, Identity};
    use chorus_pubsub::PubsubError;
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
        fn subscribe(&self, topic: &str) -> Result<(), PubsubError> {
            let left = self.refusals.load(Ordering::Acquire);
            if left > 0 {
                self.refusals.store(left - 1, Ordering::Release);
                return Err(PubsubError::Backlogged("refusing"));
            }
            let _ = self.subscribed.send(topic.to_owned());
            Ok(())
        }
        fn unsubscribe(&self, _topic: &str) -> Result<(), PubsubError> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_refused_subscription_is_retried() {
        let metrics = Arc::new(Metrics::new("refusing", &[]).expect("metrics"));
        let hub = Arc::new(Hub::new(16, metrics.clone()));
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
        assert!(node.subscribe(&client, "items:42"));
        let retried = tokio::time::timeout(Duration::from_secs(10), accepted.recv())
            .await
            .expect("the refused subscription is tried again");
        assert_eq!(retried.as_deref(), Some("test/items:42"));
        assert_eq!(
            backbone.refusals.load(Ordering::Acquire),
            0,
            "first attempt was refused"
        );
    }
}
