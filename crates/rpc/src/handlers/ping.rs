//! `ping`: answers `"pong"`, so a client can check the connection end to end.

use crate::{Context, Method, Params, Reply, RpcError};

pub struct Ping;

impl Method for Ping {
    type Params<'p> = ();

    fn parse(&self, _: Params<'_>) -> Result<(), RpcError> {
        Ok(())
    }

    fn call<'p>(&self, _: &Context<'_>, (): &Self::Params<'p>) -> Result<Reply<'p>, RpcError> {
        Ok(Reply::Static(r#""pong""#))
    }
}
