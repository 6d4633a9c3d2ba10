//! The WebSocket transport: one task per connection that reads requests, writes the
//! session's outbox in batches, answers deferred calls, keeps the connection alive,
//! and closes it.
//!
//! The task is one poll loop over the socket, the outbox, the deferred replies and a
//! timer, so reading goes on while a write waits for a slow client: keepalive, the
//! write timeout and the client's own requests are never stuck behind its socket.
//! Nothing here ever waits on another client's socket: fan-out only touches queues.

use std::cell::Cell;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use chorus_hub::{CloseReason, Outgoing};
use futures_util::{Sink, Stream, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::time::{Instant, Sleep, sleep_until, timeout};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, Error as WsError};
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Bytes, Message};

use crate::app::{App, ConnectionSlot};
use crate::lazy_read::LazyRead;
use crate::lifecycle::Reason;
use crate::session::{Session, SessionEnd};

pub type WsStream = WebSocketStream<LazyRead<TokioIo<Upgraded>>>;

/// Stop adding frames to a batch past this many bytes, then flush.
const BATCH_BYTES: usize = 64 * 1024;
/// Inbound messages handled back to back before queued replies are written anyway.
/// Reading first lets one write carry the replies to everything a single read
/// brought in; the bound keeps a client that never pauses from starving its writer.
const READS_BEFORE_WRITE: u32 = 64;
/// How long the close handshake may take before the socket is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// The same for a socket that already stopped taking writes.
const STALLED_CLOSE_TIMEOUT: Duration = Duration::from_millis(500);
/// Echo mode stops reading while this many bytes wait to be echoed.
const ECHO_BACKLOG: usize = 1 << 20;

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

/// What one turn of the loop found.
enum Step {
    Inbound(Option<Result<Message, WsError>>),
    /// Frames were written; look at the socket again before writing more.
    Wrote,
    End(Ending),
    Tick,
}

struct Connection {
    ws: WsStream,
    app: Arc<App>,
    session: Option<Session>,
    echo: VecDeque<Message>,
    echo_bytes: usize,
    reads_in_row: u32,
    /// Frames fed to the socket since its last completed flush.
    unflushed: bool,
    /// When the socket last refused to take a write that is still pending.
    stalled_since: Option<Instant>,
    ping_due: bool,
    next_ping: Instant,
    last_heard: Instant,
    /// The token expiry (seconds since the Unix epoch) last converted, and its instant.
    expiry: Cell<(u64, Instant)>,
}

/// Serves one upgraded socket: JSON-RPC for `session`, echo without one.
///
/// Not an `async fn`: its arguments would stay in the future beside the `Connection`
/// built from them, and this future is most of an idle connection's memory.
pub fn run(
    ws: WsStream,
    app: Arc<App>,
    session: Option<Session>,
    slot: ConnectionSlot,
) -> impl Future<Output = ()> + Send {
    let now = Instant::now();
    let mut connection = Connection {
        ws,
        session,
        echo: VecDeque::new(),
        echo_bytes: 0,
        reads_in_row: 0,
        unflushed: false,
        stalled_since: None,
        ping_due: false,
        next_ping: now + app.config.transport.ping_interval,
        last_heard: now,
        expiry: Cell::new((0, now)),
        app,
    };
    // A block that uses `connection` in place: an `async fn` taking it would hold
    // its argument and the moved-in copy of it.
    async move {
        let ending = connection.serve().await;
        if let Some(session) = connection.session.take() {
            session.close(reason_for(&ending));
        }
        if let Ending::Close(code, reason) = ending {
            let patience = if connection.stalled_since.is_some() {
                STALLED_CLOSE_TIMEOUT
            } else {
                CLOSE_TIMEOUT
            };
            // Boxed: every connection's future would otherwise keep room for the
            // close handshake's timer and frame, needed once at the end.
            Box::pin(close(&mut connection.ws, code, reason, patience)).await;
        }
        drop(slot);
    }
}

