//! End-to-end encryption for a profile: the device's MLS state
//! (`skylark_e2ee::Engine`) in `e2ee.state` beside `identity.json`, and
//! the steps that need the server — publishing key packages, claiming
//! them to add devices, posting commits in the group's order (and trying
//! again when another commit came first), encrypting posts and opening
//! the posts that arrive.
//!
//! Every operation reads the state from disk (unless this process wrote
//! it last), changes it and writes what changed under an exclusive lock of
//! `e2ee.lock`, so several commands on one profile take turns instead of
//! overwriting each other's keys. What an operation changed is appended to
//! `e2ee.changes` (fsync'd) — after a message, the ratchets it moved, not
//! the group's whole tree — and the state is written whole to `e2ee.state`
//! (a temporary file, fsync, rename), emptying the changes file, once the
//! changes would outgrow the state (and 1 MiB). The journal (what each log entry opened
//! to: the device's history, up to 50,000 entries) is kept apart, in
//! `e2ee.journal`, where each operation appends only what it changed
//! (fsync'd before the state is written), and which is written afresh
//! once it has grown to twice its size, or when a text is forgotten (a
//! deletion for everyone, a disappearing message), so the text leaves it.
//!
//! Groups are encrypted when every device of every member has published
//! key packages; a group with a device that cannot encrypt (an older client,
//! or the web client, which does not encrypt yet) stays plain, and the
//! commands say so.

use crate::session::{Event, LogEvent, SessionHandle, log_event};
use crate::{ClientError, Identity};
use ed25519_dalek::Signer as _;
use skylark_e2ee::{Commit, DeviceRef, E2eeError, Engine, Opened};
use skylark_protocol::ErrorCode;
use skylark_protocol::v1;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc;

const STATE: &str = "e2ee.state";
/// What changed in the state since it was last written whole.
const CHANGES: &str = "e2ee.changes";
/// The state is written whole again once its changes file would grow past
/// this and past the state's own size.
const STATE_REWRITE_BYTES: u64 = 1 << 20;
const JOURNAL: &str = "e2ee.journal";
const LOCK: &str = "e2ee.lock";
/// A journal file is written afresh once it is larger than this and than
/// twice what it was when last written whole.
const JOURNAL_REWRITE_BYTES: u64 = 1 << 20;
/// The account's device changes this device still has to carry into its
/// encrypted conversations ([`Crypto::maintain`]).
const TODO: &str = "e2ee.todo";

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Todo {
    /// Devices linked to the account, to add to its conversations.
    add: std::collections::BTreeSet<u64>,
    /// Devices removed from the account, to remove from them.
    remove: std::collections::BTreeSet<u64>,
    /// (group, account): members that left a group (or were removed from
    /// it), whose devices are still to take out of the group's keys.
    #[serde(default)]
    gone: std::collections::BTreeSet<(u64, u64)>,
    /// The log entries of device changes already noted (commands that do
    /// not acknowledge the log read them again).
    #[serde(default)]
    seen: std::collections::BTreeSet<u64>,
    /// group → devices of this account this device added to that 1:1
    /// conversation and still owes its history: kept until every part of
    /// it is posted, so a run that stops halfway gives it on the next one.
    #[serde(default)]
    history: std::collections::BTreeMap<u64, std::collections::BTreeSet<u64>>,
}

/// A refusal of a post that trying again later would not change (a rate
/// limit, a busy server, another commit first, a block lifted since, or a
/// lost connection would).
fn refused_for_good(e: &ClientError) -> bool {
    !may_take_later(e) && !matches!(e.error_code(), Some(ErrorCode::StaleEpoch | ErrorCode::Blocked))
}

/// Device changes remembered as noted.
const SEEN_CHANGES: usize = 1_000;

/// Key packages a device keeps published (the server tells when to top up).
const TARGET_STOCK: u32 = 100;

/// Devices added by one commit (see `Crypto::add_in_batches`), in the
/// order they were claimed.
pub const ADD_BATCH: usize = 32;

/// Attempts at a commit, or an encrypted post, that keeps losing to other
/// members' commits. Members refresh their keys before their first post
/// (one attempt each), so a change made while several post for the first
/// time may lose to each of them.
const COMMIT_ATTEMPTS: usize = 10;

/// How long a 1:1 conversation found plain stays plain before the next
/// check (a check claims a key package of every device of both accounts).
pub const PLAIN_RECHECK: Duration = Duration::from_secs(600);

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// How long to wait for the commit that won, before trying again anyway.
const CATCH_UP_WAIT: Duration = Duration::from_secs(5);

/// Entries asked for in one page of history ([`Crypto::read_past_epoch`]).
const HISTORY_PAGE: u32 = 200;

pub use skylark_e2ee::group_conversation;

fn e2ee(e: E2eeError) -> ClientError {
    ClientError::Profile(format!("end-to-end encryption: {e}"))
}

/// A group post, as this device can show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Shown {
    /// Decrypted: only the members' devices could read it.
    Encrypted(String),
    /// Sent without end-to-end encryption (the server could read it).
    Plain(String),
    /// An encrypted post this device cannot open, and why.
    Unreadable(String),
    /// The devices in the conversation changed (one was linked, removed,
    /// added or taken out): the safety number changed with them.
    DevicesChanged,
}

/// What starting or extending a group's encryption did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Setup {
    /// Every device named was added (or was in already).
    Encrypted,
    /// Not encrypted: these devices (phone, device id) publish no keys.
    Plain { without_keys: Vec<(String, u64)> },
}

/// Where a session's frames come from, for reading the log while a commit
/// waits: a session's receiver, or a reconnecting client's.
pub trait Frames {
    /// The next frame, `Event::Closed` when the session ended, `None` when
    /// nothing more will come.
    fn next_frame(&mut self) -> impl std::future::Future<Output = Option<Event>> + Send;
}

impl Frames for mpsc::Receiver<Event> {
    async fn next_frame(&mut self) -> Option<Event> {
        self.recv().await
    }
}

impl Frames for mpsc::Receiver<crate::client::ClientEvent> {
    async fn next_frame(&mut self) -> Option<Event> {
        use crate::client::ClientEvent;
        loop {
            return match self.recv().await? {
                ClientEvent::Frame(frame) => Some(Event::Frame(frame)),
                // The client reconnects by itself; the log resumes after.
                ClientEvent::Connected(_) | ClientEvent::Disconnected { .. } => continue,
                ClientEvent::Stopped(e) => Some(Event::Closed { code: None, reason: e.to_string() }),
            };
        }
    }
}

/// Whether `event` is a post naming the parts of a commit too large for
/// one post, which [`Crypto::fetch_parts`] downloads before it is opened.
pub fn kept_out_of_line(event: &v1::Event) -> bool {
    matches!(&event.body, Some(v1::event::Body::Group(g))
        if matches!(&g.body, Some(v1::group_event::Body::Message(m))
            if m.payload.starts_with(skylark_e2ee::OUT_OF_LINE_MAGIC)))
}

/// One profile's end-to-end encryption.
#[derive(Debug)]
pub struct Crypto {
    profile: PathBuf,
    identity: Identity,
    /// Frames read while waiting on the log (a commit's catch-up), for the
    /// caller to show: [`Crypto::take_read`].
    read: std::sync::Mutex<Vec<skylark_protocol::ServerFrame>>,
    /// The state as this process last wrote it, and the file's stamp then.
    cache: std::sync::Mutex<Option<(Engine, Stamp, FileMarks)>>,
    /// For commits too large for one post, kept out of line as blobs: the
    /// HTTP API (made on first use), and a media token with its expiry.
    api: std::sync::OnceLock<crate::api::Api>,
    media_token: std::sync::Mutex<Option<(String, u64)>>,
}

