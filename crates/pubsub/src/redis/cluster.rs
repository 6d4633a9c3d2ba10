//! A Redis Cluster as shards: one [`RedisBackbone`] per master (SPUBLISH and SSUBSCRIBE
//! on plain connections to that master), each topic sent to the master of its hash slot
//! by a slot table of our own.
//!
//! fred's cluster client is connected only while it reaches every master (it connects
//! to all of them or reconnects as a whole), so one master down would stop every
//! channel. Here a master that is down stops only the channels of its slots; Redis
//! keeps serving sharded pub/sub on the others (`cluster-allow-pubsubshard-when-down`,
//! on by default).
//!
//! The slot table comes from `CLUSTER SLOTS`, asked of a connected master or else of
//! the seed nodes: at start, every [`REFRESH`], and every [`REFRESH_WHILE_DOWN`] while a
//! master is unreachable or a slot has none (a failover promotes a replica, at a new
//! address). When the table changes, every held topic whose slot now has another
//! master is subscribed there and released on the old one (Redis drops the shard
//! subscriptions of a slot that moves), a master that owns no slot any more is closed,
//! and every generation changes, so subscribers ask again.
//!
//! Masters are listed by their first slot: that is the order of `/health`'s
//! `pubsub.shards`.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use fred::prelude::{Builder, ClientLike, Config, Server, Value};
use fred::types::config::ServerConfig;
use fred::types::{ClusterHash, CustomCommand};
use tokio::sync::oneshot;

use super::RedisBackbone;
use super::link::{NAME, parse_config};
use crate::{AbortOnDrop, Backbone, Held, Inbox, Pending, PubsubError, spawn};

/// How often the slot table is read while every master is reachable.
const REFRESH: Duration = Duration::from_secs(5);
/// How often it is read while a master is unreachable or a slot has no master.
const REFRESH_WHILE_DOWN: Duration = Duration::from_millis(500);
/// How long one node may take to answer `CLUSTER SLOTS`, connecting included.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);
/// Redis Cluster's hash slots.
const SLOTS: usize = 16_384;
/// A slot no master serves.
const UNOWNED: u16 = u16::MAX;

/// A Redis Cluster used as the backbone, one connection pair per master.
pub(crate) struct ClusterBackbone {
    shared: Arc<Shared>,
    _refresh: AbortOnDrop,
}

struct Shared {
    /// Read on every publication without a lock; replaced when the table changes.
    route: ArcSwap<Route>,
    /// The topics the adapter holds, whichever master carries them. Changes to it
    /// and route changes are made under this lock, so neither misses the other.
    wanted: Mutex<HashSet<String>>,
    /// Route changes so far: part of every generation.
    epoch: AtomicU64,
    /// Losses counted by masters that were closed.
    retired_published: AtomicU64,
    retired_received: AtomicU64,
    /// Credentials and settings for every connection; the server is set per node.
    config: Config,
    seeds: Vec<Server>,
    inbox: Inbox,
}

/// Which master serves each slot.
struct Route {
    /// Each slot's index in `masters`, or [`UNOWNED`]; empty before the first table.
    slots: Vec<u16>,
    masters: Vec<Arc<Master>>,
}

struct Master {
    server: Server,
    backbone: RedisBackbone,
}

impl Route {
    fn master_of(&self, topic: &str) -> Option<&Master> {
        let slot = fred::util::redis_keyslot(topic.as_bytes());
        let index = *self.slots.get(usize::from(slot))?;
        self.masters.get(usize::from(index)).map(Arc::as_ref)
    }

    fn server_of(&self, topic: &str) -> Option<&Server> {
        self.master_of(topic).map(|master| &master.server)
    }

    /// Every slot has a master, and every master is connected.
    fn is_healthy(&self) -> bool {
        !self.slots.is_empty()
            && !self.slots.contains(&UNOWNED)
            && self.masters.iter().all(|m| m.backbone.is_connected())
    }
}

