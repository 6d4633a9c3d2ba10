//! Presence spread over several stores the way the backbone spreads channels
//! ([`crate::shards`]): each channel's members live on the store of the channel's
//! shard, the same server that carries its publications and its history. One shard's
//! outage then stops only its own channels' presence, and channel presence load (joins,
//! leaves, `presence`, `presence_stats`) is spread over the shards.
//!
//! # Where things live
//!
//! The first store is the *home*. Whatever is about connections, users, devices and
//! replicas lives there alone, exactly as in one store: connection records (so
//! `first_of_user`, `last_of_user` and device replacement are decided atomically in
//! one place, once for the cluster), replica liveness, and the replicas' subscriber
//! counts (`channels`, a small per-replica summary).
//!
//! | method | goes to |
//! |---|---|
//! | `join`, `leave`, `stats`, `page` | the channel's shard |
//! | `connect`, `user`, `nodes`, `count_targets`, `set_channel_counts`, `channels`, `retire` | the home |
//! | `disconnect` | the home, which decides `known` and `last_of_user`, and the shards the client joined channels on through this store (every shard for a client it does not know); `channels` is the union |
//! | `beat` | every shard (the others with a longer liveness, see below); `known` only if every reachable shard knew this replica |
//! | `reap`, `reap_node` | the home hands out each connection once, with its channels on every shard |
//!
//! The other shards hold only channel memberships. A store keeps a membership whose
//! connection it never recorded, found through the member's node (see the Redis
//! store's `no|<node>` key), so such memberships are removed with the connection
//! (`disconnect` on the shards it joined channels on, which also reports the channels
//! it removed) or with the replica.
//!
//! # A dead replica
//!
//! The home reaps each connection of a dead replica once (to exactly one caller); that
//! caller then removes the connections' memberships from every other shard
//! ([`PresenceStore::leave_all`], one call per shard per batch) and reports all of a
//! connection's channels in its one [`Lost`], so every channel's leave is reported
//! once. A replica's liveness on the other shards lasts
//! [`AWAY_TTL_FACTOR`] times longer than at home, so those shards forget a dead
//! replica's leftovers (memberships whose removal failed) only well after the home's
//! reapers have taken what they report; reaping the other shards is done when the home
//! has nothing left to reap. Retiring is the home's only: what a retired replica left
//! elsewhere goes when its liveness there runs out.
//!
//! # A shard that is down
//!
//! Only the calls that need it fail, with its [`PresenceError::Unreachable`]: channel
//! calls on its channels (and everything while the home is down). A failed write to a
//! shard other than the home (a disconnect, a beat, a start-up `reap_node`) marks that
//! shard stale:
//! the next beat that reaches it first removes this replica's memberships there
//! (`reap_node`, quietly: they may include some that should have gone while it was
//! down) and then reports `known: false`, so the replica records its memberships again.
//! Failed joins and leaves are reported to the caller, which records everything again
//! too.
//!
//! # Redis Cluster
//!
//! Over a Redis Cluster the shards are not servers but hash tags on one link
//! (`crate::redis::CLUSTER_SHARDS` of them, each one slot, placed by the same jump
//! hash), the tags the channels' topics and history keys carry too: channel presence
//! load spreads over the masters, a channel's presence is on the master of its
//! traffic, and a master that is down fails only the tags whose slot it serves (the
//! link keeps a connection per master).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use futures_util::future::join_all;

use super::{
    Beat, Connected, Connection, Disconnected, Lost, Member, NodeStatus, Page, PresenceError,
    PresenceStore, Stats, StoreFuture,
};

/// How many times longer than at home a replica's liveness lasts on the other shards:
/// a dead replica's memberships there are cleared by the home's reapers first (which
/// report them); the other shards' own reaping only sweeps what those could not remove.
pub const AWAY_TTL_FACTOR: u32 = 2;
/// Memberships a resync removes per call.
const RESYNC_CHUNK: usize = 1000;
/// Calls a resync makes at most (then it finishes at the next beat).
const RESYNC_ROUNDS: usize = 64;

