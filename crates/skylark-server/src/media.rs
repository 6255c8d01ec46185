//! Attachments: files the clients encrypt and upload, kept as opaque blobs.
//!
//! A client encrypts a file with a fresh key, uploads the ciphertext here
//! (resumably: tus 1.0, in the gateway's `media` module), and sends the
//! blob's id, key and digest inside its end-to-end encrypted message. The
//! server stores bytes it cannot read and decides only who may fetch them.
//!
//! **Authentication.** HTTP requests carry a short-lived *media token* a
//! device obtains over its authenticated connection ([`Media::grant`]): the
//! account, the device and an expiry, MACed with a key every node of a
//! cluster shares (kept in the store). Each use also checks that the device
//! has not been removed since.
//!
//! **Storage.** An upload in progress is a file in the node's staging
//! directory (`uploads/ID.part` beside `ID.meta`), fsync'd before every
//! `Upload-Offset` the server reports. Complete, it moves into the object
//! store (the `object_store` crate; local files under the data directory by
//! default, or an S3-compatible bucket, `[media.s3]`) as `blobs/ID`.
//!
//! **References and lifetime.** Who may read a blob, and how long it lives,
//! is written as empty marker objects `refs/ID/WHO-MS` (`WHO` is `a` and an
//! account id, or `g` and a group id; `MS` the time of the reference). The
//! uploader gets one when the upload completes; sending a message that
//! names the blob (`SendMessage.attachments`) adds one for the recipient or
//! the group, and forwarding it again adds another. Every marker is a new,
//! independent object, so concurrent sends never race. A blob lives until
//! `retention_ms` after its newest reference (the collector keeps only the
//! newest marker of each reader; a commit's parts are referenced with a
//! marker dated `commit_retention_ms - retention_ms` later, so they live
//! `commit_retention_ms`); [`Media::collect`] deletes
//! what is past that (the blob first, then its markers, so a crash between
//! the two leaves markers the next pass removes), unfinished uploads older
//! than `unfinished_upload_ttl_ms`, and any blob that has no marker at all.

use crate::config::Quota;
use crate::ratelimit::{KeyedLimiter, Limited};
use bytes::Bytes;
use futures_util::{Stream, StreamExt, TryStreamExt};
use hmac::{Hmac, Mac};
use object_store::path::Path as Key;
use object_store::{GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use skylark_core::{AccountId, Clock, DeviceId};
use skylark_store::{Store, StoreError};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// The media settings (the file's `[media]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MediaConfig {
    /// Where blobs and unfinished uploads are kept; empty: `media` in the data directory.
    pub dir: PathBuf,
    /// Largest file accepted, in bytes (refused before anything is stored).
    pub max_upload_bytes: u64,
    /// Bytes one account may upload per day (UTC).
    pub daily_quota_bytes: u64,
    /// Uploads started per account.
    pub uploads_per_account: Quota,
    /// A blob is kept this long after the newest message that references it.
    pub retention_ms: u64,
    /// A blob that is part of an encrypted group's commit (posted with
    /// `commit_epoch`) is kept this long instead: a device away longer
    /// than `retention_ms` still needs it to follow the group's encryption.
    pub commit_retention_ms: u64,
    /// An upload not finished within this time is deleted.
    pub unfinished_upload_ttl_ms: u64,
    /// How long a media token stays valid.
    pub token_ttl_ms: u64,
    /// How often expired blobs and abandoned uploads are collected.
    pub collect_every_ms: u64,
    /// Keep blobs in an S3-compatible bucket instead of `dir` (a cluster's
    /// nodes share it; unfinished uploads stay in each node's `dir`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Config>,
}

/// An S3-compatible bucket (the file's `[media.s3]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct S3Config {
    /// The bucket; it must exist.
    pub bucket: String,
    /// The service's URL (MinIO, Garage, Ceph…); empty: Amazon S3 itself.
    pub endpoint: String,
    /// The bucket's region (`us-east-1` suits most S3-compatible services).
    pub region: String,
    /// The access key; empty: from the environment (`AWS_ACCESS_KEY_ID`).
    pub access_key_id: String,
    /// Its secret; empty: from the environment (`AWS_SECRET_ACCESS_KEY`).
    pub secret_access_key: String,
}

