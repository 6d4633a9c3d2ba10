//! Presence in a NATS JetStream key-value bucket, with a local mirror for reads.
//!
//! [`NatsPresence`] owns one bucket per cluster, `chorus-presence-<prefix>` (see
//! [`bucket_for`]), created when missing (history 1, file storage), and its own
//! async-nats connection (not the backbone's), which reconnects forever. Every name
//! is written into keys as unpadded base64url (see [`encode_name`]), so that any user,
//! device, channel, node or client id is a valid key token. Keys:
//!
//! - `n.<node>`: a replica's liveness, `{"started_at_ms", "ttl_ms", "dead"}`, written
//!   with compare-and-set so that a beat and a reaper marking the replica dead cannot
//!   both win;
//! - `k.<client>`: a connection (its JSON); deleting it at the revision one saw is how
//!   a disconnect or a reaper claims the connection, exactly once;
//! - `u.<user>`: the user's client ids, each with the revision of its `k.` record,
//!   updated with compare-and-set: a user's first connection and last one gone are
//!   decided there;
//! - `m.<channel>.<client>`: a channel member (its JSON);
//! - `c.<node>.<channel>`: a replica's subscriber count of a channel.
//!
//! Deleted keys leave a tombstone in the stream; where the server supports
//! per-message TTLs (NATS 2.11+), tombstones carry one and vanish after
//! [`TOMBSTONE_TTL`]. Older servers work too (the store needs direct get, NATS 2.9+;
//! tested with 2.9.10 and 2.15.1), but keep one tombstone per key ever deleted.
//!
//! Reads come from a mirror: a task follows the bucket with an ordered consumer
//! (last value per key first, then every change) and applies each entry to a
//! [`PresenceState`], so `stats` and `page` cost no more than the in-memory store's.
//! To make every read reflect every write completed before it on any replica, a read
//! first asks the stream for its last sequence (one request) and waits until the
//! mirror has applied it; a write that needs to read back waits for its own
//! sequence instead. The mirror is rebuilt from scratch after every reconnect, and
//! whenever its consumer fails.
//!
//! A replica counts as dead once its `n.` entry was not refreshed within its TTL,
//! measured on this process's monotonic clock from when the mirror received the
//! entry (at start-up, from the entry's server timestamp, clamped). A reaper marks it
//! dead (compare-and-set), claims its connections one by one, removes their
//! memberships, and finally its counts and its entry.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::HeaderMap;
use async_nats::jetstream::consumer::push::OrderedConfig;
use async_nats::jetstream::consumer::{DeliverPolicy, ReplayPolicy};
use async_nats::jetstream::stream::Stream;
use async_nats::jetstream::{self};
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, watch};

use super::memory::{NodeEntry, PresenceState};
use super::{
    Beat, Connected, Connection, Disconnected, Lost, Member, NodeStatus, Page, PresenceError,
    PresenceStore, Stats, StoreFuture, node_of_client,
};
use crate::nats::link::{
    EXPECTED_LAST_SUBJECT_SEQUENCE, Get, LOG_EVERY, Link, MESSAGE_TTL, ReadError, Role, SetupError,
    StreamReply, WATCH_TICK, WriteError, name_for,
};
use crate::{AbortOnDrop, Throttle};

const NAME: &str = "nats";
const UNREACHABLE: PresenceError = PresenceError::Unreachable(NAME);

/// How long a read waits for the mirror to catch up with the stream.
const READ_WAIT: Duration = Duration::from_secs(3);
/// How long a write waits for the bucket to be set up after a (re)connect.
const SETUP_WAIT: Duration = Duration::from_secs(3);
/// Pause between attempts to set the bucket up (and between mirror rebuilds).
const SETUP_RETRY: Duration = Duration::from_secs(1);
/// How long a deleted key's tombstone stays (where the server supports TTLs): long
/// enough for every live mirror to see it; a mirror that reconnects starts afresh.
pub const TOMBSTONE_TTL: Duration = Duration::from_secs(600);
/// How long records of a replica without any liveness entry are left alone before
/// they are reaped (a replica records nothing before its first beat).
const ABSENT_GRACE: Duration = Duration::from_secs(60);
/// Compare-and-set attempts before giving up on a contended key.
const CAS_ATTEMPTS: u32 = 50;
/// Mirror entries applied under one lock.
const APPLY_BATCH: usize = 256;
/// Deletes in flight at once when clearing many keys.
const DELETE_BATCH: usize = 256;

const KV_OPERATION: &str = "KV-Operation";

/// The bucket holding the presence of the cluster whose topic prefix is `prefix`:
/// `chorus-presence-` followed by the prefix with every byte other than `A-Z a-z 0-9 -`
/// written as `_XX` (upper-case hex). Bucket names allow `A-Z a-z 0-9 _ -` only, and
/// since `_` always starts an escape, two prefixes never share a bucket.
pub fn bucket_for(prefix: &str) -> String {
    name_for("chorus-presence-", prefix)
}

const BASE64URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// A name as a key token: unpadded base64url (`A-Z a-z 0-9 - _`), and `=` for the empty
/// name (a key token cannot be empty, and base64url never yields `=`).
pub fn encode_name(name: &str) -> String {
    if name.is_empty() {
        return "=".to_owned();
    }
    let bytes = name.as_bytes();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for index in 0..=chunk.len() {
            let sextet = (n >> (18 - 6 * index)) & 0x3f;
            out.push(char::from(BASE64URL[sextet as usize]));
        }
    }
    out
}

/// The name a token made by [`encode_name`] stands for; `None` for any other text.
pub fn decode_name(token: &str) -> Option<String> {
    if token == "=" {
        return Some(String::new());
    }
    if token.is_empty() || token.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(token.len() * 3 / 4);
    for chunk in token.as_bytes().chunks(4) {
        let mut n = 0u32;
        for (index, &c) in chunk.iter().enumerate() {
            let value = BASE64URL.iter().position(|&x| x == c)?;
            n |= (value as u32) << (18 - 6 * index);
        }
        let bytes = chunk.len() - 1;
        // Bits below the last byte must be zero, or two tokens would name one text.
        if n & ((1 << (24 - 8 * bytes)) - 1) != 0 {
            return None;
        }
        for index in 0..bytes {
            out.push((n >> (16 - 8 * index)) as u8);
        }
    }
    String::from_utf8(out).ok()
}

fn node_key(node: &str) -> String {
    format!("n.{}", encode_name(node))
}

fn connection_key(client: &str) -> String {
    format!("k.{}", encode_name(client))
}

fn user_key(user: &str) -> String {
    format!("u.{}", encode_name(user))
}

fn member_key(channel: &str, client: &str) -> String {
    format!("m.{}.{}", encode_name(channel), encode_name(client))
}

fn count_key(node: &str, channel: &str) -> String {
    format!("c.{}.{}", encode_name(node), encode_name(channel))
}

/// What a key names.
#[derive(Debug, PartialEq, Eq)]
enum Key {
    Node(String),
    Connection(String),
    User(String),
    Member { channel: String, client: String },
    Count { node: String, channel: String },
}

