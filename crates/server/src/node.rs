//! This replica as handlers see it: local delivery through the hub, and the backbone
//! for every other replica (envelopes out, envelopes in, interest in channel, user
//! and device topics and its confirmation, heartbeats that reveal a twin node id),
//! and presence (members, users, lifecycle) through [`Presence`].

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chorus_gate::{DeliveryPolicy, Namespaces, Pattern};
use chorus_hub::{ClientHandle, ClientId, CloseReason, Frame, Hub, Overflow, Tag};
use chorus_pubsub::history::{Appended, Retention};
use chorus_pubsub::presence::{Connection, Member, PresenceError, node_of_client};
use chorus_pubsub::{Backbone, Envelope, Inbox, Kind, MessageIds, RecentIds, now_ms};
use chorus_rpc::{
    Delivery, HistoryPage, HistoryQuery, Node, NodeFuture, Published, Recovery, RpcError,
    StreamPosition, Subscribed, Targets, notification,
};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use tokio::sync::{Notify, oneshot};

use crate::history::{Entry, GAP_WAIT, Histories, Rules, data_of, message_frame};
use crate::lifecycle::{Reason, rfc3339};
use crate::metrics::{BackboneSnapshot, PubsubMetrics};
use crate::presence::{Effects, Presence, timed};

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
/// Most bytes of targets one direct envelope carries (its header holds at most 64 KiB).
const MAX_TARGETS_BYTES: usize = 60 * 1024;
const SHARDS: usize = 32;

/// Topic names for one cluster. The broadcast topic is the prefix itself; a channel's
/// topic is `prefix/channel`; a user's `prefix#u/user`, a device's `prefix#d/device`,
/// a replica's `prefix#n/node_id`; lifecycle events go to `prefix.events`. The prefix
/// holds neither `/` nor `#`, and channel names hold no `#`, so no two of these can be
/// equal, within a cluster or across clusters with other prefixes.
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

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn broadcast(&self) -> &str {
        &self.prefix
    }

    pub fn channel(&self, channel: &str) -> String {
        format!("{}/{channel}", self.prefix)
    }

    pub fn user(&self, user: &str) -> String {
        format!("{}#u/{user}", self.prefix)
    }

    pub fn device(&self, device: &str) -> String {
        format!("{}#d/{device}", self.prefix)
    }

    pub fn node(&self, node_id: &str) -> String {
        format!("{}#n/{node_id}", self.prefix)
    }

    fn of(&self, interest: &Interest) -> String {
        match interest {
            Interest::Channel(channel) => self.channel(channel),
            Interest::User(user) => self.user(user),
            Interest::Device(device) => self.device(device),
        }
    }
}

/// A topic this replica wants while it has a local client for it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Interest {
    Channel(Arc<str>),
    User(Arc<str>),
    Device(Arc<str>),
}

impl Interest {
    fn wanted(&self, hub: &Hub) -> bool {
        match self {
            Self::Channel(channel) => hub.has_subscribers(channel),
            Self::User(user) => hub.has_user(user),
            Self::Device(device) => hub.has_device(device),
        }
    }
}

/// Interests that changed locally and must be reconciled with the backbone. A set,
/// not a queue: bounded by the number of topics, and repeated changes to one topic
/// collapse into one check.
#[derive(Default)]
struct InterestChanges {
    changed: Mutex<HashSet<Interest>>,
    wake: Notify,
}

impl InterestChanges {
    fn mark(&self, interest: Interest) {
        lock(&self.changed).insert(interest);
        self.wake.notify_one();
    }

    fn take(&self) -> Vec<Interest> {
        lock(&self.changed).drain().collect()
    }
}

/// Whether the backbone confirmed a topic, and who waits for it to.
#[derive(Default)]
struct Confirmation {
    /// The backbone connection ([`Backbone::generation`]) that confirmed it.
    generation: Option<u64>,
    waiters: Vec<oneshot::Sender<bool>>,
}

type ConfirmationShard = Mutex<HashMap<Interest, Confirmation>>;

/// Per-topic confirmations, sharded like the hub's channel index.
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

    fn shard(&self, interest: &Interest) -> MutexGuard<'_, HashMap<Interest, Confirmation>> {
        #[allow(clippy::cast_possible_truncation)]
        let index = (self.hasher.hash_one(interest) as usize) % SHARDS;
        lock(&self.shards[index])
    }

    /// Records the backbone's answer for `interest` and passes it to every waiter.
    fn settle(&self, interest: &Interest, generation: u64, held: bool) {
        let mut shard = self.shard(interest);
        if let Some(confirmation) = shard.get_mut(interest) {
            if held {
                confirmation.generation = Some(generation);
            }
            for waiter in confirmation.waiters.drain(..) {
                let _ = waiter.send(held);
            }
        }
    }

    fn needs_answer(&self, interest: &Interest, generation: u64) -> bool {
        self.shard(interest)
            .get(interest)
            .is_some_and(|c| !c.waiters.is_empty() || c.generation != Some(generation))
    }

    fn forget(&self, interest: &Interest) {
        if let Some(confirmation) = self.shard(interest).remove(interest) {
            for waiter in confirmation.waiters {
                let _ = waiter.send(false);
            }
        }
    }
}

/// Who a direct envelope is for, as its target field carries it.
#[derive(Default, Serialize, Deserialize)]
struct DirectTargets {
    #[serde(default, rename = "u", skip_serializing_if = "Vec::is_empty")]
    users: Vec<String>,
    #[serde(default, rename = "d", skip_serializing_if = "Vec::is_empty")]
    devices: Vec<String>,
    #[serde(default, rename = "c", skip_serializing_if = "Vec::is_empty")]
    clients: Vec<String>,
}

