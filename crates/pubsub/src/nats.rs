//! The NATS backbone: topics are NATS subjects (encoded, see [`subject_for`]), reached
//! with `async-nats` over one connection that reconnects forever.
//!
//! Work is done by the adapter's own tasks, fed by bounded queues:
//! - the publisher task hands publications to async-nats one by one, so one topic's
//!   messages leave in order (async-nats writes its queue in order, flushing as it goes);
//!   a flush request in the queue is answered once async-nats has written everything
//!   before it to the socket;
//! - the subscription task applies (un)subscriptions in the order they were asked for,
//!   and starts one forwarding task per held topic that hands its messages to the
//!   `incoming` channel, waiting when it is full;
//! - async-nats itself re-sends SUB for every live subscription after a reconnect, and
//!   queues subscriptions made while disconnected, so nothing here re-subscribes.
//!
//! NATS does not acknowledge a SUB. To know the server holds a subscription, the
//! subscription task then publishes a marker to a private inbox it subscribes to: the
//! server handles one connection's messages in order, so when the marker comes back,
//! every SUB sent before it is in place.
//!
//! Connection state is read from async-nats' state watch rather than from a flag kept by
//! the event callback: async-nats sends events with `try_send` into a 128-slot channel,
//! so a burst of slow-consumer events can crowd out a Connected or Disconnected event,
//! while the watch is updated on every transition. The callback logs and counts.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::{Client, ConnectOptions, Event, ServerAddr, Subscriber};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};

use crate::{AbortOnDrop, Backbone, Held, Incoming, Pending, PubsubError, Throttle, redact_url};

const NAME: &str = "nats";

/// Publications waiting for the publisher task; more are refused as `Backlogged`.
const PUBLISH_QUEUE: usize = 8192;
/// (Un)subscriptions waiting for the subscription task.
const SUBSCRIPTION_QUEUE: usize = 4096;
/// Messages async-nats buffers per subscription before it drops them as a slow consumer
/// (its default, 65 536, can hold a lot of memory per topic).
const SUBSCRIPTION_CAPACITY: usize = 4096;
/// How long a TCP connect and handshake may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Client PINGs; two unanswered ones drop the connection (the default is 60 s).
pub(crate) const PING_INTERVAL: Duration = Duration::from_secs(5);
/// Reconnect backoff: at once, then 50 ms doubling up to 1 s, forever.
const RECONNECT_FIRST: Duration = Duration::from_millis(50);
const RECONNECT_MAX: Duration = Duration::from_secs(1);
/// How often a repeated warning (slow consumer, lost publications) is logged at most.
pub(crate) const LOG_EVERY: Duration = Duration::from_secs(10);
/// (Un)subscriptions applied together, then confirmed by one marker.
const SUBSCRIPTION_BATCH: usize = 512;
/// How long a marker may take to come back before the subscriptions it would confirm
/// are reported as not held.
const MARKER_TIMEOUT: Duration = Duration::from_secs(5);

/// Token standing for an empty token (`a..b`, `x.`): a lone `%` is never produced by
/// escaping, which always writes `%` followed by two hex digits.
const EMPTY_TOKEN: &str = "%";
const HEX: &[u8; 16] = b"0123456789ABCDEF";

enum SubscriptionOp {
    /// Subscribe, and say on the sender once the server holds it.
    Subscribe(String, oneshot::Sender<bool>),
    Unsubscribe(String),
}

/// What the publisher task is asked to do, in order.
enum Outbound {
    Publish(String, Bytes),
    /// Answer once everything queued before has been written.
    Flush(oneshot::Sender<()>),
}

/// Counters of what the adapter had to give up on.
#[derive(Default)]
struct Losses {
    /// Received messages async-nats dropped because a subscription's buffer was full.
    received: AtomicU64,
    /// Accepted publications that never reached async-nats (connection lost, too large).
    published: AtomicU64,
}

/// A replica's connection to a NATS server (or cluster) used as the cluster backbone.
pub struct NatsBackbone {
    client: Client,
    publications: mpsc::Sender<Outbound>,
    subscriptions: mpsc::Sender<SubscriptionOp>,
    losses: Arc<Losses>,
    _tasks: Vec<AbortOnDrop>,
}

