//! Three `chorus` processes on two and on three Redis servers (`WS_REDIS_URL` lists
//! them): channels are spread over the servers by consistent hashing, each server
//! carries only its channels' subscriptions, history and presence live with their
//! channel, and one server's outage stops only its own channels (their presence too).

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use chorus_pubsub::redis::{CLUSTER_SHARDS, channel_tag, cluster_tag};
use chorus_pubsub::shards::shard_of;
use serde_json::{Value, json};

use crate::backbone::{Kind, RedisCluster, Server};
use crate::support::{
    Client, ServerProcess, eventually, eventually_within, http_get, metric, ws_url,
};

/// `h:` channels keep history and track presence.
const NAMESPACES: &str = r#"{"h": {"history_size": 10, "presence": true}}"#;

/// A channel name in `namespace` that hashes to `shard` of `shards`.
fn channel_on(namespace: &str, shard: usize, shards: usize) -> String {
    (0..)
        .map(|i| format!("{namespace}:{i}"))
        .find(|channel| shard_of(channel, shards) == shard)
        .expect("some name hashes to every shard")
}

fn shard_list(servers: &[Server]) -> String {
    servers
        .iter()
        .map(Server::url)
        .collect::<Vec<_>>()
        .join(",")
}

async fn replicas(servers: &[Server], prefix: &str) -> Vec<ServerProcess> {
    replicas_on(&shard_list(servers), servers.len(), prefix).await
}

/// Three replicas on `urls` (`WS_REDIS_URL`), which holds `shards` servers (a Redis
/// Cluster counts as one), each waited for until it is connected and its history store
/// answers.
async fn replicas_on(urls: &str, shards: usize, prefix: &str) -> Vec<ServerProcess> {
    let mut processes = Vec::new();
    for i in 0..3 {
        let node_id = format!("{prefix}-{i}");
        let vars = [
            ("WS_PUBSUB_ENABLED", "true"),
            ("WS_PUBSUB_ADAPTER", "redis"),
            ("WS_REDIS_URL", urls),
            ("WS_PUBSUB_CHANNEL", prefix),
            ("WS_NODE_ID", node_id.as_str()),
            ("WS_NAMESPACES", NAMESPACES),
            ("WS_PUBLISH_RATE", "0"),
            ("WS_PUBLISH_RATE_TOTAL", "0"),
        ];
        processes.push(ServerProcess::spawn(&vars).await);
    }
    let expected = shards;
    for process in &processes {
        let addr = process.addr;
        eventually("the replica to join every shard", || async move {
            health(addr).await["pubsub"]["shards"]
                .as_array()
                .is_some_and(|shards| {
                    shards.len() == expected && shards.iter().all(|up| up == true)
                })
        })
        .await;
        eventually("the history store to answer", || async move {
            let mut client = Client::connect(addr).await;
            let reply = client.call("history", json!({"channel": "h:probe"})).await;
            reply.get("error").is_none()
        })
        .await;
    }
    processes
}

/// A publisher on the first replica, and a subscriber to every one of `channels` on
/// each of the others.
async fn publisher_and_subscribers(
    addrs: &[SocketAddr],
    channels: &[String],
) -> (Client, Vec<Client>) {
    let publisher = Client::connect_url(&ws_url(addrs[0])).await;
    let mut subscribers = Vec::new();
    for &addr in &addrs[1..] {
        let mut subscriber = Client::connect_url(&ws_url(addr)).await;
        for channel in channels {
            subscriber
                .ok("subscribe", json!({"channel": channel}))
                .await;
        }
        subscribers.push(subscriber);
    }
    (publisher, subscribers)
}

/// Publishes one message on each of `channels` and a broadcast, and checks that every
/// subscriber (subscribed to all of them) gets each exactly once. Channels on different
/// servers keep no order between them, so the comparison is unordered.
async fn publish_reaches_everyone_once(
    publisher: &mut Client,
    subscribers: &mut [Client],
    channels: &[String],
    hello: &str,
) {
    for (seq, channel) in channels.iter().enumerate() {
        publisher
            .ok("publish", json!({"channel": channel, "data": seq}))
            .await;
    }
    publisher.ok("broadcast", json!({"hello": hello})).await;
    let mut wanted: Vec<String> = channels
        .iter()
        .enumerate()
        .map(|(seq, channel)| json!({"channel": channel, "data": seq}).to_string())
        .collect();
    wanted.push(json!({"hello": hello}).to_string());
    wanted.sort();
    for subscriber in subscribers {
        let mut got = Vec::new();
        for _ in 0..wanted.len() {
            got.push(subscriber.recv().await["params"].to_string());
        }
        got.sort();
        assert_eq!(got, wanted);
        subscriber.assert_nothing_pending().await;
    }
}

