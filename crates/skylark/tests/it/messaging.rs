//! 1:1 messaging over the real protocol: acks, delivery, receipts, order.

use crate::harness::{Log, Peer, TestServer, Transport, leave_a_forward, test_config};
use skylark_protocol::ErrorCode;
use skylark_protocol::v1::ReceiptKind;
use skylark_protocol::v1::event::Body;

#[tokio::test]
async fn online_message_is_acked_delivered_and_read() {
    let server = TestServer::start().await;
    let alice_id = server.register("+15550600001").await;
    let bob_id = server.register("+15550600002").await;
    let mut alice = Peer::connect(&server, &alice_id, Transport::Tcp).await;
    let mut bob = Peer::connect(&server, &bob_id, Transport::WsJson).await;
    assert_eq!(alice.next_log().await, Log::CaughtUp(0));
    assert_eq!(bob.next_log().await, Log::CaughtUp(0));

    let ack = alice.handle().send("+15550600002", "m1", b"hello bob".to_vec()).await.unwrap();
    let id = ack.id.unwrap();
    assert_eq!((id.sender, id.seq, ack.duplicate), (alice_id.account_id, 1, false));

    // Bob receives it, with the sender's phone.
    let got = bob.received(1, true).await;
    assert_eq!(got[0].payload, b"hello bob".as_slice());
    assert_eq!(got[0].from_phone, "+15550600001");
    assert_eq!(got[0].id, Some(id));

    // Bob's ack produces a delivery receipt for Alice: two ticks. It is the
    // first entry her device is sent: her message is entry 1 of her log
    // (for her other devices), and this device has it from its ack.
    let entry = alice.next_entry().await;
    assert_eq!(entry.seq, 2, "{entry:?}");
    let Some(Body::Receipt(delivered)) = entry.body else { panic!("expected the receipt, got {entry:?}") };
    assert_eq!(delivered.kind, ReceiptKind::Delivered as i32);
    assert_eq!((delivered.peer, delivered.peer_phone.as_str()), (bob_id.account_id, "+15550600002"));
    // Acknowledging it covers her own entry 1 too.
    alice.handle().ack(entry.seq).await.unwrap();

    // Bob reads it: blue ticks for Alice, and Bob's log records the read.
    bob.handle().mark_read(alice_id.account_id, id.seq).await.unwrap();
    let read = alice.receipt(ReceiptKind::Read, 1).await;
    assert_eq!(read.up_to_seq, 1);
    let sync = bob.next_entry().await;
    assert!(matches!(sync.body, Some(Body::ReadSync(r)) if r.peer == alice_id.account_id && r.up_to_seq == 1));
}

#[tokio::test]
async fn offline_recipient_gets_everything_in_order_on_connect() {
    let server = TestServer::start().await;
    let alice_id = server.register("+15550600011").await;
    let bob_id = server.register("+15550600012").await;
    let alice = Peer::connect(&server, &alice_id, Transport::Ws).await;
    for i in 0..100 {
        alice.handle().send("+15550600012", &format!("c{i}"), format!("{i}").into_bytes()).await.unwrap();
    }
    let mut bob = Peer::connect(&server, &bob_id, Transport::Tcp).await;
    let got = bob.received(100, true).await;
    let seqs: Vec<u64> = got.iter().map(|m| m.id.unwrap().seq).collect();
    assert_eq!(seqs, (1..=100).collect::<Vec<_>>(), "in the order Alice sent them");
    let payloads: Vec<String> = got.iter().map(|m| String::from_utf8(m.payload.to_vec()).unwrap()).collect();
    assert_eq!(payloads, (0..100).map(|i| i.to_string()).collect::<Vec<_>>());
}

#[tokio::test]
async fn many_messages_both_ways_keep_each_senders_order() {
    let server = TestServer::start().await;
    let alice_id = server.register("+15550600021").await;
    let bob_id = server.register("+15550600022").await;
    let mut alice = Peer::connect(&server, &alice_id, Transport::Tcp).await;
    let mut bob = Peer::connect(&server, &bob_id, Transport::Ws).await;
    const N: usize = 200;
    let (a, b) = (alice.handle(), bob.handle());
    let send_a = tokio::spawn(async move {
        for i in 0..N {
            a.send("+15550600022", &format!("a{i}"), format!("a{i}").into_bytes()).await.unwrap();
        }
    });
    let send_b = tokio::spawn(async move {
        for i in 0..N {
            b.send("+15550600021", &format!("b{i}"), format!("b{i}").into_bytes()).await.unwrap();
        }
    });
    let (from_bob, from_alice) = tokio::join!(alice.received(N, true), bob.received(N, true));
    send_a.await.unwrap();
    send_b.await.unwrap();
    let expect = |p: &str| (0..N).map(|i| format!("{p}{i}")).collect::<Vec<_>>();
    let text = |ms: &[skylark_protocol::v1::Message]| {
        ms.iter().map(|m| String::from_utf8(m.payload.to_vec()).unwrap()).collect::<Vec<_>>()
    };
    assert_eq!(text(&from_alice), expect("a"));
    assert_eq!(text(&from_bob), expect("b"));
}

