//! The real binary: configuration errors, and draining on SIGTERM.

use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::support::{Client, PATIENCE, ServerProcess, command, http_get, ws_url};

async fn exit_of(vars: &[(&str, &str)]) -> (Option<i32>, String) {
    let output = tokio::time::timeout(
        PATIENCE,
        command(vars).stderr(std::process::Stdio::piped()).output(),
    )
    .await
    .expect("exits in time")
    .expect("runs");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_bad_port_exits_2_naming_the_variable() {
    let (code, stderr) = exit_of(&[("WS_PORT", "eighty")]).await;
    assert_eq!(code, Some(2));
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains("WS_PORT") && stderr.contains("eighty"),
        "{stderr}"
    );
}

#[tokio::test]
async fn other_bad_values_exit_2_before_binding() {
    for (variable, value) in [
        ("WS_PUBSUB_ADAPTER", "kafka"),
        ("WS_PING_INTERVAL", "soon"),
        ("WS_SEND_BUFFER", "0"),
    ] {
        let (code, stderr) = exit_of(&[(variable, value)]).await;
        assert_eq!(code, Some(2), "{variable}");
        assert!(stderr.contains(variable), "{stderr}");
    }
}

#[tokio::test]
async fn an_unknown_variable_or_an_inconsistent_set_exits_2() {
    let (code, stderr) = exit_of(&[("WS_PONG_TIMOUT", "30s")]).await;
    assert_eq!(code, Some(2));
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains("WS_PONG_TIMOUT") && stderr.contains("WS_PONG_TIMEOUT"),
        "names the typo and what was meant: {stderr}"
    );
    let (code, stderr) = exit_of(&[("WS_PING_INTERVAL", "1m"), ("WS_PONG_TIMEOUT", "30s")]).await;
    assert_eq!(code, Some(2));
    assert!(stderr.contains("WS_PONG_TIMEOUT"), "{stderr}");
    let (code, stderr) = exit_of(&[("WS_SEND_BUFFER", "64KiB")]).await;
    assert_eq!(code, Some(2));
    assert!(stderr.contains("WS_MAX_PUBLISH_SIZE"), "{stderr}");
}

#[tokio::test]
async fn sigterm_drains_clients_then_exits_0() {
    let mut server = ServerProcess::spawn(&[("WS_SHUTDOWN_GRACE", "2s")]).await;
    let addr = server.addr;
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(Client::connect_url(&ws_url(addr)).await);
    }
    clients[0].ok("subscribe", json!({"channel": "c"})).await;
    server.signal("TERM");
    for client in &mut clients {
        let notice = client.recv().await;
        assert_eq!(notice["method"], "sys.shutdown", "{notice}");
        let after = notice["params"]["reconnect_after_ms"]
            .as_u64()
            .expect("reconnect_after_ms");
        assert!(after < 2000, "spread within the grace period: {after}");
        assert_eq!(client.close_code().await, Some(CloseCode::Away));
    }
    let status = tokio::time::timeout(PATIENCE, server.child.wait())
        .await
        .expect("exits in time")
        .expect("status");
    assert_eq!(status.code(), Some(0));
}

#[tokio::test]
async fn draining_turns_ready_to_503() {
    let mut server = ServerProcess::spawn(&[("WS_SHUTDOWN_GRACE", "3s")]).await;
    let addr = server.addr;
    // A client that ignores the shutdown notice keeps the process draining.
    let mut stubborn = Client::connect_url(&ws_url(addr)).await;
    assert_eq!(http_get(addr, "/ready").await.0, 200);
    server.signal("TERM");
    assert_eq!(stubborn.recv().await["method"], "sys.shutdown");
    assert_eq!(http_get(addr, "/ready").await.0, 503);
    assert_eq!(crate::support::upgrade_status(addr, "/ws", &[]).await, 503);
    let status = tokio::time::timeout(PATIENCE, server.child.wait())
        .await
        .expect("exits in time")
        .expect("status");
    assert_eq!(status.code(), Some(0));
}

/// `WS_PUBSUB_ENABLED=true` with the `local` adapter is a one-process cluster: ready,
/// and publications answered normally (it once reported its bus as down forever).
#[tokio::test]
async fn enabled_local_adapter_is_ready_and_publishes() {
    let server = ServerProcess::spawn(&[
        ("WS_PUBSUB_ENABLED", "true"),
        ("WS_PUBSUB_ADAPTER", "local"),
    ])
    .await;
    assert_eq!(http_get(server.addr, "/ready").await.0, 200);
    let health: serde_json::Value =
        serde_json::from_str(&http_get(server.addr, "/health").await.1).expect("JSON");
    assert_eq!(health["status"], "ok", "{health}");
    let mut client = Client::connect_url(&ws_url(server.addr)).await;
    client.ok("broadcast", json!({"text": "hi"})).await;
    client
        .ok("publish", json!({"channel": "items:1", "data": 1}))
        .await;
}
