//! The embedded backend: one redb database file.
//!
//! redb is synchronous, so reads and rare writes run on tokio's blocking
//! pool. Every write transaction commits with `Durability::Immediate`
//! (fsync) before the call returns. Account, device and verification
//! records are JSON (small, rare, easy to inspect); log entries and outbox
//! items use the compact binary encoding of [`crate::record`].
//!
//! **Group commit.** [`MessageStore::apply`] hands its write to one
//! committer thread, which takes every write already queued (up to
//! `max_batch`), applies them all in one transaction and fsyncs once, then
//! answers each caller. Throughput comes from batching; no write is
//! acknowledged before the fsync that covers it.

use crate::record::{
    INBOUND_SLOT, OwnMarks, PeerMarks, READ_MARKER_SLOT, RECEIVED_SLOT, StoredOutbox, decode_entry, decode_outbox,
    encode_entry, encode_outbox, kind_byte, receipt_state,
};
use crate::{
    AccountState, AccountStore, AccountWrite, AddDeviceError, ClaimedKey, Counters, GroupStore, KeyPackageStore,
    KeyStock, LeaseStore, MessageStore, MetaStore, PushTarget, ReceiptState, Registration, SettingsStore, StoreError,
    VerificationStore, Visibility,
};
use async_trait::async_trait;
use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, TableDefinition, TableHandle};
use serde::Serialize;
use serde::de::DeserializeOwned;
use skylark_core::group::GroupMeta;
use skylark_core::message::{Forward, LogEntry, OutboxItem, ReceiptKind};
use skylark_core::verification::VerificationSession;
use skylark_core::{Account, AccountId, Device, DeviceId, NewDevice, PhoneNumber};
use std::path::Path;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot, watch};

pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
pub(crate) const ACCOUNTS: TableDefinition<u64, &[u8]> = TableDefinition::new("accounts");
const PHONES: TableDefinition<&str, u64> = TableDefinition::new("phones");
pub(crate) const DEVICES: TableDefinition<u64, &[u8]> = TableDefinition::new("devices");
/// (account id, device id) of every active device, for listing an account's devices.
const ACCOUNT_DEVICES: TableDefinition<(u64, u64), ()> = TableDefinition::new("account_devices");
pub(crate) const VERIFICATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("verifications");
/// (expires at, account, seq) of every disappearing message or post whose
/// payload is not purged yet, soonest first.
pub(crate) const EXPIRIES: TableDefinition<(u64, u64, u64), ()> = TableDefinition::new("expiries");
/// (account, outbox seq) → encoded outbox item.
pub(crate) const OUTBOX: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("outbox");
/// (account, device, client id) → log seq of that message.
pub(crate) const CLIENT_IDS: TableDefinition<(u64, u64, &str), u64> = TableDefinition::new("client_ids");
/// One account's log and marks, side by side: (account, [`LOG_ROW`], seq)
/// → encoded log entry; (account, [`MARK_ROW`], [`OWN`]) → [`OwnMarks`]
/// (the account's sequence counters and its devices' delivery cursors);
/// (account, [`MARK_ROW`], peer) → [`PeerMarks`] (receipts from the peer,
/// the read marker, how far the peer's messages were received and its
/// outbox applied, whether the account wrote to it).
///
/// Why one table: what a message changes at one end — an entry appended
/// to the log, the counters, the marks about the other end — lies in one
/// key range, the log's newest entries right before the own row, so a
/// commit rewrites one or two B-tree pages for it instead of one in each
/// of four tables, and opens one table instead of four. Until store
/// format 4 these were six tables (`log`, `counters`, `cursors`,
/// `inbound`, `receipts`, `contacts`; see [`legacy`]). Each rewritten
/// page and each table a commit opens is most of what a message costs
/// the server (docs/BENCHMARKS.md).
pub(crate) const ROWS: TableDefinition<(u64, u8, u64), &[u8]> = TableDefinition::new("account_rows");
/// The kind of [`ROWS`] row that holds a log entry.
pub(crate) const LOG_ROW: u8 = 0;
/// The kind of [`ROWS`] row that holds marks.
pub(crate) const MARK_ROW: u8 = 1;
/// The peer number of an account's own marks row: no account has id 0
/// (ids start at 1).
pub(crate) const OWN: u64 = 0;
/// account → presence visibility (JSON).
pub(crate) const SETTINGS: TableDefinition<u64, &[u8]> = TableDefinition::new("settings");
/// (account, peer) → when the account blocked the peer.
pub(crate) const BLOCKS: TableDefinition<(u64, u64), u64> = TableDefinition::new("blocks");
/// (account, peer) → the name the account gave that contact.
pub(crate) const CONTACT_NAMES: TableDefinition<(u64, u64), &str> = TableDefinition::new("contact_names");
/// account → its profile (JSON).
pub(crate) const PROFILES: TableDefinition<u64, &[u8]> = TableDefinition::new("profiles");
/// account → its two-step verification PIN record (JSON).
pub(crate) const PINS: TableDefinition<u64, &[u8]> = TableDefinition::new("pins");
/// report id → a user's report of a conversation (JSON).
pub(crate) const REPORTS: TableDefinition<u64, &[u8]> = TableDefinition::new("reports");
/// device → push target (JSON).
pub(crate) const PUSH: TableDefinition<u64, &[u8]> = TableDefinition::new("push");
/// (device, n) → one unclaimed MLS key package; the lowest n is claimed
/// first.
pub(crate) const KEY_PACKAGES: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("key_packages");
/// device → its last-resort key package (never consumed by a claim).
pub(crate) const LAST_RESORT_KEYS: TableDefinition<u64, &[u8]> = TableDefinition::new("last_resort_keys");
/// Group id → its current state (JSON).
pub(crate) const GROUPS: TableDefinition<u64, &[u8]> = TableDefinition::new("groups");
/// (member account, group id): the account is a member of the group now.
pub(crate) const MEMBERSHIPS: TableDefinition<(u64, u64), ()> = TableDefinition::new("memberships");

/// Writes waiting for the committer. Deep enough to hold a burst from every
/// active actor; a full queue makes callers wait (back-pressure).
const COMMIT_QUEUE: usize = 8192;
/// Default upper bound on writes merged into one transaction.
pub const DEFAULT_MAX_BATCH: usize = 1024;

/// How much lower than the rest of the server the committer thread runs by
/// default (added to its nice value; Linux clamps the sum at 19):
/// [`RedbOptions::committer_nice`].
///
/// Where the server shares a core with its committer (a one-core host, or
/// a busy one), the committer at the same priority took the core as soon as
/// one write was queued and committed a dozen writes at a time, each
/// commit's fixed cost (table roots, page checksums, an fsync) paid again
/// while the network threads waited with more writes to hand it. Lower, it
/// runs when the network threads have nothing ready (at once on an idle
/// server, so a lone write waits no longer) and otherwise gets its fair
/// share of a contended core, and it finds every write made meanwhile
/// queued: 50 to 85 writes per commit instead of 11 to 13 at 3,000 msgs/s
/// on one core (docs/BENCHMARKS.md, step 8). With a core to itself it
/// never waits for one, whatever its priority.
pub const COMMITTER_NICE: u8 = 10;

/// The embedded store's tuning, with [`Default`] the server's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RedbOptions {
    /// Upper bound on writes merged into one commit; 1 commits (and fsyncs)
    /// every write on its own, for comparison benchmarks.
    pub max_batch: usize,
    /// How many nice levels below the thread that opens the store its
    /// committer runs: 0 for the same priority. A nice value weighs against
    /// every thread of the host, so where other programs keep the CPU busy
    /// an operator may want 0 ([`COMMITTER_NICE`] explains the default).
    pub committer_nice: u8,
}

impl Default for RedbOptions {
    fn default() -> Self {
        Self { max_batch: DEFAULT_MAX_BATCH, committer_nice: COMMITTER_NICE }
    }
}

/// Lowers the calling thread's priority by `by` nice levels. On Linux a
/// nice value belongs to one thread, and raising it needs no privilege;
/// elsewhere nothing changes.
fn yield_to_the_network(by: u8) {
    #[cfg(target_os = "linux")]
    if by > 0 {
        let me = rustix::thread::gettid();
        let now = rustix::process::getpriority_process(Some(me)).unwrap_or(0);
        if let Err(e) = rustix::process::setpriority_process(Some(me), now.saturating_add(i32::from(by))) {
            tracing::warn!(error = %e, "the store's committer could not lower its priority; it competes with the network threads for the CPU");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = by;
}

type CommitJob = (AccountWrite, oneshot::Sender<Answer>);

/// What the committer answers a write: its result, and the other writes of
/// the same commit with theirs, for the task that receives it to answer.
///
/// A wake from the committer thread wakes the runtime's worker thread,
/// which runs at a higher priority ([`COMMITTER_NICE`]) and so takes a
/// shared core at once: a committer answering each write of a commit
/// itself paid a switch of threads, there and back, for every one (a tenth
/// of the server's CPU at 3,000 msgs/s). It answers one, and that task,
/// running on the worker, answers the rest, where a wake is a push on the
/// worker's own queue. An answer dropped unread (its task was cancelled)
/// or that could not be sent still answers the rest, as it drops.
struct Answer {
    result: Result<(), StoreError>,
    rest: Vec<(oneshot::Sender<Answer>, Result<(), StoreError>)>,
}

impl Answer {
    /// This write's result, once the rest are answered.
    fn into_result(mut self) -> Result<(), StoreError> {
        std::mem::replace(&mut self.result, Ok(()))
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        for (reply, result) in self.rest.drain(..) {
            let _ = reply.send(Answer { result, rest: Vec::new() });
        }
    }
}

const NEXT_ACCOUNT_ID: &str = "next_account_id";
const NEXT_REPORT_ID: &str = "next_report_id";
const NEXT_DEVICE_ID: &str = "next_device_id";
const SERVER_ID: &str = "server_id";

#[derive(Clone)]
pub struct RedbStore {
    pub(crate) db: Arc<Database>,
    committer: Arc<Committer>,
    /// Set, once and for good, when the disk failed a write (see
    /// [`RedbStore::disk_failure`]).
    failed: tokio::sync::watch::Receiver<Option<String>>,
}

/// The committer thread and its queue. Dropping the last handle closes the
/// queue and waits for the thread to finish what was queued, so the
/// database is closed (and can be reopened) when the store is gone.
struct Committer {
    queue: Option<mpsc::Sender<CommitJob>>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The committer thread's id once it has set its priority (0 before),
    /// for the tests that read its nice value back.
    #[cfg_attr(not(test), allow(dead_code))]
    tid: Arc<std::sync::atomic::AtomicI32>,
}

impl Drop for Committer {
    fn drop(&mut self) {
        self.queue.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore").finish_non_exhaustive()
    }
}

/// Opens the file with redb, turning both its errors and its panics (a
/// truncated file trips an assertion inside redb) into a reason. The
/// default panic hook is silenced meanwhile, so an operator sees one clear
/// message instead of a backtrace from inside the storage engine; this
/// runs once, at start.
fn open_file(path: &Path) -> Result<Database, String> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let opened = std::panic::catch_unwind(|| {
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path)?;
        Database::builder().create_with_backend(TimedSync(redb::backends::FileBackend::new(file)?))
    });
    std::panic::set_hook(hook);
    match opened {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(e)) => Err(e.to_string()),
        Err(panic) => Err(panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "the storage engine gave up reading it".into())),
    }
}

