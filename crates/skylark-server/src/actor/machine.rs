//! The actor's rules as a sans-IO state machine.
//!
//! [`Machine`] holds everything one account's (or one group's) actor knows
//! and decides everything the actor does, but performs nothing: no store,
//! no clock, no channels, no tasks. The shell (`actor.rs`) feeds it a batch
//! of [`Input`]s with the [`Facts`] it asked for beforehand
//! ([`Machine::needs`]) and the time, and performs the [`Effects`] it
//! returns: make the write durable, then answer, forward and feed devices.
//! So its rules — deduplication, windows, receipts, cleanup, group order
//! and marks — are tested here without a runtime (see `tests` below and
//! `proptests.rs`).
//!
//! The state is split into named parts: the [`Log`] (counters and the
//! recent entries), the [`Outbox`] (forwards per destination), the
//! [`Feeds`] (one position per device, and the attached connections' windows),
//! the per-peer [`Marks`] (high-water marks, cached from the store), the
//! deferred [`Cleanup`], and the kind of actor ([`Kind`]: a user's, or a
//! group's with its roster).
//!
//! It must not know how the store, the registry or the transports work;
//! it knows domain types and [`AccountWrite`], the shape of one durable
//! step.

use super::group::GroupState;
use crate::messaging::{GroupReply, GroupRequest, MessagingConfig, MessagingError, SendAck};
use crate::small_map::SmallMap;
use skylark_core::message::{
    DeviceChange, Forward, LogEntry, Message, MessageId, Meta, MetaRequest, MetaRules, OutboxItem, ReceiptKind,
};
use skylark_core::{AccountId, DeviceId};
use skylark_store::{AccountWrite, Counters};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

/// Recent log entries kept in memory, so live delivery needs no store read.
pub(crate) const RECENT: usize = 512;
/// Log entries read from the store in one go.
pub(crate) const READ_CHUNK: usize = 128;
/// Forwards sent to one destination in one go at most.
pub(crate) const MAX_FORWARD_BATCH: usize = 128;
/// The delivery cursor of the account as a whole (highest sequence any of
/// its devices acknowledged), kept under this pseudo device id; real device
/// ids start at 1.
pub(crate) const ACCOUNT_CURSOR: DeviceId = DeviceId(0);

/// Forwards in outbox order, shared between retries without copying.
pub(crate) type Batch = Arc<[(u64, Forward)]>;

/// The outbox sequence of a forward that is not in the outbox: a delivery
/// receipt, held in memory until its destination has it (see
/// [`HeldReceipt`]). Taking it twice changes nothing (a receipt names the
/// highest entry delivered), so it needs no place in the destination's
/// high-water mark. Outbox sequences start at 1.
pub(crate) const UNSEQUENCED: u64 = 0;

/// A 1:1 message as the sending device gave it.
pub(crate) struct Outgoing {
    device: DeviceId,
    client_id: String,
    to: AccountId,
    payload: bytes::Bytes,
    meta: MetaRequest,
}

/// One piece of mail, without its reply channel (the shell keeps those).
#[derive(Debug, Clone)]
pub(crate) enum Input {
    /// A device of this account sends to another account (user actors).
    /// `over_rate` is the wait if the device is over its send rate (the
    /// shell asks the limiter for new client ids only); a resend of an
    /// accepted message is answered as such whatever the rate.
    Send {
        device: DeviceId,
        client_id: String,
        to: AccountId,
        payload: bytes::Bytes,
        meta: MetaRequest,
        over_rate: Option<Duration>,
    },
    /// A member posts (group actors); `over_rate` as for [`Input::Send`].
    Post {
        author: AccountId,
        device: DeviceId,
        client_id: String,
        payload: bytes::Bytes,
        /// An MLS commit made in this epoch (see `GroupMeta::mls_epoch`).
        commit_epoch: Option<u64>,
        /// An MLS application message encrypted in this epoch.
        message_epoch: Option<u64>,
        meta: MetaRequest,
        over_rate: Option<Duration>,
    },
    /// A request to this group (group actors).
    Group {
        from: AccountId,
        request: GroupRequest,
    },
    /// Another actor's forwards, to be made durable here.
    Deliver {
        from: AccountId,
        items: Batch,
    },
    /// The destination made our forwards up to `up_to` durable.
    Forwarded {
        to: AccountId,
        up_to: u64,
    },
    Attach {
        device: DeviceId,
        connection: u64,
    },
    Detach {
        device: DeviceId,
        connection: u64,
    },
    Ack {
        device: DeviceId,
        connection: u64,
        up_to: u64,
    },
    MarkRead {
        peer: AccountId,
        up_to: u64,
    },
    DeviceChange(DeviceChange),
    /// The account blocked (or unblocked) `peer` (user actors; the store
    /// already holds the change). A 1:1 conversation's group is told too
    /// (its other member is the blocker).
    Block {
        peer: AccountId,
        blocked: bool,
    },
    /// The account was deleted (user actors): from now on whatever arrives
    /// for it is taken and dropped.
    Deleted,
    /// The account named (or, empty, unnamed) a contact; the store already
    /// holds it. Recorded in the log for its devices.
    ContactName {
        peer: AccountId,
        name: String,
    },
}

/// An answer to one input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Answer {
    Send(SendAck),
    /// The highest outbox sequence applied from the source.
    Deliver(u64),
    Group(GroupReply),
    Done,
}

/// What becomes of one input.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    /// Answered once the batch's write is durable (failed if it is not).
    Later(Answer),
    /// Answered at once: a refusal, or an answer that needs no write.
    Now(Result<Answer, MessagingError>),
    /// Nothing to answer.
    Silent,
}

/// What the shell must do after a step, in order: make `write` durable;
/// then answer the `outcomes` (index by index with the inputs), start
/// forwards to `kick`, wake offline devices if `wake`, and feed devices.
#[derive(Debug)]
pub(crate) struct Effects {
    pub write: AccountWrite,
    pub outcomes: Vec<Outcome>,
    /// Destinations whose outbox may have something to send now.
    pub kick: HashSet<AccountId>,
    /// The account received messages (push wakes offline devices).
    pub wake: bool,
    /// Contacts of other accounts to record once the write is durable,
    /// as (author, peer): a 1:1 conversation's group records that its
    /// author wrote to the other member (they live with the author, not
    /// in the group's write).
    pub contacts: Vec<(AccountId, AccountId)>,
    /// For metrics.
    pub counts: Counts,
}

/// What a step did, for the shell's metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Counts {
    pub accepted: u64,
    pub group_accepted: u64,
    pub stored: u64,
    pub group_events_stored: u64,
    /// Messages from blocked senders, taken and dropped.
    pub dropped_blocked: u64,
    /// Copies of messages deleted for everyone whose payload was purged.
    pub purged: u64,
    /// Encrypted posts refused because a commit ended the epoch they were
    /// made in: MLS commits, and application messages.
    pub stale_commits: u64,
    pub stale_messages: u64,
}

