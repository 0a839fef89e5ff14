//! The local optimizer that applies the averaged gradient: SGD with momentum, AdamW or
//! LAMB, from `colony-kernels`, with its state held in flat buffers.

use colony_kernels::{AdamW, Lamb, Layout, Sgd, cpu};

use crate::error::{OptimError, Result};

/// Which update rule and its hyperparameters (the learning rate field is overwritten by
/// the schedule at every step).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LocalOptimizerKind {
    /// SGD with momentum (and optional Nesterov, weight decay).
    Sgd(Sgd),
    /// AdamW.
    AdamW(AdamW),
    /// LAMB (per-tensor trust ratio from the parameter layout).
    Lamb(Lamb),
}

/// A local optimizer and its state.
///
/// The state (momentum, or Adam's two moments) lives in one flat buffer of
/// `state_len()` values, so it can be averaged with the swarm and shared with late
/// joiners like the parameters. Adam-style bias correction uses the *global* step passed
/// to [`step`](Self::step), so every peer, including one that just loaded the state,
/// computes the same update.
#[derive(Debug, Clone)]
pub struct LocalOptimizer {
    kind: LocalOptimizerKind,
    layout: Layout,
    state: Vec<f32>,
}

impl LocalOptimizer {
    /// The same optimizer without its state (no allocation): a stand-in
    /// while the real one is lent to an update.
    pub(crate) fn hollow(&self) -> Self {
        Self {
            kind: self.kind,
            layout: self.layout.clone(),
            state: Vec::new(),
        }
    }

    /// A fresh optimizer (zero state) for parameters laid out as `layout`.
    ///
    /// # Errors
    /// [`OptimError::InvalidHyperparameters`] when the hyperparameters are out of range.
    pub fn new(kind: LocalOptimizerKind, layout: Layout) -> Result<Self> {
        let check = match &kind {
            LocalOptimizerKind::Sgd(h) => h.validate(),
            LocalOptimizerKind::AdamW(h) => h.validate(),
            LocalOptimizerKind::Lamb(h) => h.validate(),
        };
        check.map_err(OptimError::InvalidHyperparameters)?;
        let n = layout.total_len();
        let state_len = match kind {
            LocalOptimizerKind::Sgd(_) => n,
            LocalOptimizerKind::AdamW(_) | LocalOptimizerKind::Lamb(_) => 2 * n,
        };
        Ok(Self {
            kind,
            layout,
            state: vec![0.0; state_len],
        })
    }

    /// The update rule.
    pub fn kind(&self) -> &LocalOptimizerKind {
        &self.kind
    }

    /// The parameter layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Number of parameters.
    pub fn num_params(&self) -> usize {
        self.layout.total_len()
    }

    /// The optimizer state, flat.
    pub fn state(&self) -> &[f32] {
        &self.state
    }

    /// The optimizer state, flat and writable (for averaging and state loading).
    pub fn state_mut(&mut self) -> &mut [f32] {
        &mut self.state
    }

    /// Applies one update with learning rate `lr` at global step `global_step`
    /// (0-based; the step being taken).
    ///
    /// # Errors
    /// [`OptimError::LengthMismatch`] or [`OptimError::Kernel`].
    pub fn step(
        &mut self,
        params: &mut [f32],
        grads: &[f32],
        lr: f64,
        global_step: u64,
    ) -> Result<()> {
        let n = self.layout.total_len();
        for (what, len) in [("parameters", params.len()), ("gradients", grads.len())] {
            if len != n {
                return Err(OptimError::LengthMismatch {
                    what,
                    expected: n,
                    actual: len,
                });
            }
        }
        let lr = lr as f32;
        let t = global_step.saturating_add(1);
        let result = match self.kind {
            LocalOptimizerKind::Sgd(hp) => {
                cpu::sgd_step(params, grads, &mut self.state, &Sgd { lr, ..hp })
            }
            LocalOptimizerKind::AdamW(hp) => {
                let (m, v) = self.state.split_at_mut(n);
                cpu::adamw_step(params, grads, m, v, &AdamW { lr, ..hp }, t)
            }
            LocalOptimizerKind::Lamb(hp) => {
                let (m, v) = self.state.split_at_mut(n);
                cpu::lamb_step(params, grads, m, v, &self.layout, &Lamb { lr, ..hp }, t)
            }
        };
        Ok(result?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(n: usize) -> Layout {
        Layout::packed([("w", vec![n])], 1).unwrap()
    }

    #[test]
    fn sgd_with_momentum_matches_the_formula() {
        let hp = Sgd {
            momentum: 0.5,
            ..Sgd::default()
        };
        let mut opt = LocalOptimizer::new(LocalOptimizerKind::Sgd(hp), layout(2)).unwrap();
        let mut p = vec![1.0, 2.0];
        opt.step(&mut p, &[1.0, -1.0], 0.1, 0).unwrap();
        assert_eq!(p, vec![0.9, 2.1]);
        // buf = 0.5 * 1 + 1 = 1.5
        opt.step(&mut p, &[1.0, -1.0], 0.1, 1).unwrap();
        assert!(
            (p[0] - 0.75).abs() < 1e-6 && (p[1] - 2.25).abs() < 1e-6,
            "{p:?}"
        );
        assert_eq!(opt.state().len(), 2);
    }

    #[test]
    fn adam_family_keeps_two_moments_and_moves_against_the_gradient() {
        for kind in [
            LocalOptimizerKind::AdamW(AdamW {
                weight_decay: 0.0,
                ..AdamW::default()
            }),
            LocalOptimizerKind::Lamb(Lamb {
                weight_decay: 0.0,
                ..Lamb::default()
            }),
        ] {
            let mut opt = LocalOptimizer::new(kind, layout(3)).unwrap();
            assert_eq!(opt.state().len(), 6);
            let mut p = vec![1.0, 1.0, 1.0];
            opt.step(&mut p, &[1.0, -1.0, 0.0], 0.01, 0).unwrap();
            assert!(p[0] < 1.0 && p[1] > 1.0 && p[2] == 1.0, "{kind:?}: {p:?}");
        }
    }

    #[test]
    fn bad_lengths_and_hyperparameters_are_errors() {
        let mut opt =
            LocalOptimizer::new(LocalOptimizerKind::Sgd(Sgd::default()), layout(2)).unwrap();
        let mut p = vec![0.0; 3];
        assert!(matches!(
            opt.step(&mut p, &[0.0; 3], 0.1, 0),
            Err(OptimError::LengthMismatch { .. })
        ));
        let bad = Sgd {
            momentum: 2.0,
            ..Sgd::default()
        };
        assert!(LocalOptimizer::new(LocalOptimizerKind::Sgd(bad), layout(2)).is_err());
        let mut p = vec![0.0; 2];
        assert!(matches!(
            opt.step(&mut p, &[0.0; 2], f64::NAN, 0),
            Err(OptimError::Kernel(_))
        ));
    }
}
