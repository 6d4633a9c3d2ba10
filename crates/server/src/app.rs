//! The running server: shared state, start-up in the right order (config, metrics,
//! backbone, node, listener), the accept loop, and graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chorus_gate::{AuthConfig, Gate, GateConfig, IpLimits, IpSlot, Jwks, JwtConfig, UserSlot};
use chorus_hub::{CloseReason, Hub};
use chorus_pubsub::history::HistoryStore;
use chorus_pubsub::history::memory::MemoryHistory;
use chorus_pubsub::local::LocalBus;
use chorus_pubsub::nats::NatsBackbone;
use chorus_pubsub::now_ms;
use chorus_pubsub::presence::PresenceStore;
use chorus_pubsub::presence::memory::MemoryPresence;
use chorus_pubsub::presence::nats::NatsPresence;
use chorus_rpc::{Router, Services, notification};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::config::{Backbone, Config};
use crate::history::Histories;
use crate::http_client::{HttpClient, JwksSource};
use crate::lifecycle::Lifecycle;
use crate::metrics::Metrics;
use crate::node::{ClusterNode, NodeParts, NodeReceiver, Topics};
use crate::presence::{Presence, PresenceSettings};
use crate::proxy::Proxy;
use crate::webhook::Webhook;

/// tungstenite's per-connection read buffer, allocated up front for every socket, idle
/// or not. The socket is read in larger chunks by [`crate::lazy_read`], so this only
/// needs to hold a typical request (bigger frames grow it on demand); 2 KiB here cost
/// 1.8 KB more per idle connection (claudedocs/BENCHMARKS.md).
const READ_BUFFER: usize = 256;
/// Write buffer size past which tungstenite writes to the socket before a flush.
const WRITE_BUFFER: usize = 16 * 1024;
/// How often limiter state of client addresses that went quiet is dropped.
const FORGET_IDLE_EVERY: Duration = Duration::from_secs(1);
/// Longest wait at shutdown, after the drain, for presence, the backbone and the
/// webhook to take what is left.
const FINAL_FLUSH: Duration = Duration::from_secs(5);

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot register metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("cannot start the {adapter} backbone: {reason}")]
    Backbone {
        adapter: &'static str,
        reason: String,
    },
    #[error("cannot make the HTTP client: {0}")]
    HttpClient(String),
}

/// Everything a request or connection needs.
pub struct App {
    pub config: Config,
    pub node: Arc<ClusterNode>,
    /// What handlers use: the node, the gate, the metrics.
    pub services: Arc<Services>,
    pub router: Router,
    /// The server API's methods (`POST /api`).
    pub api_router: Router,
    pub metrics: Arc<Metrics>,
    pub ip_limits: Arc<IpLimits>,
    /// The backend proxies, when one is configured.
    pub proxy: Option<Proxy>,
    pub ws_config: WebSocketConfig,
    pub started: Instant,
    draining: AtomicBool,
    /// WebSocket connections, counted from the accepted upgrade to the socket's end.
    connections: AtomicUsize,
    connection_closed: Notify,
}

impl std::fmt::Debug for App {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

/// A reserved connection; releasing it updates the counts and wakes shutdown.
pub struct ConnectionSlot {
    app: Arc<App>,
    _ip: IpSlot,
    _user: Option<UserSlot>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.app.connections.fetch_sub(1, Ordering::AcqRel);
        self.app.metrics.connections_active.dec();
        self.app.connection_closed.notify_waiters();
    }
}

impl App {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    /// Reserves a connection, or `None` past `WS_MAX_CONNECTIONS`.
    pub fn reserve_connection(
        self: &Arc<Self>,
        ip: IpSlot,
        user: Option<UserSlot>,
    ) -> Option<ConnectionSlot> {
        let max = self.config.transport.max_connections;
        let previous = self.connections.fetch_add(1, Ordering::AcqRel);
        if max != 0 && previous >= max {
            self.connections.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        self.metrics.connections_active.inc();
        Some(ConnectionSlot {
            app: Arc::clone(self),
            _ip: ip,
            _user: user,
        })
    }

    /// Section 6 of the contract: stop accepting, tell every client when to come
    /// back (spread over the grace period), close with 1001, and wait until every
    /// connection is gone or the grace period ends.
    pub async fn drain(&self) {
        self.draining.store(true, Ordering::Release);
        let grace = self.config.transport.shutdown_grace;
        let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX).max(1);
        tracing::info!(connections = self.connections(), ?grace, "draining");
        self.node.hub().for_each_client(|client| {
            let after = rand::random_range(0..grace_ms);
            let _ = client.send(notification::value(
                "sys.shutdown",
                &serde_json::json!({"reconnect_after_ms": after}),
            ));
            client.close(CloseReason::Shutdown);
        });
        let all_closed = async {
            loop {
                let closed = self.connection_closed.notified();
                if self.connections() == 0 {
                    return;
                }
                closed.await;
            }
        };
        if tokio::time::timeout(grace, all_closed).await.is_err() {
            tracing::warn!(
                remaining = self.connections(),
                "grace period over; exiting with connections open"
            );
        }
    }
}