/// Several presence stores used as one, each channel's members on the channel's shard.
pub struct ShardedPresence {
    /// In configured order (the order decides where each channel goes); the first is the
    /// home.
    shards: Vec<Box<dyn PresenceStore>>,
    /// Per shard: a write to it failed, so it may hold this replica's memberships
    /// wrongly or miss some (never set for the home, whose failures the caller sees).
    stale: Vec<AtomicBool>,
    /// Per client that joined through this store: the shards other than the home it
    /// joined channels on (bit `i` for shard `i`, a superset), so that its disconnect
    /// asks only those (a Redis Cluster has 16 shards; a client is usually on few). A
    /// client missing here (joined through another replica's store) is removed from
    /// every shard. `None` with more than 64 shards.
    joined: Option<Mutex<HashMap<String, u64>>>,
}

impl std::fmt::Debug for ShardedPresence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedPresence")
            .field("shards", &self.shards.len())
            .finish_non_exhaustive()
    }
}

impl ShardedPresence {
    /// `shards` in their configured order, the same as the backbone's; the first is the
    /// home. Each store must keep memberships of connections it never recorded and
    /// report them at `disconnect` (the Redis store does).
    ///
    /// # Panics
    ///
    /// When `shards` is empty.
    pub fn new(shards: Vec<Box<dyn PresenceStore>>) -> Self {
        assert!(!shards.is_empty(), "sharded presence needs a shard");
        let stale = shards.iter().map(|_| AtomicBool::new(false)).collect();
        let joined = (shards.len() <= 64).then(Mutex::default);
        Self {
            shards,
            stale,
            joined,
        }
    }

    /// The shard (index) that holds `channel`'s members.
    pub fn shard_of(&self, channel: &str) -> usize {
        crate::shards::shard_of(channel, self.shards.len())
    }

    fn home(&self) -> &dyn PresenceStore {
        self.shards[0].as_ref()
    }

    fn channel_store(&self, channel: &str) -> &dyn PresenceStore {
        self.shards[self.shard_of(channel)].as_ref()
    }

    /// The shards other than the home, with their indexes.
    fn away(&self) -> impl Iterator<Item = (usize, &dyn PresenceStore)> {
        self.shards
            .iter()
            .enumerate()
            .skip(1)
            .map(|(index, shard)| (index, shard.as_ref()))
    }

    /// The shards other than the home where `client_id` may have memberships, and
    /// forgets them (it is disconnecting).
    fn take_joined(&self, client_id: &str) -> Option<u64> {
        let joined = self.joined.as_ref()?;
        lock(joined).remove(client_id)
    }

    fn note_joined(&self, client_id: &str, shard: usize) {
        if shard == 0 {
            return;
        }
        if let Some(joined) = &self.joined {
            *lock(joined).entry(client_id.to_owned()).or_default() |= 1 << shard;
        }
    }

    fn mark_stale(&self, shard: usize, what: &str, error: &PresenceError) {
        self.stale[shard].store(true, Ordering::Release);
        tracing::debug!(shard, what, %error, "a presence shard missed a write; resynced at a later beat");
    }

