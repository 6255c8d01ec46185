//! Cluster mode: three real `skylark serve` processes on 127.0.0.1–3
//! sharing a throwaway PostgreSQL and a throwaway NATS server (both started
//! here from the installed binaries), with devices of one conversation on
//! different nodes. The ledger of the crash tests judges every run: each
//! acknowledged message shown once, in order, and found in the store —
//! with a node killed, a node frozen past its lease, NATS or PostgreSQL
//! killed and started again.

use crate::crash::{
    DEADLINE, Ledger, MESSAGES_PER_SENDER, ServerProcess, connect, device, free_port, receipts_complete, register,
    sms_gateway, stored_client_ids, verdict,
};
use skylark_client::api::Api;
use skylark_client::session::Event;
use skylark_client::{Endpoint, Session};
use skylark_protocol::CloseCode;
use skylark_protocol::v1::{TypingState, server_frame::Body};
use skylark_store::postgres::throwaway::TestPostgres;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Heartbeats in the tests: a node that stops is out within about 4.5 s.
/// (Shorter leases lapsed on a loaded CI machine, where a heartbeat can
/// take over a second, and moved actors under the tests' feet.)
const LEASE_MS: u64 = 4_000;
const BEAT_MS: u64 = 500;

/// The body of a plain HTTP GET.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response.split_once("\r\n\r\n").map_or(String::new(), |(_, body)| body.to_owned())
}

/// A private nats-server on a port of its own (one of a NATS cluster, when
/// `routes` name the others).
struct TestNats {
    bin: PathBuf,
    port: u16,
    log: PathBuf,
    child: Option<Child>,
    /// `--cluster` and `--routes` arguments, for a member of a NATS cluster.
    routes: Vec<String>,
    /// The monitoring port (`/connz`).
    monitor: u16,
}

impl TestNats {
    /// `count` servers; more than one form a NATS cluster (full mesh).
    fn start_many(dir: &Path, count: usize) -> Vec<TestNats> {
        let bin = Self::binary();
        let cluster_ports: Vec<u16> = (0..count).map(|_| free_port()).collect();
        let mut servers: Vec<TestNats> = (0..count)
            .map(|i| {
                let routes = if count == 1 {
                    Vec::new()
                } else {
                    let others: Vec<String> = (0..count)
                        .filter(|k| *k != i)
                        .map(|k| format!("nats://127.0.0.1:{}", cluster_ports[k]))
                        .collect();
                    vec![
                        "--cluster_name".into(),
                        "skylark-test".into(),
                        "--cluster".into(),
                        format!("nats://127.0.0.1:{}", cluster_ports[i]),
                        "--routes".into(),
                        others.join(","),
                    ]
                };
                TestNats {
                    bin: bin.clone(),
                    port: free_port(),
                    log: dir.join(format!("nats{i}.log")),
                    child: None,
                    routes,
                    monitor: free_port(),
                }
            })
            .collect();
        for server in &mut servers {
            server.launch();
        }
        servers
    }

    fn binary() -> PathBuf {
        std::env::var_os("SKYLARK_NATS_BIN").map(PathBuf::from).unwrap_or_else(|| {
            ["/usr/sbin/nats-server", "/usr/bin/nats-server", "/usr/local/bin/nats-server"]
                .iter()
                .map(PathBuf::from)
                .find(|p| p.exists())
                .unwrap_or_else(|| {
                    panic!(
                        "nats-server is not installed: the cluster tests start their own NATS server. Install \
                         Debian's nats-server package, or set SKYLARK_NATS_BIN to the binary"
                    )
                })
        })
    }

