//! A kad put from a peer as the node handles it
//! (`colony_dht::fuzzing::inbound_record`: envelope, key/value/expiration
//! limits, the ed25519 signature validator and the progress schema
//! validator, then the local store and the get answer it serves).
//!
//! The first byte picks how the input is used: raw (key and record bytes
//! straight from the input), or a value signed by the owner the key names
//! (so the schema validator sees peer-chosen values behind a valid
//! signature).
//!
//! Caps: every accepted entry is within the default limits (key 1..=1024
//! bytes, subkey <= 1024, value <= 64 KiB, expiration in (now, now + TTL +
//! slack]); accepted + rejected = decoded entries; the served answer is a
//! valid envelope whose entries are the stored ones.
#![no_main]

use std::sync::{Arc, OnceLock};

use colony_dht::{
    CompositeValidator, DhtRecord, DhtValue, Ed25519SignatureValidator, RecordValidator,
    SchemaRecordValidator, WireEntry, decode_wire, encode_wire, fuzzing::inbound_record,
};
use colony_fuzz::{Input, bits};
use colony_optim::TrainingProgressSchema;
use colony_schema::SchemaValidator;
use libfuzzer_sys::fuzz_target;
use serde_bytes::ByteBuf;

const NOW: f64 = 1.0e9;
const MAX_KEY: usize = 1024;
const MAX_VALUE: usize = 64 * 1024;
const MAX_EXPIRATION: f64 = NOW + 24.0 * 3600.0 + 30.0;

struct Setup {
    validators: CompositeValidator,
    signer: Ed25519SignatureValidator,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let mut validators = CompositeValidator::new();
        validators.extend(Arc::new(Ed25519SignatureValidator::new(&[7; 32])));
        let schema = SchemaValidator::for_schema::<TrainingProgressSchema>(Some("fuzz"))
            .expect("the progress schema builds");
        validators.extend(Arc::new(SchemaRecordValidator::new(schema)));
        Setup {
            validators,
            signer: Ed25519SignatureValidator::new(&[9; 32]),
        }
    })
}

fn stored_entries(v: &DhtValue) -> Vec<(Option<Vec<u8>>, Vec<u8>, u64)> {
    match v {
        DhtValue::Regular { value, expiration } => vec![(None, value.clone(), bits(*expiration))],
        DhtValue::Dictionary(d) => d
            .iter()
            .map(|(k, v)| (Some(k.clone()), v.value.clone(), bits(v.expiration)))
            .collect(),
    }
}

fuzz_target!(
    init: colony_fuzz::write_seeds_if_asked(colony_fuzz::seeds::dht_inbound),
    |data: &[u8]| {
        let setup = setup();
        let mut input = Input::new(data);
        let mode = input.u8();
        let (key, bytes) = if mode % 2 == 0 {
            let key = input.field().to_vec();
            (key, input.rest().to_vec())
        } else {
            // A record of the signer's own dictionary entry under the
            // progress key; the value and expiration offset come from the
            // input, the signature is valid.
            let key = b"fuzz_progress".to_vec();
            let offset = f64::from(input.u32()) - 1.0e6;
            let value = input.rest().to_vec();
            let mut record = DhtRecord {
                key: key.clone(),
                subkey: Some(setup.signer.owner_marker()),
                value,
                expiration: NOW + offset,
            };
            record.value = setup.signer.sign_value(&record).expect("signing cannot fail");
            let wire = encode_wire(&[WireEntry {
                subkey: record.subkey.map(ByteBuf::from),
                value: ByteBuf::from(record.value),
                expiration: record.expiration,
            }]);
            (key, wire)
        };
        let decoded = decode_wire(&bytes).map(|e| e.len());
        let Ok(inbound) = inbound_record(&setup.validators, &key, &bytes, NOW) else {
            assert!(decoded.is_err(), "decodable record refused as malformed");
            return;
        };
        assert_eq!(decoded.ok(), Some(inbound.accepted.len() + inbound.rejected));
        for r in &inbound.accepted {
            assert!(!r.key.is_empty() && r.key.len() <= MAX_KEY);
            assert!(r.subkey.as_ref().is_none_or(|s| s.len() <= MAX_KEY));
            assert!(r.value.len() <= MAX_VALUE);
            assert!(r.expiration > NOW && r.expiration <= MAX_EXPIRATION);
        }
        match (&inbound.stored, &inbound.served) {
            (Some(stored), Some(served)) => {
                let entries = decode_wire(served).expect("a served record decodes");
                let served: Vec<_> = entries
                    .iter()
                    .map(|e| (e.subkey.as_ref().map(|s| s.to_vec()), e.value.to_vec(), bits(e.expiration)))
                    .collect();
                assert_eq!(served, stored_entries(stored));
            }
            (None, None) => {}
            _ => panic!("stored and served disagree"),
        }
    }
);
