//! Limits a stranger or a runaway device meets: connections per address,
//! messages per device.

use crate::harness::{Peer, TestServer, Transport, close_code, test_config};
use skylark_client::conn::FrameConn;
use skylark_client::session::call;
use skylark_protocol::v1::{self, client_frame, server_frame};
use skylark_protocol::{CloseCode, ErrorCode};
use skylark_server::config::Quota;

#[tokio::test]
async fn connections_per_address_are_capped() {
    let mut config = test_config();
    config.limits.max_connections_per_ip = 2;
    let server = TestServer::start_with(config).await;
    let _first = server.raw(Transport::Tcp).await;
    let _second = server.raw(Transport::Ws).await;

    // A third from the same address is refused, on either transport…
    let mut third = server.raw(Transport::Tcp).await;
    assert_eq!(close_code(&mut third).await, Some(CloseCode::TryAgainLater));
    let refused = FrameConn::connect(&server.endpoint(Transport::WsJson)).await.unwrap_err();
    assert!(refused.to_string().contains("503"), "{refused}");

    // …while another address is served.
    let other = "127.0.0.2".parse().unwrap();
    let mut conn = FrameConn::connect_from(&server.endpoint(Transport::Tcp), Some(other)).await.unwrap();
    let hello = v1::Hello { min_version: 1, max_version: 1, client: "t".into() };
    let answer = call(&mut conn, 1, client_frame::Body::Hello(hello)).await.unwrap();
    assert!(matches!(answer, server_frame::Body::Challenge(_)));
}

#[tokio::test]
async fn messages_per_device_are_rate_limited_with_retry_after() {
    let mut config = test_config();
    config.rate_limits.messages_per_device = Quota { burst: 5, per_ms: 60_000 };
    let server = TestServer::start_with(config).await;
    let alice_id = server.register("+15551400001").await;
    let bob_id = server.register("+15551400002").await;
    let alice = Peer::connect(&server, &alice_id, Transport::Tcp).await;
    for i in 0..5 {
        alice.handle().send("+15551400002", &format!("m{i}"), vec![1]).await.unwrap();
    }
    match alice.handle().send("+15551400002", "m5", vec![1]).await.unwrap_err() {
        skylark_client::ClientError::Refused { code, retry_after_ms, .. } => {
            assert_eq!(code, ErrorCode::RateLimited);
            assert!(retry_after_ms > 50_000, "{retry_after_ms}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Another device is not affected; Bob got the five accepted messages.
    let bob = Peer::connect(&server, &bob_id, Transport::Tcp).await;
    bob.handle().send("+15551400001", "b", vec![2]).await.unwrap();
    let mut bob = bob;
    let got = bob.received(5, true).await;
    assert_eq!(got.iter().map(|m| m.client_id.as_str()).collect::<Vec<_>>(), vec!["m0", "m1", "m2", "m3", "m4"]);
}
