//! The optimizer's configuration, with the reference's defaults.

use colony_averaging::AveragingMode;

use crate::{
    error::{OptimError, Result},
    schedule::LrSchedule,
};

/// Every knob of the collaborative optimizer. Times are seconds (the DHT's clock is a
/// float of Unix seconds, as in the reference).
///
/// Defaults follow the reference `CollaborativeOptimizer` (hivemind 1.0.1) except where
/// a field documents otherwise.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    /// Common prefix of every DHT key of this run (the reference's `prefix` / run id);
    /// progress is stored under `{prefix}_progress`. Default `"colony"`.
    pub prefix: String,
    /// Samples the whole swarm accumulates before each global step. Default 4096.
    pub target_batch_size: u64,
    /// Samples behind each `step()` call when `step` is given no batch size. Default
    /// `None`: the first explicit batch size becomes the default, as in the reference.
    pub batch_size_per_step: Option<u64>,
    /// Never refresh the collaboration state more often than this (s). Default 0.5.
    pub min_refresh_period: f64,
    /// Always refresh at least this often (s). Default 30.
    pub max_refresh_period: f64,
    /// Refresh period while no other peer is known (s). Default 3.
    pub default_refresh_period: f64,
    /// Assume this many peers may join between two refreshes. Default 3.
    pub expected_drift_peers: f64,
    /// Assume this fraction of the swarm may join or leave between refreshes. Default 0.2.
    pub expected_drift_rate: f64,
    /// Smoothing of the throughput estimate, in `(0, 1]`. Default 0.1.
    pub performance_ema_alpha: f64,
    /// Lifetime of a progress record in the DHT (s); records are re-published at half of
    /// it. Default 60.
    pub metadata_expiration: f64,
    /// Limit on one averaging round (s). The reference's default was "no limit"; every
    /// remote wait here has one. Default 60.
    pub averaging_timeout: f64,
    /// Limit on downloading the state from peers (s). Default 600.
    pub load_state_timeout: f64,
    /// Limit on one DHT read or write of progress records (s). Default 10.
    pub request_timeout: f64,
    /// A peer may lag the global step by this many steps before it must download the
    /// state. Default 1.
    pub step_tolerance: u64,
    /// Accumulate in the caller's gradient buffer instead of a private accumulator (saves
    /// memory; the caller then must not zero its gradients itself). Default false.
    pub reuse_grad_buffers: bool,
    /// How this peer takes part, the one role from the CLI down to the averager:
    /// [`AveragingMode::Node`] trains and averages; [`AveragingMode::Client`] accepts no
    /// inbound connections, contributes samples but does not count toward the global
    /// step; [`AveragingMode::Aux`] computes no gradients and only helps averaging
    /// (`step_aux`). Default node.
    pub role: AveragingMode,
    /// Records whose `time` lies further than this in the future are ignored (s): a peer
    /// cannot extrapolate its own progress forward by lying about the clock. Default 30.
    pub max_clock_skew: f64,
    /// A step reported by fewer than this many non-client peers (other than this one)
    /// does not move the global step, so one lying peer cannot declare itself far ahead
    /// and force everyone to re-download the state. Capped at the number of such peers,
    /// so with a single other peer its word is taken. Default 2.
    pub step_quorum: usize,
    /// The quorum also grows with the swarm: a step must be reported by at least this
    /// fraction of the other live non-client peers (rounded up, at least
    /// `step_quorum`), so identities that cost nothing must outnumber the honest peers
    /// to move the global step. In `[0, 1]`. Default 0.5.
    pub step_quorum_fraction: f64,
    /// Steps more than `step_tolerance + step_outlier_margin` above the (lower) median
    /// step of the other live non-client peers are ignored: a minority claiming
    /// `u64::MAX` is not counted at all. Default 2.
    pub step_outlier_margin: u64,
    /// A peer's claimed samples for a step count for at most its throughput (capped
    /// like every throughput) times the time since it could have started that step,
    /// plus this many seconds of slack (s). The start is the earliest moment this peer
    /// saw it at the step, or saw the swarm reach the step. Default 10.
    pub claim_slack: f64,
    /// With three or more peers, a peer's claimed throughput is capped at this multiple of
    /// the median, so one liar cannot make the ETA collapse. Default 10. Claimed samples
    /// are bounded with the same capped throughput (`claim_slack`).
    pub throughput_outlier_factor: f64,
    /// The learning rate as a function of the global step. Default constant 0.01.
    pub lr_schedule: LrSchedule,
    /// Another peer's averaging weight counts for at most this multiple of
    /// `target_batch_size / num_peers` when this peer reduces its parts, and
    /// for at most twice the samples it last published for this step (the
    /// margin covers samples accumulated since that report). Weights are
    /// self-declared; this keeps one peer's claim from deciding the
    /// average. The samples a peer claims toward the global step are held to
    /// the same share of the target. Default 2.
    pub max_weight_share: f64,
    /// Wire codec of the gradients in each round (`None`, the default: the
    /// averager config's `allreduce.compression`). fp16 or 8-bit gradients
    /// halve or quarter the traffic at little cost to training.
    pub grad_compression: Option<colony_averaging::Compression>,
    /// Wire codec of the parameters and the optimizer state (`None`, the
    /// default: the averager config's `allreduce.compression`). Keep it raw
    /// (or bf16) for Adam-style optimizers: fp16 and 8-bit flush second
    /// moments below 6e-8 to zero, and the update m/(√v + ε) then grows
    /// many times too large.
    pub state_compression: Option<colony_averaging::Compression>,
    /// Delayed parameter updates (hivemind's DPU): a global step's round
    /// and optimizer update run in the background while the next
    /// micro-batches compute on the previous parameters; the update lands at
    /// a later `step` call, and at the next global step at the latest
    /// (staleness 1). Every peer still ends with identical parameters. Use
    /// [`CollaborativeOptimizer::settle`](crate::CollaborativeOptimizer::settle)
    /// before reading the final ones. Default false.
    pub delay_updates: bool,
    /// Local updates, DiLoCo-style (`None`, the default: every global step
    /// applies the swarm's averaged gradient). With them each `step` call
    /// applies the local optimizer to that micro-batch's gradient at once
    /// (the inner step); after [`LocalUpdates::inner_steps`] of them (or
    /// when the swarm reaches `target_batch_size` first) the peers average
    /// their parameter deltas since the last global step and apply an outer
    /// SGD with Nesterov momentum. Traffic falls by the number of inner
    /// steps. Works with [`delay_updates`](Self::delay_updates): the outer
    /// round then runs while inner steps go on, and the local progress made
    /// meanwhile is kept on top of the new parameters.
    pub local_updates: Option<LocalUpdates>,
}