    fn launch(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).unwrap();
        let child = Command::new(&self.bin)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-m", &self.monitor.to_string()])
            .args(&self.routes)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.bin.display()));
        self.child = Some(child);
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "nats-server did not listen; see {}",
                self.log.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// How many clients this server has now (its monitoring endpoint).
    fn clients(&self) -> u64 {
        let body = http_get(&format!("127.0.0.1:{}", self.monitor), "/connz");
        let connz: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
        connz["num_connections"].as_u64().unwrap()
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for TestNats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The nodes' processes and what they share.
struct TestCluster {
    pg: TestPostgres,
    nats: Vec<TestNats>,
    configs: Vec<PathBuf>,
    logs: Vec<PathBuf>,
    nodes: Vec<Option<ServerProcess>>,
    /// (http, tcp) per node.
    addrs: Vec<(String, String)>,
    /// The admin listener (metrics) per node.
    admins: Vec<String>,
    store: String,
}

impl TestCluster {
    fn start(dir: &Path, nodes: usize, sms: std::net::SocketAddr) -> TestCluster {
        Self::start_with(dir, nodes, 1, sms)
    }

    /// `nodes` Skylark nodes over `nats_servers` NATS servers (a NATS
    /// cluster when more than one; every node is given all of them).
    fn start_with(dir: &Path, nodes: usize, nats_servers: usize, sms: std::net::SocketAddr) -> TestCluster {
        let pg = TestPostgres::start().unwrap_or_else(|e| panic!("{e}"));
        let url = pg.create_database("cluster").unwrap();
        let nats = TestNats::start_many(dir, nats_servers);
        let nats_urls: Vec<String> = nats.iter().map(TestNats::url).collect();
        let (mut configs, mut logs, mut addrs, mut admins) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for i in 0..nodes {
            let host = format!("127.0.0.{}", i + 1);
            let (http, tcp) = (format!("{host}:{}", free_port()), format!("{host}:{}", free_port()));
            let admin = format!("{host}:{}", free_port());
            let config = dir.join(format!("n{i}.toml"));
            std::fs::write(
                &config,
                format!(
                    "data_dir = {:?}\n[listen]\nhttp = \"{http}\"\ntcp = \"{tcp}\"\nadmin = \"{admin}\"\n\
                     [messaging]\nforward_retry_base_ms = 10\nforward_retry_max_ms = 200\n\
                     [sms]\nprovider = \"http\"\nurl = \"http://{sms}/sms\"\n\
                     [store]\nshards = [{url:?}]\nacquire_timeout_ms = 1000\n\
                     [cluster]\nnode = \"n{i}\"\nnats = {nats_urls:?}\nlease_ms = {LEASE_MS}\nbeat_ms = {BEAT_MS}\n\
                     request_timeout_ms = 2000\n\
                     [media]\ndir = {:?}\n",
                    dir.join(format!("data{i}")),
                    dir.join("media"),
                ),
            )
            .unwrap();
            configs.push(config);
            logs.push(dir.join(format!("n{i}.log")));
            addrs.push((http, tcp));
            admins.push(admin);
        }
        let mut cluster = TestCluster { pg, nats, configs, logs, nodes: Vec::new(), addrs, admins, store: url };
        for i in 0..nodes {
            let node = cluster.launch(i);
            cluster.nodes.push(Some(node));
        }
        for (i, (http, _)) in cluster.addrs.iter().enumerate() {
            let started = Instant::now();
            while std::net::TcpStream::connect(http.as_str()).is_err() {
                if started.elapsed() > Duration::from_secs(10) {
                    let status = cluster.nodes[i].as_mut().and_then(|n| n.child.try_wait().ok().flatten());
                    panic!("node n{i} does not listen on {http} (exit status {status:?})\n{}", cluster.log_tail());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        cluster.wait_for_views(nodes);
        cluster
    }

    /// Waits until every running node sees `members` live nodes (its
    /// `skylark_cluster_members` gauge), so no actor moves under a test
    /// because a node's view of a late joiner lagged (heartbeats can be
    /// slow on a loaded machine).
    fn wait_for_views(&self, members: usize) {
        let want = format!("skylark_cluster_members {members}\n");
        let started = Instant::now();
        for (i, admin) in self.admins.iter().enumerate() {
            if self.nodes.get(i).is_none_or(Option::is_none) {
                continue;
            }
            while !http_get(admin, "/metrics").contains(&want) {
                assert!(started.elapsed() < Duration::from_secs(30), "node n{i} never saw {members} members");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    fn launch(&self, i: usize) -> ServerProcess {
        ServerProcess::start(&self.configs[i], &self.logs[i])
    }

    fn endpoints_from(&self, first: usize, websocket: bool) -> Vec<Endpoint> {
        (0..self.addrs.len())
            .map(|k| {
                let (http, tcp) = &self.addrs[(first + k) % self.addrs.len()];
                if websocket {
                    Endpoint::websocket_for(&format!("http://{http}"), false)
                } else {
                    Endpoint::Tcp(tcp.clone())
                }
            })
            .collect()
    }

    fn signal(&self, i: usize, signal: &str) {
        let pid = self.nodes[i].as_ref().expect("the node runs").child.id();
        let status = Command::new("kill").args([signal, &pid.to_string()]).status().unwrap();
        assert!(status.success(), "kill {signal} {pid}");
    }

    fn log_tail(&self) -> String {
        let mut out = String::new();
        for log in &self.logs {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            out += &format!("--- {} ---\n{}\n", log.display(), &text[text.len().saturating_sub(3000)..]);
        }
        out
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for node in self.nodes.iter_mut().filter_map(Option::take) {
            node.kill();
        }
    }
}

type Chaos<'a> = Box<dyn FnMut(&mut TestCluster) + Send + 'a>;

/// Four devices in two pairs, each pair's two devices on different nodes,
/// send to each other while `chaos` strikes `rounds` times; then the
/// ledger, with the stored history read back through any node.
async fn cluster_ledger(rounds: usize, chaos: Chaos<'_>) -> TestCluster {
    cluster_ledger_over(1, rounds, chaos).await
}

/// As [`cluster_ledger`], the nodes sharing `nats_servers` NATS servers.
async fn cluster_ledger_over(nats_servers: usize, rounds: usize, mut chaos: Chaos<'_>) -> TestCluster {
    let dir = tempfile::tempdir().unwrap();
    let (sms, mut codes) = sms_gateway().await;
    let mut cluster = tokio::task::block_in_place(|| TestCluster::start_with(dir.path(), 3, nats_servers, sms));
    let api = Api::new(&format!("http://{}", cluster.addrs[0].0)).unwrap();
    let phones = ["+15550800001", "+15550800002", "+15550800003", "+15550800004"];
    let identities = register(&api, &phones, &mut codes).await;

    let ledgers: Vec<Arc<Mutex<Ledger>>> = (0..4).map(|_| Arc::new(Mutex::new(Ledger::default()))).collect();
    let mut devices = Vec::new();
    for (i, identity) in identities.iter().enumerate() {
        // Devices 0..3 start on nodes 0, 1, 2, 0: both pairs span two nodes.
        let endpoints = cluster.endpoints_from(i % 3, i % 2 == 1);
        let task =
            device(endpoints, identity.clone(), phones[i ^ 1].to_owned(), MESSAGES_PER_SENDER, ledgers[i].clone());
        devices.push(tokio::spawn(task));
    }
    let total = 4 * MESSAGES_PER_SENDER;
    let acked = || ledgers.iter().map(|l| l.lock().unwrap().acked_ids().count()).sum::<usize>();
    let started = Instant::now();
    for round in 0..rounds {
        let target = total * (round + 1) / (rounds + 2);
        while acked() < target {
            assert!(started.elapsed() < DEADLINE, "traffic stalled at {} of {total}\n{}", acked(), cluster.log_tail());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        println!("chaos strikes with {} of {total} acknowledged", acked());
        tokio::task::block_in_place(|| chaos(&mut cluster));
    }
    for d in devices {
        if let Err(e) = d.await {
            panic!("device failed: {e}\n{}", cluster.log_tail());
        }
    }
    let mut not_stored = 0;
    for (i, identity) in identities.iter().enumerate() {
        let (session, _events) = connect(&cluster.endpoints_from(i % 3, false), identity).await;
        let stored = stored_client_ids(&session.handle(), identity.account_id).await;
        not_stored += ledgers[i].lock().unwrap().acked_ids().filter(|c| !stored.contains(*c)).count();
        session.close().await;
    }
    verdict(&ledgers, rounds, not_stored);
    receipts_complete(&identities, &ledgers, |i| cluster.endpoints_from(i % 3, false)).await;
    // The directory lives as long as the cluster does (logs for a failure).
    std::mem::forget(dir);
    cluster
}

/// 1. Senders and receivers on different nodes: every guarantee as on one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_across_nodes_keeps_the_ledger() {
    cluster_ledger(0, Box::new(|_| {})).await;
}

/// 2. A node killed with SIGKILL under traffic (and started again later):
/// its devices reconnect to the others, its actors are taken over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_under_traffic_loses_nothing() {
    let mut round = 0;
    cluster_ledger(
        2,
        Box::new(move |cluster| {
            if round == 0 {
                cluster.nodes[1].take().unwrap().kill();
            } else {
                cluster.nodes[1] = Some(cluster.launch(1));
            }
            round += 1;
        }),
    )
    .await;
}

/// 3. NATS killed and started again under traffic: routing resumes by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_killed_and_restarted_loses_nothing() {
    cluster_ledger(
        1,
        Box::new(|cluster| {
            cluster.nats[0].kill();
            std::thread::sleep(Duration::from_millis(800));
            cluster.nats[0].launch();
        }),
    )
    .await;
}

/// 3b. One server of a three-server NATS cluster killed under traffic: the
/// nodes it served move to the others by themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_server_of_a_nats_cluster_killed_loses_nothing() {
    cluster_ledger_over(
        3,
        1,
        Box::new(|cluster| {
            // Kill the server with the most nodes on it (each node picked
            // one of the three at random).
            let busiest = (0..3).max_by_key(|i| cluster.nats[*i].clients()).unwrap();
            let clients = cluster.nats[busiest].clients();
            assert!(clients > 0, "some node uses the NATS server that is killed");
            println!("killing NATS server {busiest}, serving {clients} of the nodes");
            cluster.nats[busiest].kill();
        }),
    )
    .await;
}

/// 4. PostgreSQL killed with SIGKILL and started again under traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_killed_under_cluster_traffic_loses_nothing() {
    cluster_ledger(
        1,
        Box::new(|cluster| {
            cluster.pg.kill();
            std::thread::sleep(Duration::from_millis(500));
            cluster.pg.restart().unwrap_or_else(|e| panic!("{e}"));
        }),
    )
    .await;
}

/// 5. A node frozen (SIGSTOP) past its lease while the others take its
/// actors over, then resumed (SIGCONT): it finds its lease lapsed and hands
/// everything away; whatever it still tried to write under its old epochs
/// is refused by the database; the ledger shows no duplicate and no
/// reordering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_node_is_fenced_when_it_wakes() {
    let cluster = cluster_ledger(
        1,
        Box::new(|cluster| {
            cluster.signal(1, "-STOP");
            std::thread::sleep(Duration::from_millis(LEASE_MS + 3 * BEAT_MS + 500));
            cluster.signal(1, "-CONT");
        }),
    )
    .await;
    let log = std::fs::read_to_string(&cluster.logs[1]).unwrap();
    assert!(log.contains("lease had lapsed"), "the woken node noticed it was presumed dead:\n{log}");
    let fenced = log.matches("stale ownership epoch refused").count();
    println!("writes the woken node attempted under a stale epoch, refused: {fenced} commits");
}

/// An operator drains a node under traffic (`skylark cluster drain`): its
/// actors move, its devices reconnect to the others, it stops by itself,
/// and the ledger holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_node_hands_everything_over_and_stops() {
    let cluster = cluster_ledger(
        1,
        Box::new(|cluster| {
            let out = Command::new(env!("CARGO_BIN_EXE_skylark"))
                .args(["cluster", "drain", "n1", "--store", &cluster.store, "--wait-secs", "30"])
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success(), "drain failed: {stdout}{}", String::from_utf8_lossy(&out.stderr));
            assert!(stdout.contains("n1 has left the cluster"), "{stdout}");
            let mut node = cluster.nodes[1].take().unwrap();
            let started = Instant::now();
            let status = loop {
                if let Some(status) = node.child.try_wait().unwrap() {
                    break status;
                }
                assert!(started.elapsed() < Duration::from_secs(20), "the drained node did not stop");
                std::thread::sleep(Duration::from_millis(50));
            };
            assert!(status.success(), "the drained node stopped cleanly: {status:?}");
        }),
    )
    .await;
    let status = Command::new(env!("CARGO_BIN_EXE_skylark"))
        .args(["cluster", "status", "--store", &cluster.store])
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&status.stdout);
    assert!(listed.contains("n0") && listed.contains("n2") && !listed.contains("n1"), "{listed}");
}

