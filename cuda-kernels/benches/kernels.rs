//! Throughput of every op at 1 MB, 64 MB and 512 MB (size of one f32 buffer),
//! plus a model-shaped case (1 000 tensors, 100 M parameters), on the CPU and,
//! with `--features cuda` and a GPU, on GPU 0.
//!
//! `Throughput::Bytes` counts the bytes each op must read plus write once
//! (accumulate: 12 per element). Beside each result the bench prints the
//! bandwidth of a plain copy of the same size on the same device, measured
//! right after that op (so both see the same machine load) and counted the
//! same way (8 bytes per element), and the ratio. Both figures in that line
//! are best-of (fastest sample), which is robust on shared machines;
//! criterion's own estimates are printed above it.
//!
//! Env: `KERNELS_BENCH_SIZES_MB` (default "1,64,512"), `KERNELS_BENCH_MODEL=0`
//! to skip the model case, `KERNELS_BENCH_CPU=0` to skip the CPU.

use std::{
    cell::RefCell,
    hint::black_box,
    time::{Duration, Instant},
};

use colony_kernels as ops;
use colony_kernels::{AdamW, Buffer, Device, Lamb, Layout, Q8Buffer, Sgd, bf16, cpu, f16};
use criterion::{Criterion, SamplingMode, Throughput, criterion_main};

fn sync(device: Device) {
    if let Device::Cuda(n) = device {
        colony_kernels::cuda::synchronize(n).expect("synchronize");
    }
}

/// Fastest seconds per call of `f`, over `reps` calls after one warm-up (the
/// build machines are shared: the best call is the one that had the cores).
fn time_median(device: Device, reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    sync(device);
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f();
            sync(device);
            s.elapsed().as_secs_f64()
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[0]
}

/// Buffers for the copy baseline of one size.
struct CopyProbe {
    device: Device,
    src: Buffer<f32>,
    dst: Buffer<f32>,
}

impl CopyProbe {
    fn new(device: Device, n: usize) -> Self {
        let src = Buffer::from_vec(vec![1.0f32; n])
            .to_device(device)
            .expect("alloc");
        let dst = Buffer::<f32>::zeros(n, device).expect("alloc");
        Self { device, src, dst }
    }

    /// Copy bandwidth (bytes read + written per second), measured now, so
    /// that it sees the same machine load as the op measured just before.
    fn bandwidth(&mut self) -> f64 {
        let n = self.src.len();
        let reps = if n * 4 >= 256 << 20 { 5 } else { 15 };
        let (src, dst) = (&self.src, &mut self.dst);
        let secs = time_median(self.device, reps, || ops::copy(dst, src).expect("copy"));
        (8 * n) as f64 / secs
    }
}

struct Ctx<'a, 'c> {
    c: &'c mut Criterion,
    device: Device,
    label: &'a str,
    copy: CopyProbe,
}

impl Ctx<'_, '_> {
    /// Runs one criterion bench of `f` (moving `bytes` per call) and prints the
    /// achieved bandwidth beside the copy bandwidth.
    fn bench(&mut self, op: &str, bytes: usize, mut f: impl FnMut()) {
        let device = self.device;
        let samples = RefCell::new(Vec::new());
        let mut group = self
            .c
            .benchmark_group(format!("{}/{}", device_name(device), self.label));
        group.throughput(Throughput::Bytes(bytes as u64));
        group.sample_size(10);
        group.warm_up_time(Duration::from_millis(300));
        group.measurement_time(Duration::from_secs(2));
        group.sampling_mode(SamplingMode::Flat);
        group.bench_function(op, |b| {
            b.iter_custom(|iters| {
                sync(device);
                let start = Instant::now();
                for _ in 0..iters {
                    f();
                }
                sync(device);
                let e = start.elapsed();
                samples.borrow_mut().push(e.as_secs_f64() / iters as f64);
                e
            })
        });
        group.finish();
        let mut s = samples.into_inner();
        if s.is_empty() {
            return; // filtered out on the command line
        }
        s.sort_by(f64::total_cmp);
        // Best sample for the op and best call for the copy: both are what
        // the machine reaches when this process has the cores.
        let bw = bytes as f64 / s[0];
        let copy_bw = self.copy.bandwidth();
        println!(
            "RESULT {:<5} {:<8} {:<28} {:>7.2} GB/s   copy {:>7.2} GB/s   {:>5.1}% of copy",
            device_name(device),
            self.label,
            op,
            bw / 1e9,
            copy_bw / 1e9,
            100.0 * bw / copy_bw
        );
    }
}

fn device_name(d: Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(n) => format!("cuda{n}"),
    }
}

