//! Skylark's durable state, behind per-domain traits.
//!
//! Callers see [`AccountStore`], [`VerificationStore`] and [`MetaStore`]
//! (bundled as [`Store`]), each method with its contract. The embedded
//! backend ([`redb_store::RedbStore`]) keeps everything in one redb file and
//! commits each write with fsync before returning; its in-memory twin serves
//! tests. A PostgreSQL backend implements the same traits without callers
//! changing, and must pass the same [`conformance`] suite.
//!
//! This crate knows domain types only: never protobuf, sockets or HTTP.

pub mod conformance;
pub mod redb_store;

use async_trait::async_trait;
use skylark_core::verification::VerificationSession;
use skylark_core::{Account, AccountId, Device, DeviceId, NewDevice, PhoneNumber};

pub use redb_store::RedbStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The backend failed (disk, database); the operation had no effect.
    #[error("storage backend failed: {0}")]
    Backend(String),
    /// A stored record could not be decoded.
    #[error("stored record is corrupt: {0}")]
    Corrupt(String),
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
    /// `device` is enrolled. Durable when it returns.
    async fn register(&self, phone: &PhoneNumber, device: NewDevice, now_ms: u64) -> Result<Registration, StoreError>;
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

#[async_trait]
pub trait MetaStore: Send + Sync {
    /// The server's identity: `candidate` if none was stored yet (it is then
    /// stored), otherwise the stored one. Stable for the life of the data.
    async fn server_id(&self, candidate: [u8; 16]) -> Result<[u8; 16], StoreError>;
}

/// Every domain store of one backend.
pub trait Store: AccountStore + VerificationStore + MetaStore {}

impl<T: AccountStore + VerificationStore + MetaStore> Store for T {}
