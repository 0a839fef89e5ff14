//! Bias-corrected moving average of this peer's throughput.

/// An exponential moving average of *seconds per sample*, bias-corrected as in Adam,
/// reported as samples per second.
///
/// Time is passed in (`now`, seconds), so the estimator is deterministic. While paused
/// (during averaging and the optimizer step) no interval is measured: the first update
/// after [`resume`](Self::resume) measures from the moment of resuming, so the time spent
/// communicating does not count as slow training.
#[derive(Debug, Clone, PartialEq)]
pub struct PerformanceEma {
    alpha: f64,
    eps: f64,
    num_updates: u32,
    ema_seconds_per_sample: f64,
    samples_per_second: f64,
    timestamp: f64,
    paused: bool,
}

impl PerformanceEma {
    /// A new estimator with smoothing `alpha` in `(0, 1]` (the reference uses 0.1), whose
    /// first interval starts at `now`.
    pub fn new(alpha: f64, now: f64) -> Self {
        Self {
            alpha,
            eps: 1e-20,
            num_updates: 0,
            ema_seconds_per_sample: 0.0,
            samples_per_second: 0.0,
            timestamp: now,
            paused: false,
        }
    }

    /// Records that `num_processed` samples were finished at `now`. Returns the new
    /// estimate. A zero-sample update, or an update while paused, changes nothing.
    pub fn update(&mut self, num_processed: u64, now: f64) -> f64 {
        if num_processed == 0 || self.paused {
            return self.samples_per_second;
        }
        // Clocks can step backwards; a negative interval would claim infinite speed.
        let interval = (now - self.timestamp).max(0.0);
        self.timestamp = now;
        let seconds_per_sample = interval / num_processed as f64;
        self.ema_seconds_per_sample =
            self.alpha * seconds_per_sample + (1.0 - self.alpha) * self.ema_seconds_per_sample;
        self.num_updates = self.num_updates.saturating_add(1);
        let bias = 1.0 - (1.0 - self.alpha).powi(self.num_updates.min(i32::MAX as u32) as i32);
        let adjusted = if bias > 0.0 {
            self.ema_seconds_per_sample / bias
        } else {
            self.ema_seconds_per_sample
        };
        self.samples_per_second = 1.0 / adjusted.max(self.eps);
        self.samples_per_second
    }

    /// The current estimate in samples per second (0 before the first update).
    pub fn samples_per_second(&self) -> f64 {
        self.samples_per_second
    }

    /// Stops measuring (averaging is about to run).
    pub fn pause(&mut self) {
        self.paused = true;
    }

    /// Resumes measuring; the next interval starts at `now`.
    pub fn resume(&mut self, now: f64) {
        self.paused = false;
        self.timestamp = now;
    }

    /// Whether the estimator is paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Restarts the current interval at `now` without recording samples (e.g. after a
    /// state download).
    pub fn reset_timer(&mut self, now: f64) {
        self.timestamp = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_rate_is_estimated_exactly_from_the_first_update() {
        let mut ema = PerformanceEma::new(0.1, 0.0);
        // Bias correction: the first update alone gives the true rate, not alpha times it.
        assert!((ema.update(10, 1.0) - 10.0).abs() < 1e-9);
        for i in 2..50 {
            ema.update(10, i as f64);
        }
        assert!((ema.samples_per_second() - 10.0).abs() < 1e-9);
    }

    #[test]
    fn time_while_paused_is_not_counted() {
        let mut ema = PerformanceEma::new(0.1, 0.0);
        ema.update(100, 1.0);
        ema.pause();
        assert!(ema.is_paused());
        // Updates while paused are ignored.
        ema.update(100, 5.0);
        ema.resume(100.0);
        // 100 samples in the second after resuming: still 100 samples/s, not ~1.
        let sps = ema.update(100, 101.0);
        assert!((sps - 100.0).abs() < 1e-9, "{sps}");
    }

    #[test]
    fn backwards_clock_and_zero_batches_do_not_break_the_estimate() {
        let mut ema = PerformanceEma::new(0.1, 10.0);
        let sps = ema.update(5, 9.0);
        assert!(sps.is_finite() && sps > 0.0);
        assert_eq!(ema.update(0, 20.0), sps);
        ema.reset_timer(30.0);
        let later = ema.update(5, 31.0);
        assert!(later.is_finite());
    }

    #[test]
    fn slower_work_lowers_the_estimate() {
        let mut ema = PerformanceEma::new(0.1, 0.0);
        let fast = ema.update(10, 1.0);
        let slow = ema.update(10, 11.0);
        assert!(slow < fast);
    }
}
