//! The operators' stack, run for real with the shipped files: the deployment configs
//! pass their own tools (promtool, the Kubernetes schemas, nginx -t) and agree with
//! each other; a real Prometheus scrapes three replicas; real nginx with the shipped
//! configuration spreads 300 clients over three replicas on Redis, and drains and a
//! rolling restart lose nothing. These run alone (`.config/nextest.toml`).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;

use crate::backbone::{Kind, Server};
use crate::support::{
    Client, PATIENCE, ServerProcess, eventually, eventually_within, http_get, metric,
};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A tool `scripts/test` installs; the test fails with that hint when it is missing.
pub fn tool(name: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| panic!("{name} is not installed: run scripts/test, which installs it"))
}

fn ops_venv(binary: &str) -> PathBuf {
    let path = root().join("target/ops-venv/bin").join(binary);
    assert!(
        path.is_file(),
        "{} is missing: scripts/test creates target/ops-venv with kubernetes-validate",
        path.display()
    );
    path
}

fn run_ok(program: &Path, args: &[&str], what: &str) -> String {
    let output = std::process::Command::new(program)
        .args(args)
        .current_dir(root())
        .output()
        .unwrap_or_else(|err| panic!("{what}: cannot run {}: {err}", program.display()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{what} failed:\n{text}");
    text
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free port")
}

pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "chorus-{name}-{}-{}",
        std::process::id(),
        free_port()
    ));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// nginx with the shipped configuration, rendered by `scripts/cluster nginx-config`.
pub struct Nginx {
    _child: Child,
    pub port: u16,
    tls_port: u16,
}

impl Nginx {
    pub async fn start(replicas: &[SocketAddr]) -> Self {
        let dir = scratch_dir("nginx");
        let (port, tls_port) = (free_port(), free_port());
        let mut render = std::process::Command::new(root().join("scripts/cluster"));
        render
            .arg("nginx-config")
            .arg(&dir)
            .args(replicas.iter().map(ToString::to_string))
            .env("NGINX_PORT", port.to_string())
            .env("NGINX_TLS_PORT", tls_port.to_string());
        let rendered = render.output().expect("scripts/cluster runs");
        assert!(
            rendered.status.success(),
            "{}",
            String::from_utf8_lossy(&rendered.stderr)
        );
        let conf = dir.join("nginx.conf");
        let pid = format!("daemon off; pid {};", dir.join("nginx.pid").display());
        let child = Command::new(tool("nginx"))
            .arg("-p")
            .arg(&dir)
            .arg("-c")
            .arg(&conf)
            .args(["-g", &pid])
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("access.log")).expect("log file"))
            .stderr(std::fs::File::create(dir.join("error.log")).expect("log file"))
            .kill_on_drop(true)
            .spawn()
            .expect("nginx starts");
        eprintln!("nginx logs in {}", dir.display());
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        eventually("nginx to listen", || async move {
            tokio::net::TcpStream::connect(addr).await.is_ok()
        })
        .await;
        Self {
            _child: child,
            port,
            tls_port,
        }
    }

    fn url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.port)
    }
}

pub async fn replica(redis: &Server, port: u16, name: &str) -> ServerProcess {
    replica_with(redis, port, name, &[]).await
}

/// [`replica`] with more settings.
pub async fn replica_with(
    redis: &Server,
    port: u16,
    name: &str,
    extra: &[(&str, &str)],
) -> ServerProcess {
    let url = redis.url();
    let port = port.to_string();
    let mut vars = vec![
        ("WS_PORT", port.as_str()),
        ("WS_NODE_ID", name),
        ("WS_PUBSUB_ENABLED", "true"),
        ("WS_PUBSUB_ADAPTER", "redis"),
        ("WS_REDIS_URL", url.as_str()),
        ("WS_PUBSUB_CHANNEL", "ops"),
        ("WS_TRUSTED_PROXIES", "127.0.0.1"),
        ("WS_SHUTDOWN_GRACE", "3s"),
    ];
    vars.extend_from_slice(extra);
    let server = ServerProcess::spawn(&vars).await;
    let addr = server.addr;
    eventually("the replica to be ready", || async move {
        http_get(addr, "/ready").await.0 == 200
    })
    .await;
    server
}

