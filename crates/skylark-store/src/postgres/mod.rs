//! The PostgreSQL backend: the same traits as the embedded store, on one
//! or more PostgreSQL databases ("shards").
//!
//! **Sharding.** Every account and group belongs to one shard, chosen from
//! its id by [`shard_of`]; its log, outbox, counters, dedupe state, cursors,
//! receipts, contacts, settings and (for a group) state and memberships
//! live there, so an actor's write touches one database and the message
//! path never needs a cross-shard transaction. The directory — phone →
//! account, account and device records, verification sessions, push
//! targets, id counters and the server's identity — lives on the first
//! shard. Each shard records which place in which store it is, and a list
//! that does not match (reordered, shortened, lengthened, or a database
//! swapped for an empty one) is refused at start.
//!
//! **Acked means committed.** [`MessageStore::apply`] joins a shard's group
//! commit: a committer takes every write queued for that shard (up to
//! `max_batch`) and applies them all in one SQL statement, which
//! PostgreSQL runs as one transaction and commits with the configured
//! `synchronous_commit` (never `off`) before any caller is answered.
//! Several committers per shard may run at once (`commit_tasks`); one
//! actor never has two writes in flight, so its writes stay in order.
//!
//! **Schema.** Migrations are embedded ([`MIGRATIONS`]) and applied at
//! start by sqlx's migrator, under its advisory lock; a database whose
//! schema is newer than this binary knows is refused, untouched.

mod target;
pub mod throwaway;

use crate::record::{StoredOutbox, decode_entry, decode_outbox, encode_entry, encode_outbox, kind_byte};
use crate::{
    AccountState, AccountStore, AccountWrite, Acquired, AddDeviceError, Beat, ClaimedKey, Counters, GroupStore,
    KeyPackageStore, KeyStock, LeaseStore, MessageStore, MetaStore, NodeRecord, PushTarget, ReceiptState, Registration,
    SettingsStore, StoreError, VerificationStore, Visibility,
};
use async_trait::async_trait;
use skylark_core::group::GroupMeta;
use skylark_core::message::{Forward, LogEntry, OutboxItem, ReceiptKind};
use skylark_core::verification::VerificationSession;
use skylark_core::{Account, AccountId, Device, DeviceId, NewDevice, PhoneNumber};
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::{Connection, Row};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::{Mutex, mpsc, oneshot};

use target::Target;
pub use target::hide_password;

/// The marks table's slots (`record`), as the int2 PostgreSQL stores.
const READ_MARKER_SLOT: i16 = crate::record::READ_MARKER_SLOT as i16;
const RECEIVED_SLOT: i16 = crate::record::RECEIVED_SLOT as i16;

/// The embedded schema migrations, oldest first.
pub const MIGRATIONS: &[(i64, &str, &str)] = &[
    (1, "schema", include_str!("../../migrations/0001_schema.sql")),
    (2, "cluster", include_str!("../../migrations/0002_cluster.sql")),
    (3, "key_packages", include_str!("../../migrations/0003_key_packages.sql")),
    (4, "conversation_features", include_str!("../../migrations/0004_conversation_features.sql")),
    (5, "expiries", include_str!("../../migrations/0005_expiries.sql")),
];

/// The newest schema version this binary knows.
pub fn schema_version() -> i64 {
    MIGRATIONS.last().map(|m| m.0).unwrap_or(0)
}

/// How the PostgreSQL store connects and commits.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// One URL per shard; the first also holds the directory. A URL may
    /// name several hosts (`postgres://u@h1,h2/db?target_session_attrs=read-write`).
    pub shards: Vec<String>,
    /// Connections per shard.
    pub pool_size: u32,
    /// Upper bound on writes merged into one commit.
    pub max_batch: usize,
    /// Group commits in flight at once per shard.
    pub commit_tasks: usize,
    /// PostgreSQL's `synchronous_commit` for every connection: `on`
    /// (flushed to this server's disk, and to a synchronous standby's when
    /// one is configured), `remote_apply`, `remote_write` or `local`;
    /// `off` is refused (an ack would not mean committed).
    pub synchronous_commit: String,
    /// How long an operation waits for a connection before failing (while
    /// the database is down, sends wait this long, then get an error).
    pub acquire_timeout: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self {
            shards: Vec::new(),
            pool_size: 16,
            max_batch: 1024,
            commit_tasks: 2,
            synchronous_commit: "on".into(),
            acquire_timeout: Duration::from_secs(5),
        }
    }
}

/// The shard of an account or group id among `count`: a fixed mix of the
/// id (so sequential ids spread evenly) modulo the count. Part of the
/// stored layout: it must never change.
pub fn shard_of(id: AccountId, count: usize) -> usize {
    let mut z = id.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z % count.max(1) as u64) as usize
}

/// A shard's pool and, for a multi-host URL, which host it uses.
pub(crate) struct Conn {
    index: usize,
    target: Target,
    pub(crate) pool: PgPool,
    /// One connection of its own for cluster heartbeats, so a node whose
    /// pool is saturated by traffic still beats in time: a late heartbeat
    /// is a lapsed lease, which would hand every actor away and make an
    /// overload worse.
    beats: PgPool,
    host: AtomicUsize,
    choosing: AtomicBool,
}

impl Conn {
    /// A failed database call as a store error. A lost connection to a
    /// multi-host shard starts a search for the host that accepts writes.
    pub(crate) fn fail(self: &Arc<Self>, e: sqlx::Error) -> StoreError {
        if self.target.hosts.len() > 1 && is_connection_error(&e) && !self.choosing.swap(true, Ordering::AcqRel) {
            let conn = self.clone();
            tokio::spawn(async move {
                let _ = conn.choose_host().await;
                tokio::time::sleep(Duration::from_millis(250)).await;
                conn.choosing.store(false, Ordering::Release);
            });
        }
        StoreError::backend(e)
    }

    /// Tries each host in order and points the pool at the first that
    /// accepts writes (or, without `read-write`, that answers). On failure,
    /// says what each host answered.
    async fn choose_host(&self) -> Result<(), String> {
        let mut why = Vec::new();
        for (i, options) in self.target.hosts.iter().enumerate() {
            let attempt = async {
                let mut conn = PgConnection::connect_with(options).await?;
                let standby: bool = sqlx::query_scalar("SELECT pg_is_in_recovery()").fetch_one(&mut conn).await?;
                let _ = conn.close().await;
                Ok::<bool, sqlx::Error>(standby)
            };
            let host = &self.target.names[i];
            match tokio::time::timeout(Duration::from_secs(3), attempt).await {
                Ok(Ok(true)) if self.target.read_write => why.push(format!("{host} is a standby (read-only)")),
                Ok(Ok(_)) => {
                    if self.host.swap(i, Ordering::AcqRel) != i {
                        tracing::warn!(shard = self.index, %host, "store shard moved to another host");
                    }
                    self.pool.set_connect_options(options.clone());
                    self.beats.set_connect_options(options.clone());
                    return Ok(());
                }
                Ok(Err(e)) => why.push(format!("{host}: {}", connect_error(&e))),
                Err(_) => why.push(format!("{host} did not answer within 3 seconds")),
            }
        }
        Err(why.join("; "))
    }
}

/// A connection failure as an operator reads it.
fn connect_error(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(db) => db.message().to_owned(),
        sqlx::Error::Io(io) => io.to_string(),
        other => other.to_string(),
    }
}

fn is_connection_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::PoolClosed => true,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            code.starts_with("57P") || code.starts_with("08") || code == "25006"
        }
        _ => false,
    }
}

type CommitJob = (AccountWrite, oneshot::Sender<Result<(), StoreError>>);

/// A client-id lookup waiting to join a batch: (account, device, client id).
type LookupJob = ((i64, i64, String), oneshot::Sender<Result<Option<u64>, StoreError>>);

struct Shard {
    conn: Arc<Conn>,
    queue: mpsc::Sender<CommitJob>,
    lookups: mpsc::Sender<LookupJob>,
}

/// The PostgreSQL store. Cheap to clone; the committers stop when the last
/// clone is dropped.
#[derive(Clone)]
pub struct PgStore {
    shards: Arc<Vec<Shard>>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").field("shards", &self.shards.len()).finish_non_exhaustive()
    }
}

fn int(v: u64) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError::Invariant(format!("{v} does not fit the database's int8")))
}

/// A bound for a range query: values past int8 mean "no bound".
fn bound(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn uint(v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Corrupt(format!("negative id or sequence {v}")))
}

