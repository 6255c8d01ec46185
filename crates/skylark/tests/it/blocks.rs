//! Blocking, over the real protocol: what a blocked account can no longer
//! do to the one that blocked it, what it is (not) told, and every device
//! of the blocker — one of them offline at the time — learning of it.

use crate::harness::{EVENT_WAIT, Peer, TestServer, Transport};
use skylark_client::ClientError;
use skylark_client::session::Event;
use skylark_core::AccountId;
use skylark_core::message::LogEntry;
use skylark_protocol::ErrorCode;
use skylark_protocol::v1::event::Body;
use skylark_protocol::v1::{PhoneList, TypingState, change_group, group_event, server_frame};

const ALICE: &str = "+15552100001";
const BOB: &str = "+15552100002";
const CAROL: &str = "+15552100003";

fn code(e: ClientError) -> ErrorCode {
    e.error_code().unwrap_or_else(|| panic!("expected a refusal, got {e}"))
}

/// The next log entry of `peer` whose body `pick` accepts (acknowledging
/// the ones skipped).
async fn next_matching<T>(peer: &mut Peer, pick: impl Fn(&Body) -> Option<T>) -> (u64, T) {
    loop {
        let event = peer.next_entry().await;
        if let Some(found) = event.body.as_ref().and_then(&pick) {
            return (event.seq, found);
        }
        peer.handle().ack(event.seq).await.unwrap();
    }
}

/// The next presence frame of `peer`, skipping everything else.
async fn next_presence(peer: &mut Peer) -> skylark_protocol::v1::PresenceInfo {
    loop {
        let event = tokio::time::timeout(EVENT_WAIT, peer.events.recv()).await.expect("timed out").expect("ended");
        if let Event::Frame(frame) = event
            && let Some(server_frame::Body::Presence(p)) = frame.body
        {
            return p;
        }
    }
}

