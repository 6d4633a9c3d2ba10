//! chorus-bench command line. See `chorus-bench --help`.

use chorus_bench::Common;
use chorus_bench::conn::Target;
use chorus_bench::fanout::{self, FanoutOpts};
use chorus_bench::idle::{self, IdleOpts, WorkerOpts};
use chorus_bench::presence::{self, PresenceOpts};
use chorus_bench::recover::{self, RecoverOpts};
use chorus_bench::replicas::{self, ReplicaOpts};
use chorus_bench::report::{self, Report};
use chorus_bench::rpc::{self, RpcOpts};
use chorus_bench::send::{self, SendOpts};
use chorus_bench::sse::{self, SseOpts};
use chorus_bench::store::Probe;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

const USAGE: &str = "\
chorus-bench: load generator for the Chorus JSON-RPC WebSocket server

USAGE:
  chorus-bench <idle|fanout|rpc|cluster|presence|send|recover|sse> [OPTIONS]
  chorus-bench backend [--listen ADDR]   (a trivial backend for the rpc proxy)
  chorus-bench report [--baseline LABEL] FILE_OR_DIR...   (Markdown from --json results)

COMMON OPTIONS:
  --url URL             target, ws://host:port/path on loopback only; repeat or
                        comma-separate for replicas   [ws://127.0.0.1:8080/ws]
  --label NAME          name of the target in the report            [chorus]
  --no-hello            do not wait for sys.connected after the upgrade
                        (for peers that cannot send it, e.g. jsonrpsee)
  --json                print the JSON document instead of the table
  --out FILE            also write the JSON document to FILE
  --quiet               no progress bar or status lines on stderr
  --concurrency N       connections being opened at once            [256]
  --connect-timeout S   bound on one connect + upgrade + hello      [15]
  --timeout S           hard bound on the whole run (exit 3)        [600]

idle:     --conns N (19000 x replicas)  --server-pid PID (repeat)
          --jwt-secret S: each connection carries its own HS256 token signed with S
          (user-N, device-N; also read from CHORUS_BENCH_JWT_SECRET)
          --per-worker N (10000, one process per N connections)  --hold S (2)
          --replicas R: with --url, R URLs to spread over; without, start R chorus
          processes here (--server-bin PATH [the chorus beside chorus-bench],
          --backbone redis://... or nats://... [none: standalone]), measure
          their RSS, and stop them at the end
fanout:   --subs N (10000)  --messages M (1000)  --rate PER_S (0 = flat out: a burst)
          --payload BYTES (64)  --channel NAME  --warmup S (15)  --drain S (3)
          reports subscribers_dropped (connections the server closed before the end);
          a server with publish budgets refuses a flat-out publisher: lift them
          (chorus: WS_PUBLISH_RATE=0 WS_PUBLISH_BYTES_RATE=0 WS_PUBLISH_RATE_TOTAL=0
          WS_PUBLISH_BYTES_TOTAL=0), or publish_errors counts the refusals
rpc:      --conns K (100)  --depth D (10)  --requests N per conn (2000)
          --duration S (10)  --payload BYTES (32)  --method NAME (self.reply)
          --proxied NAME: a method the server relays to its backend (WS_PROXY_RPC_URL,
          e.g. chorus-bench backend); --rounds N (3) rounds of each, alternating, and
          their medians and local_over_proxied_rps in the report
backend:  --listen ADDR (127.0.0.1:9100): a trivial rpc proxy backend that answers
          every relayed call with its params (point WS_PROXY_RPC_URL at /rpc)
cluster:  needs 2+ URLs; publisher on the first; --subs-per-replica N (1000)
          --messages M (5000)  --rate PER_S (1000)  and the fanout options
presence: --members N (20000) connections, one user each, spread over the replicas
          (worker processes), all subscribing at once to --channel (room:bench, a
          namespace with presence: true); then one measuring client per replica makes
          --stats-calls N (2000) presence_stats calls and --walks N (5) walks over the
          whole channel in pages of --page N (100), one call at a time each, the
          clients side by side; checks every walk returns each member exactly once.
          Reports the join rate, latencies, and the store's growth per connection
          and per member from --memory-probe URL: redis://HOST:PORT (INFO memory
          used_memory) or http://HOST:PORT (nats-server -m: the presence bucket's
          stream bytes); default: the --backbone when it is Redis.
          Needs tokens (--jwt-secret); every token grants the channel.