impl Default for MediaConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::new(),
            max_upload_bytes: 100 * 1024 * 1024,
            daily_quota_bytes: 2 * 1024 * 1024 * 1024,
            uploads_per_account: Quota { burst: 30, per_ms: 2_000 },
            retention_ms: 30 * 24 * 3_600_000,
            commit_retention_ms: 365 * 24 * 3_600_000,
            unfinished_upload_ttl_ms: 24 * 3_600_000,
            token_ttl_ms: 3_600_000,
            collect_every_ms: 3_600_000,
            s3: None,
        }
    }
}

/// At most this many attachments in one message.
pub const MAX_ATTACHMENTS: usize = 32;

/// Why a media request failed, in words a person can act on.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("the media token is missing, malformed or expired; ask for a new one over your connection")]
    BadToken,
    #[error("this device was removed; sign in again")]
    DeviceRemoved,
    #[error("the file is {size} bytes; the largest this server accepts is {max} bytes")]
    TooLarge { size: u64, max: u64 },
    #[error("Upload-Length is missing or not a number of bytes")]
    MissingLength,
    #[error("today's upload quota of {quota} bytes for this account is used up; try again tomorrow")]
    QuotaExceeded { quota: u64, retry_after: Duration },
    #[error("{}; try again in {} s", .0.what(), .0.retry_after.as_secs().max(1))]
    RateLimited(Limited),
    #[error("no such upload (it may have finished or expired); start a new one")]
    UnknownUpload,
    #[error("the upload is at byte {current}, not {claimed}; ask for its offset (HEAD) and continue from there")]
    OffsetMismatch { current: u64, claimed: u64 },
    #[error("another request is writing to this upload; wait for it or ask for its offset (HEAD)")]
    Busy,
    #[error("the body goes past the declared Upload-Length of {length} bytes")]
    PastLength { length: u64 },
    #[error("no such file (it may have expired)")]
    NotFound,
    #[error("this file was not shared with you")]
    Forbidden,
    #[error("the requested range is outside the file's {size} bytes")]
    BadRange { size: u64 },
    #[error("{0:?} is not an attachment id")]
    BadId(String),
    #[error("a message may carry at most {MAX_ATTACHMENTS} attachments")]
    TooManyAttachments,
    #[error("attachment {0} is not yours to share, or it expired; upload it again")]
    NotShareable(String),
    #[error("the media storage failed: {0}")]
    Storage(String),
    #[error("the server's storage is unavailable: {0}")]
    Store(#[from] StoreError),
}

impl From<std::io::Error> for MediaError {
    fn from(e: std::io::Error) -> Self {
        MediaError::Storage(e.to_string())
    }
}

impl From<object_store::Error> for MediaError {
    fn from(e: object_store::Error) -> Self {
        match e {
            object_store::Error::NotFound { .. } => MediaError::NotFound,
            e => MediaError::Storage(e.to_string()),
        }
    }
}

/// The holder of a valid media token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bearer {
    pub account: AccountId,
    pub device: DeviceId,
}

/// A token handed to a device.
#[derive(Debug, Clone)]
pub struct Grant {
    pub token: String,
    pub expires_at_ms: u64,
    pub max_upload_bytes: u64,
}

/// Who a message with attachments goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    Account(AccountId),
    Group(AccountId),
}

/// An upload's state, kept beside its bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct UploadMeta {
    owner: u64,
    length: u64,
    created_ms: u64,
}

/// A download: the bytes of `start..end` of a blob of `size` bytes.
pub struct Download {
    pub size: u64,
    pub start: u64,
    pub end: u64,
    pub body: futures_util::stream::BoxStream<'static, Result<Bytes, std::io::Error>>,
}

impl std::fmt::Debug for Download {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Download")
            .field("size", &self.size)
            .field("start", &self.start)
            .field("end", &self.end)
            .finish()
    }
}

/// What one collection pass removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Collected {
    pub blobs: usize,
    pub uploads: usize,
}

/// Bytes read from or written to a blob's file at a time.
const READ_BLOCK: usize = 1 << 20;

const TOKEN_VERSION: u8 = 1;
const TOKEN_BYTES: usize = 1 + 8 + 8 + 8 + 16;
const DAY_MS: u64 = 24 * 3_600_000;

