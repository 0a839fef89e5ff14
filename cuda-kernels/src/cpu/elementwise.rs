//! Accumulate, scale, weighted reductions and the finiteness check.

use rayon::prelude::*;

use super::{CHUNK, PAR_MIN, avx2_twin};
use crate::{
    KernelError, Result,
    error::{check_finite, check_len},
};

/// `acc += alpha * grad`, elementwise.
///
/// NaN/inf in `grad` or `acc` propagate to the affected elements (IEEE rules);
/// use [`all_finite`] to refuse poisoned inputs first.
///
/// # Errors
/// [`KernelError::LengthMismatch`] if the lengths differ,
/// [`KernelError::NonFiniteScalar`] if `alpha` is NaN or infinite.
pub fn accumulate(acc: &mut [f32], grad: &[f32], alpha: f32) -> Result<()> {
    const OP: &str = "accumulate";
    check_len(OP, "grad", acc.len(), grad.len())?;
    check_finite(OP, "alpha", alpha)?;
    let kernel = |a: &mut [f32], g: &[f32]| {
        for (a, g) in a.iter_mut().zip(g) {
            *a += alpha * g;
        }
    };
    if acc.len() < PAR_MIN {
        kernel(acc, grad);
    } else {
        acc.par_chunks_mut(CHUNK)
            .zip(grad.par_chunks(CHUNK))
            .for_each(|(a, g)| kernel(a, g));
    }
    Ok(())
}

/// What [`accumulate_checked`] saw during its pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccumulateCheck {
    /// Every element of `grad` was finite (no NaN, no ±inf).
    pub grad_finite: bool,
    /// Every element of `acc` is finite after the update. Implies
    /// `grad_finite` (a NaN/inf gradient makes its element NaN/inf, even with
    /// `alpha == 0`); it is also false when `acc` was already poisoned or an
    /// element overflowed to ±inf.
    pub acc_finite: bool,
}

/// `acc += alpha * grad` and, in the same pass, whether `grad` and the
/// updated `acc` are all finite: what an optimizer step needs to know before
/// it uses the accumulator, without a separate [`all_finite`] pass.
///
/// The update is applied whatever the check finds (one pass cannot know the
/// answer before it writes), with the NaN/inf semantics of [`accumulate`]: on
/// `acc_finite == false` the caller must discard or reset the accumulator
/// (e.g. skip the step and zero it, as a loss scaler does on overflow).
/// Empty buffers are finite.
///
/// # Errors
/// As [`accumulate`].
pub fn accumulate_checked(acc: &mut [f32], grad: &[f32], alpha: f32) -> Result<AccumulateCheck> {
    const OP: &str = "accumulate_checked";
    check_len(OP, "grad", acc.len(), grad.len())?;
    check_finite(OP, "alpha", alpha)?;
    let (g, a) = if acc.len() < PAR_MIN {
        accumulate_max_bits(acc, grad, alpha)
    } else {
        acc.par_chunks_mut(CHUNK)
            .zip(grad.par_chunks(CHUNK))
            .map(|(a, g)| accumulate_max_bits(a, g, alpha))
            .reduce(|| (0, 0), |x, y| (x.0.max(y.0), x.1.max(y.1)))
    };
    let inf = f32::INFINITY.to_bits();
    Ok(AccumulateCheck {
        grad_finite: g < inf,
        acc_finite: a < inf,
    })
}

#[inline(always)]
fn accumulate_max_bits_impl(acc: &mut [f32], grad: &[f32], alpha: f32) -> (u32, u32) {
    let (mut mg, mut ma) = (0u32, 0u32);
    for (a, g) in acc.iter_mut().zip(grad) {
        let r = *a + alpha * g;
        *a = r;
        mg = mg.max(g.to_bits() & 0x7fff_ffff);
        ma = ma.max(r.to_bits() & 0x7fff_ffff);
    }
    (mg, ma)
}

avx2_twin! {
    /// `acc += alpha * grad`; returns the largest `|grad|` and `|acc|` bit patterns.
    fn accumulate_max_bits(acc: &mut [f32], grad: &[f32], alpha: f32) -> (u32, u32) = accumulate_max_bits_impl;
}

