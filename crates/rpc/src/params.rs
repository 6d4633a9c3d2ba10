//! Reading a call's params, by name or by position, and validating channel names.

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::RpcError;

/// Longest channel name, in bytes.
pub const MAX_CHANNEL_LEN: usize = 255;

/// A call's params as sent: absent, an array, or an object.
#[derive(Clone, Copy, Debug)]
pub struct Params<'a>(pub Option<&'a RawValue>);

impl<'a> Params<'a> {
    pub fn raw(self) -> Option<&'a RawValue> {
        self.0
    }

    pub fn is_object(self) -> bool {
        self.0.is_some_and(|raw| raw.get().starts_with('{'))
    }

    /// Deserialises an object into `Named`, or an array into `Positional`, so a method
    /// accepts both `{"channel": "a"}` and `["a"]`.
    pub fn named_or_positional<Named, Positional>(self) -> Result<Named, RpcError>
    where
        Named: Deserialize<'a>,
        Positional: Deserialize<'a> + Into<Named>,
    {
        let Some(raw) = self.0 else {
            return Err(RpcError::invalid_params("params are required"));
        };
        let text = raw.get();
        if text.starts_with('[') {
            serde_json::from_str::<Positional>(text)
                .map(Into::into)
                .map_err(RpcError::invalid_params)
        } else {
            serde_json::from_str::<Named>(text).map_err(RpcError::invalid_params)
        }
    }
}

impl<'a> Params<'a> {
    /// Deserialises an object (absent params read as `{}`), refusing unknown fields
    /// where `T` says so.
    pub fn named<T: Deserialize<'a>>(self) -> Result<T, RpcError> {
        let text = self.0.map_or("{}", RawValue::get);
        if !text.starts_with('{') {
            return Err(RpcError::invalid_params("params must be an object"));
        }
        serde_json::from_str(text).map_err(RpcError::invalid_params)
    }
}

/// Channel names: 1 to 255 bytes of `A-Z a-z 0-9 _ - : . @ / =`.
pub fn validate_channel(channel: &str) -> Result<(), RpcError> {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"_-:.@/=".contains(&b);
    if channel.is_empty() || channel.len() > MAX_CHANNEL_LEN {
        return Err(RpcError::invalid_params(format!(
            "channel must be 1 to {MAX_CHANNEL_LEN} bytes"
        )));
    }
    if !channel.bytes().all(allowed) {
        return Err(RpcError::invalid_params(
            "channel may only contain A-Z a-z 0-9 _ - : . @ / =",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names() {
        assert!(validate_channel("items:100").is_ok());
        assert!(validate_channel("a.b@c/d=e_f-g").is_ok());
        assert!(validate_channel(&"x".repeat(255)).is_ok());
        assert!(validate_channel(&"x".repeat(256)).is_err());
        assert!(validate_channel("").is_err());
        assert!(validate_channel("has space").is_err());
        assert!(validate_channel("naïve").is_err());
        assert!(validate_channel("a*").is_err());
    }
}
