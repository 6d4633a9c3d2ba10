//! How clients reach this replica: address, paths, message and queue bounds,
//! keepalive, timeouts, origins, connection cap, drain time.

use std::net::IpAddr;
use std::time::Duration;

use serde::Deserialize;

use super::values::{error, parse_bool, parse_count, parse_duration, parse_or, parse_size};
use super::{ConfigError, Vars, read};

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Raw {
    host: Option<String>,
    port: Option<String>,
    path: Option<String>,
    echo_path: Option<String>,
    max_message_size: Option<String>,
    send_buffer: Option<String>,
    write_timeout: Option<String>,
    ping_interval: Option<String>,
    pong_timeout: Option<String>,
    handshake_timeout: Option<String>,
    allowed_origins: Option<String>,
    max_connections: Option<String>,
    max_pending_calls: Option<String>,
    shutdown_grace: Option<String>,
    demo: Option<String>,
}

/// Who may open a WebSocket, by `Origin` header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AllowedOrigins {
    Any,
    List(Vec<String>),
}

impl AllowedOrigins {
    /// Clients without an `Origin` header (not browsers) are always allowed.
    pub fn allows(&self, origin: Option<&str>) -> bool {
        match (self, origin) {
            (Self::Any, _) | (_, None) => true,
            (Self::List(list), Some(origin)) => list
                .iter()
                .any(|allowed| allowed.eq_ignore_ascii_case(origin)),
        }
    }
}

#[derive(Clone, Debug)]
pub struct TransportConfig {
    pub host: IpAddr,
    pub port: u16,
    pub ws_path: String,
    /// Conformance echo endpoint; off when `None`.
    pub echo_path: Option<String>,
    pub max_message_size: usize,
    /// Each client's outbound queue budget, in bytes of queued frames.
    pub send_buffer: usize,
    /// A socket that accepts no write for this long closes its client (1013).
    pub write_timeout: Duration,
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    /// An HTTP request's head must arrive complete within it.
    pub handshake_timeout: Duration,
    pub allowed_origins: AllowedOrigins,
    /// 0 means no limit.
    pub max_connections: usize,
    /// Deferred calls one connection may have pending before it stops reading.
    pub max_pending_calls: usize,
    pub shutdown_grace: Duration,
    /// Serve the demo page at `/` (`WS_DEMO`).
    pub demo: bool,
}

const RESERVED_PATHS: [&str; 6] = [
    "/health",
    "/ready",
    "/metrics",
    "/events",
    "/chorus.js",
    "/",
];
const SIZE: &str = "a size such as 65536, 64KiB or 1MiB";

