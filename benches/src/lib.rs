//! `colony-benches`: criterion benches (`benches/`) and multi-process harnesses
//! (`src/bin/`) for Colony, and the one thing they share: how a set of timed
//! samples is summarised ([`Summary`]: median, percentiles, mean, extremes).

use std::time::Duration;

/// Order statistics of a set of timings (sorted on construction).
///
/// Empty sets summarise to zero durations, so a report line never panics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    sorted: Vec<Duration>,
}

impl Summary {
    /// Summarises `samples`.
    pub fn new(samples: impl IntoIterator<Item = Duration>) -> Self {
        let mut sorted: Vec<Duration> = samples.into_iter().collect();
        sorted.sort_unstable();
        Self { sorted }
    }

    /// Summarises samples given in seconds (negative and NaN values count as zero).
    pub fn from_secs(samples: impl IntoIterator<Item = f64>) -> Self {
        Self::new(
            samples
                .into_iter()
                .map(|s| Duration::try_from_secs_f64(s).unwrap_or(Duration::ZERO)),
        )
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    /// True when there are no samples.
    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty()
    }

    /// The median: the middle sample, or the mean of the middle two.
    pub fn median(&self) -> Duration {
        let n = self.sorted.len();
        match n {
            0 => Duration::ZERO,
            _ if n % 2 == 1 => self.sorted[n / 2],
            _ => (self.sorted[n / 2 - 1] + self.sorted[n / 2]) / 2,
        }
    }

    /// The `p`-th percentile (nearest rank: the smallest sample with at least
    /// `p`% of the samples at or below it; `p` is clamped to 0..=100).
    pub fn percentile(&self, p: f64) -> Duration {
        let n = self.sorted.len();
        if n == 0 {
            return Duration::ZERO;
        }
        let rank = (p.clamp(0.0, 100.0) / 100.0 * n as f64).ceil() as usize;
        self.sorted[rank.clamp(1, n) - 1]
    }

    /// The arithmetic mean.
    pub fn mean(&self) -> Duration {
        let n = self.sorted.len();
        if n == 0 {
            return Duration::ZERO;
        }
        self.sorted.iter().sum::<Duration>().div_f64(n as f64)
    }

    /// The smallest sample.
    pub fn min(&self) -> Duration {
        self.sorted.first().copied().unwrap_or_default()
    }

    /// The largest sample.
    pub fn max(&self) -> Duration {
        self.sorted.last().copied().unwrap_or_default()
    }
}

/// `d` in milliseconds, for report lines.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `d` in microseconds, for report lines.
pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms_set(v: &[u64]) -> Summary {
        Summary::new(v.iter().map(|&m| Duration::from_millis(m)))
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(ms_set(&[5, 1, 3]).median(), Duration::from_millis(3));
        assert_eq!(ms_set(&[4, 1, 3, 2]).median(), Duration::from_micros(2500));
        assert_eq!(Summary::default().median(), Duration::ZERO);
    }

    #[test]
    fn percentiles_use_nearest_rank() {
        let s = ms_set(&(1..=100).collect::<Vec<_>>());
        assert_eq!(s.percentile(99.0), Duration::from_millis(99));
        assert_eq!(s.percentile(100.0), Duration::from_millis(100));
        assert_eq!(s.percentile(0.0), Duration::from_millis(1));
        assert_eq!(ms_set(&[7]).percentile(99.0), Duration::from_millis(7));
        assert_eq!(Summary::default().percentile(50.0), Duration::ZERO);
    }

    #[test]
    fn mean_min_max() {
        let s = ms_set(&[2, 4, 9]);
        assert_eq!(s.mean(), Duration::from_millis(5));
        assert_eq!(s.min(), Duration::from_millis(2));
        assert_eq!(s.max(), Duration::from_millis(9));
        assert_eq!(s.len(), 3);
        assert!(Summary::default().is_empty());
        assert_eq!(Summary::default().mean(), Duration::ZERO);
    }

    #[test]
    fn from_secs_clamps_bad_values() {
        let s = Summary::from_secs([0.002, -1.0, f64::NAN, 0.001]);
        assert_eq!(s.min(), Duration::ZERO);
        assert_eq!(s.max(), Duration::from_millis(2));
    }
}