impl Connection {
    async fn serve(&mut self) -> Ending {
        let mut timer = Box::pin(sleep_until(self.next_deadline()));
        loop {
            let step = poll_fn(|cx| self.poll_step(cx, timer.as_mut())).await;
            let outcome = match step {
                Step::Inbound(inbound) => self.on_inbound(inbound),
                Step::Wrote => Ok(()),
                Step::End(ending) => Err(ending),
                Step::Tick => self.on_tick(),
            };
            if let Err(ending) = outcome {
                return ending;
            }
        }
    }

    fn next_deadline(&self) -> Instant {
        let mut deadline = self.next_ping;
        if let Some(since) = self.stalled_since {
            deadline = deadline.min(since + self.app.config.transport.write_timeout);
        }
        if let Some(expiry) = self.expiry() {
            deadline = deadline.min(expiry);
        }
        deadline
    }

    /// When the connection's token expires, on this process's clock: converted once
    /// per token (`auth.refresh` brings a new one), so the deadline stays put.
    fn expiry(&self) -> Option<Instant> {
        let expires_at = self.session.as_ref()?.expires_at()?;
        let (converted_for, instant) = self.expiry.get();
        if converted_for == expires_at {
            return Some(instant);
        }
        let expiry = std::time::UNIX_EPOCH + Duration::from_secs(expires_at);
        let left = expiry
            .duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO);
        let instant = Instant::now() + left;
        self.expiry.set((expires_at, instant));
        Some(instant)
    }

    fn poll_step(&mut self, cx: &mut Context<'_>, mut timer: Pin<&mut Sleep>) -> Poll<Step> {
        if self.reads_in_row < READS_BEFORE_WRITE
            && self.can_read()
            && let Poll::Ready(inbound) = Pin::new(&mut self.ws).poll_next(cx)
        {
            self.reads_in_row += 1;
            return Poll::Ready(Step::Inbound(inbound));
        }
        self.reads_in_row = 0;
        if let Some(session) = &mut self.session {
            session.poll_deferred(cx);
        }
        match self.poll_write(cx) {
            Poll::Ready(Ok(())) => return Poll::Ready(Step::Wrote),
            Poll::Ready(Err(ending)) => return Poll::Ready(Step::End(ending)),
            Poll::Pending => {}
        }
        // A write that just stalled brings the deadline forward.
        let deadline = self.next_deadline();
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        if timer.poll(cx).is_ready() {
            return Poll::Ready(Step::Tick);
        }
        Poll::Pending
    }

    fn can_read(&self) -> bool {
        match &self.session {
            Some(session) => session.can_read(),
            None => self.echo_bytes < ECHO_BACKLOG,
        }
    }

    /// Feeds the socket what is queued, up to a batch, then flushes. Ready once a batch
    /// went out (there may be more); pending when everything is written or the socket
    /// is full (its waker, or the outbox's, is registered).
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Ending>> {
        let mut batch = 0;
        let mut sent = 0u64;
        let mut blocked = false;
        while batch < BATCH_BYTES {
            match Pin::new(&mut self.ws).poll_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(err)) => return Poll::Ready(Err(ending_for(&err))),
                Poll::Pending => {
                    blocked = true;
                    break;
                }
            }
            let message = if self.ping_due {
                self.ping_due = false;
                Message::Ping(Bytes::new())
            } else if let Some(message) = self.echo.pop_front() {
                self.echo_bytes -= message.len();
                sent += 1;
                message
            } else if let Some(session) = &mut self.session {
                match session.outbox.poll_next(cx) {
                    Poll::Ready(Outgoing::Frame(frame)) => {
                        sent += 1;
                        Message::Text(frame.into_text())
                    }
                    Poll::Ready(Outgoing::Close(reason)) => {
                        return Poll::Ready(Err(close_for(reason)));
                    }
                    Poll::Pending => break,
                }
            } else {
                break;
            };
            batch += message.len();
            if let Err(err) = Pin::new(&mut self.ws).start_send(message) {
                return Poll::Ready(Err(ending_for(&err)));
            }
            self.unflushed = true;
        }
        if sent > 0 {
            self.app.metrics.messages_sent.inc_by(sent);
        }
        if !self.unflushed && !blocked {
            return Poll::Pending;
        }
        match Pin::new(&mut self.ws).poll_flush(cx) {
            Poll::Ready(Ok(())) => {
                self.unflushed = false;
                self.stalled_since = None;
                // After a blocked socket drained, the outbox was not looked at: go round.
                if batch > 0 || blocked {
                    Poll::Ready(Ok(()))
                } else {
                    Poll::Pending
                }
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(ending_for(&err))),
            Poll::Pending => {
                self.stalled_since.get_or_insert_with(Instant::now);
                Poll::Pending
            }
        }
    }

    fn on_inbound(&mut self, inbound: Option<Result<Message, WsError>>) -> Result<(), Ending> {
        self.last_heard = Instant::now();
        let message = match inbound {
            Some(Ok(message)) => message,
            Some(Err(err)) => return Err(ending_for(&err)),
            None => return Err(Ending::Gone),
        };
        match (message, &mut self.session) {
            (Message::Text(text), Some(session)) => {
                self.app.metrics.messages_received.inc();
                session.handle_text(&text).map_err(|end| match end {
                    SessionEnd::Flooding => {
                        self.app.metrics.flood_closes.inc();
                        Ending::Close(CloseCode::Policy, "request flood")
                    }
                })
            }
            (Message::Binary(_), Some(_)) => Err(Ending::Close(
                CloseCode::Unsupported,
                "binary messages are not supported",
            )),
            (message @ (Message::Text(_) | Message::Binary(_)), None) => {
                self.app.metrics.messages_received.inc();
                self.echo_bytes += message.len();
                self.echo.push_back(message);
                Ok(())
            }
            // Pings are answered by tungstenite; pongs and closes only prove life.
            (Message::Ping(_) | Message::Pong(_) | Message::Close(_) | Message::Frame(_), _) => {
                Ok(())
            }
        }
    }

    fn on_tick(&mut self) -> Result<(), Ending> {
        let now = Instant::now();
        if self.expiry().is_some_and(|expiry| now >= expiry) {
            return Err(Ending::Close(CloseCode::Library(4001), "token expired"));
        }
        let transport = &self.app.config.transport;
        if self
            .stalled_since
            .is_some_and(|since| now >= since + transport.write_timeout)
        {
            self.app.metrics.slow_consumer_drops.inc();
            return Err(Ending::Close(CloseCode::Again, "write timeout"));
        }
        if now >= self.next_ping {
            if now.duration_since(self.last_heard) > transport.pong_timeout {
                return Err(Ending::Close(CloseCode::Policy, KEEPALIVE_TIMEOUT));
            }
            self.ping_due = true;
            self.next_ping = now + transport.ping_interval;
        }
        Ok(())
    }
}

