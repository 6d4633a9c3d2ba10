//! Scenario results: the human table, the `--json` document, and the
//! Markdown comparison (medians over rounds, Chorus / peer ratios) that
//! `scripts/bench` writes to claudedocs/BENCHMARKS.md.
//!
//! JSON shape (also printed by bench/peers/socketio/bench.js):
//! ```json
//! {"scenario":"rpc","label":"chorus","urls":["ws://127.0.0.1:8080/ws"],
//!  "params":{"conns":100,...},
//!  "summary":{"requests_per_s":12345.0,"latency_p99_ms":3.1,...},
//!  "latency":{"all":{"count":..,"mean_ms":..,"p50_ms":..,"p90_ms":..,"p99_ms":..,"p999_ms":..,"max_ms":..}},
//!  "errors":["first few error messages"]}
//! ```

use crate::stats::{LatencySummary, median};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::fmt::Write as _;

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub scenario: String,
    pub label: String,
    pub urls: Vec<String>,
    pub params: Vec<(String, Value)>,
    /// Flat numbers compared across targets, in display order.
    pub summary: Vec<(String, f64)>,
    pub latency: Vec<(String, LatencySummary)>,
    pub errors: Vec<String>,
}

impl Report {
    pub fn new(scenario: &str, label: &str, urls: Vec<String>) -> Self {
        Self {
            scenario: scenario.into(),
            label: label.into(),
            urls,
            ..Self::default()
        }
    }

    pub fn param(&mut self, k: &str, v: impl Into<Value>) -> &mut Self {
        self.params.push((k.into(), v.into()));
        self
    }

    pub fn metric(&mut self, k: &str, v: f64) -> &mut Self {
        self.summary.push((k.into(), v));
        self
    }

    /// Adds the latency block and its p50/p99/p99.9/max to the summary as
    /// `<prefix>latency_p50_ms` etc.
    pub fn latency(&mut self, name: &str, prefix: &str, l: LatencySummary) -> &mut Self {
        self.metric(&format!("{prefix}latency_p50_ms"), l.p50_ms)
            .metric(&format!("{prefix}latency_p99_ms"), l.p99_ms)
            .metric(&format!("{prefix}latency_p999_ms"), l.p999_ms)
            .metric(&format!("{prefix}latency_max_ms"), l.max_ms);
        self.latency.push((name.into(), l));
        self
    }

    pub fn error(&mut self, e: String) {
        const MAX_ERRORS: usize = 10;
        if self.errors.len() < MAX_ERRORS && !self.errors.contains(&e) {
            self.errors.push(e);
        }
    }

    pub fn get(&self, k: &str) -> Option<f64> {
        self.summary.iter().find(|(n, _)| n == k).map(|(_, v)| *v)
    }

    pub fn to_json(&self) -> Value {
        let params: Map<String, Value> = self.params.iter().cloned().collect();
        let summary: Map<String, Value> = self
            .summary
            .iter()
            .map(|(k, v)| (k.clone(), num(*v)))
            .collect();
        let latency: Map<String, Value> = self
            .latency
            .iter()
            .map(|(k, l)| (k.clone(), serde_json::to_value(l).unwrap_or(Value::Null)))
            .collect();
        json!({
            "scenario": self.scenario,
            "label": self.label,
            "urls": self.urls,
            "params": params,
            "summary": summary,
            "latency": latency,
            "errors": self.errors,
        })
    }

    /// The human-readable table printed at the end of a run.
    pub fn to_table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "chorus-bench {} against {} ({})",
            self.scenario,
            self.label,
            self.urls.join(", ")
        );
        let params: Vec<String> = self
            .params
            .iter()
            .map(|(k, v)| format!("{k}={}", plain(v)))
            .collect();
        let _ = writeln!(out, "  params: {}", params.join(" "));
        let w = self
            .summary
            .iter()
            .map(|(k, _)| k.len())
            .max()
            .unwrap_or(0)
            .max(6);
        let _ = writeln!(out, "  {:<w$}  {:>14}", "metric", "value");
        let _ = writeln!(out, "  {:-<w$}  {:->14}", "", "");
        for (k, v) in &self.summary {
            let _ = writeln!(out, "  {k:<w$}  {:>14}", fmt_num(*v));
        }
        if !self.latency.is_empty() {
            let _ = writeln!(
                out,
                "  {:<12} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
                "latency(ms)", "count", "mean", "p50", "p90", "p99", "p99.9", "max"
            );
            for (name, l) in &self.latency {
                let _ = writeln!(
                    out,
                    "  {:<12} {:>10} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3} {:>9.3}",
                    name, l.count, l.mean_ms, l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms
                );
            }
        }
        for e in &self.errors {
            let _ = writeln!(out, "  error: {e}");
        }
        out
    }
}

