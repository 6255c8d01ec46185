//! Unit tests of the machine: no runtime, no store, no clock — inputs,
//! facts and times in, effects out.

use super::*;
use skylark_core::group::{GroupBody, GroupError};

const A: AccountId = AccountId(1);
const B: AccountId = AccountId(2);
const C: AccountId = AccountId(3);
const PHONE: DeviceId = DeviceId(11);
const LAPTOP: DeviceId = DeviceId(12);

fn config() -> MessagingConfig {
    MessagingConfig { device_window: 4, ..MessagingConfig::default() }
}

fn machine(account: AccountId) -> Machine {
    Machine::new(account, config(), Loaded::default())
}

fn send(client_id: &str, to: AccountId) -> Input {
    Input::Send {
        meta: Default::default(),
        device: PHONE,
        client_id: client_id.into(),
        to,
        payload: b"x".to_vec().into(),
        over_rate: None,
    }
}

/// B's message number `seq` to A, as a forward.
fn from_b(seq: u64) -> (u64, Forward) {
    let id = MessageId { sender: B, seq };
    let m = Message {
        meta: Default::default(),
        id,
        to: A,
        sender_device: DeviceId(21),
        client_id: format!("b{seq}"),
        sent_at_ms: seq,
        payload: vec![].into(),
    };
    (seq, Forward::Message(Arc::new(m)))
}

fn deliver(items: Vec<(u64, Forward)>) -> Input {
    Input::Deliver { from: B, items: Arc::from(items) }
}

/// A's machine with six messages from B, all handed to the phone's
/// connection `connection` (a window of 4 hands 1..=4).
fn six_from_b_handed_to_the_phone(connection: u64) -> Machine {
    let mut a = machine(A);
    step(&mut a, vec![deliver((1..=6).map(from_b).collect())]);
    step(&mut a, vec![Input::Attach { device: PHONE, connection }]);
    hand(&mut a, PHONE);
    a
}

/// The facts a store with nothing in it gives for `needs` (a device's
/// cursor at 0).
fn nothing_stored(needs: &Needs) -> Facts {
    let mut facts = Facts::default();
    facts.contacts.extend(needs.contacts.iter().map(|p| (*p, false)));
    facts.inbound.extend(needs.inbound.iter().map(|p| (*p, 0)));
    facts.receipts.extend(needs.receipts.iter().map(|k| (*k, 0)));
    facts.read_markers.extend(needs.read_markers.iter().map(|p| (*p, 0)));
    facts.received.extend(needs.received.iter().map(|p| (*p, 0)));
    facts.cursors.extend(needs.cursors.iter().map(|d| (*d, Some(0))));
    if needs.blocks {
        facts.blocks = Some(HashSet::new());
    }
    facts
}

fn step(m: &mut Machine, inputs: Vec<Input>) -> Effects {
    let facts = nothing_stored(&m.needs(&inputs));
    m.step(inputs, &facts, 1_000).expect("the facts are complete")
}

fn answer(outcome: &Outcome) -> &Answer {
    match outcome {
        Outcome::Later(a) | Outcome::Now(Ok(a)) => a,
        other => panic!("expected an answer, got {other:?}"),
    }
}

fn ack_of(outcome: &Outcome) -> SendAck {
    match answer(outcome) {
        Answer::Send(ack) => *ack,
        other => panic!("expected a send ack, got {other:?}"),
    }
}

/// Hands `device` everything its window allows, as the shell does (its
/// own messages passed over); returns the sequences it was sent.
fn hand(m: &mut Machine, device: DeviceId) -> Vec<u64> {
    match m.feed_plan(device, &BTreeMap::new()) {
        FeedPlan::Entries(entries) => {
            let last = entries.last().expect("a plan has entries").0;
            let seqs: Vec<u64> = entries.iter().filter(|(_, e)| m.hands(device, e)).map(|(s, _)| *s).collect();
            m.fed(device, last, seqs.last().copied());
            seqs
        }
        FeedPlan::Idle => Vec::new(),
        other => panic!("expected entries, got {other:?}"),
    }
}

#[test]
fn a_resend_gets_the_first_ack_in_the_batch_and_from_the_store() {
    let mut a = machine(A);
    let fx = step(&mut a, vec![send("c1", B), send("c1", B)]);
    let (first, again) = (ack_of(&fx.outcomes[0]), ack_of(&fx.outcomes[1]));
    assert!(!first.duplicate && again.duplicate);
    assert_eq!(first.id, again.id);
    assert_eq!(fx.write.appends.len(), 1, "one message");
    assert_eq!(fx.write.client_ids, vec![(PHONE, "c1".to_string(), 1)]);
    assert_eq!(fx.write.outbox_puts.len(), 1);
    assert!(fx.kick.contains(&B));
    assert!(matches!(fx.outcomes[0], Outcome::Later(_)), "answered only once durable");

    // Later, the store knows the id: the resend writes nothing.
    let mut facts = Facts::default();
    facts.client_ids.insert((PHONE, "c1".into()), (1, 1_000));
    let fx = a.step(vec![send("c1", B)], &facts, 2_000).unwrap();
    let ack = ack_of(&fx.outcomes[0]);
    assert_eq!((ack.id, ack.sent_at_ms, ack.duplicate), (first.id, 1_000, true));
    assert!(fx.write.is_empty());
}

