//! Who may connect and what they may do: tokens (section 8), channel grants, and the
//! per-namespace options of section 11 (`WS_NAMESPACES`, every option checked here,
//! each later feature giving its options their effect).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chorus_gate::{DeliveryPolicy, NamespaceOptions, Namespaces, PublicKey};
use serde::Deserialize;

use super::values::{error, parse_bool, parse_duration, parse_or};
use super::{ConfigError, Vars, read};

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Raw {
    auth_enabled: Option<String>,
    bearer_tokens: Option<String>,
    jwt_secret: Option<String>,
    jwt_public_key: Option<String>,
    jwt_jwks_url: Option<String>,
    jwt_jwks_refresh: Option<String>,
    jwt_leeway: Option<String>,
    jwt_issuer: Option<String>,
    jwt_audience: Option<String>,
    channels_require_grant: Option<String>,
    client_broadcast: Option<String>,
    max_connections_per_user: Option<String>,
    namespaces: Option<String>,
}

/// Shortest HS256 secret accepted: 256 bits, as RFC 7518 asks for HS256.
const MIN_SECRET_LEN: usize = 32;

#[derive(Clone, Debug)]
pub struct GateSettings {
    pub auth_enabled: bool,
    pub bearer_tokens: Vec<String>,
    pub jwt_secret: Option<Arc<[u8]>>,
    pub jwt_public_key: Option<PublicKey>,
    /// `http://` or `https://`.
    pub jwt_jwks_url: Option<String>,
    /// Shortest time between two fetches of the JWKS.
    pub jwt_jwks_refresh: Duration,
    pub jwt_leeway: Duration,
    pub jwt_issuer: Option<String>,
    pub jwt_audience: Option<String>,
    pub channels_require_grant: bool,
    pub client_broadcast: bool,
    pub max_connections_per_user: usize,
    pub namespaces: Namespaces,
}

impl GateSettings {
    /// Whether any JWT setting is there.
    pub fn accepts_jwt(&self) -> bool {
        self.jwt_secret.is_some() || self.jwt_public_key.is_some() || self.jwt_jwks_url.is_some()
    }

