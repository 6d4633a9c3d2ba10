//! This replica's side of presence: it records its connections and channel members in
//! the cluster's store, keeps its liveness entry fresh, reaps replicas that died, and
//! reports what changed (lifecycle events, `sys.leave` of lost members).
//!
//! Every write goes through one task, in the order the replica asked for them, so a
//! connection is recorded before its memberships and removed after them. The task
//! also remembers what it recorded: when the store lost it (a restart without
//! persistence, this replica presumed dead while it stalled, an outage that failed
//! some writes), it records everything again. A store that cannot lose anything (a
//! standalone replica's own) is not copied. Reads go to the store directly.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use chorus_pubsub::presence::{Connection, Lost, Member, PresenceError, PresenceStore};
use prometheus::IntCounter;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::lifecycle::{Event, Lifecycle, Reason};

/// Writes waiting for the presence task. Past this, writes are skipped and the
/// replica records everything again once the task caught up.
const QUEUE: usize = 1 << 16;
/// Writes taken from the queue at a time.
const BATCH: usize = 256;
/// Connections reaped per store call: bounded work per round trip.
const REAP_CHUNK: usize = 200;
/// Pause before a liveness refresh that could not reach the store is tried again.
const LIVENESS_RETRY: Duration = Duration::from_millis(200);
/// Longest wait for one store call.
pub const STORE_TIMEOUT: Duration = Duration::from_secs(5);

/// What presence needs from the rest of the replica.
pub trait Effects: Send + Sync + 'static {
    /// Closes `connections` (on any replica): a newer connection with the same user
    /// and device replaced them.
    fn replace(&self, connections: &[Connection]);
    /// Tells `channel`'s subscribers that `member` left (when the namespace asks).
    fn member_lost(&self, channel: &str, member: &Connection);
    /// This replica's subscriber count of `channel`.
    fn subscriber_count(&self, channel: &str) -> u64;
    /// Every channel with a subscriber on this replica.
    fn channel_counts(&self) -> Vec<(String, u64)>;
}

/// What the replica asks presence to record.
enum Op {
    Connect {
        connection: Connection,
        done: oneshot::Sender<()>,
    },
    Disconnect {
        client_id: String,
        reason: Reason,
    },
    Join {
        channel: String,
        member: Member,
        done: Option<oneshot::Sender<()>>,
    },
    Leave {
        channel: String,
        client_id: String,
    },
    /// Shutdown: every earlier write is done; mark this replica dead.
    Retire(oneshot::Sender<()>),
}

/// What the store was told, to tell it again.
struct Record {
    connection: Connection,
    channels: BTreeSet<String>,
}

pub struct Presence {
    store: Arc<dyn PresenceStore>,
    node_id: String,
    started_at_ms: u64,
    /// A dead replica's entries are gone within this.
    ttl: Duration,
    device_replace: bool,
    ops: mpsc::Sender<Op>,
    /// A write failed or was skipped: record everything again.
    dirty: AtomicBool,
    /// Channels whose count on this replica changed since last written.
    counts_changed: Mutex<HashSet<String>>,
    /// Wakes the task to write them.
    counts_wake: Arc<Notify>,
    lifecycle: Arc<Lifecycle>,
    errors: IntCounter,
}

impl std::fmt::Debug for Presence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Presence")
            .field("store", &self.store.name())
            .finish_non_exhaustive()
    }
}

/// Settings of [`Presence::start`].
pub struct PresenceSettings {
    pub node_id: String,
    pub started_at_ms: u64,
    pub ttl: Duration,
    pub device_replace: bool,
}

impl Presence {
    /// Starts the presence task. `effects` is usually the node that owns presence.
    pub fn start(
        store: Arc<dyn PresenceStore>,
        settings: PresenceSettings,
        lifecycle: Arc<Lifecycle>,
        errors: IntCounter,
        effects: Weak<dyn Effects>,
    ) -> Arc<Self> {
        let (ops, queue) = mpsc::channel(QUEUE);
        let presence = Arc::new(Self {
            store,
            node_id: settings.node_id,
            started_at_ms: settings.started_at_ms,
            ttl: settings.ttl,
            device_replace: settings.device_replace,
            ops,
            dirty: AtomicBool::new(false),
            counts_changed: Mutex::default(),
            counts_wake: Arc::default(),
            lifecycle,
            errors,
        });
        tokio::spawn(Worker::new(Arc::downgrade(&presence), effects).run(queue));
        presence
    }

