//! Section 9: each limit's answer as a client sees it, with the codes and `data` the
//! contract names, and the timeouts that close what a limit cannot answer.

use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::support::{
    Client, PATIENCE, UNLIMITED_PUBLISHING, eventually, metric, raw_upgrade, server,
};

fn ping(id: u64) -> Value {
    json!({"jsonrpc": "2.0", "method": "ping", "id": id})
}

#[tokio::test]
async fn the_request_budget_refuses_each_call_over_it() {
    let server = server(&[
        ("WS_RATE_LIMIT_ENABLED", "true"),
        ("WS_RATE_LIMIT_RATE", "5"),
        ("WS_RATE_LIMIT_INTERVAL", "10s"),
        ("WS_RATE_LIMIT_BURST", "5"),
    ])
    .await;
    let mut client = Client::connect(server.local_addr).await;
    let batch: Vec<Value> = (0..8).map(ping).collect();
    client.send_text(&Value::from(batch).to_string()).await;
    let Value::Array(replies) = client.recv().await else {
        panic!("a batch reply is an array");
    };
    let refused: Vec<&Value> = replies
        .iter()
        .filter(|reply| reply.get("error").is_some())
        .collect();
    assert_eq!(refused.len(), 3, "{replies:?}");
    for reply in refused {
        assert_eq!(reply["error"]["code"], -32029);
        let wait = reply["error"]["data"]["retry_after_ms"]
            .as_u64()
            .expect("retry_after_ms");
        assert!(wait > 0 && wait <= 2000, "one request per 2 s: {wait}");
    }
    assert_eq!(
        metric(
            server.local_addr,
            r#"ws_rate_limited_total{scope="connection"}"#
        )
        .await,
        3.0
    );
}

