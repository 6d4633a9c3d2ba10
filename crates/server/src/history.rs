//! This replica's side of history (section 11): one order per channel, recovery, and
//! gap filling.
//!
//! A publication on a history channel gets its offset from the store; then every
//! replica, the publisher's included, delivers it through the channel's sequence
//! (`Sequence`): in offset order, once, whichever replica published it. A publication
//! that arrives before the one it follows waits, at most [`GAP_WAIT`], for the
//! backbone to bring the missing one; then the missing ones are read from the store,
//! and what the store no longer keeps is told to subscribers as `sys.gap`. Nothing is
//! skipped silently.
//!
//! A sequence also keeps the channel's latest publications (its tail), so that the
//! clients that reconnect together to a replica recover from memory: at most one
//! store read per channel serves all of them, however many they are.
//!
//! A new subscriber of a history channel is held out of live delivery until the reply
//! that tells it where it stands (and what it recovered) is queued; then it joins at
//! exactly that offset: the publications after it follow, none twice, none missed.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chorus_hub::{ClientHandle, Frame, Hub, Overflow, Tag};
use chorus_pubsub::history::{
    Appended, HistoryError, HistoryStore, Idempotency, MAX_READ, Page, Query, Retention,
};
use chorus_rpc::{
    HistoryPage, HistoryQuery, Kept, NodeFuture, Recovery, RpcError, StreamPosition, notification,
};
use futures_util::FutureExt;
use futures_util::future::Shared;
use prometheus::IntCounter;

use crate::presence::STORE_TIMEOUT;

/// How long a publication that arrived early waits for the ones before it to arrive
/// through the backbone, before they are read from the store.
pub const GAP_WAIT: Duration = Duration::from_millis(250);
/// Publications waiting for an earlier one, per channel; past this the store is asked
/// at once.
const MAX_PENDING: usize = 10_000;
/// Most bytes of `data` one channel's tail keeps.
const TAIL_BYTES: usize = 256 * 1024;

/// One kept publication, as delivered: its data (for recovery replies) and its frame.
#[derive(Clone, Debug)]
pub struct Entry {
    pub offset: u64,
    pub data: Bytes,
    pub frame: Frame,
}

/// A client waiting to join live delivery once the channel reaches `from`.
struct Joiner {
    client: ClientHandle,
    /// The client has every publication up to this offset.
    from: u64,
}

/// One channel's delivery state on this replica.
struct Sequence {
    epoch: String,
    /// The last offset delivered here.
    last: u64,
    /// Publications that came before their predecessors.
    pending: BTreeMap<u64, Entry>,
    /// Since when the oldest pending publication waits.
    waiting_since: Option<Instant>,
    /// A store read to close the gap is under way.
    filling: bool,
    /// The latest delivered publications, contiguous, ending at `last`.
    tail: VecDeque<Entry>,
    tail_bytes: usize,
    tail_max: usize,
    joiners: Vec<Joiner>,
    /// The epoch before the last change: its late publications are dropped.
    old_epoch: Option<String>,
    /// Waiting for its first store read: publications are kept, not delivered, until
    /// the read says where the channel stands.
    syncing: bool,
}

impl Sequence {
    fn new(epoch: String, last: u64, tail_max: usize) -> Self {
        Self {
            epoch,
            last,
            pending: BTreeMap::new(),
            waiting_since: None,
            filling: false,
            tail: VecDeque::new(),
            tail_bytes: 0,
            tail_max,
            joiners: Vec::new(),
            old_epoch: None,
            syncing: false,
        }
    }

    /// The tail's publications after `after`, if it holds every one of them up to
    /// `last`.
    fn tail_after(&self, after: u64) -> Option<Vec<Entry>> {
        if after >= self.last {
            return Some(Vec::new());
        }
        let first = self.tail.front()?.offset;
        (after + 1 >= first).then(|| {
            self.tail
                .iter()
                .filter(|e| e.offset > after)
                .cloned()
                .collect()
        })
    }

    fn remember(&mut self, entry: Entry) {
        self.tail_bytes += entry.data.len();
        self.tail.push_back(entry);
        while self.tail.len() > self.tail_max
            || (self.tail_bytes > TAIL_BYTES && self.tail.len() > 1)
        {
            if let Some(old) = self.tail.pop_front() {
                self.tail_bytes -= old.data.len();
            }
        }
    }
}

