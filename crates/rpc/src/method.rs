//! How a method is written: parse its params once, say what it touches, act. The
//! router's guard runs between the second and the third step, so no handler checks
//! limits or permissions by itself, and calls on one channel are put in order there.

use std::sync::Arc;

use serde_json::value::RawValue;

use crate::context::{Context, Reply};
use crate::error::RpcError;
use crate::guard;
use crate::params::Params;

/// What a call touches, for the guard and the per-channel order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access<'a> {
    /// Nothing that needs a permission or a budget.
    None,
    Subscribe(&'a str),
    Unsubscribe(&'a str),
    /// Reads a channel's state (presence, history): the right to subscribe.
    Read(&'a str),
    /// Publishes `bytes` of serialised data to a channel.
    Publish {
        channel: &'a str,
        bytes: usize,
    },
    /// Sends `bytes` of serialised params to every client.
    Broadcast {
        bytes: usize,
    },
    /// Sends `bytes` of serialised data to chosen users, devices or connections.
    Direct {
        bytes: usize,
    },
}

impl<'a> Access<'a> {
    /// The channel whose calls must stay in order, if any.
    pub fn channel(self) -> Option<&'a str> {
        match self {
            Self::Subscribe(channel)
            | Self::Unsubscribe(channel)
            | Self::Publish { channel, .. } => Some(channel),
            Self::None | Self::Read(_) | Self::Broadcast { .. } | Self::Direct { .. } => None,
        }
    }
}

/// One client method.
pub trait Method: Send + Sync + 'static {
    /// The params once read; may borrow the request.
    type Params<'p>;

    fn parse<'p>(&self, params: Params<'p>) -> Result<Self::Params<'p>, RpcError>;

    fn access<'a>(&self, _params: &'a Self::Params<'_>) -> Access<'a> {
        Access::None
    }

    /// Runs the call. Must not block: anything slow is a [`Reply::Later`].
    fn call<'p>(&self, cx: &Context<'_>, params: &Self::Params<'p>) -> Result<Reply<'p>, RpcError>;
}

/// A [`Method`] behind a pointer the router can keep and a deferred call can carry.
pub(crate) trait Handler: Send + Sync + 'static {
    /// Parse, guard, order, call.
    fn dispatch<'p>(
        &self,
        me: &Arc<dyn Handler>,
        cx: &Context<'_>,
        params: Params<'p>,
    ) -> Result<Reply<'p>, RpcError>;

    /// Parse and call, for a call that already passed the guard and waited its turn.
    fn run<'p>(&self, cx: &Context<'_>, params: Params<'p>) -> Result<Reply<'p>, RpcError>;
}

impl<M: Method> Handler for M {
    fn dispatch<'p>(
        &self,
        me: &Arc<dyn Handler>,
        cx: &Context<'_>,
        params: Params<'p>,
    ) -> Result<Reply<'p>, RpcError> {
        let parsed = self.parse(params)?;
        let access = self.access(&parsed);
        guard::check(cx, access)?;
        let Some(channel) = access.channel() else {
            return self.call(cx, &parsed);
        };
        if cx
            .caller
            .order_if_any()
            .is_some_and(|order| order.is_busy(channel))
        {
            // An earlier call on this channel has not finished: run after it.
            let (wait, ticket) = cx.caller.order().enter(channel);
            let raw: Option<Box<RawValue>> = params.raw().map(RawValue::to_owned);
            let handler = Arc::clone(me);
            let owned = cx.detach();
            return Ok(Reply::later(async move {
                if let Some(wait) = wait {
                    wait.await;
                }
                let cx = owned.borrow();
                let reply = match handler.run(&cx, Params(raw.as_deref()))? {
                    Reply::Later(later) => later.await,
                    now => now.into_owned(),
                };
                drop(ticket);
                reply
            }));
        }
        match self.call(cx, &parsed)? {
            Reply::Later(later) => {
                let (_, ticket) = cx.caller.order().enter(channel);
                Ok(Reply::later(async move {
                    let reply = later.await;
                    drop(ticket);
                    reply
                }))
            }
            now => Ok(now),
        }
    }

    fn run<'p>(&self, cx: &Context<'_>, params: Params<'p>) -> Result<Reply<'p>, RpcError> {
        let parsed = self.parse(params)?;
        self.call(cx, &parsed)
    }
}