/// A server listening on its port.
pub struct RunningServer {
    pub app: Arc<App>,
    pub local_addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl std::fmt::Debug for RunningServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningServer")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

impl RunningServer {
    /// Drains (section 6), hands the last accepted publications to the backbone, then
    /// stops accepting.
    pub async fn shutdown(self) {
        self.app.drain().await;
        // One budget for everything that must leave before the process does: the
        // disconnections' presence writes and this replica's retirement, the last
        // publications and lifecycle events on the backbone, the webhook's queue.
        let deadline = tokio::time::Instant::now() + FINAL_FLUSH;
        let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
        let node = &self.app.node;
        node.presence().retire(left()).await;
        node.flush_backbone(left()).await;
        if let Some(webhook) = node.presence().lifecycle().webhook() {
            webhook.flush(left()).await;
        }
        self.accept.abort();
    }
}

/// Builds everything from a validated config and starts listening.
pub async fn start(config: Config) -> Result<RunningServer, StartError> {
    start_with_bus(config, None).await
}

/// Like [`start`], with the `local` adapter joined to a shared in-process bus, so
/// that several servers in one process form a cluster (used by tests).
pub async fn start_with_bus(
    config: Config,
    bus: Option<LocalBus>,
) -> Result<RunningServer, StartError> {
    let router = Router::with_builtin_methods();
    let api_router = Router::for_api();
    let method_names: Vec<&'static str> = router
        .method_names()
        .into_iter()
        .chain(api_router.method_names())
        .chain([chorus_rpc::PROXIED])
        .collect();
    let metrics = Arc::new(Metrics::new(
        config.cluster.backbone.adapter(),
        &method_names,
    )?);
    let hub = Arc::new(Hub::new(config.transport.send_buffer, metrics.clone()));
    let store = presence_store(&config, bus.as_ref()).await?;
    let history = Arc::new(Histories::new(
        history_store(&config, bus.as_ref()).await?,
        config.history.recovery_max,
        config.history.idempotency_ttl,
        metrics.history.clone(),
    ));
    let backbone = connect_backbone(&config, bus).await?;
    if let Some((backbone, _)) = &backbone {
        tracing::info!(
            adapter = backbone.adapter(),
            connected = backbone.is_connected(),
            "cluster backbone configured (reconnects by itself while down)"
        );
    } else {
        tracing::info!(
            "no cluster backbone (WS_PUBSUB_ENABLED unset or false, or the adapter's URL empty): running standalone"
        );
    }
    let http = HttpClient::new().map_err(StartError::HttpClient)?;
    let webhook = config
        .users
        .webhook
        .as_ref()
        .map(|settings| Webhook::start(settings, http.clone(), metrics.webhook.clone()));
    let lifecycle = Arc::new(Lifecycle::new(
        &config.cluster.pubsub_channel,
        backbone.as_ref().map(|(backbone, _)| Arc::clone(backbone)),
        webhook,
        metrics.lifecycle_events.clone(),
    ));
    let settings = PresenceSettings {
        node_id: config.cluster.node_id.clone(),
        started_at_ms: now_ms(),
        ttl: config.users.presence_ttl,
        device_replace: config.users.device_replace,
    };
    let presence_errors = metrics.presence_errors.clone();
    let node = ClusterNode::start(NodeParts {
        node_id: config.cluster.node_id.clone(),
        hub,
        backbone,
        topics: Topics::new(&config.cluster.pubsub_channel),
        metrics: metrics.pubsub.clone(),
        namespaces: config.gate.namespaces.clone(),
        presence: Box::new(move |effects| {
            Presence::start(store, settings, lifecycle, presence_errors, effects)
        }),
        history,
    });
    let gate = Arc::new(Gate::new(gate_config(&config, &http)));
    let ip_limits = IpLimits::new(gate.limits());
    let proxy = config.proxy.any().then(|| {
        Proxy::new(
            &config.proxy,
            http.clone(),
            config.cluster.node_id.clone(),
            config.transport.send_buffer,
            metrics.proxy.clone(),
        )
    });
    let services = Arc::new(Services {
        node: node.clone(),
        gate,
        observer: metrics.clone(),
        backend: proxy
            .clone()
            .map(|proxy| Arc::new(proxy) as Arc<dyn chorus_rpc::Backend>),
    });
    let transport = &config.transport;
    // One frame of the largest kind (a reply up to the send budget, or an echoed
    // message) must fit the write buffer beside a batch.
    let largest_frame = transport.send_buffer.max(transport.max_message_size);
    let ws_config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .max_write_buffer_size(largest_frame + 2 * WRITE_BUFFER + (72 << 10))
        .max_message_size(Some(transport.max_message_size))
        .max_frame_size(Some(transport.max_message_size));
    let addr = SocketAddr::new(transport.host, transport.port);
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })?;
    let local_addr = listener
        .local_addr()
        .map_err(|source| StartError::Bind { addr, source })?;
    let app = Arc::new(App {
        config,
        node,
        services,
        router,
        api_router,
        metrics,
        ip_limits,
        proxy,
        ws_config,
        started: Instant::now(),
        draining: AtomicBool::new(false),
        connections: AtomicUsize::new(0),
        connection_closed: Notify::new(),
    });
    tracing::info!(%local_addr, node_id = app.node.node_id(), path = app.config.transport.ws_path, "listening");
    tokio::spawn(forget_idle_addresses(Arc::downgrade(&app.ip_limits)));
    let accept = tokio::spawn(accept_loop(listener, Arc::clone(&app)));
    Ok(RunningServer {
        app,
        local_addr,
        accept,
    })
}

