//! A schema validator on arbitrary records (`SchemaValidator::validate`
//! with the optimizer's `TrainingProgressSchema`, the schema every node
//! runs on `{prefix}_progress` records).
//!
//! The first byte picks the key (the schema's dictionary key, a key outside
//! the schema, or one from the input) and the subkey (none, an owner
//! marker, or one from the input); the rest is the value.
//!
//! Caps: a value over the size cap is refused; an accepted entry of the
//! progress dictionary is nil or a record that decodes strictly and meets
//! its constraints, under an owner-marker subkey.
#![no_main]

use std::sync::OnceLock;

use colony_fuzz::Input;
use colony_optim::{TrainingProgress, TrainingProgressSchema};
use colony_schema::{Checked, OwnerKey, SchemaValidator, from_msgpack_strict};
use libfuzzer_sys::fuzz_target;
use validator::Validate;

/// A value cap small enough for fuzz inputs to cross.
const MAX_VALUE: usize = 256;

fn validator() -> &'static SchemaValidator {
    static V: OnceLock<SchemaValidator> = OnceLock::new();
    V.get_or_init(|| {
        SchemaValidator::for_schema::<TrainingProgressSchema>(Some("fuzz"))
            .expect("the progress schema builds")
            .max_value_size(MAX_VALUE)
    })
}

fuzz_target!(
    init: colony_fuzz::write_seeds_if_asked(colony_fuzz::seeds::schema_validator),
    |data: &[u8]| {
        let mut input = Input::new(data);
        let choice = input.u8();
        let key: Vec<u8> = match choice % 3 {
            0 => b"fuzz_progress".to_vec(),
            1 => b"other_key".to_vec(),
            _ => input.field().to_vec(),
        };
        let subkey: Option<Vec<u8>> = match (choice / 3) % 3 {
            0 => None,
            1 => Some(OwnerKey::from_bytes([5; 32]).marker()),
            _ => Some(input.field().to_vec()),
        };
        let value = input.rest();
        let verdict = validator().validate(&key, subkey.as_deref(), value);
        if verdict.is_err() || key != b"fuzz_progress" {
            return;
        }
        assert!(value.len() <= MAX_VALUE, "value over the cap accepted");
        let subkey = subkey.expect("a dictionary entry has a subkey");
        assert!(OwnerKey::require_in(&subkey).is_ok(), "entry without an owner subkey");
        if value != [0xc0] {
            let p = from_msgpack_strict::<Checked<TrainingProgress>>(value)
                .expect("an accepted progress value decodes strictly")
                .into_inner();
            assert!(p.validate().is_ok());
        }
    }
);
