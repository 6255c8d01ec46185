//! The key-package directory of end-to-end encryption: the server's half
//! of MLS's "authentication service and delivery service" split that
//! concerns keys.
//!
//! Each device publishes a stock of one-time MLS key packages and one
//! last-resort package; another device claims one package of every device
//! of an account when it adds that account to a conversation. A claim
//! takes a package out durably before answering, so no package is handed
//! out twice; an empty stock hands out the last-resort package (MLS allows
//! its reuse), so a device stays reachable until it tops its stock up. The
//! packages are opaque bytes here: the claiming client checks their
//! signatures against the device keys it trusts. The rules (sizes, counts)
//! are `skylark_core::keys`; this module adds the rate limits and the
//! phone → account step. It knows nothing of the wire.

use crate::config::RateLimits;
use crate::directory::Directory;
use crate::ratelimit::{KeyedLimiter, Limited};
use bytes::Bytes;
use skylark_core::keys::{KeyStock, MAX_KEY_PACKAGES_PER_DEVICE, UploadError, check_upload};
use skylark_core::phone::PhoneError;
use skylark_core::{AccountId, DeviceId, PhoneNumber};
use skylark_store::{ClaimedKey, Store, StoreError};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(transparent)]
    Upload(#[from] UploadError),
    #[error("invalid phone number: {0}")]
    InvalidPhone(#[from] PhoneError),
    #[error("no account has that phone number")]
    UnknownAccount,
    #[error("no account has the phone number {0}; nothing was claimed")]
    UnknownNumber(PhoneNumber),
    /// A claim of several numbers that cannot be taken as it is (the words say why).
    #[error("{0}")]
    BadBatch(String),
    #[error("too many key package requests; try again in {}", skylark_core::words::wait(u64::try_from(.0.retry_after.as_millis()).unwrap_or(u64::MAX)))]
    RateLimited(Limited),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a claim hands out: one entry per active device of the account, in
/// device id order.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub account: AccountId,
    pub phone: PhoneNumber,
    pub devices: Vec<ClaimedKey>,
    /// Each claimed device's public key, in the order of `devices`.
    pub device_keys: Vec<[u8; 32]>,
}

/// The most phone numbers one claim may name. Below the default burst of
/// `key_claims_per_device` (60), which a batch is charged one cell per number.
pub const MAX_CLAIM_NUMBERS: usize = 50;

pub struct KeyDirectory {
    store: Arc<dyn Store>,
    directory: Arc<Directory>,
    /// Per claiming device: each claim empties one package of every device
    /// of the target, so this is what bounds draining someone's stock.
    claims: KeyedLimiter,
    uploads: KeyedLimiter,
}

impl std::fmt::Debug for KeyDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyDirectory").finish_non_exhaustive()
    }
}

impl KeyDirectory {
    pub fn new(store: Arc<dyn Store>, directory: Arc<Directory>, limits: &RateLimits) -> Self {
        Self {
            store,
            directory,
            claims: KeyedLimiter::new("key_claims_per_device", limits.key_claims_per_device),
            uploads: KeyedLimiter::new("key_uploads_per_device", limits.key_uploads_per_device),
        }
    }

    /// Adds `packages` to `device`'s stock (and replaces its last-resort
    /// package when one is given), all or nothing; durable when it returns.
    pub async fn upload(
        &self,
        device: DeviceId,
        packages: Vec<Bytes>,
        last_resort: Option<Bytes>,
    ) -> Result<KeyStock, KeyError> {
        self.uploads.check(&device.0.to_string()).map_err(KeyError::RateLimited)?;
        let sizes: Vec<usize> = packages.iter().map(Bytes::len).collect();
        check_upload(&sizes, last_resort.as_ref().map(Bytes::len))?;
        match self.store.put_key_packages(device, packages, last_resort, MAX_KEY_PACKAGES_PER_DEVICE).await? {
            Ok(stock) => Ok(stock),
            Err(stock) => {
                Err(UploadError::StockFull { available: stock.available, max: MAX_KEY_PACKAGES_PER_DEVICE }.into())
            }
        }
    }

    pub async fn stock(&self, device: DeviceId) -> Result<KeyStock, KeyError> {
        Ok(self.store.key_stock(device).await?)
    }

