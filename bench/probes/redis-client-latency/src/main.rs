//! Publication-to-subscriber latency on one Redis (port in the first argument), 3 000
//! publications 1 ms apart per case, medians and p99 in microseconds:
//! fred on both sides, plain tokio sockets on both sides, and each mix, to see which
//! side of the client library costs what. Both clients live in this process, so one
//! clock times both ends.

use std::time::{Duration, Instant};

use fred::prelude::*;
use fred::types::RespVersion;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

const ROUNDS: usize = 3_000;

fn report(case: &str, mut micros: Vec<f64>) {
    micros.sort_by(f64::total_cmp);
    let at = |q: f64| micros[((micros.len() - 1) as f64 * q) as usize];
    println!("{case:<32} p50 {:>6.1} us   p99 {:>6.1} us", at(0.5), at(0.99));
}

/// Times `publish` until `received` says the subscriber got it, `ROUNDS` times.
async fn measure<F, Fut>(mut publish: F, received: &mut mpsc::UnboundedReceiver<Instant>) -> Vec<f64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut micros = Vec::with_capacity(ROUNDS);
    for _ in 0..ROUNDS {
        let sent = Instant::now();
        publish().await;
        let got = received.recv().await.expect("the subscriber is alive");
        micros.push((got - sent).as_secs_f64() * 1e6);
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    micros
}

#[tokio::main]
async fn main() {
    let port: u16 = std::env::args()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("usage: redis-client-latency <redis port>");
    let config = Config::from_url(&format!("redis://127.0.0.1:{port}")).expect("a URL");
    let nodelay = |c: &mut fred::types::config::ConnectionConfig| c.tcp.nodelay = Some(true);

    let fred_publisher = Builder::from_config(config.clone())
        .with_connection_config(nodelay)
        .build()
        .expect("a client");
    fred_publisher.init().await.expect("connected");
    let fred_subscriber = Builder::from_config(Config { version: RespVersion::RESP3, ..config })
        .with_connection_config(nodelay)
        .build_subscriber_client()
        .expect("a client");
    fred_subscriber.init().await.expect("connected");
    let mut messages = fred_subscriber.message_rx();
    fred_subscriber.subscribe("probe:fred").await.expect("subscribed");
    let _: Value = fred_subscriber.ping(None).await.expect("PONG");
    let (fred_got, mut fred_received) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while messages.recv().await.is_ok() {
            let _ = fred_got.send(Instant::now());
        }
    });

    let mut raw_subscriber = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connected");
    raw_subscriber.set_nodelay(true).expect("nodelay");
    raw_subscriber
        .write_all(b"*2\r\n$9\r\nSUBSCRIBE\r\n$9\r\nprobe:raw\r\n")
        .await
        .expect("written");
    let mut confirmation = vec![0u8; 256];
    let _ = raw_subscriber.read(&mut confirmation).await.expect("confirmed");
    let (raw_got, mut raw_received) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut buffer = vec![0u8; 4096];
        while raw_subscriber.read(&mut buffer).await.unwrap_or(0) > 0 {
            let _ = raw_got.send(Instant::now());
        }
    });
    let raw_publisher = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.expect("connected");
    raw_publisher.set_nodelay(true).expect("nodelay");
    let (mut replies, raw_publisher) = raw_publisher.into_split();
    tokio::spawn(async move {
        let mut buffer = vec![0u8; 4096];
        while replies.read(&mut buffer).await.unwrap_or(0) > 0 {}
    });
    let raw_publisher = std::sync::Arc::new(tokio::sync::Mutex::new(raw_publisher));
    let raw_publish = |channel: &'static str| {
        let publisher = raw_publisher.clone();
        async move {
            let command = format!("*3\r\n$7\r\nPUBLISH\r\n${}\r\n{channel}\r\n$1\r\nx\r\n", channel.len());
            publisher.lock().await.write_all(command.as_bytes()).await.expect("written");
        }
    };
    let fred_publish = |channel: &'static str| {
        let publisher = fred_publisher.clone();
        async move {
            let _: () = publisher.publish(channel, "x").await.expect("published");
        }
    };

    let both_fred = measure(|| fred_publish("probe:fred"), &mut fred_received).await;
    report("fred -> fred", both_fred);
    let both_raw = measure(|| raw_publish("probe:raw"), &mut raw_received).await;
    report("tokio socket -> tokio socket", both_raw);
    let raw_to_fred = measure(|| raw_publish("probe:fred"), &mut fred_received).await;
    report("tokio socket -> fred", raw_to_fred);
    let fred_to_raw = measure(|| fred_publish("probe:raw"), &mut raw_received).await;
    report("fred -> tokio socket", fred_to_raw);
}
