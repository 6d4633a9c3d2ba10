//! The server's configuration: read once from `WS_*` environment variables, checked
//! completely before any port is bound, so a typo stops start-up with one clear line.
//!
//! One typed part per concern, each read (with envy) and validated in its own module:
//! [`TransportConfig`], [`LimitsConfig`], [`GateSettings`], [`ClusterConfig`],
//! [`UsersConfig`], [`HistoryConfig`], [`ProxyConfig`], [`LogConfig`]. A `WS_`
//! variable that no part knows is refused, and so is a set of values that do not fit
//! together.

mod cluster;
mod gate;
mod history;
mod limits;
mod log;
mod proxy;
mod transport;
mod users;
mod values;

use serde::Deserialize;

pub use cluster::{Backbone, ClusterConfig};
pub use gate::GateSettings;
pub use history::HistoryConfig;
pub use limits::LimitsConfig;
pub use log::{LogConfig, LogFormat};
pub use proxy::ProxyConfig;
pub use transport::{AllowedOrigins, TransportConfig};
pub use users::{UsersConfig, WebhookSettings};
pub use values::parse_duration;

/// The validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub transport: TransportConfig,
    pub limits: LimitsConfig,
    pub gate: GateSettings,
    pub cluster: ClusterConfig,
    pub users: UsersConfig,
    pub history: HistoryConfig,
    pub proxy: ProxyConfig,
    pub log: LogConfig,
}

/// A configuration value that cannot be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid configuration: {variable}={value:?}: expected {expected}")]
pub struct ConfigError {
    pub variable: String,
    pub value: String,
    pub expected: String,
}

/// `WS_*` variables as given, for the parts to read.
pub(crate) type Vars = Vec<(String, String)>;

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(std::env::vars())
    }

    /// Reads `WS_*` pairs from any source (tests pass their own).
    pub fn from_vars(
        vars: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let vars: Vars = vars
            .into_iter()
            .filter(|(key, _)| key.starts_with("WS_"))
            .collect();
        refuse_unknown(&vars)?;
        let transport = TransportConfig::load(&vars)?;
        let limits = LimitsConfig::load(&vars)?;
        let gate = GateSettings::load(&vars)?;
        let cluster = ClusterConfig::load(&vars)?;
        let users = UsersConfig::load(&vars)?;
        let history = HistoryConfig::load(&vars)?;
        let proxy = ProxyConfig::load(&vars)?;
        let log = LogConfig::load(&vars)?;
        let config = Self {
            transport,
            limits,
            gate,
            cluster,
            users,
            history,
            proxy,
            log,
        };
        config.check_consistency()?;
        Ok(config)
    }

    /// Rules that span parts.
    fn check_consistency(&self) -> Result<(), ConfigError> {
        if self.proxy.connect_url.is_some() && self.gate.auth_enabled {
            return Err(ConfigError {
                variable: "WS_PROXY_CONNECT_URL".into(),
                value: "set".into(),
                expected:
                    "WS_AUTH_ENABLED unset or false: the connect proxy's backend decides identity"
                        .into(),
            });
        }
        // A notification carries the data plus its envelope: method, channel name.
        const FRAMING: usize = 512;
        let publish = self.limits.gate.max_publish_size;
        let needed = 2 * (publish + FRAMING);
        if self.transport.send_buffer < needed {
            return Err(ConfigError {
                variable: "WS_SEND_BUFFER".into(),
                value: self.transport.send_buffer.to_string(),
                expected: format!(
                    "at least twice WS_MAX_PUBLISH_SIZE ({publish}) plus framing: {needed} bytes or more"
                ),
            });
        }
        Ok(())
    }
}

/// Every variable some part reads.
fn known_variables() -> Vec<String> {
    [
        values::fields::<transport::Raw>(),
        values::fields::<limits::Raw>(),
        values::fields::<gate::Raw>(),
        values::fields::<cluster::Raw>(),
        values::fields::<users::Raw>(),
        values::fields::<history::Raw>(),
        values::fields::<proxy::Raw>(),
        values::fields::<log::Raw>(),
    ]
    .concat()
    .iter()
    .map(|field| format!("WS_{}", field.to_ascii_uppercase()))
    .collect()
}

