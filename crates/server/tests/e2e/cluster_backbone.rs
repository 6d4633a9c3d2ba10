//! Three `chorus` processes on a real Redis or NATS server: every rule of section 7,
//! including surviving the backbone's death and return.

use std::time::Duration;

use serde_json::{Value, json};

use crate::backbone::{Kind, Server};
use crate::support::{Client, ServerProcess, eventually, http_get, metric, ws_url};

fn adapter(kind: Kind) -> &'static str {
    match kind {
        Kind::Redis => "redis",
        Kind::Nats => "nats",
    }
}

async fn replicas(kind: Kind, backbone: &Server, prefix: &str, count: usize) -> Vec<ServerProcess> {
    replicas_with(kind, backbone, prefix, count, &[]).await
}

async fn replicas_with(
    kind: Kind,
    backbone: &Server,
    prefix: &str,
    count: usize,
    extra: &[(&str, &str)],
) -> Vec<ServerProcess> {
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
        let vars: Vec<(&str, &str)> = vars.iter().chain(extra).copied().collect();
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
    // The reply comes once each replica holds the channel on the backbone.
    on_1.ok("subscribe", json!({"channel": "items:42"})).await;
    on_2.ok("subscribe", json!({"channel": "items:42"})).await;
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
    // A subscription made during the outage works locally at once, and says so.
    let reply = local_peer
        .call("subscribe", json!({"channel": "late"}))
        .await;
    assert_eq!(reply["error"]["code"], -32053, "{reply}");
    assert_eq!(reply["error"]["data"], json!({"subscribed": "local"}));
    let reply = a
        .call("publish", json!({"channel": "late", "data": "local"}))
        .await;
    assert_eq!(reply["error"]["data"], json!({"delivered": "local"}));
    assert_eq!(local_peer.recv().await["params"]["data"], "local");

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
    // The same sockets and subscriptions: the replicas subscribe again by themselves.
    // Subscribing once more is how a client learns that the new connection holds them.
    remote.ok("subscribe", json!({"channel": "survivor"})).await;
    local_peer.ok("subscribe", json!({"channel": "late"})).await;
    a.ok("publish", json!({"channel": "survivor", "data": "after"}))
        .await;
    assert_eq!(remote.recv().await["params"]["data"], "after");
    remote
        .ok("publish", json!({"channel": "late", "data": "remote"}))
        .await;
    assert_eq!(local_peer.recv().await["params"]["data"], "remote");
    a.ok("broadcast", json!({"after": "outage"})).await;
    assert_eq!(remote.recv().await["params"], json!({"after": "outage"}));
}

/// Section 9: `subscribe` answers once the replica holds the channel on the backbone,
/// so a publication made on another replica right after the reply is never lost.
async fn a_publication_right_after_subscribe_arrives(kind: Kind) {
    const ROUNDS: usize = 1000;
    let backbone = Server::start(kind);
    let servers = replicas(kind, &backbone, "race", 2).await;
    let mut subscriber = Client::connect_url(&ws_url(servers[0].addr)).await;
    let mut publisher = Client::connect_url(&ws_url(servers[1].addr)).await;
    let mut lost = Vec::new();
    for round in 0..ROUNDS {
        // A fresh channel each round, so each subscription is new on the backbone.
        let channel = format!("race:{round}");
        subscriber
            .ok("subscribe", json!({"channel": channel}))
            .await;
        publisher
            .ok("publish", json!({"channel": channel, "data": round}))
            .await;
        // A bound on a failure, not a synchronisation: a delivered message takes
        // milliseconds.
        match tokio::time::timeout(Duration::from_secs(2), subscriber.recv()).await {
            Ok(message) => assert_eq!(
                message["params"],
                json!({"channel": channel, "data": round})
            ),
            Err(_) => lost.push(round),
        }
    }
    assert!(lost.is_empty(), "lost {} of {ROUNDS}: {lost:?}", lost.len());
}

