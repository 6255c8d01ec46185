//! Power cuts, not just kill -9: the server's data directory lives on
//! skylark-cutfs, a FUSE filesystem that keeps only what was fsync'd. Each
//! crash kills the server *and* drops every write the disk was not made
//! to keep (part of it torn in), as a machine losing power would; then the
//! server starts again from what is left. The ledger must still hold.
//!
//! `SKYLARK_POWER_CUT_RUNS=N` repeats the ledger run N times (each with
//! [`CUTS`] cuts) for the long run in docs/RELIABILITY.md;
//! `SKYLARK_POWER_CUT_SEED` repeats a run's torn writes.

use crate::crash::{Chaos, ServerProcess, connect, free_port, ledger_run_in, register, sms_gateway, stored_client_ids};
use skylark_client::api::Api;
use skylark_client::{Endpoint, Identity};
use skylark_cutfs::{Cut, CutReport, Mounted};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Power cuts in one ledger run.
const CUTS: usize = 8;
/// Power cuts of PostgreSQL's machine in one ledger run (each waits for
/// PostgreSQL's crash recovery).
const PG_CUTS: usize = 4;

/// The filesystem mounted at `dir/mnt`, its durable data in `dir/backing`.
fn mount(dir: &Path) -> Mounted {
    let (backing, mnt) = (dir.join("backing"), dir.join("mnt"));
    std::fs::create_dir_all(&backing).unwrap();
    std::fs::create_dir_all(&mnt).unwrap();
    skylark_cutfs::mount(&backing, &mnt).unwrap_or_else(|e| panic!("{e}"))
}

fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|v| v.parse().unwrap_or_else(|_| panic!("{name} must be a number, not {v:?}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cuts_during_traffic_lose_nothing() {
    let runs = env_number("SKYLARK_POWER_CUT_RUNS").unwrap_or(1);
    let seed = env_number("SKYLARK_POWER_CUT_SEED").unwrap_or_else(rand::random);
    println!("power cuts: {runs} run(s) of {CUTS} cuts, seed {seed} (SKYLARK_POWER_CUT_SEED={seed} repeats it)");
    let reports: Arc<Mutex<Vec<CutReport>>> = Arc::default();
    for run in 0..runs {
        let dir = tempfile::tempdir().unwrap();
        let fs = mount(dir.path());
        let control = fs.control();
        let (config, log) = (dir.path().join("skylark.toml"), dir.path().join("server.log"));
        let kept = reports.clone();
        let mut cut = 0u64;
        let mut moment = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed ^ run);
        let chaos: Chaos<'_> = Box::new(move |server| {
            // At a random moment within the next 20 ms of traffic.
            std::thread::sleep(Duration::from_micros(rand::Rng::random_range(&mut moment, 0..20_000)));
            server.take().expect("the server runs").kill();
            let report = control.power_cut(Cut::Torn { seed: seed ^ (run << 32) ^ cut }).unwrap();
            cut += 1;
            kept.lock().unwrap().push(report);
            *server = Some(ServerProcess::start(&config, &log));
        });
        ledger_run_in(&dir, &fs.path().join("data"), "", CUTS, chaos).await;
        drop(fs);
    }
    let reports = reports.lock().unwrap();
    let sum = |f: fn(&CutReport) -> usize| reports.iter().map(f).sum::<usize>();
    println!(
        "power cuts: {}, unsynced pages dropped {}, files left with a torn part {}, directories reverted {}",
        reports.len(),
        sum(|r| r.pages_dropped),
        sum(|r| r.files_torn),
        sum(|r| r.directories_reverted)
    );
    assert_eq!(reports.len() as u64, runs * CUTS as u64);
}

/// A server with its data on the filesystem, two accounts registered.
struct Rig {
    // Field order is drop order: the server before the mount under it,
    // the mount before its directory.
    server: Option<ServerProcess>,
    fs: Mounted,
    dir: tempfile::TempDir,
    config: PathBuf,
    tcp: u16,
    identities: Vec<Identity>,
    phones: [&'static str; 2],
    api: Api,
    /// Verification codes the server sends.
    codes: tokio::sync::mpsc::UnboundedReceiver<(String, String)>,
}

impl Drop for Rig {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.kill();
        }
    }
}