/// What a direct envelope asks of the connections it names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DirectAction {
    Deliver,
    Kick,
    Replace,
}

impl DirectAction {
    fn kind(self) -> Kind {
        match self {
            Self::Deliver => Kind::Direct,
            Self::Kick => Kind::Kick,
            Self::Replace => Kind::Replace,
        }
    }

    fn close(self) -> Option<CloseReason> {
        match self {
            Self::Deliver => None,
            Self::Kick => Some(CloseReason::Kicked),
            Self::Replace => Some(CloseReason::Replaced),
        }
    }
}

/// What [`ClusterNode::start`] is given.
pub struct NodeParts {
    pub node_id: String,
    pub hub: Arc<Hub>,
    /// The backbone and the receiver its inbox delivers to.
    pub backbone: Option<(Arc<dyn Backbone>, NodeReceiver)>,
    pub topics: Topics,
    pub metrics: PubsubMetrics,
    pub namespaces: Namespaces,
    /// Starts presence for the node (given as the effects presence needs).
    pub presence: Box<dyn FnOnce(Weak<dyn Effects>) -> Arc<Presence> + Send>,
    pub history: Arc<Histories>,
}

/// The replica: hub, presence, and (optionally) a backbone.
pub struct ClusterNode {
    /// Itself, for futures that act later.
    me: Weak<ClusterNode>,
    node_id: String,
    hub: Arc<Hub>,
    backbone: Option<Arc<dyn Backbone>>,
    topics: Topics,
    ids: MessageIds,
    /// Ids of envelopes received lately: one envelope may arrive on several topics
    /// (a user's and a device's), and so on several receive workers.
    recent: Mutex<RecentIds>,
    interest: Arc<InterestChanges>,
    confirmations: Confirmations,
    namespaces: Namespaces,
    presence: Arc<Presence>,
    history: Arc<Histories>,
    /// The token's `info` of each local client that has one; the rest of a client as
    /// a channel member is its own identity (no copy per connection).
    infos: Mutex<HashMap<ClientId, Box<RawValue>>>,
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
    /// Builds the node and starts presence and, with a backbone, its receive, interest
    /// and heartbeat tasks.
    pub fn start(parts: NodeParts) -> Arc<Self> {
        let NodeParts {
            node_id,
            hub,
            backbone,
            topics,
            metrics,
            namespaces,
            presence,
            history,
        } = parts;
        let (backbone, receiver) = backbone.map_or((None, None), |(b, rx)| (Some(b), Some(rx)));
        let node = Arc::new_cyclic(|me: &Weak<Self>| {
            let effects: Weak<dyn Effects> = me.clone();
            Self {
                me: me.clone(),
                node_id,
                hub,
                backbone,
                topics,
                ids: MessageIds::new(),
                recent: Mutex::new(RecentIds::new(RECENT_IDS)),
                interest: Arc::default(),
                confirmations: Confirmations::new(),
                namespaces,
                presence: presence(effects),
                history,
                infos: Mutex::default(),
                twin_seen_ms: AtomicU64::new(0),
                started: Instant::now(),
                metrics,
            }
        });
        if let (Some(backbone), Some(receiver)) = (&node.backbone, receiver) {
            // Before the first subscription, so before anything can arrive.
            receiver.attach(&node);
            for topic in [
                node.topics.broadcast().to_owned(),
                node.topics.node(&node.node_id),
            ] {
                if let Err(err) = backbone.subscribe(&topic) {
                    tracing::error!(%err, topic, "could not subscribe on the backbone");
                    node.metrics.errors.inc();
                }
            }
            tokio::spawn(reconcile_interest(
                Arc::downgrade(&node),
                Arc::clone(&node.interest),
                Arc::clone(backbone),
            ));
            tokio::spawn(heartbeat(Arc::downgrade(&node)));
        }
        tokio::spawn(fill_gaps(Arc::downgrade(&node)));
        node
    }

    pub fn history(&self) -> &Histories {
        &self.history
    }

    /// The overflow policy of `channel`'s namespace, for its frames.
    pub(crate) fn overflow(&self, channel: &str) -> Overflow {
        match self.namespaces.of(channel).delivery {
            DeliveryPolicy::Disconnect => Overflow::Disconnect,
            DeliveryPolicy::DropOldest => Overflow::DropOldest,
            DeliveryPolicy::Latest => Overflow::Latest,
        }
    }

    /// `channel`'s retention, from its namespace.
    fn retention(&self, channel: &str) -> Retention {
        let options = self.namespaces.of(channel);
        Retention {
            size: options.history_size,
            ttl: options.history_ttl,
        }
    }

    /// Tags a channel's frame with its overflow policy, when that is not the default.
    fn tagged(&self, channel: &str, frame: Frame) -> Frame {
        match self.overflow(channel) {
            Overflow::Disconnect => frame,
            overflow => frame.with_tag(Tag {
                channel: Arc::from(channel),
                offset: 0,
                overflow,
            }),
        }
    }

    /// Sends a frame to `channel`'s subscribers here and on every replica (no
    /// history, no order beyond the backbone's).
    fn publish_frame(&self, channel: &str, frame: Frame) -> Delivery {
        let frame = self.tagged(channel, frame);
        let delivery = self.frame_to_cluster(Kind::Channel, channel, &frame, || {
            self.topics.channel(channel)
        });
        self.hub.publish(channel, &frame);
        delivery
    }