/// The store's file, with each fsync timed (`skylark_store_fsync_seconds`):
/// a commit's time is its transaction and its fsync, and an operator
/// needs to tell a slow disk from a busy engine.
#[derive(Debug)]
struct TimedSync(redb::backends::FileBackend);

impl redb::StorageBackend for TimedSync {
    fn len(&self) -> Result<u64, std::io::Error> {
        self.0.len()
    }

    fn read(&self, offset: u64, len: usize) -> Result<Vec<u8>, std::io::Error> {
        self.0.read(offset, len)
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        self.0.set_len(len)
    }

    fn sync_data(&self, eventual: bool) -> Result<(), std::io::Error> {
        let started = std::time::Instant::now();
        let synced = self.0.sync_data(eventual);
        metrics::histogram!("skylark_store_fsync_seconds").record(started.elapsed().as_secs_f64());
        synced
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        self.0.write(offset, data)
    }
}

/// Calls the macro `$m` with every table: the one list that whatever must
/// see them all (the backup and its test) goes by.
macro_rules! every_table {
    ($m:ident) => {
        $m!(
            META,
            ACCOUNTS,
            PHONES,
            DEVICES,
            ACCOUNT_DEVICES,
            VERIFICATIONS,
            ROWS,
            EXPIRIES,
            OUTBOX,
            CLIENT_IDS,
            SETTINGS,
            BLOCKS,
            PINS,
            CONTACT_NAMES,
            PROFILES,
            REPORTS,
            PUSH,
            KEY_PACKAGES,
            LAST_RESORT_KEYS,
            GROUPS,
            MEMBERSHIPS
        )
    };
}

/// Copies every row of one table from a snapshot into a new database.
fn copy_table<K: redb::Key + 'static, V: redb::Value + 'static>(
    from: &redb::ReadTransaction,
    to: &redb::WriteTransaction,
    table: TableDefinition<K, V>,
) -> Result<u64, StoreError> {
    let source = from.open_table(table)?;
    let mut dest = to.open_table(table)?;
    let mut rows = 0;
    for row in source.iter()? {
        let (k, v) = row?;
        dest.insert(k.value(), v.value())?;
        rows += 1;
    }
    Ok(rows)
}

/// Writes a copy of `db` as it is at one instant (a read transaction's
/// snapshot; writers go on meanwhile) to `dest`: into a temporary file
/// beside it, committed durably and synced, then renamed into place and the
/// directory synced, so `dest` is either the whole copy or absent.
fn backup_to(db: &Database, dest: &Path) -> Result<crate::Backup, StoreError> {
    let unusable = |what: &str, e: &dyn std::fmt::Display| {
        StoreError::Unusable(format!("the backup to {} failed: {what} ({e})", dest.display()))
    };
    if dest.exists() {
        return Err(StoreError::Unusable(format!(
            "{} exists already; choose a new file name for the backup (nothing was written)",
            dest.display()
        )));
    }
    let dir = match dest.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let name = dest.file_name().ok_or_else(|| unusable("no file name", &dest.display()))?;
    let tmp = dir.join(format!(".{}.partial", name.to_string_lossy()));
    let _ = std::fs::remove_file(&tmp);
    let snapshot = db.begin_read()?;
    let copy = Database::create(&tmp).map_err(|e| unusable("cannot create the file", &e))?;
    let result = (|| {
        let txn = copy.begin_write()?;
        let mut rows = 0;
        macro_rules! copy {
            ($($table:expr),* $(,)?) => {{ $( rows += copy_table(&snapshot, &txn, $table)?; )* }};
        }
        every_table!(copy);
        // A table this list forgets would be missing from every backup:
        // refuse rather than write an incomplete one.
        let names = |tables: Vec<String>| tables.into_iter().collect::<std::collections::BTreeSet<_>>();
        let have = names(snapshot.list_tables()?.map(|t| t.name().to_owned()).collect());
        let copied = names(txn.list_tables()?.map(|t| t.name().to_owned()).collect());
        if let Some(missing) = have.difference(&copied).next() {
            return Err(StoreError::Invariant(format!("the backup does not copy the table {missing}")));
        }
        txn.commit()?;
        Ok(rows)
    })();
    drop(copy);
    let rows = match result {
        Ok(rows) => rows,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    crate::sync_path(&tmp).map_err(|e| unusable("cannot sync the file", &e))?;
    std::fs::rename(&tmp, dest).map_err(|e| unusable("cannot move the file into place", &e))?;
    crate::sync_path(&dir).map_err(|e| unusable("cannot sync the directory", &e))?;
    let bytes = std::fs::metadata(dest).map(|m| m.len()).unwrap_or(0);
    Ok(crate::Backup { rows, bytes })
}

fn backend<E: std::error::Error + Send + Sync + 'static>(e: E) -> StoreError {
    StoreError::backend(e)
}

/// Whether `e` is the disk failing (an I/O error, or redb refusing to go on
/// after one), rather than a bad record or a broken invariant.
fn disk_failed(e: &StoreError) -> bool {
    let StoreError::Backend(inner) = e else { return false };
    let inner: &(dyn std::error::Error + Send + Sync + 'static) = &**inner;
    let storage = |s: &redb::StorageError| matches!(s, redb::StorageError::Io(_) | redb::StorageError::PreviousIo);
    if let Some(s) = inner.downcast_ref::<redb::StorageError>() {
        return storage(s);
    }
    if let Some(redb::CommitError::Storage(s)) = inner.downcast_ref::<redb::CommitError>() {
        return storage(s);
    }
    if let Some(redb::TransactionError::Storage(s)) = inner.downcast_ref::<redb::TransactionError>() {
        return storage(s);
    }
    if let Some(redb::TableError::Storage(s)) = inner.downcast_ref::<redb::TableError>() {
        return storage(s);
    }
    matches!(inner.downcast_ref::<redb::Error>(), Some(redb::Error::Io(_) | redb::Error::PreviousIo))
}

/// redb's errors become backend errors with their source kept, so `?`
/// works on every redb call.
macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::backend(e)
            }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// The layout of the stored tables and records, kept in `meta` under
/// `format`. A binary refuses a store of a newer format and upgrades an
/// older one in `init`. Stores written before the version was recorded are
/// format 1; format 2 added the `blocks`, `pins`, `reports`, `profiles` and
/// `contact_names` tables and the block and contact-name log entries (the
/// upgrade from 1 creates the tables, as for a new store).
/// Format 3 added the `expiries` table and the meta section of messages
/// and posts (edits, deletes, expiry, purged), which format 2 binaries
/// cannot read. Format 4 merged the log and five tables of small marks
/// into `account_rows` ([`ROWS`]); the upgrade moves their rows over
/// ([`legacy::upgrade`]).
pub const FORMAT_VERSION: u64 = 4;
const FORMAT: &str = "format";
/// `meta` keys of banned numbers: this prefix, then the number.
const BAN: &str = "ban:";

