//! Device authentication on connections.

use crate::harness::{ALL_TRANSPORTS, TestServer, Transport, close_code};
use skylark_client::conn::Received;
use skylark_client::identity::generate_key;
use skylark_client::session::{call, handshake};
use skylark_client::{Identity, Session};
use skylark_protocol::v1::{self, client_frame, server_frame};
use skylark_protocol::{ClientFrame, CloseCode, ErrorCode, MAX_VERSION, MIN_VERSION};

fn hello() -> client_frame::Body {
    client_frame::Body::Hello(v1::Hello { min_version: MIN_VERSION, max_version: MAX_VERSION, client: "test".into() })
}

async fn challenge(conn: &mut skylark_client::conn::FrameConn) -> v1::Challenge {
    match call(conn, 1, hello()).await.unwrap() {
        server_frame::Body::Challenge(c) => c,
        other => panic!("expected a challenge, got {other:?}"),
    }
}

#[tokio::test]
async fn wrong_key_is_refused_as_bad_signature() {
    let server = TestServer::start().await;
    let real = server.register("+15550200001").await;
    let impostor =
        Identity::new(real.server.clone(), real.account_id, real.device_id, real.phone.clone(), &generate_key());
    for transport in ALL_TRANSPORTS {
        let mut conn = server.raw(transport).await;
        let err = handshake(&mut conn, &impostor).await.unwrap_err();
        assert_eq!(err.error_code(), Some(ErrorCode::BadSignature), "{transport:?}");
        assert_eq!(close_code(&mut conn).await, Some(CloseCode::Unauthenticated));
    }
}

#[tokio::test]
async fn unknown_device_is_refused() {
    let server = TestServer::start().await;
    let ghost = Identity::new(server.http_base(), 1, 999, "+15550200002".into(), &generate_key());
    let err = Session::open(&server.endpoint(Transport::Tcp), &ghost).await.unwrap_err();
    assert_eq!(err.error_code(), Some(ErrorCode::UnknownDevice));
}

#[tokio::test]
async fn replayed_signature_is_refused() {
    let server = TestServer::start().await;
    let identity = server.register("+15550200003").await;

    // A genuine answer, captured from a first connection.
    let mut first = server.raw(Transport::Tcp).await;
    let ch1 = challenge(&mut first).await;
    let sig1 = identity.sign_challenge(&ch1.server_id, &ch1.nonce).unwrap();
    first.close().await;

    // Replayed as is on a new connection: the nonce is not this connection's.
    let mut second = server.raw(Transport::Tcp).await;
    let ch2 = challenge(&mut second).await;
    assert_ne!(ch1.nonce, ch2.nonce, "every connection gets a fresh nonce");
    let replay = v1::Authenticate { device_id: identity.device_id, nonce: ch1.nonce.clone(), signature: sig1.clone() };
    let err = call(&mut second, 2, client_frame::Body::Authenticate(replay)).await.unwrap_err();
    assert_eq!(err.error_code(), Some(ErrorCode::ChallengeMismatch));
    assert_eq!(close_code(&mut second).await, Some(CloseCode::Unauthenticated));

    // The old signature with the new nonce does not verify either.
    let mut third = server.raw(Transport::Ws).await;
    let ch3 = challenge(&mut third).await;
    let forged = v1::Authenticate { device_id: identity.device_id, nonce: ch3.nonce, signature: sig1 };
    let err = call(&mut third, 2, client_frame::Body::Authenticate(forged)).await.unwrap_err();
    assert_eq!(err.error_code(), Some(ErrorCode::BadSignature));
}

#[tokio::test]
async fn expired_challenge_is_refused() {
    let server = TestServer::start().await;
    let identity = server.register("+15550200004").await;
    let mut conn = server.raw(Transport::WsJson).await;
    let ch = challenge(&mut conn).await;
    server.clock.advance_ms(ch.expires_in_ms + 1);
    let signature = identity.sign_challenge(&ch.server_id, &ch.nonce).unwrap();
    let answer = v1::Authenticate { device_id: identity.device_id, nonce: ch.nonce, signature };
    let err = call(&mut conn, 2, client_frame::Body::Authenticate(answer)).await.unwrap_err();
    assert_eq!(err.error_code(), Some(ErrorCode::ChallengeExpired));
}