/// Messages (1:1) from `from` in `account`'s stored log.
async fn stored_messages_from(server: &TestServer, account: u64, from: u64) -> Vec<Vec<u8>> {
    let log = server.store.read_log(AccountId(account), 1, 10_000).await.unwrap();
    log.into_iter()
        .filter_map(|(_, entry)| match entry {
            LogEntry::Message(m) if m.id.sender == AccountId(from) => Some(m.payload.to_vec()),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_blocked_sender_sees_one_tick_and_the_blocker_hears_nothing_until_unblocked() {
    let server = TestServer::start().await;
    let alice_id = server.register(ALICE).await;
    let bob_id = server.register(BOB).await;
    let mut alice = Peer::connect(&server, &alice_id, Transport::Tcp).await;
    let mut bob = Peer::connect(&server, &bob_id, Transport::Ws).await;
    // Bob's laptop is linked, then goes offline before the block.
    let laptop_id = crate::devices::link(&server, &bob, "laptop").await;
    alice.handle().subscribe_presence(&[BOB]).await.unwrap();

    bob.handle().block(ALICE, true).await.unwrap();
    let (_, change) = next_matching(&mut bob, |b| match b {
        Body::BlockChange(c) => Some(c.clone()),
        _ => None,
    })
    .await;
    assert_eq!((change.peer, change.peer_phone.as_str(), change.blocked), (alice_id.account_id, ALICE, true));
    assert!(change.at_ms > 0, "when it happened");
    // Alice was watching Bob: she is told she may no longer see him.
    let seen = next_presence(&mut alice).await;
    assert_eq!((seen.phone.as_str(), seen.visible, seen.online), (BOB, false, false));
    let listed = bob.handle().list_blocked().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].phone.as_str(), listed[0].account), (ALICE, alice_id.account_id));
    assert!(listed[0].since_ms > 0);

    // Alice's messages are taken (one tick) and go nowhere; nothing tells her.
    for i in 0..3 {
        let ack = alice.handle().send(BOB, &format!("blocked-{i}"), b"while blocked".to_vec()).await.unwrap();
        assert!(!ack.duplicate);
    }
    // Her typing does not reach him either: a round trip of hers after it
    // means it was handled (positive control at the end).
    alice.handle().typing(BOB, TypingState::Composing).await.unwrap();
    alice.handle().ping().await.unwrap();
    bob.handle().ping().await.unwrap();
    while let Ok(event) = bob.events.try_recv() {
        if let Event::Frame(frame) = &event {
            assert!(!matches!(frame.body, Some(server_frame::Body::TypingUpdate(_))), "typing reached the blocker");
            assert!(!matches!(frame.body, Some(server_frame::Body::Event(_))), "nothing is in Bob's log meanwhile");
        }
    }
    // Bob cannot write to her while he blocks her, and is told why.
    let refused = bob.handle().send(ALICE, "to-blocked", b"hi".to_vec()).await.unwrap_err();
    assert_eq!(code(refused), ErrorCode::Blocked);
    // Nor can she put him in a group; the refusal names him by number.
    let e = alice.handle().create_group("friends", &[BOB]).await.unwrap_err();
    assert!(e.to_string().contains(BOB), "{e}");
    assert_eq!(code(e), ErrorCode::Forbidden);
    let carol_id = server.register(CAROL).await;
    let carol = Peer::connect(&server, &carol_id, Transport::Tcp).await;
    let group = carol.handle().create_group("three", &[ALICE]).await.unwrap();
    let add_bob = change_group::Change::Add(PhoneList { phones: vec![BOB.into()] });
    let alice_adds = alice.handle().change_group(group.id, add_bob.clone()).await.unwrap_err();
    assert_eq!(code(alice_adds), ErrorCode::Forbidden, "she may not add him to someone else's group either");
    let carol_adds = carol.handle().change_group(group.id, add_bob).await;
    assert!(carol_adds.is_ok(), "others may still add him: {carol_adds:?}");

    // The laptop, offline during the block, learns of it on connecting.
    let mut laptop = Peer::connect(&server, &laptop_id, Transport::Tcp).await;
    let (_, change) = next_matching(&mut laptop, |b| match b {
        Body::BlockChange(c) => Some(c.blocked),
        _ => None,
    })
    .await;
    assert!(change);

    bob.handle().block(ALICE, false).await.unwrap();
    assert!(bob.handle().list_blocked().await.unwrap().is_empty());
    alice.handle().send(BOB, "after", b"after unblock".to_vec()).await.unwrap();
    // Forwards arrive in order: the first of Alice's messages to reach
    // either of Bob's devices is the one sent after the unblock.
    for device in [&mut bob, &mut laptop] {
        let (_, payload) = next_matching(device, |b| match b {
            Body::Message(m) if m.from_phone == ALICE => Some(m.payload.to_vec()),
            _ => None,
        })
        .await;
        assert_eq!(payload, b"after unblock");
    }
    assert_eq!(
        stored_messages_from(&server, bob_id.account_id, alice_id.account_id).await,
        vec![b"after unblock".to_vec()],
        "nothing of what was sent during the block is stored for Bob"
    );
    // No delivery receipt reached Alice for the blocked messages (Bob's
    // devices have not acknowledged "after" yet).
    let alice_log = server.store.read_log(AccountId(alice_id.account_id), 1, 10_000).await.unwrap();
    assert!(!alice_log.iter().any(|(_, e)| matches!(e, LogEntry::Receipt { .. })), "one tick only");
    // And he can write to her again, and she can be seen typing.
    bob.handle().send(ALICE, "again", b"hello again".to_vec()).await.unwrap();
    let got = alice.received(1, true).await;
    assert_eq!(got[0].payload.to_vec(), b"hello again");
    alice.handle().typing(BOB, TypingState::Composing).await.unwrap();
    loop {
        let event = tokio::time::timeout(EVENT_WAIT, bob.events.recv()).await.expect("timed out").expect("ended");
        if let Event::Frame(frame) = event
            && let Some(server_frame::Body::TypingUpdate(t)) = frame.body
        {
            assert_eq!(t.from_phone, ALICE);
            break;
        }
    }
}

