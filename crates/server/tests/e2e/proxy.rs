//! The backend proxy (section 13) against a real HTTP backend that each test starts
//! on port 0: identity from the connect proxy, methods relayed with the caller's id,
//! subscriptions with initial data, rewritten publications, and every failure answered
//! at once instead of hanging the connection.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::HeaderMap;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};

use crate::support::{Client, eventually, metric, raw_upgrade, server, ws_url};

/// One request the backend received.
#[derive(Debug)]
pub struct Seen {
    pub path: String,
    pub headers: HeaderMap,
    pub body: Value,
    pub raw: Bytes,
}

type Answer = Pin<Box<dyn Future<Output = (u16, Value)> + Send>>;
type Handler = Arc<dyn Fn(&Seen) -> Answer + Send + Sync>;

/// A backend on port 0: answers with `handler`, and reports every request it got.
pub async fn backend(handler: Handler) -> (SocketAddr, mpsc::UnboundedReceiver<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (seen_tx, seen_rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let handler = Arc::clone(&handler);
            let seen_tx = seen_tx.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request: Request<Incoming>| {
                    let handler = Arc::clone(&handler);
                    let seen_tx = seen_tx.clone();
                    async move {
                        let path = request.uri().path().to_owned();
                        let headers = request.headers().clone();
                        let bytes = request
                            .into_body()
                            .collect()
                            .await
                            .map(|body| body.to_bytes())
                            .unwrap_or_default();
                        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                        let seen = Seen {
                            path,
                            headers,
                            body,
                            raw: bytes,
                        };
                        let answer = handler(&seen);
                        let _ = seen_tx.send(seen);
                        let (status, value) = answer.await;
                        let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
                        *response.status_mut() =
                            hyper::StatusCode::from_u16(status).expect("a status");
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, seen_rx)
}

fn answer(status: u16, value: Value) -> Answer {
    Box::pin(std::future::ready((status, value)))
}

/// An address where nothing listens.
async fn nothing_listens() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("addr")
}

async fn next_seen(seen: &mut mpsc::UnboundedReceiver<Seen>) -> Seen {
    tokio::time::timeout(crate::support::PATIENCE, seen.recv())
        .await
        .expect("the backend is asked in time")
        .expect("backend running")
}

#[tokio::test]
async fn connect_proxy_decides_identity_and_grants() {
    let (backend, mut seen) = backend(Arc::new(|seen: &Seen| {
        match seen.body["token"].as_str() {
            Some("ann-token") => answer(
                200,
                json!({"user": "ann", "device": "ann-phone", "channels": ["room:*"], "info": {"name": "Ann"}}),
            ),
            Some("banned") => answer(200, json!({"error": {"code": 403, "message": "banned"}})),
            _ => answer(200, json!({"error": {"code": 401, "message": "who are you?"}})),
        }
    }))
    .await;
    let url = format!("http://{backend}/connect");
    let server = server(&[
        ("WS_PROXY_CONNECT_URL", &url),
        ("WS_PROXY_HEADERS", "cookie,x-app-version"),
    ])
    .await;
    let addr = server.local_addr;

    let mut ann = Client::connect_with(
        &format!("{}?token=ann-token&room=7", ws_url(addr)),
        &[
            ("cookie", "session=s1"),
            ("x-app-version", "3"),
            ("x-other", "no"),
        ],
    )
    .await;
    let params = &ann.greeting["params"];
    assert_eq!(params["user"], "ann");
    assert_eq!(params["device"], "ann-phone");
    let asked = next_seen(&mut seen).await;
    assert_eq!(asked.path, "/connect");
    assert_eq!(
        asked.body["client_id"],
        ann.client_id.as_str(),
        "the connection's id"
    );
    assert_eq!(asked.body["token"], "ann-token");
    assert_eq!(
        asked.body["query"],
        json!({"room": "7"}),
        "without the token"
    );
    assert_eq!(
        asked.body["headers"],
        json!({"cookie": "session=s1", "x-app-version": "3"})
    );
    assert_eq!(asked.body["remote_addr"], "127.0.0.1");
    assert_eq!(asked.headers["x-chorus-proxy"], "connect");
    assert_eq!(
        asked.headers["cookie"], "session=s1",
        "named headers go along"
    );
    assert!(asked.headers.get("x-other").is_none());

    ann.ok("subscribe", json!({"channel": "room:1"})).await;
    let refused = ann.call("subscribe", json!({"channel": "lobby"})).await;
    assert_eq!(refused["error"]["code"], -32003, "{refused}");

    let who = raw_upgrade(addr, "/ws?token=nobody", &[]).await;
    assert_eq!(who.status, 401);
    assert_eq!(
        serde_json::from_str::<Value>(&who.body).expect("json"),
        json!({"error": "who are you?"})
    );
    let banned = raw_upgrade(addr, "/ws?token=banned", &[]).await;
    assert_eq!(banned.status, 403);
    assert_eq!(
        serde_json::from_str::<Value>(&banned.body).expect("json"),
        json!({"error": "banned"})
    );
    assert!(
        metric(
            addr,
            "ws_proxy_requests_total{outcome=\"refused\",proxy=\"connect\"}"
        )
        .await
            >= 2.0
    );
    assert!(
        metric(
            addr,
            "ws_proxy_requests_total{outcome=\"ok\",proxy=\"connect\"}"
        )
        .await
            >= 1.0
    );
}

#[tokio::test]
async fn connect_backend_down_is_503_and_a_bad_answer_too() {
    let down = nothing_listens().await;
    let url = format!("http://{down}/connect");
    let server = server(&[("WS_PROXY_CONNECT_URL", &url)]).await;
    let refused = raw_upgrade(server.local_addr, "/ws", &[]).await;
    assert_eq!(refused.status, 503);
    assert!(refused.body.contains("error"), "{}", refused.body);
    assert!(
        metric(
            server.local_addr,
            "ws_proxy_requests_total{outcome=\"error\",proxy=\"connect\"}"
        )
        .await
            >= 1.0
    );

    let (failing, _seen) = backend(Arc::new(|_: &Seen| answer(500, json!({"user": "x"})))).await;
    let url = format!("http://{failing}/connect");
    let server = crate::support::server(&[("WS_PROXY_CONNECT_URL", &url)]).await;
    assert_eq!(raw_upgrade(server.local_addr, "/ws", &[]).await.status, 503);
    let (garbled, _seen) = backend(Arc::new(|_: &Seen| answer(200, json!("not an object")))).await;
    let url = format!("http://{garbled}/connect");
    let server = crate::support::server(&[("WS_PROXY_CONNECT_URL", &url)]).await;
    assert_eq!(raw_upgrade(server.local_addr, "/ws", &[]).await.status, 503);
}

/// An rpc backend: `echo` returns what it got, `fail` an application error, `slow`
/// waits for a permit.
fn rpc_handler(slow: Arc<Semaphore>) -> Handler {
    Arc::new(move |seen: &Seen| {
        let body = seen.body.clone();
        let slow = Arc::clone(&slow);
        Box::pin(async move {
            let id = body.get("id").cloned().unwrap_or(Value::Null);
            match body["method"].as_str() {
                Some("echo") => (
                    200,
                    json!({"jsonrpc": "2.0", "result": {"params": body["params"], "caller": body["caller"], "id_seen": id}, "id": id}),
                ),
                Some("fail") => (
                    200,
                    json!({"jsonrpc": "2.0", "error": {"code": 4001, "message": "nope", "data": {"why": "because"}}, "id": id}),
                ),
                Some("slow") => {
                    let _permit = slow.acquire().await;
                    (200, json!({"jsonrpc": "2.0", "result": "late", "id": id}))
                }
                _ => (200, json!({"jsonrpc": "2.0", "result": null, "id": id})),
            }
        })
    })
}

#[tokio::test]
async fn unknown_methods_are_relayed_with_the_callers_id() {
    let slow = Arc::new(Semaphore::new(0));
    let (backend, mut seen) = backend(rpc_handler(Arc::clone(&slow))).await;
    let url = format!("http://{backend}/rpc");
    let server = server(&[("WS_PROXY_RPC_URL", &url), ("WS_PROXY_TIMEOUT", "10s")]).await;
    let mut client = Client::connect(server.local_addr).await;

    client
        .send_text(r#"{"jsonrpc":"2.0","method":"echo","params":{"a":[1,2]},"id":7}"#)
        .await;
    let reply = client.recv().await;
    assert_eq!(reply["id"], 7);
    assert_eq!(reply["result"]["params"], json!({"a": [1, 2]}));
    assert_eq!(
        reply["result"]["id_seen"], 7,
        "the backend sees the caller's id"
    );
    assert_eq!(
        reply["result"]["caller"]["client_id"],
        client.client_id.as_str()
    );
    client
        .send_text(r#"{"jsonrpc":"2.0","method":"echo","params":[1],"id":"abc"}"#)
        .await;
    let reply = client.recv().await;
    assert_eq!(reply["id"], "abc");
    assert_eq!(reply["result"]["id_seen"], "abc");

    client
        .send_text(r#"{"jsonrpc":"2.0","method":"fail","id":8}"#)
        .await;
    let reply = client.recv().await;
    assert_eq!(
        reply,
        json!({"jsonrpc": "2.0", "error": {"code": 4001, "message": "nope", "data": {"why": "because"}}, "id": 8}),
        "relayed unchanged"
    );

    // A notification goes to the backend too, and nothing comes back.
    while seen.try_recv().is_ok() {}
    client
        .send_text(r#"{"jsonrpc":"2.0","method":"note","params":{"n":1}}"#)
        .await;
    let asked = next_seen(&mut seen).await;
    assert_eq!(asked.body["method"], "note");
    assert!(asked.body.get("id").is_none(), "{}", asked.body);
    client.assert_nothing_pending().await;

    // A batch: each element on its own, local and relayed side by side.
    client
        .send_text(r#"[{"jsonrpc":"2.0","method":"echo","params":{"x":1},"id":1},{"jsonrpc":"2.0","method":"ping","id":2}]"#)
        .await;
    let batch = client.recv().await;
    let batch = batch.as_array().expect("an array");
    assert_eq!(batch.len(), 2);
    assert!(
        batch
            .iter()
            .any(|reply| reply["id"] == 1 && reply["result"]["params"] == json!({"x": 1}))
    );
    assert!(
        batch
            .iter()
            .any(|reply| reply["id"] == 2 && reply["result"] == "pong")
    );

    // A slow backend does not hold up the client's other calls.
    client
        .send_text(r#"{"jsonrpc":"2.0","method":"slow","id":"s"}"#)
        .await;
    client
        .send_text(r#"{"jsonrpc":"2.0","method":"ping","id":"p"}"#)
        .await;
    let first = client.recv().await;
    assert_eq!(
        first["id"], "p",
        "ping answered while the backend works: {first}"
    );
    slow.add_permits(1);
    let late = client.recv().await;
    assert_eq!(late, json!({"jsonrpc": "2.0", "result": "late", "id": "s"}));

    // Known methods never reach the backend.
    while seen.try_recv().is_ok() {}
    client.ok("ping", Value::Null).await;
    assert!(seen.try_recv().is_err());
    assert!(
        metric(
            server.local_addr,
            "ws_proxy_requests_total{outcome=\"ok\",proxy=\"rpc\"}"
        )
        .await
            >= 5.0
    );
}

#[tokio::test]
async fn a_slow_backend_times_out_while_ping_is_answered() {
    let slow = Arc::new(Semaphore::new(0));
    let (backend, _seen) = backend(rpc_handler(slow)).await;
    let url = format!("http://{backend}/rpc");
    let server = server(&[("WS_PROXY_RPC_URL", &url), ("WS_PROXY_TIMEOUT", "300ms")]).await;
    let mut client = Client::connect(server.local_addr).await;
    client
        .send_text(r#"{"jsonrpc":"2.0","method":"slow","id":1}"#)
        .await;
    client
        .send_text(r#"{"jsonrpc":"2.0","method":"ping","id":2}"#)
        .await;
    assert_eq!(client.recv().await["id"], 2);
    let timed_out = client.recv().await;
    assert_eq!(timed_out["id"], 1);
    assert_eq!(timed_out["error"]["code"], -32053, "{timed_out}");
    assert_eq!(timed_out["error"]["data"], json!({"proxy": "rpc"}));
    assert_eq!(
        metric(
            server.local_addr,
            "ws_proxy_requests_total{outcome=\"timeout\",proxy=\"rpc\"}"
        )
        .await,
        1.0
    );

    // Down: -32053 as well, at once.
    let down = nothing_listens().await;
    let url = format!("http://{down}/rpc");
    let server = crate::support::server(&[("WS_PROXY_RPC_URL", &url)]).await;
    let mut client = Client::connect(server.local_addr).await;
    let reply = client.call("anything", json!({})).await;
    assert_eq!(reply["error"]["code"], -32053, "{reply}");
    assert_eq!(reply["error"]["data"], json!({"proxy": "rpc"}));
}

#[tokio::test]
async fn a_connection_has_at_most_16_proxy_calls_in_flight() {
    let slow = Arc::new(Semaphore::new(0));
    let (backend, _seen) = backend(rpc_handler(Arc::clone(&slow))).await;
    let url = format!("http://{backend}/rpc");
    let server = server(&[("WS_PROXY_RPC_URL", &url), ("WS_PROXY_TIMEOUT", "10s")]).await;
    let mut client = Client::connect(server.local_addr).await;
    for id in 0..17 {
        client
            .send_text(&json!({"jsonrpc": "2.0", "method": "slow", "id": id}).to_string())
            .await;
    }
    let busy = client.recv().await;
    assert_eq!(busy["id"], 16, "{busy}");
    assert_eq!(busy["error"]["code"], -32053);
    assert_eq!(busy["error"]["data"]["reason"], "busy");
    slow.add_permits(16);
    for _ in 0..16 {
        assert_eq!(client.recv().await["result"], "late");
    }
}

#[tokio::test]
async fn subscribe_proxy_sends_its_data_first_then_what_was_published_meanwhile() {
    let hold = Arc::new(Semaphore::new(0));
    let held = Arc::clone(&hold);
    let (backend, mut seen) = backend(Arc::new(move |seen: &Seen| {
        let body = seen.body.clone();
        let hold = Arc::clone(&held);
        Box::pin(async move {
            match body["channel"].as_str() {
                Some("doc:1") => {
                    let _permit = hold.acquire().await;
                    (200, json!({"allow": true, "data": {"state": 1, "user": body["caller"]["user"]}}))
                }
                Some("doc:plain") => (200, json!({"allow": true})),
                _ => (200, json!({"allow": false, "reason": "no access"})),
            }
        })
    }))
    .await;
    let url = format!("http://{backend}/subscribe");
    let server = server(&[("WS_PROXY_SUBSCRIBE_URL", &url)]).await;
    let mut reader = Client::connect(server.local_addr).await;
    let mut writer = Client::connect(server.local_addr).await;

    reader
        .send_text(r#"{"jsonrpc":"2.0","method":"subscribe","params":{"channel":"doc:1"},"id":1}"#)
        .await;
    let asked = next_seen(&mut seen).await;
    assert_eq!(asked.body["channel"], "doc:1");
    assert_eq!(asked.body["params"], json!({"channel": "doc:1"}));
    assert_eq!(asked.body["caller"]["client_id"], reader.client_id.as_str());
    // Published while the backend decides: held until its data has been sent.
    writer
        .ok("publish", json!({"channel": "doc:1", "data": "live"}))
        .await;
    hold.add_permits(1);
    assert_eq!(
        reader.recv().await,
        json!({"jsonrpc": "2.0", "result": {"channel": "doc:1"}, "id": 1})
    );
    let initial = reader.recv().await;
    assert_eq!(initial["method"], "message");
    assert_eq!(
        initial["params"],
        json!({"channel": "doc:1", "data": {"state": 1, "user": null}})
    );
    assert_eq!(reader.recv().await["params"]["data"], "live");
    writer
        .ok("publish", json!({"channel": "doc:1", "data": "after"}))
        .await;
    assert_eq!(reader.recv().await["params"]["data"], "after");

    reader
        .ok("subscribe", json!({"channel": "doc:plain"}))
        .await;
    writer
        .ok("publish", json!({"channel": "doc:plain", "data": "x"}))
        .await;
    assert_eq!(
        reader.recv().await["params"]["data"],
        "x",
        "no data: nothing before"
    );

    let refused = reader
        .call("subscribe", json!({"channel": "vault:1"}))
        .await;
    assert_eq!(refused["error"]["code"], -32003, "{refused}");
    assert_eq!(
        refused["error"]["data"],
        json!({"channel": "vault:1", "reason": "no access"})
    );
    writer
        .ok("publish", json!({"channel": "vault:1", "data": "secret"}))
        .await;
    reader.assert_nothing_pending().await;
    assert_eq!(
        metric(
            server.local_addr,
            "ws_proxy_requests_total{outcome=\"refused\",proxy=\"subscribe\"}"
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn on_a_history_channel_the_recovery_comes_first_then_the_data_then_live() {
    let (backend, _seen) = backend(Arc::new(|_: &Seen| {
        answer(200, json!({"allow": true, "data": "snapshot"}))
    }))
    .await;
    let url = format!("http://{backend}/subscribe");
    let server = server(&[
        ("WS_PROXY_SUBSCRIBE_URL", &url),
        ("WS_NAMESPACES", r#"{"hist": {"history_size": 10}}"#),
    ])
    .await;
    let mut writer = Client::connect(server.local_addr).await;
    let first = writer
        .ok("publish", json!({"channel": "hist:1", "data": "one"}))
        .await;
    let mut reader = Client::connect(server.local_addr).await;
    let since = json!({"offset": 0, "epoch": first["epoch"]});
    let reply = reader
        .ok("subscribe", json!({"channel": "hist:1", "since": since}))
        .await;
    assert_eq!(reply["recovered"], true, "{reply}");
    assert_eq!(reply["publications"][0]["data"], "one");
    let data = reader.recv().await;
    assert_eq!(
        data["params"],
        json!({"channel": "hist:1", "data": "snapshot"})
    );
    writer
        .ok("publish", json!({"channel": "hist:1", "data": "two"}))
        .await;
    let live = reader.recv().await;
    assert_eq!(live["params"]["data"], "two");
    assert_eq!(live["params"]["offset"], 2);
}

#[tokio::test]
async fn named_headers_of_the_upgrade_go_with_every_proxy_request() {
    let (backend, mut seen) = backend(rpc_handler(Arc::new(Semaphore::new(0)))).await;
    let url = format!("http://{backend}/rpc");
    let server = server(&[("WS_PROXY_RPC_URL", &url), ("WS_PROXY_HEADERS", "Cookie")]).await;
    let mut client = Client::connect_with(
        &ws_url(server.local_addr),
        &[
            ("cookie", "session=abc"),
            ("authorization", "Bearer not-forwarded"),
        ],
    )
    .await;
    client.ok("echo", json!({})).await;
    let asked = next_seen(&mut seen).await;
    assert_eq!(asked.headers["cookie"], "session=abc");
    assert!(asked.headers.get("authorization").is_none());
    assert_eq!(asked.headers["x-chorus-proxy"], "rpc");
    assert!(
        asked.headers.get("x-chorus-signature").is_none(),
        "unsigned without WS_PROXY_SECRET"
    );
}

#[tokio::test]
async fn publish_proxy_rewrites_or_refuses() {
    let (backend, _seen) = backend(Arc::new(|seen: &Seen| {
        let body = &seen.body;
        if body["channel"] == "chat:locked" {
            return answer(200, json!({"allow": false, "reason": "locked"}));
        }
        let text = body["data"]["text"]
            .as_str()
            .unwrap_or_default()
            .to_uppercase();
        answer(
            200,
            json!({"allow": true, "data": {"text": text, "from": body["caller"]["client_id"]}}),
        )
    }))
    .await;
    let url = format!("http://{backend}/publish");
    let server = server(&[("WS_PROXY_PUBLISH_URL", &url)]).await;
    let mut reader = Client::connect(server.local_addr).await;
    let mut writer = Client::connect(server.local_addr).await;
    reader.ok("subscribe", json!({"channel": "chat:1"})).await;
    reader
        .ok("subscribe", json!({"channel": "chat:locked"}))
        .await;

    let result = writer
        .ok(
            "publish",
            json!({"channel": "chat:1", "data": {"text": "hi"}}),
        )
        .await;
    assert_eq!(result, json!({"channel": "chat:1"}));
    assert_eq!(
        reader.recv().await["params"]["data"],
        json!({"text": "HI", "from": writer.client_id})
    );
    let refused = writer
        .call(
            "publish",
            json!({"channel": "chat:locked", "data": {"text": "hi"}}),
        )
        .await;
    assert_eq!(refused["error"]["code"], -32003);
    assert_eq!(
        refused["error"]["data"],
        json!({"channel": "chat:locked", "reason": "locked"})
    );
    reader.assert_nothing_pending().await;
}

#[tokio::test]
async fn the_circuit_breaker_opens_while_the_backend_fails_and_closes_after() {
    let failing = Arc::new(AtomicBool::new(true));
    let asked = Arc::new(AtomicUsize::new(0));
    let (state, count) = (Arc::clone(&failing), Arc::clone(&asked));
    let (backend, _seen) = backend(Arc::new(move |seen: &Seen| {
        count.fetch_add(1, Ordering::SeqCst);
        let id = seen.body["id"].clone();
        if state.load(Ordering::SeqCst) {
            answer(500, json!({}))
        } else {
            answer(200, json!({"jsonrpc": "2.0", "result": "fine", "id": id}))
        }
    }))
    .await;
    let url = format!("http://{backend}/rpc");
    let server = server(&[
        ("WS_PROXY_RPC_URL", &url),
        ("WS_PROXY_BREAKER_FAILURES", "3"),
        ("WS_PROXY_BREAKER_COOLDOWN", "200ms"),
    ])
    .await;
    let addr = server.local_addr;
    let mut client = Client::connect(addr).await;
    for _ in 0..3 {
        let reply = client.call("app.thing", json!({})).await;
        assert_eq!(reply["error"]["code"], -32053, "{reply}");
    }
    assert_eq!(asked.load(Ordering::SeqCst), 3);
    let open = client.call("app.thing", json!({})).await;
    assert_eq!(open["error"]["code"], -32053);
    assert!(
        open["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("circuit open"),
        "{open}"
    );
    assert_eq!(
        asked.load(Ordering::SeqCst),
        3,
        "answered without asking the backend"
    );
    assert!(
        metric(
            addr,
            "ws_proxy_requests_total{outcome=\"circuit_open\",proxy=\"rpc\"}"
        )
        .await
            >= 1.0
    );

    failing.store(false, Ordering::SeqCst);
    eventually(
        "the breaker lets a request through and closes",
        || async move {
            let mut client = Client::connect(addr).await;
            client.call("app.thing", json!({})).await["result"] == "fine"
        },
    )
    .await;
    assert_eq!(client.ok("app.thing", json!({})).await, "fine");
}

#[tokio::test]
async fn proxy_requests_are_signed_with_the_secret() {
    let (backend, mut seen) = backend(Arc::new(|_: &Seen| {
        answer(200, json!({"jsonrpc": "2.0", "result": 1, "id": 1}))
    }))
    .await;
    let url = format!("http://{backend}/rpc");
    let secret = "a proxy secret that is long";
    let server = server(&[("WS_PROXY_RPC_URL", &url), ("WS_PROXY_SECRET", secret)]).await;
    let mut client = Client::connect(server.local_addr).await;
    client.ok("app.signed", json!([1])).await;
    let asked = next_seen(&mut seen).await;
    let signature = asked.headers["x-chorus-signature"].to_str().expect("text");
    assert_eq!(
        signature,
        chorus_server::webhook::signature(secret.as_bytes(), &asked.raw),
        "HMAC-SHA256 of the body with WS_PROXY_SECRET"
    );
}

#[tokio::test]
async fn a_connect_url_with_auth_enabled_is_refused() {
    let err = chorus_server::Config::from_vars(
        [
            ("WS_PROXY_CONNECT_URL", "http://app/connect"),
            ("WS_AUTH_ENABLED", "true"),
            ("WS_BEARER_TOKENS", "sixteen-chars-token"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    )
    .expect_err("refused");
    assert_eq!(err.variable, "WS_PROXY_CONNECT_URL");
}
