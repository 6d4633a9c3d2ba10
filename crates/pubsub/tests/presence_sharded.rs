//! The presence scenarios against `ShardedPresence` over two real `redis-server`s (each
//! scenario its own pair, on free ports), as two replicas with the same shard list
//! would use it; then what only sharding can do wrong: a channel's keys on the wrong
//! server, one server's outage, a dead replica's memberships on every shard, a shard
//! that missed a write.

mod presence_suite;
mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chorus_pubsub::presence::redis::{self, RedisPresence};
use chorus_pubsub::presence::sharded::ShardedPresence;
use chorus_pubsub::presence::{
    Beat, Connected, Connection, Disconnected, Lost, Member, NodeStatus, Page, PresenceError,
    PresenceStore, Stats, StoreFuture,
};
use presence_suite::{LONG_TTL, SHORT_TTL, SOON, Stores, connection};
use support::{Kind, Server};

const PREFIX: &str = "websocket.broadcast";

async fn connected(url: &str) -> RedisPresence {
    let store = redis::connect(url, PREFIX).await.expect("a valid URL");
    assert!(store.wait_connected(SOON).await, "never connected to {url}");
    store
}

/// One replica's store over `servers`, in that order.
async fn sharded(servers: &[&Server]) -> ShardedPresence {
    let mut shards: Vec<Box<dyn PresenceStore>> = Vec::new();
    for server in servers {
        shards.push(Box::new(connected(&server.url()).await));
    }
    ShardedPresence::new(shards)
}

async fn fresh() -> Stores {
    let one = Server::start(Kind::Redis);
    let two = Server::start(Kind::Redis);
    let a = sharded(&[&one, &two]).await;
    let b = sharded(&[&one, &two]).await;
    Stores {
        a: Arc::new(a),
        b: Arc::new(b),
        guard: Some(Box::new((one, two))),
    }
}

presence_suite!(fresh());

/// A channel name that lives on `shard` of 2.
fn channel_on(store: &ShardedPresence, shard: usize, tag: &str) -> String {
    (0..1000)
        .map(|n| format!("{tag}:{n}"))
        .find(|channel| store.shard_of(channel) == shard)
        .expect("some name hashes to every shard")
}

fn keys(server: &Server) -> Vec<String> {
    let mut keys = server.redis_cli(&["KEYS", "*"]);
    keys.sort();
    keys
}

