//! Presence in this process's memory: the store of the `local` backbone (replicas
//! that share one [`MemoryPresence`] form a cluster inside a process), and the
//! [`PresenceState`] that a store keeping a local copy of a remote one (NATS KV) can
//! apply its updates to.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::{
    Beat, Connected, Connection, Disconnected, Lost, MAX_PAGE, Member, NodeStatus, Page,
    PresenceError, PresenceStore, Stats, StoreFuture,
};

/// One replica's liveness.
#[derive(Clone, Debug)]
pub struct NodeEntry {
    pub started_at_ms: u64,
    /// It counts as dead from this instant on.
    pub deadline: Instant,
}

/// A channel's members, and how many of them each user has.
#[derive(Default, Debug)]
struct ChannelMembers {
    members: BTreeMap<String, Member>,
    users: HashMap<String, u64>,
}

/// A connection's client id as the indices hold it: one allocation shared by the
/// connection table and the node, user and device indices, instead of a copy each.
type ClientKey = Arc<str>;

/// Every presence record, indexed for each question the trait asks. Mutations keep
/// the indices consistent; none of them fails.
#[derive(Default, Debug)]
pub struct PresenceState {
    nodes: BTreeMap<String, NodeEntry>,
    /// Boxed: a table sized for growth holds many empty slots, each as large as an
    /// entry.
    connections: HashMap<ClientKey, Box<Connection>>,
    by_node: HashMap<String, BTreeSet<ClientKey>>,
    /// A user or device mostly has one connection: see [`Ids`] (results are sorted
    /// where they are read).
    by_user: HashMap<String, Ids>,
    by_device: HashMap<String, Ids>,
    channels: HashMap<String, ChannelMembers>,
    /// Client id to the channels it is a member of.
    memberships: HashMap<String, BTreeSet<String>>,
    /// Node id to its subscriber count per channel.
    counts: HashMap<String, HashMap<String, u64>>,
}

impl PresenceState {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets a node's liveness entry; returns the previous one.
    pub fn set_node(&mut self, node_id: &str, entry: NodeEntry) -> Option<NodeEntry> {
        self.nodes.insert(node_id.to_owned(), entry)
    }

    pub fn node(&self, node_id: &str) -> Option<&NodeEntry> {
        self.nodes.get(node_id)
    }

    pub fn remove_node(&mut self, node_id: &str) -> Option<NodeEntry> {
        self.counts.remove(node_id);
        self.nodes.remove(node_id)
    }

