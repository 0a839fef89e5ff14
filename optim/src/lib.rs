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
//! * [`CollaborativeOptimizer`]: the async driver over two ports (`ports`): a
//!   [`ProgressBoard`] and a [`SwarmAverager`]; their network adapters (`net`) are
//!   [`DhtProgressBoard`] over `colony-dht` and [`NetworkAverager`] over
//!   `colony-averaging`, wired into a peer by [`CollaborativeOptimizer::join`];
//! * [`AveragingMode`]: the peer's one role (node, client, auxiliary), set in
//!   [`OptimConfig::role`] and handed down to the averager;
//! * [`LocalOptimizer`]: SGD with momentum, AdamW, LAMB from `colony-kernels`.
//!
//! Re-exports of the kernels' hyperparameter types: [`Sgd`], [`AdamW`], [`Lamb`],
//! [`Layout`].

mod accumulator;
#[cfg(feature = "candle")]
mod candle_adapter;
mod config;
mod driver;
mod ema;
mod error;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod local;
mod net;
mod ports;
mod progress;
mod schedule;
pub mod tracker;

pub use accumulator::GradAccumulator;
#[cfg(feature = "candle")]
pub use candle_adapter::CandleParams;
pub use colony_averaging::{AveragerConfig, AveragingError, AveragingMode, Compression};
pub use colony_dht::DhtError;
pub use colony_kernels::{AdamW, Lamb, Layout, Sgd};
pub use config::{LocalUpdates, OptimConfig};
pub use driver::{CollaborativeOptimizer, DelayedUpdates, StepOutcome};
pub use ema::PerformanceEma;
pub use error::{OptimError, Result};
pub use local::{LocalOptimizer, LocalOptimizerKind};
pub use net::{
    DataPathCounts, DhtProgressBoard, NetworkAverager, RoundStats, TrainingProgressSchema,
};
pub use ports::{PeerState, ProgressBoard, SwarmAverager, WeightLimits};
pub use progress::{MAX_SAMPLES_PER_SECOND, TrainingProgress};
pub use schedule::LrSchedule;
pub use tracker::{ClaimLedger, CollaborationState, LocalProgress, PeerRecord, StepPlan};
