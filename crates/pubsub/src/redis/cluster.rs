//! A Redis Cluster as the backbone: a [`RedisBackbone`] per master (SPUBLISH and
//! SSUBSCRIBE on plain connections to that master) in our own [`SlotTable`], each topic
//! sent to the master of its hash slot. A topic travels as the Redis channel
//! `<tag><topic>`, its channel's [`super::channel_tag`], so it shares a slot with the
//! channel's history and presence keys. A master that is down stops only the channels
//! of its slots: Redis keeps serving sharded pub/sub on the others
//! (`cluster-allow-pubsubshard-when-down`, on by default).
//!
//! When the table changes, every held topic whose slot now has another master is
//! subscribed there and released on the old one (Redis drops the shard subscriptions
//! of a slot that moves), and every generation changes, so subscribers ask again.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use super::link::{NAME, slot};
use super::slots::{MasterLink, Route, SlotTable, keep_current};
use super::{CLUSTER_SHARDS, RedisBackbone, cluster_tag};
use crate::{AbortOnDrop, Backbone, Held, Inbox, Pending, PubsubError, spawn};

impl MasterLink for RedisBackbone {
    fn is_up(&self) -> bool {
        Backbone::is_connected(self)
    }

    fn client(&self) -> &fred::clients::Client {
        &self.publisher
    }
}

/// A Redis Cluster used as the backbone, one connection pair per master.
pub(crate) struct ClusterBackbone {
    /// Each cluster shard's hash tag ([`cluster_tag`] of the topics' prefix) and its
    /// slot, by shard: made once, as every publication needs its channel's.
    tags: Vec<(String, u16)>,
    shared: Arc<Shared>,
    _refresh: AbortOnDrop,
}

struct Shared {
    table: Arc<SlotTable<RedisBackbone>>,
    /// The Redis channels the adapter holds, whichever master carries them. Changes to it
    /// and route changes are made under this lock, so neither misses the other.
    wanted: Mutex<HashSet<String>>,
    /// Losses counted by masters that were closed.
    retired_published: AtomicU64,
    retired_received: AtomicU64,
}

impl ClusterBackbone {
    /// Starts reading the cluster's slot table from the seed nodes `url` names and
    /// returns at once; fails only for a malformed URL. Until a node answers, every
    /// topic is reported disconnected.
    pub(crate) fn connect(url: &str, prefix: &str, inbox: Inbox) -> Result<Self, PubsubError> {
        let shared = Arc::new(Shared {
            table: Arc::new(SlotTable::new(url)?),
            wanted: Mutex::new(HashSet::new()),
            retired_published: AtomicU64::new(0),
            retired_received: AtomicU64::new(0),
        });
        let installer = Arc::clone(&shared);
        let refresh = spawn(keep_current(
            Arc::clone(&shared.table),
            move |config| RedisBackbone::start(config, true, inbox.clone()),
            move |old, route| installer.install(old, route),
        ));
        let tags = (0..CLUSTER_SHARDS)
            .map(|shard| {
                let tag = cluster_tag(prefix, shard);
                let slot = slot(&tag);
                (tag, slot)
            })
            .collect();
        Ok(Self {
            tags,
            shared,
            _refresh: refresh,
        })
    }

    /// The hash tag of `topic`'s channel ([`super::channel_tag`]) and its slot.
    fn tag_of(&self, topic: &str) -> &(String, u16) {
        &self.tags[crate::shards::shard_of(crate::shards::shard_key(topic), CLUSTER_SHARDS)]
    }

    /// The Redis channel `topic` travels on (`topic` behind its channel's hash tag),
    /// and its slot.
    fn redis_channel(&self, topic: &str) -> (String, u16) {
        let (tag, slot) = self.tag_of(topic);
        (format!("{tag}{topic}"), *slot)
    }

    /// Losses of closed masters (`retired`) and of the current ones (`each`).
    fn losses(&self, retired: &AtomicU64, each: fn(&RedisBackbone) -> u64) -> u64 {
        let route = self.shared.table.route();
        let current: u64 = route.masters.iter().map(|m| each(&m.link)).sum();
        retired.load(Ordering::Acquire) + current
    }

    /// A generation that changes with the route as well as with `connections`.
    fn generation_with(&self, connections: u64) -> u64 {
        (self.shared.table.epoch() << 32).wrapping_add(connections)
    }
}

