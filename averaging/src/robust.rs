//! Robust aggregation: how a reducer combines the parts its senders delivered
//! for one part index when some senders may be Byzantine (any finite values,
//! any claimed weight).
//!
//! [`aggregate`] is a pure function of its inputs. [`Aggregation::WeightedMean`]
//! is what a reducer does by default; it has no robustness at all (one sender
//! with positive weight moves the result anywhere). The two robust rules trade
//! a bounded bias for a bound on what a minority of senders can do:
//!
//! * [`Aggregation::TrimmedMean`] bounds every coordinate by the honest
//!   inputs' range at that coordinate, whatever the attackers' weights;
//! * [`Aggregation::CenteredClip`] bounds the Euclidean distance to the honest
//!   weighted mean, for attackers holding less than half of the weight, given a
//!   clipping radius chosen from the honest spread.
//!
//! Each variant's documentation states its bound with a proof; the tests in
//! this file check the stated inequalities numerically. Everything is computed
//! in blocks of coordinates with `f64` sums, no allocation per coordinate, and
//! (for up to 64 inputs with positive weight) none per call once `scratch` has
//! grown.

use std::fmt;

/// Coordinates per block: the unit of every pass over the inputs.
const BLOCK: usize = 128;

/// Inputs with positive weight handled without allocating (per-input state
/// lives on the stack); more allocate once per call.
const STACK_INPUTS: usize = 64;

