//! Who may do what, and how much: identity (tokens to [`Identity`]), channel grants
//! and namespace rules, and the limits that keep one client from hurting another,
//! checked before the upgrade (per client address, per user) and at the router's
//! guard (per connection and per replica).
//!
//! The gate knows nothing of sockets, HTTP or JSON-RPC. Callers hand it tokens,
//! addresses, channel names, byte counts and counts of calls; it answers with an
//! [`Identity`], or a [`Refusal`] or [`AuthError`] that the caller maps to its own wire
//! form (an HTTP status, a JSON-RPC error code).

mod auth;
mod budget;
mod connection;
mod counts;
mod identity;
mod ip;
mod jwks;
mod limits;
mod namespaces;
mod refusal;
mod token;

use std::sync::Arc;

pub use auth::{
    AuthConfig, AuthError, BackendClaims, JwtConfig, MAX_TOKEN_LEN, PublicKey, Verifier,
};
pub use budget::Budget;
pub use connection::{ConnectionLimits, RequestVerdict};
pub use counts::{OpenCounts, OpenSlot};
pub use identity::{Grants, Identity, Pattern};
pub use ip::{IpLimits, IpSlot, TrustedProxies};
pub use jwks::{FetchKeys, Jwks};
pub use limits::{Limits, Rate, RequestRate};
pub use namespaces::{DeliveryPolicy, NamespaceOptions, Namespaces};
pub use refusal::{Refusal, Scope};
pub use token::{TokenClaims, bearer_token, mint_hs256, query_params, query_token, query_values};

/// Everything the gate is told at start-up.
#[derive(Clone, Debug)]
pub struct GateConfig {
    pub limits: Limits,
    pub auth: AuthConfig,
    pub namespaces: Namespaces,
    /// Clients may `broadcast` (`WS_CLIENT_BROADCAST`).
    pub client_broadcast: bool,
    /// A token without channel claims may use no channel (`WS_CHANNELS_REQUIRE_GRANT`).
    pub channels_require_grant: bool,
    /// Connections per user on this replica (`WS_MAX_CONNECTIONS_PER_USER`), 0: no cap.
    pub max_connections_per_user: usize,
}

impl Default for GateConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            auth: AuthConfig::default(),
            namespaces: Namespaces::default(),
            client_broadcast: true,
            channels_require_grant: false,
            max_connections_per_user: 0,
        }
    }
}

/// One admitted connection of a user; gives its count back when dropped.
pub type UserSlot = OpenSlot<Arc<str>>;

/// The replica-wide part of the gate: identity, rules, and the budgets every
/// connection of this replica shares.
#[derive(Debug)]
pub struct Gate {
    limits: Limits,
    verifier: Verifier,
    namespaces: Namespaces,
    client_broadcast: bool,
    require_grant: bool,
    users: Arc<OpenCounts<Arc<str>>>,
    publish_count: Option<Budget>,
    publish_bytes: Option<Budget>,
}

impl Gate {
    pub fn new(config: GateConfig) -> Self {
        let limits = config.limits;
        Self {
            publish_count: limits.publish_rate_total.map(Budget::new),
            publish_bytes: limits.publish_bytes_total.map(Budget::new),
            limits,
            verifier: Verifier::new(config.auth),
            namespaces: config.namespaces,
            client_broadcast: config.client_broadcast,
            require_grant: config.channels_require_grant,
            users: OpenCounts::new(config.max_connections_per_user),
        }
    }

