//! Hyperparameters of the fused local optimizer updates.
//!
//! The learning rate is a field, not a schedule: the caller computes it from
//! the global step (the schedule is a pure function of the step) and passes a
//! fresh value each step. Formulas follow PyTorch (`torch.optim.SGD`,
//! `torch.optim.AdamW`) and LAMB as in `torch_optimizer.Lamb` / apex
//! `FusedLAMB` with bias correction.
//!
//! NaN/inf gradients propagate into the parameters and optimizer state; check
//! [`all_finite`](crate::cpu::all_finite) before stepping.

use crate::{KernelError, Result};

fn check(
    op: &'static str,
    name: &'static str,
    v: f32,
    ok: bool,
    expected: &'static str,
) -> Result<()> {
    if ok && v.is_finite() {
        Ok(())
    } else {
        Err(KernelError::InvalidHyperparameter {
            op,
            name,
            value: f64::from(v),
            expected,
        })
    }
}

/// SGD with momentum, dampening, Nesterov and (L2, coupled) weight decay.
///
/// ```text
/// g = grad + weight_decay * p
/// buf = momentum * buf + (1 - dampening) * g      (buf starts at 0)
/// d = nesterov ? g + momentum * buf : buf          (d = g when momentum == 0)
/// p -= lr * d
/// ```
/// With `buf` starting at zero and `dampening == 0` the first step gives
/// `buf = g`, exactly PyTorch's first step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sgd {
    /// Learning rate (>= 0). Default 0.01.
    pub lr: f32,
    /// Momentum factor in [0, 1). Default 0.9.
    pub momentum: f32,
    /// Dampening in [0, 1]. Default 0.
    pub dampening: f32,
    /// L2 weight decay (>= 0). Default 0.
    pub weight_decay: f32,
    /// Nesterov momentum. Default false.
    pub nesterov: bool,
}

impl Default for Sgd {
    fn default() -> Self {
        Self {
            lr: 0.01,
            momentum: 0.9,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
        }
    }
}

impl Sgd {
    /// Checks every field's range.
    ///
    /// # Errors
    /// [`KernelError::InvalidHyperparameter`] naming the first bad field.
    pub fn validate(&self) -> Result<()> {
        const OP: &str = "sgd";
        check(OP, "lr", self.lr, self.lr >= 0.0, ">= 0")?;
        check(
            OP,
            "momentum",
            self.momentum,
            (0.0..1.0).contains(&self.momentum),
            "[0, 1)",
        )?;
        check(
            OP,
            "dampening",
            self.dampening,
            (0.0..=1.0).contains(&self.dampening),
            "[0, 1]",
        )?;
        check(
            OP,
            "weight_decay",
            self.weight_decay,
            self.weight_decay >= 0.0,
            ">= 0",
        )
    }
}

/// AdamW (decoupled weight decay).
///
/// ```text
/// p *= 1 - lr * weight_decay
/// m = beta1 * m + (1 - beta1) * g
/// v = beta2 * v + (1 - beta2) * g^2
/// p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamW {
    /// Learning rate (>= 0). Default 1e-3.
    pub lr: f32,
    /// First-moment decay in [0, 1). Default 0.9.
    pub beta1: f32,
    /// Second-moment decay in [0, 1). Default 0.999.
    pub beta2: f32,
    /// Denominator term (> 0). Default 1e-8.
    pub eps: f32,
    /// Decoupled weight decay (>= 0). Default 0.01.
    pub weight_decay: f32,
}

impl Default for AdamW {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

fn check_adam(op: &'static str, lr: f32, b1: f32, b2: f32, eps: f32, wd: f32) -> Result<()> {
    check(op, "lr", lr, lr >= 0.0, ">= 0")?;
    check(op, "beta1", b1, (0.0..1.0).contains(&b1), "[0, 1)")?;
    check(op, "beta2", b2, (0.0..1.0).contains(&b2), "[0, 1)")?;
    check(op, "eps", eps, eps > 0.0, "> 0")?;
    check(op, "weight_decay", wd, wd >= 0.0, ">= 0")
}

impl AdamW {
    /// Checks every field's range.
    ///
    /// # Errors
    /// [`KernelError::InvalidHyperparameter`] naming the first bad field.
    pub fn validate(&self) -> Result<()> {
        check_adam(
            "adamw",
            self.lr,
            self.beta1,
            self.beta2,
            self.eps,
            self.weight_decay,
        )
    }
}

/// LAMB: Adam moments, then a per-tensor trust ratio from the layout.
///
/// ```text
/// m, v as in Adam;  u = (m / (1 - beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps) + weight_decay * p
/// trust = ||p|| / ||u||  per tensor (1 if either norm is 0), capped at max_trust_ratio
/// p -= lr * trust * u
/// ```
/// Norms are over each tensor of the [`Layout`](crate::Layout); padding between
/// tensors is not touched.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lamb {
    /// Learning rate (>= 0). Default 1e-3.
    pub lr: f32,
    /// First-moment decay in [0, 1). Default 0.9.
    pub beta1: f32,
    /// Second-moment decay in [0, 1). Default 0.999.
    pub beta2: f32,
    /// Denominator term (> 0). Default 1e-6 (as `torch_optimizer.Lamb`).
    pub eps: f32,
    /// Weight decay folded into the update direction (>= 0). Default 0.01.
    pub weight_decay: f32,
    /// Upper bound of the trust ratio (> 0; `f32::INFINITY` is not allowed,
    /// use a large number). Default 10.
    pub max_trust_ratio: f32,
}

impl Default for Lamb {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-6,
            weight_decay: 0.01,
            max_trust_ratio: 10.0,
        }
    }
}

impl Lamb {
    /// Checks every field's range.
    ///
    /// # Errors
    /// [`KernelError::InvalidHyperparameter`] naming the first bad field.
    pub fn validate(&self) -> Result<()> {
        check_adam(
            "lamb",
            self.lr,
            self.beta1,
            self.beta2,
            self.eps,
            self.weight_decay,
        )?;
        check(
            "lamb",
            "max_trust_ratio",
            self.max_trust_ratio,
            self.max_trust_ratio > 0.0,
            "> 0",
        )
    }
}

/// Per-step scalars of Adam-style updates, computed once in f64.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AdamScalars {
    /// `lr / (1 - beta1^t)`.
    pub(crate) step_size: f32,
    /// `1 / (1 - beta1^t)`.
    pub(crate) inv_bc1: f32,
    /// `1 / sqrt(1 - beta2^t)`.
    pub(crate) inv_sqrt_bc2: f32,
}

pub(crate) fn adam_scalars(
    op: &'static str,
    lr: f32,
    b1: f32,
    b2: f32,
    step: u64,
) -> Result<AdamScalars> {
    if step == 0 {
        return Err(KernelError::ZeroStep { op });
    }
    let t = i32::try_from(step).unwrap_or(i32::MAX);
    let bc1 = 1.0 - f64::from(b1).powi(t);
    let bc2 = 1.0 - f64::from(b2).powi(t);
    Ok(AdamScalars {
        step_size: (f64::from(lr) / bc1) as f32,
        inv_bc1: (1.0 / bc1) as f32,
        inv_sqrt_bc2: (1.0 / bc2.sqrt()) as f32,
    })
}
