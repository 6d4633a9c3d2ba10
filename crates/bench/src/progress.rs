//! A minimal stderr progress ticker: one self-overwriting line, four times a
//! second, only when stderr is a terminal (and not `--quiet`).

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Progress {
    done: Arc<AtomicBool>,
    handle: Option<tokio::task::JoinHandle<()>>,
}

impl Progress {
    /// Show `label: <count>/<total> (<rate>/s) <elapsed>` until [`Progress::finish`].
    /// `extra` is appended when non-zero (e.g. failures).
    pub fn start(
        enabled: bool,
        label: &str,
        total: u64,
        count: Arc<AtomicU64>,
        extra: Option<(&'static str, Arc<AtomicU64>)>,
    ) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        if !enabled || !std::io::stderr().is_terminal() {
            return Self { done, handle: None };
        }
        let label = label.to_string();
        let d = done.clone();
        let handle = tokio::spawn(async move {
            let start = Instant::now();
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            while !d.load(Ordering::Relaxed) {
                tick.tick().await;
                let n = count.load(Ordering::Relaxed);
                let secs = start.elapsed().as_secs_f64();
                let rate = if secs > 0.0 { n as f64 / secs } else { 0.0 };
                let pct = if total > 0 {
                    100.0 * n as f64 / total as f64
                } else {
                    0.0
                };
                let bar = bar(pct, 24);
                let mut line =
                    format!("\r{label} [{bar}] {n}/{total} {pct:5.1}% {rate:>10.0}/s {secs:6.1}s");
                if let Some((name, v)) = &extra {
                    let v = v.load(Ordering::Relaxed);
                    if v > 0 {
                        line.push_str(&format!(" {name}={v}"));
                    }
                }
                let mut err = std::io::stderr().lock();
                let _ = write!(err, "{line}\x1b[K");
                let _ = err.flush();
            }
        });
        Self {
            done,
            handle: Some(handle),
        }
    }

    pub async fn finish(mut self) {
        self.done.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            h.abort();
            let _ = h.await;
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[K");
            let _ = err.flush();
        }
    }
}

fn bar(pct: f64, width: usize) -> String {
    let filled = ((pct / 100.0) * width as f64)
        .round()
        .clamp(0.0, width as f64) as usize;
    let mut s = "#".repeat(filled);
    s.push_str(&"-".repeat(width - filled));
    s
}

/// A plain status line on stderr (suppressed by `--quiet`).
pub fn note(enabled: bool, msg: &str) {
    if enabled {
        eprintln!("{msg}");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn bar_widths() {
        assert_eq!(super::bar(0.0, 4), "----");
        assert_eq!(super::bar(50.0, 4), "##--");
        assert_eq!(super::bar(150.0, 4), "####");
    }
}
