//! The envelope: what one replica tells the others, in a compact, versioned binary
//! form that carries the already serialised notification untouched.
//!
//! Layout (integers big-endian):
//!
//! ```text
//! u8  version (1)
//! u16 header length H: the bytes from here up to the payload
//!     u128 id | u64 origin timestamp (ms) | u8 kind
//!     u8 origin length | origin | u16 target length | target
//!     u8 flags | [u64 offset | u8 epoch length | epoch] (flag 1: a position)
//!     ... fields added by later versions, skipped by older readers ...
//! payload: the rest (the notification, UTF-8 JSON)
//! ```
//!
//! A newer replica appends header fields and raises H; an older one reads what it
//! knows and skips to the payload, so mixed versions interoperate during a rollout.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};

const VERSION: u8 = 1;
/// id + timestamp + kind + origin length + target length.
const FIXED_HEADER: usize = 16 + 8 + 1 + 1 + 2;

/// What an envelope asks receivers to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Deliver to every client.
    Broadcast,
    /// Deliver to the subscribers of the channel named by `target`.
    Channel,
    /// Deliver to the connections `target` names (users, devices, client ids).
    Direct,
    /// Deliver to the connections `target` names, then close them: a newer connection
    /// of the same user and device replaced them.
    Replace,
    /// Deliver to the connections `target` names (the `sys.kick` notice), then close
    /// them.
    Kick,
    /// "This replica is alive": sent on the broadcast topic now and then, so that two
    /// replicas configured with one node id notice each other even without traffic.
    Heartbeat,
    /// A kind this replica does not know; receivers skip it.
    Unknown(u8),
}

impl Kind {
    fn to_u8(self) -> u8 {
        match self {
            Self::Broadcast => 1,
            Self::Channel => 2,
            Self::Direct => 3,
            Self::Replace => 4,
            Self::Kick => 5,
            Self::Heartbeat => 7,
            Self::Unknown(other) => other,
        }
    }

    fn from_u8(value: u8) -> Self {
        match value {
            1 => Self::Broadcast,
            2 => Self::Channel,
            3 => Self::Direct,
            4 => Self::Replace,
            5 => Self::Kick,
            7 => Self::Heartbeat,
            other => Self::Unknown(other),
        }
    }
}

/// Cluster-unique message id: a random per-process prefix and a counter.
pub type MessageId = u128;

/// Hands out [`MessageId`]s for one replica.
#[derive(Debug)]
pub struct MessageIds {
    prefix: u64,
    next: AtomicU64,
}

impl MessageIds {
    pub fn new() -> Self {
        Self {
            prefix: rand::random(),
            next: AtomicU64::new(0),
        }
    }

    pub fn next_id(&self) -> MessageId {
        (u128::from(self.prefix) << 64) | u128::from(self.next.fetch_add(1, Ordering::Relaxed))
    }

    /// Whether `id` was handed out by this generator (its process), and not by another
    /// process that happens to carry the same node id.
    pub fn is_own(&self, id: MessageId) -> bool {
        (id >> 64) == u128::from(self.prefix)
    }
}

impl Default for MessageIds {
    fn default() -> Self {
        Self::new()
    }
}

/// Why bytes from the backbone are not an envelope we can read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EnvelopeError {
    #[error("envelope is truncated")]
    Truncated,
    #[error("envelope version {0} is not supported")]
    UnsupportedVersion(u8),
    #[error("envelope field is not UTF-8")]
    NotUtf8,
    #[error("envelope {field} is longer than {max} bytes")]
    TooLong { field: &'static str, max: usize },
}

/// One message between replicas.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Envelope {
    pub id: MessageId,
    /// The node id of the replica that created it.
    pub origin: String,
    /// Milliseconds since the Unix epoch when it was created.
    pub origin_ts_ms: u64,
    pub kind: Kind,
    /// The channel it is for, or the targets of a direct kind; empty for broadcasts.
    pub target: String,
    /// The serialised notification, delivered to clients as is.
    pub payload: Bytes,
    /// A history channel's publication: its offset and epoch, so that every replica
    /// delivers the channel in offset order.
    pub position: Option<(u64, String)>,
}

impl Envelope {
    /// Encodes into one buffer; the payload is copied once, never re-serialised.
    pub fn encode(&self) -> Result<Bytes, EnvelopeError> {
        let origin_len = u8::try_from(self.origin.len()).map_err(|_| EnvelopeError::TooLong {
            field: "origin",
            max: u8::MAX.into(),
        })?;
        let target_len = u16::try_from(self.target.len()).map_err(|_| EnvelopeError::TooLong {
            field: "target",
            max: u16::MAX.into(),
        })?;
        let position_len = match &self.position {
            Some((_, epoch)) => {
                u8::try_from(epoch.len()).map_err(|_| EnvelopeError::TooLong {
                    field: "epoch",
                    max: u8::MAX.into(),
                })?;
                1 + 8 + 1 + epoch.len()
            }
            None => 1,
        };
        let header_len = FIXED_HEADER + self.origin.len() + self.target.len() + position_len;
        let header_len_u16 = u16::try_from(header_len).map_err(|_| EnvelopeError::TooLong {
            field: "header",
            max: u16::MAX.into(),
        })?;
        let mut out = BytesMut::with_capacity(3 + header_len + self.payload.len());
        out.put_u8(VERSION);
        out.put_u16(header_len_u16);
        out.put_u128(self.id);
        out.put_u64(self.origin_ts_ms);
        out.put_u8(self.kind.to_u8());
        out.put_u8(origin_len);
        out.put_slice(self.origin.as_bytes());
        out.put_u16(target_len);
        out.put_slice(self.target.as_bytes());
        out.put_u8(u8::from(self.position.is_some()));
        if let Some((offset, epoch)) = &self.position {
            out.put_u64(*offset);
            // Checked above to fit.
            out.put_u8(epoch.len() as u8);
            out.put_slice(epoch.as_bytes());
        }
        out.put_slice(&self.payload);
        Ok(out.freeze())
    }

