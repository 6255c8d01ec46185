//! The behaviour every [`Store`](crate::Store) backend must show.
//!
//! Each backend's tests call [`run_all`] on a fresh, empty store. The checks
//! follow the contracts written on the trait methods.

use crate::Store;
use skylark_core::verification::VerificationSession;
use skylark_core::{DeviceId, NewDevice, PhoneNumber};

fn phone(s: &str) -> PhoneNumber {
    PhoneNumber::parse(s).expect("test phone numbers are valid")
}

/// Runs every conformance check against an empty store.
pub async fn run_all(store: &dyn Store) {
    registration_creates_then_takes_over(store).await;
    verification_sessions(store).await;
    server_id_is_stable(store).await;
    message_path(store).await;
    pending_outboxes(store).await;
    device_management(store).await;
    settings(store).await;
    groups(store).await;
    key_packages(store).await;
    bans(store).await;
    blocks(store).await;
    pins(store).await;
    account_deletion(store).await;
    reports(store).await;
    contact_names(store).await;
    profiles(store).await;
    purges_and_expiry(store).await;
}

/// Deleted-for-everyone and disappearing messages: an entry rewritten in
/// place, a copy found in another account's log, and the sweeper purging
/// exactly what is due, in every log that holds a copy.
async fn purges_and_expiry(store: &dyn Store) {
    use crate::AccountWrite;
    use skylark_core::AccountId;
    use skylark_core::group::{GroupBody, GroupEvent};
    use skylark_core::message::{LogEntry, Message, MessageId, Meta};
    use std::sync::Arc;

    let (a, b) = (AccountId(700), AccountId(701));
    let group = AccountId::group(77);
    let message = |seq: u64, text: &str, meta: Meta| Message {
        id: MessageId { sender: a, seq },
        to: b,
        sender_device: DeviceId(1),
        client_id: format!("p{seq}"),
        sent_at_ms: 1_000 + seq,
        payload: text.as_bytes().to_vec().into(),
        meta,
    };
    let timed = |at: u64| Meta { expires_at_ms: Some(at), ..Meta::default() };
    let kept = message(1, "kept", Meta::default());
    let soon = message(2, "soon", timed(5_000));
    let later = message(3, "later", timed(9_000));
    let post = Arc::new(GroupEvent {
        group,
        seq: 4,
        by: a,
        at_ms: 1_004,
        body: GroupBody::Message {
            device: DeviceId(1),
            client_id: "g".into(),
            payload: b"post".to_vec().into(),
            meta: timed(5_000),
        },
    });
    let entry = |m: &Message| Arc::new(LogEntry::Message(Arc::new(m.clone())));
    // The sender's log, and the recipient's copies after unrelated entries.
    let mut w = AccountWrite::new(a);
    for m in [&kept, &soon, &later] {
        w.appends.push((m.id.seq, entry(m)));
    }
    store.apply(w).await.expect("apply");
    let mut w = AccountWrite::new(b);
    w.appends.push((1, Arc::new(LogEntry::ReadSync { peer: a, up_to: 0, at_ms: 900 })));
    for (seq, m) in [(2, &kept), (3, &soon), (4, &later)] {
        w.appends.push((seq, entry(m)));
    }
    w.appends.push((5, Arc::new(LogEntry::Group(post.clone()))));
    for seq in 6..600 {
        w.appends.push((seq, Arc::new(LogEntry::ReadSync { peer: a, up_to: seq, at_ms: 2_000 })));
    }
    store.apply(w).await.expect("apply");

    // Finding copies: directly in the sender's log, by search elsewhere
    // (across pages), and not at all before `since_ms`.
    let id = |seq| MessageId { sender: a, seq };
    assert_eq!(store.find_message(a, id(3), 0).await.expect("find"), Some((3, (*entry(&later)).clone())));
    assert_eq!(store.find_message(a, id(9), 0).await.expect("find"), None);
    assert_eq!(store.find_message(b, id(1), 0).await.expect("find").map(|(seq, _)| seq), Some(2));
    assert_eq!(store.find_message(b, id(1), 1_500).await.expect("find"), None, "searched no further than since_ms");
    let post_id = MessageId { sender: group, seq: 4 };
    assert_eq!(store.find_message(b, post_id, 0).await.expect("find").map(|(seq, _)| seq), Some(5));

    // A deletion rewrites the entry in place.
    let mut w = AccountWrite::new(b);
    w.replaces.push((2, Arc::new(LogEntry::Message(Arc::new(kept.purged())))));
    store.apply(w).await.expect("apply");
    let read = store.read_log(b, 2, 1).await.expect("read");
    assert_eq!(read, vec![(2, LogEntry::Message(Arc::new(kept.purged())))]);
    assert!(matches!(&read[0].1, LogEntry::Message(m) if m.payload.is_empty() && m.meta.purged));

    // Nothing is due before its time; then exactly the due copies go, in
    // both logs, and the sweep is done with them.
    assert_eq!(store.expire(4_999, 100).await.expect("expire"), 0);
    assert_eq!(store.expire(5_000, 100).await.expect("expire"), 3, "two copies of `soon` and the post");
    assert_eq!(store.expire(5_000, 100).await.expect("expire"), 0);
    let payload = |e: &LogEntry| match e {
        LogEntry::Message(m) => m.payload.clone(),
        LogEntry::Group(e) => match &e.body {
            GroupBody::Message { payload, .. } => payload.clone(),
            _ => panic!("not a post"),
        },
        _ => panic!("not a message"),
    };
    let log_a = store.read_log(a, 1, 10).await.expect("read");
    let log_b = store.read_log(b, 1, 6).await.expect("read");
    assert_eq!(payload(&log_a[0].1), b"kept".as_slice());
    assert_eq!(payload(&log_a[1].1), b"".as_slice());
    assert_eq!(payload(&log_a[2].1), b"later".as_slice());
    assert_eq!(payload(&log_b[2].1), b"".as_slice());
    assert_eq!(payload(&log_b[3].1), b"later".as_slice());
    assert_eq!(payload(&log_b[4].1), b"".as_slice(), "the post's copy");
    assert!(crate::entry_meta(&log_b[4].1).is_some_and(|m| m.purged));
    // A limit takes part of what is due.
    assert_eq!(store.expire(10_000, 1).await.expect("expire"), 1);
    assert_eq!(store.expire(10_000, 100).await.expect("expire"), 1);
    assert!(store.read_log(b, 4, 1).await.expect("read").iter().all(|(_, e)| payload(e).is_empty()));
}

