//! Memory per idle user actor: spawns N actors and reads the process's
//! resident memory before and after.
//!
//! ```sh
//! cargo run --release -p skylark-server --example idle_actors -- [N]
//! ```
//!
//! Each actor is woken by an acknowledgement for a device that is not
//! attached: it loads its (empty) account state from an in-memory store and
//! then sits idle with its mailbox, task and registry slot, which is what an
//! account costs while none of its devices is connected but forwards or
//! lookups keep it resident. The figure includes the registry entry.

use skylark_core::{AccountId, DeviceId, SystemClock};
use skylark_server::messaging::MessagingConfig;
use skylark_server::router::Router;
use skylark_store::RedbStore;
use std::sync::Arc;
use std::time::Duration;

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::main]
async fn main() {
    let n: u64 = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let store = Arc::new(RedbStore::in_memory().expect("store"));
    let config = MessagingConfig { actor_idle_ms: 3_600_000, ..MessagingConfig::default() };
    let router = Router::new(store, Arc::new(SystemClock), config);

    // Warm up the runtime, allocator and store with a first batch.
    for i in 0..1_000u64 {
        router.ack(AccountId(10_000_000 + i), DeviceId(1), 0, 0).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = rss_kib();

    for i in 0..n {
        router.ack(AccountId(i + 1), DeviceId(1), 0, 0).await;
    }
    // Let every actor finish loading; the figure is stable after this.
    let mut after = rss_kib();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        after = rss_kib();
    }
    let live = router.live_actors() as u64;
    println!(
        "{live} live actors; RSS {} MiB -> {} MiB; {:.0} bytes per idle actor",
        before / 1024,
        after / 1024,
        (after.saturating_sub(before) * 1024) as f64 / n as f64
    );
}