/// A fact the machine needed and was not given: the shell's prefetch and
/// the machine disagree (a bug). The batch is abandoned like a failed write.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("actor step lacked a fact: {0}")]
pub(crate) struct Missing(pub String);

/// What the shell reads from the store before a step, as asked by
/// [`Machine::needs`]. Only what the machine does not already hold.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Needs {
    pub client_ids: Vec<(DeviceId, String)>,
    pub contacts: Vec<AccountId>,
    pub inbound: Vec<AccountId>,
    pub receipts: Vec<(AccountId, ReceiptKind)>,
    pub read_markers: Vec<AccountId>,
    pub received: Vec<AccountId>,
    pub cursors: Vec<DeviceId>,
    /// Log ranges (inclusive) not in memory.
    pub entries: Vec<(u64, u64)>,
    /// The account's block list (for a 1:1 conversation's group: which of
    /// its two members blocked the other), and whether the account still
    /// exists.
    pub blocks: bool,
    /// Copies of other accounts' messages (or group posts) to purge, each
    /// searched no further back than the time given.
    pub copies: Vec<(MessageId, u64)>,
}

impl Needs {
    pub fn is_empty(&self) -> bool {
        *self == Needs::default()
    }
}

/// The answers to [`Needs`].
#[derive(Debug, Default, Clone)]
pub(crate) struct Facts {
    /// (device, client id) → (log sequence, accepted at), for ids already
    /// in the store; ids asked for and absent are new.
    pub client_ids: HashMap<(DeviceId, String), (u64, u64)>,
    pub contacts: HashMap<AccountId, bool>,
    pub inbound: HashMap<AccountId, u64>,
    pub receipts: HashMap<(AccountId, ReceiptKind), u64>,
    pub read_markers: HashMap<AccountId, u64>,
    pub received: HashMap<AccountId, u64>,
    pub cursors: HashMap<DeviceId, Option<u64>>,
    pub entries: BTreeMap<u64, Arc<LogEntry>>,
    pub blocks: Option<HashSet<AccountId>>,
    /// The account was deleted (read with `blocks`).
    pub deleted: bool,
    /// Where the log holds each copy asked for, if it does.
    pub copies: HashMap<MessageId, Option<(u64, Arc<LogEntry>)>>,
}

/// The account's log as the actor sees it: its counters, and the newest
/// entries in memory.
#[derive(Debug, Default)]
pub(crate) struct Log {
    pub counters: Counters,
    pub recent: VecDeque<(u64, Arc<LogEntry>)>,
}

impl Log {
    pub fn last_seq(&self) -> u64 {
        self.counters.next_seq - 1
    }

    /// The first sequence held in memory (everything from it to the end is).
    fn recent_from(&self) -> u64 {
        self.recent.front().map(|(s, _)| *s).unwrap_or(self.counters.next_seq)
    }

    /// Entry `seq`, from memory or from the facts read for this step.
    pub(super) fn entry<'a>(&'a self, seq: u64, facts: &'a Facts) -> Option<&'a Arc<LogEntry>> {
        let from = self.recent_from();
        if seq >= from {
            return self.recent.get(usize::try_from(seq - from).ok()?).map(|(_, e)| e);
        }
        facts.entries.get(&seq)
    }

    pub(super) fn append(&mut self, write: &mut AccountWrite, entry: LogEntry) -> (u64, Arc<LogEntry>) {
        let seq = self.counters.next_seq;
        self.counters.next_seq += 1;
        write.counters = Some(self.counters);
        let entry = Arc::new(entry);
        write.appends.push((seq, entry.clone()));
        self.recent.push_back((seq, entry.clone()));
        while self.recent.len() > RECENT {
            self.recent.pop_front();
        }
        (seq, entry)
    }

    /// Purges the payload of entry `seq` (a message or a post being deleted
    /// for everyone): in this step's write — rewriting an entry appended in
    /// it, or rewriting the stored one — and in memory.
    pub(super) fn purge(&mut self, write: &mut AccountWrite, seq: u64, entry: &LogEntry) {
        let Some(purged) = skylark_store::purged_entry(entry) else { return };
        let purged = Arc::new(purged);
        match write.appends.iter_mut().find(|(s, _)| *s == seq) {
            Some(slot) => slot.1 = purged.clone(),
            None => write.replaces.push((seq, purged.clone())),
        }
        let from = self.recent_from();
        if seq >= from
            && let Some(slot) = usize::try_from(seq - from).ok().and_then(|i| self.recent.get_mut(i))
        {
            slot.1 = purged;
        }
    }

    /// The part of `from..=to` that is not in memory, if any.
    pub(super) fn missing(&self, from: u64, to: u64) -> Option<(u64, u64)> {
        let to = to.min(self.last_seq());
        let held = self.recent_from();
        (from <= to && from < held).then(|| (from, to.min(held - 1)))
    }
}

/// Forwards waiting for their destinations, in outbox order per destination.
#[derive(Debug, Default)]
pub(crate) struct Outbox {
    pub queues: HashMap<AccountId, BTreeMap<u64, Forward>>,
    /// Destinations with a batch in flight (one at a time, so in order).
    pub in_flight: HashSet<AccountId>,
    /// Delivery receipts on their way, one per destination (not stored).
    pub receipts: Vec<HeldReceipt>,
}

/// A delivery receipt waiting for its destination, in memory only: it
/// costs no write at either end of the ack that makes it, and acks that
/// come before it leaves join it (only the highest entry counts).
///
/// What stands in for its durability: the acknowledgements it answers are
/// not stored beyond [`HeldReceipt::floor`] until the destination has it
/// ([`Machine::delivered_safe`]). After a crash the account's devices are
/// handed those entries again, acknowledge them again, and the receipt is
/// made again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct HeldReceipt {
    pub to: AccountId,
    /// The highest of the destination's entries delivered (its sequence).
    pub up_to: u64,
    pub at_ms: u64,
    /// The account's delivered mark before the first ack this receipt
    /// answers that the destination does not have yet.
    pub floor: u64,
    /// `up_to` as sent in the batch in flight, if one is.
    pub sent: Option<u64>,
    /// The delivered mark before the first ack that joined the receipt
    /// while a batch was in flight: the floor once that batch lands.
    pub next_floor: Option<u64>,
}

