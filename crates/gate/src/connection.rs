//! One connection's share of the gate: its request budget, the flood rule, and its
//! publish budgets (made on the first publication, so idle connections carry none).

use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::budget::Budget;
use crate::limits::Limits;
use crate::refusal::{Refusal, Scope};

/// What to do with one request (each element of a batch is one).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestVerdict {
    Allowed,
    /// Answer this request with the refusal; the connection stays.
    Refused(Refusal),
    /// The client has pushed more than ten times its rate for over two seconds: close
    /// the connection (1008).
    Flooding,
}

/// Flood detection: requests counted in one-second windows.
#[derive(Debug)]
struct FloodWatch {
    /// Requests per window above which a window counts as flooded.
    threshold: u64,
    window_start: Instant,
    count: u64,
    /// Consecutive flooded windows just before the current one.
    flooded: u32,
}

const FLOOD_WINDOW: Duration = Duration::from_secs(1);
/// Flooded windows in a row after which the connection is closed: "over two seconds".
const FLOOD_WINDOWS: u32 = 2;
/// "More than ten times its rate".
const FLOOD_FACTOR: f64 = 10.0;

impl FloodWatch {
    fn new(requests_per_second: f64) -> Self {
        // Saturating float-to-int conversion is the intent here.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let threshold = (requests_per_second * FLOOD_FACTOR * FLOOD_WINDOW.as_secs_f64()) as u64;
        Self {
            threshold: threshold.max(1),
            window_start: Instant::now(),
            count: 0,
            flooded: 0,
        }
    }

    /// Counts one request; true once the flood has lasted long enough to close.
    fn record(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.window_start);
        if elapsed >= FLOOD_WINDOW {
            // A gap of more than one window means the client paused: no flood.
            let consecutive = elapsed < FLOOD_WINDOW * 2;
            self.flooded = if consecutive && self.count > self.threshold {
                self.flooded + 1
            } else {
                0
            };
            self.window_start = now;
            self.count = 0;
        }
        self.count += 1;
        self.flooded >= FLOOD_WINDOWS
    }
}

#[derive(Debug)]
struct PublishBudgets {
    count: Option<Budget>,
    bytes: Option<Budget>,
}

/// Per-connection limiter state. Only the connection's own task uses it, so the locks
/// are never contended.
#[derive(Debug)]
pub struct ConnectionLimits {
    requests: Option<(Budget, Mutex<FloodWatch>)>,
    publish: OnceLock<Box<PublishBudgets>>,
}

impl ConnectionLimits {
    pub(crate) fn new(limits: &Limits) -> Self {
        Self {
            requests: limits.requests.map(|rate| {
                (
                    Budget::requests(rate),
                    Mutex::new(FloodWatch::new(rate.per_second())),
                )
            }),
            publish: OnceLock::new(),
        }
    }

    /// Admits one request against the request budget (always allowed when it is off).
    pub fn admit_request(&self) -> RequestVerdict {
        let Some((budget, flood)) = &self.requests else {
            return RequestVerdict::Allowed;
        };
        let flooding = flood
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .record(Instant::now());
        if flooding {
            return RequestVerdict::Flooding;
        }
        match budget.take(1) {
            Ok(()) => RequestVerdict::Allowed,
            Err(wait) => RequestVerdict::Refused(Refusal::rate(Scope::Connection, wait)),
        }
    }

    pub(crate) fn admit_publication(&self, limits: &Limits, bytes: usize) -> Result<(), Refusal> {
        let budgets = self.publish.get_or_init(|| {
            Box::new(PublishBudgets {
                count: limits.publish_rate.map(Budget::new),
                bytes: limits.publish_bytes.map(Budget::new),
            })
        });
        if let Some(count) = &budgets.count {
            count
                .take(1)
                .map_err(|wait| Refusal::rate(Scope::Publish, wait))?;
        }
        if let Some(budget) = &budgets.bytes {
            budget
                .take(bytes)
                .map_err(|wait| Refusal::rate(Scope::Publish, wait))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::RequestRate;

    fn limited(rate: u32, burst: u32) -> ConnectionLimits {
        ConnectionLimits::new(&Limits {
            requests: Some(RequestRate {
                rate,
                interval: Duration::from_secs(1),
                burst,
            }),
            ..Limits::default()
        })
    }

    #[test]
    fn requests_are_unlimited_by_default() {
        let limits = ConnectionLimits::new(&Limits::default());
        for _ in 0..10_000 {
            assert_eq!(limits.admit_request(), RequestVerdict::Allowed);
        }
    }

    #[test]
    fn over_the_burst_each_request_is_refused_with_a_wait() {
        let limits = limited(100, 5);
        for _ in 0..5 {
            assert_eq!(limits.admit_request(), RequestVerdict::Allowed);
        }
        match limits.admit_request() {
            RequestVerdict::Refused(Refusal::RateLimited { scope, retry_after }) => {
                assert_eq!(scope, Scope::Connection);
                assert!(retry_after <= Duration::from_millis(10));
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn a_flood_is_reported_after_two_flooded_windows() {
        let mut watch = FloodWatch::new(10.0);
        let start = watch.window_start;
        let at = |ms: u64| start + Duration::from_millis(ms);
        // 200 requests in each of two seconds: 20 times the rate of 10/s.
        for second in 0..2 {
            for i in 0..200 {
                assert!(!watch.record(at(second * 1000 + i)), "second {second}");
            }
        }
        assert!(watch.record(at(2000)), "the third second starts flooded");
    }

    #[test]
    fn a_pause_or_a_modest_rate_is_not_a_flood() {
        let mut watch = FloodWatch::new(10.0);
        let start = watch.window_start;
        let at = |ms: u64| start + Duration::from_millis(ms);
        for i in 0..200 {
            watch.record(at(i));
        }
        // Silence for five seconds, then a flood starts afresh.
        for i in 0..200 {
            assert!(!watch.record(at(6000 + i)));
        }
        assert!(!watch.record(at(7000)), "one flooded window only");
        let mut modest = FloodWatch::new(10.0);
        let start = modest.window_start;
        for ms in (0..10_000).step_by(20) {
            assert!(
                !modest.record(start + Duration::from_millis(ms)),
                "50/s is five times the rate"
            );
        }
    }
}