/// A profile per account: absent, set, replaced, removed.
async fn profiles(store: &dyn Store) {
    use crate::{Profile, Visibility};
    use skylark_core::AccountId;
    let a = AccountId(7_300);
    assert_eq!(store.profile(a).await.expect("read"), None);
    let mut p =
        Profile { name: "Ana".into(), about: "at work".into(), visible_to: Visibility::Contacts, updated_at_ms: 5 };
    store.set_profile(a, Some(p.clone())).await.expect("set");
    assert_eq!(store.profile(a).await.expect("read"), Some(p.clone()));
    p.about = "away".into();
    store.set_profile(a, Some(p.clone())).await.expect("replace");
    assert_eq!(store.profile(a).await.expect("read"), Some(p));
    assert_eq!(store.profile(AccountId(7_301)).await.expect("read"), None);
    store.set_profile(a, None).await.expect("remove");
    assert_eq!(store.profile(a).await.expect("read"), None);
}

/// Contact names: per account, in peer order, replaced, removed.
async fn contact_names(store: &dyn Store) {
    use skylark_core::AccountId;
    let (a, b, c) = (AccountId(7_200), AccountId(7_201), AccountId(7_202));
    assert!(store.contact_names(a).await.expect("list").is_empty());
    store.set_contact_name(a, c, Some("Cleo".into())).await.expect("name");
    store.set_contact_name(a, b, Some("Bo".into())).await.expect("name");
    store.set_contact_name(a, b, Some("Bo Li".into())).await.expect("rename");
    assert_eq!(store.contact_names(a).await.expect("list"), vec![(b, "Bo Li".into()), (c, "Cleo".into())]);
    assert!(store.contact_names(b).await.expect("list").is_empty(), "per account");
    store.set_contact_name(a, b, None).await.expect("forget");
    store.set_contact_name(a, b, None).await.expect("forgetting twice is fine");
    assert_eq!(store.contact_names(a).await.expect("list"), vec![(c, "Cleo".into())]);
}

/// Reports: numbered by the store, listed newest first.
async fn reports(store: &dyn Store) {
    use crate::{Report, ReportedMessage};
    use skylark_core::AccountId;
    assert!(store.reports(10).await.expect("list").is_empty());
    let report = |reporter: u64| Report {
        id: 0,
        at_ms: reporter,
        reporter: AccountId(reporter),
        reported: AccountId(99),
        blocked: reporter.is_multiple_of(2),
        messages: vec![ReportedMessage { sender: AccountId(99), seq: 3, sent_at_ms: 2, bytes: 40 }],
    };
    let first = store.add_report(report(1)).await.expect("add");
    let second = store.add_report(report(2)).await.expect("add");
    assert!(second > first);
    let listed = store.reports(10).await.expect("list");
    assert_eq!(
        listed.iter().map(|r| (r.id, r.reporter)).collect::<Vec<_>>(),
        vec![(second, AccountId(2)), (first, AccountId(1))]
    );
    assert_eq!(listed[0].messages, report(2).messages);
    assert_eq!(store.reports(1).await.expect("list").len(), 1);
}

