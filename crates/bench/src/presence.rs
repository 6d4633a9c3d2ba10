//! `presence`: N members of one channel with presence, spread evenly over the
//! replicas, each its own connection with its own user (held by worker processes,
//! see [`crate::idle::Pool`]). Measures:
//!
//! - the join rate: every member subscribes at once (a mass join, as after a
//!   deploy); a subscription is answered once the presence store has the member,
//!   so the last reply is the moment the store holds them all;
//! - `presence_stats` and `presence` pages (`limit` per page, walking the whole
//!   channel with cursors) from one measuring client per replica, calls one at a
//!   time per client, the clients side by side; every walk is checked to return
//!   each member exactly once;
//! - the store's size (Redis `used_memory`, or the NATS presence bucket's stream
//!   bytes) before the members connected, after they connected, and after they
//!   subscribed: per connection and per member.

use crate::conn::{self, Ws};
use crate::idle::{Pool, plan};
use crate::progress;
use crate::report::Report;
use crate::stats::{Latency, per_sec, round3};
use crate::store::{Probe, Sample};
use crate::{Common, user_index, user_name};
use futures_util::StreamExt;
use serde::Deserialize;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

#[derive(Debug, Clone)]
pub struct PresenceOpts {
    /// Members (connections, one user each), spread evenly over the URLs.
    pub members: usize,
    /// The channel (in a namespace with `presence: true`).
    pub channel: String,
    /// Most connections one worker process holds.
    pub per_worker: usize,
    /// `presence_stats` calls per measuring client (one client per replica).
    pub stats_calls: usize,
    /// Whole-channel walks per measuring client.
    pub walks: usize,
    /// `limit` of one `presence` page.
    pub page: usize,
    /// Where to read the store's size, if anywhere.
    pub probe: Option<Probe>,
    /// Replica process ids whose VmRSS is summed.
    pub server_pids: Vec<u32>,
    /// Bound on one call.
    pub call_timeout: Duration,
}

impl Default for PresenceOpts {
    fn default() -> Self {
        Self {
            members: 20_000,
            channel: "room:bench".into(),
            per_worker: 10_000,
            stats_calls: 2_000,
            walks: 5,
            page: 100,
            probe: None,
            server_pids: Vec::new(),
            call_timeout: Duration::from_secs(10),
        }
    }
}

/// A connection making one JSON-RPC call at a time.
pub struct Caller {
    ws: Ws,
    next_id: u64,
    timeout: Duration,
}

impl Caller {
    pub fn new(ws: Ws, timeout: Duration) -> Self {
        Self {
            ws,
            next_id: 1,
            timeout,
        }
    }

    /// Calls `method` with `params` (JSON text); returns the `result` (JSON) and the
    /// time from the request's write to the response's arrival.
    pub async fn call(&mut self, method: &str, params: &str) -> Result<(String, Duration), String> {
        let id = self.next_id;
        self.next_id += 1;
        let request =
            format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"{method}","params":{params}}}"#);
        let t0 = Instant::now();
        conn::send_text(&mut self.ws, request)
            .await
            .map_err(|e| format!("{method}: send: {e}"))?;
        let wait = async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Text(t))) => {
                        if let Some(outcome) = response_to(t.as_str(), id) {
                            return outcome.map(|result| (result, t0.elapsed()));
                        }
                    }
                    Some(Ok(Message::Close(f))) => return Err(format!("closed: {f:?}")),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(e.to_string()),
                    None => return Err("connection ended".into()),
                }
            }
        };
        tokio::time::timeout(self.timeout, wait)
            .await
            .map_err(|_| format!("{method}: no response within {:?}", self.timeout))?
            .map_err(|e| format!("{method}: {e}"))
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// The outcome of the response to `id` in `text`; `None` when `text` is something else.
fn response_to(text: &str, id: u64) -> Option<Result<String, String>> {
    #[derive(Deserialize)]
    struct Response<'a> {
        #[serde(default)]
        id: Option<u64>,
        #[serde(default)]
        method: Option<&'a str>,
        #[serde(default, borrow)]
        result: Option<&'a serde_json::value::RawValue>,
        #[serde(default, borrow)]
        error: Option<&'a serde_json::value::RawValue>,
    }
    let r: Response<'_> = serde_json::from_str(text).ok()?;
    if r.method.is_some() || r.id != Some(id) {
        return None;
    }
    Some(match (r.result, r.error) {
        (_, Some(e)) => Err(format!("error {}", e.get())),
        (Some(result), None) => Ok(result.get().to_string()),
        (None, None) => Err("a response without result".into()),
    })
}

