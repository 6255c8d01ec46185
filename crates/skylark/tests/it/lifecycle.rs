//! Connection lifetime: replacement, timeouts, reconnects, shutdown, health.

use crate::harness::{TestServer, Transport, close_code, test_config};
use skylark_client::backoff::Backoff;
use skylark_client::client::ClientEvent;
use skylark_client::session::{Event, handshake};
use skylark_client::{Client, Session};
use skylark_protocol::CloseCode;
use std::time::Duration;

async fn closed(events: &mut tokio::sync::mpsc::Receiver<Event>) -> Option<CloseCode> {
    loop {
        match events.recv().await.expect("events end with Closed") {
            Event::Closed { code, .. } => return code,
            Event::Frame(_) => continue,
        }
    }
}

#[tokio::test]
async fn same_device_twice_newest_wins_oldest_is_replaced() {
    let server = TestServer::start().await;
    let identity = server.register("+15550400001").await;
    let (old, mut old_events) = Session::open(&server.endpoint(Transport::Tcp), &identity).await.unwrap();
    let (new, _new_events) = Session::open(&server.endpoint(Transport::Ws), &identity).await.unwrap();
    assert_eq!(closed(&mut old_events).await, Some(CloseCode::Replaced));
    assert!(old.who_am_i().await.is_err(), "the replaced session is gone");
    assert_eq!(new.who_am_i().await.unwrap().device_id, identity.device_id);
}

#[tokio::test]
async fn silent_connection_is_closed_for_idleness() {
    let mut config = test_config();
    config.limits.idle_timeout_ms = 300;
    let server = TestServer::start_with(config).await;
    let identity = server.register("+15550400002").await;
    let mut conn = server.raw(Transport::Tcp).await;
    let info = handshake(&mut conn, &identity).await.unwrap();
    assert_eq!(info.idle_timeout_ms, 300);
    // Send nothing: no heartbeat.
    assert_eq!(close_code(&mut conn).await, Some(CloseCode::IdleTimeout));
}

#[tokio::test]
async fn heartbeats_keep_a_session_alive() {
    let mut config = test_config();
    config.limits.idle_timeout_ms = 1_500;
    config.limits.heartbeat_interval_ms = 1_000;
    let server = TestServer::start_with(config).await;
    let identity = server.register("+15550400003").await;
    let (session, mut events) = Session::open(&server.endpoint(Transport::Ws), &identity).await.unwrap();
    // Three idle timeouts pass; the SDK's pings keep the session open.
    let outcome = tokio::time::timeout(Duration::from_millis(4_500), closed(&mut events)).await;
    assert!(outcome.is_err(), "session closed despite heartbeats: {outcome:?}");
    session.who_am_i().await.unwrap();
}

#[tokio::test]
async fn connection_that_never_authenticates_is_closed() {
    let mut config = test_config();
    config.limits.auth_timeout_ms = 200;
    let server = TestServer::start_with(config).await;
    let mut conn = server.raw(Transport::WsJson).await;
    assert_eq!(close_code(&mut conn).await, Some(CloseCode::Unauthenticated));
}