/// 6. The same device connecting to two nodes at once: the newest
/// connection wins, the older is told "replaced" (4004).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_device_on_two_nodes_newest_wins() {
    let dir = tempfile::tempdir().unwrap();
    let (sms, mut codes) = sms_gateway().await;
    let cluster = tokio::task::block_in_place(|| TestCluster::start(dir.path(), 3, sms));
    let api = Api::new(&format!("http://{}", cluster.addrs[0].0)).unwrap();
    let identity = register(&api, &["+15550800011"], &mut codes).await.remove(0);
    for (older, newer) in [(0, 1), (2, 0)] {
        let open = |node: usize, websocket: bool| {
            let endpoint = cluster.endpoints_from(node, websocket).remove(0);
            let identity = identity.clone();
            async move { Session::open(&endpoint, &identity).await }
        };
        let (first, mut first_events) =
            open(older, false).await.unwrap_or_else(|e| panic!("{e}\n{}", cluster.log_tail()));
        // The first connection is attached (its backlog is done) before the
        // second one connects: the newest to attach is the one that stays.
        tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(event) = first_events.recv().await {
                if matches!(&event, Event::Frame(f) if matches!(f.body, Some(Body::CaughtUp(_)))) {
                    return;
                }
            }
        })
        .await
        .expect("the first connection caught up");
        let (second, _second_events) =
            open(newer, true).await.unwrap_or_else(|e| panic!("{e}\n{}", cluster.log_tail()));
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                match first_events.recv().await {
                    Some(Event::Closed { code, .. }) => return code,
                    Some(Event::Frame(_)) => continue,
                    None => return None,
                }
            }
        })
        .await
        .expect("the older connection was closed");
        assert_eq!(
            closed,
            Some(CloseCode::Replaced),
            "node {older} closed the older connection as replaced\n{}",
            cluster.log_tail()
        );
        // The newer one still works.
        second.handle().history(0, 1).await.expect("the newer connection serves");
        drop(first);
        second.close().await;
    }
}