#[derive(Clone)]
pub struct Media {
    inner: Arc<Inner>,
}

struct Inner {
    config: MediaConfig,
    blobs: Arc<dyn ObjectStore>,
    /// The object store's root when it is this machine's filesystem: a
    /// finished upload is renamed into it rather than copied.
    local_root: Option<PathBuf>,
    staging: PathBuf,
    mac_key: Vec<u8>,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    busy: Mutex<HashSet<String>>,
    /// Bytes reserved per account on the current day (day number, bytes).
    used: Mutex<HashMap<AccountId, (u64, u64)>>,
    uploads: KeyedLimiter,
}

impl std::fmt::Debug for Media {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Media").field("blobs", &self.inner.blobs.to_string()).finish_non_exhaustive()
    }
}

/// The S3 client for `config` (credentials left empty come from the environment).
fn s3_store(config: &S3Config) -> Result<object_store::aws::AmazonS3, MediaError> {
    // The S3 client speaks TLS through rustls with ring, the workspace's one
    // crypto provider (a no-op when another part installed it already).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(&config.bucket);
    if !config.region.is_empty() {
        builder = builder.with_region(&config.region);
    }
    if !config.endpoint.is_empty() {
        builder = builder
            .with_endpoint(&config.endpoint)
            .with_allow_http(config.endpoint.starts_with("http://"))
            .with_virtual_hosted_style_request(false);
    }
    if !config.access_key_id.is_empty() {
        builder = builder.with_access_key_id(&config.access_key_id).with_secret_access_key(&config.secret_access_key);
    }
    builder.build().map_err(|e| MediaError::Storage(format!("the [media.s3] settings do not work: {e}")))
}

fn valid_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn io_err(e: object_store::Error) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

/// Makes a file's (or a directory's) contents durable.
async fn sync_path(path: &Path) -> std::io::Result<()> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || std::fs::File::open(&path)?.sync_all()).await.map_err(std::io::Error::other)?
}

