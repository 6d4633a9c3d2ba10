//! Who a connection is and which channels it may use: the [`Identity`] a token turns
//! into, and the channel patterns of its grants.

use std::sync::Arc;

use serde_json::value::RawValue;

/// A channel pattern from a grant: an exact name, a prefix ending in `*`, or `*`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pattern {
    Any,
    Prefix(Box<str>),
    Exact(Box<str>),
}

impl Pattern {
    /// Reads a pattern; `None` when it is not one (empty, a `*` not at the end, or
    /// characters no channel name can hold).
    pub fn parse(text: &str) -> Option<Self> {
        let allowed = |b: u8| b.is_ascii_alphanumeric() || b"_-:.@/=".contains(&b);
        if text == "*" {
            return Some(Self::Any);
        }
        let (body, prefix) = match text.strip_suffix('*') {
            Some(body) => (body, true),
            None => (text, false),
        };
        if body.is_empty() || body.len() > 255 || !body.bytes().all(allowed) {
            return None;
        }
        Some(if prefix {
            Self::Prefix(body.into())
        } else {
            Self::Exact(body.into())
        })
    }

    pub fn matches(&self, channel: &str) -> bool {
        match self {
            Self::Any => true,
            Self::Prefix(prefix) => channel.starts_with(&**prefix),
            Self::Exact(name) => channel == &**name,
        }
    }
}

/// The channel claims of a token. A token with none of them may use every channel,
/// unless the server requires a grant (`WS_CHANNELS_REQUIRE_GRANT`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Grants {
    /// `channels`: subscribe and publish.
    pub channels: Vec<Pattern>,
    /// `subscribe`: subscribe only.
    pub subscribe: Vec<Pattern>,
    /// `publish`: publish only.
    pub publish: Vec<Pattern>,
    /// Whether the token had any of the three claims at all.
    pub present: bool,
}

impl Grants {
    pub fn may_subscribe(&self, channel: &str, require_grant: bool) -> bool {
        self.allows(&self.subscribe, channel, require_grant)
    }

    pub fn may_publish(&self, channel: &str, require_grant: bool) -> bool {
        self.allows(&self.publish, channel, require_grant)
    }

    fn allows(&self, specific: &[Pattern], channel: &str, require_grant: bool) -> bool {
        if !self.present {
            return !require_grant;
        }
        self.channels
            .iter()
            .chain(specific)
            .any(|pattern| pattern.matches(channel))
    }
}

/// Who a connection is, as its token said.
#[derive(Clone, Debug, Default)]
pub struct Identity {
    /// The user (`sub`); none for static tokens and when authentication is off.
    pub user: Option<Arc<str>>,
    /// One of the user's devices (`device`).
    pub device: Option<Arc<str>>,
    pub grants: Grants,
    /// `info`: any JSON, shown in presence and `info`.
    pub info: Option<Box<RawValue>>,
    /// `exp` of a JWT, in seconds since the Unix epoch.
    pub expires_at: Option<u64>,
}

impl Identity {
    /// Anyone: authentication off.
    pub fn anonymous() -> Self {
        Self::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(channels: &[&str], subscribe: &[&str], publish: &[&str]) -> Grants {
        let parse = |list: &[&str]| -> Vec<Pattern> {
            list.iter()
                .map(|text| Pattern::parse(text).expect("a pattern"))
                .collect()
        };
        Grants {
            channels: parse(channels),
            subscribe: parse(subscribe),
            publish: parse(publish),
            present: true,
        }
    }

    #[test]
    fn patterns() {
        assert!(Pattern::parse("items:*").is_some_and(|p| p.matches("items:42")));
        assert!(Pattern::parse("items:*").is_some_and(|p| !p.matches("item:42")));
        assert!(Pattern::parse("chat:room-*").is_some_and(|p| p.matches("chat:room-7")));
        assert!(Pattern::parse("a").is_some_and(|p| p.matches("a") && !p.matches("ab")));
        assert!(Pattern::parse("*").is_some_and(|p| p.matches("anything")));
        for bad in ["", "a*b", "**", "a b", "é*", "items:**"] {
            assert!(Pattern::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn grants_split_subscribe_and_publish() {
        let g = grants(&["items:*"], &["news"], &["inbox:*"]);
        assert!(g.may_subscribe("items:1", false) && g.may_publish("items:1", false));
        assert!(g.may_subscribe("news", false) && !g.may_publish("news", false));
        assert!(!g.may_subscribe("inbox:me", false) && g.may_publish("inbox:me", false));
        assert!(!g.may_subscribe("other", false));
        let none = Grants::default();
        assert!(none.may_subscribe("x", false));
        assert!(!none.may_subscribe("x", true), "a grant is required");
        let empty = grants(&[], &[], &[]);
        assert!(
            !empty.may_publish("x", false),
            "an empty claim grants nothing"
        );
    }
}
