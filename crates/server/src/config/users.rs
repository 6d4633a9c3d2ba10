//! Users, devices, presence and the server API (section 10): device replacement,
//! presence liveness, the `/api` key, and the lifecycle webhook.

use std::time::Duration;

use serde::Deserialize;

use super::values::{error, parse_bool, parse_count, parse_duration, parse_or};
use super::{ConfigError, Vars, read};

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Raw {
    device_replace: Option<String>,
    presence_ttl: Option<String>,
    api_key: Option<String>,
    webhook_url: Option<String>,
    webhook_secret: Option<String>,
    webhook_queue: Option<String>,
    webhook_timeout: Option<String>,
}

/// Shortest API key and webhook secret accepted: guessable keys are refused.
const MIN_SECRET_LEN: usize = 16;

/// Where lifecycle events are POSTed.
#[derive(Clone, Debug)]
pub struct WebhookSettings {
    pub url: hyper::Uri,
    pub secret: String,
    /// Events waiting to be sent; more are dropped and counted.
    pub queue: usize,
    /// How long one POST may take.
    pub timeout: Duration,
}

#[derive(Clone, Debug)]
pub struct UsersConfig {
    /// A second connection of one user and device replaces the first.
    pub device_replace: bool,
    /// A dead replica's presence is gone within this.
    pub presence_ttl: Duration,
    /// `/api` answers with this bearer key; without one, `/api` is 404.
    pub api_key: Option<String>,
    pub webhook: Option<WebhookSettings>,
}

impl UsersConfig {
    pub(super) fn load(vars: &Vars) -> Result<Self, ConfigError> {
        let raw: Raw = read(vars)?;
        let set = |value: Option<String>| value.filter(|v| !v.trim().is_empty());
        let device_replace = parse_or(
            "WS_DEVICE_REPLACE",
            raw.device_replace,
            true,
            "true or false",
            parse_bool,
        )?;
        let presence_ttl = parse_or(
            "WS_PRESENCE_TTL",
            raw.presence_ttl,
            Duration::from_secs(15),
            "a duration from 3s to 1h, such as 15s",
            |text| {
                parse_duration(text).filter(|ttl| {
                    (Duration::from_secs(3)..=Duration::from_secs(3600)).contains(ttl)
                })
            },
        )?;
        // Secrets: errors name the variable, never the value.
        let api_key = match set(raw.api_key) {
            Some(key) if key.trim().len() < MIN_SECRET_LEN => {
                return Err(error(
                    "WS_API_KEY",
                    "(hidden)",
                    "at least 16 characters (e.g. openssl rand -hex 24)",
                ));
            }
            other => other.map(|key| key.trim().to_owned()),
        };
        let webhook = match set(raw.webhook_url) {
            None => {
                if set(raw.webhook_secret).is_some() {
                    return Err(error(
                        "WS_WEBHOOK_SECRET",
                        "(hidden)",
                        "WS_WEBHOOK_URL as well: the secret signs webhook requests",
                    ));
                }
                None
            }
            Some(url) => {
                let parsed: Option<hyper::Uri> = url.trim().parse().ok();
                let uri = parsed
                    .filter(|uri| {
                        matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some()
                    })
                    .ok_or_else(|| {
                        error(
                            "WS_WEBHOOK_URL",
                            &url,
                            "an http:// or https:// URL such as https://app.example/chorus/events",
                        )
                    })?;
                let secret = match set(raw.webhook_secret) {
                    Some(secret) if secret.trim().len() >= MIN_SECRET_LEN => {
                        secret.trim().to_owned()
                    }
                    _ => {
                        return Err(error(
                            "WS_WEBHOOK_SECRET",
                            "(hidden)",
                            "at least 16 characters when WS_WEBHOOK_URL is set: receivers check the signature",
                        ));
                    }
                };
                Some(WebhookSettings {
                    url: uri,
                    secret,
                    queue: parse_or(
                        "WS_WEBHOOK_QUEUE",
                        raw.webhook_queue,
                        10_000,
                        "a whole number from 1 to 1000000",
                        parse_count(1..=1_000_000),
                    )?,
                    timeout: parse_or(
                        "WS_WEBHOOK_TIMEOUT",
                        raw.webhook_timeout,
                        Duration::from_secs(5),
                        "a duration from 100ms to 1m, such as 5s",
                        |text| {
                            parse_duration(text).filter(|timeout| {
                                (Duration::from_millis(100)..=Duration::from_secs(60))
                                    .contains(timeout)
                            })
                        },
                    )?,
                })
            }
        };
        Ok(Self {
            device_replace,
            presence_ttl,
            api_key,
            webhook,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::config;
    use super::*;

    #[test]
    fn defaults() {
        let users = config(&[]).expect("defaults").users;
        assert!(users.device_replace);
        assert_eq!(users.presence_ttl, Duration::from_secs(15));
        assert!(users.api_key.is_none());
        assert!(users.webhook.is_none());
    }

    #[test]
    fn webhooks_need_a_url_and_a_secret() {
        let secret = "0123456789abcdef0123";
        let err = config(&[("WS_WEBHOOK_URL", "http://hooks.local/x")]).expect_err("no secret");
        assert_eq!(err.variable, "WS_WEBHOOK_SECRET");
        let err = config(&[("WS_WEBHOOK_SECRET", secret)]).expect_err("no url");
        assert_eq!(err.variable, "WS_WEBHOOK_SECRET");
        let err = config(&[("WS_WEBHOOK_URL", "ftp://x"), ("WS_WEBHOOK_SECRET", secret)])
            .expect_err("scheme");
        assert_eq!(err.variable, "WS_WEBHOOK_URL");
        let users = config(&[
            ("WS_WEBHOOK_URL", "http://hooks.local:9000/events"),
            ("WS_WEBHOOK_SECRET", secret),
            ("WS_WEBHOOK_QUEUE", "50"),
        ])
        .expect("valid")
        .users;
        let webhook = users.webhook.expect("configured");
        assert_eq!(webhook.queue, 50);
        assert_eq!(webhook.url.port_u16(), Some(9000));
    }

    #[test]
    fn bad_values_name_their_variable_and_hide_secrets() {
        for (variable, value) in [
            ("WS_DEVICE_REPLACE", "sometimes"),
            ("WS_PRESENCE_TTL", "1s"),
            ("WS_PRESENCE_TTL", "soon"),
            ("WS_API_KEY", "short"),
        ] {
            let err = config(&[(variable, value)]).expect_err(variable);
            assert_eq!(err.variable, variable);
        }
        let err = config(&[("WS_API_KEY", "tiny-secret")]).expect_err("short key");
        assert!(!err.to_string().contains("tiny-secret"), "{err}");
    }
}
