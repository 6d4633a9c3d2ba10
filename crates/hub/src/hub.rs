//! The registry of connected clients and the channel index, sharded so that many
//! connection tasks use them at once without one global lock.

use std::collections::HashMap;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::client::{ClientHandle, ClientId, CloseReason, Dropped, Identity, Outbox};
use crate::frame::Frame;

/// Shards per index: enough that two cores rarely meet on one lock.
const SHARDS: usize = 32;

/// Things the hub notices that the server wants to count, or to say to a client.
/// Methods must not block.
pub trait HubEvents: Send + Sync + 'static {
    /// A client went over its queue's byte budget and is being disconnected.
    fn slow_consumer(&self, _client: ClientId) {}

    /// A channel's drop policy dropped queued messages of one client: the notice to
    /// queue for it in their place (`None`: the client is closed instead).
    fn gap(&self, _channel: &str, _dropped: &Dropped) -> Option<Frame> {
        None
    }
}

/// [`HubEvents`] that ignores everything.
#[derive(Debug, Default)]
pub struct NoEvents;
impl HubEvents for NoEvents {}

/// The result of [`Hub::subscribe`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubscribeOutcome {
    /// False when the client was already subscribed.
    pub added: bool,
    /// True when this is the channel's first subscriber on this node.
    pub first_on_node: bool,
}

/// The result of [`Hub::unsubscribe`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnsubscribeOutcome {
    /// False when the client was not subscribed.
    pub removed: bool,
    /// True when the channel has no subscriber left on this node.
    pub last_on_node: bool,
}

type Subscribers = HashMap<ClientId, ClientHandle>;

/// Frames kept for one parked subscription, and their bytes.
#[derive(Default)]
struct Parked {
    frames: Vec<Frame>,
    bytes: usize,
}
/// One shard of a name index (channels, users, devices): a name to its local clients.
type NameShard = RwLock<HashMap<Arc<str>, Subscribers>>;

/// A user's or device's local clients. Mostly one: a map per name would cost every
/// identified connection two small hash tables, and an unboxed map would widen
/// every entry of the index.
enum Named {
    One(ClientHandle),
    Many(Box<Subscribers>),
}

/// One shard of the user or device index.
type IdentityShard = RwLock<HashMap<Arc<str>, Named>>;

/// Connected clients, their channel subscriptions, and who they are.
pub struct Hub {
    clients: Box<[RwLock<Subscribers>]>,
    channels: Box<[NameShard]>,
    /// Subscribers not yet receiving live publications: a history channel's new
    /// subscriber is held until what it recovered has been queued for it.
    held: Box<[NameShard]>,
    /// Live publications kept for held subscribers that asked for them (a proxied
    /// `subscribe` waiting for the backend's data): by client and channel, in order.
    parked: Mutex<HashMap<(ClientId, Arc<str>), Parked>>,
    /// Entries in `parked`: publishing looks there only when some exist.
    parked_count: AtomicUsize,
    /// Registered clients by user id.
    users: Box<[IdentityShard]>,
    /// Registered clients by device id (device ids are global, not per user).
    devices: Box<[IdentityShard]>,
    next_id: AtomicU64,
    connected: AtomicUsize,
    send_budget: usize,
    events: Arc<dyn HubEvents>,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub")
            .field("clients", &self.len())
            .field("send_budget", &self.send_budget)
            .finish()
    }
}

impl Hub {
    /// `send_budget` is every client's outbound queue budget in bytes (`WS_SEND_BUFFER`).
    pub fn new(send_budget: usize, events: Arc<dyn HubEvents>) -> Self {
        Self {
            clients: (0..SHARDS).map(|_| RwLock::default()).collect(),
            channels: (0..SHARDS).map(|_| RwLock::default()).collect(),
            held: (0..SHARDS).map(|_| RwLock::default()).collect(),
            parked: Mutex::default(),
            parked_count: AtomicUsize::new(0),
            users: (0..SHARDS).map(|_| RwLock::default()).collect(),
            devices: (0..SHARDS).map(|_| RwLock::default()).collect(),
            next_id: AtomicU64::new(1),
            connected: AtomicUsize::new(0),
            send_budget,
            events,
        }
    }

    /// Creates a client with its outbound queue, not yet visible to fan-out. Queue
    /// what must arrive first (e.g. a greeting), then call [`Hub::register`].
    pub fn create_client(&self, identity: Identity) -> (ClientHandle, Outbox) {
        self.create_client_with_id(self.reserve_id(), identity)
    }