/// Where a gap is and since when, for the store to close it.
#[derive(Clone, Debug)]
pub struct Gap {
    pub channel: Arc<str>,
    pub epoch: String,
    /// The last offset delivered: the store is read after it.
    pub after: u64,
}

const SHARDS: usize = 32;

type Shard = Mutex<HashMap<Arc<str>, Sequence>>;

/// How a channel's namespace treats its publications.
#[derive(Clone, Copy, Debug)]
pub struct Rules {
    pub overflow: Overflow,
    pub retention: Retention,
}

/// Every history channel with a subscriber on this replica.
pub struct Sequences {
    shards: Box<[Shard]>,
    hasher: std::hash::RandomState,
}

impl std::fmt::Debug for Sequences {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sequences").finish_non_exhaustive()
    }
}

/// What a [`Sequences::deliver`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivered {
    /// Delivered (with whatever was waiting behind it).
    Now,
    /// Waits for an earlier publication.
    Waiting,
    /// Already delivered, of an older epoch, or of a channel nobody here follows.
    Ignored,
}

impl Sequences {
    pub fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: std::hash::RandomState::new(),
        }
    }

    fn shard(&self, channel: &str) -> MutexGuard<'_, HashMap<Arc<str>, Sequence>> {
        use std::hash::BuildHasher;
        #[allow(clippy::cast_possible_truncation)]
        let index = (self.hasher.hash_one(channel) as usize) % SHARDS;
        self.shards[index]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether this replica follows `channel`.
    pub fn follows(&self, channel: &str) -> bool {
        self.shard(channel).contains_key(channel)
    }

    /// `channel`'s epoch and last delivered offset, if followed.
    pub fn position(&self, channel: &str) -> Option<(String, u64)> {
        self.shard(channel)
            .get(channel)
            .filter(|sequence| !sequence.syncing)
            .map(|sequence| (sequence.epoch.clone(), sequence.last))
    }

    /// Starts keeping `channel`'s publications before knowing where it stands (the
    /// first subscriber's backbone subscription is being taken, the store not read
    /// yet): none that arrives meanwhile is lost.
    pub fn prepare(&self, channel: &str, tail_max: usize) {
        let mut shard = self.shard(channel);
        if !shard.contains_key(channel) {
            let mut sequence = Sequence::new(String::new(), 0, tail_max);
            sequence.syncing = true;
            shard.insert(Arc::from(channel), sequence);
        }
    }

    /// Starts following `channel` at `(epoch, last)` unless it is followed already,
    /// keeping at most `tail_max` publications; `warm` are the latest publications up
    /// to `last` (a store read), kept for recoveries.
    pub fn follow(
        &self,
        hub: &Hub,
        channel: &str,
        epoch: &str,
        last: u64,
        tail_max: usize,
        warm: &[Entry],
    ) {
        let mut shard = self.shard(channel);
        let early = match shard.get_mut(channel) {
            Some(sequence) if sequence.syncing => std::mem::take(&mut sequence.pending),
            Some(_) => return,
            None => BTreeMap::new(),
        };
        let mut sequence = Sequence::new(epoch.to_owned(), last, tail_max);
        for entry in warm.iter().filter(|e| e.offset <= last) {
            if sequence
                .tail
                .back()
                .is_none_or(|previous| previous.offset + 1 == entry.offset)
            {
                sequence.remember(entry.clone());
            } else {
                sequence.tail.clear();
                sequence.tail_bytes = 0;
                sequence.remember(entry.clone());
            }
        }
        if sequence.tail.back().is_some_and(|e| e.offset != last) {
            sequence.tail.clear();
            sequence.tail_bytes = 0;
        }
        // What arrived while the store was read: delivered in order after `last`.
        sequence.pending = early
            .into_iter()
            .filter(|(offset, _)| *offset > last)
            .collect();
        while let Some(next) = sequence.pending.remove(&(sequence.last + 1)) {
            emit(hub, channel, &mut sequence, next);
        }
        sequence.waiting_since = (!sequence.pending.is_empty()).then(Instant::now);
        shard.insert(Arc::from(channel), sequence);
    }

    /// Stops following `channel` (its last local subscriber left).
    pub fn unfollow(&self, channel: &str) {
        self.shard(channel).remove(channel);
    }

    /// The tail's publications after `after` in `epoch`, when the tail holds all of
    /// them; `None` when it cannot tell (not followed, another epoch, too far back).
    pub fn recent(&self, channel: &str, epoch: &str, after: u64) -> Option<(u64, Vec<Entry>)> {
        let shard = self.shard(channel);
        let sequence = shard.get(channel)?;
        // Ahead of this replica (it heard of it elsewhere): the store knows more.
        if sequence.syncing || sequence.epoch != epoch || after > sequence.last {
            return None;
        }
        sequence
            .tail_after(after)
            .map(|entries| (sequence.last, entries))
    }

    /// Delivers a publication in order: to the hub when it is next, else it waits.
    pub fn deliver(&self, hub: &Hub, channel: &str, epoch: &str, entry: Entry) -> Delivered {
        let mut shard = self.shard(channel);
        let Some(sequence) = shard.get_mut(channel) else {
            return Delivered::Ignored;
        };
        if sequence.syncing {
            // Kept until the store read says where the channel stands (an entry of
            // another epoch than the read's is dropped then).
            // Bounded: what is dropped here is a gap the store fills after the read.
            sequence.epoch = epoch.to_owned();
            if sequence.pending.len() < MAX_PENDING {
                sequence.pending.insert(entry.offset, entry);
            }
            return Delivered::Waiting;
        }
        if sequence.epoch != epoch {
            if sequence.old_epoch.as_deref() == Some(epoch) {
                return Delivered::Ignored;
            }
            // The store lost the channel and started over: say so, then follow anew.
            let notice = notification::value(
                "sys.gap",
                &serde_json::json!({"channel": channel, "epoch": epoch}),
            );
            hub.publish(channel, &notice);
            let old = std::mem::replace(&mut sequence.epoch, epoch.to_owned());
            sequence.old_epoch = Some(old);
            sequence.last = entry.offset.saturating_sub(1);
            sequence.pending.clear();
            sequence.waiting_since = None;
            sequence.tail.clear();
            sequence.tail_bytes = 0;
            for joiner in std::mem::take(&mut sequence.joiners) {
                // Held clients learn it too, then follow the new epoch.
                let _ = joiner.client.send(notice.clone());
                hub.release(&joiner.client, channel);
            }
        }
        if entry.offset <= sequence.last {
            return Delivered::Ignored;
        }
        if entry.offset > sequence.last + 1 {
            sequence.pending.insert(entry.offset, entry);
            sequence.waiting_since.get_or_insert_with(Instant::now);
            return Delivered::Waiting;
        }
        emit(hub, channel, sequence, entry);
        while let Some(next) = sequence.pending.remove(&(sequence.last + 1)) {
            emit(hub, channel, sequence, next);
        }
        drop_stale(sequence);
        sequence.waiting_since = (!sequence.pending.is_empty()).then(Instant::now);
        Delivered::Now
    }

    /// Offsets the store no longer keeps: subscribers are told, and delivery goes on
    /// after them.
    pub fn skip(&self, hub: &Hub, channel: &str, epoch: &str, through: u64) {
        let mut shard = self.shard(channel);
        let Some(sequence) = shard.get_mut(channel) else {
            return;
        };
        if sequence.epoch != epoch || through <= sequence.last {
            return;
        }
        let notice = notification::value(
            "sys.gap",
            &serde_json::json!({"channel": channel, "from_offset": sequence.last + 1, "to_offset": through}),
        );
        hub.publish(channel, &notice);
        sequence.last = through;
        sequence.tail.clear();
        sequence.tail_bytes = 0;
        for joiner in &sequence.joiners {
            let _ = joiner.client.send(notice.clone());
        }
        while let Some(next) = sequence.pending.remove(&(sequence.last + 1)) {
            emit(hub, channel, sequence, next);
        }
        drop_stale(sequence);
        release_joiners(hub, channel, sequence);
        sequence.waiting_since = (!sequence.pending.is_empty()).then(Instant::now);
    }

    /// A held subscriber that has everything up to `from` (in `epoch`) joins live
    /// delivery: at once when the channel is there, with what it missed meanwhile
    /// from the tail, or once the channel gets there.
    pub fn join(&self, hub: &Hub, client: ClientHandle, channel: &str, epoch: &str, from: u64) {
        let mut shard = self.shard(channel);
        let Some(sequence) = shard.get_mut(channel) else {
            // Nobody follows it any more: the client left meanwhile.
            hub.release(&client, channel);
            return;
        };
        if sequence.epoch != epoch {
            let _ = client.send(notification::value(
                "sys.gap",
                &serde_json::json!({"channel": channel, "epoch": sequence.epoch}),
            ));
            hub.release(&client, channel);
            return;
        }
        sequence.joiners.push(Joiner { client, from });
        release_joiners(hub, channel, sequence);
    }

    /// Channels with a publication waiting longer than `wait` (or too many waiting),
    /// marked as being filled so each gap is asked for once.
    pub fn gaps(&self, wait: Duration) -> Vec<Gap> {
        let now = Instant::now();
        let mut gaps = Vec::new();
        for shard in self.shards.iter() {
            let mut shard = shard
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for (channel, sequence) in shard.iter_mut() {
                let overdue = !sequence.syncing
                    && sequence
                        .waiting_since
                        .is_some_and(|since| now.duration_since(since) >= wait)
                    || sequence.pending.len() > MAX_PENDING;
                if overdue && !sequence.filling {
                    sequence.filling = true;
                    gaps.push(Gap {
                        channel: Arc::clone(channel),
                        epoch: sequence.epoch.clone(),
                        after: sequence.last,
                    });
                }
            }
        }
        gaps
    }

    /// A gap's store read is done (whatever it brought).
    pub fn filled(&self, channel: &str) {
        if let Some(sequence) = self.shard(channel).get_mut(channel) {
            sequence.filling = false;
            if !sequence.pending.is_empty() {
                sequence.waiting_since = Some(Instant::now());
            }
        }
    }

    /// Forgets a client that is gone from the joiners of `channel`.
    pub fn forget(&self, channel: &str, client: &ClientHandle) {
        if let Some(sequence) = self.shard(channel).get_mut(channel) {
            sequence.joiners.retain(|j| j.client.id() != client.id());
        }
    }
}