/// A `WS_` variable the server does not know is a typo until proven otherwise: a
/// misspelt limit must not silently fall back to its default.
fn refuse_unknown(vars: &Vars) -> Result<(), ConfigError> {
    let known = known_variables();
    let mut unknown: Vec<&str> = vars
        .iter()
        .map(|(key, _)| key.as_str())
        .filter(|key| !known.iter().any(|name| name == key))
        .collect();
    if unknown.is_empty() {
        return Ok(());
    }
    unknown.sort_unstable();
    unknown.dedup();
    let hints: Vec<String> = unknown
        .iter()
        .filter_map(|name| closest(name, &known).map(|near| format!("{name} -> {near}?")))
        .collect();
    Err(ConfigError {
        variable: unknown.join(","),
        value: "set".into(),
        expected: if hints.is_empty() {
            "only variables Chorus knows (see the README's configuration table)".into()
        } else {
            format!(
                "only variables Chorus knows (did you mean {})",
                hints.join(", ")
            )
        },
    })
}

/// The known name nearest to `name`, when it is near enough to be a typo of it.
fn closest<'a>(name: &str, known: &'a [String]) -> Option<&'a str> {
    known
        .iter()
        .map(|candidate| (values::edit_distance(name, candidate), candidate))
        .filter(|(distance, _)| *distance <= 3)
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate.as_str())
}