fn json<T: serde::Serialize>(value: &T) -> Result<String, StoreError> {
    serde_json::to_string(value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn from_json<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// The shard's place in the store, kept in its `meta` table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Identity {
    store: String,
    index: usize,
    count: usize,
}

const IDENTITY: &str = "shard";

impl PgStore {
    /// Connects to every shard, applies the migrations, checks the shard
    /// list against what the shards record, and starts the committers.
    pub async fn open(options: &PgOptions) -> Result<PgStore, StoreError> {
        if options.shards.is_empty() {
            return Err(StoreError::Unusable("the PostgreSQL store needs at least one database URL".into()));
        }
        let sync = options.synchronous_commit.as_str();
        if !["on", "remote_apply", "remote_write", "local"].contains(&sync) {
            return Err(StoreError::Unusable(format!(
                "synchronous_commit = {sync:?} is not allowed: use \"on\" (the default), \"remote_apply\", \
                 \"remote_write\" or \"local\"; \"off\" would acknowledge messages before they are committed"
            )));
        }
        let mut conns = Vec::new();
        for (index, url) in options.shards.iter().enumerate() {
            conns.push(Arc::new(connect(index, url, options).await?));
        }
        for conn in &conns {
            migrate(conn).await?;
        }
        check_identities(&conns).await?;
        let mut shards = Vec::new();
        for conn in conns {
            let (queue, jobs) = mpsc::channel(8192);
            let jobs = Arc::new(Mutex::new(jobs));
            for _ in 0..options.commit_tasks.max(1) {
                tokio::spawn(commit_loop(conn.clone(), jobs.clone(), options.max_batch.max(1)));
            }
            let (lookups, asked) = mpsc::channel(8192);
            let asked = Arc::new(Mutex::new(asked));
            for _ in 0..options.commit_tasks.max(1) {
                tokio::spawn(lookup_loop(conn.clone(), asked.clone()));
            }
            shards.push(Shard { conn, queue, lookups });
        }
        Ok(PgStore { shards: Arc::new(shards) })
    }

    pub(crate) fn shard_conns(&self) -> impl Iterator<Item = &Arc<Conn>> {
        self.shards.iter().map(|s| &s.conn)
    }

    fn directory(&self) -> &Arc<Conn> {
        &self.shards[0].conn
    }

    fn shard(&self, id: AccountId) -> &Shard {
        &self.shards[shard_of(id, self.shards.len())]
    }

    fn conn(&self, id: AccountId) -> &Arc<Conn> {
        &self.shard(id).conn
    }

    /// Whether an account's rows live with the directory.
    fn with_directory(&self, id: AccountId) -> bool {
        shard_of(id, self.shards.len()) == 0
    }

    /// How many shards the store spreads accounts over.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }
}

async fn connect(index: usize, url: &str, options: &PgOptions) -> Result<Conn, StoreError> {
    let mut target = Target::parse(url)?;
    for host in &mut target.hosts {
        *host = host.clone().options([("synchronous_commit", options.synchronous_commit.as_str())]);
    }
    let read_write = target.read_write;
    let pool_of = |size: u32| {
        PgPoolOptions::new()
            .max_connections(size)
            .acquire_timeout(options.acquire_timeout)
            // No ping before every query (a round trip each): a connection
            // that broke fails its next query instead, which the caller sees
            // as a failed read or write (and an actor restarts), the same as
            // a connection lost mid-query.
            .test_before_acquire(false)
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if read_write {
                        let standby: bool =
                            sqlx::query_scalar("SELECT pg_is_in_recovery()").fetch_one(&mut *conn).await?;
                        if standby {
                            return Err(sqlx::Error::Protocol("the server is a standby (read-only)".into()));
                        }
                    }
                    Ok(())
                })
            })
    };
    let pool = pool_of(options.pool_size.max(1))
        // Opened ahead: a PostgreSQL connection costs a process fork and
        // statement preparation, which must not land on the first messages.
        .min_connections(options.pool_size.max(1))
        .connect_lazy_with(target.hosts[0].clone());
    // Opened on the first heartbeat (single-node servers never beat).
    let beats = pool_of(1).connect_lazy_with(target.hosts[0].clone());
    let conn = Conn { index, target, pool, beats, host: AtomicUsize::new(0), choosing: AtomicBool::new(false) };
    if let Err(why) = conn.choose_host().await {
        let wanted = if conn.target.read_write { " that accepts writes" } else { "" };
        return Err(StoreError::Unusable(format!(
            "cannot reach a PostgreSQL server{wanted} at {} (shard {index}): {why}. Check that it is running and \
             that the URL (host, port, user, database) is right.",
            conn.target.shown
        )));
    }
    Ok(conn)
}

/// The migrations as sqlx's migrator wants them.
#[derive(Debug)]
struct Embedded;

impl<'s> sqlx::migrate::MigrationSource<'s> for Embedded {
    fn resolve(
        self,
    ) -> futures_util::future::BoxFuture<'s, Result<Vec<sqlx::migrate::Migration>, sqlx::error::BoxDynError>> {
        Box::pin(async {
            Ok(MIGRATIONS
                .iter()
                .map(|(version, name, sql)| {
                    sqlx::migrate::Migration::new(
                        *version,
                        (*name).into(),
                        sqlx::migrate::MigrationType::Simple,
                        (*sql).into(),
                        false,
                    )
                })
                .collect())
        })
    }
}

/// Refuses a schema newer than this binary's, then applies what is missing.
async fn migrate(conn: &Arc<Conn>) -> Result<(), StoreError> {
    let fail = |e| conn.fail(e);
    let known: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(&conn.pool)
        .await
        .map_err(fail)?;
    if known {
        let newest: i64 = sqlx::query_scalar("SELECT coalesce(max(version), 0) FROM _sqlx_migrations")
            .fetch_one(&conn.pool)
            .await
            .map_err(fail)?;
        if newest > schema_version() {
            return Err(StoreError::Unusable(format!(
                "the database {} has Skylark schema version {newest}; this binary knows versions up to {}. Run the \
                 newer binary, or restore a backup made by this version.",
                conn.target.shown,
                schema_version()
            )));
        }
    }
    let migrator = sqlx::migrate::Migrator::new(Embedded).await.map_err(StoreError::backend)?;
    migrator.run(&conn.pool).await.map_err(|e| {
        StoreError::Unusable(format!("could not bring the schema of {} up to date: {e}", conn.target.shown))
    })
}

async fn identity(conn: &Arc<Conn>) -> Result<Option<Identity>, StoreError> {
    let raw: Option<Vec<u8>> = sqlx::query_scalar("SELECT value FROM meta WHERE key = $1")
        .bind(IDENTITY)
        .fetch_optional(&conn.pool)
        .await
        .map_err(|e| conn.fail(e))?;
    raw.map(|r| serde_json::from_slice(&r).map_err(|e| StoreError::Corrupt(format!("shard identity: {e}")))).transpose()
}

pub(crate) async fn holds_data(conn: &Arc<Conn>) -> Result<bool, StoreError> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM counters) OR EXISTS (SELECT 1 FROM log) OR EXISTS (SELECT 1 FROM accounts)",
    )
    .fetch_one(&conn.pool)
    .await
    .map_err(|e| conn.fail(e))
}

/// Checks that the configured list is the one the store was made with:
/// the same databases, in the same order. A new store writes the list:
/// the other shards first, the directory last, so a start that fails
/// halfway is completed by the next.
async fn check_identities(conns: &[Arc<Conn>]) -> Result<(), StoreError> {
    let count = conns.len();
    let mut found = Vec::new();
    for conn in conns {
        found.push(identity(conn).await?);
    }
    let refuse = |i: usize, why: String| {
        StoreError::Unusable(format!(
            "the store's shard list does not match the databases: shard {i} ({}) {why}. Give the shard URLs in the \
             order the store was set up with (resharding is not supported).",
            conns[i].target.shown
        ))
    };
    if let Some(dir) = &found[0] {
        if dir.index != 0 {
            return Err(refuse(0, format!("is shard {} of the store", dir.index)));
        }
        if dir.count != count {
            return Err(refuse(0, format!("says the store has {} shards, but {count} are configured", dir.count)));
        }
        for (i, id) in found.iter().enumerate() {
            match id {
                None => return Err(refuse(i, "is an empty database, not the one the store was set up with".into())),
                Some(id) if id.store != dir.store => return Err(refuse(i, "belongs to another Skylark store".into())),
                Some(id) if id.index != i => return Err(refuse(i, format!("is shard {} of the store", id.index))),
                Some(_) => {}
            }
        }
        return Ok(());
    }
    if holds_data(&conns[0]).await? {
        return Err(refuse(0, "holds data but no shard identity".into()));
    }
    let store = {
        use std::hash::{BuildHasher, Hasher};
        let a = std::collections::hash_map::RandomState::new().build_hasher().finish();
        let b = std::collections::hash_map::RandomState::new().build_hasher().finish();
        format!("{a:016x}{b:016x}")
    };
    for i in (0..count).rev() {
        if i > 0
            && let Some(id) = &found[i]
        {
            // Left by a first start that stopped halfway, or another store's.
            if id.index != i || id.count != count || holds_data(&conns[i]).await? {
                return Err(refuse(i, "belongs to another Skylark store".into()));
            }
        }
        let value = serde_json::to_vec(&Identity { store: store.clone(), index: i, count })
            .map_err(|e| StoreError::Corrupt(e.to_string()))?;
        sqlx::query("INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = $2")
            .bind(IDENTITY)
            .bind(value)
            .execute(&conns[i].pool)
            .await
            .map_err(|e| conns[i].fail(e))?;
    }
    Ok(())
}

/// One group commit's rows, folded so that each key appears once (the
/// last write wins, as if the writes ran one after another) and sorted, so
/// concurrent commits lock rows in the same order.
#[derive(Default)]
struct Rows {
    log: Vec<(i64, i64, Vec<u8>)>,
    /// Entries rewritten in place (payloads purged).
    replaces: BTreeMap<(i64, i64), Vec<u8>>,
    /// (expires at, account, seq) of new disappearing entries.
    expiries: Vec<(i64, i64, i64)>,
    outbox: BTreeMap<(i64, i64), Option<Vec<u8>>>,
    counters: BTreeMap<i64, (i64, i64)>,
    client_ids: BTreeMap<(i64, i64, String), i64>,
    inbound: BTreeMap<(i64, i64), i64>,
    cursors: BTreeMap<(i64, i64), i64>,
    receipts: BTreeMap<(i64, i64, i16), i64>,
    contacts: BTreeSet<(i64, i64)>,
    groups: BTreeMap<i64, String>,
    memberships: BTreeMap<(i64, i64), bool>,
    /// (actor, epoch) of every write that carries one (cluster mode).
    fence: Vec<(i64, i64)>,
}

impl Rows {
    fn add(&mut self, w: &AccountWrite) -> Result<(), StoreError> {
        let a = int(w.account.0)?;
        if let Some(epoch) = w.epoch {
            self.fence.push((a, int(epoch)?));
        }
        for (seq, entry) in &w.appends {
            self.log.push((a, int(*seq)?, encode_entry(entry)));
        }
        for (at, seq) in w.expiries() {
            self.expiries.push((int(at)?, a, int(seq)?));
        }
        for (seq, entry) in &w.replaces {
            let seq = int(*seq)?;
            // An entry appended earlier in the same commit is rewritten
            // before it is inserted (one statement cannot update a row it
            // inserts).
            match self.log.iter_mut().find(|(acc, s, _)| *acc == a && *s == seq) {
                Some(row) => row.2 = encode_entry(entry),
                None => {
                    self.replaces.insert((a, seq), encode_entry(entry));
                }
            }
        }
        for (seq, item) in &w.outbox_puts {
            self.outbox.insert((a, int(*seq)?), Some(encode_outbox(item)));
        }
        for seq in &w.outbox_deletes {
            self.outbox.insert((a, int(*seq)?), None);
        }
        if let Some(c) = w.counters {
            self.counters.insert(a, (int(c.next_seq)?, int(c.next_outbox)?));
        }
        for (device, client_id, seq) in &w.client_ids {
            self.client_ids.insert((a, int(device.0)?, client_id.clone()), int(*seq)?);
        }
        for (source, hwm) in &w.inbound {
            self.inbound.insert((a, int(source.0)?), int(*hwm)?);
        }
        for (device, seq) in &w.cursors {
            self.cursors.insert((a, int(device.0)?), int(*seq)?);
        }
        for (peer, up_to) in &w.received {
            self.receipts.insert((a, int(peer.0)?, RECEIVED_SLOT), int(*up_to)?);
        }
        for (peer, kind, up_to) in &w.receipts {
            self.receipts.insert((a, int(peer.0)?, i16::from(kind_byte(*kind))), int(*up_to)?);
        }
        for (peer, up_to) in &w.read_markers {
            self.receipts.insert((a, int(peer.0)?, READ_MARKER_SLOT), int(*up_to)?);
        }
        for peer in &w.contacts {
            self.contacts.insert((a, int(peer.0)?));
        }
        if let Some(meta) = &w.group {
            self.groups.insert(a, json(meta)?);
        }
        for (member, joined) in &w.memberships {
            self.memberships.insert((int(member.0)?, a), *joined);
        }
        Ok(())
    }

