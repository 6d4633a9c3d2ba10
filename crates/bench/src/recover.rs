//! `recover`: many clients of one history channel reconnect together after missing
//! publications, as after a network blip or a replica's restart.
//!
//! `clients` connections, spread over the replicas, subscribe to `channel` (a
//! namespace with history) and note its position; they all disconnect; a publisher
//! makes `missed` publications; then every client connects again, to the next replica
//! (not the one it left), and once all are connected they all subscribe at once with
//! `since` their old position. Measured: each subscribe's reply latency (send to reply,
//! the recovery included), whether every client got exactly the missed publications
//! in order with `recovered: true`, and the store reads each replica made for it
//! (`ws_history_reads_total{reason="recovery"}` from `/metrics`, before and after:
//! coalescing makes it one per replica).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use crate::Common;
use crate::conn::{self, Target, Ws};
use crate::report::Report;
use crate::stats::Latency;

#[derive(Debug, Clone)]
pub struct RecoverOpts {
    pub clients: usize,
    pub missed: u64,
    pub channel: String,
}

impl Default for RecoverOpts {
    fn default() -> Self {
        Self {
            clients: 1000,
            missed: 100,
            channel: "hist:bench".into(),
        }
    }
}

/// What one client saw when it came back.
#[derive(Debug, Default)]
struct Back {
    latency: Option<Duration>,
    exact: bool,
    error: Option<String>,
}

/// Reads frames until the reply with `id`.
async fn reply(ws: &mut Ws, id: u64) -> Result<Value, String> {
    loop {
        match ws.next().await {
            None => return Err("closed".into()),
            Some(Err(e)) => return Err(e.to_string()),
            Some(Ok(Message::Text(text))) => {
                let value: Value =
                    serde_json::from_str(text.as_str()).map_err(|e| e.to_string())?;
                if value["id"].as_u64() == Some(id) {
                    if value.get("error").is_some() {
                        return Err(value["error"].to_string());
                    }
                    return Ok(value["result"].clone());
                }
            }
            Some(Ok(Message::Close(frame))) => return Err(format!("closed: {frame:?}")),
            Some(Ok(_)) => {}
        }
    }
}

async fn call(ws: &mut Ws, id: u64, method: &str, params: Value) -> Result<Value, String> {
    let request =
        serde_json::json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params});
    ws.send(Message::text(request.to_string()))
        .await
        .map_err(|e| e.to_string())?;
    reply(ws, id).await
}

/// The recovery reads each replica has made so far (`None` when `/metrics` cannot be
/// read).
async fn recovery_reads(targets: &[Target]) -> Vec<Option<f64>> {
    let mut out = Vec::new();
    for target in targets {
        let url = format!("http://{}/metrics", target.addr);
        let reads = crate::http::get(&url).await.ok().and_then(|response| {
            let text = String::from_utf8_lossy(&response.body).into_owned();
            text.lines()
                .find(|line| line.starts_with("ws_history_reads_total{reason=\"recovery\"}"))
                .and_then(|line| line.rsplit(' ').next()?.parse().ok())
        });
        out.push(reads);
    }
    out
}

async fn connect_all(c: &Common, clients: usize, shift: usize) -> Vec<Result<Ws, String>> {
    let semaphore = std::sync::Arc::new(tokio::sync::Semaphore::new(c.concurrency.max(1)));
    let mut tasks = Vec::with_capacity(clients);
    for i in 0..clients {
        let target = c.urls[(i + shift) % c.urls.len()].clone();
        let semaphore = std::sync::Arc::clone(&semaphore);
        let timeout = c.connect_timeout;
        let hello = c.hello;
        tasks.push(tokio::spawn(async move {
            let _permit = semaphore.acquire_owned().await.map_err(|e| e.to_string())?;
            conn::connect(&target, None, hello, timeout)
                .await
                .map(|(ws, _)| ws)
                .map_err(|e| e.to_string())
        }));
    }
    let mut out = Vec::with_capacity(clients);
    for task in tasks {
        out.push(task.await.unwrap_or_else(|e| Err(e.to_string())));
    }
    out
}

