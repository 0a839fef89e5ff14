//! Throughput of every op at 1 MB, 64 MB and 512 MB (size of one f32 buffer),
//! plus a model-shaped case (1 000 tensors, 100 M parameters), on the CPU and,
//! with `--features cuda` and a GPU, on GPU 0, each against a copy baseline.
//!
//! # Byte accounting
//!
//! Every figure (criterion's `Throughput::Bytes`, the GB/s of an op and of the
//! copy baseline in the `RESULT` lines) counts, by one rule, the memory traffic
//! a single pass with ordinary (cached) stores must cause:
//!
//! `bytes = R + W + F`, where `R` is every input byte read once, `W` every
//! output byte written once, and `F` the read-for-ownership: on the CPU
//! (write-allocate caches) a store to a line the op did not read first makes
//! the core fetch that line before it overwrites it, so `F` = the bytes of
//! outputs that are not also inputs; on CUDA `F = 0` (the L2 does not fetch
//! sectors that are overwritten whole).
//!
//! Per element (f32 = 4 B; fp16/bf16 = 2 B; 8-bit = 1 B plus a 4 B scale per
//! block) on the CPU: copy 4 + 4 + 4 = 12 B, `acc += a * g` 8 + 4 + 0 = 12 B,
//! scale 4 + 4 = 8 B, `all_finite` 4 B, fp16 encode 4 + 2 + 2 = 8 B, bf16
//! decode (overwrite) 2 + 4 + 4 = 10 B, decode-accumulate 6 + 4 = 10 B, weighted
//! average of 4 parts 16 + 4 + 4 = 24 B, SGD 12 + 8 = 20 B, AdamW/LAMB
//! 16 + 12 = 28 B. On CUDA drop the `F` term (copy: 8 B). An op that needs more
//! than one pass (LAMB re-reads a tensor larger than its cache window) is still
//! counted as one, so the extra pass shows as a lower figure.
//!
//! # Copy baseline
//!
//! On the CPU the baseline is `dst = src` written the way the ops are: rayon
//! tasks of 32 Ki elements over all threads, an auto-vectorised loop, cached
//! stores (the loop multiplies by an opaque 1.0 so that LLVM does not turn it
//! into a `memcpy` call). On the dev box it is faster than `ops::copy` (a
//! `memcpy` per task: glibc picks `rep movsb` for 128 KiB) and than the same
//! loop with non-temporal stores, so it is the fastest copy measured there,
//! and it pays the same read-for-ownership the ops pay. `ops::copy` itself is
//! benched as an op. On CUDA the baseline is `ops::copy` (device-to-device
//! `memcpy`).
//!
//! # Timing
//!
//! Criterion runs and prints its own estimates first. Then the op and the
//! baseline are timed in alternation, sample by sample (each sample: the same
//! number of back-to-back calls of one of them, sized to take about 10 ms,
//! after a warm-up call; 15 pairs at 256 MB and above, 31 below), so both see
//! the same machine load; the `RESULT` line
//! gives the median of each, their ratio, and the range of the per-pair ratios
//! (how noisy the run was). The `copy_baseline` row is the baseline measured
//! against itself: its distance from 100% is the noise floor of the run.
//!
//! Env: `KERNELS_BENCH_SIZES_MB` (default "1,64,512"), `KERNELS_BENCH_MODEL=0`
//! to skip the model case, `KERNELS_BENCH_CPU=0` to skip the CPU.

use std::{
    cell::Cell,
    hint::black_box,
    time::{Duration, Instant},
};

use colony_kernels as ops;
use colony_kernels::{AdamW, Buffer, Device, Lamb, Layout, Q8Buffer, Sgd, bf16, cpu, f16};
use criterion::{Criterion, SamplingMode, Throughput, criterion_main};
use rayon::prelude::*;

fn sync(device: Device) {
    if let Device::Cuda(n) = device {
        colony_kernels::cuda::synchronize(n).expect("synchronize");
    }
}

/// Median of `v` (mean of the middle two for an even count; NaN when empty).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