/// `buf *= s`, elementwise.
///
/// # Errors
/// [`KernelError::NonFiniteScalar`] if `s` is NaN or infinite.
pub fn scale(buf: &mut [f32], s: f32) -> Result<()> {
    check_finite("scale", "s", s)?;
    let kernel = |b: &mut [f32]| {
        for b in b {
            *b *= s;
        }
    };
    if buf.len() < PAR_MIN {
        kernel(buf);
    } else {
        buf.par_chunks_mut(CHUNK).for_each(kernel);
    }
    Ok(())
}

/// `dst = src`, multi-threaded (the kernels bench measures its own copy loop, written like
/// the ops, as the baseline).
///
/// # Errors
/// [`KernelError::LengthMismatch`] if the lengths differ.
pub fn copy(dst: &mut [f32], src: &[f32]) -> Result<()> {
    check_len("copy", "src", dst.len(), src.len())?;
    if dst.len() < PAR_MIN {
        dst.copy_from_slice(src);
    } else {
        dst.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(|(d, s)| d.copy_from_slice(s));
    }
    Ok(())
}

/// True when no element is NaN or infinite (empty buffers are finite).
pub fn all_finite(buf: &[f32]) -> bool {
    // For |x| the IEEE bit pattern orders like the value, and every NaN and
    // inf is >= the bits of +inf: one vectorisable integer max per chunk.
    let max = if buf.len() < PAR_MIN {
        max_abs_bits(buf)
    } else {
        buf.par_chunks(CHUNK)
            .map(max_abs_bits)
            .reduce(|| 0, u32::max)
    };
    max < f32::INFINITY.to_bits()
}

#[inline(always)]
fn max_abs_bits_impl(c: &[f32]) -> u32 {
    c.iter().fold(0u32, |m, x| m.max(x.to_bits() & 0x7fff_ffff))
}

avx2_twin! {
    /// Largest `|x|` bit pattern in `c` (an integer max: vectorises as such).
    fn max_abs_bits(c: &[f32]) -> u32 = max_abs_bits_impl;
}

/// Validated weights: every weight finite and >= 0.
pub(crate) fn check_weights(op: &'static str, parts: usize, weights: &[f32]) -> Result<f64> {
    if parts == 0 {
        return Err(KernelError::NoParts { op });
    }
    if parts != weights.len() {
        return Err(KernelError::WeightCount {
            op,
            parts,
            weights: weights.len(),
        });
    }
    let mut sum = 0f64;
    for (index, &value) in weights.iter().enumerate() {
        if !(value.is_finite() && value >= 0.0) {
            return Err(KernelError::InvalidWeight { op, index, value });
        }
        sum += f64::from(value);
    }
    Ok(sum)
}

/// Chunk for weighted reductions: 32 KiB of output stays in L1 while every part
/// is streamed through it once.
const REDUCE_CHUNK: usize = 1 << 13;

fn reduce_into(
    out: &mut [f32],
    parts: &[&[f32]],
    weights: &[f32],
    finish: impl Fn(&mut [f32], usize) + Sync,
) {
    let kernel = |i: usize, o: &mut [f32]| {
        let start = i * REDUCE_CHUNK;
        let range = start..start + o.len();
        let p = |k: usize| &parts[k][range.clone()];
        // Up to four parts in one pass (same summation order as one at a time),
        // then any further parts accumulated into the L1-resident output.
        match parts.len() {
            1 => o
                .iter_mut()
                .zip(p(0))
                .for_each(|(o, a)| *o = weights[0] * a),
            2 => {
                let (w0, w1) = (weights[0], weights[1]);
                for ((o, a), b) in o.iter_mut().zip(p(0)).zip(p(1)) {
                    *o = w0 * a + w1 * b;
                }
            }
            3 => {
                let (w0, w1, w2) = (weights[0], weights[1], weights[2]);
                for (((o, a), b), c) in o.iter_mut().zip(p(0)).zip(p(1)).zip(p(2)) {
                    *o = w0 * a + w1 * b + w2 * c;
                }
            }
            _ => {
                let (w0, w1, w2, w3) = (weights[0], weights[1], weights[2], weights[3]);
                for ((((o, a), b), c), d) in o.iter_mut().zip(p(0)).zip(p(1)).zip(p(2)).zip(p(3)) {
                    *o = w0 * a + w1 * b + w2 * c + w3 * d;
                }
            }
        }
        for (k, &w) in weights.iter().enumerate().skip(4) {
            for (o, a) in o.iter_mut().zip(p(k)) {
                *o += w * a;
            }
        }
        finish(o, start);
    };
    if out.len() < PAR_MIN {
        out.chunks_mut(REDUCE_CHUNK)
            .enumerate()
            .for_each(|(i, o)| kernel(i, o));
    } else {
        out.par_chunks_mut(REDUCE_CHUNK)
            .enumerate()
            .for_each(|(i, o)| kernel(i, o));
    }
}

