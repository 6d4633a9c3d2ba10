//! What every `fred` client of Chorus shares, written once for the backbone adapter
//! ([`super::RedisBackbone`]) and the Redis stores (presence, history):
//!
//! - the address check ([`parse_config`]) and the client settings ([`builder`]):
//!   reconnect forever with backoff, connect and command timeouts, the unresponsive
//!   check;
//! - the tasks every client needs: [`keep_connected`] (restarts fred's connection task
//!   should it ever end) and [`heartbeat`] (a PING every few seconds, so that a server
//!   that vanished without closing the socket is noticed);
//! - for the stores, [`StoreLink`]: one dedicated client (one per master of a Redis
//!   Cluster) with an accurate up/down state,
//!   that fails every call at once while down and runs Lua [`Script`]s with EVALSHA,
//!   loading them again when Redis answers NOSCRIPT; [`Failure`] says why a call did
//!   not happen, and the reply readers ([`array()`], [`bytes()`], [`text`], [`integer`])
//!   decode what the scripts return;
//! - [`valid_prefix`], the key prefix check that keeps the stores' keys apart.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use fred::clients::Client;
use fred::error::Error as FredError;
use fred::prelude::{Builder, ClientLike, Config, EventInterface, ReconnectPolicy, Value};
use fred::types::config::Options;
use fred::types::{ClusterHash, CustomCommand};
use tokio::sync::{Notify, broadcast};

use super::slots::{MasterLink, Route, SlotTable, keep_current};

use crate::{AbortOnDrop, PubsubError, redact_url, spawn};

/// The adapter and store name in logs and errors.
pub(crate) const NAME: &str = "redis";

/// Reconnect backoff: 100 ms doubling up to 1 s, forever.
const RECONNECT_MIN_MS: u32 = 100;
const RECONNECT_MAX_MS: u32 = 1000;
/// How long a TCP connect (and the handshake commands after it) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long any command may wait for its reply.
pub(crate) const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a connection is pinged, and how long an unanswered command may wait
/// before fred drops the connection as unresponsive.
const HEARTBEAT: Duration = Duration::from_secs(3);
const UNRESPONSIVE_AFTER: Duration = Duration::from_secs(5);

/// Checks that `url` is a Redis address Chorus can use (`redis://[user:pass@]host[:port][/db]`),
/// or a comma-separated list of them (shards), without connecting.
pub fn validate_url(url: &str) -> Result<(), PubsubError> {
    shard_urls(url).map(drop)
}

/// The addresses in a comma-separated list, in order (the order decides which shard
/// holds which channel), each checked. Empty entries and the same server named twice
/// are refused.
pub fn shard_urls(list: &str) -> Result<Vec<String>, PubsubError> {
    let mut urls: Vec<String> = Vec::new();
    // Pub/sub ignores the database number: two databases of one server are one shard.
    let mut servers: Vec<(String, u16)> = Vec::new();
    for (index, entry) in list.split(',').enumerate() {
        let url = entry.trim();
        if url.is_empty() {
            return Err(PubsubError::InvalidUrl(format!(
                "{}: entry {} of the list is empty",
                redact_url(list),
                index + 1
            )));
        }
        let config = parse_config(url)?;
        if is_cluster(&config) && list.contains(',') {
            return Err(PubsubError::InvalidUrl(format!(
                "{}: a redis-cluster:// URL must be the only entry (name more seed nodes \
                 with ?node=host:port)",
                redact_url(list)
            )));
        }
        let server = match &config.server {
            fred::types::config::ServerConfig::Centralized { server } => {
                (server.host.to_ascii_lowercase(), server.port)
            }
            _ => (url.to_owned(), 0),
        };
        if servers.contains(&server) {
            return Err(PubsubError::InvalidUrl(format!(
                "{}: the same server is listed twice",
                redact_url(list)
            )));
        }
        servers.push(server);
        urls.push(url.to_owned());
    }
    Ok(urls)
}

