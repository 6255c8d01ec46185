//! A small mutation fuzzer that runs on the stable toolchain.
//!
//! cargo-fuzz (libFuzzer) needs a nightly compiler, which Skylark's build
//! machines do not have, so the fuzz targets run on this instead: inputs are
//! seeds (valid encodings) mutated at random — bit flips, random and
//! "interesting" bytes (0, 0x7f, 0x80, 0xff, huge length prefixes),
//! insertions, deletions, duplicated and spliced ranges, truncation — and
//! every input is fed to the target under `catch_unwind`. It is not
//! coverage-guided; mutants that reach a target's deeper paths (the
//! target says so by returning `true`) join the pool and are mutated further.
//!
//! A failing input is written to `target/fuzz-findings/<target>/` and the
//! run panics with its hex, so a finding becomes a regression test.
//!
//! Run length: `SKYLARK_FUZZ_SECS` (default 3 s per target; CI uses 60).
//! Randomness: `SKYLARK_FUZZ_SEED` repeats a run (the seed is printed).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Longest input tried.
const MAX_INPUT: usize = 64 * 1024;
/// Mutants kept for further mutation.
const POOL: usize = 512;

const INTERESTING: &[&[u8]] = &[
    &[0],
    &[0xff],
    &[0x7f],
    &[0x80],
    &[0xff, 0xff, 0xff, 0xff],
    &[0x7f, 0xff, 0xff, 0xff],
    &[0x00, 0x02, 0x00, 0x01],
    &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01],
    b"\"",
    b"{",
    b"[",
    b"\\u0000",
    b"18446744073709551615",
    b"-1",
];

/// What a run did.
#[derive(Debug, Clone, Copy)]
pub struct Report {
    pub executions: u64,
    pub pool: usize,
}

fn duration() -> Duration {
    let secs = std::env::var("SKYLARK_FUZZ_SECS").ok().and_then(|s| s.parse::<f64>().ok()).unwrap_or(3.0);
    Duration::from_secs_f64(secs.max(0.0))
}

fn mutate(rng: &mut StdRng, input: &mut Vec<u8>, seeds: &[Vec<u8>]) {
    for _ in 0..rng.random_range(1..=8) {
        let len = input.len();
        match rng.random_range(0..9) {
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                input[i] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.random_range(0..len);
                input[i] = rng.random();
            }
            2 => {
                let at = rng.random_range(0..=len);
                let n = rng.random_range(1..=16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                input.splice(at..at, bytes);
            }
            3 if len > 0 => {
                let from = rng.random_range(0..len);
                let to = (from + rng.random_range(1..=16)).min(len);
                input.drain(from..to);
            }
            4 if len > 0 => {
                let from = rng.random_range(0..len);
                let to = (from + rng.random_range(1..=32)).min(len);
                let copy = input[from..to].to_vec();
                let at = rng.random_range(0..=input.len());
                input.splice(at..at, copy);
            }
            5 => {
                let value = INTERESTING[rng.random_range(0..INTERESTING.len())];
                let at = rng.random_range(0..=len);
                let end = (at + value.len()).min(len);
                input.splice(at..end, value.iter().copied());
            }
            6 if !seeds.is_empty() => {
                let other = &seeds[rng.random_range(0..seeds.len())];
                if !other.is_empty() {
                    let from = rng.random_range(0..other.len());
                    let to = rng.random_range(from..=other.len());
                    let at = rng.random_range(0..=len);
                    input.splice(at..at, other[from..to].iter().copied());
                }
            }
            7 if len > 0 => input.truncate(rng.random_range(0..len)),
            _ => {}
        }
    }
    input.truncate(MAX_INPUT);
}

fn findings_dir(name: &str) -> PathBuf {
    // Tests run with the crate as working directory; findings go to the
    // workspace's target directory.
    let mut dir = std::env::current_dir().unwrap_or_default();
    while !dir.join("Cargo.lock").exists() {
        if !dir.pop() {
            break;
        }
    }
    dir.join("target").join("fuzz-findings").join(name)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Fuzzes `target` from `seeds` for the configured time. The target
/// panics on a bug and returns whether the input got past the first
/// layer of checks (to keep it for more mutation). Panics with the failing
/// input, after saving it, if the target ever panics.
pub fn run(name: &str, seeds: &[Vec<u8>], mut target: impl FnMut(&[u8]) -> bool) -> Report {
    let seed: u64 = std::env::var("SKYLARK_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(rand::random);
    eprintln!("fuzz {name}: SKYLARK_FUZZ_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut pool: Vec<Vec<u8>> = seeds.to_vec();
    let deadline = Instant::now() + duration();
    let mut executions = 0u64;
    // Every seed once as it is, then mutants until the deadline.
    let mut queue: Vec<Vec<u8>> = seeds.to_vec();
    loop {
        let input = match queue.pop() {
            Some(input) => input,
            None if Instant::now() >= deadline => break,
            None => {
                let mut input =
                    if pool.is_empty() { Vec::new() } else { pool[rng.random_range(0..pool.len())].clone() };
                mutate(&mut rng, &mut input, seeds);
                input
            }
        };
        executions += 1;
        match catch_unwind(AssertUnwindSafe(|| target(&input))) {
            Ok(true) => {
                if pool.len() < POOL {
                    pool.push(input);
                } else {
                    let i = rng.random_range(0..POOL);
                    pool[i] = input;
                }
            }
            Ok(false) => {}
            Err(_) => {
                let dir = findings_dir(name);
                let _ = std::fs::create_dir_all(&dir);
                let path = dir.join(format!("crash-{executions}.bin"));
                let _ = std::fs::write(&path, &input);
                panic!("fuzz {name}: the target panicked on {} (saved to {})", hex(&input), path.display());
            }
        }
    }
    eprintln!("fuzz {name}: {executions} inputs, pool of {}", pool.len());
    Report { executions, pool: pool.len() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "the target panicked")]
    fn a_panicking_target_is_reported() {
        // The planted bug is only reachable through mutation of the seed.
        run("self-test", &[b"abc".to_vec()], |input| {
            assert!(!input.contains(&0xff), "planted bug");
            true
        });
    }

    #[test]
    fn mutations_stay_within_bounds() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut input = vec![1, 2, 3];
        for _ in 0..10_000 {
            mutate(&mut rng, &mut input, &[vec![9; 100]]);
            assert!(input.len() <= MAX_INPUT);
        }
    }
}
