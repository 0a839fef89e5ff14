//! Ops on [`Buffer`]s: validated once here, then run on the buffers' device.

use half::{bf16, f16};

#[cfg(feature = "cuda")]
use crate::cuda::ops as gpu;
#[cfg(not(feature = "cuda"))]
use crate::cuda::stub_ops as gpu;
use crate::{
    AccumulateCheck, AdamW, Buffer, Device, KernelError, Lamb, Layout, Q8Buffer, Result, Sgd, cpu,
    cpu::elementwise_checks::{check_weights, normalize},
    error::{check_finite, check_len},
};

fn same_device(op: &'static str, first: Device, others: &[Device]) -> Result<Device> {
    for &d in others {
        if d != first {
            return Err(KernelError::DeviceMismatch {
                op,
                expected: first,
                actual: d,
            });
        }
    }
    Ok(first)
}

/// `acc += alpha * grad` on the buffers' device.
///
/// # Errors
/// [`KernelError::DeviceMismatch`], [`KernelError::LengthMismatch`],
/// [`KernelError::NonFiniteScalar`], or a CUDA error.
pub fn accumulate(acc: &mut Buffer<f32>, grad: &Buffer<f32>, alpha: f32) -> Result<()> {
    const OP: &str = "accumulate";
    let dev = same_device(OP, acc.device(), &[grad.device()])?;
    check_len(OP, "grad", acc.len(), grad.len())?;
    check_finite(OP, "alpha", alpha)?;
    match dev {
        Device::Cpu => cpu::accumulate(acc.host_mut()?, grad.host()?, alpha),
        Device::Cuda(_) => gpu::accumulate(acc, grad, alpha),
    }
}

/// `acc += alpha * grad`, reporting in the same pass whether `grad` and the
/// updated `acc` are all finite (see [`cpu::accumulate_checked`]: the update
/// is applied whatever the answer). Waits for the GPU, like [`all_finite`].
///
/// # Errors
/// As [`accumulate`].
pub fn accumulate_checked(
    acc: &mut Buffer<f32>,
    grad: &Buffer<f32>,
    alpha: f32,
) -> Result<AccumulateCheck> {
    const OP: &str = "accumulate_checked";
    let dev = same_device(OP, acc.device(), &[grad.device()])?;
    check_len(OP, "grad", acc.len(), grad.len())?;
    check_finite(OP, "alpha", alpha)?;
    match dev {
        Device::Cpu => cpu::accumulate_checked(acc.host_mut()?, grad.host()?, alpha),
        Device::Cuda(_) => gpu::accumulate_checked(acc, grad, alpha),
    }
}

/// `dst = src` on the buffers' device (a plain copy).
///
/// # Errors
/// [`KernelError::DeviceMismatch`], [`KernelError::LengthMismatch`], or a CUDA error.
pub fn copy(dst: &mut Buffer<f32>, src: &Buffer<f32>) -> Result<()> {
    const OP: &str = "copy";
    let dev = same_device(OP, dst.device(), &[src.device()])?;
    check_len(OP, "src", dst.len(), src.len())?;
    match dev {
        Device::Cpu => cpu::copy(dst.host_mut()?, src.host()?),
        Device::Cuda(_) => gpu::copy(dst, src),
    }
}

/// `buf *= s`.
///
/// # Errors
/// [`KernelError::NonFiniteScalar`], or a CUDA error.
pub fn scale(buf: &mut Buffer<f32>, s: f32) -> Result<()> {
    check_finite("scale", "s", s)?;
    match buf.device() {
        Device::Cpu => cpu::scale(buf.host_mut()?, s),
        Device::Cuda(_) => gpu::scale(buf, s),
    }
}

/// True when no element is NaN or ±inf (waits for the GPU).
///
/// # Errors
/// A CUDA error.
pub fn all_finite(buf: &Buffer<f32>) -> Result<bool> {
    match buf.device() {
        Device::Cpu => Ok(cpu::all_finite(buf.host()?)),
        Device::Cuda(_) => gpu::all_finite(buf),
    }
}

fn check_parts(
    op: &'static str,
    out: &Buffer<f32>,
    parts: &[&Buffer<f32>],
    weights: &[f32],
) -> Result<(Device, f64)> {
    let devices: Vec<Device> = parts.iter().map(|p| p.device()).collect();
    let dev = same_device(op, out.device(), &devices)?;
    let sum = check_weights(op, parts.len(), weights)?;
    for p in parts {
        check_len(op, "part", out.len(), p.len())?;
    }
    Ok((dev, sum))
}

fn host_parts<'a>(parts: &[&'a Buffer<f32>]) -> Result<Vec<&'a [f32]>> {
    parts.iter().map(|p| p.host()).collect()
}

