//! One connected client as the rest of the server sees it: an id, an identity, and an
//! outbound queue bounded in bytes that never makes the sender wait.

use std::collections::{HashSet, VecDeque};
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use crate::frame::{Frame, Overflow, Tag};
use crate::hub::HubEvents;

/// Process-unique client number, assigned by the [`Hub`](crate::Hub).
pub type ClientId = u64;

/// Room kept for the notice that says what a drop policy dropped, besides the
/// channel's name: a `sys.gap` with two offsets fits in it.
const NOTICE_RESERVE: usize = 130;

/// What a channel's drop policy took out of one client's queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Dropped {
    pub messages: u64,
    /// The lowest and highest offset dropped (0: the channel has no history).
    pub from_offset: u64,
    pub to_offset: u64,
}

impl Dropped {
    fn count(&mut self, frame: &Frame) {
        self.messages += 1;
        if let Some(offset) = frame
            .tag()
            .map(|tag| tag.offset)
            .filter(|offset| *offset > 0)
        {
            self.from_offset = if self.from_offset == 0 {
                offset
            } else {
                self.from_offset.min(offset)
            };
            self.to_offset = self.to_offset.max(offset);
        }
    }
}

/// Queue capacity kept after a burst drains; a larger one is given back, so a burst
/// does not pin memory on every connection that lived through it.
const IDLE_QUEUE_CAPACITY: usize = 64;

/// Who a client is, when authentication says so. Empty for anonymous clients.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    pub user: Option<Arc<str>>,
    pub device: Option<Arc<str>>,
}

/// Why the server ends a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloseReason {
    /// The outbound queue went over its byte budget (close code 1013): queued frames
    /// are discarded.
    SlowConsumer,
    /// The server is shutting down (close code 1001): queued frames are sent first.
    Shutdown,
    /// The server API kicked the connection (close code 4003): queued frames, the
    /// `sys.kick` notice last, are sent first.
    Kicked,
    /// A newer connection of the same user and device replaced it (close code 4002):
    /// queued frames, the `sys.replaced` notice last, are sent first.
    Replaced,
}

impl CloseReason {
    pub fn code(self) -> u16 {
        match self {
            Self::SlowConsumer => 1013,
            Self::Shutdown => 1001,
            Self::Kicked => 4003,
            Self::Replaced => 4002,
        }
    }

    /// Whether frames already queued go out before the close frame.
    pub fn flushes_queue(self) -> bool {
        !matches!(self, Self::SlowConsumer)
    }
}

/// Why a frame was not queued.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SendError {
    #[error("client outbound queue is over its byte budget; the client is being disconnected")]
    OverBudget,
    #[error("client is closing")]
    Closed,
}

/// The outbound queue and what the connection must learn from it.
#[derive(Default)]
struct Queue {
    frames: VecDeque<Frame>,
    /// Bytes of the queued frames: what this client still owes, whoever else shares
    /// the same buffers.
    owed: usize,
    close: Option<CloseReason>,
    /// The connection task, when it found nothing to do.
    waker: Option<Waker>,
}

pub(crate) struct ClientShared {
    pub(crate) id: ClientId,
    identity: Identity,
    /// Most bytes the queue may hold (`WS_SEND_BUFFER`).
    budget: usize,
    queue: Mutex<Queue>,
    /// Channels this client is subscribed to, so a disconnect can clean the index.
    pub(crate) channels: Mutex<HashSet<Arc<str>>>,
    events: Arc<dyn HubEvents>,
}

/// A cheap, cloneable reference to a client, used to queue frames for it.
#[derive(Clone)]
pub struct ClientHandle {
    shared: Arc<ClientShared>,
}

impl std::fmt::Debug for ClientHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientHandle")
            .field("id", &self.shared.id)
            .finish()
    }
}

impl ClientHandle {
    pub(crate) fn new(
        id: ClientId,
        identity: Identity,
        budget: usize,
        events: Arc<dyn HubEvents>,
    ) -> (Self, Outbox) {
        let shared = Arc::new(ClientShared {
            id,
            identity,
            budget: budget.max(1),
            queue: Mutex::default(),
            channels: Mutex::new(HashSet::new()),
            events,
        });
        let outbox = Outbox {
            shared: Arc::clone(&shared),
        };
        (Self { shared }, outbox)
    }

