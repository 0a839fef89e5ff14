//! Tensor-part payloads: the codecs' checked decoder
//! (`Compression::decode_into_checked`) and the reducer taking a `Part`
//! frame's payload (`colony_averaging::fuzzing::reducer_part`: size,
//! order and weight checks, then decode-and-accumulate, under the weighted
//! mean or a trimmed mean).
//!
//! Caps: a payload decodes only at its codec's exact encoded length; a
//! decode reported finite is finite; the reducer holds exactly the span it
//! was built for. Round trip: fp32, fp16 and bf16 values decoded from the
//! wire re-encode and decode to the same bits.
#![no_main]

use colony_averaging::{Compression, fuzzing::reducer_part};
use colony_fuzz::Input;
use libfuzzer_sys::fuzz_target;

const CODECS: [Compression; 4] = [
    Compression::None,
    Compression::Float16,
    Compression::BFloat16,
    Compression::Blockwise8Bit,
];

fuzz_target!(
    init: colony_fuzz::write_seeds_if_asked(colony_fuzz::seeds::averaging_part),
    |data: &[u8]| {
        let mut input = Input::new(data);
        let codec = CODECS[usize::from(input.u8() % 4)];
        let n = usize::from(input.u16() % 4096);
        let reduce = input.u8();
        let payload = input.rest();
        let mut out = vec![0f32; n];
        match codec.decode_into_checked(payload, &mut out) {
            Ok(finite) => {
                assert_eq!(payload.len(), codec.encoded_len(n));
                if finite {
                    assert!(out.iter().all(|x| x.is_finite()));
                    if codec != Compression::Blockwise8Bit {
                        let mut wire = Vec::new();
                        codec.encode(&out, &mut wire);
                        let mut again = vec![0f32; n];
                        codec.decode_into(&wire, &mut again).expect("re-encoded part decodes");
                        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                        assert_eq!(bits(&again), bits(&out));
                    }
                }
            }
            Err(_) => assert_ne!(payload.len(), codec.encoded_len(n)),
        }
        // The same payload as part `part` of a span split into parts of
        // `n / parts` values, delivered by sender `reduce % 3`.
        let parts = 1 + usize::from(reduce % 4);
        let step = n / parts;
        let ranges: Vec<_> = (0..parts)
            .map(|p| p * step..if p + 1 == parts { n } else { (p + 1) * step })
            .collect();
        let trim = (reduce & 0x80 != 0).then_some(usize::from(reduce >> 5 & 1));
        let weight = f32::from(reduce >> 2 & 7) * 0.5;
        if let Ok(held) = reducer_part(ranges, 3, trim, usize::from(reduce % 3), 0, payload, codec, weight) {
            assert_eq!(held, n);
        }
    }
);