send:     --users N (19000) connected users held by worker processes; this process
          connects --targets N (300) more users, spread over the replicas, each also
          subscribed to its own channel user:<i>:inbox; then POST /api with
          --api-key KEY (or CHORUS_BENCH_API_KEY) through the replicas in turn:
          --messages M (30000) calls per phase, --in-flight N (32) at once,
          --rate PER_S (0 = flat out), --payload BYTES (64), --drain S (5);
          phases alternate send {users: [one target]} and publish to the target's
          channel (the same-run peer), --rounds K (3) of each. Reports deliveries/s,
          latency from the POST's start to the target's receipt (local: posted to
          the target's own replica; remote: the others), losses, duplicates.
recover:  --clients N (1000) subscribe to --channel (hist:bench, a namespace with
          history) spread over the replicas, note its position and leave; a
          publisher makes --missed M (100) publications; all reconnect, each to the
          next replica, and subscribe at once with since: reports the reply latency,
          clients that got exactly the M in order with recovered: true, and each
          replica's store reads for it (ws_history_reads_total{reason=\"recovery\"}).
presence and send with --replicas R and no --url start R chorus processes as for
idle (--backbone, --server-bin), with auth on (a generated --jwt-secret unless
given), WS_API_KEY (--api-key, generated unless given) and, for presence,
WS_NAMESPACES='{<the channel's namespace>: {presence: true}}'. fanout, cluster and
recover do too, without auth and with the publish budgets lifted (WS_PUBLISH_RATE=0
and the three others); recover sets WS_NAMESPACES='{<namespace>: {history_size:
1000}}'. --env NAME=VALUE (repeat) adds to (or overrides) the replicas' environment.
--jwt-grant PATTERN (repeat): more channel patterns in every minted token.
sse:      Server-Sent Events against WebSocket in the same run: each of --rounds K (3)
          starts a fresh chorus (--server-bin) per transport, opens --subs N (10000)
          subscribers of one channel (WebSocket subscribe, or GET /events?channel=),
          reads the server's RSS growth per connection after --hold S (2), then
          publishes --messages M (100) at --rate PER_S (0 = flat out) with --payload
          BYTES (64) and measures deliveries/s and latency; medians and SSE/WS ratios.
          Keep --subs under the open-file limit (one process holds every subscriber).
";

#[derive(Debug, Default)]
struct Args {
    cmd: String,
    urls: Vec<String>,
    label: Option<String>,
    no_hello: bool,
    json: bool,
    out: Option<PathBuf>,
    quiet: bool,
    concurrency: Option<usize>,
    connect_timeout: Option<f64>,
    timeout: Option<f64>,
    // idle
    conns: Option<usize>,
    replicas: Option<usize>,
    server_pids: Vec<u32>,
    per_worker: Option<usize>,
    hold: Option<f64>,
    index_base: usize,
    server_bin: Option<PathBuf>,
    backbone: Option<String>,
    jwt_secret: Option<String>,
    jwt_grants: Vec<String>,
    // presence / send
    members: Option<usize>,
    stats_calls: Option<usize>,
    walks: Option<usize>,
    page: Option<usize>,
    memory_probe: Option<String>,
    users: Option<usize>,
    targets: Option<usize>,
    in_flight: Option<usize>,
    rounds: Option<usize>,
    api_key: Option<String>,
    // recover
    clients: Option<usize>,
    missed: Option<u64>,
    /// More environment for replicas this process starts.
    env: Vec<(String, String)>,
    // fanout / cluster
    subs: Option<usize>,
    subs_per_replica: Option<usize>,
    messages: Option<u64>,
    rate: Option<f64>,
    payload: Option<usize>,
    channel: Option<String>,
    warmup: Option<f64>,
    drain: Option<f64>,
    // rpc
    depth: Option<usize>,
    requests: Option<u64>,
    duration: Option<f64>,
    method: Option<String>,
    proxied: Option<String>,
    // backend
    listen: Option<std::net::SocketAddr>,
    /// The replicas were started by this process (not given with --url).
    urls_were_started: bool,
    // report
    baseline: Option<String>,
    files: Vec<PathBuf>,
}

