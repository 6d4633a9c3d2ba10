//! Keys from a JWKS URL: fetched by whoever knows HTTP (the server hands a
//! [`FetchKeys`] in), cached, fetched again when a token names an unknown key (at most
//! once per refresh interval), and kept while the URL is down.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};

use crate::auth::AuthError;

/// Fetches the JWKS document (its bytes), or says why it could not.
pub trait FetchKeys: Send + Sync + 'static {
    fn fetch(&self) -> Pin<Box<dyn Future<Output = Result<Vec<u8>, String>> + Send>>;
}

#[derive(Default)]
struct KeySet {
    /// Keys by `kid`.
    named: HashMap<String, (DecodingKey, Algorithm)>,
    /// Every key, for tokens that name none.
    all: Vec<(DecodingKey, Algorithm)>,
}

impl KeySet {
    fn find(&self, kid: Option<&str>, algorithm: Algorithm) -> Option<DecodingKey> {
        let matching =
            |(key, alg): &(DecodingKey, Algorithm)| (*alg == algorithm).then(|| key.clone());
        match kid {
            Some(kid) => self.named.get(kid).and_then(matching),
            None => self.all.iter().find_map(matching),
        }
    }
}

/// A cached JWKS.
pub struct Jwks {
    fetcher: Box<dyn FetchKeys>,
    keys: RwLock<Arc<KeySet>>,
    /// When a fetch was last started.
    last_fetch: Mutex<Option<Instant>>,
    /// One fetch at a time; tokens that wait for it then look again.
    fetching: tokio::sync::Mutex<()>,
    min_interval: Duration,
}

impl std::fmt::Debug for Jwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwks")
            .field("keys", &self.read().all.len())
            .field("min_interval", &self.min_interval)
            .finish_non_exhaustive()
    }
}

impl Jwks {
    /// `min_interval` is the shortest time between two fetches (`WS_JWT_JWKS_REFRESH`).
    pub fn new(fetcher: impl FetchKeys, min_interval: Duration) -> Self {
        Self {
            fetcher: Box::new(fetcher),
            keys: RwLock::default(),
            last_fetch: Mutex::new(None),
            fetching: tokio::sync::Mutex::new(()),
            min_interval,
        }
    }

    /// Fetches the document now and replaces the cached keys; on failure the cached
    /// keys stay. Returns how many keys it holds.
    pub async fn refresh(&self) -> Result<usize, String> {
        let _one_at_a_time = self.fetching.lock().await;
        self.fetch_now().await
    }

    /// The key for a token's `kid` and `alg`.
    pub async fn key(
        &self,
        kid: Option<&str>,
        algorithm: Algorithm,
    ) -> Result<DecodingKey, AuthError> {
        if let Some(key) = self.read().find(kid, algorithm) {
            return Ok(key);
        }
        let _one_at_a_time = self.fetching.lock().await;
        // Another token may have fetched while this one waited.
        if let Some(key) = self.read().find(kid, algorithm) {
            return Ok(key);
        }
        let recently = self
            .lock_last()
            .is_some_and(|last| last.elapsed() < self.min_interval);
        if !recently && let Err(why) = self.fetch_now().await {
            tracing::warn!(%why, "cannot fetch the JWKS; cached keys stay in use");
        }
        let keys = self.read();
        match keys.find(kid, algorithm) {
            Some(key) => Ok(key),
            None if keys.all.is_empty() => Err(AuthError::KeysUnavailable),
            None => Err(AuthError::UnknownKey),
        }
    }

    async fn fetch_now(&self) -> Result<usize, String> {
        *self.lock_last() = Some(Instant::now());
        let body = self.fetcher.fetch().await?;
        let set: JwkSet =
            serde_json::from_slice(&body).map_err(|error| format!("not a JWKS: {error}"))?;
        let mut keys = KeySet::default();
        for jwk in &set.keys {
            // Keys this server cannot use (encryption keys, other curves) are skipped.
            let (Some(algorithm), Ok(key)) = (algorithm_of(jwk), DecodingKey::from_jwk(jwk)) else {
                continue;
            };
            if let Some(kid) = &jwk.common.key_id {
                keys.named.insert(kid.clone(), (key.clone(), algorithm));
            }
            keys.all.push((key, algorithm));
        }
        let count = keys.all.len();
        if count == 0 {
            return Err("the JWKS holds no RS256, ES256 or EdDSA key".into());
        }
        *self
            .keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(keys);
        Ok(count)
    }

    fn read(&self) -> Arc<KeySet> {
        Arc::clone(
            &self
                .keys
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    fn lock_last(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.last_fetch
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The algorithm a key is for: its `alg`, or what its type implies.
fn algorithm_of(jwk: &Jwk) -> Option<Algorithm> {
    if let Some(alg) = jwk.common.key_algorithm {
        return match alg {
            KeyAlgorithm::RS256 => Some(Algorithm::RS256),
            KeyAlgorithm::ES256 => Some(Algorithm::ES256),
            KeyAlgorithm::EdDSA => Some(Algorithm::EdDSA),
            _ => None,
        };
    }
    match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => Some(Algorithm::RS256),
        AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
            Some(Algorithm::ES256)
        }
        AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
            Some(Algorithm::EdDSA)
        }
        _ => None,
    }
}
