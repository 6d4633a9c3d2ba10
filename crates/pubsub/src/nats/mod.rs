//! The NATS backbone: topics are NATS subjects (encoded, see [`subject_for`]), reached
//! with `async-nats` over one connection that reconnects forever.
//!
//! Work is done by the adapter's own tasks, fed by the queues of `crate::adapter`:
//! - a publication goes straight into async-nats' own queue when it has room and
//!   nothing waits in ours, so it makes no hop of our own; otherwise the publisher task
//!   hands the waiting ones to async-nats in order, and later ones wait behind them, so
//!   one topic's messages leave in order (async-nats writes its queue in order,
//!   flushing as it goes); a flush request in the queue is answered once async-nats
//!   has written everything before it to the socket;
//! - the subscription task applies (un)subscriptions in the order they were asked for,
//!   and starts one receive task per held topic, which delivers the topic's messages
//!   to the [`Inbox`] itself: a message makes no hop between async-nats' subscription
//!   buffer and the task that hands it to the hub, and one slow topic delays no other;
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
//!
//! Connecting, the connection state and the JetStream requests of the stores are shared
//! with the presence and history stores: see `link`.

pub(crate) mod link;

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;
use std::time::Duration;

use async_nats::{Client, Subscriber};
use bytes::Bytes;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::mpsc;

use crate::adapter::{CommandQueues, Commands, Losses, Outbound, Queued, SubscriptionOp};
use crate::{AbortOnDrop, Backbone, Held, Inbox, Pending, PubsubError, spawn};
use link::{EMPTY_TOKEN, Options, Role, connected, hex_value, is_plain, token_for};

const NAME: &str = "nats";

/// (Un)subscriptions applied together, then confirmed by one marker.
const SUBSCRIPTION_BATCH: usize = 512;
/// How long a marker may take to come back before the subscriptions it would confirm
/// are reported as not held.
const MARKER_TIMEOUT: Duration = Duration::from_secs(5);

/// A replica's connection to a NATS server (or cluster) used as the cluster backbone.
pub struct NatsBackbone {
    client: Client,
    commands: Commands,
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
    topic
        .split('.')
        .map(token_for)
        .collect::<Vec<_>>()
        .join(".")
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

/// Checks that `url` is a NATS address this adapter can use
/// (`nats://[user:pass@|token@]host[:port]`, `tls://...`, or a comma-separated list of
/// them for a cluster), without connecting.
pub fn validate_url(url: &str) -> Result<(), PubsubError> {
    link::parse_urls(url).map(|_| ())
}

impl NatsBackbone {
    /// Starts connecting to the NATS server(s) at `url` and returns at once; messages on
    /// subscribed topics go to `inbox`.
    ///
    /// Fails only for a malformed URL. A server that is down is retried forever: the
    /// adapter reports itself disconnected until it gets through.
    pub async fn connect(url: &str, inbox: Inbox) -> Result<Self, PubsubError> {
        let losses = Arc::new(Losses::new(NAME));
        let client = link::connect(
            url,
            Options {
                role: Role::Backbone,
                // async-nats buffers this much per subscription before it drops
                // messages as a slow consumer (its default, 65 536, can hold a lot of
                // memory per topic).
                subscription_capacity: Some(inbox.buffer_size()),
                slow_consumers: Some(Arc::clone(&losses.received)),
            },
        )
        .await?;

        let (
            commands,
            CommandQueues {
                publications,
                subscriptions,
                queued,
            },
        ) = Commands::new(NAME);
        let tasks = vec![
            spawn(publish_loop(
                client.clone(),
                publications,
                queued,
                Arc::clone(&losses),
            )),
            spawn(subscription_loop(client.clone(), subscriptions, inbox)),
        ];
        Ok(Self {
            client,
            commands,
            losses,
            _tasks: tasks,
        })
    }

    /// Waits until the connection is up, for at most `timeout`; returns whether it is.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        crate::poll_until(timeout, Duration::from_millis(10), || self.is_connected()).await
    }
}

