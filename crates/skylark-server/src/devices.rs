//! Linking more devices to an account, and managing them.
//!
//! Linking needs no SMS (as WhatsApp Web): the new device generates its key
//! and asks for a pending link, which yields a short single-use code; a
//! device already signed in to the account approves the code; the new
//! device, waiting on its link, learns its account and device id and then
//! authenticates like any other. Every device of the account is told
//! through a `Devices` entry in the account's log.
//!
//! Pending links live in memory: they last minutes, and after a restart the
//! new device simply asks for another code.

use crate::config::Quota;
use crate::ratelimit::{KeyedLimiter, Limited};
use crate::router::Router;
use crate::sessions::{Disconnect, Sessions};
use rand::{Rng, RngCore};
use skylark_core::account::clean_device_name;
use skylark_core::message::{DeviceChange, LogEntry};
use skylark_core::{AccountId, Clock, Device, DeviceId, NewDevice, PhoneNumber};
use skylark_store::{AddDeviceError, ReceiptState, Store, StoreError};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::watch;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DevicesConfig {
    /// Active devices per account at most: the primary plus linked ones
    /// (WhatsApp allows 1 + 4).
    pub max_devices: usize,
    /// How long a link code stays valid.
    pub link_ttl_ms: u64,
    /// How far back a device may page through its account's history.
    pub history_window_ms: u64,
    /// Link requests per client IP address.
    pub links_per_ip: Quota,
    /// Link approvals (right or wrong codes) per account.
    pub approvals_per_account: Quota,
}

impl Default for DevicesConfig {
    fn default() -> Self {
        Self {
            max_devices: 5,
            link_ttl_ms: 5 * 60_000,
            history_window_ms: 30 * 24 * 3_600_000,
            links_per_ip: Quota { burst: 10, per_ms: 60_000 },
            approvals_per_account: Quota { burst: 10, per_ms: 60_000 },
        }
    }
}

/// What the waiting device learns about its link.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum LinkState {
    Pending,
    Approved { account: AccountId, device: DeviceId, phone: PhoneNumber },
    Expired,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkView {
    /// The new device's handle for waiting on the link (keep it private).
    pub link_id: String,
    /// The code a person types or scans on the signed-in device.
    pub code: String,
    pub expires_at_ms: u64,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum DeviceError {
    #[error("{}; try again in {}", .0.what(), skylark_core::words::wait(u64::try_from(.0.retry_after.as_millis()).unwrap_or(u64::MAX)))]
    RateLimited(Limited),
    #[error("invalid public key")]
    InvalidKey,
    #[error("invalid device name: {0}")]
    InvalidName(&'static str),
    #[error("no pending link with that code")]
    UnknownCode,
    #[error("the link code expired")]
    Expired,
    #[error("no such link")]
    UnknownLink,
    #[error("the account already has the maximum of {0} devices")]
    LimitReached(usize),
    #[error("no such device in this account")]
    UnknownDevice,
    #[error("storage unavailable: {0}")]
    Store(#[from] StoreError),
}

impl From<Limited> for DeviceError {
    fn from(l: Limited) -> Self {
        DeviceError::RateLimited(l)
    }
}

struct PendingLink {
    id: String,
    public_key: [u8; 32],
    name: String,
    expires_at_ms: u64,
    state: watch::Sender<LinkState>,
}

#[derive(Default)]
struct Links {
    /// Normalised code → link.
    by_code: HashMap<String, PendingLink>,
    /// Link id → its state, kept until the waiting device has seen the
    /// outcome or the link is long expired.
    by_id: HashMap<String, (watch::Receiver<LinkState>, u64)>,
}

/// A device as the device list shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    pub device: Device,
    pub online: bool,
}

/// One page of an account's history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryPage {
    /// Newest first.
    pub entries: Vec<(u64, LogEntry)>,
    pub has_more: bool,
    pub receipts: ReceiptState,
}

/// Largest history page.
pub const MAX_HISTORY_PAGE: usize = 200;

/// Cluster mode: the pending links of the other nodes (they live in the
/// memory of the node that made them).
#[async_trait::async_trait]
pub trait LinkPeers: Send + Sync {
    /// This node's name; it ends the ids of the links made here.
    fn node(&self) -> &str;
    /// Asks the node that holds `code` to approve it for `account`. `None`
    /// when no node holds it.
    async fn approve(&self, account: AccountId, code: &str) -> Option<Result<Device, DeviceError>>;
    /// Waits for link `link_id` on `node`, which made it.
    async fn wait(&self, node: &str, link_id: &str, wait: Duration) -> Result<LinkState, DeviceError>;
}

pub struct Devices {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    sessions: Arc<Sessions>,
    router: Router,
    config: DevicesConfig,
    links: Mutex<Links>,
    links_per_ip: KeyedLimiter,
    approvals: KeyedLimiter,
    /// Last-seen times not yet written. Written in one transaction by
    /// [`Devices::flush_last_seen`] (housekeeping and shutdown) rather than
    /// one fsync per connect and disconnect; a crash loses at most the last
    /// minute of last-seen times, which are informational.
    last_seen: Mutex<HashMap<DeviceId, u64>>,
    /// Cluster mode: links made on other nodes.
    peers: std::sync::OnceLock<Arc<dyn LinkPeers>>,
}

impl std::fmt::Debug for Devices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Devices").field("config", &self.config).finish_non_exhaustive()
    }
}

