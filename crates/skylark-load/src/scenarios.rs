//! The load scenarios. Each returns a JSON-serialisable report.

use crate::provision::Manifest;
use crate::stats::{Latency, Summary, cpu_seconds, progress, rss_kib};
use serde::{Deserialize, Serialize};
use skylark_client::session::{Event, LogEvent, SessionHandle, log_event};
use skylark_client::{Endpoint, Identity, Session};
use skylark_protocol::v1::{ReceiptKind, event::Body};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc;

/// Where the server is and how to reach it.
#[derive(Debug, Clone)]
pub struct Target {
    pub http_base: String,
    pub endpoint: Endpoint,
    /// Local addresses to connect from, round-robin (127.0.0.x), so the
    /// ephemeral port range of one address is not the limit.
    pub sources: Vec<IpAddr>,
}

impl Target {
    fn source(&self, i: usize) -> Option<IpAddr> {
        (!self.sources.is_empty()).then(|| self.sources[i % self.sources.len()])
    }
}

pub(crate) async fn open(
    target: &Target,
    manifest: &Manifest,
    index: usize,
) -> Result<(Session, mpsc::Receiver<Event>), String> {
    open_as(target, &manifest.identity(index, &target.http_base), index).await
}

/// Connects as `identity` (account `index` of the manifest). Tasks get the
/// identity rather than the manifest, which would be costly to copy.
async fn open_as(
    target: &Target,
    identity: &skylark_client::Identity,
    index: usize,
) -> Result<(Session, mpsc::Receiver<Event>), String> {
    Session::open_from(&target.endpoint, identity, target.source(index)).await.map_err(|e| e.to_string())
}

/// Waits until `due`, if it is still ahead. The timer ticks in whole
/// milliseconds, so sleeping for every event of a faster schedule would cap
/// the rate near 1,000 per second; events already due start at once.
async fn pace(due: Instant) {
    if due > Instant::now() {
        tokio::time::sleep_until(due.into()).await;
    }
}

/// A media token of account `index` (for uploads and downloads over HTTP).
pub async fn media_token(target: &Target, manifest: &Manifest, index: usize) -> Result<String, String> {
    let (session, _events) = open(target, manifest, index).await?;
    let token = session.handle().media_token().await.map_err(|e| e.to_string());
    session.close().await;
    Ok(token?.token)
}

// ---------------------------------------------------------------- idle

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdleReport {
    pub scenario: String,
    pub connections: usize,
    pub failed: usize,
    pub ramp_seconds: f64,
    pub connects_per_second: f64,
    pub connect_latency: Summary,
    /// HDR histogram (V2, base64), for merging worker reports.
    pub connect_histogram: String,
    pub server_rss_before_kib: Option<u64>,
    pub server_rss_after_kib: Option<u64>,
    pub server_bytes_per_connection: Option<f64>,
    /// The server's memory again after `--settle-secs` with every
    /// connection still open (idle actors have stopped by then, if the
    /// wait is longer than the server's `actor_idle_ms`).
    #[serde(default)]
    pub server_rss_settled_kib: Option<u64>,
    #[serde(default)]
    pub server_bytes_per_connection_settled: Option<f64>,
    /// CPU time the load tool used during the ramp (all its workers), to
    /// show whether it, not the server, was the limit.
    #[serde(default)]
    pub client_cpu_seconds: Option<f64>,
    /// CPU time the server used during the ramp (with `--server-pid`).
    #[serde(default)]
    pub server_cpu_seconds: Option<f64>,
}

/// Opens `accounts` connections at `rate` per second, keeps them for as long
/// as `hold` says, and measures connect latency.
pub async fn idle(
    target: &Target,
    manifest: &Manifest,
    accounts: std::ops::Range<usize>,
    rate: f64,
    hold: impl std::future::Future<Output = ()>,
    quiet: bool,
) -> (IdleReport, Vec<Session>) {
    let total = accounts.len();
    let interval = Duration::from_secs_f64(1.0 / rate.max(1.0));
    // Made before the ramp: a key costs the load tool as much as the
    // signature it makes with it, and the ramp measures the server.
    let identities: Vec<(usize, Identity)> =
        accounts.map(|index| (index, manifest.identity(index, &target.http_base))).collect();
    let cpu_before = cpu_seconds("self");
    let started = Instant::now();
    let (tx, mut rx) = mpsc::unbounded_channel();
    for (k, (index, identity)) in identities.into_iter().enumerate() {
        // Open loop: connection k starts at k × interval, however the others fare.
        pace(started + interval * k as u32).await;
        let (target, tx) = (target.clone(), tx.clone());
        tokio::spawn(async move {
            let t = Instant::now();
            let result = open_as(&target, &identity, index).await;
            let _ = tx.send((t.elapsed(), result));
        });
    }
    drop(tx);
    let mut latency = Latency::default();
    let mut sessions = Vec::with_capacity(total);
    let mut failed = 0;
    let mut done = 0u64;
    while let Some((took, result)) = rx.recv().await {
        done += 1;
        match result {
            Ok((session, _events)) => {
                latency.record(took);
                sessions.push(session);
            }
            Err(_) => failed += 1,
        }
        if !quiet && (done.is_multiple_of(500) || done == total as u64) {
            progress("connecting", done, total as u64);
        }
    }
    let ramp = started.elapsed().as_secs_f64();
    let client_cpu_seconds = cpu_before.zip(cpu_seconds("self")).map(|(b, a)| a - b);
    hold.await;
    let report = IdleReport {
        scenario: "idle".into(),
        connections: sessions.len(),
        failed,
        ramp_seconds: ramp,
        connects_per_second: sessions.len() as f64 / ramp.max(1e-9),
        connect_latency: latency.summary(),
        connect_histogram: latency.encode(),
        server_rss_before_kib: None,
        server_rss_after_kib: None,
        server_bytes_per_connection: None,
        server_rss_settled_kib: None,
        server_bytes_per_connection_settled: None,
        client_cpu_seconds,
        server_cpu_seconds: None,
    };
    (report, sessions)
}

