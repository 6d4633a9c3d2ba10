//! Who may do what, and how much: the limits that keep one client from hurting
//! another, checked before the upgrade (per client IP) and at the router's guard
//! (per connection and per replica).
//!
//! The gate knows nothing of sockets, HTTP or JSON-RPC. Callers hand it addresses,
//! byte counts and counts of calls; it answers with a [`Refusal`] that the caller maps
//! to its own wire form (an HTTP status, a JSON-RPC error code).

mod budget;
mod connection;
mod ip;
mod limits;
mod refusal;

pub use budget::Budget;
pub use connection::{ConnectionLimits, RequestVerdict};
pub use ip::{IpLimits, IpSlot, TrustedProxies};
pub use limits::{Limits, Rate, RequestRate};
pub use refusal::{Refusal, Scope};

/// The replica-wide part of the gate: its limits and the budgets every connection of
/// this replica shares.
#[derive(Debug)]
pub struct Gate {
    limits: Limits,
    publish_count: Option<Budget>,
    publish_bytes: Option<Budget>,
}

impl Gate {
    pub fn new(limits: Limits) -> Self {
        Self {
            publish_count: limits.publish_rate_total.map(Budget::new),
            publish_bytes: limits.publish_bytes_total.map(Budget::new),
            limits,
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Per-connection state for a new connection.
    pub fn connection(&self) -> ConnectionLimits {
        ConnectionLimits::new(&self.limits)
    }

    /// Admits one client publication (`publish` or `broadcast`) of `bytes` of data from
    /// `connection`: the size cap, then the connection's budgets, then the replica's.
    pub fn admit_publication(
        &self,
        connection: &ConnectionLimits,
        bytes: usize,
    ) -> Result<(), Refusal> {
        if bytes > self.limits.max_publish_size {
            return Err(Refusal::PayloadTooLarge {
                limit: self.limits.max_publish_size,
            });
        }
        connection.admit_publication(&self.limits, bytes)?;
        if let Some(count) = &self.publish_count {
            count
                .take(1)
                .map_err(|wait| Refusal::rate(Scope::Replica, wait))?;
        }
        if let Some(budget) = &self.publish_bytes {
            budget
                .take(bytes)
                .map_err(|wait| Refusal::rate(Scope::Replica, wait))?;
        }
        Ok(())
    }

    /// Admits one more subscription for a connection that holds `held` already.
    pub fn admit_subscription(&self, held: usize) -> Result<(), Refusal> {
        let limit = self.limits.max_subscriptions;
        if held >= limit {
            return Err(Refusal::SubscriptionLimit { limit });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_publication_is_checked_for_size_then_budgets() {
        let gate = Gate::new(Limits {
            max_publish_size: 10,
            publish_rate: Some(Rate::per_second(2, 2)),
            publish_bytes: None,
            publish_rate_total: None,
            publish_bytes_total: None,
            ..Limits::default()
        });
        let connection = gate.connection();
        assert_eq!(
            gate.admit_publication(&connection, 11),
            Err(Refusal::PayloadTooLarge { limit: 10 })
        );
        assert_eq!(gate.admit_publication(&connection, 10), Ok(()));
        assert_eq!(gate.admit_publication(&connection, 10), Ok(()));
        let Err(Refusal::RateLimited { scope, retry_after }) =
            gate.admit_publication(&connection, 1)
        else {
            panic!("the third publication in a burst of two is refused");
        };
        assert_eq!(scope, Scope::Publish);
        assert!(retry_after.as_millis() > 0 && retry_after.as_millis() <= 500);
    }

    #[test]
    fn the_replica_budget_is_shared_by_every_connection() {
        let gate = Gate::new(Limits {
            publish_rate: None,
            publish_bytes: None,
            publish_rate_total: Some(Rate::per_second(4, 2)),
            publish_bytes_total: None,
            ..Limits::default()
        });
        let (a, b) = (gate.connection(), gate.connection());
        assert_eq!(gate.admit_publication(&a, 1), Ok(()));
        assert_eq!(gate.admit_publication(&b, 1), Ok(()));
        assert!(matches!(
            gate.admit_publication(&a, 1),
            Err(Refusal::RateLimited {
                scope: Scope::Replica,
                ..
            })
        ));
    }

    #[test]
    fn subscriptions_stop_at_the_limit() {
        let gate = Gate::new(Limits {
            max_subscriptions: 2,
            ..Limits::default()
        });
        assert_eq!(gate.admit_subscription(1), Ok(()));
        assert_eq!(
            gate.admit_subscription(2),
            Err(Refusal::SubscriptionLimit { limit: 2 })
        );
    }
}
