//! The ed25519 signature validator (reference `RSASignatureValidator`, with
//! ed25519 instead of RSA).

use std::any::Any;

use colony_schema::OwnerKey;
use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde_bytes::Bytes;

use crate::{error::ValidationError, record::DhtRecord, validation::RecordValidator};

/// Start of the signature trailer appended to a signed value.
pub const SIGNATURE_PREFIX: &[u8] = b"[signature:";
/// Total length of the trailer: prefix, 64 signature bytes, `]`.
pub const SIGNATURE_TRAILER_LEN: usize = SIGNATURE_PREFIX.len() + 64 + 1;
/// Domain separation tag at the start of every signed message.
const DOMAIN: &[u8] = b"colony-dht/record/v1";

/// Priority of [`Ed25519SignatureValidator`]: above schema validators, so it
/// validates first and schemas see the value without the signature.
pub const SIGNATURE_PRIORITY: i32 = 10;

/// Protects owned records: a record whose key or subkey contains an owner
/// marker (`[owner:ed25519:<hex>]`, see [`OwnerKey`]) must carry that owner's
/// ed25519 signature.
///
/// The signature covers `DOMAIN || msgpack([key: bin, subkey: bin | nil,
/// value: bin, expiration: f64])` with the stripped value, and is appended to
/// the value as `[signature:` + 64 raw bytes + `]`. Records naming no owner
/// are unprotected and pass. This node signs only records naming its own key,
/// so a record naming someone else is rejected by every storer and reader.
pub struct Ed25519SignatureValidator {
    signing_key: SigningKey,
    owner: OwnerKey,
}

impl std::fmt::Debug for Ed25519SignatureValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ed25519SignatureValidator")
            .field("owner", &hex::encode(self.owner.as_bytes()))
            .finish_non_exhaustive()
    }
}

impl Ed25519SignatureValidator {
    /// A validator that signs with the ed25519 key whose 32-byte secret is `secret`.
    pub fn new(secret: &[u8; 32]) -> Self {
        let signing_key = SigningKey::from_bytes(secret);
        let owner = OwnerKey::from_bytes(signing_key.verifying_key().to_bytes());
        Self { signing_key, owner }
    }

    /// This node's owner key.
    pub fn owner(&self) -> OwnerKey {
        self.owner
    }

    /// This node's owner marker, to use as (part of) a subkey.
    pub fn owner_marker(&self) -> Vec<u8> {
        self.owner.marker()
    }

    /// The owner a record's key or subkey names (`None`: no owner, or a
    /// malformed owner marker, which validation refuses anyway).
    pub(crate) fn record_owner(record: &DhtRecord) -> Option<OwnerKey> {
        Self::owner_of(record).ok().flatten()
    }

    fn owner_of(record: &DhtRecord) -> Result<Option<OwnerKey>, ValidationError> {
        let in_key = OwnerKey::find_in(&record.key)?;
        let in_subkey = match &record.subkey {
            Some(s) => OwnerKey::find_in(s)?,
            None => None,
        };
        match (in_key, in_subkey) {
            (Some(a), Some(b)) if a != b => Err(ValidationError::Owner(
                colony_schema::OwnerKeyError::SeveralOwners { count: 2 },
            )),
            (a, b) => Ok(a.or(b)),
        }
    }

    fn split(value: &[u8]) -> Option<(&[u8], [u8; 64])> {
        let body_len = value.len().checked_sub(SIGNATURE_TRAILER_LEN)?;
        let (body, trailer) = value.split_at(body_len);
        if !trailer.starts_with(SIGNATURE_PREFIX) || trailer.last() != Some(&b']') {
            return None;
        }
        let sig: [u8; 64] = trailer[SIGNATURE_PREFIX.len()..SIGNATURE_PREFIX.len() + 64]
            .try_into()
            .ok()?;
        Some((body, sig))
    }

    fn message(record: &DhtRecord, value: &[u8]) -> Vec<u8> {
        let fields = (
            Bytes::new(&record.key),
            record.subkey.as_deref().map(Bytes::new),
            Bytes::new(value),
            record.expiration,
        );
        let mut msg = DOMAIN.to_vec();
        // Encoding bytes and a float into a Vec cannot fail.
        msg.extend(rmp_serde::to_vec(&fields).unwrap_or_default());
        msg
    }
}