/// Fills in the server memory figures of an idle report.
/// Bytes of the server's memory per connection, from its RSS before and after.
pub fn per_connection_bytes(before: Option<u64>, after: Option<u64>, connections: usize) -> Option<f64> {
    let (b, a) = (before?, after?);
    (connections > 0).then(|| a.saturating_sub(b) as f64 * 1024.0 / connections as f64)
}

pub fn server_memory(report: &mut IdleReport, pid: Option<u32>, before: Option<u64>) {
    let after = pid.and_then(rss_kib);
    report.server_rss_before_kib = before;
    report.server_rss_after_kib = after;
    report.server_bytes_per_connection = per_connection_bytes(before, after, report.connections);
}

// ---------------------------------------------------------------- chat

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatReport {
    pub scenario: String,
    pub pairs: usize,
    pub target_rate: f64,
    pub seconds: f64,
    pub sent: u64,
    pub acked: u64,
    pub delivered: u64,
    pub receipted: u64,
    pub errors: u64,
    /// Acknowledged (durable) messages per second over the run.
    pub acked_per_second: f64,
    /// Intended send time → server ack (one tick).
    pub send_to_ack: Summary,
    /// Intended send time → the recipient's device has it.
    pub send_to_deliver: Summary,
    /// Intended send time → the delivery receipt reached the sender.
    pub send_to_receipt: Summary,
}

/// Payload: 8 bytes of intended send time (µs since the run started), then padding.
fn stamp(t: Duration, size: usize) -> Vec<u8> {
    let mut p = (t.as_micros() as u64).to_be_bytes().to_vec();
    p.resize(size.max(8), b'.');
    p
}

/// A prefix unique to this run, so client message ids never repeat an
/// earlier run's against the same accounts (the server would rightly treat
/// a repeated id as a resend and store nothing new).
fn run_id() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    format!("{:x}-{:x}", nanos, std::process::id())
}

fn read_stamp(p: &[u8]) -> Option<Duration> {
    Some(Duration::from_micros(u64::from_be_bytes(p.get(..8)?.try_into().ok()?)))
}

/// A sender's messages awaiting their delivery receipt.
#[derive(Default)]
struct Pending {
    /// Sequence → intended send time.
    waiting: HashMap<u64, Duration>,
    /// Highest sequence a delivery receipt has covered so far.
    highest_receipt: u64,
    receipted: usize,
}

#[derive(Default)]
struct ChatTotals {
    sent: u64,
    acked: u64,
    delivered: u64,
    receipted: u64,
    errors: u64,
    ack: Latency,
    deliver: Latency,
    receipt: Latency,
}

impl ChatTotals {
    /// A message acknowledged `latency` after its due time.
    fn acked_after(&mut self, latency: Duration) {
        self.acked += 1;
        self.ack.record(latency);
    }

    /// A message delivered `latency` after its due time.
    fn delivered_after(&mut self, latency: Duration) {
        self.delivered += 1;
        self.deliver.record(latency);
    }

    /// A message receipted `latency` after its due time.
    fn receipted_after(&mut self, latency: Duration) {
        self.receipted += 1;
        self.receipt.record(latency);
    }

    /// The report of a `chat` or `mesh` run.
    fn report(&self, scenario: &str, pairs: usize, rate: f64, seconds: f64) -> ChatReport {
        ChatReport {
            scenario: scenario.into(),
            pairs,
            target_rate: rate,
            seconds,
            sent: self.sent,
            acked: self.acked,
            delivered: self.delivered,
            receipted: self.receipted,
            errors: self.errors,
            acked_per_second: self.acked as f64 / seconds,
            send_to_ack: self.ack.summary(),
            send_to_deliver: self.deliver.summary(),
            send_to_receipt: self.receipt.summary(),
        }
    }
}

