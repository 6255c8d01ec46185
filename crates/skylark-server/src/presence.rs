//! Presence and typing: who is online, and who is typing to whom.
//!
//! Nothing here is stored or pushed: presence and typing exist only while
//! connections do, and go out only to live connections (and not to those
//! that declared themselves backgrounded). An account is online while any
//! of its devices is connected; when the last one goes, its last seen time
//! is now. Whether a watcher may see an account's presence is the watched
//! account's choice ([`Visibility`]): everyone, its contacts (accounts it
//! has sent a message to), or nobody.

use crate::lane;
use crate::small_map::SmallMap;
use skylark_core::{AccountId, Clock, DeviceId};
use skylark_store::{Store, StoreError, Visibility};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError};

/// Ephemeral events queued for one connection. When full, further events
/// are dropped: a stale typing indicator is worthless, and presence is
/// re-read on subscribe.
pub const EPHEMERAL_QUEUE: usize = 64;
/// Accounts one connection may watch at most.
pub const MAX_SUBSCRIPTIONS: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypingState {
    Composing,
    Paused,
    Recording,
}

/// What an account looks like to one watcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresenceInfo {
    pub account: AccountId,
    /// False when the account hides its presence from this watcher.
    pub visible: bool,
    pub online: bool,
    /// 0 when unknown or hidden.
    pub last_seen_ms: u64,
}

/// An event for one live connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ephemeral {
    Presence(PresenceInfo),
    Typing { from: AccountId, device: DeviceId, state: TypingState, expires_in_ms: u64 },
}

struct Conn {
    device: DeviceId,
    events: lane::Sender<Ephemeral>,
    /// False while the client says it is in the background.
    active: bool,
    watching: HashSet<AccountId>,
}

/// The live connections of one account: almost always one or two.
type Conns = SmallMap<u64, Conn>;

/// What a node tells the others of its connections and typing (cluster
/// mode); each node applies the others' to its own watchers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PresenceNote {
    Connected { account: AccountId, device: DeviceId },
    Disconnected { account: AccountId, device: DeviceId, at_ms: u64 },
    Typing { from: AccountId, device: DeviceId, to: AccountId, state: TypingState },
}

#[derive(Default)]
struct State {
    /// Live connections per account.
    live: HashMap<AccountId, Conns>,
    /// Cluster mode: devices connected to other nodes, by account
    /// (device → node).
    remote: HashMap<AccountId, HashMap<DeviceId, String>>,
    /// Watched account → (watcher account, connection).
    watchers: HashMap<AccountId, HashSet<(AccountId, u64)>>,
    /// When accounts went offline, for last seen.
    last_seen: HashMap<AccountId, u64>,
}

/// How long an account's last-seen time stays in memory after it went
/// offline; afterwards it is read from its devices' stored records.
const LAST_SEEN_KEPT_MS: u64 = 10 * 60_000;

pub struct Presence {
    state: Mutex<State>,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    typing_ttl_ms: u64,
    /// Typing notifications per device; past it they are dropped.
    typing_limit: crate::ratelimit::KeyedLimiter,
    /// Cluster mode: where this node's notes go.
    broadcast: std::sync::OnceLock<Arc<dyn Fn(PresenceNote) + Send + Sync>>,
}

impl State {
    /// Online here or (cluster mode) on another node.
    fn online(&self, account: AccountId) -> bool {
        self.live.get(&account).is_some_and(|c| !c.is_empty()) || self.remote.contains_key(&account)
    }
}

impl std::fmt::Debug for Presence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Presence").finish_non_exhaustive()
    }
}