    /// A gate with these limits, no authentication and no namespaces (tests).
    pub fn with_limits(limits: Limits) -> Self {
        Self::new(GateConfig {
            limits,
            ..GateConfig::default()
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn verifier(&self) -> &Verifier {
        &self.verifier
    }

    pub fn namespaces(&self) -> &Namespaces {
        &self.namespaces
    }

    /// Per-connection state for a new connection.
    pub fn connection(&self) -> ConnectionLimits {
        ConnectionLimits::new(&self.limits)
    }

    /// Counts a connection of `user` against `WS_MAX_CONNECTIONS_PER_USER`.
    pub fn admit_user(&self, user: Option<&Arc<str>>) -> Result<Option<UserSlot>, Refusal> {
        user.map(|user| {
            self.users
                .admit(Arc::clone(user))
                .map_err(|limit| Refusal::TooManyUserConnections { limit })
        })
        .transpose()
    }

    /// May `identity` subscribe to `channel`, holding `held` subscriptions already?
    pub fn admit_subscription(
        &self,
        identity: &Identity,
        channel: &str,
        held: usize,
    ) -> Result<(), Refusal> {
        if !identity.grants.may_subscribe(channel, self.require_grant) {
            return Err(Refusal::Forbidden { reason: None });
        }
        let limit = self.limits.max_subscriptions;
        if held >= limit {
            return Err(Refusal::SubscriptionLimit { limit });
        }
        Ok(())
    }

    /// May `identity` read `channel` (its presence, its history)?
    pub fn admit_read(&self, identity: &Identity, channel: &str) -> Result<(), Refusal> {
        if identity.grants.may_subscribe(channel, self.require_grant) {
            Ok(())
        } else {
            Err(Refusal::Forbidden { reason: None })
        }
    }

    /// Admits a client's `publish` of `bytes` of data to `channel`: the rights first,
    /// then the size cap, the connection's budgets and the replica's.
    pub fn admit_publish(
        &self,
        identity: &Identity,
        connection: &ConnectionLimits,
        channel: &str,
        bytes: usize,
    ) -> Result<(), Refusal> {
        if !identity.grants.may_publish(channel, self.require_grant) {
            return Err(Refusal::Forbidden { reason: None });
        }
        if !self.namespaces.of(channel).client_publish {
            return Err(Refusal::Forbidden {
                reason: Some("client publish disabled"),
            });
        }
        self.admit_publication(connection, bytes)
    }

    /// Admits a client's `broadcast` of `bytes` of params.
    pub fn admit_broadcast(
        &self,
        connection: &ConnectionLimits,
        bytes: usize,
    ) -> Result<(), Refusal> {
        if !self.client_broadcast {
            return Err(Refusal::Forbidden {
                reason: Some("client broadcast disabled"),
            });
        }
        self.admit_publication(connection, bytes)
    }

    /// Admits a publication of the server API: it may publish anywhere, unbudgeted,
    /// but what clients receive is bounded all the same.
    pub fn admit_api_publication(&self, bytes: usize) -> Result<(), Refusal> {
        if bytes > self.limits.max_publish_size {
            return Err(Refusal::PayloadTooLarge {
                limit: self.limits.max_publish_size,
            });
        }
        Ok(())
    }

    /// The size cap, then the connection's budgets, then the replica's.
    fn admit_publication(
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_publication_is_checked_for_size_then_budgets() {
        let gate = Gate::with_limits(Limits {
            max_publish_size: 10,
            publish_rate: Some(Rate::per_second(2, 2)),
            publish_bytes: None,
            publish_rate_total: None,
            publish_bytes_total: None,
            ..Limits::default()
        });
        let connection = gate.connection();
        assert_eq!(
            gate.admit_broadcast(&connection, 11),
            Err(Refusal::PayloadTooLarge { limit: 10 })
        );
        assert_eq!(gate.admit_broadcast(&connection, 10), Ok(()));
        assert_eq!(gate.admit_broadcast(&connection, 10), Ok(()));
        let Err(Refusal::RateLimited { scope, retry_after }) = gate.admit_broadcast(&connection, 1)
        else {
            panic!("the third publication in a burst of two is refused");
        };
        assert_eq!(scope, Scope::Publish);
        assert!(retry_after.as_millis() > 0 && retry_after.as_millis() <= 500);
    }

    #[test]
    fn the_replica_budget_is_shared_by_every_connection() {
        let gate = Gate::with_limits(Limits {
            publish_rate: None,
            publish_bytes: None,
            publish_rate_total: Some(Rate::per_second(4, 2)),
            publish_bytes_total: None,
            ..Limits::default()
        });
        let (a, b) = (gate.connection(), gate.connection());
        assert_eq!(gate.admit_broadcast(&a, 1), Ok(()));
        assert_eq!(gate.admit_broadcast(&b, 1), Ok(()));
        assert!(matches!(
            gate.admit_broadcast(&a, 1),
            Err(Refusal::RateLimited {
                scope: Scope::Replica,
                ..
            })
        ));
    }

    #[test]
    fn rights_come_before_budgets() {
        let gate = Gate::new(GateConfig {
            limits: Limits {
                publish_rate: Some(Rate::per_second(1, 1)),
                ..Limits::default()
            },
            namespaces: Namespaces::new(std::collections::HashMap::from([(
                "feed".to_owned(),
                NamespaceOptions {
                    client_publish: false,
                    ..NamespaceOptions::default()
                },
            )])),
            client_broadcast: false,
            channels_require_grant: true,
            ..GateConfig::default()
        });
        let connection = gate.connection();
        let granted = Identity {
            grants: Grants {
                channels: vec![Pattern::parse("*").expect("pattern")],
                present: true,
                ..Grants::default()
            },
            ..Identity::default()
        };
        let ungranted = Identity::anonymous();
        assert_eq!(
            gate.admit_publish(&ungranted, &connection, "a", 1),
            Err(Refusal::Forbidden { reason: None }),
            "a grant is required"
        );
        assert_eq!(
            gate.admit_publish(&granted, &connection, "feed:1", 1),
            Err(Refusal::Forbidden {
                reason: Some("client publish disabled")
            })
        );
        assert_eq!(
            gate.admit_broadcast(&connection, 1),
            Err(Refusal::Forbidden {
                reason: Some("client broadcast disabled")
            })
        );
        assert_eq!(
            gate.admit_publish(&granted, &connection, "a", 1),
            Ok(()),
            "the budget is untouched"
        );
        assert!(gate.admit_read(&ungranted, "a").is_err());
    }

    #[test]
    fn users_are_capped_per_replica() {
        let gate = Gate::new(GateConfig {
            max_connections_per_user: 1,
            ..GateConfig::default()
        });
        let alice: Arc<str> = Arc::from("alice");
        let first = gate.admit_user(Some(&alice)).expect("first");
        assert!(first.is_some());
        assert_eq!(
            gate.admit_user(Some(&alice)).map(|_| ()),
            Err(Refusal::TooManyUserConnections { limit: 1 })
        );
        assert!(matches!(gate.admit_user(None), Ok(None)), "no user, no cap");
        drop(first);
        assert!(gate.admit_user(Some(&alice)).is_ok());
    }

    #[test]
    fn subscriptions_stop_at_the_limit() {
        let gate = Gate::with_limits(Limits {
            max_subscriptions: 2,
            ..Limits::default()
        });
        let anyone = Identity::anonymous();
        assert_eq!(gate.admit_subscription(&anyone, "a", 1), Ok(()));
        assert_eq!(
            gate.admit_subscription(&anyone, "a", 2),
            Err(Refusal::SubscriptionLimit { limit: 2 })
        );
    }
}
