//! Typed errors of schema validation.

use thiserror::Error;

/// Why a record (or a MessagePack value) was rejected.
///
/// Every variant that concerns a field carries `path`, the location of the
/// offending value written as `field[subkey].nested_field[index]`, so a log line
/// says exactly which part of a peer's record was wrong.
#[derive(Debug, Clone, PartialEq, Error)]
#[non_exhaustive]
pub enum SchemaError {
    /// The bytes are not one well-formed MessagePack value (truncated, invalid
    /// marker, trailing bytes, invalid UTF-8 in a string, nesting too deep).
    #[error("malformed MessagePack: {reason}")]
    Malformed {
        /// What the decoder found wrong.
        reason: String,
    },
    /// The value is larger than the validator accepts.
    #[error("value of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Size of the value in bytes.
        size: usize,
        /// The configured limit in bytes.
        limit: usize,
    },
    /// The key is not described by any registered schema and extra keys are
    /// not allowed.
    #[error("key {key:?} is not described by any schema")]
    UnknownKey {
        /// The key, lossily decoded as UTF-8.
        key: String,
    },
    /// A subkey was given for a field that holds a plain value, or no subkey
    /// for a field that holds a dictionary.
    #[error("field `{field}`: {reason}")]
    SubkeyMismatch {
        /// The schema field the key maps to.
        field: String,
        /// What was wrong.
        reason: String,
    },
    /// A value has the wrong type, a required field is missing, an unknown
    /// field is present, a float is not finite, or a subkey lacks an owner key.
    #[error("`{path}`: {reason}")]
    InvalidValue {
        /// Where the offending value sits.
        path: String,
        /// What was wrong, in serde's words (e.g. "invalid type: integer `3`, expected f64").
        reason: String,
    },
    /// A value has the right type but violates a declared constraint (e.g. `ge = 0`).
    #[error("`{path}`: constraint `{constraint}` violated: {reason}")]
    Constraint {
        /// Where the offending value sits.
        path: String,
        /// The constraint's name, e.g. `range`.
        constraint: String,
        /// Details, e.g. "must be >= 0, got -1".
        reason: String,
    },
    /// The schema type itself cannot be used (for example it is not a struct).
    #[error("invalid schema definition: {reason}")]
    Definition {
        /// What is wrong with the schema type.
        reason: String,
    },
    /// A value could not be encoded to MessagePack.
    #[error("cannot encode value: {reason}")]
    Encode {
        /// The encoder's message.
        reason: String,
    },
}

impl SchemaError {
    /// The path of the offending value, when the error concerns one
    /// (`progress[<subkey>].samples_accumulated`).
    pub fn path(&self) -> Option<&str> {
        match self {
            Self::InvalidValue { path, .. } | Self::Constraint { path, .. } => Some(path),
            Self::SubkeyMismatch { field, .. } => Some(field),
            _ => None,
        }
    }
}

/// Why bytes do not name exactly one valid owner.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum OwnerKeyError {
    /// An `[owner:` marker is present but is not `[owner:ed25519:<64 hex>]`.
    #[error("malformed owner marker at byte {offset}")]
    Malformed {
        /// Offset of the marker's first byte.
        offset: usize,
    },
    /// The bytes name more than one distinct owner.
    #[error("bytes name {count} distinct owners; at most one is allowed")]
    SeveralOwners {
        /// How many distinct owners were found.
        count: usize,
    },
    /// The bytes carry no owner marker where one is required.
    #[error("no owner marker `[owner:ed25519:<hex>]` present")]
    Missing,
}
