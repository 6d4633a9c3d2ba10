//! Why the gate said no.

use std::time::Duration;

/// Which budget refused: the label of `ws_rate_limited_total{scope}` (a bounded set).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Scope {
    /// The connection's request budget.
    Connection,
    /// The connection's publish budgets (count or bytes).
    Publish,
    /// The replica's publish budgets, shared by every connection.
    Replica,
    /// A client IP's upgrade rate or connection cap.
    Ip,
    /// A user's connection cap.
    User,
}

impl Scope {
    pub const ALL: [Self; 5] = [
        Self::Connection,
        Self::Publish,
        Self::Replica,
        Self::Ip,
        Self::User,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Self::Connection => "connection",
            Self::Publish => "publish",
            Self::Replica => "replica",
            Self::Ip => "ip",
            Self::User => "user",
        }
    }
}

/// A refusal; the caller turns it into its wire form.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("rate limited ({}): retry after {retry_after:?}", scope.label())]
    RateLimited { scope: Scope, retry_after: Duration },
    #[error("payload larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("subscription limit of {limit} reached")]
    SubscriptionLimit { limit: usize },
    #[error("more than {limit} connections from one address")]
    TooManyConnections { limit: usize },
    #[error("more than {limit} connections of one user")]
    TooManyUserConnections { limit: usize },
    /// Not allowed: the token grants no such right, or the server's settings forbid it.
    #[error("forbidden{}", reason.map(|r| format!(": {r}")).unwrap_or_default())]
    Forbidden { reason: Option<&'static str> },
}

impl Refusal {
    pub(crate) fn rate(scope: Scope, retry_after: Duration) -> Self {
        Self::RateLimited { scope, retry_after }
    }

    /// The budget that refused, for the metric; `None` for refusals that are not
    /// rate limits.
    pub fn scope(&self) -> Option<Scope> {
        match self {
            Self::RateLimited { scope, .. } => Some(*scope),
            Self::TooManyConnections { .. } => Some(Scope::Ip),
            Self::TooManyUserConnections { .. } => Some(Scope::User),
            Self::PayloadTooLarge { .. }
            | Self::SubscriptionLimit { .. }
            | Self::Forbidden { .. } => None,
        }
    }
}
