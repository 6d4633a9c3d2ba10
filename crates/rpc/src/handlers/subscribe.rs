//! `subscribe`: the caller starts receiving publications on a channel, from any
//! replica. The reply comes once this replica holds the channel on the backbone, so a
//! publication made anywhere after it reaches the caller. Subscribing twice is not an
//! error. On a channel with history the reply says where the channel stands and, with
//! `since`, recovers what the caller missed; live publications follow the reply.

use std::borrow::Cow;
use std::fmt::Write as _;

use serde::Deserialize;
use serde_json::value::RawValue;

use super::channel::channel_result;
use crate::{
    Access, Context, Method, NodeFuture, Params, Recovery, Reply, RpcError, StreamPosition,
    Subscribed, Verdict, notification, validate_channel,
};

pub struct Subscribe;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscribeParams<'a> {
    #[serde(borrow)]
    channel: Cow<'a, str>,
    since: Option<StreamPosition>,
    /// The params as sent, for the subscribe proxy.
    #[serde(skip)]
    raw: Option<&'a RawValue>,
}

impl<'a> From<(Cow<'a, str>,)> for SubscribeParams<'a> {
    fn from((channel,): (Cow<'a, str>,)) -> Self {
        Self {
            channel,
            since: None,
            raw: None,
        }
    }
}

/// The reply on a history channel: where it stands, and what was recovered.
fn recovery_result(channel: &str, recovery: &Recovery) -> String {
    let mut out = String::with_capacity(
        96 + channel.len()
            + recovery
                .publications
                .iter()
                .map(|p| p.data.len() + 32)
                .sum::<usize>(),
    );
    out.push_str(r#"{"channel":"#);
    out.push_str(&serde_json::Value::from(channel).to_string());
    let _ = write!(
        out,
        r#","offset":{},"epoch":{},"recovered":{},"publications":["#,
        recovery.position.offset,
        serde_json::Value::from(recovery.position.epoch.as_str()),
        recovery.recovered
    );
    for (index, publication) in recovery.publications.iter().enumerate() {
        if index > 0 {
            out.push(',');
        }
        let _ = write!(out, r#"{{"offset":{},"data":"#, publication.offset);
        // Stored as the JSON text the publisher sent.
        out.push_str(&String::from_utf8_lossy(&publication.data));
        out.push('}');
    }
    out.push_str("]}");
    out
}

impl Method for Subscribe {
    type Params<'p> = SubscribeParams<'p>;

    fn parse<'p>(&self, params: Params<'p>) -> Result<SubscribeParams<'p>, RpcError> {
        let mut parsed: SubscribeParams<'p> = params.named_or_positional::<_, (Cow<'p, str>,)>()?;
        validate_channel(&parsed.channel)?;
        parsed.raw = params.raw();
        Ok(parsed)
    }

    fn access<'a>(&self, params: &'a SubscribeParams<'_>) -> Access<'a> {
        Access::Subscribe(&params.channel)
    }

    fn call<'p>(&self, cx: &Context<'_>, params: &Self::Params<'p>) -> Result<Reply<'p>, RpcError> {
        let channel = &params.channel;
        if let Some(backend) = &cx.services.backend
            && backend.decides_subscribe()
            && !cx.client()?.is_subscribed(channel)
        {
            let verdict = backend.subscribe(cx.caller, channel, params.raw);
            return proxied(cx, channel, params.since.clone(), verdict);
        }
        match cx
            .node()
            .subscribe(cx.client()?, channel, params.since.clone())
        {
            Subscribed::History(recovery) => {
                let channel = channel.to_string();
                Ok(Reply::later(async move {
                    let recovery = recovery.await?;
                    let text = recovery_result(&channel, &recovery);
                    Ok(Reply::Text(text).then(recovery.join))
                }))
            }
            Subscribed::Cluster => Ok(channel_result(channel)),
            Subscribed::LocalOnly => Err(RpcError::subscribed_locally()),
            Subscribed::Pending(held) => {
                let result = channel_result(channel);
                Ok(Reply::later(async move {
                    if held.await {
                        Ok(result)
                    } else {
                        Err(RpcError::subscribed_locally())
                    }
                }))
            }
        }
    }
}

/// A subscription the backend decides: taken (parked) first, so that nothing published
/// while the backend answers is lost; then the reply, the backend's data, and the live
/// publications kept meanwhile, in that order. A refusal or a failing backend undoes it.
fn proxied(
    cx: &Context<'_>,
    channel: &str,
    since: Option<StreamPosition>,
    verdict: NodeFuture<Verdict>,
) -> Result<Reply<'static>, RpcError> {
    let client = cx.client()?.clone();
    let node = std::sync::Arc::clone(&cx.services.node);
    let subscribed = node.subscribe_parked(&client, channel, since);
    let channel = channel.to_owned();
    Ok(Reply::later(async move {
        let (result, join) = match subscribed {
            Subscribed::History(recovery) => match recovery.await {
                Ok(recovery) => (
                    Ok(Reply::Text(recovery_result(&channel, &recovery))),
                    Some(recovery.join),
                ),
                // Unsubscribed by the node already.
                Err(error) => return Err(error),
            },
            Subscribed::Cluster => (Ok(channel_result(&channel)), None),
            Subscribed::LocalOnly => (Err(RpcError::subscribed_locally()), None),
            Subscribed::Pending(held) => {
                if held.await {
                    (Ok(channel_result(&channel)), None)
                } else {
                    (Err(RpcError::subscribed_locally()), None)
                }
            }
        };
        let data = match verdict.await {
            Ok(Verdict::Allow(data)) => data,
            Ok(Verdict::Refuse(reason)) => {
                node.unsubscribe(&client, &channel);
                return Err(RpcError::proxy_refused(&channel, &reason));
            }
            Err(error) => {
                node.unsubscribe(&client, &channel);
                return Err(error);
            }
        };
        let first = data.map(|data| notification::channel_message(&channel, &data));
        let live = move || {
            if let Some(join) = join {
                if let Some(first) = first {
                    let _ = client.send(first);
                }
                join();
            } else {
                node.release_parked(&client, &channel, first);
            }
        };
        match result {
            Ok(reply) => Ok(reply.then(Box::new(live))),
            // Subscribed on this replica only: live now, the error says the rest.
            Err(error) => {
                live();
                Err(error)
            }
        }
    }))
}
