//! `colony-schema`: strict, pydantic-like validation of the MessagePack values
//! that peers store in the DHT.
//!
//! Every value a peer receives from the swarm is untrusted. This crate turns
//! a plain Rust type into a validator for such values:
//!
//! * [`from_msgpack_strict`] decodes MessagePack into any serde type with no
//!   coercion (an integer is not a float, a string is not bytes, a bool is not
//!   an integer), bounded nesting, no pre-allocation from declared lengths,
//!   and finite floats only;
//! * [`Checked<T>`] enforces `validator` constraints (`range(min = 0)`, …) as
//!   `T` is decoded, with the offending field's path in the error;
//! * [`SchemaValidator`] maps DHT keys `{prefix}_{field}` to the fields of a
//!   schema struct and validates `(key, subkey, value)` records, including
//!   dictionary fields keyed by [`OwnerKey`] subkeys, and can merge several
//!   schemas into one validator.
//!
//! Errors are [`SchemaError`]s that name the field and say why.

mod checked;
mod error;
mod owner;
mod probe;
pub mod strict;
mod validator;

pub use crate::{
    checked::Checked,
    error::{OwnerKeyError, SchemaError},
    owner::{ED25519_MARKER_LEN, ED25519_MARKER_PREFIX, OWNER_TAG, OwnerKey},
    probe::FieldKind,
    strict::{MAX_DEPTH, decode_value, from_msgpack_strict, to_msgpack},
    validator::{DEFAULT_MAX_VALUE_SIZE, SchemaValidator},
};
