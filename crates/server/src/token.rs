//! `chorus token`: prints an HS256 token signed with `WS_JWT_SECRET`, for development
//! and tests. Production tokens come from the application's own login.

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chorus_gate::{TokenClaims, mint_hs256};
use chorus_server::config::parse_duration;

pub const USAGE: &str = "\
usage: chorus                      serve (configured by WS_* variables; see the README)
       chorus health [URL]         exit 0 when URL (default http://127.0.0.1:$WS_PORT/health)
                                   answers 200: a container health check without curl
       chorus token --sub USER [--device ID] [--channels P,P] [--subscribe P,P]
                    [--publish P,P] [--info JSON] [--ttl 1h] [--iss ISSUER] [--aud AUDIENCE]
                    print an HS256 token signed with WS_JWT_SECRET (patterns: a name,
                    a prefix ending in *, or *); iss and aud default to WS_JWT_ISSUER and
                    WS_JWT_AUDIENCE";

pub fn run(args: &[String]) -> ExitCode {
    match mint(args) {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("chorus token: {why}\n{USAGE}");
            ExitCode::from(2)
        }
    }
}

fn mint(args: &[String]) -> Result<String, String> {
    let secret = std::env::var("WS_JWT_SECRET")
        .ok()
        .filter(|secret| !secret.is_empty())
        .ok_or("WS_JWT_SECRET is not set")?;
    if secret.len() < 32 {
        return Err("WS_JWT_SECRET must be at least 32 bytes, as the server requires".into());
    }
    let list = |value: &str| -> Vec<String> {
        value
            .split(',')
            .map(str::trim)
            .filter(|item| !item.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let mut claims = TokenClaims {
        iss: std::env::var("WS_JWT_ISSUER")
            .ok()
            .filter(|v| !v.is_empty()),
        aud: std::env::var("WS_JWT_AUDIENCE")
            .ok()
            .filter(|v| !v.is_empty()),
        ..TokenClaims::default()
    };
    let mut ttl = Duration::from_secs(3600);
    let mut rest = args.iter();
    while let Some(flag) = rest.next() {
        let value = rest.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--sub" => claims.sub.clone_from(value),
            "--device" => claims.device = Some(value.clone()),
            "--channels" => claims.channels = Some(list(value)),
            "--subscribe" => claims.subscribe = Some(list(value)),
            "--publish" => claims.publish = Some(list(value)),
            "--info" => {
                claims.info = Some(
                    serde_json::from_str(value)
                        .map_err(|err| format!("--info is not JSON: {err}"))?,
                );
            }
            "--ttl" => {
                ttl = parse_duration(value)
                    .ok_or_else(|| format!("--ttl {value:?}: a duration such as 1h"))?;
            }
            "--iss" => claims.iss = Some(value.clone()),
            "--aud" => claims.aud = Some(value.clone()),
            other => return Err(format!("unknown option {other}")),
        }
    }
    if claims.sub.is_empty() {
        return Err("--sub is required".into());
    }
    for pattern in [&claims.channels, &claims.subscribe, &claims.publish]
        .into_iter()
        .flatten()
        .flatten()
    {
        if chorus_gate::Pattern::parse(pattern).is_none() {
            return Err(format!("{pattern:?} is not a channel pattern"));
        }
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|err| err.to_string())?
        .as_secs();
    claims.iat = now;
    claims.exp = now + ttl.as_secs();
    mint_hs256(secret.as_bytes(), &claims)
}
