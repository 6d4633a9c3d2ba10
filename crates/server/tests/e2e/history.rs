//! Section 11 across replicas: offsets, recovery after a reconnect to another replica,
//! one order per channel, idempotent publish, and the delivery policies. The
//! scenarios are written once over replica addresses and run on an in-process cluster
//! and on three processes over real Redis and NATS (`history_cluster.rs`).

use std::collections::BTreeSet;
use std::net::SocketAddr;

use chorus_pubsub::local::LocalBus;
use serde_json::{Value, json};

use crate::support::{Client, UNLIMITED_PUBLISHING, config};

/// `hist:*` keeps 1000, `short:*` keeps 10, `drop:*` and `last:*` keep 1000 with the
/// drop policies.
pub const NAMESPACES: &str = r#"{
    "hist": {"history_size": 1000, "history_ttl": "5m"},
    "short": {"history_size": 10},
    "drop": {"history_size": 1000, "delivery": "drop_oldest"},
    "last": {"history_size": 1000, "delivery": "latest"},
    "plain": {"delivery": "drop_oldest"}
}"#;

pub fn history_vars() -> Vec<(&'static str, &'static str)> {
    let mut vars = vec![("WS_NAMESPACES", NAMESPACES)];
    vars.extend(UNLIMITED_PUBLISHING);
    vars
}

/// A subscription's position: `{"offset", "epoch"}` from a subscribe reply.
fn position(reply: &Value) -> Value {
    json!({"offset": reply["offset"], "epoch": reply["epoch"]})
}

/// The next `message` notification, skipping others.
async fn next_message(client: &mut Client) -> Value {
    loop {
        let message = client.recv().await;
        if message["method"] == "message" {
            return message["params"].clone();
        }
    }
}

/// Publishes `count` messages from `client` to `channel` (pipelined), and waits for
/// every reply; returns the offsets the replies gave.
pub async fn publish_many(client: &mut Client, channel: &str, count: usize, tag: &str) -> Vec<u64> {
    for n in 0..count {
        let request = json!({"jsonrpc": "2.0", "method": "publish",
            "params": {"channel": channel, "data": {"tag": tag, "n": n}}, "id": format!("{tag}-{n}")});
        client.send_text(&request.to_string()).await;
    }
    let mut offsets = Vec::new();
    while offsets.len() < count {
        let message = client.recv().await;
        if let Some(id) = message["id"].as_str()
            && id.starts_with(tag)
        {
            assert!(message.get("error").is_none(), "publish failed: {message}");
            offsets.push(message["result"]["offset"].as_u64().expect("offset"));
        }
    }
    offsets
}

/// A client gone for a while reconnects to another replica with `since`: it gets
/// exactly what it missed, in order, then live publications, none twice.
pub async fn a_reconnecting_client_recovers_exactly_what_it_missed(addrs: &[SocketAddr]) {
    let channel = "hist:recover";
    let mut reader = Client::connect(addrs[0]).await;
    let reply = reader.ok("subscribe", json!({"channel": channel})).await;
    assert_eq!(reply["recovered"], false);
    assert_eq!(reply["publications"], json!([]));
    let mut since = position(&reply);
    let start = reply["offset"].as_u64().expect("offset");
    drop(reader);

    let mut publisher = Client::connect(addrs[1]).await;
    let offsets = publish_many(&mut publisher, channel, 100, "missed").await;
    let mut sorted = offsets.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        (start + 1..=start + 100).collect::<Vec<_>>(),
        "contiguous"
    );

    let mut back = Client::connect(addrs[2 % addrs.len()]).await;
    let reply = back
        .ok("subscribe", json!({"channel": channel, "since": since}))
        .await;
    assert_eq!(reply["recovered"], true, "{reply}");
    let recovered = reply["publications"].as_array().expect("publications");
    assert_eq!(recovered.len(), 100);
    for (index, publication) in recovered.iter().enumerate() {
        assert_eq!(publication["offset"], json!(start + 1 + index as u64));
        assert_eq!(publication["data"]["n"], json!(index), "in publish order");
    }
    assert_eq!(reply["offset"], json!(start + 100));
    since = position(&reply);

    publish_many(&mut publisher, channel, 5, "live").await;
    for n in 0..5u64 {
        let message = next_message(&mut back).await;
        assert_eq!(message["offset"], json!(start + 101 + n), "{message}");
        assert_eq!(message["data"]["tag"], "live");
    }
    back.assert_nothing_pending().await;

    // Too far behind (another epoch, or ahead of the channel): recovered false, never
    // a partial list.
    let mut lost = Client::connect(addrs[0]).await;
    let reply = lost
        .ok(
            "subscribe",
            json!({"channel": channel, "since": {"offset": 3, "epoch": "not-an-epoch"}}),
        )
        .await;
    assert_eq!(
        (reply["recovered"].clone(), reply["publications"].clone()),
        (json!(false), json!([]))
    );
    assert_eq!(reply["epoch"], since["epoch"]);
    let mut ahead = Client::connect(addrs[1]).await;
    let reply = ahead
        .ok(
            "subscribe",
            json!({"channel": channel, "since": {"offset": start + 1000, "epoch": since["epoch"]}}),
        )
        .await;
    assert_eq!(reply["recovered"], false, "{reply}");
}