    pub(super) fn load(vars: &Vars) -> Result<Self, ConfigError> {
        let raw: Raw = read(vars)?;
        let set = |value: Option<String>| value.filter(|v| !v.trim().is_empty());
        let flag = |variable: &str, value: Option<String>, default: bool| {
            parse_or(variable, value, default, "true or false", parse_bool)
        };
        let bearer_tokens: Vec<String> = set(raw.bearer_tokens)
            .map(|list| {
                list.split(',')
                    .map(str::trim)
                    .filter(|token| !token.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        // Values are secrets: errors name the variable, never the value.
        if bearer_tokens
            .iter()
            .any(|token| token.len() > chorus_gate::MAX_TOKEN_LEN)
        {
            return Err(error(
                "WS_BEARER_TOKENS",
                "(hidden)",
                "tokens of at most 8 KiB",
            ));
        }
        let jwt_secret = match set(raw.jwt_secret) {
            Some(secret) if secret.len() < MIN_SECRET_LEN => {
                return Err(error(
                    "WS_JWT_SECRET",
                    "(hidden)",
                    "at least 32 bytes (256 bits) for HS256",
                ));
            }
            Some(secret) => Some(Arc::from(secret.into_bytes())),
            None => None,
        };
        let jwt_public_key = match set(raw.jwt_public_key) {
            Some(pem) => Some(
                PublicKey::from_pem(&pem)
                    .map_err(|expected| error("WS_JWT_PUBLIC_KEY", "(PEM)", &expected))?,
            ),
            None => None,
        };
        let jwt_jwks_url = match set(raw.jwt_jwks_url) {
            Some(url) => {
                let parsed: Option<hyper::Uri> = url.parse().ok();
                let usable = parsed.as_ref().is_some_and(|uri| {
                    matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some()
                });
                if !usable {
                    return Err(error(
                        "WS_JWT_JWKS_URL",
                        &url,
                        "an http:// or https:// URL such as https://id.example/.well-known/jwks.json",
                    ));
                }
                Some(url)
            }
            None => None,
        };
        let jwt_jwks_refresh = parse_or(
            "WS_JWT_JWKS_REFRESH",
            raw.jwt_jwks_refresh,
            Duration::from_secs(30),
            "a duration such as 30s",
            parse_duration,
        )?;
        let jwt_leeway = parse_or(
            "WS_JWT_LEEWAY",
            raw.jwt_leeway,
            Duration::from_secs(5),
            "a duration such as 5s",
            parse_duration,
        )?;
        let auth_enabled = flag("WS_AUTH_ENABLED", raw.auth_enabled, false)?;
        let settings = Self {
            auth_enabled,
            bearer_tokens,
            jwt_secret,
            jwt_public_key,
            jwt_jwks_url,
            jwt_jwks_refresh,
            jwt_leeway,
            jwt_issuer: set(raw.jwt_issuer),
            jwt_audience: set(raw.jwt_audience),
            channels_require_grant: flag(
                "WS_CHANNELS_REQUIRE_GRANT",
                raw.channels_require_grant,
                false,
            )?,
            client_broadcast: flag("WS_CLIENT_BROADCAST", raw.client_broadcast, true)?,
            max_connections_per_user: parse_or(
                "WS_MAX_CONNECTIONS_PER_USER",
                raw.max_connections_per_user,
                0,
                "a whole number (0 means no limit)",
                |v| v.parse().ok(),
            )?,
            namespaces: match set(raw.namespaces) {
                Some(json) => namespaces(&json)?,
                None => Namespaces::default(),
            },
        };
        if settings.auth_enabled && settings.bearer_tokens.is_empty() && !settings.accepts_jwt() {
            return Err(error(
                "WS_AUTH_ENABLED",
                "true",
                "a way to check tokens as well: WS_BEARER_TOKENS, WS_JWT_SECRET, WS_JWT_PUBLIC_KEY or WS_JWT_JWKS_URL",
            ));
        }
        Ok(settings)
    }
}

/// One namespace's options as written: every field optional, none unknown.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOptions {
    history_size: Option<usize>,
    history_ttl: Option<String>,
    presence: Option<bool>,
    join_leave: Option<bool>,
    client_publish: Option<bool>,
    delivery: Option<String>,
}

/// Reads `WS_NAMESPACES`; an error names the namespace and the option.
fn namespaces(json: &str) -> Result<Namespaces, ConfigError> {
    let bad = |expected: String| error("WS_NAMESPACES", json, &expected);
    let raw: HashMap<String, serde_json::Value> = serde_json::from_str(json).map_err(|err| {
        bad(format!(
            r#"a JSON object such as {{"chat": {{"history_size": 100}}}} ({err})"#
        ))
    })?;
    let mut named = HashMap::new();
    for (name, value) in raw {
        let valid_name = name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_-.@/=".contains(&b))
            && name.len() <= 255;
        if !valid_name {
            return Err(bad(format!(
                "namespace names without ':' (the part of a channel before the first ':'), not {name:?}"
            )));
        }
        let options: RawOptions = serde_json::from_value(value).map_err(|err| {
            bad(format!(
                "namespace {name:?}: options history_size, history_ttl, presence, join_leave, client_publish, delivery with valid values ({err})"
            ))
        })?;
        let defaults = NamespaceOptions::default();
        let history_ttl = match options.history_ttl {
            Some(ttl) => Some(
                parse_duration(&ttl)
                    .filter(|ttl| !ttl.is_zero())
                    .ok_or_else(|| {
                        bad(format!(
                            "namespace {name:?}: history_ttl as a duration such as \"5m\", not {ttl:?}"
                        ))
                    })?,
            ),
            None => None,
        };
        let delivery = match options.delivery {
            Some(text) => DeliveryPolicy::parse(&text).ok_or_else(|| {
                bad(format!(
                    "namespace {name:?}: delivery disconnect, drop_oldest or latest, not {text:?}"
                ))
            })?,
            None => defaults.delivery,
        };
        let history_size = options.history_size.unwrap_or(defaults.history_size);
        if history_size > 1_000_000 {
            return Err(bad(format!(
                "namespace {name:?}: history_size of at most 1000000"
            )));
        }
        named.insert(
            name,
            NamespaceOptions {
                history_size,
                history_ttl,
                presence: options.presence.unwrap_or(defaults.presence),
                join_leave: options.join_leave.unwrap_or(defaults.join_leave),
                client_publish: options.client_publish.unwrap_or(defaults.client_publish),
                delivery,
            },
        );
    }
    Ok(Namespaces::new(named))
}

#[cfg(test)]
mod tests {
    use super::super::tests::config;
    use super::*;

    #[test]
    fn namespaces_are_read_with_every_option() {
        let config = config(&[(
            "WS_NAMESPACES",
            r#"{"chat": {"history_size": 100, "history_ttl": "5m", "presence": true,
                "join_leave": true, "client_publish": false, "delivery": "drop_oldest"},
               "": {"delivery": "latest"}}"#,
        )])
        .expect("valid");
        let namespaces = &config.gate.namespaces;
        let chat = namespaces.of("chat:1");
        assert_eq!(chat.history_size, 100);
        assert_eq!(chat.history_ttl, Some(Duration::from_secs(300)));
        assert!(chat.presence && chat.join_leave && !chat.client_publish);
        assert_eq!(chat.delivery, DeliveryPolicy::DropOldest);
        assert_eq!(namespaces.of("other:1").delivery, DeliveryPolicy::Latest);
    }