#[tokio::test]
async fn a_block_holds_in_the_encrypted_conversation_but_its_commits_still_flow() {
    let server = TestServer::start().await;
    let alice_id = server.register(ALICE).await;
    let bob_id = server.register(BOB).await;
    let alice = Peer::connect(&server, &alice_id, Transport::Ws).await;
    let mut bob = Peer::connect(&server, &bob_id, Transport::Tcp).await;
    let direct = alice.handle().open_direct(BOB).await.unwrap();
    alice.handle().send_to_group(direct.id, "d-before", b"before".to_vec()).await.unwrap();

    bob.handle().block(ALICE, true).await.unwrap();
    alice.handle().send_to_group(direct.id, "d-blocked", b"during".to_vec()).await.unwrap();
    // A commit keeps both sides' encryption in step, block or not.
    alice.handle().commit_to_group(direct.id, "d-commit", 0, b"commit".to_vec()).await.unwrap();
    let refused = bob.handle().send_to_group(direct.id, "d-bob", b"to her".to_vec()).await.unwrap_err();
    assert_eq!(code(refused), ErrorCode::Blocked);
    bob.handle().block(ALICE, false).await.unwrap();
    alice.handle().send_to_group(direct.id, "d-after", b"after".to_vec()).await.unwrap();

    let mut posts = Vec::new();
    while posts.last().map(String::as_str) != Some("d-after") {
        let (seq, client_id) = next_matching(&mut bob, |b| match b {
            Body::Group(g) if g.group == direct.id => match &g.body {
                Some(group_event::Body::Message(m)) => Some(m.client_id.clone()),
                _ => None,
            },
            _ => None,
        })
        .await;
        bob.handle().ack(seq).await.unwrap();
        posts.push(client_id);
    }
    assert_eq!(posts, ["d-before", "d-commit", "d-after"], "the post made during the block never reached Bob");
}

#[tokio::test]
async fn blocking_needs_a_real_other_account() {
    let server = TestServer::start().await;
    let alice_id = server.register(ALICE).await;
    let alice = Peer::connect(&server, &alice_id, Transport::WsJson).await;
    assert_eq!(code(alice.handle().block(ALICE, true).await.unwrap_err()), ErrorCode::InvalidArgument);
    assert_eq!(code(alice.handle().block("+15552109999", true).await.unwrap_err()), ErrorCode::UnknownRecipient);
    assert_eq!(code(alice.handle().block("not a number", true).await.unwrap_err()), ErrorCode::InvalidArgument);
    // Unblocking someone never blocked is harmless.
    server.register(BOB).await;
    alice.handle().block(BOB, false).await.unwrap();
    assert!(alice.handle().list_blocked().await.unwrap().is_empty());
}

#[tokio::test]
async fn contact_names_reach_every_device_of_the_account_and_nobody_else() {
    let server = TestServer::start().await;
    let alice_id = server.register(ALICE).await;
    let bob_id = server.register(BOB).await;
    let mut alice = Peer::connect(&server, &alice_id, Transport::Tcp).await;
    let laptop_id = crate::devices::link(&server, &alice, "laptop").await;
    let bob = Peer::connect(&server, &bob_id, Transport::Ws).await;

    alice.handle().set_contact_name(BOB, "  Bob the Builder ").await.unwrap();
    let (_, named) = next_matching(&mut alice, |b| match b {
        Body::ContactName(n) => Some(n.clone()),
        _ => None,
    })
    .await;
    assert_eq!((named.peer_phone.as_str(), named.name.as_str()), (BOB, "Bob the Builder"), "trimmed");
    let listed = alice.handle().contact_names().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].phone.as_str(), listed[0].name.as_str()), (BOB, "Bob the Builder"));
    assert!(bob.handle().contact_names().await.unwrap().is_empty(), "per account");
    // The laptop, offline meanwhile, learns it on connecting, and lists it.
    let mut laptop = Peer::connect(&server, &laptop_id, Transport::WsJson).await;
    let (_, name) = next_matching(&mut laptop, |b| match b {
        Body::ContactName(n) => Some(n.name.clone()),
        _ => None,
    })
    .await;
    assert_eq!(name, "Bob the Builder");
    assert_eq!(laptop.handle().contact_names().await.unwrap().len(), 1);

    let long = "x".repeat(65);
    assert_eq!(code(alice.handle().set_contact_name(BOB, &long).await.unwrap_err()), ErrorCode::InvalidArgument);
    assert_eq!(code(alice.handle().set_contact_name(BOB, "a\u{7}b").await.unwrap_err()), ErrorCode::InvalidArgument);
    assert_eq!(code(alice.handle().set_contact_name(ALICE, "me").await.unwrap_err()), ErrorCode::InvalidArgument);
    assert_eq!(
        code(alice.handle().set_contact_name("+15552109999", "x").await.unwrap_err()),
        ErrorCode::UnknownRecipient
    );
    alice.handle().set_contact_name(BOB, "").await.unwrap();
    assert!(laptop.handle().contact_names().await.unwrap().is_empty(), "forgotten everywhere");
}
