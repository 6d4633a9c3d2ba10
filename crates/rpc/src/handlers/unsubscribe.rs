//! `unsubscribe`: stops delivery of a channel to the caller; -32004 when the caller
//! was not subscribed.

use super::channel::{channel_param, channel_result};
use crate::{Context, ErrorCode, Handler, Params, Reply, RpcError};

pub struct Unsubscribe;

impl Handler for Unsubscribe {
    fn call<'p>(&self, cx: &Context<'_>, params: Params<'p>) -> Result<Reply<'p>, RpcError> {
        let channel = channel_param(params)?;
        if cx.node.unsubscribe(cx.client, &channel) {
            Ok(channel_result(&channel))
        } else {
            Err(
                RpcError::with_detail(ErrorCode::NotFound, "not subscribed to this channel")
                    .data(serde_json::json!({ "channel": channel })),
            )
        }
    }
}