#[tokio::test]
async fn resend_after_a_lost_ack_is_one_message() {
    let server = TestServer::start().await;
    let alice_id = server.register("+15550600031").await;
    let bob_id = server.register("+15550600032").await;
    let alice = Peer::connect(&server, &alice_id, Transport::Tcp).await;
    let first = alice.handle().send("+15550600032", "same", b"once".to_vec()).await.unwrap();
    // The app never saw the ack (say the connection dropped); it resends on a new connection.
    drop(alice);
    let alice = Peer::connect(&server, &alice_id, Transport::Ws).await;
    let again = alice.handle().send("+15550600032", "same", b"once".to_vec()).await.unwrap();
    assert!(again.duplicate);
    assert_eq!(again.id, first.id);
    assert_eq!(again.sent_at_ms, first.sent_at_ms);
    // Pipelined duplicates in one batch are caught too.
    let h = alice.handle();
    let (x, y) =
        tokio::join!(h.send("+15550600032", "twin", b"t".to_vec()), h.send("+15550600032", "twin", b"t".to_vec()));
    let (x, y) = (x.unwrap(), y.unwrap());
    assert_eq!(x.id, y.id);
    assert!(x.duplicate != y.duplicate);
    alice.handle().send("+15550600032", "last", b"last".to_vec()).await.unwrap();

    let mut bob = Peer::connect(&server, &bob_id, Transport::Tcp).await;
    let got = bob.received(3, true).await;
    let ids: Vec<&str> = got.iter().map(|m| m.client_id.as_str()).collect();
    assert_eq!(ids, vec!["same", "twin", "last"], "each message exactly once");
}

#[tokio::test]
async fn bad_sends_are_refused_precisely() {
    let mut config = test_config();
    config.messaging.max_payload_bytes = 1_000;
    let server = TestServer::start_with(config).await;
    let alice_id = server.register("+15550600041").await;
    server.register("+15550600042").await;
    let alice = Peer::connect(&server, &alice_id, Transport::WsJson).await;
    let h = alice.handle();
    let code = |r: Result<_, skylark_client::ClientError>| r.unwrap_err().error_code();
    assert_eq!(code(h.send("+15550609999", "a", vec![]).await), Some(ErrorCode::UnknownRecipient));
    assert_eq!(code(h.send("not a number", "b", vec![]).await), Some(ErrorCode::InvalidArgument));
    assert_eq!(code(h.send("+15550600042", "", vec![]).await), Some(ErrorCode::InvalidArgument));
    assert_eq!(code(h.send("+15550600042", "c", vec![0; 1_001]).await), Some(ErrorCode::MessageTooLarge));
    assert_eq!(h.mark_read(987_654, 1).await.unwrap_err().error_code(), Some(ErrorCode::InvalidArgument));
    // Refusals changed nothing: the next message gets sequence 1.
    let ack = h.send("+15550600042", "ok", vec![1]).await.unwrap();
    assert_eq!(ack.id.unwrap().seq, 1);
}

#[tokio::test]
async fn unacknowledged_entries_come_again_until_acked() {
    let server = TestServer::start().await;
    let alice_id = server.register("+15550600051").await;
    let bob_id = server.register("+15550600052").await;
    let alice = Peer::connect(&server, &alice_id, Transport::Tcp).await;
    for i in 0..5 {
        alice.handle().send("+15550600052", &format!("m{i}"), vec![i]).await.unwrap();
    }
    // Bob reads them without acking, then reconnects: all five again.
    let mut bob = Peer::connect(&server, &bob_id, Transport::Tcp).await;
    assert_eq!(bob.received(5, false).await.len(), 5);
    drop(bob);
    let mut bob = Peer::connect(&server, &bob_id, Transport::Ws).await;
    let again = bob.received(5, true).await;
    assert_eq!(again.iter().map(|m| m.payload[0]).collect::<Vec<_>>(), vec![0, 1, 2, 3, 4]);
    // Once acked, a reconnect starts after them.
    loop {
        if let Log::CaughtUp(seq) = bob.next_log().await {
            assert_eq!(seq, 5);
            break;
        }
    }
    drop(bob);
    let mut bob = Peer::connect(&server, &bob_id, Transport::Tcp).await;
    assert_eq!(bob.next_log().await, Log::CaughtUp(5), "nothing is delivered twice after an ack");
}

#[tokio::test]
async fn a_slow_device_gets_at_most_a_window_of_unacked_entries() {
    let mut config = test_config();
    config.messaging.device_window = 8;
    let server = TestServer::start_with(config).await;
    let alice_id = server.register("+15550600061").await;
    let bob_id = server.register("+15550600062").await;
    let alice = Peer::connect(&server, &alice_id, Transport::Tcp).await;
    for i in 0..20 {
        alice.handle().send("+15550600062", &format!("m{i}"), vec![i]).await.unwrap();
    }
    let mut bob = Peer::connect(&server, &bob_id, Transport::Tcp).await;
    let first = bob.received(8, false).await;
    assert_eq!(first.len(), 8);
    // No ninth entry while nothing is acknowledged: a Ping round trip
    // proves the connection is live and nothing else was queued before it.
    bob.handle().ping().await.unwrap();
    assert!(bob.events.try_recv().is_err(), "the window holds back further entries");
    // Acknowledging opens the window again.
    bob.handle().ack(8).await.unwrap();
    let rest = bob.received(12, true).await;
    assert_eq!(rest.iter().map(|m| m.payload[0]).collect::<Vec<_>>(), (8..20).collect::<Vec<u8>>());
}