#[test]
fn over_the_rate_new_sends_are_refused_and_resends_still_answered() {
    let mut a = machine(A);
    step(&mut a, vec![send("c1", B)]);
    let limited = |cid: &str| Input::Send {
        meta: Default::default(),
        device: PHONE,
        client_id: cid.into(),
        to: B,
        payload: vec![].into(),
        over_rate: Some(Duration::from_millis(30)),
    };
    let mut facts = nothing_stored(&a.needs(&[limited("c2")]));
    facts.client_ids.insert((PHONE, "c1".into()), (1, 1_000));
    let fx = a.step(vec![limited("c1"), limited("c2")], &facts, 2_000).unwrap();
    assert!(ack_of(&fx.outcomes[0]).duplicate);
    assert!(matches!(&fx.outcomes[1], Outcome::Now(Err(MessagingError::RateLimited(w))) if w.as_millis() == 30));
    assert!(fx.write.is_empty(), "a refusal changes nothing");
}

#[test]
fn a_device_gets_its_window_then_waits_for_acks_then_is_told_caught_up() {
    let mut a = machine(A);
    step(&mut a, vec![deliver((1..=10).map(from_b).collect())]);
    let fx = step(&mut a, vec![Input::Attach { device: PHONE, connection: 7 }]);
    assert!(matches!(fx.outcomes[0], Outcome::Now(Ok(Answer::Done))));
    assert_eq!(hand(&mut a, PHONE), vec![1, 2, 3, 4], "a window of 4");
    assert_eq!(a.feed_plan(PHONE, &BTreeMap::new()), FeedPlan::Idle, "nothing more until acks");
    step(&mut a, vec![Input::Ack { device: PHONE, connection: 7, up_to: 2 }]);
    assert_eq!(hand(&mut a, PHONE), vec![5, 6]);
    step(&mut a, vec![Input::Ack { device: PHONE, connection: 7, up_to: 6 }]);
    assert_eq!(hand(&mut a, PHONE), vec![7, 8, 9, 10]);
    assert_eq!(a.feed_plan(PHONE, &BTreeMap::new()), FeedPlan::CaughtUp(10));
    a.told_caught_up(PHONE);
    assert_eq!(a.feed_plan(PHONE, &BTreeMap::new()), FeedPlan::Idle, "told once");
}

#[test]
fn acks_are_clamped_to_what_was_handed_and_send_one_receipt_per_sender() {
    let mut a = six_from_b_handed_to_the_phone(7);
    let fx = step(&mut a, vec![Input::Ack { device: PHONE, connection: 7, up_to: 1_000 }]);
    assert_eq!(a.feeds.positions.get(&PHONE).map(|p| p.acked), Some(4), "clamped to the handed 4");
    assert!(fx.write.is_empty(), "a delivery receipt costs no write: {:?}", fx.write);
    assert!(fx.kick.contains(&B), "it goes at once");
    let batch = a.outbox.take_batch(B).expect("a receipt for B");
    assert!(
        matches!(&batch[..], [(UNSEQUENCED, Forward::Receipt { kind: ReceiptKind::Delivered, up_to: 4, .. })]),
        "one receipt for B, however many messages: {batch:?}"
    );
}

#[test]
fn acks_are_stored_only_up_to_receipts_that_arrived() {
    let mut a = six_from_b_handed_to_the_phone(7);
    step(&mut a, vec![Input::Ack { device: PHONE, connection: 7, up_to: 2 }]);
    // A write that must be durable: the ack does not ride with it, since a
    // crash now would lose the receipt and the ack would not come again.
    let fx = step(&mut a, vec![send("c1", B)]);
    assert!(!fx.write.is_empty());
    assert!(fx.write.cursors.is_empty(), "{:?}", fx.write.cursors);
    assert_eq!(a.delivered_safe(), 0);
    let batch = a.outbox.take_batch(B).unwrap();
    assert!(matches!(&batch[..], [(UNSEQUENCED, Forward::Receipt { up_to: 2, .. }), (1, Forward::Message(_))]));
    // Another ack while the batch is on its way joins the receipt.
    let fx = step(&mut a, vec![Input::Ack { device: PHONE, connection: 7, up_to: 4 }]);
    assert!(fx.write.is_empty());
    assert!(a.outbox.take_batch(B).is_none(), "one batch in flight");
    step(&mut a, vec![Input::Forwarded { to: B, up_to: 1 }]);
    assert_eq!(a.delivered_safe(), 2, "B has the receipt up to 2");
    let batch = a.outbox.take_batch(B).unwrap();
    assert!(matches!(&batch[..], [(UNSEQUENCED, Forward::Receipt { up_to: 4, .. })]), "{batch:?}");
    step(&mut a, vec![Input::Forwarded { to: B, up_to: 1 }]);
    assert_eq!(a.delivered_safe(), 4);
    assert!(a.outbox.is_empty());
    let mut write = AccountWrite::new(A);
    a.take_cleanup(&mut write);
    assert!(write.cursors.contains(&(PHONE, 4)) && write.cursors.contains(&(ACCOUNT_CURSOR, 4)), "{write:?}");
    assert!(a.cleanup.is_empty());
}

