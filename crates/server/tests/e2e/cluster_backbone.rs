//! Three `chorus` processes on a real Redis or NATS server: every rule of section 7,
//! including surviving the backbone's death and return.

use std::time::Duration;

use serde_json::{Value, json};

use crate::backbone::{Kind, Server};
use crate::support::{Client, PATIENCE, ServerProcess, eventually, http_get, metric, ws_url};

fn adapter(kind: Kind) -> &'static str {
    match kind {
        Kind::Redis => "redis",
        Kind::Nats => "nats",
    }
}

async fn replicas(kind: Kind, backbone: &Server, prefix: &str, count: usize) -> Vec<ServerProcess> {
    let url_var = match kind {
        Kind::Redis => "WS_REDIS_URL",
        Kind::Nats => "WS_NATS_URL",
    };
    let url = backbone.url();
    let mut processes = Vec::new();
    for i in 0..count {
        let node_id = format!("{prefix}-{i}");
        let vars = [
            ("WS_PUBSUB_ENABLED", "true"),
            ("WS_PUBSUB_ADAPTER", adapter(kind)),
            (url_var, url.as_str()),
            ("WS_PUBSUB_CHANNEL", prefix),
            ("WS_NODE_ID", node_id.as_str()),
            // These tests are about delivery: publish as fast as they like.
            ("WS_PUBLISH_RATE", "0"),
            ("WS_PUBLISH_RATE_TOTAL", "0"),
        ];
        processes.push(ServerProcess::spawn(&vars).await);
    }
    for process in &processes {
        let addr = process.addr;
        eventually("the replica to join the backbone", || async move {
            http_get(addr, "/ready").await.0 == 200
        })
        .await;
    }
    processes
}

fn received(kind: Kind) -> String {
    format!(r#"ws_pubsub_received_total{{adapter="{}"}}"#, adapter(kind))
}

/// Publishes probes on `channel` until every subscriber has received one, then has
/// each subscriber read up to the final probe: the subscriptions have reached the
/// backbone, and nothing of the probes is left unread.
async fn settle(publisher: &mut Client, subscribers: &mut [&mut Client], channel: &str) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut probe = 0;
    for subscriber in subscribers.iter_mut() {
        loop {
            probe += 1;
            publisher
                .ok(
                    "publish",
                    json!({"channel": channel, "data": {"probe": probe}}),
                )
                .await;
            // Subscription changes travel asynchronously; there is no event to await.
            if let Ok(message) =
                tokio::time::timeout(Duration::from_millis(200), subscriber.recv()).await
            {
                assert!(message["params"]["data"]["probe"].is_u64(), "{message}");
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "subscription never reached the backbone"
            );
        }
    }
    let last = json!({"probe": "last"});
    publisher
        .ok("publish", json!({"channel": channel, "data": last}))
        .await;
    for subscriber in subscribers.iter_mut() {
        while subscriber.recv().await["params"]["data"] != last {}
    }
}

async fn broadcast_and_publish_reach_every_replica_once(kind: Kind) {
    let backbone = Server::start(kind);
    let servers = replicas(kind, &backbone, "exactly-once", 3).await;
    let mut clients = Vec::new();
    for server in &servers {
        for _ in 0..2 {
            clients.push(Client::connect_url(&ws_url(server.addr)).await);
        }
    }
    // Broadcast: every client on every replica, exactly once.
    clients[0]
        .ok("broadcast", json!({"from": "replica-0"}))
        .await;
    for client in &mut clients[1..] {
        assert_eq!(client.recv().await["params"], json!({"from": "replica-0"}));
    }
    for client in &mut clients {
        client.assert_nothing_pending().await;
    }

    // Channel: subscribers on replicas 1 and 2 (one each); replica 0 has none.
    let (left, right) = clients.split_at_mut(4);
    let (publisher, bystanders) = left.split_at_mut(1);
    let publisher = &mut publisher[0];
    let on_1 = &mut bystanders[1];
    let on_2 = &mut right[0];
    on_1.ok("subscribe", json!({"channel": "items:42"})).await;
    on_2.ok("subscribe", json!({"channel": "items:42"})).await;
    settle(publisher, &mut [on_1, on_2], "items:42").await;
    publisher
        .ok(
            "publish",
            json!({"channel": "items:42", "data": {"price": 10}}),
        )
        .await;
    for subscriber in [&mut bystanders[1], &mut right[0]] {
        assert_eq!(
            subscriber.recv().await["params"],
            json!({"channel": "items:42", "data": {"price": 10}})
        );
        subscriber.assert_nothing_pending().await;
    }
    bystanders[0].assert_nothing_pending().await;
    bystanders[2].assert_nothing_pending().await;
    right[1].assert_nothing_pending().await;
    publisher.assert_nothing_pending().await;

    // Replica 0 has no subscriber to items:42, so the backbone sends it nothing; a
    // publication from replica 1 proves it.
    let before = metric(servers[0].addr, &received(kind)).await;
    bystanders[1]
        .ok("publish", json!({"channel": "items:42", "data": "from 1"}))
        .await;
    assert_eq!(right[0].recv().await["params"]["data"], "from 1");
    assert_eq!(metric(servers[0].addr, &received(kind)).await, before);
}

