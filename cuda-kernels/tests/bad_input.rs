//! Bad input: typed errors, never panics; documented NaN/inf behaviour.

use colony_kernels::{
    AdamW, Buffer, Device, KernelError, Lamb, Layout, Q8Buffer, Sgd, accumulate,
    accumulate_checked, adamw_step, all_finite, bf16, cpu, decode_bf16, decode_bf16_accumulate,
    decode_f16, decode_q8, encode_bf16, encode_f16, encode_q8, f16, lamb_step, scale, sgd_step,
    weighted_average, weighted_delta, weighted_sum,
};

fn buf(v: &[f32]) -> Buffer<f32> {
    Buffer::from_vec(v.to_vec())
}

#[test]
fn length_mismatches_are_errors_and_leave_outputs_alone() {
    let mut acc = buf(&[1.0, 2.0, 3.0]);
    let e = accumulate(&mut acc, &buf(&[1.0, 2.0]), 1.0);
    assert!(matches!(
        e,
        Err(KernelError::LengthMismatch {
            op: "accumulate",
            expected: 3,
            actual: 2,
            ..
        })
    ));
    assert_eq!(acc.as_slice().unwrap(), &[1.0, 2.0, 3.0]);

    let mut out = buf(&[0.0; 3]);
    let e = weighted_sum(&mut out, &[&buf(&[1.0; 3]), &buf(&[1.0; 4])], &[1.0, 1.0]);
    assert!(matches!(
        e,
        Err(KernelError::LengthMismatch { what: "part", .. })
    ));
    let e = weighted_delta(&mut out, &[&buf(&[1.0; 3])], &[1.0], &buf(&[1.0; 2]));
    assert!(matches!(
        e,
        Err(KernelError::LengthMismatch { what: "own", .. })
    ));

    let mut half = Buffer::<f16>::zeros(2, Device::Cpu).unwrap();
    assert!(matches!(
        encode_f16(&out, &mut half),
        Err(KernelError::LengthMismatch { .. })
    ));
    assert!(matches!(
        decode_f16(&half, &mut out),
        Err(KernelError::LengthMismatch { .. })
    ));
    let mut q = Q8Buffer::zeros(4, 2, Device::Cpu).unwrap();
    assert!(matches!(
        encode_q8(&out, &mut q),
        Err(KernelError::LengthMismatch { .. })
    ));
    assert!(matches!(
        decode_q8(&q, &mut out),
        Err(KernelError::LengthMismatch { .. })
    ));

    // Wire helpers: byte counts must match exactly (a truncated part is refused).
    let mut dst = vec![0.0f32; 4];
    assert!(matches!(
        cpu::f16::decode(&[0u8; 7], &mut dst),
        Err(KernelError::LengthMismatch { .. })
    ));
    assert!(matches!(
        cpu::f16::encode(&dst, &mut [0u8; 9]),
        Err(KernelError::LengthMismatch { .. })
    ));
    let bytes = cpu::q8::encode_to_vec(&dst, 2).unwrap();
    assert!(matches!(
        cpu::q8::decode(&bytes[1..], 2, &mut dst),
        Err(KernelError::LengthMismatch { .. })
    ));
    assert!(matches!(
        cpu::q8::decode_accumulate(&bytes, 4, &mut dst, 1.0),
        Err(KernelError::LengthMismatch { .. })
    ));
    assert!(matches!(
        cpu::q8::encode_to_vec(&dst, 0),
        Err(KernelError::InvalidBlockSize { block_size: 0 })
    ));
    assert!(matches!(
        Q8Buffer::zeros(4, 0, Device::Cpu),
        Err(KernelError::InvalidBlockSize { .. })
    ));

    let (mut p, g, mut m, mut v) = (
        buf(&[1.0; 4]),
        buf(&[1.0; 4]),
        buf(&[0.0; 4]),
        buf(&[0.0; 3]),
    );
    assert!(matches!(
        adamw_step(&mut p, &g, &mut m, &mut v, &AdamW::default(), 1),
        Err(KernelError::LengthMismatch {
            what: "exp_avg_sq",
            ..
        })
    ));
    assert!(matches!(
        sgd_step(&mut p, &g, &mut v, &Sgd::default()),
        Err(KernelError::LengthMismatch { .. })
    ));
    assert_eq!(p.as_slice().unwrap(), &[1.0; 4]);
}

