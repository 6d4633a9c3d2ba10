//! The history scenarios against NATS JetStream: each test on its own fresh
//! `nats-server` with JetStream, two `NatsHistory` instances (two replicas) on it;
//! then what only NATS can do wrong: no JetStream, outages and restarts, two clusters
//! on one server, concurrent idempotent repeats, large reads.

mod history_suite;
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chorus_pubsub::history::nats::{self, NatsHistory};
use chorus_pubsub::history::{HistoryError, HistoryStore, Idempotency, MAX_READ, Query, Retention};
use history_suite::{KEEP_100, SOON, Stores};
use support::{Kind, Server};

const PREFIX: &str = "websocket.broadcast";

async fn connected(url: &str, prefix: &str) -> NatsHistory {
    let store = nats::connect(url, prefix).await.expect("a valid URL");
    assert!(store.wait_connected(SOON).await, "never connected to {url}");
    store
}

async fn fresh() -> Stores {
    let server = Server::start(Kind::Nats);
    let url = server.url();
    let a = connected(&url, PREFIX).await;
    let b = connected(&url, PREFIX).await;
    let stream = a.stream_name().to_owned();
    Stores {
        a: Arc::new(a),
        b: Arc::new(b),
        // What an operator deleting the stream (or a server losing its storage) does.
        lose_everything: Box::new(move || {
            let url = url.clone();
            let stream = stream.clone();
            Box::pin(async move {
                let client = async_nats::connect(&url).await.expect("connect");
                let js = async_nats::jetstream::new(client);
                js.delete_stream(&stream).await.expect("delete the stream");
            })
        }),
        guard: Some(Box::new(server)),
    }
}

history_suite!(fresh());

fn query(after: Option<u64>, limit: usize) -> Query {
    Query {
        after,
        limit,
        reverse: false,
    }
}

#[tokio::test]
async fn an_invalid_url_is_refused() {
    for url in ["", "http://localhost", "nats://a,"] {
        assert!(
            matches!(
                nats::connect(url, PREFIX).await,
                Err(HistoryError::Unavailable { store: "nats", .. })
            ),
            "{url:?}"
        );
    }
}

/// Without JetStream every call says why, and so does `problem`, for `/ready`.
#[tokio::test]
async fn without_jetstream_calls_say_why() {
    let server = Server::start_without_jetstream(Kind::Nats);
    let store = connected(&server.url(), PREFIX).await;
    let error = store.position("c").await.expect_err("no JetStream");
    assert!(
        matches!(&error, HistoryError::Unavailable { reason, .. } if reason.contains("JetStream")),
        "{error}"
    );
    assert!(store.problem().is_some_and(|why| why.contains("JetStream")));
}

/// NATS dies: calls fail quickly with `Unreachable`. It comes back with its storage:
/// the history and its epoch are still there.
#[tokio::test]
async fn an_outage_fails_fast_and_history_survives_a_restart() {
    let mut server = Server::start(Kind::Nats);
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
            "a call took {:?} while NATS was down",
            started.elapsed()
        );
        if let Err(error) = result {
            assert_eq!(error, HistoryError::Unreachable("nats"));
            break;
        }
        assert!(stopped.elapsed() < SOON, "calls kept succeeding");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    assert_eq!(
        store.append("room", b"x", KEEP_100, None).await.err(),
        Some(HistoryError::Unreachable("nats"))
    );
    assert!(started.elapsed() < Duration::from_millis(100));

    server.restart();
    assert!(store.wait_connected(SOON).await, "never reconnected");
    let deadline = tokio::time::Instant::now() + SOON;
    let after = loop {
        match store.position("room").await {
            Ok(position) => break position,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => panic!("never came back: {error}"),
        }
    };
    assert_eq!(after, before, "file storage keeps offsets and epoch");
    let page = store
        .read("room", query(Some(0), 10), KEEP_100)
        .await
        .expect("read");
    assert_eq!(page.publications.len(), 3);
}

/// Two clusters on one server with prefixes that would meet if names were joined
/// naively, and channel and key names with dots: nothing is shared.
#[tokio::test]
async fn clusters_channels_and_keys_never_meet() {
    let server = Server::start(Kind::Nats);
    let one = connected(&server.url(), "ws").await;
    let two = connected(&server.url(), "ws.c").await;
    let key = |key| {
        Some(Idempotency {
            key,
            ttl: Duration::from_secs(60),
        })
    };
    one.append("c.x", b"1", KEEP_100, key("k"))
        .await
        .expect("append");
    assert_eq!(two.position("c.x").await.expect("position").offset, 0);
    assert!(
        !two.append("c.x", b"2", KEEP_100, key("k"))
            .await
            .expect("append")
            .duplicate
    );
    // Channel "a.b" with key "c" and channel "a" with key "b.c" are different keys.
    assert!(
        one.remember("a.b", "c", Duration::from_secs(60))
            .await
            .expect("remember")
    );
    assert!(
        one.remember("a", "b.c", Duration::from_secs(60))
            .await
            .expect("remember")
    );
    assert!(
        !one.remember("a", "b.c", Duration::from_secs(60))
            .await
            .expect("remember")
    );
    // A channel whose name ends like an offset is still its own channel.
    one.append("x", b"1", KEEP_100, None).await.expect("append");
    assert_eq!(one.position("x.1").await.expect("position").offset, 0);
    assert_eq!(one.position("x").await.expect("position").offset, 1);
}

