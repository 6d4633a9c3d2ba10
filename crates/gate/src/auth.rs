//! Tokens to identities: static bearer tokens (compared in constant time) and JWTs
//! signed with a secret (HS256), a public key (RS256, ES256, EdDSA) or keys from a
//! JWKS URL. Every refusal has a reason from a small fixed set, for the 401 body and
//! the `ws_auth_failures_total{reason}` metric.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::value::RawValue;
use subtle::ConstantTimeEq;

use crate::identity::{Grants, Identity, Pattern};
use crate::jwks::Jwks;

/// Longest token accepted, in bytes: a token rides in a header or the query string.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;
/// Longest user or device id, in bytes.
const MAX_ID_LEN: usize = 255;
/// Largest `info` claim, in bytes of JSON.
const MAX_INFO_LEN: usize = 4 * 1024;

/// Why a token was refused. [`AuthError::reason`] is the metric label and the 401 body.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no token: send Authorization: Bearer <token> or ?token=")]
    Missing,
    #[error("the token is not a JWT this server can read")]
    Malformed,
    #[error("the token is not one this server accepts")]
    UnknownToken,
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token's algorithm is not accepted")]
    Algorithm,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token's issuer is missing or not the expected one")]
    WrongIssuer,
    #[error("the token's audience is missing or not the expected one")]
    WrongAudience,
    #[error("the token's claims are invalid: {0}")]
    InvalidClaims(&'static str),
    #[error("the token's key is not known")]
    UnknownKey,
    #[error("the keys to check the token are not available")]
    KeysUnavailable,
}

impl AuthError {
    /// Every reason, for metrics that exist from start-up.
    pub const REASONS: [&'static str; 12] = [
        "missing",
        "malformed",
        "unknown_token",
        "bad_signature",
        "algorithm",
        "expired",
        "not_yet_valid",
        "wrong_issuer",
        "wrong_audience",
        "invalid_claims",
        "unknown_key",
        "keys_unavailable",
    ];

    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Malformed => "malformed",
            Self::UnknownToken => "unknown_token",
            Self::BadSignature => "bad_signature",
            Self::Algorithm => "algorithm",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::WrongIssuer => "wrong_issuer",
            Self::WrongAudience => "wrong_audience",
            Self::InvalidClaims(_) => "invalid_claims",
            Self::UnknownKey => "unknown_key",
            Self::KeysUnavailable => "keys_unavailable",
        }
    }

    fn from_jwt(error: &jsonwebtoken::errors::Error) -> Self {
        match error.kind() {
            ErrorKind::InvalidSignature => Self::BadSignature,
            ErrorKind::ExpiredSignature => Self::Expired,
            ErrorKind::ImmatureSignature => Self::NotYetValid,
            ErrorKind::InvalidIssuer => Self::WrongIssuer,
            ErrorKind::InvalidAudience => Self::WrongAudience,
            ErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
                "iss" => Self::WrongIssuer,
                "aud" => Self::WrongAudience,
                "sub" => Self::InvalidClaims("sub is required"),
                _ => Self::InvalidClaims("a required claim is missing"),
            },
            ErrorKind::InvalidAlgorithm
            | ErrorKind::InvalidAlgorithmName
            | ErrorKind::UnsupportedAlgorithm
            | ErrorKind::MissingAlgorithm => Self::Algorithm,
            ErrorKind::InvalidClaimFormat(_) => Self::InvalidClaims("a claim has the wrong type"),
            _ => Self::Malformed,
        }
    }
}