/// The next presence or typing frame of a session, skipping log events.
async fn next_ephemeral(events: &mut tokio::sync::mpsc::Receiver<Event>) -> Body {
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.recv()).await.expect("timed out") {
            Some(Event::Frame(frame)) => match frame.body {
                Some(body @ (Body::Presence(_) | Body::TypingUpdate(_))) => return body,
                _ => continue,
            },
            other => panic!("the session ended: {other:?}"),
        }
    }
}

/// Presence and typing across nodes: a watcher on one node sees a contact
/// connect to another, type, and leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_typing_cross_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let (sms, mut codes) = sms_gateway().await;
    let cluster = tokio::task::block_in_place(|| TestCluster::start(dir.path(), 3, sms));
    let api = Api::new(&format!("http://{}", cluster.addrs[0].0)).unwrap();
    let phones = ["+15550800021", "+15550800022"];
    let ids = register(&api, &phones, &mut codes).await;
    let on = |node: usize| cluster.endpoints_from(node, false).remove(0);
    let (alice, mut alice_events) = Session::open(&on(0), &ids[0]).await.unwrap();
    let seen = alice.handle().subscribe_presence(&[phones[1]]).await.unwrap();
    assert!(!seen[0].online, "Bob is not connected anywhere yet");

    let (bob, _bob_events) = Session::open(&on(1), &ids[1]).await.unwrap();
    match next_ephemeral(&mut alice_events).await {
        Body::Presence(p) => assert!(p.online && p.account == ids[1].account_id, "{p:?}"),
        other => panic!("{other:?}"),
    }
    bob.handle().typing(phones[0], TypingState::Composing).await.unwrap();
    match next_ephemeral(&mut alice_events).await {
        Body::TypingUpdate(t) => assert_eq!((t.from, t.state), (ids[1].account_id, TypingState::Composing as i32)),
        other => panic!("{other:?}"),
    }
    bob.close().await;
    match next_ephemeral(&mut alice_events).await {
        Body::Presence(p) => assert!(!p.online && p.last_seen_ms > 0, "{p:?}"),
        other => panic!("{other:?}"),
    }
    // A node that (re)joins learns who is online elsewhere (it asks).
    let (bob, _bob_events) = Session::open(&on(1), &ids[1]).await.unwrap();
    let _ = next_ephemeral(&mut alice_events).await;
    let mut cluster = cluster;
    cluster.nodes[2].take().unwrap().kill();
    cluster.nodes[2] = Some(tokio::task::block_in_place(|| cluster.launch(2)));
    tokio::task::block_in_place(|| cluster.wait_for_views(3));
    let (alice_again, _events) = Session::open(&cluster.endpoints_from(2, false).remove(0), &ids[0]).await.unwrap();
    let seen = alice_again.handle().subscribe_presence(&[phones[1]]).await.unwrap();
    assert!(seen[0].online, "the restarted node 2 knows Bob is on node 1");
    drop((alice, bob, alice_again));
}