fn check_parts(op: &'static str, len: usize, parts: &[&[f32]], weights: &[f32]) -> Result<f64> {
    let sum = check_weights(op, parts.len(), weights)?;
    for p in parts {
        check_len(op, "part", len, p.len())?;
    }
    Ok(sum)
}

/// `out = sum_i weights[i] * parts[i]`.
///
/// Weights must be finite and >= 0; zero weights are allowed (a peer that only
/// helps reduce) and so is an all-zero set, which yields zeros. NaN/inf in
/// parts propagate, even from a part whose weight is 0 (0 * inf = NaN), so a
/// poisoned contribution is never silently hidden.
///
/// # Errors
/// [`KernelError::NoParts`], [`KernelError::WeightCount`],
/// [`KernelError::InvalidWeight`], [`KernelError::LengthMismatch`].
pub fn weighted_sum(out: &mut [f32], parts: &[&[f32]], weights: &[f32]) -> Result<()> {
    check_parts("weighted_sum", out.len(), parts, weights)?;
    reduce_into(out, parts, weights, |_, _| {});
    Ok(())
}

/// `out = sum_i w_i * parts[i] / sum_i w_i` (the reducer's weighted mean).
///
/// # Errors
/// As [`weighted_sum`], plus [`KernelError::ZeroWeightSum`] when the weights
/// sum to zero (the mean is undefined).
pub fn weighted_average(out: &mut [f32], parts: &[&[f32]], weights: &[f32]) -> Result<()> {
    const OP: &str = "weighted_average";
    let norm = normalized(OP, out.len(), parts, weights)?;
    reduce_into(out, parts, &norm, |_, _| {});
    Ok(())
}

/// `out = weighted_average(parts, weights) - own`: the delta the all-reduce
/// sends back, which a peer adds to its own tensor.
///
/// # Errors
/// As [`weighted_average`]; `own` must have `out`'s length.
pub fn weighted_delta(
    out: &mut [f32],
    parts: &[&[f32]],
    weights: &[f32],
    own: &[f32],
) -> Result<()> {
    const OP: &str = "weighted_delta";
    check_len(OP, "own", out.len(), own.len())?;
    let norm = normalized(OP, out.len(), parts, weights)?;
    reduce_into(out, parts, &norm, |o, start| {
        let own = &own[start..start + o.len()];
        for (o, own) in o.iter_mut().zip(own) {
            *o -= own;
        }
    });
    Ok(())
}

/// Weights divided by their sum (in f64, then rounded once).
pub(crate) fn normalized(
    op: &'static str,
    len: usize,
    parts: &[&[f32]],
    weights: &[f32],
) -> Result<Vec<f32>> {
    let sum = check_parts(op, len, parts, weights)?;
    normalize(op, sum, weights)
}

pub(crate) fn normalize(op: &'static str, sum: f64, weights: &[f32]) -> Result<Vec<f32>> {
    if sum <= 0.0 {
        return Err(KernelError::ZeroWeightSum { op });
    }
    Ok(weights
        .iter()
        .map(|&w| (f64::from(w) / sum) as f32)
        .collect())
}
