//! Presence in NATS JetStream KV (to be written).