/// A deleted account: its number free, its devices removed (with their
/// keys and push targets), its log and settings gone; others untouched.
async fn account_deletion(store: &dyn Store) {
    use crate::{AccountWrite, PushTarget, Visibility};
    use skylark_core::message::LogEntry;
    use skylark_core::pin::PinRecord;
    let number = phone("+15550190001");
    let reg = store.register(&number, NewDevice { public_key: [9; 32], name: "a".into() }, 10).await.expect("register");
    let other = store
        .register(&phone("+15550190002"), NewDevice { public_key: [8; 32], name: "b".into() }, 10)
        .await
        .expect("register");
    let (a, b) = (reg.account.id, other.account.id);
    let second = store.add_device(a, NewDevice { public_key: [7; 32], name: "c".into() }, 5, 11).await.expect("add");
    let mut w = AccountWrite::new(a);
    w.appends.push((1, std::sync::Arc::new(LogEntry::ReadSync { peer: b, up_to: 1, at_ms: 1 })));
    w.contacts.push(b);
    store.apply(w).await.expect("apply");
    let mut w = AccountWrite::new(b);
    w.appends.push((1, std::sync::Arc::new(LogEntry::ReadSync { peer: a, up_to: 1, at_ms: 1 })));
    store.apply(w).await.expect("apply");
    store.set_visibility(a, Visibility::Nobody).await.expect("settings");
    store.set_pin(a, Some(PinRecord::new("h".into(), 1))).await.expect("pin");
    store.set_block(a, b, Some(1)).await.expect("block");
    store.set_contact_name(a, b, Some("B".into())).await.expect("name");
    let face =
        crate::Profile { name: "A".into(), about: String::new(), visible_to: Visibility::Everyone, updated_at_ms: 1 };
    store.set_profile(a, Some(face)).await.expect("profile");
    store.set_push_target(second.id, Some(PushTarget::Webhook { token: "t".into() })).await.expect("push");
    store.put_key_packages(second.id, vec![bytes::Bytes::from_static(b"kp")], None, 10).await.expect("keys").ok();

    let mut removed = store.delete_account(a, 50).await.expect("delete").expect("it existed");
    removed.sort();
    assert_eq!(removed, vec![reg.device.id, second.id]);
    assert_eq!(store.account_by_phone(&number).await.expect("read"), None, "the number is free");
    assert_eq!(store.account(a).await.expect("read"), None);
    assert!(store.active_devices(a).await.expect("read").is_empty());
    assert_eq!(store.device(second.id).await.expect("read").and_then(|d| d.removed_at_ms), Some(50));
    assert_eq!(store.push_target(second.id).await.expect("read"), None);
    assert_eq!(store.key_stock(second.id).await.expect("read").available, 0);
    assert!(store.read_log(a, 1, 10).await.expect("read").is_empty(), "the log is gone");
    assert!(!store.is_contact(a, b).await.expect("read"));
    assert_eq!(store.visibility(a).await.expect("read"), Visibility::Everyone);
    assert_eq!(store.pin(a).await.expect("read"), None);
    assert!(store.blocked(a).await.expect("read").is_empty());
    assert!(store.contact_names(a).await.expect("read").is_empty());
    assert_eq!(store.profile(a).await.expect("read"), None);
    assert_eq!(store.read_log(b, 1, 10).await.expect("read").len(), 1, "others keep theirs");
    assert_eq!(store.delete_account(a, 60).await.expect("delete"), None, "once");
    // The number signs up again as a new account.
    let again = store.register(&number, NewDevice { public_key: [6; 32], name: "d".into() }, 70).await.expect("again");
    assert!(again.created && again.account.id != a);
}

/// A PIN record per account: absent, set, replaced, removed.
async fn pins(store: &dyn Store) {
    use skylark_core::AccountId;
    use skylark_core::pin::PinRecord;
    let (a, b) = (AccountId(7_100), AccountId(7_101));
    assert_eq!(store.pin(a).await.expect("read"), None);
    let mut record = PinRecord::new("$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA".into(), 5);
    store.set_pin(a, Some(record.clone())).await.expect("set");
    assert_eq!(store.pin(a).await.expect("read"), Some(record.clone()));
    assert_eq!(store.pin(b).await.expect("read"), None, "per account");
    record.failed(9);
    store.set_pin(a, Some(record.clone())).await.expect("replace");
    assert_eq!(store.pin(a).await.expect("read").map(|r| (r.failures, r.last_failure_ms)), Some((1, 9)));
    store.set_pin(a, None).await.expect("remove");
    store.set_pin(a, None).await.expect("removing twice is fine");
    assert_eq!(store.pin(a).await.expect("read"), None);
}

/// Block lists: per account, one-way, in peer order, the first time kept
/// when blocked again, unblocking twice harmless.
async fn blocks(store: &dyn Store) {
    use skylark_core::AccountId;
    let (a, b, c) = (AccountId(7_000), AccountId(7_001), AccountId(7_002));
    assert_eq!(store.blocked(a).await.expect("list"), vec![]);
    store.set_block(a, c, Some(20)).await.expect("block");
    store.set_block(a, b, Some(10)).await.expect("block");
    store.set_block(a, b, Some(30)).await.expect("block again");
    assert_eq!(store.blocked(a).await.expect("list"), vec![(b, 10), (c, 20)]);
    assert_eq!(store.blocked(b).await.expect("list"), vec![], "blocks are one-way");
    store.set_block(a, b, None).await.expect("unblock");
    store.set_block(a, b, None).await.expect("unblocking twice is fine");
    assert_eq!(store.blocked(a).await.expect("list"), vec![(c, 20)]);
}

