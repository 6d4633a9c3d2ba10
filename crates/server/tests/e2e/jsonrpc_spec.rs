//! The examples of section 7 of the JSON-RPC 2.0 specification, sent over a real
//! WebSocket. The specification's `subtract`, `sum` and `get_data` become our
//! `self.reply` and `ping`; the unknown names stay unknown.

use serde_json::{Value, json};

use crate::support::{Client, server};

async fn client() -> (chorus_server::RunningServer, Client) {
    let server = server(&[]).await;
    let client = Client::connect(server.local_addr).await;
    (server, client)
}

async fn exchange(client: &mut Client, request: &str) -> Value {
    client.send_text(request).await;
    client.recv().await
}

/// Batch replies may come in any order: compare as sets keyed by id.
fn sorted(mut batch: Value) -> Vec<Value> {
    let items = batch.as_array_mut().expect("a batch reply is an array");
    // Null ids (errors without a usable id) first, then by id.
    items.sort_by_key(|item| (!item["id"].is_null(), item["id"].to_string()));
    items.clone()
}

#[tokio::test]
async fn positional_and_named_params() {
    let (_server, mut client) = client().await;
    assert_eq!(
        exchange(
            &mut client,
            r#"{"jsonrpc": "2.0", "method": "self.reply", "params": [42, 23], "id": 1}"#
        )
        .await,
        json!({"jsonrpc": "2.0", "result": [42, 23], "id": 1})
    );
    assert_eq!(
        exchange(&mut client, r#"{"jsonrpc": "2.0", "method": "self.reply", "params": {"subtrahend": 23, "minuend": 42}, "id": 3}"#).await,
        json!({"jsonrpc": "2.0", "result": {"subtrahend": 23, "minuend": 42}, "id": 3})
    );
}

#[tokio::test]
async fn ids_echo_unchanged() {
    let (_server, mut client) = client().await;
    for id in [r#""abc""#, "null", "-7", "1.5", r#""""#] {
        client
            .send_text(&format!(r#"{{"jsonrpc":"2.0","method":"ping","id":{id}}}"#))
            .await;
        let text = client.recv_text().await;
        assert!(
            text.ends_with(&format!(r#","id":{id}}}"#)),
            "id {id} came back as {text}"
        );
    }
}

#[tokio::test]
async fn notifications_get_no_reply_not_even_an_error() {
    let (_server, mut client) = client().await;
    client
        .send_text(r#"{"jsonrpc": "2.0", "method": "update", "params": [1,2,3,4,5]}"#)
        .await;
    client
        .send_text(r#"{"jsonrpc": "2.0", "method": "foobar"}"#)
        .await;
    client
        .send_text(r#"{"jsonrpc": "2.0", "method": "self.reply", "params": [1]}"#)
        .await;
    client
        .send_text(
            r#"{"jsonrpc": "2.0", "method": "subscribe", "params": {"channel": "bad name"}}"#,
        )
        .await;
    client.assert_nothing_pending().await;
}

#[tokio::test]
async fn method_not_found() {
    let (_server, mut client) = client().await;
    let reply = exchange(
        &mut client,
        r#"{"jsonrpc": "2.0", "method": "foobar", "id": "1"}"#,
    )
    .await;
    assert_eq!(reply["error"]["code"], -32601);
    assert_eq!(reply["id"], "1");
    assert_eq!(reply["jsonrpc"], "2.0");
}

#[tokio::test]
async fn invalid_json_is_a_parse_error_with_null_id() {
    let (_server, mut client) = client().await;
    let reply = exchange(
        &mut client,
        r#"{"jsonrpc": "2.0", "method": "foobar, "params": "bar", "baz]"#,
    )
    .await;
    assert_eq!(reply["error"]["code"], -32700);
    assert_eq!(reply["id"], Value::Null);
    assert!(
        reply.as_object().is_some_and(|o| o.contains_key("id")),
        "id null is present"
    );
}

#[tokio::test]
async fn invalid_request_object() {
    let (_server, mut client) = client().await;
    let reply = exchange(
        &mut client,
        r#"{"jsonrpc": "2.0", "method": 1, "params": "bar"}"#,
    )
    .await;
    assert_eq!(reply["error"]["code"], -32600);
    assert_eq!(reply["id"], Value::Null);
}

#[tokio::test]
async fn batch_with_invalid_json() {
    let (_server, mut client) = client().await;
    let reply = exchange(
        &mut client,
        r#"[
  {"jsonrpc": "2.0", "method": "sum", "params": [1,2,4], "id": "1"},
  {"jsonrpc": "2.0", "method"
]"#,
    )
    .await;
    assert_eq!(reply["error"]["code"], -32700);
    assert_eq!(reply["id"], Value::Null);
}

#[tokio::test]
async fn empty_batch_is_one_invalid_request() {
    let (_server, mut client) = client().await;
    let reply = exchange(&mut client, "[]").await;
    assert!(reply.is_object(), "not an array: {reply}");
    assert_eq!(reply["error"]["code"], -32600);
    assert_eq!(reply["id"], Value::Null);
}

#[tokio::test]
async fn invalid_batch_elements() {
    let (_server, mut client) = client().await;
    let one = exchange(&mut client, "[1]").await;
    assert_eq!(one.as_array().map(Vec::len), Some(1));
    assert_eq!(one[0]["error"]["code"], -32600);
    assert_eq!(one[0]["id"], Value::Null);
    let three = exchange(&mut client, "[1,2,3]").await;
    let items = three.as_array().expect("array");
    assert_eq!(items.len(), 3);
    assert!(
        items
            .iter()
            .all(|item| item["error"]["code"] == -32600 && item["id"].is_null())
    );
}

#[tokio::test]
async fn mixed_batch() {
    let (_server, mut client) = client().await;
    let reply = exchange(
        &mut client,
        r#"[
        {"jsonrpc": "2.0", "method": "self.reply", "params": [1,2,4], "id": "1"},
        {"jsonrpc": "2.0", "method": "notify_hello", "params": [7]},
        {"jsonrpc": "2.0", "method": "self.reply", "params": [42,23], "id": "2"},
        {"foo": "boo"},
        {"jsonrpc": "2.0", "method": "foo.get", "params": {"name": "myself"}, "id": "5"},
        {"jsonrpc": "2.0", "method": "ping", "id": "9"}
    ]"#,
    )
    .await;
    let items = sorted(reply);
    assert_eq!(items.len(), 5, "{items:?}");
    assert_eq!(
        items[0],
        json!({"jsonrpc": "2.0", "error": items[0]["error"].clone(), "id": null})
    );
    assert_eq!(items[0]["error"]["code"], -32600);
    assert_eq!(
        items[1],
        json!({"jsonrpc": "2.0", "result": [1, 2, 4], "id": "1"})
    );
    assert_eq!(
        items[2],
        json!({"jsonrpc": "2.0", "result": [42, 23], "id": "2"})
    );
    assert_eq!(items[3]["error"]["code"], -32601);
    assert_eq!(items[3]["id"], "5");
    assert_eq!(
        items[4],
        json!({"jsonrpc": "2.0", "result": "pong", "id": "9"})
    );
}

#[tokio::test]
async fn batch_of_notifications_gets_nothing() {
    let (_server, mut client) = client().await;
    client
        .send_text(r#"[{"jsonrpc": "2.0", "method": "notify_sum", "params": [1,2,4]}, {"jsonrpc": "2.0", "method": "notify_hello", "params": [7]}]"#)
        .await;
    client.assert_nothing_pending().await;
}

#[tokio::test]
async fn server_errors_use_the_contract_codes() {
    let (_server, mut client) = client().await;
    let reply = client
        .call("unsubscribe", json!({"channel": "never"}))
        .await;
    assert_eq!(reply["error"]["code"], -32004);
    let reply = client
        .call("subscribe", json!({"channel": "no spaces"}))
        .await;
    assert_eq!(reply["error"]["code"], -32602);
    let reply = client.call("broadcast", json!("text")).await;
    assert_eq!(
        reply["error"]["code"], -32600,
        "string params are not structured"
    );
}
