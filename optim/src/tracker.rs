//! The collaboration state machine: pure and deterministic.
//!
//! Inputs are this peer's live progress, the progress records read from the DHT and the
//! current time; outputs are a [`CollaborationState`] (what the swarm is doing) and a
//! [`StepPlan`] (what this peer should do when it is ready). Nothing here touches the
//! network or a clock, so every branch is unit-tested.
//!
//! Differences from the reference `fetch_collaboration_state`, each a fix:
//! * this peer's own live progress replaces its (possibly stale) DHT record, so it always
//!   counts itself and `num_peers` is at least 1;
//! * with no other peer the ETA uses local *samples* (the reference subtracted the number
//!   of `step()` calls) and a zero throughput gives an infinite ETA, not a division error;
//! * records are bounded: expired, goodbye (nil), unparseable, far-future-time and stale
//!   records are ignored; a peer's samples count at most up to the target; extrapolation
//!   is limited to `metadata_expiration`; throughput outliers are capped at a multiple of
//!   the median; a step claimed by a single peer among several does not move the global
//!   step (`step_quorum`);
//! * the averaging weight is the number of local samples, not
//!   `local_samples / (target / num_peers)`, which depends on each peer's view of the
//!   swarm size (see [`StepPlan::Average`]).

use validator::Validate;

use crate::{config::OptimConfig, progress::TrainingProgress};

/// This peer's own, live progress.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LocalProgress {
    /// Local optimizer step.
    pub step: u64,
    /// Samples accumulated toward `step + 1`.
    pub samples_accumulated: u64,
    /// Measured throughput (samples per second).
    pub samples_per_second: f64,
    /// Whether this peer runs in client mode.
    pub client_mode: bool,
}

/// One entry of the `{prefix}_progress` dictionary as read from the DHT.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerRecord {
    /// The subkey: the owner's public key bytes (or its marker).
    pub key: Vec<u8>,
    /// The decoded record; `None` for a goodbye (nil) or a value that failed to decode.
    pub progress: Option<TrainingProgress>,
    /// The record's absolute expiration time (DHT seconds).
    pub expiration: f64,
}

/// What the swarm is doing, as estimated by this peer.
#[derive(Debug, Clone, PartialEq)]
pub struct CollaborationState {
    /// The global optimizer step (highest step of non-client peers, see `step_quorum`).
    pub optimizer_step: u64,
    /// Samples reported at the global step, summed over peers (this one included).
    pub samples_accumulated: u64,
    /// The run's target batch size.
    pub target_batch_size: u64,
    /// Live peers, this one included.
    pub num_peers: usize,
    /// How many of them are in client mode.
    pub num_clients: usize,
    /// Sum of the peers' throughput (samples per second), after capping.
    pub samples_per_second: f64,
    /// Estimated time at which the target will be reached (DHT seconds; may be `inf`).
    pub eta_next_step: f64,
    /// When to refresh this estimate (DHT seconds).
    pub next_fetch_time: f64,
    /// Records ignored because they were invalid, from the future or stale.
    pub rejected_records: usize,
    /// Step claims ignored because they lie far above the median step.
    pub ignored_steps: usize,
    /// Sample claims counted for less than they claimed (share or rate bound).
    pub bounded_claims: usize,
}

impl CollaborationState {
    /// Whether this peer, at `local_step`, should try to run the global step at `now`:
    /// the swarm reached the target, the ETA has passed, or the swarm already moved on.
    pub fn ready_for_step(&self, local_step: u64, now: f64) -> bool {
        self.samples_accumulated >= self.target_batch_size
            || now >= self.eta_next_step
            || self.optimizer_step > local_step
    }

    /// Records that this peer finished a step and is now at `local_step`.
    pub fn register_step(&mut self, local_step: u64) {
        self.optimizer_step = self.optimizer_step.max(local_step);
        self.samples_accumulated = 0;
        self.eta_next_step = f64::INFINITY;
    }

    /// Whether a peer at `local_step` is within `tolerance` steps of the global step.
    pub fn is_synchronized(&self, local_step: u64, tolerance: u64) -> bool {
        local_step.saturating_add(tolerance) >= self.optimizer_step
    }
}

/// A peer record after validation, with the bounds applied.
#[derive(Debug, Clone, Copy)]
struct Accepted {
    step: u64,
    samples: u64,
    samples_per_second: f64,
    time: f64,
    client_mode: bool,
}

fn accept(config: &OptimConfig, record: &PeerRecord, now: f64) -> Option<Accepted> {
    let progress = record.progress.as_ref()?;
    if progress.validate().is_err() {
        return None;
    }
    if progress.time > now + config.max_clock_skew
        || progress.time < now - config.metadata_expiration
    {
        return None;
    }
    Some(Accepted {
        step: progress.step,
        samples: progress.samples_accumulated.min(config.target_batch_size),
        samples_per_second: progress.samples_per_second,
        time: progress.time,
        client_mode: progress.client_mode,
    })
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        0.5 * (sorted[mid - 1] + sorted[mid])
    }
}

