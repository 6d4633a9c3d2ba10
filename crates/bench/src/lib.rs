//! chorus-bench: a load generator for the Chorus JSON-RPC 2.0 WebSocket server
//! (and for the peers under bench/peers that speak the same wire format).
//!
//! Scenarios: `idle` (connection memory and accept rate), `fanout` (one
//! publisher, many subscribers), `rpc` (pipelined `self.reply`), `cluster`
//! (fan-out across replicas), `presence` (a large presence channel: reads, walks,
//! store memory, join rate) and `send` (`POST /api` `send` to single users, against
//! `publish` to per-user channels) and `sse` (Server-Sent Events against WebSocket:
//! memory per idle subscriber and fan-out, same run). Only loopback targets are accepted, and every
//! loop is bounded in count and time.

pub mod backend;
pub mod conn;
pub mod fanout;
pub mod http;
pub mod idle;
pub mod presence;
pub mod progress;
pub mod recover;
pub mod replicas;
pub mod report;
pub mod rpc;
pub mod send;
pub mod sse;
pub mod stats;
pub mod store;

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
    /// Channel patterns granted in those tokens besides `user:<i>:*`.
    pub jwt_grants: Vec<String>,
    /// The `chorus-bench` executable worker processes run (`idle-worker`); this
    /// process's own when unset (tests set the built binary).
    pub worker_exe: Option<std::path::PathBuf>,
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
            jwt_grants: Vec::new(),
            worker_exe: None,
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
        let mut channels = vec![format!("user:{index}:*")];
        channels.extend(self.jwt_grants.iter().cloned());
        let claims = serde_json::json!({
            "sub": user_name(index),
            "device": format!("device-{index}"),
            "channels": channels,
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

/// The user of connection `index` when tokens are minted (`user-<index>`).
pub fn user_name(index: usize) -> String {
    format!("user-{index}")
}

/// The index in a `user-<index>` name.
pub fn user_index(user: &str) -> Option<usize> {
    user.strip_prefix("user-")?.parse().ok()
}

/// A short padding string of `n` bytes for payloads.
pub fn pad(n: usize) -> String {
    "x".repeat(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_carry_the_user_and_the_extra_grants() {
        let target = Target::parse("ws://127.0.0.1:1/ws").expect("url");
        let mut c = Common::new(vec![target.clone()]);
        assert_eq!(c.target_for(&target, 3), target);
        c.jwt_secret = Some("s".repeat(32));
        c.jwt_grants = vec!["room:bench".into()];
        let t = c.target_for(&target, 3);
        let token = t.url.split("?token=").nth(1).expect("a token");
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        validation.required_spec_claims.clear();
        let claims = jsonwebtoken::decode::<serde_json::Value>(
            token,
            &jsonwebtoken::DecodingKey::from_secret("s".repeat(32).as_bytes()),
            &validation,
        )
        .expect("valid")
        .claims;
        assert_eq!(claims["sub"], "user-3");
        assert_eq!(claims["device"], "device-3");
        assert_eq!(
            claims["channels"],
            serde_json::json!(["user:3:*", "room:bench"])
        );
        assert_eq!(user_index(&user_name(1234)), Some(1234));
        assert_eq!(user_index("bob"), None);
    }
}