/// `presence_stats` result.
#[derive(Debug, Deserialize, PartialEq, Eq)]
pub struct StatsResult {
    pub clients: u64,
    pub users: u64,
}

/// One `presence` page.
#[derive(Debug, Deserialize)]
pub struct PageResult {
    pub clients: Vec<PageMember>,
    #[serde(default)]
    pub cursor: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct PageMember {
    pub client_id: String,
    #[serde(default)]
    pub user: Option<String>,
}

/// What one walk over the channel returned, against the members `0..members`
/// (users `user-0` ..).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WalkCheck {
    pub returned: u64,
    /// Expected members (users) the walk did not return.
    pub missing: u64,
    /// Entries beyond the first of a client id or of a user.
    pub duplicates: u64,
    /// Entries of a user outside the members (or without a user).
    pub unexpected: u64,
}

impl WalkCheck {
    pub fn exact(&self) -> bool {
        self.missing == 0 && self.duplicates == 0 && self.unexpected == 0
    }
}

/// Checks a walk's entries (client id, user) against the members `0..members`.
pub fn check_walk(entries: &[(String, Option<String>)], members: usize) -> WalkCheck {
    let mut seen_user = vec![0u32; members];
    let mut seen_client: HashMap<&str, u32> = HashMap::with_capacity(entries.len());
    let mut check = WalkCheck {
        returned: entries.len() as u64,
        ..WalkCheck::default()
    };
    for (client, user) in entries {
        let n = seen_client.entry(client.as_str()).or_default();
        *n += 1;
        let client_dup = *n > 1;
        match user.as_deref().and_then(user_index) {
            Some(i) if i < members => {
                seen_user[i] += 1;
                if seen_user[i] > 1 || client_dup {
                    check.duplicates += 1;
                }
            }
            _ => check.unexpected += 1,
        }
    }
    check.missing = seen_user.iter().filter(|&&n| n == 0).count() as u64;
    check
}

/// The growth from `before` to `after`, per one of `per`.
fn sample_delta(before: Option<Sample>, after: Option<Sample>, per: u64) -> Option<f64> {
    let (b, a) = (before?, after?);
    (per > 0).then(|| (a.bytes as f64 - b.bytes as f64) / per as f64)
}

fn total_rss(pids: &[u32]) -> Option<u64> {
    pids.iter().map(|&p| crate::idle::rss_bytes(p)).sum()
}

#[derive(Debug, Default)]
struct Reads {
    stats: Latency,
    stats_wrong: u64,
    pages: Latency,
    walks: u64,
    walks_exact: u64,
    walk_missing: u64,
    walk_duplicates: u64,
    walk_unexpected: u64,
    walk_ms: Latency,
    errors: Vec<String>,
}

