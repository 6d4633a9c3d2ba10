//! `publish`: sends `data` to every subscriber of a channel on every replica, as the
//! `message` notification. The publisher need not be subscribed.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::channel::channel_result;
use crate::{
    Access, Context, Delivery, Method, Params, Reply, RpcError, notification, validate_channel,
};

pub struct Publish;

#[derive(Deserialize)]
pub struct PublishParams<'a> {
    #[serde(borrow)]
    channel: Cow<'a, str>,
    #[serde(borrow)]
    data: &'a RawValue,
}

#[derive(Deserialize)]
struct PositionalPublish<'a>(#[serde(borrow)] Cow<'a, str>, #[serde(borrow)] &'a RawValue);

impl<'a> From<PositionalPublish<'a>> for PublishParams<'a> {
    fn from(PositionalPublish(channel, data): PositionalPublish<'a>) -> Self {
        Self { channel, data }
    }
}

impl Method for Publish {
    type Params<'p> = PublishParams<'p>;

    fn parse<'p>(&self, params: Params<'p>) -> Result<PublishParams<'p>, RpcError> {
        let parsed: PublishParams<'p> = params.named_or_positional::<_, PositionalPublish<'p>>()?;
        validate_channel(&parsed.channel)?;
        Ok(parsed)
    }

    fn access<'a>(&self, params: &'a PublishParams<'_>) -> Access<'a> {
        Access::Publish {
            channel: &params.channel,
            bytes: params.data.get().len(),
        }
    }

    fn call<'p>(&self, cx: &Context<'_>, params: &Self::Params<'p>) -> Result<Reply<'p>, RpcError> {
        let channel = params.channel.as_ref();
        match cx
            .node()
            .publish(channel, notification::channel_message(channel, params.data))
        {
            Delivery::Cluster => Ok(channel_result(channel)),
            Delivery::LocalOnly => Err(RpcError::delivered_locally()),
        }
    }
}
