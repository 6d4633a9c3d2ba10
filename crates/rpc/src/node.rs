//! What handlers may ask of the server: delivery to clients on this and every other
//! replica, channel membership, and the cluster's presence. Implemented by the
//! server, so that this crate needs neither the backbone nor the transport.

use std::future::Future;
use std::pin::Pin;

use chorus_gate::Pattern;
use chorus_hub::{ClientHandle, Frame};

use crate::error::{ErrorCode, RpcError};

/// How far a delivery got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Delivered locally and handed to the backbone for the other replicas.
    Cluster,
    /// Delivered on this replica only: the backbone is down (answered with -32053).
    LocalOnly,
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
}

impl std::fmt::Debug for Subscribed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Cluster => f.write_str("Cluster"),
            Self::LocalOnly => f.write_str("LocalOnly"),
            Self::Pending(_) => f.write_str("Pending"),
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

    /// Sends `frame` to every subscriber of `channel` on every replica.
    fn publish(&self, channel: &str, frame: Frame) -> Delivery;

    /// Subscribes `client` to `channel` on this replica at once, and makes sure the
    /// replica receives the channel's publications from the others.
    fn subscribe(&self, client: &ClientHandle, channel: &str) -> Subscribed;

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
