//! A token bucket (governor's GCRA): the building block of every rate limit here.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use crate::limits::{Rate, RequestRate};

/// One budget of units (calls or bytes). Lock-free: one atomic per check.
#[derive(Debug)]
pub struct Budget {
    limiter: DefaultDirectRateLimiter,
    burst: u32,
}

impl Budget {
    pub fn new(rate: Rate) -> Self {
        let per_second = NonZeroU32::new(rate.per_second).unwrap_or(NonZeroU32::MIN);
        Self::with_quota(Quota::per_second(per_second), rate.burst)
    }

    pub(crate) fn requests(rate: RequestRate) -> Self {
        let cells = rate.rate.max(1);
        let period = rate.interval / cells;
        let quota = Quota::with_period(period.max(Duration::from_nanos(1)))
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN));
        Self::with_quota(quota, rate.burst)
    }

    fn with_quota(quota: Quota, burst: u32) -> Self {
        let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        Self {
            limiter: RateLimiter::direct(quota.allow_burst(burst)),
            burst: burst.get(),
        }
    }

    /// Takes `units`; when they are not there, how long until they would be. A take
    /// larger than the whole burst can never succeed and waits "forever" (a day).
    pub fn take(&self, units: usize) -> Result<(), Duration> {
        let Some(units) = u32::try_from(units).ok().and_then(NonZeroU32::new) else {
            return if units == 0 { Ok(()) } else { Err(FOREVER) };
        };
        match self.limiter.check_n(units) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(not_until.wait_time_from(DefaultClock::default().now())),
            Err(_insufficient) => Err(FOREVER),
        }
    }

    pub fn burst(&self) -> u32 {
        self.burst
    }
}

const FOREVER: Duration = Duration::from_secs(86_400);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_a_wait() {
        let budget = Budget::new(Rate::per_second(10, 3));
        for _ in 0..3 {
            assert_eq!(budget.take(1), Ok(()));
        }
        let wait = budget.take(1).expect_err("the burst is spent");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
    }

    #[test]
    fn bytes_are_taken_in_one_go() {
        let budget = Budget::new(Rate::per_second(1000, 1000));
        assert_eq!(budget.take(600), Ok(()));
        assert!(budget.take(600).is_err());
        assert_eq!(budget.take(0), Ok(()));
        assert_eq!(
            budget.take(5000),
            Err(FOREVER),
            "more than the burst can ever hold"
        );
    }

    #[test]
    fn a_request_rate_per_interval() {
        let budget = Budget::requests(RequestRate {
            rate: 2,
            interval: Duration::from_secs(10),
            burst: 1,
        });
        assert_eq!(budget.take(1), Ok(()));
        let wait = budget.take(1).expect_err("one at a time");
        assert!(wait > Duration::from_secs(4), "{wait:?}");
    }
}