/// How a reducer combines the parts its senders delivered for one part index.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Aggregation {
    /// Weighted mean (the default; what the reducer does today, streaming).
    ///
    /// No bound: a single input with positive weight moves the result
    /// anywhere (by `weight share × its offset`).
    #[default]
    WeightedMean,
    /// Coordinate-wise trimmed mean: per coordinate, drop the `trim` smallest
    /// and `trim` largest values, weighted mean of the rest.
    ///
    /// Only inputs with positive weight take part, and there must be more than
    /// `2 · trim` of them. Values tied at a cut share the kept count equally:
    /// of `e` values equal to the cut value of which `k` are kept, each enters
    /// with `k / e` of its weight, so the result does not depend on input
    /// order. With equal weights this is the classic trimmed mean.
    /// `trim = 0` is the weighted mean.
    ///
    /// # Bound
    ///
    /// Let `n > 2b` inputs have positive weight, `b = trim`, and at most `b` of
    /// them be Byzantine (any values, any weights). Write `H` for the honest
    /// inputs and `μ` for any point with `μ_j` in the honest range at each
    /// coordinate, in particular the honest weighted mean. Then for every
    /// coordinate `j`
    ///
    /// ```text
    /// min_{i∈H} x_ij  <=  result_j  <=  max_{i∈H} x_ij,
    /// |result_j − μ_j|  <=  max_{i∈H} |x_ij − μ_j|,
    /// ```
    ///
    /// and so, in Euclidean norm over the part, `‖result − μ‖ <= √h · ρ` with
    /// `h = |H|` and `ρ = max_{i∈H} ‖x_i − μ‖`.
    ///
    /// Proof. Sort the `n` values at `j`: `y_0 <= … <= y_{n−1}`. Every kept value
    /// lies in `[y_b, y_{n−1−b}]` (ties at a cut are equal to the cut value).
    /// Of the `b + 1` values `y_0..=y_b` at most `b` are Byzantine, so one is
    /// honest and `y_b >= min_H`; symmetrically `y_{n−1−b} <= max_H`. The result
    /// is a mean of kept values with positive weights, so it lies in
    /// `[y_b, y_{n−1−b}] ⊆ [min_H, max_H]`. `μ_j` lies in the same interval, and
    /// two points of an interval are no further apart than `μ_j` is from the
    /// interval's farther end, which is an honest value. For the norm:
    /// `Σ_j max_H (x_ij − μ_j)² <= Σ_j Σ_H (x_ij − μ_j)² = Σ_H ‖x_i − μ‖² <= hρ²`.
    ///
    /// The weights never enter the bound: an attacker claiming a huge weight
    /// only moves the result within the honest range. The cost is a bias even
    /// without attackers (honest extremes are dropped), bounded the same way.
    TrimmedMean {
        /// Values dropped at each end, per coordinate: the number of Byzantine
        /// inputs tolerated.
        trim: usize,
    },
    /// CenteredClip (Karimireddy, He & Jaggi 2021, "Learning from History for
    /// Byzantine Robust Optimization"; used per part by BTARD, Gorbunov et
    /// al. 2021 "Secure Distributed Training at Scale"):
    /// `v <- v + Σ_i w_i · (x_i − v) · min(1, τ / ‖x_i − v‖) / Σ_i w_i`,
    /// `iterations` times, starting from the coordinate-wise median.
    ///
    /// The start is the coordinate-wise median of the inputs with positive
    /// weight, with the weights ignored (for an even count, the mean of the two
    /// middle values): unlike the mean, an input of huge norm cannot move it
    /// outside the honest range while honest inputs are the majority by count.
    /// `‖·‖` is the Euclidean norm over the whole part. The loop stops early
    /// once an iteration leaves `v` unchanged (in `f32`): later ones would too.
    ///
    /// # Bound
    ///
    /// Let `W` be the total weight, `δ` the Byzantine share of it, `μ` the
    /// honest inputs' weighted mean, `ρ = max_{i∈H} ‖x_i − μ‖` the honest spread,
    /// `h` the number of honest inputs and `r_t = ‖v_t − μ‖` after `t`
    /// iterations (exact arithmetic). If
    ///
    /// ```text
    /// (C)   τ · (1 − 2δ)  >  2ρ · (1 − δ)        (so δ < 1/2 and τ > 2ρ)
    /// ```
    ///
    /// then, whatever the Byzantine inputs are:
    ///
    /// 1. near: if `r_t <= τ − ρ` then `r_{t+1} <= δ · (r_t + τ) <= τ − ρ`;
    /// 2. far: if `r_t > τ − ρ` then `r_{t+1} < r_t − g`, `g = τ(1 − 2δ) − 2ρ(1 − δ) > 0`;
    /// 3. start: if fewer than half of the inputs with positive weight are
    ///    Byzantine (by count), `r_0 <= √h · ρ`.
    ///
    /// Hence, with `K = ⌈max(0, r_0 − (τ − ρ)) / g⌉` far iterations (`K = 0`
    /// when `√h · ρ <= τ − ρ` and 3 applies), after `T >= K` iterations
    ///
    /// ```text
    /// ‖v_T − μ‖  <=  δτ / (1 − δ)  +  δ^(T−K) · (τ − ρ),
    /// ```
    ///
    /// and `‖v_T − μ‖ <= max(r_0, τ − ρ)` for every `T`. The `δτ/(1 − δ)` term
    /// is tight: with identical honest inputs (`ρ = 0`) and the attackers far
    /// away in one direction `u`, `v` converges to `μ + δτ/(1 − δ) · u`.
    ///
    /// Proof. Write `e = v − μ`, `r = ‖e‖`, `d_i = x_i − μ`, `p_i = w_i / W`,
    /// `a_i = min(1, τ / ‖x_i − v‖)`; then `v⁺ − μ = e + Σ_i p_i a_i (d_i − e)`.
    /// Each Byzantine term has norm `<= p_i τ`, together `<= δτ`.
    /// 1. If `r <= τ − ρ`, every honest `‖d_i − e‖ <= ρ + r <= τ`, so `a_i = 1`;
    ///    `Σ_H p_i d_i = 0` because `μ` is the honest weighted mean, so the honest
    ///    terms sum to `−(1 − δ) e` and `r⁺ <= δr + δτ`. (C) gives
    ///    `τ(1 − 2δ) > ρ(1 − δ)`, i.e. `δ(2τ − ρ) < τ − ρ`, so the region is
    ///    kept. With `E = δτ/(1 − δ)`, `r_{t+1} − E <= δ (r_t − E)`, which unrolls
    ///    to the bound from `r_K <= τ − ρ`.
    /// 2. If `r > τ − ρ` (`>= ρ` as `τ > 2ρ`), let `A = Σ_H p_i a_i <= 1 − δ`. The
    ///    honest part of `v⁺ − μ` is `(1 − A) e + Σ_H p_i a_i d_i`, of norm
    ///    `<= (1 − A) r + Aρ = r − A(r − ρ)`. As `‖d_i − e‖ <= r + ρ` and
    ///    `r + ρ > τ`, `a_i >= τ/(r + ρ)`, so `A >= (1 − δ)τ/(r + ρ)` and
    ///    `r⁺ <= r − (1 − δ)τ(r − ρ)/(r + ρ) + δτ`. `(r − ρ)/(r + ρ)` grows with `r`
    ///    and exceeds `(τ − 2ρ)/τ` for `r > τ − ρ`, so `r⁺ < r − g`.
    /// 3. With fewer than `n/2` Byzantine values among `n`, the median at each
    ///    coordinate lies in the honest range there (the counting of
    ///    [`Aggregation::TrimmedMean`]'s proof, with both middle values for an
    ///    even `n`), as does `μ_j`, so `|v_0j − μ_j| <= max_H |d_ij|` and
    ///    `r_0² <= Σ_j Σ_H d_ij² <= hρ²`.
    ///
    /// The iterations need the attackers' *weight* share below one half, the
    /// start needs them to be a minority by *count*: cap claimed weights (the
    /// group's weight caps) so that the two agree. A majority by count, even of
    /// negligible weight, can put the start anywhere, and `K` grows with `r_0`.
    /// Between iterations `v` is rounded to `f32`; that rounding (relative
    /// `2⁻²⁴` per coordinate per iteration) is outside the bound.
    ///
    /// # Choosing `tau` and `iterations`
    ///
    /// `τ` is a length over the whole part, so it scales with `√len` times the
    /// per-coordinate honest spread; estimate `ρ` from earlier rounds (honest
    /// inputs' distances to the aggregate). For the largest Byzantine weight
    /// share `δ` to tolerate, (C) asks for `τ > 2ρ(1 − δ)/(1 − 2δ)`:
    /// `δ = 1/5` → `τ > 2.67ρ`, `1/4` → `3ρ`, `1/3` → `4ρ`, `2/5` → `6ρ`. Above
    /// that, a larger `τ` lets attackers move the result further (the bias term
    /// `δτ/(1 − δ)` is linear in `τ`; `τ = ∞` is the weighted mean). A `τ` below
    /// the condition loses the guarantee, and is slow even without attackers:
    /// one iteration moves `v` by at most `τ` (`‖Σ_i p_i a_i (x_i − v)‖ <= τ`), so
    /// covering a distance `D` takes at least `D/τ` iterations, and the fixed
    /// point is a clipped M-estimator between median and mean, not the mean.
    /// Near `μ` the excess error shrinks by `δ` per iteration, so 10 iterations
    /// (the recommended count) leave `δ^10` of it (`1e-4` at `δ = 2/5`) once
    /// `K = 0`. With honest inputs only and `τ` above every input's distance to
    /// the median start and to the mean, the first iteration lands on the mean
    /// and the loop normally stops after the second.
    CenteredClip {
        /// Clipping radius `τ`, a Euclidean length over the part; finite, > 0.
        tau: f32,
        /// Number of iterations, `1..=1000`.
        iterations: usize,
    },
}

