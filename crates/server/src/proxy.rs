//! The backend proxy (section 13): the application's own HTTP backend decides who
//! connects, answers methods Chorus does not know, and decides subscriptions and
//! client publications. One pooled HTTP client; per proxy a timeout, a bound on
//! requests in flight (and per connection), a circuit breaker, and metrics. Only the
//! connect call, which changes nothing, is retried.

use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chorus_gate::{BackendClaims, Identity};
use chorus_rpc::{Backend, Caller, ErrorCode, Later, NodeFuture, Reply, RpcError, Slot, Verdict};
use hyper::header::{HeaderMap, HeaderName, HeaderValue};
use hyper::{StatusCode, Uri};
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
};
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use crate::config::ProxyConfig;
use crate::http_client::HttpClient;
use crate::webhook::signature;

/// Proxy requests one connection may have in flight (section 13).
pub const PER_CONNECTION: usize = 16;
/// Tries of the connect call: it changes nothing, so it may be repeated.
const CONNECT_TRIES: u32 = 3;
/// First pause between connect tries; doubled after each.
const CONNECT_BACKOFF: Duration = Duration::from_millis(25);
/// Names which proxy sent a request.
const PROXY_HEADER: &str = "x-chorus-proxy";

/// The four proxies, in the order of their metric series.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Connect,
    Rpc,
    Subscribe,
    Publish,
}

impl Kind {
    const ALL: [Self; 4] = [Self::Connect, Self::Rpc, Self::Subscribe, Self::Publish];

    pub fn name(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Rpc => "rpc",
            Self::Subscribe => "subscribe",
            Self::Publish => "publish",
        }
    }
}

/// How one proxy request ended, for `ws_proxy_requests_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Ok,
    Refused,
    Error,
    Timeout,
    Busy,
    CircuitOpen,
}

impl Outcome {
    const ALL: [Self; 6] = [
        Self::Ok,
        Self::Refused,
        Self::Error,
        Self::Timeout,
        Self::Busy,
        Self::CircuitOpen,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Refused => "refused",
            Self::Error => "error",
            Self::Timeout => "timeout",
            Self::Busy => "busy",
            Self::CircuitOpen => "circuit_open",
        }
    }
}

/// `ws_proxy_requests_total{proxy,outcome}` and `ws_proxy_duration_seconds{proxy}`,
/// every series present from start-up.
#[derive(Clone)]
pub struct ProxyMetrics {
    /// By proxy, then by outcome, in the order of `Kind::ALL` and `Outcome::ALL`.
    requests: Vec<Vec<IntCounter>>,
    durations: Vec<Histogram>,
}

impl ProxyMetrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new(
                "ws_proxy_requests_total",
                "Backend proxy requests by proxy and outcome",
            ),
            &["proxy", "outcome"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        let durations = HistogramVec::new(
            HistogramOpts::new(
                "ws_proxy_duration_seconds",
                "Time a backend proxy request took, retries included",
            )
            .buckets(vec![
                0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ]),
            &["proxy"],
        )?;
        registry.register(Box::new(durations.clone()))?;
        Ok(Self {
            requests: Kind::ALL
                .iter()
                .map(|kind| {
                    Outcome::ALL
                        .iter()
                        .map(|outcome| requests.with_label_values(&[kind.name(), outcome.label()]))
                        .collect()
                })
                .collect(),
            durations: Kind::ALL
                .iter()
                .map(|kind| durations.with_label_values(&[kind.name()]))
                .collect(),
        })
    }

    fn record(&self, kind: Kind, outcome: Outcome) {
        if let Some(counter) = self
            .requests
            .get(kind as usize)
            .and_then(|by_outcome| by_outcome.get(outcome as usize))
        {
            counter.inc();
        }
    }

    fn observe(&self, kind: Kind, elapsed: Duration) {
        if let Some(histogram) = self.durations.get(kind as usize) {
            histogram.observe(elapsed.as_secs_f64());
        }
    }
}

