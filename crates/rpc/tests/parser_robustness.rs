//! The `jsonrpc_parse` fuzz target's checks, run by plain `cargo test` (no cargo-fuzz,
//! no nightly) over the seed corpus in `fuzz/seeds/jsonrpc_parse/` and a few thousand
//! deterministic pseudo-random mutations of it. The checks themselves are the fuzz
//! crate's own (`fuzz/src/lib.rs`, compiled here by path), so what the fuzzer guards
//! and what CI guards cannot drift apart.

#[path = "../../../fuzz/src/lib.rs"]
mod fuzz_checks;

use chorus_testkit::{Rng, mutate, seeds};
use fuzz_checks::check;

/// Mutated inputs per run: a few seconds in a debug build.
const MUTATIONS: usize = 6000;

/// Bytes and tokens that reach the parser's interesting paths more often than noise.
const TOKENS: &[&[u8]] = &[
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"\"",
    b"\\",
    b" ",
    b"0",
    b"-",
    b".",
    b"e",
    b"n",
    b"null",
    b"true",
    b"false",
    b"\"2.0\"",
    b"\"jsonrpc\"",
    b"\"method\"",
    b"\"params\"",
    b"\"id\"",
    b"\"ping\"",
    b"\"self.reply\"",
    b"\"broadcast\"",
    b"\"publish\"",
    b"\"subscribe\"",
    b"\"unsubscribe\"",
    b"\"channel\"",
    b"\"data\"",
    b"\"text\"",
    b"\\u0000",
    b"\\ud800",
    b"\\udc00",
    b"\\ud83d\\ude00",
    b"\\\"",
    b"1e999",
    b"-0",
    b"18446744073709551616",
    b"0.0000000000000000000001",
    b"[]",
    b"{}",
    b"\xc3\xa9",
    b"\xf0\x9f\x98\x80",
    b"\xff",
    b"\x00",
];

#[test]
fn seed_corpus_passes_the_fuzz_checks() {
    for (name, bytes) in seeds("jsonrpc_parse", 10) {
        assert!(
            std::str::from_utf8(&bytes).is_ok(),
            "seed {name} is not UTF-8"
        );
        check(&bytes);
    }
}

#[test]
fn mutated_seeds_pass_the_fuzz_checks() {
    let seeds = seeds("jsonrpc_parse", 10);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut utf8 = 0;
    for _ in 0..MUTATIONS {
        let seed = rng.below(seeds.len());
        let input = mutate(&mut rng, &seeds[seed].1, &seeds, TOKENS);
        match std::str::from_utf8(&input) {
            Ok(_) => utf8 += 1,
            // Non-UTF-8 is ignored by `check`; still exercise the text around the bad bytes.
            Err(_) => check(String::from_utf8_lossy(&input).as_bytes()),
        }
        check(&input);
    }
    assert!(
        utf8 > MUTATIONS / 2,
        "only {utf8} of {MUTATIONS} mutations were UTF-8"
    );
}

#[test]
fn non_utf8_input_is_ignored() {
    check(b"{\"jsonrpc\":\"2.0\",\"method\":\"ping\",\"id\":\"\xff\"}");
    check(b"\xc3");
}
