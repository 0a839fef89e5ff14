//! Learning-rate schedules as pure functions of the global step.
//!
//! The reference advanced a PyTorch scheduler once per local `.step()` and then "caught
//! up" to the local step; here the rate is computed from the collaboration's step number
//! alone, so every peer (including one that just downloaded the state) uses the same rate.

use crate::error::{OptimError, Result};

/// A learning-rate schedule: `lr = schedule.lr_at(global_step)`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LrSchedule {
    /// The same rate at every step.
    Constant {
        /// The learning rate.
        lr: f64,
    },
    /// Linear warm-up from 0 to `peak` over `warmup_steps`, then linear decay to
    /// `final_lr` at `total_steps`, constant after.
    LinearWarmupDecay {
        /// Rate at the end of warm-up.
        peak: f64,
        /// Steps of warm-up (0 for none).
        warmup_steps: u64,
        /// Step at which decay ends.
        total_steps: u64,
        /// Rate from `total_steps` on.
        final_lr: f64,
    },
    /// Linear warm-up to `peak`, then half-cosine decay to `min_lr` at `total_steps`.
    Cosine {
        /// Rate at the end of warm-up.
        peak: f64,
        /// Steps of warm-up (0 for none).
        warmup_steps: u64,
        /// Step at which decay ends.
        total_steps: u64,
        /// Rate from `total_steps` on.
        min_lr: f64,
    },
    /// `lr * gamma^(step / step_size)` (PyTorch `StepLR`).
    Step {
        /// Initial rate.
        lr: f64,
        /// Steps between decays (> 0).
        step_size: u64,
        /// Multiplicative decay per `step_size` steps.
        gamma: f64,
    },
}

impl Default for LrSchedule {
    fn default() -> Self {
        Self::Constant { lr: 0.01 }
    }
}

fn warmup(peak: f64, warmup_steps: u64, step: u64) -> Option<f64> {
    (step < warmup_steps).then(|| peak * (step + 1) as f64 / warmup_steps as f64)
}

impl LrSchedule {
    /// The learning rate at `step` (0-based global step).
    pub fn lr_at(&self, step: u64) -> f64 {
        match *self {
            Self::Constant { lr } => lr,
            Self::LinearWarmupDecay {
                peak,
                warmup_steps,
                total_steps,
                final_lr,
            } => {
                if let Some(lr) = warmup(peak, warmup_steps, step) {
                    return lr;
                }
                if step >= total_steps || total_steps <= warmup_steps {
                    return final_lr;
                }
                let progress = (step - warmup_steps) as f64 / (total_steps - warmup_steps) as f64;
                peak + (final_lr - peak) * progress
            }
            Self::Cosine {
                peak,
                warmup_steps,
                total_steps,
                min_lr,
            } => {
                if let Some(lr) = warmup(peak, warmup_steps, step) {
                    return lr;
                }
                if step >= total_steps || total_steps <= warmup_steps {
                    return min_lr;
                }
                let progress = (step - warmup_steps) as f64 / (total_steps - warmup_steps) as f64;
                min_lr + 0.5 * (peak - min_lr) * (1.0 + (std::f64::consts::PI * progress).cos())
            }
            Self::Step {
                lr,
                step_size,
                gamma,
            } => {
                let decays = step.checked_div(step_size).unwrap_or(0);
                lr * gamma.powi(decays.min(i32::MAX as u64) as i32)
            }
        }
    }

    /// Checks that every rate is finite and non-negative and the step counts are usable.
    ///
    /// # Errors
    /// [`OptimError::InvalidConfig`] naming the offending field.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: &str| OptimError::InvalidConfig {
            field: "lr_schedule",
            reason: reason.to_owned(),
        };
        let rates: &[f64] = match self {
            Self::Constant { lr } => &[*lr],
            Self::LinearWarmupDecay { peak, final_lr, .. } => &[*peak, *final_lr],
            Self::Cosine { peak, min_lr, .. } => &[*peak, *min_lr],
            Self::Step {
                lr,
                gamma,
                step_size,
            } => {
                if *step_size == 0 {
                    return Err(bad("step_size must be positive"));
                }
                if !(gamma.is_finite() && *gamma >= 0.0) {
                    return Err(bad("gamma must be finite and >= 0"));
                }
                &[*lr]
            }
        };
        if rates.iter().all(|r| r.is_finite() && *r >= 0.0) {
            Ok(())
        } else {
            Err(bad("learning rates must be finite and >= 0"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn constant() {
        let s = LrSchedule::Constant { lr: 0.3 };
        assert!(close(s.lr_at(0), 0.3) && close(s.lr_at(1_000_000), 0.3));
    }

    #[test]
    fn linear_warmup_then_decay() {
        let s = LrSchedule::LinearWarmupDecay {
            peak: 1.0,
            warmup_steps: 4,
            total_steps: 14,
            final_lr: 0.0,
        };
        assert!(close(s.lr_at(0), 0.25));
        assert!(close(s.lr_at(3), 1.0));
        assert!(close(s.lr_at(4), 1.0));
        assert!(close(s.lr_at(9), 0.5));
        assert!(close(s.lr_at(14), 0.0));
        assert!(close(s.lr_at(u64::MAX), 0.0));
    }

    #[test]
    fn cosine_hits_peak_midpoint_and_floor() {
        let s = LrSchedule::Cosine {
            peak: 1.0,
            warmup_steps: 0,
            total_steps: 10,
            min_lr: 0.1,
        };
        assert!(close(s.lr_at(0), 1.0));
        assert!(close(s.lr_at(5), 0.55));
        assert!(close(s.lr_at(10), 0.1));
        assert!(close(s.lr_at(1000), 0.1));
        let w = LrSchedule::Cosine {
            peak: 2.0,
            warmup_steps: 2,
            total_steps: 2,
            min_lr: 0.0,
        };
        assert!(close(w.lr_at(0), 1.0));
        assert!(close(w.lr_at(2), 0.0));
    }

    #[test]
    fn step_decay_like_pytorch_steplr() {
        let s = LrSchedule::Step {
            lr: 0.1,
            step_size: 10,
            gamma: 0.1,
        };
        assert!(close(s.lr_at(9), 0.1));
        assert!(close(s.lr_at(10), 0.1 * 0.1));
        assert!(close(s.lr_at(25), 0.1 * 0.1 * 0.1));
        assert!(s.lr_at(u64::MAX).is_finite());
    }

    #[test]
    fn validate_rejects_bad_rates() {
        assert!(LrSchedule::Constant { lr: f64::NAN }.validate().is_err());
        assert!(LrSchedule::Constant { lr: -1.0 }.validate().is_err());
        assert!(
            LrSchedule::Step {
                lr: 0.1,
                step_size: 0,
                gamma: 0.5
            }
            .validate()
            .is_err()
        );
        assert!(
            LrSchedule::Step {
                lr: 0.1,
                step_size: 1,
                gamma: f64::INFINITY
            }
            .validate()
            .is_err()
        );
        assert!(LrSchedule::default().validate().is_ok());
    }

    #[test]
    fn every_peer_agrees_because_it_is_a_function_of_the_step() {
        let s = LrSchedule::Cosine {
            peak: 0.5,
            warmup_steps: 3,
            total_steps: 50,
            min_lr: 0.0,
        };
        let a: Vec<f64> = (0..60).map(|i| s.lr_at(i)).collect();
        let b: Vec<f64> = (0..60).map(|i| s.clone().lr_at(i)).collect();
        assert_eq!(a, b);
    }
}
