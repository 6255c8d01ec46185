//! Kill -9 the server (a separate process) again and again while clients
//! send — or its PostgreSQL, or fail PostgreSQL over to a standby — and
//! check with a ledger that no acknowledged message is lost, shown twice,
//! or reordered.

use axum::routing::post;
use skylark_client::api::Api;
use skylark_client::identity::generate_key;
use skylark_client::session::{Event, LogEvent, log_event};
use skylark_client::{Endpoint, Identity, Session};
use skylark_protocol::v1::event::Body;
use skylark_store::postgres::throwaway::{TestPostgres, USER};
use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Messages each account sends to its partner.
pub(crate) const MESSAGES_PER_SENDER: usize = 150;
/// How many times the server is killed.
const KILLS: usize = 6;
/// The whole test gives up (and fails) after this.
pub(crate) const DEADLINE: Duration = Duration::from_secs(120);

/// A port nothing listens on, for a server (or NATS) started later and
/// perhaps restarted on it. Taken below the kernel's ephemeral range
/// (32768 and up here), so that no outgoing connection and no listener on
/// port 0 — of this test process or a parallel one — can take it between
/// this check and the bind; each test process starts at its own offset.
pub(crate) fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(u32::MAX, (std::process::id() * 97) % SPAN, Ordering::SeqCst, Ordering::SeqCst);
    for _ in 0..SPAN {
        let port = (FIRST + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between {FIRST} and {}", FIRST + SPAN)
}

pub(crate) struct ServerProcess {
    pub(crate) child: Child,
    pub(crate) stderr_log: PathBuf,
}

impl ServerProcess {
    /// Starts the real binary and waits for its "running" line.
    pub(crate) fn start(config: &Path, stderr_log: &Path) -> ServerProcess {
        let stderr = std::fs::OpenOptions::new().create(true).append(true).open(stderr_log).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_skylark"))
            .args(["serve", "--config"])
            .arg(config)
            // TEST_SERVER_LOG=debug (say) when a failure needs the servers' story.
            .env("SKYLARK_LOG", std::env::var("TEST_SERVER_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        if !line.contains("Skylark is running") {
            // Its own words, here: the log file goes with the test's temporary directory.
            let _ = child.wait();
            let said = std::fs::read_to_string(stderr_log).unwrap_or_default();
            let tail: Vec<&str> = said.lines().rev().take(30).collect::<Vec<_>>().into_iter().rev().collect();
            panic!("server did not start: {line:?}; its log ({}) ends:\n{}", stderr_log.display(), tail.join("\n"));
        }
        ServerProcess { child, stderr_log: stderr_log.to_owned() }
    }

    pub(crate) fn kill(mut self) {
        self.child.kill().unwrap(); // SIGKILL on Unix
        self.child.wait().unwrap();
    }
}

/// What one account's device saw and did.
#[derive(Default)]
pub(crate) struct Ledger {
    /// client id → (message seq) for every send the server acknowledged.
    acked: HashMap<String, u64>,
    /// Messages from the partner in the order the app showed them: (client id, sender seq).
    shown: Vec<(String, u64)>,
    /// Message ids seen, to drop redeliveries the way an app must.
    seen: HashSet<(u64, u64)>,
    redelivered: usize,
    reconnects: usize,
}

impl Ledger {
    pub(crate) fn acked_ids(&self) -> impl Iterator<Item = &str> {
        self.acked.keys().map(String::as_str)
    }
}

/// Connects to the first of `endpoints` that answers, trying each in turn
/// (the nodes of a cluster; one server otherwise).
pub(crate) async fn connect(endpoints: &[Endpoint], identity: &Identity) -> (Session, mpsc::Receiver<Event>) {
    let started = Instant::now();
    for endpoint in endpoints.iter().cycle() {
        match Session::open(endpoint, identity).await {
            Ok(pair) => return pair,
            Err(e) => {
                assert!(started.elapsed() < DEADLINE, "could not reconnect: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    unreachable!("no endpoints")
}

/// Takes every event already received; `false` if the session ended.
fn drain(events: &mut mpsc::Receiver<Event>, ledger: &mut Ledger, me: u64, acks: &mut Vec<u64>) -> bool {
    loop {
        match events.try_recv() {
            Ok(Event::Frame(frame)) => {
                if let Some(LogEvent::Entry(event)) = log_event(&frame) {
                    if let Some(Body::Message(m)) = &event.body {
                        let id = m.id.unwrap();
                        if id.sender != me {
                            if ledger.seen.insert((id.sender, id.seq)) {
                                ledger.shown.push((m.client_id.clone(), id.seq));
                            } else {
                                ledger.redelivered += 1;
                            }
                        }
                    }
                    acks.push(event.seq);
                }
            }
            Ok(Event::Closed { .. }) | Err(mpsc::error::TryRecvError::Disconnected) => return false,
            Err(mpsc::error::TryRecvError::Empty) => return true,
        }
    }
}

/// One account's device: sends its messages (resending the same client id
/// until acked, across reconnects) and shows what its partner sends.
pub(crate) async fn device(
    endpoints: Vec<Endpoint>,
    identity: Identity,
    partner_phone: String,
    expect: usize,
    ledger: Arc<Mutex<Ledger>>,
) {
    let me = identity.account_id;
    let started = Instant::now();
    let mut next = 0usize;
    'reconnect: loop {
        let (session, mut events) = connect(&endpoints, &identity).await;
        let handle = session.handle();
        loop {
            assert!(started.elapsed() < DEADLINE, "device {me} did not finish in time");
            let mut acks = Vec::new();
            let alive = drain(&mut events, &mut ledger.lock().unwrap(), me, &mut acks);
            if let Some(last) = acks.last() {
                let _ = handle.ack(*last).await;
            }
            if !alive {
                ledger.lock().unwrap().reconnects += 1;
                continue 'reconnect;
            }
            if next < MESSAGES_PER_SENDER {
                let client_id = format!("{me}-{next}");
                match handle.send(&partner_phone, &client_id, client_id.clone().into_bytes()).await {
                    Ok(ack) => {
                        ledger.lock().unwrap().acked.insert(client_id, ack.id.unwrap().seq);
                        next += 1;
                    }
                    Err(_) => {
                        ledger.lock().unwrap().reconnects += 1;
                        continue 'reconnect;
                    }
                }
            } else if ledger.lock().unwrap().shown.len() >= expect {
                session.close().await;
                return;
            } else {
                // Everything sent; wait for the partner's messages.
                match tokio::time::timeout(Duration::from_millis(200), events.recv()).await {
                    Ok(Some(Event::Frame(frame))) => {
                        // Put it back through the same bookkeeping.
                        let (tx, mut rx) = mpsc::channel(1);
                        tx.try_send(Event::Frame(frame)).unwrap();
                        drop(tx);
                        let mut acks = Vec::new();
                        drain(&mut rx, &mut ledger.lock().unwrap(), me, &mut acks);
                        if let Some(last) = acks.last() {
                            let _ = handle.ack(*last).await;
                        }
                    }
                    Ok(Some(Event::Closed { .. })) | Ok(None) => {
                        ledger.lock().unwrap().reconnects += 1;
                        continue 'reconnect;
                    }
                    Err(_) => {}
                }
            }
        }
    }
}

/// What is done to the system while the devices work, given the running
/// server (to kill and restart it, or leave it be).
pub(crate) type Chaos<'a> = Box<dyn FnMut(&mut Option<ServerProcess>) + Send + 'a>;

/// Kill -9 the server and start it again.
fn kill_the_server(config: PathBuf, log: PathBuf) -> Chaos<'static> {
    Box::new(move |server| {
        server.take().expect("the server runs").kill();
        *server = Some(ServerProcess::start(&config, &log));
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_traffic_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (config, log) = (dir.path().join("skylark.toml"), dir.path().join("server.log"));
    ledger_run(&dir, "", KILLS, kill_the_server(config, log)).await;
}

/// The same chaos with the server's data in PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_traffic_loses_nothing_on_postgres() {
    let pg = TestPostgres::start().unwrap_or_else(|e| panic!("{e}"));
    let url = pg.create_database("ledger").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (config, log) = (dir.path().join("skylark.toml"), dir.path().join("server.log"));
    ledger_run(&dir, &store_toml(&[url]), KILLS, kill_the_server(config, log)).await;
}

/// PostgreSQL's postmaster killed with SIGKILL under traffic and started
/// again: while it is down sends fail or wait (never an ack); the server
/// recovers by itself when it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_killed_under_traffic_loses_nothing() {
    let mut pg = TestPostgres::start().unwrap_or_else(|e| panic!("{e}"));
    let url = pg.create_database("ledger").unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Down for less, then for longer, than a send waits for the database
    // (acquire_timeout_ms): some sends wait it out, some fail and are resent.
    let mut down = [300, 1_800, 300].into_iter();
    let chaos: Chaos<'_> = Box::new(move |_server| {
        pg.kill();
        std::thread::sleep(Duration::from_millis(down.next().unwrap_or(300)));
        pg.restart().unwrap_or_else(|e| panic!("{e}"));
    });
    ledger_run(&dir, &store_toml(&[url]), KILLS / 2, chaos).await;
}

/// A primary with a synchronous standby; under traffic the primary is
/// killed with SIGKILL and the standby promoted. The server, given both
/// hosts with `target_session_attrs=read-write`, carries on there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_failover_under_traffic_loses_nothing() {
    let mut primary = TestPostgres::start().unwrap_or_else(|e| panic!("{e}"));
    primary.create_database("ledger").unwrap();
    let standby = primary.standby(true).unwrap_or_else(|e| panic!("{e}"));
    let url = format!(
        "postgres://{USER}@127.0.0.1:{},127.0.0.1:{}/ledger?target_session_attrs=read-write",
        primary.port(),
        standby.port()
    );
    let dir = tempfile::tempdir().unwrap();
    let chaos: Chaos<'_> = Box::new(move |_server| {
        primary.kill();
        std::thread::sleep(Duration::from_millis(300));
        standby.promote().unwrap_or_else(|e| panic!("{e}"));
    });
    ledger_run(&dir, &store_toml(&[url]), 1, chaos).await;
}

