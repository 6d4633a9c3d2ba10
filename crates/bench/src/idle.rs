//! `idle`: open N connections, hold them, and report the server's resident
//! memory growth per connection, the accept rate and failures.
//!
//! One process may hold at most 20 000 open files here, so the connections are
//! opened by worker processes (this binary re-executed as `idle-worker`), each
//! holding at most `per_worker` connections, bound to loopback source
//! addresses 127.0.0.2, 127.0.0.3, ... (see [`crate::conn::CONNS_PER_SOURCE`]).
//!
//! Master / worker protocol (one line each, worker stdout / stdin):
//! `ready` -> `go` -> `p <ok> <failed>`* -> `done <ok> <failed> <first error>`
//! \[-> `sub` -> `s <ok> <failed>`* -> `lat <µs> <µs> ...` -> `subdone <ok> <failed>
//! <first error>`\] -> `close` (or stdin EOF) -> `closed <dropped during hold>`.
//! The `sub` part (workers started with `--channel`) subscribes every connection;
//! [`Pool`] drives it for the `presence` and `send` scenarios.

use crate::Common;
use crate::conn::{self, Target};
use crate::progress::{self, Progress};
use crate::report::Report;
use crate::stats::{Latency, per_sec, round3};
use futures_util::StreamExt;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Clone)]
pub struct IdleOpts {
    /// Total connections, spread evenly over the URLs.
    pub conns: usize,
    /// Server process ids whose VmRSS is summed (before and after).
    pub server_pids: Vec<u32>,
    /// Most connections one worker process holds.
    pub per_worker: usize,
    /// How long to hold the connections after they are all up (and RSS is read).
    pub hold: Duration,
    /// Pause between the last connection and the RSS reading.
    pub settle: Duration,
}

impl Default for IdleOpts {
    fn default() -> Self {
        Self {
            conns: 19_000,
            server_pids: Vec::new(),
            per_worker: 10_000,
            hold: Duration::from_secs(2),
            settle: Duration::from_secs(1),
        }
    }
}

/// Resident set size of `pid` in bytes, from /proc/PID/status.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vmrss(&s)
}

/// The `VmRSS:` line of a /proc status file, in bytes.
pub fn parse_vmrss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut it = line["VmRSS:".len()..].split_whitespace();
    let n: u64 = it.next()?.parse().ok()?;
    let mult = match it.next() {
        Some("kB") | None => 1024,
        Some("mB") | Some("MB") => 1024 * 1024,
        Some(_) => 1024,
    };
    Some(n * mult)
}

fn total_rss(pids: &[u32]) -> Option<u64> {
    pids.iter().map(|&p| rss_bytes(p)).sum()
}

/// Split `conns` over `urls` and then into workers of at most `per_worker`.
/// Returns (url index, connections, global index base) per worker.
pub fn plan(conns: usize, urls: usize, per_worker: usize) -> Vec<(usize, usize, usize)> {
    let per_worker = per_worker.max(1);
    let mut out = Vec::new();
    let mut base = 0;
    for u in 0..urls {
        let share = conns / urls + usize::from(u < conns % urls);
        let workers = share.div_ceil(per_worker);
        for w in 0..workers {
            let n = share / workers + usize::from(w < share % workers);
            out.push((u, n, base));
            base += n;
        }
    }
    out
}

#[derive(Debug)]
enum Event {
    Ready,
    Progress(u64, u64),
    Done(u64, u64, String),
    SubProgress(u64, u64),
    SubDone(u64, u64, String),
    /// Subscribe latencies in microseconds (sent before `subdone`).
    Latencies(Vec<u32>),
    Closed(u64),
    Eof,
}

fn parse_event(line: &str) -> Option<Event> {
    if let Some(rest) = line.strip_prefix("lat") {
        let values: Result<Vec<u32>, _> = rest.split_whitespace().map(str::parse).collect();
        return values.ok().map(Event::Latencies);
    }
    let mut it = line.splitn(4, ' ');
    let kind = it.next()?;
    let mut num = || it.next().and_then(|s| s.trim().parse::<u64>().ok());
    Some(match kind {
        "ready" => Event::Ready,
        "p" => Event::Progress(num()?, num()?),
        "s" => Event::SubProgress(num()?, num()?),
        "done" | "subdone" => {
            let (a, b) = (num()?, num()?);
            let error = it.next().unwrap_or("").trim().to_string();
            if kind == "done" {
                Event::Done(a, b, error)
            } else {
                Event::SubDone(a, b, error)
            }
        }
        "closed" => Event::Closed(num()?),
        _ => return None,
    })
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
}

