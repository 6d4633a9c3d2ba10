//! `fanout` and `cluster`: subscribers on one channel (spread over one or more
//! replica URLs), one publisher on the first URL publishing at a fixed rate.
//! Each publication carries a sequence number and a send timestamp, so the
//! subscribers measure end-to-end latency, losses and duplicates.
//!
//! Before the measured run the publisher sends warm-up publications until
//! every subscriber has seen one (or the warm-up bound passes), so that the
//! backbone subscriptions of every replica are in place when timing starts.

use crate::conn::{self, Incoming, Ws};
use crate::progress::{self, Progress};
use crate::report::Report;
use crate::stats::{Latency, SeqTracker, now_us, per_sec};
use crate::{Common, pad};
use futures_util::stream::SplitStream;
use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, watch};
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Clone)]
pub struct FanoutOpts {
    /// Subscribers per URL (same length as `Common::urls`).
    pub subs_per_url: Vec<usize>,
    /// Measured publications.
    pub messages: u64,
    /// Publications per second (0 = as fast as the publisher can send).
    pub rate: f64,
    /// Padding bytes in each publication's data.
    pub payload: usize,
    pub channel: String,
    /// Upper bound on the warm-up phase.
    pub warmup: Duration,
    /// After the last publication, stop waiting once no delivery arrived for this long.
    pub drain: Duration,
}

impl FanoutOpts {
    /// By default a burst: 1 000 messages flat out, more than any queue bound holds
    /// unless the server keeps up, so a server that drops readers shows it.
    pub fn new(subs_per_url: Vec<usize>) -> Self {
        Self {
            subs_per_url,
            messages: 1000,
            rate: 0.0,
            payload: 64,
            channel: "bench:fanout".into(),
            warmup: Duration::from_secs(15),
            drain: Duration::from_secs(3),
        }
    }
}

#[derive(Default)]
struct Shared {
    subscribed: AtomicU64,
    failed: AtomicU64,
    warmed: AtomicU64,
    delivered: Arc<AtomicU64>,
}

#[derive(Debug, Default)]
struct SubResult {
    url_idx: usize,
    subscribed: bool,
    lat_us: Vec<u32>,
    tracker: SeqTracker,
    last_rx: Option<Instant>,
    closed_early: bool,
    error: Option<String>,
}

