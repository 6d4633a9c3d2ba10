//! The Server-Sent Events transport (protocol section 12): `GET /events` serves one
//! [`Session`], the same one a WebSocket has, as a `text/event-stream`.
//!
//! The request subscribes the session to the channels of its query (resuming from
//! `Last-Event-ID` or `?last_event_id=`) before the response starts. Then a task per
//! stream, like the WebSocket connection task, turns the session's outbox into events
//! and writes them into a [`Pipe`] that the response body reads: the task never waits
//! on the socket, so keepalive, token expiry and the write timeout run while it is
//! stuck. Each event's `data:` is the notification text a WebSocket client gets, and
//! events of channels with history carry an `id:` that resumes every channel.

use std::collections::HashSet;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use chorus_hub::{CloseReason, Frame, Outgoing};
use chorus_rpc::{Answer, notification};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Value, json};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep, sleep_until};

use crate::app::{App, ConnectionSlot};
use crate::http::{Admitted, Body, RouteBody, admit, json as json_response, open_session};
use crate::lifecycle::Reason;
use crate::session::Session;

/// Bytes the task may write ahead of the socket; past them it counts as stalled.
const PIPE_BYTES: usize = 64 * 1024;
/// Frames turned into events before the task looks at its timer again.
const BATCH_FRAMES: usize = 256;
/// Most channels one stream may name in its query.
const MAX_CHANNELS: usize = 64;

/// Lets an event stream drop its HTTP connection (a socket that takes no writes
/// cannot be closed by ending the response).
#[derive(Debug, Default)]
pub struct Abort(Notify);

impl Abort {
    fn request(&self) {
        self.0.notify_one();
    }

    pub async fn requested(&self) {
        self.0.notified().await;
    }
}

/// `GET /events`, with CORS for allowed origins on every answer.
pub async fn handle(
    app: Arc<App>,
    peer: SocketAddr,
    request: Request<Incoming>,
    abort: Arc<Abort>,
) -> Response<RouteBody> {
    let origin = request
        .headers()
        .get(header::ORIGIN)
        .and_then(|origin| origin.to_str().ok())
        .map(str::to_owned);
    let mut response = match open(&app, peer, &request, abort).await {
        Ok(stream) => stream,
        Err(refused) => refused.map(Either::Left),
    };
    if let Some(origin) = origin
        && app.config.transport.allowed_origins.allows(Some(&origin))
        && let Ok(value) = HeaderValue::from_str(&origin)
    {
        let headers = response.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
        headers.insert(header::VARY, HeaderValue::from_static("Origin"));
    }
    response
}

fn refusal(status: StatusCode, body: &Value) -> Response<Body> {
    json_response(status, body)
}

