//! The presence scenarios against NATS JetStream KV: each test on its own fresh
//! `nats-server` with JetStream, two stores (two replicas) on it. Then what is
//! particular to NATS: a server without JetStream, a server restart, two clusters on
//! one server, a replica that starts after the others.

mod presence_suite;
mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chorus_pubsub::presence::nats::NatsPresence;
use chorus_pubsub::presence::{Member, PresenceError, PresenceStore};
use presence_suite::{LONG_TTL, SOON, Stores, connection};
use support::{Kind, Server};

async fn store(server: &Server, prefix: &str) -> NatsPresence {
    let store = NatsPresence::connect(&server.url(), prefix)
        .await
        .expect("a valid URL");
    assert!(store.wait_ready(SOON).await, "the store never got ready");
    store
}

async fn fresh() -> Stores {
    let server = Server::start(Kind::Nats);
    let a = store(&server, "chorus").await;
    let b = store(&server, "chorus").await;
    Stores {
        a: Arc::new(a),
        b: Arc::new(b),
        guard: Some(Box::new(server)),
    }
}

presence_suite!(fresh());

#[tokio::test]
async fn an_invalid_url_is_refused() {
    for bad in ["", "http://localhost", "nats://a,"] {
        assert!(
            matches!(
                NatsPresence::connect(bad, "chorus").await,
                Err(PresenceError::Unavailable { store: "nats", .. })
            ),
            "{bad:?}"
        );
    }
}

/// Counts the error events of this crate, and keeps their text.
#[derive(Clone, Default)]
struct ErrorLog {
    count: Arc<AtomicUsize>,
    lines: Arc<Mutex<Vec<String>>>,
}

struct Text(String);

impl tracing::field::Visit for Text {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.push_str(&format!("{}={value:?} ", field.name()));
    }
}