impl Outbox {
    /// A delivery receipt for `to` up to `up_to`, made by an ack that moved
    /// the account's delivered mark on from `floor`.
    fn hold_receipt(&mut self, to: AccountId, up_to: u64, at_ms: u64, floor: u64) {
        match self.receipts.iter_mut().find(|r| r.to == to) {
            Some(held) => {
                if held.sent.is_some() && held.next_floor.is_none() {
                    held.next_floor = Some(floor);
                }
                held.up_to = held.up_to.max(up_to);
                held.at_ms = at_ms;
            }
            None => self.receipts.push(HeldReceipt { to, up_to, at_ms, floor, sent: None, next_floor: None }),
        }
    }

    pub(super) fn put(&mut self, log: &mut Log, write: &mut AccountWrite, to: AccountId, forward: Forward) {
        let seq = log.counters.next_outbox;
        log.counters.next_outbox += 1;
        write.counters = Some(log.counters);
        write.outbox_puts.push((seq, OutboxItem { to, forward: forward.clone() }));
        self.queues.entry(to).or_default().insert(seq, forward);
    }

    /// The destination has everything up to `up_to`: drop it (the deletion
    /// is cleanup) and allow the next batch.
    fn confirmed(&mut self, to: AccountId, up_to: u64, write: &mut AccountWrite) {
        self.in_flight.remove(&to);
        if let Some(i) = self.receipts.iter().position(|r| r.to == to) {
            let held = &mut self.receipts[i];
            match held.sent {
                Some(sent) if sent == held.up_to => {
                    self.receipts.swap_remove(i);
                }
                Some(_) => {
                    held.floor = held.next_floor.take().unwrap_or(held.floor);
                    held.sent = None;
                }
                None => {}
            }
        }
        if let Some(queue) = self.queues.get_mut(&to) {
            let rest = queue.split_off(&(up_to + 1));
            write.outbox_deletes.extend(queue.keys().copied());
            *queue = rest;
            if queue.is_empty() {
                self.queues.remove(&to);
            }
        }
    }

    /// The next batch for `to`, if none is in flight: marks it in flight.
    pub fn take_batch(&mut self, to: AccountId) -> Option<Batch> {
        if self.in_flight.contains(&to) {
            return None;
        }
        // The delivery receipt goes first: a read receipt in the queue may
        // have been made after it (a device acks, then marks read), and the
        // destination shows receipts in the order they come.
        let mut items: Vec<(u64, Forward)> = Vec::new();
        if let Some(held) = self.receipts.iter_mut().find(|r| r.to == to) {
            held.sent = Some(held.up_to);
            let receipt = Forward::Receipt { kind: ReceiptKind::Delivered, up_to: held.up_to, at_ms: held.at_ms };
            items.push((UNSEQUENCED, receipt));
        }
        if let Some(queue) = self.queues.get(&to) {
            items.extend(queue.iter().take(MAX_FORWARD_BATCH).map(|(s, f)| (*s, f.clone())));
        }
        if items.is_empty() {
            return None;
        }
        self.in_flight.insert(to);
        Some(Arc::from(items))
    }

    pub fn is_empty(&self) -> bool {
        self.queues.is_empty() && self.in_flight.is_empty() && self.receipts.is_empty()
    }
}

/// A device's place in the log, whatever its connections: the highest
/// sequence ever handed to it and the highest it acknowledged. An ack that
/// arrives after its connection closed is still true of the device.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Position {
    pub handed: u64,
    pub acked: u64,
}

/// One attached connection's window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Window {
    pub connection: u64,
    /// Highest sequence this connection acknowledged.
    pub acked: u64,
    /// Highest sequence handed to this connection (sent, or passed over
    /// as the device's own message: see [`Machine::hands`]).
    pub sent: u64,
    /// Highest sequence this connection was sent (not passed over).
    pub shown: u64,
    pub caught_up: bool,
}

/// The devices' positions and the attached connections' windows.
#[derive(Debug, Default)]
pub(crate) struct Feeds {
    pub windows: SmallMap<DeviceId, Window>,
    pub positions: SmallMap<DeviceId, Position>,
}

/// What to hand a device next.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum FeedPlan {
    /// Nothing now (window full, up to date and told, or not attached).
    Idle,
    /// These entries (from memory or from `fetched`); report with [`Machine::fed`].
    Entries(Vec<(u64, Arc<LogEntry>)>),
    /// Entries `from..=to` must be read from the store first.
    Fetch { from: u64, to: u64 },
    /// Everything up to `seq` was handed: say so; report with [`Machine::told_caught_up`].
    CaughtUp(u64),
}

/// Per-peer high-water marks, cached from the store as they are used.
#[derive(Debug, Default)]
pub(crate) struct Marks {
    /// Highest outbox sequence applied from each source.
    pub inbound: HashMap<AccountId, u64>,
    /// Highest receipt of each kind received from each peer.
    pub receipts: HashMap<(AccountId, ReceiptKind), u64>,
    /// Highest of each peer's sequences this account marked read.
    pub read_markers: HashMap<AccountId, u64>,
    /// Highest of each peer's sequences this account received.
    pub received: HashMap<AccountId, u64>,
    /// Peers known to be recorded as contacts (sent a message to). For a
    /// 1:1 conversation's group: its members known to be recorded as the
    /// other's contact.
    pub contacts: HashSet<AccountId>,
    /// The accounts this account blocked, once read (for a 1:1
    /// conversation's group: those of its members that blocked the other).
    pub blocked: Option<HashSet<AccountId>>,
    /// The account was deleted: known once `blocked` was read, or told.
    pub deleted: bool,
}

/// No marks looked up yet (what an actor that only feeds devices has).
static NO_MARKS: std::sync::LazyLock<Marks> = std::sync::LazyLock::new(Marks::default);

/// Store changes that may be lost in a crash without breaking any
/// promise, held back until something that must be durable is written.
///
/// Nothing is ever answered on the strength of these, and losing them in a
/// crash only repeats work that is harmless to repeat: a device is handed
/// entries again from an older cursor (clients drop them by message id), an
/// outbox item is forwarded again (the destination drops it by its
/// high-water mark). Acks and forward confirmations are most of an actor's
/// writes in a conversation; held back, they cost no commit of their own.
/// A cursor also waits for the delivery receipts its acks made to reach
/// their destinations ([`Machine::delivered_safe`]): stored sooner, it would
/// keep the device from acknowledging those entries again after a crash.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Cleanup {
    pub cursors: Vec<(DeviceId, u64)>,
    pub outbox_deletes: Vec<u64>,
}

impl Cleanup {
    pub fn is_empty(&self) -> bool {
        self.cursors.is_empty() && self.outbox_deletes.is_empty()
    }

