//! Smoke test of the load generator: every scenario but `idle` with tiny numbers
//! (`sse` against the built `chorus`, which it starts itself; the others against a
//! minimal in-test server that speaks the Chorus wire format: sys.connected,
//! self.reply, subscribe, publish, presence, presence_stats; users from HS256 tokens;
//! `POST /api` with send, publish and info).
//!
//! Set `CHORUS_BENCH_URL=ws://127.0.0.1:PORT/ws` to run `rpc` and `fanout` against a
//! running Chorus server as well.

use chorus_bench::Common;
use chorus_bench::conn::Target;
use chorus_bench::fanout::{self, FanoutOpts};
use chorus_bench::presence::{self, PresenceOpts};
use chorus_bench::rpc::{self, RpcOpts};
use chorus_bench::send::{self, SendOpts};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

const SECRET: &str = "smoke-test-secret-of-at-least-thirty-two-bytes";
const API_KEY: &str = "smoke-test-api-key";

struct Client {
    user: Option<String>,
    tx: mpsc::UnboundedSender<String>,
    channels: BTreeSet<String>,
}

/// Connected clients by client id.
type Clients = Arc<Mutex<BTreeMap<String, Client>>>;

/// A tiny Chorus-compatible server on an ephemeral loopback port.
async fn mini_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let clients: Clients = Arc::default();
    tokio::spawn(async move {
        let mut n = 0u64;
        while let Ok((tcp, _)) = listener.accept().await {
            n += 1;
            let clients = clients.clone();
            tokio::spawn(async move {
                // `POST /api` or a WebSocket upgrade (a GET) on the same port.
                let mut head = [0u8; 4];
                loop {
                    match tcp.peek(&mut head).await {
                        Ok(4) => break,
                        Ok(0) | Err(_) => return,
                        Ok(_) => tokio::task::yield_now().await,
                    }
                }
                if &head == b"POST" {
                    api(tcp, clients).await;
                } else {
                    websocket(tcp, format!("test/{n}"), clients).await;
                }
            });
        }
    });
    format!("ws://{addr}/ws")
}

/// The `sub` of a `?token=` HS256 JWT in the request URI.
fn user_of(request: &Request) -> Option<String> {
    let query = request.uri().query()?;
    let token = query.split('&').find_map(|kv| kv.strip_prefix("token="))?;
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.required_spec_claims.clear();
    let claims = jsonwebtoken::decode::<Value>(
        token,
        &jsonwebtoken::DecodingKey::from_secret(SECRET.as_bytes()),
        &validation,
    )
    .ok()?
    .claims;
    claims["sub"].as_str().map(str::to_string)
}

fn deliver(clients: &Clients, to: impl Fn(&Client) -> bool, note: &str) -> u64 {
    let mut n = 0;
    for c in clients.lock().expect("lock").values() {
        if to(c) {
            let _ = c.tx.send(note.to_string());
            n += 1;
        }
    }
    n
}

fn publish(clients: &Clients, channel: &str, data: &Value) -> Value {
    let note = json!({"jsonrpc":"2.0","method":"message","params":{"channel":channel,"data":data}})
        .to_string();
    deliver(clients, |c| c.channels.contains(channel), &note);
    json!({ "channel": channel })
}

// The handshake callback's error type is tungstenite's (a whole HTTP response).
#[allow(clippy::result_large_err)]
async fn websocket(tcp: TcpStream, client_id: String, clients: Clients) {
    let mut user = None;
    let callback = |request: &Request, response: Response| {
        user = user_of(request);
        Ok(response)
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async(tcp, callback).await else {
        return;
    };
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<String>();
    let hello = json!({"jsonrpc":"2.0","method":"sys.connected","params":{"client_id":client_id,"node_id":"test"}});
    let _ = tx.send(hello.to_string());
    clients.lock().expect("lock").insert(
        client_id.clone(),
        Client {
            user: user.clone(),
            tx: tx.clone(),
            channels: BTreeSet::new(),
        },
    );
    tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if sink.send(Message::text(m)).await.is_err() {
                break;
            }
        }
    });
    while let Some(Ok(msg)) = stream.next().await {
        let Message::Text(t) = msg else { continue };
        let Ok(req) = serde_json::from_str::<Value>(t.as_str()) else {
            continue;
        };
        let id = req["id"].clone();
        let params = req["params"].clone();
        let channel = params["channel"].as_str().unwrap_or_default().to_string();
        let result = match req["method"].as_str() {
            Some("self.reply") => params,
            Some("subscribe") => {
                if let Some(c) = clients.lock().expect("lock").get_mut(&client_id) {
                    c.channels.insert(channel.clone());
                }
                json!({ "channel": channel })
            }
            Some("publish") => publish(&clients, &channel, &params["data"]),
            Some("presence_stats") => {
                let all = clients.lock().expect("lock");
                let members: Vec<&Client> = all
                    .values()
                    .filter(|c| c.channels.contains(&channel))
                    .collect();
                let users: BTreeSet<&String> =
                    members.iter().filter_map(|c| c.user.as_ref()).collect();
                json!({"clients": members.len(), "users": users.len()})
            }
            Some("presence") => {
                let limit = params["limit"].as_u64().unwrap_or(100) as usize;
                let after = params["cursor"].as_str().map(str::to_string);
                let all = clients.lock().expect("lock");
                let mut page: Vec<Value> = all
                    .iter()
                    .filter(|(id, c)| {
                        c.channels.contains(&channel)
                            && after.as_ref().is_none_or(|a| id.as_str() > a.as_str())
                    })
                    .take(limit + 1)
                    .map(|(id, c)| json!({"client_id": id, "node_id": "test", "user": c.user}))
                    .collect();
                if page.len() > limit {
                    page.truncate(limit);
                    let cursor = page.last().map(|m| m["client_id"].clone());
                    json!({"clients": page, "cursor": cursor})
                } else {
                    json!({ "clients": page })
                }
            }
            _ => Value::Null,
        };
        let _ = tx.send(json!({"jsonrpc":"2.0","id":id,"result":result}).to_string());
    }
    clients.lock().expect("lock").remove(&client_id);
}

