//! Gradient accumulation between global steps.

use crate::error::{OptimError, Result};

/// Accumulates micro-batch gradients toward this peer's contribution to the next global
/// step, and counts the samples and `step()` calls behind them.
///
/// Each micro-batch gradient is expected to be the gradient of the *mean* loss over its
/// `batch_size` samples. It is added with weight `batch_size / batch_size_per_step` (the
/// reference's `alpha`), and [`mean_gradient`](Self::mean_gradient) divides by
/// `local_samples / batch_size_per_step`, which yields the sample-weighted mean gradient
/// `Σ bᵢ gᵢ / Σ bᵢ` (the reference divided by the number of calls instead, which is the
/// same only when every micro-batch has the same size).
///
/// With `reuse_grad_buffers` there is no private accumulator: the caller sums gradients in
/// its own buffer (never zeroing it itself), and [`mean_gradient`](Self::mean_gradient)
/// divides that sum by the number of calls, as the reference does.
///
/// Gradients containing NaN or infinity are refused and not counted, so they never reach
/// the swarm. The passes over memory are `colony-kernels`' multi-threaded, vectorised CPU
/// ops (`all_finite`, `accumulate`).
#[derive(Debug, Clone)]
pub struct GradAccumulator {
    acc: Option<Vec<f32>>,
    num_params: usize,
    batch_size_per_step: Option<u64>,
    local_samples: u64,
    local_steps: u64,
}

impl GradAccumulator {
    /// An empty accumulator for `num_params` gradients.
    pub fn new(
        num_params: usize,
        batch_size_per_step: Option<u64>,
        reuse_grad_buffers: bool,
    ) -> Self {
        Self {
            acc: (!reuse_grad_buffers).then(|| vec![0.0; num_params]),
            num_params,
            batch_size_per_step,
            local_samples: 0,
            local_steps: 0,
        }
    }

    /// Whether the caller's gradient buffer is the accumulator.
    pub fn reuses_grad_buffers(&self) -> bool {
        self.acc.is_none()
    }

    /// Samples accumulated since the last reset.
    pub fn local_samples(&self) -> u64 {
        self.local_samples
    }

    /// `accumulate` calls since the last reset.
    pub fn local_steps(&self) -> u64 {
        self.local_steps
    }

    /// The batch size assumed when none is given (set by the first explicit one).
    pub fn batch_size_per_step(&self) -> Option<u64> {
        self.batch_size_per_step
    }

    /// Resolves the batch size of one call, adopting the first explicit one as default.
    ///
    /// # Errors
    /// [`OptimError::MissingBatchSize`] or [`OptimError::ZeroBatchSize`].
    pub fn resolve_batch_size(&mut self, batch_size: Option<u64>) -> Result<u64> {
        let batch = match (batch_size, self.batch_size_per_step) {
            (Some(b), _) => b,
            (None, Some(b)) => b,
            (None, None) => return Err(OptimError::MissingBatchSize),
        };
        if batch == 0 {
            return Err(OptimError::ZeroBatchSize { batch_size: 0 });
        }
        if self.batch_size_per_step.is_none() {
            tracing::debug!(batch, "setting default batch_size_per_step");
            self.batch_size_per_step = Some(batch);
        }
        Ok(batch)
    }

    /// Adds the gradients of one micro-batch (`grads`: the gradient of the mean loss over
    /// `batch_size` samples, or in reuse mode the caller's running sum, which is only
    /// checked). Returns the batch size used.
    ///
    /// # Errors
    /// [`OptimError::MissingBatchSize`], [`OptimError::ZeroBatchSize`],
    /// [`OptimError::LengthMismatch`], or [`OptimError::NonFiniteGradients`] (nothing is
    /// added or counted).
    pub fn accumulate(&mut self, grads: &[f32], batch_size: Option<u64>) -> Result<u64> {
        if grads.len() != self.num_params {
            return Err(OptimError::LengthMismatch {
                what: "gradients",
                expected: self.num_params,
                actual: grads.len(),
            });
        }
        let batch = self.resolve_batch_size(batch_size)?;
        if !colony_kernels::cpu::all_finite(grads) {
            return Err(OptimError::NonFiniteGradients { batch_size: batch });
        }
        if let (Some(acc), Some(per_step)) = (self.acc.as_mut(), self.batch_size_per_step) {
            let alpha = batch as f32 / per_step as f32;
            colony_kernels::cpu::accumulate(acc, grads, alpha)?;
        }
        self.local_samples = self.local_samples.saturating_add(batch);
        self.local_steps = self.local_steps.saturating_add(1);
        Ok(batch)
    }