/// The CLI against a cluster: a profile registered with every node's
/// address keeps them all, and its commands reach the cluster through
/// whichever node answers when one is down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_fails_over_between_the_nodes_it_was_given() {
    use std::io::{BufRead, BufReader, Write};
    let dir = tempfile::tempdir().unwrap();
    let (sms, mut codes) = sms_gateway().await;
    let mut cluster = tokio::task::block_in_place(|| TestCluster::start(dir.path(), 3, sms));
    let servers: Vec<String> = cluster.addrs.iter().map(|(http, _)| format!("http://{http}")).collect();
    let servers = servers.join(",");
    let home = dir.path().join("home");
    let cli = move |args: &[&str]| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_skylark"));
        cmd.env("SKYLARK_HOME", &home).env_remove("SKYLARK_PROFILE").env_remove("SKYLARK_SERVER").args(args);
        cmd
    };
    let register = cli(&["register", "+15550800031", "--server", &servers, "--profile", "p"]);
    let output = tokio::task::spawn_blocking(move || {
        let mut register = register;
        let mut child = register.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        stdout.read_line(&mut first).unwrap();
        let (_, code) = codes.blocking_recv().unwrap();
        writeln!(child.stdin.take().unwrap(), "{code}").unwrap();
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut rest).unwrap();
        assert!(child.wait().unwrap().success(), "{first}{rest}");
        rest
    })
    .await
    .unwrap();
    assert!(output.contains("Registered +15550800031"), "{output}");
    let profile: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("home/p/identity.json")).unwrap()).unwrap();
    let account = skylark_core::AccountId(profile["account_id"].as_u64().unwrap());
    let owner = skylark_server::cluster::home_node(&["n0", "n1", "n2"], account).unwrap();
    let owner: usize = owner[1..].parse().unwrap();
    // The account's own node first: until its lease runs out the others
    // answer "try again in a moment", and the command does so by itself.
    for down in [owner, (owner + 1) % 3] {
        // Every node but one down in turn: the profile's list finds the rest.
        cluster.nodes[down].take().unwrap().kill();
        for transport in
            [vec![], vec!["--tcp".to_string(), cluster.addrs.iter().map(|a| a.1.clone()).collect::<Vec<_>>().join(",")]]
        {
            let mut args = vec!["whoami", "--profile", "p"];
            args.extend(transport.iter().map(String::as_str));
            let out = tokio::task::block_in_place(|| cli(&args).output().unwrap());
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(
                out.status.success(),
                "node {down} down: {stdout}{}\n{}",
                String::from_utf8_lossy(&out.stderr),
                cluster.log_tail()
            );
            assert!(stdout.contains("phone:    +15550800031"), "{stdout}");
        }
        cluster.nodes[down] = Some(tokio::task::block_in_place(|| cluster.launch(down)));
        // The next node killed must not take the only owner of the account
        // the restarted node has not yet heard of.
        tokio::task::block_in_place(|| cluster.wait_for_views(3));
    }
}