async fn health(addr: SocketAddr) -> Value {
    serde_json::from_str(&http_get(addr, "/health").await.1).expect("/health is JSON")
}

/// The channel topics (`<prefix>/<channel>`) a Redis server carries subscriptions for.
fn subscribed_channels(server: &Server, prefix: &str) -> BTreeSet<String> {
    let pattern = format!("{prefix}/*");
    server
        .redis_cli(&["PUBSUB", "CHANNELS", &pattern])
        .into_iter()
        .filter_map(|topic| topic.strip_prefix(&format!("{prefix}/")).map(str::to_owned))
        .collect()
}

/// Every rule on `count` shards: exactly-once delivery on channels of every shard,
/// each shard carrying only its channels, history and presence on channels of every
/// shard.
async fn every_shard_delivers_once_and_holds_only_its_channels(count: usize) {
    let servers: Vec<Server> = (0..count).map(|_| Server::start(Kind::Redis)).collect();
    let prefix = format!("shards{count}");
    let processes = replicas(&servers, &prefix).await;
    let addrs: Vec<SocketAddr> = processes.iter().map(|p| p.addr).collect();
    let channels: Vec<String> = (0..count).map(|s| channel_on("room", s, count)).collect();

    // Two subscribers on replicas 1 and 2, a publisher on replica 0.
    let (mut publisher, mut subscribers) = publisher_and_subscribers(&addrs, &channels).await;

    // Interest routing: each server holds exactly its own channels' subscriptions.
    for (shard, server) in servers.iter().enumerate() {
        let wanted: BTreeSet<String> = channels
            .iter()
            .filter(|channel| shard_of(channel, count) == shard)
            .cloned()
            .collect();
        assert_eq!(wanted.len(), 1);
        assert_eq!(
            subscribed_channels(server, &prefix),
            wanted,
            "shard {shard} carries exactly its channels"
        );
    }

    // Exactly once, on every shard's channel, and a broadcast (on one shard) too.
    publish_reaches_everyone_once(&mut publisher, &mut subscribers, &channels, "all").await;
    // (The publisher's own copy of the broadcast came before its reply.)
    publisher.assert_nothing_pending().await;

    // Unsubscribing everywhere releases the channel on its shard only.
    for subscriber in &mut subscribers {
        subscriber
            .ok("unsubscribe", json!({"channel": channels[0]}))
            .await;
    }
    eventually("the shard to drop the released channel", || async {
        !subscribed_channels(&servers[0], &prefix).contains(&channels[0])
    })
    .await;
    for (shard, server) in servers.iter().enumerate().skip(1) {
        assert!(
            subscribed_channels(server, &prefix).contains(&channels[shard]),
            "shard {shard} keeps its channel"
        );
    }

    // History and presence on a channel of every shard, written on one replica and
    // read on another; the history lives on its channel's shard.
    let mut reader = Client::connect_url(&ws_url(addrs[2])).await;
    for shard in 0..count {
        let channel = channel_on("h", shard, count);
        let _member =
            history_recovery_and_presence(&mut publisher, &mut reader, &addrs, &channel, false)
                .await;
        let stream = format!("{prefix}|hs|{channel}");
        for (other, server) in servers.iter().enumerate() {
            let exists = server.redis_cli(&["EXISTS", &stream]);
            let wanted = if other == shard { "1" } else { "0" };
            assert_eq!(exists, [wanted], "{stream} on shard {other}");
        }
        // Its members (the member and the reader) live on its shard only.
        let stats = reader
            .ok("presence_stats", json!({"channel": channel}))
            .await;
        assert_eq!(stats, json!({"clients": 2, "users": 0}));
        let members = format!("{prefix}|cm|{channel}");
        for (other, server) in servers.iter().enumerate() {
            let exists = server.redis_cli(&["EXISTS", &members]);
            let wanted = if other == shard { "1" } else { "0" };
            assert_eq!(exists, [wanted], "{members} on shard {other}");
        }
    }
    // Connection records live on the first server (the home) only.
    let connections = format!("{prefix}|conn");
    for (shard, server) in servers.iter().enumerate() {
        let wanted = if shard == 0 { "1" } else { "0" };
        assert_eq!(
            server.redis_cli(&["EXISTS", &connections]),
            [wanted],
            "{connections} on shard {shard}"
        );
    }
}

