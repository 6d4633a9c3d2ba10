//! What every presence store must do, written once and run against each store
//! (`presence_memory.rs`, `presence_redis.rs`, `presence_nats.rs`). Each scenario
//! gets two handles on one store, as two replicas would have, and checks that what
//! one writes the other reads at once.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use chorus_pubsub::presence::{Connection, Lost, Member, PresenceStore};
use serde_json::value::RawValue;

/// How long anything that should happen "soon" may take before a test fails.
pub const SOON: Duration = Duration::from_secs(10);
/// A liveness that runs out quickly, for the scenarios about dead replicas.
pub const SHORT_TTL: Duration = Duration::from_millis(300);
pub const LONG_TTL: Duration = Duration::from_secs(60);

/// Two replicas' handles on one store.
pub struct Stores {
    pub a: Arc<dyn PresenceStore>,
    pub b: Arc<dyn PresenceStore>,
    /// Whatever must live as long as the stores (a server process).
    pub guard: Option<Box<dyn std::any::Any + Send + Sync>>,
}

pub fn connection(node: &str, n: u32, user: Option<&str>, device: Option<&str>) -> Connection {
    Connection {
        client_id: format!("{node}/{n}"),
        node_id: node.to_owned(),
        user: user.map(str::to_owned),
        device: device.map(str::to_owned),
        connected_at_ms: 1_700_000_000_000 + u64::from(n),
        remote_addr: "127.0.0.1".to_owned(),
        info: Some(RawValue::from_string(format!(r#"{{"n":{n}}}"#)).expect("JSON")),
    }
}

fn member(connection: &Connection) -> Member {
    connection.member()
}

fn ids(connections: &[Connection]) -> Vec<&str> {
    connections.iter().map(|c| c.client_id.as_str()).collect()
}

/// A user's first connection anywhere and the last one gone are reported once.
pub async fn first_and_last_connection_of_a_user(s: &Stores) {
    s.a.beat("n1", 1, LONG_TTL).await.expect("beat");
    s.b.beat("n2", 2, LONG_TTL).await.expect("beat");
    let phone = connection("n1", 1, Some("alice"), Some("phone"));
    let laptop = connection("n2", 1, Some("alice"), Some("laptop"));
    let anonymous = connection("n1", 2, None, None);
    assert!(
        s.a.connect(&phone, true)
            .await
            .expect("connect")
            .first_of_user
    );
    assert!(
        !s.b.connect(&laptop, true)
            .await
            .expect("connect")
            .first_of_user
    );
    assert!(
        !s.a.connect(&anonymous, true)
            .await
            .expect("connect")
            .first_of_user
    );
    // Recording the same connection again (a resync) changes nothing.
    assert!(
        !s.a.connect(&phone, false)
            .await
            .expect("connect")
            .first_of_user
    );
    let devices = s.b.user("alice").await.expect("user");
    assert_eq!(ids(&devices), ["n1/1", "n2/1"]);
    assert_eq!(devices[0].device.as_deref(), Some("phone"));
    assert_eq!(devices[0].remote_addr, "127.0.0.1");
    assert_eq!(devices[0].connected_at_ms, phone.connected_at_ms);
    assert_eq!(
        devices[0].info.as_ref().map(|i| i.get()),
        Some(r#"{"n":1}"#)
    );

    let gone = s.b.disconnect("n1/1").await.expect("disconnect");
    assert!(gone.known && !gone.last_of_user);
    let gone = s.a.disconnect("n2/1").await.expect("disconnect");
    assert!(gone.known && gone.last_of_user);
    let again = s.a.disconnect("n2/1").await.expect("disconnect");
    assert!(
        !again.known && !again.last_of_user,
        "a second removal reports nothing"
    );
    let anonymous_gone = s.a.disconnect("n1/2").await.expect("disconnect");
    assert!(anonymous_gone.known && !anonymous_gone.last_of_user);
    assert!(s.a.user("alice").await.expect("user").is_empty());
}

/// With `replace`, a connection finds the same user's connections with its device.
pub async fn a_device_connecting_twice_finds_its_older_connection(s: &Stores) {
    let old = connection("n1", 1, Some("bob"), Some("tablet"));
    let other_device = connection("n1", 2, Some("bob"), Some("phone"));
    let other_user = connection("n1", 3, Some("carol"), Some("tablet"));
    let no_device = connection("n1", 4, Some("bob"), None);
    for c in [&old, &other_device, &other_user, &no_device] {
        s.a.connect(c, true).await.expect("connect");
    }
    let new = connection("n2", 1, Some("bob"), Some("tablet"));
    let connected = s.b.connect(&new, true).await.expect("connect");
    assert!(!connected.first_of_user);
    assert_eq!(ids(&connected.replaced), ["n1/1"]);
    let quiet = connection("n2", 2, Some("bob"), Some("tablet"));
    assert!(
        s.b.connect(&quiet, false)
            .await
            .expect("connect")
            .replaced
            .is_empty()
    );
    let undeviced = connection("n2", 3, Some("bob"), None);
    assert!(
        s.b.connect(&undeviced, true)
            .await
            .expect("connect")
            .replaced
            .is_empty()
    );
}

/// Joins, leaves and disconnects show in the stats at once, from any replica.
pub async fn channel_members_and_stats(s: &Stores) {
    let channel = "chat:room@1/x=y.z";
    let alice1 = connection("n1", 1, Some("alice"), Some("d1"));
    let alice2 = connection("n2", 1, Some("alice"), Some("d2"));
    let bob = connection("n2", 2, Some("bob"), None);
    let anonymous = connection("n1", 2, None, None);
    for c in [&alice1, &alice2, &bob, &anonymous] {
        let store = if c.node_id == "n1" { &s.a } else { &s.b };
        store.connect(c, true).await.expect("connect");
        store.join(channel, &member(c)).await.expect("join");
    }
    // Joining twice keeps one membership.
    s.a.join(channel, &member(&alice1)).await.expect("join");
    let stats = s.b.stats(channel).await.expect("stats");
    assert_eq!((stats.clients, stats.users), (4, 2));
    s.a.join("other", &member(&alice1)).await.expect("join");

    s.b.leave(channel, "n2/1").await.expect("leave");
    s.b.leave(channel, "n2/1").await.expect("leave again");
    let stats = s.a.stats(channel).await.expect("stats");
    assert_eq!(
        (stats.clients, stats.users),
        (3, 2),
        "alice is still in on d1"
    );

    let gone = s.b.disconnect("n1/1").await.expect("disconnect");
    let left: BTreeSet<String> = gone.channels.into_iter().collect();
    assert_eq!(
        left,
        BTreeSet::from([channel.to_owned(), "other".to_owned()])
    );
    let stats = s.a.stats(channel).await.expect("stats");
    assert_eq!((stats.clients, stats.users), (2, 1));
    assert_eq!(s.a.stats("other").await.expect("stats").clients, 0);
    let page = s.a.page(channel, 10, None).await.expect("page");
    let members: Vec<&str> = page.members.iter().map(|m| m.client_id.as_str()).collect();
    assert_eq!(members, ["n1/2", "n2/2"]);
    assert_eq!(page.members[1].user.as_deref(), Some("bob"));
    assert_eq!(page.members[1].node_id, "n2");
    assert_eq!(page.members[0].user, None);
    assert_eq!(
        page.members[0].info.as_ref().map(|i| i.get()),
        Some(r#"{"n":2}"#)
    );
    assert!(page.cursor.is_none());
    assert_eq!(s.a.stats("nobody").await.expect("stats").clients, 0);
    assert!(
        s.a.page("nobody", 10, None)
            .await
            .expect("page")
            .members
            .is_empty()
    );
}

/// Paging walks every member exactly once, `limit` at a time.
pub async fn paging_returns_every_member_once(s: &Stores) {
    let channel = "big";
    let total = 2_345u32;
    let mut expected = BTreeSet::new();
    for n in 0..total {
        let c = connection(
            if n % 2 == 0 { "n1" } else { "n2" },
            n,
            Some(&format!("u{}", n % 1000)),
            None,
        );
        let store = if n % 2 == 0 { &s.a } else { &s.b };
        store.join(channel, &member(&c)).await.expect("join");
        expected.insert(c.client_id);
    }
    let stats = s.a.stats(channel).await.expect("stats");
    assert_eq!((stats.clients, stats.users), (u64::from(total), 1000));
    let mut seen = BTreeSet::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let page =
            s.b.page(channel, 1000, cursor.as_deref())
                .await
                .expect("page");
        assert!(page.members.len() <= 1000);
        for member in &page.members {
            assert!(
                seen.insert(member.client_id.clone()),
                "{} twice",
                member.client_id
            );
        }
        pages += 1;
        match page.cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(seen, expected);
    let capped = s.a.page(channel, 5000, None).await.expect("page");
    assert_eq!(capped.members.len(), 1000, "a page holds at most 1000");
    let exact = s.a.page(channel, 345, Some("n2/999")).await.expect("page");
    assert!(
        exact
            .members
            .iter()
            .all(|m| m.client_id.as_str() > "n2/999")
    );
}

/// Live replicas are listed with their connection counts; a retired one is not.
pub async fn nodes_are_listed_while_alive(s: &Stores) {
    assert!(
        !s.a.beat("n1", 111, LONG_TTL).await.expect("beat").known,
        "first beat"
    );
    assert!(s.a.beat("n1", 111, LONG_TTL).await.expect("beat").known);
    s.b.beat("n2", 222, LONG_TTL).await.expect("beat");
    s.a.connect(&connection("n1", 1, Some("u"), None), true)
        .await
        .expect("connect");
    s.a.connect(&connection("n1", 2, None, None), true)
        .await
        .expect("connect");
    let nodes = s.b.nodes().await.expect("nodes");
    let summary: Vec<(&str, u64, u64)> = nodes
        .iter()
        .map(|n| (n.node_id.as_str(), n.connections, n.started_at_ms))
        .collect();
    assert_eq!(summary, [("n1", 2, 111), ("n2", 0, 222)]);
    s.b.retire("n2").await.expect("retire");
    let nodes = s.a.nodes().await.expect("nodes");
    assert_eq!(nodes.len(), 1);
    assert_eq!(nodes[0].node_id, "n1");
}

async fn reap_all(store: &Arc<dyn PresenceStore>, into: &mut Vec<Lost>) {
    loop {
        let lost = store.reap(7).await.expect("reap");
        assert!(lost.len() <= 7, "reap respects its limit");
        if lost.is_empty() {
            return;
        }
        into.extend(lost);
    }
}

/// A replica that stops beating is reaped once its liveness runs out: every one of
/// its connections and memberships is removed and handed to exactly one reaper.
pub async fn a_dead_replica_is_reaped_once(s: &Stores) {
    // Alive for as long as the set-up takes (on a loaded machine, longer than a short
    // TTL); its last beat, with a short TTL, comes after.
    s.a.beat("dead", 1, LONG_TTL).await.expect("beat");
    s.b.beat("alive", 2, LONG_TTL).await.expect("beat");
    let mut on_dead = Vec::new();
    for n in 0..20 {
        let c = connection(
            "dead",
            n,
            Some(&format!("user{}", n % 10)),
            Some(&format!("dev{n}")),
        );
        s.a.connect(&c, true).await.expect("connect");
        s.a.join("room", &member(&c)).await.expect("join");
        on_dead.push(c);
    }
    // user0 also has a connection on the live replica.
    let survivor = connection("alive", 1, Some("user0"), None);
    s.b.connect(&survivor, true).await.expect("connect");
    s.b.join("room", &member(&survivor)).await.expect("join");
    s.a.set_channel_counts("dead", &[("room".to_owned(), 20)])
        .await
        .expect("counts");
    s.b.set_channel_counts("alive", &[("room".to_owned(), 1)])
        .await
        .expect("counts");

    // Not reaped while alive.
    assert!(s.b.reap(100).await.expect("reap").is_empty());
    s.a.beat("dead", 1, SHORT_TTL).await.expect("beat");
    let deadline = tokio::time::Instant::now() + SOON;
    while s.b.nodes().await.expect("nodes").len() > 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the dead replica never expired"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (mut by_a, mut by_b) = (Vec::new(), Vec::new());
    tokio::join!(reap_all(&s.a, &mut by_a), reap_all(&s.b, &mut by_b));
    let mut reaped: Vec<&Lost> = by_a.iter().chain(&by_b).collect();
    reaped.sort_by(|x, y| x.connection.client_id.cmp(&y.connection.client_id));
    let reaped_ids: BTreeSet<&str> = reaped
        .iter()
        .map(|l| l.connection.client_id.as_str())
        .collect();
    assert_eq!(reaped.len(), 20, "each connection reaped exactly once");
    assert_eq!(reaped_ids.len(), 20);
    for lost in &reaped {
        assert_eq!(lost.connection.node_id, "dead");
        assert_eq!(lost.channels, ["room"]);
        let user = lost.connection.user.as_deref().expect("user");
        let others_on_dead = reaped
            .iter()
            .filter(|l| l.connection.user.as_deref() == Some(user))
            .count();
        assert_eq!(others_on_dead, 2);
    }
    // user0 is still online (on the live replica): never last. Every other user: last
    // exactly once, on whichever of its two connections went second.
    let lasts: Vec<&str> = reaped
        .iter()
        .filter(|l| l.last_of_user)
        .map(|l| l.connection.user.as_deref().expect("user"))
        .collect();
    let lasts_set: BTreeSet<&str> = lasts.iter().copied().collect();
    assert_eq!(lasts.len(), 9);
    assert_eq!(lasts_set.len(), 9);
    assert!(!lasts_set.contains("user0"));

    let stats = s.a.stats("room").await.expect("stats");
    assert_eq!((stats.clients, stats.users), (1, 1));
    assert_eq!(s.a.user("user0").await.expect("user").len(), 1);
    assert!(s.a.user("user1").await.expect("user").is_empty());
    assert_eq!(
        s.a.channels().await.expect("channels"),
        [("room".to_owned(), 1)]
    );
    assert_eq!(
        s.a.count_targets(&[], &["dev3".to_owned()], &[])
            .await
            .expect("count"),
        0
    );
    // The dead replica comes back: its store entry is gone, so it must record again.
    assert!(!s.a.beat("dead", 1, LONG_TTL).await.expect("beat").known);
}

/// A replica starting under a node id an earlier process used clears that process's
/// leftovers, even while its entry still looks alive.
pub async fn leftovers_of_an_earlier_process_are_reaped_on_demand(s: &Stores) {
    s.a.beat("pod-0", 1, LONG_TTL).await.expect("beat");
    for n in 0..5 {
        let c = connection("pod-0", n, Some("dave"), None);
        s.a.connect(&c, true).await.expect("connect");
        s.a.join("feed", &member(&c)).await.expect("join");
    }
    let mut lost = Vec::new();
    loop {
        let more = s.b.reap_node("pod-0", 2).await.expect("reap_node");
        assert!(more.len() <= 2);
        if more.is_empty() {
            break;
        }
        lost.extend(more);
    }
    assert_eq!(lost.len(), 5);
    assert_eq!(lost.iter().filter(|l| l.last_of_user).count(), 1);
    assert_eq!(s.a.stats("feed").await.expect("stats").clients, 0);
    assert!(s.a.user("dave").await.expect("user").is_empty());
}

/// Channel counts are summed over live replicas.
pub async fn channel_counts_are_summed_over_replicas(s: &Stores) {
    s.a.beat("n1", 1, LONG_TTL).await.expect("beat");
    s.b.beat("n2", 1, LONG_TTL).await.expect("beat");
    s.a.set_channel_counts("n1", &[("a".into(), 2), ("b:1".into(), 1)])
        .await
        .expect("counts");
    s.b.set_channel_counts("n2", &[("a".into(), 3)])
        .await
        .expect("counts");
    assert_eq!(
        s.b.channels().await.expect("channels"),
        [("a".to_owned(), 5), ("b:1".to_owned(), 1)]
    );
    s.a.set_channel_counts("n1", &[("b:1".into(), 0), ("a".into(), 1)])
        .await
        .expect("counts");
    assert_eq!(
        s.b.channels().await.expect("channels"),
        [("a".to_owned(), 4)]
    );
    s.b.retire("n2").await.expect("retire");
    assert_eq!(
        s.a.channels().await.expect("channels"),
        [("a".to_owned(), 1)]
    );
}

/// `send` and `kick` count each targeted connection once.
pub async fn targets_are_counted_once(s: &Stores) {
    let conns = [
        connection("n1", 1, Some("erin"), Some("e-phone")),
        connection("n2", 1, Some("erin"), Some("e-laptop")),
        connection("n2", 2, Some("frank"), Some("f-phone")),
        connection("n1", 2, None, None),
    ];
    for c in &conns {
        s.a.connect(c, true).await.expect("connect");
    }
    let count = |users: &[&str], devices: &[&str], clients: &[&str]| {
        let users: Vec<String> = users.iter().map(|s| (*s).to_owned()).collect();
        let devices: Vec<String> = devices.iter().map(|s| (*s).to_owned()).collect();
        let clients: Vec<String> = clients.iter().map(|s| (*s).to_owned()).collect();
        let store = Arc::clone(&s.b);
        async move {
            store
                .count_targets(&users, &devices, &clients)
                .await
                .expect("count")
        }
    };
    assert_eq!(count(&["erin"], &[], &[]).await, 2);
    assert_eq!(
        count(
            &["erin"],
            &["e-phone", "f-phone"],
            &["n1/2", "n2/2", "n9/9"]
        )
        .await,
        4
    );
    assert_eq!(count(&[], &["e-laptop"], &[]).await, 1);
    assert_eq!(count(&["nobody"], &["nothing"], &["n1/99"]).await, 0);
}

/// Names with characters that key encodings must survive.
pub async fn names_are_kept_exactly(s: &Stores) {
    let odd = Connection {
        client_id: "node.a/b:c/7".into(),
        node_id: "node.a/b:c".into(),
        user: Some("ü ser.*>/x".into()),
        device: Some("dev ice.*".into()),
        connected_at_ms: 1,
        remote_addr: "::1".into(),
        info: None,
    };
    s.a.beat(&odd.node_id, 5, LONG_TTL).await.expect("beat");
    assert!(
        s.a.connect(&odd, true)
            .await
            .expect("connect")
            .first_of_user
    );
    s.a.join("a.b.c", &odd.member()).await.expect("join");
    s.a.join("a", &odd.member()).await.expect("join");
    let user = s.b.user("ü ser.*>/x").await.expect("user");
    assert_eq!(ids(&user), ["node.a/b:c/7"]);
    assert_eq!(user[0].device.as_deref(), Some("dev ice.*"));
    assert_eq!(user[0].info.as_ref().map(|i| i.get()), None);
    assert_eq!(s.b.stats("a.b.c").await.expect("stats").clients, 1);
    assert_eq!(s.b.stats("a").await.expect("stats").clients, 1);
    assert_eq!(s.b.stats("a.b").await.expect("stats").clients, 0);
    assert_eq!(
        s.b.count_targets(&[], &["dev ice.*".into()], &[])
            .await
            .expect("count"),
        1
    );
    let nodes = s.b.nodes().await.expect("nodes");
    assert_eq!(nodes[0].node_id, "node.a/b:c");
    let gone = s.b.disconnect("node.a/b:c/7").await.expect("disconnect");
    assert!(gone.last_of_user);
    assert_eq!(gone.channels.len(), 2);
}

/// Runs every scenario, each on fresh stores from `fresh`.
#[macro_export]
macro_rules! presence_suite {
    ($fresh:expr) => {
        #[tokio::test]
        async fn first_and_last_connection_of_a_user() {
            presence_suite::first_and_last_connection_of_a_user(&$fresh.await).await;
        }
        #[tokio::test]
        async fn a_device_connecting_twice_finds_its_older_connection() {
            presence_suite::a_device_connecting_twice_finds_its_older_connection(&$fresh.await)
                .await;
        }
        #[tokio::test]
        async fn channel_members_and_stats() {
            presence_suite::channel_members_and_stats(&$fresh.await).await;
        }
        #[tokio::test]
        async fn paging_returns_every_member_once() {
            presence_suite::paging_returns_every_member_once(&$fresh.await).await;
        }
        #[tokio::test]
        async fn nodes_are_listed_while_alive() {
            presence_suite::nodes_are_listed_while_alive(&$fresh.await).await;
        }
        #[tokio::test]
        async fn a_dead_replica_is_reaped_once() {
            presence_suite::a_dead_replica_is_reaped_once(&$fresh.await).await;
        }
        #[tokio::test]
        async fn leftovers_of_an_earlier_process_are_reaped_on_demand() {
            presence_suite::leftovers_of_an_earlier_process_are_reaped_on_demand(&$fresh.await)
                .await;
        }
        #[tokio::test]
        async fn channel_counts_are_summed_over_replicas() {
            presence_suite::channel_counts_are_summed_over_replicas(&$fresh.await).await;
        }
        #[tokio::test]
        async fn targets_are_counted_once() {
            presence_suite::targets_are_counted_once(&$fresh.await).await;
        }
        #[tokio::test]
        async fn names_are_kept_exactly() {
            presence_suite::names_are_kept_exactly(&$fresh.await).await;
        }
    };
}