/// Letters and digits that cannot be mistaken for each other.
const CODE_ALPHABET: &[u8] = b"23456789ABCDEFGHJKMNPQRSTUVWXYZ";
const CODE_LEN: usize = 8;

fn new_code() -> String {
    let mut rng = rand::rng();
    (0..CODE_LEN).map(|_| CODE_ALPHABET[rng.random_range(0..CODE_ALPHABET.len())] as char).collect()
}

/// Codes are shown as `ABCD-EFGH`; typed forms with spaces, dashes or
/// lower case are the same code.
pub fn normalise_code(code: &str) -> String {
    code.chars().filter(|c| c.is_ascii_alphanumeric()).map(|c| c.to_ascii_uppercase()).collect()
}

pub fn display_code(code: &str) -> String {
    let (a, b) = code.split_at(code.len() / 2);
    format!("{a}-{b}")
}

impl Devices {
    pub fn new(
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        sessions: Arc<Sessions>,
        router: Router,
        config: DevicesConfig,
    ) -> Self {
        Self {
            store,
            clock,
            sessions,
            router,
            links_per_ip: KeyedLimiter::new("links_per_ip", config.links_per_ip),
            approvals: KeyedLimiter::new("link_approvals_per_account", config.approvals_per_account),
            config,
            links: Mutex::new(Links::default()),
            last_seen: Mutex::new(HashMap::new()),
            peers: std::sync::OnceLock::new(),
        }
    }

    /// Cluster mode: installs the way to other nodes' links.
    pub fn on_peers(&self, peers: Arc<dyn LinkPeers>) {
        let _ = self.peers.set(peers);
    }

    pub fn config(&self) -> &DevicesConfig {
        &self.config
    }

    fn links(&self) -> std::sync::MutexGuard<'_, Links> {
        self.links.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new device asks to be linked.
    pub fn create_link(&self, public_key: &[u8], name: &str, ip: IpAddr) -> Result<LinkView, DeviceError> {
        let public_key: [u8; 32] = public_key.try_into().map_err(|_| DeviceError::InvalidKey)?;
        skylark_core::auth::parse_public_key(&public_key).map_err(|_| DeviceError::InvalidKey)?;
        let name = clean_device_name(name).map_err(DeviceError::InvalidName)?;
        self.links_per_ip.check(&ip.to_string())?;
        let now = self.clock.now_ms();
        let expires_at_ms = now + self.config.link_ttl_ms;
        let mut id_bytes = [0u8; 16];
        rand::rng().fill_bytes(&mut id_bytes);
        let mut link_id: String = id_bytes.iter().map(|b| format!("{b:02x}")).collect();
        if let Some(peers) = self.peers.get() {
            // Cluster mode: the id says which node to wait on.
            link_id = format!("{link_id}.{}", peers.node());
        }
        let (state, waiter) = watch::channel(LinkState::Pending);
        let mut links = self.links();
        self.forget_expired(&mut links, now);
        let code = loop {
            let code = new_code();
            if !links.by_code.contains_key(&code) {
                break code;
            }
        };
        links.by_id.insert(link_id.clone(), (waiter, expires_at_ms));
        links.by_code.insert(code.clone(), PendingLink { id: link_id.clone(), public_key, name, expires_at_ms, state });
        Ok(LinkView { link_id, code, expires_at_ms })
    }

