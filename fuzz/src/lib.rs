//! What the `jsonrpc_parse` fuzz target checks on every input.
//!
//! This file is also compiled, by path, into `crates/rpc/tests/parser_robustness.rs`,
//! so a plain `cargo test` runs the very same checks over the seed corpus and its
//! mutations: keep it free of anything but `std`, `chorus_rpc`, `chorus_hub`,
//! `chorus_gate` and `serde_json`.

use std::sync::{Arc, OnceLock};

use chorus_gate::{Gate, Identity, Limits};
use chorus_hub::{ClientHandle, Frame, Hub, NoEvents};
use chorus_rpc::{
    Caller, Context, Delivery, Entry, Handled, Message, NoObserver, Node, Published, Router,
    Services, Subscribed, parse_with_limit,
};
use serde_json::Value;

/// Send budget of the fuzzed client, in bytes: large enough that a batch of
/// broadcasts is rarely cut short by the slow-consumer rule (which is fine either way).
const SEND_BUDGET: usize = 1 << 20;

/// One replica whose hub is the whole cluster, as in the handler tests.
struct HubNode {
    hub: Hub,
}

impl Node for HubNode {
    fn broadcast(&self, frame: Frame) -> Delivery {
        self.hub.broadcast(&frame);
        Delivery::Cluster
    }
    fn publish(
        &self,
        channel: &str,
        data: &serde_json::value::RawValue,
        _idempotency_key: Option<&str>,
    ) -> Published {
        self.hub.publish(
            channel,
            &chorus_rpc::notification::channel_message(channel, data),
        );
        Published::Now(Delivery::Cluster)
    }
    fn subscribe(
        &self,
        client: &ClientHandle,
        channel: &str,
        _since: Option<chorus_rpc::StreamPosition>,
    ) -> Subscribed {
        self.hub.subscribe(client, channel);
        Subscribed::Cluster
    }
    fn unsubscribe(&self, client: &ClientHandle, channel: &str) -> bool {
        self.hub.unsubscribe(client, channel).removed
    }
}

fn router() -> &'static Router {
    static ROUTER: OnceLock<Router> = OnceLock::new();
    ROUTER.get_or_init(Router::with_builtin_methods)
}

/// Runs one input through the parser and the whole router against a fresh hub, and
/// panics (with the input) on any broken invariant. Non-UTF-8 input is ignored: the
/// server rejects such text frames before the parser sees them.
pub fn check(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // Publish budgets off, so that the same input always gets the same answers.
    let gate = Arc::new(Gate::with_limits(Limits {
        publish_rate: None,
        publish_bytes: None,
        publish_rate_total: None,
        publish_bytes_total: None,
        ..Limits::default()
    }));
    let owed = replies_owed(&parse_with_limit(text, gate.limits().max_batch));

    let node = Arc::new(HubNode {
        hub: Hub::new(SEND_BUDGET, Arc::new(NoEvents)),
    });
    let (client, mut outbox) = node.hub.create_client(chorus_hub::Identity::default());
    node.hub.register(&client);
    let caller = Arc::new(Caller::new(
        client,
        Identity::anonymous(),
        gate.connection(),
    ));
    let services = Arc::new(Services {
        node: node.clone(),
        gate,
        observer: Arc::new(NoObserver),
        backend: None,
    });
    let cx = Context {
        services: &services,
        caller: &caller,
    };
    let reply = match router().handle(text, &cx) {
        Handled::Nothing => None,
        Handled::Now(reply) => Some(reply),
        other => fail(
            text,
            &format!("only answers now are expected here: {other:?}"),
        ),
    };

    // Params are forwarded verbatim, so an input that is JSON only by the RFC's grammar
    // (a lone surrogate escape, which serde_json's `Value` refuses) yields output that
    // is exactly as valid: for such input only the output's syntax is checked.
    let strict = serde_json::from_str::<Value>(text).is_ok();
    match (owed, reply) {
        (Owed::Nothing, None) => {}
        (Owed::Nothing, Some(reply)) => {
            fail(text, &format!("a reply to notifications only: {reply}"))
        }
        (owed, None) => fail(text, &format!("no reply, expected {owed:?}")),
        (_, Some(reply)) if !strict => check_syntax(text, &reply),
        (Owed::One, Some(reply)) => check_response(text, &to_json(text, &reply)),
        (Owed::Batch(count), Some(reply)) => match to_json(text, &reply) {
            Value::Array(responses) if responses.len() == count => {
                for response in &responses {
                    check_response(text, response);
                }
            }
            other => fail(
                text,
                &format!("expected a batch of {count} responses, got {other}"),
            ),
        },
    }

    // Whatever a handler queued (broadcasts, publications) is sent as text frames too.
    while let Some(frame) = outbox.try_next() {
        if !strict {
            check_syntax(text, frame.as_str());
            continue;
        }
        let value = to_json(text, frame.as_str());
        if value.get("jsonrpc") != Some(&Value::from("2.0"))
            || !value.get("method").is_some_and(Value::is_string)
        {
            fail(
                text,
                &format!("queued frame is not a JSON-RPC notification: {value}"),
            );
        }
    }
}

/// What the router owes the client for a parsed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Owed {
    Nothing,
    One,
    Batch(usize),
}

fn replies_owed(message: &Message<'_>) -> Owed {
    let answered = |entry: &Entry<'_>| match entry {
        Entry::Call(call) => call.id.is_some(),
        Entry::Invalid { .. } => true,
    };
    match message {
        Message::Rejected(_) | Message::TooLong(_) => Owed::One,
        Message::Single(entry) if answered(entry) => Owed::One,
        Message::Single(_) => Owed::Nothing,
        Message::Batch(entries) => match entries.iter().filter(|entry| answered(entry)).count() {
            0 => Owed::Nothing,
            count => Owed::Batch(count),
        },
    }
}

/// JSON-RPC 2.0 section 5: `jsonrpc`, an `id`, and exactly one of `result` and
/// `error` (an integer `code` and a string `message`).
fn check_response(input: &str, response: &Value) {
    let Some(object) = response.as_object() else {
        fail(input, &format!("response is not an object: {response}"));
    };
    let well_formed = object.get("jsonrpc") == Some(&Value::from("2.0"))
        && object.contains_key("id")
        && match (object.get("result"), object.get("error")) {
            (Some(_), None) => true,
            (None, Some(error)) => {
                error.get("code").is_some_and(Value::is_i64)
                    && error.get("message").is_some_and(Value::is_string)
            }
            _ => false,
        };
    if !well_formed {
        fail(input, &format!("malformed response: {response}"));
    }
}

fn to_json(input: &str, text: &str) -> Value {
    serde_json::from_str(text)
        .unwrap_or_else(|err| fail(input, &format!("output is not valid JSON ({err}): {text}")))
}

fn check_syntax(input: &str, text: &str) {
    if let Err(err) = serde_json::from_str::<Box<serde_json::value::RawValue>>(text) {
        fail(input, &format!("output is not JSON ({err}): {text}"));
    }
}

fn fail(input: &str, what: &str) -> ! {
    panic!("{what}\ninput ({} bytes): {input:?}", input.len())
}
