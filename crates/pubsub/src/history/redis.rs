//! History in Redis Streams (7.0 or later; with several shards, each channel on its own), on one dedicated `fred`
//! client that reconnects forever (`crate::redis::link::StoreLink`, the machinery
//! shared with the backbone and the presence store). While it is disconnected every call fails at once
//! with [`HistoryError::Unreachable`].
//!
//! This store owns, per channel with history, its offsets and epoch, its kept
//! publications and, per channel, the idempotency keys of publishes. Every call is one
//! round trip: an append, a position and a read are each one Lua script (run with
//! EVALSHA, loaded again on NOSCRIPT), so the offset and epoch are decided atomically
//! with the entry, and a page is read at exactly the position it reports. Time is
//! Redis's clock (`TIME` in the scripts, `PX` expiries), so replicas with skewed
//! clocks agree on what expired. Commands are never written twice (fred would replay
//! one whose reply a dropped connection lost): an append replayed would be published
//! twice.
//!
//! # Keys
//!
//! Every key is `<prefix>|<kind>|<name>`, as the presence store's (whose kinds are other
//! words): the prefix cannot contain `|`, so a key names exactly one (cluster, kind,
//! name) even though channel names may contain anything.
//!
//! | key | type | holds |
//! |---|---|---|
//! | `hm\|<channel>` | HASH | `e`: the epoch; `o`: the newest offset; `t`: the newest entry's time (ms) |
//! | `hs\|<channel>` | STREAM | the kept publications: id `<offset>-<ms>`, one field `d`, the data |
//! | `hi\|<n>\|<channel>\|<key>` | STRING | an idempotency key: `<offset>:<epoch>` of the first append, or `""` on a channel without history |
//!
//! In `hi`, `<n>` is the channel's length in bytes, which says where the channel ends
//! and the key begins. In a Redis Cluster the channel's hash tag follows `<prefix>|`
//! (`<prefix>|{<prefix>|<i>}hm|<channel>`, see [`crate::redis::channel_tag`]): a
//! channel's keys share one slot with its topic and its presence.
//!
//! Entries are contiguous (trimmed only from the oldest end), so the oldest kept offset
//! is the newest minus the stream's length, plus one. A stream id's first part is the
//! offset, so `XRANGE` reads by offset; its second part is the entry's time, never
//! less than the previous entry's, so the first entry younger than the `ttl` is found
//! by a binary search over offsets and everything before it goes with one
//! `XTRIM MINID`. Size is trimmed exactly (`MAXLEN =`).
//!
//! # Lifetimes
//!
//! - With a `ttl`, the stream expires `ttl` after the last append (all its entries have
//!   expired by then), and the meta `max(10 × ttl, 1 day)` after it. A channel idle for
//!   longer than that starts a new epoch at its next use: harmless, its history is gone
//!   anyway, and subscribers are told the epoch changed.
//! - Without one, both persist (the stream is bounded by the size). A meta created by a
//!   position or a read, before any append, expires after a day.
//! - When the meta is gone (Redis restarted empty, FLUSHALL, an eviction), the next call
//!   starts a new random epoch at offset 0 and deletes any stream left from the old one.

use std::time::Duration;

use bytes::Bytes;
use fred::prelude::Value;

use super::{
    Appended, HistoryError, HistoryStore, Idempotency, MAX_READ, Page, Position, Publication,
    Query, Retention, StoreFuture,
};
use crate::history::memory::new_epoch;
use crate::redis::link::{
    Failure, NAME, Script, StoreLink, array, bytes, integer, millis, text, valid_prefix,
};

/// Longest `ttl` passed to Redis (about 35 years): ten times it must still be a valid
/// expiry.
const MAX_TTL_MS: u64 = 1 << 40;

