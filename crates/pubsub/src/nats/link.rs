//! What the NATS clients of Chorus share. The backbone ([`super::NatsBackbone`]), the
//! presence store ([`crate::presence::nats`]) and the history store
//! ([`crate::history::nats`]) each hold their own async-nats connection, made and
//! watched here:
//!
//! - [`connect`]: a URL or a comma-separated list of them, with the credentials it
//!   carries (async-nats 0.51 ignores URL credentials unless passed explicitly),
//!   reconnecting forever (at once, then 50 ms doubling up to 1 s), a PING every 5 s,
//!   and async-nats' events logged, the noisy ones throttled;
//! - connection state read from async-nats' state watch, which changes on every
//!   transition (its event channel may drop events under a burst), and
//!   [`Link::while_connected`] to fail fast: async-nats keeps requests in flight when
//!   the connection drops, and they only fail at their timeout;
//! - JetStream for the stores ([`Link`]): raw API requests (stream info, creation,
//!   purge), publishing with `Nats-Expected-Last-Subject-Sequence` and reading the
//!   PubAck, and direct get (the last message of a subject or wildcard, or of each of a
//!   list of subjects in one batch), each error sorted into what a store does about it ([`WriteError`],
//!   [`ReadError`], [`SetupError`]).
//!
//! Names: [`token_for`] writes any text as one subject token, [`name_for`] as part of
//! a stream or bucket name.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::context::{PublishErrorKind, RequestErrorKind};
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::{self, ErrorCode};
use async_nats::{Client, ConnectOptions, Event, HeaderMap, Request, ServerAddr, StatusCode};
use bytes::Bytes;
use serde::Deserialize;

use crate::{PubsubError, Throttle, redact_url};

const NAME: &str = "nats";

/// How long a TCP connect and handshake may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Client PINGs; two unanswered ones drop the connection (the default is 60 s).
pub(crate) const PING_INTERVAL: Duration = Duration::from_secs(5);
/// Reconnect backoff: at once, then 50 ms doubling up to 1 s, forever.
const RECONNECT_FIRST: Duration = Duration::from_millis(50);
const RECONNECT_MAX: Duration = Duration::from_secs(1);
/// How often a repeated warning (slow consumer, lost publications) is logged at most.
pub(crate) const LOG_EVERY: Duration = Duration::from_secs(10);
/// How long one JetStream request (or publish acknowledgement) may take.
pub(crate) const OP_TIMEOUT: Duration = Duration::from_secs(3);
/// How often the connection state is checked while waiting.
pub(crate) const WATCH_TICK: Duration = Duration::from_millis(20);

/// Compare-and-set on a subject: the sequence of its last message, 0 for none.
pub(crate) const EXPECTED_LAST_SUBJECT_SEQUENCE: &str = "Nats-Expected-Last-Subject-Sequence";
/// A message's own time to live (NATS 2.11+, on streams that allow it).
pub(crate) const MESSAGE_TTL: &str = "Nats-TTL";

/// Why a JetStream store cannot work at all on a server without it.
pub(crate) const NO_JETSTREAM: &str = "JetStream is not enabled on the NATS server";

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// Token standing for an empty text: a lone `%` is never produced by escaping, which
/// always writes `%` followed by two hex digits.
pub(crate) const EMPTY_TOKEN: &str = "%";

/// `text` as one subject token: `A-Z a-z 0-9 _ - : @ / =` as they are, any other byte
/// (`.` included) as `%XX` (upper-case hex), and `%` for the empty text. One-to-one,
/// never a wildcard, valid for any text.
pub(crate) fn token_for(text: &str) -> String {
    if text.is_empty() {
        return EMPTY_TOKEN.to_owned();
    }
    let mut token = String::with_capacity(text.len() + 4);
    for byte in text.bytes() {
        if is_plain(byte) {
            token.push(char::from(byte));
        } else {
            token.push('%');
            token.push(char::from(HEX[usize::from(byte >> 4)]));
            token.push(char::from(HEX[usize::from(byte & 0x0f)]));
        }
    }
    token
}

/// Bytes a subject token made by [`token_for`] keeps as they are.
pub(crate) fn is_plain(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'-' | b':' | b'@' | b'/' | b'=')
}

pub(crate) fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

