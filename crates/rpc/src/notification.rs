//! Server-to-client notifications, serialised once so that one buffer serves every
//! recipient.

use std::fmt::Write as _;

use chorus_hub::Frame;
use serde_json::value::RawValue;

/// `{"jsonrpc":"2.0","method":<method>,"params":<params>}` with `params` already JSON.
/// `method` must need no JSON escaping (every method Chorus sends is a plain name).
pub fn raw(method: &str, params: &str) -> Frame {
    let mut out = String::with_capacity(40 + method.len() + params.len());
    out.push_str(r#"{"jsonrpc":"2.0","method":""#);
    out.push_str(method);
    out.push_str(r#"","params":"#);
    out.push_str(params);
    out.push('}');
    Frame::from(out)
}

/// A notification whose params are serialised from a value.
pub fn value(method: &str, params: &impl serde::Serialize) -> Frame {
    match serde_json::to_string(params) {
        Ok(params) => raw(method, &params),
        // Serialising our own plain structs cannot fail; send an empty object rather
        // than nothing if it ever does.
        Err(_) => raw(method, "{}"),
    }
}

/// The `message` notification for a channel publication.
pub fn channel_message(channel: &str, data: &RawValue) -> Frame {
    let mut params = String::with_capacity(24 + channel.len() + data.get().len());
    params.push_str(r#"{"channel":"#);
    // Channel names are validated to a charset that never needs escaping, but
    // serialise properly anyway: this is cheap and keeps the frame valid JSON.
    let _ = write!(params, "{}", serde_json::Value::from(channel));
    params.push_str(r#","data":"#);
    params.push_str(data.get());
    params.push('}');
    raw("message", &params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_message_is_valid_json() {
        let data = RawValue::from_string(r#"{"x": [1, 2]}"#.into()).expect("valid JSON");
        let frame = channel_message("items:42", &data);
        let parsed: serde_json::Value = serde_json::from_str(frame.as_str()).expect("JSON");
        assert_eq!(
            parsed,
            serde_json::json!({"jsonrpc": "2.0", "method": "message",
                "params": {"channel": "items:42", "data": {"x": [1, 2]}}})
        );
    }
}
