//! The embedded backend: one redb database file.
//!
//! redb is synchronous, so every operation runs on tokio's blocking pool.
//! Every write transaction commits with `Durability::Immediate` (fsync)
//! before the call returns. Records are JSON: small, rare writes on this
//! path, and readable with any redb tool when debugging.

use crate::{AccountStore, MetaStore, Registration, StoreError, VerificationStore};
use async_trait::async_trait;
use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::Serialize;
use serde::de::DeserializeOwned;
use skylark_core::verification::VerificationSession;
use skylark_core::{Account, AccountId, Device, DeviceId, NewDevice, PhoneNumber};
use std::path::Path;
use std::sync::Arc;

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const ACCOUNTS: TableDefinition<u64, &[u8]> = TableDefinition::new("accounts");
const PHONES: TableDefinition<&str, u64> = TableDefinition::new("phones");
const DEVICES: TableDefinition<u64, &[u8]> = TableDefinition::new("devices");
/// (account id, device id) of every active device, for listing an account's devices.
const ACCOUNT_DEVICES: TableDefinition<(u64, u64), ()> = TableDefinition::new("account_devices");
const VERIFICATIONS: TableDefinition<&str, &[u8]> = TableDefinition::new("verifications");

const NEXT_ACCOUNT_ID: &str = "next_account_id";
const NEXT_DEVICE_ID: &str = "next_device_id";
const SERVER_ID: &str = "server_id";

#[derive(Clone)]
pub struct RedbStore {
    db: Arc<Database>,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore").finish_non_exhaustive()
    }
}

fn backend<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Corrupt(e.to_string()))
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(e.to_string()))
}

impl RedbStore {
    /// Opens (or creates) the database file at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        Self::init(Database::create(path).map_err(backend)?)
    }

    /// A store that lives in memory only, for tests.
    pub fn in_memory() -> Result<Self, StoreError> {
        let db = Database::builder().create_with_backend(redb::backends::InMemoryBackend::new()).map_err(backend)?;
        Self::init(db)
    }

    /// Creates every table up front so read transactions never meet a missing one.
    fn init(db: Database) -> Result<Self, StoreError> {
        let txn = db.begin_write().map_err(backend)?;
        txn.open_table(META).map_err(backend)?;
        txn.open_table(ACCOUNTS).map_err(backend)?;
        txn.open_table(PHONES).map_err(backend)?;
        txn.open_table(DEVICES).map_err(backend)?;
        txn.open_table(ACCOUNT_DEVICES).map_err(backend)?;
        txn.open_table(VERIFICATIONS).map_err(backend)?;
        txn.commit().map_err(backend)?;
        Ok(Self { db: Arc::new(db) })
    }

    /// Runs blocking database work off the async runtime.
    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db)).await.map_err(backend)?
    }

    /// Runs `f` in a write transaction and commits it durably.
    async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&redb::WriteTransaction) -> Result<T, StoreError> + Send + 'static,
    {
        self.blocking(move |db| {
            let mut txn = db.begin_write().map_err(backend)?;
            txn.set_durability(Durability::Immediate);
            let out = f(&txn)?;
            txn.commit().map_err(backend)?;
            Ok(out)
        })
        .await
    }
}

fn next_id(txn: &redb::WriteTransaction, key: &str) -> Result<u64, StoreError> {
    let mut meta = txn.open_table(META).map_err(backend)?;
    let current = match meta.get(key).map_err(backend)? {
        Some(v) => {
            let bytes: [u8; 8] = v.value().try_into().map_err(|_| StoreError::Corrupt(format!("meta {key}")))?;
            u64::from_be_bytes(bytes)
        }
        None => 1,
    };
    meta.insert(key, &(current + 1).to_be_bytes()[..]).map_err(backend)?;
    Ok(current)
}

