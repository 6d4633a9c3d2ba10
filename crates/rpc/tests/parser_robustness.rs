//! The `jsonrpc_parse` fuzz target's checks, run by plain `cargo test` (no cargo-fuzz,
//! no nightly) over the seed corpus in `fuzz/seeds/jsonrpc_parse/` and a few thousand
//! deterministic pseudo-random mutations of it. The checks themselves are the fuzz
//! crate's own (`fuzz/src/lib.rs`, compiled here by path), so what the fuzzer guards
//! and what CI guards cannot drift apart.

#[path = "../../../fuzz/src/lib.rs"]
mod fuzz_checks;

use std::path::PathBuf;

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

/// xorshift64*: tiny, deterministic, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform enough in `0..n`; `n` must be above zero.
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn seeds() -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/seeds/jsonrpc_parse");
    let mut seeds: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|err| panic!("cannot read the seed corpus {}: {err}", dir.display()))
        .map(|entry| {
            let path = entry.expect("a directory entry").path();
            let bytes = std::fs::read(&path).expect("a readable seed");
            (
                path.file_name()
                    .expect("a file name")
                    .to_string_lossy()
                    .into_owned(),
                bytes,
            )
        })
        .collect();
    // read_dir order is the file system's: sort so every run mutates alike.
    seeds.sort();
    assert!(
        seeds.len() >= 10,
        "expected the seed corpus in {}, found {} files",
        dir.display(),
        seeds.len()
    );
    seeds
}

/// One to four edits: byte flips, token inserts and overwrites, deletions,
/// duplications and splices with another seed.
fn mutate(rng: &mut Rng, input: &[u8], seeds: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(out.len() + 1);
        match rng.below(7) {
            0 if at < out.len() => out[at] ^= 1 << rng.below(8),
            1 => {
                let token = TOKENS[rng.below(TOKENS.len())];
                out.splice(at..at, token.iter().copied());
            }
            2 if at < out.len() => {
                let token = TOKENS[rng.below(TOKENS.len())];
                let end = (at + token.len()).min(out.len());
                out.splice(at..end, token.iter().copied());
            }
            3 if at < out.len() => {
                let end = at + 1 + rng.below((out.len() - at).min(16));
                out.drain(at..end);
            }
            4 if at < out.len() => {
                let end = at + 1 + rng.below((out.len() - at).min(32));
                let copy = out[at..end].to_vec();
                out.splice(end..end, copy);
            }
            5 => {
                let other = &seeds[rng.below(seeds.len())].1;
                let from = rng.below(other.len() + 1);
                out.truncate(at);
                out.extend_from_slice(&other[from..]);
            }
            _ => out.truncate(at),
        }
    }
    out
}

#[test]
fn seed_corpus_passes_the_fuzz_checks() {
    for (name, bytes) in seeds() {
        assert!(
            std::str::from_utf8(&bytes).is_ok(),
            "seed {name} is not UTF-8"
        );
        check(&bytes);
    }
}

#[test]
fn mutated_seeds_pass_the_fuzz_checks() {
    let seeds = seeds();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut utf8 = 0;
    for _ in 0..MUTATIONS {
        let seed = rng.below(seeds.len());
        let input = mutate(&mut rng, &seeds[seed].1, &seeds);
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
