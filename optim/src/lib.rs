//! `colony-optim`: the collaborative optimizer.
//!
//! Peers accumulate gradients toward one shared `target_batch_size`; when the swarm
//! reaches it they average parameters and gradients (weighted by the samples each
//! contributed), take a local optimizer step and advance the global step together.
//!
//! The crate is layered so that the hard logic is testable without a network:
//! * [`tracker`]: the pure collaboration state machine (ETA, refresh period, global step,
//!   out-of-sync detection, averaging weight), inputs in, decisions out;
//! * [`PerformanceEma`], [`LrSchedule`], [`GradAccumulator`]: pure building blocks;
//! * [`OptimConfig`]: every knob, with the reference's defaults.

mod accumulator;
mod config;
mod ema;
mod error;
mod progress;
mod schedule;
pub mod tracker;

pub use accumulator::GradAccumulator;
pub use config::OptimConfig;
pub use ema::PerformanceEma;
pub use error::{OptimError, Result};
pub use progress::{MAX_SAMPLES_PER_SECOND, TrainingProgress};
pub use schedule::LrSchedule;
pub use tracker::{CollaborationState, LocalProgress, PeerRecord, StepPlan};
