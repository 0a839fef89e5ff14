//! Record validators and the composite pipeline (reference `validation.py`).

use std::{any::Any, sync::Arc};

use serde_bytes::ByteBuf;

use crate::{
    error::ValidationError,
    record::{DhtRecord, decode_wire},
};

/// A check (and optional transformation) applied to every record.
///
/// Validators run on the node that stores a record **and** on every reader.
/// [`sign_value`](Self::sign_value) runs in ascending [`priority`](Self::priority)
/// when this node stores; [`validate`](Self::validate) runs in descending
/// priority, and after each validator but the last the value is passed through
/// its [`strip_value`](Self::strip_value), so a low-priority validator (a schema)
/// sees the value without the trailers a high-priority one (signatures) added.
pub trait RecordValidator: Send + Sync + 'static {
    /// Checks a record whose value still carries the trailers of this and every
    /// lower-priority validator.
    ///
    /// # Errors
    ///
    /// A [`ValidationError`] saying why the record is rejected.
    fn validate(&self, record: &DhtRecord) -> Result<(), ValidationError>;

    /// Returns the value to send for a record this node stores (default: unchanged).
    ///
    /// # Errors
    ///
    /// A [`ValidationError`] if the value cannot be signed.
    fn sign_value(&self, record: &DhtRecord) -> Result<Vec<u8>, ValidationError> {
        Ok(record.value.clone())
    }

    /// Removes what [`sign_value`](Self::sign_value) added (default: unchanged).
    fn strip_value(&self, record: &DhtRecord) -> Vec<u8> {
        record.value.clone()
    }

    /// Ordering: higher priority validates first and signs last. Default 0.
    fn priority(&self) -> i32 {
        0
    }

    /// Absorbs `other` if it is the same kind of validator, returning `true`
    /// (then `other` is not added separately). Default: `false`.
    fn merge_with(&self, other: &dyn RecordValidator) -> bool {
        let _ = other;
        false
    }

    /// The validator as [`Any`], so [`merge_with`](Self::merge_with) can downcast.
    fn as_any(&self) -> &dyn Any;
}

/// An ordered set of validators run as one (reference `CompositeValidator`).
#[derive(Clone, Default)]
pub struct CompositeValidator {
    // Sorted by ascending priority.
    validators: Vec<Arc<dyn RecordValidator>>,
}

impl std::fmt::Debug for CompositeValidator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let priorities: Vec<i32> = self.validators.iter().map(|v| v.priority()).collect();
        f.debug_struct("CompositeValidator")
            .field("priorities", &priorities)
            .finish()
    }
}

impl CompositeValidator {
    /// An empty pipeline (accepts everything, changes nothing).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a validator: merged into an existing one of its kind if possible,
    /// otherwise inserted by priority.
    pub fn extend(&mut self, validator: Arc<dyn RecordValidator>) {
        if self
            .validators
            .iter()
            .any(|v| v.merge_with(validator.as_ref()))
        {
            return;
        }
        self.validators.push(validator);
        self.validators.sort_by_key(|v| v.priority());
    }

    /// Number of validators.
    pub fn len(&self) -> usize {
        self.validators.len()
    }

    /// Whether the pipeline is empty.
    pub fn is_empty(&self) -> bool {
        self.validators.is_empty()
    }

    /// Signs a record: every validator's `sign_value`, in ascending priority.
    ///
    /// # Errors
    ///
    /// The first validator's error.
    pub fn sign_value(&self, record: &DhtRecord) -> Result<Vec<u8>, ValidationError> {
        let mut record = record.clone();
        for v in &self.validators {
            record.value = v.sign_value(&record)?;
        }
        Ok(record.value)
    }

    /// Validates a signed record: descending priority, stripping between steps.
    ///
    /// # Errors
    ///
    /// The first rejection.
    pub fn validate(&self, record: &DhtRecord) -> Result<(), ValidationError> {
        let mut record = record.clone();
        for (i, v) in self.validators.iter().rev().enumerate() {
            v.validate(&record)?;
            if i + 1 < self.validators.len() {
                record.value = v.strip_value(&record);
            }
        }
        Ok(())
    }

