//! The data plane's wire: a connection's opening bytes (round preamble or
//! reachability probe), `Hello` payloads, frame heads
//! (`FrameHead::parse`), and whole frame streams read by
//! `round::read_frame` with a round key: frames sealed by a sender holding
//! the key (a group member: past the AEAD, every field is its choice) mixed
//! with raw bytes (anyone on the path).
//!
//! Caps: a parsed head's body is within `[header + tag, max_body + tag]`;
//! the reader's buffer never grows past `max_body + tag`; a frame's payload
//! range lies inside the buffer and within `max_body`. Round trips: an
//! opening or hello re-encodes to its input; sealed frames read back with
//! their kind, index and payload until the first raw chunk.
#![no_main]

use std::time::Duration;

use colony_averaging::{
    fuzzing::{OPENING_LEN, block_on, hello, opening},
    round::{FRAME_HEADER_LEN, FrameBuf, FrameCipher, FrameHead, Kind, TAG_LEN, read_frame},
};
use colony_fuzz::Input;
use libfuzzer_sys::fuzz_target;

const KEY: [u8; 16] = [0x42; 16];

fn stream(input: &mut Input<'_>) {
    let max_body = FRAME_HEADER_LEN + usize::from(input.u16());
    let mut sender = FrameCipher::new(&KEY).expect("any key");
    let mut wire = Vec::new();
    let mut expected = Vec::new();
    let mut in_sync = true;
    let mut frame = Vec::new();
    for _ in 0..16 {
        let tag = input.u8();
        let body = input.field();
        if tag % 4 == 0 {
            wire.extend_from_slice(body);
            in_sync = false;
            continue;
        }
        let kind = Kind::from_u8(1 + tag % 5).expect("kinds 1 to 5");
        let index = u32::from(tag / 5);
        let mut buf = FrameBuf::new(&mut frame);
        buf.start(kind, index, body.len()).copy_from_slice(body);
        wire.extend_from_slice(buf.seal(&mut sender).expect("seal"));
        if in_sync && FRAME_HEADER_LEN + body.len() <= max_body {
            expected.push((kind, index, body));
        } else {
            in_sync = false;
        }
    }
    let mut receiver = FrameCipher::new(&KEY).expect("any key");
    let mut rd = &wire[..];
    let mut buf = Vec::new();
    let mut read = 0;
    loop {
        let got = block_on(read_frame(
            &mut rd,
            &mut receiver,
            &mut buf,
            max_body,
            Duration::from_secs(1),
        ));
        assert!(buf.len() <= max_body + TAG_LEN, "buffer grew past its cap");
        let Ok((kind, index, range)) = got else {
            assert!(read >= expected.len(), "a sealed frame failed to read back");
            break;
        };
        assert_eq!(range.start, FRAME_HEADER_LEN);
        assert!(range.end <= max_body && range.end <= buf.len());
        if let Some(&(k, i, payload)) = expected.get(read) {
            assert_eq!((kind, index, &buf[range]), (k, i, payload));
        }
        read += 1;
    }
}

fuzz_target!(
    init: colony_fuzz::write_seeds_if_asked(colony_fuzz::seeds::averaging_frame),
    |data: &[u8]| {
        let mut input = Input::new(data);
        match input.u8() % 4 {
            0 => {
                let mut bytes = [0u8; OPENING_LEN];
                let given = input.bytes(OPENING_LEN);
                bytes[..given.len()].copy_from_slice(given);
                if let Ok(again) = opening(&bytes) {
                    // A probe's last 8 bytes are padding, not read.
                    let n = if &bytes[..8] == b"COLNYPRB" { 40 } else { OPENING_LEN };
                    assert_eq!(again[..n], bytes[..n]);
                }
            }
            1 => {
                let payload = input.rest();
                if let Ok((again, _)) = hello(payload) {
                    assert_eq!(again, payload);
                }
            }
            2 => {
                let max_body = FRAME_HEADER_LEN + usize::from(input.u16());
                let mut head = [0u8; 4 + FRAME_HEADER_LEN];
                let given = input.bytes(head.len());
                head[..given.len()].copy_from_slice(given);
                if let Ok(h) = FrameHead::parse(&head, max_body) {
                    assert!(h.body_len >= FRAME_HEADER_LEN + TAG_LEN);
                    assert!(h.body_len <= max_body + TAG_LEN);
                    assert_eq!(h.payload_len(), h.body_len - FRAME_HEADER_LEN - TAG_LEN);
                }
            }
            _ => stream(&mut input),
        }
    }
);
