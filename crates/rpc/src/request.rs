//! Parsing one inbound text message into calls, following JSON-RPC 2.0 to the letter:
//! what is a request, a notification, a batch, and which error each malformed input
//! earns.

use std::borrow::Cow;

use serde::de::IgnoredAny;
use serde::{Deserialize, Deserializer};
use serde_json::value::RawValue;

use crate::error::{ErrorCode, RpcError};

/// A well-formed request (with `id`) or notification (without).
#[derive(Debug)]
pub struct Call<'a> {
    pub method: Cow<'a, str>,
    /// An array or an object, as sent.
    pub params: Option<&'a RawValue>,
    /// `None` for a notification; otherwise a string, number or null, as sent.
    pub id: Option<&'a RawValue>,
}

/// One element of a message: a call, or why it is not one.
#[derive(Debug)]
pub enum Entry<'a> {
    Call(Call<'a>),
    /// Answered with `error`, echoing `id` when it could be read.
    Invalid {
        id: Option<&'a RawValue>,
        error: RpcError,
    },
}

/// A whole inbound text message.
#[derive(Debug)]
pub enum Message<'a> {
    Single(Entry<'a>),
    Batch(Vec<Entry<'a>>),
    /// Not JSON, or an empty batch: one error with id null.
    Rejected(RpcError),
    /// A batch of more than the limit (which it carries): reading stopped there and
    /// nothing is executed.
    TooLong(usize),
}

/// Every member kept raw, so validation decides what is wrong and ids echo unchanged.
#[derive(Deserialize)]
struct RawRequest<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    jsonrpc: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    method: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    params: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present")]
    id: Option<&'a RawValue>,
}

/// `Option<&RawValue>` would read `"id": null` as absent; a present null id is a
/// request, not a notification.
fn present<'de, D: Deserializer<'de>>(de: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(de).map(Some)
}

/// Parses a text message, with batches of any length.
pub fn parse(text: &str) -> Message<'_> {
    parse_with_limit(text, usize::MAX)
}

/// Parses a text message; a batch of more than `max_batch` elements is not read past
/// that many (`Message::TooLong`), so a long batch costs no memory per element.
pub fn parse_with_limit(text: &str, max_batch: usize) -> Message<'_> {
    if text.trim_start().starts_with('[') {
        let mut deserializer = serde_json::Deserializer::from_str(text);
        let elements = match deserializer.deserialize_seq(BoundedBatch { max: max_batch }) {
            Ok(elements) => elements,
            Err(err) if err.to_string().starts_with(TOO_LONG) => {
                return Message::TooLong(max_batch);
            }
            Err(err) => return Message::Rejected(parse_error(&err)),
        };
        if let Err(err) = deserializer.end() {
            return Message::Rejected(parse_error(&err));
        }
        return if elements.is_empty() {
            Message::Rejected(RpcError::with_detail(
                ErrorCode::InvalidRequest,
                "empty batch",
            ))
        } else {
            Message::Batch(elements.into_iter().map(parse_element).collect())
        };
    }
    match serde_json::from_str::<RawRequest<'_>>(text) {
        Ok(raw) => Message::Single(validate(raw)),
        // The input may be valid JSON of the wrong shape (a number, a string, a
        // duplicate member): that is an invalid request, not a parse error.
        Err(err) => match serde_json::from_str::<IgnoredAny>(text) {
            Ok(_) => Message::Single(Entry::Invalid {
                id: None,
                error: RpcError::with_detail(ErrorCode::InvalidRequest, err),
            }),
            Err(err) => Message::Rejected(parse_error(&err)),
        },
    }
}

/// The start of the error a [`BoundedBatch`] stops with.
const TOO_LONG: &str = "batch longer than";

/// Reads the elements of a batch as raw JSON, stopping after `max` of them.
struct BoundedBatch {
    max: usize,
}

impl<'de> serde::de::Visitor<'de> for BoundedBatch {
    type Value = Vec<&'de RawValue>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a batch of requests")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut elements = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(self.max).min(64));
        while let Some(element) = seq.next_element::<&RawValue>()? {
            if elements.len() == self.max {
                return Err(serde::de::Error::custom(format!("{TOO_LONG} {}", self.max)));
            }
            elements.push(element);
        }
        Ok(elements)
    }
}

fn parse_error(err: &serde_json::Error) -> RpcError {
    RpcError::with_detail(ErrorCode::ParseError, err)
}

fn parse_element(element: &RawValue) -> Entry<'_> {
    match serde_json::from_str::<RawRequest<'_>>(element.get()) {
        Ok(raw) => validate(raw),
        Err(err) => Entry::Invalid {
            id: None,
            error: RpcError::with_detail(ErrorCode::InvalidRequest, err),
        },
    }
}