/// On `channel` (history and presence) of three replicas at `addrs`: a member
/// subscribes on the second, `publisher` publishes "one" and "two" (with idempotency
/// keys when `idempotent`), `reader` finds both in the history and recovers "two" from
/// the first's offset, and presence asked on the first replica shows the member, which
/// is returned (still subscribed).
async fn history_recovery_and_presence(
    publisher: &mut Client,
    reader: &mut Client,
    addrs: &[SocketAddr],
    channel: &str,
    idempotent: bool,
) -> Client {
    let mut member = Client::connect_url(&ws_url(addrs[1])).await;
    member.ok("subscribe", json!({"channel": channel})).await;
    for data in ["one", "two"] {
        let mut params = json!({"channel": channel, "data": data});
        if idempotent {
            params["idempotency_key"] = json!(data);
        }
        let reply = publisher.ok("publish", params).await;
        assert!(reply["offset"].as_u64().is_some(), "{reply}");
    }
    let page = reader.ok("history", json!({"channel": channel})).await;
    let data: Vec<&Value> = page["publications"]
        .as_array()
        .expect("publications")
        .iter()
        .map(|publication| &publication["data"])
        .collect();
    assert_eq!(data, [&json!("one"), &json!("two")], "{page}");
    // Recovery: a client that saw offset 1 gets offset 2 back.
    let first = &page["publications"][0];
    let recovered = reader
        .ok(
            "subscribe",
            json!({"channel": channel, "since": {"offset": first["offset"], "epoch": page["epoch"]}}),
        )
        .await;
    assert_eq!(recovered["recovered"], true, "{recovered}");
    assert_eq!(recovered["publications"][0]["data"], "two", "{recovered}");
    eventually("the member to appear in presence", || async {
        let mut client = Client::connect(addrs[0]).await;
        let reply = client.call("presence", json!({"channel": channel})).await;
        reply["result"]["clients"]
            .as_array()
            .is_some_and(|clients| !clients.is_empty())
    })
    .await;
    member
}

/// `presence` and `presence_stats` of `channel` asked on `addr`: the result, or the
/// error code.
async fn presence_of(addr: SocketAddr, channel: &str) -> Result<(usize, Value), i64> {
    let mut client = Client::connect(addr).await;
    let members = client.call("presence", json!({"channel": channel})).await;
    let stats = client
        .call("presence_stats", json!({"channel": channel}))
        .await;
    match (members.get("error"), stats.get("error")) {
        (None, None) => Ok((
            members["result"]["clients"]
                .as_array()
                .map_or(0, std::vec::Vec::len),
            stats["result"].clone(),
        )),
        (Some(error), _) | (None, Some(error)) => Err(error["code"].as_i64().unwrap_or(0)),
    }
}

/// A client on `at` subscribed to each of `channels`, once presence (asked on `asked`)
/// shows it as the one member of each.
async fn member_of(at: SocketAddr, asked: SocketAddr, channels: &[String]) -> Client {
    let mut member = Client::connect_url(&ws_url(at)).await;
    for channel in channels {
        member.ok("subscribe", json!({"channel": channel})).await;
        eventually("the member to appear in presence", || async {
            presence_of(asked, channel).await.is_ok_and(|(n, _)| n == 1)
        })
        .await;
    }
    member
}