/// `kind` followed by `text` with every byte other than `A-Z a-z 0-9 -` written as
/// `_XX` (upper-case hex): stream and bucket names allow `A-Z a-z 0-9 _ -` only, and
/// since `_` always starts an escape, two texts never share a name.
pub(crate) fn name_for(kind: &str, text: &str) -> String {
    let mut name = String::from(kind);
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' {
            name.push(char::from(byte));
        } else {
            name.push('_');
            name.push(char::from(HEX[usize::from(byte >> 4)]));
            name.push(char::from(HEX[usize::from(byte & 0x0f)]));
        }
    }
    name
}

/// Credentials embedded in a URL; async-nats 0.51 ignores them unless passed explicitly.
pub(crate) enum Credentials {
    UserPassword(String, String),
    Token(String),
}

/// The servers of a NATS address (`nats://[user:pass@|token@]host[:port]`,
/// `tls://...`, or a comma-separated list of them) and the credentials it carries,
/// without connecting.
pub(crate) fn parse_urls(url: &str) -> Result<(Vec<ServerAddr>, Option<Credentials>), PubsubError> {
    let invalid = |part: &str, why: &str| {
        PubsubError::InvalidUrl(format!("{}: {why}", redact_url(part.trim())))
    };
    let mut servers = Vec::new();
    let mut credentials = None;
    for part in url.split(',') {
        let part = part.trim();
        if part.is_empty() {
            return Err(invalid(url, "expected nats://host:port"));
        }
        let server: ServerAddr = part
            .parse()
            .map_err(|error: std::io::Error| invalid(part, &error.to_string()))?;
        if server.is_websocket() {
            return Err(invalid(
                part,
                "WebSocket URLs are not supported by this build",
            ));
        }
        if server.host().is_empty() {
            return Err(invalid(part, "the host is missing"));
        }
        if credentials.is_none() {
            credentials = match (server.username(), server.password()) {
                (Some(user), Some(password)) => Some(Credentials::UserPassword(
                    percent_decode(user),
                    percent_decode(password),
                )),
                (Some(token), None) => Some(Credentials::Token(percent_decode(token))),
                _ => None,
            };
        }
        servers.push(server);
    }
    Ok((servers, credentials))
}

/// Undoes URL percent-encoding in a user name or password; malformed escapes stay as is.
fn percent_decode(text: &str) -> String {
    let raw = text.as_bytes();
    let mut out = Vec::with_capacity(raw.len());
    let mut at = 0;
    while at < raw.len() {
        let escaped = match raw.get(at..at + 3) {
            Some(&[b'%', high, low]) => hex_value(high.to_ascii_uppercase())
                .zip(hex_value(low.to_ascii_uppercase()))
                .map(|(high, low)| (high << 4) | low),
            _ => None,
        };
        match escaped {
            Some(byte) => {
                out.push(byte);
                at += 3;
            }
            None => {
                out.push(raw[at]);
                at += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// async-nats counts attempts from 1 per server; its own default backs off to 4 s.
pub(crate) fn reconnect_delay(attempts: usize) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let doublings = u32::try_from(attempts - 2).unwrap_or(u32::MAX).min(16);
    RECONNECT_FIRST
        .saturating_mul(1 << doublings)
        .min(RECONNECT_MAX)
}

/// Which part of Chorus a connection serves: its client name and its log lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Role {
    Backbone,
    Presence,
    History,
}

impl Role {
    fn client_name(self) -> &'static str {
        match self {
            Self::Backbone => "chorus",
            Self::Presence => "chorus-presence",
            Self::History => "chorus-history",
        }
    }

    fn what(self) -> &'static str {
        match self {
            Self::Backbone => "backbone",
            Self::Presence => "presence store",
            Self::History => "history store",
        }
    }
}

/// How to connect, beyond the shared settings.
pub(crate) struct Options {
    pub(crate) role: Role,
    /// Messages async-nats buffers per subscription (its default is 65 536).
    pub(crate) subscription_capacity: Option<usize>,
    /// Counts messages async-nats dropped because a subscription's buffer was full.
    pub(crate) slow_consumers: Option<Arc<AtomicU64>>,
}

impl Options {
    pub(crate) fn new(role: Role) -> Self {
        Self {
            role,
            subscription_capacity: None,
            slow_consumers: None,
        }
    }
}

