//! Groups over the real protocol: one order for every member device,
//! membership changes under traffic, receipts and message info, and every
//! refusal.

use crate::devices::link;
use crate::harness::{EVENT_WAIT, Peer, TestServer, Transport, test_config};
use skylark_client::ClientError;
use skylark_protocol::ErrorCode;
use skylark_protocol::v1::change_group::Change;
use skylark_protocol::v1::event::Body;
use skylark_protocol::v1::{self, ReceiptKind, group_event};
use std::collections::BTreeMap;
use std::time::Duration;

/// The group events one device received, in arrival order, acknowledging
/// every log event; stops after `until` matched and `quiet` passed with
/// nothing more from the group.
async fn collect_group(
    peer: &mut Peer,
    group: u64,
    until: impl Fn(&v1::GroupEvent) -> bool,
    quiet: Duration,
) -> Vec<v1::GroupEvent> {
    let mut out = Vec::new();
    let mut done = false;
    loop {
        let wait = if done { quiet } else { EVENT_WAIT };
        let next = tokio::time::timeout(wait, peer.next_entry()).await;
        let Ok(event) = next else {
            assert!(done, "timed out after {} group events", out.len());
            return out;
        };
        peer.handle().ack(event.seq).await.unwrap();
        if let Some(Body::Group(g)) = event.body
            && g.group == group
        {
            done |= until(&g);
            out.push(g);
        }
    }
}

fn code(e: ClientError) -> ErrorCode {
    e.error_code().unwrap_or_else(|| panic!("expected a refusal, got {e}"))
}

fn is_message(g: &v1::GroupEvent, client_id: &str) -> bool {
    matches!(&g.body, Some(group_event::Body::Message(m)) if m.client_id == client_id)
}

