//! Cluster-wide presence: which connections exist (by user and device), who is in
//! which channel, which replicas are alive, and how many subscribers each channel has
//! on each replica. One [`PresenceStore`] trait, three stores that follow the
//! backbone: [`memory`] (one process), [`redis`] and [`nats`] (JetStream KV).
//!
//! Liveness is per replica, not per member: a replica refreshes one entry
//! ([`PresenceStore::beat`]); once it expires, the replica's connections and channel
//! memberships are removed by [`PresenceStore::reap`], called by every replica, which
//! hands each removed connection to exactly one caller (so that one replica reports
//! it). Transitions that must be decided once for the whole cluster (a user's first
//! connection anywhere, the last one gone) are decided atomically inside the store.
//!
//! Every read reflects every write that completed before the read began, on any
//! replica.

pub mod memory;
pub mod nats;
pub mod redis;
pub mod sharded;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// Most members one [`PresenceStore::page`] returns.
pub const MAX_PAGE: usize = 1000;

/// A future returned by a store; it borrows the store and its arguments.
pub type StoreFuture<'a, T, E = PresenceError> =
    Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'a>>;

/// Why a presence operation did not happen.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PresenceError {
    /// The store cannot be reached now (connection down, timeout).
    #[error("the {0} presence store is unreachable")]
    Unreachable(&'static str),
    /// The store exists but cannot hold presence (e.g. NATS without JetStream).
    #[error("the {store} presence store is unavailable: {reason}")]
    Unavailable { store: &'static str, reason: String },
    /// The store answered something this replica cannot read.
    #[error("the {store} presence store answered unexpectedly: {reason}")]
    Corrupt { store: &'static str, reason: String },
}

/// One connection, as `info {"user"}` shows it and as reaping needs it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Connection {
    /// `"<node_id>/<n>"`: unique in the cluster.
    pub client_id: String,
    pub node_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub connected_at_ms: u64,
    /// The client's address as the server saw it (after trusted proxies).
    pub remote_addr: String,
    /// The token's `info` claim, any JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<Box<RawValue>>,
}

impl Connection {
    /// This connection as a channel member.
    pub fn member(&self) -> Member {
        Member {
            client_id: self.client_id.clone(),
            node_id: self.node_id.clone(),
            user: self.user.clone(),
            device: self.device.clone(),
            info: self.info.clone(),
        }
    }
}

/// One member of a channel, as `presence` shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Member {
    pub client_id: String,
    pub node_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<Box<RawValue>>,
}

/// What [`PresenceStore::connect`] decided.
#[derive(Clone, Debug, Default)]
pub struct Connected {
    /// No other connection of this user existed anywhere: the user came online.
    pub first_of_user: bool,
    /// With `replace`: the user's other connections with the same device, which the
    /// caller is to close (they stay in the store until their replicas remove them).
    pub replaced: Vec<Connection>,
}

/// What [`PresenceStore::disconnect`] decided.
#[derive(Clone, Debug, Default)]
pub struct Disconnected {
    /// Whether the store held the connection (false: reaped meanwhile, or never
    /// recorded): then nothing is to be reported.
    pub known: bool,
    /// It was the user's last connection anywhere: the user went offline.
    pub last_of_user: bool,
    /// The channels it was a member of, now left.
    pub channels: Vec<String>,
    /// The removed connection, from a store that [`PresenceStore::keeps_everything`]
    /// (the replica keeps no copy of its own then).
    pub connection: Option<Connection>,
}

/// `presence_stats` of one channel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Members (connections).
    pub clients: u64,
    /// Distinct users among them (members without a user do not count).
    pub users: u64,
}

/// One page of a channel's members, ordered by client id.
#[derive(Clone, Debug, Default)]
pub struct Page {
    pub members: Vec<Member>,
    /// The client id to continue after; `None` on the last page.
    pub cursor: Option<String>,
}

/// A live replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeStatus {
    pub node_id: String,
    /// Its connections recorded in the store.
    pub connections: u64,
    /// Milliseconds since the Unix epoch when it started.
    pub started_at_ms: u64,
}

/// What a liveness refresh found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Beat {
    /// The store held this replica's entry and it had not expired. False on the first
    /// beat, after the store lost its data, or after the replica was presumed dead
    /// (then some of its records may be gone): the caller records its connections and
    /// memberships again.
    pub known: bool,
}

/// A connection removed because its replica was presumed dead.
#[derive(Clone, Debug)]
pub struct Lost {
    pub connection: Connection,
    /// It was the user's last connection anywhere.
    pub last_of_user: bool,
    /// The channels it was a member of.
    pub channels: Vec<String>,
}