/// Banned numbers: listed with their time, banned again (a new time),
/// lifted.
async fn bans(store: &dyn Store) {
    assert_eq!(store.bans().await.expect("list"), vec![]);
    let (a, b) = (phone("+15550180001"), phone("+15550180002"));
    store.set_ban(&b, Some(20)).await.expect("ban");
    store.set_ban(&a, Some(10)).await.expect("ban");
    let mut listed = store.bans().await.expect("list");
    listed.sort();
    assert_eq!(listed, vec![(a.clone(), 10), (b.clone(), 20)]);
    store.set_ban(&a, Some(30)).await.expect("ban again");
    store.set_ban(&b, None).await.expect("lift");
    store.set_ban(&b, None).await.expect("lifting twice is fine");
    assert_eq!(store.bans().await.expect("list"), vec![(a.clone(), 30)]);
    store.set_ban(&a, None).await.expect("lift");
    assert_eq!(store.bans().await.expect("list"), vec![]);
}

/// The key-package directory: a stock claimed oldest first, a last-resort
/// package handed out (and kept) once the stock is empty, the bound kept
/// all or nothing, no package handed out twice under concurrent claims, and
/// nothing left of a removed device.
async fn key_packages(store: &dyn Store) {
    use bytes::Bytes;
    use skylark_core::keys::KeyStock;
    let reg = store
        .register(&phone("+15550170001"), NewDevice { public_key: [7; 32], name: "phone".into() }, 1)
        .await
        .expect("register");
    let (account, first) = (reg.account.id, reg.device.id);
    let second = store
        .add_device(account, NewDevice { public_key: [8; 32], name: "laptop".into() }, 5, 2)
        .await
        .expect("add")
        .id;
    let empty = KeyStock { available: 0, has_last_resort: false };
    assert_eq!(store.key_stock(first).await.expect("read"), empty);

    let package = |tag: &str| Bytes::from(format!("kp-{tag}").into_bytes());
    let put = store
        .put_key_packages(first, vec![package("a1"), package("a2"), package("a3")], Some(package("last")), 10)
        .await
        .expect("put");
    assert_eq!(put, Ok(KeyStock { available: 3, has_last_resort: true }));
    let over = (0..8).map(|i| package(&format!("over{i}"))).collect();
    assert_eq!(
        store.put_key_packages(first, over, Some(package("other")), 10).await.expect("put"),
        Err(KeyStock { available: 3, has_last_resort: true }),
        "over the bound: refused whole"
    );
    assert_eq!(store.key_stock(first).await.expect("read").available, 3, "nothing of a refused upload kept");

    let claimed = store.claim_key_packages(&[first, second]).await.expect("claim");
    assert_eq!(claimed.len(), 2);
    assert_eq!(
        (claimed[0].device, claimed[0].package.clone(), claimed[0].last_resort),
        (first, Some(package("a1")), false)
    );
    assert_eq!((claimed[1].device, claimed[1].package.clone()), (second, None), "nothing published");
    for want in ["a2", "a3"] {
        let claimed = store.claim_key_packages(&[first]).await.expect("claim");
        assert_eq!((claimed[0].package.clone(), claimed[0].last_resort), (Some(package(want)), false), "oldest first");
    }
    for _ in 0..2 {
        let claimed = store.claim_key_packages(&[first]).await.expect("claim");
        assert_eq!((claimed[0].package.clone(), claimed[0].last_resort), (Some(package("last")), true));
    }
    assert_eq!(store.key_stock(first).await.expect("read"), KeyStock { available: 0, has_last_resort: true });

    // Concurrent claims never share a one-time package.
    let many: Vec<Bytes> = (0..40).map(|i| package(&format!("c{i}"))).collect();
    store.put_key_packages(second, many.clone(), None, 100).await.expect("put").expect("room");
    let one = [second];
    let claims = (0..50).map(|_| store.claim_key_packages(&one));
    let results = futures_util::future::join_all(claims).await;
    let mut handed: Vec<Bytes> = Vec::new();
    let mut none = 0;
    for claimed in results {
        match claimed.expect("claim").remove(0).package {
            Some(p) => handed.push(p),
            None => none += 1,
        }
    }
    assert_eq!(none, 10, "no last-resort package: the claims past the stock get nothing");
    handed.sort();
    let mut want = many;
    want.sort();
    assert_eq!(handed, want, "each package handed out exactly once");

    // A removed device's packages are gone; a takeover removes the rest.
    store.put_key_packages(second, vec![package("x")], Some(package("y")), 100).await.expect("put").expect("room");
    assert!(store.remove_device(account, first, 3).await.expect("remove"));
    assert_eq!(store.key_stock(first).await.expect("read"), empty);
    store
        .register(&phone("+15550170001"), NewDevice { public_key: [9; 32], name: "new phone".into() }, 4)
        .await
        .expect("take over");
    assert_eq!(store.key_stock(second).await.expect("read"), empty);
}