#[test]
fn weights_are_validated() {
    let (a, b) = (buf(&[1.0, 2.0]), buf(&[3.0, 4.0]));
    let mut out = buf(&[0.0, 0.0]);
    assert!(matches!(
        weighted_sum(&mut out, &[], &[]),
        Err(KernelError::NoParts { .. })
    ));
    assert!(matches!(
        weighted_sum(&mut out, &[&a, &b], &[1.0]),
        Err(KernelError::WeightCount {
            parts: 2,
            weights: 1,
            ..
        })
    ));
    for bad in [-1.0, f32::NAN, f32::INFINITY, -0.0001] {
        let e = weighted_average(&mut out, &[&a, &b], &[1.0, bad]);
        assert!(
            matches!(e, Err(KernelError::InvalidWeight { index: 1, .. })),
            "{bad}: {e:?}"
        );
    }
    // Zero-sum weights: an average is undefined, a sum is zeros.
    assert!(matches!(
        weighted_average(&mut out, &[&a, &b], &[0.0, 0.0]),
        Err(KernelError::ZeroWeightSum { .. })
    ));
    assert!(matches!(
        weighted_delta(&mut out, &[&a], &[0.0], &b),
        Err(KernelError::ZeroWeightSum { .. })
    ));
    weighted_sum(&mut out, &[&a, &b], &[0.0, 0.0]).unwrap();
    assert_eq!(out.as_slice().unwrap(), &[0.0, 0.0]);
    // A zero weight (auxiliary peer) is fine.
    weighted_average(&mut out, &[&a, &b], &[0.0, 2.0]).unwrap();
    assert_eq!(out.as_slice().unwrap(), &[3.0, 4.0]);
    weighted_delta(&mut out, &[&a, &b], &[1.0, 1.0], &a).unwrap();
    assert_eq!(out.as_slice().unwrap(), &[1.0, 1.0]);
}

#[test]
fn non_finite_scalars_are_errors() {
    let mut a = buf(&[1.0]);
    let g = buf(&[1.0]);
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        assert!(matches!(
            accumulate(&mut a, &g, bad),
            Err(KernelError::NonFiniteScalar { name: "alpha", .. })
        ));
        assert!(matches!(
            scale(&mut a, bad),
            Err(KernelError::NonFiniteScalar { .. })
        ));
        assert!(matches!(
            cpu::f16::decode_accumulate(&[0, 0], &mut [0.0], bad),
            Err(KernelError::NonFiniteScalar { .. })
        ));
    }
    // Negative alpha is an ordinary scalar (subtracting a gradient).
    accumulate(&mut a, &g, -3.0).unwrap();
    assert_eq!(a.as_slice().unwrap(), &[-2.0]);
}

#[test]
fn hyperparameters_and_steps_are_validated() {
    let (mut p, g, mut m, mut v) = (buf(&[1.0]), buf(&[1.0]), buf(&[0.0]), buf(&[0.0]));
    let bad = AdamW {
        beta1: 1.0,
        ..AdamW::default()
    };
    assert!(matches!(
        adamw_step(&mut p, &g, &mut m, &mut v, &bad, 1),
        Err(KernelError::InvalidHyperparameter { name: "beta1", .. })
    ));
    assert!(matches!(
        adamw_step(&mut p, &g, &mut m, &mut v, &AdamW::default(), 0),
        Err(KernelError::ZeroStep { .. })
    ));
    let bad = Sgd {
        lr: f32::NAN,
        ..Sgd::default()
    };
    assert!(matches!(
        sgd_step(&mut p, &g, &mut m, &bad),
        Err(KernelError::InvalidHyperparameter { name: "lr", .. })
    ));
    let layout = Layout::packed([("a", vec![1])], 1).unwrap();
    let bad = Lamb {
        eps: 0.0,
        ..Lamb::default()
    };
    assert!(matches!(
        lamb_step(&mut p, &g, &mut m, &mut v, &layout, &bad, 1),
        Err(KernelError::InvalidHyperparameter { name: "eps", .. })
    ));
    let wrong = Layout::packed([("a", vec![2])], 1).unwrap();
    assert!(matches!(
        lamb_step(&mut p, &g, &mut m, &mut v, &wrong, &Lamb::default(), 1),
        Err(KernelError::LayoutMismatch {
            expected: 2,
            actual: 1,
            ..
        })
    ));
    assert_eq!(p.as_slice().unwrap(), &[1.0]);
}

