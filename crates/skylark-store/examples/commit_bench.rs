//! Durable messages per second through the store: group commit against one
//! fsync per message, in the embedded store and in PostgreSQL.
//!
//! ```sh
//! cargo run --release -p skylark-store --example commit_bench -- [WRITERS] [MESSAGES] [PAYLOAD_BYTES] [DIR] [postgres]
//! ```
//!
//! With `postgres` last, the same writes also go to a throwaway PostgreSQL
//! (its data directory in the system's temporary directory) in three ways:
//! group commit as the server runs it (every queued write in one statement,
//! two commits in flight), pipelined (each write its own transaction, 16 in
//! flight on 16 connections: PostgreSQL flushes concurrent commits' WAL
//! together), and one commit at a time. For each, the commits and rows
//! PostgreSQL counted (`pg_stat_database`) are printed per message.
//!
//! Each write is shaped like a real send: one log entry with the payload,
//! one outbox item carrying the same message, the client id and the
//! counters. `WRITERS` tasks (default 256, as many accounts sending at
//! once) apply `MESSAGES` writes in all (default 20000). Every write is
//! durable (fsync'd) when `apply` returns, in both modes. The database file
//! goes in `DIR` (default: a temporary directory under the current one, so
//! it is on the same disk as the project, not a RAM disk).

use skylark_core::message::{Forward, LogEntry, Message, MessageId, OutboxItem};
use skylark_core::{AccountId, DeviceId};
use skylark_store::postgres::throwaway::TestPostgres;
use skylark_store::{AccountWrite, Counters, MessageStore, PgOptions, PgStore, RedbOptions, RedbStore};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn arg(n: usize, default: usize) -> usize {
    std::env::args().nth(n).and_then(|a| a.parse().ok()).unwrap_or(default)
}

fn write_for(account: u64, seq: u64, payload: &[u8]) -> AccountWrite {
    let message = Message {
        meta: Default::default(),
        id: MessageId { sender: AccountId(account), seq },
        to: AccountId(account + 1_000_000),
        sender_device: DeviceId(1),
        client_id: format!("c-{seq}"),
        sent_at_ms: 1_700_000_000_000 + seq,
        payload: payload.to_vec().into(),
    };
    let mut w = AccountWrite::new(AccountId(account));
    w.appends.push((seq, std::sync::Arc::new(LogEntry::Message(std::sync::Arc::new(message.clone())))));
    w.outbox_puts.push((seq, OutboxItem { to: message.to, forward: Forward::Message(std::sync::Arc::new(message)) }));
    w.client_ids.push((DeviceId(1), format!("c-{seq}"), seq));
    w.counters = Some(Counters { next_seq: seq + 1, next_outbox: seq + 1 });
    w
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn run(label: &str, store: impl MessageStore + 'static, writers: usize, messages: usize, payload: usize) {
    let store = Arc::new(store);
    let per_writer = messages / writers;
    let body = vec![0x5a; payload];
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let store = store.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(per_writer);
            for seq in 1..=per_writer as u64 {
                let t = Instant::now();
                store.apply(write_for(w as u64 + 1, seq, &body)).await.expect("apply");
                latencies.push(t.elapsed());
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.expect("writer"));
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let total = latencies.len();
    println!(
        "{label:<28} {total:>7} msgs in {:>7.2} s = {:>8.0} durable msgs/s   apply latency p50 {:>7.2} ms  p99 {:>7.2} ms",
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
    );
}

#[tokio::main]
async fn main() {
    let writers = arg(1, 256).max(1);
    let messages = arg(2, 20_000).max(writers);
    let payload = arg(3, 100);
    let base = std::env::args().nth(4).map(std::path::PathBuf::from).unwrap_or_else(|| std::path::PathBuf::from("."));
    println!("{writers} concurrent writers, {messages} messages of {payload} bytes, fsync on every commit");

    let dir = tempfile::tempdir_in(&base).expect("temp dir");
    let store = RedbStore::open(&dir.path().join("group.redb")).expect("open");
    run("group commit", store, writers, messages, payload).await;

    // One fsync per message is so slow that a tenth of the messages is plenty.
    let dir = tempfile::tempdir_in(&base).expect("temp dir");
    let store =
        RedbStore::open_with(&dir.path().join("single.redb"), RedbOptions { max_batch: 1, ..RedbOptions::default() })
            .expect("open");
    run("one fsync per message", store, writers, (messages / 10).max(writers), payload).await;

    if std::env::args().nth(5).as_deref() == Some("postgres") {
        let pg = TestPostgres::start().expect("a throwaway PostgreSQL");
        let modes = [
            ("postgres group commit", 1024, 2, messages),
            ("postgres pipelined (16)", 1, 16, messages),
            ("postgres one at a time", 1, 1, (messages / 10).max(writers)),
        ];
        for (i, (label, max_batch, commit_tasks, n)) in modes.into_iter().enumerate() {
            let url = pg.create_database(&format!("bench{i}")).expect("database");
            let options = PgOptions { shards: vec![url], max_batch, commit_tasks, ..PgOptions::default() };
            let store = PgStore::open(&options).await.expect("open");
            let stats = || {
                pg.sql(&format!(
                    "SELECT xact_commit || ' ' || (tup_inserted + tup_updated + tup_deleted) FROM pg_stat_database \
                     WHERE datname = 'bench{i}'"
                ))
                .expect("stats")
            };
            let parse = |s: String| -> (f64, f64) {
                let mut it = s.split(' ').map(|v| v.parse::<f64>().unwrap_or(0.0));
                (it.next().unwrap_or(0.0), it.next().unwrap_or(0.0))
            };
            // pg_stat counters are sent by backends every so often; wait them in.
            tokio::time::sleep(Duration::from_millis(1200)).await;
            let before = parse(stats());
            run(label, store, writers, n, payload).await;
            tokio::time::sleep(Duration::from_millis(1200)).await;
            let after = parse(stats());
            println!(
                "{:<28} {:.3} commits and {:.2} rows per message",
                "",
                (after.0 - before.0) / n as f64,
                (after.1 - before.1) / n as f64
            );
        }
    }
}
