//! CUDA twins of the ops. Inputs are validated by `crate::ops` before these run.

use cudarc::driver::{CudaFunction, DevicePtr, LaunchArgs, PushKernelArg};
use half::{bf16, f16};

use super::{
    CudaStorage,
    backend::driver_err,
    sources::{CODEC, ELEMENTWISE, OPTIM, REDUCE},
};
use crate::{
    AccumulateCheck, AdamW, Buffer, Device, Element, KernelError, Lamb, Layout, Q8Buffer, Result,
    Sgd,
    buffer::Storage,
    optim::{AdamScalars, adam_scalars},
};

fn st<T: Element>(b: &Buffer<T>) -> Result<&CudaStorage<T>> {
    match &b.storage {
        Storage::Cuda(s) => Ok(s),
        Storage::Host(_) => Err(KernelError::DeviceMismatch {
            op: "cuda",
            expected: Device::Cuda(0),
            actual: Device::Cpu,
        }),
    }
}

fn st_mut<T: Element>(b: &mut Buffer<T>) -> Result<&mut CudaStorage<T>> {
    match &mut b.storage {
        Storage::Cuda(s) => Ok(s),
        Storage::Host(_) => Err(KernelError::DeviceMismatch {
            op: "cuda",
            expected: Device::Cuda(0),
            actual: Device::Cpu,
        }),
    }
}

fn launch(
    mut args: LaunchArgs<'_>,
    cfg: cudarc::driver::LaunchConfig,
    what: &'static str,
) -> Result<()> {
    // SAFETY: every caller pushes exactly the arguments of the kernel's C
    // signature (device buffers, then scalars of the declared types), all
    // buffers hold at least the `n` elements the kernel indexes (validated in
    // crate::ops), and the kernels index only below `n` (grid-stride loops).
    unsafe { args.launch(cfg) }
        .map(|_| ())
        .map_err(driver_err(what))
}

fn n64(n: usize) -> u64 {
    n as u64
}

pub(crate) fn accumulate(acc: &mut Buffer<f32>, grad: &Buffer<f32>, alpha: f32) -> Result<()> {
    let g = st(grad)?;
    let a = st_mut(acc)?;
    let n = a.len();
    if n == 0 {
        return Ok(());
    }
    let dev = a.dev.clone();
    let cfg = dev.elementwise_cfg(a.len());
    let f: CudaFunction = dev.function(&ELEMENTWISE, "accumulate_f32")?;
    let mut b = dev.stream.launch_builder(&f);
    let n = n64(n);
    b.arg(&mut a.slice).arg(&g.slice).arg(&alpha).arg(&n);
    launch(b, cfg, "accumulate_f32")
}

pub(crate) fn accumulate_checked(
    acc: &mut Buffer<f32>,
    grad: &Buffer<f32>,
    alpha: f32,
) -> Result<AccumulateCheck> {
    let g = st(grad)?;
    let a = st_mut(acc)?;
    let n = a.len();
    if n == 0 {
        return Ok(AccumulateCheck {
            grad_finite: true,
            acc_finite: true,
        });
    }
    let dev = a.dev.clone();
    let cfg = dev.elementwise_cfg(n);
    let f = dev.function(&ELEMENTWISE, "accumulate_checked_f32")?;
    let mut flags = dev
        .stream
        .alloc_zeros::<u32>(1)
        .map_err(driver_err("allocating"))?;
    let n = n64(n);
    let mut b = dev.stream.launch_builder(&f);
    b.arg(&mut a.slice)
        .arg(&g.slice)
        .arg(&alpha)
        .arg(&mut flags)
        .arg(&n);
    launch(b, cfg, "accumulate_checked_f32")?;
    let flags = dev
        .stream
        .clone_dtoh(&flags)
        .map_err(driver_err("downloading"))?;
    let bits = flags.first().copied().unwrap_or(3);
    Ok(AccumulateCheck {
        grad_finite: bits & 1 == 0,
        acc_finite: bits & 2 == 0,
    })
}

pub(crate) fn copy(dst: &mut Buffer<f32>, src: &Buffer<f32>) -> Result<()> {
    let s = st(src)?;
    let d = st_mut(dst)?;
    if s.len() == 0 {
        return Ok(());
    }
    let dev = d.dev.clone();
    dev.stream
        .memcpy_dtod(&s.slice, &mut d.slice)
        .map_err(driver_err("copying on the device"))
}