impl RedbStore {
    /// Opens (or creates) the database file at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_with(path, RedbOptions::default())
    }

    /// Opens with explicit [`RedbOptions`].
    ///
    /// A file that exists but is empty, or that redb cannot read, is
    /// refused with [`StoreError::Unusable`] naming it: a server must never
    /// start silently without its accounts, nor crash without saying why.
    pub fn open_with(path: &Path, options: RedbOptions) -> Result<Self, StoreError> {
        let restore = "Restore it from a backup, or move it away to start a server with no accounts.";
        if std::fs::metadata(path).is_ok_and(|m| m.len() == 0) {
            return Err(StoreError::Unusable(format!(
                "the store file {} is empty (0 bytes), so every account would be gone. {restore}",
                path.display()
            )));
        }
        let db = open_file(path).map_err(|why| {
            if why.contains("already open") {
                return StoreError::Unusable(format!(
                    "the store file {} is in use by another process (a running server?); stop it first",
                    path.display()
                ));
            }
            StoreError::Unusable(format!(
                "the store file {} is damaged and cannot be read ({why}). {restore}",
                path.display()
            ))
        })?;
        let store = Self::init(db, options).map_err(|e| match e {
            StoreError::Unusable(why) => StoreError::Unusable(format!("the store file {}: {why}", path.display())),
            other => other,
        })?;
        // The file's name is durable only once its directory is synced: a
        // store created just now could otherwise vanish whole in a power
        // cut, with everything committed to it since.
        crate::sync_parent(path).map_err(|e| {
            StoreError::Unusable(format!("cannot sync the directory of the store file {}: {e}", path.display()))
        })?;
        Ok(store)
    }

    /// A store that lives in memory only, for tests.
    pub fn in_memory() -> Result<Self, StoreError> {
        let db = Database::builder().create_with_backend(redb::backends::InMemoryBackend::new())?;
        Self::init(db, RedbOptions::default())
    }

    /// Creates every table up front so read transactions never meet a
    /// missing one, and starts the committer thread.
    fn init(db: Database, options: RedbOptions) -> Result<Self, StoreError> {
        let txn = db.begin_write()?;
        let mut upgrade_marks = false;
        {
            let mut meta = txn.open_table(META)?;
            let stored = match meta.get(FORMAT)? {
                Some(v) => Some(u64::from_be_bytes(
                    v.value().try_into().map_err(|_| StoreError::Corrupt("the format version".into()))?,
                )),
                None => None,
            };
            match stored {
                Some(version) if version > FORMAT_VERSION => {
                    return Err(StoreError::Unusable(format!(
                        "it was written by a newer Skylark (store format {version}; this binary reads up to \
                         {FORMAT_VERSION}). Run the newer binary, or restore a backup made by this version."
                    )));
                }
                Some(version) if version == FORMAT_VERSION => {}
                // Older formats: every table is created below, which is all
                // an upgrade from 1 to 3 needs; 4 moves the marks.
                Some(_) | None => {
                    meta.insert(FORMAT, &FORMAT_VERSION.to_be_bytes()[..])?;
                    upgrade_marks = true;
                }
            }
        }
        if upgrade_marks {
            legacy::upgrade(&txn)?;
        }
        txn.open_table(ACCOUNTS)?;
        txn.open_table(PHONES)?;
        txn.open_table(DEVICES)?;
        txn.open_table(ACCOUNT_DEVICES)?;
        txn.open_table(VERIFICATIONS)?;
        txn.open_table(ROWS)?;
        txn.open_table(EXPIRIES)?;
        txn.open_table(OUTBOX)?;
        txn.open_table(CLIENT_IDS)?;
        txn.open_table(SETTINGS)?;
        txn.open_table(BLOCKS)?;
        txn.open_table(PINS)?;
        txn.open_table(REPORTS)?;
        txn.open_table(CONTACT_NAMES)?;
        txn.open_table(PROFILES)?;
        txn.open_table(PUSH)?;
        txn.open_table(KEY_PACKAGES)?;
        txn.open_table(LAST_RESORT_KEYS)?;
        txn.open_table(GROUPS)?;
        txn.open_table(MEMBERSHIPS)?;
        txn.commit()?;
        let db = Arc::new(db);
        let (queue, jobs) = mpsc::channel(COMMIT_QUEUE);
        let (fail, failed) = watch::channel(None);
        let thread_db = db.clone();
        let tid = Arc::new(std::sync::atomic::AtomicI32::new(0));
        let thread_tid = tid.clone();
        let thread = std::thread::Builder::new()
            .name("skylark-commit".into())
            .spawn(move || {
                yield_to_the_network(options.committer_nice);
                #[cfg(target_os = "linux")]
                thread_tid.store(rustix::thread::gettid().as_raw_nonzero().get(), std::sync::atomic::Ordering::Release);
                #[cfg(not(target_os = "linux"))]
                drop(thread_tid);
                commit_loop(&thread_db, jobs, options.max_batch.max(1), &fail)
            })
            .map_err(backend)?;
        let committer = Committer { queue: Some(queue), thread: Some(thread), tid };
        Ok(Self { db, committer: Arc::new(committer), failed })
    }

    /// Says why, once the disk has failed a write (an fsync that reported
    /// EIO, say). From then on the store refuses every write and the
    /// process must start again from what the disk holds: after a failed
    /// fsync the kernel may have dropped the data while reporting the next
    /// fsync as a success, so trying again could acknowledge a write that
    /// is not on disk. `skylark serve` exits when this fires and leaves the
    /// restart to its supervisor.
    pub fn disk_failure(&self) -> watch::Receiver<Option<String>> {
        self.failed.clone()
    }

    /// Runs blocking database work (writes, which fsync) off the async runtime.
    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db)).await.map_err(backend)?
    }

    /// Runs a read transaction right here, on the calling task. Reads of a
    /// few B-tree pages take microseconds when cached; a round trip through
    /// the blocking pool costs two thread switches, which profiling showed
    /// to be over a quarter of the server's CPU on the connect path
    /// (docs/BENCHMARKS.md). Only writes, which wait for fsync, leave the
    /// runtime.
    fn read<T>(&self, f: impl FnOnce(&Database) -> Result<T, StoreError>) -> Result<T, StoreError> {
        f(&self.db)
    }

    /// Runs `f` in a write transaction and commits it durably.
    async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&redb::WriteTransaction) -> Result<T, StoreError> + Send + 'static,
    {
        self.blocking(move |db| {
            let mut txn = db.begin_write()?;
            txn.set_durability(Durability::Immediate);
            let out = f(&txn)?;
            txn.commit()?;
            Ok(out)
        })
        .await
    }
}

impl RedbStore {
    async fn receipt_slot(&self, account: AccountId, peer: AccountId, slot: u8) -> Result<u64, StoreError> {
        self.read(move |db| {
            let txn = db.begin_read()?;
            Ok(peer_marks(&txn.open_table(ROWS)?, account.0, peer.0)?.slot(slot).unwrap_or(0))
        })
    }
}

/// A device record that an index entry names; its absence means the
/// store is inconsistent.
fn indexed_device(devices: &impl ReadableTable<u64, &'static [u8]>, id: u64) -> Result<Device, StoreError> {
    let raw = devices.get(id)?;
    let raw = raw.ok_or_else(|| StoreError::Corrupt(format!("index names missing device {id}")))?;
    decode(raw.value())
}

fn next_id(txn: &redb::WriteTransaction, key: &str) -> Result<u64, StoreError> {
    let mut meta = txn.open_table(META)?;
    let current = match meta.get(key)? {
        Some(v) => {
            let bytes: [u8; 8] = v.value().try_into().map_err(|_| StoreError::Corrupt(format!("meta {key}")))?;
            u64::from_be_bytes(bytes)
        }
        None => 1,
    };
    meta.insert(key, &(current + 1).to_be_bytes()[..])?;
    Ok(current)
}

fn read_counters(txn: &redb::WriteTransaction, account: u64) -> Result<Counters, StoreError> {
    Ok(own_marks(&txn.open_table(ROWS)?, account)?.counters.unwrap_or_default())
}

/// The account's own row of [`ROWS`] (empty when it has none yet).
fn own_marks(table: &impl ReadableTable<(u64, u8, u64), &'static [u8]>, account: u64) -> Result<OwnMarks, StoreError> {
    match table.get((account, MARK_ROW, OWN))? {
        Some(raw) => OwnMarks::decode(raw.value()),
        None => Ok(OwnMarks::default()),
    }
}

/// The account's row about `peer` in [`ROWS`] (empty when it has none;
/// always for peer 0, which is no account).
fn peer_marks(
    table: &impl ReadableTable<(u64, u8, u64), &'static [u8]>,
    account: u64,
    peer: u64,
) -> Result<PeerMarks, StoreError> {
    if peer == OWN {
        return Ok(PeerMarks::default());
    }
    match table.get((account, MARK_ROW, peer))? {
        Some(raw) => PeerMarks::decode(raw.value()),
        None => Ok(PeerMarks::default()),
    }
}

/// The row about `peer` among those a write is changing, read from
/// [`ROWS`] the first time.
fn loaded<'m>(
    rows: &'m mut std::collections::BTreeMap<u64, PeerMarks>,
    table: &impl ReadableTable<(u64, u8, u64), &'static [u8]>,
    account: u64,
    peer: u64,
) -> Result<&'m mut PeerMarks, StoreError> {
    Ok(match rows.entry(peer) {
        std::collections::btree_map::Entry::Occupied(row) => row.into_mut(),
        std::collections::btree_map::Entry::Vacant(row) => row.insert(peer_marks(table, account, peer)?),
    })
}

/// Writes the account's row about `peer`, refusing peer 0 (no account has
/// it, and its key is the account's own row).
fn put_peer_marks(
    table: &mut redb::Table<(u64, u8, u64), &'static [u8]>,
    account: u64,
    peer: u64,
    marks: &PeerMarks,
) -> Result<(), StoreError> {
    if peer == OWN {
        return Err(StoreError::Invariant(format!("account {account} names peer {OWN}, which is no account")));
    }
    table.insert((account, MARK_ROW, peer), marks.encode().as_slice())?;
    Ok(())
}

/// Rewrites the account's own row of [`ROWS`] after `change`; a row left
/// with nothing in it is removed.
fn update_own(
    table: &mut redb::Table<(u64, u8, u64), &'static [u8]>,
    account: u64,
    change: impl FnOnce(&mut OwnMarks),
) -> Result<(), StoreError> {
    let mut own = own_marks(table, account)?;
    change(&mut own);
    if own == OwnMarks::default() {
        table.remove((account, MARK_ROW, OWN))?;
    } else {
        table.insert((account, MARK_ROW, OWN), own.encode().as_slice())?;
    }
    Ok(())
}

/// The tables of store formats 1 to 3 that format 4 merged into [`ROWS`],
/// kept to upgrade such a store.
pub(crate) mod legacy {
    use super::{LOG_ROW, ROWS, update_own};
    use crate::StoreError;
    use crate::record::{INBOUND_SLOT, PeerMarks};
    use redb::{ReadableTable, TableDefinition};

    /// (account, seq) → encoded log entry.
    pub(crate) const LOG: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("log");
    /// account → (next log seq, next outbox seq).
    pub(crate) const COUNTERS: TableDefinition<u64, (u64, u64)> = TableDefinition::new("counters");
    /// (account, source account) → highest outbox seq applied from it.
    pub(crate) const INBOUND: TableDefinition<(u64, u64), u64> = TableDefinition::new("inbound");
    /// (account, device) → highest log seq the device acknowledged.
    pub(crate) const CURSORS: TableDefinition<(u64, u64), u64> = TableDefinition::new("cursors");
    /// (account, peer, slot) → a high-water mark, slots as in
    /// [`PeerMarks`].
    pub(crate) const RECEIPTS: TableDefinition<(u64, u64, u8), u64> = TableDefinition::new("receipts");
    /// (account, peer) for every peer the account sent a message to.
    pub(crate) const CONTACTS: TableDefinition<(u64, u64), ()> = TableDefinition::new("contacts");

    /// Moves every row of the six tables into [`ROWS`] and deletes them,
    /// inside the transaction that records the new format: an upgrade is
    /// whole or not at all (and rewrites every log entry once). A store
    /// without them (a new one) gains nothing.
    pub(crate) fn upgrade(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
        let names: Vec<String> = txn.list_tables()?.map(|t| redb::TableHandle::name(&t).to_owned()).collect();
        let has = |name: &str| names.iter().any(|n| n == name);
        let mut marks = txn.open_table(ROWS)?;
        if has("log") {
            for row in txn.open_table(LOG)?.iter()? {
                let (k, v) = row?;
                let (account, seq) = k.value();
                marks.insert((account, LOG_ROW, seq), v.value())?;
            }
        }
        let mut peer = |account: u64, peer: u64, change: &dyn Fn(&mut PeerMarks)| -> Result<(), StoreError> {
            let mut row = super::peer_marks(&marks, account, peer)?;
            change(&mut row);
            super::put_peer_marks(&mut marks, account, peer, &row)
        };
        if has("inbound") {
            for row in txn.open_table(INBOUND)?.iter()? {
                let (k, v) = row?;
                let ((account, source), hwm) = (k.value(), v.value());
                peer(account, source, &|m| m.set(INBOUND_SLOT, hwm))?;
            }
        }
        if has("receipts") {
            for row in txn.open_table(RECEIPTS)?.iter()? {
                let (k, v) = row?;
                let ((account, p, slot), hwm) = (k.value(), v.value());
                peer(account, p, &|m| m.set(slot, hwm))?;
            }
        }
        if has("contacts") {
            for row in txn.open_table(CONTACTS)?.iter()? {
                let (account, p) = row?.0.value();
                peer(account, p, &|m| m.contact = true)?;
            }
        }
        if has("counters") {
            for row in txn.open_table(COUNTERS)?.iter()? {
                let (k, v) = row?;
                let (account, (next_seq, next_outbox)) = (k.value(), v.value());
                update_own(&mut marks, account, |own| own.counters = Some(crate::Counters { next_seq, next_outbox }))?;
            }
        }
        if has("cursors") {
            for row in txn.open_table(CURSORS)?.iter()? {
                let (k, v) = row?;
                let ((account, device), seq) = (k.value(), v.value());
                update_own(&mut marks, account, |own| own.set_cursor(device, seq))?;
            }
        }
        drop(marks);
        txn.delete_table(LOG)?;
        txn.delete_table(INBOUND)?;
        txn.delete_table(RECEIPTS)?;
        txn.delete_table(CONTACTS)?;
        txn.delete_table(COUNTERS)?;
        txn.delete_table(CURSORS)?;
        Ok(())
    }
}