    pub fn id(&self) -> ClientId {
        self.shared.id
    }

    pub fn identity(&self) -> &Identity {
        &self.shared.identity
    }

    /// The byte budget of this client's queue.
    pub fn budget(&self) -> usize {
        self.shared.budget
    }

    /// Queues a frame without waiting. A frame that would take the queue over its
    /// byte budget marks the client a slow consumer: it is disconnected with 1013, its
    /// queue is discarded, and nobody else is held up by it.
    pub fn send(&self, frame: Frame) -> Result<(), SendError> {
        let mut queue = lock(&self.shared.queue);
        if queue.close.is_some() {
            return Err(SendError::Closed);
        }
        let len = frame.len();
        if queue.owed + len > self.shared.budget
            && let Some(tag) = frame.tag()
            && tag.overflow != Overflow::Disconnect
            && let Some(notice) = self.make_room(&mut queue, tag, len)
        {
            // The channel's policy made room: the notice says what it dropped.
            queue.owed += notice.len() + len;
            queue.frames.push_back(notice);
            queue.frames.push_back(frame);
            let waker = queue.waker.take();
            drop(queue);
            wake(waker);
            return Ok(());
        }
        if queue.owed + len > self.shared.budget {
            queue.close = Some(CloseReason::SlowConsumer);
            queue.frames = VecDeque::new();
            queue.owed = 0;
            let waker = queue.waker.take();
            drop(queue);
            wake(waker);
            self.shared.events.slow_consumer(self.shared.id);
            return Err(SendError::OverBudget);
        }
        queue.frames.push_back(frame);
        queue.owed += len;
        let waker = queue.waker.take();
        drop(queue);
        wake(waker);
        Ok(())
    }

    /// Drops queued messages of `tag`'s channel as its policy says, so that `len` more
    /// bytes and the notice about what was dropped fit. Returns the notice, or `None`
    /// when dropping cannot make room (the client is then closed as a slow consumer).
    fn make_room(&self, queue: &mut Queue, tag: &Tag, len: usize) -> Option<Frame> {
        let budget = self.shared.budget;
        let same_channel = |frame: &Frame| frame.tag().is_some_and(|t| t.channel == tag.channel);
        let mut dropped = Dropped::default();
        let mut freed = 0;
        match tag.overflow {
            Overflow::Disconnect => return None,
            Overflow::DropOldest => {
                // Oldest first, until the new message and a notice fit.
                let reserve = NOTICE_RESERVE + tag.channel.len();
                queue.frames.retain(|queued| {
                    if queue.owed - freed + len + reserve <= budget || !same_channel(queued) {
                        return true;
                    }
                    freed += queued.len();
                    dropped.count(queued);
                    false
                });
            }
            Overflow::Latest => {
                queue.frames.retain(|queued| {
                    if !same_channel(queued) {
                        return true;
                    }
                    freed += queued.len();
                    dropped.count(queued);
                    false
                });
            }
        }
        queue.owed -= freed;
        let notice = self.shared.events.gap(&tag.channel, &dropped)?;
        (dropped.messages > 0 && queue.owed + notice.len() + len <= budget).then_some(notice)
    }

    /// Asks the client's connection to close. Only the first reason counts; returns
    /// whether this call was the one that set it.
    pub fn close(&self, reason: CloseReason) -> bool {
        let mut queue = lock(&self.shared.queue);
        if queue.close.is_some() {
            return false;
        }
        queue.close = Some(reason);
        if !reason.flushes_queue() {
            queue.frames = VecDeque::new();
            queue.owed = 0;
        }
        let waker = queue.waker.take();
        drop(queue);
        wake(waker);
        true
    }

    /// The reason the client is closing, if it is.
    pub fn closing(&self) -> Option<CloseReason> {
        lock(&self.shared.queue).close
    }

    /// Whether the client is subscribed to `channel`.
    pub fn is_subscribed(&self, channel: &str) -> bool {
        self.channels().contains(channel)
    }

    /// The channels the client is subscribed to.
    pub fn subscriptions(&self) -> Vec<Arc<str>> {
        self.channels().iter().cloned().collect()
    }

    /// How many channels the client is subscribed to.
    pub fn subscription_count(&self) -> usize {
        self.channels().len()
    }