async fn open(
    app: &Arc<App>,
    peer: SocketAddr,
    request: &Request<Incoming>,
    abort: Arc<Abort>,
) -> Result<Response<RouteBody>, Response<Body>> {
    if request.method() == Method::OPTIONS {
        return Err(preflight(app, request));
    }
    if request.method() != Method::GET {
        return Err(refusal(
            StatusCode::METHOD_NOT_ALLOWED,
            &json!({"error": "event streams need GET"}),
        ));
    }
    let query = request.uri().query().unwrap_or("");
    let mut seen = HashSet::new();
    let channels: Vec<String> = chorus_gate::query_values(query, "channel")
        .into_iter()
        .filter(|channel| seen.insert(channel.clone()))
        .collect();
    if channels.is_empty() {
        return Err(refusal(
            StatusCode::BAD_REQUEST,
            &json!({"error": "name at least one channel: /events?channel=a&channel=b"}),
        ));
    }
    if channels.len() > MAX_CHANNELS {
        return Err(refusal(
            StatusCode::BAD_REQUEST,
            &json!({"error": "too many channels", "limit": MAX_CHANNELS}),
        ));
    }
    if let Some(bad) = channels
        .iter()
        .find(|channel| chorus_rpc::validate_channel(channel).is_err())
    {
        return Err(refusal(
            StatusCode::BAD_REQUEST,
            &json!({"error": "invalid channel name", "channel": bad}),
        ));
    }
    // EventSource sends the header itself on a reconnect: it wins over the query.
    let resume = request
        .headers()
        .get("last-event-id")
        .and_then(|value| value.to_str().ok())
        .map(str::to_owned)
        .or_else(|| {
            chorus_gate::query_values(query, "last_event_id")
                .into_iter()
                .next()
        })
        .map(|token| Positions::parse(&token))
        .unwrap_or_default();
    let Admitted {
        id,
        identity,
        client_ip,
        slot,
        forwarded,
    } = admit(app, peer, request).await?;
    // Grants first, so a refused stream never shows up in presence or lifecycle events.
    for channel in &channels {
        if let Err(refused) = app.services.gate.admit_read(&identity, channel) {
            return Err(refusal(
                StatusCode::FORBIDDEN,
                &json!({"error": refused.to_string(), "channel": channel}),
            ));
        }
    }
    let session = open_session(app, id, identity, client_ip, forwarded).await;
    for (index, channel) in channels.iter().enumerate() {
        let mut params = json!({ "channel": channel });
        if let Some(position) = resume.get(channel) {
            params["since"] = json!({"offset": position.offset, "epoch": position.epoch});
        }
        let call = json!({"jsonrpc": "2.0", "id": index, "method": "subscribe", "params": params});
        let answer = session.call(&call.to_string()).await;
        if let Err((status, body)) = subscribed(app, &session, channel, answer) {
            session.close(Reason::Disconnected);
            return Err(refusal(status, &body));
        }
    }
    let pipe = Pipe::default();
    let body = EventStream { pipe: pipe.clone() };
    tokio::spawn(run(Arc::clone(app), session, pipe, slot, abort));
    let mut response = Response::new(Either::Right(body));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Proxies (nginx) must pass every event on as it comes.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// A CORS preflight, for clients that send the token in `Authorization` (or
/// `Last-Event-ID` themselves) from another origin: allowed origins get 204 (the
/// origin header itself is added by [`handle`]), others 403.
fn preflight(app: &App, request: &Request<Incoming>) -> Response<Body> {
    let origin = request
        .headers()
        .get(header::ORIGIN)
        .and_then(|origin| origin.to_str().ok());
    if origin.is_none() || !app.config.transport.allowed_origins.allows(origin) {
        return refusal(
            StatusCode::FORBIDDEN,
            &json!({"error": "origin not allowed"}),
        );
    }
    let mut response = Response::new(Body::default());
    *response.status_mut() = StatusCode::NO_CONTENT;
    let headers = response.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET"),
    );
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("authorization, last-event-id"),
    );
    headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    response
}

#[derive(Deserialize)]
struct SubscribeReply<'a> {
    #[serde(borrow)]
    result: Option<SubscribeResult<'a>>,
    error: Option<ReplyError>,
}

#[derive(Deserialize)]
struct SubscribeResult<'a> {
    offset: Option<u64>,
    epoch: Option<String>,
    recovered: Option<bool>,
    #[serde(borrow, default)]
    publications: Vec<Publication<'a>>,
}

#[derive(Deserialize)]
struct Publication<'a> {
    offset: u64,
    #[serde(borrow)]
    data: &'a RawValue,
}

#[derive(Deserialize)]
struct ReplyError {
    code: i64,
    message: String,
    data: Option<Value>,
}

