//! `skylark store copy`: an installation on the embedded store, moved into
//! PostgreSQL (two shards) by the real command, keeps its accounts, devices
//! and messages — including ones not yet delivered.

use crate::harness::{Peer, TestServer, Transport, test_config};
use skylark_store::postgres::throwaway::TestPostgres;
use skylark_store::{PgOptions, PgStore, RedbStore, Store};
use std::process::Command;
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_copy_moves_an_installation_into_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let (alice, bob) = {
        let redb: Arc<dyn Store> = Arc::new(RedbStore::open(&data.join("skylark.redb")).unwrap());
        let mut server = TestServer::start_on(test_config(), redb).await;
        let alice = server.register("+15550900001").await;
        let bob = server.register("+15550900002").await;
        let a = Peer::connect(&server, &alice, Transport::Tcp).await;
        for i in 0..3 {
            a.handle().send("+15550900002", &format!("c{i}"), format!("hello {i}").into_bytes()).await.unwrap();
        }
        a.session.close().await;
        server.shutdown().await;
        (alice, bob)
    };

    let pg = TestPostgres::start().unwrap_or_else(|e| panic!("{e}"));
    let urls = vec![pg.create_database("shard0").unwrap(), pg.create_database("shard1").unwrap()];
    let copy = |urls: &[String]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_skylark"));
        command.args(["store", "copy", "--from"]).arg(&data);
        for url in urls {
            command.args(["--to", url]);
        }
        command.output().unwrap()
    };
    let out = copy(&urls);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("Verified:") && stdout.contains("every count and checksum equal"), "{stdout}");
    assert!(stdout.lines().any(|l| l.starts_with("log ") && l.ends_with(" ok")), "{stdout}");

    // Copying again into the same databases is refused, in words.
    let again = copy(&urls);
    assert!(!again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("already holds accounts or messages"), "{stderr}");

    let options = PgOptions { shards: urls, ..PgOptions::default() };
    let store: Arc<dyn Store> = Arc::new(PgStore::open(&options).await.unwrap());
    let server = TestServer::start_on(test_config(), store).await;
    // Bob's device had never connected: the messages waited in his log.
    let mut b = Peer::connect(&server, &bob, Transport::Ws).await;
    let got = b.received(3, true).await;
    let texts: Vec<String> = got.iter().map(|m| String::from_utf8_lossy(&m.payload).into_owned()).collect();
    assert_eq!(texts, ["hello 0", "hello 1", "hello 2"]);
    // Alice's own history and her dedupe state came along: a resend of c1
    // is recognised, not sent twice.
    let a = Peer::connect(&server, &alice, Transport::Tcp).await;
    let page = a.handle().history(0, 50).await.unwrap();
    use skylark_protocol::v1::event::Body;
    let sent = page.events.iter().filter(|e| matches!(e.body, Some(Body::Message(_)))).count();
    assert_eq!(sent, 3, "{page:?}"); // (Bob's delivery receipts may be there too)
    let resend = a.handle().send("+15550900002", "c1", b"hello 1".to_vec()).await.unwrap();
    assert_eq!(resend.id.unwrap().seq, got[1].id.unwrap().seq);
}

/// PostgreSQL killed while a device (the SDK's reconnecting client) tries
/// to connect: it is told, in words, that the storage is unavailable, keeps
/// trying, and is connected once the database is back — with no restart
/// of the server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_ride_out_a_database_restart() {
    use skylark_client::backoff::Backoff;
    use skylark_client::client::{Client, ClientEvent};
    use std::time::Duration;
    let mut pg = TestPostgres::start().unwrap_or_else(|e| panic!("{e}"));
    let url = pg.create_database("ride").unwrap();
    let options = PgOptions { shards: vec![url], acquire_timeout: Duration::from_millis(500), ..PgOptions::default() };
    let store: Arc<dyn Store> = Arc::new(PgStore::open(&options).await.unwrap());
    let server = TestServer::start_on(test_config(), store).await;
    let alice = server.register("+15550900011").await;

    pg.kill();
    let backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(200));
    let (client, mut events) = Client::start(server.endpoint(Transport::Tcp), alice, backoff);
    let told = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match events.recv().await {
                Some(ClientEvent::Disconnected { reason, .. }) => break reason,
                Some(ClientEvent::Stopped(e)) => panic!("the client gave up: {e}"),
                Some(_) => {}
                None => panic!("client ended"),
            }
        }
    })
    .await
    .expect("the device hears why it cannot connect");
    assert!(told.contains("storage is unavailable"), "{told}");

    pg.restart().unwrap_or_else(|e| panic!("{e}"));
    let handle = tokio::time::timeout(Duration::from_secs(30), client.connected()).await.expect("reconnected");
    let me = handle.unwrap().who_am_i().await.unwrap();
    assert_eq!(me.phone, "+15550900011");
}
