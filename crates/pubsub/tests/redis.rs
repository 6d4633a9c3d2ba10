//! The Redis adapter against a real `redis-server`, one per test on its own port.

mod support;

use chorus_pubsub::redis::RedisBackbone;

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