/// Why aggregation refused its inputs.
#[derive(Debug, Clone, PartialEq)]
pub enum RobustError {
    /// More than `2 · trim` inputs with positive weight are needed.
    TooFewInputs {
        /// Inputs with positive weight.
        inputs: usize,
        /// The trim asked for.
        trim: usize,
    },
    /// `weights` and `inputs` differ in length.
    WeightCount {
        /// Number of inputs.
        inputs: usize,
        /// Number of weights.
        weights: usize,
    },
    /// Input `index` does not have the output's length.
    LengthMismatch {
        /// Index into `inputs`.
        index: usize,
        /// The output's length.
        expected: usize,
        /// The input's length.
        got: usize,
    },
    /// Weight `index` is negative, NaN or infinite.
    BadWeight {
        /// Index into `weights`.
        index: usize,
        /// The weight given.
        weight: f32,
    },
    /// Input `index` has positive weight and a NaN or infinite value.
    NonFiniteInput {
        /// Index into `inputs`.
        index: usize,
    },
    /// An aggregation parameter is out of range.
    BadParameter {
        /// Which parameter and its allowed range.
        what: &'static str,
    },
    /// The result did not fit in `f32` (finite inputs keep every result inside
    /// their range, so only rounding at `±f32::MAX` can get here).
    NonFinite,
}

