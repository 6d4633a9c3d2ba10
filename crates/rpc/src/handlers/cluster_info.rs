//! `info` and `channels` (server API): the cluster as the presence store sees it.

use serde::Deserialize;

use crate::{Context, Method, Params, Reply, RpcError};

/// `info {"user"?}`: a user's connections, or every live replica.
pub struct Info;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InfoParams {
    user: Option<String>,
}

impl Method for Info {
    type Params<'p> = InfoParams;

    fn parse(&self, params: Params<'_>) -> Result<InfoParams, RpcError> {
        let parsed: InfoParams = params.named()?;
        if parsed
            .user
            .as_ref()
            .is_some_and(|user| user.is_empty() || user.len() > 256)
        {
            return Err(RpcError::invalid_params("user must be 1 to 256 bytes"));
        }
        Ok(parsed)
    }

    fn call<'p>(&self, cx: &Context<'_>, params: &InfoParams) -> Result<Reply<'p>, RpcError> {
        let info = cx.node().info(params.user.as_deref());
        Ok(Reply::later(async move { info.await.map(Reply::Text) }))
    }
}

/// `channels {"pattern"?}`: every channel with a subscriber anywhere.
pub struct Channels;

pub struct ChannelsParams {
    pattern: Option<chorus_gate::Pattern>,
}

impl Method for Channels {
    type Params<'p> = ChannelsParams;

    fn parse(&self, params: Params<'_>) -> Result<ChannelsParams, RpcError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            pattern: Option<String>,
        }
        let raw: Raw = params.named()?;
        let pattern = raw
            .pattern
            .map(|text| {
                chorus_gate::Pattern::parse(&text).ok_or_else(|| {
                    RpcError::invalid_params(
                        "pattern must be a channel name, a prefix ending in *, or *",
                    )
                })
            })
            .transpose()?;
        Ok(ChannelsParams { pattern })
    }

    fn call<'p>(&self, cx: &Context<'_>, params: &ChannelsParams) -> Result<Reply<'p>, RpcError> {
        let channels = cx.node().channels(params.pattern.clone());
        Ok(Reply::later(async move { channels.await.map(Reply::Text) }))
    }
}
