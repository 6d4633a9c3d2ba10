//! The Prometheus series of section 4 of the contract, registered at start-up so that
//! every one exists before its first event.

use chorus_gate::Scope;
use chorus_hub::{ClientId, HubEvents};
use chorus_rpc::{CallRecord, Observer};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// RPC latency buckets: handlers run in microseconds, so start low.
const RPC_BUCKETS: &[f64] = &[
    0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025,
    0.1,
];
/// Cross-replica latency buckets, in seconds.
const PUBSUB_BUCKETS: &[f64] = &[
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
];

/// Per-method handles, resolved once so the hot path does no label lookup.
struct MethodSeries {
    ok: IntCounter,
    error: IntCounter,
    duration: Histogram,
}

/// Pubsub series for the configured adapter.
#[derive(Clone)]
pub struct PubsubMetrics {
    pub published: IntCounter,
    pub received: IntCounter,
    pub errors: IntCounter,
    pub connected: IntGauge,
    /// Backbone servers (shards) configured, and how many are connected.
    shards: IntGauge,
    shards_connected: IntGauge,
    pub latency: Histogram,
    /// Envelopes from another process carrying this replica's node id.
    pub node_id_conflicts: IntCounter,
    /// Losses inside the adapter, by direction: `published` then `received`.
    dropped: [IntCounter; 2],
}

/// What a `/metrics` scrape reads from the backbone: its connection state and the
/// adapter's own loss totals since start.
pub struct BackboneSnapshot {
    pub connected: bool,
    /// Servers (shards) the backbone uses, and how many of them are connected.
    pub shards: usize,
    pub shards_connected: usize,
    pub dropped_published: u64,
    pub dropped_received: u64,
}

impl PubsubMetrics {
    /// Brings the scrape-time series up to the adapter's own counters.
    pub fn observe(&self, snapshot: &BackboneSnapshot) {
        self.connected.set(i64::from(snapshot.connected));
        self.shards
            .set(i64::try_from(snapshot.shards).unwrap_or(i64::MAX));
        self.shards_connected
            .set(i64::try_from(snapshot.shards_connected).unwrap_or(i64::MAX));
        let totals = [snapshot.dropped_published, snapshot.dropped_received];
        // One lock for both counters: the read-then-add must not interleave.
        static SYNC: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _guard = SYNC
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (counter, total) in self.dropped.iter().zip(totals) {
            let missing = total.saturating_sub(counter.get());
            if missing > 0 {
                counter.inc_by(missing);
            }
        }
    }
}

