//! `colony-averaging`: decentralized averaging of flat `f32` buffers.
//!
//! What a user of the averager needs sits at the crate root:
//! * [`DecentralizedAverager`] with its [`AveragerConfig`]: matchmaking
//!   through `{prefix}.0b{bits}` DHT keys and a join protocol over libp2p
//!   streams, then a butterfly all-reduce; `step(weight, timeout)`,
//!   `load_state_from_peers(timeout)`, `declare_state`; buffers on any
//!   `colony-kernels` device through [`DecentralizedAverager::step_buffers`];
//! * the round's knobs ([`AllreduceConfig`], [`Compression`]), the peer's
//!   role ([`AveragingMode`]), what a step reports ([`StepOutcome`],
//!   [`AssembledGroup`], [`RoundOutcome`] with the [`DataPath`] of each
//!   connection and any [`RejectedConnection`]) and the errors.
//!
//! Data-plane connections go direct over TCP to a member's announced
//! `data_addr` or, when it has none, it refuses, times out or failed
//! recently, as libp2p streams of the data protocol
//! `/colony/averaging/{prefix}/data/1` on the DHT connection: the same
//! preamble, frames and AEAD either way. A stream's noise-authenticated
//! peer id must be the member whose sender slot it claims. Before a round
//! the leader drops data addresses it finds unusable (no host; loopback
//! announced to a remote peer; a probe that the announcing peer's own data
//! plane does not answer), so those members are reached over libp2p. With
//! [`AveragerConfig::direct_data_plane`] off a peer opens no TCP port at
//! all and still reduces.
//!
//! Modules:
//! * [`matchmaking`]: the sans-I/O [`Matchmaker`](matchmaking::Matchmaker)
//!   state machine and the reference's decision rules;
//! * [`group_keys`]: `{prefix}.0b{bits}` keys and Moshpit bit rotation;
//! * [`state`]: serving and downloading averager state with verification;
//! * [`round`]: one all-reduce round for an explicit group, below the
//!   averager (data plane, wire frames, keys, the reducer, load balancing),
//!   for benches, tests and custom transports.

mod allreduce;
mod averager;
mod compression;
mod conn;
mod control;
mod crypto;
mod dataplane;
mod entries;
mod error;
mod expiring;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod group;
pub mod group_keys;
mod load_balancing;
pub mod matchmaking;
mod partition;
mod records;
mod reducer;
mod robust;
pub mod state;
mod wire;

pub use allreduce::RoundOutcome;
pub use averager::{
    AveragerConfig, Ban, DecentralizedAverager, DownloadedState, MAX_STATE_REQUESTS, StepOutcome,
};
pub use compression::Compression;
pub use conn::DataPath;
pub use dataplane::RejectedConnection;
pub use error::{AveragingError, PeerFault, Result};
pub use group::{
    AllreduceConfig, AssembledGroup, AveragingMode, EntryContext, EntrySignature, GroupMember,
    MAX_BANDWIDTH, MAX_BANDWIDTH_RATIO, MAX_EXACT_WEIGHT, WeightCaps, schema_hash,
};
pub use partition::TensorLayout;
pub use records::{AveragingRecordValidator, DONOR_MAX_TTL, MATCHMAKING_MAX_TTL};

/// One butterfly all-reduce round for an explicit group, and the pieces it
/// is made of: the data plane, the wire format, round keys, the part
/// reducer and the load balancer. The averager runs these for you; use them
/// directly to benchmark a round or to drive one over your own group.
pub mod round {
    pub use crate::{
        allreduce::{RoundOutcome, SpanResult, run_allreduce, run_allreduce_capped},
        compression::{BLOCK_8BIT, all_finite},
        crypto::{ConnectionKeys, FRAME_HEADER_LEN, FrameCipher, RoundKeyPair, TAG_LEN},
        dataplane::DataPlane,
        load_balancing::{MAX_SHARE_FACTOR, balance_spans, load_balance_peers},
        partition::{part_ranges, spans_from_sizes},
        reducer::{PartReducer, PartResult},
        robust::{Aggregation, RobustError, aggregate},
        wire::{FrameBuf, FrameHead, Kind, read_frame, read_frame_unopened},
    };
}

#[cfg(test)]
mod tests;

// Tensor bytes go on the wire in host order through zero-copy casts.
#[cfg(target_endian = "big")]
compile_error!("colony-averaging's wire format assumes a little-endian host");