fn parse_key(key: &str) -> Option<Key> {
    let mut tokens = key.split('.');
    let kind = tokens.next()?;
    let first = decode_name(tokens.next()?)?;
    let second = tokens.next().map(decode_name);
    if tokens.next().is_some() {
        return None;
    }
    match (kind, second) {
        ("n", None) => Some(Key::Node(first)),
        ("k", None) => Some(Key::Connection(first)),
        ("u", None) => Some(Key::User(first)),
        ("m", Some(Some(client))) => Some(Key::Member {
            channel: first,
            client,
        }),
        ("c", Some(Some(channel))) => Some(Key::Count {
            node: first,
            channel,
        }),
        _ => None,
    }
}

/// The value of an `n.` key.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct NodeValue {
    started_at_ms: u64,
    ttl_ms: u64,
    #[serde(default)]
    dead: bool,
}

impl NodeValue {
    fn ttl(&self) -> Duration {
        Duration::from_millis(self.ttl_ms)
    }
}

/// The value of a `u.` key: client id to the revision of its `k.` record.
type UserClients = BTreeMap<String, u64>;

fn corrupt(reason: impl std::fmt::Display) -> PresenceError {
    PresenceError::Corrupt {
        store: NAME,
        reason: reason.to_string(),
    }
}

fn unavailable(reason: &str) -> PresenceError {
    PresenceError::Unavailable {
        store: NAME,
        reason: reason.to_owned(),
    }
}

fn parse<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, PresenceError> {
    serde_json::from_slice(value).map_err(|error| corrupt(format_args!("{key}: {error}")))
}

fn to_json<T: Serialize>(value: &T) -> Result<Bytes, PresenceError> {
    serde_json::to_vec(value)
        .map(Bytes::from)
        .map_err(|error| corrupt(format_args!("cannot encode a record: {error}")))
}

fn wall_clock_ns() -> i128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_nanos() as i128)
}

/// How long ago a server timestamp was, on this machine's wall clock (never negative).
fn age_of(written_ns: i128) -> Duration {
    let nanos = (wall_clock_ns() - written_ns).max(0);
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// A write failed: a compare-and-set lost (retry), or anything else.
enum Fail {
    Conflict,
    Error(PresenceError),
}

impl From<PresenceError> for Fail {
    fn from(error: PresenceError) -> Self {
        Self::Error(error)
    }
}

/// What the store holds for one key.
struct Record {
    /// Revision (stream sequence) of the last message, which a compare-and-set
    /// expects; a tombstone has one too.
    seq: u64,
    /// `None` for a tombstone.
    value: Option<Bytes>,
    /// Server timestamp, nanoseconds since the Unix epoch.
    written_ns: i128,
}

/// Whether the bucket can be used.
#[derive(Clone, Debug)]
enum Setup {
    /// Not known yet (never connected, or setting up).
    Pending,
    /// The bucket exists; `ttl` says whether tombstones can carry a TTL.
    Ready { ttl: bool },
    /// It cannot be (no JetStream): the reason.
    Unavailable(String),
}

/// How far the mirror got.
#[derive(Clone, Copy, Debug, Default)]
struct Progress {
    /// Counts rebuilds.
    epoch: u64,
    /// The initial load is complete.
    loaded: bool,
    /// Every stream message up to this sequence is applied.
    applied: u64,
}

/// One connection a reaper may claim.
struct Candidate {
    client: String,
    revision: u64,
    connection: Connection,
    memberships: Vec<(String, u64)>,
}

/// A replica the reaper looks at, with its liveness entry if it has one.
struct Victim {
    node: String,
    entry: Option<(u64, NodeValue)>,
}

/// The bucket's content, as the mirror task applied it: a [`PresenceState`] for the
/// queries, and the revisions (and indices) that claims and deletes need.
#[derive(Default)]
struct Mirror {
    state: PresenceState,
    nodes: HashMap<String, (u64, NodeValue)>,
    /// Client id to the revision of its `k.` record and its node.
    connections: HashMap<String, (u64, String)>,
    by_node: HashMap<String, BTreeSet<String>>,
    /// Client id to its channels, each with the member record's revision.
    members: HashMap<String, BTreeMap<String, (u64, Member)>>,
    members_by_node: HashMap<String, BTreeSet<String>>,
    /// Node id to its channel counts, each with the record's revision.
    counts: HashMap<String, BTreeMap<String, (u64, u64)>>,
    /// Replicas with records but no liveness entry, since when this mirror saw so.
    absent_since: HashMap<String, Instant>,
}

impl Mirror {
    /// Applies one bucket entry; `value` is `None` for a delete. `age` is how old the
    /// entry is, for liveness entries read at start-up.
    fn apply(
        &mut self,
        key: &str,
        revision: u64,
        value: Option<&[u8]>,
        age: Duration,
    ) -> Result<(), PresenceError> {
        let Some(parsed) = parse_key(key) else {
            return Err(corrupt(format_args!("unknown key {key:?}")));
        };
        match (parsed, value) {
            (Key::Node(node), Some(value)) => {
                let entry: NodeValue = parse(key, value)?;
                let now = Instant::now();
                let deadline = if entry.dead {
                    now
                } else {
                    now + entry.ttl().saturating_sub(age)
                };
                self.state.set_node(
                    &node,
                    NodeEntry {
                        started_at_ms: entry.started_at_ms,
                        deadline,
                    },
                );
                self.nodes.insert(node, (revision, entry));
            }
            (Key::Node(node), None) => {
                self.nodes.remove(&node);
                // The state forgets the node's counts with it; their keys may remain.
                self.state.remove_node(&node);
                for (channel, (_, count)) in self.counts.get(&node).into_iter().flatten() {
                    self.state.set_channel_count(&node, channel, *count);
                }
            }
            (Key::Connection(client), Some(value)) => {
                let connection: Connection = parse(key, value)?;
                if connection.client_id != client {
                    return Err(corrupt(format_args!(
                        "{key}: holds {}",
                        connection.client_id
                    )));
                }
                self.forget_connection(&client);
                self.by_node
                    .entry(connection.node_id.clone())
                    .or_default()
                    .insert(client.clone());
                self.connections
                    .insert(client, (revision, connection.node_id.clone()));
                self.state.insert_connection(connection);
            }
            (Key::Connection(client), None) => {
                self.forget_connection(&client);
                // The state drops the memberships with the connection; their keys stay
                // until deleted on their own.
                self.state.remove_connection(&client);
                for (channel, (_, member)) in self.members.get(&client).into_iter().flatten() {
                    self.state.add_member(channel, member.clone());
                }
            }
            (Key::User(_), _) => {}
            (Key::Member { channel, client }, Some(value)) => {
                let member: Member = parse(key, value)?;
                if member.client_id != client {
                    return Err(corrupt(format_args!("{key}: holds {}", member.client_id)));
                }
                self.state.add_member(&channel, member.clone());
                if let Some(node) = node_of_client(&client) {
                    self.members_by_node
                        .entry(node.to_owned())
                        .or_default()
                        .insert(client.clone());
                }
                self.members
                    .entry(client)
                    .or_default()
                    .insert(channel, (revision, member));
            }
            (Key::Member { channel, client }, None) => {
                self.state.remove_member(&channel, &client);
                if let Some(channels) = self.members.get_mut(&client) {
                    channels.remove(&channel);
                    if channels.is_empty() {
                        self.members.remove(&client);
                        if let Some(node) = node_of_client(&client) {
                            remove_indexed(&mut self.members_by_node, node, &client);
                        }
                    }
                }
            }
            (Key::Count { node, channel }, Some(value)) => {
                let count: u64 = parse(key, value)?;
                self.state.set_channel_count(&node, &channel, count);
                self.counts
                    .entry(node)
                    .or_default()
                    .insert(channel, (revision, count));
            }
            (Key::Count { node, channel }, None) => {
                self.state.set_channel_count(&node, &channel, 0);
                if let Some(counts) = self.counts.get_mut(&node) {
                    counts.remove(&channel);
                    if counts.is_empty() {
                        self.counts.remove(&node);
                    }
                }
            }
        }
        Ok(())
    }

    fn forget_connection(&mut self, client: &str) {
        if let Some((_, node)) = self.connections.remove(client) {
            remove_indexed(&mut self.by_node, &node, client);
        }
    }

    /// The replicas to reap: `only` whatever its state, else those whose liveness ran
    /// out and those that hold records without any liveness entry for a while.
    fn victims(&mut self, only: Option<&str>, now: Instant) -> Vec<Victim> {
        if let Some(node) = only {
            return vec![Victim {
                node: node.to_owned(),
                entry: self.nodes.get(node).cloned(),
            }];
        }
        let mut victims: Vec<Victim> = self
            .state
            .expired_nodes(now)
            .into_iter()
            .map(|node| Victim {
                entry: self.nodes.get(&node).cloned(),
                node,
            })
            .collect();
        let holders: BTreeSet<&String> = self
            .by_node
            .keys()
            .chain(self.members_by_node.keys())
            .chain(self.counts.keys())
            .filter(|node| !self.nodes.contains_key(*node))
            .collect();
        self.absent_since.retain(|node, _| holders.contains(node));
        for node in holders {
            let since = *self.absent_since.entry(node.clone()).or_insert(now);
            if now.duration_since(since) >= ABSENT_GRACE {
                victims.push(Victim {
                    node: node.clone(),
                    entry: None,
                });
            }
        }
        victims
    }

    /// `node`'s connections, in client id order, with what claiming each needs.
    fn candidates(&self, node: &str) -> Vec<Candidate> {
        self.by_node
            .get(node)
            .into_iter()
            .flatten()
            .filter_map(|client| {
                let (revision, _) = self.connections.get(client)?;
                let connection = self.state.connection(client)?.clone();
                Some(Candidate {
                    client: client.clone(),
                    revision: *revision,
                    connection,
                    memberships: self.memberships(client),
                })
            })
            .collect()
    }

    fn memberships(&self, client: &str) -> Vec<(String, u64)> {
        self.members
            .get(client)
            .into_iter()
            .flatten()
            .map(|(channel, (revision, _))| (channel.clone(), *revision))
            .collect()
    }

    /// Keys (with revisions) of what `node` still holds besides connections: member
    /// records of its clients and its channel counts. `None` while it has connections.
    fn leftovers(&self, node: &str) -> Option<Vec<(String, u64)>> {
        if self.by_node.contains_key(node) {
            return None;
        }
        let members =
            self.members_by_node
                .get(node)
                .into_iter()
                .flatten()
                .flat_map(|client| {
                    self.members.get(client).into_iter().flatten().map(
                        move |(channel, (revision, _))| (member_key(channel, client), *revision),
                    )
                });
        let counts = self
            .counts
            .get(node)
            .into_iter()
            .flatten()
            .map(|(channel, (revision, _))| (count_key(node, channel), *revision));
        Some(members.chain(counts).collect())
    }
}

fn remove_indexed(index: &mut HashMap<String, BTreeSet<String>>, key: &str, client: &str) {
    if let Some(set) = index.get_mut(key) {
        set.remove(client);
        if set.is_empty() {
            index.remove(key);
        }
    }
}

/// Presence in a NATS JetStream KV bucket (see the module docs).
pub struct NatsPresence {
    inner: Arc<Inner>,
    _mirror: AbortOnDrop,
}

impl std::fmt::Debug for NatsPresence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsPresence")
            .field("stream", &self.inner.stream_name)
            .field("setup", &*self.inner.setup.borrow())
            .finish_non_exhaustive()
    }
}

