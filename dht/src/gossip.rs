//! What a reader keeps of records pushed over gossipsub ([`LatestPerOwner`],
//! bounded), the application validators a subscriber installs on a topic
//! ([`GossipValidator`]) and the per-peer rate limit on what a peer may ask this
//! node to validate and forward ([`ForwardLimiter`]).

use std::{
    collections::{BTreeMap, HashMap, btree_map},
    hash::Hash,
    sync::Arc,
    time::Instant,
};

use colony_schema::OwnerKey;

use crate::node::GossipMessage;

/// A subscriber's check of a message on its topic, run on the node before the
/// message is delivered or forwarded. `false` rejects it: it is not forwarded,
/// and the peer that propagated it loses gossipsub score (invalid deliveries),
/// so a peer that keeps pushing junk is pruned from the mesh and ignored.
pub type GossipValidator = Arc<dyn Fn(&GossipMessage) -> bool + Send + Sync>;

/// A token bucket per key (a propagating peer), with a bounded number of keys:
/// when full, keys whose bucket is full again (idle) are forgotten first, and if
/// none is, the new key is refused (the caller ignores its message).
#[derive(Debug)]
pub(crate) struct ForwardLimiter<K> {
    rate: f64,
    burst: f64,
    max_keys: usize,
    buckets: HashMap<K, (f64, Instant)>,
}

impl<K: Eq + Hash + Clone> ForwardLimiter<K> {
    pub(crate) fn new(rate: f64, burst: f64, max_keys: usize) -> Self {
        Self {
            rate,
            burst,
            max_keys,
            buckets: HashMap::new(),
        }
    }

    /// Takes one token for `key` at `now`; `false` when its bucket is empty.
    pub(crate) fn allow(&mut self, key: &K, now: Instant) -> bool {
        let (rate, burst) = (self.rate, self.burst);
        let refill = |(tokens, at): (f64, Instant)| {
            (tokens + rate * now.saturating_duration_since(at).as_secs_f64()).min(burst)
        };
        if !self.buckets.contains_key(key) && self.buckets.len() >= self.max_keys {
            self.buckets.retain(|_, b| refill(*b) < burst);
            if self.buckets.len() >= self.max_keys {
                return false;
            }
        }
        let bucket = self.buckets.entry(key.clone()).or_insert((burst, now));
        let tokens = refill(*bucket);
        if tokens >= 1.0 {
            *bucket = (tokens - 1.0, now);
            true
        } else {
            *bucket = (tokens, now);
            false
        }
    }
}

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
///
/// The map holds at most [`limit`](Self::with_limit) owners (unbounded by
/// default, for merging a fetched dictionary that is bounded already): a new
/// owner beyond it takes the place of the record that expires first, if it
/// expires later, and is refused otherwise. Identities are free, so a map fed
/// from the network must have a limit.
#[derive(Debug, Clone, PartialEq)]
pub struct LatestPerOwner<T> {
    entries: BTreeMap<OwnerKey, (T, f64)>,
    limit: usize,
}

impl<T> Default for LatestPerOwner<T> {
    fn default() -> Self {
        Self {
            entries: BTreeMap::new(),
            limit: usize::MAX,
        }
    }
}

impl<T> LatestPerOwner<T> {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty map that holds at most `limit` owners (at least one).
    pub fn with_limit(limit: usize) -> Self {
        Self {
            entries: BTreeMap::new(),
            limit: limit.max(1),
        }
    }

    /// Keeps `value` as `owner`'s record if it expires strictly later than the
    /// one held (any finite or infinite expiration beats none; NaN never wins).
    /// A new owner in a full map replaces the record that expires first, if it
    /// expires later. Returns whether it was kept.
    pub fn offer(&mut self, owner: OwnerKey, value: T, expiration: f64) -> bool {
        if self.entries.len() >= self.limit
            && !self.entries.contains_key(&owner)
            && !self.evict_earliest_before(expiration)
        {
            return false;
        }
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

    /// Drops the record that expires first, if it expires before `expiration`.
    fn evict_earliest_before(&mut self, expiration: f64) -> bool {
        let earliest = self
            .entries
            .iter()
            .min_by(|a, b| (a.1).1.total_cmp(&(b.1).1))
            .map(|(k, (_, e))| (*k, *e));
        match earliest {
            Some((owner, held)) if held < expiration => {
                self.entries.remove(&owner);
                true
            }
            _ => false,
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
    fn a_limited_map_keeps_the_records_that_expire_last() {
        let mut m = LatestPerOwner::with_limit(2);
        assert!(m.offer(owner(1), (), 10.0));
        assert!(m.offer(owner(2), (), 20.0));
        assert!(
            !m.offer(owner(3), (), 5.0),
            "expires before everything held"
        );
        assert!(m.offer(owner(3), (), 15.0), "takes the place of owner 1");
        assert!(m.get(&owner(1)).is_none());
        assert!(
            m.offer(owner(3), (), 16.0),
            "a held owner refreshes in place"
        );
        assert_eq!(m.len(), 2);
        // A flood of distinct identities never grows it.
        for i in 0..100_000u32 {
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&i.to_le_bytes());
            m.offer(OwnerKey::from_bytes(key), (), 100.0 + f64::from(i));
        }
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn the_forward_limiter_refills_and_bounds_its_keys() {
        let t0 = Instant::now();
        let mut l = ForwardLimiter::new(10.0, 3.0, 2);
        assert!((0..3).all(|_| l.allow(&1, t0)));
        assert!(!l.allow(&1, t0), "burst spent");
        assert!(l.allow(&1, t0 + std::time::Duration::from_millis(150)));
        assert!(l.allow(&2, t0));
        // A third key while both others are busy is refused; once one is idle
        // (bucket full again) it is forgotten to make room.
        assert!(!l.allow(&3, t0));
        assert!(l.allow(&3, t0 + std::time::Duration::from_secs(1)));
        assert!(l.buckets.len() <= 2);
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