/// `out = sum_i weights[i] * parts[i]`; weights finite and >= 0 (see
/// [`cpu::weighted_sum`] for NaN/zero-weight semantics).
///
/// # Errors
/// [`KernelError::NoParts`], [`KernelError::WeightCount`],
/// [`KernelError::InvalidWeight`], [`KernelError::LengthMismatch`],
/// [`KernelError::DeviceMismatch`], or a CUDA error.
pub fn weighted_sum(out: &mut Buffer<f32>, parts: &[&Buffer<f32>], weights: &[f32]) -> Result<()> {
    let (dev, _) = check_parts("weighted_sum", out, parts, weights)?;
    match dev {
        Device::Cpu => cpu::weighted_sum(out.host_mut()?, &host_parts(parts)?, weights),
        Device::Cuda(_) => gpu::weighted_sum(out, parts, weights, None),
    }
}

/// `out = sum_i w_i * parts[i] / sum_i w_i`.
///
/// # Errors
/// As [`weighted_sum`], plus [`KernelError::ZeroWeightSum`].
pub fn weighted_average(
    out: &mut Buffer<f32>,
    parts: &[&Buffer<f32>],
    weights: &[f32],
) -> Result<()> {
    const OP: &str = "weighted_average";
    let (dev, sum) = check_parts(OP, out, parts, weights)?;
    let norm = normalize(OP, sum, weights)?;
    match dev {
        Device::Cpu => cpu::weighted_sum(out.host_mut()?, &host_parts(parts)?, &norm),
        Device::Cuda(_) => gpu::weighted_sum(out, parts, &norm, None),
    }
}

/// `out = weighted_average(parts, weights) - own` (the all-reduce's delta).
///
/// # Errors
/// As [`weighted_average`]; `own` must match `out` in length and device.
pub fn weighted_delta(
    out: &mut Buffer<f32>,
    parts: &[&Buffer<f32>],
    weights: &[f32],
    own: &Buffer<f32>,
) -> Result<()> {
    const OP: &str = "weighted_delta";
    let (dev, sum) = check_parts(OP, out, parts, weights)?;
    same_device(OP, dev, &[own.device()])?;
    check_len(OP, "own", out.len(), own.len())?;
    let norm = normalize(OP, sum, weights)?;
    match dev {
        Device::Cpu => {
            cpu::weighted_delta(out.host_mut()?, &host_parts(parts)?, weights, own.host()?)
        }
        Device::Cuda(_) => gpu::weighted_sum(out, parts, &norm, Some(own)),
    }
}

/// Encodes `src` as fp16 into `dst` (same length; see [`cpu::f16`] for rounding,
/// saturation and NaN/inf).
///
/// # Errors
/// [`KernelError::DeviceMismatch`], [`KernelError::LengthMismatch`], or a CUDA error.
pub fn encode_f16(src: &Buffer<f32>, dst: &mut Buffer<f16>) -> Result<()> {
    const OP: &str = "encode_f16";
    let dev = same_device(OP, src.device(), &[dst.device()])?;
    check_len(OP, "dst", src.len(), dst.len())?;
    match dev {
        Device::Cpu => cpu::f16::encode(src.host()?, bytemuck::cast_slice_mut(dst.host_mut()?)),
        Device::Cuda(_) => gpu::encode_f16(src, dst),
    }
}

/// Decodes fp16 `src` into `dst`.
///
/// # Errors
/// [`KernelError::DeviceMismatch`], [`KernelError::LengthMismatch`], or a CUDA error.
pub fn decode_f16(src: &Buffer<f16>, dst: &mut Buffer<f32>) -> Result<()> {
    const OP: &str = "decode_f16";
    let dev = same_device(OP, src.device(), &[dst.device()])?;
    check_len(OP, "dst", src.len(), dst.len())?;
    match dev {
        Device::Cpu => cpu::f16::decode(bytemuck::cast_slice(src.host()?), dst.host_mut()?),
        Device::Cuda(_) => gpu::decode_f16(src, dst, None),
    }
}

/// `acc += weight * decode(src)` for fp16 `src`, fused.
///
/// # Errors
/// As [`decode_f16`], plus [`KernelError::NonFiniteScalar`] for the weight.
pub fn decode_f16_accumulate(src: &Buffer<f16>, acc: &mut Buffer<f32>, weight: f32) -> Result<()> {
    const OP: &str = "decode_f16_accumulate";
    let dev = same_device(OP, src.device(), &[acc.device()])?;
    check_len(OP, "acc", src.len(), acc.len())?;
    check_finite(OP, "weight", weight)?;
    match dev {
        Device::Cpu => {
            cpu::f16::decode_accumulate(bytemuck::cast_slice(src.host()?), acc.host_mut()?, weight)
        }
        Device::Cuda(_) => gpu::decode_f16(src, acc, Some(weight)),
    }
}