fn parse_args() -> Result<Args, lexopt::Error> {
    use lexopt::prelude::*;
    let mut a = Args::default();
    let mut p = lexopt::Parser::from_env();
    while let Some(arg) = p.next()? {
        match arg {
            Short('h') | Long("help") => {
                print!("{USAGE}");
                std::process::exit(0);
            }
            Long("url") => {
                let v: String = p.value()?.parse()?;
                a.urls
                    .extend(v.split(',').filter(|s| !s.is_empty()).map(str::to_string));
            }
            Long("label") => a.label = Some(p.value()?.parse()?),
            Long("no-hello") => a.no_hello = true,
            Long("json") => a.json = true,
            Long("out") => a.out = Some(p.value()?.parse()?),
            Long("quiet") => a.quiet = true,
            Long("concurrency") => a.concurrency = Some(p.value()?.parse()?),
            Long("connect-timeout") => a.connect_timeout = Some(p.value()?.parse()?),
            Long("timeout") => a.timeout = Some(p.value()?.parse()?),
            Long("conns") => a.conns = Some(p.value()?.parse()?),
            Long("replicas") => a.replicas = Some(p.value()?.parse()?),
            Long("server-pid") => {
                let v: String = p.value()?.parse()?;
                for s in v.split(',').filter(|s| !s.is_empty()) {
                    a.server_pids.push(
                        s.parse()
                            .map_err(|e| lexopt::Error::from(format!("--server-pid {s}: {e}")))?,
                    );
                }
            }
            Long("per-worker") => a.per_worker = Some(p.value()?.parse()?),
            Long("hold") => a.hold = Some(p.value()?.parse()?),
            Long("index-base") => a.index_base = p.value()?.parse()?,
            Long("server-bin") => a.server_bin = Some(p.value()?.parse()?),
            Long("backbone") => a.backbone = Some(p.value()?.parse()?),
            Long("jwt-secret") => a.jwt_secret = Some(p.value()?.parse()?),
            Long("jwt-grant") => a.jwt_grants.push(p.value()?.parse()?),
            Long("members") => a.members = Some(p.value()?.parse()?),
            Long("stats-calls") => a.stats_calls = Some(p.value()?.parse()?),
            Long("walks") => a.walks = Some(p.value()?.parse()?),
            Long("page") => a.page = Some(p.value()?.parse()?),
            Long("memory-probe") => a.memory_probe = Some(p.value()?.parse()?),
            Long("users") => a.users = Some(p.value()?.parse()?),
            Long("targets") => a.targets = Some(p.value()?.parse()?),
            Long("in-flight") => a.in_flight = Some(p.value()?.parse()?),
            Long("rounds") => a.rounds = Some(p.value()?.parse()?),
            Long("api-key") => a.api_key = Some(p.value()?.parse()?),
            Long("clients") => a.clients = Some(p.value()?.parse()?),
            Long("missed") => a.missed = Some(p.value()?.parse()?),
            Long("env") => {
                let v: String = p.value()?.parse()?;
                let (name, value) = v.split_once('=').ok_or_else(|| {
                    lexopt::Error::from(format!("--env {v}: expected NAME=VALUE"))
                })?;
                a.env.push((name.to_string(), value.to_string()));
            }
            Long("subs") => a.subs = Some(p.value()?.parse()?),
            Long("subs-per-replica") => a.subs_per_replica = Some(p.value()?.parse()?),
            Long("messages") => a.messages = Some(p.value()?.parse()?),
            Long("rate") => a.rate = Some(p.value()?.parse()?),
            Long("payload") => a.payload = Some(p.value()?.parse()?),
            Long("channel") => a.channel = Some(p.value()?.parse()?),
            Long("warmup") => a.warmup = Some(p.value()?.parse()?),
            Long("drain") => a.drain = Some(p.value()?.parse()?),
            Long("depth") => a.depth = Some(p.value()?.parse()?),
            Long("requests") => a.requests = Some(p.value()?.parse()?),
            Long("duration") => a.duration = Some(p.value()?.parse()?),
            Long("method") => a.method = Some(p.value()?.parse()?),
            Long("proxied") => a.proxied = Some(p.value()?.parse()?),
            Long("listen") => a.listen = Some(p.value()?.parse()?),
            Long("baseline") => a.baseline = Some(p.value()?.parse()?),
            Value(v) if a.cmd.is_empty() => a.cmd = v.string()?,
            Value(v) if a.cmd == "report" => a.files.push(v.into()),
            _ => return Err(arg.unexpected()),
        }
    }
    Ok(a)
}

