//! Section 10 on three `chorus` processes over a real Redis or NATS server: the
//! scenarios of `users.rs`, plus what only separate processes can show (a replica
//! killed with SIGKILL, its presence gone within the TTL).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::net::TcpListener;

use crate::backbone::{Kind, Server};
use crate::support::{ServerProcess, eventually, eventually_within, http_get};
use crate::users::{
    API_KEY, Received, api, assert_signed, connect_as, kick_and_replace_work_across_replicas,
    presence_and_join_leave_across_replicas, send_reaches_every_device_once, summary,
    the_api_answers_like_json_rpc, users_vars, webhook_receiver,
};

/// Presence TTL of the killed-replica scenario: short, so the test is too.
const TTL: Duration = Duration::from_secs(3);
const WEBHOOK_SECRET: &str = "cluster-webhook-secret-0123";

async fn cluster(
    kind: Kind,
    backbone: &Server,
    prefix: &str,
    extra: &[(&str, &str)],
) -> Vec<ServerProcess> {
    let (adapter, url_var) = match kind {
        Kind::Redis => ("redis", "WS_REDIS_URL"),
        Kind::Nats => ("nats", "WS_NATS_URL"),
    };
    let url = backbone.url();
    let mut processes = Vec::new();
    for i in 0..3 {
        let node_id = format!("{prefix}-{i}");
        let mut vars = users_vars();
        vars.extend([
            ("WS_PUBSUB_ENABLED", "true"),
            ("WS_PUBSUB_ADAPTER", adapter),
            (url_var, url.as_str()),
            ("WS_PUBSUB_CHANNEL", prefix),
            ("WS_NODE_ID", node_id.as_str()),
        ]);
        vars.extend(extra);
        processes.push(ServerProcess::spawn(&vars).await);
    }
    for process in &processes {
        let addr = process.addr;
        eventually("the replica to join the backbone", || async move {
            http_get(addr, "/ready").await.0 == 200
        })
        .await;
    }
    // Every replica has beaten once: it is listed.
    let addr = processes[0].addr;
    eventually("every replica in presence", || async move {
        api(addr, "info", json!({})).await["nodes"]
            .as_array()
            .map(Vec::len)
            == Some(3)
    })
    .await;
    processes
}

fn addrs(processes: &[ServerProcess]) -> Vec<SocketAddr> {
    processes.iter().map(|p| p.addr).collect()
}

async fn scenarios(kind: Kind) {
    let backbone = Server::start(kind);
    let processes = cluster(kind, &backbone, "users", &[]).await;
    let addrs = addrs(&processes);
    send_reaches_every_device_once(&addrs).await;
    kick_and_replace_work_across_replicas(&addrs).await;
    presence_and_join_leave_across_replicas(&addrs).await;
    the_api_answers_like_json_rpc(addrs[1]).await;
}

