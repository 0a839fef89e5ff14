//! [`LatestPerOwner`]: what a reader keeps of records pushed over gossipsub.

use std::collections::{BTreeMap, btree_map};

use colony_schema::OwnerKey;

/// The latest record per owner, merged with the DHT's own rule: a record
/// replaces the one held for its owner only if it expires strictly later
/// (a store whose expiration is not later than the stored one loses), and
/// expired records are dropped by [`prune`](Self::prune).
///
/// Meant for records pushed over gossipsub next to a signed DHT dictionary:
/// the caller checks that the message's source owns the record
/// ([`GossipMessage::is_from_owner`](crate::GossipMessage::is_from_owner))
/// before offering it here, and merges the DHT's entries with the same rule
/// when it reads.
///
/// # Examples
///
/// ```
/// use colony_dht::{LatestPerOwner, owner_key_from_secret};
///
/// let owner = owner_key_from_secret([1; 32]);
/// let mut latest = LatestPerOwner::new();
/// assert!(latest.offer(owner, "step 3", 100.0));
/// assert!(!latest.offer(owner, "stale", 100.0)); // not later: loses
/// assert!(latest.offer(owner, "step 4", 130.0));
/// latest.prune(120.0);
/// assert_eq!(latest.get(&owner), Some((&"step 4", 130.0)));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct LatestPerOwner<T> {
    entries: BTreeMap<OwnerKey, (T, f64)>,
}

impl<T> Default for LatestPerOwner<T> {
    fn default() -> Self {
        Self {
            entries: BTreeMap::new(),
        }
    }
}

impl<T> LatestPerOwner<T> {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// Keeps `value` as `owner`'s record if it expires strictly later than the
    /// one held (any finite or infinite expiration beats none; NaN never wins).
    /// Returns whether it was kept.
    pub fn offer(&mut self, owner: OwnerKey, value: T, expiration: f64) -> bool {
        match self.entries.entry(owner) {
            btree_map::Entry::Occupied(mut held) => {
                if expiration > held.get().1 {
                    held.insert((value, expiration));
                    true
                } else {
                    false
                }
            }
            btree_map::Entry::Vacant(slot) => {
                if expiration > f64::NEG_INFINITY {
                    slot.insert((value, expiration));
                    true
                } else {
                    false
                }
            }
        }
    }

    /// Drops every record that expired at or before `now` (DHT time, seconds).
    pub fn prune(&mut self, now: f64) {
        self.entries.retain(|_, (_, expiration)| *expiration > now);
    }

    /// `owner`'s record and its expiration.
    pub fn get(&self, owner: &OwnerKey) -> Option<(&T, f64)> {
        self.entries.get(owner).map(|(v, e)| (v, *e))
    }

    /// How many owners have a record.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no owner has a record.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every owner's record and expiration, in owner order.
    pub fn iter(&self) -> impl Iterator<Item = (&OwnerKey, &T, f64)> {
        self.entries.iter().map(|(k, (v, e))| (k, v, *e))
    }
}

impl<T> IntoIterator for LatestPerOwner<T> {
    type Item = (OwnerKey, T, f64);
    type IntoIter = std::iter::Map<
        btree_map::IntoIter<OwnerKey, (T, f64)>,
        fn((OwnerKey, (T, f64))) -> (OwnerKey, T, f64),
    >;

    fn into_iter(self) -> Self::IntoIter {
        self.entries.into_iter().map(|(k, (v, e))| (k, v, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(b: u8) -> OwnerKey {
        OwnerKey::from_bytes([b; 32])
    }

    #[test]
    fn the_later_expiration_wins_per_owner() {
        let mut m = LatestPerOwner::new();
        assert!(m.is_empty());
        assert!(m.offer(owner(1), 'a', 10.0));
        assert!(m.offer(owner(2), 'x', 5.0));
        assert!(!m.offer(owner(1), 'b', 10.0), "a tie keeps the held record");
        assert!(!m.offer(owner(1), 'c', 9.0), "an older record loses");
        assert!(m.offer(owner(1), 'd', 11.0));
        assert!(!m.offer(owner(3), 'n', f64::NAN), "NaN never wins");
        assert!(!m.offer(owner(1), 'n', f64::NAN));
        assert_eq!(m.get(&owner(1)), Some((&'d', 11.0)));
        assert_eq!(m.len(), 2);
        let all: Vec<_> = m.clone().into_iter().collect();
        assert_eq!(all, vec![(owner(1), 'd', 11.0), (owner(2), 'x', 5.0)]);
        assert_eq!(m.iter().count(), 2);
    }

    #[test]
    fn prune_drops_records_expired_at_or_before_now() {
        let mut m = LatestPerOwner::new();
        m.offer(owner(1), (), 10.0);
        m.offer(owner(2), (), 20.0);
        m.prune(10.0);
        assert!(m.get(&owner(1)).is_none());
        assert!(m.get(&owner(2)).is_some());
        // A pruned owner can come back with any later record.
        assert!(m.offer(owner(1), (), 15.0));
    }
}