impl ClusterBackbone {
    /// Starts reading the cluster's slot table from the seed nodes `url` names and
    /// returns at once; fails only for a malformed URL. Until a node answers, every
    /// topic is reported disconnected.
    pub(crate) fn connect(url: &str, inbox: Inbox) -> Result<Self, PubsubError> {
        let config = parse_config(url)?;
        let ServerConfig::Clustered { hosts, .. } = &config.server else {
            return Err(PubsubError::InvalidUrl(format!(
                "{}: not a Redis Cluster address",
                crate::redact_url(url)
            )));
        };
        let seeds = hosts.clone();
        let shared = Arc::new(Shared {
            route: ArcSwap::from_pointee(Route {
                slots: Vec::new(),
                masters: Vec::new(),
            }),
            wanted: Mutex::new(HashSet::new()),
            epoch: AtomicU64::new(0),
            retired_published: AtomicU64::new(0),
            retired_received: AtomicU64::new(0),
            config,
            seeds,
            inbox,
        });
        let refresh = spawn(refresh(Arc::clone(&shared)));
        Ok(Self {
            shared,
            _refresh: refresh,
        })
    }
}

/// Reads the slot table now and then, and applies it when it changed.
async fn refresh(shared: Arc<Shared>) {
    let mut answered = true;
    loop {
        match shared.read_slots().await {
            Some(ranges) => {
                answered = true;
                shared.apply(&ranges);
            }
            // Said once per outage, not every half second.
            None if answered => {
                answered = false;
                tracing::warn!(
                    adapter = NAME,
                    "no Redis Cluster node answers CLUSTER SLOTS"
                );
            }
            None => {}
        }
        let wait = if shared.route.load().is_healthy() {
            REFRESH
        } else {
            REFRESH_WHILE_DOWN
        };
        tokio::time::sleep(wait).await;
    }
}

impl Shared {
    fn wanted(&self) -> MutexGuard<'_, HashSet<String>> {
        self.wanted
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The slot table as a connected master sees it, or else a seed node.
    async fn read_slots(&self) -> Option<Vec<SlotRange>> {
        let route = self.route.load_full();
        for master in route.masters.iter().filter(|m| m.backbone.is_connected()) {
            let asked = ask(&master.backbone.publisher, &master.server);
            if let Ok(Ok(ranges)) = tokio::time::timeout(ASK_TIMEOUT, asked).await
                && !ranges.is_empty()
            {
                return Some(ranges);
            }
        }
        for seed in &self.seeds {
            match tokio::time::timeout(ASK_TIMEOUT, self.ask_seed(seed)).await {
                Ok(Ok(ranges)) if !ranges.is_empty() => return Some(ranges),
                Ok(Err(error)) => {
                    tracing::debug!(adapter = NAME, seed = %seed, %error, "seed did not answer");
                }
                _ => {}
            }
        }
        None
    }

    /// Asks `seed` on a connection of its own, closed afterwards.
    async fn ask_seed(&self, seed: &Server) -> Result<Vec<SlotRange>, fred::error::Error> {
        let client = Builder::from_config(self.node_config(seed, true))
            .with_connection_config(|connection| {
                connection.connection_timeout = ASK_TIMEOUT;
                connection.internal_command_timeout = ASK_TIMEOUT;
            })
            .with_performance_config(|performance| {
                performance.default_command_timeout = ASK_TIMEOUT;
            })
            .build()?;
        let _connection = client.init().await?;
        let ranges = ask(&client, seed).await;
        let _ = client.quit().await;
        ranges
    }

    /// The settings of a connection to `server` alone.
    fn node_config(&self, server: &Server, fail_fast: bool) -> Config {
        Config {
            server: ServerConfig::Centralized {
                server: server.clone(),
            },
            fail_fast,
            ..self.config.clone()
        }
    }

