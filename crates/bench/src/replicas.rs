//! Server processes the load generator starts itself: `idle`, `presence` or `send`
//! with `--replicas R` and without `--url` runs R `chorus` processes on loopback, on a
//! backbone when one is given, and stops them when the run ends.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::conn::Target;

/// How long a replica may take to log its address.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Running replicas; dropping this kills them.
#[derive(Debug)]
pub struct Replicas {
    children: Vec<Child>,
    pub targets: Vec<Target>,
    pub pids: Vec<u32>,
}

/// The `chorus` binary beside the running `chorus-bench` (both live in
/// `target/release/` after `cargo build --release`).
pub fn default_server_bin() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    Some(exe.with_file_name("chorus"))
}

/// How the replicas are configured.
#[derive(Debug, Clone, Default)]
pub struct ReplicaOpts {
    /// A `redis://` or `nats://` URL; without one each replica runs standalone, which
    /// is enough to hold idle connections.
    pub backbone: Option<String>,
    /// With a JWT secret, the servers require tokens signed with it.
    pub jwt_secret: Option<String>,
    /// The cluster's topic prefix (`WS_PUBSUB_CHANNEL`, `chorus-bench` by default); it also names
    /// the presence keys (Redis) and bucket (NATS).
    pub prefix: Option<String>,
    /// More environment (e.g. `WS_NAMESPACES`, `WS_API_KEY`).
    pub env: Vec<(String, String)>,
}

impl ReplicaOpts {
    pub fn prefix(&self) -> &str {
        self.prefix.as_deref().unwrap_or(DEFAULT_PREFIX)
    }
}

/// The topic prefix replicas get unless told otherwise.
pub const DEFAULT_PREFIX: &str = "chorus-bench";

/// Starts `count` servers from `bin` on free loopback ports.
pub async fn spawn(bin: &Path, count: usize, o: &ReplicaOpts) -> Result<Replicas, String> {
    let mut replicas = Replicas {
        children: Vec::new(),
        targets: Vec::new(),
        pids: Vec::new(),
    };
    for i in 0..count {
        let mut cmd = Command::new(bin);
        cmd.env("WS_HOST", "127.0.0.1")
            .env("WS_PORT", "0")
            .env("WS_NODE_ID", format!("bench-replica-{i}"))
            // The `listening` line carries the port the kernel picked.
            .env("WS_LOG_LEVEL", "warn,chorus_server::app=info")
            .env("WS_LOG_FORMAT", "text")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        if let Some(secret) = &o.jwt_secret {
            cmd.env("WS_AUTH_ENABLED", "true")
                .env("WS_JWT_SECRET", secret);
        }
        if let Some(url) = o.backbone.as_deref() {
            let (adapter, variable) = if url.starts_with("nats://") || url.starts_with("tls://") {
                ("nats", "WS_NATS_URL")
            } else {
                ("redis", "WS_REDIS_URL")
            };
            cmd.env("WS_PUBSUB_ENABLED", "true")
                .env("WS_PUBSUB_ADAPTER", adapter)
                .env(variable, url)
                .env("WS_PUBSUB_CHANNEL", o.prefix());
        }
        for (name, value) in &o.env {
            cmd.env(name, value);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("starting {}: {e}", bin.display()))?;
        let pid = child.id().ok_or("a replica exited at once")?;
        let stderr = child.stderr.take().ok_or("no stderr pipe")?;
        replicas.children.push(child);
        let mut lines = BufReader::new(stderr).lines();
        let addr = tokio::time::timeout(START_TIMEOUT, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(addr) = listening_addr(&line) {
                    return Ok(addr);
                }
            }
            Err(format!("replica {i} exited before listening"))
        })
        .await
        .map_err(|_| format!("replica {i} did not listen within {START_TIMEOUT:?}"))??;
        // Keep reading so a chatty replica never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        replicas
            .targets
            .push(Target::parse(&format!("ws://{addr}/ws"))?);
        replicas.pids.push(pid);
    }
    for (i, target) in replicas.targets.iter().enumerate() {
        wait_healthy(target)
            .await
            .map_err(|e| format!("replica {i}: {e}"))?;
    }
    let api_key = o
        .env
        .iter()
        .find(|(name, _)| name == "WS_API_KEY")
        .map(|(_, key)| key.as_str());
    if let (Some(key), Some(_)) = (api_key, &o.backbone) {
        let nodes: Vec<String> = (0..count).map(|i| format!("bench-replica-{i}")).collect();
        for (i, target) in replicas.targets.iter().enumerate() {
            wait_listed(target, key, &nodes)
                .await
                .map_err(|e| format!("replica {i}: {e}"))?;
        }
    }
    Ok(replicas)
}

