//! Property tests of the machine: two accounts and a group of both, a
//! model of the durable store, and random interleavings of sends and posts
//! (and resends), forwards
//! delivered in any order between destinations, devices attaching,
//! acknowledging and leaving, reads, crashes (the machine dropped and
//! rebuilt from what was durable, forwards in flight from it lost) and
//! failed writes. After the run everything is let settle, then the
//! guarantees are checked: nothing acknowledged is lost, each message is in
//! its recipient's log once and in its sender's order, both members see the
//! group's events once each in the one group order, a client id names one
//! message however often it is resent, no device is handed an entry at or
//! below what it acknowledged, and every device ends up with everything.
//!
//! No runtime and no store: the shell's part (read what the machine needs,
//! make the write durable, then perform effects) is done here by hand.

use super::group::GroupState;
use super::machine::*;
use crate::messaging::GroupRequest;
use crate::messaging::{MessagingConfig, SendAck};
use proptest::prelude::*;
use skylark_core::group::GroupMeta;
use skylark_core::message::{LogEntry, MessageId, OutboxItem, ReceiptKind};
use skylark_core::{AccountId, DeviceId};
use skylark_store::{AccountWrite, Counters};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

const DEVICES: [DeviceId; 2] = [DeviceId(1), DeviceId(2)];

/// What the store holds for one account: the shape of `AccountWrite`.
#[derive(Debug, Default, Clone)]
struct Durable {
    counters: Counters,
    log: BTreeMap<u64, Arc<LogEntry>>,
    outbox: BTreeMap<u64, OutboxItem>,
    client_ids: HashMap<(DeviceId, String), u64>,
    inbound: HashMap<AccountId, u64>,
    cursors: HashMap<DeviceId, u64>,
    receipts: HashMap<(AccountId, ReceiptKind), u64>,
    read_markers: HashMap<AccountId, u64>,
    received: HashMap<AccountId, u64>,
    contacts: HashSet<AccountId>,
    group: Option<GroupMeta>,
}

impl Durable {
    fn apply(&mut self, w: &AccountWrite) {
        for (seq, entry) in &w.appends {
            assert!(self.log.insert(*seq, entry.clone()).is_none(), "log entry {seq} written twice");
        }
        for (seq, item) in &w.outbox_puts {
            self.outbox.insert(*seq, item.clone());
        }
        for seq in &w.outbox_deletes {
            self.outbox.remove(seq);
        }
        if let Some(c) = w.counters {
            self.counters = c;
        }
        for (device, id, seq) in &w.client_ids {
            self.client_ids.insert((*device, id.clone()), *seq);
        }
        self.inbound.extend(w.inbound.iter().copied());
        self.cursors.extend(w.cursors.iter().copied());
        self.receipts.extend(w.receipts.iter().map(|(p, k, v)| ((*p, *k), *v)));
        self.read_markers.extend(w.read_markers.iter().copied());
        self.received.extend(w.received.iter().copied());
        self.contacts.extend(w.contacts.iter().copied());
        if let Some(meta) = &w.group {
            self.group = Some(meta.clone());
        }
    }

    fn loaded(&self) -> Loaded {
        Loaded {
            counters: self.counters,
            outbox: self.outbox.iter().map(|(s, i)| (*s, i.clone())).collect(),
            delivered: self.cursors.get(&ACCOUNT_CURSOR).copied().unwrap_or(0),
            group: self.group.clone().map(|meta| {
                let mut stored: HashMap<AccountId, (u64, u64)> = HashMap::new();
                for ((peer, kind), up_to) in &self.receipts {
                    let slot = stored.entry(*peer).or_default();
                    match kind {
                        ReceiptKind::Delivered => slot.0 = *up_to,
                        ReceiptKind::Read => slot.1 = *up_to,
                    }
                }
                GroupState::new(meta, &stored)
            }),
        }
    }

    /// What the shell's read phase would find.
    fn facts(&self, needs: &Needs) -> Facts {
        let mut facts = Facts::default();
        for key in &needs.client_ids {
            if let Some(seq) = self.client_ids.get(key) {
                facts.client_ids.insert(key.clone(), (*seq, self.log[seq].at_ms()));
            }
        }
        for p in &needs.contacts {
            facts.contacts.insert(*p, self.contacts.contains(p));
        }
        for p in &needs.inbound {
            facts.inbound.insert(*p, self.inbound.get(p).copied().unwrap_or(0));
        }
        for k in &needs.receipts {
            facts.receipts.insert(*k, self.receipts.get(k).copied().unwrap_or(0));
        }
        for p in &needs.read_markers {
            facts.read_markers.insert(*p, self.read_markers.get(p).copied().unwrap_or(0));
        }
        for p in &needs.received {
            facts.received.insert(*p, self.received.get(p).copied().unwrap_or(0));
        }
        for d in &needs.cursors {
            // Devices are enrolled with a cursor at the start of the log.
            facts.cursors.insert(*d, Some(self.cursors.get(d).copied().unwrap_or(0)));
        }
        for (from, to) in &needs.entries {
            facts.entries.extend(self.log.range(*from..=*to).map(|(s, e)| (*s, e.clone())));
        }
        if needs.blocks {
            // The model blocks nobody.
            facts.blocks = Some(Default::default());
        }
        facts
    }
}

