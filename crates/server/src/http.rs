//! HTTP routes on the one port: the WebSocket upgrade (and the optional echo
//! endpoint) with the checks before it (origin, address, token, user), Server-Sent
//! Events (`/events`, in `sse`), `/health`, `/ready`, `/metrics`, the browser library
//! (`/chorus.js`) and the demo page (`/`). Everything else is 404.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

use crate::app::{App, ConnectionSlot};
use crate::connection::{self, Mode};
use crate::lifecycle::Reason;
use crate::proxy::{Admission, ConnectRequest};
use crate::session::Session;

/// Longest wait, before the upgrade is answered, for the cluster to learn of a new
/// connection.
const CLUSTER_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

pub(crate) type Body = Full<Bytes>;
/// What a route answers with: a whole body, or an event stream.
pub(crate) type RouteBody = Either<Body, crate::sse::EventStream>;

/// The browser library, served at `/chorus.js`.
const LIBRARY: &str = include_str!("../web/chorus.js");
/// The demo page, served at `/` unless `WS_DEMO=false`.
const DEMO: &str = include_str!("../web/index.html");

pub async fn route(
    app: Arc<App>,
    peer: SocketAddr,
    request: Request<Incoming>,
    connection: Arc<crate::sse::Abort>,
) -> Result<Response<RouteBody>, Infallible> {
    let path = request.uri().path();
    let transport = &app.config.transport;
    if path == "/events" {
        return Ok(crate::sse::handle(app, peer, request, connection).await);
    }
    let response = if path == transport.ws_path {
        upgrade(app, peer, request, Mode::Rpc).await
    } else if transport.echo_path.as_deref() == Some(path) {
        upgrade(app, peer, request, Mode::Echo).await
    } else if path == "/api" && app.config.users.api_key.is_some() {
        crate::api::handle(app, request).await
    } else {
        match (request.method(), path) {
            (&Method::GET | &Method::HEAD, "/health") => health(&app),
            (&Method::GET | &Method::HEAD, "/ready") => ready(&app),
            (&Method::GET | &Method::HEAD, "/metrics") => metrics(&app),
            (&Method::GET | &Method::HEAD, "/chorus.js") => {
                asset(LIBRARY, "text/javascript; charset=utf-8")
            }
            (&Method::GET | &Method::HEAD, "/") if transport.demo => {
                asset(DEMO, "text/html; charset=utf-8")
            }
            (_, "/health" | "/ready" | "/metrics" | "/chorus.js") => {
                text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    };
    Ok(response.map(Either::Left))
}

/// A file embedded in the binary. Revalidated on every load (`no-cache`), so a new
/// release reaches browsers at once.
fn asset(body: &'static str, content_type: &'static str) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    response
}

pub(crate) fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

pub(crate) fn json(status: StatusCode, body: &serde_json::Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn health(app: &App) -> Response<Body> {
    let backbone = app.node.backbone_connected();
    let connected = backbone.unwrap_or(true);
    let twin = app.node.twin_node_id_seen();
    let presence_problem = app.node.presence().store().problem();
    let history_store = app.node.history().store();
    let history_problem = history_store.problem();
    let status = if connected && !twin && presence_problem.is_none() && history_problem.is_none() {
        "ok"
    } else {
        "degraded"
    };
    json(
        StatusCode::OK,
        &serde_json::json!({
            "status": status,
            "node_id": app.node.node_id(),
            "node_id_conflict": twin,
            "connections": app.connections(),
            "pubsub": {
                "adapter": app.config.cluster.backbone.adapter(),
                "enabled": backbone.is_some(),
                "connected": connected,
                // Per server, in WS_REDIS_URL order: [true] with one server.
                "shards": app.node.backbone_shards().unwrap_or_default(),
            },
            "presence": {"store": app.node.presence().store().name(), "problem": presence_problem},
            "history": {"store": history_store.name(), "problem": history_problem},
            "uptime_s": app.started.elapsed().as_secs(),
        }),
    )
}

/// A refusal with a JSON body `{"error": reason}`.
pub(crate) fn refusal(status: StatusCode, reason: &str) -> Response<Body> {
    json(status, &serde_json::json!({ "error": reason }))
}

fn ready(app: &App) -> Response<Body> {
    if app.is_draining() {
        text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else if app
        .node
        .backbone_shards()
        .is_some_and(|shards| !shards.contains(&true))
    {
        // With several shards, one that is down only stops its own channels: the
        // replica still serves the others, and taking every replica out of rotation
        // would turn that partial outage into a full one. /health says degraded.
        text(
            StatusCode::SERVICE_UNAVAILABLE,
            "pubsub backbone disconnected\n",
        )
    } else {
        text(StatusCode::OK, "ready\n")
    }
}

fn metrics(app: &App) -> Response<Body> {
    app.metrics.pubsub.observe(&app.node.backbone_snapshot());
    let mut response = Response::new(Full::new(Bytes::from(app.metrics.render())));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    response
}

/// Whether a comma-separated header holds `token` (case-insensitive).
fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|part| part.trim().eq_ignore_ascii_case(token))
}

/// The token a request carries: `Authorization: Bearer`, else `?token=`. Neither the
/// header nor the query string is ever logged.
fn request_token(request: &Request<Incoming>) -> Option<String> {
    let from_header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| chorus_gate::bearer_token(value.as_bytes()))
        .map(str::to_owned);
    from_header.or_else(|| request.uri().query().and_then(chorus_gate::query_token))
}

