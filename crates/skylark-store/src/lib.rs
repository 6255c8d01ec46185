//! Skylark's durable state, behind per-domain traits.
//!
//! Callers see [`AccountStore`], [`VerificationStore`] and [`MetaStore`]
//! (bundled as [`Store`]), each method with its contract. The embedded
//! backend ([`redb_store::RedbStore`]) keeps everything in one redb file and
//! commits each write with fsync before returning; its in-memory twin serves
//! tests. The PostgreSQL backend ([`postgres::PgStore`]) implements the
//! same traits over one or more databases, sharded by account; both pass
//! the same [`conformance`] suite.
//!
//! This crate knows domain types only: never protobuf, sockets or HTTP.

pub mod conformance;
pub mod copy;
pub mod postgres;
pub mod record;
pub mod redb_store;

use async_trait::async_trait;
use skylark_core::group::GroupMeta;
pub use skylark_core::keys::KeyStock;
use skylark_core::message::{LogEntry, OutboxItem, ReceiptKind};
use skylark_core::verification::VerificationSession;
use skylark_core::{Account, AccountId, Device, DeviceId, NewDevice, PhoneNumber};

pub use postgres::{PgOptions, PgStore};
pub use redb_store::{RedbOptions, RedbStore};

/// Syncs a file, or a directory's entries (files created, renamed or
/// removed in it): what the files a server writes beside its store need to
/// survive a power cut, as the store's own writes do.
pub fn sync_path(path: &std::path::Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

/// Syncs the directory holding `path` (the current one for a bare name).
pub fn sync_parent(path: &std::path::Path) -> std::io::Result<()> {
    sync_path(path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new(".")))
}

/// A backend's own error, kept whole (its `source` chain too) and shared,
/// so that one failed group commit can be told to every write in it.
pub type BackendError = std::sync::Arc<dyn std::error::Error + Send + Sync>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The backend failed (disk, database); the operation had no effect.
    #[error("storage backend failed: {0}")]
    Backend(#[source] BackendError),
    /// A stored record could not be decoded.
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
    /// A write that would break an invariant of the stored data was refused
    /// (a bug in the caller, never something a client can cause).
    #[error("store invariant broken: {0}")]
    Invariant(String),
    /// The store was closed (the server is stopping); nothing was written.
    #[error("the store is closed")]
    Closed,
    /// The store cannot be used as it is — a damaged or empty file, or one
    /// written by a newer version. The message names the file and says
    /// what to do; nothing was changed.
    #[error("{0}")]
    Unusable(String),
    /// Cluster mode: the write carried an ownership epoch that is no longer
    /// the actor's (another node took the actor over); nothing was written.
    #[error("this node no longer owns the account (another node took it over)")]
    Fenced,
}

impl StoreError {
    /// Wraps a backend's error, keeping it as the source.
    pub fn backend(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        StoreError::Backend(std::sync::Arc::new(e))
    }
}

/// The outcome of [`AccountStore::register`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub account: Account,
    pub device: Device,
    /// True when the number had no account before.
    pub created: bool,
    /// Devices of an existing account that this registration removed.
    pub removed_devices: Vec<DeviceId>,
}

#[async_trait]
pub trait AccountStore: Send + Sync {
    /// The account holding `phone`, if any.
    async fn account_by_phone(&self, phone: &PhoneNumber) -> Result<Option<Account>, StoreError>;

    async fn account(&self, id: AccountId) -> Result<Option<Account>, StoreError>;

    /// A device by id, including removed devices (with `removed_at_ms` set).
    async fn device(&self, id: DeviceId) -> Result<Option<Device>, StoreError>;

    /// The active (not removed) devices of an account, by ascending id.
    async fn active_devices(&self, account: AccountId) -> Result<Vec<Device>, StoreError>;

    /// Registers `phone` after a successful verification, atomically: if an
    /// account holds the number, every active device of it is marked removed
    /// (the account keeps its id); otherwise a new account is created. Then
    /// `device` is enrolled, with its delivery cursor at the end of the
    /// account's log (a new device starts from now). Durable when it returns.
    async fn register(&self, phone: &PhoneNumber, device: NewDevice, now_ms: u64) -> Result<Registration, StoreError>;