#[tokio::test]
async fn client_reconnects_after_a_server_restart() {
    let mut server = TestServer::start().await;
    let identity = server.register("+15550400004").await;
    let tcp_addr = server.gateway.as_ref().unwrap().tcp_addr();
    let http_addr = server.gateway.as_ref().unwrap().http_addr();

    let backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(200));
    let (client, mut events) = Client::start(server.endpoint(Transport::Tcp), identity.clone(), backoff);
    assert!(matches!(events.recv().await, Some(ClientEvent::Connected(_))));

    // Stop the server: the client sees "going away" and starts retrying.
    server.shutdown().await;
    loop {
        match events.recv().await {
            Some(ClientEvent::Frame(_)) => continue,
            Some(ClientEvent::Disconnected { code, .. }) => {
                assert_eq!(code, Some(CloseCode::GoingAway));
                break;
            }
            other => panic!("expected a disconnect, got {other:?}"),
        }
    }

    // Start again on the same addresses and the same data.
    let mut config = test_config();
    config.listen.tcp = tcp_addr;
    config.listen.http = http_addr;
    let restarted = TestServer::start_on(config, server.store.clone()).await;
    loop {
        match events.recv().await {
            Some(ClientEvent::Connected(info)) => {
                assert_eq!(info.device_id, identity.device_id);
                break;
            }
            Some(ClientEvent::Disconnected { .. } | ClientEvent::Frame(_)) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
    let handle = client.connected().await.unwrap();
    assert_eq!(handle.who_am_i().await.unwrap().account_id, identity.account_id);
    client.stop().await;
    drop(restarted);
}

#[tokio::test]
async fn client_stops_for_good_when_replaced() {
    let server = TestServer::start().await;
    let identity = server.register("+15550400005").await;
    let backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(50));
    let (client, mut events) = Client::start(server.endpoint(Transport::Ws), identity.clone(), backoff);
    assert!(matches!(events.recv().await, Some(ClientEvent::Connected(_))));
    let (_other, _) = Session::open(&server.endpoint(Transport::Tcp), &identity).await.unwrap();
    loop {
        match events.recv().await.expect("client reports why it stopped") {
            ClientEvent::Stopped(e) => {
                assert!(
                    matches!(e, skylark_client::ClientError::Closed { code: Some(CloseCode::Replaced), .. }),
                    "{e:?}"
                );
                break;
            }
            ClientEvent::Disconnected { .. } | ClientEvent::Frame(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert!(client.connected().await.is_err(), "a replaced client does not fight back");
}

#[tokio::test]
async fn shutdown_closes_sessions_with_going_away() {
    let mut server = TestServer::start().await;
    let identity = server.register("+15550400006").await;
    let (_session, mut events) = Session::open(&server.endpoint(Transport::WsJson), &identity).await.unwrap();
    server.shutdown().await;
    assert_eq!(closed(&mut events).await, Some(CloseCode::GoingAway));
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    // On a file, so the store's fsyncs are timed too.
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(skylark_store::RedbStore::open(&dir.path().join("skylark.redb")).unwrap());
    let server = TestServer::start_on(crate::harness::test_config(), store).await;
    let api = server.api();
    let identity = server.register("+15550400007").await;
    let recipient = server.register("+15550400008").await;
    let (_theirs, mut their_events) = Session::open(&server.endpoint(Transport::Ws), &recipient).await.unwrap();
    let (session, _) = Session::open(&server.endpoint(Transport::Tcp), &identity).await.unwrap();
    session.who_am_i().await.unwrap();
    session.handle().send("+15550400008", "m1", b"hi".to_vec()).await.unwrap();
    // Delivered to the recipient's connected device (timed once written).
    loop {
        match their_events.recv().await.expect("the recipient's stream") {
            Event::Frame(f) if matches!(f.body, Some(skylark_protocol::v1::server_frame::Body::Event(_))) => break,
            Event::Frame(_) => continue,
            Event::Closed { .. } => panic!("the recipient's connection closed"),
        }
    }
    for path in ["/healthz", "/readyz"] {
        let (status, ..) = api.raw("GET", path, None).await.unwrap();
        assert_eq!(status, 200, "{path}");
    }
    // Metrics are on the admin listener, not the public one.
    assert!(reqwest_like_get(&server.http_base(), "/metrics").await.starts_with("HTTP/1.1 404"));
    let response = reqwest_like_get(&server.admin_base(), "/metrics").await;
    assert!(response.contains("skylark_connections_total"), "{response}");
    assert!(response.contains("skylark_sms_total"), "{response}");
    // The send was timed to its ack, and the store timed its commit and
    // the commit's fsync.
    for timed in [
        "skylark_send_ack_seconds_count",
        "skylark_store_commit_seconds_count",
        "skylark_store_fsync_seconds_count",
        "skylark_delivery_seconds_count",
    ] {
        let count = response
            .lines()
            .find_map(|l| l.strip_prefix(timed).and_then(|v| v.trim().parse::<f64>().ok()))
            .unwrap_or_else(|| panic!("no {timed} in {response}"));
        assert!(count >= 1.0, "{timed} = {count}");
    }
}

/// GET returning the body as text (the API helper parses JSON only).
async fn reqwest_like_get(base: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn a_second_server_on_a_taken_port_says_which_and_what_to_do() {
    let first = TestServer::start().await;
    let taken = first.gateway.as_ref().unwrap().http_addr();
    let mut config = test_config();
    config.listen.http = taken;
    let (_, transport) = config.split();
    let err = skylark_gateway::Gateway::start(first.server.clone(), transport).await.unwrap_err().to_string();
    assert!(err.contains(&taken.to_string()) && err.contains("HTTP"), "{err}");
    assert!(err.contains("another Skylark server (or another program) is using that port"), "{err}");
    assert!(err.contains("--http"), "{err}");
    assert!(!err.contains("TLS"), "no TLS files are configured: {err}");
}

#[tokio::test]
async fn the_web_client_has_its_icon() {
    let server = TestServer::start().await;
    let page = reqwest_like_get(&server.http_base(), "/").await;
    assert!(page.contains(r#"<link rel="icon" href="/favicon.svg""#), "{page}");
    for path in ["/favicon.svg", "/favicon.ico"] {
        let icon = reqwest_like_get(&server.http_base(), path).await;
        assert!(icon.starts_with("HTTP/1.1 200"), "{path}: {icon}");
        assert!(icon.to_lowercase().contains("content-type: image/svg+xml") && icon.contains("<svg"), "{icon}");
    }
}