/// Helpers every script starts with. `KEYS[1]` is the channel's meta, `KEYS[2]` its stream.
macro_rules! prelude {
    () => {
        r#"
local META, STREAM = KEYS[1], KEYS[2]
local DAY_MS = 86400000

-- Milliseconds on Redis's clock.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- An integral number as Redis reads it (tostring would switch to exponents).
local function int(n)
  return string.format('%.0f', n)
end

-- The channel's epoch, newest offset and newest entry's time. A channel without them
-- starts a new epoch (`candidate`) at offset 0, alive for `life_ms`, and drops any
-- stream left from an epoch that is gone (UNLINK: freed in the background, however big).
local function meta(candidate, life_ms)
  local m = redis.call('HMGET', META, 'e', 'o', 't')
  if m[1] then
    return m[1], tonumber(m[2]) or 0, tonumber(m[3]) or 0
  end
  redis.call('UNLINK', STREAM)
  redis.call('HSET', META, 'e', candidate, 'o', 0, 't', 0)
  redis.call('PEXPIRE', META, int(life_ms))
  return candidate, 0, 0
end

-- How long the meta lives: well past its entries, so that expiry keeps the epoch.
local function meta_life(ttl_ms)
  if ttl_ms and ttl_ms * 10 > DAY_MS then
    return ttl_ms * 10
  end
  return DAY_MS
end

-- The time (ms) in the id of the entry at `offset`, or nil if it is not kept.
local function time_at(offset)
  local found = redis.call('XRANGE', STREAM, int(offset), int(offset))
  if #found == 0 then
    return nil
  end
  return tonumber(string.match(found[1][1], '%-(%d+)$'))
end

-- Drops the entries appended at or before `cutoff` (ms). Times grow with offsets, so
-- the first entry to keep is found by a binary search: O(log n) probes, whatever
-- expired. The common cases (nothing expired, everything expired) take one.
local function expire(offset, newest_ms, cutoff)
  local kept = redis.call('XLEN', STREAM)
  if kept == 0 then
    return
  end
  if newest_ms <= cutoff then
    redis.call('UNLINK', STREAM)
    return
  end
  local lo = offset - kept + 1
  local t = time_at(lo)
  if t and t > cutoff then
    return
  end
  -- `lo` goes, `hi` stays.
  local hi = offset
  while hi - lo > 1 do
    local mid = math.floor((lo + hi) / 2)
    t = time_at(mid)
    if t and t > cutoff then
      hi = mid
    else
      lo = mid
    end
  end
  redis.call('XTRIM', STREAM, 'MINID', '=', int(hi) .. '-0')
end
"#
    };
}

/// KEYS: meta, stream, and the idempotency key if any. ARGV: epoch candidate, data,
/// size, ttl ms (`""`: none), idempotency ttl ms. Returns {duplicate, offset, epoch}.
const APPEND: &str = concat!(
    prelude!(),
    r#"
local KEY = KEYS[3]
if KEY then
  local first = redis.call('GET', KEY)
  if first and first ~= '' then
    local offset, epoch = string.match(first, '^(%d+):(.+)$')
    if offset then
      return {1, offset, epoch}
    end
  end
end
local ttl = tonumber(ARGV[4])
local life = meta_life(ttl)
local epoch, offset, newest = meta(ARGV[1], life)
local now = now_ms()
-- Entry times never go back, even if Redis's clock does: the binary search needs it.
if now > newest then
  newest = now
end
offset = redis.call('HINCRBY', META, 'o', 1)
redis.call('HSET', META, 't', int(newest))
redis.call('XADD', STREAM, 'MAXLEN', '=', ARGV[3], int(offset) .. '-' .. int(newest), 'd', ARGV[2])
if ttl then
  redis.call('PEXPIRE', STREAM, int(ttl))
  redis.call('PEXPIRE', META, int(life))
  expire(offset, newest, now - ttl)
else
  redis.call('PERSIST', STREAM)
  redis.call('PERSIST', META)
end
if KEY then
  redis.call('SET', KEY, int(offset) .. ':' .. epoch, 'PX', ARGV[5])
end
return {0, int(offset), epoch}
"#
);

/// KEYS: meta, stream. ARGV: epoch candidate. Returns {offset, epoch}.
const POSITION: &str = concat!(
    prelude!(),
    r#"
local epoch, offset = meta(ARGV[1], DAY_MS)
return {int(offset), epoch}
"#
);