/// Queues `sys.subscribed` and the recovered publications of one channel, then lets
/// live delivery follow (the answer's effects); or says why the stream is refused.
fn subscribed(
    app: &App,
    session: &Session,
    channel: &str,
    answer: Answer,
) -> Result<(), (StatusCode, Value)> {
    let unavailable = || {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"error": "cannot subscribe now", "channel": channel}),
        )
    };
    let text = answer.text.as_deref().ok_or_else(unavailable)?;
    let reply: SubscribeReply<'_> = serde_json::from_str(text).map_err(|_| unavailable())?;
    let client = session.client();
    match (reply.result, reply.error) {
        (Some(result), _) => {
            let mut params = json!({ "channel": channel });
            if let (Some(offset), Some(epoch)) = (result.offset, result.epoch) {
                params["offset"] = offset.into();
                params["epoch"] = epoch.into();
                params["recovered"] = result.recovered.unwrap_or(false).into();
            }
            let _ = client.send(notification::value("sys.subscribed", &params));
            let overflow = app.node.overflow(channel);
            for publication in result.publications {
                let _ = client.send(crate::history::message_frame(
                    channel,
                    publication.offset,
                    publication.data.get().as_bytes(),
                    overflow,
                ));
            }
            for effect in answer.effects {
                effect();
            }
            Ok(())
        }
        (None, Some(error)) => {
            let status = match error.code {
                -32003 => StatusCode::FORBIDDEN,
                -32602 => StatusCode::BAD_REQUEST,
                -32029 => StatusCode::TOO_MANY_REQUESTS,
                -32053
                    if error
                        .data
                        .as_ref()
                        .is_some_and(|data| data["subscribed"] == "local") =>
                {
                    // The backbone is down: local delivery works, as for a WebSocket.
                    let params = json!({"channel": channel, "subscribed": "local"});
                    let _ = client.send(notification::value("sys.subscribed", &params));
                    return Ok(());
                }
                _ => StatusCode::SERVICE_UNAVAILABLE,
            };
            let mut body = json!({"error": error.message, "channel": channel});
            if let Some(Value::Object(data)) = error.data {
                for (key, value) in data {
                    body[key] = value;
                }
            }
            Err((status, body))
        }
        (None, None) => Err(unavailable()),
    }
}

/// Where each history channel of a stream stands: what its `id:` says.
#[derive(Debug, Default, PartialEq, Eq)]
struct Positions(Vec<Position>);

#[derive(Debug, PartialEq, Eq)]
struct Position {
    channel: String,
    offset: u64,
    epoch: String,
}

