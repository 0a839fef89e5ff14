//! The acceptance cases of the foundation issue, on a `TrainingProgress`-like
//! schema: a valid record passes; each kind of bad record is refused with an
//! error that names the field.

#![allow(clippy::unwrap_used)] // tests fail loudly on unexpected errors

use colony_schema::{
    Checked, FieldKind, OwnerKey, SchemaError, SchemaValidator, from_msgpack_strict, to_msgpack,
};
use rmpv::Value;
use serde::{Deserialize, Serialize};
use validator::Validate;

mod common;

use common::{TrainingProgress, TrainingProgressSchema};

/// A second schema with a plain (non-dictionary) field, for merging.
#[derive(Debug, Default, Serialize, Deserialize, Validate)]
#[serde(default, deny_unknown_fields)]
struct RunInfoSchema {
    #[validate(range(min = 1))]
    target_batch_size: u64,
    #[validate(length(min = 1, max = 64))]
    model_name: String,
}

fn valid() -> TrainingProgress {
    TrainingProgress {
        step: 12,
        samples_accumulated: 640,
        samples_per_second: 85.5,
        time: 1_790_000_000.25,
        client_mode: false,
    }
}

fn subkey() -> Vec<u8> {
    OwnerKey::from_bytes([0x42; 32]).marker()
}

fn validator() -> SchemaValidator {
    SchemaValidator::for_schema::<TrainingProgressSchema>(Some("run")).unwrap()
}

/// Encodes `valid()` as a map with one entry replaced (or removed / added).
fn record_with(field: &str, value: Option<Value>) -> Vec<u8> {
    let bytes = to_msgpack(&valid()).unwrap();
    let Value::Map(mut entries) = colony_schema::decode_value(&bytes).unwrap() else {
        panic!("a struct encodes as a map")
    };
    entries.retain(|(k, _)| k.as_str() != Some(field));
    if let Some(v) = value {
        entries.push((Value::from(field), v));
    }
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &Value::Map(entries)).unwrap();
    out
}

fn path_of(err: &SchemaError) -> String {
    err.path().unwrap_or_default().to_owned()
}

#[test]
fn field_kinds_are_discovered() {
    let v = validator();
    assert!(v.describes(b"run_progress"));
    assert!(!v.describes(b"progress"));
    assert_eq!(v.field_kind(b"run_progress"), Some(FieldKind::Dictionary));
}

#[test]
fn valid_record_passes_and_round_trips() {
    let bytes = to_msgpack(&valid()).unwrap();
    validator()
        .validate(b"run_progress", Some(&subkey()), &bytes)
        .unwrap();
    let back: Checked<TrainingProgress> = from_msgpack_strict(&bytes).unwrap();
    assert_eq!(back.into_inner(), valid());
}

#[test]
fn nil_goodbye_is_accepted() {
    validator()
        .validate(b"run_progress", Some(&subkey()), &[0xc0])
        .unwrap();
}

#[test]
fn negative_samples_are_refused() {
    let bytes = record_with("samples_accumulated", Some(Value::from(-5)));
    let err = validator()
        .validate(b"run_progress", Some(&subkey()), &bytes)
        .unwrap_err();
    assert!(matches!(err, SchemaError::Constraint { .. }), "{err}");
    assert!(path_of(&err).ends_with("samples_accumulated"), "{err}");
    assert!(
        path_of(&err).starts_with("progress[[owner:ed25519:4242"),
        "{err}"
    );

    let bytes = record_with("samples_per_second", Some(Value::F64(-0.5)));
    let err = validator()
        .validate(b"run_progress", Some(&subkey()), &bytes)
        .unwrap_err();
    assert!(path_of(&err).ends_with("samples_per_second"), "{err}");
    assert!(err.to_string().contains(">= 0"), "{err}");
}

