//! `self.reply`: echoes the params to the caller, byte for byte.

use crate::{Context, Handler, Params, Reply, RpcError};

pub struct SelfReply;

impl Handler for SelfReply {
    fn call<'p>(&self, _: &Context<'_>, params: Params<'p>) -> Result<Reply<'p>, RpcError> {
        Ok(params.raw().map_or(Reply::Static("null"), Reply::Raw))
    }
}