/// Section 6: what a replica accepted reaches the backbone before the process exits,
/// even with no grace period at all.
async fn accepted_publications_leave_before_exit(kind: Kind) {
    const COUNT: usize = 1000;
    let backbone = Server::start(kind);
    let mut servers = replicas_with(
        kind,
        &backbone,
        "last-words",
        2,
        &[("WS_SHUTDOWN_GRACE", "0s")],
    )
    .await;
    let mut subscriber = Client::connect_url(&ws_url(servers[1].addr)).await;
    subscriber.ok("subscribe", json!({"channel": "last"})).await;
    let mut publisher = Client::connect_url(&ws_url(servers[0].addr)).await;
    for seq in 0..COUNT {
        let request = json!({"jsonrpc": "2.0", "method": "publish", "params": {"channel": "last", "data": seq}, "id": seq});
        publisher.send_text(&request.to_string()).await;
    }
    let mut accepted = 0;
    while accepted < COUNT {
        let reply = publisher.recv().await;
        assert!(reply.get("result").is_some(), "{reply}");
        accepted += 1;
    }
    servers[0].signal("TERM");
    for seq in 0..COUNT {
        assert_eq!(subscriber.recv().await["params"]["data"], json!(seq));
    }
    let status = tokio::time::timeout(crate::support::PATIENCE, servers[0].child.wait())
        .await
        .expect("exits in time")
        .expect("status");
    assert_eq!(status.code(), Some(0));
}

/// Two replicas configured with one node id notice each other.
async fn a_twin_node_id_degrades_health(kind: Kind) {
    let backbone = Server::start(kind);
    let url_var = match kind {
        Kind::Redis => "WS_REDIS_URL",
        Kind::Nats => "WS_NATS_URL",
    };
    let url = backbone.url();
    let vars = [
        ("WS_PUBSUB_ENABLED", "true"),
        ("WS_PUBSUB_ADAPTER", adapter(kind)),
        (url_var, url.as_str()),
        ("WS_NODE_ID", "twin"),
    ];
    let first = ServerProcess::spawn(&vars).await;
    let second = ServerProcess::spawn(&vars).await;
    for server in [&first, &second] {
        let addr = server.addr;
        eventually("the twin to be reported in /health", || async move {
            let health: Value =
                serde_json::from_str(&http_get(addr, "/health").await.1).expect("JSON");
            health["status"] == "degraded" && health["node_id_conflict"] == true
        })
        .await;
        assert!(metric(addr, "ws_node_id_conflicts_total").await >= 1.0);
    }
}

async fn clusters_with_different_prefixes_stay_apart(kind: Kind) {
    let backbone = Server::start(kind);
    let alpha = replicas(kind, &backbone, "alpha", 1).await;
    let beta = replicas(kind, &backbone, "beta", 2).await;
    let mut in_alpha = Client::connect_url(&ws_url(alpha[0].addr)).await;
    let mut beta_publisher = Client::connect_url(&ws_url(beta[0].addr)).await;
    let mut in_beta = Client::connect_url(&ws_url(beta[1].addr)).await;
    in_beta.ok("subscribe", json!({"channel": "shared"})).await;
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
async fn redis_subscribe_then_publish_elsewhere_loses_nothing() {
    a_publication_right_after_subscribe_arrives(Kind::Redis).await;
}

#[tokio::test]
async fn nats_subscribe_then_publish_elsewhere_loses_nothing() {
    a_publication_right_after_subscribe_arrives(Kind::Nats).await;
}

#[tokio::test]
async fn redis_publications_leave_before_exit() {
    accepted_publications_leave_before_exit(Kind::Redis).await;
}

#[tokio::test]
async fn nats_publications_leave_before_exit() {
    accepted_publications_leave_before_exit(Kind::Nats).await;
}

#[tokio::test]
async fn redis_twin_node_ids_are_detected() {
    a_twin_node_id_degrades_health(Kind::Redis).await;
}

#[tokio::test]
async fn nats_twin_node_ids_are_detected() {
    a_twin_node_id_degrades_health(Kind::Nats).await;
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
