//! Several devices per account: linking without SMS, fan-out, replacement,
//! removal, history.

use crate::harness::{EVENT_WAIT, Log, Peer, TestServer, Transport, test_config};
use skylark_client::api::LinkStatus;
use skylark_client::identity::generate_key;
use skylark_client::session::{Event, LogEvent, log_event};
use skylark_client::{Identity, Session};
use skylark_protocol::v1::event::Body;
use skylark_protocol::v1::{ReceiptKind, device_change::Change};
use skylark_protocol::{CloseCode, ErrorCode};
use std::collections::{BTreeSet, HashMap};
use std::net::IpAddr;

/// Links a new device to `approver`'s account; returns its identity.
pub(crate) async fn link(server: &TestServer, approver: &Peer, name: &str) -> Identity {
    link_from(server, &approver.handle(), &approver.identity, name).await
}

/// [`link`], approved on any session of the approving device.
pub(crate) async fn link_from(
    server: &TestServer,
    approver: &skylark_client::session::SessionHandle,
    identity: &Identity,
    name: &str,
) -> Identity {
    let api = server.api();
    let key = generate_key();
    let link = api.create_link(&key.verifying_key().to_bytes(), name).await.unwrap();
    assert_eq!(link.code.len(), 9, "shown as ABCD-EFGH: {}", link.code);
    let waiting = {
        let api = server.api();
        let id = link.link_id.clone();
        tokio::spawn(async move { api.wait_link(&id, 10_000).await.unwrap() })
    };
    let device = approver.approve_link(&link.code.to_lowercase()).await.unwrap();
    assert_eq!(device.name, name);
    match waiting.await.unwrap() {
        LinkStatus::Approved { account_id, device_id, phone } => {
            assert_eq!((account_id, device_id), (identity.account_id, device.id));
            Identity::new(server.http_base(), account_id, device_id, phone, &key)
        }
        other => panic!("expected approval, got {other:?}"),
    }
}

/// Waits for the account's log to report a device change.
async fn device_change(peer: &mut Peer) -> Change {
    loop {
        let event = peer.next_entry().await;
        peer.handle().ack(event.seq).await.unwrap();
        if let Some(Body::DeviceChange(c)) = event.body {
            return c.change.unwrap();
        }
    }
}

#[tokio::test]
async fn linked_devices_get_everything_and_see_each_others_sends() {
    let server = TestServer::start().await;
    let alice_id = server.register("+15551000001").await;
    let bob_id = server.register("+15551000002").await;
    let mut phone = Peer::connect(&server, &alice_id, Transport::Tcp).await;
    assert_eq!(phone.next_log().await, Log::CaughtUp(0));

    let laptop_id = link(&server, &phone, "laptop").await;
    assert!(matches!(device_change(&mut phone).await, Change::Linked(d) if d.id == laptop_id.device_id));
    let mut laptop = Peer::connect(&server, &laptop_id, Transport::Ws).await;
    let tablet_id = link(&server, &laptop, "tablet").await;
    let mut tablet = Peer::connect(&server, &tablet_id, Transport::WsJson).await;
    assert_eq!(tablet.session.info.account_id, alice_id.account_id);
    // No SMS was sent for the links.
    assert_eq!(server.sms.count(), 2);

    // A message to Alice reaches all three devices.
    let bob = Peer::connect(&server, &bob_id, Transport::Tcp).await;
    bob.handle().send("+15551000001", "b1", b"to all of you".to_vec()).await.unwrap();
    for device in [&mut phone, &mut laptop, &mut tablet] {
        let got = device.received(1, true).await;
        assert_eq!(got[0].payload, b"to all of you".as_slice());
    }

    // What the laptop sends appears on the phone and the tablet.
    laptop.handle().send("+15551000002", "l1", b"from my laptop".to_vec()).await.unwrap();
    for device in [&mut phone, &mut tablet] {
        loop {
            let event = device.next_entry().await;
            device.handle().ack(event.seq).await.unwrap();
            if let Some(Body::Message(m)) = event.body
                && m.client_id == "l1"
            {
                assert_eq!(m.sender_device, laptop_id.device_id);
                assert_eq!(m.to_phone, "+15551000002");
                break;
            }
        }
    }

    // The device list shows all three, with this one marked.
    let list = tablet.handle().list_devices().await.unwrap();
    assert_eq!(list.len(), 3);
    assert!(list.iter().all(|d| d.online));
    assert_eq!(list.iter().filter(|d| d.current).map(|d| d.id).collect::<Vec<_>>(), vec![tablet_id.device_id]);
    tablet.handle().rename_device(laptop_id.device_id, "work laptop").await.unwrap();
    assert!(matches!(device_change(&mut phone).await, Change::Renamed(d) if d.name == "work laptop"));
    // The renamed device's own connection reports its new name.
    assert_eq!(laptop.handle().who_am_i().await.unwrap().device_name, "work laptop");
    // The laptop itself was not sent its message back (its ack is its
    // copy): the next entry it is sent is the rename, which came after.
    let next = laptop.next_entry().await;
    assert!(matches!(next.body, Some(Body::DeviceChange(_))), "{next:?}");
}

