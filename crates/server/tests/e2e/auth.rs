//! Section 8 as a client meets it: tokens checked before the upgrade (static, HS256,
//! RS256, ES256, EdDSA, a JWKS served by a real HTTP server and rotated meanwhile),
//! every refusal a 401 with its reason, grants on subscribe and publish, the per-user
//! cap, and a JWT connection's expiry and refresh. Keys are made by `openssl`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::support::{Client, metric, raw_upgrade, server, ws_url};

const SECRET: &str = "an hs256 secret of more than thirty-two bytes";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// A key pair made by `openssl`, in PEM.
struct KeyPair {
    private: String,
    public: String,
    /// RSA only: the modulus, base64url, for a JWK.
    modulus: Option<String>,
}

fn openssl(args: &[&str]) -> Vec<u8> {
    let output = std::process::Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl runs (scripts/test installs it)");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

fn key_pair(kind: &str) -> KeyPair {
    let dir = std::env::temp_dir().join(format!(
        "chorus-keys-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let private_path: PathBuf = dir.join("private.pem");
    let private_file = private_path.to_string_lossy().into_owned();
    let generate: &[&str] = match kind {
        "rsa" => &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        "ec" => &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
        "ed25519" => &["-algorithm", "ED25519"],
        other => panic!("unknown key kind {other}"),
    };
    let mut args = vec!["genpkey"];
    args.extend_from_slice(generate);
    args.extend_from_slice(&["-out", &private_file]);
    openssl(&args);
    let public =
        String::from_utf8(openssl(&["pkey", "-in", &private_file, "-pubout"])).expect("PEM");
    let modulus = (kind == "rsa").then(|| {
        let text = String::from_utf8(openssl(&[
            "rsa",
            "-in",
            &private_file,
            "-noout",
            "-modulus",
        ]))
        .expect("text");
        let hex = text.trim().trim_start_matches("Modulus=");
        let bytes: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|at| u8::from_str_radix(&hex[at..at + 2], 16).expect("hex"))
            .collect();
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    });
    let private = std::fs::read_to_string(&private_path).expect("private key");
    let _ = std::fs::remove_dir_all(&dir);
    KeyPair {
        private,
        public,
        modulus,
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::Instant::now())
}

fn sign(algorithm: Algorithm, key: &EncodingKey, claims: &Value, kid: Option<&str>) -> String {
    let mut header = Header::new(algorithm);
    header.kid = kid.map(str::to_owned);
    jsonwebtoken::encode(&header, claims, key).expect("signs")
}

fn hs256(claims: &Value) -> String {
    sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(SECRET.as_bytes()),
        claims,
        None,
    )
}

fn claims(sub: &str) -> Value {
    json!({"sub": sub, "exp": now() + 600})
}

fn bearer(token: &str) -> [(&'static str, String); 1] {
    [("Authorization", format!("Bearer {token}"))]
}

async fn status_with(addr: std::net::SocketAddr, token: &str) -> (u16, String) {
    let header = bearer(token);
    let answer = raw_upgrade(addr, "/ws", &[(header[0].0, header[0].1.as_str())]).await;
    (answer.status, answer.body)
}

async fn connect_with(addr: std::net::SocketAddr, token: &str) -> Client {
    Client::connect_url(&format!("{}?token={token}", ws_url(addr))).await
}

#[tokio::test]
async fn every_bad_token_is_refused_with_401_and_its_reason() {
    let rsa = key_pair("rsa");
    let server = server(&[
        ("WS_AUTH_ENABLED", "true"),
        ("WS_BEARER_TOKENS", "static-token-1,static-token-2"),
        ("WS_JWT_SECRET", SECRET),
        ("WS_JWT_PUBLIC_KEY", &rsa.public),
        ("WS_JWT_ISSUER", "https://id.example"),
        ("WS_JWT_AUDIENCE", "chorus"),
    ])
    .await;
    let addr = server.local_addr;
    let good = |extra: Value| {
        let mut claims = json!({"sub": "alice", "iss": "https://id.example", "aud": "chorus", "exp": now() + 600});
        for (key, value) in extra.as_object().expect("object") {
            claims[key] = value.clone();
        }
        claims
    };
    let rsa_key = EncodingKey::from_rsa_pem(rsa.private.as_bytes()).expect("RSA key");
    let unsigned = {
        let b64 = |text: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(text);
        format!(
            "{}.{}.",
            b64(r#"{"alg":"none","typ":"JWT"}"#),
            b64(&good(json!({})).to_string())
        )
    };
    let cases: Vec<(&str, String, &str)> = vec![
        ("wrong static token", "static-token-3".into(), "malformed"),
        (
            "expired",
            hs256(&good(json!({"exp": now() - 60}))),
            "expired",
        ),
        (
            "not yet valid",
            hs256(&good(json!({"nbf": now() + 600}))),
            "not_yet_valid",
        ),
        (
            "wrong signature",
            sign(
                Algorithm::HS256,
                &EncodingKey::from_secret(b"not the server's secret, at all"),
                &good(json!({})),
                None,
            ),
            "bad_signature",
        ),
        ("alg none", unsigned, "algorithm"),
        (
            "wrong issuer",
            hs256(&good(json!({"iss": "https://evil.example"}))),
            "wrong_issuer",
        ),
        (
            "no issuer",
            hs256(&json!({"sub": "a", "aud": "chorus", "exp": now() + 600})),
            "wrong_issuer",
        ),
        (
            "wrong audience",
            hs256(&good(json!({"aud": "someone-else"}))),
            "wrong_audience",
        ),
        (
            "RS256 with the wrong key",
            sign(
                Algorithm::RS256,
                &EncodingKey::from_rsa_pem(key_pair("rsa").private.as_bytes()).expect("RSA key"),
                &good(json!({})),
                None,
            ),
            "bad_signature",
        ),
    ];
    for (what, token, reason) in &cases {
        let (status, body) = status_with(addr, token).await;
        assert_eq!(status, 401, "{what}");
        let body: Value = serde_json::from_str(&body).expect("a JSON body");
        assert_eq!(body["error"], *reason, "{what}");
    }
    let (status, body) = {
        let answer = raw_upgrade(addr, "/ws", &[]).await;
        (answer.status, answer.body)
    };
    assert_eq!(status, 401, "no token");
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("JSON")["error"],
        "missing"
    );
    assert_eq!(
        metric(addr, r#"ws_auth_failures_total{reason="missing"}"#).await,
        1.0
    );
    assert_eq!(
        metric(addr, r#"ws_auth_failures_total{reason="expired"}"#).await,
        1.0
    );
    // Valid ones pass: static, HS256, RS256.
    for token in [
        "static-token-2".to_owned(),
        hs256(&good(json!({}))),
        sign(Algorithm::RS256, &rsa_key, &good(json!({})), None),
    ] {
        assert_eq!(status_with(addr, &token).await.0, 101);
    }
}

/// An HS256 token whose secret is the RSA public key's PEM, against a server that
/// checks RS256 with that key: the key's family follows the algorithm, never the token.
#[tokio::test]
async fn algorithm_confusion_is_refused() {
    let rsa = key_pair("rsa");
    let server = server(&[
        ("WS_AUTH_ENABLED", "true"),
        ("WS_JWT_PUBLIC_KEY", &rsa.public),
    ])
    .await;
    let confused = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(rsa.public.as_bytes()),
        &claims("mallory"),
        None,
    );
    let (status, body) = status_with(server.local_addr, &confused).await;
    assert_eq!(status, 401);
    assert_eq!(
        serde_json::from_str::<Value>(&body).expect("JSON")["error"],
        "algorithm"
    );
    let honest = sign(
        Algorithm::RS256,
        &EncodingKey::from_rsa_pem(rsa.private.as_bytes()).expect("key"),
        &claims("alice"),
        None,
    );
    assert_eq!(status_with(server.local_addr, &honest).await.0, 101);
}

#[tokio::test]
async fn es256_and_eddsa_public_keys_are_accepted() {
    for (kind, algorithm) in [("ec", Algorithm::ES256), ("ed25519", Algorithm::EdDSA)] {
        let pair = key_pair(kind);
        let server = server(&[
            ("WS_AUTH_ENABLED", "true"),
            ("WS_JWT_PUBLIC_KEY", &pair.public),
        ])
        .await;
        let key = match algorithm {
            Algorithm::ES256 => EncodingKey::from_ec_pem(pair.private.as_bytes()),
            _ => EncodingKey::from_ed_pem(pair.private.as_bytes()),
        }
        .expect("private key");
        let token = sign(
            algorithm,
            &key,
            &json!({"sub": "carol", "device": kind, "exp": now() + 600}),
            None,
        );
        let client = connect_with(server.local_addr, &token).await;
        assert_eq!(client.greeting["params"]["user"], "carol", "{kind}");
        assert_eq!(client.greeting["params"]["device"], kind);
    }
}

/// A JWKS URL served by a real HTTP server, whose keys rotate during the test.
struct JwksServer {
    addr: std::net::SocketAddr,
    document: Arc<Mutex<String>>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    async fn start(document: String) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let document = Arc::new(Mutex::new(document));
        let serving = Arc::clone(&document);
        let task = tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let body = serving.lock().expect("not poisoned").clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut byte = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") {
                        if socket.read(&mut byte).await.unwrap_or(0) == 0 {
                            return;
                        }
                        head.push(byte[0]);
                    }
                    let response = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = socket.write_all(response.as_bytes()).await;
                });
            }
        });
        Self {
            addr,
            document,
            task,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/.well-known/jwks.json", self.addr)
    }

    fn serve(&self, document: String) {
        *self.document.lock().expect("not poisoned") = document;
    }
}

