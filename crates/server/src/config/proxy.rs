//! The backend proxy (section 13): where the application's backend answers, how long
//! it may take, how many requests may wait on it, which headers it sees, and how it
//! knows a request comes from Chorus.

use std::time::Duration;

use serde::Deserialize;

use super::values::{error, parse_count, parse_duration, parse_or};
use super::{ConfigError, Vars, read};

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Raw {
    proxy_connect_url: Option<String>,
    proxy_rpc_url: Option<String>,
    proxy_subscribe_url: Option<String>,
    proxy_publish_url: Option<String>,
    proxy_timeout: Option<String>,
    proxy_max_inflight: Option<String>,
    proxy_headers: Option<String>,
    proxy_secret: Option<String>,
    proxy_breaker_failures: Option<String>,
    proxy_breaker_cooldown: Option<String>,
}

/// Shortest secret accepted: guessable secrets are refused.
const MIN_SECRET_LEN: usize = 16;

#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub connect_url: Option<hyper::Uri>,
    pub rpc_url: Option<hyper::Uri>,
    pub subscribe_url: Option<hyper::Uri>,
    pub publish_url: Option<hyper::Uri>,
    /// How long one proxy request may take, retries of the connect call included.
    pub timeout: Duration,
    /// Requests in flight per proxy.
    pub max_inflight: usize,
    /// Lower-case names of the upgrade request's headers copied onto proxy requests.
    pub headers: Vec<String>,
    /// Signs every proxy request (`X-Chorus-Signature`), so the backend can tell it
    /// comes from Chorus.
    pub secret: Option<String>,
    /// Failures in a row that open a proxy's circuit breaker (0: never).
    pub breaker_failures: u32,
    /// How long an open breaker answers at once before it lets one request try.
    pub breaker_cooldown: Duration,
}

impl ProxyConfig {
    /// Whether any proxy is configured.
    pub fn any(&self) -> bool {
        self.connect_url.is_some()
            || self.rpc_url.is_some()
            || self.subscribe_url.is_some()
            || self.publish_url.is_some()
    }

    pub(super) fn load(vars: &Vars) -> Result<Self, ConfigError> {
        let raw: Raw = read(vars)?;
        let url =
            |variable: &str, value: Option<String>| -> Result<Option<hyper::Uri>, ConfigError> {
                let Some(text) = value.filter(|v| !v.trim().is_empty()) else {
                    return Ok(None);
                };
                text.trim()
                    .parse::<hyper::Uri>()
                    .ok()
                    .filter(|uri| {
                        matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some()
                    })
                    .map(Some)
                    .ok_or_else(|| {
                        error(
                            variable,
                            &text,
                            "an http:// or https:// URL such as http://app:3000/chorus/connect",
                        )
                    })
            };
        let headers = match raw.proxy_headers.as_deref().map(str::trim) {
            None | Some("") => Vec::new(),
            Some(list) => list
                .split(',')
                .map(|name| {
                    let name = name.trim().to_ascii_lowercase();
                    hyper::header::HeaderName::from_bytes(name.as_bytes())
                        .map(|_| name)
                        .map_err(|_| {
                            error(
                                "WS_PROXY_HEADERS",
                                list,
                                "comma-separated header names such as cookie,x-request-id",
                            )
                        })
                })
                .collect::<Result<_, _>>()?,
        };
        // Secrets: errors name the variable, never the value.
        let secret = match raw.proxy_secret.filter(|v| !v.trim().is_empty()) {
            Some(secret) if secret.trim().len() < MIN_SECRET_LEN => {
                return Err(error(
                    "WS_PROXY_SECRET",
                    "(hidden)",
                    "at least 16 characters (e.g. openssl rand -hex 24)",
                ));
            }
            other => other.map(|secret| secret.trim().to_owned()),
        };
        Ok(Self {
            connect_url: url("WS_PROXY_CONNECT_URL", raw.proxy_connect_url)?,
            rpc_url: url("WS_PROXY_RPC_URL", raw.proxy_rpc_url)?,
            subscribe_url: url("WS_PROXY_SUBSCRIBE_URL", raw.proxy_subscribe_url)?,
            publish_url: url("WS_PROXY_PUBLISH_URL", raw.proxy_publish_url)?,
            timeout: parse_or(
                "WS_PROXY_TIMEOUT",
                raw.proxy_timeout,
                Duration::from_secs(5),
                "a duration from 10ms to 1m, such as 5s",
                |text| {
                    parse_duration(text).filter(|timeout| {
                        (Duration::from_millis(10)..=Duration::from_secs(60)).contains(timeout)
                    })
                },
            )?,
            max_inflight: parse_or(
                "WS_PROXY_MAX_INFLIGHT",
                raw.proxy_max_inflight,
                256,
                "a whole number from 1 to 100000",
                parse_count(1..=100_000),
            )?,
            headers,
            secret,
            breaker_failures: parse_or(
                "WS_PROXY_BREAKER_FAILURES",
                raw.proxy_breaker_failures,
                5,
                "a whole number from 0 (never open) to 1000",
                parse_count(0..=1000),
            )?,
            breaker_cooldown: parse_or(
                "WS_PROXY_BREAKER_COOLDOWN",
                raw.proxy_breaker_cooldown,
                Duration::from_secs(5),
                "a duration from 10ms to 10m, such as 5s",
                |text| {
                    parse_duration(text).filter(|cooldown| {
                        (Duration::from_millis(10)..=Duration::from_secs(600)).contains(cooldown)
                    })
                },
            )?,
        })
    }
}