    fn forget_expired(&self, links: &mut Links, now: u64) {
        links.by_code.retain(|_, link| {
            let live = link.expires_at_ms >= now;
            if !live {
                link.state.send_replace(LinkState::Expired);
            }
            live
        });
        // Outcomes stay readable for a while after expiry.
        let keep = self.config.link_ttl_ms;
        links.by_id.retain(|_, (_, expires)| expires.saturating_add(keep) >= now);
    }

    /// Waits up to `wait` for the link to be approved or to expire.
    pub async fn wait_link(&self, link_id: &str, wait: Duration) -> Result<LinkState, DeviceError> {
        if let (Some(peers), Some((_, node))) = (self.peers.get(), link_id.rsplit_once('.'))
            && node != peers.node()
        {
            return peers.wait(node, link_id, wait).await;
        }
        let (mut waiter, expires_at_ms) = {
            let mut links = self.links();
            self.forget_expired(&mut links, self.clock.now_ms());
            links.by_id.get(link_id).cloned().ok_or(DeviceError::UnknownLink)?
        };
        let until_expiry = Duration::from_millis(expires_at_ms.saturating_sub(self.clock.now_ms()));
        let outcome = tokio::time::timeout(wait.min(until_expiry), waiter.wait_for(|s| *s != LinkState::Pending)).await;
        Ok(match outcome {
            Ok(Ok(state)) => state.clone(),
            Ok(Err(_)) => LinkState::Expired,
            Err(_) if self.clock.now_ms() > expires_at_ms => LinkState::Expired,
            Err(_) => LinkState::Pending,
        })
    }

    /// A signed-in device of `account` approves a code: the new device joins
    /// the account and every device is told.
    pub async fn approve_link(&self, account: AccountId, code: &str) -> Result<Device, DeviceError> {
        self.approvals.check(&account.to_string())?;
        let code = normalise_code(code);
        match (self.approve_here(account, &code).await, self.peers.get()) {
            // Cluster mode: the new device may have asked another node.
            (Err(DeviceError::UnknownCode), Some(peers)) => {
                peers.approve(account, &code).await.unwrap_or(Err(DeviceError::UnknownCode))
            }
            (outcome, _) => outcome,
        }
    }

    /// Approves a link made on this node (the code normalised, the rate
    /// charged by the asker).
    pub async fn approve_here(&self, account: AccountId, code: &str) -> Result<Device, DeviceError> {
        let code = code.to_owned();
        let now = self.clock.now_ms();
        // Taking the link out first makes it single-use even under races.
        let link = {
            let mut links = self.links();
            let link = links.by_code.remove(&code).ok_or(DeviceError::UnknownCode)?;
            if link.expires_at_ms < now {
                link.state.send_replace(LinkState::Expired);
                return Err(DeviceError::Expired);
            }
            link
        };
        let new = NewDevice { public_key: link.public_key, name: link.name.clone() };
        let device = match self.store.add_device(account, new, self.config.max_devices, now).await {
            Ok(device) => device,
            Err(e) => {
                // The new device may try again with another signed-in device.
                self.links().by_code.insert(code, link);
                return Err(match e {
                    AddDeviceError::LimitReached(n) => DeviceError::LimitReached(n),
                    AddDeviceError::UnknownAccount => DeviceError::UnknownDevice,
                    AddDeviceError::Store(e) => DeviceError::Store(e),
                });
            }
        };
        let phone = self.router.phone_of(account).await.ok().flatten().ok_or(DeviceError::UnknownDevice)?;
        link.state.send_replace(LinkState::Approved { account, device: device.id, phone });
        tracing::info!(%account, device = %device.id, link = %link.id, "device linked");
        self.announce(account, DeviceChange::Linked { device: device.id, name: device.name.clone() }).await;
        Ok(device)
    }

    /// Tells every device of the account, through its log. Best effort: the
    /// change itself is already durable, and the device list is the truth.
    async fn announce(&self, account: AccountId, change: DeviceChange) {
        if let Err(e) = self.router.device_change(account, change).await {
            tracing::warn!(%account, error = %e, "could not record a device change in the log");
        }
    }

    pub async fn list(&self, account: AccountId) -> Result<Vec<DeviceInfo>, DeviceError> {
        let devices = self.store.active_devices(account).await?;
        Ok(devices
            .into_iter()
            .map(|mut device| {
                let online = self.sessions.is_live(device.id);
                device.last_seen_ms = self.last_seen(&device);
                DeviceInfo { device, online }
            })
            .collect())
    }