#[test]
fn nan_and_inf_propagate_and_all_finite_catches_them() {
    let mut acc = buf(&[1.0, 1.0, 1.0]);
    accumulate(&mut acc, &buf(&[f32::NAN, f32::INFINITY, 1.0]), 1.0).unwrap();
    let a = acc.as_slice().unwrap();
    assert!(a[0].is_nan() && a[1] == f32::INFINITY && a[2] == 2.0);
    assert!(!all_finite(&acc).unwrap());
    assert!(all_finite(&buf(&[])).unwrap());
    assert!(all_finite(&buf(&[f32::MAX, f32::MIN_POSITIVE, -0.0])).unwrap());
    // A poisoned part with weight 0 still poisons the sum (0 * inf = NaN).
    let mut out = buf(&[0.0]);
    weighted_sum(
        &mut out,
        &[&buf(&[1.0]), &buf(&[f32::INFINITY])],
        &[1.0, 0.0],
    )
    .unwrap();
    assert!(out.as_slice().unwrap()[0].is_nan());
}

#[test]
fn f16_saturates_finite_and_keeps_non_finite() {
    let src = [
        1e6f32,
        -1e6,
        65519.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        1e-30,
        0.1,
    ];
    let mut src_long = src.to_vec();
    src_long.extend_from_slice(&src); // 16 values: exercises the SIMD path too
    let bytes = cpu::f16::encode_to_vec(&src_long);
    let mut back = vec![0.0; src_long.len()];
    cpu::f16::decode(&bytes, &mut back).unwrap();
    for chunk in back.chunks(8) {
        assert_eq!(chunk[0], 65504.0);
        assert_eq!(chunk[1], -65504.0);
        assert_eq!(chunk[2], 65504.0);
        assert_eq!(chunk[3], f32::INFINITY);
        assert_eq!(chunk[4], f32::NEG_INFINITY);
        assert!(chunk[5].is_nan());
        assert_eq!(chunk[6], 0.0);
        assert!((chunk[7] - 0.1).abs() < 1e-4);
    }
}

#[test]
fn q8_poisoned_block_decodes_to_nan_only_there() {
    let mut src = vec![0.5f32; 12];
    src[5] = f32::INFINITY;
    let bytes = cpu::q8::encode_to_vec(&src, 4).unwrap();
    let mut back = vec![0.0; 12];
    cpu::q8::decode(&bytes, 4, &mut back).unwrap();
    assert!(back[..4].iter().all(|&x| x == 0.5));
    assert!(back[4..8].iter().all(|x| x.is_nan()));
    assert!(back[8..].iter().all(|&x| x == 0.5));
    // Tiny and all-zero blocks encode as zeros.
    let tiny = [1e-38f32, -1e-39, 0.0, 0.0];
    let b = cpu::q8::encode_to_vec(&tiny, 4).unwrap();
    cpu::q8::decode(&b, 4, &mut back[..4]).unwrap();
    assert_eq!(&back[..4], &[0.0; 4]);
}