pub async fn run(scenario: &str, c: &Common, o: &FanoutOpts) -> Report {
    let mut report = Report::new(scenario, &c.label, c.url_strings());
    let total_subs: usize = o.subs_per_url.iter().sum();
    report
        .param("subscribers", total_subs)
        .param("replicas", c.urls.len())
        .param("messages", o.messages)
        .param("rate_per_s", o.rate)
        .param("payload_bytes", o.payload)
        .param("channel", o.channel.clone());

    let shared = Arc::new(Shared::default());
    let sem = Arc::new(Semaphore::new(c.concurrency.max(1)));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::with_capacity(total_subs);
    let mut global = 0usize;
    for (url_idx, &n) in o.subs_per_url.iter().enumerate() {
        for _ in 0..n {
            let target = c.urls[url_idx].clone();
            let src = target.source_for(global);
            global += 1;
            let (c2, o2, shared, sem, stop) = (
                c.clone(),
                o.clone(),
                shared.clone(),
                sem.clone(),
                stop_rx.clone(),
            );
            tasks.push(tokio::spawn(async move {
                subscriber(url_idx, target, src, &c2, &o2, &shared, &sem, stop).await
            }));
        }
    }
    let counter = Arc::new(AtomicU64::new(0));
    let bar = Progress::start(
        c.progress,
        "subscribe",
        total_subs as u64,
        counter.clone(),
        None,
    );
    let waves = total_subs.div_ceil(c.concurrency.max(1)) as u32 + 1;
    let deadline = Instant::now() + c.connect_timeout * waves;
    loop {
        let done =
            shared.subscribed.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed);
        counter.store(done, Ordering::Relaxed);
        if done >= total_subs as u64 || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bar.finish().await;
    let subscribed = shared.subscribed.load(Ordering::Relaxed);
    progress::note(
        c.progress,
        &format!(
            "{scenario}: {subscribed}/{total_subs} subscribed, {} failed",
            shared.failed.load(Ordering::Relaxed)
        ),
    );

    let mut publish_errors = 0u64;
    let mut publish_start = Instant::now();
    let mut published = 0u64;
    let mut warm_missing = subscribed;
    match conn::connect(&c.urls[0], None, c.hello, c.connect_timeout).await {
        Err(e) => report.error(format!("publisher connect {}: {e}", c.urls[0])),
        Ok((ws, _)) => {
            let (mut sink, stream) = ws.split();
            let acks = Arc::new(AtomicU64::new(0));
            let errs = Arc::new(AtomicU64::new(0));
            let reader = tokio::spawn(read_acks(
                stream,
                acks.clone(),
                errs.clone(),
                stop_rx.clone(),
            ));
            let pad = pad(o.payload);
            let mut id = 1_000_000u64;
            let mut publish = |seq: u64, warm: bool| {
                id += 1;
                let data = conn::bench_data_json(seq, now_us(), warm, &pad);
                Message::text(format!(
                    r#"{{"jsonrpc":"2.0","id":{id},"method":"publish","params":{{"channel":"{}","data":{data}}}}}"#,
                    o.channel
                ))
            };
            // Warm-up: until every subscriber saw a publication, bounded in time.
            let warm_deadline = Instant::now() + o.warmup;
            let mut warm_seq = 0;
            let mut send_failed = None;
            while subscribed > 0
                && shared.warmed.load(Ordering::Relaxed) < subscribed
                && Instant::now() < warm_deadline
            {
                if let Err(e) = sink.send(publish(warm_seq, true)).await {
                    send_failed = Some(format!("publish: {e}"));
                    break;
                }
                warm_seq += 1;
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            // Let the last warm-ups arrive before timing starts.
            tokio::time::sleep(Duration::from_millis(100)).await;
            warm_missing = subscribed.saturating_sub(shared.warmed.load(Ordering::Relaxed));
            if warm_missing > 0 {
                report.error(format!(
                    "{warm_missing} subscribers saw no warm-up publication within {:?}",
                    o.warmup
                ));
            }
            let bar = Progress::start(
                c.progress,
                scenario,
                subscribed * o.messages,
                shared.delivered.clone(),
                None,
            );
            // Measured publications at the fixed rate.
            publish_start = Instant::now();
            if send_failed.is_none() {
                while published < o.messages {
                    let due = if o.rate > 0.0 {
                        let e = publish_start.elapsed().as_secs_f64();
                        ((e * o.rate) as u64 + 1).min(o.messages)
                    } else {
                        (published + 64).min(o.messages)
                    };
                    while published < due {
                        if let Err(e) = sink.feed(publish(published, false)).await {
                            send_failed = Some(format!("publish: {e}"));
                            break;
                        }
                        published += 1;
                    }
                    if send_failed.is_some() {
                        break;
                    }
                    if let Err(e) = sink.flush().await {
                        send_failed = Some(format!("publish flush: {e}"));
                        break;
                    }
                    if o.rate > 0.0 {
                        if published < o.messages {
                            let next_at =
                                publish_start + Duration::from_secs_f64(published as f64 / o.rate);
                            tokio::time::sleep_until(next_at.into()).await;
                        }
                    } else {
                        tokio::task::yield_now().await;
                    }
                }
            }
            if let Some(e) = send_failed {
                report.error(e);
            }
            // Drain: until everything arrived or nothing arrived for `drain`.
            let expected = subscribed * published;
            let mut last_count = shared.delivered.load(Ordering::Relaxed);
            let mut last_change = Instant::now();
            let hard_deadline = Instant::now() + o.drain * 20;
            while shared.delivered.load(Ordering::Relaxed) < expected
                && Instant::now() < hard_deadline
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let now = shared.delivered.load(Ordering::Relaxed);
                if now != last_count {
                    last_count = now;
                    last_change = Instant::now();
                } else if last_change.elapsed() > o.drain {
                    break;
                }
            }
            bar.finish().await;
            let _ = stop_tx.send(true);
            let _ = sink.close().await;
            let _ = reader.await;
            publish_errors = errs.load(Ordering::Relaxed);
            let unacked = (published + warm_seq)
                .saturating_sub(acks.load(Ordering::Relaxed) + publish_errors);
            report.metric("publish_unacked", unacked as f64);
        }
    }
    let _ = stop_tx.send(true);

    // Gather.
    let mut all = Latency::new();
    let mut local = Latency::new();
    let mut remote = Latency::new();
    let (mut lost, mut dup, mut closed_early, mut delivered) = (0u64, 0u64, 0u64, 0u64);
    let mut last_rx = publish_start;
    for t in tasks {
        let r = match t.await {
            Ok(r) => r,
            Err(e) => {
                report.error(format!("task: {e}"));
                continue;
            }
        };
        if let Some(e) = r.error {
            report.error(e);
        }
        if !r.subscribed {
            continue;
        }
        let h = if r.url_idx == 0 {
            &mut local
        } else {
            &mut remote
        };
        for &us in &r.lat_us {
            h.record_us(u64::from(us));
        }
        lost += r.tracker.lost();
        dup += r.tracker.duplicated();
        delivered += r.tracker.unique();
        closed_early += u64::from(r.closed_early);
        if let Some(t) = r.last_rx {
            last_rx = last_rx.max(t);
        }
    }
    all.merge(&local);
    all.merge(&remote);
    let window = last_rx.saturating_duration_since(publish_start);
    report
        .metric("subscribers", subscribed as f64)
        .metric(
            "connect_failures",
            shared.failed.load(Ordering::Relaxed) as f64,
        )
        .metric("published", published as f64)
        .metric("publish_errors", publish_errors as f64)
        .metric("delivered", delivered as f64)
        .metric("lost", lost as f64)
        .metric("duplicated", dup as f64)
        .metric("subscribers_dropped", closed_early as f64)
        .metric("warm_missing", warm_missing as f64)
        .metric("elapsed_s", window.as_secs_f64())
        .metric("deliveries_per_s", per_sec(delivered, window))
        .latency("all", "", all.summary());
    if c.urls.len() > 1 {
        report.latency("local", "local_", local.summary());
        report.latency("remote", "remote_", remote.summary());
    }
    report
}