    /// Removes this replica's memberships from `shard` (it missed writes), so that the
    /// replica records them again from scratch.
    async fn resync(&self, shard: usize, node_id: &str) -> Result<(), PresenceError> {
        for _ in 0..RESYNC_ROUNDS {
            // The other shards hold no connection records: nothing is handed out
            // here that would have to be reported.
            if self.shards[shard]
                .reap_node(node_id, RESYNC_CHUNK)
                .await?
                .is_empty()
            {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Beats `shard` (not the home), resyncing it first if it is stale.
    async fn beat_away(
        &self,
        shard: usize,
        node_id: &str,
        started_at_ms: u64,
        ttl: Duration,
    ) -> Result<Beat, PresenceError> {
        let store = self.shards[shard].as_ref();
        if self.stale[shard].swap(false, Ordering::AcqRel) {
            let beat = async {
                self.resync(shard, node_id).await?;
                store.beat(node_id, started_at_ms, ttl).await
            };
            return match beat.await {
                // Whatever it knew, it no longer holds this replica's memberships.
                Ok(_) => Ok(Beat { known: false }),
                Err(error) => {
                    self.stale[shard].store(true, Ordering::Release);
                    Err(error)
                }
            };
        }
        store.beat(node_id, started_at_ms, ttl).await
    }

    /// Adds to each connection the channels it had on the other shards, removing its
    /// memberships there. A shard that fails keeps them until it reaps the replica.
    async fn with_away_channels(&self, mut lost: Vec<Lost>) -> Vec<Lost> {
        let clients: Vec<String> = lost
            .iter()
            .map(|lost| lost.connection.client_id.clone())
            .collect();
        let clients = &clients;
        // One call per shard for the whole batch.
        let removals = join_all(
            self.away()
                .map(|(index, store)| async move { (index, store.leave_all(clients).await) }),
        )
        .await;
        let mut channels: Vec<BTreeSet<String>> = lost
            .iter_mut()
            .map(|lost| std::mem::take(&mut lost.channels).into_iter().collect())
            .collect();
        for (shard, removed) in removals {
            match removed {
                Ok(removed) => {
                    for (all, more) in channels.iter_mut().zip(removed) {
                        all.extend(more);
                    }
                }
                Err(error) => tracing::debug!(
                    shard,
                    %error,
                    "could not remove reaped connections' memberships from a presence shard; it reaps them later"
                ),
            }
        }
        for (lost, channels) in lost.iter_mut().zip(channels) {
            lost.channels = channels.into_iter().collect();
        }
        lost
    }

    /// Runs a reaping call on the shards other than the home, only to sweep leftovers
    /// (they hand out no connection: the home does).
    async fn sweep_away<'a, F>(&'a self, reap: F)
    where
        F: Fn(&'a dyn PresenceStore) -> StoreFuture<'a, Vec<Lost>>,
    {
        let sweeps = self
            .away()
            .map(|(index, store)| {
                let sweep = reap(store);
                async move { (index, sweep.await) }
            })
            .collect::<Vec<_>>();
        for (shard, result) in join_all(sweeps).await {
            match result {
                Ok(lost) if !lost.is_empty() => tracing::debug!(
                    shard,
                    connections = lost.len(),
                    "a presence shard other than the home held connection records; removed"
                ),
                Ok(_) => {}
                Err(error) => tracing::debug!(shard, %error, "could not sweep a presence shard"),
            }
        }
    }
}

impl PresenceStore for ShardedPresence {
    fn name(&self) -> &'static str {
        self.home().name()
    }

    fn problem(&self) -> Option<String> {
        self.shards.iter().find_map(|shard| shard.problem())
    }

    fn beat<'a>(
        &'a self,
        node_id: &'a str,
        started_at_ms: u64,
        ttl: Duration,
    ) -> StoreFuture<'a, Beat> {
        Box::pin(async move {
            let away_ttl = ttl.saturating_mul(AWAY_TTL_FACTOR);
            let home = self.home().beat(node_id, started_at_ms, ttl);
            let away = join_all(self.away().map(|(index, _)| async move {
                (
                    index,
                    self.beat_away(index, node_id, started_at_ms, away_ttl)
                        .await,
                )
            }));
            let (home, away) = futures_util::join!(home, away);
            let mut known = home?.known;
            for (shard, beat) in away {
                match beat {
                    Ok(beat) => known &= beat.known,
                    // Not fatal: only its channels' presence is out of reach; once it
                    // is back, it is resynced and this replica records again.
                    Err(error) => self.mark_stale(shard, "beat", &error),
                }
            }
            Ok(Beat { known })
        })
    }

