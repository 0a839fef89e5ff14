//! What the averager accepts under its DHT keys: the matchmaking keys
//! (`{prefix}.0b…`, see [`group_keys`](crate::group_keys)) and the donors'
//! key (`{prefix}.all_averagers`).
//!
//! Each is a dictionary with one entry per peer, under that peer's owner
//! subkey (so only it can write it, by signature); a value is nil (a
//! withdrawal) or `(peer id, …)` naming the owner's own peer id (a
//! matchmaking declaration is `(peer id, client mode)`, a donor's
//! `(peer id, priority, state root)`), so no one
//! can declare a group slot or a state on someone else's behalf (which
//! would send every joiner's requests to a third party). Regular values,
//! subkeys naming no owner and expirations further away than the key's kind
//! allows are refused. Installed on the averager's node, the rule applies
//! to what it stores for others and to every entry it reads from replicas.

use std::any::Any;

use colony_dht::{
    DhtRecord, OwnerKey, RecordValidator, ValidationError, dht_time, peer_id_of_owner,
};

/// Latest expiration of a matchmaking declaration, from now (seconds): a
/// declaration lives `min_matchmaking_time` (5 s by default, at most this).
pub const MATCHMAKING_MAX_TTL: f64 = 300.0;
/// Latest expiration of a state donor's declaration, from now (seconds): a
/// donor re-declares every `declare_state_period`.
pub const DONOR_MAX_TTL: f64 = 3600.0;
/// Allowance for other peers' clocks running ahead of ours (seconds), as the
/// DHT's own window allows.
const CLOCK_SLACK: f64 = 30.0;
const NAME: &str = "averaging keys";

/// The [`RecordValidator`] for the averager's keys under one prefix.
#[derive(Debug, Clone)]
pub struct AveragingRecordValidator {
    matchmaking: Vec<u8>,
    donors: Vec<u8>,
}

/// Which of the averager's keys a record is under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Matchmaking,
    Donors,
}

impl AveragingRecordValidator {
    /// The rule for the averager under `prefix`.
    pub fn new(prefix: &str) -> Self {
        Self {
            matchmaking: format!("{prefix}.0b").into_bytes(),
            donors: format!("{prefix}.all_averagers").into_bytes(),
        }
    }

    fn kind(&self, key: &[u8]) -> Option<Kind> {
        if key == self.donors.as_slice() {
            Some(Kind::Donors)
        } else if key.starts_with(&self.matchmaking)
            && key[self.matchmaking.len()..]
                .iter()
                .all(|b| matches!(b, b'0' | b'1'))
        {
            Some(Kind::Matchmaking)
        } else {
            None
        }
    }
}

fn refuse(reason: impl Into<String>) -> ValidationError {
    ValidationError::Custom {
        validator: NAME,
        reason: reason.into(),
    }
}

impl RecordValidator for AveragingRecordValidator {
    fn validate(&self, record: &DhtRecord) -> Result<(), ValidationError> {
        let Some(kind) = self.kind(&record.key) else {
            return Ok(());
        };
        let Some(subkey) = &record.subkey else {
            return Err(refuse("a regular value under a per-peer key"));
        };
        let owner = OwnerKey::find_in(subkey)?.ok_or_else(|| refuse("a subkey naming no owner"))?;
        let now = dht_time();
        let max_ttl = match kind {
            Kind::Matchmaking => MATCHMAKING_MAX_TTL,
            Kind::Donors => DONOR_MAX_TTL,
        };
        let max = now + max_ttl + CLOCK_SLACK;
        if record.expiration.is_nan() || record.expiration > max {
            return Err(ValidationError::Expiration {
                expiration: record.expiration,
                now,
                max,
            });
        }
        if record.value == [0xc0] {
            return Ok(());
        }
        let peer = match kind {
            Kind::Matchmaking => {
                rmp_serde::from_slice::<(serde_bytes::ByteBuf, bool)>(&record.value).map(|(p, _)| p)
            }
            Kind::Donors => {
                let decoded =
                    rmp_serde::from_slice::<(serde_bytes::ByteBuf, f64, serde_bytes::ByteBuf)>(
                        &record.value,
                    );
                if let Ok((_, priority, root)) = &decoded {
                    if !priority.is_finite() {
                        return Err(refuse("a donor priority that is not finite"));
                    }
                    if root.len() != 32 {
                        return Err(refuse("a state root that is not 32 bytes"));
                    }
                }
                decoded.map(|(p, _, _)| p)
            }
        }
        .map_err(|_| refuse("a value that is not (peer id, …)"))?;
        let owner_peer = peer_id_of_owner(&owner)?;
        if peer.as_slice() != owner_peer.to_bytes().as_slice() {
            return Err(refuse(format!(
                "the value names a peer other than its owner {owner_peer}"
            )));
        }
        Ok(())
    }