    fn count(&self) -> usize {
        self.log.len()
            + self.replaces.len()
            + self.expiries.len()
            + self.outbox.len()
            + self.counters.len()
            + self.client_ids.len()
            + self.inbound.len()
            + self.cursors.len()
            + self.receipts.len()
            + self.contacts.len()
            + self.groups.len()
            + self.memberships.len()
    }
}

/// Every change of a group commit in one statement: PostgreSQL runs it as
/// one transaction, in one round trip. Log and outbox rows are only ever
/// inserted (a second write of the same sequence is an error, never an
/// overwrite of an acknowledged message); marks are upserts.
const APPLY: &str = "
WITH
lg AS (INSERT INTO log (account, seq, entry) SELECT * FROM unnest($1::int8[], $2::int8[], $3::bytea[])),
op AS (INSERT INTO outbox (account, seq, item) SELECT * FROM unnest($4::int8[], $5::int8[], $6::bytea[])),
od AS (DELETE FROM outbox o USING unnest($7::int8[], $8::int8[]) AS d(account, seq)
       WHERE o.account = d.account AND o.seq = d.seq),
ct AS (INSERT INTO counters (account, next_seq, next_outbox) SELECT * FROM unnest($9::int8[], $10::int8[], $11::int8[])
       ON CONFLICT (account) DO UPDATE SET next_seq = EXCLUDED.next_seq, next_outbox = EXCLUDED.next_outbox),
ci AS (INSERT INTO client_ids (account, device, client_id, seq)
       SELECT * FROM unnest($12::int8[], $13::int8[], $14::text[], $15::int8[])
       ON CONFLICT (account, device, client_id) DO UPDATE SET seq = EXCLUDED.seq),
ib AS (INSERT INTO inbound (account, source, hwm) SELECT * FROM unnest($16::int8[], $17::int8[], $18::int8[])
       ON CONFLICT (account, source) DO UPDATE SET hwm = EXCLUDED.hwm),
cu AS (INSERT INTO cursors (account, device, seq) SELECT * FROM unnest($19::int8[], $20::int8[], $21::int8[])
       ON CONFLICT (account, device) DO UPDATE SET seq = EXCLUDED.seq),
rc AS (INSERT INTO receipts (account, peer, slot, hwm)
       SELECT * FROM unnest($22::int8[], $23::int8[], $24::int2[], $25::int8[])
       ON CONFLICT (account, peer, slot) DO UPDATE SET hwm = EXCLUDED.hwm),
cn AS (INSERT INTO contacts (account, peer) SELECT * FROM unnest($26::int8[], $27::int8[]) ON CONFLICT DO NOTHING),
gr AS (INSERT INTO groups (id, meta) SELECT i, m::jsonb FROM unnest($28::int8[], $29::text[]) AS t(i, m)
       ON CONFLICT (id) DO UPDATE SET meta = EXCLUDED.meta),
mj AS (INSERT INTO memberships (member, group_id) SELECT * FROM unnest($30::int8[], $31::int8[]) ON CONFLICT DO NOTHING),
ml AS (DELETE FROM memberships m USING unnest($32::int8[], $33::int8[]) AS d(member, group_id)
       WHERE m.member = d.member AND m.group_id = d.group_id),
ex AS (INSERT INTO expiries (expires_at, account, seq) SELECT * FROM unnest($36::int8[], $37::int8[], $38::int8[])
       ON CONFLICT DO NOTHING),
rw AS (UPDATE log SET entry = r.entry FROM unnest($39::int8[], $40::int8[], $41::bytea[]) AS r(account, seq, entry)
       WHERE log.account = r.account AND log.seq = r.seq)
SELECT skylark_fence($34::int8[], $35::int8[])";

fn unzip3<A, B, C>(rows: impl Iterator<Item = (A, B, C)>) -> (Vec<A>, Vec<B>, Vec<C>) {
    let (mut a, mut b, mut c) = (Vec::new(), Vec::new(), Vec::new());
    for (x, y, z) in rows {
        a.push(x);
        b.push(y);
        c.push(z);
    }
    (a, b, c)
}

