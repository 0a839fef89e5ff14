//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`, not a
//! public API): each runs peer bytes through the functions the node runs
//! them through, so a target fuzzes production code, not a copy of it.

use std::net::IpAddr;

use crate::{
    config::DhtConfig,
    dialback::{self, MAX_ANSWER, MAX_REQUEST, PortCheck},
    record::DhtRecord,
    storage::{LocalStorage, value_to_entries},
    validation::{CompositeValidator, RecordLimits},
    value::DhtValue,
};

/// What became of one received record in [`inbound_record`].
#[derive(Debug, Clone, PartialEq)]
pub struct Inbound {
    /// Entries that passed the limits and the validators.
    pub accepted: Vec<DhtRecord>,
    /// Entries refused by the limits or a validator.
    pub rejected: usize,
    /// What the local store holds under the key afterwards (values signed).
    pub stored: Option<DhtValue>,
    /// `stored` encoded for a get answer, as the kad store serves it.
    pub served: Option<Vec<u8>>,
}

/// A kad put of wire `bytes` under `key` from a peer, at DHT time `now`, with
/// the default [`DhtConfig`] limits: decoded and checked as the node checks
/// inbound puts (`RecordLimits::check_wire`), accepted entries stored in a
/// fresh local store, and the stored value re-encoded as a get answer.
///
/// # Errors
/// The decode error for bytes that are not a wire record.
pub fn inbound_record(
    validators: &CompositeValidator,
    key: &[u8],
    bytes: &[u8],
    now: f64,
) -> Result<Inbound, crate::ValidationError> {
    let config = DhtConfig::default();
    let limits = RecordLimits::from_config(&config);
    let mut rejected = 0;
    let accepted = limits.check_wire(validators, key, bytes, now, |_, _| rejected += 1)?;
    let mut storage = LocalStorage::new(
        config.max_records,
        config.max_record_size,
        config.owner_caps(),
    );
    for r in &accepted {
        let _ = storage.store(&r.key, r.subkey.as_deref(), &r.value, r.expiration, now);
    }
    let stored = storage.get(key, now);
    let served = stored
        .as_ref()
        .map(|v| crate::encode_wire(&value_to_entries(v)));
    Ok(Inbound {
        accepted,
        rejected,
        stored,
        served,
    })
}

/// A dial-back request stream's bytes as the answering node reads them: the
/// length-prefixed frame (at most its request cap), then the ports.
///
/// # Errors
/// Why the request is refused.
pub fn dialback_request(stream: &[u8]) -> Result<Vec<u16>, String> {
    let frame = read_frame_now(stream, MAX_REQUEST)?;
    dialback::parse_request(&frame)
}

/// A dial-back answer stream's bytes as the asking node reads them, for a
/// request about `ports`.
///
/// # Errors
/// Why the answer is refused.
pub fn dialback_answer(stream: &[u8], ports: &[u16]) -> Result<(IpAddr, Vec<PortCheck>), String> {
    let frame = read_frame_now(stream, MAX_ANSWER)?;
    dialback::parse_answer(&frame, ports)
}

/// Runs the frame reader on bytes that are all there: a slice never pends,
/// so one poll finishes it.
fn read_frame_now(mut stream: &[u8], max: usize) -> Result<Vec<u8>, String> {
    futures::executor::block_on(dialback::read_frame(&mut stream, max)).map_err(|e| e.to_string())
}

/// The largest frame a dial-back request may carry, and an answer.
pub const DIALBACK_FRAME_CAPS: (usize, usize) = (MAX_REQUEST, MAX_ANSWER);