/// A channel's members are kept on the channel's server only; the connection record
/// on the first (the home) only. A disconnect removes everything, on both.
#[tokio::test]
async fn a_channels_members_live_on_its_server_only() {
    let one = Server::start(Kind::Redis);
    let two = Server::start(Kind::Redis);
    let store = sharded(&[&one, &two]).await;
    let first = channel_on(&store, 0, "room");
    let second = channel_on(&store, 1, "room");

    store.beat("n1", 1, LONG_TTL).await.expect("beat");
    let alice = connection("n1", 1, Some("alice"), None);
    store.connect(&alice, false).await.expect("connect");
    store.join(&first, &alice.member()).await.expect("join");
    store.join(&second, &alice.member()).await.expect("join");

    let members = |channel: &str| format!("{PREFIX}|cm|{channel}");
    let on_one = keys(&one);
    let on_two = keys(&two);
    assert!(on_one.contains(&members(&first)), "{on_one:?}");
    assert!(!on_one.contains(&members(&second)), "{on_one:?}");
    assert!(on_two.contains(&members(&second)), "{on_two:?}");
    assert!(!on_two.contains(&members(&first)), "{on_two:?}");
    assert!(on_one.contains(&format!("{PREFIX}|conn")));
    assert!(!on_two.contains(&format!("{PREFIX}|conn")), "{on_two:?}");
    for channel in [&first, &second] {
        let stats = store.stats(channel).await.expect("stats");
        assert_eq!((stats.clients, stats.users), (1, 1));
        let page = store.page(channel, 10, None).await.expect("page");
        assert_eq!(page.members.len(), 1);
        assert_eq!(page.members[0].client_id, "n1/1");
    }

    let gone = store.disconnect("n1/1").await.expect("disconnect");
    assert!(gone.known && gone.last_of_user);
    let mut both = vec![first.clone(), second.clone()];
    both.sort();
    assert_eq!(gone.channels, both);
    for channel in [&first, &second] {
        assert_eq!(store.stats(channel).await.expect("stats").clients, 0);
    }
    // Only the liveness entries are left.
    let left: Vec<String> = keys(&two)
        .into_iter()
        .filter(|key| !key.ends_with("|nodes") && !key.ends_with("|nodeinfo"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// The second server stops: presence of the first server's channels still works, the
/// second's channels fail with `Unreachable`, connections and beats go on. It comes
/// back empty: the next beat says to record again, and then both work.
#[tokio::test]
async fn one_shards_outage_stops_only_its_channels() {
    let one = Server::start(Kind::Redis);
    let mut two = Server::start(Kind::Redis);
    let store = sharded(&[&one, &two]).await;
    let first = channel_on(&store, 0, "room");
    let second = channel_on(&store, 1, "room");
    assert!(!store.beat("n1", 1, LONG_TTL).await.expect("beat").known);
    assert!(store.beat("n1", 1, LONG_TTL).await.expect("beat").known);
    let alice = connection("n1", 1, Some("alice"), None);
    store.connect(&alice, false).await.expect("connect");
    store.join(&first, &alice.member()).await.expect("join");
    store.join(&second, &alice.member()).await.expect("join");

    two.stop();
    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        match store.stats(&second).await {
            Err(error) => {
                assert_eq!(error, PresenceError::Unreachable("redis"));
                break;
            }
            Ok(_) => assert!(
                tokio::time::Instant::now() < deadline,
                "the stopped server's channel kept answering"
            ),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(store.stats(&first).await.expect("stats").clients, 1);
    assert_eq!(
        store
            .page(&first, 10, None)
            .await
            .expect("page")
            .members
            .len(),
        1
    );
    assert_eq!(
        store.page(&second, 10, None).await.map(|p| p.members.len()),
        Err(PresenceError::Unreachable("redis"))
    );
    assert_eq!(
        store.join(&second, &alice.member()).await,
        Err(PresenceError::Unreachable("redis"))
    );
    // What lives on the first server goes on.
    assert!(store.beat("n1", 1, LONG_TTL).await.expect("beat").known);
    let bob = connection("n1", 2, Some("bob"), None);
    assert!(
        store
            .connect(&bob, false)
            .await
            .expect("connect")
            .first_of_user
    );
    let gone = store.disconnect("n1/2").await.expect("disconnect");
    assert!(gone.known && gone.last_of_user);
    assert_eq!(store.user("alice").await.expect("user").len(), 1);
    assert!(store.reap(10).await.expect("reap").is_empty());

    two.restart();
    let deadline = tokio::time::Instant::now() + SOON;
    while store.stats(&second).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "never reconnected");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // It came back empty (and missed a disconnect): the replica must record again.
    assert!(!store.beat("n1", 1, LONG_TTL).await.expect("beat").known);
    store.join(&second, &alice.member()).await.expect("join");
    assert_eq!(store.stats(&second).await.expect("stats").clients, 1);
    assert!(store.beat("n1", 1, LONG_TTL).await.expect("beat").known);
}

/// A replica dies with members in channels on both servers: each connection is
/// handed out once, with its channels on both; once its liveness on the second server
/// runs out too, nothing of it is left there.
#[tokio::test]
async fn a_dead_replicas_channels_on_every_shard_are_reported_once() {
    let one = Server::start(Kind::Redis);
    let two = Server::start(Kind::Redis);
    let a = sharded(&[&one, &two]).await;
    let b = sharded(&[&one, &two]).await;
    let first = channel_on(&a, 0, "feed");
    let second = channel_on(&a, 1, "feed");
    a.beat("dead", 1, SHORT_TTL).await.expect("beat");
    for n in 0..10 {
        let c = connection("dead", n, Some(&format!("user{n}")), None);
        a.connect(&c, false).await.expect("connect");
        a.join(&first, &c.member()).await.expect("join");
        a.join(&second, &c.member()).await.expect("join");
    }
    let deadline = tokio::time::Instant::now() + SOON;
    let mut lost = Vec::new();
    while lost.len() < 10 {
        assert!(tokio::time::Instant::now() < deadline, "never reaped");
        let more = b.reap(3).await.expect("reap");
        assert!(more.len() <= 3);
        if more.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        lost.extend(more);
    }
    let mut both = vec![first.clone(), second.clone()];
    both.sort();
    for lost in &lost {
        assert_eq!(lost.channels, both, "{}", lost.connection.client_id);
        assert!(lost.last_of_user);
    }
    let mut ids: Vec<&str> = lost
        .iter()
        .map(|l| l.connection.client_id.as_str())
        .collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 10, "each connection reported once");
    for channel in [&first, &second] {
        assert_eq!(b.stats(channel).await.expect("stats").clients, 0);
    }
    // The second server forgets the replica once its longer liveness there ran out
    // (`AWAY_TTL_FACTOR` times the home's).
    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        assert!(b.reap(10).await.expect("reap").is_empty());
        let left = two.redis_cli(&["DBSIZE"]);
        if left == ["0"] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "left on the second server: {:?}",
            keys(&two)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A store that fails every call with `Unreachable` while `down` is set, as a server
/// that is briefly out of reach (but keeps its data) would.
struct Flaky {
    store: RedisPresence,
    down: Arc<AtomicBool>,
}

impl Flaky {
    fn check(&self) -> Result<(), PresenceError> {
        if self.down.load(Ordering::Acquire) {
            Err(PresenceError::Unreachable("redis"))
        } else {
            Ok(())
        }
    }
}

/// Delegates a method to the inner store unless down.
macro_rules! flaky {
    ($self:ident, $call:expr) => {
        Box::pin(async move {
            $self.check()?;
            $call.await
        })
    };
}

impl PresenceStore for Flaky {
    fn name(&self) -> &'static str {
        self.store.name()
    }
    fn beat<'a>(&'a self, node: &'a str, started: u64, ttl: Duration) -> StoreFuture<'a, Beat> {
        flaky!(self, self.store.beat(node, started, ttl))
    }
    fn retire<'a>(&'a self, node: &'a str) -> StoreFuture<'a, ()> {
        flaky!(self, self.store.retire(node))
    }
    fn reap(&self, limit: usize) -> StoreFuture<'_, Vec<Lost>> {
        flaky!(self, self.store.reap(limit))
    }
    fn reap_node<'a>(&'a self, node: &'a str, limit: usize) -> StoreFuture<'a, Vec<Lost>> {
        flaky!(self, self.store.reap_node(node, limit))
    }
    fn connect<'a>(&'a self, c: &'a Connection, replace: bool) -> StoreFuture<'a, Connected> {
        flaky!(self, self.store.connect(c, replace))
    }
    fn disconnect<'a>(&'a self, client: &'a str) -> StoreFuture<'a, Disconnected> {
        flaky!(self, self.store.disconnect(client))
    }
    fn join<'a>(&'a self, channel: &'a str, member: &'a Member) -> StoreFuture<'a, ()> {
        flaky!(self, self.store.join(channel, member))
    }
    fn leave<'a>(&'a self, channel: &'a str, client: &'a str) -> StoreFuture<'a, ()> {
        flaky!(self, self.store.leave(channel, client))
    }
    fn stats<'a>(&'a self, channel: &'a str) -> StoreFuture<'a, Stats> {
        flaky!(self, self.store.stats(channel))
    }
    fn page<'a>(
        &'a self,
        channel: &'a str,
        limit: usize,
        after: Option<&'a str>,
    ) -> StoreFuture<'a, Page> {
        flaky!(self, self.store.page(channel, limit, after))
    }
    fn user<'a>(&'a self, user: &'a str) -> StoreFuture<'a, Vec<Connection>> {
        flaky!(self, self.store.user(user))
    }
    fn nodes(&self) -> StoreFuture<'_, Vec<NodeStatus>> {
        flaky!(self, self.store.nodes())
    }
    fn set_channel_counts<'a>(
        &'a self,
        node: &'a str,
        counts: &'a [(String, u64)],
    ) -> StoreFuture<'a, ()> {
        flaky!(self, self.store.set_channel_counts(node, counts))
    }
    fn channels(&self) -> StoreFuture<'_, Vec<(String, u64)>> {
        flaky!(self, self.store.channels())
    }
    fn count_targets<'a>(
        &'a self,
        users: &'a [String],
        devices: &'a [String],
        clients: &'a [String],
    ) -> StoreFuture<'a, u64> {
        flaky!(self, self.store.count_targets(users, devices, clients))
    }
}