/// Open-loop 1:1 traffic: `pairs` senders each send to their own recipient,
/// `rate` messages per second in all, for `seconds`. Latencies are measured
/// from when each message *should* have been sent, so a stalled server
/// shows up as latency instead of silently lowering the rate
/// (coordinated omission).
pub async fn chat(
    target: &Target,
    manifest: &Manifest,
    pairs: usize,
    rate: f64,
    seconds: f64,
    payload: usize,
) -> ChatReport {
    let totals = Arc::new(Mutex::new(ChatTotals::default()));
    // Connect everyone first.
    let mut senders = Vec::new();
    let mut recipients = Vec::new();
    for p in 0..pairs {
        senders.push(open(target, manifest, 2 * p).await.expect("sender connects"));
        recipients.push(open(target, manifest, 2 * p + 1).await.expect("recipient connects"));
    }
    let run = run_id();
    let started = Instant::now();
    let duration = Duration::from_secs_f64(seconds);
    let grace = Duration::from_secs(10);
    // Each sender's schedule: message k at offset + k × interval, while
    // within the duration. Knowing the counts lets every task stop as soon
    // as it has seen all of its traffic.
    let per_sender = rate / pairs.max(1) as f64;
    let interval = Duration::from_secs_f64(1.0 / per_sender.max(1e-3));
    let offset_of = |p: usize| interval.mul_f64(p as f64 / pairs.max(1) as f64);
    let expected_of = |p: usize| {
        let off = offset_of(p);
        if off >= duration { 0 } else { ((duration - off).as_nanos().div_ceil(interval.as_nanos())) as usize }
    };

    // Recipients: record delivery latency, acknowledge everything.
    let mut tasks = Vec::new();
    for (p, (session, mut events)) in recipients.into_iter().enumerate() {
        let totals = totals.clone();
        let expected = expected_of(p);
        tasks.push(tokio::spawn(async move {
            let handle = session.handle();
            let deadline = tokio::time::Instant::from(started + duration + grace);
            let mut got = 0;
            while got < expected {
                let Ok(Some(event)) = tokio::time::timeout_at(deadline, events.recv()).await else { break };
                let Event::Frame(frame) = event else { break };
                if let Some(LogEvent::Entry(e)) = log_event(&frame) {
                    if let Some(Body::Message(m)) = &e.body
                        && let Some(sent) = read_stamp(&m.payload)
                    {
                        got += 1;
                        let mut t = totals.lock().unwrap_or_else(|p| p.into_inner());
                        t.delivered_after(started.elapsed().saturating_sub(sent));
                    }
                    let _ = handle.ack(e.seq).await;
                }
            }
            drop(session);
        }));
    }

    // Senders: schedule sends open-loop; a receipt task per sender.
    for (p, (session, mut events)) in senders.into_iter().enumerate() {
        let expected = expected_of(p);
        let to = manifest.accounts[2 * p + 1].phone.clone();
        let handle: SessionHandle = session.handle();
        let intended: Arc<Mutex<Pending>> = Arc::default();
        {
            let (totals, intended, handle) = (totals.clone(), intended.clone(), handle.clone());
            tasks.push(tokio::spawn(async move {
                let deadline = tokio::time::Instant::from(started + duration + grace);
                while intended.lock().unwrap_or_else(|p| p.into_inner()).receipted < expected {
                    // Short waits, so an ack that settles the count is noticed.
                    let next = tokio::time::timeout(Duration::from_millis(100), events.recv()).await;
                    if tokio::time::Instant::now() >= deadline {
                        break;
                    }
                    let event = match next {
                        Err(_) => continue,
                        Ok(None) => break,
                        Ok(Some(event)) => event,
                    };
                    let Event::Frame(frame) = event else { break };
                    let Some(LogEvent::Entry(e)) = log_event(&frame) else { continue };
                    if let Some(Body::Receipt(r)) = &e.body
                        && r.kind == ReceiptKind::Delivered as i32
                    {
                        let now = started.elapsed();
                        let mut pending = intended.lock().unwrap_or_else(|p| p.into_inner());
                        pending.highest_receipt = pending.highest_receipt.max(r.up_to_seq);
                        let done: Vec<u64> = pending.waiting.keys().copied().filter(|s| *s <= r.up_to_seq).collect();
                        let mut t = totals.lock().unwrap_or_else(|p| p.into_inner());
                        for seq in done {
                            if let Some(sent) = pending.waiting.remove(&seq) {
                                pending.receipted += 1;
                                t.receipted_after(now.saturating_sub(sent));
                            }
                        }
                    }
                    let _ = handle.ack(e.seq).await;
                }
                drop(session);
            }));
        }
        let (totals, run) = (totals.clone(), run.clone());
        let offset = offset_of(p);
        tasks.push(tokio::spawn(async move {
            let mut k: u32 = 0;
            loop {
                let at = offset + interval * k;
                if at >= duration {
                    break;
                }
                pace(started + at).await;
                k += 1;
                let (handle, totals, intended, to) = (handle.clone(), totals.clone(), intended.clone(), to.clone());
                let client_id = format!("{run}-{}", at.as_micros());
                totals.lock().unwrap_or_else(|p| p.into_inner()).sent += 1;
                tokio::spawn(async move {
                    match handle.send(&to, &client_id, stamp(at, payload)).await {
                        Ok(ack) => {
                            let seq = ack.id.map(|i| i.seq).unwrap_or(0);
                            let now = started.elapsed();
                            let mut pending = intended.lock().unwrap_or_else(|p| p.into_inner());
                            let mut t = totals.lock().unwrap_or_else(|p| p.into_inner());
                            t.acked_after(now.saturating_sub(at));
                            if seq <= pending.highest_receipt {
                                // The receipt overtook this ack.
                                pending.receipted += 1;
                                t.receipted_after(now.saturating_sub(at));
                            } else {
                                pending.waiting.insert(seq, at);
                            }
                        }
                        Err(_) => totals.lock().unwrap_or_else(|p| p.into_inner()).errors += 1,
                    }
                });
            }
        }));
    }
    let ticker = {
        let totals = totals.clone();
        tokio::spawn(async move {
            let expected = (rate * seconds) as u64;
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let done = totals.lock().unwrap_or_else(|p| p.into_inner()).delivered;
                progress("chat (delivered)", done.min(expected), expected);
                if done >= expected {
                    break;
                }
            }
        })
    };
    for t in tasks {
        let _ = t.await;
    }
    ticker.abort();
    totals.lock().unwrap_or_else(|p| p.into_inner()).report("chat", pairs, rate, seconds)
}

// ---------------------------------------------------------------- mesh

/// What one user of `mesh` sent and still waits to see receipted.
#[derive(Default)]
struct MeshPending {
    /// Its sequence → (intended send time, recipient account).
    waiting: HashMap<u64, (Duration, u64)>,
    /// The highest of its sequences each recipient's receipt covered so far.
    receipted_by: HashMap<u64, u64>,
}

/// The recipient of message `k` of user `user`: another of the `users`,
/// chosen at random (a fixed hash of both, so runs repeat), never itself.
fn mesh_peer(user: usize, k: u64, users: usize) -> usize {
    let mut x = ((user as u64) << 32 ^ k).wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 31;
    (user + 1 + (x % (users as u64 - 1)) as usize) % users
}