impl Media {
    /// Opens (creating) the staging directory and the blob store under
    /// `config.dir`; the token key comes from (or goes into) `store`.
    pub async fn open(config: MediaConfig, store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Result<Media, MediaError> {
        let root = config.dir.join("blobs");
        let staging = config.dir.join("uploads");
        for dir in [&root, &staging] {
            tokio::fs::create_dir_all(dir).await.map_err(|e| {
                MediaError::Storage(format!(
                    "cannot create {}: {e} (check [media] dir and its permissions)",
                    dir.display()
                ))
            })?;
        }
        let (blobs, local_root): (Arc<dyn ObjectStore>, _) = match &config.s3 {
            Some(s3) => (Arc::new(s3_store(s3)?), None),
            None => {
                let local = object_store::local::LocalFileSystem::new_with_prefix(&root)?;
                (Arc::new(local), Some(std::fs::canonicalize(&root)?))
            }
        };
        let mut candidate = vec![0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut candidate);
        let mac_key = store.secret("media-token", candidate).await?;
        let uploads = KeyedLimiter::new("uploads_per_account", config.uploads_per_account);
        Ok(Media {
            inner: Arc::new(Inner {
                config,
                blobs,
                local_root,
                staging,
                mac_key,
                store,
                clock,
                busy: Mutex::new(HashSet::new()),
                used: Mutex::new(HashMap::new()),
                uploads,
            }),
        })
    }

    pub fn config(&self) -> &MediaConfig {
        &self.inner.config
    }

    /// The token MAC over `body`.
    fn hmac(&self, body: &[u8]) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.inner.mac_key).expect("HMAC takes any key length");
        mac.update(body);
        mac
    }

    fn mac(&self, body: &[u8]) -> [u8; 16] {
        let full = self.hmac(body).finalize().into_bytes();
        let mut out = [0u8; 16];
        out.copy_from_slice(&full[..16]);
        out
    }

    /// A token for `device` of `account`, valid for `token_ttl_ms`.
    pub fn grant(&self, account: AccountId, device: DeviceId) -> Grant {
        let expires_at_ms = self.inner.clock.now_ms() + self.inner.config.token_ttl_ms;
        let mut raw = Vec::with_capacity(TOKEN_BYTES);
        raw.push(TOKEN_VERSION);
        raw.extend_from_slice(&account.0.to_be_bytes());
        raw.extend_from_slice(&device.0.to_be_bytes());
        raw.extend_from_slice(&expires_at_ms.to_be_bytes());
        let tag = self.mac(&raw);
        raw.extend_from_slice(&tag);
        use base64::Engine;
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
        Grant { token, expires_at_ms, max_upload_bytes: self.inner.config.max_upload_bytes }
    }

    /// Checks a token (its MAC, its expiry, and that the device still exists).
    pub async fn bearer(&self, token: &str) -> Result<Bearer, MediaError> {
        use base64::Engine;
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token).map_err(|_| MediaError::BadToken)?;
        if raw.len() != TOKEN_BYTES || raw[0] != TOKEN_VERSION {
            return Err(MediaError::BadToken);
        }
        let (body, tag) = raw.split_at(TOKEN_BYTES - 16);
        self.hmac(body).verify_truncated_left(tag).map_err(|_| MediaError::BadToken)?;
        let word = |at: usize| u64::from_be_bytes(body[at..at + 8].try_into().unwrap_or_default());
        let (account, device, expires) = (AccountId(word(1)), DeviceId(word(9)), word(17));
        if expires < self.inner.clock.now_ms() {
            return Err(MediaError::BadToken);
        }
        match self.inner.store.device(device).await? {
            Some(d) if d.account_id == account && d.is_active() => Ok(Bearer { account, device }),
            _ => Err(MediaError::DeviceRemoved),
        }
    }

    fn part(&self, id: &str) -> PathBuf {
        self.inner.staging.join(format!("{id}.part"))
    }

    fn meta_path(&self, id: &str) -> PathBuf {
        self.inner.staging.join(format!("{id}.meta"))
    }

    /// Starts an upload of `length` bytes: refused past the size limit, the
    /// account's daily quota or its rate limit before anything is stored.
    pub async fn create(&self, who: &Bearer, length: u64) -> Result<String, MediaError> {
        let config = &self.inner.config;
        if length > config.max_upload_bytes {
            return Err(MediaError::TooLarge { size: length, max: config.max_upload_bytes });
        }
        self.inner.uploads.check(&who.account.0.to_string()).map_err(MediaError::RateLimited)?;
        let now = self.inner.clock.now_ms();
        {
            let mut used = self.inner.used.lock().unwrap_or_else(|p| p.into_inner());
            let today = now / DAY_MS;
            let entry = used.entry(who.account).or_insert((today, 0));
            if entry.0 != today {
                *entry = (today, 0);
            }
            if entry.1 + length > config.daily_quota_bytes {
                let retry_after = Duration::from_millis((today + 1) * DAY_MS - now);
                return Err(MediaError::QuotaExceeded { quota: config.daily_quota_bytes, retry_after });
            }
            entry.1 += length;
        }
        let mut raw = [0u8; 16];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut raw);
        let id: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let meta = UploadMeta { owner: who.account.0, length, created_ms: now };
        let json = serde_json::to_vec(&meta).map_err(|e| MediaError::Storage(e.to_string()))?;
        tokio::fs::File::create(self.part(&id)).await?.sync_all().await?;
        let mut file = tokio::fs::File::create(self.meta_path(&id)).await?;
        file.write_all(&json).await?;
        file.sync_all().await?;
        sync_path(&self.inner.staging).await?;
        metrics::counter!("skylark_media_uploads_total", "stage" => "started").increment(1);
        if length == 0 {
            // Nothing to append: complete already.
            self.finish(who, &id).await?;
        }
        Ok(id)
    }

    async fn upload_meta(&self, who: &Bearer, id: &str) -> Result<UploadMeta, MediaError> {
        if !valid_id(id) {
            return Err(MediaError::UnknownUpload);
        }
        let bytes = match tokio::fs::read(self.meta_path(id)).await {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(MediaError::UnknownUpload),
            Err(e) => return Err(e.into()),
        };
        let meta: UploadMeta = serde_json::from_slice(&bytes)
            .map_err(|e| MediaError::Storage(format!("upload {id}'s state is damaged: {e}")))?;
        if meta.owner != who.account.0 {
            return Err(MediaError::UnknownUpload);
        }
        Ok(meta)
    }

    /// An upload's progress: (offset, length). A finished upload of the
    /// caller's answers offset = length.
    pub async fn offset(&self, who: &Bearer, id: &str) -> Result<(u64, u64), MediaError> {
        match self.upload_meta(who, id).await {
            Ok(meta) => {
                let offset = tokio::fs::metadata(self.part(id)).await?.len();
                Ok((offset, meta.length))
            }
            Err(MediaError::UnknownUpload) if valid_id(id) => {
                // Finished: the blob exists and the caller uploaded it.
                let key = Key::from(format!("blobs/{id}"));
                match self.inner.blobs.head(&key).await {
                    Ok(head) if self.owns(who.account, id).await? => Ok((head.size, head.size)),
                    _ => Err(MediaError::UnknownUpload),
                }
            }
            Err(e) => Err(e),
        }
    }

    /// Appends `body` at `offset` (which must be the upload's current
    /// offset); returns the new offset once it is durable. A body cut off
    /// midway keeps what arrived. The last byte finishes the upload: the
    /// blob enters the object store, readable by its uploader.
    pub async fn append<S, E>(&self, who: &Bearer, id: &str, offset: u64, body: S) -> Result<u64, MediaError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        let meta = self.upload_meta(who, id).await?;
        let _busy = BusyGuard::take(&self.inner, id)?;
        let path = self.part(id);
        let file = tokio::fs::OpenOptions::new().append(true).open(&path).await?;
        let current = file.metadata().await?.len();
        if current != offset {
            return Err(MediaError::OffsetMismatch { current, claimed: offset });
        }
        // Body frames are small (16–64 KiB): written in blocks of READ_BLOCK.
        let mut file = tokio::io::BufWriter::with_capacity(READ_BLOCK, file);
        let mut written = current;
        let mut body = std::pin::pin!(body);
        let mut failure = None;
        while let Some(chunk) = body.next().await {
            let chunk = match chunk {
                Ok(chunk) => chunk,
                Err(e) => {
                    // The client went away: keep what arrived.
                    tracing::debug!(upload = id, error = %e, "upload body ended early");
                    break;
                }
            };
            if written + chunk.len() as u64 > meta.length {
                failure = Some(MediaError::PastLength { length: meta.length });
                break;
            }
            file.write_all(&chunk).await?;
            written += chunk.len() as u64;
        }
        file.flush().await?;
        let file = file.into_inner();
        file.sync_all().await?;
        drop(file);
        metrics::counter!("skylark_media_bytes_total", "direction" => "up").increment(written - current);
        if let Some(e) = failure {
            return Err(e);
        }
        if written == meta.length {
            self.finish(who, id).await?;
        }
        Ok(written)
    }

    /// Moves a complete upload into the object store. The uploader's
    /// reference is written first, so there is never a blob nobody owns.
    async fn finish(&self, who: &Bearer, id: &str) -> Result<(), MediaError> {
        self.reference(id, Audience::Account(who.account), self.config().retention_ms).await?;
        let part = self.part(id);
        match &self.inner.local_root {
            Some(root) => {
                let target = root.join("blobs");
                tokio::fs::create_dir_all(&target).await?;
                tokio::fs::rename(&part, target.join(id)).await?;
                sync_path(&target).await?;
            }
            None => {
                let mut upload = self.inner.blobs.put_multipart(&Key::from(format!("blobs/{id}"))).await?;
                let mut file = tokio::fs::File::open(&part).await?;
                loop {
                    // Each part's buffer is handed over, not copied.
                    let mut chunk = vec![0u8; 8 << 20];
                    let n = read_full(&mut file, &mut chunk).await?;
                    if n == 0 {
                        break;
                    }
                    chunk.truncate(n);
                    upload.put_part(PutPayload::from(chunk)).await?;
                }
                upload.complete().await?;
                tokio::fs::remove_file(&part).await?;
            }
        }
        tokio::fs::remove_file(self.meta_path(id)).await?;
        metrics::counter!("skylark_media_uploads_total", "stage" => "finished").increment(1);
        Ok(())
    }

    async fn reference(&self, id: &str, to: Audience, kept_ms: u64) -> Result<(), MediaError> {
        let who = match to {
            Audience::Account(a) => format!("a{}", a.0),
            Audience::Group(g) => format!("g{}", g.0),
        };
        // A marker's time is when its `retention_ms` starts: one kept
        // longer is dated that much later.
        let at = self.inner.clock.now_ms() + kept_ms.saturating_sub(self.config().retention_ms);
        let key = Key::from(format!("refs/{id}/{who}-{at}"));
        self.inner.blobs.put(&key, PutPayload::default()).await?;
        Ok(())
    }

    /// The references of blob `id`: (who, when).
    async fn references(&self, id: &str) -> Result<Vec<(String, u64)>, MediaError> {
        let prefix = Key::from(format!("refs/{id}"));
        let metas: Vec<_> = self.inner.blobs.list(Some(&prefix)).try_collect().await?;
        Ok(metas.iter().filter_map(|m| parse_ref(m.location.filename()?)).collect())
    }

    async fn owns(&self, account: AccountId, id: &str) -> Result<bool, MediaError> {
        let mine = format!("a{}", account.0);
        Ok(self.references(id).await?.iter().any(|(who, _)| *who == mine))
    }

    /// May `account` read blob `id`: it uploaded it, was sent it, or is a
    /// member of a group it was posted to.
    pub async fn may_read(&self, account: AccountId, id: &str) -> Result<bool, MediaError> {
        let mine = format!("a{}", account.0);
        let references = self.references(id).await?;
        if references.iter().any(|(who, _)| *who == mine) {
            return Ok(true);
        }
        let groups: HashSet<u64> =
            references.iter().filter_map(|(who, _)| who.strip_prefix('g')?.parse().ok()).collect();
        for group in groups {
            if let Some(meta) = self.inner.store.group(AccountId(group)).await?
                && meta.members.iter().any(|m| m.account == account)
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// A message from `from` names these blobs: each must be readable by
    /// the sender (their own upload, or one they received: forwarding
    /// reuses the blob), and becomes readable by `to`, for another
    /// `retention_ms` (`commit_retention_ms` for the parts of a commit:
    /// `commit`).
    pub async fn share(&self, from: AccountId, ids: &[String], to: Audience, commit: bool) -> Result<(), MediaError> {
        if ids.len() > MAX_ATTACHMENTS {
            return Err(MediaError::TooManyAttachments);
        }
        for id in ids {
            if !valid_id(id) {
                return Err(MediaError::BadId(id.clone()));
            }
            let exists = self.inner.blobs.head(&Key::from(format!("blobs/{id}"))).await.is_ok();
            if !exists || !self.may_read(from, id).await? {
                return Err(MediaError::NotShareable(id.clone()));
            }
        }
        let config = self.config();
        let kept = if commit { config.commit_retention_ms.max(config.retention_ms) } else { config.retention_ms };
        for id in ids {
            self.reference(id, to, kept).await?;
            // The sender's own hold is renewed too (a forward keeps it alive).
            self.reference(id, Audience::Account(from), kept).await?;
        }
        Ok(())
    }

    /// Opens blob `id` for `who`, whole or the byte range `range` (as an
    /// HTTP Range header gives it: first byte, last byte inclusive or open;
    /// or a suffix length).
    pub async fn download(&self, who: &Bearer, id: &str, range: Option<ByteRange>) -> Result<Download, MediaError> {
        if !valid_id(id) {
            return Err(MediaError::NotFound);
        }
        let key = Key::from(format!("blobs/{id}"));
        let head = self.inner.blobs.head(&key).await?;
        if !self.may_read(who.account, id).await? {
            return Err(MediaError::Forbidden);
        }
        let size = head.size;
        let (start, end) = match range {
            None => (0, size),
            Some(ByteRange::From(first, last)) => {
                if first >= size {
                    return Err(MediaError::BadRange { size });
                }
                let end = last.map_or(size, |l| (l + 1).min(size));
                if end <= first {
                    return Err(MediaError::BadRange { size });
                }
                (first, end)
            }
            Some(ByteRange::Suffix(n)) => {
                if n == 0 || size == 0 {
                    return Err(MediaError::BadRange { size });
                }
                (size.saturating_sub(n), size)
            }
        };
        let body = if start == end {
            futures_util::stream::empty().boxed()
        } else if let Some(root) = &self.inner.local_root {
            // A local file is read in large blocks (object_store's reader
            // takes 8 KiB at a time, which costs several times the CPU).
            use tokio::io::{AsyncReadExt, AsyncSeekExt};
            let mut file = tokio::fs::File::open(root.join("blobs").join(id)).await?;
            file.seek(std::io::SeekFrom::Start(start)).await?;
            tokio_util::io::ReaderStream::with_capacity(file.take(end - start), READ_BLOCK).boxed()
        } else {
            let options = GetOptions { range: Some(GetRange::Bounded(start..end)), ..Default::default() };
            self.inner.blobs.get_opts(&key, options).await?.into_stream().map_err(io_err).boxed()
        };
        metrics::counter!("skylark_media_bytes_total", "direction" => "down").increment(end - start);
        Ok(Download { size, start, end, body })
    }

    /// Deletes blobs past their retention, blobs nobody references, and
    /// uploads abandoned for longer than `unfinished_upload_ttl_ms`.
    pub async fn collect(&self) -> Result<Collected, MediaError> {
        let now = self.inner.clock.now_ms();
        let config = &self.inner.config;
        let mut done = Collected::default();
        // Abandoned uploads.
        let mut dir = tokio::fs::read_dir(&self.inner.staging).await?;
        while let Some(entry) = dir.next_entry().await? {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".meta") else { continue };
            let created = match tokio::fs::read(entry.path()).await {
                Ok(bytes) => serde_json::from_slice::<UploadMeta>(&bytes).map(|m| m.created_ms).unwrap_or(0),
                Err(_) => continue,
            };
            if created + config.unfinished_upload_ttl_ms <= now {
                let busy = self.inner.busy.lock().unwrap_or_else(|p| p.into_inner()).contains(id);
                if !busy {
                    let _ = tokio::fs::remove_file(self.part(id)).await;
                    tokio::fs::remove_file(entry.path()).await?;
                    done.uploads += 1;
                }
            }
        }
        // A part without its state (a crash inside `create`): older than the TTL by its file time.
        let mut dir = tokio::fs::read_dir(&self.inner.staging).await?;
        while let Some(entry) = dir.next_entry().await? {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(id) = name.strip_suffix(".part") else { continue };
            if tokio::fs::metadata(self.meta_path(id)).await.is_ok() {
                continue;
            }
            let modified = entry.metadata().await?.modified()?;
            let modified_ms = modified.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
            if modified_ms + config.unfinished_upload_ttl_ms <= now {
                tokio::fs::remove_file(entry.path()).await?;
                done.uploads += 1;
            }
        }
        // Blobs past retention, then their markers.
        let mut newest: HashMap<String, u64> = HashMap::new();
        // The newest marker of each reader of each blob; older ones of the
        // same reader say nothing more (a blob forwarded often in one chat
        // would otherwise gather a marker per message) and are removed.
        let mut latest: HashMap<(String, String), (u64, Key)> = HashMap::new();
        let mut superseded = Vec::new();
        let mut refs = self.inner.blobs.list(Some(&Key::from("refs")));
        while let Some(meta) = refs.next().await {
            let meta = meta?;
            let parts: Vec<_> = meta.location.parts().map(|p| p.as_ref().to_owned()).collect();
            let [_, id, name] = parts.as_slice() else { continue };
            let Some((who, at)) = parse_ref(name) else { continue };
            let at_max = newest.entry(id.clone()).or_insert(0);
            *at_max = (*at_max).max(at);
            match latest.entry((id.clone(), who)) {
                std::collections::hash_map::Entry::Occupied(mut kept) => {
                    if kept.get().0 >= at {
                        superseded.push(meta.location);
                    } else {
                        superseded.push(std::mem::replace(kept.get_mut(), (at, meta.location)).1);
                    }
                }
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert((at, meta.location));
                }
            }
        }
        for key in &superseded {
            self.inner.blobs.delete(key).await?;
        }
        let mut markers: HashMap<String, Vec<Key>> = HashMap::new();
        for ((id, _), (_, key)) in latest {
            markers.entry(id).or_default().push(key);
        }
        let mut blobs = self.inner.blobs.list(Some(&Key::from("blobs")));
        let mut present = HashSet::new();
        while let Some(meta) = blobs.next().await {
            let meta = meta?;
            let Some(id) = meta.location.filename().map(str::to_owned) else { continue };
            let expired = match newest.get(&id) {
                Some(at) => at + config.retention_ms <= now,
                // Nobody references it (should not happen): gone once old enough.
                None => (meta.last_modified.timestamp_millis().max(0) as u64) + config.unfinished_upload_ttl_ms <= now,
            };
            if expired {
                self.inner.blobs.delete(&meta.location).await?;
                done.blobs += 1;
            } else {
                present.insert(id);
            }
        }
        // Markers of a blob that is gone, once past retention (a crash
        // between deleting a blob and its markers leaves these).
        for (id, at) in newest {
            if !present.contains(&id) && at + config.retention_ms <= now {
                for key in markers.remove(&id).unwrap_or_default() {
                    self.inner.blobs.delete(&key).await?;
                }
            }
        }
        metrics::counter!("skylark_media_collected_total", "what" => "blobs").increment(done.blobs as u64);
        metrics::counter!("skylark_media_collected_total", "what" => "uploads").increment(done.uploads as u64);
        Ok(done)
    }
}

