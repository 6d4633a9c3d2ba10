//! The history scenarios against a real `redis-server`, one per test on its own port,
//! with two `RedisHistory` instances (two replicas) on it; then what only Redis can do
//! wrong: outages, forgotten scripts, clusters sharing a server, key lifetimes, memory.

mod history_suite;
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chorus_pubsub::history::redis::{self, RedisHistory};
use chorus_pubsub::history::{
    HistoryError, HistoryStore, Idempotency, MAX_READ, Position, Query, Retention,
};
use fred::prelude::{Builder, ClientLike, Config, Value};
use fred::types::{ClusterHash, CustomCommand};
use history_suite::{KEEP_100, SOON, Stores};
use support::{Kind, Server};

const PREFIX: &str = "websocket.broadcast";

async fn connected(url: &str, prefix: &str) -> RedisHistory {
    let store = redis::connect(url, prefix).await.expect("a valid URL");
    assert!(store.wait_connected(SOON).await, "never connected to {url}");
    store
}

async fn fresh() -> Stores {
    let server = Server::start(Kind::Redis);
    let url = server.url();
    let a = connected(&url, PREFIX).await;
    let b = connected(&url, PREFIX).await;
    Stores {
        a: Arc::new(a),
        b: Arc::new(b),
        // What a restart without persistence loses (the scripts stay: see the outage
        // test for a real restart).
        lose_everything: Box::new(move || {
            let url = url.clone();
            Box::pin(async move {
                let raw = raw_client(&url).await;
                command(&raw, "FLUSHALL", vec![]).await;
            })
        }),
        guard: Some(Box::new(server)),
    }
}

history_suite!(fresh());

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

async fn number(client: &fred::clients::Client, name: &'static str, args: Vec<&str>) -> i64 {
    command(client, name, args)
        .await
        .as_i64()
        .expect("an integer reply")
}

async fn used_memory(client: &fred::clients::Client) -> i64 {
    let info = command(client, "INFO", vec!["memory"]).await;
    let info = info.as_str().expect("INFO text").into_owned();
    info.lines()
        .find_map(|line| line.strip_prefix("used_memory:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("used_memory")
}

fn query(after: Option<u64>, limit: usize) -> Query {
    Query {
        after,
        limit,
        reverse: false,
    }
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
                Err(HistoryError::Unavailable { .. })
            ),
            "{url} {prefix:?} should be refused"
        );
    }
}

/// Every call, each failing at once with `Unreachable` while Redis is down.
async fn all_calls_fail_fast(store: &RedisHistory) {
    let started = Instant::now();
    let unreachable = HistoryError::Unreachable("redis");
    assert_eq!(
        store.append("c", b"1", KEEP_100, None).await.err(),
        Some(unreachable.clone())
    );
    assert_eq!(store.position("c").await.err(), Some(unreachable.clone()));
    assert_eq!(
        store.read("c", query(None, 10), KEEP_100).await.err(),
        Some(unreachable.clone())
    );
    assert_eq!(
        store.remember("c", "k", Duration::from_secs(1)).await.err(),
        Some(unreachable)
    );
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "{:?}",
        started.elapsed()
    );
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
    all_calls_fail_fast(&store).await;

    server.restart();
    assert!(store.wait_connected(SOON).await);
    let appended = store
        .append("c", b"1", KEEP_100, None)
        .await
        .expect("append");
    assert_eq!(appended.position.offset, 1);
}