#[test]
fn the_shipped_configs_pass_their_own_tools_and_agree() {
    let promtool = tool("promtool");
    for config in [
        "deploy/prometheus/prometheus.yml",
        "deploy/prometheus/prometheus-compose.yml",
    ] {
        run_ok(
            &promtool,
            &["check", "config", config],
            "promtool check config",
        );
    }
    let rules = run_ok(
        &promtool,
        &["check", "rules", "deploy/prometheus/alerts.yml"],
        "promtool check rules",
    );
    assert!(rules.contains("SUCCESS: 12 rules found"), "{rules}");

    let mut manifests = vec!["--strict".to_owned(), "-k".into(), "1.30.0".into()];
    for entry in std::fs::read_dir(root().join("deploy/kubernetes")).expect("manifests") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|ext| ext == "yaml") {
            manifests.push(path.to_string_lossy().into_owned());
        }
    }
    let args: Vec<&str> = manifests.iter().map(String::as_str).collect();
    let validated = run_ok(
        &ops_venv("kubernetes-validate"),
        &args,
        "kubernetes-validate",
    );
    assert!(
        validated.contains("passed for resource deployment/chorus"),
        "{validated}"
    );

    run_ok(
        &ops_venv("python"),
        &["tests/ops/check_configs.py"],
        "tests/ops/check_configs.py",
    );

    let dir = scratch_dir("nginx-t");
    let rendered = std::process::Command::new(root().join("scripts/cluster"))
        .args(["nginx-config"])
        .arg(&dir)
        .args(["127.0.0.1:1", "127.0.0.1:2"])
        .output()
        .expect("scripts/cluster runs");
    assert!(
        rendered.status.success(),
        "{}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    let conf = dir.join("nginx.conf").to_string_lossy().into_owned();
    let prefix = dir.to_string_lossy().into_owned();
    let pid = format!("pid {}/nginx.pid;", prefix);
    run_ok(
        &tool("nginx"),
        &["-t", "-p", &prefix, "-c", &conf, "-g", &pid],
        "nginx -t",
    );

    // The compose files, where a compose tool exists (not on this workplace's machines).
    let compose = std::process::Command::new("docker")
        .args(["compose", "version"])
        .output();
    if compose.is_ok_and(|output| output.status.success()) {
        for file in [
            "docker/docker-compose.yml",
            "docker/docker-compose.scale.yml",
        ] {
            run_ok(
                Path::new("docker"),
                &["compose", "-f", file, "config", "-q"],
                "docker compose config",
            );
        }
    } else {
        eprintln!(
            "docker compose is not installed: the compose files were checked by tests/ops/check_configs.py only"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_every_replica_and_the_dashboard_matches_the_metrics() {
    let redis = Server::start(Kind::Redis);
    let mut replicas = Vec::new();
    for i in 0..3 {
        replicas.push(replica(&redis, free_port(), &format!("prom-{i}")).await);
    }
    // A little traffic, so that every labelled series has moved at least once.
    let mut client = Client::connect_url(&crate::support::ws_url(replicas[0].addr)).await;
    client.ok("subscribe", json!({"channel": "c"})).await;
    client.ok("broadcast", json!({"x": 1})).await;

    let (_, metrics_text) = http_get(replicas[0].addr, "/metrics").await;
    let mut check = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    let mut stdin = check.stdin.take().expect("stdin");
    tokio::io::AsyncWriteExt::write_all(&mut stdin, metrics_text.as_bytes())
        .await
        .expect("write");
    drop(stdin);
    let linted = check.wait_with_output().await.expect("promtool");
    assert!(
        linted.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&linted.stdout),
        String::from_utf8_lossy(&linted.stderr)
    );

    // Every series the dashboard queries is one the replicas export.
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/grafana/chorus-dashboard.json"))
            .expect("dashboard"),
    )
    .expect("JSON");
    let mut queried = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if word.starts_with("ws_") || word.starts_with("process_") {
                    queried.push(word.to_owned());
                }
            }
        }
    }
    assert!(queried.len() > 15, "{queried:?}");
    for series in &queried {
        assert!(
            metrics_text
                .lines()
                .any(|line| line.starts_with(series.as_str())),
            "the dashboard queries {series}, which /metrics does not export"
        );
    }

    // A real Prometheus with the shipped alert rules, scraping the three replicas.
    let dir = scratch_dir("prometheus");
    let alerts = root().join("deploy/prometheus/alerts.yml");
    let targets: Vec<String> = replicas.iter().map(|r| format!("'{}'", r.addr)).collect();
    let config = format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: ['{}']\n\
         scrape_configs:\n  - job_name: chorus\n    static_configs:\n      - targets: [{}]\n",
        alerts.display(),
        targets.join(", ")
    );
    std::fs::write(dir.join("prometheus.yml"), config).expect("config");
    let port = free_port();
    let _prometheus = Command::new(tool("prometheus"))
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("prometheus starts");
    let api = SocketAddr::from(([127, 0, 0, 1], port));
    eventually_within(
        Duration::from_secs(30),
        "every target to be up",
        || async move {
            let Ok(output) = std::process::Command::new("curl")
                .args(["-sf", &format!("http://{api}/api/v1/targets")])
                .output()
            else {
                return false;
            };
            let Ok(answer) = serde_json::from_slice::<Value>(&output.stdout) else {
                return false;
            };
            let active = answer["data"]["activeTargets"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            active.len() == 3 && active.iter().all(|t| t["health"] == "up")
        },
    )
    .await;
    // Prometheus answers in chunks: curl reads them.
    let rules = run_ok(
        &tool("curl"),
        &["-sf", &format!("http://{api}/api/v1/rules")],
        "rules",
    );
    let rules: Value = serde_json::from_str(&rules).expect("JSON");
    let loaded = rules["data"]["groups"][0]["rules"]
        .as_array()
        .map_or(0, Vec::len);
    assert_eq!(loaded, 12, "the shipped alert rules load");
}