/// Many replicas append with one idempotency key at once: exactly one appends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_of_many_concurrent_repeats_appends() {
    let server = Server::start(Kind::Nats);
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

/// Many replicas append to one channel at once: every offset once, no gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_take_every_offset_once() {
    let server = Server::start(Kind::Nats);
    let stores = [
        Arc::new(connected(&server.url(), PREFIX).await),
        Arc::new(connected(&server.url(), PREFIX).await),
    ];
    let keep = Retention {
        size: 1000,
        ttl: None,
    };
    let mut tasks = Vec::new();
    for n in 0..200 {
        let store = Arc::clone(&stores[n % 2]);
        tasks.push(tokio::spawn(async move {
            store
                .append("busy", format!("{n}").as_bytes(), keep, None)
                .await
                .expect("append")
                .position
                .offset
        }));
    }
    let mut offsets = Vec::new();
    for task in tasks {
        offsets.push(task.await.expect("task"));
    }
    offsets.sort_unstable();
    assert_eq!(offsets, (1..=200).collect::<Vec<_>>());
    let page = stores[1]
        .read("busy", query(Some(0), 500), keep)
        .await
        .expect("read");
    let read: Vec<u64> = page.publications.iter().map(|p| p.offset).collect();
    assert_eq!(read, (1..=200).collect::<Vec<_>>());
}

/// Data comes back byte for byte; reads are capped at MAX_READ, newest-first reads
/// and reads from the middle of a long history are exact.
#[tokio::test]
async fn data_is_kept_exactly_and_reads_are_capped() {
    let server = Server::start(Kind::Nats);
    let store = connected(&server.url(), PREFIX).await;
    let odd: Vec<u8> = (0..=255u8).chain([0, 0, b'\n']).collect();
    let keep = Retention {
        size: 2000,
        ttl: None,
    };
    store.append("bin", &odd, keep, None).await.expect("append");
    store.append("bin", b"", keep, None).await.expect("append");
    let page = store
        .read("bin", query(Some(0), 10), keep)
        .await
        .expect("read");
    let data: Vec<&[u8]> = page.publications.iter().map(|p| &p.data[..]).collect();
    assert_eq!(data, [&odd[..], b""]);

    for n in 1..=1500 {
        store
            .append("many", format!("{n}").as_bytes(), keep, None)
            .await
            .expect("append");
        // Another channel in between, as in a real stream.
        store
            .append("other", b"x", keep, None)
            .await
            .expect("append");
    }
    let page = store
        .read("many", query(Some(0), 5000), keep)
        .await
        .expect("read");
    assert_eq!(page.publications.len(), MAX_READ);
    assert_eq!(page.publications[0].offset, 1);
    assert_eq!(&page.publications[999].data[..], b"1000");
    assert_eq!((page.oldest, page.position.offset), (1, 1500));
    let middle = store
        .read("many", query(Some(700), 3), keep)
        .await
        .expect("read");
    let offsets: Vec<u64> = middle.publications.iter().map(|p| p.offset).collect();
    assert_eq!(offsets, [701, 702, 703]);
    let newest = store
        .read(
            "many",
            Query {
                after: None,
                limit: 2,
                reverse: true,
            },
            keep,
        )
        .await
        .expect("read");
    let offsets: Vec<u64> = newest.publications.iter().map(|p| p.offset).collect();
    assert_eq!(offsets, [1500, 1499]);
}

/// What a kept publication costs in the stream: 2 000 appends of a 100-byte payload
/// to one channel that keeps them all (the stream's bytes, as JetStream accounts them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_per_publication() {
    const COUNT: u64 = 2_000;
    let server = Server::start(Kind::Nats);
    let store = connected(&server.url(), PREFIX).await;
    let keep = Retention {
        size: 10_000,
        ttl: Some(Duration::from_secs(300)),
    };
    store.position("room").await.expect("position");
    let client = async_nats::connect(&server.url()).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let mut stream = js.get_stream(store.stream_name()).await.expect("stream");
    let empty = stream.info().await.expect("info").state.bytes;
    for n in 0..COUNT {
        let payload = format!(r#"{{"n":"{n:08}","text":"{}"}}"#, "x".repeat(74));
        store
            .append("room", payload.as_bytes(), keep, None)
            .await
            .expect("append");
    }
    let full = stream.info().await.expect("info").state.bytes;
    let each = (full - empty) / COUNT;
    eprintln!("{COUNT} publications of 100 bytes: {each} stream bytes each");
    // The subject, the headers (offset, epoch, TTL and the compare-and-set's) and
    // JetStream's own record: about 400 bytes around 100 of data.
    assert!(each < 500, "{each} bytes each");
}
