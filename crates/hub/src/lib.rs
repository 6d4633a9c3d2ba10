//! Connected clients and who listens to what: the client registry, the channel index,
//! and each client's bounded outbound queue.
//!
//! The hub moves already serialised [`Frame`]s. It knows nothing of JSON-RPC, of
//! WebSocket framing or of the cluster backbone: callers hand it bytes and it hands
//! them to every matching client's queue without waiting for anyone.

mod client;
mod frame;
mod hub;

pub use client::{
    ClientHandle, ClientId, CloseReason, Dropped, Identity, Outbox, Outgoing, SendError,
};
pub use frame::{Frame, Overflow, Tag};
pub use hub::{Hub, HubEvents, NoEvents, SubscribeOutcome, UnsubscribeOutcome};