    pub fn store(&self) -> &Arc<dyn PresenceStore> {
        &self.store
    }

    pub fn lifecycle(&self) -> &Lifecycle {
        &self.lifecycle
    }

    /// Records a new connection; resolves once the store has it (or could not take it).
    pub fn connect(&self, connection: Connection) -> oneshot::Receiver<()> {
        let (done, recorded) = oneshot::channel();
        self.enqueue(Op::Connect { connection, done });
        recorded
    }

    pub fn disconnect(&self, client_id: String, reason: Reason) {
        self.enqueue(Op::Disconnect { client_id, reason });
    }

    /// Adds a channel member; resolves once the store has it (or could not take it).
    pub fn join(&self, channel: &str, member: Member) -> oneshot::Receiver<()> {
        let (done, joined) = oneshot::channel();
        self.enqueue(Op::Join {
            channel: channel.to_owned(),
            member,
            done: Some(done),
        });
        joined
    }

    pub fn leave(&self, channel: &str, client_id: String) {
        self.enqueue(Op::Leave {
            channel: channel.to_owned(),
            client_id,
        });
    }

    /// Notes that this replica's subscriber count of `channel` changed.
    pub fn count_changed(&self, channel: &str) {
        let mut changed = lock(&self.counts_changed);
        if !changed.contains(channel) {
            changed.insert(channel.to_owned());
            if changed.len() == 1 {
                self.counts_wake.notify_one();
            }
        }
    }

    /// Waits (at most `timeout`) for every earlier write, then marks this replica
    /// dead in the store so that whatever is left is reaped at once.
    pub async fn retire(&self, timeout: Duration) {
        let (done, retired) = oneshot::channel();
        if self.ops.send(Op::Retire(done)).await.is_ok()
            && tokio::time::timeout(timeout, retired).await.is_err()
        {
            tracing::warn!("presence writes still pending at exit; other replicas reap them");
        }
    }

    fn enqueue(&self, op: Op) {
        if self.ops.try_send(op).is_err() {
            // Whatever the write was, recording everything again makes up for it.
            self.dirty.store(true, Ordering::Release);
            self.errors.inc();
        }
    }

    fn failed(&self, what: &str, error: &PresenceError) {
        self.errors.inc();
        self.dirty.store(true, Ordering::Release);
        tracing::debug!(%error, what, "presence write failed; recorded again later");
    }
}

/// The presence task's own state.
struct Worker {
    presence: Weak<Presence>,
    effects: Weak<dyn Effects>,
    /// Empty when the store keeps everything (its copy is the only one).
    records: HashMap<String, Record>,
    /// Leftovers of an earlier process with this node id were reaped.
    started: bool,
    /// A reap found more to do.
    reaping: bool,
}

impl Worker {
    fn new(presence: Weak<Presence>, effects: Weak<dyn Effects>) -> Self {
        Self {
            presence,
            effects,
            records: HashMap::new(),
            started: false,
            reaping: false,
        }
    }

    async fn run(mut self, mut queue: mpsc::Receiver<Op>) {
        let Some(every) = self.presence.upgrade().map(|p| p.ttl / 5) else {
            return;
        };
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch = Vec::with_capacity(BATCH);
        let Some(counts_wake) = self.presence.upgrade().map(|p| Arc::clone(&p.counts_wake)) else {
            return;
        };
        loop {
            tokio::select! {
                biased;
                received = queue.recv_many(&mut batch, BATCH) => {
                    if received == 0 {
                        return;
                    }
                    let Some(presence) = self.presence.upgrade() else { return };
                    for op in batch.drain(..) {
                        self.apply(&presence, op).await;
                    }
                }
                _ = tick.tick() => {
                    let Some(presence) = self.presence.upgrade() else { return };
                    if !self.liveness(&presence).await {
                        // Not at the store yet (it connects in the background): try
                        // again soon rather than a whole beat later.
                        tick.reset_after(LIVENESS_RETRY.min(every));
                    }
                }
                () = std::future::ready(()), if self.reaping => {
                    let Some(presence) = self.presence.upgrade() else { return };
                    self.reap(&presence).await;
                }
                () = counts_wake.notified() => {}
            }
            if let Some(presence) = self.presence.upgrade() {
                self.write_counts(&presence).await;
            }
        }
    }