#[tokio::test]
async fn a_client_flooding_its_budget_is_closed_with_1008() {
    let server = server(&[
        ("WS_RATE_LIMIT_ENABLED", "true"),
        ("WS_RATE_LIMIT_RATE", "5"),
        ("WS_RATE_LIMIT_BURST", "5"),
    ])
    .await;
    let mut client = Client::connect(server.local_addr).await;
    let notification = json!({"jsonrpc": "2.0", "method": "ping"}).to_string();
    // Well over ten times 5/s, until the server gives up on the client.
    let flood = async {
        loop {
            for _ in 0..20 {
                if client
                    .socket
                    .send(tokio_tungstenite::tungstenite::Message::text(
                        notification.clone(),
                    ))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    use futures_util::SinkExt;
    let _ = tokio::time::timeout(Duration::from_secs(6), flood).await;
    assert_eq!(client.close_code().await, Some(CloseCode::Policy));
    assert_eq!(
        metric(server.local_addr, "ws_flood_closes_total").await,
        1.0
    );
}

#[tokio::test]
async fn publish_budgets_are_per_connection_then_per_replica() {
    // Defaults: 50/s with a burst of 100 per connection.
    let server = server(&[]).await;
    let mut client = Client::connect(server.local_addr).await;
    let batch: Vec<Value> = (0..100)
        .map(|id| json!({"jsonrpc": "2.0", "method": "publish", "params": {"channel": "c", "data": id}, "id": id}))
        .collect();
    client.send_text(&Value::from(batch).to_string()).await;
    let replies = client.recv().await;
    assert!(
        replies
            .as_array()
            .expect("array")
            .iter()
            .all(|reply| reply.get("result").is_some()),
        "the burst passes"
    );
    let refused = client
        .call("publish", json!({"channel": "c", "data": "one too many"}))
        .await;
    assert_eq!(refused["error"]["code"], -32029, "{refused}");
    assert!(
        refused["error"]["data"]["retry_after_ms"]
            .as_u64()
            .is_some()
    );
    assert_eq!(
        metric(
            server.local_addr,
            r#"ws_rate_limited_total{scope="publish"}"#
        )
        .await,
        1.0
    );

    // The replica's budget is shared: 10/s holding 5, whoever publishes.
    let server =
        crate::support::server(&[("WS_PUBLISH_RATE", "0"), ("WS_PUBLISH_RATE_TOTAL", "10")]).await;
    let mut a = Client::connect(server.local_addr).await;
    let mut b = Client::connect(server.local_addr).await;
    for round in 0..5u32 {
        let client = if round.is_multiple_of(2) {
            &mut a
        } else {
            &mut b
        };
        client.ok("broadcast", json!({"x": 1})).await;
    }
    let refused = b.call("broadcast", json!({"x": 1})).await;
    assert_eq!(refused["error"]["code"], -32029, "{refused}");
    assert_eq!(
        metric(
            server.local_addr,
            r#"ws_rate_limited_total{scope="replica"}"#
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn size_batch_and_subscription_limits_answer_as_the_contract_says() {
    let server = server(&[("WS_MAX_SUBSCRIPTIONS", "3")]).await;
    let mut client = Client::connect(server.local_addr).await;

    let big = "x".repeat(70_000);
    let refused = client
        .call("publish", json!({"channel": "c", "data": big}))
        .await;
    assert_eq!(refused["error"]["code"], -32013);
    assert_eq!(refused["error"]["data"], json!({"limit": 65536}));
    let refused = client.call("broadcast", json!({"x": big})).await;
    assert_eq!(refused["error"]["code"], -32013);

    let batch: Vec<Value> = (0..101).map(ping).collect();
    client.send_text(&Value::from(batch).to_string()).await;
    let reply = client.recv().await;
    assert_eq!(reply["error"]["code"], -32600, "one error object: {reply}");
    assert_eq!(reply["error"]["data"], json!({"limit": 100}));

    for channel in ["a", "b", "c"] {
        client.ok("subscribe", json!({"channel": channel})).await;
    }
    let refused = client.call("subscribe", json!({"channel": "d"})).await;
    assert_eq!(refused["error"]["code"], -32003);
    assert_eq!(
        refused["error"]["data"],
        json!({"channel": "d", "reason": "subscription limit", "limit": 3})
    );
    client.ok("subscribe", json!({"channel": "a"})).await;
}

#[tokio::test]
async fn a_reply_never_outgrows_the_send_buffer() {
    let server = server(&[("WS_SEND_BUFFER", "512KiB")]).await;
    let mut client = Client::connect(server.local_addr).await;
    let params = json!(["y".repeat(150_000)]);
    let batch: Vec<Value> = (0..5)
        .map(|id| json!({"jsonrpc": "2.0", "method": "self.reply", "params": params, "id": id}))
        .collect();
    client.send_text(&Value::from(batch).to_string()).await;
    let text = client.recv_text().await;
    assert!(
        text.len() <= 512 << 10,
        "bounded by WS_SEND_BUFFER: {}",
        text.len()
    );
    let replies: Vec<Value> = serde_json::from_str(&text).expect("JSON");
    let cut: Vec<&Value> = replies
        .iter()
        .filter(|reply| reply["error"]["code"] == -32013)
        .collect();
    assert_eq!(cut.len(), 2, "three fit, the rest is cut");
    assert_eq!(cut[0]["error"]["data"], json!({"limit": 524_288}));
    assert_eq!(metric(server.local_addr, "ws_replies_cut_total").await, 2.0);
    client.assert_nothing_pending().await;
}

#[tokio::test]
async fn connections_per_address_and_upgrade_rate_answer_429() {
    let server = server(&[("WS_MAX_CONNECTIONS_PER_IP", "2")]).await;
    let addr = server.local_addr;
    let _a = Client::connect(addr).await;
    let _b = Client::connect(addr).await;
    let refused = raw_upgrade(addr, "/ws", &[]).await;
    assert_eq!(refused.status, 429);
    let body: Value = serde_json::from_str(&refused.body).expect("a JSON body");
    assert!(body["error"].as_str().is_some(), "{body}");
    assert_eq!(
        metric(addr, r#"ws_rate_limited_total{scope="ip"}"#).await,
        1.0
    );
    drop(_a);
    eventually("the slot to be released", || async move {
        raw_upgrade(addr, "/ws", &[]).await.status == 101
    })
    .await;

    let server = crate::support::server(&[("WS_CONN_RATE", "2")]).await;
    let addr = server.local_addr;
    assert_eq!(raw_upgrade(addr, "/ws", &[]).await.status, 101);
    assert_eq!(raw_upgrade(addr, "/ws", &[]).await.status, 101);
    let refused = raw_upgrade(addr, "/ws", &[]).await;
    assert_eq!(refused.status, 429);
    assert!(
        refused.head.to_ascii_lowercase().contains("retry-after: 1"),
        "{}",
        refused.head
    );
}

#[tokio::test]
async fn forwarded_addresses_count_only_behind_a_trusted_proxy() {
    let trusted = server(&[
        ("WS_MAX_CONNECTIONS_PER_IP", "1"),
        ("WS_TRUSTED_PROXIES", "127.0.0.0/8"),
    ])
    .await;
    let addr = trusted.local_addr;
    let first = [("X-Forwarded-For", "203.0.113.1")];
    let second = [("X-Forwarded-For", "198.51.100.7, 127.0.0.1")];
    let held = raw_upgrade(addr, "/ws", &first).await;
    assert_eq!(held.status, 101);
    let other = raw_upgrade(addr, "/ws", &second).await;
    assert_eq!(other.status, 101, "another client");
    assert_eq!(
        raw_upgrade(addr, "/ws", &first).await.status,
        429,
        "the same client"
    );

    let untrusted = server(&[("WS_MAX_CONNECTIONS_PER_IP", "1")]).await;
    let addr = untrusted.local_addr;
    let held = raw_upgrade(addr, "/ws", &first).await;
    assert_eq!(held.status, 101);
    assert_eq!(
        raw_upgrade(addr, "/ws", &second).await.status,
        429,
        "without a trusted proxy the header is ignored: one address"
    );
}

#[tokio::test]
async fn a_request_head_that_never_completes_is_cut_off() {
    let server = server(&[("WS_HANDSHAKE_TIMEOUT", "300ms")]).await;
    for partial in ["", "GET /ws HTTP/1.1\r\nHost: x\r\n"] {
        let mut socket = TcpStream::connect(server.local_addr)
            .await
            .expect("connect");
        socket.write_all(partial.as_bytes()).await.expect("write");
        let mut rest = Vec::new();
        let closed = tokio::time::timeout(PATIENCE, socket.read_to_end(&mut rest)).await;
        assert!(closed.is_ok(), "the server closes the socket: {partial:?}");
    }
}

/// A client that stops reading while a write to it is pending is closed after
/// `WS_WRITE_TIMEOUT`, long before its queue's budget is reached.
#[tokio::test]
async fn a_stuck_write_is_given_up_after_the_write_timeout() {
    let mut vars = vec![
        ("WS_WRITE_TIMEOUT", "1s"),
        ("WS_SEND_BUFFER", "256MiB"),
        ("WS_PING_INTERVAL", "1h"),
        ("WS_PONG_TIMEOUT", "2h"),
    ];
    vars.extend(UNLIMITED_PUBLISHING);
    let server = server(&vars).await;
    let addr = server.local_addr;
    let _stuck = Client::connect_with_small_buffer(addr).await;
    let mut publisher = Client::connect(addr).await;
    // About 30 MB in all: more than the kernel buffers for one socket.
    let padding = "x".repeat(60_000);
    for seq in 0..500 {
        publisher
            .ok("broadcast", json!({"seq": seq, "pad": padding}))
            .await;
    }
    eventually("the stuck client to be dropped", || async move {
        metric(addr, "ws_slow_consumer_drops_total").await == 1.0
    })
    .await;
    publisher.ok("ping", Value::Null).await;
    eventually("the stuck connection to be gone", || async move {
        metric(addr, "ws_connections_active").await == 1.0
    })
    .await;
}

/// Keepalive still fires while a write is stuck: with a write timeout longer than the
/// pong timeout, the pong timeout closes the client.
#[tokio::test]
async fn keepalive_closes_a_client_whose_write_is_stuck() {
    let mut vars = vec![
        ("WS_WRITE_TIMEOUT", "1h"),
        ("WS_SEND_BUFFER", "256MiB"),
        ("WS_PING_INTERVAL", "500ms"),
        ("WS_PONG_TIMEOUT", "1500ms"),
    ];
    vars.extend(UNLIMITED_PUBLISHING);
    let server = server(&vars).await;
    let addr = server.local_addr;
    let _stuck = Client::connect_with_small_buffer(addr).await;
    let mut publisher = Client::connect(addr).await;
    let padding = "x".repeat(60_000);
    for seq in 0..500 {
        publisher
            .ok("broadcast", json!({"seq": seq, "pad": padding}))
            .await;
    }
    // The publisher stops reading too; both are closed by keepalive.
    drop(publisher);
    eventually("every connection to be closed", || async move {
        metric(addr, "ws_connections_active").await == 0.0
    })
    .await;
    assert_eq!(metric(addr, "ws_slow_consumer_drops_total").await, 0.0);
}