pub struct Metrics {
    registry: Registry,
    pub connections_active: IntGauge,
    pub connections_total: IntCounter,
    pub messages_received: IntCounter,
    pub messages_sent: IntCounter,
    /// By scope, in the order of [`Scope::ALL`].
    rate_limited: Vec<IntCounter>,
    pub slow_consumer_drops: IntCounter,
    pub replies_cut: IntCounter,
    pub flood_closes: IntCounter,
    /// By reason, in the order of [`chorus_gate::AuthError::REASONS`].
    auth_failures: Vec<IntCounter>,
    pub pubsub: PubsubMetrics,
    /// Presence writes and reads that failed (store unreachable, refused).
    pub presence_errors: IntCounter,
    /// Lifecycle events by event, in the order of [`crate::lifecycle::Event::ALL`].
    pub lifecycle_events: Vec<IntCounter>,
    pub webhook: crate::webhook::WebhookMetrics,
    pub history: crate::history::HistoryMetrics,
    pub proxy: crate::proxy::ProxyMetrics,
    /// Messages a channel's delivery policy dropped from a client's queue.
    pub policy_drops: IntCounter,
    /// Sorted by method name: found by binary search, without hashing every call's name.
    methods: Vec<(&'static str, MethodSeries)>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Registers every series; `methods` are the router's method names.
    pub fn new(adapter: &'static str, methods: &[&'static str]) -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let counter = IntCounter::new(name, help)?;
            registry.register(Box::new(counter.clone()))?;
            Ok(counter)
        };
        let connections_active =
            IntGauge::new("ws_connections_active", "Open WebSocket connections")?;
        registry.register(Box::new(connections_active.clone()))?;
        let connections_total = counter(
            "ws_connections_total",
            "WebSocket connections accepted since start",
        )?;
        let messages_received = counter(
            "ws_messages_received_total",
            "Text messages received from clients",
        )?;
        let messages_sent = counter(
            "ws_messages_sent_total",
            "Messages written to client sockets",
        )?;
        let rate_limited_vec = IntCounterVec::new(
            Opts::new(
                "ws_rate_limited_total",
                "Calls and upgrades refused by a budget: scope connection (request budget), \
                 publish (a connection's publish budgets), replica (the replica's publish \
                 budgets), ip (upgrade rate or connections per address)",
            ),
            &["scope"],
        )?;
        registry.register(Box::new(rate_limited_vec.clone()))?;
        let rate_limited = Scope::ALL
            .iter()
            .map(|scope| rate_limited_vec.with_label_values(&[scope.label()]))
            .collect();
        let slow_consumer_drops = counter(
            "ws_slow_consumer_drops_total",
            "Clients disconnected (1013) because their outbound queue went over WS_SEND_BUFFER \
             or their socket accepted no write for WS_WRITE_TIMEOUT",
        )?;
        let replies_cut = counter(
            "ws_replies_cut_total",
            "Replies replaced by -32013 because they would not fit the client's send buffer",
        )?;
        let flood_closes = counter(
            "ws_flood_closes_total",
            "Connections closed (1008) for pushing at more than ten times their request budget",
        )?;
        let auth_failures_vec = IntCounterVec::new(
            Opts::new(
                "ws_auth_failures_total",
                "Upgrades refused with 401, by reason (missing, malformed, expired, ...)",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(auth_failures_vec.clone()))?;
        let auth_failures = chorus_gate::AuthError::REASONS
            .iter()
            .map(|reason| auth_failures_vec.with_label_values(&[reason]))
            .collect();
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;

        let requests = IntCounterVec::new(
            Opts::new(
                "ws_rpc_requests_total",
                "JSON-RPC calls by method and outcome",
            ),
            &["method", "outcome"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        let durations = HistogramVec::new(
            HistogramOpts::new("ws_rpc_duration_seconds", "JSON-RPC handler time by method")
                .buckets(RPC_BUCKETS.to_vec()),
            &["method"],
        )?;
        registry.register(Box::new(durations.clone()))?;
        let mut method_series = Vec::new();
        for &method in methods.iter().chain(&["unknown", "invalid"]) {
            method_series.push((
                method,
                MethodSeries {
                    ok: requests.with_label_values(&[method, "ok"]),
                    error: requests.with_label_values(&[method, "error"]),
                    duration: durations.with_label_values(&[method]),
                },
            ));
        }
        method_series.sort_unstable_by_key(|(method, _)| *method);
        method_series.dedup_by_key(|(method, _)| *method);

        let labelled = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let vec = IntCounterVec::new(Opts::new(name, help), &["adapter"])?;
            registry.register(Box::new(vec.clone()))?;
            Ok(vec.with_label_values(&[adapter]))
        };
        let published = labelled(
            "ws_pubsub_published_total",
            "Envelopes handed to the backbone",
        )?;
        let received = labelled(
            "ws_pubsub_received_total",
            "Envelopes received from other replicas",
        )?;
        let errors = labelled(
            "ws_pubsub_errors_total",
            "Backbone failures (publish refused, undecodable envelope)",
        )?;
        let labelled_gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let vec = IntGaugeVec::new(Opts::new(name, help), &["adapter"])?;
            registry.register(Box::new(vec.clone()))?;
            Ok(vec.with_label_values(&[adapter]))
        };
        let connected = labelled_gauge(
            "ws_pubsub_connected",
            "1 while the backbone connection is up",
        )?;
        let shards = labelled_gauge(
            "ws_pubsub_shards",
            "Backbone servers configured (WS_REDIS_URL entries; 1 otherwise)",
        )?;
        let shards_connected = labelled_gauge(
            "ws_pubsub_shards_connected",
            "Backbone servers currently connected: below ws_pubsub_shards, the channels of the others stop",
        )?;
        let latency_vec = HistogramVec::new(
            HistogramOpts::new(
                "ws_pubsub_latency_seconds",
                "Origin timestamp to local delivery, for envelopes from other replicas",
            )
            .buckets(PUBSUB_BUCKETS.to_vec()),
            &["adapter"],
        )?;
        registry.register(Box::new(latency_vec.clone()))?;
        let dropped_vec = IntCounterVec::new(
            Opts::new(
                "ws_pubsub_dropped_total",
                "Messages lost inside the backbone adapter: accepted publications that never \
                 left (direction=published), or messages for this replica it read too slowly \
                 (direction=received)",
            ),
            &["adapter", "direction"],
        )?;
        registry.register(Box::new(dropped_vec.clone()))?;
        let node_id_conflicts = counter(
            "ws_node_id_conflicts_total",
            "Envelopes from another replica carrying this replica's WS_NODE_ID",
        )?;
        let presence_errors = counter(
            "ws_presence_errors_total",
            "Presence store calls that failed (unreachable, timed out, refused): writes are \
             recorded again once the store answers",
        )?;
        let lifecycle_vec = IntCounterVec::new(
            Opts::new(
                "ws_lifecycle_events_total",
                "Lifecycle events reported by this replica (user_online, user_offline, \
                 device_online, device_offline)",
            ),
            &["event"],
        )?;
        registry.register(Box::new(lifecycle_vec.clone()))?;
        let lifecycle_events = crate::lifecycle::Event::ALL
            .iter()
            .map(|event| lifecycle_vec.with_label_values(&[event.name()]))
            .collect();
        let webhook_dropped = IntCounterVec::new(
            Opts::new(
                "ws_webhook_dropped_total",
                "Lifecycle events the webhook gave up: queue_full (WS_WEBHOOK_QUEUE) or \
                 refused (the receiver answered a 4xx other than 408/429)",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(webhook_dropped.clone()))?;
        let webhook_queued = IntGauge::new(
            "ws_webhook_queue",
            "Lifecycle events waiting to be POSTed to the webhook",
        )?;
        registry.register(Box::new(webhook_queued.clone()))?;
        let reads = IntCounterVec::new(
            Opts::new(
                "ws_history_reads_total",
                "History store reads: recovery (one per channel at a time serves every \
                 client recovering it), gap (publications the backbone did not bring), \
                 history (the history method)",
            ),
            &["reason"],
        )?;
        registry.register(Box::new(reads.clone()))?;
        let recoveries = IntCounterVec::new(
            Opts::new(
                "ws_recoveries_total",
                "subscribe with since: recovered from this replica's memory, recovered \
                 from the store, or not recovered (too far back, another epoch, too large)",
            ),
            &["outcome"],
        )?;
        registry.register(Box::new(recoveries.clone()))?;
        let history = crate::history::HistoryMetrics {
            reads: ["recovery", "gap", "history"].map(|reason| reads.with_label_values(&[reason])),
            recoveries: ["memory", "store", "not_recovered"]
                .map(|outcome| recoveries.with_label_values(&[outcome])),
            errors: counter(
                "ws_history_errors_total",
                "History store calls that failed (unreachable, timed out, refused)",
            )?,
        };
        let policy_drops = counter(
            "ws_delivery_policy_drops_total",
            "Queued messages a channel's delivery policy (drop_oldest, latest) dropped \
             for a client that fell behind, instead of disconnecting it",
        )?;
        let proxy = crate::proxy::ProxyMetrics::register(&registry)?;
        let webhook = crate::webhook::WebhookMetrics {
            sent: counter(
                "ws_webhook_sent_total",
                "Lifecycle events the webhook receiver accepted (2xx)",
            )?,
            retries: counter(
                "ws_webhook_retries_total",
                "Webhook tries that failed and were retried with backoff",
            )?,
            dropped_full: webhook_dropped.with_label_values(&["queue_full"]),
            dropped_refused: webhook_dropped.with_label_values(&["refused"]),
            queued: webhook_queued,
        };

        Ok(Self {
            registry,
            connections_active,
            connections_total,
            messages_received,
            messages_sent,
            rate_limited,
            slow_consumer_drops,
            replies_cut,
            flood_closes,
            auth_failures,
            pubsub: PubsubMetrics {
                published,
                received,
                errors,
                connected,
                shards,
                shards_connected,
                latency: latency_vec.with_label_values(&[adapter]),
                node_id_conflicts,
                dropped: [
                    dropped_vec.with_label_values(&[adapter, "published"]),
                    dropped_vec.with_label_values(&[adapter, "received"]),
                ],
            },
            presence_errors,
            lifecycle_events,
            webhook,
            history,
            proxy,
            policy_drops,
            methods: method_series,
        })
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding into a Vec only fails on a malformed family, which we never build.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Observer for Metrics {
    fn record(&self, record: CallRecord) {
        if let Ok(index) = self
            .methods
            .binary_search_by_key(&record.method, |(method, _)| method)
        {
            let series = &self.methods[index].1;
            match record.outcome {
                chorus_rpc::CallOutcome::Ok => series.ok.inc(),
                chorus_rpc::CallOutcome::Error(_) => series.error.inc(),
            }
            series.duration.observe(record.elapsed.as_secs_f64());
        }
    }

    fn rate_limited(&self, scope: Scope) {
        Metrics::rate_limited(self, scope);
    }

    fn reply_cut(&self) {
        self.replies_cut.inc();
    }
}

impl Metrics {
    /// An upgrade refused for its token; `reason` is one of `AuthError::REASONS`.
    pub fn auth_failed(&self, reason: &str) {
        if let Some(index) = chorus_gate::AuthError::REASONS
            .iter()
            .position(|known| *known == reason)
        {
            self.auth_failures[index].inc();
        }
    }

    pub fn rate_limited(&self, scope: Scope) {
        if let Some(index) = Scope::ALL.iter().position(|s| *s == scope) {
            self.rate_limited[index].inc();
        }
    }
}

impl HubEvents for Metrics {
    fn gap(&self, channel: &str, dropped: &chorus_hub::Dropped) -> Option<chorus_hub::Frame> {
        self.policy_drops.inc_by(dropped.messages);
        let params = if dropped.from_offset > 0 {
            serde_json::json!({"channel": channel, "from_offset": dropped.from_offset, "to_offset": dropped.to_offset})
        } else {
            serde_json::json!({"channel": channel, "dropped": dropped.messages})
        };
        Some(chorus_rpc::notification::value("sys.gap", &params))
    }

    fn slow_consumer(&self, client: ClientId) {
        self.slow_consumer_drops.inc();
        tracing::debug!(
            client,
            "send buffer over its budget: disconnecting a slow consumer"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_contract_series_exists_from_start_up() {
        let metrics = Metrics::new("local", &["ping"]).expect("metrics register");
        let text = metrics.render();
        for series in [
            "ws_connections_active",
            "ws_connections_total",
            "ws_messages_received_total",
            "ws_messages_sent_total",
            "ws_rpc_requests_total{method=\"ping\",outcome=\"ok\"}",
            "ws_rpc_duration_seconds_bucket{method=\"ping\"",
            "ws_rate_limited_total{scope=\"connection\"}",
            "ws_rate_limited_total{scope=\"publish\"}",
            "ws_rate_limited_total{scope=\"replica\"}",
            "ws_rate_limited_total{scope=\"ip\"}",
            "ws_rate_limited_total{scope=\"user\"}",
            "ws_auth_failures_total{reason=\"missing\"}",
            "ws_auth_failures_total{reason=\"expired\"}",
            "ws_slow_consumer_drops_total",
            "ws_replies_cut_total",
            "ws_flood_closes_total",
            "ws_node_id_conflicts_total",
            "ws_presence_errors_total",
            "ws_lifecycle_events_total{event=\"user_online\"}",
            "ws_lifecycle_events_total{event=\"device_offline\"}",
            "ws_webhook_sent_total",
            "ws_webhook_retries_total",
            "ws_webhook_dropped_total{reason=\"queue_full\"}",
            "ws_webhook_dropped_total{reason=\"refused\"}",
            "ws_webhook_queue",
            "ws_proxy_requests_total{outcome=\"circuit_open\",proxy=\"rpc\"}",
            "ws_proxy_duration_seconds_count{proxy=\"connect\"}",
            "ws_history_reads_total{reason=\"recovery\"}",
            "ws_recoveries_total{outcome=\"memory\"}",
            "ws_history_errors_total",
            "ws_delivery_policy_drops_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_cpu_seconds_total",
            "ws_pubsub_published_total{adapter=\"local\"}",
            "ws_pubsub_received_total{adapter=\"local\"}",
            "ws_pubsub_errors_total{adapter=\"local\"}",
            "ws_pubsub_connected{adapter=\"local\"}",
            "ws_pubsub_shards{adapter=\"local\"}",
            "ws_pubsub_shards_connected{adapter=\"local\"}",
            "ws_pubsub_latency_seconds_bucket{adapter=\"local\"",
            "ws_pubsub_dropped_total{adapter=\"local\",direction=\"published\"}",
            "ws_pubsub_dropped_total{adapter=\"local\",direction=\"received\"}",
        ] {
            assert!(text.contains(series), "missing {series}");
        }
    }
}
