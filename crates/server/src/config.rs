//! The server's configuration: read once from `WS_*` environment variables, checked
//! completely before any port is bound, so a typo stops start-up with one clear line.

use std::net::IpAddr;
use std::time::Duration;

use serde::Deserialize;

/// Everything the environment may set, as text: parsing happens in [`Config::from_raw`]
/// so that every error names its variable.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RawConfig {
    host: Option<String>,
    port: Option<String>,
    path: Option<String>,
    echo_path: Option<String>,
    node_id: Option<String>,
    pubsub_enabled: Option<String>,
    pubsub_adapter: Option<String>,
    redis_url: Option<String>,
    nats_url: Option<String>,
    pubsub_channel: Option<String>,
    auth_enabled: Option<String>,
    rate_limit_enabled: Option<String>,
    max_message_size: Option<String>,
    send_buffer: Option<String>,
    ping_interval: Option<String>,
    pong_timeout: Option<String>,
    allowed_origins: Option<String>,
    max_connections: Option<String>,
    shutdown_grace: Option<String>,
    log_level: Option<String>,
    log_format: Option<String>,
}

/// Which backbone joins this replica to the others.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Backbone {
    /// Standalone: no other replica hears anything.
    Standalone,
    /// The in-process bus (one process, or tests).
    Local,
    Redis {
        url: String,
    },
    Nats {
        url: String,
    },
}

impl Backbone {
    pub fn adapter(&self) -> &'static str {
        match self {
            Self::Standalone | Self::Local => "local",
            Self::Redis { .. } => "redis",
            Self::Nats { .. } => "nats",
        }
    }
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub host: IpAddr,
    pub port: u16,
    pub ws_path: String,
    /// Conformance echo endpoint; off when `None`.
    pub echo_path: Option<String>,
    pub node_id: String,
    pub backbone: Backbone,
    /// Topic for broadcasts, and prefix of every channel topic.
    pub pubsub_channel: String,
    pub max_message_size: usize,
    pub send_buffer: usize,
    pub ping_interval: Duration,
    pub pong_timeout: Duration,
    pub allowed_origins: AllowedOrigins,
    /// 0 means no limit.
    pub max_connections: usize,
    pub shutdown_grace: Duration,
    pub log_level: String,
    pub log_format: LogFormat,
}

