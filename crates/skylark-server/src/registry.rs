//! The registry of live actors: one mailbox per active account or group.
//!
//! [`Registry`] finds the mailbox of an actor, spawning the actor on first
//! use. An actor that has been idle retires through
//! [`Registry::retire`]: its mailbox closes under the registry's lock, and
//! a successor spawned for later mail waits for it to finish before loading
//! the account's state, so two actors never write one account at once.
//!
//! The registry knows mailboxes and generations, not what actors do; the
//! context it spawns actors with is passed in by the caller, so it holds no
//! reference back to it.

use crate::actor::{self, Ctx, Msg, Parked};
use crate::lane;
use crate::messaging::MessagingError;
use skylark_core::{AccountId, DeviceId};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Messages queued for one actor. Bounded so a flooded actor pushes back on
/// its senders (connections and other actors) instead of growing.
pub(crate) const MAILBOX: usize = 1024;

struct Slot {
    mailbox: lane::Sender<Msg>,
    generation: u64,
    /// Cancelled when the actor must move to another node (cluster mode
    /// only: one node never needs it, and its actors do not pay for it).
    handoff: Option<CancellationToken>,
}

#[derive(Default)]
struct Slots {
    live: HashMap<AccountId, Slot>,
    /// Actors that stopped taking mail but may still be finishing; a
    /// successor waits for the flag before loading state.
    retiring: HashMap<AccountId, (u64, watch::Receiver<bool>)>,
    /// The attached connections of actors that retired while their devices
    /// were idle: the next actor of the account takes them back.
    parked: HashMap<AccountId, actor::Parked>,
}

impl Slots {
    /// See [`Registry::quiet`].
    fn quiet(&self, account: AccountId) -> Option<Quiet> {
        if self.live.contains_key(&account) {
            return None;
        }
        match self.retiring.get(&account) {
            Some((generation, done)) => (*done.borrow()).then_some(Quiet(Some(*generation))),
            None => Some(Quiet(None)),
        }
    }
}

pub(crate) struct Registry {
    slots: Mutex<Slots>,
    /// Forwards that failed at least once and are still being retried:
    /// when each first failed (for the operator's metrics).
    retrying: std::sync::Arc<Mutex<HashMap<u64, std::time::Instant>>>,
    next_retry: AtomicU64,
    generation: AtomicU64,
    /// Cancelled at shutdown: every actor and forward selects on it.
    pub(crate) shutdown: CancellationToken,
    /// Every actor and forward task, so shutdown waits for them.
    tracker: TaskTracker,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            slots: Mutex::new(Slots::default()),
            retrying: std::sync::Arc::default(),
            next_retry: AtomicU64::new(0),
            generation: AtomicU64::new(1),
            shutdown: CancellationToken::new(),
            tracker: TaskTracker::new(),
        }
    }
}

impl Registry {
    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn live_actors(&self) -> usize {
        self.slots().live.len()
    }

    /// A forward failed: it is counted as retrying until the guard is dropped.
    pub(crate) fn retrying(&self) -> RetryGuard {
        let id = self.next_retry.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.retrying.lock().unwrap_or_else(PoisonError::into_inner).insert(id, std::time::Instant::now());
        RetryGuard { retrying: self.retrying.clone(), id }
    }

    /// Forwards being retried now, and how long the oldest has been.
    pub(crate) fn retries(&self) -> (usize, std::time::Duration) {
        let retrying = self.retrying.lock().unwrap_or_else(PoisonError::into_inner);
        let oldest = retrying.values().min().map(std::time::Instant::elapsed).unwrap_or_default();
        (retrying.len(), oldest)
    }

    /// Messages waiting in every live actor's mailbox, and in the fullest.
    pub(crate) fn mailbox_depths(&self) -> (usize, usize) {
        let slots = self.slots();
        slots.live.values().map(|s| s.mailbox.queued()).fold((0, 0), |(total, max), n| (total + n, max.max(n)))
    }

    pub(crate) fn is_live(&self, account: AccountId) -> bool {
        self.slots().live.contains_key(&account)
    }