/// Applies one account's changes inside an open transaction.
fn apply_write(txn: &redb::WriteTransaction, w: &AccountWrite) -> Result<(), StoreError> {
    let a = w.account.0;
    let own_changed = w.counters.is_some() || !w.cursors.is_empty();
    let peers_changed = !w.inbound.is_empty()
        || !w.receipts.is_empty()
        || !w.read_markers.is_empty()
        || !w.received.is_empty()
        || !w.contacts.is_empty();
    // The log and the marks are one table: opened once.
    let log_changed = !w.appends.is_empty() || !w.replaces.is_empty();
    let mut table = if log_changed || own_changed || peers_changed { Some(txn.open_table(ROWS)?) } else { None };
    if let (false, Some(log)) = (w.appends.is_empty(), table.as_mut()) {
        for (seq, entry) in &w.appends {
            log.insert((a, LOG_ROW, *seq), encode_entry(entry).as_slice())?;
        }
        let mut expiries = w.expiries().peekable();
        if expiries.peek().is_some() {
            let mut table = txn.open_table(EXPIRIES)?;
            for (at, seq) in expiries {
                table.insert((at, a, seq), ())?;
            }
        }
    }
    if let (false, Some(log)) = (w.replaces.is_empty(), table.as_mut()) {
        for (seq, entry) in &w.replaces {
            if log.get((a, LOG_ROW, *seq))?.is_none() {
                return Err(StoreError::Invariant(format!("rewrite of {a}'s log entry {seq}, which does not exist")));
            }
            log.insert((a, LOG_ROW, *seq), encode_entry(entry).as_slice())?;
        }
    }
    if !w.outbox_puts.is_empty() || !w.outbox_deletes.is_empty() {
        let mut outbox = txn.open_table(OUTBOX)?;
        for (seq, item) in &w.outbox_puts {
            outbox.insert((a, *seq), encode_outbox(item).as_slice())?;
        }
        for seq in &w.outbox_deletes {
            outbox.remove((a, *seq))?;
        }
    }
    if !w.client_ids.is_empty() {
        let mut table = txn.open_table(CLIENT_IDS)?;
        for (device, client_id, seq) in &w.client_ids {
            table.insert((a, device.0, client_id.as_str()), *seq)?;
        }
    }
    if let Some(table) = table.as_mut() {
        if own_changed {
            update_own(table, a, |own| {
                if let Some(c) = w.counters {
                    own.counters = Some(c);
                }
                for (device, seq) in &w.cursors {
                    own.set_cursor(device.0, *seq);
                }
            })?;
        }
        if peers_changed {
            // Each peer's row read once, changed in the order the separate
            // tables were written, and written once.
            let mut rows: std::collections::BTreeMap<u64, PeerMarks> = std::collections::BTreeMap::new();
            let changes = (w.inbound.iter().map(|(p, v)| (p.0, INBOUND_SLOT, *v)))
                .chain(w.received.iter().map(|(p, v)| (p.0, RECEIVED_SLOT, *v)))
                .chain(w.receipts.iter().map(|(p, kind, v)| (p.0, kind_byte(*kind), *v)))
                .chain(w.read_markers.iter().map(|(p, v)| (p.0, READ_MARKER_SLOT, *v)));
            for (peer, slot, value) in changes {
                loaded(&mut rows, table, a, peer)?.set(slot, value);
            }
            for peer in &w.contacts {
                loaded(&mut rows, table, a, peer.0)?.contact = true;
            }
            for (peer, marks) in rows {
                put_peer_marks(table, a, peer, &marks)?;
            }
        }
    }
    if let Some(meta) = &w.group {
        txn.open_table(GROUPS)?.insert(a, encode(meta)?.as_slice())?;
    }
    if !w.memberships.is_empty() {
        let mut table = txn.open_table(MEMBERSHIPS)?;
        for (member, joined) in &w.memberships {
            if *joined {
                table.insert((member.0, a), ())?;
            } else {
                table.remove((member.0, a))?;
            }
        }
    }
    Ok(())
}