async fn a_thousand_publications_arrive_in_order(kind: Kind) {
    let backbone = Server::start(kind);
    let servers = replicas(kind, &backbone, "ordering", 2).await;
    let mut publisher = Client::connect_url(&ws_url(servers[0].addr)).await;
    let mut subscriber = Client::connect_url(&ws_url(servers[1].addr)).await;
    subscriber
        .ok("subscribe", json!({"channel": "ordered"}))
        .await;
    settle(&mut publisher, &mut [&mut subscriber], "ordered").await;
    for seq in 0..1000 {
        let request = json!({"jsonrpc": "2.0", "method": "publish", "params": {"channel": "ordered", "data": seq}, "id": seq});
        publisher.send_text(&request.to_string()).await;
    }
    for seq in 0..1000 {
        assert_eq!(subscriber.recv().await["params"]["data"], json!(seq));
    }
}

async fn an_outage_is_survived_without_reconnecting_clients(kind: Kind) {
    let mut backbone = Server::start(kind);
    let servers = replicas(kind, &backbone, "outage", 2).await;
    let (addr0, addr1) = (servers[0].addr, servers[1].addr);
    let mut a = Client::connect_url(&ws_url(addr0)).await;
    let mut local_peer = Client::connect_url(&ws_url(addr0)).await;
    let mut remote = Client::connect_url(&ws_url(addr1)).await;
    remote.ok("subscribe", json!({"channel": "survivor"})).await;
    settle(&mut a, &mut [&mut remote], "survivor").await;

    backbone.stop();
    let connected = format!(r#"ws_pubsub_connected{{adapter="{}"}}"#, adapter(kind));
    eventually("/ready to report the outage", || async {
        http_get(addr0, "/ready").await.0 == 503
    })
    .await;
    let health: Value = serde_json::from_str(&http_get(addr0, "/health").await.1).expect("JSON");
    assert_eq!(health["status"], "degraded");
    assert_eq!(metric(addr0, &connected).await, 0.0);

    let reply = a.call("broadcast", json!({"during": "outage"})).await;
    assert_eq!(reply["error"]["code"], -32053, "{reply}");
    assert_eq!(reply["error"]["data"], json!({"delivered": "local"}));
    assert_eq!(
        local_peer.recv().await["params"],
        json!({"during": "outage"}),
        "local delivery goes on"
    );

    backbone.restart();
    for addr in [addr0, addr1] {
        eventually("the replica to reconnect", || async move {
            http_get(addr, "/ready").await.0 == 200
        })
        .await;
    }
    assert_eq!(metric(addr0, &connected).await, 1.0);
    assert!(
        http_get(addr0, "/health")
            .await
            .1
            .contains(r#""status":"ok""#)
    );
    // The same sockets, the subscription made before the outage: delivery resumes.
    settle(&mut a, &mut [&mut remote], "survivor").await;
    a.ok("publish", json!({"channel": "survivor", "data": "after"}))
        .await;
    assert_eq!(remote.recv().await["params"]["data"], "after");
    a.ok("broadcast", json!({"after": "outage"})).await;
    assert_eq!(remote.recv().await["params"], json!({"after": "outage"}));
}

async fn clusters_with_different_prefixes_stay_apart(kind: Kind) {
    let backbone = Server::start(kind);
    let alpha = replicas(kind, &backbone, "alpha", 1).await;
    let beta = replicas(kind, &backbone, "beta", 2).await;
    let mut in_alpha = Client::connect_url(&ws_url(alpha[0].addr)).await;
    let mut beta_publisher = Client::connect_url(&ws_url(beta[0].addr)).await;
    let mut in_beta = Client::connect_url(&ws_url(beta[1].addr)).await;
    in_beta.ok("subscribe", json!({"channel": "shared"})).await;
    settle(&mut beta_publisher, &mut [&mut in_beta], "shared").await;
    in_alpha.ok("subscribe", json!({"channel": "shared"})).await;

    beta_publisher
        .ok("broadcast", json!({"cluster": "beta"}))
        .await;
    beta_publisher
        .ok("publish", json!({"channel": "shared", "data": "beta"}))
        .await;
    // Broadcasts and channel publications travel on different topics: no order
    // between the two is promised.
    let mut got = vec![
        in_beta.recv().await["params"].clone(),
        in_beta.recv().await["params"].clone(),
    ];
    got.sort_by_key(|params| params.to_string());
    assert_eq!(
        got,
        vec![
            json!({"channel": "shared", "data": "beta"}),
            json!({"cluster": "beta"})
        ]
    );
    in_alpha.assert_nothing_pending().await;
    assert_eq!(metric(alpha[0].addr, &received(kind)).await, 0.0);
}

#[tokio::test]
async fn redis_broadcast_and_publish_reach_every_replica_once() {
    broadcast_and_publish_reach_every_replica_once(Kind::Redis).await;
}

#[tokio::test]
async fn nats_broadcast_and_publish_reach_every_replica_once() {
    broadcast_and_publish_reach_every_replica_once(Kind::Nats).await;
}

#[tokio::test]
async fn redis_keeps_order() {
    a_thousand_publications_arrive_in_order(Kind::Redis).await;
}

#[tokio::test]
async fn nats_keeps_order() {
    a_thousand_publications_arrive_in_order(Kind::Nats).await;
}

#[tokio::test]
async fn redis_outage_is_survived() {
    an_outage_is_survived_without_reconnecting_clients(Kind::Redis).await;
}

#[tokio::test]
async fn nats_outage_is_survived() {
    an_outage_is_survived_without_reconnecting_clients(Kind::Nats).await;
}

#[tokio::test]
async fn redis_prefixes_keep_clusters_apart() {
    clusters_with_different_prefixes_stay_apart(Kind::Redis).await;
}

#[tokio::test]
async fn nats_prefixes_keep_clusters_apart() {
    clusters_with_different_prefixes_stay_apart(Kind::Nats).await;
}

/// A publication the backbone refuses after the adapter accepted it (NATS'
/// default `max_payload` is 1 MB) is not lost silently: `/metrics` counts it.
#[tokio::test]
async fn nats_publication_over_max_payload_is_counted_as_dropped() {
    let backbone = Server::start(Kind::Nats);
    let url = backbone.url();
    let vars = [
        ("WS_PUBSUB_ENABLED", "true"),
        ("WS_PUBSUB_ADAPTER", "nats"),
        ("WS_NATS_URL", url.as_str()),
        ("WS_MAX_MESSAGE_SIZE", "2MiB"),
        ("WS_MAX_PUBLISH_SIZE", "2MiB"),
        ("WS_SEND_BUFFER", "8MiB"),
        ("WS_PUBLISH_BYTES_RATE", "0"),
        ("WS_PUBLISH_BYTES_TOTAL", "0"),
    ];
    let server = ServerProcess::spawn(&vars).await;
    let addr = server.addr;
    eventually("the replica to join the backbone", || async move {
        http_get(addr, "/ready").await.0 == 200
    })
    .await;
    let dropped = r#"ws_pubsub_dropped_total{adapter="nats",direction="published"}"#;
    assert_eq!(metric(addr, dropped).await, 0.0);

    let mut client = Client::connect_url(&ws_url(addr)).await;
    let big = "x".repeat(1_100_000);
    client
        .ok("publish", json!({"channel": "big", "data": big}))
        .await;
    eventually("the refused publication to be counted", || async move {
        metric(addr, dropped).await == 1.0
    })
    .await;
}
