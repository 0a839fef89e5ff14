//! Fused optimizer updates: one pass over parameters, gradients and state.

use rayon::prelude::*;

use super::{CHUNK, PAR_MIN};
use crate::{
    AdamW, KernelError, Lamb, Layout, Result, Sgd,
    error::check_len,
    optim::{AdamScalars, adam_scalars},
};

/// One SGD step (see [`Sgd`] for the formula), in place on `params` and `momentum_buf`.
///
/// # Errors
/// [`KernelError::InvalidHyperparameter`] or [`KernelError::LengthMismatch`].
pub fn sgd_step(
    params: &mut [f32],
    grads: &[f32],
    momentum_buf: &mut [f32],
    hp: &Sgd,
) -> Result<()> {
    const OP: &str = "sgd_step";
    hp.validate()?;
    check_len(OP, "grads", params.len(), grads.len())?;
    check_len(OP, "momentum_buf", params.len(), momentum_buf.len())?;
    let Sgd {
        lr,
        momentum: mu,
        dampening,
        weight_decay: wd,
        nesterov,
    } = *hp;
    let damp = 1.0 - dampening;
    let kernel = |(p, (g, b)): (&mut [f32], (&[f32], &mut [f32]))| {
        for ((p, g), b) in p.iter_mut().zip(g).zip(b.iter_mut()) {
            let g = g + wd * *p;
            let nb = mu * *b + damp * g;
            *b = nb;
            let d = if nesterov { g + mu * nb } else { nb };
            *p -= lr * d;
        }
    };
    if params.len() < PAR_MIN {
        kernel((params, (grads, momentum_buf)));
    } else {
        params
            .par_chunks_mut(CHUNK)
            .zip(
                grads
                    .par_chunks(CHUNK)
                    .zip(momentum_buf.par_chunks_mut(CHUNK)),
            )
            .for_each(kernel);
    }
    Ok(())
}

fn check_adam_lens(op: &'static str, p: usize, g: usize, m: usize, v: usize) -> Result<()> {
    check_len(op, "grads", p, g)?;
    check_len(op, "exp_avg", p, m)?;
    check_len(op, "exp_avg_sq", p, v)
}

/// Matching chunks of params, grads, exp_avg and exp_avg_sq.
type AdamChunk<'a> = ((&'a mut [f32], &'a [f32]), (&'a mut [f32], &'a mut [f32]));

/// One AdamW step (see [`AdamW`]); `step` counts from 1.
///
/// # Errors
/// [`KernelError::InvalidHyperparameter`], [`KernelError::ZeroStep`] or
/// [`KernelError::LengthMismatch`].
pub fn adamw_step(
    params: &mut [f32],
    grads: &[f32],
    exp_avg: &mut [f32],
    exp_avg_sq: &mut [f32],
    hp: &AdamW,
    step: u64,
) -> Result<()> {
    const OP: &str = "adamw_step";
    hp.validate()?;
    check_adam_lens(
        OP,
        params.len(),
        grads.len(),
        exp_avg.len(),
        exp_avg_sq.len(),
    )?;
    let AdamScalars {
        step_size,
        inv_sqrt_bc2,
        ..
    } = adam_scalars(OP, hp.lr, hp.beta1, hp.beta2, step)?;
    let AdamW {
        lr,
        beta1: b1,
        beta2: b2,
        eps,
        weight_decay: wd,
    } = *hp;
    let decay = 1.0 - lr * wd;
    let kernel = |((p, g), (m, v)): AdamChunk<'_>| {
        for (((p, g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
            let nm = b1 * *m + (1.0 - b1) * g;
            let nv = b2 * *v + (1.0 - b2) * g * g;
            *m = nm;
            *v = nv;
            *p = *p * decay - step_size * nm / (nv.sqrt() * inv_sqrt_bc2 + eps);
        }
    };
    if params.len() < PAR_MIN {
        kernel(((params, grads), (exp_avg, exp_avg_sq)));
    } else {
        params
            .par_chunks_mut(CHUNK)
            .zip(grads.par_chunks(CHUNK))
            .zip(
                exp_avg
                    .par_chunks_mut(CHUNK)
                    .zip(exp_avg_sq.par_chunks_mut(CHUNK)),
            )
            .for_each(kernel);
    }
    Ok(())
}

/// A contiguous piece of one tensor, with the matching state slices.
struct Piece<'a> {
    tensor: usize,
    /// The piece is the whole tensor: both LAMB passes run back to back on it
    /// while it is in cache.
    whole: bool,
    p: &'a mut [f32],
    g: &'a [f32],
    m: &'a mut [f32],
    v: &'a mut [f32],
}

