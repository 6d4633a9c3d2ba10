//! Section 9's limits, read from the environment into the gate's typed [`Limits`],
//! plus who is trusted to say where a client comes from.

use std::time::Duration;

use chorus_gate::{Limits, Rate, RequestRate, TrustedProxies};
use serde::Deserialize;

use super::values::{error, parse_bool, parse_count, parse_duration, parse_or, parse_size};
use super::{ConfigError, Vars, read};

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Raw {
    rate_limit_enabled: Option<String>,
    rate_limit_rate: Option<String>,
    rate_limit_interval: Option<String>,
    rate_limit_burst: Option<String>,
    publish_rate: Option<String>,
    publish_burst: Option<String>,
    publish_bytes_rate: Option<String>,
    publish_rate_total: Option<String>,
    publish_bytes_total: Option<String>,
    max_publish_size: Option<String>,
    max_batch: Option<String>,
    max_subscriptions: Option<String>,
    conn_rate: Option<String>,
    max_connections_per_ip: Option<String>,
    trusted_proxies: Option<String>,
}

#[derive(Clone, Debug)]
pub struct LimitsConfig {
    pub gate: Limits,
    /// Proxies whose `X-Forwarded-For` names the client.
    pub trusted_proxies: TrustedProxies,
}

const COUNT: &str = "a whole number";

impl LimitsConfig {
    pub(super) fn load(vars: &Vars) -> Result<Self, ConfigError> {
        let raw: Raw = read(vars)?;
        let defaults = Limits::default();
        let enabled = parse_or(
            "WS_RATE_LIMIT_ENABLED",
            raw.rate_limit_enabled,
            false,
            "true or false",
            parse_bool,
        )?;
        // Checked whether or not the budget is on: a bad value is a bad value.
        let request_rate = RequestRate {
            rate: parse_or(
                "WS_RATE_LIMIT_RATE",
                raw.rate_limit_rate,
                100,
                "a whole number of requests from 1 up",
                parse_count(1..=u32::MAX),
            )?,
            interval: parse_or(
                "WS_RATE_LIMIT_INTERVAL",
                raw.rate_limit_interval,
                Duration::from_secs(1),
                "a duration above zero such as 1s",
                |v| parse_duration(v).filter(|d| !d.is_zero()),
            )?,
            burst: parse_or(
                "WS_RATE_LIMIT_BURST",
                raw.rate_limit_burst,
                200,
                "a whole number of requests from 1 up",
                parse_count(1..=u32::MAX),
            )?,
        };
        let publish_burst = parse_or(
            "WS_PUBLISH_BURST",
            raw.publish_burst,
            100,
            "a whole number from 1 up",
            parse_count(1..=u32::MAX),
        )?;
        let publish_rate = per_second("WS_PUBLISH_RATE", raw.publish_rate, 50, COUNT, parse_u32)?
            .map(|rate| Rate::per_second(rate, publish_burst));
        let publish_bytes = per_second(
            "WS_PUBLISH_BYTES_RATE",
            raw.publish_bytes_rate,
            256 << 10,
            "a size per second such as 256KiB",
            parse_bytes,
        )?
        .map(|rate| Rate::per_second(rate, rate.saturating_mul(2)));
        let publish_rate_total = per_second(
            "WS_PUBLISH_RATE_TOTAL",
            raw.publish_rate_total,
            1000,
            COUNT,
            parse_u32,
        )?
        .map(Limits::replica_rate);
        let publish_bytes_total = per_second(
            "WS_PUBLISH_BYTES_TOTAL",
            raw.publish_bytes_total,
            1 << 20,
            "a size per second such as 1MiB",
            parse_bytes,
        )?
        .map(Limits::replica_rate);
        let max_publish_size = parse_or(
            "WS_MAX_PUBLISH_SIZE",
            raw.max_publish_size,
            defaults.max_publish_size,
            "a size from 16 B to 1 GiB, such as 64KiB",
            |v| parse_size(v).filter(|n| (16..=1 << 30).contains(n)),
        )?;
        for (variable, rate) in [
            ("WS_PUBLISH_BYTES_RATE", publish_bytes),
            ("WS_PUBLISH_BYTES_TOTAL", publish_bytes_total),
        ] {
            if let Some(rate) = rate.filter(|rate| (rate.burst as usize) < max_publish_size) {
                return Err(error(
                    "WS_MAX_PUBLISH_SIZE",
                    &max_publish_size.to_string(),
                    &format!(
                        "at most the burst of {variable} ({} bytes): a larger publication could never pass",
                        rate.burst
                    ),
                ));
            }
        }
        let gate = Limits {
            requests: enabled.then_some(request_rate),
            publish_rate,
            publish_bytes,
            publish_rate_total,
            publish_bytes_total,
            max_publish_size,
            max_subscriptions: parse_or(
                "WS_MAX_SUBSCRIPTIONS",
                raw.max_subscriptions,
                defaults.max_subscriptions,
                "a whole number from 1 up",
                parse_count(1..=usize::MAX),
            )?,
            max_batch: parse_or(
                "WS_MAX_BATCH",
                raw.max_batch,
                defaults.max_batch,
                "a whole number from 1 to 100000",
                parse_count(1..=100_000),
            )?,
            conn_rate: per_second("WS_CONN_RATE", raw.conn_rate, 0, COUNT, parse_u32)?
                .map(|rate| Rate::per_second(rate, rate)),
            max_connections_per_ip: parse_or(
                "WS_MAX_CONNECTIONS_PER_IP",
                raw.max_connections_per_ip,
                0,
                "a whole number (0 means no limit)",
                |v| v.parse().ok(),
            )?,
        };
        let trusted_proxies = match raw.trusted_proxies.as_deref().map(str::trim) {
            None | Some("") => TrustedProxies::default(),
            Some(list) => TrustedProxies::new(
                list.split(',')
                    .map(str::trim)
                    .filter(|entry| !entry.is_empty())
                    .map(|entry| {
                        parse_network(entry).ok_or_else(|| {
                            error(
                                "WS_TRUSTED_PROXIES",
                                entry,
                                "IP addresses or networks such as 10.0.0.0/8, comma separated",
                            )
                        })
                    })
                    .collect::<Result<_, _>>()?,
            ),
        };
        Ok(Self {
            gate,
            trusted_proxies,
        })
    }
}