#[async_trait]
impl AccountStore for RedbStore {
    async fn account_by_phone(&self, phone: &PhoneNumber) -> Result<Option<Account>, StoreError> {
        let phone = phone.as_str().to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let Some(id) = txn.open_table(PHONES).map_err(backend)?.get(phone.as_str()).map_err(backend)? else {
                return Ok(None);
            };
            let accounts = txn.open_table(ACCOUNTS).map_err(backend)?;
            let record = accounts.get(id.value()).map_err(backend)?;
            record.map(|r| decode(r.value())).transpose()
        })
        .await
    }

    async fn account(&self, id: AccountId) -> Result<Option<Account>, StoreError> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let accounts = txn.open_table(ACCOUNTS).map_err(backend)?;
            let record = accounts.get(id.0).map_err(backend)?;
            record.map(|r| decode(r.value())).transpose()
        })
        .await
    }

    async fn device(&self, id: DeviceId) -> Result<Option<Device>, StoreError> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let devices = txn.open_table(DEVICES).map_err(backend)?;
            let record = devices.get(id.0).map_err(backend)?;
            record.map(|r| decode(r.value())).transpose()
        })
        .await
    }

    async fn active_devices(&self, account: AccountId) -> Result<Vec<Device>, StoreError> {
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let index = txn.open_table(ACCOUNT_DEVICES).map_err(backend)?;
            let devices = txn.open_table(DEVICES).map_err(backend)?;
            let mut out = Vec::new();
            for entry in index.range((account.0, 0)..=(account.0, u64::MAX)).map_err(backend)? {
                let (key, _) = entry.map_err(backend)?;
                let (_, device_id) = key.value();
                let record = devices
                    .get(device_id)
                    .map_err(backend)?
                    .ok_or_else(|| StoreError::Corrupt(format!("index names missing device {device_id}")))?;
                out.push(decode(record.value())?);
            }
            Ok(out)
        })
        .await
    }

    async fn register(&self, phone: &PhoneNumber, device: NewDevice, now_ms: u64) -> Result<Registration, StoreError> {
        let phone = phone.clone();
        self.write(move |txn| {
            let existing =
                txn.open_table(PHONES).map_err(backend)?.get(phone.as_str()).map_err(backend)?.map(|v| v.value());
            let (account, created) = match existing {
                Some(id) => {
                    let accounts = txn.open_table(ACCOUNTS).map_err(backend)?;
                    let record = accounts
                        .get(id)
                        .map_err(backend)?
                        .ok_or_else(|| StoreError::Corrupt(format!("phone names missing account {id}")))?;
                    (decode::<Account>(record.value())?, false)
                }
                None => {
                    let account = Account {
                        id: AccountId(next_id(txn, NEXT_ACCOUNT_ID)?),
                        phone: phone.clone(),
                        created_at_ms: now_ms,
                    };
                    txn.open_table(ACCOUNTS)
                        .map_err(backend)?
                        .insert(account.id.0, encode(&account)?.as_slice())
                        .map_err(backend)?;
                    txn.open_table(PHONES).map_err(backend)?.insert(phone.as_str(), account.id.0).map_err(backend)?;
                    (account, true)
                }
            };

            let mut index = txn.open_table(ACCOUNT_DEVICES).map_err(backend)?;
            let mut devices = txn.open_table(DEVICES).map_err(backend)?;
            let mut removed_devices = Vec::new();
            let old: Vec<u64> = index
                .range((account.id.0, 0)..=(account.id.0, u64::MAX))
                .map_err(backend)?
                .map(|e| e.map(|(k, _)| k.value().1).map_err(backend))
                .collect::<Result<_, _>>()?;
            for device_id in old {
                index.remove((account.id.0, device_id)).map_err(backend)?;
                let mut record: Device = {
                    let raw = devices.get(device_id).map_err(backend)?;
                    let raw =
                        raw.ok_or_else(|| StoreError::Corrupt(format!("index names missing device {device_id}")))?;
                    decode(raw.value())?
                };
                record.removed_at_ms = Some(now_ms);
                devices.insert(device_id, encode(&record)?.as_slice()).map_err(backend)?;
                removed_devices.push(DeviceId(device_id));
            }

            let new_device = Device {
                id: DeviceId(next_id(txn, NEXT_DEVICE_ID)?),
                account_id: account.id,
                public_key: device.public_key,
                name: device.name,
                created_at_ms: now_ms,
                removed_at_ms: None,
            };
            devices.insert(new_device.id.0, encode(&new_device)?.as_slice()).map_err(backend)?;
            index.insert((account.id.0, new_device.id.0), ()).map_err(backend)?;
            Ok(Registration { account, device: new_device, created, removed_devices })
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
            txn.open_table(VERIFICATIONS).map_err(backend)?.insert(id.as_str(), bytes.as_slice()).map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn verification(&self, id: &str) -> Result<Option<VerificationSession>, StoreError> {
        let id = id.to_owned();
        self.blocking(move |db| {
            let txn = db.begin_read().map_err(backend)?;
            let table = txn.open_table(VERIFICATIONS).map_err(backend)?;
            let record = table.get(id.as_str()).map_err(backend)?;
            record.map(|r| decode(r.value())).transpose()
        })
        .await
    }

    async fn delete_verification(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_owned();
        self.write(move |txn| {
            txn.open_table(VERIFICATIONS).map_err(backend)?.remove(id.as_str()).map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn purge_verifications(&self, created_before_ms: u64) -> Result<usize, StoreError> {
        self.write(move |txn| {
            let mut table = txn.open_table(VERIFICATIONS).map_err(backend)?;
            if table.is_empty().map_err(backend)? {
                return Ok(0);
            }
            let mut stale = Vec::new();
            for entry in table.iter().map_err(backend)? {
                let (key, value) = entry.map_err(backend)?;
                let session: VerificationSession = decode(value.value())?;
                if session.created_at_ms < created_before_ms {
                    stale.push(key.value().to_owned());
                }
            }
            for key in &stale {
                table.remove(key.as_str()).map_err(backend)?;
            }
            Ok(stale.len())
        })
        .await
    }
}

#[async_trait]
impl MetaStore for RedbStore {
    async fn server_id(&self, candidate: [u8; 16]) -> Result<[u8; 16], StoreError> {
        self.write(move |txn| {
            let mut meta = txn.open_table(META).map_err(backend)?;
            if let Some(v) = meta.get(SERVER_ID).map_err(backend)? {
                return v.value().try_into().map_err(|_| StoreError::Corrupt("server id".into()));
            }
            meta.insert(SERVER_ID, &candidate[..]).map_err(backend)?;
            Ok(candidate)
        })
        .await
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
