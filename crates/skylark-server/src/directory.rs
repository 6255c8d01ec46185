//! The identity boundary: phone numbers ⇄ account ids.
//!
//! Devices name people by phone number; everything inside the server
//! speaks account ids. [`Directory`] is the one place that turns one into
//! the other, used once at the edge of each request (the router for sends,
//! the gateway for typing, presence, groups and outgoing events).
//!
//! A number moves to another account only when its account is deleted (a
//! takeover keeps the account and its id), so answers may be cached: the
//! deleting node forgets the account at once, and in a cluster every node
//! clears its cache in housekeeping (every minute), so another node may
//! name the deleted account for that number for up to a minute (what it
//! sends there is dropped). The cache is bounded, so memory does not grow
//! with every account ever looked up.
//!
//! Policy when a lookup fails: "no such account" (`Ok(None)`) is an answer
//! the caller turns into its documented refusal; a store failure (`Err`) is
//! never papered over — the request is answered "unavailable", and an
//! outgoing event that cannot be named is not sent (the connection is
//! closed to be retried, and the unacknowledged entry comes again).

use skylark_core::{AccountId, PhoneNumber};
use skylark_store::{AccountStore, StoreError};
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, PoisonError};

/// Lookups kept by default in each direction (at most twice this many
/// entries live at once; see [`Bounded`]). A phone number and an id take
/// about 100 bytes together, so a full cache is a few tens of megabytes.
pub const DEFAULT_CAPACITY: usize = 100_000;

/// Phone ⇄ account resolution over the store, with a bounded cache.
pub struct Directory {
    store: Arc<dyn AccountStore>,
    phones: Mutex<Bounded<PhoneNumber, AccountId>>,
    accounts: Mutex<Bounded<AccountId, PhoneNumber>>,
}

impl std::fmt::Debug for Directory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Directory").finish_non_exhaustive()
    }
}

impl Directory {
    pub fn new(store: Arc<dyn AccountStore>, capacity: usize) -> Self {
        Self { store, phones: Mutex::new(Bounded::new(capacity)), accounts: Mutex::new(Bounded::new(capacity)) }
    }

    /// The account holding `phone`, if any.
    pub async fn account(&self, phone: &PhoneNumber) -> Result<Option<AccountId>, StoreError> {
        if let Some(id) = self.phones.lock().unwrap_or_else(PoisonError::into_inner).get(phone) {
            return Ok(Some(id));
        }
        let Some(account) = self.store.account_by_phone(phone).await? else {
            // Not cached: the number may be registered a moment from now.
            return Ok(None);
        };
        self.remember(account.id, phone.clone());
        Ok(Some(account.id))
    }

    /// The phone number of `account`, if it exists. Group ids have none.
    pub async fn phone(&self, account: AccountId) -> Result<Option<PhoneNumber>, StoreError> {
        if account.is_group() {
            return Ok(None);
        }
        if let Some(phone) = self.accounts.lock().unwrap_or_else(PoisonError::into_inner).get(&account) {
            return Ok(Some(phone));
        }
        let Some(record) = self.store.account(account).await? else {
            return Ok(None);
        };
        self.remember(account, record.phone.clone());
        Ok(Some(record.phone))
    }

    fn remember(&self, account: AccountId, phone: PhoneNumber) {
        self.accounts.lock().unwrap_or_else(PoisonError::into_inner).insert(account, phone.clone());
        self.phones.lock().unwrap_or_else(PoisonError::into_inner).insert(phone, account);
    }

    /// Forgets a deleted account (its number may sign up again as a new
    /// account). Other nodes of a cluster forget theirs when housekeeping
    /// clears their caches.
    pub fn forget(&self, account: AccountId, phone: &PhoneNumber) {
        self.phones.lock().unwrap_or_else(PoisonError::into_inner).remove(phone);
        self.accounts.lock().unwrap_or_else(PoisonError::into_inner).remove(&account);
    }