pub(crate) fn scale(buf: &mut Buffer<f32>, s: f32) -> Result<()> {
    let a = st_mut(buf)?;
    if a.len() == 0 {
        return Ok(());
    }
    let dev = a.dev.clone();
    let cfg = dev.elementwise_cfg(a.len());
    let f = dev.function(&ELEMENTWISE, "scale_f32")?;
    let mut b = dev.stream.launch_builder(&f);
    let n = n64(a.len());
    b.arg(&mut a.slice).arg(&s).arg(&n);
    launch(b, cfg, "scale_f32")
}

pub(crate) fn all_finite(buf: &Buffer<f32>) -> Result<bool> {
    let a = st(buf)?;
    if a.len() == 0 {
        return Ok(true);
    }
    let dev = a.dev.clone();
    let cfg = dev.elementwise_cfg(a.len());
    let f = dev.function(&REDUCE, "all_finite_f32")?;
    let mut flag = dev
        .stream
        .alloc_zeros::<u32>(1)
        .map_err(driver_err("allocating"))?;
    let n = n64(a.len());
    let mut b = dev.stream.launch_builder(&f);
    b.arg(&a.slice).arg(&mut flag).arg(&n);
    launch(b, cfg, "all_finite_f32")?;
    let flag = dev
        .stream
        .clone_dtoh(&flag)
        .map_err(driver_err("downloading"))?;
    Ok(flag.first().copied() == Some(0))
}

/// `out = sum_k w_k parts_k (- own)`; weights already normalised if needed.
pub(crate) fn weighted_sum(
    out: &mut Buffer<f32>,
    parts: &[&Buffer<f32>],
    weights: &[f32],
    own: Option<&Buffer<f32>>,
) -> Result<()> {
    let parts: Vec<&CudaStorage<f32>> = parts.iter().map(|p| st(p)).collect::<Result<_>>()?;
    let own = own.map(st).transpose()?;
    let o = st_mut(out)?;
    if o.len() == 0 {
        return Ok(());
    }
    let dev = o.dev.clone();
    let cfg = dev.elementwise_cfg(o.len());
    let stream = &dev.stream;
    let f = dev.function(&REDUCE, "weighted_sum_f32")?;
    // Device pointers of the parts; the guards keep the parts' read events
    // recorded until the launch is queued.
    let (ptrs, _guards): (Vec<u64>, Vec<_>) =
        parts.iter().map(|p| p.slice.device_ptr(stream)).unzip();
    let (own_ptr, _own_guard) = match own {
        Some(s) => {
            let (p, g) = s.slice.device_ptr(stream);
            (p, Some(g))
        }
        None => (0u64, None),
    };
    let ptrs = stream
        .clone_htod(&ptrs)
        .map_err(driver_err("uploading part pointers"))?;
    let w = stream
        .clone_htod(weights)
        .map_err(driver_err("uploading weights"))?;
    let nparts = u32::try_from(parts.len()).map_err(|_| KernelError::WeightCount {
        op: "weighted_sum",
        parts: parts.len(),
        weights: weights.len(),
    })?;
    let n = n64(o.len());
    let mut b = stream.launch_builder(&f);
    b.arg(&mut o.slice)
        .arg(&ptrs)
        .arg(&w)
        .arg(&nparts)
        .arg(&own_ptr)
        .arg(&n);
    launch(b, cfg, "weighted_sum_f32")?;
    // The pointer and weight arrays are freed (stream-ordered) after the kernel.
    Ok(())
}

pub(crate) fn encode_f16(src: &Buffer<f32>, dst: &mut Buffer<f16>) -> Result<()> {
    encode_half(src, dst, "encode_f16")
}

pub(crate) fn decode_f16(
    src: &Buffer<f16>,
    dst: &mut Buffer<f32>,
    weight: Option<f32>,
) -> Result<()> {
    decode_half(src, dst, weight, ("decode_f16", "decode_acc_f16"))
}

pub(crate) fn encode_bf16(src: &Buffer<f32>, dst: &mut Buffer<bf16>) -> Result<()> {
    encode_half(src, dst, "encode_bf16")
}

pub(crate) fn decode_bf16(
    src: &Buffer<bf16>,
    dst: &mut Buffer<f32>,
    weight: Option<f32>,
) -> Result<()> {
    decode_half(src, dst, weight, ("decode_bf16", "decode_acc_bf16"))
}

/// Launches the 16-bit encoder `kernel(src, dst, n)` of the codec module.
fn encode_half<H: Element>(
    src: &Buffer<f32>,
    dst: &mut Buffer<H>,
    kernel: &'static str,
) -> Result<()> {
    let s = st(src)?;
    let d = st_mut(dst)?;
    if s.len() == 0 {
        return Ok(());
    }
    let dev = s.dev.clone();
    let cfg = dev.elementwise_cfg(s.len());
    let f = dev.function(&CODEC, kernel)?;
    let n = n64(s.len());
    let mut b = dev.stream.launch_builder(&f);
    b.arg(&s.slice).arg(&mut d.slice).arg(&n);
    launch(b, cfg, kernel)
}