/// The upgrade request's headers named in `WS_PROXY_HEADERS`, for every proxy request
/// of the connection (values that are not text are left out).
fn forwarded_headers(app: &App, headers: &HeaderMap) -> Vec<(String, String)> {
    let names = &app.config.proxy.headers;
    if names.is_empty() || app.proxy.is_none() {
        return Vec::new();
    }
    names
        .iter()
        .flat_map(|name| {
            headers
                .get_all(name.as_str())
                .iter()
                .filter_map(|value| value.to_str().ok())
                .map(|value| (name.clone(), value.to_owned()))
        })
        .collect()
}

/// A connection let in: its id, who it is, from where, its reserved slot, and the
/// headers every proxy request of the connection carries.
pub(crate) struct Admitted {
    pub id: chorus_hub::ClientId,
    pub identity: chorus_gate::Identity,
    pub client_ip: std::net::IpAddr,
    pub slot: ConnectionSlot,
    pub forwarded: Vec<(String, String)>,
}

/// The checks every transport makes before it serves a client: origin, drain,
/// address limits, identity (the token, or the connect proxy), user limits,
/// connection cap. A refusal is the response.
pub(crate) async fn admit(
    app: &Arc<App>,
    peer: SocketAddr,
    request: &Request<Incoming>,
) -> Result<Admitted, Response<Body>> {
    let headers = request.headers();
    let origin = headers
        .get(header::ORIGIN)
        .and_then(|origin| origin.to_str().ok());
    if !app.config.transport.allowed_origins.allows(origin) {
        return Err(text(StatusCode::FORBIDDEN, "origin not allowed\n"));
    }
    if app.is_draining() {
        return Err(text(
            StatusCode::SERVICE_UNAVAILABLE,
            "server is shutting down\n",
        ));
    }
    let forwarded = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|value| value.to_str().ok());
    let client_ip = app
        .config
        .limits
        .trusted_proxies
        .client_ip(peer.ip(), forwarded);
    let ip_slot = match app.ip_limits.admit(client_ip) {
        Ok(slot) => slot,
        Err(refused) => {
            if let Some(scope) = refused.scope() {
                app.metrics.rate_limited(scope);
            }
            let mut response = refusal(StatusCode::TOO_MANY_REQUESTS, &refused.to_string());
            if let chorus_gate::Refusal::RateLimited { retry_after, .. } = refused {
                let seconds = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
            }
            return Err(response);
        }
    };
    let gate = &app.services.gate;
    let id = app.node.hub().reserve_id();
    let forwarded = forwarded_headers(app, request.headers());
    let token = request_token(request);
    let identity = match &app.proxy {
        Some(proxy) if proxy.decides_connect() => {
            let query = request
                .uri()
                .query()
                .map(chorus_gate::query_params)
                .unwrap_or_default();
            let admission = proxy
                .connect(ConnectRequest {
                    client_id: &app.node.client_id(id),
                    remote_addr: &client_ip.to_string(),
                    token: token.as_deref(),
                    query,
                    headers: &forwarded,
                })
                .await;
            match admission {
                Admission::Allowed(identity) => identity,
                Admission::Refused(status, message) => return Err(refusal(status, &message)),
                Admission::Failed(why) => {
                    // Per upgrade, so not louder: the breaker warns when failures persist.
                    tracing::debug!(%why, "connect proxy failed: refused with 503");
                    return Err(refusal(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "connect proxy unavailable",
                    ));
                }
            }
        }
        _ => match gate.verifier().verify(token.as_deref()).await {
            Ok(identity) => identity,
            Err(error) => {
                app.metrics.auth_failed(error.reason());
                return Err(refusal(StatusCode::UNAUTHORIZED, error.reason()));
            }
        },
    };
    let user_slot = match gate.admit_user(identity.user.as_ref()) {
        Ok(slot) => slot,
        Err(refused) => {
            if let Some(scope) = refused.scope() {
                app.metrics.rate_limited(scope);
            }
            return Err(refusal(StatusCode::TOO_MANY_REQUESTS, &refused.to_string()));
        }
    };
    let Some(slot) = app.reserve_connection(ip_slot, user_slot) else {
        return Err(text(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many connections\n",
        ));
    };
    Ok(Admitted {
        id,
        identity,
        client_ip,
        slot,
        forwarded,
    })
}

