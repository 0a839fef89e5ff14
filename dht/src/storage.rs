//! Local storage of expiring values and per-subkey dictionaries, and the
//! libp2p-kad record store that serves it.
//!
//! Merge rules (the reference's `TimedStorage` / `DHTLocalStorage`, with the
//! shape rule and owner caps added so that no one can squat a key):
//! - an entry whose expiration is not later than now is rejected;
//! - a regular value replaces a regular value only with a strictly later
//!   expiration;
//! - a regular value never replaces a live dictionary, and a subkey entry
//!   always replaces a regular value (the reference compares expirations, so
//!   one unsigned regular value with a day's expiration on a key that peers
//!   fill with signed subkeys stops them all for that day). Keys used as
//!   dictionaries are thereby protected by their subkeys' owners; regular
//!   keys were never protected (anyone may store a later expiration);
//! - inside a dictionary, a subkey is replaced only by a strictly later
//!   expiration;
//! - one owner (the owner marker in the subkey; subkeys naming none share one
//!   anonymous bucket) holds at most [`OwnerCaps::subkeys`] subkeys and
//!   [`OwnerCaps::bytes`] bytes under one key: a new entry over the cap evicts
//!   that owner's earliest-expiring entries, never another owner's;
//! - expired values and subkeys are dropped lazily and never served.
//!
//! Readers merge the answers of several replicas under the same rules
//! ([`merge_values`]), so a replica serving a squatting value or one owner's
//! junk subkeys changes nothing for them either.

use std::{borrow::Cow, collections::BTreeMap, collections::HashMap};

use colony_schema::OwnerKey;

use libp2p::{
    PeerId,
    kad::{
        ProviderRecord, Record, RecordKey,
        store::{self, MemoryStore, MemoryStoreConfig, RecordStore},
    },
};
use serde_bytes::ByteBuf;

use crate::{
    record::{WireEntry, decode_wire, encode_wire},
    value::{DhtValue, ValueWithExpiration},
};

/// Per-entry bookkeeping overhead counted towards the record size limit.
const ENTRY_OVERHEAD: usize = 16;

/// Why local storage refused an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The entry has already expired.
    Expired,
    /// What is stored has a later or equal expiration.
    NotNewer,
    /// The record would exceed the size limit.
    RecordFull,
    /// The node stores the maximum number of keys.
    StoreFull,
    /// A regular value cannot replace a dictionary.
    Shape,
    /// The entry is its owner's earliest under a key where the owner is at
    /// its cap.
    OwnerFull,
}

/// How much one owner may hold under one key (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OwnerCaps {
    /// Subkeys per owner per key.
    pub(crate) subkeys: usize,
    /// Subkey and value bytes per owner per key.
    pub(crate) bytes: usize,
}

impl OwnerCaps {
    /// Large enough never to bind (tests of other rules).
    #[cfg(test)]
    pub(crate) const NONE: Self = Self {
        subkeys: usize::MAX,
        bytes: usize::MAX,
    };
}

/// The owner a subkey names (`None`: no marker, or a malformed one, which
/// the validators reject before storage sees it).
fn subkey_owner(subkey: &[u8]) -> Option<OwnerKey> {
    OwnerKey::find_in(subkey).ok().flatten()
}

