//! History in NATS JetStream (nats-server 2.11 or later, JetStream enabled), on its
//! own async-nats connection that reconnects forever (`crate::nats::link`, shared
//! with the backbone and the presence store). While it is disconnected every call
//! fails at once with [`HistoryError::Unreachable`].
//!
//! One stream per cluster, `chorus-history-<prefix>` ([`stream_for`]), file storage,
//! created when missing (and again when it is deleted behind the store's back). Its
//! subjects start with `$CHORUS.<stream>.`, which no backbone topic can produce, and
//! every name is one subject token (`crate::nats::link::token_for`):
//!
//! | subject | holds |
//! |---|---|
//! | `p.<channel>.<offset>` | a publication: headers `Chorus-Offset`, `Chorus-Epoch`; the data as the payload. Offset 0 (no data) marks an epoch made by a position or a read before any append |
//! | `i.<channel>.<key>` | an idempotency key: `<offset>:<epoch>` of the first append, `-` on a channel without history, empty while its append is under way; header `Chorus-Ttl-Ms` |
//!
//! # Offsets and epochs
//!
//! An offset is decided with the append: the publication goes to
//! `p.<channel>.<head + 1>` on condition that the newest message of `p.<channel>.*` is
//! still the head that was read (`Nats-Expected-Last-Subject-Sequence` with
//! `Nats-Expected-Last-Subject-Sequence-Subject`, 2.11+); a replica that lost the race
//! reads the new head and tries again (a replica remembers the head its own last
//! append made, so while it is the only one appending to a channel an append is one
//! round trip). So offsets are contiguous whoever appends, and
//! a publication is found by its offset with one direct get. The epoch travels in every
//! message; when `p.<channel>.*` is empty (a new channel, a deleted stream, a server
//! restarted without its storage) the next call starts a random one.
//!
//! # Retention
//!
//! What a read returns is decided by the retention it is given: the newest `size`
//! offsets, younger than the `ttl` (by the message's server timestamp against this
//! replica's clock). The stream follows behind: an append purges all but the newest
//! `size` of the channel every `size / 10` offsets, a read that finds expired
//! publications purges them, always keeping the newest message so the offsets go on.
//! With a `ttl`, every message carries `Nats-TTL` of `max(10 × ttl, 1 day)`: a channel
//! idle that long is gone and starts a new epoch at its next use, as in Redis.
//!
//! # Idempotency
//!
//! An append with a key first claims `i.<channel>.<key>` (created only if absent or
//! past its time), appends, then writes the position into the claim. A concurrent
//! repeat finds the claim and waits for its position; a claim left by a replica that
//! died mid-append is taken over after [`CLAIM_LIFE`]. Keys carry `Nats-TTL` (at least
//! one second, the server's minimum) and their own time in milliseconds, which is what
//! decides.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::message::StreamMessage;
use bytes::Bytes;

use super::{
    Appended, HistoryError, HistoryStore, Idempotency, MAX_READ, Page, Position, Publication,
    Query, Retention, StoreFuture,
};
use crate::history::memory::new_epoch;
use crate::nats::link::{
    EXPECTED_LAST_SUBJECT_SEQUENCE, Get, Link, MESSAGE_TTL, OP_TIMEOUT, Purge, ReadError, Role,
    SetupError, WATCH_TICK, WriteError, name_for, token_for,
};
use crate::now_ms;

const NAME: &str = "nats";
const UNREACHABLE: HistoryError = HistoryError::Unreachable(NAME);

const OFFSET: &str = "Chorus-Offset";
const EPOCH: &str = "Chorus-Epoch";
const KEY_TTL_MS: &str = "Chorus-Ttl-Ms";
/// Which subjects `Nats-Expected-Last-Subject-Sequence` looks at (2.11+).
const EXPECTED_SUBJECT: &str = "Nats-Expected-Last-Subject-Sequence-Subject";

const DAY: Duration = Duration::from_secs(86_400);
/// Compare-and-set attempts before giving up on a contended channel or key.
const CAS_ATTEMPTS: u32 = 200;
/// A claim whose append never completed (its replica died) is taken over after this.
pub const CLAIM_LIFE: Duration = OP_TIMEOUT.saturating_mul(2);
/// How often a repeat polls a claim under way.
const CLAIM_POLL: Duration = Duration::from_millis(5);
/// Times a call sets the stream up again when it finds it gone.
const SETUP_ATTEMPTS: u32 = 3;
/// Oldest server with the compare-and-set on a wildcard and per-message TTLs.
const MIN_VERSION: (u64, u64) = (2, 11);

