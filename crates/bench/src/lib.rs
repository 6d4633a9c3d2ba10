//! chorus-bench: a load generator for the Chorus JSON-RPC 2.0 WebSocket server
//! (and for the peers under bench/peers that speak the same wire format).
//!
//! Scenarios: `idle` (connection memory and accept rate), `fanout` (one
//! publisher, many subscribers), `rpc` (pipelined `self.reply`), `cluster`
//! (fan-out across replicas). Only loopback targets are accepted, and every
//! loop is bounded in count and time.

pub mod conn;
pub mod fanout;
pub mod idle;
pub mod progress;
pub mod replicas;
pub mod report;
pub mod rpc;
pub mod stats;

use conn::Target;
use std::time::Duration;

/// Options every scenario shares.
#[derive(Debug, Clone)]
pub struct Common {
    pub urls: Vec<Target>,
    /// Name of the target in reports (`chorus`, `node-ws`, ...).
    pub label: String,
    /// Wait for `sys.connected` after each upgrade (off for peers that cannot send it).
    pub hello: bool,
    /// Show the stderr progress bar and status lines.
    pub progress: bool,
    /// Bound on one connection's TCP connect + upgrade + hello.
    pub connect_timeout: Duration,
    /// How many connections are being opened at once (per process).
    pub concurrency: usize,
    /// With a secret, connection `i` carries its own HS256 token (user `user-i`,
    /// device `device-i`) in `?token=`.
    pub jwt_secret: Option<String>,
}

impl Common {
    pub fn new(urls: Vec<Target>) -> Self {
        Self {
            urls,
            label: "chorus".into(),
            hello: true,
            progress: false,
            connect_timeout: Duration::from_secs(15),
            concurrency: 256,
            jwt_secret: None,
        }
    }

    /// The target of connection `index` to `target`: with a token when a JWT secret is
    /// set.
    pub fn target_for(&self, target: &Target, index: usize) -> Target {
        let Some(secret) = &self.jwt_secret else {
            return target.clone();
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        let claims = serde_json::json!({
            "sub": format!("user-{index}"),
            "device": format!("device-{index}"),
            "channels": [format!("user:{index}:*")],
            "iat": now,
            "exp": now + 3600,
        });
        let token = jsonwebtoken::encode(
            &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap_or_default();
        let separator = if target.url.contains('?') { '&' } else { '?' };
        Target {
            url: format!("{}{separator}token={token}", target.url),
            addr: target.addr,
        }
    }

    pub fn url_strings(&self) -> Vec<String> {
        self.urls.iter().map(|t| t.url.clone()).collect()
    }
}

/// A short padding string of `n` bytes for payloads.
pub fn pad(n: usize) -> String {
    "x".repeat(n)
}