/// What one device has: its connection (if attached) and what it was handed.
#[derive(Debug, Default)]
struct Device {
    connection: Option<u64>,
    /// Log sequences it holds (a client keeps entries by sequence).
    seen: HashSet<u64>,
    /// Its own messages, passed over by the feed (it has their acks).
    own: HashSet<u64>,
    /// Highest sequence it acknowledged to the current machine.
    acked: u64,
}

struct Node {
    account: AccountId,
    durable: Durable,
    machine: Machine,
    devices: [Device; 2],
}

impl Node {
    fn new(account: AccountId) -> Node {
        let machine = Machine::new(account, config(), Loaded::default());
        Node { account, durable: Durable::default(), machine, devices: Default::default() }
    }
}

fn config() -> MessagingConfig {
    MessagingConfig { device_window: 3, ..MessagingConfig::default() }
}

#[derive(Debug, Clone)]
enum Op {
    /// Node `from` sends to the other with one of a few client ids (so
    /// some are resends).
    Send {
        from: usize,
        cid: u8,
    },
    /// One of the forwards in flight arrives.
    Deliver {
        pick: usize,
    },
    Attach {
        node: usize,
        device: usize,
    },
    Detach {
        node: usize,
        device: usize,
    },
    /// Every attached device is handed what its window allows.
    Pump,
    Ack {
        node: usize,
        device: usize,
    },
    /// A misbehaving device acknowledges far more than it was handed.
    AckTooMuch {
        node: usize,
        device: usize,
    },
    MarkRead {
        node: usize,
    },
    /// A member posts to the group, with one of a few client ids.
    Post {
        from: usize,
        cid: u8,
    },
    /// A member marks the group read.
    MarkGroupRead {
        node: usize,
    },
    /// The actor's task dies: memory is gone, so are its forwards in flight.
    Crash {
        node: usize,
    },
    /// The next write of the node fails; the actor restarts from the store.
    FailWrite {
        node: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..2usize, 0..8u8).prop_map(|(from, cid)| Op::Send { from, cid }),
        5 => (0..16usize).prop_map(|pick| Op::Deliver { pick }),
        2 => (0..2usize, 0..2usize).prop_map(|(node, device)| Op::Attach { node, device }),
        1 => (0..2usize, 0..2usize).prop_map(|(node, device)| Op::Detach { node, device }),
        3 => Just(Op::Pump),
        3 => (0..2usize, 0..2usize).prop_map(|(node, device)| Op::Ack { node, device }),
        1 => (0..2usize, 0..2usize).prop_map(|(node, device)| Op::AckTooMuch { node, device }),
        1 => (0..2usize).prop_map(|node| Op::MarkRead { node }),
        2 => (0..2usize, 0..6u8).prop_map(|(from, cid)| Op::Post { from, cid }),
        1 => (0..2usize).prop_map(|node| Op::MarkGroupRead { node }),
        1 => (0..3usize).prop_map(|node| Op::Crash { node }),
        1 => (0..3usize).prop_map(|node| Op::FailWrite { node }),
    ]
}

/// The group's node.
const GROUP: usize = 2;

struct World {
    /// Two accounts, then the group of both.
    nodes: [Node; 3],
    /// Forwards in flight: (from, to, batch).
    flight: Vec<(usize, usize, Batch)>,
    now: u64,
    connections: u64,
    fail_next: [bool; 3],
    /// Every ack a sender got: (sender, client id) → message id.
    acked: HashMap<(usize, String), MessageId>,
}

impl World {
    fn new() -> World {
        let mut world = World {
            nodes: [Node::new(AccountId(1)), Node::new(AccountId(2)), Node::new(AccountId::group(1))],
            flight: Vec::new(),
            now: 1,
            connections: 0,
            fail_next: [false; 3],
            acked: HashMap::new(),
        };
        let create = GroupRequest::Create { subject: "both".into(), members: vec![AccountId(2)] };
        let created = world.step(GROUP, vec![Input::Group { from: AccountId(1), request: create }]);
        assert!(matches!(created.as_deref(), Some([Outcome::Later(Answer::Group(_))])), "{created:?}");
        world
    }

