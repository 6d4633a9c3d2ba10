//! `publish`: sends `data` to every subscriber of a channel on every replica, as the
//! `message` notification (with its `offset` on a channel with history). The
//! publisher need not be subscribed. With `idempotency_key`, a repeat within
//! `WS_IDEMPOTENCY_TTL`, anywhere in the cluster, answers as the first and delivers
//! nothing.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::channel::channel_result;
use std::sync::Arc;

use crate::{
    Access, Context, Delivery, Method, Params, Published, Reply, RpcError, Verdict,
    validate_channel,
};

pub struct Publish;

/// Longest idempotency key accepted.
const MAX_KEY: usize = 256;

#[derive(Deserialize)]
pub struct PublishParams<'a> {
    #[serde(borrow)]
    channel: Cow<'a, str>,
    #[serde(borrow)]
    data: &'a RawValue,
    #[serde(default, borrow)]
    idempotency_key: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct PositionalPublish<'a>(#[serde(borrow)] Cow<'a, str>, #[serde(borrow)] &'a RawValue);

impl<'a> From<PositionalPublish<'a>> for PublishParams<'a> {
    fn from(PositionalPublish(channel, data): PositionalPublish<'a>) -> Self {
        Self {
            channel,
            data,
            idempotency_key: None,
        }
    }
}

impl Method for Publish {
    type Params<'p> = PublishParams<'p>;

    fn parse<'p>(&self, params: Params<'p>) -> Result<PublishParams<'p>, RpcError> {
        let parsed: PublishParams<'p> = params.named_or_positional::<_, PositionalPublish<'p>>()?;
        validate_channel(&parsed.channel)?;
        if parsed
            .idempotency_key
            .as_ref()
            .is_some_and(|key| key.is_empty() || key.len() > MAX_KEY)
        {
            return Err(RpcError::invalid_params(format!(
                "idempotency_key must be 1 to {MAX_KEY} bytes"
            )));
        }
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
        if let Some(backend) = &cx.services.backend
            && backend.decides_publish()
            && !cx.caller.is_api()
        {
            let verdict = backend.publish(cx.caller, channel, params.data);
            let node = Arc::clone(&cx.services.node);
            let channel = channel.to_owned();
            let data = params.data.to_owned();
            let key = params.idempotency_key.as_deref().map(str::to_owned);
            return Ok(Reply::later(async move {
                let data = match verdict.await? {
                    Verdict::Allow(rewritten) => rewritten.unwrap_or(data),
                    Verdict::Refuse(reason) => {
                        return Err(RpcError::proxy_refused(&channel, &reason));
                    }
                };
                let published = node.publish(&channel, &data, key.as_deref());
                answer(channel, published).await
            }));
        }
        let published = cx
            .node()
            .publish(channel, params.data, params.idempotency_key.as_deref());
        match published {
            Published::Now(Delivery::Cluster) => Ok(channel_result(channel)),
            Published::Now(Delivery::LocalOnly) => Err(RpcError::delivered_locally()),
            later @ Published::Later(_) => Ok(Reply::later(answer(channel.to_owned(), later))),
        }
    }
}

/// The reply to a publish that was decided before it was made.
async fn answer(channel: String, published: Published) -> Result<Reply<'static>, RpcError> {
    match published {
        Published::Now(Delivery::Cluster) => Ok(channel_result(&channel)),
        Published::Now(Delivery::LocalOnly) => Err(RpcError::delivered_locally()),
        Published::Later(position) => Ok(Reply::Json(match position.await? {
            Some(position) => serde_json::json!({
                "channel": channel,
                "offset": position.offset,
                "epoch": position.epoch,
            }),
            None => serde_json::json!({ "channel": channel }),
        })),
    }
}
