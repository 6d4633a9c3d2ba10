//! One module per method (or per pair that belongs together). To add a method: write
//! a module with a [`Method`] and add one line to [`register_client`], to
//! [`register_api`], or to both when it means the same for a client and the server
//! API.
//!
//! [`Method`]: crate::Method

mod auth_refresh;
mod broadcast;
mod channel;
mod cluster_info;
mod direct;
mod history;
mod ping;
mod presence;
mod publish;
mod self_reply;
mod subscribe;
mod unsubscribe;

use crate::router::Router;

/// Registers every method a connected client may call.
pub fn register_client(router: &mut Router) -> &mut Router {
    router
        .register("self.reply", self_reply::SelfReply)
        .register("ping", ping::Ping)
        .register("broadcast", broadcast::Broadcast)
        .register("subscribe", subscribe::Subscribe)
        .register("unsubscribe", unsubscribe::Unsubscribe)
        .register("publish", publish::Publish)
        .register("auth.refresh", auth_refresh::AuthRefresh)
        .register("presence", presence::Presence)
        .register("presence_stats", presence::PresenceStats)
        .register("history", history::History)
}

/// Registers every method of the server API (`POST /api`).
pub fn register_api(router: &mut Router) -> &mut Router {
    router
        .register("publish", publish::Publish)
        .register("broadcast", broadcast::ApiBroadcast)
        .register("send", direct::Send)
        .register("kick", direct::Kick)
        .register("presence", presence::Presence)
        .register("presence_stats", presence::PresenceStats)
        .register("history", history::History)
        .register("info", cluster_info::Info)
        .register("channels", cluster_info::Channels)
}

impl Router {
    /// A router with every client method.
    pub fn with_builtin_methods() -> Self {
        let mut router = Self::new();
        register_client(&mut router);
        router
    }

    /// A router with every server API method.
    pub fn for_api() -> Self {
        let mut router = Self::new();
        register_api(&mut router);
        router
    }
}

#[cfg(test)]
mod tests;
