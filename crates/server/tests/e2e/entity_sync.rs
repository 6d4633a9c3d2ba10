//! `examples/entity-sync` as its README runs it, on two replicas sharing the in-process
//! backbone: the Python backend decides identity, answers subscriptions with the
//! entity's state, relays `entity.update`, and publishes every change through `/api`.

use std::path::PathBuf;
use std::process::Stdio;

use chorus_pubsub::local::LocalBus;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

use crate::support::{Client, PATIENCE, config, raw_upgrade, ws_url};

const API_KEY: &str = "entity-sync-api-key-0123";
const SECRET: &str = "entity-sync-proxy-secret";

fn example() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/entity-sync/backend.py")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free port")
}

/// The backend, once it says it listens.
async fn start_backend(port: u16, api: &str) -> Child {
    let mut child = Command::new("python3")
        .arg(example())
        .args(["--port", &port.to_string(), "--api", api])
        .args(["--api-key", API_KEY, "--secret", SECRET])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs the example backend");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(PATIENCE, lines.next_line())
        .await
        .expect("the backend starts in time")
        .expect("readable")
        .expect("a line");
    assert!(line.contains("listening"), "{line}");
    child
}

/// `POST path` with a JSON body to the backend, as another part of the application would.
async fn post(port: u16, path: &str, body: &Value) -> u16 {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let body = body.to_string();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut answer = String::new();
    tokio::time::timeout(PATIENCE, stream.read_to_string(&mut answer))
        .await
        .expect("answer in time")
        .expect("read");
    answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("a status line")
}

/// The next `message` of `channel` (skipping nothing else: none is expected).
async fn message(client: &mut Client) -> Value {
    let message = client.recv().await;
    assert_eq!(message["method"], "message", "{message}");
    message["params"].clone()
}

#[tokio::test]
async fn two_replicas_share_an_entity_through_the_backend() {
    let port = free_port();
    let backend = format!("http://127.0.0.1:{port}");
    let urls = [
        ("WS_PROXY_CONNECT_URL", format!("{backend}/connect")),
        ("WS_PROXY_RPC_URL", format!("{backend}/rpc")),
        ("WS_PROXY_SUBSCRIBE_URL", format!("{backend}/subscribe")),
        ("WS_PROXY_PUBLISH_URL", format!("{backend}/publish")),
    ];
    let bus = LocalBus::new();
    let mut replicas = Vec::new();
    for node in ["replica-a", "replica-b"] {
        let mut vars: Vec<(&str, &str)> = vec![
            ("WS_PUBSUB_ENABLED", "true"),
            ("WS_PUBSUB_ADAPTER", "local"),
            ("WS_NODE_ID", node),
            ("WS_API_KEY", API_KEY),
            ("WS_PROXY_SECRET", SECRET),
        ];
        vars.extend(urls.iter().map(|(name, url)| (*name, url.as_str())));
        replicas.push(
            chorus_server::start_with_bus(config(&vars), Some(bus.clone()))
                .await
                .expect("replica starts"),
        );
    }
    let api = format!("http://{}/api", replicas[0].local_addr);
    let _backend = start_backend(port, &api).await;

    let url = |i: usize, token: &str| format!("{}?token={token}", ws_url(replicas[i].local_addr));
    let mut alice = Client::connect_url(&url(0, "alice-secret")).await;
    let mut bob = Client::connect_url(&url(1, "bob-secret")).await;
    assert_eq!(alice.greeting["params"]["user"], "alice");
    assert_eq!(bob.greeting["params"]["user"], "bob");
    assert_eq!(bob.node_id, "replica-b");
    let stranger = raw_upgrade(replicas[1].local_addr, "/ws?token=guess", &[]).await;
    assert_eq!(stranger.status, 401);

    // Subscribing gives the entity's state, right after the reply.
    let channel = "entity:todo:1";
    for client in [&mut alice, &mut bob] {
        assert_eq!(
            client.ok("subscribe", json!({"channel": channel})).await,
            json!({"channel": channel})
        );
        let initial = message(client).await;
        assert_eq!(initial["channel"], channel);
        assert_eq!(initial["data"]["version"], 1);
        assert_eq!(initial["data"]["state"]["done"], false);
    }

    // A change through the relayed method reaches both replicas. The backend publishes
    // before it answers, so the caller may see the change before its reply.
    alice
        .send_text(
            &json!({"jsonrpc": "2.0", "method": "entity.update", "id": "u1",
                "params": {"type": "todo", "id": "1", "changes": {"done": true}}})
            .to_string(),
        )
        .await;
    let mut frames = [alice.recv().await, alice.recv().await];
    frames.sort_by_key(|frame| frame.get("id").is_none());
    let [reply, change] = frames;
    assert_eq!(reply["id"], "u1");
    assert_eq!(reply["result"]["version"], 2, "{reply}");
    assert_eq!(change["params"]["data"]["version"], 2, "{change}");
    let change = message(&mut bob).await;
    assert_eq!(change["data"]["version"], 2);
    assert_eq!(change["data"]["state"]["done"], true);

    // A change made elsewhere in the application, published through /api.
    assert_eq!(
        post(
            port,
            "/entities/todo/1",
            &json!({"title": "Proxy docs written"})
        )
        .await,
        200
    );
    for client in [&mut alice, &mut bob] {
        let change = message(client).await;
        assert_eq!(change["data"]["version"], 3);
        assert_eq!(change["data"]["state"]["title"], "Proxy docs written");
    }

    // What the backend refuses.
    let missing = bob
        .call("subscribe", json!({"channel": "entity:todo:404"}))
        .await;
    assert_eq!(missing["error"]["code"], -32003, "{missing}");
    assert_eq!(missing["error"]["data"]["reason"], "no such entity");
    let published = bob
        .call(
            "publish",
            json!({"channel": channel, "data": {"done": false}}),
        )
        .await;
    assert_eq!(published["error"]["code"], -32003, "{published}");
    let unknown = bob
        .call("entity.delete", json!({"type": "todo", "id": "1"}))
        .await;
    assert_eq!(unknown["error"]["code"], -32601, "{unknown}");
    let absent = bob
        .call(
            "entity.update",
            json!({"type": "todo", "id": "404", "changes": {}}),
        )
        .await;
    assert_eq!(absent["error"]["code"], 4004, "{absent}");
    for client in [&mut alice, &mut bob] {
        client.assert_nothing_pending().await;
    }
}