impl Default for Sequences {
    fn default() -> Self {
        Self::new()
    }
}

fn emit(hub: &Hub, channel: &str, sequence: &mut Sequence, entry: Entry) {
    hub.publish(channel, &entry.frame);
    sequence.last = entry.offset;
    sequence.remember(entry);
    release_joiners(hub, channel, sequence);
}

/// Pending publications at or below `last` are delivered already.
fn drop_stale(sequence: &mut Sequence) {
    let last = sequence.last;
    sequence.pending.retain(|offset, _| *offset > last);
}

/// Releases the joiners the channel has reached: each gets what it missed from the
/// tail (or a `sys.gap` for what the tail no longer has), then live delivery.
fn release_joiners(hub: &Hub, channel: &str, sequence: &mut Sequence) {
    let last = sequence.last;
    let joiners = std::mem::take(&mut sequence.joiners);
    for joiner in joiners {
        if joiner.from > last {
            sequence.joiners.push(joiner);
            continue;
        }
        if !hub.is_held(&joiner.client, channel) {
            continue;
        }
        match sequence.tail_after(joiner.from) {
            Some(missed) => {
                for entry in missed {
                    let _ = joiner.client.send(entry.frame);
                }
            }
            None => {
                let _ = joiner.client.send(notification::value(
                    "sys.gap",
                    &serde_json::json!({"channel": channel, "from_offset": joiner.from + 1, "to_offset": last}),
                ));
            }
        }
        hub.release(&joiner.client, channel);
    }
}

