//! The DHT record envelope (`colony_dht::decode_wire`): every kad record a
//! peer puts or serves.
//!
//! Caps: an accepted record has at least one entry, at most one regular
//! entry and then no other, distinct subkeys, and holds no more entry bytes
//! than its input (each entry costs at least 4 input bytes). Round trip:
//! re-encoding decodes to the same entries.
#![no_main]

use colony_dht::{WireEntry, decode_wire, encode_wire};
use colony_fuzz::bits;
use libfuzzer_sys::fuzz_target;

fn key(e: &WireEntry) -> (Option<Vec<u8>>, Vec<u8>, u64) {
    (
        e.subkey.as_ref().map(|s| s.to_vec()),
        e.value.to_vec(),
        bits(e.expiration),
    )
}

fuzz_target!(
    init: colony_fuzz::write_seeds_if_asked(colony_fuzz::seeds::dht_wire),
    |data: &[u8]| {
        let Ok(entries) = decode_wire(data) else {
            return;
        };
        assert!(!entries.is_empty());
        assert!(entries.len() * 4 <= data.len(), "more entries than the input holds");
        let payload: usize = entries
            .iter()
            .map(|e| e.value.len() + e.subkey.as_ref().map_or(0, |s| s.len()))
            .sum();
        assert!(payload <= data.len(), "entries larger than the input");
        let regular = entries.iter().filter(|e| e.subkey.is_none()).count();
        assert!(regular == 0 || entries.len() == 1);
        let again = decode_wire(&encode_wire(&entries)).expect("re-encoded record decodes");
        assert_eq!(
            entries.iter().map(key).collect::<Vec<_>>(),
            again.iter().map(key).collect::<Vec<_>>()
        );
    }
);