fn store_toml(shards: &[String]) -> String {
    format!("[store]\nshards = {shards:?}\nacquire_timeout_ms = 1000\n")
}

/// Four devices in two pairs send to each other while `chaos` strikes
/// `rounds` times, spread over the traffic (each when a further share of
/// the messages has been acknowledged); then the ledger: every
/// acknowledged message shown once, in order.
pub(crate) async fn ledger_run(dir: &tempfile::TempDir, store: &str, rounds: usize, chaos: Chaos<'_>) {
    ledger_run_in(dir, &dir.path().join("data"), store, rounds, chaos).await;
}

/// As [`ledger_run`], with the server's data in `data_dir`.
pub(crate) async fn ledger_run_in(
    dir: &tempfile::TempDir,
    data_dir: &Path,
    store: &str,
    rounds: usize,
    mut chaos: Chaos<'_>,
) {
    let (sms_addr, mut codes) = sms_gateway().await;

    let (http, tcp) = (free_port(), free_port());
    let config = dir.path().join("skylark.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[listen]\nhttp = \"127.0.0.1:{http}\"\ntcp = \"127.0.0.1:{tcp}\"\nadmin = \"127.0.0.1:0\"\n\
             [messaging]\nforward_retry_base_ms = 10\nforward_retry_max_ms = 200\n\
             [sms]\nprovider = \"http\"\nurl = \"http://{sms_addr}/sms\"\n{store}",
            data_dir
        ),
    )
    .unwrap();
    let log = dir.path().join("server.log");
    let mut server = Some(ServerProcess::start(&config, &log));

    // Four accounts in two pairs, each registered through the real API.
    let api = Api::new(&format!("http://127.0.0.1:{http}")).unwrap();
    let phones = ["+15550700001", "+15550700002", "+15550700003", "+15550700004"];
    let identities = register(&api, &phones, &mut codes).await;

    let ledgers: Vec<Arc<Mutex<Ledger>>> = (0..4).map(|_| Arc::new(Mutex::new(Ledger::default()))).collect();
    let mut devices = Vec::new();
    for (i, identity) in identities.iter().enumerate() {
        let partner = i ^ 1;
        let endpoint = if i % 2 == 0 {
            Endpoint::Tcp(format!("127.0.0.1:{tcp}"))
        } else {
            Endpoint::websocket_for(api.base(), false)
        };
        devices.push(tokio::spawn(device(
            vec![endpoint],
            identity.clone(),
            phones[partner].to_owned(),
            MESSAGES_PER_SENDER,
            ledgers[i].clone(),
        )));
    }

    // Chaos while they work.
    let total = 4 * MESSAGES_PER_SENDER;
    let acked = || ledgers.iter().map(|l| l.lock().unwrap().acked.len()).sum::<usize>();
    let mut acked_at_crashes = Vec::new();
    let started = Instant::now();
    for round in 0..rounds {
        let target = total * (round + 1) / (rounds + 2);
        while acked() < target {
            if started.elapsed() > DEADLINE {
                let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
                panic!(
                    "traffic stalled at {} of {total} acknowledged\n--- server log (tail) ---\n{}",
                    acked(),
                    &log[log.len().saturating_sub(4000)..]
                );
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        acked_at_crashes.push(acked());
        tokio::task::block_in_place(|| chaos(&mut server));
    }
    let kills = rounds;
    // Every crash struck while messages were still being sent.
    println!("acknowledged when each crash struck: {acked_at_crashes:?} of {total}");
    assert!(acked_at_crashes.iter().all(|n| *n < total), "{acked_at_crashes:?}");
    for d in devices {
        if let Err(e) = d.await {
            let log = std::fs::read_to_string(&server.as_ref().unwrap().stderr_log).unwrap_or_default();
            panic!("device failed: {e}\n--- server log (tail) ---\n{}", &log[log.len().saturating_sub(4000)..]);
        }
    }

    // What the store kept: the server restarted from it alone, each
    // account's own history holds every message it was told was accepted.
    server.take().unwrap().kill();
    server = Some(tokio::task::block_in_place(|| ServerProcess::start(&config, &log)));
    let mut not_stored = 0;
    for (i, identity) in identities.iter().enumerate() {
        let endpoint = Endpoint::Tcp(format!("127.0.0.1:{tcp}"));
        let (session, _events) = connect(&[endpoint], identity).await;
        let stored = stored_client_ids(&session.handle(), identity.account_id).await;
        not_stored += ledgers[i].lock().unwrap().acked.keys().filter(|c| !stored.contains(c.as_str())).count();
        session.close().await;
    }

    verdict(&ledgers, kills, not_stored);
    let endpoint = Endpoint::Tcp(format!("127.0.0.1:{tcp}"));
    receipts_complete(&identities, &ledgers, |_| vec![endpoint.clone()]).await;
    server.take().unwrap().kill();
}

/// Every message was delivered and acknowledged, so each sender's account
/// ends with the delivery receipt (✓✓) of its last message, whatever the
/// crashes lost on the way: a receipt is not stored at the recipient's
/// account, and one lost with the server's memory is made again when the
/// recipient's device is handed the entries again and acknowledges them.
/// The devices connect and acknowledge what they are handed until every
/// receipt is there.
pub(crate) async fn receipts_complete(
    identities: &[Identity],
    ledgers: &[Arc<Mutex<Ledger>>],
    endpoints: impl Fn(usize) -> Vec<Endpoint>,
) {
    let mut sessions = Vec::new();
    for (i, identity) in identities.iter().enumerate() {
        sessions.push(connect(&endpoints(i), identity).await);
    }
    let started = Instant::now();
    loop {
        let mut missing = Vec::new();
        for (i, (session, events)) in sessions.iter_mut().enumerate() {
            let mut acks = Vec::new();
            drain(events, &mut Ledger::default(), identities[i].account_id, &mut acks);
            if let Some(last) = acks.last() {
                session.handle().ack(*last).await.expect("ack");
            }
            let last_sent = ledgers[i].lock().unwrap().acked.values().copied().max().unwrap_or(0);
            let page = session.handle().history(0, 20).await.expect("history");
            let partner = identities[i ^ 1].account_id;
            let delivered = page.receipts.iter().find(|r| r.peer == partner).map_or(0, |r| r.delivered_up_to);
            if delivered < last_sent {
                missing.push(format!("account {i}: delivered up to {delivered} of {last_sent}"));
            }
        }
        if missing.is_empty() {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "delivery receipts missing: {missing:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (session, _) in sessions {
        session.close().await;
    }
}

/// A stand-in SMS gateway: the server POSTs codes here; they come out of
/// the receiver as (phone, code).
pub(crate) async fn sms_gateway() -> (std::net::SocketAddr, mpsc::UnboundedReceiver<(String, String)>) {
    let (codes_tx, codes) = mpsc::unbounded_channel::<(String, String)>();
    let app = axum::Router::new().route(
        "/sms",
        post(move |body: String| {
            let codes_tx = codes_tx.clone();
            async move {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap();
                codes_tx.send((v["to"].as_str().unwrap().into(), v["code"].as_str().unwrap().into())).unwrap();
                "ok"
            }
        }),
    );
    let sms_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sms_addr = sms_listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(sms_listener, app).await });
    (sms_addr, codes)
}

