//! A bounded map whose entries expire: what this peer remembers about other
//! peers' data addresses (a direct address that failed, a probe's verdict).
//! Time comes in as an argument, so the rules are tested without a clock.

use std::{collections::HashMap, hash::Hash, time::Duration};

use tokio::time::Instant;

/// At most `capacity` entries, each forgotten `ttl` after it was inserted.
#[derive(Debug)]
pub(crate) struct ExpiringMap<K, V> {
    entries: HashMap<K, (V, Instant)>,
    capacity: usize,
    ttl: Duration,
}

impl<K: Hash + Eq + Clone, V> ExpiringMap<K, V> {
    pub(crate) fn new(capacity: usize, ttl: Duration) -> Self {
        Self {
            entries: HashMap::new(),
            capacity: capacity.max(1),
            ttl,
        }
    }

    /// The live value for `key` at `now`.
    pub(crate) fn get(&self, key: &K, now: Instant) -> Option<&V> {
        self.entries
            .get(key)
            .filter(|(_, at)| now.saturating_duration_since(*at) < self.ttl)
            .map(|(v, _)| v)
    }

    /// Insert (or refresh) `key` at `now`; returns whether it was absent or
    /// expired. When full, expired entries go first, then the oldest one.
    pub(crate) fn insert(&mut self, key: K, value: V, now: Instant) -> bool {
        let fresh = self.get(&key, now).is_none();
        if !self.entries.contains_key(&key) && self.entries.len() >= self.capacity {
            let ttl = self.ttl;
            self.entries
                .retain(|_, (_, at)| now.saturating_duration_since(*at) < ttl);
            if self.entries.len() >= self.capacity
                && let Some(oldest) = self
                    .entries
                    .iter()
                    .min_by_key(|(_, (_, at))| *at)
                    .map(|(k, _)| k.clone())
            {
                self.entries.remove(&oldest);
            }
        }
        self.entries.insert(key, (value, now));
        fresh
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_after_the_ttl() {
        let t0 = Instant::now();
        let mut m = ExpiringMap::new(4, Duration::from_secs(10));
        assert!(m.insert("a", 1, t0));
        assert!(!m.insert("a", 2, t0 + Duration::from_secs(1)), "still live");
        assert_eq!(m.get(&"a", t0 + Duration::from_secs(10)), Some(&2));
        assert_eq!(m.get(&"a", t0 + Duration::from_secs(11)), None);
        assert!(m.insert("a", 3, t0 + Duration::from_secs(12)), "expired");
        assert_eq!(m.get(&"a", t0 + Duration::from_secs(12)), Some(&3));
    }

    #[test]
    fn the_map_is_bounded_dropping_expired_then_oldest() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut m = ExpiringMap::new(3, s(10));
        m.insert(1, (), t0);
        m.insert(2, (), t0 + s(5));
        m.insert(3, (), t0 + s(6));
        // Full: 1 has expired by t0 + 11, so it goes.
        m.insert(4, (), t0 + s(11));
        assert_eq!(m.len(), 3);
        assert!(m.get(&1, t0 + s(11)).is_none());
        // Full, nothing expired: the oldest (2) goes.
        m.insert(5, (), t0 + s(12));
        assert_eq!(m.len(), 3);
        assert!(m.get(&2, t0 + s(12)).is_none());
        for k in [3, 4, 5] {
            assert!(m.get(&k, t0 + s(12)).is_some(), "{k}");
        }
        for k in 100..1000 {
            m.insert(k, (), t0 + s(13));
        }
        assert_eq!(m.len(), 3);
    }
}
