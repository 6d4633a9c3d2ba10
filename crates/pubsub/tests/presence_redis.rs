//! The presence scenarios against a real `redis-server`, one per test on its own port,
//! with two `RedisPresence` instances (two replicas) on it; then what only Redis can
//! do wrong: outages, forgotten scripts, clusters sharing a server, memory.

mod presence_suite;
mod support;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chorus_pubsub::presence::redis::{self, RedisPresence};
use chorus_pubsub::presence::{Connection, PresenceError, PresenceStore};
use fred::prelude::{Builder, ClientLike, Config, Value};
use fred::types::{ClusterHash, CustomCommand};
use futures_util::StreamExt;
use presence_suite::{LONG_TTL, SHORT_TTL, SOON, Stores, connection};
use serde_json::value::RawValue;
use support::{Kind, Server};

const PREFIX: &str = "websocket.broadcast";

async fn connected(url: &str, prefix: &str) -> RedisPresence {
    let store = redis::connect(url, prefix).await.expect("a valid URL");
    assert!(store.wait_connected(SOON).await, "never connected to {url}");
    store
}

async fn fresh() -> Stores {
    let server = Server::start(Kind::Redis);
    let a = connected(&server.url(), PREFIX).await;
    let b = connected(&server.url(), PREFIX).await;
    Stores {
        a: Arc::new(a),
        b: Arc::new(b),
        guard: Some(Box::new(server)),
    }
}

presence_suite!(fresh());

/// A plain client, to look at the server behind the store's back.
async fn raw_client(url: &str) -> fred::clients::Client {
    let client = Builder::from_config(Config::from_url(url).expect("URL"))
        .build()
        .expect("client");
    client.init().await.expect("connect");
    client
}

async fn command(client: &fred::clients::Client, name: &'static str, args: Vec<&str>) -> Value {
    client
        .custom(
            CustomCommand::new_static(name, ClusterHash::Random, false),
            args,
        )
        .await
        .expect(name)
}