impl fmt::Display for RobustError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooFewInputs { inputs, trim } => write!(
                f,
                "trimmed mean with trim {trim} needs more than {} inputs with positive weight, got {inputs}",
                trim.saturating_mul(2)
            ),
            Self::WeightCount { inputs, weights } => {
                write!(f, "{weights} weights for {inputs} inputs")
            }
            Self::LengthMismatch {
                index,
                expected,
                got,
            } => write!(f, "input {index} has {got} values, expected {expected}"),
            Self::BadWeight { index, weight } => {
                write!(
                    f,
                    "weight {index} is {weight}; weights must be finite and >= 0"
                )
            }
            Self::NonFiniteInput { index } => {
                write!(f, "input {index} has a NaN or infinite value")
            }
            Self::BadParameter { what } => write!(f, "bad aggregation parameter: {what}"),
            Self::NonFinite => f.write_str("aggregate does not fit in f32"),
        }
    }
}

impl std::error::Error for RobustError {}

impl Aggregation {
    /// Check parameters (tau finite and > 0, iterations in 1..=1000, etc.).
    ///
    /// # Errors
    /// [`RobustError::BadParameter`] naming the parameter.
    pub fn validate(&self) -> Result<(), RobustError> {
        match *self {
            Self::WeightedMean | Self::TrimmedMean { .. } => Ok(()),
            Self::CenteredClip { tau, iterations } => {
                if !(tau.is_finite() && tau > 0.0) {
                    Err(RobustError::BadParameter {
                        what: "tau must be finite and > 0",
                    })
                } else if !(1..=1000).contains(&iterations) {
                    Err(RobustError::BadParameter {
                        what: "iterations must be in 1..=1000",
                    })
                } else {
                    Ok(())
                }
            }
        }
    }

    /// Whether this aggregation needs every sender's part at once (everything
    /// but WeightedMean).
    pub fn needs_all_inputs(&self) -> bool {
        !matches!(self, Self::WeightedMean)
    }
}

/// Combine `inputs[i]` (each exactly `out.len()` values, all finite) with
/// non-negative finite `weights[i]` into `out`.
///
/// Inputs with weight 0 are ignored (their lengths are still checked). If the
/// total weight is 0, returns `Ok(false)` and leaves `out` untouched; `Ok(true)`
/// when `out` holds the result. `scratch` is reusable working memory (grown as
/// needed) so repeated calls allocate nothing (with up to 64 inputs of positive
/// weight). Sums are taken in `f64`, so values and weights up to `f32::MAX` do
/// not overflow.
///
/// # Errors
/// Parameters, lengths and weights are checked first, leaving `out` untouched:
/// [`RobustError::BadParameter`], [`RobustError::WeightCount`],
/// [`RobustError::LengthMismatch`], [`RobustError::BadWeight`],
/// [`RobustError::TooFewInputs`] (trimmed mean with at most `2 · trim` inputs of
/// positive weight). Found while aggregating, with `out` then holding
/// unspecified values: [`RobustError::NonFiniteInput`] (the first such input)
/// and [`RobustError::NonFinite`].
pub fn aggregate(
    agg: &Aggregation,
    inputs: &[&[f32]],
    weights: &[f32],
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) -> Result<bool, RobustError> {
    agg.validate()?;
    if weights.len() != inputs.len() {
        return Err(RobustError::WeightCount {
            inputs: inputs.len(),
            weights: weights.len(),
        });
    }
    if let Some((index, x)) = inputs
        .iter()
        .enumerate()
        .find(|(_, x)| x.len() != out.len())
    {
        return Err(RobustError::LengthMismatch {
            index,
            expected: out.len(),
            got: x.len(),
        });
    }
    let mut total = 0.0f64;
    let mut active = 0usize;
    for (index, &weight) in weights.iter().enumerate() {
        if !(weight.is_finite() && weight >= 0.0) {
            return Err(RobustError::BadWeight { index, weight });
        }
        if weight > 0.0 {
            total += f64::from(weight);
            active += 1;
        }
    }
    if active == 0 {
        return Ok(false);
    }
    match *agg {
        Aggregation::TrimmedMean { trim } if trim.checked_mul(2).is_none_or(|t| active <= t) => {
            return Err(RobustError::TooFewInputs {
                inputs: active,
                trim,
            });
        }
        _ => {}
    }

    // The inputs with positive weight and their shares of the total weight.
    let mut stack_xs: [&[f32]; STACK_INPUTS] = [&[]; STACK_INPUTS];
    let mut stack_ps = [0.0f64; STACK_INPUTS];
    let (mut heap_xs, mut heap_ps) = (Vec::new(), Vec::new());
    let (xs, ps): (&mut [&[f32]], &mut [f64]) = if active <= STACK_INPUTS {
        (&mut stack_xs[..active], &mut stack_ps[..active])
    } else {
        heap_xs.resize(active, &[][..]);
        heap_ps.resize(active, 0.0);
        (&mut heap_xs, &mut heap_ps)
    };
    let positive = inputs.iter().zip(weights).filter(|(_, w)| **w > 0.0);
    for ((x, p), (input, &w)) in xs.iter_mut().zip(ps.iter_mut()).zip(positive) {
        *x = input;
        *p = f64::from(w) / total;
    }

    let finite = match *agg {
        Aggregation::WeightedMean | Aggregation::TrimmedMean { trim: 0 } => {
            weighted_mean(xs, ps, out)
        }
        Aggregation::TrimmedMean { trim } => trimmed_mean(xs, ps, trim, out, scratch),
        Aggregation::CenteredClip { tau, iterations } => {
            centered_clip(xs, ps, f64::from(tau), iterations, out, scratch)
        }
    };
    if finite {
        return Ok(true);
    }
    // The error path only: name the input to blame, if any.
    let bad = inputs
        .iter()
        .zip(weights)
        .position(|(x, &w)| w > 0.0 && !x.iter().all(|v| v.is_finite()));
    Err(bad.map_or(RobustError::NonFinite, |index| {
        RobustError::NonFiniteInput { index }
    }))
}

