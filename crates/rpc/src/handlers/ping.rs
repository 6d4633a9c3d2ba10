//! `ping`: answers `"pong"`, so a client can check the connection end to end.

use crate::{Context, Handler, Params, Reply, RpcError};

pub struct Ping;

impl Handler for Ping {
    fn call<'p>(&self, _: &Context<'_>, _: Params<'p>) -> Result<Reply<'p>, RpcError> {
        Ok(Reply::Static(r#""pong""#))
    }
}