fn jwks(keys: &[(&str, &KeyPair)]) -> String {
    let keys: Vec<Value> = keys
        .iter()
        .map(|(kid, pair)| {
            json!({"kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig",
                   "n": pair.modulus.as_deref().expect("RSA"), "e": "AQAB"})
        })
        .collect();
    json!({ "keys": keys }).to_string()
}

#[tokio::test]
async fn jwks_keys_are_fetched_rotated_and_served_stale_while_down() {
    let (first, second) = (key_pair("rsa"), key_pair("rsa"));
    let jwks_server = JwksServer::start(jwks(&[("k1", &first)])).await;
    let server = server(&[
        ("WS_AUTH_ENABLED", "true"),
        ("WS_JWT_JWKS_URL", &jwks_server.url()),
        ("WS_JWT_JWKS_REFRESH", "1s"),
    ])
    .await;
    let addr = server.local_addr;
    let token = |pair: &KeyPair, kid: &str| {
        sign(
            Algorithm::RS256,
            &EncodingKey::from_rsa_pem(pair.private.as_bytes()).expect("key"),
            &claims("dave"),
            Some(kid),
        )
    };
    assert_eq!(status_with(addr, &token(&first, "k1")).await.0, 101);

    // Rotation: the identity provider now signs with k2 and publishes only k2.
    jwks_server.serve(jwks(&[("k2", &second)]));
    crate::support::eventually("the new key to be fetched", || async {
        status_with(addr, &token(&second, "k2")).await.0 == 101
    })
    .await;
    crate::support::eventually("the retired key to be forgotten", || async {
        status_with(addr, &token(&first, "k1"))
            .await
            .1
            .contains("unknown_key")
    })
    .await;

    // The URL goes down: the cached k2 still works.
    jwks_server.task.abort();
    tokio::time::sleep(Duration::from_millis(1100)).await; // past the refresh interval
    assert_eq!(status_with(addr, &token(&first, "k1")).await.0, 401);
    assert_eq!(status_with(addr, &token(&second, "k2")).await.0, 101);
}

