//! The crate's error type.

/// Everything that can go wrong in `colony-optim`.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OptimError {
    /// A configuration field holds a value outside its documented range.
    #[error("invalid config: `{field}` {reason}")]
    InvalidConfig {
        /// The offending field.
        field: &'static str,
        /// Why it was rejected.
        reason: String,
    },
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
    /// A progress record failed validation.
    #[error("invalid progress record: {reason}")]
    InvalidRecord {
        /// What was wrong with it.
        reason: String,
    },
    /// A numeric kernel failed.
    #[error("kernel error: {0}")]
    Kernel(String),
    /// The network layer (DHT) failed.
    #[error("dht error during {operation}: {message}")]
    Dht {
        /// What the optimizer was doing.
        operation: &'static str,
        /// The underlying error, rendered.
        message: String,
    },
    /// The averaging layer failed.
    #[error("averaging error during {operation}: {message}")]
    Averaging {
        /// What the optimizer was doing.
        operation: &'static str,
        /// The underlying error, rendered.
        message: String,
    },
    /// No peer could provide a state to load.
    #[error("no peer provided a usable state: {reason}")]
    NoStateFromPeers {
        /// Why the download failed.
        reason: String,
    },
    /// The optimizer was shut down.
    #[error("the optimizer has been shut down")]
    ShutDown,
}

/// `Result` with [`OptimError`].
pub type Result<T, E = OptimError> = std::result::Result<T, E>;