impl RecordValidator for Ed25519SignatureValidator {
    fn validate(&self, record: &DhtRecord) -> Result<(), ValidationError> {
        let Some(owner) = Self::owner_of(record)? else {
            return Ok(());
        };
        let (body, sig) = Self::split(&record.value).ok_or(ValidationError::MissingSignature)?;
        let key =
            VerifyingKey::from_bytes(owner.as_bytes()).map_err(|_| ValidationError::BadOwnerKey)?;
        key.verify_strict(&Self::message(record, body), &Signature::from_bytes(&sig))
            .map_err(|_| ValidationError::BadSignature {
                owner: hex::encode(owner.as_bytes()),
            })
    }

    fn sign_value(&self, record: &DhtRecord) -> Result<Vec<u8>, ValidationError> {
        if Self::owner_of(record)? != Some(self.owner) {
            return Ok(record.value.clone());
        }
        let sig = self.signing_key.sign(&Self::message(record, &record.value));
        let mut out = Vec::with_capacity(record.value.len() + SIGNATURE_TRAILER_LEN);
        out.extend_from_slice(&record.value);
        out.extend_from_slice(SIGNATURE_PREFIX);
        out.extend_from_slice(&sig.to_bytes());
        out.push(b']');
        Ok(out)
    }

    fn strip_value(&self, record: &DhtRecord) -> Vec<u8> {
        match Self::split(&record.value) {
            Some((body, _)) => body.to_vec(),
            None => record.value.clone(),
        }
    }

    fn priority(&self) -> i32 {
        SIGNATURE_PRIORITY
    }

    /// Any other signature validator is absorbed: owned records are checked
    /// against the owner named in them, not against this node's key.
    fn merge_with(&self, other: &dyn RecordValidator) -> bool {
        other.as_any().is::<Self>()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(subkey: Option<Vec<u8>>, value: &[u8]) -> DhtRecord {
        DhtRecord {
            key: b"run_progress".to_vec(),
            subkey,
            value: value.to_vec(),
            expiration: 1e9,
        }
    }

    #[test]
    fn signs_own_and_verifies() {
        let alice = Ed25519SignatureValidator::new(&[1; 32]);
        let bob = Ed25519SignatureValidator::new(&[2; 32]);
        let rec = record(Some(alice.owner_marker()), b"\x2a");
        let signed = DhtRecord {
            value: alice.sign_value(&rec).unwrap(),
            ..rec.clone()
        };
        assert_eq!(signed.value.len(), 1 + SIGNATURE_TRAILER_LEN);
        alice.validate(&signed).unwrap();
        bob.validate(&signed).unwrap();
        assert_eq!(bob.strip_value(&signed), b"\x2a");

        // Bob cannot sign Alice's subkey: his sign_value leaves it unsigned.
        assert_eq!(bob.sign_value(&rec).unwrap(), b"\x2a");
        assert_eq!(bob.validate(&rec), Err(ValidationError::MissingSignature));

        // A signature over a different value / expiration / subkey fails.
        let mut other_value = signed.clone();
        other_value.value[0] = 0x2b;
        assert!(matches!(
            bob.validate(&other_value),
            Err(ValidationError::BadSignature { .. })
        ));
        let later = DhtRecord {
            expiration: 2e9,
            ..signed.clone()
        };
        assert!(matches!(
            bob.validate(&later),
            Err(ValidationError::BadSignature { .. })
        ));

        // Alice's marker, signed by Bob's key (forged trailer).
        let forged_sig = bob
            .signing_key
            .sign(&Ed25519SignatureValidator::message(&rec, b"\x2a"));
        let mut forged = b"\x2a".to_vec();
        forged.extend_from_slice(SIGNATURE_PREFIX);
        forged.extend_from_slice(&forged_sig.to_bytes());
        forged.push(b']');
        let forged = DhtRecord {
            value: forged,
            ..rec.clone()
        };
        assert!(matches!(
            alice.validate(&forged),
            Err(ValidationError::BadSignature { .. })
        ));

        // Unowned records pass unsigned; malformed markers fail.
        alice
            .validate(&record(Some(b"plain".to_vec()), b"\x01"))
            .unwrap();
        assert!(matches!(
            alice.validate(&record(Some(b"[owner:rsa:xx]".to_vec()), b"\x01")),
            Err(ValidationError::Owner(_))
        ));
        // Key and subkey naming different owners.
        let mut two = rec.clone();
        two.key = bob.owner_marker();
        assert!(matches!(
            alice.sign_value(&two),
            Err(ValidationError::Owner(_))
        ));
    }
}
