//! Structured logs: human text by default, one JSON object per line for machines.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat};

/// Installs the global subscriber (and a bridge for crates that log through `log`,
/// such as fred); a second call (tests) is a no-op.
pub fn init(config: &Config) {
    // async-nats logs every connection event at info (one per dropped message in a
    // slow-consumer storm): quiet it unless the operator asked for it by name.
    let directives = if config.log.level.contains("async_nats") {
        config.log.level.clone()
    } else {
        format!("{},async_nats=warn", config.log.level)
    };
    let filter = EnvFilter::try_new(&directives).unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal: log files and collectors get plain text.
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    let _ = match config.log.format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
