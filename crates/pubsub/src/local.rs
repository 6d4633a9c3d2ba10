//! The in-process backbone: replicas that share one [`LocalBus`] behave as a cluster
//! inside a single process. The server uses it when no external backbone is set,
//! and tests use it to run several nodes without Redis or NATS.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::history::memory::MemoryHistory;
use crate::presence::memory::MemoryPresence;
use crate::{Backbone, Held, Incoming, PubsubError, held};

const NAME: &str = "local";

#[derive(Default)]
struct BusState {
    members: Vec<Arc<Member>>,
}

struct Member {
    topics: Mutex<HashSet<String>>,
    incoming: mpsc::Sender<Incoming>,
}

/// A message bus shared by the [`LocalBackbone`]s attached to it, and the presence
/// they share. Starts connected.
#[derive(Clone)]
pub struct LocalBus {
    state: Arc<Mutex<BusState>>,
    connected: Arc<AtomicBool>,
    presence: MemoryPresence,
    history: MemoryHistory,
}

impl std::fmt::Debug for LocalBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalBus").finish_non_exhaustive()
    }
}

impl Default for LocalBus {
    fn default() -> Self {
        Self::new()
    }
}

impl LocalBus {
    pub fn new() -> Self {
        Self {
            state: Arc::default(),
            connected: Arc::new(AtomicBool::new(true)),
            presence: MemoryPresence::new(),
            history: MemoryHistory::new(),
        }
    }

    /// The history store every replica on this bus shares.
    pub fn history(&self) -> MemoryHistory {
        self.history.clone()
    }

    /// The presence store every replica on this bus shares.
    pub fn presence(&self) -> MemoryPresence {
        self.presence.clone()
    }

    /// Attaches a replica; what it receives goes to `incoming`.
    pub fn attach(&self, incoming: mpsc::Sender<Incoming>) -> LocalBackbone {
        let member = Arc::new(Member {
            topics: Mutex::default(),
            incoming,
        });
        lock(&self.state).members.push(Arc::clone(&member));
        LocalBackbone {
            bus: self.clone(),
            member,
        }
    }

    /// Simulates an outage (false) and its end (true) for every attached replica.
    pub fn set_connected(&self, connected: bool) {
        self.connected.store(connected, Ordering::Release);
    }
}

/// One replica's connection to a [`LocalBus`].
pub struct LocalBackbone {
    bus: LocalBus,
    member: Arc<Member>,
}

impl std::fmt::Debug for LocalBackbone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalBackbone").finish_non_exhaustive()
    }
}

impl Backbone for LocalBackbone {
    fn adapter(&self) -> &'static str {
        NAME
    }

    fn is_connected(&self) -> bool {
        self.bus.connected.load(Ordering::Acquire)
    }

    fn publish(&self, topic: &str, payload: Bytes) -> Result<(), PubsubError> {
        if !self.is_connected() {
            return Err(PubsubError::Disconnected(NAME));
        }
        let members = lock(&self.bus.state).members.clone();
        for member in members {
            if lock(&member.topics).contains(topic) {
                // Like a real broker, a receiver that cannot keep up loses messages
                // rather than stalling the publisher.
                let _ = member.incoming.try_send(payload.clone());
            }
        }
        Ok(())
    }

    fn subscribe(&self, topic: &str) -> Result<Held, PubsubError> {
        lock(&self.member.topics).insert(topic.to_owned());
        Ok(held(self.is_connected()))
    }

    fn unsubscribe(&self, topic: &str) -> Result<(), PubsubError> {
        lock(&self.member.topics).remove(topic);
        Ok(())
    }
}

impl Drop for LocalBackbone {
    fn drop(&mut self) {
        lock(&self.bus.state)
            .members
            .retain(|member| !Arc::ptr_eq(member, &self.member));
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn delivers_to_subscribed_members_including_the_sender() {
        let bus = LocalBus::new();
        let (a_tx, mut a_rx) = mpsc::channel(8);
        let (b_tx, mut b_rx) = mpsc::channel(8);
        let a = bus.attach(a_tx);
        let b = bus.attach(b_tx);
        a.subscribe("t").expect("subscribe");
        b.publish("t", Bytes::from_static(b"x")).expect("publish");
        assert_eq!(a_rx.recv().await, Some(Bytes::from_static(b"x")));
        assert!(b_rx.try_recv().is_err(), "b is not subscribed");
        b.subscribe("t").expect("subscribe");
        a.publish("t", Bytes::from_static(b"y")).expect("publish");
        assert_eq!(b_rx.recv().await, Some(Bytes::from_static(b"y")));
    }

    #[test]
    fn an_outage_refuses_publications() {
        let bus = LocalBus::new();
        let (tx, _rx) = mpsc::channel(1);
        let member = bus.attach(tx);
        bus.set_connected(false);
        assert!(!member.is_connected());
        assert_eq!(
            member.publish("t", Bytes::new()),
            Err(PubsubError::Disconnected("local"))
        );
    }
}