    fn retire<'a>(&'a self, node_id: &'a str) -> StoreFuture<'a, ()> {
        self.home().retire(node_id)
    }

    fn reap(&self, limit: usize) -> StoreFuture<'_, Vec<Lost>> {
        Box::pin(async move {
            let lost = self.home().reap(limit).await?;
            if !lost.is_empty() {
                return Ok(self.with_away_channels(lost).await);
            }
            self.sweep_away(|store| store.reap(limit)).await;
            Ok(Vec::new())
        })
    }

    fn reap_node<'a>(&'a self, node_id: &'a str, limit: usize) -> StoreFuture<'a, Vec<Lost>> {
        Box::pin(async move {
            let lost = self.home().reap_node(node_id, limit).await?;
            if !lost.is_empty() {
                return Ok(self.with_away_channels(lost).await);
            }
            for (shard, store) in self.away() {
                if let Err(error) = store.reap_node(node_id, limit).await {
                    // Its leftovers go at the resync, once it is back.
                    self.mark_stale(shard, "reap_node", &error);
                }
            }
            Ok(Vec::new())
        })
    }

    fn connect<'a>(
        &'a self,
        connection: &'a Connection,
        replace: bool,
    ) -> StoreFuture<'a, Connected> {
        self.home().connect(connection, replace)
    }

    fn disconnect<'a>(&'a self, client_id: &'a str) -> StoreFuture<'a, Disconnected> {
        Box::pin(async move {
            let home = self.home().disconnect(client_id);
            let shards = self.take_joined(client_id).unwrap_or(u64::MAX);
            let away = join_all(
                self.away()
                    .filter(|(index, _)| shards & (1 << index) != 0)
                    .map(
                        |(index, store)| async move { (index, store.disconnect(client_id).await) },
                    ),
            );
            let (home, away) = futures_util::join!(home, away);
            let mut gone = home?;
            let mut channels: BTreeSet<String> =
                std::mem::take(&mut gone.channels).into_iter().collect();
            for (shard, result) in away {
                match result {
                    Ok(away) => channels.extend(away.channels),
                    Err(error) => self.mark_stale(shard, "disconnect", &error),
                }
            }
            gone.channels = channels.into_iter().collect();
            Ok(gone)
        })
    }

    fn join<'a>(&'a self, channel: &'a str, member: &'a Member) -> StoreFuture<'a, ()> {
        let shard = self.shard_of(channel);
        // Noted even if the join fails: it may have happened without its reply.
        self.note_joined(&member.client_id, shard);
        self.shards[shard].join(channel, member)
    }

    fn leave<'a>(&'a self, channel: &'a str, client_id: &'a str) -> StoreFuture<'a, ()> {
        self.channel_store(channel).leave(channel, client_id)
    }

    fn stats<'a>(&'a self, channel: &'a str) -> StoreFuture<'a, Stats> {
        self.channel_store(channel).stats(channel)
    }

    fn page<'a>(
        &'a self,
        channel: &'a str,
        limit: usize,
        after: Option<&'a str>,
    ) -> StoreFuture<'a, Page> {
        self.channel_store(channel).page(channel, limit, after)
    }

    fn user<'a>(&'a self, user: &'a str) -> StoreFuture<'a, Vec<Connection>> {
        self.home().user(user)
    }

    fn nodes(&self) -> StoreFuture<'_, Vec<NodeStatus>> {
        self.home().nodes()
    }

    fn set_channel_counts<'a>(
        &'a self,
        node_id: &'a str,
        counts: &'a [(String, u64)],
    ) -> StoreFuture<'a, ()> {
        self.home().set_channel_counts(node_id, counts)
    }

    fn channels(&self) -> StoreFuture<'_, Vec<(String, u64)>> {
        self.home().channels()
    }

    fn count_targets<'a>(
        &'a self,
        users: &'a [String],
        devices: &'a [String],
        clients: &'a [String],
    ) -> StoreFuture<'a, u64> {
        self.home().count_targets(users, devices, clients)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