/// The journal and state files as this process last left them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct FileMarks {
    /// The journal's length when last written whole (or read).
    whole: u64,
    /// The journal is not all in the file yet (a state of an earlier
    /// version held it inline): write it whole at the next write.
    rewrite: bool,
    /// The state file's length when last written (or read).
    state: u64,
    /// The state must be written whole at the next write: there is none
    /// yet, or its changes file ends in a record cut short (appending
    /// after it would be lost).
    rewrite_state: bool,
}

/// What tells one version of the state file from another: a writer
/// renames a new file into place, so its inode changes with every write.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Stamp {
    inode: u64,
    len: u64,
    modified: Option<std::time::SystemTime>,
    /// The journal's and the state changes' lengths (another process
    /// appends to them).
    journal_len: u64,
    changes_len: u64,
}

fn stamp(path: &Path, journal: &Path, changes: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let inode = std::os::unix::fs::MetadataExt::ino(&meta);
    #[cfg(not(unix))]
    let inode = 0;
    let len_of = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len());
    let (journal_len, changes_len) = (len_of(journal), len_of(changes));
    Some(Stamp { inode, len: meta.len(), modified: meta.modified().ok(), journal_len, changes_len })
}

/// Opens a file of the profile for writing, readable by its owner only.
fn private_file(path: &Path, options: &mut std::fs::OpenOptions) -> std::io::Result<std::fs::File> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)
}

/// The encryption state a profile's files hold (the state written whole
/// and its changes since; not the journal), read without the profile's
/// lock: for tools and tests that look at a profile.
pub fn read_state(profile: &Path) -> Result<Engine, ClientError> {
    let missing = || ClientError::Profile(format!("{} has no encryption state", profile.display()));
    Ok(load_state(profile)?.ok_or_else(missing)?.engine)
}

/// A profile's state file, as read with its changes since.
struct LoadedState {
    engine: Engine,
    /// The state file's length.
    len: u64,
    /// The changes file ends in a record cut short (a crash while
    /// appending): appending after it would be lost.
    cut: bool,
}

/// Reads a profile's state and applies its changes; `None` when it has no
/// state yet. The words say which file is damaged and what to do.
fn load_state(profile: &Path) -> Result<Option<LoadedState>, ClientError> {
    let read = |name: &str, what: &str| match std::fs::read(profile.join(name)) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ClientError::Profile(format!("cannot read {what} in {}: {e}", profile.display()))),
    };
    let damaged = |e: E2eeError, name: &str| {
        ClientError::Profile(format!(
            "{}: {e}; move it away to start over (encrypted conversations must then add this device again)",
            profile.join(name).display()
        ))
    };
    let Some(bytes) = read(STATE, "the encryption state")? else { return Ok(None) };
    let mut engine = Engine::import(&bytes).map_err(|e| damaged(e, STATE))?;
    let changes = read(CHANGES, "the encryption state's changes")?.unwrap_or_default();
    let applied = engine.apply_state_changes(&changes).map_err(|e| damaged(e, CHANGES))?;
    Ok(Some(LoadedState { engine, len: bytes.len() as u64, cut: applied < changes.len() }))
}