    /// A client id for a client created later, e.g. once a backend has said who it is.
    pub fn reserve_id(&self) -> ClientId {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// [`Hub::create_client`] with an id from [`Hub::reserve_id`].
    pub fn create_client_with_id(
        &self,
        id: ClientId,
        identity: Identity,
    ) -> (ClientHandle, Outbox) {
        ClientHandle::new(id, identity, self.send_budget, Arc::clone(&self.events))
    }

    /// Makes the client reachable by broadcasts, and by its user and device.
    pub fn register(&self, client: &ClientHandle) {
        let mut shard = write(&self.clients[client_shard(client.id())]);
        if shard.insert(client.id(), client.clone()).is_none() {
            self.connected.fetch_add(1, Ordering::Relaxed);
        }
        drop(shard);
        let identity = client.identity();
        for (index, name) in [
            (&self.users, &identity.user),
            (&self.devices, &identity.device),
        ] {
            if let Some(name) = name {
                add_named(&index[name_shard(name)], name, client);
            }
        }
    }

    /// Removes the client, its identity and all its subscriptions. Returns the
    /// channels that lost their last subscriber on this node.
    pub fn remove(&self, client: &ClientHandle) -> Vec<Arc<str>> {
        if write(&self.clients[client_shard(client.id())])
            .remove(&client.id())
            .is_some()
        {
            self.connected.fetch_sub(1, Ordering::Relaxed);
        }
        let identity = client.identity();
        for (index, name) in [
            (&self.users, &identity.user),
            (&self.devices, &identity.device),
        ] {
            if let Some(name) = name {
                remove_named(&index[name_shard(name)], name, client.id());
            }
        }
        let channels: Vec<Arc<str>> = client.channels().drain().collect();
        channels
            .into_iter()
            .filter(|channel| {
                let shard = name_shard(channel);
                let live_empty = remove_from(&self.channels[shard], channel, client.id());
                let held_empty = remove_from(&self.held[shard], channel, client.id());
                self.unpark(client.id(), channel);
                (live_empty || held_empty) && !self.has_subscribers(channel)
            })
            .collect()
    }

    /// The registered client with this id.
    pub fn client(&self, id: ClientId) -> Option<ClientHandle> {
        read(&self.clients[client_shard(id)]).get(&id).cloned()
    }

    /// Whether `user` has a registered client on this node.
    pub fn has_user(&self, user: &str) -> bool {
        read(&self.users[name_shard(user)]).contains_key(user)
    }

    /// Whether `device` has a registered client on this node.
    pub fn has_device(&self, device: &str) -> bool {
        read(&self.devices[name_shard(device)]).contains_key(device)
    }

    /// This node's clients of `user`.
    pub fn clients_of_user(&self, user: &str) -> Vec<ClientHandle> {
        Self::named(&self.users, user)
    }

    /// This node's clients of `device`.
    pub fn clients_of_device(&self, device: &str) -> Vec<ClientHandle> {
        Self::named(&self.devices, device)
    }

    fn named(index: &[IdentityShard], name: &str) -> Vec<ClientHandle> {
        match read(&index[name_shard(name)]).get(name) {
            Some(Named::One(client)) => vec![client.clone()],
            Some(Named::Many(clients)) => clients.values().cloned().collect(),
            None => Vec::new(),
        }
    }

    /// Number of registered clients.
    pub fn len(&self) -> usize {
        self.connected.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Queues `frame` for every registered client. Returns how many accepted it.
    pub fn broadcast(&self, frame: &Frame) -> usize {
        let mut delivered = 0;
        for shard in self.clients.iter() {
            for client in read(shard).values() {
                delivered += usize::from(client.send(frame.clone()).is_ok());
            }
        }
        delivered
    }

    /// Queues `frame` for every subscriber of `channel` on this node.
    pub fn publish(&self, channel: &str, frame: &Frame) -> usize {
        let index = name_shard(channel);
        // Held before the live shard, as `release_parked` takes them: a frame is
        // either kept for a parked subscriber or delivered to it live, never both.
        let _held = (self.parked_count.load(Ordering::Acquire) > 0)
            .then(|| self.keep_for_parked(index, channel, frame));
        let shard = read(&self.channels[index]);
        shard.get(channel).map_or(0, |subscribers| {
            subscribers
                .values()
                .filter(|client| client.send(frame.clone()).is_ok())
                .count()
        })
    }

    /// Queues `frame` for every subscriber of `channel` on this node but `except`
    /// (e.g. the member a `sys.join` is about).
    pub fn publish_except(&self, channel: &str, frame: &Frame, except: ClientId) -> usize {
        let index = name_shard(channel);
        let _held = (self.parked_count.load(Ordering::Acquire) > 0)
            .then(|| self.keep_for_parked(index, channel, frame));
        let shard = read(&self.channels[index]);
        shard.get(channel).map_or(0, |subscribers| {
            subscribers
                .values()
                .filter(|client| client.id() != except)
                .filter(|client| client.send(frame.clone()).is_ok())
                .count()
        })
    }

    pub fn subscribe(&self, client: &ClientHandle, channel: &str) -> SubscribeOutcome {
        self.subscribe_into(&self.channels, client, channel)
    }

    /// Subscribes `client` to `channel` without live publications reaching it yet:
    /// it counts as a subscriber (for interest, counts, unsubscribe and removal), and
    /// [`Hub::release`] makes it live.
    pub fn subscribe_held(&self, client: &ClientHandle, channel: &str) -> SubscribeOutcome {
        self.subscribe_into(&self.held, client, channel)
    }

    /// Like [`Hub::subscribe_held`], and live publications of `channel` are kept for
    /// the client (up to its send budget; past it the client is closed as a slow
    /// consumer) until [`Hub::release_parked`].
    pub fn subscribe_parked(&self, client: &ClientHandle, channel: &str) -> SubscribeOutcome {
        let outcome = self.subscribe_into(&self.held, client, channel);
        if outcome.added {
            let mut parked = lock(&self.parked);
            if parked
                .insert((client.id(), Arc::from(channel)), Parked::default())
                .is_none()
            {
                self.parked_count.fetch_add(1, Ordering::AcqRel);
            }
        }
        outcome
    }

    /// Makes a parked subscriber live: queues `first`, then what was kept for it, then
    /// lets live publications reach it. False when it is not parked (unsubscribed or
    /// gone meanwhile).
    pub fn release_parked(
        &self,
        client: &ClientHandle,
        channel: &str,
        first: Option<Frame>,
    ) -> bool {
        // Lock order everywhere: the client's own set, then the channel shards.
        let own = client.channels();
        let shard = name_shard(channel);
        let mut held = write(&self.held[shard]);
        let kept = self.unpark(client.id(), channel);
        let Some(subscribers) = held.get_mut(channel) else {
            return false;
        };
        let Some(handle) = subscribers.remove(&client.id()) else {
            return false;
        };
        if subscribers.is_empty() {
            held.remove(channel);
        }
        for frame in first
            .into_iter()
            .chain(kept.into_iter().flat_map(|kept| kept.frames))
        {
            let _ = client.send(frame);
        }
        let key = own
            .get(channel)
            .map_or_else(|| Arc::from(channel), Arc::clone);
        write(&self.channels[shard])
            .entry(key)
            .or_default()
            .insert(client.id(), handle);
        true
    }

    /// Takes a parked subscription's kept frames out.
    fn unpark(&self, id: ClientId, channel: &str) -> Option<Parked> {
        if self.parked_count.load(Ordering::Acquire) == 0 {
            return None;
        }
        let kept = lock(&self.parked).remove(&(id, Arc::from(channel)));
        if kept.is_some() {
            self.parked_count.fetch_sub(1, Ordering::AcqRel);
        }
        kept
    }

    /// Keeps `frame` for the parked subscribers of `channel`; returns the held shard's
    /// guard, to be kept until the frame has been delivered live.
    fn keep_for_parked(
        &self,
        index: usize,
        channel: &str,
        frame: &Frame,
    ) -> RwLockReadGuard<'_, HashMap<Arc<str>, Subscribers>> {
        let held = read(&self.held[index]);
        if let Some((name, subscribers)) = held.get_key_value(channel) {
            let mut parked = lock(&self.parked);
            for client in subscribers.values() {
                let Some(kept) = parked.get_mut(&(client.id(), Arc::clone(name))) else {
                    continue;
                };
                kept.bytes += frame.len();
                if kept.bytes > self.send_budget {
                    client.close(CloseReason::SlowConsumer);
                    continue;
                }
                kept.frames.push(frame.clone());
            }
        }
        held
    }

    /// Lets live publications of `channel` reach a held subscriber. False when it is
    /// not held (unsubscribed or gone meanwhile).
    pub fn release(&self, client: &ClientHandle, channel: &str) -> bool {
        let own = client.channels();
        let shard = name_shard(channel);
        let mut held = write(&self.held[shard]);
        let Some(subscribers) = held.get_mut(channel) else {
            return false;
        };
        let Some(handle) = subscribers.remove(&client.id()) else {
            return false;
        };
        if subscribers.is_empty() {
            held.remove(channel);
        }
        let key = own
            .get(channel)
            .map_or_else(|| Arc::from(channel), Arc::clone);
        write(&self.channels[shard])
            .entry(key)
            .or_default()
            .insert(client.id(), handle);
        true
    }

    /// Whether `client` is a held subscriber of `channel`.
    pub fn is_held(&self, client: &ClientHandle, channel: &str) -> bool {
        read(&self.held[name_shard(channel)])
            .get(channel)
            .is_some_and(|subscribers| subscribers.contains_key(&client.id()))
    }

    fn subscribe_into(
        &self,
        index: &[NameShard],
        client: &ClientHandle,
        channel: &str,
    ) -> SubscribeOutcome {
        // Lock order everywhere: the client's own set, then the channel shard.
        let mut own = client.channels();
        if own.contains(channel) {
            return SubscribeOutcome {
                added: false,
                first_on_node: false,
            };
        }
        let first_on_node = !self.has_subscribers(channel);
        let mut shard = write(&index[name_shard(channel)]);
        // Reuse the index's key so every subscriber set shares one allocation per name.
        let key = match shard.get_key_value(channel) {
            Some((key, _)) => Arc::clone(key),
            None => Arc::from(channel),
        };
        shard
            .entry(Arc::clone(&key))
            .or_default()
            .insert(client.id(), client.clone());
        own.insert(key);
        SubscribeOutcome {
            added: true,
            first_on_node,
        }
    }

    pub fn unsubscribe(&self, client: &ClientHandle, channel: &str) -> UnsubscribeOutcome {
        let mut own = client.channels();
        if !own.remove(channel) {
            return UnsubscribeOutcome {
                removed: false,
                last_on_node: false,
            };
        }
        let shard = name_shard(channel);
        remove_from(&self.channels[shard], channel, client.id());
        remove_from(&self.held[shard], channel, client.id());
        self.unpark(client.id(), channel);
        let last_on_node = !self.has_subscribers(channel);
        drop(own);
        UnsubscribeOutcome {
            removed: true,
            last_on_node,
        }
    }

    /// Whether any client on this node is subscribed to `channel`.
    pub fn has_subscribers(&self, channel: &str) -> bool {
        let shard = name_shard(channel);
        read(&self.channels[shard]).contains_key(channel)
            || read(&self.held[shard]).contains_key(channel)
    }

    /// Number of subscribers of `channel` on this node, held ones included.
    pub fn subscriber_count(&self, channel: &str) -> usize {
        let shard = name_shard(channel);
        let count = |index: &NameShard| read(index).get(channel).map_or(0, HashMap::len);
        count(&self.channels[shard]) + count(&self.held[shard])
    }

    /// Every channel with a subscriber on this node, and how many it has.
    pub fn channel_counts(&self) -> Vec<(Arc<str>, usize)> {
        let mut counts: HashMap<Arc<str>, usize> = HashMap::new();
        for shard in self.channels.iter().chain(self.held.iter()) {
            for (channel, subscribers) in read(shard).iter() {
                *counts.entry(Arc::clone(channel)).or_default() += subscribers.len();
            }
        }
        counts.into_iter().collect()
    }

    /// Calls `f` for every registered client, e.g. to say goodbye at shutdown.
    pub fn for_each_client(&self, mut f: impl FnMut(&ClientHandle)) {
        for shard in self.clients.iter() {
            for client in read(shard).values() {
                f(client);
            }
        }
    }

    /// Asks every registered client to close.
    pub fn close_all(&self, reason: CloseReason) {
        self.for_each_client(|client| {
            client.close(reason);
        });
    }
}

/// Removes client `id` under `name`; true when `name` has no client left.
fn remove_from(shard: &NameShard, name: &str, id: ClientId) -> bool {
    let mut shard = write(shard);
    match shard.get_mut(name) {
        Some(clients) => {
            clients.remove(&id);
            if clients.is_empty() {
                shard.remove(name);
                true
            } else {
                false
            }
        }
        None => false,
    }
}

fn add_named(shard: &IdentityShard, name: &Arc<str>, client: &ClientHandle) {
    let mut shard = write(shard);
    let Some(named) = shard.get_mut(&**name) else {
        shard.insert(Arc::clone(name), Named::One(client.clone()));
        return;
    };
    match named {
        Named::One(only) if only.id() == client.id() => *only = client.clone(),
        Named::One(only) => {
            let first = (only.id(), only.clone());
            let both = HashMap::from([first, (client.id(), client.clone())]);
            *named = Named::Many(Box::new(both));
        }
        Named::Many(clients) => {
            clients.insert(client.id(), client.clone());
        }
    }
}

fn remove_named(shard: &IdentityShard, name: &str, id: ClientId) {
    let mut shard = write(shard);
    let empty = match shard.get_mut(name) {
        Some(Named::One(only)) => only.id() == id,
        Some(Named::Many(clients)) => {
            clients.remove(&id);
            clients.is_empty()
        }
        None => false,
    };
    if empty {
        shard.remove(name);
    }
}

#[allow(clippy::cast_possible_truncation)]
fn client_shard(id: ClientId) -> usize {
    (id as usize) % SHARDS
}

#[allow(clippy::cast_possible_truncation)]
fn name_shard(name: &str) -> usize {
    let mut hasher = DefaultHasher::new();
    name.hash(&mut hasher);
    (hasher.finish() as usize) % SHARDS
}

// A panic while holding a shard lock leaves the maps consistent (every mutation is a
// single insert or remove), so poisoning is not a reason to stop serving.
fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::{Outgoing, SendError};

