//! How commits to a large group shrink as its members refresh their keys,
//! for docs/BENCHMARKS.md ("Members refresh their keys").
//!
//! `cargo run --release -p skylark-e2ee --example fill [DEVICES] [REFRESHES]`
//! (default 1024 and 128).
//!
//! The group is built as the clients build it: its creator adds the other
//! devices 32 per commit, so the tree's nodes above them are blank. Then
//! devices picked in a fixed pseudo-random order each commit one
//! self-update, as each does before its first post
//! (`Engine::wants_update`). At 0, 8, 32, ... refreshes, the creator makes
//! (and throws away) a commit removing one device, and the table gives its
//! size and the refreshes' own sizes.

use ed25519_dalek::{Signer as _, SigningKey};
use skylark_e2ee::{DeviceRef, Engine};
use std::time::{Duration, Instant};

const CONV: &[u8] = b"skylark-group:1";

fn engine(account: u64) -> Engine {
    let mut seed = [0u8; 32];
    seed[..8].copy_from_slice(&account.to_be_bytes());
    let key = SigningKey::from_bytes(&seed);
    Engine::new(DeviceRef { account, device: 1 }, |t| key.sign(t).to_bytes().to_vec())
}

/// A device that will refresh, and how far it has read the commits made
/// after the group was built.
struct Refresher {
    engine: Engine,
    read: usize,
}

fn main() {
    let mut args = std::env::args().skip(1).map(|a| a.parse::<u64>().expect("a number"));
    let size = args.next().unwrap_or(1024);
    let refreshes = args.next().unwrap_or(128) as usize;
    assert!(refreshes < size as usize, "fewer refreshes than devices");

    // Which devices refresh, in order: a fixed shuffle of accounts 2..=size.
    let mut order: Vec<u64> = (2..=size).collect();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in (1..order.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    order.truncate(refreshes);

    let mut admin = engine(1);
    admin.create(CONV).expect("the engine works");
    let mut refreshers: Vec<(u64, Option<Refresher>)> = order.iter().map(|&a| (a, None)).collect();
    let accounts: Vec<u64> = (2..=size).collect();
    for batch in accounts.chunks(32) {
        let mut joining = Vec::new();
        let mut packages = Vec::new();
        for &account in batch {
            let mut e = engine(account);
            packages.push((e.me(), e.key_packages(1).expect("the engine works").remove(0)));
            if order.contains(&account) {
                joining.push((account, e));
            }
        }
        let c = admin.add(CONV, &packages).expect("the engine works").expect("devices to add");
        admin.commit_accepted(CONV).expect("the engine works");
        let payload = c.payload();
        for r in refreshers.iter_mut().filter_map(|(_, r)| r.as_mut()) {
            r.engine.receive(&payload, false).expect("the engine works");
        }
        for (account, mut e) in joining {
            e.receive(&payload, false).expect("the engine works");
            assert!(e.wants_update(CONV));
            let slot = refreshers.iter_mut().find(|(a, _)| *a == account).expect("a refresher");
            slot.1 = Some(Refresher { engine: e, read: 0 });
        }
    }
    assert_eq!(admin.members(CONV).expect("the engine works").len() as u64, size);
    let leaving = DeviceRef { account: *accounts.last().expect("devices"), device: 1 };

    println!(
        "| devices refreshed | a removal's commit | refreshes in this step: mean size | smallest | largest | making one | a member applying one |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut log: Vec<Vec<u8>> = Vec::new();
    let mut admin_read = 0;
    let mut done = 0;
    let mut checkpoint = 0;
    while done <= refreshes {
        // Refreshes up to the checkpoint.
        let mut sizes = Vec::new();
        let (mut make, mut apply, mut applied) = (Duration::ZERO, Duration::ZERO, 0u32);
        while done < checkpoint {
            let r = refreshers[done].1.as_mut().expect("joined");
            for payload in &log[r.read..] {
                r.engine.receive(payload, false).expect("the engine works");
            }
            r.read = log.len();
            let t = Instant::now();
            let c = r.engine.update(CONV).expect("the engine works");
            r.engine.commit_accepted(CONV).expect("the engine works");
            make += t.elapsed();
            assert!(!r.engine.wants_update(CONV));
            sizes.push(c.payload().len());
            log.push(c.payload());
            r.read = log.len();
            // The creator stands for every other member applying it.
            let t = Instant::now();
            admin.receive(&log[admin_read], false).expect("the engine works");
            apply += t.elapsed();
            applied += 1;
            admin_read += 1;
            refreshers[done].1 = None; // done with this device: frees its state
            done += 1;
        }
        let removal = admin.remove(CONV, &[leaving]).expect("the engine works").expect("a member").payload().len();
        admin.commit_refused(CONV).expect("the engine works");
        let kb = |b: usize| format!("{:.1} KB", b as f64 / 1024.0);
        let ms = |d: Duration, n: u32| format!("{:.1} ms", d.as_secs_f64() * 1000.0 / f64::from(n.max(1)));
        if sizes.is_empty() {
            println!("| {done} | {} | | | | | |", kb(removal));
        } else {
            println!(
                "| {done} | {} | {} | {} | {} | {} | {} |",
                kb(removal),
                kb(sizes.iter().sum::<usize>() / sizes.len()),
                kb(*sizes.iter().min().expect("some")),
                kb(*sizes.iter().max().expect("some")),
                ms(make, applied),
                ms(apply, applied),
            );
        }
        if done == refreshes {
            break;
        }
        checkpoint = if checkpoint == 0 { 8 } else { (checkpoint * 4).min(refreshes) };
    }
}
