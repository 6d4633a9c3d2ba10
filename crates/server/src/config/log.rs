//! What the server logs and how.

use serde::Deserialize;

use super::values::error;
use super::{ConfigError, Vars, read};

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Raw {
    log_level: Option<String>,
    log_format: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug)]
pub struct LogConfig {
    /// A tracing filter.
    pub level: String,
    pub format: LogFormat,
}

impl LogConfig {
    pub(super) fn load(vars: &Vars) -> Result<Self, ConfigError> {
        let raw: Raw = read(vars)?;
        let level = raw.log_level.unwrap_or_else(|| "info".into());
        if tracing_subscriber::EnvFilter::try_new(&level).is_err() {
            return Err(error(
                "WS_LOG_LEVEL",
                &level,
                "trace, debug, info, warn, error or a filter such as chorus=debug",
            ));
        }
        let format = match raw.log_format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => return Err(error("WS_LOG_FORMAT", other, "text or json")),
        };
        Ok(Self { level, format })
    }
}