pub(crate) fn parse_config(url: &str) -> Result<Config, PubsubError> {
    let invalid = |why: &str| PubsubError::InvalidUrl(format!("{}: {why}", redact_url(url)));
    let scheme = url
        .split_once("://")
        .map(|(scheme, _)| scheme.to_ascii_lowercase())
        .ok_or_else(|| invalid("expected redis://host:port"))?;
    match scheme.as_str() {
        "redis" | "valkey" => {
            Config::from_url_centralized(url).map_err(|error| invalid(error.details()))
        }
        // A Redis Cluster: one or more seed nodes, the rest found with CLUSTER SLOTS.
        "redis-cluster" | "valkey-cluster" => {
            Config::from_url_clustered(url).map_err(|error| invalid(error.details()))
        }
        // Without a TLS feature fred would warn and then talk plain text to a TLS port.
        "rediss" | "valkeys" | "rediss-cluster" | "valkeys-cluster" => {
            Err(invalid("TLS is not supported by this build"))
        }
        _ => Err(invalid(
            "expected redis://host:port (one server or a comma-separated list of shards) or \
             redis-cluster://host:port[?node=host:port...] (a Redis Cluster)",
        )),
    }
}

/// Whether `config` names a Redis Cluster (sharded pub/sub, keys by hash slot).
pub(crate) fn is_cluster(config: &Config) -> bool {
    matches!(
        config.server,
        fred::types::config::ServerConfig::Clustered { .. }
    )
}

pub(crate) fn builder(config: Config, broadcast_capacity: Option<usize>) -> Builder {
    let mut builder = Builder::from_config(Config {
        // Run the reconnect policy for the first connection too, instead of failing
        // when Redis is not up yet.
        fail_fast: false,
        ..config
    });
    builder
        .with_performance_config(|performance| {
            performance.default_command_timeout = COMMAND_TIMEOUT;
            if let Some(capacity) = broadcast_capacity {
                performance.broadcast_channel_capacity = capacity;
            }
        })
        .with_connection_config(|connection| {
            connection.connection_timeout = CONNECT_TIMEOUT;
            connection.internal_command_timeout = CONNECT_TIMEOUT;
            // A failed AUTH (a password being rotated, a server still loading) is
            // retried like any other connection failure.
            connection.reconnect_on_auth_error = true;
            connection.unresponsive.max_timeout = Some(UNRESPONSIVE_AFTER);
            connection.unresponsive.interval = Duration::from_secs(1);
            // fred leaves Nagle on: a publication written while the previous one is
            // unacknowledged would wait for the ACK.
            connection.tcp.nodelay = Some(true);
        })
        // max_attempts 0: retry forever.
        .set_policy(ReconnectPolicy::new_exponential(
            0,
            RECONNECT_MIN_MS,
            RECONNECT_MAX_MS,
            2,
        ));
    builder
}

/// Drives one client's connection task, and starts it again should it ever end (fred
/// gives up on configuration errors even with an unlimited policy).
pub(crate) async fn keep_connected<C: ClientLike>(client: C, role: &'static str) {
    loop {
        let connection = client.connect();
        // Aborting this task must also stop fred's, which would otherwise retry forever.
        let guard = AbortOnDrop(connection.abort_handle());
        match connection.await {
            Ok(Ok(())) => tracing::warn!(adapter = NAME, role, "connection task ended"),
            Ok(Err(error)) => {
                tracing::warn!(adapter = NAME, role, %error, "connection task failed")
            }
            Err(error) => tracing::warn!(adapter = NAME, role, %error, "connection task died"),
        }
        drop(guard);
        tokio::time::sleep(Duration::from_millis(u64::from(RECONNECT_MAX_MS))).await;
    }
}

/// Pings `client` every few seconds while it is connected.
pub(crate) async fn heartbeat<C: ClientLike>(client: C) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if client.is_connected() {
            // An unanswered PING makes fred's unresponsive check drop the connection.
            let _: Result<Value, _> = client.ping(None).await;
        }
    }
}

/// Whether `prefix` is a cluster topic prefix (`[A-Za-z0-9_.:-]+`), which cannot
/// contain the `|` that ends it in every store key.
pub(crate) fn valid_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// Why a store call did not happen; each store turns it into its own error type, whose
/// variants these mirror.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    /// Disconnected, timed out, or Redis said it is busy or loading.
    Unreachable,
    /// Redis refused the command (`OOM`, `ERR`, ...), or the configuration is unusable.
    Unavailable(String),
    /// Redis answered something the store cannot read.
    Corrupt(String),
}

