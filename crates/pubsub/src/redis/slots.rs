//! A Redis Cluster's slot table, kept by us: which master serves each hash slot, and
//! a link of the caller's kind (the backbone's connection pair, a store's connection)
//! to each master.
//!
//! fred's cluster client is connected only while it reaches every master (it connects
//! to all of them or reconnects as a whole), so one master down would stop every
//! channel and every store call. With a link per master, one that is down stops only
//! the work of its own slots.
//!
//! The table comes from `CLUSTER SLOTS`, asked of a connected master or else of the
//! seed nodes ([`keep_current`]): at start, every [`REFRESH`], every
//! [`REFRESH_WHILE_DOWN`] while a master is unreachable or a slot has none (a failover
//! promotes a replica, at a new address), and at once when a caller saw a redirection
//! ([`SlotTable::stale_signal`]). A new table keeps the links of masters it still names, opens
//! links to new ones and drops the rest; each change counts in [`SlotTable::epoch`].
//!
//! Masters are listed by their first slot: the order of `/health`'s `pubsub.shards`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use fred::prelude::{Builder, ClientLike, Config, Server, Value};
use fred::types::config::ServerConfig;
use fred::types::{ClusterHash, CustomCommand};
use tokio::sync::Notify;

use super::link::{NAME, parse_config};
use crate::{PubsubError, redact_url};

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

/// What a caller keeps per master.
pub(crate) trait MasterLink: Send + Sync + 'static {
    /// Whether the link to the master works.
    fn is_up(&self) -> bool;
    /// A connection to the master, to ask it for the slot table.
    fn client(&self) -> &fred::clients::Client;
}

/// One master and the caller's link to it.
pub(crate) struct Master<M> {
    pub(crate) server: Server,
    pub(crate) link: M,
}

/// Which master serves each slot.
pub(crate) struct Route<M> {
    /// Each slot's index in `masters`, or [`UNOWNED`]; empty before the first table.
    slots: Vec<u16>,
    pub(crate) masters: Vec<Arc<Master<M>>>,
}

impl<M: MasterLink> Route<M> {
    /// The master of `slot`, if the table names one.
    pub(crate) fn master(&self, slot: u16) -> Option<&Master<M>> {
        self.index(slot).map(|index| self.masters[index].as_ref())
    }

    /// The index in `masters` of the master of `key`'s slot.
    pub(crate) fn index_of(&self, key: &[u8]) -> Option<usize> {
        self.index(fred::util::redis_keyslot(key))
    }

    fn index(&self, slot: u16) -> Option<usize> {
        let index = usize::from(*self.slots.get(usize::from(slot))?);
        (index < self.masters.len()).then_some(index)
    }

    /// A connected master, for a command that names no key.
    pub(crate) fn any_connected(&self) -> Option<&Master<M>> {
        self.masters
            .iter()
            .map(Arc::as_ref)
            .find(|master| master.link.is_up())
    }

    /// Whether `master` is still one of this route's.
    pub(crate) fn keeps(&self, master: &Arc<Master<M>>) -> bool {
        self.masters.iter().any(|kept| Arc::ptr_eq(kept, master))
    }

    /// Every slot has a master, and every master is connected.
    pub(crate) fn is_healthy(&self) -> bool {
        !self.slots.is_empty()
            && !self.slots.contains(&UNOWNED)
            && self.masters.iter().all(|m| m.link.is_up())
    }

    /// Each master's state, by first slot; one `false` before the first table.
    pub(crate) fn masters_connected(&self) -> Vec<bool> {
        if self.masters.is_empty() {
            return vec![false];
        }
        self.masters.iter().map(|m| m.link.is_up()).collect()
    }
}

/// The slot table of one Redis Cluster, with a link per master.
pub(crate) struct SlotTable<M> {
    /// Read on every call without a lock; replaced when the table changes.
    route: ArcSwap<Route<M>>,
    /// Tables applied so far.
    epoch: AtomicU64,
    /// Wakes [`keep_current`] early: a node redirected a call.
    stale: Arc<Notify>,
    /// Credentials and settings for every connection; the server is set per node.
    config: Config,
    seeds: Vec<Server>,
}