impl Positions {
    /// `channel~offset~epoch`, comma separated. Channel names never hold `~` or `,`;
    /// an unreadable token resumes nothing (each channel then says `recovered: false`
    /// only if it was asked to recover, so nothing is claimed that was not checked).
    fn parse(token: &str) -> Self {
        let mut positions = Vec::new();
        for entry in token.split(',').filter(|entry| !entry.is_empty()) {
            let mut parts = entry.splitn(3, '~');
            let (Some(channel), Some(offset), Some(epoch)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            if let Ok(offset) = offset.parse() {
                positions.push(Position {
                    channel: channel.to_owned(),
                    offset,
                    epoch: epoch.to_owned(),
                });
            }
        }
        Self(positions)
    }

    fn get(&self, channel: &str) -> Option<&Position> {
        self.0.iter().find(|position| position.channel == channel)
    }

    fn set(&mut self, channel: &str, offset: u64, epoch: Option<&str>) -> bool {
        if let Some(position) = self.0.iter_mut().find(|p| p.channel == channel) {
            position.offset = offset;
            if let Some(epoch) = epoch {
                epoch.clone_into(&mut position.epoch);
            }
            return true;
        }
        let Some(epoch) = epoch.filter(|epoch| usable_epoch(epoch)) else {
            return false;
        };
        self.0.push(Position {
            channel: channel.to_owned(),
            offset,
            epoch: epoch.to_owned(),
        });
        true
    }

    fn write(&self, out: &mut BytesMut) {
        for (index, position) in self.0.iter().enumerate() {
            if index > 0 {
                out.extend_from_slice(b",");
            }
            let _ = write!(
                out,
                "{}~{}~{}",
                position.channel, position.offset, position.epoch
            );
        }
    }
}

/// An epoch that can travel in an event id (stores make hex or decimal ones).
fn usable_epoch(epoch: &str) -> bool {
    !epoch.is_empty()
        && epoch
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

/// The bytes between the stream task and the response body.
#[derive(Clone, Default)]
struct Pipe(Arc<Mutex<PipeState>>);

#[derive(Default)]
struct PipeState {
    buffer: BytesMut,
    /// The task wrote its last event.
    finished: bool,
    /// The body is gone: the client left.
    reader_gone: bool,
    reader: Option<Waker>,
    writer: Option<Waker>,
}

impl Pipe {
    fn lock(&self) -> MutexGuard<'_, PipeState> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Ready when there is room for more; an error once the client is gone. The task
    /// stays registered either way, so that the body going away wakes it.
    fn poll_room(&self, cx: &mut Context<'_>) -> Poll<Result<(), Gone>> {
        let mut state = self.lock();
        if state.reader_gone {
            return Poll::Ready(Err(Gone));
        }
        if !state
            .writer
            .as_ref()
            .is_some_and(|writer| writer.will_wake(cx.waker()))
        {
            state.writer = Some(cx.waker().clone());
        }
        if state.buffer.len() < PIPE_BYTES {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    }

    fn write(&self, event: impl FnOnce(&mut BytesMut)) {
        let mut state = self.lock();
        event(&mut state.buffer);
        if let Some(reader) = state.reader.take() {
            reader.wake();
        }
    }

    fn finish(&self) {
        let mut state = self.lock();
        state.finished = true;
        if let Some(reader) = state.reader.take() {
            reader.wake();
        }
    }
}

struct Gone;

/// The response body: whatever the stream task wrote, as it comes.
pub struct EventStream {
    pipe: Pipe,
}

impl hyper::body::Body for EventStream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        let mut state = self.pipe.lock();
        if !state.buffer.is_empty() {
            let was_full = state.buffer.len() >= PIPE_BYTES;
            let bytes = state.buffer.split().freeze();
            if was_full && let Some(writer) = state.writer.take() {
                writer.wake();
            }
            return Poll::Ready(Some(Ok(hyper::body::Frame::data(bytes))));
        }
        if state.finished {
            return Poll::Ready(None);
        }
        state.reader = Some(cx.waker().clone());
        Poll::Pending
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        let mut state = self.pipe.lock();
        state.reader_gone = true;
        if let Some(writer) = state.writer.take() {
            writer.wake();
        }
    }
}

/// How a stream ended.
enum Ending {
    /// The session was closed (kick, replacement, drain, slow consumer).
    Closed(CloseReason),
    /// The client left.
    Gone,
    /// The token expired.
    Expired,
    /// The socket took no write for `WS_WRITE_TIMEOUT`.
    Stalled,
}

enum Step {
    Wrote,
    End(Ending),
    Tick,
}

struct Stream {
    app: Arc<App>,
    session: Session,
    pipe: Pipe,
    positions: Positions,
    last_write: Instant,
    stalled_since: Option<Instant>,
    /// The token expiry last converted (seconds since the Unix epoch), and its instant.
    expiry: Option<(u64, Instant)>,
}

async fn run(app: Arc<App>, session: Session, pipe: Pipe, slot: ConnectionSlot, abort: Arc<Abort>) {
    let mut stream = Stream {
        app,
        session,
        pipe,
        positions: Positions::default(),
        last_write: Instant::now(),
        stalled_since: None,
        expiry: None,
    };
    let ending = stream.serve().await;
    let reason = match ending {
        Ending::Closed(CloseReason::Kicked) => Reason::Kicked,
        Ending::Closed(CloseReason::Replaced) => Reason::Replaced,
        Ending::Closed(CloseReason::Shutdown) => Reason::NodeShutdown,
        Ending::Closed(CloseReason::SlowConsumer)
        | Ending::Gone
        | Ending::Expired
        | Ending::Stalled => Reason::Disconnected,
    };
    let Stream { session, pipe, .. } = stream;
    session.close(reason);
    match ending {
        // Nothing more can be written: drop the socket rather than wait for it.
        Ending::Stalled | Ending::Closed(CloseReason::SlowConsumer) => abort.request(),
        _ => pipe.finish(),
    }
    drop(slot);
}

impl Stream {
    async fn serve(&mut self) -> Ending {
        let mut timer = Box::pin(sleep_until(self.next_deadline()));
        loop {
            match poll_fn(|cx| self.poll_step(cx, timer.as_mut())).await {
                Step::Wrote => {}
                Step::End(ending) => return ending,
                Step::Tick => {
                    if let Err(ending) = self.on_tick() {
                        return ending;
                    }
                }
            }
        }
    }

