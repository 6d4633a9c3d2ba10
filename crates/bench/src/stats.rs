//! Latency histograms, percentiles and rates.

use hdrhistogram::Histogram;
use serde::Serialize;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Highest latency the histograms track: 120 s, in microseconds. Larger values
/// are clamped to it (and still counted).
const MAX_US: u64 = 120_000_000;

/// Latency recorder in microseconds (3 significant figures, 1 µs .. 120 s).
#[derive(Debug, Clone)]
pub struct Latency {
    hist: Histogram<u64>,
}

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    pub fn new() -> Self {
        let hist = Histogram::new_with_bounds(1, MAX_US, 3).expect("constant bounds are valid");
        Self { hist }
    }

    /// Record one latency in microseconds (0 counts as 1 µs, huge values are clamped).
    pub fn record_us(&mut self, us: u64) {
        let v = us.clamp(1, MAX_US);
        // saturating_record cannot fail for values inside the bounds.
        self.hist.saturating_record(v);
    }

    pub fn record(&mut self, d: Duration) {
        self.record_us(u64::try_from(d.as_micros()).unwrap_or(MAX_US));
    }

    pub fn merge(&mut self, other: &Latency) {
        // Same bounds on both sides, so add cannot fail.
        let _ = self.hist.add(&other.hist);
    }

    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    /// Value at quantile `q` (0..=1), in microseconds; 0 when empty.
    pub fn quantile_us(&self, q: f64) -> u64 {
        if self.hist.is_empty() {
            0
        } else {
            self.hist.value_at_quantile(q)
        }
    }

    pub fn summary(&self) -> LatencySummary {
        if self.hist.is_empty() {
            return LatencySummary::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        LatencySummary {
            count: self.hist.len(),
            mean_ms: round3(self.hist.mean() / 1000.0),
            p50_ms: ms(self.quantile_us(0.50)),
            p90_ms: ms(self.quantile_us(0.90)),
            p99_ms: ms(self.quantile_us(0.99)),
            p999_ms: ms(self.quantile_us(0.999)),
            max_ms: ms(self.hist.max()),
        }
    }
}

/// Percentiles in milliseconds (values are rounded to histogram precision).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

/// Events per second over `elapsed`; 0 when nothing elapsed.
pub fn per_sec(events: u64, elapsed: Duration) -> f64 {
    let s = elapsed.as_secs_f64();
    if s <= 0.0 {
        0.0
    } else {
        round3(events as f64 / s)
    }
}

pub fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// Wall clock in microseconds since the Unix epoch: the timestamp carried in
/// payloads, comparable across processes on the same machine.
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Median of a list of numbers (mean of the middle two for even lengths).
/// NaN values are ignored; `None` when no value is left.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Per-sequence delivery bookkeeping for one subscriber: counts how often each
/// sequence number arrived, so losses and duplicates can be told apart.
#[derive(Debug, Clone, Default)]
pub struct SeqTracker {
    counts: Vec<u8>,
    /// Sequence numbers outside 0..expected (should never happen).
    pub out_of_range: u64,
}

impl SeqTracker {
    pub fn new(expected: usize) -> Self {
        Self {
            counts: vec![0; expected],
            out_of_range: 0,
        }
    }

    /// Returns true when this is the first delivery of `seq`.
    pub fn record(&mut self, seq: u64) -> bool {
        match usize::try_from(seq)
            .ok()
            .and_then(|i| self.counts.get_mut(i))
        {
            Some(c) => {
                *c = c.saturating_add(1);
                *c == 1
            }
            None => {
                self.out_of_range += 1;
                false
            }
        }
    }

    pub fn unique(&self) -> u64 {
        self.counts.iter().filter(|&&c| c > 0).count() as u64
    }

    pub fn lost(&self) -> u64 {
        self.counts.iter().filter(|&&c| c == 0).count() as u64
    }

    pub fn duplicated(&self) -> u64 {
        self.counts
            .iter()
            .map(|&c| u64::from(c.saturating_sub(1)))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_uniform_values() {
        let mut l = Latency::new();
        for us in 1..=10_000u64 {
            l.record_us(us);
        }
        let s = l.summary();
        assert_eq!(s.count, 10_000);
        // 3 significant figures: within 0.1 %.
        assert!((s.p50_ms - 5.0).abs() < 0.01, "{s:?}");
        assert!((s.p99_ms - 9.9).abs() < 0.01, "{s:?}");
        assert!((s.p999_ms - 9.99).abs() < 0.011, "{s:?}");
        assert!((s.max_ms - 10.0).abs() < 0.011, "{s:?}");
        assert!((s.mean_ms - 5.0).abs() < 0.01, "{s:?}");
    }

    #[test]
    fn empty_and_clamped() {
        let l = Latency::new();
        assert_eq!(l.summary(), LatencySummary::default());
        let mut l = Latency::new();
        l.record_us(0);
        l.record_us(u64::MAX);
        assert_eq!(l.count(), 2);
        assert_eq!(l.quantile_us(0.0), 1);
        assert!(l.quantile_us(1.0) >= MAX_US);
    }

    #[test]
    fn merge_adds_counts() {
        let mut a = Latency::new();
        let mut b = Latency::new();
        a.record(Duration::from_millis(1));
        b.record(Duration::from_millis(3));
        b.record(Duration::from_millis(3));
        a.merge(&b);
        assert_eq!(a.count(), 3);
        assert!((a.summary().p50_ms - 3.0).abs() < 0.01);
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN, 7.0]), Some(7.0));
    }

    #[test]
    fn rates() {
        assert_eq!(per_sec(10, Duration::ZERO), 0.0);
        assert_eq!(per_sec(500, Duration::from_millis(250)), 2000.0);
    }

    #[test]
    fn seq_tracker_counts_loss_and_duplicates() {
        let mut t = SeqTracker::new(5);
        assert!(t.record(0));
        assert!(t.record(2));
        assert!(!t.record(2));
        assert!(!t.record(2));
        assert!(t.record(4));
        assert!(!t.record(9));
        assert_eq!(t.unique(), 3);
        assert_eq!(t.lost(), 2);
        assert_eq!(t.duplicated(), 2);
        assert_eq!(t.out_of_range, 1);
    }
}