/// Redis dies: calls fail quickly with `Unreachable`. It comes back empty and without
/// the scripts the store had loaded (NOSCRIPT): calls work again, in a new epoch.
#[tokio::test]
async fn an_outage_fails_fast_and_recovers_in_a_new_epoch() {
    let mut server = Server::start(Kind::Redis);
    let store = connected(&server.url(), PREFIX).await;
    for n in 1..=3 {
        store
            .append("room", format!("{n}").as_bytes(), KEEP_100, None)
            .await
            .expect("append");
    }
    let before = store.position("room").await.expect("position");
    assert_eq!(before.offset, 3);

    server.stop();
    let stopped = Instant::now();
    loop {
        let started = Instant::now();
        let result = store.position("room").await;
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "a call took {:?} while Redis was down",
            started.elapsed()
        );
        if let Err(error) = result {
            assert_eq!(error, HistoryError::Unreachable("redis"));
            break;
        }
        assert!(stopped.elapsed() < SOON, "calls kept succeeding");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Right after the drop too, before fred's first reconnection attempt.
    all_calls_fail_fast(&store).await;

    server.restart();
    assert!(store.wait_connected(SOON).await, "never reconnected");
    // Every script the store knew is gone from the new server: NOSCRIPT, reload.
    let after = store.position("room").await.expect("position");
    assert_eq!(after.offset, 0);
    assert_ne!(after.epoch, before.epoch);
    let appended = store
        .append("room", b"4", KEEP_100, None)
        .await
        .expect("append");
    assert_eq!(appended.position, Position { offset: 1, ..after });
    let page = store
        .read("room", query(Some(0), 10), KEEP_100)
        .await
        .expect("read");
    assert_eq!(page.publications.len(), 1);
    assert_eq!(&page.publications[0].data[..], b"4");
}

/// SCRIPT FLUSH behind the store's back: the next calls load their scripts again, and
/// the history is untouched.
#[tokio::test]
async fn flushed_scripts_are_loaded_again() {
    let server = Server::start(Kind::Redis);
    let store = connected(&server.url(), PREFIX).await;
    let first = store
        .append("c", b"1", KEEP_100, None)
        .await
        .expect("append");
    let raw = raw_client(&server.url()).await;
    command(&raw, "SCRIPT", vec!["FLUSH"]).await;
    let second = store
        .append("c", b"2", KEEP_100, None)
        .await
        .expect("append");
    assert_eq!(second.position.offset, 2);
    assert_eq!(second.position.epoch, first.position.epoch);
    command(&raw, "SCRIPT", vec!["FLUSH"]).await;
    let page = store
        .read("c", query(Some(0), 10), KEEP_100)
        .await
        .expect("read");
    assert_eq!(page.publications.len(), 2);
    command(&raw, "SCRIPT", vec!["FLUSH"]).await;
    assert_eq!(
        store.position("c").await.expect("position"),
        second.position
    );
}

/// Two clusters on one Redis, with prefixes where one is the start of the other, and
/// channel and key names chosen to meet if keys were joined naively: nothing is shared.
#[tokio::test]
async fn clusters_channels_and_keys_never_meet() {
    let server = Server::start(Kind::Redis);
    let one = connected(&server.url(), "ws").await;
    let two = connected(&server.url(), "ws:c").await;
    let key = |key| {
        Some(Idempotency {
            key,
            ttl: Duration::from_secs(60),
        })
    };
    one.append("c:x", b"1", KEEP_100, key("k"))
        .await
        .expect("append");
    one.append("x", b"1", KEEP_100, key("k"))
        .await
        .expect("append");
    assert_eq!(two.position("x").await.expect("position").offset, 0);
    assert_eq!(two.position("c:x").await.expect("position").offset, 0);
    assert!(
        !two.append("x", b"2", KEEP_100, key("k"))
            .await
            .expect("append")
            .duplicate
    );

    // Channel "a|b" with key "c" and channel "a" with key "b|c" are different keys.
    assert!(
        one.remember("a|b", "c", Duration::from_secs(60))
            .await
            .expect("remember")
    );
    assert!(
        one.remember("a", "b|c", Duration::from_secs(60))
            .await
            .expect("remember")
    );
    assert!(
        !one.remember("a", "b|c", Duration::from_secs(60))
            .await
            .expect("remember")
    );
    let appended = one
        .append("a|b", b"1", KEEP_100, key("k|x"))
        .await
        .expect("append");
    assert!(!appended.duplicate);
    assert!(
        !one.append("a", b"1", KEEP_100, key("b|k|x"))
            .await
            .expect("append")
            .duplicate
    );
    // A channel name that looks like a key of another kind stays a channel.
    assert_eq!(one.position("hm|x").await.expect("position").offset, 0);
}

