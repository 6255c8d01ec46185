//! An account as a whole, over the real protocol: exporting its data, and
//! deleting it (by its owner, and by an operator).

use crate::harness::{ADMIN_TOKEN, EVENT_WAIT, Peer, TestServer, Transport};
use skylark_client::ClientError;
use skylark_client::api::Api;
use skylark_client::session::Event;
use skylark_core::{AccountId, PhoneNumber};
use skylark_protocol::v1::event::Body;
use skylark_protocol::v1::group_event;
use skylark_protocol::{CloseCode, ErrorCode};

const ALICE: &str = "+15552300001";
const BOB: &str = "+15552300002";
const CAROL: &str = "+15552300003";

/// Waits until `peer`'s session is closed; its close code.
async fn closed(peer: &mut Peer) -> Option<CloseCode> {
    loop {
        match tokio::time::timeout(EVENT_WAIT, peer.events.recv()).await.expect("timed out waiting for a close") {
            Some(Event::Closed { code, .. }) => return code,
            Some(Event::Frame(_)) => continue,
            None => return None,
        }
    }
}

#[tokio::test]
async fn an_account_exports_its_data_then_deletes_itself_and_its_number_is_free() {
    let server = TestServer::start().await;
    let alice_id = server.register(ALICE).await;
    let bob_id = server.register(BOB).await;
    server.register(CAROL).await;
    let mut alice = Peer::connect(&server, &alice_id, Transport::Tcp).await;
    let laptop_id = crate::devices::link(&server, &alice, "laptop").await;
    let mut bob = Peer::connect(&server, &bob_id, Transport::Ws).await;
    let club = alice.handle().create_group("club", &[BOB, CAROL]).await.unwrap();
    alice.handle().block(CAROL, true).await.unwrap();
    alice.handle().set_pin(Some("424242")).await.unwrap();
    alice.handle().send(BOB, "a1", b"hello bob".to_vec()).await.unwrap();
    bob.handle().send(ALICE, "b1", b"hello alice".to_vec()).await.unwrap();
    alice.received(1, true).await;

    let json: serde_json::Value = serde_json::from_str(&alice.handle().export_account().await.unwrap()).unwrap();
    assert_eq!(json["account"]["phone"], ALICE);
    assert_eq!(json["account"]["id"], alice_id.account_id);
    assert_eq!(json["devices"].as_array().unwrap().len(), 2, "{json}");
    assert_eq!(json["settings"]["two_step_verification"], true);
    assert_eq!(json["settings"]["presence_visible_to"], "everyone");
    assert_eq!(json["blocked"][0]["phone"], CAROL);
    let group = &json["groups"].as_array().unwrap().iter().find(|g| g["id"] == club.id).expect("the club").clone();
    assert_eq!((group["subject"].as_str(), group["admin"].as_bool()), (Some("club"), Some(true)));
    assert_eq!(group["members"].as_array().unwrap().len(), 3);
    let text = json.to_string();
    assert!(!text.contains("hello bob") && !text.contains("hello alice"), "no messages in it");
    assert!(!text.contains("424242"), "never the PIN");

    // The number must be typed as a confirmation.
    let e = alice.handle().delete_account(BOB).await.unwrap_err();
    assert_eq!(e.error_code(), Some(ErrorCode::InvalidArgument));
    assert!(e.to_string().contains(ALICE), "{e}");

    match alice.handle().delete_account(ALICE).await {
        Ok(()) | Err(ClientError::Closed { code: Some(CloseCode::DeviceRemoved), .. }) => {}
        Err(e) => panic!("{e}"),
    }
    assert_eq!(closed(&mut alice).await, Some(CloseCode::DeviceRemoved), "signed out");
    // The laptop (offline meanwhile) cannot sign in any more.
    let refused = skylark_client::Session::open(&server.endpoint(Transport::Tcp), &laptop_id).await.err();
    assert_eq!(refused.and_then(|e| e.error_code()), Some(ErrorCode::DeviceRemoved));

    // Bob sees her leave the group, and can no longer write to her number.
    loop {
        let event = bob.next_entry().await;
        bob.handle().ack(event.seq).await.unwrap();
        if let Some(Body::Group(g)) = event.body
            && g.group == club.id
            && matches!(g.body, Some(group_event::Body::Left(_)))
        {
            assert_eq!(g.by, alice_id.account_id);
            break;
        }
    }
    let info = bob.handle().group_info(club.id).await.unwrap();
    assert_eq!(info.members.len(), 2);
    let e = bob.handle().send(ALICE, "b2", b"are you there".to_vec()).await.unwrap_err();
    assert_eq!(e.error_code(), Some(ErrorCode::UnknownRecipient));
    // The server keeps nothing of hers.
    let old = AccountId(alice_id.account_id);
    assert_eq!(server.store.account_by_phone(&PhoneNumber::parse(ALICE).unwrap()).await.unwrap(), None);
    assert!(server.store.read_log(old, 1, 100).await.unwrap().is_empty());
    assert_eq!(server.store.pin(old).await.unwrap(), None);
    assert!(server.store.blocked(old).await.unwrap().is_empty());

    // The number signs up again: a new, empty account, no PIN asked.
    let again = server.register(ALICE).await;
    assert_ne!(again.account_id, alice_id.account_id);
    let fresh = Peer::connect(&server, &again, Transport::Tcp).await;
    assert!(fresh.handle().list_groups().await.unwrap().is_empty());
    assert!(!fresh.handle().pin_status().await.unwrap().enabled);
    assert!(fresh.handle().history(0, 50).await.unwrap().events.is_empty());
    // And Bob reaches the new account at that number.
    bob.handle().send(ALICE, "b3", b"welcome back".to_vec()).await.unwrap();
    let mut fresh = fresh;
    assert_eq!(fresh.received(1, true).await[0].payload.to_vec(), b"welcome back");
}