/// The gate's settings, with the JWKS (fetched once now, in the background) when one
/// is configured.
fn gate_config(config: &Config, http: &HttpClient) -> GateConfig {
    let settings = &config.gate;
    let jwks = settings.jwt_jwks_url.as_ref().and_then(|url| {
        let uri = url.parse().ok()?;
        let jwks = Arc::new(Jwks::new(
            JwksSource {
                client: http.clone(),
                uri,
            },
            settings.jwt_jwks_refresh,
        ));
        let first = Arc::clone(&jwks);
        tokio::spawn(async move {
            match first.refresh().await {
                Ok(keys) => tracing::info!(keys, "JWKS fetched"),
                Err(why) => {
                    tracing::warn!(%why, "cannot fetch the JWKS yet; tried again on the first token")
                }
            }
        });
        Some(jwks)
    });
    let jwt = settings.accepts_jwt().then(|| JwtConfig {
        secret: settings.jwt_secret.clone(),
        public_key: settings.jwt_public_key.clone(),
        jwks,
        leeway: settings.jwt_leeway,
        issuer: settings.jwt_issuer.clone(),
        audience: settings.jwt_audience.clone(),
    });
    GateConfig {
        limits: config.limits.gate.clone(),
        auth: AuthConfig {
            enabled: settings.auth_enabled,
            static_tokens: settings.bearer_tokens.clone(),
            jwt,
        },
        namespaces: settings.namespaces.clone(),
        client_broadcast: settings.client_broadcast,
        channels_require_grant: settings.channels_require_grant,
        max_connections_per_user: settings.max_connections_per_user,
    }
}

/// The presence store that goes with the configured backbone.
async fn presence_store(
    config: &Config,
    bus: Option<&LocalBus>,
) -> Result<Arc<dyn PresenceStore>, StartError> {
    let prefix = &config.cluster.pubsub_channel;
    let failed = |err: chorus_pubsub::presence::PresenceError| StartError::Backbone {
        adapter: config.cluster.backbone.adapter(),
        reason: err.to_string(),
    };
    Ok(match &config.cluster.backbone {
        Backbone::Standalone => Arc::new(MemoryPresence::own()),
        Backbone::Local => Arc::new(bus.map_or_else(MemoryPresence::new, LocalBus::presence)),
        // Several servers: each channel's presence on the channel's server, as its
        // traffic and history (one server or a Redis Cluster: one store, as before).
        Backbone::Redis { url } => Arc::from(
            chorus_pubsub::presence::redis::connect_shards(url, prefix)
                .await
                .map_err(failed)?,
        ),
        Backbone::Nats { url } => {
            Arc::new(NatsPresence::connect(url, prefix).await.map_err(failed)?)
        }
    })
}

