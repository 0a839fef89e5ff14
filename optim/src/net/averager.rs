//! [`SwarmAverager`] over `colony-averaging`'s [`DecentralizedAverager`]: DHT
//! matchmaking, butterfly all-reduce on the encrypted data plane, state sharing.

use std::time::Duration;

use colony_averaging::{AveragerConfig, AveragingMode, DecentralizedAverager};
use colony_dht::{Dht, dht_time};

use crate::{
    config::OptimConfig,
    error::{OptimError, Result},
    ports::{PeerState, SwarmAverager},
};

/// How long a state-donor declaration lives (s); re-declared after every step.
const DONOR_TTL: f64 = 600.0;

fn averaging_err(op: &'static str) -> impl Fn(colony_averaging::AveragingError) -> OptimError {
    move |source| OptimError::Averaging { op, source }
}

/// The optimizer's averaging layer on a real swarm.
///
/// The averager holds three tensors laid out as the optimizer sends them: parameters,
/// gradients, optimizer state (with local updates: the parameters of the last
/// global step, the parameter deltas since, the outer momentum), each in its own wire codec
/// ([`OptimConfig::grad_compression`], [`OptimConfig::state_compression`]). A round
/// averages the optimizer's own buffers in place (results applied only on
/// success). After each step the optimizer hands over a snapshot of its state
/// (parameters and optimizer state), which this peer hashes and declares in
/// the background (the newest waiting snapshot wins) and serves to late
/// joiners under `{prefix}.all_averagers` with its step as priority, one
/// copy for every request.
#[derive(Debug)]
pub struct NetworkAverager {
    averager: DecentralizedAverager,
    num_params: usize,
    state_len: usize,
    paths: DataPathCounts,
    rounds: RoundStats,
    declarer: Declarer,
}

/// Declares shared states in the background, newest first: hashing a state
/// (SHA-256 over all of it, about 0.1 s for 120 MB here) and storing its
/// declaration stay off the optimizer's step. A state handed over while an
/// older one is still being declared replaces the older one's turn.
#[derive(Debug)]
struct Declarer {
    /// The state waiting to be declared (at most one: the newest).
    next: std::sync::Arc<std::sync::Mutex<Option<PeerState>>>,
    wake: std::sync::Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Declarer {
    fn start(averager: DecentralizedAverager, num_params: usize) -> Self {
        let next = std::sync::Arc::new(std::sync::Mutex::new(None::<PeerState>));
        let wake = std::sync::Arc::new(tokio::sync::Notify::new());
        let task = tokio::spawn({
            let (next, wake) = (next.clone(), wake.clone());
            async move {
                loop {
                    wake.notified().await;
                    let state = next
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .take();
                    if let Some(state) = state
                        && let Err(e) = declare(&averager, num_params, state).await
                    {
                        tracing::warn!(error = %crate::error::ErrorChain(&e), "could not share the state");
                    }
                }
            }
        });
        Self { next, wake, task }
    }

    fn hand_over(&self, state: PeerState) {
        *self
            .next
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(state);
        self.wake.notify_one();
    }
}

impl Drop for Declarer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Declares `state` as this peer's: the snapshot itself is served, with no
/// copy. Gradients are not state: their tensor is zeros (untouched pages).
async fn declare(averager: &DecentralizedAverager, n: usize, state: PeerState) -> Result<()> {
    let metadata = colony_schema::to_msgpack(&state.step).map_err(|source| OptimError::Schema {
        op: "encode the shared state's step",
        source,
    })?;
    let tensors = vec![state.params, vec![0.0; n], state.optimizer_state];
    averager
        .declare_state_with(state.step as f64, metadata, tensors, dht_time() + DONOR_TTL)
        .await
        .map_err(averaging_err("declare state"))
}

/// What this peer's rounds looked like so far.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RoundStats {
    /// Wall time of each round's all-reduce (s), in order.
    pub allreduce_s: Vec<f64>,
    /// This peer's share of the elements reduced in each round (0 for a
    /// client or a peer the balancer gave nothing), in order.
    pub span_fraction: Vec<f64>,
    /// Elements averaged in the latest round (the whole flat buffer).
    pub elements: usize,
    /// Wall time of each successful `average` call (s): matchmaking, the
    /// all-reduce and what the averager does around it, in order.
    pub round_s: Vec<f64>,
}

/// Data-plane connections of this peer's rounds so far, by the path they took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DataPathCounts {
    /// Direct TCP connections to a member's announced data address.
    pub direct: u64,
    /// Streams over the libp2p connection (one-port peers, unreachable or
    /// wrong data addresses).
    pub libp2p: u64,
}

