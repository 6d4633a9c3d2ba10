//! Section 10 across replicas: users with several devices, `send` and `kick`, device
//! replacement, presence and `sys.join`/`sys.leave`, the server API, lifecycle
//! webhooks. Every scenario is written once over a set of replica addresses and run
//! on an in-process cluster, and on three `chorus` processes over real Redis and NATS
//! (`users_cluster.rs`).

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chorus_gate::{TokenClaims, mint_hs256};
use chorus_pubsub::local::LocalBus;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::support::{Client, PATIENCE, config, eventually, ws_url};

pub const SECRET: &str = "users-test-secret-0123456789abcdef";
pub const API_KEY: &str = "api-key-0123456789abcdef";
/// Presence in `room:*`, with joins and leaves told; `quiet:*` has neither.
pub const NAMESPACES: &str =
    r#"{"room": {"presence": true, "join_leave": true}, "seen": {"presence": true}}"#;

/// What every replica in these scenarios is configured with.
pub fn users_vars() -> Vec<(&'static str, &'static str)> {
    vec![
        ("WS_AUTH_ENABLED", "true"),
        ("WS_JWT_SECRET", SECRET),
        ("WS_API_KEY", API_KEY),
        ("WS_NAMESPACES", NAMESPACES),
    ]
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub fn token(user: &str, device: Option<&str>) -> String {
    token_with(user, device, None)
}

pub fn token_with(user: &str, device: Option<&str>, channels: Option<Vec<String>>) -> String {
    mint_hs256(
        SECRET.as_bytes(),
        &TokenClaims {
            sub: user.to_owned(),
            device: device.map(str::to_owned),
            channels,
            info: Some(json!({"name": user})),
            iat: now(),
            exp: now() + 3600,
            ..TokenClaims::default()
        },
    )
    .expect("token")
}

pub async fn connect_as(addr: SocketAddr, user: &str, device: Option<&str>) -> Client {
    Client::connect_url(&format!("{}?token={}", ws_url(addr), token(user, device))).await
}

/// `POST /api` with `key`; the status and the body (JSON, or Null when empty).
pub async fn api_with(
    addr: SocketAddr,
    key: Option<&str>,
    method: &str,
    body: &str,
) -> (u16, Value) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let auth = key.map_or(String::new(), |key| {
        format!("Authorization: Bearer {key}\r\n")
    });
    let request = format!(
        "{method} /api HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut raw))
        .await
        .expect("answer in time")
        .expect("read");
    let raw = String::from_utf8_lossy(&raw);
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("status line");
    let body = raw.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    let value = if body.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_owned()))
    };
    (status, value)
}

/// One server API call that must succeed; its result.
pub async fn api(addr: SocketAddr, method: &str, params: Value) -> Value {
    let body = json!({"jsonrpc": "2.0", "method": method, "params": params, "id": 1});
    let (status, reply) = api_with(addr, Some(API_KEY), "POST", &body.to_string()).await;
    assert_eq!(status, 200, "{reply}");
    assert!(reply.get("error").is_none(), "{method} failed: {reply}");
    reply["result"].clone()
}

/// The next notification with `method`, skipping others.
async fn next_of(client: &mut Client, method: &str) -> Value {
    loop {
        let message = client.recv().await;
        if message["method"] == method {
            return message["params"].clone();
        }
    }
}

