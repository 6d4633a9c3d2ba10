//! Presence in Redis (one server, 7.0 or later; with several shards, one store per
//! server under [`ShardedPresence`], see [`connect_shards`]), on one dedicated `fred` client that
//! reconnects forever (`crate::redis::link::StoreLink`, shared with the backbone and the
//! history store). While it is disconnected every call fails at once with
//! [`PresenceError::Unreachable`].
//!
//! Every operation is one Lua script run with EVALSHA, so what reads and then writes is
//! atomic, and every call is one round trip. Scripts are loaded with SCRIPT LOAD the
//! first time they are needed, and again when Redis answers NOSCRIPT (a restarted
//! server has forgotten them). Liveness deadlines are taken from Redis's clock (`TIME`
//! inside the scripts), so replicas with skewed clocks agree on who is alive. Reaping
//! pops at most `limit` connections per script, so no script walks the whole data set:
//! Redis also carries the cluster's pub/sub and runs one script at a time. Commands are
//! never written twice (fred would replay one whose reply a dropped connection lost):
//! a reaping script run twice would hand its first batch to nobody.
//!
//! The scripts build key names from their arguments rather than declaring them as
//! KEYS: fine on one server. In a Redis Cluster the prefix becomes `{<prefix>}`, a hash
//! tag that puts every key in one slot, and the scripts are sent to that slot's node:
//! one store lives on one node of the cluster, because a connection's transitions span
//! its channels atomically. [`connect_shards`] spreads channel presence: over a list
//! of servers, each channel's members on the channel's server and connections on the
//! first; over a cluster, on [`CLUSTER_SHARDS`] stores, each with its own hash tag
//! `{<prefix>|<i>}` (the first keeps `{<prefix>}`), so over its masters, each channel
//! under the tag its topic and history carry ([`crate::redis::channel_tag`]).
//!
//! # Keys
//!
//! Every key is `<prefix>|<kind>` or `<prefix>|<kind>|<name>`. The prefix (the
//! cluster's topic prefix) cannot contain `|` and the kinds are fixed words, so a key
//! names exactly one (cluster, kind, name) even though names may contain anything:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `nodes` | ZSET | node id → liveness deadline (ms, Redis clock) |
//! | `nodeinfo` | HASH | node id → `started_at_ms` |
//! | `conn` | HASH | client id → connection record |
//! | `nk\|<node>` | SET | client ids of the node's recorded connections |
//! | `no\|<node>` | SET | client ids of the node that joined channels while not recorded |
//! | `u\|<user>` | HASH | client id → `""`, or `"+<device>"` |
//! | `d\|<device>` | HASH | client id → `""` |
//! | `kc` | HASH | client id → the channels it is a member of (a MessagePack array) |
//! | `cm\|<channel>` | HASH | client id → member record |
//! | `cz\|<channel>` | ZSET | client ids, all scored 0, for exact paging BYLEX |
//! | `cu\|<channel>` | HASH | user → how many of the channel's members are theirs |
//! | `ch\|<node>` | HASH | channel → the node's subscriber count |
//!
//! Small sets that are per user or per device are hashes with empty values: Redis 7.0
//! keeps small hashes as compact listpacks but small sets of strings as hash tables.
//! A client's channels are one field of one hash rather than a key per client, which
//! would cost about twice as much memory (a key's own overhead); joining or leaving
//! rewrites that field, in time linear in the client's channel count.
//!
//! Records are compact JSON with one-letter fields and without the client id (the hash
//! field already holds it); the node id is left out when the client id names it. The
//! scripts decode records only to find the user, device and node to unindex.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fred::prelude::Value;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::sharded::ShardedPresence;
use super::{
    Beat, Connected, Connection, Disconnected, Lost, MAX_PAGE, Member, NodeStatus, Page,
    PresenceError, PresenceStore, Stats, StoreFuture, node_of_client,
};
use crate::redis::link::{
    Failure, NAME, Script, StoreLink, array, bytes, flag, integer, millis, text, valid_prefix,
};

/// Most connections one reaping script removes, whatever the caller asks for.
const MAX_REAP: usize = 1000;
/// Reaping scripts that may in a row clear only leftovers (memberships without a
/// connection, empty nodes) before `reap` gives up for this call.
const MAX_EMPTY_REAPS: usize = 64;
/// Most channel counts one script sets.
const COUNTS_PER_SCRIPT: usize = 1000;

