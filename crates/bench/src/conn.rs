//! WebSocket connections to loopback targets, with optional source-address
//! binding, and tolerant parsing of the frames the Chorus protocol (and the
//! peers) send.

use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use serde::de::IgnoredAny;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

pub type Ws = WebSocketStream<TcpStream>;

/// How many connections share one loopback source address before the next
/// one (127.0.0.2, 127.0.0.3, ...) is used. Well under the ~28 000 ephemeral
/// ports a bound source address has.
pub const CONNS_PER_SOURCE: usize = 10_000;
/// Source ports are `FIRST_SOURCE_PORT + index % CONNS_PER_SOURCE`.
const FIRST_SOURCE_PORT: u16 = 40_000;

/// A parsed `ws://host:port/path` target. Only loopback addresses are accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub url: String,
    pub addr: SocketAddr,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url)
    }
}

impl Target {
    /// Parse `ws://host[:port][/path]`. `host` must be `localhost`, an IPv4
    /// address in 127.0.0.0/8 or `[::1]`: this tool never targets anything else.
    pub fn parse(s: &str) -> Result<Self, String> {
        let rest = s
            .strip_prefix("ws://")
            .ok_or_else(|| format!("{s}: only ws:// URLs are supported"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = if let Some(h) = authority.strip_prefix('[') {
            let end = h.find(']').ok_or_else(|| format!("{s}: bad IPv6 host"))?;
            let port = h[end + 1..].strip_prefix(':');
            (&h[..end], port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        let port: u16 = match port {
            Some(p) => p.parse().map_err(|_| format!("{s}: bad port {p:?}"))?,
            None => 80,
        };
        let ip: IpAddr = if host.eq_ignore_ascii_case("localhost") {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            host.parse().map_err(|_| {
                format!("{s}: host must be localhost or a loopback IP address, got {host:?}")
            })?
        };
        if !ip.is_loopback() {
            return Err(format!("{s}: refusing non-loopback target {ip}"));
        }
        Ok(Self {
            url: format!("ws://{}{}", SocketAddr::new(ip, port), path),
            addr: SocketAddr::new(ip, port),
        })
    }

    /// The loopback source address and port for the `index`-th connection
    /// overall: 127.0.0.2, 127.0.0.3, ... every [`CONNS_PER_SOURCE`]
    /// connections, so neither ephemeral ports nor the per-address port space
    /// run out, and a port picked here from the index. `bind` with port 0
    /// makes the kernel search for a free port, which costs time proportional
    /// to the ports already taken: at 10 000 connections per address that
    /// search, not the server, set the accept rate. IPv6 targets have a single
    /// loopback address and use the kernel's choice.
    pub fn source_for(&self, index: usize) -> Option<SocketAddr> {
        match self.addr {
            SocketAddr::V4(_) => {
                let n = 2 + (index / CONNS_PER_SOURCE) as u32;
                // 127.0.0.2 .. 127.255.255.254
                let n = n.min(0x00ff_fffe);
                let port = FIRST_SOURCE_PORT + (index % CONNS_PER_SOURCE) as u16;
                Some(SocketAddr::new(
                    IpAddr::V4(Ipv4Addr::from(0x7f00_0000u32 | n)),
                    port,
                ))
            }
            SocketAddr::V6(_) => None,
        }
    }
}

/// Client-side socket configuration: a small read buffer so that tens of
/// thousands of idle connections stay cheap in the load generator itself.
pub fn client_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(0)
        .max_message_size(Some(16 << 20))
}

#[derive(Debug)]
pub enum ConnectError {
    Io(std::io::Error),
    Ws(tokio_tungstenite::tungstenite::Error),
    Timeout(&'static str),
    Closed(&'static str),
    Protocol(String),
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Io(e) => write!(f, "tcp: {e}"),
            Self::Ws(e) => write!(f, "websocket: {e}"),
            Self::Timeout(what) => write!(f, "timeout waiting for {what}"),
            Self::Closed(what) => write!(f, "closed while waiting for {what}"),
            Self::Protocol(m) => write!(f, "protocol: {m}"),
        }
    }
}

impl std::error::Error for ConnectError {}

/// A TCP connection to `addr`, bound to `source` first when given.
async fn open(addr: SocketAddr, source: Option<SocketAddr>) -> std::io::Result<TcpStream> {
    let sock = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }?;
    sock.set_reuseaddr(true)?;
    if let Some(source) = source {
        sock.bind(source)?;
    }
    sock.connect(addr).await
}

/// Open a WebSocket to `target`, binding the client socket to `source` first
/// when given. When `expect_hello`, waits for the `sys.connected` notification
/// (the first frame a Chorus server sends) and returns its `client_id`.
pub async fn connect(
    target: &Target,
    source: Option<SocketAddr>,
    expect_hello: bool,
    timeout: Duration,
) -> Result<(Ws, Option<String>), ConnectError> {
    let fut = async {
        let stream = match source {
            Some(source) => match open(target.addr, Some(source)).await {
                // The chosen port is taken, or its 4-tuple still in TIME_WAIT
                // from an earlier run against the same server: let the kernel pick.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::AddrInUse | std::io::ErrorKind::AddrNotAvailable
                    ) =>
                {
                    open(target.addr, Some(SocketAddr::new(source.ip(), 0))).await
                }
                other => other,
            },
            None => open(target.addr, None).await,
        }
        .map_err(ConnectError::Io)?;
        stream.set_nodelay(true).map_err(ConnectError::Io)?;
        let (mut ws, _resp) = tokio_tungstenite::client_async_with_config(
            target.url.as_str(),
            stream,
            Some(client_config()),
        )
        .await
        .map_err(ConnectError::Ws)?;
        let mut client_id = None;
        if expect_hello {
            client_id = Some(wait_hello(&mut ws).await?);
        }
        Ok((ws, client_id))
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| ConnectError::Timeout("connect"))?
}

async fn wait_hello(ws: &mut Ws) -> Result<String, ConnectError> {
    loop {
        match ws.next().await {
            None => return Err(ConnectError::Closed("sys.connected")),
            Some(Err(e)) => return Err(ConnectError::Ws(e)),
            Some(Ok(Message::Text(t))) => {
                let f: Frame = serde_json::from_str(t.as_str())
                    .map_err(|e| ConnectError::Protocol(format!("bad first frame: {e}")))?;
                if f.method.as_deref() == Some("sys.connected") {
                    return Ok(f.params.and_then(|p| p.client_id).unwrap_or_default());
                }
                return Err(ConnectError::Protocol(format!(
                    "first frame is not sys.connected: {}",
                    truncate(t.as_str(), 120)
                )));
            }
            Some(Ok(Message::Close(_))) => return Err(ConnectError::Closed("sys.connected")),
            Some(Ok(_)) => {}
        }
    }
}

pub fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Send one text frame and flush.
pub async fn send_text(
    ws: &mut Ws,
    text: String,
) -> Result<(), tokio_tungstenite::tungstenite::Error> {
    ws.send(Message::text(text)).await
}

/// The payload the publisher puts in `data`: sequence number, send timestamp
/// (µs since the Unix epoch) and a warm-up flag.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub struct BenchData {
    pub seq: u64,
    pub ts: u64,
    #[serde(default)]
    pub w: u8,
}

