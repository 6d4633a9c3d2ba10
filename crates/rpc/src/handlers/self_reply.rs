//! `self.reply`: echoes the params to the caller, byte for byte.

use serde_json::value::RawValue;

use crate::{Context, Method, Params, Reply, RpcError};

pub struct SelfReply;

impl Method for SelfReply {
    type Params<'p> = Option<&'p RawValue>;

    fn parse<'p>(&self, params: Params<'p>) -> Result<Self::Params<'p>, RpcError> {
        Ok(params.raw())
    }

    fn call<'p>(&self, _: &Context<'_>, params: &Self::Params<'p>) -> Result<Reply<'p>, RpcError> {
        Ok(params.map_or(Reply::Static("null"), Reply::Raw))
    }
}
