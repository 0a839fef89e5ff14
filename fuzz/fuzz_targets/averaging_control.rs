//! Join-protocol control messages (`colony_averaging::fuzzing::
//! control_message`: the length-prefixed MessagePack reader every join
//! stream goes through, then the entry signature and group checks).
//!
//! Caps: a length prefix over the 1 MiB cap is refused before its body is
//! allocated (the allocator cap would abort otherwise); an accepted body is
//! no longer than its prefix says. Round trip: a decoded message re-encodes
//! to a frame that decodes to the same encoding.
#![no_main]

use colony_averaging::fuzzing::{CONTROL_CAP, control_message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(
    init: colony_fuzz::write_seeds_if_asked(colony_fuzz::seeds::averaging_control),
    |data: &[u8]| {
        let Ok(encoded) = control_message(data) else {
            return;
        };
        let declared = u32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize;
        assert!(declared <= CONTROL_CAP && declared <= data.len() - 4);
        let mut frame = (encoded.len() as u32).to_le_bytes().to_vec();
        frame.extend_from_slice(&encoded);
        let again = control_message(&frame).expect("a re-encoded message decodes");
        assert_eq!(again, encoded);
    }
);