fn new_client_id() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 12];
    rand::rng().fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Crypto {
    /// The profile's encryption state, created (with a fresh MLS key bound
    /// to the device key) on first use.
    pub fn open(profile: &Path, identity: &Identity) -> Result<Crypto, ClientError> {
        let crypto = Crypto {
            profile: profile.to_owned(),
            identity: identity.clone(),
            read: Default::default(),
            cache: Default::default(),
            api: Default::default(),
            media_token: Default::default(),
        };
        crypto.with(|_| Ok(()))?;
        Ok(crypto)
    }

    fn me(&self) -> DeviceRef {
        DeviceRef { account: self.identity.account_id, device: self.identity.device_id }
    }

    /// Runs `f` on the state, under the profile's lock, and writes the
    /// state back when `f` succeeds (durably, before returning). The state
    /// stays in memory between calls and is read again only when another
    /// process wrote the file since.
    pub fn with<R>(&self, f: impl FnOnce(&mut Engine) -> Result<R, E2eeError>) -> Result<R, ClientError> {
        let fail =
            |what: &str, e: std::io::Error| ClientError::Profile(format!("{what} in {}: {e}", self.profile.display()));
        std::fs::create_dir_all(&self.profile).map_err(|e| fail("cannot create the profile", e))?;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.profile.join(LOCK))
            .map_err(|e| fail("cannot open the encryption lock", e))?;
        lock.lock().map_err(|e| fail("cannot lock the encryption state", e))?;
        let path = self.profile.join(STATE);
        let journal = self.profile.join(JOURNAL);
        let changes_path = self.profile.join(CHANGES);
        let mut cache =
            self.cache.lock().map_err(|_| ClientError::Profile("the encryption state's lock was poisoned".into()))?;
        let on_disk = stamp(&path, &journal, &changes_path);
        if cache.as_ref().is_none_or(|(_, at, _)| on_disk.is_none() || Some(at) != on_disk.as_ref()) {
            *cache = None;
            let (mut engine, state_len, cut) = match load_state(&self.profile)? {
                Some(LoadedState { engine, len, cut }) => (engine, len, cut),
                None => {
                    let key = self.identity.signing_key()?;
                    (Engine::new(self.me(), |t| key.sign(t).to_bytes().to_vec()), 0, false)
                }
            };
            if engine.me() != self.me() {
                return Err(ClientError::Profile(format!(
                    "{} belongs to another device; move it away to start over",
                    path.display()
                )));
            }
            // A state an earlier version wrote holds the journal inline:
            // both are written afresh, apart.
            let inline = engine.journal_len() > 0;
            let records = match std::fs::read(&journal) {
                Ok(records) => records,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(fail("cannot read the encryption journal", e)),
            };
            let whole = engine.apply_journal(&records).map_err(|e| {
                ClientError::Profile(format!(
                    "{}: {e}; move it away to forget this device's history",
                    journal.display()
                ))
            })?;
            // A record cut short by a crash is written over by the rewrite;
            // the state is written whole when there is none yet, too.
            let marks = FileMarks {
                whole: records.len() as u64,
                rewrite: inline || whole < records.len(),
                state: state_len,
                rewrite_state: inline || cut || state_len == 0,
            };
            *cache = Some((engine, Stamp::default(), marks));
        }
        let Some((engine, _, _)) = cache.as_mut() else { unreachable!("filled above") };
        let out = match f(engine) {
            Ok(out) => out,
            Err(e) => {
                // The failed step may have changed the state in memory:
                // read it from disk next time.
                *cache = None;
                return Err(e2ee(e));
            }
        };
        let Some((engine, _, mark)) = cache.as_mut() else { unreachable!("filled above") };
        // Written whole (a new file renamed into place), each after a sync.
        let replace = |name: &str, bytes: &[u8]| -> std::io::Result<()> {
            let tmp = self.profile.join(format!("{name}.tmp"));
            let mut file = private_file(&tmp, std::fs::OpenOptions::new().write(true).create(true).truncate(true))?;
            file.write_all(bytes)?;
            file.sync_all()?;
            std::fs::rename(&tmp, self.profile.join(name))?;
            std::fs::File::open(&self.profile)?.sync_all()
        };
        // The journal first: what was opened is kept before the state that
        // used the keys up says so. A forgotten text (deleted for everyone,
        // or disappeared) must leave the file: written afresh then.
        let forgot = engine.journal_forgot();
        let changes = engine.take_journal_changes();
        let journaled = || -> std::io::Result<FileMarks> {
            let len = std::fs::metadata(&journal).map_or(0, |m| m.len());
            if mark.rewrite || forgot || len + changes.len() as u64 > JOURNAL_REWRITE_BYTES.max(2 * mark.whole) {
                let records = engine.journal_records();
                replace(JOURNAL, &records)?;
                return Ok(FileMarks { whole: records.len() as u64, rewrite: false, ..*mark });
            }
            if !changes.is_empty() {
                let mut file = private_file(&journal, std::fs::OpenOptions::new().append(true).create(true))?;
                file.write_all(&changes)?;
                file.sync_data()?;
                if len == 0 {
                    std::fs::File::open(&self.profile)?.sync_all()?;
                }
            }
            Ok(*mark)
        };
        // Then the state: what changed, appended; or, once the changes
        // would outgrow the state, the state whole (a new generation, so
        // the changes file's records no longer apply) and the file emptied.
        let state_changes = engine.take_state_changes();
        let saved = |mut m: FileMarks| -> std::io::Result<FileMarks> {
            let len = std::fs::metadata(&changes_path).map_or(0, |m| m.len());
            if m.rewrite_state || len + state_changes.len() as u64 > STATE_REWRITE_BYTES.max(m.state) {
                let state = engine.save_whole();
                replace(STATE, &state)?;
                if len > 0 {
                    let emptied = private_file(&changes_path, std::fs::OpenOptions::new().write(true).truncate(true))?;
                    emptied.sync_all()?;
                }
                m.state = state.len() as u64;
                m.rewrite_state = false;
            } else if !state_changes.is_empty() {
                let mut file = private_file(&changes_path, std::fs::OpenOptions::new().append(true).create(true))?;
                file.write_all(&state_changes)?;
                file.sync_data()?;
                if len == 0 {
                    std::fs::File::open(&self.profile)?.sync_all()?;
                }
            }
            Ok(m)
        };
        let written = journaled()
            .map_err(|e| fail("cannot write the encryption journal", e))
            .and_then(|m| saved(m).map_err(|e| fail("cannot write the encryption state", e)));
        match written {
            Ok(m) => *mark = m,
            Err(e) => {
                *cache = None;
                return Err(e);
            }
        }
        match (stamp(&path, &journal, &changes_path), cache.as_mut()) {
            (Some(now), Some((_, at, _))) => *at = now,
            _ => *cache = None,
        }
        Ok(out)
    }

    /// Tops up this device's published key packages when the server says
    /// the stock is low; returns how many were uploaded.
    pub async fn replenish(&self, h: &SessionHandle) -> Result<u32, ClientError> {
        let stock = h.key_package_stock().await?;
        if stock.available >= stock.replenish_below && stock.has_last_resort {
            return Ok(0);
        }
        let want = TARGET_STOCK.min(stock.max_available).saturating_sub(stock.available).min(100);
        let need_last_resort = !stock.has_last_resort;
        let (packages, last_resort) = self.with(|e| {
            let packages = e.key_packages(want as usize)?;
            let last = if need_last_resort { Some(e.last_resort_package()?) } else { None };
            Ok((packages, last))
        })?;
        h.upload_key_packages(packages.into_iter().map(Into::into).collect(), last_resort.map(Into::into)).await?;
        Ok(want)
    }

    /// Finishes commits a previous run left half-sent (the process died
    /// between making a commit and hearing the server's answer): sends it
    /// again with the same client id (the server answers a duplicate if it
    /// had it, or refuses it if another commit came first).
    pub async fn resume(&self, h: &SessionHandle) -> Result<(), ClientError> {
        let outgoing = self.with(|e| Ok(e.outgoing().to_vec()))?;
        for o in outgoing {
            let pending = self.with(|e| Ok(e.has_pending_commit(&o.conversation)))?;
            let group = parse_group(&o.conversation);
            let (Some(group), true) = (group, pending) else {
                // Applied already (its own commit came back in the log).
                self.with(|e| {
                    e.unstage(&o.conversation);
                    Ok(())
                })?;
                continue;
            };
            // Applied at once: this runs before the log is read, and a
            // commit taken by the server must not wait on it.
            match self.send_staged(h, None::<&mut mpsc::Receiver<Event>>, group, &o.client_id, &o.commit).await {
                Ok(()) => {}
                // Another commit came first, or the server will never take
                // this one: drop it (it was said when it was first refused).
                Err(e) if e.error_code() == Some(ErrorCode::StaleEpoch) || !may_take_later(&e) => {
                    self.with(|e| e.commit_refused(&o.conversation))?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Posts a staged commit (with its Welcome, in one post). Without
    /// `events`, applies it as soon as the group took it; with them, reads
    /// the group's log through to the commit first, which applies it in
    /// the log's order: the posts ordered before it are opened in the epoch
    /// they were made in (no device keeps past epochs' keys). Applied
    /// anyway if it does not come back within [`CATCH_UP_WAIT`].
    async fn send_staged(
        &self,
        h: &SessionHandle,
        events: Option<&mut impl Frames>,
        group: u64,
        client_id: &str,
        c: &Commit,
    ) -> Result<(), ClientError> {
        let conversation = group_conversation(group);
        let payload = c.payload();
        if payload.len() as u64 <= h.max_payload_bytes() {
            h.commit_to_group(group, client_id, c.epoch, payload).await?;
        } else {
            let (reference, blobs) = self.upload_parts(h, &conversation, c).await?;
            h.commit_to_group_with(group, client_id, c.epoch, reference, blobs).await?;
        }
        if let Some(events) = events {
            self.read_until_epoch_moves(h, events, group, c.epoch).await?;
        }
        self.with(|e| {
            e.commit_accepted(&conversation)?;
            e.unstage(&conversation);
            Ok(())
        })
    }

    /// The HTTP API and a media token of this device, for the blobs of
    /// commits kept out of line (the token asked for once, and again
    /// shortly before it expires).
    async fn transfer(&self, h: &SessionHandle) -> Result<crate::media::Transfer<'_>, ClientError> {
        let api = match self.api.get() {
            Some(api) => api,
            None => {
                let first = self.identity.server.split(',').map(str::trim).find(|a| !a.is_empty()).unwrap_or_default();
                let tls = crate::TlsClient::new(self.identity.ca.as_deref())?;
                let _ = self.api.set(crate::api::Api::with_tls(first, &tls)?);
                self.api.get().expect("just set")
            }
        };
        let cached = self.media_token.lock().ok().and_then(|t| t.clone());
        let token = match cached {
            Some((token, expires)) if expires > now_ms() + 60_000 => token,
            _ => {
                let fresh = h.media_token().await?;
                if let Ok(mut kept) = self.media_token.lock() {
                    *kept = Some((fresh.token.clone(), fresh.expires_at_ms));
                }
                fresh.token
            }
        };
        Ok(crate::media::Transfer::new(api, &token))
    }

    /// A commit too large for one post on this server: its Welcome (and
    /// the commit, when that alone does not fit) uploaded as blobs, and
    /// the short post that names them and carries the rest (with the
    /// blobs' ids, for the post's attachments, which makes them readable
    /// by every member).
    async fn upload_parts(
        &self,
        h: &SessionHandle,
        conversation: &[u8],
        c: &Commit,
    ) -> Result<(Vec<u8>, Vec<String>), ClientError> {
        let transfer = self.transfer(h).await?;
        let mut uploaded = Vec::with_capacity(2);
        for (kind, bytes) in c.to_upload(h.max_payload_bytes() as usize) {
            let id = match transfer.upload(bytes, &mut |_, _| {}).await {
                Ok(id) => id,
                // Refused for good: the commit is dropped, said in words.
                Err(ClientError::Api { status: 413, message, .. }) => {
                    return Err(ClientError::Refused {
                        code: ErrorCode::MessageTooLarge,
                        message: format!("{}; {message}", crate::media::size_words(bytes.len() as u64)),
                        retry_after_ms: 0,
                    });
                }
                Err(e) => return Err(e),
            };
            uploaded.push((kind, id));
        }
        let reference = skylark_e2ee::out_of_line(conversation, c, &uploaded).map_err(e2ee)?;
        Ok((reference, uploaded.into_iter().map(|(_, id)| id).collect()))
    }

    /// `event` ready for [`Crypto::open_event`]: when it is a post naming
    /// the parts of a commit too large for one post, and this device has
    /// not opened it before, the parts it needs (the commit, or the
    /// Welcome for a device being added) are downloaded and put in place
    /// of the names. Any other event comes back as it is, and so does one
    /// whose download the server refuses (the blob is gone): it opens as
    /// unreadable. An error (the blobs could not be downloaded for now)
    /// leaves the entry unopened: the caller stops reading there, and the
    /// next run reads it again.
    pub async fn fetch_parts<'a>(
        &self,
        h: &SessionHandle,
        event: &'a v1::Event,
    ) -> Result<std::borrow::Cow<'a, v1::Event>, ClientError> {
        use std::borrow::Cow;
        if !kept_out_of_line(event) {
            return Ok(Cow::Borrowed(event));
        }
        let Some(v1::event::Body::Group(g)) = &event.body else { return Ok(Cow::Borrowed(event)) };
        let Some(v1::group_event::Body::Message(m)) = &g.body else { return Ok(Cow::Borrowed(event)) };
        let (key, legacy) = journal_keys(event);
        let mine = g.by == self.identity.account_id && m.sender_device == self.identity.device_id;
        let needed = self.with(|e| {
            if e.recall(&key).is_some() || e.recall(&legacy).is_some() {
                return Ok(None);
            }
            e.parts_needed(&m.payload, mine)
        })?;
        let Some(needed) = needed.filter(|n| !n.is_empty()) else { return Ok(Cow::Borrowed(event)) };
        let transfer = self.transfer(h).await?;
        let mut fetched = Vec::with_capacity(needed.len());
        for part in needed {
            let bytes = match transfer.download(&part.id, &mut |_, _| {}).await {
                Ok(bytes) => bytes,
                // Refused (the blob is gone, past the attachments'
                // retention): left as it is, and shown as unreadable.
                Err(ClientError::Api { status: 403 | 404, .. }) => return Ok(Cow::Borrowed(event)),
                Err(e) => {
                    return Err(ClientError::Profile(format!(
                        "could not download a change to a group's encryption too large for one post ({e}); \
                         the next run tries again"
                    )));
                }
            };
            fetched.push((part, bytes));
        }
        let payload = skylark_e2ee::inline(&m.payload, &fetched).map_err(e2ee)?;
        let mut inlined = event.clone();
        if let Some(v1::event::Body::Group(g)) = &mut inlined.body
            && let Some(v1::group_event::Body::Message(m)) = &mut g.body
        {
            m.payload = payload.into();
        }
        Ok(Cow::Owned(inlined))
    }

    /// Makes a commit with `make` and posts it in the group's order: when
    /// another member's commit came first, reads the group's events until
    /// it has that one, and makes the commit again. `Ok(false)` when there
    /// was nothing to commit.
    async fn commit(
        &self,
        h: &SessionHandle,
        events: &mut impl Frames,
        group: u64,
        make: impl Fn(&mut Engine) -> Result<Option<Commit>, E2eeError>,
    ) -> Result<bool, ClientError> {
        self.commit_within(h, events, group, make, COMMIT_ATTEMPTS).await
    }

    /// [`Crypto::commit`] with at most `attempts` tries.
    async fn commit_within(
        &self,
        h: &SessionHandle,
        events: &mut impl Frames,
        group: u64,
        make: impl Fn(&mut Engine) -> Result<Option<Commit>, E2eeError>,
        attempts: usize,
    ) -> Result<bool, ClientError> {
        let conversation = group_conversation(group);
        for _ in 0..attempts {
            let client_id = new_client_id();
            let made = self.with(|e| {
                let commit = make(e)?;
                if let Some(c) = &commit {
                    e.stage(&conversation, &client_id, c);
                }
                Ok(commit)
            })?;
            let Some(commit) = made else { return Ok(false) };
            match self.send_staged(h, Some(&mut *events), group, &client_id, &commit).await {
                Ok(()) => return Ok(true),
                Err(e) if e.error_code() == Some(ErrorCode::StaleEpoch) => {
                    self.with(|e| e.commit_refused(&conversation))?;
                    self.read_until_epoch_moves(h, events, group, commit.epoch).await?;
                }
                // Refused for good: a commit left staged would hold up every
                // encrypted message of this device in the group.
                Err(e) if !may_take_later(&e) => {
                    self.with(|e| e.commit_refused(&conversation))?;
                    return Err(commit_refused_words(e));
                }
                // The commit stays staged: the next run finishes it (`resume`).
                Err(e) => return Err(e),
            }
        }
        Err(ClientError::Profile(
            "the group's encryption kept changing while this device tried to change it; try again".into(),
        ))
    }

    async fn read_until_epoch_moves(
        &self,
        h: &SessionHandle,
        events: &mut impl Frames,
        group: u64,
        from: u64,
    ) -> Result<(), ClientError> {
        let conversation = group_conversation(group);
        let deadline = tokio::time::Instant::now() + CATCH_UP_WAIT;
        while self.with(|e| e.epoch(&conversation))? <= from {
            match tokio::time::timeout_at(deadline, events.next_frame()).await {
                Ok(Some(Event::Frame(frame))) => {
                    if let Some(LogEvent::Entry(event)) = log_event(&frame) {
                        self.open_event(&*self.fetch_parts(h, event).await?);
                    }
                    self.keep_read(frame);
                }
                Ok(Some(Event::Closed { code, reason })) => return Err(ClientError::Closed { code, reason }),
                Ok(None) | Err(_) => break,
            }
        }
        Ok(())
    }

    /// Reads the session's backlog up to `CaughtUp`, opening every group
    /// post on the way (so the state is current before this device
    /// commits or encrypts). Returns the entries read.
    pub async fn catch_up(&self, h: &SessionHandle, events: &mut impl Frames) -> Result<Vec<v1::Event>, ClientError> {
        let mut read = Vec::new();
        loop {
            match tokio::time::timeout(CATCH_UP_WAIT, events.next_frame()).await {
                Ok(Some(Event::Frame(frame))) => {
                    let caught_up = match log_event(&frame) {
                        Some(LogEvent::Entry(event)) => {
                            self.open_event(&*self.fetch_parts(h, event).await?);
                            read.push(event.clone());
                            false
                        }
                        Some(LogEvent::CaughtUp(_)) => true,
                        None => false,
                    };
                    self.keep_read(frame);
                    if caught_up {
                        return Ok(read);
                    }
                }
                Ok(Some(Event::Closed { code, reason })) => return Err(ClientError::Closed { code, reason }),
                // A backlog longer than the server's window arrives only as
                // entries are acknowledged: go on with what is here.
                Ok(None) | Err(_) => return Ok(read),
            }
        }
    }

    fn keep_read(&self, frame: skylark_protocol::ServerFrame) {
        if let Ok(mut read) = self.read.lock() {
            read.push(frame);
        }
    }

    /// The frames this object read from the session while catching up or
    /// waiting for a commit that came first, in order, for a program that
    /// shows them (each is read once: this empties the list).
    pub fn take_read(&self) -> Vec<skylark_protocol::ServerFrame> {
        self.read.lock().map(|mut r| std::mem::take(&mut *r)).unwrap_or_default()
    }

    /// Opens a log entry if it is a group post (`None` otherwise, and for
    /// posts that carry only encryption changes). Each entry is decrypted
    /// once; reading it again (redelivery, history) answers the same. A
    /// device linked to or removed from the account is noted, for
    /// [`Crypto::maintain`].
    pub fn open_event(&self, event: &v1::Event) -> Option<Shown> {
        if let Some(v1::event::Body::DeviceChange(change)) = &event.body {
            self.note_device_change(event.seq, change);
            return None;
        }
        let Some(v1::event::Body::Group(g)) = &event.body else { return None };
        match &g.body {
            Some(v1::group_event::Body::Left(_)) if g.by != self.identity.account_id => {
                self.note_gone(event.seq, g.group, g.by);
            }
            Some(v1::group_event::Body::Removed(m)) if m.account != self.identity.account_id => {
                self.note_gone(event.seq, g.group, m.account);
            }
            _ => {}
        }
        let Some(v1::group_event::Body::Message(m)) = &g.body else { return None };
        if !skylark_e2ee::is_encrypted(&m.payload) {
            return Some(Shown::Plain(String::from_utf8_lossy(&m.payload).into_owned()));
        }
        let mine = g.by == self.identity.account_id && m.sender_device == self.identity.device_id;
        let own = mine.then_some(m.client_id.as_str());
        let (key, legacy) = journal_keys(event);
        let expired = m.expires_at_ms != 0 && m.expires_at_ms <= now_ms();
        let opened = self.with(|e| {
            let opened = match e.recall(&legacy) {
                Some(known) => known,
                None => e.open_once(&key, &m.payload, own),
            };
            // What a deletion for everyone names, and what has disappeared,
            // is not kept in this device's state either.
            if let Some(target) = m.deletes {
                e.forget(&post_key(g.group, target));
            }
            if expired {
                e.forget(&key);
            }
            Ok(opened)
        });
        match opened {
            Ok(opened) => shown(opened),
            Err(e) => Some(Shown::Unreadable(e.to_string())),
        }
    }

    /// A log entry as [`Crypto::open_event`] showed it, without opening
    /// anything new: for pages of history, which come newest first (MLS
    /// must see a conversation's entries in order; those not opened yet
    /// arrive on the live stream and are opened there).
    pub fn recall(&self, event: &v1::Event) -> Option<Shown> {
        let Some(v1::event::Body::Group(g)) = &event.body else { return None };
        let Some(v1::group_event::Body::Message(m)) = &g.body else { return None };
        if !skylark_e2ee::is_encrypted(&m.payload) {
            return Some(Shown::Plain(String::from_utf8_lossy(&m.payload).into_owned()));
        }
        let (key, legacy) = journal_keys(event);
        shown(self.with(|e| Ok(e.recall(&key).or_else(|| e.recall(&legacy)))).ok()??)
    }

    fn todo(&self) -> Todo {
        std::fs::read(self.profile.join(TODO)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }

    fn save_todo(&self, todo: &Todo) -> Result<(), ClientError> {
        let fail = |e: std::io::Error| ClientError::Profile(format!("cannot write {}: {e}", self.profile.display()));
        let tmp = self.profile.join(format!("{TODO}.tmp"));
        let json = serde_json::to_vec(todo).map_err(|e| ClientError::Profile(e.to_string()))?;
        std::fs::write(&tmp, json).map_err(fail)?;
        std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(fail)?;
        std::fs::rename(&tmp, self.profile.join(TODO)).map_err(fail)
    }

    /// A member left a group (or was removed): its devices are to leave
    /// the group's keys. Any remaining member may commit that; the one who
    /// removed it usually has already.
    fn note_gone(&self, seq: u64, group: u64, account: u64) {
        let mut todo = self.todo();
        if !todo.seen.insert(seq) {
            return;
        }
        while todo.seen.len() > SEEN_CHANGES {
            todo.seen.pop_first();
        }
        todo.gone.insert((group, account));
        if let Err(e) = self.save_todo(&todo) {
            tracing::warn!("could not note a member who left: {e}");
        }
    }

    fn note_device_change(&self, seq: u64, change: &v1::DeviceChange) {
        use v1::device_change::Change;
        let mut todo = self.todo();
        if !todo.seen.insert(seq) {
            return;
        }
        while todo.seen.len() > SEEN_CHANGES {
            todo.seen.pop_first();
        }
        match &change.change {
            Some(Change::Linked(d)) if d.id != self.identity.device_id => {
                todo.add.insert(d.id);
            }
            Some(Change::Removed(id)) => {
                todo.add.remove(id);
                todo.remove.insert(*id);
                for owed in todo.history.values_mut() {
                    owed.remove(id);
                }
                todo.history.retain(|_, owed| !owed.is_empty());
            }
            _ => {}
        }
        if let Err(e) = self.save_todo(&todo) {
            tracing::warn!("could not note a device change: {e}");
        }
    }

    /// Carries the account's device changes into its encrypted
    /// conversations: a removed device is removed from each (it reads
    /// nothing sent after), a linked one added (with one of its key
    /// packages per conversation; a device that has not published keys yet
    /// is tried again next time). Any device of the account may do it;
    /// when several do at once, the group's order makes one commit count
    /// and the others find nothing left to do.
    ///
    /// First, it refreshes this device's keys in the conversations where
    /// they are a month old ([`skylark_e2ee::Engine::stale_conversations`]),
    /// so that a device that only reads renews them too.
    pub async fn maintain(&self, h: &SessionHandle, events: &mut impl Frames) -> Result<(), ClientError> {
        for conversation in self.with(|e| Ok(e.stale_conversations()))? {
            if let Some(group) = parse_group(&conversation) {
                self.refresh_keys(h, events, group).await;
            }
        }
        let todo = self.todo();
        if todo.add.is_empty() && todo.remove.is_empty() && todo.gone.is_empty() && todo.history.is_empty() {
            return Ok(());
        }
        let _lock = self.maintaining()?;
        let todo = self.todo();
        for &(group, account) in &todo.gone {
            // A member this device could not commit for (say, no longer
            // in the group itself) is left to the others.
            if let Err(e) = self.remove_accounts(h, events, group, &[account]).await {
                tracing::info!(group, account, "could not remove a departed member's devices: {e}");
            }
        }
        let mut now = self.todo();
        now.gone.retain(|g| !todo.gone.contains(g));
        self.save_todo(&now)?;
        let conversations = self.with(|e| Ok(e.conversations()))?;
        let groups: Vec<(u64, Vec<u8>)> =
            conversations.into_iter().filter_map(|c| parse_group(&c).map(|g| (g, c))).collect();
        let account = self.identity.account_id;
        let removed: Vec<DeviceRef> = todo.remove.iter().map(|&device| DeviceRef { account, device }).collect();
        // A group whose change fails (a lost connection, or one the server
        // refuses, such as a commit too large for it) does not hold up the
        // others; the change stays to do, and is said at the end.
        let mut failed: Vec<(u64, ClientError)> = Vec::new();
        for (group, conversation) in groups.iter().filter(|_| !removed.is_empty()) {
            if let Err(e) = self.commit(h, events, *group, |e| e.remove(conversation, &removed)).await {
                failed.push((*group, e));
            }
        }
        // Read again before writing: reading the log may have noted more.
        let mut now = self.todo();
        if failed.is_empty() {
            now.remove.retain(|d| !todo.remove.contains(d));
        }
        self.save_todo(&now)?;
        let removals_failed = failed.len();
        // The conversations given devices here, and which: their history follows.
        let mut joined: Vec<(u64, Vec<DeviceRef>)> = Vec::new();
        for (group, conversation) in groups.iter().filter(|_| !todo.add.is_empty()) {
            // One package per device per conversation: a Welcome uses it up.
            let claimed = claim_patiently(h, std::slice::from_ref(&self.identity.phone))
                .await?
                .pop()
                .ok_or_else(|| ClientError::Protocol("a claim of this account's number came back empty".into()))?;
            let packages: Vec<(DeviceRef, Vec<u8>)> = claimed
                .devices
                .into_iter()
                .filter(|d| todo.add.contains(&d.device_id) && !d.key_package.is_empty())
                .filter_map(|d| {
                    let who = DeviceRef { account, device: d.device_id };
                    match skylark_e2ee::check_package(who, &d.key_package, &d.device_key) {
                        Ok(()) => Some((who, d.key_package.to_vec())),
                        Err(e) => {
                            tracing::warn!("not adding a linked device: {e}");
                            None
                        }
                    }
                })
                .collect();
            match self.commit(h, events, *group, |e| e.add(conversation, &packages)).await {
                Ok(true) => joined.push((*group, packages.iter().map(|(d, _)| *d).collect::<Vec<_>>())),
                Ok(false) => {}
                Err(e) => failed.push((*group, e)),
            }
        }
        // A device is added once every conversation has it (another device
        // of the account may have added it to some); one whose keys ran
        // short, or were not published yet, is tried again for the rest.
        let added: std::collections::BTreeSet<u64> = self.with(|e| {
            Ok(todo
                .add
                .iter()
                .copied()
                .filter(|&device| {
                    let who = DeviceRef { account, device };
                    groups.iter().all(|(_, c)| !e.is_member(c) || e.members(c).is_ok_and(|m| m.contains(&who)))
                })
                .collect())
        })?;
        let mut now = self.todo();
        if failed.len() == removals_failed {
            now.add.retain(|d| !added.contains(d));
        }
        for (group, linked) in joined {
            now.history.entry(group).or_default().extend(linked.iter().map(|d| d.device));
        }
        self.save_todo(&now)?;
        // Once every conversation has the devices: their history, and any
        // an earlier run did not finish giving. Without it a new device
        // shows the older messages as ones it cannot read, so what could
        // not be posted is kept for the next run; a refusal is for good.
        for (group, owed) in now.history {
            let linked: Vec<DeviceRef> = owed.iter().map(|&device| DeviceRef { account, device }).collect();
            let given = if groups.iter().any(|(g, _)| *g == group) {
                self.give_history(h, events, group, &linked).await
            } else {
                Ok(()) // this device is no longer in the conversation: nothing to give
            };
            if let Err(e) = &given {
                tracing::info!(group, "could not give a linked device this conversation's history: {e}");
            }
            if given.is_ok() || given.as_ref().is_err_and(refused_for_good) {
                let mut now = self.todo();
                if let Some(still) = now.history.get_mut(&group) {
                    still.retain(|d| !owed.contains(d));
                    if still.is_empty() {
                        now.history.remove(&group);
                    }
                }
                self.save_todo(&now)?;
            }
        }
        match failed.as_slice() {
            [] => Ok(()),
            [(group, e)] => Err(ClientError::Profile(format!(
                "this account's linked or removed devices could not be carried into the encryption of group \
                 {group} ({e}); any other encrypted conversations have them, and the next command tries again"
            ))),
            _ => {
                let each: Vec<String> = failed.iter().map(|(g, e)| format!("group {g}: {e}")).collect();
                Err(ClientError::Profile(format!(
                    "this account's linked or removed devices could not be carried into the encryption of {} \
                     conversations ({}); any others have them, and the next command tries again",
                    failed.len(),
                    each.join("; ")
                )))
            }
        }
    }

    /// Held while [`Crypto::maintain`] works: the to-do list is read and
    /// rewritten around network steps, so two commands of one profile take
    /// turns at it.
    fn maintaining(&self) -> Result<std::fs::File, ClientError> {
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.profile.join("e2ee.todo.lock"))
            .map_err(|e| ClientError::Profile(format!("cannot open {}: {e}", self.profile.display())))?;
        lock.lock().map_err(|e| ClientError::Profile(format!("cannot lock {}: {e}", self.profile.display())))?;
        Ok(lock)
    }

    /// The safety number of this account and the other one of a 1:1
    /// conversation's group, from the keys of the devices in it (see
    /// `skylark_e2ee::safety_number`), with how many devices each side has.
    pub fn safety_number(&self, group: u64, peer_account: u64) -> Result<(String, usize, usize), ClientError> {
        let me = self.identity.account_id;
        let keys = self.with(|e| e.member_keys(&group_conversation(group)))?;
        let side = |account: u64| -> Vec<[u8; 32]> {
            keys.iter()
                .filter(|k| k.member.account == account)
                .filter_map(|k| k.mls_key.as_slice().try_into().ok())
                .collect()
        };
        let (mine, theirs) = (side(me), side(peer_account));
        let number = skylark_e2ee::safety_number((me, &mine), (peer_account, &theirs));
        Ok((number, mine.len(), theirs.len()))
    }

    /// Whether this device encrypts for the group.
    pub fn encrypts(&self, group: u64) -> Result<bool, ClientError> {
        self.with(|e| Ok(e.is_member(&group_conversation(group))))
    }

    /// The payload of a post of `text` to the group with `client_id`, and
    /// the epoch it was encrypted in (to send as `message_epoch`), or the
    /// plain text and `None` when the group is not encrypted. Resend the
    /// same payload with the same client id (a new encryption of the same
    /// text would be a second message to the members) until the group
    /// refuses it as stale: then read the log on
    /// ([`Crypto::read_past_epoch`]) and make it again.
    pub fn group_payload(
        &self,
        group: u64,
        client_id: &str,
        text: &str,
    ) -> Result<(Vec<u8>, Option<u64>), ClientError> {
        let conversation = group_conversation(group);
        self.with(|e| {
            if e.is_member(&conversation) {
                let epoch = e.epoch(&conversation)?;
                Ok((e.encrypt_as(&conversation, client_id, text.as_bytes())?, Some(epoch)))
            } else {
                Ok((text.as_bytes().to_vec(), None))
            }
        })
    }

    /// After the group refused a post made in `epoch` as stale: reads the
    /// group's log until this device has the commit that ended the epoch
    /// (the frames read are kept for [`Crypto::take_read`]). The server
    /// hands a device its log only so far ahead of what it acknowledged,
    /// and commands that only send acknowledge nothing: when the live log
    /// stops short of the commit (for [`CATCH_UP_WAIT`]), the group's posts
    /// this device has not opened are read from the account's history
    /// instead (the live log brings them again later, answered from the
    /// journal). An error in words when even that does not find it.
    pub async fn read_past_epoch(
        &self,
        h: &SessionHandle,
        events: &mut impl Frames,
        group: u64,
        epoch: u64,
    ) -> Result<(), ClientError> {
        let moved = || -> Result<bool, ClientError> { Ok(self.with(|e| e.epoch(&group_conversation(group)))? > epoch) };
        self.read_until_epoch_moves(h, events, group, epoch).await?;
        if moved()? {
            return Ok(());
        }
        self.open_unread_from_history(h, group).await?;
        if moved()? {
            return Ok(());
        }
        Err(ClientError::Profile(
            "the message was not sent: it was encrypted with keys the group has changed since, and this device \
             could not read the change in time; try again"
                .into(),
        ))
    }

    /// Opens, in order, the posts of `group` in the account's history that
    /// come after the last one this device opened.
    async fn open_unread_from_history(&self, h: &SessionHandle, group: u64) -> Result<(), ClientError> {
        let mut unread: Vec<v1::Event> = Vec::new();
        let mut before = 0;
        'pages: loop {
            let page = h.history(before, HISTORY_PAGE).await?;
            for event in &page.events {
                let Some(v1::event::Body::Group(g)) = &event.body else { continue };
                if g.group != group || !matches!(g.body, Some(v1::group_event::Body::Message(_))) {
                    continue;
                }
                let (key, _) = journal_keys(event);
                if self.with(|e| Ok(e.recall(&key).is_some()))? {
                    break 'pages;
                }
                unread.push(event.clone());
            }
            match page.events.last() {
                Some(oldest) if page.has_more => before = oldest.seq,
                _ => break,
            }
        }
        for event in unread.iter().rev() {
            self.open_event(&*self.fetch_parts(h, event).await?);
        }
        Ok(())
    }

    /// Posts `text` to the group: encrypted when the group is, plain
    /// otherwise. Returns the ack and whether it was encrypted.
    pub async fn post(
        &self,
        h: &SessionHandle,
        events: &mut impl Frames,
        group: u64,
        client_id: &str,
        text: &str,
    ) -> Result<(v1::SendAck, bool), ClientError> {
        self.post_with(h, events, group, client_id, text, crate::session::SendOptions::default()).await
    }

    /// [`Crypto::post`] of a post that edits or deletes one of yours, or
    /// disappears (see [`crate::session::SendOptions`]). An encrypted post
    /// names the epoch it was made in; when another member's commit ended
    /// that epoch first, the group refuses it, and this reads the log
    /// through that commit (on `events`) and encrypts it again.
    pub async fn post_with(
        &self,
        h: &SessionHandle,
        events: &mut impl Frames,
        group: u64,
        client_id: &str,
        text: &str,
        options: crate::session::SendOptions,
    ) -> Result<(v1::SendAck, bool), ClientError> {
        self.refresh_keys(h, events, group).await;
        for _ in 0..COMMIT_ATTEMPTS {
            let (payload, epoch) = self.group_payload(group, client_id, text)?;
            let options = crate::session::SendOptions { message_epoch: epoch, ..options.clone() };
            match h.send_with(crate::session::To::Group(group), client_id, payload, options).await {
                Ok(ack) => return Ok((ack, epoch.is_some())),
                Err(e) if e.error_code() == Some(ErrorCode::StaleEpoch) => {
                    let Some(epoch) = epoch else { return Err(e) };
                    self.read_past_epoch(h, events, group, epoch).await?;
                }
                Err(e) => return Err(e),
            }
        }
        Err(ClientError::Profile(
            "the group's encryption kept changing while this device tried to send; try again".into(),
        ))
    }

    /// Before this device posts to an encrypted group it joined from a key
    /// package: a commit giving its leaf fresh keys, which also fills the
    /// tree above it ([`skylark_e2ee::Engine::wants_update`]); and again
    /// before a post a week after its last commit there.
    /// Best effort, and one attempt: when another member's commit comes
    /// first (that one is read then), or the server refuses it, the post
    /// goes out anyway and the next one tries again, so members posting
    /// for the first time at once do not hold up each other or a change
    /// of the group's members. Frames read on the way are kept for
    /// [`Crypto::take_read`].
    pub async fn refresh_keys(&self, h: &SessionHandle, events: &mut impl Frames, group: u64) {
        let conversation = group_conversation(group);
        if !self.with(|e| Ok(e.wants_update(&conversation))).unwrap_or(false) {
            return;
        }
        let refresh = |e: &mut Engine| {
            if e.wants_update(&conversation) { e.update(&conversation).map(Some) } else { Ok(None) }
        };
        if let Err(e) = self.commit_within(h, events, group, refresh, 1).await {
            tracing::info!(group, "could not refresh this device's keys in the group: {e}");
        }
    }

    /// Gives devices of this account just added to a 1:1 conversation
    /// what this device has of its history, after the commit that added
    /// them: encrypted posts of the newest messages first, each at most
    /// [`skylark_e2ee::HISTORY_BYTES`], at most
    /// [`skylark_e2ee::HISTORY_CHUNKS`] of them. Their clients then show
    /// those messages instead of saying they cannot read them. Only for a
    /// 1:1 conversation, whose every member may read all of it: in a group,
    /// a member added later must not read what came before.
    async fn give_history(
        &self,
        h: &SessionHandle,
        events: &mut impl Frames,
        group: u64,
        linked: &[DeviceRef],
    ) -> Result<(), ClientError> {
        if linked.is_empty() || !h.group_info(group).await?.direct {
            return Ok(());
        }
        let conversation = group_conversation(group);
        // A chunk's post fits the server's limit (an encrypted post is its
        // text and under 1 KiB more).
        let budget = skylark_e2ee::HISTORY_BYTES.min((h.max_payload_bytes() as usize).saturating_sub(1024));
        let chunks = self.with(|e| Ok(e.history_chunks(&conversation, budget, skylark_e2ee::HISTORY_CHUNKS)))?;
        for chunk in chunks {
            let client_id = new_client_id();
            for attempt in 1..=COMMIT_ATTEMPTS {
                let (payload, epoch) = self.with(|e| {
                    let epoch = e.epoch(&conversation)?;
                    Ok((e.seal_history(&conversation, linked, &chunk)?, epoch))
                })?;
                let options = crate::session::SendOptions { message_epoch: Some(epoch), ..Default::default() };
                match h.send_with(crate::session::To::Group(group), &client_id, payload, options).await {
                    Ok(_) => break,
                    Err(e) if e.error_code() == Some(ErrorCode::StaleEpoch) && attempt < COMMIT_ATTEMPTS => {
                        self.read_past_epoch(h, events, group, epoch).await?;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// Adds devices in commits of at most [`ADD_BATCH`], so each post (a
    /// commit carries the added devices' key packages, its Welcome the
    /// group's ratchet tree) stays within the server's payload limit.
    async fn add_in_batches(
        &self,
        h: &SessionHandle,
        events: &mut impl Frames,
        group: u64,
        packages: &[(DeviceRef, Vec<u8>)],
    ) -> Result<(), ClientError> {
        let conversation = group_conversation(group);
        for batch in packages.chunks(ADD_BATCH) {
            self.commit(h, events, group, |e| e.add(&conversation, batch)).await?;
        }
        Ok(())
    }

    /// Claims a key package of every device of each account in `phones`.
    async fn claim(&self, h: &SessionHandle, phones: &[String]) -> Result<Claimed, ClientError> {
        let mut claimed = Claimed::default();
        let mut answers = Vec::with_capacity(phones.len());
        for batch in phones.chunks(crate::session::MAX_CLAIM_NUMBERS) {
            match claim_patiently(h, batch).await {
                Ok(some) => answers.extend(some),
                // A server whose rate limit holds fewer claims than the batch
                // (or one older than batched claims) refuses it as a whole:
                // one number at a time then, which also names a bad number.
                Err(ClientError::Refused { code: ErrorCode::InvalidArgument, .. }) if batch.len() > 1 => {
                    for phone in batch {
                        answers.extend(claim_patiently(h, std::slice::from_ref(phone)).await?);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        for answer in answers {
            for d in answer.devices {
                let who = DeviceRef { account: answer.account_id, device: d.device_id };
                if d.key_package.is_empty() {
                    claimed.without_keys.push((answer.phone.clone(), d.device_id));
                } else {
                    // Its MLS key must be the one its device key signed.
                    skylark_e2ee::check_package(who, &d.key_package, &d.device_key).map_err(e2ee)?;
                    claimed.packages.push((who, d.key_package.to_vec()));
                }
            }
        }
        Ok(claimed)
    }

    /// Starts the group's encryption: this device creates the MLS group
    /// and adds every device of every member (its own account's other
    /// devices included). Stays plain when a device has no keys.
    pub async fn start_group(
        &self,
        h: &SessionHandle,
        events: &mut impl Frames,
        info: &v1::GroupInfo,
    ) -> Result<Setup, ClientError> {
        let phones: Vec<String> = info.members.iter().map(|m| m.phone.clone()).collect();
        let claimed = self.claim(h, &phones).await?;
        if !claimed.without_keys.is_empty() {
            return Ok(Setup::Plain { without_keys: claimed.without_keys });
        }
        let conversation = group_conversation(info.id);
        self.with(|e| if e.is_member(&conversation) { Ok(()) } else { e.create(&conversation) })?;
        let packages = claimed.packages;
        self.add_in_batches(h, events, info.id, &packages).await?;
        Ok(Setup::Encrypted)
    }

    /// The group of the end-to-end encrypted 1:1 conversation with
    /// `phone`, set up on first use; `None` when it cannot be encrypted (a
    /// device of either account cannot encrypt, or it is this account's
    /// own number), and then the caller sends in the clear. A conversation
    /// found plain is not checked again for [`PLAIN_RECHECK`], since each
    /// check claims a key package of every device.
    pub async fn start_direct(
        &self,
        h: &SessionHandle,
        events: &mut impl Frames,
        phone: &str,
    ) -> Result<Option<u64>, ClientError> {
        let info = match h.open_direct(phone).await {
            Ok(info) => info,
            Err(e) if e.error_code() == Some(ErrorCode::Forbidden) => return Ok(None),
            Err(e) => return Err(e),
        };
        if self.encrypts(info.id)? {
            return Ok(Some(info.id));
        }
        if self.recently_plain(info.id) {
            return Ok(None);
        }
        match self.start_group(h, events, &info).await? {
            Setup::Encrypted => Ok(Some(info.id)),
            Setup::Plain { .. } => {
                self.remember_plain(info.id);
                Ok(None)
            }
        }
    }

    fn plain_file(&self) -> PathBuf {
        self.profile.join("e2ee.plain")
    }

    /// Conversations found plain, with when (ms since the epoch).
    fn plain_marks(&self) -> std::collections::HashMap<u64, u64> {
        std::fs::read(self.plain_file()).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default()
    }

    fn recently_plain(&self, group: u64) -> bool {
        self.plain_marks().get(&group).is_some_and(|&at| now_ms().saturating_sub(at) < PLAIN_RECHECK.as_millis() as u64)
    }

    fn remember_plain(&self, group: u64) {
        let mut marks = self.plain_marks();
        marks.insert(group, now_ms());
        if let Ok(json) = serde_json::to_vec(&marks) {
            // Only a hint: losing it costs one more check.
            let _ = std::fs::write(self.plain_file(), json);
        }
    }

    /// Before adding accounts to an encrypted group: their key packages,
    /// or the devices that have none (then the group would have members
    /// who cannot read it, so the caller should not add them).
    pub async fn prepare_add(
        &self,
        h: &SessionHandle,
        group: u64,
        phones: &[String],
    ) -> Result<Option<Prepared>, ClientError> {
        if !self.encrypts(group)? {
            return Ok(None);
        }
        let claimed = self.claim(h, phones).await?;
        Ok(Some(Prepared { claimed }))
    }

    /// Adds the prepared devices to the group's encryption (after the
    /// server added their accounts).
    pub async fn finish_add(
        &self,
        h: &SessionHandle,
        events: &mut impl Frames,
        group: u64,
        prepared: Prepared,
    ) -> Result<(), ClientError> {
        self.add_in_batches(h, events, group, &prepared.claimed.packages).await
    }

    /// After [`Crypto::finish_add`] failed: the server has the new members,
    /// but their devices may not have the group's keys. When the commit
    /// giving them the keys is not staged (nothing will send it again: the
    /// server refused it for good, or other commits kept coming first),
    /// takes out of the group again each of `phones` none of whose devices
    /// holds the keys (they could not have read it), and returns them.
    pub async fn undo_unkeyed_add(
        &self,
        h: &SessionHandle,
        group: u64,
        phones: &[String],
    ) -> Result<Vec<String>, ClientError> {
        let conversation = group_conversation(group);
        let (staged, keyed) = self.with(|e| {
            let staged = e.outgoing().iter().any(|o| o.conversation == conversation);
            let keyed: std::collections::BTreeSet<u64> =
                e.members(&conversation)?.into_iter().map(|d| d.account).collect();
            Ok((staged, keyed))
        })?;
        if staged {
            return Ok(Vec::new());
        }
        let info = h.group_info(group).await?;
        let mut out = Vec::new();
        for m in info.members.iter().filter(|m| phones.contains(&m.phone) && !keyed.contains(&m.account)) {
            h.change_group(group, v1::change_group::Change::Remove(m.phone.clone())).await?;
            out.push(m.phone.clone());
        }
        Ok(out)
    }

    /// Removes every device of `accounts` from the group's encryption
    /// (after the server removed the accounts), in one commit: they read
    /// nothing sent after.
    pub async fn remove_accounts(
        &self,
        h: &SessionHandle,
        events: &mut impl Frames,
        group: u64,
        accounts: &[u64],
    ) -> Result<bool, ClientError> {
        if !self.encrypts(group)? {
            return Ok(false);
        }
        let conversation = group_conversation(group);
        self.commit(h, events, group, |e| {
            let leaving: Vec<DeviceRef> =
                e.members(&conversation)?.into_iter().filter(|d| accounts.contains(&d.account)).collect();
            e.remove(&conversation, &leaving)
        })
        .await
    }
}

/// Key packages claimed for an addition.
#[derive(Debug, Default)]
struct Claimed {
    packages: Vec<(DeviceRef, Vec<u8>)>,
    without_keys: Vec<(String, u64)>,
}

/// What [`Crypto::prepare_add`] claimed.
#[derive(Debug)]
pub struct Prepared {
    claimed: Claimed,
}

impl Prepared {
    /// Devices (phone, device id) that publish no keys.
    pub fn without_keys(&self) -> &[(String, u64)] {
        &self.claimed.without_keys
    }
}

/// The longest a claim waits out the server's rate limit before giving up.
const CLAIM_PATIENCE: Duration = Duration::from_secs(60);

/// Whether a commit the server did not take may still be taken as it is
/// later: no answer came (the connection went), or the server was busy.
/// Any other refusal would be repeated.
fn may_take_later(e: &ClientError) -> bool {
    match e {
        ClientError::Refused { code, .. } => {
            matches!(code, ErrorCode::Unavailable | ErrorCode::Internal | ErrorCode::RateLimited)
        }
        _ => true,
    }
}

/// A commit refused for good, in words: what failed, and that the group's
/// encryption is as it was.
fn commit_refused_words(e: ClientError) -> ClientError {
    let ClientError::Refused { code, message, retry_after_ms } = e else { return e };
    let message = if code == ErrorCode::MessageTooLarge {
        format!(
            "the change to this group's encryption is too large for this server, in a post and as a file \
             ({message}); the group's encryption was not changed"
        )
    } else {
        format!("the server refused the change to this group's encryption ({message}); it was not changed")
    };
    ClientError::Refused { code, message, retry_after_ms }
}

/// Claims the key packages of `phones` (one request; a single number as a
/// plain claim), waiting when the server says claims come too fast (adding
/// many accounts at once meets the per-device limit).
async fn claim_patiently(h: &SessionHandle, phones: &[String]) -> Result<Vec<v1::ClaimedKeyPackages>, ClientError> {
    let mut waited = Duration::ZERO;
    loop {
        let answer = match phones {
            [phone] => h.claim_key_packages(phone).await.map(|one| vec![one]),
            _ => h.claim_key_packages_of(phones).await,
        };
        match answer {
            Err(ClientError::Refused { code: ErrorCode::RateLimited, retry_after_ms, .. })
                if waited < CLAIM_PATIENCE =>
            {
                let wait = Duration::from_millis(retry_after_ms.max(100));
                tokio::time::sleep(wait).await;
                waited += wait;
            }
            answer => return answer,
        }
    }
}

/// The journal keys of a log entry: a group post's id in its group (what a
/// deletion for everyone names), and the key earlier versions used (its
/// account log sequence), read when the first is not there. Each is
/// unique per device.
fn journal_keys(event: &v1::Event) -> (String, String) {
    let legacy = format!("log:{}", event.seq);
    match &event.body {
        Some(v1::event::Body::Group(g)) => (post_key(g.group, g.group_seq), legacy),
        _ => (legacy.clone(), legacy),
    }
}

fn post_key(group: u64, seq: u64) -> String {
    format!("post:{group}:{seq}")
}

/// What an opened entry shows (`None`: nothing, a handshake).
fn shown(opened: Opened) -> Option<Shown> {
    match opened {
        Opened::Message { plaintext, .. } => Some(Shown::Encrypted(String::from_utf8_lossy(&plaintext).into_owned())),
        Opened::DevicesChanged { .. } => Some(Shown::DevicesChanged),
        Opened::Failed(why) => Some(Shown::Unreadable(why)),
        // Earlier messages arrived: shown where the history is read.
        Opened::Control | Opened::History { .. } => None,
    }
}

fn parse_group(conversation: &[u8]) -> Option<u64> {
    skylark_e2ee::conversation_group(conversation)
}