    /// Writes this peer's mean gradient into `out` (in reuse mode `out` is the caller's
    /// running sum and is scaled in place). With nothing accumulated `out` becomes zeros.
    ///
    /// # Errors
    /// [`OptimError::LengthMismatch`].
    pub fn mean_gradient(&self, out: &mut [f32]) -> Result<()> {
        if out.len() != self.num_params {
            return Err(OptimError::LengthMismatch {
                what: "gradients",
                expected: self.num_params,
                actual: out.len(),
            });
        }
        if self.local_steps == 0 {
            out.fill(0.0);
            return Ok(());
        }
        match &self.acc {
            Some(acc) => {
                let per_step = self.batch_size_per_step.unwrap_or(self.local_samples) as f64;
                let scale = (per_step / self.local_samples as f64) as f32;
                for (o, a) in out.iter_mut().zip(acc) {
                    *o = a * scale;
                }
            }
            None => {
                let scale = 1.0 / self.local_steps as f32;
                out.iter_mut().for_each(|o| *o *= scale);
            }
        }
        Ok(())
    }

    /// Hands over this peer's mean gradient in the accumulator's own buffer
    /// (scaled in place: no copy, no second buffer) and starts the next
    /// step: the counters are reset and the accumulator continues in
    /// `spare`, zeroed here, or in a new zeroed buffer when `spare` has
    /// another length (pass an empty one: its pages are only touched as
    /// gradients arrive). Like [`mean_gradient`](Self::mean_gradient) in
    /// reuse mode, where `spare` receives the caller's mean instead.
    ///
    /// # Errors
    /// [`OptimError::LengthMismatch`] in reuse mode when `spare` has the
    /// wrong length.
    pub fn take_mean(&mut self, mut spare: Vec<f32>, grads: &mut [f32]) -> Result<Vec<f32>> {
        let Some(acc) = self.acc.as_mut() else {
            spare.resize(self.num_params, 0.0);
            self.mean_gradient(grads)?;
            spare.copy_from_slice(grads);
            self.reset(Some(grads));
            return Ok(spare);
        };
        if spare.len() == self.num_params {
            spare.fill(0.0);
        } else {
            spare = vec![0.0; self.num_params];
        }
        let mut mean = std::mem::replace(acc, spare);
        if self.local_steps == 0 {
            mean.fill(0.0);
        } else {
            let per_step = self.batch_size_per_step.unwrap_or(self.local_samples) as f64;
            let scale = (per_step / self.local_samples as f64) as f32;
            mean.iter_mut().for_each(|m| *m *= scale);
        }
        self.local_samples = 0;
        self.local_steps = 0;
        Ok(mean)
    }

