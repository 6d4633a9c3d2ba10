//! The `{"channel": str}` params shared by `subscribe` and `unsubscribe`.

use std::borrow::Cow;

use serde::Deserialize;

use crate::{Params, RpcError, validate_channel};

#[derive(Deserialize)]
pub(super) struct ChannelParams<'a> {
    #[serde(borrow)]
    pub channel: Cow<'a, str>,
}

/// `["name"]`: a one-element tuple, because a newtype would read a bare string.
type PositionalChannel<'a> = (Cow<'a, str>,);

impl<'a> From<PositionalChannel<'a>> for ChannelParams<'a> {
    fn from((channel,): PositionalChannel<'a>) -> Self {
        Self { channel }
    }
}

/// The validated channel name of a one-argument channel method.
pub(super) fn channel_param<'p>(params: Params<'p>) -> Result<Cow<'p, str>, RpcError> {
    let parsed: ChannelParams<'p> = params.named_or_positional::<_, PositionalChannel<'p>>()?;
    validate_channel(&parsed.channel)?;
    Ok(parsed.channel)
}

/// `{"channel": <name>}` as a result.
pub(super) fn channel_result(channel: &str) -> crate::Reply<'static> {
    crate::Reply::Json(serde_json::json!({ "channel": channel }))
}