    pub async fn rename(&self, account: AccountId, device: DeviceId, name: &str) -> Result<(), DeviceError> {
        let name = clean_device_name(name).map_err(DeviceError::InvalidName)?;
        if !self.store.rename_device(account, device, name.clone()).await? {
            return Err(DeviceError::UnknownDevice);
        }
        self.announce(account, DeviceChange::Renamed { device, name }).await;
        Ok(())
    }

    /// Removes a device: its key stops working, its live connection closes
    /// with "device removed", its place in the log is forgotten.
    pub async fn remove(&self, account: AccountId, device: DeviceId) -> Result<(), DeviceError> {
        if !self.store.remove_device(account, device, self.clock.now_ms()).await? {
            return Err(DeviceError::UnknownDevice);
        }
        self.sessions.disconnect(device, Disconnect::DeviceRemoved);
        tracing::info!(%account, %device, "device removed");
        self.announce(account, DeviceChange::Removed { device }).await;
        Ok(())
    }

    /// Housekeeping: drops expired links and idle rate-limit state.
    pub fn sweep(&self) {
        self.forget_expired(&mut self.links(), self.clock.now_ms());
        self.links_per_ip.forget_idle();
        self.approvals.forget_idle();
    }

    /// Records that a device was seen now (on connect and disconnect).
    pub fn touch(&self, device: DeviceId) {
        self.last_seen.lock().unwrap_or_else(PoisonError::into_inner).insert(device, self.clock.now_ms());
    }

    /// The device's last-seen time, including what is not yet written.
    pub fn last_seen(&self, device: &Device) -> Option<u64> {
        let pending = self.last_seen.lock().unwrap_or_else(PoisonError::into_inner).get(&device.id).copied();
        pending.or(device.last_seen_ms)
    }

    /// Writes pending last-seen times in one transaction.
    pub async fn flush_last_seen(&self) {
        let seen: Vec<(DeviceId, u64)> =
            self.last_seen.lock().unwrap_or_else(PoisonError::into_inner).drain().collect();
        if let Err(e) = self.store.touch_devices(seen).await {
            tracing::warn!(error = %e, "could not record last-seen times");
        }
    }

    /// Entries of the account's log before `before` (0: from the newest),
    /// newest first, no older than the history window.
    pub async fn history(&self, account: AccountId, before: u64, limit: usize) -> Result<HistoryPage, DeviceError> {
        let limit = limit.clamp(1, MAX_HISTORY_PAGE);
        let before = if before == 0 { u64::MAX } else { before };
        let oldest = self.clock.now_ms().saturating_sub(self.config.history_window_ms);
        let mut entries = self.store.read_log_before(account, before, limit + 1).await?;
        let mut has_more = entries.len() > limit;
        entries.truncate(limit);
        if let Some(cut) = entries.iter().position(|(_, e)| e.at_ms() < oldest) {
            entries.truncate(cut);
            has_more = false;
        }
        let receipts = self.store.receipt_state(account).await?;
        Ok(HistoryPage { entries, has_more, receipts })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn housekeeping_forgets_expired_links() {
        let store: Arc<dyn Store> = Arc::new(skylark_store::RedbStore::in_memory().unwrap());
        let clock = skylark_core::ManualClock::new(1_000);
        let sessions = Arc::new(Sessions::default());
        let router = Router::new(store.clone(), Arc::new(clock.clone()), Default::default());
        let devices = Devices::new(store, Arc::new(clock.clone()), sessions, router, DevicesConfig::default());
        let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]).verifying_key().to_bytes();
        let link = devices.create_link(&key, "x", "127.0.0.1".parse().unwrap()).unwrap();
        clock.advance_ms(DevicesConfig::default().link_ttl_ms * 2 + 1);
        devices.sweep();
        assert!(devices.links().by_id.is_empty() && devices.links().by_code.is_empty());
        assert!(matches!(devices.wait_link(&link.link_id, Duration::ZERO).await, Err(DeviceError::UnknownLink)));
    }

    #[test]
    fn codes_are_unambiguous_and_forgiving() {
        let code = new_code();
        assert_eq!(code.len(), CODE_LEN);
        assert!(code.bytes().all(|b| CODE_ALPHABET.contains(&b)));
        assert_eq!(normalise_code(" abcd-efgh "), "ABCDEFGH");
        assert_eq!(display_code("ABCDEFGH"), "ABCD-EFGH");
    }
}
