//! Without the `cuda` feature: the same entry points, each returning
//! [`KernelError::NotCompiledWithCuda`]. No CUDA buffer can exist in such a
//! build, so the op twins below are reached only through that error path.

use half::{bf16, f16};

use crate::{AccumulateCheck, AdamW, Buffer, KernelError, Lamb, Layout, Q8Buffer, Result, Sgd};

/// Always false: built without the `cuda` feature.
pub fn is_available() -> bool {
    false
}

/// # Errors
/// Always [`KernelError::NotCompiledWithCuda`].
pub fn device_count() -> Result<usize> {
    Err(KernelError::NotCompiledWithCuda)
}

/// # Errors
/// Always [`KernelError::NotCompiledWithCuda`].
pub fn synchronize(_ordinal: usize) -> Result<()> {
    Err(KernelError::NotCompiledWithCuda)
}

pub(crate) mod stub_ops {
    use super::*;

    const E: KernelError = KernelError::NotCompiledWithCuda;

    pub(crate) fn accumulate(_: &mut Buffer<f32>, _: &Buffer<f32>, _: f32) -> Result<()> {
        Err(E)
    }
    pub(crate) fn accumulate_checked(
        _: &mut Buffer<f32>,
        _: &Buffer<f32>,
        _: f32,
    ) -> Result<AccumulateCheck> {
        Err(E)
    }
    pub(crate) fn encode_bf16(_: &Buffer<f32>, _: &mut Buffer<bf16>) -> Result<()> {
        Err(E)
    }
    pub(crate) fn decode_bf16(_: &Buffer<bf16>, _: &mut Buffer<f32>, _: Option<f32>) -> Result<()> {
        Err(E)
    }
    pub(crate) fn copy(_: &mut Buffer<f32>, _: &Buffer<f32>) -> Result<()> {
        Err(E)
    }
    pub(crate) fn scale(_: &mut Buffer<f32>, _: f32) -> Result<()> {
        Err(E)
    }
    pub(crate) fn all_finite(_: &Buffer<f32>) -> Result<bool> {
        Err(E)
    }
    pub(crate) fn weighted_sum(
        _: &mut Buffer<f32>,
        _: &[&Buffer<f32>],
        _: &[f32],
        _: Option<&Buffer<f32>>,
    ) -> Result<()> {
        Err(E)
    }
    pub(crate) fn encode_f16(_: &Buffer<f32>, _: &mut Buffer<f16>) -> Result<()> {
        Err(E)
    }
    pub(crate) fn decode_f16(_: &Buffer<f16>, _: &mut Buffer<f32>, _: Option<f32>) -> Result<()> {
        Err(E)
    }
    pub(crate) fn encode_q8(_: &Buffer<f32>, _: &mut Q8Buffer) -> Result<()> {
        Err(E)
    }
    pub(crate) fn decode_q8(_: &Q8Buffer, _: &mut Buffer<f32>, _: Option<f32>) -> Result<()> {
        Err(E)
    }
    pub(crate) fn sgd_step(
        _: &mut Buffer<f32>,
        _: &Buffer<f32>,
        _: &mut Buffer<f32>,
        _: &Sgd,
    ) -> Result<()> {
        Err(E)
    }
    pub(crate) fn adamw_step(
        _: &mut Buffer<f32>,
        _: &Buffer<f32>,
        _: &mut Buffer<f32>,
        _: &mut Buffer<f32>,
        _: &AdamW,
        _: u64,
    ) -> Result<()> {
        Err(E)
    }
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn lamb_step(
        _: &mut Buffer<f32>,
        _: &Buffer<f32>,
        _: &mut Buffer<f32>,
        _: &mut Buffer<f32>,
        _: &Layout,
        _: &Lamb,
        _: u64,
    ) -> Result<()> {
        Err(E)
    }
}