/// The stream holding the history of the cluster whose topic prefix is `prefix`:
/// `chorus-history-` followed by the prefix with every byte other than `A-Z a-z 0-9 -`
/// written as `_XX`, so two prefixes never share a stream.
pub fn stream_for(prefix: &str) -> String {
    name_for("chorus-history-", prefix)
}

/// History in a JetStream stream; see the module documentation.
pub struct NatsHistory {
    link: Link,
    stream: String,
    /// `$CHORUS.<stream>.`: every subject of the stream starts with it.
    base: String,
    /// The stream is known to exist on the current server.
    ready: AtomicBool,
    /// Whether the stream takes `Nats-TTL`.
    ttl: AtomicBool,
    /// Why the server cannot keep history, once known.
    problem: Mutex<Option<String>>,
    /// The head each channel had after this replica's last append to it: the next
    /// append tries it first, one round trip instead of two while nobody else appends.
    heads: Mutex<HashMap<String, Head>>,
}

/// A channel's newest message: its stream sequence, offset and epoch.
#[derive(Clone, Debug)]
struct Head {
    seq: u64,
    offset: u64,
    epoch: String,
}

/// Channels whose head is remembered at most; past it the memory starts over.
const MAX_HEADS: usize = 10_000;

impl std::fmt::Debug for NatsHistory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsHistory")
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

/// Starts connecting to the NATS server(s) at `url` and returns at once; a server that
/// is down is retried forever. Fails only for a malformed URL.
pub async fn connect(url: &str, prefix: &str) -> Result<NatsHistory, HistoryError> {
    let link = Link::connect(url, Role::History)
        .await
        .map_err(|error| unavailable(error.to_string()))?;
    let stream = stream_for(prefix);
    Ok(NatsHistory {
        link,
        base: format!("$CHORUS.{stream}."),
        stream,
        ready: AtomicBool::new(false),
        ttl: AtomicBool::new(false),
        problem: Mutex::new(None),
        heads: Mutex::new(HashMap::new()),
    })
}

fn unavailable(reason: impl Into<String>) -> HistoryError {
    HistoryError::Unavailable {
        store: NAME,
        reason: reason.into(),
    }
}

fn corrupt(reason: impl Into<String>) -> HistoryError {
    HistoryError::Corrupt {
        store: NAME,
        reason: reason.into(),
    }
}

/// Why one step of a call failed: the stream is gone (set it up and start over), or
/// anything else.
enum Fail {
    Gone,
    Error(HistoryError),
}

impl From<HistoryError> for Fail {
    fn from(error: HistoryError) -> Self {
        Self::Error(error)
    }
}

impl From<ReadError> for Fail {
    fn from(error: ReadError) -> Self {
        match error {
            ReadError::Gone => Self::Gone,
            ReadError::Unreachable => Self::Error(UNREACHABLE),
            ReadError::Refused(reason) => Self::Error(unavailable(reason)),
        }
    }
}

/// A publication (or epoch marker) as stored.
struct Entry {
    seq: u64,
    offset: u64,
    epoch: String,
    time_ms: u64,
    data: Bytes,
}

impl Entry {
    fn read(message: StreamMessage) -> Result<Self, HistoryError> {
        let header = |name: &str| {
            message
                .headers
                .get(name)
                .map(|value| value.as_str().to_owned())
                .ok_or_else(|| corrupt(format!("{} has no {name}", message.subject)))
        };
        let offset = header(OFFSET)?
            .parse()
            .map_err(|_| corrupt(format!("{} has a bad {OFFSET}", message.subject)))?;
        let epoch = header(EPOCH)?;
        Ok(Self {
            seq: message.sequence,
            offset,
            epoch,
            time_ms: time_ms(&message),
            data: message.payload,
        })
    }

    fn position(&self) -> Position {
        Position {
            offset: self.offset,
            epoch: self.epoch.clone(),
        }
    }
}

