//! Strict MessagePack decoding: a serde [`Deserializer`] over a decoded
//! [`rmpv::Value`] that never coerces between types.
//!
//! serde's own visitors are lenient: `f64` accepts integers, `String` accepts
//! UTF-8 bytes, and rmp-serde forwards everything through `deserialize_any`.
//! Here each typed request only accepts the matching MessagePack family:
//!
//! | Rust type asks for | accepted MessagePack |
//! |---|---|
//! | `bool` | `true` / `false` |
//! | any integer | int (range-checked by serde: `-1` is not a `u64`) |
//! | `f32` / `f64` | float32 / float64, **finite only** |
//! | `String` / `&str` / `char` | str (valid UTF-8) |
//! | bytes (`serde_bytes`, [`OwnerKey`](crate::OwnerKey)) | bin |
//! | `Option<T>` | nil, or whatever `T` accepts |
//! | `()` / unit struct | nil |
//! | sequences, tuples | array (tuples: exact length) |
//! | maps | map |
//! | structs | map with str keys (arrays are refused so fields are named) |
//!
//! Non-finite floats are refused everywhere: no record that peers exchange
//! needs NaN or infinity, and refusing them at the decoder makes every range
//! constraint sound (`NaN >= 0` would otherwise pass a check written as
//! `!(x < 0)`).
//!
//! Decoding is bounded: input size is checked by the caller, nesting depth is
//! capped at [`MAX_DEPTH`], and the decoder never pre-allocates from a
//! declared length, so hostile bytes cost at most a constant factor of their
//! own size.

use std::fmt;

use rmpv::Value;
use serde::de::{
    self, DeserializeOwned, DeserializeSeed, Deserializer, EnumAccess, IntoDeserializer, MapAccess,
    SeqAccess, VariantAccess, Visitor,
};

use crate::error::SchemaError;

/// Maximum nesting depth of a decoded value.
pub const MAX_DEPTH: usize = 32;

/// The deserializer's error: a message, turned into a [`SchemaError`] with
/// its path by the caller.
#[derive(Debug, Clone, PartialEq)]
pub struct StrictError(pub(crate) String);

impl fmt::Display for StrictError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StrictError {}

impl de::Error for StrictError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Self(msg.to_string())
    }
}

/// Decodes exactly one MessagePack value from `bytes`.
///
/// # Errors
///
/// [`SchemaError::Malformed`] on truncated input, invalid markers, nesting
/// deeper than [`MAX_DEPTH`], strings that are not UTF-8, or trailing bytes.
pub fn decode_value(bytes: &[u8]) -> Result<Value, SchemaError> {
    let mut rest = bytes;
    let value = rmpv::decode::read_value_with_max_depth(&mut rest, MAX_DEPTH).map_err(|e| {
        SchemaError::Malformed {
            reason: e.to_string(),
        }
    })?;
    if !rest.is_empty() {
        return Err(SchemaError::Malformed {
            reason: format!("{} trailing bytes after the value", rest.len()),
        });
    }
    // rmpv reads the reserved marker 0xc1 as nil; MessagePack says it is
    // never used, and rmp-serde refuses it, so a value holding one must not
    // pass as nil (a goodbye) here while other readers reject it.
    if has_reserved_marker(bytes) {
        return Err(SchemaError::Malformed {
            reason: "reserved marker 0xc1".into(),
        });
    }
    check_utf8(&value)?;
    Ok(value)
}