async fn measure_stats(
    caller: &mut Caller,
    channel: &str,
    calls: usize,
    expected: u64,
    r: &mut Reads,
) {
    let params = format!(r#"{{"channel":{}}}"#, serde_json::Value::from(channel));
    for _ in 0..calls {
        match caller.call("presence_stats", &params).await {
            Ok((result, took)) => {
                r.stats.record(took);
                match serde_json::from_str::<StatsResult>(&result) {
                    Ok(s) if s.clients == expected && s.users == expected => {}
                    Ok(s) => {
                        r.stats_wrong += 1;
                        if r.stats_wrong == 1 {
                            r.errors
                                .push(format!("presence_stats said {s:?}, expected {expected}"));
                        }
                    }
                    Err(e) => r
                        .errors
                        .push(format!("presence_stats result {result}: {e}")),
                }
            }
            Err(e) => {
                r.errors.push(e);
                return;
            }
        }
    }
}

async fn measure_walks(
    caller: &mut Caller,
    channel: &str,
    walks: usize,
    page: usize,
    members: usize,
    r: &mut Reads,
) {
    let channel = serde_json::Value::from(channel);
    // Bounded: twice the pages a walk needs, plus slack.
    let max_pages = 2 * members.div_ceil(page.max(1)) + 10;
    for _ in 0..walks {
        let t0 = Instant::now();
        let mut entries: Vec<(String, Option<String>)> = Vec::with_capacity(members);
        let mut cursor: Option<String> = None;
        let mut pages = 0;
        let mut complete = false;
        while pages < max_pages {
            let params = match &cursor {
                Some(c) => format!(
                    r#"{{"channel":{channel},"limit":{page},"cursor":{}}}"#,
                    serde_json::Value::from(c.as_str())
                ),
                None => format!(r#"{{"channel":{channel},"limit":{page}}}"#),
            };
            let (result, took) = match caller.call("presence", &params).await {
                Ok(ok) => ok,
                Err(e) => {
                    r.errors.push(e);
                    return;
                }
            };
            pages += 1;
            r.pages.record(took);
            let parsed: PageResult = match serde_json::from_str(&result) {
                Ok(p) => p,
                Err(e) => {
                    r.errors.push(format!(
                        "presence page: {e}: {}",
                        conn::truncate(&result, 200)
                    ));
                    return;
                }
            };
            entries.extend(parsed.clients.into_iter().map(|m| (m.client_id, m.user)));
            cursor = parsed.cursor;
            if cursor.is_none() {
                complete = true;
                break;
            }
        }
        r.walk_ms.record(t0.elapsed());
        r.walks += 1;
        if !complete {
            r.errors
                .push(format!("a walk did not end within {max_pages} pages"));
        }
        let check = check_walk(&entries, members);
        if check.exact() && complete {
            r.walks_exact += 1;
        }
        r.walk_missing += check.missing;
        r.walk_duplicates += check.duplicates;
        r.walk_unexpected += check.unexpected;
    }
}

pub async fn run(c: &Common, o: &PresenceOpts) -> Report {
    let mut report = Report::new("presence", &c.label, c.url_strings());
    let n_urls = c.urls.len();
    let plan = plan(o.members, n_urls, o.per_worker);
    report
        .param("members", o.members)
        .param("replicas", n_urls)
        .param("channel", o.channel.clone())
        .param("workers", plan.len())
        .param("stats_calls_per_replica", o.stats_calls)
        .param("walks_per_replica", o.walks)
        .param("page_limit", o.page)
        .param(
            "memory_probe",
            o.probe.as_ref().map(Probe::describe).unwrap_or_default(),
        )
        .param("server_pids", o.server_pids.clone());

    // One measuring client per replica, users after the members'.
    let mut callers = Vec::with_capacity(n_urls);
    for (k, target) in c.urls.iter().enumerate() {
        let t = c.target_for(target, o.members + k);
        match conn::connect(&t, None, c.hello, c.connect_timeout).await {
            Ok((ws, _)) => callers.push(Caller::new(ws, o.call_timeout)),
            Err(e) => {
                report.error(format!("measuring client on {target}: {e}"));
                return report;
            }
        }
    }

    let mut pool = match Pool::spawn(c, &plan, Some(&o.channel)) {
        Ok(pool) => pool,
        Err(e) => {
            report.error(e);
            return report;
        }
    };
    if let Err(e) = pool.ready(Duration::from_secs(60)).await {
        report.error(e);
        return report;
    }
    let sample = async || match &o.probe {
        Some(p) => match p.sample().await {
            Ok(s) => (Some(s), None),
            Err(e) => (None, Some(e)),
        },
        None => (None, None),
    };
    let (s0, e0) = sample().await;
    let rss0 = total_rss(&o.server_pids);

    let bound = c.connect_timeout * (o.members.div_ceil(c.concurrency.max(1)) as u32 + 2);
    let connected = pool.connect(bound).await;
    for e in &connected.errors {
        report.error(e.clone());
    }
    progress::note(
        c.progress,
        &format!(
            "presence: {} connections up ({} failed) in {:.2?}",
            connected.ok, connected.failed, connected.elapsed
        ),
    );
    let (s1, e1) = sample().await;
    let rss1 = total_rss(&o.server_pids);

    let joined = pool.subscribe(connected.ok, Duration::from_secs(300)).await;
    for e in &joined.errors {
        report.error(e.clone());
    }
    progress::note(
        c.progress,
        &format!(
            "presence: {} members joined ({} failed) in {:.2?}",
            joined.ok, joined.failed, joined.elapsed
        ),
    );
    let (s2, e2) = sample().await;
    let rss2 = total_rss(&o.server_pids);
    for e in [e0, e1, e2].into_iter().flatten() {
        report.error(format!("memory probe: {e}"));
    }

    // Reads: every measuring client at once, one call at a time each.
    let expected = joined.ok;
    let stats_runs = futures_util::future::join_all(callers.iter_mut().map(|caller| async {
        let mut r = Reads::default();
        measure_stats(caller, &o.channel, o.stats_calls, expected, &mut r).await;
        r
    }))
    .await;
    progress::note(c.progress, "presence: presence_stats measured; walking");
    let walk_runs = futures_util::future::join_all(callers.iter_mut().map(|caller| async {
        let mut r = Reads::default();
        measure_walks(caller, &o.channel, o.walks, o.page, o.members, &mut r).await;
        r
    }))
    .await;
    let mut reads = Reads::default();
    for r in stats_runs.into_iter().chain(walk_runs) {
        reads.stats.merge(&r.stats);
        reads.pages.merge(&r.pages);
        reads.walk_ms.merge(&r.walk_ms);
        reads.stats_wrong += r.stats_wrong;
        reads.walks += r.walks;
        reads.walks_exact += r.walks_exact;
        reads.walk_missing += r.walk_missing;
        reads.walk_duplicates += r.walk_duplicates;
        reads.walk_unexpected += r.walk_unexpected;
        for e in r.errors {
            report.error(e);
        }
    }
    for caller in callers {
        caller.close().await;
    }
    let dropped = pool.close().await;

    let members = joined.ok;
    report
        .metric("accepts_per_s", per_sec(connected.ok, connected.elapsed))
        .metric("joins_per_s", per_sec(joined.ok, joined.elapsed));
    if let Some(v) = sample_delta(s0, s1, connected.ok) {
        report.metric("store_bytes_per_conn", v.round());
    }
    if let Some(v) = sample_delta(s1, s2, members) {
        report.metric("store_bytes_per_member", v.round());
    }
    if let Some(v) = sample_delta(s0, s2, members) {
        report.metric("store_bytes_per_member_with_conn", v.round());
    }
    if let (Some(b), Some(a)) = (s0.and_then(|s| s.messages), s2.and_then(|s| s.messages)) {
        report.metric("store_messages_added", a.saturating_sub(b) as f64);
    }
    let mb = |v: Option<Sample>| v.map(|s| round3(s.bytes as f64 / (1024.0 * 1024.0)));
    if let (Some(b), Some(m), Some(a)) = (mb(s0), mb(s1), mb(s2)) {
        report
            .metric("store_before_mb", b)
            .metric("store_after_connect_mb", m)
            .metric("store_after_join_mb", a);
    }
    if let (Some(r0), Some(r1), Some(r2)) = (rss0, rss1, rss2) {
        if connected.ok > 0 {
            report.metric(
                "rss_per_conn_bytes",
                ((r1 as f64 - r0 as f64) / connected.ok as f64).round(),
            );
        }
        if members > 0 {
            report.metric(
                "rss_per_member_bytes",
                ((r2 as f64 - r1 as f64) / members as f64).round(),
            );
        }
    }
    report
        .latency("presence_stats", "stats_", reads.stats.summary())
        .latency("presence page", "page_", reads.pages.summary())
        .latency("walk", "walk_", reads.walk_ms.summary())
        .latency("subscribe", "join_", joined.latency.summary())
        .metric("connections_ok", connected.ok as f64)
        .metric("connect_failures", connected.failed as f64)
        .metric("members", members as f64)
        .metric("join_failures", joined.failed as f64)
        .metric("connect_s", round3(connected.elapsed.as_secs_f64()))
        .metric("join_s", round3(joined.elapsed.as_secs_f64()))
        .metric("stats_wrong", reads.stats_wrong as f64)
        .metric("walks", reads.walks as f64)
        .metric("walks_exact", reads.walks_exact as f64)
        .metric("walk_missing", reads.walk_missing as f64)
        .metric("walk_duplicates", reads.walk_duplicates as f64)
        .metric("walk_unexpected", reads.walk_unexpected as f64)
        .metric("dropped_during_hold", dropped as f64);
    report
}

/// The members' users, for tests and for the report: `user-0 .. user-<members - 1>`.
pub fn member_users(members: usize) -> impl Iterator<Item = String> {
    (0..members).map(user_name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(client: &str, user: &str) -> (String, Option<String>) {
        (client.to_string(), Some(user.to_string()))
    }

    #[test]
    fn walks_are_checked_member_by_member() {
        let exact: Vec<_> = member_users(3)
            .enumerate()
            .map(|(i, u)| entry(&format!("n/{i}"), &u))
            .collect();
        let c = check_walk(&exact, 3);
        assert!(c.exact(), "{c:?}");
        assert_eq!(c.returned, 3);

        let mut twice = exact.clone();
        twice.push(entry("n/1", "user-1"));
        let c = check_walk(&twice, 3);
        assert_eq!((c.duplicates, c.missing, c.unexpected), (1, 0, 0));

        // Same client id under two users: a duplicate client.
        let clash = vec![
            entry("n/0", "user-0"),
            entry("n/0", "user-1"),
            entry("n/2", "user-2"),
        ];
        assert_eq!(check_walk(&clash, 3).duplicates, 1);

        let short = vec![entry("n/0", "user-0")];
        let c = check_walk(&short, 3);
        assert_eq!((c.missing, c.duplicates), (2, 0));
        assert!(!c.exact());

        let strangers = vec![
            entry("n/0", "user-0"),
            entry("n/1", "user-1"),
            entry("n/2", "user-2"),
            entry("n/9", "user-9"),
            ("n/8".to_string(), None),
            entry("n/7", "bob"),
        ];
        assert_eq!(check_walk(&strangers, 3).unexpected, 3);
    }

    #[test]
    fn responses_are_matched_by_id() {
        assert_eq!(
            response_to(
                r#"{"jsonrpc":"2.0","result":{"clients":5,"users":4},"id":7}"#,
                7
            ),
            Some(Ok(r#"{"clients":5,"users":4}"#.to_string()))
        );
        assert_eq!(
            response_to(r#"{"jsonrpc":"2.0","result":1,"id":6}"#, 7),
            None
        );
        assert_eq!(
            response_to(r#"{"jsonrpc":"2.0","method":"sys.join","params":{}}"#, 7),
            None
        );
        assert!(matches!(
            response_to(r#"{"jsonrpc":"2.0","error":{"code":-32004},"id":7}"#, 7),
            Some(Err(e)) if e.contains("-32004")
        ));
        assert_eq!(response_to("not json", 7), None);
        let page: PageResult = serde_json::from_str(
            r#"{"clients":[{"client_id":"a/1","node_id":"a","user":"u1","info":{"x":1}},{"client_id":"a/2","node_id":"a"}],"cursor":"a/2"}"#,
        )
        .expect("page");
        assert_eq!(page.clients.len(), 2);
        assert_eq!(page.clients[1].user, None);
        assert_eq!(page.cursor.as_deref(), Some("a/2"));
        let stats: StatsResult = serde_json::from_str(r#"{"clients":5,"users":4}"#).expect("stats");
        assert_eq!(
            stats,
            StatsResult {
                clients: 5,
                users: 4
            }
        );
    }

    #[test]
    fn store_deltas_per_unit() {
        let s = |bytes| {
            Some(Sample {
                bytes,
                messages: None,
            })
        };
        assert_eq!(sample_delta(s(1000), s(3000), 4), Some(500.0));
        assert_eq!(sample_delta(s(3000), s(1000), 4), Some(-500.0));
        assert_eq!(sample_delta(None, s(1), 1), None);
        assert_eq!(sample_delta(s(1), s(2), 0), None);
    }
}
