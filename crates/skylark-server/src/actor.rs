//! The actor: the single writer of one account's (or one group's) log.
//!
//! One tokio task per active account or group, fed by a bounded mailbox.
//! The task is a thin shell around [`machine::Machine`], the sans-IO state
//! machine that holds the actor's state and makes every decision. For each
//! batch of mail the shell:
//!
//! 1. turns the mail into the machine's inputs, keeping the reply channels;
//! 2. reads from the store what the machine says it needs
//!    ([`machine::Machine::needs`]: client ids, per-peer marks, cursors, log
//!    entries beyond memory), and asks the rate limiter about new sends;
//! 3. steps the machine (pure: inputs, facts and the time in, effects out);
//! 4. makes the step's write durable (the store groups concurrent writes of
//!    many actors into one fsync), and only then answers, starts forwards,
//!    wakes offline devices and feeds the attached devices their windows.
//!
//! If a read or the write fails, the batch is answered with the error and
//! the actor stops; its successor reloads from the store, so memory never
//! runs ahead of what is durable (except deferred cleanup, see
//! [`machine::Cleanup`]).
//!
//! The shell gets an explicit [`Context`] (store, clock, settings, the actor
//! registry, the push waker, the send limiter), never the router.

mod group;
mod machine;
#[cfg(test)]
mod proptests;

pub(crate) use machine::{ACCOUNT_CURSOR, Batch};

use crate::lane;
use crate::messaging::{DeviceEvent, GroupReply, GroupRequest, MessagingConfig, MessagingError, SendAck};
use crate::ratelimit::KeyedLimiter;
use crate::registry::Registry;
use crate::small_map::SmallMap;
use machine::{Answer, Facts, FeedPlan, Input, Loaded, Machine, Needs, Outcome};
use rand::Rng;
use skylark_core::message::{DeviceChange, Forward, LogEntry};
use skylark_core::{AccountId, Clock, DeviceId};
use skylark_store::{AccountWrite, Store, StoreError};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::{oneshot, watch};

/// Mail taken in one batch at most.
const MAX_BATCH: usize = 256;
/// Log entries searched for a peer's newest message when the account has
/// no stored "received" mark for it (data written by older versions).
const LEGACY_RECEIVED_SCAN: usize = 512;

/// What every actor works with, handed to it explicitly.
pub(crate) struct Context {
    pub store: Arc<dyn Store>,
    pub clock: Arc<dyn Clock>,
    pub config: MessagingConfig,
    pub registry: Registry,
    /// Told when an account received messages (push wakes offline devices).
    pub waker: OnceLock<Arc<dyn Fn(AccountId) + Send + Sync>>,
    /// Sends per device, against floods from one (possibly stolen) device.
    pub sends: KeyedLimiter,
    /// Cluster mode: where actors live, and the bus to the other nodes.
    pub cluster: OnceLock<Arc<crate::cluster::Cluster>>,
}

/// One pointer per actor: an idle actor is counted in bytes.
pub(crate) type Ctx = Arc<Context>;

impl Context {
    /// Hands forwards from `from` to `to`'s actor and waits until they are
    /// durable there. Returns the highest outbox sequence applied.
    pub(crate) async fn deliver(
        self: &Arc<Self>,
        to: AccountId,
        from: AccountId,
        items: Batch,
    ) -> Result<u64, MessagingError> {
        let (reply, answer) = oneshot::channel();
        self.registry.tell(self, to, Msg::Deliver(Box::new(DeliverMail { from, items, reply }))).await?;
        answer.await.map_err(|_| MessagingError::ShuttingDown)?
    }

    fn wake(&self, account: AccountId) {
        if let Some(waker) = self.waker.get() {
            waker(account);
        }
    }
}

/// A send waiting in the mailbox of the sender's account. Boxed in [`Msg`],
/// as are the other large variants, so a busy mailbox (up to `MAILBOX`
/// messages) stays compact.
pub(crate) struct SendMail {
    pub device: DeviceId,
    pub client_id: String,
    /// The recipient, resolved at the edge.
    pub to: AccountId,
    pub payload: bytes::Bytes,
    pub meta: skylark_core::message::MetaRequest,
    pub reply: oneshot::Sender<Result<SendAck, MessagingError>>,
    /// The sending connection's span, so what the actor logs about this
    /// message is tied to the connection it came from.
    pub span: tracing::Span,
}