/// Launches a 16-bit decoder: `decode(src, dst, n)` without a weight,
/// `decode_acc(src, dst, weight, n)` with one.
fn decode_half<H: Element>(
    src: &Buffer<H>,
    dst: &mut Buffer<f32>,
    weight: Option<f32>,
    (decode, decode_acc): (&'static str, &'static str),
) -> Result<()> {
    let s = st(src)?;
    let d = st_mut(dst)?;
    if s.len() == 0 {
        return Ok(());
    }
    let dev = s.dev.clone();
    let cfg = dev.elementwise_cfg(s.len());
    let n = n64(s.len());
    match weight {
        None => {
            let f = dev.function(&CODEC, decode)?;
            let mut b = dev.stream.launch_builder(&f);
            b.arg(&s.slice).arg(&mut d.slice).arg(&n);
            launch(b, cfg, decode)
        }
        Some(w) => {
            let f = dev.function(&CODEC, decode_acc)?;
            let mut b = dev.stream.launch_builder(&f);
            b.arg(&s.slice).arg(&mut d.slice).arg(&w).arg(&n);
            launch(b, cfg, decode_acc)
        }
    }
}

fn block_u32(block_size: usize) -> Result<u32> {
    u32::try_from(block_size).map_err(|_| KernelError::InvalidBlockSize { block_size })
}

pub(crate) fn encode_q8(src: &Buffer<f32>, dst: &mut Q8Buffer) -> Result<()> {
    let block = block_u32(dst.block_size)?;
    let nblocks = dst.scales.len();
    let s = st(src)?;
    if s.len() == 0 {
        return Ok(());
    }
    let Q8Buffer { scales, codes, .. } = dst;
    let (scales, codes) = (st_mut(scales)?, st_mut(codes)?);
    let dev = s.dev.clone();
    let f = dev.function(&CODEC, "encode_q8_f32")?;
    let n = n64(s.len());
    let mut b = dev.stream.launch_builder(&f);
    b.arg(&s.slice)
        .arg(&mut codes.slice)
        .arg(&mut scales.slice)
        .arg(&n)
        .arg(&block);
    launch(b, dev.per_item_cfg(nblocks), "encode_q8_f32")
}

pub(crate) fn decode_q8(src: &Q8Buffer, dst: &mut Buffer<f32>, weight: Option<f32>) -> Result<()> {
    let block = block_u32(src.block_size)?;
    let (scales, codes) = (st(&src.scales)?, st(&src.codes)?);
    let d = st_mut(dst)?;
    if d.len() == 0 {
        return Ok(());
    }
    let dev = d.dev.clone();
    let f = dev.function(&CODEC, "decode_q8_f32")?;
    let n = n64(d.len());
    let (w, acc) = (weight.unwrap_or(1.0), i32::from(weight.is_some()));
    let mut b = dev.stream.launch_builder(&f);
    b.arg(&codes.slice)
        .arg(&scales.slice)
        .arg(&mut d.slice)
        .arg(&w)
        .arg(&acc)
        .arg(&n)
        .arg(&block);
    launch(b, dev.per_item_cfg(src.scales.len()), "decode_q8_f32")
}

pub(crate) fn sgd_step(
    params: &mut Buffer<f32>,
    grads: &Buffer<f32>,
    momentum: &mut Buffer<f32>,
    hp: &Sgd,
) -> Result<()> {
    let g = st(grads)?;
    let m = st_mut(momentum)?;
    let p = st_mut(params)?;
    if p.len() == 0 {
        return Ok(());
    }
    let dev = p.dev.clone();
    let cfg = dev.elementwise_cfg(p.len());
    let f = dev.function(&OPTIM, "sgd_f32")?;
    let (damp, nesterov, n) = (1.0 - hp.dampening, i32::from(hp.nesterov), n64(p.len()));
    let mut b = dev.stream.launch_builder(&f);
    b.arg(&mut p.slice).arg(&g.slice).arg(&mut m.slice);
    b.arg(&hp.lr)
        .arg(&hp.momentum)
        .arg(&damp)
        .arg(&hp.weight_decay)
        .arg(&nesterov)
        .arg(&n);
    launch(b, cfg, "sgd_f32")
}