    /// Strips every validator's trailers, in descending priority.
    pub fn strip_value(&self, record: &DhtRecord) -> Vec<u8> {
        let mut record = record.clone();
        for v in self.validators.iter().rev() {
            record.value = v.strip_value(&record);
        }
        record.value
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// Appends its tag on sign, checks and strips it on validate, logs calls.
    struct Tagger {
        tag: u8,
        priority: i32,
        log: Arc<Mutex<Vec<String>>>,
    }

    impl RecordValidator for Tagger {
        fn validate(&self, record: &DhtRecord) -> Result<(), ValidationError> {
            self.log
                .lock()
                .unwrap()
                .push(format!("validate {}", self.tag));
            if record.value.last() == Some(&self.tag) {
                Ok(())
            } else {
                Err(ValidationError::Custom {
                    validator: "tagger",
                    reason: format!("missing {}", self.tag),
                })
            }
        }
        fn sign_value(&self, record: &DhtRecord) -> Result<Vec<u8>, ValidationError> {
            let mut v = record.value.clone();
            v.push(self.tag);
            Ok(v)
        }
        fn strip_value(&self, record: &DhtRecord) -> Vec<u8> {
            let mut v = record.value.clone();
            if v.last() == Some(&self.tag) {
                v.pop();
            }
            v
        }
        fn priority(&self) -> i32 {
            self.priority
        }
        fn merge_with(&self, other: &dyn RecordValidator) -> bool {
            other
                .as_any()
                .downcast_ref::<Tagger>()
                .is_some_and(|o| o.tag == self.tag)
        }
        fn as_any(&self) -> &dyn Any {
            self
        }
    }

    #[test]
    fn order_strip_and_merge() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut c = CompositeValidator::new();
        c.extend(Arc::new(Tagger {
            tag: 1,
            priority: 0,
            log: log.clone(),
        }));
        c.extend(Arc::new(Tagger {
            tag: 2,
            priority: 10,
            log: log.clone(),
        }));
        c.extend(Arc::new(Tagger {
            tag: 2,
            priority: 10,
            log: log.clone(),
        }));
        assert_eq!(c.len(), 2);
        let rec = DhtRecord {
            key: b"k".to_vec(),
            subkey: None,
            value: vec![9],
            expiration: 1.0,
        };
        let signed = c.sign_value(&rec).unwrap();
        // Low priority signs first, so the high-priority tag is outermost.
        assert_eq!(signed, vec![9, 1, 2]);
        let signed_rec = DhtRecord {
            value: signed,
            ..rec.clone()
        };
        c.validate(&signed_rec).unwrap();
        assert_eq!(*log.lock().unwrap(), vec!["validate 2", "validate 1"]);
        assert_eq!(c.strip_value(&signed_rec), vec![9]);
        assert!(
            c.validate(&DhtRecord {
                value: vec![9, 2, 1],
                ..rec
            })
            .is_err()
        );
    }
}

/// Allowance for clocks of other peers running ahead of ours, seconds.
pub(crate) const CLOCK_SLACK_S: f64 = 30.0;

/// Size and expiration limits every record passes before the validators.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RecordLimits {
    pub(crate) max_key_size: usize,
    pub(crate) max_value_size: usize,
    pub(crate) max_ttl_s: f64,
    /// What one owner may hold under one key (storage and reader merge).
    pub(crate) owner_caps: crate::storage::OwnerCaps,
}

impl RecordLimits {
    /// The limits a node with `config` applies.
    pub(crate) fn from_config(config: &crate::DhtConfig) -> Self {
        Self {
            max_key_size: config.max_key_size,
            max_value_size: config.max_value_size,
            max_ttl_s: config.max_ttl.as_secs_f64(),
            owner_caps: config.owner_caps(),
        }
    }

    /// Checks limits (key and value size, expiration window) then runs `validators`.
    pub(crate) fn check(
        &self,
        validators: &CompositeValidator,
        record: &DhtRecord,
        now: f64,
    ) -> Result<(), ValidationError> {
        if record.key.is_empty() || record.key.len() > self.max_key_size {
            return Err(ValidationError::BadKey {
                size: record.key.len(),
                limit: self.max_key_size,
            });
        }
        if let Some(subkey) = &record.subkey
            && subkey.len() > self.max_key_size
        {
            return Err(ValidationError::BadKey {
                size: subkey.len(),
                limit: self.max_key_size,
            });
        }
        if record.value.len() > self.max_value_size {
            return Err(ValidationError::ValueTooLarge {
                size: record.value.len(),
                limit: self.max_value_size,
            });
        }
        let max = now + self.max_ttl_s + CLOCK_SLACK_S;
        // NaN fails both comparisons' negation, so test the accepted window directly.
        if !(record.expiration > now && record.expiration <= max) {
            return Err(ValidationError::Expiration {
                expiration: record.expiration,
                now,
                max,
            });
        }
        validators.validate(record)
    }

    /// Decodes received wire-record `bytes` under `key` and checks every
    /// entry ([`Self::check`]); returns the entries that pass (values still
    /// signed), calling `rejected` for each one that does not.
    ///
    /// # Errors
    /// [`ValidationError::Malformed`] when `bytes` are not a wire record.
    pub(crate) fn check_wire(
        &self,
        validators: &CompositeValidator,
        key: &[u8],
        bytes: &[u8],
        now: f64,
        mut rejected: impl FnMut(&DhtRecord, &ValidationError),
    ) -> Result<Vec<DhtRecord>, ValidationError> {
        let entries = decode_wire(bytes)?;
        let mut accepted = Vec::with_capacity(entries.len());
        for entry in entries {
            let record = DhtRecord {
                key: key.to_vec(),
                subkey: entry.subkey.map(ByteBuf::into_vec),
                value: entry.value.into_vec(),
                expiration: entry.expiration,
            };
            match self.check(validators, &record, now) {
                Ok(()) => accepted.push(record),
                Err(error) => rejected(&record, &error),
            }
        }
        Ok(accepted)
    }
}