/// Answers at once while a backend keeps failing: `threshold` failures in a row open
/// it for `cooldown`; then one request may try, and its success closes it.
struct Breaker {
    threshold: u32,
    cooldown: Duration,
    state: Mutex<BreakerState>,
}

#[derive(Default)]
struct BreakerState {
    failures: u32,
    open_until: Option<Instant>,
    /// A request is trying the backend after the cooldown.
    probing: bool,
}

impl Breaker {
    fn admit(&self) -> bool {
        if self.threshold == 0 {
            return true;
        }
        let mut state = lock(&self.state);
        match state.open_until {
            None => true,
            Some(until) if Instant::now() < until => false,
            Some(_) if state.probing => false,
            Some(_) => {
                state.probing = true;
                true
            }
        }
    }

    /// Returns the new state when it changed: true for open, false for closed.
    fn record(&self, ok: bool) -> Option<bool> {
        if self.threshold == 0 {
            return None;
        }
        let mut state = lock(&self.state);
        if ok {
            let was_open = state.open_until.is_some();
            *state = BreakerState::default();
            return was_open.then_some(false);
        }
        state.failures = state.failures.saturating_add(1);
        if state.failures >= self.threshold || state.probing {
            let was_open = state.open_until.is_some();
            state.open_until = Some(Instant::now() + self.cooldown);
            state.probing = false;
            return (!was_open).then_some(true);
        }
        None
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One configured proxy.
struct Endpoint {
    kind: Kind,
    uri: Uri,
    inflight: Arc<AtomicUsize>,
    breaker: Breaker,
}

/// Why a proxy request got no usable answer.
#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("busy")]
    Busy,
    #[error("circuit open: the backend keeps failing")]
    CircuitOpen,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Down, a status other than 200, or not the expected JSON.
    #[error("{0}")]
    Error(String),
}

impl Failure {
    fn outcome(&self) -> Outcome {
        match self {
            Self::Busy => Outcome::Busy,
            Self::CircuitOpen => Outcome::CircuitOpen,
            Self::Timeout(_) => Outcome::Timeout,
            Self::Error(_) => Outcome::Error,
        }
    }

    /// The JSON-RPC error after the upgrade: `-32053`.
    fn rpc_error(&self, kind: Kind) -> RpcError {
        match self {
            Self::Busy => RpcError::proxy_busy(kind.name()),
            other => RpcError::proxy_failed(kind.name(), other),
        }
    }
}

/// What the connect proxy decided.
#[derive(Debug)]
pub enum Admission {
    Allowed(Identity),
    /// The backend refused: answer this status with `{"error": message}`.
    Refused(StatusCode, String),
    /// No usable answer: `503`.
    Failed(String),
}

/// What the connect proxy is told about a new connection.
pub struct ConnectRequest<'a> {
    pub client_id: &'a str,
    pub remote_addr: &'a str,
    pub token: Option<&'a str>,
    pub query: Vec<(String, String)>,
    /// The headers named in `WS_PROXY_HEADERS`, lower-case.
    pub headers: &'a [(String, String)],
}

struct Inner {
    client: HttpClient,
    endpoints: [Option<Endpoint>; 4],
    timeout: Duration,
    max_inflight: usize,
    secret: Option<String>,
    max_body: usize,
    node_id: String,
    metrics: ProxyMetrics,
}

/// The configured proxies; cheap to clone.
#[derive(Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy").finish_non_exhaustive()
    }
}

impl Proxy {
    /// `max_body` bounds every answer's size (a relayed result must fit a reply).
    pub fn new(
        config: &ProxyConfig,
        client: HttpClient,
        node_id: String,
        max_body: usize,
        metrics: ProxyMetrics,
    ) -> Self {
        let endpoint = |kind: Kind, uri: &Option<Uri>| {
            uri.clone().map(|uri| Endpoint {
                kind,
                uri,
                inflight: Arc::default(),
                breaker: Breaker {
                    threshold: config.breaker_failures,
                    cooldown: config.breaker_cooldown,
                    state: Mutex::default(),
                },
            })
        };
        Self {
            inner: Arc::new(Inner {
                client,
                endpoints: [
                    endpoint(Kind::Connect, &config.connect_url),
                    endpoint(Kind::Rpc, &config.rpc_url),
                    endpoint(Kind::Subscribe, &config.subscribe_url),
                    endpoint(Kind::Publish, &config.publish_url),
                ],
                timeout: config.timeout,
                max_inflight: config.max_inflight,
                secret: config.secret.clone(),
                max_body,
                node_id,
                metrics,
            }),
        }
    }

