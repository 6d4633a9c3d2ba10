//! JSON-RPC 2.0 for Chorus: parsing and validating what clients send, routing calls to
//! one handler module per method, and serialising replies and notifications.
//!
//! The crate is transport-free: it turns one text message into at most one text reply.
//! What a handler may do to the rest of the server goes through [`Node`], which the
//! server implements on top of the hub and the cluster backbone.

mod error;
pub mod handlers;
mod node;
pub mod notification;
mod params;
mod request;
mod response;
mod router;

pub use error::{ErrorCode, RpcError};
pub use node::{Delivery, Node};
pub use params::{Params, validate_channel};
pub use request::{Call, Entry, Message, parse};
pub use router::{CallOutcome, CallRecord, Context, Handler, NoObserver, Observer, Reply, Router};
