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
//! * [`OptimConfig`]: every knob, with the reference's defaults;
//! * [`CollaborativeOptimizer`]: the async driver over a [`ProgressBoard`] (the DHT,
//!   [`DhtProgressBoard`]) and a [`SwarmAverager`] (the averaging layer,
//!   [`NetworkAverager`] over `colony-averaging`);
//! * [`LocalOptimizer`]: SGD with momentum, AdamW, LAMB from `colony-kernels`.
//!
//! Re-exports of the kernels' hyperparameter types: [`Sgd`], [`AdamW`], [`Lamb`],
//! [`Layout`].

mod accumulator;
mod averager;
mod board;
#[cfg(feature = "candle")]
mod candle_adapter;
mod config;
mod driver;
mod ema;
mod error;
mod local;
mod network_averager;
mod progress;
mod schedule;
pub mod tracker;

pub use accumulator::GradAccumulator;
pub use averager::{AveragingRole, PeerState, SwarmAverager};
pub use board::{DhtProgressBoard, ProgressBoard, TrainingProgressSchema};
#[cfg(feature = "candle")]
pub use candle_adapter::CandleParams;
pub use colony_averaging::{AveragerConfig, Compression};
pub use colony_kernels::{AdamW, Lamb, Layout, Sgd};
pub use config::OptimConfig;
pub use driver::{CollaborativeOptimizer, StepOutcome};
pub use ema::PerformanceEma;
pub use error::{OptimError, Result};
pub use local::{LocalOptimizer, LocalOptimizerKind};
pub use network_averager::NetworkAverager;
pub use progress::{MAX_SAMPLES_PER_SECOND, TrainingProgress};
pub use schedule::LrSchedule;
pub use tracker::{CollaborationState, LocalProgress, PeerRecord, StepPlan};