#[test]
fn a_delivery_receipt_goes_before_a_read_receipt_made_after_it() {
    let mut a = six_from_b_handed_to_the_phone(7);
    // The phone acks, then marks read, in one batch of mail.
    step(&mut a, vec![Input::Ack { device: PHONE, connection: 7, up_to: 4 }, Input::MarkRead { peer: B, up_to: 4 }]);
    let batch = a.outbox.take_batch(B).unwrap();
    assert!(
        matches!(
            &batch[..],
            [
                (UNSEQUENCED, Forward::Receipt { kind: ReceiptKind::Delivered, up_to: 4, .. }),
                (_, Forward::Receipt { kind: ReceiptKind::Read, up_to: 4, .. })
            ]
        ),
        "{batch:?}"
    );
}

#[test]
fn a_receipt_from_outside_the_outbox_moves_no_mark_and_counts_once() {
    let mut a = machine(A);
    step(&mut a, vec![deliver(vec![from_b(1), from_b(2)])]);
    let receipt = |up_to| (UNSEQUENCED, Forward::Receipt { kind: ReceiptKind::Delivered, up_to, at_ms: 5 });
    let fx = step(&mut a, vec![deliver(vec![receipt(7)])]);
    assert!(matches!(fx.outcomes[0], Outcome::Later(Answer::Deliver(2))), "{:?}", fx.outcomes);
    assert!(fx.write.inbound.is_empty(), "the outbox mark stays");
    assert_eq!(fx.write.receipts, vec![(B, ReceiptKind::Delivered, 7)]);
    assert!(a.log.recent.iter().any(|(_, e)| matches!(e.as_ref(), LogEntry::Receipt { up_to: 7, .. })));
    let fx = step(&mut a, vec![deliver(vec![receipt(7)])]);
    assert!(fx.write.is_empty(), "the same receipt again changes nothing");
    // Only a receipt may come that way: a message must have its place.
    let (_, message) = from_b(3);
    let fx = step(&mut a, vec![deliver(vec![(UNSEQUENCED, message)])]);
    assert!(fx.write.is_empty());
    // Sequenced forwards still follow the mark.
    let fx = step(&mut a, vec![deliver(vec![from_b(3)])]);
    assert_eq!(fx.write.inbound, vec![(B, 3)]);
}

#[test]
fn an_ack_alone_waits_as_cleanup_for_the_next_durable_write() {
    let mut a = machine(A);
    step(&mut a, vec![Input::Attach { device: LAPTOP, connection: 7 }]);
    step(&mut a, vec![send("c1", B)]);
    assert_eq!(hand(&mut a, LAPTOP), vec![1], "her message, for her other devices");
    let fx = step(&mut a, vec![Input::Ack { device: LAPTOP, connection: 7, up_to: 1 }]);
    assert!(fx.write.is_empty(), "an ack of her own message costs no commit");
    assert!(a.cleanup.cursors.contains(&(LAPTOP, 1)));
    let fx = step(&mut a, vec![send("c2", B)]);
    assert!(fx.write.cursors.contains(&(LAPTOP, 1)), "it rides with the next write");
    assert!(a.cleanup.is_empty());
}