/// A Redis error reply (`ERR ...`, `OOM ...`) means the server refused the command; a
/// reply that says it is busy or loading, or an error of fred's own (connection
/// closed, timeout, write attempts used up), means it cannot be reached now.
pub(crate) fn failure(error: &FredError) -> Failure {
    // A cluster node that redirects, or is down, is a table about to be read again.
    const TRANSIENT: [&str; 7] = [
        "LOADING",
        "BUSY",
        "MASTERDOWN",
        "TRYAGAIN",
        "MOVED",
        "ASK",
        "CLUSTERDOWN",
    ];
    let code = reply_code(error);
    let refused = code.len() >= 2 && code.bytes().all(|b| b.is_ascii_uppercase());
    if refused && !TRANSIENT.contains(&code) {
        Failure::Unavailable(error.details().to_owned())
    } else {
        Failure::Unreachable
    }
}

/// The first word of an error reply (`MOVED`, `NOSCRIPT`, `ERR`, ...).
fn reply_code(error: &FredError) -> &str {
    error
        .details()
        .split_whitespace()
        .next()
        .unwrap_or_default()
}

fn is_noscript(error: &FredError) -> bool {
    reply_code(error) == "NOSCRIPT"
}

/// A Lua script and, once Redis told it, its SHA-1 (which never changes).
#[derive(Debug)]
pub(crate) struct Script {
    source: &'static str,
    sha: OnceLock<String>,
}

impl Script {
    pub(crate) const fn new(source: &'static str) -> Self {
        Self {
            source,
            sha: OnceLock::new(),
        }
    }
}

/// A store's own connection to Redis: to one server, or to each master of a Redis
/// Cluster (in our own [`SlotTable`], so that one master down fails only the calls
/// for its slots), each call sent to the master of its key's slot.
pub(crate) struct StoreLink {
    nodes: Nodes,
}

enum Nodes {
    Server(ServerLink),
    Cluster {
        table: Arc<SlotTable<ServerLink>>,
        _refresh: AbortOnDrop,
    },
}

/// A store's connection to one Redis server: one `fred` client that reconnects
/// forever, is pinged, and knows accurately whether it is up.
pub(crate) struct ServerLink {
    client: Client,
    /// Whether the connection is known to work. fred still reports a connection that
    /// just dropped as connected until its reconnection delay has passed, and queues
    /// commands meanwhile; this flag falls as soon as fred reports the drop.
    up: Arc<AtomicBool>,
    /// Fail at once while disconnected, and never write a command twice: fred would
    /// replay one whose reply a dropped connection lost, and a script that is not
    /// idempotent (reaping, appending) must not run twice.
    options: Options,
    /// A cluster master's: told when the master redirects a call (MOVED, ASK), which
    /// means the slot table is out of date.
    redirected: Option<Arc<Notify>>,
    _tasks: Vec<AbortOnDrop>,
}

impl std::fmt::Debug for StoreLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreLink")
            .field("connected", &self.is_connected())
            .finish_non_exhaustive()
    }
}

impl StoreLink {
    /// Starts connecting to `url` and returns at once; `role` names the store in logs.
    /// Fails only for a malformed URL.
    pub(crate) fn connect(url: &str, role: &'static str) -> Result<Self, Failure> {
        let unusable = |error: PubsubError| Failure::Unavailable(error.to_string());
        let config = parse_config(url).map_err(unusable)?;
        if !is_cluster(&config) {
            let link = ServerLink::start(config, role, None).map_err(unusable)?;
            return Ok(Self {
                nodes: Nodes::Server(link),
            });
        }
        let table = Arc::new(SlotTable::new(url).map_err(unusable)?);
        let redirected = table.stale_signal();
        let installer = Arc::clone(&table);
        let refresh = spawn(keep_current(
            Arc::clone(&table),
            move |config| ServerLink::start(config, role, Some(Arc::clone(&redirected))),
            move |_, route| installer.install(route),
        ));
        Ok(Self {
            nodes: Nodes::Cluster {
                table,
                _refresh: refresh,
            },
        })
    }