/// Estimates the collaboration state from this peer's progress and the peers' records
/// (the reference's `fetch_collaboration_state`, without the fetch), as a peer that has
/// no history of the swarm: [`ClaimLedger::estimate`] with a fresh ledger. A running
/// peer keeps one ledger across estimates, so that it can also bound how fast each
/// peer's claimed samples grow.
///
/// `self_key` is this peer's subkey: its own DHT record is replaced by `local`.
pub fn estimate_collaboration_state(
    config: &OptimConfig,
    local: &LocalProgress,
    self_key: &[u8],
    records: &[PeerRecord],
    now: f64,
) -> CollaborationState {
    ClaimLedger::default().estimate(config, local, self_key, records, now)
}

/// What one peer remembers of the others' progress claims between two estimates, to
/// bound the samples each claims by how long it can have been accumulating them.
///
/// Pure state (no clock, no network): `now` is passed in. Bounded: it holds an entry
/// only for the peers of the latest estimate.
#[derive(Debug, Clone, Default)]
pub struct ClaimLedger {
    /// The global step of the latest estimate and, if this peer saw it change, since
    /// when it holds (`None` on the first estimate: the swarm may have been at that
    /// step for a long time already).
    global: Option<(u64, Option<f64>)>,
    /// Per peer key: the step it claimed last and the earliest time it can have
    /// started accumulating for it.
    peers: std::collections::HashMap<Vec<u8>, PeerClaim>,
}

#[derive(Debug, Clone, Copy)]
struct PeerClaim {
    step: u64,
    since: f64,
}

impl ClaimLedger {
    /// Estimates the collaboration state (see the module documentation for the rules)
    /// and remembers the claims for the next estimate.
    ///
    /// Bounds against lying peers, besides the record checks:
    /// * the global step is the `q`-th highest step of the other live non-client peers,
    ///   with `q = max(step_quorum, ⌈step_quorum_fraction · n⌉)` (capped at `n`), and
    ///   steps more than `step_tolerance + step_outlier_margin` above their lower
    ///   median are ignored;
    /// * a peer's samples at the global step count for at most
    ///   `max_weight_share · target / num_peers`, and, once this peer knows since when
    ///   the peer can have been accumulating for that step, for at most its capped
    ///   throughput times that time plus `claim_slack`.
    pub fn estimate(
        &mut self,
        config: &OptimConfig,
        local: &LocalProgress,
        self_key: &[u8],
        records: &[PeerRecord],
        now: f64,
    ) -> CollaborationState {
        let state = self.estimate_inner(config, local, self_key, records, now);
        let since = match self.global {
            Some((step, since)) if step == state.optimizer_step => since,
            // First estimate: unknown. A change: from now on.
            None => None,
            Some(_) => Some(now),
        };
        self.global = Some((state.optimizer_step, since));
        state
    }

