//! The user actor: the single writer of one account's log.
//!
//! One tokio task per active account, fed by a bounded mailbox. It takes
//! its mail in batches: everything queued is turned into one
//! [`AccountWrite`], written durably (the store groups concurrent writes
//! of many actors into one fsync), and only then are the senders answered,
//! forwards started and devices fed. If a write fails, the actor answers
//! the batch with the error and stops; its successor reloads the account
//! from the store, so memory never runs ahead of what is durable.
//!
//! What it owns:
//! - the account's counters (next log sequence, next outbox sequence);
//! - the outbox: forwards to other accounts, sent in order per destination,
//!   one batch in flight, retried with exponential back-off and full jitter
//!   until the destination acknowledges its own durable write;
//! - the attached devices, each with a window of unacknowledged entries.
//!
//! Deduplication: a device's resend of a client id returns the first ack;
//! a destination drops forwards at or below the highest outbox sequence it
//! applied from that source; receipts only ever move forward.

mod group;

use crate::lane;
use crate::messaging::{DeviceEvent, GroupReply, GroupRequest, MessagingError, SendAck};
use crate::router::Router;
use crate::small_map::SmallMap;
use rand::Rng;
use skylark_core::message::{DeviceChange, Forward, LogEntry, Message, MessageId, OutboxItem, ReceiptKind};
use skylark_core::{AccountId, DeviceId};
use skylark_store::{AccountWrite, Counters, StoreError};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{oneshot, watch};

/// Mail taken in one batch at most.
const MAX_BATCH: usize = 256;
/// Forwards sent to one destination in one go at most.
const MAX_FORWARD_BATCH: usize = 128;
/// Recent log entries kept in memory, so live delivery needs no store read.
const RECENT: usize = 512;
/// Log entries read from the store in one go for a device's backlog.
const BACKLOG_READ: usize = 128;
/// Log entries searched for a peer's newest message when the account has
/// no stored "received" mark for it (data written by older versions).
const LEGACY_RECEIVED_SCAN: usize = 512;
/// The delivery cursor of the account as a whole (highest sequence any of
/// its devices acknowledged), kept under this pseudo device id; real device
/// ids start at 1.
pub(crate) const ACCOUNT_CURSOR: DeviceId = DeviceId(0);

/// Forwards in outbox order, shared between retries without copying.
pub(crate) type Batch = Arc<[(u64, Forward)]>;

/// A send waiting in the mailbox. Boxed in [`Msg`], as are the other large
/// variants, so a busy mailbox (up to `MAILBOX` messages) stays compact.
pub(crate) struct SendMail {
    /// The sending account (the actor's own, unless the actor is a group's).
    pub account: AccountId,
    pub device: DeviceId,
    pub client_id: String,
    pub to: Recipient,
    pub payload: Vec<u8>,
    pub reply: oneshot::Sender<Result<SendAck, MessagingError>>,
    /// The sending connection's span, so what the actor logs about this
    /// message is tied to the connection it came from.
    pub span: tracing::Span,
}

/// Another actor's forwards (boxed in [`Msg`] like [`SendMail`]).
pub(crate) struct DeliverMail {
    pub from: AccountId,
    pub items: Batch,
    pub reply: oneshot::Sender<Result<u64, MessagingError>>,
}

/// A device's connection, to be fed the account's log.
pub(crate) struct AttachMail {
    pub device: DeviceId,
    pub connection: u64,
    pub events: lane::Sender<DeviceEvent>,
    pub reply: oneshot::Sender<Result<(), MessagingError>>,
}

/// Where a send goes.
pub(crate) enum Recipient {
    /// One account (the mail goes to the sender's actor).
    Account(AccountId),
    /// The group whose actor gets the mail.
    Group,
}

/// A member's request to a group's actor.
pub(crate) struct GroupMail {
    pub from: AccountId,
    pub request: GroupRequest,
    pub reply: oneshot::Sender<Result<GroupReply, MessagingError>>,
}

pub(crate) enum Msg {
    Send(Box<SendMail>),
    Group(Box<GroupMail>),
    Deliver(Box<DeliverMail>),
    Forwarded {
        to: AccountId,
        up_to: u64,
    },
    Attach(Box<AttachMail>),
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
        reply: oneshot::Sender<Result<(), MessagingError>>,
    },
    DeviceChange {
        /// Boxed to keep `Msg` small (see `SendMail`); device changes are rare.
        change: Box<DeviceChange>,
        reply: oneshot::Sender<Result<(), MessagingError>>,
    },
}

