//! The unit of outbound traffic: one serialised text message, shared by reference.

use bytes::Bytes;
use tungstenite::Utf8Bytes;

/// One serialised text message. Cloning is a reference-count increment, so a
/// broadcast is encoded once and the same bytes sit in every recipient's queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame(Utf8Bytes);

impl Frame {
    pub const fn from_static(text: &'static str) -> Self {
        Self(Utf8Bytes::from_static(text))
    }

    /// Wraps bytes that arrived from outside (e.g. the backbone), checking UTF-8 once.
    pub fn try_from_bytes(bytes: Bytes) -> Result<Self, std::str::Utf8Error> {
        Utf8Bytes::try_from(bytes).map(Self)
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    pub fn as_bytes(&self) -> &Bytes {
        self.0.as_ref()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The WebSocket payload, without copying.
    pub fn into_text(self) -> Utf8Bytes {
        self.0
    }
}

impl From<String> for Frame {
    fn from(text: String) -> Self {
        Self(Utf8Bytes::from(text))
    }
}

impl From<Utf8Bytes> for Frame {
    fn from(text: Utf8Bytes) -> Self {
        Self(text)
    }
}
