//! Owner-keyed subkeys: the encoding of an ed25519 public key inside a DHT key
//! or subkey.
//!
//! # Encoding
//!
//! An owner marker is the ASCII text
//!
//! ```text
//! [owner:ed25519:<64 lowercase hexadecimal digits of the 32-byte public key>]
//! ```
//!
//! (80 bytes in all). A key or subkey is *owned* when it contains a marker
//! anywhere; bytes before and after it are free, so one owner may hold several
//! subkeys (`[owner:ed25519:…]/shard-3`). Any other occurrence of `[owner:`
//! (another algorithm, upper-case hex, a wrong length) makes the bytes
//! malformed rather than unowned, so a record cannot dodge the signature check
//! by misspelling its marker. Bytes naming two different owners are rejected.
//!
//! The marker only *claims* ownership; the DHT's signature validator checks
//! that the record is signed by that key.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

use crate::error::OwnerKeyError;

/// Start of every owner marker, in any algorithm.
pub const OWNER_TAG: &[u8] = b"[owner:";
/// Start of an ed25519 owner marker.
pub const ED25519_MARKER_PREFIX: &[u8] = b"[owner:ed25519:";
/// Length in bytes of an ed25519 owner marker.
pub const ED25519_MARKER_LEN: usize = ED25519_MARKER_PREFIX.len() + 64 + 1;

/// An ed25519 public key that owns a DHT key or subkey.
///
/// In a schema, use it as the key type of a dictionary field
/// (`BTreeMap<OwnerKey, _>`): a subkey is then accepted only if it carries an
/// owner marker (see the [module docs](self) for the encoding).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OwnerKey([u8; 32]);

impl OwnerKey {
    /// Wraps the 32 bytes of an ed25519 public key.
    pub const fn from_bytes(public_key: [u8; 32]) -> Self {
        Self(public_key)
    }

    /// The 32 bytes of the public key.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// This key's marker, `[owner:ed25519:<hex>]`, to use as (part of) a subkey.
    pub fn marker(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(ED25519_MARKER_LEN);
        out.extend_from_slice(ED25519_MARKER_PREFIX);
        out.extend_from_slice(hex::encode(self.0).as_bytes());
        out.push(b']');
        out
    }

    /// Finds the owner named in `bytes`.
    ///
    /// Returns `Ok(None)` when `bytes` holds no `[owner:` tag at all.
    ///
    /// # Errors
    ///
    /// [`OwnerKeyError::Malformed`] when an `[owner:` tag is not a valid
    /// ed25519 marker, [`OwnerKeyError::SeveralOwners`] when markers name
    /// different keys.
    pub fn find_in(bytes: &[u8]) -> Result<Option<Self>, OwnerKeyError> {
        let mut found: Option<Self> = None;
        let mut distinct = 0usize;
        let mut start = 0usize;
        while let Some(pos) = find(&bytes[start..], OWNER_TAG) {
            let offset = start + pos;
            let key = parse_marker(&bytes[offset..]).ok_or(OwnerKeyError::Malformed { offset })?;
            match found {
                Some(existing) if existing == key => {}
                Some(_) => distinct += 1,
                None => {
                    found = Some(key);
                    distinct = 1;
                }
            }
            start = offset + ED25519_MARKER_LEN;
        }
        if distinct > 1 {
            return Err(OwnerKeyError::SeveralOwners { count: distinct });
        }
        Ok(found)
    }

    /// Like [`find_in`](Self::find_in), but a missing marker is an error.
    ///
    /// # Errors
    ///
    /// As [`find_in`](Self::find_in), plus [`OwnerKeyError::Missing`].
    pub fn require_in(bytes: &[u8]) -> Result<Self, OwnerKeyError> {
        Self::find_in(bytes)?.ok_or(OwnerKeyError::Missing)
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Parses an ed25519 marker at the start of `bytes`.
fn parse_marker(bytes: &[u8]) -> Option<OwnerKey> {
    let marker = bytes.get(..ED25519_MARKER_LEN)?;
    let hex_digits = marker
        .strip_prefix(ED25519_MARKER_PREFIX)?
        .strip_suffix(b"]")?;
    // Only the canonical lower-case spelling is accepted, so one key has
    // exactly one marker.
    if !hex_digits
        .iter()
        .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    {
        return None;
    }
    let mut key = [0u8; 32];
    hex::decode_to_slice(hex_digits, &mut key).ok()?;
    Some(OwnerKey(key))
}

impl fmt::Debug for OwnerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OwnerKey({})", hex::encode(self.0))
    }
}

impl fmt::Display for OwnerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl Serialize for OwnerKey {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.marker())
    }
}

impl<'de> Deserialize<'de> for OwnerKey {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = OwnerKey;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("bytes carrying an owner marker `[owner:ed25519:<hex>]`")
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<OwnerKey, E> {
                OwnerKey::require_in(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_bytes(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_round_trips() {
        let key = OwnerKey::from_bytes([7; 32]);
        let marker = key.marker();
        assert_eq!(marker.len(), ED25519_MARKER_LEN);
        assert_eq!(OwnerKey::find_in(&marker), Ok(Some(key)));
        let mut with_suffix = marker.clone();
        with_suffix.extend_from_slice(b"/shard-1");
        assert_eq!(OwnerKey::find_in(&with_suffix), Ok(Some(key)));
        let mut twice = marker.clone();
        twice.extend_from_slice(&marker);
        assert_eq!(OwnerKey::find_in(&twice), Ok(Some(key)));
    }

    #[test]
    fn unowned_malformed_and_several() {
        assert_eq!(OwnerKey::find_in(b"plain subkey"), Ok(None));
        assert_eq!(OwnerKey::require_in(b"plain"), Err(OwnerKeyError::Missing));
        assert_eq!(
            OwnerKey::find_in(b"x[owner:rsa:abc]"),
            Err(OwnerKeyError::Malformed { offset: 1 })
        );
        let upper = OwnerKey::from_bytes([0xab; 32])
            .marker()
            .to_ascii_uppercase();
        assert!(
            OwnerKey::find_in(&upper).is_ok_and(|k| k.is_none()),
            "tag is case-sensitive"
        );
        let mut bad_hex = OwnerKey::from_bytes([0xab; 32]).marker();
        bad_hex[20] = b'A';
        assert_eq!(
            OwnerKey::find_in(&bad_hex),
            Err(OwnerKeyError::Malformed { offset: 0 })
        );
        let mut two = OwnerKey::from_bytes([1; 32]).marker();
        two.extend_from_slice(&OwnerKey::from_bytes([2; 32]).marker());
        assert_eq!(
            OwnerKey::find_in(&two),
            Err(OwnerKeyError::SeveralOwners { count: 2 })
        );
        let truncated = &OwnerKey::from_bytes([1; 32]).marker()[..40];
        assert_eq!(
            OwnerKey::find_in(truncated),
            Err(OwnerKeyError::Malformed { offset: 0 })
        );
    }
}