async fn groups(store: &dyn Store) {
    use crate::AccountWrite;
    use skylark_core::AccountId;
    use skylark_core::group::GroupMeta;
    let first = store.allocate_group().await.expect("allocate");
    let second = store.allocate_group().await.expect("allocate");
    assert!(first.is_group() && second.is_group());
    assert_ne!(first, second, "group ids are never handed out twice");
    assert_eq!(store.group(first).await.expect("read"), None);

    let (a, b) = (AccountId(901), AccountId(902));
    let (meta, _) = GroupMeta::create(first, a, "trip".into(), &[b], 16, 5).expect("valid group");
    let mut write = AccountWrite::new(first);
    write.group = Some(meta.clone());
    write.memberships = vec![(a, true), (b, true)];
    store.apply(write).await.expect("write");
    assert_eq!(store.group(first).await.expect("read"), Some(meta));
    assert_eq!(store.groups_of(b).await.expect("read"), vec![first]);

    let mut write = AccountWrite::new(second);
    write.memberships = vec![(b, true)];
    store.apply(write).await.expect("write");
    let mut write = AccountWrite::new(first);
    write.memberships = vec![(b, false)];
    store.apply(write).await.expect("write");
    assert_eq!(store.groups_of(b).await.expect("read"), vec![second]);
    assert_eq!(store.groups_of(a).await.expect("read"), vec![first]);

    // A group's pending forwards of its own events come back whole.
    use skylark_core::group::{GroupBody, GroupEvent};
    use skylark_core::message::{Forward, LogEntry, OutboxItem};
    let event = std::sync::Arc::new(GroupEvent {
        group: first,
        seq: 1,
        by: a,
        at_ms: 9,
        body: GroupBody::Message {
            device: skylark_core::DeviceId(1),
            client_id: "g".into(),
            payload: vec![1, 2, 3].into(),
            meta: Default::default(),
        },
    });
    let mut write = AccountWrite::new(first);
    write.appends.push((1, std::sync::Arc::new(LogEntry::Group(event.clone()))));
    for (seq, to) in [(1, a), (2, b)] {
        write.outbox_puts.push((seq, OutboxItem { to, forward: Forward::Group(event.clone()) }));
    }
    store.apply(write).await.expect("write");
    let state = store.account_state(first).await.expect("read");
    let outbox: Vec<(u64, OutboxItem)> = state.outbox;
    assert_eq!(outbox.len(), 2);
    assert!(outbox.iter().all(|(_, item)| item.forward == Forward::Group(event.clone())));
    // Another group's event is refused: a group forwards only its own events.
    let mut write = AccountWrite::new(second);
    write.outbox_puts.push((1, OutboxItem { to: a, forward: Forward::Group(event) }));
    assert!(store.apply(write).await.is_err());
}

async fn settings(store: &dyn Store) {
    use crate::{AccountWrite, PushTarget, Visibility};
    use skylark_core::AccountId;

    let (a, b) = (AccountId(5_000), AccountId(5_001));
    assert_eq!(store.visibility(a).await.expect("read"), Visibility::Everyone, "the default");
    store.set_visibility(a, Visibility::Contacts).await.expect("write");
    assert_eq!(store.visibility(a).await.expect("read"), Visibility::Contacts);

    assert!(!store.is_contact(a, b).await.expect("read"));
    let mut w = AccountWrite::new(a);
    w.contacts.push(b);
    store.apply(w).await.expect("apply");
    assert!(store.is_contact(a, b).await.expect("read"));
    assert!(!store.is_contact(b, a).await.expect("read"), "contacts are one-way");
    // Recorded from outside the account's log (a 1:1 conversation's group).
    store.add_contact(b, a).await.expect("add");
    assert!(store.is_contact(b, a).await.expect("read"));
    store.add_contact(a, b).await.expect("adding a recorded contact is no change");
    assert!(store.is_contact(a, b).await.expect("read"));
    assert!(!store.is_contact(a, AccountId(5_002)).await.expect("read"));

    let target = PushTarget::UnifiedPush { endpoint: "http://127.0.0.1:1/up".into() };
    assert_eq!(store.push_target(DeviceId(9_000)).await.expect("read"), None);
    store.set_push_target(DeviceId(9_000), Some(target.clone())).await.expect("write");
    assert_eq!(store.push_target(DeviceId(9_000)).await.expect("read"), Some(target));
    store.set_push_target(DeviceId(9_000), None).await.expect("write");
    assert_eq!(store.push_target(DeviceId(9_000)).await.expect("read"), None);

    assert_eq!(store.secret("vapid", vec![1, 2]).await.expect("init"), vec![1, 2]);
    assert_eq!(store.secret("vapid", vec![3]).await.expect("read"), vec![1, 2], "stable");
}