    fn endpoint(&self, kind: Kind) -> Option<&Endpoint> {
        self.inner.endpoints[kind as usize].as_ref()
    }

    /// Whether the connect proxy decides identity.
    pub fn decides_connect(&self) -> bool {
        self.endpoint(Kind::Connect).is_some()
    }

    /// Asks the connect proxy who the connection is.
    pub async fn connect(&self, request: ConnectRequest<'_>) -> Admission {
        let body = serde_json::json!({
            "client_id": request.client_id,
            "remote_addr": request.remote_addr,
            "token": request.token,
            "query": request.query.into_iter().map(|(name, value)| (name, value.into())).collect::<serde_json::Map<String, serde_json::Value>>(),
            "headers": request.headers.iter().cloned().map(|(name, value)| (name, value.into())).collect::<serde_json::Map<String, serde_json::Value>>(),
        });
        let mut body = body;
        if request.token.is_none()
            && let Some(object) = body.as_object_mut()
        {
            object.remove("token");
        }
        let inner = Arc::clone(&self.inner);
        let answer = exchange(
            inner,
            Kind::Connect,
            request.headers,
            Bytes::from(body.to_string()),
        )
        .await;
        let metrics = &self.inner.metrics;
        let answer = match answer {
            Ok(answer) => answer,
            Err(failure) => return Admission::Failed(failure.to_string()),
        };
        let (outcome, admission) = read_admission(&answer);
        metrics.record(Kind::Connect, outcome);
        admission
    }

    fn caller_json(&self, caller: &Caller) -> serde_json::Value {
        let identity = caller.identity();
        serde_json::json!({
            "client_id": caller.client().map(|client| format!("{}/{}", self.inner.node_id, client.id())),
            "user": identity.user.as_deref(),
            "device": identity.device.as_deref(),
        })
    }

    /// A decision of the subscribe or publish proxy, made when first polled.
    fn decide(&self, kind: Kind, caller: &Arc<Caller>, body: String) -> NodeFuture<Verdict> {
        let Some(slot) = caller.proxy_slot(PER_CONNECTION) else {
            self.inner.metrics.record(kind, Outcome::Busy);
            return Box::pin(std::future::ready(Err(Failure::Busy.rpc_error(kind))));
        };
        let inner = Arc::clone(&self.inner);
        let headers = caller.forwarded().to_vec();
        Box::pin(async move {
            let answer = exchange(Arc::clone(&inner), kind, &headers, Bytes::from(body)).await;
            drop(slot);
            let answer = answer.map_err(|failure| failure.rpc_error(kind))?;
            let (outcome, verdict) = read_decision(&answer);
            inner.metrics.record(kind, outcome);
            verdict.map_err(|why| RpcError::proxy_failed(kind.name(), why))
        })
    }
}

