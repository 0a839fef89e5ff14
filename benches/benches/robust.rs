//! Robust aggregation costs: one reducer combining the parts of n = 5 senders
//! (`colony_averaging::round::aggregate`) for parts of 64 Ki and 1 Mi `f32` values.
//!
//! * `robust_aggregate/weighted_mean`: the baseline, what a reducer does today;
//! * `robust_aggregate/trimmed_mean_1`: `TrimmedMean { trim: 1 }`;
//! * `robust_aggregate/centered_clip_10`: `CenteredClip { tau: 3ρ, iterations: 10 }`,
//!   the recommended iteration count, with `τ` three times the honest spread `ρ`
//!   (what tolerating a Byzantine weight share of 1/5 asks for: `τ > 2.67ρ`).
//!
//! The inputs are the same for all three: four honest senders (a common vector plus
//! ±10% noise) and one attacker sending an honest vector flipped and scaled by −10,
//! so CenteredClip clips on every iteration and runs all ten (with honest inputs
//! only it reaches the mean and stops after two). Throughput counts input values
//! (`n · len`). Printed after each size, measured in the same run by timing the
//! three alternately: the median per-call time of each rule beside the weighted
//! mean's, and each rule's distance from the honest mean (the weighted mean's is
//! the attack's effect). Target: every rule keeps pace with its input arriving on
//! a 1 Gbit/s link (31.25 M values/s; the project's fastest lab links are
//! 800 Mbit/s), so aggregation does not become the round's bottleneck.

#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::{
    hint::black_box,
    time::{Duration, Instant},
};

use colony_averaging::round::{Aggregation, aggregate};
use colony_benches::{Summary, ms};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

const SENDERS: usize = 5;

/// Values per second that a 1 Gbit/s link delivers as `f32`.
const TARGET_VALUES_PER_SEC: f64 = 1e9 / 32.0;

/// xorshift64*: deterministic data without seeding a generator crate.
struct Rng(u64);

impl Rng {
    fn unit(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let bits = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40;
        bits as f32 / (1u64 << 23) as f32 - 1.0
    }
}

/// The senders' parts and the honest senders' mean.
fn inputs(len: usize) -> (Vec<Vec<f32>>, Vec<f64>) {
    let mut rng = Rng(0x5eed_0000 + len as u64);
    let base: Vec<f32> = (0..len).map(|_| rng.unit()).collect();
    let mut parts: Vec<Vec<f32>> = (0..SENDERS - 1)
        .map(|_| base.iter().map(|&b| b + 0.1 * rng.unit()).collect())
        .collect();
    let honest = parts.len() as f64;
    let mean = (0..len)
        .map(|j| parts.iter().map(|p| f64::from(p[j])).sum::<f64>() / honest)
        .collect();
    let attacker = parts[0].iter().map(|&v| -10.0 * v).collect();
    parts.push(attacker);
    (parts, mean)
}

fn distance(a: &[f32], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(&x, &y)| (f64::from(x) - y).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// Per-call times of each closure, `samples` samples each, taken in rotation so all
/// see the same machine load; each sample times about 20 ms worth of calls.
fn alternating(samples: usize, fs: &mut [Box<dyn FnMut() + '_>]) -> Vec<Summary> {
    let warm = fs
        .iter_mut()
        .map(|f| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(0.0, f64::max);
    let iters = ((20e-3 / warm.max(1e-9)).ceil() as usize).clamp(1, 10_000);
    let mut times = vec![Vec::with_capacity(samples); fs.len()];
    for _ in 0..samples {
        for (f, t) in fs.iter_mut().zip(&mut times) {
            let start = Instant::now();
            for _ in 0..iters {
                f();
            }
            t.push(start.elapsed().as_secs_f64() / iters as f64);
        }
    }
    times.into_iter().map(Summary::from_secs).collect()
}

fn robust(c: &mut Criterion) {
    let mut group = c.benchmark_group("robust_aggregate");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for len in [64 * 1024, 1024 * 1024] {
        let (parts, honest_mean) = inputs(len);
        let refs: Vec<&[f32]> = parts.iter().map(Vec::as_slice).collect();
        let weights = [1.0f32; SENDERS];
        let rho = parts[..SENDERS - 1]
            .iter()
            .map(|p| distance(p, &honest_mean))
            .fold(0.0, f64::max);
        let rules = [
            ("weighted_mean", Aggregation::WeightedMean),
            ("trimmed_mean_1", Aggregation::TrimmedMean { trim: 1 }),
            (
                "centered_clip_10",
                Aggregation::CenteredClip {
                    tau: (3.0 * rho) as f32,
                    iterations: 10,
                },
            ),
        ];
        let mut out = vec![0.0f32; len];
        let mut scratch = Vec::new();
        group.throughput(Throughput::Elements((SENDERS * len) as u64));
        for (name, rule) in &rules {
            group.bench_function(BenchmarkId::new(*name, len), |b| {
                b.iter(|| {
                    let done = aggregate(rule, black_box(&refs), &weights, &mut out, &mut scratch)
                        .expect("aggregate");
                    assert!(done);
                })
            });
        }

        // Beside the criterion rows: the three timed alternately, and what each
        // does with the attacker.
        let deviations: Vec<f64> = rules
            .iter()
            .map(|(_, rule)| {
                aggregate(rule, &refs, &weights, &mut out, &mut scratch).expect("aggregate");
                distance(&out, &honest_mean)
            })
            .collect();
        let mut outs = vec![vec![0.0f32; len]; rules.len()];
        let mut scratches = vec![Vec::new(); rules.len()];
        let mut calls: Vec<Box<dyn FnMut() + '_>> = rules
            .iter()
            .zip(outs.iter_mut().zip(scratches.iter_mut()))
            .map(|((_, rule), (out, scratch))| {
                let refs = &refs;
                Box::new(move || {
                    aggregate(rule, black_box(refs), &weights, out, scratch).expect("aggregate");
                }) as Box<dyn FnMut() + '_>
            })
            .collect();
        let times = alternating(11, &mut calls);
        let base = times[0].median();
        let rate = |d: Duration| (SENDERS * len) as f64 / d.as_secs_f64().max(1e-12);
        println!(
            "robust_aggregate/{len}: {SENDERS} senders (one attacker), honest spread rho {rho:.1}; \
             median per call, the three timed alternately ({} samples); target >= {:.2} M \
             values/s (a 1 Gbit/s link) each",
            times[0].len(),
            TARGET_VALUES_PER_SEC / 1e6,
        );
        for ((name, _), (t, dev)) in rules.iter().zip(times.iter().zip(&deviations)) {
            let r = rate(t.median());
            println!(
                "  {name:<16} {:>8.2} ms = {:>5.1}x weighted mean, {:>7.1} M values/s ({}), \
                 |result - honest mean| {dev:.3}",
                ms(t.median()),
                t.median().as_secs_f64() / base.as_secs_f64().max(1e-12),
                r / 1e6,
                if r >= TARGET_VALUES_PER_SEC {
                    "meets target"
                } else {
                    "MISSES target"
                },
            );
        }
    }
    group.finish();
}

criterion_group!(benches, robust);
criterion_main!(benches);