/// The blocks of `len` coordinates: (start, length).
fn blocks(len: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..len)
        .step_by(BLOCK)
        .map(move |start| (start, BLOCK.min(len - start)))
}

/// `out = Σ p_i x_i`; false if a result is not finite.
fn weighted_mean(xs: &[&[f32]], ps: &[f64], out: &mut [f32]) -> bool {
    let mut acc = [0.0f64; BLOCK];
    let mut finite = true;
    for (start, len) in blocks(out.len()) {
        let acc = &mut acc[..len];
        acc.fill(0.0);
        for (x, &p) in xs.iter().zip(ps) {
            for (a, &v) in acc.iter_mut().zip(&x[start..start + len]) {
                *a += p * f64::from(v);
            }
        }
        for (o, &a) in out[start..start + len].iter_mut().zip(acc.iter()) {
            *o = a as f32;
            finite &= o.is_finite();
        }
    }
    finite
}

/// Lane-wise insertion of `carry` into the ascending lists `rows` (each `len`
/// long, `BLOCK` apart): afterwards row `r` holds, per lane, the `r`-th smallest
/// value seen so far, for as many rows as there are. Branch-free and
/// vectorizable. With `DESCENDING` the rows hold the largest values instead.
fn insert_rows<const DESCENDING: bool>(rows: &mut [f32], carry: &mut [f32]) {
    let len = carry.len();
    for row in rows.chunks_exact_mut(BLOCK) {
        for (r, c) in row[..len].iter_mut().zip(carry.iter_mut()) {
            let (a, b) = (*r, *c);
            let keep_b = if DESCENDING { b > a } else { b < a };
            *r = if keep_b { b } else { a };
            *c = if keep_b { a } else { b };
        }
    }
}

/// Whether every value of `x` is finite.
fn all_finite(x: &[f32]) -> bool {
    x.iter().fold(true, |ok, v| ok & v.is_finite())
}

/// `scratch` as `rows` rows of `BLOCK` values.
fn rows_in(scratch: &mut Vec<f32>, rows: usize) -> &mut [f32] {
    let need = rows * BLOCK;
    if scratch.len() < need {
        scratch.resize(need, 0.0);
    }
    &mut scratch[..need]
}

