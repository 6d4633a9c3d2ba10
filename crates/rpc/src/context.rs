//! What a handler sees: the services of this replica, and who is calling.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock, RwLockReadGuard};
use std::time::Duration;

use chorus_gate::{ConnectionLimits, Gate, Identity, RequestVerdict, Scope};
use chorus_hub::ClientHandle;
use serde_json::value::RawValue;

use crate::error::{ErrorCode, RpcError};
use crate::node::Node;
use crate::order::ChannelOrder;

/// The replica's services that handlers use, shared by every call.
pub struct Services {
    pub node: Arc<dyn Node>,
    pub gate: Arc<Gate>,
    pub observer: Arc<dyn Observer>,
    /// The application's backend, when a proxy is configured (section 13).
    pub backend: Option<Arc<dyn crate::Backend>>,
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services").finish_non_exhaustive()
    }
}

/// Who calls: a connected client (its hub handle, its share of the limits) or the
/// server API; who it is; and the order of its calls per channel.
#[derive(Debug)]
pub struct Caller {
    /// The connection; `None` for the server API.
    client: Option<ClientHandle>,
    /// The connection's budgets; `None` for the server API, which no budget limits.
    limits: Option<ConnectionLimits>,
    /// Most bytes the reply to one message may take.
    reply_budget: usize,
    /// Replaced by `auth.refresh`.
    identity: RwLock<Identity>,
    /// The identity's `exp` (seconds since the Unix epoch), 0 for never: read by the
    /// transport on every turn, so it is kept outside the lock.
    expires_at: AtomicU64,
    /// Created by the first call on a channel: most connections never make one.
    order: OnceLock<Arc<ChannelOrder>>,
    /// Headers of the upgrade request that every proxy request of the connection
    /// carries (lower-case name, value).
    forwarded: Vec<(String, String)>,
    /// Proxy requests of this connection in flight; created by the first one.
    proxied: OnceLock<Arc<std::sync::atomic::AtomicUsize>>,
}

impl Caller {
    /// The order of this connection's calls per channel, if any call made one.
    pub(crate) fn order_if_any(&self) -> Option<&Arc<ChannelOrder>> {
        self.order.get()
    }

    pub(crate) fn order(&self) -> &Arc<ChannelOrder> {
        self.order.get_or_init(Arc::default)
    }

    /// A connected client: replies are bounded by its send budget.
    pub fn new(client: ClientHandle, identity: Identity, limits: ConnectionLimits) -> Self {
        Self {
            reply_budget: client.budget(),
            client: Some(client),
            limits: Some(limits),
            expires_at: AtomicU64::new(identity.expires_at.unwrap_or(0)),
            identity: RwLock::new(identity),
            order: OnceLock::new(),
            forwarded: Vec::new(),
            proxied: OnceLock::new(),
        }
    }

    /// With the upgrade request's headers that proxy requests carry.
    #[must_use]
    pub fn with_forwarded(mut self, headers: Vec<(String, String)>) -> Self {
        self.forwarded = headers;
        self
    }

    /// The headers proxy requests of this connection carry.
    pub fn forwarded(&self) -> &[(String, String)] {
        &self.forwarded
    }

    /// One of the connection's `max` proxy requests in flight, if one is free.
    pub fn proxy_slot(&self, max: usize) -> Option<crate::Slot> {
        crate::Slot::take(self.proxied.get_or_init(Arc::default), max)
    }

    /// The server API (one per request): no grants, no budgets, replies up to
    /// `reply_budget` bytes.
    pub fn api(reply_budget: usize) -> Self {
        Self {
            client: None,
            limits: None,
            reply_budget,
            expires_at: AtomicU64::new(0),
            identity: RwLock::new(Identity::anonymous()),
            order: OnceLock::new(),
            forwarded: Vec::new(),
            proxied: OnceLock::new(),
        }
    }

    /// The connection, for a client.
    pub fn client(&self) -> Option<&ClientHandle> {
        self.client.as_ref()
    }

    /// Whether the server API calls (it may do anything a client may, and more).
    pub fn is_api(&self) -> bool {
        self.client.is_none()
    }

    pub(crate) fn limits(&self) -> Option<&ConnectionLimits> {
        self.limits.as_ref()
    }

    pub(crate) fn reply_budget(&self) -> usize {
        self.reply_budget
    }

    /// Counts one call against the connection's request budget.
    pub(crate) fn admit_request(&self) -> RequestVerdict {
        self.limits
            .as_ref()
            .map_or(RequestVerdict::Allowed, ConnectionLimits::admit_request)
    }

    pub fn identity(&self) -> RwLockReadGuard<'_, Identity> {
        self.identity
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// When the connection's token expires, in seconds since the Unix epoch.
    pub fn expires_at(&self) -> Option<u64> {
        Some(self.expires_at.load(Ordering::Acquire)).filter(|exp| *exp != 0)
    }

    /// Takes a refreshed token's grants, info and expiry; the user and device stay.
    pub(crate) fn refresh(&self, fresh: Identity) {
        let mut identity = self
            .identity
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        identity.grants = fresh.grants;
        identity.info = fresh.info;
        identity.expires_at = fresh.expires_at;
        self.expires_at
            .store(fresh.expires_at.unwrap_or(0), Ordering::Release);
    }
}