/// A public key from `WS_JWT_PUBLIC_KEY` and the one algorithm it verifies.
#[derive(Clone)]
pub struct PublicKey {
    key: DecodingKey,
    algorithm: Algorithm,
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PublicKey")
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

impl PublicKey {
    /// Reads a PEM public key: RSA (RS256), P-256 (ES256) or Ed25519 (EdDSA).
    pub fn from_pem(pem: &str) -> Result<Self, String> {
        let bytes = pem.trim().as_bytes();
        type ReadPem = fn(&[u8]) -> jsonwebtoken::errors::Result<DecodingKey>;
        let candidates: [(ReadPem, Algorithm); 3] = [
            (DecodingKey::from_rsa_pem, Algorithm::RS256),
            (DecodingKey::from_ec_pem, Algorithm::ES256),
            (DecodingKey::from_ed_pem, Algorithm::EdDSA),
        ];
        candidates
            .into_iter()
            .find_map(|(read, algorithm)| read(bytes).ok().map(|key| Self { key, algorithm }))
            .ok_or_else(|| "a PEM public key (RSA, EC P-256 or Ed25519)".to_owned())
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }
}

/// How JWTs are checked.
#[derive(Clone, Debug)]
pub struct JwtConfig {
    /// HS256 secret (`WS_JWT_SECRET`).
    pub secret: Option<Arc<[u8]>>,
    /// `WS_JWT_PUBLIC_KEY`.
    pub public_key: Option<PublicKey>,
    /// Keys from `WS_JWT_JWKS_URL`.
    pub jwks: Option<Arc<Jwks>>,
    /// Clock skew allowed on `exp` and `nbf` (`WS_JWT_LEEWAY`).
    pub leeway: Duration,
    pub issuer: Option<String>,
    pub audience: Option<String>,
}

/// The authentication settings of section 8.
#[derive(Clone, Debug, Default)]
pub struct AuthConfig {
    /// A token is required before the upgrade (`WS_AUTH_ENABLED`).
    pub enabled: bool,
    /// `WS_BEARER_TOKENS`.
    pub static_tokens: Vec<String>,
    pub jwt: Option<JwtConfig>,
}

/// The claims Chorus reads from a JWT.
#[derive(Deserialize)]
struct Claims {
    sub: Option<String>,
    device: Option<String>,
    channels: Option<Vec<String>>,
    subscribe: Option<Vec<String>>,
    publish: Option<Vec<String>>,
    info: Option<Box<RawValue>>,
    exp: Option<u64>,
}

/// Turns tokens into identities.
#[derive(Debug)]
pub struct Verifier {
    config: AuthConfig,
}

impl Verifier {
    pub fn new(config: AuthConfig) -> Self {
        Self { config }
    }

    pub fn enabled(&self) -> bool {
        self.config.enabled
    }

    /// Whether JWTs are accepted (and so `auth.refresh` means something).
    pub fn accepts_jwt(&self) -> bool {
        self.config.jwt.is_some()
    }

    /// The identity a token stands for. With authentication off, anyone is anonymous.
    pub async fn verify(&self, token: Option<&str>) -> Result<Identity, AuthError> {
        if !self.config.enabled {
            return Ok(Identity::anonymous());
        }
        self.check(token.ok_or(AuthError::Missing)?).await
    }

    /// Checks a token whatever the `enabled` switch says (`auth.refresh`).
    pub async fn check(&self, token: &str) -> Result<Identity, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.len() > MAX_TOKEN_LEN {
            return Err(AuthError::Malformed);
        }
        if self.is_static(token) {
            return Ok(Identity::anonymous());
        }
        match &self.config.jwt {
            Some(jwt) => verify_jwt(jwt, token).await,
            None => Err(AuthError::UnknownToken),
        }
    }

    /// Compares with every static token, each in constant time, without stopping at a
    /// match: how long it takes says nothing about which token came close.
    fn is_static(&self, token: &str) -> bool {
        self.config
            .static_tokens
            .iter()
            .fold(false, |found, known| {
                found | bool::from(known.as_bytes().ct_eq(token.as_bytes()))
            })
    }
}

async fn verify_jwt(config: &JwtConfig, token: &str) -> Result<Identity, AuthError> {
    let header = jsonwebtoken::decode_header(token).map_err(|error| match error.kind() {
        // `alg: none` and other unknown names fail to parse: not a usable algorithm.
        ErrorKind::Json(_) if token.split('.').count() == 3 => AuthError::Algorithm,
        _ => AuthError::from_jwt(&error),
    })?;
    let algorithm = header.alg;
    // The key is chosen by the algorithm's family, so that the bytes of a public key
    // can never serve as an HMAC secret (algorithm confusion).
    let key = match algorithm {
        Algorithm::HS256 => config
            .secret
            .as_ref()
            .map(|secret| DecodingKey::from_secret(secret))
            .ok_or(AuthError::Algorithm)?,
        Algorithm::RS256 | Algorithm::ES256 | Algorithm::EdDSA => {
            match (&config.public_key, &config.jwks) {
                (Some(public), _) if public.algorithm == algorithm => public.key.clone(),
                (_, Some(jwks)) => jwks.key(header.kid.as_deref(), algorithm).await?,
                _ => return Err(AuthError::Algorithm),
            }
        }
        _ => return Err(AuthError::Algorithm),
    };
    let mut validation = Validation::new(algorithm);
    validation.leeway = config.leeway.as_secs();
    validation.validate_nbf = true;
    validation.validate_exp = true;
    let mut required: HashSet<String> = HashSet::from(["sub".to_owned()]);
    match &config.issuer {
        Some(issuer) => {
            validation.set_issuer(&[issuer]);
            required.insert("iss".to_owned());
        }
        None => validation.iss = None,
    }
    match &config.audience {
        Some(audience) => {
            validation.set_audience(&[audience]);
            required.insert("aud".to_owned());
        }
        None => validation.validate_aud = false,
    }
    validation.required_spec_claims = required;
    let claims = jsonwebtoken::decode::<Claims>(token, &key, &validation)
        .map_err(|error| AuthError::from_jwt(&error))?
        .claims;
    identity(claims)
}