/// Opens a session and waits, briefly, until the cluster can reach it (its user's
/// topic held, its presence recorded), so a `send` right after the open reaches it.
pub(crate) async fn open_session(
    app: &Arc<App>,
    id: chorus_hub::ClientId,
    identity: chorus_gate::Identity,
    client_ip: std::net::IpAddr,
    forwarded: Vec<(String, String)>,
) -> Session {
    let (session, known) = Session::open(
        Arc::clone(app),
        id,
        identity,
        client_ip.to_string(),
        forwarded,
    );
    if tokio::time::timeout(CLUSTER_WAIT, known).await.is_err() {
        tracing::debug!("the cluster did not confirm a new connection in time; serving it anyway");
    }
    session
}

/// RFC 6455 section 4.2: validates the handshake, applies the admission checks,
/// answers 101 and hands the socket to a connection task.
async fn upgrade(
    app: Arc<App>,
    peer: SocketAddr,
    mut request: Request<Incoming>,
    mode: Mode,
) -> Response<Body> {
    let headers = request.headers();
    if request.method() != Method::GET {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "WebSocket upgrade needs GET\n",
        );
    }
    if !header_has_token(headers, header::CONNECTION, "upgrade")
        || !header_has_token(headers, header::UPGRADE, "websocket")
    {
        return text(StatusCode::BAD_REQUEST, "expected a WebSocket upgrade\n");
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(HeaderValue::as_bytes)
        != Some(b"13")
    {
        let mut response = text(
            StatusCode::UPGRADE_REQUIRED,
            "unsupported WebSocket version\n",
        );
        response.headers_mut().insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return response;
    }
    let Some(key) = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .filter(|key| key.len() == 24)
    else {
        return text(
            StatusCode::BAD_REQUEST,
            "missing or malformed Sec-WebSocket-Key\n",
        );
    };
    let accept = derive_accept_key(key.as_bytes());
    let Admitted {
        id,
        identity,
        client_ip,
        slot,
        forwarded,
    } = match admit(&app, peer, &request).await {
        Ok(admitted) => admitted,
        Err(refused) => return refused,
    };
    let session = match mode {
        Mode::Rpc => Some(open_session(&app, id, identity, client_ip, forwarded).await),
        Mode::Echo => None,
    };

    let on_upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let ws = WebSocketStream::from_raw_socket(
                    crate::lazy_read::LazyRead::new(TokioIo::new(upgraded)),
                    Role::Server,
                    Some(app.ws_config),
                )
                .await;
                connection::run(ws, app, session, slot).await;
            }
            Err(err) => {
                tracing::debug!(%err, "upgrade failed");
                if let Some(session) = session {
                    session.close(Reason::Disconnected);
                }
            }
        }
    });

    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(accept) = HeaderValue::from_str(&accept) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
    }
    response
}