impl tracing::Subscriber for ErrorLog {
    fn enabled(&self, metadata: &tracing::Metadata<'_>) -> bool {
        *metadata.level() == tracing::Level::ERROR
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        if event.metadata().target().starts_with("chorus_pubsub") {
            let mut text = Text(String::new());
            event.record(&mut text);
            self.count.fetch_add(1, Ordering::SeqCst);
            self.lines.lock().expect("lock").push(text.0);
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// Without JetStream the store says why (once in the log), and every call fails with
/// `Unavailable`, without panicking.
#[tokio::test]
async fn without_jetstream_calls_fail_as_unavailable_with_one_log_line() {
    let log = ErrorLog::default();
    // The test runtime has one thread, so the store's tasks log here too.
    let _logging = tracing::subscriber::set_default(log.clone());
    let server = Server::start_without_jetstream(Kind::Nats);
    let store = NatsPresence::connect(&server.url(), "chorus")
        .await
        .expect("a valid URL");
    let deadline = Instant::now() + SOON;
    let reason = loop {
        if let Some(reason) = store.problem() {
            break reason;
        }
        assert!(Instant::now() < deadline, "no problem reported");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(reason.contains("JetStream"), "{reason}");
    assert!(!store.wait_ready(Duration::from_millis(100)).await);

    let c = connection("n1", 1, Some("u"), None);
    for _ in 0..3 {
        let unavailable = |result: Result<(), PresenceError>| {
            assert!(
                matches!(
                    result,
                    Err(PresenceError::Unavailable { store: "nats", .. })
                ),
                "{result:?}"
            );
        };
        unavailable(store.beat("n1", 1, LONG_TTL).await.map(|_| ()));
        unavailable(store.connect(&c, true).await.map(|_| ()));
        unavailable(store.join("room", &c.member()).await);
        unavailable(store.stats("room").await.map(|_| ()));
        unavailable(store.reap(10).await.map(|_| ()));
        unavailable(store.disconnect("n1/1").await.map(|_| ()));
        // The store keeps checking in the background; it must not log each time.
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    let lines = log.lines.lock().expect("lock").clone();
    assert_eq!(log.count.load(Ordering::SeqCst), 1, "{lines:?}");
    assert!(lines[0].contains("JetStream"), "{lines:?}");
}

/// While the server is down, calls fail with `Unreachable("nats")` at once; once it is
/// back they work again, on both replicas, with what was stored before.
#[tokio::test]
async fn a_restarted_server_is_unreachable_then_works_again() {
    let mut server = Server::start(Kind::Nats);
    let a = store(&server, "chorus").await;
    let b = store(&server, "chorus").await;
    a.beat("n1", 1, LONG_TTL).await.expect("beat");
    let before = connection("n1", 1, Some("ann"), None);
    a.connect(&before, true).await.expect("connect");
    a.join("room", &before.member()).await.expect("join");

    server.stop();
    let deadline = Instant::now() + SOON;
    while b.stats("room").await.is_ok() {
        assert!(Instant::now() < deadline, "the outage went unnoticed");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for store in [&a, &b] {
        let started = Instant::now();
        let failures = [
            store.stats("room").await.map(|_| ()),
            store.beat("n1", 1, LONG_TTL).await.map(|_| ()),
            store.join("room", &before.member()).await,
            store.disconnect("n1/1").await.map(|_| ()),
            store.reap(10).await.map(|_| ()),
        ];
        for failure in failures {
            assert_eq!(failure, Err(PresenceError::Unreachable("nats")));
        }
        let took = started.elapsed();
        assert!(took < Duration::from_millis(500), "failing took {took:?}");
        assert_eq!(store.problem(), None, "merely unreachable is not a problem");
    }

    server.restart();
    let deadline = Instant::now() + SOON;
    loop {
        match b.stats("room").await {
            Ok(stats) => {
                assert_eq!(stats.clients, 1, "the bucket survived the restart");
                break;
            }
            Err(error) => {
                assert_eq!(error, PresenceError::Unreachable("nats"));
                assert!(Instant::now() < deadline, "never recovered");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    assert!(a.wait_ready(SOON).await);
    assert!(a.beat("n1", 1, LONG_TTL).await.expect("beat").known);
    let after = connection("n1", 2, Some("ann"), None);
    assert!(
        !a.connect(&after, true)
            .await
            .expect("connect")
            .first_of_user
    );
    a.join("room", &after.member()).await.expect("join");
    assert_eq!(b.stats("room").await.expect("stats").clients, 2);
    assert_eq!(b.user("ann").await.expect("user").len(), 2);
}

/// Two clusters (two prefixes) on one server never see each other's presence.
#[tokio::test]
async fn clusters_with_different_prefixes_stay_apart() {
    let server = Server::start(Kind::Nats);
    let one = store(&server, "app.one").await;
    let two = store(&server, "app_2Eone").await;
    assert_ne!(one.stream_name(), two.stream_name());
    let c = connection("n1", 1, Some("u"), None);
    assert!(one.connect(&c, true).await.expect("connect").first_of_user);
    assert!(two.connect(&c, true).await.expect("connect").first_of_user);
    one.join("room", &c.member()).await.expect("join");
    assert_eq!(one.stats("room").await.expect("stats").clients, 1);
    assert_eq!(two.stats("room").await.expect("stats").clients, 0);
}

/// A replica that starts after the others loads what the bucket holds (and not what
/// was deleted), including who is alive.
#[tokio::test]
async fn a_late_replica_loads_the_bucket() {
    let server = Server::start(Kind::Nats);
    let a = store(&server, "chorus").await;
    a.beat("n1", 7, LONG_TTL).await.expect("beat");
    a.beat("gone", 8, LONG_TTL).await.expect("beat");
    a.retire("gone").await.expect("retire");
    for n in 0..50 {
        let c = connection("n1", n, Some(&format!("u{}", n % 5)), None);
        a.connect(&c, true).await.expect("connect");
        a.join("room", &c.member()).await.expect("join");
    }
    for n in 0..10 {
        a.disconnect(&format!("n1/{n}")).await.expect("disconnect");
    }
    a.set_channel_counts("n1", &[("room".to_owned(), 40)])
        .await
        .expect("counts");

    let late = store(&server, "chorus").await;
    let stats = late.stats("room").await.expect("stats");
    assert_eq!((stats.clients, stats.users), (40, 5));
    let nodes = late.nodes().await.expect("nodes");
    assert_eq!(nodes.len(), 1);
    assert_eq!(
        (
            nodes[0].node_id.as_str(),
            nodes[0].connections,
            nodes[0].started_at_ms
        ),
        ("n1", 40, 7)
    );
    assert_eq!(
        late.channels().await.expect("channels"),
        [("room".to_owned(), 40)]
    );
    let page = late.page("room", 5, None).await.expect("page");
    assert_eq!(page.members[0].client_id, "n1/10");
    // The retired replica holds nothing, so any reaper forgets it.
    assert!(late.reap(10).await.expect("reap").is_empty());
    assert!(!a.beat("gone", 8, LONG_TTL).await.expect("beat").known);
}

/// The mirror's consumer deleted behind its back (no disconnect): reads recover by
/// themselves, and see what was written meanwhile.
#[tokio::test]
async fn a_lost_mirror_consumer_is_recreated() {
    let server = Server::start(Kind::Nats);
    let a = store(&server, "chorus").await;
    let b = store(&server, "chorus").await;
    let admin = async_nats::connect(server.url()).await.expect("connect");
    let names: serde_json::Value = {
        let subject = format!("$JS.API.CONSUMER.NAMES.{}", a.stream_name());
        let reply = admin
            .request(subject, "{}".into())
            .await
            .expect("consumer names");
        serde_json::from_slice(&reply.payload).expect("JSON")
    };
    let names = names["consumers"].as_array().cloned().unwrap_or_default();
    assert_eq!(names.len(), 2, "one mirror consumer per store: {names:?}");
    for name in names {
        let subject = format!(
            "$JS.API.CONSUMER.DELETE.{}.{}",
            a.stream_name(),
            name.as_str().unwrap_or_default()
        );
        admin
            .request(subject, "".into())
            .await
            .expect("consumer deleted");
    }
    let c = connection("n1", 1, Some("u"), None);
    b.connect(&c, true).await.expect("connect");
    b.join("room", &c.member()).await.expect("join");
    let deadline = Instant::now() + SOON;
    loop {
        match a.stats("room").await {
            Ok(stats) => {
                assert_eq!(stats.clients, 1);
                break;
            }
            Err(error) => {
                assert_eq!(error, PresenceError::Unreachable("nats"));
                assert!(Instant::now() < deadline, "the mirror never recovered");
            }
        }
    }
    assert_eq!(a.user("u").await.expect("user").len(), 1);
}

/// A channel of 20 000 members: how long `stats` and a page of 100 take, and what a
/// member costs in the stream. Run with `--ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement"]
async fn large_channel_reads_are_fast() {
    let server = Server::start(Kind::Nats);
    let a = Arc::new(store(&server, "chorus").await);
    let b = store(&server, "chorus").await;
    let total = 20_000u32;
    let started = Instant::now();
    let mut joins = tokio::task::JoinSet::new();
    for worker in 0..32u32 {
        let a = Arc::clone(&a);
        joins.spawn(async move {
            let mut n = worker;
            while n < total {
                let member = Member {
                    client_id: format!("node-{}/{n}", n % 4),
                    node_id: format!("node-{}", n % 4),
                    user: Some(format!("user-{}", n % 5000)),
                    device: None,
                    info: None,
                };
                a.join("big", &member).await.expect("join");
                n += 32;
            }
        });
    }
    while let Some(joined) = joins.join_next().await {
        joined.expect("joins");
    }
    println!("20000 joins: {:?}", started.elapsed());

    let mut stats_times = Vec::new();
    for _ in 0..500 {
        let started = Instant::now();
        let stats = b.stats("big").await.expect("stats");
        stats_times.push(started.elapsed());
        assert_eq!(stats.clients, u64::from(total));
    }
    let mut page_times = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..200 {
        let started = Instant::now();
        let page = b.page("big", 100, cursor.as_deref()).await.expect("page");
        page_times.push(started.elapsed());
        cursor = page.cursor;
    }
    let p = |times: &mut Vec<Duration>, q: f64| {
        times.sort();
        times[((times.len() as f64 - 1.0) * q) as usize]
    };
    println!(
        "stats p50 {:?} p99 {:?}; page of 100 p50 {:?} p99 {:?}",
        p(&mut stats_times, 0.5),
        p(&mut stats_times, 0.99),
        p(&mut page_times, 0.5),
        p(&mut page_times, 0.99)
    );
    let info: serde_json::Value = {
        let client = async_nats::connect(server.url()).await.expect("connect");
        let reply = client
            .request(
                format!("$JS.API.STREAM.INFO.{}", b.stream_name()),
                "{}".into(),
            )
            .await
            .expect("stream info");
        serde_json::from_slice(&reply.payload).expect("JSON")
    };
    let bytes = info["state"]["bytes"].as_u64().unwrap_or_default();
    let messages = info["state"]["messages"].as_u64().unwrap_or_default();
    println!(
        "stream: {messages} messages, {bytes} bytes, {} bytes per member",
        bytes / u64::from(total)
    );
    assert!(p(&mut stats_times, 0.99) < Duration::from_millis(5));
    assert!(p(&mut page_times, 0.99) < Duration::from_millis(20));
}
