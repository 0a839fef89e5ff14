//! [`Checked`]: a value whose declared constraints are enforced while it is
//! decoded, and the conversion of decoder errors into [`SchemaError`]s.

use std::{
    borrow::Cow,
    fmt,
    ops::{Deref, DerefMut},
};

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};
use serde_path_to_error::{Path, Segment};
use validator::{Validate, ValidationErrors, ValidationErrorsKind};

use crate::error::SchemaError;

/// Separates the parts of a constraint failure smuggled through serde's
/// string-only custom errors.
const UNIT_SEPARATOR: char = '\u{1f}';
const CONSTRAINT_TAG: &str = "\u{1f}constraint\u{1f}";

/// A `T` whose [`validator`] constraints are checked as soon as it is
/// deserialized.
///
/// serde decodes types; `validator`'s derive checks constraints such as
/// `#[validate(range(min = 0))]`. Wrapping a record type in `Checked` joins
/// the two, so a constraint broken deep inside a dictionary of records is
/// reported with its full path (`progress[<subkey>].samples_per_second`).
/// It serializes exactly as `T` does.
///
/// # Examples
///
/// ```
/// use colony_schema::{Checked, from_msgpack_strict, to_msgpack};
/// use serde::{Deserialize, Serialize};
/// use validator::Validate;
///
/// #[derive(Debug, Serialize, Deserialize, Validate)]
/// #[serde(deny_unknown_fields)]
/// struct Rate {
///     #[validate(range(min = 0.0))]
///     per_second: f64,
/// }
///
/// let ok = to_msgpack(&Rate { per_second: 2.5 }).unwrap();
/// assert_eq!(from_msgpack_strict::<Checked<Rate>>(&ok).unwrap().per_second, 2.5);
/// let bad = to_msgpack(&Rate { per_second: -1.0 }).unwrap();
/// assert!(from_msgpack_strict::<Checked<Rate>>(&bad).is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Checked<T>(pub T);

impl<T> Checked<T> {
    /// Unwraps the checked value.
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> Deref for Checked<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> DerefMut for Checked<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}

impl<T> From<T> for Checked<T> {
    fn from(value: T) -> Self {
        Self(value)
    }
}

impl<T: Serialize> Serialize for Checked<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de, T: Deserialize<'de> + Validate> Deserialize<'de> for Checked<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let value = T::deserialize(deserializer)?;
        match value.validate() {
            Ok(()) => Ok(Self(value)),
            Err(errors) => Err(de::Error::custom(encode_constraint(&first_violation(
                &errors,
            )))),
        }
    }
}

/// One constraint violation: relative path, constraint code, reason.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Violation {
    pub(crate) path: Vec<String>,
    pub(crate) code: String,
    pub(crate) reason: String,
}

/// The first violation in a deterministic (sorted) order.
pub(crate) fn first_violation(errors: &ValidationErrors) -> Violation {
    let mut names: Vec<&Cow<'static, str>> = errors.errors().keys().collect();
    names.sort();
    for name in names {
        let Some(kind) = errors.errors().get(name) else {
            continue;
        };
        let segment = name.to_string();
        match kind {
            ValidationErrorsKind::Field(list) => {
                if let Some(err) = list.first() {
                    return Violation {
                        path: vec![segment],
                        code: err.code.to_string(),
                        reason: describe(err),
                    };
                }
            }
            ValidationErrorsKind::Struct(inner) => {
                let mut v = first_violation(inner);
                v.path.insert(0, segment);
                return v;
            }
            ValidationErrorsKind::List(items) => {
                if let Some((index, inner)) = items.iter().next() {
                    let mut v = first_violation(inner);
                    v.path.insert(0, format!("[{index}]"));
                    v.path.insert(0, segment);
                    return v;
                }
            }
        }
    }
    Violation {
        path: Vec::new(),
        code: "unknown".into(),
        reason: "validation failed".into(),
    }
}

fn describe(err: &validator::ValidationError) -> String {
    if let Some(message) = &err.message {
        return message.to_string();
    }
    let mut params: Vec<(&Cow<'static, str>, &serde_json::Value)> = err.params.iter().collect();
    params.sort_by(|a, b| a.0.cmp(b.0));
    let value = params
        .iter()
        .find(|(k, _)| k.as_ref() == "value")
        .map(|(_, v)| v.to_string());
    let bounds: Vec<String> = params
        .iter()
        .filter_map(|(k, v)| match k.as_ref() {
            "min" => Some(format!(">= {v}")),
            "max" => Some(format!("<= {v}")),
            "exclusive_min" => Some(format!("> {v}")),
            "exclusive_max" => Some(format!("< {v}")),
            "value" => None,
            other => Some(format!("{other} = {v}")),
        })
        .collect();
    match (bounds.is_empty(), value) {
        (false, Some(v)) => format!("must be {}, got {v}", bounds.join(" and ")),
        (false, None) => format!("must be {}", bounds.join(" and ")),
        (true, Some(v)) => format!("got {v}"),
        (true, None) => "invalid value".into(),
    }
}

fn encode_constraint(v: &Violation) -> String {
    format!(
        "{CONSTRAINT_TAG}{}{UNIT_SEPARATOR}{}{UNIT_SEPARATOR}{}",
        v.path.join("."),
        v.code,
        v.reason
    )
}

fn decode_constraint(message: &str) -> Option<Violation> {
    let rest = message.strip_prefix(CONSTRAINT_TAG)?;
    let mut parts = rest.splitn(3, UNIT_SEPARATOR);
    let path = parts.next()?;
    let code = parts.next()?;
    let reason = parts.next()?;
    Some(Violation {
        path: path
            .split('.')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        code: code.to_owned(),
        reason: reason.to_owned(),
    })
}

/// Renders a path: `field[subkey].inner[3]`.
pub(crate) fn render_path(segments: &[String]) -> String {
    let mut out = String::new();
    for seg in segments {
        if seg.starts_with('[') || out.is_empty() {
            out.push_str(seg);
        } else {
            out.push('.');
            out.push_str(seg);
        }
    }
    if out.is_empty() { "<root>".into() } else { out }
}

/// Converts a deserialization failure at `path` into a [`SchemaError`].
///
/// `subkey`, when given, names the dictionary entry that sits at the second
/// path segment (the decoder only sees it as an opaque map key).
pub(crate) fn to_schema_error(subkey: Option<&str>, path: &Path, message: &str) -> SchemaError {
    let mut segments: Vec<String> = Vec::new();
    for (i, segment) in path.iter().enumerate() {
        match (segment, subkey) {
            (_, Some(s)) if i == 1 => segments.push(format!("[{s}]")),
            (Segment::Map { key }, _) => segments.push(key.clone()),
            (Segment::Seq { index }, _) => segments.push(format!("[{index}]")),
            (Segment::Enum { variant }, _) => segments.push(variant.clone()),
            (Segment::Unknown, _) => segments.push("[?]".into()),
        }
    }
    if let Some(violation) = decode_constraint(message) {
        segments.extend(violation.path);
        return SchemaError::Constraint {
            path: render_path(&segments),
            constraint: violation.code,
            reason: violation.reason,
        };
    }
    // serde names a missing or unknown field only in its message; put it in
    // the path so callers can match on it.
    for tag in ["missing field `", "unknown field `"] {
        if let Some(name) = message
            .strip_prefix(tag)
            .and_then(|rest| rest.split('`').next())
        {
            segments.push(name.to_owned());
        }
    }
    SchemaError::InvalidValue {
        path: render_path(&segments),
        reason: message.to_owned(),
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} ({})",
            render_path(&self.path),
            self.reason,
            self.code
        )
    }
}
