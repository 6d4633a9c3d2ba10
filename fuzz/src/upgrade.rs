//! What the `upgrade_request` fuzz target checks: arbitrary bytes as an HTTP upgrade
//! request head, through everything Chorus itself reads of it before the upgrade: the
//! token (`Authorization: Bearer`, `?token=`), the client address behind a trusted
//! proxy (`X-Forwarded-For`), and the token's verification (static, HS256, a public
//! key). Nothing may panic, and what comes out must make sense.
//!
//! Compiled by path into `crates/gate/tests/upgrade_robustness.rs` as well, so CI runs
//! the same checks: keep it free of anything but `std` and `chorus_gate`.

use std::future::Future;
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use chorus_gate::{
    AuthConfig, AuthError, JwtConfig, MAX_TOKEN_LEN, TrustedProxies, Verifier, bearer_token,
    query_token,
};

fn verifier() -> &'static Verifier {
    static VERIFIER: OnceLock<Verifier> = OnceLock::new();
    VERIFIER.get_or_init(|| {
        Verifier::new(AuthConfig {
            enabled: true,
            static_tokens: vec!["static-token".into()],
            jwt: Some(JwtConfig {
                secret: Some(Arc::from(&b"a fuzzing secret of thirty-two bytes!"[..])),
                public_key: None,
                jwks: None,
                leeway: Duration::from_secs(5),
                issuer: Some("fuzz".into()),
                audience: Some("chorus".into()),
            }),
        })
    })
}

/// Runs a future that needs no I/O (no JWKS is configured) to completion.
fn now<T>(future: impl Future<Output = T>) -> T {
    let mut future = std::pin::pin!(future);
    match future
        .as_mut()
        .poll(&mut Context::from_waker(Waker::noop()))
    {
        Poll::Ready(value) => value,
        Poll::Pending => panic!("verification waited on I/O without a JWKS"),
    }
}

pub fn check_upgrade(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut lines = text.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let query = request_line
        .split(' ')
        .nth(1)
        .and_then(|target| target.split_once('?'))
        .map(|(_, query)| query);
    let mut authorization = None;
    let mut forwarded = Vec::new();
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if name.eq_ignore_ascii_case("authorization") {
            authorization = Some(value.trim().as_bytes());
        } else if name.eq_ignore_ascii_case("x-forwarded-for") {
            forwarded.push(value);
        }
    }

    let from_header = authorization.and_then(bearer_token);
    if let Some(token) = from_header {
        assert!(!token.is_empty() && token.trim() == token, "{token:?}");
    }
    let from_query = query.and_then(query_token);
    if let Some(token) = &from_query {
        assert!(!token.is_empty());
    }
    let token = from_header.map(str::to_owned).or(from_query);
    match now(verifier().verify(token.as_deref())) {
        Ok(identity) => {
            // Only the static token, or a JWT signed with the fuzzing secret (which a
            // fuzzer does not find), may pass.
            assert!(
                token.as_deref() == Some("static-token") || identity.user.is_some(),
                "accepted {token:?}"
            );
        }
        Err(error) => {
            assert!(AuthError::REASONS.contains(&error.reason()));
            if token.is_none() {
                assert_eq!(error, AuthError::Missing);
            }
            if token.as_ref().is_some_and(|t| t.len() > MAX_TOKEN_LEN) {
                assert_eq!(error, AuthError::Malformed);
            }
        }
    }

    let proxies = TrustedProxies::new(vec![
        "10.0.0.0/8".parse().expect("a network"),
        "::1/128".parse().expect("a network"),
    ]);
    let peer: IpAddr = if data.first().is_some_and(|b| b % 2 == 0) {
        "10.1.2.3".parse().expect("an address")
    } else {
        "::1".parse().expect("an address")
    };
    let client = proxies.client_ip(peer, forwarded.iter().copied());
    if forwarded.is_empty() {
        assert_eq!(client, peer, "without a header, the peer itself");
    }
}
