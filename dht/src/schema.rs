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