/// Publications from two replicas at once: every subscriber on every replica sees the
/// same order, the offset order.
pub async fn interleaved_publications_arrive_in_one_order(addrs: &[SocketAddr]) {
    let channel = "hist:order";
    let mut readers = Vec::new();
    for addr in addrs {
        let mut reader = Client::connect(*addr).await;
        reader.ok("subscribe", json!({"channel": channel})).await;
        readers.push(reader);
    }
    let mut a = Client::connect(addrs[0]).await;
    let mut b = Client::connect(addrs[1 % addrs.len()]).await;
    let (left, right) = tokio::join!(
        publish_many(&mut a, channel, 60, "a"),
        publish_many(&mut b, channel, 60, "b")
    );
    let all: BTreeSet<u64> = left.iter().chain(&right).copied().collect();
    assert_eq!(all.len(), 120);
    let first = *all.first().expect("offsets");
    let mut orders = Vec::new();
    for reader in &mut readers {
        let mut seen = Vec::new();
        for _ in 0..120 {
            let message = next_message(reader).await;
            seen.push((
                message["offset"].as_u64().expect("offset"),
                format!("{}{}", message["data"]["tag"], message["data"]["n"]),
            ));
        }
        let offsets: Vec<u64> = seen.iter().map(|(offset, _)| *offset).collect();
        assert_eq!(
            offsets,
            (first..first + 120).collect::<Vec<_>>(),
            "offset order, no gap"
        );
        orders.push(seen);
    }
    for order in &orders[1..] {
        assert_eq!(order, &orders[0], "every replica the same order");
    }
}

