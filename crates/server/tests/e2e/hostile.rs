//! Section 9's promise, tried the way an attacker would: 200 hostile connections
//! (garbage, huge and amplifying batches, 100 000-level nesting, publish floods,
//! sockets that never read) against a server with default settings, while 10
//! well-behaved clients must receive every broadcast the server accepted, none of
//! them may be closed, and the server's memory stays bounded.
//!
//! It runs alone (see `.config/nextest.toml`): it is meant to load the machine.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{Client, PATIENCE, ServerProcess, ws_url};

/// How long the attack lasts.
const ATTACK: Duration = Duration::from_secs(4);
/// Hostile connections of each of the five kinds.
const PER_KIND: usize = 40;
const GOOD_CLIENTS: usize = 10;
/// Broadcasts a flooder sends before reading their answers.
const WINDOW: usize = 150;
/// The bound on the server's resident memory, whatever the attack. Worst case by the
/// limits: each hostile connection holds at most one inbound message being read
/// (WS_MAX_MESSAGE_SIZE, 1 MiB) and one reply being written, and its queue at most
/// WS_SEND_BUFFER (1 MiB) of frames that are mostly shared broadcasts; the attack
/// below makes about 80 connections hold big frames at once. Before the limits, ten
/// 1 MiB `[1,1,...]` frames alone took the server from 7 MB to 410 MB.
const RSS_BOUND: u64 = 256 << 20;

fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                line.strip_prefix("VmRSS:").and_then(|rest| {
                    rest.trim()
                        .trim_end_matches(" kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
            })
        })
        .map_or(0, |kib| kib * 1024)
}

/// Broadcasts a flooder got a success reply for: the server accepted them.
type Accepted = Arc<Mutex<HashSet<(u64, u64)>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_cannot_hurt_well_behaved_ones() {
    let server = ServerProcess::spawn(&[]).await;
    let addr = server.addr;
    let pid = server.child.id().expect("running");
    let url = ws_url(addr);

    // The well-behaved clients read on their own thread, so that the attackers in this
    // process cannot starve them of CPU: only the server could.
    let stop_good = Arc::new(AtomicBool::new(false));
    let (good_tx, good_rx) = std::sync::mpsc::channel();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(GOOD_CLIENTS);
    for _ in 0..GOOD_CLIENTS {
        let url = url.clone();
        let good_tx = good_tx.clone();
        let ready = ready_tx.clone();
        let stop = Arc::clone(&stop_good);
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let outcome = runtime.block_on(good_client(url, ready, stop));
            let _ = good_tx.send(outcome);
        });
    }
    drop(good_tx);
    // Every good client is connected before the first hostile message.
    for _ in 0..GOOD_CLIENTS {
        tokio::time::timeout(PATIENCE, ready_rx.recv())
            .await
            .expect("a good client connects in time");
    }

    let attacking = Arc::new(AtomicBool::new(true));
    let accepted: Accepted = Arc::default();
    let refused = Arc::new(AtomicU64::new(0));
    let mut attackers = Vec::new();
    for n in 0..PER_KIND {
        let on = Arc::clone(&attacking);
        attackers.push(tokio::spawn(garbage(url.clone(), Arc::clone(&on), n)));
        attackers.push(tokio::spawn(huge_batches(url.clone(), Arc::clone(&on), n)));
        attackers.push(tokio::spawn(deep_nesting(url.clone(), Arc::clone(&on))));
        attackers.push(tokio::spawn(publish_flood(
            url.clone(),
            Arc::clone(&on),
            n as u64,
            Arc::clone(&accepted),
            Arc::clone(&refused),
        )));
        attackers.push(tokio::spawn(never_reads(addr, on)));
    }

    let mut peak = 0;
    let started = tokio::time::Instant::now();
    while started.elapsed() < ATTACK {
        peak = peak.max(rss_of(pid));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    attacking.store(false, Ordering::Release);
    for attacker in attackers {
        let _ = tokio::time::timeout(PATIENCE, attacker).await;
    }
    peak = peak.max(rss_of(pid));

    // One last broadcast from a fresh client marks the end for the good readers.
    let mut closer = Client::connect_url(&url).await;
    closer.ok("broadcast", json!({"end": true})).await;

    let accepted = accepted.lock().await.clone();
    eprintln!(
        "hostile: {} broadcasts accepted, {} refused, server RSS peak {} MiB",
        accepted.len(),
        refused.load(Ordering::Relaxed),
        peak >> 20
    );
    assert!(
        !accepted.is_empty(),
        "the flooders got some broadcasts through"
    );
    assert!(
        refused.load(Ordering::Relaxed) > 0,
        "and the publish budgets refused some"
    );
    for _ in 0..GOOD_CLIENTS {
        let outcome = good_rx
            .recv_timeout(PATIENCE * 3)
            .expect("a good client finishes");
        let received = outcome.unwrap_or_else(|why| panic!("a good client failed: {why}"));
        let mut missing: Vec<_> = accepted.difference(&received).collect();
        missing.sort_unstable();
        assert!(
            missing.is_empty(),
            "a good client missed {} of {} accepted broadcasts (received {}): {:?}",
            missing.len(),
            accepted.len(),
            received.len(),
            &missing[..missing.len().min(20)]
        );
    }
    stop_good.store(true, Ordering::Release);
    assert!(
        peak < RSS_BOUND,
        "server RSS peaked at {} MiB (bound {} MiB)",
        peak >> 20,
        RSS_BOUND >> 20
    );
}