#[derive(Debug, Clone, Copy, Default)]
struct Position {
    handed: u64,
    acked: u64,
}

struct Attached {
    connection: u64,
    events: lane::Sender<DeviceEvent>,
    /// Highest sequence the device acknowledged.
    acked: u64,
    /// Highest sequence handed to the device.
    sent: u64,
    caught_up: bool,
}

/// An answer held back until the batch is durable.
enum Pending {
    Send(oneshot::Sender<Result<SendAck, MessagingError>>, SendAck),
    Deliver(oneshot::Sender<Result<u64, MessagingError>>, u64),
    Group(oneshot::Sender<Result<GroupReply, MessagingError>>, GroupReply),
    /// A plain "done" answer (mark read, device change).
    Done(oneshot::Sender<Result<(), MessagingError>>),
}

impl Pending {
    fn fail(self, e: MessagingError) {
        match self {
            Pending::Send(reply, _) => drop(reply.send(Err(e))),
            Pending::Deliver(reply, _) => drop(reply.send(Err(e))),
            Pending::Group(reply, _) => drop(reply.send(Err(e))),
            Pending::Done(reply) => drop(reply.send(Err(e))),
        }
    }

    fn complete(self) {
        match self {
            Pending::Send(reply, ack) => drop(reply.send(Ok(ack))),
            Pending::Deliver(reply, hwm) => drop(reply.send(Ok(hwm))),
            Pending::Group(reply, answer) => drop(reply.send(Ok(answer))),
            Pending::Done(reply) => drop(reply.send(Ok(()))),
        }
    }
}

struct Actor {
    account: AccountId,
    router: Router,
    self_mailbox: lane::WeakSender<Msg>,
    counters: Counters,
    /// Pending forwards by destination, in outbox order.
    outbox: HashMap<AccountId, BTreeMap<u64, Forward>>,
    /// Destinations with a forward task running.
    forwarding: HashSet<AccountId>,
    devices: SmallMap<DeviceId, Attached>,
    /// Per device, whatever its connections: the highest sequence ever
    /// handed to it and the highest it acknowledged. An ack that arrives
    /// after its connection closed is still true of the device, so it is
    /// kept here rather than with the connection.
    positions: SmallMap<DeviceId, Position>,
    recent: VecDeque<(u64, Arc<LogEntry>)>,
    /// Highest sequence any device acknowledged (delivery receipts go out
    /// when it advances).
    delivered: u64,
    inbound: HashMap<AccountId, u64>,
    receipts: HashMap<(AccountId, ReceiptKind), u64>,
    read_markers: HashMap<AccountId, u64>,
    /// Per peer, the highest of its sequence numbers this account received
    /// (what a read marker may cover at most), as far as it was looked up.
    received: HashMap<AccountId, u64>,
    /// Peers known to be recorded as contacts (sent a message to).
    contacts: HashSet<AccountId>,
    /// Set when the actor is a group's (and the group exists).
    group: Option<Box<group::GroupState>>,
    /// Store changes that may be lost in a crash without breaking any
    /// promise, written with the next durable write.
    cleanup: Cleanup,
}

/// How long deferred cleanup may wait for a write to ride along with.
const CLEANUP_DELAY: Duration = Duration::from_secs(1);

/// Delivery cursors and deleted outbox items, held back from the store
/// until something that must be durable is written anyway.
///
/// Nothing is ever answered on the strength of these, and losing them in a
/// crash only repeats work that is harmless to repeat: a device is handed
/// entries again from an older cursor (clients drop them by message id), an
/// outbox item is forwarded again (the destination drops it by its
/// high-water mark), and a receipt range is sent again (applying one twice
/// changes nothing). Acks and forward confirmations are most of an actor's
/// writes in a conversation; held back, they cost no commit of their own.
#[derive(Default)]
struct Cleanup {
    cursors: Vec<(DeviceId, u64)>,
    outbox_deletes: Vec<u64>,
}

