//! Every CPU op against a naive reference, on random sizes (empty, not a
//! multiple of the vector width, and above the parallel threshold).

use colony_kernels::{AdamW, Lamb, Layout, Sgd, bf16, cpu, f16};
use proptest::prelude::*;

/// Sizes: mostly small and odd, sometimes past the rayon threshold (65 536).
fn len() -> impl Strategy<Value = usize> {
    prop_oneof![4 => 0usize..2_000, 1 => 65_000usize..140_000]
}

fn values(n: usize) -> impl Strategy<Value = Vec<f32>> {
    proptest::collection::vec(-1.0e3f32..1.0e3, n)
}

fn same_bits(a: &[f32], b: &[f32]) -> Result<(), TestCaseError> {
    prop_assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        prop_assert!(
            x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()),
            "element {}: {} vs {}",
            i,
            x,
            y
        );
    }
    Ok(())
}

fn close(a: &[f32], b: &[f32], rel: f32) -> Result<(), TestCaseError> {
    prop_assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let tol = rel * x.abs().max(y.abs()).max(1e-6);
        prop_assert!((x - y).abs() <= tol, "element {}: {} vs {}", i, x, y);
    }
    Ok(())
}

fn pair() -> impl Strategy<Value = (Vec<f32>, Vec<f32>)> {
    len().prop_flat_map(|n| (values(n), values(n)))
}

/// Naive 8-bit block encoder (the documented formula, one value at a time).
fn q8_reference(x: &[f32], block: usize) -> (Vec<f32>, Vec<i8>) {
    let mut scales = Vec::new();
    let mut codes = Vec::new();
    for b in x.chunks(block) {
        let absmax = b
            .iter()
            .fold(0f32, |m, v| if v.abs() > m { v.abs() } else { m });
        if b.iter().any(|v| !v.is_finite()) {
            scales.push(f32::NAN);
            codes.extend(std::iter::repeat_n(0i8, b.len()));
        } else if absmax < cpu::q8::MIN_ABSMAX {
            scales.push(0.0);
            codes.extend(std::iter::repeat_n(0i8, b.len()));
        } else {
            scales.push(absmax / 127.0);
            let inv = 127.0 / absmax;
            codes.extend(b.iter().map(|v| {
                let y = (v * inv).clamp(-127.0, 127.0);
                (y + 0.5f32.copysign(y)).trunc() as i8
            }));
        }
    }
    (scales, codes)
}

/// Naive bf16 encoder: picks the nearer of the two bf16 neighbours in f64
/// (ties to the even mantissa), saturates finite overflow to ±max, quiets NaN.
fn bf16_reference(x: f32) -> u16 {
    if x.is_nan() {
        return ((x.to_bits() >> 16) | 0x40) as u16;
    }
    if x.is_infinite() {
        return (x.to_bits() >> 16) as u16;
    }
    let down = x.to_bits() >> 16; // toward zero
    let up = down + 1; // away from zero (may be inf)
    let value = |b: u32| f64::from(f32::from_bits(b << 16));
    let (dd, du) = (
        (f64::from(x) - value(down)).abs(),
        (value(up) - f64::from(x)).abs(),
    );
    let pick = if dd < du || (dd == du && down & 1 == 0) {
        down
    } else {
        up
    };
    if pick & 0x7fff == 0x7f80 {
        (pick - 1) as u16
    } else {
        pick as u16
    }
}

