//! Every CUDA op against its CPU twin, on GPU 0. Skips (with the reason
//! printed) where no GPU, driver or NVRTC is available. Built and run on GPU
//! machines by `scripts/gpu-check.sh`.
#![cfg(feature = "cuda")]
#![allow(clippy::unwrap_used)] // test helpers, not only #[test] fns

use colony_kernels::{
    AdamW, Buffer, Device, KernelError, Lamb, Layout, Q8Buffer, Sgd, accumulate,
    accumulate_checked, adamw_step, all_finite, bf16, copy, cuda, decode_bf16,
    decode_bf16_accumulate, decode_f16, decode_f16_accumulate, decode_q8, decode_q8_accumulate,
    encode_bf16, encode_f16, encode_q8, f16, lamb_step, scale, sgd_step, weighted_average,
    weighted_delta, weighted_sum,
};

const GPU: Device = Device::Cuda(0);

fn gpu() -> bool {
    match cuda::device_count() {
        Ok(n) if n > 0 => true,
        Ok(_) => {
            println!("skipped: no CUDA device");
            false
        }
        Err(e) => {
            println!("skipped: {e}");
            false
        }
    }
}

/// Odd sizes around block and vector boundaries, plus one past a million.
const SIZES: [usize; 7] = [0, 1, 7, 255, 4097, 65_537, 1_000_003];

fn data(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            (((i as u32).wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(40_503)) % 20_001) as f32
                / 1000.0
                - 10.0
        })
        .collect()
}

fn pair(v: &[f32]) -> (Buffer<f32>, Buffer<f32>) {
    (
        Buffer::from_slice(v, Device::Cpu).unwrap(),
        Buffer::from_slice(v, GPU).unwrap(),
    )
}

/// Equal within `rel` of the larger magnitude plus an absolute `100 * rel`
/// floor scaled to the data (values are O(10)): the GPU contracts `a * b + c`
/// into FMAs, the CPU does not, so results differ by a few ulps of the
/// operands, which near a cancellation is large relative to the result.
/// `rel == 0.0` demands bit equality (NaN matching NaN).
fn assert_close(cpu: &Buffer<f32>, gpu: &Buffer<f32>, rel: f32, what: &str) {
    let (a, b) = (cpu.to_vec().unwrap(), gpu.to_vec().unwrap());
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        let ok = (x.is_nan() && y.is_nan())
            || x.to_bits() == y.to_bits()
            || (rel > 0.0 && (x - y).abs() <= rel * (x.abs().max(y.abs()) + 100.0));
        assert!(ok, "{what}: element {i}: cpu {x} vs gpu {y}");
    }
}

#[test]
fn elementwise_twins() {
    if !gpu() {
        return;
    }
    for n in SIZES {
        let (mut ac, mut ag) = pair(&data(n, 1));
        let (gc, gg) = pair(&data(n, 2));
        accumulate(&mut ac, &gc, 0.37).unwrap();
        accumulate(&mut ag, &gg, 0.37).unwrap();
        assert_close(&ac, &ag, 1e-6, "accumulate");
        let (gc2, gg2) = pair(&data(n, 4));
        let rc = accumulate_checked(&mut ac, &gc2, -0.21).unwrap();
        let rg = accumulate_checked(&mut ag, &gg2, -0.21).unwrap();
        assert_eq!(rc, rg, "accumulate_checked report, n {n}");
        assert!(rg.grad_finite && rg.acc_finite);
        assert_close(&ac, &ag, 1e-6, "accumulate_checked");
        if n > 0 {
            // Poison in the gradient, then an overflow from a finite gradient.
            let mut bad = data(n, 7);
            bad[n - 1] = f32::NAN;
            let (bc, bg) = pair(&bad);
            let (mut xc, mut xg) = pair(&data(n, 8));
            let rc = accumulate_checked(&mut xc, &bc, 1.0).unwrap();
            let rg = accumulate_checked(&mut xg, &bg, 1.0).unwrap();
            assert_eq!(rc, rg);
            assert!(!rg.grad_finite && !rg.acc_finite);
            assert_close(&xc, &xg, 1e-6, "accumulate_checked with NaN");
            let mut big = data(n, 9);
            big[n / 2] = f32::MAX;
            let (bc, bg) = pair(&big);
            let (mut xc, mut xg) = pair(&vec![f32::MAX; n]);
            let rc = accumulate_checked(&mut xc, &bc, 1.0).unwrap();
            let rg = accumulate_checked(&mut xg, &bg, 1.0).unwrap();
            assert_eq!(rc, rg);
            assert!(rg.grad_finite && !rg.acc_finite);
        }
        scale(&mut ac, -1.5).unwrap();
        scale(&mut ag, -1.5).unwrap();
        assert_close(&ac, &ag, 1e-6, "scale");
        let mut dst = Buffer::zeros(n, GPU).unwrap();
        copy(&mut dst, &ag).unwrap();
        assert_close(&ac, &dst, 1e-6, "copy");
        assert!(all_finite(&ag).unwrap());
        if n > 0 {
            let mut poisoned = data(n, 3);
            poisoned[n / 2] = f32::NAN;
            assert!(!all_finite(&Buffer::from_slice(&poisoned, GPU).unwrap()).unwrap());
            poisoned[n / 2] = f32::NEG_INFINITY;
            assert!(!all_finite(&Buffer::from_slice(&poisoned, GPU).unwrap()).unwrap());
        }
    }
}

