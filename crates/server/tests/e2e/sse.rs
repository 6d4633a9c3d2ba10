//! Section 12 over raw HTTP: `/events` streams the notifications a WebSocket client
//! gets, resumes from `Last-Event-ID`, and is a hub client like any other (tokens,
//! grants, `send`, `kick`, drain, metrics, CORS).

use std::net::SocketAddr;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;

use crate::support::{Client, PATIENCE, UNLIMITED_PUBLISHING, eventually, metric, server};
use crate::users::{API_KEY, SECRET, api, token, token_with};

/// One event as the stream carried it.
#[derive(Debug, Default)]
pub struct Event {
    pub event: String,
    pub id: Option<String>,
    pub retry: Option<u64>,
    /// The `data:` lines joined with `\n`, as EventSource does.
    pub text: String,
}

impl Event {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).expect("data is JSON")
    }
}

/// An event stream read over HTTP/1.0, so the body is the raw stream (no chunking).
pub struct Stream {
    pub status: u16,
    pub head: String,
    pub body: String,
    lines: Lines<BufReader<OwnedReadHalf>>,
    _write: tokio::net::tcp::OwnedWriteHalf,
}

impl Stream {
    pub async fn open(addr: SocketAddr, target: &str, headers: &[(&str, &str)]) -> Self {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (read, mut write) = stream.into_split();
        let mut request = format!("GET {target} HTTP/1.0\r\nHost: {addr}\r\n");
        for (name, value) in headers {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        write.write_all(request.as_bytes()).await.expect("write");
        let mut lines = BufReader::new(read).lines();
        let mut head = String::new();
        loop {
            let line = tokio::time::timeout(PATIENCE, lines.next_line())
                .await
                .expect("head in time")
                .expect("read")
                .expect("a head");
            if line.is_empty() {
                break;
            }
            head.push_str(&line);
            head.push('\n');
        }
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .expect("status line");
        let mut stream = Self {
            status,
            head,
            body: String::new(),
            lines,
            _write: write,
        };
        if status != 200 {
            while let Ok(Some(line)) = stream.lines.next_line().await {
                stream.body.push_str(&line);
            }
        }
        stream
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }

    /// The next event (comments skipped); `None` when the stream ended.
    pub async fn next(&mut self) -> Option<Event> {
        let mut event = Event::default();
        let mut data = Vec::new();
        loop {
            let line = tokio::time::timeout(PATIENCE, self.lines.next_line())
                .await
                .expect("an event in time")
                .ok()
                .flatten()?;
            if line.is_empty() {
                if data.is_empty() && event.event.is_empty() {
                    continue;
                }
                event.text = data.join("\n");
                return Some(event);
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((&line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value).to_owned();
            match field {
                "event" => event.event = value,
                "id" => event.id = Some(value),
                "retry" => event.retry = value.parse().ok(),
                "data" => data.push(value),
                other => panic!("unexpected field {other:?}"),
            }
        }
    }

    /// The next comment line, skipping events.
    pub async fn next_comment(&mut self) -> String {
        loop {
            let line = tokio::time::timeout(PATIENCE, self.lines.next_line())
                .await
                .expect("a line in time")
                .expect("read")
                .expect("stream open");
            if line.starts_with(':') {
                return line;
            }
        }
    }

    /// The next event named `name`, skipping others.
    pub async fn next_named(&mut self, name: &str) -> Event {
        loop {
            let event = self.next().await.expect("stream open");
            if event.event == name {
                return event;
            }
        }
    }
}

const HISTORY: &str = r#"{"h": {"history_size": 100}}"#;

#[tokio::test]
async fn a_stream_carries_websocket_bytes_and_resumes_from_last_event_id() {
    let mut vars = vec![("WS_NAMESPACES", HISTORY)];
    vars.extend(UNLIMITED_PUBLISHING);
    let server = server(&vars).await;
    let addr = server.local_addr;
    let mut stream = Stream::open(addr, "/events?channel=h:1&channel=plain", &[]).await;
    assert_eq!(stream.status, 200, "{}", stream.body);
    assert!(
        stream
            .header("content-type")
            .is_some_and(|v| v.starts_with("text/event-stream"))
    );
    let connected = stream.next().await.expect("greeting");
    assert_eq!(connected.event, "sys.connected");
    assert_eq!(connected.json()["method"], "sys.connected");
    let history = stream.next().await.expect("subscribed");
    assert_eq!(history.event, "sys.subscribed");
    let params = &history.json()["params"];
    assert_eq!(params["channel"], "h:1");
    assert_eq!(params["offset"], 0);
    assert!(history.id.is_some(), "a history channel's event has an id");
    let plain = stream.next().await.expect("subscribed");
    assert_eq!(plain.json()["params"], json!({"channel": "plain"}));
    assert_eq!(metric(addr, "ws_connections_active").await, 1.0);

    // A WebSocket subscriber gets the same bytes.
    let mut watcher = Client::connect(addr).await;
    watcher.ok("subscribe", json!({"channel": "h:1"})).await;
    let mut publisher = Client::connect(addr).await;
    let mut last_id = None;
    for n in 1..=3 {
        // Raw newlines in data (the publisher's own JSON formatting) survive.
        let text = format!(
            r#"{{"jsonrpc":"2.0","id":"raw-{n}","method":"publish","params":{{"channel":"h:1","data":{{"n":{n},
"x":"a\nb"}}}}}}"#
        );
        publisher.send_text(&text).await;
        let event = stream.next().await.expect("publication");
        assert_eq!(event.event, "message");
        assert_eq!(event.text, watcher.recv_text().await, "the WebSocket bytes");
        assert_eq!(event.json()["params"]["offset"], n);
        last_id = event.id;
    }
    publisher
        .ok("publish", json!({"channel": "plain", "data": 1}))
        .await;
    let plain = stream.next_named("message").await;
    assert_eq!(
        plain.json()["params"],
        json!({"channel": "plain", "data": 1})
    );
    assert!(plain.id.is_none(), "no id on a channel without history");

    // The stream drops; two publications are missed; Last-Event-ID brings exactly them.
    let resume_from = last_id.expect("the publications had ids");
    drop(stream);
    eventually("the stream to be gone", || async {
        metric(addr, "ws_connections_active").await == 2.0
    })
    .await;
    for n in 4..=5 {
        publisher
            .ok("publish", json!({"channel": "h:1", "data": {"n": n}}))
            .await;
    }
    let mut resumed = Stream::open(
        addr,
        "/events?channel=h:1&last_event_id=h:1~0~ignored",
        &[("Last-Event-ID", &resume_from)],
    )
    .await;
    resumed.next_named("sys.connected").await;
    let subscribed = resumed.next().await.expect("subscribed");
    assert_eq!(subscribed.event, "sys.subscribed");
    assert_eq!(subscribed.json()["params"]["recovered"], true);
    assert_eq!(subscribed.json()["params"]["offset"], 5);
    for n in 4..=5 {
        let event = resumed.next().await.expect("recovered");
        assert_eq!(event.event, "message");
        assert_eq!(event.json()["params"]["data"], json!({"n": n}));
        assert_eq!(event.json()["params"]["offset"], n);
        assert!(
            event
                .id
                .as_deref()
                .is_some_and(|id| id.contains(&format!("h:1~{n}~")))
        );
    }
    publisher
        .ok("publish", json!({"channel": "h:1", "data": {"n": 6}}))
        .await;
    let live = resumed.next().await.expect("live");
    assert_eq!(live.json()["params"]["offset"], 6);

    // An unknown epoch cannot be resumed: said, never guessed.
    let mut stale = Stream::open(addr, "/events?channel=h:1&last_event_id=h:1~2~other", &[]).await;
    stale.next_named("sys.connected").await;
    let subscribed = stale.next().await.expect("subscribed");
    assert_eq!(subscribed.json()["params"]["recovered"], false);
    server.shutdown().await;
}