/// The committer thread: one transaction and one fsync for every write
/// queued at the time, then an answer to each.
fn commit_loop(
    db: &Database,
    mut jobs: mpsc::Receiver<CommitJob>,
    max_batch: usize,
    failed: &watch::Sender<Option<String>>,
) {
    let mut batch: Vec<CommitJob> = Vec::with_capacity(max_batch.min(DEFAULT_MAX_BATCH));
    while let Some(first) = jobs.blocking_recv() {
        batch.push(first);
        while batch.len() < max_batch {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let started = std::time::Instant::now();
        let result = (|| {
            let mut txn = db.begin_write()?;
            txn.set_durability(Durability::Immediate);
            for (write, _) in &batch {
                apply_write(&txn, write)?;
            }
            txn.commit().map_err(backend)
        })();
        metrics::histogram!("skylark_store_commit_seconds").record(started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            tracing::error!(error = %e, writes = batch.len(), "group commit failed");
            if disk_failed(e) && failed.borrow().is_none() {
                let _ = failed.send(Some(format!("the disk failed a write of the store ({e})")));
            }
        }
        metrics::histogram!("skylark_store_commit_batch_writes").record(batch.len() as f64);
        let mut replies = batch.drain(..).map(|(_, reply)| reply);
        if let Some(first) = replies.next() {
            let rest = replies.map(|reply| (reply, result.clone())).collect();
            // Undeliverable, the answer comes back and answers the rest as it drops.
            let _ = first.send(Answer { result, rest });
        }
    }
}

#[async_trait]
impl AccountStore for RedbStore {
    async fn account_by_phone(&self, phone: &PhoneNumber) -> Result<Option<Account>, StoreError> {
        let phone = phone.as_str().to_owned();
        self.read(move |db| {
            let txn = db.begin_read()?;
            let Some(id) = txn.open_table(PHONES)?.get(phone.as_str())? else {
                return Ok(None);
            };
            let accounts = txn.open_table(ACCOUNTS)?;
            let record = accounts.get(id.value())?;
            record.map(|r| decode(r.value())).transpose()
        })
    }

    async fn account(&self, id: AccountId) -> Result<Option<Account>, StoreError> {
        self.read(move |db| {
            let txn = db.begin_read()?;
            let accounts = txn.open_table(ACCOUNTS)?;
            let record = accounts.get(id.0)?;
            record.map(|r| decode(r.value())).transpose()
        })
    }

    async fn device(&self, id: DeviceId) -> Result<Option<Device>, StoreError> {
        self.read(move |db| {
            let txn = db.begin_read()?;
            let devices = txn.open_table(DEVICES)?;
            let record = devices.get(id.0)?;
            record.map(|r| decode(r.value())).transpose()
        })
    }

    async fn active_devices(&self, account: AccountId) -> Result<Vec<Device>, StoreError> {
        self.read(move |db| {
            let txn = db.begin_read()?;
            let index = txn.open_table(ACCOUNT_DEVICES)?;
            let devices = txn.open_table(DEVICES)?;
            let mut out = Vec::new();
            for entry in index.range((account.0, 0)..=(account.0, u64::MAX))? {
                let (key, _) = entry?;
                let (_, device_id) = key.value();
                out.push(indexed_device(&devices, device_id)?);
            }
            Ok(out)
        })
    }

    async fn register(&self, phone: &PhoneNumber, device: NewDevice, now_ms: u64) -> Result<Registration, StoreError> {
        let phone = phone.clone();
        self.write(move |txn| {
            let existing = txn.open_table(PHONES)?.get(phone.as_str())?.map(|v| v.value());
            let (account, created) = match existing {
                Some(id) => {
                    let accounts = txn.open_table(ACCOUNTS)?;
                    let record = accounts
                        .get(id)?
                        .ok_or_else(|| StoreError::Corrupt(format!("phone names missing account {id}")))?;
                    (decode::<Account>(record.value())?, false)
                }
                None => {
                    let account = Account {
                        id: AccountId(next_id(txn, NEXT_ACCOUNT_ID)?),
                        phone: phone.clone(),
                        created_at_ms: now_ms,
                    };
                    txn.open_table(ACCOUNTS)?.insert(account.id.0, encode(&account)?.as_slice())?;
                    txn.open_table(PHONES)?.insert(phone.as_str(), account.id.0)?;
                    (account, true)
                }
            };

            let mut index = txn.open_table(ACCOUNT_DEVICES)?;
            let mut devices = txn.open_table(DEVICES)?;
            let mut removed_devices = Vec::new();
            let old: Vec<u64> = index
                .range((account.id.0, 0)..=(account.id.0, u64::MAX))?
                .map(|e| e.map(|(k, _)| k.value().1).map_err(backend))
                .collect::<Result<_, _>>()?;
            for device_id in old {
                index.remove((account.id.0, device_id))?;
                let mut record = indexed_device(&devices, device_id)?;
                record.removed_at_ms = Some(now_ms);
                devices.insert(device_id, encode(&record)?.as_slice())?;
                removed_devices.push(DeviceId(device_id));
                drop_keys(txn, device_id)?;
            }

            // A new device starts at the end of the account's log.
            let start = read_counters(txn, account.id.0)?.next_seq - 1;
            let new_device = Device {
                id: DeviceId(next_id(txn, NEXT_DEVICE_ID)?),
                account_id: account.id,
                public_key: device.public_key,
                name: device.name,
                created_at_ms: now_ms,
                removed_at_ms: None,
                last_seen_ms: None,
            };
            devices.insert(new_device.id.0, encode(&new_device)?.as_slice())?;
            index.insert((account.id.0, new_device.id.0), ())?;
            update_own(&mut txn.open_table(ROWS)?, account.id.0, |own| own.set_cursor(new_device.id.0, start))?;
            Ok(Registration { account, device: new_device, created, removed_devices })
        })
        .await
    }

    async fn add_device(
        &self,
        account: AccountId,
        device: NewDevice,
        max_active: usize,
        now_ms: u64,
    ) -> Result<Device, AddDeviceError> {
        self.write(move |txn| {
            if txn.open_table(ACCOUNTS)?.get(account.0)?.is_none() {
                return Ok(Err(AddDeviceError::UnknownAccount));
            }
            let mut index = txn.open_table(ACCOUNT_DEVICES)?;
            let active = index.range((account.0, 0)..=(account.0, u64::MAX))?.count();
            if active >= max_active {
                return Ok(Err(AddDeviceError::LimitReached(active)));
            }
            let start = read_counters(txn, account.0)?.next_seq - 1;
            let new_device = Device {
                id: DeviceId(next_id(txn, NEXT_DEVICE_ID)?),
                account_id: account,
                public_key: device.public_key,
                name: device.name,
                created_at_ms: now_ms,
                removed_at_ms: None,
                last_seen_ms: None,
            };
            txn.open_table(DEVICES)?.insert(new_device.id.0, encode(&new_device)?.as_slice())?;
            index.insert((account.0, new_device.id.0), ())?;
            update_own(&mut txn.open_table(ROWS)?, account.0, |own| own.set_cursor(new_device.id.0, start))?;
            Ok(Ok(new_device))
        })
        .await?
    }

    async fn remove_device(&self, account: AccountId, device: DeviceId, now_ms: u64) -> Result<bool, StoreError> {
        self.write(move |txn| {
            let mut index = txn.open_table(ACCOUNT_DEVICES)?;
            if index.remove((account.0, device.0))?.is_none() {
                return Ok(false);
            }
            let mut devices = txn.open_table(DEVICES)?;
            let mut record = indexed_device(&devices, device.0)?;
            record.removed_at_ms = Some(now_ms);
            devices.insert(device.0, encode(&record)?.as_slice())?;
            update_own(&mut txn.open_table(ROWS)?, account.0, |own| own.remove_cursor(device.0))?;
            drop_keys(txn, device.0)?;
            Ok(true)
        })
        .await
    }

    async fn rename_device(&self, account: AccountId, device: DeviceId, name: String) -> Result<bool, StoreError> {
        self.write(move |txn| {
            let active = txn.open_table(ACCOUNT_DEVICES)?.get((account.0, device.0))?.is_some();
            if !active {
                return Ok(false);
            }
            let mut devices = txn.open_table(DEVICES)?;
            let mut record = indexed_device(&devices, device.0)?;
            record.name = name;
            devices.insert(device.0, encode(&record)?.as_slice())?;
            Ok(true)
        })
        .await
    }

    async fn delete_account(&self, account: AccountId, now_ms: u64) -> Result<Option<Vec<DeviceId>>, StoreError> {
        self.write(move |txn| {
            let a = account.0;
            let record: Option<Account> =
                txn.open_table(ACCOUNTS)?.remove(a)?.map(|r| decode(r.value())).transpose()?;
            let Some(record) = record else { return Ok(None) };
            txn.open_table(PHONES)?.remove(record.phone.as_str())?;
            let mut removed = Vec::new();
            {
                let mut index = txn.open_table(ACCOUNT_DEVICES)?;
                let ids: Vec<u64> = index
                    .range((a, 0)..=(a, u64::MAX))?
                    .map(|row| row.map(|(k, _)| k.value().1))
                    .collect::<Result<_, _>>()?;
                let mut devices = txn.open_table(DEVICES)?;
                let mut push = txn.open_table(PUSH)?;
                for id in ids {
                    index.remove((a, id))?;
                    let mut device = indexed_device(&devices, id)?;
                    device.removed_at_ms = Some(now_ms);
                    devices.insert(id, encode(&device)?.as_slice())?;
                    push.remove(id)?;
                    drop_keys(txn, id)?;
                    removed.push(DeviceId(id));
                }
            }
            let pairs = (a, 0)..(a + 1, 0);
            // The log goes, and the marks but the counters (sequence
            // numbers are never reused).
            let mut rows = txn.open_table(ROWS)?;
            rows.retain_in((a, LOG_ROW, 0)..(a, MARK_ROW, OWN), |_, _| false)?;
            rows.retain_in((a, MARK_ROW, OWN + 1)..(a + 1, 0, 0), |_, _| false)?;
            update_own(&mut rows, a, |own| own.cursors.clear())?;
            txn.open_table(BLOCKS)?.retain_in(pairs.clone(), |_, _| false)?;
            txn.open_table(CONTACT_NAMES)?.retain_in(pairs, |_, _| false)?;
            txn.open_table(CLIENT_IDS)?.retain_in((a, 0, "")..(a + 1, 0, ""), |_, _| false)?;
            txn.open_table(SETTINGS)?.remove(a)?;
            txn.open_table(PINS)?.remove(a)?;
            txn.open_table(PROFILES)?.remove(a)?;
            Ok(Some(removed))
        })
        .await
    }

    async fn touch_devices(&self, seen: Vec<(DeviceId, u64)>) -> Result<(), StoreError> {
        if seen.is_empty() {
            return Ok(());
        }
        self.write(move |txn| {
            let mut devices = txn.open_table(DEVICES)?;
            for (device, at) in seen {
                let record: Option<Device> = devices.get(device.0)?.map(|r| decode(r.value())).transpose()?;
                if let Some(mut record) = record {
                    record.last_seen_ms = Some(at);
                    devices.insert(device.0, encode(&record)?.as_slice())?;
                }
            }
            Ok(())
        })
        .await
    }
}

#[async_trait]
impl VerificationStore for RedbStore {
    async fn put_verification(&self, session: &VerificationSession) -> Result<(), StoreError> {
        let id = session.id.clone();
        let bytes = encode(session)?;
        self.write(move |txn| {
            txn.open_table(VERIFICATIONS)?.insert(id.as_str(), bytes.as_slice())?;
            Ok(())
        })
        .await
    }

    async fn verification(&self, id: &str) -> Result<Option<VerificationSession>, StoreError> {
        let id = id.to_owned();
        self.read(move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(VERIFICATIONS)?;
            let record = table.get(id.as_str())?;
            record.map(|r| decode(r.value())).transpose()
        })
    }

    async fn delete_verification(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.write(move |txn| {
            txn.open_table(VERIFICATIONS)?.remove(id.as_str())?;
            Ok(())
        })
        .await
    }

    async fn purge_verifications(&self, created_before_ms: u64) -> Result<usize, StoreError> {
        self.write(move |txn| {
            let mut table = txn.open_table(VERIFICATIONS)?;
            if table.is_empty()? {
                return Ok(0);
            }
            let mut stale = Vec::new();
            for entry in table.iter()? {
                let (key, value) = entry?;
                let session: VerificationSession = decode(value.value())?;
                if session.created_at_ms < created_before_ms {
                    stale.push(key.value().to_owned());
                }
            }
            for key in &stale {
                table.remove(key.as_str())?;
            }
            Ok(stale.len())
        })
        .await
    }
}

#[async_trait]
impl SettingsStore for RedbStore {
    async fn visibility(&self, account: AccountId) -> Result<Visibility, StoreError> {
        self.read(move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(SETTINGS)?;
            let value = table.get(account.0)?;
            Ok(value.map(|v| decode(v.value())).transpose()?.unwrap_or_default())
        })
    }

    async fn set_visibility(&self, account: AccountId, visibility: Visibility) -> Result<(), StoreError> {
        let bytes = encode(&visibility)?;
        self.write(move |txn| {
            txn.open_table(SETTINGS)?.insert(account.0, bytes.as_slice())?;
            Ok(())
        })
        .await
    }

    async fn push_target(&self, device: DeviceId) -> Result<Option<PushTarget>, StoreError> {
        self.read(move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(PUSH)?;
            let value = table.get(device.0)?;
            value.map(|v| decode(v.value())).transpose()
        })
    }

    async fn set_push_target(&self, device: DeviceId, target: Option<PushTarget>) -> Result<(), StoreError> {
        let bytes = target.as_ref().map(encode).transpose()?;
        self.write(move |txn| {
            let mut table = txn.open_table(PUSH)?;
            match bytes {
                Some(bytes) => table.insert(device.0, bytes.as_slice())?,
                None => table.remove(device.0)?,
            };
            Ok(())
        })
        .await
    }

    async fn set_block(&self, account: AccountId, peer: AccountId, at_ms: Option<u64>) -> Result<(), StoreError> {
        self.write(move |txn| {
            let mut table = txn.open_table(BLOCKS)?;
            match at_ms {
                Some(at) => {
                    if table.get((account.0, peer.0))?.is_none() {
                        table.insert((account.0, peer.0), at)?;
                    }
                }
                None => {
                    table.remove((account.0, peer.0))?;
                }
            }
            Ok(())
        })
        .await
    }

    async fn profile(&self, account: AccountId) -> Result<Option<crate::Profile>, StoreError> {
        self.read(move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(PROFILES)?;
            let value = table.get(account.0)?;
            value.map(|v| decode(v.value())).transpose()
        })
    }

    async fn set_profile(&self, account: AccountId, profile: Option<crate::Profile>) -> Result<(), StoreError> {
        let bytes = profile.as_ref().map(encode).transpose()?;
        self.write(move |txn| {
            let mut table = txn.open_table(PROFILES)?;
            match bytes {
                Some(bytes) => table.insert(account.0, bytes.as_slice())?,
                None => table.remove(account.0)?,
            };
            Ok(())
        })
        .await
    }

    async fn set_contact_name(
        &self,
        account: AccountId,
        peer: AccountId,
        name: Option<String>,
    ) -> Result<(), StoreError> {
        self.write(move |txn| {
            let mut table = txn.open_table(CONTACT_NAMES)?;
            match name {
                Some(name) => table.insert((account.0, peer.0), name.as_str())?,
                None => table.remove((account.0, peer.0))?,
            };
            Ok(())
        })
        .await
    }

    async fn add_contact(&self, account: AccountId, peer: AccountId) -> Result<(), StoreError> {
        // Most calls find the contact recorded: a read, and no commit.
        if self.is_contact(account, peer).await? {
            return Ok(());
        }
        self.write(move |txn| {
            let mut marks = txn.open_table(ROWS)?;
            let mut row = peer_marks(&marks, account.0, peer.0)?;
            row.contact = true;
            put_peer_marks(&mut marks, account.0, peer.0, &row)
        })
        .await
    }

    async fn contact_names(&self, account: AccountId) -> Result<Vec<(AccountId, String)>, StoreError> {
        self.read(move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(CONTACT_NAMES)?;
            let mut out = Vec::new();
            for row in table.range((account.0, 0)..=(account.0, u64::MAX))? {
                let (k, v) = row?;
                out.push((AccountId(k.value().1), v.value().to_owned()));
            }
            Ok(out)
        })
    }

    async fn pin(&self, account: AccountId) -> Result<Option<skylark_core::pin::PinRecord>, StoreError> {
        self.read(move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(PINS)?;
            let value = table.get(account.0)?;
            value.map(|v| decode(v.value())).transpose()
        })
    }

    async fn set_pin(&self, account: AccountId, pin: Option<skylark_core::pin::PinRecord>) -> Result<(), StoreError> {
        let bytes = pin.as_ref().map(encode).transpose()?;
        self.write(move |txn| {
            let mut table = txn.open_table(PINS)?;
            match bytes {
                Some(bytes) => table.insert(account.0, bytes.as_slice())?,
                None => table.remove(account.0)?,
            };
            Ok(())
        })
        .await
    }

    async fn blocked(&self, account: AccountId) -> Result<Vec<(AccountId, u64)>, StoreError> {
        self.read(move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(BLOCKS)?;
            let mut out = Vec::new();
            for row in table.range((account.0, 0)..=(account.0, u64::MAX))? {
                let (k, v) = row?;
                out.push((AccountId(k.value().1), v.value()));
            }
            Ok(out)
        })
    }
}

