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

#[tokio::test]
async fn resending_accepted_messages_is_not_charged_to_the_rate_limit() {
    let mut config = test_config();
    config.rate_limits.messages_per_device = Quota { burst: 3, per_ms: 600_000 };
    let server = TestServer::start_with(config).await;
    let alice_id = server.register("+15551400011").await;
    server.register("+15551400012").await;
    let alice = Peer::connect(&server, &alice_id, Transport::Tcp).await;
    let mut first = Vec::new();
    for i in 0..3 {
        first.push(alice.handle().send("+15551400012", &format!("m{i}"), vec![1]).await.unwrap());
    }
    // A client recovering from a crash resends everything it is unsure of,
    // on a new connection: each is answered as the duplicate it is.
    drop(alice);
    let alice = Peer::connect(&server, &alice_id, Transport::Ws).await;
    for round in 0..3 {
        for (i, ack) in first.iter().enumerate() {
            let again = alice.handle().send("+15551400012", &format!("m{i}"), vec![1]).await;
            let again = again.unwrap_or_else(|e| panic!("resend {i} of round {round} refused: {e:?}"));
            assert!(again.duplicate);
            assert_eq!(again.id, ack.id);
        }
    }
    // A new message still meets the limit.
    match alice.handle().send("+15551400012", "m3", vec![1]).await.unwrap_err() {
        skylark_client::ClientError::Refused { code, .. } => assert_eq!(code, ErrorCode::RateLimited),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// Reads until the peer closes; returns how long that took, or `None` if
/// the connection was still open after `limit`.
async fn closed_within(stream: &mut tokio::net::TcpStream, limit: std::time::Duration) -> Option<std::time::Duration> {
    use tokio::io::AsyncReadExt;
    let started = std::time::Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((started + limit).into(), stream.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0) | Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn slow_http_headers_and_bodies_are_cut_off() {
    use tokio::io::AsyncWriteExt;
    let mut config = test_config();
    config.limits.http_header_timeout_ms = 300;
    config.limits.http_request_timeout_ms = 600;
    let server = TestServer::start_with(config).await;
    let addr = server.gateway.as_ref().unwrap().http_addr();

    // Slowloris: half a request line, then nothing.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let took = closed_within(&mut slow, std::time::Duration::from_secs(5)).await.expect("still open");
    assert!(took >= std::time::Duration::from_millis(250), "{took:?}");

    // A body announced but trickled: the request times out (408) and ends.
    let mut trickle = tokio::net::TcpStream::connect(addr).await.unwrap();
    trickle
        .write_all(b"POST /v1/verification HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 1024];
        loop {
            match trickle.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            }
            if answer.windows(3).any(|w| w == b"408") {
                break;
            }
        }
    })
    .await;
    assert!(read.is_ok(), "no answer to a trickled body");
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 408"), "{}", String::from_utf8_lossy(&answer));

    // Normal requests are unaffected.
    let api = server.api();
    api.start_verification("+15557000001").await.unwrap();
}

#[tokio::test]
async fn a_flood_of_unauthenticated_connections_is_shed_while_a_user_keeps_working() {
    let mut config = test_config();
    config.limits.auth_timeout_ms = 500;
    config.limits.max_connections_per_ip = 100;
    let server = TestServer::start_with(config).await;
    let alice = server.register("+15557100001").await;
    let bob = server.register("+15557100002").await;
    let alice = Peer::connect(&server, &alice, Transport::Tcp).await;
    let mut bob = Peer::connect(&server, &bob, Transport::Ws).await;

    // 300 connections from another address that never authenticate.
    let flooder: std::net::IpAddr = "127.0.0.3".parse().unwrap();
    let tcp = server.gateway.as_ref().unwrap().tcp_addr();
    let mut flood = Vec::new();
    for _ in 0..300 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(std::net::SocketAddr::new(flooder, 0)).unwrap();
        flood.push(socket.connect(tcp).await.unwrap());
    }
    // Meanwhile the users chat as usual.
    for i in 0..20u8 {
        alice.handle().send("+15557100002", &format!("f{i}"), vec![i]).await.unwrap();
    }
    let got = bob.received(20, true).await;
    assert_eq!(got.iter().map(|m| m.payload[0]).collect::<Vec<_>>(), (0..20).collect::<Vec<u8>>());

    // Past the per-address cap they are refused at once; the rest are
    // closed at the authentication deadline. None stays open.
    let mut closed = 0;
    for mut conn in flood {
        if closed_within(&mut conn, std::time::Duration::from_secs(5)).await.is_some() {
            closed += 1;
        }
    }
    assert_eq!(closed, 300);
    // And the user's session is still alive.
    alice.handle().ping().await.unwrap();
}

#[tokio::test]
async fn a_reader_that_stops_reading_holds_only_its_window_and_slows_no_one() {
    use skylark_client::session::handshake;
    let mut config = test_config();
    config.messaging.device_window = 64;
    config.rate_limits.messages_per_device = Quota { burst: 10_000, per_ms: 1 };
    let server = TestServer::start_with(config).await;
    let sender = server.register("+15557200001").await;
    let slow = server.register("+15557200002").await;
    let carol = server.register("+15557200003").await;
    let sender = Peer::connect(&server, &sender, Transport::Tcp).await;
    let mut carol = Peer::connect(&server, &carol, Transport::Tcp).await;

    // The slow reader authenticates, then never reads again.
    let mut conn = server.raw(Transport::Tcp).await;
    handshake(&mut conn, &slow).await.unwrap();

    // 2,000 messages of 8 KiB to it: far more than socket buffers hold.
    let payload = vec![7u8; 8 * 1024];
    for i in 0..2000 {
        sender.handle().send("+15557200002", &format!("s{i}"), payload.clone()).await.unwrap();
    }
    // Everything the server ever wrote to the slow device is now in the
    // socket buffers: at most its window of entries (64 × 8 KiB), however
    // much more waits in its log. So a stalled reader costs the server at
    // most a window, never its backlog.
    let mut handed = 0;
    loop {
        match tokio::time::timeout(std::time::Duration::from_millis(500), conn.recv()).await {
            Ok(skylark_client::conn::Received::Frame(frame)) => {
                if matches!(frame.body, Some(server_frame::Body::Event(_))) {
                    handed += 1;
                }
            }
            Ok(other) => panic!("the slow connection ended: {other:?}"),
            Err(_) => break,
        }
    }
    assert!((1..=64).contains(&handed), "handed {handed} entries; the window is 64");
    // Everyone else is served as usual.
    sender.handle().send("+15557200003", "c1", b"to carol".to_vec()).await.unwrap();
    assert_eq!(carol.received(1, true).await[0].payload, b"to carol".as_slice());

    // When the reader comes back (a new connection), it gets everything, in order.
    drop(conn);
    let mut back = Peer::connect(&server, &slow, Transport::Tcp).await;
    let got = back.received(2000, true).await;
    assert!(got.iter().enumerate().all(|(i, m)| m.client_id == format!("s{i}")));
}
