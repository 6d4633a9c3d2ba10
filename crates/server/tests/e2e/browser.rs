//! Section 12 in a real browser: headless Chromium driven over the Chrome DevTools
//! Protocol (a WebSocket, so no browser-automation crate). `EventSource` resumes with
//! `Last-Event-ID`; the demo page works by clicks; the library survives a drained
//! replica behind nginx with every publication exactly once. Screenshots go to
//! `target/tmp/browser/`. These run alone (`.config/nextest.toml`): Chromium is heavy.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::Message;

use crate::backbone::{Kind, Server};
use crate::ops::{Nginx, free_port, replica_with, scratch_dir, tool};
use crate::support::{Client, PATIENCE, Socket, UNLIMITED_PUBLISHING, server};
use crate::users::{API_KEY, SECRET, api};

/// Where screenshots are kept.
fn artifacts() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser");
    std::fs::create_dir_all(&dir).expect("artifact dir");
    dir
}

/// Headless Chromium with one page, attached over the DevTools Protocol.
pub struct Browser {
    _child: Child,
    cdp: Socket,
    session: String,
    next_id: u64,
}

impl Browser {
    pub async fn launch() -> Self {
        let profile = scratch_dir("chromium");
        let mut child = Command::new(tool("chromium"))
            .args([
                "--headless=new",
                // Root in a container: Chromium's sandbox needs namespaces we lack.
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--remote-debugging-port=0",
                "--window-size=420,900",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("chromium starts (scripts/test installs it)");
        let stderr = child.stderr.take().expect("stderr piped");
        let mut lines = BufReader::new(stderr).lines();
        let url = tokio::time::timeout(PATIENCE, async {
            while let Some(line) = lines.next_line().await.expect("read stderr") {
                if let Some(url) = line.strip_prefix("DevTools listening on ") {
                    return url.trim().to_owned();
                }
            }
            panic!("chromium exited before listening");
        })
        .await
        .expect("chromium listens in time");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let (cdp, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .expect("DevTools connects");
        let mut browser = Self {
            _child: child,
            cdp,
            session: String::new(),
            next_id: 0,
        };
        let target = browser
            .command("Target.createTarget", json!({"url": "about:blank"}))
            .await;
        let attached = browser
            .command(
                "Target.attachToTarget",
                json!({"targetId": target["targetId"], "flatten": true}),
            )
            .await;
        browser.session = attached["sessionId"]
            .as_str()
            .expect("a session")
            .to_owned();
        browser.command("Page.enable", json!({})).await;
        browser.command("Runtime.enable", json!({})).await;
        browser
    }

    /// One DevTools command (on the page once attached); its result.
    pub async fn command(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            message["sessionId"] = json!(self.session);
        }
        self.cdp
            .send(Message::text(message.to_string()))
            .await
            .expect("send to DevTools");
        loop {
            let frame = tokio::time::timeout(PATIENCE * 3, self.cdp.next())
                .await
                .unwrap_or_else(|_| panic!("{method} answered in time"))
                .expect("DevTools open")
                .expect("readable");
            let Message::Text(text) = frame else {
                continue;
            };
            let reply: Value = serde_json::from_str(&text).expect("JSON");
            if reply["id"] == json!(id) {
                assert!(reply.get("error").is_none(), "{method}: {reply}");
                return reply["result"].clone();
            }
        }
    }

    /// Loads a page and waits for its `load` event.
    pub async fn goto(&mut self, url: &str) {
        self.command("Page.navigate", json!({"url": url})).await;
        self.wait_for("document.readyState === 'complete'", "the page to load")
            .await;
    }

    /// Evaluates JavaScript in the page (promises awaited); its value.
    pub async fn eval(&mut self, expression: &str) -> Value {
        let result = self
            .command(
                "Runtime.evaluate",
                json!({"expression": expression, "awaitPromise": true, "returnByValue": true}),
            )
            .await;
        assert!(
            result.get("exceptionDetails").is_none(),
            "{expression}: {}",
            result["exceptionDetails"]
        );
        result["result"]["value"].clone()
    }

    /// Waits, inside the page, until `condition` is true; fails after the patience.
    pub async fn wait_for(&mut self, condition: &str, what: &str) {
        let patience = PATIENCE.as_millis() * 2;
        let waited = self
            .eval(&format!(
                "new Promise((done) => {{ const start = Date.now(); const check = () => {{ \
                 let ok = false; try {{ ok = !!({condition}); }} catch (_) {{}} \
                 if (ok) done(true); else if (Date.now() - start > {patience}) done(false); \
                 else setTimeout(check, 20); }}; check(); }})"
            ))
            .await;
        assert_eq!(waited, json!(true), "timed out waiting for {what}");
    }

    /// Saves a PNG of the page under `target/tmp/browser/`.
    pub async fn screenshot(&mut self, name: &str) -> PathBuf {
        let shot = self
            .command(
                "Page.captureScreenshot",
                json!({"format": "png", "captureBeyondViewport": true}),
            )
            .await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().expect("image data"))
            .expect("base64");
        let path = artifacts().join(format!("{name}.png"));
        std::fs::write(&path, png).expect("write screenshot");
        eprintln!("screenshot: {}", path.display());
        path
    }

    /// Adds `/chorus.js` of the page's origin to the page.
    pub async fn load_library(&mut self) {
        self.eval(
            "new Promise((done, fail) => { const s = document.createElement('script'); \
             s.src = '/chorus.js'; s.onload = () => done(true); s.onerror = fail; \
             document.head.appendChild(s); })",
        )
        .await;
    }
}

fn vars<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    let mut vars = vec![
        ("WS_NAMESPACES", r#"{"h": {"history_size": 100}}"#),
        ("WS_API_KEY", API_KEY),
    ];
    vars.extend(UNLIMITED_PUBLISHING);
    vars.extend_from_slice(extra);
    vars
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_source_resumes_with_last_event_id_after_the_server_drops_it() {
    let server = server(&vars(&[])).await;
    let addr = server.local_addr;
    let mut browser = Browser::launch().await;
    browser.goto(&format!("http://{addr}/health")).await;
    browser
        .eval(
            "window.log = []; window.source = new EventSource('/events?channel=h:feed'); \
             for (const name of ['sys.connected', 'sys.subscribed', 'message', 'sys.kick']) \
               source.addEventListener(name, (e) => log.push({event: e.type, id: e.lastEventId, \
                 msg: JSON.parse(e.data)})); true",
        )
        .await;
    browser
        .wait_for(
            "log.some((e) => e.event === 'sys.subscribed')",
            "the stream",
        )
        .await;
    let client_id = browser
        .eval("log.find((e) => e.event === 'sys.connected').msg.params.client_id")
        .await;
    let publish = |n: u64| {
        api(
            addr,
            "publish",
            json!({"channel": "h:feed", "data": {"n": n}}),
        )
    };
    publish(1).await;
    browser
        .wait_for(
            "log.some((e) => e.event === 'message')",
            "the first publication",
        )
        .await;

    // The server drops the stream; two publications happen before the browser is back.
    let kicked = api(addr, "kick", json!({"clients": [client_id]})).await;
    assert_eq!(kicked["kicked"], 1);
    publish(2).await;
    publish(3).await;
    browser
        .wait_for(
            "log.filter((e) => e.event === 'sys.subscribed').length === 2 \
             && log.filter((e) => e.event === 'message').length >= 3",
            "EventSource to reconnect and resume",
        )
        .await;
    publish(4).await;
    browser
        .wait_for(
            "log.filter((e) => e.event === 'message').length >= 4",
            "live delivery after the resume",
        )
        .await;
    let log = browser.eval("log").await;
    let log = log.as_array().expect("log");
    let resumed = log
        .iter()
        .filter(|e| e["event"] == "sys.subscribed")
        .nth(1)
        .expect("a second subscription");
    assert_eq!(
        resumed["msg"]["params"]["recovered"], true,
        "resumed by Last-Event-ID: {resumed}"
    );
    assert_eq!(
        resumed["msg"]["params"]["offset"], 3,
        "the missed ones were published before the browser came back"
    );
    let numbers: Vec<u64> = log
        .iter()
        .filter(|e| e["event"] == "message")
        .filter_map(|e| e["msg"]["params"]["data"]["n"].as_u64())
        .collect();
    assert_eq!(
        numbers,
        [1, 2, 3, 4],
        "every publication exactly once, in order"
    );
    browser.eval("source.close(); true").await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_page_connects_subscribes_publishes_and_shows_the_notification() {
    let server = server(&vars(&[])).await;
    let addr = server.local_addr;
    let mut browser = Browser::launch().await;
    browser.goto(&format!("http://{addr}/")).await;
    browser
        .wait_for(
            "document.getElementById('state').textContent === 'connected'",
            "the demo to connect on load",
        )
        .await;
    browser
        .wait_for(
            "document.getElementById('health').textContent.includes('\"status\"')",
            "/health on the page",
        )
        .await;
    browser.screenshot("demo-connected").await;
    browser
        .eval(
            "document.getElementById('sub-channel').value = 'h:demo'; \
             document.getElementById('subscribe').click(); true",
        )
        .await;
    browser
        .wait_for(
            "document.getElementById('subscriptions').textContent.includes('h:demo')",
            "the subscription",
        )
        .await;
    browser
        .eval(
            "document.getElementById('pub-channel').value = 'h:demo'; \
             document.getElementById('pub-data').value = '{\"text\": \"hello from the demo\"}'; \
             document.getElementById('publish').click(); true",
        )
        .await;
    browser
        .wait_for(
            "[...document.querySelectorAll('#log li')].some((li) => li.dataset.kind === 'message')",
            "the notification in the log",
        )
        .await;
    let shown = browser
        .eval("[...document.querySelectorAll('#log li')].find((li) => li.dataset.kind === 'message').textContent")
        .await;
    let shown = shown.as_str().expect("text");
    assert!(
        shown.contains(r#""channel":"h:demo""#) && shown.contains("hello from the demo"),
        "{shown}"
    );
    // The publish result is on the page too; and a method called by name.
    browser
        .wait_for(
            "document.getElementById('result').textContent.includes('\"offset\"')",
            "the publish result",
        )
        .await;
    browser
        .eval(
            "document.getElementById('method').value = 'ping'; \
             document.getElementById('params').value = ''; \
             document.getElementById('call').click(); true",
        )
        .await;
    browser
        .wait_for(
            "document.getElementById('result').textContent === 'pong'",
            "the ping result",
        )
        .await;
    browser.screenshot("demo-after-publish").await;
    server.shutdown().await;

    // WS_DEMO=false turns the page off; the library stays.
    let off = crate::support::server(&[("WS_DEMO", "false")]).await;
    assert_eq!(crate::support::http_get(off.local_addr, "/").await.0, 404);
    assert_eq!(
        crate::support::http_get(off.local_addr, "/chorus.js")
            .await
            .0,
        200
    );
    off.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_survives_a_drained_replica_behind_nginx_with_every_publication_once() {
    const TOTAL: u64 = 40;
    let redis = Server::start(Kind::Redis);
    let ports = [free_port(), free_port()];
    let extra = [("WS_NAMESPACES", r#"{"h": {"history_size": 1000}}"#)];
    let mut replicas = Vec::new();
    for (index, port) in ports.iter().enumerate() {
        let mut extra = extra.to_vec();
        extra.extend(UNLIMITED_PUBLISHING);
        replicas.push(replica_with(&redis, *port, &format!("lib-{index}"), &extra).await);
    }
    let addrs: Vec<SocketAddr> = replicas.iter().map(|r| r.addr).collect();
    let nginx = Nginx::start(&addrs).await;
    let mut browser = Browser::launch().await;
    // The demo page through the shipped nginx config: it loads the library and connects.
    browser
        .goto(&format!("http://127.0.0.1:{}/", nginx.port))
        .await;
    browser
        .wait_for(
            "document.getElementById('state').textContent === 'connected'",
            "the demo to connect through nginx",
        )
        .await;
    browser
        .eval(
            "window.seen = {}; window.nodes = []; window.notes = []; window.subs = []; \
             window.chorus = new Chorus.Client({ url: '/ws', minReconnectDelay: 200 }); \
             chorus.on('message', (m) => { seen[m.data.n] = (seen[m.data.n] || 0) + 1; }); \
             chorus.on('connected', (info) => nodes.push({node: info.node_id, at: Date.now()})); \
             chorus.on('shutdown', (p) => notes.push({delay: p.reconnect_after_ms, at: Date.now()})); \
             chorus.on('gap', (g) => notes.push({gap: g})); \
             chorus.on('subscribed', (r) => subs.push(r)); \
             chorus.subscribe('h:feed').then(() => true)",
        )
        .await;
    let victim_name = browser
        .eval("nodes[0].node")
        .await
        .as_str()
        .expect("node")
        .to_owned();
    let victim: usize = victim_name
        .strip_prefix("lib-")
        .and_then(|n| n.parse().ok())
        .expect("one of ours");
    let survivor = 1 - victim;
    // Publications go through the replica that stays, before, during and after.
    let mut publisher = Client::connect(addrs[survivor]).await;
    for n in 1..=10 {
        publisher
            .ok("publish", json!({"channel": "h:feed", "data": {"n": n}}))
            .await;
    }
    browser
        .wait_for("Object.keys(seen).length === 10", "the first ten")
        .await;
    replicas[victim].signal("TERM");
    browser
        .wait_for("notes.some((n) => n.delay !== undefined)", "sys.shutdown")
        .await;
    for n in 11..=TOTAL {
        publisher
            .ok("publish", json!({"channel": "h:feed", "data": {"n": n}}))
            .await;
        if n == 25 {
            // Some before the browser is back, some after.
            browser
                .wait_for("nodes.length === 2", "the reconnect through nginx")
                .await;
        }
    }
    browser
        .wait_for(
            &format!("Object.keys(seen).length === {TOTAL}"),
            "every publication",
        )
        .await;
    let state = browser
        .eval("({seen: seen, nodes: nodes, notes: notes, subs: subs})")
        .await;
    for n in 1..=TOTAL {
        assert_eq!(
            state["seen"][n.to_string()],
            json!(1),
            "publication {n} exactly once: {state}"
        );
    }
    let nodes = state["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 2, "one reconnect: {state}");
    assert_eq!(nodes[0]["node"], victim_name);
    assert_ne!(nodes[1]["node"], victim_name, "back on the other replica");
    let notice = &state["notes"][0];
    let delay = notice["delay"].as_f64().expect("delay");
    let back_after = nodes[1]["at"].as_f64().expect("time") - notice["at"].as_f64().expect("time");
    assert!(
        back_after >= delay,
        "reconnected {back_after} ms after the notice, {delay} ms announced"
    );
    assert!(
        state["notes"]
            .as_array()
            .expect("notes")
            .iter()
            .all(|n| n.get("gap").is_none()),
        "nothing lost: {state}"
    );
    let subs = state["subs"].as_array().expect("subscriptions");
    assert_eq!(subs.len(), 2, "subscribed once per connection: {state}");
    assert_eq!(
        subs[1]["recovered"], true,
        "resubscribed with since: {state}"
    );
    let status = tokio::time::timeout(PATIENCE, replicas[victim].child.wait())
        .await
        .expect("the drained replica exits")
        .expect("status");
    assert_eq!(status.code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_refreshes_its_token_without_reconnecting() {
    let server = server(&[
        ("WS_AUTH_ENABLED", "true"),
        ("WS_JWT_SECRET", SECRET),
        ("WS_DEMO", "false"),
    ])
    .await;
    let addr = server.local_addr;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mint = |exp: u64| {
        chorus_gate::mint_hs256(
            SECRET.as_bytes(),
            &chorus_gate::TokenClaims {
                sub: "erin".into(),
                iat: now,
                exp,
                ..chorus_gate::TokenClaims::default()
            },
        )
        .expect("token")
    };
    // The first token is due for a refresh about 2 s after the connection opens.
    let (first, fresh_exp) = (mint(now + 40), now + 3600);
    let fresh = mint(fresh_exp);
    let mut browser = Browser::launch().await;
    browser.goto(&format!("http://{addr}/health")).await;
    browser.load_library().await;
    browser
        .eval(&format!(
            "window.tokens = ['{first}', '{fresh}']; window.refreshed = []; \
             window.connections = 0; window.problems = []; \
             window.chorus = new Chorus.Client({{ url: '/ws', token: () => tokens.shift(), \
               refreshBeforeExpiry: 38 }}); \
             chorus.on('connected', () => connections++); \
             chorus.on('refreshed', (r) => refreshed.push(r)); \
             chorus.on('token', (e) => problems.push(e)); true"
        ))
        .await;
    browser
        .wait_for("refreshed.length === 1", "the token refresh")
        .await;
    let state = browser
        .eval("({refreshed: refreshed, connections: connections, problems: problems, pong: null})")
        .await;
    assert_eq!(state["refreshed"][0]["exp"], json!(fresh_exp), "{state}");
    assert_eq!(state["connections"], 1, "no reconnect: {state}");
    assert_eq!(state["problems"], json!([]), "{state}");
    assert_eq!(browser.eval("chorus.call('ping')").await, "pong");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_event_stream_comes_back_with_a_fresh_token_where_it_stopped() {
    let server = server(&vars(&[
        ("WS_AUTH_ENABLED", "true"),
        ("WS_JWT_SECRET", SECRET),
        ("WS_JWT_LEEWAY", "0s"),
    ]))
    .await;
    let addr = server.local_addr;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mint = |exp: u64| {
        chorus_gate::mint_hs256(
            SECRET.as_bytes(),
            &chorus_gate::TokenClaims {
                sub: "fay".into(),
                iat: now,
                exp,
                ..chorus_gate::TokenClaims::default()
            },
        )
        .expect("token")
    };
    let (short, fresh) = (mint(now + 2), mint(now + 3600));
    let mut browser = Browser::launch().await;
    browser.goto(&format!("http://{addr}/health")).await;
    browser.load_library().await;
    browser
        .eval(&format!(
            "window.tokens = ['{short}', '{fresh}']; window.got = []; window.events = []; \
             window.stream = new Chorus.EventStream({{ channels: ['h:es'], \
               token: () => tokens.shift() }}); \
             window.subs = []; stream.on('subscribed', (p) => subs.push(p)); \
             stream.on('message', (m) => got.push(m.data.n)); \
             stream.on('*', (name) => events.push(name)); true"
        ))
        .await;
    browser
        .wait_for("events.includes('subscribed')", "the stream")
        .await;
    api(
        addr,
        "publish",
        json!({"channel": "h:es", "data": {"n": 1}}),
    )
    .await;
    browser
        .wait_for(
            "events.includes('sys.token_expired')",
            "the token to expire",
        )
        .await;
    api(
        addr,
        "publish",
        json!({"channel": "h:es", "data": {"n": 2}}),
    )
    .await;
    browser
        .wait_for(
            "events.filter((e) => e === 'subscribed').length === 2",
            "the stream to come back",
        )
        .await;
    api(
        addr,
        "publish",
        json!({"channel": "h:es", "data": {"n": 3}}),
    )
    .await;
    browser
        .wait_for("got.length >= 3", "three publications")
        .await;
    assert_eq!(
        browser.eval("got").await,
        json!([1, 2, 3]),
        "each once, in order"
    );
    assert_eq!(
        browser.eval("subs[1].recovered").await,
        json!(true),
        "resumed from the last event id"
    );
    browser.eval("stream.close(); true").await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_source_needs_a_token_and_is_reached_by_send_and_closed_by_kick() {
    let server = server(&vars(&[
        ("WS_AUTH_ENABLED", "true"),
        ("WS_JWT_SECRET", SECRET),
    ]))
    .await;
    let addr = server.local_addr;
    let token = crate::users::token("gil", Some("browser"));
    let mut browser = Browser::launch().await;
    browser.goto(&format!("http://{addr}/health")).await;
    // Without a token: 401, and EventSource gives up (CLOSED) instead of retrying.
    let status = browser
        .eval("fetch('/events?channel=a').then((r) => r.status)")
        .await;
    assert_eq!(status, json!(401));
    browser
        .eval(
            "window.anon = new EventSource('/events?channel=a'); \
             anon.onerror = () => { window.anonState = anon.readyState; }; true",
        )
        .await;
    browser
        .wait_for(
            "window.anonState === EventSource.CLOSED",
            "EventSource to give up",
        )
        .await;

    browser
        .eval(&format!(
            "window.log = []; window.source = new EventSource('/events?channel=a&token={token}'); \
             for (const name of ['sys.subscribed', 'message.user', 'sys.kick']) \
               source.addEventListener(name, (e) => log.push({{event: e.type, msg: JSON.parse(e.data)}})); \
             source.onerror = () => log.push({{event: 'error', state: source.readyState}}); true"
        ))
        .await;
    browser
        .wait_for(
            "log.some((e) => e.event === 'sys.subscribed')",
            "the stream",
        )
        .await;
    let sent = api(
        addr,
        "send",
        json!({"users": ["gil"], "data": {"hello": "gil"}}),
    )
    .await;
    assert_eq!(sent["devices"], 1);
    browser
        .wait_for("log.some((e) => e.event === 'message.user')", "the send")
        .await;
    let kicked = api(addr, "kick", json!({"users": ["gil"], "reason": "bye"})).await;
    assert_eq!(kicked["kicked"], 1);
    browser
        .wait_for(
            "log.some((e) => e.event === 'sys.kick') && log.some((e) => e.event === 'error')",
            "the kick to end the stream",
        )
        .await;
    browser.eval("source.close(); true").await;
    let log = browser.eval("log").await;
    let log = log.as_array().expect("log");
    let note = log
        .iter()
        .find(|e| e["event"] == "message.user")
        .expect("sent");
    assert_eq!(note["msg"]["params"], json!({"hello": "gil"}));
    let kick = log.iter().find(|e| e["event"] == "sys.kick").expect("kick");
    assert_eq!(kick["msg"]["params"]["reason"], "bye");
    let kick_at = log.iter().position(|e| e["event"] == "sys.kick");
    let end_at = log.iter().position(|e| e["event"] == "error");
    assert!(kick_at < end_at, "the notice, then the end: {log:?}");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_tells_the_application_what_it_could_not_recover() {
    let mut small = vec![
        ("WS_NAMESPACES", r#"{"h": {"history_size": 2}}"#),
        ("WS_API_KEY", API_KEY),
    ];
    small.extend(UNLIMITED_PUBLISHING);
    let server = server(&small).await;
    let addr = server.local_addr;
    let mut browser = Browser::launch().await;
    browser.goto(&format!("http://{addr}/health")).await;
    browser.load_library().await;
    browser
        .eval(
            "window.got = []; window.gaps = []; window.nodes = []; \
             window.chorus = new Chorus.Client({ url: '/ws', reconnectOnKick: true, \
               minReconnectDelay: 1500 }); \
             chorus.on('connected', (info) => nodes.push(info.client_id)); \
             chorus.on('message', (m) => got.push(m.data.n)); \
             chorus.on('gap', (g) => gaps.push(g)); \
             chorus.subscribe('h:small').then(() => true)",
        )
        .await;
    api(
        addr,
        "publish",
        json!({"channel": "h:small", "data": {"n": 1}}),
    )
    .await;
    browser
        .wait_for("got.length === 1", "the first publication")
        .await;
    let client_id = browser.eval("nodes[0]").await;
    api(addr, "kick", json!({"clients": [client_id]})).await;
    // Five while away: the channel keeps two, so offsets 2 to 4 cannot come back.
    for n in 2..=6 {
        api(
            addr,
            "publish",
            json!({"channel": "h:small", "data": {"n": n}}),
        )
        .await;
    }
    browser
        .wait_for(
            "nodes.length === 2 && gaps.length === 1",
            "the reconnect and the gap",
        )
        .await;
    let gap = browser.eval("gaps[0]").await;
    assert_eq!(gap["channel"], "h:small");
    assert_eq!(gap["recovered"], false, "{gap}");
    assert_eq!(gap["from_offset"], 2, "{gap}");
    assert_eq!(gap["to_offset"], 6, "{gap}");
    api(
        addr,
        "publish",
        json!({"channel": "h:small", "data": {"n": 7}}),
    )
    .await;
    browser
        .wait_for("got.includes(7)", "live delivery after the gap")
        .await;
    assert_eq!(browser.eval("got").await, json!([1, 7]), "nothing guessed");
    server.shutdown().await;
}