/// LAMB's per-element scalars.
#[derive(Clone, Copy)]
struct LambK {
    b1: f32,
    b2: f32,
    eps: f32,
    wd: f32,
    inv_bc1: f32,
    inv_sqrt_bc2: f32,
}

impl LambK {
    #[inline(always)]
    fn direction(&self, p: f32, m: f32, v: f32) -> f32 {
        m * self.inv_bc1 / (v.sqrt() * self.inv_sqrt_bc2 + self.eps) + self.wd * p
    }

    /// Updates the moments; returns (sum p^2, sum u^2).
    fn moments(&self, pc: &mut Piece<'_>) -> (f64, f64) {
        lamb_moments(self, pc.p, pc.g, pc.m, pc.v)
    }

    fn apply(&self, pc: &mut Piece<'_>, lr_trust: f32) {
        lamb_apply(self, pc.p, pc.m, pc.v, lr_trust);
    }
}

/// Lanes of the norm sums: the compiler keeps them in one vector register.
const LANES: usize = 8;

/// Values per pass of the moment update; `u` for them lives on the stack.
const SCRATCH: usize = 1024;

/// Sum of squares with `LANES` independent partial sums (a plain sequential
/// float sum cannot be vectorised: the compiler may not reassociate it).
#[inline(always)]
#[allow(clippy::needless_range_loop)] // lane-indexed loops are what the SLP vectoriser recognises
fn sum_squares(x: &[f32]) -> f64 {
    let mut acc = [0f32; LANES];
    let mut it = x.chunks_exact(LANES);
    for c in &mut it {
        for j in 0..LANES {
            acc[j] += c[j] * c[j];
        }
    }
    for (a, r) in acc.iter_mut().zip(it.remainder()) {
        *a += r * r;
    }
    acc.iter().map(|&a| f64::from(a)).sum()
}

#[inline(always)]
fn lamb_moments_impl(k: &LambK, p: &[f32], g: &[f32], m: &mut [f32], v: &mut [f32]) -> (f64, f64) {
    let mut scratch = [0f32; SCRATCH];
    let (mut pp, mut uu) = (0f64, 0f64);
    let pieces = p
        .chunks(SCRATCH)
        .zip(g.chunks(SCRATCH))
        .zip(m.chunks_mut(SCRATCH).zip(v.chunks_mut(SCRATCH)));
    for ((p, g), (m, v)) in pieces {
        let u = &mut scratch[..p.len()];
        for ((u, (p, g)), (m, v)) in u
            .iter_mut()
            .zip(p.iter().zip(g))
            .zip(m.iter_mut().zip(v.iter_mut()))
        {
            let nm = k.b1 * *m + (1.0 - k.b1) * g;
            let nv = k.b2 * *v + (1.0 - k.b2) * g * g;
            *m = nm;
            *v = nv;
            *u = k.direction(*p, nm, nv);
        }
        pp += sum_squares(p);
        uu += sum_squares(u);
    }
    (pp, uu)
}

#[inline(always)]
fn lamb_apply_impl(k: &LambK, p: &mut [f32], m: &[f32], v: &[f32], lr_trust: f32) {
    for ((p, m), v) in p.iter_mut().zip(m).zip(v) {
        *p -= lr_trust * k.direction(*p, *m, *v);
    }
}

super::avx2_twin! {
    /// LAMB pass 1 on one piece.
    fn lamb_moments(k: &LambK, p: &[f32], g: &[f32], m: &mut [f32], v: &mut [f32]) -> (f64, f64) = lamb_moments_impl;
}

super::avx2_twin! {
    /// LAMB pass 2 on one piece.
    fn lamb_apply(k: &LambK, p: &mut [f32], m: &[f32], v: &[f32], lr_trust: f32) -> () = lamb_apply_impl;
}

pub(crate) fn trust_ratio(pp: f64, uu: f64, max: f32) -> f32 {
    if pp > 0.0 && uu > 0.0 {
        ((pp / uu).sqrt() as f32).min(max)
    } else {
        1.0
    }
}

/// Elements per LAMB piece: four state streams of this size stay in L2.
const LAMB_PIECE: usize = 1 << 14;