    /// Enrols another device in an existing account, unless it already has
    /// `max_active` active devices. Its cursor starts at the end of the
    /// account's log. Durable when it returns.
    async fn add_device(
        &self,
        account: AccountId,
        device: NewDevice,
        max_active: usize,
        now_ms: u64,
    ) -> Result<Device, AddDeviceError>;

    /// Marks an active device of `account` removed and deletes its cursor.
    /// Returns false if `account` has no such active device.
    async fn remove_device(&self, account: AccountId, device: DeviceId, now_ms: u64) -> Result<bool, StoreError>;

    /// Renames an active device of `account`; false if there is none.
    async fn rename_device(&self, account: AccountId, device: DeviceId, name: String) -> Result<bool, StoreError>;

    /// Records when devices were last seen, all in one write.
    async fn touch_devices(&self, seen: Vec<(DeviceId, u64)>) -> Result<(), StoreError>;

    /// Deletes the account, durably: its number is free (a new sign-up
    /// makes a new account), its devices are marked removed (with their key
    /// packages and push targets gone), and its log, markers, receipts,
    /// contacts, settings, PIN and block list are deleted. Its outbox stays,
    /// so what it sent before is still delivered; group rosters are the
    /// groups' business (leave them first). Returns the devices removed, or
    /// `None` if there is no such account.
    async fn delete_account(&self, account: AccountId, now_ms: u64) -> Result<Option<Vec<DeviceId>>, StoreError>;
}

/// Why a device could not be added.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AddDeviceError {
    #[error("the account already has {0} active devices")]
    LimitReached(usize),
    #[error("no such account")]
    UnknownAccount,
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[async_trait]
pub trait VerificationStore: Send + Sync {
    /// Inserts or replaces the session with the same id. Durable when it returns.
    async fn put_verification(&self, session: &VerificationSession) -> Result<(), StoreError>;

    async fn verification(&self, id: &str) -> Result<Option<VerificationSession>, StoreError>;

    /// Deletes a session; deleting a missing one is not an error.
    async fn delete_verification(&self, id: &str) -> Result<(), StoreError>;

    /// Deletes every session created before `created_before_ms`; returns how many.
    async fn purge_verifications(&self, created_before_ms: u64) -> Result<usize, StoreError>;
}

/// Who may see an account's presence (online, last seen).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum Visibility {
    #[default]
    Everyone,
    /// Accounts this account has sent a message to.
    Contacts,
    Nobody,
}

/// An account's public face: its name and about text, and who may see them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Profile {
    pub name: String,
    pub about: String,
    pub visible_to: Visibility,
    pub updated_at_ms: u64,
}

/// Where to wake a device that has no live connection.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum PushTarget {
    /// RFC 8030 push service URL with the user agent's RFC 8291 keys.
    WebPush { endpoint: String, p256dh: Vec<u8>, auth: Vec<u8> },
    /// A UnifiedPush distributor's endpoint.
    UnifiedPush { endpoint: String },
    /// The server's configured webhook, with this device's token (for
    /// gateways to FCM or APNs).
    Webhook { token: String },
}

/// A user's report of a conversation to the server's operator: who, whom
/// (an account, or a group), when, and the last few messages of that
/// conversation as ids and metadata — never their content.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// Given by the store.
    pub id: u64,
    pub at_ms: u64,
    pub reporter: AccountId,
    pub reported: AccountId,
    /// The reporter blocked the account with the report.
    pub blocked: bool,
    pub messages: Vec<ReportedMessage>,
}

/// One message of a reported conversation, without its content.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ReportedMessage {
    pub sender: AccountId,
    /// Its sequence in the sender's log (1:1) or the group's.
    pub seq: u64,
    pub sent_at_ms: u64,
    pub bytes: u64,
}