    /// Nodes whose deadline passed.
    pub fn expired_nodes(&self, now: Instant) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|(_, entry)| entry.deadline <= now)
            .map(|(node, _)| node.clone())
            .collect()
    }

    /// Whether the node has a liveness entry that has not expired.
    pub fn is_live(&self, node_id: &str, now: Instant) -> bool {
        self.nodes
            .get(node_id)
            .is_some_and(|entry| entry.deadline > now)
    }

    /// Records (or replaces) a connection; returns the user's connection count before,
    /// not counting this one.
    pub fn insert_connection(&mut self, connection: Connection) -> usize {
        let client_id = ClientKey::from(connection.client_id.as_str());
        if self.connections.contains_key(&client_id) {
            self.remove_connection_only(&client_id);
        }
        let before = connection
            .user
            .as_ref()
            .map_or(0, |user| self.by_user.get(user).map_or(0, Ids::len));
        self.by_node
            .entry(connection.node_id.clone())
            .or_default()
            .insert(Arc::clone(&client_id));
        if let Some(user) = &connection.user {
            add_id(&mut self.by_user, user, &client_id);
        }
        if let Some(device) = &connection.device {
            add_id(&mut self.by_device, device, &client_id);
        }
        self.connections.insert(client_id, Box::new(connection));
        before
    }

    /// Removes a connection and its memberships; returns it, whether its user has no
    /// connection left, and the channels it left.
    pub fn remove_connection(
        &mut self,
        client_id: &str,
    ) -> Option<(Connection, bool, Vec<String>)> {
        let channels: Vec<String> = self
            .memberships
            .remove(client_id)
            .map(|set| set.into_iter().collect())
            .unwrap_or_default();
        for channel in &channels {
            self.remove_member_only(channel, client_id);
        }
        let connection = self.remove_connection_only(client_id)?;
        let last_of_user = connection
            .user
            .as_ref()
            .is_some_and(|user| !self.by_user.contains_key(user));
        Some((connection, last_of_user, channels))
    }

    fn remove_connection_only(&mut self, client_id: &str) -> Option<Connection> {
        let connection = *self.connections.remove(client_id)?;
        remove_indexed(&mut self.by_node, &connection.node_id, client_id);
        if let Some(user) = &connection.user {
            remove_from_set(&mut self.by_user, user, client_id);
        }
        if let Some(device) = &connection.device {
            remove_from_set(&mut self.by_device, device, client_id);
        }
        Some(connection)
    }

    pub fn connection(&self, client_id: &str) -> Option<&Connection> {
        self.connections
            .get(client_id)
            .map(|connection| &**connection)
    }

    /// Adds (or replaces) a channel member.
    pub fn add_member(&mut self, channel: &str, member: Member) {
        let client_id = member.client_id.clone();
        self.remove_member_only(channel, &client_id);
        let members = self.channels.entry(channel.to_owned()).or_default();
        if let Some(user) = &member.user {
            *members.users.entry(user.clone()).or_default() += 1;
        }
        members.members.insert(client_id.clone(), member);
        self.memberships
            .entry(client_id)
            .or_default()
            .insert(channel.to_owned());
    }

    /// Removes a channel member; returns whether it was one.
    pub fn remove_member(&mut self, channel: &str, client_id: &str) -> bool {
        if let Some(set) = self.memberships.get_mut(client_id) {
            set.remove(channel);
            if set.is_empty() {
                self.memberships.remove(client_id);
            }
        }
        self.remove_member_only(channel, client_id)
    }

    fn remove_member_only(&mut self, channel: &str, client_id: &str) -> bool {
        let Some(members) = self.channels.get_mut(channel) else {
            return false;
        };
        let Some(member) = members.members.remove(client_id) else {
            return false;
        };
        if let Some(user) = &member.user
            && let Some(count) = members.users.get_mut(user)
        {
            *count -= 1;
            if *count == 0 {
                members.users.remove(user);
            }
        }
        if members.members.is_empty() {
            self.channels.remove(channel);
        }
        true
    }

    /// The user's other connections with `device`.
    pub fn same_device(&self, user: &str, device: &str, except: &str) -> Vec<Connection> {
        let mut found: Vec<Connection> = self
            .by_user
            .get(user)
            .into_iter()
            .flat_map(Ids::iter)
            .filter(|client_id| *client_id != except)
            .filter_map(|client_id| self.connection(client_id))
            .filter(|connection| connection.device.as_deref() == Some(device))
            .cloned()
            .collect();
        sort_by_client(&mut found);
        found
    }

    pub fn stats(&self, channel: &str) -> Stats {
        self.channels
            .get(channel)
            .map_or(Stats::default(), |members| Stats {
                clients: members.members.len() as u64,
                users: members.users.len() as u64,
            })
    }

    pub fn page(&self, channel: &str, limit: usize, after: Option<&str>) -> Page {
        let limit = limit.clamp(1, MAX_PAGE);
        let Some(members) = self.channels.get(channel) else {
            return Page::default();
        };
        let range = match after {
            Some(after) => members
                .members
                .range::<str, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded)),
            None => members.members.range::<str, _>(..),
        };
        let mut page: Vec<Member> = range.take(limit + 1).map(|(_, m)| m.clone()).collect();
        let cursor = if page.len() > limit {
            page.truncate(limit);
            page.last().map(|member| member.client_id.clone())
        } else {
            None
        };
        Page {
            members: page,
            cursor,
        }
    }

    pub fn user(&self, user: &str) -> Vec<Connection> {
        let mut found: Vec<Connection> = self
            .by_user
            .get(user)
            .into_iter()
            .flat_map(Ids::iter)
            .filter_map(|client_id| self.connection(client_id))
            .cloned()
            .collect();
        sort_by_client(&mut found);
        found
    }

    /// Live nodes (deadline after `now`).
    pub fn nodes(&self, now: Instant) -> Vec<NodeStatus> {
        self.nodes
            .iter()
            .filter(|(_, entry)| entry.deadline > now)
            .map(|(node_id, entry)| NodeStatus {
                node_id: node_id.clone(),
                connections: self.by_node.get(node_id).map_or(0, |set| set.len() as u64),
                started_at_ms: entry.started_at_ms,
            })
            .collect()
    }

    /// Sets one node's count for one channel (0 removes it).
    pub fn set_channel_count(&mut self, node_id: &str, channel: &str, count: u64) {
        if count == 0 {
            if let Some(counts) = self.counts.get_mut(node_id) {
                counts.remove(channel);
                if counts.is_empty() {
                    self.counts.remove(node_id);
                }
            }
        } else {
            self.counts
                .entry(node_id.to_owned())
                .or_default()
                .insert(channel.to_owned(), count);
        }
    }

    /// Channel counts summed over live nodes.
    pub fn channels(&self, now: Instant) -> Vec<(String, u64)> {
        let mut sums: BTreeMap<&str, u64> = BTreeMap::new();
        for (node_id, counts) in &self.counts {
            if !self.is_live(node_id, now) {
                continue;
            }
            for (channel, count) in counts {
                *sums.entry(channel).or_default() += count;
            }
        }
        sums.into_iter()
            .map(|(channel, count)| (channel.to_owned(), count))
            .collect()
    }

    pub fn count_targets(&self, users: &[String], devices: &[String], clients: &[String]) -> u64 {
        let mut targeted: HashSet<&str> = HashSet::new();
        for user in users {
            targeted.extend(self.by_user.get(user).into_iter().flat_map(Ids::iter));
        }
        for device in devices {
            targeted.extend(self.by_device.get(device).into_iter().flat_map(Ids::iter));
        }
        for client in clients {
            if self.connections.contains_key(client.as_str()) {
                targeted.insert(client);
            }
        }
        targeted.len() as u64
    }

    /// Removes up to `limit` connections of `node_id` and reports them; forgets the
    /// node once it holds nothing.
    pub fn reap_node(&mut self, node_id: &str, limit: usize) -> Vec<Lost> {
        let victims: Vec<ClientKey> = self
            .by_node
            .get(node_id)
            .into_iter()
            .flatten()
            .take(limit)
            .cloned()
            .collect();
        let lost: Vec<Lost> = victims
            .iter()
            .filter_map(|client_id| self.remove_connection(client_id))
            .map(|(connection, last_of_user, channels)| Lost {
                connection,
                last_of_user,
                channels,
            })
            .collect();
        if !self.by_node.contains_key(node_id) {
            // Memberships of clients whose connection was never recorded.
            let orphans: Vec<String> = self
                .memberships
                .keys()
                .filter(|client_id| super::node_of_client(client_id) == Some(node_id))
                .cloned()
                .collect();
            for client_id in orphans {
                if let Some(channels) = self.memberships.remove(&client_id) {
                    for channel in channels {
                        self.remove_member_only(&channel, &client_id);
                    }
                }
            }
            self.remove_node(node_id);
        }
        lost
    }
}

