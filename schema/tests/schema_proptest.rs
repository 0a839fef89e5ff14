//! Property tests: the validator takes bytes straight from untrusted peers,
//! so arbitrary bytes, mutations of valid records and arbitrary MessagePack
//! trees must yield `Ok` or a typed error — never a panic — and whatever is
//! accepted must really satisfy the schema.

#![allow(clippy::unwrap_used)] // tests fail loudly on unexpected errors

use colony_schema::{Checked, OwnerKey, SchemaValidator, from_msgpack_strict, to_msgpack};
use proptest::prelude::*;
use rmpv::Value;

mod common;

use common::{TrainingProgress, TrainingProgressSchema};

const CASES: u32 = 10_000;

fn validator() -> SchemaValidator {
    SchemaValidator::for_schema::<TrainingProgressSchema>(Some("run")).unwrap()
}

fn subkey() -> Vec<u8> {
    OwnerKey::from_bytes([9; 32]).marker()
}

fn progress() -> impl Strategy<Value = TrainingProgress> {
    (
        any::<u64>(),
        0..i64::MAX,
        0.0..1e12f64,
        -1e12..1e12f64,
        any::<bool>(),
    )
        .prop_map(
            |(step, samples_accumulated, samples_per_second, time, client_mode)| TrainingProgress {
                step,
                samples_accumulated,
                samples_per_second,
                time,
                client_mode,
            },
        )
}

/// Bytes that are interesting to a MessagePack decoder: length prefixes
/// claiming huge sizes, container markers, nil, floats.
fn nasty_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        any::<u8>(),
        Just(0xdd), // array32
        Just(0xdf), // map32
        Just(0xc6), // bin32
        Just(0xdb), // str32
        Just(0xff),
        Just(0xc0),
        Just(0xcb), // float64
        Just(0x91), // fixarray(1)
    ]
}

fn arb_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Nil),
        any::<bool>().prop_map(Value::Boolean),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::F64),
        any::<f32>().prop_map(Value::F32),
        "[a-z_]{0,12}".prop_map(Value::from),
        prop::collection::vec(any::<u8>(), 0..16).prop_map(Value::Binary),
        prop_oneof![
            Just("step"),
            Just("samples_accumulated"),
            Just("samples_per_second"),
            Just("time"),
            Just("client_mode")
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(6, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            prop::collection::vec((inner.clone(), inner), 0..8).prop_map(Value::Map),
        ]
    })
}

fn encode(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, value).unwrap();
    out
}

/// If the validator accepted `bytes`, the typed decode must succeed and the
/// constraints must hold.
fn assert_accepted_is_sound(bytes: &[u8]) {
    if validator()
        .validate(b"run_progress", Some(&subkey()), bytes)
        .is_ok()
    {
        let decoded: Option<Checked<TrainingProgress>> = from_msgpack_strict(bytes).unwrap();
        if let Some(p) = decoded {
            assert!(p.samples_accumulated >= 0);
            assert!(p.samples_per_second >= 0.0 && p.samples_per_second.is_finite());
            assert!(p.time.is_finite());
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(nasty_byte(), 0..512)) {
        let v = validator();
        let _ = v.validate(b"run_progress", Some(&subkey()), &bytes);
        let _ = v.validate(b"run_progress", None, &bytes);
        let _ = v.validate(b"unrelated", None, &bytes);
        let _ = from_msgpack_strict::<Checked<TrainingProgress>>(&bytes);
        let _ = colony_schema::decode_value(&bytes);
        assert_accepted_is_sound(&bytes);
    }

    #[test]
    fn arbitrary_subkeys_never_panic(
        subkey in prop::collection::vec(any::<u8>(), 0..128),
        prefix in prop::bool::ANY,
    ) {
        let mut s = if prefix { b"[owner:ed25519:".to_vec() } else { Vec::new() };
        s.extend_from_slice(&subkey);
        let bytes = to_msgpack(&Some(TrainingProgress {
            step: 1, samples_accumulated: 1, samples_per_second: 1.0, time: 1.0, client_mode: true,
        })).unwrap();
        let _ = validator().validate(b"run_progress", Some(&s), &bytes);
        let _ = OwnerKey::find_in(&s);
    }

    #[test]
    fn mutated_valid_records_never_panic(
        record in progress(),
        edits in prop::collection::vec((any::<prop::sample::Index>(), nasty_byte(), 0u8..4), 1..6),
    ) {
        let mut bytes = to_msgpack(&record).unwrap();
        for (index, byte, op) in edits {
            if bytes.is_empty() { break; }
            let at = index.index(bytes.len());
            match op {
                0 => bytes[at] = byte,
                1 => bytes.insert(at, byte),
                2 => { bytes.remove(at); }
                _ => bytes.truncate(at),
            }
        }
        assert_accepted_is_sound(&bytes);
    }

    #[test]
    fn arbitrary_trees_never_panic(value in arb_value()) {
        let bytes = encode(&value);
        assert_accepted_is_sound(&bytes);
        let wrapped = encode(&Value::Map(vec![(Value::from("step"), value)]));
        assert_accepted_is_sound(&wrapped);
    }

    #[test]
    fn valid_records_are_accepted_and_round_trip(record in progress()) {
        let bytes = to_msgpack(&record).unwrap();
        validator().validate(b"run_progress", Some(&subkey()), &bytes).unwrap();
        let back: Checked<TrainingProgress> = from_msgpack_strict(&bytes).unwrap();
        prop_assert_eq!(back.into_inner(), record);
    }
}