/// Open-loop 1:1 traffic among `users` online users, each message from one
/// of them to another chosen at random: every user sends and receives (as
/// in a messenger, and as tsung's `destination="online"` does), where
/// `chat` has fixed sender → recipient pairs. The rate is spread evenly
/// over the users; each acknowledges what it is sent, and its delivery
/// receipts are matched per recipient.
pub async fn mesh(
    target: &Target,
    manifest: &Manifest,
    users: usize,
    rate: f64,
    seconds: f64,
    payload: usize,
) -> ChatReport {
    let totals = Arc::new(Mutex::new(ChatTotals::default()));
    let mut sessions = Vec::new();
    for i in 0..users {
        sessions.push(open(target, manifest, i).await.expect("user connects"));
    }
    let run = run_id();
    let started = Instant::now();
    let duration = Duration::from_secs_f64(seconds);
    let deadline = tokio::time::Instant::from(started + duration + Duration::from_secs(10));
    let interval = Duration::from_secs_f64(users.max(1) as f64 / rate.max(1e-3));
    // Set once everything sent was delivered and receipted.
    let (finish, finished) = tokio::sync::watch::channel(false);
    let sending_done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    // Every reader runs before the first message is sent: a message to a
    // user whose reader did not exist yet would wait in its channel, and
    // the load tool's lateness would count as the server's.
    let mut users_sending = Vec::with_capacity(users);
    for (u, (session, mut events)) in sessions.into_iter().enumerate() {
        let handle: SessionHandle = session.handle();
        let me = manifest.accounts[u].account_id;
        let pending: Arc<Mutex<MeshPending>> = Arc::default();
        users_sending.push((handle.clone(), pending.clone()));
        // Reader: messages in (timed to delivery, acknowledged), receipts
        // for this user's own messages.
        {
            let (totals, pending, handle, mut finished) =
                (totals.clone(), pending.clone(), handle.clone(), finished.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let event = tokio::select! {
                        _ = finished.wait_for(|done| *done) => break,
                        _ = tokio::time::sleep_until(deadline) => break,
                        event = events.recv() => event,
                    };
                    let Some(Event::Frame(frame)) = event else { break };
                    let Some(LogEvent::Entry(e)) = log_event(&frame) else { continue };
                    let now = started.elapsed();
                    match &e.body {
                        // Only messages from others: a server that sends
                        // the sender's own message back to it is not
                        // credited with a delivery for it.
                        Some(Body::Message(m)) if m.id.is_some_and(|id| id.sender != me) => {
                            if let Some(sent) = read_stamp(&m.payload) {
                                let mut t = totals.lock().unwrap_or_else(|p| p.into_inner());
                                t.delivered_after(now.saturating_sub(sent));
                            }
                        }
                        Some(Body::Receipt(r)) if r.kind == ReceiptKind::Delivered as i32 => {
                            let mut pending = pending.lock().unwrap_or_else(|p| p.into_inner());
                            let mark = pending.receipted_by.entry(r.peer).or_default();
                            *mark = (*mark).max(r.up_to_seq);
                            let done: Vec<u64> = pending
                                .waiting
                                .iter()
                                .filter(|(seq, (_, to))| *to == r.peer && **seq <= r.up_to_seq)
                                .map(|(seq, _)| *seq)
                                .collect();
                            let mut t = totals.lock().unwrap_or_else(|p| p.into_inner());
                            for seq in done {
                                if let Some((sent, _)) = pending.waiting.remove(&seq) {
                                    t.receipted_after(now.saturating_sub(sent));
                                }
                            }
                        }
                        _ => {}
                    }
                    let _ = handle.ack(e.seq).await;
                }
                drop(session);
            }));
        }
    }
    // One list of peers for every sender (a copy each was 2,000 × 2,000
    // phone numbers before the first send).
    let peers: Arc<[(String, u64)]> =
        manifest.accounts[..users].iter().map(|a| (a.phone.clone(), a.account_id)).collect();
    for (u, (handle, pending)) in users_sending.into_iter().enumerate() {
        // Sender: message k at offset + k × interval, to a random other user.
        let (totals, run, sending_done, peers) = (totals.clone(), run.clone(), sending_done.clone(), peers.clone());
        let offset = interval.mul_f64(u as f64 / users.max(1) as f64);
        tasks.push(tokio::spawn(async move {
            let mut k: u64 = 0;
            let mut in_flight = Vec::new();
            loop {
                let at = offset + interval * k as u32;
                if at >= duration {
                    break;
                }
                pace(started + at).await;
                let (phone, account) = peers[mesh_peer(u, k, peers.len())].clone();
                k += 1;
                let (handle, totals, pending) = (handle.clone(), totals.clone(), pending.clone());
                let client_id = format!("{run}-{u}-{k}");
                totals.lock().unwrap_or_else(|p| p.into_inner()).sent += 1;
                in_flight.push(tokio::spawn(async move {
                    match handle.send(&phone, &client_id, stamp(at, payload)).await {
                        Ok(ack) => {
                            let seq = ack.id.map(|i| i.seq).unwrap_or(0);
                            let now = started.elapsed();
                            let mut pending = pending.lock().unwrap_or_else(|p| p.into_inner());
                            let mut t = totals.lock().unwrap_or_else(|p| p.into_inner());
                            t.acked_after(now.saturating_sub(at));
                            if pending.receipted_by.get(&account).is_some_and(|m| seq <= *m) {
                                // The receipt overtook this ack.
                                t.receipted_after(now.saturating_sub(at));
                            } else {
                                pending.waiting.insert(seq, (at, account));
                            }
                        }
                        Err(_) => totals.lock().unwrap_or_else(|p| p.into_inner()).errors += 1,
                    }
                }));
            }
            for send in in_flight {
                let _ = send.await;
            }
            sending_done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }));
    }
    // Ends the readers once every user has sent everything, and everything
    // acknowledged was delivered and receipted (or at the deadline).
    let watcher = {
        let (totals, sending_done) = (totals.clone(), sending_done.clone());
        tokio::spawn(async move {
            let expected = (rate * seconds) as u64;
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let settled = {
                    let t = totals.lock().unwrap_or_else(|p| p.into_inner());
                    progress("mesh (delivered)", t.delivered.min(expected), expected);
                    t.delivered >= t.acked && t.receipted >= t.acked
                };
                let all_sent = sending_done.load(std::sync::atomic::Ordering::SeqCst) == users;
                if all_sent && settled {
                    let _ = finish.send(true);
                    break;
                }
            }
        })
    };
    for t in tasks {
        let _ = t.await;
    }
    watcher.abort();
    totals.lock().unwrap_or_else(|p| p.into_inner()).report("mesh", users / 2, rate, seconds)
}