/// Client ids of one user or device: one inline, more in a boxed set, so the usual
/// single connection costs no table of its own.
#[derive(Debug)]
enum Ids {
    One(ClientKey),
    // Boxed: an inline set would widen every entry of the index.
    #[allow(clippy::box_collection)]
    Many(Box<HashSet<ClientKey>>),
}

impl Ids {
    fn len(&self) -> usize {
        match self {
            Self::One(_) => 1,
            Self::Many(ids) => ids.len(),
        }
    }

    fn iter(&self) -> Box<dyn Iterator<Item = &str> + '_> {
        match self {
            Self::One(id) => Box::new(std::iter::once(&**id)),
            Self::Many(ids) => Box::new(ids.iter().map(|id| &**id)),
        }
    }
}

fn add_id(index: &mut HashMap<String, Ids>, key: &str, client_id: &ClientKey) {
    let Some(ids) = index.get_mut(key) else {
        index.insert(key.to_owned(), Ids::One(Arc::clone(client_id)));
        return;
    };
    match ids {
        Ids::One(only) if only == client_id => {}
        Ids::One(only) => {
            let both = HashSet::from([Arc::clone(only), Arc::clone(client_id)]);
            *ids = Ids::Many(Box::new(both));
        }
        Ids::Many(set) => {
            set.insert(Arc::clone(client_id));
        }
    }
}