#[test]
fn the_sending_device_is_not_sent_its_own_messages_and_its_acks_cover_them() {
    let mut a = machine(A);
    step(&mut a, vec![Input::Attach { device: PHONE, connection: 7 }]);
    step(&mut a, vec![Input::Attach { device: LAPTOP, connection: 8 }]);
    // The phone sends two messages; only the laptop is sent them.
    step(&mut a, vec![send("c1", B)]);
    step(&mut a, vec![send("c2", B)]);
    assert_eq!(hand(&mut a, PHONE), Vec::<u64>::new(), "the phone has them from their acks");
    assert_eq!(hand(&mut a, LAPTOP), vec![1, 2]);
    // Passed over with nothing waiting for an ack, they take no room and
    // count as acknowledged (the cursor is written with the next ack).
    let phone = a.feeds.windows.get(&PHONE).copied().unwrap();
    assert_eq!((phone.sent, phone.acked, phone.shown), (2, 2, 0));
    // A message from B (3), then the phone's own (4): acking 3, all it was
    // sent, covers 4 too.
    step(&mut a, vec![deliver(vec![from_b(1)])]);
    step(&mut a, vec![send("c3", B)]);
    assert_eq!(hand(&mut a, PHONE), vec![3]);
    step(&mut a, vec![Input::Ack { device: PHONE, connection: 7, up_to: 3 }]);
    assert_eq!(a.feeds.positions.get(&PHONE).map(|p| p.acked), Some(4));
    assert!(a.cleanup.cursors.contains(&(PHONE, 4)), "{:?}", a.cleanup.cursors);
    // An ack short of what the connection was sent covers only itself.
    step(&mut a, vec![deliver(vec![from_b(2), from_b(3)])]);
    assert_eq!(hand(&mut a, PHONE), vec![5, 6]);
    step(&mut a, vec![Input::Ack { device: PHONE, connection: 7, up_to: 5 }]);
    assert_eq!(a.feeds.positions.get(&PHONE).map(|p| p.acked), Some(5));
    // (After a restart a new connection starts at the stored cursor and
    // passes over them again: the property tests crash actors.)
}

#[test]
fn a_new_connection_starts_after_the_newest_ack_even_before_it_is_durable() {
    let mut a = six_from_b_handed_to_the_phone(1);
    // Acked on the old connection, which is then replaced: the stored
    // cursor (0 here) is older than the ack.
    step(&mut a, vec![Input::Ack { device: PHONE, connection: 1, up_to: 3 }]);
    step(&mut a, vec![Input::Attach { device: PHONE, connection: 2 }]);
    assert_eq!(hand(&mut a, PHONE), vec![4, 5, 6], "nothing acknowledged comes again");
    // An ack that arrives from the replaced connection still counts.
    step(&mut a, vec![Input::Ack { device: PHONE, connection: 1, up_to: 5 }]);
    assert_eq!(a.feeds.positions.get(&PHONE).map(|p| p.acked), Some(5));
}

#[test]
fn a_read_marker_is_clamped_to_what_was_received() {
    let mut a = machine(A);
    step(&mut a, vec![deliver(vec![from_b(1), from_b(2)])]);
    let fx = step(&mut a, vec![Input::MarkRead { peer: B, up_to: 1_000_000_000_000 }]);
    assert!(fx.write.outbox_puts.iter().any(|(_, i)| matches!(
        i,
        OutboxItem { to: B, forward: Forward::Receipt { kind: ReceiptKind::Read, up_to: 2, .. } }
    )));
    assert!(fx.write.appends.iter().any(|(_, e)| matches!(e.as_ref(), LogEntry::ReadSync { peer: B, up_to: 2, .. })));
    assert_eq!(fx.write.read_markers, vec![(B, 2)]);
    // Nothing received from C: a mark for C changes nothing.
    let fx = step(&mut a, vec![Input::MarkRead { peer: C, up_to: 5 }]);
    assert!(fx.write.is_empty());
    assert!(matches!(fx.outcomes[0], Outcome::Later(Answer::Done)), "still answered");
}

#[test]
fn forwards_go_in_order_one_batch_at_a_time_and_confirmations_free_them() {
    let mut a = machine(A);
    step(&mut a, vec![send("c1", B), send("c2", B), send("c3", B)]);
    let batch = a.outbox.take_batch(B).expect("a batch");
    assert_eq!(batch.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![1, 2, 3]);
    assert!(a.outbox.take_batch(B).is_none(), "one in flight per destination");
    let fx = step(&mut a, vec![Input::Forwarded { to: B, up_to: 2 }]);
    assert!(fx.write.is_empty(), "the deletion is cleanup");
    assert_eq!(a.cleanup.outbox_deletes, vec![1, 2]);
    let rest = a.outbox.take_batch(B).expect("the rest");
    assert_eq!(rest.iter().map(|(s, _)| *s).collect::<Vec<_>>(), vec![3]);
}

#[test]
fn a_destination_drops_what_it_already_has() {
    let mut a = machine(A);
    let fx = step(&mut a, vec![deliver(vec![from_b(1), from_b(2)])]);
    assert!(matches!(answer(&fx.outcomes[0]), Answer::Deliver(2)));
    assert_eq!(fx.write.inbound, vec![(B, 2)]);
    assert_eq!(fx.write.received, vec![(B, 2)]);
    let fx = step(&mut a, vec![deliver(vec![from_b(2), from_b(3)])]);
    assert!(matches!(answer(&fx.outcomes[0]), Answer::Deliver(3)));
    assert_eq!(fx.write.appends.len(), 1, "only the new one");
    assert_eq!(a.log.last_seq(), 3);
}

