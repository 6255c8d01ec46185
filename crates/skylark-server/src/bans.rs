//! Numbers the operator banned: refused at sign-up and when a device of
//! theirs connects. Kept in the store; checked from memory (every connect
//! asks), reloaded by housekeeping so that, in a cluster, a ban made on one
//! node reaches the others within a minute.

use skylark_core::Clock;
use skylark_core::PhoneNumber;
use skylark_store::{Store, StoreError};
use std::collections::HashSet;
use std::sync::{Arc, PoisonError, RwLock};

pub struct Bans {
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    banned: RwLock<HashSet<PhoneNumber>>,
}

impl std::fmt::Debug for Bans {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bans").finish_non_exhaustive()
    }
}

impl Bans {
    pub async fn load(store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> Result<Bans, StoreError> {
        let bans = Bans { store, clock, banned: RwLock::default() };
        bans.reload().await?;
        Ok(bans)
    }

    /// Reads the list again (another node may have changed it).
    pub async fn reload(&self) -> Result<(), StoreError> {
        let listed = self.store.bans().await?;
        *self.banned.write().unwrap_or_else(PoisonError::into_inner) = listed.into_iter().map(|(p, _)| p).collect();
        Ok(())
    }

    pub fn is_banned(&self, phone: &PhoneNumber) -> bool {
        self.banned.read().unwrap_or_else(PoisonError::into_inner).contains(phone)
    }

    /// Bans `phone` (durably, then here).
    pub async fn ban(&self, phone: &PhoneNumber) -> Result<(), StoreError> {
        self.store.set_ban(phone, Some(self.clock.now_ms())).await?;
        self.banned.write().unwrap_or_else(PoisonError::into_inner).insert(phone.clone());
        Ok(())
    }

    /// Lifts the ban of `phone`; true if it was banned.
    pub async fn unban(&self, phone: &PhoneNumber) -> Result<bool, StoreError> {
        self.store.set_ban(phone, None).await?;
        Ok(self.banned.write().unwrap_or_else(PoisonError::into_inner).remove(phone))
    }

    /// Every banned number, with when it was banned.
    pub async fn list(&self) -> Result<Vec<(PhoneNumber, u64)>, StoreError> {
        self.store.bans().await
    }
}
