//! History and recovery (section 11): how much a reconnecting client may recover at
//! once, and how long idempotency keys are remembered. Per-namespace retention is in
//! `WS_NAMESPACES` (see [`super::GateSettings`]).

use std::time::Duration;

use serde::Deserialize;

use super::values::{parse_count, parse_duration, parse_or};
use super::{ConfigError, Vars, read};

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Raw {
    recovery_max: Option<String>,
    idempotency_ttl: Option<String>,
}

#[derive(Clone, Debug)]
pub struct HistoryConfig {
    /// Most publications one `subscribe` with `since` recovers.
    pub recovery_max: usize,
    /// How long a publish's `idempotency_key` is remembered, cluster-wide.
    pub idempotency_ttl: Duration,
}

impl HistoryConfig {
    pub(super) fn load(vars: &Vars) -> Result<Self, ConfigError> {
        let raw: Raw = read(vars)?;
        Ok(Self {
            recovery_max: parse_or(
                "WS_RECOVERY_MAX",
                raw.recovery_max,
                1000,
                "a whole number from 1 to 1000",
                parse_count(1..=1000),
            )?,
            idempotency_ttl: parse_or(
                "WS_IDEMPOTENCY_TTL",
                raw.idempotency_ttl,
                Duration::from_secs(300),
                "a duration from 1s to 24h, such as 5m",
                |text| {
                    parse_duration(text).filter(|ttl| {
                        (Duration::from_secs(1)..=Duration::from_secs(86_400)).contains(ttl)
                    })
                },
            )?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::config;
    use super::*;

    #[test]
    fn defaults_and_bad_values() {
        let history = config(&[]).expect("defaults").history;
        assert_eq!(history.recovery_max, 1000);
        assert_eq!(history.idempotency_ttl, Duration::from_secs(300));
        for (variable, value) in [
            ("WS_RECOVERY_MAX", "0"),
            ("WS_RECOVERY_MAX", "5000"),
            ("WS_IDEMPOTENCY_TTL", "forever"),
            ("WS_IDEMPOTENCY_TTL", "0s"),
        ] {
            let err = config(&[(variable, value)]).expect_err(variable);
            assert_eq!(err.variable, variable);
        }
    }
}