    /// The shell's work for one batch on node `n`: read, step, write, then
    /// effects. `None` when the write failed (the actor restarted).
    fn step(&mut self, n: usize, inputs: Vec<Input>) -> Option<Vec<Outcome>> {
        self.now += 1;
        let node = &mut self.nodes[n];
        let facts = node.durable.facts(&node.machine.needs(&inputs));
        let mut fx = node.machine.step(inputs, &facts, self.now).expect("the read phase gave every fact asked for");
        // A group reads what its marks passed, then tells authors.
        let mut more = Facts::default();
        if let Some((from, to)) = node.machine.marks_need() {
            more.entries.extend(node.durable.log.range(from..=to).map(|(s, e)| (*s, e.clone())));
        }
        node.machine.advance_marks(&mut fx, &more, self.now).expect("the marks' entries were read");
        if std::mem::take(&mut self.fail_next[n]) {
            self.restart(n);
            return None;
        }
        self.nodes[n].durable.apply(&fx.write);
        for to in fx.kick {
            self.forward(n, to);
        }
        Some(fx.outcomes)
    }

    fn forward(&mut self, n: usize, to: AccountId) {
        if let Some(batch) = self.nodes[n].machine.outbox.take_batch(to) {
            let dest = self.nodes.iter().position(|x| x.account == to).expect("a known account");
            self.flight.push((n, dest, batch));
        }
    }

    /// Memory is lost: rebuilt from the store; its connections and the
    /// forwards it had in flight are gone, and those resume from its outbox.
    fn restart(&mut self, n: usize) {
        let node = &mut self.nodes[n];
        node.machine = Machine::new(node.account, config(), node.durable.loaded());
        for (device, id) in node.devices.iter_mut().zip(DEVICES) {
            device.connection = None;
            // Acks not yet durable are cleanup, lost with the memory: the
            // device may be handed again what is after its stored cursor.
            device.acked = node.durable.cursors.get(&id).copied().unwrap_or(0);
        }
        self.flight.retain(|(from, _, _)| *from != n);
        for to in self.nodes[n].machine.destinations() {
            self.forward(n, to);
        }
    }

    fn apply(&mut self, op: Op) {
        match op.clone() {
            Op::Send { from, cid } => {
                let to = self.nodes[1 - from].account;
                let client_id = format!("c{cid}");
                let input = Input::Send {
                    meta: Default::default(),
                    device: DEVICES[0],
                    client_id: client_id.clone(),
                    to,
                    payload: vec![cid].into(),
                    over_rate: None,
                };
                if let Some(outcomes) = self.step(from, vec![input]) {
                    let ack = ack(&outcomes[0]);
                    let first = *self.acked.entry((from, client_id)).or_insert(ack.id);
                    assert_eq!(first, ack.id, "a client id names one message, however often it is sent");
                }
            }
            Op::Deliver { pick } => {
                if self.flight.is_empty() {
                    return;
                }
                let (from, to, batch) = self.flight.remove(pick % self.flight.len());
                let source = self.nodes[from].account;
                let Some(outcomes) = self.step(to, vec![Input::Deliver { from: source, items: batch }]) else {
                    // Not durable at the destination: the sender retries.
                    return self.flight.push((
                        from,
                        to,
                        self.nodes[from].machine.outbox.take_batch_again(self.nodes[to].account),
                    ));
                };
                let Outcome::Later(Answer::Deliver(up_to)) = outcomes[0] else { panic!("{:?}", outcomes[0]) };
                let dest = self.nodes[to].account;
                self.step(from, vec![Input::Forwarded { to: dest, up_to }]);
            }
            Op::Attach { node, device } => {
                self.connections += 1;
                let connection = self.connections;
                let d = DEVICES[device];
                if self.step(node, vec![Input::Attach { device: d, connection }]).is_some() {
                    // A new connection starts after the device's newest ack,
                    // durable or not: `acked` is kept across connections.
                    self.nodes[node].devices[device].connection = Some(connection);
                }
            }
            Op::Detach { node, device } => {
                if let Some(connection) = self.nodes[node].devices[device].connection.take() {
                    self.step(node, vec![Input::Detach { device: DEVICES[device], connection }]);
                }
            }
            Op::Pump => {
                for n in 0..2 {
                    for device in 0..2 {
                        self.pump(n, device);
                    }
                }
            }
            Op::Ack { node, device } | Op::AckTooMuch { node, device } => {
                let dev = &self.nodes[node].devices[device];
                let Some(connection) = dev.connection else { return };
                let seen = dev.seen.iter().copied().max().unwrap_or(0);
                let up_to = if matches!(op, Op::AckTooMuch { .. }) { seen + 1_000 } else { seen };
                if self.step(node, vec![Input::Ack { device: DEVICES[device], connection, up_to }]).is_some() {
                    // As far as the server took it: acks are clamped to what
                    // this actor handed the device.
                    let taken = self.nodes[node].machine.feeds.positions.get(&DEVICES[device]).map(|p| p.acked);
                    let dev = &mut self.nodes[node].devices[device];
                    dev.acked = dev.acked.max(taken.unwrap_or(0));
                }
            }
            Op::MarkRead { node } => {
                let peer = self.nodes[1 - node].account;
                self.step(node, vec![Input::MarkRead { peer, up_to: u64::MAX }]);
            }
            Op::MarkGroupRead { node } => {
                let group = self.nodes[GROUP].account;
                self.step(node, vec![Input::MarkRead { peer: group, up_to: u64::MAX }]);
            }
            Op::Post { from, cid } => {
                // Device ids are global: each account posts from its own.
                let device = DeviceId(100 + from as u64);
                let client_id = format!("g{cid}");
                let author = self.nodes[from].account;
                let post = Input::Post {
                    meta: Default::default(),
                    author,
                    device,
                    client_id: client_id.clone(),
                    payload: vec![cid].into(),
                    commit_epoch: None,
                    message_epoch: None,
                    over_rate: None,
                };
                if let Some(outcomes) = self.step(GROUP, vec![post]) {
                    let ack = ack(&outcomes[0]);
                    let first = *self.acked.entry((GROUP + from, client_id)).or_insert(ack.id);
                    assert_eq!(first, ack.id, "a post's client id names one post");
                }
            }
            Op::Crash { node } => self.restart(node),
            Op::FailWrite { node } => self.fail_next[node] = true,
        }
    }