    /// Makes `ranges` the route, when it differs from the current one.
    fn apply(&self, ranges: &[SlotRange]) {
        let old = self.route.load_full();
        let servers = masters_in_order(ranges);
        let mut slots = slot_table(ranges, &servers);
        let unchanged = old.slots == slots
            && old.masters.len() == servers.len()
            && old
                .masters
                .iter()
                .zip(&servers)
                .all(|(m, s)| m.server == *s);
        if unchanged {
            return;
        }
        // Kept masters keep their connections (and subscriptions).
        let mut masters: Vec<Arc<Master>> = Vec::with_capacity(servers.len());
        let mut renumbered = Vec::with_capacity(servers.len());
        for server in servers {
            let master = match old.masters.iter().find(|m| m.server == server) {
                Some(master) => Some(Arc::clone(master)),
                None => match RedisBackbone::start(
                    self.node_config(&server, false),
                    true,
                    self.inbox.clone(),
                ) {
                    Ok(backbone) => Some(Arc::new(Master { server, backbone })),
                    Err(error) => {
                        // Its slots stay unowned; the next table tries again.
                        tracing::warn!(adapter = NAME, %server, %error, "cannot use a master");
                        None
                    }
                },
            };
            renumbered.push(master.map_or(UNOWNED, |master| {
                masters.push(master);
                u16::try_from(masters.len() - 1).unwrap_or(UNOWNED)
            }));
        }
        for slot in slots.iter_mut().filter(|slot| **slot != UNOWNED) {
            *slot = renumbered
                .get(usize::from(*slot))
                .copied()
                .unwrap_or(UNOWNED);
        }
        let route = Arc::new(Route { slots, masters });

        let wanted = self.wanted();
        self.route.store(Arc::clone(&route));
        self.epoch.fetch_add(1, Ordering::AcqRel);
        let mut moved = 0usize;
        for topic in wanted.iter() {
            if old.server_of(topic) == route.server_of(topic) {
                continue;
            }
            moved += 1;
            if let Some(master) = route.master_of(topic)
                && let Err(error) = master.backbone.subscribe(topic)
            {
                tracing::warn!(adapter = NAME, %error, topic, "could not move a subscription");
            }
            if let Some(master) = old.master_of(topic)
                && route.masters.iter().any(|m| m.server == master.server)
            {
                let _ = master.backbone.unsubscribe(topic);
            }
        }
        drop(wanted);
        for closed in old
            .masters
            .iter()
            .filter(|m| !route.masters.iter().any(|kept| Arc::ptr_eq(kept, m)))
        {
            self.retired_published
                .fetch_add(closed.backbone.dropped_published(), Ordering::AcqRel);
            self.retired_received
                .fetch_add(closed.backbone.dropped_received(), Ordering::AcqRel);
        }
        tracing::info!(
            adapter = NAME,
            masters = route.masters.len(),
            moved,
            "Redis Cluster slot table applied"
        );
    }
}

/// The masters of `ranges`, by their first slot.
fn masters_in_order(ranges: &[SlotRange]) -> Vec<Server> {
    let mut firsts: Vec<(u16, &Server)> = Vec::new();
    for range in ranges {
        match firsts.iter_mut().find(|(_, s)| **s == range.primary) {
            Some((first, _)) => *first = (*first).min(range.start),
            None => firsts.push((range.start, &range.primary)),
        }
    }
    firsts.sort_by_key(|(first, _)| *first);
    firsts.into_iter().map(|(_, s)| s.clone()).collect()
}

/// Each slot's index in `servers`, or [`UNOWNED`].
fn slot_table(ranges: &[SlotRange], servers: &[Server]) -> Vec<u16> {
    let mut slots = vec![UNOWNED; SLOTS];
    for range in ranges {
        let Some(index) = servers.iter().position(|s| *s == range.primary) else {
            continue;
        };
        let index = u16::try_from(index).unwrap_or(UNOWNED);
        let (start, end) = (usize::from(range.start), usize::from(range.end));
        if let Some(owned) = slots.get_mut(start..=end.min(SLOTS - 1)) {
            owned.fill(index);
        }
    }
    slots
}