#[test]
fn a_removed_device_loses_its_window_position_and_held_cursor() {
    let mut a = machine(A);
    step(&mut a, vec![deliver(vec![from_b(1)])]);
    step(&mut a, vec![Input::Attach { device: LAPTOP, connection: 3 }]);
    hand(&mut a, LAPTOP);
    step(&mut a, vec![Input::Ack { device: LAPTOP, connection: 3, up_to: 1 }]);
    let fx = step(&mut a, vec![Input::DeviceChange(DeviceChange::Removed { device: LAPTOP })]);
    assert!(a.feeds.windows.get(&LAPTOP).is_none() && a.feeds.positions.get(&LAPTOP).is_none());
    assert!(!fx.write.cursors.iter().any(|(d, _)| *d == LAPTOP), "no cursor is written for a removed device");
    assert!(fx.write.appends.iter().any(|(_, e)| matches!(e.as_ref(), LogEntry::Devices { .. })));
}

#[test]
fn idle_devices_are_set_aside_and_resumed_where_they_were() {
    let mut a = machine(A);
    step(&mut a, vec![deliver(vec![from_b(1)])]);
    step(&mut a, vec![Input::Attach { device: LAPTOP, connection: 3 }]);
    assert!(!a.is_idle(), "the device has not been handed the log");
    assert_eq!(hand(&mut a, LAPTOP), vec![1]);
    assert_eq!(a.feed_plan(LAPTOP, &BTreeMap::new()), FeedPlan::CaughtUp(1));
    a.told_caught_up(LAPTOP);
    assert!(!a.is_idle(), "what it was shown is not acknowledged");
    step(&mut a, vec![Input::Ack { device: LAPTOP, connection: 3, up_to: 1 }]);
    assert!(a.settled(), "the device has everything");
    assert!(!a.is_idle(), "the delivery receipt waits to be forwarded");
    let _batch = a.outbox.take_batch(B);
    step(&mut a, vec![Input::Forwarded { to: B, up_to: 1 }]);
    assert!(!a.is_idle(), "the receipt's deletion is held back");
    let mut write = AccountWrite::new(A);
    a.take_cleanup(&mut write);
    assert!(a.is_idle(), "a settled device leaves the actor idle");

    // The successor takes the window back as it was: nothing to send.
    let windows = a.windows();
    let mut successor = machine(A);
    step(&mut successor, vec![deliver(vec![from_b(1)])]);
    for (device, window) in windows {
        successor.resume(device, window);
    }
    assert_eq!(successor.feed_plan(LAPTOP, &BTreeMap::new()), FeedPlan::Idle, "no second caught-up marker");
    step(&mut successor, vec![deliver(vec![from_b(2)])]);
    assert_eq!(hand(&mut successor, LAPTOP), vec![2], "new entries follow on the same connection");
    assert_eq!(successor.feed_plan(LAPTOP, &BTreeMap::new()), FeedPlan::Idle);
}

#[test]
fn idle_means_nothing_forwarded_or_held() {
    let mut a = machine(A);
    assert!(a.is_idle());
    step(&mut a, vec![send("c1", B)]);
    assert!(!a.is_idle(), "a forward waits");
    let _batch = a.outbox.take_batch(B);
    step(&mut a, vec![Input::Forwarded { to: B, up_to: 1 }]);
    assert!(!a.is_idle(), "its deletion is held back");
    let mut write = AccountWrite::new(A);
    a.take_cleanup(&mut write);
    assert!(a.is_idle());
}

#[test]
fn needs_asks_only_for_what_memory_lacks() {
    let loaded = Loaded { counters: Counters { next_seq: 1_001, next_outbox: 1 }, ..Loaded::default() };
    let mut a = Machine::new(A, config(), loaded);
    // An ack reaches no further than what the device was handed.
    let ack = Input::Ack { device: PHONE, connection: 1, up_to: 900 };
    assert!(a.needs(std::slice::from_ref(&ack)).entries.is_empty(), "nothing was handed to the phone");
    a.feeds.positions.entry_or_default(PHONE).handed = 1_000;
    let needs = a.needs(&[ack, send("c1", B)]);
    assert_eq!(needs.entries, vec![(1, 900)], "the entries the ack newly covers, none of them in memory");
    assert_eq!(needs.client_ids, vec![(PHONE, "c1".to_string())]);
    assert_eq!(needs.contacts, vec![B]);
    step(&mut a, vec![send("c1", B)]);
    let needs = a.needs(&[send("c2", B)]);
    assert!(needs.contacts.is_empty(), "a known contact is not asked again");
    let fresh = a.log.last_seq();
    assert_eq!(a.needs(&[Input::Ack { device: PHONE, connection: 1, up_to: fresh }]).entries, vec![(1, 1_000)]);
}