/// Whether the MessagePack value in `bytes` (already decoded by rmpv, so
/// well formed apart from this) holds the reserved marker 0xc1 anywhere a
/// marker goes. Walks the markers iteratively, skipping payloads; a walk
/// that runs off the end counts as holding one (it cannot, for bytes rmpv
/// decoded).
fn has_reserved_marker(bytes: &[u8]) -> bool {
    let be = |at: usize, n: usize| -> Option<u64> {
        let b = bytes.get(at..at + n)?;
        Some(b.iter().fold(0u64, |acc, &x| acc << 8 | u64::from(x)))
    };
    // Values still to read, and the position of the next marker.
    let mut pending: u64 = 1;
    let mut at = 0usize;
    while pending > 0 {
        pending -= 1;
        let Some(&marker) = bytes.get(at) else {
            return true;
        };
        at += 1;
        // (bytes of fixed payload, bytes of a length field, bytes per unit of length)
        let (skip, len_bytes, per_len): (usize, usize, u64) = match marker {
            0x00..=0x7f | 0xc0 | 0xc2 | 0xc3 | 0xe0..=0xff => (0, 0, 0),
            0x80..=0x8f => {
                pending += 2 * u64::from(marker & 0x0f);
                (0, 0, 0)
            }
            0x90..=0x9f => {
                pending += u64::from(marker & 0x0f);
                (0, 0, 0)
            }
            0xa0..=0xbf => (usize::from(marker & 0x1f), 0, 0),
            0xc1 => return true,
            0xc4 | 0xd9 => (0, 1, 1),
            0xc5 | 0xda => (0, 2, 1),
            0xc6 | 0xdb => (0, 4, 1),
            // ext 8/16/32: length, type byte, data.
            0xc7 => (1, 1, 1),
            0xc8 => (1, 2, 1),
            0xc9 => (1, 4, 1),
            0xca => (4, 0, 0),
            0xcb => (8, 0, 0),
            0xcc | 0xd0 => (1, 0, 0),
            0xcd | 0xd1 => (2, 0, 0),
            0xce | 0xd2 => (4, 0, 0),
            0xcf | 0xd3 => (8, 0, 0),
            // fixext 1/2/4/8/16: type byte and data.
            0xd4 => (2, 0, 0),
            0xd5 => (3, 0, 0),
            0xd6 => (5, 0, 0),
            0xd7 => (9, 0, 0),
            0xd8 => (17, 0, 0),
            0xdc => (0, 2, 0),
            0xdd => (0, 4, 0),
            0xde => (0, 2, 0),
            0xdf => (0, 4, 0),
        };
        let len = if len_bytes > 0 {
            let Some(len) = be(at, len_bytes) else {
                return true;
            };
            at += len_bytes;
            len
        } else {
            0
        };
        match marker {
            0xdc | 0xdd => pending += len,
            0xde | 0xdf => pending += 2 * len,
            _ => {}
        }
        let Some(next) = usize::try_from(len * per_len)
            .ok()
            .and_then(|n| at.checked_add(n)?.checked_add(skip))
        else {
            return true;
        };
        at = next;
    }
    false
}

fn check_utf8(value: &Value) -> Result<(), SchemaError> {
    match value {
        Value::String(s) if s.as_str().is_none() => Err(SchemaError::Malformed {
            reason: "string is not valid UTF-8".into(),
        }),
        Value::Array(items) => items.iter().try_for_each(check_utf8),
        Value::Map(entries) => entries.iter().try_for_each(|(k, v)| {
            check_utf8(k)?;
            check_utf8(v)
        }),
        _ => Ok(()),
    }
}

/// Strictly decodes `T` from MessagePack bytes (see the [module docs](self)).
///
/// This checks types and shapes only; use [`Checked`](crate::Checked) or a
/// [`SchemaValidator`](crate::SchemaValidator) to enforce constraints too.
///
/// # Errors
///
/// [`SchemaError::Malformed`] for undecodable bytes, [`SchemaError::InvalidValue`]
/// (with the path of the offending value) for type mismatches, missing or
/// unknown fields and non-finite floats, and [`SchemaError::Constraint`] for a
/// [`Checked`](crate::Checked) value that breaks its constraints.
pub fn from_msgpack_strict<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, SchemaError> {
    let value = decode_value(bytes)?;
    serde_path_to_error::deserialize(StrictDeserializer::new(&value))
        .map_err(|e| crate::checked::to_schema_error(None, e.path(), &e.inner().0))
}

/// Encodes `value` as MessagePack with named struct fields, the form the
/// strict decoder accepts.
///
/// # Errors
///
/// [`SchemaError::Encode`] if serialization fails (for example a map with
/// non-serializable keys).
pub fn to_msgpack<T: serde::Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, SchemaError> {
    rmp_serde::to_vec_named(value).map_err(|e| SchemaError::Encode {
        reason: e.to_string(),
    })
}