    fn next_deadline(&mut self) -> Instant {
        let transport = &self.app.config.transport;
        let mut deadline = self.last_write + transport.ping_interval;
        if let Some(since) = self.stalled_since {
            deadline = deadline.min(since + transport.write_timeout);
        }
        if let Some(expiry) = self.expiry() {
            deadline = deadline.min(expiry);
        }
        deadline
    }

    /// When the token expires, on this process's clock (converted once per token).
    fn expiry(&mut self) -> Option<Instant> {
        let expires_at = self.session.expires_at()?;
        if let Some((converted_for, instant)) = self.expiry
            && converted_for == expires_at
        {
            return Some(instant);
        }
        let expiry = std::time::UNIX_EPOCH + Duration::from_secs(expires_at);
        let left = expiry
            .duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO);
        let instant = Instant::now() + left;
        self.expiry = Some((expires_at, instant));
        Some(instant)
    }

    fn poll_step(&mut self, cx: &mut Context<'_>, mut timer: Pin<&mut Sleep>) -> Poll<Step> {
        match self.poll_write(cx) {
            Poll::Ready(Ok(())) => return Poll::Ready(Step::Wrote),
            Poll::Ready(Err(ending)) => return Poll::Ready(Step::End(ending)),
            Poll::Pending => {}
        }
        let deadline = self.next_deadline();
        if timer.deadline() != deadline {
            timer.as_mut().reset(deadline);
        }
        if timer.poll(cx).is_ready() {
            return Poll::Ready(Step::Tick);
        }
        Poll::Pending
    }

