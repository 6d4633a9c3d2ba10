//! `sse`: Server-Sent Events against WebSocket, in the same run. Each round starts a
//! fresh `chorus` for each transport, opens `--subs` subscribers of one channel
//! (WebSocket: upgrade, hello, `subscribe`; SSE: `GET /events?channel=`), measures the
//! server's RSS growth per subscribed idle connection, then publishes `--messages`
//! from one WebSocket publisher and measures the fan-out (deliveries per second,
//! end-to-end latency, losses). Medians over `--rounds`, and SSE / WebSocket ratios.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, watch};
use tokio_tungstenite::tungstenite::Message;

use crate::conn::{self, Frame, Target};
use crate::idle::rss_bytes;
use crate::replicas::{self, ReplicaOpts};
use crate::report::Report;
use crate::stats::{Latency, median, now_us, round3};
use crate::{Common, pad};

#[derive(Debug, Clone)]
pub struct SseOpts {
    pub subs: usize,
    pub messages: u64,
    /// Publications per second (0 = flat out).
    pub rate: f64,
    pub payload: usize,
    pub rounds: usize,
    /// How long the idle subscribers are held before the RSS is read.
    pub hold: Duration,
    /// Stop waiting for deliveries once none arrived for this long.
    pub drain: Duration,
    pub server_bin: Option<PathBuf>,
}

impl Default for SseOpts {
    fn default() -> Self {
        Self {
            subs: 10_000,
            messages: 100,
            rate: 0.0,
            payload: 64,
            rounds: 3,
            hold: Duration::from_secs(2),
            drain: Duration::from_secs(3),
            server_bin: None,
        }
    }
}

const CHANNEL: &str = "bench:sse";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    Ws,
    Sse,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Self::Ws => "ws",
            Self::Sse => "sse",
        }
    }
}

/// What one transport did in one round.
struct RoundResult {
    bytes_per_conn: f64,
    deliveries_per_s: f64,
    latency: Latency,
    lost: u64,
    subscribed: u64,
}

#[derive(Default)]
struct Shared {
    subscribed: AtomicU64,
    failed: AtomicU64,
    warmed: AtomicU64,
    received: AtomicU64,
    last_receipt_us: AtomicU64,
}

pub async fn run(c: &Common, o: &SseOpts) -> Report {
    let mut report = Report::new("sse", &c.label, Vec::new());
    report
        .param("subs", o.subs as u64)
        .param("messages", o.messages)
        .param("rate", o.rate)
        .param("payload", o.payload as u64)
        .param("rounds", o.rounds as u64);
    let Some(bin) = o.server_bin.clone().or_else(replicas::default_server_bin) else {
        report.error("cannot locate chorus; pass --server-bin".into());
        return report;
    };
    let mut results: Vec<(Transport, RoundResult)> = Vec::new();
    for round in 0..o.rounds {
        // Alternate which goes first, so neither always runs on a warmer machine.
        let order = if round % 2 == 0 {
            [Transport::Ws, Transport::Sse]
        } else {
            [Transport::Sse, Transport::Ws]
        };
        for transport in order {
            if c.progress {
                eprintln!("round {}: {}", round + 1, transport.name());
            }
            match run_round(c, o, &bin, transport).await {
                Ok(result) => results.push((transport, result)),
                Err(e) => report.error(format!("round {} {}: {e}", round + 1, transport.name())),
            }
        }
    }
    let mut medians = [[0.0; 4]; 2];
    for (index, transport) in [Transport::Ws, Transport::Sse].into_iter().enumerate() {
        let mine: Vec<&RoundResult> = results
            .iter()
            .filter(|(t, _)| *t == transport)
            .map(|(_, r)| r)
            .collect();
        let take = |f: &dyn Fn(&RoundResult) -> f64| {
            median(&mine.iter().map(|r| f(r)).collect::<Vec<_>>()).unwrap_or(0.0)
        };
        let name = transport.name();
        let bytes = take(&|r| r.bytes_per_conn);
        let rate = take(&|r| r.deliveries_per_s);
        let p50 = take(&|r| r.latency.quantile_us(0.5) as f64 / 1000.0);
        let p99 = take(&|r| r.latency.quantile_us(0.99) as f64 / 1000.0);
        medians[index] = [bytes, rate, p50, p99];
        report
            .metric(&format!("{name}_bytes_per_conn"), round3(bytes))
            .metric(&format!("{name}_deliveries_per_s"), round3(rate))
            .metric(&format!("{name}_latency_p50_ms"), round3(p50))
            .metric(&format!("{name}_latency_p99_ms"), round3(p99))
            .metric(
                &format!("{name}_lost"),
                mine.iter().map(|r| r.lost).sum::<u64>() as f64,
            );
        if transport == Transport::Sse {
            report.metric(
                "subscribers",
                mine.iter().map(|r| r.subscribed).min().unwrap_or(0) as f64,
            );
        }
    }
    let ratio = |sse: f64, ws: f64| if ws > 0.0 { round3(sse / ws) } else { 0.0 };
    report
        .metric("sse_ws_memory_ratio", ratio(medians[1][0], medians[0][0]))
        .metric(
            "sse_ws_throughput_ratio",
            ratio(medians[1][1], medians[0][1]),
        )
        .metric("sse_ws_p50_ratio", ratio(medians[1][2], medians[0][2]))
        .metric("sse_ws_p99_ratio", ratio(medians[1][3], medians[0][3]));
    report
}

