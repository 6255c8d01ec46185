//! Deleting for everyone, editing and disappearing messages, over the real
//! protocol: what the server checks (whose message, how old), what it does
//! to every stored copy (purges the payload), and what every device — one
//! of them offline at the time — is told.

use crate::harness::{Peer, TestServer, Transport};
use skylark_client::ClientError;
use skylark_client::session::{SendOptions, To};
use skylark_core::AccountId;
use skylark_core::group::GroupBody;
use skylark_core::message::LogEntry;
use skylark_protocol::ErrorCode;
use skylark_protocol::v1::event::Body;
use skylark_protocol::v1::{self, group_event};

const ALICE: &str = "+15552300001";
const BOB: &str = "+15552300002";
const CAROL: &str = "+15552300003";

const DAY_MS: u64 = 86_400_000;

fn code(e: ClientError) -> ErrorCode {
    e.error_code().unwrap_or_else(|| panic!("expected a refusal, got {e}"))
}

async fn send(peer: &Peer, to: To<'_>, text: &str, options: SendOptions) -> Result<v1::SendAck, ClientError> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    let id = format!("conv-{}", NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst));
    peer.handle().send_with(to, &id, text.as_bytes().to_vec(), options).await
}

/// The next 1:1 message or group post of `peer`'s log (acknowledging
/// everything on the way).
async fn next_post(peer: &mut Peer) -> v1::Event {
    loop {
        let event = peer.next_entry().await;
        peer.handle().ack(event.seq).await.unwrap();
        match &event.body {
            Some(Body::Message(_)) => return event,
            Some(Body::Group(g)) if matches!(g.body, Some(group_event::Body::Message(_))) => return event,
            _ => {}
        }
    }
}

fn message(event: &v1::Event) -> &v1::Message {
    match &event.body {
        Some(Body::Message(m)) => m,
        other => panic!("expected a message, got {other:?}"),
    }
}

fn post(event: &v1::Event) -> (&v1::GroupEvent, &v1::GroupMessage) {
    match &event.body {
        Some(Body::Group(g)) => match &g.body {
            Some(group_event::Body::Message(m)) => (g, m),
            other => panic!("expected a post, got {other:?}"),
        },
        other => panic!("expected a group event, got {other:?}"),
    }
}

/// Every stored payload (1:1 messages and posts) of these logs that holds
/// `marker`, as (log, seq): what a scan of the store's data finds.
async fn stored_with(server: &TestServer, logs: &[u64], marker: &str) -> Vec<(u64, u64)> {
    let mut found = Vec::new();
    for &account in logs {
        for (seq, entry) in server.store.read_log(AccountId(account), 1, 100_000).await.unwrap() {
            let payload = match &entry {
                LogEntry::Message(m) => m.payload.clone(),
                LogEntry::Group(e) => match &e.body {
                    GroupBody::Message { payload, .. } => payload.clone(),
                    _ => continue,
                },
                _ => continue,
            };
            if payload.windows(marker.len()).any(|w| w == marker.as_bytes()) {
                found.push((account, seq));
            }
        }
    }
    found
}