/// A user with devices on three replicas: `send` reaches each targeted connection
/// once, wherever it is, and nobody else.
pub async fn send_reaches_every_device_once(addrs: &[SocketAddr]) {
    let mut phone = connect_as(addrs[0], "alice", Some("phone")).await;
    let mut laptop = connect_as(addrs[1], "alice", Some("laptop")).await;
    let mut tablet = connect_as(addrs[2], "alice", Some("tablet")).await;
    let mut bob = connect_as(addrs[1], "bob", Some("bob-phone")).await;

    let sent = api(
        addrs[0],
        "send",
        json!({"users": ["alice"], "data": {"n": 1}}),
    )
    .await;
    assert_eq!(sent, json!({"devices": 3}));
    for device in [&mut phone, &mut laptop, &mut tablet] {
        let message = device.recv().await;
        assert_eq!(message["method"], "message.user", "{message}");
        assert_eq!(message["params"], json!({"n": 1}));
        device.assert_nothing_pending().await;
    }
    bob.assert_nothing_pending().await;

    let sent = api(
        addrs[2],
        "send",
        json!({"devices": ["laptop"], "event": "order.paid", "data": 2}),
    )
    .await;
    assert_eq!(sent, json!({"devices": 1}));
    let message = laptop.recv().await;
    assert_eq!(
        (message["method"].as_str(), &message["params"]),
        (Some("order.paid"), &json!(2))
    );
    for other in [&mut phone, &mut tablet, &mut bob] {
        other.assert_nothing_pending().await;
    }

    // The union of the three lists, each connection once.
    let tablet_id = tablet.client_id.clone();
    let phone_id = phone.client_id.clone();
    let sent = api(
        addrs[1],
        "send",
        json!({"users": ["alice"], "devices": ["phone", "bob-phone"], "clients": [tablet_id, phone_id], "data": 3}),
    )
    .await;
    assert_eq!(sent, json!({"devices": 4}));
    for device in [&mut phone, &mut laptop, &mut tablet, &mut bob] {
        assert_eq!(device.recv().await["params"], json!(3));
        device.assert_nothing_pending().await;
    }

    let sent = api(addrs[0], "send", json!({"users": ["nobody"], "data": 4})).await;
    assert_eq!(sent, json!({"devices": 0}));
}

/// `kick` closes a user's connections on every replica; a device connecting twice
/// replaces its older connection, across replicas, without the user going offline.
pub async fn kick_and_replace_work_across_replicas(addrs: &[SocketAddr]) {
    let mut phone = connect_as(addrs[0], "carol", Some("c-phone")).await;
    let mut laptop = connect_as(addrs[1], "carol", Some("c-laptop")).await;
    let mut other = connect_as(addrs[1], "dave", None).await;
    let kicked = api(
        addrs[2],
        "kick",
        json!({"users": ["carol"], "reason": "banned"}),
    )
    .await;
    assert_eq!(kicked, json!({"kicked": 2}));
    for device in [&mut phone, &mut laptop] {
        assert_eq!(
            next_of(device, "sys.kick").await,
            json!({"reason": "banned"})
        );
        assert_eq!(device.close_code().await, Some(CloseCode::Library(4003)));
    }
    other.assert_nothing_pending().await;

    let mut first = connect_as(addrs[0], "carol", Some("c-phone")).await;
    let second = connect_as(addrs[1], "carol", Some("c-phone")).await;
    let replaced = next_of(&mut first, "sys.replaced").await;
    assert_eq!(replaced, json!({"node_id": second.node_id}));
    assert_eq!(first.close_code().await, Some(CloseCode::Library(4002)));
    let addr = addrs[2];
    let second_id = second.client_id.clone();
    eventually("the replaced connection to leave presence", || {
        let second_id = second_id.clone();
        async move {
            let info = api(addr, "info", json!({"user": "carol"})).await;
            info["online"] == true
                && info["devices"].as_array().map(Vec::len) == Some(1)
                && info["devices"][0]["client_id"] == json!(second_id)
        }
    })
    .await;
    let info = api(addr, "info", json!({"user": "carol"})).await;
    let device = &info["devices"][0];
    assert_eq!(device["device"], "c-phone");
    assert_eq!(device["node_id"], json!(second.node_id));
    assert_eq!(device["info"], json!({"name": "carol"}));
    assert!(
        device["connected_at"]
            .as_str()
            .is_some_and(|t| t.ends_with('Z')),
        "{device}"
    );
    assert_eq!(device["remote_addr"], "127.0.0.1");
    let nodes = api(addr, "info", json!({})).await;
    assert_eq!(
        nodes["nodes"].as_array().map(Vec::len),
        Some(addrs.len()),
        "{nodes}"
    );
}