#[tokio::test]
async fn link_codes_are_single_use_expire_and_respect_the_device_limit() {
    let mut config = test_config();
    config.devices.max_devices = 2;
    let server = TestServer::start_with(config).await;
    let alice_id = server.register("+15551000011").await;
    let phone = Peer::connect(&server, &alice_id, Transport::Tcp).await;
    let api = server.api();

    // Used once, then unknown.
    let key = generate_key();
    let first = api.create_link(&key.verifying_key().to_bytes(), "laptop").await.unwrap();
    phone.handle().approve_link(&first.code).await.unwrap();
    let reused = phone.handle().approve_link(&first.code).await.unwrap_err();
    assert_eq!(reused.error_code(), Some(ErrorCode::UnknownLinkCode));

    // Over the limit: refused, and the code stays usable.
    let key = generate_key();
    let second = api.create_link(&key.verifying_key().to_bytes(), "tablet").await.unwrap();
    let full = phone.handle().approve_link(&second.code).await.unwrap_err();
    assert_eq!(full.error_code(), Some(ErrorCode::DeviceLimit));
    let laptop = phone.handle().list_devices().await.unwrap().into_iter().find(|d| !d.current).unwrap();
    phone.handle().remove_device(laptop.id).await.unwrap();
    phone.handle().approve_link(&second.code).await.unwrap();

    // Expired: refused, and the waiting device is told.
    let key = generate_key();
    let third = api.create_link(&key.verifying_key().to_bytes(), "old").await.unwrap();
    server.clock.advance_ms(third.expires_in_ms + 1);
    let late = phone.handle().approve_link(&third.code).await.unwrap_err();
    assert_eq!(late.error_code(), Some(ErrorCode::LinkExpired));
    assert_eq!(api.wait_link(&third.link_id, 10).await.unwrap(), LinkStatus::Expired);

    // A wrong code is just unknown.
    let wrong = phone.handle().approve_link("ZZZZ-ZZZZ").await.unwrap_err();
    assert_eq!(wrong.error_code(), Some(ErrorCode::UnknownLinkCode));
}

#[tokio::test]
async fn removed_device_is_closed_purged_and_refused_mid_traffic() {
    let server = TestServer::start().await;
    let alice_id = server.register("+15551000021").await;
    let bob_id = server.register("+15551000022").await;
    let mut phone = Peer::connect(&server, &alice_id, Transport::Tcp).await;
    let laptop_id = link(&server, &phone, "laptop").await;
    let mut laptop = Peer::connect(&server, &laptop_id, Transport::Ws).await;
    let bob = Peer::connect(&server, &bob_id, Transport::Tcp).await;

    const N: usize = 60;
    let sender = {
        let handle = bob.handle();
        tokio::spawn(async move {
            for i in 0..N {
                handle.send("+15551000021", &format!("m{i}"), vec![i as u8]).await.unwrap();
            }
        })
    };
    // The laptop takes part of the stream, then the phone removes it.
    let early = laptop.received(5, true).await;
    assert_eq!(early.len(), 5);
    phone.handle().remove_device(laptop_id.device_id).await.unwrap();
    let code = loop {
        match tokio::time::timeout(EVENT_WAIT, laptop.events.recv()).await.unwrap() {
            Some(Event::Closed { code, .. }) => break code,
            Some(Event::Frame(_)) => continue,
            None => panic!("no close"),
        }
    };
    assert_eq!(code, Some(CloseCode::DeviceRemoved));
    let refused = Session::open(&server.endpoint(Transport::Tcp), &laptop_id).await.unwrap_err();
    assert_eq!(refused.error_code(), Some(ErrorCode::DeviceRemoved));

    // The phone still gets every message, in order.
    sender.await.unwrap();
    let all = phone.received(N, true).await;
    assert_eq!(all.iter().map(|m| m.payload[0] as usize).collect::<Vec<_>>(), (0..N).collect::<Vec<_>>());
    assert_eq!(phone.handle().list_devices().await.unwrap().len(), 1);
}

