//! `subscribe`: the caller starts receiving publications on a channel, from any
//! replica. Subscribing twice is not an error.

use super::channel::{channel_param, channel_result};
use crate::{Context, Handler, Params, Reply, RpcError};

pub struct Subscribe;

impl Handler for Subscribe {
    fn call<'p>(&self, cx: &Context<'_>, params: Params<'p>) -> Result<Reply<'p>, RpcError> {
        let channel = channel_param(params)?;
        cx.node.subscribe(cx.client, &channel);
        Ok(channel_result(&channel))
    }
}