/// Many replicas append with one idempotency key at once: exactly one appends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_many_concurrent_repeats_appends() {
    let server = Server::start(Kind::Redis);
    let stores = [
        Arc::new(connected(&server.url(), PREFIX).await),
        Arc::new(connected(&server.url(), PREFIX).await),
    ];
    let mut tasks = Vec::new();
    for n in 0..40 {
        let store = Arc::clone(&stores[n % 2]);
        tasks.push(tokio::spawn(async move {
            let key = Idempotency {
                key: "once",
                ttl: Duration::from_secs(60),
            };
            store
                .append("c", format!("{n}").as_bytes(), KEEP_100, Some(key))
                .await
                .expect("append")
        }));
    }
    let mut firsts = 0;
    for task in tasks {
        let appended = task.await.expect("task");
        assert_eq!(appended.position.offset, 1);
        firsts += usize::from(!appended.duplicate);
    }
    assert_eq!(firsts, 1);
    assert_eq!(stores[0].position("c").await.expect("position").offset, 1);
}

/// Data comes back byte for byte, whatever the bytes; reads are capped at MAX_READ.
#[tokio::test]
async fn data_is_kept_exactly_and_reads_are_capped() {
    let server = Server::start(Kind::Redis);
    let store = connected(&server.url(), PREFIX).await;
    let odd: Vec<u8> = (0..=255u8).chain([0, 0, b'\n']).collect();
    let keep = Retention {
        size: 2000,
        ttl: None,
    };
    store.append("bin", &odd, keep, None).await.expect("append");
    store.append("bin", b"", keep, None).await.expect("append");
    store
        .append("bin", b"123", keep, None)
        .await
        .expect("append");
    let page = store
        .read("bin", query(Some(0), 10), keep)
        .await
        .expect("read");
    let data: Vec<&[u8]> = page.publications.iter().map(|p| &p.data[..]).collect();
    assert_eq!(data, [&odd[..], b"", b"123"]);

    for n in 0..1500 {
        store
            .append("many", format!("{n}").as_bytes(), keep, None)
            .await
            .expect("append");
    }
    let page = store
        .read("many", query(Some(0), 5000), keep)
        .await
        .expect("read");
    assert_eq!(page.publications.len(), MAX_READ);
    assert_eq!(page.publications[0].offset, 1);
    assert_eq!(page.oldest, 1);
    assert_eq!(page.position.offset, 1500);
}

/// What Redis holds: the stream trimmed exactly to the size; with a ttl the stream
/// expires after it and the meta much later; without one both persist, except a meta
/// made by a read before any append.
#[tokio::test]
async fn keys_live_as_documented() {
    let server = Server::start(Kind::Redis);
    let store = connected(&server.url(), PREFIX).await;
    let raw = raw_client(&server.url()).await;
    let key = |kind: &str, channel: &str| format!("{PREFIX}|{kind}|{channel}");

    let keep = Retention {
        size: 10,
        ttl: None,
    };
    for n in 0..25 {
        store
            .append("plain", format!("{n}").as_bytes(), keep, None)
            .await
            .expect("append");
    }
    assert_eq!(number(&raw, "XLEN", vec![&key("hs", "plain")]).await, 10);
    assert_eq!(number(&raw, "PTTL", vec![&key("hs", "plain")]).await, -1);
    assert_eq!(number(&raw, "PTTL", vec![&key("hm", "plain")]).await, -1);

    store.position("idle").await.expect("position");
    let day = 86_400_000;
    let meta_ttl = number(&raw, "PTTL", vec![&key("hm", "idle")]).await;
    assert!((day - 60_000..=day).contains(&meta_ttl), "{meta_ttl}");

    let brief = Retention {
        size: 100,
        ttl: Some(Duration::from_millis(300)),
    };
    let first = store
        .append("brief", b"1", brief, None)
        .await
        .expect("append");
    let stream_ttl = number(&raw, "PTTL", vec![&key("hs", "brief")]).await;
    assert!((1..=300).contains(&stream_ttl), "{stream_ttl}");
    let meta_ttl = number(&raw, "PTTL", vec![&key("hm", "brief")]).await;
    assert!((day - 60_000..=day).contains(&meta_ttl), "{meta_ttl}");
    let long = Retention {
        size: 100,
        ttl: Some(Duration::from_secs(3 * 86_400)),
    };
    store
        .append("long", b"1", long, None)
        .await
        .expect("append");
    let meta_ttl = number(&raw, "PTTL", vec![&key("hm", "long")]).await;
    assert!(meta_ttl > 29 * day, "ten times the ttl: {meta_ttl}");

    // Past the ttl Redis drops the stream by itself; the meta keeps the epoch.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(number(&raw, "EXISTS", vec![&key("hs", "brief")]).await, 0);
    assert_eq!(
        store.position("brief").await.expect("position"),
        first.position
    );
    let page = store
        .read("brief", query(Some(0), 10), brief)
        .await
        .expect("read");
    assert_eq!((page.publications.len(), page.oldest), (0, 2));

    // Idempotency keys expire with their ttl.
    let once = Idempotency {
        key: "k",
        ttl: Duration::from_secs(60),
    };
    store
        .append("plain", b"x", keep, Some(once))
        .await
        .expect("append");
    let key_ttl = number(&raw, "PTTL", vec![&format!("{PREFIX}|hi|5|plain|k")]).await;
    assert!((59_000..=60_000).contains(&key_ttl), "{key_ttl}");
}