/// One shard stops and comes back: its channels stop and recover, the other shards'
/// channels never notice (every publication during the outage arrives, in order).
async fn a_shard_outage_stops_only_its_channels() {
    const COUNT: usize = 3;
    let mut servers: Vec<Server> = (0..COUNT).map(|_| Server::start(Kind::Redis)).collect();
    let prefix = "shard-outage";
    let processes = replicas(&servers, prefix).await;
    let addrs: Vec<SocketAddr> = processes.iter().map(|p| p.addr).collect();
    let channels: Vec<String> = (0..COUNT).map(|s| channel_on("room", s, COUNT)).collect();
    // Shard 1 goes down; connections (presence's home) live on shard 0, which stays.
    let (down, stays) = (&channels[1], [&channels[0], &channels[2]]);

    let (mut publisher, mut subscribers) = publisher_and_subscribers(&addrs[..2], &channels).await;
    let mut subscriber = subscribers.remove(0);
    let mut seq = 0;
    for _ in 0..10 {
        publish_in_turn(&mut publisher, &mut subscriber, &stays, &mut seq).await;
    }
    // Presence on a channel of every shard, each on its own shard: a member on replica 2.
    let tracked: Vec<String> = (0..COUNT).map(|s| channel_on("h", s, COUNT)).collect();
    let _member = member_of(addrs[2], addrs[0], &tracked).await;

    servers[1].stop();
    eventually("/health to report the shard down", || async {
        let health = health(addrs[0]).await;
        health["status"] == "degraded" && health["pubsub"]["shards"] == json!([true, false, true])
    })
    .await;
    // The replica stays in rotation: it still serves the other shards' channels.
    assert_eq!(http_get(addrs[0], "/ready").await.0, 200);
    assert_eq!(
        metric(addrs[0], r#"ws_pubsub_shards_connected{adapter="redis"}"#).await,
        2.0
    );
    assert_eq!(
        metric(addrs[0], r#"ws_pubsub_shards{adapter="redis"}"#).await,
        3.0
    );
    let reply = publisher
        .call("publish", json!({"channel": down, "data": "lost"}))
        .await;
    assert_eq!(reply["error"]["code"], -32053, "{reply}");
    assert_eq!(reply["error"]["data"], json!({"delivered": "local"}));
    for _ in 0..10 {
        publish_in_turn(&mut publisher, &mut subscriber, &stays, &mut seq).await;
    }
    // Presence of the other shards' channels answers; the stopped one's does not.
    // (Eventually: a replica whose first liveness beat comes only now removes what an
    // earlier process of its node id left, its own early records included, and records
    // them again at once.)
    for (shard, channel) in tracked.iter().enumerate() {
        if shard == 1 {
            assert_eq!(
                presence_of(addrs[0], channel).await,
                Err(-32053),
                "{channel}"
            );
        } else {
            eventually("presence of another shard's channel to answer", || async {
                presence_of(addrs[0], channel).await == Ok((1, json!({"clients": 1, "users": 0})))
            })
            .await;
        }
    }
    // The broadcast topic lives on one shard: it works unless that one is down.
    let broadcast = publisher
        .call("broadcast", json!({"during": "outage"}))
        .await;
    if shard_of(prefix, COUNT) == 1 {
        assert_eq!(broadcast["error"]["code"], -32053, "{broadcast}");
    } else {
        assert!(broadcast.get("error").is_none(), "{broadcast}");
        assert_eq!(
            subscriber.recv().await["params"],
            json!({"during": "outage"})
        );
    }

    servers[1].restart();
    for &addr in &addrs {
        eventually("the replica to rejoin the shard", || async move {
            health(addr).await["pubsub"]["shards"] == json!([true, true, true])
        })
        .await;
    }
    // The same socket: asking again proves the new connection holds the channel.
    subscriber.ok("subscribe", json!({"channel": down})).await;
    publisher
        .ok("publish", json!({"channel": down, "data": "back"}))
        .await;
    assert_eq!(
        subscriber.recv().await["params"],
        json!({"channel": down, "data": "back"})
    );
    for _ in 0..10 {
        publish_in_turn(&mut publisher, &mut subscriber, &stays, &mut seq).await;
    }
    subscriber.assert_nothing_pending().await;
    // The server came back empty: at its next beats (every `WS_PRESENCE_TTL` / 5) the
    // replicas record their members there again; the other channels never stopped.
    for channel in &tracked {
        eventually_within(
            Duration::from_secs(30),
            "presence to answer on every shard again",
            || async {
                presence_of(addrs[0], channel).await == Ok((1, json!({"clients": 1, "users": 0})))
            },
        )
        .await;
    }
}

#[tokio::test]
async fn redis_two_shards() {
    every_shard_delivers_once_and_holds_only_its_channels(2).await;
}

#[tokio::test]
async fn redis_three_shards() {
    every_shard_delivers_once_and_holds_only_its_channels(3).await;
}

#[tokio::test]
async fn redis_shard_outage_stops_only_its_channels() {
    a_shard_outage_stops_only_its_channels().await;
}

/// The Redis Cluster channel a channel travels on: its topic (`WS_PUBSUB_CHANNEL` `/`
/// channel) behind the channel's hash tag.
fn redis_channel(prefix: &str, channel: &str) -> String {
    format!("{}{prefix}/{channel}", channel_tag(prefix, channel))
}

/// Three replicas on a Redis Cluster of three masters started here: sharded pub/sub
/// (each node carries only SSUBSCRIBEs of its slots), exactly-once delivery on channels
/// of every node, and each channel's history and presence keys on the node of its
/// topic (one hash tag for all three), with the tags spread over every node.
#[tokio::test]
async fn redis_cluster_of_three_masters() {
    let cluster = RedisCluster::start(3);
    let prefix = "rcluster";
    let processes = replicas_on(&cluster.url(), 3, prefix).await;
    let addrs: Vec<SocketAddr> = processes.iter().map(|p| p.addr).collect();
    let channels = channel_per_master(&cluster, prefix, 3);

    let (mut publisher, mut subscribers) = publisher_and_subscribers(&addrs, &channels).await;
    // Sharded pub/sub: each node holds the SSUBSCRIBEs of its own channels only, and
    // no plain SUBSCRIBE at all.
    for (node, server) in cluster.nodes.iter().enumerate() {
        let pattern = format!("*{prefix}/*");
        let held: BTreeSet<String> = server
            .redis_cli(&["PUBSUB", "SHARDCHANNELS", &pattern])
            .into_iter()
            .collect();
        assert_eq!(
            held,
            BTreeSet::from([redis_channel(prefix, &channels[node])]),
            "node {node}"
        );
        assert!(
            server
                .redis_cli(&["PUBSUB", "CHANNELS", &pattern])
                .is_empty(),
            "node {node} holds no plain subscription"
        );
    }

    publish_reaches_everyone_once(&mut publisher, &mut subscribers, &channels, "cluster").await;

    // History and presence on a channel of every node: their keys are on the node
    // that carries the channel's topic.
    let mut reader = Client::connect_url(&ws_url(addrs[2])).await;
    for node in 0..3 {
        let channel = tracked_channel_on(&cluster, prefix, node);
        let _member =
            history_recovery_and_presence(&mut publisher, &mut reader, &addrs, &channel, true)
                .await;
        let tag = channel_tag(prefix, &channel);
        let history = format!("{prefix}|{tag}hm|{channel}");
        let members = format!("{tag}|cm|{channel}");
        for key in [history, members] {
            assert_eq!(
                cluster.nodes[node].redis_cli(&["EXISTS", &key]),
                ["1"],
                "{key} on node {node}"
            );
        }
    }
    // Channels are spread over the masters: the cluster shards' tags are not all in
    // one node's slots.
    let nodes: BTreeSet<usize> = (0..CLUSTER_SHARDS)
        .map(|shard| cluster.node_of(&cluster_tag(prefix, shard)))
        .collect();
    assert_eq!(nodes.len(), 3, "{nodes:?}");
}

/// A channel of `prefix` on each of the cluster's first `masters` nodes.
fn channel_per_master(cluster: &RedisCluster, prefix: &str, masters: usize) -> Vec<String> {
    (0..masters)
        .map(|node| {
            (0..)
                .map(|i| format!("room:{i}"))
                .find(|channel| cluster.node_of(&redis_channel(prefix, channel)) == node)
                .expect("some channel on every node")
        })
        .collect()
}

/// Publishes the next number on each of `channels` and checks that `subscriber` gets
/// it (in order: nothing lost, nothing late).
async fn publish_in_turn(
    publisher: &mut Client,
    subscriber: &mut Client,
    channels: &[&String],
    seq: &mut u64,
) {
    for channel in channels {
        publisher
            .ok("publish", json!({"channel": channel, "data": *seq}))
            .await;
        // A history channel's publications carry an offset too.
        let params = subscriber.recv().await["params"].take();
        assert_eq!(
            (&params["channel"], &params["data"]),
            (&json!(channel), &json!(*seq)),
            "{params}"
        );
    }
    *seq += 1;
}

/// An `h:` channel (history and presence) on `node`.
fn tracked_channel_on(cluster: &RedisCluster, prefix: &str, node: usize) -> String {
    (0..)
        .map(|i| format!("h:{i}"))
        .find(|channel| cluster.node_of(&redis_channel(prefix, channel)) == node)
        .expect("some channel on every node")
}

/// Whether every replica reports `wanted` as its masters' states.
async fn masters_are(addrs: &[SocketAddr], wanted: &[bool]) -> bool {
    for &addr in addrs {
        if health(addr).await["pubsub"]["shards"] != json!(wanted) {
            return false;
        }
    }
    true
}

/// One master of a Redis Cluster (no replica to fail over to) stops and comes back:
/// its channels stop and recover on the same sockets, and the other masters' channels
/// never notice (every publication during the outage arrives, in order), nor do their
/// history and presence: the adapter and the stores hold a connection per master.
#[tokio::test]
async fn redis_cluster_master_outage_stops_only_its_channels() {
    let mut cluster = RedisCluster::start(3);
    let prefix = "rcoutage";
    let processes = replicas_on(&cluster.url(), 3, prefix).await;
    let addrs: Vec<SocketAddr> = processes.iter().map(|p| p.addr).collect();
    // Not the master of connection records and liveness (`{<prefix>}`).
    let down = (cluster.node_of(&cluster_tag(prefix, 0)) + 1) % 3;
    let channels = channel_per_master(&cluster, prefix, 3);
    let stays: Vec<&String> = (0..3)
        .filter(|n| *n != down)
        .map(|n| &channels[n])
        .collect();
    let (mut publisher, mut subscribers) = publisher_and_subscribers(&addrs[..2], &channels).await;
    let mut subscriber = subscribers.remove(0);
    let mut seq = 0;
    for _ in 0..10 {
        publish_in_turn(&mut publisher, &mut subscriber, &stays, &mut seq).await;
    }
    // History and presence channels on every master, a member of each on replica 2.
    let tracked: Vec<String> = (0..3)
        .map(|node| tracked_channel_on(&cluster, prefix, node))
        .collect();
    let _member = member_of(addrs[2], addrs[0], &tracked).await;

    cluster.nodes[down].stop();
    let mut states = [true; 3];
    states[down] = false;
    eventually("the replicas to see the master down", || {
        masters_are(&addrs, &states)
    })
    .await;
    // The replicas stay in rotation: they still serve the other masters' channels.
    for &addr in &addrs {
        assert_eq!(http_get(addr, "/ready").await.0, 200);
    }
    let reply = publisher
        .call(
            "publish",
            json!({"channel": channels[down], "data": "lost"}),
        )
        .await;
    assert_eq!(reply["error"]["code"], -32053, "{reply}");
    for _ in 0..10 {
        publish_in_turn(&mut publisher, &mut subscriber, &stays, &mut seq).await;
    }
    for (node, channel) in tracked.iter().enumerate() {
        let published = publisher
            .call("publish", json!({"channel": channel, "data": "during"}))
            .await;
        let history = publisher.call("history", json!({"channel": channel})).await;
        if node == down {
            assert_eq!(published["error"]["code"], -32053, "{published}");
            assert_eq!(history["error"]["code"], -32053, "{history}");
            assert_eq!(presence_of(addrs[0], channel).await, Err(-32053));
        } else {
            assert!(published.get("error").is_none(), "{published}");
            assert_eq!(
                history["result"]["publications"][0]["data"], "during",
                "{history}"
            );
            assert_eq!(
                presence_of(addrs[0], channel).await.map(|(n, _)| n),
                Ok(1),
                "{channel}"
            );
        }
    }

    cluster.nodes[down].restart();
    cluster.wait_ok();
    eventually("the replicas to reconnect", || {
        masters_are(&addrs, &[true, true, true])
    })
    .await;
    // Asking again proves the new connection holds it (as after any outage).
    subscriber
        .ok("subscribe", json!({"channel": channels[down]}))
        .await;
    publisher
        .ok(
            "publish",
            json!({"channel": channels[down], "data": "back"}),
        )
        .await;
    assert_eq!(
        subscriber.recv().await["params"],
        json!({"channel": channels[down], "data": "back"})
    );
    for _ in 0..10 {
        publish_in_turn(&mut publisher, &mut subscriber, &stays, &mut seq).await;
    }
    subscriber.assert_nothing_pending().await;
}

/// A master fails and its replica takes over, at another address: the replicas read
/// the new slot table, move that master's channels (the subscriptions made on the same
/// sockets before the failure) to the new master, and the other masters' channels never
/// notice.
#[tokio::test]
async fn redis_cluster_failover_moves_channels_to_the_new_master() {
    let mut cluster = RedisCluster::start_replicated(3);
    let prefix = "rcfailover";
    let processes = replicas_on(&cluster.url(), 3, prefix).await;
    let addrs: Vec<SocketAddr> = processes.iter().map(|p| p.addr).collect();
    let channels = channel_per_master(&cluster, prefix, 3);
    let (failed, stays) = (&channels[1], [&channels[0], &channels[2]]);
    let (mut publisher, mut subscribers) = publisher_and_subscribers(&addrs[..2], &channels).await;
    let mut subscriber = subscribers.remove(0);
    let mut seq = 0;
    publish_in_turn(
        &mut publisher,
        &mut subscriber,
        &channels.iter().collect::<Vec<_>>(),
        &mut seq,
    )
    .await;
    // A history channel whose keys are on the master that fails.
    let kept = tracked_channel_on(&cluster, prefix, 1);
    publisher
        .ok("publish", json!({"channel": kept, "data": "before"}))
        .await;

    cluster.nodes[1].stop();
    // The replica takes over after the cluster's node timeout (2 s); meanwhile, and
    // afterwards, the other channels deliver everything.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !masters_are(&addrs, &[true, true, true]).await
        || cluster.nodes[4].redis_cli(&["ROLE"])[0] != "master"
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the replica did not take over"
        );
        publish_in_turn(&mut publisher, &mut subscriber, &stays, &mut seq).await;
    }
    // The failed master's channel, on the socket that subscribed before the failure:
    // publications reach it once every replica has moved the subscription.
    until_it_delivers_again(&mut publisher, &mut subscriber, failed, deadline).await;
    for _ in 0..10 {
        publish_in_turn(
            &mut publisher,
            &mut subscriber,
            &[failed, stays[0], stays[1]],
            &mut seq,
        )
        .await;
    }
    subscriber.assert_nothing_pending().await;
    // Its history is written and read on the new master (the stores read the new
    // slot table too).
    eventually(
        "a history channel of the failed master to take publications",
        || async {
            let mut client = Client::connect(addrs[2]).await;
            let reply = client
                .call("publish", json!({"channel": kept, "data": "after"}))
                .await;
            reply.get("error").is_none()
        },
    )
    .await;
    let page = publisher.ok("history", json!({"channel": kept})).await;
    let last = page["publications"]
        .as_array()
        .and_then(|publications| publications.last())
        .map(|publication| publication["data"].clone());
    assert_eq!(last, Some(json!("after")), "{page}");
}