fn time_ms(message: &StreamMessage) -> u64 {
    u64::try_from(message.time.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

/// What an idempotency key's subject says.
enum Key {
    /// Absent or past its time: claim it on condition that its last sequence is this.
    Free { expected: u64 },
    /// Claimed, its append under way.
    Pending,
    /// Used by an append at this position.
    Appended(Position),
    /// Remembered on a channel without history.
    Remembered,
}

fn ttl_secs(ttl: Duration) -> String {
    ttl.as_millis().div_ceil(1000).max(1).to_string()
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

async fn backoff(attempt: u32) {
    let micros = 200u64.saturating_mul(1 << attempt.min(6));
    tokio::time::sleep(Duration::from_micros(micros)).await;
}

impl NatsHistory {
    /// Whether the store holds a working connection now.
    pub fn is_connected(&self) -> bool {
        self.link.connected()
    }

    /// Waits until the store is connected, for at most `timeout`.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        crate::poll_until(timeout, WATCH_TICK, || self.is_connected()).await
    }

    /// The JetStream stream holding the history.
    pub fn stream_name(&self) -> &str {
        &self.stream
    }

    fn channel_subjects(&self, channel: &str) -> String {
        format!("{}p.{}.", self.base, token_for(channel))
    }

    /// Runs `step` with the stream set up, setting it up again when the step finds it
    /// gone; gives up as soon as the connection drops.
    async fn run<T, F, Fut>(&self, step: F) -> Result<T, HistoryError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, Fail>>,
    {
        for attempt in 0..SETUP_ATTEMPTS {
            let outcome = self
                .link
                .while_connected(async {
                    self.ensure().await?;
                    step().await
                })
                .await;
            match outcome {
                None => return Err(UNREACHABLE),
                Some(Ok(value)) => return Ok(value),
                Some(Err(Fail::Error(error))) => return Err(error),
                Some(Err(Fail::Gone)) => {
                    self.ready.store(false, Ordering::Release);
                    tokio::time::sleep(WATCH_TICK * attempt).await;
                }
            }
        }
        Err(UNREACHABLE)
    }

    /// Finds the stream, or creates it.
    async fn ensure(&self) -> Result<(), Fail> {
        if self.ready.load(Ordering::Acquire) {
            return Ok(());
        }
        let version = self.link.client().server_info().version;
        if !supported(&version) {
            let reason = format!(
                "history on NATS needs nats-server {}.{} or later; this one is {version}",
                MIN_VERSION.0, MIN_VERSION.1
            );
            return Err(self.unavailable(reason).into());
        }
        let setup = |error: SetupError| match error {
            SetupError::Unavailable(reason) => Fail::Error(self.unavailable(reason)),
            SetupError::Transient(_) => Fail::Error(UNREACHABLE),
        };
        let reply = match self.link.stream_info(&self.stream).await.map_err(setup)? {
            Some(reply) => reply,
            None => {
                let config = serde_json::json!({
                    "name": self.stream,
                    "description": "Chorus channel history",
                    "subjects": [format!("{}>", self.base)],
                    "retention": "limits",
                    "max_consumers": -1,
                    "max_msgs": -1,
                    "max_bytes": -1,
                    "max_age": 0,
                    "max_msgs_per_subject": -1,
                    "max_msg_size": -1,
                    "storage": "file",
                    "discard": "old",
                    "num_replicas": 1,
                    "duplicate_window": 120_000_000_000u64,
                    "deny_delete": false,
                    "deny_purge": false,
                    "allow_direct": true,
                    "allow_msg_ttl": true,
                });
                self.link.create_stream(&config).await.map_err(setup)?
            }
        };
        let ttl = reply.config.is_some_and(|config| config.allow_msg_ttl);
        self.ttl.store(ttl, Ordering::Release);
        self.ready.store(true, Ordering::Release);
        if let Ok(mut problem) = self.problem.lock() {
            *problem = None;
        }
        Ok(())
    }

    fn unavailable(&self, reason: String) -> HistoryError {
        if let Ok(mut problem) = self.problem.lock() {
            *problem = Some(reason.clone());
        }
        unavailable(reason)
    }

    async fn last(&self, subject: &str) -> Result<Option<StreamMessage>, Fail> {
        Ok(self.link.get(&self.stream, Get::Last(subject)).await?)
    }

    /// The newest entry of a channel (`prefix` from [`Self::channel_subjects`]).
    async fn head(&self, prefix: &str) -> Result<Option<Entry>, Fail> {
        match self.last(&format!("{prefix}*")).await? {
            Some(message) => Ok(Some(Entry::read(message)?)),
            None => Ok(None),
        }
    }

    /// The entry at `offset`, if the stream still has it.
    async fn at(&self, prefix: &str, offset: u64) -> Result<Option<Entry>, Fail> {
        match self.last(&format!("{prefix}{offset}")).await? {
            Some(message) => Ok(Some(Entry::read(message)?)),
            None => Ok(None),
        }
    }

    /// Publishes on condition that the last sequence of `condition` (the subject
    /// itself when `None`) is `expected` (0: it has no message). `None` when that
    /// condition no longer held.
    async fn put(
        &self,
        subject: String,
        mut headers: HeaderMap,
        expected: u64,
        condition: Option<&str>,
        life: Option<Duration>,
        payload: Bytes,
    ) -> Result<Option<u64>, Fail> {
        headers.insert(
            EXPECTED_LAST_SUBJECT_SEQUENCE,
            expected.to_string().as_str(),
        );
        if let Some(condition) = condition {
            headers.insert(EXPECTED_SUBJECT, condition);
        }
        if let Some(life) = life
            && self.ttl.load(Ordering::Acquire)
        {
            headers.insert(MESSAGE_TTL, ttl_secs(life).as_str());
        }
        match self.link.publish(subject, headers, payload).await {
            Ok(ack) => Ok(Some(ack.sequence)),
            Err(WriteError::Conflict) => Ok(None),
            Err(WriteError::Gone) => Err(Fail::Gone),
            Err(WriteError::Unreachable) => Err(Fail::Error(UNREACHABLE)),
            Err(WriteError::Refused(reason)) => Err(Fail::Error(unavailable(reason))),
        }
    }

    /// The channel's position, making an epoch (a marker at offset 0) when it has none.
    async fn position_of(&self, prefix: &str) -> Result<Position, Fail> {
        for attempt in 0..CAS_ATTEMPTS {
            if let Some(head) = self.head(prefix).await? {
                return Ok(head.position());
            }
            let epoch = new_epoch();
            let mut headers = HeaderMap::new();
            headers.insert(OFFSET, "0");
            headers.insert(EPOCH, epoch.as_str());
            let wildcard = format!("{prefix}*");
            let marked = self
                .put(
                    format!("{prefix}0"),
                    headers,
                    0,
                    Some(&wildcard),
                    Some(DAY),
                    Bytes::new(),
                )
                .await?;
            if marked.is_some() {
                return Ok(Position { offset: 0, epoch });
            }
            backoff(attempt).await;
        }
        Err(UNREACHABLE.into())
    }

    /// Appends with the next offset (see the module documentation).
    async fn append_data(
        &self,
        prefix: &str,
        data: &Bytes,
        retention: Retention,
    ) -> Result<Position, Fail> {
        let wildcard = format!("{prefix}*");
        let life = retention.ttl.map(|ttl| ttl.saturating_mul(10).max(DAY));
        let mut remembered = self.remembered_head(prefix);
        for attempt in 0..CAS_ATTEMPTS {
            let head = match remembered.take() {
                Some(head) => Some(head),
                None => self.head(prefix).await?.map(|entry| Head {
                    seq: entry.seq,
                    offset: entry.offset,
                    epoch: entry.epoch,
                }),
            };
            let (expected, offset, epoch) = match head {
                Some(head) => (head.seq, head.offset + 1, head.epoch),
                None => (0, 1, new_epoch()),
            };
            let mut headers = HeaderMap::new();
            headers.insert(OFFSET, offset.to_string().as_str());
            headers.insert(EPOCH, epoch.as_str());
            let subject = format!("{prefix}{offset}");
            let stored = self
                .put(
                    subject,
                    headers,
                    expected,
                    Some(&wildcard),
                    life,
                    data.clone(),
                )
                .await;
            let seq = match stored {
                Ok(Some(seq)) => seq,
                Ok(None) => {
                    // Another replica appended (or the head is gone): read it next.
                    if attempt > 0 {
                        backoff(attempt).await;
                    }
                    continue;
                }
                Err(fail) => {
                    self.forget_head(prefix);
                    return Err(fail);
                }
            };
            self.remember_head(
                prefix,
                Head {
                    seq,
                    offset,
                    epoch: epoch.clone(),
                },
            );
            let size = u64::try_from(retention.size).unwrap_or(u64::MAX).max(1);
            if offset % (size / 10).max(1) == 0 {
                // The stream follows behind the retention; a failure here loses nothing.
                if let Err(error) = self
                    .link
                    .purge(&self.stream, &wildcard, Purge::Keep(size))
                    .await
                {
                    tracing::debug!(store = NAME, ?error, "history trim failed");
                }
            }
            return Ok(Position { offset, epoch });
        }
        Err(UNREACHABLE.into())
    }

    fn heads(&self) -> std::sync::MutexGuard<'_, HashMap<String, Head>> {
        self.heads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn remembered_head(&self, prefix: &str) -> Option<Head> {
        self.heads().get(prefix).cloned()
    }

    fn remember_head(&self, prefix: &str, head: Head) {
        let mut heads = self.heads();
        if heads.len() >= MAX_HEADS && !heads.contains_key(prefix) {
            heads.clear();
        }
        heads.insert(prefix.to_owned(), head);
    }

    fn forget_head(&self, prefix: &str) {
        self.heads().remove(prefix);
    }

    /// What an idempotency key's subject says now.
    async fn key(&self, subject: &str) -> Result<Key, Fail> {
        let Some(message) = self.last(subject).await? else {
            return Ok(Key::Free { expected: 0 });
        };
        let ttl_ms = message
            .headers
            .get(KEY_TTL_MS)
            .and_then(|value| value.as_str().parse::<u64>().ok())
            .unwrap_or(0);
        let age = now_ms().saturating_sub(time_ms(&message));
        let free = Key::Free {
            expected: message.sequence,
        };
        if age >= ttl_ms {
            return Ok(free);
        }
        let text = std::str::from_utf8(&message.payload)
            .map_err(|_| corrupt(format!("{subject} is not text")))?;
        Ok(match text {
            "" if age >= millis(CLAIM_LIFE) => free,
            "" => Key::Pending,
            "-" => Key::Remembered,
            _ => {
                let (offset, epoch) = text
                    .split_once(':')
                    .and_then(|(offset, epoch)| Some((offset.parse().ok()?, epoch)))
                    .ok_or_else(|| corrupt(format!("{subject} holds {text:?}")))?;
                Key::Appended(Position {
                    offset,
                    epoch: epoch.to_owned(),
                })
            }
        })
    }

    /// Writes a key's record on condition that its last sequence is `expected`.
    async fn put_key(
        &self,
        subject: &str,
        expected: u64,
        ttl: Duration,
        record: String,
    ) -> Result<Option<u64>, Fail> {
        let mut headers = HeaderMap::new();
        headers.insert(KEY_TTL_MS, millis(ttl).to_string().as_str());
        self.put(
            subject.to_owned(),
            headers,
            expected,
            None,
            Some(ttl),
            Bytes::from(record),
        )
        .await
    }

    fn key_subject(&self, channel: &str, key: &str) -> String {
        format!("{}i.{}.{}", self.base, token_for(channel), token_for(key))
    }

    async fn append_once(
        &self,
        channel: &str,
        data: &Bytes,
        retention: Retention,
        idempotency: Idempotency<'_>,
    ) -> Result<Appended, Fail> {
        let prefix = self.channel_subjects(channel);
        let subject = self.key_subject(channel, idempotency.key);
        let duplicate = |position| Appended {
            position,
            duplicate: true,
        };
        let mut attempt = 0;
        let claimed = loop {
            attempt += 1;
            match self.key(&subject).await? {
                Key::Appended(position) => return Ok(duplicate(position)),
                Key::Remembered => return Ok(duplicate(self.position_of(&prefix).await?)),
                Key::Pending => {
                    // Bounded: a claim older than CLAIM_LIFE reads as free.
                    tokio::time::sleep(CLAIM_POLL).await;
                }
                Key::Free { expected } => {
                    let ttl = idempotency.ttl;
                    if let Some(seq) = self.put_key(&subject, expected, ttl, String::new()).await? {
                        break seq;
                    }
                    backoff(attempt.min(CAS_ATTEMPTS)).await;
                }
            }
        };
        match self.append_data(&prefix, data, retention).await {
            Ok(position) => {
                let record = format!("{}:{}", position.offset, position.epoch);
                if let Err(Fail::Error(error)) = self
                    .put_key(&subject, claimed, idempotency.ttl, record)
                    .await
                {
                    // Repeats wait for the claim to lapse, then append again.
                    tracing::warn!(store = NAME, %error, "an idempotency key was not recorded");
                }
                Ok(Appended {
                    position,
                    duplicate: false,
                })
            }
            Err(fail) => {
                // Release the claim so that a repeat can append at once.
                let _ = self
                    .link
                    .purge(&self.stream, &subject, Purge::Keep(0))
                    .await;
                Err(fail)
            }
        }
    }

    /// The oldest offset `retention` still keeps of a channel whose newest entry is
    /// `head` (`head.offset + 1` when none is). What is kept is a
    /// suffix of the offsets (purges take the oldest, and times grow with offsets), so
    /// a binary search finds its start.
    async fn oldest(&self, prefix: &str, head: &Entry, retention: Retention) -> Result<u64, Fail> {
        let size = u64::try_from(retention.size).unwrap_or(u64::MAX);
        let cutoff = retention
            .ttl
            .map(|ttl| now_ms().saturating_sub(millis(ttl)));
        let kept = |entry: &Entry| cutoff.is_none_or(|cutoff| entry.time_ms > cutoff);
        let top = head.offset;
        if top == 0 || !kept(head) {
            return Ok(top + 1);
        }
        let mut low = top.saturating_sub(size).saturating_add(1).max(1);
        if let Some(entry) = self.at(prefix, low).await?
            && kept(&entry)
        {
            return Ok(low);
        }
        // `low` is not kept, `high` is.
        let mut high = top;
        let mut found = None;
        while high - low > 1 {
            let middle = low + (high - low) / 2;
            match self.at(prefix, middle).await? {
                Some(entry) if kept(&entry) => {
                    high = middle;
                    found = Some(entry);
                }
                _ => low = middle,
            }
        }
        let seq = match found {
            Some(entry) => entry.seq,
            None if high == top => head.seq,
            None => match self.at(prefix, high).await? {
                Some(entry) => entry.seq,
                None => return Ok(top + 1),
            },
        };
        if cutoff.is_some() {
            // Expired ones go from the stream too; the kept ones (and the head) stay.
            let _ = self
                .link
                .purge(&self.stream, &format!("{prefix}*"), Purge::Below(seq))
                .await;
        }
        Ok(high)
    }

    async fn read_page(
        &self,
        channel: &str,
        query: Query,
        retention: Retention,
    ) -> Result<Page, Fail> {
        let prefix = self.channel_subjects(channel);
        let Some(head) = self.head(&prefix).await? else {
            let position = self.position_of(&prefix).await?;
            return Ok(Page {
                publications: Vec::new(),
                oldest: position.offset + 1,
                position,
            });
        };
        let top = head.offset;
        let oldest = self.oldest(&prefix, &head, retention).await?;
        let limit = u64::try_from(query.limit.min(MAX_READ)).unwrap_or(0);
        let start = query.after.map_or(oldest, |after| oldest.max(after + 1));
        let (from, to) = match (query.after, query.reverse) {
            (Some(_), false) => (
                start,
                top.min(start.saturating_add(limit).saturating_sub(1)),
            ),
            _ => (start.max((top + 1).saturating_sub(limit)), top),
        };
        let mut publications = Vec::new();
        if limit > 0 && from <= to {
            for entry in self.range(&prefix, from, to, head.seq).await? {
                if entry.offset > to {
                    break;
                }
                if entry.offset < from {
                    continue;
                }
                let expected = from + publications.len() as u64;
                if entry.offset != expected {
                    if publications.is_empty() && entry.offset > expected {
                        // The oldest went while this read ran: the page starts later.
                    } else {
                        return Err(corrupt(format!(
                            "{channel}: offset {} after {expected}",
                            entry.offset
                        ))
                        .into());
                    }
                }
                publications.push(Publication {
                    offset: entry.offset,
                    data: entry.data,
                });
            }
        }
        let oldest = publications
            .first()
            .map_or(oldest, |first| oldest.max(first.offset.min(from)));
        if query.reverse {
            publications.reverse();
        }
        Ok(Page {
            publications,
            position: head.position(),
            oldest,
        })
    }

    /// The channel's entries `from..=to` as of stream sequence `until`, oldest first,
    /// by batched direct gets of their subjects (an exact lookup each, where a
    /// wildcard would scan the channel's subjects once per message).
    async fn range(
        &self,
        prefix: &str,
        from: u64,
        to: u64,
        until: u64,
    ) -> Result<Vec<Entry>, Fail> {
        let mut entries = Vec::new();
        let mut next = from;
        while next <= to {
            let subjects: Vec<String> = (next..=to)
                .map(|offset| format!("{prefix}{offset}"))
                .collect();
            let batch = self
                .link
                .get_last_of(&self.stream, &subjects, until)
                .await?;
            if batch.is_empty() {
                break;
            }
            let mut found = Vec::with_capacity(batch.len());
            for message in batch {
                found.push(Entry::read(message)?);
            }
            found.sort_by_key(|entry| entry.offset);
            let Some(last) = found.last().map(|entry| entry.offset) else {
                break;
            };
            entries.extend(found);
            next = last + 1;
        }
        Ok(entries)
    }
}

/// Whether a server version (`2.11.0`, `2.12.0-RC.1`) is at least [`MIN_VERSION`].
fn supported(version: &str) -> bool {
    let mut parts = version
        .trim_start_matches('v')
        .split(['.', '-'])
        .map(|part| part.parse::<u64>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    (major, minor) >= MIN_VERSION
}

impl HistoryStore for NatsHistory {
    fn name(&self) -> &'static str {
        NAME
    }

    fn problem(&self) -> Option<String> {
        self.problem.lock().ok().and_then(|problem| problem.clone())
    }

    fn append<'a>(
        &'a self,
        channel: &'a str,
        data: &'a [u8],
        retention: Retention,
        idempotency: Option<Idempotency<'a>>,
    ) -> StoreFuture<'a, Appended, HistoryError> {
        Box::pin(async move {
            let data = Bytes::copy_from_slice(data);
            let data = &data;
            match idempotency {
                Some(idempotency) => {
                    self.run(move || self.append_once(channel, data, retention, idempotency))
                        .await
                }
                None => {
                    let prefix = self.channel_subjects(channel);
                    let prefix = prefix.as_str();
                    let position = self
                        .run(move || self.append_data(prefix, data, retention))
                        .await?;
                    Ok(Appended {
                        position,
                        duplicate: false,
                    })
                }
            }
        })
    }

    fn position<'a>(&'a self, channel: &'a str) -> StoreFuture<'a, Position, HistoryError> {
        Box::pin(async move {
            let prefix = self.channel_subjects(channel);
            let prefix = prefix.as_str();
            self.run(move || self.position_of(prefix)).await
        })
    }

    fn read<'a>(
        &'a self,
        channel: &'a str,
        query: Query,
        retention: Retention,
    ) -> StoreFuture<'a, Page, HistoryError> {
        Box::pin(self.run(move || self.read_page(channel, query, retention)))
    }

    fn remember<'a>(
        &'a self,
        channel: &'a str,
        key: &'a str,
        ttl: Duration,
    ) -> StoreFuture<'a, bool, HistoryError> {
        Box::pin(async move {
            let subject = self.key_subject(channel, key);
            let subject = subject.as_str();
            self.run(move || async move {
                for attempt in 0..CAS_ATTEMPTS {
                    let Key::Free { expected } = self.key(subject).await? else {
                        return Ok(false);
                    };
                    if self
                        .put_key(subject, expected, ttl, "-".to_owned())
                        .await?
                        .is_some()
                    {
                        return Ok(true);
                    }
                    backoff(attempt).await;
                }
                Err(UNREACHABLE.into())
            })
            .await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_before_2_11_are_refused() {
        for (version, ok) in [
            ("2.11.0", true),
            ("2.15.1", true),
            ("v2.12.0-RC.1", true),
            ("3.0.0", true),
            ("2.10.22", false),
            ("2.9.10", false),
            ("", false),
        ] {
            assert_eq!(supported(version), ok, "{version}");
        }
    }

    #[test]
    fn streams_of_two_prefixes_never_meet() {
        assert_ne!(stream_for("a.b"), stream_for("a_2Eb"));
        assert_eq!(
            stream_for("websocket.broadcast"),
            "chorus-history-websocket_2Ebroadcast"
        );
    }

    #[test]
    fn key_lifetimes_are_whole_seconds_at_least_one() {
        assert_eq!(ttl_secs(Duration::from_millis(600)), "1");
        assert_eq!(ttl_secs(Duration::from_millis(1001)), "2");
        assert_eq!(ttl_secs(Duration::from_secs(300)), "300");
    }
}
