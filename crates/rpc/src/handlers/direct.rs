//! `send` and `kick` (server API): a notification to chosen users, devices and
//! connections on every replica, or their disconnection. Both answer with how many
//! connections they targeted cluster-wide.

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::{Access, Context, Method, Params, Reply, RpcError, Targets, notification};

/// The notification `send` delivers unless it names another.
const DEFAULT_EVENT: &str = "message.user";
/// Most names in one call, over the three lists: every name becomes a backbone
/// publication.
const MAX_TARGETS: usize = 1000;
/// Longest user, device or client id accepted.
const MAX_NAME: usize = 256;

struct TargetLists {
    users: Vec<String>,
    devices: Vec<String>,
    clients: Vec<String>,
}

fn targets(lists: TargetLists) -> Result<Targets, RpcError> {
    let TargetLists {
        users,
        devices,
        clients,
    } = lists;
    let targets = Targets {
        users,
        devices,
        clients,
    };
    if targets.is_empty() {
        return Err(RpcError::invalid_params(
            "name at least one of users, devices, clients",
        ));
    }
    let all = || {
        targets
            .users
            .iter()
            .chain(&targets.devices)
            .chain(&targets.clients)
    };
    if all().count() > MAX_TARGETS {
        return Err(RpcError::invalid_params(format!(
            "at most {MAX_TARGETS} users, devices and clients in all"
        )));
    }
    if all().any(|name| name.is_empty() || name.len() > MAX_NAME) {
        return Err(RpcError::invalid_params(format!(
            "names must be 1 to {MAX_NAME} bytes"
        )));
    }
    Ok(targets)
}

/// `send`.
pub struct Send;

pub struct ParsedSend<'a> {
    targets: Targets,
    event: String,
    data: &'a RawValue,
}

/// Event names: plain (no JSON escaping needed), not the server's own `sys.*`.
fn valid_event(event: &str) -> bool {
    !event.is_empty()
        && event.len() <= 64
        && !event.starts_with("sys.")
        && event
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b))
}

impl Method for Send {
    type Params<'p> = ParsedSend<'p>;

    fn parse<'p>(&self, params: Params<'p>) -> Result<ParsedSend<'p>, RpcError> {
        // `flatten` and `deny_unknown_fields` do not mix: read the fields by hand.
        let raw: std::collections::HashMap<&str, &'p RawValue> = params.named()?;
        if let Some(unknown) = raw
            .keys()
            .find(|key| !["users", "devices", "clients", "event", "data"].contains(key))
        {
            return Err(RpcError::invalid_params(format!(
                "unknown field `{unknown}`"
            )));
        }
        let field = |name: &str| -> Result<Option<Vec<String>>, RpcError> {
            raw.get(name)
                .map(|value| serde_json::from_str(value.get()))
                .transpose()
                .map_err(|err| RpcError::invalid_params(format!("{name}: {err}")))
        };
        let lists = TargetLists {
            users: field("users")?.unwrap_or_default(),
            devices: field("devices")?.unwrap_or_default(),
            clients: field("clients")?.unwrap_or_default(),
        };
        let event = match raw.get("event") {
            Some(value) => serde_json::from_str::<String>(value.get())
                .map_err(|err| RpcError::invalid_params(format!("event: {err}")))?,
            None => DEFAULT_EVENT.to_owned(),
        };
        if !valid_event(&event) {
            return Err(RpcError::invalid_params(
                "event must be 1 to 64 characters of A-Z a-z 0-9 _ - . : and not start with sys.",
            ));
        }
        let data = raw
            .get("data")
            .copied()
            .ok_or_else(|| RpcError::invalid_params("missing field `data`"))?;
        Ok(ParsedSend {
            targets: targets(lists)?,
            event,
            data,
        })
    }

    fn access<'a>(&self, params: &'a ParsedSend<'_>) -> Access<'a> {
        Access::Direct {
            bytes: params.data.get().len(),
        }
    }

    fn call<'p>(&self, cx: &Context<'_>, params: &Self::Params<'p>) -> Result<Reply<'p>, RpcError> {
        let frame = notification::raw(&params.event, params.data.get());
        let sent = cx.node().send(params.targets.clone(), frame);
        Ok(Reply::later(async move {
            let devices = sent.await?;
            Ok(Reply::Json(serde_json::json!({ "devices": devices })))
        }))
    }
}

/// `kick`.
pub struct Kick;

pub struct ParsedKick {
    targets: Targets,
    reason: String,
}

impl Method for Kick {
    type Params<'p> = ParsedKick;

    fn parse(&self, params: Params<'_>) -> Result<ParsedKick, RpcError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Raw {
            #[serde(default)]
            users: Vec<String>,
            #[serde(default)]
            devices: Vec<String>,
            #[serde(default)]
            clients: Vec<String>,
            reason: Option<String>,
        }
        let raw: Raw = params.named()?;
        let reason = raw.reason.unwrap_or_else(|| "kicked".to_owned());
        if reason.len() > 256 {
            return Err(RpcError::invalid_params("reason must be at most 256 bytes"));
        }
        Ok(ParsedKick {
            targets: targets(TargetLists {
                users: raw.users,
                devices: raw.devices,
                clients: raw.clients,
            })?,
            reason,
        })
    }

    fn call<'p>(&self, cx: &Context<'_>, params: &ParsedKick) -> Result<Reply<'p>, RpcError> {
        let frame =
            notification::value("sys.kick", &serde_json::json!({ "reason": params.reason }));
        let kicked = cx.node().kick(params.targets.clone(), frame);
        Ok(Reply::later(async move {
            let kicked = kicked.await?;
            Ok(Reply::Json(serde_json::json!({ "kicked": kicked })))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_names() {
        assert!(valid_event("message.user"));
        assert!(valid_event("order:paid"));
        assert!(!valid_event("sys.kick"));
        assert!(!valid_event(""));
        assert!(!valid_event("has\"quote"));
        assert!(!valid_event(&"x".repeat(65)));
    }
}
