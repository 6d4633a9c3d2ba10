//! Serialising responses straight into the outgoing buffer, echoing ids as sent.

use serde_json::value::RawValue;

use crate::context::Reply;
use crate::error::RpcError;

pub(crate) fn write_result(out: &mut String, id: &RawValue, result: &Reply<'_>) {
    out.push_str(r#"{"jsonrpc":"2.0","result":"#);
    write_value(out, result);
    out.push_str(r#","id":"#);
    out.push_str(id.get());
    out.push('}');
}

fn write_value(out: &mut String, result: &Reply<'_>) {
    match result {
        Reply::Raw(raw) => out.push_str(raw.get()),
        Reply::Static(text) => out.push_str(text),
        Reply::Json(value) => out.push_str(&value.to_string()),
        Reply::Text(text) => out.push_str(text),
        Reply::Then(reply, _) => write_value(out, reply),
        // Resolved before a response is written; `null` keeps the text valid JSON.
        Reply::Later(_) => out.push_str("null"),
    }
}

pub(crate) fn write_error(out: &mut String, id: Option<&RawValue>, error: &RpcError) {
    out.push_str(r#"{"jsonrpc":"2.0","error":{"code":"#);
    out.push_str(&error.code.code().to_string());
    out.push_str(r#","message":"#);
    out.push_str(&serde_json::Value::from(error.message.as_str()).to_string());
    if let Some(data) = &error.data {
        out.push_str(r#","data":"#);
        out.push_str(&data.to_string());
    }
    out.push_str(r#"},"id":"#);
    out.push_str(id.map_or("null", RawValue::get));
    out.push('}');
}