    /// Moves the write's cleanup here (the newest cursor per device wins).
    fn defer(&mut self, write: &mut AccountWrite) {
        for (device, seq) in write.cursors.drain(..) {
            match self.cursors.iter_mut().find(|(d, _)| *d == device) {
                Some(held) => held.1 = held.1.max(seq),
                None => self.cursors.push((device, seq)),
            }
        }
        self.outbox_deletes.append(&mut write.outbox_deletes);
    }

    /// Puts everything held into `write`, which is about to be made
    /// durable, but cursors beyond `safe` ([`Machine::delivered_safe`]),
    /// which wait for their delivery receipts to arrive.
    fn take_into(&mut self, write: &mut AccountWrite, safe: u64) {
        let (now, later) = std::mem::take(&mut self.cursors).into_iter().partition(|(_, seq)| *seq <= safe);
        write.cursors = now;
        self.cursors = later;
        write.outbox_deletes = std::mem::take(&mut self.outbox_deletes);
    }
}

/// Which actor this is, chosen when it starts.
#[derive(Debug)]
pub(crate) enum Kind {
    User,
    /// A group's actor; `None` until the group is created.
    Group(Option<Box<GroupState>>),
}

/// What the actor loads when it starts.
#[derive(Debug, Default)]
pub(crate) struct Loaded {
    pub counters: Counters,
    pub outbox: Vec<(u64, OutboxItem)>,
    pub delivered: u64,
    pub group: Option<GroupState>,
}

/// The settings the machine's rules use (kept small: one machine per
/// active account).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub device_window: usize,
    pub max_group_members: usize,
    pub rules: MetaRules,
}

/// One account's (or group's) actor, as a state machine.
#[derive(Debug)]
pub(crate) struct Machine {
    pub account: AccountId,
    pub limits: Limits,
    pub log: Log,
    pub outbox: Outbox,
    pub feeds: Feeds,
    /// Allocated on first use: an actor that only feeds its devices (most
    /// idle connections' accounts) holds none.
    marks: Option<Box<Marks>>,
    /// Highest sequence any device acknowledged (delivery receipts go out
    /// when it advances).
    pub delivered: u64,
    pub cleanup: Cleanup,
    pub kind: Kind,
}

/// Why a send or a group request was not accepted.
pub(crate) enum Refusal {
    Refused(MessagingError),
    Missing(Missing),
}

impl From<Missing> for Refusal {
    fn from(m: Missing) -> Self {
        Refusal::Missing(m)
    }
}

/// Client ids accepted earlier in this batch (not yet in the store).
pub(crate) type BatchIds = HashMap<(DeviceId, String), SendAck>;

impl Machine {
    /// A machine rebuilt from what the store holds.
    pub fn new(account: AccountId, config: MessagingConfig, loaded: Loaded) -> Self {
        let mut outbox = Outbox::default();
        for (seq, item) in loaded.outbox {
            outbox.queues.entry(item.to).or_default().insert(seq, item.forward);
        }
        let kind = if account.is_group() { Kind::Group(loaded.group.map(Box::new)) } else { Kind::User };
        Machine {
            account,
            limits: Limits {
                device_window: config.device_window,
                max_group_members: config.max_group_members,
                rules: config.meta_rules(),
            },
            log: Log { counters: loaded.counters, recent: VecDeque::new() },
            outbox,
            feeds: Feeds::default(),
            marks: None,
            delivered: loaded.delivered,
            cleanup: Cleanup::default(),
            kind,
        }
    }

    pub fn marks(&self) -> &Marks {
        self.marks.as_deref().unwrap_or(&NO_MARKS)
    }

    pub(super) fn marks_mut(&mut self) -> &mut Marks {
        self.marks.get_or_insert_with(Box::default)
    }

    /// A contact of [`Effects::contacts`] could not be recorded: the next
    /// post of `author` asks again.
    pub fn contact_not_recorded(&mut self, author: AccountId) {
        self.marks_mut().contacts.remove(&author);
    }

    pub fn is_group(&self) -> bool {
        matches!(self.kind, Kind::Group(_))
    }

    /// Idle: nothing to forward, nothing held back, and every attached
    /// connection [settled](Machine::settled). An idle actor may stop; the
    /// windows of its attached connections are set aside and resumed as
    /// they are by its successor ([`Machine::resume`]).
    pub fn is_idle(&self) -> bool {
        self.is_quiet() && self.cleanup.is_empty()
    }

    /// Idle but for deferred cleanup (which is written as an actor stops).
    pub fn is_quiet(&self) -> bool {
        self.outbox.is_empty() && self.settled()
    }

    /// Every attached connection has been handed the whole log, has
    /// acknowledged all it was shown and was told it is caught up: nothing
    /// is in flight to it, so its window holds no work.
    pub fn settled(&self) -> bool {
        let last = self.log.last_seq();
        self.feeds.windows.iter().all(|(_, w)| w.caught_up && w.sent >= last && w.acked >= w.shown)
    }

    /// The attached connections' windows, to set aside while the actor
    /// stops with them [settled](Machine::settled).
    pub fn windows(&self) -> Vec<(DeviceId, Window)> {
        self.feeds.windows.iter().map(|(device, window)| (*device, *window)).collect()
    }

    /// Takes back a window a predecessor set aside: the connection goes on
    /// where it was, with nothing sent again and no second caught-up marker.
    pub fn resume(&mut self, device: DeviceId, window: Window) {
        let position = self.feeds.positions.entry_or_default(device);
        position.acked = position.acked.max(window.acked);
        position.handed = position.handed.max(window.sent);
        self.feeds.windows.insert(device, window);
    }

    /// Destinations with forwards waiting (to resume after a restart).
    pub fn destinations(&self) -> Vec<AccountId> {
        self.outbox.queues.keys().copied().collect()
    }

    /// The highest delivered mark (and device cursor) the store may hold:
    /// every delivery receipt for the entries up to it has reached its
    /// destination. Beyond it, a crash must leave the entries to be handed
    /// and acknowledged again, so that their receipts are made again.
    pub fn delivered_safe(&self) -> u64 {
        self.outbox.receipts.iter().map(|r| r.floor).fold(self.delivered, u64::min)
    }

    /// Stores the delivered mark (as cleanup) if it may now be stored
    /// further than `before`.
    fn store_delivered_safe(&self, before: u64, write: &mut AccountWrite) {
        let safe = self.delivered_safe();
        if safe > before {
            write.cursors.push((ACCOUNT_CURSOR, safe));
        }
    }

    /// Moves the deferred cleanup that may be stored now into `write`.
    pub fn take_cleanup(&mut self, write: &mut AccountWrite) {
        let safe = self.delivered_safe();
        self.cleanup.take_into(write, safe);
    }