/// What one phase of a [`Pool`] (connect or subscribe) came to.
#[derive(Debug, Default)]
pub struct Phase {
    pub ok: u64,
    pub failed: u64,
    /// From the command to the last worker's report that it finished.
    pub elapsed: Duration,
    pub errors: Vec<String>,
    /// Subscribe phase: each subscription's request-to-reply time.
    pub latency: Latency,
}

/// Worker processes (this binary as `idle-worker`) that open and hold connections,
/// driven over their stdin and stdout. Worker `i` of [`plan`] opens its connections
/// with the global indices `base..base + n`, so connection `k` is user `user-k`.
pub struct Pool {
    workers: Vec<Worker>,
    rx: mpsc::UnboundedReceiver<(usize, Event)>,
    eof: Vec<bool>,
    conns: usize,
    progress: bool,
}

impl Pool {
    /// Starts one worker per entry of `plan` (see [`plan`]). With a channel, every
    /// connection subscribes to it when [`Pool::subscribe`] says so.
    pub fn spawn(
        c: &Common,
        plan: &[(usize, usize, usize)],
        channel: Option<&str>,
    ) -> Result<Self, String> {
        let exe = match &c.worker_exe {
            Some(exe) => exe.clone(),
            None => std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?,
        };
        let (tx, rx) = mpsc::unbounded_channel::<(usize, Event)>();
        let mut workers = Vec::new();
        for (i, &(url_idx, n, base)) in plan.iter().enumerate() {
            let mut cmd = Command::new(&exe);
            cmd.arg("idle-worker")
                .arg("--url")
                .arg(&c.urls[url_idx].url)
                .arg("--conns")
                .arg(n.to_string())
                .arg("--index-base")
                .arg(base.to_string())
                .arg("--concurrency")
                // The total stays at `concurrency`, below a typical listen backlog (511).
                .arg((c.concurrency / plan.len().max(1)).max(1).to_string())
                .arg("--connect-timeout")
                .arg(c.connect_timeout.as_secs_f64().to_string());
            if !c.hello {
                cmd.arg("--no-hello");
            }
            if let Some(channel) = channel {
                cmd.arg("--channel").arg(channel);
            }
            for grant in &c.jwt_grants {
                cmd.arg("--jwt-grant").arg(grant);
            }
            if let Some(secret) = &c.jwt_secret {
                // Through the environment, not the command line other users can read.
                cmd.env("CHORUS_BENCH_JWT_SECRET", secret);
            }
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true);
            let mut child = cmd.spawn().map_err(|e| format!("spawn worker: {e}"))?;
            let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
                return Err("worker pipes missing".into());
            };
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    if let Some(ev) = parse_event(&l) {
                        let _ = tx.send((i, ev));
                    }
                }
                let _ = tx.send((i, Event::Eof));
            });
            workers.push(Worker { child, stdin });
        }
        let n = workers.len();
        Ok(Self {
            workers,
            rx,
            eof: vec![false; n],
            conns: plan.iter().map(|p| p.1).sum(),
            progress: c.progress,
        })
    }

    pub fn len(&self) -> usize {
        self.workers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.workers.is_empty()
    }

    /// Waits until every worker minted its tokens and is ready to connect.
    pub async fn ready(&mut self, bound: Duration) -> Result<(), String> {
        let nw = self.workers.len();
        let mut ready = 0;
        let deadline = Instant::now() + bound;
        while ready < nw {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.rx.recv()).await {
                Ok(Some((_, Event::Ready))) => ready += 1,
                Ok(Some((i, Event::Eof))) => {
                    self.eof[i] = true;
                    return Err(format!("worker {i} exited before it was ready"));
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        if ready < nw {
            return Err(format!("only {ready}/{nw} workers became ready"));
        }
        Ok(())
    }

    async fn tell(&mut self, line: &[u8]) {
        for w in &mut self.workers {
            let _ = w.stdin.write_all(line).await;
            let _ = w.stdin.flush().await;
        }
    }

    /// Every worker opens its connections; resolves when all reported (or `bound`).
    pub async fn connect(&mut self, bound: Duration) -> Phase {
        let total = self.conns as u64;
        self.phase(b"go\n", "connect", total, bound, false).await
    }

    /// Every connection subscribes to the pool's channel; resolves when all replies
    /// (or failures) are in (or `bound`). `connected` is how many connections there are.
    pub async fn subscribe(&mut self, connected: u64, bound: Duration) -> Phase {
        self.phase(b"sub\n", "subscribe", connected, bound, true)
            .await
    }

    async fn phase(
        &mut self,
        command: &[u8],
        label: &str,
        total: u64,
        bound: Duration,
        subscribing: bool,
    ) -> Phase {
        let nw = self.workers.len();
        let mut phase = Phase::default();
        self.tell(command).await;
        let t0 = Instant::now();
        let ok_ctr = Arc::new(AtomicU64::new(0));
        let fail_ctr = Arc::new(AtomicU64::new(0));
        let bar = Progress::start(
            self.progress,
            label,
            total,
            ok_ctr.clone(),
            Some(("failed", fail_ctr.clone())),
        );
        let mut prog = vec![(0u64, 0u64); nw];
        let mut done = vec![false; nw];
        let mut t_last_done = t0;
        while done.iter().zip(&self.eof).any(|(d, e)| !d && !e) && t0.elapsed() < bound {
            match tokio::time::timeout(Duration::from_millis(500), self.rx.recv()).await {
                Ok(Some((i, Event::Progress(a, b)))) if !subscribing => prog[i] = (a, b),
                Ok(Some((i, Event::SubProgress(a, b)))) if subscribing => prog[i] = (a, b),
                Ok(Some((i, Event::Done(a, b, err)))) if !subscribing => {
                    prog[i] = (a, b);
                    done[i] = true;
                    t_last_done = Instant::now();
                    if !err.is_empty() {
                        phase.errors.push(format!("worker {i}: {err}"));
                    }
                }
                Ok(Some((i, Event::SubDone(a, b, err)))) if subscribing => {
                    prog[i] = (a, b);
                    done[i] = true;
                    t_last_done = Instant::now();
                    if !err.is_empty() {
                        phase.errors.push(format!("worker {i}: {err}"));
                    }
                }
                Ok(Some((_, Event::Latencies(values)))) => {
                    for us in values {
                        phase.latency.record_us(u64::from(us));
                    }
                }
                Ok(Some((i, Event::Eof))) => {
                    self.eof[i] = true;
                    phase.errors.push(format!("worker {i} exited early"));
                }
                Ok(Some(_)) | Err(_) => {}
                Ok(None) => break,
            }
            ok_ctr.store(prog.iter().map(|p| p.0).sum(), Ordering::Relaxed);
            fail_ctr.store(prog.iter().map(|p| p.1).sum(), Ordering::Relaxed);
        }
        bar.finish().await;
        if done.iter().zip(&self.eof).any(|(d, e)| !d && !e) {
            phase.errors.push(format!(
                "{label}: not every worker finished within {bound:?}"
            ));
        }
        phase.ok = prog.iter().map(|p| p.0).sum();
        phase.failed = prog.iter().map(|p| p.1).sum();
        phase.elapsed = t_last_done.saturating_duration_since(t0);
        phase
    }

    /// Tells the workers to close their connections; returns how many connections the
    /// server closed while they were held.
    pub async fn close(mut self) -> u64 {
        let nw = self.workers.len();
        self.tell(b"close\n").await;
        let mut dropped = 0u64;
        let mut closed = 0;
        let close_deadline = Instant::now() + Duration::from_secs(30);
        while closed < nw && Instant::now() < close_deadline {
            match tokio::time::timeout(Duration::from_secs(1), self.rx.recv()).await {
                Ok(Some((_, Event::Closed(d)))) => {
                    dropped += d;
                    closed += 1;
                }
                Ok(Some((i, Event::Eof))) if !self.eof[i] => {
                    self.eof[i] = true;
                }
                Ok(None) => break,
                _ => {}
            }
            if self.eof.iter().all(|e| *e) {
                break;
            }
        }
        for mut w in self.workers {
            drop(w.stdin);
            if tokio::time::timeout(Duration::from_secs(5), w.child.wait())
                .await
                .is_err()
            {
                let _ = w.child.kill().await;
            }
        }
        dropped
    }
}

pub async fn run(c: &Common, o: &IdleOpts) -> Report {
    let mut report = Report::new("idle", &c.label, c.url_strings());
    let plan = plan(o.conns, c.urls.len(), o.per_worker);
    report
        .param("conns", o.conns)
        .param("replicas", c.urls.len())
        .param("workers", plan.len())
        .param("server_pids", o.server_pids.clone())
        .param("hold_s", o.hold.as_secs_f64())
        .param("jwt", c.jwt_secret.is_some());

    let mut pool = match Pool::spawn(c, &plan, None) {
        Ok(pool) => pool,
        Err(e) => {
            report.error(e);
            return report;
        }
    };
    let bound = c.connect_timeout * (o.conns.div_ceil(c.concurrency.max(1)) as u32 + 2);

    // Every worker started: measure the baseline, then start them together.
    if let Err(e) = pool.ready(Duration::from_secs(30)).await {
        report.error(e);
        return report;
    }
    let rss_before = total_rss(&o.server_pids);
    let connected = pool.connect(bound).await;
    for e in connected.errors {
        report.error(e);
    }
    let (ok, failed) = (connected.ok, connected.failed);
    let connect_time = connected.elapsed;
    progress::note(
        c.progress,
        &format!("idle: {ok} connections up ({failed} failed) in {connect_time:.2?}"),
    );

    tokio::time::sleep(o.settle).await;
    let rss_after = total_rss(&o.server_pids);
    tokio::time::sleep(o.hold).await;
    let dropped = pool.close().await;

    report
        .metric("connections_ok", ok as f64)
        .metric("connect_failures", failed as f64)
        .metric("dropped_during_hold", dropped as f64)
        .metric("connect_s", round3(connect_time.as_secs_f64()))
        .metric("accepts_per_s", per_sec(ok, connect_time));
    match (rss_before, rss_after) {
        (Some(b), Some(a)) => {
            let mb = |v: u64| round3(v as f64 / (1024.0 * 1024.0));
            report
                .metric("server_rss_before_mb", mb(b))
                .metric("server_rss_after_mb", mb(a));
            if ok > 0 {
                report.metric(
                    "rss_per_conn_bytes",
                    (a.saturating_sub(b) as f64 / ok as f64).round(),
                );
            }
        }
        _ if o.server_pids.is_empty() => {}
        _ => report.error(format!("could not read VmRSS of {:?}", o.server_pids)),
    }
    report
}

/// How long one subscription may wait for its reply in a worker: a mass join queues
/// behind every earlier one (presence is written by one task per replica).
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(120);
/// Least time between two progress lines of a worker.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// Options of one worker (the `idle-worker` subcommand).
#[derive(Debug, Clone)]
pub struct WorkerOpts {
    pub target: Target,
    pub conns: usize,
    pub index_base: usize,
    /// Subscribe every connection to this channel when told `sub`.
    pub channel: Option<String>,
}

/// Counters of one phase inside a worker; `changed` is signalled on every change.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: AtomicU64,
    first_err: std::sync::Mutex<String>,
    changed: Notify,
}