// ---------------------------------------------------------------- backlog

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BacklogReport {
    pub scenario: String,
    pub users: usize,
    pub messages: u64,
    /// Sending to offline users until every message was acknowledged (durable).
    pub store_seconds: f64,
    pub stored_per_second: f64,
    /// From the users connecting until each has every message.
    pub drain_seconds: f64,
    pub drained_per_second: f64,
    pub received: u64,
    pub duplicates: u64,
}

/// `users` offline users get `per_user` messages each (from the accounts
/// after them, one sender per user); then all of them connect at once and
/// drain their backlogs.
pub async fn backlog(target: &Target, manifest: &Manifest, users: usize, per_user: usize) -> BacklogReport {
    const IN_FLIGHT: usize = 64;
    let total = (users * per_user) as u64;
    let run = run_id();
    // Senders connect first, all at once; the clock starts when they are in,
    // so the store rate is not diluted by the load tool's own connecting.
    let mut connecting = Vec::with_capacity(users);
    for u in 0..users {
        let (target, identity) = (target.clone(), manifest.identity(users + u, &target.http_base));
        connecting.push(tokio::spawn(async move { open_as(&target, &identity, users + u).await }));
    }
    let mut connected = Vec::with_capacity(users);
    for c in connecting {
        connected.push(c.await.expect("connect task").expect("sender connects"));
    }
    let started = Instant::now();
    let mut senders = Vec::new();
    for (u, (session, events)) in connected.into_iter().enumerate() {
        let to = manifest.accounts[u].phone.clone();
        let run = run.clone();
        senders.push(tokio::spawn(async move {
            let handle = session.handle();
            let permits = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
            let mut sends = Vec::new();
            for i in 0..per_user {
                let permit = permits.clone().acquire_owned().await.expect("semaphore open");
                let (handle, to, client_id) = (handle.clone(), to.clone(), format!("{run}-b{i}"));
                sends.push(tokio::spawn(async move {
                    let ok = handle.send(&to, &client_id, vec![b'x'; 64]).await.is_ok();
                    drop(permit);
                    ok
                }));
            }
            for s in sends {
                let _ = s.await;
            }
            drop((session, events));
        }));
    }
    for s in senders {
        let _ = s.await;
    }
    let store_seconds = started.elapsed().as_secs_f64();
    eprintln!("stored {total} messages for {users} offline users in {store_seconds:.2} s");

    let drain_started = Instant::now();
    let received = Arc::new(Mutex::new((0u64, 0u64)));
    let mut readers = Vec::new();
    for u in 0..users {
        let (target, identity, received) = (target.clone(), manifest.identity(u, &target.http_base), received.clone());
        readers.push(tokio::spawn(async move {
            let (session, mut events) = open_as(&target, &identity, u).await.expect("user connects");
            let handle = session.handle();
            let mut seen = std::collections::HashSet::new();
            while seen.len() < per_user {
                let Ok(Some(Event::Frame(frame))) = tokio::time::timeout(Duration::from_secs(60), events.recv()).await
                else {
                    break;
                };
                if let Some(LogEvent::Entry(e)) = log_event(&frame) {
                    if matches!(e.body, Some(Body::Message(_))) {
                        let mut r = received.lock().unwrap_or_else(|p| p.into_inner());
                        if seen.insert(e.seq) {
                            r.0 += 1;
                        } else {
                            r.1 += 1;
                        }
                    }
                    let _ = handle.ack(e.seq).await;
                }
            }
        }));
    }
    for r in readers {
        let _ = r.await;
    }
    let drain_seconds = drain_started.elapsed().as_secs_f64();
    let (got, dupes) = *received.lock().unwrap_or_else(|p| p.into_inner());
    BacklogReport {
        scenario: "backlog".into(),
        users,
        messages: total,
        store_seconds,
        stored_per_second: total as f64 / store_seconds,
        drain_seconds,
        drained_per_second: got as f64 / drain_seconds,
        received: got,
        duplicates: dupes,
    }
}

/// The `q` quantile of `all` clients' times when only those in `sorted`
/// have one: if fewer than that share came back, the figure is missing
/// (NaN), not a quantile of the ones that did.
fn quantile_of_all(sorted: &[f64], all: usize, q: f64) -> f64 {
    let rank = ((all as f64 * q).ceil() as usize).max(1);
    sorted.get(rank - 1).copied().unwrap_or(f64::NAN)
}

// ---------------------------------------------------------------- storm

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StormReport {
    pub scenario: String,
    pub clients: usize,
    /// From the kill until 99% (and all) of the clients were connected and
    /// authenticated again.
    pub reconnect_99_seconds: f64,
    pub reconnect_all_seconds: f64,
    pub reconnected: usize,
    /// Messages acknowledged to senders during the run.
    pub acked: u64,
    /// Acknowledged but never received (must be 0).
    pub lost: u64,
    /// Client ids shown twice under different message ids (must be 0).
    pub duplicated: u64,
    /// Entries delivered again on the wire (at least once) and dropped by id.
    pub redelivered: u64,
}

