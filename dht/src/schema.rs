//! Adapter plugging [`colony_schema::SchemaValidator`] into the record pipeline.

use std::{any::Any, sync::RwLock};

use colony_schema::SchemaValidator;

use crate::{error::ValidationError, record::DhtRecord, validation::RecordValidator};

/// Runs a [`SchemaValidator`] on every record, after the signature validator
/// (priority 0 < [`SIGNATURE_PRIORITY`](crate::SIGNATURE_PRIORITY)), so it sees
/// the value without the signature trailer. Several of them merge into one
/// (schemas concatenated), as in the reference.
pub struct SchemaRecordValidator {
    schema: RwLock<SchemaValidator>,
}

impl std::fmt::Debug for SchemaRecordValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchemaRecordValidator")
            .finish_non_exhaustive()
    }
}

impl SchemaRecordValidator {
    /// Wraps a schema validator.
    pub fn new(schema: SchemaValidator) -> Self {
        Self {
            schema: RwLock::new(schema),
        }
    }

    fn schema(&self) -> std::sync::RwLockReadGuard<'_, SchemaValidator> {
        self.schema
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl From<SchemaValidator> for SchemaRecordValidator {
    fn from(schema: SchemaValidator) -> Self {
        Self::new(schema)
    }
}

impl RecordValidator for SchemaRecordValidator {
    fn validate(&self, record: &DhtRecord) -> Result<(), ValidationError> {
        self.schema()
            .validate(&record.key, record.subkey.as_deref(), &record.value)
            .map_err(ValidationError::Schema)
    }

    fn priority(&self) -> i32 {
        0
    }

    fn merge_with(&self, other: &dyn RecordValidator) -> bool {
        let Some(other) = other.as_any().downcast_ref::<Self>() else {
            return false;
        };
        if std::ptr::eq(self, other) {
            return true;
        }
        let theirs = other.schema().clone();
        self.schema
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .merge(theirs);
        true
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, sync::Arc};

    use colony_schema::{OwnerKey, to_msgpack};
    use serde::{Deserialize, Serialize};
    use validator::Validate;

    use super::*;
    use crate::{CompositeValidator, Ed25519SignatureValidator};

    #[derive(Debug, Default, Serialize, Deserialize, Validate)]
    #[serde(default, deny_unknown_fields)]
    struct A {
        progress: BTreeMap<OwnerKey, Option<u64>>,
    }

    #[derive(Debug, Default, Serialize, Deserialize, Validate)]
    #[serde(default, deny_unknown_fields)]
    struct B {
        step: Option<u64>,
    }

    #[test]
    fn runs_after_signatures_on_stripped_values_and_merges() {
        let signer = Ed25519SignatureValidator::new(&[3; 32]);
        let mut pipeline = CompositeValidator::new();
        pipeline.extend(Arc::new(SchemaRecordValidator::new(
            SchemaValidator::for_schema::<A>(Some("run")).unwrap(),
        )));
        pipeline.extend(Arc::new(Ed25519SignatureValidator::new(&[3; 32])));
        pipeline.extend(Arc::new(SchemaRecordValidator::new(
            SchemaValidator::for_schema::<B>(Some("run")).unwrap(),
        )));
        assert_eq!(pipeline.len(), 2, "schemas merged, one signature validator");

        let mut record = DhtRecord {
            key: b"run_progress".to_vec(),
            subkey: Some(signer.owner_marker()),
            value: to_msgpack(&7u64).unwrap(),
            expiration: 1e9,
        };
        record.value = pipeline.sign_value(&record).unwrap();
        pipeline.validate(&record).unwrap();
        assert_eq!(pipeline.strip_value(&record), to_msgpack(&7u64).unwrap());

        let step = DhtRecord {
            key: b"run_step".to_vec(),
            subkey: None,
            value: to_msgpack(&"seven").unwrap(),
            expiration: 1e9,
        };
        assert!(matches!(
            pipeline.validate(&step),
            Err(ValidationError::Schema(_))
        ));
        let step = DhtRecord {
            value: to_msgpack(&7u64).unwrap(),
            ..step
        };
        pipeline.validate(&step).unwrap();
    }
}