/// Inserts `entry` under `subkey` into `dict` (the caller checked that it is
/// newer than what the subkey holds), then evicts the earliest-expiring
/// entries of the subkey's owner while the owner is over `caps`. Returns
/// `false` (and leaves `dict` as it was) when the new entry itself would be
/// evicted.
fn insert_capped(
    dict: &mut BTreeMap<Vec<u8>, ValueWithExpiration>,
    subkey: &[u8],
    entry: ValueWithExpiration,
    caps: OwnerCaps,
) -> bool {
    let owner = subkey_owner(subkey);
    let size = |k: &[u8], v: &ValueWithExpiration| k.len() + v.value.len();
    // The owner's entries after the insertion: (expiration, is an old entry,
    // subkey, bytes); `None` stands for the new entry.
    let mut mine: Vec<(f64, bool, Option<&Vec<u8>>, usize)> = dict
        .iter()
        .filter(|(k, _)| k.as_slice() != subkey && subkey_owner(k) == owner)
        .map(|(k, v)| (v.expiration, true, Some(k), size(k, v)))
        .collect();
    mine.push((entry.expiration, false, None, size(subkey, &entry)));
    let mut count = mine.len();
    let mut bytes: usize = mine.iter().map(|m| m.3).sum();
    if count > caps.subkeys || bytes > caps.bytes {
        // Earliest expiration first; on a tie the new entry goes first, so
        // an owner cannot churn its cap with equal expirations.
        mine.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let mut evict = Vec::new();
        for (_, _, k, sz) in mine {
            if count <= caps.subkeys && bytes <= caps.bytes {
                break;
            }
            let Some(k) = k else {
                return false;
            };
            evict.push(k.clone());
            count -= 1;
            bytes -= sz;
        }
        for k in evict {
            dict.remove(&k);
        }
    }
    dict.insert(subkey.to_vec(), entry);
    true
}

#[derive(Debug, Clone)]
enum Stored {
    Regular(ValueWithExpiration),
    Dictionary(BTreeMap<Vec<u8>, ValueWithExpiration>),
}

impl Stored {
    fn latest(&self) -> f64 {
        match self {
            Self::Regular(v) => v.expiration,
            Self::Dictionary(d) => d
                .values()
                .map(|v| v.expiration)
                .fold(f64::NEG_INFINITY, f64::max),
        }
    }

    fn prune(&mut self, now: f64) -> bool {
        match self {
            Self::Regular(v) => v.expiration > now,
            Self::Dictionary(d) => {
                d.retain(|_, v| v.expiration > now);
                !d.is_empty()
            }
        }
    }
}

/// Expiring key → value / dictionary storage with the merge rules above.
#[derive(Debug)]
pub(crate) struct LocalStorage {
    records: HashMap<Vec<u8>, Stored>,
    max_records: usize,
    max_record_size: usize,
    owner_caps: OwnerCaps,
}

impl LocalStorage {
    pub(crate) fn new(max_records: usize, max_record_size: usize, owner_caps: OwnerCaps) -> Self {
        Self {
            records: HashMap::new(),
            max_records,
            max_record_size,
            owner_caps,
        }
    }

    /// Stores one (already validated) entry. The value is kept signed, as received.
    pub(crate) fn store(
        &mut self,
        key: &[u8],
        subkey: Option<&[u8]>,
        value: &[u8],
        expiration: f64,
        now: f64,
    ) -> Result<(), Refusal> {
        if expiration.is_nan() || expiration <= now {
            return Err(Refusal::Expired);
        }
        let entry = ValueWithExpiration {
            value: value.to_vec(),
            expiration,
        };
        if self
            .records
            .get_mut(key)
            .is_some_and(|stored| !stored.prune(now))
        {
            self.records.remove(key);
        }
        let existing = self.records.get_mut(key);
        let new_size = subkey.map_or(0, <[u8]>::len) + value.len() + ENTRY_OVERHEAD;
        match (existing, subkey) {
            (Some(Stored::Dictionary(_)), None) => return Err(Refusal::Shape),
            (Some(stored @ Stored::Regular(_)), None) => {
                if stored.latest() >= expiration {
                    return Err(Refusal::NotNewer);
                }
                if new_size > self.max_record_size {
                    return Err(Refusal::RecordFull);
                }
                *stored = Stored::Regular(entry);
            }
            (Some(Stored::Dictionary(dict)), Some(subkey)) => {
                let old = dict.get(subkey);
                if old.is_some_and(|o| o.expiration >= expiration) {
                    return Err(Refusal::NotNewer);
                }
                let current: usize = dict
                    .iter()
                    .map(|(k, v)| k.len() + v.value.len() + ENTRY_OVERHEAD)
                    .sum();
                let freed = old.map_or(0, |o| subkey.len() + o.value.len() + ENTRY_OVERHEAD);
                if current - freed + new_size > self.max_record_size {
                    return Err(Refusal::RecordFull);
                }
                if !insert_capped(dict, subkey, entry, self.owner_caps) {
                    return Err(Refusal::OwnerFull);
                }
            }
            (Some(stored @ Stored::Regular(_)), Some(subkey)) => {
                if new_size > self.max_record_size {
                    return Err(Refusal::RecordFull);
                }
                let mut dict = BTreeMap::new();
                if !insert_capped(&mut dict, subkey, entry, self.owner_caps) {
                    return Err(Refusal::OwnerFull);
                }
                *stored = Stored::Dictionary(dict);
            }
            (None, subkey) => {
                if self.records.len() >= self.max_records {
                    self.prune(now);
                    if self.records.len() >= self.max_records {
                        return Err(Refusal::StoreFull);
                    }
                }
                if new_size > self.max_record_size {
                    return Err(Refusal::RecordFull);
                }
                let stored = match subkey {
                    None => Stored::Regular(entry),
                    Some(s) => {
                        let mut dict = BTreeMap::new();
                        if !insert_capped(&mut dict, s, entry, self.owner_caps) {
                            return Err(Refusal::OwnerFull);
                        }
                        Stored::Dictionary(dict)
                    }
                };
                self.records.insert(key.to_vec(), stored);
            }
        }
        Ok(())
    }