impl std::fmt::Debug for NatsBackbone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBackbone")
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

/// The NATS subject for a Chorus topic.
///
/// NATS splits subjects into tokens at `.`, refuses empty tokens and whitespace, and
/// treats `*` and `>` tokens as wildcards. Chorus channel names are 1 to 255 bytes of
/// `A-Z a-z 0-9 _ - : . @ / =` and may hold `a..b` or end with `.`. So the topic is
/// split at `.`, each token keeps `A-Z a-z 0-9 _ - : @ / =` and writes any other byte
/// as `%XX` (upper-case hex), and an empty token becomes `%`. Dots stay token
/// separators, so `websocket.broadcast` is still that subject and wildcards can watch a
/// prefix; the mapping is one-to-one, and valid for any topic, not only channel names.
pub fn subject_for(topic: &str) -> String {
    let mut subject = String::with_capacity(topic.len() + 4);
    for (index, token) in topic.split('.').enumerate() {
        if index > 0 {
            subject.push('.');
        }
        if token.is_empty() {
            subject.push_str(EMPTY_TOKEN);
            continue;
        }
        for byte in token.bytes() {
            if is_plain(byte) {
                subject.push(char::from(byte));
            } else {
                subject.push('%');
                subject.push(char::from(HEX[usize::from(byte >> 4)]));
                subject.push(char::from(HEX[usize::from(byte & 0x0f)]));
            }
        }
    }
    subject
}

fn is_plain(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'-' | b':' | b'@' | b'/' | b'=')
}

/// The topic a subject made by [`subject_for`] stands for; `None` for other subjects.
pub fn topic_for(subject: &str) -> Option<String> {
    let mut topic = Vec::with_capacity(subject.len());
    for (index, token) in subject.split('.').enumerate() {
        if index > 0 {
            topic.push(b'.');
        }
        if token == EMPTY_TOKEN {
            continue;
        }
        if token.is_empty() {
            return None;
        }
        let mut bytes = token.bytes();
        while let Some(byte) = bytes.next() {
            if byte == b'%' {
                let high = hex_value(bytes.next()?)?;
                let low = hex_value(bytes.next()?)?;
                let decoded = (high << 4) | low;
                if is_plain(decoded) {
                    return None; // never escaped, so not ours
                }
                topic.push(decoded);
            } else if is_plain(byte) {
                topic.push(byte);
            } else {
                return None;
            }
        }
    }
    String::from_utf8(topic).ok()
}

fn hex_value(digit: u8) -> Option<u8> {
    match digit {
        b'0'..=b'9' => Some(digit - b'0'),
        b'A'..=b'F' => Some(digit - b'A' + 10),
        _ => None,
    }
}

/// Credentials embedded in a URL; async-nats 0.51 ignores them unless passed explicitly.
pub(crate) enum Credentials {
    UserPassword(String, String),
    Token(String),
}

/// Checks that `url` is a NATS address this adapter can use
/// (`nats://[user:pass@|token@]host[:port]`, `tls://...`, or a comma-separated list of
/// them for a cluster), without connecting.
pub fn validate_url(url: &str) -> Result<(), PubsubError> {
    parse_urls(url).map(|_| ())
}

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

