//! The crate's error type.
//!
//! Errors of the layers below (DHT, averaging, kernels, schema, candle) are chained, not
//! flattened: each variant's message says what the optimizer was doing, and the cause is
//! reachable through [`std::error::Error::source`].

/// Everything that can go wrong in `colony-optim`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OptimError {
    /// The background task of a delayed update ended without handing the
    /// averager back (it panicked or was cancelled); averaging cannot go on.
    #[error("the delayed update's task failed: {reason}")]
    UpdateTaskFailed {
        /// What the task's join said.
        reason: String,
    },
    /// A configuration field holds a value outside its documented range.
    #[error("invalid config: `{field}` {reason}")]
    InvalidConfig {
        /// The offending field.
        field: &'static str,
        /// Why it was rejected.
        reason: String,
    },
    /// The local optimizer's hyperparameters are out of range.
    #[error("invalid local optimizer hyperparameters")]
    InvalidHyperparameters(#[source] colony_kernels::KernelError),
    /// `step` was called without a batch size and none was configured.
    #[error("no batch size: set `batch_size_per_step` in the config or pass one to `step`")]
    MissingBatchSize,
    /// A batch size of zero samples was reported.
    #[error("batch size must be positive, got {batch_size}")]
    ZeroBatchSize {
        /// The rejected batch size.
        batch_size: u64,
    },
    /// Two buffers that must have the same length do not.
    #[error("length mismatch for {what}: expected {expected}, got {actual}")]
    LengthMismatch {
        /// Which buffer.
        what: &'static str,
        /// The length the optimizer expects.
        expected: usize,
        /// The length it was given.
        actual: usize,
    },
    /// Gradients contain NaN or infinity; they were not accumulated.
    #[error("gradients of a {batch_size}-sample batch contain NaN or infinity; batch skipped")]
    NonFiniteGradients {
        /// Samples in the rejected micro-batch.
        batch_size: u64,
    },
    /// A numeric kernel failed.
    #[error("kernel failed")]
    Kernel(#[from] colony_kernels::KernelError),
    /// The DHT failed.
    #[error("dht: {op} failed")]
    Dht {
        /// What the optimizer was doing.
        op: &'static str,
        /// The DHT's error (boxed: it carries peer ids and would make every `Result` of
        /// this crate large).
        #[source]
        source: Box<colony_dht::DhtError>,
    },
    /// The averaging layer failed.
    #[error("averaging: {op} failed")]
    Averaging {
        /// What the optimizer was doing.
        op: &'static str,
        /// The averaging layer's error.
        #[source]
        source: colony_averaging::AveragingError,
    },
    /// A record or schema could not be built, encoded or decoded.
    #[error("schema: cannot {op}")]
    Schema {
        /// What the optimizer was doing.
        op: &'static str,
        /// The schema crate's error.
        #[source]
        source: colony_schema::SchemaError,
    },
    /// A candle operation failed (feature `candle`).
    #[cfg(feature = "candle")]
    #[error("candle: {op} failed")]
    Candle {
        /// What the adapter was doing.
        op: &'static str,
        /// candle's error.
        #[source]
        source: candle_core::Error,
    },
    /// A candle variable does not hold `f32` values (feature `candle`).
    #[cfg(feature = "candle")]
    #[error("candle variable `{name}` is {dtype}, not f32")]
    NotF32 {
        /// The variable's name.
        name: String,
        /// Its dtype, as candle names it.
        dtype: String,
    },
    /// An invariant of this crate was broken (a bug, or a panic on another thread).
    #[error("internal error: {what}")]
    Internal {
        /// Which invariant.
        what: &'static str,
    },
}

/// `Result` with [`OptimError`].
pub type Result<T, E = OptimError> = std::result::Result<T, E>;

impl OptimError {
    /// Wraps a DHT error met while doing `op`.
    pub(crate) fn dht(op: &'static str) -> impl FnOnce(colony_dht::DhtError) -> Self {
        move |source| Self::Dht {
            op,
            source: Box::new(source),
        }
    }
}

/// Displays an error and its whole `source` chain, `outer: cause: root`, for log lines
/// (an error's own message names only its part).
pub(crate) struct ErrorChain<'a>(pub(crate) &'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn causes_are_chained_not_repeated() {
        let e = OptimError::Dht {
            op: "store progress",
            source: Box::new(colony_dht::DhtError::Shutdown),
        };
        assert_eq!(e.to_string(), "dht: store progress failed");
        let source = e.source().map(ToString::to_string);
        assert_eq!(source.as_deref(), Some("the DHT node has shut down"));
        let e = OptimError::Averaging {
            op: "step",
            source: colony_averaging::AveragingError::NoStateDonor { tried: 2 },
        };
        assert!(!e.to_string().contains("donor"));
        assert!(e.source().is_some());
        assert_eq!(
            ErrorChain(&e).to_string(),
            "averaging: step failed: no donor could provide state (2 tried)"
        );
    }
}
