//! A map for the handful of entries an account has per device or per
//! connection, kept in a vector sized exactly to its contents.
//!
//! A `HashMap` with one entry reserves room for several (about 200 bytes
//! for the actor's per-device state); these maps exist once per live
//! account, so the difference is paid per connection. Lookups are linear,
//! which for one to a few entries is as fast as hashing.

#[derive(Debug)]
pub(crate) struct SmallMap<K, V>(Vec<(K, V)>);

impl<K, V> Default for SmallMap<K, V> {
    fn default() -> Self {
        SmallMap(Vec::new())
    }
}

impl<K: PartialEq, V> SmallMap<K, V> {
    pub(crate) fn get(&self, key: &K) -> Option<&V> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    pub(crate) fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        self.0.iter_mut().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Inserts or replaces; returns the value replaced.
    pub(crate) fn insert(&mut self, key: K, value: V) -> Option<V> {
        if let Some(slot) = self.get_mut(&key) {
            return Some(std::mem::replace(slot, value));
        }
        self.0.reserve_exact(1);
        self.0.push((key, value));
        None
    }

    pub(crate) fn remove(&mut self, key: &K) -> Option<V> {
        let at = self.0.iter().position(|(k, _)| k == key)?;
        let (_, value) = self.0.swap_remove(at);
        if self.0.is_empty() {
            self.0 = Vec::new();
        }
        Some(value)
    }

    /// The value for `key`, inserted as the default first if absent.
    pub(crate) fn entry_or_default(&mut self, key: K) -> &mut V
    where
        V: Default,
    {
        let at = match self.0.iter().position(|(k, _)| *k == key) {
            Some(at) => at,
            None => {
                self.0.reserve_exact(1);
                self.0.push((key, V::default()));
                self.0.len() - 1
            }
        };
        &mut self.0[at].1
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub(crate) fn keys(&self) -> impl Iterator<Item = &K> {
        self.0.iter().map(|(k, _)| k)
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.0.iter().map(|(k, v)| (k, v))
    }
}

#[cfg(test)]
mod tests {
    use super::SmallMap;

    #[test]
    fn behaves_as_a_map() {
        let mut m = SmallMap::default();
        assert!(m.is_empty());
        assert_eq!(m.insert(1, "a"), None);
        assert_eq!(m.insert(2, "b"), None);
        assert_eq!(m.insert(1, "c"), Some("a"));
        assert_eq!(m.get(&1), Some(&"c"));
        assert_eq!(m.get(&3), None);
        *m.get_mut(&2).unwrap() = "d";
        let mut keys: Vec<_> = m.keys().copied().collect();
        keys.sort();
        assert_eq!(keys, [1, 2]);
        assert_eq!(m.remove(&1), Some("c"));
        assert_eq!(m.remove(&1), None);
        assert_eq!(m.iter().collect::<Vec<_>>(), [(&2, &"d")]);
        assert_eq!(m.remove(&2), Some("d"));
        assert!(m.is_empty());
    }

    #[test]
    fn holds_exactly_what_it_contains() {
        let mut m: SmallMap<u64, u64> = SmallMap::default();
        *m.entry_or_default(7) += 5;
        *m.entry_or_default(7) += 1;
        assert_eq!(m.get(&7), Some(&6));
        assert_eq!(m.0.capacity(), 1);
        m.insert(8, 0);
        assert_eq!(m.0.capacity(), 2);
        m.remove(&7);
        m.remove(&8);
        assert_eq!(m.0.capacity(), 0);
    }
}