impl NatsBackbone {
    /// Starts connecting to the NATS server(s) at `url` and returns at once; messages on
    /// subscribed topics go to `incoming`.
    ///
    /// Fails only for a malformed URL. A server that is down is retried forever: the
    /// adapter reports itself disconnected until it gets through.
    pub async fn connect(url: &str, incoming: mpsc::Sender<Incoming>) -> Result<Self, PubsubError> {
        let (servers, credentials) = parse_urls(url)?;
        let losses = Arc::new(Losses::default());
        let events = EventLog {
            losses: Arc::clone(&losses),
            slow_consumers: Throttle::new(LOG_EVERY),
            client_errors: Throttle::new(LOG_EVERY),
        };
        let events = Arc::new(events);
        let mut options = ConnectOptions::new()
            .name("chorus")
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(CONNECT_TIMEOUT)
            .ping_interval(PING_INTERVAL)
            .subscription_capacity(SUBSCRIPTION_CAPACITY)
            .reconnect_delay_callback(reconnect_delay)
            .event_callback(move |event| {
                let events = Arc::clone(&events);
                async move { events.record(event) }
            });
        options = match credentials {
            Some(Credentials::UserPassword(user, password)) => {
                options.user_and_password(user, password)
            }
            Some(Credentials::Token(token)) => options.token(token),
            None => options,
        };
        let client = options
            .connect(servers)
            .await
            .map_err(|error| PubsubError::InvalidUrl(format!("{}: {error}", redact_url(url))))?;

        let (publications, publication_rx) = mpsc::channel(PUBLISH_QUEUE);
        let (subscriptions, subscription_rx) = mpsc::channel(SUBSCRIPTION_QUEUE);
        let tasks = vec![
            spawn(publish_loop(
                client.clone(),
                publication_rx,
                Arc::clone(&losses),
            )),
            spawn(subscription_loop(client.clone(), subscription_rx, incoming)),
        ];
        Ok(Self {
            client,
            publications,
            subscriptions,
            losses,
            _tasks: tasks,
        })
    }

    /// Waits until the connection is up, for at most `timeout`; returns whether it is.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.is_connected() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    fn enqueue<T>(queue: &mpsc::Sender<T>, item: T) -> Result<(), PubsubError> {
        queue.try_send(item).map_err(|error| match error {
            mpsc::error::TrySendError::Full(_) => PubsubError::Backlogged(NAME),
            mpsc::error::TrySendError::Closed(_) => PubsubError::Stopped(NAME),
        })
    }
}

impl Backbone for NatsBackbone {
    fn adapter(&self) -> &'static str {
        NAME
    }

    fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    fn publish(&self, topic: &str, payload: Bytes) -> Result<(), PubsubError> {
        if !self.is_connected() {
            return Err(PubsubError::Disconnected(NAME));
        }
        Self::enqueue(
            &self.publications,
            Outbound::Publish(subject_for(topic), payload),
        )
    }

    fn subscribe(&self, topic: &str) -> Result<Held, PubsubError> {
        let (held, answer) = oneshot::channel();
        Self::enqueue(
            &self.subscriptions,
            SubscriptionOp::Subscribe(topic.to_owned(), held),
        )?;
        Ok(answer)
    }

    fn unsubscribe(&self, topic: &str) -> Result<(), PubsubError> {
        Self::enqueue(
            &self.subscriptions,
            SubscriptionOp::Unsubscribe(topic.to_owned()),
        )
    }

    fn generation(&self) -> u64 {
        self.client.statistics().connects.load(Ordering::Acquire)
    }

    fn flush(&self) -> Pending {
        let (done, flushed) = oneshot::channel();
        let queued = self.publications.clone();
        Box::pin(async move {
            if queued.send(Outbound::Flush(done)).await.is_ok() {
                let _ = flushed.await;
            }
        })
    }

    fn dropped_published(&self) -> u64 {
        self.losses.published.load(Ordering::Relaxed)
    }

    fn dropped_received(&self) -> u64 {
        self.losses.received.load(Ordering::Relaxed)
    }
}

fn spawn<F>(task: F) -> AbortOnDrop
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    AbortOnDrop(tokio::spawn(task).abort_handle())
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

/// What the event callback needs: async-nats reports a slow consumer once per dropped
/// message (and logs each event at info itself, under the `async_nats` target).
struct EventLog {
    losses: Arc<Losses>,
    slow_consumers: Throttle,
    client_errors: Throttle,
}

