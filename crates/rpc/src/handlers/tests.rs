//! Handler behaviour against a real hub, through the router and its guard.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chorus_gate::{
    AuthConfig, Gate, GateConfig, Grants, Identity, JwtConfig, Limits, NamespaceOptions,
    Namespaces, Pattern, Rate, RequestRate, TokenClaims, mint_hs256,
};
use chorus_hub::{ClientHandle, Frame, Hub, NoEvents, Outbox};
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::{
    Caller, Context, Delivery, Handled, NoObserver, Node, Published, Router, Services, Subscribed,
};

/// How the test node answers a subscription.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Backbone {
    Up,
    Down,
    /// Subscriptions wait until the test confirms them.
    Slow,
}

/// A single node: the hub is the whole cluster.
struct HubNode {
    hub: Hub,
    backbone: Backbone,
    confirmations: Mutex<Vec<oneshot::Sender<bool>>>,
}

impl HubNode {
    fn delivery(&self) -> Delivery {
        if self.backbone == Backbone::Down {
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
    fn publish(
        &self,
        channel: &str,
        data: &serde_json::value::RawValue,
        _idempotency_key: Option<&str>,
    ) -> Published {
        self.hub.publish(
            channel,
            &crate::notification::channel_message(channel, data),
        );
        Published::Now(self.delivery())
    }
    fn subscribe(
        &self,
        client: &ClientHandle,
        channel: &str,
        _since: Option<crate::StreamPosition>,
    ) -> Subscribed {
        self.hub.subscribe(client, channel);
        match self.backbone {
            Backbone::Up => Subscribed::Cluster,
            Backbone::Down => Subscribed::LocalOnly,
            Backbone::Slow => {
                let (confirm, confirmed) = oneshot::channel();
                self.confirmations
                    .lock()
                    .expect("not poisoned")
                    .push(confirm);
                Subscribed::Pending(Box::pin(async move { confirmed.await.unwrap_or(false) }))
            }
        }
    }
    fn unsubscribe(&self, client: &ClientHandle, channel: &str) -> bool {
        self.hub.unsubscribe(client, channel).removed
    }
}

/// Limits that never get in the way unless a test sets them.
fn open_limits() -> Limits {
    Limits {
        publish_rate: None,
        publish_bytes: None,
        publish_rate_total: None,
        publish_bytes_total: None,
        ..Limits::default()
    }
}

struct Setup {
    node: Arc<HubNode>,
    services: Arc<Services>,
    router: Router,
}

impl Setup {
    fn new(backbone: Backbone) -> Self {
        Self::with(backbone, open_limits(), 1 << 20)
    }

    fn with(backbone: Backbone, limits: Limits, send_budget: usize) -> Self {
        Self::with_gate(
            backbone,
            GateConfig {
                limits,
                ..GateConfig::default()
            },
            send_budget,
        )
    }

    fn with_gate(backbone: Backbone, gate: GateConfig, send_budget: usize) -> Self {
        let node = Arc::new(HubNode {
            hub: Hub::new(send_budget, Arc::new(NoEvents)),
            backbone,
            confirmations: Mutex::default(),
        });
        let services = Arc::new(Services {
            node: node.clone(),
            gate: Arc::new(Gate::new(gate)),
            observer: Arc::new(NoObserver),
            backend: None,
        });
        Self {
            node,
            services,
            router: Router::with_builtin_methods(),
        }
    }

    fn client(&self) -> (Arc<Caller>, Outbox) {
        self.client_as(Identity::anonymous())
    }

    fn client_as(&self, identity: Identity) -> (Arc<Caller>, Outbox) {
        let (client, outbox) = self.node.hub.create_client(chorus_hub::Identity {
            user: identity.user.clone(),
            device: identity.device.clone(),
        });
        self.node.hub.register(&client);
        let caller = Arc::new(Caller::new(
            client,
            identity,
            self.services.gate.connection(),
        ));
        (caller, outbox)
    }

    fn handle(&self, caller: &Arc<Caller>, text: &str) -> Handled {
        let cx = Context {
            services: &self.services,
            caller,
        };
        self.router.handle(text, &cx)
    }

    /// A message answered now.
    fn send(&self, caller: &Arc<Caller>, message: &Value) -> Value {
        match self.handle(caller, &message.to_string()) {
            Handled::Now(reply) => serde_json::from_str(&reply).expect("reply is JSON"),
            other => panic!("expected a reply now, got {other:?}"),
        }
    }

    fn call(&self, caller: &Arc<Caller>, request: Value) -> Value {
        self.send(caller, &request)
    }

    fn confirm_subscriptions(&self, held: bool) {
        for confirm in self
            .node
            .confirmations
            .lock()
            .expect("not poisoned")
            .drain(..)
        {
            let _ = confirm.send(held);
        }
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

async fn later(handled: Handled) -> Value {
    match handled {
        Handled::Later { reply, .. } => {
            let text = tokio::time::timeout(Duration::from_secs(5), reply)
                .await
                .expect("resolves")
                .text
                .expect("a reply is owed");
            serde_json::from_str(&text).expect("reply is JSON")
        }
        other => panic!("expected a deferred reply, got {other:?}"),
    }
}

#[test]
fn self_reply_echoes_params_and_ping_pongs() {
    let setup = Setup::new(Backbone::Up);
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
    let setup = Setup::new(Backbone::Up);
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
    let setup = Setup::new(Backbone::Up);
    let (client, _outbox) = setup.client();
    assert_eq!(
        setup.call(&client, request("broadcast", json!([1])))["error"]["code"],
        -32602
    );
}

#[test]
fn subscribe_publish_unsubscribe() {
    let setup = Setup::new(Backbone::Up);
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
    let setup = Setup::new(Backbone::Up);
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
    let setup = Setup::new(Backbone::Down);
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
    let reply = setup.call(&client, request("subscribe", json!({"channel": "c"})));
    assert_eq!(reply["error"]["code"], -32053);
    assert_eq!(reply["error"]["data"], json!({"subscribed": "local"}));
    assert!(
        client.client().expect("a client").is_subscribed("c"),
        "the subscription is kept"
    );
}

#[tokio::test]
async fn subscribe_answers_once_the_backbone_holds_the_channel() {
    let setup = Setup::new(Backbone::Slow);
    let (client, _outbox) = setup.client();
    let pending = setup.handle(
        &client,
        &request("subscribe", json!({"channel": "c"})).to_string(),
    );
    assert!(matches!(pending, Handled::Later { calls: 1, .. }));
    // Other calls of the same client are answered meanwhile.
    assert_eq!(
        setup.call(
            &client,
            json!({"jsonrpc": "2.0", "method": "ping", "id": 2})
        )["result"],
        "pong"
    );
    setup.confirm_subscriptions(true);
    assert_eq!(later(pending).await["result"], json!({"channel": "c"}));

    let pending = setup.handle(
        &client,
        &request("subscribe", json!({"channel": "d"})).to_string(),
    );
    setup.confirm_subscriptions(false);
    assert_eq!(
        later(pending).await["error"]["data"],
        json!({"subscribed": "local"})
    );
}

#[tokio::test]
async fn a_call_behind_a_pending_subscribe_of_its_channel_waits_for_it() {
    let setup = Setup::new(Backbone::Slow);
    let (client, mut outbox) = setup.client();
    let subscribe = setup.handle(
        &client,
        &request("subscribe", json!({"channel": "c"})).to_string(),
    );
    let publish = setup.handle(
        &client,
        &json!({"jsonrpc": "2.0", "method": "publish", "params": {"channel": "c", "data": 1}, "id": 8})
            .to_string(),
    );
    let Handled::Later { reply: publish, .. } = publish else {
        panic!("the publish waits for the subscribe");
    };
    // Another channel does not wait.
    let other = setup.call(
        &client,
        request("publish", json!({"channel": "other", "data": 1})),
    );
    assert_eq!(other["result"], json!({"channel": "other"}));
    let publish = tokio::spawn(publish);
    tokio::task::yield_now().await;
    assert!(!publish.is_finished(), "still waiting");
    assert!(next_json(&mut outbox).is_none(), "not published yet");
    setup.confirm_subscriptions(true);
    assert_eq!(later(subscribe).await["result"], json!({"channel": "c"}));
    let reply: Value =
        serde_json::from_str(&publish.await.expect("joins").text.expect("owed")).expect("JSON");
    assert_eq!(
        reply,
        json!({"jsonrpc": "2.0", "result": {"channel": "c"}, "id": 8})
    );
    assert_eq!(
        next_json(&mut outbox).expect("delivered")["params"]["data"],
        1
    );
}

#[tokio::test]
async fn a_batch_with_a_deferred_call_answers_all_together() {
    let setup = Setup::new(Backbone::Slow);
    let (client, _outbox) = setup.client();
    let batch = json!([
        {"jsonrpc": "2.0", "method": "subscribe", "params": ["c"], "id": 1},
        {"jsonrpc": "2.0", "method": "ping", "id": 2},
        {"jsonrpc": "2.0", "method": "ping"},
    ]);
    let handled = setup.handle(&client, &batch.to_string());
    setup.confirm_subscriptions(true);
    let Value::Array(responses) = later(handled).await else {
        panic!("a batch reply is an array");
    };
    let mut ids: Vec<i64> = responses
        .iter()
        .map(|response| response["id"].as_i64().expect("id"))
        .collect();
    ids.sort_unstable();
    assert_eq!(ids, [1, 2]);
}

#[test]
fn a_batch_over_the_limit_is_one_error_and_runs_nothing() {
    let setup = Setup::new(Backbone::Up);
    let (client, mut outbox) = setup.client();
    let batch: Vec<Value> = (0..101)
        .map(|id| json!({"jsonrpc": "2.0", "method": "broadcast", "params": {}, "id": id}))
        .collect();
    let reply = setup.send(&client, &Value::from(batch));
    assert_eq!(reply["error"]["code"], -32600, "{reply}");
    assert_eq!(reply["error"]["data"], json!({"limit": 100}));
    assert_eq!(reply["id"], Value::Null);
    assert!(outbox.try_next().is_none(), "nothing was executed");
    // The `[1,1,1,...]` amplifier: one small error, whatever the input's size.
    let ones = format!("[{}1]", "1,".repeat(500_000));
    let Handled::Now(reply) = setup.handle(&client, &ones) else {
        panic!("answered now");
    };
    assert!(reply.len() < 200, "{reply}");
}

#[test]
fn a_reply_past_the_send_budget_ends_the_batch_with_32013() {
    let setup = Setup::with(Backbone::Up, open_limits(), 4096);
    let (client, mut outbox) = setup.client();
    let big = "x".repeat(1500);
    let batch: Vec<Value> = (0..5)
        .map(|id| json!({"jsonrpc": "2.0", "method": "self.reply", "params": [big], "id": id}))
        .chain([json!({"jsonrpc": "2.0", "method": "broadcast", "params": {}, "id": 9})])
        .collect();
    let Value::Array(responses) = setup.send(&client, &Value::from(batch)) else {
        panic!("a batch reply is an array");
    };
    assert_eq!(responses.len(), 6);
    let codes: Vec<Value> = responses
        .iter()
        .map(|response| response["error"]["code"].clone())
        .collect();
    assert_eq!(
        codes,
        [
            Value::Null,
            Value::Null,
            json!(-32013),
            json!(-32013),
            json!(-32013),
            json!(-32013)
        ]
    );
    assert_eq!(responses[2]["error"]["data"], json!({"limit": 4096}));
    assert_eq!(responses[5]["id"], 9);
    assert!(
        outbox.try_next().is_none(),
        "the broadcast after the cut never ran"
    );
    // A single reply larger than the budget.
    let huge = setup.call(&client, request("self.reply", json!(["y".repeat(5000)])));
    assert_eq!(huge["error"]["code"], -32013);
    assert_eq!(huge["id"], 7);
}

#[test]
fn the_request_budget_refuses_each_element_over_it() {
    let limits = Limits {
        requests: Some(RequestRate {
            rate: 1,
            interval: Duration::from_secs(60),
            burst: 2,
        }),
        ..open_limits()
    };
    let setup = Setup::with(Backbone::Up, limits, 1 << 20);
    let (client, _outbox) = setup.client();
    let batch: Vec<Value> = (0..4)
        .map(|id| json!({"jsonrpc": "2.0", "method": "ping", "id": id}))
        .collect();
    let Value::Array(responses) = setup.send(&client, &Value::from(batch)) else {
        panic!("a batch reply is an array");
    };
    assert_eq!(responses[0]["result"], "pong");
    assert_eq!(responses[1]["result"], "pong");
    for refused in &responses[2..] {
        assert_eq!(refused["error"]["code"], -32029);
        let wait = refused["error"]["data"]["retry_after_ms"]
            .as_u64()
            .expect("retry_after_ms");
        assert!(wait > 50_000 && wait <= 60_000, "{wait}");
    }
}

#[test]
fn a_flood_closes_the_connection() {
    let limits = Limits {
        requests: Some(RequestRate {
            rate: 1,
            interval: Duration::from_secs(1),
            burst: 1,
        }),
        ..open_limits()
    };
    let setup = Setup::with(Backbone::Up, limits, 1 << 20);
    let (client, _outbox) = setup.client();
    let ping = json!({"jsonrpc": "2.0", "method": "ping"}).to_string();
    let started = std::time::Instant::now();
    loop {
        if let Handled::Flooding = setup.handle(&client, &ping) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "never closed");
        std::thread::sleep(Duration::from_millis(10));
    }
    let flooded_for = started.elapsed();
    assert!(flooded_for >= Duration::from_secs(2), "{flooded_for:?}");
}

#[test]
fn publish_size_and_budgets_are_guarded() {
    let limits = Limits {
        max_publish_size: 16,
        publish_rate: Some(Rate::per_second(1, 1)),
        ..open_limits()
    };
    let setup = Setup::with(Backbone::Up, limits, 1 << 20);
    let (client, mut outbox) = setup.client();
    let too_big = setup.call(
        &client,
        request("publish", json!({"channel": "c", "data": "x".repeat(20)})),
    );
    assert_eq!(too_big["error"]["code"], -32013);
    assert_eq!(too_big["error"]["data"], json!({"limit": 16}));
    let too_big = setup.call(&client, request("broadcast", json!({"x": "y".repeat(20)})));
    assert_eq!(too_big["error"]["code"], -32013);
    assert_eq!(
        setup.call(&client, request("broadcast", json!({"x": 1})))["result"],
        json!({"status": "broadcasted"})
    );
    let limited = setup.call(
        &client,
        request("publish", json!({"channel": "c", "data": 1})),
    );
    assert_eq!(limited["error"]["code"], -32029);
    assert!(
        limited["error"]["data"]["retry_after_ms"]
            .as_u64()
            .is_some()
    );
    assert!(next_json(&mut outbox).is_some(), "the broadcast");
    assert!(next_json(&mut outbox).is_none(), "nothing else went out");
}

#[test]
fn subscriptions_stop_at_the_limit() {
    let limits = Limits {
        max_subscriptions: 2,
        ..open_limits()
    };
    let setup = Setup::with(Backbone::Up, limits, 1 << 20);
    let (client, _outbox) = setup.client();
    for channel in ["a", "b", "a"] {
        let reply = setup.call(&client, request("subscribe", json!({"channel": channel})));
        assert!(reply.get("error").is_none(), "{reply}");
    }
    let refused = setup.call(&client, request("subscribe", json!({"channel": "c"})));
    assert_eq!(refused["error"]["code"], -32003);
    assert_eq!(
        refused["error"]["data"],
        json!({"channel": "c", "reason": "subscription limit", "limit": 2})
    );
}

#[test]
fn deeply_nested_input_is_an_error_not_a_crash() {
    let setup = Setup::new(Backbone::Up);
    let (client, _outbox) = setup.client();
    for text in [
        "[".repeat(100_000),
        format!("{}{}", "[".repeat(100_000), "]".repeat(100_000)),
        format!(
            r#"{{"jsonrpc":"2.0","method":"self.reply","params":{}1{},"id":1}}"#,
            "[".repeat(100_000),
            "]".repeat(100_000)
        ),
        format!(
            r#"[{{"jsonrpc":"2.0","method":"ping","params":{}"#,
            "{\"a\":".repeat(100_000)
        ),
    ] {
        let reply = match setup.handle(&client, &text) {
            Handled::Now(reply) => reply,
            other => panic!("expected an answer, got {other:?}"),
        };
        // Raw JSON: reading it as a `Value` would hit serde_json's own depth limit.
        serde_json::from_str::<Box<serde_json::value::RawValue>>(&reply).expect("valid JSON");
        let response = reply.strip_prefix('[').unwrap_or(&reply);
        assert!(
            response.starts_with(r#"{"jsonrpc":"2.0","#),
            "{}",
            &reply[..80]
        );
    }
}

fn granted(channels: &[&str], subscribe: &[&str], publish: &[&str]) -> Identity {
    let parse = |list: &[&str]| -> Vec<Pattern> {
        list.iter()
            .map(|text| Pattern::parse(text).expect("a pattern"))
            .collect()
    };
    Identity {
        user: Some(Arc::from("alice")),
        grants: Grants {
            channels: parse(channels),
            subscribe: parse(subscribe),
            publish: parse(publish),
            present: true,
        },
        ..Identity::default()
    }
}

#[test]
fn grants_decide_subscribe_and_publish() {
    let setup = Setup::new(Backbone::Up);
    let (client, _outbox) = setup.client_as(granted(&["items:*"], &["news"], &["inbox:bob"]));
    for (method, channel, allowed) in [
        ("subscribe", "items:1", true),
        ("subscribe", "news", true),
        ("subscribe", "inbox:bob", false),
        ("subscribe", "secret", false),
        ("publish", "items:1", true),
        ("publish", "inbox:bob", true),
        ("publish", "news", false),
    ] {
        let params = if method == "publish" {
            json!({"channel": channel, "data": 1})
        } else {
            json!({"channel": channel})
        };
        let reply = setup.call(&client, request(method, params));
        if allowed {
            assert!(reply.get("result").is_some(), "{method} {channel}: {reply}");
        } else {
            assert_eq!(
                reply["error"]["code"], -32003,
                "{method} {channel}: {reply}"
            );
            assert_eq!(reply["error"]["data"], json!({"channel": channel}));
        }
    }
}

#[test]
fn a_grant_can_be_required_and_namespaces_can_forbid_client_publishing() {
    let setup = Setup::with_gate(
        Backbone::Up,
        GateConfig {
            limits: open_limits(),
            namespaces: Namespaces::new(std::collections::HashMap::from([(
                "feed".to_owned(),
                NamespaceOptions {
                    client_publish: false,
                    ..NamespaceOptions::default()
                },
            )])),
            client_broadcast: false,
            channels_require_grant: true,
            ..GateConfig::default()
        },
        1 << 20,
    );
    let (anonymous, _a) = setup.client();
    let refused = setup.call(&anonymous, request("subscribe", json!({"channel": "x"})));
    assert_eq!(refused["error"]["code"], -32003, "no grant, none required");
    let (granted, _g) = setup.client_as(granted(&["*"], &[], &[]));
    let refused = setup.call(
        &granted,
        request("publish", json!({"channel": "feed:1", "data": 1})),
    );
    assert_eq!(refused["error"]["code"], -32003);
    assert_eq!(
        refused["error"]["data"],
        json!({"channel": "feed:1", "reason": "client publish disabled"})
    );
    let refused = setup.call(&granted, request("broadcast", json!({"x": 1})));
    assert_eq!(refused["error"]["code"], -32003);
    assert_eq!(
        refused["error"]["data"],
        json!({"reason": "client broadcast disabled"})
    );
    assert!(
        setup
            .call(&granted, request("subscribe", json!({"channel": "feed:1"})))
            .get("result")
            .is_some(),
        "subscribing is still allowed"
    );
}

#[tokio::test]
async fn auth_refresh_takes_a_token_of_the_same_user_only() {
    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    let setup = Setup::with_gate(
        Backbone::Up,
        GateConfig {
            limits: open_limits(),
            auth: AuthConfig {
                enabled: true,
                static_tokens: vec![],
                jwt: Some(JwtConfig {
                    secret: Some(Arc::from(SECRET)),
                    public_key: None,
                    jwks: None,
                    leeway: Duration::from_secs(5),
                    issuer: None,
                    audience: None,
                }),
            },
            ..GateConfig::default()
        },
        1 << 20,
    );
    let mut alice = granted(&["items:*"], &[], &[]);
    alice.expires_at = Some(1);
    let (client, _outbox) = setup.client_as(alice);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let token = |sub: &str| {
        mint_hs256(
            SECRET,
            &TokenClaims {
                sub: sub.into(),
                channels: Some(vec!["news".into()]),
                iat: now,
                exp: now + 3600,
                ..TokenClaims::default()
            },
        )
        .expect("signs")
    };
    let refresh = |token: String| {
        setup.handle(
            &client,
            &request("auth.refresh", json!({"token": token})).to_string(),
        )
    };
    let reply = later(refresh(token("alice"))).await;
    assert_eq!(reply["result"], json!({"exp": now + 3600}), "{reply}");
    assert_eq!(client.expires_at(), Some(now + 3600));
    assert!(
        client.identity().grants.may_subscribe("news", false),
        "the new grants apply"
    );
    assert!(!client.identity().grants.may_subscribe("items:1", false));

    let reply = later(refresh(token("mallory"))).await;
    assert_eq!(reply["error"]["code"], -32003, "{reply}");
    let reply = later(refresh("not a token".into())).await;
    assert_eq!(reply["error"]["code"], -32001, "{reply}");
    assert_eq!(reply["error"]["data"], json!({"reason": "malformed"}));
    assert_eq!(
        client.expires_at(),
        Some(now + 3600),
        "unchanged by refusals"
    );
}

#[tokio::test]
async fn the_server_api_skips_grants_and_budgets_but_not_the_size_cap() {
    let setup = Setup::with_gate(
        Backbone::Up,
        GateConfig {
            limits: Limits {
                max_publish_size: 16,
                publish_rate: Some(Rate::per_second(1, 1)),
                ..Limits::default()
            },
            namespaces: Namespaces::new(std::collections::HashMap::from([(
                "feed".to_owned(),
                NamespaceOptions {
                    client_publish: false,
                    ..NamespaceOptions::default()
                },
            )])),
            client_broadcast: false,
            channels_require_grant: true,
            ..GateConfig::default()
        },
        1 << 20,
    );
    let api_router = Router::for_api();
    let api = Arc::new(Caller::api(1 << 20));
    let cx = Context {
        services: &setup.services,
        caller: &api,
    };
    let call = |message: Value| match api_router.handle(&message.to_string(), &cx) {
        Handled::Now(reply) => serde_json::from_str::<Value>(&reply).expect("JSON"),
        other => panic!("expected a reply now, got {other:?}"),
    };
    for _ in 0..3 {
        let reply = call(request("publish", json!({"channel": "feed:1", "data": 1})));
        assert_eq!(reply["result"], json!({"channel": "feed:1"}), "{reply}");
    }
    let reply = call(request("broadcast", json!({"data": {"a": 1}})));
    assert_eq!(reply["result"], json!({"status": "broadcasted"}), "{reply}");
    let reply = call(request("broadcast", json!({"data": "x".repeat(32)})));
    assert_eq!(reply["error"]["code"], -32013, "{reply}");
    let reply = call(request(
        "send",
        json!({"users": ["u"], "data": "x".repeat(32)}),
    ));
    assert_eq!(reply["error"]["code"], -32013, "{reply}");
    let reply = call(request("subscribe", json!({"channel": "a"})));
    assert_eq!(
        reply["error"]["code"], -32601,
        "clients' methods are not the API's"
    );
    let reply = call(request("presence", json!({"channel": "feed:1"})));
    assert_eq!(reply["error"]["code"], -32004, "{reply}");
    assert_eq!(reply["error"]["data"]["reason"], "presence not enabled");
}

#[test]
fn clients_cannot_call_the_servers_methods() {
    let setup = Setup::new(Backbone::Up);
    let (client, _outbox) = setup.client();
    for method in ["send", "kick", "info", "channels"] {
        let reply = setup.call(&client, request(method, json!({"users": ["u"], "data": 1})));
        assert_eq!(reply["error"]["code"], -32601, "{method}: {reply}");
    }
}