pub async fn run(c: &Common, o: &RecoverOpts) -> Report {
    let mut report = Report::new("recover", &c.label, c.url_strings());
    report
        .param("clients", o.clients)
        .param("missed", o.missed)
        .param("replicas", c.urls.len())
        .param("channel", o.channel.clone());

    // 1. Everyone subscribes and notes where the channel stands.
    let mut first = Vec::new();
    let mut position: Option<(u64, String)> = None;
    for ws in connect_all(c, o.clients, 0).await {
        match ws {
            Ok(ws) => first.push(ws),
            Err(e) => {
                report.error(format!("connect: {e}"));
                return report;
            }
        }
    }
    let subscribes = first.iter_mut().map(|ws| {
        call(
            ws,
            1,
            "subscribe",
            serde_json::json!({"channel": o.channel}),
        )
    });
    for result in futures_util::future::join_all(subscribes).await {
        match result {
            Ok(result) => {
                let here = (
                    result["offset"].as_u64().unwrap_or(0),
                    result["epoch"].as_str().unwrap_or_default().to_owned(),
                );
                if position
                    .as_ref()
                    .is_some_and(|p| p.0 != here.0 || p.1 != here.1)
                {
                    report.error(format!("subscribers disagree on the position: {here:?}"));
                }
                position.get_or_insert(here);
            }
            Err(e) => {
                report.error(format!(
                    "subscribe: {e} (is {} a history channel?)",
                    o.channel
                ));
                return report;
            }
        }
    }
    let Some((offset, epoch)) = position else {
        report.error("no client".into());
        return report;
    };

    // 2. They all leave; the publisher makes the publications they miss.
    for mut ws in first {
        let _ = ws.close(None).await;
    }
    let mut publisher = match conn::connect(&c.urls[0], None, c.hello, c.connect_timeout).await {
        Ok((ws, _)) => ws,
        Err(e) => {
            report.error(format!("publisher: {e}"));
            return report;
        }
    };
    let mut last = offset;
    for n in 0..o.missed {
        match call(
            &mut publisher,
            n + 1,
            "publish",
            serde_json::json!({"channel": o.channel, "data": {"n": n}}),
        )
        .await
        {
            Ok(result) => last = result["offset"].as_u64().unwrap_or(last),
            Err(e) => {
                report.error(format!("publish: {e}"));
                return report;
            }
        }
    }
    if last != offset + o.missed {
        report.error(format!(
            "publications took offsets {}..={last}, expected {} of them",
            offset + 1,
            o.missed
        ));
    }
    let before = recovery_reads(&c.urls).await;

    // 3. Everyone comes back to another replica, then all subscribe with `since` at once.
    let mut back = Vec::new();
    for ws in connect_all(c, o.clients, 1).await {
        match ws {
            Ok(ws) => back.push(ws),
            Err(e) => {
                report.error(format!("reconnect: {e}"));
                return report;
            }
        }
    }
    let since = serde_json::json!({"offset": offset, "epoch": epoch});
    let started = Instant::now();
    let recoveries = back.iter_mut().map(|ws| {
        let since = since.clone();
        let channel = o.channel.clone();
        let missed = o.missed;
        async move {
            let sent = Instant::now();
            let mut outcome = Back::default();
            match call(
                ws,
                1,
                "subscribe",
                serde_json::json!({"channel": channel, "since": since}),
            )
            .await
            {
                Ok(result) => {
                    outcome.latency = Some(sent.elapsed());
                    let offsets: Vec<u64> = result["publications"]
                        .as_array()
                        .map(|list| list.iter().filter_map(|p| p["offset"].as_u64()).collect())
                        .unwrap_or_default();
                    let wanted: Vec<u64> = (offset + 1..=offset + missed).collect();
                    outcome.exact = result["recovered"] == true && offsets == wanted;
                }
                Err(e) => outcome.error = Some(e),
            }
            outcome
        }
    });
    let outcomes = futures_util::future::join_all(recoveries).await;
    let window = started.elapsed();
    let after = recovery_reads(&c.urls).await;

    let mut latency = Latency::new();
    let mut exact = 0u64;
    let mut errors: HashMap<String, u64> = HashMap::new();
    for outcome in &outcomes {
        if let Some(d) = outcome.latency {
            latency.record(d);
        }
        exact += u64::from(outcome.exact);
        if let Some(e) = &outcome.error {
            *errors.entry(conn::truncate(e, 80).to_owned()).or_default() += 1;
        }
    }
    for (e, n) in errors {
        report.error(format!("{n} × subscribe with since: {e}"));
    }
    let reads: Vec<Option<f64>> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| Some(a.as_ref()? - b.as_ref()?))
        .collect();
    let known: Vec<f64> = reads.iter().flatten().copied().collect();
    if known.len() == reads.len() {
        report
            .metric(
                "store_reads_max_per_replica",
                known.iter().copied().fold(0.0, f64::max),
            )
            .metric("store_reads_total", known.iter().sum());
    } else {
        report.error("could not read ws_history_reads_total from every replica's /metrics".into());
    }
    report
        .param("store_reads_per_replica", serde_json::json!(reads))
        .metric("connections_ok", back.len() as f64)
        .metric("recovered_exactly", exact as f64)
        .metric("recovered_wrong", (o.clients as u64 - exact) as f64)
        .metric("all_recovered_s", window.as_secs_f64())
        .latency("recovery", "recovery_", latency.summary());
    for mut ws in back {
        let _ = ws.close(None).await;
    }
    report
}