    /// What the shell must read before [`Machine::step`] can take `inputs`.
    pub fn needs(&self, inputs: &[Input]) -> Needs {
        let mut needs = Needs::default();
        let mut acks_to = 0u64;
        for input in inputs {
            match input {
                Input::Send { device, client_id, to, meta, .. } => {
                    needs.client_ids.push((*device, client_id.clone()));
                    if let Some(target) = meta.target() {
                        needs.entries.extend(self.log.missing(target, target));
                    }
                    if *to != self.account && !self.marks().contacts.contains(to) && !needs.contacts.contains(to) {
                        needs.contacts.push(*to);
                    }
                    needs.blocks |= *to != self.account && self.marks().blocked.is_none();
                }
                Input::Post { device, client_id, commit_epoch, meta, .. } => {
                    needs.client_ids.push((*device, client_id.clone()));
                    if let Some(target) = meta.target() {
                        needs.entries.extend(self.log.missing(target, target));
                    }
                    needs.blocks |=
                        self.account.is_direct() && commit_epoch.is_none() && self.marks().blocked.is_none();
                }
                Input::Deliver { from, items } => {
                    needs.blocks |= !self.is_group() && self.marks().blocked.is_none();
                    if !self.marks().inbound.contains_key(from) && !needs.inbound.contains(from) {
                        needs.inbound.push(*from);
                    }
                    // A group takes receipts into its members' positions,
                    // not into per-peer receipt marks: nothing to read.
                    for (_, forward) in items.iter().filter(|_| !self.is_group()) {
                        if let Some(copy) = self.deleted_copy(*from, forward) {
                            needs.copies.push(copy);
                        }
                        if let Forward::Receipt { kind, .. } = forward {
                            let key = (*from, *kind);
                            if !self.marks().receipts.contains_key(&key) && !needs.receipts.contains(&key) {
                                needs.receipts.push(key);
                            }
                        }
                    }
                }
                Input::Attach { device, .. } => needs.cursors.push(*device),
                Input::MarkRead { peer, .. } => {
                    if !self.marks().read_markers.contains_key(peer) {
                        needs.read_markers.push(*peer);
                    }
                    if !self.marks().received.contains_key(peer) {
                        needs.received.push(*peer);
                    }
                }
                Input::Ack { device, connection, up_to } => {
                    acks_to = acks_to.max(self.ack_reach(*device, *connection, *up_to));
                }
                Input::Group { request: GroupRequest::MessageInfo { seq }, .. } if *seq > 0 => {
                    needs.entries.extend(self.log.missing(*seq, *seq));
                }
                _ => {}
            }
        }
        // Acks send receipts for what they newly cover, which is read from
        // the entries after the account's delivered mark.
        if acks_to > self.delivered {
            needs.entries.extend(self.log.missing(self.delivered + 1, acks_to));
        }
        needs
    }

    /// The copy a forward deletes for everyone, if it deletes one, with
    /// how far back to look for it: a message can only be deleted within
    /// the delete window of being sent (an hour more allows for clocks).
    fn deleted_copy(&self, from: AccountId, forward: &Forward) -> Option<(MessageId, u64)> {
        let (id, at_ms) = match forward {
            Forward::Message(m) => (MessageId { sender: from, seq: m.meta.deletes? }, m.sent_at_ms),
            Forward::Group(e) => (MessageId { sender: e.group, seq: e.post_meta()?.deletes? }, e.at_ms),
            Forward::Receipt { .. } => return None,
        };
        Some((id, at_ms.saturating_sub(self.limits.rules.delete_window_ms + 3_600_000)))
    }

    /// Finds this account's copy of a message being deleted: appended in
    /// this step, or read for it.
    fn copy_of(
        &self,
        write: &AccountWrite,
        facts: &Facts,
        id: MessageId,
    ) -> Result<Option<(u64, Arc<LogEntry>)>, Missing> {
        if let Some((seq, entry)) = write.appends.iter().find(|(_, e)| skylark_store::is_message(e, id)) {
            return Ok(Some((*seq, entry.clone())));
        }
        facts.copies.get(&id).cloned().ok_or_else(|| Missing(format!("copy of {id:?}")))
    }

    /// Checks a new message's edit, deletion or timer against the author's
    /// own earlier message `target` (a message this account sent to `to`,
    /// or for a group the author's post), and gives the meta to store.
    pub(super) fn check_meta(
        &self,
        facts: &Facts,
        request: &MetaRequest,
        author: AccountId,
        to: AccountId,
        now_ms: u64,
    ) -> Result<Meta, Refusal> {
        let target = match request.target() {
            Some(seq) if seq >= 1 && seq <= self.log.last_seq() => {
                let entry = self.log.entry(seq, facts).ok_or_else(|| Missing(format!("log entry {seq}")))?;
                match entry.as_ref() {
                    LogEntry::Message(m) if m.id.sender == author && m.id.seq == seq && m.to == to => {
                        Some((m.sent_at_ms, m.meta))
                    }
                    LogEntry::Group(e) if e.by == author && e.seq == seq => e.post_meta().map(|meta| (e.at_ms, *meta)),
                    _ => None,
                }
            }
            _ => None,
        };
        self.limits.rules.check(request, target, now_ms).map_err(|e| Refusal::Refused(MessagingError::Meta(e)))
    }

    /// Takes a batch of inputs, with the facts [`Machine::needs`] asked for.
    /// `Err` means the shell's facts were incomplete (a bug): nothing of the
    /// batch may be made durable, and the actor must restart from the store.
    pub fn step(&mut self, inputs: Vec<Input>, facts: &Facts, now_ms: u64) -> Result<Effects, Missing> {
        let mut fx = Effects {
            write: AccountWrite::new(self.account),
            outcomes: Vec::with_capacity(inputs.len()),
            kick: HashSet::new(),
            wake: false,
            contacts: Vec::new(),
            counts: Counts::default(),
        };
        if let Some(blocks) = &facts.blocks
            && self.marks().blocked.is_none()
        {
            let marks = self.marks_mut();
            marks.blocked = Some(blocks.clone());
            marks.deleted |= facts.deleted;
        }
        let mut batch_ids = BatchIds::new();
        for input in inputs {
            let outcome = self.take(input, facts, now_ms, &mut batch_ids, &mut fx)?;
            fx.outcomes.push(outcome);
        }
        let account = self.account;
        fx.wake = fx.write.appends.iter().any(|(_, e)| match e.as_ref() {
            LogEntry::Message(m) => m.to == account && m.id.sender != account,
            LogEntry::Group(g) => {
                !account.is_group()
                    && g.by != account
                    && matches!(g.body, skylark_core::group::GroupBody::Message { .. })
            }
            _ => false,
        });
        self.seal(&mut fx.write);
        Ok(fx)
    }