    #[test]
    fn bad_namespaces_name_what_is_wrong() {
        for (json, mentions) in [
            ("not json", "JSON object"),
            (r#"{"chat": {"histroy_size": 1}}"#, "histroy_size"),
            (r#"{"chat": {"history_size": -1}}"#, "chat"),
            (r#"{"chat": {"history_ttl": "soon"}}"#, "history_ttl"),
            (r#"{"chat": {"delivery": "sometimes"}}"#, "delivery"),
            (r#"{"chat": {"presence": "yes"}}"#, "chat"),
            (r#"{"a:b": {}}"#, "a:b"),
        ] {
            let err = config(&[("WS_NAMESPACES", json)]).expect_err(json);
            assert_eq!(err.variable, "WS_NAMESPACES");
            assert!(err.to_string().contains(mentions), "{err}");
        }
    }

    #[test]
    fn authentication_needs_a_way_to_check_tokens() {
        let err = config(&[("WS_AUTH_ENABLED", "true")]).expect_err("nothing to check with");
        assert_eq!(err.variable, "WS_AUTH_ENABLED");
        assert!(config(&[("WS_AUTH_ENABLED", "true"), ("WS_BEARER_TOKENS", "a,b")]).is_ok());
        let err = config(&[("WS_JWT_SECRET", "short")]).expect_err("too short");
        assert!(
            !err.to_string().contains("short"),
            "secrets are not printed: {err}"
        );
        let err = config(&[("WS_JWT_PUBLIC_KEY", "not a key")]).expect_err("not PEM");
        assert_eq!(err.variable, "WS_JWT_PUBLIC_KEY");
        let err = config(&[("WS_JWT_JWKS_URL", "ftp://x/keys")]).expect_err("not http");
        assert_eq!(err.variable, "WS_JWT_JWKS_URL");
        let settings = config(&[
            ("WS_AUTH_ENABLED", "true"),
            (
                "WS_JWT_JWKS_URL",
                "https://id.example/.well-known/jwks.json",
            ),
            ("WS_CLIENT_BROADCAST", "false"),
        ])
        .expect("valid")
        .gate;
        assert!(settings.accepts_jwt() && !settings.client_broadcast);
    }
}