#[tokio::test]
async fn bad_requests_origins_and_grants_are_refused_before_the_stream() {
    let server = server(&[
        ("WS_AUTH_ENABLED", "true"),
        ("WS_JWT_SECRET", SECRET),
        ("WS_ALLOWED_ORIGINS", "https://app.example"),
    ])
    .await;
    let addr = server.local_addr;
    let alice = token("alice", None);
    let with_token = |query: &str| format!("/events?{query}&token={alice}");

    let missing = Stream::open(addr, "/events?channel=a", &[]).await;
    assert_eq!(missing.status, 401);
    assert!(missing.body.contains("error"), "{}", missing.body);
    let none = Stream::open(addr, &with_token("x=1"), &[]).await;
    assert_eq!(none.status, 400);
    let bad = Stream::open(addr, &with_token("channel=no%20spaces"), &[]).await;
    assert_eq!(bad.status, 400);
    let evil = Stream::open(
        addr,
        &with_token("channel=a"),
        &[("Origin", "https://evil.example")],
    )
    .await;
    assert_eq!(evil.status, 403);
    let limited = token_with("bob", None, Some(vec!["mine:*".into()]));
    let forbidden = Stream::open(
        addr,
        &format!("/events?channel=mine:1&channel=yours:1&token={limited}"),
        &[],
    )
    .await;
    assert_eq!(forbidden.status, 403);
    let body: Value = serde_json::from_str(&forbidden.body).expect("JSON");
    assert_eq!(body["channel"], "yours:1");

    let mut allowed = Stream::open(
        addr,
        &with_token("channel=a"),
        &[("Origin", "https://app.example")],
    )
    .await;
    assert_eq!(allowed.status, 200);
    assert_eq!(
        allowed.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    // A preflight, for clients that send the token in a header from another origin.
    let (status, head) = {
        let mut socket = TcpStream::connect(addr).await.expect("connect");
        socket
            .write_all(
                format!(
                    "OPTIONS /events?channel=a HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
                     Origin: https://app.example\r\nAccess-Control-Request-Method: GET\r\n\
                     Access-Control-Request-Headers: authorization\r\n\r\n"
                )
                .as_bytes(),
            )
            .await
            .expect("write");
        let mut raw = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut socket, &mut raw)
            .await
            .expect("read");
        let status: u16 = raw
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .expect("status");
        (status, raw.to_ascii_lowercase())
    };
    assert_eq!(status, 204, "{head}");
    assert!(
        head.contains("access-control-allow-origin: https://app.example"),
        "{head}"
    );
    assert!(
        head.contains("access-control-allow-headers: authorization, last-event-id"),
        "{head}"
    );
    // The header works as well as the query.
    let mut by_header = Stream::open(
        addr,
        "/events?channel=a",
        &[("Authorization", &format!("Bearer {alice}"))],
    )
    .await;
    assert_eq!(by_header.status, 200);
    let greeting = by_header.next().await.expect("greeting").json();
    assert_eq!(greeting["params"]["user"], "alice");
    allowed.next_named("sys.subscribed").await;
    server.shutdown().await;
}

