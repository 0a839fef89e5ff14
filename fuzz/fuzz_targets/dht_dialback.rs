//! Dial-back frames (`colony_dht::fuzzing::dialback_request` /
//! `dialback_answer`): the request every node answers from any peer, and
//! the answer an asking node reads.
//!
//! Caps: a frame whose length prefix exceeds its cap (64-byte requests,
//! 4096-byte answers) is refused before anything is allocated for it; an
//! accepted request asks about 1 to 4 non-zero ports; an accepted answer has
//! exactly one verdict per port asked, in order.
#![no_main]

use colony_dht::{MAX_PORTS, fuzzing};
use colony_fuzz::Input;
use libfuzzer_sys::fuzz_target;

fn declared_len(stream: &[u8]) -> Option<usize> {
    let head: [u8; 4] = stream.get(..4)?.try_into().ok()?;
    Some(u32::from_be_bytes(head) as usize)
}

fuzz_target!(
    init: colony_fuzz::write_seeds_if_asked(colony_fuzz::seeds::dht_dialback),
    |data: &[u8]| {
        let (request_cap, answer_cap) = fuzzing::DIALBACK_FRAME_CAPS;
        let mut input = Input::new(data);
        if input.u8() % 2 == 0 {
            let stream = input.rest();
            if let Ok(ports) = fuzzing::dialback_request(stream) {
                assert!(declared_len(stream).is_some_and(|n| n <= request_cap));
                assert!((1..=MAX_PORTS).contains(&ports.len()));
                assert!(!ports.contains(&0));
            }
        } else {
            let asked: Vec<u16> = (0..1 + input.u8() % 4 as u8)
                .map(|_| input.u16().max(1))
                .collect();
            let stream = input.rest();
            if let Ok((_, checks)) = fuzzing::dialback_answer(stream, &asked) {
                assert!(declared_len(stream).is_some_and(|n| n <= answer_cap));
                assert_eq!(checks.iter().map(|c| c.port).collect::<Vec<_>>(), asked);
            }
        }
    }
);