/// The `message` notification of a history channel's publication. The data comes last
/// so that it can be sliced back out of the frame ([`data_of`]) without parsing.
pub fn message_frame(channel: &str, offset: u64, data: &[u8], overflow: Overflow) -> Frame {
    let data = String::from_utf8_lossy(data);
    let mut params = String::with_capacity(48 + channel.len() + data.len());
    params.push_str(r#"{"channel":"#);
    params.push_str(&serde_json::Value::from(channel).to_string());
    params.push_str(r#","offset":"#);
    params.push_str(&offset.to_string());
    params.push_str(r#","data":"#);
    params.push_str(&data);
    params.push('}');
    let text = notification::raw("message", &params).as_str().to_owned();
    Frame::tagged(
        text,
        Tag {
            channel: Arc::from(channel),
            offset,
            overflow,
        },
    )
}

/// The `data` of a frame made by [`message_frame`], sliced out without a copy.
pub fn data_of(frame: &Frame) -> Option<Bytes> {
    const MARK: &str = r#","data":"#;
    let text = frame.as_str();
    let start = text.find(MARK)? + MARK.len();
    let end = text.len().checked_sub(2)?;
    (start <= end && text.ends_with("}}")).then(|| frame.as_bytes().slice(start..end))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(offset: u64) -> Entry {
        let data = format!(r#"{{"n":{offset}}}"#);
        Entry {
            offset,
            frame: message_frame("c", offset, data.as_bytes(), Overflow::Disconnect),
            data: Bytes::from(data),
        }
    }

    fn subscribed(hub: &Hub) -> (ClientHandle, chorus_hub::Outbox) {
        let (client, outbox) = hub.create_client(chorus_hub::Identity::default());
        hub.register(&client);
        hub.subscribe(&client, "c");
        (client, outbox)
    }

    fn offsets(outbox: &mut chorus_hub::Outbox) -> Vec<String> {
        std::iter::from_fn(|| outbox.try_next())
            .map(|frame| {
                let value: serde_json::Value = serde_json::from_str(frame.as_str()).expect("JSON");
                if value["method"] == "message" {
                    value["params"]["offset"].to_string()
                } else {
                    format!("{}", value["params"])
                }
            })
            .collect()
    }

    #[test]
    fn the_data_is_sliced_back_out_of_the_frame() {
        let frame = message_frame("a:b", 7, br#"{"x":[1,"}}"]}"#, Overflow::Disconnect);
        let value: serde_json::Value = serde_json::from_str(frame.as_str()).expect("JSON");
        assert_eq!(value["params"]["offset"], 7);
        assert_eq!(data_of(&frame).as_deref(), Some(&br#"{"x":[1,"}}"]}"#[..]));
    }

    #[test]
    fn publications_are_delivered_in_offset_order_once() {
        let hub = Hub::new(1 << 20, Arc::new(chorus_hub::NoEvents));
        let (_client, mut outbox) = subscribed(&hub);
        let sequences = Sequences::new();
        sequences.follow(&hub, "c", "e1", 0, 100, &[]);
        assert_eq!(
            sequences.deliver(&hub, "c", "e1", entry(2)),
            Delivered::Waiting
        );
        assert_eq!(
            sequences.deliver(&hub, "c", "e1", entry(3)),
            Delivered::Waiting
        );
        assert_eq!(sequences.deliver(&hub, "c", "e1", entry(1)), Delivered::Now);
        assert_eq!(
            sequences.deliver(&hub, "c", "e1", entry(2)),
            Delivered::Ignored
        );
        assert_eq!(offsets(&mut outbox), ["1", "2", "3"]);
        assert_eq!(
            sequences
                .recent("c", "e1", 1)
                .map(|(last, e)| (last, e.len())),
            Some((3, 2))
        );
    }

    #[test]
    fn a_gap_the_store_cannot_close_is_told() {
        let hub = Hub::new(1 << 20, Arc::new(chorus_hub::NoEvents));
        let (_client, mut outbox) = subscribed(&hub);
        let sequences = Sequences::new();
        sequences.follow(&hub, "c", "e1", 0, 100, &[]);
        sequences.deliver(&hub, "c", "e1", entry(1));
        sequences.deliver(&hub, "c", "e1", entry(5));
        let gaps = sequences.gaps(Duration::ZERO);
        assert_eq!(gaps.len(), 1);
        assert_eq!(gaps[0].after, 1);
        assert!(sequences.gaps(Duration::ZERO).is_empty(), "asked once");
        sequences.skip(&hub, "c", "e1", 4);
        sequences.filled("c");
        assert_eq!(
            offsets(&mut outbox),
            ["1", r#"{"channel":"c","from_offset":2,"to_offset":4}"#, "5"]
        );
    }

    #[test]
    fn a_new_epoch_is_told_and_followed() {
        let hub = Hub::new(1 << 20, Arc::new(chorus_hub::NoEvents));
        let (_client, mut outbox) = subscribed(&hub);
        let sequences = Sequences::new();
        sequences.follow(&hub, "c", "e1", 10, 100, &[]);
        sequences.deliver(&hub, "c", "e2", entry(1));
        sequences.deliver(&hub, "c", "e1", entry(11));
        assert_eq!(
            offsets(&mut outbox),
            [r#"{"channel":"c","epoch":"e2"}"#, "1"]
        );
    }

    #[test]
    fn a_joiner_gets_what_it_missed_then_live_delivery() {
        let hub = Hub::new(1 << 20, Arc::new(chorus_hub::NoEvents));
        let sequences = Sequences::new();
        sequences.follow(&hub, "c", "e1", 0, 100, &[]);
        let (early, mut early_out) = hub.create_client(chorus_hub::Identity::default());
        hub.register(&early);
        hub.subscribe_held(&early, "c");
        let (late, mut late_out) = hub.create_client(chorus_hub::Identity::default());
        hub.register(&late);
        hub.subscribe_held(&late, "c");
        for offset in 1..=3 {
            sequences.deliver(&hub, "c", "e1", entry(offset));
        }
        // Recovered up to 1 (its reply had it): gets 2 and 3 from the tail.
        sequences.join(&hub, early.clone(), "c", "e1", 1);
        // Its reply said 5: it waits for the channel to get there here.
        sequences.join(&hub, late.clone(), "c", "e1", 5);
        sequences.deliver(&hub, "c", "e1", entry(4));
        sequences.deliver(&hub, "c", "e1", entry(5));
        sequences.deliver(&hub, "c", "e1", entry(6));
        assert_eq!(offsets(&mut early_out), ["2", "3", "4", "5", "6"]);
        assert_eq!(offsets(&mut late_out), ["6"]);
    }
}

/// History as the node uses it: the store, the sequences, and recovery.
pub struct Histories {
    store: Arc<dyn HistoryStore>,
    sequences: Sequences,
    recovery_max: usize,
    idempotency_ttl: Duration,
    /// One store read per channel at a time for recoveries; the others wait for it.
    reads: Mutex<HashMap<Arc<str>, SharedRead>>,
    metrics: HistoryMetrics,
}

type SharedRead = Shared<Pin<Box<dyn Future<Output = Result<Arc<Page>, HistoryError>> + Send>>>;

/// What history counts.
#[derive(Clone)]
pub struct HistoryMetrics {
    /// Store reads by reason: recovery, gap, history.
    pub reads: [IntCounter; 3],
    /// Recoveries by outcome: from memory, from the store, not recovered.
    pub recoveries: [IntCounter; 3],
    /// Store calls that failed.
    pub errors: IntCounter,
}

impl std::fmt::Debug for Histories {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Histories")
            .field("store", &self.store.name())
            .finish_non_exhaustive()
    }
}

/// What a recovery found: where the client joins, whether it got everything after its
/// `since`, and those publications.
struct Found {
    position: StreamPosition,
    recovered: bool,
    publications: Vec<Kept>,
}

impl Histories {
    pub fn new(
        store: Arc<dyn HistoryStore>,
        recovery_max: usize,
        idempotency_ttl: Duration,
        metrics: HistoryMetrics,
    ) -> Self {
        Self {
            store,
            sequences: Sequences::new(),
            recovery_max,
            idempotency_ttl,
            reads: Mutex::default(),
            metrics,
        }
    }

    pub fn store(&self) -> &Arc<dyn HistoryStore> {
        &self.store
    }

    pub fn sequences(&self) -> &Sequences {
        &self.sequences
    }

    pub fn idempotency_ttl(&self) -> Duration {
        self.idempotency_ttl
    }

    /// Most publications a recovery returns (and a channel's tail keeps).
    pub fn recovery_max(&self) -> usize {
        self.recovery_max
    }

    fn failed(&self, error: &HistoryError) -> RpcError {
        self.metrics.errors.inc();
        RpcError::history_unavailable(error)
    }

    /// Appends a publication to the store: its position, and whether it is new.
    pub async fn append(
        &self,
        channel: &str,
        data: &[u8],
        retention: Retention,
        idempotency_key: Option<&str>,
    ) -> Result<Appended, RpcError> {
        let idempotency = idempotency_key.map(|key| Idempotency {
            key,
            ttl: self.idempotency_ttl,
        });
        timed(self.store.append(channel, data, retention, idempotency))
            .await
            .map_err(|error| self.failed(&error))
    }

    /// Records an idempotency key of a channel without history: true the first time.
    pub async fn first_time(&self, channel: &str, key: &str) -> Result<bool, RpcError> {
        timed(self.store.remember(channel, key, self.idempotency_ttl))
            .await
            .map_err(|error| self.failed(&error))
    }

    /// A page of history, cut at `query.max_bytes`.
    pub async fn read(
        &self,
        channel: &str,
        query: HistoryQuery,
        retention: Retention,
    ) -> Result<HistoryPage, RpcError> {
        self.metrics.reads[2].inc();
        // A `since` of another epoch is of a run of offsets the store no longer has:
        // the page starts at the oldest kept.
        let current = timed(self.store.position(channel))
            .await
            .map_err(|error| self.failed(&error))?;
        let after = query.since.as_ref().map(|since| {
            if since.epoch == current.epoch {
                since.offset
            } else {
                0
            }
        });
        let page = timed(self.store.read(
            channel,
            Query {
                after,
                limit: query.limit,
                reverse: query.reverse,
            },
            retention,
        ))
        .await
        .map_err(|error| self.failed(&error))?;
        let mut bytes = 0;
        let mut truncated = false;
        let mut publications = Vec::with_capacity(page.publications.len());
        for publication in &page.publications {
            bytes += publication.data.len() + 32;
            if bytes > query.max_bytes {
                truncated = true;
                break;
            }
            publications.push(Kept {
                offset: publication.offset,
                data: publication.data.clone(),
            });
        }
        Ok(HistoryPage {
            publications,
            position: StreamPosition {
                offset: page.position.offset,
                epoch: page.position.epoch.clone(),
            },
            truncated,
        })
    }

    /// What a client subscribing with `since` gets: from this replica's tail when it
    /// has everything, else from one store read shared by every client recovering
    /// the channel now. The reply offset is where the client joins live delivery.
    async fn find(
        &self,
        hub: &Hub,
        channel: &str,
        since: Option<StreamPosition>,
        max_bytes: usize,
        overflow: Overflow,
        retention: Retention,
    ) -> Result<Found, RpcError> {
        if let Some(since) = &since
            && let Some((last, entries)) =
                self.sequences.recent(channel, &since.epoch, since.offset)
        {
            let position = StreamPosition {
                offset: last,
                epoch: since.epoch.clone(),
            };
            return Ok(self.bounded(
                position,
                since.offset,
                &entries_kept(&entries),
                max_bytes,
                0,
            ));
        }
        if since.is_none()
            && let Some((epoch, last)) = self.sequences.position(channel)
        {
            return Ok(Found {
                position: StreamPosition {
                    offset: last,
                    epoch,
                },
                recovered: false,
                publications: Vec::new(),
            });
        }
        let page = self
            .latest(channel, retention)
            .await
            .map_err(|error| self.failed(&error))?;
        let warm: Vec<Entry> = page
            .publications
            .iter()
            .map(|p| Entry {
                offset: p.offset,
                data: p.data.clone(),
                frame: message_frame(channel, p.offset, &p.data, overflow),
            })
            .collect();
        self.sequences.follow(
            hub,
            channel,
            &page.position.epoch,
            page.position.offset,
            self.recovery_max,
            &warm,
        );
        let position = StreamPosition {
            offset: page.position.offset,
            epoch: page.position.epoch.clone(),
        };
        match since {
            Some(since) if since.epoch == position.epoch && since.offset + 1 >= page.oldest => {
                let kept: Vec<Kept> = page
                    .publications
                    .iter()
                    .filter(|p| p.offset > since.offset)
                    .map(|p| Kept {
                        offset: p.offset,
                        data: p.data.clone(),
                    })
                    .collect();
                // The read has the newest `recovery_max`: older is too far back.
                let complete = kept
                    .first()
                    .is_none_or(|first| first.offset == since.offset + 1)
                    && since.offset <= position.offset;
                if complete {
                    Ok(self.bounded(position, since.offset, &kept, max_bytes, 1))
                } else {
                    self.metrics.recoveries[2].inc();
                    Ok(Found {
                        position,
                        recovered: false,
                        publications: Vec::new(),
                    })
                }
            }
            Some(_) => {
                self.metrics.recoveries[2].inc();
                Ok(Found {
                    position,
                    recovered: false,
                    publications: Vec::new(),
                })
            }
            None => Ok(Found {
                position,
                recovered: false,
                publications: Vec::new(),
            }),
        }
    }

    /// Recovered when within `WS_RECOVERY_MAX` and half the send buffer; else nothing.
    fn bounded(
        &self,
        position: StreamPosition,
        since: u64,
        kept: &[Kept],
        max_bytes: usize,
        source: usize,
    ) -> Found {
        let bytes: usize = kept.iter().map(|k| k.data.len() + 32).sum();
        let fits =
            kept.len() <= self.recovery_max && bytes <= max_bytes && since <= position.offset;
        if fits {
            self.metrics.recoveries[source].inc();
            Found {
                position,
                recovered: true,
                publications: kept.to_vec(),
            }
        } else {
            self.metrics.recoveries[2].inc();
            Found {
                position,
                recovered: false,
                publications: Vec::new(),
            }
        }
    }

    /// The channel's newest `recovery_max` publications: one store read at a time
    /// per channel, shared by everyone who asks meanwhile.
    fn latest(&self, channel: &str, retention: Retention) -> SharedRead {
        let mut reads = self
            .reads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(read) = reads.get(channel) {
            return read.clone();
        }
        self.metrics.reads[0].inc();
        let store = Arc::clone(&self.store);
        let channel_owned: Arc<str> = Arc::from(channel);
        let name = Arc::clone(&channel_owned);
        let limit = self.recovery_max;
        let read: Pin<Box<dyn Future<Output = Result<Arc<Page>, HistoryError>> + Send>> =
            Box::pin(async move {
                timed(store.read(
                    &name,
                    Query {
                        after: None,
                        limit,
                        reverse: false,
                    },
                    retention,
                ))
                .await
                .map(Arc::new)
            });
        let shared = read.shared();
        reads.insert(Arc::clone(&channel_owned), shared.clone());
        shared
    }

    /// The shared read of `channel` is done: the next recovery reads again.
    fn read_done(&self, channel: &str) {
        self.reads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(channel);
    }

    /// Starts a client's subscription to a history channel (the hub holds it): what it
    /// recovers, and the effect that lets live publications reach it after the reply.
    pub fn recover_for(
        self: &Arc<Self>,
        hub: Arc<Hub>,
        client: ClientHandle,
        channel: &str,
        since: Option<StreamPosition>,
        rules: Rules,
        ready: Pin<Box<dyn Future<Output = ()> + Send>>,
    ) -> NodeFuture<Recovery> {
        let Rules {
            overflow,
            retention,
        } = rules;
        let me = Arc::clone(self);
        let channel = channel.to_owned();
        let max_bytes = client.budget() / 2;
        Box::pin(async move {
            ready.await;
            let found = me
                .find(&hub, &channel, since, max_bytes, overflow, retention)
                .await;
            me.read_done(&channel);
            let found = found?;
            let join_at = found.position.clone();
            let joiner = Arc::clone(&me);
            Ok(Recovery {
                position: found.position,
                recovered: found.recovered,
                publications: found.publications,
                join: Box::new(move || {
                    joiner
                        .sequences
                        .join(&hub, client, &channel, &join_at.epoch, join_at.offset);
                }),
            })
        })
    }

    /// Reads what a gap misses from the store, delivers it in order, and tells what
    /// the store no longer has.
    pub async fn fill(&self, hub: &Hub, gap: Gap, overflow: Overflow, retention: Retention) {
        self.metrics.reads[1].inc();
        let read = timed(self.store.read(
            &gap.channel,
            Query {
                after: Some(gap.after),
                limit: MAX_READ,
                reverse: false,
            },
            retention,
        ))
        .await;
        match read {
            Ok(page) => {
                if page.position.epoch == gap.epoch && page.oldest > gap.after + 1 {
                    self.sequences
                        .skip(hub, &gap.channel, &gap.epoch, page.oldest - 1);
                }
                for publication in page.publications {
                    let frame = message_frame(
                        &gap.channel,
                        publication.offset,
                        &publication.data,
                        overflow,
                    );
                    self.sequences.deliver(
                        hub,
                        &gap.channel,
                        &page.position.epoch,
                        Entry {
                            offset: publication.offset,
                            data: publication.data,
                            frame,
                        },
                    );
                }
            }
            Err(error) => {
                self.metrics.errors.inc();
                tracing::debug!(%error, channel = %gap.channel, "could not read a gap from the history store");
            }
        }
        self.sequences.filled(&gap.channel);
    }
}

fn entries_kept(entries: &[Entry]) -> Vec<Kept> {
    entries
        .iter()
        .map(|e| Kept {
            offset: e.offset,
            data: e.data.clone(),
        })
        .collect()
}

/// A history store call that gives up after [`STORE_TIMEOUT`].
pub async fn timed<T>(
    call: impl Future<Output = Result<T, HistoryError>>,
) -> Result<T, HistoryError> {
    tokio::time::timeout(STORE_TIMEOUT, call)
        .await
        .unwrap_or(Err(HistoryError::Unreachable("history")))
}