    async fn apply(&mut self, presence: &Presence, op: Op) {
        let store = presence.store.as_ref();
        match op {
            Op::Connect { connection, done } => {
                match timed(store.connect(&connection, presence.device_replace)).await {
                    Ok(connected) => {
                        let lifecycle = &presence.lifecycle;
                        if connected.first_of_user {
                            lifecycle.emit(Event::UserOnline, &connection, Reason::Connected);
                        }
                        lifecycle.emit(Event::DeviceOnline, &connection, Reason::Connected);
                        if !connected.replaced.is_empty()
                            && let Some(effects) = self.effects.upgrade()
                        {
                            effects.replace(&connected.replaced);
                        }
                    }
                    Err(error) => presence.failed("connect", &error),
                }
                if !store.keeps_everything() {
                    self.records.insert(
                        connection.client_id.clone(),
                        Record {
                            connection,
                            channels: BTreeSet::new(),
                        },
                    );
                }
                let _ = done.send(());
            }
            Op::Disconnect { client_id, reason } => {
                let record = self.records.remove(&client_id);
                match timed(store.disconnect(&client_id)).await {
                    Ok(gone) if gone.known => {
                        let connection = record.map(|record| record.connection).or(gone.connection);
                        if let Some(connection) = &connection {
                            let lifecycle = &presence.lifecycle;
                            lifecycle.emit(Event::DeviceOffline, connection, reason);
                            if gone.last_of_user {
                                lifecycle.emit(Event::UserOffline, connection, reason);
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(error) => presence.failed("disconnect", &error),
                }
            }
            Op::Join {
                channel,
                member,
                done,
            } => {
                if let Err(error) = timed(store.join(&channel, &member)).await {
                    presence.failed("join", &error);
                }
                if let Some(record) = self.records.get_mut(&member.client_id) {
                    record.channels.insert(channel);
                }
                if let Some(done) = done {
                    let _ = done.send(());
                }
            }
            Op::Leave { channel, client_id } => {
                if let Err(error) = timed(store.leave(&channel, &client_id)).await {
                    presence.failed("leave", &error);
                }
                if let Some(record) = self.records.get_mut(&client_id) {
                    record.channels.remove(&channel);
                }
            }
            Op::Retire(done) => {
                if let Err(error) = timed(store.retire(&presence.node_id)).await {
                    tracing::warn!(%error, "could not retire this replica from presence; its entries expire");
                }
                let _ = done.send(());
            }
        }
    }

    /// Refreshes the liveness entry; records everything again when the store does not
    /// know this replica (or a write failed); looks for dead replicas. False when the
    /// store could not be reached.
    async fn liveness(&mut self, presence: &Presence) -> bool {
        let store = presence.store.as_ref();
        if !self.started && store.keeps_everything() {
            // A new store of this process's own: nothing left by an earlier one.
            self.started = true;
        }
        if !self.started {
            match self.reap_leftovers(presence).await {
                Ok(()) => {
                    self.started = true;
                    // Whatever it removed of this process's own is recorded again.
                    presence.dirty.store(true, Ordering::Release);
                }
                Err(error) => {
                    tracing::debug!(%error, "presence store unreachable; trying again");
                    return false;
                }
            }
        }
        let beat =
            timed(store.beat(&presence.node_id, presence.started_at_ms, presence.ttl / 2)).await;
        match beat {
            Ok(beat) => {
                let dirty = presence.dirty.swap(false, Ordering::AcqRel);
                if !beat.known || dirty {
                    self.record_again(presence).await;
                }
                self.reaping = true;
                true
            }
            Err(error) => {
                presence.errors.inc();
                presence.dirty.store(true, Ordering::Release);
                tracing::debug!(%error, "presence liveness refresh failed");
                false
            }
        }
    }

    /// Removes what an earlier process with this node id left behind, reporting it as
    /// lost, before this one records anything.
    async fn reap_leftovers(&mut self, presence: &Presence) -> Result<(), PresenceError> {
        let mut total = 0;
        loop {
            let lost = timed(presence.store.reap_node(&presence.node_id, REAP_CHUNK)).await?;
            if lost.is_empty() {
                break;
            }
            // Connections this process already recorded are not leftovers.
            let leftovers: Vec<Lost> = lost
                .into_iter()
                .filter(|lost| !self.records.contains_key(&lost.connection.client_id))
                .collect();
            total += leftovers.len();
            self.report_lost(presence, &leftovers);
        }
        if total > 0 {
            tracing::info!(
                connections = total,
                "removed an earlier process's presence entries"
            );
        }
        Ok(())
    }

    /// Records every connection and membership again, quietly.
    async fn record_again(&mut self, presence: &Presence) {
        let store = presence.store.as_ref();
        let mut failed = false;
        for record in self.records.values() {
            if let Err(error) = timed(store.connect(&record.connection, false)).await {
                presence.failed("record again", &error);
                failed = true;
                break;
            }
            let member = record.connection.member();
            for channel in &record.channels {
                // Not a reason to skip its other channels: with presence sharded by
                // channel (several Redis servers), one server being down fails only its
                // own channels.
                if let Err(error) = timed(store.join(channel, &member)).await {
                    presence.failed("record again", &error);
                    failed = true;
                }
            }
        }
        if let Some(effects) = self.effects.upgrade() {
            let mut changed = lock(&presence.counts_changed);
            changed.extend(
                effects
                    .channel_counts()
                    .into_iter()
                    .map(|(channel, _)| channel),
            );
        }
        if !failed {
            tracing::info!(
                connections = self.records.len(),
                "presence recorded again (new to the store, or after failed writes)"
            );
        }
    }

    /// Reaps one chunk of dead replicas' connections.
    async fn reap(&mut self, presence: &Presence) {
        match timed(presence.store.reap(REAP_CHUNK)).await {
            Ok(lost) => {
                self.reaping = lost.len() == REAP_CHUNK;
                if !lost.is_empty() {
                    tracing::info!(
                        connections = lost.len(),
                        "reaped connections of a vanished replica"
                    );
                }
                self.report_lost(presence, &lost);
            }
            Err(error) => {
                self.reaping = false;
                presence.errors.inc();
                tracing::debug!(%error, "reaping failed; trying again at the next beat");
            }
        }
    }

    fn report_lost(&self, presence: &Presence, lost: &[Lost]) {
        let effects = self.effects.upgrade();
        for lost in lost {
            let lifecycle = &presence.lifecycle;
            lifecycle.emit(Event::DeviceOffline, &lost.connection, Reason::NodeLost);
            if lost.last_of_user {
                lifecycle.emit(Event::UserOffline, &lost.connection, Reason::NodeLost);
            }
            if let Some(effects) = &effects {
                for channel in &lost.channels {
                    effects.member_lost(channel, &lost.connection);
                }
            }
        }
    }

    async fn write_counts(&mut self, presence: &Presence) {
        let changed: Vec<String> = lock(&presence.counts_changed).drain().collect();
        if changed.is_empty() {
            return;
        }
        let Some(effects) = self.effects.upgrade() else {
            return;
        };
        let counts: Vec<(String, u64)> = changed
            .into_iter()
            .map(|channel| {
                let count = effects.subscriber_count(&channel);
                (channel, count)
            })
            .collect();
        if let Err(error) = timed(
            presence
                .store
                .set_channel_counts(&presence.node_id, &counts),
        )
        .await
        {
            presence.failed("channel counts", &error);
        }
    }
}

/// A store call that gives up after [`STORE_TIMEOUT`].
pub async fn timed<T>(
    call: impl Future<Output = Result<T, PresenceError>>,
) -> Result<T, PresenceError> {
    tokio::time::timeout(STORE_TIMEOUT, call)
        .await
        .unwrap_or(Err(PresenceError::Unreachable("presence")))
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