/// The second server is out of reach (keeping its data) while a member disconnects:
/// its membership there is left behind. Once the server is back, the next beat removes
/// this replica's memberships there and says to record again, so the ghost is gone and
/// the live member comes back.
#[tokio::test]
async fn a_shard_that_missed_a_disconnect_is_resynced() {
    let one = Server::start(Kind::Redis);
    let two = Server::start(Kind::Redis);
    let down = Arc::new(AtomicBool::new(false));
    let store = ShardedPresence::new(vec![
        Box::new(connected(&one.url()).await),
        Box::new(Flaky {
            store: connected(&two.url()).await,
            down: Arc::clone(&down),
        }),
    ]);
    let second = channel_on(&store, 1, "room");
    store.beat("n1", 1, LONG_TTL).await.expect("beat");
    assert!(store.beat("n1", 1, LONG_TTL).await.expect("beat").known);
    let (alice, bob) = (
        connection("n1", 1, Some("alice"), None),
        connection("n1", 2, Some("bob"), None),
    );
    for c in [&alice, &bob] {
        store.connect(c, false).await.expect("connect");
        store.join(&second, &c.member()).await.expect("join");
    }

    down.store(true, Ordering::Release);
    let gone = store.disconnect("n1/1").await.expect("the home answers");
    assert!(gone.known && gone.last_of_user);
    assert!(store.beat("n1", 1, LONG_TTL).await.expect("beat").known);
    down.store(false, Ordering::Release);
    // The ghost is still there...
    assert_eq!(store.stats(&second).await.expect("stats").clients, 2);
    // ...until the next beat resyncs the shard: this replica's memberships there are
    // gone, and it is told to record them again.
    assert!(!store.beat("n1", 1, LONG_TTL).await.expect("beat").known);
    assert_eq!(store.stats(&second).await.expect("stats").clients, 0);
    store.join(&second, &bob.member()).await.expect("join");
    let page = store.page(&second, 10, None).await.expect("page");
    let ids: Vec<&str> = page.members.iter().map(|m| m.client_id.as_str()).collect();
    assert_eq!(ids, ["n1/2"]);
    assert!(store.beat("n1", 1, LONG_TTL).await.expect("beat").known);
}