async fn read_acks(
    mut stream: SplitStream<Ws>,
    acks: Arc<AtomicU64>,
    errs: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            m = stream.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    if let Incoming::Response { error, .. } = conn::classify(t.as_str()) {
                        if error {
                            errs.fetch_add(1, Ordering::Relaxed);
                        } else {
                            acks.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Some(Ok(_)) => {}
                _ => break,
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn subscriber(
    url_idx: usize,
    target: conn::Target,
    src: Option<std::net::SocketAddr>,
    c: &Common,
    o: &FanoutOpts,
    shared: &Shared,
    sem: &Semaphore,
    mut stop: watch::Receiver<bool>,
) -> SubResult {
    let mut r = SubResult {
        url_idx,
        ..Default::default()
    };
    let setup = async {
        let _permit = sem.acquire().await;
        let (mut ws, _) = conn::connect(&target, src, c.hello, c.connect_timeout)
            .await
            .map_err(|e| e.to_string())?;
        let req = format!(
            r#"{{"jsonrpc":"2.0","id":1,"method":"subscribe","params":{{"channel":"{}"}}}}"#,
            o.channel
        );
        conn::send_text(&mut ws, req)
            .await
            .map_err(|e| e.to_string())?;
        let wait = async {
            loop {
                match ws.next().await {
                    Some(Ok(Message::Text(t))) => match conn::classify(t.as_str()) {
                        Incoming::Response {
                            id: Some(1),
                            error: false,
                        } => return Ok(()),
                        Incoming::Response {
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
        tokio::time::timeout(c.connect_timeout, wait)
            .await
            .map_err(|_| "subscribe timed out".to_string())??;
        Ok::<Ws, String>(ws)
    };
    let mut ws = match setup.await {
        Ok(ws) => ws,
        Err(e) => {
            shared.failed.fetch_add(1, Ordering::Relaxed);
            r.error = Some(format!("subscriber on {target}: {e}"));
            return r;
        }
    };
    r.subscribed = true;
    r.tracker = SeqTracker::new(usize::try_from(o.messages).unwrap_or(usize::MAX));
    shared.subscribed.fetch_add(1, Ordering::Relaxed);
    let mut warmed = false;
    loop {
        tokio::select! {
            biased;
            _ = stop.changed() => break,
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    if let Incoming::Data(d) = conn::classify(t.as_str()) {
                        if d.w != 0 {
                            if !warmed {
                                warmed = true;
                                shared.warmed.fetch_add(1, Ordering::Relaxed);
                            }
                            continue;
                        }
                        let now = now_us();
                        r.lat_us.push(u32::try_from(now.saturating_sub(d.ts)).unwrap_or(u32::MAX));
                        r.last_rx = Some(Instant::now());
                        if r.tracker.record(d.seq) {
                            shared.delivered.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
                    r.closed_early = true;
                    break;
                }
                Some(Ok(_)) => {}
            }
        }
    }
    drop(ws);
    r
}