/// `POST /api`, keep-alive: send, publish, info.
async fn api(tcp: TcpStream, clients: Clients) {
    let mut r = BufReader::new(tcp);
    loop {
        let mut line = String::new();
        let mut length = 0usize;
        let mut authorized = false;
        if r.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        loop {
            line.clear();
            if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                return;
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                let value = value.trim();
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.parse().unwrap_or(0);
                } else if name.eq_ignore_ascii_case("authorization") {
                    authorized = value == format!("Bearer {API_KEY}");
                }
            }
        }
        let mut body = vec![0; length];
        if r.read_exact(&mut body).await.is_err() {
            return;
        }
        let (status, answer) = if authorized {
            let req: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let params = &req["params"];
            let result = match req["method"].as_str() {
                Some("send") => {
                    let users: BTreeSet<&str> = params["users"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(Value::as_str)
                        .collect();
                    let note =
                        json!({"jsonrpc":"2.0","method":"message.user","params":params["data"]})
                            .to_string();
                    let n = deliver(
                        &clients,
                        |c| c.user.as_deref().is_some_and(|u| users.contains(u)),
                        &note,
                    );
                    json!({ "devices": n })
                }
                Some("publish") => publish(
                    &clients,
                    params["channel"].as_str().unwrap_or_default(),
                    &params["data"],
                ),
                Some("info") => {
                    let n = clients.lock().expect("lock").len();
                    json!({"nodes": [{"node_id": "test", "connections": n}]})
                }
                _ => Value::Null,
            };
            (
                "200 OK",
                json!({"jsonrpc":"2.0","result":result,"id":req["id"]}).to_string(),
            )
        } else {
            ("401 Unauthorized", json!({"error": "invalid"}).to_string())
        };
        let response = format!(
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
            answer.len()
        );
        if r.get_mut().write_all(response.as_bytes()).await.is_err() {
            return;
        }
    }
}

fn common(url: &str) -> Common {
    let mut c = Common::new(vec![Target::parse(url).expect("url")]);
    c.label = "smoke".into();
    c.connect_timeout = Duration::from_secs(10);
    c
}

/// With tokens, and worker processes run from the built `chorus-bench`.
fn common_with_users(url: &str) -> Common {
    let mut c = common(url);
    c.jwt_secret = Some(SECRET.into());
    c.worker_exe = Some(env!("CARGO_BIN_EXE_chorus-bench").into());
    c
}

async fn check_rpc(url: &str) {
    let o = RpcOpts {
        conns: 4,
        depth: 3,
        requests: 50,
        duration: Duration::from_secs(10),
        ..RpcOpts::default()
    };
    let r = rpc::run(&common(url), &o).await;
    assert!(r.errors.is_empty(), "{}", r.to_table());
    assert_eq!(r.get("connections_ok"), Some(4.0), "{}", r.to_table());
    assert_eq!(r.get("requests_ok"), Some(200.0), "{}", r.to_table());
    assert!(r.get("requests_per_s").unwrap_or(0.0) > 0.0);
    assert!(r.get("latency_p99_ms").unwrap_or(0.0) > 0.0);
    let j = r.to_json();
    assert_eq!(j["scenario"], "rpc");
    assert_eq!(j["latency"]["all"]["count"], 200);
}

