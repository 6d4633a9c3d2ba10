//! The `upgrade_request` fuzz target's checks, run by plain `cargo test` over the seed
//! corpus in `fuzz/seeds/upgrade_request/` and a few thousand deterministic mutations
//! of it. The checks are the fuzz crate's own (`fuzz/src/upgrade.rs`, compiled here by
//! path), so what the fuzzer guards and what CI guards cannot drift apart.

#[path = "../../../fuzz/src/upgrade.rs"]
mod upgrade;

use chorus_testkit::{Rng, mutate, seeds};
use upgrade::check_upgrade;

const MUTATIONS: usize = 4000;

/// Pieces of a request head that reach the interesting paths more often than noise.
const TOKENS: &[&[u8]] = &[
    b"\r\n",
    b"Authorization: ",
    b"Bearer ",
    b"bearer",
    b"X-Forwarded-For: ",
    b", ",
    b"10.0.0.1",
    b"[::1]:80",
    b"::ffff:10.0.0.9",
    b"?token=",
    b"&token=",
    b"%2",
    b"%zz",
    b"+",
    b".",
    b"eyJhbGciOiJIUzI1NiJ9",
    b"eyJhbGciOiJub25lIn0",
    b"static-token",
    b"\xff",
    b"\x00",
];

#[test]
fn seed_corpus_passes_the_upgrade_checks() {
    for (_, bytes) in seeds("upgrade_request", 8) {
        check_upgrade(&bytes);
    }
}

#[test]
fn mutated_seeds_pass_the_upgrade_checks() {
    let seeds = seeds("upgrade_request", 8);
    let mut rng = Rng(0x51_7cc1_b727_220a);
    for _ in 0..MUTATIONS {
        let seed = rng.below(seeds.len());
        check_upgrade(&mutate(&mut rng, &seeds[seed].1, &seeds, TOKENS));
    }
}

#[test]
fn a_huge_token_is_refused_without_work() {
    let head = format!("GET /ws?token={} HTTP/1.1\r\n\r\n", "a".repeat(100_000));
    check_upgrade(head.as_bytes());
}