impl Backbone for NatsBackbone {
    fn adapter(&self) -> &'static str {
        NAME
    }

    fn is_connected(&self) -> bool {
        connected(&self.client)
    }

    fn publish(&self, topic: &str, payload: Bytes) -> Result<(), PubsubError> {
        if !self.is_connected() {
            return Err(PubsubError::Disconnected(NAME));
        }
        let subject = subject_for(topic);
        if self.commands.nothing_queued() {
            // async-nats queues on the first poll when it has room; a pending send has
            // sent nothing, so dropping it loses nothing.
            match self
                .client
                .publish(subject.clone(), payload.clone())
                .now_or_never()
            {
                Some(Ok(())) => return Ok(()),
                Some(Err(error)) => {
                    self.losses.lost_publications(1, &error.to_string());
                    return Ok(());
                }
                None => {}
            }
        }
        self.commands.publish(subject, payload)
    }

    fn subscribe(&self, topic: &str) -> Result<Held, PubsubError> {
        self.commands.subscribe(topic)
    }

    fn unsubscribe(&self, topic: &str) -> Result<(), PubsubError> {
        self.commands.unsubscribe(topic)
    }

    fn generation(&self) -> u64 {
        link::connects(&self.client)
    }

    fn flush(&self) -> Pending {
        self.commands.flush()
    }

    fn dropped_published(&self) -> u64 {
        self.losses.published()
    }

    fn dropped_received(&self) -> u64 {
        self.losses.received()
    }
}

async fn publish_loop(
    client: Client,
    mut queue: mpsc::Receiver<Outbound>,
    queued: Queued,
    losses: Arc<Losses>,
) {
    while let Some(outbound) = queue.recv().await {
        let (subject, payload) = match outbound {
            Outbound::Publish(subject, payload) => (subject, payload),
            Outbound::Flush(done) => {
                if connected(&client) {
                    let _ = client.flush().await;
                }
                let _ = done.send(());
                continue;
            }
        };
        let outcome = if connected(&client) {
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
        // Handed over (or lost): later publications may go straight to async-nats.
        queued.handed_over(1);
        if let Err(why) = outcome {
            losses.lost_publications(1, &why);
        }
    }
}

async fn subscription_loop(client: Client, mut ops: mpsc::Receiver<SubscriptionOp>, inbox: Inbox) {
    // One receive task per held topic; dropping it aborts the task, whose Subscriber
    // then sends UNSUB.
    let mut held: HashMap<String, AbortOnDrop> = HashMap::new();
    let mut markers = Markers::new(&client).await;
    let mut batch = Vec::with_capacity(SUBSCRIPTION_BATCH);
    let mut answers = Vec::new();
    while ops.recv_many(&mut batch, SUBSCRIPTION_BATCH).await > 0 {
        for op in batch.drain(..) {
            match op {
                SubscriptionOp::Subscribe(topic, answer) => {
                    if hold(&client, &mut held, topic, &inbox).await {
                        answers.push(answer);
                    } else {
                        let _ = answer.send(false);
                    }
                }
                SubscriptionOp::SubscribeAll(topics) => {
                    for topic in topics {
                        hold(&client, &mut held, topic, &inbox).await;
                    }
                }
                SubscriptionOp::Unsubscribe(topic) => {
                    held.remove(&topic);
                }
                SubscriptionOp::UnsubscribeAll(topics) => {
                    for topic in topics {
                        held.remove(&topic);
                    }
                }
            }
        }
        if answers.is_empty() {
            continue;
        }
        let confirmed = match &mut markers {
            Some(markers) if connected(&client) => markers.round_trip(&client).await,
            _ => false,
        };
        for answer in answers.drain(..) {
            let _ = answer.send(confirmed);
        }
    }
}

/// Subscribes to `topic` unless it is held already; false when the subscription failed.
async fn hold(
    client: &Client,
    held: &mut HashMap<String, AbortOnDrop>,
    topic: String,
    inbox: &Inbox,
) -> bool {
    let Entry::Vacant(vacant) = held.entry(topic) else {
        return true;
    };
    // Queued by async-nats while disconnected, and sent once connected.
    match client.subscribe(subject_for(vacant.key())).await {
        Ok(subscriber) => {
            vacant.insert(spawn(receive(subscriber, inbox.clone())));
            true
        }
        Err(error) => {
            tracing::warn!(adapter = NAME, topic = vacant.key(), %error, "subscribe failed");
            false
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

async fn receive(mut subscriber: Subscriber, inbox: Inbox) {
    while let Some(message) = subscriber.next().await {
        inbox.deliver(message.payload);
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
    fn url_credentials_are_hidden_in_errors() {
        let Err(PubsubError::InvalidUrl(text)) = validate_url("ws://u:hunter2@h") else {
            panic!("a WebSocket URL is refused");
        };
        assert!(!text.contains("hunter2"), "{text}");
    }
}