impl TransportConfig {
    pub(super) fn load(vars: &Vars) -> Result<Self, ConfigError> {
        let raw: Raw = read(vars)?;
        let host = parse_or(
            "WS_HOST",
            raw.host,
            IpAddr::from([0, 0, 0, 0]),
            "an IP address such as 0.0.0.0 or 127.0.0.1",
            |v| v.parse().ok(),
        )?;
        let port = parse_or(
            "WS_PORT",
            raw.port,
            8080,
            "a port number from 0 to 65535",
            |v| v.parse().ok(),
        )?;
        let ws_path = path("WS_PATH", raw.path.unwrap_or_else(|| "/ws".into()))?;
        let echo_path = match raw.echo_path.filter(|v| !v.is_empty()) {
            Some(echo) => Some(path("WS_ECHO_PATH", echo)?),
            None => None,
        };
        if echo_path.as_deref() == Some(ws_path.as_str())
            || RESERVED_PATHS.contains(&ws_path.as_str())
        {
            return Err(error(
                "WS_PATH",
                &ws_path,
                "a path distinct from /, /health, /ready, /metrics, /events, /chorus.js and WS_ECHO_PATH",
            ));
        }
        if let Some(echo) = echo_path
            .as_deref()
            .filter(|echo| RESERVED_PATHS.contains(echo))
        {
            return Err(error(
                "WS_ECHO_PATH",
                echo,
                "a path distinct from /, /health, /ready, /metrics, /events and /chorus.js",
            ));
        }
        let max_message_size = parse_or(
            "WS_MAX_MESSAGE_SIZE",
            raw.max_message_size,
            1 << 20,
            "a size from 64 B to 1 GiB, such as 65536, 64KiB or 1MiB",
            |v| parse_size(v).filter(|n| (64..=1 << 30).contains(n)),
        )?;
        let send_buffer = parse_or(
            "WS_SEND_BUFFER",
            raw.send_buffer,
            1 << 20,
            &format!("{SIZE}, from 1 KiB to 1 GiB"),
            |v| parse_size(v).filter(|n| (1 << 10..=1 << 30).contains(n)),
        )?;
        let write_timeout = positive_duration("WS_WRITE_TIMEOUT", raw.write_timeout, 10)?;
        let ping_interval = positive_duration("WS_PING_INTERVAL", raw.ping_interval, 10)?;
        let pong_timeout = positive_duration("WS_PONG_TIMEOUT", raw.pong_timeout, 60)?;
        if pong_timeout <= ping_interval {
            return Err(error(
                "WS_PONG_TIMEOUT",
                &format!("{pong_timeout:?}"),
                &format!(
                    "longer than WS_PING_INTERVAL ({ping_interval:?}): otherwise every client is closed before it can answer a ping"
                ),
            ));
        }
        let handshake_timeout =
            positive_duration("WS_HANDSHAKE_TIMEOUT", raw.handshake_timeout, 10)?;
        let allowed_origins = match raw.allowed_origins.as_deref().map(str::trim) {
            None | Some("" | "*") => AllowedOrigins::Any,
            Some(list) => AllowedOrigins::List(
                list.split(',')
                    .map(|o| o.trim().trim_end_matches('/').to_owned())
                    .filter(|o| !o.is_empty())
                    .collect(),
            ),
        };
        let max_connections = parse_or(
            "WS_MAX_CONNECTIONS",
            raw.max_connections,
            0,
            "a whole number (0 means no limit)",
            |v| v.parse().ok(),
        )?;
        let max_pending_calls = parse_or(
            "WS_MAX_PENDING_CALLS",
            raw.max_pending_calls,
            64,
            "a whole number from 1 to 65536",
            parse_count(1..=65_536),
        )?;
        let shutdown_grace = parse_or(
            "WS_SHUTDOWN_GRACE",
            raw.shutdown_grace,
            Duration::from_secs(10),
            "a duration such as 10s",
            parse_duration,
        )?;
        let demo = parse_or("WS_DEMO", raw.demo, true, "true or false", parse_bool)?;
        Ok(Self {
            host,
            port,
            ws_path,
            echo_path,
            max_message_size,
            send_buffer,
            write_timeout,
            ping_interval,
            pong_timeout,
            handshake_timeout,
            allowed_origins,
            max_connections,
            max_pending_calls,
            shutdown_grace,
            demo,
        })
    }
}

fn positive_duration(
    variable: &str,
    value: Option<String>,
    default_secs: u64,
) -> Result<Duration, ConfigError> {
    parse_or(
        variable,
        value,
        Duration::from_secs(default_secs),
        "a duration above zero such as 500ms, 10s or 1m",
        |v| parse_duration(v).filter(|d| !d.is_zero()),
    )
}

fn path(variable: &str, value: String) -> Result<String, ConfigError> {
    if value.starts_with('/') && value.len() > 1 && !value.contains(['?', '#', ' ']) {
        Ok(value)
    } else {
        Err(error(
            variable,
            &value,
            "a path starting with / such as /ws",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins() {
        let list = AllowedOrigins::List(vec!["https://app.example".into()]);
        assert!(list.allows(Some("https://app.example")));
        assert!(!list.allows(Some("https://evil.example")));
        assert!(list.allows(None));
        assert!(AllowedOrigins::Any.allows(Some("https://evil.example")));
    }
}