impl Cleanup {
    fn is_empty(&self) -> bool {
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

    /// Puts everything held into `write`, which is about to be made durable.
    fn take_into(&mut self, write: &mut AccountWrite) {
        write.cursors = std::mem::take(&mut self.cursors);
        write.outbox_deletes = std::mem::take(&mut self.outbox_deletes);
    }
}

/// The actor's task.
pub(crate) async fn run(
    router: Router,
    account: AccountId,
    generation: u64,
    self_mailbox: lane::Sender<Msg>,
    mut mailbox: lane::Receiver<Msg>,
    predecessor: Option<watch::Receiver<bool>>,
) {
    // Starting is boxed, like handling a batch: a task keeps room for its
    // largest state for its whole life, and this one is only passed through.
    let start = start(&router, account, generation, self_mailbox, &mut mailbox, predecessor);
    let Some(mut actor) = Box::pin(start).await else { return };
    metrics::gauge!("skylark_actors").increment(1.0);
    let idle = Duration::from_millis(router.inner.config.actor_idle_ms);
    let shutdown = router.inner.shutdown.clone();
    let mut batch = Vec::new();
    // False once memory may be ahead of the store: deferred cleanup is then
    // dropped, as it may describe entries that never became durable.
    let mut healthy = true;
    let mut retired = None;
    loop {
        let received = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            n = mailbox.recv_many(&mut batch, MAX_BATCH) => n,
            // One timer for two jobs: writing deferred cleanup once the actor
            // has been quiet for a moment, and retiring it once it has been
            // idle for longer.
            _ = tokio::time::sleep(if actor.cleanup.is_empty() { idle } else { CLEANUP_DELAY }),
                if actor.is_idle() || !actor.cleanup.is_empty() =>
            {
                if !actor.cleanup.is_empty() {
                    if Box::pin(actor.write_cleanup()).await.is_err() {
                        healthy = false;
                        Box::pin(stop_failed(&router, account, generation, &mut mailbox)).await;
                        break;
                    }
                    continue;
                }
                if let Some(done) = router.retire(account, generation, &mut mailbox) {
                    // Mail that slipped in before the mailbox closed is still ours.
                    while mailbox.recv_many(&mut batch, MAX_BATCH).await > 0 {
                        if Box::pin(actor.handle(std::mem::take(&mut batch))).await.is_err() {
                            healthy = false;
                            break;
                        }
                    }
                    retired = Some(done);
                    break;
                }
                continue;
            }
        };
        if received == 0 {
            break;
        }
        // Boxed: the task's own allocation stays small while the actor is
        // idle, instead of always holding room for the largest batch state.
        if Box::pin(actor.handle(std::mem::take(&mut batch))).await.is_err() {
            healthy = false;
            Box::pin(stop_failed(&router, account, generation, &mut mailbox)).await;
            break;
        }
    }
    // A successor loads from the store: write what it should see first.
    if healthy && !actor.cleanup.is_empty() {
        let _ = Box::pin(actor.write_cleanup()).await;
    }
    if let Some(done) = retired {
        let _ = done.send(true);
    }
    metrics::gauge!("skylark_actors").decrement(1.0);
}

/// A write failed and memory may be ahead of the store: leave the registry
/// and answer the waiting mail, so a successor reloads from the store.
async fn stop_failed(router: &Router, account: AccountId, generation: u64, mailbox: &mut lane::Receiver<Msg>) {
    router.forget_generation(account, generation);
    let error = MessagingError::Restarted;
    fail_all(mailbox, router, account, generation, error).await;
}

/// Waits for the account's previous actor to finish, then loads the
/// account. `None` if it could not be loaded (the mail is answered).
async fn start(
    router: &Router,
    account: AccountId,
    generation: u64,
    self_mailbox: lane::Sender<Msg>,
    mailbox: &mut lane::Receiver<Msg>,
    predecessor: Option<watch::Receiver<bool>>,
) -> Option<Actor> {
    if let Some(mut done) = predecessor {
        let _ = done.wait_for(|finished| *finished).await;
    }
    let weak = self_mailbox.downgrade();
    drop(self_mailbox);
    match Actor::load(router.clone(), account, weak).await {
        Ok(actor) => Some(actor),
        Err(e) => {
            tracing::error!(%account, error = %e, "actor could not load its account");
            fail_all(mailbox, router, account, generation, MessagingError::from(e)).await;
            None
        }
    }
}

/// Answers everything still queued with `error`, after leaving the registry.
async fn fail_all(
    mailbox: &mut lane::Receiver<Msg>,
    router: &Router,
    account: AccountId,
    generation: u64,
    error: MessagingError,
) {
    router.forget_generation(account, generation);
    mailbox.close();
    while let Some(msg) = mailbox.recv().await {
        match msg {
            Msg::Send(mail) => drop(mail.reply.send(Err(error.clone()))),
            Msg::Group(mail) => drop(mail.reply.send(Err(error.clone()))),
            Msg::Deliver(mail) => drop(mail.reply.send(Err(error.clone()))),
            Msg::Attach(mail) => drop(mail.reply.send(Err(error.clone()))),
            Msg::MarkRead { reply, .. } | Msg::DeviceChange { reply, .. } => drop(reply.send(Err(error.clone()))),
            Msg::Forwarded { .. } | Msg::Detach { .. } | Msg::Ack { .. } => {}
        }
    }
}