fn secs(v: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(v).map_err(|e| format!("bad duration {v}: {e}"))
}

fn common(a: &Args) -> Result<Common, String> {
    let urls = if a.urls.is_empty() {
        vec!["ws://127.0.0.1:8080/ws".to_string()]
    } else {
        a.urls.clone()
    };
    let targets = urls
        .iter()
        .map(|u| Target::parse(u))
        .collect::<Result<Vec<_>, _>>()?;
    let mut c = Common::new(targets);
    if let Some(l) = &a.label {
        c.label = l.clone();
    }
    c.hello = !a.no_hello;
    c.progress = !a.quiet && !a.cmd.ends_with("-worker");
    if let Some(n) = a.concurrency {
        c.concurrency = n.max(1);
    }
    if let Some(s) = a.connect_timeout {
        c.connect_timeout = secs(s)?;
    }
    c.jwt_secret = a
        .jwt_secret
        .clone()
        .or_else(|| std::env::var("CHORUS_BENCH_JWT_SECRET").ok())
        .filter(|secret| !secret.is_empty());
    c.jwt_grants.clone_from(&a.jwt_grants);
    if a.cmd == "presence" {
        // Every member and measuring client may use the presence channel.
        c.jwt_grants.push(presence_channel(a));
    }
    Ok(c)
}

fn presence_channel(a: &Args) -> String {
    a.channel
        .clone()
        .unwrap_or_else(|| PresenceOpts::default().channel)
}

fn api_key(a: &Args) -> Option<String> {
    a.api_key
        .clone()
        .or_else(|| std::env::var("CHORUS_BENCH_API_KEY").ok())
        .filter(|key| !key.is_empty())
}

/// A secret for servers this process starts itself: not guessable by other users of
/// the machine while the run lasts.
fn generated_secret(what: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut out = format!("chorus-bench-{what}-");
    for _ in 0..4 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        h.write_u32(std::process::id());
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out
}

