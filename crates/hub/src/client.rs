//! One connected client as the rest of the server sees it: an id, an identity, and a
//! bounded outbound queue that never makes the sender wait.

use std::collections::HashSet;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{Notify, mpsc};

use crate::frame::Frame;
use crate::hub::HubEvents;

/// Process-unique client number, assigned by the [`Hub`](crate::Hub).
pub type ClientId = u64;

/// Who a client is, when authentication says so. Empty for anonymous clients.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    pub user: Option<Arc<str>>,
    pub device: Option<Arc<str>>,
}

/// Why the server ends a connection. The numeric value is the WebSocket close code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum CloseReason {
    /// The outbound queue overflowed (close code 1013): queued frames are discarded.
    SlowConsumer = 1,
    /// The server is shutting down (close code 1001): queued frames are sent first.
    Shutdown = 2,
}

impl CloseReason {
    pub fn code(self) -> u16 {
        match self {
            Self::SlowConsumer => 1013,
            Self::Shutdown => 1001,
        }
    }

    /// Whether frames already queued go out before the close frame.
    pub fn flushes_queue(self) -> bool {
        matches!(self, Self::Shutdown)
    }

    fn from_u8(value: u8) -> Option<Self> {
        match value {
            1 => Some(Self::SlowConsumer),
            2 => Some(Self::Shutdown),
            _ => None,
        }
    }
}

/// Why a frame was not queued.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SendError {
    #[error("client outbound queue is full; the client is being disconnected")]
    QueueFull,
    #[error("client is closing")]
    Closed,
}

pub(crate) struct ClientShared {
    pub(crate) id: ClientId,
    identity: Identity,
    queue: mpsc::Sender<Frame>,
    close_reason: AtomicU8,
    close_signal: Notify,
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
        queue_len: usize,
        events: Arc<dyn HubEvents>,
    ) -> (Self, Outbox) {
        let (queue, receiver) = mpsc::channel(queue_len.max(1));
        let shared = Arc::new(ClientShared {
            id,
            identity,
            queue,
            close_reason: AtomicU8::new(0),
            close_signal: Notify::new(),
            channels: Mutex::new(HashSet::new()),
            events,
        });
        let outbox = Outbox {
            receiver,
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

    /// Queues a frame without waiting. A full queue marks the client as a slow
    /// consumer: it is disconnected with 1013 and nobody else is held up by it.
    pub fn send(&self, frame: Frame) -> Result<(), SendError> {
        if self.closing().is_some() {
            return Err(SendError::Closed);
        }
        match self.shared.queue.try_send(frame) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => {
                if self.close(CloseReason::SlowConsumer) {
                    self.shared.events.slow_consumer(self.shared.id);
                }
                Err(SendError::QueueFull)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(SendError::Closed),
        }
    }

    /// Asks the client's connection to close. Only the first reason counts; returns
    /// whether this call was the one that set it.
    pub fn close(&self, reason: CloseReason) -> bool {
        let set = self
            .shared
            .close_reason
            .compare_exchange(0, reason as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if set {
            self.shared.close_signal.notify_one();
        }
        set
    }

    /// The reason the client is closing, if it is.
    pub fn closing(&self) -> Option<CloseReason> {
        CloseReason::from_u8(self.shared.close_reason.load(Ordering::Acquire))
    }

    /// Whether the client is subscribed to `channel`.
    pub fn is_subscribed(&self, channel: &str) -> bool {
        self.channels().contains(channel)
    }

    pub(crate) fn channels(&self) -> MutexGuard<'_, HashSet<Arc<str>>> {
        // A poisoned set is still a valid set: a panic elsewhere must not wedge cleanup.
        self.shared
            .channels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
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
    receiver: mpsc::Receiver<Frame>,
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
    /// Waits for the next frame or a close request. A close that flushes the queue
    /// yields the queued frames first. Cancel-safe.
    pub async fn next(&mut self) -> Outgoing {
        loop {
            if let Some(reason) =
                CloseReason::from_u8(self.shared.close_reason.load(Ordering::Acquire))
            {
                if reason.flushes_queue()
                    && let Ok(frame) = self.receiver.try_recv()
                {
                    return Outgoing::Frame(frame);
                }
                return Outgoing::Close(reason);
            }
            tokio::select! {
                biased;
                () = self.shared.close_signal.notified() => continue,
                frame = self.receiver.recv() => match frame {
                    Some(frame) => return Outgoing::Frame(frame),
                    // Unreachable while `shared` holds the sender; treat as a shutdown.
                    None => return Outgoing::Close(CloseReason::Shutdown),
                },
            }
        }
    }

    /// A frame that is already queued, without waiting; `None` once a close is
    /// pending that discards the queue. Lets the writer batch frames before a flush.
    pub fn try_next(&mut self) -> Option<Frame> {
        match self.pending_close() {
            Some(reason) if !reason.flushes_queue() => None,
            _ => self.receiver.try_recv().ok(),
        }
    }

    /// The close requested for this client, if any.
    pub fn pending_close(&self) -> Option<CloseReason> {
        CloseReason::from_u8(self.shared.close_reason.load(Ordering::Acquire))
    }

    /// Resolves once a close has been requested. Cancel-safe.
    pub async fn close_requested(&self) -> CloseReason {
        loop {
            if let Some(reason) = self.pending_close() {
                return reason;
            }
            self.shared.close_signal.notified().await;
        }
    }
}