/// A configuration value that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid configuration: {variable}={value:?}: expected {expected}")]
pub struct ConfigError {
    pub variable: &'static str,
    pub value: String,
    pub expected: String,
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(std::env::vars())
    }

    /// Reads `WS_*` pairs from any source (tests pass their own).
    pub fn from_vars(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        // Every field is a string, so envy itself can only fail on malformed names.
        let raw: RawConfig = envy::prefixed("WS_")
            .from_iter(vars.into_iter().filter(|(key, _)| key.starts_with("WS_")))
            .map_err(|err| ConfigError {
                variable: "WS_*",
                value: String::new(),
                expected: err.to_string(),
            })?;
        Self::from_raw(raw)
    }

    fn from_raw(raw: RawConfig) -> Result<Self, ConfigError> {
        refuse_unbuilt(
            "WS_AUTH_ENABLED",
            raw.auth_enabled.as_deref(),
            "authentication",
        )?;
        refuse_unbuilt(
            "WS_RATE_LIMIT_ENABLED",
            raw.rate_limit_enabled.as_deref(),
            "rate limiting",
        )?;

        let host = parse_or(
            "WS_HOST",
            raw.host,
            "0.0.0.0".parse().ok(),
            "an IP address such as 0.0.0.0 or 127.0.0.1",
            |v| v.parse().ok(),
        )?;
        let port = parse_or(
            "WS_PORT",
            raw.port,
            Some(8080),
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
                "a path distinct from /health, /ready, /metrics and WS_ECHO_PATH",
            ));
        }
        if echo_path
            .as_deref()
            .is_some_and(|echo| RESERVED_PATHS.contains(&echo))
        {
            return Err(error(
                "WS_ECHO_PATH",
                echo_path.as_deref().unwrap_or_default(),
                "a path distinct from /health, /ready and /metrics",
            ));
        }
        let node_id = match raw.node_id.filter(|v| !v.is_empty()) {
            Some(id) if id.len() <= 64 && id.bytes().all(|b| b.is_ascii_graphic()) => id,
            Some(id) => {
                return Err(error(
                    "WS_NODE_ID",
                    &id,
                    "1 to 64 printable ASCII characters",
                ));
            }
            None => default_node_id(),
        };
        let enabled = parse_or(
            "WS_PUBSUB_ENABLED",
            raw.pubsub_enabled,
            Some(false),
            "true or false",
            parse_bool,
        )?;
        let adapter = raw.pubsub_adapter.unwrap_or_else(|| "local".into());
        let backbone = backbone(enabled, &adapter, raw.redis_url, raw.nats_url)?;
        let pubsub_channel = raw
            .pubsub_channel
            .unwrap_or_else(|| "websocket.broadcast".into());
        if pubsub_channel.is_empty()
            || pubsub_channel.len() > 200
            || !pubsub_channel
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-:.".contains(&b))
        {
            return Err(error(
                "WS_PUBSUB_CHANNEL",
                &pubsub_channel,
                "1 to 200 characters of A-Z a-z 0-9 _ - : .",
            ));
        }
        let max_message_size = parse_or(
            "WS_MAX_MESSAGE_SIZE",
            raw.max_message_size,
            Some(1 << 20),
            "a size in bytes from 64 B to 1 GiB, such as 65536, 64KiB or 1MiB",
            |v| parse_size(v).filter(|n| (64..=1 << 30).contains(n)),
        )?;
        let send_buffer = parse_or(
            "WS_SEND_BUFFER",
            raw.send_buffer,
            Some(256),
            "a queue length from 1 to 1000000",
            |v| v.parse().ok().filter(|n| (1..=1_000_000).contains(n)),
        )?;
        let ping_interval = parse_or(
            "WS_PING_INTERVAL",
            raw.ping_interval,
            Some(Duration::from_secs(10)),
            "a duration above zero such as 500ms, 10s or 1m",
            |v| parse_duration(v).filter(|d| !d.is_zero()),
        )?;
        let pong_timeout = parse_or(
            "WS_PONG_TIMEOUT",
            raw.pong_timeout,
            Some(Duration::from_secs(60)),
            "a duration above zero such as 30s or 1m",
            |v| parse_duration(v).filter(|d| !d.is_zero()),
        )?;
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
            Some(0),
            "a whole number (0 means no limit)",
            |v| v.parse().ok(),
        )?;
        let shutdown_grace = parse_or(
            "WS_SHUTDOWN_GRACE",
            raw.shutdown_grace,
            Some(Duration::from_secs(10)),
            "a duration such as 10s",
            parse_duration,
        )?;
        let log_level = raw.log_level.unwrap_or_else(|| "info".into());
        if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
            return Err(error(
                "WS_LOG_LEVEL",
                &log_level,
                "trace, debug, info, warn, error or a filter such as chorus=debug",
            ));
        }
        let log_format = match raw.log_format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => return Err(error("WS_LOG_FORMAT", other, "text or json")),
        };
        Ok(Self {
            host,
            port,
            ws_path,
            echo_path,
            node_id,
            backbone,
            pubsub_channel,
            max_message_size,
            send_buffer,
            ping_interval,
            pong_timeout,
            allowed_origins,
            max_connections,
            shutdown_grace,
            log_level,
            log_format,
        })
    }
}

const RESERVED_PATHS: [&str; 3] = ["/health", "/ready", "/metrics"];

fn error(variable: &'static str, value: &str, expected: &str) -> ConfigError {
    ConfigError {
        variable,
        value: value.to_owned(),
        expected: expected.to_owned(),
    }
}

