//! Per client IP: the upgrade rate (`WS_CONN_RATE`) and the open-connection cap
//! (`WS_MAX_CONNECTIONS_PER_IP`), and which address a request comes from when it
//! passed through a trusted proxy (`WS_TRUSTED_PROXIES`).

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use ipnet::IpNet;

use crate::counts::{OpenCounts, OpenSlot};
use crate::limits::Limits;
use crate::refusal::{Refusal, Scope};

/// The proxies whose `X-Forwarded-For` is believed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    pub fn new(networks: Vec<IpNet>) -> Self {
        Self(networks)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client's address: the peer's, unless the peer is a trusted proxy, in which
    /// case the right-most address of `X-Forwarded-For` that is not itself a trusted
    /// proxy (entries left of it could be forged by the client).
    pub fn client_ip<'a>(
        &self,
        peer: IpAddr,
        forwarded_for: impl Iterator<Item = &'a str>,
    ) -> IpAddr {
        let peer = canonical(peer);
        if !self.trusts(peer) {
            return peer;
        }
        let hops: Vec<&str> = forwarded_for.flat_map(|value| value.split(',')).collect();
        let mut client = peer;
        for hop in hops.iter().rev() {
            let Some(ip) = parse_hop(hop) else {
                // Garbage in the chain: stop at the last address we could trust.
                break;
            };
            client = ip;
            if !self.trusts(ip) {
                break;
            }
        }
        client
    }
}

/// `1.2.3.4`, `1.2.3.4:5678`, `[::1]:80` or `::1`.
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Ok(addr) = hop.parse::<std::net::SocketAddr>() {
        return Some(canonical(addr.ip()));
    }
    hop.strip_prefix('[')
        .and_then(|rest| rest.split_once(']'))
        .and_then(|(ip, _)| ip.parse().ok())
        .map(canonical)
}

/// IPv4-mapped IPv6 addresses count as the IPv4 address they carry.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// Per-address admission, shared by every upgrade of the replica.
#[derive(Debug)]
pub struct IpLimits {
    rate: Option<DefaultKeyedRateLimiter<IpAddr>>,
    open: Arc<OpenCounts<IpAddr>>,
}

/// One admitted connection from an address; releases its count when dropped.
pub type IpSlot = OpenSlot<IpAddr>;

impl IpLimits {
    pub fn new(limits: &Limits) -> Arc<Self> {
        let rate = limits.conn_rate.and_then(|rate| {
            let per_second = NonZeroU32::new(rate.per_second)?;
            let burst = NonZeroU32::new(rate.burst).unwrap_or(per_second);
            Some(RateLimiter::hashmap(
                Quota::per_second(per_second).allow_burst(burst),
            ))
        });
        Arc::new(Self {
            rate,
            open: OpenCounts::new(limits.max_connections_per_ip),
        })
    }

    /// Admits an upgrade from `ip`; the slot counts the connection until it is dropped.
    pub fn admit(&self, ip: IpAddr) -> Result<IpSlot, Refusal> {
        if let Some(rate) = &self.rate
            && let Err(not_until) = rate.check_key(&ip)
        {
            return Err(Refusal::rate(
                Scope::Ip,
                not_until.wait_time_from(DefaultClock::default().now()),
            ));
        }
        self.open
            .admit(ip)
            .map_err(|limit| Refusal::TooManyConnections { limit })
    }

    /// Drops the state of every address whose rate budget is full again. The server
    /// calls it every second, so a flood of distinct addresses holds at most about a
    /// second's worth of them (plus each one's refill time).
    pub fn forget_idle(&self) {
        if let Some(rate) = &self.rate {
            rate.retain_recent();
            rate.shrink_to_fit();
        }
    }

    /// Addresses the upgrade-rate limiter currently tracks.
    pub fn tracked_addresses(&self) -> usize {
        self.rate.as_ref().map_or(0, DefaultKeyedRateLimiter::len)
    }

    /// Open connections counted for `ip`.
    pub fn open_connections(&self, ip: IpAddr) -> u32 {
        self.open.open(&ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::Rate;

    fn ip(text: &str) -> IpAddr {
        text.parse().expect("an address")
    }

    #[test]
    fn forwarded_for_is_believed_only_from_a_trusted_proxy() {
        let trusted = TrustedProxies::new(vec!["10.0.0.0/8".parse().expect("net")]);
        let xff = ["203.0.113.9, 10.0.0.7"];
        assert_eq!(
            trusted.client_ip(ip("10.0.0.1"), xff.into_iter()),
            ip("203.0.113.9")
        );
        assert_eq!(
            trusted.client_ip(ip("198.51.100.1"), xff.into_iter()),
            ip("198.51.100.1"),
            "an untrusted peer's header is ignored"
        );
        // The client forged a left-most entry: the proxy appended the real address.
        let forged = ["1.1.1.1, 203.0.113.9"];
        assert_eq!(
            trusted.client_ip(ip("10.0.0.1"), forged.into_iter()),
            ip("203.0.113.9")
        );
        assert_eq!(
            trusted.client_ip(ip("10.0.0.1"), std::iter::empty()),
            ip("10.0.0.1"),
            "no header: the proxy itself"
        );
        assert_eq!(
            trusted.client_ip(ip("::ffff:10.0.0.1"), ["[2001:db8::1]:443"].into_iter()),
            ip("2001:db8::1")
        );
        assert_eq!(
            trusted.client_ip(ip("10.0.0.1"), ["nonsense, 10.0.0.2"].into_iter()),
            ip("10.0.0.2"),
            "garbage stops the walk at the last trusted hop"
        );
    }

    #[test]
    fn the_connection_cap_counts_open_slots() {
        let limits = IpLimits::new(&Limits {
            max_connections_per_ip: 2,
            ..Limits::default()
        });
        let a = ip("192.0.2.1");
        let first = limits.admit(a).expect("one");
        let _second = limits.admit(a).expect("two");
        assert_eq!(
            limits.admit(a).map(|_| ()),
            Err(Refusal::TooManyConnections { limit: 2 })
        );
        assert!(limits.admit(ip("192.0.2.2")).is_ok(), "another address");
        drop(first);
        assert!(limits.admit(a).is_ok(), "a slot was released");
        assert_eq!(limits.open_connections(ip("192.0.2.3")), 0);
    }

    #[test]
    fn the_upgrade_rate_is_per_address_and_its_state_bounded() {
        let limits = IpLimits::new(&Limits {
            conn_rate: Some(Rate::per_second(1000, 1)),
            ..Limits::default()
        });
        let a = ip("192.0.2.1");
        assert!(limits.admit(a).is_ok());
        assert!(matches!(
            limits.admit(a),
            Err(Refusal::RateLimited {
                scope: Scope::Ip,
                ..
            })
        ));
        // A flood of distinct addresses, each refilled within a millisecond.
        let fast = IpLimits::new(&Limits {
            conn_rate: Some(Rate::per_second(1_000_000, 1)),
            ..Limits::default()
        });
        for n in 0..100_000u32 {
            let _ = fast.admit(IpAddr::from((0x0a00_0000u32 + n).to_be_bytes()));
        }
        assert!(fast.tracked_addresses() > 50_000);
        std::thread::sleep(std::time::Duration::from_millis(2));
        fast.forget_idle();
        assert_eq!(fast.tracked_addresses(), 0, "every budget is full again");
    }
}