#[tokio::test]
async fn an_operator_deletes_an_account_from_the_admin_api() {
    let server = TestServer::start().await;
    let bob_id = server.register(BOB).await;
    let carol_id = server.register(CAROL).await;
    let mut carol = Peer::connect(&server, &carol_id, Transport::Ws).await;
    let bob = Peer::connect(&server, &bob_id, Transport::Tcp).await;
    let group = bob.handle().create_group("pair", &[CAROL]).await.unwrap();

    let admin = Api::new(&server.admin_base()).unwrap().with_bearer(ADMIN_TOKEN);
    let done: serde_json::Value = admin.call("DELETE", &format!("/admin/v1/accounts/{CAROL}"), None).await.unwrap();
    assert_eq!(
        (done["phone"].as_str(), done["devices_removed"].as_u64(), done["groups_left"].as_u64()),
        (Some(CAROL), Some(1), Some(1))
    );
    assert_eq!(closed(&mut carol).await, Some(CloseCode::DeviceRemoved));
    let again = admin.call::<serde_json::Value>("DELETE", &format!("/admin/v1/accounts/{CAROL}"), None).await;
    assert!(again.unwrap_err().to_string().contains("no account has"), "a second time: not found");
    assert_eq!(bob.handle().group_info(group.id).await.unwrap().members.len(), 1);
}