    /// Decodes; the payload is a slice of `bytes`, not a copy.
    pub fn decode(bytes: &Bytes) -> Result<Self, EnvelopeError> {
        let mut reader = Reader { bytes, at: 0 };
        let version = reader.u8()?;
        if version == 0 {
            return Err(EnvelopeError::UnsupportedVersion(version));
        }
        let header_len = usize::from(reader.u16()?);
        let header_end = reader.at + header_len;
        if header_len < FIXED_HEADER || header_end > bytes.len() {
            return Err(EnvelopeError::Truncated);
        }
        let id = u128::from_be_bytes(reader.array()?);
        let origin_ts_ms = u64::from_be_bytes(reader.array()?);
        let kind = Kind::from_u8(reader.u8()?);
        let origin_len = usize::from(reader.u8()?);
        let origin = reader.string(origin_len)?;
        let target_len = usize::from(reader.u16()?);
        let target = reader.string(target_len)?;
        // Envelopes of the first release end here; later ones carry flags.
        let flags = if reader.at < header_end {
            reader.u8()?
        } else {
            0
        };
        let position = if flags & 1 == 1 {
            let offset = u64::from_be_bytes(reader.array()?);
            let epoch_len = usize::from(reader.u8()?);
            Some((offset, reader.string(epoch_len)?))
        } else {
            None
        };
        if reader.at > header_end {
            return Err(EnvelopeError::Truncated);
        }
        Ok(Self {
            id,
            origin,
            origin_ts_ms,
            kind,
            target,
            payload: bytes.slice(header_end..),
            position,
        })
    }
}

struct Reader<'a> {
    bytes: &'a Bytes,
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, len: usize) -> Result<&[u8], EnvelopeError> {
        let end = self.at.checked_add(len).ok_or(EnvelopeError::Truncated)?;
        let slice = self
            .bytes
            .get(self.at..end)
            .ok_or(EnvelopeError::Truncated)?;
        self.at = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], EnvelopeError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, EnvelopeError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, EnvelopeError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn string(&mut self, len: usize) -> Result<String, EnvelopeError> {
        let raw = self.take(len)?;
        std::str::from_utf8(raw)
            .map(str::to_owned)
            .map_err(|_| EnvelopeError::NotUtf8)
    }
}

/// Milliseconds since the Unix epoch, for `origin_ts_ms`.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Envelope {
        Envelope {
            id: MessageIds::new().next_id(),
            origin: "node-a".into(),
            origin_ts_ms: 1_700_000_000_123,
            kind: Kind::Channel,
            target: "items:42".into(),
            payload: Bytes::from_static(br#"{"jsonrpc":"2.0","method":"message"}"#),
            position: None,
        }
    }

    #[test]
    fn round_trips() {
        let envelope = sample();
        let bytes = envelope.encode().expect("encodes");
        assert_eq!(Envelope::decode(&bytes), Ok(envelope));
    }

    #[test]
    fn a_position_round_trips() {
        let envelope = Envelope {
            position: Some((42, "a1b2c3d4e5f60718".into())),
            ..sample()
        };
        let bytes = envelope.encode().expect("encodes");
        assert_eq!(Envelope::decode(&bytes), Ok(envelope));
    }

    #[test]
    fn a_newer_header_field_is_skipped() {
        let envelope = sample();
        let bytes = envelope.encode().expect("encodes");
        // Rebuild as a future version with 4 extra header bytes before the payload.
        let payload_at = bytes.len() - envelope.payload.len();
        let mut future = BytesMut::new();
        future.put_u8(2);
        future.put_u16(u16::from_be_bytes([bytes[1], bytes[2]]) + 4);
        future.put_slice(&bytes[3..payload_at]);
        future.put_slice(&[9, 9, 9, 9]);
        future.put_slice(&envelope.payload);
        assert_eq!(Envelope::decode(&future.freeze()), Ok(envelope));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for len in 0..40 {
            let bytes = Bytes::from(vec![1u8; len]);
            let _ = Envelope::decode(&bytes);
        }
        assert_eq!(
            Envelope::decode(&Bytes::from_static(&[1, 0])),
            Err(EnvelopeError::Truncated)
        );
    }

    #[test]
    fn ids_are_unique_per_process() {
        let ids = MessageIds::new();
        assert_ne!(ids.next_id(), ids.next_id());
        assert_ne!(MessageIds::new().next_id(), MessageIds::new().next_id());
        let other = MessageIds::new();
        assert!(ids.is_own(ids.next_id()));
        assert!(!ids.is_own(other.next_id()));
    }
}