impl Rig {
    async fn start() -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let fs = mount(dir.path());
        let (sms, mut codes) = sms_gateway().await;
        let (http, tcp) = (free_port(), free_port());
        let config = dir.path().join("skylark.toml");
        std::fs::write(
            &config,
            format!(
                "data_dir = {:?}\n[listen]\nhttp = \"127.0.0.1:{http}\"\ntcp = \"127.0.0.1:{tcp}\"\n\
                 admin = \"127.0.0.1:0\"\n[sms]\nprovider = \"http\"\nurl = \"http://{sms}/sms\"\n",
                fs.path().join("data")
            ),
        )
        .unwrap();
        let server = ServerProcess::start(&config, &dir.path().join("server.log"));
        let api = Api::new(&format!("http://127.0.0.1:{http}")).unwrap();
        let phones = ["+15550900001", "+15550900002"];
        let identities = register(&api, &phones, &mut codes).await;
        Rig { server: Some(server), fs, dir, config, tcp, identities, phones, api, codes }
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint::Tcp(format!("127.0.0.1:{}", self.tcp))
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("server.log")
    }

    fn restart(&mut self) {
        self.server = Some(ServerProcess::start(&self.config, &self.log()));
    }

    /// Sends `ids` from the first account to the second; the ones acked.
    async fn send(&self, ids: impl Iterator<Item = String>) -> Vec<String> {
        let (session, _events) = connect(&[self.endpoint()], &self.identities[0]).await;
        let mut acked = Vec::new();
        for id in ids {
            if session.handle().send(self.phones[1], &id, id.clone().into_bytes()).await.is_ok() {
                acked.push(id);
            }
        }
        session.close().await;
        acked
    }

    /// Which of `acked` the restarted server's store has not got.
    async fn missing(&self, acked: &[String]) -> Vec<String> {
        let (session, _events) = connect(&[self.endpoint()], &self.identities[0]).await;
        let stored = stored_client_ids(&session.handle(), self.identities[0].account_id).await;
        session.close().await;
        acked.iter().filter(|id| !stored.contains(*id)).cloned().collect()
    }
}

/// The test can fail: with fsync made to lie (it answers at once and keeps
/// nothing), the same power cut loses acknowledged messages, and the
/// check that the ledger runs finds them missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_whose_fsync_keeps_nothing_is_caught_losing_messages() {
    let mut rig = Rig::start().await;
    let control = rig.fs.control();
    // The accounts are durable; from here on nothing is.
    control.set_fsync_lies(true);
    let acked = rig.send((0..30).map(|n| format!("lied-{n}"))).await;
    assert_eq!(acked.len(), 30);
    rig.server.take().unwrap().kill();
    control.power_cut(Cut::Clean).unwrap();
    control.set_fsync_lies(false);
    rig.restart();
    let missing = rig.missing(&acked).await;
    println!("with fsync lying: {} of {} acknowledged messages lost in one power cut", missing.len(), acked.len());
    assert_eq!(missing.len(), acked.len(), "every message acknowledged on a lying fsync is lost: {missing:?}");
}

/// When fsync fails, the write it covered is not acknowledged, and the
/// server does not retry it (a retried fsync can report success for data
/// the kernel already dropped): it stops at once, and started again it
/// recovers from what is on disk. The client resends; nothing acked is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fsync_is_never_an_ack_and_the_server_restarts_from_disk() {
    let mut rig = Rig::start().await;
    let control = rig.fs.control();
    let mut acked = rig.send((0..10).map(|n| format!("before-{n}"))).await;
    assert_eq!(acked.len(), 10);

    // Connected first: the failing fsync may be any write (a background one
    // too), and a server that stops before the client connects would refuse it.
    let (session, _events) = connect(&[rig.endpoint()], &rig.identities[0]).await;
    control.fail_fsyncs(1);
    let failed = session.handle().send(rig.phones[1], "during", b"during".to_vec()).await;
    assert!(failed.is_err(), "a message whose fsync failed was acknowledged");
    drop(session);
    // The server stops by itself, saying why.
    let server = rig.server.as_mut().unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "the server carried on after a failed fsync");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!status.success(), "{status}");
    let log = std::fs::read_to_string(rig.log()).unwrap();
    assert!(log.contains("the disk failed a write of the store"), "{log}");
    assert_eq!(control.stats().failed_fsyncs, 1);
    rig.server = None;

    // What the failed fsync covered never reached the disk.
    control.power_cut(Cut::Clean).unwrap();
    rig.restart();
    // The client resends the unacknowledged message with its client id.
    acked.extend(rig.send(["during".to_owned()].into_iter().chain((0..5).map(|n| format!("after-{n}")))).await);
    assert_eq!(acked.len(), 16, "{acked:?}");
    let missing = rig.missing(&acked).await;
    assert!(missing.is_empty(), "acknowledged, then lost: {missing:?}");
}