impl NetworkAverager {
    /// Starts an averager for a model of `num_params` parameters and `state_len`
    /// optimizer-state values ([`OptimConfig::averaged_state_len`]), in the role of `optim.role` (the one source of the
    /// peer's role: `averaging.mode` is set from it). `averaging.prefix` should be the
    /// optimizer's [`averaging_prefix`](crate::OptimConfig::averaging_prefix).
    ///
    /// # Errors
    /// [`OptimError::InvalidConfig`] if `averaging.mode` was set to a role other than the
    /// default and `optim.role`; [`OptimError::Averaging`] if the averager cannot start.
    pub async fn new(
        dht: Dht,
        optim: &OptimConfig,
        mut averaging: AveragerConfig,
        num_params: usize,
        state_len: usize,
    ) -> Result<Self> {
        averaging.mode = role_for(optim, &averaging)?;
        if optim.grad_compression.is_some() || optim.state_compression.is_some() {
            let all = averaging.allreduce.compression;
            let grads = optim.grad_compression.unwrap_or(all);
            let state = optim.state_compression.unwrap_or(all);
            averaging.allreduce.tensor_compression = vec![state, grads, state];
        }
        if let Some(local) = &optim.local_updates {
            // Parameter deltas and gradients of the same length must never
            // meet in one round, nor runs with another H or outer optimizer.
            let tag = local.schema_tag();
            let schema_tag = &mut averaging.allreduce.schema_tag;
            *schema_tag = if schema_tag.is_empty() {
                tag
            } else {
                format!("{schema_tag};{tag}")
            };
        }
        warn_if_state_codec_is_lossy(&averaging, state_len);
        let config = averaging;
        let tensors = vec![
            vec![0.0; num_params],
            vec![0.0; num_params],
            vec![0.0; state_len],
        ];
        let averager = DecentralizedAverager::new(dht, tensors, config)
            .await
            .map_err(averaging_err("start"))?;
        Ok(Self {
            declarer: Declarer::start(averager.clone(), num_params),
            averager,
            num_params,
            state_len,
            paths: DataPathCounts::default(),
            rounds: RoundStats::default(),
        })
    }

    /// The underlying averager.
    pub fn inner(&self) -> &DecentralizedAverager {
        &self.averager
    }

    /// Connections of the rounds so far (sent and served), by path.
    pub fn path_counts(&self) -> DataPathCounts {
        self.paths
    }

    /// Timing and span share of the rounds so far.
    pub fn round_stats(&self) -> &RoundStats {
        &self.rounds
    }

    fn record(&mut self, outcome: &colony_averaging::StepOutcome) {
        let round = &outcome.round;
        self.paths.direct += round.direct_connections() as u64;
        self.paths.libp2p += round.libp2p_connections() as u64;
        // Bounded: a long run keeps the latest rounds only.
        const KEEP: usize = 4096;
        if self.rounds.allreduce_s.len() >= KEEP {
            self.rounds.allreduce_s.drain(..KEEP / 2);
            self.rounds.span_fraction.drain(..KEEP / 2);
            let drop = self.rounds.round_s.len().min(KEEP / 2);
            self.rounds.round_s.drain(..drop);
        }
        let total: usize = round.span_sizes.iter().sum();
        self.rounds.elements = total;
        let mine = round.span_sizes.get(round.my_index).copied().unwrap_or(0);
        self.rounds
            .allreduce_s
            .push(outcome.allreduce_time.as_secs_f64());
        self.rounds.span_fraction.push(if total == 0 {
            0.0
        } else {
            mine as f64 / total as f64
        });
    }

    fn len(&self) -> usize {
        2 * self.num_params + self.state_len
    }
}

/// Says so when the optimizer state (Adam's moments) would travel in a codec that
/// flushes small values to zero.
fn warn_if_state_codec_is_lossy(averaging: &AveragerConfig, state_len: usize) {
    use colony_averaging::Compression;
    let state = match averaging.allreduce.tensor_compression.as_slice() {
        [_, _, state] => *state,
        _ => averaging.allreduce.compression,
    };
    if state_len > 0 && matches!(state, Compression::Float16 | Compression::Blockwise8Bit) {
        tracing::warn!(
            codec = ?state,
            "the optimizer state is averaged in a codec that flushes values below 6e-8 to zero: \
             Adam's second moments vanish and its updates grow; set state_compression to none or bf16"
        );
    }
}

/// The averaging mode for `optim`'s role. `averaging.mode` left at its default takes the
/// role; set to anything else, it must agree, so the two configs never disagree.
fn role_for(optim: &OptimConfig, averaging: &AveragerConfig) -> Result<AveragingMode> {
    if averaging.mode != AveragingMode::default() && averaging.mode != optim.role {
        return Err(OptimError::InvalidConfig {
            field: "role",
            reason: format!(
                "is {:?} but the averager config says {:?}; set the role in OptimConfig only",
                optim.role, averaging.mode
            ),
        });
    }
    Ok(optim.role)
}