/// `clients` reconnecting clients; pairs exchange a message every 50 ms
/// (resent with the same client id until acknowledged). After `settle`,
/// `restart` kills and restarts the server; the report says how fast the
/// clients came back and whether any acknowledged message was lost.
pub async fn storm<R, F>(target: &Target, manifest: &Manifest, clients: usize, restart: R) -> StormReport
where
    R: FnOnce() -> F,
    F: std::future::Future<Output = ()>,
{
    use skylark_client::backoff::Backoff;
    use skylark_client::client::{Client, ClientEvent};
    let run = run_id();
    let connected_at: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; clients]));
    let killed_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let acked: Arc<Mutex<HashMap<String, (u64, u64)>>> = Arc::default();
    let shown: Arc<Mutex<HashMap<String, std::collections::HashSet<u64>>>> = Arc::default();
    let redelivered = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let mut handles = Vec::new();
    let mut clients_kept = Vec::with_capacity(clients);
    for i in 0..clients {
        let identity = manifest.identity(i, &target.http_base);
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let (client, mut events) = Client::start_from(target.endpoint.clone(), identity, backoff, target.source(i));
        let client = Arc::new(client);
        let (connected_at, killed_at, shown, redelivered, ready_tx) =
            (connected_at.clone(), killed_at.clone(), shown.clone(), redelivered.clone(), ready_tx.clone());
        let reader = client.clone();
        handles.push(tokio::spawn(async move {
            let mut seen = std::collections::HashSet::new();
            while let Some(event) = events.recv().await {
                match event {
                    ClientEvent::Connected(_) => {
                        let after_kill = killed_at.lock().unwrap_or_else(|p| p.into_inner()).is_some();
                        let mut c = connected_at.lock().unwrap_or_else(|p| p.into_inner());
                        if after_kill && c[i].is_none() {
                            c[i] = Some(Instant::now());
                        }
                        let _ = ready_tx.send(i);
                    }
                    ClientEvent::Frame(frame) => {
                        if let Some(LogEvent::Entry(e)) = log_event(&frame) {
                            if let Some(Body::Message(m)) = &e.body {
                                let id = m.id.unwrap_or_default();
                                if !seen.insert((id.sender, id.seq)) {
                                    redelivered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                }
                                if m.client_id.starts_with("storm-") {
                                    shown
                                        .lock()
                                        .unwrap_or_else(|p| p.into_inner())
                                        .entry(m.client_id.clone())
                                        .or_default()
                                        .insert(id.seq);
                                }
                            }
                            if let Ok(h) = reader.connected().await {
                                let _ = h.ack(e.seq).await;
                            }
                        }
                    }
                    ClientEvent::Disconnected { .. } => {}
                    ClientEvent::Stopped(_) => break,
                }
            }
        }));
        // Even clients send to the next one.
        if i % 2 == 0 && i + 1 < clients {
            let (to, acked, stop, run, client) =
                (manifest.accounts[i + 1].phone.clone(), acked.clone(), stop.clone(), run.clone(), client.clone());
            handles.push(tokio::spawn(async move {
                let mut k = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let client_id = format!("storm-{run}-{i}-{k}");
                    loop {
                        let Ok(h) = client.connected().await else { return };
                        if let Ok(ack) = h.send(&to, &client_id, vec![b's'; 32]).await {
                            let id = ack.id.unwrap_or_default();
                            acked
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert(client_id.clone(), (id.sender, id.seq));
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    k += 1;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }));
        }
        clients_kept.push(client);
    }
    drop(ready_tx);
    // Everyone connected once.
    let mut ready = std::collections::HashSet::new();
    while ready.len() < clients {
        match tokio::time::timeout(Duration::from_secs(60), ready_rx.recv()).await {
            Ok(Some(i)) => {
                ready.insert(i);
            }
            _ => break,
        }
    }
    tokio::time::sleep(Duration::from_secs(1)).await;

    *killed_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    let kill = Instant::now();
    restart().await;
    // Wait until all are back (or a minute passed).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let back = connected_at.lock().unwrap_or_else(|p| p.into_inner()).iter().filter(|c| c.is_some()).count();
        progress("reconnected", back as u64, clients as u64);
        if back == clients || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut times: Vec<f64> = connected_at
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .filter_map(|c| c.map(|t| t.duration_since(kill).as_secs_f64()))
        .collect();
    times.sort_by(f64::total_cmp);
    let at = |q: f64| quantile_of_all(&times, clients, q);

    // A little more traffic after the restart, then check the ledger.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ledger_deadline = Instant::now() + Duration::from_secs(30);
    let (lost, duplicated, acked_count) = loop {
        let acked = acked.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let shown = shown.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let lost = acked.keys().filter(|c| !shown.contains_key(*c)).count() as u64;
        let duplicated = shown.values().filter(|ids| ids.len() > 1).count() as u64;
        if lost == 0 || Instant::now() > ledger_deadline {
            break (lost, duplicated, acked.len() as u64);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for client in &clients_kept {
        client.cancel();
    }
    for h in handles {
        h.abort();
    }
    StormReport {
        scenario: "storm".into(),
        clients,
        reconnect_99_seconds: at(0.99),
        reconnect_all_seconds: at(1.0),
        reconnected: times.len(),
        acked: acked_count,
        lost,
        duplicated,
        redelivered: redelivered.load(std::sync::atomic::Ordering::Relaxed),
    }
}

// ---------------------------------------------------------------- failover

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FailoverReport {
    pub scenario: String,
    pub clients: usize,
    /// Clients whose connection ended after the kill: those connected to
    /// the killed node, and those elsewhere whose account's actor lived
    /// there (their stream ends when the node leaves the membership).
    pub dropped: usize,
    /// Of those, how many were back and serving before the run ended.
    pub back: usize,
    /// From the kill until half (99%, all) of the dropped clients were
    /// back: reconnected to a live node, with a message they sent
    /// acknowledged (their account's actor serves again). NaN: never.
    pub back_50_seconds: f64,
    pub back_99_seconds: f64,
    pub back_all_seconds: f64,
    /// Connections that ended (or connects that failed) after the kill,
    /// before their client was back: refused while the killed node's lease
    /// ran, and the like.
    pub failed_attempts: u64,
    /// Every dropped client's time back, sorted (to merge the reports of
    /// several load processes).
    pub back_seconds: Vec<f64>,
}

/// `clients` reconnecting clients (accounts `offset..offset + clients`)
/// spread over a cluster's nodes by the target's endpoint list. Once every
/// one is connected, `killed` is awaited: it tells the caller to kill a
/// node and resolves with the moment of the kill (a wall-clock time, so
/// several load processes can share it). Each client whose connection then
/// ends sends one message (to the next account) as soon as it is connected
/// again, until it is acknowledged; the report says how long after the kill
/// the dropped clients were back. The run lasts at least `settle` after the
/// kill, so the clients dropped only when the node left the membership are
/// counted, and at most two minutes. Clients start at `rate` per second.
pub async fn failover<K, F>(
    target: &Target,
    manifest: &Manifest,
    (offset, clients, rate): (usize, usize, f64),
    settle: Duration,
    killed: K,
) -> FailoverReport
where
    K: FnOnce() -> F,
    F: std::future::Future<Output = SystemTime>,
{
    use skylark_client::backoff::Backoff;
    use skylark_client::client::{Client, ClientEvent};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let run = run_id();
    let armed = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    // Per client: when its connection first ended after the kill, and when
    // it was back.
    let dropped: Arc<Mutex<Vec<Option<SystemTime>>>> = Arc::new(Mutex::new(vec![None; clients]));
    let back: Arc<Mutex<Vec<Option<SystemTime>>>> = Arc::new(Mutex::new(vec![None; clients]));
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let mut handles = Vec::with_capacity(clients);
    let mut kept = Vec::with_capacity(clients);
    let ramp = Instant::now();
    for i in 0..clients {
        pace(ramp + Duration::from_secs_f64(i as f64 / rate.max(1.0))).await;
        let index = offset + i;
        let identity = manifest.identity(index, &target.http_base);
        let to = manifest.accounts[offset + (i + 1) % clients].phone.clone();
        let backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let (client, mut events) = Client::start_from(target.endpoint.clone(), identity, backoff, target.source(index));
        let client = Arc::new(client);
        let (armed, failed, dropped, back, ready_tx, run) =
            (armed.clone(), failed.clone(), dropped.clone(), back.clone(), ready_tx.clone(), run.clone());
        let prober = client.clone();
        handles.push(tokio::spawn(async move {
            let client_id = format!("failover-{run}-{index}");
            let mut was_ready = false;
            let mut probe: Option<tokio::task::JoinHandle<()>> = None;
            while let Some(event) = events.recv().await {
                match event {
                    ClientEvent::Connected(_) if !was_ready => {
                        was_ready = true;
                        let _ = ready_tx.send(i);
                    }
                    ClientEvent::Disconnected { .. } if armed.load(Ordering::Relaxed) => {
                        if probe.is_some() {
                            if back.lock().unwrap_or_else(std::sync::PoisonError::into_inner)[i].is_none() {
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                            continue;
                        }
                        dropped.lock().unwrap_or_else(std::sync::PoisonError::into_inner)[i] = Some(SystemTime::now());
                        // Probe: one message, resent under the same client id
                        // until it is answered, which it is once the client
                        // is connected again and its account's actor serves
                        // again (a refusal: its node is not known to be gone
                        // yet).
                        let (prober, to, client_id, back) =
                            (prober.clone(), to.clone(), client_id.clone(), back.clone());
                        probe = Some(tokio::spawn(async move {
                            loop {
                                let Ok(h) = prober.connected().await else { return };
                                if h.send(&to, &client_id, vec![b'f'; 32]).await.is_ok() {
                                    back.lock().unwrap_or_else(std::sync::PoisonError::into_inner)[i] =
                                        Some(SystemTime::now());
                                    return;
                                }
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                        }));
                    }
                    ClientEvent::Stopped(_) => break,
                    _ => {}
                }
            }
            if let Some(probe) = probe {
                probe.abort();
            }
        }));
        kept.push(client);
    }
    drop(ready_tx);
    let mut ready = 0;
    while ready < clients {
        match tokio::time::timeout(Duration::from_secs(120), ready_rx.recv()).await {
            Ok(Some(_)) => {
                ready += 1;
                if ready % 500 == 0 {
                    progress("connected", ready as u64, clients as u64);
                }
            }
            _ => break,
        }
    }
    progress("connected", ready as u64, clients as u64);
    armed.store(true, Ordering::Relaxed);
    let kill = killed().await;
    let started = Instant::now();
    loop {
        let down = dropped.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter().flatten().count();
        let up = back.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter().flatten().count();
        progress("back", up as u64, down.max(1) as u64);
        let waited = started.elapsed();
        if (waited >= settle && up == down) || waited > Duration::from_secs(120) {
            eprintln!();
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let dropped_count = dropped.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter().flatten().count();
    let mut times: Vec<f64> = back
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .flatten()
        .map(|t| t.duration_since(kill).unwrap_or_default().as_secs_f64())
        .collect();
    times.sort_by(f64::total_cmp);
    let at = |q: f64| quantile_of_all(&times, dropped_count, q);
    for client in &kept {
        client.cancel();
    }
    for h in handles {
        h.abort();
    }
    FailoverReport {
        scenario: "failover".into(),
        clients,
        dropped: dropped_count,
        back: times.len(),
        back_50_seconds: at(0.5),
        back_99_seconds: at(0.99),
        back_all_seconds: at(1.0),
        failed_attempts: failed.load(std::sync::atomic::Ordering::Relaxed),
        back_seconds: times,
    }
}

// ---------------------------------------------------------------- group

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupReport {
    pub scenario: String,
    pub members: usize,
    pub messages: u64,
    pub target_rate: f64,
    pub acked: u64,
    /// Group messages received by member devices (every member, the
    /// author's own device included, gets every post).
    pub deliveries: u64,
    pub duplicates: u64,
    /// Deliveries expected but not seen before the deadline.
    pub missing: u64,
    /// From the first post to the last delivery.
    pub seconds: f64,
    pub deliveries_per_second: f64,
    /// Intended post time → the group acknowledged it (durable in its log).
    pub post_to_ack: Summary,
    /// Intended post time → one member device has it (every delivery).
    pub post_to_device: Summary,
    /// Intended post time → the last member device has it (one per post).
    pub post_to_last_device: Summary,
}

#[derive(Default)]
struct Arrivals {
    /// Post (group sequence) → (devices that have it, latest arrival).
    per_post: HashMap<u64, (u64, Duration)>,
    latency: Latency,
    duplicates: u64,
    /// The latest arrival, since the first post.
    last: Duration,
}

/// Fan-out: accounts `0..members` connect; the first creates a group of all
/// of them; then `messages` posts go to it open-loop at `rate` per second,
/// from the first `senders` members in turn. Every member device records
/// when each post reached it.
pub async fn group(
    target: &Target,
    manifest: &Manifest,
    members: usize,
    senders: usize,
    messages: u64,
    rate: f64,
    payload: usize,
) -> GroupReport {
    let mut sessions = Vec::with_capacity(members);
    for m in 0..members {
        sessions.push(open(target, manifest, m).await.expect("member connects"));
        progress("group (connecting)", m as u64 + 1, members as u64);
    }
    let phones: Vec<&str> = manifest.accounts[1..members].iter().map(|a| a.phone.as_str()).collect();
    let admin = sessions[0].0.handle();
    let info = admin.create_group("load", &phones).await.expect("group created");
    let group = info.id;
    eprintln!("group {group} with {} members created", info.members.len());

    // Every member: wait for the creation, then record each post's arrival.
    let run = run_id();
    let started = Arc::new(Mutex::new(None::<Instant>));
    let arrivals: Arc<Mutex<Arrivals>> = Arc::default();
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let mut readers = Vec::new();
    let mut handles = Vec::new();
    for (session, mut events) in sessions {
        let handle = session.handle();
        handles.push(handle.clone());
        let (started, arrivals, ready_tx) = (started.clone(), arrivals.clone(), ready_tx.clone());
        readers.push(tokio::spawn(async move {
            let mut seen = std::collections::HashSet::new();
            let mut ready = false;
            while (seen.len() as u64) < messages {
                let Ok(Some(Event::Frame(frame))) = tokio::time::timeout(Duration::from_secs(30), events.recv()).await
                else {
                    break;
                };
                let Some(LogEvent::Entry(e)) = log_event(&frame) else { continue };
                if let Some(Body::Group(g)) = &e.body
                    && g.group == group
                {
                    match &g.body {
                        Some(skylark_protocol::v1::group_event::Body::Created(_)) if !ready => {
                            ready = true;
                            let _ = ready_tx.send(());
                        }
                        Some(skylark_protocol::v1::group_event::Body::Message(m)) => {
                            let start = *started.lock().unwrap_or_else(|p| p.into_inner());
                            if let (Some(start), Some(at)) = (start, read_stamp(&m.payload)) {
                                let now = start.elapsed();
                                let latency = now.saturating_sub(at);
                                let mut a = arrivals.lock().unwrap_or_else(|p| p.into_inner());
                                if seen.insert(g.group_seq) {
                                    let entry = a.per_post.entry(g.group_seq).or_insert((0, Duration::ZERO));
                                    entry.0 += 1;
                                    entry.1 = entry.1.max(latency);
                                    a.latency.record(latency);
                                    a.last = a.last.max(now);
                                } else {
                                    a.duplicates += 1;
                                }
                            }
                        }
                        _ => {}
                    }
                }
                let _ = handle.ack(e.seq).await;
            }
            drop(session);
        }));
    }
    drop(ready_tx);
    for m in 0..members {
        if ready_rx.recv().await.is_none() {
            eprintln!("only {m} members saw the group's creation");
            break;
        }
    }

    // Posts, open loop.
    let begun = Instant::now();
    *started.lock().unwrap_or_else(|p| p.into_inner()) = Some(begun);
    let interval = Duration::from_secs_f64(1.0 / rate.max(1e-3));
    let acks: Arc<Mutex<(u64, Latency)>> = Arc::default();
    let mut posts = Vec::new();
    for k in 0..messages {
        let at = interval.mul_f64(k as f64);
        pace(begun + at).await;
        let handle = handles[(k as usize) % senders.clamp(1, members)].clone();
        let (acks, client_id) = (acks.clone(), format!("{run}-g{k}"));
        posts.push(tokio::spawn(async move {
            if handle.send_to_group(group, &client_id, stamp(at, payload)).await.is_ok() {
                let mut a = acks.lock().unwrap_or_else(|p| p.into_inner());
                a.0 += 1;
                a.1.record(begun.elapsed().saturating_sub(at));
            }
        }));
    }
    let ticker = {
        let arrivals = arrivals.clone();
        let expected = messages * members as u64;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                let done: u64 = arrivals.lock().unwrap_or_else(|p| p.into_inner()).per_post.values().map(|v| v.0).sum();
                progress("group (deliveries)", done.min(expected), expected);
            }
        })
    };
    for p in posts {
        let _ = p.await;
    }
    for r in readers {
        let _ = r.await;
    }
    ticker.abort();
    let (acked, ack_latency) = {
        let a = acks.lock().unwrap_or_else(|p| p.into_inner());
        (a.0, a.1.summary())
    };
    let a = arrivals.lock().unwrap_or_else(|p| p.into_inner());
    let deliveries: u64 = a.per_post.values().map(|v| v.0).sum();
    let mut to_last = Latency::default();
    for (count, latest) in a.per_post.values() {
        if *count == members as u64 {
            to_last.record(*latest);
        }
    }
    let seconds = a.last.as_secs_f64().max(1e-9);
    GroupReport {
        scenario: "group".into(),
        members,
        messages,
        target_rate: rate,
        acked,
        deliveries,
        duplicates: a.duplicates,
        missing: (messages * members as u64).saturating_sub(deliveries),
        seconds,
        deliveries_per_second: deliveries as f64 / seconds,
        post_to_ack: ack_latency,
        post_to_device: a.latency.summary(),
        post_to_last_device: to_last.summary(),
    }
}
