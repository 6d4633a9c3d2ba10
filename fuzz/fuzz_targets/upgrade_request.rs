//! Arbitrary bytes as a WebSocket upgrade request head, through what Chorus reads of it
//! before the upgrade: the token, the forwarded client address, the token's
//! verification. The checks live in `src/upgrade.rs`.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../src/upgrade.rs"]
mod upgrade;

fuzz_target!(|data: &[u8]| upgrade::check_upgrade(data));
