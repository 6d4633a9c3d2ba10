//! Several backbone servers as one: topics are spread over the shards by consistent
//! hashing, so each shard carries only its share of the traffic and of the
//! subscriptions.
//!
//! # Which shard
//!
//! A topic's shard is [`shard_of`] its [`shard_key`]: what follows the topic's first
//! `/`, or the whole topic when it has none. The server's channel topics are
//! `<prefix>/<channel>`, so a channel's key is its name, and the history store puts
//! the channel's history on [`shard_of`] the same name: a channel's publications and
//! its history live on the same server. Per-user, per-device and per-node topics
//! (`<prefix>#u/<user>`, ...) are spread the same way by their names; the broadcast
//! topic (`<prefix>`, no `/`) lives on the shard of its whole name.
//!
//! [`shard_of`] is jump consistent hashing (Lamping and Veach, 2014) over the shard
//! list in its configured order. Going from `n` to `n + 1` shards moves only the keys
//! that now hash to the new, last shard (about `1 / (n + 1)` of them); every other key
//! stays where it was. New shards must therefore be added at the end of the list;
//! reordering or removing one moves most keys.
//!
//! # State
//!
//! The composite is connected when every shard is; [`Backbone::topic_connected`] says
//! whether one topic's shard is, so an outage of one shard only affects its own
//! topics. The generation is the sum of the shards' generations, so it changes when any
//! shard reconnects; [`Backbone::topic_generation`] is the topic's own shard's.

use bytes::Bytes;

use crate::{Backbone, Held, Pending, PubsubError};

/// The part of `topic` that decides its shard: what follows its first `/`, or the
/// whole topic.
pub fn shard_key(topic: &str) -> &str {
    topic.split_once('/').map_or(topic, |(_, name)| name)
}

/// The shard (0 to `shards - 1`) of `key` among `shards` shards; 0 when there are
/// fewer than two.
pub fn shard_of(key: &str, shards: usize) -> usize {
    jump(hash(key.as_bytes()), shards)
}