/// Waits until `info {}` on the replica lists every one of `nodes`: each replica wrote
/// its liveness entry, which it does only after its first round with the presence
/// store (removing an earlier process's leftovers under its node id). Connections a
/// replica accepts before that are removed from presence by that first round and
/// recorded again only afterwards, so a measurement of steady-state presence starts
/// after it (the start-up window is a finding of its own). Asks every 50 ms, within
/// [`START_TIMEOUT`].
async fn wait_listed(target: &Target, api_key: &str, nodes: &[String]) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    let body = r#"{"jsonrpc":"2.0","method":"info","params":{},"id":1}"#;
    loop {
        let last = match crate::http::HttpConn::connect(target.addr).await {
            Ok(mut conn) => match conn.post("/api", Some(api_key), body).await {
                Ok(r) => {
                    let text = String::from_utf8_lossy(&r.body).into_owned();
                    if lists_nodes(&text, nodes) {
                        return Ok(());
                    }
                    text
                }
                Err(e) => e.to_string(),
            },
            Err(e) => e.to_string(),
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(format!(
                "info did not list {nodes:?} within {START_TIMEOUT:?}: {last}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether an `info {}` response lists every one of `nodes`.
fn lists_nodes(response: &str, nodes: &[String]) -> bool {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(response) else {
        return false;
    };
    let listed: Vec<&str> = v["result"]["nodes"]
        .as_array()
        .map(|a| a.iter().filter_map(|n| n["node_id"].as_str()).collect())
        .unwrap_or_default();
    nodes.iter().all(|n| listed.contains(&n.as_str()))
}

/// Waits until the replica's `/health` says `ok`: its backbone and presence store are
/// connected (they connect in the background after the replica listens). The server
/// has no way to announce it, so this asks every 50 ms, within [`START_TIMEOUT`].
async fn wait_healthy(target: &Target) -> Result<(), String> {
    let url = format!("http://{}/health", target.addr);
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    loop {
        let last = match crate::http::get(&url).await {
            Ok(r) => {
                let body = String::from_utf8_lossy(&r.body).into_owned();
                if health_ok(&body) {
                    return Ok(());
                }
                body
            }
            Err(e) => e,
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("not healthy within {START_TIMEOUT:?}: {last}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether a `/health` document says `"status": "ok"`.
fn health_ok(body: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(body)
        .is_ok_and(|v| v["status"].as_str() == Some("ok"))
}

/// The address in chorus's `listening ... local_addr=HOST:PORT ...` log line.
fn listening_addr(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find("local_addr=")? + "local_addr=".len()..];
    let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
    rest[..end].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_address_from_the_listening_line() {
        let line = "2026-11-23T15:00:00Z  INFO chorus_server::app: listening \
                    local_addr=127.0.0.1:40123 node_id=\"n\" path=\"/ws\"";
        assert_eq!(
            listening_addr(line),
            Some("127.0.0.1:40123".parse().expect("addr"))
        );
        assert_eq!(listening_addr("INFO something else"), None);
        assert_eq!(listening_addr("local_addr=nonsense"), None);
    }

    #[test]
    fn health_is_ok_only_when_it_says_so() {
        assert!(health_ok(r#"{"status":"ok","node_id":"n"}"#));
        assert!(!health_ok(r#"{"status":"degraded"}"#));
        assert!(!health_ok("ready"));
    }

    #[test]
    fn waits_for_every_node_in_info() {
        let nodes = vec!["a".to_string(), "b".to_string()];
        let both = r#"{"jsonrpc":"2.0","result":{"nodes":[{"node_id":"a","connections":0},{"node_id":"b"}]},"id":1}"#;
        assert!(lists_nodes(both, &nodes));
        let one = r#"{"jsonrpc":"2.0","result":{"nodes":[{"node_id":"a"}]},"id":1}"#;
        assert!(!lists_nodes(one, &nodes));
        assert!(!lists_nodes(r#"{"error":"x"}"#, &nodes));
        assert!(lists_nodes(one, &[]));
    }
}