/// Trimmed mean for `0 < trim < xs.len() / 2`; false on a non-finite input or
/// result.
fn trimmed_mean(
    xs: &[&[f32]],
    ps: &[f64],
    trim: usize,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) -> bool {
    let rows = trim + 1;
    let (low, high) = rows_in(scratch, 2 * rows).split_at_mut(rows * BLOCK);
    let mut carry = [0.0f32; BLOCK];
    let (mut sum, mut weight, mut count) = ([0.0f64; BLOCK], [0.0f64; BLOCK], [0.0f32; BLOCK]);
    // Counts as f32: exact far beyond any group size.
    let kept = (xs.len() - 2 * trim) as f32;
    let mut finite = true;
    for (start, len) in blocks(out.len()) {
        // Pass 1: per lane, the cuts lo = (trim)-th smallest and hi = (trim)-th
        // largest value (0-based).
        low.fill(f32::INFINITY);
        high.fill(f32::NEG_INFINITY);
        for x in xs {
            let x = &x[start..start + len];
            finite &= all_finite(x);
            carry[..len].copy_from_slice(x);
            insert_rows::<false>(low, &mut carry[..len]);
            carry[..len].copy_from_slice(x);
            insert_rows::<true>(high, &mut carry[..len]);
        }
        if !finite {
            return false;
        }
        let lo = &low[trim * BLOCK..trim * BLOCK + len];
        let hi = &high[trim * BLOCK..trim * BLOCK + len];

        // Pass 2: weighted sum, weight and count of the values in [lo, hi].
        let (sum, weight, count) = (&mut sum[..len], &mut weight[..len], &mut count[..len]);
        sum.fill(0.0);
        weight.fill(0.0);
        count.fill(0.0);
        for (x, &p) in xs.iter().zip(ps) {
            let x = &x[start..start + len];
            for j in 0..len {
                let (v, l, h) = (x[j], lo[j], hi[j]);
                // `&`, not `&&`: no branch, so the loop vectorizes.
                let inside = (l <= v) & (v <= h);
                let w = if inside { p } else { 0.0 };
                sum[j] += w * f64::from(v);
                weight[j] += w;
                count[j] += if inside { 1.0 } else { 0.0 };
            }
        }
        for j in 0..len {
            let (l, h) = (lo[j], hi[j]);
            let o = if l == h {
                // Every kept value equals the cut.
                l
            } else if count[j] == kept {
                // No surplus ties at the cuts: exactly the kept values are in
                // [lo, hi], each with its whole weight.
                (sum[j] / weight[j]) as f32
            } else {
                tied_cut_mean(xs, ps, start + j, trim, l, h)
            };
            finite &= o.is_finite();
            out[start + j] = o;
        }
    }
    finite
}

/// The trimmed mean at coordinate `j` when values tie at a cut `l < h`: of the
/// `e` values equal to a cut, the `k` that make up the kept count each enter
/// with `k / e` of their weight.
fn tied_cut_mean(xs: &[&[f32]], ps: &[f64], j: usize, trim: usize, l: f32, h: f32) -> f32 {
    let (mut below, mut at_lo, mut above, mut at_hi) = (0usize, 0usize, 0usize, 0usize);
    let (mut w_lo, mut w_hi, mut w_mid, mut s_mid) = (0.0f64, 0.0f64, 0.0f64, 0.0f64);
    for (x, &p) in xs.iter().zip(ps) {
        let v = x[j];
        if v < l {
            below += 1;
        } else if v == l {
            at_lo += 1;
            w_lo += p;
        } else if v > h {
            above += 1;
        } else if v == h {
            at_hi += 1;
            w_hi += p;
        } else {
            w_mid += p;
            s_mid += p * f64::from(v);
        }
    }
    // `l` is the trim-th smallest value, so below <= trim < below + at_lo (and
    // symmetrically at the top): both shares are in (0, 1].
    let f_lo = (below + at_lo - trim) as f64 / at_lo as f64;
    let f_hi = (above + at_hi - trim) as f64 / at_hi as f64;
    let num = s_mid + f_lo * w_lo * f64::from(l) + f_hi * w_hi * f64::from(h);
    let den = w_mid + f_lo * w_lo + f_hi * w_hi;
    (num / den) as f32
}

