//! `send`: direct messages to single users through the server API.
//!
//! Worker processes hold `users` connected users (one JWT each, see
//! [`crate::idle::Pool`]); this process connects `targets` more users itself, spread
//! over the replicas, each also subscribed to its own channel `user:<i>:inbox`. Then
//! it makes `messages` calls of `POST /api` per phase, `requests` in flight (or at a
//! fixed rate), through the replicas in turn: message `i` goes through replica
//! `i % R` to target `(i / R) % T`, so every target receives through every replica
//! (one in R local, the rest across the backbone). Phases alternate between the two
//! modes, so each is measured beside the other in the same run:
//!
//! - `send`: `{"users": [<the target's user>], "data": ...}`, answered `{"devices": 1}`;
//! - `publish`: `{"channel": "user:<i>:inbox", "data": ...}`, the same-run peer.
//!
//! Each payload carries its sequence number, its phase and the wall-clock time the
//! POST started; the targets measure latency to the WebSocket receipt, losses,
//! duplicates and misrouted deliveries.

use crate::conn::{self, Target};
use crate::http::HttpConn;
use crate::idle::{Pool, plan};
use crate::progress;
use crate::report::Report;
use crate::stats::{Latency, SeqTracker, median, now_us, per_sec, round3};
use crate::{Common, pad};
use futures_util::StreamExt;
use serde::Deserialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

/// The two ways of reaching one user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `send {"users": [..]}`.
    Send,
    /// `publish` to the user's own channel.
    Publish,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Self::Send => "send",
            Self::Publish => "publish",
        }
    }
}

#[derive(Debug, Clone)]
pub struct SendOpts {
    /// Connected users held by worker processes (the population).
    pub users: usize,
    /// Users this process connects and sends to.
    pub targets: usize,
    /// Most connections one worker process holds.
    pub per_worker: usize,
    /// Calls per phase.
    pub messages: u64,
    /// Phases per mode (they alternate: send, publish, publish, send, ...).
    pub rounds: usize,
    /// Calls in flight at once (each on its own keep-alive connection).
    pub requests: usize,
    /// Calls per second; 0 = flat out (`requests` in flight all the time).
    pub rate: f64,
    /// Padding bytes in each payload.
    pub payload: usize,
    /// `WS_API_KEY`.
    pub api_key: String,
    /// After the last call, stop waiting once no delivery arrived for this long.
    pub drain: Duration,
    /// Replica process ids whose VmRSS is summed (reported).
    pub server_pids: Vec<u32>,
}

impl Default for SendOpts {
    fn default() -> Self {
        Self {
            users: 19_000,
            targets: 300,
            per_worker: 10_000,
            messages: 30_000,
            rounds: 3,
            requests: 32,
            rate: 0.0,
            payload: 64,
            api_key: String::new(),
            drain: Duration::from_secs(5),
            server_pids: Vec::new(),
        }
    }
}

/// Which replica message `seq` goes through and which target it is for.
pub fn route(seq: u64, replicas: usize, targets: usize) -> (usize, usize) {
    let r = replicas.max(1) as u64;
    let t = targets.max(1) as u64;
    ((seq % r) as usize, ((seq / r) % t) as usize)
}

/// The replica target `k` is connected to.
pub fn home(k: usize, replicas: usize) -> usize {
    k % replicas.max(1)
}

/// The channel of the user with global index `index`.
pub fn inbox(index: usize) -> String {
    format!("user:{index}:inbox")
}