    /// The unexpired value under `key` (values still signed).
    pub(crate) fn get(&self, key: &[u8], now: f64) -> Option<DhtValue> {
        match self.records.get(key)? {
            Stored::Regular(v) if v.expiration > now => Some(DhtValue::Regular {
                value: v.value.clone(),
                expiration: v.expiration,
            }),
            Stored::Regular(_) => None,
            Stored::Dictionary(d) => {
                let live: BTreeMap<_, _> = d
                    .iter()
                    .filter(|(_, v)| v.expiration > now)
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                (!live.is_empty()).then_some(DhtValue::Dictionary(live))
            }
        }
    }

    /// Keeps only the entries for which `keep(key, subkey, value,
    /// expiration)` holds (values still signed).
    pub(crate) fn retain_entries(
        &mut self,
        mut keep: impl FnMut(&[u8], Option<&[u8]>, &[u8], f64) -> bool,
    ) {
        self.records.retain(|key, stored| match stored {
            Stored::Regular(v) => keep(key, None, &v.value, v.expiration),
            Stored::Dictionary(d) => {
                d.retain(|subkey, v| keep(key, Some(subkey), &v.value, v.expiration));
                !d.is_empty()
            }
        });
    }

    /// Drops every expired value and subkey.
    pub(crate) fn prune(&mut self, now: f64) {
        self.records.retain(|_, stored| stored.prune(now));
    }

    /// Number of keys held (expired ones included until pruned).
    pub(crate) fn len(&self) -> usize {
        self.records.len()
    }
}

/// Encodes a value as wire entries.
pub(crate) fn value_to_entries(value: &DhtValue) -> Vec<WireEntry> {
    match value {
        DhtValue::Regular { value, expiration } => vec![WireEntry {
            subkey: None,
            value: ByteBuf::from(value.clone()),
            expiration: *expiration,
        }],
        DhtValue::Dictionary(d) => d
            .iter()
            .map(|(k, v)| WireEntry {
                subkey: Some(ByteBuf::from(k.clone())),
                value: ByteBuf::from(v.value.clone()),
                expiration: v.expiration,
            })
            .collect(),
    }
}

/// Merges `incoming` into `acc` as a reader does, under storage's rules: the
/// later regular value wins; dictionaries merge per subkey with the later
/// expiration winning and each owner held to `caps`; a dictionary always wins
/// over a regular value.
pub(crate) fn merge_values(acc: &mut Option<DhtValue>, incoming: DhtValue, caps: OwnerCaps) {
    let incoming = match incoming {
        DhtValue::Dictionary(theirs) => {
            // Capped on the way in, even as the first answer.
            let mut capped = BTreeMap::new();
            for (subkey, v) in theirs {
                insert_if_newer(&mut capped, subkey, v, caps);
            }
            if capped.is_empty() {
                return;
            }
            DhtValue::Dictionary(capped)
        }
        regular => regular,
    };
    let Some(current) = acc.as_mut() else {
        *acc = Some(incoming);
        return;
    };
    match (current, incoming) {
        (DhtValue::Dictionary(mine), DhtValue::Dictionary(theirs)) => {
            for (subkey, v) in theirs {
                insert_if_newer(mine, subkey, v, caps);
            }
        }
        (DhtValue::Dictionary(_), DhtValue::Regular { .. }) => {}
        (current @ DhtValue::Regular { .. }, incoming @ DhtValue::Dictionary(_)) => {
            *current = incoming;
        }
        (current, incoming) => {
            if incoming.expiration() > current.expiration() {
                *current = incoming;
            }
        }
    }
}

