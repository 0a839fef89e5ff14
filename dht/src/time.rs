//! DHT time.

use std::time::{SystemTime, UNIX_EPOCH};

/// Current DHT time: Unix time in seconds, as `f64`.
///
/// Like the reference's `get_dht_time`, this is the plain wall clock; peers are
/// assumed to be weakly synchronised (within a few seconds). A clock before
/// 1970 yields `0.0`.
pub fn dht_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}
