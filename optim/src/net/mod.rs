//! The network adapters of the driver's ports: [`DhtProgressBoard`] (progress records in
//! `colony-dht`, pushed over gossipsub) and [`NetworkAverager`] (`colony-averaging`), and
//! the one place that wires them into a peer: [`CollaborativeOptimizer::join`] (and
//! [`CollaborativeOptimizer::join_with`] for a caller's own averager).

mod averager;
mod board;

pub use averager::{DataPathCounts, NetworkAverager, RoundStats};
#[cfg(feature = "fuzzing")]
pub(crate) use board::accept_pushed;
pub use board::{DhtProgressBoard, TrainingProgressSchema};
use colony_averaging::AveragerConfig;
use colony_dht::Dht;
use tokio::sync::mpsc;

use crate::{
    config::OptimConfig,
    driver::CollaborativeOptimizer,
    error::{OptimError, Result},
    local::LocalOptimizer,
    ports::SwarmAverager,
};

impl CollaborativeOptimizer<DhtProgressBoard, NetworkAverager> {
    /// Builds a whole peer of run `config.prefix` on `dht`: installs the progress schema
    /// and subscribes to pushed progress ([`DhtProgressBoard`], which wakes the optimizer
    /// whenever a peer pushes), starts the averager in the role `config.role`
    /// ([`NetworkAverager`], configured by `averaging`), and starts the optimizer over
    /// `params` (the initial values, identical on every peer or loaded later) with the
    /// `local` update rule.
    ///
    /// This is the composition point for real swarms;
    /// [`join_with`](CollaborativeOptimizer::join_with) takes the caller's averager
    /// instead, and [`new`](CollaborativeOptimizer::new) takes both ports (in-memory test
    /// doubles).
    ///
    /// # Errors
    /// [`OptimError::InvalidConfig`] (also when `averaging.prefix` is not
    /// [`config.averaging_prefix()`](OptimConfig::averaging_prefix)) or
    /// [`OptimError::LengthMismatch`] before anything is started; [`OptimError::Averaging`] if the averager cannot start (e.g. an auxiliary
    /// peer on a client-mode DHT); [`OptimError::Schema`] or [`OptimError::Dht`] if the
    /// board cannot be set up (the averager is then shut down again).
    ///
    /// # Examples
    /// ```no_run
    /// # async fn peer() -> Result<(), Box<dyn std::error::Error>> {
    /// use colony_dht::{Dht, DhtConfig};
    /// use colony_optim::{
    ///     AveragerConfig, AveragingMode, CollaborativeOptimizer, Layout, LocalOptimizer,
    ///     LocalOptimizerKind, OptimConfig, Sgd,
    /// };
    ///
    /// let dht = Dht::new(DhtConfig::default()).await?;
    /// let config = OptimConfig {
    ///     role: AveragingMode::Node,
    ///     ..OptimConfig::new("my-run", 4096)
    /// };
    /// let averaging = AveragerConfig::new(config.averaging_prefix());
    /// let layout = Layout::packed([("w", vec![10])], 1)?;
    /// let local = LocalOptimizer::new(LocalOptimizerKind::Sgd(Sgd::default()), layout)?;
    /// let mut opt =
    ///     CollaborativeOptimizer::join(dht, config, averaging, vec![0.0; 10], local).await?;
    /// loop {
    ///     // ... write this micro-batch's gradient into `opt.grads_mut()` ...
    ///     opt.step(Some(32)).await?;
    /// #   break;
    /// }
    /// opt.shutdown().await?;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn join(
        dht: Dht,
        config: OptimConfig,
        averaging: AveragerConfig,
        params: Vec<f32>,
        local: LocalOptimizer,
    ) -> Result<Self> {
        check_inputs(&config, &params, &local)?;
        if averaging.prefix != config.averaging_prefix() {
            // Peers of one run must meet under one key; a mismatch would
            // train alone without an error.
            return Err(OptimError::InvalidConfig {
                field: "averaging.prefix",
                reason: format!(
                    "is {:?}; the run {:?} averages under {:?}",
                    averaging.prefix,
                    config.prefix,
                    config.averaging_prefix()
                ),
            });
        }
        let averager = NetworkAverager::new(
            dht.clone(),
            &config,
            averaging,
            params.len(),
            config.averaged_state_len(&local),
        )
        .await?;
        Self::join_with(dht, config, params, local, averager).await
    }
}

impl<A: SwarmAverager> CollaborativeOptimizer<DhtProgressBoard, A> {
    /// Like [`join`](CollaborativeOptimizer::join) with an averager of the caller's (an
    /// in-process double, a bench's no-op averager): sets up the [`DhtProgressBoard`] and
    /// its wake channel on `dht`, then starts the optimizer. If the board cannot be set up,
    /// `averager` is shut down.
    ///
    /// # Errors
    /// As [`join`](CollaborativeOptimizer::join), without the averager's own.
    pub async fn join_with(
        dht: Dht,
        config: OptimConfig,
        params: Vec<f32>,
        local: LocalOptimizer,
        mut averager: A,
    ) -> Result<Self> {
        if let Err(e) = check_inputs(&config, &params, &local) {
            averager.shutdown().await;
            return Err(e);
        }
        // One pending wake-up is enough: the optimizer refreshes everything it wakes for.
        let (wake_tx, wake_rx) = mpsc::channel(1);
        let board = match DhtProgressBoard::new(dht, &config.prefix, Some(wake_tx)).await {
            // A vanished replica must not hold a refresh for long: records live
            // metadata_expiration, so a fifth of that at most.
            Ok(board) => board
                .with_fetch_budget(std::time::Duration::from_secs_f64(
                    (config.metadata_expiration / 5.0).min(config.request_timeout),
                ))
                .with_push_ttl(config.metadata_expiration + config.max_clock_skew),
            Err(e) => {
                averager.shutdown().await;
                return Err(e);
            }
        };
        Self::new(config, params, local, board, averager, Some(wake_rx)).await
    }
}

/// What [`CollaborativeOptimizer::new`] would refuse, checked before anything is started
/// on the network.
fn check_inputs(config: &OptimConfig, params: &[f32], local: &LocalOptimizer) -> Result<()> {
    config.validate()?;
    if params.len() == local.num_params() {
        Ok(())
    } else {
        Err(OptimError::LengthMismatch {
            what: "parameters",
            expected: local.num_params(),
            actual: params.len(),
        })
    }
}