/// A range of slots and the master that serves it.
#[derive(Debug, Clone, PartialEq)]
struct SlotRange {
    start: u16,
    end: u16,
    primary: Server,
}

/// `CLUSTER SLOTS` on `client`, a connection to `server`.
async fn ask<C: ClientLike>(
    client: &C,
    server: &Server,
) -> Result<Vec<SlotRange>, fred::error::Error> {
    let command = CustomCommand::new_static("CLUSTER", ClusterHash::Random, false);
    let reply: Value = client.custom(command, vec![Value::from("SLOTS")]).await?;
    parse_slots(reply, server).ok_or_else(|| {
        fred::error::Error::new(
            fred::error::ErrorKind::Protocol,
            "unexpected CLUSTER SLOTS reply",
        )
    })
}

/// Reads a `CLUSTER SLOTS` reply: `[[start, end, [host, port, ...], replicas...], ...]`.
/// A master without a known host (empty, `?` or null) is on `server`'s host.
fn parse_slots(reply: Value, server: &Server) -> Option<Vec<SlotRange>> {
    let Value::Array(entries) = reply else {
        return None;
    };
    let mut ranges = Vec::with_capacity(entries.len());
    for entry in entries {
        let Value::Array(fields) = entry else {
            return None;
        };
        let slot = |value: Option<&Value>| value?.as_i64().and_then(|n| u16::try_from(n).ok());
        let (start, end) = (slot(fields.first())?, slot(fields.get(1))?);
        let Some(Value::Array(primary)) = fields.get(2) else {
            return None;
        };
        let host = primary
            .first()
            .and_then(Value::as_bytes_str)
            .filter(|host| !host.is_empty() && &**host != "?")
            .unwrap_or_else(|| server.host.clone());
        let port = u16::try_from(primary.get(1)?.as_i64()?).ok()?;
        ranges.push(SlotRange {
            start,
            end,
            primary: Server::new(host, port),
        });
    }
    Some(ranges)
}

impl std::fmt::Debug for ClusterBackbone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterBackbone")
            .field("masters", &self.shards_connected())
            .finish_non_exhaustive()
    }
}

impl ClusterBackbone {
    /// A generation that changes with the route as well as with `connections`.
    fn generation_with(&self, connections: u64) -> u64 {
        (self.shared.epoch.load(Ordering::Acquire) << 32).wrapping_add(connections)
    }
}

