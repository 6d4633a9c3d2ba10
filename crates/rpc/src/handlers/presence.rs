//! `presence` and `presence_stats`: who is in a channel, cluster-wide, for channels
//! whose namespace says `presence: true`. Clients need the right to subscribe to the
//! channel; the server API may read every channel.

use std::borrow::Cow;

use serde::Deserialize;

use crate::{Access, Context, Method, Params, Reply, RpcError, validate_channel};

/// Members per page unless the caller asks for another size.
const DEFAULT_LIMIT: usize = 100;
/// Most members per page.
const MAX_LIMIT: usize = 1000;

pub struct Presence;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresenceParams<'a> {
    #[serde(borrow)]
    channel: Cow<'a, str>,
    limit: Option<usize>,
    #[serde(borrow)]
    cursor: Option<Cow<'a, str>>,
}

fn enabled(cx: &Context<'_>, channel: &str) -> Result<(), RpcError> {
    if cx.services.gate.namespaces().of(channel).presence {
        Ok(())
    } else {
        Err(RpcError::presence_not_enabled(channel))
    }
}

impl Method for Presence {
    type Params<'p> = PresenceParams<'p>;

    fn parse<'p>(&self, params: Params<'p>) -> Result<PresenceParams<'p>, RpcError> {
        let parsed: PresenceParams<'p> = params.named()?;
        validate_channel(&parsed.channel)?;
        if parsed
            .limit
            .is_some_and(|limit| limit == 0 || limit > MAX_LIMIT)
        {
            return Err(RpcError::invalid_params(format!(
                "limit must be 1 to {MAX_LIMIT}"
            )));
        }
        if parsed
            .cursor
            .as_ref()
            .is_some_and(|cursor| cursor.len() > 512)
        {
            return Err(RpcError::invalid_params(
                "cursor is not one this server gave",
            ));
        }
        Ok(parsed)
    }

    fn access<'a>(&self, params: &'a PresenceParams<'_>) -> Access<'a> {
        Access::Read(&params.channel)
    }

    fn call<'p>(&self, cx: &Context<'_>, params: &Self::Params<'p>) -> Result<Reply<'p>, RpcError> {
        enabled(cx, &params.channel)?;
        let page = cx.node().presence(
            &params.channel,
            params.limit.unwrap_or(DEFAULT_LIMIT),
            params.cursor.as_deref(),
        );
        Ok(Reply::later(async move { page.await.map(Reply::Text) }))
    }
}

pub struct PresenceStats;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatsParams<'a> {
    #[serde(borrow)]
    channel: Cow<'a, str>,
}

impl Method for PresenceStats {
    type Params<'p> = StatsParams<'p>;

    fn parse<'p>(&self, params: Params<'p>) -> Result<StatsParams<'p>, RpcError> {
        let parsed: StatsParams<'p> = params.named()?;
        validate_channel(&parsed.channel)?;
        Ok(parsed)
    }

    fn access<'a>(&self, params: &'a StatsParams<'_>) -> Access<'a> {
        Access::Read(&params.channel)
    }

    fn call<'p>(&self, cx: &Context<'_>, params: &Self::Params<'p>) -> Result<Reply<'p>, RpcError> {
        enabled(cx, &params.channel)?;
        let stats = cx.node().presence_stats(&params.channel);
        Ok(Reply::later(async move { stats.await.map(Reply::Text) }))
    }
}