impl Backend for Proxy {
    fn rpc(
        &self,
        caller: &Arc<Caller>,
        method: &str,
        params: Option<&RawValue>,
        id: Option<&RawValue>,
    ) -> Option<Later> {
        self.endpoint(Kind::Rpc)?;
        caller.client()?;
        let kind = Kind::Rpc;
        let Some(slot) = caller.proxy_slot(PER_CONNECTION) else {
            self.inner.metrics.record(kind, Outcome::Busy);
            return Some(Box::pin(std::future::ready(Err(
                Failure::Busy.rpc_error(kind)
            ))));
        };
        let mut body = String::with_capacity(
            96 + method.len() + params.map_or(0, |params| params.get().len()),
        );
        body.push_str(r#"{"jsonrpc":"2.0","method":"#);
        body.push_str(&serde_json::Value::from(method).to_string());
        if let Some(params) = params {
            body.push_str(r#","params":"#);
            body.push_str(params.get());
        }
        if let Some(id) = id {
            body.push_str(r#","id":"#);
            body.push_str(id.get());
        }
        body.push_str(r#","caller":"#);
        body.push_str(&self.caller_json(caller).to_string());
        body.push('}');
        let inner = Arc::clone(&self.inner);
        let headers = caller.forwarded().to_vec();
        Some(Box::pin(async move {
            let answer = exchange(Arc::clone(&inner), kind, &headers, Bytes::from(body)).await;
            drop(slot);
            let answer = answer.map_err(|failure| failure.rpc_error(kind))?;
            let (outcome, reply) = read_response(&answer);
            inner.metrics.record(kind, outcome);
            reply
        }))
    }

    fn decides_subscribe(&self) -> bool {
        self.endpoint(Kind::Subscribe).is_some()
    }

    fn subscribe(
        &self,
        caller: &Arc<Caller>,
        channel: &str,
        params: Option<&RawValue>,
    ) -> NodeFuture<Verdict> {
        let mut body = String::new();
        body.push_str(r#"{"caller":"#);
        body.push_str(&self.caller_json(caller).to_string());
        body.push_str(r#","channel":"#);
        body.push_str(&serde_json::Value::from(channel).to_string());
        body.push_str(r#","params":"#);
        body.push_str(params.map_or("null", RawValue::get));
        body.push('}');
        self.decide(Kind::Subscribe, caller, body)
    }

    fn decides_publish(&self) -> bool {
        self.endpoint(Kind::Publish).is_some()
    }

    fn publish(&self, caller: &Arc<Caller>, channel: &str, data: &RawValue) -> NodeFuture<Verdict> {
        let mut body = String::with_capacity(128 + data.get().len());
        body.push_str(r#"{"caller":"#);
        body.push_str(&self.caller_json(caller).to_string());
        body.push_str(r#","channel":"#);
        body.push_str(&serde_json::Value::from(channel).to_string());
        body.push_str(r#","data":"#);
        body.push_str(data.get());
        body.push('}');
        self.decide(Kind::Publish, caller, body)
    }
}

/// One proxy request: admitted by the breaker and the proxy's bound, POSTed (the
/// connect call up to [`CONNECT_TRIES`] times) within the timeout; the body of a 200
/// answer. Failures are counted here, answers by the caller once read.
async fn exchange(
    inner: Arc<Inner>,
    kind: Kind,
    forwarded: &[(String, String)],
    body: Bytes,
) -> Result<Bytes, Failure> {
    let started = Instant::now();
    let result = attempt(&inner, kind, forwarded, body).await;
    // Only requests that went to the backend are timed.
    if !matches!(result, Err(Failure::Busy | Failure::CircuitOpen)) {
        inner.metrics.observe(kind, started.elapsed());
    }
    if let Err(failure) = &result {
        inner.metrics.record(kind, failure.outcome());
        tracing::debug!(proxy = kind.name(), why = %failure, "proxy request failed");
    }
    result
}

async fn attempt(
    inner: &Inner,
    kind: Kind,
    forwarded: &[(String, String)],
    body: Bytes,
) -> Result<Bytes, Failure> {
    let Some(endpoint) = inner.endpoints[kind as usize].as_ref() else {
        return Err(Failure::Error("not configured".to_owned()));
    };
    let Some(_slot) = Slot::take(&endpoint.inflight, inner.max_inflight) else {
        return Err(Failure::Busy);
    };
    if !endpoint.breaker.admit() {
        return Err(Failure::CircuitOpen);
    }
    let mut headers = HeaderMap::with_capacity(forwarded.len() + 2);
    for (name, value) in forwarded {
        // Names were checked at start-up, values at the upgrade: nothing to drop here.
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            headers.append(name, value);
        }
    }
    headers.insert(
        HeaderName::from_static(PROXY_HEADER),
        HeaderValue::from_static(kind.name()),
    );
    if let Some(secret) = &inner.secret
        && let Ok(signed) = HeaderValue::from_str(&signature(secret.as_bytes(), &body))
    {
        headers.insert(
            HeaderName::from_static(crate::webhook::SIGNATURE_HEADER),
            signed,
        );
    }
    let deadline = tokio::time::Instant::now() + inner.timeout;
    let tries = if kind == Kind::Connect {
        CONNECT_TRIES
    } else {
        1
    };
    let mut backoff = CONNECT_BACKOFF;
    let mut tried = 0;
    let result = loop {
        tried += 1;
        let post = inner
            .client
            .post(&endpoint.uri, headers.clone(), body.clone(), inner.max_body);
        let failure = match tokio::time::timeout_at(deadline, post).await {
            Err(_) => break Err(Failure::Timeout(inner.timeout)),
            Ok(Ok((StatusCode::OK, answer))) => break Ok(answer),
            Ok(Ok((status, _))) => Failure::Error(format!("the backend answered {status}")),
            Ok(Err(why)) => Failure::Error(why),
        };
        if tried >= tries || tokio::time::Instant::now() + backoff >= deadline {
            break Err(failure);
        }
        tokio::time::sleep(backoff).await;
        backoff *= 2;
    };
    match endpoint.breaker.record(result.is_ok()) {
        Some(true) => tracing::warn!(
            proxy = endpoint.kind.name(),
            "backend keeps failing: circuit breaker open, answering at once"
        ),
        Some(false) => tracing::info!(
            proxy = endpoint.kind.name(),
            "backend answers again: circuit breaker closed"
        ),
        None => {}
    }
    result
}

/// `null` is a result; only a missing member is none.
fn present<'de, D: Deserializer<'de>>(de: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(de).map(Some)
}

/// The rpc proxy's answer: a JSON-RPC response whose result or error is relayed.
fn read_response(answer: &[u8]) -> (Outcome, Result<Reply<'static>, RpcError>) {
    #[derive(Deserialize)]
    struct Response<'a> {
        #[serde(borrow, default, deserialize_with = "present")]
        result: Option<&'a RawValue>,
        error: Option<ErrorObject>,
    }
    #[derive(Deserialize)]
    struct ErrorObject {
        code: i32,
        message: String,
        data: Option<serde_json::Value>,
    }
    let bad = |why: &str| {
        (
            Outcome::Error,
            Err(RpcError::proxy_failed(Kind::Rpc.name(), why)),
        )
    };
    match serde_json::from_slice::<Response<'_>>(answer) {
        Ok(Response {
            error: Some(error), ..
        }) => (
            Outcome::Ok,
            Err(RpcError {
                code: ErrorCode::Backend(error.code),
                message: error.message,
                data: error.data,
            }),
        ),
        Ok(Response {
            result: Some(result),
            ..
        }) => (Outcome::Ok, Ok(Reply::Text(result.get().to_owned()))),
        Ok(_) => bad("the backend's answer has neither result nor error"),
        Err(_) => bad("the backend's answer is not a JSON-RPC response"),
    }
}

/// The subscribe or publish proxy's answer.
fn read_decision(answer: &[u8]) -> (Outcome, Result<Verdict, String>) {
    #[derive(Deserialize)]
    struct Decision {
        allow: bool,
        data: Option<Box<RawValue>>,
        reason: Option<String>,
    }
    match serde_json::from_slice::<Decision>(answer) {
        Ok(Decision {
            allow: true, data, ..
        }) => (Outcome::Ok, Ok(Verdict::Allow(data))),
        Ok(Decision { reason, .. }) => (
            Outcome::Refused,
            Ok(Verdict::Refuse(
                reason.unwrap_or_else(|| "refused by the backend".to_owned()),
            )),
        ),
        Err(_) => (
            Outcome::Error,
            Err("the backend's answer is not {\"allow\": bool, ...}".to_owned()),
        ),
    }
}

/// The connect proxy's answer: claims, or `{"error": {"code": 401|403, "message"}}`.
fn read_admission(answer: &[u8]) -> (Outcome, Admission) {
    #[derive(Deserialize)]
    struct MaybeRefused {
        error: Option<Refusal>,
    }
    #[derive(Deserialize)]
    struct Refusal {
        code: Option<u16>,
        message: Option<String>,
    }
    match serde_json::from_slice::<MaybeRefused>(answer) {
        Ok(MaybeRefused {
            error: Some(refusal),
        }) => {
            let status = match refusal.code {
                Some(401) => StatusCode::UNAUTHORIZED,
                _ => StatusCode::FORBIDDEN,
            };
            let message = refusal
                .message
                .unwrap_or_else(|| "refused by the backend".to_owned());
            return (Outcome::Refused, Admission::Refused(status, message));
        }
        Ok(_) => {}
        Err(_) => {
            return (
                Outcome::Error,
                Admission::Failed("the connect proxy's answer is not a JSON object".to_owned()),
            );
        }
    }
    match serde_json::from_slice::<BackendClaims>(answer).map(BackendClaims::identity) {
        Ok(Ok(identity)) => (Outcome::Ok, Admission::Allowed(identity)),
        Ok(Err(why)) => (
            Outcome::Error,
            Admission::Failed(format!("the connect proxy's claims: {why}")),
        ),
        Err(_) => (
            Outcome::Error,
            Admission::Failed("the connect proxy's claims are not the expected JSON".to_owned()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_opens_after_failures_and_closes_on_a_probe() {
        let breaker = Breaker {
            threshold: 2,
            cooldown: Duration::from_millis(10),
            state: Mutex::default(),
        };
        assert!(breaker.admit());
        assert_eq!(breaker.record(false), None);
        assert_eq!(breaker.record(false), Some(true), "opens");
        assert!(!breaker.admit(), "answers at once while open");
        std::thread::sleep(Duration::from_millis(20));
        assert!(breaker.admit(), "one probe after the cooldown");
        assert!(!breaker.admit(), "only one");
        assert_eq!(breaker.record(false), None, "a failed probe reopens");
        assert!(!breaker.admit());
        std::thread::sleep(Duration::from_millis(20));
        assert!(breaker.admit());
        assert_eq!(breaker.record(true), Some(false), "closes");
        assert!(breaker.admit() && breaker.admit());
    }

    #[test]
    fn answers_are_read_strictly() {
        let (outcome, reply) = read_response(br#"{"jsonrpc":"2.0","result":null,"id":1}"#);
        assert_eq!(outcome, Outcome::Ok);
        assert!(matches!(reply, Ok(Reply::Text(text)) if text == "null"));
        let (_, reply) = read_response(br#"{"error":{"code":4000,"message":"no","data":[1]}}"#);
        let error = reply.expect_err("relayed");
        assert_eq!(error.code.code(), 4000);
        assert_eq!(error.data, Some(serde_json::json!([1])));
        assert_eq!(read_response(b"{}").0, Outcome::Error);
        assert_eq!(read_response(b"<html>").0, Outcome::Error);
        assert!(matches!(
            read_decision(br#"{"allow":false}"#),
            (Outcome::Refused, Ok(Verdict::Refuse(_)))
        ));
        assert_eq!(read_decision(br#"{"allow":"yes"}"#).0, Outcome::Error);
        assert!(matches!(
            read_admission(br#"{"error":{"code":401,"message":"who?"}}"#),
            (
                Outcome::Refused,
                Admission::Refused(StatusCode::UNAUTHORIZED, _)
            )
        ));
        assert!(matches!(
            read_admission(br#"{"user":"ann","channels":["bad pattern*x"]}"#),
            (Outcome::Error, Admission::Failed(_))
        ));
        assert!(matches!(
            read_admission(br#"{}"#),
            (Outcome::Ok, Admission::Allowed(identity)) if identity.user.is_none()
        ));
    }
}