#[tokio::test]
async fn queued_messages_survive_a_server_restart() {
    let mut server = TestServer::start().await;
    let alice_id = server.register("+15550600071").await;
    let bob_id = server.register("+15550600072").await;
    let alice = Peer::connect(&server, &alice_id, Transport::Tcp).await;
    for i in 0..20u8 {
        alice.handle().send("+15550600072", &format!("m{i}"), vec![i]).await.unwrap();
    }
    drop(alice);
    server.shutdown().await;
    let restarted = TestServer::start_on(test_config(), server.store.clone()).await;
    let mut bob = Peer::connect(&restarted, &bob_id, Transport::Ws).await;
    let got = bob.received(20, true).await;
    assert_eq!(got.iter().map(|m| m.payload[0]).collect::<Vec<_>>(), (0..20).collect::<Vec<u8>>());
}

/// A crash can leave an acknowledged message in its sender's outbox, its
/// forward not yet done. The restarted server resumes that forward at
/// start, though the sender never connects again (and nothing else, such
/// as a receipt to the sender, starts the sender's actor).
#[tokio::test]
async fn a_forward_left_by_a_crash_resumes_at_start_without_its_sender() {
    let mut server = TestServer::start().await;
    let alice_id = server.register("+15550600081").await;
    let bob_id = server.register("+15550600082").await;
    server.shutdown().await;
    let alice = skylark_core::AccountId(alice_id.account_id);
    assert!(server.store.account_state(alice).await.unwrap().outbox.is_empty());
    leave_a_forward(&*server.store, &alice_id, bob_id.account_id, "m1", b"left in the outbox").await;

    // Only Bob comes back; his device gets the message.
    let restarted = TestServer::start_on(test_config(), server.store.clone()).await;
    let mut bob = Peer::connect(&restarted, &bob_id, Transport::Ws).await;
    let got = bob.received(1, true).await;
    assert_eq!(got[0].payload, b"left in the outbox".as_slice());
    // Alice's actor then drops the forward from her outbox (a write it may defer a moment).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let outbox = restarted.store.account_state(alice).await.unwrap().outbox;
        if outbox.is_empty() {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the resumed forward stayed in the outbox: {outbox:?}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_read_marker_covers_only_what_the_reader_received() {
    let server = TestServer::start().await;
    let alice_id = server.register("+15550600091").await;
    let bob_id = server.register("+15550600092").await;
    let mut alice = Peer::connect(&server, &alice_id, Transport::Tcp).await;
    let mut bob = Peer::connect(&server, &bob_id, Transport::WsJson).await;

    // Nothing received from Bob yet: a "read up to 10^12" marks nothing.
    alice.handle().mark_read(bob_id.account_id, 1_000_000_000_000).await.unwrap();
    let first = bob.handle().send("+15550600091", "b1", b"one".to_vec()).await.unwrap().id.unwrap();
    alice.received(1, true).await;
    // Now one message is there; a forged mark is clamped to it.
    alice.handle().mark_read(bob_id.account_id, 1_000_000_000_000).await.unwrap();
    let read = bob.receipt(ReceiptKind::Read, 1).await;
    assert_eq!(read.up_to_seq, first.seq, "a read receipt names only what Alice received");
    loop {
        if let Body::ReadSync(sync) = alice.next_entry().await.body.unwrap() {
            assert_eq!(sync.up_to_seq, first.seq, "Alice's own devices are told the clamped mark");
            break;
        }
    }

    // Bob writes again while every device of Alice's is offline: it is not
    // shown read (nor delivered) until Alice's device has it.
    drop(alice);
    let second = bob.handle().send("+15550600091", "b2", b"two".to_vec()).await.unwrap().id.unwrap();
    let mut alice = Peer::connect(&server, &alice_id, Transport::Ws).await;
    alice.received(1, true).await;
    alice.handle().mark_read(bob_id.account_id, second.seq).await.unwrap();
    // Bob's log from here on: delivered then read of the second, nothing early.
    let mut saw_delivered = false;
    loop {
        let event = bob.next_entry().await;
        bob.handle().ack(event.seq).await.unwrap();
        if let Some(Body::Receipt(r)) = event.body {
            if r.kind == ReceiptKind::Delivered as i32 && r.up_to_seq >= second.seq {
                saw_delivered = true;
            }
            if r.kind == ReceiptKind::Read as i32 {
                assert!(saw_delivered, "read before delivered: {r:?}");
                assert_eq!(r.up_to_seq, second.seq);
                break;
            }
        }
    }
}
