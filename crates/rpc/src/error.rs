//! Every error a client can receive, and its JSON-RPC code, in one place.

use serde_json::Value;

/// The JSON-RPC error codes Chorus answers with (section 2 of the contract).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    ParseError,
    InvalidRequest,
    MethodNotFound,
    InvalidParams,
    Internal,
    Unauthorized,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    RateLimited,
    Unavailable,
    /// A code the application's backend chose (relayed by the rpc proxy).
    Backend(i32),
}

impl ErrorCode {
    pub const fn code(self) -> i32 {
        match self {
            Self::ParseError => -32700,
            Self::InvalidRequest => -32600,
            Self::MethodNotFound => -32601,
            Self::InvalidParams => -32602,
            Self::Internal => -32603,
            Self::Unauthorized => -32001,
            Self::Forbidden => -32003,
            Self::NotFound => -32004,
            Self::PayloadTooLarge => -32013,
            Self::RateLimited => -32029,
            Self::Unavailable => -32053,
            Self::Backend(code) => code,
        }
    }

    pub const fn message(self) -> &'static str {
        match self {
            Self::ParseError => "Parse error",
            Self::InvalidRequest => "Invalid Request",
            Self::MethodNotFound => "Method not found",
            Self::InvalidParams => "Invalid params",
            Self::Internal => "Internal error",
            Self::Unauthorized => "Unauthorized",
            Self::Forbidden => "Forbidden",
            Self::NotFound => "Not found",
            Self::PayloadTooLarge => "Payload too large",
            Self::RateLimited => "Rate limited",
            Self::Unavailable => "Unavailable",
            Self::Backend(_) => "Server error",
        }
    }
}

/// An error reply: a code, a human message, and optional structured data.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
#[error("{message} ({})", code.code())]
pub struct RpcError {
    pub code: ErrorCode,
    pub message: String,
    pub data: Option<Value>,
}

impl RpcError {
    pub fn new(code: ErrorCode) -> Self {
        Self {
            code,
            message: code.message().to_owned(),
            data: None,
        }
    }

    /// An error whose message says more than the standard text.
    pub fn with_detail(code: ErrorCode, detail: impl std::fmt::Display) -> Self {
        Self {
            code,
            message: format!("{}: {detail}", code.message()),
            data: None,
        }
    }

    pub fn data(mut self, data: Value) -> Self {
        self.data = Some(data);
        self
    }

    pub fn invalid_params(detail: impl std::fmt::Display) -> Self {
        Self::with_detail(ErrorCode::InvalidParams, detail)
    }
}

impl RpcError {
    /// `-32013` for a reply that would not fit the caller's send budget.
    pub fn reply_too_large(limit: usize) -> Self {
        Self::with_detail(
            ErrorCode::PayloadTooLarge,
            "reply larger than the send buffer",
        )
        .data(serde_json::json!({ "limit": limit }))
    }

    /// `-32053` after a delivery that reached this replica's clients only.
    pub fn delivered_locally() -> Self {
        Self::with_detail(ErrorCode::Unavailable, "cluster backbone is down")
            .data(serde_json::json!({"delivered": "local"}))
    }

    /// `-32053` for a subscription that works on this replica only, for now.
    pub fn subscribed_locally() -> Self {
        Self::with_detail(
            ErrorCode::Unavailable,
            "cluster backbone is down: subscribed on this replica; other replicas' publications follow once it is back",
        )
        .data(serde_json::json!({"subscribed": "local"}))
    }