fn pieces<'a>(
    layout: &Layout,
    mut p: &'a mut [f32],
    mut g: &'a [f32],
    mut m: &'a mut [f32],
    mut v: &'a mut [f32],
) -> Vec<Piece<'a>> {
    let mut out = Vec::with_capacity(layout.total_len() / LAMB_PIECE + layout.num_tensors());
    let mut pos = 0;
    for (tensor, t) in layout.tensors().iter().enumerate() {
        if t.is_empty() {
            continue;
        }
        // Layout invariants: sorted, non-overlapping, in bounds.
        let skip = t.offset() - pos;
        p = &mut std::mem::take(&mut p)[skip..];
        g = &g[skip..];
        m = &mut std::mem::take(&mut m)[skip..];
        v = &mut std::mem::take(&mut v)[skip..];
        let whole = t.len() <= LAMB_PIECE;
        let mut left = t.len();
        while left > 0 {
            let n = left.min(LAMB_PIECE);
            let (hp, tp) = std::mem::take(&mut p).split_at_mut(n);
            let (hg, tg) = g.split_at(n);
            let (hm, tm) = std::mem::take(&mut m).split_at_mut(n);
            let (hv, tv) = std::mem::take(&mut v).split_at_mut(n);
            out.push(Piece {
                tensor,
                whole,
                p: hp,
                g: hg,
                m: hm,
                v: hv,
            });
            (p, g, m, v) = (tp, tg, tm, tv);
            left -= n;
        }
        pos = t.offset() + t.len();
    }
    out
}

/// One LAMB step (see [`Lamb`]) with a trust ratio per tensor of `layout`;
/// `step` counts from 1. Elements outside every tensor (padding) are untouched.
///
/// # Errors
/// [`KernelError::InvalidHyperparameter`], [`KernelError::ZeroStep`],
/// [`KernelError::LengthMismatch`], or [`KernelError::LayoutMismatch`] if the
/// buffers are not `layout.total_len()` long.
pub fn lamb_step(
    params: &mut [f32],
    grads: &[f32],
    exp_avg: &mut [f32],
    exp_avg_sq: &mut [f32],
    layout: &Layout,
    hp: &Lamb,
    step: u64,
) -> Result<()> {
    const OP: &str = "lamb_step";
    hp.validate()?;
    if params.len() != layout.total_len() {
        return Err(KernelError::LayoutMismatch {
            op: OP,
            expected: layout.total_len(),
            actual: params.len(),
        });
    }
    check_adam_lens(
        OP,
        params.len(),
        grads.len(),
        exp_avg.len(),
        exp_avg_sq.len(),
    )?;
    let AdamScalars {
        inv_bc1,
        inv_sqrt_bc2,
        ..
    } = adam_scalars(OP, hp.lr, hp.beta1, hp.beta2, step)?;
    let k = LambK {
        b1: hp.beta1,
        b2: hp.beta2,
        eps: hp.eps,
        wd: hp.weight_decay,
        inv_bc1,
        inv_sqrt_bc2,
    };
    let (lr, max) = (hp.lr, hp.max_trust_ratio);
    let mut items = pieces(layout, params, grads, exp_avg, exp_avg_sq);
    let pass1 = |pc: &mut Piece<'_>| {
        let (pp, uu) = k.moments(pc);
        if pc.whole {
            k.apply(pc, lr * trust_ratio(pp, uu, max));
        }
        (pc.tensor, pp, uu)
    };
    let sums: Vec<(usize, f64, f64)> = if layout.total_len() < PAR_MIN {
        items.iter_mut().map(pass1).collect()
    } else {
        items.par_iter_mut().map(pass1).collect()
    };
    let mut norms = vec![(0f64, 0f64); layout.num_tensors()];
    for (t, pp, uu) in sums {
        norms[t].0 += pp;
        norms[t].1 += uu;
    }
    let lr_trust: Vec<f32> = norms
        .iter()
        .map(|&(pp, uu)| lr * trust_ratio(pp, uu, max))
        .collect();
    let pass2 = |pc: &mut Piece<'_>| {
        if !pc.whole {
            k.apply(pc, lr_trust[pc.tensor]);
        }
    };
    if layout.total_len() < PAR_MIN {
        items.iter_mut().for_each(pass2);
    } else {
        items.par_iter_mut().for_each(pass2);
    }
    Ok(())
}