fn insert_if_newer(
    dict: &mut BTreeMap<Vec<u8>, ValueWithExpiration>,
    subkey: Vec<u8>,
    v: ValueWithExpiration,
    caps: OwnerCaps,
) {
    if dict
        .get(&subkey)
        .is_some_and(|old| old.expiration >= v.expiration)
    {
        return;
    }
    insert_capped(dict, &subkey, v, caps);
}

/// The kad record store: our [`LocalStorage`] for records, a bounded
/// [`MemoryStore`] for (unused) provider records.
pub(crate) struct ColonyStore {
    pub(crate) storage: LocalStorage,
    providers: MemoryStore,
}

impl ColonyStore {
    pub(crate) fn new(local_peer: PeerId, storage: LocalStorage) -> Self {
        let config = MemoryStoreConfig {
            max_records: 0,
            max_value_bytes: 0,
            max_providers_per_key: 8,
            max_provided_keys: 64,
        };
        Self {
            storage,
            providers: MemoryStore::with_config(local_peer, config),
        }
    }
}

fn kad_record(key: &RecordKey, value: &DhtValue) -> Record {
    Record {
        key: key.clone(),
        value: encode_wire(&value_to_entries(value)),
        publisher: None,
        expires: None,
    }
}

impl RecordStore for ColonyStore {
    type RecordsIter<'a> = std::vec::IntoIter<Cow<'a, Record>>;
    type ProvidedIter<'a> = <MemoryStore as RecordStore>::ProvidedIter<'a>;