impl<M: MasterLink> SlotTable<M> {
    /// An empty table for the cluster whose seed nodes `url` names (`redis-cluster://`).
    pub(crate) fn new(url: &str) -> Result<Self, PubsubError> {
        let config = parse_config(url)?;
        let ServerConfig::Clustered { hosts, .. } = &config.server else {
            return Err(PubsubError::InvalidUrl(format!(
                "{}: not a Redis Cluster address",
                redact_url(url)
            )));
        };
        let seeds = hosts.clone();
        Ok(Self {
            route: ArcSwap::from_pointee(Route {
                slots: Vec::new(),
                masters: Vec::new(),
            }),
            epoch: AtomicU64::new(0),
            stale: Arc::new(Notify::new()),
            config,
            seeds,
        })
    }

    pub(crate) fn route(&self) -> arc_swap::Guard<Arc<Route<M>>> {
        self.route.load()
    }

    /// Changes with every table applied.
    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// The route, to hold across an await.
    pub(crate) fn route_full(&self) -> Arc<Route<M>> {
        self.route.load_full()
    }

    /// What to notify when a node answered MOVED or ASK: the table is read at once.
    pub(crate) fn stale_signal(&self) -> Arc<Notify> {
        Arc::clone(&self.stale)
    }

    /// Makes `route` the table.
    pub(crate) fn install(&self, route: Arc<Route<M>>) {
        self.route.store(route);
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }

    /// The settings of a connection to `server` alone.
    pub(crate) fn node_config(&self, server: &Server, fail_fast: bool) -> Config {
        Config {
            server: ServerConfig::Centralized {
                server: server.clone(),
            },
            fail_fast,
            ..self.config.clone()
        }
    }

    /// The slot table as a connected master sees it, or else a seed node.
    async fn read_slots(&self) -> Option<Vec<SlotRange>> {
        let route = self.route.load_full();
        for master in route.masters.iter().filter(|m| m.link.is_up()) {
            let asked = ask(master.link.client(), &master.server);
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

    /// The route `ranges` describe, or `None` when it is the current one. Masters the
    /// current route has keep their links; `open` makes links to new ones (a master it
    /// fails for is left out, its slots unowned until the next table).
    fn next_route(
        &self,
        ranges: &[SlotRange],
        open: &dyn Fn(Config) -> Result<M, PubsubError>,
    ) -> Option<Route<M>> {
        let old = self.route.load();
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
            return None;
        }
        let mut masters: Vec<Arc<Master<M>>> = Vec::with_capacity(servers.len());
        let mut renumbered = Vec::with_capacity(servers.len());
        for server in servers {
            let master = match old.masters.iter().find(|m| m.server == server) {
                Some(master) => Some(Arc::clone(master)),
                None => match open(self.node_config(&server, false)) {
                    Ok(link) => Some(Arc::new(Master { server, link })),
                    Err(error) => {
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
        Some(Route { slots, masters })
    }
}

/// Keeps `table` current: reads it now and then, opens links to new masters with
/// `open`, and hands every changed route to `install` (which must call
/// [`SlotTable::install`]; it gets the old route too).
pub(crate) async fn keep_current<M: MasterLink>(
    table: Arc<SlotTable<M>>,
    open: impl Fn(Config) -> Result<M, PubsubError>,
    install: impl Fn(&Route<M>, Arc<Route<M>>),
) {
    let mut answered = true;
    loop {
        match table.read_slots().await {
            Some(ranges) => {
                answered = true;
                if let Some(route) = table.next_route(&ranges, &open) {
                    let old = table.route.load_full();
                    let route = Arc::new(route);
                    install(&old, Arc::clone(&route));
                    tracing::info!(
                        adapter = NAME,
                        masters = route.masters.len(),
                        "Redis Cluster slot table applied"
                    );
                }
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
        let wait = if table.route.load().is_healthy() {
            REFRESH
        } else {
            REFRESH_WHILE_DOWN
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = table.stale.notified() => {}
        }
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