    /// Forgets every cached answer.
    pub fn clear(&self) {
        self.phones.lock().unwrap_or_else(PoisonError::into_inner).clear();
        self.accounts.lock().unwrap_or_else(PoisonError::into_inner).clear();
    }

    /// Entries cached now (both directions).
    pub fn cached(&self) -> usize {
        self.phones.lock().unwrap_or_else(PoisonError::into_inner).len()
            + self.accounts.lock().unwrap_or_else(PoisonError::into_inner).len()
    }
}

/// A cache of at most `2 × capacity` entries that keeps what is used.
///
/// Two generations: inserts go to `hot`; when it is full, `hot` becomes
/// `cold` (dropping the old `cold`) and a new `hot` starts. A hit in `cold`
/// moves the entry back to `hot`. So an entry survives as long as it is used
/// at least once per `capacity` inserts — an approximation of LRU with O(1)
/// work per call and no per-entry bookkeeping.
#[derive(Debug)]
pub struct Bounded<K, V> {
    capacity: usize,
    hot: HashMap<K, V>,
    cold: HashMap<K, V>,
}

impl<K: Eq + Hash + Clone, V: Clone> Bounded<K, V> {
    pub fn new(capacity: usize) -> Self {
        Self { capacity: capacity.max(1), hot: HashMap::new(), cold: HashMap::new() }
    }

    pub fn get(&mut self, key: &K) -> Option<V> {
        if let Some(v) = self.hot.get(key) {
            return Some(v.clone());
        }
        let value = self.cold.remove(key)?;
        self.insert(key.clone(), value.clone());
        Some(value)
    }

    pub fn insert(&mut self, key: K, value: V) {
        if self.hot.len() >= self.capacity && !self.hot.contains_key(&key) {
            self.cold = std::mem::take(&mut self.hot);
        }
        self.cold.remove(&key);
        self.hot.insert(key, value);
    }

    pub fn remove(&mut self, key: &K) {
        self.hot.remove(key);
        self.cold.remove(key);
    }

    pub fn clear(&mut self) {
        self.hot.clear();
        self.cold.clear();
    }

    pub fn len(&self) -> usize {
        self.hot.len() + self.cold.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_stays_bounded_and_keeps_what_is_used() {
        let mut cache = Bounded::new(3);
        for k in 0..1_000 {
            cache.insert(k, k * 2);
            // Key 0 is used all the time, so it is never dropped.
            assert_eq!(cache.get(&0), Some(0));
            assert!(cache.len() <= 6, "{} entries", cache.len());
        }
        assert_eq!(cache.get(&999), Some(1998));
        assert_eq!(cache.get(&5), None, "unused entries go");
        cache.insert(0, 7);
        assert_eq!(cache.get(&0), Some(7), "an insert replaces");
    }

    #[tokio::test]
    async fn lookups_go_both_ways_and_misses_are_not_remembered() {
        use skylark_core::NewDevice;
        let store = Arc::new(skylark_store::RedbStore::in_memory().unwrap());
        let directory = Directory::new(store.clone(), 2);
        let phone = PhoneNumber::parse("+15550700001").unwrap();
        assert_eq!(directory.account(&phone).await.unwrap(), None);
        let registered = store.register(&phone, NewDevice { public_key: [1; 32], name: "t".into() }, 1).await.unwrap();
        let id = registered.account.id;
        assert_eq!(directory.account(&phone).await.unwrap(), Some(id), "a miss was not cached");
        assert_eq!(directory.phone(id).await.unwrap(), Some(phone));
        assert_eq!(directory.phone(AccountId(999)).await.unwrap(), None);
        assert_eq!(directory.phone(AccountId::group(1)).await.unwrap(), None, "groups have no number");
        for n in 0..20 {
            let other = PhoneNumber::parse(&format!("+1555070{n:04}")).unwrap();
            directory.account(&other).await.unwrap();
            let _ = directory.phone(AccountId(1_000 + n)).await.unwrap();
        }
        assert!(directory.cached() <= 8, "bounded: {}", directory.cached());
    }
}
