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
//! -> `close` (or stdin EOF) -> `closed <dropped during hold>`.

use crate::Common;
use crate::conn::{self, Target};
use crate::progress::{self, Progress};
use crate::report::Report;
use crate::stats::{per_sec, round3};
use futures_util::StreamExt;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{Semaphore, mpsc, watch};

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
    Closed(u64),
    Eof,
}

fn parse_event(line: &str) -> Option<Event> {
    let mut it = line.splitn(4, ' ');
    let kind = it.next()?;
    let mut num = || it.next().and_then(|s| s.trim().parse::<u64>().ok());
    Some(match kind {
        "ready" => Event::Ready,
        "p" => Event::Progress(num()?, num()?),
        "done" => {
            let (a, b) = (num()?, num()?);
            Event::Done(a, b, it.next().unwrap_or("").trim().to_string())
        }
        "closed" => Event::Closed(num()?),
        _ => return None,
    })
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
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

    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            report.error(format!("current_exe: {e}"));
            return report;
        }
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Event)>();
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
            .arg((c.concurrency / plan.len()).max(1).to_string())
            .arg("--connect-timeout")
            .arg(c.connect_timeout.as_secs_f64().to_string());
        if !c.hello {
            cmd.arg("--no-hello");
        }
        if let Some(secret) = &c.jwt_secret {
            // Through the environment, not the command line other users can read.
            cmd.env("CHORUS_BENCH_JWT_SECRET", secret);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut child = match cmd.spawn() {
            Ok(ch) => ch,
            Err(e) => {
                report.error(format!("spawn worker: {e}"));
                return report;
            }
        };
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            report.error("worker pipes missing".into());
            return report;
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
    drop(tx);
    let nw = workers.len();
    let bound = c.connect_timeout * (o.conns.div_ceil(c.concurrency.max(1)) as u32 + 2);

    // Every worker started: measure the baseline, then start them together.
    let mut ready = 0;
    let mut eof = vec![false; nw];
    let t_ready = Instant::now();
    while ready < nw && t_ready.elapsed() < Duration::from_secs(30) {
        match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
            Ok(Some((_, Event::Ready))) => ready += 1,
            Ok(Some((i, Event::Eof))) => {
                eof[i] = true;
                report.error(format!("worker {i} exited before it was ready"));
                break;
            }
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    if ready < nw {
        report.error(format!("only {ready}/{nw} workers became ready"));
        return report;
    }
    let rss_before = total_rss(&o.server_pids);
    for w in &mut workers {
        let _ = w.stdin.write_all(b"go\n").await;
        let _ = w.stdin.flush().await;
    }
    let t0 = Instant::now();

    let ok_ctr = Arc::new(AtomicU64::new(0));
    let fail_ctr = Arc::new(AtomicU64::new(0));
    let bar = Progress::start(
        c.progress,
        "idle connect",
        o.conns as u64,
        ok_ctr.clone(),
        Some(("failed", fail_ctr.clone())),
    );
    let mut prog = vec![(0u64, 0u64); nw];
    let mut done = vec![false; nw];
    let mut t_last_done = t0;
    while done.iter().zip(&eof).any(|(d, e)| !d && !e) && t0.elapsed() < bound {
        match tokio::time::timeout(Duration::from_millis(500), rx.recv()).await {
            Ok(Some((i, Event::Progress(a, b)))) => prog[i] = (a, b),
            Ok(Some((i, Event::Done(a, b, err)))) => {
                prog[i] = (a, b);
                done[i] = true;
                t_last_done = Instant::now();
                if !err.is_empty() {
                    report.error(format!("worker {i}: {err}"));
                }
            }
            Ok(Some((i, Event::Eof))) => {
                eof[i] = true;
                report.error(format!("worker {i} exited early"));
            }
            Ok(Some(_)) | Err(_) => {}
            Ok(None) => break,
        }
        ok_ctr.store(prog.iter().map(|p| p.0).sum(), Ordering::Relaxed);
        fail_ctr.store(prog.iter().map(|p| p.1).sum(), Ordering::Relaxed);
    }
    bar.finish().await;
    let ok: u64 = prog.iter().map(|p| p.0).sum();
    let failed: u64 = prog.iter().map(|p| p.1).sum();
    let connect_time = t_last_done.saturating_duration_since(t0);
    progress::note(
        c.progress,
        &format!("idle: {ok} connections up ({failed} failed) in {connect_time:.2?}"),
    );

    tokio::time::sleep(o.settle).await;
    let rss_after = total_rss(&o.server_pids);
    tokio::time::sleep(o.hold).await;
    for w in &mut workers {
        let _ = w.stdin.write_all(b"close\n").await;
        let _ = w.stdin.flush().await;
    }
    let mut dropped = 0u64;
    let mut closed = 0;
    let close_deadline = Instant::now() + Duration::from_secs(30);
    while closed < nw && Instant::now() < close_deadline {
        match tokio::time::timeout(Duration::from_secs(1), rx.recv()).await {
            Ok(Some((_, Event::Closed(d)))) => {
                dropped += d;
                closed += 1;
            }
            Ok(Some((i, Event::Eof))) if !eof[i] => {
                eof[i] = true;
            }
            Ok(None) => break,
            _ => {}
        }
        if eof.iter().all(|e| *e) {
            break;
        }
    }
    for mut w in workers {
        drop(w.stdin);
        if tokio::time::timeout(Duration::from_secs(5), w.child.wait())
            .await
            .is_err()
        {
            let _ = w.child.kill().await;
        }
    }

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

/// Options of one worker (the `idle-worker` subcommand).
#[derive(Debug, Clone)]
pub struct WorkerOpts {
    pub target: Target,
    pub conns: usize,
    pub index_base: usize,
}

/// Worker side: open `conns` connections when told `go`, report, hold them
/// until told `close` (or stdin closes, or `max_life` passes).
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
    match tokio::time::timeout(max_life, stdin.next_line()).await {
        Ok(Ok(Some(l))) if l.trim() == "go" => {}
        _ => return Ok(()),
    }
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let dropped = Arc::new(AtomicU64::new(0));
    let first_err = Arc::new(std::sync::Mutex::new(String::new()));
    let sem = Arc::new(Semaphore::new(c.concurrency.max(1)));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::with_capacity(o.conns);
    for (i, target) in targets.into_iter().enumerate() {
        let src = target.source_for(o.index_base + i);
        let (ok, failed, dropped, first_err, sem) = (
            ok.clone(),
            failed.clone(),
            dropped.clone(),
            first_err.clone(),
            sem.clone(),
        );
        let mut stop = stop_rx.clone();
        let (hello, timeout) = (c.hello, c.connect_timeout);
        tasks.push(tokio::spawn(async move {
            let res = {
                let _permit = sem.acquire().await;
                conn::connect(&target, src, hello, timeout).await
            };
            let mut ws = match res {
                Ok((ws, _)) => {
                    ok.fetch_add(1, Ordering::Relaxed);
                    ws
                }
                Err(e) => {
                    failed.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut f) = first_err.lock()
                        && f.is_empty()
                    {
                        *f = format!("{e} (source {src:?})");
                    }
                    return;
                }
            };
            // Hold: keep reading so pings are answered; stop when told.
            loop {
                tokio::select! {
                    _ = stop.changed() => break,
                    m = ws.next() => match m {
                        Some(Ok(_)) => {}
                        _ => {
                            if !*stop.borrow() {
                                dropped.fetch_add(1, Ordering::Relaxed);
                            }
                            break;
                        }
                    }
                }
            }
        }));
    }
    // Report progress until all attempts finished.
    let total = o.conns as u64;
    loop {
        let (a, b) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
        if a + b >= total || started.elapsed() > max_life {
            let e = first_err
                .lock()
                .map(|s| s.replace('\n', " "))
                .unwrap_or_default();
            out.write_all(format!("done {a} {b} {e}\n").as_bytes())
                .await?;
            out.flush().await?;
            break;
        }
        out.write_all(format!("p {a} {b}\n").as_bytes()).await?;
        out.flush().await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Hold until `close`, EOF, or the life bound.
    let remaining = max_life.saturating_sub(started.elapsed());
    let _ = tokio::time::timeout(remaining, stdin.next_line()).await;
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