async fn device_management(store: &dyn Store) {
    use crate::AddDeviceError;
    use skylark_core::AccountId;
    use skylark_core::message::LogEntry;

    let reg = store
        .register(&phone("+15550008000"), NewDevice { public_key: [1; 32], name: "phone".into() }, 1)
        .await
        .expect("register");
    let account = reg.account.id;
    let laptop =
        store.add_device(account, NewDevice { public_key: [2; 32], name: "laptop".into() }, 2, 5).await.expect("add");
    assert_eq!(laptop.account_id, account);
    assert_eq!(store.cursor(account, laptop.id).await.expect("read"), Some(0));
    assert!(matches!(
        store.add_device(account, NewDevice { public_key: [3; 32], name: "x".into() }, 2, 6).await,
        Err(AddDeviceError::LimitReached(2))
    ));
    assert!(matches!(
        store.add_device(AccountId(77_777), NewDevice { public_key: [3; 32], name: "x".into() }, 9, 6).await,
        Err(AddDeviceError::UnknownAccount)
    ));

    assert!(store.rename_device(account, laptop.id, "work laptop".into()).await.expect("rename"));
    assert!(!store.rename_device(AccountId(77_777), laptop.id, "x".into()).await.expect("rename"), "own account only");
    store.touch_devices(vec![(laptop.id, 42)]).await.expect("touch");
    let seen = store.device(laptop.id).await.expect("read").expect("exists");
    assert_eq!((seen.name.as_str(), seen.last_seen_ms), ("work laptop", Some(42)));

    assert!(store.remove_device(account, laptop.id, 50).await.expect("remove"));
    assert!(!store.remove_device(account, laptop.id, 51).await.expect("remove twice"));
    assert_eq!(store.device(laptop.id).await.expect("read").and_then(|d| d.removed_at_ms), Some(50));
    assert_eq!(store.cursor(account, laptop.id).await.expect("read"), None, "its queue position is purged");
    assert_eq!(store.active_devices(account).await.expect("read").len(), 1);
    // Room again after the removal.
    store.add_device(account, NewDevice { public_key: [4; 32], name: "tablet".into() }, 2, 60).await.expect("add");

    // History reads newest first, before a sequence.
    let mut w = crate::AccountWrite::new(account);
    for seq in 1..=5 {
        w.appends.push((seq, std::sync::Arc::new(LogEntry::ReadSync { peer: AccountId(1), up_to: seq, at_ms: seq })));
    }
    store.apply(w).await.expect("apply");
    let page = store.read_log_before(account, 5, 2).await.expect("history");
    assert_eq!(page.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![4, 3]);
    assert!(store.read_log_before(account, 0, 10).await.expect("history").is_empty());
    assert_eq!(store.read_log_before(account, u64::MAX, 10).await.expect("history").len(), 5);

    let mut w = crate::AccountWrite::new(account);
    w.receipts.push((AccountId(1), skylark_core::message::ReceiptKind::Delivered, 7));
    w.receipts.push((AccountId(1), skylark_core::message::ReceiptKind::Read, 3));
    w.read_markers.push((AccountId(2), 9));
    store.apply(w).await.expect("apply");
    let state = store.receipt_state(account).await.expect("receipts");
    assert_eq!(state.received, vec![(AccountId(1), 7, 3)]);
    assert_eq!(state.read_markers, vec![(AccountId(2), 9)]);
}

async fn registration_creates_then_takes_over(store: &dyn Store) {
    let alice = phone("+15550001000");
    assert_eq!(store.account_by_phone(&alice).await.expect("read"), None);

    let first =
        store.register(&alice, NewDevice { public_key: [1; 32], name: "phone".into() }, 100).await.expect("register");
    assert!(first.created);
    assert!(first.removed_devices.is_empty());
    assert_eq!(first.account.phone, alice);
    assert_eq!(store.account_by_phone(&alice).await.expect("read"), Some(first.account.clone()));
    assert_eq!(store.account(first.account.id).await.expect("read"), Some(first.account.clone()));
    assert_eq!(store.active_devices(first.account.id).await.expect("read"), vec![first.device.clone()]);

    // Another number gets another account and device.
    let bob = store
        .register(&phone("+15550002000"), NewDevice { public_key: [2; 32], name: "b".into() }, 150)
        .await
        .expect("register");
    assert_ne!(bob.account.id, first.account.id);
    assert_ne!(bob.device.id, first.device.id);

    // Re-verifying the number takes the account over: same account, old device removed.
    let second = store
        .register(&alice, NewDevice { public_key: [3; 32], name: "new phone".into() }, 200)
        .await
        .expect("takeover");
    assert!(!second.created);
    assert_eq!(second.account.id, first.account.id);
    assert_eq!(second.removed_devices, vec![first.device.id]);
    let old = store.device(first.device.id).await.expect("read").expect("removed devices are kept");
    assert_eq!(old.removed_at_ms, Some(200));
    assert_eq!(store.active_devices(first.account.id).await.expect("read"), vec![second.device.clone()]);
    assert_eq!(store.device(DeviceId(u64::MAX)).await.expect("read"), None);
    // Bob is untouched.
    assert_eq!(store.active_devices(bob.account.id).await.expect("read"), vec![bob.device]);
}