#[test]
fn a_step_without_its_facts_is_refused_and_changes_nothing() {
    let mut a = machine(A);
    let missing = a.step(vec![Input::Attach { device: PHONE, connection: 1 }], &Facts::default(), 1);
    assert!(missing.is_err());
    assert!(a.feeds.windows.is_empty());
}

#[test]
fn a_group_orders_posts_and_tells_authors_when_every_member_has_them() {
    let g = AccountId::group(1);
    let mut group = machine(g);
    let create = Input::Group { from: A, request: GroupRequest::Create { subject: "club".into(), members: vec![B] } };
    let fx = step(&mut group, vec![create]);
    assert!(matches!(answer(&fx.outcomes[0]), Answer::Group(GroupReply::Info(meta)) if meta.members.len() == 2));
    assert_eq!(fx.write.outbox_puts.iter().map(|(_, i)| i.to).collect::<Vec<_>>(), vec![A, B], "to every member");

    let post = |author, cid: &str| group_post(author, cid, b"hi", None, None);
    let fx = step(&mut group, vec![post(B, "p1"), post(C, "p2")]);
    assert_eq!(ack_of(&fx.outcomes[0]).id.seq, 2, "the group's sequence");
    assert!(matches!(&fx.outcomes[1], Outcome::Now(Err(MessagingError::Group(GroupError::NotAMember)))));

    // A's account acknowledges up to the post; B has it by posting it.
    let receipt = |kind| Forward::Receipt { kind, up_to: 2, at_ms: 5 };
    let from_a = |items| Input::Deliver { from: A, items: Arc::from(items) };
    let mut fx = step(&mut group, vec![from_a(vec![(1, receipt(ReceiptKind::Delivered))])]);
    assert_eq!(group.marks_need(), None, "the log is in memory");
    group.advance_marks(&mut fx, &Facts::default(), 2_000).unwrap();
    let told: Vec<&OutboxItem> = fx.write.outbox_puts.iter().map(|(_, i)| i).collect();
    assert!(matches!(
        told.as_slice(),
        [OutboxItem { to: B, forward: Forward::Receipt { kind: ReceiptKind::Delivered, up_to: 2, .. } }]
    ));
    let mut fx = step(&mut group, vec![from_a(vec![(2, receipt(ReceiptKind::Read))])]);
    group.advance_marks(&mut fx, &Facts::default(), 3_000).unwrap();
    assert!(fx.write.outbox_puts.iter().any(|(_, i)| matches!(
        i,
        OutboxItem { to: B, forward: Forward::Receipt { kind: ReceiptKind::Read, up_to: 2, .. } }
    )));

    // A member that leaves gets its own removal and nothing after it.
    let leave = Input::Group { from: A, request: GroupRequest::Change(skylark_core::group::GroupChange::Leave) };
    let fx = step(&mut group, vec![leave]);
    let to: Vec<AccountId> = fx.write.outbox_puts.iter().map(|(_, i)| i.to).collect();
    assert!(to.contains(&A) && to.contains(&B));
    let fx = step(&mut group, vec![post(B, "p3")]);
    assert_eq!(fx.write.outbox_puts.iter().map(|(_, i)| i.to).collect::<Vec<_>>(), vec![B]);
    assert!(
        group.log.recent.iter().any(|(_, e)| matches!(e.as_ref(), LogEntry::Group(g) if g.body == GroupBody::Left))
    );
}

#[test]
fn a_group_takes_one_commit_per_epoch_and_stores_the_epoch_with_it() {
    let g = AccountId::group(1);
    let mut group = machine(g);
    let create = Input::Group { from: A, request: GroupRequest::Create { subject: "club".into(), members: vec![B] } };
    step(&mut group, vec![create]);
    let commit = |author, cid: &str, epoch| group_post(author, cid, b"mls", Some(epoch), None);
    // Two members commit in the same epoch, in one batch: the first wins,
    // and a resend of the winner is a duplicate, not a second commit.
    let fx = step(&mut group, vec![commit(B, "c1", 0), commit(A, "c2", 0), commit(B, "c1", 0)]);
    assert_eq!(ack_of(&fx.outcomes[0]).id.seq, 2);
    assert!(matches!(&fx.outcomes[1], Outcome::Now(Err(MessagingError::Group(GroupError::StaleEpoch(1))))));
    assert_eq!((fx.counts.stale_commits, fx.counts.stale_messages), (1, 0), "counted for the operator");
    assert!(ack_of(&fx.outcomes[2]).duplicate);
    assert_eq!(fx.write.group.as_ref().map(|m| m.mls_epoch), Some(1), "the epoch is stored with the commit");
    // The loser retries in the new epoch.
    let fx = step(&mut group, vec![commit(A, "c3", 1)]);
    assert_eq!(ack_of(&fx.outcomes[0]).id.seq, 3);
    assert_eq!(fx.write.group.as_ref().map(|m| m.mls_epoch), Some(2));
}

