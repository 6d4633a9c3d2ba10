//! One connection's requests on one channel take effect in the order it sent them: a
//! `publish` or `unsubscribe` right behind a pending `subscribe` of the same channel
//! waits for it. Calls on other channels, and calls on no channel, never wait.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

/// The last unfinished call on each channel of one connection.
#[derive(Debug, Default)]
pub struct ChannelOrder {
    /// Entries in `tails`, read without the lock: almost always zero.
    pending: AtomicUsize,
    next_id: AtomicU64,
    tails: Mutex<HashMap<Arc<str>, Tail>>,
}

#[derive(Debug)]
struct Tail {
    id: u64,
    /// Resolves when that call finishes; taken by the call queued right behind it.
    done: Option<oneshot::Receiver<()>>,
}

/// Held by an unfinished call; dropping it lets the next call on the channel go.
#[derive(Debug)]
pub struct Ticket {
    order: Arc<ChannelOrder>,
    channel: Arc<str>,
    id: u64,
    _done: oneshot::Sender<()>,
}

impl ChannelOrder {
    /// Whether a call on `channel` must wait for an earlier one.
    pub fn is_busy(&self, channel: &str) -> bool {
        self.pending.load(Ordering::Acquire) > 0 && self.lock().contains_key(channel)
    }

    /// Registers a call on `channel` that will finish later. Returns what it must wait
    /// for first (the previous unfinished call on the channel, if any), and the ticket
    /// that releases the call after it.
    pub fn enter(
        self: &Arc<Self>,
        channel: &str,
    ) -> (Option<impl Future<Output = ()> + Send + 'static>, Ticket) {
        let (done_tx, done_rx) = oneshot::channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let channel: Arc<str> = Arc::from(channel);
        let previous = {
            let mut tails = self.lock();
            let previous = tails.insert(
                Arc::clone(&channel),
                Tail {
                    id,
                    done: Some(done_rx),
                },
            );
            if previous.is_none() {
                self.pending.fetch_add(1, Ordering::AcqRel);
            }
            previous.and_then(|tail| tail.done)
        };
        let wait = previous.map(|done| async move {
            // An error only says the sender is gone: that call finished too.
            let _ = done.await;
        });
        let ticket = Ticket {
            order: Arc::clone(self),
            channel,
            id,
            _done: done_tx,
        };
        (wait, ticket)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Arc<str>, Tail>> {
        self.tails
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut tails = self.order.lock();
        if tails
            .get(&self.channel)
            .is_some_and(|tail| tail.id == self.id)
        {
            tails.remove(&self.channel);
            self.order.pending.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn calls_on_one_channel_finish_in_order() {
        let order = Arc::new(ChannelOrder::default());
        assert!(!order.is_busy("a"));
        let (none, first) = order.enter("a");
        assert!(none.is_none(), "nothing to wait for");
        assert!(order.is_busy("a"));
        assert!(!order.is_busy("b"), "other channels are free");
        let (wait, second) = order.enter("a");
        let wait = wait.expect("the second waits for the first");
        let waiter = tokio::spawn(wait);
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(first);
        waiter.await.expect("released");
        assert!(order.is_busy("a"), "the second is still pending");
        drop(second);
        assert!(!order.is_busy("a"));
        assert_eq!(order.pending.load(Ordering::Acquire), 0);
    }
}