fn num(v: f64) -> Value {
    if v.fract() == 0.0 && v.abs() < 9e15 {
        Value::from(v as i64)
    } else {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .unwrap_or(Value::Null)
    }
}

fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub fn fmt_num(v: f64) -> String {
    if v.is_nan() {
        "-".into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.3}")
    }
}

/// True for metrics where a larger number is better (rates, successes).
pub fn higher_is_better(metric: &str) -> bool {
    metric.ends_with("_per_s") || metric == "connections_ok" || metric == "delivered"
}

/// True for metrics worth a Chorus / peer ratio (rates, latencies, memory).
fn ratio_worthy(metric: &str) -> bool {
    metric.ends_with("_per_s") || metric.contains("latency_") || metric.contains("rss_per_conn")
}

const SCENARIO_ORDER: [&str; 10] = [
    "idle",
    "idle3",
    "rpc",
    "fanout",
    "paced",
    "cluster",
    "clusterlite",
    "presence",
    "send",
    "sendpaced",
];

/// Display order of metrics in the Markdown tables (JSON objects come back
/// sorted by name): rates, memory, latencies (all, local, remote; p50, p99,
/// p99.9, max), then counts by name.
fn metric_rank(m: &str) -> (u8, u8, u8, String) {
    if m.ends_with("_per_s") {
        return (0, 0, 0, m.to_string());
    }
    if m.contains("rss") {
        return (1, 0, 0, m.to_string());
    }
    if let Some(i) = m.find("latency_") {
        let scope = match &m[..i] {
            "" => 0,
            "local_" => 1,
            "remote_" => 2,
            _ => 3,
        };
        let q = match &m[i + "latency_".len()..] {
            "p50_ms" => 0,
            "p99_ms" => 1,
            "p999_ms" => 2,
            "max_ms" => 3,
            _ => 4,
        };
        return (2, scope, q, m.to_string());
    }
    (3, 0, 0, m.to_string())
}

