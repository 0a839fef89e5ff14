//! [`SchemaValidator`]: maps DHT keys to schema fields and validates records.

use std::fmt;

use rmpv::Value;
use serde::de::DeserializeOwned;
use validator::Validate;

use crate::{
    checked::{first_violation, render_path, to_schema_error},
    error::SchemaError,
    probe::{FieldKind, field_kind, field_names},
    strict::{StrictDeserializer, decode_value},
};

/// Default limit on the size of one record value: 1 MiB.
pub const DEFAULT_MAX_VALUE_SIZE: usize = 1 << 20;

type CheckFn = fn(&Value, &'static str, Option<&str>) -> Result<(), SchemaError>;

/// Validates DHT records against one or more schemas.
///
/// A schema is a Rust struct deriving `serde::Deserialize` and
/// `validator::Validate`, marked `#[serde(default, deny_unknown_fields)]` (a
/// record carries one field at a time; the others take their defaults). Each
/// field `f` is stored under the DHT key `{prefix}_{f}` (or `f` without a
/// prefix). A field whose type is a map (`BTreeMap<OwnerKey, Option<..>>`)
/// is a *dictionary*: each record is one entry, with the DHT subkey as the
/// map key and the record value as the map value. Any other field holds a
/// plain value and takes no subkey.
///
/// Values are decoded strictly (see [`crate::strict`]): no coercion between
/// integers, floats, booleans, strings and bytes; unknown fields are
/// rejected; non-finite floats are rejected. Nested records wrapped in
/// [`Checked`](crate::Checked) have their `validator` constraints enforced,
/// and the schema's own `validate()` runs last.
///
/// # Examples
///
/// ```
/// use std::collections::BTreeMap;
///
/// use colony_schema::{Checked, OwnerKey, SchemaValidator, to_msgpack};
/// use serde::{Deserialize, Serialize};
/// use validator::Validate;
///
/// #[derive(Debug, Serialize, Deserialize, Validate)]
/// #[serde(deny_unknown_fields)]
/// struct Progress {
///     #[validate(range(min = 0))]
///     samples: i64,
/// }
///
/// #[derive(Debug, Default, Serialize, Deserialize, Validate)]
/// #[serde(default, deny_unknown_fields)]
/// struct RunSchema {
///     progress: BTreeMap<OwnerKey, Option<Checked<Progress>>>,
/// }
///
/// let validator = SchemaValidator::for_schema::<RunSchema>(Some("run")).unwrap();
/// let subkey = OwnerKey::from_bytes([1; 32]).marker();
/// let good = to_msgpack(&Progress { samples: 3 }).unwrap();
/// let bad = to_msgpack(&Progress { samples: -3 }).unwrap();
/// assert!(validator.validate(b"run_progress", Some(&subkey), &good).is_ok());
/// assert!(validator.validate(b"run_progress", Some(&subkey), &bad).is_err());
/// // a peer's goodbye: nil
/// assert!(validator.validate(b"run_progress", Some(&subkey), &[0xc0]).is_ok());
/// ```
#[derive(Clone)]
pub struct SchemaValidator {
    schemas: Vec<RegisteredSchema>,
    allow_extra_keys: bool,
    max_value_size: usize,
}

#[derive(Clone)]
struct RegisteredSchema {
    name: &'static str,
    fields: Vec<FieldSpec>,
    check: CheckFn,
}

#[derive(Clone)]
struct FieldSpec {
    name: &'static str,
    key: Vec<u8>,
    kind: FieldKind,
}

impl SchemaValidator {
    /// A validator for schema `S`, whose fields live under keys
    /// `{prefix}_{field}` (or `{field}` when `prefix` is `None`).
    ///
    /// Keys outside the schema are allowed (other subsystems share the DHT);
    /// see [`allow_extra_keys`](Self::allow_extra_keys).
    ///
    /// # Errors
    ///
    /// [`SchemaError::Definition`] if `S` is not a struct with named fields.
    pub fn for_schema<S>(prefix: Option<&str>) -> Result<Self, SchemaError>
    where
        S: DeserializeOwned + Validate,
    {
        let names = field_names::<S>().map_err(|reason| SchemaError::Definition { reason })?;
        let fields = names
            .iter()
            .map(|&name| FieldSpec {
                name,
                key: match prefix {
                    Some(p) => format!("{p}_{name}").into_bytes(),
                    None => name.as_bytes().to_vec(),
                },
                kind: field_kind::<S>(name),
            })
            .collect();
        Ok(Self {
            schemas: vec![RegisteredSchema {
                name: std::any::type_name::<S>(),
                fields,
                check: check_schema::<S>,
            }],
            allow_extra_keys: true,
            max_value_size: DEFAULT_MAX_VALUE_SIZE,
        })
    }

    /// Whether keys that no schema describes are accepted (default `true`).
    pub fn allow_extra_keys(mut self, allow: bool) -> Self {
        self.allow_extra_keys = allow;
        self
    }

    /// Largest accepted value in bytes (default [`DEFAULT_MAX_VALUE_SIZE`]).
    pub fn max_value_size(mut self, bytes: usize) -> Self {
        self.max_value_size = bytes;
        self
    }

    /// Adds `other`'s schemas to this validator (the reference's
    /// `merge_with`). A record is accepted if any schema that describes its
    /// key accepts it; extra keys are allowed if either validator allowed
    /// them; the size limit is the larger of the two.
    pub fn merge(&mut self, other: SchemaValidator) {
        self.schemas.extend(other.schemas);
        self.allow_extra_keys |= other.allow_extra_keys;
        self.max_value_size = self.max_value_size.max(other.max_value_size);
    }

    /// Whether some schema describes `key`.
    pub fn describes(&self, key: &[u8]) -> bool {
        self.schemas
            .iter()
            .any(|s| s.fields.iter().any(|f| f.key == key))
    }

    /// The field kind of `key` in the first schema that describes it.
    pub fn field_kind(&self, key: &[u8]) -> Option<FieldKind> {
        self.schemas
            .iter()
            .flat_map(|s| &s.fields)
            .find(|f| f.key == key)
            .map(|f| f.kind)
    }

    /// Validates one record: `value` (MessagePack) stored under `key`, in
    /// dictionary entry `subkey` if given.
    ///
    /// # Errors
    ///
    /// [`SchemaError::TooLarge`], [`SchemaError::Malformed`],
    /// [`SchemaError::UnknownKey`] (when extra keys are refused),
    /// [`SchemaError::SubkeyMismatch`], [`SchemaError::InvalidValue`] or
    /// [`SchemaError::Constraint`]; when several schemas describe the key and
    /// all refuse, the first schema's error is returned.
    pub fn validate(
        &self,
        key: &[u8],
        subkey: Option<&[u8]>,
        value: &[u8],
    ) -> Result<(), SchemaError> {
        if value.len() > self.max_value_size {
            return Err(SchemaError::TooLarge {
                size: value.len(),
                limit: self.max_value_size,
            });
        }
        let mut matches = self
            .schemas
            .iter()
            .filter_map(|s| s.fields.iter().find(|f| f.key == key).map(|f| (s, f)))
            .peekable();
        if matches.peek().is_none() {
            return if self.allow_extra_keys {
                Ok(())
            } else {
                Err(SchemaError::UnknownKey {
                    key: String::from_utf8_lossy(key).into_owned(),
                })
            };
        }
        let decoded = decode_value(value)?;
        let mut first_error = None;
        for (schema, field) in matches {
            match check_field(schema, field, subkey, &decoded) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::debug!(schema = schema.name, field = field.name, error = %e, "schema refused record");
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or(SchemaError::Definition {
            reason: "no schema matched".into(),
        }))
    }
}

fn check_field(
    schema: &RegisteredSchema,
    field: &FieldSpec,
    subkey: Option<&[u8]>,
    value: &Value,
) -> Result<(), SchemaError> {
    let field_name = Value::from(field.name);
    match (field.kind, subkey) {
        (FieldKind::Regular, None) => {
            let record = Value::Map(vec![(field_name, value.clone())]);
            (schema.check)(&record, field.name, None)
        }
        (FieldKind::Dictionary, Some(subkey)) => {
            let entry = Value::Map(vec![(Value::Binary(subkey.to_vec()), value.clone())]);
            let record = Value::Map(vec![(field_name, entry)]);
            (schema.check)(&record, field.name, Some(&display_subkey(subkey)))
        }
        (FieldKind::Regular, Some(_)) => Err(SchemaError::SubkeyMismatch {
            field: field.name.into(),
            reason: "this field holds a plain value and takes no subkey".into(),
        }),
        (FieldKind::Dictionary, None) => Err(SchemaError::SubkeyMismatch {
            field: field.name.into(),
            reason: "this field is a dictionary: store each entry under a subkey".into(),
        }),
    }
}

fn check_schema<S: DeserializeOwned + Validate>(
    record: &Value,
    field: &'static str,
    subkey: Option<&str>,
) -> Result<(), SchemaError> {
    let parsed: S = serde_path_to_error::deserialize(StrictDeserializer::new(record))
        .map_err(|e| to_schema_error(subkey, e.path(), &e.inner().0))?;
    let Err(mut errors) = parsed.validate() else {
        return Ok(());
    };
    // The record sets one field; the others hold defaults that may well
    // break their own constraints (the reference makes every field optional
    // for the same reason). Judge only the field this record carries.
    errors.0.retain(|name, _| name.as_ref() == field);
    if errors.0.is_empty() {
        return Ok(());
    }
    let v = first_violation(&errors);
    Err(SchemaError::Constraint {
        path: render_path(&v.path),
        constraint: v.code,
        reason: v.reason,
    })
}

/// A short printable form of a subkey for error paths.
fn display_subkey(subkey: &[u8]) -> String {
    const MAX: usize = 96;
    let shown = &subkey[..subkey.len().min(MAX)];
    let mut out = if shown.iter().all(|b| b.is_ascii_graphic() || *b == b' ') {
        String::from_utf8_lossy(shown).into_owned()
    } else {
        format!("0x{}", hex::encode(shown))
    };
    if subkey.len() > MAX {
        out.push('…');
    }
    out
}

impl fmt::Debug for SchemaValidator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        for schema in &self.schemas {
            for field in &schema.fields {
                list.entry(&format_args!(
                    "{} ({:?}, {})",
                    String::from_utf8_lossy(&field.key),
                    field.kind,
                    schema.name
                ));
            }
        }
        list.finish()
    }
}