#[test]
fn negative_step_is_refused_by_the_unsigned_type() {
    let bytes = record_with("step", Some(Value::from(-1)));
    let err = validator()
        .validate(b"run_progress", Some(&subkey()), &bytes)
        .unwrap_err();
    assert!(matches!(err, SchemaError::InvalidValue { .. }), "{err}");
    assert!(path_of(&err).ends_with("step"), "{err}");
}

#[test]
fn float_where_int_belongs_is_refused() {
    let bytes = record_with("step", Some(Value::F64(3.0)));
    let err = validator()
        .validate(b"run_progress", Some(&subkey()), &bytes)
        .unwrap_err();
    assert!(path_of(&err).ends_with("step"), "{err}");
    assert!(
        err.to_string().contains("invalid type: floating point"),
        "{err}"
    );
}

#[test]
fn int_where_float_belongs_is_refused() {
    let bytes = record_with("time", Some(Value::from(1_790_000_000u64)));
    let err = validator()
        .validate(b"run_progress", Some(&subkey()), &bytes)
        .unwrap_err();
    assert!(path_of(&err).ends_with("time"), "{err}");
    assert!(err.to_string().contains("invalid type: integer"), "{err}");
}

#[test]
fn bool_is_not_int_and_int_is_not_bool() {
    let bytes = record_with("step", Some(Value::Boolean(true)));
    let err = validator()
        .validate(b"run_progress", Some(&subkey()), &bytes)
        .unwrap_err();
    assert!(path_of(&err).ends_with("step"), "{err}");
    let bytes = record_with("client_mode", Some(Value::from(1)));
    let err = validator()
        .validate(b"run_progress", Some(&subkey()), &bytes)
        .unwrap_err();
    assert!(path_of(&err).ends_with("client_mode"), "{err}");
}

#[test]
fn missing_field_is_refused() {
    let bytes = record_with("samples_per_second", None);
    let err = validator()
        .validate(b"run_progress", Some(&subkey()), &bytes)
        .unwrap_err();
    assert!(path_of(&err).ends_with("samples_per_second"), "{err}");
    assert!(err.to_string().contains("missing field"), "{err}");
}

#[test]
fn extra_field_is_refused() {
    let bytes = record_with("learning_rate", Some(Value::F64(0.1)));
    let err = validator()
        .validate(b"run_progress", Some(&subkey()), &bytes)
        .unwrap_err();
    assert!(path_of(&err).ends_with("learning_rate"), "{err}");
    assert!(err.to_string().contains("unknown field"), "{err}");
}

#[test]
fn subkey_without_owner_is_refused() {
    let bytes = to_msgpack(&valid()).unwrap();
    let err = validator()
        .validate(b"run_progress", Some(b"peer-7"), &bytes)
        .unwrap_err();
    assert!(path_of(&err).starts_with("progress[peer-7]"), "{err}");
    assert!(err.to_string().contains("no owner marker"), "{err}");
    let err = validator()
        .validate(b"run_progress", None, &bytes)
        .unwrap_err();
    assert!(matches!(err, SchemaError::SubkeyMismatch { .. }), "{err}");
    assert_eq!(path_of(&err), "progress");
}

#[test]
fn non_finite_floats_are_refused() {
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        let bytes = record_with("time", Some(Value::F64(bad)));
        let err = validator()
            .validate(b"run_progress", Some(&subkey()), &bytes)
            .unwrap_err();
        assert!(path_of(&err).ends_with("time"), "{err}");
        assert!(err.to_string().contains("non-finite"), "{err}");
    }
}

#[test]
fn string_is_not_bytes_and_bytes_are_not_string() {
    #[derive(Debug, Default, Deserialize, Validate)]
    #[serde(default, deny_unknown_fields)]
    struct S {
        name: String,
        blob: serde_bytes::ByteBuf,
    }
    let v = SchemaValidator::for_schema::<S>(None).unwrap();
    let as_bin = rmp_serde::to_vec(&serde_bytes::Bytes::new(b"abc")).unwrap();
    let as_str = rmp_serde::to_vec("abc").unwrap();
    assert!(v.validate(b"name", None, &as_str).is_ok());
    assert!(v.validate(b"name", None, &as_bin).is_err());
    assert!(v.validate(b"blob", None, &as_bin).is_ok());
    assert!(v.validate(b"blob", None, &as_str).is_err());
}

