//! A connected client, whatever carries its frames: its hub registration, its outbox,
//! its share of the limits, and its calls that answer later. A transport (the
//! WebSocket connection, or a Server-Sent Events stream) feeds it text and writes
//! what its outbox yields.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use chorus_gate::Identity;
use chorus_hub::{ClientHandle, Frame, Outbox};
use chorus_pubsub::now_ms;
use chorus_pubsub::presence::Connection;
use chorus_rpc::{Caller, Handled, LaterMessage, notification};
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;

use crate::app::App;
use crate::lifecycle::Reason;

/// Why a session asks its transport to end the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionEnd {
    /// The client pushes far past its request budget (close 1008).
    Flooding,
}

/// A deferred reply and the number of calls waiting inside it.
struct PendingReply {
    reply: LaterMessage,
    calls: usize,
}

impl Future for PendingReply {
    type Output = (chorus_rpc::Answer, usize);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let calls = self.calls;
        self.reply.as_mut().poll(cx).map(|answer| (answer, calls))
    }
}

pub struct Session {
    app: Arc<App>,
    client: ClientHandle,
    caller: Arc<Caller>,
    pub outbox: Outbox,
    /// Created by the first deferred call: an empty `FuturesUnordered` still holds
    /// two allocations, on every idle connection.
    pending: Option<FuturesUnordered<PendingReply>>,
    pending_calls: usize,
}

impl Session {
    /// Creates the client, queues its greeting (always the first frame it gets), and
    /// makes it reachable, also by its user and device, on every replica. The future
    /// resolves once the cluster knows the client (see [`ClusterNode::connect`]).
    ///
    /// [`ClusterNode::connect`]: crate::node::ClusterNode::connect
    pub fn open(
        app: Arc<App>,
        id: chorus_hub::ClientId,
        identity: Identity,
        remote_addr: String,
        forwarded: Vec<(String, String)>,
    ) -> (Self, impl Future<Output = ()> + Send + use<>) {
        let hub = app.node.hub();
        let (client, outbox) = hub.create_client_with_id(
            id,
            chorus_hub::Identity {
                user: identity.user.clone(),
                device: identity.device.clone(),
            },
        );
        let client_id = app.node.client_id(client.id());
        let mut greeting = serde_json::json!({
            "client_id": client_id,
            "node_id": app.node.node_id(),
        });
        if let Some(user) = &identity.user {
            greeting["user"] = (**user).into();
        }
        if let Some(device) = &identity.device {
            greeting["device"] = (**device).into();
        }
        let _ = client.send(notification::value("sys.connected", &greeting));
        hub.register(&client);
        app.metrics.connections_total.inc();
        let connection = Connection {
            client_id,
            node_id: app.node.node_id().to_owned(),
            user: identity.user.as_deref().map(str::to_owned),
            device: identity.device.as_deref().map(str::to_owned),
            connected_at_ms: now_ms(),
            remote_addr,
            info: identity.info.clone(),
        };
        let known = app.node.connect(&client, connection);
        let caller = Arc::new(
            Caller::new(client.clone(), identity, app.services.gate.connection())
                .with_forwarded(forwarded),
        );
        let session = Self {
            app,
            client,
            caller,
            outbox,
            pending: None,
            pending_calls: 0,
        };
        (session, known)
    }

    pub fn client(&self) -> &ClientHandle {
        &self.client
    }

    /// When the connection's token expires (seconds since the Unix epoch).
    pub fn expires_at(&self) -> Option<u64> {
        self.caller.expires_at()
    }

    /// Handles one inbound text message: its reply is queued now, or once its deferred
    /// calls are done.
    pub fn handle_text(&mut self, text: &str) -> Result<(), SessionEnd> {
        let cx = chorus_rpc::Context {
            services: &self.app.services,
            caller: &self.caller,
        };
        match self.app.router.handle(text, &cx) {
            Handled::Nothing => {}
            // Over the budget, the client is closed as a slow consumer by the hub.
            Handled::Now(reply) => {
                let _ = self.client().send(Frame::from(reply));
            }
            Handled::Later { reply, calls } => {
                self.pending_calls += calls;
                self.pending
                    .get_or_insert_with(FuturesUnordered::new)
                    .push(PendingReply { reply, calls });
            }
            Handled::Flooding => return Err(SessionEnd::Flooding),
        }
        Ok(())
    }

    /// Runs a request on the transport's behalf (SSE subscribes from the URL): its
    /// answer comes back to the transport instead of into the outbox.
    pub fn call(&self, text: &str) -> LaterMessage {
        let cx = chorus_rpc::Context {
            services: &self.app.services,
            caller: &self.caller,
        };
        let answer = |text| chorus_rpc::Answer {
            text,
            effects: Vec::new(),
        };
        match self.app.router.handle(text, &cx) {
            Handled::Later { reply, .. } => reply,
            Handled::Now(reply) => Box::pin(std::future::ready(answer(Some(reply)))),
            Handled::Nothing | Handled::Flooding => Box::pin(std::future::ready(answer(None))),
        }
    }

    /// Whether the transport should read more: not while the client has as many
    /// deferred calls pending as it may.
    pub fn can_read(&self) -> bool {
        self.pending_calls < self.app.config.transport.max_pending_calls
    }

    /// Queues the replies of deferred calls that finished; registers for the others.
    pub fn poll_deferred(&mut self, cx: &mut Context<'_>) {
        let Some(pending) = &mut self.pending else {
            return;
        };
        while let Poll::Ready(Some((answer, calls))) = pending.poll_next_unpin(cx) {
            self.pending_calls -= calls;
            if let Some(reply) = answer.text {
                let _ = self.client.send(Frame::from(reply));
            }
            // After the reply: e.g. live publications after the ones it recovered.
            for effect in answer.effects {
                effect();
            }
        }
    }

    /// Takes the client out of the hub, the cluster's interest and presence.
    pub fn close(self, reason: Reason) {
        self.app.node.disconnect(self.client(), reason);
    }
}