/// Registers each phone through the real API, with the code the SMS
/// gateway got.
pub(crate) async fn register(
    api: &Api,
    phones: &[&str],
    codes: &mut mpsc::UnboundedReceiver<(String, String)>,
) -> Vec<Identity> {
    let mut identities = Vec::new();
    for phone in phones.iter().copied() {
        let session = api.start_verification(phone).await.unwrap();
        let (to, code) = codes.recv().await.unwrap();
        assert_eq!(to, phone);
        let key = generate_key();
        let r = api.verify(&session.session_id, &code, &key.verifying_key().to_bytes(), "crash").await.unwrap();
        identities.push(Identity::new(api.base().into(), r.account_id, r.device_id, r.phone, &key));
    }
    identities
}

/// The ledger check over pairs of devices (`i` sends to `i ^ 1`): every
/// acknowledged message shown once, in order, and found in the store.
pub(crate) fn verdict(ledgers: &[Arc<Mutex<Ledger>>], kills: usize, not_stored: usize) {
    let (mut acked_total, mut lost, mut shown_twice, mut order_violations, mut redelivered, mut reconnects) =
        (0, 0, 0, 0, 0, 0);
    for (i, ledger) in ledgers.iter().enumerate() {
        let partner = ledgers[i ^ 1].lock().unwrap();
        let me = ledger.lock().unwrap();
        acked_total += partner.acked.len();
        redelivered += me.redelivered;
        reconnects += me.reconnects;
        let shown: HashMap<&str, usize> = me.shown.iter().fold(HashMap::new(), |mut m, (c, _)| {
            *m.entry(c.as_str()).or_default() += 1;
            m
        });
        lost += partner.acked.keys().filter(|c| !shown.contains_key(c.as_str())).count();
        shown_twice += shown.values().filter(|n| **n > 1).count();
        // Shown in the order sent: sender seqs and client-id numbers both increase.
        for pair in me.shown.windows(2) {
            let n = |c: &str| c.rsplit('-').next().unwrap().parse::<usize>().unwrap();
            if pair[1].1 <= pair[0].1 || n(&pair[1].0) <= n(&pair[0].0) {
                order_violations += 1;
            }
        }
    }
    println!(
        "crash test: {acked_total} messages acknowledged, {kills} crashes, {reconnects} reconnects; \
         acked-then-lost = {lost}, shown twice = {shown_twice}, order violations = {order_violations} \
         (redelivered on the wire and dropped by message id: {redelivered})"
    );
    assert_eq!(acked_total, ledgers.len() * MESSAGES_PER_SENDER);
    println!("acknowledged but missing from the restarted server's store: {not_stored}");
    assert_eq!((lost, not_stored, shown_twice, order_violations), (0, 0, 0, 0));
}

/// The client ids of every message `me` sent, from its stored history.
pub(crate) async fn stored_client_ids(handle: &skylark_client::session::SessionHandle, me: u64) -> HashSet<String> {
    let mut ids = HashSet::new();
    let mut before = 0;
    loop {
        let page = handle.history(before, 200).await.expect("history");
        for event in &page.events {
            if let Some(Body::Message(m)) = &event.body
                && m.id.is_some_and(|id| id.sender == me)
            {
                ids.insert(m.client_id.clone());
            }
        }
        match page.events.last() {
            Some(last) if page.has_more => before = last.seq,
            _ => return ids,
        }
    }
}