fn remove_from_set(index: &mut HashMap<String, Ids>, key: &str, client_id: &str) {
    let empty = match index.get_mut(key) {
        Some(Ids::One(only)) => &**only == client_id,
        Some(Ids::Many(set)) => {
            set.remove(client_id);
            set.is_empty()
        }
        None => false,
    };
    if empty {
        index.remove(key);
    }
}

fn sort_by_client(connections: &mut [Connection]) {
    connections.sort_unstable_by(|a, b| a.client_id.cmp(&b.client_id));
}

fn remove_indexed(index: &mut HashMap<String, BTreeSet<ClientKey>>, key: &str, client_id: &str) {
    if let Some(set) = index.get_mut(key) {
        set.remove(client_id);
        if set.is_empty() {
            index.remove(key);
        }
    }
}

/// Presence held in this process. Clones share one state, so replicas in one process
/// (on one [`crate::local::LocalBus`]) see each other.
#[derive(Clone, Default)]
pub struct MemoryPresence {
    state: Arc<Mutex<PresenceState>>,
    /// Made by [`MemoryPresence::own`]: see [`PresenceStore::keeps_everything`].
    own: bool,
}

impl std::fmt::Debug for MemoryPresence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryPresence").finish_non_exhaustive()
    }
}

impl MemoryPresence {
    pub fn new() -> Self {
        Self::default()
    }

    /// A store for one replica alone (standalone): nothing else writes or reaps it,
    /// so the replica need not keep its own copy of what it recorded.
    pub fn own() -> Self {
        Self {
            own: true,
            ..Self::default()
        }
    }

    fn state(&self) -> MutexGuard<'_, PresenceState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn ready<'a, T: Send + 'a>(value: T) -> StoreFuture<'a, T> {
        Box::pin(std::future::ready(Ok::<T, PresenceError>(value)))
    }
}

impl PresenceStore for MemoryPresence {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn keeps_everything(&self) -> bool {
        self.own
    }

