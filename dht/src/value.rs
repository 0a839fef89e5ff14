//! Values returned by the DHT.

use std::collections::BTreeMap;

/// A value with its absolute expiration time (DHT time, seconds).
#[derive(Debug, Clone, PartialEq)]
pub struct ValueWithExpiration {
    /// The value bytes (MessagePack, validator trailers such as signatures removed).
    pub value: Vec<u8>,
    /// When the value expires, in [`dht_time`](crate::dht_time) seconds.
    pub expiration: f64,
}

/// What [`Dht::get`](crate::Dht::get) found under a key.
#[derive(Debug, Clone, PartialEq)]
pub enum DhtValue {
    /// A plain value stored without a subkey.
    Regular {
        /// The value bytes (MessagePack).
        value: Vec<u8>,
        /// When it expires (DHT time, seconds).
        expiration: f64,
    },
    /// A dictionary of per-subkey values; each subkey expires on its own. A subkey
    /// withdrawn by storing nil maps to the value `[0xc0]` until it expires.
    Dictionary(BTreeMap<Vec<u8>, ValueWithExpiration>),
}

impl DhtValue {
    /// The latest expiration in this value (for a dictionary, over its subkeys;
    /// `f64::NEG_INFINITY` for an empty one).
    pub fn expiration(&self) -> f64 {
        match self {
            Self::Regular { expiration, .. } => *expiration,
            Self::Dictionary(d) => d
                .values()
                .map(|v| v.expiration)
                .fold(f64::NEG_INFINITY, f64::max),
        }
    }

    /// The dictionary entries, or `None` for a regular value.
    pub fn as_dictionary(&self) -> Option<&BTreeMap<Vec<u8>, ValueWithExpiration>> {
        match self {
            Self::Dictionary(d) => Some(d),
            Self::Regular { .. } => None,
        }
    }

    /// The regular value bytes, or `None` for a dictionary.
    pub fn as_regular(&self) -> Option<&[u8]> {
        match self {
            Self::Regular { value, .. } => Some(value),
            Self::Dictionary(_) => None,
        }
    }
}

/// The result of [`Dht::store`](crate::Dht::store).
///
/// libp2p-kad acknowledges a put even when the remote node drops the record
/// after validation, so `replicas` counts nodes that *received* the record. A
/// record that passed this node's validators passes every honest node's
/// identical validators, but a replica that already holds a newer value keeps
/// it; read back with [`Dht::get`](crate::Dht::get) to confirm what won.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOutcome {
    /// The record passed local validation and was newer than what this node
    /// held under the same key/subkey (an older or equal expiration loses).
    pub accepted: bool,
    /// How many remote nodes acknowledged the record.
    pub replicas: usize,
}

impl StoreOutcome {
    /// Whether the record is stored somewhere others can read it: accepted
    /// locally and acknowledged by at least one replica.
    pub fn is_stored(&self) -> bool {
        self.accepted && self.replicas > 0
    }
}
