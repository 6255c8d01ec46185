//! What one encryption operation of the CLI costs on disk when the device
//! has a long history, for docs/BENCHMARKS.md: a profile whose journal
//! holds `HISTORY` opened messages (default 20,000) in a 1:1 conversation,
//! then 200 more messages opened one operation each (`Crypto::with`, as
//! `listen` and `chat` do), timed with their writes and syncs.
//!
//! `cargo run --release -p skylark-client --example state_writes [HISTORY] [DIR]`
//!
//! DIR (default: a new directory under the system's temporary one) should
//! be on the disk the profiles live on: the syncs are most of the cost.

use ed25519_dalek::{Signer as _, SigningKey};
use skylark_client::Identity;
use skylark_client::e2ee::Crypto;
use skylark_e2ee::{DeviceRef, Engine, Opened};
use std::time::Instant;

const CONV: &[u8] = b"skylark-group:1";
const TIMED: usize = 200;

fn engine(account: u64, key: &SigningKey) -> Engine {
    Engine::new(DeviceRef { account, device: 1 }, |t| key.sign(t).to_bytes().to_vec())
}

fn main() {
    let mut args = std::env::args().skip(1);
    let history: usize = args.next().map_or(20_000, |a| a.parse().expect("a number of messages"));
    let dir = args.next().map_or_else(
        || std::env::temp_dir().join(format!("skylark-state-writes-{}", std::process::id())),
        std::path::PathBuf::from,
    );
    std::fs::create_dir_all(&dir).expect("a directory to write to");
    let (ann_key, bob_key) = (SigningKey::from_bytes(&[1; 32]), SigningKey::from_bytes(&[2; 32]));
    let (mut ann, mut bob) = (engine(1, &ann_key), engine(2, &bob_key));
    ann.create(CONV).expect("the engine works");
    let package = bob.key_packages(1).expect("the engine works").remove(0);
    let commit = ann.add(CONV, &[(bob.me(), package)]).expect("the engine works").expect("a device to add");
    ann.commit_accepted(CONV).expect("the engine works");
    bob.receive(&commit.payload(), false).expect("the engine works");
    let text = [b'x'; 100];
    for i in 0..history {
        let payload = ann.encrypt(CONV, &text).expect("the engine works");
        assert!(matches!(bob.open_once(&format!("post:1:{i}"), &payload, None), Opened::Message { .. }));
    }
    // The profile as a run of the CLI would leave it.
    std::fs::write(dir.join("e2ee.state"), bob.export()).expect("the state written");
    let identity = Identity::new("http://127.0.0.1:1".into(), 2, 1, "+15550000002".into(), &bob_key);
    let crypto = Crypto::open(&dir, &identity).expect("the profile opens");
    drop(bob);
    let payloads: Vec<Vec<u8>> = (0..TIMED).map(|_| ann.encrypt(CONV, &text).expect("the engine works")).collect();
    let size = |name: &str| std::fs::metadata(dir.join(name)).map_or(0, |m| m.len());
    let started = Instant::now();
    for (i, payload) in payloads.iter().enumerate() {
        let key = format!("post:1:{}", history + i);
        let opened = crypto.with(|e| Ok(e.open_once(&key, payload, None))).expect("the operation works");
        assert!(matches!(opened, Opened::Message { .. }));
    }
    let per = started.elapsed() / TIMED as u32;
    println!(
        "history {history}: {per:?} an operation; e2ee.state {} KB, e2ee.journal {} KB",
        size("e2ee.state") / 1000,
        size("e2ee.journal") / 1000
    );
    let _ = std::fs::remove_dir_all(&dir);
}