async fn run(a: &Args, c: &Common) -> Result<Report, String> {
    match a.cmd.as_str() {
        "idle" => {
            let replicas = a.replicas.unwrap_or(c.urls.len());
            if replicas != c.urls.len() {
                return Err(format!(
                    "--replicas {replicas} needs {replicas} URLs, got {}",
                    c.urls.len()
                ));
            }
            if !a.server_pids.is_empty() && a.server_pids.len() != c.urls.len() {
                eprintln!(
                    "note: {} server pids for {} URLs; RSS is summed over the pids",
                    a.server_pids.len(),
                    c.urls.len()
                );
            }
            let mut o = IdleOpts {
                conns: 19_000 * replicas,
                server_pids: a.server_pids.clone(),
                ..IdleOpts::default()
            };
            if let Some(n) = a.conns {
                o.conns = n;
            }
            if let Some(n) = a.per_worker {
                o.per_worker = n.clamp(1, 19_000);
            }
            if let Some(h) = a.hold {
                o.hold = secs(h)?;
            }
            Ok(idle::run(c, &o).await)
        }
        "fanout" | "cluster" => {
            let cluster = a.cmd == "cluster";
            if cluster && c.urls.len() < 2 {
                return Err(
                    "cluster needs at least two --url (replicas); the publisher uses the first"
                        .into(),
                );
            }
            let n = c.urls.len();
            let per_url: Vec<usize> = if let Some(per) = a.subs_per_replica {
                vec![per; n]
            } else {
                let total = a.subs.unwrap_or(if cluster { 1000 * n } else { 10_000 });
                (0..n)
                    .map(|i| total / n + usize::from(i < total % n))
                    .collect()
            };
            let mut o = FanoutOpts::new(per_url);
            if cluster {
                o.messages = 5_000;
                o.rate = 1_000.0;
                o.channel = "bench:cluster".into();
            }
            if let Some(m) = a.messages {
                o.messages = m;
            }
            if let Some(r) = a.rate {
                o.rate = r.max(0.0);
            }
            if let Some(p) = a.payload {
                o.payload = p;
            }
            if let Some(ch) = &a.channel {
                o.channel = ch.clone();
            }
            if let Some(w) = a.warmup {
                o.warmup = secs(w)?;
            }
            if let Some(d) = a.drain {
                o.drain = secs(d)?;
            }
            Ok(fanout::run(&a.cmd, c, &o).await)
        }
        "rpc" => {
            let mut o = RpcOpts::default();
            if let Some(k) = a.conns {
                o.conns = k;
            }
            if let Some(d) = a.depth {
                o.depth = d.max(1);
            }
            if let Some(r) = a.requests {
                o.requests = r;
            }
            if let Some(d) = a.duration {
                o.duration = secs(d)?;
            }
            if let Some(p) = a.payload {
                o.payload = p;
            }
            if let Some(m) = &a.method {
                o.method.clone_from(m);
            }
            o.proxied.clone_from(&a.proxied);
            if let Some(r) = a.rounds {
                o.rounds = r.max(1);
            }
            Ok(rpc::run(c, &o).await)
        }
        "presence" => {
            let mut o = PresenceOpts {
                channel: presence_channel(a),
                server_pids: a.server_pids.clone(),
                ..PresenceOpts::default()
            };
            if let Some(n) = a.members {
                o.members = n;
            }
            if let Some(n) = a.per_worker {
                o.per_worker = n.clamp(1, 19_000);
            }
            if let Some(n) = a.stats_calls {
                o.stats_calls = n;
            }
            if let Some(n) = a.walks {
                o.walks = n;
            }
            if let Some(n) = a.page {
                o.page = n.clamp(1, 1000);
            }
            let probe = a.memory_probe.clone().or_else(|| {
                a.backbone
                    .clone()
                    .filter(|b| b.starts_with("redis://") && a.urls_were_started)
            });
            if let Some(url) = probe {
                o.probe = Some(Probe::parse(&url, replicas::DEFAULT_PREFIX)?);
            }
            if c.jwt_secret.is_none() {
                return Err(
                    "presence needs tokens: --jwt-secret (the servers' WS_JWT_SECRET)".into(),
                );
            }
            Ok(presence::run(c, &o).await)
        }
        "send" => {
            let mut o = SendOpts {
                api_key: api_key(a).unwrap_or_default(),
                server_pids: a.server_pids.clone(),
                ..SendOpts::default()
            };
            if let Some(n) = a.users {
                o.users = n;
            }
            if let Some(n) = a.targets {
                o.targets = n;
            }
            if let Some(n) = a.per_worker {
                o.per_worker = n.clamp(1, 19_000);
            }
            if let Some(m) = a.messages {
                o.messages = m;
            }
            if let Some(n) = a.rounds {
                o.rounds = n;
            }
            if let Some(n) = a.in_flight {
                o.requests = n.max(1);
            }
            if let Some(r) = a.rate {
                o.rate = r.max(0.0);
            }
            if let Some(p) = a.payload {
                o.payload = p;
            }
            if let Some(d) = a.drain {
                o.drain = secs(d)?;
            }
            if c.jwt_secret.is_none() {
                return Err("send needs tokens: --jwt-secret (the servers' WS_JWT_SECRET)".into());
            }
            Ok(send::run(c, &o).await)
        }
        "sse" => {
            let mut o = SseOpts {
                server_bin: a.server_bin.clone(),
                ..SseOpts::default()
            };
            if let Some(n) = a.subs {
                o.subs = n.max(1);
            }
            if let Some(m) = a.messages {
                o.messages = m;
            }
            if let Some(r) = a.rate {
                o.rate = r.max(0.0);
            }
            if let Some(p) = a.payload {
                o.payload = p;
            }
            if let Some(n) = a.rounds {
                o.rounds = n.max(1);
            }
            if let Some(h) = a.hold {
                o.hold = secs(h)?;
            }
            if let Some(d) = a.drain {
                o.drain = secs(d)?;
            }
            Ok(sse::run(c, &o).await)
        }
        "recover" => {
            let mut o = RecoverOpts::default();
            if let Some(n) = a.clients {
                o.clients = n.max(1);
            }
            if let Some(m) = a.missed {
                o.missed = m;
            }
            if let Some(ch) = &a.channel {
                o.channel = ch.clone();
            }
            Ok(recover::run(c, &o).await)
        }
        other => Err(format!("unknown scenario {other:?}\n\n{USAGE}")),
    }
}