/// A member's post, waiting in the group's mailbox.
pub(crate) struct PostMail {
    pub author: AccountId,
    pub device: DeviceId,
    pub client_id: String,
    pub payload: bytes::Bytes,
    pub commit_epoch: Option<u64>,
    pub message_epoch: Option<u64>,
    pub meta: skylark_core::message::MetaRequest,
    pub reply: oneshot::Sender<Result<SendAck, MessagingError>>,
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

/// A member's request to a group's actor.
pub(crate) struct GroupMail {
    pub from: AccountId,
    pub request: GroupRequest,
    pub reply: oneshot::Sender<Result<GroupReply, MessagingError>>,
}

pub(crate) enum Msg {
    /// To a user's actor.
    Send(Box<SendMail>),
    /// To a group's actor.
    Post(Box<PostMail>),
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
    /// The account named a contact (the store already says so).
    ContactName {
        /// Boxed to keep `Msg` small; names are rare.
        change: Box<(AccountId, String)>,
        reply: oneshot::Sender<Result<(), MessagingError>>,
    },
    /// The account was deleted (the store is told next).
    Deleted {
        reply: oneshot::Sender<Result<(), MessagingError>>,
    },
    /// Nothing to do but start: the actor resumes the forwards its outbox
    /// holds (see `Registry::resume_forwards`).
    Wake,
    /// The account blocked (or unblocked) `peer`; the store already says so.
    Block {
        peer: AccountId,
        blocked: bool,
        reply: oneshot::Sender<Result<(), MessagingError>>,
    },
}

/// Where the answer to one input goes.
enum Reply {
    Send(oneshot::Sender<Result<SendAck, MessagingError>>),
    Deliver(oneshot::Sender<Result<u64, MessagingError>>),
    Group(oneshot::Sender<Result<GroupReply, MessagingError>>),
    Done(oneshot::Sender<Result<(), MessagingError>>),
    /// An attach: its queue joins the shell's once the machine took it.
    Attach(oneshot::Sender<Result<(), MessagingError>>, DeviceId, u64, lane::Sender<DeviceEvent>),
    None,
}

impl Reply {
    fn answer(self, result: Result<Answer, MessagingError>) {
        match (self, result) {
            (Reply::Send(r), Ok(Answer::Send(ack))) => drop(r.send(Ok(ack))),
            (Reply::Deliver(r), Ok(Answer::Deliver(hwm))) => drop(r.send(Ok(hwm))),
            (Reply::Group(r), Ok(Answer::Group(g))) => drop(r.send(Ok(g))),
            (Reply::Done(r) | Reply::Attach(r, ..), Ok(Answer::Done)) => drop(r.send(Ok(()))),
            (Reply::None, _) => {}
            (reply, Ok(_)) => reply.answer(Err(MessagingError::Internal("an answer of the wrong kind"))),
            (Reply::Send(r), Err(e)) => drop(r.send(Err(e))),
            (Reply::Deliver(r), Err(e)) => drop(r.send(Err(e))),
            (Reply::Group(r), Err(e)) => drop(r.send(Err(e))),
            (Reply::Done(r) | Reply::Attach(r, ..), Err(e)) => drop(r.send(Err(e))),
        }
    }
}

/// The running actor: the machine, and what performs its effects.
struct Shell {
    ctx: Ctx,
    machine: Machine,
    self_mailbox: lane::WeakSender<Msg>,
    /// The attached connections' event queues, by device.
    lanes: SmallMap<DeviceId, (u64, lane::Sender<DeviceEvent>)>,
    /// Cluster mode: the ownership epoch every write carries.
    epoch: Option<u64>,
}

/// The attached connections of an actor that stopped while they were
/// [settled](Machine::is_idle), kept by the registry for its successor: an
/// idle device costs its connection and this, not a running actor.
pub(crate) struct Parked(Box<[(DeviceId, machine::Window, lane::Sender<DeviceEvent>)]>);

impl Parked {
    /// Lets go of `device`'s connection `connection`, which detached (if
    /// it is here: another connection of the device may be).
    pub(crate) fn detach(&mut self, device: DeviceId, connection: u64) {
        let mut kept = std::mem::take(&mut self.0).into_vec();
        kept.retain(|(d, window, _)| (*d, window.connection) != (device, connection));
        self.0 = kept.into_boxed_slice();
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Attaches a device's connection without starting its account's actor,
/// when none runs and the device already has all its log holds: the
/// connection is told it is caught up and set aside for the next actor, as
/// if an actor had attached it and then stopped idle. So an idle device
/// costs no running actor. False if the attach must go through the actor:
/// one runs or is finishing, the device is behind, forwards wait, the store
/// could not say, or (cluster mode) the account's ownership must be taken.
pub(crate) async fn attach_idle(
    ctx: &Ctx,
    account: AccountId,
    device: DeviceId,
    connection: u64,
    events: &lane::Sender<DeviceEvent>,
) -> bool {
    if ctx.cluster.get().is_some() || account.is_group() {
        return false;
    }
    let Some(quiet) = ctx.registry.quiet(account) else { return false };
    let (Ok(state), Ok(cursor)) = (ctx.store.account_state(account).await, ctx.store.cursor(account, device).await)
    else {
        return false;
    };
    let last = state.counters.next_seq.saturating_sub(1);
    // As `Machine::attach` starts a device: after its stored cursor, or
    // (a device from before cursors) at the end.
    let start = cursor.unwrap_or(last);
    if !state.outbox.is_empty() || start < last {
        return false;
    }
    let window = machine::Window { connection, acked: start, sent: start, shown: start, caught_up: true };
    ctx.registry.park_if_quiet(account, quiet, |held| {
        let _ = events.try_send(DeviceEvent::CaughtUp { seq: last });
        let mut entries = held.map(|p| p.0.into_vec()).unwrap_or_default();
        // An older connection of the device is told it was replaced.
        if let Some(at) = entries.iter().position(|(d, ..)| *d == device) {
            let (.., older) = entries.swap_remove(at);
            let _ = older.try_send(DeviceEvent::Closed(crate::sessions::Disconnect::Replaced));
        }
        entries.push((device, window, events.clone()));
        Parked(entries.into_boxed_slice())
    })
}

/// What the registry starts an actor with.
pub(crate) struct Start {
    pub account: AccountId,
    pub generation: u64,
    pub self_mailbox: lane::Sender<Msg>,
    /// The account's previous actor on this node, if it is still finishing.
    pub predecessor: Option<watch::Receiver<bool>>,
    /// Cancelled when the actor must move to another node (cluster mode).
    pub handoff: Option<tokio_util::sync::CancellationToken>,
}

/// The actor's task.
pub(crate) async fn run(ctx: Ctx, start: Start, mut mailbox: lane::Receiver<Msg>) {
    let Start { account, generation, self_mailbox, predecessor, handoff } = start;
    // Starting is boxed, like handling a batch: a task keeps room for its
    // largest state for its whole life, and this one is only passed through.
    let start = self::start(&ctx, account, generation, self_mailbox, &mut mailbox, predecessor);
    let Some(mut shell) = Box::pin(start).await else { return };
    metrics::gauge!("skylark_actors").increment(1.0);
    let idle = Duration::from_millis(ctx.config.actor_idle_ms);
    // How long deferred cleanup waits for a write to ride along with: long
    // enough for the next message of a conversation (people answer in
    // seconds), so acks and forward confirmations seldom cost a commit of
    // their own (docs/BENCHMARKS.md, "step 5").
    let cleanup_delay = Duration::from_millis(ctx.config.cleanup_delay_ms);
    let shutdown = ctx.registry.shutdown.clone();
    let mut batch = Vec::new();
    // False once memory may be ahead of the store: deferred cleanup is then
    // dropped, as it may describe entries that never became durable.
    let mut healthy = true;
    let mut retired = None;
    let mut moving = false;
    loop {
        let cleanup_held = !shell.machine.cleanup.is_empty();
        // An actor due to retire before its cleanup is due retires, and
        // writes the cleanup as it goes (below the loop).
        let retire_first = shell.machine.is_quiet() && idle <= cleanup_delay;
        let wait = if cleanup_held && !retire_first { cleanup_delay } else { idle };
        let received = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            // Cluster mode: the account now belongs to another node. Mail
            // already queued is still this actor's (it holds the lease);
            // later mail is routed to the new owner.
            _ = async { handoff.as_ref()?.cancelled().await; Some(()) }, if handoff.is_some() => {
                if let Some(done) = ctx.registry.retire(account, generation, &mut mailbox, true) {
                    healthy = shell.finish_queued(&mut mailbox, &mut batch).await;
                    retired = Some(done);
                }
                moving = true;
                break;
            }
            n = mailbox.recv_many(&mut batch, MAX_BATCH) => n,
            // One timer for two jobs: writing deferred cleanup once the actor
            // has been quiet for a moment, and retiring it once it has been
            // idle for longer.
            _ = tokio::time::sleep(wait), if shell.machine.is_quiet() || cleanup_held => {
                if cleanup_held && !retire_first {
                    if Box::pin(shell.write_cleanup()).await.is_err() {
                        healthy = false;
                        Box::pin(stop_failed(&ctx, account, generation, &mut mailbox)).await;
                        break;
                    }
                    continue;
                }
                if let Some(done) = ctx.registry.retire(account, generation, &mut mailbox, false) {
                    // Mail that slipped in before the mailbox closed is still ours.
                    healthy = shell.finish_queued(&mut mailbox, &mut batch).await;
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
        if Box::pin(shell.handle(std::mem::take(&mut batch))).await.is_err() {
            healthy = false;
            Box::pin(stop_failed(&ctx, account, generation, &mut mailbox)).await;
            break;
        }
    }
    // A successor loads from the store: write what it should see first.
    if healthy && !shell.machine.cleanup.is_empty() && Box::pin(shell.write_cleanup()).await.is_err() {
        healthy = false;
    }
    // An actor retiring idle sets its settled connections aside for its
    // successor; otherwise its connections learn that the actor let them
    // go (they reconnect).
    let lanes = std::mem::take(&mut shell.lanes);
    if retired.is_some() && healthy && !moving && shell.machine.is_idle() {
        ctx.registry.park(account, shell.park(lanes));
    } else {
        drop(lanes);
    }
    if let (Some(cluster), Some(epoch)) = (ctx.cluster.get(), shell.epoch) {
        cluster.release(account, epoch).await;
    }
    if let Some(done) = retired {
        let _ = done.send(true);
    }
    metrics::gauge!("skylark_actors").decrement(1.0);
}

/// A read or write failed and memory may be ahead of the store: leave the
/// registry and answer the waiting mail, so a successor reloads.
async fn stop_failed(ctx: &Ctx, account: AccountId, generation: u64, mailbox: &mut lane::Receiver<Msg>) {
    fail_all(mailbox, ctx, account, generation, MessagingError::Restarted).await;
}

/// Waits for the account's previous actor to finish, then loads the
/// account. `None` if it could not be loaded (the mail is answered).
async fn start(
    ctx: &Ctx,
    account: AccountId,
    generation: u64,
    self_mailbox: lane::Sender<Msg>,
    mailbox: &mut lane::Receiver<Msg>,
    predecessor: Option<watch::Receiver<bool>>,
) -> Option<Shell> {
    if let Some(mut done) = predecessor {
        let _ = done.wait_for(|finished| *finished).await;
    }
    // Connections a predecessor set aside (dropped, so they reconnect, if
    // this actor cannot start).
    let parked = ctx.registry.take_parked(account);
    let weak = self_mailbox.downgrade();
    drop(self_mailbox);
    // Cluster mode: the account's ownership, with the epoch its writes carry.
    let epoch = match ctx.cluster.get() {
        Some(cluster) => match cluster.acquire(account).await {
            Ok(epoch) => Some(epoch),
            Err(e) => {
                tracing::debug!(%account, error = %e, "could not take the actor's ownership");
                fail_all(mailbox, ctx, account, generation, e).await;
                return None;
            }
        },
        None => None,
    };
    match load(&*ctx.store, account).await {
        Ok(loaded) => {
            let machine = Machine::new(account, ctx.config, loaded);
            let mut shell = Shell { ctx: ctx.clone(), machine, self_mailbox: weak, lanes: SmallMap::default(), epoch };
            for (device, window, events) in parked.map(|p| p.0).unwrap_or_default() {
                shell.machine.resume(device, window);
                shell.lanes.insert(device, (window.connection, events));
            }
            // Forwards left over from before a restart resume at once.
            for to in shell.machine.destinations() {
                shell.start_forward(to);
            }
            Some(shell)
        }
        Err(e) => {
            tracing::error!(%account, error = %e, "actor could not load its account");
            fail_all(mailbox, ctx, account, generation, MessagingError::from(e)).await;
            None
        }
    }
}

/// What the machine starts from.
async fn load(store: &dyn Store, account: AccountId) -> Result<Loaded, StoreError> {
    let state = store.account_state(account).await?;
    let delivered = store.cursor(account, ACCOUNT_CURSOR).await?.unwrap_or(0);
    let group = if account.is_group() {
        match store.group(account).await? {
            Some(meta) => {
                let stored: HashMap<AccountId, (u64, u64)> =
                    store.receipt_state(account).await?.received.into_iter().map(|(m, d, r)| (m, (d, r))).collect();
                Some(group::GroupState::new(meta, &stored))
            }
            None => None,
        }
    } else {
        None
    };
    Ok(Loaded { counters: state.counters, outbox: state.outbox, delivered, group })
}

/// Answers everything still queued with `error`, after leaving the registry.
async fn fail_all(
    mailbox: &mut lane::Receiver<Msg>,
    ctx: &Ctx,
    account: AccountId,
    generation: u64,
    error: MessagingError,
) {
    ctx.registry.forget_generation(account, generation);
    mailbox.close();
    while let Some(msg) = mailbox.recv().await {
        if let Some((_, reply)) = split(msg) {
            reply.answer(Err(error.clone()));
        }
    }
}

/// One mail as the machine's input and the place its answer goes; `None`
/// for a wake-up, which only starts the actor.
fn split(msg: Msg) -> Option<(Input, Reply)> {
    Some(match msg {
        Msg::Wake => return None,
        Msg::Send(mail) => {
            let SendMail { device, client_id, to, payload, meta, reply, span } = *mail;
            tracing::trace!(parent: &span, %client_id, "send taken by the actor");
            (Input::Send { device, client_id, to, payload, meta, over_rate: None }, Reply::Send(reply))
        }
        Msg::Post(mail) => {
            let PostMail { author, device, client_id, payload, commit_epoch, message_epoch, meta, reply, span } = *mail;
            tracing::trace!(parent: &span, %client_id, "post taken by the group's actor");
            (
                Input::Post { author, device, client_id, payload, commit_epoch, message_epoch, meta, over_rate: None },
                Reply::Send(reply),
            )
        }
        Msg::Group(mail) => {
            let GroupMail { from, request, reply } = *mail;
            (Input::Group { from, request }, Reply::Group(reply))
        }
        Msg::Deliver(mail) => {
            let DeliverMail { from, items, reply } = *mail;
            (Input::Deliver { from, items }, Reply::Deliver(reply))
        }
        Msg::Forwarded { to, up_to } => (Input::Forwarded { to, up_to }, Reply::None),
        Msg::Attach(mail) => {
            let AttachMail { device, connection, events, reply } = *mail;
            (Input::Attach { device, connection }, Reply::Attach(reply, device, connection, events))
        }
        Msg::Detach { device, connection } => (Input::Detach { device, connection }, Reply::None),
        Msg::Ack { device, connection, up_to } => (Input::Ack { device, connection, up_to }, Reply::None),
        Msg::MarkRead { peer, up_to, reply } => (Input::MarkRead { peer, up_to }, Reply::Done(reply)),
        Msg::DeviceChange { change, reply } => (Input::DeviceChange(*change), Reply::Done(reply)),
        Msg::Block { peer, blocked, reply } => (Input::Block { peer, blocked }, Reply::Done(reply)),
        Msg::Deleted { reply } => (Input::Deleted, Reply::Done(reply)),
        Msg::ContactName { change, reply } => {
            let (peer, name) = *change;
            (Input::ContactName { peer, name }, Reply::Done(reply))
        }
    })
}

/// Reads what the machine needs for a step.
async fn fetch(store: &dyn Store, account: AccountId, needs: Needs) -> Result<Facts, StoreError> {
    let mut facts = Facts::default();
    for (device, client_id) in needs.client_ids {
        if facts.client_ids.contains_key(&(device, client_id.clone())) {
            continue;
        }
        if let Some(seq) = store.client_id(account, device, &client_id).await? {
            let sent_at_ms = store.read_log(account, seq, 1).await?.first().map(|(_, e)| e.at_ms()).unwrap_or(0);
            facts.client_ids.insert((device, client_id), (seq, sent_at_ms));
        }
    }
    for peer in needs.contacts {
        facts.contacts.insert(peer, store.is_contact(account, peer).await?);
    }
    if needs.blocks {
        facts.blocks = Some(match account.direct_members() {
            // A 1:1 conversation's group: which member blocked the other.
            Some((a, b)) => {
                let mut set = std::collections::HashSet::new();
                for (member, other) in [(a, b), (b, a)] {
                    if store.blocked(member).await?.iter().any(|(peer, _)| *peer == other) {
                        set.insert(member);
                    }
                }
                set
            }
            None => {
                facts.deleted = store.account(account).await?.is_none();
                store.blocked(account).await?.into_iter().map(|(peer, _)| peer).collect()
            }
        });
    }
    for source in needs.inbound {
        facts.inbound.insert(source, store.inbound(account, source).await?);
    }
    for (peer, kind) in needs.receipts {
        facts.receipts.insert((peer, kind), store.receipt(account, peer, kind).await?);
    }
    for peer in needs.read_markers {
        facts.read_markers.insert(peer, store.read_marker(account, peer).await?);
    }
    for peer in needs.received {
        let mut seq = store.received(account, peer).await?;
        if seq == 0 {
            // Accounts written before this mark existed: look for the peer
            // in the newest part of the log (once per actor and peer).
            let recent = store.read_log_before(account, u64::MAX, LEGACY_RECEIVED_SCAN).await?;
            seq = recent.iter().filter_map(|(_, entry)| entry_from(entry, account, peer)).max().unwrap_or(0);
        }
        facts.received.insert(peer, seq);
    }
    for device in needs.cursors {
        facts.cursors.insert(device, store.cursor(account, device).await?);
    }
    for (id, since_ms) in needs.copies {
        let found = store.find_message(account, id, since_ms).await?;
        facts.copies.insert(id, found.map(|(seq, entry)| (seq, Arc::new(entry))));
    }
    for (from, to) in needs.entries {
        read_range(store, account, from, to, &mut facts.entries).await?;
    }
    Ok(facts)
}

/// Reads log entries `from..=to` into `into`.
async fn read_range(
    store: &dyn Store,
    account: AccountId,
    from: u64,
    to: u64,
    into: &mut BTreeMap<u64, Arc<LogEntry>>,
) -> Result<(), StoreError> {
    let mut next = from;
    while next <= to {
        let limit = usize::try_from(to - next + 1).unwrap_or(usize::MAX).min(machine::READ_CHUNK);
        let read = store.read_log(account, next, limit).await?;
        let Some((last, _)) = read.last() else { break };
        next = last + 1;
        into.extend(read.into_iter().filter(|(s, _)| *s <= to).map(|(s, e)| (s, Arc::new(e))));
    }
    Ok(())
}

/// The peer's sequence number of `entry`, if `account` received it from `peer`.
fn entry_from(entry: &LogEntry, account: AccountId, peer: AccountId) -> Option<u64> {
    match entry {
        LogEntry::Message(m) if m.id.sender == peer && m.to == account => Some(m.id.seq),
        LogEntry::Group(g) if g.group == peer => Some(g.seq),
        _ => None,
    }
}

fn jittered(base_ms: u64, max_ms: u64, attempt: u32) -> Duration {
    let ceiling = base_ms.saturating_mul(1u64 << attempt.min(20)).min(max_ms);
    Duration::from_millis(rand::rng().random_range(0..=ceiling))
}

/// Sends one batch of forwards to `to` until its actor acknowledges it.
async fn forward(ctx: Ctx, from: AccountId, to: AccountId, items: Batch, origin: lane::WeakSender<Msg>) {
    let config = ctx.config;
    let timeout = Duration::from_millis(config.forward_timeout_ms);
    let mut attempt = 0u32;
    // Counted among the forwards being retried from its first failure on.
    let mut retry_guard = None;
    // One span per message forwarded, in the message's trace, open until
    // the destination has it stored (only when the forward's span is on).
    let hops = message_spans(from, to, &items);
    loop {
        match tokio::time::timeout(timeout, ctx.deliver(to, from, items.clone())).await {
            Ok(Ok(up_to)) => {
                for hop in &hops {
                    hop.record("attempts", attempt + 1);
                }
                if let Some(origin) = origin.upgrade() {
                    let _ = origin.send(Msg::Forwarded { to, up_to }).await;
                }
                return;
            }
            Ok(Err(MessagingError::ShuttingDown)) => return,
            Ok(Err(e)) => tracing::debug!(error = %e, attempt, "forward failed; retrying"),
            Err(_) => tracing::debug!(attempt, "forward timed out; retrying"),
        }
        metrics::counter!("skylark_forward_retries_total").increment(1);
        if retry_guard.is_none() {
            retry_guard = Some(ctx.registry.retrying());
        }
        let delay = jittered(config.forward_retry_base_ms, config.forward_retry_max_ms, attempt);
        attempt = attempt.saturating_add(1);
        tokio::select! {
            _ = ctx.registry.shutdown.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// A `message.forward` span for each message or group post of a forward
/// batch, named by the message's id, when the current span (the batch's
/// `forward`) is enabled; none otherwise, at no cost.
fn message_spans(from: AccountId, to: AccountId, items: &Batch) -> Vec<tracing::Span> {
    if tracing::Span::current().is_disabled() {
        return Vec::new();
    }
    let id = |forward: &Forward| match forward {
        Forward::Message(m) => Some((m.id.sender, m.id.seq)),
        Forward::Group(e) if matches!(e.body, skylark_core::group::GroupBody::Message { .. }) => Some((e.group, e.seq)),
        _ => None,
    };
    items
        .iter()
        .filter_map(|(_, forward)| id(forward))
        .map(|(sender, seq)| {
            tracing::debug_span!(
                "message.forward",
                message = %format_args!("{sender}:{seq}"),
                %from,
                %to,
                attempts = tracing::field::Empty,
            )
        })
        .collect()
}

impl Shell {
    fn account(&self) -> AccountId {
        self.machine.account
    }

    /// Handles the mail left in a closed mailbox; false if a batch failed.
    async fn finish_queued(&mut self, mailbox: &mut lane::Receiver<Msg>, batch: &mut Vec<Msg>) -> bool {
        while mailbox.recv_many(batch, MAX_BATCH).await > 0 {
            if Box::pin(self.handle(std::mem::take(batch))).await.is_err() {
                return false;
            }
        }
        true
    }

    /// The settled connections' windows with their queues, for
    /// [`Registry::park`].
    fn park(&self, mut lanes: SmallMap<DeviceId, (u64, lane::Sender<DeviceEvent>)>) -> Parked {
        let parked: Vec<_> = self
            .machine
            .windows()
            .into_iter()
            .filter_map(|(device, window)| {
                let (connection, events) = lanes.remove(&device)?;
                (connection == window.connection && !events.is_closed()).then_some((device, window, events))
            })
            .collect();
        Parked(parked.into_boxed_slice())
    }

    /// Writes the deferred cleanup on its own.
    async fn write_cleanup(&mut self) -> Result<(), StoreError> {
        let mut write = AccountWrite::new(self.account());
        self.machine.take_cleanup(&mut write);
        write.epoch = self.epoch;
        self.ctx.store.apply(write).await
    }

    /// Handles one batch of mail. `Err` means a read or the write failed
    /// (or the machine's facts were incomplete) and the actor must stop.
    async fn handle(&mut self, batch: Vec<Msg>) -> Result<(), ()> {
        let (mut inputs, mut replies): (Vec<Input>, Vec<Reply>) = batch.into_iter().filter_map(split).unzip();
        if inputs.is_empty() {
            return Ok(());
        }
        let account = self.account();
        let store = self.ctx.store.clone();
        let needs = self.machine.needs(&inputs);
        let fetched = if needs.is_empty() { Ok(Facts::default()) } else { fetch(&*store, account, needs).await };
        let facts = match fetched {
            Ok(facts) => facts,
            Err(e) => return fail(replies, MessagingError::from(e), "an actor read failed"),
        };
        self.charge_rates(&mut inputs, &facts);
        let now = self.ctx.clock.now_ms();
        let mut fx = match self.machine.step(inputs, &facts, now) {
            Ok(fx) => fx,
            Err(missing) => {
                tracing::error!(%account, error = %missing, "actor step lacked a fact");
                return fail(replies, MessagingError::Internal("actor state incomplete"), "actor step failed");
            }
        };
        // A group tells authors when every member has their posts, reading
        // the part of its log the marks passed that is not in memory.
        let mut more = Facts::default();
        if let Some((from, to)) = self.machine.marks_need()
            && let Err(e) = read_range(&*store, account, from, to, &mut more.entries).await
        {
            return fail(replies, MessagingError::from(e), "an actor read failed");
        }
        if let Err(missing) = self.machine.advance_marks(&mut fx, &more, now) {
            tracing::error!(%account, error = %missing, "actor step lacked a fact");
            return fail(replies, MessagingError::Internal("actor state incomplete"), "actor step failed");
        }
        // Answers that need no write go now; attachments join the shell.
        let mut later = Vec::new();
        for (outcome, reply) in fx.outcomes.drain(..).zip(replies.drain(..)) {
            match outcome {
                Outcome::Now(result) => {
                    if let (Reply::Attach(_, device, connection, events), Ok(_)) = (&reply, &result) {
                        if self.machine.feeds.windows.get(device).is_some_and(|w| w.connection == *connection) {
                            // A newer connection of the device: the older one
                            // is told why its stream ends.
                            let older = self.lanes.insert(*device, (*connection, events.clone()));
                            if let Some((_, older)) = older.filter(|(c, _)| c != connection) {
                                let _ = older.try_send(DeviceEvent::Closed(crate::sessions::Disconnect::Replaced));
                            }
                        } else if let Some(reason) = self.let_go(*device) {
                            // Superseded within this batch: a newer connection
                            // of the device attached too, or it was removed.
                            let _ = events.try_send(DeviceEvent::Closed(reason));
                        }
                    }
                    reply.answer(result);
                }
                Outcome::Later(answer) => later.push((reply, answer)),
                Outcome::Silent => reply.answer(Ok(Answer::Done)),
            }
        }
        if !fx.write.is_empty() {
            let mut write = std::mem::replace(&mut fx.write, AccountWrite::new(account));
            write.epoch = self.epoch;
            if let Err(e) = store.apply(write).await {
                tracing::error!(%account, error = %e, "actor write failed; restarting the actor");
                for (reply, _) in later {
                    reply.answer(Err(MessagingError::from(e.clone())));
                }
                return Err(());
            }
        }
        // Before the post is answered or forwarded, so whoever it reaches
        // is a contact of its author by then.
        for (author, peer) in fx.contacts {
            if let Err(e) = store.add_contact(author, peer).await {
                tracing::warn!(%account, %author, error = %e, "recording a contact failed; the next post retries");
                self.machine.contact_not_recorded(author);
            }
        }
        for (reply, answer) in later {
            reply.answer(Ok(answer));
        }
        self.count(fx.counts);
        if fx.wake {
            self.ctx.wake(account);
        }
        for to in fx.kick {
            self.start_forward(to);
        }
        self.sync_lanes();
        for device in self.machine.attached() {
            if self.pump(device).await.is_err() {
                return Err(());
            }
        }
        Ok(())
    }

    /// Why the machine let a connection of `device` go, if a device is
    /// told: a newer connection holds its window, or it was removed (a
    /// detached connection is not listening).
    fn let_go(&self, device: DeviceId) -> Option<crate::sessions::Disconnect> {
        if self.machine.feeds.windows.get(&device).is_some() {
            Some(crate::sessions::Disconnect::Replaced)
        } else if self.machine.feeds.positions.get(&device).is_none() {
            Some(crate::sessions::Disconnect::DeviceRemoved)
        } else {
            None
        }
    }

    /// Drops the queues of connections the machine no longer feeds
    /// (detached, replaced or removed devices): their streams end, telling a
    /// replaced connection (a newer one of its device attached, on whichever
    /// node) and a removed device's why.
    fn sync_lanes(&mut self) {
        let stale: Vec<DeviceId> = self
            .lanes
            .iter()
            .filter(|(device, (connection, _))| {
                self.machine.feeds.windows.get(device).is_none_or(|w| w.connection != *connection)
            })
            .map(|(device, _)| *device)
            .collect();
        for device in stale {
            if let (Some(reason), Some((_, events))) = (self.let_go(device), self.lanes.get(&device)) {
                let _ = events.try_send(DeviceEvent::Closed(reason));
            }
            self.lanes.remove(&device);
        }
    }

    /// Asks the limiter about every send that is not a resend of an
    /// accepted client id (those are answered whatever the rate).
    fn charge_rates(&self, inputs: &mut [Input], facts: &Facts) {
        let mut seen: HashSet<(DeviceId, String)> = HashSet::new();
        for input in inputs {
            let (Input::Send { device, client_id, over_rate, .. } | Input::Post { device, client_id, over_rate, .. }) =
                input
            else {
                continue;
            };
            let key = (*device, client_id.clone());
            if facts.client_ids.contains_key(&key) || seen.contains(&key) {
                continue;
            }
            match self.ctx.sends.check(&device.to_string()) {
                Ok(()) => {
                    seen.insert(key);
                }
                Err(limited) => *over_rate = Some(limited.retry_after),
            }
        }
    }

    fn count(&self, counts: machine::Counts) {
        if counts.accepted > 0 {
            metrics::counter!("skylark_messages_accepted_total").increment(counts.accepted);
        }
        if counts.group_accepted > 0 {
            metrics::counter!("skylark_group_messages_accepted_total").increment(counts.group_accepted);
        }
        if counts.stored > 0 {
            metrics::counter!("skylark_messages_stored_total").increment(counts.stored);
        }
        if counts.group_events_stored > 0 {
            metrics::counter!("skylark_group_events_stored_total").increment(counts.group_events_stored);
        }
        if counts.dropped_blocked > 0 {
            metrics::counter!("skylark_messages_blocked_total").increment(counts.dropped_blocked);
        }
        if counts.purged > 0 {
            metrics::counter!("skylark_messages_purged_total", "why" => "deleted").increment(counts.purged);
        }
        if counts.stale_commits > 0 {
            metrics::counter!("skylark_encryption_stale_total", "kind" => "commit").increment(counts.stale_commits);
        }
        if counts.stale_messages > 0 {
            metrics::counter!("skylark_encryption_stale_total", "kind" => "message").increment(counts.stale_messages);
        }
    }

    /// Feeds a device up to its window; marks it caught up when it has all.
    async fn pump(&mut self, device: DeviceId) -> Result<(), StoreError> {
        let mut fetched = BTreeMap::new();
        loop {
            let Some((_, events)) = self.lanes.get(&device) else { return Ok(()) };
            match self.machine.feed_plan(device, &fetched) {
                FeedPlan::Idle => return Ok(()),
                FeedPlan::CaughtUp(seq) => {
                    if events.try_send(DeviceEvent::CaughtUp { seq }).is_ok() {
                        self.machine.told_caught_up(device);
                    }
                    return Ok(());
                }
                FeedPlan::Fetch { from, to } => {
                    let before = fetched.len();
                    read_range(&*self.ctx.store, self.account(), from, to, &mut fetched).await?;
                    if fetched.len() == before {
                        return Ok(());
                    }
                }
                FeedPlan::Entries(entries) => {
                    let (mut handed, mut shown) = (None, None);
                    let mut closed = false;
                    for (seq, entry) in entries {
                        if !self.machine.hands(device, &entry) {
                            handed = Some(seq);
                            continue;
                        }
                        match events.try_send(DeviceEvent::Entry { seq, entry }) {
                            Ok(()) => (handed, shown) = (Some(seq), Some(seq)),
                            Err(lane::TrySendError::Full(_)) => break,
                            Err(lane::TrySendError::Closed(_)) => {
                                closed = true;
                                break;
                            }
                        }
                    }
                    if let Some(seq) = handed {
                        self.machine.fed(device, seq, shown);
                    }
                    if closed {
                        self.machine.lost(device);
                        self.lanes.remove(&device);
                        return Ok(());
                    }
                    if handed.is_none() {
                        return Ok(());
                    }
                }
            }
        }
    }

    fn start_forward(&mut self, to: AccountId) {
        let Some(items) = self.machine.outbox.take_batch(to) else { return };
        let from = self.account();
        let span = tracing::debug_span!("forward", %from, %to);
        let task = forward(self.ctx.clone(), from, to, items, self.self_mailbox.clone());
        self.ctx.registry.spawn(span, task);
    }
}

/// Answers every reply of a batch with `error`; the actor then stops
/// (hence always `Err`).
fn fail(replies: Vec<Reply>, error: MessagingError, what: &str) -> Result<(), ()> {
    tracing::error!(error = %error, "{what}; restarting the actor");
    for reply in replies {
        reply.answer(Err(error.clone()));
    }
    Err(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn mailbox_slots_stay_small() {
        // Regression guard for mailbox memory under load (see `SendMail`).
        assert!(std::mem::size_of::<super::Msg>() <= 32, "Msg is {} bytes", std::mem::size_of::<super::Msg>());
    }
}
