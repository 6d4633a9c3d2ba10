//! `broadcast`: sends the caller's params, as the `broadcast` notification, to every
//! client of every replica, the caller included.

use crate::{Context, Delivery, ErrorCode, Handler, Params, Reply, RpcError, notification};

pub struct Broadcast;

impl Handler for Broadcast {
    fn call<'p>(&self, cx: &Context<'_>, params: Params<'p>) -> Result<Reply<'p>, RpcError> {
        let Some(raw) = params.raw().filter(|_| params.is_object()) else {
            return Err(RpcError::invalid_params("broadcast takes an object"));
        };
        match cx.node.broadcast(notification::raw("broadcast", raw.get())) {
            Delivery::Cluster => Ok(Reply::Static(r#"{"status":"broadcasted"}"#)),
            Delivery::LocalOnly => Err(local_only()),
        }
    }
}

/// -32053 after a delivery that reached this replica's clients only.
pub(super) fn local_only() -> RpcError {
    RpcError::with_detail(ErrorCode::Unavailable, "cluster backbone is down")
        .data(serde_json::json!({"delivered": "local"}))
}