#[tokio::test]
async fn grants_are_enforced_on_subscribe_and_publish() {
    let server = server(&[("WS_AUTH_ENABLED", "true"), ("WS_JWT_SECRET", SECRET)]).await;
    let addr = server.local_addr;
    let token = hs256(&json!({
        "sub": "erin", "exp": now() + 600,
        "channels": ["items:*"], "subscribe": ["news"], "publish": ["inbox:frank"]
    }));
    let mut client = connect_with(addr, &token).await;
    assert_eq!(client.greeting["params"]["user"], "erin");
    assert!(client.greeting["params"].get("device").is_none());
    for (method, channel, allowed) in [
        ("subscribe", "items:1", true),
        ("subscribe", "news", true),
        ("subscribe", "inbox:frank", false),
        ("subscribe", "secrets", false),
        ("publish", "items:1", true),
        ("publish", "inbox:frank", true),
        ("publish", "news", false),
    ] {
        let params = match method {
            "publish" => json!({"channel": channel, "data": 1}),
            _ => json!({"channel": channel}),
        };
        let reply = client.call(method, params).await;
        if allowed {
            assert!(reply.get("result").is_some(), "{method} {channel}: {reply}");
        } else {
            assert_eq!(
                reply["error"]["code"], -32003,
                "{method} {channel}: {reply}"
            );
            assert_eq!(reply["error"]["data"], json!({"channel": channel}));
        }
    }
}

