//! The CUDA path: device discovery, NVRTC-compiled kernel modules, device storage.
//!
//! Built only with the `cuda` feature. cudarc loads `libcuda.so` and
//! `libnvrtc.so` at run time (`dynamic-loading`), so the crate builds on
//! machines with no CUDA toolkit; before the first driver call this module
//! checks that both libraries can be loaded and returns
//! [`KernelError::CudaUnavailable`](crate::KernelError::CudaUnavailable)
//! otherwise (cudarc itself would panic). Kernels are compiled from the
//! embedded `.cu` sources ([`KERNEL_SOURCES`]) for the GPU's own compute
//! capability on first use, and cached per device.
//!
//! Without the feature the same functions exist and return
//! [`KernelError::NotCompiledWithCuda`](crate::KernelError::NotCompiledWithCuda).

mod sources;
pub use sources::{KERNEL_SOURCES, KernelSource};

#[cfg(feature = "cuda")]
mod backend;
#[cfg(feature = "cuda")]
pub(crate) mod ops;
#[cfg(feature = "cuda")]
pub(crate) use backend::{CudaStorage, device};
#[cfg(feature = "cuda")]
pub use backend::{compile_ptx, device_count, is_available, libraries_present, synchronize};

#[cfg(not(feature = "cuda"))]
mod stub;
#[cfg(not(feature = "cuda"))]
pub(crate) use stub::stub_ops;
#[cfg(not(feature = "cuda"))]
pub use stub::{device_count, is_available, synchronize};