fn validate(raw: RawRequest<'_>) -> Entry<'_> {
    let id = match raw.id {
        Some(id) if !is_valid_id(id) => {
            return invalid(None, "id must be a string, a number or null");
        }
        id => id,
    };
    if !raw.jsonrpc.is_some_and(is_version_2) {
        return invalid(id, r#"jsonrpc must be exactly "2.0""#);
    }
    let Some(method) = raw.method.and_then(as_string) else {
        return invalid(id, "method must be a string");
    };
    if raw
        .params
        .is_some_and(|params| !matches!(first_byte(params), b'[' | b'{'))
    {
        return invalid(id, "params must be an array or an object");
    }
    Entry::Call(Call {
        method,
        params: raw.params,
        id,
    })
}

fn invalid<'a>(id: Option<&'a RawValue>, detail: &str) -> Entry<'a> {
    Entry::Invalid {
        id,
        error: RpcError::with_detail(ErrorCode::InvalidRequest, detail),
    }
}

fn first_byte(value: &RawValue) -> u8 {
    value.get().as_bytes().first().copied().unwrap_or(b' ')
}

fn is_valid_id(id: &RawValue) -> bool {
    matches!(first_byte(id), b'"' | b'-' | b'0'..=b'9' | b'n')
}

fn is_version_2(version: &RawValue) -> bool {
    version.get() == r#""2.0""# || as_string(version).is_some_and(|v| v == "2.0")
}

/// A JSON string member, borrowed when it has no escapes.
fn as_string(value: &RawValue) -> Option<Cow<'_, str>> {
    if first_byte(value) != b'"' {
        return None;
    }
    match serde_json::from_str::<&str>(value.get()) {
        Ok(borrowed) => Some(Cow::Borrowed(borrowed)),
        Err(_) => serde_json::from_str::<String>(value.get())
            .ok()
            .map(Cow::Owned),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn single(text: &str) -> Entry<'_> {
        match parse(text) {
            Message::Single(entry) => entry,
            other => panic!("expected a single entry, got {other:?}"),
        }
    }

    fn error_code(entry: &Entry<'_>) -> Option<ErrorCode> {
        match entry {
            Entry::Invalid { error, .. } => Some(error.code),
            Entry::Call(_) => None,
        }
    }

    #[test]
    fn a_request_keeps_its_id_and_params_raw() {
        let Entry::Call(call) =
            single(r#"{"jsonrpc":"2.0","method":"a","params":[1, 2],"id":1.0}"#)
        else {
            panic!("expected a call")
        };
        assert_eq!(call.method, "a");
        assert_eq!(call.params.map(RawValue::get), Some("[1, 2]"));
        assert_eq!(call.id.map(RawValue::get), Some("1.0"));
    }

    #[test]
    fn null_id_is_a_request_and_missing_id_a_notification() {
        let Entry::Call(call) = single(r#"{"jsonrpc":"2.0","method":"a","id":null}"#) else {
            panic!("expected a call")
        };
        assert_eq!(call.id.map(RawValue::get), Some("null"));
        let Entry::Call(call) = single(r#"{"jsonrpc":"2.0","method":"a"}"#) else {
            panic!("expected a call")
        };
        assert!(call.id.is_none());
    }

    #[test]
    fn each_malformed_request_is_invalid() {
        for text in [
            r#"{"jsonrpc":"1.0","method":"a","id":1}"#,
            r#"{"method":"a","id":1}"#,
            r#"{"jsonrpc":"2.0","method":1,"id":1}"#,
            r#"{"jsonrpc":"2.0","id":1}"#,
            r#"{"jsonrpc":"2.0","method":"a","params":"x","id":1}"#,
            r#"{"jsonrpc":"2.0","method":"a","id":{}}"#,
            r#"{"jsonrpc":"2.0","method":"a","id":true}"#,
            r#"{"jsonrpc":"2.0","method":"a","method":"b","id":1}"#,
            "1",
            r#""text""#,
            "null",
        ] {
            assert_eq!(
                error_code(&single(text)),
                Some(ErrorCode::InvalidRequest),
                "{text}"
            );
        }
    }

    #[test]
    fn invalid_json_is_a_parse_error() {
        for text in [
            "",
            "{",
            r#"{"jsonrpc": "2.0", "method": "foobar, "params": "bar""#,
            "1 x",
            "[1,",
        ] {
            assert!(
                matches!(
                    parse(text),
                    Message::Rejected(RpcError {
                        code: ErrorCode::ParseError,
                        ..
                    })
                ),
                "{text}"
            );
        }
    }

    #[test]
    fn an_escaped_version_and_method_are_read_as_strings() {
        let Entry::Call(call) = single(r#"{"jsonrpc":"\u0032.0","method":"p\u0069ng","id":"x"}"#)
        else {
            panic!("expected a call")
        };
        assert_eq!(call.method, "ping");
    }
}