    fn merge_with(&self, other: &dyn RecordValidator) -> bool {
        other
            .as_any()
            .downcast_ref::<Self>()
            .is_some_and(|o| o.matchmaking == self.matchmaking)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use colony_dht::{Ed25519SignatureValidator, PeerSigner};

    use super::*;

    fn owner(secret: u8) -> (Vec<u8>, Vec<u8>) {
        let signer = Ed25519SignatureValidator::new(&[secret; 32]);
        let peer = PeerSigner::from_secret([secret; 32]).peer_id().to_bytes();
        (signer.owner_marker(), peer)
    }

    fn record(key: &str, subkey: Option<Vec<u8>>, value: Vec<u8>, ttl: f64) -> DhtRecord {
        DhtRecord {
            key: key.as_bytes().to_vec(),
            subkey,
            value,
            expiration: dht_time() + ttl,
        }
    }

    fn declaration(peer: &[u8]) -> Vec<u8> {
        rmp_serde::to_vec(&(serde_bytes::Bytes::new(peer), false)).unwrap()
    }

    fn donor(peer: &[u8], priority: f64) -> Vec<u8> {
        rmp_serde::to_vec(&(
            serde_bytes::Bytes::new(peer),
            priority,
            serde_bytes::Bytes::new(&[7; 32]),
        ))
        .unwrap()
    }

    #[test]
    fn honest_declarations_and_withdrawals_pass() {
        let v = AveragingRecordValidator::new("run");
        let (marker, peer) = owner(1);
        for key in ["run.0b", "run.0b0110"] {
            v.validate(&record(key, Some(marker.clone()), declaration(&peer), 5.0))
                .unwrap();
            v.validate(&record(key, Some(marker.clone()), vec![0xc0], 5.0))
                .unwrap();
        }
        v.validate(&record(
            "run.all_averagers",
            Some(marker.clone()),
            donor(&peer, 12.0),
            600.0,
        ))
        .unwrap();
        // Other keys are not this validator's business.
        v.validate(&record("run.0bx", None, vec![1], 1e5)).unwrap();
        v.validate(&record("other.0b", None, vec![1], 1e5)).unwrap();
    }

    #[test]
    fn squatting_and_impersonating_values_are_refused() {
        let v = AveragingRecordValidator::new("run");
        let (marker, peer) = owner(1);
        let (_, someone_else) = owner(2);
        let refused = |r: DhtRecord| v.validate(&r).unwrap_err();
        // A regular value on the matchmaking and on the donors' key.
        refused(record("run.0b", None, declaration(&peer), 86_400.0));
        refused(record("run.all_averagers", None, donor(&peer, 1e300), 60.0));
        // A subkey naming no owner.
        refused(record(
            "run.0b",
            Some(b"junk".to_vec()),
            declaration(&peer),
            5.0,
        ));
        // An inner peer id naming someone else.
        let e = refused(record(
            "run.0b01",
            Some(marker.clone()),
            declaration(&someone_else),
            5.0,
        ));
        assert!(e.to_string().contains("other than its owner"), "{e}");
        refused(record(
            "run.all_averagers",
            Some(marker.clone()),
            donor(&someone_else, 3.0),
            60.0,
        ));
        // Expirations past the key kind's limit.
        refused(record(
            "run.0b",
            Some(marker.clone()),
            declaration(&peer),
            86_400.0,
        ));
        refused(record(
            "run.all_averagers",
            Some(marker.clone()),
            donor(&peer, 3.0),
            86_400.0,
        ));
        // Garbage and a priority that is not finite.
        refused(record("run.0b", Some(marker.clone()), vec![0x01], 5.0));
        refused(record(
            "run.all_averagers",
            Some(marker),
            donor(&peer, f64::INFINITY),
            60.0,
        ));
    }
}
