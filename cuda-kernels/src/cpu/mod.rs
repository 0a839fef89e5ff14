//! CPU kernels on plain slices: multi-threaded with rayon, inner loops written
//! so the compiler vectorises them (fp16 conversion uses F16C when the CPU has it).
//!
//! These are the functions the averaging crate calls on parts received from the
//! network: they validate lengths and scalars and return typed errors, never panic.

mod elementwise;
pub(crate) mod elementwise_checks {
    pub(crate) use super::elementwise::{check_weights, normalize};
}
pub mod f16;
mod optim;
pub mod q8;

pub use elementwise::{
    accumulate, all_finite, copy, scale, weighted_average, weighted_delta, weighted_sum,
};
pub use optim::{adamw_step, lamb_step, sgd_step};

/// Elements per rayon task: 128 KiB of `f32`, small enough to balance, large
/// enough that scheduling costs nothing next to the memory traffic.
pub(crate) const CHUNK: usize = 1 << 15;

/// Below this many elements an op runs on the calling thread.
pub(crate) const PAR_MIN: usize = 1 << 16;