fn filled(n: usize, device: Device, seed: u32) -> Buffer<f32> {
    let v: Vec<f32> = (0..n)
        .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) as f32 * 1e-9 - 2.0)
        .collect();
    Buffer::from_vec(v).to_device(device).expect("alloc")
}

fn bench_size(c: &mut Criterion, device: Device, mb: usize) {
    let n = mb * (1 << 20) / 4;
    let label = format!("{mb}MB");
    let copy = CopyProbe::new(device, n);
    let mut cx = Ctx {
        c,
        device,
        label: &label,
        copy,
    };
    let z = |len| Buffer::<f32>::zeros(len, device).expect("alloc");

    {
        let src = filled(n, device, 1);
        let mut dst = z(n);
        cx.bench("copy", 8 * n, || ops::copy(&mut dst, &src).expect("op"));
    }
    {
        let mut acc = filled(n, device, 1);
        let grad = filled(n, device, 2);
        cx.bench("accumulate", 12 * n, || {
            ops::accumulate(&mut acc, &grad, 0.5).expect("op")
        });
        cx.bench("accumulate_checked", 12 * n, || {
            black_box(ops::accumulate_checked(&mut acc, &grad, 0.5).expect("op"));
        });
        cx.bench("scale", 8 * n, || ops::scale(&mut acc, 1.0).expect("op"));
        cx.bench("all_finite", 4 * n, || {
            black_box(ops::all_finite(&acc).expect("op"));
        });
    }
    {
        let parts: Vec<Buffer<f32>> = (0..4).map(|k| filled(n, device, k)).collect();
        let refs: Vec<&Buffer<f32>> = parts.iter().collect();
        let own = filled(n, device, 9);
        let mut out = z(n);
        let w = [1.0, 2.0, 3.0, 4.0];
        cx.bench("weighted_average_4parts", 20 * n, || {
            ops::weighted_average(&mut out, &refs, &w).expect("op")
        });
        cx.bench("weighted_delta_4parts", 24 * n, || {
            ops::weighted_delta(&mut out, &refs, &w, &own).expect("op")
        });
    }
    {
        let src = filled(n, device, 3);
        let mut acc = filled(n, device, 4);
        let mut half = Buffer::<f16>::zeros(n, device).expect("alloc");
        cx.bench("encode_f16", 6 * n, || {
            ops::encode_f16(&src, &mut half).expect("op")
        });
        cx.bench("decode_f16_accumulate", 10 * n, || {
            ops::decode_f16_accumulate(&half, &mut acc, 0.5).expect("op")
        });
        drop(half);
        let mut bhalf = Buffer::<bf16>::zeros(n, device).expect("alloc");
        cx.bench("encode_bf16", 6 * n, || {
            ops::encode_bf16(&src, &mut bhalf).expect("op")
        });
        cx.bench("decode_bf16", 6 * n, || {
            ops::decode_bf16(&bhalf, &mut acc).expect("op")
        });
        cx.bench("decode_bf16_accumulate", 10 * n, || {
            ops::decode_bf16_accumulate(&bhalf, &mut acc, 0.5).expect("op")
        });
        drop(bhalf);
        let mut q = Q8Buffer::zeros(n, cpu::q8::DEFAULT_BLOCK_SIZE, device).expect("alloc");
        let qbytes = n + 4 * cpu::q8::num_blocks(n, cpu::q8::DEFAULT_BLOCK_SIZE);
        cx.bench("encode_q8", 4 * n + qbytes, || {
            ops::encode_q8(&src, &mut q).expect("op")
        });
        cx.bench("decode_q8_accumulate", 8 * n + qbytes, || {
            ops::decode_q8_accumulate(&q, &mut acc, 0.5).expect("op")
        });
    }
    {
        let mut p = filled(n, device, 5);
        let g = filled(n, device, 6);
        let mut m = z(n);
        let mut v = z(n);
        let sgd = Sgd {
            weight_decay: 1e-4,
            ..Sgd::default()
        };
        cx.bench("sgd_step", 20 * n, || {
            ops::sgd_step(&mut p, &g, &mut m, &sgd).expect("op")
        });
        let adamw = AdamW::default();
        let mut step = 0;
        cx.bench("adamw_step", 28 * n, || {
            step += 1;
            ops::adamw_step(&mut p, &g, &mut m, &mut v, &adamw, step).expect("op")
        });
        // 256 Ki-element tensors: a LAMB window (several such tensors) gets
        // both passes while it is in the last-level cache.
        let t = (1usize << 18).min(n);
        let layout =
            Layout::packed((0..n / t).map(|i| (format!("t{i}"), vec![t])), 16).expect("layout");
        let lamb = Lamb::default();
        let mut step = 0;
        cx.bench("lamb_step_256K_tensors", 28 * n, || {
            step += 1;
            ops::lamb_step(&mut p, &g, &mut m, &mut v, &layout, &lamb, step).expect("op")
        });
        // 1 M-element tensors: LAMB needs each tensor's norms before it can
        // update, so a tensor larger than a window is read twice (pass 2 runs
        // backwards to reuse what is still cached).
        let t = (1usize << 20).min(n);
        let layout =
            Layout::packed((0..n / t).map(|i| (format!("t{i}"), vec![t])), 16).expect("layout");
        let lamb = Lamb::default();
        let mut step = 0;
        cx.bench("lamb_step_1M_tensors", 28 * n, || {
            step += 1;
            ops::lamb_step(&mut p, &g, &mut m, &mut v, &layout, &lamb, step).expect("op")
        });
    }
}