    /// The mailbox of `account`'s actor, spawning the actor (with `ctx`) if needed.
    fn mailbox(&self, ctx: &Ctx, account: AccountId) -> (lane::Sender<Msg>, u64) {
        let mut slots = self.slots();
        if let Some(slot) = slots.live.get(&account) {
            return (slot.mailbox.clone(), slot.generation);
        }
        let generation = self.generation.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = lane::channel(MAILBOX);
        let predecessor = slots.retiring.remove(&account).map(|(_, done)| done);
        let handoff = ctx.cluster.get().map(|_| CancellationToken::new());
        slots.live.insert(account, Slot { mailbox: tx.clone(), generation, handoff: handoff.clone() });
        drop(slots);
        // Debug level, like the connection span: an idle actor is counted in
        // bytes, and a disabled span costs none. A root: the actor outlives
        // whatever request woke it (a child would keep that request's span
        // open, and unexported, for the actor's whole life).
        let span = tracing::debug_span!(parent: None, "actor", %account, generation);
        let start = actor::Start { account, generation, self_mailbox: tx.clone(), predecessor, handoff };
        let actor = actor::run(ctx.clone(), start, rx);
        crate::spawn_in(&self.tracker, span, actor);
        (tx, generation)
    }

    /// Queues `msg` for `account`'s actor (waiting while its mailbox is
    /// full), on whichever node owns it. If the actor retired or moved in
    /// between, its successor gets it.
    pub(crate) async fn tell(&self, ctx: &Ctx, account: AccountId, msg: Msg) -> Result<(), MessagingError> {
        self.tell_where(ctx, account, msg, true).await
    }

    /// As [`Registry::tell`], to an actor on this node whatever the
    /// placement says (mail that another node routed here).
    pub(crate) async fn tell_here(&self, ctx: &Ctx, account: AccountId, msg: Msg) -> Result<(), MessagingError> {
        self.tell_where(ctx, account, msg, false).await
    }

    async fn tell_where(&self, ctx: &Ctx, account: AccountId, mut msg: Msg, route: bool) -> Result<(), MessagingError> {
        for _ in 0..8 {
            if self.shutdown.is_cancelled() {
                return Err(MessagingError::ShuttingDown);
            }
            if let (true, Some(cluster)) = (route, ctx.cluster.get())
                && let Some(node) = cluster.remote_owner(account)
            {
                return cluster.tell(&node, account, msg).await;
            }
            // A connection leaving while no actor runs: let go of it
            // without starting one.
            if let Msg::Detach { device, connection } = msg
                && self.detach_parked(account, device, connection)
            {
                return Ok(());
            }
            let (mailbox, generation) = self.mailbox(ctx, account);
            match mailbox.send(msg).await {
                Ok(()) => return Ok(()),
                Err(lane::SendError(returned)) => {
                    msg = returned;
                    self.forget_generation(account, generation);
                }
            }
        }
        Err(MessagingError::ShuttingDown)
    }

    /// Runs a task that shutdown waits for, in `span` when it is enabled.
    pub(crate) fn spawn(&self, span: tracing::Span, task: impl std::future::Future<Output = ()> + Send + 'static) {
        crate::spawn_in(&self.tracker, span, task);
    }

    /// Keeps the settled connections of an actor retiring idle for the
    /// account's next actor (see [`actor::Parked`]).
    pub(crate) fn park(&self, account: AccountId, parked: Parked) {
        let mut slots = self.slots();
        // Under the lock, so shutdown (which clears them under it) cannot
        // miss a late one.
        if !parked.is_empty() && !self.shutdown.is_cancelled() {
            slots.parked.insert(account, parked);
        }
    }

    /// The connections the account's previous actor set aside, for its
    /// successor to serve.
    pub(crate) fn take_parked(&self, account: AccountId) -> Option<Parked> {
        self.slots().parked.remove(&account)
    }

    /// Whether no actor of `account` runs or is finishing: then the store
    /// holds all of its state. The answer names the last actor that ran, so
    /// [`Registry::park_if_quiet`] can tell whether one ran in between.
    pub(crate) fn quiet(&self, account: AccountId) -> Option<Quiet> {
        self.slots().quiet(account)
    }

    /// Sets a connection aside for an account that is still as `quiet`
    /// found it (no actor started since): `join` adds it to those already
    /// set aside, under the registry's lock. False, and `join` not called,
    /// if an actor started in between.
    pub(crate) fn park_if_quiet(
        &self,
        account: AccountId,
        quiet: Quiet,
        join: impl FnOnce(Option<Parked>) -> Parked,
    ) -> bool {
        let mut slots = self.slots();
        let last = slots.retiring.get(&account).map(|(generation, _)| *generation);
        if slots.live.contains_key(&account) || Quiet(last) != quiet || self.shutdown.is_cancelled() {
            return false;
        }
        let held = slots.parked.remove(&account);
        slots.parked.insert(account, join(held));
        true
    }

    /// Connections set aside while no actor runs for the account.
    pub(crate) fn parked_accounts(&self) -> usize {
        self.slots().parked.len()
    }

