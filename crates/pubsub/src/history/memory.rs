//! History in this process's memory: the store of the `local` backbone (replicas on
//! one [`crate::local::LocalBus`] share one [`MemoryHistory`]), and the reference for
//! what the other stores must do.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{
    Appended, HistoryError, HistoryStore, Idempotency, MAX_READ, Page, Position, Publication,
    Query, Retention, StoreFuture,
};

/// Idempotency keys remembered at most, over all channels: past this the oldest are
/// forgotten first (their time may not be over, which only risks a duplicate).
const MAX_KEYS: usize = 1 << 20;

/// One channel's run of offsets.
struct Log {
    epoch: String,
    offset: u64,
    /// Kept publications, oldest first, with when they were appended.
    entries: VecDeque<(Publication, Instant)>,
}

impl Log {
    fn new() -> Self {
        Self {
            epoch: new_epoch(),
            offset: 0,
            entries: VecDeque::new(),
        }
    }

    fn position(&self) -> Position {
        Position {
            offset: self.offset,
            epoch: self.epoch.clone(),
        }
    }

    /// Drops what `retention` no longer keeps.
    fn trim(&mut self, retention: Retention, now: Instant) {
        while self.entries.len() > retention.size {
            self.entries.pop_front();
        }
        if let Some(ttl) = retention.ttl {
            while self
                .entries
                .front()
                .is_some_and(|(_, at)| now.duration_since(*at) >= ttl)
            {
                self.entries.pop_front();
            }
        }
    }

    fn oldest(&self) -> u64 {
        self.entries
            .front()
            .map_or(self.offset + 1, |(publication, _)| publication.offset)
    }
}

/// A random epoch name: 16 hex digits.
pub fn new_epoch() -> String {
    format!("{:016x}", rand::random::<u64>())
}

#[derive(Default)]
struct State {
    logs: HashMap<String, Log>,
    /// (channel, key) to the first append's position (`None` for channels without
    /// history) and when the key's time ends.
    keys: HashMap<(String, String), (Option<Position>, Instant)>,
    /// Keys in the order they were remembered, to forget the oldest.
    key_order: VecDeque<(String, String)>,
}

impl State {
    fn log(&mut self, channel: &str) -> &mut Log {
        self.logs.entry(channel.to_owned()).or_insert_with(Log::new)
    }

    /// The key's remembered answer while its time is not over.
    fn recall(&mut self, channel: &str, key: &str, now: Instant) -> Option<Option<Position>> {
        let id = (channel.to_owned(), key.to_owned());
        match self.keys.get(&id) {
            Some((position, until)) if *until > now => Some(position.clone()),
            Some(_) => {
                self.keys.remove(&id);
                None
            }
            None => None,
        }
    }

    fn remember(&mut self, channel: &str, key: &str, position: Option<Position>, ttl: Duration) {
        let id = (channel.to_owned(), key.to_owned());
        if self
            .keys
            .insert(id.clone(), (position, Instant::now() + ttl))
            .is_none()
        {
            self.key_order.push_back(id);
        }
        while self.key_order.len() > MAX_KEYS {
            if let Some(oldest) = self.key_order.pop_front() {
                self.keys.remove(&oldest);
            }
        }
    }
}

/// History held in this process. Clones share one state.
#[derive(Clone, Default)]
pub struct MemoryHistory {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for MemoryHistory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryHistory").finish_non_exhaustive()
    }
}

impl MemoryHistory {
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets every channel and key, as a store restarted empty would (tests).
    pub fn lose_everything(&self) {
        *self.state() = State::default();
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn ready<'a, T: Send + 'a>(value: T) -> StoreFuture<'a, T, HistoryError> {
    Box::pin(std::future::ready(Ok(value)))
}

impl HistoryStore for MemoryHistory {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn append<'a>(
        &'a self,
        channel: &'a str,
        data: &'a [u8],
        retention: Retention,
        idempotency: Option<Idempotency<'a>>,
    ) -> StoreFuture<'a, Appended, HistoryError> {
        let now = Instant::now();
        let mut state = self.state();
        if let Some(Idempotency { key, .. }) = idempotency
            && let Some(Some(position)) = state.recall(channel, key, now)
        {
            return ready(Appended {
                position,
                duplicate: true,
            });
        }
        let log = state.log(channel);
        log.offset += 1;
        let publication = Publication {
            offset: log.offset,
            data: Bytes::copy_from_slice(data),
        };
        log.entries.push_back((publication, now));
        log.trim(retention, now);
        let position = log.position();
        if let Some(Idempotency { key, ttl }) = idempotency {
            state.remember(channel, key, Some(position.clone()), ttl);
        }
        ready(Appended {
            position,
            duplicate: false,
        })
    }

    fn position<'a>(&'a self, channel: &'a str) -> StoreFuture<'a, Position, HistoryError> {
        let position = self.state().log(channel).position();
        ready(position)
    }

    fn read<'a>(
        &'a self,
        channel: &'a str,
        query: Query,
        retention: Retention,
    ) -> StoreFuture<'a, Page, HistoryError> {
        let now = Instant::now();
        let mut state = self.state();
        let log = state.log(channel);
        log.trim(retention, now);
        let limit = query.limit.min(MAX_READ);
        let kept = log
            .entries
            .iter()
            .map(|(publication, _)| publication)
            .filter(|publication| query.after.is_none_or(|after| publication.offset > after));
        let publications: Vec<Publication> = match (query.after, query.reverse) {
            (Some(_), false) => kept.take(limit).cloned().collect(),
            (_, _) => {
                let all: Vec<&Publication> = kept.collect();
                let newest = &all[all.len().saturating_sub(limit)..];
                let mut page: Vec<Publication> = newest.iter().map(|p| (*p).clone()).collect();
                if query.reverse {
                    page.reverse();
                }
                page
            }
        };
        let page = Page {
            publications,
            position: log.position(),
            oldest: log.oldest(),
        };
        ready(page)
    }

    fn remember<'a>(
        &'a self,
        channel: &'a str,
        key: &'a str,
        ttl: Duration,
    ) -> StoreFuture<'a, bool, HistoryError> {
        let mut state = self.state();
        let first = state.recall(channel, key, Instant::now()).is_none();
        if first {
            state.remember(channel, key, None, ttl);
        }
        ready(first)
    }
}