/// A byte range of a download.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// From the first byte to the last (inclusive), or to the end.
    From(u64, Option<u64>),
    /// The last N bytes.
    Suffix(u64),
}

impl ByteRange {
    /// Parses an HTTP `Range` header with one range (`bytes=A-B`, `bytes=A-`,
    /// `bytes=-N`); `None` for anything else (served whole, as RFC 9110 allows).
    pub fn parse(header: &str) -> Option<ByteRange> {
        let spec = header.trim().strip_prefix("bytes=")?;
        if spec.contains(',') {
            return None;
        }
        let (first, last) = spec.split_once('-')?;
        let (first, last) = (first.trim(), last.trim());
        if first.is_empty() {
            return last.parse().ok().map(ByteRange::Suffix);
        }
        let first: u64 = first.parse().ok()?;
        let last = if last.is_empty() { None } else { Some(last.parse().ok()?) };
        if last.is_some_and(|l| l < first) {
            return None;
        }
        Some(ByteRange::From(first, last))
    }
}

fn parse_ref(name: &str) -> Option<(String, u64)> {
    let (who, at) = name.rsplit_once('-')?;
    Some((who.to_owned(), at.parse().ok()?))
}

async fn read_full(file: &mut tokio::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    use tokio::io::AsyncReadExt;
    let mut n = 0;
    while n < buf.len() {
        let read = file.read(&mut buf[n..]).await?;
        if read == 0 {
            break;
        }
        n += read;
    }
    Ok(n)
}