    /// Cleanup waits for the next write that must be durable anyway (or for
    /// the actor to go quiet); a write of nothing else is not made. Every
    /// phase that adds to a step's write ends with this; doing it again
    /// after more was added gives the same result as doing it once.
    pub(super) fn seal(&mut self, write: &mut AccountWrite) {
        self.cleanup.defer(write);
        if !write.is_empty() {
            self.take_cleanup(write);
        }
    }

    fn take(
        &mut self,
        input: Input,
        facts: &Facts,
        now_ms: u64,
        batch_ids: &mut BatchIds,
        fx: &mut Effects,
    ) -> Result<Outcome, Missing> {
        Ok(match input {
            Input::Send { device, client_id, to, payload, meta, over_rate } => {
                let sent = match &self.kind {
                    Kind::User => match (duplicate(self.account, batch_ids, facts, device, &client_id), over_rate) {
                        (Some(ack), _) => Ok(ack),
                        (None, Some(wait)) => Err(Refusal::Refused(MessagingError::RateLimited(wait))),
                        (None, None) => {
                            let message = Outgoing { device, client_id, to, payload, meta };
                            self.send(fx, batch_ids, facts, now_ms, message)
                        }
                    },
                    Kind::Group(_) => Err(Refusal::Refused(MessagingError::Internal("a send reached a group"))),
                };
                settle(sent, Answer::Send)?
            }
            Input::Post { author, device, client_id, payload, commit_epoch, message_epoch, meta, over_rate } => {
                let post = super::group::Post { author, device, client_id, payload, commit_epoch, message_epoch, meta };
                let posted = self.post(fx, batch_ids, facts, now_ms, post, over_rate);
                settle(posted, Answer::Send)?
            }
            Input::Group { from, request } => {
                settle(self.group_request(fx, facts, now_ms, from, request), Answer::Group)?
            }
            Input::Deliver { from, items } => Outcome::Later(Answer::Deliver(self.deliver(fx, facts, from, &items)?)),
            Input::Forwarded { to, up_to } => {
                let before = self.delivered_safe();
                self.outbox.confirmed(to, up_to, &mut fx.write);
                self.store_delivered_safe(before, &mut fx.write);
                fx.kick.insert(to);
                Outcome::Silent
            }
            Input::Attach { device, connection } => {
                let stored = facts.cursors.get(&device).ok_or_else(|| Missing(format!("cursor of {device}")))?;
                self.attach(device, connection, *stored);
                Outcome::Now(Ok(Answer::Done))
            }
            Input::Detach { device, connection } => {
                if self.feeds.windows.get(&device).is_some_and(|w| w.connection == connection) {
                    self.feeds.windows.remove(&device);
                }
                Outcome::Silent
            }
            Input::Ack { device, connection, up_to } => {
                self.ack(fx, facts, now_ms, device, connection, up_to)?;
                Outcome::Silent
            }
            Input::MarkRead { peer, up_to } => {
                self.mark_read(fx, facts, now_ms, peer, up_to)?;
                Outcome::Later(Answer::Done)
            }
            Input::DeviceChange(change) => {
                if let DeviceChange::Removed { device } = &change {
                    self.feeds.windows.remove(device);
                    self.feeds.positions.remove(device);
                    self.cleanup.cursors.retain(|(d, _)| d != device);
                }
                self.log.append(&mut fx.write, LogEntry::Devices { change, at_ms: now_ms });
                Outcome::Later(Answer::Done)
            }
            Input::ContactName { peer, name } => {
                self.log.append(&mut fx.write, LogEntry::ContactName { peer, name, at_ms: now_ms });
                Outcome::Later(Answer::Done)
            }
            Input::Deleted => {
                self.marks_mut().deleted = true;
                // Every device is gone with the account: their connections,
                // on whichever node, are told so ("device removed").
                self.feeds = Feeds::default();
                self.cleanup.cursors.clear();
                Outcome::Now(Ok(Answer::Done))
            }
            Input::Block { peer, blocked } => {
                if self.is_group() {
                    // A 1:1 conversation's group keeps which member blocked
                    // the other: `peer`'s other member did (or undid) it.
                    // Unread yet: read when next needed (the store has it).
                    if let (Some(blocker), Some(set)) =
                        (self.account.direct_peer(peer), self.marks.as_deref_mut().and_then(|m| m.blocked.as_mut()))
                    {
                        if blocked {
                            set.insert(blocker);
                        } else {
                            set.remove(&blocker);
                        }
                    }
                    return Ok(Outcome::Now(Ok(Answer::Done)));
                }
                if let Some(set) = self.marks.as_deref_mut().and_then(|m| m.blocked.as_mut()) {
                    if blocked {
                        set.insert(peer);
                    } else {
                        set.remove(&peer);
                    }
                }
                self.log.append(&mut fx.write, LogEntry::Block { peer, blocked, at_ms: now_ms });
                Outcome::Later(Answer::Done)
            }
        })
    }

    /// Whether the account was deleted (known once its block list was read).
    fn deleted(&self) -> Result<bool, Missing> {
        match self.marks.as_deref() {
            Some(m) if m.deleted => Ok(true),
            Some(m) if m.blocked.is_some() => Ok(false),
            _ => Err(Missing("whether the account exists".into())),
        }
    }

    /// Whether `peer` is in the block list read for this step.
    pub(super) fn blocks(&self, peer: AccountId) -> Result<bool, Missing> {
        let set = self.marks().blocked.as_ref().ok_or_else(|| Missing("the block list".into()))?;
        Ok(set.contains(&peer))
    }

    /// A device's connection attaches, `stored` being its durable cursor.
    fn attach(&mut self, device: DeviceId, connection: u64, stored: Option<u64>) {
        // A device without a cursor predates cursors; it starts now.
        let stored = stored.unwrap_or(self.log.last_seq());
        // Acks taken since the last commit (maybe from the connection this
        // one replaces) are not in the store yet: start after the newest,
        // so nothing acknowledged comes again.
        let position = self.feeds.positions.entry_or_default(device);
        let start = stored.max(position.acked);
        position.acked = start;
        position.handed = position.handed.max(start);
        self.feeds
            .windows
            .insert(device, Window { connection, acked: start, sent: start, shown: start, caught_up: false });
    }

