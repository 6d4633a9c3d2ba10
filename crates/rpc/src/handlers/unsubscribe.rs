//! `unsubscribe`: stops delivery of a channel to the caller; -32004 when the caller
//! was not subscribed.

use std::borrow::Cow;

use super::channel::{channel_param, channel_result};
use crate::{Access, Context, ErrorCode, Method, Params, Reply, RpcError};

pub struct Unsubscribe;

impl Method for Unsubscribe {
    type Params<'p> = Cow<'p, str>;

    fn parse<'p>(&self, params: Params<'p>) -> Result<Cow<'p, str>, RpcError> {
        channel_param(params)
    }

    fn access<'a>(&self, channel: &'a Cow<'_, str>) -> Access<'a> {
        Access::Unsubscribe(channel)
    }

    fn call<'p>(
        &self,
        cx: &Context<'_>,
        channel: &Self::Params<'p>,
    ) -> Result<Reply<'p>, RpcError> {
        if cx.node().unsubscribe(cx.client()?, channel) {
            Ok(channel_result(channel))
        } else {
            Err(
                RpcError::with_detail(ErrorCode::NotFound, "not subscribed to this channel")
                    .data(serde_json::json!({ "channel": channel })),
            )
        }
    }
}