impl Tally {
    fn succeeded(&self) {
        self.ok.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_one();
    }

    fn fail(&self, e: String) {
        if let Ok(mut f) = self.first_err.lock()
            && f.is_empty()
        {
            *f = e;
        }
        self.failed.fetch_add(1, Ordering::Relaxed);
        self.changed.notify_one();
    }

    fn counts(&self) -> (u64, u64) {
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }

    fn error(&self) -> String {
        self.first_err
            .lock()
            .map(|s| s.replace('\n', " "))
            .unwrap_or_default()
    }

    /// Writes `<progress> a b` lines (at most every [`PROGRESS_EVERY`]) until `total`
    /// attempts finished or `deadline`, then `<done> a b <first error>`.
    async fn report(
        &self,
        out: &mut tokio::io::Stdout,
        progress: &str,
        done: &str,
        total: u64,
        deadline: Instant,
    ) -> std::io::Result<()> {
        self.wait(out, progress, total, deadline).await?;
        let (a, b) = self.counts();
        out.write_all(format!("{done} {a} {b} {}\n", self.error()).as_bytes())
            .await?;
        out.flush().await
    }

    /// Writes `<progress> a b` lines (at most every [`PROGRESS_EVERY`]) until `total`
    /// attempts finished or `deadline`.
    async fn wait(
        &self,
        out: &mut tokio::io::Stdout,
        progress: &str,
        total: u64,
        deadline: Instant,
    ) -> std::io::Result<()> {
        let mut last_line = Instant::now();
        loop {
            let (a, b) = self.counts();
            if a + b >= total || Instant::now() >= deadline {
                return Ok(());
            }
            if last_line.elapsed() >= PROGRESS_EVERY {
                out.write_all(format!("{progress} {a} {b}\n").as_bytes())
                    .await?;
                out.flush().await?;
                last_line = Instant::now();
            }
            // Woken by every finished attempt; the timeout only paces progress lines.
            let _ = tokio::time::timeout(PROGRESS_EVERY, self.changed.notified()).await;
        }
    }
}

