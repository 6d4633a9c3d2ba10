//! One WebSocket connection from upgrade to close: reading requests, writing the
//! client's queue in batches, keepalive, and the close handshake.
//!
//! A connection is one task. It never waits on anyone else's socket: fan-out only
//! touches queues, and this task alone writes this socket.

use std::sync::Arc;
use std::time::Duration;

use chorus_hub::{CloseReason, Frame, Identity, Outbox, Outgoing};
use chorus_rpc::{Context, notification};
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::time::{Instant, MissedTickBehavior, interval_at, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Bytes, Message};

use crate::app::{App, ConnectionSlot};

pub type WsStream = WebSocketStream<TokioIo<Upgraded>>;

/// Stop adding frames to a batch past this many bytes, then flush.
const BATCH_BYTES: usize = 64 * 1024;
/// Inbound messages handled back to back before queued replies are written anyway.
/// Reading first lets one write carry the replies to everything a single read
/// brought in; the bound keeps a client that never pauses from starving its writer.
const READS_BEFORE_WRITE: u32 = 64;
/// How long the close handshake may take before the socket is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the connection serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// JSON-RPC on the hub.
    Rpc,
    /// Conformance echo: text and binary messages come back unchanged.
    Echo,
}

/// How the loop ended.
enum Ending {
    /// We close with this code.
    Close(CloseCode, &'static str),
    /// The peer closed, or the socket failed: nothing more to send.
    Gone,
}

pub async fn run(mut ws: WsStream, app: Arc<App>, mode: Mode, slot: ConnectionSlot) {
    let hub = app.node.hub();
    let (client, mut outbox) = hub.create_client(Identity::default());
    if mode == Mode::Rpc {
        // Queued before registering, so it is the first frame the client sees.
        let greeting = notification::value(
            "sys.connected",
            &serde_json::json!({"client_id": client.id().to_string(), "node_id": app.node.node_id()}),
        );
        let _ = client.send(greeting);
        hub.register(&client);
    }
    app.metrics.connections_total.inc();

    let config = &app.config;
    let mut keepalive = interval_at(Instant::now() + config.ping_interval, config.ping_interval);
    keepalive.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut last_heard = Instant::now();

    let mut reads_since_write = 0u32;
    let ending = loop {
        if reads_since_write >= READS_BEFORE_WRITE {
            reads_since_write = 0;
            // A pending close makes `next` ready at once; otherwise take what is queued.
            let outgoing = if outbox.pending_close().is_some() {
                Some(outbox.next().await)
            } else {
                outbox.try_next().map(Outgoing::Frame)
            };
            if let Some(outgoing) = outgoing
                && let Err(ending) = send(&mut ws, outgoing, &mut outbox, &app).await
            {
                break ending;
            }
        }
        tokio::select! {
            // Inbound first: see READS_BEFORE_WRITE.
            biased;
            inbound = ws.next() => {
                reads_since_write += 1;
                last_heard = Instant::now();
                match inbound {
                    Some(Ok(Message::Text(text))) => {
                        app.metrics.messages_received.inc();
                        match mode {
                            Mode::Rpc => {
                                let cx = Context { client: &client, node: app.node.as_ref() };
                                if let Some(reply) = app.router.handle(&text, &cx, app.metrics.as_ref()) {
                                    // A full queue closes this client as a slow consumer.
                                    let _ = client.send(Frame::from(reply));
                                }
                            }
                            Mode::Echo => {
                                if let Err(ending) = echo(&mut ws, Message::Text(text), &mut outbox, &app).await {
                                    break ending;
                                }
                            }
                        }
                    }
                    Some(Ok(Message::Binary(data))) => match mode {
                        Mode::Rpc => break Ending::Close(CloseCode::Unsupported, "binary messages are not supported"),
                        Mode::Echo => {
                            app.metrics.messages_received.inc();
                            if let Err(ending) = echo(&mut ws, Message::Binary(data), &mut outbox, &app).await {
                                break ending;
                            }
                        }
                    },
                    // Pings are answered by tungstenite; pongs and closes only prove life.
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_))) => {}
                    Some(Err(err)) => break ending_for(&err),
                    None => break Ending::Gone,
                }
            },
            outgoing = outbox.next() => {
                reads_since_write = 0;
                if let Err(ending) = send(&mut ws, outgoing, &mut outbox, &app).await {
                    break ending;
                }
            },
            _ = keepalive.tick() => {
                if last_heard.elapsed() > config.pong_timeout {
                    break Ending::Close(CloseCode::Policy, "keepalive timeout");
                }
                let sent = async {
                    ws.feed(Message::Ping(Bytes::new())).await?;
                    ws.flush().await
                };
                if let Err(ending) = guarded(sent, &outbox).await {
                    break ending;
                }
            },
        }
    };

    if mode == Mode::Rpc {
        app.node.disconnect(&client);
    }
    if let Ending::Close(code, reason) = ending {
        close(&mut ws, code, reason).await;
    }
    drop(slot);
}

