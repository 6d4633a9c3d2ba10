//! The in-process backbone: replicas that share one [`LocalBus`] behave as a cluster
//! inside a single process. The server uses it when no external backbone is set,
//! and tests use it to run several nodes without Redis or NATS.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use crate::history::memory::MemoryHistory;
use crate::presence::memory::MemoryPresence;
use crate::{Backbone, Held, Inbox, PubsubError, held};

const NAME: &str = "local";

#[derive(Default)]
struct BusState {
    members: Vec<Arc<Member>>,
}

struct Member {
    topics: Mutex<HashSet<String>>,
    inbox: Inbox,
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

    /// Attaches a replica; what it receives goes to `inbox`, delivered on the
    /// publisher's own call (the bus has no tasks).
    pub fn attach(&self, inbox: Inbox) -> LocalBackbone {
        let member = Arc::new(Member {
            topics: Mutex::default(),
            inbox,
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
            // Not under the topics lock: delivering may subscribe or publish again.
            let subscribed = lock(&member.topics).contains(topic);
            if subscribed {
                member.inbox.deliver(payload.clone());
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

    /// An inbox that keeps what it receives.
    fn recorder() -> (Inbox, Arc<Mutex<Vec<Bytes>>>) {
        let received = Arc::new(Mutex::new(Vec::new()));
        let kept = Arc::clone(&received);
        let inbox = Inbox::new(move |message| lock(&kept).push(message));
        (inbox, received)
    }

    #[test]
    fn delivers_to_subscribed_members_including_the_sender() {
        let bus = LocalBus::new();
        let (a_inbox, a_got) = recorder();
        let (b_inbox, b_got) = recorder();
        let a = bus.attach(a_inbox);
        let b = bus.attach(b_inbox);
        a.subscribe("t").expect("subscribe");
        b.publish("t", Bytes::from_static(b"x")).expect("publish");
        assert_eq!(*lock(&a_got), [Bytes::from_static(b"x")]);
        assert!(lock(&b_got).is_empty(), "b is not subscribed");
        b.subscribe("t").expect("subscribe");
        b.publish("t", Bytes::from_static(b"y")).expect("publish");
        assert_eq!(*lock(&b_got), [Bytes::from_static(b"y")]);
        assert_eq!(lock(&a_got).len(), 2);
    }

    #[test]
    fn an_outage_refuses_publications() {
        let bus = LocalBus::new();
        let member = bus.attach(recorder().0);
        bus.set_connected(false);
        assert!(!member.is_connected());
        assert_eq!(
            member.publish("t", Bytes::new()),
            Err(PubsubError::Disconnected("local"))
        );
    }
}
