//! Malformed and oversized frames on every transport.

use crate::harness::{ALL_TRANSPORTS, TestServer, Transport, test_config};
use skylark_client::conn::{FrameConn, Received};
use skylark_protocol::v1::server_frame;
use skylark_protocol::{CloseCode, ErrorCode};

/// The first error frame the server sends, then the close code.
async fn error_then_close(conn: &mut FrameConn) -> (Option<ErrorCode>, Option<CloseCode>) {
    let mut error = None;
    loop {
        match conn.recv().await {
            Received::Frame(frame) => {
                if let Some(server_frame::Body::Error(e)) = frame.body {
                    error.get_or_insert(ErrorCode::try_from(e.code).unwrap());
                }
            }
            Received::Closed { code, .. } => return (error, code),
        }
    }
}

#[tokio::test]
async fn malformed_frames_get_malformed_frame_and_protocol_error() {
    let server = TestServer::start().await;
    // A field tag with wire type 7, which protobuf does not have.
    let garbage = [0x0f, 0xff, 0xff, 0xff];

    let mut tcp = server.raw(Transport::Tcp).await;
    tcp.send_raw(&FrameConn::length_prefixed(&garbage), false).await.unwrap();
    assert_eq!(error_then_close(&mut tcp).await, (Some(ErrorCode::MalformedFrame), Some(CloseCode::ProtocolError)));

    let mut ws = server.raw(Transport::Ws).await;
    ws.send_raw(&garbage, false).await.unwrap();
    assert_eq!(error_then_close(&mut ws).await, (Some(ErrorCode::MalformedFrame), Some(CloseCode::ProtocolError)));

    let mut json = server.raw(Transport::WsJson).await;
    json.send_raw(b"{\"id\": \"1\", \"hello\": ", true).await.unwrap();
    assert_eq!(error_then_close(&mut json).await, (Some(ErrorCode::MalformedFrame), Some(CloseCode::ProtocolError)));

    // A text frame on a binary connection is malformed too.
    let mut ws = server.raw(Transport::Ws).await;
    ws.send_raw(b"{}", true).await.unwrap();
    assert_eq!(error_then_close(&mut ws).await, (Some(ErrorCode::MalformedFrame), Some(CloseCode::ProtocolError)));
}

#[tokio::test]
async fn bogus_length_prefix_is_refused_without_waiting_for_the_body() {
    let server = TestServer::start().await;
    let mut tcp = server.raw(Transport::Tcp).await;
    // Announces 4 GiB and sends nothing more: the server must answer at
    // once from the prefix alone, not wait for (or buffer) the body.
    tcp.send_raw(&u32::MAX.to_be_bytes(), false).await.unwrap();
    assert_eq!(error_then_close(&mut tcp).await, (Some(ErrorCode::FrameTooLarge), Some(CloseCode::TooLarge)));
}

#[tokio::test]
async fn frames_over_the_limit_are_refused_on_every_transport() {
    let mut config = test_config();
    config.limits.max_frame_bytes = 1024;
    let server = TestServer::start_with(config).await;
    let big = vec![b'x'; 4096];
    for transport in ALL_TRANSPORTS {
        let mut conn = server.raw(transport).await;
        let bytes = if transport == Transport::Tcp { FrameConn::length_prefixed(&big) } else { big.clone() };
        // The server may close before reading all of it; a failed write is fine.
        let _ = conn.send_raw(&bytes, transport == Transport::WsJson).await;
        let (error, close) = error_then_close(&mut conn).await;
        assert_eq!(close, Some(CloseCode::TooLarge), "{transport:?} (error {error:?})");
        assert_eq!(error, Some(ErrorCode::FrameTooLarge), "{transport:?}");
    }
    // Frames within the limit still work.
    let identity = server.register("+15550300001").await;
    let (session, _) = skylark_client::Session::open(&server.endpoint(Transport::Tcp), &identity).await.unwrap();
    session.who_am_i().await.unwrap();
}

#[tokio::test]
async fn frame_with_no_known_body_is_refused() {
    let server = TestServer::start().await;
    for transport in ALL_TRANSPORTS {
        let mut conn = server.raw(transport).await;
        conn.send(skylark_protocol::ClientFrame { id: 9, body: None }).await.unwrap();
        assert_eq!(
            error_then_close(&mut conn).await,
            (Some(ErrorCode::UnknownRequest), Some(CloseCode::ProtocolError)),
            "{transport:?}"
        );
    }
}

#[tokio::test]
async fn json_frames_skip_unknown_fields_and_enum_names_as_binary_does() {
    use skylark_protocol::v1::{client_frame, server_frame};
    let server = TestServer::start().await;
    // A newer v1 client adds fields, even nested ones: an older server reads
    // past them, on the JSON mapping as on binary protobuf.
    let mut json = server.raw(Transport::WsJson).await;
    let hello =
        r#"{"id":"1","hello":{"minVersion":1,"maxVersion":1,"client":"t","fromTheFuture":{"x":[1,2]}},"alsoNew":true}"#;
    json.send_raw(hello.as_bytes(), true).await.unwrap();
    match json.recv().await {
        Received::Frame(frame) => {
            assert!(matches!(frame.body, Some(server_frame::Body::Challenge(_))), "{frame:?}");
        }
        Received::Closed { code, reason } => panic!("closed ({code:?}): {reason}"),
    }
    // An unknown enum name reads as UNSPECIFIED, which the server treats
    // exactly as it treats an unknown enum number on binary.
    let identity = server.register("+15550300011").await;
    let mut answers = Vec::new();
    for transport in [Transport::Ws, Transport::WsJson] {
        let mut conn = server.raw(transport).await;
        skylark_client::session::handshake(&mut conn, &identity).await.unwrap();
        if transport == Transport::WsJson {
            let frame = br#"{"id":"5","setPrivacy":{"presence":"VISIBILITY_FRIENDS_OF_FRIENDS"}}"#;
            conn.send_raw(frame, true).await.unwrap();
        } else {
            let body = client_frame::Body::SetPrivacy(skylark_protocol::v1::SetPrivacy { presence: 77 });
            conn.send(skylark_protocol::ClientFrame { id: 5, body: Some(body) }).await.unwrap();
        }
        let answer = loop {
            match conn.recv().await {
                Received::Frame(f) if f.id == 5 => break f.body,
                Received::Frame(_) => continue,
                Received::Closed { code, reason } => panic!("closed ({code:?}): {reason}"),
            }
        };
        assert!(matches!(&answer, Some(server_frame::Body::Error(e)) if e.code == ErrorCode::InvalidArgument as i32));
        answers.push(answer);
    }
    assert_eq!(answers[0], answers[1], "the same answer on both mappings");
}