/// The outer loop of local updates ([`OptimConfig::local_updates`]).
///
/// Every peer of a run must use the same values: they are part of the
/// averaging schema, so a peer with other ones is refused at join.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LocalUpdates {
    /// H: inner steps (`step` calls with gradients) a peer takes between
    /// two outer steps. Default 8.
    pub inner_steps: u64,
    /// The outer optimizer's learning rate. Default 0.7 (DiLoCo's).
    pub outer_lr: f64,
    /// The outer optimizer's Nesterov momentum, in `[0, 1)`. Default 0.9
    /// (DiLoCo's).
    pub outer_momentum: f64,
}

impl Default for LocalUpdates {
    fn default() -> Self {
        Self {
            inner_steps: 8,
            outer_lr: 0.7,
            outer_momentum: 0.9,
        }
    }
}

impl LocalUpdates {
    /// `H` inner steps per outer step, DiLoCo's outer optimizer otherwise.
    pub fn every(inner_steps: u64) -> Self {
        Self {
            inner_steps,
            ..Self::default()
        }
    }

    /// The outer optimizer: SGD with Nesterov momentum on the averaged
    /// parameter delta (the pseudo-gradient).
    pub fn outer_sgd(&self) -> colony_kernels::Sgd {
        colony_kernels::Sgd {
            lr: self.outer_lr as f32,
            momentum: self.outer_momentum as f32,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: self.outer_momentum > 0.0,
        }
    }