#[tokio::test]
async fn duplicate_credentials_newest_wins_and_nothing_is_shown_twice_or_lost() {
    let server = TestServer::start().await;
    let alice_id = server.register("+15551000031").await;
    let bob_id = server.register("+15551000032").await;
    let bob = Peer::connect(&server, &bob_id, Transport::Tcp).await;

    const N: usize = 150;
    let sender = {
        let handle = bob.handle();
        tokio::spawn(async move {
            for i in 0..N {
                handle.send("+15551000031", &format!("m{i}"), i.to_string().into_bytes()).await.unwrap();
            }
        })
    };

    // The same device credentials connect again and again, alternating
    // between two source addresses, while Bob sends.
    let addresses: [IpAddr; 2] = ["127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap()];
    let mut shown: Vec<String> = Vec::new();
    let mut seen: BTreeSet<u64> = BTreeSet::new();
    let mut acked_by: HashMap<u64, usize> = HashMap::new();
    let mut round = 0;
    let mut current =
        Session::open_from(&server.endpoint(Transport::Tcp), &alice_id, Some(addresses[0])).await.unwrap();
    while shown.len() < N {
        round += 1;
        let (session, mut events) = current;
        // Take a few events on this connection, acknowledging as we go.
        let mut taken = 0;
        while taken < 20 && shown.len() < N {
            let event = tokio::time::timeout(EVENT_WAIT, events.recv()).await.unwrap().unwrap();
            let Event::Frame(frame) = event else { panic!("closed early: {event:?}") };
            if let Some(LogEvent::Entry(e)) = log_event(&frame) {
                session.handle().ack(e.seq).await.unwrap();
                *acked_by.entry(e.seq).or_default() += 1;
                if let Some(Body::Message(m)) = &e.body
                    && seen.insert(e.seq)
                {
                    shown.push(String::from_utf8(m.payload.to_vec()).unwrap());
                }
                taken += 1;
            }
        }
        // A round trip after the acks: the server has taken them (acks are
        // queued to the account's actor before the Pong is sent) before the
        // next connection attaches.
        session.handle().ping().await.unwrap();
        // The same device again, from the other address: the new one wins.
        let next =
            Session::open_from(&server.endpoint(Transport::Tcp), &alice_id, Some(addresses[round % 2])).await.unwrap();
        // Entries already in flight to the old connection may still arrive
        // before its close; they were not acknowledged there, so the new
        // connection gets them again: at least once, shown once.
        let code = loop {
            match tokio::time::timeout(EVENT_WAIT, events.recv()).await.unwrap() {
                Some(Event::Closed { code, .. }) => break code,
                Some(Event::Frame(_)) => continue,
                None => panic!("events ended without a close"),
            }
        };
        assert_eq!(code, Some(CloseCode::Replaced));
        drop(session);
        current = next;
    }
    sender.await.unwrap();
    assert!(round >= 3, "replaced {round} times");
    let expect: Vec<String> = (0..N).map(|i| i.to_string()).collect();
    assert_eq!(shown, expect, "every message shown once, in order, none lost");
    // No entry was acknowledged on two connections: once the server has
    // taken a connection's ack, no other connection is handed that entry.
    assert!(acked_by.values().all(|n| *n == 1), "an acked entry was handed out again");
}

#[tokio::test]
async fn a_new_device_pages_back_through_history_with_receipt_state() {
    let server = TestServer::start().await;
    let alice_id = server.register("+15551000041").await;
    let bob_id = server.register("+15551000042").await;
    let mut alice = Peer::connect(&server, &alice_id, Transport::Tcp).await;
    let mut bob = Peer::connect(&server, &bob_id, Transport::Tcp).await;
    for i in 0..5u8 {
        alice.handle().send("+15551000042", &format!("a{i}"), vec![i]).await.unwrap();
        bob.handle().send("+15551000041", &format!("b{i}"), vec![100 + i]).await.unwrap();
    }
    let got = bob.received(5, true).await;
    bob.handle().mark_read(alice_id.account_id, got[2].id.unwrap().seq).await.unwrap();
    alice.receipt(ReceiptKind::Read, got[2].id.unwrap().seq).await;

    // A laptop linked now starts live at the end, and pages back.
    let laptop_id = link(&server, &alice, "laptop").await;
    let laptop = Peer::connect(&server, &laptop_id, Transport::Ws).await;
    let mut messages = Vec::new();
    let mut before = 0;
    let mut pages = 0;
    loop {
        let page = laptop.handle().history(before, 4).await.unwrap();
        pages += 1;
        let seqs: Vec<u64> = page.events.iter().map(|e| e.seq).collect();
        assert!(seqs.windows(2).all(|w| w[0] > w[1]), "newest first: {seqs:?}");
        for e in &page.events {
            if let Some(Body::Message(m)) = &e.body {
                messages.push(m.payload[0]);
            }
        }
        let receipts = page.receipts.iter().find(|r| r.peer == bob_id.account_id).expect("receipts for Bob");
        assert_eq!(receipts.peer_phone, "+15551000042");
        assert!(receipts.read_up_to >= 3 && receipts.delivered_up_to >= receipts.read_up_to);
        match page.events.last() {
            Some(last) if page.has_more => before = last.seq,
            _ => break,
        }
    }
    assert!(pages >= 3, "{pages} pages");
    messages.reverse();
    let mut expect: Vec<u8> = (0..5).flat_map(|i| [i, 100 + i]).collect();
    expect.sort();
    let mut sorted = messages.clone();
    sorted.sort();
    assert_eq!(sorted, expect, "the whole conversation, both directions");
    // A page size over the maximum is clamped, not refused.
    assert!(laptop.handle().history(0, 10_000).await.unwrap().events.len() <= 200);
}