/// Build the `data` object for a publication, padded to roughly `pad` bytes.
pub fn bench_data_json(seq: u64, ts: u64, warm: bool, pad: &str) -> String {
    format!(
        r#"{{"seq":{seq},"ts":{ts},"w":{},"pad":"{pad}"}}"#,
        u8::from(warm)
    )
}

/// Any frame from the server. Unknown fields are ignored; `params` is read
/// leniently so both the Chorus shape `{"channel","data"}` and jsonrpsee's
/// subscription shape `{"subscription","result":{"channel","data"}}` yield
/// the bench payload.
#[derive(Debug, Deserialize)]
pub struct Frame {
    #[serde(default)]
    pub id: Option<serde_json::Value>,
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default, deserialize_with = "lenient")]
    pub params: Option<Params>,
    #[serde(default)]
    pub result: Option<IgnoredAny>,
    #[serde(default)]
    pub error: Option<serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Params {
    #[serde(default, deserialize_with = "lenient")]
    pub data: Option<BenchData>,
    #[serde(default, deserialize_with = "lenient")]
    pub result: Option<Box<Params>>,
    #[serde(default, deserialize_with = "lenient")]
    pub client_id: Option<String>,
    // jsonrpsee may put the payload directly in `result`.
    #[serde(default)]
    pub seq: Option<u64>,
    #[serde(default)]
    pub ts: Option<u64>,
    #[serde(default)]
    pub w: Option<u8>,
}

impl Params {
    /// The bench payload carried by a notification, wherever the peer put it.
    pub fn bench_data(&self) -> Option<BenchData> {
        if let Some(d) = self.data {
            return Some(d);
        }
        if let (Some(seq), Some(ts)) = (self.seq, self.ts) {
            return Some(BenchData {
                seq,
                ts,
                w: self.w.unwrap_or(0),
            });
        }
        self.result.as_ref().and_then(|r| r.bench_data())
    }
}

/// Deserialize to `Some(T)` when the value has T's shape and `None` otherwise,
/// instead of failing the whole frame.
fn lenient<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    let v = serde_json::Value::deserialize(d)?;
    Ok(serde_json::from_value(v).ok())
}

impl Frame {
    pub fn parse(text: &str) -> Option<Self> {
        serde_json::from_str(text).ok()
    }

    /// A notification is a frame with a method and no id.
    pub fn is_notification(&self) -> bool {
        self.method.is_some() && self.id.is_none()
    }

    /// The numeric id of a response, if any.
    pub fn id_u64(&self) -> Option<u64> {
        self.id.as_ref().and_then(|v| v.as_u64())
    }

    pub fn is_error(&self) -> bool {
        self.error.is_some()
    }
}

/// Fast path for the fan-out hot loop: a notification parsed only as far as
/// the bench payload. Falls back to [`Frame`] for anything unusual.
#[derive(Debug, Deserialize)]
struct FastNote {
    method: String,
    params: FastParams,
}

