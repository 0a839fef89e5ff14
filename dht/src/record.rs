//! Records as validators see them, and their wire encoding.
//!
//! # Wire format (version 1)
//!
//! The value of every libp2p-kad record this crate puts or serves is a
//! MessagePack array:
//!
//! ```text
//! [1, [[subkey: bin | nil, value: bin, expiration: float64], ...]]
//! ```
//!
//! The kad record key is the raw DHT key (kad hashes it with SHA-256 for XOR
//! distance). A *regular* value is exactly one entry with a nil subkey; a
//! *dictionary* is one or more entries, each with a distinct binary subkey. A
//! `put` carries only the entries being written; a `get` answer carries every
//! unexpired entry the node holds. `value` is the signed value: the MessagePack
//! payload followed by validator trailers (the ed25519 validator appends
//! `[signature:` + 64 signature bytes + `]`, see
//! [`Ed25519SignatureValidator`](crate::Ed25519SignatureValidator)). The kad
//! record's own `publisher` and `expires` fields are ignored: the expiration
//! that matters is the signed one inside each entry.

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::error::ValidationError;

/// Version tag of the wire format.
pub const WIRE_VERSION: u8 = 1;

/// One (key, subkey, value, expiration) record as validators see it.
#[derive(Debug, Clone, PartialEq)]
pub struct DhtRecord {
    /// The raw DHT key.
    pub key: Vec<u8>,
    /// The subkey, or `None` for a regular value.
    pub subkey: Option<Vec<u8>>,
    /// The value bytes: signed (with trailers) or stripped, depending on the stage.
    pub value: Vec<u8>,
    /// Absolute expiration, DHT time in seconds.
    pub expiration: f64,
}

/// One entry of a wire record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireEntry {
    /// The subkey, `None` for a regular value.
    pub subkey: Option<ByteBuf>,
    /// The signed value bytes.
    pub value: ByteBuf,
    /// Absolute expiration, DHT time in seconds.
    pub expiration: f64,
}

#[derive(Serialize, Deserialize)]
struct WireRecord(u8, Vec<WireEntry>);

/// Encodes entries in the version-1 wire format.
pub fn encode_wire(entries: &[WireEntry]) -> Vec<u8> {
    // Serialising plain bytes, floats and options into a Vec cannot fail.
    rmp_serde::to_vec(&(WIRE_VERSION, entries)).unwrap_or_default()
}

/// Decodes and structurally checks a version-1 wire record.
///
/// # Errors
///
/// [`ValidationError::Malformed`] for bytes that are not a version-1 record,
/// an empty entry list, a nil subkey mixed with others, or duplicate subkeys.
pub fn decode_wire(bytes: &[u8]) -> Result<Vec<WireEntry>, ValidationError> {
    let malformed = |reason: String| ValidationError::Malformed { reason };
    let WireRecord(version, entries) =
        rmp_serde::from_slice(bytes).map_err(|e| malformed(e.to_string()))?;
    if version != WIRE_VERSION {
        return Err(malformed(format!("unknown wire version {version}")));
    }
    if entries.is_empty() {
        return Err(malformed("no entries".into()));
    }
    let regular = entries.iter().filter(|e| e.subkey.is_none()).count();
    if regular > 0 && entries.len() != 1 {
        return Err(malformed("a regular value must be the only entry".into()));
    }
    let mut subkeys: Vec<&[u8]> = entries
        .iter()
        .filter_map(|e| e.subkey.as_deref().map(|s| s.as_slice()))
        .collect();
    subkeys.sort_unstable();
    if subkeys.windows(2).any(|w| w[0] == w[1]) {
        return Err(malformed("duplicate subkey".into()));
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(subkey: Option<&[u8]>, value: &[u8], expiration: f64) -> WireEntry {
        WireEntry {
            subkey: subkey.map(|s| ByteBuf::from(s.to_vec())),
            value: ByteBuf::from(value.to_vec()),
            expiration,
        }
    }

    #[test]
    fn round_trip_and_layout() {
        let entries = vec![
            entry(Some(b"a"), b"\x01", 5.0),
            entry(Some(b"b"), b"\x02", 6.5),
        ];
        let bytes = encode_wire(&entries);
        // fixarray(2), version 1, fixarray(2) of entries, each fixarray(3) starting with bin8.
        assert_eq!(&bytes[..4], &[0x92, 0x01, 0x92, 0x93]);
        assert_eq!(bytes[4], 0xc4);
        assert_eq!(decode_wire(&bytes).unwrap(), entries);
        let regular = vec![entry(None, b"\x03", 1.0)];
        assert_eq!(decode_wire(&encode_wire(&regular)).unwrap(), regular);
    }

    #[test]
    fn rejects_malformed() {
        assert!(decode_wire(b"").is_err());
        assert!(decode_wire(&[0xff, 0x00, 0x13]).is_err());
        assert!(decode_wire(&encode_wire(&[])).is_err());
        let mixed = vec![entry(None, b"x", 1.0), entry(Some(b"a"), b"y", 1.0)];
        assert!(decode_wire(&encode_wire(&mixed)).is_err());
        let dup = vec![entry(Some(b"a"), b"x", 1.0), entry(Some(b"a"), b"y", 2.0)];
        assert!(decode_wire(&encode_wire(&dup)).is_err());
        let v2 = rmp_serde::to_vec(&(2u8, vec![entry(None, b"x", 1.0)])).unwrap();
        assert!(decode_wire(&v2).is_err());
    }
}