/// Starts connecting to the NATS server(s) at `url` and returns at once; async-nats
/// retries a server that is down forever. Fails only for a malformed URL.
pub(crate) async fn connect(url: &str, options: Options) -> Result<Client, PubsubError> {
    let (servers, credentials) = parse_urls(url)?;
    let events = Arc::new(EventLog {
        role: options.role,
        slow_consumers: options.slow_consumers,
        slow_throttle: Throttle::new(LOG_EVERY),
        client_errors: Throttle::new(LOG_EVERY),
    });
    let mut connect = ConnectOptions::new()
        .name(options.role.client_name())
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(CONNECT_TIMEOUT)
        .ping_interval(PING_INTERVAL)
        .reconnect_delay_callback(reconnect_delay)
        .event_callback(move |event| {
            let events = Arc::clone(&events);
            async move { events.record(event) }
        });
    if let Some(capacity) = options.subscription_capacity {
        connect = connect.subscription_capacity(capacity);
    }
    connect = match credentials {
        Some(Credentials::UserPassword(user, password)) => {
            connect.user_and_password(user, password)
        }
        Some(Credentials::Token(token)) => connect.token(token),
        None => connect,
    };
    connect
        .connect(servers)
        .await
        .map_err(|error| PubsubError::InvalidUrl(format!("{}: {error}", redact_url(url))))
}

/// Whether `client` holds a working connection now.
pub(crate) fn connected(client: &Client) -> bool {
    client.connection_state() == State::Connected
}

/// Counts `client`'s connections: it changes when the client reconnected.
pub(crate) fn connects(client: &Client) -> u64 {
    client.statistics().connects.load(Ordering::Acquire)
}

/// Logs async-nats' events. async-nats reports a slow consumer once per dropped
/// message (and logs each event at info itself, under the `async_nats` target).
struct EventLog {
    role: Role,
    slow_consumers: Option<Arc<AtomicU64>>,
    slow_throttle: Throttle,
    client_errors: Throttle,
}

impl EventLog {
    fn record(&self, event: Event) {
        if matches!(event, Event::SlowConsumer(_))
            && let Some(count) = &self.slow_consumers
        {
            count.fetch_add(1, Ordering::Relaxed);
        }
        match self.role {
            Role::Backbone => self.backbone(event),
            role => self.store(role.what(), event),
        }
    }

    fn backbone(&self, event: Event) {
        match event {
            Event::Connected => tracing::info!(adapter = NAME, "connected"),
            Event::Disconnected => tracing::warn!(adapter = NAME, "disconnected, reconnecting"),
            Event::SlowConsumer(_) => {
                if let Some(lost) = self.slow_throttle.record(1) {
                    tracing::warn!(
                        adapter = NAME,
                        lost,
                        "received messages lost: this replica reads them too slowly"
                    );
                }
            }
            Event::ClientError(error) => {
                // Repeats on every failed reconnect attempt.
                if let Some(count) = self.client_errors.record(1) {
                    tracing::warn!(adapter = NAME, %error, count, "client error");
                }
            }
            Event::ServerError(error) => tracing::warn!(adapter = NAME, %error, "server error"),
            Event::LameDuckMode => {
                tracing::info!(adapter = NAME, "server entering lame duck mode")
            }
            Event::Draining | Event::Closed => tracing::debug!(adapter = NAME, %event, "event"),
        }
    }

    fn store(&self, what: &str, event: Event) {
        match event {
            Event::Connected => tracing::info!(store = NAME, "{what} connected"),
            Event::Disconnected => {
                tracing::warn!(store = NAME, "{what} disconnected, reconnecting")
            }
            Event::ClientError(error) => {
                if let Some(count) = self.client_errors.record(1) {
                    tracing::warn!(store = NAME, %error, count, "{what} client error");
                }
            }
            Event::ServerError(error) => {
                tracing::warn!(store = NAME, %error, "{what} server error")
            }
            other => tracing::debug!(store = NAME, event = %other, "{what} event"),
        }
    }
}