impl EventLog {
    fn record(&self, event: Event) {
        match event {
            Event::Connected => tracing::info!(adapter = NAME, "connected"),
            Event::Disconnected => tracing::warn!(adapter = NAME, "disconnected, reconnecting"),
            Event::SlowConsumer(_) => {
                self.losses.received.fetch_add(1, Ordering::Relaxed);
                if let Some(lost) = self.slow_consumers.record(1) {
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
}

async fn publish_loop(client: Client, mut queue: mpsc::Receiver<Outbound>, losses: Arc<Losses>) {
    let throttle = Throttle::new(LOG_EVERY);
    while let Some(outbound) = queue.recv().await {
        let (subject, payload) = match outbound {
            Outbound::Publish(subject, payload) => (subject, payload),
            Outbound::Flush(done) => {
                if client.connection_state() == State::Connected {
                    let _ = client.flush().await;
                }
                let _ = done.send(());
                continue;
            }
        };
        let outcome = if client.connection_state() == State::Connected {
            // Waits only while async-nats' own queue is full.
            client
                .publish(subject, payload)
                .await
                .map_err(|error| error.to_string())
        } else {
            // At most once: what was accepted just before an outage is dropped rather
            // than delivered late.
            Err("the connection is down".to_owned())
        };
        if let Err(why) = outcome {
            losses.published.fetch_add(1, Ordering::Relaxed);
            if let Some(lost) = throttle.record(1) {
                tracing::warn!(adapter = NAME, lost, why, "publications lost");
            }
        }
    }
}

async fn subscription_loop(
    client: Client,
    mut ops: mpsc::Receiver<SubscriptionOp>,
    incoming: mpsc::Sender<Incoming>,
) {
    // One forwarding task per held topic; dropping it aborts the task, whose Subscriber
    // then sends UNSUB.
    let mut held: HashMap<String, AbortOnDrop> = HashMap::new();
    let mut markers = Markers::new(&client).await;
    let mut batch = Vec::with_capacity(SUBSCRIPTION_BATCH);
    let mut answers = Vec::new();
    while ops.recv_many(&mut batch, SUBSCRIPTION_BATCH).await > 0 {
        for op in batch.drain(..) {
            match op {
                SubscriptionOp::Subscribe(topic, answer) => {
                    if let Entry::Vacant(vacant) = held.entry(topic) {
                        // Queued by async-nats while disconnected, and sent once connected.
                        match client.subscribe(subject_for(vacant.key())).await {
                            Ok(subscriber) => {
                                vacant.insert(spawn(forward(subscriber, incoming.clone())));
                            }
                            Err(error) => {
                                tracing::warn!(adapter = NAME, topic = vacant.key(), %error, "subscribe failed");
                                let _ = answer.send(false);
                                continue;
                            }
                        }
                    }
                    answers.push(answer);
                }
                SubscriptionOp::Unsubscribe(topic) => {
                    held.remove(&topic);
                }
            }
        }
        if answers.is_empty() {
            continue;
        }
        let confirmed = match &mut markers {
            Some(markers) if client.connection_state() == State::Connected => {
                markers.round_trip(&client).await
            }
            _ => false,
        };
        for answer in answers.drain(..) {
            let _ = answer.send(confirmed);
        }
    }
}

/// Round trips through the server on a private inbox (see the module docs).
struct Markers {
    inbox: String,
    echoes: Subscriber,
    sent: u64,
}

impl Markers {
    async fn new(client: &Client) -> Option<Self> {
        let inbox = client.new_inbox();
        match client.subscribe(inbox.clone()).await {
            Ok(echoes) => Some(Self {
                inbox,
                echoes,
                sent: 0,
            }),
            Err(error) => {
                tracing::warn!(adapter = NAME, %error, "cannot subscribe to the marker inbox: subscriptions will not be confirmed");
                None
            }
        }
    }

    /// Publishes a marker and waits for it; true once it came back in time.
    async fn round_trip(&mut self, client: &Client) -> bool {
        self.sent += 1;
        let marker = self.sent;
        if client
            .publish(self.inbox.clone(), Bytes::from(marker.to_string()))
            .await
            .is_err()
        {
            return false;
        }
        let came_back = async {
            while let Some(message) = self.echoes.next().await {
                // Markers of earlier rounds that timed out arrive first: skip them.
                if std::str::from_utf8(&message.payload)
                    .ok()
                    .and_then(|text| text.parse::<u64>().ok())
                    == Some(marker)
                {
                    return true;
                }
            }
            false
        };
        tokio::time::timeout(MARKER_TIMEOUT, came_back)
            .await
            .unwrap_or(false)
    }
}

async fn forward(mut subscriber: Subscriber, incoming: mpsc::Sender<Incoming>) {
    while let Some(message) = subscriber.next().await {
        if incoming.send(message.payload).await.is_err() {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_become_valid_distinct_subjects() {
        let cases = [
            ("items:1", "items:1"),
            ("websocket.broadcast", "websocket.broadcast"),
            ("a..b", "a.%.b"),
            ("x.", "x.%"),
            (".x", "%.x"),
            (".", "%.%"),
            ("user@host/path=1", "user@host/path=1"),
            ("a b*>%", "a%20b%2A%3E%25"),
            ("*", "%2A"),
            (">", "%3E"),
            ("é", "%C3%A9"),
        ];
        for (topic, subject) in cases {
            assert_eq!(subject_for(topic), subject, "{topic:?}");
            assert_eq!(topic_for(subject).as_deref(), Some(topic), "{subject:?}");
        }
    }

    #[test]
    fn every_subject_is_valid_for_nats() {
        let alphabet = ["a", "Z", "0", "_", "-", ":", ".", "@", "/", "="];
        let mut names = vec![String::new()];
        // Every name of up to 4 characters over the channel alphabet.
        let mut all = Vec::new();
        for _ in 0..4 {
            let mut longer = Vec::new();
            for name in &names {
                for piece in alphabet {
                    longer.push(format!("{name}{piece}"));
                }
            }
            all.extend(longer.iter().cloned());
            names = longer;
        }
        let mut seen = std::collections::HashSet::new();
        for name in &all {
            let subject = subject_for(name);
            assert!(!subject.is_empty());
            assert!(
                !subject.starts_with('.') && !subject.ends_with('.'),
                "{subject}"
            );
            assert!(!subject.contains(".."), "{subject}");
            assert!(!subject.contains(char::is_whitespace), "{subject}");
            assert!(
                subject.split('.').all(|token| token != "*" && token != ">"),
                "{subject}"
            );
            assert!(
                async_nats::Subject::validated(&subject).is_ok(),
                "{subject}"
            );
            assert!(seen.insert(subject), "{name:?} collides");
        }
    }

    #[test]
    fn foreign_subjects_are_not_topics() {
        for subject in ["a..b", "a.", "%2", "%G0", "%61", "a b", "%"] {
            let decoded = topic_for(subject);
            if subject == "%" {
                assert_eq!(decoded.as_deref(), Some(""));
            } else {
                assert_eq!(decoded, None, "{subject:?}");
            }
        }
    }

    #[test]
    fn urls_are_checked_before_connecting() {
        for good in [
            "nats://127.0.0.1:4222",
            "nats://localhost",
            "localhost:4222",
            "tls://nats.example:4222",
            "nats://u:p@a:4222, nats://b:4222",
            "nats://token@a",
        ] {
            assert_eq!(validate_url(good), Ok(()), "{good:?}");
        }
        for bad in [
            "",
            "nats://",
            "http://localhost",
            "ws://localhost:80",
            "nats://host:99999",
            "nats://a,",
        ] {
            assert!(
                matches!(validate_url(bad), Err(PubsubError::InvalidUrl(_))),
                "{bad:?} should be refused"
            );
        }
    }

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
        let Err(PubsubError::InvalidUrl(text)) = validate_url("ws://u:hunter2@h") else {
            panic!("a WebSocket URL is refused");
        };
        assert!(!text.contains("hunter2"), "{text}");
    }

    #[test]
    fn reconnect_backoff_is_capped_at_a_second() {
        assert_eq!(reconnect_delay(1), Duration::ZERO);
        assert_eq!(reconnect_delay(2), RECONNECT_FIRST);
        assert_eq!(reconnect_delay(3), RECONNECT_FIRST * 2);
        assert_eq!(reconnect_delay(100), RECONNECT_MAX);
        assert_eq!(reconnect_delay(usize::MAX), RECONNECT_MAX);
    }
}