/// Subscribes `ws` to `channel`; the reply's time in microseconds.
pub async fn subscribe(ws: &mut conn::Ws, channel: &str) -> Result<u32, String> {
    let t0 = Instant::now();
    let req = format!(
        r#"{{"jsonrpc":"2.0","id":1,"method":"subscribe","params":{{"channel":{}}}}}"#,
        serde_json::Value::from(channel)
    );
    conn::send_text(ws, req).await.map_err(|e| e.to_string())?;
    let wait = async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => match conn::classify(t.as_str()) {
                    conn::Incoming::Response {
                        id: Some(1),
                        error: false,
                    } => return Ok(()),
                    conn::Incoming::Response {
                        id: Some(1),
                        error: true,
                    } => {
                        return Err(format!(
                            "subscribe refused: {}",
                            conn::truncate(t.as_str(), 200)
                        ));
                    }
                    _ => {}
                },
                Some(Ok(Message::Close(f))) => return Err(format!("closed: {f:?}")),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.to_string()),
                None => return Err("connection ended".into()),
            }
        }
    };
    tokio::time::timeout(SUBSCRIBE_TIMEOUT, wait)
        .await
        .map_err(|_| format!("no subscribe reply within {SUBSCRIBE_TIMEOUT:?}"))??;
    Ok(u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX))
}