/// Waits (a few seconds at most) until no stored payload of `logs` holds
/// `marker`: forwards to other members' logs land a moment after the ack.
async fn until_gone(server: &TestServer, logs: &[u64], marker: &str) -> Vec<(u64, u64)> {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let left = stored_with(server, logs, marker).await;
        if left.is_empty() || tokio::time::Instant::now() > deadline {
            return left;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The stored entry `seq` of `account`'s log is a purged message or post.
async fn purged_in_store(server: &TestServer, account: u64, seq: u64) -> bool {
    let entries = server.store.read_log(AccountId(account), seq, 1).await.unwrap();
    match entries.first() {
        Some((s, entry)) if *s == seq => skylark_store::entry_meta(entry).is_some_and(|m| m.purged),
        _ => false,
    }
}

#[tokio::test]
async fn a_message_deleted_for_everyone_is_purged_from_every_copy_and_every_device_learns_it() {
    let server = TestServer::start().await;
    let alice_id = server.register(ALICE).await;
    let bob_id = server.register(BOB).await;
    let alice = Peer::connect(&server, &alice_id, Transport::Tcp).await;
    let mut bob = Peer::connect(&server, &bob_id, Transport::Ws).await;
    // Bob's laptop is linked, then stays offline until it is all over.
    let laptop_id = crate::devices::link(&server, &bob, "laptop").await;

    let marker = "delete-me-marker-51";
    let sent = send(&alice, To::Phone(BOB), marker, SendOptions::default()).await.unwrap();
    let seq = sent.id.unwrap().seq;
    let original = next_post(&mut bob).await;
    assert_eq!(message(&original).payload.as_ref(), marker.as_bytes());
    let kept = send(&alice, To::Phone(BOB), "a message that stays", SendOptions::default()).await.unwrap();
    next_post(&mut bob).await;
    assert_eq!(stored_with(&server, &[alice_id.account_id, bob_id.account_id], marker).await.len(), 2);

    // Nobody else can delete it, nor delete what is not a message of theirs to that chat.
    let by_bob = SendOptions { deletes: Some(seq), ..SendOptions::default() };
    let refused = send(&bob, To::Phone(ALICE), "", by_bob).await.unwrap_err();
    assert_eq!(code(refused), ErrorCode::UnknownMessage);
    let to_carol = server.register(CAROL).await;
    let wrong_chat = SendOptions { deletes: Some(seq), ..SendOptions::default() };
    let refused = send(&alice, To::Phone(CAROL), "", wrong_chat).await.unwrap_err();
    assert_eq!(code(refused), ErrorCode::UnknownMessage, "Alice's message went to Bob, not to Carol");
    let _ = to_carol;

    let deletion = SendOptions { deletes: Some(seq), ..SendOptions::default() };
    let notice = send(&alice, To::Phone(BOB), "", deletion).await.unwrap();
    let seen = next_post(&mut bob).await;
    assert_eq!(message(&seen).deletes, Some(seq), "Bob's device is told which message went");
    assert_eq!(message(&seen).id, notice.id);

    // The stored copies: in Alice's log and in Bob's, purged; nothing holds the text.
    assert!(purged_in_store(&server, alice_id.account_id, seq).await);
    assert!(
        stored_with(&server, &[alice_id.account_id, bob_id.account_id], marker).await.is_empty(),
        "the deleted text is nowhere in the store's data"
    );
    assert_eq!(stored_with(&server, &[bob_id.account_id], "a message that stays").await.len(), 1);

    // Bob's laptop, offline all along, gets the original as a tombstone, then the deletion.
    let mut laptop = Peer::connect(&server, &laptop_id, Transport::Tcp).await;
    let first = next_post(&mut laptop).await;
    let m = message(&first);
    assert_eq!(m.id, sent.id);
    assert!(m.purged && m.payload.is_empty(), "{m:?}");
    next_post(&mut laptop).await; // the message that stays
    assert_eq!(message(&next_post(&mut laptop).await).deletes, Some(seq));
    // History says the same.
    let page = bob.handle().history(0, 50).await.unwrap();
    let in_history = page
        .events
        .iter()
        .filter_map(|e| match &e.body {
            Some(Body::Message(m)) if m.id == sent.id => Some(m.clone()),
            _ => None,
        })
        .next()
        .expect("the original is in Bob's history");
    assert!(in_history.purged && in_history.payload.is_empty());

    // Once deleted, it stays deleted; and after the window nothing can be deleted.
    let again = SendOptions { deletes: Some(seq), ..SendOptions::default() };
    assert_eq!(code(send(&alice, To::Phone(BOB), "", again).await.unwrap_err()), ErrorCode::MessageNotChangeable);
    server.clock.advance_ms(2 * DAY_MS + 1);
    let late = SendOptions { deletes: Some(kept.id.unwrap().seq), ..SendOptions::default() };
    let refused = send(&alice, To::Phone(BOB), "", late).await.unwrap_err();
    assert_eq!(code(refused.clone()), ErrorCode::MessageNotChangeable);
    assert!(refused.to_string().contains("within 2 days of sending"), "in words: {refused}");
}

#[tokio::test]
async fn an_edit_is_the_authors_own_within_its_window_and_reaches_every_device() {
    let server = TestServer::start().await;
    let alice_id = server.register(ALICE).await;
    let bob_id = server.register(BOB).await;
    let alice = Peer::connect(&server, &alice_id, Transport::Ws).await;
    let mut bob = Peer::connect(&server, &bob_id, Transport::Tcp).await;

    let sent = send(&alice, To::Phone(BOB), "lunch at 12?", SendOptions::default()).await.unwrap();
    let seq = sent.id.unwrap().seq;
    next_post(&mut bob).await;
    let edit = SendOptions { edits: Some(seq), ..SendOptions::default() };
    send(&alice, To::Phone(BOB), "lunch at 1?", edit).await.unwrap();
    let seen = next_post(&mut bob).await;
    assert_eq!((message(&seen).edits, message(&seen).payload.as_ref()), (Some(seq), b"lunch at 1?".as_slice()));
    // An edit is not itself edited, and someone else's message is not yours to edit.
    let notice_seq = seen.body.as_ref().map(|_| message(&seen).id.unwrap().seq).unwrap();
    let of_edit = SendOptions { edits: Some(notice_seq), ..SendOptions::default() };
    assert_eq!(code(send(&alice, To::Phone(BOB), "x", of_edit).await.unwrap_err()), ErrorCode::MessageNotChangeable);
    let by_bob = SendOptions { edits: Some(seq), ..SendOptions::default() };
    assert_eq!(code(send(&bob, To::Phone(ALICE), "x", by_bob).await.unwrap_err()), ErrorCode::UnknownMessage);
    let both = SendOptions { edits: Some(seq), deletes: Some(seq), ..SendOptions::default() };
    assert_eq!(code(send(&alice, To::Phone(BOB), "x", both).await.unwrap_err()), ErrorCode::InvalidArgument);
    // Fifteen minutes later it is too late.
    server.clock.advance_ms(15 * 60_000 + 1);
    let late = SendOptions { edits: Some(seq), ..SendOptions::default() };
    let refused = send(&alice, To::Phone(BOB), "lunch at 2?", late).await.unwrap_err();
    assert_eq!(code(refused.clone()), ErrorCode::MessageNotChangeable);
    assert!(refused.to_string().contains("within 15 minutes of sending"), "{refused}");
}

#[tokio::test]
async fn disappearing_messages_are_purged_from_the_store_by_the_server_and_never_handed_out_late() {
    let server = TestServer::start().await;
    let alice_id = server.register(ALICE).await;
    let bob_id = server.register(BOB).await;
    let alice = Peer::connect(&server, &alice_id, Transport::Tcp).await;
    let mut bob = Peer::connect(&server, &bob_id, Transport::Tcp).await;
    let laptop_id = crate::devices::link(&server, &bob, "laptop").await;

    let marker = "disappearing-marker-77";
    let timed = SendOptions { expire_after_ms: DAY_MS, ..SendOptions::default() };
    let sent = send(&alice, To::Phone(BOB), marker, timed).await.unwrap();
    let seen = next_post(&mut bob).await;
    assert_eq!(message(&seen).expires_at_ms, sent.sent_at_ms + DAY_MS, "devices know when to hide it");
    send(&alice, To::Phone(BOB), "forever-marker", SendOptions::default()).await.unwrap();
    next_post(&mut bob).await;
    let bad = SendOptions { expire_after_ms: 10, ..SendOptions::default() };
    assert_eq!(code(send(&alice, To::Phone(BOB), "x", bad).await.unwrap_err()), ErrorCode::InvalidArgument);

    let logs = [alice_id.account_id, bob_id.account_id];
    assert_eq!(server.server.expire_messages().await.unwrap(), 0, "nothing is due yet");
    assert_eq!(stored_with(&server, &logs, marker).await.len(), 2);

    server.clock.advance_ms(DAY_MS + 1);
    // Before the sweep, a device that had not had it yet gets it empty.
    let mut laptop = Peer::connect(&server, &laptop_id, Transport::Ws).await;
    let late = next_post(&mut laptop).await;
    assert!(message(&late).purged && message(&late).payload.is_empty(), "never handed out after its time");

    assert_eq!(server.server.expire_messages().await.unwrap(), 2, "the sender's copy and the recipient's");
    assert!(stored_with(&server, &logs, marker).await.is_empty(), "no stored copy holds the text");
    assert!(purged_in_store(&server, bob_id.account_id, message(&seen).id.map(|_| seen.seq).unwrap()).await);
    assert_eq!(stored_with(&server, &logs, "forever-marker").await.len(), 2, "only what was due");
    assert_eq!(server.server.expire_messages().await.unwrap(), 0);
}

#[tokio::test]
async fn group_posts_are_deleted_edited_and_expire_in_the_group_and_in_every_members_copy() {
    let server = TestServer::start().await;
    let alice_id = server.register(ALICE).await;
    let bob_id = server.register(BOB).await;
    let carol_id = server.register(CAROL).await;
    let alice = Peer::connect(&server, &alice_id, Transport::Tcp).await;
    let mut bob = Peer::connect(&server, &bob_id, Transport::Tcp).await;
    let group = alice.handle().create_group("plans", &[BOB, CAROL]).await.unwrap().id;
    let to = To::Group(group);

    let marker = "group-delete-marker-3";
    let sent = send(&alice, to, marker, SendOptions::default()).await.unwrap();
    let seq = sent.id.unwrap().seq;
    let timed = SendOptions { expire_after_ms: 60_000, ..SendOptions::default() };
    send(&alice, to, "group-timed-marker-4", timed).await.unwrap();
    let first = next_post(&mut bob).await;
    assert_eq!(post(&first).1.payload.as_ref(), marker.as_bytes());
    next_post(&mut bob).await;
    let logs = [group, alice_id.account_id, bob_id.account_id, carol_id.account_id];
    assert_eq!(stored_with(&server, &logs, marker).await.len(), 4, "the group's log and each member's copy");

    // Bob cannot delete Alice's post; Alice can.
    let by_bob = SendOptions { deletes: Some(seq), ..SendOptions::default() };
    assert_eq!(code(send(&bob, to, "", by_bob).await.unwrap_err()), ErrorCode::UnknownMessage);
    let edit = SendOptions { edits: Some(seq), ..SendOptions::default() };
    send(&alice, to, "edited in the group", edit).await.unwrap();
    let edited = next_post(&mut bob).await;
    assert_eq!(post(&edited).1.edits, Some(seq));
    let deletion = SendOptions { deletes: Some(seq), ..SendOptions::default() };
    send(&alice, to, "", deletion).await.unwrap();
    let notice = next_post(&mut bob).await;
    assert_eq!(post(&notice).1.deletes, Some(seq));
    assert!(purged_in_store(&server, group, seq).await, "the group's own log");
    assert_eq!(until_gone(&server, &logs, marker).await, vec![], "and every member's copy");

    // Carol was offline: her backlog has the tombstone.
    let mut carol = Peer::connect(&server, &carol_id, Transport::Ws).await;
    let (g, m) = {
        let event = next_post(&mut carol).await;
        let (g, m) = post(&event);
        (g.clone(), m.clone())
    };
    assert_eq!(g.group_seq, seq);
    assert!(m.purged && m.payload.is_empty());

    // An encryption commit carries keys, nothing to edit, delete or time.
    let commit = v1::SendMessage {
        client_id: "commit-with-meta".into(),
        group,
        payload: b"\0SKMLS1commit".to_vec().into(),
        commit_epoch: Some(0),
        deletes: Some(seq),
        ..Default::default()
    };
    let refused = alice.handle().request(v1::client_frame::Body::Send(commit)).await.unwrap_err();
    assert_eq!(code(refused), ErrorCode::InvalidArgument);
    // An encrypted message's epoch belongs on a group post, and a post is a
    // commit or a message, not both.
    let both = v1::SendMessage {
        client_id: "commit-and-message".into(),
        group,
        payload: b"\0SKMLS1both".to_vec().into(),
        commit_epoch: Some(0),
        message_epoch: Some(0),
        ..Default::default()
    };
    let refused = alice.handle().request(v1::client_frame::Body::Send(both)).await.unwrap_err();
    assert_eq!(code(refused), ErrorCode::InvalidArgument);
    let to_a_person = v1::SendMessage {
        client_id: "message-epoch-to-a-person".into(),
        to: BOB.into(),
        payload: b"\0SKMLS1sealed".to_vec().into(),
        message_epoch: Some(0),
        ..Default::default()
    };
    let refused = alice.handle().request(v1::client_frame::Body::Send(to_a_person)).await.unwrap_err();
    assert_eq!(code(refused), ErrorCode::InvalidArgument);

    server.clock.advance_ms(60_001);
    assert_eq!(server.server.expire_messages().await.unwrap(), 4);
    assert!(stored_with(&server, &logs, "group-timed-marker-4").await.is_empty());
}