    /// The earliest time `key`, now claiming `step`, can have started accumulating for
    /// it: when this peer first saw it at that step, or saw the swarm reach it.
    fn known_since(&self, key: &[u8], step: u64) -> Option<f64> {
        let own = self
            .peers
            .get(key)
            .filter(|c| c.step == step)
            .map(|c| c.since);
        let swarm = match self.global {
            Some((g, Some(since))) if g == step => Some(since),
            _ => None,
        };
        match (own, swarm) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn estimate_inner(
        &mut self,
        config: &OptimConfig,
        local: &LocalProgress,
        self_key: &[u8],
        records: &[PeerRecord],
        now: f64,
    ) -> CollaborationState {
        let target = config.target_batch_size;
        let local_sps = if local.samples_per_second.is_finite() {
            local.samples_per_second.max(0.0)
        } else {
            0.0
        };
        let mut rejected = 0;
        let mut others = Vec::with_capacity(records.len());
        for record in records {
            if record.key == self_key || record.expiration <= now || record.progress.is_none() {
                // Own record (replaced by live progress), expired, or a goodbye.
                continue;
            }
            match accept(config, record, now) {
                Some(peer) => others.push((record.key.as_slice(), peer)),
                None => rejected += 1,
            }
        }

        if others.is_empty() {
            self.peers.clear();
            let remaining = target.saturating_sub(local.samples_accumulated) as f64;
            let eta = if remaining <= 0.0 {
                0.0
            } else if local_sps > 0.0 {
                remaining / local_sps
            } else {
                f64::INFINITY
            };
            tracing::debug!(rejected, "found no other active peers");
            return CollaborationState {
                optimizer_step: local.step,
                samples_accumulated: local.samples_accumulated,
                target_batch_size: target,
                num_peers: 1,
                num_clients: usize::from(local.client_mode),
                samples_per_second: local_sps,
                eta_next_step: now + eta,
                next_fetch_time: now + config.default_refresh_period,
                rejected_records: rejected,
                ignored_steps: 0,
                bounded_claims: 0,
            };
        }

        let num_peers = others.len() + 1;
        let num_clients =
            others.iter().filter(|(_, p)| p.client_mode).count() + usize::from(local.client_mode);

        let (global_step, ignored_steps) = global_step(config, local.step, &others);

        let cap = if num_peers >= 3 {
            let mut rates: Vec<f64> = others.iter().map(|(_, p)| p.samples_per_second).collect();
            rates.push(local_sps);
            config.throughput_outlier_factor * median(&rates)
        } else {
            f64::INFINITY
        };
        let share_cap = config.max_weight_share * target as f64 / num_peers as f64;

        let mut total_samples: u64 = 0;
        let mut estimated_samples = 0.0;
        // This peer counts itself as it is, observed right now.
        let mut total_sps = local_sps.min(cap);
        if local.step == global_step {
            let samples = local.samples_accumulated.min(target);
            total_samples = samples;
            estimated_samples = samples as f64;
        }
        let mut bounded_claims = 0;
        let mut claims = std::collections::HashMap::with_capacity(others.len());
        for (key, peer) in &others {
            let sps = peer.samples_per_second.min(cap);
            // Peers behind the global step will resynchronise and contribute shortly, so
            // their throughput counts, but not their samples.
            total_sps += sps;
            let since = self.known_since(key, peer.step);
            let mut granted = (peer.samples as f64).min(share_cap);
            if let Some(since) = since {
                granted =
                    granted.min(sps * ((peer.time.min(now) - since).max(0.0) + config.claim_slack));
            }
            let granted = granted.max(0.0).floor();
            if granted < peer.samples as f64 {
                bounded_claims += 1;
                tracing::debug!(
                    peer = %String::from_utf8_lossy(&key[..key.len().min(16)]),
                    claimed = peer.samples,
                    counted = granted,
                    "progress claim bounded"
                );
            }
            // Remember since when the peer can have been accumulating: what is known,
            // else what its (bounded) claim implies at its throughput.
            let implied = if sps > 0.0 {
                peer.time - granted / sps
            } else {
                peer.time
            };
            claims.insert(
                key.to_vec(),
                PeerClaim {
                    step: peer.step,
                    since: since.unwrap_or(implied.min(now)),
                },
            );
            if peer.step == global_step {
                total_samples = total_samples.saturating_add(granted as u64);
                let elapsed = (now - peer.time).clamp(0.0, config.metadata_expiration);
                estimated_samples += granted + elapsed * sps;
            }
        }
        self.peers = claims;

        let remaining = (target as f64 - estimated_samples).max(0.0);
        let time_to_step = if remaining <= 0.0 {
            0.0
        } else if total_sps > 0.0 {
            remaining / total_sps
        } else {
            f64::INFINITY
        };
        let n = num_peers as f64;
        let expected_max_peers =
            (n + config.expected_drift_peers).max(n * (1.0 + config.expected_drift_rate));
        let time_to_fetch = (time_to_step * n / expected_max_peers)
            .clamp(config.min_refresh_period, config.max_refresh_period);
        let time_to_fetch = if time_to_fetch.is_nan() {
            config.max_refresh_period
        } else {
            time_to_fetch
        };
        tracing::debug!(
            total_samples,
            num_peers,
            eta = time_to_step,
            refresh_in = time_to_fetch,
            rejected,
            ignored_steps,
            bounded_claims,
            "collaboration state"
        );
        CollaborationState {
            optimizer_step: global_step,
            samples_accumulated: total_samples,
            target_batch_size: target,
            num_peers,
            num_clients,
            samples_per_second: total_sps,
            eta_next_step: now + time_to_step,
            next_fetch_time: now + time_to_fetch,
            rejected_records: rejected,
            ignored_steps,
            bounded_claims,
        }
    }
}

/// The global step from the other peers' claims: the `q`-th highest step of the live
/// non-client peers, ignoring outliers far above their lower median, and never below
/// this peer's own step. Returns it with the number of claims ignored as outliers.
fn global_step(
    config: &OptimConfig,
    local_step: u64,
    others: &[(&[u8], Accepted)],
) -> (u64, usize) {
    let mut steps: Vec<u64> = others
        .iter()
        .filter(|(_, p)| !p.client_mode)
        .map(|(_, p)| p.step)
        .collect();
    if steps.is_empty() {
        return (local_step, 0);
    }
    steps.sort_unstable();
    let lower_median = steps[(steps.len() - 1) / 2];
    let ceiling = lower_median
        .saturating_add(config.step_tolerance)
        .saturating_add(config.step_outlier_margin);
    let live = steps.len();
    steps.retain(|&s| s <= ceiling);
    let ignored = live - steps.len();
    let by_fraction = (config.step_quorum_fraction * live as f64).ceil() as usize;
    let quorum = config.step_quorum.max(by_fraction).min(steps.len()).max(1);
    // Sorted ascending: the quorum-th highest.
    let step = steps[steps.len() - quorum];
    if ignored > 0 {
        tracing::debug!(
            ignored,
            ceiling,
            "progress claims far above the median step ignored"
        );
    }
    (step.max(local_step), ignored)
}

/// What a training peer does once it is ready for the global step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StepPlan {
    /// Too far behind the global step: download the state instead of stepping.
    LoadState,
    /// Average parameters and gradients with the swarm, with this weight, then step.
    Average {
        /// This peer's accumulated samples. The reference used
        /// `local_samples / (target / num_peers)`, which biases the mean whenever peers
        /// disagree on `num_peers` (one has not yet seen a record another has); the raw
        /// count gives the exact sample-weighted mean whatever the views.
        weight: f64,
    },
    /// Alone in the swarm: step on local gradients.
    StepAlone,
}