    /// What peers must agree on, as the averaging schema carries it.
    pub(crate) fn schema_tag(&self) -> String {
        format!(
            "local-updates:h={};outer_lr={:e};outer_momentum={:e}",
            self.inner_steps, self.outer_lr, self.outer_momentum
        )
    }
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            prefix: "colony".to_owned(),
            target_batch_size: 4096,
            batch_size_per_step: None,
            min_refresh_period: 0.5,
            max_refresh_period: 30.0,
            default_refresh_period: 3.0,
            expected_drift_peers: 3.0,
            expected_drift_rate: 0.2,
            performance_ema_alpha: 0.1,
            metadata_expiration: 60.0,
            averaging_timeout: 60.0,
            load_state_timeout: 600.0,
            request_timeout: 10.0,
            step_tolerance: 1,
            reuse_grad_buffers: false,
            role: AveragingMode::Node,
            max_clock_skew: 30.0,
            step_quorum: 2,
            step_quorum_fraction: 0.5,
            step_outlier_margin: 2,
            claim_slack: 10.0,
            throughput_outlier_factor: 10.0,
            lr_schedule: LrSchedule::default(),
            max_weight_share: 2.0,
            grad_compression: None,
            state_compression: None,
            delay_updates: false,
            local_updates: None,
        }
    }
}

impl OptimConfig {
    /// A default config for run `prefix` with `target_batch_size`.
    pub fn new(prefix: impl Into<String>, target_batch_size: u64) -> Self {
        Self {
            prefix: prefix.into(),
            target_batch_size,
            ..Self::default()
        }
    }

    /// The DHT key of this run's progress records: `{prefix}_progress`.
    pub fn progress_key(&self) -> String {
        format!("{}_progress", self.prefix)
    }

    /// The averaging prefix of this run: `{prefix}_averaging`.
    pub fn averaging_prefix(&self) -> String {
        format!("{}_averaging", self.prefix)
    }

    /// Values of optimizer state that each round averages and each donor
    /// serves beside the parameters: the local optimizer's state, or with
    /// [`local_updates`](Self::local_updates) the outer optimizer's momentum
    /// (one value per parameter; the inner optimizer's state stays on the
    /// peer).
    pub fn averaged_state_len(&self, local: &crate::LocalOptimizer) -> usize {
        if self.local_updates.is_some() {
            local.num_params()
        } else {
            local.state().len()
        }
    }

    /// Whether this peer runs in client mode (published in its progress records).
    pub fn is_client(&self) -> bool {
        self.role == AveragingMode::Client
    }

    /// Whether this peer is auxiliary (calls `step_aux`, never `step`).
    pub fn is_auxiliary(&self) -> bool {
        self.role == AveragingMode::Aux
    }

