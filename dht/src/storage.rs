//! Local storage of expiring values and per-subkey dictionaries, and the
//! libp2p-kad record store that serves it.
//!
//! Merge rules (the reference's `TimedStorage` / `DHTLocalStorage`):
//! - an entry whose expiration is not later than now is rejected;
//! - a regular value replaces what is stored only with a strictly later
//!   expiration (for a dictionary: later than its latest subkey);
//! - a subkey value over a regular value replaces it only with a strictly later
//!   expiration; inside a dictionary, a subkey is replaced only by a strictly
//!   later expiration;
//! - expired values and subkeys are dropped lazily and never served.

use std::{borrow::Cow, collections::BTreeMap, collections::HashMap};

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
}

impl LocalStorage {
    pub(crate) fn new(max_records: usize, max_record_size: usize) -> Self {
        Self {
            records: HashMap::new(),
            max_records,
            max_record_size,
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
            (Some(stored), None) => {
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
                dict.insert(subkey.to_vec(), entry);
            }
            (Some(stored @ Stored::Regular(_)), Some(subkey)) => {
                if stored.latest() >= expiration {
                    return Err(Refusal::NotNewer);
                }
                if new_size > self.max_record_size {
                    return Err(Refusal::RecordFull);
                }
                *stored = Stored::Dictionary(BTreeMap::from([(subkey.to_vec(), entry)]));
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
                    Some(s) => Stored::Dictionary(BTreeMap::from([(s.to_vec(), entry)])),
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

/// Merges `incoming` into `acc` as a reader does: the later regular value wins;
/// dictionaries merge per subkey with the later expiration winning; a regular
/// value and a dictionary compare the regular expiration with the dictionary's
/// latest one.
pub(crate) fn merge_values(acc: &mut Option<DhtValue>, incoming: DhtValue) {
    let Some(current) = acc.as_mut() else {
        *acc = Some(incoming);
        return;
    };
    match (current, incoming) {
        (DhtValue::Dictionary(mine), DhtValue::Dictionary(theirs)) => {
            for (subkey, v) in theirs {
                match mine.get(&subkey) {
                    Some(old) if old.expiration >= v.expiration => {}
                    _ => {
                        mine.insert(subkey, v);
                    }
                }
            }
        }
        (current, incoming) => {
            if incoming.expiration() > current.expiration() {
                *current = incoming;
            }
        }
    }
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
        LocalStorage::new(100, 1 << 20)
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
        // A regular value must beat the dictionary's latest expiration.
        assert_eq!(
            s.store(b"k", None, b"r", 29.0, 10.0),
            Err(Refusal::NotNewer)
        );
        s.store(b"k", None, b"r", 31.0, 10.0).unwrap();
        assert!(s.get(b"k", 10.0).unwrap().as_regular().is_some());
        // And a subkey over a newer regular value loses.
        assert_eq!(
            s.store(b"k", Some(b"c"), b"3", 30.0, 10.0),
            Err(Refusal::NotNewer)
        );
        assert_eq!(s.get(b"k", 40.0), None);
        s.prune(40.0);
        assert_eq!(s.len(), 0);
    }

    #[test]
    fn limits() {
        let mut s = LocalStorage::new(2, 100);
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
        merge_values(&mut acc, dict(&[(b"a", 5.0), (b"b", 6.0)]));
        merge_values(&mut acc, dict(&[(b"a", 7.0), (b"c", 1.0)]));
        let d = acc.clone().unwrap();
        let d = d.as_dictionary().unwrap();
        assert_eq!(d.len(), 3);
        assert_eq!(d[&b"a".to_vec()].expiration, 7.0);
        merge_values(
            &mut acc,
            DhtValue::Regular {
                value: vec![1],
                expiration: 6.5,
            },
        );
        assert!(acc.as_ref().unwrap().as_dictionary().is_some());
        merge_values(
            &mut acc,
            DhtValue::Regular {
                value: vec![1],
                expiration: 8.0,
            },
        );
        assert!(acc.as_ref().unwrap().as_regular().is_some());
    }
}
