//! `rpc`: K connections, each keeping D `self.reply` requests in flight. With
//! `--proxied METHOD` (a method the server relays to its backend, e.g. one answered
//! by `chorus-bench backend`), rounds of the local method and of the proxied one
//! alternate in the same run, and the report has the medians of both and their ratio.

use crate::conn::{self, Incoming, Ws};
use crate::progress::{self, Progress};
use crate::report::Report;
use crate::stats::{Latency, median, per_sec};
use crate::{Common, pad};
use futures_util::{FutureExt, SinkExt, StreamExt};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, watch};
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Clone)]
pub struct RpcOpts {
    /// Connections (spread round-robin over the URLs).
    pub conns: usize,
    /// Requests in flight per connection.
    pub depth: usize,
    /// Requests per connection (upper bound).
    pub requests: u64,
    /// Stop issuing new requests after this long (upper bound).
    pub duration: Duration,
    /// Padding bytes in each request's params.
    pub payload: usize,
    /// Give up on outstanding responses after this long without one.
    pub response_timeout: Duration,
    /// The method called (`self.reply` echoes its params locally).
    pub method: String,
    /// A method the server relays to its backend, measured against `method`.
    pub proxied: Option<String>,
    /// With `proxied`: rounds of each, alternating.
    pub rounds: usize,
}

impl Default for RpcOpts {
    fn default() -> Self {
        Self {
            conns: 100,
            depth: 10,
            requests: 2_000,
            duration: Duration::from_secs(10),
            payload: 32,
            response_timeout: Duration::from_secs(10),
            method: "self.reply".to_owned(),
            proxied: None,
            rounds: 3,
        }
    }
}

#[derive(Debug, Default)]
struct ConnResult {
    lat: Latency,
    ok: u64,
    errors: u64,
    timed_out: u64,
    last: Option<Instant>,
    error: Option<String>,
}

pub async fn run(c: &Common, o: &RpcOpts) -> Report {
    let mut report = Report::new("rpc", &c.label, c.url_strings());
    report
        .param("conns", o.conns)
        .param("depth", o.depth)
        .param("requests_per_conn", o.requests)
        .param("duration_s", o.duration.as_secs_f64())
        .param("payload_bytes", o.payload)
        .param("method", o.method.clone());
    let Some(proxied) = &o.proxied else {
        phase(c, o, &o.method).await.write(&mut report, "");
        return report;
    };
    report
        .param("proxied_method", proxied.clone())
        .param("rounds", o.rounds);
    let (mut local, mut relayed) = (Vec::new(), Vec::new());
    for round in 0..o.rounds.max(1) {
        progress::note(
            c.progress,
            &format!("rpc: round {} of {}", round + 1, o.rounds),
        );
        local.push(phase(c, o, &o.method).await);
        relayed.push(phase(c, o, proxied).await);
    }
    let median_of = |phases: &[Phase], f: fn(&Phase) -> f64| {
        median(&phases.iter().map(f).collect::<Vec<_>>()).unwrap_or(0.0)
    };
    let rps = |p: &Phase| per_sec(p.ok, p.elapsed);
    let p50 = |p: &Phase| p.lat.summary().p50_ms;
    let (local_rps, proxied_rps) = (median_of(&local, rps), median_of(&relayed, rps));
    let (local_p50, proxied_p50) = (median_of(&local, p50), median_of(&relayed, p50));
    // The last round's full figures, then the medians over every round.
    if let (Some(last_local), Some(last_proxied)) = (local.pop(), relayed.pop()) {
        last_local.write(&mut report, "");
        last_proxied.write(&mut report, "proxied_");
    }
    report
        .metric("median_requests_per_s", local_rps)
        .metric("median_proxied_requests_per_s", proxied_rps)
        .metric("median_latency_p50_ms", local_p50)
        .metric("median_proxied_latency_p50_ms", proxied_p50)
        .metric(
            "local_over_proxied_rps",
            if proxied_rps > 0.0 {
                local_rps / proxied_rps
            } else {
                0.0
            },
        );
    report
}

/// One measured run of `method`.
struct Phase {
    up: u64,
    failed: u64,
    ok: u64,
    errors: u64,
    timed_out: u64,
    elapsed: Duration,
    lat: Latency,
    problems: Vec<String>,
}

impl Phase {
    fn write(self, report: &mut Report, prefix: &str) {
        for problem in self.problems {
            report.error(problem);
        }
        let name = |metric: &str| format!("{prefix}{metric}");
        report
            .metric(&name("connections_ok"), self.up as f64)
            .metric(&name("connect_failures"), self.failed as f64)
            .metric(&name("requests_ok"), self.ok as f64)
            .metric(&name("requests_error"), self.errors as f64)
            .metric(&name("requests_timed_out"), self.timed_out as f64)
            .metric(&name("elapsed_s"), self.elapsed.as_secs_f64())
            .metric(&name("requests_per_s"), per_sec(self.ok, self.elapsed))
            .latency(
                if prefix.is_empty() { "all" } else { "proxied" },
                prefix,
                self.lat.summary(),
            );
    }
}