/// A serde deserializer over a borrowed [`Value`] that refuses coercions.
#[derive(Clone, Copy)]
pub(crate) struct StrictDeserializer<'a> {
    value: &'a Value,
}

impl<'a> StrictDeserializer<'a> {
    pub(crate) fn new(value: &'a Value) -> Self {
        Self { value }
    }

    fn unexpected(&self) -> de::Unexpected<'a> {
        match self.value {
            Value::Nil => de::Unexpected::Unit,
            Value::Boolean(b) => de::Unexpected::Bool(*b),
            Value::Integer(i) => match (i.as_i64(), i.as_u64()) {
                (Some(v), _) => de::Unexpected::Signed(v),
                (None, Some(v)) => de::Unexpected::Unsigned(v),
                _ => de::Unexpected::Other("integer"),
            },
            Value::F32(f) => de::Unexpected::Float(f64::from(*f)),
            Value::F64(f) => de::Unexpected::Float(*f),
            Value::String(s) => de::Unexpected::Str(s.as_str().unwrap_or("<invalid utf-8>")),
            Value::Binary(b) => de::Unexpected::Bytes(b),
            Value::Array(_) => de::Unexpected::Seq,
            Value::Map(_) => de::Unexpected::Map,
            Value::Ext(..) => de::Unexpected::Other("extension type"),
        }
    }

    fn invalid_type<V: Visitor<'a>>(&self, visitor: &V) -> StrictError {
        de::Error::invalid_type(self.unexpected(), visitor)
    }

    fn integer<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, StrictError> {
        match self.value {
            Value::Integer(i) => match (i.as_u64(), i.as_i64()) {
                (Some(u), _) => visitor.visit_u64(u),
                (None, Some(s)) => visitor.visit_i64(s),
                _ => Err(self.invalid_type(&visitor)),
            },
            _ => Err(self.invalid_type(&visitor)),
        }
    }

    fn float(&self) -> Result<Option<f64>, StrictError> {
        let f = match self.value {
            Value::F32(f) => f64::from(*f),
            Value::F64(f) => *f,
            _ => return Ok(None),
        };
        if f.is_finite() {
            Ok(Some(f))
        } else {
            Err(StrictError(format!(
                "non-finite float `{f}` is not allowed"
            )))
        }
    }

    fn str(&self) -> Option<&'a str> {
        match self.value {
            Value::String(s) => s.as_str(),
            _ => None,
        }
    }
}

macro_rules! strict_integers {
    ($($method:ident)*) => {$(
        fn $method<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, StrictError> {
            self.integer(visitor)
        }
    )*};
}