async fn check_fanout(url: &str) {
    let mut o = FanoutOpts::new(vec![8]);
    o.messages = 20;
    o.rate = 200.0;
    o.channel = "smoke:fanout".into();
    o.drain = Duration::from_secs(2);
    let r = fanout::run("fanout", &common(url), &o).await;
    assert!(r.errors.is_empty(), "{}", r.to_table());
    assert_eq!(r.get("subscribers"), Some(8.0), "{}", r.to_table());
    assert_eq!(r.get("published"), Some(20.0), "{}", r.to_table());
    assert_eq!(r.get("delivered"), Some(160.0), "{}", r.to_table());
    assert_eq!(r.get("lost"), Some(0.0));
    assert_eq!(r.get("duplicated"), Some(0.0));
    assert_eq!(r.get("warm_missing"), Some(0.0));
    assert!(r.get("deliveries_per_s").unwrap_or(0.0) > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_and_fanout_against_mini_server() {
    let url = mini_server().await;
    check_rpc(&url).await;
    check_fanout(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_against_mini_server() {
    let url = mini_server().await;
    let mut c = common_with_users(&url);
    c.jwt_grants = vec!["room:smoke".into()];
    let o = PresenceOpts {
        members: 30,
        channel: "room:smoke".into(),
        per_worker: 20,
        stats_calls: 10,
        walks: 2,
        page: 7,
        ..PresenceOpts::default()
    };
    let r = presence::run(&c, &o).await;
    let t = r.to_table();
    assert!(r.errors.is_empty(), "{t}");
    assert_eq!(r.get("members"), Some(30.0), "{t}");
    assert_eq!(r.get("join_failures"), Some(0.0), "{t}");
    assert!(r.get("joins_per_s").unwrap_or(0.0) > 0.0, "{t}");
    assert_eq!(r.get("stats_wrong"), Some(0.0), "{t}");
    // One measuring client (one URL), two walks of five pages (7, 7, 7, 7, 2).
    assert_eq!(r.get("walks"), Some(2.0), "{t}");
    assert_eq!(r.get("walks_exact"), Some(2.0), "{t}");
    assert_eq!(r.get("walk_missing"), Some(0.0), "{t}");
    assert_eq!(r.to_json()["latency"]["presence page"]["count"], 10, "{t}");
    assert_eq!(r.to_json()["latency"]["presence_stats"]["count"], 10, "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_against_mini_server() {
    let url = mini_server().await;
    let c = common_with_users(&url);
    let o = SendOpts {
        users: 20,
        targets: 4,
        messages: 40,
        rounds: 1,
        requests: 3,
        api_key: API_KEY.into(),
        drain: Duration::from_secs(2),
        ..SendOpts::default()
    };
    let r = send::run(&c, &o).await;
    let t = r.to_table();
    assert!(r.errors.is_empty(), "{t}");
    assert_eq!(r.get("connections_ok"), Some(24.0), "{t}");
    for mode in ["send", "publish"] {
        assert_eq!(r.get(&format!("{mode}_delivered")), Some(40.0), "{t}");
        assert_eq!(r.get(&format!("{mode}_lost")), Some(0.0), "{t}");
        assert_eq!(r.get(&format!("{mode}_duplicated")), Some(0.0), "{t}");
        assert_eq!(r.get(&format!("{mode}_misrouted")), Some(0.0), "{t}");
        assert_eq!(r.get(&format!("{mode}_api_errors")), Some(0.0), "{t}");
        assert!(
            r.get(&format!("{mode}_deliveries_per_s")).unwrap_or(0.0) > 0.0,
            "{t}"
        );
    }
    assert_eq!(r.get("send_devices_wrong"), Some(0.0), "{t}");
    assert_eq!(r.get("warm_missing"), Some(0.0), "{t}");
    assert!(r.get("send_to_publish_ratio").unwrap_or(0.0) > 0.0, "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_and_fanout_against_chorus_when_configured() {
    let Ok(url) = std::env::var("CHORUS_BENCH_URL") else {
        eprintln!("CHORUS_BENCH_URL not set: skipping the run against a real server");
        return;
    };
    check_rpc(&url).await;
    check_fanout(&url).await;
}

/// `sse` starts real `chorus` servers: the one the workspace build put beside this
/// test's directory (`target/<profile>/chorus`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_against_websocket_on_the_built_chorus() {
    let exe = std::env::current_exe().expect("test path");
    let bin = exe
        .parent()
        .and_then(std::path::Path::parent)
        .map(|dir| dir.join("chorus"))
        .expect("target dir");
    assert!(
        bin.is_file(),
        "{} is missing: build the workspace (cargo build --workspace --all-targets)",
        bin.display()
    );
    let o = chorus_bench::sse::SseOpts {
        subs: 20,
        messages: 5,
        rounds: 1,
        hold: Duration::from_millis(200),
        drain: Duration::from_secs(2),
        server_bin: Some(bin),
        ..chorus_bench::sse::SseOpts::default()
    };
    let r = chorus_bench::sse::run(&common("ws://127.0.0.1:1/ws"), &o).await;
    assert!(r.errors.is_empty(), "{}", r.to_table());
    assert_eq!(r.get("subscribers"), Some(20.0), "{}", r.to_table());
    for transport in ["ws", "sse"] {
        assert_eq!(
            r.get(&format!("{transport}_lost")),
            Some(0.0),
            "{}",
            r.to_table()
        );
        // RSS grows by pages: 20 connections may not show; the figure must be there.
        assert!(r.get(&format!("{transport}_bytes_per_conn")).is_some());
        assert!(
            r.get(&format!("{transport}_deliveries_per_s"))
                .unwrap_or(0.0)
                > 0.0
        );
    }
    assert!(r.get("sse_ws_memory_ratio").is_some());
}
