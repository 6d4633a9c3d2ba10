//! Arbitrary bytes through `chorus_rpc::parse` and the whole router, with a real hub:
//! nothing may panic, every reply must be well-formed JSON-RPC 2.0 owed for what was
//! parsed, and every queued notification valid JSON. The checks live in `src/lib.rs`.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| chorus_fuzz::check(data));