    /// A connection detaching while no actor of the account runs or is
    /// finishing: everything about it is in the store or set aside here, so
    /// it is let go of here, without starting an actor. False if an actor
    /// must be told.
    fn detach_parked(&self, account: AccountId, device: DeviceId, connection: u64) -> bool {
        let mut slots = self.slots();
        if slots.quiet(account).is_none() {
            return false;
        }
        if let Some(parked) = slots.parked.get_mut(&account) {
            parked.detach(device, connection);
            if parked.is_empty() {
                slots.parked.remove(&account);
            }
        }
        true
    }

    /// Removes a slot whose actor no longer takes mail.
    pub(crate) fn forget_generation(&self, account: AccountId, generation: u64) {
        let mut slots = self.slots();
        if slots.live.get(&account).is_some_and(|s| s.generation == generation) {
            slots.live.remove(&account);
        }
    }

    /// Asks every live actor for which `moves` holds to hand itself off
    /// (cluster mode: its owner changed). Returns how many were asked.
    pub(crate) fn hand_off(&self, moves: impl Fn(AccountId) -> bool) -> usize {
        let mut slots = self.slots();
        // Connections set aside for an account that moves end: they
        // reconnect, and attach on its new node.
        slots.parked.retain(|account, _| !moves(*account));
        let mut asked = 0;
        for (account, slot) in &slots.live {
            if let Some(handoff) = slot.handoff.as_ref().filter(|h| !h.is_cancelled() && moves(*account)) {
                handoff.cancel();
                asked += 1;
            }
        }
        asked
    }

    /// Called by an idle actor: if its mailbox is empty, it leaves the
    /// registry (closing the mailbox under the registry lock) and gets a
    /// flag to raise when it has finished. With `force` (a hand-off) it
    /// leaves even with mail queued, which it still handles.
    pub(crate) fn retire(
        &self,
        account: AccountId,
        generation: u64,
        mailbox: &mut lane::Receiver<Msg>,
        force: bool,
    ) -> Option<watch::Sender<bool>> {
        let mut slots = self.slots();
        if (!force && !mailbox.is_empty()) || slots.live.get(&account).is_none_or(|s| s.generation != generation) {
            return None;
        }
        slots.live.remove(&account);
        let (done, waiter) = watch::channel(false);
        slots.retiring.insert(account, (generation, waiter));
        mailbox.close();
        Some(done)
    }

    /// Starts the actor of every account and group whose outbox holds
    /// forwards (those this node owns, in cluster mode) that is not already
    /// running: a started actor resumes its forwards. Returns how many it
    /// woke. Called at start, and in cluster mode after the placement
    /// changed, so a forward left by a restart, a crash or a departed node
    /// goes on even if its sender never comes back.
    pub(crate) async fn resume_forwards(&self, ctx: &Ctx) -> Result<usize, skylark_store::StoreError> {
        const PAGE: usize = 1000;
        let mut woken = 0;
        let mut after = None;
        loop {
            let page = ctx.store.pending_outboxes(after, PAGE).await?;
            for &account in &page {
                if self.is_live(account) || ctx.cluster.get().is_some_and(|c| c.remote_owner(account).is_some()) {
                    continue;
                }
                if self.tell(ctx, account, Msg::Wake).await.is_err() {
                    // Shutting down: what is left resumes at the next start.
                    return Ok(woken);
                }
                woken += 1;
            }
            match page.last() {
                Some(&last) if page.len() == PAGE => after = Some(last),
                _ => return Ok(woken),
            }
        }
    }

    /// Stops every actor after its current batch and waits for them.
    pub(crate) async fn shutdown(&self) {
        self.shutdown.cancel();
        // Set-aside connections end with the actors.
        self.slots().parked.clear();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// No actor of an account runs: see [`Registry::quiet`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Quiet(Option<u64>);

/// Held by a forward while it retries (see [`Registry::retrying`]).
pub(crate) struct RetryGuard {
    retrying: std::sync::Arc<Mutex<HashMap<u64, std::time::Instant>>>,
    id: u64,
}

impl Drop for RetryGuard {
    fn drop(&mut self) {
        self.retrying.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwards_count_as_retrying_while_their_guard_lives() {
        let registry = Registry::default();
        assert_eq!(registry.retries(), (0, std::time::Duration::ZERO));
        let first = registry.retrying();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let second = registry.retrying();
        let (count, oldest) = registry.retries();
        assert_eq!(count, 2);
        assert!(oldest >= std::time::Duration::from_millis(20), "the oldest is the first: {oldest:?}");
        drop(first);
        let (count, oldest) = registry.retries();
        assert_eq!(count, 1);
        assert!(oldest < std::time::Duration::from_millis(20), "{oldest:?}");
        drop(second);
        assert_eq!(registry.retries(), (0, std::time::Duration::ZERO));
    }
}