/// Where presence lives. Methods never block the caller's thread; every call is one
/// (or a few) round trips to the store.
///
/// Writes are idempotent where a retry could repeat them: connecting a recorded
/// connection again replaces its record, joining twice keeps one membership, removing
/// what is gone is not an error.
pub trait PresenceStore: Send + Sync + 'static {
    /// `memory`, `redis` or `nats`, for logs and metrics.
    fn name(&self) -> &'static str;

    /// Why the store cannot hold presence at all, if it cannot (e.g. NATS without
    /// JetStream): `/health` reports it. A store that is merely unreachable for now is
    /// not unhealthy here; its calls fail with [`PresenceError::Unreachable`].
    fn problem(&self) -> Option<String> {
        None
    }

    /// Only this replica writes here, and nothing it wrote can be lost (a store of its
    /// own in this process): the replica keeps no copy to record again, and there are
    /// no leftovers of an earlier process to reap.
    fn keeps_everything(&self) -> bool {
        false
    }

    /// Refreshes `node_id`'s liveness: it counts as alive for `ttl` from now.
    /// `started_at_ms` is shown by [`PresenceStore::nodes`].
    fn beat<'a>(
        &'a self,
        node_id: &'a str,
        started_at_ms: u64,
        ttl: Duration,
    ) -> StoreFuture<'a, Beat>;

    /// Marks `node_id` as dead now (a graceful exit): whatever it still holds is
    /// reaped by the next [`PresenceStore::reap`].
    fn retire<'a>(&'a self, node_id: &'a str) -> StoreFuture<'a, ()>;

    /// Removes up to `limit` connections of replicas whose liveness expired (or that
    /// retired), with their channel memberships and channel counts; a replica with
    /// nothing left is forgotten. Each connection is handed to exactly one caller in
    /// the cluster. Empty when there is nothing to reap.
    fn reap(&self, limit: usize) -> StoreFuture<'_, Vec<Lost>>;

    /// Like [`PresenceStore::reap`], for one replica whether it looks alive or not: a
    /// replica starting under a node id that an earlier process used removes that
    /// process's leftovers before its first beat.
    fn reap_node<'a>(&'a self, node_id: &'a str, limit: usize) -> StoreFuture<'a, Vec<Lost>>;

    /// Records a connection. With `replace` and a device, also finds the user's other
    /// connections with that device.
    fn connect<'a>(
        &'a self,
        connection: &'a Connection,
        replace: bool,
    ) -> StoreFuture<'a, Connected>;

    /// Removes a connection and its channel memberships.
    fn disconnect<'a>(&'a self, client_id: &'a str) -> StoreFuture<'a, Disconnected>;

    /// Removes every channel membership of each of `client_ids` (not their
    /// connections); returns, per client in order, the channels it was in.
    /// [`sharded::ShardedPresence`] calls it on the shards that hold only memberships,
    /// where the default (a disconnect per client) does the same in more round trips.
    fn leave_all<'a>(&'a self, client_ids: &'a [String]) -> StoreFuture<'a, Vec<Vec<String>>> {
        Box::pin(async move {
            let mut channels = Vec::with_capacity(client_ids.len());
            for client_id in client_ids {
                channels.push(self.disconnect(client_id).await?.channels);
            }
            Ok(channels)
        })
    }

    /// Adds `member` to `channel` (the connection should be recorded first).
    fn join<'a>(&'a self, channel: &'a str, member: &'a Member) -> StoreFuture<'a, ()>;

    /// Removes `client_id` from `channel`.
    fn leave<'a>(&'a self, channel: &'a str, client_id: &'a str) -> StoreFuture<'a, ()>;

    fn stats<'a>(&'a self, channel: &'a str) -> StoreFuture<'a, Stats>;

    /// Members with a client id greater than `after`, at most `limit` (capped at
    /// [`MAX_PAGE`]), in client id order. A member present during the whole walk is
    /// returned exactly once.
    fn page<'a>(
        &'a self,
        channel: &'a str,
        limit: usize,
        after: Option<&'a str>,
    ) -> StoreFuture<'a, Page>;

    /// The user's connections, ordered by client id.
    fn user<'a>(&'a self, user: &'a str) -> StoreFuture<'a, Vec<Connection>>;

    /// The live replicas, ordered by node id.
    fn nodes(&self) -> StoreFuture<'_, Vec<NodeStatus>>;

    /// Sets `node_id`'s subscriber count of each channel (0 removes it).
    fn set_channel_counts<'a>(
        &'a self,
        node_id: &'a str,
        counts: &'a [(String, u64)],
    ) -> StoreFuture<'a, ()>;

    /// Every channel with a subscriber on a live replica, and the sum of its counts,
    /// ordered by channel.
    fn channels(&self) -> StoreFuture<'_, Vec<(String, u64)>>;

    /// How many distinct recorded connections belong to any of `users`, have any of
    /// `devices`, or are one of `clients`.
    fn count_targets<'a>(
        &'a self,
        users: &'a [String],
        devices: &'a [String],
        clients: &'a [String],
    ) -> StoreFuture<'a, u64>;
}

/// The node id in a client id `"<node_id>/<n>"`.
pub fn node_of_client(client_id: &str) -> Option<&str> {
    client_id
        .rsplit_once('/')
        .map(|(node, _)| node)
        .filter(|node| !node.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_id_names_its_node() {
        assert_eq!(node_of_client("node-a/17"), Some("node-a"));
        assert_eq!(node_of_client("pod/x/3"), Some("pod/x"));
        assert_eq!(node_of_client("17"), None);
        assert_eq!(node_of_client("/17"), None);
    }
}
