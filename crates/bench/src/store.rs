//! What the presence store (the backbone) holds: Redis `INFO memory` `used_memory`, or
//! the bytes and messages of the NATS JetStream stream behind the presence bucket
//! (from the server's monitoring endpoint, `nats-server -m PORT`, `/jsz`).

use std::net::SocketAddr;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Where to read the store's size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// A Redis server (`redis://host:port`; no password support).
    Redis(SocketAddr),
    /// A NATS server's monitoring endpoint and the presence bucket's stream name.
    Nats { monitor: String, stream: String },
}

/// One reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// Redis `used_memory`, or the stream's bytes.
    pub bytes: u64,
    /// The stream's messages (NATS only).
    pub messages: Option<u64>,
}

impl Probe {
    /// `redis://host:port` or `http://host:port` (NATS monitoring; the stream is the
    /// presence bucket of the cluster whose topic prefix is `prefix`).
    pub fn parse(url: &str, prefix: &str) -> Result<Self, String> {
        if let Some(rest) = url.strip_prefix("redis://") {
            let authority = rest.split('/').next().unwrap_or(rest);
            // Credentials are not supported: the bench's own Redis has none.
            let authority = authority.rsplit('@').next().unwrap_or(authority);
            let authority = if authority.contains(':') {
                authority.to_string()
            } else {
                format!("{authority}:6379")
            };
            let target = crate::conn::Target::parse(&format!("ws://{authority}/"))?;
            return Ok(Self::Redis(target.addr));
        }
        if url.starts_with("http://") {
            crate::http::parse_url(url)?;
            return Ok(Self::Nats {
                monitor: url.trim_end_matches('/').to_string(),
                stream: format!("KV_{}", bucket_for(prefix)),
            });
        }
        Err(format!(
            "{url}: a memory probe is redis://host:port or http://host:port (NATS monitoring)"
        ))
    }

    pub fn describe(&self) -> String {
        match self {
            Self::Redis(addr) => format!("redis {addr} INFO memory used_memory"),
            Self::Nats { monitor, stream } => format!("{monitor}/jsz stream {stream} bytes"),
        }
    }

    pub async fn sample(&self) -> Result<Sample, String> {
        match self {
            Self::Redis(addr) => Ok(Sample {
                bytes: redis_used_memory(*addr).await?,
                messages: None,
            }),
            Self::Nats { monitor, stream } => {
                let url = format!("{monitor}/jsz?accounts=true&streams=true");
                let response = crate::http::get(&url).await?;
                if response.status != 200 {
                    return Err(format!("{url}: HTTP {}", response.status));
                }
                let doc: serde_json::Value =
                    serde_json::from_slice(&response.body).map_err(|e| format!("{url}: {e}"))?;
                // A stream that does not exist yet holds nothing.
                Ok(stream_state(&doc, stream).unwrap_or(Sample {
                    bytes: 0,
                    messages: Some(0),
                }))
            }
        }
    }
}

/// The presence bucket of the cluster whose topic prefix is `prefix`, as the server
/// names it (`chorus_pubsub::presence::nats::bucket_for`): `chorus-presence-` and the
/// prefix with every byte other than `A-Z a-z 0-9 -` written as `_XX`.
pub fn bucket_for(prefix: &str) -> String {
    let mut bucket = String::from("chorus-presence-");
    for byte in prefix.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' {
            bucket.push(char::from(byte));
        } else {
            bucket.push_str(&format!("_{byte:02X}"));
        }
    }
    bucket
}

/// The state of `stream` in a `/jsz?accounts=true&streams=true` document.
pub fn stream_state(doc: &serde_json::Value, stream: &str) -> Option<Sample> {
    for account in doc["account_details"].as_array()? {
        for detail in account["stream_detail"].as_array().into_iter().flatten() {
            if detail["name"].as_str() == Some(stream) {
                let state = &detail["state"];
                return Some(Sample {
                    bytes: state["bytes"].as_u64()?,
                    messages: state["messages"].as_u64(),
                });
            }
        }
    }
    None
}

/// `used_memory` from `INFO memory`.
async fn redis_used_memory(addr: SocketAddr) -> Result<u64, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("redis {addr}: {e}"))?;
    let mut stream = BufReader::new(stream);
    stream
        .get_mut()
        .write_all(b"INFO memory\r\n")
        .await
        .map_err(|e| format!("redis {addr}: {e}"))?;
    let mut header = String::new();
    stream
        .read_line(&mut header)
        .await
        .map_err(|e| format!("redis {addr}: {e}"))?;
    let len: usize = header
        .strip_prefix('$')
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| format!("redis {addr}: unexpected reply {:?}", header.trim()))?;
    let mut body = vec![0; len];
    stream
        .read_exact(&mut body)
        .await
        .map_err(|e| format!("redis {addr}: {e}"))?;
    let text = String::from_utf8_lossy(&body);
    info_field(&text, "used_memory")
        .ok_or_else(|| format!("redis {addr}: no used_memory in INFO memory"))
}

/// A numeric field of a Redis `INFO` reply.
pub fn info_field(info: &str, name: &str) -> Option<u64> {
    info.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key == name).then(|| value.trim().parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_probes() {
        assert_eq!(
            Probe::parse("redis://127.0.0.1:16379", "p"),
            Ok(Probe::Redis("127.0.0.1:16379".parse().expect("addr")))
        );
        assert_eq!(
            Probe::parse("redis://localhost/0", "p"),
            Ok(Probe::Redis("127.0.0.1:6379".parse().expect("addr")))
        );
        assert_eq!(
            Probe::parse("http://127.0.0.1:8222/", "chorus-bench"),
            Ok(Probe::Nats {
                monitor: "http://127.0.0.1:8222".into(),
                stream: "KV_chorus-presence-chorus-bench".into()
            })
        );
        assert!(Probe::parse("redis://10.0.0.1:6379", "p").is_err());
        assert!(Probe::parse("nats://127.0.0.1:4222", "p").is_err());
    }

    #[test]
    fn names_the_bucket_as_the_server_does() {
        assert_eq!(
            bucket_for("websocket.broadcast"),
            "chorus-presence-websocket_2Ebroadcast"
        );
        assert_eq!(bucket_for("a-b_c"), "chorus-presence-a-b_5Fc");
    }

    #[test]
    fn reads_info_and_jsz() {
        let info =
            "# Memory\r\nused_memory:1234567\r\nused_memory_human:1.18M\r\nused_memory_rss:99\r\n";
        assert_eq!(info_field(info, "used_memory"), Some(1_234_567));
        assert_eq!(info_field(info, "used_memory_rss"), Some(99));
        assert_eq!(info_field(info, "used_memory_human"), None);
        assert_eq!(info_field(info, "missing"), None);
        let doc = serde_json::json!({"account_details": [{"name": "$G", "stream_detail": [
            {"name": "other", "state": {"messages": 1, "bytes": 10}},
            {"name": "KV_x", "state": {"messages": 3, "bytes": 300}}
        ]}]});
        assert_eq!(
            stream_state(&doc, "KV_x"),
            Some(Sample {
                bytes: 300,
                messages: Some(3)
            })
        );
        assert_eq!(stream_state(&doc, "KV_y"), None);
    }
}