/// Writes a frame (with whatever else is queued), or turns a close request into the
/// loop's ending.
async fn send(
    ws: &mut WsStream,
    outgoing: Outgoing,
    outbox: &mut Outbox,
    app: &App,
) -> Result<(), Ending> {
    match outgoing {
        Outgoing::Frame(frame) => write_batch(ws, frame, outbox, app).await,
        Outgoing::Close(reason) => Err(close_for(reason)),
    }
}

/// Writes `first` and whatever else is already queued, then flushes once.
async fn write_batch(
    ws: &mut WsStream,
    first: Frame,
    outbox: &mut Outbox,
    app: &App,
) -> Result<(), Ending> {
    let mut bytes = first.len();
    let mut count = 1u64;
    let mut feed = ws.feed(Message::Text(first.into_text())).await;
    while feed.is_ok() && bytes < BATCH_BYTES {
        let Some(frame) = outbox.try_next() else {
            break;
        };
        bytes += frame.len();
        count += 1;
        feed = ws.feed(Message::Text(frame.into_text())).await;
    }
    app.metrics.messages_sent.inc_by(count);
    if let Err(err) = feed {
        return Err(ending_for(&err));
    }
    guarded(ws.flush(), outbox).await
}

async fn echo(
    ws: &mut WsStream,
    message: Message,
    outbox: &mut Outbox,
    app: &App,
) -> Result<(), Ending> {
    app.metrics.messages_sent.inc();
    let sent = async {
        ws.feed(message).await?;
        ws.flush().await
    };
    guarded(sent, outbox).await
}

/// Runs a socket write, giving up if the client is told to close meanwhile (a client
/// that stopped reading would otherwise hold the write forever).
async fn guarded(
    write: impl Future<Output = Result<(), WsError>>,
    outbox: &Outbox,
) -> Result<(), Ending> {
    tokio::select! {
        result = write => result.map_err(|err| ending_for(&err)),
        reason = outbox.close_requested() => Err(close_for(reason)),
    }
}

fn close_for(reason: CloseReason) -> Ending {
    match reason {
        CloseReason::SlowConsumer => Ending::Close(CloseCode::Again, "slow consumer"),
        CloseReason::Shutdown => Ending::Close(CloseCode::Away, "server shutting down"),
    }
}

fn ending_for(err: &WsError) -> Ending {
    match err {
        WsError::Capacity(CapacityError::MessageTooLong { .. }) => {
            Ending::Close(CloseCode::Size, "message too large")
        }
        WsError::Utf8(_) => Ending::Close(CloseCode::Invalid, "invalid UTF-8"),
        WsError::Protocol(_) => Ending::Close(CloseCode::Protocol, "protocol error"),
        _ => Ending::Gone,
    }
}

/// Sends our close frame and waits, briefly, for the peer's reply.
async fn close(ws: &mut WsStream, code: CloseCode, reason: &'static str) {
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    let handshake = async {
        if ws.close(Some(frame)).await.is_ok() {
            while let Some(Ok(_)) = ws.next().await {}
        }
    };
    let _ = timeout(CLOSE_TIMEOUT, handshake).await;
}