    /// Hands a device what its window allows, as the shell would; checks
    /// nothing it acknowledged comes again.
    fn pump(&mut self, n: usize, device: usize) {
        let d = DEVICES[device];
        let node = &mut self.nodes[n];
        if node.devices[device].connection.is_none() {
            return;
        }
        let mut fetched = BTreeMap::new();
        loop {
            match node.machine.feed_plan(d, &fetched) {
                FeedPlan::Idle | FeedPlan::CaughtUp(_) => {
                    node.machine.told_caught_up(d);
                    return;
                }
                FeedPlan::Fetch { from, to } => {
                    let before = fetched.len();
                    fetched.extend(node.durable.log.range(from..=to).map(|(s, e)| (*s, e.clone())));
                    assert!(fetched.len() > before, "a fetch of {from}..={to} found nothing");
                }
                FeedPlan::Entries(entries) => {
                    let dev = &mut node.devices[device];
                    let mut shown = None;
                    for (seq, entry) in &entries {
                        assert!(
                            *seq > dev.acked,
                            "entry {seq} handed again after the device acknowledged {}",
                            dev.acked
                        );
                        // The device's own messages are passed over: it has
                        // them from their acks.
                        if node.machine.hands(d, entry) {
                            dev.seen.insert(*seq);
                            shown = Some(*seq);
                        } else {
                            dev.own.insert(*seq);
                        }
                    }
                    let last = entries.last().map(|(s, _)| *s).expect("a plan has entries");
                    node.machine.fed(d, last, shown);
                }
            }
        }
    }

    /// Lets everything in flight arrive and every device catch up.
    fn settle(&mut self) {
        self.fail_next = [false; 3];
        for n in 0..2 {
            for device in 0..2 {
                if self.nodes[n].devices[device].connection.is_none() {
                    self.apply(Op::Attach { node: n, device });
                }
            }
        }
        for _ in 0..10_000 {
            if self.flight.is_empty() {
                let before = self.progress();
                self.apply(Op::Pump);
                for n in 0..2 {
                    for device in 0..2 {
                        self.apply(Op::Ack { node: n, device });
                    }
                }
                if self.flight.is_empty() && self.progress() == before {
                    return;
                }
            } else {
                self.apply(Op::Deliver { pick: 0 });
            }
        }
        panic!("the world did not settle");
    }