/// A channel that keeps 10: a client 30 behind is told it cannot be recovered; a
/// publish repeated with its idempotency key on two replicas happens once.
pub async fn too_far_behind_and_idempotent_publish(addrs: &[SocketAddr]) {
    let mut publisher = Client::connect(addrs[0]).await;
    let first = publisher
        .ok("publish", json!({"channel": "short:1", "data": 0}))
        .await;
    let epoch = first["epoch"].clone();
    let since = first["offset"].as_u64().expect("offset");
    publish_many(&mut publisher, "short:1", 30, "more").await;
    let mut late = Client::connect(addrs[1 % addrs.len()]).await;
    let reply = late
        .ok(
            "subscribe",
            json!({"channel": "short:1", "since": {"offset": since, "epoch": epoch}}),
        )
        .await;
    assert_eq!(reply["recovered"], false, "{reply}");
    assert_eq!(reply["publications"], json!([]));
    assert_eq!(reply["offset"], json!(since + 30));
    let page = late
        .ok("history", json!({"channel": "short:1", "limit": 100}))
        .await;
    let kept: Vec<u64> = page["publications"]
        .as_array()
        .expect("publications")
        .iter()
        .map(|p| p["offset"].as_u64().expect("offset"))
        .collect();
    assert!((10..12).contains(&kept.len()), "{kept:?}");
    assert_eq!(kept.last(), Some(&(since + 30)));
    let newest = late
        .ok(
            "history",
            json!({"channel": "short:1", "limit": 2, "reverse": true}),
        )
        .await;
    assert_eq!(newest["publications"][0]["offset"], json!(since + 30));

    let mut watcher = Client::connect(addrs[2 % addrs.len()]).await;
    watcher
        .ok("subscribe", json!({"channel": "hist:once"}))
        .await;
    let params =
        json!({"channel": "hist:once", "data": {"order": 17}, "idempotency_key": "order-17"});
    let mut other = Client::connect(addrs[1 % addrs.len()]).await;
    let one = publisher.ok("publish", params.clone()).await;
    let two = other.ok("publish", params.clone()).await;
    assert_eq!(one, two, "the repeat answers as the first");
    let message = next_message(&mut watcher).await;
    assert_eq!(message["data"], json!({"order": 17}));
    watcher.assert_nothing_pending().await;
    // On a channel without history too.
    watcher.ok("subscribe", json!({"channel": "nohist"})).await;
    let plain = json!({"channel": "nohist", "data": 1, "idempotency_key": "k"});
    assert_eq!(
        publisher.ok("publish", plain.clone()).await,
        json!({"channel": "nohist"})
    );
    assert_eq!(
        other.ok("publish", plain).await,
        json!({"channel": "nohist"})
    );
    next_message(&mut watcher).await;
    watcher.assert_nothing_pending().await;
}

// ---- the in-process runs ----

async fn local_cluster(
    count: usize,
    extra: &[(&str, &str)],
) -> (LocalBus, Vec<chorus_server::RunningServer>) {
    let bus = LocalBus::new();
    let mut servers = Vec::new();
    for i in 0..count {
        let node_id = format!("hist-{i}");
        let mut vars = history_vars();
        vars.extend([
            ("WS_PUBSUB_ENABLED", "true"),
            ("WS_PUBSUB_ADAPTER", "local"),
            ("WS_NODE_ID", node_id.as_str()),
        ]);
        vars.extend(extra);
        servers.push(
            chorus_server::start_with_bus(config(&vars), Some(bus.clone()))
                .await
                .expect("replica starts"),
        );
    }
    (bus, servers)
}

fn addrs(servers: &[chorus_server::RunningServer]) -> Vec<SocketAddr> {
    servers.iter().map(|s| s.local_addr).collect()
}

#[tokio::test]
async fn local_recovery() {
    let (_bus, servers) = local_cluster(3, &[]).await;
    a_reconnecting_client_recovers_exactly_what_it_missed(&addrs(&servers)).await;
}

#[tokio::test]
async fn local_order() {
    let (_bus, servers) = local_cluster(3, &[]).await;
    interleaved_publications_arrive_in_one_order(&addrs(&servers)).await;
}

#[tokio::test]
async fn local_too_far_behind_and_idempotency() {
    let (_bus, servers) = local_cluster(3, &[]).await;
    too_far_behind_and_idempotent_publish(&addrs(&servers)).await;
}

#[tokio::test]
async fn a_store_that_lost_everything_gives_a_new_epoch() {
    let (bus, servers) = local_cluster(2, &[]).await;
    let addrs = addrs(&servers);
    let mut reader = Client::connect(addrs[0]).await;
    let before = reader
        .ok("subscribe", json!({"channel": "hist:fragile"}))
        .await;
    let mut publisher = Client::connect(addrs[1]).await;
    publish_many(&mut publisher, "hist:fragile", 3, "old").await;
    for _ in 0..3 {
        next_message(&mut reader).await;
    }
    bus.history().lose_everything();
    let after = publisher
        .ok("publish", json!({"channel": "hist:fragile", "data": "new"}))
        .await;
    assert_ne!(after["epoch"], before["epoch"]);
    assert_eq!(after["offset"], 1);
    // The live reader is told, then follows the new epoch.
    let notice = reader.recv().await;
    assert_eq!(notice["method"], "sys.gap", "{notice}");
    assert_eq!(
        notice["params"],
        json!({"channel": "hist:fragile", "epoch": after["epoch"]})
    );
    let message = next_message(&mut reader).await;
    assert_eq!(
        (message["offset"].clone(), message["data"].clone()),
        (json!(1), json!("new"))
    );
    // A client recovering from the old epoch: recovered false, and the new epoch.
    let mut back = Client::connect(addrs[1]).await;
    let reply = back
        .ok(
            "subscribe",
            json!({"channel": "hist:fragile", "since": position(&before)}),
        )
        .await;
    assert_eq!(
        (reply["recovered"].clone(), reply["epoch"].clone()),
        (json!(false), after["epoch"].clone())
    );
}