/// The body of one API call.
pub fn body(mode: Mode, seq: u64, phase: u32, index: usize, ts: u64, pad: &str) -> String {
    let data = format!(r#"{{"seq":{seq},"ts":{ts},"ph":{phase},"pad":"{pad}"}}"#);
    match mode {
        Mode::Send => format!(
            r#"{{"jsonrpc":"2.0","id":{seq},"method":"send","params":{{"users":["{}"],"data":{data}}}}}"#,
            crate::user_name(index)
        ),
        Mode::Publish => format!(
            r#"{{"jsonrpc":"2.0","id":{seq},"method":"publish","params":{{"channel":"{}","data":{data}}}}}"#,
            inbox(index)
        ),
    }
}

/// The mark a payload carries.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
pub struct Mark {
    pub seq: u64,
    pub ts: u64,
    pub ph: u32,
}

/// What a target makes of a frame: how it arrived and its mark.
pub fn parse_receipt(text: &str) -> Option<(Mode, Mark)> {
    #[derive(Deserialize)]
    struct Note<'a> {
        #[serde(borrow)]
        method: &'a str,
        params: Params,
    }
    #[derive(Deserialize)]
    struct Params {
        #[serde(default)]
        data: Option<Mark>,
        #[serde(default)]
        seq: Option<u64>,
        #[serde(default)]
        ts: Option<u64>,
        #[serde(default)]
        ph: Option<u32>,
    }
    let n: Note<'_> = serde_json::from_str(text).ok()?;
    match n.method {
        "message.user" => Some((
            Mode::Send,
            Mark {
                seq: n.params.seq?,
                ts: n.params.ts?,
                ph: n.params.ph?,
            },
        )),
        "message" => Some((Mode::Publish, n.params.data?)),
        _ => None,
    }
}

/// How the API answered one call: `Ok(devices)` for send (None for publish).
pub fn check_answer(mode: Mode, status: u16, body: &[u8]) -> Result<Option<u64>, String> {
    let text = String::from_utf8_lossy(body);
    if status != 200 {
        return Err(format!("HTTP {status}: {}", conn::truncate(&text, 200)));
    }
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| format!("bad JSON {e}: {}", conn::truncate(&text, 200)))?;
    if let Some(e) = v.get("error") {
        return Err(format!("error {e}"));
    }
    let result = v.get("result").ok_or("a response without result")?;
    match mode {
        Mode::Send => result["devices"]
            .as_u64()
            .map(Some)
            .ok_or_else(|| format!("send result {result}")),
        Mode::Publish => Ok(None),
    }
}

/// Deliveries of the current phase, shared by the targets.
#[derive(Debug, Default)]
struct Collector {
    phase: u32,
    mode: Option<Mode>,
    replicas: usize,
    targets: usize,
    tracker: SeqTracker,
    all: Latency,
    local: Latency,
    remote: Latency,
    delivered: u64,
    /// Deliveries of an earlier phase or of the other mode.
    stale: u64,
    /// Deliveries to a target the message was not for.
    misrouted: u64,
    last_rx: Option<Instant>,
}

