//! The crate's error type.

use crate::Device;

/// Everything that can go wrong in `colony-kernels`.
///
/// Every op validates its inputs before touching memory, so an `Err` means no
/// output buffer was modified (except where a CUDA launch failed mid-way, see
/// [`KernelError::Cuda`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KernelError {
    /// Two buffers (or a buffer and a byte slice) that must agree in length do not.
    #[error("{op}: {what} has length {actual}, expected {expected}")]
    LengthMismatch {
        /// The op that was called.
        op: &'static str,
        /// Which argument had the wrong length.
        what: &'static str,
        /// The length the op needed.
        expected: usize,
        /// The length it got.
        actual: usize,
    },
    /// Buffers passed to one op live on different devices.
    #[error("{op}: buffers on different devices ({expected} and {actual})")]
    DeviceMismatch {
        /// The op that was called.
        op: &'static str,
        /// The device of the first buffer.
        expected: Device,
        /// The device of the offending buffer.
        actual: Device,
    },
    /// A scalar argument (alpha, scale, learning rate, ...) is NaN or infinite.
    #[error("{op}: {name} must be finite, got {value}")]
    NonFiniteScalar {
        /// The op that was called.
        op: &'static str,
        /// The argument name.
        name: &'static str,
        /// The value passed.
        value: f64,
    },
    /// A weight of a weighted reduction is negative, NaN or infinite.
    #[error("{op}: weight {index} must be finite and >= 0, got {value}")]
    InvalidWeight {
        /// The op that was called.
        op: &'static str,
        /// Index of the offending weight.
        index: usize,
        /// The value passed.
        value: f32,
    },
    /// The weights of an average sum to zero, so the average is undefined.
    #[error("{op}: weights sum to zero")]
    ZeroWeightSum {
        /// The op that was called.
        op: &'static str,
    },
    /// A reduction was given no parts.
    #[error("{op}: no parts to reduce")]
    NoParts {
        /// The op that was called.
        op: &'static str,
    },
    /// The number of weights differs from the number of parts.
    #[error("{op}: {parts} parts but {weights} weights")]
    WeightCount {
        /// The op that was called.
        op: &'static str,
        /// Number of parts.
        parts: usize,
        /// Number of weights.
        weights: usize,
    },
    /// An optimizer hyperparameter is out of its valid range.
    #[error("{op}: hyperparameter {name} = {value} is out of range ({expected})")]
    InvalidHyperparameter {
        /// The optimizer.
        op: &'static str,
        /// The hyperparameter.
        name: &'static str,
        /// The value passed.
        value: f64,
        /// The valid range, in words.
        expected: &'static str,
    },
    /// A range of values reaches past the end of the values it indexes.
    #[error("{op}: range {start}..{end} is outside 0..{len}")]
    RangeOutOfBounds {
        /// The op that was called.
        op: &'static str,
        /// Start of the range.
        start: usize,
        /// End of the range.
        end: usize,
        /// Number of values the range indexes.
        len: usize,
    },
    /// The 8-bit codec's block size is zero.
    #[error("8-bit codec block size must be at least 1, got {block_size}")]
    InvalidBlockSize {
        /// The block size passed.
        block_size: usize,
    },
    /// The optimizer step counter is zero (steps count from 1).
    #[error("{op}: step must be >= 1 (bias correction divides by 1 - beta^step)")]
    ZeroStep {
        /// The optimizer.
        op: &'static str,
    },
    /// Layout alignment is zero or not a power of two.
    #[error("layout alignment must be a power of two >= 1, got {alignment}")]
    InvalidAlignment {
        /// The alignment passed, in elements.
        alignment: usize,
    },
    /// A tensor's offset is not a multiple of the layout's alignment.
    #[error("tensor {name:?} starts at {offset}, not a multiple of the alignment {alignment}")]
    MisalignedTensor {
        /// Tensor name.
        name: String,
        /// Offset in elements.
        offset: usize,
        /// Alignment in elements.
        alignment: usize,
    },
    /// Two tensors of a layout share elements.
    #[error("tensors {first:?} and {second:?} overlap")]
    OverlappingTensors {
        /// The tensor that starts first.
        first: String,
        /// The tensor that starts inside it.
        second: String,
    },
    /// A tensor extends past the end of the layout.
    #[error("tensor {name:?} ends at {end}, past the layout's length {total}")]
    TensorOutOfBounds {
        /// Tensor name.
        name: String,
        /// One past its last element.
        end: usize,
        /// The layout's length.
        total: usize,
    },
    /// Two tensors of a layout have the same name.
    #[error("tensor name {name:?} appears twice in the layout")]
    DuplicateTensor {
        /// Tensor name.
        name: String,
    },
    /// A tensor's element count (product of its shape) overflows `usize`.
    #[error("tensor {name:?}: element count of shape {shape:?} overflows")]
    ShapeOverflow {
        /// Tensor name.
        name: String,
        /// Its shape.
        shape: Vec<usize>,
    },
    /// A buffer's length does not match the layout it is used with.
    #[error("{op}: buffer has {actual} elements but the layout has {expected}")]
    LayoutMismatch {
        /// The op that was called.
        op: &'static str,
        /// The layout's total length.
        expected: usize,
        /// The buffer's length.
        actual: usize,
    },
    /// Host access (`as_slice`) was requested on a buffer that lives on a GPU.
    #[error("buffer lives on {device}; copy it to the host with to_vec() or to_device()")]
    NotOnHost {
        /// Where the buffer lives.
        device: Device,
    },
    /// A CUDA device was requested but the crate was built without the `cuda` feature.
    #[error("colony-kernels was built without the `cuda` feature")]
    NotCompiledWithCuda,
    /// The CUDA driver or NVRTC library is missing, or no such GPU exists.
    #[error("CUDA unavailable: {reason}")]
    CudaUnavailable {
        /// Why, in words.
        reason: String,
    },
    /// A CUDA driver call failed.
    #[error("CUDA error during {context}: {message}")]
    Cuda {
        /// What was being done.
        context: &'static str,
        /// The driver's message.
        message: String,
    },
    /// NVRTC rejected a kernel source.
    #[error("NVRTC failed to compile {module}: {log}")]
    NvrtcCompile {
        /// The kernel module (file) name.
        module: &'static str,
        /// The compiler log.
        log: String,
    },
}

/// Result alias for this crate.
pub type Result<T, E = KernelError> = std::result::Result<T, E>;

pub(crate) fn check_len(
    op: &'static str,
    what: &'static str,
    expected: usize,
    actual: usize,
) -> Result<()> {
    if expected == actual {
        Ok(())
    } else {
        Err(KernelError::LengthMismatch {
            op,
            what,
            expected,
            actual,
        })
    }
}

pub(crate) fn check_finite(op: &'static str, name: &'static str, value: f32) -> Result<()> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(KernelError::NonFiniteScalar {
            op,
            name,
            value: f64::from(value),
        })
    }
}