#[test]
fn empty_buffers_are_fine_everywhere() {
    let mut e = buf(&[]);
    accumulate(&mut e, &buf(&[]), 1.0).unwrap();
    scale(&mut e, 2.0).unwrap();
    weighted_delta(
        &mut e.to_device(Device::Cpu).unwrap(),
        &[&buf(&[])],
        &[1.0],
        &buf(&[]),
    )
    .unwrap();
    assert!(cpu::f16::encode_to_vec(&[]).is_empty());
    assert_eq!(cpu::q8::encode_to_vec(&[], 16).unwrap().len(), 0);
    let layout = Layout::packed([("none", vec![0])], 16).unwrap();
    let (mut p, g, mut m, mut v) = (buf(&[]), buf(&[]), buf(&[]), buf(&[]));
    lamb_step(&mut p, &g, &mut m, &mut v, &layout, &Lamb::default(), 1).unwrap();
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_without_the_feature_is_a_typed_error() {
    assert!(matches!(
        Buffer::<f32>::zeros(4, Device::Cuda(0)),
        Err(KernelError::NotCompiledWithCuda)
    ));
    assert!(matches!(
        Buffer::from_slice(&[1.0f32], Device::Cuda(0)),
        Err(KernelError::NotCompiledWithCuda)
    ));
    assert!(!colony_kernels::cuda::is_available());
    assert!(matches!(
        colony_kernels::cuda::device_count(),
        Err(KernelError::NotCompiledWithCuda)
    ));
}

#[cfg(feature = "cuda")]
#[test]
fn cuda_without_a_gpu_is_a_typed_error() {
    if colony_kernels::cuda::is_available() {
        println!("skipped: a GPU is present (this test covers machines without one)");
        return;
    }
    let e = Buffer::<f32>::zeros(4, Device::Cuda(0));
    assert!(
        matches!(
            e,
            Err(KernelError::CudaUnavailable { .. } | KernelError::Cuda { .. })
        ),
        "{e:?}"
    );
}

#[test]
fn bf16_and_accumulate_checked_refuse_bad_input() {
    let mut out = buf(&[0.5; 3]);
    let mut short = Buffer::<bf16>::zeros(2, Device::Cpu).unwrap();
    assert!(matches!(
        encode_bf16(&out, &mut short),
        Err(KernelError::LengthMismatch {
            op: "encode_bf16",
            expected: 3,
            actual: 2,
            ..
        })
    ));
    assert!(matches!(
        decode_bf16(&short, &mut out),
        Err(KernelError::LengthMismatch {
            op: "decode_bf16",
            ..
        })
    ));
    assert!(matches!(
        decode_bf16_accumulate(&short, &mut out, 1.0),
        Err(KernelError::LengthMismatch { .. })
    ));
    let three = Buffer::<bf16>::zeros(3, Device::Cpu).unwrap();
    for bad in [f32::NAN, f32::INFINITY] {
        assert!(matches!(
            decode_bf16_accumulate(&three, &mut out, bad),
            Err(KernelError::NonFiniteScalar { name: "weight", .. })
        ));
        assert!(matches!(
            cpu::bf16::decode_accumulate(&[0; 6], &mut [0.0; 3], bad),
            Err(KernelError::NonFiniteScalar { .. })
        ));
        assert!(matches!(
            accumulate_checked(&mut out, &buf(&[1.0; 3]), bad),
            Err(KernelError::NonFiniteScalar { name: "alpha", .. })
        ));
    }
    assert!(matches!(
        cpu::bf16::decode(&[0u8; 5], &mut [0.0; 3]),
        Err(KernelError::LengthMismatch { .. })
    ));
    assert!(matches!(
        cpu::bf16::encode(&[0.0; 3], &mut [0u8; 7]),
        Err(KernelError::LengthMismatch { .. })
    ));
    assert!(matches!(
        accumulate_checked(&mut out, &buf(&[1.0; 4]), 1.0),
        Err(KernelError::LengthMismatch {
            op: "accumulate_checked",
            ..
        })
    ));
    assert!(matches!(
        cpu::accumulate_checked(&mut [0.0; 2], &[1.0; 3], 1.0),
        Err(KernelError::LengthMismatch { .. })
    ));
    // Nothing was written by the refused calls.
    assert_eq!(out.as_slice().unwrap(), &[0.5; 3]);
}

#[test]
fn bf16_keeps_nan_and_inf_and_saturates_finite_overflow() {
    let src = [
        f32::MAX,
        f32::MIN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        -f32::NAN,
        f32::from_bits(0x7f80_0001), // NaN whose payload is all in the dropped bits
        1.0e-45,                     // smallest subnormal: rounds to 0
        1.0 + 1.0 / 256.0,           // tie between 1 and 1 + 2^-7: even is 1
        0.1,
    ];
    // 16 + 10 values: through the SIMD path and the scalar tail.
    let mut long = src.to_vec();
    long.extend_from_slice(&src);
    long.extend_from_slice(&src[..6]);
    let bytes = cpu::bf16::encode_to_vec(&long);
    let mut back = vec![0.0; long.len()];
    cpu::bf16::decode(&bytes, &mut back).unwrap();
    for (k, chunk) in back.chunks(src.len()).enumerate() {
        assert_eq!(chunk[0], cpu::bf16::BF16_MAX, "chunk {k}");
        assert_eq!(chunk[1], -cpu::bf16::BF16_MAX);
        assert_eq!(chunk[2], f32::INFINITY);
        assert_eq!(chunk[3], f32::NEG_INFINITY);
        assert!(chunk[4].is_nan() && chunk[4].is_sign_positive());
        assert!(chunk[5].is_nan() && chunk[5].is_sign_negative());
        if chunk.len() == src.len() {
            assert!(chunk[6].is_nan());
            assert_eq!(chunk[7], 0.0);
            assert_eq!(chunk[8], 1.0);
            assert!((chunk[9] - 0.1).abs() <= 0.1 / 256.0);
        }
    }
    assert!(cpu::all_finite(&back[..2]));
    assert!(!cpu::all_finite(&back));
    // Buffer API: same bits as the byte API; NaN decoded into an accumulator poisons it.
    let src_buf = buf(&long);
    let mut enc = Buffer::<bf16>::zeros(long.len(), Device::Cpu).unwrap();
    encode_bf16(&src_buf, &mut enc).unwrap();
    let enc_bytes: Vec<u8> = enc
        .as_slice()
        .unwrap()
        .iter()
        .flat_map(|h| h.to_le_bytes())
        .collect();
    assert_eq!(enc_bytes, bytes);
    let mut acc = buf(&vec![1.0; long.len()]);
    decode_bf16_accumulate(&enc, &mut acc, 0.5).unwrap();
    let a = acc.as_slice().unwrap();
    assert!(a[4].is_nan() && a[2] == f32::INFINITY && a[9] == 1.0 + 0.5 * back[9]);
}

#[test]
fn accumulate_checked_reports_poison_and_overflow() {
    let mut acc = buf(&[1.0, 2.0, 3.0]);
    let r = accumulate_checked(&mut acc, &buf(&[1.0, 1.0, 1.0]), 2.0).unwrap();
    assert!(r.grad_finite && r.acc_finite);
    assert_eq!(acc.as_slice().unwrap(), &[3.0, 4.0, 5.0]);
    // A NaN gradient is reported, and (one pass) already accumulated.
    let r = accumulate_checked(&mut acc, &buf(&[0.0, f32::NAN, 0.0]), 1.0).unwrap();
    assert!(!r.grad_finite && !r.acc_finite);
    assert!(acc.as_slice().unwrap()[1].is_nan());
    // Finite gradient, overflowing sum: only the accumulator is flagged.
    let mut acc = buf(&[f32::MAX, 0.0]);
    let r = accumulate_checked(&mut acc, &buf(&[f32::MAX, 1.0]), 1.0).unwrap();
    assert!(r.grad_finite && !r.acc_finite);
    // alpha = 0 does not hide an infinite gradient (0 * inf = NaN).
    let mut acc = buf(&[0.0]);
    let r = accumulate_checked(&mut acc, &buf(&[f32::INFINITY]), 0.0).unwrap();
    assert!(!r.grad_finite && !r.acc_finite);
    // Empty buffers are finite.
    let r = accumulate_checked(&mut buf(&[]), &buf(&[]), 1.0).unwrap();
    assert!(r.grad_finite && r.acc_finite);
    assert!(cpu::bf16::encode_to_vec(&[]).is_empty());
    cpu::bf16::decode_accumulate(&[], &mut [], 1.0).unwrap();
}