async fn used_memory(client: &fred::clients::Client) -> i64 {
    let info = command(client, "INFO", vec!["memory"]).await;
    let info = info.as_str().expect("INFO text").into_owned();
    info.lines()
        .find_map(|line| line.strip_prefix("used_memory:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("used_memory")
}

#[tokio::test]
async fn an_invalid_url_or_prefix_is_refused() {
    for (url, prefix) in [
        ("http://localhost", PREFIX),
        ("rediss://localhost", PREFIX),
        ("redis://localhost", ""),
        ("redis://localhost", "a|b"),
        ("redis://localhost", "a b"),
    ] {
        assert!(
            matches!(
                redis::connect(url, prefix).await,
                Err(PresenceError::Unavailable { .. })
            ),
            "{url} {prefix:?} should be refused"
        );
    }
}

/// With no server, the store starts and fails every call at once; once a server
/// appears it connects by itself.
#[tokio::test]
async fn starts_while_redis_is_down() {
    let mut server = Server::stopped(Kind::Redis);
    let store = redis::connect(&server.url(), PREFIX)
        .await
        .expect("a valid URL");
    assert!(!store.is_connected());
    let started = Instant::now();
    assert_eq!(
        store.stats("x").await.map(|s| s.clients),
        Err(PresenceError::Unreachable("redis"))
    );
    assert!(started.elapsed() < Duration::from_millis(100));

    server.restart();
    assert!(store.wait_connected(SOON).await);
    assert_eq!(store.stats("x").await.expect("stats").clients, 0);
}

/// Redis dies: calls fail quickly with `Unreachable`. It comes back empty (and without
/// the scripts the store had loaded): calls work again, and a beat says the replica
/// must record its presence again.
#[tokio::test]
async fn an_outage_fails_fast_and_recovers() {
    let mut server = Server::start(Kind::Redis);
    let store = connected(&server.url(), PREFIX).await;
    assert!(!store.beat("n1", 1, LONG_TTL).await.expect("beat").known);
    let alice = connection("n1", 1, Some("alice"), None);
    assert!(
        store
            .connect(&alice, true)
            .await
            .expect("connect")
            .first_of_user
    );

    server.stop();
    let stopped = Instant::now();
    loop {
        let started = Instant::now();
        let result = store.beat("n1", 1, LONG_TTL).await;
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "a call took {:?} while Redis was down",
            started.elapsed()
        );
        if let Err(error) = result {
            assert_eq!(error, PresenceError::Unreachable("redis"));
            break;
        }
        assert!(stopped.elapsed() < SOON, "calls kept succeeding");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    // Right after the drop too, before fred's first reconnection attempt.
    for _ in 0..10 {
        assert_eq!(
            store.user("alice").await.map(|c| c.len()),
            Err(PresenceError::Unreachable("redis"))
        );
    }
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "{:?}",
        started.elapsed()
    );

    server.restart();
    assert!(store.wait_connected(SOON).await, "never reconnected");
    // Every script the store knew is gone from the new server: NOSCRIPT, reload.
    assert!(!store.beat("n1", 1, LONG_TTL).await.expect("beat").known);
    assert!(store.user("alice").await.expect("user").is_empty());
    assert!(
        store
            .connect(&alice, true)
            .await
            .expect("connect")
            .first_of_user
    );
    assert_eq!(store.user("alice").await.expect("user").len(), 1);
}

/// SCRIPT FLUSH behind the store's back: the next calls load their scripts again.
#[tokio::test]
async fn flushed_scripts_are_loaded_again() {
    let server = Server::start(Kind::Redis);
    let store = connected(&server.url(), PREFIX).await;
    let c = connection("n1", 1, Some("bob"), None);
    store.connect(&c, false).await.expect("connect");
    store.join("room", &c.member()).await.expect("join");
    let raw = raw_client(&server.url()).await;
    command(&raw, "SCRIPT", vec!["FLUSH"]).await;
    assert_eq!(store.stats("room").await.expect("stats").clients, 1);
    let gone = store.disconnect("n1/1").await.expect("disconnect");
    assert!(gone.known && gone.last_of_user);
    assert_eq!(gone.channels, ["room"]);
}

/// Two clusters on one Redis, with prefixes where one is the start of the other, and
/// names chosen to meet if keys were joined naively: neither sees the other.
#[tokio::test]
async fn clusters_with_different_prefixes_never_meet() {
    let server = Server::start(Kind::Redis);
    let one = connected(&server.url(), "ws").await;
    let two = connected(&server.url(), "ws:c").await;
    one.beat("n1", 1, LONG_TTL).await.expect("beat");
    let member = connection("n1", 1, Some("u"), None);
    one.connect(&member, true).await.expect("connect");
    one.join("c:x", &member.member()).await.expect("join");
    one.join("x", &member.member()).await.expect("join");
    one.set_channel_counts("n1", &[("x".into(), 1)])
        .await
        .expect("counts");

    assert_eq!(two.stats("x").await.expect("stats").clients, 0);
    assert_eq!(two.stats("c:x").await.expect("stats").clients, 0);
    assert!(two.user("u").await.expect("user").is_empty());
    assert!(two.nodes().await.expect("nodes").is_empty());
    assert!(two.channels().await.expect("channels").is_empty());
    assert!(
        two.connect(&member, true)
            .await
            .expect("connect")
            .first_of_user
    );
    assert!(two.reap_node("n1", 100).await.expect("reap").len() == 1);
    assert_eq!(one.stats("x").await.expect("stats").clients, 1);
    assert_eq!(one.user("u").await.expect("user").len(), 1);
}

/// Five replicas reap one dead replica's 300 connections at once, 7 at a time: each is
/// handed out exactly once, and each user's last connection is reported once.
#[tokio::test]
async fn many_reapers_hand_out_each_connection_once() {
    let server = Server::start(Kind::Redis);
    let mut stores = Vec::new();
    for _ in 0..5 {
        stores.push(connected(&server.url(), PREFIX).await);
    }
    stores[0].beat("dead", 1, SHORT_TTL).await.expect("beat");
    for n in 0..300 {
        let c = connection("dead", n, Some(&format!("user{}", n % 50)), None);
        stores[0].connect(&c, false).await.expect("connect");
        stores[0].join("room", &c.member()).await.expect("join");
    }
    // A membership whose connection was never recorded is cleared too.
    let orphan = connection("dead", 999, Some("ghost"), None);
    stores[1]
        .join("room", &orphan.member())
        .await
        .expect("join");
    // Until the dead replica's liveness has expired.
    let deadline = tokio::time::Instant::now() + SOON;
    while !stores[1].nodes().await.expect("nodes").is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the dead replica never expired"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let reaps = stores.iter().map(|store| async move {
        let mut lost = Vec::new();
        loop {
            let more = store.reap(7).await.expect("reap");
            assert!(more.len() <= 7);
            if more.is_empty() {
                return lost;
            }
            lost.extend(more);
        }
    });
    let lost: Vec<_> = futures_util::future::join_all(reaps)
        .await
        .into_iter()
        .flatten()
        .collect();
    let ids: BTreeSet<&str> = lost
        .iter()
        .map(|l| l.connection.client_id.as_str())
        .collect();
    assert_eq!((lost.len(), ids.len()), (300, 300));
    let lasts: BTreeSet<&str> = lost
        .iter()
        .filter(|l| l.last_of_user)
        .map(|l| l.connection.user.as_deref().expect("user"))
        .collect();
    assert_eq!(lasts.len(), 50);
    assert_eq!(lost.iter().filter(|l| l.last_of_user).count(), 50);
    let stats = stores[2].stats("room").await.expect("stats");
    assert_eq!((stats.clients, stats.users), (0, 0));

    let raw = raw_client(&server.url()).await;
    let keys = command(&raw, "DBSIZE", vec![]).await;
    assert_eq!(
        keys.as_i64(),
        Some(0),
        "everything of the dead replica is gone"
    );
}

