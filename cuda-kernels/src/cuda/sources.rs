//! The kernel sources (`kernels/*.cu`), embedded, with the functions each defines.

/// One `.cu` file: compiled by NVRTC into one module.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    /// Module name (the file stem).
    pub name: &'static str,
    /// File name under `kernels/`.
    pub file: &'static str,
    /// CUDA C source.
    pub source: &'static str,
    /// `extern "C"` kernels the module must export.
    pub functions: &'static [&'static str],
}

/// Every kernel file of the crate. `scripts/nvrtc-check.sh` compiles each one
/// and checks that this list covers every `.cu` file in `kernels/`.
pub const KERNEL_SOURCES: &[KernelSource] = &[ELEMENTWISE, REDUCE, CODEC, OPTIM];

pub(crate) const ELEMENTWISE: KernelSource = KernelSource {
    name: "elementwise",
    file: "elementwise.cu",
    source: include_str!("../../kernels/elementwise.cu"),
    functions: &["accumulate_f32", "accumulate_checked_f32", "scale_f32"],
};

pub(crate) const REDUCE: KernelSource = KernelSource {
    name: "reduce",
    file: "reduce.cu",
    source: include_str!("../../kernels/reduce.cu"),
    functions: &["weighted_sum_f32", "all_finite_f32"],
};

pub(crate) const CODEC: KernelSource = KernelSource {
    name: "codec",
    file: "codec.cu",
    source: include_str!("../../kernels/codec.cu"),
    functions: &[
        "encode_f16",
        "decode_f16",
        "decode_acc_f16",
        "encode_bf16",
        "decode_bf16",
        "decode_acc_bf16",
        "encode_q8_f32",
        "decode_q8_f32",
    ],
};

pub(crate) const OPTIM: KernelSource = KernelSource {
    name: "optim",
    file: "optim.cu",
    source: include_str!("../../kernels/optim.cu"),
    functions: &["sgd_f32", "adamw_f32", "lamb_moments_f32", "lamb_apply_f32"],
};