struct Inner {
    link: Link,
    stream: Stream<()>,
    stream_name: String,
    /// `$KV.<bucket>.`: a key's subject is this followed by the key.
    subjects: String,
    mirror: Mutex<Mirror>,
    progress: watch::Sender<Progress>,
    setup: watch::Sender<Setup>,
    /// Asks the mirror task to start over.
    rebuild: Notify,
    /// This process's last beat per node: its revision, when it was sent, the TTL.
    beats: Mutex<HashMap<String, (u64, Instant)>>,
    warnings: Throttle,
}

impl NatsPresence {
    /// Starts connecting to the NATS server(s) at `url` and returns at once. `prefix`
    /// is the cluster's topic prefix; it names the bucket ([`bucket_for`]).
    ///
    /// Fails only for a malformed URL. A server that is down is retried forever; calls
    /// fail with [`PresenceError::Unreachable`] meanwhile.
    pub async fn connect(url: &str, prefix: &str) -> Result<Self, PresenceError> {
        let link = Link::connect(url, Role::Presence)
            .await
            .map_err(|error| unavailable(&error.to_string()))?;
        let bucket = bucket_for(prefix);
        let stream_name = format!("KV_{bucket}");
        let stream = link
            .js()
            .get_stream_no_info(&stream_name)
            .await
            .map_err(|error| unavailable(&format!("bucket {bucket}: {error}")))?;
        let inner = Arc::new(Inner {
            link,
            stream,
            stream_name,
            subjects: format!("$KV.{bucket}."),
            mirror: Mutex::new(Mirror::default()),
            progress: watch::Sender::new(Progress::default()),
            setup: watch::Sender::new(Setup::Pending),
            rebuild: Notify::new(),
            beats: Mutex::new(HashMap::new()),
            warnings: Throttle::new(LOG_EVERY),
        });
        let task = tokio::spawn(follow_forever(Arc::clone(&inner)));
        Ok(Self {
            inner,
            _mirror: AbortOnDrop(task.abort_handle()),
        })
    }

    /// Waits until the store is connected, its bucket set up and its mirror loaded,
    /// for at most `timeout`; returns whether it is.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        crate::poll_until(timeout, WATCH_TICK, || {
            self.inner.link.connected()
                && matches!(*self.inner.setup.borrow(), Setup::Ready { .. })
                && self.inner.progress.borrow().loaded
        })
        .await
    }

    /// The JetStream stream holding the bucket (`KV_<bucket>`).
    pub fn stream_name(&self) -> &str {
        &self.inner.stream_name
    }
}