impl<'a> Deserializer<'a> for StrictDeserializer<'a> {
    type Error = StrictError;

    fn deserialize_any<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, StrictError> {
        match self.value {
            Value::Nil => visitor.visit_unit(),
            Value::Boolean(b) => visitor.visit_bool(*b),
            Value::Integer(_) => self.integer(visitor),
            Value::F32(_) | Value::F64(_) => match self.float()? {
                Some(f) => visitor.visit_f64(f),
                None => Err(self.invalid_type(&visitor)),
            },
            Value::String(_) => match self.str() {
                Some(s) => visitor.visit_borrowed_str(s),
                None => Err(self.invalid_type(&visitor)),
            },
            Value::Binary(b) => visitor.visit_borrowed_bytes(b),
            Value::Array(items) => visitor.visit_seq(Seq { iter: items.iter() }),
            Value::Map(entries) => visitor.visit_map(Map {
                iter: entries.iter(),
                value: None,
            }),
            Value::Ext(..) => Err(StrictError(
                "MessagePack extension types are not allowed".into(),
            )),
        }
    }

    fn deserialize_bool<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, StrictError> {
        match self.value {
            Value::Boolean(b) => visitor.visit_bool(*b),
            _ => Err(self.invalid_type(&visitor)),
        }
    }

    strict_integers!(
        deserialize_i8 deserialize_i16 deserialize_i32 deserialize_i64 deserialize_i128
        deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64 deserialize_u128
    );

    fn deserialize_f32<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, StrictError> {
        self.deserialize_f64(visitor)
    }

    fn deserialize_f64<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, StrictError> {
        match self.float()? {
            Some(f) => visitor.visit_f64(f),
            None => Err(self.invalid_type(&visitor)),
        }
    }

    fn deserialize_char<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, StrictError> {
        match self.str() {
            Some(s) => visitor.visit_borrowed_str(s),
            None => Err(self.invalid_type(&visitor)),
        }
    }

    fn deserialize_str<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, StrictError> {
        self.deserialize_char(visitor)
    }

    fn deserialize_string<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, StrictError> {
        self.deserialize_char(visitor)
    }

    fn deserialize_bytes<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, StrictError> {
        match self.value {
            Value::Binary(b) => visitor.visit_borrowed_bytes(b),
            _ => Err(self.invalid_type(&visitor)),
        }
    }

    fn deserialize_byte_buf<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, StrictError> {
        self.deserialize_bytes(visitor)
    }

    fn deserialize_option<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, StrictError> {
        match self.value {
            Value::Nil => visitor.visit_none(),
            _ => visitor.visit_some(self),
        }
    }

    fn deserialize_unit<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, StrictError> {
        match self.value {
            Value::Nil => visitor.visit_unit(),
            _ => Err(self.invalid_type(&visitor)),
        }
    }

    fn deserialize_unit_struct<V: Visitor<'a>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, StrictError> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'a>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, StrictError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_seq<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, StrictError> {
        match self.value {
            Value::Array(items) => visitor.visit_seq(Seq { iter: items.iter() }),
            _ => Err(self.invalid_type(&visitor)),
        }
    }

    fn deserialize_tuple<V: Visitor<'a>>(
        self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, StrictError> {
        match self.value {
            Value::Array(items) if items.len() == len => {
                visitor.visit_seq(Seq { iter: items.iter() })
            }
            Value::Array(items) => Err(de::Error::invalid_length(items.len(), &visitor)),
            _ => Err(self.invalid_type(&visitor)),
        }
    }

    fn deserialize_tuple_struct<V: Visitor<'a>>(
        self,
        _name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, StrictError> {
        self.deserialize_tuple(len, visitor)
    }

    fn deserialize_map<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, StrictError> {
        match self.value {
            Value::Map(entries) => visitor.visit_map(Map {
                iter: entries.iter(),
                value: None,
            }),
            _ => Err(self.invalid_type(&visitor)),
        }
    }

    fn deserialize_struct<V: Visitor<'a>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, StrictError> {
        match self.value {
            Value::Map(entries) => {
                if let Some((key, _)) = entries.iter().find(|(k, _)| !k.is_str()) {
                    return Err(StrictError(format!(
                        "struct field names must be strings, found {}",
                        StrictDeserializer::new(key).unexpected()
                    )));
                }
                visitor.visit_map(Map {
                    iter: entries.iter(),
                    value: None,
                })
            }
            _ => Err(self.invalid_type(&visitor)),
        }
    }

    fn deserialize_enum<V: Visitor<'a>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, StrictError> {
        match self.value {
            Value::String(_) => visitor.visit_enum(Enum {
                variant: self.value,
                content: None,
            }),
            Value::Map(entries) if entries.len() == 1 => {
                let (variant, content) = &entries[0];
                visitor.visit_enum(Enum {
                    variant,
                    content: Some(content),
                })
            }
            _ => Err(self.invalid_type(&visitor)),
        }
    }

    fn deserialize_identifier<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, StrictError> {
        self.deserialize_str(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'a>>(self, visitor: V) -> Result<V::Value, StrictError> {
        visitor.visit_unit()
    }
}

struct Seq<'a> {
    iter: std::slice::Iter<'a, Value>,
}