/// Polls message info until `check` holds (receipts travel asynchronously).
async fn message_info_until(
    peer: &Peer,
    group: u64,
    seq: u64,
    check: impl Fn(&v1::MessageInfo) -> bool,
) -> v1::MessageInfo {
    let deadline = tokio::time::Instant::now() + EVENT_WAIT;
    loop {
        let info = peer.handle().message_info(group, seq).await.unwrap();
        if check(&info) {
            return info;
        }
        assert!(tokio::time::Instant::now() < deadline, "message info never got there: {info:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn every_member_device_sees_one_order_and_the_sender_sees_who_has_it() {
    let server = TestServer::start().await;
    let alice_id = server.register("+15552000001").await;
    let bob_id = server.register("+15552000002").await;
    let carol_id = server.register("+15552000003").await;
    let mut alice = Peer::connect(&server, &alice_id, Transport::Tcp).await;
    let laptop_id = link(&server, &alice, "laptop").await;
    let mut bob = Peer::connect(&server, &bob_id, Transport::Ws).await;
    let bob_tablet_id = link(&server, &bob, "tablet").await;
    let mut devices = [
        Peer::connect(&server, &laptop_id, Transport::WsJson).await,
        Peer::connect(&server, &bob_tablet_id, Transport::Tcp).await,
        Peer::connect(&server, &carol_id, Transport::WsJson).await,
    ];

    let info = alice.handle().create_group("Trip", &["+15552000002", "+15552000003"]).await.unwrap();
    let group = info.id;
    assert_eq!(info.subject, "Trip");
    assert_eq!(info.members.len(), 3);
    assert!(info.members.iter().any(|m| m.phone == "+15552000001" && m.admin));
    for phone in ["+15552000002", "+15552000003"] {
        assert!(info.members.iter().any(|m| m.phone == phone && !m.admin));
    }
    assert_eq!(bob.handle().list_groups().await.unwrap()[0].id, group);

    // Three authors post at once, twenty messages each.
    let mut posters = Vec::new();
    for (who, handle) in [("a", alice.handle()), ("b", bob.handle()), ("c", devices[2].handle())] {
        posters.push(tokio::spawn(async move {
            let mut acks = Vec::new();
            for i in 0..20 {
                let ack = handle.send_to_group(group, &format!("{who}{i}"), format!("{who} {i}").into_bytes()).await;
                acks.push(ack.unwrap().id.unwrap().seq);
            }
            acks
        }));
    }
    let mut acked = Vec::new();
    for p in posters {
        acked.extend(p.await.unwrap());
    }
    assert_eq!(acked.len(), 60);
    // Creation is group sequence 1; the posts are 2..=61.
    acked.sort_unstable();
    assert_eq!(acked, (2..=61).collect::<Vec<u64>>());

    // Every device of every member sees the same 61 events in the same order.
    let last = |g: &v1::GroupEvent| g.group_seq == 61;
    let reference = collect_group(&mut alice, group, last, Duration::from_millis(50)).await;
    assert_eq!(reference.iter().map(|g| g.group_seq).collect::<Vec<_>>(), (1..=61).collect::<Vec<_>>());
    assert!(matches!(reference[0].body, Some(group_event::Body::Created(_))));
    for peer in devices.iter_mut().chain([&mut bob]) {
        let seen = collect_group(peer, group, last, Duration::from_millis(50)).await;
        assert_eq!(seen, reference, "device {} saw another order", peer.identity.device_id);
    }

    // Posting counts as having read what came before, so Alice asks about
    // a post after everyone else's. Once every device acknowledged it, it
    // counts as delivered to both others and read by nobody yet.
    let alice_post = alice.handle().send_to_group(group, "last", b"last".to_vec()).await.unwrap().id.unwrap().seq;
    assert_eq!(alice_post, 62);
    let last = |g: &v1::GroupEvent| g.group_seq == 62;
    for peer in devices.iter_mut().chain([&mut bob, &mut alice]) {
        collect_group(peer, group, last, Duration::from_millis(20)).await;
    }
    let info = message_info_until(&alice, group, alice_post, |i| i.delivered == 2).await;
    assert_eq!((info.recipients.len(), info.read), (2, 0));

    // Bob reads up to the end on his phone; his tablet is told, Carol has not read.
    bob.handle().mark_read(group, 62).await.unwrap();
    let info = message_info_until(&alice, group, alice_post, |i| i.read == 1).await;
    let bob_state = info.recipients.iter().find(|r| r.phone == "+15552000002").unwrap();
    assert!(bob_state.read && bob_state.delivered);
    loop {
        let event = devices[1].next_entry().await;
        if let Some(Body::ReadSync(r)) = event.body {
            assert_eq!((r.peer, r.up_to_seq), (group, 62));
            break;
        }
    }

    // Once Carol reads too, Alice's devices get a read receipt from the group.
    devices[2].handle().mark_read(group, 62).await.unwrap();
    message_info_until(&alice, group, alice_post, |i| i.read == 2).await;
    let receipt = alice.receipt(ReceiptKind::Read, alice_post).await;
    assert_eq!((receipt.peer, receipt.peer_phone.as_str()), (group, ""));
}

#[tokio::test]
async fn only_members_post_and_read_and_only_admins_manage() {
    let mut config = test_config();
    config.messaging.max_group_members = 4;
    let server = TestServer::start_with(config).await;
    let ids = [
        server.register("+15552100001").await,
        server.register("+15552100002").await,
        server.register("+15552100003").await,
        server.register("+15552100004").await,
        server.register("+15552100005").await,
    ];
    let alice = Peer::connect(&server, &ids[0], Transport::Tcp).await;
    let bob = Peer::connect(&server, &ids[1], Transport::Ws).await;
    let dave = Peer::connect(&server, &ids[3], Transport::WsJson).await;
    let (a, b, d) = (alice.handle(), bob.handle(), dave.handle());

    // Too many members at creation.
    let all = ["+15552100002", "+15552100003", "+15552100004", "+15552100005"];
    assert_eq!(code(a.create_group("big", &all).await.unwrap_err()), ErrorCode::GroupFull);
    assert_eq!(code(a.create_group("x", &["+15559999999"]).await.unwrap_err()), ErrorCode::UnknownRecipient);
    assert_eq!(code(a.create_group("", &["+15552100002"]).await.unwrap_err()), ErrorCode::InvalidArgument);
    let group = a.create_group("club", &["+15552100002", "+15552100003"]).await.unwrap().id;
    let before = a.group_info(group).await.unwrap();

    // A stranger can neither read, post nor change anything.
    assert_eq!(code(d.group_info(group).await.unwrap_err()), ErrorCode::NotAMember);
    assert_eq!(code(d.send_to_group(group, "d1", b"hi".to_vec()).await.unwrap_err()), ErrorCode::NotAMember);
    let add_dave = || Change::Add(v1::PhoneList { phones: vec!["+15552100004".into()] });
    assert_eq!(code(d.change_group(group, add_dave()).await.unwrap_err()), ErrorCode::NotAMember);
    assert_eq!(code(d.change_group(group, Change::Leave(v1::Leave {})).await.unwrap_err()), ErrorCode::NotAMember);
    assert_eq!(code(d.message_info(group, 1).await.unwrap_err()), ErrorCode::NotAMember);
    assert_eq!(code(d.mark_read(group, 1).await.unwrap_err()), ErrorCode::NotAMember);
    // Unknown groups, and account ids passed off as groups.
    assert_eq!(code(a.group_info(group + 1000).await.unwrap_err()), ErrorCode::UnknownGroup);
    assert_eq!(code(a.mark_read(group + 1000, 1).await.unwrap_err()), ErrorCode::InvalidArgument);
    assert_eq!(code(a.group_info(ids[1].account_id).await.unwrap_err()), ErrorCode::UnknownGroup);
    assert_eq!(
        code(a.send_to_group(ids[1].account_id, "z", b"z".to_vec()).await.unwrap_err()),
        ErrorCode::UnknownGroup
    );

    // A plain member posts but does not manage.
    let bob_post = b.send_to_group(group, "b1", b"hello".to_vec()).await.unwrap().id.unwrap().seq;
    assert_eq!(code(b.change_group(group, add_dave()).await.unwrap_err()), ErrorCode::Forbidden);
    let remove_carol = || Change::Remove("+15552100003".into());
    assert_eq!(code(b.change_group(group, remove_carol()).await.unwrap_err()), ErrorCode::Forbidden);
    assert_eq!(code(b.change_group(group, Change::Subject("mine".into())).await.unwrap_err()), ErrorCode::Forbidden);
    assert_eq!(
        code(b.change_group(group, Change::Promote("+15552100002".into())).await.unwrap_err()),
        ErrorCode::Forbidden
    );
    assert_eq!(code(b.change_group(group, Change::AdminOnly(true)).await.unwrap_err()), ErrorCode::Forbidden);
    // Message info is for a message's own sender.
    assert_eq!(code(a.message_info(group, bob_post).await.unwrap_err()), ErrorCode::Forbidden);
    assert_eq!(code(a.message_info(group, 999).await.unwrap_err()), ErrorCode::UnknownMessage);
    assert_eq!(code(a.message_info(group, 1).await.unwrap_err()), ErrorCode::UnknownMessage);
    // The only admin cannot step down; bad arguments are named.
    assert_eq!(
        code(a.change_group(group, Change::Demote("+15552100001".into())).await.unwrap_err()),
        ErrorCode::Forbidden
    );
    a.change_group(group, remove_carol()).await.unwrap();
    assert_eq!(
        code(a.change_group(group, Change::Remove("+15552100003".into())).await.unwrap_err()),
        ErrorCode::InvalidArgument,
        "already removed"
    );
    // Every refusal above changed nothing but what the admin did.
    let after = a.group_info(group).await.unwrap();
    assert_eq!(after.subject, before.subject);
    assert_eq!(after.members.len(), before.members.len() - 1);
    assert!(!after.admin_only);

    // The size limit holds for additions too.
    a.change_group(group, add_dave()).await.unwrap();
    a.change_group(group, Change::Add(v1::PhoneList { phones: vec!["+15552100003".into()] })).await.unwrap();
    let fifth = Change::Add(v1::PhoneList { phones: vec!["+15552100005".into()] });
    assert_eq!(code(a.change_group(group, fifth).await.unwrap_err()), ErrorCode::GroupFull);

    // Admin-only posting; a promoted member may post again.
    a.change_group(group, Change::AdminOnly(true)).await.unwrap();
    assert_eq!(code(b.send_to_group(group, "b2", b"x".to_vec()).await.unwrap_err()), ErrorCode::Forbidden);
    a.change_group(group, Change::Promote("+15552100002".into())).await.unwrap();
    b.send_to_group(group, "b2", b"x".to_vec()).await.unwrap();
    // A resend of an accepted post is a duplicate, not a second post.
    let again = b.send_to_group(group, "b2", b"x".to_vec()).await.unwrap();
    assert!(again.duplicate);

    // A member who leaves is refused from then on; the last admin leaving
    // hands the group to the longest-standing member.
    b.change_group(group, Change::Demote("+15552100002".into())).await.unwrap();
    a.change_group(group, Change::Leave(v1::Leave {})).await.unwrap();
    assert_eq!(code(a.send_to_group(group, "a9", b"x".to_vec()).await.unwrap_err()), ErrorCode::NotAMember);
    assert_eq!(code(a.group_info(group).await.unwrap_err()), ErrorCode::NotAMember);
    let info = b.group_info(group).await.unwrap();
    assert!(info.members.iter().any(|m| m.phone == "+15552100002" && m.admin), "{info:?}");
    assert!(a.list_groups().await.unwrap().is_empty());
}

#[tokio::test]
async fn group_changes_are_rate_limited_per_device() {
    let mut config = test_config();
    config.rate_limits.group_changes_per_device = skylark_server::config::Quota { burst: 2, per_ms: 60_000 };
    let server = TestServer::start_with(config).await;
    let alice_id = server.register("+15552200001").await;
    server.register("+15552200002").await;
    let alice = Peer::connect(&server, &alice_id, Transport::Tcp).await;
    let group = alice.handle().create_group("one", &["+15552200002"]).await.unwrap().id;
    alice.handle().change_group(group, Change::Subject("two".into())).await.unwrap();
    match alice.handle().change_group(group, Change::Subject("three".into())).await.unwrap_err() {
        ClientError::Refused { code, retry_after_ms, .. } => {
            assert_eq!(code, ErrorCode::RateLimited);
            assert!(retry_after_ms > 0);
        }
        other => panic!("expected a rate limit, got {other}"),
    }
    // Posting is not a change: it has its own (per-message) limit.
    alice.handle().send_to_group(group, "p", b"still fine".to_vec()).await.unwrap();
    assert_eq!(alice.handle().group_info(group).await.unwrap().subject, "two");
}

/// The ledger: members join and leave while three authors post. Every
/// device must see exactly the slice of the group's log from the event
/// that added its account to the event that removed it, once each, in
/// the group's order, and every acknowledged post must be in the log.
#[tokio::test]
async fn membership_changes_under_traffic_keep_every_device_exact() {
    let server = TestServer::start().await;
    let phones = ["+15552300001", "+15552300002", "+15552300003", "+15552300004", "+15552300005"];
    let mut ids = Vec::new();
    for p in phones {
        ids.push(server.register(p).await);
    }
    let admin = Peer::connect(&server, &ids[0], Transport::Tcp).await;
    let admin_laptop = link(&server, &admin, "laptop").await;
    let b_tablet = {
        let b = Peer::connect(&server, &ids[1], Transport::Tcp).await;
        let id = link(&server, &b, "tablet").await;
        b.session.close().await;
        id
    };
    let group = admin.handle().create_group("ledger", &[phones[1], phones[2]]).await.unwrap().id;

    // One collector per device of every account, from the start; the
    // first device of accounts 0..3 also posts (and account 0 manages).
    let devices = [
        (ids[0].clone(), 0usize),
        (admin_laptop, 0),
        (ids[1].clone(), 1),
        (b_tablet, 1),
        (ids[2].clone(), 2),
        (ids[3].clone(), 3),
        (ids[4].clone(), 4),
    ];
    let mut collectors = Vec::new();
    let mut handles = BTreeMap::new();
    let mut admin = Some(admin);
    for (n, (identity, who)) in devices.into_iter().enumerate() {
        let mut peer = match admin.take() {
            Some(admin) if n == 0 => admin,
            _ => Peer::connect(&server, &identity, [Transport::Tcp, Transport::Ws, Transport::WsJson][n % 3]).await,
        };
        handles.entry(who).or_insert_with(|| peer.handle());
        let member = identity.account_id;
        let final_for = phones[who];
        collectors.push(tokio::spawn(async move {
            // Members at the end see the closing post; removed ones see their removal.
            let until = move |g: &v1::GroupEvent| {
                is_message(g, "end")
                    || matches!(&g.body, Some(group_event::Body::Removed(m)) if m.account == member)
                    || matches!(&g.body, Some(group_event::Body::Left(_))) && g.by == member
            };
            let seen = collect_group(&mut peer, group, until, Duration::from_millis(100)).await;
            (who, final_for, seen, peer)
        }));
    }

    // Authors 0, 1 and 2 post; posts refused because the author was removed are expected.
    let mut posters = Vec::new();
    for who in 0..3 {
        let handle = handles[&who].clone();
        posters.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..40 {
                let client_id = format!("p{who}-{i}");
                match handle.send_to_group(group, &client_id, vec![who as u8, i]).await {
                    Ok(ack) => acked.push((ack.id.unwrap().seq, client_id)),
                    Err(e) => {
                        assert_eq!(e.error_code(), Some(ErrorCode::NotAMember), "{e}");
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            acked
        }));
    }
    // Membership changes while they post.
    let h = handles[&0].clone();
    tokio::time::sleep(Duration::from_millis(20)).await;
    h.change_group(group, Change::Add(v1::PhoneList { phones: vec![phones[3].into()] })).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    h.change_group(group, Change::Remove(phones[2].into())).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    h.change_group(group, Change::Add(v1::PhoneList { phones: vec![phones[4].into()] })).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    h.change_group(group, Change::Remove(phones[1].into())).await.unwrap();
    let mut acked: BTreeMap<u64, String> = BTreeMap::new();
    for p in posters {
        for (seq, client_id) in p.await.unwrap() {
            assert!(acked.insert(seq, client_id).is_none(), "two posts acked with one sequence");
        }
    }
    h.send_to_group(group, "end", b"end".to_vec()).await.unwrap();

    let mut results = Vec::new();
    for c in collectors {
        results.push(c.await.unwrap());
    }
    // The admin's phone was a member throughout: its view is the whole log.
    let log = results.iter().find(|(who, ..)| *who == 0).unwrap().2.clone();
    let seqs: Vec<u64> = log.iter().map(|g| g.group_seq).collect();
    assert_eq!(seqs, (1..=log.len() as u64).collect::<Vec<_>>(), "the log is dense and in order");
    for (seq, client_id) in &acked {
        assert!(is_message(&log[*seq as usize - 1], client_id), "acked post {client_id} is not #{seq}");
    }
    let posts = log.iter().filter(|g| matches!(g.body, Some(group_event::Body::Message(_)))).count();
    assert_eq!(posts, acked.len() + 1, "every post in the log was acked (plus the closing one)");

    for (who, phone, seen, peer) in &mut results {
        // Nothing more comes, to removed members in particular, now that
        // everything (the closing post included) is in the log.
        while let Ok(event) = tokio::time::timeout(Duration::from_millis(300), peer.next_entry()).await {
            if let Some(Body::Group(g)) = &event.body {
                assert_ne!(g.group, group, "{phone} got {g:?} after its last event");
            }
        }
        let account = ids[*who].account_id;
        // Where this account's membership starts and ends in the log.
        let start = log
            .iter()
            .find(|g| match &g.body {
                Some(group_event::Body::Created(c)) => c.members.iter().any(|m| m.account == account),
                Some(group_event::Body::Added(a)) => a.members.iter().any(|m| m.account == account),
                _ => false,
            })
            .map(|g| g.group_seq);
        let end = log
            .iter()
            .find(|g| matches!(&g.body, Some(group_event::Body::Removed(m)) if m.account == account))
            .map_or(log.len() as u64, |g| g.group_seq);
        let expected: Vec<&v1::GroupEvent> = match start {
            Some(start) => log[start as usize - 1..end as usize].iter().collect(),
            None => Vec::new(),
        };
        let seen: Vec<&v1::GroupEvent> = seen.iter().collect();
        assert_eq!(seen, expected, "device of {phone} saw other events than its membership's slice");
    }
    // Carol (removed mid-traffic) and Bob really were cut off mid-stream.
    assert!(results.iter().any(|(who, _, seen, _)| *who == 2 && seen.len() < log.len() - 1));
    assert!(acked.values().any(|c| c.starts_with("p2-")), "Carol posted before her removal");
}

#[tokio::test]
async fn a_group_and_its_queued_events_survive_a_server_restart() {
    let mut server = TestServer::start().await;
    let alice_id = server.register("+15552400001").await;
    let bob_id = server.register("+15552400002").await;
    let carol_id = server.register("+15552400003").await;
    let alice = Peer::connect(&server, &alice_id, Transport::Tcp).await;
    let mut carol = Peer::connect(&server, &carol_id, Transport::Tcp).await;
    let group = alice.handle().create_group("durable", &["+15552400002", "+15552400003"]).await.unwrap().id;
    for i in 0..10u8 {
        alice.handle().send_to_group(group, &format!("a{i}"), vec![i]).await.unwrap();
    }
    // Carol has everything before the restart; Bob was offline throughout.
    collect_group(&mut carol, group, |g| g.group_seq == 11, Duration::from_millis(20)).await;
    drop((alice, carol));
    server.shutdown().await;

    let restarted = TestServer::start_on(test_config(), server.store.clone()).await;
    let mut bob = Peer::connect(&restarted, &bob_id, Transport::Ws).await;
    let seen = collect_group(&mut bob, group, |g| g.group_seq == 11, Duration::from_millis(20)).await;
    assert_eq!(seen.iter().map(|g| g.group_seq).collect::<Vec<_>>(), (1..=11).collect::<Vec<_>>());
    // The group's sequence, roster and receipts were reloaded from the store.
    let alice = Peer::connect(&restarted, &alice_id, Transport::Tcp).await;
    let next = alice.handle().send_to_group(group, "after", b"after".to_vec()).await.unwrap();
    assert_eq!(next.id.unwrap().seq, 12);
    assert_eq!(alice.handle().group_info(group).await.unwrap().members.len(), 3);
    let info = message_info_until(&alice, group, 11, |i| i.delivered == 2).await;
    assert_eq!(info.recipients.len(), 2);
}
