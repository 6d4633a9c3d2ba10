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
pub struct Frame(Arc<Utf8Bytes>);

impl Frame {
    pub fn from_static(text: &'static str) -> Self {
        Self(Arc::new(Utf8Bytes::from_static(text)))
    }

    /// Wraps bytes that arrived from outside (e.g. the backbone), checking UTF-8 once.
    pub fn try_from_bytes(bytes: Bytes) -> Result<Self, std::str::Utf8Error> {
        Utf8Bytes::try_from(bytes).map(Self::from)
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    pub fn as_bytes(&self) -> &Bytes {
        self.0.as_ref().as_ref()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether both frames share one buffer (a fan-out copy, not an equal text).
    pub fn ptr_eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    /// The WebSocket payload, without copying the text.
    pub fn into_text(self) -> Utf8Bytes {
        Arc::try_unwrap(self.0).unwrap_or_else(|shared| Utf8Bytes::clone(&shared))
    }
}

impl From<String> for Frame {
    fn from(text: String) -> Self {
        Self(Arc::new(Utf8Bytes::from(text)))
    }
}

impl From<Utf8Bytes> for Frame {
    fn from(text: Utf8Bytes) -> Self {
        Self(Arc::new(text))
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