#[tokio::test]
async fn send_reaches_a_stream_kick_ends_it_and_drain_says_when_to_retry() {
    let mut vars = vec![
        ("WS_AUTH_ENABLED", "true"),
        ("WS_JWT_SECRET", SECRET),
        ("WS_API_KEY", API_KEY),
        ("WS_SHUTDOWN_GRACE", "2s"),
    ];
    vars.extend(UNLIMITED_PUBLISHING);
    let server = server(&vars).await;
    let addr = server.local_addr;
    let target = format!("/events?channel=news&token={}", token("carol", Some("tab")));
    let mut stream = Stream::open(addr, &target, &[]).await;
    assert_eq!(stream.status, 200);
    stream.next_named("sys.subscribed").await;

    // A stream is a client like any other: presence knows the user and device.
    let info = api(addr, "info", json!({"user": "carol"})).await;
    assert_eq!(info["online"], true, "{info}");
    assert_eq!(info["devices"][0]["device"], "tab", "{info}");
    let sent = api(
        addr,
        "send",
        json!({"users": ["carol"], "event": "note", "data": {"hi": 1}}),
    )
    .await;
    assert_eq!(sent["devices"], 1);
    let note = stream.next().await.expect("sent");
    assert_eq!(note.event, "note");
    assert_eq!(note.json()["params"], json!({"hi": 1}));

    let kicked = api(addr, "kick", json!({"users": ["carol"], "reason": "bye"})).await;
    assert_eq!(kicked["kicked"], 1);
    let notice = stream.next().await.expect("kick notice");
    assert_eq!(notice.event, "sys.kick");
    assert!(
        stream.next().await.is_none(),
        "the stream ends after a kick"
    );

    // Drain: sys.shutdown carries `retry:` with the announced delay, then the end.
    let mut stream = Stream::open(addr, &target, &[]).await;
    stream.next_named("sys.subscribed").await;
    let app = std::sync::Arc::clone(&server.app);
    let drain = tokio::spawn(async move { app.drain().await });
    let shutdown = stream.next_named("sys.shutdown").await;
    let announced = shutdown.json()["params"]["reconnect_after_ms"]
        .as_u64()
        .expect("delay");
    assert_eq!(shutdown.retry, Some(announced));
    assert!(stream.next().await.is_none());
    drain.await.expect("drained");
    assert_eq!(
        Stream::open(addr, &target, &[]).await.status,
        503,
        "no new stream while draining"
    );
}

#[tokio::test]
async fn a_jwt_stream_ends_at_its_expiry_with_sys_token_expired() {
    let server = server(&[
        ("WS_AUTH_ENABLED", "true"),
        ("WS_JWT_SECRET", SECRET),
        ("WS_JWT_LEEWAY", "0s"),
    ])
    .await;
    let addr = server.local_addr;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let short = chorus_gate::mint_hs256(
        SECRET.as_bytes(),
        &chorus_gate::TokenClaims {
            sub: "dave".into(),
            iat: now,
            exp: now + 2,
            ..chorus_gate::TokenClaims::default()
        },
    )
    .expect("token");
    let mut stream = Stream::open(addr, &format!("/events?channel=a&token={short}"), &[]).await;
    assert_eq!(stream.status, 200, "{}", stream.body);
    let expired = stream.next_named("sys.token_expired").await;
    assert_eq!(expired.json()["method"], "sys.token_expired");
    assert!(stream.next().await.is_none(), "the stream ends at exp");
    server.shutdown().await;
}