/// Values for the bf16 codec: ordinary, tiny (subnormal), huge (near the
/// overflow edge), exact ties, and NaN/inf.
fn bf16_values(n: usize) -> impl Strategy<Value = Vec<f32>> {
    proptest::collection::vec(
        prop_oneof![
            8 => -1.0e6f32..1.0e6,
            2 => -1.0e-38f32..1.0e-38,
            2 => (0x7f7f_0000u32..0x7f80_0000).prop_map(f32::from_bits),
            2 => (0u32..0xffff).prop_map(|h| f32::from_bits((h << 16) | 0x8000)),
            1 => Just(f32::NAN), 1 => Just(f32::INFINITY), 1 => Just(f32::NEG_INFINITY),
            1 => (0x7f80_0001u32..0x8000_0000).prop_map(|b| f32::from_bits(b | 0x8000_0000)),
        ],
        n,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn accumulate_checked_matches_reference(
        (mut acc, mut grad) in pair(),
        alpha in prop_oneof![4 => -4.0f32..4.0, 1 => Just(0.0f32)],
        poison in proptest::collection::vec((any::<prop::sample::Index>(), 0usize..4), 0..3),
    ) {
        if !grad.is_empty() {
            for (at, kind) in &poison {
                let i = at.index(grad.len());
                match kind {
                    0 => grad[i] = f32::NAN,
                    1 => grad[i] = f32::NEG_INFINITY,
                    2 => grad[i] = f32::MAX, // finite, but overflows acc when alpha > 1
                    _ => acc[i] = f32::INFINITY, // acc already poisoned
                }
            }
        }
        let expected: Vec<f32> = acc.iter().zip(&grad).map(|(a, g)| a + alpha * g).collect();
        let got = cpu::accumulate_checked(&mut acc, &grad, alpha).unwrap();
        same_bits(&acc, &expected)?;
        prop_assert_eq!(got.grad_finite, grad.iter().all(|g| g.is_finite()));
        prop_assert_eq!(got.acc_finite, expected.iter().all(|a| a.is_finite()));
        prop_assert!(got.grad_finite || !got.acc_finite, "a NaN/inf gradient always poisons acc");
    }

    #[test]
    fn bf16_codec_matches_reference(src in len().prop_flat_map(bf16_values), w in -2.0f32..2.0) {
        let bytes = cpu::bf16::encode_to_vec(&src);
        prop_assert_eq!(bytes.len(), cpu::bf16::encoded_len(src.len()));
        let mut out = vec![0u8; bytes.len()];
        cpu::bf16::encode(&src, &mut out).unwrap();
        prop_assert_eq!(&out, &bytes);
        let codes: Vec<u16> = bytes.chunks(2).map(|b| u16::from_le_bytes([b[0], b[1]])).collect();
        for (i, (&x, &c)) in src.iter().zip(&codes).enumerate() {
            prop_assert_eq!(c, bf16_reference(x), "element {}: {:e}", i, x);
            // The `half` crate agrees wherever it does not overflow to inf.
            let h = bf16::from_f32(x);
            if !x.is_nan() && (h.is_finite() || x.is_infinite()) {
                prop_assert_eq!(c, h.to_bits(), "half disagrees on {:e}", x);
            }
            // NaN stays NaN with its sign; finite stays finite; inf keeps its sign.
            let back = f32::from_bits(u32::from(c) << 16);
            if x.is_nan() {
                prop_assert!(back.is_nan() && back.is_sign_negative() == x.is_sign_negative());
            } else if x.is_finite() {
                prop_assert!(back.is_finite(), "{:e} became {:e}", x, back);
                // Relative error of normal values: 2^-9 (half a step of 7 mantissa bits).
                if x.abs() >= f32::MIN_POSITIVE && back.abs() < cpu::bf16::BF16_MAX {
                    prop_assert!((f64::from(x) - f64::from(back)).abs() <= f64::from(x.abs()) / 256.0);
                }
            } else {
                prop_assert_eq!(back, x);
            }
        }
        let decoded_ref: Vec<f32> = codes.iter().map(|&c| f32::from_bits(u32::from(c) << 16)).collect();
        let mut decoded = vec![0.0; src.len()];
        cpu::bf16::decode(&bytes, &mut decoded).unwrap();
        same_bits(&decoded, &decoded_ref)?;
        let mut acc: Vec<f32> = (0..src.len()).map(|i| i as f32 * 0.25).collect();
        let acc_ref: Vec<f32> = acc.iter().zip(&decoded_ref).map(|(a, d)| a + w * d).collect();
        cpu::bf16::decode_accumulate(&bytes, &mut acc, w).unwrap();
        same_bits(&acc, &acc_ref)?;
        // Unaligned byte slices, as they come off the network.
        let mut shifted = vec![0u8; bytes.len() + 1];
        shifted[1..].copy_from_slice(&bytes);
        cpu::bf16::decode(&shifted[1..], &mut decoded).unwrap();
        same_bits(&decoded, &decoded_ref)?;
    }

    #[test]
    fn accumulate_matches_reference((mut acc, grad) in pair(), alpha in -4.0f32..4.0) {
        let expected: Vec<f32> = acc.iter().zip(&grad).map(|(a, g)| a + alpha * g).collect();
        cpu::accumulate(&mut acc, &grad, alpha).unwrap();
        same_bits(&acc, &expected)?;
    }

    #[test]
    fn scale_matches_reference(mut buf in len().prop_flat_map(values), s in -4.0f32..4.0) {
        let expected: Vec<f32> = buf.iter().map(|x| x * s).collect();
        cpu::scale(&mut buf, s).unwrap();
        same_bits(&buf, &expected)?;
    }

    #[test]
    fn copy_matches(src in len().prop_flat_map(values)) {
        let mut dst = vec![0.0; src.len()];
        cpu::copy(&mut dst, &src).unwrap();
        same_bits(&dst, &src)?;
    }

    #[test]
    fn weighted_reductions_match_reference(
        (parts, own) in (len(), 1usize..5).prop_flat_map(|(n, k)| (proptest::collection::vec(values(n), k), values(n))),
        raw_weights in proptest::collection::vec(0.0f32..10.0, 5),
    ) {
        let n = own.len();
        let weights = &raw_weights[..parts.len()];
        let refs: Vec<&[f32]> = parts.iter().map(Vec::as_slice).collect();
        let sum: f64 = weights.iter().map(|&w| f64::from(w)).sum();
        let naive = |w: &[f32]| -> Vec<f32> {
            (0..n).map(|i| {
                let mut s = w[0] * parts[0][i];
                for k in 1..parts.len() { s += w[k] * parts[k][i]; }
                s
            }).collect()
        };
        let mut out = vec![f32::NAN; n];
        cpu::weighted_sum(&mut out, &refs, weights).unwrap();
        same_bits(&out, &naive(weights))?;
        if sum > 0.0 {
            let norm: Vec<f32> = weights.iter().map(|&w| (f64::from(w) / sum) as f32).collect();
            let avg = naive(&norm);
            cpu::weighted_average(&mut out, &refs, weights).unwrap();
            same_bits(&out, &avg)?;
            cpu::weighted_delta(&mut out, &refs, weights, &own).unwrap();
            let delta: Vec<f32> = avg.iter().zip(&own).map(|(a, o)| a - o).collect();
            same_bits(&out, &delta)?;
        }
    }

    #[test]
    fn all_finite_matches_reference(mut buf in len().prop_flat_map(values), poison in 0usize..4, at in any::<prop::sample::Index>()) {
        if !buf.is_empty() && poison > 0 {
            let i = at.index(buf.len());
            buf[i] = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY][poison - 1];
        }
        prop_assert_eq!(cpu::all_finite(&buf), buf.iter().all(|x| x.is_finite()));
    }

    #[test]
    fn f16_codec_matches_reference(
        src in len().prop_flat_map(|n| proptest::collection::vec(prop_oneof![
            8 => -7.0e4f32..7.0e4,
            2 => -1.0e-4f32..1.0e-4,
            1 => Just(f32::NAN), 1 => Just(f32::INFINITY), 1 => Just(f32::NEG_INFINITY),
        ], n)),
        w in -2.0f32..2.0,
    ) {
        let bytes = cpu::f16::encode_to_vec(&src);
        let expected: Vec<u8> = src.iter().flat_map(|&x| {
            let c = if x.is_finite() { x.clamp(-65504.0, 65504.0) } else { x };
            f16::from_f32(c).to_bits().to_le_bytes()
        }).collect();
        for (i, (a, b)) in bytes.chunks(2).zip(expected.chunks(2)).enumerate() {
            let (a, b) = (f16::from_le_bytes([a[0], a[1]]), f16::from_le_bytes([b[0], b[1]]));
            prop_assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "element {}: {} vs {}", i, a, b);
        }
        let decoded_ref: Vec<f32> = expected.chunks(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect();
        let mut decoded = vec![0.0; src.len()];
        cpu::f16::decode(&bytes, &mut decoded).unwrap();
        same_bits(&decoded, &decoded_ref)?;
        let mut acc: Vec<f32> = (0..src.len()).map(|i| i as f32 * 0.25).collect();
        let acc_ref: Vec<f32> = acc.iter().zip(&decoded_ref).map(|(a, d)| a + w * d).collect();
        cpu::f16::decode_accumulate(&bytes, &mut acc, w).unwrap();
        same_bits(&acc, &acc_ref)?;
        // Round trip error of in-range normal values: relative 2^-11.
        for (x, d) in src.iter().zip(&decoded) {
            if x.is_finite() && x.abs() >= 6.2e-5 && x.abs() <= 65504.0 {
                prop_assert!((x - d).abs() <= x.abs() * (1.0 / 2048.0), "{} -> {}", x, d);
            }
        }
    }

    #[test]
    fn q8_codec_matches_reference_and_bound(
        src in len().prop_flat_map(|n| proptest::collection::vec(prop_oneof![
            20 => -50.0f32..50.0, 1 => Just(f32::NAN), 1 => Just(0.0f32),
        ], n)),
        block in prop_oneof![Just(cpu::q8::DEFAULT_BLOCK_SIZE), 1usize..300],
        w in -2.0f32..2.0,
    ) {
        let bytes = cpu::q8::encode_to_vec(&src, block).unwrap();
        prop_assert_eq!(bytes.len(), cpu::q8::encoded_len(src.len(), block));
        let (scales, codes) = q8_reference(&src, block);
        let nb = scales.len();
        for (i, s) in scales.iter().enumerate() {
            let got = f32::from_le_bytes(bytes[4 * i..4 * i + 4].try_into().unwrap());
            prop_assert!(got.to_bits() == s.to_bits() || (got.is_nan() && s.is_nan()), "scale {}", i);
        }
        let got_codes: Vec<i8> = bytes[4 * nb..].iter().map(|&b| b as i8).collect();
        prop_assert_eq!(&got_codes, &codes);
        let mut decoded = vec![0.0; src.len()];
        cpu::q8::decode(&bytes, block, &mut decoded).unwrap();
        for (b, (xs, ds)) in src.chunks(block).zip(decoded.chunks(block)).enumerate() {
            if xs.iter().any(|x| x.is_nan()) {
                prop_assert!(ds.iter().all(|d| d.is_nan()), "poisoned block {} must decode to NaN", b);
                continue;
            }
            let absmax = xs.iter().fold(0f32, |m, x| m.max(x.abs()));
            for (x, d) in xs.iter().zip(ds) {
                let bound = absmax / 254.0 + 4.0 * f32::EPSILON * x.abs();
                prop_assert!((x - d).abs() <= bound, "block {}: {} -> {} (bound {})", b, x, d, bound);
            }
        }
        let mut acc = vec![1.5f32; src.len()];
        cpu::q8::decode_accumulate(&bytes, block, &mut acc, w).unwrap();
        let expected: Vec<f32> = src.chunks(block).zip(scales.iter()).enumerate().flat_map(|(b, (xs, &s))| {
            let ws = w * s;
            (0..xs.len()).map(move |i| (b, i, ws))
        }).map(|(b, i, ws)| 1.5 + f32::from(codes[b * block + i]) * ws).collect();
        same_bits(&acc, &expected)?;
    }

    #[test]
    fn q8_decode_range_matches_the_full_decode(
        src in len().prop_flat_map(|n| proptest::collection::vec(prop_oneof![
            20 => -50.0f32..50.0, 1 => Just(f32::NAN),
        ], n)),
        block in prop_oneof![Just(cpu::q8::DEFAULT_BLOCK_SIZE), 1usize..300],
        cut in (0.0f64..1.0, 0.0f64..1.0),
        w in -2.0f32..2.0,
    ) {
        let n = src.len();
        let bytes = cpu::q8::encode_to_vec(&src, block).unwrap();
        let mut full = vec![0.0; n];
        cpu::q8::decode(&bytes, block, &mut full).unwrap();
        let mut full_acc = vec![1.5f32; n];
        cpu::q8::decode_accumulate(&bytes, block, &mut full_acc, w).unwrap();
        // Ranges from random cuts, plus every block-edge case.
        let (a, b) = ((cut.0 * n as f64) as usize, (cut.1 * n as f64) as usize);
        let mut ranges = vec![a.min(b)..a.max(b), 0..n, a.min(b)..n];
        let edge = (a / block * block).min(n);
        ranges.push(edge..n.min(edge + block));
        ranges.push(edge..edge);
        for r in ranges {
            let mut got = vec![0.0; r.len()];
            cpu::q8::decode_range(&bytes, block, n, r.clone(), &mut got).unwrap();
            same_bits(&got, &full[r.clone()])?;
            let mut acc = vec![1.5f32; r.len()];
            cpu::q8::decode_range_accumulate(&bytes, block, n, r.clone(), &mut acc, w).unwrap();
            same_bits(&acc, &full_acc[r])?;
        }
        // Out-of-range and wrong-length calls are typed errors.
        let mut one = [0.0f32; 1];
        prop_assert!(cpu::q8::decode_range(&bytes, block, n, n..n + 1, &mut one).is_err());
        if n > 1 {
            prop_assert!(cpu::q8::decode_range(&bytes, block, n, 0..2, &mut one).is_err());
            prop_assert!(cpu::q8::decode_range(&bytes[1..], block, n, 0..1, &mut one).is_err());
        }
        prop_assert!(cpu::q8::decode_range_accumulate(&bytes, block, n, 0..0, &mut [], f32::NAN).is_err());
    }

    #[test]
    fn sgd_matches_reference((mut p, g) in pair(), nesterov in any::<bool>(), wd in 0.0f32..0.1) {
        let hp = Sgd { lr: 0.05, momentum: 0.9, dampening: 0.1, weight_decay: wd, nesterov };
        let mut buf = vec![0.0f32; p.len()];
        let (mut p_ref, mut b_ref) = (p.clone(), buf.clone());
        for _ in 0..2 {
            for i in 0..p_ref.len() {
                let gi = g[i] + wd * p_ref[i];
                b_ref[i] = 0.9 * b_ref[i] + (1.0 - 0.1) * gi;
                let d = if nesterov { gi + 0.9 * b_ref[i] } else { b_ref[i] };
                p_ref[i] -= 0.05 * d;
            }
            cpu::sgd_step(&mut p, &g, &mut buf, &hp).unwrap();
        }
        same_bits(&p, &p_ref)?;
        same_bits(&buf, &b_ref)?;
    }

    #[test]
    fn adamw_matches_reference((mut p, g) in pair()) {
        let hp = AdamW::default();
        let (mut m, mut v) = (vec![0.0f32; p.len()], vec![0.0f32; p.len()]);
        let mut p_ref: Vec<f64> = p.iter().map(|&x| f64::from(x)).collect();
        let (mut m_ref, mut v_ref) = (vec![0f64; p.len()], vec![0f64; p.len()]);
        for step in 1..=3u64 {
            let t = step as i32;
            let (b1, b2) = (f64::from(hp.beta1), f64::from(hp.beta2));
            for i in 0..p.len() {
                let gi = f64::from(g[i]);
                p_ref[i] *= 1.0 - f64::from(hp.lr) * f64::from(hp.weight_decay);
                m_ref[i] = b1 * m_ref[i] + (1.0 - b1) * gi;
                v_ref[i] = b2 * v_ref[i] + (1.0 - b2) * gi * gi;
                let mh = m_ref[i] / (1.0 - b1.powi(t));
                let vh = v_ref[i] / (1.0 - b2.powi(t));
                p_ref[i] -= f64::from(hp.lr) * mh / (vh.sqrt() + f64::from(hp.eps));
            }
            cpu::adamw_step(&mut p, &g, &mut m, &mut v, &hp, step).unwrap();
        }
        let p_ref: Vec<f32> = p_ref.iter().map(|&x| x as f32).collect();
        close(&p, &p_ref, 1e-5)?;
    }

    #[test]
    fn lamb_matches_reference(
        shapes in proptest::collection::vec(prop_oneof![4 => 0usize..300, 1 => 16_000usize..40_000], 1..12),
        seed in any::<u64>(),
    ) {
        let layout = Layout::packed(shapes.iter().enumerate().map(|(i, &n)| (format!("t{i}"), vec![n])), 16).unwrap();
        let n = layout.total_len();
        let mut state = seed | 1;
        let mut rnd = move || { state ^= state << 13; state ^= state >> 7; state ^= state << 17; (state % 2001) as f32 / 1000.0 - 1.0 };
        let mut p: Vec<f32> = (0..n).map(|_| rnd()).collect();
        let g: Vec<f32> = (0..n).map(|_| rnd()).collect();
        // Padding must stay untouched: mark it.
        let inside: Vec<bool> = { let mut v = vec![false; n]; for t in layout.tensors() { v[t.range()].fill(true); } v };
        for (x, &ins) in p.iter_mut().zip(&inside) { if !ins { *x = 7.0; } }
        let hp = Lamb { weight_decay: 0.01, ..Lamb::default() };
        let (mut m, mut v) = (vec![0f32; n], vec![0f32; n]);
        let mut p_ref: Vec<f64> = p.iter().map(|&x| f64::from(x)).collect();
        let (mut m_ref, mut v_ref) = (vec![0f64; n], vec![0f64; n]);
        for step in 1..=2u64 {
            let t = step as i32;
            let (b1, b2) = (f64::from(hp.beta1), f64::from(hp.beta2));
            for e in layout.tensors() {
                let r = e.range();
                let mut u = vec![0f64; r.len()];
                for (k, i) in r.clone().enumerate() {
                    let gi = f64::from(g[i]);
                    m_ref[i] = b1 * m_ref[i] + (1.0 - b1) * gi;
                    v_ref[i] = b2 * v_ref[i] + (1.0 - b2) * gi * gi;
                    let mh = m_ref[i] / (1.0 - b1.powi(t));
                    let vh = v_ref[i] / (1.0 - b2.powi(t));
                    u[k] = mh / (vh.sqrt() + f64::from(hp.eps)) + f64::from(hp.weight_decay) * p_ref[i];
                }
                let pn = p_ref[r.clone()].iter().map(|x| x * x).sum::<f64>().sqrt();
                let un = u.iter().map(|x| x * x).sum::<f64>().sqrt();
                let trust = if pn > 0.0 && un > 0.0 { (pn / un).min(f64::from(hp.max_trust_ratio)) } else { 1.0 };
                for (k, i) in r.enumerate() { p_ref[i] -= f64::from(hp.lr) * trust * u[k]; }
            }
            cpu::lamb_step(&mut p, &g, &mut m, &mut v, &layout, &hp, step).unwrap();
        }
        let p_ref: Vec<f32> = p_ref.iter().map(|&x| x as f32).collect();
        for i in 0..n {
            let tol = 2e-5 * p_ref[i].abs().max(1e-3);
            prop_assert!((p[i] - p_ref[i]).abs() <= tol, "element {}: {} vs {}", i, p[i], p_ref[i]);
            if !inside[i] { prop_assert_eq!(p[i], 7.0); }
        }
    }
}
