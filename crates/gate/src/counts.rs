//! Open connections per key (a client address, a user), capped: each admitted
//! connection holds a slot that gives its count back when dropped.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::{Arc, Mutex, MutexGuard};

const SHARDS: usize = 16;

/// Open connections per key, at most `max` each (0: no cap). Only keys with an open
/// connection are kept, so the state is bounded by the connections themselves.
#[derive(Debug)]
pub struct OpenCounts<K> {
    max: usize,
    shards: Box<[Mutex<HashMap<K, u32>>]>,
    hasher: RandomState,
}

impl<K: Hash + Eq + Clone> OpenCounts<K> {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            max,
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            hasher: RandomState::new(),
        })
    }

    /// One more connection for `key`, or `Err(max)` when it has `max` already.
    pub fn admit(self: &Arc<Self>, key: K) -> Result<OpenSlot<K>, usize> {
        if self.max == 0 {
            return Ok(OpenSlot { counts: None, key });
        }
        let mut shard = self.shard(&key);
        let count = shard.entry(key.clone()).or_insert(0);
        if *count as usize >= self.max {
            return Err(self.max);
        }
        *count += 1;
        Ok(OpenSlot {
            counts: Some(Arc::clone(self)),
            key,
        })
    }

    /// Open connections counted for `key`.
    pub fn open(&self, key: &K) -> u32 {
        self.shard(key).get(key).copied().unwrap_or(0)
    }

    fn shard(&self, key: &K) -> MutexGuard<'_, HashMap<K, u32>> {
        #[allow(clippy::cast_possible_truncation)]
        let index = (self.hasher.hash_one(key) as usize) % SHARDS;
        self.shards[index]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn release(&self, key: &K) {
        let mut shard = self.shard(key);
        if let Entry::Occupied(mut entry) = shard.entry(key.clone()) {
            *entry.get_mut() -= 1;
            if *entry.get() == 0 {
                entry.remove();
            }
        }
    }
}

/// One admitted connection for a key; gives its count back when dropped.
#[derive(Debug)]
pub struct OpenSlot<K: Hash + Eq + Clone> {
    counts: Option<Arc<OpenCounts<K>>>,
    key: K,
}

impl<K: Hash + Eq + Clone> OpenSlot<K> {
    pub fn key(&self) -> &K {
        &self.key
    }
}

impl<K: Hash + Eq + Clone> Drop for OpenSlot<K> {
    fn drop(&mut self) {
        if let Some(counts) = &self.counts {
            counts.release(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_counts_open_slots_per_key() {
        let counts = OpenCounts::new(2);
        let first = counts.admit("a").expect("one");
        let _second = counts.admit("a").expect("two");
        assert_eq!(counts.admit("a").map(|_| ()), Err(2));
        assert!(counts.admit("b").is_ok(), "another key");
        drop(first);
        assert_eq!(counts.open(&"a"), 1);
        assert!(counts.admit("a").is_ok(), "a slot was released");
        let unlimited = OpenCounts::new(0);
        for _ in 0..10 {
            std::mem::forget(unlimited.admit("x").expect("no cap"));
        }
        assert_eq!(unlimited.open(&"x"), 0, "nothing is tracked without a cap");
    }
}
