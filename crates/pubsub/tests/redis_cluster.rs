//! The Redis Cluster backbone (`redis-cluster://`) against real clusters started by
//! the test.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use chorus_pubsub::Backbone;
use chorus_pubsub::redis::{channel_tag, connect_shards};
use support::{RedisCluster, SOON};
use tokio::time::{Instant, timeout};

/// A failover moves every topic of the failed master to its replica: more topics than
/// the adapter's request queue holds, so they must go in bulk, and every one of them
/// delivers again afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_moves_every_topic_of_the_failed_master() {
    // More than the 4 096 requests the subscription queue holds.
    const TOPICS: usize = 6_000;
    let mut cluster = RedisCluster::start_replicated(3);
    let url = cluster.url();
    let (inbox, mut received) = support::inbox();
    let subscriber = connect_shards(&url, "p", inbox).await.expect("a valid URL");
    let publisher = connect_shards(&url, "p", support::inbox().0)
        .await
        .expect("a valid URL");
    let all_up = [true, true, true];
    wait_until("both adapters to reach every master", || {
        subscriber.shards_connected() == all_up && publisher.shards_connected() == all_up
    })
    .await;

    let topics: Vec<String> = (0..)
        .map(|i| format!("p/t{i}"))
        .filter(|topic| {
            let slot = fred::util::redis_keyslot(redis_channel(topic).as_bytes());
            cluster.node_of_slot(slot) == 1
        })
        .take(TOPICS)
        .collect();
    for chunk in topics.chunks(1_000) {
        let held: Vec<_> = chunk
            .iter()
            .map(|topic| subscriber.subscribe(topic).expect("queued"))
            .collect();
        for answer in held {
            assert_eq!(answer.await, Ok(true), "subscribed on the master");
        }
    }
    every_topic_delivers(publisher.as_ref(), &mut received, &topics, "before").await;

    cluster.nodes[1].stop();
    let deadline = Instant::now() + 3 * SOON;
    while cluster.nodes[4].redis_cli(&["ROLE"])[0] != "master" {
        assert!(Instant::now() < deadline, "the replica did not take over");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_until("both adapters to reach the new master", || {
        subscriber.shards_connected() == all_up && publisher.shards_connected() == all_up
    })
    .await;
    every_topic_delivers(publisher.as_ref(), &mut received, &topics, "after").await;
}

/// Publishes `<round>:<topic>` on every topic not yet seen until each has been received
/// once (moving subscriptions takes a moment), within a deadline.
async fn every_topic_delivers(
    publisher: &dyn Backbone,
    received: &mut tokio::sync::mpsc::UnboundedReceiver<Bytes>,
    topics: &[String],
    round: &str,
) {
    let deadline = Instant::now() + 3 * SOON;
    let mut missing: BTreeSet<&String> = topics.iter().collect();
    while !missing.is_empty() {
        assert!(
            Instant::now() < deadline,
            "{} of {} topics never delivered {round}",
            missing.len(),
            topics.len()
        );
        for topic in &missing {
            // Refused while the topic's master is unknown: tried again next pass.
            let _ = publisher.publish(topic, Bytes::from(format!("{round}:{topic}")));
        }
        // Everything sent this pass arrives within this; what comes later is a repeat.
        while let Ok(Some(message)) = timeout(Duration::from_millis(300), received.recv()).await {
            let text = String::from_utf8_lossy(&message);
            if let Some(topic) = text.strip_prefix(&format!("{round}:")) {
                missing.remove(&topic.to_owned());
            }
        }
    }
}

async fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + 3 * SOON;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The Redis channel a topic of prefix `p` travels on: behind its channel's hash tag.
fn redis_channel(topic: &str) -> String {
    let channel = topic.strip_prefix("p/").expect("a channel topic");
    channel_tag("p", channel) + topic
}