    fn hub(budget: usize) -> Hub {
        Hub::new(budget, Arc::new(NoEvents))
    }

    fn connect(hub: &Hub) -> (ClientHandle, Outbox) {
        let (client, outbox) = hub.create_client(Identity::default());
        hub.register(&client);
        (client, outbox)
    }

    #[tokio::test]
    async fn broadcast_shares_one_frame_with_every_client() {
        let hub = hub(8);
        let mut clients: Vec<_> = (0..5).map(|_| connect(&hub)).collect();
        let frame = Frame::from(String::from("hello"));
        assert_eq!(hub.broadcast(&frame), 5);
        for (_, outbox) in &mut clients {
            match outbox.next().await {
                Outgoing::Frame(got) => {
                    assert!(got.ptr_eq(&frame));
                }
                other => panic!("expected a frame, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn publish_reaches_subscribers_only() {
        let hub = hub(8);
        let (a, mut a_out) = connect(&hub);
        let (_b, mut b_out) = connect(&hub);
        assert_eq!(
            hub.subscribe(&a, "items:1"),
            SubscribeOutcome {
                added: true,
                first_on_node: true
            }
        );
        assert!(!hub.subscribe(&a, "items:1").added);
        assert_eq!(hub.publish("items:1", &Frame::from_static("x")), 1);
        assert_eq!(a_out.next().await, Outgoing::Frame(Frame::from_static("x")));
        assert_eq!(b_out.try_next(), None);
    }

    #[test]
    fn first_and_last_subscriber_are_reported() {
        let hub = hub(8);
        let (a, _a_out) = connect(&hub);
        let (b, _b_out) = connect(&hub);
        assert!(hub.subscribe(&a, "c").first_on_node);
        assert!(!hub.subscribe(&b, "c").first_on_node);
        assert!(!hub.unsubscribe(&a, "c").last_on_node);
        assert!(!hub.unsubscribe(&a, "c").removed);
        assert_eq!(hub.remove(&b), vec![Arc::<str>::from("c")]);
        assert!(!hub.has_subscribers("c"));
        assert_eq!(hub.len(), 1);
    }

    #[tokio::test]
    async fn a_full_queue_closes_only_that_client() {
        struct Count(AtomicUsize);
        impl HubEvents for Count {
            fn slow_consumer(&self, _: ClientId) {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        let events = Arc::new(Count(AtomicUsize::new(0)));
        // Two one-byte frames fit; the third is over the budget.
        let hub = Hub::new(2, events.clone());
        let (slow, mut slow_out) = connect(&hub);
        let (_fast, mut fast_out) = connect(&hub);
        for i in 0..3 {
            hub.broadcast(&Frame::from(i.to_string()));
            assert!(matches!(fast_out.next().await, Outgoing::Frame(_)));
        }
        assert_eq!(slow.closing(), Some(CloseReason::SlowConsumer));
        assert_eq!(
            slow_out.next().await,
            Outgoing::Close(CloseReason::SlowConsumer)
        );
        assert_eq!(events.0.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn clients_are_found_by_user_and_device() {
        let hub = hub(8);
        let alice = |device: &str| Identity {
            user: Some(Arc::from("alice")),
            device: Some(Arc::from(device)),
        };
        let (phone, _) = hub.create_client(alice("phone"));
        let (laptop, _) = hub.create_client(alice("laptop"));
        let (anonymous, _) = hub.create_client(Identity::default());
        for client in [&phone, &laptop, &anonymous] {
            hub.register(client);
        }
        assert_eq!(hub.clients_of_user("alice").len(), 2);
        assert_eq!(hub.clients_of_device("phone").len(), 1);
        assert!(hub.clients_of_user("bob").is_empty());
        hub.remove(&phone);
        assert_eq!(hub.clients_of_user("alice").len(), 1);
        assert!(hub.clients_of_device("phone").is_empty());
        hub.remove(&laptop);
        assert!(hub.clients_of_user("alice").is_empty());
    }

    #[test]
    fn the_identity_index_keeps_a_lone_client_and_ignores_strangers() {
        let hub = hub(8);
        let bob = Identity {
            user: Some(Arc::from("bob")),
            device: None,
        };
        let (first, _) = hub.create_client(bob.clone());
        let (second, _) = hub.create_client(bob);
        hub.register(&first);
        hub.register(&first);
        assert_eq!(
            hub.clients_of_user("bob").len(),
            1,
            "registered twice, one entry"
        );
        hub.remove(&second);
        assert_eq!(
            hub.clients_of_user("bob").len(),
            1,
            "not bob's registered client"
        );
        hub.register(&second);
        hub.remove(&first);
        hub.remove(&second);
        assert!(!hub.has_user("bob"));
    }

    /// Builds `sys.gap`-like notices so the policies can be watched.
    struct Gaps;
    impl HubEvents for Gaps {
        fn gap(&self, channel: &str, dropped: &Dropped) -> Option<Frame> {
            Some(Frame::from(format!(
                "gap {channel} {} {}..{}",
                dropped.messages, dropped.from_offset, dropped.to_offset
            )))
        }
    }

    fn tagged(channel: &str, offset: u64, overflow: crate::Overflow, text: &str) -> Frame {
        Frame::tagged(
            text.to_owned(),
            crate::Tag {
                channel: Arc::from(channel),
                offset,
                overflow,
            },
        )
    }

    fn drain(outbox: &mut Outbox) -> Vec<String> {
        std::iter::from_fn(|| outbox.try_next())
            .map(|frame| frame.as_str().to_owned())
            .collect()
    }

    #[test]
    fn drop_oldest_makes_room_and_says_what_went() {
        let hub = Hub::new(500, Arc::new(Gaps));
        let (client, mut outbox) = connect(&hub);
        let body = |n: u64| format!("{n:0>100}");
        for n in 1..=5 {
            client
                .send(tagged("a", n, crate::Overflow::DropOldest, &body(n)))
                .expect("fits");
        }
        client
            .send(tagged("a", 6, crate::Overflow::DropOldest, &body(6)))
            .expect("room made");
        // The oldest went, until the new one and a notice fit.
        assert_eq!(
            drain(&mut outbox),
            [body(4), body(5), "gap a 3 1..3".to_owned(), body(6)]
        );
        assert_eq!(client.closing(), None);
    }

    #[test]
    fn latest_keeps_only_the_newest_of_its_channel() {
        let hub = Hub::new(300, Arc::new(Gaps));
        let (client, mut outbox) = connect(&hub);
        let body = |n: u64| format!("{n:0>100}");
        client
            .send(tagged("other", 0, crate::Overflow::Disconnect, &body(0)))
            .expect("fits");
        for n in 1..=4 {
            client
                .send(tagged("l", n, crate::Overflow::Latest, &body(n)))
                .expect("room made");
        }
        assert_eq!(
            drain(&mut outbox),
            [
                body(0),
                "gap l 2 1..2".to_owned(),
                "gap l 1 3..3".to_owned(),
                body(4)
            ],
            "other channels are untouched"
        );
        assert_eq!(client.closing(), None);
    }

    #[test]
    fn a_policy_that_cannot_make_room_closes_the_client() {
        let hub = Hub::new(300, Arc::new(Gaps));
        let (client, _outbox) = connect(&hub);
        client
            .send(tagged(
                "x",
                0,
                crate::Overflow::Disconnect,
                &"y".repeat(250),
            ))
            .expect("fits");
        assert_eq!(
            client.send(tagged(
                "d",
                1,
                crate::Overflow::DropOldest,
                &"z".repeat(100)
            )),
            Err(SendError::OverBudget),
            "nothing of its channel to drop"
        );
        assert_eq!(client.closing(), Some(CloseReason::SlowConsumer));
    }

    #[tokio::test]
    async fn a_held_subscriber_gets_nothing_until_released() {
        let hub = hub(1 << 16);
        let (client, mut outbox) = connect(&hub);
        assert!(hub.subscribe_held(&client, "h").first_on_node);
        assert!(hub.has_subscribers("h"));
        assert_eq!(hub.subscriber_count("h"), 1);
        assert_eq!(hub.publish("h", &Frame::from_static("early")), 0);
        assert!(hub.is_held(&client, "h"));
        assert!(hub.release(&client, "h"));
        assert!(!hub.release(&client, "h"), "released once");
        assert_eq!(hub.publish("h", &Frame::from_static("live")), 1);
        assert_eq!(
            outbox.next().await,
            Outgoing::Frame(Frame::from_static("live"))
        );
        assert!(hub.unsubscribe(&client, "h").last_on_node);
        hub.subscribe_held(&client, "g");
        assert_eq!(hub.remove(&client), vec![Arc::<str>::from("g")]);
        assert!(!hub.has_subscribers("g"));
    }

    #[tokio::test]
    async fn a_parked_subscriber_gets_its_first_frame_then_what_was_kept() {
        let hub = hub(1 << 16);
        let (client, mut outbox) = connect(&hub);
        let (other, mut other_out) = connect(&hub);
        hub.subscribe(&other, "p");
        assert!(hub.subscribe_parked(&client, "p").added);
        assert_eq!(hub.publish("p", &Frame::from_static("meanwhile")), 1);
        assert_eq!(outbox.try_next(), None, "kept, not delivered");
        assert!(hub.release_parked(&client, "p", Some(Frame::from_static("first"))));
        assert!(!hub.release_parked(&client, "p", None), "released once");
        hub.publish("p", &Frame::from_static("live"));
        let got: Vec<_> = std::iter::from_fn(|| outbox.try_next()).collect();
        assert_eq!(
            got,
            ["first", "meanwhile", "live"]
                .map(Frame::from_static)
                .to_vec()
        );
        assert_eq!(other_out.try_next(), Some(Frame::from_static("meanwhile")));
        assert_eq!(hub.parked_count.load(Ordering::Acquire), 0);

        // Unsubscribed or gone while parked: nothing is kept.
        hub.subscribe_parked(&client, "q");
        assert!(hub.unsubscribe(&client, "q").removed);
        hub.subscribe_parked(&client, "r");
        hub.remove(&client);
        assert_eq!(hub.parked_count.load(Ordering::Acquire), 0);
        assert_eq!(hub.publish("r", &Frame::from_static("x")), 0);
    }

    #[tokio::test]
    async fn what_is_kept_for_a_parked_subscriber_is_bounded_by_its_budget() {
        let hub = hub(8);
        let (client, _outbox) = connect(&hub);
        hub.subscribe_parked(&client, "p");
        hub.publish("p", &Frame::from_static("1234"));
        assert_eq!(client.closing(), None);
        hub.publish("p", &Frame::from_static("56789"));
        assert_eq!(client.closing(), Some(CloseReason::SlowConsumer));
    }

    #[tokio::test]
    async fn shutdown_flushes_queued_frames_before_closing() {
        let hub = hub(4);
        let (client, mut outbox) = connect(&hub);
        client
            .send(Frame::from_static("bye"))
            .expect("queue has room");
        hub.close_all(CloseReason::Shutdown);
        assert_eq!(
            outbox.next().await,
            Outgoing::Frame(Frame::from_static("bye"))
        );
        assert_eq!(outbox.next().await, Outgoing::Close(CloseReason::Shutdown));
    }
}
