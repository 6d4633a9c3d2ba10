//! History in NATS JetStream (to be written).