    fn beat<'a>(
        &'a self,
        node_id: &'a str,
        started_at_ms: u64,
        ttl: Duration,
    ) -> StoreFuture<'a, Beat> {
        let now = Instant::now();
        let previous = self.state().set_node(
            node_id,
            NodeEntry {
                started_at_ms,
                deadline: now + ttl,
            },
        );
        Self::ready(Beat {
            known: previous.is_some_and(|entry| entry.deadline > now),
        })
    }

    fn retire<'a>(&'a self, node_id: &'a str) -> StoreFuture<'a, ()> {
        let mut state = self.state();
        if let Some(entry) = state.nodes.get_mut(node_id) {
            entry.deadline = Instant::now();
        }
        Self::ready(())
    }

    fn reap(&self, limit: usize) -> StoreFuture<'_, Vec<Lost>> {
        let mut state = self.state();
        let mut lost = Vec::new();
        for node_id in state.expired_nodes(Instant::now()) {
            if lost.len() >= limit {
                break;
            }
            let more = state.reap_node(&node_id, limit - lost.len());
            lost.extend(more);
        }
        Self::ready(lost)
    }

    fn reap_node<'a>(&'a self, node_id: &'a str, limit: usize) -> StoreFuture<'a, Vec<Lost>> {
        let lost = self.state().reap_node(node_id, limit);
        Self::ready(lost)
    }

    fn connect<'a>(
        &'a self,
        connection: &'a Connection,
        replace: bool,
    ) -> StoreFuture<'a, Connected> {
        let mut state = self.state();
        let before = state.insert_connection(connection.clone());
        let replaced = match (&connection.user, &connection.device) {
            (Some(user), Some(device)) if replace => {
                state.same_device(user, device, &connection.client_id)
            }
            _ => Vec::new(),
        };
        Self::ready(Connected {
            first_of_user: connection.user.is_some() && before == 0,
            replaced,
        })
    }

    fn disconnect<'a>(&'a self, client_id: &'a str) -> StoreFuture<'a, Disconnected> {
        let removed = self.state().remove_connection(client_id);
        Self::ready(match removed {
            Some((connection, last_of_user, channels)) => Disconnected {
                known: true,
                last_of_user,
                channels,
                // Only a store of one replica's own stands in for the replica's copy.
                connection: self.own.then_some(connection),
            },
            None => Disconnected::default(),
        })
    }

    fn join<'a>(&'a self, channel: &'a str, member: &'a Member) -> StoreFuture<'a, ()> {
        self.state().add_member(channel, member.clone());
        Self::ready(())
    }

    fn leave<'a>(&'a self, channel: &'a str, client_id: &'a str) -> StoreFuture<'a, ()> {
        self.state().remove_member(channel, client_id);
        Self::ready(())
    }

    fn stats<'a>(&'a self, channel: &'a str) -> StoreFuture<'a, Stats> {
        let stats = self.state().stats(channel);
        Self::ready(stats)
    }

    fn page<'a>(
        &'a self,
        channel: &'a str,
        limit: usize,
        after: Option<&'a str>,
    ) -> StoreFuture<'a, Page> {
        let page = self.state().page(channel, limit, after);
        Self::ready(page)
    }

    fn user<'a>(&'a self, user: &'a str) -> StoreFuture<'a, Vec<Connection>> {
        let connections = self.state().user(user);
        Self::ready(connections)
    }

    fn nodes(&self) -> StoreFuture<'_, Vec<NodeStatus>> {
        let nodes = self.state().nodes(Instant::now());
        Self::ready(nodes)
    }

    fn set_channel_counts<'a>(
        &'a self,
        node_id: &'a str,
        counts: &'a [(String, u64)],
    ) -> StoreFuture<'a, ()> {
        let mut state = self.state();
        for (channel, count) in counts {
            state.set_channel_count(node_id, channel, *count);
        }
        Self::ready(())
    }

    fn channels(&self) -> StoreFuture<'_, Vec<(String, u64)>> {
        let channels = self.state().channels(Instant::now());
        Self::ready(channels)
    }

    fn count_targets<'a>(
        &'a self,
        users: &'a [String],
        devices: &'a [String],
        clients: &'a [String],
    ) -> StoreFuture<'a, u64> {
        let count = self.state().count_targets(users, devices, clients);
        Self::ready(count)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_id_index_grows_from_one_to_many_and_back_to_nothing() {
        let mut index = HashMap::new();
        add_id(&mut index, "alice", &ClientKey::from("n/1"));
        add_id(&mut index, "alice", &ClientKey::from("n/1"));
        assert_eq!(index["alice"].len(), 1, "the same id once");
        add_id(&mut index, "alice", &ClientKey::from("n/2"));
        let mut ids: Vec<&str> = index["alice"].iter().collect();
        ids.sort();
        assert_eq!(ids, ["n/1", "n/2"]);
        remove_from_set(&mut index, "alice", "n/3");
        remove_from_set(&mut index, "alice", "n/1");
        assert_eq!(index["alice"].len(), 1);
        remove_from_set(&mut index, "alice", "n/2");
        assert!(index.is_empty());
        add_id(&mut index, "bob", &ClientKey::from("n/4"));
        remove_from_set(&mut index, "bob", "n/5");
        assert_eq!(index["bob"].len(), 1, "a stranger's id changes nothing");
        remove_from_set(&mut index, "bob", "n/4");
        assert!(index.is_empty());
    }
}