#[tokio::test]
async fn a_conversation_is_reported_with_metadata_only_and_the_operator_lists_it() {
    let server = TestServer::start().await;
    let alice_id = server.register(ALICE).await;
    let bob_id = server.register(BOB).await;
    let mut alice = Peer::connect(&server, &alice_id, Transport::Tcp).await;
    let bob = Peer::connect(&server, &bob_id, Transport::Ws).await;
    for i in 0..7 {
        bob.handle().send(ALICE, &format!("spam-{i}"), format!("buy now {i}").into_bytes()).await.unwrap();
    }
    alice.received(7, true).await;
    let group = bob.handle().create_group("deals", &[ALICE]).await.unwrap();
    bob.handle().send_to_group(group.id, "g1", b"group spam".to_vec()).await.unwrap();

    assert_eq!(
        alice.handle().report(ALICE, 0, false).await.unwrap_err().error_code(),
        Some(ErrorCode::InvalidArgument)
    );
    assert_eq!(
        alice.handle().report("+15552309999", 0, false).await.unwrap_err().error_code(),
        Some(ErrorCode::UnknownRecipient)
    );
    alice.handle().report(BOB, 0, true).await.unwrap();
    alice.handle().report("", group.id, false).await.unwrap();
    assert_eq!(alice.handle().list_blocked().await.unwrap()[0].phone, BOB, "reported and blocked");

    let admin = Api::new(&server.admin_base()).unwrap().with_bearer(ADMIN_TOKEN);
    let reports: serde_json::Value = admin.call("GET", "/admin/v1/reports", None).await.unwrap();
    let reports = reports.as_array().unwrap();
    assert_eq!(reports.len(), 2);
    let (newest, first) = (&reports[0], &reports[1]);
    assert_eq!(
        (first["reporter"].as_str(), first["reported"].as_str(), first["blocked"].as_bool()),
        (Some(ALICE), Some(BOB), Some(true))
    );
    let messages = first["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 5, "the last five");
    assert_eq!(messages[0]["seq"], 7, "newest first");
    assert!(messages.iter().all(|m| m["sender"] == BOB && m["bytes"].as_u64() == Some(9)));
    assert!(newest["reported"].as_str().unwrap().contains("deals"), "{newest}");
    assert_eq!(newest["messages"].as_array().unwrap().len(), 1);
    let text = serde_json::Value::Array(reports.clone()).to_string();
    assert!(!text.contains("buy now") && !text.contains("group spam"), "never the text");
}

#[tokio::test]
async fn profiles_are_seen_as_their_owner_allows() {
    use skylark_protocol::v1::Visibility;
    let server = TestServer::start().await;
    let alice_id = server.register(ALICE).await;
    let bob_id = server.register(BOB).await;
    let carol_id = server.register(CAROL).await;
    let alice = Peer::connect(&server, &alice_id, Transport::Tcp).await;
    let bob = Peer::connect(&server, &bob_id, Transport::Ws).await;
    let carol = Peer::connect(&server, &carol_id, Transport::WsJson).await;
    let seen = |p: &skylark_protocol::v1::ProfileInfo| (p.visible, p.name.clone(), p.about.clone());

    assert!(!bob.handle().profiles(&[ALICE]).await.unwrap()[0].visible, "none set yet");
    let e = alice.handle().set_profile(&"x".repeat(26), "", Visibility::Unspecified).await.unwrap_err();
    assert_eq!(e.error_code(), Some(ErrorCode::InvalidArgument));
    assert!(e.to_string().contains("25 characters"), "{e}");
    alice.handle().set_profile(" Alice ", "at the beach", Visibility::Contacts).await.unwrap();
    let own = alice.handle().profiles(&[ALICE]).await.unwrap();
    assert_eq!(seen(&own[0]), (true, "Alice".into(), "at the beach".into()));
    assert_eq!(own[0].visible_to, Visibility::Contacts as i32, "its owner is told who may see it");
    // Contacts only: Bob once she wrote to him, Carol not.
    assert!(!bob.handle().profiles(&[ALICE]).await.unwrap()[0].visible);
    alice.handle().send(BOB, "hi", b"hi".to_vec()).await.unwrap();
    let to_bob = bob.handle().profiles(&[ALICE, "+15552309999"]).await.unwrap();
    assert_eq!(to_bob.len(), 1, "numbers without an account are left out");
    assert_eq!(seen(&to_bob[0]), (true, "Alice".into(), "at the beach".into()));
    assert_eq!(to_bob[0].visible_to, 0, "only its owner is told the setting");
    assert_eq!(seen(&carol.handle().profiles(&[ALICE]).await.unwrap()[0]), (false, String::new(), String::new()));
    // Their 1:1 conversation as a group (how the clients encrypt one):
    // Carol writing in it makes Alice nothing; Alice writing makes Carol
    // a contact too.
    let direct = carol.handle().open_direct(ALICE).await.unwrap();
    carol.handle().send_to_group(direct.id, "c1", b"sealed".to_vec()).await.unwrap();
    assert!(!carol.handle().profiles(&[ALICE]).await.unwrap()[0].visible);
    alice.handle().send_to_group(direct.id, "a1", b"sealed".to_vec()).await.unwrap();
    assert!(carol.handle().profiles(&[ALICE]).await.unwrap()[0].visible, "Alice wrote to Carol");
    // Everyone; but never someone she blocked.
    alice.handle().set_profile("Alice", "at the beach", Visibility::Everyone).await.unwrap();
    let dave_id = server.register("+15552300004").await;
    let dave = Peer::connect(&server, &dave_id, Transport::Tcp).await;
    assert!(dave.handle().profiles(&[ALICE]).await.unwrap()[0].visible);
    alice.handle().block(CAROL, true).await.unwrap();
    assert!(!carol.handle().profiles(&[ALICE]).await.unwrap()[0].visible);
    // Unspecified keeps the setting; nobody hides it from all but her.
    alice.handle().set_profile("Alice", "busy", Visibility::Unspecified).await.unwrap();
    assert_eq!(bob.handle().profiles(&[ALICE]).await.unwrap()[0].about, "busy");
    alice.handle().set_profile("Alice", "busy", Visibility::Nobody).await.unwrap();
    assert!(!bob.handle().profiles(&[ALICE]).await.unwrap()[0].visible);
    assert!(alice.handle().profiles(&[ALICE]).await.unwrap()[0].visible);
    let export: serde_json::Value = serde_json::from_str(&alice.handle().export_account().await.unwrap()).unwrap();
    assert_eq!(
        (export["profile"]["about"].as_str(), export["profile"]["visible_to"].as_str()),
        (Some("busy"), Some("nobody"))
    );
}

#[tokio::test]
async fn an_operator_traces_a_message_without_its_content() {
    use skylark_protocol::v1::ReceiptKind;
    let server = TestServer::start().await;
    let alice_id = server.register(ALICE).await;
    let bob_id = server.register(BOB).await;
    let mut alice = Peer::connect(&server, &alice_id, Transport::Tcp).await;
    let mut bob = Peer::connect(&server, &bob_id, Transport::Ws).await;
    let laptop_id = crate::devices::link(&server, &bob, "laptop").await;
    let admin = Api::new(&server.admin_base()).unwrap().with_bearer(ADMIN_TOKEN);
    let trace = async |id: String| {
        admin.call::<serde_json::Value>("GET", &format!("/admin/v1/messages/{id}"), None).await.unwrap()
    };

    let ack = alice.handle().send(BOB, "t1", b"secret words".to_vec()).await.unwrap();
    let id = ack.id.unwrap();
    let got = bob.received(1, true).await;
    bob.handle().mark_read(alice_id.account_id, got[0].id.unwrap().seq).await.unwrap();
    alice.receipt(ReceiptKind::Read, id.seq).await;
    let t = trace(format!("{}:{}", id.sender, id.seq)).await;
    assert_eq!(
        (t["sender_phone"].as_str(), t["to_name"].as_str(), t["bytes"].as_u64()),
        (Some(ALICE), Some(BOB), Some(12))
    );
    assert_eq!(t["accepted_at_ms"], ack.sent_at_ms);
    assert!(t["recipient_log_seq"].as_u64().is_some() && t["forward_pending"] == false, "{t}");
    assert!(t["delivered_receipt_at_ms"].as_u64().is_some() && t["read_receipt_at_ms"].as_u64().is_some(), "{t}");
    let reached = t["reached"].as_array().unwrap();
    assert_eq!(reached.len(), 2, "both of Bob's devices: {t}");
    let laptop = reached.iter().find(|r| r["who"] == laptop_id.device_id).unwrap();
    assert_eq!(laptop["delivered"], false, "the laptop never connected");
    assert!(!t.to_string().contains("secret words"), "never the content");

    // A message dropped by a block is accepted and never stored for Bob.
    bob.handle().block(ALICE, true).await.unwrap();
    let ack = alice.handle().send(BOB, "t2", b"blocked".to_vec()).await.unwrap();
    let id = ack.id.unwrap();
    let t = loop {
        let t = trace(format!("{}:{}", id.sender, id.seq)).await;
        if t["forward_pending"] == false {
            break t;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(t["recipient_log_seq"].is_null() && t["delivered_receipt_at_ms"].is_null(), "{t}");

    // A group post: per member.
    let group = bob.handle().create_group("g", &[ALICE]).await.unwrap();
    let ack = bob.handle().send_to_group(group.id, "p1", b"post".to_vec()).await.unwrap();
    let t = trace(format!("{}:{}", group.id, ack.id.unwrap().seq)).await;
    assert_eq!(t["to_name"], "group \"g\"");
    assert_eq!(t["reached"].as_array().unwrap().len(), 1);
    let e = admin.call::<serde_json::Value>("GET", "/admin/v1/messages/nonsense", None).await.unwrap_err();
    assert!(e.to_string().contains("ACCOUNT:SEQ"), "{e}");
    let e = admin.call::<serde_json::Value>("GET", "/admin/v1/messages/999:1", None).await.unwrap_err();
    assert!(e.to_string().contains("no message"), "{e}");
}