impl Backbone for ClusterBackbone {
    fn adapter(&self) -> &'static str {
        NAME
    }

    fn is_connected(&self) -> bool {
        self.shared.route.load().is_healthy()
    }

    fn topic_connected(&self, topic: &str) -> bool {
        self.shared
            .route
            .load()
            .master_of(topic)
            .is_some_and(|master| master.backbone.is_connected())
    }

    fn shards_connected(&self) -> Vec<bool> {
        let route = self.shared.route.load();
        if route.masters.is_empty() {
            return vec![false];
        }
        route
            .masters
            .iter()
            .map(|master| master.backbone.is_connected())
            .collect()
    }

    fn publish(&self, topic: &str, payload: Bytes) -> Result<(), PubsubError> {
        match self.shared.route.load().master_of(topic) {
            Some(master) => master.backbone.publish(topic, payload),
            None => Err(PubsubError::Disconnected(NAME)),
        }
    }

    fn subscribe(&self, topic: &str) -> Result<Held, PubsubError> {
        let mut wanted = self.shared.wanted();
        let held = match self.shared.route.load().master_of(topic) {
            Some(master) => master.backbone.subscribe(topic)?,
            None => {
                // Subscribed once a table names its master.
                let (answer, held) = oneshot::channel();
                let _ = answer.send(false);
                held
            }
        };
        wanted.insert(topic.to_owned());
        Ok(held)
    }

    fn unsubscribe(&self, topic: &str) -> Result<(), PubsubError> {
        let mut wanted = self.shared.wanted();
        if let Some(master) = self.shared.route.load().master_of(topic) {
            master.backbone.unsubscribe(topic)?;
        }
        wanted.remove(topic);
        Ok(())
    }

    fn generation(&self) -> u64 {
        let route = self.shared.route.load();
        let connections = route
            .masters
            .iter()
            .fold(0, |sum: u64, m| sum.wrapping_add(m.backbone.generation()));
        self.generation_with(connections)
    }

    fn topic_generation(&self, topic: &str) -> u64 {
        let route = self.shared.route.load();
        let connections = route
            .master_of(topic)
            .map_or(0, |master| master.backbone.generation());
        self.generation_with(connections)
    }

    fn flush(&self) -> Pending {
        let route = self.shared.route.load_full();
        let flushes: Vec<Pending> = route.masters.iter().map(|m| m.backbone.flush()).collect();
        Box::pin(async move {
            futures_util::future::join_all(flushes).await;
        })
    }

    fn dropped_published(&self) -> u64 {
        let route = self.shared.route.load();
        self.shared.retired_published.load(Ordering::Acquire)
            + route
                .masters
                .iter()
                .map(|m| m.backbone.dropped_published())
                .sum::<u64>()
    }

    fn dropped_received(&self) -> u64 {
        let route = self.shared.route.load();
        self.shared.retired_received.load(Ordering::Acquire)
            + route
                .masters
                .iter()
                .map(|m| m.backbone.dropped_received())
                .sum::<u64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(start: u16, end: u16, port: u16) -> SlotRange {
        SlotRange {
            start,
            end,
            primary: Server::new("127.0.0.1", port),
        }
    }

    #[test]
    fn masters_are_ordered_by_their_first_slot_and_every_slot_is_placed() {
        let ranges = [
            range(10_000, 16_383, 7002),
            range(0, 4_999, 7001),
            range(5_000, 9_999, 7000),
            range(100, 100, 7000),
        ];
        let servers = masters_in_order(&ranges);
        let ports: Vec<u16> = servers.iter().map(|s| s.port).collect();
        // 7000's first slot is 100 (listed last): after 7001's 0, before 7002's 10 000.
        assert_eq!(ports, [7001, 7000, 7002]);
        let slots = slot_table(&ranges, &servers);
        assert_eq!(slots.len(), SLOTS);
        assert_eq!((slots[0], slots[100], slots[4_999]), (0, 1, 0));
        assert_eq!((slots[5_000], slots[9_999], slots[16_383]), (1, 1, 2));
    }

    #[test]
    fn cluster_slots_replies_are_read() {
        let node = |host: &str, port: i64| {
            Value::Array(vec![
                Value::from(host),
                Value::from(port),
                Value::from("id"),
            ])
        };
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::from(0),
                Value::from(8_191),
                node("10.0.0.1", 7000),
                node("10.0.0.2", 7100),
            ]),
            // An unknown endpoint means the host that answered.
            Value::Array(vec![
                Value::from(8_192),
                Value::from(16_383),
                node("", 7001),
            ]),
        ]);
        let asked = Server::new("10.0.0.9", 7009);
        assert_eq!(
            parse_slots(reply, &asked),
            Some(vec![
                SlotRange {
                    start: 0,
                    end: 8_191,
                    primary: Server::new("10.0.0.1", 7000)
                },
                SlotRange {
                    start: 8_192,
                    end: 16_383,
                    primary: Server::new("10.0.0.9", 7001)
                },
            ])
        );
        assert_eq!(parse_slots(Value::from("OK"), &asked), None);
        let short = Value::Array(vec![Value::Array(vec![Value::from(0)])]);
        assert_eq!(parse_slots(short, &asked), None);
    }

    #[test]
    fn slots_no_range_names_stay_unowned() {
        let ranges = [range(0, 99, 7000), range(200, 300, 7001)];
        let slots = slot_table(&ranges, &masters_in_order(&ranges));
        assert_eq!(
            (slots[99], slots[100], slots[199], slots[200]),
            (0, UNOWNED, UNOWNED, 1)
        );
        assert_eq!(slots[16_383], UNOWNED);
    }
}