/// Parses `value` when set (an empty value counts as unset), else uses `default`.
fn parse_or<T>(
    variable: &'static str,
    value: Option<String>,
    default: Option<T>,
    expected: &str,
    parse: impl FnOnce(&str) -> Option<T>,
) -> Result<T, ConfigError> {
    match value.as_deref().map(str::trim) {
        None | Some("") => default.ok_or_else(|| error(variable, "", expected)),
        Some(text) => parse(text).ok_or_else(|| error(variable, text, expected)),
    }
}

/// Settings for features that are not built yet: refusing them is safer than running
/// open while the operator believes clients are checked.
fn refuse_unbuilt(
    variable: &'static str,
    value: Option<&str>,
    feature: &str,
) -> Result<(), ConfigError> {
    match value.map(parse_bool) {
        None | Some(Some(false)) => Ok(()),
        Some(Some(true)) => Err(error(
            variable,
            "true",
            &format!("false: {feature} is not available in this version"),
        )),
        Some(None) => Err(error(variable, value.unwrap_or_default(), "true or false")),
    }
}

fn path(variable: &'static str, value: String) -> Result<String, ConfigError> {
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

fn backbone(
    enabled: bool,
    adapter: &str,
    redis_url: Option<String>,
    nats_url: Option<String>,
) -> Result<Backbone, ConfigError> {
    let set = |url: Option<String>| url.filter(|u| !u.trim().is_empty());
    let adapter = adapter.trim().to_ascii_lowercase();
    // URLs are checked even when pubsub is disabled: a typo should not wait for the
    // day someone turns the cluster on.
    let backbone = match adapter.as_str() {
        "local" => Backbone::Local,
        "redis" => match set(redis_url) {
            Some(url) => {
                chorus_pubsub::redis::validate_url(&url)
                    .map_err(|err| url_error("WS_REDIS_URL", &url, &err))?;
                Backbone::Redis { url }
            }
            None => Backbone::Standalone,
        },
        "nats" => match set(nats_url) {
            Some(url) => {
                chorus_pubsub::nats::validate_url(&url)
                    .map_err(|err| url_error("WS_NATS_URL", &url, &err))?;
                Backbone::Nats { url }
            }
            None => Backbone::Standalone,
        },
        other => return Err(error("WS_PUBSUB_ADAPTER", other, "local, redis or nats")),
    };
    Ok(if enabled {
        backbone
    } else {
        Backbone::Standalone
    })
}

/// A URL error that never prints the URL's password.
fn url_error(variable: &'static str, url: &str, err: &chorus_pubsub::PubsubError) -> ConfigError {
    error(
        variable,
        &chorus_pubsub::redact_url(url),
        &format!("a usable URL ({err})"),
    )
}

fn parse_bool(value: &str) -> Option<bool> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

/// `500ms`, `10s`, `1m`, `1h`; a bare number is seconds.
pub fn parse_duration(value: &str) -> Option<Duration> {
    let value = value.trim();
    let digits_end = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(digits_end);
    let number: u64 = number.parse().ok()?;
    let millis = match unit.trim() {
        "ms" => number,
        "" | "s" => number.checked_mul(1_000)?,
        "m" => number.checked_mul(60_000)?,
        "h" => number.checked_mul(3_600_000)?,
        _ => return None,
    };
    Some(Duration::from_millis(millis))
}

/// `65536`, `64KiB`, `64KB`, `1MiB`, `1M`: binary multiples.
fn parse_size(value: &str) -> Option<usize> {
    let digits_end = value
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(value.len());
    let (number, unit) = value.split_at(digits_end);
    let number: usize = number.parse().ok()?;
    let multiplier = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return None,
    };
    number.checked_mul(multiplier)
}

fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| {
            h.trim()
                .chars()
                .filter(char::is_ascii_alphanumeric)
                .take(40)
                .collect::<String>()
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "chorus".into());
    format!("{host}-{:06x}", rand::random::<u32>() & 0x00ff_ffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_vars(vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())))
    }

    #[test]
    fn defaults_follow_the_contract() {
        let config = config(&[]).expect("defaults are valid");
        assert_eq!(config.port, 8080);
        assert_eq!(config.ws_path, "/ws");
        assert_eq!(config.send_buffer, 256);
        assert_eq!(config.max_message_size, 1 << 20);
        assert_eq!(config.ping_interval, Duration::from_secs(10));
        assert_eq!(config.pong_timeout, Duration::from_secs(60));
        assert_eq!(config.shutdown_grace, Duration::from_secs(10));
        assert_eq!(config.backbone, Backbone::Standalone);
        assert_eq!(config.allowed_origins, AllowedOrigins::Any);
        assert_eq!(config.pubsub_channel, "websocket.broadcast");
        assert!(config.echo_path.is_none());
    }

    #[test]
    fn every_bad_value_names_its_variable() {
        for (variable, value) in [
            ("WS_PORT", "http"),
            ("WS_PORT", "70000"),
            ("WS_HOST", "example.com"),
            ("WS_PATH", "ws"),
            ("WS_SEND_BUFFER", "0"),
            ("WS_MAX_MESSAGE_SIZE", "lots"),
            ("WS_PING_INTERVAL", "0s"),
            ("WS_PONG_TIMEOUT", "10 parsecs"),
            ("WS_PUBSUB_ADAPTER", "kafka"),
            ("WS_PUBSUB_ENABLED", "maybe"),
            ("WS_LOG_FORMAT", "xml"),
            ("WS_MAX_CONNECTIONS", "-1"),
            ("WS_AUTH_ENABLED", "true"),
            ("WS_PUBSUB_CHANNEL", "has space"),
        ] {
            let err = config(&[(variable, value)]).expect_err(variable);
            assert_eq!(err.variable, variable);
            assert!(err.to_string().contains(value), "{err}");
        }
    }

    #[test]
    fn backbone_selection() {
        let enabled = |adapter: &str, url: (&str, &str)| {
            config(&[
                ("WS_PUBSUB_ENABLED", "true"),
                ("WS_PUBSUB_ADAPTER", adapter),
                url,
            ])
        };
        assert_eq!(
            enabled("redis", ("WS_REDIS_URL", "redis://127.0.0.1:6379")).map(|c| c.backbone),
            Ok(Backbone::Redis {
                url: "redis://127.0.0.1:6379".into()
            })
        );
        assert_eq!(
            enabled("nats", ("WS_NATS_URL", "")).map(|c| c.backbone),
            Ok(Backbone::Standalone)
        );
        assert_eq!(
            enabled("nats", ("WS_NATS_URL", "nats://"))
                .map(|c| c.backbone)
                .map_err(|e| e.variable),
            Err("WS_NATS_URL")
        );
        let secret = enabled("redis", ("WS_REDIS_URL", "rediss://user:hunter2@host:6379"))
            .expect_err("TLS is not built");
        assert!(!secret.to_string().contains("hunter2"), "{secret}");
        assert_eq!(
            enabled("local", ("WS_X", "")).map(|c| c.backbone),
            Ok(Backbone::Local)
        );
        assert_eq!(
            config(&[
                ("WS_PUBSUB_ADAPTER", "redis"),
                ("WS_REDIS_URL", "redis://x")
            ])
            .map(|c| c.backbone),
            Ok(Backbone::Standalone)
        );
    }

    #[test]
    fn units() {
        assert_eq!(parse_duration("1m"), Some(Duration::from_secs(60)));
        assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("5"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("s"), None);
        assert_eq!(parse_size("64KiB"), Some(65536));
        assert_eq!(parse_size("1MiB"), Some(1 << 20));
        assert_eq!(parse_size("12"), Some(12));
    }

    #[test]
    fn origins() {
        let list = AllowedOrigins::List(vec!["https://app.example".into()]);
        assert!(list.allows(Some("https://app.example")));
        assert!(!list.allows(Some("https://evil.example")));
        assert!(list.allows(None));
        assert!(AllowedOrigins::Any.allows(Some("https://evil.example")));
    }
}