/// Members of a presence channel on several replicas: stats, pages, joins and
/// leaves, all cluster-wide.
pub async fn presence_and_join_leave_across_replicas(addrs: &[SocketAddr]) {
    let channel = "room:lobby";
    let mut members = Vec::new();
    for (i, user) in ["u1", "u2", "u3", "u4"].iter().enumerate() {
        let mut client = connect_as(addrs[i % addrs.len()], user, None).await;
        client.ok("subscribe", json!({"channel": channel})).await;
        members.push(client);
    }
    // u1 saw the three later joins (replicas may report them in any order), never
    // its own.
    let mut joined = Vec::new();
    for _ in 0..3 {
        let join = next_of(&mut members[0], "sys.join").await;
        assert_eq!(join["channel"], channel);
        joined.push(join["user"].as_str().expect("user").to_owned());
    }
    joined.sort();
    assert_eq!(joined, ["u2", "u3", "u4"]);
    let u1_again = {
        let mut client = connect_as(addrs[1], "u1", Some("second")).await;
        client.ok("subscribe", json!({"channel": channel})).await;
        client
    };
    let stats = members[3]
        .ok("presence_stats", json!({"channel": channel}))
        .await;
    assert_eq!(stats, json!({"clients": 5, "users": 4}));
    let stats = api(addrs[0], "presence_stats", json!({"channel": channel})).await;
    assert_eq!(stats, json!({"clients": 5, "users": 4}));

    // Pages of two: every member exactly once.
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut params = json!({"channel": channel, "limit": 2});
        if let Some(cursor) = &cursor {
            params["cursor"] = json!(cursor);
        }
        let page = members[1].ok("presence", params).await;
        let clients = page["clients"].as_array().expect("clients").clone();
        assert!(clients.len() <= 2);
        for member in &clients {
            assert!(
                member["client_id"].is_string() && member["node_id"].is_string(),
                "{member}"
            );
            seen.push(member["client_id"].as_str().expect("id").to_owned());
        }
        match page.get("cursor").and_then(Value::as_str) {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    let mut expected: Vec<String> = members.iter().map(|c| c.client_id.clone()).collect();
    expected.push(u1_again.client_id.clone());
    seen.sort();
    expected.sort();
    assert_eq!(seen, expected);
    let page = api(
        addrs[2],
        "presence",
        json!({"channel": channel, "limit": 1000}),
    )
    .await;
    let u2 = page["clients"]
        .as_array()
        .and_then(|all| all.iter().find(|m| m["user"] == "u2").cloned())
        .expect("u2 listed");
    assert_eq!(u2["info"], json!({"name": "u2"}));
    assert_eq!(u2["node_id"], json!(members[1].node_id));

    // A leave and a disconnect are told to the others, each once.
    members[1]
        .ok("unsubscribe", json!({"channel": channel}))
        .await;
    let left = next_of(&mut members[0], "sys.leave").await;
    assert_eq!(
        (left["user"].as_str(), left["client_id"].as_str()),
        (Some("u2"), Some(members[1].client_id.as_str()))
    );
    let gone = members.remove(2);
    let gone_id = gone.client_id.clone();
    drop(gone);
    let left = next_of(&mut members[0], "sys.leave").await;
    assert_eq!(left["client_id"], json!(gone_id));
    // The replica removes a closed connection from the store right after telling.
    let addr = addrs[0];
    eventually("the disconnection to reach the store", || async move {
        api(addr, "presence_stats", json!({"channel": "room:lobby"})).await
            == json!({"clients": 3, "users": 2})
    })
    .await;

    // Presence needs the namespace to track it, and the right to subscribe.
    let error = members[0]
        .call("presence", json!({"channel": "quiet:1"}))
        .await["error"]
        .clone();
    assert_eq!(error["code"], -32004, "{error}");
    assert_eq!(error["data"]["reason"], "presence not enabled");
    let mut limited = Client::connect_url(&format!(
        "{}?token={}",
        ws_url(addrs[0]),
        token_with("eve", None, Some(vec!["other:*".to_owned()]))
    ))
    .await;
    let error = limited
        .call("presence_stats", json!({"channel": channel}))
        .await["error"]
        .clone();
    assert_eq!(error["code"], -32003, "{error}");
    let error = limited
        .call("presence", json!({"channel": channel, "limit": 1001}))
        .await["error"]
        .clone();
    assert_eq!(error["code"], -32602, "{error}");

    // `channels` counts subscribers cluster-wide, whatever the namespace.
    members[0]
        .ok("subscribe", json!({"channel": "quiet:1"}))
        .await;
    let addr = addrs[1];
    eventually("channel counts to reach the store", || async move {
        let listed = api(addr, "channels", json!({})).await;
        let all = listed["channels"].as_array().cloned().unwrap_or_default();
        all.contains(&json!({"channel": "room:lobby", "clients": 3}))
            && all.contains(&json!({"channel": "quiet:1", "clients": 1}))
    })
    .await;
    let listed = api(addrs[1], "channels", json!({"pattern": "quiet:*"})).await;
    assert_eq!(
        listed,
        json!({"channels": [{"channel": "quiet:1", "clients": 1}]})
    );
}

/// The server API's refusals and wire forms.
pub async fn the_api_answers_like_json_rpc(addr: SocketAddr) {
    let body = r#"{"jsonrpc":"2.0","method":"info","id":1}"#;
    let (status, reply) = api_with(addr, None, "POST", body).await;
    assert_eq!((status, &reply), (401, &json!({"error": "missing"})));
    let (status, reply) = api_with(addr, Some("wrong-key-0123456789"), "POST", body).await;
    assert_eq!((status, &reply), (401, &json!({"error": "invalid"})));
    let (status, _) = api_with(addr, Some(API_KEY), "GET", "").await;
    assert_eq!(status, 405);

    let batch = json!([
        {"jsonrpc": "2.0", "method": "broadcast", "params": {"data": {"hello": 1}}, "id": 1},
        {"jsonrpc": "2.0", "method": "publish", "params": {"channel": "news", "data": 1}, "id": 2},
        {"jsonrpc": "2.0", "method": "send", "params": {"users": ["x"]}, "id": 3},
        {"jsonrpc": "2.0", "method": "send", "params": {"users": ["x"], "event": "sys.fake", "data": 1}, "id": 4},
        {"jsonrpc": "2.0", "method": "send", "params": {"data": 1}, "id": 5},
        {"jsonrpc": "2.0", "method": "subscribe", "params": {"channel": "a"}, "id": 6},
        {"jsonrpc": "2.0", "method": "kick", "params": {"users": "x"}, "id": 7},
        {"jsonrpc": "2.0", "method": "channels", "params": {"pattern": "a*b"}, "id": 8},
        {"jsonrpc": "2.0", "method": "presence", "params": {"channel": "bad channel"}, "id": 9},
        {"jsonrpc": "2.0", "method": "info", "params": {"surprise": 1}, "id": 10},
    ]);
    let (status, reply) = api_with(addr, Some(API_KEY), "POST", &batch.to_string()).await;
    assert_eq!(status, 200);
    let replies = reply.as_array().expect("a batch answer");
    let by_id = |id: u64| {
        replies
            .iter()
            .find(|r| r["id"] == json!(id))
            .cloned()
            .unwrap_or_else(|| panic!("no reply {id}: {reply}"))
    };
    assert_eq!(by_id(1)["result"], json!({"status": "broadcasted"}));
    assert_eq!(by_id(2)["result"]["channel"], "news");
    for (id, code) in [
        (3, -32602),
        (4, -32602),
        (5, -32602),
        (6, -32601),
        (7, -32602),
        (8, -32602),
        (9, -32602),
        (10, -32602),
    ] {
        assert_eq!(by_id(id)["error"]["code"], json!(code), "{}", by_id(id));
    }
    let notifications = json!([{"jsonrpc": "2.0", "method": "broadcast", "params": {"data": 1}}]);
    let (status, reply) = api_with(addr, Some(API_KEY), "POST", &notifications.to_string()).await;
    assert_eq!((status, reply), (204, Value::Null));
    let (status, reply) = api_with(addr, Some(API_KEY), "POST", "{not json").await;
    assert_eq!(
        (status, reply["error"]["code"].clone()),
        (200, json!(-32700))
    );
    let big = format!(
        r#"{{"jsonrpc":"2.0","method":"broadcast","params":{{"data":"{}"}},"id":1}}"#,
        "x".repeat(100 * 1024)
    );
    let error = api_with(addr, Some(API_KEY), "POST", &big).await.1["error"].clone();
    assert_eq!(error["code"], -32013, "{error}");
}

/// What a test webhook receiver got: bodies in arrival order, each with its signature.
#[derive(Clone, Default)]
pub struct Received(Arc<Mutex<Vec<(Value, String, String)>>>);

impl Received {
    pub fn events(&self) -> Vec<Value> {
        self.0
            .lock()
            .expect("not poisoned")
            .iter()
            .map(|(event, _, _)| event.clone())
            .collect()
    }
}

/// A webhook receiver on `listener`: answers 200 to every POST and keeps what came.
pub fn webhook_receiver(listener: TcpListener, received: Received) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let received = received.clone();
            tokio::spawn(async move {
                let mut raw = Vec::new();
                let mut buffer = [0u8; 4096];
                loop {
                    let Ok(n) = stream.read(&mut buffer).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    raw.extend_from_slice(&buffer[..n]);
                    // Requests on one kept-alive connection, one after the other.
                    while let Some(end) = find(&raw, b"\r\n\r\n") {
                        let head = String::from_utf8_lossy(&raw[..end]).to_string();
                        let length = head
                            .lines()
                            .find_map(|line| {
                                let (name, value) = line.split_once(':')?;
                                name.eq_ignore_ascii_case("content-length")
                                    .then(|| value.trim().parse::<usize>().ok())?
                            })
                            .unwrap_or(0);
                        if raw.len() < end + 4 + length {
                            break;
                        }
                        let body = raw[end + 4..end + 4 + length].to_vec();
                        raw.drain(..end + 4 + length);
                        let signature = head
                            .lines()
                            .find_map(|line| {
                                let (name, value) = line.split_once(':')?;
                                name.eq_ignore_ascii_case("x-chorus-signature")
                                    .then(|| value.trim().to_owned())
                            })
                            .unwrap_or_default();
                        let text = String::from_utf8_lossy(&body).to_string();
                        let event: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                        received
                            .0
                            .lock()
                            .expect("not poisoned")
                            .push((event, signature, text));
                        if stream
                            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            });
        }
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Checks every received event's signature with `secret`.
pub fn assert_signed(received: &Received, secret: &str) {
    for (_, signature, body) in received.0.lock().expect("not poisoned").iter() {
        assert_eq!(
            signature,
            &chorus_server::webhook::signature(secret.as_bytes(), body.as_bytes()),
            "signature of {body}"
        );
    }
}

/// The (event, user, device, reason) of each event, in order.
pub fn summary(events: &[Value]) -> Vec<(String, String, String, String)> {
    events
        .iter()
        .map(|e| {
            let text = |key: &str| e[key].as_str().unwrap_or("-").to_owned();
            (text("event"), text("user"), text("device"), text("reason"))
        })
        .collect()
}

// ---- the in-process runs ----

async fn local_cluster(count: usize, extra: &[(&str, &str)]) -> Vec<chorus_server::RunningServer> {
    let bus = LocalBus::new();
    let mut servers = Vec::new();
    for i in 0..count {
        let node_id = format!("local-{i}");
        let mut vars = users_vars();
        vars.extend([
            ("WS_PUBSUB_ENABLED", "true"),
            ("WS_PUBSUB_ADAPTER", "local"),
            ("WS_NODE_ID", node_id.as_str()),
        ]);
        vars.extend(extra);
        servers.push(
            chorus_server::start_with_bus(config(&vars), Some(bus.clone()))
                .await
                .expect("replica starts"),
        );
    }
    servers
}

fn addrs(servers: &[chorus_server::RunningServer]) -> Vec<SocketAddr> {
    servers.iter().map(|s| s.local_addr).collect()
}

#[tokio::test]
async fn local_send_reaches_every_device_once() {
    let servers = local_cluster(3, &[]).await;
    send_reaches_every_device_once(&addrs(&servers)).await;
}

#[tokio::test]
async fn local_kick_and_replace() {
    let servers = local_cluster(3, &[]).await;
    kick_and_replace_work_across_replicas(&addrs(&servers)).await;
}

#[tokio::test]
async fn local_presence_and_join_leave() {
    let servers = local_cluster(3, &[]).await;
    presence_and_join_leave_across_replicas(&addrs(&servers)).await;
}

#[tokio::test]
async fn local_api() {
    let servers = local_cluster(1, &[]).await;
    the_api_answers_like_json_rpc(servers[0].local_addr).await;
}

#[tokio::test]
async fn without_a_key_the_api_is_404_and_replacement_can_be_off() {
    let server = crate::support::server(&[
        ("WS_AUTH_ENABLED", "true"),
        ("WS_JWT_SECRET", SECRET),
        ("WS_DEVICE_REPLACE", "false"),
    ])
    .await;
    let addr = server.local_addr;
    let (status, _) = api_with(addr, Some(API_KEY), "POST", "{}").await;
    assert_eq!(status, 404);
    let mut first = connect_as(addr, "frank", Some("f-phone")).await;
    let mut second = connect_as(addr, "frank", Some("f-phone")).await;
    first.assert_nothing_pending().await;
    second.assert_nothing_pending().await;
}

#[tokio::test]
async fn lifecycle_events_reach_the_webhook_in_order_and_signed() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let hook = format!("http://{}/hook", listener.local_addr().expect("addr"));
    let received = Received::default();
    let secret = "webhook-secret-0123456789";
    let receiver = webhook_receiver(listener, received.clone());
    let servers = local_cluster(
        2,
        &[("WS_WEBHOOK_URL", &hook), ("WS_WEBHOOK_SECRET", secret)],
    )
    .await;
    let a = connect_as(servers[0].local_addr, "gina", Some("g-phone")).await;
    let b = connect_as(servers[1].local_addr, "gina", Some("g-laptop")).await;
    drop(a);
    eventually("the phone's disconnection", || {
        let received = received.clone();
        async move { received.events().len() >= 4 }
    })
    .await;
    drop(b);
    eventually("every event", || {
        let received = received.clone();
        async move { received.events().len() >= 6 }
    })
    .await;
    let events = received.events();
    // Each replica reports what happened on it in order; two replicas' reports may
    // interleave.
    let of = |device: &str| -> Vec<(String, String)> {
        summary(&events)
            .into_iter()
            .filter(|(_, _, d, _)| d == device)
            .map(|(event, _, _, reason)| (event, reason))
            .collect()
    };
    let pair = |e: &str, r: &str| (e.to_owned(), r.to_owned());
    assert_eq!(
        of("g-phone"),
        [
            pair("user_online", "connected"),
            pair("device_online", "connected"),
            pair("device_offline", "disconnected"),
        ]
    );
    assert_eq!(
        of("g-laptop"),
        [
            pair("device_online", "connected"),
            pair("device_offline", "disconnected"),
            pair("user_offline", "disconnected"),
        ]
    );
    assert!(
        events
            .iter()
            .all(|e| e["user"] == "gina" && e["client_id"].is_string() && e["node_id"].is_string())
    );
    assert_signed(&received, secret);
    let ids: std::collections::HashSet<&str> =
        events.iter().filter_map(|e| e["id"].as_str()).collect();
    assert_eq!(ids.len(), 6, "ids are unique");
    assert!(
        events
            .iter()
            .all(|e| e["time"].as_str().is_some_and(|t| t.ends_with('Z')))
    );
    receiver.abort();

    // The receiver goes away for a while: what happens meanwhile arrives once it is back.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    drop(listener);
    let hook = format!("http://127.0.0.1:{port}/hook");
    let servers = local_cluster(
        1,
        &[("WS_WEBHOOK_URL", &hook), ("WS_WEBHOOK_SECRET", secret)],
    )
    .await;
    let mut clients = Vec::new();
    for i in 0..5 {
        clients.push(connect_as(servers[0].local_addr, &format!("h{i}"), Some("d")).await);
    }
    drop(clients);
    let addr = servers[0].local_addr;
    eventually("failed tries", || async move {
        crate::support::metric(addr, "ws_webhook_retries_total").await >= 2.0
    })
    .await;
    let received = Received::default();
    let listener = TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("rebind");
    let _receiver = webhook_receiver(listener, received.clone());
    tokio::time::timeout(PATIENCE + Duration::from_secs(10), async {
        while received.events().len() < 20 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("every event arrives once the receiver is back");
    assert_eq!(
        received.events().len(),
        20,
        "5 users x online, device online, device offline, offline"
    );
    assert_signed(&received, secret);
}
