//! How this replica joins the others: its name, the backbone, the topic prefix.

use serde::Deserialize;

use super::values::{error, parse_bool, parse_count, parse_or};
use super::{ConfigError, Vars, read};

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Raw {
    node_id: Option<String>,
    pubsub_enabled: Option<String>,
    pubsub_adapter: Option<String>,
    redis_url: Option<String>,
    nats_url: Option<String>,
    pubsub_channel: Option<String>,
    backbone_queue: Option<String>,
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

#[derive(Clone, Debug)]
pub struct ClusterConfig {
    pub node_id: String,
    pub backbone: Backbone,
    /// Topic for broadcasts, and prefix of every channel topic.
    pub pubsub_channel: String,
    /// Received envelopes that may wait for this replica's receive workers before the
    /// adapter loses (and counts) them.
    pub backbone_queue: usize,
}

impl ClusterConfig {
    pub(super) fn load(vars: &Vars) -> Result<Self, ConfigError> {
        let raw: Raw = read(vars)?;
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
            false,
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
        let backbone_queue = parse_or(
            "WS_BACKBONE_QUEUE",
            raw.backbone_queue,
            chorus_pubsub::Inbox::DEFAULT_BUFFER,
            "a whole number from 16 to 1048576",
            parse_count(16..=1 << 20),
        )?;
        Ok(Self {
            node_id,
            backbone,
            pubsub_channel,
            backbone_queue,
        })
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
fn url_error(variable: &str, url: &str, err: &chorus_pubsub::PubsubError) -> ConfigError {
    error(
        variable,
        &chorus_pubsub::redact_url(url),
        &format!("a usable URL ({err})"),
    )
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
    use super::super::tests::config;
    use super::*;

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
            enabled("redis", ("WS_REDIS_URL", "redis://127.0.0.1:6379"))
                .map(|c| c.cluster.backbone),
            Ok(Backbone::Redis {
                url: "redis://127.0.0.1:6379".into()
            })
        );
        assert_eq!(
            enabled("nats", ("WS_NATS_URL", "")).map(|c| c.cluster.backbone),
            Ok(Backbone::Standalone)
        );
        assert_eq!(
            enabled("nats", ("WS_NATS_URL", "nats://"))
                .map(|c| c.cluster.backbone)
                .map_err(|e| e.variable),
            Err("WS_NATS_URL".to_owned())
        );
        let secret = enabled("redis", ("WS_REDIS_URL", "rediss://user:hunter2@host:6379"))
            .expect_err("TLS is not built");
        assert!(!secret.to_string().contains("hunter2"), "{secret}");
        assert_eq!(
            enabled("local", ("WS_NODE_ID", "")).map(|c| c.cluster.backbone),
            Ok(Backbone::Local)
        );
        assert_eq!(
            config(&[
                ("WS_PUBSUB_ADAPTER", "redis"),
                ("WS_REDIS_URL", "redis://x")
            ])
            .map(|c| c.cluster.backbone),
            Ok(Backbone::Standalone)
        );
    }
}
