//! Handler behaviour against a real hub, through the router.

use std::sync::Arc;

use chorus_hub::{ClientHandle, Frame, Hub, Identity, NoEvents, Outbox};
use serde_json::{Value, json};

use crate::{Context, Delivery, NoObserver, Node, Router};

/// A single node: the hub is the whole cluster, unless `backbone_down`.
struct HubNode {
    hub: Hub,
    backbone_down: bool,
}

impl HubNode {
    fn delivery(&self) -> Delivery {
        if self.backbone_down {
            Delivery::LocalOnly
        } else {
            Delivery::Cluster
        }
    }
}

impl Node for HubNode {
    fn broadcast(&self, frame: Frame) -> Delivery {
        self.hub.broadcast(&frame);
        self.delivery()
    }
    fn publish(&self, channel: &str, frame: Frame) -> Delivery {
        self.hub.publish(channel, &frame);
        self.delivery()
    }
    fn subscribe(&self, client: &ClientHandle, channel: &str) -> bool {
        self.hub.subscribe(client, channel).added
    }
    fn unsubscribe(&self, client: &ClientHandle, channel: &str) -> bool {
        self.hub.unsubscribe(client, channel).removed
    }
}

struct Setup {
    node: HubNode,
    router: Router,
}

impl Setup {
    fn new(backbone_down: bool) -> Self {
        Self {
            node: HubNode {
                hub: Hub::new(16, Arc::new(NoEvents)),
                backbone_down,
            },
            router: Router::with_builtin_methods(),
        }
    }

    fn client(&self) -> (ClientHandle, Outbox) {
        let (client, outbox) = self.node.hub.create_client(Identity::default());
        self.node.hub.register(&client);
        (client, outbox)
    }

    fn call(&self, client: &ClientHandle, request: Value) -> Value {
        let cx = Context {
            client,
            node: &self.node,
        };
        let reply = self
            .router
            .handle(&request.to_string(), &cx, &NoObserver)
            .expect("a request gets a reply");
        serde_json::from_str(&reply).expect("reply is JSON")
    }
}

fn request(method: &str, params: Value) -> Value {
    json!({"jsonrpc": "2.0", "method": method, "params": params, "id": 7})
}

fn next_json(outbox: &mut Outbox) -> Option<Value> {
    outbox
        .try_next()
        .map(|frame| serde_json::from_str(frame.as_str()).expect("frame is JSON"))
}

#[test]
fn self_reply_echoes_params_and_ping_pongs() {
    let setup = Setup::new(false);
    let (client, _outbox) = setup.client();
    let params = json!({"a": [1, {"b": null}]});
    assert_eq!(
        setup.call(&client, request("self.reply", params.clone()))["result"],
        params
    );
    assert_eq!(
        setup.call(
            &client,
            json!({"jsonrpc": "2.0", "method": "ping", "id": 1})
        )["result"],
        "pong"
    );
}

#[test]
fn broadcast_reaches_everyone_including_the_caller() {
    let setup = Setup::new(false);
    let (caller, mut caller_out) = setup.client();
    let (_other, mut other_out) = setup.client();
    let reply = setup.call(&caller, request("broadcast", json!({"text": "hi"})));
    assert_eq!(reply["result"], json!({"status": "broadcasted"}));
    let expected = json!({"jsonrpc": "2.0", "method": "broadcast", "params": {"text": "hi"}});
    assert_eq!(next_json(&mut caller_out), Some(expected.clone()));
    assert_eq!(next_json(&mut other_out), Some(expected));
}

#[test]
fn broadcast_needs_an_object() {
    let setup = Setup::new(false);
    let (client, _outbox) = setup.client();
    assert_eq!(
        setup.call(&client, request("broadcast", json!([1])))["error"]["code"],
        -32602
    );
}

#[test]
fn subscribe_publish_unsubscribe() {
    let setup = Setup::new(false);
    let (subscriber, mut sub_out) = setup.client();
    let (publisher, mut pub_out) = setup.client();
    assert_eq!(
        setup.call(
            &subscriber,
            request("subscribe", json!({"channel": "items:42"}))
        )["result"],
        json!({"channel": "items:42"})
    );
    let reply = setup.call(
        &publisher,
        request("publish", json!({"channel": "items:42", "data": {"v": 1}})),
    );
    assert_eq!(reply["result"], json!({"channel": "items:42"}));
    assert_eq!(
        next_json(&mut sub_out),
        Some(json!({"jsonrpc": "2.0", "method": "message",
            "params": {"channel": "items:42", "data": {"v": 1}}}))
    );
    assert_eq!(
        next_json(&mut pub_out),
        None,
        "the publisher is not subscribed"
    );

    assert_eq!(
        setup.call(&subscriber, request("unsubscribe", json!(["items:42"])))["result"],
        json!({"channel": "items:42"})
    );
    setup.call(&publisher, request("publish", json!(["items:42", 2])));
    assert_eq!(next_json(&mut sub_out), None);
    let again = setup.call(
        &subscriber,
        request("unsubscribe", json!({"channel": "items:42"})),
    );
    assert_eq!(again["error"]["code"], -32004);
    assert_eq!(again["error"]["data"], json!({"channel": "items:42"}));
}

#[test]
fn bad_channel_params_are_invalid_params() {
    let setup = Setup::new(false);
    let (client, _outbox) = setup.client();
    for params in [
        json!({"channel": ""}),
        json!({"channel": "a b"}),
        json!({"channel": 5}),
        json!({}),
        json!([]),
        json!(["a", "b"]),
    ] {
        assert_eq!(
            setup.call(&client, request("subscribe", params.clone()))["error"]["code"],
            -32602,
            "{params}"
        );
    }
    assert_eq!(
        setup.call(&client, request("publish", json!({"channel": "a"})))["error"]["code"],
        -32602,
        "publish without data"
    );
    assert_eq!(
        setup.call(
            &client,
            json!({"jsonrpc": "2.0", "method": "subscribe", "id": 1})
        )["error"]["code"],
        -32602,
        "subscribe without params"
    );
}

#[test]
fn a_down_backbone_is_reported_after_local_delivery() {
    let setup = Setup::new(true);
    let (client, mut outbox) = setup.client();
    let reply = setup.call(&client, request("broadcast", json!({"x": 1})));
    assert_eq!(reply["error"]["code"], -32053);
    assert_eq!(reply["error"]["data"], json!({"delivered": "local"}));
    assert!(next_json(&mut outbox).is_some(), "delivered locally");
    let reply = setup.call(
        &client,
        request("publish", json!({"channel": "c", "data": 1})),
    );
    assert_eq!(reply["error"]["data"], json!({"delivered": "local"}));
}
