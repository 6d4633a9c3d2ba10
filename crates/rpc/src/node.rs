//! What handlers may ask of the server: delivery to clients on this and every other
//! replica, and channel membership. Implemented by the server, so that this crate
//! needs neither the backbone nor the transport.

use std::future::Future;
use std::pin::Pin;

use chorus_hub::{ClientHandle, Frame};

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
}