/// A device link across nodes: the new device asks node 0, waits on node 2,
/// and a signed-in device on node 1 approves the code; the code is single-use
/// and the new device then connects like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_is_approved_on_another_node() {
    let dir = tempfile::tempdir().unwrap();
    let (sms, mut codes) = sms_gateway().await;
    let cluster = tokio::task::block_in_place(|| TestCluster::start(dir.path(), 3, sms));
    let api = |node: usize| Api::new(&format!("http://{}", cluster.addrs[node].0)).unwrap();
    let owner = register(&api(0), &["+15550800041"], &mut codes).await.remove(0);
    let key = skylark_client::identity::generate_key();
    let link = api(0).create_link(&key.verifying_key().to_bytes(), "tablet").await.unwrap();
    let waiting = {
        let (api2, link_id) = (api(2), link.link_id.clone());
        tokio::spawn(async move { api2.wait_link(&link_id, 10_000).await })
    };
    let (session, _events) = Session::open(&cluster.endpoints_from(1, false).remove(0), &owner).await.unwrap();
    let device = session.handle().approve_link(&link.code).await.expect("approved on node 1");
    assert_eq!(device.name, "tablet");
    let status = waiting.await.unwrap().expect("the wait on node 2 learns the outcome");
    assert!(
        matches!(status, skylark_protocol::http::LinkStatus::Approved { device_id, .. } if device_id == device.id),
        "{status:?}"
    );
    let again = session.handle().approve_link(&link.code).await;
    assert!(again.is_err(), "a code is single-use across nodes: {again:?}");
    let identity =
        skylark_client::Identity::new(api(0).base().into(), owner.account_id, device.id, owner.phone.clone(), &key);
    let (linked, _events) = Session::open(&cluster.endpoints_from(2, true).remove(0), &identity).await.unwrap();
    linked.handle().history(0, 1).await.expect("the linked device is served");
}