#[test]
fn reduction_twins() {
    if !gpu() {
        return;
    }
    for n in SIZES {
        let parts: Vec<(Buffer<f32>, Buffer<f32>)> =
            (0..3).map(|k| pair(&data(n, 10 + k))).collect();
        let pc: Vec<&Buffer<f32>> = parts.iter().map(|p| &p.0).collect();
        let pg: Vec<&Buffer<f32>> = parts.iter().map(|p| &p.1).collect();
        let w = [0.5, 0.0, 2.0];
        let (own_c, own_g) = pair(&data(n, 20));
        let (mut oc, mut og) = (
            Buffer::zeros(n, Device::Cpu).unwrap(),
            Buffer::zeros(n, GPU).unwrap(),
        );
        weighted_sum(&mut oc, &pc, &w).unwrap();
        weighted_sum(&mut og, &pg, &w).unwrap();
        assert_close(&oc, &og, 1e-5, "weighted_sum");
        weighted_average(&mut oc, &pc, &w).unwrap();
        weighted_average(&mut og, &pg, &w).unwrap();
        assert_close(&oc, &og, 1e-5, "weighted_average");
        weighted_delta(&mut oc, &pc, &w, &own_c).unwrap();
        weighted_delta(&mut og, &pg, &w, &own_g).unwrap();
        assert_close(&oc, &og, 1e-5, "weighted_delta");
    }
}

#[test]
fn codec_twins() {
    if !gpu() {
        return;
    }
    for n in SIZES {
        let mut v = data(n, 5);
        for (i, x) in v.iter_mut().enumerate() {
            match i % 997 {
                1 => *x = 1e6,
                2 => *x = -7e4,
                3 => *x = 1e-6,
                _ => {}
            }
        }
        if n > 4100 {
            v[4100] = f32::NAN; // poisons the second 4096-block
        }
        let (src_c, src_g) = pair(&v);
        let (mut hc, mut hg) = (
            Buffer::<f16>::zeros(n, Device::Cpu).unwrap(),
            Buffer::<f16>::zeros(n, GPU).unwrap(),
        );
        encode_f16(&src_c, &mut hc).unwrap();
        encode_f16(&src_g, &mut hg).unwrap();
        let (a, b) = (hc.to_vec().unwrap(), hg.to_vec().unwrap());
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert!(
                x.to_bits() == y.to_bits() || (x.is_nan() && y.is_nan()),
                "encode_f16 {i}: {x} vs {y}"
            );
        }
        let (mut dc, mut dg) = pair(&data(n, 6));
        decode_f16_accumulate(&hc, &mut dc, 0.5).unwrap();
        decode_f16_accumulate(&hg, &mut dg, 0.5).unwrap();
        assert_close(&dc, &dg, 1e-6, "decode_f16_accumulate");
        decode_f16(&hc, &mut dc).unwrap();
        decode_f16(&hg, &mut dg).unwrap();
        assert_close(&dc, &dg, 0.0, "decode_f16");

        // bf16: bit-exact encode (NaN as NaN), exact decode.
        let mut vb = v.clone();
        for (i, x) in vb.iter_mut().enumerate() {
            match i % 1013 {
                4 => *x = f32::MAX,
                5 => *x = f32::from_bits(0xff7f_8000), // overflowing tie: saturates
                6 => *x = f32::NEG_INFINITY,
                7 => *x = f32::from_bits(0x7f80_0001), // NaN with low payload
                8 => *x = 1.0e-40,
                9 => *x = f32::from_bits(0x3f81_8000), // tie to even
                _ => {}
            }
        }
        let (bsrc_c, bsrc_g) = pair(&vb);
        let (mut bc, mut bg) = (
            Buffer::<bf16>::zeros(n, Device::Cpu).unwrap(),
            Buffer::<bf16>::zeros(n, GPU).unwrap(),
        );
        encode_bf16(&bsrc_c, &mut bc).unwrap();
        encode_bf16(&bsrc_g, &mut bg).unwrap();
        let (a, b) = (bc.to_vec().unwrap(), bg.to_vec().unwrap());
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            assert_eq!(x.to_bits(), y.to_bits(), "encode_bf16 {i}: {x} vs {y}");
        }
        let (mut dc2, mut dg2) = pair(&data(n, 16));
        decode_bf16_accumulate(&bc, &mut dc2, -0.75).unwrap();
        decode_bf16_accumulate(&bg, &mut dg2, -0.75).unwrap();
        assert_close(&dc2, &dg2, 1e-6, "decode_bf16_accumulate");
        decode_bf16(&bc, &mut dc2).unwrap();
        decode_bf16(&bg, &mut dg2).unwrap();
        assert_close(&dc2, &dg2, 0.0, "decode_bf16");

        for block in [4096, 100, 1] {
            let mut qc = Q8Buffer::zeros(n, block, Device::Cpu).unwrap();
            let mut qg = Q8Buffer::zeros(n, block, GPU).unwrap();
            encode_q8(&src_c, &mut qc).unwrap();
            encode_q8(&src_g, &mut qg).unwrap();
            assert_eq!(qc.to_bytes().unwrap().len(), qg.to_bytes().unwrap().len());
            assert_eq!(
                qc.codes().to_vec().unwrap(),
                qg.codes().to_vec().unwrap(),
                "q8 codes, block {block}"
            );
            assert_close(qc.scales(), qg.scales(), 0.0, "q8 scales");
            decode_q8_accumulate(&qc, &mut dc, -0.25).unwrap();
            decode_q8_accumulate(&qg, &mut dg, -0.25).unwrap();
            assert_close(&dc, &dg, 1e-6, "decode_q8_accumulate");
            decode_q8(&qc, &mut dc).unwrap();
            decode_q8(&qg, &mut dg).unwrap();
            assert_close(&dc, &dg, 0.0, "decode_q8");
        }
    }
}

