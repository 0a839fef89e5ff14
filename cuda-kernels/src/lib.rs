//! `colony-kernels`: flat tensor buffers and the hot ops of collaborative
//! training on them, on CPU and CUDA.
//!
//! A whole model lives in one flat [`Buffer`] (a [`Layout`] names the tensors
//! inside), so every op is one pass over memory and one launch, whatever the
//! number of tensors:
//!
//! * accumulate / scale gradients: [`accumulate`], [`scale`], and
//!   [`accumulate_checked`], which also reports in the same pass whether the
//!   gradient and the result are finite;
//! * reduce parts received from peers: [`weighted_sum`], [`weighted_average`],
//!   and the delta the all-reduce returns, [`weighted_delta`];
//! * wire codecs: fp16 ([`encode_f16`], [`decode_f16_accumulate`]), bf16
//!   ([`encode_bf16`], [`decode_bf16_accumulate`]) and a blockwise 8-bit codec
//!   ([`encode_q8`], [`decode_q8_accumulate`]);
//! * refuse poisoned contributions: [`all_finite`];
//! * fused optimizer updates: [`sgd_step`], [`adamw_step`], [`lamb_step`].
//!
//! The [`cpu`] module has the same ops on plain slices (and byte-level codecs
//! for the network); they are multi-threaded with rayon and vectorised.
//! The [`cuda`] module (feature `cuda`) runs them on GPUs with kernels compiled
//! by NVRTC at run time.
//!
//! # Bad input
//! Every op checks lengths, devices, scalars and weights before touching
//! memory and returns a [`KernelError`]; none panics. Weights of reductions
//! must be finite and >= 0, and an average needs a positive sum. NaN/inf in
//! data follow IEEE arithmetic (they propagate); see each op's docs.
//!
//! # Example
//! ```
//! use colony_kernels::{Buffer, Device, Layout, accumulate, scale};
//!
//! let layout = Layout::packed([("w", vec![4, 3]), ("b", vec![3])], 16)?;
//! let mut acc = Buffer::<f32>::zeros(layout.total_len(), Device::Cpu)?;
//! let grad = Buffer::from_vec(vec![1.0; layout.total_len()]);
//! accumulate(&mut acc, &grad, 1.0)?;
//! accumulate(&mut acc, &grad, 1.0)?;
//! scale(&mut acc, 0.5)?;
//! assert!(acc.as_slice()?.iter().all(|&x| x == 1.0));
//! # Ok::<(), colony_kernels::KernelError>(())
//! ```

mod buffer;
pub mod cpu;
pub mod cuda;
mod device;
mod error;
mod layout;
mod ops;
mod optim;

pub use buffer::{Buffer, Element, Q8Buffer};
pub use cpu::AccumulateCheck;
pub use device::Device;
pub use error::{KernelError, Result};
pub use half::{bf16, f16};
pub use layout::{DEFAULT_ALIGNMENT, Layout, TensorEntry, TensorSpec};
pub use ops::{
    accumulate, accumulate_checked, adamw_step, all_finite, copy, decode_bf16,
    decode_bf16_accumulate, decode_f16, decode_f16_accumulate, decode_q8, decode_q8_accumulate,
    encode_bf16, encode_f16, encode_q8, lamb_step, scale, sgd_step, weighted_average,
    weighted_delta, weighted_sum,
};
pub use optim::{AdamW, Lamb, Sgd};