/// A node asked to stop (SIGTERM) while NATS and PostgreSQL are both gone
/// still stops, within its bounded steps, instead of waiting for them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_stops_even_with_nats_and_postgres_gone() {
    let dir = tempfile::tempdir().unwrap();
    let (sms, _codes) = sms_gateway().await;
    let mut cluster = tokio::task::block_in_place(|| TestCluster::start(dir.path(), 2, sms));
    cluster.nats[0].kill();
    cluster.pg.kill();
    cluster.signal(1, "-TERM");
    let mut node = cluster.nodes[1].take().unwrap();
    let started = Instant::now();
    let status = tokio::task::block_in_place(|| {
        loop {
            if let Some(status) = node.child.try_wait().unwrap() {
                return status;
            }
            assert!(started.elapsed() < Duration::from_secs(45), "the node did not stop\n{}", cluster.log_tail());
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    println!("stopped in {:?} with {status:?}", started.elapsed());
}

/// The web client fails over by itself: its page, served by node 0, learns
/// the cluster's nodes (`/v1/nodes`); when node 0 dies, it reconnects to
/// another node and the conversation goes on both ways, each message shown
/// once (`tests/web/cluster.mjs` drives Chromium; this side owns the
/// cluster and answers its questions).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_client_fails_over_when_its_node_dies() {
    use std::io::{BufRead, BufReader, Write};
    let web = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/web");
    let chromium = crate::web::chromium();
    crate::web::playwright(&web);
    let dir = tempfile::tempdir().unwrap();
    let (sms, mut codes) = sms_gateway().await;
    let mut cluster = tokio::task::block_in_place(|| TestCluster::start(dir.path(), 3, sms));
    // Every node lists every node, with the address it advertises.
    let list: serde_json::Value = serde_json::from_str(&http_get(&cluster.addrs[1].0, "/v1/nodes")).unwrap();
    let mut listed: Vec<&str> =
        list["nodes"].as_array().unwrap().iter().map(|n| n["address"].as_str().unwrap()).collect();
    listed.sort_unstable();
    let mut addrs: Vec<&str> = cluster.addrs.iter().map(|(http, _)| http.as_str()).collect();
    addrs.sort_unstable();
    assert_eq!(listed, addrs, "{list}");

    let nodes: Vec<String> = cluster.addrs.iter().map(|(http, _)| format!("http://{http}")).collect();
    let mut script = Command::new("node")
        .arg("cluster.mjs")
        .current_dir(&web)
        .env("NODES", nodes.join(","))
        .env("CHROMIUM", &chromium)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("the web client test needs Node.js (`node` on PATH): {e}"));
    let mut answers = script.stdin.take().unwrap();
    let questions = BufReader::new(script.stdout.take().unwrap());
    let mut done = false;
    tokio::task::block_in_place(|| {
        for line in questions.lines() {
            let line = line.unwrap();
            println!("cluster.mjs: {line}");
            if let Some(phone) = line.strip_prefix("CODE ") {
                let (to, code) = codes.blocking_recv().unwrap();
                assert_eq!(to, phone);
                writeln!(answers, "{code}").unwrap();
            } else if line == "KILL 0" {
                cluster.nodes[0].take().expect("node 0 runs").kill();
                writeln!(answers, "killed").unwrap();
            } else if line == "DONE" {
                done = true;
            }
        }
    });
    let output = script.wait_with_output().unwrap();
    assert!(
        output.status.success() && done,
        "the web client's failover test failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stderr),
        cluster.log_tail()
    );
}