#[test]
fn optimizer_twins() {
    if !gpu() {
        return;
    }
    let layout = Layout::packed(
        [
            ("emb", vec![1000, 300]),
            ("bias", vec![7]),
            ("empty", vec![0]),
            ("w", vec![129, 33]),
            ("scalar", vec![]),
        ],
        16,
    )
    .unwrap();
    let n = layout.total_len();
    let (mut pc, mut pg) = pair(&data(n, 30));
    let (gc, gg) = pair(&data(n, 31));
    let zeros = vec![0.0; n];
    let (mut mc, mut mg) = pair(&zeros);
    let (mut vc, mut vg) = pair(&zeros);
    for step in 1..=3 {
        let sgd = Sgd {
            nesterov: step == 2,
            weight_decay: 0.01,
            ..Sgd::default()
        };
        sgd_step(&mut pc, &gc, &mut mc, &sgd).unwrap();
        sgd_step(&mut pg, &gg, &mut mg, &sgd).unwrap();
    }
    assert_close(&pc, &pg, 1e-5, "sgd params");
    assert_close(&mc, &mg, 1e-5, "sgd momentum");
    for step in 1..=3 {
        adamw_step(&mut pc, &gc, &mut mc, &mut vc, &AdamW::default(), step).unwrap();
        adamw_step(&mut pg, &gg, &mut mg, &mut vg, &AdamW::default(), step).unwrap();
    }
    assert_close(&pc, &pg, 1e-5, "adamw params");
    assert_close(&vc, &vg, 1e-5, "adamw exp_avg_sq");
    for step in 1..=3 {
        lamb_step(
            &mut pc,
            &gc,
            &mut mc,
            &mut vc,
            &layout,
            &Lamb::default(),
            step,
        )
        .unwrap();
        lamb_step(
            &mut pg,
            &gg,
            &mut mg,
            &mut vg,
            &layout,
            &Lamb::default(),
            step,
        )
        .unwrap();
    }
    assert_close(&pc, &pg, 1e-4, "lamb params");
    assert_close(&mc, &mg, 1e-5, "lamb exp_avg");
}

#[test]
fn mixed_devices_are_typed_errors() {
    if !gpu() {
        return;
    }
    let mut on_gpu = Buffer::from_slice(&[1.0f32; 8], GPU).unwrap();
    let on_cpu = Buffer::from_slice(&[1.0f32; 8], Device::Cpu).unwrap();
    let e = accumulate(&mut on_gpu, &on_cpu, 1.0);
    assert!(
        matches!(
            e,
            Err(KernelError::DeviceMismatch {
                expected: GPU,
                actual: Device::Cpu,
                ..
            })
        ),
        "{e:?}"
    );
    let mut out = Buffer::zeros(8, Device::Cpu).unwrap();
    let e = weighted_sum(&mut out, &[&on_cpu, &on_gpu], &[1.0, 1.0]);
    assert!(
        matches!(e, Err(KernelError::DeviceMismatch { .. })),
        "{e:?}"
    );
    assert!(matches!(
        on_gpu.as_slice(),
        Err(KernelError::NotOnHost { device: GPU })
    ));
    let missing = Buffer::<f32>::zeros(1, Device::Cuda(1 << 20));
    assert!(
        matches!(missing, Err(KernelError::CudaUnavailable { .. })),
        "{missing:?}"
    );
    assert_eq!(
        on_gpu.to_device(Device::Cpu).unwrap().as_slice().unwrap(),
        &[1.0; 8]
    );
}