/// A reader that stops reading on a `drop_oldest` channel: it stays connected, and
/// what it gets, with the `sys.gap` it is told, accounts for every offset.
#[tokio::test]
async fn a_stalled_reader_on_drop_oldest_is_told_the_exact_gap() {
    let (_bus, servers) = local_cluster(
        1,
        &[("WS_SEND_BUFFER", "64KiB"), ("WS_MAX_PUBLISH_SIZE", "8KiB")],
    )
    .await;
    let addr = servers[0].local_addr;
    let mut slow = Client::connect_with_small_buffer(addr).await;
    slow.ok("subscribe", json!({"channel": "drop:feed"})).await;
    let mut publisher = Client::connect(addr).await;
    let big = "x".repeat(4000);
    for round in 0..10 {
        for n in 0..20 {
            let request = json!({"jsonrpc": "2.0", "method": "publish",
                "params": {"channel": "drop:feed", "data": {"n": round * 20 + n, "pad": big}}});
            publisher.send_text(&request.to_string()).await;
        }
        publisher.assert_nothing_pending().await;
    }
    let last = publisher
        .ok(
            "publish",
            json!({"channel": "drop:feed", "data": {"n": "end"}}),
        )
        .await["offset"]
        .as_u64()
        .expect("offset");
    // Now read everything that is there: offsets and gaps must cover 1..=last.
    let mut covered = BTreeSet::new();
    let mut gaps = 0;
    while !covered.contains(&last) {
        let message = slow.recv().await;
        match message["method"].as_str() {
            Some("message") => {
                covered.insert(message["params"]["offset"].as_u64().expect("offset"));
            }
            Some("sys.gap") => {
                gaps += 1;
                let from = message["params"]["from_offset"].as_u64().expect("from");
                let to = message["params"]["to_offset"].as_u64().expect("to");
                assert!(from <= to, "{message}");
                covered.extend(from..=to);
            }
            _ => {}
        }
    }
    assert!(gaps > 0, "the reader fell behind: something was dropped");
    let first = *covered.first().expect("offsets");
    assert_eq!(
        covered,
        (first..=last).collect(),
        "every offset accounted for"
    );
    slow.assert_nothing_pending().await;
}

/// A stalled reader on a `latest` channel gets the newest message when it reads again.
#[tokio::test]
async fn a_stalled_reader_on_latest_gets_the_newest() {
    let (_bus, servers) = local_cluster(
        1,
        &[("WS_SEND_BUFFER", "64KiB"), ("WS_MAX_PUBLISH_SIZE", "8KiB")],
    )
    .await;
    let addr = servers[0].local_addr;
    let mut slow = Client::connect_with_small_buffer(addr).await;
    slow.ok("subscribe", json!({"channel": "last:price"})).await;
    let mut publisher = Client::connect(addr).await;
    let big = "x".repeat(4000);
    for n in 0..200 {
        let request = json!({"jsonrpc": "2.0", "method": "publish",
            "params": {"channel": "last:price", "data": {"n": n, "pad": big}}});
        publisher.send_text(&request.to_string()).await;
    }
    publisher.assert_nothing_pending().await;
    let mut gaps = 0;
    loop {
        let message = slow.recv().await;
        match message["method"].as_str() {
            Some("message") if message["params"]["data"]["n"] == 199 => break,
            Some("sys.gap") => gaps += 1,
            _ => {}
        }
    }
    assert!(gaps > 0, "older messages were replaced");
    slow.assert_nothing_pending().await;
}
