//! What handlers may ask of the server: delivery to clients on this and every other
//! replica, channel membership, and the cluster's presence. Implemented by the
//! server, so that this crate needs neither the backbone nor the transport.

use std::future::Future;
use std::pin::Pin;

use chorus_gate::Pattern;
use chorus_hub::{ClientHandle, Frame};

use serde_json::value::RawValue;

use crate::context::Effect;
use crate::error::{ErrorCode, RpcError};

/// How far a delivery got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Delivered locally and handed to the backbone for the other replicas.
    Cluster,
    /// Delivered on this replica only: the backbone is down (answered with -32053).
    LocalOnly,
}

/// Where a history channel stands: the offset of its newest publication in an epoch.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StreamPosition {
    pub offset: u64,
    pub epoch: String,
}

/// One publication of a history channel: its offset and its `data` (JSON text).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kept {
    pub offset: u64,
    pub data: bytes::Bytes,
}

/// What `subscribe` to a history channel answers.
pub struct Recovery {
    /// The offset the client is at once the reply is read: live publications follow it.
    pub position: StreamPosition,
    /// Whether `publications` are every publication after the client's `since`.
    pub recovered: bool,
    pub publications: Vec<Kept>,
    /// Lets live publications reach the client; run once the reply is queued.
    pub join: Effect,
}

/// What a publish did.
pub enum Published {
    /// Delivered (as far as the `Delivery` says).
    Now(Delivery),
    /// Decided by a store first (history, idempotency): the publication's position
    /// on a history channel, `None` on a channel without history.
    Later(NodeFuture<Option<StreamPosition>>),
}

impl std::fmt::Debug for Published {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Now(delivery) => f.debug_tuple("Now").field(delivery).finish(),
            Self::Later(_) => f.write_str("Later"),
        }
    }
}

/// Which publications `history` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryQuery {
    pub since: Option<StreamPosition>,
    pub limit: usize,
    pub reverse: bool,
    /// Most bytes of `data` the page may hold (half the caller's reply budget).
    pub max_bytes: usize,
}

/// A page of history.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryPage {
    pub publications: Vec<Kept>,
    pub position: StreamPosition,
    /// The page was cut at `max_bytes`.
    pub truncated: bool,
}

/// Where a new subscription stands.
pub enum Subscribed {
    /// Publications from every replica reach the client.
    Cluster,
    /// This replica's publications reach the client now; the backbone is down, so the
    /// others' follow once it is back (answered with -32053).
    LocalOnly,
    /// The backbone subscription is being taken; resolves to true once it is held,
    /// false when the backbone could not confirm it (then as `LocalOnly`).
    Pending(Pin<Box<dyn Future<Output = bool> + Send>>),
    /// A history channel: its position, and what was recovered.
    History(NodeFuture<Recovery>),
}

impl std::fmt::Debug for Subscribed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cluster => f.write_str("Cluster"),
            Self::LocalOnly => f.write_str("LocalOnly"),
            Self::Pending(_) => f.write_str("Pending"),
            Self::History(_) => f.write_str("History"),
        }
    }
}

/// Connections chosen by user, by device or by client id (section 10): their union,
/// each connection once.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Targets {
    pub users: Vec<String>,
    pub devices: Vec<String>,
    pub clients: Vec<String>,
}

impl Targets {
    pub fn is_empty(&self) -> bool {
        self.users.is_empty() && self.devices.is_empty() && self.clients.is_empty()
    }
}

/// An answer the node gives later (it asks the presence store or the backbone).
pub type NodeFuture<T> = Pin<Box<dyn Future<Output = Result<T, RpcError>> + Send>>;

fn not_here<T: Send + 'static>() -> NodeFuture<T> {
    Box::pin(std::future::ready(Err(RpcError::with_detail(
        ErrorCode::Unavailable,
        "not available on this node",
    ))))
}

/// The server as a handler sees it.
pub trait Node: Send + Sync + 'static {
    /// Sends `frame` to every client of every replica, the caller included.
    fn broadcast(&self, frame: Frame) -> Delivery;

    /// Sends `data` as the `message` notification to every subscriber of `channel` on
    /// every replica; on a history channel, with its offset, in offset order. An
    /// `idempotency_key` used on the channel within the replica's idempotency time
    /// delivers nothing and answers as the first publish did.
    fn publish(&self, channel: &str, data: &RawValue, idempotency_key: Option<&str>) -> Published;

    /// Subscribes `client` to `channel` on this replica, and makes sure the replica
    /// receives the channel's publications from the others. On a history channel,
    /// `since` asks for the publications after it.
    fn subscribe(
        &self,
        client: &ClientHandle,
        channel: &str,
        since: Option<StreamPosition>,
    ) -> Subscribed;

    /// Like [`Node::subscribe`], for a subscription whose backend is still to be
    /// asked: live publications are kept for the client until
    /// [`Node::release_parked`] (on a history channel, until the recovery's `join`).
    fn subscribe_parked(
        &self,
        client: &ClientHandle,
        channel: &str,
        since: Option<StreamPosition>,
    ) -> Subscribed {
        self.subscribe(client, channel, since)
    }

    /// Queues `first` for a parked subscriber, then what was kept for it, and makes it
    /// live. False when it is no longer subscribed.
    fn release_parked(&self, client: &ClientHandle, _channel: &str, first: Option<Frame>) -> bool {
        if let Some(frame) = first {
            let _ = client.send(frame);
        }
        true
    }

    /// Whether `channel`'s namespace keeps history.
    fn keeps_history(&self, _channel: &str) -> bool {
        false
    }

    /// A page of `channel`'s history.
    fn history(&self, _channel: &str, _query: HistoryQuery) -> NodeFuture<HistoryPage> {
        not_here()
    }

    /// Unsubscribes `client` from `channel`; false when it was not subscribed.
    fn unsubscribe(&self, client: &ClientHandle, channel: &str) -> bool;

    /// Sends `frame` to the targeted connections on every replica; resolves to how
    /// many connections were targeted cluster-wide.
    fn send(&self, _targets: Targets, _frame: Frame) -> NodeFuture<u64> {
        not_here()
    }

    /// Sends `frame` (`sys.kick`) to the targeted connections on every replica, then
    /// closes them (4003); resolves to how many were targeted.
    fn kick(&self, _targets: Targets, _frame: Frame) -> NodeFuture<u64> {
        not_here()
    }

    /// One page of `channel`'s members: the `presence` result as JSON text.
    fn presence(&self, _channel: &str, _limit: usize, _cursor: Option<&str>) -> NodeFuture<String> {
        not_here()
    }

    /// `channel`'s member counts: the `presence_stats` result as JSON text.
    fn presence_stats(&self, _channel: &str) -> NodeFuture<String> {
        not_here()
    }

    /// A user's connections, or every live replica: the `info` result as JSON text.
    fn info(&self, _user: Option<&str>) -> NodeFuture<String> {
        not_here()
    }

    /// Every channel with a subscriber anywhere (matching `pattern`): the `channels`
    /// result as JSON text.
    fn channels(&self, _pattern: Option<Pattern>) -> NodeFuture<String> {
        not_here()
    }
}