/// PostgreSQL's machine loses power under traffic: every PostgreSQL
/// process dies at once, its data directory (on the filesystem) keeps only
/// what PostgreSQL synced, and it starts again with crash recovery. The
/// Skylark server keeps running and carries on when it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cuts_of_the_postgres_machine_lose_nothing() {
    let runs = env_number("SKYLARK_POWER_CUT_RUNS").unwrap_or(1);
    let seed = env_number("SKYLARK_POWER_CUT_SEED").unwrap_or_else(rand::random);
    println!("PostgreSQL power cuts: {runs} run(s) of {PG_CUTS} cuts, seed {seed}");
    let reports: Arc<Mutex<Vec<CutReport>>> = Arc::default();
    for run in 0..runs {
        let dir = tempfile::tempdir().unwrap();
        let pg_dir = tempfile::tempdir().unwrap();
        let fs = mount(pg_dir.path());
        // PostgreSQL relies on what ext4 and XFS do: an fsync commits the
        // directory changes made before it (docs/RELIABILITY.md).
        fs.control().set_metadata_journal(true);
        let pg = skylark_store::postgres::throwaway::TestPostgres::start_in(&fs.path().join("pgdata"))
            .unwrap_or_else(|e| panic!("{e}"));
        let url = pg.create_database("ledger").unwrap();
        let pg = Arc::new(Mutex::new(pg));
        let machine = pg.clone();
        let control = fs.control();
        let kept = reports.clone();
        let mut cut = 0u64;
        let chaos: Chaos<'_> = Box::new(move |_server| {
            let mut pg = machine.lock().unwrap();
            pg.kill_all().unwrap_or_else(|e| panic!("{e}"));
            kept.lock().unwrap().push(control.power_cut(Cut::Torn { seed: seed ^ (run << 32) ^ cut }).unwrap());
            cut += 1;
            pg.restart().unwrap_or_else(|e| panic!("{e}"));
        });
        let store = format!("[store]\nshards = [{url:?}]\nacquire_timeout_ms = 1000\n");
        ledger_run_in(&dir, &dir.path().join("data"), &store, PG_CUTS, chaos).await;
        // Nothing may hold the mount when it goes.
        pg.lock().unwrap().kill_all().unwrap_or_else(|e| panic!("{e}"));
        drop(fs);
    }
    let reports = reports.lock().unwrap();
    println!(
        "PostgreSQL power cuts: {}, unsynced pages dropped {}, torn files {}, directories reverted {}",
        reports.len(),
        reports.iter().map(|r| r.pages_dropped).sum::<usize>(),
        reports.iter().map(|r| r.files_torn).sum::<usize>(),
        reports.iter().map(|r| r.directories_reverted).sum::<usize>()
    );
    assert_eq!(reports.len() as u64, runs * PG_CUTS as u64);
}

/// Besides messages, what the server keeps survives a cut whole: device
/// enrolments, a verification session's spent attempts, the VAPID key and
/// the admin token are as they were (docs/RELIABILITY.md lists them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_else_the_server_keeps_survives_a_power_cut() {
    let mut rig = Rig::start().await;
    let (status, _, key_before) = rig.api.raw("GET", "/v1/push/vapid", None).await.unwrap();
    assert_eq!(status, 200, "{key_before}");
    let token_path = rig.fs.path().join("data/admin.token");
    let token_before = std::fs::read_to_string(&token_path).unwrap();
    // Two wrong codes spent on a new number's verification.
    let phone = "+15550900003";
    let session = rig.api.start_verification(phone).await.unwrap();
    let (_, code) = rig.codes.recv().await.unwrap();
    let wrong = if code == "000000" { "111111" } else { "000000" };
    let key = skylark_client::identity::generate_key().verifying_key().to_bytes();
    let attempts_left = |e: skylark_client::ClientError| match e {
        skylark_client::ClientError::Api { body, .. } => body["attempts_left"].as_u64(),
        other => panic!("expected a refusal, got {other:?}"),
    };
    for _ in 0..2 {
        rig.api.verify(&session.session_id, wrong, &key, "x").await.unwrap_err();
    }

    rig.server.take().unwrap().kill();
    rig.fs.control().power_cut(Cut::Torn { seed: 7 }).unwrap();
    rig.restart();

    let (_, _, key_after) = rig.api.raw("GET", "/v1/push/vapid", None).await.unwrap();
    assert_eq!(key_after, key_before, "the VAPID key changed across a power cut");
    assert_eq!(std::fs::read_to_string(&token_path).unwrap(), token_before, "the admin token changed");
    let left = attempts_left(rig.api.verify(&session.session_id, wrong, &key, "x").await.unwrap_err());
    assert_eq!(left, Some(2), "five attempts, two spent before the cut, one now");
    for identity in &rig.identities {
        let (session, _events) = connect(&[rig.endpoint()], identity).await;
        session.who_am_i().await.expect("an enrolled device signs in after the cut");
        session.close().await;
    }
}
