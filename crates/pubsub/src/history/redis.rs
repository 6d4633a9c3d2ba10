//! History in Redis Streams (to be written).