/// One call's surroundings.
#[derive(Clone, Copy)]
pub struct Context<'a> {
    pub services: &'a Arc<Services>,
    pub caller: &'a Arc<Caller>,
}

impl Context<'_> {
    pub fn node(&self) -> &dyn Node {
        self.services.node.as_ref()
    }

    /// The calling connection; an error for the server API, which has none (only
    /// methods registered for clients ask).
    pub fn client(&self) -> Result<&ClientHandle, RpcError> {
        self.caller
            .client()
            .ok_or_else(|| RpcError::with_detail(ErrorCode::Internal, "not a client method"))
    }

    pub(crate) fn detach(self) -> OwnedContext {
        OwnedContext {
            services: Arc::clone(self.services),
            caller: Arc::clone(self.caller),
        }
    }
}

/// A [`Context`] that a deferred call carries with it.
pub(crate) struct OwnedContext {
    pub(crate) services: Arc<Services>,
    pub(crate) caller: Arc<Caller>,
}

impl OwnedContext {
    pub(crate) fn borrow(&self) -> Context<'_> {
        Context {
            services: &self.services,
            caller: &self.caller,
        }
    }
}

/// A result that is not known yet: the handler's future, polled by the connection
/// beside its reads and writes. It must not borrow the request.
pub type Later = Pin<Box<dyn Future<Output = Result<Reply<'static>, RpcError>> + Send>>;

/// Work to do once a reply is queued for the client, e.g. letting live publications
/// of a channel reach a client only after the reply that recovered the earlier ones.
pub type Effect = Box<dyn FnOnce() + Send>;

/// A successful result, or the promise of one.
pub enum Reply<'p> {
    /// JSON taken from the request as is (e.g. `self.reply` echoing params).
    Raw(&'p RawValue),
    /// A constant JSON text.
    Static(&'static str),
    Json(serde_json::Value),
    /// JSON text built by the handler.
    Text(String),
    /// Answered when the future completes.
    Later(Later),
    /// A result (of a deferred call), and what to do once it is queued: whatever the
    /// reply becomes (even cut for size), the effect runs after it.
    Then(Box<Reply<'p>>, Effect),
}

impl std::fmt::Debug for Reply<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Raw(raw) => f.debug_tuple("Raw").field(raw).finish(),
            Self::Static(text) => f.debug_tuple("Static").field(text).finish(),
            Self::Json(value) => f.debug_tuple("Json").field(value).finish(),
            Self::Text(text) => f.debug_tuple("Text").field(text).finish(),
            Self::Later(_) => f.write_str("Later"),
            Self::Then(reply, _) => f.debug_tuple("Then").field(reply).finish(),
        }
    }
}

impl Reply<'_> {
    /// A deferred reply from a future.
    pub fn later(
        future: impl Future<Output = Result<Reply<'static>, RpcError>> + Send + 'static,
    ) -> Self {
        Self::Later(Box::pin(future))
    }

    /// Detaches the reply from the request it may borrow.
    pub(crate) fn into_owned(self) -> Result<Reply<'static>, RpcError> {
        Ok(match self {
            Self::Raw(raw) => Reply::Text(raw.get().to_owned()),
            Self::Static(text) => Reply::Static(text),
            Self::Json(value) => Reply::Json(value),
            Self::Text(text) => Reply::Text(text),
            Self::Then(reply, effect) => Reply::Then(Box::new(reply.into_owned()?), effect),
            // A deferred result must be an answer, not another promise.
            Self::Later(_) => return Err(RpcError::new(ErrorCode::Internal)),
        })
    }

    /// This reply, then `effect` once it is queued.
    pub fn then(self, effect: Effect) -> Self {
        Self::Then(Box::new(self), effect)
    }

    /// Takes the effect out, leaving the plain reply.
    pub(crate) fn split(self) -> (Self, Option<Effect>) {
        match self {
            Self::Then(reply, effect) => (*reply, Some(effect)),
            other => (other, None),
        }
    }
}

/// How a call ended, for metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CallOutcome {
    Ok,
    Error(ErrorCode),
}

impl CallOutcome {
    pub fn label(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Error(_) => "error",
        }
    }
}

/// One finished call.
#[derive(Clone, Copy, Debug)]
pub struct CallRecord {
    /// A registered method name, `unknown` or `invalid`: always a bounded set.
    pub method: &'static str,
    pub outcome: CallOutcome,
    pub elapsed: Duration,
}

/// Receives what the router sees (the server turns it into metrics).
pub trait Observer: Send + Sync + 'static {
    fn record(&self, record: CallRecord);
    /// A budget of `scope` refused a call.
    fn rate_limited(&self, _scope: Scope) {}
    /// A reply did not fit the send budget and was replaced by `-32013`.
    fn reply_cut(&self) {}
}

/// An [`Observer`] that ignores everything.
#[derive(Debug, Default)]
pub struct NoObserver;
impl Observer for NoObserver {
    fn record(&self, _: CallRecord) {}
}