#[tokio::test]
async fn takeover_of_a_number_logs_old_devices_out() {
    let server = TestServer::start().await;
    let old = server.register("+15550200005").await;
    let (session, mut events) = Session::open(&server.endpoint(Transport::Ws), &old).await.unwrap();

    let new = server.register("+15550200005").await;
    assert_eq!(new.account_id, old.account_id, "the account survives the takeover");
    assert_ne!(new.device_id, old.device_id);

    // The old device's live connection is closed with "device removed"…
    let closed = loop {
        match events.recv().await.expect("session events end with Closed") {
            skylark_client::session::Event::Closed { code, .. } => break code,
            skylark_client::session::Event::Frame(_) => continue,
        }
    };
    assert_eq!(closed, Some(CloseCode::DeviceRemoved));
    drop(session);

    // …its key no longer authenticates…
    let mut conn = server.raw(Transport::Tcp).await;
    let err = handshake(&mut conn, &old).await.unwrap_err();
    assert_eq!(err.error_code(), Some(ErrorCode::DeviceRemoved));
    assert_eq!(close_code(&mut conn).await, Some(CloseCode::DeviceRemoved));

    // …and the new device works.
    let (session, _) = Session::open(&server.endpoint(Transport::Tcp), &new).await.unwrap();
    assert_eq!(session.who_am_i().await.unwrap().device_id, new.device_id);
}

#[tokio::test]
async fn requests_before_authentication_are_refused() {
    let server = TestServer::start().await;
    let mut conn = server.raw(Transport::Tcp).await;
    let err = call(&mut conn, 1, client_frame::Body::WhoAmI(v1::WhoAmIRequest {})).await.unwrap_err();
    assert_eq!(err.error_code(), Some(ErrorCode::Unauthenticated));
    assert_eq!(close_code(&mut conn).await, Some(CloseCode::Unauthenticated));

    let mut conn = server.raw(Transport::Ws).await;
    let answer = v1::Authenticate { device_id: 1, nonce: vec![0; 32], signature: vec![0; 64] };
    let err = call(&mut conn, 1, client_frame::Body::Authenticate(answer)).await.unwrap_err();
    assert_eq!(err.error_code(), Some(ErrorCode::Unauthenticated), "Hello must come first");
}

#[tokio::test]
async fn unsupported_version_is_refused_with_its_close_code() {
    let server = TestServer::start().await;
    for transport in ALL_TRANSPORTS {
        let mut conn = server.raw(transport).await;
        let future = v1::Hello { min_version: 7, max_version: 9, client: "from the future".into() };
        let err = call(&mut conn, 1, client_frame::Body::Hello(future)).await.unwrap_err();
        assert_eq!(err.error_code(), Some(ErrorCode::UnsupportedVersion), "{transport:?}");
        assert_eq!(close_code(&mut conn).await, Some(CloseCode::UnsupportedVersion), "{transport:?}");
    }
}

#[tokio::test]
async fn authenticated_connection_refuses_a_second_handshake() {
    let server = TestServer::start().await;
    let identity = server.register("+15550200006").await;
    let mut conn = server.raw(Transport::Tcp).await;
    handshake(&mut conn, &identity).await.unwrap();
    let err = call(&mut conn, 3, hello()).await.unwrap_err();
    assert_eq!(err.error_code(), Some(ErrorCode::AlreadyAuthenticated));
    // The connection stays usable.
    let ok = call(&mut conn, 4, client_frame::Body::Ping(v1::Ping {})).await.unwrap();
    assert!(matches!(ok, server_frame::Body::Pong(_)));
    // A request without an id is refused, and the connection stays usable.
    conn.send(ClientFrame { id: 0, body: Some(client_frame::Body::Ping(v1::Ping {})) }).await.unwrap();
    match conn.recv().await {
        Received::Frame(f) => match f.body {
            Some(server_frame::Body::Error(e)) => assert_eq!(e.code, ErrorCode::MissingRequestId as i32),
            other => panic!("expected an error, got {other:?}"),
        },
        Received::Closed { .. } => panic!("closed"),
    }
    let ok = call(&mut conn, 5, client_frame::Body::Ping(v1::Ping {})).await.unwrap();
    assert!(matches!(ok, server_frame::Body::Pong(_)));
}