/// One writer per upload at a time.
struct BusyGuard<'a> {
    inner: &'a Inner,
    id: String,
}

impl<'a> BusyGuard<'a> {
    fn take(inner: &'a Inner, id: &str) -> Result<Self, MediaError> {
        let mut busy = inner.busy.lock().unwrap_or_else(|p| p.into_inner());
        if !busy.insert(id.to_owned()) {
            return Err(MediaError::Busy);
        }
        Ok(BusyGuard { inner, id: id.to_owned() })
    }
}

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.inner.busy.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_parse_as_http_writes_them() {
        assert_eq!(ByteRange::parse("bytes=0-99"), Some(ByteRange::From(0, Some(99))));
        assert_eq!(ByteRange::parse("bytes=100-"), Some(ByteRange::From(100, None)));
        assert_eq!(ByteRange::parse("bytes=-5"), Some(ByteRange::Suffix(5)));
        assert_eq!(ByteRange::parse("bytes=5-1"), None);
        assert_eq!(ByteRange::parse("bytes=0-1,3-4"), None);
        assert_eq!(ByteRange::parse("items=0-1"), None);
    }

    #[test]
    fn ids_are_32_lowercase_hex_digits() {
        assert!(valid_id("0123456789abcdef0123456789abcdef"));
        assert!(!valid_id("../../etc/passwd"));
        assert!(!valid_id("0123456789ABCDEF0123456789ABCDEF"));
        assert!(!valid_id(""));
    }

    #[test]
    fn references_name_who_and_when() {
        assert_eq!(parse_ref("a12-1700000000000"), Some(("a12".to_owned(), 1_700_000_000_000)));
        assert_eq!(parse_ref("g7-5"), Some(("g7".to_owned(), 5)));
        assert_eq!(parse_ref("junk"), None);
    }
}