impl Inner {
    fn mirror(&self) -> MutexGuard<'_, Mirror> {
        self.mirror
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn connected(&self) -> bool {
        self.link.connected()
    }

    fn connects(&self) -> u64 {
        self.link.connects()
    }

    /// Fails at once when the store cannot be used now.
    fn usable(&self) -> Result<(), PresenceError> {
        if let Setup::Unavailable(reason) = &*self.setup.borrow() {
            return Err(unavailable(reason));
        }
        if !self.connected() {
            return Err(UNREACHABLE);
        }
        Ok(())
    }

    /// Runs `work` unless the store is unusable, and gives up on it as soon as the
    /// connection drops (async-nats would wait for its timeout).
    async fn guarded<T>(
        &self,
        work: impl Future<Output = Result<T, PresenceError>>,
    ) -> Result<T, PresenceError> {
        self.usable()?;
        self.link
            .while_connected(work)
            .await
            .unwrap_or(Err(UNREACHABLE))
    }

    /// Whether tombstones can carry a TTL; waits (briefly) for the bucket to be set up.
    async fn ttl_supported(&self) -> Result<bool, PresenceError> {
        let mut setup = self.setup.subscribe();
        let ready = tokio::time::timeout(
            SETUP_WAIT,
            setup.wait_for(|setup| !matches!(setup, Setup::Pending)),
        )
        .await
        .ok()
        .and_then(Result::ok)
        .map(|setup| setup.clone());
        match ready {
            Some(Setup::Ready { ttl }) => Ok(ttl),
            Some(Setup::Unavailable(reason)) => Err(unavailable(&reason)),
            _ => Err(UNREACHABLE),
        }
    }

    /// Writes `value` at `key` (`None` deletes it), expecting the key's last revision
    /// to be `expect` (0: no message) when given; returns the new revision.
    async fn write(
        &self,
        key: &str,
        value: Option<Bytes>,
        expect: Option<u64>,
    ) -> Result<u64, Fail> {
        self.usable()?;
        let ttl = self.ttl_supported().await?;
        let mut headers = HeaderMap::new();
        let payload = match value {
            Some(value) => value,
            None => {
                headers.insert(KV_OPERATION, "DEL");
                if ttl {
                    headers.insert(MESSAGE_TTL, TOMBSTONE_TTL.as_secs().to_string());
                }
                Bytes::new()
            }
        };
        if let Some(revision) = expect {
            headers.insert(EXPECTED_LAST_SUBJECT_SEQUENCE, revision.to_string());
        }
        let subject = format!("{}{key}", self.subjects);
        let written = self
            .guarded(async {
                match self.link.publish(subject, headers, payload).await {
                    Ok(ack) => Ok(Some(ack.sequence)),
                    Err(WriteError::Conflict) => Ok(None),
                    Err(WriteError::Unreachable) => Err(UNREACHABLE),
                    Err(WriteError::Gone) => {
                        // The bucket is gone (or JetStream is): the mirror task sets it
                        // up again.
                        self.rebuild.notify_one();
                        Err(UNREACHABLE)
                    }
                    Err(WriteError::Refused(why)) => {
                        Err(corrupt(format_args!("write refused: {why}")))
                    }
                }
            })
            .await?;
        written.ok_or(Fail::Conflict)
    }

    /// The last record of `key` (a tombstone too); `None` when it has none.
    async fn read(&self, key: &str) -> Result<Option<Record>, PresenceError> {
        let subject = format!("{}{key}", self.subjects);
        self.guarded(async {
            match self.link.get(&self.stream_name, Get::Last(&subject)).await {
                Ok(Some(message)) => {
                    let deleted = message
                        .headers
                        .get(KV_OPERATION)
                        .is_some_and(|operation| operation.as_str() != "PUT");
                    Ok(Some(Record {
                        seq: message.sequence,
                        value: (!deleted).then_some(message.payload),
                        written_ns: message.time.unix_timestamp_nanos(),
                    }))
                }
                Ok(None) => Ok(None),
                Err(ReadError::Unreachable) => Err(UNREACHABLE),
                Err(ReadError::Gone) => {
                    self.rebuild.notify_one();
                    Err(UNREACHABLE)
                }
                Err(ReadError::Refused(_)) if !self.connected() => Err(UNREACHABLE),
                Err(ReadError::Refused(why)) => Err(corrupt(format_args!("read refused: {why}"))),
            }
        })
        .await
    }

    /// Asks the server about the bucket's stream; `Ok(None)` when it does not exist.
    async fn stream_info(&self) -> Result<Option<StreamReply>, SetupError> {
        self.link.stream_info(&self.stream_name).await
    }

    /// The stream's last sequence: every write completed so far has one at most this.
    async fn last_sequence(&self) -> Result<u64, PresenceError> {
        self.guarded(async {
            match self.stream_info().await {
                Ok(Some(StreamReply {
                    state: Some(state), ..
                })) => Ok(state.last_seq),
                Ok(Some(_)) => Err(corrupt("stream info without a state")),
                Ok(None) => {
                    self.rebuild.notify_one();
                    Err(UNREACHABLE)
                }
                Err(SetupError::Unavailable(reason)) => Err(unavailable(&reason)),
                Err(SetupError::Transient(_)) => Err(UNREACHABLE),
            }
        })
        .await
    }

    /// Waits until the mirror has applied everything up to `sequence`.
    async fn caught_up(&self, sequence: u64) -> Result<(), PresenceError> {
        let mut progress = self.progress.subscribe();
        let before = *progress.borrow();
        let reached = self
            .guarded(async {
                tokio::time::timeout(
                    READ_WAIT,
                    progress.wait_for(|p| p.loaded && p.applied >= sequence),
                )
                .await
                .map_err(|_| UNREACHABLE)?
                .map(|_| ())
                .map_err(|_| UNREACHABLE)
            })
            .await;
        if reached.is_err() {
            let now = *self.progress.borrow();
            if now.epoch == before.epoch && now.applied == before.applied && self.connected() {
                // Stuck (say, the message it waits for vanished before delivery).
                self.rebuild.notify_one();
            }
        }
        reached
    }

    /// Makes the mirror reflect every write completed before this call.
    async fn sync(&self) -> Result<(), PresenceError> {
        let sequence = self.last_sequence().await?;
        self.caught_up(sequence).await
    }

    /// Reads a user's clients, changes them with `change`, and writes them back with
    /// compare-and-set (deleting the key once empty), until that wins. `change` returns
    /// its result and whether anything is to be written. Also returns the revision
    /// written (0 when nothing was).
    async fn update_user<R>(
        &self,
        user: &str,
        mut change: impl FnMut(&mut UserClients) -> (R, bool),
    ) -> Result<(R, u64), PresenceError> {
        let key = user_key(user);
        for attempt in 0..CAS_ATTEMPTS {
            let record = self.read(&key).await?;
            let mut clients: UserClients = match record.as_ref().and_then(|r| r.value.as_ref()) {
                Some(value) => parse(&key, value)?,
                None => UserClients::new(),
            };
            let (result, write) = change(&mut clients);
            if !write {
                return Ok((result, 0));
            }
            let value = if clients.is_empty() {
                None
            } else {
                Some(to_json(&clients)?)
            };
            let expect = record.map_or(0, |r| r.seq);
            match self.write(&key, value, Some(expect)).await {
                Ok(revision) => return Ok((result, revision)),
                Err(Fail::Conflict) => backoff(attempt).await,
                Err(Fail::Error(error)) => return Err(error),
            }
        }
        Err(UNREACHABLE)
    }

