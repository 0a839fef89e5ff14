//! Discovers a schema's fields (names and whether each holds a dictionary)
//! from its serde `Deserialize` impl, so a schema is declared once, as a
//! plain Rust struct.
//!
//! serde hands the list of field names to `deserialize_struct`, and a field's
//! type announces itself through the first `deserialize_*` method it calls.
//! The probes below record that and abort the deserialization.

use std::{cell::Cell, fmt};

use serde::de::{self, DeserializeOwned, DeserializeSeed, Deserializer, MapAccess, Visitor};

/// How a schema field is stored in the DHT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    /// One value per key; records must not carry a subkey.
    Regular,
    /// A dictionary: every record carries a subkey and is one entry.
    Dictionary,
}

#[derive(Debug)]
struct ProbeError(String);

impl fmt::Display for ProbeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ProbeError {}

impl de::Error for ProbeError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        Self(msg.to_string())
    }
}

const STOP: &str = "probe finished";

/// The field names of schema `S`, which must be a struct with named fields.
pub(crate) fn field_names<S: DeserializeOwned>() -> Result<&'static [&'static str], String> {
    let found: Cell<Option<&'static [&'static str]>> = Cell::new(None);
    let _ = S::deserialize(StructProbe::Names(&found));
    found.get().ok_or_else(|| {
        format!(
            "schema `{}` must be a struct with named fields",
            std::any::type_name::<S>()
        )
    })
}

/// Whether field `field` of schema `S` holds a dictionary.
pub(crate) fn field_kind<S: DeserializeOwned>(field: &'static str) -> FieldKind {
    let kind = Cell::new(FieldKind::Regular);
    let _ = S::deserialize(StructProbe::Field { field, kind: &kind });
    kind.get()
}

/// Presents itself to the schema's `Deserialize` impl as a struct: either
/// records the field names serde passes to `deserialize_struct`, or offers a
/// map with the single key `field` whose value is a [`KindProbe`].
enum StructProbe<'p> {
    Names(&'p Cell<Option<&'static [&'static str]>>),
    Field {
        field: &'static str,
        kind: &'p Cell<FieldKind>,
    },
}

macro_rules! refuse_all {
    ($($method:ident)*) => {$(
        fn $method<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, ProbeError> {
            Err(ProbeError(STOP.into()))
        }
    )*};
}

macro_rules! refuse_rest {
    () => {
        refuse_all!(
            deserialize_any deserialize_bool deserialize_i8 deserialize_i16 deserialize_i32
            deserialize_i64 deserialize_u8 deserialize_u16 deserialize_u32 deserialize_u64
            deserialize_f32 deserialize_f64 deserialize_char deserialize_str deserialize_string
            deserialize_bytes deserialize_byte_buf deserialize_unit deserialize_seq
            deserialize_identifier deserialize_ignored_any
        );
        fn deserialize_unit_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            _visitor: V,
        ) -> Result<V::Value, ProbeError> {
            Err(ProbeError(STOP.into()))
        }
        fn deserialize_tuple<V: Visitor<'de>>(
            self,
            _len: usize,
            _visitor: V,
        ) -> Result<V::Value, ProbeError> {
            Err(ProbeError(STOP.into()))
        }
        fn deserialize_tuple_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            _len: usize,
            _visitor: V,
        ) -> Result<V::Value, ProbeError> {
            Err(ProbeError(STOP.into()))
        }
        fn deserialize_enum<V: Visitor<'de>>(
            self,
            _name: &'static str,
            _variants: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, ProbeError> {
            Err(ProbeError(STOP.into()))
        }
    };
}

impl<'de> Deserializer<'de> for StructProbe<'_> {
    type Error = ProbeError;

    refuse_rest!();
    refuse_all!(deserialize_option deserialize_map);

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _visitor: V,
    ) -> Result<V::Value, ProbeError> {
        Err(ProbeError(STOP.into()))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, ProbeError> {
        match self {
            Self::Names(found) => {
                found.set(Some(fields));
                Err(ProbeError(STOP.into()))
            }
            Self::Field { field, kind } => visitor.visit_map(OneEntry {
                field: Some(field),
                kind,
            }),
        }
    }
}

struct OneEntry<'p> {
    field: Option<&'static str>,
    kind: &'p Cell<FieldKind>,
}

impl<'de> MapAccess<'de> for OneEntry<'_> {
    type Error = ProbeError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, ProbeError> {
        match self.field.take() {
            Some(name) => seed
                .deserialize(de::value::BorrowedStrDeserializer::new(name))
                .map(Some),
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, ProbeError> {
        seed.deserialize(KindProbe { kind: self.kind })
    }
}

/// Records whether the field's type asks for a map.
struct KindProbe<'p> {
    kind: &'p Cell<FieldKind>,
}

impl<'de> Deserializer<'de> for KindProbe<'_> {
    type Error = ProbeError;

    refuse_rest!();

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, ProbeError> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, ProbeError> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_map<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, ProbeError> {
        self.kind.set(FieldKind::Dictionary);
        Err(ProbeError(STOP.into()))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, ProbeError> {
        Err(ProbeError(STOP.into()))
    }
}
