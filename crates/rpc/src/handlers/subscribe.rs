//! `subscribe`: the caller starts receiving publications on a channel, from any
//! replica. The reply comes once this replica holds the channel on the backbone, so a
//! publication made anywhere after it reaches the caller. Subscribing twice is not an
//! error.

use std::borrow::Cow;

use super::channel::{channel_param, channel_result};
use crate::{Access, Context, Method, Params, Reply, RpcError, Subscribed};

pub struct Subscribe;

impl Method for Subscribe {
    type Params<'p> = Cow<'p, str>;

    fn parse<'p>(&self, params: Params<'p>) -> Result<Cow<'p, str>, RpcError> {
        channel_param(params)
    }

    fn access<'a>(&self, channel: &'a Cow<'_, str>) -> Access<'a> {
        Access::Subscribe(channel)
    }

    fn call<'p>(
        &self,
        cx: &Context<'_>,
        channel: &Self::Params<'p>,
    ) -> Result<Reply<'p>, RpcError> {
        match cx.node().subscribe(cx.client()?, channel) {
            Subscribed::Cluster => Ok(channel_result(channel)),
            Subscribed::LocalOnly => Err(RpcError::subscribed_locally()),
            Subscribed::Pending(held) => {
                let result = channel_result(channel);
                Ok(Reply::later(async move {
                    if held.await {
                        Ok(result)
                    } else {
                        Err(RpcError::subscribed_locally())
                    }
                }))
            }
        }
    }
}