    /// Removes a claimed connection (at `revision`) from its user's clients; returns
    /// whether it was the user's last one.
    async fn release_user(
        &self,
        user: &str,
        client: &str,
        revision: u64,
    ) -> Result<bool, PresenceError> {
        let (last, _) = self
            .update_user(user, |clients| {
                if clients.get(client) != Some(&revision) {
                    // Recorded again since (or never): not this claim's to remove.
                    return (false, false);
                }
                clients.remove(client);
                (clients.is_empty(), true)
            })
            .await?;
        Ok(last)
    }

    /// Deletes member records (expecting their revisions); returns the channels whose
    /// record this call removed.
    async fn drop_memberships(
        &self,
        client: &str,
        memberships: Vec<(String, u64)>,
    ) -> Result<Vec<String>, PresenceError> {
        let mut left = Vec::new();
        for chunk in memberships.chunks(DELETE_BATCH) {
            let deletes = chunk.iter().map(|(channel, revision)| async move {
                let key = member_key(channel, client);
                (channel, self.write(&key, None, Some(*revision)).await)
            });
            for (channel, outcome) in futures_util::future::join_all(deletes).await {
                match outcome {
                    Ok(_) => left.push(channel.clone()),
                    // Joined again, or removed by someone else meanwhile.
                    Err(Fail::Conflict) => {}
                    Err(Fail::Error(error)) => return Err(error),
                }
            }
        }
        left.sort();
        Ok(left)
    }

    async fn beat(
        &self,
        node: &str,
        started_at_ms: u64,
        ttl: Duration,
    ) -> Result<Beat, PresenceError> {
        let key = node_key(node);
        let value = to_json(&NodeValue {
            started_at_ms,
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            dead: false,
        })?;
        for attempt in 0..CAS_ATTEMPTS {
            let record = self.read(&key).await?;
            let known = match &record {
                Some(Record {
                    seq,
                    value: Some(value),
                    written_ns,
                }) => {
                    let entry: NodeValue = parse(&key, value)?;
                    !entry.dead && !self.expired(node, *seq, *written_ns, &entry)
                }
                _ => false,
            };
            let sent = Instant::now();
            let expect = record.map_or(0, |r| r.seq);
            match self.write(&key, Some(value.clone()), Some(expect)).await {
                Ok(revision) => {
                    self.beats().insert(node.to_owned(), (revision, sent));
                    return Ok(Beat { known });
                }
                // A reaper marked it dead, or a twin beat: look again.
                Err(Fail::Conflict) => backoff(attempt).await,
                Err(Fail::Error(error)) => return Err(error),
            }
        }
        Err(UNREACHABLE)
    }

    fn beats(&self) -> MutexGuard<'_, HashMap<String, (u64, Instant)>> {
        self.beats
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether a liveness entry ran out: on this process's clock when this process
    /// wrote it, else by its server timestamp.
    fn expired(&self, node: &str, revision: u64, written_ns: i128, entry: &NodeValue) -> bool {
        match self.beats().get(node) {
            Some((mine, sent)) if *mine == revision => sent.elapsed() >= entry.ttl(),
            _ => age_of(written_ns) >= entry.ttl(),
        }
    }

    async fn retire(&self, node: &str) -> Result<(), PresenceError> {
        let key = node_key(node);
        self.beats().remove(node);
        for attempt in 0..CAS_ATTEMPTS {
            let Some(Record {
                seq,
                value: Some(value),
                ..
            }) = self.read(&key).await?
            else {
                return Ok(());
            };
            let mut entry: NodeValue = parse(&key, &value)?;
            if entry.dead {
                return Ok(());
            }
            entry.dead = true;
            match self.write(&key, Some(to_json(&entry)?), Some(seq)).await {
                Ok(_) => return Ok(()),
                Err(Fail::Conflict) => backoff(attempt).await,
                Err(Fail::Error(error)) => return Err(error),
            }
        }
        Err(UNREACHABLE)
    }

    /// Marks a replica whose liveness ran out as dead, unless it beat meanwhile;
    /// returns the revision of its dead entry, or `None` when it is alive after all.
    async fn mark_dead(
        &self,
        node: &str,
        revision: u64,
        entry: &NodeValue,
    ) -> Result<Option<u64>, PresenceError> {
        let key = node_key(node);
        let dead = NodeValue {
            dead: true,
            ..entry.clone()
        };
        match self
            .write(&key, Some(to_json(&dead)?), Some(revision))
            .await
        {
            Ok(revision) => Ok(Some(revision)),
            Err(Fail::Error(error)) => Err(error),
            Err(Fail::Conflict) => match self.read(&key).await? {
                Some(Record {
                    seq,
                    value: Some(value),
                    ..
                }) => {
                    let current: NodeValue = parse(&key, &value)?;
                    Ok(current.dead.then_some(seq))
                }
                // Forgotten by another reaper: its records are being removed.
                _ => Ok(None),
            },
        }
    }

    async fn reap(&self, only: Option<&str>, limit: usize) -> Result<Vec<Lost>, PresenceError> {
        self.sync().await?;
        let victims = self.mirror().victims(only, Instant::now());
        let mut lost = Vec::new();
        for victim in victims {
            if lost.len() >= limit {
                break;
            }
            match self
                .reap_victim(victim, only.is_some(), limit, &mut lost)
                .await
            {
                Ok(()) => {}
                // What is claimed must be handed over: report the failure next time.
                Err(error) if !lost.is_empty() => {
                    tracing::warn!(store = NAME, %error, "reaping stopped early");
                    break;
                }
                Err(error) => return Err(error),
            }
        }
        Ok(lost)
    }

    async fn reap_victim(
        &self,
        victim: Victim,
        on_demand: bool,
        limit: usize,
        lost: &mut Vec<Lost>,
    ) -> Result<(), PresenceError> {
        let node = victim.node;
        let entry = match victim.entry {
            Some((revision, entry)) if !entry.dead && !on_demand => {
                match self.mark_dead(&node, revision, &entry).await? {
                    Some(revision) => Some(revision),
                    None => return Ok(()),
                }
            }
            Some((revision, _)) => Some(revision),
            None => None,
        };
        let candidates = self.mirror().candidates(&node);
        for candidate in candidates {
            if lost.len() >= limit {
                return Ok(());
            }
            if let Some(one) = self.claim(candidate).await? {
                lost.push(one);
            }
        }
        self.forget(&node, entry).await
    }