/// Reads one part's raw values with envy.
pub(crate) fn read<T: for<'de> Deserialize<'de>>(vars: &Vars) -> Result<T, ConfigError> {
    // Every field is an optional string, so envy can only fail on malformed names.
    envy::prefixed("WS_")
        .from_iter(vars.iter().cloned())
        .map_err(|err| ConfigError {
            variable: "WS_*".into(),
            value: String::new(),
            expected: err.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    pub(super) fn config(vars: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_vars(vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())))
    }

    #[test]
    fn defaults_follow_the_contract() {
        let config = config(&[]).expect("defaults are valid");
        let transport = &config.transport;
        assert_eq!(transport.port, 8080);
        assert_eq!(transport.ws_path, "/ws");
        assert_eq!(transport.send_buffer, 1 << 20);
        assert_eq!(transport.write_timeout, Duration::from_secs(10));
        assert_eq!(transport.handshake_timeout, Duration::from_secs(10));
        assert_eq!(transport.max_message_size, 1 << 20);
        assert_eq!(transport.ping_interval, Duration::from_secs(10));
        assert_eq!(transport.pong_timeout, Duration::from_secs(60));
        assert_eq!(transport.shutdown_grace, Duration::from_secs(10));
        assert_eq!(transport.allowed_origins, AllowedOrigins::Any);
        assert!(transport.echo_path.is_none());
        assert_eq!(config.cluster.backbone, Backbone::Standalone);
        assert_eq!(config.cluster.pubsub_channel, "websocket.broadcast");
        assert_eq!(config.limits.gate, chorus_gate::Limits::default());
    }

    #[test]
    fn every_bad_value_names_its_variable() {
        for (variable, value) in [
            ("WS_PORT", "http"),
            ("WS_PORT", "70000"),
            ("WS_HOST", "example.com"),
            ("WS_PATH", "ws"),
            ("WS_SEND_BUFFER", "0"),
            ("WS_SEND_BUFFER", "lots"),
            ("WS_WRITE_TIMEOUT", "0s"),
            ("WS_HANDSHAKE_TIMEOUT", "never"),
            ("WS_MAX_MESSAGE_SIZE", "lots"),
            ("WS_PING_INTERVAL", "0s"),
            ("WS_PONG_TIMEOUT", "10 parsecs"),
            ("WS_PUBSUB_ADAPTER", "kafka"),
            ("WS_PUBSUB_ENABLED", "maybe"),
            ("WS_LOG_FORMAT", "xml"),
            ("WS_MAX_CONNECTIONS", "-1"),
            ("WS_AUTH_ENABLED", "maybe"),
            ("WS_PUBSUB_CHANNEL", "has space"),
            ("WS_JWT_LEEWAY", "a while"),
            ("WS_MAX_CONNECTIONS_PER_USER", "many"),
            ("WS_CLIENT_BROADCAST", "perhaps"),
            ("WS_RATE_LIMIT_ENABLED", "sometimes"),
            ("WS_RATE_LIMIT_RATE", "fast"),
            ("WS_PUBLISH_RATE", "-5"),
            ("WS_PUBLISH_BYTES_RATE", "1 lot"),
            ("WS_MAX_BATCH", "0"),
            ("WS_MAX_SUBSCRIPTIONS", "x"),
            ("WS_CONN_RATE", "1.5"),
            ("WS_TRUSTED_PROXIES", "10.0.0.0/33"),
            ("WS_MAX_PENDING_CALLS", "0"),
            ("WS_BACKBONE_QUEUE", "0"),
            ("WS_PROXY_RPC_URL", "ftp://app/rpc"),
            ("WS_PROXY_CONNECT_URL", "not a url"),
            ("WS_PROXY_TIMEOUT", "0s"),
            ("WS_PROXY_MAX_INFLIGHT", "0"),
            ("WS_PROXY_HEADERS", "bad header"),
            ("WS_PROXY_BREAKER_FAILURES", "many"),
            ("WS_PROXY_BREAKER_COOLDOWN", "forever"),
        ] {
            let err = config(&[(variable, value)]).expect_err(variable);
            assert_eq!(err.variable, variable);
            assert!(err.to_string().contains(value), "{err}");
            assert_eq!(err.to_string().lines().count(), 1, "{err}");
        }
    }

    #[test]
    fn unknown_variables_are_refused_with_a_hint() {
        let err = config(&[("WS_PONG_TIMOUT", "30s"), ("WS_PORT", "9000")])
            .expect_err("a typo is not ignored");
        assert_eq!(err.variable, "WS_PONG_TIMOUT");
        assert!(err.to_string().contains("WS_PONG_TIMEOUT"), "{err}");
        let err = config(&[("WS_ZZZ", "1"), ("WS_AAA", "2")]).expect_err("unknown");
        assert_eq!(err.variable, "WS_AAA,WS_ZZZ");
        assert!(
            config(&[("OTHER_VAR", "1"), ("PATH", "/bin")]).is_ok(),
            "only WS_ names are ours"
        );
    }

    #[test]
    fn inconsistent_sets_are_refused() {
        let err = config(&[("WS_PING_INTERVAL", "30s"), ("WS_PONG_TIMEOUT", "20s")])
            .expect_err("pong before ping");
        assert_eq!(err.variable, "WS_PONG_TIMEOUT");
        let err = config(&[("WS_PING_INTERVAL", "30s"), ("WS_PONG_TIMEOUT", "30s")])
            .expect_err("pong equal to ping");
        assert_eq!(err.variable, "WS_PONG_TIMEOUT");
        let err = config(&[
            ("WS_PROXY_CONNECT_URL", "http://app/connect"),
            ("WS_AUTH_ENABLED", "true"),
            ("WS_BEARER_TOKENS", "a-static-token"),
        ])
        .expect_err("two deciders of identity");
        assert_eq!(err.variable, "WS_PROXY_CONNECT_URL");
        let err = config(&[("WS_SEND_BUFFER", "64KiB")]).expect_err("below 2 x publish");
        assert_eq!(err.variable, "WS_SEND_BUFFER");
        assert!(err.to_string().contains("WS_MAX_PUBLISH_SIZE"), "{err}");
        assert!(
            config(&[
                ("WS_SEND_BUFFER", "64KiB"),
                ("WS_MAX_PUBLISH_SIZE", "16KiB")
            ])
            .is_ok()
        );
        let err = config(&[("WS_MAX_PUBLISH_SIZE", "1MiB"), ("WS_SEND_BUFFER", "4MiB")])
            .expect_err("larger than the byte budget's burst");
        assert_eq!(err.variable, "WS_MAX_PUBLISH_SIZE");
        assert!(
            config(&[
                ("WS_MAX_PUBLISH_SIZE", "1MiB"),
                ("WS_SEND_BUFFER", "4MiB"),
                ("WS_PUBLISH_BYTES_RATE", "0"),
                ("WS_PUBLISH_BYTES_TOTAL", "0"),
            ])
            .is_ok()
        );
    }
}