#[test]
fn a_group_takes_an_encrypted_message_only_in_its_current_epoch() {
    let g = AccountId::group(1);
    let mut group = machine(g);
    let create = Input::Group { from: A, request: GroupRequest::Create { subject: "club".into(), members: vec![B] } };
    step(&mut group, vec![create]);
    let post =
        |author, cid: &str, commit_epoch, message_epoch| group_post(author, cid, b"mls", commit_epoch, message_epoch);
    // A message in epoch 0 goes in; B's commit ends epoch 0, so A's next
    // message made in it is refused, names the current epoch and changes
    // nothing; made again in epoch 1, with the same client id, it goes in.
    let fx = step(
        &mut group,
        vec![post(A, "m1", None, Some(0)), post(B, "c1", Some(0), None), post(A, "m2", None, Some(0))],
    );
    assert_eq!(ack_of(&fx.outcomes[0]).id.seq, 2);
    assert_eq!(ack_of(&fx.outcomes[1]).id.seq, 3);
    assert!(matches!(&fx.outcomes[2], Outcome::Now(Err(MessagingError::Group(GroupError::StaleEpoch(1))))));
    assert_eq!((fx.counts.stale_messages, fx.counts.stale_commits), (1, 0), "counted for the operator");
    let fx = step(&mut group, vec![post(A, "m2", None, Some(1)), post(A, "m3", None, Some(2))]);
    assert_eq!(ack_of(&fx.outcomes[0]).id.seq, 4, "the refused post left no trace");
    assert!(!ack_of(&fx.outcomes[0]).duplicate);
    assert!(matches!(&fx.outcomes[1], Outcome::Now(Err(MessagingError::Group(GroupError::StaleEpoch(1))))));
    assert_eq!(fx.write.group.as_ref().map(|m| m.mls_epoch), None, "a message does not move the epoch");
    // A non-member is told that, whatever epoch it names.
    let fx = step(&mut group, vec![post(C, "m4", None, Some(0))]);
    assert!(matches!(&fx.outcomes[0], Outcome::Now(Err(MessagingError::Group(GroupError::NotAMember)))));
}

#[test]
fn a_group_reads_no_receipt_marks_for_its_members_receipts() {
    let g = AccountId::group(1);
    let group = machine(g);
    let receipt = Forward::Receipt { kind: ReceiptKind::Read, up_to: 1, at_ms: 1 };
    let needs = group.needs(&[Input::Deliver { from: A, items: Arc::from(vec![(1, receipt)]) }]);
    assert_eq!(needs.inbound, vec![A]);
    assert!(needs.receipts.is_empty(), "members' receipts go to positions");
}

#[test]
fn a_user_machine_refuses_group_mail_as_an_internal_error() {
    let mut a = machine(A);
    let info = Input::Group { from: B, request: GroupRequest::Info };
    let fx = step(&mut a, vec![info]);
    assert!(matches!(&fx.outcomes[0], Outcome::Now(Err(MessagingError::Internal(_)))));
}

/// The facts for `inputs` when the store says the account (or, for a 1:1
/// conversation's group, these members) blocked `blocked`.
fn with_blocks(m: &Machine, inputs: &[Input], blocked: &[AccountId]) -> Facts {
    let needs = m.needs(inputs);
    assert!(needs.blocks, "the block list is asked for");
    let mut facts = nothing_stored(&needs);
    facts.blocks = Some(blocked.iter().copied().collect());
    facts
}

#[test]
fn a_blocked_senders_messages_are_taken_and_dropped_and_an_unblock_lets_them_in() {
    let mut a = machine(A);
    // The store already holds the block; the machine has not read its list yet.
    let fx = step(&mut a, vec![Input::Block { peer: B, blocked: true }]);
    assert!(matches!(fx.outcomes[0], Outcome::Later(Answer::Done)), "answered once the entry is durable");
    assert!(matches!(fx.write.appends[0].1.as_ref(), LogEntry::Block { peer: B, blocked: true, .. }));

    let inputs = vec![deliver(vec![from_b(1), from_b(2)])];
    let facts = with_blocks(&a, &inputs, &[B]);
    let fx = a.step(inputs, &facts, 2_000).unwrap();
    assert_eq!(answer(&fx.outcomes[0]), &Answer::Deliver(2), "taken: the sender's outbox moves on");
    assert!(fx.write.appends.is_empty(), "nothing reaches the log");
    assert!(!fx.wake, "no push for what was dropped");
    assert_eq!(fx.counts.dropped_blocked, 2);

    // Unblocked: the list, now held, is updated without another read.
    step(&mut a, vec![Input::Block { peer: B, blocked: false }]);
    assert!(!a.needs(&[deliver(vec![from_b(3)])]).blocks);
    let fx = step(&mut a, vec![deliver(vec![from_b(3)])]);
    assert!(matches!(fx.write.appends[0].1.as_ref(), LogEntry::Message(m) if m.id.seq == 3));
}