/// What the JetStream API answers about a stream (the parts the stores use).
#[derive(Debug, Deserialize)]
pub(crate) struct StreamReply {
    #[serde(default)]
    pub(crate) error: Option<jetstream::Error>,
    #[serde(default)]
    pub(crate) config: Option<StreamConfigReply>,
    #[serde(default)]
    pub(crate) state: Option<StreamStateReply>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct StreamConfigReply {
    /// Whether messages may carry `Nats-TTL` (NATS 2.11+; older servers omit it).
    #[serde(default)]
    pub(crate) allow_msg_ttl: bool,
}

#[derive(Debug, Deserialize)]
pub(crate) struct StreamStateReply {
    pub(crate) last_seq: u64,
}

/// Why a store's stream could not be set up.
#[derive(Debug)]
pub(crate) enum SetupError {
    /// The server cannot hold it (no JetStream, over a limit): the operator must act.
    Unavailable(String),
    /// Try again (disconnected, timed out, a cluster electing a leader).
    Transient(String),
}

/// What a JetStream API error means for setting a stream up.
pub(crate) fn jetstream_refused(error: &jetstream::Error) -> SetupError {
    let code = error.error_code();
    let not_enabled = code == ErrorCode::JETSTREAM_NOT_ENABLED
        || code == ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT;
    if !not_enabled && error.code() == 503 {
        // Temporarily unavailable (say, a JetStream cluster electing a leader).
        SetupError::Transient(error.to_string())
    } else {
        // Not enabled, out of resources, over a limit: the operator must act.
        SetupError::Unavailable(error.to_string())
    }
}

fn request_failed(error: &jetstream::context::RequestError) -> SetupError {
    match error.kind() {
        RequestErrorKind::NoResponders => SetupError::Unavailable(NO_JETSTREAM.to_owned()),
        _ => SetupError::Transient(error.to_string()),
    }
}

/// Why a JetStream write did not happen.
#[derive(Debug)]
pub(crate) enum WriteError {
    /// A compare-and-set lost: the subject's last sequence was another.
    Conflict,
    /// No stream takes the subject (deleted, or JetStream gone).
    Gone,
    /// Disconnected or timed out.
    Unreachable,
    /// Refused for another reason (too large, a limit): the server's words.
    Refused(String),
}

/// Why a JetStream read did not happen.
#[derive(Debug)]
pub(crate) enum ReadError {
    /// The stream does not exist (or JetStream is gone).
    Gone,
    /// Disconnected or timed out.
    Unreachable,
    /// The server answered something else: its words.
    Refused(String),
}

/// Which message a direct get asks for.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Get<'a> {
    /// The last message of a subject (a wildcard takes the last of all it matches).
    Last(&'a str),
}

/// Which messages of a subject a purge removes.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Purge {
    /// All but the newest this many.
    Keep(u64),
    /// Those below this sequence.
    Below(u64),
}

/// A store's connection: the client and its JetStream context.
pub(crate) struct Link {
    client: Client,
    js: jetstream::Context,
}

impl Link {
    /// Starts connecting (see [`connect`]); JetStream requests time out after
    /// [`OP_TIMEOUT`].
    pub(crate) async fn connect(url: &str, role: Role) -> Result<Self, PubsubError> {
        let client = connect(url, Options::new(role)).await?;
        let js = jetstream::ContextBuilder::new()
            .timeout(OP_TIMEOUT)
            .build(client.clone());
        Ok(Self { client, js })
    }

    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    pub(crate) fn js(&self) -> &jetstream::Context {
        &self.js
    }

    pub(crate) fn connected(&self) -> bool {
        connected(&self.client)
    }

    pub(crate) fn connects(&self) -> u64 {
        connects(&self.client)
    }

    /// Resolves once the connection is seen down.
    pub(crate) async fn connection_lost(&self) {
        loop {
            tokio::time::sleep(WATCH_TICK).await;
            if !self.connected() {
                return;
            }
        }
    }

    /// Runs `work` unless the connection is down, and gives up on it as soon as the
    /// connection drops (async-nats would wait for its timeout): `None` then.
    pub(crate) async fn while_connected<T>(&self, work: impl Future<Output = T>) -> Option<T> {
        if !self.connected() {
            return None;
        }
        tokio::select! {
            biased;
            result = work => Some(result),
            () = self.connection_lost() => None,
        }
    }

    /// Asks the server about a stream; `Ok(None)` when it does not exist.
    pub(crate) async fn stream_info(
        &self,
        stream: &str,
    ) -> Result<Option<StreamReply>, SetupError> {
        let subject = format!("STREAM.INFO.{stream}");
        let reply: StreamReply = self
            .js
            .request(subject, &serde_json::json!({}))
            .await
            .map_err(|error| request_failed(&error))?;
        match &reply.error {
            None => Ok(Some(reply)),
            Some(error) if error.error_code() == ErrorCode::STREAM_NOT_FOUND => Ok(None),
            Some(error) => Err(jetstream_refused(error)),
        }
    }