/// Build the Markdown comparison from result documents (each a `--json`
/// output). Results are grouped by scenario and label; each metric shows the
/// median over rounds (with min..max) and the ratio `baseline / peer` of the
/// medians.
pub fn markdown(results: &[Value], baseline: &str) -> String {
    // scenario -> label -> metric -> values
    let mut data: BTreeMap<String, BTreeMap<String, BTreeMap<String, Vec<f64>>>> = BTreeMap::new();
    let mut metric_order: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in results {
        let (Some(scenario), Some(label)) = (r["scenario"].as_str(), r["label"].as_str()) else {
            continue;
        };
        let Some(summary) = r["summary"].as_object() else {
            continue;
        };
        let order = metric_order.entry(scenario.to_string()).or_default();
        let by_metric = data
            .entry(scenario.to_string())
            .or_default()
            .entry(label.to_string())
            .or_default();
        for (k, v) in summary {
            if let Some(x) = v.as_f64() {
                by_metric.entry(k.clone()).or_default().push(x);
                if !order.contains(k) {
                    order.push(k.clone());
                }
            }
        }
    }
    for order in metric_order.values_mut() {
        order.sort_by_key(|m| metric_rank(m));
    }
    let mut scenarios: Vec<&String> = data.keys().collect();
    scenarios.sort_by_key(|s| {
        SCENARIO_ORDER
            .iter()
            .position(|o| o == s)
            .unwrap_or(usize::MAX)
    });

    let mut out = String::new();
    for scenario in scenarios {
        let by_label = &data[scenario];
        let mut labels: Vec<&String> = by_label.keys().collect();
        labels.sort_by_key(|l| (l.as_str() != baseline, l.to_string()));
        let peers: Vec<&&String> = labels.iter().filter(|l| l.as_str() != baseline).collect();
        let have_base = by_label.contains_key(baseline);
        let _ = writeln!(out, "### {scenario}\n");
        let mut header = String::from("| metric |");
        let mut sep = String::from("| --- |");
        for l in &labels {
            let n = by_label[*l].values().map(Vec::len).max().unwrap_or(0);
            let _ = write!(header, " {l} (median of {n}) |");
            sep.push_str(" ---: |");
        }
        if have_base {
            for p in &peers {
                let _ = write!(header, " {baseline} / {p} |");
                sep.push_str(" ---: |");
            }
        }
        let _ = writeln!(out, "{header}\n{sep}");
        for metric in &metric_order[scenario] {
            let dir = if higher_is_better(metric) {
                "↑"
            } else {
                "↓"
            };
            let mut row = format!("| {metric} {dir} |");
            let med = |l: &str| {
                by_label
                    .get(l)
                    .and_then(|m| m.get(metric))
                    .and_then(|v| median(v))
            };
            for l in &labels {
                let vals = by_label[*l].get(metric).cloned().unwrap_or_default();
                match median(&vals) {
                    Some(m) if vals.len() > 1 => {
                        let lo = vals.iter().copied().fold(f64::INFINITY, f64::min);
                        let hi = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                        let _ = write!(row, " {} ({}..{}) |", fmt_num(m), fmt_num(lo), fmt_num(hi));
                    }
                    Some(m) => {
                        let _ = write!(row, " {} |", fmt_num(m));
                    }
                    None => row.push_str(" - |"),
                }
            }
            if have_base {
                for p in &peers {
                    match (med(baseline), med(p)) {
                        (Some(b), Some(x)) if ratio_worthy(metric) && x != 0.0 => {
                            let _ = write!(row, " {:.2}x |", b / x);
                        }
                        _ => row.push_str(" |"),
                    }
                }
            }
            let _ = writeln!(out, "{row}");
        }
        let _ = writeln!(out);
    }
    if out.is_empty() {
        out.push_str("(no results)\n");
    } else {
        let _ = writeln!(
            out,
            "↑ higher is better, ↓ lower is better. Ratios are {baseline}'s median divided by the peer's \
             median: above 1 means {baseline} is ahead on ↑ rows and behind on ↓ rows."
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Latency;

    fn sample(label: &str, rps: f64, p99: f64) -> Value {
        let mut r = Report::new("rpc", label, vec!["ws://127.0.0.1:1/ws".into()]);
        r.param("conns", 2)
            .metric("requests_per_s", rps)
            .metric("latency_p99_ms", p99)
            .metric("errors", 0.0);
        r.to_json()
    }

    #[test]
    fn json_shape() {
        let mut l = Latency::new();
        l.record_us(1500);
        let mut r = Report::new("fanout", "chorus", vec!["ws://127.0.0.1:1/ws".into()]);
        r.param("subs", 3)
            .metric("deliveries_per_s", 12.5)
            .latency("all", "", l.summary());
        r.error("boom".into());
        r.error("boom".into());
        let j = r.to_json();
        assert_eq!(j["scenario"], "fanout");
        assert_eq!(j["params"]["subs"], 3);
        assert_eq!(j["summary"]["deliveries_per_s"], 12.5);
        assert_eq!(j["summary"]["latency_p50_ms"], 1.5);
        assert_eq!(j["latency"]["all"]["count"], 1);
        assert_eq!(j["errors"].as_array().map(Vec::len), Some(1));
        let t = r.to_table();
        assert!(t.contains("deliveries_per_s"), "{t}");
        assert!(t.contains("error: boom"), "{t}");
        assert_eq!(r.get("latency_p99_ms"), Some(1.5));
    }

    #[test]
    fn markdown_medians_and_ratios() {
        let results = vec![
            sample("chorus", 300.0, 1.0),
            sample("node-ws", 100.0, 4.0),
            sample("chorus", 100.0, 3.0),
            sample("chorus", 200.0, 2.0),
            sample("node-ws", 100.0, 4.0),
            json!({"bogus": true}),
        ];
        let md = markdown(&results, "chorus");
        assert!(md.contains("### rpc"), "{md}");
        assert!(
            md.contains("| chorus (median of 3) | node-ws (median of 2) | chorus / node-ws |"),
            "{md}"
        );
        assert!(
            md.contains("| requests_per_s ↑ | 200 (100..300) | 100 (100..100) | 2.00x |"),
            "{md}"
        );
        assert!(
            md.contains("| latency_p99_ms ↓ | 2 (1..3) | 4 (4..4) | 0.50x |"),
            "{md}"
        );
        // rates first, then latencies, then counts
        let pos = |s: &str| md.find(s).unwrap_or(usize::MAX);
        assert!(pos("| requests_per_s") < pos("| latency_p99_ms"), "{md}");
        assert!(pos("| latency_p99_ms") < pos("| errors"), "{md}");
        // counts get no ratio
        assert!(md.contains("| errors ↓ | 0 (0..0) | 0 (0..0) | |"), "{md}");
        assert_eq!(markdown(&[], "chorus"), "(no results)\n");
    }

    #[test]
    fn metric_ordering() {
        let mut v = vec![
            "lost",
            "remote_latency_p50_ms",
            "latency_max_ms",
            "latency_p50_ms",
            "deliveries_per_s",
            "rss_per_conn_bytes",
        ];
        v.sort_by_key(|m| metric_rank(m));
        assert_eq!(
            v,
            [
                "deliveries_per_s",
                "rss_per_conn_bytes",
                "latency_p50_ms",
                "latency_max_ms",
                "remote_latency_p50_ms",
                "lost"
            ]
        );
    }

    #[test]
    fn number_formatting() {
        assert_eq!(fmt_num(3.0), "3");
        assert_eq!(fmt_num(1234.5678), "1234.6");
        assert_eq!(fmt_num(0.12345), "0.123");
        assert_eq!(fmt_num(f64::NAN), "-");
    }
}
