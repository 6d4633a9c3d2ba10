//! What every history store must do, written once and run against each store
//! (`history_memory.rs`, `history_redis.rs`, `history_nats.rs`). Each scenario gets
//! two handles on one store, as two replicas would have.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use chorus_pubsub::history::{HistoryStore, Idempotency, Page, Query, Retention};

/// How long anything that should happen "soon" may take before a test fails.
pub const SOON: Duration = Duration::from_secs(10);

/// Two replicas' handles on one store, and a way to make the store lose everything
/// (as a restart without persistence would).
pub struct Stores {
    pub a: Arc<dyn HistoryStore>,
    pub b: Arc<dyn HistoryStore>,
    pub lose_everything: Box<dyn Fn() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>,
    /// Whatever must live as long as the stores (a server process).
    pub guard: Option<Box<dyn std::any::Any + Send + Sync>>,
}

pub const KEEP_100: Retention = Retention {
    size: 100,
    ttl: None,
};

fn query(after: Option<u64>, limit: usize, reverse: bool) -> Query {
    Query {
        after,
        limit,
        reverse,
    }
}

fn offsets(page: &Page) -> Vec<u64> {
    page.publications.iter().map(|p| p.offset).collect()
}

fn data(n: u64) -> Vec<u8> {
    format!(r#"{{"n":{n},"text":"café ✓"}}"#).into_bytes()
}

/// A channel starts at offset 0 in a stable epoch; offsets then count from 1, one per
/// append, whichever replica appends, and reads come back in order, byte for byte.
pub async fn offsets_are_contiguous_across_replicas(s: &Stores) {
    let channel = "chat:room@1/x=y.z";
    let empty = s.a.position(channel).await.expect("position");
    assert_eq!(empty.offset, 0);
    assert!(!empty.epoch.is_empty());
    assert_eq!(
        s.b.position(channel).await.expect("position"),
        empty,
        "one epoch for all"
    );

    // Two replicas append at once: every offset once, no gap.
    let append = |store: Arc<dyn HistoryStore>, n: u64| async move {
        store
            .append("chat:room@1/x=y.z", &data(n), KEEP_100, None)
            .await
            .expect("append")
    };
    let mut tasks = Vec::new();
    for n in 0..40 {
        let store = if n % 2 == 0 {
            Arc::clone(&s.a)
        } else {
            Arc::clone(&s.b)
        };
        tasks.push(tokio::spawn(append(store, n)));
    }
    let mut seen = BTreeSet::new();
    for task in tasks {
        let appended = task.await.expect("task");
        assert!(!appended.duplicate);
        assert_eq!(appended.position.epoch, empty.epoch);
        assert!(seen.insert(appended.position.offset));
    }
    assert_eq!(seen, (1..=40).collect());
    let page =
        s.b.read(channel, query(Some(0), 1000, false), KEEP_100)
            .await
            .expect("read");
    assert_eq!(offsets(&page), (1..=40).collect::<Vec<_>>());
    assert_eq!(page.position.offset, 40);
    assert_eq!(page.oldest, 1);
    let numbers: BTreeSet<u64> = page
        .publications
        .iter()
        .map(|p| {
            let value: serde_json::Value = serde_json::from_slice(&p.data).expect("JSON");
            assert_eq!(value["text"], "café ✓");
            value["n"].as_u64().expect("n")
        })
        .collect();
    assert_eq!(numbers, (0..40).collect());
    let other = s.a.position("chat:other").await.expect("position");
    assert_eq!(other.offset, 0, "channels are apart");
}

/// Reads: after an offset (oldest first), the newest, reversed, limited.
pub async fn reads_page_as_asked(s: &Stores) {
    let channel = "feed";
    for n in 1..=30 {
        s.a.append(channel, &data(n), KEEP_100, None)
            .await
            .expect("append");
    }
    let read = |after, limit, reverse| {
        let store = Arc::clone(&s.b);
        async move {
            offsets(
                &store
                    .read("feed", query(after, limit, reverse), KEEP_100)
                    .await
                    .expect("read"),
            )
        }
    };
    assert_eq!(
        read(Some(20), 100, false).await,
        (21..=30).collect::<Vec<_>>()
    );
    assert_eq!(read(Some(20), 3, false).await, [21, 22, 23]);
    assert_eq!(read(Some(20), 3, true).await, [30, 29, 28]);
    assert_eq!(read(None, 5, false).await, [26, 27, 28, 29, 30]);
    assert_eq!(read(None, 5, true).await, [30, 29, 28, 27, 26]);
    assert_eq!(read(Some(30), 10, false).await, Vec::<u64>::new());
    assert_eq!(
        read(Some(45), 10, false).await,
        Vec::<u64>::new(),
        "ahead of the channel"
    );
    let capped =
        s.a.read(channel, query(None, 5000, false), KEEP_100)
            .await
            .expect("read");
    assert_eq!(capped.publications.len(), 30);
}

/// A channel keeps at least `size` and fewer than 1.2 times that; what went is said
/// by `oldest`, and the offsets go on.
pub async fn retention_by_size_keeps_offsets_going(s: &Stores) {
    let keep = Retention {
        size: 10,
        ttl: None,
    };
    for n in 1..=25 {
        s.a.append("short", &data(n), keep, None)
            .await
            .expect("append");
    }
    let page =
        s.b.read("short", query(Some(0), 100, false), keep)
            .await
            .expect("read");
    let kept = offsets(&page);
    assert!((10..12).contains(&kept.len()), "kept {kept:?}");
    assert_eq!(kept.last(), Some(&25));
    assert_eq!(page.oldest, kept[0]);
    assert_eq!(kept, (page.oldest..=25).collect::<Vec<_>>(), "contiguous");
    assert_eq!(page.position.offset, 25);
    let appended =
        s.b.append("short", &data(26), keep, None)
            .await
            .expect("append");
    assert_eq!(appended.position.offset, 26);
}

/// Publications older than `ttl` go; the offset and the epoch stay.
pub async fn retention_by_time_keeps_the_epoch(s: &Stores) {
    let keep = Retention {
        size: 100,
        ttl: Some(Duration::from_millis(400)),
    };
    let mut epoch = String::new();
    for n in 1..=5 {
        epoch =
            s.a.append("brief", &data(n), keep, None)
                .await
                .expect("append")
                .position
                .epoch;
    }
    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        let page =
            s.b.read("brief", query(Some(0), 100, false), keep)
                .await
                .expect("read");
        assert_eq!(page.position.offset, 5);
        assert_eq!(
            page.position.epoch, epoch,
            "expiry does not change the epoch"
        );
        if page.publications.is_empty() {
            assert_eq!(page.oldest, 6);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never expired");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let appended =
        s.a.append("brief", &data(6), keep, None)
            .await
            .expect("append");
    assert_eq!(
        (appended.position.offset, appended.position.epoch),
        (6, epoch)
    );
}

/// An idempotency key, repeated within its time on any replica, appends nothing and
/// returns the first position; after its time it is a new publication.
pub async fn idempotent_appends_happen_once(s: &Stores) {
    let key = Idempotency {
        key: "order-17",
        ttl: Duration::from_millis(600),
    };
    let first =
        s.a.append("orders", &data(1), KEEP_100, Some(key))
            .await
            .expect("append");
    assert!(!first.duplicate);
    let again =
        s.b.append("orders", &data(2), KEEP_100, Some(key))
            .await
            .expect("append");
    assert!(again.duplicate);
    assert_eq!(again.position, first.position);
    let other_channel =
        s.b.append("invoices", &data(3), KEEP_100, Some(key))
            .await
            .expect("append");
    assert!(!other_channel.duplicate, "keys are per channel");
    let page =
        s.a.read("orders", query(Some(0), 10, false), KEEP_100)
            .await
            .expect("read");
    assert_eq!(page.publications.len(), 1);

    assert!(
        s.a.remember("plain", "k1", Duration::from_millis(600))
            .await
            .expect("remember")
    );
    assert!(
        !s.b.remember("plain", "k1", Duration::from_millis(600))
            .await
            .expect("remember")
    );
    assert!(
        s.b.remember("plain2", "k1", Duration::from_millis(600))
            .await
            .expect("remember")
    );

    let deadline = tokio::time::Instant::now() + SOON;
    loop {
        let later =
            s.b.append("orders", &data(4), KEEP_100, Some(key))
                .await
                .expect("append");
        if !later.duplicate {
            assert_eq!(later.position.offset, 2);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the key never expired"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        s.a.remember("plain", "k1", Duration::from_millis(600))
            .await
            .expect("remember")
    );
}

/// A store that lost everything starts a new epoch, at offset 0, and reads never mix
/// the old and the new.
pub async fn a_store_that_lost_everything_starts_a_new_epoch(s: &Stores) {
    for n in 1..=5 {
        s.a.append("fragile", &data(n), KEEP_100, None)
            .await
            .expect("append");
    }
    let before = s.b.position("fragile").await.expect("position");
    assert_eq!(before.offset, 5);
    (s.lose_everything)().await;
    let deadline = tokio::time::Instant::now() + SOON;
    let after = loop {
        match s.b.position("fragile").await {
            Ok(position) => break position,
            Err(_) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(error) => panic!("the store never came back: {error}"),
        }
    };
    assert_ne!(after.epoch, before.epoch);
    assert_eq!(after.offset, 0);
    let appended =
        s.a.append("fragile", &data(6), KEEP_100, None)
            .await
            .expect("append");
    assert_eq!(
        appended.position,
        chorus_pubsub::history::Position {
            offset: 1,
            epoch: after.epoch.clone()
        }
    );
    let page =
        s.b.read("fragile", query(Some(0), 10, false), KEEP_100)
            .await
            .expect("read");
    assert_eq!(offsets(&page), [1]);
    assert_eq!(page.position.epoch, after.epoch);
}

/// Runs every scenario, each on fresh stores from `fresh`.
#[macro_export]
macro_rules! history_suite {
    ($fresh:expr) => {
        #[tokio::test]
        async fn offsets_are_contiguous_across_replicas() {
            history_suite::offsets_are_contiguous_across_replicas(&$fresh.await).await;
        }
        #[tokio::test]
        async fn reads_page_as_asked() {
            history_suite::reads_page_as_asked(&$fresh.await).await;
        }
        #[tokio::test]
        async fn retention_by_size_keeps_offsets_going() {
            history_suite::retention_by_size_keeps_offsets_going(&$fresh.await).await;
        }
        #[tokio::test]
        async fn retention_by_time_keeps_the_epoch() {
            history_suite::retention_by_time_keeps_the_epoch(&$fresh.await).await;
        }
        #[tokio::test]
        async fn idempotent_appends_happen_once() {
            history_suite::idempotent_appends_happen_once(&$fresh.await).await;
        }
        #[tokio::test]
        async fn a_store_that_lost_everything_starts_a_new_epoch() {
            history_suite::a_store_that_lost_everything_starts_a_new_epoch(&$fresh.await).await;
        }
    };
}