#[derive(Debug, Deserialize)]
struct FastParams {
    data: BenchData,
}

/// What a subscriber makes of one text frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A notification carrying the bench payload.
    Data(BenchData),
    /// A response to request `id` (ok or error).
    Response { id: Option<u64>, error: bool },
    /// Anything else (sys.connected, broadcast, unparsable ...).
    Other,
}

pub fn classify(text: &str) -> Incoming {
    if let Ok(n) = serde_json::from_str::<FastNote>(text)
        && n.method == "message"
    {
        return Incoming::Data(n.params.data);
    }
    match Frame::parse(text) {
        Some(f) if f.is_notification() => match f.params.as_ref().and_then(Params::bench_data) {
            Some(d) => Incoming::Data(d),
            None => Incoming::Other,
        },
        // The server sends notifications (with a method) and responses (without).
        Some(f) if f.method.is_none() => Incoming::Response {
            id: f.id_u64(),
            error: f.is_error(),
        },
        _ => Incoming::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_loopback_targets_only() {
        let t = Target::parse("ws://127.0.0.1:8080/ws").expect("valid");
        assert_eq!(t.addr, "127.0.0.1:8080".parse().expect("addr"));
        assert_eq!(t.url, "ws://127.0.0.1:8080/ws");
        let t = Target::parse("ws://localhost:9/x/y").expect("valid");
        assert_eq!(t.url, "ws://127.0.0.1:9/x/y");
        let t = Target::parse("ws://[::1]:81").expect("valid");
        assert_eq!(t.url, "ws://[::1]:81/");
        assert!(Target::parse("ws://10.0.0.1:80/ws").is_err());
        assert!(Target::parse("ws://example.com/ws").is_err());
        assert!(Target::parse("wss://127.0.0.1/ws").is_err());
        assert!(Target::parse("ws://127.0.0.1:99999/ws").is_err());
    }

    #[test]
    fn spreads_sources() {
        let t = Target::parse("ws://127.0.0.1:1/ws").expect("valid");
        let at = |index| t.source_for(index).map(|a| a.to_string());
        assert_eq!(at(0).as_deref(), Some("127.0.0.2:40000"));
        assert_eq!(at(CONNS_PER_SOURCE - 1).as_deref(), Some("127.0.0.2:49999"));
        assert_eq!(at(CONNS_PER_SOURCE).as_deref(), Some("127.0.0.3:40000"));
        assert_eq!(
            at(CONNS_PER_SOURCE * 300 + 7).as_deref(),
            Some("127.0.1.46:40007")
        );
        let t6 = Target::parse("ws://[::1]:1/ws").expect("valid");
        assert_eq!(t6.source_for(5), None);
    }

    #[test]
    fn classifies_chorus_and_jsonrpsee_notifications() {
        let d = BenchData {
            seq: 7,
            ts: 99,
            w: 0,
        };
        let chorus = format!(
            r#"{{"jsonrpc":"2.0","method":"message","params":{{"channel":"c","data":{}}}}}"#,
            bench_data_json(7, 99, false, "xx")
        );
        assert_eq!(classify(&chorus), Incoming::Data(d));
        let rpsee = r#"{"jsonrpc":"2.0","method":"message","params":{"subscription":"abc","result":{"channel":"c","data":{"seq":7,"ts":99}}}}"#;
        assert_eq!(classify(rpsee), Incoming::Data(d));
        let bare = r#"{"jsonrpc":"2.0","method":"s_notif","params":{"subscription":1,"result":{"seq":7,"ts":99,"w":1}}}"#;
        assert_eq!(classify(bare), Incoming::Data(BenchData { w: 1, ..d }));
        let hello = r#"{"jsonrpc":"2.0","method":"sys.connected","params":{"client_id":"a","node_id":"n"}}"#;
        assert_eq!(classify(hello), Incoming::Other);
        let bcast = r#"{"jsonrpc":"2.0","method":"broadcast","params":[1,2]}"#;
        assert_eq!(classify(bcast), Incoming::Other);
        let ok = r#"{"jsonrpc":"2.0","id":3,"result":{"channel":"c"}}"#;
        assert_eq!(
            classify(ok),
            Incoming::Response {
                id: Some(3),
                error: false
            }
        );
        let err = r#"{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"x"}}"#;
        assert_eq!(
            classify(err),
            Incoming::Response {
                id: None,
                error: true
            }
        );
        let nul = r#"{"jsonrpc":"2.0","id":4,"result":null}"#;
        // `result: null` is still a response.
        assert_eq!(
            classify(nul),
            Incoming::Response {
                id: Some(4),
                error: false
            }
        );
        assert_eq!(classify("not json"), Incoming::Other);
    }

    #[test]
    fn reads_client_id() {
        let f = Frame::parse(r#"{"jsonrpc":"2.0","method":"sys.connected","params":{"client_id":"abc","node_id":"n"}}"#)
            .expect("frame");
        assert_eq!(f.params.and_then(|p| p.client_id).as_deref(), Some("abc"));
    }
}