/// 1 000 tensors of mixed sizes (a few large matrices, many small vectors),
/// 100 M parameters in total.
fn model_layout() -> Layout {
    let mut sizes: Vec<usize> = (0..1000u64)
        .map(|i| {
            let h = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40;
            match i % 4 {
                0 => 512 + (h % 1024) as usize,        // biases, norms
                1 => 16_384 + (h % 65_536) as usize,   // small projections
                _ => 131_072 + (h % 131_072) as usize, // large matrices
            }
        })
        .collect();
    let total: usize = sizes.iter().sum();
    let target = 100_000_000usize;
    for s in &mut sizes {
        *s = (*s as f64 * target as f64 / total as f64) as usize;
    }
    let short = target - sizes.iter().sum::<usize>();
    sizes[2] += short;
    Layout::packed(
        sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| (format!("layer{i}"), vec![n])),
        16,
    )
    .expect("layout")
}

fn bench_model(c: &mut Criterion, device: Device) {
    let layout = model_layout();
    let n = layout.total_len();
    let copy = CopyProbe::new(device, n);
    let mut cx = Ctx {
        c,
        device,
        label: "model1000",
        copy,
    };
    {
        let mut acc = filled(n, device, 1);
        let grad = filled(n, device, 2);
        cx.bench("accumulate_fused_layout", 12 * n, || {
            ops::accumulate(&mut acc, &grad, 0.5).expect("op")
        });
        let params = layout.num_params();
        let mut big = filled(params, device, 1);
        let big_grad = filled(params, device, 2);
        cx.bench("accumulate_one_big_buffer", 12 * params, || {
            ops::accumulate(&mut big, &big_grad, 0.5).expect("op")
        });
        if device == Device::Cpu {
            // The reference's way: one call per tensor.
            let (a, g) = (
                acc.as_mut_slice().expect("host"),
                grad.as_slice().expect("host"),
            );
            cx.bench("accumulate_per_tensor_calls", 12 * params, || {
                for t in layout.tensors() {
                    cpu::accumulate(&mut a[t.range()], &g[t.range()], 0.5).expect("op");
                }
            });
        }
    }
    {
        let mut p = filled(n, device, 5);
        let g = filled(n, device, 6);
        let mut m = Buffer::<f32>::zeros(n, device).expect("alloc");
        let mut v = Buffer::<f32>::zeros(n, device).expect("alloc");
        let lamb = Lamb::default();
        let mut step = 0;
        cx.bench("lamb_step", 28 * n, || {
            step += 1;
            ops::lamb_step(&mut p, &g, &mut m, &mut v, &layout, &lamb, step).expect("op")
        });
    }
}

fn sizes() -> Vec<usize> {
    std::env::var("KERNELS_BENCH_SIZES_MB")
        .ok()
        .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 64, 512])
}

fn devices() -> Vec<Device> {
    let mut d = Vec::new();
    if std::env::var("KERNELS_BENCH_CPU").map_or(true, |v| v != "0") {
        d.push(Device::Cpu);
    }
    if colony_kernels::cuda::is_available() {
        d.push(Device::Cuda(0));
    } else {
        println!("no usable GPU ({}); CPU benches only", gpu_reason());
    }
    d
}

fn gpu_reason() -> String {
    match colony_kernels::cuda::device_count() {
        Ok(0) => "no CUDA device".into(),
        Ok(n) => format!("{n} devices but none usable"),
        Err(e) => e.to_string(),
    }
}

fn all(c: &mut Criterion) {
    println!("rayon threads: {}", rayon::current_num_threads());
    for device in devices() {
        for mb in sizes() {
            bench_size(c, device, mb);
        }
        if std::env::var("KERNELS_BENCH_MODEL").map_or(true, |v| v != "0") {
            bench_model(c, device);
        }
    }
}

// criterion_group! defines an undocumented pub fn.
#[allow(missing_docs)]
mod group {
    criterion::criterion_group!(benches, super::all);
}
use group::benches;
criterion_main!(benches);