    /// One package of every active device of the account with `phone`,
    /// other than `claimer` itself (a device claims its own number to add
    /// its account's other devices).
    pub async fn claim(&self, claimer: DeviceId, phone: &str) -> Result<Claimed, KeyError> {
        self.claims.check(&claimer.0.to_string()).map_err(KeyError::RateLimited)?;
        let phone = PhoneNumber::parse(phone)?;
        let account = self.directory.account(&phone).await?.ok_or(KeyError::UnknownAccount)?;
        let mut claimed = self.take(claimer, vec![(account, phone)]).await?;
        claimed.pop().ok_or(KeyError::UnknownAccount)
    }

    /// As [`KeyDirectory::claim`] for several numbers at once (from 1 to
    /// [`MAX_CLAIM_NUMBERS`], each once), answered in the order given, with
    /// one write for all of them. Charged one claim per number. All or
    /// nothing: a number that is not valid or has no account refuses the
    /// whole claim before any package is taken. Numbers are charged before
    /// they are looked up, so the directory cannot be probed for free.
    pub async fn claim_many(&self, claimer: DeviceId, phones: &[String]) -> Result<Vec<Claimed>, KeyError> {
        if phones.is_empty() || phones.len() > MAX_CLAIM_NUMBERS {
            return Err(KeyError::BadBatch(format!(
                "a claim names from 1 to {MAX_CLAIM_NUMBERS} phone numbers, and this one named {}; split it into \
                 smaller claims",
                phones.len()
            )));
        }
        let parsed = phones.iter().map(|p| PhoneNumber::parse(p)).collect::<Result<Vec<_>, _>>()?;
        let mut seen = std::collections::HashSet::new();
        if let Some(twice) = parsed.iter().find(|p| !seen.insert(p.as_str())) {
            return Err(KeyError::BadBatch(format!(
                "a claim names each phone number once, and this one named {twice} twice; nothing was claimed"
            )));
        }
        let cells = std::num::NonZeroU32::new(u32::try_from(parsed.len()).unwrap_or(u32::MAX))
            .unwrap_or(std::num::NonZeroU32::MIN);
        match self.claims.check_n(&claimer.0.to_string(), cells) {
            Ok(()) => {}
            Err(Some(limited)) => return Err(KeyError::RateLimited(limited)),
            Err(None) => {
                return Err(KeyError::BadBatch(format!(
                    "this claim names {} numbers, more than this server's rate limit allows at once; claim them \
                     in smaller groups",
                    parsed.len()
                )));
            }
        }
        let mut accounts = Vec::with_capacity(parsed.len());
        for phone in parsed {
            match self.directory.account(&phone).await? {
                Some(account) => accounts.push((account, phone)),
                None => return Err(KeyError::UnknownNumber(phone)),
            }
        }
        self.take(claimer, accounts).await
    }

    /// Takes one package of every active device (but `claimer`) of each
    /// account, in one store call.
    async fn take(&self, claimer: DeviceId, accounts: Vec<(AccountId, PhoneNumber)>) -> Result<Vec<Claimed>, KeyError> {
        let mut per_account = Vec::with_capacity(accounts.len());
        let mut ids = Vec::new();
        for (account, phone) in accounts {
            let mut active: Vec<(DeviceId, [u8; 32])> = self
                .store
                .active_devices(account)
                .await?
                .into_iter()
                .filter(|d| d.id != claimer)
                .map(|d| (d.id, d.public_key))
                .collect();
            active.sort_unstable_by_key(|(id, _)| *id);
            ids.extend(active.iter().map(|(id, _)| *id));
            per_account.push((account, phone, active));
        }
        let mut taken = self.store.claim_key_packages(&ids).await?.into_iter();
        let mut claimed = Vec::with_capacity(per_account.len());
        for (account, phone, active) in per_account {
            let devices: Vec<ClaimedKey> = taken.by_ref().take(active.len()).collect();
            let device_keys = devices
                .iter()
                .map(|c| active.iter().find(|(id, _)| *id == c.device).map(|(_, key)| *key).unwrap_or([0; 32]))
                .collect();
            claimed.push(Claimed { account, phone, devices, device_keys });
        }
        Ok(claimed)
    }

    /// Housekeeping: drops idle rate-limit state.
    pub fn sweep(&self) {
        self.claims.forget_idle();
        self.uploads.forget_idle();
    }
}
