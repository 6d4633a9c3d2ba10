//! Smoke test of the load generator: the `rpc` and `fanout` scenarios with
//! tiny numbers against a minimal in-test server that speaks the Chorus wire
//! format (sys.connected, self.reply, subscribe, publish).
//!
//! Set `CHORUS_BENCH_URL=ws://127.0.0.1:PORT/ws` to run the same scenarios
//! against a running Chorus server as well.

use chorus_bench::Common;
use chorus_bench::conn::Target;
use chorus_bench::fanout::{self, FanoutOpts};
use chorus_bench::rpc::{self, RpcOpts};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

type Subs = Arc<Mutex<Vec<(String, mpsc::UnboundedSender<String>)>>>;

/// A tiny Chorus-compatible server on an ephemeral loopback port.
async fn mini_server() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let subs: Subs = Arc::default();
    tokio::spawn(async move {
        let mut n = 0u64;
        while let Ok((tcp, _)) = listener.accept().await {
            n += 1;
            let subs = subs.clone();
            tokio::spawn(async move {
                let Ok(ws) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                let (mut sink, mut stream) = ws.split();
                let (tx, mut rx) = mpsc::unbounded_channel::<String>();
                let hello = json!({"jsonrpc":"2.0","method":"sys.connected","params":{"client_id":n.to_string(),"node_id":"test"}});
                let _ = tx.send(hello.to_string());
                tokio::spawn(async move {
                    while let Some(m) = rx.recv().await {
                        if sink.send(Message::text(m)).await.is_err() {
                            break;
                        }
                    }
                });
                while let Some(Ok(msg)) = stream.next().await {
                    let Message::Text(t) = msg else { continue };
                    let Ok(req) = serde_json::from_str::<Value>(t.as_str()) else {
                        continue;
                    };
                    let id = req["id"].clone();
                    let params = req["params"].clone();
                    let result = match req["method"].as_str() {
                        Some("self.reply") => params,
                        Some("subscribe") => {
                            let ch = params["channel"].as_str().unwrap_or_default().to_string();
                            subs.lock().expect("lock").push((ch.clone(), tx.clone()));
                            json!({"channel": ch})
                        }
                        Some("publish") => {
                            let ch = params["channel"].as_str().unwrap_or_default().to_string();
                            let note = json!({"jsonrpc":"2.0","method":"message","params":{"channel":ch,"data":params["data"]}})
                                .to_string();
                            for (c, s) in subs.lock().expect("lock").iter() {
                                if *c == ch {
                                    let _ = s.send(note.clone());
                                }
                            }
                            json!({"channel": ch})
                        }
                        _ => Value::Null,
                    };
                    let _ = tx.send(json!({"jsonrpc":"2.0","id":id,"result":result}).to_string());
                }
            });
        }
    });
    format!("ws://{addr}/ws")
}

fn common(url: &str) -> Common {
    let mut c = Common::new(vec![Target::parse(url).expect("url")]);
    c.label = "smoke".into();
    c.connect_timeout = Duration::from_secs(10);
    c
}

async fn check_rpc(url: &str) {
    let o = RpcOpts {
        conns: 4,
        depth: 3,
        requests: 50,
        duration: Duration::from_secs(10),
        ..RpcOpts::default()
    };
    let r = rpc::run(&common(url), &o).await;
    assert!(r.errors.is_empty(), "{}", r.to_table());
    assert_eq!(r.get("connections_ok"), Some(4.0), "{}", r.to_table());
    assert_eq!(r.get("requests_ok"), Some(200.0), "{}", r.to_table());
    assert!(r.get("requests_per_s").unwrap_or(0.0) > 0.0);
    assert!(r.get("latency_p99_ms").unwrap_or(0.0) > 0.0);
    let j = r.to_json();
    assert_eq!(j["scenario"], "rpc");
    assert_eq!(j["latency"]["all"]["count"], 200);
}

async fn check_fanout(url: &str) {
    let mut o = FanoutOpts::new(vec![8]);
    o.messages = 20;
    o.rate = 200.0;
    o.channel = "smoke:fanout".into();
    o.drain = Duration::from_secs(2);
    let r = fanout::run("fanout", &common(url), &o).await;
    assert!(r.errors.is_empty(), "{}", r.to_table());
    assert_eq!(r.get("subscribers"), Some(8.0), "{}", r.to_table());
    assert_eq!(r.get("published"), Some(20.0), "{}", r.to_table());
    assert_eq!(r.get("delivered"), Some(160.0), "{}", r.to_table());
    assert_eq!(r.get("lost"), Some(0.0));
    assert_eq!(r.get("duplicated"), Some(0.0));
    assert_eq!(r.get("warm_missing"), Some(0.0));
    assert!(r.get("deliveries_per_s").unwrap_or(0.0) > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_and_fanout_against_mini_server() {
    let url = mini_server().await;
    check_rpc(&url).await;
    check_fanout(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_and_fanout_against_chorus_when_configured() {
    let Ok(url) = std::env::var("CHORUS_BENCH_URL") else {
        eprintln!("CHORUS_BENCH_URL not set: skipping the run against a real server");
        return;
    };
    check_rpc(&url).await;
    check_fanout(&url).await;
}