/// Adds `Σ_j (x_j − v_j)²` for each input to `d2` (`v` already widened).
fn add_sq_distances(xs: &[&[f32]], v: &[f64], start: usize, d2: &mut [f64]) {
    for (x, d) in xs.iter().zip(d2.iter_mut()) {
        // Four independent sums so the loop vectorizes without reassociation.
        let mut s = [0.0f64; 4];
        let x = &x[start..start + v.len()];
        let (xc, vc) = (x.chunks_exact(4), v.chunks_exact(4));
        let (xr, vr) = (xc.remainder(), vc.remainder());
        for (xq, vq) in xc.zip(vc) {
            for k in 0..4 {
                let e = f64::from(xq[k]) - vq[k];
                s[k] += e * e;
            }
        }
        for (&a, &b) in xr.iter().zip(vr) {
            let e = f64::from(a) - b;
            s[0] += e * e;
        }
        *d += (s[0] + s[1]) + (s[2] + s[3]);
    }
}

/// CenteredClip from the coordinate-wise median; false on a non-finite input or
/// result.
fn centered_clip(
    xs: &[&[f32]],
    ps: &[f64],
    tau: f64,
    iterations: usize,
    out: &mut [f32],
    scratch: &mut Vec<f32>,
) -> bool {
    let m = xs.len();
    let mut stack = [[0.0f64; STACK_INPUTS]; 2];
    let mut heap = Vec::new();
    let (d2, scale): (&mut [f64], &mut [f64]) = if m <= STACK_INPUTS {
        let [a, b] = &mut stack;
        (&mut a[..m], &mut b[..m])
    } else {
        heap.resize(2 * m, 0.0);
        heap.split_at_mut(m)
    };

    // Start: per lane, the m/2 + 1 smallest values; the median is row
    // (m − 1)/2 for odd m, the mean of rows m/2 − 1 and m/2 for even m.
    let low = rows_in(scratch, m / 2 + 1);
    let mut carry = [0.0f32; BLOCK];
    // The current block of v, widened once for the distance passes.
    let mut wide = [0.0f64; BLOCK];
    let (r0, r1) = ((m - 1) / 2, m / 2);
    for (start, len) in blocks(out.len()) {
        low.fill(f32::INFINITY);
        for x in xs {
            let x = &x[start..start + len];
            if !all_finite(x) {
                return false;
            }
            carry[..len].copy_from_slice(x);
            insert_rows::<false>(low, &mut carry[..len]);
        }
        let wide = &mut wide[..len];
        for ((j, o), w) in out[start..start + len]
            .iter_mut()
            .enumerate()
            .zip(wide.iter_mut())
        {
            let (a, b) = (low[r0 * BLOCK + j], low[r1 * BLOCK + j]);
            // In f64: a + b may pass f32::MAX.
            *o = (0.5 * (f64::from(a) + f64::from(b))) as f32;
            *w = f64::from(*o);
        }
        add_sq_distances(xs, wide, start, d2);
    }

    let mut acc = [0.0f64; BLOCK];
    for it in 0..iterations {
        for (s, (&p, &d)) in scale.iter_mut().zip(ps.iter().zip(d2.iter())) {
            let dist = d.sqrt();
            *s = if dist > tau { p * (tau / dist) } else { p };
        }
        let total: f64 = scale.iter().sum();
        d2.fill(0.0);
        let last = it + 1 == iterations;
        let mut moved = false;
        let mut finite = true;
        for (start, len) in blocks(out.len()) {
            // v + Σ s_i (x_i − v), as Σ s_i x_i − (Σ s_i) v: one multiply-add per
            // value; in f64 the cancellation costs nothing that f32 v keeps.
            let acc = &mut acc[..len];
            acc.fill(0.0);
            for (x, &s) in xs.iter().zip(scale.iter()) {
                for (a, &xv) in acc.iter_mut().zip(&x[start..start + len]) {
                    *a += s * f64::from(xv);
                }
            }
            let wide = &mut wide[..len];
            let v = &mut out[start..start + len];
            for ((o, &a), w) in v.iter_mut().zip(acc.iter()).zip(wide.iter_mut()) {
                let old = f64::from(*o);
                let new = (old + (a - total * old)) as f32;
                moved |= new != *o;
                finite &= new.is_finite();
                *o = new;
                *w = f64::from(new);
            }
            if !last {
                add_sq_distances(xs, wide, start, d2);
            }
        }
        if !finite {
            return false;
        }
        if !moved {
            break;
        }
    }
    true
}
#[cfg(test)]
mod tests;