    /// A history channel's publication: the store gives it its offset, then it is
    /// delivered here in order and sent to the others with its position.
    fn publish_history(
        &self,
        channel: &str,
        data: &RawValue,
        idempotency_key: Option<&str>,
    ) -> NodeFuture<Option<StreamPosition>> {
        let me = self.me.clone();
        let channel = channel.to_owned();
        let data = Bytes::copy_from_slice(data.get().as_bytes());
        let key = idempotency_key.map(str::to_owned);
        let retention = self.retention(&channel);
        let history = Arc::clone(&self.history);
        Box::pin(async move {
            let appended = history
                .append(&channel, &data, retention, key.as_deref())
                .await?;
            let Appended {
                position,
                duplicate,
            } = appended;
            let answer = StreamPosition {
                offset: position.offset,
                epoch: position.epoch.clone(),
            };
            if duplicate {
                return Ok(Some(answer));
            }
            let Some(node) = me.upgrade() else {
                return Ok(Some(answer));
            };
            let frame = message_frame(&channel, position.offset, &data, node.overflow(&channel));
            if node.backbone.is_some() {
                let mut envelope =
                    node.envelope(Kind::Channel, channel.clone(), frame.as_bytes().clone());
                envelope.position = Some((position.offset, position.epoch.clone()));
                if node.send_to_cluster(&envelope, &[node.topics.channel(&channel)])
                    == Delivery::LocalOnly
                {
                    node.history.sequences().deliver(
                        &node.hub,
                        &channel,
                        &position.epoch,
                        Entry {
                            offset: position.offset,
                            data,
                            frame,
                        },
                    );
                    return Err(RpcError::delivered_locally());
                }
            }
            node.history.sequences().deliver(
                &node.hub,
                &channel,
                &position.epoch,
                Entry {
                    offset: position.offset,
                    data,
                    frame,
                },
            );
            Ok(Some(answer))
        })
    }