/// Runs the futures, 64 at a time.
async fn all<F: std::future::Future<Output = ()>>(futures: impl Iterator<Item = F>) {
    futures_util::stream::iter(futures)
        .buffer_unordered(64)
        .collect::<Vec<()>>()
        .await;
}

/// 20 000 members in one channel: what a member costs in Redis memory (measured with
/// INFO's `used_memory` before and after), and that stats and paging stay fast.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_per_channel_member() {
    const MEMBERS: u32 = 20_000;
    let server = Server::start(Kind::Redis);
    let store = connected(&server.url(), PREFIX).await;
    let raw = raw_client(&server.url()).await;
    let connections: Vec<Connection> = (0..MEMBERS)
        .map(|n| {
            let mut c = connection("chorus-0", n, Some(&format!("user-{n}")), None);
            c.info =
                Some(RawValue::from_string(format!(r#"{{"name":"User {n}"}}"#)).expect("JSON"));
            c
        })
        .collect();
    // Loads the scripts.
    store.stats("room").await.expect("stats");
    let empty = used_memory(&raw).await;
    let store = &store;
    all(connections.iter().map(|c| async move {
        store.connect(c, false).await.expect("connect");
    }))
    .await;
    let recorded = used_memory(&raw).await;
    all(connections.iter().map(|c| async move {
        store.join("room", &c.member()).await.expect("join");
    }))
    .await;
    let joined = used_memory(&raw).await;
    // The same members again, in a channel nobody is connected to (records only).
    all(connections.iter().map(|c| async move {
        let mut member = c.member();
        member.client_id = format!("ghost-0/{}", &c.client_id["chorus-0/".len()..]);
        store.join("ghosts", &member).await.expect("join");
    }))
    .await;
    let ghosts = used_memory(&raw).await;

    let per = |bytes: i64| bytes / i64::from(MEMBERS);
    let member = serde_json::to_string(&connections[12_345].member()).expect("JSON");
    eprintln!(
        "{MEMBERS} connections: {} bytes each; as members of one channel: {} bytes each \
         (without a recorded connection: {}); a Member as JSON is {} bytes: {member}",
        per(recorded - empty),
        per(joined - recorded),
        per(ghosts - joined),
        member.len()
    );
    for key in [
        "cm|room",
        "cz|room",
        "cu|room",
        "kc",
        "conn",
        "nk|chorus-0",
        "no|ghost-0",
    ] {
        let key = format!("{PREFIX}|{key}");
        let usage = command(&raw, "MEMORY", vec!["USAGE", &key, "SAMPLES", "0"]).await;
        let usage = usage.as_i64().unwrap_or_default();
        // `kc` and `conn` hold every client, those of "ghosts" included.
        eprintln!("MEMORY USAGE {key}: {usage} ({} per {MEMBERS})", per(usage));
    }
    assert!(
        per(joined - recorded) < 420,
        "{} bytes per member",
        per(joined - recorded)
    );

    let started = Instant::now();
    let stats = store.stats("room").await.expect("stats");
    assert_eq!(
        (stats.clients, stats.users),
        (u64::from(MEMBERS), u64::from(MEMBERS))
    );
    let stats_took = started.elapsed();
    let started = Instant::now();
    let mut cursor: Option<String> = None;
    let mut seen = 0;
    loop {
        let page = store
            .page("room", 1000, cursor.as_deref())
            .await
            .expect("page");
        seen += page.members.len();
        match page.cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(seen, MEMBERS as usize);
    eprintln!(
        "stats: {stats_took:?}; 20 pages of 1000: {:?}",
        started.elapsed()
    );
}