    /// Claims a connection by deleting its record at the revision seen; the winner
    /// removes its memberships and its place among its user's clients.
    async fn claim(&self, candidate: Candidate) -> Result<Option<Lost>, PresenceError> {
        let key = connection_key(&candidate.client);
        match self.write(&key, None, Some(candidate.revision)).await {
            Ok(_) => {}
            Err(Fail::Conflict) => return Ok(None),
            Err(Fail::Error(error)) => return Err(error),
        }
        // Claimed: from here on it is reported whatever fails (leftovers are removed
        // with the replica).
        let channels = match self
            .drop_memberships(&candidate.client, candidate.memberships.clone())
            .await
        {
            Ok(channels) => channels,
            Err(error) => {
                tracing::warn!(store = NAME, %error, client = candidate.client, "memberships of a reaped connection left behind");
                candidate
                    .memberships
                    .into_iter()
                    .map(|(channel, _)| channel)
                    .collect()
            }
        };
        let last_of_user = match &candidate.connection.user {
            Some(user) => self
                .release_user(user, &candidate.client, candidate.revision)
                .await
                .unwrap_or_else(|error| {
                    tracing::warn!(store = NAME, %error, client = candidate.client, "user of a reaped connection not updated");
                    false
                }),
            None => false,
        };
        Ok(Some(Lost {
            connection: candidate.connection,
            last_of_user,
            channels,
        }))
    }

    /// Removes what a replica without connections still holds, then its entry (if it
    /// is still the one at `entry`).
    async fn forget(&self, node: &str, entry: Option<u64>) -> Result<(), PresenceError> {
        self.sync().await?;
        let Some(leftovers) = self.mirror().leftovers(node) else {
            // Connections appeared (it came back): not ours to forget.
            return Ok(());
        };
        for chunk in leftovers.chunks(DELETE_BATCH) {
            let deletes = chunk
                .iter()
                .map(|(key, revision)| self.write(key, None, Some(*revision)));
            for outcome in futures_util::future::join_all(deletes).await {
                if let Err(Fail::Error(error)) = outcome {
                    return Err(error);
                }
            }
        }
        if let Some(revision) = entry {
            match self.write(&node_key(node), None, Some(revision)).await {
                Ok(_) | Err(Fail::Conflict) => {}
                Err(Fail::Error(error)) => return Err(error),
            }
        }
        Ok(())
    }

    async fn connect(
        &self,
        connection: &Connection,
        replace: bool,
    ) -> Result<Connected, PresenceError> {
        let client = connection.client_id.as_str();
        let revision = self
            .write(&connection_key(client), Some(to_json(connection)?), None)
            .await
            .map_err(fail_error)?;
        let mut first_of_user = false;
        let mut seen = revision;
        if let Some(user) = &connection.user {
            let (first, written) = self
                .update_user(user, |clients| {
                    let others = clients.keys().any(|other| other != client);
                    clients.insert(client.to_owned(), revision);
                    (!others, true)
                })
                .await?;
            first_of_user = first;
            seen = seen.max(written);
        }
        let replaced = match (&connection.user, &connection.device) {
            (Some(user), Some(device)) if replace => {
                self.caught_up(seen).await?;
                self.mirror().state.same_device(user, device, client)
            }
            _ => Vec::new(),
        };
        Ok(Connected {
            first_of_user,
            replaced,
        })
    }

    async fn disconnect(&self, client: &str) -> Result<Disconnected, PresenceError> {
        let key = connection_key(client);
        for attempt in 0..CAS_ATTEMPTS {
            let Some(Record {
                seq,
                value: Some(value),
                ..
            }) = self.read(&key).await?
            else {
                // Not recorded: nothing to report, but memberships still go.
                self.sync().await?;
                let memberships = self.mirror().memberships(client);
                self.drop_memberships(client, memberships).await?;
                return Ok(Disconnected::default());
            };
            let connection: Connection = parse(&key, &value)?;
            let deleted = match self.write(&key, None, Some(seq)).await {
                Ok(deleted) => deleted,
                Err(Fail::Conflict) => {
                    backoff(attempt).await;
                    continue;
                }
                Err(Fail::Error(error)) => return Err(error),
            };
            let last_of_user = match &connection.user {
                Some(user) => self.release_user(user, client, seq).await?,
                None => false,
            };
            self.caught_up(deleted).await?;
            let memberships = self.mirror().memberships(client);
            let channels = self.drop_memberships(client, memberships).await?;
            return Ok(Disconnected {
                known: true,
                last_of_user,
                channels,
                connection: None,
            });
        }
        Err(UNREACHABLE)
    }

    async fn set_channel_counts(
        &self,
        node: &str,
        counts: &[(String, u64)],
    ) -> Result<(), PresenceError> {
        for chunk in counts.chunks(DELETE_BATCH) {
            let writes = chunk.iter().map(|(channel, count)| async move {
                let key = count_key(node, channel);
                let value = (*count > 0).then(|| Bytes::from(count.to_string()));
                self.write(&key, value, None).await
            });
            for outcome in futures_util::future::join_all(writes).await {
                outcome.map_err(fail_error)?;
            }
        }
        Ok(())
    }

    /// Answers from the mirror once it reflects every completed write.
    async fn query<T>(&self, question: impl FnOnce(&Mirror) -> T) -> Result<T, PresenceError> {
        self.sync().await?;
        Ok(question(&self.mirror()))
    }

    /// Sets the bucket up: finds its stream, or creates it.
    async fn prepare(&self) -> Result<bool, SetupError> {
        if let Some(reply) = self.stream_info().await? {
            return Ok(reply.config.is_some_and(|config| config.allow_msg_ttl));
        }
        let bucket = self
            .subjects
            .trim_start_matches("$KV.")
            .trim_end_matches('.');
        // What async-nats' `create_key_value` sends, plus per-message TTLs (for
        // tombstones; servers before 2.11 ignore the field).
        let config = serde_json::json!({
            "name": self.stream_name,
            "description": format!("Chorus presence ({bucket})"),
            "subjects": [format!("{}>", self.subjects)],
            "retention": "limits",
            "max_consumers": -1,
            "max_msgs": -1,
            "max_bytes": -1,
            "max_age": 0,
            "max_msgs_per_subject": 1,
            "max_msg_size": -1,
            "storage": "file",
            "discard": "new",
            "num_replicas": 1,
            "duplicate_window": 120_000_000_000u64,
            "allow_rollup_hdrs": true,
            "deny_delete": true,
            "deny_purge": false,
            "allow_direct": true,
            "allow_msg_ttl": true,
        });
        // Created meanwhile by another replica (perhaps with another config): used as is.
        let reply = self.link.create_stream(&config).await?;
        Ok(reply.config.is_some_and(|config| config.allow_msg_ttl))
    }