    /// Whether this is a connection to a Redis Cluster.
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self.nodes, Nodes::Cluster { .. })
    }

    /// Whether the connection to Redis is up (to every master of a cluster).
    pub(crate) fn is_connected(&self) -> bool {
        match &self.nodes {
            Nodes::Server(link) => link.is_connected(),
            Nodes::Cluster { table, .. } => table.route().is_healthy(),
        }
    }

    /// Whether the connection that serves `slot` is up (with no slot: every one).
    pub(crate) fn is_connected_at(&self, slot: Option<u16>) -> bool {
        match (&self.nodes, slot) {
            (Nodes::Cluster { table, .. }, Some(slot)) => table
                .route()
                .master(slot)
                .is_some_and(|master| master.link.is_connected()),
            _ => self.is_connected(),
        }
    }

    /// Sends one command (its first argument is its key), failing at once while the
    /// connection it needs is down.
    pub(crate) async fn command(
        &self,
        name: &'static str,
        args: Vec<Value>,
    ) -> Result<Value, Failure> {
        match &self.nodes {
            Nodes::Server(link) => link.command(name, args).await,
            Nodes::Cluster { table, .. } => {
                let route = table.route_full();
                node(&route, first_key_slot(&args))?
                    .command(name, args)
                    .await
            }
        }
    }

    /// Runs `script` with `keys` as KEYS and `args` as ARGV, loading it first when
    /// Redis does not know it (first use, or a server that restarted or flushed its
    /// scripts). Fails at once while disconnected.
    pub(crate) async fn run(
        &self,
        script: &Script,
        keys: Vec<Value>,
        args: Vec<Value>,
    ) -> Result<Value, Failure> {
        self.run_at(script, keys, args, None).await
    }

    /// [`StoreLink::run`] for a script that declares no KEYS but builds every key name
    /// with one hash tag: in a cluster it is sent to `home`, that tag's slot (see
    /// [`slot`]).
    pub(crate) async fn run_at(
        &self,
        script: &Script,
        keys: Vec<Value>,
        args: Vec<Value>,
        home: Option<u16>,
    ) -> Result<Value, Failure> {
        match &self.nodes {
            Nodes::Server(link) => link.run(script, keys, args).await,
            Nodes::Cluster { table, .. } => {
                // By the first key's slot, or the home slot.
                let slot = first_key_slot(&keys).or(home);
                let route = table.route_full();
                node(&route, slot)?.run(script, keys, args).await
            }
        }
    }
}

/// The master that serves `slot` (any connected one when there is none), if it is up.
fn node(route: &Route<ServerLink>, slot: Option<u16>) -> Result<&ServerLink, Failure> {
    let master = match slot {
        Some(slot) => route.master(slot),
        None => route.any_connected(),
    };
    master
        .map(|master| &master.link)
        .filter(|link| link.is_connected())
        .ok_or(Failure::Unreachable)
}

impl MasterLink for ServerLink {
    fn is_up(&self) -> bool {
        self.is_connected()
    }

    fn client(&self) -> &Client {
        &self.client
    }
}

impl ServerLink {
    /// Starts connecting to the one server `config` names and returns at once.
    fn start(
        config: Config,
        role: &'static str,
        redirected: Option<Arc<Notify>>,
    ) -> Result<Self, PubsubError> {
        let client = builder(config, None).build().map_err(|error| {
            PubsubError::InvalidUrl(format!("invalid Redis configuration: {}", error.details()))
        })?;
        let up = Arc::new(AtomicBool::new(false));
        // Taken before connecting, so that the first connection is not missed.
        let watch = watch_link(client.error_rx(), client.reconnect_rx(), Arc::clone(&up));
        let tasks = vec![
            spawn(watch),
            spawn(keep_connected(client.clone(), role)),
            spawn(heartbeat(client.clone())),
        ];
        Ok(Self {
            client,
            up,
            options: Options {
                max_attempts: Some(1),
                fail_fast: true,
                ..Options::default()
            },
            redirected,
            _tasks: tasks,
        })
    }

    fn is_connected(&self) -> bool {
        self.up.load(Ordering::Acquire) && self.client.is_connected()
    }

    async fn command(&self, name: &'static str, args: Vec<Value>) -> Result<Value, Failure> {
        if !self.is_connected() {
            return Err(Failure::Unreachable);
        }
        self.custom(name, args)
            .await
            .map_err(|error| failure(&error))
    }

