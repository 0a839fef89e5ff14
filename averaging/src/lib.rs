//! `colony-averaging`: decentralized averaging of flat `f32` buffers.
//!
//! * [`DecentralizedAverager`]: matchmaking through `{prefix}.0b{bits}` DHT keys
//!   and a join protocol over libp2p streams, then a butterfly all-reduce;
//!   `step(weight, timeout)`, `load_state_from_peers(timeout)`, `declare_state`.
//! * [`load_balance_peers`]: closed-form (water-filling) bandwidth balancing with
//!   exact integer splits.
//! * [`PartReducer`]: weighted accumulation of one span across senders, with
//!   sender banning.
//! * [`DataPlane`] and [`run_allreduce`]: the butterfly all-reduce over TCP,
//!   frames sealed with AEGIS-128X2 under per-round X25519-agreed keys.
//! * [`matchmaking`]: leader choice and join decisions as pure functions;
//!   [`group_keys`]: `{prefix}.0b{bits}` keys and Moshpit bit rotation.
//! * [`state`]: serving and downloading averager state with verification.
//! * Buffers on any `colony-kernels` device (CPU or CUDA) are averaged with
//!   [`DecentralizedAverager::step_buffers`], staged through host memory.

mod allreduce;
mod averager;
mod compression;
mod control;
mod crypto;
mod dataplane;
mod error;
mod group;
pub mod group_keys;
mod load_balancing;
pub mod matchmaking;
mod partition;
mod reducer;
pub mod state;
mod wire;

pub use allreduce::{RoundOutcome, SpanResult, run_allreduce};
pub use averager::{AveragerConfig, DecentralizedAverager, StepOutcome};
pub use compression::{BLOCK_8BIT, Compression, all_finite};
pub use crypto::{ConnectionKeys, FRAME_HEADER_LEN, FrameCipher, RoundKeyPair, TAG_LEN};
pub use dataplane::DataPlane;
pub use error::{AveragingError, PeerFault, Result};
pub use group::{AllreduceConfig, AssembledGroup, AveragingMode, GroupMember, schema_hash};
pub use load_balancing::load_balance_peers;
pub use partition::{TensorLayout, part_ranges, spans_from_sizes};
pub use reducer::{PartReducer, PartResult};

#[cfg(test)]
mod tests;

// Tensor bytes go on the wire in host order through zero-copy casts.
#[cfg(target_endian = "big")]
compile_error!("colony-averaging's wire format assumes a little-endian host");
