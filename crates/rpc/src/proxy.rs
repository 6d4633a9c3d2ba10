//! The application's own HTTP backend as handlers see it (section 13): it decides
//! methods no handler has, subscriptions and client publications. Implemented by the
//! server, which owns the HTTP client; this crate only says when it is asked.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::value::RawValue;

use crate::context::{Caller, Later};
use crate::node::NodeFuture;

/// What the backend said about a subscription or a publication.
#[derive(Debug)]
pub enum Verdict {
    /// Allowed; with data for the subscriber alone, or the publication's new data.
    Allow(Option<Box<RawValue>>),
    /// Refused, and why (answered with `-32003`).
    Refuse(String),
}

/// The backend proxies.
pub trait Backend: Send + Sync + 'static {
    /// Relays a call of a method no handler has, answered with the caller's id; `None`
    /// when the rpc proxy is off (then it is `-32601`).
    fn rpc(
        &self,
        caller: &Arc<Caller>,
        method: &str,
        params: Option<&RawValue>,
        id: Option<&RawValue>,
    ) -> Option<Later>;

    /// Whether the subscribe proxy is on.
    fn decides_subscribe(&self) -> bool;

    /// Asks whether the caller may subscribe; only awaited once the subscription is
    /// taken.
    fn subscribe(
        &self,
        caller: &Arc<Caller>,
        channel: &str,
        params: Option<&RawValue>,
    ) -> NodeFuture<Verdict>;

    /// Whether the publish proxy is on.
    fn decides_publish(&self) -> bool;

    /// Asks whether the caller may publish `data`, and what to publish instead.
    fn publish(&self, caller: &Arc<Caller>, channel: &str, data: &RawValue) -> NodeFuture<Verdict>;
}

/// One of at most `max` requests in flight, counted in a shared counter; given back
/// when dropped.
#[derive(Debug)]
pub struct Slot(Arc<AtomicUsize>);

impl Slot {
    /// A slot, or `None` when `max` are taken.
    pub fn take(counter: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |taken| {
                (taken < max).then_some(taken + 1)
            })
            .ok()
            .map(|_| Self(Arc::clone(counter)))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}