    async fn run(
        &self,
        script: &Script,
        keys: Vec<Value>,
        args: Vec<Value>,
    ) -> Result<Value, Failure> {
        if !self.is_connected() {
            return Err(Failure::Unreachable);
        }
        let mut argv = Vec::with_capacity(2 + keys.len() + args.len());
        // Placeholder for the SHA-1, set per attempt.
        argv.push(Value::Null);
        argv.push(Value::from(i64::try_from(keys.len()).unwrap_or(i64::MAX)));
        argv.extend(keys);
        argv.extend(args);
        let sha = match script.sha.get() {
            Some(sha) => sha.clone(),
            None => self.load(script).await?,
        };
        match self.evalsha(&sha, &mut argv).await {
            Err(error) if is_noscript(&error) => {
                let sha = self.load(script).await?;
                self.evalsha(&sha, &mut argv).await.map_err(|e| failure(&e))
            }
            result => result.map_err(|e| failure(&e)),
        }
    }

    async fn evalsha(&self, sha: &str, argv: &mut [Value]) -> Result<Value, FredError> {
        argv[0] = Value::from(sha);
        // fred's `WithOptions` has no `LuaInterface`: send EVALSHA as a custom command.
        self.custom("EVALSHA", argv.to_vec()).await
    }

    /// SCRIPT LOAD; returns (and remembers) the script's SHA-1, which is the same on
    /// every server.
    async fn load(&self, script: &Script) -> Result<String, Failure> {
        let reply = self
            .custom(
                "SCRIPT",
                vec![Value::from("LOAD"), Value::from(script.source)],
            )
            .await
            .map_err(|error| failure(&error))?;
        let sha = text(&reply)?;
        Ok(script.sha.get_or_init(|| sha).clone())
    }

    async fn custom(&self, name: &'static str, args: Vec<Value>) -> Result<Value, FredError> {
        let reply = self
            .client
            .with_options(&self.options)
            .custom(
                CustomCommand::new_static(name, ClusterHash::Random, false),
                args,
            )
            .await;
        if let (Err(error), Some(redirected)) = (&reply, &self.redirected)
            && is_redirection(error)
        {
            redirected.notify_one();
        }
        reply
    }
}

/// The cluster hash slot of `key` (of its hash tag, when it has one).
pub(crate) fn slot(key: &str) -> u16 {
    fred::util::redis_keyslot(key.as_bytes())
}

/// The slot of a command's first argument, its key.
fn first_key_slot(args: &[Value]) -> Option<u16> {
    let key = bytes(args.first()?).ok()?;
    Some(fred::util::redis_keyslot(key))
}

/// A cluster node's answer that the slot is served elsewhere.
fn is_redirection(error: &FredError) -> bool {
    matches!(reply_code(error), "MOVED" | "ASK")
}

/// Keeps `up` up to date: fred reports every lost connection and every failed
/// connection attempt on `errors`, and every (re)connection on `connections`.
async fn watch_link(
    mut errors: broadcast::Receiver<(FredError, Option<fred::prelude::Server>)>,
    mut connections: broadcast::Receiver<fred::prelude::Server>,
    up: Arc<AtomicBool>,
) {
    loop {
        // Biased: when both are pending, the error is older than the reconnection.
        let now_up = tokio::select! {
            biased;
            event = errors.recv() => match event {
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => false,
                Err(broadcast::error::RecvError::Closed) => break,
            },
            event = connections.recv() => match event {
                Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => true,
                Err(broadcast::error::RecvError::Closed) => break,
            },
        };
        up.store(now_up, Ordering::Release);
    }
}

pub(crate) fn array(value: Value) -> Result<Vec<Value>, Failure> {
    match value {
        Value::Array(values) => Ok(values),
        // An empty Lua table may come back as nil.
        Value::Null => Ok(Vec::new()),
        other => Err(Failure::Corrupt(format!(
            "expected an array, got {}",
            other.kind()
        ))),
    }
}

pub(crate) fn bytes(value: &Value) -> Result<&[u8], Failure> {
    match value {
        Value::String(text) => Ok(text.as_bytes()),
        Value::Bytes(bytes) => Ok(bytes),
        other => Err(Failure::Corrupt(format!(
            "expected a string, got {}",
            other.kind()
        ))),
    }
}

pub(crate) fn text(value: &Value) -> Result<String, Failure> {
    std::str::from_utf8(bytes(value)?)
        .map(str::to_owned)
        .map_err(|_| Failure::Corrupt("a name is not UTF-8".to_owned()))
}