    /// Grows while devices are handed or acknowledge anything (entries
    /// handed again after a reconnect count too, though the device has them).
    fn progress(&self) -> u64 {
        let mut sum = 0;
        for node in &self.nodes {
            sum += node.devices.iter().map(|d| d.seen.len() as u64).sum::<u64>();
            sum += node.machine.feeds.positions.iter().map(|(_, p)| p.handed + p.acked).sum::<u64>();
        }
        sum
    }

    fn check(&self) {
        for (n, node) in self.nodes[..GROUP].iter().enumerate() {
            let peer = &self.nodes[1 - n];
            // Each message from the peer is in this log once, in the peer's order.
            let from_peer: Vec<MessageId> = node
                .durable
                .log
                .values()
                .filter_map(|e| match e.as_ref() {
                    LogEntry::Message(m) if m.id.sender == peer.account => Some(m.id),
                    _ => None,
                })
                .collect();
            let mut sorted = from_peer.clone();
            sorted.sort();
            sorted.dedup();
            assert_eq!(from_peer, sorted, "once each, in the sender's order");
            // Nothing acknowledged to the peer's device is missing here.
            for ((sender, cid), id) in &self.acked {
                if *sender == 1 - n {
                    assert!(from_peer.contains(id), "acked message {cid} ({id:?}) lost");
                }
            }
            // Receipts never name more than the peer received.
            let received = peer.durable.received.get(&node.account).copied().unwrap_or(0);
            for e in node.durable.log.values() {
                if let LogEntry::Receipt { up_to, kind, peer: from, .. } = e.as_ref()
                    && *from == peer.account
                {
                    assert!(*up_to <= received, "a {kind:?} receipt up to {up_to}; the peer received {received}");
                }
            }
            // Everything is acknowledged: the peer has a delivery receipt
            // for this account's last message it received, and the group one
            // for its last event, whatever crashes lost on the way.
            let last_to_peer = peer
                .durable
                .log
                .values()
                .filter_map(|e| match e.as_ref() {
                    LogEntry::Message(m) if m.id.sender == node.account => Some(m.id.seq),
                    _ => None,
                })
                .max()
                .unwrap_or(0);
            let receipt = node.durable.receipts.get(&(peer.account, ReceiptKind::Delivered)).copied().unwrap_or(0);
            assert_eq!(receipt, last_to_peer, "node {n}'s delivery receipt from its peer");
            let group = &self.nodes[GROUP];
            let position = group.durable.receipts.get(&(node.account, ReceiptKind::Delivered)).copied().unwrap_or(0);
            assert_eq!(position, group.durable.counters.next_seq - 1, "member {n}'s delivery receipt to the group");
            // The group's events: all of them, once each, in the group's order.
            let seen: Vec<u64> = node
                .durable
                .log
                .values()
                .filter_map(|e| match e.as_ref() {
                    LogEntry::Group(g) if g.group == group.account => Some(g.seq),
                    _ => None,
                })
                .collect();
            let all: Vec<u64> = group.durable.log.keys().copied().collect();
            assert_eq!(seen, all, "member {n} sees the one group order, each event once");
            for ((who, cid), id) in &self.acked {
                if *who >= GROUP {
                    assert!(all.contains(&id.seq), "acked post {cid} ({id:?}) lost");
                }
            }
            // Every device has everything after where it started.
            for (i, device) in node.devices.iter().enumerate() {
                let last = node.durable.counters.next_seq - 1;
                assert_eq!(node.machine.log.last_seq(), last, "memory and store agree on the log");
                for seq in 1..=last {
                    assert!(
                        device.seen.contains(&seq) || device.own.contains(&seq),
                        "device {i} of node {n} never got entry {seq} of {last}: {device:?} {:?} {:?} {:?}",
                        node.machine.feeds,
                        node.durable.cursors,
                        node.durable.counters
                    );
                }
            }
        }
    }
}

fn ack(outcome: &Outcome) -> SendAck {
    match outcome {
        Outcome::Later(Answer::Send(ack)) => *ack,
        other => panic!("a send is answered with an ack, got {other:?}"),
    }
}

impl Outbox {
    /// The batch in flight for `to` again (the sender's retry of the same batch).
    fn take_batch_again(&mut self, to: AccountId) -> Batch {
        self.in_flight.remove(&to);
        self.take_batch(to).expect("the batch is still in the outbox")
    }
}

proptest! {
    // 300 cases in CI (well under a second); PROPTEST_CASES=N runs more.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(300),
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_guarantees_hold_under_any_interleaving(ops in proptest::collection::vec(op(), 1..120)) {
        let mut world = World::new();
        for op in ops {
            world.apply(op);
        }
        world.settle();
        world.check();
    }
}
