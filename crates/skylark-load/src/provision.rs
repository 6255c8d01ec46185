//! Test accounts with deterministic keys.
//!
//! Account `i` has the phone number `+1999` followed by `i` in 8 digits
//! and a device key derived from the manifest's seed, so any process that
//! reads the manifest can act as any account.

use anyhow::{Context, Result};
use ed25519_dalek::SigningKey;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use skylark_client::Identity;
use skylark_core::{NewDevice, PhoneNumber};
use skylark_store::{AccountStore, RedbStore};
use std::path::Path;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ManifestAccount {
    pub account_id: u64,
    pub device_id: u64,
    pub phone: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub seed: String,
    pub accounts: Vec<ManifestAccount>,
}

pub fn phone(index: usize) -> String {
    format!("+1999{index:08}")
}

/// The device key of account `index`.
pub fn key(seed: &str, index: usize) -> SigningKey {
    let digest =
        Sha256::new().chain_update(b"skylark-load\0").chain_update(seed).chain_update(index.to_be_bytes()).finalize();
    SigningKey::from_bytes(&digest.into())
}

impl Manifest {
    pub fn load(path: &Path) -> Result<Manifest> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// The SDK identity of account `index`, for a server at `http_base`.
    pub fn identity(&self, index: usize, http_base: &str) -> Identity {
        let a = &self.accounts[index];
        Identity::new(http_base.to_owned(), a.account_id, a.device_id, a.phone.clone(), &key(&self.seed, index))
    }
}

/// Registers `count` accounts in the store at `db`. The server must not be
/// running on it (the store's file lock refuses a second opener).
pub async fn provision(db: &Path, count: usize, seed: &str) -> Result<Manifest> {
    let store =
        RedbStore::open(db).with_context(|| format!("opening {} (is the server still running?)", db.display()))?;
    let mut accounts = Vec::with_capacity(count);
    for index in 0..count {
        let phone = PhoneNumber::parse(&phone(index))?;
        let device = NewDevice { public_key: key(seed, index).verifying_key().to_bytes(), name: "load".into() };
        let reg = store.register(&phone, device, 0).await?;
        accounts.push(ManifestAccount {
            account_id: reg.account.id.0,
            device_id: reg.device.id.0,
            phone: reg.account.phone.to_string(),
        });
    }
    Ok(Manifest { seed: seed.to_owned(), accounts })
}
