//! What the backbone adapter tests share: real `redis-server` / `nats-server` processes,
//! each on its own loopback port and killed on drop, and the scenarios every adapter
//! must pass, written once for both.
#![allow(dead_code)]

use std::collections::HashSet;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use chorus_pubsub::nats::NatsBackbone;
use chorus_pubsub::redis::RedisBackbone;
use chorus_pubsub::{Backbone, Inbox, PubsubError};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout};

/// How long anything that should happen "soon" may take before a test fails.
pub const SOON: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Redis,
    Nats,
}

impl Kind {
    fn binary(self) -> &'static str {
        match self {
            Self::Redis => "redis-server",
            Self::Nats => "nats-server",
        }
    }
}

/// A backbone server process owned by one test.
pub struct Server {
    kind: Kind,
    port: u16,
    child: Option<Child>,
    /// NATS only: JetStream's store directory (kept across restarts, removed on drop);
    /// `None` runs the server without JetStream.
    jetstream_dir: Option<PathBuf>,
    /// More command-line arguments (a Redis Cluster node's settings).
    extra: Vec<String>,
    /// Redis only: its working directory, its own so that it never loads a file another
    /// server left (a cluster replica saves the data it synced as `dump.rdb`, which any
    /// server started in the same directory would load, replication state included).
    redis_dir: Option<PathBuf>,
}

impl Server {
    /// Starts a server on a fresh port and waits until it accepts connections.
    pub fn start(kind: Kind) -> Self {
        let mut server = Self::stopped(kind);
        server.restart();
        server
    }

    /// Starts a server with more command-line arguments (`--requirepass ...`).
    pub fn start_with_args(kind: Kind, args: &[&str]) -> Self {
        let mut server = Self::stopped(kind);
        server.extra = args.iter().map(|arg| (*arg).to_owned()).collect();
        server.restart();
        server
    }

    /// Starts a server without JetStream (NATS; Redis has nothing to leave out).
    pub fn start_without_jetstream(kind: Kind) -> Self {
        let mut server = Self::stopped(kind).without_jetstream();
        server.restart();
        server
    }

    /// Reserves a fresh port without starting anything on it yet. A NATS server runs
    /// with JetStream, storing into a fresh temporary directory.
    pub fn stopped(kind: Kind) -> Self {
        let port = free_port();
        let jetstream_dir = (kind == Kind::Nats).then(|| {
            std::env::temp_dir().join(format!(
                "chorus-nats-{}-{port}-{:08x}",
                std::process::id(),
                rand::random::<u32>()
            ))
        });
        let redis_dir = (kind == Kind::Redis).then(|| {
            std::env::temp_dir().join(format!(
                "chorus-redis-{}-{port}-{:08x}",
                std::process::id(),
                rand::random::<u32>()
            ))
        });
        Self {
            kind,
            port,
            child: None,
            jetstream_dir,
            extra: Vec::new(),
            redis_dir,
        }
    }

    /// The same server without JetStream; call before starting it.
    pub fn without_jetstream(mut self) -> Self {
        assert!(self.child.is_none(), "the server is already running");
        self.jetstream_dir = None;
        self
    }