#[test]
fn merged_validators_cover_both_schemas_and_extra_key_flag() {
    let mut v = validator().allow_extra_keys(false);
    v.merge(
        SchemaValidator::for_schema::<RunInfoSchema>(Some("run"))
            .unwrap()
            .allow_extra_keys(false),
    );
    let good = to_msgpack(&valid()).unwrap();
    v.validate(b"run_progress", Some(&subkey()), &good).unwrap();
    v.validate(
        b"run_target_batch_size",
        None,
        &to_msgpack(&4096u64).unwrap(),
    )
    .unwrap();
    let err = v
        .validate(b"run_target_batch_size", None, &to_msgpack(&0u64).unwrap())
        .unwrap_err();
    assert_eq!(path_of(&err), "target_batch_size");
    let err = v.validate(
        b"run_target_batch_size",
        Some(b"x"),
        &to_msgpack(&8u64).unwrap(),
    );
    assert!(matches!(err, Err(SchemaError::SubkeyMismatch { .. })));
    let err = v
        .validate(b"run_model_name", None, &to_msgpack("").unwrap())
        .unwrap_err();
    assert_eq!(path_of(&err), "model_name");
    let err = v
        .validate(b"other_key", None, &to_msgpack(&1u64).unwrap())
        .unwrap_err();
    assert!(matches!(err, SchemaError::UnknownKey { .. }));

    let mut permissive = validator().allow_extra_keys(false);
    permissive.merge(SchemaValidator::for_schema::<RunInfoSchema>(None).unwrap());
    permissive
        .validate(b"other_key", None, &to_msgpack(&1u64).unwrap())
        .unwrap();
}

#[test]
fn oversized_and_malformed_values_are_refused() {
    let v = validator().max_value_size(64);
    let big = vec![0xc0; 65];
    assert!(matches!(
        v.validate(b"run_progress", Some(&subkey()), &big),
        Err(SchemaError::TooLarge {
            size: 65,
            limit: 64
        })
    ));
    let mut bytes = to_msgpack(&valid()).unwrap();
    bytes.push(0xc0);
    assert!(matches!(
        validator().validate(b"run_progress", Some(&subkey()), &bytes),
        Err(SchemaError::Malformed { .. })
    ));
    bytes.truncate(bytes.len() - 10);
    assert!(matches!(
        validator().validate(b"run_progress", Some(&subkey()), &bytes),
        Err(SchemaError::Malformed { .. })
    ));
}

#[test]
fn deep_nesting_and_huge_declared_lengths_are_refused() {
    // 100 nested single-element arrays
    let mut deep = vec![0x91; 100];
    deep.push(0xc0);
    assert!(matches!(
        colony_schema::decode_value(&deep),
        Err(SchemaError::Malformed { .. })
    ));
    // array32 claiming 2^32-1 elements, with none present
    let huge = [0xdd, 0xff, 0xff, 0xff, 0xff];
    assert!(matches!(
        colony_schema::decode_value(&huge),
        Err(SchemaError::Malformed { .. })
    ));
    // bin32 claiming 4 GiB
    let huge_bin = [0xc6, 0xff, 0xff, 0xff, 0xff, 1, 2, 3];
    assert!(matches!(
        colony_schema::decode_value(&huge_bin),
        Err(SchemaError::Malformed { .. })
    ));
}

#[test]
fn structs_must_be_encoded_with_named_fields() {
    // rmp-serde's compact form encodes structs as arrays: refused, so every
    // field is named and unknown fields cannot hide.
    let compact = rmp_serde::to_vec(&valid()).unwrap();
    let err = validator()
        .validate(b"run_progress", Some(&subkey()), &compact)
        .unwrap_err();
    assert!(matches!(err, SchemaError::InvalidValue { .. }), "{err}");
}
