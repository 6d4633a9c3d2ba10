//! `publish`: sends `data` to every subscriber of a channel on every replica, as the
//! `message` notification. The publisher need not be subscribed.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::broadcast::local_only;
use super::channel::channel_result;
use crate::{Context, Delivery, Handler, Params, Reply, RpcError, notification, validate_channel};

pub struct Publish;

#[derive(Deserialize)]
struct PublishParams<'a> {
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

impl Handler for Publish {
    fn call<'p>(&self, cx: &Context<'_>, params: Params<'p>) -> Result<Reply<'p>, RpcError> {
        let PublishParams { channel, data } =
            params.named_or_positional::<_, PositionalPublish<'p>>()?;
        validate_channel(&channel)?;
        match cx
            .node
            .publish(&channel, notification::channel_message(&channel, data))
        {
            Delivery::Cluster => Ok(channel_result(&channel)),
            Delivery::LocalOnly => Err(local_only()),
        }
    }
}