#[tokio::test]
async fn a_stream_that_is_not_read_is_dropped_as_a_slow_consumer() {
    let mut vars = vec![
        ("WS_MAX_PUBLISH_SIZE", "8KiB"),
        ("WS_SEND_BUFFER", "32KiB"),
        ("WS_WRITE_TIMEOUT", "1s"),
    ];
    vars.extend(UNLIMITED_PUBLISHING);
    let server = server(&vars).await;
    let addr = server.local_addr;
    // A reader that stops reading: a tiny receive buffer, and nothing read after the head.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut stalled = socket.connect(addr).await.expect("connect");
    stalled
        .write_all(format!("GET /events?channel=flood HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut publisher = Client::connect(addr).await;
    eventually("the stream to be subscribed", || async {
        metric(addr, "ws_connections_active").await == 2.0
    })
    .await;
    let data = "x".repeat(4000);
    let mut published = 0;
    while metric(addr, "ws_slow_consumer_drops_total").await < 1.0 {
        assert!(published < 2000, "the stalled stream was never dropped");
        for _ in 0..20 {
            publisher
                .ok("publish", json!({"channel": "flood", "data": data}))
                .await;
        }
        published += 20;
    }
    eventually("the stalled stream to be gone", || async {
        metric(addr, "ws_connections_active").await == 1.0
    })
    .await;
    // Its socket is closed, not left to the kernel's timeouts.
    let mut sink = vec![0u8; 1 << 16];
    let closed = tokio::time::timeout(PATIENCE, async {
        loop {
            match tokio::io::AsyncReadExt::read(&mut stalled, &mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the server closed the stalled socket");
    server.shutdown().await;
}

#[tokio::test]
async fn a_quiet_stream_gets_a_keepalive_comment_every_ping_interval() {
    let server = server(&[("WS_PING_INTERVAL", "200ms"), ("WS_PONG_TIMEOUT", "1s")]).await;
    let mut stream = Stream::open(server.local_addr, "/events?channel=quiet", &[]).await;
    stream.next_named("sys.subscribed").await;
    for _ in 0..2 {
        assert_eq!(stream.next_comment().await, ": keepalive");
    }
    server.shutdown().await;
}

/// The connect proxy decides who a stream is, and the subscribe proxy its channels,
/// before the stream starts (section 13).
#[tokio::test]
async fn the_backend_proxy_decides_a_stream_before_it_starts() {
    use std::sync::Arc;
    let (backend, _seen) = crate::proxy::backend(Arc::new(|seen: &crate::proxy::Seen| {
        let answer = match (seen.path.as_str(), seen.body["token"].as_str()) {
            ("/connect", Some("ann-token")) => json!({"user": "ann", "channels": ["doc:*"]}),
            ("/connect", _) => json!({"error": {"code": 401, "message": "who are you?"}}),
            _ if seen.body["channel"] == "doc:1" => json!({"allow": true, "data": {"state": 1}}),
            _ => json!({"allow": false, "reason": "no access"}),
        };
        Box::pin(std::future::ready((200, answer)))
    }))
    .await;
    let server = server(&[
        ("WS_PROXY_CONNECT_URL", &format!("http://{backend}/connect")),
        (
            "WS_PROXY_SUBSCRIBE_URL",
            &format!("http://{backend}/subscribe"),
        ),
    ])
    .await;
    let addr = server.local_addr;

    let stranger = Stream::open(addr, "/events?channel=doc:1&token=nobody", &[]).await;
    assert_eq!(stranger.status, 401);
    assert_eq!(
        serde_json::from_str::<Value>(&stranger.body).expect("JSON"),
        json!({"error": "who are you?"})
    );
    let refused = Stream::open(addr, "/events?channel=doc:secret&token=ann-token", &[]).await;
    assert_eq!(refused.status, 403);
    let body: Value = serde_json::from_str(&refused.body).expect("JSON");
    assert_eq!(body["reason"], "no access", "{body}");

    let mut stream = Stream::open(addr, "/events?channel=doc:1&token=ann-token", &[]).await;
    assert_eq!(stream.status, 200, "{}", stream.body);
    let greeting = stream.next().await.expect("greeting").json();
    assert_eq!(greeting["params"]["user"], "ann");
    assert_eq!(
        stream.next().await.expect("subscribed").event,
        "sys.subscribed"
    );
    let first = stream.next().await.expect("the backend's data");
    assert_eq!(first.event, "message");
    assert_eq!(
        first.json()["params"],
        json!({"channel": "doc:1", "data": {"state": 1}})
    );
    server.shutdown().await;
}