    pub fn url(&self) -> String {
        match self.kind {
            Kind::Redis => format!("redis://127.0.0.1:{}", self.port),
            Kind::Nats => format!("nats://127.0.0.1:{}", self.port),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Runs one command with `redis-cli` against this (Redis) server; its output lines.
    pub fn redis_cli(&self, args: &[&str]) -> Vec<String> {
        assert_eq!(self.kind, Kind::Redis, "redis-cli talks to Redis");
        let output = Command::new(find_binary("redis-cli"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|error| panic!("cannot run redis-cli: {error}"));
        assert!(output.status.success(), "redis-cli {args:?} failed");
        String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter(|line| !line.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// Starts the server (again) on the same port and waits until it accepts connections.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "the server is already running");
        let binary = find_binary(self.kind.binary());
        let port = self.port.to_string();
        let mut command = Command::new(&binary);
        let redis_dir = self.redis_dir.clone().unwrap_or_else(std::env::temp_dir);
        if self.kind == Kind::Redis {
            std::fs::create_dir_all(&redis_dir).expect("a directory for the Redis server");
        }
        match self.kind {
            Kind::Redis => command
                .args([
                    "--port",
                    &port,
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--protected-mode",
                    "no",
                    "--dir",
                    &redis_dir.to_string_lossy(),
                ])
                .args(&self.extra),
            Kind::Nats => {
                command.args(["-a", "127.0.0.1", "-p", &port]);
                if let Some(dir) = &self.jetstream_dir {
                    command.arg("-js").arg("-sd").arg(dir);
                }
                &mut command
            }
        };
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {}: {error}", binary.display()));
        let address = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let deadline = std::time::Instant::now() + SOON;
        loop {
            if TcpStream::connect_timeout(&address, Duration::from_millis(200)).is_ok() {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "{} exited with {status} before accepting connections on port {}",
                    self.kind.binary(),
                    self.port
                );
            }
            if std::time::Instant::now() >= deadline {
                let _ = child.kill();
                panic!(
                    "{} did not accept connections within {SOON:?}",
                    self.kind.binary()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.child = Some(child);
    }

    /// Deletes what a stopped server stored (NATS: JetStream's directory; Redis runs
    /// without persistence and comes back empty anyway), as a lost disk would.
    pub fn lose_storage(&mut self) {
        assert!(self.child.is_none(), "stop the server first");
        if let Some(dir) = &self.jetstream_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    /// Kills the server, as a crash would.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
        for dir in [&self.jetstream_dir, &self.redis_dir].into_iter().flatten() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A Redis Cluster of `masters` nodes on loopback ports, started by the test: slots
/// split evenly in node order, nodes introduced with CLUSTER MEET, waited for until
/// every node says `cluster_state:ok`; with [`RedisCluster::start_replicated`] a
/// replica per master that takes over when it fails. Nodes keep their cluster config
/// across restarts; the directory is removed on drop. Coverage is not required, so
/// while one node is down the others keep serving their slots.
pub struct RedisCluster {
    pub nodes: Vec<Server>,
    /// Each node's first and last slot.
    ranges: Vec<(u16, u16)>,
    /// Slots moved since, and the node that holds each.
    moved: Vec<(u16, usize)>,
    dir: PathBuf,
}

impl RedisCluster {
    pub fn start(masters: usize) -> Self {
        Self::start_with(masters, false)
    }

    /// `masters` masters (nodes `0..masters`) and a replica of each: node
    /// `masters + i` replicates node `i`.
    pub fn start_replicated(masters: usize) -> Self {
        Self::start_with(masters, true)
    }

    fn start_with(masters: usize, replicated: bool) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "chorus-redis-cluster-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).expect("a directory for the cluster's config");
        let mut nodes = Vec::new();
        let mut buses = Vec::new();
        let count = if replicated { 2 * masters } else { masters };
        for _ in 0..count {
            let (node, bus) = Self::node(&dir);
            nodes.push(node);
            buses.push(bus);
        }
        let per = 16384 / masters;
        let ranges: Vec<(u16, u16)> = (0..masters)
            .map(|i| {
                let first = i * per;
                let last = if i + 1 == masters {
                    16383
                } else {
                    first + per - 1
                };
                (
                    u16::try_from(first).expect("a slot"),
                    u16::try_from(last).expect("a slot"),
                )
            })
            .collect();
        for (node, (first, last)) in nodes.iter().zip(&ranges) {
            node.redis_cli(&[
                "CLUSTER",
                "ADDSLOTSRANGE",
                &first.to_string(),
                &last.to_string(),
            ]);
        }
        for (node, bus) in nodes.iter().zip(&buses).skip(1) {
            nodes[0].redis_cli(&[
                "CLUSTER",
                "MEET",
                "127.0.0.1",
                &node.port.to_string(),
                &bus.to_string(),
            ]);
        }
        let cluster = Self {
            nodes,
            ranges,
            moved: Vec::new(),
            dir,
        };
        cluster.wait_ok();
        for (master, replica) in cluster.nodes.iter().zip(&cluster.nodes[masters..]) {
            let id = master.redis_cli(&["CLUSTER", "MYID"]).remove(0);
            replica.redis_cli(&["CLUSTER", "REPLICATE", &id]);
        }
        for replica in &cluster.nodes[masters..] {
            cluster.wait_until("a replica to sync with its master", || {
                replica
                    .redis_cli(&["INFO", "replication"])
                    .iter()
                    .any(|line| line.trim() == "master_link_status:up")
            });
        }
        cluster
    }

    /// A running cluster-enabled node with its config in `dir`, and its bus port.
    fn node(dir: &std::path::Path) -> (Server, u16) {
        let mut node = Server::stopped(Kind::Redis);
        let bus = free_port();
        node.extra = [
            "--cluster-enabled",
            "yes",
            "--cluster-port",
            &bus.to_string(),
            "--cluster-config-file",
            &dir.join(format!("nodes-{}.conf", node.port))
                .to_string_lossy(),
            "--cluster-require-full-coverage",
            "no",
            "--cluster-node-timeout",
            "2000",
        ]
        .map(str::to_owned)
        .to_vec();
        node.restart();
        (node, bus)
    }

    /// Starts one more master, holding no slot yet, and waits until every node knows
    /// it; returns its index.
    pub fn add_master(&mut self) -> usize {
        let (node, bus) = Self::node(&self.dir);
        self.nodes[0].redis_cli(&[
            "CLUSTER",
            "MEET",
            "127.0.0.1",
            &node.port.to_string(),
            &bus.to_string(),
        ]);
        self.nodes.push(node);
        self.wait_ok();
        self.nodes.len() - 1
    }

    /// Moves `slot` and its keys to node `to` the way `redis-cli --cluster reshard`
    /// does: IMPORTING on the target, MIGRATING on the source, MIGRATE of the keys,
    /// then SETSLOT NODE everywhere (the target first).
    pub fn migrate_slot(&mut self, slot: u16, to: usize) {
        let from = self.node_of_slot(slot);
        let id = |node: usize| self.nodes[node].redis_cli(&["CLUSTER", "MYID"]).remove(0);
        let (from_id, to_id) = (id(from), id(to));
        let slot_arg = slot.to_string();
        let (source, target) = (&self.nodes[from], &self.nodes[to]);
        let target_port = target.port.to_string();
        target.redis_cli(&["CLUSTER", "SETSLOT", &slot_arg, "IMPORTING", &from_id]);
        source.redis_cli(&["CLUSTER", "SETSLOT", &slot_arg, "MIGRATING", &to_id]);
        loop {
            let keys = source.redis_cli(&["CLUSTER", "GETKEYSINSLOT", &slot_arg, "100"]);
            if keys.is_empty() {
                break;
            }
            let mut migrate = vec![
                "MIGRATE",
                "127.0.0.1",
                &target_port,
                "",
                "0",
                "5000",
                "KEYS",
            ];
            migrate.extend(keys.iter().map(String::as_str));
            assert_eq!(source.redis_cli(&migrate), ["OK"], "MIGRATE {keys:?}");
        }
        let mut order: Vec<usize> = vec![to, from];
        order.extend((0..self.nodes.len()).filter(|node| *node != to && *node != from));
        for node in order {
            self.nodes[node].redis_cli(&["CLUSTER", "SETSLOT", &slot_arg, "NODE", &to_id]);
        }
        self.moved.push((slot, to));
        // Every node's CLUSTER SLOTS has the range slot..=slot served by the target.
        let range = [slot_arg.as_str(), &slot_arg, "127.0.0.1", &target_port];
        self.wait_until("every node to name the slot's new master", || {
            self.nodes.iter().all(|node| {
                node.redis_cli(&["CLUSTER", "SLOTS"])
                    .windows(4)
                    .any(|lines| lines.iter().map(|line| line.trim()).eq(range))
            })
        });
    }

    fn wait_until(&self, what: &str, done: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + 3 * SOON;
        while !done() {
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until every running node sees the whole cluster in state ok.
    pub fn wait_ok(&self) {
        let known = format!("cluster_known_nodes:{}", self.nodes.len());
        self.wait_until("the Redis Cluster to reach cluster_state:ok", || {
            self.nodes
                .iter()
                .filter(|node| node.child.is_some())
                .all(|node| {
                    let info = node.redis_cli(&["CLUSTER", "INFO"]);
                    info.iter().any(|line| line.trim() == "cluster_state:ok")
                        && info.iter().any(|line| line.trim() == known)
                })
        });
    }

    /// `redis-cluster://` with every node as a seed.
    pub fn url(&self) -> String {
        let mut url = format!("redis-cluster://127.0.0.1:{}", self.nodes[0].port);
        for (i, node) in self.nodes.iter().enumerate().skip(1) {
            url.push(if i == 1 { '?' } else { '&' });
            url.push_str(&format!("node=127.0.0.1:{}", node.port));
        }
        url
    }

    /// The index of the node that holds `key`'s slot.
    pub fn node_of(&self, key: &str) -> usize {
        let slot: u16 = self.nodes[0].redis_cli(&["CLUSTER", "KEYSLOT", key])[0]
            .trim()
            .parse()
            .expect("a slot number");
        self.node_of_slot(slot)
    }

    /// The index of the (first) node that holds `slot`.
    pub fn node_of_slot(&self, slot: u16) -> usize {
        if let Some((_, node)) = self.moved.iter().rev().find(|(moved, _)| *moved == slot) {
            return *node;
        }
        self.ranges
            .iter()
            .position(|(first, last)| (*first..=*last).contains(&slot))
            .expect("every slot is assigned")
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Where to find a server binary: for `nats-server`, the one `CHORUS_NATS_SERVER`
/// names, else the one scripts/test installs into `<target>/tools-venv/bin` (JetStream
/// KV needs a newer NATS than Debian's 2.9); then `PATH` and the usual directories.
fn find_binary(name: &str) -> PathBuf {
    let mut preferred = Vec::new();
    if name == "nats-server" {
        if let Some(binary) = std::env::var_os("CHORUS_NATS_SERVER") {
            preferred.push(PathBuf::from(binary));
        }
        let workspace_target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target");
        let targets = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .into_iter()
            .chain([workspace_target]);
        preferred.extend(targets.map(|target| target.join("tools-venv/bin").join(name)));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    preferred
        .into_iter()
        .chain(
            std::env::split_paths(&path)
                .chain(
                    ["/usr/sbin", "/usr/local/sbin", "/usr/local/bin", "/usr/bin"]
                        .map(PathBuf::from),
                )
                .map(|dir| dir.join(name)),
        )
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} is not installed: run scripts/test, which installs redis-server and \
                 nats-server (or `apt-get install -y redis-server nats-server`)"
            )
        })
}

/// A loopback port nothing listens on, below the kernel's ephemeral range: a port from
/// that range could meanwhile become the local end of some client connection (our own
/// reconnect attempts included), and then the server could not be restarted on it.
fn free_port() -> u16 {
    static TAKEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let low = 10_000u16;
    let high = ephemeral_low.max(low + 1000);
    let mut taken = TAKEN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let taken = taken.get_or_insert_with(HashSet::new);
    for _ in 0..1000 {
        let port = rand::random_range(low..high);
        if taken.contains(&port) {
            continue;
        }
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            taken.insert(port);
            return port;
        }
    }
    panic!("no free port found in {low}..{high}");
}

/// What the scenarios need from an adapter besides [`Backbone`].
pub trait Adapter: Backbone + Sized {
    const KIND: Kind;
    fn connect(url: &str, inbox: Inbox) -> impl Future<Output = Result<Self, PubsubError>> + Send;
}

impl Adapter for RedisBackbone {
    const KIND: Kind = Kind::Redis;
    fn connect(url: &str, inbox: Inbox) -> impl Future<Output = Result<Self, PubsubError>> + Send {
        RedisBackbone::connect(url, inbox)
    }
}

impl Adapter for NatsBackbone {
    const KIND: Kind = Kind::Nats;
    fn connect(url: &str, inbox: Inbox) -> impl Future<Output = Result<Self, PubsubError>> + Send {
        NatsBackbone::connect(url, inbox)
    }
}

/// An inbox whose deliveries can be awaited, in order.
pub fn inbox() -> (Inbox, mpsc::UnboundedReceiver<Bytes>) {
    let (delivered, received) = mpsc::unbounded_channel();
    let inbox = Inbox::new(move |message| {
        let _ = delivered.send(message);
    });
    (inbox, received)
}

/// An adapter and what it receives.
pub struct Node<A> {
    pub backbone: A,
    pub received: mpsc::UnboundedReceiver<Bytes>,
}

impl<A: Adapter> Node<A> {
    pub async fn connect(url: &str) -> Self {
        let (inbox, received) = inbox();
        let backbone = A::connect(url, inbox).await.expect("a valid URL");
        Self { backbone, received }
    }

    pub async fn connected(url: &str) -> Self {
        let node = Self::connect(url).await;
        node.wait_connected(true).await;
        node
    }

    pub async fn wait_connected(&self, connected: bool) {
        let deadline = Instant::now() + SOON;
        while self.backbone.is_connected() != connected {
            assert!(
                Instant::now() < deadline,
                "{} did not become {} within {SOON:?}",
                self.backbone.adapter(),
                if connected {
                    "connected"
                } else {
                    "disconnected"
                }
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The next message, failing the test if none comes soon.
    pub async fn next(&mut self) -> Bytes {
        timeout(SOON, self.received.recv())
            .await
            .expect("a message arrives in time")
            .expect("the adapter is alive")
    }

    /// Waits until a message equal to `wanted` arrives, returning the ones before it.
    pub async fn until(&mut self, wanted: &[u8]) -> Vec<Bytes> {
        let mut before = Vec::new();
        loop {
            let message = self.next().await;
            if message == wanted {
                return before;
            }
            before.push(message);
        }
    }
}

/// Publishes, failing the test if the adapter refuses.
pub fn publish<A: Adapter>(node: &Node<A>, topic: &str, payload: impl Into<Bytes>) {
    node.backbone
        .publish(topic, payload.into())
        .expect("publish is accepted");
}

/// Waits until `subscriber` receives what `publisher` sends on `topic` (its subscription is
/// asynchronous), then leaves no probe behind: publishes probes until one arrives, then a
/// fence, and drops everything up to the fence (one publisher's messages on one topic
/// stay in order).
pub async fn sync<A: Adapter>(subscriber: &mut Node<A>, publisher: &Node<A>, topic: &str) {
    let deadline = Instant::now() + SOON;
    let mut attempt = 0u32;
    loop {
        assert!(
            Instant::now() < deadline,
            "{topic:?} published by one {} adapter never reached another within {SOON:?}",
            A::KIND.binary()
        );
        if publisher.backbone.is_connected() {
            let _ = publisher
                .backbone
                .publish(topic, Bytes::from(format!("probe-{attempt}")));
        }
        attempt += 1;
        if let Ok(Some(message)) =
            timeout(Duration::from_millis(100), subscriber.received.recv()).await
        {
            assert!(message.starts_with(b"probe-"), "unexpected {message:?}");
            break;
        }
    }
    let fence = format!("fence-{attempt}");
    publish(publisher, topic, fence.clone());
    for message in subscriber.until(fence.as_bytes()).await {
        assert!(message.starts_with(b"probe-"), "unexpected {message:?}");
    }
}

// ---- scenarios ----

/// Subscribe on A, publish on B, A receives it, byte for byte.
pub async fn delivers_between_instances<A: Adapter>() {
    let server = Server::start(A::KIND);
    let mut a = Node::<A>::connected(&server.url()).await;
    let mut b = Node::<A>::connected(&server.url()).await;
    a.backbone.subscribe("items:1").expect("subscribe");
    sync(&mut a, &b, "items:1").await;

    let binary = Bytes::from_static(&[0, 1, 2, 255, 254, b'\n', b' ']);
    publish(&b, "items:1", binary.clone());
    assert_eq!(a.next().await, binary);
    assert_eq!(b.received.try_recv().ok(), None, "B subscribed to nothing");
}

/// Unsubscribing stops delivery, and a subscribe directly followed by an unsubscribe of
/// the same topic ends unsubscribed.
pub async fn unsubscribe_stops_delivery<A: Adapter>() {
    let server = Server::start(A::KIND);
    let mut a = Node::<A>::connected(&server.url()).await;
    let b = Node::<A>::connected(&server.url()).await;
    a.backbone.subscribe("t").expect("subscribe");
    sync(&mut a, &b, "t").await;

    a.backbone.unsubscribe("t").expect("unsubscribe");
    a.backbone.subscribe("late").expect("subscribe");
    a.backbone.unsubscribe("late").expect("unsubscribe");
    a.backbone
        .unsubscribe("never")
        .expect("unsubscribing an unknown topic is fine");
    // Operations are applied in order, so once "marker" delivers, the ones before it
    // are in place.
    a.backbone.subscribe("marker").expect("subscribe");
    sync(&mut a, &b, "marker").await;

    publish(&b, "t", "after unsubscribe");
    publish(&b, "late", "after subscribe + unsubscribe");
    publish(&b, "marker", "end");
    let before = a.until(b"end").await;
    assert!(
        before.is_empty(),
        "received after unsubscribing: {before:?}"
    );
}

/// 1000 messages from one adapter on one topic arrive at another in order.
pub async fn keeps_order<A: Adapter>() {
    let server = Server::start(A::KIND);
    let mut a = Node::<A>::connected(&server.url()).await;
    let b = Node::<A>::connected(&server.url()).await;
    a.backbone.subscribe("order").expect("subscribe");
    sync(&mut a, &b, "order").await;

    for n in 0..1000 {
        publish(&b, "order", n.to_string());
    }
    for n in 0..1000 {
        let message = a.next().await;
        assert_eq!(message, n.to_string(), "message {n} out of order");
    }
}

/// Channel names with dots in awkward places, and every allowed character, round-trip,
/// and names that differ only by such dots stay apart.
pub async fn tricky_topic_names<A: Adapter>() {
    let server = Server::start(A::KIND);
    let mut a = Node::<A>::connected(&server.url()).await;
    let b = Node::<A>::connected(&server.url()).await;
    let tricky = [
        "a..b",
        "x.",
        ".x",
        "...",
        "user@host/path=1",
        "Az09_-:.@/=",
        "items:100",
    ];
    for topic in tricky {
        a.backbone.subscribe(topic).expect("subscribe");
    }
    for topic in tricky {
        sync(&mut a, &b, topic).await;
        publish(&b, topic, topic);
        assert_eq!(a.next().await, topic.as_bytes(), "payload on {topic:?}");
    }
    // Near misses of subscribed names must not be delivered to them.
    for neighbour in ["a.b", "x", "x..", "a...b", "user@host/path=2"] {
        publish(&b, neighbour, neighbour);
    }
    publish(&b, "a..b", "end");
    let before = a.until(b"end").await;
    assert!(before.is_empty(), "near misses delivered: {before:?}");
}

/// With no server, the adapter starts, says it is disconnected and refuses to publish;
/// once a server appears it connects by itself, with the subscriptions asked for while
/// it was down.
pub async fn starts_while_the_server_is_down<A: Adapter>() {
    let mut server = Server::stopped(A::KIND);
    let mut a = Node::<A>::connect(&server.url()).await;
    assert!(!a.backbone.is_connected());
    assert_eq!(
        a.backbone.publish("t", Bytes::from_static(b"x")),
        Err(PubsubError::Disconnected(a.backbone.adapter()))
    );
    a.backbone
        .subscribe("early")
        .expect("subscribing while down is queued");

    server.restart();
    let started = Instant::now();
    a.wait_connected(true).await;
    let b = Node::<A>::connected(&server.url()).await;
    sync(&mut a, &b, "early").await;
    assert!(started.elapsed() < SOON, "took {:?}", started.elapsed());
}

/// A server that dies and comes back on the same port: both adapters notice, refuse to
/// publish meanwhile, reconnect within 10 s, and A gets B's publications on the topic it
/// subscribed to before the outage, without subscribing again.
pub async fn survives_an_outage<A: Adapter>() {
    let mut server = Server::start(A::KIND);
    let mut a = Node::<A>::connected(&server.url()).await;
    let b = Node::<A>::connected(&server.url()).await;
    a.backbone.subscribe("outage").expect("subscribe");
    sync(&mut a, &b, "outage").await;

    server.stop();
    a.wait_connected(false).await;
    b.wait_connected(false).await;
    assert_eq!(
        b.backbone.publish("outage", Bytes::from_static(b"lost")),
        Err(PubsubError::Disconnected(b.backbone.adapter()))
    );

    server.restart();
    let restarted = Instant::now();
    a.wait_connected(true).await;
    b.wait_connected(true).await;
    sync(&mut a, &b, "outage").await;
    let took = restarted.elapsed();
    assert!(took < SOON, "recovery took {took:?}");

    publish(&b, "outage", "after");
    assert_eq!(a.next().await, Bytes::from_static(b"after"));
}

/// Dropping an adapter ends its tasks: what it was handed to deliver into is released.
pub async fn dropping_stops_the_tasks<A: Adapter>() {
    let server = Server::start(A::KIND);
    let (inbox, mut received) = inbox();
    let backbone = A::connect(&server.url(), inbox).await.expect("a valid URL");
    backbone.subscribe("t").expect("subscribe");
    drop(backbone);
    // Every sender lives in the adapter's tasks; once they are gone, the channel closes.
    let closed = timeout(SOON, async { while received.recv().await.is_some() {} }).await;
    assert!(closed.is_ok(), "the adapter's tasks outlived it");
}

/// A topic whose delivery is stuck (a fan-out taking long) holds up no topic of another
/// receive worker, and is delivered once unstuck.
pub async fn a_stuck_topic_delays_no_other<A: Adapter>() {
    let server = Server::start(A::KIND);
    let (unstick, stuck) = std::sync::mpsc::channel::<()>();
    let stuck = Mutex::new(stuck);
    let (delivered, mut received) = mpsc::unbounded_channel();
    let inbox = Inbox::new(move |message: Bytes| {
        if message == "stick" {
            let stuck = stuck
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let _ = stuck.recv_timeout(SOON);
        }
        let _ = delivered.send(message);
    })
    .workers(2);
    let slow = "slow";
    let fast = (0..)
        .map(|index| format!("fast-{index}"))
        .find(|topic| inbox.worker_for(topic) != inbox.worker_for(slow))
        .expect("some topic hashes to the other worker");
    let backbone = A::connect(&server.url(), inbox).await.expect("a valid URL");
    let (_, nothing) = mpsc::unbounded_channel();
    let node = Node {
        backbone,
        received: nothing,
    };
    node.wait_connected(true).await;
    let backbone = node.backbone;
    for topic in [slow, fast.as_str()] {
        let held = backbone.subscribe(topic).expect("subscribe");
        assert_eq!(timeout(SOON, held).await, Ok(Ok(true)), "{topic} held");
    }
    backbone
        .publish(slow, Bytes::from_static(b"stick"))
        .expect("publish");
    backbone
        .publish(&fast, Bytes::from_static(b"quick"))
        .expect("publish");
    let first = timeout(SOON, received.recv()).await;
    assert_eq!(
        first,
        Ok(Some(Bytes::from_static(b"quick"))),
        "the other worker's topic arrives while the slow one is stuck"
    );
    unstick.send(()).expect("the slow delivery waits");
    let second = timeout(SOON, received.recv()).await;
    assert_eq!(second, Ok(Some(Bytes::from_static(b"stick"))));
}
