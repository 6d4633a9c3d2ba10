//! The router's one guard point: every right and limit a call is subject to, checked
//! after its params are read and before its handler runs. The server API may use
//! every channel and no budget counts its calls; only the size cap applies to it.

use crate::context::Context;
use crate::error::RpcError;
use crate::method::Access;

pub(crate) fn check(cx: &Context<'_>, access: Access<'_>) -> Result<(), RpcError> {
    let gate = &cx.services.gate;
    let refused = |refusal: chorus_gate::Refusal, channel: Option<&str>| {
        if let Some(scope) = refusal.scope() {
            cx.services.observer.rate_limited(scope);
        }
        RpcError::refused(&refusal, channel)
    };
    if cx.caller.is_api() {
        return match access {
            Access::Publish { channel, bytes } => gate
                .admit_api_publication(bytes)
                .map_err(|refusal| refused(refusal, Some(channel))),
            Access::Broadcast { bytes } | Access::Direct { bytes } => gate
                .admit_api_publication(bytes)
                .map_err(|refusal| refused(refusal, None)),
            Access::None | Access::Subscribe(_) | Access::Unsubscribe(_) | Access::Read(_) => {
                Ok(())
            }
        };
    }
    let limits = cx
        .caller
        .limits()
        .ok_or_else(|| RpcError::new(crate::ErrorCode::Internal))?;
    match access {
        Access::None | Access::Unsubscribe(_) => Ok(()),
        Access::Subscribe(channel) => {
            let client = cx.client()?;
            if client.is_subscribed(channel) {
                return Ok(());
            }
            gate.admit_subscription(&cx.caller.identity(), channel, client.subscription_count())
                .map_err(|refusal| refused(refusal, Some(channel)))
        }
        Access::Read(channel) => gate
            .admit_read(&cx.caller.identity(), channel)
            .map_err(|refusal| refused(refusal, Some(channel))),
        Access::Publish { channel, bytes } => gate
            .admit_publish(&cx.caller.identity(), limits, channel, bytes)
            .map_err(|refusal| refused(refusal, Some(channel))),
        Access::Broadcast { bytes } => gate
            .admit_broadcast(limits, bytes)
            .map_err(|refusal| refused(refusal, None)),
        // Sending to users is the server API's alone.
        Access::Direct { .. } => Err(RpcError::new(crate::ErrorCode::Forbidden)),
    }
}
