//! What handlers may ask of the server: delivery to clients on this and every other
//! replica, and channel membership. Implemented by the server, so that this crate
//! needs neither the backbone nor the transport.

use chorus_hub::{ClientHandle, Frame};

/// How far a delivery got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Delivered locally and handed to the backbone for the other replicas.
    Cluster,
    /// Delivered on this replica only: the backbone is down (answered with -32053).
    LocalOnly,
}

/// The server as a handler sees it.
pub trait Node: Send + Sync {
    /// Sends `frame` to every client of every replica, the caller included.
    fn broadcast(&self, frame: Frame) -> Delivery;

    /// Sends `frame` to every subscriber of `channel` on every replica.
    fn publish(&self, channel: &str, frame: Frame) -> Delivery;

    /// Subscribes `client` to `channel`; false when it already was.
    fn subscribe(&self, client: &ClientHandle, channel: &str) -> bool;

    /// Unsubscribes `client` from `channel`; false when it was not subscribed.
    fn unsubscribe(&self, client: &ClientHandle, channel: &str) -> bool;
}
