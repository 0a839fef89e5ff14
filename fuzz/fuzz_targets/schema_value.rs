//! The strict MessagePack decoder every DHT value goes through
//! (`colony_schema::decode_value`, `from_msgpack_strict`) and owner-marker
//! parsing (`OwnerKey::find_in`).
//!
//! Caps: a decoded value nests at most `MAX_DEPTH` deep and has no more
//! nodes than its input has bytes; no float decoded strictly is
//! non-finite; a `Checked` record satisfies its constraints. Round trips:
//! a value re-encodes to bytes that decode and re-encode to the same bytes;
//! a strictly decoded record re-encodes to bytes that decode to the same
//! record; a found owner key's marker is in the input.
#![no_main]

use std::collections::BTreeMap;

use colony_fuzz::Input;
use colony_optim::TrainingProgress;
use colony_schema::{Checked, MAX_DEPTH, OwnerKey, decode_value, from_msgpack_strict, to_msgpack};
use libfuzzer_sys::fuzz_target;
use rmpv::Value;
use validator::Validate;

/// (depth, nodes) of a value.
fn shape(v: &Value) -> (usize, usize) {
    let children: Vec<&Value> = match v {
        Value::Array(items) => items.iter().collect(),
        Value::Map(entries) => entries.iter().flat_map(|(k, v)| [k, v]).collect(),
        _ => Vec::new(),
    };
    children.iter().fold((1, 1), |(depth, nodes), c| {
        let (d, n) = shape(c);
        (depth.max(d + 1), nodes + n)
    })
}

fn encode(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, v).expect("writing to a Vec cannot fail");
    out
}

fuzz_target!(
    init: colony_fuzz::write_seeds_if_asked(colony_fuzz::seeds::schema_value),
    |data: &[u8]| {
        let mut input = Input::new(data);
        let which = input.u8();
        let bytes = input.rest();
        if let Ok(value) = decode_value(bytes) {
            let (depth, nodes) = shape(&value);
            assert!(depth <= MAX_DEPTH + 1, "depth {depth}");
            assert!(nodes <= bytes.len(), "{nodes} nodes from {} bytes", bytes.len());
            let once = encode(&value);
            let again = decode_value(&once).expect("a re-encoded value decodes");
            assert_eq!(encode(&again), once);
        }
        match which % 4 {
            0 => {
                if let Ok(p) = from_msgpack_strict::<Checked<TrainingProgress>>(bytes) {
                    let p = p.into_inner();
                    assert!(p.validate().is_ok());
                    assert!(p.samples_per_second.is_finite() && p.time.is_finite());
                    let again = from_msgpack_strict::<TrainingProgress>(
                        &to_msgpack(&p).expect("encodes"),
                    )
                    .expect("round trip");
                    assert_eq!(again, p);
                }
            }
            1 => {
                if let Ok(m) = from_msgpack_strict::<BTreeMap<OwnerKey, Option<Vec<f64>>>>(bytes) {
                    assert!(m.values().flatten().flatten().all(|x| x.is_finite()));
                    let again = from_msgpack_strict::<BTreeMap<OwnerKey, Option<Vec<f64>>>>(
                        &to_msgpack(&m).expect("encodes"),
                    )
                    .expect("round trip");
                    assert_eq!(again, m);
                }
            }
            2 => {
                if let Ok(v) = from_msgpack_strict::<(String, u64, bool, Option<i8>)>(bytes) {
                    let again = from_msgpack_strict::<(String, u64, bool, Option<i8>)>(
                        &to_msgpack(&v).expect("encodes"),
                    )
                    .expect("round trip");
                    assert_eq!(again, v);
                }
            }
            _ => {
                if let Ok(Some(owner)) = OwnerKey::find_in(bytes) {
                    let marker = owner.marker();
                    assert!(bytes.windows(marker.len()).any(|w| w == marker));
                    assert_eq!(OwnerKey::require_in(&marker).ok(), Some(owner));
                }
            }
        }
    }
);