    /// Rebuilds the mirror and follows the bucket until the connection changes, the
    /// consumer fails or a rebuild is asked for.
    async fn follow(&self, connects: u64) -> Result<(), String> {
        let floor = self
            .last_sequence()
            .await
            .map_err(|error| error.to_string())?;
        let consumer = self
            .stream
            .create_consumer(OrderedConfig {
                deliver_subject: self.link.client().new_inbox(),
                description: Some("chorus presence mirror".to_owned()),
                filter_subject: format!("{}>", self.subjects),
                deliver_policy: DeliverPolicy::LastPerSubject,
                replay_policy: ReplayPolicy::Instant,
                ..Default::default()
            })
            .await
            .map_err(|error| error.to_string())?;
        let loaded = consumer.cached_info().num_pending == 0;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|error| error.to_string())?;
        *self.mirror() = Mirror::default();
        self.progress.send_modify(|progress| {
            progress.epoch += 1;
            progress.loaded = loaded;
            // Nothing to load: everything up to `floor` is (no longer) there.
            progress.applied = if loaded { floor } else { 0 };
        });
        let mut loading = !loaded;
        let mut tick = tokio::time::interval(WATCH_TICK);
        let mut batch = Vec::with_capacity(APPLY_BATCH);
        loop {
            tokio::select! {
                item = messages.next() => {
                    batch.push(item);
                    while batch.len() < APPLY_BATCH {
                        match messages.next().now_or_never() {
                            Some(item) => batch.push(item),
                            None => break,
                        }
                    }
                    for item in batch.drain(..) {
                        match item {
                            Some(Ok(message)) => self.apply(&message, &mut loading, floor)?,
                            Some(Err(error)) => return Err(error.to_string()),
                            None => return Err("the mirror consumer ended".to_owned()),
                        }
                    }
                }
                _ = tick.tick() => {
                    if !self.connected() || self.connects() != connects {
                        return Ok(());
                    }
                }
                () = self.rebuild.notified() => return Ok(()),
            }
        }
    }

    fn apply(
        &self,
        message: &jetstream::Message,
        loading: &mut bool,
        floor: u64,
    ) -> Result<(), String> {
        let info = message.info().map_err(|error| error.to_string())?;
        let (sequence, pending) = (info.stream_sequence, info.pending);
        let age = if *loading {
            age_of(info.published.unix_timestamp_nanos())
        } else {
            Duration::ZERO
        };
        let deleted = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(KV_OPERATION))
            .is_some_and(|operation| operation.as_str() != "PUT");
        let key = message
            .subject
            .as_str()
            .strip_prefix(self.subjects.as_str());
        let applied = match key {
            Some(key) => {
                let value = (!deleted).then_some(message.payload.as_ref());
                self.mirror().apply(key, sequence, value, age)
            }
            None => Err(corrupt(format_args!("foreign subject {}", message.subject))),
        };
        if let Err(error) = applied
            && let Some(count) = self.warnings.record(1)
        {
            tracing::warn!(store = NAME, %error, count, "unreadable presence records skipped");
        }
        if *loading && pending == 0 {
            *loading = false;
        }
        let loaded = !*loading;
        self.progress.send_modify(|progress| {
            progress.applied = progress.applied.max(sequence);
            if loaded && !progress.loaded {
                progress.loaded = true;
                progress.applied = progress.applied.max(floor);
            }
        });
        Ok(())
    }
}

fn fail_error(fail: Fail) -> PresenceError {
    match fail {
        Fail::Conflict => UNREACHABLE,
        Fail::Error(error) => error,
    }
}

/// After a lost compare-and-set: retry at once, then after short random pauses.
async fn backoff(attempt: u32) {
    if attempt < 2 {
        tokio::task::yield_now().await;
    } else {
        let most = u64::from(attempt.min(20));
        tokio::time::sleep(Duration::from_millis(rand::random_range(0..=most))).await;
    }
}

/// The mirror task: sets the bucket up after every (re)connect, then follows it.
async fn follow_forever(inner: Arc<Inner>) {
    let mut reported_unavailable = false;
    let transient = Throttle::new(LOG_EVERY);
    loop {
        while !inner.connected() {
            tokio::time::sleep(WATCH_TICK).await;
        }
        let connects = inner.connects();
        match inner.prepare().await {
            Ok(ttl) => {
                if reported_unavailable {
                    tracing::info!(store = NAME, "presence store available again");
                    reported_unavailable = false;
                }
                inner.setup.send_replace(Setup::Ready { ttl });
            }
            Err(SetupError::Unavailable(reason)) => {
                if !reported_unavailable {
                    tracing::error!(store = NAME, %reason, "NATS cannot hold presence");
                    reported_unavailable = true;
                }
                inner.setup.send_replace(Setup::Unavailable(reason));
                tokio::time::sleep(SETUP_RETRY).await;
                continue;
            }
            Err(SetupError::Transient(why)) => {
                if let Some(count) = transient.record(1) {
                    tracing::warn!(store = NAME, why, count, "presence bucket not set up yet");
                }
                tokio::time::sleep(SETUP_RETRY).await;
                continue;
            }
        }
        if let Err(why) = inner.follow(connects).await
            && inner.connected()
            && let Some(count) = transient.record(1)
        {
            tracing::warn!(store = NAME, why, count, "presence mirror restarting");
        }
        // Readers wait for the rebuilt mirror rather than read a stale one.
        inner
            .progress
            .send_modify(|progress| progress.loaded = false);
        tokio::time::sleep(WATCH_TICK).await;
    }
}