    /// Checks every field against its documented range.
    ///
    /// # Errors
    /// [`OptimError::InvalidConfig`] naming the first offending field.
    pub fn validate(&self) -> Result<()> {
        fn bad(field: &'static str, reason: &str) -> OptimError {
            OptimError::InvalidConfig {
                field,
                reason: reason.to_owned(),
            }
        }
        fn positive(field: &'static str, v: f64) -> Result<()> {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(bad(field, "must be finite and > 0"))
            }
        }
        fn non_negative(field: &'static str, v: f64) -> Result<()> {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(bad(field, "must be finite and >= 0"))
            }
        }
        if self.prefix.is_empty() || self.prefix.contains('.') {
            return Err(bad("prefix", "must be non-empty and contain no '.'"));
        }
        if self.target_batch_size == 0 {
            return Err(bad("target_batch_size", "must be > 0"));
        }
        if self.batch_size_per_step == Some(0) {
            return Err(bad("batch_size_per_step", "must be > 0 when set"));
        }
        positive("min_refresh_period", self.min_refresh_period)?;
        positive("max_refresh_period", self.max_refresh_period)?;
        positive("default_refresh_period", self.default_refresh_period)?;
        if self.min_refresh_period > self.max_refresh_period {
            return Err(bad(
                "min_refresh_period",
                "must not exceed max_refresh_period",
            ));
        }
        non_negative("expected_drift_peers", self.expected_drift_peers)?;
        non_negative("expected_drift_rate", self.expected_drift_rate)?;
        if !(self.performance_ema_alpha > 0.0 && self.performance_ema_alpha <= 1.0) {
            return Err(bad("performance_ema_alpha", "must be in (0, 1]"));
        }
        positive("metadata_expiration", self.metadata_expiration)?;
        positive("averaging_timeout", self.averaging_timeout)?;
        positive("load_state_timeout", self.load_state_timeout)?;
        positive("request_timeout", self.request_timeout)?;
        non_negative("max_clock_skew", self.max_clock_skew)?;
        if self.step_quorum == 0 {
            return Err(bad("step_quorum", "must be >= 1"));
        }
        if !(0.0..=1.0).contains(&self.step_quorum_fraction) {
            return Err(bad("step_quorum_fraction", "must be in [0, 1]"));
        }
        non_negative("claim_slack", self.claim_slack)?;
        if !(self.throughput_outlier_factor.is_finite() && self.throughput_outlier_factor >= 1.0) {
            return Err(bad("throughput_outlier_factor", "must be finite and >= 1"));
        }
        if !(self.max_weight_share.is_finite() && self.max_weight_share >= 1.0) {
            return Err(bad("max_weight_share", "must be finite and >= 1"));
        }
        if self.reuse_grad_buffers && self.role == AveragingMode::Aux {
            return Err(bad(
                "reuse_grad_buffers",
                "an auxiliary peer has no gradients",
            ));
        }
        if let Some(local) = &self.local_updates {
            if local.inner_steps == 0 {
                return Err(bad("local_updates.inner_steps", "must be >= 1"));
            }
            positive("local_updates.outer_lr", local.outer_lr)?;
            if !(local.outer_momentum.is_finite() && (0.0..1.0).contains(&local.outer_momentum)) {
                return Err(bad("local_updates.outer_momentum", "must be in [0, 1)"));
            }
            if self.reuse_grad_buffers {
                return Err(bad(
                    "reuse_grad_buffers",
                    "local updates apply each micro-batch's gradient at once; there is nothing to accumulate",
                ));
            }
        }
        self.lr_schedule.validate()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_reference_and_validate() {
        let c = OptimConfig::default();
        assert_eq!(c.min_refresh_period, 0.5);
        assert_eq!(c.max_refresh_period, 30.0);
        assert_eq!(c.default_refresh_period, 3.0);
        assert_eq!(c.expected_drift_peers, 3.0);
        assert_eq!(c.expected_drift_rate, 0.2);
        assert_eq!(c.performance_ema_alpha, 0.1);
        assert_eq!(c.metadata_expiration, 60.0);
        assert_eq!(c.step_tolerance, 1);
        assert!(!c.reuse_grad_buffers && c.role == AveragingMode::Node);
        assert!(!c.is_client() && !c.is_auxiliary());
        c.validate().unwrap();
        assert_eq!(OptimConfig::new("run", 64).progress_key(), "run_progress");
        assert_eq!(
            OptimConfig::new("run", 64).averaging_prefix(),
            "run_averaging"
        );
    }

    #[test]
    fn validate_names_the_bad_field() {
        type Mutation = Box<dyn Fn(&mut OptimConfig)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("prefix", Box::new(|c| c.prefix = "a.b".into())),
            ("prefix", Box::new(|c| c.prefix.clear())),
            ("target_batch_size", Box::new(|c| c.target_batch_size = 0)),
            (
                "batch_size_per_step",
                Box::new(|c| c.batch_size_per_step = Some(0)),
            ),
            (
                "min_refresh_period",
                Box::new(|c| c.min_refresh_period = f64::NAN),
            ),
            (
                "min_refresh_period",
                Box::new(|c| c.min_refresh_period = 40.0),
            ),
            (
                "max_refresh_period",
                Box::new(|c| c.max_refresh_period = -1.0),
            ),
            (
                "default_refresh_period",
                Box::new(|c| c.default_refresh_period = 0.0),
            ),
            (
                "expected_drift_peers",
                Box::new(|c| c.expected_drift_peers = -1.0),
            ),
            (
                "expected_drift_rate",
                Box::new(|c| c.expected_drift_rate = f64::INFINITY),
            ),
            (
                "performance_ema_alpha",
                Box::new(|c| c.performance_ema_alpha = 0.0),
            ),
            (
                "performance_ema_alpha",
                Box::new(|c| c.performance_ema_alpha = 1.5),
            ),
            (
                "metadata_expiration",
                Box::new(|c| c.metadata_expiration = 0.0),
            ),
            (
                "averaging_timeout",
                Box::new(|c| c.averaging_timeout = f64::NAN),
            ),
            (
                "load_state_timeout",
                Box::new(|c| c.load_state_timeout = -5.0),
            ),
            ("request_timeout", Box::new(|c| c.request_timeout = 0.0)),
            ("max_clock_skew", Box::new(|c| c.max_clock_skew = -1.0)),
            ("step_quorum", Box::new(|c| c.step_quorum = 0)),
            (
                "step_quorum_fraction",
                Box::new(|c| c.step_quorum_fraction = f64::NAN),
            ),
            (
                "step_quorum_fraction",
                Box::new(|c| c.step_quorum_fraction = 1.5),
            ),
            ("claim_slack", Box::new(|c| c.claim_slack = -1.0)),
            ("max_weight_share", Box::new(|c| c.max_weight_share = 0.5)),
            (
                "throughput_outlier_factor",
                Box::new(|c| c.throughput_outlier_factor = 0.5),
            ),
            (
                "reuse_grad_buffers",
                Box::new(|c| {
                    c.role = AveragingMode::Aux;
                    c.reuse_grad_buffers = true;
                }),
            ),
            (
                "lr_schedule",
                Box::new(|c| c.lr_schedule = LrSchedule::Constant { lr: -1.0 }),
            ),
            (
                "local_updates.inner_steps",
                Box::new(|c| c.local_updates = Some(LocalUpdates::every(0))),
            ),
            (
                "local_updates.outer_lr",
                Box::new(|c| {
                    c.local_updates = Some(LocalUpdates {
                        outer_lr: 0.0,
                        ..LocalUpdates::default()
                    })
                }),
            ),
            (
                "local_updates.outer_momentum",
                Box::new(|c| {
                    c.local_updates = Some(LocalUpdates {
                        outer_momentum: 1.0,
                        ..LocalUpdates::default()
                    })
                }),
            ),
            (
                "reuse_grad_buffers",
                Box::new(|c| {
                    c.local_updates = Some(LocalUpdates::default());
                    c.reuse_grad_buffers = true;
                }),
            ),
        ];
        // A client may reuse its gradient buffers; only an auxiliary peer has none.
        let mut client = OptimConfig {
            role: AveragingMode::Client,
            reuse_grad_buffers: true,
            ..OptimConfig::default()
        };
        client.validate().unwrap();
        client.role = AveragingMode::Aux;
        assert!(client.is_auxiliary());
        for (field, mutate) in cases {
            let mut c = OptimConfig::default();
            mutate(&mut c);
            match c.validate() {
                Err(OptimError::InvalidConfig { field: f, .. }) => assert_eq!(f, field),
                other => panic!("{field}: expected InvalidConfig, got {other:?}"),
            }
        }
    }
}