/// Per-account settings and per-device push targets.
#[async_trait]
pub trait SettingsStore: Send + Sync {
    async fn visibility(&self, account: AccountId) -> Result<Visibility, StoreError>;
    async fn set_visibility(&self, account: AccountId, visibility: Visibility) -> Result<(), StoreError>;
    async fn push_target(&self, device: DeviceId) -> Result<Option<PushTarget>, StoreError>;
    /// Sets (or with `None`, removes) a device's push target. Durable when it returns.
    async fn set_push_target(&self, device: DeviceId, target: Option<PushTarget>) -> Result<(), StoreError>;
    /// `account` blocks `peer` (since `at_ms`), or unblocks it (`None`).
    /// Blocking again keeps the first time. Durable when it returns.
    async fn set_block(&self, account: AccountId, peer: AccountId, at_ms: Option<u64>) -> Result<(), StoreError>;
    /// The accounts `account` blocked, with since when, in account id order.
    async fn blocked(&self, account: AccountId) -> Result<Vec<(AccountId, u64)>, StoreError>;
    /// Names `peer` in `account`'s contacts (`None` removes the name).
    /// Durable when it returns.
    async fn set_contact_name(
        &self,
        account: AccountId,
        peer: AccountId,
        name: Option<String>,
    ) -> Result<(), StoreError>;
    /// Records that `account` wrote to `peer` (contacts are one-way; a
    /// contact recorded again is no change). For messages that do not pass
    /// through `account`'s own log: a 1:1 conversation's group records its
    /// authors this way. Durable when it returns.
    async fn add_contact(&self, account: AccountId, peer: AccountId) -> Result<(), StoreError>;
    /// The account's profile, if it set one.
    async fn profile(&self, account: AccountId) -> Result<Option<Profile>, StoreError>;
    /// Sets (or with `None`, removes) the account's profile. Durable when it returns.
    async fn set_profile(&self, account: AccountId, profile: Option<Profile>) -> Result<(), StoreError>;
    /// The names `account` gave its contacts, in peer id order.
    async fn contact_names(&self, account: AccountId) -> Result<Vec<(AccountId, String)>, StoreError>;
    /// The account's two-step verification PIN (its hash and guess count).
    async fn pin(&self, account: AccountId) -> Result<Option<skylark_core::pin::PinRecord>, StoreError>;
    /// Sets (or with `None`, removes) the account's PIN record. Durable when it returns.
    async fn set_pin(&self, account: AccountId, pin: Option<skylark_core::pin::PinRecord>) -> Result<(), StoreError>;
}

/// One device's answer to a claim of key packages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedKey {
    pub device: DeviceId,
    /// `None`: the device has published no package at all.
    pub package: Option<bytes::Bytes>,
    /// The device's stock was empty, so this is its last-resort package
    /// (handed out again to later claims until it is replaced).
    pub last_resort: bool,
}

/// The MLS key-package directory (the rules are `skylark_core::keys`): per
/// device, a stock of one-time packages claimed oldest first, and one
/// last-resort package.
#[async_trait]
pub trait KeyPackageStore: Send + Sync {
    /// Appends `packages` to `device`'s stock and, when given, replaces its
    /// last-resort package, in one durable transaction. When the stock
    /// would then hold more than `max` packages nothing is stored and the
    /// answer is `Err` with the stock as it is.
    async fn put_key_packages(
        &self,
        device: DeviceId,
        packages: Vec<bytes::Bytes>,
        last_resort: Option<bytes::Bytes>,
        max: u32,
    ) -> Result<Result<KeyStock, KeyStock>, StoreError>;

    async fn key_stock(&self, device: DeviceId) -> Result<KeyStock, StoreError>;

    /// One package for each of `devices` (in that order): the oldest of its
    /// stock, taken out durably before this returns, or its last-resort
    /// package when the stock is empty. Concurrent claims never get the
    /// same one-time package.
    async fn claim_key_packages(&self, devices: &[DeviceId]) -> Result<Vec<ClaimedKey>, StoreError>;
}

#[async_trait]
pub trait MetaStore: Send + Sync {
    /// The server's identity: `candidate` if none was stored yet (it is then
    /// stored), otherwise the stored one. Stable for the life of the data.
    async fn server_id(&self, candidate: [u8; 16]) -> Result<[u8; 16], StoreError>;