/// KEYS: meta, stream. ARGV: epoch candidate, size, ttl ms (`""`: none), mode (`after`,
/// `after-reverse`, `newest`, `newest-reverse`), first id (for `after`), limit.
/// Returns {offset, epoch, oldest, offset, data, offset, data, ...}.
const READ: &str = concat!(
    prelude!(),
    r#"
local ttl = tonumber(ARGV[3])
local epoch, offset, newest = meta(ARGV[1], meta_life(ttl))
redis.call('XTRIM', STREAM, 'MAXLEN', '=', ARGV[2])
if ttl then
  expire(offset, newest, now_ms() - ttl)
end
local mode, limit = ARGV[4], tonumber(ARGV[6])
local entries = {}
if limit > 0 then
  if mode == 'after' then
    entries = redis.call('XRANGE', STREAM, ARGV[5], '+', 'COUNT', limit)
  elseif mode == 'after-reverse' then
    entries = redis.call('XREVRANGE', STREAM, '+', ARGV[5], 'COUNT', limit)
  else
    entries = redis.call('XREVRANGE', STREAM, '+', '-', 'COUNT', limit)
  end
end
local out = {int(offset), epoch, int(offset - redis.call('XLEN', STREAM) + 1)}
local function add(entry)
  out[#out + 1] = string.match(entry[1], '^(%d+)')
  out[#out + 1] = entry[2][2]
end
if mode == 'newest' then
  for i = #entries, 1, -1 do
    add(entries[i])
  end
else
  for _, entry in ipairs(entries) do
    add(entry)
  end
end
return out
"#
);

#[derive(Debug)]
struct Scripts {
    append: Script,
    position: Script,
    read: Script,
}

/// History in a Redis server, shared by every replica of a cluster that uses the same
/// server and prefix.
pub struct RedisHistory {
    /// One per shard, in configured order; a channel's history is on
    /// `links[shard_of(channel)]`, the shard that carries the channel's topic. Each
    /// fails every call at once while disconnected, and never writes a command twice.
    links: Vec<StoreLink>,
    /// `"<prefix>|"`, the start of every key.
    prefix: String,
    /// In a Redis Cluster, the topic prefix: each channel's keys carry its channel's
    /// hash tag (see `start`).
    cluster: Option<String>,
    scripts: Scripts,
}

impl std::fmt::Debug for RedisHistory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisHistory")
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

impl From<Failure> for HistoryError {
    fn from(failure: Failure) -> Self {
        match failure {
            Failure::Unreachable => Self::Unreachable(NAME),
            Failure::Unavailable(reason) => Self::Unavailable {
                store: NAME,
                reason,
            },
            Failure::Corrupt(reason) => Self::Corrupt {
                store: NAME,
                reason,
            },
        }
    }
}

/// Starts connecting to the Redis server at `url` and returns at once; keys start with
/// `prefix` (the cluster's topic prefix, `[A-Za-z0-9_.:-]+`). `url` may be a
/// comma-separated list of servers (the backbone's shards, in the same order): each
/// channel's history then lives on the server that carries the channel's topic
/// ([`crate::shards`]).
///
/// Fails only for a malformed URL or prefix. A server that is down is retried forever;
/// meanwhile calls fail with [`HistoryError::Unreachable`].
pub async fn connect(url: &str, prefix: &str) -> Result<RedisHistory, HistoryError> {
    if !valid_prefix(prefix) {
        return Err(HistoryError::Unavailable {
            store: NAME,
            reason: format!("invalid key prefix {prefix:?}: expected [A-Za-z0-9_.:-]+"),
        });
    }
    let urls = crate::redis::shard_urls(url).map_err(|error| HistoryError::Unavailable {
        store: NAME,
        reason: error.to_string(),
    })?;
    let links = urls
        .iter()
        .map(|url| StoreLink::connect(url, "history"))
        .collect::<Result<Vec<_>, _>>()?;
    let cluster = links
        .iter()
        .any(StoreLink::is_cluster)
        .then(|| prefix.to_owned());
    Ok(RedisHistory {
        links,
        cluster,
        prefix: format!("{prefix}|"),
        scripts: Scripts {
            append: Script::new(APPEND),
            position: Script::new(POSITION),
            read: Script::new(READ),
        },
    })
}

impl RedisHistory {
    /// Whether the connection to every Redis server is up.
    pub fn is_connected(&self) -> bool {
        self.links.iter().all(StoreLink::is_connected)
    }

    /// Waits until every connection is up, for at most `timeout`; returns whether it is.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        crate::poll_until(timeout, Duration::from_millis(10), || self.is_connected()).await
    }

    /// The connection to the server that holds `channel`'s history.
    fn link(&self, channel: &str) -> &StoreLink {
        &self.links[crate::shards::shard_of(channel, self.links.len())]
    }

    /// The start of `channel`'s keys: `<prefix>|`, and in a Redis Cluster the
    /// channel's hash tag ([`crate::redis::channel_tag`]), which puts all of them in
    /// one slot, as scripts need, and in the slot of the channel's topic and presence.
    fn start(&self, channel: &str) -> String {
        match &self.cluster {
            Some(prefix) => format!(
                "{}{}",
                self.prefix,
                crate::redis::channel_tag(prefix, channel)
            ),
            None => self.prefix.clone(),
        }
    }

    /// The channel's meta and stream keys, the KEYS every script starts with.
    fn channel_keys(&self, channel: &str) -> Vec<Value> {
        let start = self.start(channel);
        vec![
            Value::from(format!("{start}hm|{channel}")),
            Value::from(format!("{start}hs|{channel}")),
        ]
    }

    fn idempotency_key(&self, channel: &str, key: &str) -> Value {
        Value::from(format!(
            "{}hi|{}|{channel}|{key}",
            self.start(channel),
            channel.len()
        ))
    }
}

/// Milliseconds as Redis expiries take them: at least 1 (0 is refused), at most
/// [`MAX_TTL_MS`].
fn expiry_ms(duration: Duration) -> u64 {
    millis(duration).clamp(1, MAX_TTL_MS)
}

/// A `ttl` as the scripts take it: `""` for none; 0 stays 0 (everything expires).
fn ttl_arg(ttl: Option<Duration>) -> Value {
    match ttl {
        Some(ttl) => Value::from(millis(ttl).min(MAX_TTL_MS).to_string()),
        None => Value::from(""),
    }
}

fn position(offset: &Value, epoch: &Value) -> Result<Position, Failure> {
    let epoch = text(epoch)?;
    if epoch.is_empty() {
        return Err(Failure::Corrupt("an empty epoch".to_owned()));
    }
    Ok(Position {
        offset: integer(offset)?,
        epoch,
    })
}

/// A publication's data, without copying it.
fn data(value: Value) -> Result<Bytes, Failure> {
    match value {
        Value::Bytes(bytes) => Ok(bytes),
        Value::String(text) => Ok(text.into_inner()),
        other => bytes(&other).map(Bytes::copy_from_slice),
    }
}

fn short(what: &str) -> Failure {
    Failure::Corrupt(format!("a short {what} reply"))
}

impl HistoryStore for RedisHistory {
    fn name(&self) -> &'static str {
        NAME
    }

    fn append<'a>(
        &'a self,
        channel: &'a str,
        data: &'a [u8],
        retention: Retention,
        idempotency: Option<Idempotency<'a>>,
    ) -> StoreFuture<'a, Appended, HistoryError> {
        Box::pin(async move {
            let mut keys = self.channel_keys(channel);
            let mut key_ttl = Value::from("0");
            if let Some(Idempotency { key, ttl }) = idempotency {
                keys.push(self.idempotency_key(channel, key));
                key_ttl = Value::from(expiry_ms(ttl).to_string());
            }
            let args = vec![
                Value::from(new_epoch()),
                Value::Bytes(Bytes::copy_from_slice(data)),
                Value::from(retention.size.to_string()),
                ttl_arg(retention.ttl),
                key_ttl,
            ];
            let reply = array(
                self.link(channel)
                    .run(&self.scripts.append, keys, args)
                    .await?,
            )?;
            let [duplicate, offset, epoch] = reply.as_slice() else {
                return Err(short("append").into());
            };
            Ok(Appended {
                position: position(offset, epoch)?,
                duplicate: integer(duplicate)? != 0,
            })
        })
    }

    fn position<'a>(&'a self, channel: &'a str) -> StoreFuture<'a, Position, HistoryError> {
        Box::pin(async move {
            let keys = self.channel_keys(channel);
            let args = vec![Value::from(new_epoch())];
            let reply = array(
                self.link(channel)
                    .run(&self.scripts.position, keys, args)
                    .await?,
            )?;
            let [offset, epoch] = reply.as_slice() else {
                return Err(short("position").into());
            };
            Ok(position(offset, epoch)?)
        })
    }

    fn read<'a>(
        &'a self,
        channel: &'a str,
        query: Query,
        retention: Retention,
    ) -> StoreFuture<'a, Page, HistoryError> {
        Box::pin(async move {
            let mode = match (query.after.is_some(), query.reverse) {
                (true, false) => "after",
                (true, true) => "after-reverse",
                (false, false) => "newest",
                (false, true) => "newest-reverse",
            };
            // Offsets after `after` start at the id `<after + 1>-0`.
            let first = query.after.map_or(String::new(), |after| {
                format!("{}-0", after.saturating_add(1))
            });
            let limit = query.limit.min(MAX_READ);
            let args = vec![
                Value::from(new_epoch()),
                Value::from(retention.size.to_string()),
                ttl_arg(retention.ttl),
                Value::from(mode),
                Value::from(first),
                Value::from(limit.to_string()),
            ];
            let keys = self.channel_keys(channel);
            let reply = array(
                self.link(channel)
                    .run(&self.scripts.read, keys, args)
                    .await?,
            )?;
            let mut reply = reply.into_iter();
            let (Some(offset), Some(epoch), Some(oldest)) =
                (reply.next(), reply.next(), reply.next())
            else {
                return Err(short("read").into());
            };
            let mut publications = Vec::with_capacity(reply.len() / 2);
            while let (Some(offset), Some(value)) = (reply.next(), reply.next()) {
                publications.push(Publication {
                    offset: integer(&offset)?,
                    data: data(value)?,
                });
            }
            Ok(Page {
                publications,
                position: position(&offset, &epoch)?,
                oldest: integer(&oldest)?,
            })
        })
    }

    fn remember<'a>(
        &'a self,
        channel: &'a str,
        key: &'a str,
        ttl: Duration,
    ) -> StoreFuture<'a, bool, HistoryError> {
        Box::pin(async move {
            let args = vec![
                self.idempotency_key(channel, key),
                Value::from(""),
                Value::from("NX"),
                Value::from("PX"),
                Value::from(expiry_ms(ttl).to_string()),
            ];
            // "OK" when set, nil when the key was already there.
            let reply = self.link(channel).command("SET", args).await?;
            Ok(!reply.is_null())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiries_are_valid_for_redis() {
        assert_eq!(expiry_ms(Duration::ZERO), 1);
        assert_eq!(expiry_ms(Duration::from_millis(600)), 600);
        assert_eq!(expiry_ms(Duration::MAX), MAX_TTL_MS);
        assert_eq!(ttl_arg(None), Value::from(""));
        assert_eq!(ttl_arg(Some(Duration::ZERO)), Value::from("0"));
        assert_eq!(
            ttl_arg(Some(Duration::from_secs(300))),
            Value::from("300000")
        );
    }

    #[test]
    fn replies_are_checked() {
        assert_eq!(
            position(&Value::from("7"), &Value::from("00ff")),
            Ok(Position {
                offset: 7,
                epoch: "00ff".into()
            })
        );
        assert!(matches!(
            position(&Value::Integer(7), &Value::from("")),
            Err(Failure::Corrupt(_))
        ));
        let raw = Bytes::from_static(&[0, 255, b'{']);
        assert_eq!(data(Value::Bytes(raw.clone())), Ok(raw));
        assert_eq!(data(Value::from("{}")), Ok(Bytes::from_static(b"{}")));
        assert!(matches!(data(Value::Integer(1)), Err(Failure::Corrupt(_))));
    }
}