/// A replica dies without a word: within the TTL its members leave presence, its
/// channel members are told gone, its users' devices are reported offline (once,
/// by a survivor), and `info` stops listing it.
async fn a_killed_replica_is_gone_within_the_ttl(kind: Kind) {
    let backbone = Server::start(kind);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let hook = format!("http://{}/hook", listener.local_addr().expect("addr"));
    let received = Received::default();
    let _receiver = webhook_receiver(listener, received.clone());
    let ttl = format!("{}s", TTL.as_secs());
    let processes = cluster(
        kind,
        &backbone,
        "killed",
        &[
            ("WS_PRESENCE_TTL", &ttl),
            ("WS_WEBHOOK_URL", &hook),
            ("WS_WEBHOOK_SECRET", WEBHOOK_SECRET),
        ],
    )
    .await;
    let addrs = addrs(&processes);
    let channel = "room:doomed";
    let mut watcher = connect_as(addrs[0], "watcher", Some("w")).await;
    watcher.ok("subscribe", json!({"channel": channel})).await;
    let mut doomed = Vec::new();
    for i in 0..5 {
        let mut client = connect_as(addrs[2], &format!("victim{i}"), Some(&format!("v{i}"))).await;
        client.ok("subscribe", json!({"channel": channel})).await;
        doomed.push(client);
    }
    // One victim also has a device on a surviving replica: never reported offline.
    let mut survivor = connect_as(addrs[1], "victim0", Some("v0-laptop")).await;
    survivor.ok("subscribe", json!({"channel": channel})).await;
    let stats = api(addrs[1], "presence_stats", json!({"channel": channel})).await;
    assert_eq!(stats, json!({"clients": 7, "users": 6}));

    processes[2].signal("KILL");
    let killed_at = Instant::now();
    let addr = addrs[0];
    eventually_within(
        TTL + Duration::from_secs(5),
        "the killed replica's members to go",
        || async move {
            api(addr, "presence_stats", json!({"channel": "room:doomed"})).await
                == json!({"clients": 2, "users": 2})
        },
    )
    .await;
    let gone_after = killed_at.elapsed();
    assert!(
        gone_after <= TTL + Duration::from_millis(500),
        "gone after {gone_after:?}, TTL {TTL:?}"
    );
    let mut left = Vec::new();
    while left.len() < 5 {
        let message = watcher.recv().await;
        if message["method"] == "sys.leave" {
            left.push(
                message["params"]["client_id"]
                    .as_str()
                    .expect("id")
                    .to_owned(),
            );
        }
    }
    left.sort();
    let mut expected: Vec<String> = doomed.iter().map(|c| c.client_id.clone()).collect();
    expected.sort();
    assert_eq!(left, expected);
    let nodes = api(addrs[1], "info", json!({})).await;
    let listed: Vec<&str> = nodes["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .filter_map(|n| n["node_id"].as_str())
        .collect();
    assert_eq!(listed, ["killed-0", "killed-1"]);
    assert_eq!(
        api(addrs[1], "info", json!({"user": "victim1"})).await["online"],
        false
    );
    assert_eq!(
        api(addrs[1], "info", json!({"user": "victim0"})).await["devices"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );

    eventually("node_lost events", || {
        let received = received.clone();
        async move {
            received
                .events()
                .iter()
                .filter(|e| e["reason"] == "node_lost")
                .count()
                >= 9
        }
    })
    .await;
    let lost: Vec<_> = summary(&received.events())
        .into_iter()
        .filter(|(_, _, _, reason)| reason == "node_lost")
        .collect();
    let device_offline = lost.iter().filter(|(e, ..)| e == "device_offline").count();
    let user_offline: Vec<&str> = lost
        .iter()
        .filter(|(e, ..)| e == "user_offline")
        .map(|(_, user, ..)| user.as_str())
        .collect();
    assert_eq!(
        device_offline, 5,
        "each lost device reported once: {lost:?}"
    );
    assert_eq!(user_offline.len(), 4, "victim0 is still online: {lost:?}");
    assert!(!user_offline.contains(&"victim0"));
    assert_signed(&received, WEBHOOK_SECRET);
    drop(survivor);
}

/// Lifecycle events from three replicas reach one webhook receiver, each device's in
/// order, signed.
async fn webhook_events_from_every_replica(kind: Kind) {
    let backbone = Server::start(kind);
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let hook = format!("http://{}/hook", listener.local_addr().expect("addr"));
    let received = Received::default();
    let _receiver = webhook_receiver(listener, received.clone());
    let processes = cluster(
        kind,
        &backbone,
        "hooks",
        &[
            ("WS_WEBHOOK_URL", &hook),
            ("WS_WEBHOOK_SECRET", WEBHOOK_SECRET),
        ],
    )
    .await;
    let addrs = addrs(&processes);
    for round in 0..3 {
        let mut devices = Vec::new();
        for (i, addr) in addrs.iter().enumerate() {
            devices.push(connect_as(*addr, "ivy", Some(&format!("ivy-{i}"))).await);
        }
        drop(devices);
        let want = 8 * (round + 1);
        eventually("a round of events", || {
            let received = received.clone();
            async move { received.events().len() >= want }
        })
        .await;
    }
    let events = summary(&received.events());
    for i in 0..3 {
        let device = format!("ivy-{i}");
        let of: Vec<&str> = events
            .iter()
            .filter(|(e, _, d, _)| d == &device && e.starts_with("device"))
            .map(|(e, ..)| e.as_str())
            .collect();
        assert_eq!(
            of,
            ["device_online", "device_offline"].repeat(3),
            "{device}"
        );
    }
    let user: Vec<&str> = events
        .iter()
        .filter(|(e, ..)| e.starts_with("user"))
        .map(|(e, ..)| e.as_str())
        .collect();
    assert_eq!(user, ["user_online", "user_offline"].repeat(3));
    assert_signed(&received, WEBHOOK_SECRET);
    let _ = API_KEY;
}

#[tokio::test]
async fn redis_users_devices_presence_and_api() {
    scenarios(Kind::Redis).await;
}

#[tokio::test]
async fn nats_users_devices_presence_and_api() {
    scenarios(Kind::Nats).await;
}

#[tokio::test]
async fn redis_a_killed_replica_is_gone_within_the_ttl() {
    a_killed_replica_is_gone_within_the_ttl(Kind::Redis).await;
}

#[tokio::test]
async fn nats_a_killed_replica_is_gone_within_the_ttl() {
    a_killed_replica_is_gone_within_the_ttl(Kind::Nats).await;
}

#[tokio::test]
async fn redis_webhook_events_from_every_replica() {
    webhook_events_from_every_replica(Kind::Redis).await;
}

#[tokio::test]
async fn nats_webhook_events_from_every_replica() {
    webhook_events_from_every_replica(Kind::Nats).await;
}
