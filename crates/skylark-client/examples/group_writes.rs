//! What one encryption operation of the CLI writes to disk in a large
//! group, for docs/BENCHMARKS.md: a profile whose device is a member of a
//! group of `DEVICES` devices (default 1,024), then 200 messages of the
//! group opened one operation each (`Crypto::with`, as `listen` and `chat`
//! do), timed with their writes and syncs, and the bytes written counted.
//!
//! `cargo run --release -p skylark-client --example group_writes [DEVICES] [DIR]`
//!
//! DIR (default: a new directory under the system's temporary one) should
//! be on the disk the profiles live on: the syncs are part of the cost.

use ed25519_dalek::{Signer as _, SigningKey};
use skylark_client::Identity;
use skylark_client::e2ee::Crypto;
use skylark_e2ee::{DeviceRef, Engine, Incoming, Opened};
use std::time::Instant;

const CONV: &[u8] = b"skylark-group:1";
const TIMED: usize = 200;

fn key(account: u64) -> SigningKey {
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&account.to_be_bytes());
    seed[31] = 1;
    SigningKey::from_bytes(&seed)
}

fn engine(account: u64) -> Engine {
    let key = key(account);
    Engine::new(DeviceRef { account, device: 1 }, |t| key.sign(t).to_bytes().to_vec())
}

fn main() {
    let mut args = std::env::args().skip(1);
    let devices: u64 = args.next().map_or(1_024, |a| a.parse().expect("a number of devices"));
    let dir = args.next().map_or_else(
        || std::env::temp_dir().join(format!("skylark-group-writes-{}", std::process::id())),
        std::path::PathBuf::from,
    );
    std::fs::create_dir_all(&dir).expect("a directory to write to");
    let (mut ann, mut bob) = (engine(1), engine(2));
    ann.create(CONV).expect("the engine works");
    let mut packages = vec![(bob.me(), bob.key_packages(1).expect("the engine works").remove(0))];
    for account in 3..=devices {
        let mut other = engine(account);
        packages.push((other.me(), other.key_packages(1).expect("the engine works").remove(0)));
    }
    let commit = ann.add(CONV, &packages).expect("the engine works").expect("devices to add");
    ann.commit_accepted(CONV).expect("the engine works");
    let joined = bob.receive(&commit.payload(), false).expect("the engine works");
    assert!(matches!(joined, Incoming::Joined { .. }));
    // The profile as a run of the CLI would leave it.
    std::fs::write(dir.join("e2ee.state"), bob.export()).expect("the state written");
    let identity = Identity::new("http://127.0.0.1:1".into(), 2, 1, "+15550000002".into(), &key(2));
    let crypto = Crypto::open(&dir, &identity).expect("the profile opens");
    drop(bob);
    let text = [b'x'; 100];
    let payloads: Vec<Vec<u8>> = (0..TIMED).map(|_| ann.encrypt(CONV, &text).expect("the engine works")).collect();
    let size = |name: &str| std::fs::metadata(dir.join(name)).map_or(0, |m| m.len());
    #[cfg(unix)]
    let inode = || std::fs::metadata(dir.join("e2ee.state")).map_or(0, |m| std::os::unix::fs::MetadataExt::ino(&m));
    #[cfg(not(unix))]
    let inode = || 0;
    let (mut written, mut appended, mut wholes) = (0u64, 0u64, 0u64);
    let started = Instant::now();
    for (i, payload) in payloads.iter().enumerate() {
        let (changes, journal, at) = (size("e2ee.changes"), size("e2ee.journal"), inode());
        let key = format!("post:1:{i}");
        let opened = crypto.with(|e| Ok(e.open_once(&key, payload, None))).expect("the operation works");
        assert!(matches!(opened, Opened::Message { .. }));
        // A state written whole is a new file; the others are appended to.
        if inode() != at {
            wholes += 1;
            written += size("e2ee.state");
        }
        appended += size("e2ee.changes").saturating_sub(changes);
        written += size("e2ee.changes").saturating_sub(changes) + size("e2ee.journal").saturating_sub(journal);
    }
    let per = started.elapsed() / TIMED as u32;
    println!(
        "{devices} devices: {per:?} an operation, {} bytes written an operation ({} appended to e2ee.changes, \
         e2ee.state written whole {wholes} times); e2ee.state {} KB",
        written / TIMED as u64,
        appended / TIMED as u64,
        size("e2ee.state") / 1000,
    );
    let _ = std::fs::remove_dir_all(&dir);
}