    fn get(&self, k: &RecordKey) -> Option<Cow<'_, Record>> {
        let value = self.storage.get(k.as_ref(), crate::dht_time())?;
        Some(Cow::Owned(kad_record(k, &value)))
    }

    /// Called by kad only for this node's own `put_record`, whose entries the
    /// node validated and merged already; re-merging them is a no-op.
    fn put(&mut self, r: Record) -> store::Result<()> {
        let now = crate::dht_time();
        match decode_wire(&r.value) {
            Ok(entries) => {
                for e in entries {
                    let _ = self.storage.store(
                        r.key.as_ref(),
                        e.subkey.as_deref().map(|s| s.as_slice()),
                        &e.value,
                        e.expiration,
                        now,
                    );
                }
            }
            Err(error) => tracing::warn!(%error, "ignoring a malformed local put"),
        }
        Ok(())
    }

    fn remove(&mut self, k: &RecordKey) {
        self.storage.records.remove(k.as_ref());
    }

    fn records(&self) -> Self::RecordsIter<'_> {
        let now = crate::dht_time();
        self.storage
            .records
            .keys()
            .filter_map(|k| {
                let key = RecordKey::new(k);
                self.storage
                    .get(k, now)
                    .map(|v| Cow::Owned(kad_record(&key, &v)))
            })
            .collect::<Vec<_>>()
            .into_iter()
    }

    fn add_provider(&mut self, record: ProviderRecord) -> store::Result<()> {
        self.providers.add_provider(record)
    }

    fn providers(&self, key: &RecordKey) -> Vec<ProviderRecord> {
        self.providers.providers(key)
    }

    fn provided(&self) -> Self::ProvidedIter<'_> {
        self.providers.provided()
    }

    fn remove_provider(&mut self, k: &RecordKey, p: &PeerId) {
        self.providers.remove_provider(k, p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storage() -> LocalStorage {
        LocalStorage::new(100, 1 << 20, OwnerCaps::NONE)
    }

    fn owner(i: u8) -> Vec<u8> {
        crate::owner_key_from_secret([i; 32]).marker()
    }

    #[test]
    fn regular_newer_expiration_wins_and_equal_loses() {
        let mut s = storage();
        s.store(b"k", None, b"a", 20.0, 10.0).unwrap();
        assert_eq!(
            s.store(b"k", None, b"b", 20.0, 10.0),
            Err(Refusal::NotNewer)
        );
        assert_eq!(
            s.store(b"k", None, b"b", 15.0, 10.0),
            Err(Refusal::NotNewer)
        );
        s.store(b"k", None, b"c", 21.0, 10.0).unwrap();
        assert_eq!(
            s.get(b"k", 10.0),
            Some(DhtValue::Regular {
                value: b"c".to_vec(),
                expiration: 21.0
            })
        );
        assert_eq!(
            s.store(b"x", None, b"old", 9.0, 10.0),
            Err(Refusal::Expired)
        );
        assert_eq!(
            s.store(b"x", None, b"nan", f64::NAN, 10.0),
            Err(Refusal::Expired)
        );
    }

    #[test]
    fn subkeys_merge_and_expire_independently() {
        let mut s = storage();
        s.store(b"k", Some(b"a"), b"1", 20.0, 10.0).unwrap();
        s.store(b"k", Some(b"b"), b"2", 30.0, 10.0).unwrap();
        assert_eq!(
            s.store(b"k", Some(b"a"), b"x", 19.0, 10.0),
            Err(Refusal::NotNewer)
        );
        let d = s.get(b"k", 10.0).unwrap();
        assert_eq!(d.as_dictionary().unwrap().len(), 2);
        // At t=25 subkey a is gone, b stays.
        let d = s.get(b"k", 25.0).unwrap();
        assert_eq!(
            d.as_dictionary().unwrap().keys().collect::<Vec<_>>(),
            vec![&b"b".to_vec()]
        );
        // A regular value never replaces a dictionary, whatever its expiration.
        assert_eq!(s.store(b"k", None, b"r", 29.0, 10.0), Err(Refusal::Shape));
        assert_eq!(s.store(b"k", None, b"r", 1e9, 10.0), Err(Refusal::Shape));
        assert!(s.get(b"k", 10.0).unwrap().as_dictionary().is_some());
        // A subkey entry replaces a regular value, whatever their expirations.
        s.store(b"r", None, b"squat", 1e9, 10.0).unwrap();
        s.store(b"r", Some(b"c"), b"3", 30.0, 10.0).unwrap();
        assert_eq!(s.get(b"r", 10.0).unwrap().as_dictionary().unwrap().len(), 1);
        s.prune(35.0);
        assert_eq!(s.get(b"k", 40.0), None);
        s.prune(40.0);
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn limits() {
        let mut s = LocalStorage::new(2, 100, OwnerCaps::NONE);
        s.store(b"a", None, b"1", 20.0, 10.0).unwrap();
        s.store(b"b", None, b"1", 20.0, 10.0).unwrap();
        assert_eq!(
            s.store(b"c", None, b"1", 20.0, 10.0),
            Err(Refusal::StoreFull)
        );
        // Expired keys make room.
        s.store(b"c", None, b"1", 40.0, 30.0).unwrap();
        assert_eq!(
            s.store(b"c", Some(b"big"), &[0u8; 200], 50.0, 30.0),
            Err(Refusal::RecordFull)
        );
        for i in 0..3u8 {
            s.store(b"d", Some(&[i]), &[0u8; 20], 50.0, 30.0).ok();
        }
        assert_eq!(
            s.store(b"d", Some(b"z"), &[0u8; 40], 50.0, 30.0),
            Err(Refusal::RecordFull)
        );
    }

    #[test]
    fn reader_merge() {
        let dict = |items: &[(&[u8], f64)]| {
            DhtValue::Dictionary(
                items
                    .iter()
                    .map(|(k, e)| {
                        (
                            k.to_vec(),
                            ValueWithExpiration {
                                value: k.to_vec(),
                                expiration: *e,
                            },
                        )
                    })
                    .collect(),
            )
        };
        let mut acc = None;
        merge_values(&mut acc, dict(&[(b"a", 5.0), (b"b", 6.0)]), OwnerCaps::NONE);
        merge_values(&mut acc, dict(&[(b"a", 7.0), (b"c", 1.0)]), OwnerCaps::NONE);
        let d = acc.clone().unwrap();
        let d = d.as_dictionary().unwrap();
        assert_eq!(d.len(), 3);
        assert_eq!(d[&b"a".to_vec()].expiration, 7.0);
        // A replica's regular value, later or not, never replaces what the
        // others answered as a dictionary.
        for expiration in [6.5, 1e9] {
            merge_values(
                &mut acc,
                DhtValue::Regular {
                    value: vec![1],
                    expiration,
                },
                OwnerCaps::NONE,
            );
            assert!(acc.as_ref().unwrap().as_dictionary().is_some());
        }
        // And a dictionary replaces a regular value that came first.
        let mut acc = Some(DhtValue::Regular {
            value: vec![1],
            expiration: 1e9,
        });
        merge_values(&mut acc, dict(&[(b"a", 5.0)]), OwnerCaps::NONE);
        assert_eq!(acc.unwrap().as_dictionary().unwrap().len(), 1);
    }

    #[test]
    fn ten_thousand_junk_subkeys_from_one_owner_keep_their_cap() {
        let caps = OwnerCaps {
            subkeys: 8,
            bytes: 4096,
        };
        let mut s = LocalStorage::new(100, 1 << 20, caps);
        let (liar, honest) = (owner(1), owner(2));
        s.store(b"k", Some(&honest), b"mine", 500.0, 10.0).unwrap();
        let mut refused = 0;
        for i in 0..10_000u32 {
            let mut subkey = liar.clone();
            subkey.extend_from_slice(&i.to_le_bytes());
            if s.store(b"k", Some(&subkey), b"junk", 20.0 + f64::from(i), 10.0)
                .is_err()
            {
                refused += 1;
            }
        }
        assert_eq!(refused, 0, "a later entry evicts the owner's earliest");
        let d = s.get(b"k", 10.0).unwrap();
        let d = d.as_dictionary().unwrap();
        assert_eq!(d.len(), 9, "8 of the liar's, the honest one");
        assert!(d.contains_key(&honest));
        // The liar's latest 8 survive; an earlier one is refused outright.
        let mut early = liar.clone();
        early.extend_from_slice(b"early");
        assert_eq!(
            s.store(b"k", Some(&early), b"junk", 15.0, 10.0),
            Err(Refusal::OwnerFull)
        );
        // The byte cap binds too: one 5000-byte value is over 4096.
        assert_eq!(
            s.store(b"k2", Some(&liar), &[0; 5000], 20.0, 10.0),
            Err(Refusal::OwnerFull)
        );
        // Subkeys naming no owner share one bucket.
        for i in 0..100u8 {
            s.store(b"k3", Some(&[i]), b"x", 20.0 + f64::from(i), 10.0)
                .unwrap();
        }
        assert_eq!(
            s.get(b"k3", 10.0).unwrap().as_dictionary().unwrap().len(),
            8
        );

        // A reader merging a replica's answer holds it to the same caps.
        let junk: BTreeMap<Vec<u8>, ValueWithExpiration> = (0..10_000u32)
            .map(|i| {
                let mut subkey = liar.clone();
                subkey.extend_from_slice(&i.to_le_bytes());
                (
                    subkey,
                    ValueWithExpiration {
                        value: b"junk".to_vec(),
                        expiration: 20.0 + f64::from(i),
                    },
                )
            })
            .collect();
        let mut acc = s.get(b"k", 10.0).map(|v| {
            let DhtValue::Dictionary(d) = v else {
                unreachable!()
            };
            DhtValue::Dictionary(d.into_iter().filter(|(k, _)| *k == honest).collect())
        });
        merge_values(&mut acc, DhtValue::Dictionary(junk), caps);
        let d = acc.unwrap();
        let d = d.as_dictionary().unwrap();
        assert_eq!(d.len(), 9);
        assert!(d.contains_key(&honest));
    }
}