#[tokio::test]
async fn a_user_counts_its_connections_on_the_replica() {
    let server = server(&[
        ("WS_AUTH_ENABLED", "true"),
        ("WS_JWT_SECRET", SECRET),
        ("WS_MAX_CONNECTIONS_PER_USER", "2"),
    ])
    .await;
    let addr = server.local_addr;
    let phone = connect_with(
        addr,
        &hs256(&json!({"sub": "gina", "device": "phone", "exp": now() + 600})),
    )
    .await;
    let laptop = connect_with(
        addr,
        &hs256(&json!({"sub": "gina", "device": "laptop", "exp": now() + 600})),
    )
    .await;
    for client in [&phone, &laptop] {
        assert_eq!(client.greeting["params"]["user"], "gina");
    }
    let (status, _) = status_with(addr, &hs256(&claims("gina"))).await;
    assert_eq!(status, 429, "a third connection of the same user");
    assert_eq!(
        status_with(addr, &hs256(&claims("hank"))).await.0,
        101,
        "another user"
    );
    assert_eq!(
        metric(addr, r#"ws_rate_limited_total{scope="user"}"#).await,
        1.0
    );
}

#[tokio::test]
async fn a_jwt_connection_closes_when_its_token_expires_unless_refreshed() {
    let server = server(&[
        ("WS_AUTH_ENABLED", "true"),
        ("WS_JWT_SECRET", SECRET),
        ("WS_JWT_LEEWAY", "0s"),
    ])
    .await;
    let addr = server.local_addr;
    let short = |sub: &str| hs256(&json!({"sub": sub, "exp": now() + 2}));
    let mut lapsing = connect_with(addr, &short("ivy")).await;
    assert_eq!(lapsing.close_code().await, Some(CloseCode::Library(4001)));

    let mut kept = connect_with(addr, &short("jack")).await;
    let first_exp = now() + 2;
    let refreshed = kept
        .ok(
            "auth.refresh",
            json!({"token": hs256(&json!({"sub": "jack", "exp": now() + 600}))}),
        )
        .await;
    assert!(refreshed["exp"].as_u64().is_some_and(|exp| exp > first_exp));
    let other_user = kept
        .call("auth.refresh", json!({"token": hs256(&claims("mallory"))}))
        .await;
    assert_eq!(other_user["error"]["code"], -32003);
    // Past the first token's expiry, the connection still answers.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(kept.ok("ping", Value::Null).await, "pong");
}

#[tokio::test]
async fn a_static_token_connects_without_a_user() {
    let server = server(&[
        ("WS_AUTH_ENABLED", "true"),
        ("WS_BEARER_TOKENS", "service-key"),
    ])
    .await;
    let mut client = connect_with(server.local_addr, "service-key").await;
    assert!(client.greeting["params"].get("user").is_none());
    client.ok("subscribe", json!({"channel": "anything"})).await;
    let refresh = client
        .call("auth.refresh", json!({"token": "service-key"}))
        .await;
    assert_eq!(
        refresh["error"]["code"], -32601,
        "no JWT configured: {refresh}"
    );
}