pub(crate) fn adamw_step(
    params: &mut Buffer<f32>,
    grads: &Buffer<f32>,
    exp_avg: &mut Buffer<f32>,
    exp_avg_sq: &mut Buffer<f32>,
    hp: &AdamW,
    step: u64,
) -> Result<()> {
    let AdamScalars {
        step_size,
        inv_sqrt_bc2,
        ..
    } = adam_scalars("adamw_step", hp.lr, hp.beta1, hp.beta2, step)?;
    let g = st(grads)?;
    let m = st_mut(exp_avg)?;
    let v = st_mut(exp_avg_sq)?;
    let p = st_mut(params)?;
    if p.len() == 0 {
        return Ok(());
    }
    let dev = p.dev.clone();
    let cfg = dev.elementwise_cfg(p.len());
    let f = dev.function(&OPTIM, "adamw_f32")?;
    let (decay, n) = (1.0 - hp.lr * hp.weight_decay, n64(p.len()));
    let mut b = dev.stream.launch_builder(&f);
    b.arg(&mut p.slice)
        .arg(&g.slice)
        .arg(&mut m.slice)
        .arg(&mut v.slice);
    b.arg(&decay)
        .arg(&hp.beta1)
        .arg(&hp.beta2)
        .arg(&step_size)
        .arg(&inv_sqrt_bc2)
        .arg(&hp.eps)
        .arg(&n);
    launch(b, cfg, "adamw_f32")
}

/// Elements per LAMB work item (one thread block each).
const LAMB_CHUNK: usize = 4096;

pub(crate) fn lamb_step(
    params: &mut Buffer<f32>,
    grads: &Buffer<f32>,
    exp_avg: &mut Buffer<f32>,
    exp_avg_sq: &mut Buffer<f32>,
    layout: &Layout,
    hp: &Lamb,
    step: u64,
) -> Result<()> {
    let AdamScalars {
        inv_bc1,
        inv_sqrt_bc2,
        ..
    } = adam_scalars("lamb_step", hp.lr, hp.beta1, hp.beta2, step)?;
    let mut chunks: Vec<u64> =
        Vec::with_capacity(3 * (layout.total_len() / LAMB_CHUNK + layout.num_tensors()));
    for (t, e) in layout.tensors().iter().enumerate() {
        let mut start = e.offset();
        while start < e.range().end {
            let len = LAMB_CHUNK.min(e.range().end - start);
            chunks.extend([t as u64, start as u64, len as u64]);
            start += len;
        }
    }
    let nchunks = chunks.len() / 3;
    if nchunks == 0 {
        return Ok(());
    }
    let nchunks_u32 = u32::try_from(nchunks).map_err(|_| KernelError::LayoutMismatch {
        op: "lamb_step",
        expected: u32::MAX as usize,
        actual: nchunks,
    })?;
    let g = st(grads)?;
    let m = st_mut(exp_avg)?;
    let v = st_mut(exp_avg_sq)?;
    let p = st_mut(params)?;
    let dev = p.dev.clone();
    let stream = &dev.stream;
    let table = stream
        .clone_htod(&chunks)
        .map_err(driver_err("uploading the chunk table"))?;
    let mut norms = stream
        .alloc_zeros::<f64>(2 * layout.num_tensors())
        .map_err(driver_err("allocating"))?;
    let cfg = dev.per_item_cfg(nchunks);
    let (b1, b2, eps, wd) = (hp.beta1, hp.beta2, hp.eps, hp.weight_decay);

    let f = dev.function(&OPTIM, "lamb_moments_f32")?;
    let mut b = stream.launch_builder(&f);
    b.arg(&p.slice)
        .arg(&g.slice)
        .arg(&mut m.slice)
        .arg(&mut v.slice)
        .arg(&table)
        .arg(&nchunks_u32);
    b.arg(&b1)
        .arg(&b2)
        .arg(&inv_bc1)
        .arg(&inv_sqrt_bc2)
        .arg(&eps)
        .arg(&wd)
        .arg(&mut norms);
    launch(b, cfg, "lamb_moments_f32")?;

    let f = dev.function(&OPTIM, "lamb_apply_f32")?;
    let mut b = stream.launch_builder(&f);
    b.arg(&mut p.slice)
        .arg(&m.slice)
        .arg(&v.slice)
        .arg(&table)
        .arg(&nchunks_u32)
        .arg(&norms);
    b.arg(&hp.lr)
        .arg(&hp.max_trust_ratio)
        .arg(&inv_bc1)
        .arg(&inv_sqrt_bc2)
        .arg(&eps)
        .arg(&wd);
    launch(b, cfg, "lamb_apply_f32")
}
