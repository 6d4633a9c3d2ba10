//! The Chorus server: configuration, HTTP routes, WebSocket connections, the cluster
//! node and graceful shutdown. `main.rs` is a thin wrapper; tests start servers
//! in-process through [`start`].

pub mod api;
pub mod app;
pub mod config;
mod connection;
pub mod history;
mod http;
mod http_client;
mod lazy_read;
pub mod lifecycle;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod presence;
pub mod proxy;
mod session;
mod sse;
pub mod webhook;

pub use app::{RunningServer, StartError, start, start_with_bus};
pub use config::{Config, ConfigError};
