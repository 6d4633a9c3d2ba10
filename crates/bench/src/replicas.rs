//! Server processes the load generator starts itself: `idle --replicas R` without
//! `--url` runs R `chorus` processes on loopback, on a backbone when one is given,
//! and stops them when the run ends.

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

/// Starts `count` servers from `bin` on free loopback ports. `backbone` is a
/// `redis://` or `nats://` URL; without one each replica runs standalone, which is
/// enough to hold idle connections. With a JWT secret, the servers require tokens
/// signed with it.
pub async fn spawn(
    bin: &Path,
    count: usize,
    backbone: Option<&str>,
    jwt_secret: Option<&str>,
) -> Result<Replicas, String> {
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
        if let Some(secret) = jwt_secret {
            cmd.env("WS_AUTH_ENABLED", "true")
                .env("WS_JWT_SECRET", secret);
        }
        if let Some(url) = backbone {
            let (adapter, variable) = if url.starts_with("nats://") || url.starts_with("tls://") {
                ("nats", "WS_NATS_URL")
            } else {
                ("redis", "WS_REDIS_URL")
            };
            cmd.env("WS_PUBSUB_ENABLED", "true")
                .env("WS_PUBSUB_ADAPTER", adapter)
                .env(variable, url)
                .env("WS_PUBSUB_CHANNEL", "chorus-bench");
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
    Ok(replicas)
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
}