/// The claims an application's backend answers the connect proxy with (section 13):
/// those of a JWT, with `user` for `sub`, optional (no user is anonymous), and no
/// expiry.
#[derive(Debug, Default, Deserialize)]
pub struct BackendClaims {
    pub user: Option<String>,
    pub device: Option<String>,
    pub channels: Option<Vec<String>>,
    pub subscribe: Option<Vec<String>>,
    pub publish: Option<Vec<String>>,
    pub info: Option<Box<RawValue>>,
}

impl BackendClaims {
    /// The identity these claims stand for, checked as a token's would be.
    pub fn identity(self) -> Result<Identity, AuthError> {
        identity_of(
            Claims {
                sub: self.user,
                device: self.device,
                channels: self.channels,
                subscribe: self.subscribe,
                publish: self.publish,
                info: self.info,
                exp: None,
            },
            false,
        )
    }
}

fn identity(claims: Claims) -> Result<Identity, AuthError> {
    identity_of(claims, true)
}

fn identity_of(claims: Claims, require_user: bool) -> Result<Identity, AuthError> {
    let id = |value: Option<String>, what: &'static str| -> Result<Option<Arc<str>>, AuthError> {
        match value {
            None => Ok(None),
            Some(id)
                if !id.is_empty()
                    && id.len() <= MAX_ID_LEN
                    && !id.chars().any(char::is_control) =>
            {
                Ok(Some(Arc::from(id)))
            }
            Some(_) => Err(AuthError::InvalidClaims(what)),
        }
    };
    let user = id(
        claims.sub,
        "sub must be 1 to 255 bytes without control characters",
    )?;
    if user.is_none() && require_user {
        return Err(AuthError::InvalidClaims("sub is required"));
    }
    let device = id(
        claims.device,
        "device must be 1 to 255 bytes without control characters",
    )?;
    let patterns = |list: Option<Vec<String>>| -> Result<Vec<Pattern>, AuthError> {
        list.unwrap_or_default()
            .iter()
            .map(|text| {
                Pattern::parse(text).ok_or(AuthError::InvalidClaims(
                    "channel patterns are names, prefixes ending in *, or *",
                ))
            })
            .collect::<Result<Vec<_>, _>>()
            // Kept for the connection's life: collecting through `Result` leaves room
            // for four.
            .map(|mut list| {
                list.shrink_to_fit();
                list
            })
    };
    let present =
        claims.channels.is_some() || claims.subscribe.is_some() || claims.publish.is_some();
    let grants = Grants {
        channels: patterns(claims.channels)?,
        subscribe: patterns(claims.subscribe)?,
        publish: patterns(claims.publish)?,
        present,
    };
    if claims
        .info
        .as_ref()
        .is_some_and(|info| info.get().len() > MAX_INFO_LEN)
    {
        return Err(AuthError::InvalidClaims("info is larger than 4 KiB"));
    }
    Ok(Identity {
        user,
        device,
        grants,
        info: claims.info,
        expires_at: claims.exp,
    })
}

#[cfg(test)]
mod tests {
    use jsonwebtoken::{EncodingKey, Header, encode};
    use serde_json::json;

    use super::*;

    const SECRET: &[u8] = b"a test secret that is long enough";

    fn hs256(claims: &serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            claims,
            &EncodingKey::from_secret(SECRET),
        )
        .expect("signs")
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    fn verifier() -> Verifier {
        Verifier::new(AuthConfig {
            enabled: true,
            static_tokens: vec!["static-one".into(), "static-two".into()],
            jwt: Some(JwtConfig {
                secret: Some(Arc::from(SECRET)),
                public_key: None,
                jwks: None,
                leeway: Duration::from_secs(5),
                issuer: Some("chorus-tests".into()),
                audience: None,
            }),
        })
    }