/// Decides what a ready peer does with a freshly estimated `state`.
pub fn plan_step(
    config: &OptimConfig,
    local_step: u64,
    local_samples: u64,
    state: &CollaborationState,
) -> StepPlan {
    if !state.is_synchronized(local_step, config.step_tolerance) {
        StepPlan::LoadState
    } else if state.num_peers > 1 {
        StepPlan::Average {
            weight: local_samples as f64,
        }
    } else {
        StepPlan::StepAlone
    }
}

/// The local step after a global step: one past the local step, or the global step if
/// that is further (a peer that stepped alone after the swarm moved on lands on the
/// swarm's step rather than behind it). `hivemind.Optimizer` uses the same rule.
pub fn next_local_step(local_step: u64, global_step: u64) -> u64 {
    local_step.saturating_add(1).max(global_step)
}

/// The step a peer should train at: a peer behind the global step by no more than
/// `tolerance` jumps to it (its accumulated samples then count toward the swarm's current
/// step instead of being ignored forever, the reference's step-tolerance livelock); one
/// further behind must load the state instead (`None`).
pub fn catch_up(local_step: u64, global_step: u64, tolerance: u64) -> Option<u64> {
    if local_step >= global_step {
        Some(local_step)
    } else if local_step.saturating_add(tolerance) >= global_step {
        Some(global_step)
    } else {
        None
    }
}

/// When the progress reporter should publish again: at once if progress changed,
/// otherwise when half of the record's lifetime has passed.
pub fn next_report_time(config: &OptimConfig, last_report: f64) -> f64 {
    last_report + config.metadata_expiration / 2.0
}

/// Caps on the weights other peers may declare when this peer reduces
/// their parts in the round for `local_step`: each peer counts for at most
/// `max_weight_share · target / num_peers`, and a peer that published a
/// record for this step for at most twice what that record allows it to
/// hold by now: the samples it published plus its published throughput
/// over the record's age and `claim_slack` (at least one sample). Weights
/// are sample counts, and an honest peer's weight is its published count
/// plus what it accumulated since that report, so a cap on the published
/// count alone clipped honest peers whose latest record was a moment old.
pub fn weight_limits(
    config: &OptimConfig,
    records: &[PeerRecord],
    local_step: u64,
    num_peers: usize,
    now: f64,
) -> crate::ports::WeightLimits {
    let default =
        config.max_weight_share * config.target_batch_size as f64 / num_peers.max(1) as f64;
    let per_peer = records
        .iter()
        .filter_map(|r| {
            let a = accept(config, r, now)?;
            let p = r.progress.as_ref()?;
            (a.step == local_step).then(|| {
                (
                    p.peer_id.clone(),
                    (2.0 * could_hold(config, &a, now)).max(1.0).min(default),
                )
            })
        })
        .collect();
    crate::ports::WeightLimits { default, per_peer }
}

/// The samples a peer can hold by `now` by its own record: what it
/// published plus its throughput since then and `claim_slack`.
fn could_hold(config: &OptimConfig, a: &Accepted, now: f64) -> f64 {
    let sps = if a.samples_per_second.is_finite() {
        a.samples_per_second.max(0.0)
    } else {
        0.0
    };
    a.samples as f64 + sps * ((now - a.time).max(0.0) + config.claim_slack)
}

#[cfg(test)]
mod tests;
