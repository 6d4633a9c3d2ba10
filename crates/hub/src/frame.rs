//! The unit of outbound traffic: one serialised text message, shared by reference.

use std::sync::Arc;

use bytes::Bytes;
use tungstenite::Utf8Bytes;

/// One serialised text message. Cloning is a reference-count increment, so a
/// broadcast is encoded once and the same bytes sit in every recipient's queue.
///
/// A `Frame` is one pointer wide: a burst of a thousand messages queued for ten
/// thousand subscribers costs 8 bytes per queued copy, not the 32 of the text handle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame(Arc<Inner>);

#[derive(Debug, PartialEq, Eq)]
struct Inner {
    text: Utf8Bytes,
    tag: Option<Tag>,
}

/// What a client's queue does when a channel's message does not fit it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Overflow {
    /// Close the client (1013).
    #[default]
    Disconnect,
    /// Drop the channel's oldest queued messages until it fits.
    DropOldest,
    /// Keep only the channel's newest message.
    Latest,
}

/// The channel a publication belongs to, its offset (0 for a channel without
/// history), and its channel's overflow policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tag {
    pub channel: Arc<str>,
    pub offset: u64,
    pub overflow: Overflow,
}

impl Frame {
    pub fn from_static(text: &'static str) -> Self {
        Self::from(Utf8Bytes::from_static(text))
    }

    /// A channel's publication: queues may drop it by its channel's policy.
    pub fn tagged(text: String, tag: Tag) -> Self {
        Self(Arc::new(Inner {
            text: Utf8Bytes::from(text),
            tag: Some(tag),
        }))
    }

    /// The same text with a tag (e.g. a publication that came from the backbone).
    pub fn with_tag(&self, tag: Tag) -> Self {
        Self(Arc::new(Inner {
            text: self.0.text.clone(),
            tag: Some(tag),
        }))
    }

    /// Wraps bytes that arrived from outside (e.g. the backbone), checking UTF-8 once.
    pub fn try_from_bytes(bytes: Bytes) -> Result<Self, std::str::Utf8Error> {
        Utf8Bytes::try_from(bytes).map(Self::from)
    }

    pub fn as_str(&self) -> &str {
        self.0.text.as_str()
    }

    pub fn as_bytes(&self) -> &Bytes {
        self.0.text.as_ref()
    }

    pub fn tag(&self) -> Option<&Tag> {
        self.0.tag.as_ref()
    }

    pub fn len(&self) -> usize {
        self.0.text.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.text.is_empty()
    }

    /// Whether both frames share one buffer (a fan-out copy, not an equal text).
    pub fn ptr_eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// The WebSocket payload, without copying the text.
    pub fn into_text(self) -> Utf8Bytes {
        match Arc::try_unwrap(self.0) {
            Ok(inner) => inner.text,
            Err(shared) => shared.text.clone(),
        }
    }
}

impl From<String> for Frame {
    fn from(text: String) -> Self {
        Self::from(Utf8Bytes::from(text))
    }
}

impl From<Utf8Bytes> for Frame {
    fn from(text: Utf8Bytes) -> Self {
        Self(Arc::new(Inner { text, tag: None }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_is_one_pointer_wide() {
        assert_eq!(std::mem::size_of::<Frame>(), std::mem::size_of::<usize>());
    }

    #[test]
    fn clones_share_the_text() {
        let frame = Frame::from(String::from("hello"));
        let copy = frame.clone();
        assert!(frame.ptr_eq(&copy));
        assert_eq!(copy.into_text().as_str(), "hello");
        assert_eq!(frame.into_text().as_str(), "hello");
    }
}
