//! Each load scenario at a small scale against a real server: the report is
//! produced and nothing is lost. (The real figures come from the commands in
//! docs/BENCHMARKS.md.)

#![allow(clippy::unwrap_used)]

use skylark_client::Endpoint;
use skylark_load::provision::provision;
use skylark_load::scenarios::{self, Target};
use std::sync::Arc;

/// A server on the given addresses over `store`, taking at most
/// `per_address` connections from one source address.
async fn start(
    http: &str,
    tcp: &str,
    store: Arc<dyn skylark_store::Store>,
    per_address: u32,
) -> (Arc<skylark_server::Server>, skylark_gateway::Gateway) {
    let mut config = skylark_gateway::Settings::default();
    config.limits.max_connections_per_ip = per_address;
    config.listen.http = http.parse().unwrap();
    config.listen.tcp = tcp.parse().unwrap();
    config.listen.admin = "127.0.0.1:0".parse().unwrap();
    // Attachments are not used here: keep their directory out of the source tree.
    config.media.dir = std::env::temp_dir().join(format!("skylark-load-smoke-media-{}", std::process::id()));
    let sms = Arc::new(skylark_server::sms::ConsoleSms);
    let (services, transport) = config.split();
    let server = skylark_server::Server::new(services, store, sms, Arc::new(skylark_core::SystemClock)).await.unwrap();
    let gateway = skylark_gateway::Gateway::start(server.clone(), transport).await.unwrap();
    (server, gateway)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_scenario_runs_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("skylark.redb");
    let manifest = provision(&db, 40, "smoke").await.unwrap();

    let store = Arc::new(skylark_store::RedbStore::open(&db).unwrap());
    let (server, gateway) = start("127.0.0.1:0", "127.0.0.1:0", store, 256).await;
    let target = Target {
        http_base: format!("http://{}", gateway.http_addr()),
        endpoint: Endpoint::Tcp(gateway.tcp_addr().to_string()),
        sources: vec!["127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap()],
    };

    let (mut idle, sessions) = scenarios::idle(&target, &manifest, 0..20, 200.0, async {}, true).await;
    scenarios::server_memory(&mut idle, Some(std::process::id()), Some(0));
    assert_eq!((idle.connections, idle.failed), (20, 0));
    assert_eq!(idle.connect_latency.count, 20);
    assert!(idle.server_bytes_per_connection.is_some());
    drop(sessions);

    let chat = scenarios::chat(&target, &manifest, 5, 200.0, 1.0, 64).await;
    assert!(chat.sent >= 190, "{chat:?}");
    assert_eq!(
        (chat.acked, chat.delivered, chat.receipted, chat.errors),
        (chat.sent, chat.sent, chat.sent, 0),
        "{chat:?}"
    );
    assert!(serde_json::to_string(&chat).unwrap().contains("send_to_receipt"));

    // Everyone sends and receives, to random peers; every message reaches
    // its recipient once (the sender's own copy is not counted) and is
    // receipted to its sender.
    let mesh = scenarios::mesh(&target, &manifest, 10, 200.0, 1.0, 64).await;
    assert!(mesh.sent >= 190, "{mesh:?}");
    assert_eq!(
        (mesh.acked, mesh.delivered, mesh.receipted, mesh.errors),
        (mesh.sent, mesh.sent, mesh.sent, 0),
        "{mesh:?}"
    );
    assert_eq!(mesh.scenario, "mesh");

    let group = scenarios::group(&target, &manifest, 12, 3, 20, 100.0, 64).await;
    assert_eq!((group.acked, group.deliveries, group.missing, group.duplicates), (20, 240, 0, 0), "{group:?}");
    assert_eq!(group.post_to_last_device.count, 20);

    let backlog = scenarios::backlog(&target, &manifest, 5, 10).await;
    assert_eq!((backlog.messages, backlog.received, backlog.duplicates), (50, 50, 0), "{backlog:?}");

    // An encrypted group of full SDK devices: every member opens every
    // marker (the scenario fails otherwise), two first posts each commit
    // fresh keys first, and both removals are commits the members applied.
    let profiles = dir.path().join("profiles");
    let e2ee = skylark_load::e2ee::e2ee_group(&target, &manifest, 8, 2, false, &profiles).await.unwrap();
    assert_eq!(e2ee.refresh_bytes.len(), 2, "{e2ee:?}");
    assert!(e2ee.removal_before_bytes > 0 && e2ee.removal_after_bytes > 0, "{e2ee:?}");

    gateway.shutdown(std::time::Duration::from_secs(5)).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storm_clients_come_back_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("skylark.redb");
    let manifest = provision(&db, 10, "storm").await.unwrap();
    let store: Arc<dyn skylark_store::Store> = Arc::new(skylark_store::RedbStore::open(&db).unwrap());

    // Four connections per address: a storm that ignored its source
    // addresses would leave most clients refused.
    let (server, gateway) = start("127.0.0.1:0", "127.0.0.1:0", store.clone(), 4).await;
    let (http, tcp) = (gateway.http_addr().to_string(), gateway.tcp_addr().to_string());
    let target = Target {
        http_base: format!("http://{http}"),
        endpoint: Endpoint::Tcp(tcp.clone()),
        // 10 clients, 4 per address.
        sources: (1..=3).map(|i| std::net::IpAddr::from([127, 0, 0, i])).collect(),
    };
    let running = Arc::new(tokio::sync::Mutex::new(Some((server, gateway))));
    let restart = {
        let (running, store) = (running.clone(), store.clone());
        move || async move {
            let mut running = running.lock().await;
            if let Some((server, gateway)) = running.take() {
                gateway.shutdown(std::time::Duration::from_secs(5)).await;
                server.shutdown().await;
            }
            *running = Some(start(&http, &tcp, store, 4).await);
        }
    };
    let report = scenarios::storm(&target, &manifest, 10, restart).await;
    assert_eq!(report.reconnected, 10, "{report:?}");
    assert!(report.reconnect_all_seconds.is_finite(), "{report:?}");
    assert!(report.acked > 0, "{report:?}");
    assert_eq!((report.lost, report.duplicated), (0, 0), "{report:?}");
    if let Some((server, gateway)) = running.lock().await.take() {
        gateway.shutdown(std::time::Duration::from_secs(5)).await;
        server.shutdown().await;
    }
}
