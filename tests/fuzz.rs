//! A bounded fuzz run in the test suite: for each entry point of
//! `postern::fuzzing` (pre-auth framing and parsing, SASL decoders, PROXY
//! headers, backend greetings, the config loader), its seed corpus under
//! fuzz/corpus/ and mutations of it (bit flips, byte inserts and deletes,
//! interesting bytes, splices, repeats) for a couple of seconds each. A
//! panic fails the test and the input is written to
//! target/fuzz-failures/ to become a regression seed. The coverage-guided
//! runs are `scripts/fuzz` (cargo-fuzz, libFuzzer).
//!
//! `POSTERN_FUZZ_SECONDS` sets the time per target (default 2), after at
//! least `MIN_MUTATIONS` mutated inputs however slow the machine;
//! `POSTERN_FUZZ_SEED` replays a run.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = root().join("fuzz/corpus").join(target);
    let mut seeds: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert!(!seeds.is_empty(), "{} has no seeds", dir.display());
    seeds.sort();
    seeds
}

const INTERESTING: &[&[u8]] = &[
    b"\r\n",
    b"\n",
    b"\0",
    b"{",
    b"}",
    b"+}",
    b"{4294967296}",
    b"{18446744073709551615}",
    b"\"",
    b"\\",
    b"(",
    b")",
    b"*",
    b"%",
    b"\x01",
    b"\xff",
    b"=",
    b":",
    b"[",
    b"]",
    b" ",
    b"\t",
    b"PROXY ",
    b"AUTHENTICATE",
    b"LOGIN",
    b"STARTTLS",
];

fn mutate(rng: &mut StdRng, corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut data = corpus[rng.gen_range(0..corpus.len())].clone();
    for _ in 0..rng.gen_range(1..8) {
        let at = if data.is_empty() {
            0
        } else {
            rng.gen_range(0..=data.len())
        };
        match rng.gen_range(0..7) {
            0 if !data.is_empty() => {
                let i = rng.gen_range(0..data.len());
                data[i] ^= 1 << rng.gen_range(0..8);
            }
            1 => data.insert(at, rng.gen()),
            2 if at < data.len() => {
                let end = (at + rng.gen_range(1..16)).min(data.len());
                data.drain(at..end);
            }
            3 => {
                let piece = INTERESTING[rng.gen_range(0..INTERESTING.len())];
                data.splice(at..at, piece.iter().copied());
            }
            4 => {
                let other = &corpus[rng.gen_range(0..corpus.len())];
                let from = rng.gen_range(0..=other.len());
                data.splice(at..at, other[from..].iter().copied());
            }
            5 if at < data.len() => {
                let end = (at + rng.gen_range(1..8)).min(data.len());
                let piece: Vec<u8> = data[at..end].to_vec();
                for _ in 0..rng.gen_range(1..64) {
                    data.splice(at..at, piece.iter().copied());
                }
            }
            _ => data.truncate(at),
        }
        data.truncate(64 * 1024);
    }
    data
}

/// Mutated inputs each target gets at the least, so that a slow machine
/// (a loaded CI runner, a sanitizer) still runs more than the seeds.
const MIN_MUTATIONS: u64 = 200;

fn run(target: &str, f: fn(&[u8])) {
    let seconds: u64 = std::env::var("POSTERN_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let seed: u64 = std::env::var("POSTERN_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let corpus = seeds(target);
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();
    let mut runs = 0u64;
    let mut mutated = 0u64;
    let inputs = corpus.iter().cloned().chain(std::iter::from_fn(|| {
        (mutated < MIN_MUTATIONS || started.elapsed() < Duration::from_secs(seconds)).then(|| {
            mutated += 1;
            mutate(&mut rng, &corpus)
        })
    }));
    for input in inputs {
        runs += 1;
        if catch_unwind(AssertUnwindSafe(|| f(&input))).is_err() {
            let dir: PathBuf = root().join("target/fuzz-failures");
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(format!("{target}-{seed}-{runs}"));
            std::fs::write(&path, &input).unwrap();
            panic!(
                "{target} panicked on input {} (seed {seed}); add it to fuzz/corpus/{target}/",
                path.display()
            );
        }
    }
    eprintln!(
        "{target}: {runs} inputs in {:?}, seed {seed}",
        started.elapsed()
    );
    assert!(runs > corpus.len() as u64, "{target}: only the seeds ran");
}

#[test]
fn fuzz_preauth_framing_and_parsing() {
    run("preauth", postern::fuzzing::preauth);
}

#[test]
fn fuzz_sasl_decoders() {
    run("sasl", postern::fuzzing::sasl);
}

#[test]
fn fuzz_proxy_protocol_headers() {
    run("proxy_header", postern::fuzzing::proxy_header);
}

#[test]
fn fuzz_backend_greetings() {
    run("backend_greeting", postern::fuzzing::backend_greeting);
}

#[test]
fn fuzz_config_loader() {
    run("config", postern::fuzzing::config);
}
