//! [`CollaborativeOptimizer`]: the async driver that connects the pure state machine to a
//! [`ProgressBoard`] (the DHT) and a [`SwarmAverager`].

use std::{
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use tokio::{
    sync::{Notify, mpsc, watch},
    task::JoinHandle,
};

use colony_dht::DhtError;

use crate::{
    accumulator::GradAccumulator,
    config::OptimConfig,
    ema::PerformanceEma,
    error::{ErrorChain, OptimError, Result},
    local::LocalOptimizer,
    ports::{PeerState, ProgressBoard, SwarmAverager},
    progress::TrainingProgress,
    tracker::{
        ClaimLedger, CollaborationState, LocalProgress, PeerRecord, StepPlan, catch_up,
        next_local_step, next_report_time, plan_step,
    },
};

/// What one call to [`CollaborativeOptimizer::step`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepOutcome {
    /// Gradients were accumulated; the swarm has not reached the target yet.
    Accumulated,
    /// A global step was taken; this peer is now at `step`.
    Stepped {
        /// The new local step.
        step: u64,
        /// Peers in the averaging group (1: stepped on local gradients).
        group_size: usize,
    },
    /// This peer was out of sync and downloaded the state; it is now at `step`.
    LoadedState {
        /// The step of the loaded state.
        step: u64,
    },
    /// This peer is out of sync but no peer offered a newer state; nothing was done.
    OutOfSync,
    /// This peer lost every connection to the swarm it trained with (see
    /// [`ProgressBoard::is_isolated`](crate::ProgressBoard::is_isolated)): the
    /// gradients were accumulated, but it does not step alone; it waits for
    /// the swarm and, if the swarm moved on meanwhile, downloads its state.
    Isolated,
    /// Delayed updates ([`OptimConfig::delay_updates`]): the swarm was
    /// ready, and this global step's averaging and update now run in the
    /// background while training goes on with the current parameters. A
    /// later call returns [`Stepped`](Self::Stepped) when they land.
    Scheduled {
        /// The step this peer will be at once the update lands.
        step: u64,
    },
}

/// What the background tasks and the caller share.
#[derive(Debug)]
struct Shared {
    state: CollaborationState,
    records: Vec<PeerRecord>,
    /// What this peer remembers of the others' claims (bounds their samples' growth).
    ledger: ClaimLedger,
}

/// Every critical section on `Shared` only assigns whole values, so a panic elsewhere
/// cannot leave it half-written: a poisoned lock is safe to reuse.
fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

fn secs(s: f64) -> Duration {
    Duration::try_from_secs_f64(s).unwrap_or(Duration::MAX)
}

/// The collaborative optimizer: accumulate locally, step together.
///
/// Holds the model's parameters and a gradient buffer (the reference's `.grad`), both
/// flat. A training loop writes a micro-batch's gradient into
/// [`grads_mut`](Self::grads_mut), calls [`step`](Self::step) with the batch size, and
/// reads [`params`](Self::params) for the next forward pass. Two background tasks
/// publish this peer's progress (on change and every `metadata_expiration / 2`) and
/// refresh the collaboration estimate on the adaptive schedule.
///
/// Dropping the optimizer stops the background tasks; call [`shutdown`](Self::shutdown)
/// to also tell peers that this one left.
pub struct CollaborativeOptimizer<B: ProgressBoard, A: SwarmAverager> {
    config: OptimConfig,
    board: B,
    /// `None` only while a delayed update runs with it in the background.
    averager: Option<A>,
    /// The delayed update in flight ([`OptimConfig::delay_updates`]).
    inflight: Option<JoinHandle<UpdateDone<A>>>,
    delayed: DelayedUpdates,
    params: Vec<f32>,
    grads: Vec<f32>,
    scratch: Vec<f32>,
    local: LocalOptimizer,
    accumulator: GradAccumulator,
    ema: PerformanceEma,
    local_step: u64,
    last_step_time: Option<f64>,
    shared: Arc<Mutex<Shared>>,
    state_updated: Arc<Notify>,
    version: watch::Receiver<u64>,
    progress: watch::Sender<LocalProgress>,
    tasks: Vec<JoinHandle<()>>,
    /// Whether the last global-step attempt found this peer cut off from the swarm.
    isolated: bool,
    /// The outer loop of local updates ([`OptimConfig::local_updates`]).
    outer: Option<OuterLoop>,
}

/// The outer loop of local updates: the parameters of the last global step
/// (the anchor, identical on every peer of a successful round), the outer
/// optimizer, and the inner steps taken since.
#[derive(Debug)]
struct OuterLoop {
    /// The outer SGD with Nesterov momentum (state-less while lent to a round).
    opt: LocalOptimizer,
    /// Empty while lent to a round.
    anchor: Vec<f32>,
    /// Delayed updates: the working parameters when the round in flight
    /// began; the inner steps since then are kept on top of its result.
    snapshot: Option<Vec<f32>>,
    /// Inner steps since the last outer step.
    inner_steps: u64,
    /// Inner steps this peer took in all (the inner optimizer's bias
    /// correction counts them, not global steps).
    inner_total: u64,
}