impl Shared {
    fn wanted(&self) -> MutexGuard<'_, HashSet<String>> {
        self.wanted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Puts `route` in place and moves every held topic whose master changed.
    fn install(&self, old: &Route<RedisBackbone>, route: Arc<Route<RedisBackbone>>) {
        let wanted = self.wanted();
        self.table.install(Arc::clone(&route));
        // The moving topics by new and by old master, each master asked once.
        let mut holds: Vec<Vec<String>> = vec![Vec::new(); route.masters.len()];
        let mut releases: Vec<Vec<String>> = vec![Vec::new(); old.masters.len()];
        for topic in wanted.iter() {
            let (from, to) = (
                old.index_of(topic.as_bytes()),
                route.index_of(topic.as_bytes()),
            );
            let server = |route: &Route<RedisBackbone>, index: Option<usize>| {
                index.map(|index| route.masters[index].server.clone())
            };
            if server(old, from) == server(&route, to) {
                continue;
            }
            if let Some(to) = to {
                holds[to].push(topic.clone());
            }
            if let Some(from) = from {
                releases[from].push(topic.clone());
            }
        }
        let moved: usize = holds.iter().map(Vec::len).sum();
        for (master, topics) in old.masters.iter().zip(releases) {
            if !topics.is_empty() && route.keeps(master) {
                let _ = master.link.release_all(topics);
            }
        }
        for (master, topics) in route.masters.iter().zip(holds) {
            if !topics.is_empty()
                && let Err(error) = master.link.hold_all(topics)
            {
                // Asked again when a client subscribes again (the generation changed).
                tracing::warn!(adapter = NAME, server = %master.server, %error, "topics not moved");
            }
        }
        drop(wanted);
        for closed in old.masters.iter().filter(|m| !route.keeps(m)) {
            self.retired_published
                .fetch_add(closed.link.dropped_published(), Ordering::AcqRel);
            self.retired_received
                .fetch_add(closed.link.dropped_received(), Ordering::AcqRel);
        }
        if moved > 0 {
            tracing::info!(
                adapter = NAME,
                moved,
                "subscriptions moved to their new masters"
            );
        }
    }
}

impl std::fmt::Debug for ClusterBackbone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterBackbone")
            .field("masters", &self.shards_connected())
            .finish_non_exhaustive()
    }
}

impl Backbone for ClusterBackbone {
    fn adapter(&self) -> &'static str {
        NAME
    }

    fn is_connected(&self) -> bool {
        self.shared.table.route().is_healthy()
    }

    fn topic_connected(&self, topic: &str) -> bool {
        self.shared
            .table
            .route()
            .master(self.tag_of(topic).1)
            .is_some_and(|master| master.link.is_up())
    }

    fn shards_connected(&self) -> Vec<bool> {
        self.shared.table.route().masters_connected()
    }

    fn publish(&self, topic: &str, payload: Bytes) -> Result<(), PubsubError> {
        let (channel, slot) = self.redis_channel(topic);
        match self.shared.table.route().master(slot) {
            Some(master) => master.link.publish(&channel, payload),
            None => Err(PubsubError::Disconnected(NAME)),
        }
    }

    fn subscribe(&self, topic: &str) -> Result<Held, PubsubError> {
        let (channel, slot) = self.redis_channel(topic);
        let mut wanted = self.shared.wanted();
        let held = match self.shared.table.route().master(slot) {
            Some(master) => master.link.subscribe(&channel)?,
            // Subscribed once a table names its master.
            None => crate::held(false),
        };
        wanted.insert(channel);
        Ok(held)
    }

    fn unsubscribe(&self, topic: &str) -> Result<(), PubsubError> {
        let (channel, slot) = self.redis_channel(topic);
        let mut wanted = self.shared.wanted();
        if let Some(master) = self.shared.table.route().master(slot) {
            master.link.unsubscribe(&channel)?;
        }
        wanted.remove(&channel);
        Ok(())
    }

    fn generation(&self) -> u64 {
        let route = self.shared.table.route();
        let connections = route
            .masters
            .iter()
            .fold(0, |sum: u64, m| sum.wrapping_add(m.link.generation()));
        self.generation_with(connections)
    }

    fn topic_generation(&self, topic: &str) -> u64 {
        let route = self.shared.table.route();
        let connections = route
            .master(self.tag_of(topic).1)
            .map_or(0, |master| master.link.generation());
        self.generation_with(connections)
    }

    fn flush(&self) -> Pending {
        let route = self.shared.table.route();
        let flushes: Vec<Pending> = route.masters.iter().map(|m| m.link.flush()).collect();
        Box::pin(async move {
            futures_util::future::join_all(flushes).await;
        })
    }

    fn dropped_published(&self) -> u64 {
        self.losses(&self.shared.retired_published, Backbone::dropped_published)
    }

    fn dropped_received(&self) -> u64 {
        self.losses(&self.shared.retired_received, Backbone::dropped_received)
    }
}
