//! One module per client method. To add a method: write a module with a [`Method`]
//! and add one line to [`register_all`].
//!
//! [`Method`]: crate::Method

mod auth_refresh;
mod broadcast;
mod channel;
mod ping;
mod publish;
mod self_reply;
mod subscribe;
mod unsubscribe;

use crate::router::Router;

/// Registers every built-in method.
pub fn register_all(router: &mut Router) -> &mut Router {
    router
        .register("self.reply", self_reply::SelfReply)
        .register("ping", ping::Ping)
        .register("broadcast", broadcast::Broadcast)
        .register("subscribe", subscribe::Subscribe)
        .register("unsubscribe", unsubscribe::Unsubscribe)
        .register("publish", publish::Publish)
        .register("auth.refresh", auth_refresh::AuthRefresh)
}

impl Router {
    /// A router with every built-in method.
    pub fn with_builtin_methods() -> Self {
        let mut router = Self::new();
        register_all(&mut router);
        router
    }
}

#[cfg(test)]
mod tests;