struct Shared {
    collector: Mutex<Collector>,
    delivered: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Collector> {
        self.collector
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A delivery to target `k`.
    fn receipt(&self, k: usize, mode: Mode, mark: Mark, now_us: u64) {
        let mut c = self.lock();
        if mark.ph != c.phase || c.mode != Some(mode) {
            c.stale += 1;
            return;
        }
        let (via, for_target) = route(mark.seq, c.replicas, c.targets);
        if for_target != k {
            c.misrouted += 1;
            return;
        }
        if !c.tracker.record(mark.seq) {
            return;
        }
        let lat = now_us.saturating_sub(mark.ts);
        c.all.record_us(lat);
        if via == home(k, c.replicas) {
            c.local.record_us(lat);
        } else {
            c.remote.record_us(lat);
        }
        c.delivered += 1;
        c.last_rx = Some(Instant::now());
        let n = c.delivered;
        drop(c);
        self.delivered.send_replace(n);
    }
}

/// One phase's outcome.
#[derive(Debug)]
struct PhaseResult {
    mode: Mode,
    posted: u64,
    api_errors: u64,
    count_wrong: u64,
    delivered: u64,
    lost: u64,
    duplicated: u64,
    misrouted: u64,
    elapsed: Duration,
    all: Latency,
    local: Latency,
    remote: Latency,
    http: Latency,
    /// Fixed rate: the latest a call started after its due time.
    behind: Duration,
    first_error: Option<String>,
}

#[derive(Default)]
struct CallerStats {
    http: Latency,
    posted: u64,
    api_errors: u64,
    count_wrong: u64,
    behind: Duration,
    first_error: Option<String>,
}

#[allow(clippy::too_many_arguments)]
async fn run_phase(
    shared: &Arc<Shared>,
    apis: &[std::net::SocketAddr],
    target_index: &[usize],
    o: &SendOpts,
    mode: Mode,
    phase: u32,
    messages: u64,
    rate: f64,
) -> PhaseResult {
    let replicas = apis.len();
    {
        let mut c = shared.lock();
        *c = Collector {
            phase,
            mode: Some(mode),
            replicas,
            targets: target_index.len(),
            tracker: SeqTracker::new(usize::try_from(messages).unwrap_or(usize::MAX)),
            stale: c.stale,
            ..Collector::default()
        };
        shared.delivered.send_replace(0);
    }
    let next = Arc::new(AtomicU64::new(0));
    let pad = Arc::new(pad(o.payload));
    let key = Arc::new(o.api_key.clone());
    let targets = Arc::new(target_index.to_vec());
    let start = Instant::now();
    let mut callers = Vec::with_capacity(o.requests);
    for _ in 0..o.requests.max(1) {
        let (next, pad, key, targets) = (next.clone(), pad.clone(), key.clone(), targets.clone());
        let apis = apis.to_vec();
        callers.push(tokio::spawn(async move {
            let mut s = CallerStats::default();
            let mut conns: Vec<Option<HttpConn>> = (0..apis.len()).map(|_| None).collect();
            loop {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if seq >= messages {
                    break;
                }
                if rate > 0.0 {
                    let due = start + Duration::from_secs_f64(seq as f64 / rate);
                    tokio::time::sleep_until(due.into()).await;
                    s.behind = s.behind.max(Instant::now().saturating_duration_since(due));
                }
                let (r, t) = route(seq, apis.len(), targets.len());
                let t0 = Instant::now();
                let text = body(mode, seq, phase, targets[t], now_us(), &pad);
                let answer = async {
                    if conns[r].is_none() {
                        conns[r] = Some(HttpConn::connect(apis[r]).await?);
                    }
                    match conns[r].as_mut() {
                        Some(c) => c.post("/api", Some(&key), &text).await,
                        None => Err(std::io::Error::other("no connection")),
                    }
                }
                .await;
                s.posted += 1;
                match answer {
                    Ok(resp) => {
                        s.http.record(t0.elapsed());
                        match check_answer(mode, resp.status, &resp.body) {
                            Ok(Some(1) | None) => {}
                            Ok(Some(n)) => {
                                s.count_wrong += 1;
                                s.first_error
                                    .get_or_insert_with(|| format!("send counted {n} devices"));
                            }
                            Err(e) => {
                                s.api_errors += 1;
                                s.first_error.get_or_insert(e);
                            }
                        }
                    }
                    Err(e) => {
                        conns[r] = None;
                        s.api_errors += 1;
                        s.first_error
                            .get_or_insert_with(|| format!("POST /api: {e}"));
                    }
                }
            }
            s
        }));
    }
    let mut calls = CallerStats::default();
    for c in callers {
        if let Ok(s) = c.await {
            calls.http.merge(&s.http);
            calls.posted += s.posted;
            calls.api_errors += s.api_errors;
            calls.count_wrong += s.count_wrong;
            calls.behind = calls.behind.max(s.behind);
            if calls.first_error.is_none() {
                calls.first_error = s.first_error;
            }
        }
    }
    // Every call answered: wait for the deliveries, until none came for `drain`.
    let mut rx = shared.delivered.subscribe();
    loop {
        if *rx.borrow_and_update() >= messages {
            break;
        }
        match tokio::time::timeout(o.drain, rx.changed()).await {
            Ok(Ok(())) => {}
            _ => break,
        }
    }
    let c = {
        let mut now = shared.lock();
        let c = std::mem::take(&mut *now);
        // Nothing of this phase counts any more (but late ones are counted).
        now.phase = u32::MAX;
        now.stale = c.stale;
        c
    };
    let elapsed = c
        .last_rx
        .map_or(Duration::ZERO, |t| t.saturating_duration_since(start));
    PhaseResult {
        mode,
        posted: calls.posted,
        api_errors: calls.api_errors,
        count_wrong: calls.count_wrong,
        delivered: c.delivered,
        lost: c.tracker.lost(),
        duplicated: c.tracker.duplicated(),
        misrouted: c.misrouted,
        elapsed,
        all: c.all,
        local: c.local,
        remote: c.remote,
        http: calls.http,
        behind: calls.behind,
        first_error: calls.first_error,
    }
}

/// Connects target `k` (global index `index`) and subscribes it to its inbox.
async fn connect_target(c: &Common, target: &Target, index: usize) -> Result<conn::Ws, String> {
    let t = c.target_for(target, index);
    let (mut ws, _) = conn::connect(&t, None, c.hello, c.connect_timeout)
        .await
        .map_err(|e| format!("target {index} on {target}: {e}"))?;
    crate::idle::subscribe(&mut ws, &inbox(index))
        .await
        .map_err(|e| format!("target {index} subscribing: {e}"))?;
    Ok(ws)
}

/// Longest wait for presence to show every connection.
const SETTLE_BOUND: Duration = Duration::from_secs(120);

/// The connections `info {}` counts over all nodes.
pub fn counted_connections(response: &[u8]) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_slice(response).ok()?;
    v["result"]["nodes"]
        .as_array()?
        .iter()
        .map(|n| n["connections"].as_u64())
        .sum()
}