    /// Creates the stream `config` describes; when it exists already (created meanwhile
    /// by another replica, perhaps with another config) answers what it is.
    pub(crate) async fn create_stream(
        &self,
        config: &serde_json::Value,
    ) -> Result<StreamReply, SetupError> {
        let name = config["name"].as_str().unwrap_or_default();
        let subject = format!("STREAM.CREATE.{name}");
        let reply: StreamReply = self
            .js
            .request(subject, config)
            .await
            .map_err(|error| request_failed(&error))?;
        match &reply.error {
            None => Ok(reply),
            Some(error) if error.error_code() == ErrorCode::STREAM_NAME_EXIST => {
                match self.stream_info(name).await? {
                    Some(reply) => Ok(reply),
                    None => Err(SetupError::Transient(format!("stream {name} vanished"))),
                }
            }
            Some(error) => Err(jetstream_refused(error)),
        }
    }

    /// Publishes to a stream and waits for its acknowledgement (a duplicate's
    /// acknowledgement says so and carries the first one's sequence).
    pub(crate) async fn publish(
        &self,
        subject: String,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<PublishAck, WriteError> {
        let failed = |error: &jetstream::context::PublishError| match error.kind() {
            PublishErrorKind::WrongLastSequence => WriteError::Conflict,
            PublishErrorKind::TimedOut | PublishErrorKind::BrokenPipe => WriteError::Unreachable,
            PublishErrorKind::StreamNotFound => WriteError::Gone,
            _ if !self.connected() => WriteError::Unreachable,
            _ => WriteError::Refused(error.to_string()),
        };
        let ack = self
            .js
            .publish_with_headers(subject, headers, payload)
            .await
            .map_err(|error| failed(&error))?;
        ack.await.map_err(|error| failed(&error))
    }

    /// A message of `stream` by direct get (the stream allows it); `Ok(None)` when
    /// there is none.
    pub(crate) async fn get(
        &self,
        stream: &str,
        get: Get<'_>,
    ) -> Result<Option<StreamMessage>, ReadError> {
        // The JSON form, which takes wildcards in `last_by_subj` (async-nats' builder
        // puts the subject into the request subject, where a wildcard cannot go).
        let body = match get {
            Get::Last(subject) => serde_json::json!({ "last_by_subj": subject }),
        };
        let request = Request::new()
            .payload(Bytes::from(body.to_string()))
            .timeout(Some(OP_TIMEOUT));
        let reply = self
            .client
            .send_request(format!("$JS.API.DIRECT.GET.{stream}"), request)
            .await
            .map_err(|error| match error.kind() {
                // Nobody serves direct gets of a stream that does not exist.
                async_nats::RequestErrorKind::NoResponders => ReadError::Gone,
                _ => ReadError::Unreachable,
            })?;
        match reply.status {
            Some(StatusCode::NOT_FOUND) => return Ok(None),
            Some(StatusCode::NO_RESPONDERS) => return Err(ReadError::Gone),
            Some(status) if status != StatusCode::OK => {
                let why = reply.description.as_deref().unwrap_or_default();
                return Err(if self.connected() {
                    ReadError::Refused(format!("{status} {why}"))
                } else {
                    ReadError::Unreachable
                });
            }
            _ => {}
        }
        StreamMessage::try_from(reply)
            .map(Some)
            .map_err(|error| ReadError::Refused(error.to_string()))
    }

    /// The last message of each of `subjects` (literal subjects: each is one index
    /// lookup) up to sequence `until`, oldest first, in one batched direct get
    /// (NATS 2.11+). The server may stop short (it bounds a reply's bytes): ask again
    /// for the rest.
    pub(crate) async fn get_last_of(
        &self,
        stream: &str,
        subjects: &[String],
        until: u64,
    ) -> Result<Vec<StreamMessage>, ReadError> {
        let batch = subjects.len();
        let body = serde_json::json!({
            "multi_last": subjects,
            "up_to_seq": until,
            "batch": batch,
        });
        use futures_util::StreamExt;
        let inbox = self.client.new_inbox();
        let mut replies = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|_| ReadError::Unreachable)?;
        self.client
            .publish_with_reply(
                format!("$JS.API.DIRECT.GET.{stream}"),
                inbox,
                Bytes::from(body.to_string()),
            )
            .await
            .map_err(|_| ReadError::Unreachable)?;
        let mut messages = Vec::new();
        let deadline = tokio::time::Instant::now() + OP_TIMEOUT;
        loop {
            let reply = match tokio::time::timeout_at(deadline, replies.next()).await {
                Ok(Some(reply)) => reply,
                Ok(None) | Err(_) => return Err(ReadError::Unreachable),
            };
            match reply.status {
                // End of batch, or nothing (more) to send.
                Some(status) if status.as_u16() == 204 || status == StatusCode::NOT_FOUND => break,
                Some(StatusCode::NO_RESPONDERS) => return Err(ReadError::Gone),
                Some(status) if status != StatusCode::OK => {
                    let why = reply.description.as_deref().unwrap_or_default();
                    return Err(ReadError::Refused(format!("{status} {why}")));
                }
                _ => {}
            }
            let message = StreamMessage::try_from(reply)
                .map_err(|error| ReadError::Refused(error.to_string()))?;
            messages.push(message);
            if messages.len() >= batch {
                break;
            }
        }
        Ok(messages)
    }