async fn execute(pool: &PgPool, rows: Rows) -> Result<(), sqlx::Error> {
    let (fa, fe): (Vec<i64>, Vec<i64>) = rows.fence.into_iter().unzip();
    let (la, ls, le) = unzip3(rows.log.into_iter());
    let (xt, xa, xs) = unzip3(rows.expiries.into_iter());
    let (wa, ws, we) = unzip3(rows.replaces.into_iter().map(|((a, s), e)| (a, s, e)));
    let (mut pa, mut ps, mut pi, mut da, mut ds) = (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for ((a, s), item) in rows.outbox {
        match item {
            Some(item) => {
                pa.push(a);
                ps.push(s);
                pi.push(item);
            }
            None => {
                da.push(a);
                ds.push(s);
            }
        }
    }
    let (ca, cs, co) = unzip3(rows.counters.into_iter().map(|(a, (s, o))| (a, s, o)));
    let (mut ia, mut idv, mut ic, mut is) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for ((a, d, c), s) in rows.client_ids {
        ia.push(a);
        idv.push(d);
        ic.push(c);
        is.push(s);
    }
    let (na, ns, nh) = unzip3(rows.inbound.into_iter().map(|((a, s), h)| (a, s, h)));
    let (ua, ud, us) = unzip3(rows.cursors.into_iter().map(|((a, d), s)| (a, d, s)));
    let (mut ra, mut rp, mut rs, mut rh) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for ((a, p, s), h) in rows.receipts {
        ra.push(a);
        rp.push(p);
        rs.push(s);
        rh.push(h);
    }
    let (ta, tp): (Vec<i64>, Vec<i64>) = rows.contacts.into_iter().unzip();
    let (gi, gm): (Vec<i64>, Vec<String>) = rows.groups.into_iter().unzip();
    let (mut jm, mut jg, mut lm, mut lgp) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for ((m, g), joined) in rows.memberships {
        if joined {
            jm.push(m);
            jg.push(g);
        } else {
            lm.push(m);
            lgp.push(g);
        }
    }
    sqlx::query(APPLY)
        .bind(la)
        .bind(ls)
        .bind(le)
        .bind(pa)
        .bind(ps)
        .bind(pi)
        .bind(da)
        .bind(ds)
        .bind(ca)
        .bind(cs)
        .bind(co)
        .bind(ia)
        .bind(idv)
        .bind(ic)
        .bind(is)
        .bind(na)
        .bind(ns)
        .bind(nh)
        .bind(ua)
        .bind(ud)
        .bind(us)
        .bind(ra)
        .bind(rp)
        .bind(rs)
        .bind(rh)
        .bind(ta)
        .bind(tp)
        .bind(gi)
        .bind(gm)
        .bind(jm)
        .bind(jg)
        .bind(lm)
        .bind(lgp)
        .bind(fa)
        .bind(fe)
        .bind(xt)
        .bind(xa)
        .bind(xs)
        .bind(wa)
        .bind(ws)
        .bind(we)
        .execute(pool)
        .await
        .map(|_| ())
}

/// A shard's committer: one statement (one transaction, one commit) for
/// every write queued at the time, then an answer to each.
async fn commit_loop(conn: Arc<Conn>, jobs: Arc<Mutex<mpsc::Receiver<CommitJob>>>, max_batch: usize) {
    loop {
        let mut batch: Vec<CommitJob> = Vec::new();
        {
            let mut jobs = jobs.lock().await;
            match jobs.recv().await {
                Some(job) => batch.push(job),
                None => return,
            }
            while batch.len() < max_batch {
                match jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
        }
        // A write whose epoch is stale is answered "fenced" and the others
        // are committed without it (the statement checks epochs before it
        // changes anything, and fails as a whole).
        while !batch.is_empty() {
            let mut rows = Rows::default();
            let mut result = batch.iter().try_for_each(|(w, _)| rows.add(w));
            let written = rows.count();
            let mut stale = None;
            if result.is_ok() {
                let started = std::time::Instant::now();
                result = match execute(&conn.pool, rows).await {
                    Ok(()) => Ok(()),
                    Err(e) => {
                        stale = stale_actors(&e);
                        Err(conn.fail(e))
                    }
                };
                metrics::histogram!("skylark_store_commit_seconds").record(started.elapsed().as_secs_f64());
            }
            if let Some(stale) = stale {
                tracing::warn!(shard = conn.index, actors = ?stale, "writes with a stale ownership epoch refused");
                let (fenced, rest): (Vec<CommitJob>, Vec<CommitJob>) = batch.into_iter().partition(|(w, _)| {
                    let key = (i64::try_from(w.account.0).ok(), w.epoch.and_then(|e| i64::try_from(e).ok()));
                    stale.iter().any(|(a, e)| key == (Some(*a), Some(*e)))
                });
                // Each round removes at least one write; a refusal naming
                // none of them would repeat forever, so it fails the batch.
                let progress = !fenced.is_empty();
                for (_, reply) in fenced {
                    let _ = reply.send(Err(StoreError::Fenced));
                }
                batch = rest;
                if progress {
                    continue;
                }
            }
            match &result {
                Ok(()) => metrics::counter!("skylark_store_rows_written_total").increment(written as u64),
                Err(e) => tracing::error!(error = %e, shard = conn.index, writes = batch.len(), "group commit failed"),
            }
            metrics::histogram!("skylark_store_commit_batch_writes").record(batch.len() as f64);
            for (_, reply) in batch.drain(..) {
                let _ = reply.send(result.clone());
            }
        }
    }
}

/// The (actor, epoch) of each write a fencing refusal (`skylark_fence`,
/// SQLSTATE SKF01) named.
fn stale_actors(e: &sqlx::Error) -> Option<Vec<(i64, i64)>> {
    let db = e.as_database_error()?;
    if db.code().as_deref() != Some("SKF01") {
        return None;
    }
    let detail = db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()?.detail()?;
    let stale: Vec<(i64, i64)> = detail
        .split(',')
        .filter_map(|pair| {
            let (actor, epoch) = pair.trim().split_once(':')?;
            Some((actor.parse().ok()?, epoch.parse().ok()?))
        })
        .collect();
    (!stale.is_empty()).then_some(stale)
}

/// A shard's client-id lookups, batched as its writes are: every send of a
/// new message asks whether its client id was seen (a resend), and one
/// query for every lookup queued at the time costs PostgreSQL far less
/// than one query each (docs/BENCHMARKS.md, "Stores A/B").
async fn lookup_loop(conn: Arc<Conn>, jobs: Arc<Mutex<mpsc::Receiver<LookupJob>>>) {
    const MAX_LOOKUPS: usize = 1024;
    loop {
        let mut batch: Vec<LookupJob> = Vec::new();
        {
            let mut jobs = jobs.lock().await;
            match jobs.recv().await {
                Some(job) => batch.push(job),
                None => return,
            }
            while batch.len() < MAX_LOOKUPS {
                match jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
        }
        let (mut accounts, mut devices, mut ids) = (Vec::new(), Vec::new(), Vec::new());
        for ((a, d, c), _) in &batch {
            accounts.push(*a);
            devices.push(*d);
            ids.push(c.clone());
        }
        let found: Result<Vec<(i64, i64)>, StoreError> = sqlx::query_as(
            "SELECT t.i, c.seq FROM unnest($1::int8[], $2::int8[], $3::text[]) WITH ORDINALITY AS t(account, device, client_id, i) \
             JOIN client_ids c ON c.account = t.account AND c.device = t.device AND c.client_id = t.client_id",
        )
        .bind(accounts)
        .bind(devices)
        .bind(ids)
        .fetch_all(&conn.pool)
        .await
        .map_err(|e| conn.fail(e));
        match found {
            Ok(found) => {
                let mut answers: Vec<Option<u64>> = vec![None; batch.len()];
                for (i, seq) in found {
                    if let (Some(slot), Ok(seq)) =
                        (usize::try_from(i - 1).ok().and_then(|i| answers.get_mut(i)), uint(seq))
                    {
                        *slot = Some(seq);
                    }
                }
                for ((_, reply), answer) in batch.into_iter().zip(answers) {
                    let _ = reply.send(Ok(answer));
                }
            }
            Err(e) => {
                for (_, reply) in batch {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Takes the next id of a kind, in the caller's transaction.
async fn next_id(tx: &mut PgConnection, name: &str) -> Result<u64, sqlx::Error> {
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO id_counters (name, next) VALUES ($1, 2) ON CONFLICT (name) DO UPDATE SET next = id_counters.next + 1 \
         RETURNING next - 1",
    )
    .bind(name)
    .fetch_one(&mut *tx)
    .await?;
    Ok(id as u64)
}

/// Gives a new device its cursor at the end of its account's log.
async fn cursor_at_end(tx: &mut PgConnection, account: AccountId, device: DeviceId) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO cursors (account, device, seq) \
         SELECT $1, $2, coalesce((SELECT next_seq - 1 FROM counters WHERE account = $1), 0) \
         ON CONFLICT (account, device) DO NOTHING",
    )
    .bind(account.0 as i64)
    .bind(device.0 as i64)
    .execute(&mut *tx)
    .await
    .map(|_| ())
}

fn device_from(row: &PgRow) -> Result<Device, StoreError> {
    let get = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
    let key: Vec<u8> = row.try_get("public_key").map_err(get)?;
    let optional = |name: &str| -> Result<Option<u64>, StoreError> {
        row.try_get::<Option<i64>, _>(name).map_err(get)?.map(uint).transpose()
    };
    Ok(Device {
        id: DeviceId(uint(row.try_get("id").map_err(get)?)?),
        account_id: AccountId(uint(row.try_get("account_id").map_err(get)?)?),
        public_key: key.try_into().map_err(|_| StoreError::Corrupt("a device key is not 32 bytes".into()))?,
        name: row.try_get("name").map_err(get)?,
        created_at_ms: uint(row.try_get("created_at_ms").map_err(get)?)?,
        removed_at_ms: optional("removed_at_ms")?,
        last_seen_ms: optional("last_seen_ms")?,
    })
}

fn account_from(row: &PgRow) -> Result<Account, StoreError> {
    let get = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
    let phone: String = row.try_get("phone").map_err(get)?;
    Ok(Account {
        id: AccountId(uint(row.try_get("id").map_err(get)?)?),
        phone: PhoneNumber::parse(&phone).map_err(|_| StoreError::Corrupt(format!("stored phone {phone:?}")))?,
        created_at_ms: uint(row.try_get("created_at_ms").map_err(get)?)?,
    })
}

const DEVICE_COLUMNS: &str = "id, account_id, public_key, name, created_at_ms, removed_at_ms, last_seen_ms";

fn new_device(id: u64, account: AccountId, device: NewDevice, now_ms: u64) -> Device {
    Device {
        id: DeviceId(id),
        account_id: account,
        public_key: device.public_key,
        name: device.name,
        created_at_ms: now_ms,
        removed_at_ms: None,
        last_seen_ms: None,
    }
}

async fn insert_device(tx: &mut PgConnection, d: &Device) -> Result<(), StoreError> {
    sqlx::query("INSERT INTO devices (id, account_id, public_key, name, created_at_ms) VALUES ($1, $2, $3, $4, $5)")
        .bind(int(d.id.0)?)
        .bind(int(d.account_id.0)?)
        .bind(d.public_key.to_vec())
        .bind(&d.name)
        .bind(int(d.created_at_ms)?)
        .execute(&mut *tx)
        .await
        .map_err(StoreError::backend)?;
    Ok(())
}

impl PgStore {
    /// A device id of its own, committed before it is used.
    async fn allocate_device(&self) -> Result<u64, StoreError> {
        let dir = self.directory();
        let mut conn = dir.pool.acquire().await.map_err(|e| dir.fail(e))?;
        next_id(&mut conn, "device").await.map_err(|e| dir.fail(e))
    }

    /// Places a cursor on the account's own shard, in its own transaction.
    async fn place_cursor(&self, account: AccountId, device: DeviceId) -> Result<(), StoreError> {
        let shard = self.conn(account);
        let mut conn = shard.pool.acquire().await.map_err(|e| shard.fail(e))?;
        cursor_at_end(&mut conn, account, device).await.map_err(|e| shard.fail(e))
    }

    async fn account_by_phone_on(&self, phone: &str) -> Result<Option<Account>, StoreError> {
        let dir = self.directory();
        let row = sqlx::query("SELECT id, phone, created_at_ms FROM accounts WHERE phone = $1")
            .bind(phone)
            .fetch_optional(&dir.pool)
            .await
            .map_err(|e| dir.fail(e))?;
        row.as_ref().map(account_from).transpose()
    }

    async fn receipt_slot(&self, account: AccountId, peer: AccountId, slot: i16) -> Result<u64, StoreError> {
        let shard = self.conn(account);
        let hwm: Option<i64> =
            sqlx::query_scalar("SELECT hwm FROM receipts WHERE account = $1 AND peer = $2 AND slot = $3")
                .bind(int(account.0)?)
                .bind(int(peer.0)?)
                .bind(slot)
                .fetch_optional(&shard.pool)
                .await
                .map_err(|e| shard.fail(e))?;
        hwm.map(uint).transpose().map(|v| v.unwrap_or(0))
    }
}

#[async_trait]
impl AccountStore for PgStore {
    async fn account_by_phone(&self, phone: &PhoneNumber) -> Result<Option<Account>, StoreError> {
        self.account_by_phone_on(phone.as_str()).await
    }

    async fn account(&self, id: AccountId) -> Result<Option<Account>, StoreError> {
        let dir = self.directory();
        let row = sqlx::query("SELECT id, phone, created_at_ms FROM accounts WHERE id = $1")
            .bind(int(id.0)?)
            .fetch_optional(&dir.pool)
            .await
            .map_err(|e| dir.fail(e))?;
        row.as_ref().map(account_from).transpose()
    }

    async fn device(&self, id: DeviceId) -> Result<Option<Device>, StoreError> {
        let dir = self.directory();
        let row = sqlx::query(&format!("SELECT {DEVICE_COLUMNS} FROM devices WHERE id = $1"))
            .bind(bound(id.0))
            .fetch_optional(&dir.pool)
            .await
            .map_err(|e| dir.fail(e))?;
        row.as_ref().map(device_from).transpose()
    }

    async fn active_devices(&self, account: AccountId) -> Result<Vec<Device>, StoreError> {
        let dir = self.directory();
        let rows = sqlx::query(&format!(
            "SELECT {DEVICE_COLUMNS} FROM devices WHERE account_id = $1 AND removed_at_ms IS NULL ORDER BY id"
        ))
        .bind(int(account.0)?)
        .fetch_all(&dir.pool)
        .await
        .map_err(|e| dir.fail(e))?;
        rows.iter().map(device_from).collect()
    }

    /// On one shard, one transaction. With several shards the directory
    /// and the account's shard are written apart: for an existing account
    /// the new device's cursor is placed first (a crash after it leaves
    /// only an unused cursor row); for a new account, whose log is empty,
    /// after the directory commit (a crash between leaves a device whose
    /// credentials were never handed out; the next registration of the
    /// number removes it).
    async fn register(&self, phone: &PhoneNumber, device: NewDevice, now_ms: u64) -> Result<Registration, StoreError> {
        let dir = self.directory().clone();
        let fail = |e| dir.fail(e);
        let known = self.account_by_phone_on(phone.as_str()).await?;
        let early = match &known {
            Some(account) if !self.with_directory(account.id) => {
                let id = self.allocate_device().await?;
                self.place_cursor(account.id, DeviceId(id)).await?;
                Some(id)
            }
            _ => None,
        };
        let mut tx = dir.pool.begin().await.map_err(fail)?;
        let locked = sqlx::query("SELECT id, phone, created_at_ms FROM accounts WHERE phone = $1 FOR UPDATE")
            .bind(phone.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(fail)?;
        let (account, created) = match locked {
            Some(row) => (account_from(&row)?, false),
            None => {
                let id = next_id(&mut tx, "account").await.map_err(fail)?;
                let inserted = sqlx::query(
                    "INSERT INTO accounts (id, phone, created_at_ms) VALUES ($1, $2, $3) \
                     ON CONFLICT (phone) DO NOTHING RETURNING id, phone, created_at_ms",
                )
                .bind(int(id)?)
                .bind(phone.as_str())
                .bind(int(now_ms)?)
                .fetch_optional(&mut *tx)
                .await
                .map_err(fail)?;
                match inserted {
                    Some(row) => (account_from(&row)?, true),
                    // Another registration of the number won the race; take it over.
                    None => {
                        let row =
                            sqlx::query("SELECT id, phone, created_at_ms FROM accounts WHERE phone = $1 FOR UPDATE")
                                .bind(phone.as_str())
                                .fetch_one(&mut *tx)
                                .await
                                .map_err(fail)?;
                        (account_from(&row)?, false)
                    }
                }
            }
        };
        let removed: Vec<i64> = sqlx::query_scalar(
            "UPDATE devices SET removed_at_ms = $2 WHERE account_id = $1 AND removed_at_ms IS NULL RETURNING id",
        )
        .bind(int(account.id.0)?)
        .bind(int(now_ms)?)
        .fetch_all(&mut *tx)
        .await
        .map_err(fail)?;
        drop_keys(&mut tx, &removed).await.map_err(fail)?;
        let mut removed_devices = removed.into_iter().map(|d| uint(d).map(DeviceId)).collect::<Result<Vec<_>, _>>()?;
        removed_devices.sort();
        let placed = early.filter(|_| known.as_ref().is_some_and(|k| k.id == account.id));
        let id = match placed {
            Some(id) => id,
            None => next_id(&mut tx, "device").await.map_err(fail)?,
        };
        let new = new_device(id, account.id, device, now_ms);
        insert_device(&mut tx, &new).await?;
        let together = self.with_directory(account.id);
        if together {
            cursor_at_end(&mut tx, account.id, new.id).await.map_err(fail)?;
        }
        tx.commit().await.map_err(fail)?;
        if !together && placed.is_none() {
            self.place_cursor(account.id, new.id).await?;
        }
        Ok(Registration { account, device: new, created, removed_devices })
    }

    async fn add_device(
        &self,
        account: AccountId,
        device: NewDevice,
        max_active: usize,
        now_ms: u64,
    ) -> Result<Device, AddDeviceError> {
        let dir = self.directory().clone();
        let fail = |e| dir.fail(e);
        let together = self.with_directory(account);
        // Apart from the directory, the cursor comes first: a crash after it
        // leaves an unused cursor row, never a device without one.
        let early = if together {
            None
        } else {
            let id = self.allocate_device().await?;
            self.place_cursor(account, DeviceId(id)).await?;
            Some(id)
        };
        let mut tx = dir.pool.begin().await.map_err(fail)?;
        let exists = sqlx::query("SELECT id FROM accounts WHERE id = $1 FOR UPDATE")
            .bind(int(account.0)?)
            .fetch_optional(&mut *tx)
            .await
            .map_err(fail)?;
        if exists.is_none() {
            return Err(AddDeviceError::UnknownAccount);
        }
        let active: i64 =
            sqlx::query_scalar("SELECT count(*) FROM devices WHERE account_id = $1 AND removed_at_ms IS NULL")
                .bind(int(account.0)?)
                .fetch_one(&mut *tx)
                .await
                .map_err(fail)?;
        if active as usize >= max_active {
            return Err(AddDeviceError::LimitReached(active as usize));
        }
        let id = match early {
            Some(id) => id,
            None => next_id(&mut tx, "device").await.map_err(fail)?,
        };
        let new = new_device(id, account, device, now_ms);
        insert_device(&mut tx, &new).await?;
        if together {
            cursor_at_end(&mut tx, account, new.id).await.map_err(fail)?;
        }
        tx.commit().await.map_err(fail)?;
        Ok(new)
    }

    async fn delete_account(&self, account: AccountId, now_ms: u64) -> Result<Option<Vec<DeviceId>>, StoreError> {
        let dir = self.directory().clone();
        let fail = |e| dir.fail(e);
        let mut tx = dir.pool.begin().await.map_err(fail)?;
        let gone = sqlx::query("DELETE FROM accounts WHERE id = $1").bind(bound(account.0)).execute(&mut *tx).await;
        if gone.map_err(fail)?.rows_affected() == 0 {
            return Ok(None);
        }
        let devices: Vec<i64> = sqlx::query_scalar(
            "UPDATE devices SET removed_at_ms = $2 WHERE account_id = $1 AND removed_at_ms IS NULL RETURNING id",
        )
        .bind(bound(account.0))
        .bind(int(now_ms)?)
        .fetch_all(&mut *tx)
        .await
        .map_err(fail)?;
        drop_keys(&mut tx, &devices).await.map_err(fail)?;
        sqlx::query("DELETE FROM push WHERE device = ANY($1)").bind(&devices).execute(&mut *tx).await.map_err(fail)?;
        tx.commit().await.map_err(fail)?;
        // The account's own rows, on its shard. The identity is gone already
        // (nobody can sign in or be written to as it); these only follow.
        let shard = self.conn(account);
        let mut tx = shard.pool.begin().await.map_err(|e| shard.fail(e))?;
        let tables = [
            "log",
            "inbound",
            "cursors",
            "contacts",
            "contact_names",
            "blocks",
            "receipts",
            "client_ids",
            "settings",
            "pins",
            "profiles",
        ];
        for table in tables {
            sqlx::query(&format!("DELETE FROM {table} WHERE account = $1"))
                .bind(bound(account.0))
                .execute(&mut *tx)
                .await
                .map_err(|e| shard.fail(e))?;
        }
        tx.commit().await.map_err(|e| shard.fail(e))?;
        Ok(Some(devices.into_iter().map(|d| DeviceId(d as u64)).collect()))
    }

    async fn remove_device(&self, account: AccountId, device: DeviceId, now_ms: u64) -> Result<bool, StoreError> {
        let dir = self.directory().clone();
        let fail = |e| dir.fail(e);
        let together = self.with_directory(account);
        let mut tx = dir.pool.begin().await.map_err(fail)?;
        let done = sqlx::query(
            "UPDATE devices SET removed_at_ms = $3 WHERE id = $2 AND account_id = $1 AND removed_at_ms IS NULL",
        )
        .bind(int(account.0)?)
        .bind(bound(device.0))
        .bind(int(now_ms)?)
        .execute(&mut *tx)
        .await
        .map_err(fail)?
        .rows_affected()
            == 1;
        if done {
            drop_keys(&mut tx, &[int(device.0)?]).await.map_err(fail)?;
        }
        let delete_cursor = "DELETE FROM cursors WHERE account = $1 AND device = $2";
        if done && together {
            sqlx::query(delete_cursor)
                .bind(int(account.0)?)
                .bind(bound(device.0))
                .execute(&mut *tx)
                .await
                .map_err(fail)?;
        }
        tx.commit().await.map_err(fail)?;
        if done && !together {
            // The removal is what counts (a removed device cannot sign in);
            // its cursor is only tidied away.
            let shard = self.conn(account);
            let tidied = sqlx::query(delete_cursor)
                .bind(int(account.0)?)
                .bind(bound(device.0))
                .execute(&shard.pool)
                .await
                .map_err(|e| shard.fail(e));
            if let Err(e) = tidied {
                tracing::warn!(%account, %device, error = %e, "a removed device's cursor was left behind");
            }
        }
        Ok(done)
    }

    async fn rename_device(&self, account: AccountId, device: DeviceId, name: String) -> Result<bool, StoreError> {
        let dir = self.directory();
        let done =
            sqlx::query("UPDATE devices SET name = $3 WHERE id = $2 AND account_id = $1 AND removed_at_ms IS NULL")
                .bind(int(account.0)?)
                .bind(bound(device.0))
                .bind(name)
                .execute(&dir.pool)
                .await
                .map_err(|e| dir.fail(e))?;
        Ok(done.rows_affected() == 1)
    }

    async fn touch_devices(&self, seen: Vec<(DeviceId, u64)>) -> Result<(), StoreError> {
        if seen.is_empty() {
            return Ok(());
        }
        let mut latest = BTreeMap::new();
        for (device, at) in seen {
            latest.insert(int(device.0)?, int(at)?);
        }
        let (ids, ats): (Vec<i64>, Vec<i64>) = latest.into_iter().unzip();
        let dir = self.directory();
        sqlx::query(
            "UPDATE devices d SET last_seen_ms = t.at FROM unnest($1::int8[], $2::int8[]) AS t(id, at) WHERE d.id = t.id",
        )
        .bind(ids)
        .bind(ats)
        .execute(&dir.pool)
        .await
        .map_err(|e| dir.fail(e))?;
        Ok(())
    }
}

#[async_trait]
impl VerificationStore for PgStore {
    async fn put_verification(&self, session: &VerificationSession) -> Result<(), StoreError> {
        let dir = self.directory();
        sqlx::query(
            "INSERT INTO verifications (id, created_at_ms, record) VALUES ($1, $2, $3::jsonb) \
             ON CONFLICT (id) DO UPDATE SET created_at_ms = $2, record = $3::jsonb",
        )
        .bind(&session.id)
        .bind(int(session.created_at_ms)?)
        .bind(json(session)?)
        .execute(&dir.pool)
        .await
        .map_err(|e| dir.fail(e))?;
        Ok(())
    }

    async fn verification(&self, id: &str) -> Result<Option<VerificationSession>, StoreError> {
        let dir = self.directory();
        let record: Option<String> = sqlx::query_scalar("SELECT record::text FROM verifications WHERE id = $1")
            .bind(id)
            .fetch_optional(&dir.pool)
            .await
            .map_err(|e| dir.fail(e))?;
        record.as_deref().map(from_json).transpose()
    }

    async fn delete_verification(&self, id: &str) -> Result<(), StoreError> {
        let dir = self.directory();
        sqlx::query("DELETE FROM verifications WHERE id = $1")
            .bind(id)
            .execute(&dir.pool)
            .await
            .map_err(|e| dir.fail(e))?;
        Ok(())
    }

    async fn purge_verifications(&self, created_before_ms: u64) -> Result<usize, StoreError> {
        let dir = self.directory();
        let done = sqlx::query("DELETE FROM verifications WHERE created_at_ms < $1")
            .bind(bound(created_before_ms))
            .execute(&dir.pool)
            .await
            .map_err(|e| dir.fail(e))?;
        Ok(done.rows_affected() as usize)
    }
}

#[async_trait]
impl SettingsStore for PgStore {
    async fn visibility(&self, account: AccountId) -> Result<Visibility, StoreError> {
        let shard = self.conn(account);
        let value: Option<String> = sqlx::query_scalar("SELECT visibility::text FROM settings WHERE account = $1")
            .bind(int(account.0)?)
            .fetch_optional(&shard.pool)
            .await
            .map_err(|e| shard.fail(e))?;
        Ok(value.as_deref().map(from_json).transpose()?.unwrap_or_default())
    }

    async fn set_visibility(&self, account: AccountId, visibility: Visibility) -> Result<(), StoreError> {
        let shard = self.conn(account);
        sqlx::query(
            "INSERT INTO settings (account, visibility) VALUES ($1, $2::jsonb) \
             ON CONFLICT (account) DO UPDATE SET visibility = $2::jsonb",
        )
        .bind(int(account.0)?)
        .bind(json(&visibility)?)
        .execute(&shard.pool)
        .await
        .map_err(|e| shard.fail(e))?;
        Ok(())
    }

    async fn push_target(&self, device: DeviceId) -> Result<Option<PushTarget>, StoreError> {
        let dir = self.directory();
        let value: Option<String> = sqlx::query_scalar("SELECT target::text FROM push WHERE device = $1")
            .bind(bound(device.0))
            .fetch_optional(&dir.pool)
            .await
            .map_err(|e| dir.fail(e))?;
        value.as_deref().map(from_json).transpose()
    }

    async fn set_push_target(&self, device: DeviceId, target: Option<PushTarget>) -> Result<(), StoreError> {
        let dir = self.directory();
        let query = match &target {
            Some(t) => sqlx::query(
                "INSERT INTO push (device, target) VALUES ($1, $2::jsonb) ON CONFLICT (device) DO UPDATE SET target = $2::jsonb",
            )
            .bind(int(device.0)?)
            .bind(json(t)?),
            None => sqlx::query("DELETE FROM push WHERE device = $1").bind(bound(device.0)),
        };
        query.execute(&dir.pool).await.map_err(|e| dir.fail(e))?;
        Ok(())
    }

    async fn set_block(&self, account: AccountId, peer: AccountId, at_ms: Option<u64>) -> Result<(), StoreError> {
        let shard = self.conn(account);
        let query = match at_ms {
            Some(at) => sqlx::query(
                "INSERT INTO blocks (account, peer, at_ms) VALUES ($1, $2, $3) ON CONFLICT (account, peer) DO NOTHING",
            )
            .bind(int(account.0)?)
            .bind(int(peer.0)?)
            .bind(int(at)?),
            None => sqlx::query("DELETE FROM blocks WHERE account = $1 AND peer = $2")
                .bind(bound(account.0))
                .bind(bound(peer.0)),
        };
        query.execute(&shard.pool).await.map_err(|e| shard.fail(e))?;
        Ok(())
    }

    async fn profile(&self, account: AccountId) -> Result<Option<crate::Profile>, StoreError> {
        let shard = self.conn(account);
        let value: Option<String> = sqlx::query_scalar("SELECT record::text FROM profiles WHERE account = $1")
            .bind(bound(account.0))
            .fetch_optional(&shard.pool)
            .await
            .map_err(|e| shard.fail(e))?;
        value.as_deref().map(from_json).transpose()
    }

    async fn set_profile(&self, account: AccountId, profile: Option<crate::Profile>) -> Result<(), StoreError> {
        let shard = self.conn(account);
        let query = match &profile {
            Some(record) => sqlx::query(
                "INSERT INTO profiles (account, record) VALUES ($1, $2::jsonb) \
                 ON CONFLICT (account) DO UPDATE SET record = $2::jsonb",
            )
            .bind(int(account.0)?)
            .bind(json(record)?),
            None => sqlx::query("DELETE FROM profiles WHERE account = $1").bind(bound(account.0)),
        };
        query.execute(&shard.pool).await.map_err(|e| shard.fail(e))?;
        Ok(())
    }

    async fn set_contact_name(
        &self,
        account: AccountId,
        peer: AccountId,
        name: Option<String>,
    ) -> Result<(), StoreError> {
        let shard = self.conn(account);
        let query = match &name {
            Some(name) => sqlx::query(
                "INSERT INTO contact_names (account, peer, name) VALUES ($1, $2, $3) \
                 ON CONFLICT (account, peer) DO UPDATE SET name = $3",
            )
            .bind(int(account.0)?)
            .bind(int(peer.0)?)
            .bind(name.as_str()),
            None => sqlx::query("DELETE FROM contact_names WHERE account = $1 AND peer = $2")
                .bind(bound(account.0))
                .bind(bound(peer.0)),
        };
        query.execute(&shard.pool).await.map_err(|e| shard.fail(e))?;
        Ok(())
    }

    async fn add_contact(&self, account: AccountId, peer: AccountId) -> Result<(), StoreError> {
        let shard = self.conn(account);
        sqlx::query("INSERT INTO contacts (account, peer) VALUES ($1, $2) ON CONFLICT DO NOTHING")
            .bind(int(account.0)?)
            .bind(int(peer.0)?)
            .execute(&shard.pool)
            .await
            .map_err(|e| shard.fail(e))?;
        Ok(())
    }

    async fn contact_names(&self, account: AccountId) -> Result<Vec<(AccountId, String)>, StoreError> {
        let shard = self.conn(account);
        let rows: Vec<(i64, String)> =
            sqlx::query_as("SELECT peer, name FROM contact_names WHERE account = $1 ORDER BY peer")
                .bind(bound(account.0))
                .fetch_all(&shard.pool)
                .await
                .map_err(|e| shard.fail(e))?;
        Ok(rows.into_iter().map(|(peer, name)| (AccountId(peer as u64), name)).collect())
    }

    async fn pin(&self, account: AccountId) -> Result<Option<skylark_core::pin::PinRecord>, StoreError> {
        let shard = self.conn(account);
        let value: Option<String> = sqlx::query_scalar("SELECT record::text FROM pins WHERE account = $1")
            .bind(bound(account.0))
            .fetch_optional(&shard.pool)
            .await
            .map_err(|e| shard.fail(e))?;
        value.as_deref().map(from_json).transpose()
    }

    async fn set_pin(&self, account: AccountId, pin: Option<skylark_core::pin::PinRecord>) -> Result<(), StoreError> {
        let shard = self.conn(account);
        let query = match &pin {
            Some(record) => sqlx::query(
                "INSERT INTO pins (account, record) VALUES ($1, $2::jsonb) \
                 ON CONFLICT (account) DO UPDATE SET record = $2::jsonb",
            )
            .bind(int(account.0)?)
            .bind(json(record)?),
            None => sqlx::query("DELETE FROM pins WHERE account = $1").bind(bound(account.0)),
        };
        query.execute(&shard.pool).await.map_err(|e| shard.fail(e))?;
        Ok(())
    }

    async fn blocked(&self, account: AccountId) -> Result<Vec<(AccountId, u64)>, StoreError> {
        let shard = self.conn(account);
        let rows: Vec<(i64, i64)> = sqlx::query_as("SELECT peer, at_ms FROM blocks WHERE account = $1 ORDER BY peer")
            .bind(bound(account.0))
            .fetch_all(&shard.pool)
            .await
            .map_err(|e| shard.fail(e))?;
        Ok(rows.into_iter().map(|(peer, at)| (AccountId(peer as u64), at as u64)).collect())
    }
}

/// The nodes whose heartbeat is within their lease, by name.
async fn live_nodes(pool: &PgPool) -> Result<Vec<NodeRecord>, sqlx::Error> {
    let rows: Vec<(String, String, bool)> = sqlx::query_as(
        "SELECT id, address, draining FROM nodes WHERE beat_at + lease_ms * interval '1 millisecond' > now() ORDER BY id",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(id, address, draining)| NodeRecord { id, address, draining }).collect())
}

/// A removed device's key packages go with it: nobody may add it to a
/// conversation any more.
async fn drop_keys(conn: &mut PgConnection, devices: &[i64]) -> Result<(), sqlx::Error> {
    if devices.is_empty() {
        return Ok(());
    }
    sqlx::query("DELETE FROM key_packages WHERE device = ANY($1)").bind(devices).execute(&mut *conn).await?;
    sqlx::query("DELETE FROM last_resort_keys WHERE device = ANY($1)").bind(devices).execute(&mut *conn).await?;
    Ok(())
}

async fn key_stock_in(conn: &mut PgConnection, device: i64) -> Result<KeyStock, sqlx::Error> {
    let (available, has_last_resort): (i64, bool) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM key_packages WHERE device = $1), \
                EXISTS (SELECT 1 FROM last_resort_keys WHERE device = $1)",
    )
    .bind(device)
    .fetch_one(&mut *conn)
    .await?;
    Ok(KeyStock { available: u32::try_from(available).unwrap_or(u32::MAX), has_last_resort })
}

#[async_trait]
impl KeyPackageStore for PgStore {
    async fn put_key_packages(
        &self,
        device: DeviceId,
        packages: Vec<bytes::Bytes>,
        last_resort: Option<bytes::Bytes>,
        max: u32,
    ) -> Result<Result<KeyStock, KeyStock>, StoreError> {
        let dir = self.directory();
        let fail = |e| dir.fail(e);
        let id = int(device.0)?;
        let mut tx = dir.pool.begin().await.map_err(fail)?;
        // The device's row serialises its uploads, so two cannot both fit
        // under the bound and together exceed it.
        sqlx::query("SELECT 1 FROM devices WHERE id = $1 FOR UPDATE").bind(id).execute(&mut *tx).await.map_err(fail)?;
        let stock = key_stock_in(&mut tx, id).await.map_err(fail)?;
        if stock.available as usize + packages.len() > max as usize {
            return Ok(Err(stock));
        }
        let rows: Vec<&[u8]> = packages.iter().map(|p| p.as_ref()).collect();
        sqlx::query(
            "INSERT INTO key_packages (device, package) \
             SELECT $1, p FROM unnest($2::bytea[]) WITH ORDINALITY AS u(p, n) ORDER BY n",
        )
        .bind(id)
        .bind(&rows)
        .execute(&mut *tx)
        .await
        .map_err(fail)?;
        if let Some(package) = &last_resort {
            sqlx::query(
                "INSERT INTO last_resort_keys (device, package) VALUES ($1, $2) \
                 ON CONFLICT (device) DO UPDATE SET package = EXCLUDED.package",
            )
            .bind(id)
            .bind(package.as_ref())
            .execute(&mut *tx)
            .await
            .map_err(fail)?;
        }
        let stock = key_stock_in(&mut tx, id).await.map_err(fail)?;
        tx.commit().await.map_err(fail)?;
        Ok(Ok(stock))
    }

    async fn key_stock(&self, device: DeviceId) -> Result<KeyStock, StoreError> {
        let dir = self.directory();
        let mut conn = dir.pool.acquire().await.map_err(|e| dir.fail(e))?;
        key_stock_in(&mut conn, int(device.0)?).await.map_err(|e| dir.fail(e))
    }

    async fn claim_key_packages(&self, devices: &[DeviceId]) -> Result<Vec<ClaimedKey>, StoreError> {
        let dir = self.directory();
        let fail = |e| dir.fail(e);
        let ids = devices.iter().map(|d| int(d.0)).collect::<Result<Vec<_>, _>>()?;
        // Each device's oldest package that no concurrent claim holds
        // (SKIP LOCKED), taken out in the same statement; then the
        // last-resort packages of the devices left without one.
        let mut tx = dir.pool.begin().await.map_err(fail)?;
        let taken: Vec<(i64, Vec<u8>)> = sqlx::query_as(
            "WITH picked AS ( \
                 SELECT k.device, k.seq FROM unnest($1::int8[]) AS d(id) \
                 CROSS JOIN LATERAL (SELECT device, seq FROM key_packages WHERE device = d.id \
                                     ORDER BY seq LIMIT 1 FOR UPDATE SKIP LOCKED) k) \
             DELETE FROM key_packages k USING picked \
             WHERE k.device = picked.device AND k.seq = picked.seq RETURNING k.device, k.package",
        )
        .bind(&ids)
        .fetch_all(&mut *tx)
        .await
        .map_err(fail)?;
        let taken: BTreeMap<i64, Vec<u8>> = taken.into_iter().collect();
        let rest: Vec<i64> = ids.iter().copied().filter(|d| !taken.contains_key(d)).collect();
        let spares: BTreeMap<i64, Vec<u8>> = if rest.is_empty() {
            BTreeMap::new()
        } else {
            sqlx::query_as("SELECT device, package FROM last_resort_keys WHERE device = ANY($1)")
                .bind(&rest)
                .fetch_all(&mut *tx)
                .await
                .map_err(fail)?
                .into_iter()
                .collect()
        };
        tx.commit().await.map_err(fail)?;
        Ok(devices
            .iter()
            .zip(&ids)
            .map(|(device, id)| match (taken.get(id), spares.get(id)) {
                (Some(p), _) => ClaimedKey { device: *device, package: Some(p.clone().into()), last_resort: false },
                (None, Some(p)) => ClaimedKey { device: *device, package: Some(p.clone().into()), last_resort: true },
                (None, None) => ClaimedKey { device: *device, package: None, last_resort: false },
            })
            .collect())
    }
}

#[async_trait]
impl GroupStore for PgStore {
    async fn allocate_group(&self) -> Result<AccountId, StoreError> {
        let dir = self.directory();
        let mut conn = dir.pool.acquire().await.map_err(|e| dir.fail(e))?;
        Ok(AccountId::group(next_id(&mut conn, "group").await.map_err(|e| dir.fail(e))?))
    }

    async fn group(&self, id: AccountId) -> Result<Option<GroupMeta>, StoreError> {
        let shard = self.conn(id);
        let value: Option<String> = sqlx::query_scalar("SELECT meta::text FROM groups WHERE id = $1")
            .bind(int(id.0)?)
            .fetch_optional(&shard.pool)
            .await
            .map_err(|e| shard.fail(e))?;
        value.as_deref().map(from_json).transpose()
    }

    /// Memberships live with their groups, so this asks every shard.
    async fn groups_of(&self, account: AccountId) -> Result<Vec<AccountId>, StoreError> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let ids: Vec<i64> = sqlx::query_scalar("SELECT group_id FROM memberships WHERE member = $1")
                .bind(int(account.0)?)
                .fetch_all(&shard.conn.pool)
                .await
                .map_err(|e| shard.conn.fail(e))?;
            for id in ids {
                out.push(AccountId(uint(id)?));
            }
        }
        out.sort();
        Ok(out)
    }
}

#[async_trait]
impl LeaseStore for PgStore {
    async fn beat(&self, node: &str, address: &str, lease_ms: u64) -> Result<Beat, StoreError> {
        let dir = self.directory();
        let fail = |e| dir.fail(e);
        let (lapsed, draining): (bool, bool) = sqlx::query_as(
            "WITH prev AS (SELECT beat_at + lease_ms * interval '1 millisecond' < now() AS lapsed FROM nodes WHERE id = $1), \
             up AS (INSERT INTO nodes (id, address, beat_at, lease_ms) VALUES ($1, $2, now(), $3) \
                    ON CONFLICT (id) DO UPDATE SET address = EXCLUDED.address, beat_at = now(), lease_ms = EXCLUDED.lease_ms \
                    RETURNING draining) \
             SELECT coalesce((SELECT lapsed FROM prev), false), (SELECT draining FROM up)",
        )
        .bind(node)
        .bind(address)
        .bind(int(lease_ms)?)
        .fetch_one(&dir.beats)
        .await
        .map_err(fail)?;
        Ok(Beat { live: live_nodes(&dir.beats).await.map_err(fail)?, lapsed, draining })
    }

    async fn members(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let dir = self.directory();
        live_nodes(&dir.pool).await.map_err(|e| dir.fail(e))
    }

    async fn leave(&self, node: &str) -> Result<(), StoreError> {
        let dir = self.directory();
        sqlx::query("DELETE FROM nodes WHERE id = $1").bind(node).execute(&dir.pool).await.map_err(|e| dir.fail(e))?;
        Ok(())
    }

    async fn set_draining(&self, node: &str, draining: bool) -> Result<bool, StoreError> {
        let dir = self.directory();
        let done = sqlx::query("UPDATE nodes SET draining = $2 WHERE id = $1")
            .bind(node)
            .bind(draining)
            .execute(&dir.pool)
            .await
            .map_err(|e| dir.fail(e))?;
        Ok(done.rows_affected() > 0)
    }

    async fn acquire(&self, actor: AccountId, node: &str, live: &[String]) -> Result<Acquired, StoreError> {
        let shard = self.conn(actor);
        let fail = |e| shard.fail(e);
        let epoch: Option<i64> = sqlx::query_scalar(
            "INSERT INTO owners (actor, node, epoch) VALUES ($1, $2, 1) \
             ON CONFLICT (actor) DO UPDATE SET node = EXCLUDED.node, epoch = owners.epoch + 1 \
             WHERE owners.node IS NULL OR owners.node = EXCLUDED.node OR NOT (owners.node = ANY ($3::text[])) \
             RETURNING epoch",
        )
        .bind(int(actor.0)?)
        .bind(node)
        .bind(live)
        .fetch_optional(&shard.pool)
        .await
        .map_err(fail)?;
        if let Some(epoch) = epoch {
            return Ok(Acquired::Owned(uint(epoch)?));
        }
        let holder: Option<Option<String>> = sqlx::query_scalar("SELECT node FROM owners WHERE actor = $1")
            .bind(int(actor.0)?)
            .fetch_optional(&shard.pool)
            .await
            .map_err(fail)?;
        Ok(Acquired::HeldBy(holder.flatten().unwrap_or_default()))
    }

    async fn release(&self, actor: AccountId, epoch: u64) -> Result<(), StoreError> {
        let shard = self.conn(actor);
        sqlx::query("UPDATE owners SET node = NULL WHERE actor = $1 AND epoch = $2")
            .bind(int(actor.0)?)
            .bind(int(epoch)?)
            .execute(&shard.pool)
            .await
            .map_err(|e| shard.fail(e))?;
        Ok(())
    }
}

#[async_trait]
impl MetaStore for PgStore {
    async fn server_id(&self, candidate: [u8; 16]) -> Result<[u8; 16], StoreError> {
        let stored = self.meta_once("server_id", candidate.to_vec()).await?;
        stored.try_into().map_err(|_| StoreError::Corrupt("server id".into()))
    }

    async fn secret(&self, name: &str, candidate: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        self.meta_once(&format!("secret:{name}"), candidate).await
    }

    async fn set_ban(&self, phone: &PhoneNumber, at_ms: Option<u64>) -> Result<(), StoreError> {
        let dir = self.directory();
        let key = format!("ban:{phone}");
        let query = match at_ms {
            Some(at) => {
                sqlx::query("INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO UPDATE SET value = $2")
                    .bind(key)
                    .bind(at.to_be_bytes().to_vec())
            }
            None => sqlx::query("DELETE FROM meta WHERE key = $1").bind(key),
        };
        query.execute(&dir.pool).await.map_err(|e| dir.fail(e))?;
        Ok(())
    }

    async fn bans(&self) -> Result<Vec<(PhoneNumber, u64)>, StoreError> {
        let dir = self.directory();
        let rows: Vec<(String, Vec<u8>)> =
            sqlx::query_as("SELECT key, value FROM meta WHERE key LIKE 'ban:%' ORDER BY key")
                .fetch_all(&dir.pool)
                .await
                .map_err(|e| dir.fail(e))?;
        rows.into_iter()
            .map(|(key, value)| {
                let phone = PhoneNumber::parse(key.trim_start_matches("ban:"))
                    .map_err(|e| StoreError::Corrupt(format!("a banned number: {e}")))?;
                let at = <[u8; 8]>::try_from(value.as_slice())
                    .map(u64::from_be_bytes)
                    .map_err(|_| StoreError::Corrupt("a ban's time".into()))?;
                Ok((phone, at))
            })
            .collect()
    }

    async fn add_report(&self, mut report: crate::Report) -> Result<u64, StoreError> {
        let dir = self.directory().clone();
        let fail = |e| dir.fail(e);
        let mut tx = dir.pool.begin().await.map_err(fail)?;
        report.id = next_id(&mut tx, "report").await.map_err(fail)?;
        sqlx::query("INSERT INTO reports (id, record) VALUES ($1, $2::jsonb)")
            .bind(int(report.id)?)
            .bind(json(&report)?)
            .execute(&mut *tx)
            .await
            .map_err(fail)?;
        tx.commit().await.map_err(fail)?;
        Ok(report.id)
    }

    async fn reports(&self, limit: usize) -> Result<Vec<crate::Report>, StoreError> {
        let dir = self.directory();
        let rows: Vec<String> = sqlx::query_scalar("SELECT record::text FROM reports ORDER BY id DESC LIMIT $1")
            .bind(i64::try_from(limit).unwrap_or(i64::MAX))
            .fetch_all(&dir.pool)
            .await
            .map_err(|e| dir.fail(e))?;
        rows.iter().map(|r| from_json(r)).collect()
    }
}

impl PgStore {
    /// The value under `key` in the directory's meta table, storing
    /// `candidate` there first if there is none.
    async fn meta_once(&self, key: &str, candidate: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        let dir = self.directory();
        sqlx::query("INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING")
            .bind(key)
            .bind(candidate)
            .execute(&dir.pool)
            .await
            .map_err(|e| dir.fail(e))?;
        sqlx::query_scalar("SELECT value FROM meta WHERE key = $1")
            .bind(key)
            .fetch_one(&dir.pool)
            .await
            .map_err(|e| dir.fail(e))
    }
}

#[async_trait]
impl MessageStore for PgStore {
    async fn expire(&self, now_ms: u64, limit: usize) -> Result<usize, StoreError> {
        let mut handled = 0;
        for shard in self.shards.iter() {
            if handled >= limit {
                break;
            }
            let conn = &shard.conn;
            let fail = |e| conn.fail(e);
            let mut tx = conn.pool.begin().await.map_err(fail)?;
            // SKIP LOCKED: nodes sweeping at once take different rows.
            let due: Vec<(i64, i64)> = sqlx::query_as(
                "DELETE FROM expiries WHERE (expires_at, account, seq) IN \
                   (SELECT expires_at, account, seq FROM expiries WHERE expires_at <= $1 \
                    ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED) \
                 RETURNING account, seq",
            )
            .bind(int(now_ms)?)
            .bind(int((limit - handled) as u64)?)
            .fetch_all(&mut *tx)
            .await
            .map_err(fail)?;
            handled += due.len();
            let (accounts, seqs): (Vec<i64>, Vec<i64>) = due.into_iter().unzip();
            let stored: Vec<(i64, i64, Vec<u8>)> = sqlx::query_as(
                "SELECT l.account, l.seq, l.entry FROM log l \
                 JOIN unnest($1::int8[], $2::int8[]) AS d(account, seq) ON l.account = d.account AND l.seq = d.seq \
                 FOR UPDATE OF l",
            )
            .bind(&accounts)
            .bind(&seqs)
            .fetch_all(&mut *tx)
            .await
            .map_err(fail)?;
            let (mut wa, mut ws, mut we) = (Vec::new(), Vec::new(), Vec::new());
            for (account, seq, entry) in stored {
                if let Some(purged) = crate::purged_entry(&decode_entry(&entry)?) {
                    wa.push(account);
                    ws.push(seq);
                    we.push(encode_entry(&purged));
                }
            }
            sqlx::query(
                "UPDATE log SET entry = r.entry FROM unnest($1::int8[], $2::int8[], $3::bytea[]) AS r(account, seq, entry) \
                 WHERE log.account = r.account AND log.seq = r.seq",
            )
            .bind(wa)
            .bind(ws)
            .bind(we)
            .execute(&mut *tx)
            .await
            .map_err(fail)?;
            tx.commit().await.map_err(fail)?;
        }
        Ok(handled)
    }

    async fn apply(&self, write: AccountWrite) -> Result<(), StoreError> {
        if write.is_empty() {
            return Ok(());
        }
        write.check_group_forwards()?;
        let (reply, answer) = oneshot::channel();
        let shard = self.shard(write.account);
        shard.queue.send((write, reply)).await.map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    async fn pending_outboxes(&self, after: Option<AccountId>, limit: usize) -> Result<Vec<AccountId>, StoreError> {
        let after = match after {
            Some(a) => int(a.0)?,
            None => -1,
        };
        let mut found = Vec::new();
        for shard in self.shards.iter() {
            let conn = &shard.conn;
            // A skip scan by hand: one index probe per account, however many
            // forwards each holds.
            let rows: Vec<(i64,)> = sqlx::query_as(
                "WITH RECURSIVE pending(account) AS ( \
                   (SELECT account FROM outbox WHERE account > $1 ORDER BY account LIMIT 1) \
                   UNION ALL \
                   SELECT (SELECT o.account FROM outbox o WHERE o.account > p.account ORDER BY o.account LIMIT 1) \
                   FROM pending p WHERE p.account IS NOT NULL) \
                 SELECT account FROM pending WHERE account IS NOT NULL LIMIT $2",
            )
            .bind(after)
            .bind(int(limit as u64)?)
            .fetch_all(&conn.pool)
            .await
            .map_err(|e| conn.fail(e))?;
            for (account,) in rows {
                found.push(AccountId(uint(account)?));
            }
        }
        found.sort_unstable();
        found.truncate(limit);
        Ok(found)
    }

    async fn account_state(&self, account: AccountId) -> Result<AccountState, StoreError> {
        let shard = self.conn(account);
        let fail = |e| shard.fail(e);
        let a = int(account.0)?;
        let counters = sqlx::query("SELECT next_seq, next_outbox FROM counters WHERE account = $1")
            .bind(a)
            .fetch_optional(&shard.pool)
            .await
            .map_err(fail)?
            .map(|row| -> Result<Counters, StoreError> {
                Ok(Counters {
                    next_seq: uint(row.try_get(0).map_err(StoreError::backend)?)?,
                    next_outbox: uint(row.try_get(1).map_err(StoreError::backend)?)?,
                })
            })
            .transpose()?
            .unwrap_or_default();
        let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as("SELECT seq, item FROM outbox WHERE account = $1 ORDER BY seq")
            .bind(a)
            .fetch_all(&shard.pool)
            .await
            .map_err(fail)?;
        let mut stored = Vec::with_capacity(rows.len());
        let mut refs = Vec::new();
        for (seq, item) in rows {
            let item = decode_outbox(&item)?;
            if let StoredOutbox::GroupEvent { seq: event, .. } = &item {
                refs.push(int(*event)?);
            }
            stored.push((uint(seq)?, item));
        }
        let mut events = BTreeMap::new();
        if !refs.is_empty() {
            refs.sort_unstable();
            refs.dedup();
            let rows: Vec<(i64, Vec<u8>)> =
                sqlx::query_as("SELECT seq, entry FROM log WHERE account = $1 AND seq = ANY($2)")
                    .bind(a)
                    .bind(refs)
                    .fetch_all(&shard.pool)
                    .await
                    .map_err(fail)?;
            for (seq, entry) in rows {
                events.insert(uint(seq)?, decode_entry(&entry)?);
            }
        }
        let mut outbox = Vec::with_capacity(stored.len());
        for (seq, item) in stored {
            outbox.push((
                seq,
                match item {
                    StoredOutbox::Item(item) => item,
                    StoredOutbox::GroupEvent { to, seq: event } => match events.get(&event) {
                        Some(LogEntry::Group(e)) => OutboxItem { to, forward: Forward::Group(e.clone()) },
                        Some(_) => return Err(StoreError::Corrupt(format!("outbox names non-group entry {event}"))),
                        None => return Err(StoreError::Corrupt(format!("outbox names missing event {event}"))),
                    },
                },
            ));
        }
        Ok(AccountState { counters, outbox })
    }

    async fn read_log(&self, account: AccountId, from: u64, limit: usize) -> Result<Vec<(u64, LogEntry)>, StoreError> {
        let shard = self.conn(account);
        let rows: Vec<(i64, Vec<u8>)> =
            sqlx::query_as("SELECT seq, entry FROM log WHERE account = $1 AND seq >= $2 ORDER BY seq LIMIT $3")
                .bind(int(account.0)?)
                .bind(bound(from))
                .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                .fetch_all(&shard.pool)
                .await
                .map_err(|e| shard.fail(e))?;
        rows.into_iter().map(|(seq, entry)| Ok((uint(seq)?, decode_entry(&entry)?))).collect()
    }

    async fn read_log_before(
        &self,
        account: AccountId,
        before: u64,
        limit: usize,
    ) -> Result<Vec<(u64, LogEntry)>, StoreError> {
        let shard = self.conn(account);
        let rows: Vec<(i64, Vec<u8>)> =
            sqlx::query_as("SELECT seq, entry FROM log WHERE account = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3")
                .bind(int(account.0)?)
                .bind(bound(before))
                .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                .fetch_all(&shard.pool)
                .await
                .map_err(|e| shard.fail(e))?;
        rows.into_iter().map(|(seq, entry)| Ok((uint(seq)?, decode_entry(&entry)?))).collect()
    }

    async fn is_contact(&self, account: AccountId, peer: AccountId) -> Result<bool, StoreError> {
        let shard = self.conn(account);
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM contacts WHERE account = $1 AND peer = $2)")
            .bind(int(account.0)?)
            .bind(int(peer.0)?)
            .fetch_one(&shard.pool)
            .await
            .map_err(|e| shard.fail(e))
    }

    async fn receipt_state(&self, account: AccountId) -> Result<ReceiptState, StoreError> {
        let shard = self.conn(account);
        let rows: Vec<(i64, i16, i64)> =
            sqlx::query_as("SELECT peer, slot, hwm FROM receipts WHERE account = $1 ORDER BY peer, slot")
                .bind(int(account.0)?)
                .fetch_all(&shard.pool)
                .await
                .map_err(|e| shard.fail(e))?;
        let mut slots = Vec::with_capacity(rows.len());
        for (peer, slot, hwm) in rows {
            let slot = u8::try_from(slot).map_err(|_| StoreError::Corrupt(format!("receipt slot {slot}")))?;
            slots.push((uint(peer)?, slot, uint(hwm)?));
        }
        Ok(crate::record::receipt_state(slots))
    }

    async fn client_id(
        &self,
        account: AccountId,
        device: DeviceId,
        client_id: &str,
    ) -> Result<Option<u64>, StoreError> {
        let (reply, answer) = oneshot::channel();
        let key = (int(account.0)?, bound(device.0), client_id.to_owned());
        self.shard(account).lookups.send((key, reply)).await.map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    async fn inbound(&self, account: AccountId, source: AccountId) -> Result<u64, StoreError> {
        let shard = self.conn(account);
        let hwm: Option<i64> = sqlx::query_scalar("SELECT hwm FROM inbound WHERE account = $1 AND source = $2")
            .bind(int(account.0)?)
            .bind(int(source.0)?)
            .fetch_optional(&shard.pool)
            .await
            .map_err(|e| shard.fail(e))?;
        hwm.map(uint).transpose().map(|v| v.unwrap_or(0))
    }

    async fn cursor(&self, account: AccountId, device: DeviceId) -> Result<Option<u64>, StoreError> {
        let shard = self.conn(account);
        let seq: Option<i64> = sqlx::query_scalar("SELECT seq FROM cursors WHERE account = $1 AND device = $2")
            .bind(int(account.0)?)
            .bind(bound(device.0))
            .fetch_optional(&shard.pool)
            .await
            .map_err(|e| shard.fail(e))?;
        seq.map(uint).transpose()
    }

    async fn receipt(&self, account: AccountId, peer: AccountId, kind: ReceiptKind) -> Result<u64, StoreError> {
        self.receipt_slot(account, peer, i16::from(kind_byte(kind))).await
    }

    async fn read_marker(&self, account: AccountId, peer: AccountId) -> Result<u64, StoreError> {
        self.receipt_slot(account, peer, READ_MARKER_SLOT).await
    }

    async fn received(&self, account: AccountId, peer: AccountId) -> Result<u64, StoreError> {
        self.receipt_slot(account, peer, RECEIVED_SLOT).await
    }
}

#[cfg(test)]
mod tests;