async fn verification_sessions(store: &dyn Store) {
    let mut session = VerificationSession::start("abc".into(), phone("+15550003000"), "111111".into(), 1_000);
    store.put_verification(&session).await.expect("put");
    assert_eq!(store.verification("abc").await.expect("get"), Some(session.clone()));

    session.wrong_attempts = 2;
    store.put_verification(&session).await.expect("replace");
    assert_eq!(store.verification("abc").await.expect("get").map(|s| s.wrong_attempts), Some(2));

    let newer = VerificationSession::start("def".into(), phone("+15550003001"), "222222".into(), 5_000);
    store.put_verification(&newer).await.expect("put");
    assert_eq!(store.purge_verifications(2_000).await.expect("purge"), 1);
    assert_eq!(store.verification("abc").await.expect("get"), None);

    store.delete_verification("def").await.expect("delete");
    store.delete_verification("def").await.expect("deleting twice is fine");
    assert_eq!(store.verification("def").await.expect("get"), None);
}

async fn server_id_is_stable(store: &dyn Store) {
    let first = store.server_id([4; 16]).await.expect("init");
    assert_eq!(first, [4; 16]);
    assert_eq!(store.server_id([5; 16]).await.expect("read"), first);
}

async fn message_path(store: &dyn Store) {
    use crate::{AccountWrite, Counters};
    use skylark_core::AccountId;
    use skylark_core::message::{Forward, LogEntry, Message, MessageId, OutboxItem, ReceiptKind};

    let a = AccountId(900);
    let b = AccountId(901);
    let fresh = store.account_state(a).await.expect("state");
    assert_eq!(fresh.counters, Counters::default());
    assert!(fresh.outbox.is_empty());
    assert!(store.read_log(a, 1, 10).await.expect("read").is_empty());

    let message = Message {
        id: MessageId { sender: a, seq: 1 },
        to: b,
        sender_device: DeviceId(3),
        client_id: "c1".into(),
        sent_at_ms: 10,
        payload: b"hi".as_slice().into(),
        meta: Default::default(),
    };
    let mut write = AccountWrite::new(a);
    write.appends.push((1, std::sync::Arc::new(LogEntry::Message(std::sync::Arc::new(message.clone())))));
    write.outbox_puts.push((1, OutboxItem { to: b, forward: Forward::Message(std::sync::Arc::new(message.clone())) }));
    write.counters = Some(Counters { next_seq: 2, next_outbox: 2 });
    write.client_ids.push((DeviceId(3), "c1".into(), 1));
    write.cursors.push((DeviceId(3), 1));
    write.receipts.push((b, ReceiptKind::Read, 4));
    write.read_markers.push((b, 9));
    write.received.push((b, 12));
    write.inbound.push((b, 6));
    store.apply(write).await.expect("apply");

    let state = store.account_state(a).await.expect("state");
    assert_eq!(state.counters, Counters { next_seq: 2, next_outbox: 2 });
    assert_eq!(
        state.outbox,
        vec![(1, OutboxItem { to: b, forward: Forward::Message(std::sync::Arc::new(message.clone())) })]
    );
    assert_eq!(
        store.read_log(a, 1, 10).await.expect("read"),
        vec![(1, LogEntry::Message(std::sync::Arc::new(message)))]
    );
    assert!(store.read_log(a, 2, 10).await.expect("read").is_empty());
    assert_eq!(store.client_id(a, DeviceId(3), "c1").await.expect("read"), Some(1));
    assert_eq!(store.client_id(a, DeviceId(4), "c1").await.expect("read"), None, "client ids are per device");
    assert_eq!(store.cursor(a, DeviceId(3)).await.expect("read"), Some(1));
    assert_eq!(store.receipt(a, b, ReceiptKind::Read).await.expect("read"), 4);
    assert_eq!(store.receipt(a, b, ReceiptKind::Delivered).await.expect("read"), 0);
    assert_eq!(store.read_marker(a, b).await.expect("read"), 9, "read markers are apart from receipts");
    assert_eq!(store.received(a, b).await.expect("read"), 12, "received is apart from read markers");
    assert_eq!(store.received(b, a).await.expect("read"), 0, "per account");
    let receipts = store.receipt_state(a).await.expect("receipts");
    assert_eq!(receipts.received, vec![(b, 0, 4)], "what was received is not a receipt");
    assert_eq!(store.inbound(a, b).await.expect("read"), 6);
    assert_eq!(store.inbound(b, a).await.expect("read"), 0, "per account");

    let mut write = AccountWrite::new(a);
    write.outbox_deletes.push(1);
    store.apply(write).await.expect("apply");
    assert!(store.account_state(a).await.expect("state").outbox.is_empty());

    // Concurrent writes from many accounts all land (and may share commits).
    let writes = (0..50u64).map(|i| {
        let mut w = AccountWrite::new(AccountId(1_000 + i));
        w.appends.push((1, std::sync::Arc::new(LogEntry::ReadSync { peer: a, up_to: i, at_ms: 1 })));
        w.counters = Some(Counters { next_seq: 2, next_outbox: 1 });
        w.client_ids.push((DeviceId(7), format!("c{i}"), 1 + i % 3));
        store.apply(w)
    });
    for result in futures_util::future::join_all(writes).await {
        result.expect("concurrent apply");
    }
    for i in 0..50u64 {
        let log = store.read_log(AccountId(1_000 + i), 1, 10).await.expect("read");
        assert_eq!(log, vec![(1, LogEntry::ReadSync { peer: a, up_to: i, at_ms: 1 })]);
    }
    // Concurrent client-id lookups (which a backend may batch) each get their own answer.
    let lookups = (0..100u64).map(|i| async move {
        let account = AccountId(1_000 + i % 50);
        let id = if i < 50 { format!("c{i}") } else { format!("c{}", i % 50 + 1) };
        (i, store.client_id(account, DeviceId(7), &id).await.expect("lookup"))
    });
    for (i, found) in futures_util::future::join_all(lookups).await {
        let expected = if i < 50 { Some(1 + i % 3) } else { None };
        assert_eq!(found, expected, "lookup {i}");
    }

    // A registered device's cursor starts at the end of its account's log.
    let phone = phone("+15550009999");
    let reg = store.register(&phone, NewDevice { public_key: [8; 32], name: "x".into() }, 1).await.expect("register");
    let mut w = AccountWrite::new(reg.account.id);
    w.appends.push((1, std::sync::Arc::new(LogEntry::ReadSync { peer: a, up_to: 1, at_ms: 1 })));
    w.appends.push((2, std::sync::Arc::new(LogEntry::ReadSync { peer: a, up_to: 2, at_ms: 1 })));
    w.counters = Some(Counters { next_seq: 3, next_outbox: 1 });
    store.apply(w).await.expect("apply");
    let later = store.register(&phone, NewDevice { public_key: [9; 32], name: "y".into() }, 2).await.expect("takeover");
    assert_eq!(store.cursor(reg.account.id, reg.device.id).await.expect("read"), Some(0));
    assert_eq!(store.cursor(reg.account.id, later.device.id).await.expect("read"), Some(2));
}

