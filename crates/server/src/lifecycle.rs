//! Lifecycle events (section 10): a user's first device online and last one gone, each
//! device's connection and disconnection, as JSON on the backbone topic
//! `<WS_PUBSUB_CHANNEL>.events` and to the webhook.

use std::sync::Arc;

use bytes::Bytes;
use chorus_pubsub::presence::Connection;
use chorus_pubsub::{Backbone, MessageIds, now_ms};
use prometheus::IntCounter;
use serde::Serialize;

use crate::webhook::Webhook;

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    UserOnline,
    UserOffline,
    DeviceOnline,
    DeviceOffline,
}

impl Event {
    pub const ALL: [Self; 4] = [
        Self::UserOnline,
        Self::UserOffline,
        Self::DeviceOnline,
        Self::DeviceOffline,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Self::UserOnline => "user_online",
            Self::UserOffline => "user_offline",
            Self::DeviceOnline => "device_online",
            Self::DeviceOffline => "device_offline",
        }
    }
}

/// Why a connection came or went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    Connected,
    /// The client closed, or the server closed it for anything not listed here.
    Disconnected,
    /// A newer connection of the same user and device took its place.
    Replaced,
    /// The server API kicked it.
    Kicked,
    KeepaliveTimeout,
    /// This replica is shutting down (SIGTERM).
    NodeShutdown,
    /// Its replica vanished: reported by a surviving one once its entries expired.
    NodeLost,
}

impl Reason {
    pub fn name(self) -> &'static str {
        match self {
            Self::Connected => "connected",
            Self::Disconnected => "disconnected",
            Self::Replaced => "replaced",
            Self::Kicked => "kicked",
            Self::KeepaliveTimeout => "keepalive_timeout",
            Self::NodeShutdown => "node_shutdown",
            Self::NodeLost => "node_lost",
        }
    }
}

#[derive(Serialize)]
struct Wire<'a> {
    id: String,
    event: &'static str,
    user: Option<&'a str>,
    device: Option<&'a str>,
    client_id: &'a str,
    node_id: &'a str,
    time: String,
    reason: &'static str,
}

/// Where events go.
pub struct Lifecycle {
    topic: String,
    backbone: Option<Arc<dyn Backbone>>,
    webhook: Option<Webhook>,
    ids: MessageIds,
    /// By event, in the order of [`Event::ALL`].
    counts: Vec<IntCounter>,
}

impl std::fmt::Debug for Lifecycle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lifecycle")
            .field("topic", &self.topic)
            .finish_non_exhaustive()
    }
}

impl Lifecycle {
    pub fn new(
        prefix: &str,
        backbone: Option<Arc<dyn Backbone>>,
        webhook: Option<Webhook>,
        counts: Vec<IntCounter>,
    ) -> Self {
        Self {
            topic: format!("{prefix}.events"),
            backbone,
            webhook,
            ids: MessageIds::new(),
            counts,
        }
    }

    pub fn webhook(&self) -> Option<&Webhook> {
        self.webhook.as_ref()
    }

    /// Reports `event` for `connection`; connections without a user have none.
    pub fn emit(&self, event: Event, connection: &Connection, reason: Reason) {
        if connection.user.is_none() {
            return;
        }
        let wire = Wire {
            id: format!("{:032x}", self.ids.next_id()),
            event: event.name(),
            user: connection.user.as_deref(),
            device: connection.device.as_deref(),
            client_id: &connection.client_id,
            node_id: &connection.node_id,
            time: rfc3339(now_ms()),
            reason: reason.name(),
        };
        let Ok(body) = serde_json::to_vec(&wire) else {
            return;
        };
        let body = Bytes::from(body);
        if let Some(index) = Event::ALL.iter().position(|known| *known == event)
            && let Some(count) = self.counts.get(index)
        {
            count.inc();
        }
        if let Some(backbone) = &self.backbone
            && let Err(err) = backbone.publish(&self.topic, body.clone())
        {
            tracing::debug!(%err, event = event.name(), "lifecycle event not published on the backbone");
        }
        if let Some(webhook) = &self.webhook {
            webhook.enqueue(body);
        }
    }
}

/// `2026-11-26T15:14:48.123Z` for milliseconds since the Unix epoch.
pub fn rfc3339(ms: u64) -> String {
    let seconds = ms / 1000;
    let (days, in_day) = (seconds / 86_400, seconds % 86_400);
    // Howard Hinnant's civil_from_days, for days since 1970-01-01.
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        in_day / 3600,
        in_day % 3600 / 60,
        in_day % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(1_796_310_888_123), "2026-12-03T15:14:48.123Z");
        assert_eq!(rfc3339(4_107_542_399_999), "2100-02-28T23:59:59.999Z");
    }
}
