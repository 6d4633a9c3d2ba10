//! The limits themselves, as typed values with the defaults of the contract (section
//! 9). The server reads them from `WS_*` variables and checks them; the gate applies
//! them.

use std::time::Duration;

/// A budget refilled at `per_second` units a second, holding at most `burst`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub per_second: u32,
    pub burst: u32,
}

impl Rate {
    pub const fn per_second(per_second: u32, burst: u32) -> Self {
        Self { per_second, burst }
    }
}

/// The request budget: `rate` requests per `interval`, at most `burst` at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestRate {
    pub rate: u32,
    pub interval: Duration,
    pub burst: u32,
}

impl RequestRate {
    /// Requests per second, for the flood rule (ten times this for two seconds).
    pub fn per_second(&self) -> f64 {
        f64::from(self.rate) / self.interval.as_secs_f64()
    }
}

/// Every limit of section 9 that the gate enforces. `None` is "unlimited".
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Per-connection request budget (`WS_RATE_LIMIT_*`), off by default.
    pub requests: Option<RequestRate>,
    /// Per-connection `publish` + `broadcast` count (`WS_PUBLISH_RATE`, `WS_PUBLISH_BURST`).
    pub publish_rate: Option<Rate>,
    /// Per-connection published bytes (`WS_PUBLISH_BYTES_RATE`, burst twice the rate).
    pub publish_bytes: Option<Rate>,
    /// All client publications of the replica (`WS_PUBLISH_RATE_TOTAL`).
    pub publish_rate_total: Option<Rate>,
    /// All client publication bytes of the replica (`WS_PUBLISH_BYTES_TOTAL`).
    pub publish_bytes_total: Option<Rate>,
    /// Largest `data` of a publication, as serialised JSON (`WS_MAX_PUBLISH_SIZE`).
    pub max_publish_size: usize,
    /// Subscriptions per connection (`WS_MAX_SUBSCRIPTIONS`).
    pub max_subscriptions: usize,
    /// Elements per batch (`WS_MAX_BATCH`).
    pub max_batch: usize,
    /// New upgrades per second per client IP (`WS_CONN_RATE`).
    pub conn_rate: Option<Rate>,
    /// Open connections per client IP (`WS_MAX_CONNECTIONS_PER_IP`), 0 for none.
    pub max_connections_per_ip: usize,
}

impl Limits {
    /// The replica-wide budgets refill at their rate and hold half a second of it, so
    /// that a replica-wide burst of publications fits in half of a default send buffer:
    /// readers that keep up are never dropped by what many publishers add up to.
    pub const fn replica_rate(per_second: u32) -> Rate {
        Rate::per_second(per_second, if per_second > 1 { per_second / 2 } else { 1 })
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            requests: None,
            publish_rate: Some(Rate::per_second(50, 100)),
            publish_bytes: Some(Rate::per_second(256 << 10, 512 << 10)),
            publish_rate_total: Some(Self::replica_rate(1000)),
            publish_bytes_total: Some(Self::replica_rate(1 << 20)),
            max_publish_size: 64 << 10,
            max_subscriptions: 1024,
            max_batch: 100,
            conn_rate: None,
            max_connections_per_ip: 0,
        }
    }
}