/// A removed device's key packages are gone with it: nobody may add it to
/// a conversation any more.
fn drop_keys(txn: &redb::WriteTransaction, device: u64) -> Result<(), StoreError> {
    txn.open_table(KEY_PACKAGES)?.retain_in((device, 0)..=(device, u64::MAX), |_, _| false)?;
    txn.open_table(LAST_RESORT_KEYS)?.remove(device)?;
    Ok(())
}

fn stock_of(
    packages: &impl ReadableTable<(u64, u64), &'static [u8]>,
    last_resort: &impl ReadableTable<u64, &'static [u8]>,
    device: u64,
) -> Result<KeyStock, StoreError> {
    let available = packages.range((device, 0)..=(device, u64::MAX))?.count();
    Ok(KeyStock {
        available: u32::try_from(available).map_err(|_| StoreError::Invariant("a key stock over u32".into()))?,
        has_last_resort: last_resort.get(device)?.is_some(),
    })
}

#[async_trait]
impl KeyPackageStore for RedbStore {
    async fn put_key_packages(
        &self,
        device: DeviceId,
        packages: Vec<bytes::Bytes>,
        last_resort: Option<bytes::Bytes>,
        max: u32,
    ) -> Result<Result<KeyStock, KeyStock>, StoreError> {
        self.write(move |txn| {
            let mut table = txn.open_table(KEY_PACKAGES)?;
            let mut spare = txn.open_table(LAST_RESORT_KEYS)?;
            let stock = stock_of(&table, &spare, device.0)?;
            if stock.available as usize + packages.len() > max as usize {
                return Ok(Err(stock));
            }
            let next = match table.range((device.0, 0)..=(device.0, u64::MAX))?.next_back() {
                Some(last) => last?.0.value().1 + 1,
                None => 0,
            };
            for (n, package) in (next..).zip(&packages) {
                table.insert((device.0, n), package.as_ref())?;
            }
            if let Some(package) = &last_resort {
                spare.insert(device.0, package.as_ref())?;
            }
            Ok(Ok(stock_of(&table, &spare, device.0)?))
        })
        .await
    }

    async fn key_stock(&self, device: DeviceId) -> Result<KeyStock, StoreError> {
        self.read(move |db| {
            let txn = db.begin_read()?;
            stock_of(&txn.open_table(KEY_PACKAGES)?, &txn.open_table(LAST_RESORT_KEYS)?, device.0)
        })
    }

    async fn claim_key_packages(&self, devices: &[DeviceId]) -> Result<Vec<ClaimedKey>, StoreError> {
        let devices = devices.to_vec();
        // One write transaction: redb has a single writer, so two claims
        // are serialised and never take the same package.
        self.write(move |txn| {
            let mut table = txn.open_table(KEY_PACKAGES)?;
            let spare = txn.open_table(LAST_RESORT_KEYS)?;
            let mut claimed = Vec::with_capacity(devices.len());
            for device in devices {
                let oldest =
                    table.range((device.0, 0)..=(device.0, u64::MAX))?.next().transpose()?.map(|(k, _)| k.value());
                let (package, last_resort) = match oldest {
                    Some(key) => {
                        let package = table.remove(key)?.map(|v| bytes::Bytes::copy_from_slice(v.value()));
                        (package, false)
                    }
                    None => (spare.get(device.0)?.map(|v| bytes::Bytes::copy_from_slice(v.value())), true),
                };
                let last_resort = last_resort && package.is_some();
                claimed.push(ClaimedKey { device, package, last_resort });
            }
            Ok(claimed)
        })
        .await
    }
}

#[async_trait]
impl GroupStore for RedbStore {
    async fn allocate_group(&self) -> Result<AccountId, StoreError> {
        self.write(|txn| Ok(AccountId::group(next_id(txn, "next_group_id")?))).await
    }

    async fn group(&self, id: AccountId) -> Result<Option<GroupMeta>, StoreError> {
        self.read(move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(GROUPS)?;
            let value = table.get(id.0)?;
            value.map(|v| decode(v.value())).transpose()
        })
    }

    async fn groups_of(&self, account: AccountId) -> Result<Vec<AccountId>, StoreError> {
        self.read(move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(MEMBERSHIPS)?;
            let mut out = Vec::new();
            for entry in table.range((account.0, 0)..=(account.0, u64::MAX))? {
                out.push(AccountId(entry?.0.value().1));
            }
            Ok(out)
        })
    }
}

/// One node only: every cluster call says cluster mode needs PostgreSQL,
/// and a write's epoch (never set on one node) is not checked.
impl LeaseStore for RedbStore {}

#[async_trait]
impl MetaStore for RedbStore {
    async fn server_id(&self, candidate: [u8; 16]) -> Result<[u8; 16], StoreError> {
        self.write(move |txn| {
            let mut meta = txn.open_table(META)?;
            if let Some(v) = meta.get(SERVER_ID)? {
                return v.value().try_into().map_err(|_| StoreError::Corrupt("server id".into()));
            }
            meta.insert(SERVER_ID, &candidate[..])?;
            Ok(candidate)
        })
        .await
    }

    async fn set_ban(&self, phone: &PhoneNumber, at_ms: Option<u64>) -> Result<(), StoreError> {
        let key = format!("{BAN}{phone}");
        self.write(move |txn| {
            let mut meta = txn.open_table(META)?;
            match at_ms {
                Some(at) => meta.insert(key.as_str(), &at.to_be_bytes()[..])?,
                None => meta.remove(key.as_str())?,
            };
            Ok(())
        })
        .await
    }

    async fn bans(&self) -> Result<Vec<(PhoneNumber, u64)>, StoreError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        let mut out = Vec::new();
        for row in meta.range(BAN..)? {
            let (k, v) = row?;
            let Some(phone) = k.value().strip_prefix(BAN) else { break };
            let phone = PhoneNumber::parse(phone).map_err(|e| StoreError::Corrupt(format!("a banned number: {e}")))?;
            let at =
                v.value().try_into().map(u64::from_be_bytes).map_err(|_| StoreError::Corrupt("a ban's time".into()))?;
            out.push((phone, at));
        }
        Ok(out)
    }

    async fn add_report(&self, mut report: crate::Report) -> Result<u64, StoreError> {
        self.write(move |txn| {
            report.id = next_id(txn, NEXT_REPORT_ID)?;
            txn.open_table(REPORTS)?.insert(report.id, encode(&report)?.as_slice())?;
            Ok(report.id)
        })
        .await
    }

    async fn reports(&self, limit: usize) -> Result<Vec<crate::Report>, StoreError> {
        self.read(move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(REPORTS)?;
            let mut out = Vec::new();
            for row in table.iter()?.rev().take(limit) {
                out.push(decode(row?.1.value())?);
            }
            Ok(out)
        })
    }

    async fn backup(&self, dest: &Path) -> Result<crate::Backup, StoreError> {
        let db = self.db.clone();
        let dest = dest.to_path_buf();
        tokio::task::spawn_blocking(move || backup_to(&db, &dest))
            .await
            .map_err(|e| StoreError::Invariant(format!("the backup task failed: {e}")))?
    }

    async fn secret(&self, name: &str, candidate: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        let key = format!("secret:{name}");
        self.write(move |txn| {
            let mut meta = txn.open_table(META)?;
            if let Some(v) = meta.get(key.as_str())? {
                return Ok(v.value().to_vec());
            }
            meta.insert(key.as_str(), candidate.as_slice())?;
            Ok(candidate)
        })
        .await
    }
}

#[async_trait]
impl MessageStore for RedbStore {
    async fn apply(&self, write: AccountWrite) -> Result<(), StoreError> {
        if write.is_empty() {
            return Ok(());
        }
        write.check_group_forwards()?;
        let (reply, answer) = oneshot::channel();
        let stopped = || StoreError::Closed;
        let queue = self.committer.queue.as_ref().ok_or_else(stopped)?;
        queue.send((write, reply)).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?.into_result()
    }

    async fn expire(&self, now_ms: u64, limit: usize) -> Result<usize, StoreError> {
        // Most sweeps find nothing due: a read says so without a commit (and its fsync).
        let due = self.read(move |db| {
            let txn = db.begin_read()?;
            let index = txn.open_table(EXPIRIES)?;
            Ok(index.range((0, 0, 0)..=(now_ms, u64::MAX, u64::MAX))?.next().is_some())
        })?;
        if !due {
            return Ok(0);
        }
        self.write(move |txn| {
            let mut index = txn.open_table(EXPIRIES)?;
            let due: Vec<(u64, u64, u64)> = index
                .range((0, 0, 0)..=(now_ms, u64::MAX, u64::MAX))?
                .take(limit)
                .map(|row| row.map(|(k, _)| k.value()))
                .collect::<Result<_, _>>()?;
            let mut log = txn.open_table(ROWS)?;
            for &(at, account, seq) in &due {
                index.remove((at, account, seq))?;
                let purged = match log.get((account, LOG_ROW, seq))? {
                    Some(stored) => crate::purged_entry(&decode_entry(stored.value())?),
                    // The account was deleted since.
                    None => None,
                };
                if let Some(entry) = purged {
                    log.insert((account, LOG_ROW, seq), encode_entry(&entry).as_slice())?;
                }
            }
            Ok(due.len())
        })
        .await
    }