    /// The wire form of a gate refusal. `channel` names the channel the call was for.
    pub fn refused(refusal: &chorus_gate::Refusal, channel: Option<&str>) -> Self {
        use chorus_gate::Refusal;
        match refusal {
            Refusal::RateLimited { retry_after, .. } => {
                // Round up: retrying after a rounded-down wait would be refused again.
                let millis = retry_after.as_micros().div_ceil(1000);
                Self::new(ErrorCode::RateLimited)
                    .data(serde_json::json!({ "retry_after_ms": u64::try_from(millis).unwrap_or(u64::MAX) }))
            }
            Refusal::PayloadTooLarge { limit } => {
                Self::with_detail(ErrorCode::PayloadTooLarge, "data larger than the publish limit")
                    .data(serde_json::json!({ "limit": limit }))
            }
            Refusal::SubscriptionLimit { limit } => {
                Self::with_detail(ErrorCode::Forbidden, "subscription limit reached")
                    .data(serde_json::json!({ "channel": channel, "reason": "subscription limit", "limit": limit }))
            }
            Refusal::TooManyConnections { limit } | Refusal::TooManyUserConnections { limit } => {
                Self::with_detail(ErrorCode::RateLimited, "too many connections")
                    .data(serde_json::json!({ "limit": limit }))
            }
            Refusal::Forbidden { reason } => {
                let mut data = serde_json::Map::new();
                if let Some(channel) = channel {
                    data.insert("channel".into(), channel.into());
                }
                if let Some(reason) = reason {
                    data.insert("reason".into(), (*reason).into());
                }
                let detail = match (reason, channel) {
                    (Some(reason), _) => (*reason).to_owned(),
                    (None, Some(_)) => "the token does not grant this channel".to_owned(),
                    (None, None) => "not allowed".to_owned(),
                };
                Self::with_detail(ErrorCode::Forbidden, detail).data(data.into())
            }
        }
    }

    /// `-32001` for a token that did not verify.
    pub fn unauthorized(error: &chorus_gate::AuthError) -> Self {
        Self::with_detail(ErrorCode::Unauthorized, error)
            .data(serde_json::json!({ "reason": error.reason() }))
    }

    /// `-32004` for presence on a channel whose namespace does not track it.
    pub fn presence_not_enabled(channel: &str) -> Self {
        Self::with_detail(ErrorCode::NotFound, "presence not enabled for this channel")
            .data(serde_json::json!({ "channel": channel, "reason": "presence not enabled" }))
    }

    /// `-32004` for history on a channel whose namespace keeps none.
    pub fn history_not_enabled(channel: &str) -> Self {
        Self::with_detail(ErrorCode::NotFound, "history not enabled for this channel")
            .data(serde_json::json!({ "channel": channel, "reason": "history not enabled" }))
    }

    /// `-32053` when the history store cannot take a publication: nothing was
    /// delivered.
    pub fn history_unavailable(why: impl std::fmt::Display) -> Self {
        Self::with_detail(
            ErrorCode::Unavailable,
            format!("history store unavailable: {why}"),
        )
        .data(serde_json::json!({ "delivered": "none" }))
    }

    /// `-32053` when the presence store cannot answer.
    pub fn presence_unavailable(why: impl std::fmt::Display) -> Self {
        Self::with_detail(
            ErrorCode::Unavailable,
            format!("presence store unavailable: {why}"),
        )
        .data(serde_json::json!({ "reason": "presence unavailable" }))
    }

    /// `-32053` when the backend of `proxy` did not answer as it should (down, slow,
    /// a status other than 200, not the expected JSON).
    pub fn proxy_failed(proxy: &str, why: impl std::fmt::Display) -> Self {
        Self::with_detail(ErrorCode::Unavailable, format!("{proxy} proxy: {why}"))
            .data(serde_json::json!({ "proxy": proxy }))
    }

    /// `-32053` when `proxy` has as many requests in flight as it may.
    pub fn proxy_busy(proxy: &str) -> Self {
        Self::with_detail(ErrorCode::Unavailable, format!("{proxy} proxy busy"))
            .data(serde_json::json!({ "proxy": proxy, "reason": "busy" }))
    }

    /// `-32003` for a call the backend refused.
    pub fn proxy_refused(channel: &str, reason: &str) -> Self {
        Self::with_detail(ErrorCode::Forbidden, reason)
            .data(serde_json::json!({ "channel": channel, "reason": reason }))
    }

    /// `-32600` for a batch longer than the limit: nothing in it was executed.
    pub fn batch_too_long(limit: usize) -> Self {
        Self::with_detail(ErrorCode::InvalidRequest, "batch too long")
            .data(serde_json::json!({ "limit": limit }))
    }
}
