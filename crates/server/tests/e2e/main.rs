//! End-to-end tests: real WebSocket clients against real servers on port 0.

mod support;

/// Real redis-server / nats-server processes, shared with the adapter tests.
#[path = "../../../pubsub/tests/support/mod.rs"]
mod backbone;

mod auth;
mod browser;
mod cluster_backbone;
mod cluster_shards;

mod cluster_local;
mod delivery;
mod entity_sync;
mod history;
mod history_cluster;
mod hostile;
mod jsonrpc_spec;
mod limits;
mod ops;
mod process;
mod proxy;
mod sse;
mod transport;
mod users;
mod users_cluster;