/// A 64-bit FNV-1a hash, stable across processes, versions and platforms (unlike the
/// standard library's), finished with a mixer so that similar names spread well.
pub fn hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64's finaliser.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Jump consistent hash: the bucket of `key` among `buckets`.
fn jump(mut key: u64, buckets: usize) -> usize {
    let buckets = i64::try_from(buckets).unwrap_or(i64::MAX);
    let (mut b, mut j): (i64, i64) = (-1, 0);
    while j < buckets {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        // (b + 1) * 2^31 / ((key >> 33) + 1), in floating point as in the paper.
        #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
        {
            j = ((b + 1) as f64 * ((1_i64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
        }
    }
    usize::try_from(b.max(0)).unwrap_or(0)
}

/// Backbones of several servers used as one, each topic on one of them.
pub struct ShardedBackbone {
    shards: Vec<Box<dyn Backbone>>,
}

impl std::fmt::Debug for ShardedBackbone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedBackbone")
            .field("shards", &self.shards_connected())
            .finish()
    }
}

impl ShardedBackbone {
    /// `shards` in their configured order (the order decides where each topic goes).
    /// All of them must deliver what they receive to the same place.
    ///
    /// # Panics
    ///
    /// When `shards` is empty.
    pub fn new(shards: Vec<Box<dyn Backbone>>) -> Self {
        assert!(!shards.is_empty(), "a sharded backbone needs a shard");
        Self { shards }
    }

    /// The shard that carries `topic`.
    pub fn shard(&self, topic: &str) -> &dyn Backbone {
        self.shards[shard_of(shard_key(topic), self.shards.len())].as_ref()
    }
}

impl Backbone for ShardedBackbone {
    fn adapter(&self) -> &'static str {
        self.shards[0].adapter()
    }

    fn is_connected(&self) -> bool {
        self.shards.iter().all(|shard| shard.is_connected())
    }

    fn topic_connected(&self, topic: &str) -> bool {
        self.shard(topic).is_connected()
    }

    fn shards_connected(&self) -> Vec<bool> {
        self.shards
            .iter()
            .map(|shard| shard.is_connected())
            .collect()
    }

    fn publish(&self, topic: &str, payload: Bytes) -> Result<(), PubsubError> {
        self.shard(topic).publish(topic, payload)
    }

    fn subscribe(&self, topic: &str) -> Result<Held, PubsubError> {
        self.shard(topic).subscribe(topic)
    }

    fn unsubscribe(&self, topic: &str) -> Result<(), PubsubError> {
        self.shard(topic).unsubscribe(topic)
    }

    fn generation(&self) -> u64 {
        self.shards
            .iter()
            .fold(0, |sum, shard| sum.wrapping_add(shard.generation()))
    }

    fn topic_generation(&self, topic: &str) -> u64 {
        self.shard(topic).generation()
    }

    fn flush(&self) -> Pending {
        let flushes: Vec<Pending> = self.shards.iter().map(|shard| shard.flush()).collect();
        Box::pin(async move {
            futures_util::future::join_all(flushes).await;
        })
    }

    fn dropped_published(&self) -> u64 {
        self.shards
            .iter()
            .map(|shard| shard.dropped_published())
            .sum()
    }

    fn dropped_received(&self) -> u64 {
        self.shards
            .iter()
            .map(|shard| shard.dropped_received())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_topics_shard_by_the_channel_name() {
        assert_eq!(shard_key("websocket.broadcast/chat:1"), "chat:1");
        assert_eq!(shard_key("p/a/b"), "a/b");
        assert_eq!(shard_key("p#u/alice"), "alice");
        assert_eq!(shard_key("websocket.broadcast"), "websocket.broadcast");
        for n in 1..8 {
            assert_eq!(shard_of("any", 1), 0);
            assert!(shard_of("any", n) < n);
        }
        assert_eq!(shard_of("any", 0), 0);
    }

    #[test]
    fn the_hash_is_stable() {
        // Placement must never change between versions: replicas of two versions must
        // agree on every channel's shard during a rolling upgrade, and the history of a
        // channel must stay where it is.
        let placed: Vec<usize> = (0..12).map(|i| shard_of(&format!("chat:{i}"), 3)).collect();
        assert_eq!(placed, REFERENCE, "{placed:?}");
        assert_eq!(hash(b"chorus"), REFERENCE_HASH, "{:#x}", hash(b"chorus"));
    }

    // Checked against an independent implementation of FNV-1a, splitmix64 and jump hash.
    const REFERENCE: [usize; 12] = [2, 0, 0, 2, 0, 2, 1, 2, 0, 2, 0, 0];
    const REFERENCE_HASH: u64 = 0x82a2_4e7a_c260_e06d;

    #[test]
    fn adding_a_shard_moves_only_keys_to_it_and_keys_spread_evenly() {
        const KEYS: usize = 60_000;
        let keys: Vec<String> = (0..KEYS).map(|i| format!("room:{i}")).collect();
        for n in 1..10 {
            let mut per_shard = vec![0usize; n + 1];
            let mut moved = 0usize;
            for key in &keys {
                let before = shard_of(key, n);
                let after = shard_of(key, n + 1);
                per_shard[after] += 1;
                if before != after {
                    assert_eq!(
                        after, n,
                        "{key} moved from {before} to an old shard {after}"
                    );
                    moved += 1;
                }
            }
            let fair = KEYS / (n + 1);
            // About a share each: within 5 % of a fair share.
            for (shard, count) in per_shard.iter().enumerate() {
                assert!(
                    count.abs_diff(fair) * 20 < fair,
                    "{n}+1 shards: shard {shard} has {count}, fair is {fair}"
                );
            }
            assert!(
                moved.abs_diff(fair) * 20 < fair,
                "{moved} moved, fair {fair}"
            );
        }
    }
}