    /// A publication with an idempotency key on a channel without history: delivered
    /// the first time the key is used within its time only.
    fn publish_once(
        &self,
        channel: &str,
        data: &RawValue,
        key: &str,
    ) -> NodeFuture<Option<StreamPosition>> {
        let me = self.me.clone();
        let channel = channel.to_owned();
        let key = key.to_owned();
        let frame = notification::channel_message(&channel, data);
        let history = Arc::clone(&self.history);
        Box::pin(async move {
            if !history.first_time(&channel, &key).await? {
                return Ok(None);
            }
            let Some(node) = me.upgrade() else {
                return Ok(None);
            };
            match node.publish_frame(&channel, frame) {
                Delivery::Cluster => Ok(None),
                Delivery::LocalOnly => Err(RpcError::delivered_locally()),
            }
        })
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    pub fn presence(&self) -> &Presence {
        &self.presence
    }

    /// The cluster-unique id of a local client: `"<node_id>/<n>"`.
    pub fn client_id(&self, client: ClientId) -> String {
        format!("{}/{client}", self.node_id)
    }

    /// `Some(connected)` when a backbone is configured, `None` when standalone.
    pub fn backbone_connected(&self) -> Option<bool> {
        self.backbone
            .as_ref()
            .map(|backbone| backbone.is_connected())
    }

    /// `Some(connected)` per backbone server (shard), in configured order; `None` when
    /// standalone.
    pub fn backbone_shards(&self) -> Option<Vec<bool>> {
        self.backbone
            .as_ref()
            .map(|backbone| backbone.shards_connected())
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
                shards: 1,
                shards_connected: 1,
                dropped_published: 0,
                dropped_received: 0,
            },
            |backbone| {
                let shards = backbone.shards_connected();
                BackboneSnapshot {
                    connected: backbone.is_connected(),
                    shards: shards.len(),
                    shards_connected: shards.iter().filter(|up| **up).count(),
                    dropped_published: backbone.dropped_published(),
                    dropped_received: backbone.dropped_received(),
                }
            },
        )
    }

    /// Makes a registered client known to the cluster: its user's and device's topics
    /// and its presence record. Resolves once the backbone holds those topics and the
    /// store has the record (each wait bounded), so that a `send` made anywhere after
    /// that reaches it.
    pub fn connect(
        &self,
        client: &ClientHandle,
        connection: Connection,
    ) -> impl Future<Output = ()> + Send + use<> {
        if let Some(info) = &connection.info {
            lock(&self.infos).insert(client.id(), info.clone());
        }
        let identity = client.identity();
        let mut waits: Vec<std::pin::Pin<Box<dyn Future<Output = bool> + Send>>> = Vec::new();
        for interest in [
            identity.user.clone().map(Interest::User),
            identity.device.clone().map(Interest::Device),
        ]
        .into_iter()
        .flatten()
        {
            if let Subscribed::Pending(wait) = self.hold(interest) {
                waits.push(wait);
            }
        }
        let recorded = self.presence.connect(connection);
        async move {
            let _ = recorded.await;
            futures_util::future::join_all(waits).await;
        }
    }

    /// Removes a disconnected client: from the hub, from the cluster's interest, from
    /// presence, and from its channels (`sys.leave` where the namespace asks).
    pub fn disconnect(&self, client: &ClientHandle, reason: Reason) {
        let channels = client.subscriptions();
        let member = (!channels.is_empty()).then(|| self.member(client));
        lock(&self.infos).remove(&client.id());
        for channel in &channels {
            self.history.sequences().forget(channel, client);
        }
        for channel in self.hub.remove(client) {
            self.history.sequences().unfollow(&channel);
            self.interest.mark(Interest::Channel(channel));
        }
        let identity = client.identity();
        if let Some(user) = &identity.user {
            self.interest.mark(Interest::User(Arc::clone(user)));
        }
        if let Some(device) = &identity.device {
            self.interest.mark(Interest::Device(Arc::clone(device)));
        }
        for channel in &channels {
            self.presence.count_changed(channel);
            if let Some(member) = &member
                && self.namespaces.of(channel).join_leave
            {
                self.publish_frame(channel, join_leave("sys.leave", channel, member));
            }
        }
        self.presence
            .disconnect(self.client_id(client.id()), reason);
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

    /// Makes sure the backbone holds `interest`'s topic: at once when it already
    /// does, else a future that says when it does.
    fn hold(&self, interest: Interest) -> Subscribed {
        let Some(backbone) = &self.backbone else {
            return Subscribed::Cluster;
        };
        // With several shards, only the one that carries this topic matters.
        let topic = self.topics.of(&interest);
        if !backbone.topic_connected(&topic) {
            // Taken as soon as the backbone is back.
            self.interest.mark(interest);
            return Subscribed::LocalOnly;
        }
        let generation = backbone.topic_generation(&topic);
        let (waiter, answer) = oneshot::channel();
        {
            let mut shard = self.confirmations.shard(&interest);
            let confirmation = shard.entry(interest.clone()).or_default();
            if confirmation.generation == Some(generation) {
                return Subscribed::Cluster;
            }
            confirmation.waiters.push(waiter);
            if confirmation.waiters.len() > 1 {
                // The backbone is being asked already; its answer serves everyone.
                return Subscribed::Pending(pending(answer));
            }
        }
        self.interest.mark(interest);
        Subscribed::Pending(pending(answer))
    }

    fn envelope(&self, kind: Kind, target: String, payload: Bytes) -> Envelope {
        Envelope {
            id: self.ids.next_id(),
            origin: self.node_id.clone(),
            origin_ts_ms: now_ms(),
            kind,
            target,
            payload,
            position: None,
        }
    }

    /// Sends `frame` to the other replicas as a `kind` envelope for `target` on
    /// `topic()`, when there is a backbone. Called before the local fan-out: the
    /// backbone's publisher task then runs before the local clients' tasks woken by the
    /// fan-out, instead of queueing behind them.
    fn frame_to_cluster(
        &self,
        kind: Kind,
        target: &str,
        frame: &Frame,
        topic: impl FnOnce() -> String,
    ) -> Delivery {
        if self.backbone.is_none() {
            return Delivery::Cluster;
        }
        let envelope = self.envelope(kind, target.to_owned(), frame.as_bytes().clone());
        self.send_to_cluster(&envelope, &[topic()])
    }

    /// Publishes one envelope on every topic in `topics` (receivers drop the copies).
    fn send_to_cluster(&self, envelope: &Envelope, topics: &[String]) -> Delivery {
        let Some(backbone) = &self.backbone else {
            return Delivery::Cluster;
        };
        if !topics.iter().any(|topic| backbone.topic_connected(topic)) {
            self.metrics.errors.inc();
            return Delivery::LocalOnly;
        }
        let bytes = match envelope.encode() {
            Ok(bytes) => bytes,
            Err(err) => {
                self.metrics.errors.inc();
                tracing::warn!(%err, "cannot encode an envelope");
                return Delivery::LocalOnly;
            }
        };
        let mut delivery = Delivery::Cluster;
        for topic in topics {
            match backbone.publish(topic, bytes.clone()) {
                Ok(()) => {
                    if envelope.kind != Kind::Heartbeat {
                        self.metrics.published.inc();
                    }
                }
                Err(err) => {
                    self.metrics.errors.inc();
                    tracing::debug!(%err, topic, "publication stayed local");
                    delivery = Delivery::LocalOnly;
                }
            }
        }
        delivery
    }

    /// The local clients `targets` names, each once.
    fn local_targets(&self, targets: &DirectTargets) -> Vec<ClientHandle> {
        let mut found: HashMap<ClientId, ClientHandle> = HashMap::new();
        for user in &targets.users {
            for client in self.hub.clients_of_user(user) {
                found.insert(client.id(), client);
            }
        }
        for device in &targets.devices {
            for client in self.hub.clients_of_device(device) {
                found.insert(client.id(), client);
            }
        }
        for client_id in &targets.clients {
            if let Some((node, number)) = client_id.rsplit_once('/')
                && node == self.node_id
                && let Ok(number) = number.parse::<ClientId>()
                && let Some(client) = self.hub.client(number)
            {
                found.insert(client.id(), client);
            }
        }
        found.into_values().collect()
    }

    /// Delivers `frame` to the local clients `targets` names, then closes them if
    /// `action` says so. Returns how many there were.
    fn act_locally(&self, action: DirectAction, targets: &DirectTargets, frame: &Frame) -> usize {
        let clients = self.local_targets(targets);
        for client in &clients {
            let _ = client.send(frame.clone());
            if let Some(reason) = action.close() {
                client.close(reason);
            }
        }
        clients.len()
    }

    /// Acts on the targets here and on every replica that may hold one of them: the
    /// users' and devices' topics (only replicas with such a client listen) and the
    /// replicas named in client ids.
    fn direct(
        &self,
        action: DirectAction,
        targets: &DirectTargets,
        frame: &Frame,
    ) -> Result<(usize, Delivery), RpcError> {
        let target = serde_json::to_string(targets).unwrap_or_default();
        if target.len() > MAX_TARGETS_BYTES {
            return Err(RpcError::invalid_params(
                "too many targets for one call: split it",
            ));
        }
        let local = self.act_locally(action, targets, frame);
        if self.backbone.is_none() {
            return Ok((local, Delivery::Cluster));
        }
        let mut topics: Vec<String> = targets
            .users
            .iter()
            .map(|user| self.topics.user(user))
            .chain(
                targets
                    .devices
                    .iter()
                    .map(|device| self.topics.device(device)),
            )
            .collect();
        let nodes: HashSet<&str> = targets
            .clients
            .iter()
            .filter_map(|client_id| node_of_client(client_id))
            .filter(|node| *node != self.node_id)
            .collect();
        topics.extend(nodes.into_iter().map(|node| self.topics.node(node)));
        if topics.is_empty() {
            return Ok((local, Delivery::Cluster));
        }
        let envelope = self.envelope(action.kind(), target, frame.as_bytes().clone());
        Ok((local, self.send_to_cluster(&envelope, &topics)))
    }

    /// `send` and `kick`: counts the targets in the store, then acts everywhere (in
    /// this order: a kick's disconnections must not shrink its own count).
    fn direct_counted(
        &self,
        action: DirectAction,
        targets: Targets,
        frame: Frame,
    ) -> NodeFuture<u64> {
        let direct = DirectTargets {
            users: targets.users,
            devices: targets.devices,
            clients: targets.clients,
        };
        let me = self.me.clone();
        let store = Arc::clone(self.presence.store());
        Box::pin(async move {
            let counted =
                timed(store.count_targets(&direct.users, &direct.devices, &direct.clients)).await;
            let node = me.upgrade().ok_or_else(|| {
                RpcError::with_detail(chorus_rpc::ErrorCode::Unavailable, "shutting down")
            })?;
            let (local, delivery) = node.direct(action, &direct, &frame)?;
            if delivery == Delivery::LocalOnly {
                return Err(RpcError::delivered_locally());
            }
            match counted {
                Ok(count) => Ok(count),
                Err(error) => {
                    // Delivered all the same; only the count is this replica's own.
                    tracing::debug!(%error, "cannot count targets in the presence store");
                    Ok(local as u64)
                }
            }
        })
    }

    /// Delivers an envelope that came from another replica.
    fn deliver_remote(&self, bytes: &Bytes) {
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
        if !lock(&self.recent).insert(envelope.id) {
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
        let action = match envelope.kind {
            Kind::Broadcast => {
                self.hub.broadcast(&frame);
                None
            }
            Kind::Channel => {
                let channel = envelope.target.as_str();
                match (&envelope.position, data_of(&frame)) {
                    (Some((offset, epoch)), Some(data)) => {
                        let frame = frame.with_tag(Tag {
                            channel: Arc::from(channel),
                            offset: *offset,
                            overflow: self.overflow(channel),
                        });
                        self.history.sequences().deliver(
                            &self.hub,
                            channel,
                            epoch,
                            Entry {
                                offset: *offset,
                                data,
                                frame,
                            },
                        );
                    }
                    _ => {
                        self.hub
                            .publish(channel, &self.tagged(channel, frame.clone()));
                    }
                }
                None
            }
            Kind::Direct => Some(DirectAction::Deliver),
            Kind::Kick => Some(DirectAction::Kick),
            Kind::Replace => Some(DirectAction::Replace),
            other => {
                tracing::debug!(
                    ?other,
                    "ignoring an envelope kind this replica does not handle"
                );
                None
            }
        };
        if let Some(action) = action {
            match serde_json::from_str::<DirectTargets>(&envelope.target) {
                Ok(targets) => {
                    self.act_locally(action, &targets, &frame);
                }
                Err(err) => {
                    self.metrics.errors.inc();
                    tracing::warn!(%err, origin = envelope.origin, "dropping a direct envelope with unreadable targets");
                }
            }
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

    fn member(&self, client: &ClientHandle) -> Member {
        let identity = client.identity();
        Member {
            client_id: self.client_id(client.id()),
            node_id: self.node_id.clone(),
            user: identity.user.as_deref().map(str::to_owned),
            device: identity.device.as_deref().map(str::to_owned),
            info: lock(&self.infos).get(&client.id()).cloned(),
        }
    }

    fn read<T: Send + 'static>(
        &self,
        read: impl FnOnce(Arc<dyn chorus_pubsub::presence::PresenceStore>) -> NodeFuture<T>,
    ) -> NodeFuture<T> {
        let store = Arc::clone(self.presence.store());
        if let Some(problem) = store.problem() {
            return Box::pin(std::future::ready(Err(RpcError::presence_unavailable(
                problem,
            ))));
        }
        read(store)
    }
}

/// `sys.join` / `sys.leave` params.
fn join_leave(method: &str, channel: &str, member: &Member) -> Frame {
    #[derive(Serialize)]
    struct Params<'a> {
        channel: &'a str,
        client_id: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        user: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        device: Option<&'a str>,
    }
    notification::value(
        method,
        &Params {
            channel,
            client_id: &member.client_id,
            user: member.user.as_deref(),
            device: member.device.as_deref(),
        },
    )
}

fn unavailable(error: &PresenceError) -> RpcError {
    RpcError::presence_unavailable(error)
}

impl ClusterNode {
    /// `subscribe`; `park` keeps live publications for the client until
    /// `release_parked` (history channels hold them until the recovery's `join`).
    fn subscribe_as(
        &self,
        client: &ClientHandle,
        channel: &str,
        since: Option<StreamPosition>,
        park: bool,
    ) -> Subscribed {
        let options = self.namespaces.of(channel);
        let history = options.history_size > 0;
        let outcome = if history {
            self.hub.subscribe_held(client, channel)
        } else if park {
            self.hub.subscribe_parked(client, channel)
        } else {
            self.hub.subscribe(client, channel)
        };
        let mut joined = None;
        if outcome.added {
            self.presence.count_changed(channel);
            if options.presence || options.join_leave {
                let member = self.member(client);
                if options.join_leave {
                    let frame = join_leave("sys.join", channel, &member);
                    self.hub.publish_except(channel, &frame, client.id());
                    if self.backbone.is_some() {
                        let envelope = self.envelope(
                            Kind::Channel,
                            channel.to_owned(),
                            frame.as_bytes().clone(),
                        );
                        self.send_to_cluster(&envelope, &[self.topics.channel(channel)]);
                    }
                }
                joined = Some(self.presence.join(channel, member));
            }
        }
        let held = self.hold(Interest::Channel(Arc::from(channel)));
        if history {
            if !outcome.added {
                // Subscribed already: where the channel stands, nothing to recover.
                let position = self.history.sequences().position(channel);
                let history = Arc::clone(&self.history);
                let channel = channel.to_owned();
                return Subscribed::History(Box::pin(async move {
                    let position = match position {
                        Some((epoch, offset)) => StreamPosition { offset, epoch },
                        None => {
                            let position =
                                crate::history::timed(history.store().position(&channel))
                                    .await
                                    .map_err(|error| RpcError::history_unavailable(&error))?;
                            StreamPosition {
                                offset: position.offset,
                                epoch: position.epoch,
                            }
                        }
                    };
                    Ok(Recovery {
                        position,
                        recovered: false,
                        publications: Vec::new(),
                        join: Box::new(|| {}),
                    })
                }));
            }
            // Publications that arrive from now on are kept until the store read says
            // where the channel stands; the backbone holds the channel before the store
            // is read, so that every publication after the read reaches this replica.
            self.history
                .sequences()
                .prepare(channel, self.history.recovery_max());
            let ready: std::pin::Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(async move {
                if let Some(joined) = joined {
                    let _ = joined.await;
                }
                if let Subscribed::Pending(wait) = held {
                    wait.await;
                }
            });
            let recovery = self.history.recover_for(
                Arc::clone(&self.hub),
                client.clone(),
                channel,
                since,
                Rules {
                    overflow: self.overflow(channel),
                    retention: self.retention(channel),
                },
                ready,
            );
            let me = self.me.clone();
            let client = client.clone();
            let channel = channel.to_owned();
            return Subscribed::History(Box::pin(async move {
                match recovery.await {
                    Ok(recovery) => Ok(recovery),
                    Err(error) => {
                        // Not subscribed after all: the client may try again.
                        if let Some(node) = me.upgrade() {
                            node.unsubscribe(&client, &channel);
                        }
                        Err(error)
                    }
                }
            }));
        }
        match (joined, held) {
            (None, held) => held,
            (Some(joined), held) => Subscribed::Pending(Box::pin(async move {
                let _ = joined.await;
                match held {
                    Subscribed::Cluster => true,
                    Subscribed::LocalOnly => false,
                    Subscribed::Pending(wait) => wait.await,
                    Subscribed::History(_) => true,
                }
            })),
        }
    }
}

impl Node for ClusterNode {
    fn broadcast(&self, frame: Frame) -> Delivery {
        let delivery = self.frame_to_cluster(Kind::Broadcast, "", &frame, || {
            self.topics.broadcast().to_owned()
        });
        self.hub.broadcast(&frame);
        delivery
    }

    fn publish(&self, channel: &str, data: &RawValue, idempotency_key: Option<&str>) -> Published {
        if self.namespaces.of(channel).history_size > 0 {
            return Published::Later(self.publish_history(channel, data, idempotency_key));
        }
        if let Some(key) = idempotency_key {
            return Published::Later(self.publish_once(channel, data, key));
        }
        Published::Now(self.publish_frame(channel, notification::channel_message(channel, data)))
    }

    fn subscribe(
        &self,
        client: &ClientHandle,
        channel: &str,
        since: Option<StreamPosition>,
    ) -> Subscribed {
        self.subscribe_as(client, channel, since, false)
    }

    fn subscribe_parked(
        &self,
        client: &ClientHandle,
        channel: &str,
        since: Option<StreamPosition>,
    ) -> Subscribed {
        self.subscribe_as(client, channel, since, true)
    }

    fn release_parked(&self, client: &ClientHandle, channel: &str, first: Option<Frame>) -> bool {
        self.hub.release_parked(client, channel, first)
    }

    fn keeps_history(&self, channel: &str) -> bool {
        self.namespaces.of(channel).history_size > 0
    }

    fn history(&self, channel: &str, query: HistoryQuery) -> NodeFuture<HistoryPage> {
        let history = Arc::clone(&self.history);
        let channel = channel.to_owned();
        let retention = self.retention(&channel);
        Box::pin(async move { history.read(&channel, query, retention).await })
    }

    fn unsubscribe(&self, client: &ClientHandle, channel: &str) -> bool {
        let outcome = self.hub.unsubscribe(client, channel);
        if !outcome.removed {
            return false;
        }
        self.presence.count_changed(channel);
        self.history.sequences().forget(channel, client);
        if outcome.last_on_node {
            self.history.sequences().unfollow(channel);
            if self.backbone.is_some() {
                self.interest.mark(Interest::Channel(Arc::from(channel)));
            }
        }
        let options = self.namespaces.of(channel);
        if options.presence || options.join_leave {
            let member = self.member(client);
            if options.join_leave {
                self.publish_frame(channel, join_leave("sys.leave", channel, &member));
            }
            self.presence.leave(channel, member.client_id);
        }
        true
    }

    fn send(&self, targets: Targets, frame: Frame) -> NodeFuture<u64> {
        self.direct_counted(DirectAction::Deliver, targets, frame)
    }

    fn kick(&self, targets: Targets, frame: Frame) -> NodeFuture<u64> {
        self.direct_counted(DirectAction::Kick, targets, frame)
    }

    fn presence(&self, channel: &str, limit: usize, cursor: Option<&str>) -> NodeFuture<String> {
        let channel = channel.to_owned();
        let cursor = cursor.map(str::to_owned);
        self.read(move |store| {
            Box::pin(async move {
                let page = timed(store.page(&channel, limit, cursor.as_deref()))
                    .await
                    .map_err(|error| unavailable(&error))?;
                #[derive(Serialize)]
                struct Wire<'a> {
                    clients: &'a [Member],
                    #[serde(skip_serializing_if = "Option::is_none")]
                    cursor: Option<&'a str>,
                }
                serde_json::to_string(&Wire {
                    clients: &page.members,
                    cursor: page.cursor.as_deref(),
                })
                .map_err(|_| RpcError::new(chorus_rpc::ErrorCode::Internal))
            })
        })
    }

    fn presence_stats(&self, channel: &str) -> NodeFuture<String> {
        let channel = channel.to_owned();
        self.read(move |store| {
            Box::pin(async move {
                let stats = timed(store.stats(&channel))
                    .await
                    .map_err(|error| unavailable(&error))?;
                Ok(format!(
                    r#"{{"clients":{},"users":{}}}"#,
                    stats.clients, stats.users
                ))
            })
        })
    }

    fn info(&self, user: Option<&str>) -> NodeFuture<String> {
        let user = user.map(str::to_owned);
        self.read(move |store| {
            Box::pin(async move {
                let value = match user {
                    Some(user) => {
                        let connections = timed(store.user(&user))
                            .await
                            .map_err(|error| unavailable(&error))?;
                        let devices: Vec<serde_json::Value> = connections
                            .iter()
                            .map(|c| {
                                serde_json::json!({
                                    "device": c.device,
                                    "client_id": c.client_id,
                                    "node_id": c.node_id,
                                    "connected_at": rfc3339(c.connected_at_ms),
                                    "remote_addr": c.remote_addr,
                                    "info": c.info,
                                })
                            })
                            .collect();
                        serde_json::json!({"online": !devices.is_empty(), "devices": devices})
                    }
                    None => {
                        let nodes = timed(store.nodes())
                            .await
                            .map_err(|error| unavailable(&error))?;
                        let now = now_ms();
                        let nodes: Vec<serde_json::Value> = nodes
                            .iter()
                            .map(|n| {
                                serde_json::json!({
                                    "node_id": n.node_id,
                                    "connections": n.connections,
                                    "uptime_s": now.saturating_sub(n.started_at_ms) / 1000,
                                })
                            })
                            .collect();
                        serde_json::json!({ "nodes": nodes })
                    }
                };
                Ok(value.to_string())
            })
        })
    }

    fn channels(&self, pattern: Option<Pattern>) -> NodeFuture<String> {
        self.read(move |store| {
            Box::pin(async move {
                let channels = timed(store.channels())
                    .await
                    .map_err(|error| unavailable(&error))?;
                let listed: Vec<serde_json::Value> = channels
                    .iter()
                    .filter(|(channel, _)| pattern.as_ref().is_none_or(|p| p.matches(channel)))
                    .map(|(channel, clients)| serde_json::json!({"channel": channel, "clients": clients}))
                    .collect();
                Ok(serde_json::json!({ "channels": listed }).to_string())
            })
        })
    }
}