/// Said when the keepalive gives up on a client.
const KEEPALIVE_TIMEOUT: &str = "keepalive timeout";

fn close_for(reason: CloseReason) -> Ending {
    match reason {
        CloseReason::SlowConsumer => Ending::Close(CloseCode::Again, "slow consumer"),
        CloseReason::Shutdown => Ending::Close(CloseCode::Away, "server shutting down"),
        CloseReason::Kicked => Ending::Close(CloseCode::Library(4003), "kicked"),
        CloseReason::Replaced => Ending::Close(CloseCode::Library(4002), "replaced"),
    }
}

/// Why the connection ended, as lifecycle events say it.
fn reason_for(ending: &Ending) -> Reason {
    match ending {
        Ending::Close(CloseCode::Library(4003), _) => Reason::Kicked,
        Ending::Close(CloseCode::Library(4002), _) => Reason::Replaced,
        Ending::Close(CloseCode::Away, _) => Reason::NodeShutdown,
        Ending::Close(CloseCode::Policy, KEEPALIVE_TIMEOUT) => Reason::KeepaliveTimeout,
        Ending::Close(..) | Ending::Gone => Reason::Disconnected,
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
async fn close(ws: &mut WsStream, code: CloseCode, reason: &'static str, patience: Duration) {
    let frame = CloseFrame {
        code,
        reason: reason.into(),
    };
    let handshake = async {
        if ws.close(Some(frame)).await.is_ok() {
            while let Some(Ok(_)) = ws.next().await {}
        }
    };
    let _ = timeout(patience, handshake).await;
}