    pub(crate) fn channels(&self) -> MutexGuard<'_, HashSet<Arc<str>>> {
        lock(&self.shared.channels)
    }
}

/// What the connection's writer should do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Outgoing {
    Frame(Frame),
    Close(CloseReason),
}

/// The receiving end of a client's queue, owned by its connection task.
pub struct Outbox {
    shared: Arc<ClientShared>,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("id", &self.shared.id)
            .finish()
    }
}

impl Outbox {
    /// The next frame, or the close to perform: a close that flushes the queue yields
    /// the queued frames first. Registers the task to be woken when neither is there.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Outgoing> {
        let mut queue = lock(&self.shared.queue);
        if let Some(frame) = Self::pop(&mut queue) {
            return Poll::Ready(Outgoing::Frame(frame));
        }
        if let Some(reason) = queue.close {
            return Poll::Ready(Outgoing::Close(reason));
        }
        if !queue
            .waker
            .as_ref()
            .is_some_and(|waker| waker.will_wake(cx.waker()))
        {
            queue.waker = Some(cx.waker().clone());
        }
        Poll::Pending
    }

    /// Waits for the next frame or a close request.
    pub async fn next(&mut self) -> Outgoing {
        poll_fn(|cx| self.poll_next(cx)).await
    }

    /// A frame that is already queued, without waiting; `None` once a close is
    /// pending that discards the queue.
    pub fn try_next(&mut self) -> Option<Frame> {
        Self::pop(&mut lock(&self.shared.queue))
    }

    /// The close requested for this client, if any.
    pub fn pending_close(&self) -> Option<CloseReason> {
        lock(&self.shared.queue).close
    }

    /// Bytes queued and not yet taken by the writer.
    pub fn owed(&self) -> usize {
        lock(&self.shared.queue).owed
    }

    fn pop(queue: &mut Queue) -> Option<Frame> {
        let frame = queue.frames.pop_front()?;
        queue.owed -= frame.len();
        if queue.frames.is_empty() && queue.frames.capacity() > IDLE_QUEUE_CAPACITY {
            queue.frames = VecDeque::new();
        }
        Some(frame)
    }
}

fn wake(waker: Option<Waker>) {
    if let Some(waker) = waker {
        waker.wake();
    }
}

// Every mutation under these locks is a single push, pop or insert: a panic elsewhere
// leaves them consistent, so poisoning is not a reason to stop serving.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::NoEvents;

    fn client(budget: usize) -> (ClientHandle, Outbox) {
        ClientHandle::new(1, Identity::default(), budget, Arc::new(NoEvents))
    }

    #[test]
    fn the_budget_counts_bytes_not_frames() {
        let (client, mut outbox) = client(10);
        for _ in 0..5 {
            client.send(Frame::from_static("ab")).expect("fits");
        }
        assert_eq!(outbox.owed(), 10);
        assert_eq!(outbox.try_next(), Some(Frame::from_static("ab")));
        client.send(Frame::from_static("cd")).expect("room again");
        assert_eq!(
            client.send(Frame::from_static("e")),
            Err(SendError::OverBudget)
        );
        assert_eq!(client.closing(), Some(CloseReason::SlowConsumer));
        assert_eq!(outbox.try_next(), None, "the queue is discarded");
        assert_eq!(outbox.owed(), 0);
        assert_eq!(client.send(Frame::from_static("x")), Err(SendError::Closed));
    }

    #[tokio::test]
    async fn a_waiting_writer_is_woken_by_a_frame() {
        let (client, mut outbox) = client(100);
        let sender = client.clone();
        let writer = tokio::spawn(async move { outbox.next().await });
        tokio::task::yield_now().await;
        sender.send(Frame::from_static("hi")).expect("fits");
        assert_eq!(
            writer.await.expect("joins"),
            Outgoing::Frame(Frame::from_static("hi"))
        );
    }

    #[test]
    fn a_drained_burst_gives_its_memory_back() {
        let (client, mut outbox) = client(1 << 20);
        for _ in 0..1000 {
            client.send(Frame::from_static("x")).expect("fits");
        }
        while outbox.try_next().is_some() {}
        assert!(lock(&outbox.shared.queue).frames.capacity() <= IDLE_QUEUE_CAPACITY);
    }
}
