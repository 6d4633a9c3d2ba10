//! The Redis adapter against a real `redis-server`, one per test on its own port.

mod support;

use chorus_pubsub::Backbone;
use chorus_pubsub::redis::RedisBackbone;
use support::{Kind, Node, Server};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivers_between_instances() {
    support::delivers_between_instances::<RedisBackbone>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_stops_delivery() {
    support::unsubscribe_stops_delivery::<RedisBackbone>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_order_of_1000_messages() {
    support::keeps_order::<RedisBackbone>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tricky_topic_names_round_trip() {
    support::tricky_topic_names::<RedisBackbone>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_while_the_server_is_down() {
    support::starts_while_the_server_is_down::<RedisBackbone>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_an_outage() {
    support::survives_an_outage::<RedisBackbone>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_stops_the_tasks() {
    support::dropping_stops_the_tasks::<RedisBackbone>().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_topic_delays_no_other() {
    support::a_stuck_topic_delays_no_other::<RedisBackbone>().await;
}

/// A server that requires a password: the URL's password opens both connections of
/// the adapter (SUBSCRIBE and PUBLISH need it), and messages flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authenticates_with_the_urls_password() {
    let server = Server::start_with_args(Kind::Redis, &["--requirepass", "s3cret"]);
    let url = format!("redis://:s3cret@127.0.0.1:{}", server.port());
    let mut subscriber = Node::<RedisBackbone>::connected(&url).await;
    let publisher = Node::<RedisBackbone>::connected(&url).await;
    subscriber.backbone.subscribe("auth").expect("subscribe");
    support::sync(&mut subscriber, &publisher, "auth").await;
    support::publish(&publisher, "auth", "hello");
    assert_eq!(subscriber.next().await, "hello");
}
