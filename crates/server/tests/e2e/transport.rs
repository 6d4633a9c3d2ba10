//! The WebSocket and HTTP layer: limits, refusals, and the plain HTTP endpoints.

use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::support::{Client, http_get, server, upgrade_status};

#[tokio::test]
async fn an_oversized_message_closes_with_1009() {
    let server = server(&[("WS_MAX_MESSAGE_SIZE", "1KiB")]).await;
    let mut client = Client::connect(server.local_addr).await;
    let fits = "x".repeat(900);
    assert_eq!(client.ok("self.reply", json!([fits])).await, json!([fits]));
    let request =
        json!({"jsonrpc": "2.0", "method": "self.reply", "params": ["y".repeat(2000)], "id": 1});
    client.send_text(&request.to_string()).await;
    assert_eq!(client.close_code().await, Some(CloseCode::Size));
}

#[tokio::test]
async fn a_binary_message_closes_with_1003() {
    let server = server(&[]).await;
    let mut client = Client::connect(server.local_addr).await;
    client
        .socket
        .send(Message::binary(vec![1, 2, 3]))
        .await
        .expect("send");
    assert_eq!(client.close_code().await, Some(CloseCode::Unsupported));
}

#[tokio::test]
async fn a_foreign_origin_gets_403() {
    let server = server(&[(
        "WS_ALLOWED_ORIGINS",
        "https://app.example, https://admin.example",
    )])
    .await;
    let addr = server.local_addr;
    assert_eq!(
        upgrade_status(addr, "/ws", &[("Origin", "https://evil.example")]).await,
        403
    );
    assert_eq!(
        upgrade_status(addr, "/ws", &[("Origin", "https://admin.example")]).await,
        101
    );
    assert_eq!(
        upgrade_status(addr, "/ws", &[]).await,
        101,
        "non-browser clients send no Origin"
    );
}

#[tokio::test]
async fn past_max_connections_gets_503_until_one_leaves() {
    let server = server(&[("WS_MAX_CONNECTIONS", "2")]).await;
    let addr = server.local_addr;
    let first = Client::connect(addr).await;
    let _second = Client::connect(addr).await;
    assert_eq!(upgrade_status(addr, "/ws", &[]).await, 503);
    drop(first);
    crate::support::eventually("a slot to free up", || async {
        http_get(addr, "/health")
            .await
            .1
            .contains(r#""connections":1"#)
    })
    .await;
    assert_eq!(upgrade_status(addr, "/ws", &[]).await, 101);
}

#[tokio::test]
async fn other_paths_are_404_and_the_path_is_configurable() {
    let server = server(&[("WS_PATH", "/rpc")]).await;
    let addr = server.local_addr;
    assert_eq!(http_get(addr, "/nothing").await.0, 404);
    assert_eq!(http_get(addr, "/ws").await.0, 404);
    // `/` is the demo page (WS_DEMO), `/chorus.js` the browser library.
    assert_eq!(http_get(addr, "/").await.0, 200);
    assert_eq!(http_get(addr, "/chorus.js").await.0, 200);
    assert_eq!(
        http_get(addr, "/echo").await.0,
        404,
        "echo is off by default"
    );
    assert_eq!(
        http_get(addr, "/rpc").await.0,
        400,
        "a plain GET is not an upgrade"
    );
    let mut client = Client::connect_url(&format!("ws://{addr}/rpc")).await;
    assert_eq!(client.ok("ping", Value::Null).await, "pong");
}

#[tokio::test]
async fn health_and_ready_standalone() {
    let server = server(&[("WS_NODE_ID", "node-7")]).await;
    let addr = server.local_addr;
    let _client = Client::connect(addr).await;
    let (status, body) = http_get(addr, "/health").await;
    assert_eq!(status, 200);
    let health: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(health["status"], "ok");
    assert_eq!(health["node_id"], "node-7");
    assert_eq!(health["connections"], 1);
    assert_eq!(health["pubsub"]["adapter"], "local");
    assert_eq!(health["pubsub"]["connected"], true);
    assert!(health["uptime_s"].is_u64());
    assert_eq!(http_get(addr, "/ready").await.0, 200);
}

#[tokio::test]
async fn greeting_names_client_and_node() {
    let server = server(&[("WS_NODE_ID", "node-9")]).await;
    let a = Client::connect(server.local_addr).await;
    let b = Client::connect(server.local_addr).await;
    assert_eq!(a.node_id, "node-9");
    assert_ne!(a.client_id, b.client_id);
}

#[tokio::test]
async fn the_echo_endpoint_echoes_text_and_binary() {
    let server = server(&[("WS_ECHO_PATH", "/echo")]).await;
    let (mut socket, _) =
        tokio_tungstenite::connect_async(format!("ws://{}/echo", server.local_addr))
            .await
            .expect("connect");
    use futures_util::StreamExt;
    socket.send(Message::text("héllo")).await.expect("send");
    assert_eq!(
        socket.next().await.and_then(Result::ok),
        Some(Message::text("héllo"))
    );
    socket
        .send(Message::binary(vec![0, 255]))
        .await
        .expect("send");
    assert_eq!(
        socket.next().await.and_then(Result::ok),
        Some(Message::binary(vec![0, 255]))
    );
}