/// Seconds of one call of `f` (waiting for the device).
fn time_once(device: Device, f: &mut impl FnMut()) -> f64 {
    let s = Instant::now();
    f();
    sync(device);
    s.elapsed().as_secs_f64()
}

/// Seconds per call of `f` over `iters` back-to-back calls.
fn time_sample(device: Device, iters: usize, f: &mut impl FnMut()) -> f64 {
    sync(device);
    let s = Instant::now();
    for _ in 0..iters {
        f();
    }
    sync(device);
    s.elapsed().as_secs_f64() / iters as f64
}

/// Seconds per call of `op` and of `base`, `samples` samples each, taken in
/// alternation (op, base, op, base, ...) so that both see the same load. Each
/// sample times the same number of calls of either, about 10 ms worth (from a
/// warm-up call of each): longer than a scheduler time slice, so one
/// descheduled thread does not decide a sample.
fn paired(
    device: Device,
    samples: usize,
    op: &mut impl FnMut(),
    base: &mut impl FnMut(),
) -> (Vec<f64>, Vec<f64>) {
    let warm = time_once(device, op).max(time_once(device, base));
    let iters = ((1e-2 / warm.max(1e-9)).ceil() as usize).clamp(1, 10_000);
    (0..samples)
        .map(|_| {
            let o = time_sample(device, iters, op);
            let b = time_sample(device, iters, base);
            (o, b)
        })
        .unzip()
}

/// Elements per rayon task of the baseline: the ops' task size (the crate's
/// private `cpu::CHUNK`, 128 KiB of f32).
const CHUNK: usize = 1 << 15;

/// `dst = src` in the ops' style (see the module doc): rayon tasks of
/// [`CHUNK`] elements, an auto-vectorised loop, cached stores.
fn baseline_copy_cpu(dst: &mut [f32], src: &[f32]) {
    // Opaque to the optimiser, so the loop stays a vector loop, not `memcpy`.
    let one = black_box(1.0f32);
    dst.par_chunks_mut(CHUNK)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(d, s)| {
            for (d, s) in d.iter_mut().zip(s) {
                *d = *s * one;
            }
        });
}

/// Memory traffic of one call, by the rule of the module doc.
#[derive(Clone, Copy)]
struct Traffic {
    /// Input bytes, each read once.
    read: usize,
    /// Output bytes, each written once.
    written: usize,
    /// Output bytes the op does not read first (read for ownership on the CPU).
    fresh: usize,
}

impl Traffic {
    /// Counted bytes on `device`.
    fn bytes(self, device: Device) -> usize {
        let rfo = match device {
            Device::Cpu => self.fresh,
            Device::Cuda(_) => 0,
        };
        self.read + self.written + rfo
    }
}

/// Traffic of an op that reads `read` bytes and writes `written` bytes, all of
/// them to lines it has read first (in place).
fn in_place(read: usize, written: usize) -> Traffic {
    Traffic {
        read,
        written,
        fresh: 0,
    }
}

/// Traffic of an op that reads `read` bytes and writes `written` bytes to an
/// output it does not read.
fn out_of_place(read: usize, written: usize) -> Traffic {
    Traffic {
        read,
        written,
        fresh: written,
    }
}

/// Buffers for the copy baseline of one size.
struct CopyProbe {
    device: Device,
    src: Buffer<f32>,
    dst: Buffer<f32>,
}

impl CopyProbe {
    fn new(device: Device, n: usize) -> Self {
        let src = filled(n, device, 7);
        let dst = Buffer::<f32>::zeros(n, device).expect("alloc");
        Self { device, src, dst }
    }

    /// Counted bytes of one baseline copy.
    fn bytes(&self) -> usize {
        out_of_place(4 * self.src.len(), 4 * self.src.len()).bytes(self.device)
    }

    /// One baseline copy.
    fn run(&mut self) {
        match self.device {
            Device::Cpu => baseline_copy_cpu(
                self.dst.as_mut_slice().expect("host"),
                self.src.as_slice().expect("host"),
            ),
            Device::Cuda(_) => ops::copy(&mut self.dst, &self.src).expect("copy"),
        }
    }
}