/// Publishes numbered probes on `channel` until `subscriber` gets one (`deadline`
/// bounds it), then one more that it waits for, past the probes that arrived late:
/// from there on nothing is lost.
async fn until_it_delivers_again(
    publisher: &mut Client,
    subscriber: &mut Client,
    channel: &str,
    deadline: tokio::time::Instant,
) {
    let mut probe = 0;
    loop {
        let reply = publisher
            .call("publish", json!({"channel": channel, "data": probe}))
            .await;
        if reply.get("error").is_none()
            && tokio::time::timeout(Duration::from_millis(500), subscriber.recv())
                .await
                .is_ok()
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{channel} never delivered again"
        );
        probe += 1;
    }
    publisher
        .ok("publish", json!({"channel": channel, "data": "last"}))
        .await;
    while subscriber.recv().await["params"]["data"] != "last" {}
}

/// A master joins the cluster and the slot of one channel's hash tag moves to it with
/// its keys, as `redis-cli --cluster reshard` moves slots: that channel delivers again
/// from the new master on the socket that subscribed before, with its history (same
/// epoch) and presence, whose keys moved with it; channels of other tags never notice.
#[tokio::test]
async fn redis_cluster_resharding_moves_only_the_migrated_slot() {
    let mut cluster = RedisCluster::start(3);
    let prefix = "rcreshard";
    let processes = replicas_on(&cluster.url(), 3, prefix).await;
    let addrs: Vec<SocketAddr> = processes.iter().map(|p| p.addr).collect();
    let moving = tracked_channel_on(&cluster, prefix, 1);
    let tag = channel_tag(prefix, &moving);
    let stays: Vec<String> = (0..3)
        .map(|node| {
            (0..)
                .map(|i| format!("room:{i}"))
                .find(|channel| {
                    channel_tag(prefix, channel) != tag
                        && cluster.node_of(&redis_channel(prefix, channel)) == node
                })
                .expect("a channel of another tag on every node")
        })
        .collect();
    let stays: Vec<&String> = stays.iter().collect();

    let mut publisher = Client::connect_url(&ws_url(addrs[0])).await;
    let mut reader = Client::connect_url(&ws_url(addrs[2])).await;
    let member =
        history_recovery_and_presence(&mut publisher, &mut reader, &addrs, &moving, true).await;
    let before = reader.ok("history", json!({"channel": moving})).await;
    let mut subscriber = Client::connect_url(&ws_url(addrs[1])).await;
    for channel in stays.iter().copied().chain([&moving]) {
        subscriber
            .ok("subscribe", json!({"channel": channel}))
            .await;
    }
    // Its members: the member, the reader and the subscriber.
    let (members, _) = presence_of(addrs[0], &moving)
        .await
        .expect("presence answers");
    assert_eq!(members, 3);
    let mut seq = 0;
    let everything: Vec<&String> = stays.iter().copied().chain([&moving]).collect();
    publish_in_turn(&mut publisher, &mut subscriber, &everything, &mut seq).await;

    let added = cluster.add_master();
    let slot = cluster.nodes[0].redis_cli(&["CLUSTER", "KEYSLOT", &tag])[0]
        .parse()
        .expect("a slot number");
    cluster.migrate_slot(slot, added);
    // Every replica finds the new master in its next slot table; meanwhile, and
    // afterwards, the other channels deliver everything.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !masters_are(&addrs, &[true; 4]).await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the replicas never used the new master"
        );
        publish_in_turn(&mut publisher, &mut subscriber, &stays, &mut seq).await;
    }
    until_it_delivers_again(&mut publisher, &mut subscriber, &moving, deadline).await;
    for _ in 0..10 {
        publish_in_turn(&mut publisher, &mut subscriber, &everything, &mut seq).await;
    }
    subscriber.assert_nothing_pending().await;

    // The channel's subscription, history and presence are all on the new master now.
    let new_master = &cluster.nodes[added];
    let held = new_master.redis_cli(&["PUBSUB", "SHARDCHANNELS", &format!("*{prefix}/*")]);
    assert_eq!(held, [redis_channel(prefix, &moving)]);
    for key in [
        format!("{prefix}|{tag}hm|{moving}"),
        format!("{tag}|cm|{moving}"),
    ] {
        assert_eq!(new_master.redis_cli(&["EXISTS", &key]), ["1"], "{key}");
    }
    // Its history moved whole: the same epoch (a store that lost the channel's keys
    // starts a new one), offsets counting on from before the move, the newest last.
    let after = reader.ok("history", json!({"channel": moving})).await;
    assert_eq!(after["epoch"], before["epoch"], "{after}");
    assert!(
        after["offset"].as_u64() > before["offset"].as_u64(),
        "{before} then {after}"
    );
    let newest = after["publications"]
        .as_array()
        .and_then(|publications| publications.last())
        .map(|publication| publication["data"].clone());
    assert_eq!(newest, Some(json!(seq - 1)), "{after}");
    // Its members are all still there.
    let (count, _) = presence_of(addrs[0], &moving)
        .await
        .expect("presence answers");
    assert_eq!(count, members);
    drop(member);
}