    /// A named secret of the server (for example its VAPID key): `candidate`
    /// if none was stored under `name` yet (it is then stored), otherwise the
    /// stored one.
    async fn secret(&self, name: &str, candidate: Vec<u8>) -> Result<Vec<u8>, StoreError>;

    /// Bans `phone` from the server (since `at_ms`), or lifts its ban (None).
    async fn set_ban(&self, phone: &PhoneNumber, at_ms: Option<u64>) -> Result<(), StoreError>;

    /// Every banned number, with when it was banned.
    async fn bans(&self) -> Result<Vec<(PhoneNumber, u64)>, StoreError>;

    /// Keeps a report for the operator, durably; answers its id (the
    /// store's, whatever `report.id` says).
    async fn add_report(&self, report: Report) -> Result<u64, StoreError>;

    /// The newest `limit` reports, newest first.
    async fn reports(&self, limit: usize) -> Result<Vec<Report>, StoreError>;

    /// Writes a consistent copy of everything stored to a new file at
    /// `dest` while the store keeps serving: what was committed when the
    /// copy began, nothing after. Only the embedded store can; PostgreSQL is
    /// backed up with its own tools (`pg_dump`, base backups).
    async fn backup(&self, dest: &std::path::Path) -> Result<Backup, StoreError> {
        let _ = dest;
        Err(StoreError::Unusable(
            "this store is PostgreSQL: back it up with PostgreSQL's own tools (pg_dump, or a base backup)".into(),
        ))
    }
}

/// What [`AccountStore::backup`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backup {
    /// Rows copied, over every table.
    pub rows: u64,
    /// Size of the file written, in bytes.
    pub bytes: u64,
}

/// Everything one account's actor changes in one step, applied atomically.
///
/// The actor is the only writer of its account's rows, so these changes
/// never conflict with another account's; the backend may commit many
/// accounts' writes together (group commit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccountWrite {
    pub account: AccountId,
    /// New log entries, with their sequence numbers (ascending, new).
    /// Shared with the actor's memory, so a payload is not copied to be
    /// written.
    pub appends: Vec<(u64, std::sync::Arc<LogEntry>)>,
    /// Entries rewritten in place, with their sequence numbers (existing):
    /// only ever a message or post with its payload purged (deleted for
    /// everyone), never a change of what an entry says.
    pub replaces: Vec<(u64, std::sync::Arc<LogEntry>)>,
    /// New outbox items, with their outbox sequence numbers.
    pub outbox_puts: Vec<(u64, OutboxItem)>,
    /// Outbox items the destination acknowledged.
    pub outbox_deletes: Vec<u64>,
    /// The account's counters after this write, if they changed.
    pub counters: Option<Counters>,
    /// (device, client id) → the log sequence of the message it named.
    pub client_ids: Vec<(DeviceId, String, u64)>,
    /// Highest outbox sequence applied from each source account.
    pub inbound: Vec<(AccountId, u64)>,
    /// Per-device delivery cursors (highest sequence acknowledged).
    pub cursors: Vec<(DeviceId, u64)>,
    /// Highest receipt received from each peer, per kind (in the peer's
    /// terms: this account's sequence numbers).
    pub receipts: Vec<(AccountId, ReceiptKind, u64)>,
    /// Highest sequence of each peer's messages this account marked read
    /// (in the peer's sequence numbers).
    pub read_markers: Vec<(AccountId, u64)>,
    /// Highest of each peer's sequence numbers this account received (its
    /// messages, or a group's events); read markers are clamped to it.
    pub received: Vec<(AccountId, u64)>,
    /// Accounts this account sent a message to (its contacts, for privacy).
    pub contacts: Vec<AccountId>,
    /// For a group: its state after this write, if it changed.
    pub group: Option<GroupMeta>,
    /// For a group: accounts that joined (true) or left (false) it.
    pub memberships: Vec<(AccountId, bool)>,
    /// Cluster mode: the writer's ownership epoch of `account`. The store
    /// refuses the whole write with [`StoreError::Fenced`] unless it is the
    /// account's current epoch ([`LeaseStore::acquire`]); `None` (one node)
    /// writes unconditionally.
    pub epoch: Option<u64>,
}

