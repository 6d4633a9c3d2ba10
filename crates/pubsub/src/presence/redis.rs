//! Presence in Redis (to be written).