/// Encodes `src` as bf16 into `dst` (same length; see [`cpu::bf16`] for
/// rounding, saturation and NaN/inf).
///
/// # Errors
/// [`KernelError::DeviceMismatch`], [`KernelError::LengthMismatch`], or a CUDA error.
pub fn encode_bf16(src: &Buffer<f32>, dst: &mut Buffer<bf16>) -> Result<()> {
    const OP: &str = "encode_bf16";
    let dev = same_device(OP, src.device(), &[dst.device()])?;
    check_len(OP, "dst", src.len(), dst.len())?;
    match dev {
        Device::Cpu => cpu::bf16::encode(src.host()?, bytemuck::cast_slice_mut(dst.host_mut()?)),
        Device::Cuda(_) => gpu::encode_bf16(src, dst),
    }
}

/// Decodes bf16 `src` into `dst` (exact).
///
/// # Errors
/// [`KernelError::DeviceMismatch`], [`KernelError::LengthMismatch`], or a CUDA error.
pub fn decode_bf16(src: &Buffer<bf16>, dst: &mut Buffer<f32>) -> Result<()> {
    const OP: &str = "decode_bf16";
    let dev = same_device(OP, src.device(), &[dst.device()])?;
    check_len(OP, "dst", src.len(), dst.len())?;
    match dev {
        Device::Cpu => cpu::bf16::decode(bytemuck::cast_slice(src.host()?), dst.host_mut()?),
        Device::Cuda(_) => gpu::decode_bf16(src, dst, None),
    }
}

/// `acc += weight * decode(src)` for bf16 `src`, fused.
///
/// # Errors
/// As [`decode_bf16`], plus [`KernelError::NonFiniteScalar`] for the weight.
pub fn decode_bf16_accumulate(
    src: &Buffer<bf16>,
    acc: &mut Buffer<f32>,
    weight: f32,
) -> Result<()> {
    const OP: &str = "decode_bf16_accumulate";
    let dev = same_device(OP, src.device(), &[acc.device()])?;
    check_len(OP, "acc", src.len(), acc.len())?;
    check_finite(OP, "weight", weight)?;
    match dev {
        Device::Cpu => {
            cpu::bf16::decode_accumulate(bytemuck::cast_slice(src.host()?), acc.host_mut()?, weight)
        }
        Device::Cuda(_) => gpu::decode_bf16(src, acc, Some(weight)),
    }
}

/// Blockwise 8-bit encode of `src` into `dst` (same length).
///
/// # Errors
/// [`KernelError::DeviceMismatch`], [`KernelError::LengthMismatch`], or a CUDA error.
pub fn encode_q8(src: &Buffer<f32>, dst: &mut Q8Buffer) -> Result<()> {
    const OP: &str = "encode_q8";
    let dev = same_device(OP, src.device(), &[dst.device()])?;
    check_len(OP, "dst", src.len(), dst.len())?;
    match dev {
        Device::Cpu => {
            let block = dst.block_size;
            let Q8Buffer { scales, codes, .. } = dst;
            cpu::q8::encode_into::<f32>(src.host()?, block, scales.host_mut()?, codes.host_mut()?);
            Ok(())
        }
        Device::Cuda(_) => gpu::encode_q8(src, dst),
    }
}

fn decode_q8_impl(
    op: &'static str,
    src: &Q8Buffer,
    dst: &mut Buffer<f32>,
    weight: Option<f32>,
) -> Result<()> {
    let dev = same_device(op, src.device(), &[dst.device()])?;
    check_len(op, "dst", src.len(), dst.len())?;
    if let Some(w) = weight {
        check_finite(op, "weight", w)?;
    }
    match dev {
        Device::Cpu => {
            cpu::q8::decode_into::<f32>(
                src.scales.host()?,
                src.codes.host()?,
                src.block_size,
                dst.host_mut()?,
                weight,
            );
            Ok(())
        }
        Device::Cuda(_) => gpu::decode_q8(src, dst, weight),
    }
}

/// Decodes a blockwise 8-bit encoding into `dst`.
///
/// # Errors
/// [`KernelError::DeviceMismatch`], [`KernelError::LengthMismatch`], or a CUDA error.
pub fn decode_q8(src: &Q8Buffer, dst: &mut Buffer<f32>) -> Result<()> {
    decode_q8_impl("decode_q8", src, dst, None)
}