    fn send(
        &mut self,
        fx: &mut Effects,
        batch_ids: &mut BatchIds,
        facts: &Facts,
        now_ms: u64,
        outgoing: Outgoing,
    ) -> Result<SendAck, Refusal> {
        let Outgoing { device, client_id, to, payload, meta } = outgoing;
        if to != self.account && self.blocks(to)? {
            return Err(Refusal::Refused(MessagingError::YouBlocked));
        }
        let meta = self.check_meta(facts, &meta, self.account, to, now_ms)?;
        let id = MessageId { sender: self.account, seq: self.log.counters.next_seq };
        let message = Arc::new(Message { id, to, sender_device: device, client_id, sent_at_ms: now_ms, payload, meta });
        let (seq, _) = self.log.append(&mut fx.write, LogEntry::Message(message.clone()));
        debug_assert_eq!(seq, id.seq);
        if let Some(target) = meta.deletes
            && let Some(entry) = self.log.entry(target, facts).cloned()
        {
            self.log.purge(&mut fx.write, target, &entry);
        }
        if to != self.account {
            self.outbox.put(&mut self.log, &mut fx.write, to, Forward::Message(message.clone()));
            fx.kick.insert(to);
            if !self.marks().contacts.contains(&to) {
                let known = facts.contacts.get(&to).ok_or_else(|| Missing(format!("contact {to}")))?;
                if !known && !fx.write.contacts.contains(&to) {
                    fx.write.contacts.push(to);
                }
                self.marks_mut().contacts.insert(to);
            }
        }
        fx.write.client_ids.push((device, message.client_id.clone(), seq));
        let ack = SendAck { id, sent_at_ms: now_ms, duplicate: false };
        batch_ids.insert((device, message.client_id.clone()), ack);
        fx.counts.accepted += 1;
        Ok(ack)
    }

    /// A forward that deletes a message for everyone purges this account's
    /// copy of it (if the account has one: a blocked sender's was dropped).
    fn purge_copy(
        &mut self,
        fx: &mut Effects,
        facts: &Facts,
        from: AccountId,
        forward: &Forward,
    ) -> Result<(), Missing> {
        if let Some((id, _)) = self.deleted_copy(from, forward)
            && let Some((seq, entry)) = self.copy_of(&fx.write, facts, id)?
        {
            self.log.purge(&mut fx.write, seq, &entry);
            fx.counts.purged += 1;
        }
        Ok(())
    }

    fn deliver(
        &mut self,
        fx: &mut Effects,
        facts: &Facts,
        from: AccountId,
        items: &[(u64, Forward)],
    ) -> Result<u64, Missing> {
        let mut applied = match self.marks().inbound.get(&from) {
            Some(hwm) => *hwm,
            None => *facts.inbound.get(&from).ok_or_else(|| Missing(format!("inbound from {from}")))?,
        };
        let before = applied;
        let mut received = None;
        for (oseq, forward) in items {
            // A receipt from outside the outbox is taken whenever it comes
            // (a second time changes nothing) and moves no mark; nothing
            // else may come that way.
            let next = match *oseq {
                UNSEQUENCED if matches!(forward, Forward::Receipt { .. }) => applied,
                UNSEQUENCED => continue,
                seq if seq <= applied => continue,
                seq => seq,
            };
            if self.is_group() {
                self.group_receipt(&mut fx.write, from, forward);
                applied = next;
                continue;
            }
            if self.deleted()? {
                // Taken, so the source's outbox moves on; kept nowhere.
                applied = next;
                continue;
            }
            match forward {
                Forward::Group(event) => {
                    self.log.append(&mut fx.write, LogEntry::Group(event.clone()));
                    received = received.max(Some(event.seq));
                    fx.counts.group_events_stored += 1;
                    self.purge_copy(fx, facts, from, forward)?;
                }
                // A blocked sender's message is taken (its outbox moves on)
                // and dropped: it sees one tick, never two.
                Forward::Message(_) if self.blocks(from)? => fx.counts.dropped_blocked += 1,
                Forward::Message(m) => {
                    self.log.append(&mut fx.write, LogEntry::Message(m.clone()));
                    received = received.max(Some(m.id.seq));
                    fx.counts.stored += 1;
                    self.purge_copy(fx, facts, from, forward)?;
                }
                Forward::Receipt { kind, up_to, at_ms } => {
                    let key = (from, *kind);
                    let current = match self.marks().receipts.get(&key) {
                        Some(v) => *v,
                        None => *facts.receipts.get(&key).ok_or_else(|| Missing(format!("receipt {key:?}")))?,
                    };
                    if *up_to > current {
                        self.log.append(
                            &mut fx.write,
                            LogEntry::Receipt { peer: from, kind: *kind, up_to: *up_to, at_ms: *at_ms },
                        );
                        fx.write.receipts.push((from, *kind, *up_to));
                        self.marks_mut().receipts.insert(key, *up_to);
                    } else {
                        self.marks_mut().receipts.insert(key, current);
                    }
                }
            }
            applied = next;
        }
        if applied > before {
            fx.write.inbound.push((from, applied));
        }
        if let Some(seq) = received {
            // Forwards come in the source's order, so this only grows.
            fx.write.received.push((from, seq));
            self.marks_mut().received.insert(from, seq);
        }
        self.marks_mut().inbound.insert(from, applied);
        Ok(applied)
    }

    fn ack(
        &mut self,
        fx: &mut Effects,
        facts: &Facts,
        now_ms: u64,
        device: DeviceId,
        connection: u64,
        up_to: u64,
    ) -> Result<(), Missing> {
        let up_to = self.ack_reach(device, connection, up_to);
        let Some(position) = self.feeds.positions.get_mut(&device) else {
            return Ok(());
        };
        if up_to <= position.acked {
            return Ok(());
        }
        position.acked = up_to;
        if let Some(window) = self.feeds.windows.get_mut(&device).filter(|w| w.connection == connection) {
            window.acked = window.acked.max(up_to);
            // The device may ack, on a new connection, what its previous one
            // was handed: what it acknowledged need not be sent again here.
            window.sent = window.sent.max(window.acked);
        }
        fx.write.cursors.push((device, up_to));
        if up_to <= self.delivered {
            return Ok(());
        }
        // The account received these entries: send delivery receipts, one
        // per sender, for the highest of its messages among them.
        // Groups get one for every event, so they know how far each member is.
        let mut highest: BTreeMap<AccountId, u64> = BTreeMap::new();
        for seq in self.delivered + 1..=up_to {
            let entry = self.log.entry(seq, facts).ok_or_else(|| Missing(format!("log entry {seq}")))?;
            match entry.as_ref() {
                LogEntry::Message(m) if m.to == self.account && m.id.sender != self.account => {
                    let h = highest.entry(m.id.sender).or_default();
                    *h = (*h).max(m.id.seq);
                }
                LogEntry::Group(g) => {
                    let h = highest.entry(g.group).or_default();
                    *h = (*h).max(g.seq);
                }
                _ => {}
            }
        }
        let before = self.delivered_safe();
        for (sender, seq) in highest {
            self.outbox.hold_receipt(sender, seq, now_ms, self.delivered);
            fx.kick.insert(sender);
        }
        self.delivered = up_to;
        self.store_delivered_safe(before, &mut fx.write);
        Ok(())
    }

