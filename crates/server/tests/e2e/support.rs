//! Test harness: servers on port 0 (in-process or as the real binary), WebSocket
//! clients that speak the Chorus protocol, and a bare HTTP GET.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use chorus_server::{Config, RunningServer};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

/// Upper bound for anything a test waits for: a failure, never a synchronisation.
pub const PATIENCE: Duration = Duration::from_secs(10);

pub fn config(vars: &[(&str, &str)]) -> Config {
    let base = [
        ("WS_HOST", "127.0.0.1"),
        ("WS_PORT", "0"),
        ("WS_LOG_LEVEL", "warn"),
    ];
    Config::from_vars(
        base.iter()
            .chain(vars)
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    )
    .expect("test config is valid")
}

/// An in-process server.
pub async fn server(vars: &[(&str, &str)]) -> RunningServer {
    chorus_server::start(config(vars))
        .await
        .expect("server starts")
}

pub fn ws_url(addr: SocketAddr) -> String {
    format!("ws://{addr}/ws")
}

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A connected client that has read its `sys.connected` greeting.
pub struct Client {
    pub socket: Socket,
    pub client_id: String,
    pub node_id: String,
    /// The whole `sys.connected` notification.
    pub greeting: Value,
    next_id: u64,
}

impl Client {
    pub async fn connect(addr: SocketAddr) -> Self {
        Self::connect_url(&ws_url(addr)).await
    }

    pub async fn connect_url(url: &str) -> Self {
        Self::connect_with(url, &[]).await
    }

    /// Connects with extra headers on the upgrade request.
    pub async fn connect_with(url: &str, headers: &[(&'static str, &str)]) -> Self {
        let mut request = url.into_client_request().expect("a WebSocket URL");
        for (name, value) in headers {
            request
                .headers_mut()
                .insert(*name, value.parse().expect("a header value"));
        }
        let (socket, _) = tokio::time::timeout(PATIENCE, connect_async(request))
            .await
            .expect("connect in time")
            .expect("connects");
        let mut client = Self {
            socket,
            client_id: String::new(),
            node_id: String::new(),
            greeting: Value::Null,
            next_id: 0,
        };
        let greeting = client.recv().await;
        assert_eq!(
            greeting["method"], "sys.connected",
            "first frame is the greeting: {greeting}"
        );
        client.greeting = greeting.clone();
        client.client_id = greeting["params"]["client_id"]
            .as_str()
            .expect("client_id")
            .to_owned();
        client.node_id = greeting["params"]["node_id"]
            .as_str()
            .expect("node_id")
            .to_owned();
        client
    }

    pub async fn send_text(&mut self, text: &str) {
        self.socket.send(Message::text(text)).await.expect("send");
    }

    /// The next text frame, as JSON.
    pub async fn recv(&mut self) -> Value {
        let text = self.recv_text().await;
        serde_json::from_str(&text)
            .unwrap_or_else(|err| panic!("server sent invalid JSON {text:?}: {err}"))
    }

    pub async fn recv_text(&mut self) -> String {
        loop {
            let message = tokio::time::timeout(PATIENCE, self.socket.next())
                .await
                .expect("a frame arrives in time")
                .expect("connection open")
                .expect("frame readable");
            match message {
                Message::Text(text) => return text.to_string(),
                Message::Ping(_) | Message::Pong(_) => {}
                other => panic!("expected text, got {other:?}"),
            }
        }
    }

    /// Calls a method and returns the whole response (`params` is left out when
    /// `Null`). Notifications that arrive first are skipped.
    pub async fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut request = json!({"jsonrpc": "2.0", "method": method, "id": id});
        if !params.is_null() {
            request["params"] = params;
        }
        self.send_text(&request.to_string()).await;
        loop {
            let message = self.recv().await;
            if message.get("id") == Some(&json!(id)) {
                return message;
            }
        }
    }

    /// Calls a method that must succeed; returns its result.
    pub async fn ok(&mut self, method: &str, params: Value) -> Value {
        let response = self.call(method, params).await;
        assert!(
            response.get("error").is_none(),
            "{method} failed: {response}"
        );
        response["result"].clone()
    }

    /// Waits for the close frame and returns its code (skipping data frames).
    pub async fn close_code(&mut self) -> Option<CloseCode> {
        loop {
            match tokio::time::timeout(PATIENCE, self.socket.next())
                .await
                .expect("close arrives in time")
            {
                Some(Ok(Message::Close(frame))) => return frame.map(|frame| frame.code),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// Asserts nothing but pings arrives before a `ping` call round-trips: anything
    /// sent to this client before the call would be queued ahead of the reply.
    pub async fn assert_nothing_pending(&mut self) {
        self.next_id += 1;
        let id = self.next_id;
        self.send_text(&json!({"jsonrpc": "2.0", "method": "ping", "id": id}).to_string())
            .await;
        let message = self.recv().await;
        assert_eq!(
            message["id"],
            json!(id),
            "unexpected frame before the ping reply: {message}"
        );
    }
}

/// A raw upgrade attempt; returns the HTTP status line's code.
pub async fn upgrade_status(addr: SocketAddr, path: &str, extra_headers: &[(&str, &str)]) -> u16 {
    let mut request = format!("ws://{addr}{path}")
        .into_client_request()
        .expect("request");
    for (name, value) in extra_headers {
        let name: tokio_tungstenite::tungstenite::http::HeaderName =
            name.parse().expect("header name");
        request
            .headers_mut()
            .insert(name, value.parse().expect("header value"));
    }
    match connect_async(request).await {
        Ok((_, response)) => response.status().as_u16(),
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => response.status().as_u16(),
        Err(err) => panic!("unexpected upgrade error: {err}"),
    }
}

/// `GET path` over HTTP/1.1; returns status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("write");
    let mut raw = String::new();
    tokio::time::timeout(PATIENCE, stream.read_to_string(&mut raw))
        .await
        .expect("response in time")
        .expect("read");
    let status = raw
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("status line");
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The value of a metric line (exact series text before the value) in `/metrics`.
pub async fn metric(addr: SocketAddr, series: &str) -> f64 {
    let (_, body) = http_get(addr, "/metrics").await;
    body.lines()
        .find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
        })
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("series {series} not in /metrics:\n{body}"))
}

/// The real `chorus` binary, with its stderr watched for the listening address.
pub struct ServerProcess {
    pub child: Child,
    pub addr: SocketAddr,
}

impl ServerProcess {
    pub async fn spawn(vars: &[(&str, &str)]) -> Self {
        let mut child = command(vars)
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn chorus");
        let stderr = child.stderr.take().expect("stderr piped");
        let mut lines = BufReader::new(stderr).lines();
        let addr = tokio::time::timeout(PATIENCE, async {
            while let Some(line) = lines.next_line().await.expect("read stderr") {
                if let Some(addr) = line
                    .split("local_addr=")
                    .nth(1)
                    .and_then(|rest| rest.split_whitespace().next())
                {
                    return addr.parse().expect("socket address");
                }
            }
            panic!("chorus exited before listening");
        })
        .await
        .expect("chorus listens in time");
        // Keep draining stderr so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self { child, addr }
    }