    /// Turns queued frames into events while the pipe has room. Ready after a batch.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Ending>> {
        let mut sent = 0;
        while sent < BATCH_FRAMES {
            match self.pipe.poll_room(cx) {
                Poll::Ready(Ok(())) => self.stalled_since = None,
                Poll::Ready(Err(Gone)) => return Poll::Ready(Err(Ending::Gone)),
                Poll::Pending => {
                    self.stalled_since.get_or_insert_with(Instant::now);
                    break;
                }
            }
            match self.session.outbox.poll_next(cx) {
                Poll::Ready(Outgoing::Frame(frame)) => {
                    self.write_event(&frame);
                    sent += 1;
                }
                Poll::Ready(Outgoing::Close(reason)) => {
                    return Poll::Ready(Err(Ending::Closed(reason)));
                }
                Poll::Pending => break,
            }
        }
        if sent == 0 {
            return Poll::Pending;
        }
        self.app.metrics.messages_sent.inc_by(sent as u64);
        self.last_write = Instant::now();
        Poll::Ready(Ok(()))
    }

    fn on_tick(&mut self) -> Result<(), Ending> {
        let now = Instant::now();
        if self.expiry().is_some_and(|expiry| now >= expiry) {
            let notice = notification::raw("sys.token_expired", "{}");
            self.write_event(&notice);
            return Err(Ending::Expired);
        }
        let transport = &self.app.config.transport;
        if self
            .stalled_since
            .is_some_and(|since| now >= since + transport.write_timeout)
        {
            self.app.metrics.slow_consumer_drops.inc();
            return Err(Ending::Stalled);
        }
        if now >= self.last_write + transport.ping_interval {
            // A comment: EventSource ignores it, proxies see a live connection.
            if self.stalled_since.is_none() {
                self.pipe
                    .write(|out| out.extend_from_slice(b": keepalive\n\n"));
            }
            self.last_write = now;
        }
        Ok(())
    }

    /// One frame as one event: `event:` its method, `id:` when a history channel's
    /// position moved, `retry:` on `sys.shutdown`, `data:` its text.
    fn write_event(&mut self, frame: &Frame) {
        let text = frame.as_str();
        let method = method_of(text);
        let mut retry = None;
        let mut moved = false;
        match method {
            Some("sys.shutdown") => {
                retry = params_of(text).and_then(|p| p["reconnect_after_ms"].as_u64());
            }
            Some("sys.subscribed" | "sys.gap") => {
                if let Some(params) = params_of(text)
                    && let Some(channel) = params["channel"].as_str()
                    && let Some(epoch) = params["epoch"].as_str()
                {
                    // `sys.gap` with an epoch: offsets start over in the new one.
                    let offset = params["offset"].as_u64().unwrap_or(0);
                    moved = self.positions.set(channel, offset, Some(epoch));
                }
            }
            _ => {
                if let Some(tag) = frame.tag().filter(|tag| tag.offset > 0) {
                    moved = self.positions.set(&tag.channel, tag.offset, None);
                }
            }
        }
        let positions = &self.positions;
        self.pipe.write(|out| {
            out.reserve(text.len() + 64);
            if let Some(retry) = retry {
                let _ = writeln!(out, "retry: {retry}");
            }
            if let Some(method) = method {
                let _ = writeln!(out, "event: {method}");
            }
            if moved {
                out.extend_from_slice(b"id: ");
                positions.write(out);
                out.extend_from_slice(b"\n");
            }
            // A raw newline can only be JSON whitespace (publishers' own formatting):
            // each line gets its own `data:`, and EventSource joins them with `\n`.
            for line in text.split('\n') {
                out.extend_from_slice(b"data: ");
                out.extend_from_slice(line.trim_end_matches('\r').as_bytes());
                out.extend_from_slice(b"\n");
            }
            out.extend_from_slice(b"\n");
        });
    }
}

/// The method of a notification as Chorus writes them, without parsing the rest.
fn method_of(text: &str) -> Option<&str> {
    let rest = text.strip_prefix(r#"{"jsonrpc":"2.0","method":""#)?;
    let end = rest.find('"')?;
    Some(&rest[..end])
}

fn params_of(text: &str) -> Option<Value> {
    let mut value: Value = serde_json::from_str(text).ok()?;
    Some(value["params"].take())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip() {
        let mut positions = Positions::default();
        assert!(positions.set("items:1", 3, Some("abc123")));
        assert!(positions.set("a/b=c@d", 0, Some("ff")));
        assert!(positions.set("items:1", 4, None));
        assert!(!positions.set("other", 9, None), "no epoch known yet");
        let mut out = BytesMut::new();
        positions.write(&mut out);
        let token = String::from_utf8(out.to_vec()).expect("text");
        assert_eq!(token, "items:1~4~abc123,a/b=c@d~0~ff");
        assert_eq!(Positions::parse(&token), positions);
        assert_eq!(Positions::parse("garbage,,x~y~z"), Positions::default());
    }

    #[test]
    fn the_method_is_read_from_the_frame_head() {
        let frame = notification::raw("sys.connected", "{}");
        assert_eq!(method_of(frame.as_str()), Some("sys.connected"));
        assert_eq!(method_of(r#"{"jsonrpc":"2.0","id":1,"result":1}"#), None);
    }
}