/// A rate per second, `0` for unlimited; a trailing `/s` is allowed.
fn per_second(
    variable: &str,
    value: Option<String>,
    default: u32,
    unit: &str,
    parse: fn(&str) -> Option<u32>,
) -> Result<Option<u32>, ConfigError> {
    let rate = parse_or(
        variable,
        value,
        default,
        &format!("{unit} per second (0 means unlimited)"),
        |v| parse(v.strip_suffix("/s").unwrap_or(v).trim()),
    )?;
    Ok((rate > 0).then_some(rate))
}

fn parse_u32(text: &str) -> Option<u32> {
    text.parse().ok()
}

/// Byte rates, at most half of u32 so that twice the rate is still a budget.
fn parse_bytes(text: &str) -> Option<u32> {
    parse_size(text)
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| *n <= u32::MAX / 2)
}

fn parse_network(entry: &str) -> Option<ipnet::IpNet> {
    entry.parse().ok().or_else(|| {
        entry
            .parse::<std::net::IpAddr>()
            .ok()
            .map(ipnet::IpNet::from)
    })
}

#[cfg(test)]
mod tests {
    use super::super::tests::config;
    use super::*;

    #[test]
    fn budgets_are_read_and_zero_is_unlimited() {
        let limits = config(&[
            ("WS_RATE_LIMIT_ENABLED", "true"),
            ("WS_RATE_LIMIT_RATE", "10"),
            ("WS_RATE_LIMIT_INTERVAL", "2s"),
            ("WS_RATE_LIMIT_BURST", "20"),
            ("WS_PUBLISH_RATE", "5/s"),
            ("WS_PUBLISH_BURST", "7"),
            ("WS_PUBLISH_BYTES_RATE", "1MiB"),
            ("WS_PUBLISH_RATE_TOTAL", "0"),
            ("WS_PUBLISH_BYTES_TOTAL", "0"),
            ("WS_CONN_RATE", "3"),
            ("WS_MAX_CONNECTIONS_PER_IP", "4"),
            ("WS_TRUSTED_PROXIES", "10.0.0.0/8, 127.0.0.1, ::1"),
        ])
        .expect("valid")
        .limits;
        let gate = limits.gate;
        assert_eq!(
            gate.requests,
            Some(RequestRate {
                rate: 10,
                interval: Duration::from_secs(2),
                burst: 20
            })
        );
        assert_eq!(gate.publish_rate, Some(Rate::per_second(5, 7)));
        assert_eq!(gate.publish_bytes, Some(Rate::per_second(1 << 20, 2 << 20)));
        assert_eq!(gate.publish_rate_total, None);
        assert_eq!(gate.publish_bytes_total, None);
        assert_eq!(gate.conn_rate, Some(Rate::per_second(3, 3)));
        assert_eq!(gate.max_connections_per_ip, 4);
        assert!(!limits.trusted_proxies.is_empty());
        let off = config(&[("WS_RATE_LIMIT_RATE", "10")]).expect("valid");
        assert_eq!(off.limits.gate.requests, None, "off unless enabled");
    }
}