/// An integer reply, or a decimal string one.
pub(crate) fn integer(value: &Value) -> Result<u64, Failure> {
    match value {
        Value::Integer(n) => {
            u64::try_from(*n).map_err(|_| Failure::Corrupt(format!("negative number {n}")))
        }
        Value::String(_) | Value::Bytes(_) => std::str::from_utf8(bytes(value)?)
            .ok()
            .and_then(|text| text.parse().ok())
            .ok_or_else(|| Failure::Corrupt("expected a number".to_owned())),
        other => Err(Failure::Corrupt(format!(
            "expected a number, got {}",
            other.kind()
        ))),
    }
}

pub(crate) fn flag(value: &Value) -> Result<bool, Failure> {
    integer(value).map(|n| n != 0)
}

/// Milliseconds, saturated.
pub(crate) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_checked_before_connecting() {
        assert_eq!(validate_url("redis://127.0.0.1:6379"), Ok(()));
        assert_eq!(validate_url("redis://:secret@redis/2"), Ok(()));
        assert_eq!(validate_url("redis://localhost"), Ok(()));
        assert_eq!(
            validate_url("redis-cluster://:pw@a:7000?node=b:7001&node=c:7002"),
            Ok(())
        );
        assert_eq!(
            shard_urls("redis://a:1, redis://a:2,redis://b:1/0"),
            Ok(vec![
                "redis://a:1".to_owned(),
                "redis://a:2".to_owned(),
                "redis://b:1/0".to_owned()
            ])
        );
        for bad in [
            "redis://a:1,",
            "redis://a:1,,redis://b",
            "redis://a:1,redis://a:1",
            "redis-cluster://a:1,redis://b:1",
            "redis://b:1,redis-cluster://a:1",
            "rediss-cluster://a:1",
            "redis://a:1,redis://A:1/1",
            "redis://a:6379,redis://:pw@a",
            "redis://a,http://b",
            "",
            "localhost:6379",
            "http://localhost",
            "rediss://localhost",
            "redis://",
            "redis://host:notaport",
            "redis://host/1/2",
        ] {
            assert!(
                matches!(validate_url(bad), Err(PubsubError::InvalidUrl(_))),
                "{bad:?} should be refused"
            );
        }
    }

    #[test]
    fn errors_hide_the_password() {
        let Err(PubsubError::InvalidUrl(text)) = validate_url("rediss://:hunter2@h") else {
            panic!("a TLS URL is refused");
        };
        assert!(!text.contains("hunter2"), "{text}");
    }

    #[test]
    fn prefixes_are_checked() {
        assert!(valid_prefix("websocket.broadcast"));
        assert!(valid_prefix("a:b-c_d.9"));
        for bad in ["", "a|b", "a b", "a{b}", "ü"] {
            assert!(!valid_prefix(bad), "{bad:?}");
        }
    }

    #[test]
    fn refusals_are_told_from_outages() {
        use fred::error::ErrorKind;
        let refused = FredError::new(ErrorKind::Unknown, "OOM command not allowed");
        assert!(matches!(
            failure(&refused),
            Failure::Unavailable(reason) if reason.starts_with("OOM")
        ));
        for outage in [
            FredError::new(ErrorKind::Unknown, "LOADING Redis is loading the dataset"),
            FredError::new(ErrorKind::Unknown, "Too many failed write attempts."),
            FredError::new(ErrorKind::IO, "Connection reset by peer (os error 104)"),
            FredError::new(ErrorKind::Canceled, "Connection closed unexpectedly."),
            FredError::new(ErrorKind::Timeout, "Request timed out."),
        ] {
            assert_eq!(failure(&outage), Failure::Unreachable, "{outage}");
        }
        assert!(is_noscript(&FredError::new(
            ErrorKind::Unknown,
            "NOSCRIPT No matching script."
        )));
    }

    #[test]
    fn replies_are_read_or_called_corrupt() {
        assert_eq!(integer(&Value::Integer(7)), Ok(7));
        assert_eq!(integer(&Value::from("18446744073709551615")), Ok(u64::MAX));
        assert!(matches!(
            integer(&Value::Integer(-1)),
            Err(Failure::Corrupt(_))
        ));
        assert_eq!(array(Value::Null), Ok(Vec::new()));
        assert!(matches!(array(Value::from("x")), Err(Failure::Corrupt(_))));
        assert_eq!(
            text(&Value::Bytes(bytes::Bytes::from_static(b"ok"))),
            Ok("ok".to_owned())
        );
    }
}
