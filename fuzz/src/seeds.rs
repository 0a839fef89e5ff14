//! The seed corpus of each target: a few valid encodings made with the
//! crates' own encoders, plus edge cases. Each function returns
//! `(file name, bytes)`; `scripts/fuzz.sh --seeds` writes them to
//! `fuzz/corpus/<target>/`.

use colony_averaging::{Compression, fuzzing};
use colony_dht::{PeerSigner, PortCheck, WireEntry, encode_wire, owner_key_from_secret};
use colony_optim::TrainingProgress;
use colony_schema::{OwnerKey, to_msgpack};
use serde_bytes::ByteBuf;

type Seeds = Vec<(&'static str, Vec<u8>)>;

fn entry(subkey: Option<&[u8]>, value: &[u8], expiration: f64) -> WireEntry {
    WireEntry {
        subkey: subkey.map(|s| ByteBuf::from(s.to_vec())),
        value: ByteBuf::from(value.to_vec()),
        expiration,
    }
}

fn progress(secret: u8) -> TrainingProgress {
    TrainingProgress {
        peer_id: PeerSigner::from_secret([secret; 32]).peer_id().to_base58(),
        step: 12,
        samples_accumulated: 640,
        samples_per_second: 210.5,
        time: 1.0e9,
        client_mode: false,
    }
}

fn msgpack<T: serde::Serialize>(v: &T) -> Vec<u8> {
    to_msgpack(v).expect("seed values encode")
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// Seeds of `dht_wire`.
pub fn dht_wire() -> Seeds {
    let marker = OwnerKey::from_bytes([1; 32]).marker();
    vec![
        ("regular", encode_wire(&[entry(None, &[0x2a], 1.0e9)])),
        (
            "dictionary",
            encode_wire(&[
                entry(Some(b"a"), &[0x01], 5.0),
                entry(Some(&marker), &[0xc0], 6.5),
            ]),
        ),
        (
            "duplicate-subkeys",
            encode_wire(&[entry(Some(b"a"), b"x", 1.0), entry(Some(b"a"), b"y", 2.0)]),
        ),
        ("no-entries", encode_wire(&[])),
        ("nan-expiration", encode_wire(&[entry(None, b"", f64::NAN)])),
        (
            "version-2",
            rmp_serde::to_vec(&(2u8, vec![entry(None, b"x", 1.0)])).expect("encodes"),
        ),
        ("empty", Vec::new()),
    ]
}

/// Seeds of `dht_inbound`.
pub fn dht_inbound() -> Seeds {
    let key = b"fuzz_progress";
    let marker = OwnerKey::from_bytes([2; 32]).marker();
    let now = 1.0e9;
    let raw = |wire: Vec<u8>| cat(&[&[0, key.len() as u8], key, &wire]);
    // Mode 1: offset (u32, minus 10^6 seconds) and the value to sign.
    let signed = |offset: u32, value: &[u8]| cat(&[&[1], &offset.to_le_bytes(), value]);
    vec![
        (
            "raw-unowned",
            raw(encode_wire(&[entry(Some(b"x"), &[0x01], now + 60.0)])),
        ),
        (
            "raw-owned-unsigned",
            raw(encode_wire(&[entry(Some(&marker), &[0xc0], now + 60.0)])),
        ),
        (
            "raw-expired",
            raw(encode_wire(&[entry(None, &[0x01], now - 1.0)])),
        ),
        ("signed-progress", signed(1_000_060, &msgpack(&progress(9)))),
        ("signed-goodbye", signed(1_000_060, &[0xc0])),
        ("signed-too-late", signed(u32::MAX, &[0xc0])),
        ("signed-not-msgpack", signed(1_000_060, b"\xc1")),
    ]
}

fn frame(body: &[u8]) -> Vec<u8> {
    cat(&[&(body.len() as u32).to_be_bytes(), body])
}

/// Seeds of `dht_dialback`.
pub fn dht_dialback() -> Seeds {
    let request = rmp_serde::to_vec(&[4001u16, 4002]).expect("encodes");
    let answer = rmp_serde::to_vec(&(
        "203.0.113.7",
        vec![
            PortCheck {
                port: 4001,
                reachable: true,
                detail: String::new(),
            },
            PortCheck {
                port: 4002,
                reachable: false,
                detail: "connection refused".into(),
            },
        ],
    ))
    .expect("encodes");
    // Answer mode: count byte (1 + n % 4 ports), the ports, the stream.
    let asked = cat(&[&[1, 1], &4001u16.to_le_bytes(), &4002u16.to_le_bytes()]);
    vec![
        ("request", cat(&[&[0], &frame(&request)])),
        (
            "request-five-ports",
            cat(&[&[0], &frame(&rmp_serde::to_vec(&[1u16, 2, 3, 4, 5]).expect("encodes"))]),
        ),
        ("request-over-cap", cat(&[&[0], &u32::MAX.to_be_bytes()])),
        ("answer", cat(&[&asked, &frame(&answer)])),
        ("answer-truncated", cat(&[&asked, &frame(&answer)[..20]])),
    ]
}

/// Seeds of `schema_value`.
pub fn schema_value() -> Seeds {
    let owners: std::collections::BTreeMap<OwnerKey, Option<Vec<f64>>> = [
        (OwnerKey::from_bytes([1; 32]), Some(vec![1.5, -2.0])),
        (OwnerKey::from_bytes([2; 32]), None),
    ]
    .into();
    let mut deep = vec![0x91u8; 40];
    deep.push(0xc0);
    vec![
        ("progress", cat(&[&[0], &msgpack(&progress(1))])),
        ("owner-map", cat(&[&[1], &msgpack(&owners)])),
        (
            "tuple",
            cat(&[&[2], &msgpack(&("peer", 7u64, true, Some(-3i8)))]),
        ),
        (
            "marker",
            cat(&[&[3], b"run_", &OwnerKey::from_bytes([4; 32]).marker(), b"/x"]),
        ),
        ("too-deep", cat(&[&[0], &deep])),
        ("nan", vec![0, 0xcb, 0x7f, 0xf8, 0, 0, 0, 0, 0, 0]),
        ("trailing", vec![1, 0xc0, 0xc0]),
    ]
}

/// Seeds of `schema_validator`.
pub fn schema_validator() -> Seeds {
    let mut bad = progress(1);
    bad.samples_per_second = -1.0;
    vec![
        // choice 3: the progress key, an owner-marker subkey.
        ("progress", cat(&[&[3], &msgpack(&progress(1))])),
        ("goodbye", vec![3, 0xc0]),
        ("negative-rate", cat(&[&[3], &msgpack(&bad)])),
        ("no-subkey", cat(&[&[0], &msgpack(&progress(1))])),
        ("other-key", vec![1, 0x2a]),
    ]
}

/// Seeds of `averaging_control`.
pub fn averaging_control() -> Seeds {
    let names = ["join", "reply-accepted", "reply-refused", "begin", "disbanded"];
    let mut seeds: Seeds = names.into_iter().zip(fuzzing::control_seeds()).collect();
    seeds.push(("over-cap", u32::MAX.to_le_bytes().to_vec()));
    seeds.push(("truncated", vec![10, 0, 0, 0, 0x81]));
    seeds
}

/// Seeds of `averaging_frame`.
pub fn averaging_frame() -> Seeds {
    let preamble = cat(&[b"COLNYAR3", &[7; 32], &1u32.to_le_bytes(), &2u32.to_le_bytes()]);
    let probe = cat(&[b"COLNYPRB", &[8; 32], &[0; 8]]);
    let hello = cat(&[&[5; 32], &[1], &1.5f32.to_le_bytes(), &3u32.to_le_bytes()]);
    // Stream: max_body (u16 above the header), then (tag, length, body)
    // chunks; tag % 4 == 0 is raw, else sealed with kind 1 + tag % 5.
    let stream = cat(&[
        &[3],
        &256u16.to_le_bytes(),
        &[5, hello.len() as u8],
        &hello,
        &[1, 8],
        &[0; 8],
        &[7, 0],
    ]);
    let head = cat(&[&[2], &64u16.to_le_bytes(), &40u32.to_le_bytes(), &[2, 0, 0, 0, 1, 0, 0, 0]]);
    vec![
        ("preamble", cat(&[&[0], &preamble])),
        ("probe", cat(&[&[0], &probe])),
        ("hello", cat(&[&[1], &hello])),
        ("head", head),
        ("stream", stream),
        ("stream-raw", vec![3, 16, 0, 4, 12, 16, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]),
    ]
}

/// Seeds of `averaging_part`.
pub fn averaging_part() -> Seeds {
    let values = [1.0f32, -2.5, 0.125, 3.0e4, -7.0, 0.0, 1.0e-3, 42.0];
    let codecs = [
        ("fp32", Compression::None),
        ("fp16", Compression::Float16),
        ("bf16", Compression::BFloat16),
        ("q8", Compression::Blockwise8Bit),
    ];
    let mut seeds: Seeds = codecs
        .iter()
        .enumerate()
        .map(|(i, &(name, codec))| {
            let mut wire = Vec::new();
            codec.encode(&values, &mut wire);
            // codec, n (u16), reduce byte (sender 0, part 0 of 1, weight 1).
            let head = [i as u8, values.len() as u8, 0, 0b0000_1000];
            (name, cat(&[&head, &wire]))
        })
        .collect();
    seeds.push(("fp32-nan", cat(&[&[0, 1, 0, 0b1000_1000], &f32::NAN.to_le_bytes()])));
    seeds
}

/// Seeds of `averaging_state`.
pub fn averaging_state() -> Seeds {
    let state = colony_averaging::state::SharedState {
        metadata: msgpack(&42u64),
        tensors: vec![vec![1.0, -2.0, 0.5], vec![3.0]],
    };
    let served = colony_averaging::state::ServedState::new(state).expect("a small state");
    let descriptor = served.descriptor().encode().expect("encodes");
    let chunk: Vec<u8> = served
        .state()
        .tensors
        .iter()
        .flatten()
        .flat_map(|x| x.to_le_bytes())
        .collect();
    let joiner = |lengths: &[u8], descriptor: &[u8], answers: &[u8]| {
        cat(&[
            &[0, lengths.len() as u8],
            lengths,
            &(descriptor.len() as u16).to_le_bytes(),
            descriptor,
            answers,
        ])
    };
    // A descriptor declaring a tensor of 2^40 values.
    let mut huge = served.descriptor().clone();
    huge.lengths = vec![1 << 40];
    let huge = huge.encode().expect("encodes");
    let request = |tag: u8, root: [u8; 32], index: u32| {
        cat(&[&[tag], &root, &index.to_le_bytes()])
    };
    let root = served.root();
    vec![
        ("good", joiner(&[3, 1], &descriptor, &cat(&[&[0], &chunk]))),
        ("wrong-layout", joiner(&[4], &descriptor, &cat(&[&[0], &chunk]))),
        ("not-serving", joiner(&[3, 1], &descriptor, &[1])),
        ("truncated", joiner(&[3, 1], &descriptor, &cat(&[&[0], &chunk[..5]]))),
        ("bad-chunk", joiner(&[3, 1], &descriptor, &cat(&[&[0], &[0; 16]]))),
        ("huge-tensor", joiner(&[3, 1], &huge, &[])),
        ("garbage", joiner(&[3, 1], &[0xc1, 0x00], &[])),
        (
            "donor-requests",
            cat(&[
                &[1],
                &request(1, root, 0),
                &request(2, root, 0),
                &request(2, root, 9),
                &request(2, [0; 32], 0),
                &request(7, root, 0),
            ]),
        ),
    ]
}

/// Seeds of `optim_pushed`.
pub fn optim_pushed() -> Seeds {
    #[derive(serde::Serialize)]
    struct Pushed {
        #[serde(with = "serde_bytes")]
        owner: Vec<u8>,
        progress: Option<TrainingProgress>,
        expiration: f64,
    }
    let owner = owner_key_from_secret([3; 32]).as_bytes().to_vec();
    let pushed = |progress| Pushed {
        owner: owner.clone(),
        progress,
        expiration: 1.0e9,
    };
    vec![
        // Source byte 1: the owner itself; 2: another peer.
        ("own", cat(&[&[1], &msgpack(&pushed(Some(progress(3))))])),
        ("goodbye", cat(&[&[1], &msgpack(&pushed(None))])),
        ("foreign", cat(&[&[2], &msgpack(&pushed(Some(progress(3))))])),
        ("wrong-peer-id", cat(&[&[1], &msgpack(&pushed(Some(progress(4))))])),
        ("unsigned", cat(&[&[0], &msgpack(&pushed(None))])),
    ]
}