    /// Removes messages of `filter` (a subject or wildcard) from `stream`.
    pub(crate) async fn purge(
        &self,
        stream: &str,
        filter: &str,
        purge: Purge,
    ) -> Result<(), ReadError> {
        #[derive(Deserialize)]
        struct PurgeReply {
            #[serde(default)]
            error: Option<jetstream::Error>,
        }
        let body = match purge {
            Purge::Keep(keep) => serde_json::json!({ "filter": filter, "keep": keep }),
            Purge::Below(sequence) => serde_json::json!({ "filter": filter, "seq": sequence }),
        };
        let reply: PurgeReply = self
            .js
            .request(format!("STREAM.PURGE.{stream}"), &body)
            .await
            .map_err(|error| match error.kind() {
                RequestErrorKind::NoResponders => ReadError::Gone,
                _ => ReadError::Unreachable,
            })?;
        match reply.error {
            None => Ok(()),
            Some(error) if error.error_code() == ErrorCode::STREAM_NOT_FOUND => {
                Err(ReadError::Gone)
            }
            Some(error) => Err(ReadError::Refused(error.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_credentials_are_used_and_decoded() {
        let Ok((servers, Some(Credentials::UserPassword(user, password)))) =
            parse_urls("nats://me:p%40ss@h:4222")
        else {
            panic!("user and password are read");
        };
        assert_eq!(
            (servers.len(), user.as_str(), password.as_str()),
            (1, "me", "p@ss")
        );
        assert!(matches!(
            parse_urls("nats://s3cret@h"),
            Ok((_, Some(Credentials::Token(token)))) if token == "s3cret"
        ));
    }

    #[test]
    fn reconnect_backoff_is_capped_at_a_second() {
        assert_eq!(reconnect_delay(1), Duration::ZERO);
        assert_eq!(reconnect_delay(2), RECONNECT_FIRST);
        assert_eq!(reconnect_delay(3), RECONNECT_FIRST * 2);
        assert_eq!(reconnect_delay(100), RECONNECT_MAX);
        assert_eq!(reconnect_delay(usize::MAX), RECONNECT_MAX);
    }

    #[test]
    fn tokens_are_single_valid_and_distinct() {
        let names = [
            "",
            "a",
            "a.b",
            "a%2Eb",
            "%",
            "chat:room@1/x=y.z",
            "é *>",
            ".",
        ];
        let mut seen = std::collections::HashSet::new();
        for name in names {
            let token = token_for(name);
            assert!(!token.is_empty() && !token.contains('.'), "{token}");
            assert!(token != "*" && token != ">", "{token}");
            assert!(async_nats::Subject::validated(&token).is_ok(), "{token}");
            assert!(seen.insert(token), "{name:?} collides");
        }
        assert_eq!(token_for("a.b"), "a%2Eb");
        assert_eq!(token_for("chat:room@1/x=y"), "chat:room@1/x=y");
    }

    #[test]
    fn names_are_valid_and_distinct() {
        let texts = ["", "chorus", "a.b", "a_2Eb", "a:b", "A-z_0", "x.y:z-1"];
        let mut seen = std::collections::HashSet::new();
        for text in texts {
            let name = name_for("kind-", text);
            assert!(
                name.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                "{name}"
            );
            assert!(seen.insert(name), "{text:?} collides");
        }
        assert_eq!(name_for("kind-", "a.b"), "kind-a_2Eb");
    }
}