/// The operator's view spans the cluster: a device connected to node 1 is
/// counted and disconnected through node 0's admin API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operator_counts_and_disconnects_devices_on_any_node() {
    let dir = tempfile::tempdir().unwrap();
    let (sms, mut codes) = sms_gateway().await;
    let cluster = tokio::task::block_in_place(|| TestCluster::start(dir.path(), 2, sms));
    let api = Api::new(&format!("http://{}", cluster.addrs[0].0)).unwrap();
    let identity = register(&api, &["+15550800031"], &mut codes).await.remove(0);
    let endpoint = cluster.endpoints_from(1, false).remove(0);
    let (session, mut events) =
        Session::open(&endpoint, &identity).await.unwrap_or_else(|e| panic!("{e}\n{}", cluster.log_tail()));
    let token = std::fs::read_to_string(dir.path().join("data0").join("admin.token")).unwrap();
    let admin = Api::new(&format!("http://{}", cluster.admins[0])).unwrap().with_bearer(token.trim());

    let (status, _, stats) = admin.raw("GET", "/admin/v1/stats", None).await.unwrap();
    assert_eq!(status, 200, "{stats}");
    assert_eq!(stats["live_connections"], 0, "none on node 0 itself: {stats}");
    assert_eq!(stats["cluster_connections"], 1, "one in the cluster: {stats}");

    let path = format!("/admin/v1/devices/{}/disconnect", identity.device_id);
    let (status, _, body) = admin.raw("POST", &path, None).await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["was_connected"], true, "node 1 ended it: {body}\n{}", cluster.log_tail());
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.recv().await {
                Some(Event::Closed { code, reason }) => return (code, reason),
                Some(Event::Frame(_)) => continue,
                None => return (None, String::new()),
            }
        }
    })
    .await
    .expect("the connection on node 1 was closed");
    assert_eq!(closed.0, Some(CloseCode::GoingAway));
    assert!(closed.1.contains("operator"), "{closed:?}");
    drop(session);
    let (_, _, body) = admin.raw("POST", &path, None).await.unwrap();
    assert_eq!(body["was_connected"], false, "nothing left to end: {body}");
}

/// A forward left in an outbox when its node was killed (put there as a
/// crash leaves it: acknowledged to the sender, not yet in the recipient's
/// log) is resumed by the node that takes the sender's actor over, though
/// the sender never connects again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forward_left_by_a_killed_node_resumes_on_the_survivor() {
    use skylark_store::postgres::{PgOptions, PgStore};

    let dir = tempfile::tempdir().unwrap();
    let (sms, mut codes) = sms_gateway().await;
    let mut cluster = tokio::task::block_in_place(|| TestCluster::start(dir.path(), 2, sms));
    let api = Api::new(&format!("http://{}", cluster.addrs[1].0)).unwrap();
    let ids = register(&api, &["+15550800071", "+15550800072"], &mut codes).await;
    let (alice, bob) = (&ids[0], &ids[1]);
    let store =
        PgStore::open(&PgOptions { shards: vec![cluster.store.clone()], ..PgOptions::default() }).await.unwrap();
    crate::harness::leave_a_forward(&store, alice, bob.account_id, "left", b"left in the outbox").await;

    // Node 0 dies; node 1 sees the placement change and wakes what it now
    // owns with forwards pending. Only Bob connects, to node 1.
    cluster.nodes[0].take().expect("node 0 runs").kill();
    let (session, _events) = connect(&cluster.endpoints_from(1, false), bob).await;
    let started = Instant::now();
    loop {
        let page = session.handle().history(0, 10).await.unwrap();
        let found = page
            .events
            .iter()
            .any(|e| matches!(&e.body, Some(skylark_protocol::v1::event::Body::Message(m)) if m.client_id == "left"));
        if found {
            break;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let alice = skylark_core::AccountId(alice.account_id);
            let outbox = skylark_store::MessageStore::account_state(&store, alice).await.map(|s| s.outbox);
            panic!(
                "the forward was not resumed: Bob's log {page:?}, Alice's outbox {outbox:?}\n{}",
                cluster.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("resumed {:?} after node 0 was killed", started.elapsed());
}
