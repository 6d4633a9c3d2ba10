//! JSON-RPC 2.0 for Chorus: parsing and validating what clients send, routing calls to
//! one handler module per method, and serialising replies and notifications.
//!
//! The crate is transport-free: it turns one text message into at most one text reply,
//! now or later. What a handler may do to the rest of the server goes through
//! [`Node`], which the server implements on top of the hub and the cluster backbone;
//! what it may do at all is decided by the guard, from the gate's limits.

mod context;
mod error;
mod guard;
pub mod handlers;
mod method;
mod node;
pub mod notification;
mod order;
mod params;
mod proxy;
mod request;
mod response;
mod router;

pub use context::{
    CallOutcome, CallRecord, Caller, Context, Effect, Later, NoObserver, Observer, Reply, Services,
};
pub use error::{ErrorCode, RpcError};
pub use method::{Access, Method};
pub use node::{
    Delivery, HistoryPage, HistoryQuery, Kept, Node, NodeFuture, Published, Recovery,
    StreamPosition, Subscribed, Targets,
};
pub use params::{Params, validate_channel};
pub use proxy::{Backend, Slot, Verdict};
pub use request::{Call, Entry, Message, parse, parse_with_limit};
pub use router::{Answer, Handled, LaterMessage, PROXIED, Router};