/// The accounts whose outbox holds forwards are listed, each once, in
/// order, page by page; an emptied outbox leaves the list.
async fn pending_outboxes(store: &dyn Store) {
    use crate::{AccountWrite, Counters};
    use skylark_core::AccountId;
    use skylark_core::message::{Forward, Message, MessageId, OutboxItem};
    use std::sync::Arc;

    let item = |from: AccountId, seq: u64, to: AccountId| OutboxItem {
        to,
        forward: Forward::Message(Arc::new(Message {
            id: MessageId { sender: from, seq },
            to,
            sender_device: DeviceId(1),
            client_id: format!("o{seq}"),
            sent_at_ms: 1,
            payload: b"x".as_slice().into(),
            meta: Default::default(),
        })),
    };
    let (one, two, none, group) = (AccountId(950), AccountId(952), AccountId(951), AccountId::group(95));
    for (account, forwards) in [(one, 1u64), (two, 3), (group, 2)] {
        let mut w = AccountWrite::new(account);
        for seq in 1..=forwards {
            w.outbox_puts.push((seq, item(account, seq, none)));
        }
        w.counters = Some(Counters { next_seq: 1, next_outbox: forwards + 1 });
        store.apply(w).await.expect("apply");
    }
    let mut w = AccountWrite::new(none);
    w.counters = Some(Counters { next_seq: 1, next_outbox: 1 });
    store.apply(w).await.expect("apply");

    // Page by one: each account once, ascending, whatever else the store holds.
    let mut listed = Vec::new();
    let mut after = None;
    loop {
        let page = store.pending_outboxes(after, 1).await.expect("list");
        assert!(page.len() <= 1, "a page holds at most its limit");
        let Some(&last) = page.last() else { break };
        listed.push(last);
        after = Some(last);
    }
    assert!(listed.windows(2).all(|w| w[0] < w[1]), "ascending, each once: {listed:?}");
    for account in [one, two, group] {
        assert!(listed.contains(&account), "{account} has forwards pending: {listed:?}");
    }
    assert!(!listed.contains(&none), "an account without forwards is not listed");
    assert_eq!(store.pending_outboxes(None, 1_000).await.expect("list"), listed, "one page or many");
    assert_eq!(store.pending_outboxes(Some(AccountId(951)), 1).await.expect("list"), vec![two]);

    // Acknowledged forwards leave the list.
    let mut w = AccountWrite::new(two);
    w.outbox_deletes.extend([1, 2, 3]);
    store.apply(w).await.expect("apply");
    let listed = store.pending_outboxes(None, 1_000).await.expect("list");
    assert!(listed.contains(&one) && !listed.contains(&two), "{listed:?}");
}