impl Effects for ClusterNode {
    fn replace(&self, connections: &[Connection]) {
        let frame = notification::value(
            "sys.replaced",
            &serde_json::json!({ "node_id": self.node_id }),
        );
        let targets = DirectTargets {
            clients: connections.iter().map(|c| c.client_id.clone()).collect(),
            ..DirectTargets::default()
        };
        if let Err(error) = self.direct(DirectAction::Replace, &targets, &frame) {
            tracing::warn!(%error, "could not replace older connections of a device");
        }
    }

    fn member_lost(&self, channel: &str, member: &Connection) {
        if self.namespaces.of(channel).join_leave {
            self.publish_frame(channel, join_leave("sys.leave", channel, &member.member()));
        }
    }

    fn subscriber_count(&self, channel: &str) -> u64 {
        self.hub.subscriber_count(channel) as u64
    }

    fn channel_counts(&self) -> Vec<(String, u64)> {
        self.hub
            .channel_counts()
            .into_iter()
            .map(|(channel, count)| (channel.to_string(), count as u64))
            .collect()
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

/// Where the backbone delivers: the node, once it exists. The backbone is connected
/// before the node is built, and nothing arrives before the node's first subscription.
#[derive(Clone, Default)]
pub struct NodeReceiver(Arc<OnceLock<Weak<ClusterNode>>>);

impl NodeReceiver {
    /// The inbox to hand the backbone; `buffer` messages may wait for a busy worker.
    pub fn inbox(&self, buffer: usize) -> Inbox {
        let receiver = self.clone();
        Inbox::new(move |bytes: Bytes| {
            if let Some(node) = receiver.0.get().and_then(Weak::upgrade) {
                node.deliver_remote(&bytes);
            }
        })
        .buffer(buffer)
    }

    fn attach(&self, node: &Arc<ClusterNode>) {
        let _ = self.0.set(Arc::downgrade(node));
    }
}

/// Keeps the backbone subscribed to exactly the topics that have a local client, and
/// answers the subscriptions waiting for the backbone. It compares the hub's current
/// state with what it holds instead of replaying events, so a subscribe and an
/// unsubscribe racing each other still end in the right state.
async fn reconcile_interest(
    node: Weak<ClusterNode>,
    changes: Arc<InterestChanges>,
    backbone: Arc<dyn Backbone>,
) {
    let mut held: HashSet<Interest> = HashSet::new();
    let mut answers = FuturesUnordered::new();
    loop {
        let settled: Option<(Interest, u64, bool)> = tokio::select! {
            () = changes.wake.notified() => None,
            Some(settled) = answers.next(), if !answers.is_empty() => Some(settled),
        };
        let Some(node) = node.upgrade() else { return };
        if let Some((interest, generation, confirmed)) = settled {
            node.confirmations.settle(&interest, generation, confirmed);
            continue;
        }
        let mut failed = Vec::new();
        for interest in changes.take() {
            let wanted = interest.wanted(&node.hub);
            let topic = node.topics.of(&interest);
            let generation = backbone.topic_generation(&topic);
            if wanted
                && (!held.contains(&interest)
                    || node.confirmations.needs_answer(&interest, generation))
            {
                match backbone.subscribe(&topic) {
                    Ok(answer) => {
                        held.insert(interest.clone());
                        answers.push(async move {
                            (interest, generation, answer.await.unwrap_or(false))
                        });
                    }
                    Err(err) => {
                        node.metrics.errors.inc();
                        tracing::warn!(%err, topic, "could not subscribe on the backbone; retrying");
                        failed.push(interest);
                    }
                }
            } else if !wanted && held.contains(&interest) {
                node.confirmations.forget(&interest);
                match backbone.unsubscribe(&topic) {
                    Ok(()) => {
                        held.remove(&interest);
                    }
                    Err(err) => {
                        node.metrics.errors.inc();
                        tracing::warn!(%err, topic, "could not unsubscribe on the backbone; retrying");
                        failed.push(interest);
                    }
                }
            }
        }
        drop(node);
        // A refused change (the adapter's queue full) is not forgotten: without a
        // retry the topic would stay unsubscribed until its interest changed again.
        if !failed.is_empty() {
            let changes = Arc::clone(&changes);
            tokio::spawn(async move {
                tokio::time::sleep(INTEREST_RETRY).await;
                for interest in failed {
                    changes.mark(interest);
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
        let broadcast = node.topics.broadcast();
        if node
            .backbone
            .as_ref()
            .is_some_and(|backbone| backbone.topic_connected(broadcast))
        {
            let envelope = node.envelope(Kind::Heartbeat, String::new(), Bytes::new());
            node.send_to_cluster(&envelope, &[node.topics.broadcast().to_owned()]);
        }
    }
}

/// Closes the gaps of history channels that waited too long for the backbone: their
/// missing publications are read from the store.
async fn fill_gaps(node: Weak<ClusterNode>) {
    let mut tick = tokio::time::interval(GAP_WAIT / 5);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(node) = node.upgrade() else { return };
        for gap in node.history.sequences().gaps(GAP_WAIT) {
            let filler = Arc::clone(&node);
            tokio::spawn(async move {
                let overflow = filler.overflow(&gap.channel);
                let retention = filler.retention(&gap.channel);
                filler
                    .history
                    .fill(&filler.hub, gap, overflow, retention)
                    .await;
            });
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
    use tokio::sync::mpsc;

    use super::*;
    use crate::lifecycle::Lifecycle;
    use crate::metrics::Metrics;
    use crate::presence::PresenceSettings;

    /// History in this process, for a node under test.
    fn memory_history(metrics: &Metrics) -> Arc<Histories> {
        Arc::new(Histories::new(
            Arc::new(chorus_pubsub::history::memory::MemoryHistory::new()),
            1000,
            Duration::from_secs(300),
            metrics.history.clone(),
        ))
    }

    /// Presence in this process, for a node under test.
    fn memory_presence(
        node_id: &str,
    ) -> Box<dyn FnOnce(Weak<dyn Effects>) -> Arc<Presence> + Send> {
        let node_id = node_id.to_owned();
        Box::new(move |effects| {
            Presence::start(
                Arc::new(chorus_pubsub::presence::memory::MemoryPresence::new()),
                PresenceSettings {
                    node_id,
                    started_at_ms: now_ms(),
                    ttl: Duration::from_secs(15),
                    device_replace: true,
                },
                Arc::new(Lifecycle::new("t", None, None, Vec::new())),
                prometheus::IntCounter::new("errors", "errors").expect("counter"),
                effects,
            )
        })
    }

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
        let incoming = NodeReceiver::default();
        let node = ClusterNode::start(NodeParts {
            node_id: "node".into(),
            hub: Arc::clone(&hub),
            backbone: Some((backbone.clone() as Arc<dyn Backbone>, incoming)),
            topics: Topics::new("test"),
            metrics: metrics.pubsub.clone(),
            namespaces: Namespaces::default(),
            presence: memory_presence("node"),
            history: memory_history(&metrics),
        });
        assert_eq!(accepted.recv().await.as_deref(), Some("test"));
        assert_eq!(accepted.recv().await.as_deref(), Some("test#n/node"));

        backbone.refusals.store(1, Ordering::Release);
        let (client, _outbox) = hub.create_client(Identity::default());
        hub.register(&client);
        let Subscribed::Pending(confirmed) = node.subscribe(&client, "items:42", None) else {
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
            matches!(
                node.subscribe(&second, "items:42", None),
                Subscribed::Cluster
            ),
            "a confirmed channel needs no second round trip"
        );
    }

    #[tokio::test]
    async fn a_twin_node_id_is_noticed_and_its_messages_delivered() {
        let bus = LocalBus::new();
        let start = |bus: &LocalBus| {
            let metrics = metrics();
            let hub = Arc::new(Hub::new(1 << 16, metrics.clone()));
            let incoming = NodeReceiver::default();
            let backbone: Arc<dyn Backbone> = Arc::new(bus.attach(incoming.inbox(16)));
            let node = ClusterNode::start(NodeParts {
                node_id: "same".into(),
                hub: Arc::clone(&hub),
                backbone: Some((backbone, incoming)),
                topics: Topics::new("t"),
                metrics: metrics.pubsub.clone(),
                namespaces: Namespaces::default(),
                presence: memory_presence("same"),
                history: memory_history(&metrics),
            });
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
