//! Fan-out as clients see it: broadcast, channels, and slow consumers.

use std::time::Duration;

use serde_json::json;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::support::{Client, eventually, eventually_within, metric, server};

#[tokio::test]
async fn broadcast_reaches_a_hundred_clients_including_the_caller() {
    let server = server(&[]).await;
    let mut clients = Vec::new();
    for _ in 0..100 {
        clients.push(Client::connect(server.local_addr).await);
    }
    let params = json!({"text": "hello", "n": [1, 2.5, null, {"deep": true}]});
    let result = clients[0].ok("broadcast", params.clone()).await;
    assert_eq!(result, json!({"status": "broadcasted"}));
    let expected = json!({"jsonrpc": "2.0", "method": "broadcast", "params": params});
    // The caller's notification was queued before its reply.
    for client in &mut clients[1..] {
        assert_eq!(client.recv().await, expected);
    }
    clients[0].assert_nothing_pending().await;
}

#[tokio::test]
async fn publish_reaches_subscribers_and_only_them() {
    let server = server(&[]).await;
    let mut subscriber = Client::connect(server.local_addr).await;
    let mut other_channel = Client::connect(server.local_addr).await;
    let mut publisher = Client::connect(server.local_addr).await;
    assert_eq!(
        subscriber
            .ok("subscribe", json!({"channel": "items:42"}))
            .await,
        json!({"channel": "items:42"})
    );
    assert_eq!(
        other_channel.ok("subscribe", json!(["items:43"])).await,
        json!({"channel": "items:43"})
    );

    let data = json!({"id": 42, "name": "widget"});
    assert_eq!(
        publisher
            .ok("publish", json!({"channel": "items:42", "data": data}))
            .await,
        json!({"channel": "items:42"})
    );
    assert_eq!(
        subscriber.recv().await,
        json!({"jsonrpc": "2.0", "method": "message", "params": {"channel": "items:42", "data": data}})
    );
    other_channel.assert_nothing_pending().await;
    publisher.assert_nothing_pending().await;
    subscriber.assert_nothing_pending().await;
}

#[tokio::test]
async fn unsubscribe_stops_delivery() {
    let server = server(&[]).await;
    let mut subscriber = Client::connect(server.local_addr).await;
    let mut publisher = Client::connect(server.local_addr).await;
    subscriber.ok("subscribe", json!({"channel": "news"})).await;
    publisher
        .ok("publish", json!({"channel": "news", "data": 1}))
        .await;
    assert_eq!(subscriber.recv().await["params"]["data"], 1);
    assert_eq!(
        subscriber
            .ok("unsubscribe", json!({"channel": "news"}))
            .await,
        json!({"channel": "news"})
    );
    publisher
        .ok("publish", json!({"channel": "news", "data": 2}))
        .await;
    subscriber.assert_nothing_pending().await;
    assert_eq!(
        subscriber
            .call("unsubscribe", json!({"channel": "news"}))
            .await["error"]["code"],
        -32004
    );
}