    pub fn signal(&self, signal: &str) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args(["-s", signal, &pid])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }
}

/// A `chorus` command with only the given `WS_*` variables (plus loopback, port 0).
pub fn command(vars: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_chorus"));
    command
        .env_clear()
        .env("WS_HOST", "127.0.0.1")
        .env("WS_PORT", "0")
        .env("WS_LOG_LEVEL", "info");
    for (key, value) in vars {
        command.env(key, value);
    }
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true);
    command
}

impl Client {
    /// Connects with a tiny socket receive buffer, so that a client which stops
    /// reading backs up into the server quickly.
    pub async fn connect_with_small_buffer(addr: SocketAddr) -> Self {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
        let stream = socket.connect(addr).await.expect("tcp connect");
        let (socket, _) =
            tokio_tungstenite::client_async(ws_url(addr), MaybeTlsStream::Plain(stream))
                .await
                .expect("upgrade");
        let mut client = Self {
            socket,
            client_id: String::new(),
            node_id: String::new(),
            greeting: Value::Null,
            next_id: 0,
        };
        let greeting = client.recv().await;
        assert_eq!(greeting["method"], "sys.connected");
        client.greeting = greeting;
        client
    }
}

/// Polls until `check` holds, failing after [`PATIENCE`]. For conditions that the
/// server exposes only through HTTP, where there is no event to await.
pub async fn eventually<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually_within(PATIENCE, what, check).await;
}

/// [`eventually`] with its own deadline, for conditions that take a given amount of
/// work (not just a reaction) to come about.
pub async fn eventually_within<F, Fut>(patience: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + patience;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The answer to a raw upgrade request; `socket` stays open while it is kept.
pub struct RawUpgrade {
    pub status: u16,
    pub head: String,
    pub body: String,
    /// Not read: held so that an upgraded connection stays open.
    #[allow(dead_code)]
    pub socket: TcpStream,
}

/// A raw upgrade request over a fresh socket, with extra headers.
pub async fn raw_upgrade(
    addr: SocketAddr,
    path: &str,
    extra_headers: &[(&str, &str)],
) -> RawUpgrade {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    for (name, value) in extra_headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    let mut buffer = [0u8; 4096];
    let read_all = async {
        loop {
            let n = stream.read(&mut buffer).await.expect("read");
            raw.extend_from_slice(&buffer[..n]);
            let text = String::from_utf8_lossy(&raw);
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let length = head
                    .lines()
                    .find_map(|line| {
                        let (name, value) = line.split_once(':')?;
                        name.eq_ignore_ascii_case("content-length")
                            .then(|| value.trim().parse::<usize>().ok())?
                    })
                    .unwrap_or(0);
                if head.starts_with("HTTP/1.1 101") || body.len() >= length || n == 0 {
                    return (head.to_owned(), body.to_owned());
                }
            }
            if n == 0 {
                return (text.into_owned(), String::new());
            }
        }
    };
    let (head, body) = tokio::time::timeout(PATIENCE, read_all)
        .await
        .expect("response in time");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .expect("status line");
    RawUpgrade {
        status,
        head,
        body,
        socket: stream,
    }
}

/// Publish budgets off: for tests about something else than them.
pub const UNLIMITED_PUBLISHING: [(&str, &str); 4] = [
    ("WS_PUBLISH_RATE", "0"),
    ("WS_PUBLISH_BYTES_RATE", "0"),
    ("WS_PUBLISH_RATE_TOTAL", "0"),
    ("WS_PUBLISH_BYTES_TOTAL", "0"),
];