/// One client's life through nginx, as the test's fleet records it.
#[derive(Default)]
struct Member {
    node: String,
    connected: bool,
    /// Broadcast number to times received.
    received: HashMap<u64, u32>,
    /// The last `sys.shutdown`: when it came and the delay it announced.
    notice: Option<(Instant, Duration)>,
    reconnects: Vec<Reconnect>,
}

struct Reconnect {
    from: String,
    to: String,
    /// When the client started to reconnect, and how long after the notice.
    started: Instant,
    after_notice: Duration,
    announced: Duration,
}

type Fleet = Arc<Mutex<Vec<Member>>>;

/// Connects through nginx, reads everything, and on `sys.shutdown` reconnects after
/// the announced delay, as a well-behaved client does.
async fn member(index: usize, url: String, fleet: Fleet) {
    let mut previous: Option<String> = None;
    loop {
        let started = Instant::now();
        let socket = loop {
            match tokio_tungstenite::connect_async(url.as_str()).await {
                Ok((socket, _)) => break socket,
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        };
        let (mut sink, mut stream) = socket.split();
        let mut node = String::new();
        while let Some(Ok(message)) = stream.next().await {
            let Message::Text(text) = message else {
                continue;
            };
            let Ok(value) = serde_json::from_str::<Value>(&text) else {
                continue;
            };
            let mut fleet = fleet.lock().expect("not poisoned");
            let me = &mut fleet[index];
            match value["method"].as_str() {
                Some("sys.connected") => {
                    node = value["params"]["node_id"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned();
                    if let (Some(from), Some((noticed, announced))) = (&previous, me.notice) {
                        me.reconnects.push(Reconnect {
                            from: from.clone(),
                            to: node.clone(),
                            started,
                            after_notice: started - noticed,
                            announced,
                        });
                    }
                    me.node.clone_from(&node);
                    me.connected = true;
                }
                Some("broadcast") => {
                    if let Some(seq) = value["params"]["seq"].as_u64() {
                        *me.received.entry(seq).or_default() += 1;
                    }
                }
                Some("sys.shutdown") => {
                    let announced = value["params"]["reconnect_after_ms"].as_u64().unwrap_or(0);
                    me.notice = Some((Instant::now(), Duration::from_millis(announced)));
                }
                _ => {}
            }
        }
        let _ = sink.close().await;
        let notice = {
            let mut fleet = fleet.lock().expect("not poisoned");
            fleet[index].connected = false;
            fleet[index].notice
        };
        previous = Some(node);
        match notice {
            Some((noticed, announced)) => tokio::time::sleep_until(noticed + announced).await,
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// Broadcasts `seq` through nginx and waits until every member has it, exactly once.
async fn broadcast_reaches_everyone_once(nginx: &Nginx, fleet: &Fleet, seq: u64) {
    let mut publisher = Client::connect_url(&nginx.url()).await;
    publisher.ok("broadcast", json!({"seq": seq})).await;
    let count = fleet.lock().expect("not poisoned").len();
    eventually(&format!("broadcast {seq} to reach all {count}"), || async {
        fleet
            .lock()
            .expect("not poisoned")
            .iter()
            .all(|member| member.received.contains_key(&seq))
    })
    .await;
    // A second broadcast from the same publisher arrives after any duplicate of the first.
    publisher.ok("broadcast", json!({"seq": seq + 1000})).await;
    eventually("the follow-up broadcast", || async {
        fleet
            .lock()
            .expect("not poisoned")
            .iter()
            .all(|member| member.received.contains_key(&(seq + 1000)))
    })
    .await;
    let fleet = fleet.lock().expect("not poisoned");
    for (index, member) in fleet.iter().enumerate() {
        assert_eq!(
            member.received.get(&seq),
            Some(&1),
            "client {index}: broadcast {seq} exactly once"
        );
    }
}

/// Drains replica `victim` with SIGTERM and checks its clients: each got the notice,
/// reconnected through nginx to another replica after its announced delay, and the
/// reconnects were spread over the grace period.
async fn drain(replicas: &mut [ServerProcess], victim: usize, fleet: &Fleet) {
    let name = format!("nginx-{victim}");
    let on_victim: Vec<usize> = fleet
        .lock()
        .expect("not poisoned")
        .iter()
        .enumerate()
        .filter(|(_, member)| member.node == name && member.connected)
        .map(|(index, _)| index)
        .collect();
    let before: Vec<usize> = {
        let fleet = fleet.lock().expect("not poisoned");
        on_victim
            .iter()
            .map(|&i| fleet[i].reconnects.len())
            .collect()
    };
    let sigterm = Instant::now();
    replicas[victim].signal("TERM");
    let grace = Duration::from_secs(3);
    let deadline = Instant::now() + grace + PATIENCE;
    loop {
        let (back, states) = {
            let fleet = fleet.lock().expect("not poisoned");
            let back = on_victim
                .iter()
                .zip(&before)
                .filter(|&(&i, &n)| fleet[i].connected && fleet[i].reconnects.len() > n)
                .count();
            let states: Vec<String> = on_victim
                .iter()
                .take(5)
                .map(|&i| {
                    let m = &fleet[i];
                    format!(
                        "{}:{}:{}:{:?}",
                        m.node,
                        m.connected,
                        m.reconnects.len(),
                        m.notice.map(|n| n.1)
                    )
                })
                .collect();
            (back, states)
        };
        if back == on_victim.len() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{back} of {} clients of {name} came back; some: {states:?}",
            on_victim.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = tokio::time::timeout(PATIENCE, replicas[victim].child.wait())
        .await
        .expect("the drained replica exits in time")
        .expect("status");
    assert_eq!(status.code(), Some(0));

    let fleet = fleet.lock().expect("not poisoned");
    let mut tenths = [0usize; 10];
    for (&i, &n) in on_victim.iter().zip(&before) {
        let reconnect = &fleet[i].reconnects[n];
        assert_eq!(reconnect.from, name);
        assert_ne!(
            reconnect.to, name,
            "client {i} reconnected to the replica that drains"
        );
        assert!(
            reconnect.announced < grace,
            "client {i}: {:?} is within the grace period",
            reconnect.announced
        );
        assert!(
            reconnect.after_notice >= reconnect.announced
                && reconnect.after_notice < reconnect.announced + Duration::from_secs(2),
            "client {i} reconnected {:?} after the notice, {:?} announced",
            reconnect.after_notice,
            reconnect.announced
        );
        let tenth =
            ((reconnect.started - sigterm).as_secs_f64() / grace.as_secs_f64() * 10.0) as usize;
        tenths[tenth.min(9)] += 1;
    }
    eprintln!(
        "drained {name}: {} clients reconnected; per tenth of the grace period: {tenths:?}",
        on_victim.len()
    );
    if on_victim.len() >= 30 {
        let most = *tenths.iter().max().unwrap_or(&0);
        assert!(
            most * 3 <= on_victim.len(),
            "reconnects of {name} bunch up: {tenths:?} of {}",
            on_victim.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_spreads_clients_and_draining_replicas_lose_nothing() {
    const CLIENTS: usize = 300;
    let redis = Server::start(Kind::Redis);
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut replicas = Vec::new();
    for (i, port) in ports.iter().enumerate() {
        replicas.push(replica(&redis, *port, &format!("nginx-{i}")).await);
    }
    let addrs: Vec<SocketAddr> = replicas.iter().map(|r| r.addr).collect();
    let nginx = Nginx::start(&addrs).await;

    // TLS is terminated by nginx: /health answers over https with the test certificate.
    let tls = std::process::Command::new(tool("curl"))
        .args([
            "-ksf",
            &format!("https://127.0.0.1:{}/health", nginx.tls_port),
        ])
        .output()
        .expect("curl runs");
    assert!(
        tls.status.success(),
        "https through nginx: {}",
        String::from_utf8_lossy(&tls.stderr)
    );

    let fleet: Fleet = Arc::new(Mutex::new(
        (0..CLIENTS).map(|_| Member::default()).collect(),
    ));
    let mut members = Vec::new();
    for index in 0..CLIENTS {
        members.push(tokio::spawn(member(index, nginx.url(), Arc::clone(&fleet))));
    }
    eventually_within(
        Duration::from_secs(30),
        "300 clients to connect",
        || async {
            fleet
                .lock()
                .expect("not poisoned")
                .iter()
                .all(|member| member.connected)
        },
    )
    .await;
    let mut total = 0.0;
    for addr in &addrs {
        let active = metric(*addr, "ws_connections_active").await;
        assert!(
            active >= 50.0,
            "nginx spreads the clients: {active} on {addr}"
        );
        total += active;
    }
    assert_eq!(total, CLIENTS as f64);
    broadcast_reaches_everyone_once(&nginx, &fleet, 1).await;

    // One replica drains; its clients come back through nginx; nothing is lost after.
    drain(&mut replicas, 0, &fleet).await;
    broadcast_reaches_everyone_once(&nginx, &fleet, 2).await;
    replicas[0] = replica(&redis, ports[0], "nginx-0").await;

    // A rolling restart, one replica at a time.
    for victim in [1, 2, 0] {
        drain(&mut replicas, victim, &fleet).await;
        replicas[victim] = replica(&redis, ports[victim], &format!("nginx-{victim}")).await;
    }
    assert!(
        fleet
            .lock()
            .expect("not poisoned")
            .iter()
            .all(|member| member.connected),
        "every client ends connected"
    );
    broadcast_reaches_everyone_once(&nginx, &fleet, 3).await;
    for task in members {
        task.abort();
    }
}