    async fn account_state(&self, account: AccountId) -> Result<AccountState, StoreError> {
        self.read(move |db| {
            let txn = db.begin_read()?;
            let counters = own_marks(&txn.open_table(ROWS)?, account.0)?.counters.unwrap_or_default();
            let table = txn.open_table(OUTBOX)?;
            let mut outbox = Vec::new();
            for entry in table.range((account.0, 0)..=(account.0, u64::MAX))? {
                let (key, value) = entry?;
                let item = match decode_outbox(value.value())? {
                    StoredOutbox::Item(item) => item,
                    StoredOutbox::GroupEvent { to, seq } => {
                        let log = txn.open_table(ROWS)?;
                        let raw = log.get((account.0, LOG_ROW, seq))?;
                        let raw =
                            raw.ok_or_else(|| StoreError::Corrupt(format!("outbox names missing event {seq}")))?;
                        match decode_entry(raw.value())? {
                            LogEntry::Group(e) => OutboxItem { to, forward: Forward::Group(e) },
                            _ => return Err(StoreError::Corrupt(format!("outbox names non-group entry {seq}"))),
                        }
                    }
                };
                outbox.push((key.value().1, item));
            }
            Ok(AccountState { counters, outbox })
        })
    }

    async fn pending_outboxes(&self, after: Option<AccountId>, limit: usize) -> Result<Vec<AccountId>, StoreError> {
        self.read(move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(OUTBOX)?;
            let mut found = Vec::new();
            let mut from = match after {
                Some(a) if a.0 == u64::MAX => return Ok(found),
                Some(a) => a.0 + 1,
                None => 0,
            };
            // One seek per account: the first row at or above `from`, then past that account.
            while found.len() < limit {
                let Some(entry) = table.range((from, 0)..)?.next() else { break };
                let account = entry?.0.value().0;
                found.push(AccountId(account));
                match account.checked_add(1) {
                    Some(next) => from = next,
                    None => break,
                }
            }
            Ok(found)
        })
    }

    async fn read_log(&self, account: AccountId, from: u64, limit: usize) -> Result<Vec<(u64, LogEntry)>, StoreError> {
        self.read(move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(ROWS)?;
            let mut out = Vec::new();
            for entry in table.range((account.0, LOG_ROW, from)..=(account.0, LOG_ROW, u64::MAX))?.take(limit) {
                let (key, value) = entry?;
                out.push((key.value().2, decode_entry(value.value())?));
            }
            Ok(out)
        })
    }

    async fn read_log_before(
        &self,
        account: AccountId,
        before: u64,
        limit: usize,
    ) -> Result<Vec<(u64, LogEntry)>, StoreError> {
        self.read(move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(ROWS)?;
            let mut out = Vec::new();
            if before == 0 {
                return Ok(out);
            }
            for entry in table.range((account.0, LOG_ROW, 0)..(account.0, LOG_ROW, before))?.rev().take(limit) {
                let (key, value) = entry?;
                out.push((key.value().2, decode_entry(value.value())?));
            }
            Ok(out)
        })
    }

    async fn is_contact(&self, account: AccountId, peer: AccountId) -> Result<bool, StoreError> {
        self.read(move |db| {
            let txn = db.begin_read()?;
            Ok(peer_marks(&txn.open_table(ROWS)?, account.0, peer.0)?.contact)
        })
    }

    async fn receipt_state(&self, account: AccountId) -> Result<ReceiptState, StoreError> {
        self.read(move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(ROWS)?;
            let mut rows = Vec::new();
            for entry in table.range((account.0, MARK_ROW, OWN + 1)..=(account.0, MARK_ROW, u64::MAX))? {
                let (key, value) = entry?;
                let peer = key.value().2;
                rows.extend(PeerMarks::decode(value.value())?.receipt_rows().map(|(slot, v)| (peer, slot, v)));
            }
            Ok(receipt_state(rows))
        })
    }

    async fn client_id(
        &self,
        account: AccountId,
        device: DeviceId,
        client_id: &str,
    ) -> Result<Option<u64>, StoreError> {
        let client_id = client_id.to_owned();
        self.read(move |db| {
            let txn = db.begin_read()?;
            let table = txn.open_table(CLIENT_IDS)?;
            Ok(table.get((account.0, device.0, client_id.as_str()))?.map(|v| v.value()))
        })
    }

    async fn inbound(&self, account: AccountId, source: AccountId) -> Result<u64, StoreError> {
        self.read(move |db| {
            let txn = db.begin_read()?;
            Ok(peer_marks(&txn.open_table(ROWS)?, account.0, source.0)?.slot(INBOUND_SLOT).unwrap_or(0))
        })
    }

    async fn cursor(&self, account: AccountId, device: DeviceId) -> Result<Option<u64>, StoreError> {
        self.read(move |db| {
            let txn = db.begin_read()?;
            Ok(own_marks(&txn.open_table(ROWS)?, account.0)?.cursor(device.0))
        })
    }

    async fn receipt(&self, account: AccountId, peer: AccountId, kind: ReceiptKind) -> Result<u64, StoreError> {
        self.receipt_slot(account, peer, kind_byte(kind)).await
    }

    async fn read_marker(&self, account: AccountId, peer: AccountId) -> Result<u64, StoreError> {
        self.receipt_slot(account, peer, READ_MARKER_SLOT).await
    }

    async fn received(&self, account: AccountId, peer: AccountId) -> Result<u64, StoreError> {
        self.receipt_slot(account, peer, RECEIVED_SLOT).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance;

    #[tokio::test]
    async fn in_memory_backend_conforms() {
        conformance::run_all(&RedbStore::in_memory().unwrap()).await;
    }

    #[tokio::test]
    async fn file_backend_conforms() {
        let dir = tempfile::tempdir().unwrap();
        conformance::run_all(&RedbStore::open(&dir.path().join("db.redb")).unwrap()).await;
    }

    #[tokio::test]
    async fn a_backup_holds_every_row_of_every_table_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("db.redb")).unwrap();
        conformance::run_all(&store).await;
        let dest = dir.path().join("backup.redb");
        let made = store.backup(&dest).await.unwrap();
        assert!(made.rows > 50 && made.bytes > 0, "{made:?}");
        let again = store.backup(&dest).await.unwrap_err();
        assert!(again.to_string().contains("exists already"), "{again}");
        drop(store);
        let (a, b) = (Database::open(dir.path().join("db.redb")).unwrap(), Database::open(&dest).unwrap());
        let (a, b) = (a.begin_read().unwrap(), b.begin_read().unwrap());
        let mut total = 0;
        macro_rules! same {
            ($($table:expr),*) => {$(
                let (x, y) = (a.open_table($table).unwrap(), b.open_table($table).unwrap());
                assert_eq!(x.len().unwrap(), y.len().unwrap(), "rows of {}", $table.name());
                for (p, q) in x.iter().unwrap().zip(y.iter().unwrap()) {
                    let ((k1, v1), (k2, v2)) = (p.unwrap(), q.unwrap());
                    assert!(k1.value() == k2.value() && v1.value() == v2.value(), "a row of {}", $table.name());
                }
                total += x.len().unwrap();
            )*};
        }
        every_table!(same);
        assert_eq!(total, made.rows);
    }

    /// A store file with one account in it, closed.
    async fn written(dir: &tempfile::TempDir) -> std::path::PathBuf {
        let path = dir.path().join("skylark.redb");
        let store = RedbStore::open(&path).unwrap();
        let phone = PhoneNumber::parse("+15550000002").unwrap();
        store.register(&phone, NewDevice { public_key: [1; 32], name: "a".into() }, 5).await.unwrap();
        drop(store);
        path
    }

    fn unusable(path: &Path) -> String {
        match RedbStore::open(path) {
            Err(StoreError::Unusable(message)) => message,
            Err(other) => panic!("expected an unusable store, got {other:?}"),
            Ok(_) => panic!("a damaged store was opened"),
        }
    }

    #[tokio::test]
    async fn a_cut_off_or_empty_file_is_refused_in_words_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = written(&dir).await;
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        let message = unusable(&path);
        assert!(message.contains(&path.display().to_string()) && message.contains("damaged"), "{message}");
        assert!(message.contains("backup"), "says what to do: {message}");
        std::fs::write(&path, b"").unwrap();
        let message = unusable(&path);
        assert!(message.contains("empty") && message.contains(&path.display().to_string()), "{message}");
        std::fs::write(&path, b"not a database at all, just some bytes").unwrap();
        assert!(unusable(&path).contains("damaged"));
    }

    #[tokio::test]
    async fn a_store_of_a_newer_format_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = written(&dir).await;
        {
            let store = RedbStore::open(&path).unwrap();
            let txn = store.db.begin_write().unwrap();
            txn.open_table(META).unwrap().insert(FORMAT, &(FORMAT_VERSION + 1).to_be_bytes()[..]).unwrap();
            txn.commit().unwrap();
        }
        let message = unusable(&path);
        assert!(message.contains("newer") && message.contains(&path.display().to_string()), "{message}");
        let store = redb::Database::open(&path).unwrap();
        let txn = store.begin_read().unwrap();
        let format = txn.open_table(META).unwrap().get(FORMAT).unwrap().map(|v| v.value().to_vec());
        assert_eq!(format, Some((FORMAT_VERSION + 1).to_be_bytes().to_vec()), "nothing was changed");
    }

    #[tokio::test]
    async fn a_store_without_a_recorded_format_is_format_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = written(&dir).await;
        {
            let store = RedbStore::open(&path).unwrap();
            let txn = store.db.begin_write().unwrap();
            txn.open_table(META).unwrap().remove(FORMAT).unwrap();
            txn.commit().unwrap();
        }
        let store = RedbStore::open(&path).unwrap();
        let phone = PhoneNumber::parse("+15550000002").unwrap();
        assert!(store.account_by_phone(&phone).await.unwrap().is_some(), "the data is kept");
        let txn = store.db.begin_read().unwrap();
        let format = txn.open_table(META).unwrap().get(FORMAT).unwrap().map(|v| v.value().to_vec());
        assert_eq!(format, Some(FORMAT_VERSION.to_be_bytes().to_vec()));
    }

    #[tokio::test]
    async fn a_format_one_store_is_upgraded_and_gains_the_block_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = written(&dir).await;
        {
            let store = RedbStore::open(&path).unwrap();
            let txn = store.db.begin_write().unwrap();
            txn.open_table(META).unwrap().insert(FORMAT, &1u64.to_be_bytes()[..]).unwrap();
            assert!(txn.delete_table(BLOCKS).unwrap(), "format 1 had no blocks table");
            assert!(txn.delete_table(PINS).unwrap(), "nor a pins table");
            assert!(txn.delete_table(REPORTS).unwrap(), "nor a reports table");
            assert!(txn.delete_table(CONTACT_NAMES).unwrap(), "nor contact names");
            assert!(txn.delete_table(PROFILES).unwrap(), "nor profiles");
            txn.commit().unwrap();
        }
        let store = RedbStore::open(&path).unwrap();
        let phone = PhoneNumber::parse("+15550000002").unwrap();
        assert!(store.account_by_phone(&phone).await.unwrap().is_some(), "the data is kept");
        store.set_block(AccountId(1), AccountId(2), Some(5)).await.unwrap();
        assert_eq!(store.blocked(AccountId(1)).await.unwrap(), vec![(AccountId(2), 5)]);
        let txn = store.db.begin_read().unwrap();
        let format = txn.open_table(META).unwrap().get(FORMAT).unwrap().map(|v| v.value().to_vec());
        assert_eq!(format, Some(FORMAT_VERSION.to_be_bytes().to_vec()));
    }

    #[tokio::test]
    async fn a_format_three_store_has_its_log_and_five_tables_of_marks_moved_into_one() {
        use legacy::{CONTACTS, COUNTERS, CURSORS, INBOUND, LOG, RECEIPTS};
        let dir = tempfile::tempdir().unwrap();
        let path = written(&dir).await;
        let (a, b, c) = (AccountId(1), AccountId(2), AccountId(3));
        let receipt = |seq| LogEntry::Receipt { peer: c, kind: ReceiptKind::Read, up_to: seq, at_ms: 9 };
        {
            // A store as format 3 wrote it: the log and the marks in six tables.
            let db = redb::Database::open(&path).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(META).unwrap().insert(FORMAT, &3u64.to_be_bytes()[..]).unwrap();
            assert!(txn.delete_table(ROWS).unwrap());
            let mut log = txn.open_table(LOG).unwrap();
            for (account, seq) in [(a, 1), (a, 2), (b, 1)] {
                log.insert((account.0, seq), encode_entry(&receipt(seq)).as_slice()).unwrap();
            }
            drop(log);
            txn.open_table(COUNTERS).unwrap().insert(a.0, (7, 3)).unwrap();
            let mut cursors = txn.open_table(CURSORS).unwrap();
            cursors.insert((a.0, 0), 6).unwrap();
            cursors.insert((a.0, 1), 5).unwrap();
            cursors.insert((b.0, 4), 0).unwrap();
            drop(cursors);
            txn.open_table(INBOUND).unwrap().insert((a.0, b.0), 4).unwrap();
            let mut receipts = txn.open_table(RECEIPTS).unwrap();
            receipts.insert((a.0, b.0, 0), 2).unwrap();
            receipts.insert((a.0, b.0, 1), 1).unwrap();
            receipts.insert((a.0, c.0, READ_MARKER_SLOT), 3).unwrap();
            receipts.insert((a.0, c.0, RECEIVED_SLOT), 6).unwrap();
            drop(receipts);
            txn.open_table(CONTACTS).unwrap().insert((a.0, b.0), ()).unwrap();
            txn.commit().unwrap();
        }
        for _ in 0..2 {
            // Upgraded on the first open; the second finds format 4 and changes nothing.
            let store = RedbStore::open(&path).unwrap();
            assert_eq!(store.account_state(a).await.unwrap().counters, Counters { next_seq: 7, next_outbox: 3 });
            assert_eq!(store.account_state(b).await.unwrap().counters, Counters::default());
            assert_eq!(store.cursor(a, DeviceId(0)).await.unwrap(), Some(6));
            assert_eq!(store.cursor(a, DeviceId(1)).await.unwrap(), Some(5));
            assert_eq!(store.cursor(b, DeviceId(4)).await.unwrap(), Some(0), "a cursor at 0 is still there");
            assert_eq!(store.cursor(a, DeviceId(4)).await.unwrap(), None);
            assert_eq!(store.inbound(a, b).await.unwrap(), 4);
            assert_eq!(store.inbound(a, c).await.unwrap(), 0);
            assert_eq!(store.read_log(a, 0, 10).await.unwrap(), vec![(1, receipt(1)), (2, receipt(2))]);
            assert_eq!(store.read_log_before(a, 2, 10).await.unwrap(), vec![(1, receipt(1))]);
            assert_eq!(store.read_log(b, 0, 10).await.unwrap(), vec![(1, receipt(1))]);
            assert!(store.read_log(c, 0, 10).await.unwrap().is_empty());
            assert_eq!(store.receipt(a, b, ReceiptKind::Delivered).await.unwrap(), 2);
            assert_eq!(store.receipt(a, b, ReceiptKind::Read).await.unwrap(), 1);
            assert_eq!(store.read_marker(a, c).await.unwrap(), 3);
            assert_eq!(store.received(a, c).await.unwrap(), 6);
            let receipts = store.receipt_state(a).await.unwrap();
            assert_eq!(receipts.received, vec![(b, 2, 1)]);
            assert_eq!(receipts.read_markers, vec![(c, 3)]);
            assert!(store.is_contact(a, b).await.unwrap());
            assert!(!store.is_contact(a, c).await.unwrap(), "marks about a peer do not make it a contact");
            let txn = store.db.begin_read().unwrap();
            let format = txn.open_table(META).unwrap().get(FORMAT).unwrap().map(|v| v.value().to_vec());
            assert_eq!(format, Some(4u64.to_be_bytes().to_vec()));
            let tables: Vec<String> = txn.list_tables().unwrap().map(|t| t.name().to_owned()).collect();
            for gone in ["log", "counters", "cursors", "inbound", "receipts", "contacts"] {
                assert!(!tables.iter().any(|t| t == gone), "{gone} is still there: {tables:?}");
            }
        }
    }

    #[tokio::test]
    async fn marks_about_peer_zero_are_refused_and_the_own_row_stays() {
        // Peer 0 is no account, and its key is the account's own row.
        let store = RedbStore::in_memory().unwrap();
        let (a, zero) = (AccountId(1), AccountId(0));
        let mut w = AccountWrite::new(a);
        w.counters = Some(Counters { next_seq: 5, next_outbox: 2 });
        w.cursors.push((DeviceId(3), 4));
        store.apply(w).await.unwrap();
        let mut w = AccountWrite::new(a);
        w.inbound.push((zero, 9));
        assert!(matches!(store.apply(w).await, Err(StoreError::Invariant(_))));
        let mut w = AccountWrite::new(a);
        w.contacts.push(zero);
        assert!(matches!(store.apply(w).await, Err(StoreError::Invariant(_))));
        assert!(matches!(store.add_contact(a, zero).await, Err(StoreError::Invariant(_))));
        assert_eq!(store.account_state(a).await.unwrap().counters, Counters { next_seq: 5, next_outbox: 2 });
        assert_eq!(store.cursor(a, DeviceId(3)).await.unwrap(), Some(4));
        assert_eq!(store.inbound(a, zero).await.unwrap(), 0, "read as nothing, not as the own row");
        assert!(!store.is_contact(a, zero).await.unwrap());
        assert_eq!(store.receipt_state(a).await.unwrap(), ReceiptState::default());
    }

    /// The first write of a commit carries the others' answers: read, or
    /// dropped unread by a cancelled task, it answers each of them.
    #[test]
    fn a_commits_answer_reaches_every_write_of_it_whoever_reads_it() {
        let relayed = |read: bool| {
            let (first, first_rx) = oneshot::channel::<Answer>();
            let (second, mut second_rx) = oneshot::channel();
            let (third, mut third_rx) = oneshot::channel();
            let (gone, gone_rx) = oneshot::channel::<Answer>();
            drop(gone_rx); // that write's task is gone: nothing to answer, nothing breaks
            let rest = vec![(second, Ok(())), (third, Err(StoreError::Closed)), (gone, Ok(()))];
            assert!(first.send(Answer { result: Err(StoreError::Closed), rest }).is_ok());
            if read {
                let answer = first_rx.blocking_recv().unwrap();
                assert!(matches!(answer.into_result(), Err(StoreError::Closed)));
            } else {
                drop(first_rx);
            }
            let second = second_rx.try_recv().expect("the second write is answered");
            let third = third_rx.try_recv().expect("the third write is answered");
            assert!(second.rest.is_empty() && third.rest.is_empty());
            assert!(second.into_result().is_ok());
            assert!(matches!(third.into_result(), Err(StoreError::Closed)));
        };
        relayed(true);
        relayed(false);
    }

    /// The nice value of `store`'s committer thread, as the kernel reports
    /// it in /proc, once the thread has set it.
    #[cfg(target_os = "linux")]
    fn committer_nice(store: &RedbStore) -> i32 {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let tid = loop {
            match store.committer.tid.load(std::sync::atomic::Ordering::Acquire) {
                0 => {
                    assert!(std::time::Instant::now() < deadline, "the committer did not start");
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                tid => break tid,
            }
        };
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
        assert!(stat.contains("(skylark-commit)"), "{stat}");
        // After the name: state is field 3 and nice field 19.
        stat.rsplit_once(") ").unwrap().1.split(' ').nth(16).unwrap().parse().unwrap()
    }

    /// The committer thread runs [`COMMITTER_NICE`] below the thread that
    /// opened the store, unless the options say otherwise.
    #[cfg(target_os = "linux")]
    #[test]
    fn the_committer_runs_below_the_rest_of_the_server_unless_told_not_to() {
        let own = rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap();
        let expected = (own + i32::from(COMMITTER_NICE)).min(19);
        assert!(expected > own, "this test needs a thread below nice 19");
        assert_eq!(committer_nice(&RedbStore::in_memory().unwrap()), expected);

        let dir = tempfile::tempdir().unwrap();
        let options = RedbOptions { committer_nice: 0, ..RedbOptions::default() };
        let level = RedbStore::open_with(&dir.path().join("db.redb"), options).unwrap();
        assert_eq!(committer_nice(&level), own, "told 0, the committer keeps the opener's priority");
        let options = RedbOptions { committer_nice: 3, ..RedbOptions::default() };
        let three = RedbStore::open_with(&dir.path().join("three.redb"), options).unwrap();
        assert_eq!(committer_nice(&three), (own + 3).min(19));
    }

    #[tokio::test]
    async fn file_backend_keeps_data_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.redb");
        let phone = PhoneNumber::parse("+15550000001").unwrap();
        let first = {
            let store = RedbStore::open(&path).unwrap();
            let reg = store.register(&phone, NewDevice { public_key: [1; 32], name: "a".into() }, 5).await.unwrap();
            assert_eq!(store.server_id([7; 16]).await.unwrap(), [7; 16]);
            reg
        };
        let store = RedbStore::open(&path).unwrap();
        assert_eq!(store.account_by_phone(&phone).await.unwrap(), Some(first.account));
        assert_eq!(store.device(first.device.id).await.unwrap(), Some(first.device));
        assert_eq!(store.server_id([9; 16]).await.unwrap(), [7; 16], "server id is stable");
    }
}
