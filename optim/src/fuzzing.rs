//! Entry points for the fuzz targets in `fuzz/` (feature `fuzzing`, not a
//! public API): each runs peer bytes through the functions the optimizer
//! runs them through, so a target fuzzes production code, not a copy of it.

use colony_dht::{GossipMessage, PeerId};
use colony_schema::OwnerKey;

use crate::progress::TrainingProgress;

/// A progress record pushed over gossipsub by `source`, as the progress
/// board takes it: decoded strictly, kept only if `source` owns it, it
/// validates, it names its owner's peer id and it expires within 90 s.
pub fn pushed_progress(
    source: Option<PeerId>,
    data: &[u8],
) -> Option<(OwnerKey, Option<TrainingProgress>, f64)> {
    let message = GossipMessage {
        topic: "fuzz_progress".into(),
        source,
        data: data.to_vec(),
    };
    // The bound the board applies to pushes (records' lifetime plus skew).
    crate::net::accept_pushed(&message, colony_dht::dht_time() + 90.0)
}