/// Reads everything until the end marker; returns the flood broadcasts it saw, or
/// why it failed (closed, a duplicate).
async fn good_client(
    url: String,
    ready: tokio::sync::mpsc::Sender<()>,
    stop: Arc<AtomicBool>,
) -> Result<HashSet<(u64, u64)>, String> {
    let mut client = Client::connect_url(&url).await;
    let _ = ready.send(()).await;
    let mut seen = HashSet::new();
    loop {
        let message = match tokio::time::timeout(PATIENCE * 2, client.socket.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => text,
            Ok(Some(Ok(Message::Close(frame)))) => return Err(format!("closed: {frame:?}")),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(err))) => return Err(format!("socket error: {err}")),
            Ok(None) => return Err("connection ended".into()),
            Err(_) if stop.load(Ordering::Acquire) => return Ok(seen),
            Err(_) => return Err("nothing arrived for 20 s".into()),
        };
        let value: Value = serde_json::from_str(&message).map_err(|err| err.to_string())?;
        if value["method"] != "broadcast" {
            continue;
        }
        let params = &value["params"];
        if params["end"] == true {
            return Ok(seen);
        }
        if let (Some(from), Some(seq)) = (params["from"].as_u64(), params["seq"].as_u64())
            && !seen.insert((from, seq))
        {
            return Err(format!("broadcast {from}/{seq} arrived twice"));
        }
    }
}

async fn connect(url: &str) -> Option<crate::support::Socket> {
    tokio_tungstenite::connect_async(url)
        .await
        .ok()
        .map(|(socket, _)| socket)
}

/// Random text that is not JSON-RPC, as fast as the server takes it.
async fn garbage(url: String, on: Arc<AtomicBool>, seed: usize) {
    let Some(socket) = connect(&url).await else {
        return;
    };
    let (mut sink, mut stream) = socket.split();
    tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
    let mut state = seed as u64 * 2_654_435_761 + 1;
    while on.load(Ordering::Acquire) {
        let text: String = (0..1024)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                char::from_u32(32 + (state % 2000) as u32).unwrap_or('?')
            })
            .collect();
        if sink.send(Message::text(text)).await.is_err() {
            return;
        }
    }
}

/// `[1,1,...]` frames of almost 1 MiB, and batches of 100 echoes of 10 KB each.
async fn huge_batches(url: String, on: Arc<AtomicBool>, n: usize) {
    let Some(socket) = connect(&url).await else {
        return;
    };
    let (mut sink, mut stream) = socket.split();
    tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
    let ones = format!("[{}1]", "1,".repeat(500_000));
    let echo =
        json!({"jsonrpc": "2.0", "method": "self.reply", "params": ["z".repeat(10_000)], "id": 1});
    let amplifier = Value::from(vec![echo; 100]).to_string();
    let mut round = n;
    while on.load(Ordering::Acquire) {
        round += 1;
        let text = if round.is_multiple_of(2) {
            &ones
        } else {
            &amplifier
        };
        if sink.send(Message::text(text.clone())).await.is_err() {
            return;
        }
    }
}

async fn deep_nesting(url: String, on: Arc<AtomicBool>) {
    let Some(socket) = connect(&url).await else {
        return;
    };
    let (mut sink, mut stream) = socket.split();
    tokio::spawn(async move { while let Some(Ok(_)) = stream.next().await {} });
    let deep = [
        "[".repeat(100_000),
        format!(
            r#"{{"jsonrpc":"2.0","method":"broadcast","params":{}"#,
            "{\"a\":".repeat(100_000)
        ),
    ];
    let mut round = 0;
    while on.load(Ordering::Acquire) {
        round += 1;
        if sink
            .send(Message::text(deep[round % 2].clone()))
            .await
            .is_err()
        {
            return;
        }
    }
}

/// Broadcasts as fast as the server answers, reading every reply so as to know which
/// broadcasts it accepted.
async fn publish_flood(
    url: String,
    on: Arc<AtomicBool>,
    from: u64,
    accepted: Accepted,
    refused: Arc<AtomicU64>,
) {
    let Ok(mut client) = tokio::time::timeout(PATIENCE, Client::connect_url(&url)).await else {
        return;
    };
    let mut seq = 0;
    while on.load(Ordering::Acquire) {
        // More at once than a connection's burst (100), then every answer.
        for _ in 0..WINDOW {
            seq += 1;
            let request = json!({"jsonrpc": "2.0", "method": "broadcast", "params": {"from": from, "seq": seq}, "id": seq});
            client.send_text(&request.to_string()).await;
        }
        let mut answered = 0;
        while answered < WINDOW {
            let reply = client.recv().await;
            let Some(id) = reply["id"].as_u64() else {
                continue;
            };
            answered += 1;
            if reply.get("result").is_some() {
                accepted.lock().await.insert((from, id));
            } else {
                assert_eq!(reply["error"]["code"], -32029, "{reply}");
                refused.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Asks for big replies and never reads them, with a tiny receive buffer.
async fn never_reads(addr: std::net::SocketAddr, on: Arc<AtomicBool>) {
    let mut client = Client::connect_with_small_buffer(addr).await;
    let request =
        json!({"jsonrpc": "2.0", "method": "self.reply", "params": ["w".repeat(100_000)], "id": 1})
            .to_string();
    for _ in 0..100 {
        if !on.load(Ordering::Acquire)
            || client
                .socket
                .send(Message::text(request.clone()))
                .await
                .is_err()
        {
            break;
        }
    }
    while on.load(Ordering::Acquire) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