/// The history store that goes with the configured backbone.
async fn history_store(
    config: &Config,
    bus: Option<&LocalBus>,
) -> Result<Arc<dyn HistoryStore>, StartError> {
    let failed = |err: chorus_pubsub::history::HistoryError| StartError::Backbone {
        adapter: config.cluster.backbone.adapter(),
        reason: err.to_string(),
    };
    let prefix = &config.cluster.pubsub_channel;
    Ok(match &config.cluster.backbone {
        Backbone::Standalone => Arc::new(MemoryHistory::new()),
        Backbone::Local => Arc::new(bus.map_or_else(MemoryHistory::new, LocalBus::history)),
        Backbone::Redis { url } => Arc::new(
            chorus_pubsub::history::redis::connect(url, prefix)
                .await
                .map_err(failed)?,
        ),
        Backbone::Nats { url } => Arc::new(
            chorus_pubsub::history::nats::connect(url, prefix)
                .await
                .map_err(failed)?,
        ),
    })
}

type BackboneParts = (Arc<dyn chorus_pubsub::Backbone>, NodeReceiver);

/// Creates the configured adapter. Redis and NATS adapters connect in the
/// background: a backbone that is down at start-up is reported as disconnected, and
/// joined as soon as it appears.
async fn connect_backbone(
    config: &Config,
    bus: Option<LocalBus>,
) -> Result<Option<BackboneParts>, StartError> {
    let receiver = NodeReceiver::default();
    let inbox = receiver.inbox(config.cluster.backbone_queue);
    let failed = |err: chorus_pubsub::PubsubError| StartError::Backbone {
        adapter: config.cluster.backbone.adapter(),
        reason: err.to_string(),
    };
    let backbone: Arc<dyn chorus_pubsub::Backbone> = match &config.cluster.backbone {
        Backbone::Standalone => return Ok(None),
        Backbone::Local => Arc::new(bus.unwrap_or_default().attach(inbox)),
        Backbone::Redis { url } => Arc::from(
            chorus_pubsub::redis::connect_shards(url, &config.cluster.pubsub_channel, inbox)
                .await
                .map_err(failed)?,
        ),
        Backbone::Nats { url } => {
            Arc::new(NatsBackbone::connect(url, inbox).await.map_err(failed)?)
        }
    };
    Ok(Some((backbone, receiver)))
}

async fn accept_loop(listener: TcpListener, app: Arc<App>) {
    let handshake_timeout = app.config.transport.handshake_timeout;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of file descriptors, typically: back off instead of spinning.
                tracing::warn!(%err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let app = Arc::clone(&app);
        tokio::spawn(async move {
            // An event stream whose socket stopped taking writes drops it through this.
            let abort = Arc::new(crate::sse::Abort::default());
            let handle = Arc::clone(&abort);
            let service = service_fn(move |request| {
                crate::http::route(Arc::clone(&app), peer, request, Arc::clone(&handle))
            });
            // The timer bounds how long a request's head may take to arrive, idle
            // keep-alive included: a socket that sends nothing is closed.
            let served = http1::Builder::new()
                .keep_alive(true)
                .timer(TokioTimer::new())
                .header_read_timeout(handshake_timeout)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::select! {
                served = served => {
                    if let Err(err) = served {
                        tracing::debug!(%err, "http connection ended with an error");
                    }
                }
                () = abort.requested() => {}
            }
        });
    }
}

/// Drops the upgrade-rate state of addresses that went quiet, every second, so that
/// a flood of distinct addresses holds at most about a second's worth of them.
async fn forget_idle_addresses(limits: std::sync::Weak<IpLimits>) {
    let mut tick = tokio::time::interval(FORGET_IDLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(limits) = limits.upgrade() else {
            return;
        };
        limits.forget_idle();
    }
}