/// Helpers every script starts with. `ARGV[1]` is always the key prefix, `"<prefix>|"`.
macro_rules! prelude {
    () => {
        r#"
local P = ARGV[1]
local CONN = P .. 'conn'
local NODES = P .. 'nodes'
local MEMBERSHIPS = P .. 'kc'

-- Milliseconds on Redis's clock, as an integral Lua number.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function ms(n)
  return string.format('%.0f', n)
end

-- The node id in a client id "<node>/<n>" (as presence::node_of_client), or nil.
local function node_of(client)
  return string.match(client, '^(.+)/[^/]*$')
end

local function decode(raw)
  local ok, value = pcall(cjson.decode, raw)
  if ok and type(value) == 'table' then
    return value
  end
  return {}
end

local function text(value)
  if type(value) == 'string' then
    return value
  end
  return nil
end

-- Removes one membership from the channel's own keys; returns whether it was one.
local function drop_member(channel, client)
  local members = P .. 'cm|' .. channel
  local raw = redis.call('HGET', members, client)
  if not raw then
    return false
  end
  redis.call('HDEL', members, client)
  redis.call('ZREM', P .. 'cz|' .. channel, client)
  local user = text(decode(raw).u)
  if user then
    local users = P .. 'cu|' .. channel
    if redis.call('HINCRBY', users, user, -1) <= 0 then
      redis.call('HDEL', users, user)
    end
  end
  return true
end

-- The channels a client is a member of, as a Lua array.
local function channels_of(client)
  local raw = redis.call('HGET', MEMBERSHIPS, client)
  if not raw then
    return {}
  end
  local ok, channels = pcall(cmsgpack.unpack, raw)
  if ok and type(channels) == 'table' then
    return channels
  end
  return {}
end

-- Stores a client's channels; none left: forgets it, with its leftover entry.
local function set_channels(client, channels)
  if #channels > 0 then
    redis.call('HSET', MEMBERSHIPS, client, cmsgpack.pack(channels))
    return
  end
  redis.call('HDEL', MEMBERSHIPS, client)
  local node = node_of(client)
  if node then
    redis.call('SREM', P .. 'no|' .. node, client)
  end
end

-- Removes every membership of a client; returns the channels it was in.
local function leave_all(client)
  local channels = channels_of(client)
  for _, channel in ipairs(channels) do
    drop_member(channel, client)
  end
  set_channels(client, {})
  return channels
end

-- Removes a recorded connection (not its memberships); returns whether it was its
-- user's last one.
local function drop_connection(client, raw)
  redis.call('HDEL', CONN, client)
  local record = decode(raw)
  local node = text(record.n) or node_of(client)
  if node then
    redis.call('SREM', P .. 'nk|' .. node, client)
  end
  local device = text(record.d)
  if device then
    redis.call('HDEL', P .. 'd|' .. device, client)
  end
  local user = text(record.u)
  if user then
    local connections = P .. 'u|' .. user
    redis.call('HDEL', connections, client)
    return redis.call('EXISTS', connections) == 0
  end
  return false
end

-- Removes up to `budget` connections of a node, then up to what is left of the budget
-- of its clients' leftover memberships; forgets the node once it holds nothing.
-- Appends {client, record, last_of_user, channels} to `out`; returns the budget left.
local function reap_node(node, budget, out)
  local connections = P .. 'nk|' .. node
  if budget > 0 then
    for _, client in ipairs(redis.call('SPOP', connections, budget)) do
      budget = budget - 1
      local channels = leave_all(client)
      local raw = redis.call('HGET', CONN, client)
      if raw then
        local last = drop_connection(client, raw) and 1 or 0
        out[#out + 1] = {client, raw, last, channels}
      end
    end
  end
  if redis.call('EXISTS', connections) == 1 then
    return budget
  end
  local orphans = P .. 'no|' .. node
  if budget > 0 then
    for _, client in ipairs(redis.call('SPOP', orphans, budget)) do
      budget = budget - 1
      leave_all(client)
    end
  end
  if redis.call('EXISTS', orphans) == 1 then
    return budget
  end
  redis.call('ZREM', NODES, node)
  redis.call('HDEL', P .. 'nodeinfo', node)
  redis.call('UNLINK', P .. 'ch|' .. node)
  return budget
end
"#
    };
}

/// ARGV: prefix, node, started_at_ms, ttl_ms. Returns 1 if the node's entry existed and
/// had not expired.
const BEAT: &str = concat!(
    prelude!(),
    r#"
local node = ARGV[2]
local now = now_ms()
local previous = redis.call('ZSCORE', NODES, node)
redis.call('ZADD', NODES, ms(now + tonumber(ARGV[4])), node)
redis.call('HSET', P .. 'nodeinfo', node, ARGV[3])
if previous and tonumber(previous) > now then
  return 1
end
return 0
"#
);

/// ARGV: prefix, node. Moves a recorded node's deadline to now (never later).
const RETIRE: &str = concat!(
    prelude!(),
    r#"
redis.call('ZADD', NODES, 'XX', 'LT', ms(now_ms()), ARGV[2])
return 0
"#
);

/// ARGV: prefix, limit. Returns {more, lost}: `more` is 1 when the budget ran out.
const REAP: &str = concat!(
    prelude!(),
    r#"
local budget = tonumber(ARGV[2])
local out = {}
local more = 0
local expired = redis.call('ZRANGE', NODES, '-inf', ms(now_ms()), 'BYSCORE', 'LIMIT', 0, budget)
if #expired == budget then
  more = 1
end
for _, node in ipairs(expired) do
  budget = reap_node(node, budget, out)
  if budget <= 0 then
    more = 1
    break
  end
end
return {more, out}
"#
);

/// ARGV: prefix, node, limit. Returns {more, lost}.
const REAP_NODE: &str = concat!(
    prelude!(),
    r#"
local out = {}
local budget = reap_node(ARGV[2], tonumber(ARGV[3]), out)
if budget <= 0 then
  return {1, out}
end
return {0, out}
"#
);

/// ARGV: prefix, client, node, has_user, user, has_device, device, record, replace.
/// Returns {first_of_user, {client, record, ...} of the replaced connections}.
const CONNECT: &str = concat!(
    prelude!(),
    r#"
local client, node = ARGV[2], ARGV[3]
local user, device
if ARGV[4] == '1' then user = ARGV[5] end
if ARGV[6] == '1' then device = ARGV[7] end
local previous = redis.call('HGET', CONN, client)
if previous then
  drop_connection(client, previous)
end
local first = 0
local connections
if user then
  connections = P .. 'u|' .. user
  if redis.call('EXISTS', connections) == 0 then
    first = 1
  end
  redis.call('HSET', connections, client, device and ('+' .. device) or '')
end
redis.call('HSET', CONN, client, ARGV[8])
redis.call('SADD', P .. 'nk|' .. node, client)
if device then
  redis.call('HSET', P .. 'd|' .. device, client, '')
end
-- Its memberships now go with the connection.
local own_node = node_of(client)
if own_node then
  redis.call('SREM', P .. 'no|' .. own_node, client)
end
local replaced = {}
if ARGV[9] == '1' and user and device then
  local wanted = '+' .. device
  local others = redis.call('HGETALL', connections)
  for i = 1, #others, 2 do
    if others[i] ~= client and others[i + 1] == wanted then
      local raw = redis.call('HGET', CONN, others[i])
      if raw then
        replaced[#replaced + 1] = others[i]
        replaced[#replaced + 1] = raw
      end
    end
  end
end
return {first, replaced}
"#
);

/// ARGV: prefix, client. Returns {known, last_of_user, channels}. The channels of a
/// client whose connection is not recorded here are removed and returned too: a
/// shard of `ShardedPresence` other than the home holds only memberships.
const DISCONNECT: &str = concat!(
    prelude!(),
    r#"
local client = ARGV[2]
local channels = leave_all(client)
local raw = redis.call('HGET', CONN, client)
if not raw then
  return {0, 0, channels}
end
local last = drop_connection(client, raw) and 1 or 0
return {1, last, channels}
"#
);

/// ARGV: prefix, then client ids. Returns, per client, the channels whose membership
/// it removed (connection records stay).
const LEAVE_ALL: &str = concat!(
    prelude!(),
    r#"
local out = {}
for i = 2, #ARGV do
  out[#out + 1] = leave_all(ARGV[i])
end
return out
"#
);

/// ARGV: prefix, channel, client, has_user, user, record.
const JOIN: &str = concat!(
    prelude!(),
    r#"
local channel, client = ARGV[2], ARGV[3]
drop_member(channel, client)
redis.call('HSET', P .. 'cm|' .. channel, client, ARGV[6])
redis.call('ZADD', P .. 'cz|' .. channel, 0, client)
if ARGV[4] == '1' then
  redis.call('HINCRBY', P .. 'cu|' .. channel, ARGV[5], 1)
end
local channels = channels_of(client)
local known = false
for _, name in ipairs(channels) do
  if name == channel then
    known = true
    break
  end
end
if not known then
  channels[#channels + 1] = channel
  set_channels(client, channels)
end
-- A membership without a recorded connection is found again through its node.
if redis.call('HEXISTS', CONN, client) == 0 then
  local node = node_of(client)
  if node then
    redis.call('SADD', P .. 'no|' .. node, client)
  end
end
return 0
"#
);

/// ARGV: prefix, channel, client.
const LEAVE: &str = concat!(
    prelude!(),
    r#"
local channel, client = ARGV[2], ARGV[3]
drop_member(channel, client)
local channels = channels_of(client)
for i, name in ipairs(channels) do
  if name == channel then
    table.remove(channels, i)
    set_channels(client, channels)
    break
  end
end
return 0
"#
);

/// ARGV: prefix, node, then channel and count pairs (count 0 removes).
const SET_COUNTS: &str = concat!(
    prelude!(),
    r#"
local counts = P .. 'ch|' .. ARGV[2]
for i = 3, #ARGV - 1, 2 do
  if ARGV[i + 1] == '0' then
    redis.call('HDEL', counts, ARGV[i])
  else
    redis.call('HSET', counts, ARGV[i], ARGV[i + 1])
  end
end
return 0
"#
);

/// ARGV: prefix, channel. Returns {clients, users}.
const STATS: &str = concat!(
    "#!lua flags=no-writes\n",
    prelude!(),
    r#"
return {redis.call('HLEN', P .. 'cm|' .. ARGV[2]), redis.call('HLEN', P .. 'cu|' .. ARGV[2])}
"#
);

/// ARGV: prefix, channel, count, has_after, after. Returns {client, record, ...}.
const PAGE: &str = concat!(
    "#!lua flags=no-writes\n",
    prelude!(),
    r#"
local min = '-'
if ARGV[4] == '1' then min = '(' .. ARGV[5] end
local ids = redis.call('ZRANGE', P .. 'cz|' .. ARGV[2], min, '+', 'BYLEX', 'LIMIT', 0, tonumber(ARGV[3]))
if #ids == 0 then
  return {}
end
local records = redis.call('HMGET', P .. 'cm|' .. ARGV[2], unpack(ids))
local out = {}
for i, id in ipairs(ids) do
  if records[i] then
    out[#out + 1] = id
    out[#out + 1] = records[i]
  end
end
return out
"#
);

/// ARGV: prefix, user. Returns {client, record, ...}.
const USER: &str = concat!(
    "#!lua flags=no-writes\n",
    prelude!(),
    r#"
local ids = redis.call('HKEYS', P .. 'u|' .. ARGV[2])
if #ids == 0 then
  return {}
end
local records = redis.call('HMGET', CONN, unpack(ids))
local out = {}
for i, id in ipairs(ids) do
  if records[i] then
    out[#out + 1] = id
    out[#out + 1] = records[i]
  end
end
return out
"#
);

/// ARGV: prefix. Returns {node, connections, started_at_ms, ...} of live nodes.
const NODES: &str = concat!(
    "#!lua flags=no-writes\n",
    prelude!(),
    r#"
local out = {}
for _, node in ipairs(redis.call('ZRANGE', NODES, '(' .. ms(now_ms()), '+inf', 'BYSCORE')) do
  out[#out + 1] = node
  out[#out + 1] = redis.call('SCARD', P .. 'nk|' .. node)
  out[#out + 1] = redis.call('HGET', P .. 'nodeinfo', node) or '0'
end
return out
"#
);

/// ARGV: prefix. Returns one {channel, count, ...} per live node.
const CHANNELS: &str = concat!(
    "#!lua flags=no-writes\n",
    prelude!(),
    r#"
local out = {}
for _, node in ipairs(redis.call('ZRANGE', NODES, '(' .. ms(now_ms()), '+inf', 'BYSCORE')) do
  out[#out + 1] = redis.call('HGETALL', P .. 'ch|' .. node)
end
return out
"#
);

/// ARGV: prefix, user count, device count, users, devices, clients. Returns the number
/// of distinct recorded connections among them.
const COUNT_TARGETS: &str = concat!(
    "#!lua flags=no-writes\n",
    prelude!(),
    r#"
local seen, count = {}, 0
local function add(client)
  if not seen[client] then
    seen[client] = true
    count = count + 1
  end
end
local users, devices = tonumber(ARGV[2]), tonumber(ARGV[3])
local i = 4
for _ = 1, users do
  for _, client in ipairs(redis.call('HKEYS', P .. 'u|' .. ARGV[i])) do add(client) end
  i = i + 1
end
for _ = 1, devices do
  for _, client in ipairs(redis.call('HKEYS', P .. 'd|' .. ARGV[i])) do add(client) end
  i = i + 1
end
for j = i, #ARGV do
  if redis.call('HEXISTS', CONN, ARGV[j]) == 1 then add(ARGV[j]) end
end
return count
"#
);

#[derive(Debug)]
struct Scripts {
    beat: Script,
    retire: Script,
    reap: Script,
    reap_node: Script,
    connect: Script,
    disconnect: Script,
    leave_all: Script,
    join: Script,
    leave: Script,
    set_counts: Script,
    stats: Script,
    page: Script,
    user: Script,
    nodes: Script,
    channels: Script,
    count_targets: Script,
}

impl Scripts {
    const fn new() -> Self {
        Self {
            beat: Script::new(BEAT),
            retire: Script::new(RETIRE),
            reap: Script::new(REAP),
            reap_node: Script::new(REAP_NODE),
            connect: Script::new(CONNECT),
            disconnect: Script::new(DISCONNECT),
            leave_all: Script::new(LEAVE_ALL),
            join: Script::new(JOIN),
            leave: Script::new(LEAVE),
            set_counts: Script::new(SET_COUNTS),
            stats: Script::new(STATS),
            page: Script::new(PAGE),
            user: Script::new(USER),
            nodes: Script::new(NODES),
            channels: Script::new(CHANNELS),
            count_targets: Script::new(COUNT_TARGETS),
        }
    }
}

/// A connection as stored under its client id; `n` only when the client id does not
/// name the node.
#[derive(Serialize)]
struct ConnectionRecordRef<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    n: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    u: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    d: Option<&'a str>,
    t: u64,
    a: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    i: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct ConnectionRecord {
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    u: Option<String>,
    #[serde(default)]
    d: Option<String>,
    t: u64,
    a: String,
    #[serde(default)]
    i: Option<Box<RawValue>>,
}

/// A channel member as stored under its client id; `n` only when the client id does
/// not name the node.
#[derive(Serialize)]
struct MemberRecordRef<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    n: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    u: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    d: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    i: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct MemberRecord {
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    u: Option<String>,
    #[serde(default)]
    d: Option<String>,
    #[serde(default)]
    i: Option<Box<RawValue>>,
}

fn connection_record(connection: &Connection) -> Result<Bytes, PresenceError> {
    let record = ConnectionRecordRef {
        n: unless_implied(&connection.client_id, &connection.node_id),
        u: connection.user.as_deref(),
        d: connection.device.as_deref(),
        t: connection.connected_at_ms,
        a: &connection.remote_addr,
        i: connection.info.as_deref(),
    };
    encode(&record)
}

fn member_record(member: &Member) -> Result<Bytes, PresenceError> {
    let record = MemberRecordRef {
        n: unless_implied(&member.client_id, &member.node_id),
        u: member.user.as_deref(),
        d: member.device.as_deref(),
        i: member.info.as_deref(),
    };
    encode(&record)
}

/// The node id, unless the client id already names it.
fn unless_implied<'a>(client_id: &str, node_id: &'a str) -> Option<&'a str> {
    (node_of_client(client_id) != Some(node_id)).then_some(node_id)
}

/// The node id a record names, or else the one its client id names.
fn node_id(client_id: &str, stored: Option<String>) -> Result<String, PresenceError> {
    match stored {
        Some(node_id) => Ok(node_id),
        None => node_of_client(client_id)
            .map(str::to_owned)
            .ok_or_else(|| corrupt(format!("record {client_id:?} names no node"))),
    }
}

fn encode<T: Serialize>(record: &T) -> Result<Bytes, PresenceError> {
    serde_json::to_vec(record)
        .map(Bytes::from)
        .map_err(|error| corrupt(format!("cannot encode a record: {error}")))
}

fn parse_connection(client_id: String, raw: &Value) -> Result<Connection, PresenceError> {
    let record: ConnectionRecord = serde_json::from_slice(bytes(raw)?)
        .map_err(|error| corrupt(format!("connection {client_id:?}: {error}")))?;
    Ok(Connection {
        node_id: node_id(&client_id, record.n)?,
        client_id,
        user: record.u,
        device: record.d,
        connected_at_ms: record.t,
        remote_addr: record.a,
        info: record.i,
    })
}

fn parse_member(client_id: String, raw: &Value) -> Result<Member, PresenceError> {
    let record: MemberRecord = serde_json::from_slice(bytes(raw)?)
        .map_err(|error| corrupt(format!("member {client_id:?}: {error}")))?;
    Ok(Member {
        node_id: node_id(&client_id, record.n)?,
        client_id,
        user: record.u,
        device: record.d,
        info: record.i,
    })
}

fn corrupt(reason: String) -> PresenceError {
    PresenceError::Corrupt {
        store: NAME,
        reason,
    }
}

/// `[client, record, client, record, ...]` as connections.
fn connections(values: Vec<Value>) -> Result<Vec<Connection>, PresenceError> {
    let mut out = Vec::with_capacity(values.len() / 2);
    let mut values = values.into_iter();
    while let (Some(client), Some(record)) = (values.next(), values.next()) {
        out.push(parse_connection(text(&client)?, &record)?);
    }
    out.sort_by(|a, b| a.client_id.cmp(&b.client_id));
    Ok(out)
}

/// Channel names, sorted.
fn channel_list(value: Value) -> Result<Vec<String>, PresenceError> {
    let mut channels = array(value)?
        .iter()
        .map(text)
        .collect::<Result<Vec<_>, _>>()?;
    channels.sort();
    Ok(channels)
}

/// A reaping script's `{more, {{client, record, last_of_user, channels}, ...}}`.
fn parse_reaped(reply: Value) -> Result<(bool, Vec<Lost>), PresenceError> {
    let mut reply = array(reply)?.into_iter();
    let (Some(more), Some(entries)) = (reply.next(), reply.next()) else {
        return Err(corrupt("a short reap reply".to_owned()));
    };
    let mut lost = Vec::new();
    for entry in array(entries)? {
        let mut fields = array(entry)?.into_iter();
        let (Some(client), Some(record), Some(last), Some(channels)) =
            (fields.next(), fields.next(), fields.next(), fields.next())
        else {
            return Err(corrupt("a short reaped entry".to_owned()));
        };
        lost.push(Lost {
            connection: parse_connection(text(&client)?, &record)?,
            last_of_user: flag(&last)?,
            channels: channel_list(channels)?,
        });
    }
    Ok((flag(&more)?, lost))
}

fn optional(value: Option<&str>) -> [Value; 2] {
    match value {
        Some(value) => [Value::from("1"), Value::from(value)],
        None => [Value::from("0"), Value::from("")],
    }
}

/// Presence in a Redis server, shared by every replica of a cluster that uses the same
/// server and prefix.
pub struct RedisPresence {
    /// Fails every call at once while disconnected, and never writes a command twice:
    /// a reaping script replayed after a lost reply would hand its connections to nobody.
    link: Arc<StoreLink>,
    /// In a Redis Cluster, the slot of this store's hash tag, where its scripts go.
    home: Option<u16>,
    /// `"<prefix>|"` (or `"<tag>|"`), the start of every key.
    keys: Value,
    scripts: Scripts,
}

impl std::fmt::Debug for RedisPresence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisPresence")
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

impl From<Failure> for PresenceError {
    fn from(failure: Failure) -> Self {
        match failure {
            Failure::Unreachable => Self::Unreachable(NAME),
            Failure::Unavailable(reason) => Self::Unavailable {
                store: NAME,
                reason,
            },
            Failure::Corrupt(reason) => corrupt(reason),
        }
    }
}

/// Starts connecting to the Redis server at `url` and returns at once; keys start with
/// `prefix` (the cluster's topic prefix, `[A-Za-z0-9_.:-]+`).
///
/// Fails only for a malformed URL or prefix. A server that is down is retried forever;
/// meanwhile calls fail with [`PresenceError::Unreachable`].
pub async fn connect(url: &str, prefix: &str) -> Result<RedisPresence, PresenceError> {
    if !valid_prefix(prefix) {
        return Err(PresenceError::Unavailable {
            store: NAME,
            reason: format!("invalid key prefix {prefix:?}: expected [A-Za-z0-9_.:-]+"),
        });
    }
    // With several servers this is the home store of [`connect_shards`]: the first.
    let urls = shard_list(url)?;
    connect_one(&urls[0], prefix)
}

/// Like [`connect`], but a comma-separated list of servers (the backbone's shards, in
/// the same order) gives a [`ShardedPresence`]: each channel's members on the server
/// that carries the channel, connections and replicas on the first. One server gives
/// one [`RedisPresence`], exactly as [`connect`]. A Redis Cluster gives a
/// [`ShardedPresence`] over [`CLUSTER_SHARDS`] stores on the same link (a connection
/// per master), one hash tag each, the first with [`connect`]'s keys.
pub async fn connect_shards(
    url: &str,
    prefix: &str,
) -> Result<Box<dyn PresenceStore>, PresenceError> {
    let urls = shard_list(url)?;
    if urls.len() == 1 {
        let home = connect(url, prefix).await?;
        if !home.link.is_cluster() {
            return Ok(Box::new(home));
        }
        // A Redis Cluster: the same link, channel presence spread over
        // `CLUSTER_SHARDS` hash tags (slots), so over the masters.
        let mut shards: Vec<Box<dyn PresenceStore>> = Vec::with_capacity(CLUSTER_SHARDS);
        let link = Arc::clone(&home.link);
        shards.push(Box::new(home));
        for index in 1..CLUSTER_SHARDS {
            let tag = crate::redis::cluster_tag(prefix, index);
            shards.push(Box::new(RedisPresence::on(
                Arc::clone(&link),
                prefix,
                Some(tag),
            )));
        }
        return Ok(Box::new(ShardedPresence::new(shards)));
    }
    let mut shards: Vec<Box<dyn PresenceStore>> = Vec::with_capacity(urls.len());
    for url in &urls {
        shards.push(Box::new(connect(url, prefix).await?));
    }
    Ok(Box::new(ShardedPresence::new(shards)))
}

fn shard_list(url: &str) -> Result<Vec<String>, PresenceError> {
    crate::redis::shard_urls(url).map_err(|error| PresenceError::Unavailable {
        store: NAME,
        reason: error.to_string(),
    })
}

fn connect_one(url: &str, prefix: &str) -> Result<RedisPresence, PresenceError> {
    let link = Arc::new(StoreLink::connect(url, "presence")?);
    // In a Redis Cluster every key starts with the hash tag `{<prefix>}`: all of them
    // are in one slot, on one node, as the scripts need (they touch many keys).
    let tag = link
        .is_cluster()
        .then(|| crate::redis::cluster_tag(prefix, 0));
    Ok(RedisPresence::on(link, prefix, tag))
}

/// In a Redis Cluster, the stores [`connect_shards`] spreads channel presence over:
/// one per [`crate::redis::cluster_tag`], the home (tag `{<prefix>}`, the same keys as
/// [`connect`]) and `CLUSTER_SHARDS - 1` more, each a slot of its own that Redis places
/// on some master, the slot of its channels' topics and history.
pub use crate::redis::CLUSTER_SHARDS;

impl RedisPresence {
    /// A store on `link` whose keys start with `<tag>|` (in a cluster, a hash tag that
    /// puts them all in one slot, where the scripts are sent) or `<prefix>|`.
    fn on(link: Arc<StoreLink>, prefix: &str, tag: Option<String>) -> Self {
        let home = tag.as_deref().map(crate::redis::link::slot);
        let keys = format!("{}|", tag.as_deref().unwrap_or(prefix));
        Self {
            link,
            home,
            keys: Value::from(keys),
            scripts: Scripts::new(),
        }
    }
}

impl RedisPresence {
    /// Whether the connection to Redis is up (in a cluster: to the master of this
    /// store's slot).
    pub fn is_connected(&self) -> bool {
        self.link.is_connected_at(self.home)
    }

    /// Waits until the connection is up, for at most `timeout`; returns whether it is.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        crate::poll_until(timeout, Duration::from_millis(10), || self.is_connected()).await
    }

    /// Runs `script` with `ARGV` = the key prefix followed by `args` (no KEYS: the
    /// scripts build key names from the prefix).
    async fn run(&self, script: &Script, args: Vec<Value>) -> Result<Value, PresenceError> {
        let mut argv = Vec::with_capacity(args.len() + 1);
        argv.push(self.keys.clone());
        argv.extend(args);
        Ok(self
            .link
            .run_at(script, Vec::new(), argv, self.home)
            .await?)
    }

    /// Runs a reaping script until it hands out connections or finds nothing left: a
    /// run that only cleared leftovers (which are not reported) is followed by another.
    async fn reap_with(
        &self,
        script: &Script,
        node: Option<&str>,
        limit: usize,
    ) -> Result<Vec<Lost>, PresenceError> {
        let limit = limit.min(MAX_REAP);
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut args: Vec<Value> = node.into_iter().map(Value::from).collect();
        args.push(Value::from(limit.to_string()));
        for _ in 0..MAX_EMPTY_REAPS {
            let (more, lost) = parse_reaped(self.run(script, args.clone()).await?)?;
            if !lost.is_empty() || !more {
                return Ok(lost);
            }
        }
        Ok(Vec::new())
    }
}

impl PresenceStore for RedisPresence {
    fn name(&self) -> &'static str {
        NAME
    }

    fn beat<'a>(
        &'a self,
        node_id: &'a str,
        started_at_ms: u64,
        ttl: Duration,
    ) -> StoreFuture<'a, Beat> {
        Box::pin(async move {
            let args = vec![
                Value::from(node_id),
                Value::from(started_at_ms.to_string()),
                Value::from(millis(ttl).to_string()),
            ];
            let known = flag(&self.run(&self.scripts.beat, args).await?)?;
            Ok(Beat { known })
        })
    }

    fn retire<'a>(&'a self, node_id: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.run(&self.scripts.retire, vec![Value::from(node_id)])
                .await
                .map(drop)
        })
    }

    fn reap(&self, limit: usize) -> StoreFuture<'_, Vec<Lost>> {
        Box::pin(self.reap_with(&self.scripts.reap, None, limit))
    }

    fn reap_node<'a>(&'a self, node_id: &'a str, limit: usize) -> StoreFuture<'a, Vec<Lost>> {
        Box::pin(self.reap_with(&self.scripts.reap_node, Some(node_id), limit))
    }

    fn connect<'a>(
        &'a self,
        connection: &'a Connection,
        replace: bool,
    ) -> StoreFuture<'a, Connected> {
        Box::pin(async move {
            let mut args = Vec::with_capacity(8);
            args.push(Value::from(connection.client_id.as_str()));
            args.push(Value::from(connection.node_id.as_str()));
            args.extend(optional(connection.user.as_deref()));
            args.extend(optional(connection.device.as_deref()));
            args.push(Value::from(connection_record(connection)?));
            args.push(Value::from(if replace { "1" } else { "0" }));
            let mut reply = array(self.run(&self.scripts.connect, args).await?)?.into_iter();
            let (Some(first), Some(replaced)) = (reply.next(), reply.next()) else {
                return Err(corrupt("a short connect reply".to_owned()));
            };
            Ok(Connected {
                first_of_user: flag(&first)?,
                replaced: connections(array(replaced)?)?,
            })
        })
    }

    fn disconnect<'a>(&'a self, client_id: &'a str) -> StoreFuture<'a, Disconnected> {
        Box::pin(async move {
            let reply = self
                .run(&self.scripts.disconnect, vec![Value::from(client_id)])
                .await?;
            let mut reply = array(reply)?.into_iter();
            let (Some(known), Some(last), Some(channels)) =
                (reply.next(), reply.next(), reply.next())
            else {
                return Err(corrupt("a short disconnect reply".to_owned()));
            };
            Ok(Disconnected {
                known: flag(&known)?,
                last_of_user: flag(&last)?,
                channels: channel_list(channels)?,
                connection: None,
            })
        })
    }

    fn leave_all<'a>(&'a self, client_ids: &'a [String]) -> StoreFuture<'a, Vec<Vec<String>>> {
        Box::pin(async move {
            let mut removed = Vec::with_capacity(client_ids.len());
            // Bounded scripts: Redis runs one at a time.
            for chunk in client_ids.chunks(MAX_REAP) {
                let args = chunk.iter().map(|id| Value::from(id.as_str())).collect();
                let reply = array(self.run(&self.scripts.leave_all, args).await?)?;
                if reply.len() != chunk.len() {
                    return Err(corrupt("a short leave_all reply".to_owned()));
                }
                for channels in reply {
                    removed.push(channel_list(channels)?);
                }
            }
            Ok(removed)
        })
    }

    fn join<'a>(&'a self, channel: &'a str, member: &'a Member) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut args = Vec::with_capacity(5);
            args.push(Value::from(channel));
            args.push(Value::from(member.client_id.as_str()));
            args.extend(optional(member.user.as_deref()));
            args.push(Value::from(member_record(member)?));
            self.run(&self.scripts.join, args).await.map(drop)
        })
    }

    fn leave<'a>(&'a self, channel: &'a str, client_id: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let args = vec![Value::from(channel), Value::from(client_id)];
            self.run(&self.scripts.leave, args).await.map(drop)
        })
    }

    fn stats<'a>(&'a self, channel: &'a str) -> StoreFuture<'a, Stats> {
        Box::pin(async move {
            let reply = array(
                self.run(&self.scripts.stats, vec![Value::from(channel)])
                    .await?,
            )?;
            let [clients, users] = reply.as_slice() else {
                return Err(corrupt("a short stats reply".to_owned()));
            };
            Ok(Stats {
                clients: integer(clients)?,
                users: integer(users)?,
            })
        })
    }

    fn page<'a>(
        &'a self,
        channel: &'a str,
        limit: usize,
        after: Option<&'a str>,
    ) -> StoreFuture<'a, Page> {
        Box::pin(async move {
            let limit = limit.clamp(1, MAX_PAGE);
            let mut args = Vec::with_capacity(4);
            args.push(Value::from(channel));
            // One more than asked for says whether there is a next page.
            args.push(Value::from((limit + 1).to_string()));
            args.extend(optional(after));
            let reply = array(self.run(&self.scripts.page, args).await?)?;
            let mut members = Vec::with_capacity(reply.len() / 2);
            let mut reply = reply.into_iter();
            while let (Some(client), Some(record)) = (reply.next(), reply.next()) {
                members.push(parse_member(text(&client)?, &record)?);
            }
            let cursor = if members.len() > limit {
                members.truncate(limit);
                members.last().map(|member| member.client_id.clone())
            } else {
                None
            };
            Ok(Page { members, cursor })
        })
    }

    fn user<'a>(&'a self, user: &'a str) -> StoreFuture<'a, Vec<Connection>> {
        Box::pin(async move {
            let reply = self
                .run(&self.scripts.user, vec![Value::from(user)])
                .await?;
            connections(array(reply)?)
        })
    }

    fn nodes(&self) -> StoreFuture<'_, Vec<NodeStatus>> {
        Box::pin(async move {
            let reply = array(self.run(&self.scripts.nodes, Vec::new()).await?)?;
            let mut nodes = Vec::with_capacity(reply.len() / 3);
            let mut reply = reply.into_iter();
            while let (Some(node), Some(connections), Some(started)) =
                (reply.next(), reply.next(), reply.next())
            {
                nodes.push(NodeStatus {
                    node_id: text(&node)?,
                    connections: integer(&connections)?,
                    started_at_ms: integer(&started)?,
                });
            }
            nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
            Ok(nodes)
        })
    }

    fn set_channel_counts<'a>(
        &'a self,
        node_id: &'a str,
        counts: &'a [(String, u64)],
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            for chunk in counts.chunks(COUNTS_PER_SCRIPT) {
                let mut args = Vec::with_capacity(1 + 2 * chunk.len());
                args.push(Value::from(node_id));
                for (channel, count) in chunk {
                    args.push(Value::from(channel.as_str()));
                    args.push(Value::from(count.to_string()));
                }
                self.run(&self.scripts.set_counts, args).await?;
            }
            Ok(())
        })
    }

    fn channels(&self) -> StoreFuture<'_, Vec<(String, u64)>> {
        Box::pin(async move {
            let reply = array(self.run(&self.scripts.channels, Vec::new()).await?)?;
            let mut sums = std::collections::BTreeMap::<String, u64>::new();
            for node in reply {
                let mut counts = array(node)?.into_iter();
                while let (Some(channel), Some(count)) = (counts.next(), counts.next()) {
                    let sum = sums.entry(text(&channel)?).or_default();
                    *sum = sum.saturating_add(integer(&count)?);
                }
            }
            Ok(sums.into_iter().filter(|(_, count)| *count > 0).collect())
        })
    }

    fn count_targets<'a>(
        &'a self,
        users: &'a [String],
        devices: &'a [String],
        clients: &'a [String],
    ) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            if users.is_empty() && devices.is_empty() && clients.is_empty() {
                return Ok(0);
            }
            let mut args = Vec::with_capacity(2 + users.len() + devices.len() + clients.len());
            args.push(Value::from(users.len().to_string()));
            args.push(Value::from(devices.len().to_string()));
            args.extend(
                users
                    .iter()
                    .chain(devices)
                    .chain(clients)
                    .map(|name| Value::from(name.as_str())),
            );
            Ok(integer(
                &self.run(&self.scripts.count_targets, args).await?,
            )?)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_leave_out_what_the_key_says() {
        let connection = Connection {
            client_id: "node-a/7".into(),
            node_id: "node-a".into(),
            user: Some("alice".into()),
            device: None,
            connected_at_ms: 5,
            remote_addr: "::1".into(),
            info: Some(RawValue::from_string(r#"{"x": 1}"#.into()).expect("JSON")),
        };
        let member = member_record(&connection.member()).expect("encode");
        assert_eq!(&member[..], br#"{"u":"alice","i":{"x": 1}}"#);
        let parsed =
            parse_member("node-a/7".into(), &Value::Bytes(member)).expect("a member record");
        assert_eq!(parsed.node_id, "node-a");
        assert_eq!(parsed.info.as_ref().map(|i| i.get()), Some(r#"{"x": 1}"#));

        let mut elsewhere = connection.member();
        elsewhere.node_id = "node-b".into();
        let record = member_record(&elsewhere).expect("encode");
        let parsed = parse_member("node-a/7".into(), &Value::Bytes(record)).expect("member");
        assert_eq!(parsed.node_id, "node-b");

        let record = connection_record(&connection).expect("encode");
        assert_eq!(
            &record[..],
            br#"{"u":"alice","t":5,"a":"::1","i":{"x": 1}}"#
        );
        let parsed = parse_connection("node-a/7".into(), &Value::Bytes(record)).expect("parse");
        assert_eq!(parsed.client_id, "node-a/7");
        assert_eq!(parsed.node_id, "node-a");
        assert_eq!(parsed.user.as_deref(), Some("alice"));
    }

    #[test]
    fn a_bad_record_is_corrupt() {
        let bad = Value::from("{not json");
        assert!(matches!(
            parse_connection("n/1".into(), &bad),
            Err(PresenceError::Corrupt { .. })
        ));
        assert!(matches!(
            parse_member("n/1".into(), &Value::from("{}")).map(|m| m.node_id),
            Ok(node) if node == "n"
        ));
        assert!(matches!(
            parse_member("nonode".into(), &Value::from("{}")),
            Err(PresenceError::Corrupt { .. })
        ));
    }
}