impl PresenceStore for NatsPresence {
    fn name(&self) -> &'static str {
        NAME
    }

    fn problem(&self) -> Option<String> {
        match &*self.inner.setup.borrow() {
            Setup::Unavailable(reason) => Some(reason.clone()),
            _ => None,
        }
    }

    fn beat<'a>(
        &'a self,
        node_id: &'a str,
        started_at_ms: u64,
        ttl: Duration,
    ) -> StoreFuture<'a, Beat> {
        Box::pin(self.inner.beat(node_id, started_at_ms, ttl))
    }

    fn retire<'a>(&'a self, node_id: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(self.inner.retire(node_id))
    }

    fn reap(&self, limit: usize) -> StoreFuture<'_, Vec<Lost>> {
        Box::pin(self.inner.reap(None, limit))
    }

    fn reap_node<'a>(&'a self, node_id: &'a str, limit: usize) -> StoreFuture<'a, Vec<Lost>> {
        Box::pin(self.inner.reap(Some(node_id), limit))
    }

    fn connect<'a>(
        &'a self,
        connection: &'a Connection,
        replace: bool,
    ) -> StoreFuture<'a, Connected> {
        Box::pin(self.inner.connect(connection, replace))
    }

    fn disconnect<'a>(&'a self, client_id: &'a str) -> StoreFuture<'a, Disconnected> {
        Box::pin(self.inner.disconnect(client_id))
    }

    fn join<'a>(&'a self, channel: &'a str, member: &'a Member) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let key = member_key(channel, &member.client_id);
            self.inner
                .write(&key, Some(to_json(member)?), None)
                .await
                .map(|_| ())
                .map_err(fail_error)
        })
    }

    fn leave<'a>(&'a self, channel: &'a str, client_id: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let key = member_key(channel, client_id);
            self.inner
                .write(&key, None, None)
                .await
                .map(|_| ())
                .map_err(fail_error)
        })
    }

    fn stats<'a>(&'a self, channel: &'a str) -> StoreFuture<'a, Stats> {
        Box::pin(self.inner.query(move |mirror| mirror.state.stats(channel)))
    }

    fn page<'a>(
        &'a self,
        channel: &'a str,
        limit: usize,
        after: Option<&'a str>,
    ) -> StoreFuture<'a, Page> {
        Box::pin(
            self.inner
                .query(move |mirror| mirror.state.page(channel, limit, after)),
        )
    }

    fn user<'a>(&'a self, user: &'a str) -> StoreFuture<'a, Vec<Connection>> {
        Box::pin(self.inner.query(move |mirror| mirror.state.user(user)))
    }

    fn nodes(&self) -> StoreFuture<'_, Vec<NodeStatus>> {
        Box::pin(
            self.inner
                .query(|mirror| mirror.state.nodes(Instant::now())),
        )
    }

    fn set_channel_counts<'a>(
        &'a self,
        node_id: &'a str,
        counts: &'a [(String, u64)],
    ) -> StoreFuture<'a, ()> {
        Box::pin(self.inner.set_channel_counts(node_id, counts))
    }

    fn channels(&self) -> StoreFuture<'_, Vec<(String, u64)>> {
        Box::pin(
            self.inner
                .query(|mirror| mirror.state.channels(Instant::now())),
        )
    }

    fn count_targets<'a>(
        &'a self,
        users: &'a [String],
        devices: &'a [String],
        clients: &'a [String],
    ) -> StoreFuture<'a, u64> {
        Box::pin(
            self.inner
                .query(move |mirror| mirror.state.count_targets(users, devices, clients)),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_key_tokens() {
        for name in [
            "",
            "a",
            "ab",
            "abc",
            "abcd",
            "ü ser.*>/x",
            "chat:room@1/x=y.z",
            "node.a/b:c/7",
        ] {
            let token = encode_name(name);
            assert!(
                token
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'='),
                "{token}"
            );
            assert_eq!(decode_name(&token).as_deref(), Some(name), "{name:?}");
        }
        assert_eq!(encode_name("f"), "Zg");
        assert_eq!(encode_name("fo"), "Zm8");
        assert_eq!(encode_name("foo"), "Zm9v");
        assert_eq!(encode_name("\u{fb}\u{ef}"), "w7vDrw");
    }

    #[test]
    fn only_canonical_tokens_decode() {
        for bad in ["", "Z", "Zh", "Zm9", "a.b", "Zm9v=", "+/", "Zm9vZ"] {
            assert_eq!(decode_name(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn keys_name_what_they_hold() {
        assert_eq!(parse_key(&node_key("n.1")), Some(Key::Node("n.1".into())));
        assert_eq!(
            parse_key(&member_key("a.b", "n/1")),
            Some(Key::Member {
                channel: "a.b".into(),
                client: "n/1".into()
            })
        );
        assert_eq!(
            parse_key(&count_key("n", "")),
            Some(Key::Count {
                node: "n".into(),
                channel: String::new()
            })
        );
        assert_eq!(parse_key(&user_key("u")), Some(Key::User("u".into())));
        assert_eq!(
            parse_key(&connection_key("n/1")),
            Some(Key::Connection("n/1".into()))
        );
        for foreign in ["x.YQ", "n", "n.YQ.YQ", "m.YQ", "k.!"] {
            assert_eq!(parse_key(foreign), None, "{foreign}");
        }
    }

    #[test]
    fn bucket_names_are_distinct() {
        assert_eq!(bucket_for("a.b"), "chorus-presence-a_2Eb");
        assert_eq!(bucket_for("a_2Eb"), "chorus-presence-a_5F2Eb");
    }

    fn connection(client: &str, user: Option<&str>) -> Connection {
        Connection {
            client_id: client.to_owned(),
            node_id: node_of_client(client).unwrap_or_default().to_owned(),
            user: user.map(str::to_owned),
            device: None,
            connected_at_ms: 1,
            remote_addr: "::1".to_owned(),
            info: None,
        }
    }

    fn json<T: Serialize>(value: &T) -> Vec<u8> {
        serde_json::to_vec(value).unwrap_or_default()
    }

    #[test]
    fn the_mirror_keeps_memberships_of_a_deleted_connection_until_their_keys_go() {
        let mut mirror = Mirror::default();
        let c = connection("n/1", Some("u"));
        let key = connection_key("n/1");
        assert!(
            mirror
                .apply(&key, 1, Some(&json(&c)), Duration::ZERO)
                .is_ok()
        );
        let member_key = member_key("room", "n/1");
        assert!(
            mirror
                .apply(&member_key, 2, Some(&json(&c.member())), Duration::ZERO)
                .is_ok()
        );
        assert!(mirror.apply(&key, 3, None, Duration::ZERO).is_ok());
        assert_eq!(mirror.state.stats("room").clients, 1);
        assert!(mirror.state.user("u").is_empty());
        assert_eq!(mirror.leftovers("n"), Some(vec![(member_key.clone(), 2)]));
        assert!(mirror.apply(&member_key, 4, None, Duration::ZERO).is_ok());
        assert_eq!(mirror.state.stats("room").clients, 0);
        assert_eq!(mirror.leftovers("n"), Some(vec![]));
    }

    #[test]
    fn the_mirror_keeps_counts_across_a_node_entry_deletion() {
        let mut mirror = Mirror::default();
        let entry = NodeValue {
            started_at_ms: 1,
            ttl_ms: 60_000,
            dead: false,
        };
        assert!(
            mirror
                .apply(&node_key("n"), 1, Some(&json(&entry)), Duration::ZERO)
                .is_ok()
        );
        assert!(
            mirror
                .apply(&count_key("n", "a"), 2, Some(b"3"), Duration::ZERO)
                .is_ok()
        );
        assert!(
            mirror
                .apply(&node_key("n"), 3, None, Duration::ZERO)
                .is_ok()
        );
        assert!(
            mirror
                .apply(&node_key("n"), 4, Some(&json(&entry)), Duration::ZERO)
                .is_ok()
        );
        assert_eq!(mirror.state.channels(Instant::now()), [("a".to_owned(), 3)]);
    }

    #[test]
    fn an_old_liveness_entry_counts_as_expired_on_load() {
        let mut mirror = Mirror::default();
        let entry = NodeValue {
            started_at_ms: 1,
            ttl_ms: 1_000,
            dead: false,
        };
        let value = json(&entry);
        assert!(
            mirror
                .apply(&node_key("old"), 1, Some(&value), Duration::from_secs(5))
                .is_ok()
        );
        assert!(
            mirror
                .apply(&node_key("new"), 2, Some(&value), Duration::ZERO)
                .is_ok()
        );
        let now = Instant::now();
        assert_eq!(mirror.state.expired_nodes(now), ["old"]);
    }

    #[test]
    fn unreadable_records_are_refused() {
        let mut mirror = Mirror::default();
        assert!(matches!(
            mirror.apply(&connection_key("n/1"), 1, Some(b"{"), Duration::ZERO),
            Err(PresenceError::Corrupt { .. })
        ));
        let other = json(&connection("n/2", None));
        assert!(
            mirror
                .apply(&connection_key("n/1"), 1, Some(&other), Duration::ZERO)
                .is_err()
        );
        assert!(mirror.apply("zz", 1, Some(b"1"), Duration::ZERO).is_err());
        assert!(mirror.state.user("u").is_empty());
    }
}
