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

    /// Updates the moments; returns (sum p^2, sum u^2). With `u` as long as
    /// the piece, the update direction is also stored there for pass 2.
    fn moments(&self, pc: &mut Piece<'_>, u: &mut [f32]) -> (f64, f64) {
        lamb_moments(self, pc.p, pc.g, pc.m, pc.v, u)
    }

    /// Pass 2: `p -= lr_trust * u`, from the stored direction when `u` holds
    /// it, else recomputed from `p, m, v` (the same bits either way).
    fn apply(&self, pc: &mut Piece<'_>, u: &[f32], lr_trust: f32) {
        if u.len() == pc.p.len() {
            lamb_apply_stored(pc.p, u, lr_trust);
        } else {
            lamb_apply(self, pc.p, pc.m, pc.v, lr_trust);
        }
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
fn lamb_moments_impl(
    k: &LambK,
    p: &[f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    u_out: &mut [f32],
) -> (f64, f64) {
    let mut scratch = [0f32; SCRATCH];
    let store = u_out.len() == p.len();
    let (mut pp, mut uu) = (0f64, 0f64);
    let pieces = p
        .chunks(SCRATCH)
        .zip(g.chunks(SCRATCH))
        .zip(m.chunks_mut(SCRATCH).zip(v.chunks_mut(SCRATCH)))
        .enumerate();
    for (i, ((p, g), (m, v))) in pieces {
        let u = if store {
            &mut u_out[i * SCRATCH..i * SCRATCH + p.len()]
        } else {
            &mut scratch[..p.len()]
        };
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

#[inline(always)]
fn lamb_apply_stored_impl(p: &mut [f32], u: &[f32], lr_trust: f32) {
    for (p, u) in p.iter_mut().zip(u) {
        *p -= lr_trust * u;
    }
}

super::avx2_twin! {
    /// LAMB pass 1 on one piece.
    fn lamb_moments(k: &LambK, p: &[f32], g: &[f32], m: &mut [f32], v: &mut [f32], u_out: &mut [f32]) -> (f64, f64) = lamb_moments_impl;
}

super::avx2_twin! {
    /// LAMB pass 2 on one piece, from the direction stored by pass 1.
    fn lamb_apply_stored(p: &mut [f32], u: &[f32], lr_trust: f32) -> () = lamb_apply_stored_impl;
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

/// Elements per LAMB window (on a 2-thread machine): a window's tensors get
/// both passes before the next window starts, so the `p, m, v` that pass 2
/// reads (12 bytes per element, 6 MiB) are still in the last-level cache from
/// pass 1. Only a tensor larger than a window is read twice from memory, and
/// its pass 2 runs backwards so that it starts on the most recently cached part.
const LAMB_WINDOW: usize = 1 << 19;

/// Window length for `threads` workers: at least 8 pieces per thread so the
/// two passes of a window stay balanced on many-core machines (whose caches
/// are larger too).
fn window_len(threads: usize) -> usize {
    LAMB_WINDOW.max(threads.saturating_mul(8 * LAMB_PIECE))
}

/// Number of leading pieces that form the next window: whole tensors, about
/// `window_len` elements, and at least one tensor.
fn window_end(pieces: &[Piece<'_>], window_len: usize) -> usize {
    let mut len = 0;
    let mut end = 0;
    while end < pieces.len() {
        let tensor = pieces[end].tensor;
        let tensor_len: usize = pieces[end..]
            .iter()
            .take_while(|pc| pc.tensor == tensor)
            .map(|pc| pc.p.len())
            .sum();
        if end > 0 && len + tensor_len > window_len {
            break;
        }
        len += tensor_len;
        while end < pieces.len() && pieces[end].tensor == tensor {
            end += 1;
        }
    }
    end
}

/// Most elements whose update direction pass 1 stores for pass 2 (8 MiB of
/// `f32`): pass 2 of a window then reads `p` and the direction (8 bytes per
/// element, no square root or division) instead of `p, m, v` (12 bytes). A
/// window with more elements in multi-piece tensors recomputes the direction.
const LAMB_STORED_MAX: usize = 1 << 21;

thread_local! {
    /// The stored directions, kept per calling thread between steps so a step
    /// does not fault in fresh pages.
    static LAMB_DIRECTIONS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs LAMB window by window over `items` (pieces of `num_tensors` tensors
/// in layout order), storing directions for windows of up to `stored_max`
/// multi-piece elements. The result depends neither on `window_len` nor on
/// whether directions are stored.
fn lamb_windows(
    k: &LambK,
    items: &mut [Piece<'_>],
    (lr, max): (f32, f32),
    num_tensors: usize,
    parallel: bool,
    (window_len, stored_max): (usize, usize),
) {
    let mut norms = vec![(0f64, 0f64); num_tensors];
    let mut lr_trust = vec![0f32; num_tensors];
    LAMB_DIRECTIONS.with(|cell| {
        // A re-entrant call (not possible today) would fall back to recomputing.
        let mut held = cell.try_borrow_mut();
        let mut empty = Vec::new();
        let directions: &mut Vec<f32> = match held.as_mut() {
            Ok(d) => d,
            Err(_) => &mut empty,
        };
        let mut rest = items;
        while !rest.is_empty() {
            let end = window_end(rest, window_len);
            let (window, tail) = std::mem::take(&mut rest).split_at_mut(end);
            rest = tail;
            // Pieces of multi-piece tensors get a slice of `directions`.
            let stored: usize = window
                .iter()
                .filter(|pc| !pc.whole)
                .map(|pc| pc.p.len())
                .sum();
            let store = stored <= stored_max;
            if store && directions.len() < stored {
                directions.resize(stored, 0.0);
            }
            let mut free: &mut [f32] = if store {
                &mut directions[..stored]
            } else {
                &mut []
            };
            let mut us: Vec<&mut [f32]> = Vec::with_capacity(window.len());
            for pc in window.iter() {
                let n = if store && !pc.whole { pc.p.len() } else { 0 };
                let (u, tail) = std::mem::take(&mut free).split_at_mut(n);
                us.push(u);
                free = tail;
            }
            lamb_window(
                k,
                window,
                &mut us,
                lr,
                max,
                &mut norms,
                &mut lr_trust,
                parallel,
            );
        }
    });
}

/// Both LAMB passes over one window of whole tensors; `us[i]` is piece `i`'s
/// direction store (empty: recompute in pass 2).
#[allow(clippy::too_many_arguments)]
fn lamb_window(
    k: &LambK,
    window: &mut [Piece<'_>],
    us: &mut [&mut [f32]],
    lr: f32,
    max: f32,
    norms: &mut [(f64, f64)],
    lr_trust: &mut [f32],
    parallel: bool,
) {
    // Pass 1: moments and norms; a tensor that is one piece is finished at
    // once while it is in L1/L2.
    let pass1 = |(pc, u): (&mut Piece<'_>, &mut &mut [f32])| {
        let (pp, uu) = k.moments(pc, u);
        if pc.whole {
            k.apply(pc, &[], lr * trust_ratio(pp, uu, max));
        }
        (pc.tensor, pp, uu)
    };
    let sums: Vec<(usize, f64, f64)> = if parallel {
        window
            .par_iter_mut()
            .zip(us.par_iter_mut())
            .map(pass1)
            .collect()
    } else {
        window.iter_mut().zip(us.iter_mut()).map(pass1).collect()
    };
    // Pieces in layout order: the same summation order whatever the windows.
    for (t, pp, uu) in sums {
        norms[t].0 += pp;
        norms[t].1 += uu;
    }
    for pc in window.iter().filter(|pc| !pc.whole) {
        let (pp, uu) = norms[pc.tensor];
        lr_trust[pc.tensor] = lr * trust_ratio(pp, uu, max);
    }
    // Pass 2 (tensors of several pieces): p -= lr * trust * u, last piece first.
    let pass2 = |(pc, u): (&mut Piece<'_>, &mut &mut [f32])| {
        if !pc.whole {
            k.apply(pc, u, lr_trust[pc.tensor]);
        }
    };
    if parallel {
        window
            .par_iter_mut()
            .zip(us.par_iter_mut())
            .rev()
            .for_each(pass2);
    } else {
        window.iter_mut().zip(us.iter_mut()).rev().for_each(pass2);
    }
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
    let mut items = pieces(layout, params, grads, exp_avg, exp_avg_sq);
    lamb_windows(
        &k,
        &mut items,
        (hp.lr, hp.max_trust_ratio),
        layout.num_tensors(),
        layout.total_len() >= PAR_MIN,
        (window_len(rayon::current_num_threads()), LAMB_STORED_MAX),
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Windows change only the order of memory accesses: every window length
    /// gives the same bits, in parallel or not.
    #[test]
    fn lamb_result_does_not_depend_on_windows() {
        let sizes = [
            5,
            3 * LAMB_PIECE + 17,
            1,
            LAMB_PIECE,
            2 * LAMB_PIECE,
            300,
            0,
            40_000,
        ];
        let layout = Layout::packed(
            sizes
                .iter()
                .enumerate()
                .map(|(i, &n)| (format!("t{i}"), vec![n])),
            16,
        )
        .unwrap();
        let n = layout.total_len();
        let wave = |i: usize, f: f32| ((i as f32) * f).sin();
        let p0: Vec<f32> = (0..n).map(|i| wave(i, 0.37)).collect();
        let g: Vec<f32> = (0..n).map(|i| wave(i, 1.91) * 0.1).collect();
        let m0: Vec<f32> = (0..n).map(|i| wave(i, 0.11) * 0.01).collect();
        let v0: Vec<f32> = (0..n).map(|i| wave(i, 0.05).abs() * 1e-4).collect();
        let k = LambK {
            b1: 0.9,
            b2: 0.999,
            eps: 1e-6,
            wd: 0.01,
            inv_bc1: 10.0,
            inv_sqrt_bc2: 31.6,
        };
        let run = |window_len: usize, parallel: bool, stored_max: usize| {
            let (mut p, mut m, mut v) = (p0.clone(), m0.clone(), v0.clone());
            let mut items = pieces(&layout, &mut p, &g, &mut m, &mut v);
            lamb_windows(
                &k,
                &mut items,
                (1e-3, 10.0),
                layout.num_tensors(),
                parallel,
                (window_len, stored_max),
            );
            (p, m, v)
        };
        // Reference: one window, directions recomputed in pass 2.
        let reference = run(usize::MAX, false, 0);
        for (w, par, stored_max) in [
            (1, true, LAMB_STORED_MAX),
            (1, false, LAMB_STORED_MAX),
            (1, true, 0),
            (LAMB_PIECE, true, LAMB_STORED_MAX),
            (3 * LAMB_PIECE, true, LAMB_STORED_MAX),
            (3 * LAMB_PIECE, true, 0),
            (usize::MAX, true, LAMB_STORED_MAX),
            (usize::MAX, false, LAMB_STORED_MAX),
            // Stores some windows, recomputes those past the limit.
            (usize::MAX, true, 3 * LAMB_PIECE + 17),
            (1, true, 3 * LAMB_PIECE + 17),
        ] {
            let got = run(w, par, stored_max);
            let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&got.0),
                bits(&reference.0),
                "params, window {w}, parallel {par}, stored up to {stored_max}"
            );
            assert_eq!(bits(&got.1), bits(&reference.1), "exp_avg, window {w}");
            assert_eq!(bits(&got.2), bits(&reference.2), "exp_avg_sq, window {w}");
        }
        assert!(
            reference.0.iter().zip(&p0).any(|(a, b)| a != b),
            "the step moved nothing"
        );
    }

    #[test]
    fn windows_hold_whole_tensors() {
        let layout = Layout::packed(
            [
                ("a", vec![3 * LAMB_PIECE]),
                ("b", vec![10]),
                ("c", vec![10]),
            ],
            1,
        )
        .unwrap();
        let n = layout.total_len();
        let (mut p, g, mut m, mut v) = (vec![0f32; n], vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        let items = pieces(&layout, &mut p, &g, &mut m, &mut v);
        assert_eq!(items.len(), 5);
        // A tensor larger than the window is a window of its own.
        assert_eq!(window_end(&items, LAMB_PIECE), 3);
        assert_eq!(window_end(&items[3..], LAMB_PIECE), 2);
        assert_eq!(window_end(&items[3..], 15), 1);
        assert_eq!(window_end(&items, usize::MAX), 5);
    }
}