impl AccountWrite {
    pub fn new(account: AccountId) -> Self {
        Self {
            account,
            appends: Vec::new(),
            replaces: Vec::new(),
            outbox_puts: Vec::new(),
            outbox_deletes: Vec::new(),
            counters: None,
            client_ids: Vec::new(),
            inbound: Vec::new(),
            cursors: Vec::new(),
            receipts: Vec::new(),
            read_markers: Vec::new(),
            received: Vec::new(),
            contacts: Vec::new(),
            group: None,
            memberships: Vec::new(),
            epoch: None,
        }
    }

    /// A group's forwards are stored as references into its own log, so
    /// they may only carry its own events. Backends check this before the
    /// write joins a group commit, so a bad write fails alone.
    pub fn check_group_forwards(&self) -> Result<(), StoreError> {
        for (_, item) in &self.outbox_puts {
            if let skylark_core::message::Forward::Group(e) = &item.forward
                && e.group != self.account
            {
                return Err(StoreError::Invariant(format!("outbox of {} holds an event of {}", self.account, e.group)));
            }
        }
        Ok(())
    }

    /// The expiry index rows this write adds: (expires at, sequence) of
    /// every appended disappearing message or post.
    pub fn expiries(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.appends.iter().filter_map(|(seq, entry)| Some((entry_meta(entry)?.expires_at_ms?, *seq)))
    }

    pub fn is_empty(&self) -> bool {
        self.appends.is_empty()
            && self.replaces.is_empty()
            && self.outbox_puts.is_empty()
            && self.outbox_deletes.is_empty()
            && self.counters.is_none()
            && self.client_ids.is_empty()
            && self.inbound.is_empty()
            && self.cursors.is_empty()
            && self.receipts.is_empty()
            && self.read_markers.is_empty()
            && self.received.is_empty()
            && self.contacts.is_empty()
            && self.group.is_none()
            && self.memberships.is_empty()
    }
}

/// The meta of a message or a group post (`None` for other entries).
pub fn entry_meta(entry: &LogEntry) -> Option<&skylark_core::message::Meta> {
    match entry {
        LogEntry::Message(m) => Some(&m.meta),
        LogEntry::Group(e) => e.post_meta(),
        _ => None,
    }
}

/// `entry` with its payload purged, if it is a message or a post that is
/// not purged yet.
pub fn purged_entry(entry: &LogEntry) -> Option<LogEntry> {
    match entry {
        LogEntry::Message(m) if !m.meta.purged => Some(LogEntry::Message(std::sync::Arc::new(m.purged()))),
        LogEntry::Group(e) if e.post_meta().is_some_and(|m| !m.purged) => {
            Some(LogEntry::Group(std::sync::Arc::new(e.purged())))
        }
        _ => None,
    }
}

/// Whether `entry` is the message `id` (for a group post: `id.sender` is
/// the group and `id.seq` the group sequence).
pub fn is_message(entry: &LogEntry, id: skylark_core::message::MessageId) -> bool {
    match entry {
        LogEntry::Message(m) => m.id == id,
        LogEntry::Group(e) => e.group == id.sender && e.seq == id.seq && e.post_meta().is_some(),
        _ => false,
    }
}

/// Log entries read per page while looking for a message's copy.
const FIND_PAGE: usize = 256;

/// Sequence counters of an account: the next log sequence and the next
/// outbox sequence. Both only ever grow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    pub next_seq: u64,
    pub next_outbox: u64,
}

impl Default for Counters {
    fn default() -> Self {
        Self { next_seq: 1, next_outbox: 1 }
    }
}

/// Receipt high-water marks of one account, per peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReceiptState {
    /// Peer → (highest of this account's seqs the peer received, … read).
    pub received: Vec<(AccountId, u64, u64)>,
    /// Peer → highest of the peer's seqs this account marked read.
    pub read_markers: Vec<(AccountId, u64)>,
}

/// What an actor loads when it starts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccountState {
    pub counters: Counters,
    /// Outbox items not yet acknowledged, by ascending outbox sequence.
    pub outbox: Vec<(u64, OutboxItem)>,
}