async fn phase(c: &Common, o: &RpcOpts, method: &str) -> Phase {
    let mut problems = Vec::new();
    let method: Arc<str> = Arc::from(method);

    let connected = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let completed = Arc::new(AtomicU64::new(0));
    let sem = Arc::new(Semaphore::new(c.concurrency.max(1)));
    let (start_tx, start_rx) = watch::channel::<Option<Instant>>(None);
    let pad = Arc::new(pad(o.payload));

    let bar = Progress::start(
        c.progress,
        "connect",
        o.conns as u64,
        connected.clone(),
        Some(("failed", failed.clone())),
    );
    let mut tasks = Vec::with_capacity(o.conns);
    for i in 0..o.conns {
        let target = c.urls[i % c.urls.len()].clone();
        let (c2, o2, method) = (c.clone(), o.clone(), Arc::clone(&method));
        let (connected, failed, completed, sem, pad) = (
            connected.clone(),
            failed.clone(),
            completed.clone(),
            sem.clone(),
            pad.clone(),
        );
        let mut start_rx = start_rx.clone();
        tasks.push(tokio::spawn(async move {
            let ws = {
                let _permit = sem.acquire().await;
                conn::connect(&target, target.source_for(i), c2.hello, c2.connect_timeout).await
            };
            let mut ws = match ws {
                Ok((ws, _)) => {
                    connected.fetch_add(1, Ordering::Relaxed);
                    ws
                }
                Err(e) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    return ConnResult {
                        error: Some(format!("connect {target}: {e}")),
                        ..Default::default()
                    };
                }
            };
            let start = loop {
                if let Some(t) = *start_rx.borrow_and_update() {
                    break t;
                }
                if start_rx.changed().await.is_err() {
                    return ConnResult::default();
                }
            };
            let r = drive(&mut ws, &o2, &method, start, &pad, &completed).await;
            let _ = ws.close(None).await;
            r
        }));
    }
    // Wait until every connection is up or has failed (bounded by the connect timeout per wave).
    let waves = o.conns.div_ceil(c.concurrency.max(1)) as u32 + 1;
    let connect_deadline = Instant::now() + c.connect_timeout * waves;
    while connected.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < o.conns as u64
        && Instant::now() < connect_deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bar.finish().await;
    let up = connected.load(Ordering::Relaxed);
    progress::note(c.progress, &format!("rpc: {up} connections up, running"));

    let total = up * o.requests;
    let bar = Progress::start(c.progress, "rpc", total, completed.clone(), None);
    let start = Instant::now();
    let _ = start_tx.send(Some(start));
    let mut lat = Latency::new();
    let (mut ok, mut errors, mut timed_out) = (0u64, 0u64, 0u64);
    let mut last = start;
    for t in tasks {
        match t.await {
            Ok(r) => {
                lat.merge(&r.lat);
                ok += r.ok;
                errors += r.errors;
                timed_out += r.timed_out;
                if let Some(l) = r.last {
                    last = last.max(l);
                }
                if let Some(e) = r.error {
                    problems.push(e);
                }
            }
            Err(e) => problems.push(format!("task: {e}")),
        }
    }
    bar.finish().await;
    drop(start_tx);
    Phase {
        up,
        failed: failed.load(Ordering::Relaxed),
        ok,
        errors,
        timed_out,
        elapsed: last.saturating_duration_since(start),
        lat,
        problems,
    }
}

fn request(method: &str, id: u64, pad: &str) -> String {
    format!(
        r#"{{"jsonrpc":"2.0","id":{id},"method":"{method}","params":{{"n":{id},"pad":"{pad}"}}}}"#
    )
}

async fn drive(
    ws: &mut Ws,
    o: &RpcOpts,
    method: &str,
    start: Instant,
    pad: &str,
    completed: &AtomicU64,
) -> ConnResult {
    let mut r = ConnResult::default();
    let deadline = start + o.duration;
    let mut inflight: HashMap<u64, Instant> = HashMap::with_capacity(o.depth * 2);
    let mut next_id: u64 = 1;
    let last_id = o.requests;

    macro_rules! refill {
        () => {
            if Instant::now() < deadline {
                while next_id <= last_id && inflight.len() < o.depth {
                    if let Err(e) = ws.feed(Message::text(request(method, next_id, pad))).await {
                        r.error = Some(format!("send: {e}"));
                        return r;
                    }
                    inflight.insert(next_id, Instant::now());
                    next_id += 1;
                }
            }
            if let Err(e) = ws.flush().await {
                r.error = Some(format!("flush: {e}"));
                return r;
            }
        };
    }

    refill!();
    while !inflight.is_empty() {
        let first = match tokio::time::timeout(o.response_timeout, ws.next()).await {
            Ok(m) => m,
            Err(_) => {
                r.timed_out += inflight.len() as u64;
                r.error = Some(format!(
                    "{} responses not received within {:?}",
                    inflight.len(),
                    o.response_timeout
                ));
                break;
            }
        };
        let mut msg = first;
        loop {
            match msg {
                Some(Ok(Message::Text(t))) => {
                    if let Incoming::Response {
                        id: Some(id),
                        error,
                    } = conn::classify(t.as_str())
                        && let Some(sent) = inflight.remove(&id)
                    {
                        let now = Instant::now();
                        if error {
                            r.errors += 1;
                        } else {
                            r.ok += 1;
                            r.lat.record(now - sent);
                        }
                        r.last = Some(now);
                        completed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Some(Ok(Message::Close(f))) => {
                    r.error = Some(format!("server closed the connection: {f:?}"));
                    r.timed_out += inflight.len() as u64;
                    return r;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    r.error = Some(format!("read: {e}"));
                    r.timed_out += inflight.len() as u64;
                    return r;
                }
                None => {
                    r.error = Some("connection ended".into());
                    r.timed_out += inflight.len() as u64;
                    return r;
                }
            }
            // Take every response that is already buffered before writing again.
            match ws.next().now_or_never() {
                Some(m) => msg = m,
                None => break,
            }
        }
        refill!();
    }
    r
}
