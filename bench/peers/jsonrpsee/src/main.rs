//! Benchmark peer: jsonrpsee (the reference Rust JSON-RPC server) serving the
//! Chorus methods on one node, so chorus-bench can drive both.
//!
//! Differences from the Chorus wire contract, forced by jsonrpsee's own
//! subscription protocol (chorus-bench tolerates them; run it with --no-hello):
//! - no `sys.connected` frame on connect (jsonrpsee cannot push outside a
//!   subscription);
//! - `subscribe` answers with a subscription id instead of `{"channel"}`;
//! - publications arrive as `{"method":"message","params":{"subscription":ID,
//!   "result":{"channel":..,"data":..}}}` instead of `params: {"channel","data"}`;
//! - `broadcast` goes to every live subscription (jsonrpsee cannot reach a
//!   connection that has none).
//!
//! Environment: WS_HOST (127.0.0.1), WS_PORT (8091).

use jsonrpsee::server::{PendingSubscriptionSink, RpcModule, Server, ServerConfig, SubscriptionMessage};
use jsonrpsee::types::{ErrorObjectOwned, Params};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::broadcast;

type Payload = Arc<Box<RawValue>>;

#[derive(Default)]
struct State {
    channels: Mutex<HashMap<String, broadcast::Sender<Payload>>>,
}

impl State {
    fn sender(&self, ch: &str) -> broadcast::Sender<Payload> {
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(ch.to_string()).or_insert_with(|| broadcast::channel(4096).0).clone()
    }

    fn publish(&self, ch: Option<&str>, payload: Payload) {
        let mut map = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, tx| tx.receiver_count() > 0);
        match ch {
            Some(ch) => {
                if let Some(tx) = map.get(ch) {
                    let _ = tx.send(payload);
                }
            }
            None => {
                for tx in map.values() {
                    let _ = tx.send(payload.clone());
                }
            }
        }
    }
}

#[derive(Deserialize)]
struct ChannelParams {
    channel: String,
}

#[derive(Deserialize)]
struct PublishParams {
    channel: String,
    #[serde(default)]
    data: Value,
}

fn valid_channel(ch: &str) -> bool {
    (1..=255).contains(&ch.len())
        && ch.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-:.@/=".contains(&b))
}

fn bad_params() -> ErrorObjectOwned {
    ErrorObjectOwned::owned(-32602, "Invalid params", None::<()>)
}

fn channel_of(params: &Params<'_>) -> Result<String, ErrorObjectOwned> {
    let ch = params
        .parse::<ChannelParams>()
        .map(|p| p.channel)
        .or_else(|_| params.sequence().next::<String>())
        .map_err(|_| bad_params())?;
    if valid_channel(&ch) { Ok(ch) } else { Err(bad_params()) }
}

fn to_raw(v: &Value) -> Payload {
    Arc::new(serde_json::value::to_raw_value(v).unwrap_or_else(|_| RawValue::NULL.to_owned()))
}

async fn subscription(params: Params<'static>, pending: PendingSubscriptionSink, state: Arc<State>) {
    let ch = match channel_of(&params) {
        Ok(ch) => ch,
        Err(e) => {
            pending.reject(e).await;
            return;
        }
    };
    let mut rx = state.sender(&ch).subscribe();
    let Ok(sink) = pending.accept().await else { return };
    loop {
        tokio::select! {
            _ = sink.closed() => break,
            m = rx.recv() => match m {
                Ok(p) => {
                    let msg = SubscriptionMessage::from((*p).clone());
                    if sink.send(msg).await.is_err() {
                        break;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => break,
            }
        }
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let host = std::env::var("WS_HOST").unwrap_or_else(|_| "127.0.0.1".into());
    let port: u16 = std::env::var("WS_PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(8091);
    let config = ServerConfig::builder()
        .max_connections(200_000)
        .max_subscriptions_per_connection(1024)
        .set_message_buffer_capacity(1024)
        .max_request_body_size(1 << 20)
        .build();
    let server = Server::builder().set_config(config).build((host.as_str(), port)).await?;

    let mut module = RpcModule::from_arc(Arc::new(State::default()));
    module.register_method("self.reply", |params, _, _| params.parse::<Value>().unwrap_or(Value::Null))?;
    module.register_method("ping", |_, _, _| "pong")?;
    module.register_method("publish", |params: Params<'_>, state, _| {
        let p: PublishParams = params.parse().map_err(|_| bad_params())?;
        if !valid_channel(&p.channel) {
            return Err(bad_params());
        }
        let payload = to_raw(&json!({"channel": p.channel, "data": p.data}));
        state.publish(Some(&p.channel), payload);
        Ok::<_, ErrorObjectOwned>(json!({"channel": p.channel}))
    })?;
    module.register_method("broadcast", |params: Params<'_>, state, _| {
        let v: Value = params.parse().map_err(|_| bad_params())?;
        if !v.is_object() {
            return Err(bad_params());
        }
        state.publish(None, to_raw(&json!({"channel": "", "data": v})));
        Ok::<_, ErrorObjectOwned>(json!({"status": "broadcasted"}))
    })?;
    module.register_subscription("subscribe", "message", "unsubscribe", |params, pending, state, _| {
        subscription(params, pending, state)
    })?;

    let addr = server.local_addr()?;
    let handle = server.start(module);
    eprintln!("jsonrpsee peer listening on ws://{addr}/ws");
    tokio::select! {
        _ = handle.clone().stopped() => {}
        _ = tokio::signal::ctrl_c() => {}
        _ = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => { s.recv().await; }
                Err(_) => std::future::pending::<()>().await,
            }
        } => {}
    }
    let _ = handle.stop();
    Ok(())
}