/// Worker side: open `conns` connections when told `go`, report, subscribe them when
/// told `sub` (with a channel), hold them until told `close` (or stdin closes, or
/// `max_life` passes).
pub async fn worker(c: &Common, o: &WorkerOpts, max_life: Duration) -> std::io::Result<()> {
    let mut out = tokio::io::stdout();
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    // Tokens are minted before the timed part: the accept rate is the server's.
    let targets: Vec<Target> = (0..o.conns)
        .map(|i| c.target_for(&o.target, o.index_base + i))
        .collect();
    out.write_all(b"ready\n").await?;
    out.flush().await?;
    let started = Instant::now();
    let deadline = started + max_life;
    match tokio::time::timeout(max_life, stdin.next_line()).await {
        Ok(Ok(Some(l))) if l.trim() == "go" => {}
        _ => return Ok(()),
    }
    let connects = Arc::new(Tally::default());
    let subs = Arc::new(Tally::default());
    let latencies = Arc::new(std::sync::Mutex::new(Vec::<u32>::new()));
    let dropped = Arc::new(AtomicU64::new(0));
    let sem = Arc::new(Semaphore::new(c.concurrency.max(1)));
    let (stop_tx, stop_rx) = watch::channel(false);
    let (sub_tx, sub_rx) = watch::channel(false);
    let mut tasks = Vec::with_capacity(o.conns);
    for (i, target) in targets.into_iter().enumerate() {
        let src = target.source_for(o.index_base + i);
        let (connects, subs, latencies, dropped, sem) = (
            connects.clone(),
            subs.clone(),
            latencies.clone(),
            dropped.clone(),
            sem.clone(),
        );
        let mut stop = stop_rx.clone();
        let mut sub = sub_rx.clone();
        let channel = o.channel.clone();
        let (hello, timeout) = (c.hello, c.connect_timeout);
        tasks.push(tokio::spawn(async move {
            let res = {
                let _permit = sem.acquire().await;
                conn::connect(&target, src, hello, timeout).await
            };
            let mut ws = match res {
                Ok((ws, _)) => {
                    connects.succeeded();
                    ws
                }
                Err(e) => {
                    connects.fail(format!("{e} (source {src:?})"));
                    return;
                }
            };
            let mut lost = false;
            if let Some(channel) = channel {
                // Wait for `sub`, reading meanwhile so pings are answered.
                let told = loop {
                    if *sub.borrow_and_update() {
                        break true;
                    }
                    tokio::select! {
                        _ = stop.changed() => break false,
                        changed = sub.changed() => if changed.is_err() { break false },
                        m = ws.next() => match m {
                            Some(Ok(_)) => {}
                            _ => {
                                lost = true;
                                break false;
                            }
                        }
                    }
                };
                if told {
                    match subscribe(&mut ws, &channel).await {
                        Ok(us) => {
                            if let Ok(mut l) = latencies.lock() {
                                l.push(us);
                            }
                            subs.succeeded();
                        }
                        Err(e) => subs.fail(e),
                    }
                }
            }
            // Hold: keep reading so pings are answered; stop when told.
            while !lost {
                tokio::select! {
                    _ = stop.changed() => break,
                    m = ws.next() => match m {
                        Some(Ok(_)) => {}
                        _ => lost = true,
                    }
                }
            }
            if lost && !*stop.borrow() {
                dropped.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    connects
        .report(&mut out, "p", "done", o.conns as u64, deadline)
        .await?;
    // Commands until `close`, EOF, or the life bound.
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(remaining, stdin.next_line()).await {
            Ok(Ok(Some(l))) if l.trim() == "sub" && o.channel.is_some() => {
                let _ = sub_tx.send(true);
                let connected = connects.counts().0;
                subs.wait(&mut out, "s", connected, deadline).await?;
                let values = latencies.lock().map(|l| l.clone()).unwrap_or_default();
                let mut line = String::with_capacity(values.len() * 7 + 8);
                line.push_str("lat");
                for v in values {
                    line.push(' ');
                    line.push_str(&v.to_string());
                }
                line.push('\n');
                out.write_all(line.as_bytes()).await?;
                let (a, b) = subs.counts();
                out.write_all(format!("subdone {a} {b} {}\n", subs.error()).as_bytes())
                    .await?;
                out.flush().await?;
            }
            Ok(Ok(Some(l))) if l.trim() != "close" => {}
            _ => break,
        }
    }
    let held_dropped = dropped.load(Ordering::Relaxed);
    let _ = stop_tx.send(true);
    for t in tasks {
        let _ = t.await;
    }
    out.write_all(format!("closed {held_dropped}\n").as_bytes())
        .await?;
    out.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmrss_parsing() {
        let s = "Name:\tchorus\nVmPeak:\t  2000 kB\nVmRSS:\t   12345 kB\nThreads: 3\n";
        assert_eq!(parse_vmrss(s), Some(12345 * 1024));
        assert_eq!(parse_vmrss("Name: x\n"), None);
        // our own process always has one
        assert!(rss_bytes(std::process::id()).unwrap_or(0) > 0);
    }

    #[test]
    fn plans_workers() {
        assert_eq!(
            plan(19_000, 1, 10_000),
            vec![(0, 9_500, 0), (0, 9_500, 9_500)]
        );
        assert_eq!(plan(5, 2, 10_000), vec![(0, 3, 0), (1, 2, 3)]);
        let p = plan(57_000, 3, 10_000);
        assert_eq!(p.len(), 6);
        assert_eq!(p.iter().map(|x| x.1).sum::<usize>(), 57_000);
        assert_eq!(p.last().map(|x| x.2), Some(57_000 - 9_500));
        assert!(plan(0, 1, 10).is_empty());
    }

    #[test]
    fn worker_events() {
        assert!(matches!(parse_event("ready"), Some(Event::Ready)));
        assert!(matches!(parse_event("p 3 1"), Some(Event::Progress(3, 1))));
        match parse_event("done 5 2 tcp: refused (x)") {
            Some(Event::Done(5, 2, e)) => assert_eq!(e, "tcp: refused (x)"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_event("done 5 0"),
            Some(Event::Done(5, 0, _))
        ));
        assert!(matches!(parse_event("closed 0"), Some(Event::Closed(0))));
        assert!(parse_event("garbage").is_none());
    }
}