    /// Zeroes the accumulator and the counters (in reuse mode also the caller's buffer,
    /// passed as `grads`).
    pub fn reset(&mut self, grads: Option<&mut [f32]>) {
        if let Some(acc) = self.acc.as_mut() {
            acc.fill(0.0);
        } else if let Some(g) = grads {
            g.fill(0.0);
        }
        self.local_samples = 0;
        self.local_steps = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mean_gradient_is_sample_weighted() {
        let mut acc = GradAccumulator::new(2, Some(4), false);
        acc.accumulate(&[1.0, 2.0], None).unwrap();
        acc.accumulate(&[4.0, 8.0], Some(2)).unwrap();
        assert_eq!((acc.local_samples(), acc.local_steps()), (6, 2));
        let mut out = [0.0; 2];
        acc.mean_gradient(&mut out).unwrap();
        // (4 x [1,2] + 2 x [4,8]) / 6
        assert!(
            (out[0] - 2.0).abs() < 1e-6 && (out[1] - 4.0).abs() < 1e-6,
            "{out:?}"
        );
        acc.reset(None);
        assert_eq!((acc.local_samples(), acc.local_steps()), (0, 0));
        acc.mean_gradient(&mut out).unwrap();
        assert_eq!(out, [0.0, 0.0]);
    }

    #[test]
    fn take_mean_hands_over_the_buffer_and_starts_afresh() {
        for reuse in [false, true] {
            let mut acc = GradAccumulator::new(2, Some(4), reuse);
            let mut caller = [0.0f32; 2];
            for (g, b) in [([1.0, 2.0], 4), ([4.0, 8.0], 2)] {
                if reuse {
                    caller.iter_mut().zip(g).for_each(|(c, g)| *c += g);
                    acc.accumulate(&caller, Some(b)).unwrap();
                } else {
                    acc.accumulate(&g, Some(b)).unwrap();
                }
            }
            let mut expected = [0.0; 2];
            if reuse {
                expected = [2.5, 5.0]; // the caller's sum / calls
            } else {
                acc.mean_gradient(&mut expected).unwrap();
            }
            let mean = acc.take_mean(Vec::new(), &mut caller).unwrap();
            assert_eq!(mean, expected, "reuse {reuse}");
            assert_eq!((acc.local_samples(), acc.local_steps()), (0, 0));
            // The next step starts from zero, in a buffer of its own.
            acc.accumulate(&[1.0, 1.0], Some(4)).unwrap();
            let mut out = [0.0; 2];
            if reuse {
                assert_eq!(caller, [0.0, 0.0], "the caller's sum was reset");
            } else {
                acc.mean_gradient(&mut out).unwrap();
                assert_eq!(out, [1.0, 1.0]);
                // A spare of the right length is reused, zeroed.
                let again = acc.take_mean(mean, &mut caller).unwrap();
                assert_eq!(again, vec![1.0, 1.0]);
                acc.mean_gradient(&mut out).unwrap();
                assert_eq!(out, [0.0, 0.0]);
            }
        }
    }

    #[test]
    fn equal_batches_match_the_reference_scaling() {
        let mut acc = GradAccumulator::new(1, None, false);
        for g in [1.0, 2.0, 3.0] {
            acc.accumulate(&[g], Some(8)).unwrap();
        }
        assert_eq!(acc.batch_size_per_step(), Some(8));
        let mut out = [0.0];
        acc.mean_gradient(&mut out).unwrap();
        // Reference: sum(alpha g) / local_steps with alpha = 1.
        assert!((out[0] - 2.0).abs() < 1e-6);
    }

    #[test]
    fn missing_zero_and_mismatched_batches_are_errors() {
        let mut acc = GradAccumulator::new(2, None, false);
        assert!(matches!(
            acc.accumulate(&[0.0, 0.0], None),
            Err(OptimError::MissingBatchSize)
        ));
        assert!(matches!(
            acc.accumulate(&[0.0, 0.0], Some(0)),
            Err(OptimError::ZeroBatchSize { .. })
        ));
        assert!(matches!(
            acc.accumulate(&[0.0], Some(1)),
            Err(OptimError::LengthMismatch { .. })
        ));
        let mut short = [0.0];
        assert!(acc.mean_gradient(&mut short).is_err());
    }

    #[test]
    fn non_finite_gradients_are_refused_and_not_counted() {
        let mut acc = GradAccumulator::new(2, Some(1), false);
        acc.accumulate(&[1.0, 1.0], None).unwrap();
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            assert!(matches!(
                acc.accumulate(&[bad, 0.0], None),
                Err(OptimError::NonFiniteGradients { batch_size: 1 })
            ));
        }
        assert_eq!(acc.local_samples(), 1);
        let mut out = [0.0; 2];
        acc.mean_gradient(&mut out).unwrap();
        assert_eq!(out, [1.0, 1.0]);
    }

    #[test]
    fn reuse_mode_scales_the_callers_sum_by_the_number_of_calls() {
        let mut acc = GradAccumulator::new(2, Some(1), true);
        assert!(acc.reuses_grad_buffers());
        let mut user = [0.0f32; 2];
        for g in [[1.0, 3.0], [3.0, 5.0]] {
            user[0] += g[0];
            user[1] += g[1];
            acc.accumulate(&user, None).unwrap();
        }
        acc.mean_gradient(&mut user).unwrap();
        assert_eq!(user, [2.0, 4.0]);
        acc.reset(Some(&mut user));
        assert_eq!(user, [0.0, 0.0]);
        assert_eq!(acc.local_steps(), 0);
    }
}
