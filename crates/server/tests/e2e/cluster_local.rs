//! Cluster behaviour on the in-process backbone: several servers in one test process
//! sharing a `LocalBus`. The same rules are checked over Redis and NATS with real
//! processes in the cluster tests.

use chorus_pubsub::local::LocalBus;
use chorus_server::RunningServer;
use serde_json::{Value, json};

use crate::support::{Client, config, eventually, http_get, metric};

async fn replicas(bus: &LocalBus, count: usize) -> Vec<RunningServer> {
    let mut servers = Vec::new();
    for i in 0..count {
        let node_id = format!("replica-{i}");
        let config = config(&[
            ("WS_PUBSUB_ENABLED", "true"),
            ("WS_PUBSUB_ADAPTER", "local"),
            ("WS_NODE_ID", &node_id),
        ]);
        servers.push(
            chorus_server::start_with_bus(config, Some(bus.clone()))
                .await
                .expect("replica starts"),
        );
    }
    servers
}

#[tokio::test]
async fn broadcast_and_publish_cross_replicas_exactly_once() {
    let bus = LocalBus::new();
    let servers = replicas(&bus, 3).await;
    let mut clients = Vec::new();
    for server in &servers {
        clients.push(Client::connect(server.local_addr).await);
    }
    assert_eq!(clients[2].node_id, "replica-2");

    clients[0]
        .ok("broadcast", json!({"hello": "cluster"}))
        .await;
    for client in &mut clients[1..] {
        assert_eq!(client.recv().await["params"], json!({"hello": "cluster"}));
    }
    for client in &mut clients {
        client.assert_nothing_pending().await;
    }

    clients[1]
        .ok("subscribe", json!({"channel": "items:42"}))
        .await;
    clients[2]
        .ok("subscribe", json!({"channel": "items:42"}))
        .await;
    // Each reply came once its replica held the channel: publish right away.
    clients[0]
        .ok("publish", json!({"channel": "items:42", "data": "last"}))
        .await;
    for client in &mut clients[1..] {
        assert_eq!(client.recv().await["params"]["data"], "last");
        client.assert_nothing_pending().await;
    }
    clients[0].assert_nothing_pending().await;
}

#[tokio::test]
async fn a_replica_without_subscribers_receives_nothing_for_the_channel() {
    let bus = LocalBus::new();
    let servers = replicas(&bus, 2).await;
    let mut publisher = Client::connect(servers[0].local_addr).await;
    let _idle = Client::connect(servers[1].local_addr).await;
    for n in 0..20 {
        publisher
            .ok("publish", json!({"channel": "items:42", "data": n}))
            .await;
    }
    assert_eq!(
        metric(
            servers[1].local_addr,
            r#"ws_pubsub_received_total{adapter="local"}"#
        )
        .await,
        0.0
    );
    assert_eq!(
        metric(
            servers[0].local_addr,
            r#"ws_pubsub_published_total{adapter="local"}"#
        )
        .await,
        20.0
    );
}

#[tokio::test]
async fn an_outage_keeps_local_delivery_and_is_visible() {
    let bus = LocalBus::new();
    let servers = replicas(&bus, 2).await;
    let addr = servers[0].local_addr;
    let mut a = Client::connect(addr).await;
    let mut b = Client::connect(addr).await;
    let mut remote = Client::connect(servers[1].local_addr).await;
    b.ok("subscribe", json!({"channel": "c"})).await;

    bus.set_connected(false);
    let reply = a.call("broadcast", json!({"during": "outage"})).await;
    assert_eq!(reply["error"]["code"], -32053);
    assert_eq!(reply["error"]["data"], json!({"delivered": "local"}));
    assert_eq!(
        b.recv().await["params"],
        json!({"during": "outage"}),
        "local delivery goes on"
    );
    let reply = a.call("publish", json!({"channel": "c", "data": 1})).await;
    assert_eq!(reply["error"]["data"], json!({"delivered": "local"}));
    assert_eq!(b.recv().await["params"]["data"], 1);
    remote.assert_nothing_pending().await;

    let (_, health) = http_get(addr, "/health").await;
    let health: Value = serde_json::from_str(&health).expect("JSON");
    assert_eq!(health["status"], "degraded");
    assert_eq!(health["pubsub"]["connected"], false);
    assert_eq!(http_get(addr, "/ready").await.0, 503);
    assert_eq!(
        metric(addr, r#"ws_pubsub_connected{adapter="local"}"#).await,
        0.0
    );

    bus.set_connected(true);
    eventually("ready again", || async {
        http_get(addr, "/ready").await.0 == 200
    })
    .await;
    assert_eq!(
        metric(addr, r#"ws_pubsub_connected{adapter="local"}"#).await,
        1.0
    );
    assert_eq!(
        a.ok("broadcast", json!({"after": "outage"})).await,
        json!({"status": "broadcasted"})
    );
    assert_eq!(remote.recv().await["params"], json!({"after": "outage"}));
}

#[tokio::test]
async fn clusters_with_different_prefixes_stay_apart() {
    let bus = LocalBus::new();
    let mut servers = Vec::new();
    for prefix in ["alpha", "beta"] {
        let config = config(&[("WS_PUBSUB_ENABLED", "true"), ("WS_PUBSUB_CHANNEL", prefix)]);
        servers.push(
            chorus_server::start_with_bus(config, Some(bus.clone()))
                .await
                .expect("starts"),
        );
    }
    let mut alpha = Client::connect(servers[0].local_addr).await;
    let mut beta = Client::connect(servers[1].local_addr).await;
    beta.ok("subscribe", json!({"channel": "shared"})).await;
    alpha.ok("broadcast", json!({"x": 1})).await;
    alpha
        .ok("publish", json!({"channel": "shared", "data": 1}))
        .await;
    beta.assert_nothing_pending().await;
    assert_eq!(
        metric(
            servers[1].local_addr,
            r#"ws_pubsub_received_total{adapter="local"}"#
        )
        .await,
        0.0
    );
}
