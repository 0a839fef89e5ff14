//! Checks of the bounds stated in [`super`], numerically.
use super::*;

/// xorshift64*: deterministic test data without a rand dependency.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in [-1, 1).
    fn unit(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 23) as f32) - 1.0
    }
}

fn run(agg: Aggregation, inputs: &[Vec<f32>], weights: &[f32]) -> Result<Vec<f32>, RobustError> {
    let refs: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
    let mut out = vec![f32::NAN; inputs.first().map_or(0, Vec::len)];
    let mut scratch = Vec::new();
    let done = aggregate(&agg, &refs, weights, &mut out, &mut scratch)?;
    assert!(done, "positive weight gives a result");
    Ok(out)
}

fn weighted_mean_f64(inputs: &[Vec<f32>], weights: &[f32]) -> Vec<f64> {
    let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
    (0..inputs[0].len())
        .map(|j| {
            inputs
                .iter()
                .zip(weights)
                .map(|(x, &w)| f64::from(w) * f64::from(x[j]))
                .sum::<f64>()
                / total
        })
        .collect()
}

fn dist(a: &[f32], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (f64::from(x) - y).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// Honest inputs: a common vector plus noise of 10% of its scale.
fn honest(rng: &mut Rng, count: usize, len: usize) -> Vec<Vec<f32>> {
    let base: Vec<f32> = (0..len).map(|_| rng.unit()).collect();
    (0..count)
        .map(|_| base.iter().map(|&b| b + 0.1 * rng.unit()).collect())
        .collect()
}

#[derive(Debug, Clone, Copy)]
enum Attack {
    Scaled,
    SignFlipped,
    HugeNorm,
}

fn attack(kind: Attack, victim: &[f32]) -> Vec<f32> {
    victim
        .iter()
        .map(|&v| match kind {
            Attack::Scaled => v * 1000.0,
            Attack::SignFlipped => -v,
            Attack::HugeNorm => 1e30,
        })
        .collect()
}

#[test]
fn weighted_mean_matches_the_plain_weighted_mean() {
    let mut rng = Rng(7);
    let inputs = honest(&mut rng, 4, 300);
    let weights = [1.0, 2.5, 0.0, 4.0];
    let out = run(Aggregation::WeightedMean, &inputs, &weights).unwrap();
    let want = weighted_mean_f64(&inputs, &weights);
    for (o, w) in out.iter().zip(&want) {
        assert!((f64::from(*o) - w).abs() <= 1e-6, "{o} vs {w}");
    }
    // The zero-weight input is ignored entirely, even a hostile one.
    let mut hostile = inputs.clone();
    hostile[2] = vec![1e30; 300];
    assert_eq!(
        run(Aggregation::WeightedMean, &hostile, &weights).unwrap(),
        out
    );
    // So is TrimmedMean { trim: 0 }.
    let trimmed0 = run(Aggregation::TrimmedMean { trim: 0 }, &inputs, &weights).unwrap();
    assert_eq!(trimmed0, out);
}

#[test]
fn zero_total_weight_leaves_out_untouched() {
    let inputs: Vec<&[f32]> = vec![&[1.0, 2.0], &[3.0, 4.0]];
    for agg in [
        Aggregation::WeightedMean,
        Aggregation::TrimmedMean { trim: 3 },
        Aggregation::CenteredClip {
            tau: 1.0,
            iterations: 5,
        },
    ] {
        let mut out = [9.0, 9.0];
        let done = aggregate(&agg, &inputs, &[0.0, 0.0], &mut out, &mut Vec::new());
        assert_eq!(done, Ok(false), "{agg:?}");
        assert_eq!(out, [9.0, 9.0]);
        assert_eq!(
            aggregate(&agg, &[], &[], &mut [], &mut Vec::new()),
            Ok(false)
        );
    }
}

/// 5 inputs, `byz` of them replaced by an attack on the first honest one;
/// checks the documented bounds for TrimmedMean { trim: 2 } and CenteredClip
/// and that the plain mean fails them.
fn attacked(byz: usize, kind: Attack, weights: &[f32; 5], seed: u64) {
    let len = 1000;
    let mut rng = Rng(seed);
    let mut inputs = honest(&mut rng, 5, len);
    for i in 0..byz {
        inputs[4 - i] = attack(kind, &inputs[0]);
    }
    let h = 5 - byz;
    let (good, good_w) = (&inputs[..h], &weights[..h]);
    let mu = weighted_mean_f64(good, good_w);
    let rho = good.iter().map(|x| dist(x, &mu)).fold(0.0, f64::max);
    let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
    let delta = weights[h..].iter().map(|&w| f64::from(w)).sum::<f64>() / total;

    // Plain mean: far off (so the bounds below are not vacuous).
    let mean = run(Aggregation::WeightedMean, &inputs, weights).unwrap();
    let mean_dev = dist(&mean, &mu);

    // TrimmedMean: every coordinate within the honest range, and within the
    // largest honest deviation from the honest mean.
    let tm = run(Aggregation::TrimmedMean { trim: 2 }, &inputs, weights).unwrap();
    let mut mean_outside = 0;
    for j in 0..len {
        let (lo, hi) = good.iter().fold((f32::MAX, f32::MIN), |(lo, hi), x| {
            (lo.min(x[j]), hi.max(x[j]))
        });
        assert!(
            lo <= tm[j] && tm[j] <= hi,
            "coordinate {j}: {} not in [{lo}, {hi}]",
            tm[j]
        );
        let spread = good
            .iter()
            .map(|x| (f64::from(x[j]) - mu[j]).abs())
            .fold(0.0, f64::max);
        assert!((f64::from(tm[j]) - mu[j]).abs() <= spread * (1.0 + 1e-6) + 1e-7);
        mean_outside += usize::from(!(lo <= mean[j] && mean[j] <= hi));
    }
    let tm_dev = dist(&tm, &mu);
    assert!(tm_dev <= (h as f64).sqrt() * rho * (1.0 + 1e-6));
    assert!(mean_outside > len / 2, "the mean leaves the honest range");

    // CenteredClip with tau 1.5x the least (C) allows.
    let tau = 1.5 * 2.0 * rho * (1.0 - delta) / (1.0 - 2.0 * delta);
    let g = tau * (1.0 - 2.0 * delta) - 2.0 * rho * (1.0 - delta);
    let k = ((((h as f64).sqrt() * rho - (tau - rho)) / g).max(0.0)).ceil() as usize;
    let iterations = k + 10;
    let agg = Aggregation::CenteredClip {
        tau: tau as f32,
        iterations,
    };
    let cc = run(agg, &inputs, weights).unwrap();
    let cc_dev = dist(&cc, &mu);
    let bound = delta * tau / (1.0 - delta) + delta.powi(10) * (tau - rho);
    // Slack for v's f32 rounding: a few ulps of ‖v‖ per iteration.
    let slack = 1e-5 * (1.0 + mu.iter().map(|m| m * m).sum::<f64>().sqrt());
    println!(
        "{byz} x {kind:?}, weights {weights:?}: rho {rho:.3}, delta {delta:.3}; \
         ‖result − honest mean‖: mean {mean_dev:.3e}, trimmed {tm_dev:.4} \
         (bound √h·ρ = {:.4}), centered clip {cc_dev:.4} (tau {tau:.3}, K {k}, \
         bound {bound:.4})",
        (h as f64).sqrt() * rho,
    );
    assert!(
        cc_dev <= bound + slack,
        "centered clip {cc_dev} > bound {bound}"
    );
    // The same checks fail for the plain mean (the per-coordinate one above).
    assert!(
        mean_dev > bound && mean_dev > (h as f64).sqrt() * rho,
        "the mean breaks both norm bounds"
    );
}

#[test]
fn robust_rules_keep_their_bounds_under_attack() {
    let equal = [1.0; 5];
    for (seed, kind) in [Attack::Scaled, Attack::SignFlipped, Attack::HugeNorm]
        .into_iter()
        .enumerate()
    {
        for byz in 1..=2 {
            attacked(byz, kind, &equal, seed as u64 + 1);
        }
    }
}

#[test]
fn bounds_hold_when_attackers_claim_more_weight() {
    // One attacker with twice an honest weight (δ = 1/3), and two with
    // unequal weights (δ = 0.3): TrimmedMean's bound ignores weights,
    // CenteredClip's holds for the weight share δ.
    attacked(1, Attack::Scaled, &[1.0, 1.0, 1.0, 1.0, 2.0], 11);
    attacked(2, Attack::SignFlipped, &[2.0, 1.0, 4.0, 2.0, 1.0], 12);
}

#[test]
fn centered_clip_steps_follow_the_near_and_far_lemmas() {
    // Eight light attackers (δ < 1%) beside nine honest inputs pull the median
    // start to the honest extreme at each coordinate, beyond τ − ρ for a τ
    // just above what (C) asks: the first steps are far steps, then near ones.
    let (h, len) = (9, 2000);
    let mut rng = Rng(21);
    let mut inputs = honest(&mut rng, 17, len);
    let mut weights = vec![1.0f32; 17];
    for i in h..17 {
        inputs[i] = attack(Attack::Scaled, &inputs[0]);
        weights[i] = 0.01;
    }
    let mu = weighted_mean_f64(&inputs[..h], &weights[..h]);
    let rho = inputs[..h].iter().map(|x| dist(x, &mu)).fold(0.0, f64::max);
    let delta = 0.08 / (h as f64 + 0.08);
    let tau = 1.02 * 2.0 * rho * (1.0 - delta) / (1.0 - 2.0 * delta);
    let g = tau * (1.0 - 2.0 * delta) - 2.0 * rho * (1.0 - delta);
    let median: Vec<f32> = (0..len)
        .map(|j| {
            let mut c: Vec<f32> = inputs.iter().map(|x| x[j]).collect();
            c.sort_by(f32::total_cmp);
            c[8]
        })
        .collect();
    let mut r = vec![dist(&median, &mu)];
    assert!(r[0] <= (h as f64).sqrt() * rho, "start bound");
    let steps = 12;
    for t in 1..=steps {
        let agg = Aggregation::CenteredClip {
            tau: tau as f32,
            iterations: t,
        };
        r.push(dist(&run(agg, &inputs, &weights).unwrap(), &mu));
    }
    println!(
        "rho {rho:.3}, delta {delta:.4}, tau {tau:.3}, tau − rho {:.3}, g {g:.3}, r_t {r:.3?}",
        tau - rho
    );
    let slack = 1e-4;
    let mut far = 0;
    for w in r.windows(2) {
        if w[0] <= tau - rho {
            assert!(w[1] <= delta * (w[0] + tau) + slack, "near step {w:?}");
            assert!(w[1] <= tau - rho + slack, "near region kept {w:?}");
        } else {
            far += 1;
            assert!(w[1] < w[0] - g + slack, "far step {w:?}");
        }
    }
    assert!(far > 0, "the far lemma was exercised");
    let k = ((r[0] - (tau - rho)) / g).ceil() as usize;
    assert!(far <= k);
    let bound = delta * tau / (1.0 - delta) + delta.powi((steps - k) as i32) * (tau - rho);
    assert!(r[steps] <= bound + slack, "{} > {bound}", r[steps]);
}

#[test]
fn centered_clip_bias_term_is_tight() {
    // Identical honest inputs (ρ = 0), one attacker far along +x: v goes to
    // μ + δτ/(1 − δ) = μ + τ/4 along x, as the bound allows and no further.
    let honest = vec![1.0f32; 8];
    let mut far = honest.clone();
    far[0] = 1e6;
    let inputs = vec![honest.clone(), honest.clone(), honest.clone(), honest, far];
    let agg = Aggregation::CenteredClip {
        tau: 2.0,
        iterations: 30,
    };
    let v = run(agg, &inputs, &[1.0; 5]).unwrap();
    println!(
        "tight case: v[0] − μ[0] = {} (bound δτ/(1−δ) = 0.5)",
        v[0] - 1.0
    );
    assert!((v[0] - 1.5).abs() < 1e-5, "{v:?}");
    assert!(v[1..].iter().all(|&x| x == 1.0));
}

#[test]
fn centered_clip_start_ignores_a_huge_input_and_honest_inputs_give_the_mean() {
    let mut rng = Rng(3);
    let inputs = honest(&mut rng, 4, 64);
    let weights = [1.0, 2.0, 3.0, 4.0];
    let mu = weighted_mean_f64(&inputs, &weights);
    // tau above every honest distance to the median: one step reaches the mean.
    let agg = Aggregation::CenteredClip {
        tau: 100.0,
        iterations: 3,
    };
    let v = run(agg, &inputs, &weights).unwrap();
    assert!(dist(&v, &mu) < 1e-5);
    // With one iteration and a huge attacker, the median start keeps v near μ.
    let mut attacked = inputs.clone();
    attacked.push(vec![1e30; 64]);
    let agg = Aggregation::CenteredClip {
        tau: 1.0,
        iterations: 1,
    };
    let v = run(agg, &attacked, &[1.0; 5]).unwrap();
    let mu = weighted_mean_f64(&inputs, &[1.0; 4]);
    assert!(dist(&v, &mu) < 2.0, "{}", dist(&v, &mu));
}

#[test]
fn trimmed_mean_ties_and_weights() {
    // Classic trimmed mean with equal weights: [1, 2, 3, 4, 100] -> mean(2, 3, 4).
    let inputs: Vec<Vec<f32>> = [1.0, 100.0, 3.0, 2.0, 4.0]
        .iter()
        .map(|&v| vec![v])
        .collect();
    let out = run(Aggregation::TrimmedMean { trim: 1 }, &inputs, &[1.0; 5]).unwrap();
    assert_eq!(out, [3.0]);
    // Weighted: drop 1 and 100, mean of 3 (w 3), 2 (w 1), 4 (w 1) = 15/5.
    let out = run(
        Aggregation::TrimmedMean { trim: 1 },
        &inputs,
        &[1.0, 1.0, 3.0, 1.0, 1.0],
    )
    .unwrap();
    assert_eq!(out, [3.0]);
    // Ties at the cut share the kept count: [5 (w 1), 5 (w 3), 7, 9, 9]
    // drop one 5 and one 9: each 5 keeps half its weight, each 9 too.
    let inputs: Vec<Vec<f32>> = [5.0, 5.0, 7.0, 9.0, 9.0].iter().map(|&v| vec![v]).collect();
    let w = [1.0, 3.0, 2.0, 1.0, 1.0];
    let out = run(Aggregation::TrimmedMean { trim: 1 }, &inputs, &w).unwrap();
    let want = (0.5 * 5.0 + 1.5 * 5.0 + 2.0 * 7.0 + 0.5 * 9.0 + 0.5 * 9.0) / 5.0;
    assert!((out[0] - want).abs() < 1e-6, "{out:?} vs {want}");
    // The input order does not matter.
    let rev: Vec<Vec<f32>> = inputs.iter().rev().cloned().collect();
    let w_rev: Vec<f32> = w.iter().rev().copied().collect();
    assert_eq!(
        run(Aggregation::TrimmedMean { trim: 1 }, &rev, &w_rev).unwrap(),
        out
    );
    // All equal at the cuts: the cut value itself.
    let same: Vec<Vec<f32>> = vec![vec![2.0]; 3];
    assert_eq!(
        run(
            Aggregation::TrimmedMean { trim: 1 },
            &same,
            &[1.0, 5.0, 1.0]
        )
        .unwrap(),
        [2.0]
    );
}

#[test]
fn many_inputs_and_odd_lengths() {
    // More inputs than fit on the stack, a length that is not a block multiple.
    let mut rng = Rng(5);
    let n = STACK_INPUTS + 6;
    let mut inputs = honest(&mut rng, n, BLOCK * 2 + 3);
    for x in inputs.iter_mut().take(5) {
        x.fill(-1e20);
    }
    let weights = vec![1.0; n];
    let honest_part = &inputs[5..];
    let tm = run(Aggregation::TrimmedMean { trim: 5 }, &inputs, &weights).unwrap();
    let cc = run(
        Aggregation::CenteredClip {
            tau: 20.0,
            iterations: 10,
        },
        &inputs,
        &weights,
    )
    .unwrap();
    for j in 0..tm.len() {
        let (lo, hi) = honest_part
            .iter()
            .fold((f32::MAX, f32::MIN), |(lo, hi), x| {
                (lo.min(x[j]), hi.max(x[j]))
            });
        assert!(lo <= tm[j] && tm[j] <= hi);
    }
    let mu = weighted_mean_f64(honest_part, &weights[5..]);
    assert!(
        dist(&cc, &mu) < 20.0 * 5.0 / 65.0 + 1e-3,
        "{}",
        dist(&cc, &mu)
    );
}

#[test]
fn parameters_and_inputs_are_validated() {
    let bad = |what| Err(RobustError::BadParameter { what });
    let refused = |what| Err(RobustError::BadParameter { what });
    let clip = |tau, iterations| Aggregation::CenteredClip { tau, iterations };
    assert_eq!(clip(0.0, 10).validate(), bad("tau must be finite and > 0"));
    assert_eq!(clip(-1.0, 10).validate(), bad("tau must be finite and > 0"));
    assert_eq!(
        clip(f32::NAN, 10).validate(),
        bad("tau must be finite and > 0")
    );
    assert_eq!(
        clip(f32::INFINITY, 10).validate(),
        bad("tau must be finite and > 0")
    );
    assert_eq!(
        clip(1.0, 0).validate(),
        bad("iterations must be in 1..=1000")
    );
    assert_eq!(
        clip(1.0, 1001).validate(),
        bad("iterations must be in 1..=1000")
    );
    assert_eq!(clip(1.0, 1000).validate(), Ok(()));
    assert!(!Aggregation::WeightedMean.needs_all_inputs());
    assert!(Aggregation::TrimmedMean { trim: 1 }.needs_all_inputs());
    assert!(clip(1.0, 1).needs_all_inputs());
    assert_eq!(Aggregation::default(), Aggregation::WeightedMean);

    let a: &[f32] = &[1.0, 2.0];
    let mut out = [7.0f32; 2];
    let mut s = Vec::new();
    let mut call = |agg: Aggregation, inputs: &[&[f32]], weights: &[f32]| {
        let r = aggregate(&agg, inputs, weights, &mut out, &mut s);
        assert_eq!(out, [7.0; 2], "out untouched on {r:?}");
        r
    };
    assert_eq!(
        call(clip(0.0, 1), &[a], &[1.0]),
        refused("tau must be finite and > 0")
    );
    let tm = |trim| Aggregation::TrimmedMean { trim };
    assert_eq!(
        call(tm(1), &[a, a], &[1.0, 1.0]),
        Err(RobustError::TooFewInputs { inputs: 2, trim: 1 })
    );
    // Zero-weight inputs do not count toward the trim.
    assert_eq!(
        call(tm(1), &[a, a, a], &[1.0, 0.0, 1.0]),
        Err(RobustError::TooFewInputs { inputs: 2, trim: 1 })
    );
    assert_eq!(
        call(tm(usize::MAX), &[a], &[1.0]),
        Err(RobustError::TooFewInputs {
            inputs: 1,
            trim: usize::MAX
        })
    );
    assert_eq!(
        call(Aggregation::WeightedMean, &[a, &[1.0]], &[1.0, 0.0]),
        Err(RobustError::LengthMismatch {
            index: 1,
            expected: 2,
            got: 1
        })
    );
    assert_eq!(
        call(Aggregation::WeightedMean, &[a], &[1.0, 1.0]),
        Err(RobustError::WeightCount {
            inputs: 1,
            weights: 2
        })
    );
    assert_eq!(
        call(Aggregation::WeightedMean, &[a, a], &[1.0, -1.0]),
        Err(RobustError::BadWeight {
            index: 1,
            weight: -1.0
        })
    );
    assert!(matches!(
        call(tm(0), &[a], &[f32::NAN]),
        Err(RobustError::BadWeight { index: 0, .. })
    ));
    assert!(matches!(
        call(clip(1.0, 1), &[a], &[f32::INFINITY]),
        Err(RobustError::BadWeight { index: 0, .. })
    ));
    let err = RobustError::TooFewInputs { inputs: 2, trim: 1 };
    assert!(err.to_string().contains("more than 2"));
}

#[test]
fn non_finite_inputs_are_named() {
    let good: &[f32] = &[1.0, 2.0];
    let nan: &[f32] = &[1.0, f32::NAN];
    let inf: &[f32] = &[f32::NEG_INFINITY, 2.0];
    for agg in [
        Aggregation::WeightedMean,
        Aggregation::TrimmedMean { trim: 1 },
        Aggregation::CenteredClip {
            tau: 1.0,
            iterations: 3,
        },
    ] {
        let mut out = [0.0; 2];
        let r = aggregate(
            &agg,
            &[good, good, nan],
            &[1.0; 3],
            &mut out,
            &mut Vec::new(),
        );
        assert_eq!(r, Err(RobustError::NonFiniteInput { index: 2 }), "{agg:?}");
        let r = aggregate(
            &agg,
            &[good, inf, good],
            &[1.0; 3],
            &mut out,
            &mut Vec::new(),
        );
        assert_eq!(r, Err(RobustError::NonFiniteInput { index: 1 }), "{agg:?}");
        // With weight 0 it is ignored.
        let r = aggregate(
            &agg,
            &[good, good, good, nan],
            &[1.0, 1.0, 1.0, 0.0],
            &mut out,
            &mut Vec::new(),
        );
        assert_eq!(r, Ok(true), "{agg:?}");
        assert_eq!(out, [1.0, 2.0]);
    }
}

#[test]
fn values_near_f32_max_never_become_inf() {
    let max = f32::MAX;
    let cases: [(Vec<Vec<f32>>, [f32; 3]); 3] = [
        (vec![vec![max, -max]; 3], [max; 3]),
        (
            vec![vec![max, max], vec![-max, max], vec![max, -max]],
            [max, 1.0, max],
        ),
        (
            vec![vec![max * 0.9, max], vec![max, max * 0.99], vec![max, max]],
            [1e30, max, 1e-30],
        ),
    ];
    for (inputs, weights) in &cases {
        for agg in [
            Aggregation::WeightedMean,
            Aggregation::TrimmedMean { trim: 1 },
            Aggregation::CenteredClip {
                tau: max,
                iterations: 5,
            },
            Aggregation::CenteredClip {
                tau: 1.0,
                iterations: 5,
            },
        ] {
            match run(agg, inputs, weights) {
                Ok(out) => assert!(out.iter().all(|v| v.is_finite()), "{agg:?}: {out:?}"),
                Err(e) => assert_eq!(e, RobustError::NonFinite, "{agg:?}"),
            }
        }
    }
    // All at f32::MAX with weights at f32::MAX: exactly f32::MAX.
    let out = run(Aggregation::WeightedMean, &cases[0].0, &[max; 3]).unwrap();
    assert_eq!(out, [max, -max]);
}

#[test]
fn scratch_is_reused() {
    let mut rng = Rng(9);
    let inputs = honest(&mut rng, 5, 1000);
    let refs: Vec<&[f32]> = inputs.iter().map(Vec::as_slice).collect();
    let mut out = vec![0.0; 1000];
    let mut scratch = Vec::new();
    let agg = Aggregation::TrimmedMean { trim: 2 };
    aggregate(&agg, &refs, &[1.0; 5], &mut out, &mut scratch).unwrap();
    let (cap, ptr) = (scratch.capacity(), scratch.as_ptr());
    aggregate(&agg, &refs, &[1.0; 5], &mut out, &mut scratch).unwrap();
    let agg = Aggregation::CenteredClip {
        tau: 1.0,
        iterations: 4,
    };
    aggregate(&agg, &refs, &[1.0; 5], &mut out, &mut scratch).unwrap();
    assert_eq!((scratch.capacity(), scratch.as_ptr()), (cap, ptr));
}