/// `acc += weight * decode(src)` for a blockwise 8-bit `src`, fused.
///
/// # Errors
/// As [`decode_q8`], plus [`KernelError::NonFiniteScalar`] for the weight.
pub fn decode_q8_accumulate(src: &Q8Buffer, acc: &mut Buffer<f32>, weight: f32) -> Result<()> {
    decode_q8_impl("decode_q8_accumulate", src, acc, Some(weight))
}

/// One fused SGD step (see [`Sgd`]).
///
/// # Errors
/// [`KernelError::InvalidHyperparameter`], [`KernelError::DeviceMismatch`],
/// [`KernelError::LengthMismatch`], or a CUDA error.
pub fn sgd_step(
    params: &mut Buffer<f32>,
    grads: &Buffer<f32>,
    momentum_buf: &mut Buffer<f32>,
    hp: &Sgd,
) -> Result<()> {
    const OP: &str = "sgd_step";
    hp.validate()?;
    let dev = same_device(
        OP,
        params.device(),
        &[grads.device(), momentum_buf.device()],
    )?;
    check_len(OP, "grads", params.len(), grads.len())?;
    check_len(OP, "momentum_buf", params.len(), momentum_buf.len())?;
    match dev {
        Device::Cpu => cpu::sgd_step(
            params.host_mut()?,
            grads.host()?,
            momentum_buf.host_mut()?,
            hp,
        ),
        Device::Cuda(_) => gpu::sgd_step(params, grads, momentum_buf, hp),
    }
}

fn check_adam(
    op: &'static str,
    p: &Buffer<f32>,
    g: &Buffer<f32>,
    m: &Buffer<f32>,
    v: &Buffer<f32>,
) -> Result<Device> {
    let dev = same_device(op, p.device(), &[g.device(), m.device(), v.device()])?;
    check_len(op, "grads", p.len(), g.len())?;
    check_len(op, "exp_avg", p.len(), m.len())?;
    check_len(op, "exp_avg_sq", p.len(), v.len())?;
    Ok(dev)
}

/// One fused AdamW step (see [`AdamW`]); `step` counts from 1.
///
/// # Errors
/// [`KernelError::InvalidHyperparameter`], [`KernelError::ZeroStep`],
/// [`KernelError::DeviceMismatch`], [`KernelError::LengthMismatch`], or a CUDA error.
pub fn adamw_step(
    params: &mut Buffer<f32>,
    grads: &Buffer<f32>,
    exp_avg: &mut Buffer<f32>,
    exp_avg_sq: &mut Buffer<f32>,
    hp: &AdamW,
    step: u64,
) -> Result<()> {
    hp.validate()?;
    match check_adam("adamw_step", params, grads, exp_avg, exp_avg_sq)? {
        Device::Cpu => cpu::adamw_step(
            params.host_mut()?,
            grads.host()?,
            exp_avg.host_mut()?,
            exp_avg_sq.host_mut()?,
            hp,
            step,
        ),
        Device::Cuda(_) => gpu::adamw_step(params, grads, exp_avg, exp_avg_sq, hp, step),
    }
}

/// One fused LAMB step (see [`Lamb`]) with per-tensor trust ratios from `layout`.
///
/// # Errors
/// As [`adamw_step`], plus [`KernelError::LayoutMismatch`].
pub fn lamb_step(
    params: &mut Buffer<f32>,
    grads: &Buffer<f32>,
    exp_avg: &mut Buffer<f32>,
    exp_avg_sq: &mut Buffer<f32>,
    layout: &Layout,
    hp: &Lamb,
    step: u64,
) -> Result<()> {
    const OP: &str = "lamb_step";
    hp.validate()?;
    let dev = check_adam(OP, params, grads, exp_avg, exp_avg_sq)?;
    if params.len() != layout.total_len() {
        return Err(KernelError::LayoutMismatch {
            op: OP,
            expected: layout.total_len(),
            actual: params.len(),
        });
    }
    match dev {
        Device::Cpu => cpu::lamb_step(
            params.host_mut()?,
            grads.host()?,
            exp_avg.host_mut()?,
            exp_avg_sq.host_mut()?,
            layout,
            hp,
            step,
        ),
        Device::Cuda(_) => gpu::lamb_step(params, grads, exp_avg, exp_avg_sq, layout, hp, step),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_device_reports_the_odd_one_out() {
        let e = same_device("op", Device::Cpu, &[Device::Cpu, Device::Cuda(1)]);
        assert!(matches!(
            e,
            Err(KernelError::DeviceMismatch {
                op: "op",
                expected: Device::Cpu,
                actual: Device::Cuda(1)
            })
        ));
        assert_eq!(
            same_device("op", Device::Cuda(0), &[Device::Cuda(0)]).unwrap(),
            Device::Cuda(0)
        );
    }
}