/// The message path's storage: per-account logs, outboxes, cursors and
/// deduplication state.
#[async_trait]
pub trait MessageStore: Send + Sync {
    /// Applies every change in `write` atomically. Durable (fsync'd or
    /// committed) when it returns `Ok`; on `Err` nothing of it was applied.
    async fn apply(&self, write: AccountWrite) -> Result<(), StoreError>;

    /// Counters and pending outbox of an account (defaults for a new one).
    async fn account_state(&self, account: AccountId) -> Result<AccountState, StoreError>;

    /// Up to `limit` accounts and groups above `after` (from the lowest when
    /// `None`) whose outbox holds forwards not yet acknowledged, ascending.
    /// At start the server wakes their actors, so a forward left over from
    /// before a restart goes on even if its sender never comes back.
    async fn pending_outboxes(&self, after: Option<AccountId>, limit: usize) -> Result<Vec<AccountId>, StoreError>;

    /// Up to `limit` log entries with sequence ≥ `from`, ascending.
    async fn read_log(&self, account: AccountId, from: u64, limit: usize) -> Result<Vec<(u64, LogEntry)>, StoreError>;

    /// Up to `limit` log entries with sequence < `before`, newest first.
    async fn read_log_before(
        &self,
        account: AccountId,
        before: u64,
        limit: usize,
    ) -> Result<Vec<(u64, LogEntry)>, StoreError>;

    /// Where `account`'s log holds the message `id` (a 1:1 message, or a
    /// group post: `id.sender` is then the group), with the entry. In the
    /// sender's own log (`id.sender == account`) that is `id.seq`; a copy
    /// elsewhere is searched newest first, down to entries made before
    /// `since_ms` (a copy is never older than the message itself).
    async fn find_message(
        &self,
        account: AccountId,
        id: skylark_core::message::MessageId,
        since_ms: u64,
    ) -> Result<Option<(u64, LogEntry)>, StoreError> {
        if id.sender == account {
            let found = self.read_log(account, id.seq, 1).await?.into_iter().next();
            return Ok(found.filter(|(seq, entry)| *seq == id.seq && is_message(entry, id)));
        }
        let mut before = u64::MAX;
        loop {
            let page = self.read_log_before(account, before, FIND_PAGE).await?;
            let Some(&(oldest, _)) = page.last() else { return Ok(None) };
            for (seq, entry) in page {
                if is_message(&entry, id) {
                    return Ok(Some((seq, entry)));
                }
                if entry.at_ms() < since_ms {
                    return Ok(None);
                }
            }
            before = oldest;
        }
    }

    /// Purges the payload of up to `limit` disappearing messages and posts
    /// whose time came (`expires_at_ms <= now_ms`), in every log, and drops
    /// them from the expiry index; durable when it returns. Returns how
    /// many index rows it handled (fewer than `limit`: none are left due).
    async fn expire(&self, now_ms: u64, limit: usize) -> Result<usize, StoreError>;

    /// Whether `account` ever sent a message to `peer`.
    async fn is_contact(&self, account: AccountId, peer: AccountId) -> Result<bool, StoreError>;

    /// Every receipt high-water mark of the account: (peer, delivered, read)
    /// received from peers, and its own read markers (peer, up_to).
    async fn receipt_state(&self, account: AccountId) -> Result<ReceiptState, StoreError>;

    /// The log sequence of the message a device sent with `client_id`, if any.
    async fn client_id(&self, account: AccountId, device: DeviceId, client_id: &str)
    -> Result<Option<u64>, StoreError>;

    /// Highest outbox sequence applied from `source` (0 if none).
    async fn inbound(&self, account: AccountId, source: AccountId) -> Result<u64, StoreError>;

    /// The device's delivery cursor, if it has one.
    async fn cursor(&self, account: AccountId, device: DeviceId) -> Result<Option<u64>, StoreError>;

    /// Highest receipt of `kind` received from `peer` (0 if none).
    async fn receipt(&self, account: AccountId, peer: AccountId, kind: ReceiptKind) -> Result<u64, StoreError>;

    /// Highest sequence of `peer`'s messages this account marked read (0 if none).
    async fn read_marker(&self, account: AccountId, peer: AccountId) -> Result<u64, StoreError>;