/// Asks every replica `info {}` (every 100 ms: the server announces nothing) until
/// each counts `expected` connections in the cluster.
async fn wait_presence(
    apis: &[std::net::SocketAddr],
    key: &str,
    expected: u64,
    bound: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + bound;
    let body = r#"{"jsonrpc":"2.0","method":"info","params":{},"id":1}"#;
    let mut conns: Vec<Option<HttpConn>> = apis.iter().map(|_| None).collect();
    let mut last = vec![None; apis.len()];
    loop {
        for (i, addr) in apis.iter().enumerate() {
            if last[i] == Some(expected) {
                continue;
            }
            if conns[i].is_none() {
                conns[i] = HttpConn::connect(*addr).await.ok();
            }
            let answer = match conns[i].as_mut() {
                Some(c) => c.post("/api", Some(key), body).await.ok(),
                None => None,
            };
            match answer {
                Some(r) => last[i] = counted_connections(&r.body),
                None => conns[i] = None,
            }
        }
        if last.iter().all(|n| *n == Some(expected)) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "after {bound:?} the replicas count {last:?} connections, expected {expected}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The order of the modes in round `round`: send first in even rounds.
pub fn modes_of_round(round: usize) -> [Mode; 2] {
    if round.is_multiple_of(2) {
        [Mode::Send, Mode::Publish]
    } else {
        [Mode::Publish, Mode::Send]
    }
}

pub async fn run(c: &Common, o: &SendOpts) -> Report {
    let mut report = Report::new("send", &c.label, c.url_strings());
    let n_urls = c.urls.len();
    let plan = plan(o.users, n_urls, o.per_worker);
    report
        .param("users", o.users)
        .param("targets", o.targets)
        .param("replicas", n_urls)
        .param("workers", plan.len())
        .param("messages_per_phase", o.messages)
        .param("rounds", o.rounds)
        .param("requests_in_flight", o.requests)
        .param("rate_per_s", o.rate)
        .param("payload_bytes", o.payload)
        .param("server_pids", o.server_pids.clone());
    if o.api_key.is_empty() {
        report.error("send needs the server's API key (--api-key or CHORUS_BENCH_API_KEY)".into());
        return report;
    }
    if o.targets == 0 {
        report.error("send needs at least one target".into());
        return report;
    }

    // The population first.
    let mut pool = match Pool::spawn(c, &plan, None) {
        Ok(pool) => pool,
        Err(e) => {
            report.error(e);
            return report;
        }
    };
    if let Err(e) = pool.ready(Duration::from_secs(60)).await {
        report.error(e);
        return report;
    }
    let bound = c.connect_timeout * (o.users.div_ceil(c.concurrency.max(1)) as u32 + 2);
    let connected = pool.connect(bound).await;
    for e in &connected.errors {
        report.error(e.clone());
    }
    progress::note(
        c.progress,
        &format!(
            "send: {} users up ({} failed) in {:.2?}",
            connected.ok, connected.failed, connected.elapsed
        ),
    );

    // The targets, after the population's indices.
    let (delivered, _) = watch::channel(0u64);
    let shared = Arc::new(Shared {
        collector: Mutex::new(Collector {
            phase: u32::MAX,
            ..Collector::default()
        }),
        delivered,
    });
    let target_index: Vec<usize> = (0..o.targets).map(|k| o.users + k).collect();
    let setups = futures_util::future::join_all(
        target_index
            .iter()
            .enumerate()
            .map(|(k, &index)| connect_target(c, &c.urls[home(k, n_urls)], index)),
    )
    .await;
    let (stop_tx, stop_rx) = watch::channel(false);
    let closed_early = Arc::new(AtomicU64::new(0));
    let mut readers = Vec::with_capacity(o.targets);
    let mut target_failures = 0u64;
    for (k, setup) in setups.into_iter().enumerate() {
        let mut ws = match setup {
            Ok(ws) => ws,
            Err(e) => {
                target_failures += 1;
                report.error(e);
                continue;
            }
        };
        let (shared, mut stop, closed_early) =
            (shared.clone(), stop_rx.clone(), closed_early.clone());
        readers.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    m = ws.next() => match m {
                        Some(Ok(Message::Text(t))) => {
                            if let Some((mode, mark)) = parse_receipt(t.as_str()) {
                                shared.receipt(k, mode, mark, now_us());
                            }
                        }
                        Some(Ok(_)) => {}
                        _ => {
                            if !*stop.borrow() {
                                closed_early.fetch_add(1, Ordering::Relaxed);
                            }
                            break;
                        }
                    }
                }
            }
            let _ = ws.close(None).await;
        }));
    }
    let apis: Vec<std::net::SocketAddr> = c.urls.iter().map(|t| t.addr).collect();

    // Every connection visible in presence on every replica: until then a `send`
    // reaches its user but counts 0 devices. How long that takes is reported.
    let expected = connected.ok + (o.targets as u64 - target_failures);
    let settle_start = Instant::now();
    let settled = wait_presence(&apis, &o.api_key, expected, SETTLE_BOUND).await;
    let settle = settle_start.elapsed();
    if let Err(e) = &settled {
        report.error(format!("presence did not settle: {e}"));
    }
    progress::note(
        c.progress,
        &format!("send: {expected} connections in presence after {settle:.2?}"),
    );

    // Warm-up: every target through every replica, in both modes, not timed.
    let mut phase = 0u32;
    let mut warm_missing = 0u64;
    for mode in [Mode::Send, Mode::Publish] {
        let warm = (o.targets * n_urls) as u64;
        let r = run_phase(&shared, &apis, &target_index, o, mode, phase, warm, 0.0).await;
        phase += 1;
        warm_missing += warm.saturating_sub(r.delivered);
        if let Some(e) = r.first_error {
            report.error(format!("warm-up {}: {e}", mode.name()));
        }
    }
    if warm_missing > 0 {
        report.error(format!("{warm_missing} warm-up messages did not arrive"));
    }

    let mut results: Vec<PhaseResult> = Vec::new();
    for round in 0..o.rounds {
        for mode in modes_of_round(round) {
            let r = run_phase(
                &shared,
                &apis,
                &target_index,
                o,
                mode,
                phase,
                o.messages,
                o.rate,
            )
            .await;
            phase += 1;
            progress::note(
                c.progress,
                &format!(
                    "send: round {} {}: {} of {} delivered, {:.0}/s, p99 {:.2} ms, {} API errors",
                    round + 1,
                    mode.name(),
                    r.delivered,
                    r.posted,
                    per_sec(r.delivered, r.elapsed),
                    r.all.summary().p99_ms,
                    r.api_errors
                ),
            );
            if let Some(e) = &r.first_error {
                report.error(format!("{} round {}: {e}", mode.name(), round + 1));
            }
            results.push(r);
        }
    }
    let _ = stop_tx.send(true);
    for r in readers {
        let _ = r.await;
    }
    let dropped = pool.close().await;

    let mut medians = Vec::new();
    for mode in [Mode::Send, Mode::Publish] {
        let name = mode.name();
        let mine: Vec<&PhaseResult> = results.iter().filter(|r| r.mode == mode).collect();
        let rates: Vec<f64> = mine
            .iter()
            .map(|r| per_sec(r.delivered, r.elapsed))
            .collect();
        let rate = median(&rates).unwrap_or(0.0);
        medians.push(rate);
        let (mut all, mut local, mut remote, mut http) = (
            Latency::new(),
            Latency::new(),
            Latency::new(),
            Latency::new(),
        );
        let sum = |f: fn(&PhaseResult) -> u64| mine.iter().map(|r| f(r)).sum::<u64>() as f64;
        for r in &mine {
            all.merge(&r.all);
            local.merge(&r.local);
            remote.merge(&r.remote);
            http.merge(&r.http);
        }
        let behind = mine.iter().map(|r| r.behind).max().unwrap_or_default();
        report
            .metric(&format!("{name}_deliveries_per_s"), round3(rate))
            .latency(name, &format!("{name}_"), all.summary())
            .latency(
                &format!("{name} local"),
                &format!("{name}_local_"),
                local.summary(),
            )
            .latency(
                &format!("{name} remote"),
                &format!("{name}_remote_"),
                remote.summary(),
            )
            .latency(
                &format!("{name} POST"),
                &format!("{name}_http_"),
                http.summary(),
            )
            .metric(&format!("{name}_posted"), sum(|r| r.posted))
            .metric(&format!("{name}_delivered"), sum(|r| r.delivered))
            .metric(&format!("{name}_lost"), sum(|r| r.lost))
            .metric(&format!("{name}_duplicated"), sum(|r| r.duplicated))
            .metric(&format!("{name}_misrouted"), sum(|r| r.misrouted))
            .metric(&format!("{name}_api_errors"), sum(|r| r.api_errors));
        if mode == Mode::Send {
            report.metric("send_devices_wrong", sum(|r| r.count_wrong));
        }
        if o.rate > 0.0 {
            report.metric(
                &format!("{name}_behind_schedule_ms"),
                round3(behind.as_secs_f64() * 1000.0),
            );
        }
    }
    if let [send, publish] = medians[..]
        && publish > 0.0
    {
        report.metric("send_to_publish_ratio", round3(send / publish));
    }
    let stale = shared.lock().stale;
    report
        .metric(
            "connections_ok",
            connected.ok as f64 + (o.targets as u64 - target_failures) as f64,
        )
        .metric(
            "connect_failures",
            connected.failed as f64 + target_failures as f64,
        )
        .metric("presence_settle_s", round3(settle.as_secs_f64()))
        .metric("warm_missing", warm_missing as f64)
        .metric("late_deliveries", stale as f64)
        .metric(
            "targets_dropped",
            closed_early.load(Ordering::Relaxed) as f64,
        )
        .metric("dropped_during_hold", dropped as f64);
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_is_reached_through_every_replica() {
        let (replicas, targets) = (3, 6);
        let mut seen = vec![[0u32; 3]; targets];
        for seq in 0..(replicas * targets * 2) as u64 {
            let (r, t) = route(seq, replicas, targets);
            seen[t][r] += 1;
        }
        assert!(seen.iter().all(|by| by.iter().all(|&n| n == 2)), "{seen:?}");
        assert_eq!(route(0, 3, 300), (0, 0));
        assert_eq!(route(4, 3, 300), (1, 1));
        assert_eq!(route(900, 3, 300), (0, 0));
        // One target, one replica: everything to it.
        assert_eq!(route(17, 1, 1), (0, 0));
        assert_eq!(home(4, 3), 1);
    }

    #[test]
    fn bodies_and_receipts_round_trip() {
        let send = body(Mode::Send, 7, 2, 19_005, 1234, "xx");
        let v: serde_json::Value = serde_json::from_str(&send).expect("json");
        assert_eq!(v["method"], "send");
        assert_eq!(v["params"]["users"][0], "user-19005");
        assert_eq!(v["params"]["data"]["seq"], 7);
        // What the target receives for a send: the data as the params.
        let note = format!(
            r#"{{"jsonrpc":"2.0","method":"message.user","params":{}}}"#,
            v["params"]["data"]
        );
        let mark = Mark {
            seq: 7,
            ts: 1234,
            ph: 2,
        };
        assert_eq!(parse_receipt(&note), Some((Mode::Send, mark)));

        let publish = body(Mode::Publish, 7, 2, 19_005, 1234, "");
        let v: serde_json::Value = serde_json::from_str(&publish).expect("json");
        assert_eq!(v["params"]["channel"], "user:19005:inbox");
        let note = format!(
            r#"{{"jsonrpc":"2.0","method":"message","params":{{"channel":"user:19005:inbox","data":{}}}}}"#,
            v["params"]["data"]
        );
        assert_eq!(parse_receipt(&note), Some((Mode::Publish, mark)));

        assert_eq!(
            parse_receipt(
                r#"{"jsonrpc":"2.0","method":"sys.connected","params":{"client_id":"a"}}"#
            ),
            None
        );
        assert_eq!(
            parse_receipt(r#"{"jsonrpc":"2.0","result":{},"id":1}"#),
            None
        );
    }

    #[test]
    fn answers_are_checked() {
        let ok = br#"{"jsonrpc":"2.0","result":{"devices":1},"id":3}"#;
        assert_eq!(check_answer(Mode::Send, 200, ok), Ok(Some(1)));
        let published = br#"{"jsonrpc":"2.0","result":{"channel":"user:1:inbox"},"id":3}"#;
        assert_eq!(check_answer(Mode::Publish, 200, published), Ok(None));
        assert!(check_answer(Mode::Send, 401, br#"{"error":"invalid"}"#).is_err());
        let refused = br#"{"jsonrpc":"2.0","error":{"code":-32053,"message":"x"},"id":3}"#;
        assert!(check_answer(Mode::Send, 200, refused).is_err());
        assert!(check_answer(Mode::Send, 200, b"nope").is_err());
        assert!(check_answer(Mode::Send, 200, br#"{"result":{"x":1}}"#).is_err());
    }

    #[test]
    fn receipts_are_sorted_into_their_phase() {
        let (delivered, _) = watch::channel(0);
        let shared = Shared {
            collector: Mutex::new(Collector {
                phase: 4,
                mode: Some(Mode::Send),
                replicas: 3,
                targets: 2,
                tracker: SeqTracker::new(6),
                ..Collector::default()
            }),
            delivered,
        };
        let mark = |seq, ph| Mark { seq, ts: 0, ph };
        // seq 0: replica 0, target 0 (home 0: local); seq 1: replica 1, target 0 (remote).
        shared.receipt(0, Mode::Send, mark(0, 4), 1_000);
        shared.receipt(0, Mode::Send, mark(1, 4), 2_000);
        shared.receipt(0, Mode::Send, mark(1, 4), 2_000);
        shared.receipt(1, Mode::Send, mark(2, 4), 0); // seq 2 is for target 0
        shared.receipt(0, Mode::Send, mark(0, 3), 0); // an earlier phase
        shared.receipt(0, Mode::Publish, mark(0, 4), 0); // the other mode
        let c = shared.lock();
        assert_eq!(c.delivered, 2);
        assert_eq!(*shared.delivered.borrow(), 2);
        assert_eq!(c.tracker.duplicated(), 1);
        assert_eq!(c.misrouted, 1);
        assert_eq!(c.stale, 2);
        assert_eq!((c.local.count(), c.remote.count()), (1, 1));
    }

    #[test]
    fn counts_connections_in_info() {
        let info = br#"{"jsonrpc":"2.0","result":{"nodes":[{"node_id":"a","connections":3},{"node_id":"b","connections":4}]},"id":1}"#;
        assert_eq!(counted_connections(info), Some(7));
        assert_eq!(
            counted_connections(br#"{"jsonrpc":"2.0","result":{"nodes":[]},"id":1}"#),
            Some(0)
        );
        assert_eq!(counted_connections(br#"{"error":"x"}"#), None);
        assert_eq!(counted_connections(b"{"), None);
    }

    #[test]
    fn modes_alternate() {
        assert_eq!(modes_of_round(0), [Mode::Send, Mode::Publish]);
        assert_eq!(modes_of_round(1), [Mode::Publish, Mode::Send]);
    }
}