impl<'a> SeqAccess<'a> for Seq<'a> {
    type Error = StrictError;

    fn next_element_seed<T: DeserializeSeed<'a>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, StrictError> {
        self.iter
            .next()
            .map(|v| seed.deserialize(StrictDeserializer::new(v)))
            .transpose()
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.iter.len())
    }
}

struct Map<'a> {
    iter: std::slice::Iter<'a, (Value, Value)>,
    value: Option<&'a Value>,
}

impl<'a> MapAccess<'a> for Map<'a> {
    type Error = StrictError;

    fn next_key_seed<K: DeserializeSeed<'a>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, StrictError> {
        match self.iter.next() {
            Some((k, v)) => {
                self.value = Some(v);
                seed.deserialize(StrictDeserializer::new(k)).map(Some)
            }
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'a>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, StrictError> {
        let value = self
            .value
            .take()
            .ok_or_else(|| StrictError("map value requested before its key".into()))?;
        seed.deserialize(StrictDeserializer::new(value))
    }

    fn size_hint(&self) -> Option<usize> {
        Some(self.iter.len())
    }
}

struct Enum<'a> {
    variant: &'a Value,
    content: Option<&'a Value>,
}

impl<'a> EnumAccess<'a> for Enum<'a> {
    type Error = StrictError;
    type Variant = Variant<'a>;

    fn variant_seed<V: DeserializeSeed<'a>>(
        self,
        seed: V,
    ) -> Result<(V::Value, Variant<'a>), StrictError> {
        let variant = seed.deserialize(StrictDeserializer::new(self.variant))?;
        Ok((
            variant,
            Variant {
                content: self.content,
            },
        ))
    }
}

struct Variant<'a> {
    content: Option<&'a Value>,
}

impl<'a> VariantAccess<'a> for Variant<'a> {
    type Error = StrictError;

    fn unit_variant(self) -> Result<(), StrictError> {
        match self.content {
            None | Some(Value::Nil) => Ok(()),
            Some(_) => Err(StrictError("unit variant carries content".into())),
        }
    }

    fn newtype_variant_seed<T: DeserializeSeed<'a>>(
        self,
        seed: T,
    ) -> Result<T::Value, StrictError> {
        match self.content {
            Some(v) => seed.deserialize(StrictDeserializer::new(v)),
            None => Err(StrictError("newtype variant without content".into())),
        }
    }

    fn tuple_variant<V: Visitor<'a>>(
        self,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, StrictError> {
        match self.content {
            Some(v) => StrictDeserializer::new(v).deserialize_tuple(len, visitor),
            None => Err(StrictError("tuple variant without content".into())),
        }
    }

    fn struct_variant<V: Visitor<'a>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, StrictError> {
        match self.content {
            Some(v) => StrictDeserializer::new(v).deserialize_struct("", fields, visitor),
            None => Err(StrictError("struct variant without content".into())),
        }
    }
}

impl<'a> IntoDeserializer<'a, StrictError> for StrictDeserializer<'a> {
    type Deserializer = Self;

    fn into_deserializer(self) -> Self {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserved_marker_is_not_nil() {
        assert!(decode_value(&[0xc1]).is_err());
        // Nested in an array, a map value, after a bin and an ext.
        assert!(decode_value(&[0x92, 0x01, 0xc1]).is_err());
        assert!(decode_value(&[0x81, 0xa1, b'a', 0xc1]).is_err());
        assert!(decode_value(&[0x92, 0xc4, 0x01, 0xc1, 0xc1]).is_err());
        assert!(decode_value(&[0x92, 0xd4, 0x01, 0xc1, 0xc1]).is_err());
        // 0xc1 as payload is data, not a marker.
        assert!(decode_value(&[0x92, 0xc4, 0x01, 0xc1, 0xc0]).is_ok());
        assert!(decode_value(&[0x92, 0xd4, 0x01, 0xc1, 0xc0]).is_ok());
        assert!(decode_value(&[0xdc, 0x00, 0x02, 0xcc, 0xc1, 0xc0]).is_ok());
        assert!(decode_value(&[0xc0]).is_ok());
        assert!(from_msgpack_strict::<Option<u8>>(&[0xc1]).is_err());
    }
}