    /// How far an ack by `device` on `connection` of entries `..=up_to`
    /// reaches: acks can only cover what was handed to the device (beyond
    /// that they are clamped), whichever of its connections sent them; and
    /// an ack of all this connection was sent covers the device's own
    /// messages passed over after it.
    fn ack_reach(&self, device: DeviceId, connection: u64, up_to: u64) -> u64 {
        let Some(position) = self.feeds.positions.get(&device) else { return 0 };
        let up_to = up_to.min(position.handed);
        match self.feeds.windows.get(&device) {
            Some(window) if window.connection == connection && up_to >= window.shown => up_to.max(window.sent),
            _ => up_to,
        }
    }

    fn mark_read(
        &mut self,
        fx: &mut Effects,
        facts: &Facts,
        now_ms: u64,
        peer: AccountId,
        up_to: u64,
    ) -> Result<(), Missing> {
        let current = match self.marks().read_markers.get(&peer) {
            Some(v) => *v,
            None => *facts.read_markers.get(&peer).ok_or_else(|| Missing(format!("read marker {peer}")))?,
        };
        let received = match self.marks().received.get(&peer) {
            Some(v) => *v,
            None => *facts.received.get(&peer).ok_or_else(|| Missing(format!("received from {peer}")))?,
        };
        self.marks_mut().received.insert(peer, received);
        // A read marker covers at most what the account received from the
        // peer: a device cannot have read the rest, and a receipt beyond it
        // would mark the peer's future messages read before they exist.
        let up_to = up_to.min(received);
        if up_to <= current {
            self.marks_mut().read_markers.insert(peer, current);
            return Ok(());
        }
        let receipt = Forward::Receipt { kind: ReceiptKind::Read, up_to, at_ms: now_ms };
        self.outbox.put(&mut self.log, &mut fx.write, peer, receipt);
        fx.kick.insert(peer);
        self.log.append(&mut fx.write, LogEntry::ReadSync { peer, up_to, at_ms: now_ms });
        fx.write.read_markers.push((peer, up_to));
        self.marks_mut().read_markers.insert(peer, up_to);
        Ok(())
    }

    /// What to hand `device` next, `fetched` being entries read for it.
    pub fn feed_plan(&self, device: DeviceId, fetched: &BTreeMap<u64, Arc<LogEntry>>) -> FeedPlan {
        let last = self.log.last_seq();
        let Some(window) = self.feeds.windows.get(&device) else { return FeedPlan::Idle };
        if window.sent >= last {
            return if window.caught_up { FeedPlan::Idle } else { FeedPlan::CaughtUp(last) };
        }
        let room = (self.limits.device_window as u64).saturating_sub(window.sent.saturating_sub(window.acked));
        if room == 0 {
            return FeedPlan::Idle;
        }
        let (from, to) = (window.sent + 1, last.min(window.sent + room));
        let held = self.log.recent_from();
        if from >= held {
            let skip = usize::try_from(from - held).unwrap_or(usize::MAX);
            let take = usize::try_from(to - from + 1).unwrap_or(usize::MAX);
            return FeedPlan::Entries(self.log.recent.iter().skip(skip).take(take).cloned().collect());
        }
        let run: Vec<(u64, Arc<LogEntry>)> =
            fetched.range(from..=to.min(held - 1)).map(|(s, e)| (*s, e.clone())).collect();
        // Only a run that starts at `from` and has no gaps can be handed.
        if run.first().is_some_and(|(s, _)| *s == from) {
            let contiguous = run.iter().enumerate().take_while(|(i, (s, _))| *s == from + *i as u64).count();
            return FeedPlan::Entries(run.into_iter().take(contiguous).collect());
        }
        FeedPlan::Fetch { from, to: to.min(held - 1).min(from + READ_CHUNK as u64 - 1) }
    }

    /// Whether `entry` goes to `device`'s connection: everything does but
    /// the device's own 1:1 messages, which it has from its `SendAck` (its
    /// account's other devices get them). The feed passes over them.
    pub fn hands(&self, device: DeviceId, entry: &LogEntry) -> bool {
        !matches!(entry, LogEntry::Message(m) if m.id.sender == self.account && m.sender_device == device)
    }

    /// The entries of a plan up to `seq` were handed to `device`'s
    /// connection, the last one it was sent being `shown` (the rest were
    /// its own messages, passed over).
    pub fn fed(&mut self, device: DeviceId, seq: u64, shown: Option<u64>) {
        if let Some(window) = self.feeds.windows.get_mut(&device) {
            window.sent = window.sent.max(seq);
            window.shown = window.shown.max(shown.unwrap_or(0));
            let position = self.feeds.positions.entry_or_default(device);
            position.handed = position.handed.max(seq);
            // Passed over with nothing before them waiting for an ack:
            // they take no room in the window. (Their cursor is written
            // with the device's next ack; until then a new connection
            // passes over them again.)
            if window.acked >= window.shown {
                window.acked = window.sent;
                position.acked = position.acked.max(window.sent);
            }
        }
    }

    /// The caught-up marker reached `device`'s connection.
    pub fn told_caught_up(&mut self, device: DeviceId) {
        if let Some(window) = self.feeds.windows.get_mut(&device) {
            window.caught_up = true;
        }
    }

    /// The connection of `device` is gone (its queue closed).
    pub fn lost(&mut self, device: DeviceId) {
        self.feeds.windows.remove(&device);
    }

    /// Devices attached now.
    pub fn attached(&self) -> Vec<DeviceId> {
        self.feeds.windows.keys().copied().collect()
    }
}

/// The first ack of a resend of an accepted client id, if it is one.
pub(crate) fn duplicate(
    account: AccountId,
    batch_ids: &BatchIds,
    facts: &Facts,
    device: DeviceId,
    client_id: &str,
) -> Option<SendAck> {
    let key = (device, client_id.to_owned());
    if let Some(ack) = batch_ids.get(&key) {
        return Some(SendAck { duplicate: true, ..*ack });
    }
    let (seq, sent_at_ms) = facts.client_ids.get(&key)?;
    Some(SendAck { id: MessageId { sender: account, seq: *seq }, sent_at_ms: *sent_at_ms, duplicate: true })
}

/// Files one request's outcome: a success is answered once the batch is
/// durable, a refusal at once; a missing fact abandons the batch.
fn settle<T>(outcome: Result<T, Refusal>, answer: fn(T) -> Answer) -> Result<Outcome, Missing> {
    match outcome {
        Ok(value) => Ok(Outcome::Later(answer(value))),
        Err(Refusal::Refused(e)) => Ok(Outcome::Now(Err(e))),
        Err(Refusal::Missing(m)) => Err(m),
    }
}

#[cfg(test)]
#[path = "machine_tests.rs"]
mod tests;