impl SwarmAverager for NetworkAverager {
    fn limit_weights(&mut self, limits: &crate::ports::WeightLimits) {
        let per_peer = limits
            .per_peer
            .iter()
            .filter_map(|(id, cap)| {
                let id: colony_dht::PeerId = id.parse().ok()?;
                Some((id.to_bytes(), *cap as f32))
            })
            .collect();
        self.averager.set_weight_caps(colony_averaging::WeightCaps {
            default: Some(limits.default as f32),
            per_peer,
        });
    }

    async fn average(
        &mut self,
        tensors: &mut [&mut [f32]],
        weight: f64,
        timeout: Duration,
    ) -> Result<usize> {
        let started = std::time::Instant::now();
        let lengths: Vec<usize> = tensors.iter().map(|t| t.len()).collect();
        if lengths != [self.num_params, self.num_params, self.state_len] {
            return Err(OptimError::LengthMismatch {
                what: "averaged tensors",
                expected: self.len(),
                actual: lengths.iter().sum(),
            });
        }
        // The optimizer's buffers themselves: no copy in or out.
        let outcome = self
            .averager
            .step_with(tensors, Some(weight as f32), timeout)
            .await
            .map_err(averaging_err("step"))?;
        self.rounds.round_s.push(started.elapsed().as_secs_f64());
        self.record(&outcome);
        Ok(outcome.group.members.len())
    }

    async fn assist(&mut self, timeout: Duration) -> Result<usize> {
        let outcome = self
            .averager
            .step(None, timeout)
            .await
            .map_err(averaging_err("assist"))?;
        self.record(&outcome);
        Ok(outcome.group.members.len())
    }

    async fn share_state(&mut self, state: PeerState) -> Result<()> {
        let n = self.num_params;
        if state.params.len() != n || state.optimizer_state.len() != self.state_len {
            return Err(OptimError::LengthMismatch {
                what: "shared state",
                expected: n + self.state_len,
                actual: state.params.len() + state.optimizer_state.len(),
            });
        }
        // Hashed and declared in the background, off the step.
        self.declarer.hand_over(state);
        Ok(())
    }

    async fn load_state(&mut self, timeout: Duration, max_step: u64) -> Result<Option<PeerState>> {
        // Downloaded without touching the averager's buffer: the driver
        // checks it (sizes, finiteness, step) before anything is installed.
        let state = match self
            .averager
            .download_state_from_peers(timeout, max_step as f64)
            .await
        {
            Ok(s) => s,
            Err(
                e @ (colony_averaging::AveragingError::NoStateDonor { .. }
                | colony_averaging::AveragingError::NoVouchedState { .. }),
            ) => {
                tracing::info!(error = %e, "no state to download");
                return Ok(None);
            }
            Err(e) => return Err(averaging_err("load state")(e)),
        };
        let step: u64 = colony_schema::from_msgpack_strict(&state.metadata).map_err(|source| {
            OptimError::Schema {
                op: "decode the donors' step",
                source,
            }
        })?;
        if step as f64 != state.priority {
            tracing::warn!(
                step,
                priority = state.priority,
                "refusing a state whose step differs from its declared priority"
            );
            return Ok(None);
        }
        let mut tensors = state.tensors.into_iter();
        let (Some(params), Some(_grads), Some(optimizer_state)) =
            (tensors.next(), tensors.next(), tensors.next())
        else {
            tracing::warn!("refusing a state that is not params, grads and optimizer state");
            return Ok(None);
        };
        Ok(Some(PeerState {
            step,
            params,
            optimizer_state,
        }))
    }

    async fn shutdown(&mut self) {
        self.declarer.task.abort();
        self.averager.shutdown();
    }

    async fn abandon(&mut self) {
        self.declarer.task.abort();
        self.averager.abandon();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_averager_takes_its_mode_from_the_optimizer_role() {
        let mut optim = OptimConfig::new("run", 8);
        let averaging = AveragerConfig::new(optim.averaging_prefix());
        for role in [
            AveragingMode::Node,
            AveragingMode::Client,
            AveragingMode::Aux,
        ] {
            optim.role = role;
            assert_eq!(role_for(&optim, &averaging).unwrap(), role);
            // Saying the same twice is fine; saying something else is refused.
            let mut same = averaging.clone();
            same.mode = role;
            assert_eq!(role_for(&optim, &same).unwrap(), role);
        }
        optim.role = AveragingMode::Node;
        let mut other = averaging;
        other.mode = AveragingMode::Client;
        assert!(matches!(
            role_for(&optim, &other),
            Err(OptimError::InvalidConfig { field: "role", .. })
        ));
    }
}
