//! Presence, privacy, client state indication and typing, over the real protocol.

use crate::harness::{EVENT_WAIT, Peer, TestServer, Transport};
use skylark_client::session::Event;
use skylark_protocol::v1::{TypingState, Visibility, server_frame::Body};

/// The next presence or typing frame, skipping log events.
async fn next_ephemeral(peer: &mut Peer) -> Body {
    loop {
        let event = tokio::time::timeout(EVENT_WAIT, peer.events.recv()).await.expect("timed out").expect("ended");
        match event {
            Event::Frame(frame) => match frame.body {
                Some(body @ (Body::Presence(_) | Body::TypingUpdate(_))) => return body,
                _ => continue,
            },
            Event::Closed { code, reason } => panic!("closed ({code:?}): {reason}"),
        }
    }
}

/// Proves nothing ephemeral is pending for `peer`: a round trip after which
/// anything queued earlier would have been sent first.
async fn assert_no_ephemeral(peer: &mut Peer) {
    peer.handle().ping().await.unwrap();
    while let Ok(event) = peer.events.try_recv() {
        if let Event::Frame(frame) = &event {
            assert!(
                !matches!(frame.body, Some(Body::Presence(_) | Body::TypingUpdate(_))),
                "unexpected {:?}",
                frame.body
            );
        }
    }
}

#[tokio::test]
async fn presence_follows_connections_with_last_seen() {
    let server = TestServer::start().await;
    let alice_id = server.register("+15551100001").await;
    let bob_id = server.register("+15551100002").await;
    let mut alice = Peer::connect(&server, &alice_id, Transport::Tcp).await;
    let now = skylark_core::Clock::now_ms(&server.clock);

    let list = alice.handle().subscribe_presence(&["+15551100002", "+15559999999"]).await.unwrap();
    assert_eq!(list.len(), 1, "unknown numbers are left out");
    assert_eq!((list[0].phone.as_str(), list[0].visible, list[0].online), ("+15551100002", true, false));

    // Bob's phone connects, and a second device of his would not change anything.
    let bob = Peer::connect(&server, &bob_id, Transport::Ws).await;
    match next_ephemeral(&mut alice).await {
        Body::Presence(p) => assert!(p.online && p.account == bob_id.account_id),
        other => panic!("{other:?}"),
    }
    // Bob leaves: offline, with last seen.
    bob.session.close().await;
    match next_ephemeral(&mut alice).await {
        Body::Presence(p) => {
            assert!(!p.online);
            assert!(p.last_seen_ms >= now, "last seen {} before {now}", p.last_seen_ms);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn privacy_settings_are_enforced_by_the_server() {
    let server = TestServer::start().await;
    let alice_id = server.register("+15551100011").await;
    let bob_id = server.register("+15551100012").await;
    let carol_id = server.register("+15551100013").await;
    let bob = Peer::connect(&server, &bob_id, Transport::Tcp).await;
    let mut alice = Peer::connect(&server, &alice_id, Transport::Tcp).await;
    let mut carol = Peer::connect(&server, &carol_id, Transport::Ws).await;

    bob.handle().set_privacy(Visibility::Nobody).await.unwrap();
    let seen = alice.handle().subscribe_presence(&["+15551100012"]).await.unwrap();
    assert_eq!((seen[0].visible, seen[0].online, seen[0].last_seen_ms), (false, false, 0));

    // Contacts only: Bob has written to Alice, not to Carol.
    bob.handle().send("+15551100011", "hi", b"hi".to_vec()).await.unwrap();
    bob.handle().set_privacy(Visibility::Contacts).await.unwrap();
    let to_alice = alice.handle().subscribe_presence(&["+15551100012"]).await.unwrap();
    let to_carol = carol.handle().subscribe_presence(&["+15551100012"]).await.unwrap();
    assert!(to_alice[0].visible && to_alice[0].online);
    assert!(!to_carol[0].visible && !to_carol[0].online);
    // Changes reach only those allowed to see them: first the privacy
    // change itself (Alice, already watching, may now see Bob online)…
    match next_ephemeral(&mut alice).await {
        Body::Presence(p) => assert!(p.online && p.visible),
        other => panic!("{other:?}"),
    }
    // …then Bob going offline.
    bob.session.close().await;
    match next_ephemeral(&mut alice).await {
        Body::Presence(p) => assert!(!p.online && p.visible),
        other => panic!("{other:?}"),
    }
    assert_no_ephemeral(&mut carol).await;
}

#[tokio::test]
async fn typing_reaches_online_active_devices_only_and_is_never_queued() {
    let server = TestServer::start().await;
    let alice_id = server.register("+15551100021").await;
    let bob_id = server.register("+15551100022").await;
    let mut alice = Peer::connect(&server, &alice_id, Transport::WsJson).await;
    let bob = Peer::connect(&server, &bob_id, Transport::Tcp).await;

    bob.handle().typing("+15551100021", TypingState::Composing).await.unwrap();
    match next_ephemeral(&mut alice).await {
        Body::TypingUpdate(t) => {
            assert_eq!((t.from, t.from_phone.as_str()), (bob_id.account_id, "+15551100022"));
            assert_eq!(t.state, TypingState::Composing as i32);
            assert_eq!(t.expires_in_ms, 10_000, "indicators expire by themselves");
        }
        other => panic!("{other:?}"),
    }

    // In the background (client state indication) Alice gets nothing.
    alice.handle().set_active(false).await.unwrap();
    bob.handle().typing("+15551100021", TypingState::Recording).await.unwrap();
    bob.handle().ping().await.unwrap();
    assert_no_ephemeral(&mut alice).await;
    alice.handle().set_active(true).await.unwrap();
    bob.handle().typing("+15551100021", TypingState::Paused).await.unwrap();
    assert!(matches!(next_ephemeral(&mut alice).await, Body::TypingUpdate(t) if t.state == TypingState::Paused as i32));

    // Offline: nothing is kept for later.
    alice.session.close().await;
    bob.handle().typing("+15551100021", TypingState::Composing).await.unwrap();
    bob.handle().ping().await.unwrap();
    let mut alice = Peer::connect(&server, &alice_id, Transport::Tcp).await;
    assert_no_ephemeral(&mut alice).await;
}

#[tokio::test]
async fn typing_past_the_per_device_rate_is_dropped() {
    let mut config = crate::harness::test_config();
    config.rate_limits.typing_per_device = skylark_server::config::Quota { burst: 3, per_ms: 60_000 };
    let server = TestServer::start_with(config).await;
    let alice_id = server.register("+15551100031").await;
    let bob_id = server.register("+15551100032").await;
    let mut alice = Peer::connect(&server, &alice_id, Transport::Tcp).await;
    let bob = Peer::connect(&server, &bob_id, Transport::Tcp).await;
    for _ in 0..10 {
        bob.handle().typing("+15551100031", TypingState::Composing).await.unwrap();
    }
    for _ in 0..3 {
        assert!(matches!(next_ephemeral(&mut alice).await, Body::TypingUpdate(_)));
    }
    // Ordered after the typing frames on Bob's connection: anything more would be here by now.
    bob.handle().ping().await.unwrap();
    assert_no_ephemeral(&mut alice).await;
    // Bob's session itself is fine.
    bob.handle().ping().await.unwrap();
}