// Two workers: the server, 51 readers and the publisher share this runtime, and the
// slow client must get to its close frame before the server's close timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_is_dropped_while_others_get_everything() {
    const BROADCASTS: usize = 10_000;
    const WINDOW: usize = 32;
    // How far a reader may fall behind: with the window, less than its queue alone
    // (whatever the kernel buffers), so only the client that never reads is dropped.
    const LAG: usize = 32;
    let server = server(&[
        ("WS_SEND_BUFFER", "256KiB"),
        ("WS_PING_INTERVAL", "1h"),
        ("WS_PONG_TIMEOUT", "2h"),
        ("WS_PUBLISH_RATE", "0"),
        ("WS_PUBLISH_BYTES_RATE", "0"),
        ("WS_PUBLISH_RATE_TOTAL", "0"),
        ("WS_PUBLISH_BYTES_TOTAL", "0"),
    ])
    .await;
    let addr = server.local_addr;
    let mut slow = Client::connect_with_small_buffer(addr).await;

    let mut readers = Vec::new();
    let mut progress = Vec::new();
    for _ in 0..50 {
        let mut client = Client::connect(addr).await;
        let (received, watch) = tokio::sync::watch::channel(0);
        progress.push(watch);
        readers.push(tokio::spawn(async move {
            let mut next = 0;
            while next < BROADCASTS {
                let message = client.recv().await;
                assert_eq!(message["params"]["seq"], json!(next), "in order, none lost");
                next += 1;
                received.send_replace(next);
            }
            client.assert_nothing_pending().await;
        }));
    }

    // ~1 KiB per broadcast, so the slow client's buffers fill long before the end.
    let padding = "x".repeat(1000);
    let mut publisher = Client::connect(addr).await;
    let publishing = tokio::spawn(async move {
        for start in (0..BROADCASTS).step_by(WINDOW) {
            for watch in &mut progress {
                // A reader that stops (its task failed) is reported when it is joined.
                let _ = watch.wait_for(|&received| received + LAG >= start).await;
            }
            for seq in start..(start + WINDOW).min(BROADCASTS) {
                let request = json!({"jsonrpc": "2.0", "method": "broadcast", "params": {"seq": seq, "pad": padding}, "id": seq});
                publisher.send_text(&request.to_string()).await;
            }
            let mut replies = 0;
            while replies < WINDOW.min(BROADCASTS - start) {
                let message = publisher.recv().await;
                if message.get("id").is_some() {
                    assert_eq!(
                        message["result"],
                        json!({"status": "broadcasted"}),
                        "{message}"
                    );
                    replies += 1;
                }
            }
        }
    });

    // The close frame waits behind what the socket already holds: read it soon after
    // the drop is counted, before the server gives up on the closing handshake.
    // How soon depends on how much the kernel buffers for the slow socket.
    eventually_within(
        Duration::from_secs(60),
        "the slow consumer to be dropped",
        || async { metric(addr, "ws_slow_consumer_drops_total").await >= 1.0 },
    )
    .await;
    assert_eq!(
        slow.close_code().await,
        Some(CloseCode::Again),
        "closed with 1013"
    );

    publishing.await.expect("publisher finished");
    for reader in readers {
        reader.await.expect("reader got every broadcast");
    }
    assert_eq!(metric(addr, "ws_slow_consumer_drops_total").await, 1.0);
}

#[tokio::test]
async fn metrics_count_what_clients_did() {
    let server = server(&[]).await;
    let addr = server.local_addr;
    let mut a = Client::connect(addr).await;
    let mut b = Client::connect(addr).await;
    a.ok("subscribe", json!({"channel": "m"})).await;
    b.ok("publish", json!({"channel": "m", "data": 1})).await;
    a.recv().await;
    a.call("nope", json!([])).await;
    b.send_text("not json").await;
    b.recv().await;

    assert_eq!(metric(addr, "ws_connections_active").await, 2.0);
    assert_eq!(metric(addr, "ws_connections_total").await, 2.0);
    assert_eq!(metric(addr, "ws_messages_received_total").await, 4.0);
    // Two greetings, three replies, one publication, one parse error.
    assert_eq!(metric(addr, "ws_messages_sent_total").await, 7.0);
    assert_eq!(
        metric(
            addr,
            r#"ws_rpc_requests_total{method="subscribe",outcome="ok"}"#
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(
            addr,
            r#"ws_rpc_requests_total{method="publish",outcome="ok"}"#
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(
            addr,
            r#"ws_rpc_requests_total{method="unknown",outcome="error"}"#
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(
            addr,
            r#"ws_rpc_requests_total{method="invalid",outcome="error"}"#
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(addr, r#"ws_rpc_duration_seconds_count{method="publish"}"#).await,
        1.0
    );

    drop(a);
    eventually("the closed connection to be counted", || async {
        metric(addr, "ws_connections_active").await == 1.0
    })
    .await;
}