impl Presence {
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        typing_ttl_ms: u64,
        typing_per_device: crate::config::Quota,
    ) -> Self {
        let typing_limit = crate::ratelimit::KeyedLimiter::new("typing_per_device", typing_per_device);
        let broadcast = std::sync::OnceLock::new();
        Self { state: Mutex::new(State::default()), store, clock, typing_ttl_ms, typing_limit, broadcast }
    }

    /// Housekeeping: drops idle rate-limit state, and last-seen times old
    /// enough that the devices' own records (written by housekeeping every
    /// minute) hold them, so the map does not grow with every account that
    /// was ever online.
    pub fn sweep(&self) {
        self.typing_limit.forget_idle();
        let now = self.clock.now_ms();
        self.state().last_seen.retain(|_, at| now.saturating_sub(*at) < LAST_SEEN_KEPT_MS);
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether `watcher` may see `account`'s presence.
    async fn visible_to(&self, account: AccountId, watcher: AccountId) -> Result<bool, StoreError> {
        if account == watcher {
            return Ok(true);
        }
        if self.store.blocked(account).await?.iter().any(|(peer, _)| *peer == watcher) {
            return Ok(false);
        }
        Ok(match self.store.visibility(account).await? {
            Visibility::Everyone => true,
            Visibility::Nobody => false,
            Visibility::Contacts => self.store.is_contact(account, watcher).await?,
        })
    }

    fn snapshot(&self, account: AccountId) -> (bool, u64) {
        let state = self.state();
        (state.online(account), state.last_seen.get(&account).copied().unwrap_or(0))
    }

    /// Cluster mode: installs where this node's notes go.
    pub fn on_note(&self, broadcast: Arc<dyn Fn(PresenceNote) + Send + Sync>) {
        let _ = self.broadcast.set(broadcast);
    }

    fn tell_others(&self, note: PresenceNote) {
        if let Some(broadcast) = self.broadcast.get() {
            broadcast(note);
        }
    }

    /// Cluster mode: applies a note from `node` for this node's watchers
    /// and connections.
    pub async fn apply_note(&self, node: &str, note: PresenceNote) {
        let changed = match note {
            PresenceNote::Typing { from, device, to, state } => {
                let event = Ephemeral::Typing { from, device, state, expires_in_ms: self.typing_ttl_ms };
                self.deliver(to, None, event);
                None
            }
            PresenceNote::Connected { account, device } => {
                let mut state = self.state();
                let was = state.online(account);
                state.remote.entry(account).or_default().insert(device, node.to_string());
                (!was).then_some(account)
            }
            PresenceNote::Disconnected { account, device, at_ms } => {
                let mut state = self.state();
                let was = state.online(account);
                if let Some(devices) = state.remote.get_mut(&account) {
                    if devices.get(&device).is_some_and(|n| n == node) {
                        devices.remove(&device);
                    }
                    if devices.is_empty() {
                        state.remote.remove(&account);
                    }
                }
                let now = state.online(account);
                if was && !now {
                    state.last_seen.insert(account, at_ms);
                }
                (was && !now).then_some(account)
            }
        };
        if let Some(account) = changed {
            self.announce(account).await;
        }
    }

    /// Cluster mode: `node` left; its devices are offline from now on.
    pub async fn forget_node(&self, node: &str) {
        let now = self.clock.now_ms();
        let gone: Vec<AccountId> = {
            let mut state = self.state();
            let mut gone = Vec::new();
            let accounts: Vec<AccountId> = state.remote.keys().copied().collect();
            for account in accounts {
                let was = state.online(account);
                if let Some(devices) = state.remote.get_mut(&account) {
                    devices.retain(|_, n| n != node);
                    if devices.is_empty() {
                        state.remote.remove(&account);
                    }
                }
                if was && !state.online(account) {
                    state.last_seen.insert(account, now);
                    gone.push(account);
                }
            }
            gone
        };
        for account in gone {
            self.announce(account).await;
        }
    }

    /// Cluster mode: every device connected here, for a node that joined
    /// (or reconnected to the bus) and must learn them.
    pub fn local_devices(&self) -> Vec<(AccountId, DeviceId)> {
        let state = self.state();
        state.live.iter().flat_map(|(account, conns)| conns.iter().map(|(_, c)| (*account, c.device))).collect()
    }

    /// Whether `device` has a connection on another node (cluster mode).
    pub fn live_elsewhere(&self, account: AccountId, device: DeviceId) -> bool {
        self.state().remote.get(&account).is_some_and(|d| d.contains_key(&device))
    }

    /// What `account` looks like to `watcher` now.
    pub async fn info(&self, account: AccountId, watcher: AccountId) -> Result<PresenceInfo, StoreError> {
        if !self.visible_to(account, watcher).await? {
            return Ok(PresenceInfo { account, visible: false, online: false, last_seen_ms: 0 });
        }
        let (online, mut last_seen_ms) = self.snapshot(account);
        if !online && last_seen_ms == 0 {
            // Not seen since this server started: the devices' records know.
            let devices = self.store.active_devices(account).await?;
            last_seen_ms = devices.iter().filter_map(|d| d.last_seen_ms).max().unwrap_or(0);
        }
        Ok(PresenceInfo { account, visible: true, online, last_seen_ms })
    }

    /// Sends `account`'s new presence to the watchers allowed to see it.
    async fn announce(&self, account: AccountId) {
        let watchers: Vec<(AccountId, u64)> =
            self.state().watchers.get(&account).map(|w| w.iter().copied().collect()).unwrap_or_default();
        for (watcher, connection) in watchers {
            let info = match self.info(account, watcher).await {
                Ok(info) if info.visible => info,
                _ => continue,
            };
            self.deliver(watcher, Some(connection), Ephemeral::Presence(info));
        }
    }

    /// Queues an event for one connection of `account` (or all of them),
    /// skipping backgrounded ones.
    fn deliver(&self, account: AccountId, connection: Option<u64>, event: Ephemeral) {
        let state = self.state();
        let Some(conns) = state.live.get(&account) else { return };
        for (id, conn) in conns.iter() {
            if connection.is_some_and(|c| c != *id) || !conn.active {
                continue;
            }
            if conn.events.try_send(event.clone()).is_err() {
                metrics::counter!("skylark_ephemeral_dropped_total").increment(1);
            }
        }
    }

    /// A connection of `account`'s `device` went live. The receiver carries
    /// its presence and typing events.
    pub async fn connect(&self, account: AccountId, device: DeviceId, connection: u64) -> lane::Receiver<Ephemeral> {
        let (events, receiver) = lane::channel(EPHEMERAL_QUEUE);
        let came_online = {
            let mut state = self.state();
            let was_offline = !state.online(account);
            let conns = state.live.entry(account).or_default();
            conns.insert(connection, Conn { device, events, active: true, watching: HashSet::new() });
            was_offline
        };
        self.tell_others(PresenceNote::Connected { account, device });
        if came_online {
            self.announce(account).await;
        }
        receiver
    }

    /// The connection ended. The last one (on any node) takes the account
    /// offline.
    pub async fn disconnect(&self, account: AccountId, connection: u64) {
        let now_ms = self.clock.now_ms();
        let (went_offline, device) = {
            let mut state = self.state();
            let Some(conns) = state.live.get_mut(&account) else { return };
            let Some(conn) = conns.remove(&connection) else { return };
            if conns.is_empty() {
                state.live.remove(&account);
            }
            let now_empty = !state.online(account);
            if now_empty {
                state.last_seen.insert(account, now_ms);
            }
            for watched in conn.watching {
                if let Some(w) = state.watchers.get_mut(&watched) {
                    w.remove(&(account, connection));
                    if w.is_empty() {
                        state.watchers.remove(&watched);
                    }
                }
            }
            (now_empty, conn.device)
        };
        self.tell_others(PresenceNote::Disconnected { account, device, at_ms: now_ms });
        if went_offline {
            self.announce(account).await;
        }
    }

    /// The connection watches these accounts' presence from now on; returns
    /// what each looks like now. Beyond `MAX_SUBSCRIPTIONS`, the rest are ignored.
    pub async fn subscribe(
        &self,
        account: AccountId,
        connection: u64,
        targets: &[AccountId],
    ) -> Result<Vec<PresenceInfo>, StoreError> {
        let accepted: Vec<AccountId> = {
            let mut state = self.state();
            let room = match state.live.get(&account).and_then(|c| c.get(&connection)) {
                Some(conn) => MAX_SUBSCRIPTIONS.saturating_sub(conn.watching.len()),
                None => return Ok(Vec::new()),
            };
            let accepted: Vec<AccountId> = targets.iter().copied().take(room).collect();
            for target in &accepted {
                state.watchers.entry(*target).or_default().insert((account, connection));
            }
            if let Some(conn) = state.live.get_mut(&account).and_then(|c| c.get_mut(&connection)) {
                conn.watching.extend(accepted.iter().copied());
            }
            accepted
        };
        let mut out = Vec::with_capacity(accepted.len());
        for target in accepted {
            out.push(self.info(target, account).await?);
        }
        Ok(out)
    }

    /// Client state indication: a backgrounded connection gets no presence
    /// or typing events until it is active again.
    pub fn set_active(&self, account: AccountId, connection: u64, active: bool) {
        if let Some(conn) = self.state().live.get_mut(&account).and_then(|c| c.get_mut(&connection)) {
            conn.active = active;
        }
    }

    /// `from` is typing to `to`: tells `to`'s live, active connections.
    /// Tells `to`'s active connections; returns false (and tells no one)
    /// when the device exceeded its typing rate.
    pub fn typing(&self, from: AccountId, device: DeviceId, to: AccountId, state: TypingState) -> bool {
        if self.typing_limit.check(&device.to_string()).is_err() {
            metrics::counter!("skylark_typing_dropped_total").increment(1);
            return false;
        }
        let event = Ephemeral::Typing { from, device, state, expires_in_ms: self.typing_ttl_ms };
        self.deliver(to, None, event);
        if self.state().remote.contains_key(&to) {
            self.tell_others(PresenceNote::Typing { from, device, to, state });
        }
        true
    }

    /// Tells `watcher`'s connections that watch `account` what they may see
    /// of it now (after `account` blocked or unblocked `watcher`).
    pub async fn retell(&self, account: AccountId, watcher: AccountId) -> Result<(), StoreError> {
        let connections: Vec<u64> = self
            .state()
            .watchers
            .get(&account)
            .map(|w| w.iter().filter(|(a, _)| *a == watcher).map(|(_, c)| *c).collect())
            .unwrap_or_default();
        if connections.is_empty() {
            return Ok(());
        }
        let info = self.info(account, watcher).await?;
        for connection in connections {
            self.deliver(watcher, Some(connection), Ephemeral::Presence(info));
        }
        Ok(())
    }

    /// Sets who may see `account`'s presence, and tells current watchers.
    pub async fn set_visibility(&self, account: AccountId, visibility: Visibility) -> Result<(), StoreError> {
        self.store.set_visibility(account, visibility).await?;
        self.announce(account).await;
        Ok(())
    }

    pub fn is_online(&self, account: AccountId) -> bool {
        self.snapshot(account).0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use skylark_core::{ManualClock, NewDevice, PhoneNumber};
    use skylark_store::AccountStore;

    #[tokio::test]
    async fn last_seen_leaves_memory_for_the_device_records() {
        let store = Arc::new(skylark_store::RedbStore::in_memory().unwrap());
        let clock = ManualClock::new(1_000_000);
        let phone = PhoneNumber::parse("+15550710001").unwrap();
        let who = store.register(&phone, NewDevice { public_key: [1; 32], name: "t".into() }, 1).await.unwrap();
        let presence = Presence::new(
            store.clone(),
            Arc::new(clock.clone()),
            10_000,
            crate::config::Quota { burst: 10, per_ms: 1 },
        );
        let account = who.account.id;
        let _events = presence.connect(account, who.device.id, 1).await;
        presence.disconnect(account, 1).await;
        let seen = presence.info(account, account).await.unwrap().last_seen_ms;
        assert_eq!(seen, 1_000_000, "kept in memory while fresh");
        // Housekeeping wrote the device's record meanwhile (Devices::flush_last_seen).
        store.touch_devices(vec![(who.device.id, 1_000_000)]).await.unwrap();
        clock.advance_ms(LAST_SEEN_KEPT_MS + 1);
        presence.sweep();
        assert!(presence.state().last_seen.is_empty(), "the map does not keep every account ever seen");
        assert_eq!(presence.info(account, account).await.unwrap().last_seen_ms, 1_000_000, "read from the store");
    }
}
