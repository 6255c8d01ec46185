//! Client-side costs of Skylark's end-to-end encryption, for
//! docs/BENCHMARKS.md: CPU time and bytes per message and per membership
//! change, in groups of 2, 100 and 1,024 devices, one device per member.
//!
//! `cargo run --release -p skylark-e2ee --example figures [SIZE...]`
//!
//! Only two devices do work: the committer and one observer that joined
//! first; the others exist as the key packages that added them.

use ed25519_dalek::{Signer as _, SigningKey};
use skylark_e2ee::{Commit, DeviceRef, Engine};
use std::time::{Duration, Instant};

const CONV: &[u8] = b"skylark-group:1";
const ROUNDS: u32 = 200;

fn engine(account: u64) -> Engine {
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&account.to_be_bytes());
    let key = SigningKey::from_bytes(&seed);
    Engine::new(DeviceRef { account, device: 1 }, |t| key.sign(t).to_bytes().to_vec())
}

fn per(total: Duration, n: u32) -> String {
    let us = total.as_secs_f64() * 1e6 / f64::from(n);
    if us >= 1000.0 { format!("{:.2} ms", us / 1000.0) } else { format!("{us:.0} µs") }
}

fn main() {
    println!(
        "| devices | message: encrypt | decrypt | open once (the clients' call) | bytes (100-byte text) | add 1 device: commit | its post | a member applies it | remove 1 device: commit | its post | a member applies it | state per device | saving it (`export`) |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    // Sizes from the command line (`-- 1024`), or all three.
    let mut sizes: Vec<u64> = std::env::args().skip(1).map(|a| a.parse().expect("a group size")).collect();
    if sizes.is_empty() {
        sizes = vec![2, 100, 1024];
    }
    // What a membership change posts and what each device downloads at the
    // server's default payload limit, per size: printed after the table.
    let mut split = Vec::new();
    for size in sizes {
        let mut admin = engine(1);
        let mut observer = engine(2);
        admin.create(CONV).expect("the engine works");
        let first = vec![(observer.me(), observer.key_packages(1).expect("the engine works").remove(0))];
        let c = admin.add(CONV, &first).expect("the engine works").expect("the engine works");
        admin.commit_accepted(CONV).expect("the engine works");
        observer.receive(&c.payload(), false).expect("the engine works");
        // The rest of the members, 32 per commit as the CLI adds them.
        let mut rest: Vec<(DeviceRef, Vec<u8>)> = Vec::new();
        for account in 3..=size {
            let mut e = engine(account);
            rest.push((e.me(), e.key_packages(1).expect("the engine works").remove(0)));
        }
        for batch in rest.chunks(32) {
            let c = admin.add(CONV, batch).expect("the engine works").expect("the engine works");
            admin.commit_accepted(CONV).expect("the engine works");
            observer.receive(&c.payload(), false).expect("the engine works");
        }
        assert_eq!(admin.members(CONV).expect("the engine works").len() as u64, size);

        let text = [b'x'; 100];
        let (mut enc, mut dec, mut bytes) = (Duration::ZERO, Duration::ZERO, 0);
        for _ in 0..ROUNDS {
            let t = Instant::now();
            let payload = admin.encrypt(CONV, &text).expect("the engine works");
            enc += t.elapsed();
            bytes = payload.len();
            let t = Instant::now();
            observer.receive(&payload, false).expect("the engine works");
            dec += t.elapsed();
        }
        // The clients open each log entry with `open_once`, which also
        // remembers the plaintext and notices membership changes.
        let mut open = Duration::ZERO;
        for i in 0..ROUNDS {
            let payload = admin.encrypt(CONV, &text).expect("the engine works");
            let t = Instant::now();
            let opened = observer.open_once(&format!("entry:{i}"), &payload, None);
            open += t.elapsed();
            assert!(matches!(opened, skylark_e2ee::Opened::Message { .. }), "{opened:?}");
        }

        let changes = 20u32;
        let (mut add_c, mut add_p, mut add_bytes) = (Duration::ZERO, Duration::ZERO, 0);
        let (mut rm_c, mut rm_p, mut rm_bytes) = (Duration::ZERO, Duration::ZERO, 0);
        for round in 0..u64::from(changes) {
            let mut newcomer = engine(1_000_000 + round);
            let package = vec![(newcomer.me(), newcomer.key_packages(1).expect("the engine works").remove(0))];
            let t = Instant::now();
            let c = admin.add(CONV, &package).expect("the engine works").expect("the engine works");
            admin.commit_accepted(CONV).expect("the engine works");
            add_c += t.elapsed();
            add_bytes = c.payload().len();
            let add_commit = c.clone();
            let t = Instant::now();
            observer.receive(&c.payload(), false).expect("the engine works");
            add_p += t.elapsed();

            let t = Instant::now();
            let c = admin.remove(CONV, &[newcomer.me()]).expect("the engine works").expect("the engine works");
            admin.commit_accepted(CONV).expect("the engine works");
            rm_c += t.elapsed();
            rm_bytes = c.payload().len();
            let t = Instant::now();
            observer.receive(&c.payload(), false).expect("the engine works");
            rm_p += t.elapsed();
            if round + 1 == u64::from(changes) {
                split.push((size, carried(&add_commit), carried(&c)));
            }
        }
        let t = Instant::now();
        let state = observer.export().len();
        let save = t.elapsed();
        println!(
            "| {size} | {} | {} | {} | {bytes} | {} | {:.1} KB | {} | {} | {:.1} KB | {} | {:.0} KB | {} |",
            per(enc, ROUNDS),
            per(dec, ROUNDS),
            per(open, ROUNDS),
            per(add_c, changes),
            add_bytes as f64 / 1024.0,
            per(add_p, changes),
            per(rm_c, changes),
            rm_bytes as f64 / 1024.0,
            per(rm_p, changes),
            state as f64 / 1024.0,
            per(save, 1),
        );
    }
    println!();
    println!(
        "| devices | add 1 device: posted | each member downloads | the new device downloads | remove 1 device: posted | each member downloads |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: |");
    for (size, add, rm) in split {
        let kb = |b: usize| format!("{:.1} KB", b as f64 / 1024.0);
        println!(
            "| {size} | {} | {} | {} | {} | {} |",
            kb(add.posted),
            kb(add.member),
            kb(add.newcomer),
            kb(rm.posted),
            kb(rm.member)
        );
    }
}

/// Bytes of a membership change at the default 64 KiB payload limit: the
/// post, and what a member and a device being added download besides.
struct Carried {
    posted: usize,
    member: usize,
    newcomer: usize,
}

fn carried(c: &Commit) -> Carried {
    const LIMIT: usize = 64 * 1024;
    if c.payload().len() <= LIMIT {
        return Carried { posted: c.payload().len(), member: 0, newcomer: 0 };
    }
    let uploaded: Vec<_> = c.to_upload(LIMIT).into_iter().map(|(kind, bytes)| (kind, bytes.len())).collect();
    let ids: Vec<_> = uploaded.iter().map(|(kind, _)| (*kind, "0123456789abcdef0123456789abcdef".to_owned())).collect();
    let posted = skylark_e2ee::out_of_line(CONV, c, &ids).expect("the engine works").len();
    let of = |kind| uploaded.iter().filter(|(k, _)| *k == kind).map(|(_, n)| n).sum::<usize>();
    Carried { posted, member: of(skylark_e2ee::PartKind::Commit), newcomer: of(skylark_e2ee::PartKind::Welcome) }
}