struct Ctx<'a, 'c> {
    c: &'c mut Criterion,
    device: Device,
    label: &'a str,
    copy: CopyProbe,
}

impl Ctx<'_, '_> {
    /// Runs one criterion bench of `f` (causing `traffic` per call), then
    /// times `f` and the copy baseline in alternation and prints the medians.
    fn bench(&mut self, op: &str, traffic: Traffic, mut f: impl FnMut()) {
        let device = self.device;
        let bytes = traffic.bytes(device);
        let ran = Cell::new(false);
        let mut group = self
            .c
            .benchmark_group(format!("{}/{}", device_name(device), self.label));
        group.throughput(Throughput::Bytes(bytes as u64));
        group.sample_size(10);
        group.warm_up_time(Duration::from_millis(300));
        group.measurement_time(Duration::from_secs(2));
        group.sampling_mode(SamplingMode::Flat);
        group.bench_function(op, |b| {
            ran.set(true);
            b.iter_custom(|iters| {
                sync(device);
                let start = Instant::now();
                for _ in 0..iters {
                    f();
                }
                sync(device);
                start.elapsed()
            })
        });
        group.finish();
        if !ran.get() {
            return; // filtered out on the command line
        }
        self.compare(op, bytes, &mut f);
    }

    /// Times `f` (moving `bytes` per call) against the copy baseline and
    /// prints the `RESULT` line.
    fn compare(&mut self, op: &str, bytes: usize, f: &mut impl FnMut()) {
        let device = self.device;
        let samples = if 4 * self.copy.src.len() >= 256 << 20 {
            15
        } else {
            31
        };
        let copy = &mut self.copy;
        let copy_bytes = copy.bytes();
        let (mut t_op, mut t_copy) = paired(device, samples, f, &mut || copy.run());
        let ratios: Vec<f64> = t_op
            .iter()
            .zip(&t_copy)
            .map(|(o, c)| (bytes as f64 / o) / (copy_bytes as f64 / c))
            .collect();
        let (lo, hi) = ratios
            .iter()
            .fold((f64::INFINITY, 0f64), |(lo, hi), &r| (lo.min(r), hi.max(r)));
        let bw = bytes as f64 / median(&mut t_op);
        let copy_bw = copy_bytes as f64 / median(&mut t_copy);
        println!(
            "RESULT {:<5} {:<9} {:<28} {:>7.2} GB/s   copy {:>7.2} GB/s   {:>5.1}% of copy \
             (medians of {samples} alternating samples; per-pair ratio {:.0}-{:.0}%)",
            device_name(device),
            self.label,
            op,
            bw / 1e9,
            copy_bw / 1e9,
            100.0 * bw / copy_bw,
            100.0 * lo,
            100.0 * hi,
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
        let t = out_of_place(4 * n, 4 * n);
        {
            // The baseline (own buffers) against itself: the run's noise floor.
            let mut probe = CopyProbe::new(device, n);
            cx.bench("copy_baseline", t, || probe.run());
        }
        cx.bench("copy", t, || ops::copy(&mut dst, &src).expect("op"));
    }
    {
        let mut acc = filled(n, device, 1);
        let grad = filled(n, device, 2);
        cx.bench("accumulate", in_place(8 * n, 4 * n), || {
            ops::accumulate(&mut acc, &grad, 0.5).expect("op")
        });
        cx.bench("accumulate_checked", in_place(8 * n, 4 * n), || {
            black_box(ops::accumulate_checked(&mut acc, &grad, 0.5).expect("op"));
        });
        cx.bench("scale", in_place(4 * n, 4 * n), || {
            ops::scale(&mut acc, 1.0).expect("op")
        });
        cx.bench("all_finite", in_place(4 * n, 0), || {
            black_box(ops::all_finite(&acc).expect("op"));
        });
    }
    {
        let parts: Vec<Buffer<f32>> = (0..4).map(|k| filled(n, device, k)).collect();
        let refs: Vec<&Buffer<f32>> = parts.iter().collect();
        let own = filled(n, device, 9);
        let mut out = z(n);
        let w = [1.0, 2.0, 3.0, 4.0];
        cx.bench(
            "weighted_average_4parts",
            out_of_place(16 * n, 4 * n),
            || ops::weighted_average(&mut out, &refs, &w).expect("op"),
        );
        cx.bench("weighted_delta_4parts", out_of_place(20 * n, 4 * n), || {
            ops::weighted_delta(&mut out, &refs, &w, &own).expect("op")
        });
    }
    {
        let src = filled(n, device, 3);
        let mut acc = filled(n, device, 4);
        let mut half = Buffer::<f16>::zeros(n, device).expect("alloc");
        cx.bench("encode_f16", out_of_place(4 * n, 2 * n), || {
            ops::encode_f16(&src, &mut half).expect("op")
        });
        cx.bench("decode_f16_accumulate", in_place(6 * n, 4 * n), || {
            ops::decode_f16_accumulate(&half, &mut acc, 0.5).expect("op")
        });
        drop(half);
        let mut bhalf = Buffer::<bf16>::zeros(n, device).expect("alloc");
        cx.bench("encode_bf16", out_of_place(4 * n, 2 * n), || {
            ops::encode_bf16(&src, &mut bhalf).expect("op")
        });
        cx.bench("decode_bf16", out_of_place(2 * n, 4 * n), || {
            ops::decode_bf16(&bhalf, &mut acc).expect("op")
        });
        cx.bench("decode_bf16_accumulate", in_place(6 * n, 4 * n), || {
            ops::decode_bf16_accumulate(&bhalf, &mut acc, 0.5).expect("op")
        });
        drop(bhalf);
        let mut q = Q8Buffer::zeros(n, cpu::q8::DEFAULT_BLOCK_SIZE, device).expect("alloc");
        let qbytes = n + 4 * cpu::q8::num_blocks(n, cpu::q8::DEFAULT_BLOCK_SIZE);
        cx.bench("encode_q8", out_of_place(4 * n, qbytes), || {
            ops::encode_q8(&src, &mut q).expect("op")
        });
        cx.bench(
            "decode_q8_accumulate",
            in_place(4 * n + qbytes, 4 * n),
            || ops::decode_q8_accumulate(&q, &mut acc, 0.5).expect("op"),
        );
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
        cx.bench("sgd_step", in_place(12 * n, 8 * n), || {
            ops::sgd_step(&mut p, &g, &mut m, &sgd).expect("op")
        });
        let adamw = AdamW::default();
        let mut step = 0;
        cx.bench("adamw_step", in_place(16 * n, 12 * n), || {
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
        cx.bench("lamb_step_256K_tensors", in_place(16 * n, 12 * n), || {
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
        cx.bench("lamb_step_1M_tensors", in_place(16 * n, 12 * n), || {
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
        cx.bench("accumulate_fused_layout", in_place(8 * n, 4 * n), || {
            ops::accumulate(&mut acc, &grad, 0.5).expect("op")
        });
        let params = layout.num_params();
        let mut big = filled(params, device, 1);
        let big_grad = filled(params, device, 2);
        cx.bench(
            "accumulate_one_big_buffer",
            in_place(8 * params, 4 * params),
            || ops::accumulate(&mut big, &big_grad, 0.5).expect("op"),
        );
        if device == Device::Cpu {
            // The reference's way: one call per tensor.
            let (a, g) = (
                acc.as_mut_slice().expect("host"),
                grad.as_slice().expect("host"),
            );
            cx.bench(
                "accumulate_per_tensor_calls",
                in_place(8 * params, 4 * params),
                || {
                    for t in layout.tensors() {
                        cpu::accumulate(&mut a[t.range()], &g[t.range()], 0.5).expect("op");
                    }
                },
            );
        }
    }
    {
        let mut p = filled(n, device, 5);
        let g = filled(n, device, 6);
        let mut m = Buffer::<f32>::zeros(n, device).expect("alloc");
        let mut v = Buffer::<f32>::zeros(n, device).expect("alloc");
        let lamb = Lamb::default();
        let mut step = 0;
        cx.bench("lamb_step", in_place(16 * n, 12 * n), || {
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
