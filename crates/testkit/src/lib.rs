//! What several test crates share: a seed corpus read from `fuzz/seeds/<target>/` and
//! deterministic mutations of it, so that plain `cargo test` runs a fuzz target's
//! checks on inputs of the fuzzer's kind, alike on every run.

use std::path::{Path, PathBuf};

/// xorshift64*: tiny, deterministic, good enough to pick mutations.
#[derive(Debug)]
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform enough in `0..n`; `n` must be above zero.
    #[allow(clippy::cast_possible_truncation)]
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// A named seed.
pub type Seed = (String, Vec<u8>);

/// The seeds of `fuzz/seeds/<target>/`, sorted by name, at least `at_least` of them.
pub fn seeds(target: &str, at_least: usize) -> Vec<Seed> {
    let dir = workspace_root().join("fuzz/seeds").join(target);
    let mut seeds: Vec<Seed> = std::fs::read_dir(&dir)
        .unwrap_or_else(|err| panic!("cannot read the seed corpus {}: {err}", dir.display()))
        .map(|entry| {
            let path = entry.expect("a directory entry").path();
            let bytes = std::fs::read(&path).expect("a readable seed");
            let name = path
                .file_name()
                .expect("a file name")
                .to_string_lossy()
                .into_owned();
            (name, bytes)
        })
        .collect();
    // read_dir order is the file system's: sort so every run mutates alike.
    seeds.sort();
    assert!(
        seeds.len() >= at_least,
        "expected at least {at_least} seeds in {}, found {}",
        dir.display(),
        seeds.len()
    );
    seeds
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// One to four edits: byte flips, token inserts and overwrites, deletions,
/// duplications and splices with another seed.
pub fn mutate(rng: &mut Rng, input: &[u8], seeds: &[Seed], tokens: &[&[u8]]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(out.len() + 1);
        match rng.below(7) {
            0 if at < out.len() => out[at] ^= 1 << rng.below(8),
            1 if !tokens.is_empty() => {
                let token = tokens[rng.below(tokens.len())];
                out.splice(at..at, token.iter().copied());
            }
            2 if at < out.len() && !tokens.is_empty() => {
                let token = tokens[rng.below(tokens.len())];
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
            5 if !seeds.is_empty() => {
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