fn report_cmd(a: &Args) -> Result<String, String> {
    let mut docs = Vec::new();
    let mut files = Vec::new();
    for p in &a.files {
        if p.is_dir() {
            collect_json(p, &mut files).map_err(|e| format!("{}: {e}", p.display()))?;
        } else {
            files.push(p.clone());
        }
    }
    files.sort();
    for f in files {
        let text = std::fs::read_to_string(&f).map_err(|e| format!("{}: {e}", f.display()))?;
        match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(v) => docs.push(v),
            Err(e) => eprintln!("skipping {}: {e}", f.display()),
        }
    }
    Ok(report::markdown(
        &docs,
        a.baseline.as_deref().unwrap_or("chorus"),
    ))
}

fn collect_json(dir: &std::path::Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            collect_json(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "json") {
            out.push(p);
        }
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let mut a = match parse_args() {
        Ok(a) if !a.cmd.is_empty() => a,
        Ok(_) => {
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("chorus-bench: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if a.cmd == "backend" {
        let listen = a
            .listen
            .unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], 9100)));
        return match chorus_bench::backend::serve(listen).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("chorus-bench backend: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if a.cmd == "report" {
        return match report_cmd(&a) {
            Ok(md) => {
                print!("{md}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("chorus-bench report: {e}");
                ExitCode::from(2)
            }
        };
    }
    // With `--replicas R` and without URLs the servers are ours to start and stop.
    let _replicas = match (a.cmd.as_str(), a.replicas) {
        ("idle" | "presence" | "send" | "fanout" | "cluster" | "recover", Some(count))
            if a.urls.is_empty() && count > 0 =>
        {
            let Some(bin) = a.server_bin.clone().or_else(replicas::default_server_bin) else {
                eprintln!("chorus-bench: cannot locate chorus; pass --server-bin");
                return ExitCode::from(2);
            };
            let mut secret = a
                .jwt_secret
                .clone()
                .or_else(|| std::env::var("CHORUS_BENCH_JWT_SECRET").ok())
                .filter(|secret| !secret.is_empty());
            let mut env = Vec::new();
            if a.cmd == "presence" || a.cmd == "send" {
                let secret = secret.get_or_insert_with(|| generated_secret("jwt"));
                a.jwt_secret = Some(secret.clone());
                let key = api_key(&a).unwrap_or_else(|| generated_secret("api"));
                a.api_key = Some(key.clone());
                env.push(("WS_API_KEY".to_string(), key));
            }
            if a.cmd == "presence" {
                let channel = presence_channel(&a);
                let namespace = channel.split(':').next().unwrap_or_default().to_string();
                env.push((
                    "WS_NAMESPACES".to_string(),
                    serde_json::json!({ namespace: {"presence": true} }).to_string(),
                ));
            }
            if matches!(a.cmd.as_str(), "fanout" | "cluster" | "recover") {
                secret = None;
                for name in [
                    "WS_PUBLISH_RATE",
                    "WS_PUBLISH_BYTES_RATE",
                    "WS_PUBLISH_RATE_TOTAL",
                    "WS_PUBLISH_BYTES_TOTAL",
                ] {
                    env.push((name.to_string(), "0".to_string()));
                }
            }
            if a.cmd == "recover" {
                let channel = a
                    .channel
                    .clone()
                    .unwrap_or_else(|| RecoverOpts::default().channel);
                let namespace = channel.split(':').next().unwrap_or_default().to_string();
                env.push((
                    "WS_NAMESPACES".to_string(),
                    serde_json::json!({ namespace: {"history_size": 1000} }).to_string(),
                ));
            }
            env.extend(a.env.iter().cloned());
            let o = ReplicaOpts {
                backbone: a.backbone.clone(),
                jwt_secret: secret,
                prefix: None,
                env,
            };
            match replicas::spawn(&bin, count, &o).await {
                Ok(started) => {
                    a.urls = started.targets.iter().map(|t| t.url.clone()).collect();
                    a.server_pids.clone_from(&started.pids);
                    a.urls_were_started = true;
                    Some(started)
                }
                Err(e) => {
                    eprintln!("chorus-bench: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        _ => None,
    };
    let c = match common(&a) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("chorus-bench: {e}");
            return ExitCode::from(2);
        }
    };
    let hard = match a.timeout.map(secs).transpose() {
        Ok(t) => t.unwrap_or(Duration::from_secs(600)),
        Err(e) => {
            eprintln!("chorus-bench: {e}");
            return ExitCode::from(2);
        }
    };
    if a.cmd == "idle-worker" {
        let o = WorkerOpts {
            target: c.urls[0].clone(),
            conns: a.conns.unwrap_or(0),
            index_base: a.index_base,
            channel: a.channel.clone(),
        };
        return match idle::worker(&c, &o, hard).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::FAILURE,
        };
    }
    let report = match tokio::time::timeout(hard, run(&a, &c)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            eprintln!("chorus-bench: {e}");
            return ExitCode::from(2);
        }
        Err(_) => {
            eprintln!("chorus-bench: {} did not finish within {hard:?}", a.cmd);
            return ExitCode::from(3);
        }
    };
    let json = report.to_json();
    let pretty = serde_json::to_string_pretty(&json).unwrap_or_default();
    if let Some(out) = &a.out
        && let Err(e) = std::fs::write(out, format!("{pretty}\n"))
    {
        eprintln!("chorus-bench: writing {}: {e}", out.display());
        return ExitCode::FAILURE;
    }
    if a.json {
        println!("{pretty}");
    } else {
        print!("{}", report.to_table());
    }
    // Nothing got through at all: make it visible to scripts.
    let worked = ["connections_ok", "subscribers"]
        .iter()
        .any(|k| report.get(k).is_some_and(|v| v > 0.0));
    if worked {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
