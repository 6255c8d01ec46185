//! What verifying connection signatures costs, one at a time and in batches
//! (`skylark_core::auth::verify_together`, as the server verifies answers
//! that arrive together). Prints wall-clock time per signature; for figures
//! this noisy machine repeats, count instructions with callgrind and subtract
//! a run with no batch size (which only makes the keys and signatures):
//!
//! ```sh
//! cargo build --release -p skylark-core --example signatures
//! valgrind --tool=callgrind target/release/examples/signatures      # setup only
//! valgrind --tool=callgrind target/release/examples/signatures 8    # setup + 512 in batches of 8
//! ```

use ed25519_dalek::{Signer, SigningKey};
use skylark_core::auth::{Challenge, Unverified, check_answer, verify_together};
use skylark_core::{AccountId, Device, DeviceId};
use std::time::Instant;

const SIGNATURES: usize = 512;

fn main() {
    let answers: Vec<(Vec<u8>, Unverified)> = (0..SIGNATURES as u64)
        .map(|i| {
            let mut seed = [0u8; 32];
            seed[..8].copy_from_slice(&(i + 1).to_le_bytes());
            let key = SigningKey::from_bytes(&seed);
            let nonce = [i as u8; 32];
            let transcript = [b"skylark-auth-v1".as_slice(), &[0; 16], &nonce, &i.to_be_bytes()].concat();
            let device = Device {
                id: DeviceId(i),
                account_id: AccountId(i),
                public_key: key.verifying_key().to_bytes(),
                name: "load".into(),
                created_at_ms: 0,
                removed_at_ms: None,
                last_seen_ms: None,
            };
            let challenge = Challenge { nonce, issued_at_ms: 0, ttl_ms: 1 };
            let signature = key.sign(&transcript).to_bytes();
            let answer = check_answer(&challenge, Some(&device), &nonce, &signature, 0).expect("a good answer");
            (transcript, answer)
        })
        .collect();
    for size in std::env::args().skip(1) {
        let size: usize = size.parse().expect("a batch size");
        let started = Instant::now();
        for batch in answers.chunks(size.max(1)) {
            let pairs: Vec<(&[u8], &Unverified)> = batch.iter().map(|(t, a)| (t.as_slice(), a)).collect();
            assert!(verify_together(&pairs).iter().all(Result::is_ok));
        }
        let each = started.elapsed().as_secs_f64() * 1e6 / SIGNATURES as f64;
        println!("batches of {size}: {each:.1} µs per signature");
    }
}