fn jittered(base_ms: u64, max_ms: u64, attempt: u32) -> Duration {
    let ceiling = base_ms.saturating_mul(1u64 << attempt.min(20)).min(max_ms);
    Duration::from_millis(rand::rng().random_range(0..=ceiling))
}

/// Sends one batch of forwards to `to` until its actor acknowledges it.
async fn forward(router: Router, from: AccountId, to: AccountId, items: Batch, origin: lane::WeakSender<Msg>) {
    let config = router.inner.config;
    let timeout = Duration::from_millis(config.forward_timeout_ms);
    let mut attempt = 0u32;
    loop {
        match tokio::time::timeout(timeout, router.deliver(to, from, items.clone())).await {
            Ok(Ok(up_to)) => {
                if let Some(origin) = origin.upgrade() {
                    let _ = origin.send(Msg::Forwarded { to, up_to }).await;
                }
                return;
            }
            Ok(Err(MessagingError::ShuttingDown)) => return,
            Ok(Err(e)) => tracing::debug!(%from, %to, error = %e, attempt, "forward failed; retrying"),
            Err(_) => tracing::debug!(%from, %to, attempt, "forward timed out; retrying"),
        }
        metrics::counter!("skylark_forward_retries_total").increment(1);
        let delay = jittered(config.forward_retry_base_ms, config.forward_retry_max_ms, attempt);
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = router.inner.shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

impl Actor {
    async fn load(
        router: Router,
        account: AccountId,
        self_mailbox: lane::WeakSender<Msg>,
    ) -> Result<Actor, StoreError> {
        let store = router.inner.store.clone();
        let state = store.account_state(account).await?;
        let delivered = store.cursor(account, ACCOUNT_CURSOR).await?.unwrap_or(0);
        let mut outbox: HashMap<AccountId, BTreeMap<u64, Forward>> = HashMap::new();
        for (seq, item) in state.outbox {
            outbox.entry(item.to).or_default().insert(seq, item.forward);
        }
        let mut actor = Actor {
            account,
            router,
            self_mailbox,
            counters: state.counters,
            outbox,
            forwarding: HashSet::new(),
            devices: SmallMap::default(),
            positions: SmallMap::default(),
            recent: VecDeque::new(),
            delivered,
            inbound: HashMap::new(),
            receipts: HashMap::new(),
            read_markers: HashMap::new(),
            received: HashMap::new(),
            contacts: HashSet::new(),
            group: None,
            cleanup: Cleanup::default(),
        };
        if account.is_group() {
            actor.group = group::GroupState::load(&*store, account).await?.map(Box::new);
        }
        // Forwards left over from before a restart resume at once.
        let destinations: Vec<AccountId> = actor.outbox.keys().copied().collect();
        for to in destinations {
            actor.start_forward(to);
        }
        Ok(actor)
    }

    fn is_idle(&self) -> bool {
        self.devices.is_empty() && self.forwarding.is_empty() && self.outbox.is_empty() && self.cleanup.is_empty()
    }

    /// Writes the deferred cleanup on its own.
    async fn write_cleanup(&mut self) -> Result<(), StoreError> {
        let mut write = AccountWrite::new(self.account);
        self.cleanup.take_into(&mut write);
        self.router.inner.store.apply(write).await
    }

    fn last_seq(&self) -> u64 {
        self.counters.next_seq - 1
    }

    fn now(&self) -> u64 {
        self.router.inner.clock.now_ms()
    }

    fn append(&mut self, write: &mut AccountWrite, entry: LogEntry) -> (u64, Arc<LogEntry>) {
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

    fn enqueue_forward(&mut self, write: &mut AccountWrite, to: AccountId, forward: Forward) {
        let seq = self.counters.next_outbox;
        self.counters.next_outbox += 1;
        write.counters = Some(self.counters);
        write.outbox_puts.push((seq, OutboxItem { to, forward: forward.clone() }));
        self.outbox.entry(to).or_default().insert(seq, forward);
    }

    /// Handles one batch of mail. `Err` means the write failed and the
    /// actor must stop.
    async fn handle(&mut self, batch: Vec<Msg>) -> Result<(), ()> {
        let mut write = AccountWrite::new(self.account);
        let mut pending: Vec<Pending> = Vec::new();
        let mut kick: HashSet<AccountId> = HashSet::new();
        // Client ids accepted earlier in this batch (not yet in the store).
        let mut batch_ids: HashMap<(DeviceId, String), SendAck> = HashMap::new();
        let mut failed: Option<StoreError> = None;

        for msg in batch {
            let step = match msg {
                Msg::Send(mail) if self.account.is_group() => {
                    let outcome = self.post(&mut write, &mut batch_ids, &mail, &mut kick).await;
                    settle(&mut pending, mail.reply, outcome, Pending::Send)
                }
                Msg::Send(mail) => {
                    let SendMail { device, client_id, to, payload, reply, span, .. } = *mail;
                    tracing::trace!(parent: &span, account = %self.account, %client_id, "send taken by the actor");
                    let Recipient::Account(to) = to else {
                        let _ = reply.send(Err(skylark_core::group::GroupError::UnknownGroup.into()));
                        continue;
                    };
                    let outcome =
                        self.send(&mut write, &mut batch_ids, device, client_id, to, payload, &mut kick).await;
                    settle(&mut pending, reply, outcome, Pending::Send)
                }
                Msg::Group(mail) => {
                    let GroupMail { from, request, reply } = *mail;
                    let outcome = self.group_request(&mut write, from, request, &mut kick).await;
                    settle(&mut pending, reply, outcome, Pending::Group)
                }
                Msg::Deliver(mail) => {
                    let DeliverMail { from, items, reply } = *mail;
                    match self.deliver(&mut write, from, &items).await {
                        Ok(hwm) => {
                            pending.push(Pending::Deliver(reply, hwm));
                            Ok(())
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e.clone().into()));
                            Err(e)
                        }
                    }
                }
                Msg::Forwarded { to, up_to } => {
                    self.forwarding.remove(&to);
                    if let Some(queue) = self.outbox.get_mut(&to) {
                        let rest = queue.split_off(&(up_to + 1));
                        write.outbox_deletes.extend(queue.keys().copied());
                        *queue = rest;
                        if queue.is_empty() {
                            self.outbox.remove(&to);
                        }
                    }
                    kick.insert(to);
                    Ok(())
                }
                Msg::Attach(mail) => {
                    let AttachMail { device, connection, events, reply } = *mail;
                    match self.router.inner.store.cursor(self.account, device).await {
                        Ok(cursor) => {
                            // A device without a cursor predates cursors; it starts now.
                            let stored = cursor.unwrap_or(self.last_seq());
                            // Acks taken since the last commit (maybe from the
                            // connection this one replaces) are not in the store
                            // yet: start after the newest, so nothing acknowledged
                            // comes again.
                            let position = self.positions.entry_or_default(device);
                            let start = stored.max(position.acked);
                            position.acked = start;
                            position.handed = position.handed.max(start);
                            self.devices.insert(
                                device,
                                Attached { connection, events, acked: start, sent: start, caught_up: false },
                            );
                            let _ = reply.send(Ok(()));
                            Ok(())
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e.into()));
                            Ok(())
                        }
                    }
                }
                Msg::Detach { device, connection } => {
                    if self.devices.get(&device).is_some_and(|d| d.connection == connection) {
                        self.devices.remove(&device);
                    }
                    Ok(())
                }
                Msg::Ack { device, connection, up_to } => {
                    self.ack(&mut write, device, connection, up_to, &mut kick).await
                }
                Msg::DeviceChange { change, reply } => {
                    let change = *change;
                    if let DeviceChange::Removed { device } = &change {
                        self.devices.remove(device);
                        self.positions.remove(device);
                        self.cleanup.cursors.retain(|(d, _)| d != device);
                    }
                    let at_ms = self.now();
                    self.append(&mut write, LogEntry::Devices { change, at_ms });
                    pending.push(Pending::Done(reply));
                    Ok(())
                }
                Msg::MarkRead { peer, up_to, reply } => {
                    match self.mark_read(&mut write, peer, up_to, &mut kick).await {
                        Ok(()) => {
                            pending.push(Pending::Done(reply));
                            Ok(())
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e.clone().into()));
                            Err(e)
                        }
                    }
                }
            };
            if let Err(e) = step {
                failed = Some(e);
                break;
            }
        }

        if failed.is_none() && self.group.is_some() {
            if let Err(e) = self.advance_marks(&mut write, &mut kick).await {
                failed = Some(e);
            }
        }
        // Messages received in this batch may need to wake offline devices.
        let account = self.account;
        let incoming = write.appends.iter().any(|(_, e)| match e.as_ref() {
            LogEntry::Message(m) => m.to == account && m.id.sender != account,
            LogEntry::Group(g) => {
                !account.is_group()
                    && g.by != account
                    && matches!(g.body, skylark_core::group::GroupBody::Message { .. })
            }
            _ => false,
        });
        // Cleanup waits for the next write that must be durable anyway (or
        // for the actor to go quiet); a write of nothing else is not made.
        self.cleanup.defer(&mut write);
        if failed.is_none() && !write.is_empty() {
            self.cleanup.take_into(&mut write);
            if let Err(e) = self.router.inner.store.apply(write).await {
                failed = Some(e);
            }
        }
        if let Some(e) = failed {
            tracing::error!(account = %self.account, error = %e, "actor write failed; restarting the actor");
            for p in pending {
                p.fail(MessagingError::from(e.clone()));
            }
            return Err(());
        }
        for p in pending {
            p.complete();
        }
        if incoming {
            self.router.wake(self.account);
        }
        for to in kick {
            self.start_forward(to);
        }
        let devices: Vec<DeviceId> = self.devices.keys().copied().collect();
        for device in devices {
            if self.pump(device).await.is_err() {
                return Err(());
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn send(
        &mut self,
        write: &mut AccountWrite,
        batch_ids: &mut HashMap<(DeviceId, String), SendAck>,
        device: DeviceId,
        client_id: String,
        to: AccountId,
        payload: Vec<u8>,
        kick: &mut HashSet<AccountId>,
    ) -> Result<SendAck, SendFailure> {
        let key = (device, client_id);
        if let Some(ack) = batch_ids.get(&key) {
            return Ok(SendAck { duplicate: true, ..*ack });
        }
        let store = self.router.inner.store.clone();
        if let Some(seq) = store.client_id(self.account, device, &key.1).await? {
            let sent_at_ms = match store.read_log(self.account, seq, 1).await?.first() {
                Some((_, LogEntry::Message(m))) => m.sent_at_ms,
                _ => 0,
            };
            return Ok(SendAck { id: MessageId { sender: self.account, seq }, sent_at_ms, duplicate: true });
        }
        // Only new messages count against the rate: a client resending
        // what was already accepted (after a crash, say) is not throttled.
        self.router.charge_send(device).map_err(SendFailure::Refused)?;
        let sent_at_ms = self.now();
        let id = MessageId { sender: self.account, seq: self.counters.next_seq };
        let message =
            Arc::new(Message { id, to, sender_device: device, client_id: key.1.clone(), sent_at_ms, payload });
        let (seq, _) = self.append(write, LogEntry::Message(message.clone()));
        debug_assert_eq!(seq, id.seq);
        if to != self.account {
            self.enqueue_forward(write, to, Forward::Message(message));
            kick.insert(to);
            if !self.contacts.contains(&to) {
                if !store.is_contact(self.account, to).await? && !write.contacts.contains(&to) {
                    write.contacts.push(to);
                }
                self.contacts.insert(to);
            }
        }
        write.client_ids.push((device, key.1.clone(), seq));
        let ack = SendAck { id, sent_at_ms, duplicate: false };
        batch_ids.insert(key, ack);
        metrics::counter!("skylark_messages_accepted_total").increment(1);
        Ok(ack)
    }

    async fn deliver(
        &mut self,
        write: &mut AccountWrite,
        from: AccountId,
        items: &[(u64, Forward)],
    ) -> Result<u64, StoreError> {
        let store = self.router.inner.store.clone();
        let mut applied = match self.inbound.get(&from) {
            Some(hwm) => *hwm,
            None => store.inbound(self.account, from).await?,
        };
        let before = applied;
        let mut received = None;
        for (oseq, forward) in items {
            if *oseq <= applied {
                continue;
            }
            if self.account.is_group() {
                self.group_receipt(write, from, forward);
                applied = *oseq;
                continue;
            }
            match forward {
                Forward::Group(event) => {
                    self.append(write, LogEntry::Group(event.clone()));
                    received = received.max(Some(event.seq));
                    metrics::counter!("skylark_group_events_stored_total").increment(1);
                }
                Forward::Message(m) => {
                    self.append(write, LogEntry::Message(m.clone()));
                    received = received.max(Some(m.id.seq));
                    metrics::counter!("skylark_messages_stored_total").increment(1);
                }
                Forward::Receipt { kind, up_to, at_ms } => {
                    let key = (from, *kind);
                    let current = match self.receipts.get(&key) {
                        Some(v) => *v,
                        None => store.receipt(self.account, from, *kind).await?,
                    };
                    if *up_to > current {
                        self.append(write, LogEntry::Receipt { peer: from, kind: *kind, up_to: *up_to, at_ms: *at_ms });
                        write.receipts.push((from, *kind, *up_to));
                        self.receipts.insert(key, *up_to);
                    } else {
                        self.receipts.insert(key, current);
                    }
                }
            }
            applied = *oseq;
        }
        if applied > before {
            write.inbound.push((from, applied));
        }
        if let Some(seq) = received {
            // Forwards come in the source's order, so this only grows.
            write.received.push((from, seq));
            self.received.insert(from, seq);
        }
        self.inbound.insert(from, applied);
        Ok(applied)
    }

    async fn ack(
        &mut self,
        write: &mut AccountWrite,
        device: DeviceId,
        connection: u64,
        up_to: u64,
        kick: &mut HashSet<AccountId>,
    ) -> Result<(), StoreError> {
        let Some(position) = self.positions.get_mut(&device) else {
            return Ok(());
        };
        // Acks can only cover what was handed to the device; beyond that they
        // are clamped. They count whichever of its connections sent them.
        let up_to = up_to.min(position.handed);
        if up_to <= position.acked {
            return Ok(());
        }
        position.acked = up_to;
        if let Some(dev) = self.devices.get_mut(&device).filter(|d| d.connection == connection) {
            dev.acked = dev.acked.max(up_to);
        }
        write.cursors.push((device, up_to));
        if up_to <= self.delivered {
            return Ok(());
        }
        // The account received these entries: send delivery receipts, one
        // per sender, for the highest of its messages among them.
        // Groups get one for every event, so they know how far each member is.
        let mut highest: HashMap<AccountId, u64> = HashMap::new();
        let mut next = self.delivered + 1;
        while next <= up_to {
            let chunk = self.entries(next, up_to).await?;
            let Some((last, _)) = chunk.last() else { break };
            next = last + 1;
            for (_, entry) in chunk {
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
        }
        let now = self.now();
        for (sender, seq) in highest {
            self.enqueue_forward(
                write,
                sender,
                Forward::Receipt { kind: ReceiptKind::Delivered, up_to: seq, at_ms: now },
            );
            kick.insert(sender);
        }
        self.delivered = up_to;
        write.cursors.push((ACCOUNT_CURSOR, up_to));
        Ok(())
    }

    async fn mark_read(
        &mut self,
        write: &mut AccountWrite,
        peer: AccountId,
        up_to: u64,
        kick: &mut HashSet<AccountId>,
    ) -> Result<(), StoreError> {
        let current = match self.read_markers.get(&peer) {
            Some(v) => *v,
            None => self.router.inner.store.read_marker(self.account, peer).await?,
        };
        // A read marker covers at most what the account received from the
        // peer: a device cannot have read the rest, and a receipt beyond it
        // would mark the peer's future messages read before they exist.
        let up_to = up_to.min(self.received_from(peer).await?);
        if up_to <= current {
            self.read_markers.insert(peer, current);
            return Ok(());
        }
        let now = self.now();
        self.enqueue_forward(write, peer, Forward::Receipt { kind: ReceiptKind::Read, up_to, at_ms: now });
        kick.insert(peer);
        self.append(write, LogEntry::ReadSync { peer, up_to, at_ms: now });
        write.read_markers.push((peer, up_to));
        self.read_markers.insert(peer, up_to);
        Ok(())
    }

    /// The highest of `peer`'s sequence numbers this account received.
    async fn received_from(&mut self, peer: AccountId) -> Result<u64, StoreError> {
        if let Some(seq) = self.received.get(&peer) {
            return Ok(*seq);
        }
        let mut seq = self.router.inner.store.received(self.account, peer).await?;
        if seq == 0 {
            // Accounts written before this mark existed: look for the peer in
            // the newest part of the log (once per actor and peer).
            let recent = self.router.inner.store.read_log_before(self.account, u64::MAX, LEGACY_RECEIVED_SCAN).await?;
            seq = recent.iter().filter_map(|(_, entry)| entry_from(entry, self.account, peer)).max().unwrap_or(0);
        }
        self.received.insert(peer, seq);
        Ok(seq)
    }

    /// Log entries `from..=to`, from memory when recent, else from the store.
    async fn entries(&self, from: u64, to: u64) -> Result<Vec<(u64, Arc<LogEntry>)>, StoreError> {
        if from > to {
            return Ok(Vec::new());
        }
        if let Some((first, _)) = self.recent.front() {
            if *first <= from {
                return Ok(self.recent.iter().filter(|(s, _)| *s >= from && *s <= to).cloned().collect());
            }
        }
        let limit = usize::try_from(to - from + 1).unwrap_or(usize::MAX).min(BACKLOG_READ);
        let read = self.router.inner.store.read_log(self.account, from, limit).await?;
        Ok(read.into_iter().filter(|(s, _)| *s <= to).map(|(s, e)| (s, Arc::new(e))).collect())
    }

    /// Feeds a device up to its window; marks it caught up when it has all.
    async fn pump(&mut self, device: DeviceId) -> Result<(), StoreError> {
        let window = self.router.inner.config.device_window as u64;
        loop {
            let last = self.last_seq();
            let Some(dev) = self.devices.get(&device) else { return Ok(()) };
            if dev.sent >= last {
                if !dev.caught_up {
                    let dev = self.devices.get_mut(&device).ok_or(StoreError::Invariant("device vanished".into()))?;
                    if dev.events.try_send(DeviceEvent::CaughtUp { seq: last }).is_ok() {
                        dev.caught_up = true;
                    }
                }
                return Ok(());
            }
            let room = window.saturating_sub(dev.sent - dev.acked);
            if room == 0 {
                return Ok(());
            }
            let from = dev.sent + 1;
            let to = last.min(dev.sent + room);
            let entries = self.entries(from, to).await?;
            if entries.is_empty() {
                return Ok(());
            }
            let Some(dev) = self.devices.get_mut(&device) else { return Ok(()) };
            for (seq, entry) in entries {
                match dev.events.try_send(DeviceEvent::Entry { seq, entry }) {
                    Ok(()) => {
                        dev.sent = seq;
                        let position = self.positions.entry_or_default(device);
                        position.handed = position.handed.max(seq);
                    }
                    Err(lane::TrySendError::Full(_)) => return Ok(()),
                    Err(lane::TrySendError::Closed(_)) => {
                        self.devices.remove(&device);
                        return Ok(());
                    }
                }
            }
        }
    }

    fn start_forward(&mut self, to: AccountId) {
        if self.forwarding.contains(&to) {
            return;
        }
        let Some(queue) = self.outbox.get(&to) else { return };
        let items: Vec<(u64, Forward)> = queue.iter().take(MAX_FORWARD_BATCH).map(|(s, f)| (*s, f.clone())).collect();
        if items.is_empty() {
            return;
        }
        self.forwarding.insert(to);
        let router = self.router.clone();
        let from = self.account;
        let origin = self.self_mailbox.clone();
        let span = tracing::debug_span!("forward", %from, %to);
        self.router.spawn(tracing::Instrument::instrument(forward(router, from, to, Arc::from(items), origin), span));
    }
}

/// The peer's sequence number of `entry`, if `account` received it from `peer`.
fn entry_from(entry: &LogEntry, account: AccountId, peer: AccountId) -> Option<u64> {
    match entry {
        LogEntry::Message(m) if m.id.sender == peer && m.to == account => Some(m.id.seq),
        LogEntry::Group(g) if g.group == peer => Some(g.seq),
        _ => None,
    }
}

/// Files one request's outcome: a success is answered once the batch is
/// durable; a refusal is answered now; a store failure is answered and
/// stops the batch (the actor restarts from the store).
fn settle<T>(
    pending: &mut Vec<Pending>,
    reply: oneshot::Sender<Result<T, MessagingError>>,
    outcome: Result<T, SendFailure>,
    later: fn(oneshot::Sender<Result<T, MessagingError>>, T) -> Pending,
) -> Result<(), StoreError> {
    match outcome {
        Ok(answer) => {
            pending.push(later(reply, answer));
            Ok(())
        }
        Err(SendFailure::Refused(e)) => {
            let _ = reply.send(Err(e));
            Ok(())
        }
        Err(SendFailure::Store(e)) => {
            let _ = reply.send(Err(e.clone().into()));
            Err(e)
        }
    }
}

enum SendFailure {
    Refused(MessagingError),
    Store(StoreError),
}

impl From<StoreError> for SendFailure {
    fn from(e: StoreError) -> Self {
        SendFailure::Store(e)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn mailbox_slots_stay_small() {
        // Regression guard for mailbox memory under load (see `SendMail`).
        assert!(std::mem::size_of::<super::Msg>() <= 32, "Msg is {} bytes", std::mem::size_of::<super::Msg>());
    }
}