async fn run_round(
    c: &Common,
    o: &SseOpts,
    bin: &std::path::Path,
    transport: Transport,
) -> Result<RoundResult, String> {
    let env = [
        "WS_PUBLISH_RATE",
        "WS_PUBLISH_BYTES_RATE",
        "WS_PUBLISH_RATE_TOTAL",
        "WS_PUBLISH_BYTES_TOTAL",
    ]
    .into_iter()
    .map(|name| (name.to_string(), "0".to_string()))
    .collect();
    let server = replicas::spawn(
        bin,
        1,
        &ReplicaOpts {
            env,
            ..ReplicaOpts::default()
        },
    )
    .await?;
    let target = server.targets[0].clone();
    let pid = server.pids[0];
    let before = rss_bytes(pid).ok_or("cannot read the server's RSS")?;

    let shared = Arc::new(Shared::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let gate = Arc::new(Semaphore::new(c.concurrency));
    let mut tasks = Vec::with_capacity(o.subs);
    for _ in 0..o.subs {
        let (shared, stop, gate, target) = (
            Arc::clone(&shared),
            stop_rx.clone(),
            Arc::clone(&gate),
            target.clone(),
        );
        let timeout = c.connect_timeout;
        tasks.push(tokio::spawn(async move {
            subscriber(transport, target, timeout, gate, shared, stop).await
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while shared.subscribed.load(Ordering::Acquire) + shared.failed.load(Ordering::Acquire)
        < o.subs as u64
    {
        if Instant::now() > deadline {
            return Err("subscribers did not connect within 120 s".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let subscribed = shared.subscribed.load(Ordering::Acquire);
    if subscribed == 0 {
        return Err("no subscriber connected".into());
    }
    tokio::time::sleep(o.hold).await;
    let after = rss_bytes(pid).ok_or("cannot read the server's RSS")?;
    let bytes_per_conn = after.saturating_sub(before) as f64 / subscribed as f64;

    let (mut publisher, _) = conn::connect(&target, None, true, c.connect_timeout)
        .await
        .map_err(|e| format!("publisher: {e}"))?;
    let padding = pad(o.payload);
    // Warm-up: one publication every subscriber sees before timing starts.
    let mut seq = 0;
    let warm_deadline = Instant::now() + Duration::from_secs(30);
    while shared.warmed.load(Ordering::Acquire) < subscribed {
        seq += 1;
        publish(&mut publisher, seq, true, &padding).await?;
        let until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < until && shared.warmed.load(Ordering::Acquire) < subscribed {
            drain_replies(&mut publisher).await;
        }
        if Instant::now() > warm_deadline {
            return Err("warm-up did not reach every subscriber".into());
        }
    }
    let start_us = now_us();
    let gap = (o.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / o.rate));
    let started = Instant::now();
    for n in 0..o.messages {
        seq += 1;
        publish(&mut publisher, seq, false, &padding).await?;
        if let Some(gap) = gap {
            tokio::time::sleep_until((started + gap * (n as u32 + 1)).into()).await;
        }
    }
    let expected = subscribed * o.messages;
    let mut last = shared.received.load(Ordering::Acquire);
    let mut quiet_since = Instant::now();
    while last < expected && quiet_since.elapsed() < o.drain {
        drain_replies(&mut publisher).await;
        let now = shared.received.load(Ordering::Acquire);
        if now != last {
            last = now;
            quiet_since = Instant::now();
        }
    }
    let elapsed_us = shared
        .last_receipt_us
        .load(Ordering::Acquire)
        .saturating_sub(start_us)
        .max(1);
    let _ = stop_tx.send(true);
    let mut latency = Latency::new();
    for task in tasks {
        if let Ok(samples) = task.await {
            for us in samples {
                latency.record_us(u64::from(us));
            }
        }
    }
    drop(server);
    Ok(RoundResult {
        bytes_per_conn,
        deliveries_per_s: last as f64 / (elapsed_us as f64 / 1e6),
        latency,
        lost: expected.saturating_sub(last),
        subscribed,
    })
}

async fn publish(ws: &mut conn::Ws, seq: u64, warm: bool, padding: &str) -> Result<(), String> {
    let data = conn::bench_data_json(seq, now_us(), warm, padding);
    let text = format!(
        r#"{{"jsonrpc":"2.0","id":{seq},"method":"publish","params":{{"channel":"{CHANNEL}","data":{data}}}}}"#
    );
    ws.send(Message::text(text))
        .await
        .map_err(|e| format!("publish: {e}"))
}

/// Reads the publisher's replies for a moment, so its socket never backs up.
async fn drain_replies(ws: &mut conn::Ws) {
    let _ = tokio::time::timeout(Duration::from_millis(20), async {
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// One subscriber: connects, subscribes, then records each measured publication's
/// latency (microseconds) until told to stop.
async fn subscriber(
    transport: Transport,
    target: Target,
    timeout: Duration,
    gate: Arc<Semaphore>,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> Vec<u32> {
    let permit = gate.acquire_owned().await;
    let mut samples = Vec::new();
    let mut warmed = false;
    let mut on_text = |text: &str, samples: &mut Vec<u32>| {
        let Some(data) = Frame::parse(text)
            .and_then(|f| f.params)
            .and_then(|p| p.bench_data())
        else {
            return;
        };
        if data.w == 1 {
            if !warmed {
                warmed = true;
                shared.warmed.fetch_add(1, Ordering::AcqRel);
            }
            return;
        }
        let now = now_us();
        samples.push(u32::try_from(now.saturating_sub(data.ts)).unwrap_or(u32::MAX));
        shared.received.fetch_add(1, Ordering::AcqRel);
        shared.last_receipt_us.fetch_max(now, Ordering::AcqRel);
    };
    match transport {
        Transport::Ws => {
            let connected = async {
                let (mut ws, _) = conn::connect(&target, None, true, timeout)
                    .await
                    .map_err(|e| e.to_string())?;
                crate::idle::subscribe(&mut ws, CHANNEL).await?;
                Ok::<_, String>(ws)
            };
            let Ok(mut ws) = connected.await else {
                shared.failed.fetch_add(1, Ordering::AcqRel);
                return samples;
            };
            drop(permit);
            shared.subscribed.fetch_add(1, Ordering::AcqRel);
            loop {
                tokio::select! {
                    message = ws.next() => match message {
                        Some(Ok(Message::Text(text))) => on_text(text.as_str(), &mut samples),
                        Some(Ok(_)) => {}
                        _ => break,
                    },
                    _ = stop.changed() => break,
                }
            }
        }
        Transport::Sse => {
            let Ok(mut reader) = tokio::time::timeout(timeout, sse_open(&target))
                .await
                .unwrap_or_else(|_| Err("timeout".into()))
            else {
                shared.failed.fetch_add(1, Ordering::AcqRel);
                return samples;
            };
            drop(permit);
            shared.subscribed.fetch_add(1, Ordering::AcqRel);
            let mut line = String::new();
            loop {
                line.clear();
                tokio::select! {
                    read = reader.read_line(&mut line) => match read {
                        Ok(n) if n > 0 => {
                            if let Some(text) = line.strip_prefix("data: ") {
                                on_text(text.trim_end(), &mut samples);
                            }
                        }
                        _ => break,
                    },
                    _ = stop.changed() => break,
                }
            }
        }
    }
    samples
}

/// `GET /events?channel=` over HTTP/1.1 (chunked, as browsers get it); returns once the
/// stream says it is subscribed. Chunk-size lines never start with `data: `, and each
/// chunk holds whole events, so the reader only looks at `data: ` lines.
async fn sse_open(target: &Target) -> Result<BufReader<TcpStream>, String> {
    let stream = TcpStream::connect(target.addr)
        .await
        .map_err(|e| e.to_string())?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    let mut reader = BufReader::with_capacity(16 * 1024, stream);
    let request = format!(
        "GET /events?channel={CHANNEL} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\r\n",
        target.addr
    );
    reader
        .get_mut()
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    reader
        .read_line(&mut line)
        .await
        .map_err(|e| e.to_string())?;
    if !line.starts_with("HTTP/1.1 200") {
        return Err(format!("refused: {}", line.trim_end()));
    }
    loop {
        line.clear();
        if reader
            .read_line(&mut line)
            .await
            .map_err(|e| e.to_string())?
            == 0
        {
            return Err("stream ended before sys.subscribed".into());
        }
        if line.starts_with("event: sys.subscribed") {
            return Ok(reader);
        }
    }
}
