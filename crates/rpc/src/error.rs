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