    /// Highest of `peer`'s sequence numbers this account received, as
    /// recorded by [`AccountWrite::received`] (0 if none). Independent of
    /// receipts and read markers.
    async fn received(&self, account: AccountId, peer: AccountId) -> Result<u64, StoreError>;
}

/// Groups: ids, current state and the membership index. A group's log,
/// outbox and receipts live in [`MessageStore`] under the group's id; its
/// state and memberships are written through [`AccountWrite`].
#[async_trait]
pub trait GroupStore: Send + Sync {
    /// A fresh group id, never handed out before. Durable when it returns.
    async fn allocate_group(&self) -> Result<AccountId, StoreError>;

    async fn group(&self, id: AccountId) -> Result<Option<GroupMeta>, StoreError>;

    /// The groups `account` is a member of now, by ascending id.
    async fn groups_of(&self, account: AccountId) -> Result<Vec<AccountId>, StoreError>;
}

/// Every domain store of one backend.
/// A node of a cluster, as its last heartbeat described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    pub id: String,
    /// Where devices and operators reach it (`host:port`).
    pub address: String,
    /// Set by `skylark cluster drain`: the node hands its actors away.
    pub draining: bool,
}

/// What a heartbeat learnt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Beat {
    /// Nodes whose last heartbeat is within the lease, this one included.
    pub live: Vec<NodeRecord>,
    /// This node's previous heartbeat had expired: the others may have
    /// taken its actors over, so what it holds in memory is suspect.
    pub lapsed: bool,
    /// An operator asked this node to drain.
    pub draining: bool,
}

/// The outcome of asking for an actor's ownership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Acquired {
    /// This node owns the actor; its writes carry this epoch.
    Owned(u64),
    /// A live node holds it (it will release it when it sees it should).
    HeldBy(String),
}

/// Cluster membership and actor ownership (cluster mode, PostgreSQL only).
/// Times are the database's clock, so nodes' clocks need not agree.
#[async_trait]
pub trait LeaseStore: Send + Sync {
    /// Records a heartbeat of `node` (a lease of `lease_ms`) and returns
    /// the live nodes.
    async fn beat(&self, node: &str, address: &str, lease_ms: u64) -> Result<Beat, StoreError> {
        let _ = (node, address, lease_ms);
        Err(cluster_needs_postgres())
    }

    /// The live nodes, read without beating (for operators' tools).
    async fn members(&self) -> Result<Vec<NodeRecord>, StoreError> {
        Err(cluster_needs_postgres())
    }

    /// Removes `node` from the membership at once (a clean stop).
    async fn leave(&self, node: &str) -> Result<(), StoreError> {
        let _ = node;
        Err(cluster_needs_postgres())
    }

    /// Marks `node` as draining (or not).
    async fn set_draining(&self, node: &str, draining: bool) -> Result<bool, StoreError> {
        let _ = (node, draining);
        Err(cluster_needs_postgres())
    }

    /// Takes ownership of `actor` for `node` with a new epoch, if it is
    /// free, released, held by `node` itself or by a node not in `live`.
    async fn acquire(&self, actor: AccountId, node: &str, live: &[String]) -> Result<Acquired, StoreError> {
        let _ = (actor, node, live);
        Err(cluster_needs_postgres())
    }

    /// Gives up ownership of `actor` if `epoch` is still current.
    async fn release(&self, actor: AccountId, epoch: u64) -> Result<(), StoreError> {
        let _ = (actor, epoch);
        Err(cluster_needs_postgres())
    }
}

fn cluster_needs_postgres() -> StoreError {
    StoreError::Unusable("cluster mode needs the PostgreSQL store (--store postgres://…)".into())
}

pub trait Store:
    AccountStore + VerificationStore + MetaStore + MessageStore + SettingsStore + GroupStore + LeaseStore + KeyPackageStore
{
}

impl<T> Store for T where
    T: AccountStore
        + VerificationStore
        + MetaStore
        + MessageStore
        + SettingsStore
        + GroupStore
        + LeaseStore
        + KeyPackageStore
{
}