#[test]
fn sending_to_an_account_you_blocked_is_refused_and_writes_nothing() {
    let mut a = machine(A);
    let inputs = vec![send("c1", B), send("c2", C)];
    let facts = with_blocks(&a, &inputs, &[B]);
    let fx = a.step(inputs, &facts, 1_000).unwrap();
    assert!(matches!(fx.outcomes[0], Outcome::Now(Err(MessagingError::YouBlocked))));
    assert_eq!(ack_of(&fx.outcomes[1]).id.seq, 1, "others are written to as before");
    assert_eq!(fx.write.outbox_puts.iter().map(|(_, i)| i.to).collect::<Vec<_>>(), vec![C]);
}

#[test]
fn a_direct_group_keeps_a_blocked_members_messages_from_the_blocker_but_not_its_commits() {
    let direct = AccountId::direct(A, B).unwrap();
    let mut group = machine(direct);
    step(&mut group, vec![Input::Group { from: A, request: GroupRequest::OpenDirect { with: B } }]);
    let post = |author, cid: &str, commit_epoch| group_post(author, cid, b"mls", commit_epoch, None);
    // B blocked A.
    let inputs = vec![post(A, "m1", None), post(B, "m2", None), post(A, "c1", Some(0))];
    let facts = with_blocks(&group, &inputs, &[B]);
    let fx = group.step(inputs, &facts, 1_000).unwrap();
    let to = |fx: &Effects, seq: u64| -> Vec<AccountId> {
        let mut to: Vec<AccountId> = fx
            .write
            .outbox_puts
            .iter()
            .filter(|(_, i)| matches!(&i.forward, Forward::Group(e) if e.seq == seq))
            .map(|(_, i)| i.to)
            .collect();
        to.sort();
        to
    };
    let first = ack_of(&fx.outcomes[0]).id.seq;
    assert_eq!(to(&fx, first), vec![A], "A's message goes to A's own devices only");
    assert!(matches!(fx.outcomes[1], Outcome::Now(Err(MessagingError::YouBlocked))), "the blocker may not write");
    let commit = ack_of(&fx.outcomes[2]).id.seq;
    assert_eq!(to(&fx, commit), vec![A, B], "a commit reaches both");
    assert_eq!(fx.contacts, vec![(A, B)], "A wrote to B (the refused post and the commit record nothing)");
    // The block is lifted, and a post follows in the same batch: the group
    // updates what it holds, with no read.
    let inputs = vec![Input::Block { peer: A, blocked: false }, post(A, "m3", None)];
    assert!(!group.needs(&inputs).blocks, "held already");
    let fx = step(&mut group, inputs);
    assert_eq!(to(&fx, ack_of(&fx.outcomes[1]).id.seq), vec![A, B]);
    assert!(fx.contacts.is_empty(), "recorded once per actor");
    group.contact_not_recorded(A);
    let fx = step(&mut group, vec![post(A, "m3b", None), post(B, "m3c", None)]);
    assert_eq!(fx.contacts, vec![(A, B), (B, A)], "asked again when the record failed; B wrote too");
    // And blocked again.
    let fx = step(&mut group, vec![Input::Block { peer: A, blocked: true }, post(A, "m4", None)]);
    assert_eq!(to(&fx, ack_of(&fx.outcomes[1]).id.seq), vec![A]);
}

#[test]
fn a_deleted_account_keeps_nothing_and_lets_its_devices_go() {
    let mut a = machine(A);
    step(&mut a, vec![Input::Attach { device: PHONE, connection: 1 }]);
    assert_eq!(a.attached(), vec![PHONE]);
    let fx = step(&mut a, vec![Input::Deleted]);
    assert!(fx.write.is_empty());
    assert!(a.attached().is_empty(), "its connections are let go");
    assert!(a.feeds.positions.get(&PHONE).is_none(), "so they are told their device was removed");
    let fx = step(&mut a, vec![deliver(vec![from_b(1)])]);
    assert_eq!(answer(&fx.outcomes[0]), &Answer::Deliver(1), "taken, so the sender's outbox moves on");
    assert!(fx.write.appends.is_empty(), "kept nowhere");
}

/// A post by `author`'s phone: a message, an MLS commit (`commit_epoch`),
/// or an encrypted message naming its epoch (`message_epoch`).
fn group_post(
    author: AccountId,
    cid: &str,
    payload: &[u8],
    commit_epoch: Option<u64>,
    message_epoch: Option<u64>,
) -> Input {
    Input::Post {
        meta: Default::default(),
        author,
        device: PHONE,
        client_id: cid.into(),
        payload: payload.to_vec().into(),
        commit_epoch,
        message_epoch,
        over_rate: None,
    }
}