    async fn refusal(token: &str) -> AuthError {
        verifier().verify(Some(token)).await.expect_err("refused")
    }

    #[tokio::test]
    async fn static_tokens_and_a_valid_jwt_are_accepted() {
        let v = verifier();
        let anonymous = v.verify(Some("static-two")).await.expect("static");
        assert!(anonymous.user.is_none() && !anonymous.grants.present);
        let token = hs256(&json!({
            "sub": "alice", "device": "phone", "iss": "chorus-tests", "exp": now() + 60,
            "channels": ["items:*"], "publish": ["inbox:bob"], "info": {"name": "Alice"}
        }));
        let identity = v.verify(Some(&token)).await.expect("JWT");
        assert_eq!(identity.user.as_deref(), Some("alice"));
        assert_eq!(identity.device.as_deref(), Some("phone"));
        assert!(identity.grants.may_subscribe("items:1", false));
        assert!(identity.grants.may_publish("inbox:bob", false));
        assert!(!identity.grants.may_subscribe("inbox:bob", false));
        assert_eq!(
            identity.info.map(|i| i.get().to_owned()),
            Some(r#"{"name":"Alice"}"#.into())
        );
        assert_eq!(identity.expires_at, Some(now() + 60));
    }

    #[tokio::test]
    async fn every_refusal_has_its_reason() {
        assert_eq!(
            verifier().verify(None).await.err(),
            Some(AuthError::Missing)
        );
        assert_eq!(refusal("static-three").await.reason(), "malformed");
        let claims = |extra: serde_json::Value| {
            let mut claims = json!({"sub": "a", "iss": "chorus-tests", "exp": now() + 60});
            for (key, value) in extra.as_object().expect("object") {
                claims[key] = value.clone();
            }
            claims
        };
        let expired = hs256(&claims(json!({"exp": now() - 60})));
        assert_eq!(refusal(&expired).await, AuthError::Expired);
        let within_leeway = hs256(&claims(json!({"exp": now() - 2})));
        assert!(verifier().verify(Some(&within_leeway)).await.is_ok());
        let early = hs256(&claims(json!({"nbf": now() + 60})));
        assert_eq!(refusal(&early).await, AuthError::NotYetValid);
        let stranger = hs256(&claims(json!({"iss": "someone-else"})));
        assert_eq!(refusal(&stranger).await, AuthError::WrongIssuer);
        let no_issuer = hs256(&json!({"sub": "a", "exp": now() + 60}));
        assert_eq!(refusal(&no_issuer).await, AuthError::WrongIssuer);
        let no_sub = hs256(&json!({"iss": "chorus-tests"}));
        assert_eq!(refusal(&no_sub).await.reason(), "invalid_claims");
        let bad_pattern = hs256(&claims(json!({"channels": ["a*b"]})));
        assert_eq!(refusal(&bad_pattern).await.reason(), "invalid_claims");
        let forged = encode(
            &Header::new(Algorithm::HS256),
            &claims(json!({})),
            &EncodingKey::from_secret(b"another secret"),
        )
        .expect("signs");
        assert_eq!(refusal(&forged).await, AuthError::BadSignature);
        // alg: none, unsigned.
        let b64 = |text: &str| {
            use base64::Engine;
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text)
        };
        let unsigned = format!(
            "{}.{}.",
            b64(r#"{"alg":"none","typ":"JWT"}"#),
            b64(&claims(json!({})).to_string())
        );
        assert_eq!(refusal(&unsigned).await, AuthError::Algorithm);
        assert_eq!(
            refusal(&"x".repeat(MAX_TOKEN_LEN + 1)).await,
            AuthError::Malformed
        );
    }

    #[test]
    fn every_reason_is_listed() {
        for error in [
            AuthError::Missing,
            AuthError::Malformed,
            AuthError::UnknownToken,
            AuthError::BadSignature,
            AuthError::Algorithm,
            AuthError::Expired,
            AuthError::NotYetValid,
            AuthError::WrongIssuer,
            AuthError::WrongAudience,
            AuthError::InvalidClaims("x"),
            AuthError::UnknownKey,
            AuthError::KeysUnavailable,
        ] {
            assert!(AuthError::REASONS.contains(&error.reason()));
        }
    }
}