/// Expiry by time in a long stream: the entries older than the ttl go, at once, and
/// the ones after them stay, contiguous.
#[tokio::test]
async fn expiry_finds_the_first_entry_to_keep() {
    let server = Server::start(Kind::Redis);
    let store = connected(&server.url(), PREFIX).await;
    let keep = Retention {
        size: 10_000,
        ttl: Some(Duration::from_millis(700)),
    };
    for n in 0..1000 {
        store
            .append("c", format!("{n}").as_bytes(), keep, None)
            .await
            .expect("append");
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    for n in 1000..1300 {
        store
            .append("c", format!("{n}").as_bytes(), keep, None)
            .await
            .expect("append");
    }
    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        let page = store
            .read("c", query(None, MAX_READ), keep)
            .await
            .expect("read");
        let offsets: Vec<u64> = page.publications.iter().map(|p| p.offset).collect();
        let first = *offsets.first().expect("the newest are kept");
        assert_eq!(offsets, (first..=1300).collect::<Vec<_>>(), "contiguous");
        assert!(page.oldest <= first);
        if page.oldest > 1000 {
            // The first 1000 went (some of the last 300 may have too): all is read.
            assert_eq!(first, page.oldest);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never expired");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What a kept publication costs in Redis memory: 10 000 appends of a 100-byte payload
/// to one channel that keeps them all (INFO's `used_memory` before and after).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_per_publication() {
    const COUNT: i64 = 10_000;
    let server = Server::start(Kind::Redis);
    let store = connected(&server.url(), PREFIX).await;
    let raw = raw_client(&server.url()).await;
    let keep = Retention {
        size: 10_000,
        ttl: Some(Duration::from_secs(300)),
    };
    // Loads the script and makes the meta.
    store.position("room").await.expect("position");
    let empty = used_memory(&raw).await;
    for n in 0..COUNT {
        let payload = format!(r#"{{"n":"{n:08}","text":"{}"}}"#, "x".repeat(74));
        assert_eq!(payload.len(), 100);
        store
            .append("room", payload.as_bytes(), keep, None)
            .await
            .expect("append");
    }
    let full = used_memory(&raw).await;
    let stream = format!("{PREFIX}|hs|room");
    let usage = number(&raw, "MEMORY", vec!["USAGE", &stream, "SAMPLES", "0"]).await;
    eprintln!(
        "{COUNT} publications of 100 bytes: {} bytes each (used_memory), {} each (MEMORY USAGE of the stream)",
        (full - empty) / COUNT,
        usage / COUNT
    );
    assert_eq!(number(&raw, "XLEN", vec![&stream]).await, COUNT);
    assert!(
        (full - empty) / COUNT < 200,
        "{} bytes each",
        (full - empty) / COUNT
    );

    let started = Instant::now();
    let page = store
        .read("room", query(Some(5000), MAX_READ), keep)
        .await
        .expect("read");
    assert_eq!(page.publications.len(), MAX_READ);
    eprintln!("a read of 1000: {:?}", started.elapsed());
}
