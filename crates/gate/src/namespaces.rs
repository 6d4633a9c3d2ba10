//! Per-namespace channel options (section 11): a channel's namespace is the part of
//! its name before the first `:`; a channel without one, or whose namespace is not
//! listed, takes the options of the `""` entry, or the defaults.

use std::collections::HashMap;
use std::time::Duration;

/// What happens when a message does not fit a client's send budget.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum DeliveryPolicy {
    /// Close the client (1013).
    #[default]
    Disconnect,
    /// Drop the channel's oldest queued messages until it fits.
    DropOldest,
    /// Keep only the channel's newest queued message.
    Latest,
}

impl DeliveryPolicy {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "disconnect" => Some(Self::Disconnect),
            "drop_oldest" => Some(Self::DropOldest),
            "latest" => Some(Self::Latest),
            _ => None,
        }
    }
}

/// The options of one namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceOptions {
    /// Publications kept per channel (0: no history).
    pub history_size: usize,
    /// How long a kept publication lives (`None`: until pushed out).
    pub history_ttl: Option<Duration>,
    /// Track the channel's members.
    pub presence: bool,
    /// Tell subscribers when members join and leave.
    pub join_leave: bool,
    /// Clients may publish (the server API always may).
    pub client_publish: bool,
    pub delivery: DeliveryPolicy,
}

impl Default for NamespaceOptions {
    fn default() -> Self {
        Self {
            history_size: 0,
            history_ttl: None,
            presence: false,
            join_leave: false,
            client_publish: true,
            delivery: DeliveryPolicy::Disconnect,
        }
    }
}

/// Every configured namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Namespaces {
    fallback: NamespaceOptions,
    named: HashMap<String, NamespaceOptions>,
}

impl Namespaces {
    /// `named` may hold the `""` entry, which becomes the fallback.
    pub fn new(mut named: HashMap<String, NamespaceOptions>) -> Self {
        let fallback = named.remove("").unwrap_or_default();
        Self { fallback, named }
    }

    /// The options that apply to `channel`.
    pub fn of(&self, channel: &str) -> &NamespaceOptions {
        channel
            .split_once(':')
            .and_then(|(namespace, _)| self.named.get(namespace))
            .unwrap_or(&self.fallback)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_channel_takes_its_namespace_or_the_fallback() {
        let quiet = NamespaceOptions {
            client_publish: false,
            ..NamespaceOptions::default()
        };
        let kept = NamespaceOptions {
            history_size: 10,
            ..NamespaceOptions::default()
        };
        let namespaces = Namespaces::new(HashMap::from([
            ("feed".to_owned(), quiet.clone()),
            (String::new(), kept.clone()),
        ]));
        assert_eq!(namespaces.of("feed:1"), &quiet);
        assert_eq!(namespaces.of("feed"), &kept, "no colon: no namespace");
        assert_eq!(namespaces.of("other:1"), &kept);
        assert_eq!(
            Namespaces::default().of("x:1"),
            &NamespaceOptions::default()
        );
    }
}