impl<B: ProgressBoard, A: SwarmAverager> std::fmt::Debug for CollaborativeOptimizer<B, A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CollaborativeOptimizer")
            .field("prefix", &self.config.prefix)
            .field("local_step", &self.local_step)
            .field("num_params", &self.params.len())
            .finish_non_exhaustive()
    }
}

impl<B: ProgressBoard, A: SwarmAverager> CollaborativeOptimizer<B, A> {
    /// Starts an optimizer for `params` (initial values, identical on every peer or loaded
    /// later with [`load_state_from_peers`](Self::load_state_from_peers)), reading the
    /// collaboration state once before returning. `wake` receives a message whenever
    /// peers push new progress (see [`DhtProgressBoard::new`](crate::DhtProgressBoard::new)). To build a
    /// peer on a real swarm, use [`join`](CollaborativeOptimizer::join) instead.
    ///
    /// Must be called inside a tokio runtime.
    ///
    /// # Errors
    /// [`OptimError::InvalidConfig`] or [`OptimError::LengthMismatch`].
    pub async fn new(
        config: OptimConfig,
        params: Vec<f32>,
        local: LocalOptimizer,
        board: B,
        averager: A,
        wake: Option<mpsc::Receiver<()>>,
    ) -> Result<Self> {
        config.validate()?;
        if params.len() != local.num_params() {
            return Err(OptimError::LengthMismatch {
                what: "parameters",
                expected: local.num_params(),
                actual: params.len(),
            });
        }
        let n = params.len();
        let outer = match &config.local_updates {
            Some(lu) => Some(OuterLoop {
                opt: LocalOptimizer::new(
                    crate::LocalOptimizerKind::Sgd(lu.outer_sgd()),
                    local.layout().clone(),
                )?,
                anchor: params.clone(),
                snapshot: None,
                inner_steps: 0,
                inner_total: 0,
            }),
            None => None,
        };
        let now = board.now();
        let local_progress = LocalProgress {
            step: 0,
            samples_accumulated: 0,
            samples_per_second: 0.0,
            client_mode: config.is_client(),
        };
        let records = fetch_records(&board, &config).await.unwrap_or_default();
        let mut ledger = ClaimLedger::default();
        let state = ledger.estimate(&config, &local_progress, &board.self_key(), &records, now);
        let shared = Arc::new(Mutex::new(Shared {
            state,
            records,
            ledger,
        }));
        let state_updated = Arc::new(Notify::new());
        let (progress, progress_rx) = watch::channel(local_progress);
        let (version_tx, version) = watch::channel(0u64);
        let mut tasks = vec![tokio::spawn(refresh_loop(
            config.clone(),
            board.clone(),
            shared.clone(),
            state_updated.clone(),
            progress_rx.clone(),
            wake,
            version_tx,
        ))];
        if !config.is_auxiliary() {
            tasks.push(tokio::spawn(report_loop(
                config.clone(),
                board.clone(),
                progress_rx,
            )));
        }
        Ok(Self {
            // With local updates every gradient is applied at once: the
            // accumulator only checks and counts them (no sum, no buffer).
            accumulator: GradAccumulator::new(
                n,
                config.batch_size_per_step,
                config.reuse_grad_buffers || config.local_updates.is_some(),
            ),
            ema: PerformanceEma::new(config.performance_ema_alpha, now),
            config,
            board,
            averager: Some(averager),
            inflight: None,
            delayed: DelayedUpdates::default(),
            grads: vec![0.0; n],
            scratch: Vec::new(),
            params,
            local,
            local_step: 0,
            last_step_time: None,
            shared,
            state_updated,
            version,
            progress,
            tasks,
            isolated: false,
            outer,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &OptimConfig {
        &self.config
    }

    /// The parameters, flat.
    pub fn params(&self) -> &[f32] {
        &self.params
    }

    /// The parameters, writable (for initialisation from a checkpoint).
    /// With local updates, call [`reset_anchor`](Self::reset_anchor) after
    /// writing them before the first step.
    pub fn params_mut(&mut self) -> &mut [f32] {
        &mut self.params
    }

    /// The parameters of the last global step: with local updates
    /// ([`OptimConfig::local_updates`]) the anchor the inner steps start
    /// from, identical on every peer of a successful round (the working
    /// [`params`](Self::params) hold the inner steps since); otherwise the
    /// parameters themselves. Delayed updates: [`settle`](Self::settle) first.
    pub fn global_params(&self) -> &[f32] {
        match &self.outer {
            Some(outer) if !outer.anchor.is_empty() => &outer.anchor,
            _ => &self.params,
        }
    }

    /// With local updates: makes the current parameters the anchor of the
    /// next outer step (after writing them with
    /// [`params_mut`](Self::params_mut)). Does nothing otherwise, or while
    /// a delayed round holds the anchor.
    pub fn reset_anchor(&mut self) {
        if let Some(outer) = self.outer.as_mut()
            && outer.anchor.len() == self.params.len()
        {
            outer.anchor.copy_from_slice(&self.params);
            outer.inner_steps = 0;
        }
    }

    /// With local updates: inner steps taken since the last outer step.
    pub fn inner_steps(&self) -> Option<u64> {
        self.outer.as_ref().map(|o| o.inner_steps)
    }

    /// The gradient buffer: write one micro-batch's gradient here before
    /// [`step`](Self::step) (with `reuse_grad_buffers`: add to it, never zero it).
    pub fn grads_mut(&mut self) -> &mut [f32] {
        &mut self.grads
    }

    /// The local optimizer (and its state).
    pub fn local_optimizer(&self) -> &LocalOptimizer {
        &self.local
    }

    /// This peer's step.
    pub fn local_step(&self) -> u64 {
        self.local_step
    }

    /// Samples accumulated locally toward the next step.
    pub fn local_samples(&self) -> u64 {
        self.accumulator.local_samples()
    }

    /// This peer's measured throughput (samples per second).
    pub fn samples_per_second(&self) -> f64 {
        self.ema.samples_per_second()
    }

    /// The learning rate at the current step.
    pub fn learning_rate(&self) -> f64 {
        self.config.lr_schedule.lr_at(self.local_step)
    }

    /// The latest collaboration estimate.
    pub fn collaboration_state(&self) -> CollaborationState {
        lock(&self.shared).state.clone()
    }

    /// The progress records behind the latest estimate (for monitoring).
    pub fn peer_records(&self) -> Vec<PeerRecord> {
        lock(&self.shared).records.clone()
    }

    /// Waits until the background task refreshes the collaboration state, at most
    /// `timeout`. Returns whether it did.
    ///
    /// # Cancel safety
    /// Cancel safe.
    pub async fn state_changed(&mut self, timeout: Duration) -> bool {
        matches!(
            tokio::time::timeout(timeout, self.version.changed()).await,
            Ok(Ok(()))
        )
    }

    /// Runs the global step if the swarm is ready, without adding samples (for a peer
    /// that already contributed and waits for the others, or ran out of data).
    ///
    /// # Errors
    /// As [`step`](Self::step).
    pub async fn poll_step(&mut self) -> Result<StepOutcome> {
        // Nothing to add: wait for a delayed update in flight to land.
        if let Some(landed) = self.land_inflight().await? {
            return Ok(landed);
        }
        if !self.synchronize() {
            return self.resync().await;
        }
        self.report();
        self.maybe_global_step().await
    }

    /// The averaging layer; `None` while a delayed update runs with it (see
    /// [`settle`](Self::settle)).
    pub fn averager_mut(&mut self) -> Option<&mut A> {
        self.averager.as_mut()
    }

    /// What the delayed updates did so far ([`OptimConfig::delay_updates`]).
    pub fn delayed_updates(&self) -> DelayedUpdates {
        self.delayed
    }

    /// Waits for the delayed update in flight, if any, and installs it: after
    /// this, [`params`](Self::params) hold every global step taken so far.
    /// Call it before reading the final parameters of a run with delayed
    /// updates (shutdown does).
    ///
    /// # Errors
    /// [`OptimError::UpdateTaskFailed`] if the update's task panicked.
    pub async fn settle(&mut self) -> Result<()> {
        self.land_inflight().await.map(|_| ())
    }

    /// Waits for the delayed update in flight and lands it; its outcome, or
    /// `None` with nothing in flight.
    async fn land_inflight(&mut self) -> Result<Option<StepOutcome>> {
        let Some(task) = self.inflight.take() else {
            return Ok(None);
        };
        let done = task.await.map_err(|e| OptimError::UpdateTaskFailed {
            reason: e.to_string(),
        })?;
        self.land(done).map(Some)
    }

    /// Lands a finished delayed update without waiting for one still running.
    async fn land_if_finished(&mut self) -> Result<Option<StepOutcome>> {
        if self.inflight.as_ref().is_some_and(JoinHandle::is_finished) {
            return self.land_inflight().await;
        }
        Ok(None)
    }

    /// The averager, once no delayed update holds it.
    async fn averager(&mut self) -> Result<&mut A> {
        self.settle().await?;
        self.averager
            .as_mut()
            .ok_or_else(|| OptimError::UpdateTaskFailed {
                reason: "the averager was lost with an earlier update".to_owned(),
            })
    }

    /// Takes a finished update's results (parameters, optimizer state, the
    /// averager back) and moves this peer to the step after it.
    ///
    /// # Errors
    /// The local optimizer step's error (the parameters are then as the
    /// round left them).
    fn land(&mut self, done: UpdateDone<A>) -> Result<StepOutcome> {
        self.averager = Some(done.averager);
        // The next step's spare: the next delta (local updates), or the
        // buffer the accumulator goes on in. Keeping it costs a model-sized
        // gradient of memory; dropping it, a fresh allocation whose pages
        // the kernel faults in and zeroes while gradients arrive, which
        // measured slower than zeroing a kept buffer (`optim_memory`).
        self.scratch = done.grads;
        if let Some(outer) = self.outer.as_mut() {
            // The round's result is the new anchor. Delayed, the inner steps
            // taken while it ran stay on top of it.
            match outer.snapshot.take() {
                Some(snapshot) => {
                    for ((p, s), a) in self.params.iter_mut().zip(&snapshot).zip(&done.params) {
                        *p = a + (*p - s);
                    }
                }
                None => self.params.copy_from_slice(&done.params),
            }
            outer.anchor = done.params;
            outer.opt = done.local;
        } else {
            self.params = done.params;
            self.local = done.local;
        }
        if self.config.delay_updates {
            self.delayed.applied += 1;
            self.delayed.last_group_size = done.group_size;
            if done.group_size > 1 {
                self.delayed.averaged += 1;
            } else {
                self.delayed.local += 1;
            }
            tracing::debug!(
                step = done.step,
                group_size = done.group_size,
                "delayed update applied"
            );
        }
        done.stepped?;
        self.local_step = self.local_step.max(done.step);
        lock(&self.shared).state.register_step(self.local_step);
        self.state_updated.notify_one();
        self.report();
        Ok(StepOutcome::Stepped {
            step: self.local_step,
            group_size: done.group_size,
        })
    }

    /// Whether this peer may train at the current global step; a peer behind within
    /// `step_tolerance` jumps to the global step first.
    fn synchronize(&mut self) -> bool {
        let global = lock(&self.shared).state.optimizer_step;
        match catch_up(self.local_step, global, self.config.step_tolerance) {
            Some(step) => {
                if step != self.local_step {
                    tracing::debug!(
                        from = self.local_step,
                        to = step,
                        "catching up with the global step"
                    );
                    self.local_step = step;
                }
                true
            }
            None => false,
        }
    }

    fn report(&self) {
        let progress = LocalProgress {
            step: self.local_step,
            samples_accumulated: self.accumulator.local_samples(),
            samples_per_second: self.ema.samples_per_second(),
            client_mode: self.config.is_client(),
        };
        // Republish only what changed: callers report on every poll while a
        // round forms, and an unchanged record would load the DHT for nothing.
        self.progress.send_if_modified(|p| {
            let changed = *p != progress;
            *p = progress;
            changed
        });
    }

    async fn refresh_now(&self) -> CollaborationState {
        let now = self.board.now();
        let local = *self.progress.borrow();
        match fetch_records(&self.board, &self.config).await {
            Ok(records) => {
                let self_key = self.board.self_key();
                let mut shared = lock(&self.shared);
                let state = shared
                    .ledger
                    .estimate(&self.config, &local, &self_key, &records, now);
                shared.state = state.clone();
                shared.records = records;
                drop(shared);
                self.state_updated.notify_one();
                state
            }
            Err(e) => {
                tracing::warn!(error = %ErrorChain(&e), "could not refresh the collaboration state");
                lock(&self.shared).state.clone()
            }
        }
    }

    /// Accumulates the gradient in [`grads_mut`](Self::grads_mut) for `batch_size`
    /// samples (default: `batch_size_per_step`), reports progress, and when the swarm is
    /// ready averages with it and takes the global step.
    ///
    /// # Errors
    /// [`OptimError::MissingBatchSize`], [`OptimError::ZeroBatchSize`],
    /// [`OptimError::NonFiniteGradients`] (the batch is skipped, nothing else changes),
    /// [`OptimError::Kernel`]. A failed averaging round is not an error: the peer steps
    /// on its own gradients, as the reference does.
    ///
    /// # Cancel safety
    /// Not cancel safe: cancelling during averaging leaves the accumulated gradients in
    /// place but may skip this peer's step.
    pub async fn step(&mut self, batch_size: Option<u64>) -> Result<StepOutcome> {
        if self.config.is_auxiliary() {
            return Err(OptimError::InvalidConfig {
                field: "role",
                reason: "auxiliary peers call step_aux, not step".to_owned(),
            });
        }
        // A delayed update that finished lands now; while one runs this peer
        // belongs to that step's round and only accumulates.
        let landed = self.land_if_finished().await?;
        if landed.is_none() && self.inflight.is_none() && !self.synchronize() {
            tracing::info!(local_step = self.local_step, "peer is out of sync");
            return self.resync().await;
        }
        let now = self.board.now();
        if let Some(last) = self.last_step_time
            && now - last > self.config.metadata_expiration
        {
            tracing::warn!(
                seconds = now - last,
                expiration = self.config.metadata_expiration,
                "training step took longer than the progress records live"
            );
        }
        self.last_step_time = Some(now);
        let batch = match self.accumulator.accumulate(&self.grads, batch_size) {
            Ok(batch) => batch,
            Err(e @ OptimError::NonFiniteGradients { .. }) => {
                if !self.config.reuse_grad_buffers {
                    self.grads.fill(0.0);
                }
                tracing::warn!(error = %ErrorChain(&e), "skipping a batch with non-finite gradients");
                return Err(e);
            }
            Err(e) => return Err(e),
        };
        self.ema.update(batch, now);
        if let Some(outer) = self.outer.as_mut() {
            // Local updates: this micro-batch's gradient moves the working
            // parameters at once (the inner step).
            let lr = self.config.lr_schedule.lr_at(self.local_step);
            self.local
                .step(&mut self.params, &self.grads, lr, outer.inner_total)?;
            outer.inner_total += 1;
            outer.inner_steps += 1;
            self.grads.fill(0.0);
        }
        self.report();
        if let Some(landed) = landed {
            return Ok(landed);
        }
        if self.inflight.is_some() {
            return Ok(StepOutcome::Accumulated);
        }
        self.maybe_global_step().await
    }

    async fn maybe_global_step(&mut self) -> Result<StepOutcome> {
        let now = self.board.now();
        // The cached estimate may predate this peer's latest samples.
        let ready = self.accumulator.local_samples() >= self.config.target_batch_size
            || match (&self.outer, &self.config.local_updates) {
                // Local updates: after H inner steps, or once the swarm
                // reported the target (or moved on); never on the ETA, so
                // H is not cut short by a throughput estimate.
                (Some(o), Some(lu)) => {
                    let state = &lock(&self.shared).state;
                    o.inner_steps >= lu.inner_steps
                        || state.samples_accumulated >= state.target_batch_size
                        || state.optimizer_step > self.local_step
                }
                _ => lock(&self.shared)
                    .state
                    .ready_for_step(self.local_step, now),
            };
        if !ready {
            return Ok(StepOutcome::Accumulated);
        }
        tracing::debug!(step = self.local_step, "beginning global optimizer step");
        let state = self.refresh_now().await;
        let plan = plan_step(
            &self.config,
            self.local_step,
            self.accumulator.local_samples(),
            &state,
        );
        let isolated = plan == StepPlan::StepAlone && self.board.is_isolated().await;
        if isolated != self.isolated {
            self.isolated = isolated;
            if isolated {
                tracing::warn!(
                    step = self.local_step,
                    "lost every connection to the swarm; not stepping alone until it is back"
                );
            } else {
                tracing::info!(step = self.local_step, "the swarm is reachable again");
            }
        }
        match plan {
            StepPlan::LoadState => self.resync().await,
            StepPlan::Average { weight } => self.global_step(Some(weight), &state).await,
            StepPlan::StepAlone if isolated => {
                // Do not spin through micro-batches while cut off.
                tokio::time::sleep(secs(self.config.default_refresh_period)).await;
                Ok(StepOutcome::Isolated)
            }
            StepPlan::StepAlone => self.global_step(None, &state).await,
        }
    }

    async fn resync(&mut self) -> Result<StepOutcome> {
        if self.load_state_from_peers().await? {
            Ok(StepOutcome::LoadedState {
                step: self.local_step,
            })
        } else {
            // No state to load yet: do not retry on every micro-batch (each
            // try is a DHT read of the donors' key).
            tokio::time::sleep(secs(self.config.default_refresh_period)).await;
            Ok(StepOutcome::OutOfSync)
        }
    }

    async fn global_step(
        &mut self,
        weight: Option<f64>,
        state: &CollaborationState,
    ) -> Result<StepOutcome> {
        self.ema.pause();
        let result = self.average_and_apply(weight, state).await;
        self.ema.resume(self.board.now());
        result
    }

    async fn average_and_apply(
        &mut self,
        weight: Option<f64>,
        state: &CollaborationState,
    ) -> Result<StepOutcome> {
        // One update at a time: the previous delayed one lands first.
        self.settle().await?;
        // The mean gradient of this peer's samples (reuse mode: the caller's
        // sum / calls); with local updates the parameter delta since the
        // last global step (the pseudo-gradient the outer optimizer takes).
        // Without local updates the mean is the accumulator's own buffer
        // (the accumulator goes on in the spare): no copy.
        let local_updates = self.outer.is_some();
        let mut mean = if let Some(outer) = &self.outer {
            let mut delta = std::mem::take(&mut self.scratch);
            delta.resize(self.params.len(), 0.0);
            for ((d, a), p) in delta.iter_mut().zip(&outer.anchor).zip(&self.params) {
                *d = a - p;
            }
            delta
        } else {
            self.accumulator
                .take_mean(std::mem::take(&mut self.scratch), &mut self.grads)?
        };
        let mut weight = weight;
        if !mean.iter().all(|g| g.is_finite()) {
            // Only reachable in reuse mode (the accumulator refuses non-finite batches):
            // tag along with weight zero so the round does not stall, never send poison.
            tracing::warn!("accumulated gradients are not finite; averaging with weight 0");
            mean.fill(0.0);
            weight = weight.map(|_| 0.0);
        }
        let limits = weight.map(|_| {
            let records = lock(&self.shared).records.clone();
            crate::tracker::weight_limits(
                &self.config,
                &records,
                self.local_step,
                state.num_peers,
                self.board.now(),
            )
        });
        let Some(averager) = self.averager.take() else {
            return Err(OptimError::UpdateTaskFailed {
                reason: "the averager was lost with an earlier update".to_owned(),
            });
        };
        let new_step = next_local_step(self.local_step, state.optimizer_step);
        let delay = self.config.delay_updates;
        // Delayed, the next micro-batches still read the parameters: the job
        // gets copies. Inline, it takes them (no copy) and gives them back.
        let mut lr = self.config.lr_schedule.lr_at(self.local_step);
        let (params, local) = if let Some(outer) = self.outer.as_mut() {
            // The round averages and steps the anchor; the working
            // parameters stay here (delayed: they keep training).
            if delay {
                outer.snapshot = Some(self.params.clone());
            }
            outer.inner_steps = 0;
            if let Some(lu) = &self.config.local_updates {
                lr = lu.outer_lr;
            }
            let hollow = outer.opt.hollow();
            (
                std::mem::take(&mut outer.anchor),
                std::mem::replace(&mut outer.opt, hollow),
            )
        } else if delay {
            (self.params.clone(), self.local.clone())
        } else {
            let hollow = self.local.hollow();
            (
                std::mem::take(&mut self.params),
                std::mem::replace(&mut self.local, hollow),
            )
        };
        let job = UpdateJob {
            averager,
            local,
            params,
            grads: mean,
            weight,
            limits,
            timeout: secs(self.config.averaging_timeout),
            lr,
            step: self.local_step,
            new_step,
        };
        // The accumulated gradients are in the job: the next step's start
        // now (`take_mean` already began it without local updates).
        if local_updates {
            self.accumulator.reset(None);
        }
        if !self.config.reuse_grad_buffers {
            self.grads.fill(0.0);
        }
        if delay {
            // The next micro-batches compute on the current parameters while
            // the round and the update run; the update lands at a later
            // call (staleness 1). This peer stays at its step until then, as
            // it would inside a blocking round: peers that see it move on
            // before they joined the round would skip their own step.
            self.inflight = Some(tokio::spawn(job.run()));
            Ok(StepOutcome::Scheduled { step: new_step })
        } else {
            let done = job.run().await;
            self.land(done)
        }
    }

    /// What this peer averages and serves as its state: the parameters and
    /// the optimizer, or with local updates the anchor and the outer
    /// optimizer (the inner optimizer's state stays here).
    fn shared_view(&self) -> (&[f32], &LocalOptimizer) {
        match &self.outer {
            Some(outer) => (&outer.anchor, &outer.opt),
            None => (&self.params, &self.local),
        }
    }

    async fn share_state(&mut self) {
        if let Err(e) = self.settle().await {
            tracing::warn!(error = %ErrorChain(&e), "could not share the state");
            return;
        }
        let (params, optimizer) = self.shared_view();
        let state = PeerState {
            step: self.local_step,
            params: params.to_vec(),
            optimizer_state: optimizer.state().to_vec(),
        };
        let shared = match self.averager().await {
            Ok(averager) => averager.share_state(state).await,
            Err(e) => Err(e),
        };
        if let Err(e) = shared {
            tracing::warn!(error = %ErrorChain(&e), "could not share the state");
        }
    }

    /// For auxiliary peers: when the swarm is ready, helps it average without sending
    /// gradients, and advances the local step.
    ///
    /// # Errors
    /// [`OptimError::InvalidConfig`] on a non-auxiliary peer.
    pub async fn step_aux(&mut self) -> Result<StepOutcome> {
        if !self.config.is_auxiliary() {
            return Err(OptimError::InvalidConfig {
                field: "role",
                reason: "only auxiliary peers call step_aux".to_owned(),
            });
        }
        // An auxiliary peer has no state to keep in sync: it simply follows the global step,
        // and helps when the swarm (not itself) is about to step.
        let global = lock(&self.shared).state.optimizer_step;
        self.local_step = self.local_step.max(global);
        let now = self.board.now();
        let ready = lock(&self.shared)
            .state
            .ready_for_step(self.local_step, now);
        if !ready {
            return Ok(StepOutcome::Accumulated);
        }
        let state = self.refresh_now().await;
        let step = self.local_step.max(state.optimizer_step);
        let timeout = secs(self.config.averaging_timeout);
        let group_size = match self.averager().await?.assist(timeout).await {
            Ok(size) => size,
            Err(e) => {
                tracing::info!(error = %ErrorChain(&e), "auxiliary averaging round failed");
                1
            }
        };
        // Only a round that happened moves the auxiliary peer on: it never runs ahead of
        // the swarm (the reference advanced it even when no group formed).
        self.local_step = if group_size > 1 {
            next_local_step(step, state.optimizer_step)
        } else {
            step
        };
        lock(&self.shared).state.register_step(self.local_step);
        self.state_updated.notify_one();
        Ok(StepOutcome::Stepped {
            step: self.local_step,
            group_size,
        })
    }

    /// Downloads the most advanced state offered by a peer and installs it (parameters,
    /// optimizer state, step), dropping local accumulated gradients. Returns whether a
    /// state was installed. A donor older than this peer, or one whose tensors have the
    /// wrong size or are not finite, is refused.
    ///
    /// # Errors
    /// Never for a missing or bad donor (`Ok(false)`); only for local failures.
    pub async fn load_state_from_peers(&mut self) -> Result<bool> {
        let timeout = secs(self.config.load_state_timeout);
        // The swarm's step, as the tracker estimates it from a quorum of live
        // peers: no donor may lure this peer past it.
        let global = lock(&self.shared).state.optimizer_step;
        let max_step = global
            .max(self.local_step)
            .saturating_add(self.config.step_tolerance);
        let loaded = match self.averager().await?.load_state(timeout, max_step).await {
            Ok(Some(state)) => state,
            Ok(None) => {
                tracing::info!("no peer offered a state");
                return Ok(false);
            }
            Err(e) => {
                tracing::warn!(error = %ErrorChain(&e), "loading the state from peers failed");
                return Ok(false);
            }
        };
        let state_len = self.shared_view().1.state().len();
        let ok_sizes =
            loaded.params.len() == self.params.len() && loaded.optimizer_state.len() == state_len;
        let finite = loaded
            .params
            .iter()
            .chain(&loaded.optimizer_state)
            .all(|v| v.is_finite());
        if !ok_sizes || !finite || loaded.step < self.local_step {
            tracing::warn!(
                donor_step = loaded.step,
                local_step = self.local_step,
                ok_sizes,
                finite,
                "refusing a downloaded state"
            );
            return Ok(false);
        }
        self.params.copy_from_slice(&loaded.params);
        match self.outer.as_mut() {
            // The donor's anchor and outer momentum; the inner optimizer's
            // state is this peer's own.
            Some(outer) => {
                outer.anchor.copy_from_slice(&loaded.params);
                outer
                    .opt
                    .state_mut()
                    .copy_from_slice(&loaded.optimizer_state);
                outer.inner_steps = 0;
                outer.snapshot = None;
            }
            None => self
                .local
                .state_mut()
                .copy_from_slice(&loaded.optimizer_state),
        }
        self.local_step = loaded.step;
        self.accumulator.reset(Some(&mut self.grads));
        self.grads.fill(0.0);
        self.ema.reset_timer(self.board.now());
        lock(&self.shared).state.register_step(self.local_step);
        self.report();
        self.state_updated.notify_one();
        self.share_state().await;
        tracing::info!(step = self.local_step, "loaded state from peers");
        Ok(true)
    }

    /// Stops the background tasks and averaging, and publishes a goodbye (nil) record so
    /// peers stop counting this one at once instead of after `metadata_expiration`.
    ///
    /// # Errors
    /// [`OptimError::Dht`] if the goodbye could not be stored.
    pub async fn shutdown(mut self) -> Result<()> {
        if let Some(averager) = self.stop_tasks().await {
            averager.shutdown().await;
        }
        let expiration = self.board.now() + self.config.metadata_expiration;
        let goodbye = self.board.publish(None, expiration);
        let timeout = self.config.request_timeout;
        match tokio::time::timeout(secs(timeout), goodbye).await {
            Ok(result) => result,
            Err(_) => Err(timed_out("goodbye", timeout)),
        }
    }
}

impl<B: ProgressBoard, A: SwarmAverager> CollaborativeOptimizer<B, A> {
    /// Stops the background tasks and averaging without a goodbye and
    /// without withdrawing the state declaration: for a peer that leaves
    /// because another node runs with its identity. Those records live
    /// under the identity's owner subkey, so a goodbye would make peers stop
    /// counting the other node (and withdrawing would hide its state).
    pub async fn leave_without_goodbye(mut self) {
        if let Some(averager) = self.stop_tasks().await {
            averager.abandon().await;
        }
    }

    /// Stops the background tasks and lands the delayed update in flight;
    /// the averager, for the caller to stop (`None` if an update lost it).
    async fn stop_tasks(&mut self) -> Option<&mut A> {
        for task in self.tasks.drain(..) {
            task.abort();
        }
        if let Err(e) = self.settle().await {
            tracing::warn!(error = %ErrorChain(&e), "the last delayed update was lost");
        }
        self.averager.as_mut()
    }
}

impl<B: ProgressBoard, A: SwarmAverager> Drop for CollaborativeOptimizer<B, A> {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
        if let Some(task) = &self.inflight {
            task.abort();
        }
    }
}

/// What the delayed updates of a run did ([`OptimConfig::delay_updates`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DelayedUpdates {
    /// Updates installed so far.
    pub applied: u64,
    /// Of those, the ones averaged with at least one other peer.
    pub averaged: u64,
    /// Of those, the ones stepped on local gradients (no group, or a failed round).
    pub local: u64,
    /// The group of the latest installed update (0 before the first).
    pub last_group_size: usize,
}

/// One global step's averaging and optimizer update, owning everything it
/// touches so that it can run in the background (delayed updates) as well
/// as inline.
struct UpdateJob<A> {
    averager: A,
    local: LocalOptimizer,
    params: Vec<f32>,
    /// This peer's mean gradient.
    grads: Vec<f32>,
    /// `None`: step alone, no round.
    weight: Option<f64>,
    limits: Option<crate::ports::WeightLimits>,
    timeout: Duration,
    lr: f64,
    /// The step being taken, and the step after it.
    step: u64,
    new_step: u64,
}

/// A finished [`UpdateJob`].
struct UpdateDone<A> {
    averager: A,
    local: LocalOptimizer,
    params: Vec<f32>,
    /// The gradient the update used (averaged, or this peer's own).
    grads: Vec<f32>,
    group_size: usize,
    step: u64,
    /// The local optimizer step's outcome.
    stepped: Result<()>,
}

impl<A: SwarmAverager> UpdateJob<A> {
    /// Averages params, grads and optimizer state in place with the peers
    /// averaging now (unless stepping alone), applies the local optimizer to
    /// the result (on this peer's own gradient if the round failed: the
    /// reference's behaviour), and shares the new state. A round's results
    /// are finite by the averager's contract ([`SwarmAverager::average`]:
    /// `colony-averaging` checks every reducer's result before applying it).
    async fn run(self) -> UpdateDone<A> {
        let Self {
            mut averager,
            mut local,
            mut params,
            mut grads,
            weight,
            limits,
            timeout,
            lr,
            step,
            new_step,
        } = self;
        let mut group_size = 1;
        if let Some(weight) = weight {
            if let Some(limits) = &limits {
                averager.limit_weights(limits);
            }
            // The round averages these buffers in place: no copy in or out.
            let mut tensors: [&mut [f32]; 3] = [&mut params, &mut grads, local.state_mut()];
            match averager.average(&mut tensors, weight, timeout).await {
                Ok(size) => {
                    group_size = size;
                    tracing::debug!(group_size, "averaged with peers");
                }
                Err(e) => {
                    tracing::info!(error = %ErrorChain(&e), "skipped averaging; stepping on local gradients")
                }
            }
        }
        let stepped = local.step(&mut params, &grads, lr, step);
        // The snapshot late joiners download: one copy, served as it is.
        let state = PeerState {
            step: new_step,
            params: params.clone(),
            optimizer_state: local.state().to_vec(),
        };
        if let Err(e) = averager.share_state(state).await {
            tracing::warn!(error = %ErrorChain(&e), "could not share the state");
        }
        UpdateDone {
            averager,
            local,
            params,
            grads,
            group_size,
            step: new_step,
            stepped,
        }
    }
}

async fn fetch_records<B: ProgressBoard>(
    board: &B,
    config: &OptimConfig,
) -> Result<Vec<PeerRecord>> {
    match tokio::time::timeout(secs(config.request_timeout), board.fetch()).await {
        Ok(result) => result,
        Err(_) => Err(timed_out("fetch progress", config.request_timeout)),
    }
}

/// A board operation that ran past `request_timeout` (s).
fn timed_out(op: &'static str, timeout_s: f64) -> OptimError {
    OptimError::dht(op)(DhtError::Timeout {
        operation: op,
        timeout_s,
    })
}

async fn refresh_loop<B: ProgressBoard>(
    config: OptimConfig,
    board: B,
    shared: Arc<Mutex<Shared>>,
    updated: Arc<Notify>,
    progress: watch::Receiver<LocalProgress>,
    mut wake: Option<mpsc::Receiver<()>>,
    version: watch::Sender<u64>,
) {
    let self_key = board.self_key();
    let mut last_fetch = f64::NEG_INFINITY;
    loop {
        let next = lock(&shared).state.next_fetch_time;
        let wait = secs((next - board.now()).max(0.0));
        let woken = async {
            match wake.as_mut() {
                Some(rx) => rx.recv().await.is_some(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = updated.notified() => continue,
            alive = woken => {
                if !alive {
                    wake = None;
                    continue;
                }
                // Pushed progress: refresh now, but never more often than the minimum.
                let since = board.now() - last_fetch;
                if since < config.min_refresh_period {
                    tokio::time::sleep(secs(config.min_refresh_period - since)).await;
                }
            }
        }
        last_fetch = board.now();
        let records = match fetch_records(&board, &config).await {
            Ok(records) => records,
            Err(e) => {
                tracing::debug!(error = %ErrorChain(&e), "progress fetch failed");
                let mut s = lock(&shared);
                s.state.next_fetch_time = board.now() + config.min_refresh_period.max(1.0);
                continue;
            }
        };
        let local = *progress.borrow();
        let mut s = lock(&shared);
        let state = s
            .ledger
            .estimate(&config, &local, &self_key, &records, board.now());
        // A global step taken meanwhile must not be undone by an older estimate.
        let mut state = state;
        if s.state.optimizer_step > state.optimizer_step && local.step < s.state.optimizer_step {
            state.optimizer_step = s.state.optimizer_step;
        }
        s.state = state;
        s.records = records;
        drop(s);
        version.send_modify(|v| *v = v.wrapping_add(1));
    }
}

async fn report_loop<B: ProgressBoard>(
    config: OptimConfig,
    board: B,
    mut progress: watch::Receiver<LocalProgress>,
) {
    let min_gap = secs(config.min_refresh_period / 2.0);
    let peer_id = board.peer_id();
    let mut last_report = board.now();
    loop {
        let heartbeat = secs((next_report_time(&config, last_report) - board.now()).max(0.0));
        tokio::select! {
            changed = progress.changed() => if changed.is_err() { break },
            () = tokio::time::sleep(heartbeat) => {}
        }
        let local = *progress.borrow_and_update();
        let now = board.now();
        last_report = now;
        let record = TrainingProgress {
            peer_id: peer_id.clone(),
            step: local.step,
            samples_accumulated: local.samples_accumulated,
            samples_per_second: local
                .samples_per_second
                .clamp(0.0, crate::MAX_SAMPLES_PER_SECOND),
            time: now,
            client_mode: local.client_mode,
        };
        let publish = board.publish(Some(record), now + config.metadata_expiration);
        // A replica that vanished holds a store until the DHT's query timeout;
        // the next report must not wait that long or this peer's record expires
        // at the others. Dropping the call leaves the store running in the DHT.
        let report_timeout = config.request_timeout.min(config.metadata_expiration / 3.0);
        match tokio::time::timeout(secs(report_timeout), publish).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %ErrorChain(&e), "progress report failed"),
            Err(_) => tracing::debug!("progress report timed out"),
        }
        // Coalesce bursts of step() calls: at most two reports per refresh period.
        tokio::time::sleep(min_gap).await;
    }
}
