//! Channel history: each publication of a channel whose namespace keeps history gets
//! the next offset (1, 2, 3, ... within an epoch) and is kept for a while, so that a
//! client can recover what it missed. One [`HistoryStore`] trait, three stores that
//! follow the backbone: [`memory`] (one process), [`redis`] (Streams) and [`nats`]
//! (JetStream). The same store remembers idempotency keys, for every channel.
//!
//! What every store guarantees:
//! - offsets of one channel are contiguous within an epoch, whoever appends: the store
//!   decides them atomically with the append;
//! - the epoch changes exactly when the store lost the channel's offsets (a Redis
//!   restarted without persistence, a stream deleted); publications that expire by
//!   their retention do not change it;
//! - a read never mixes epochs, and says which offsets are still kept, so a caller
//!   can prove that nothing is missing between what it has and what it reads, or know
//!   that it cannot.

pub mod memory;
pub mod nats;
pub mod redis;

use std::time::Duration;

use bytes::Bytes;

pub use crate::presence::StoreFuture;

/// Most publications one [`HistoryStore::read`] returns.
pub const MAX_READ: usize = 1000;

/// Why a history operation did not happen.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum HistoryError {
    /// The store cannot be reached now (connection down, timeout).
    #[error("the {0} history store is unreachable")]
    Unreachable(&'static str),
    /// The store exists but cannot keep history (e.g. NATS without JetStream).
    #[error("the {store} history store is unavailable: {reason}")]
    Unavailable { store: &'static str, reason: String },
    /// The store answered something this replica cannot read.
    #[error("the {store} history store answered unexpectedly: {reason}")]
    Corrupt { store: &'static str, reason: String },
}

/// Where a channel's history stands.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Position {
    /// The newest publication's offset; 0 before the first.
    pub offset: u64,
    /// Names the store's current run of offsets for the channel; never empty.
    pub epoch: String,
}

/// One kept publication.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Publication {
    pub offset: u64,
    /// The publication's `data`, serialised JSON, as it was published.
    pub data: Bytes,
}

/// How long and how much of a channel's history is kept (from its namespace).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Publications kept: at least this many (when younger than `ttl`), fewer than
    /// 1.2 times this many.
    pub size: usize,
    /// Publications older than this are dropped (their offsets stay used).
    pub ttl: Option<Duration>,
}

/// An idempotency key of a publish: scoped to its channel, remembered for `ttl`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Idempotency<'a> {
    pub key: &'a str,
    pub ttl: Duration,
}

/// What [`HistoryStore::append`] decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Appended {
    /// The publication's position (for a duplicate: the first one's).
    pub position: Position,
    /// The idempotency key had been used within its time: nothing was appended.
    pub duplicate: bool,
}

/// Which publications a read asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Query {
    /// Those with an offset greater than this; `None`: the newest.
    pub after: Option<u64>,
    /// At most this many (capped at [`MAX_READ`]).
    pub limit: usize,
    /// Newest first instead of oldest first. With `after`, the newest `limit` of those
    /// after it; without, the newest `limit`.
    pub reverse: bool,
}

/// The answer to a read: the publications, and the channel's state at that moment
/// (so that the publications are known to be all there is between two offsets).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Page {
    /// In the order the query asked for.
    pub publications: Vec<Publication>,
    pub position: Position,
    /// The oldest offset still kept: `position.offset + 1` when none is.
    pub oldest: u64,
}

/// Where history lives. Every call is one (or a few) round trips to the store.
pub trait HistoryStore: Send + Sync + 'static {
    /// `memory`, `redis` or `nats`, for logs and metrics.
    fn name(&self) -> &'static str;

    /// Why the store cannot keep history at all, if it cannot (e.g. NATS without
    /// JetStream). A store that is merely unreachable for now is not unhealthy here.
    fn problem(&self) -> Option<String> {
        None
    }

    /// Appends `data` to `channel`'s history with the next offset, trimming what
    /// `retention` no longer keeps. With `idempotency`, a key already used on this
    /// channel within its `ttl` appends nothing and returns the first append's
    /// position, marked duplicate.
    fn append<'a>(
        &'a self,
        channel: &'a str,
        data: &'a [u8],
        retention: Retention,
        idempotency: Option<Idempotency<'a>>,
    ) -> StoreFuture<'a, Appended, HistoryError>;

    /// `channel`'s position (creating its epoch when it has none yet).
    fn position<'a>(&'a self, channel: &'a str) -> StoreFuture<'a, Position, HistoryError>;

    /// Kept publications of `channel`, as `query` asks, with the position they are
    /// read at. Drops what `retention` no longer keeps first.
    fn read<'a>(
        &'a self,
        channel: &'a str,
        query: Query,
        retention: Retention,
    ) -> StoreFuture<'a, Page, HistoryError>;

    /// Records an idempotency key of a channel without history: true the first time
    /// within `ttl`, false for a repeat.
    fn remember<'a>(
        &'a self,
        channel: &'a str,
        key: &'a str,
        ttl: Duration,
    ) -> StoreFuture<'a, bool, HistoryError>;
}
