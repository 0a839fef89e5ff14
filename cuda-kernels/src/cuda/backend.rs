//! Contexts, module cache and device storage (feature `cuda`).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, OnceLock},
};

use cudarc::{
    driver::{
        CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DriverError, LaunchConfig,
        sys,
    },
    nvrtc::{self, CompileError, CompileOptions, Ptx},
};

use super::KernelSource;
use crate::{Element, KernelError, Result};

pub(crate) fn driver_err(context: &'static str) -> impl FnOnce(DriverError) -> KernelError {
    move |e| KernelError::Cuda {
        context,
        message: e.to_string(),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded maps are only ever inserted into whole, so a panic elsewhere
    // cannot leave them half-updated: recover from poisoning.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Checks that the CUDA driver and NVRTC libraries can be loaded.
///
/// # Errors
/// [`KernelError::CudaUnavailable`] naming the missing library.
pub fn libraries_present() -> Result<()> {
    // SAFETY: `is_culib_present` only dlopens the candidate library names and
    // drops the handles; loading libcuda runs nothing but its own initialisers.
    if !unsafe { sys::is_culib_present() } {
        return Err(KernelError::CudaUnavailable {
            reason: "the CUDA driver library (libcuda.so.1) is not on the loader path".into(),
        });
    }
    // SAFETY: as above, for libnvrtc.
    if !unsafe { nvrtc::sys::is_culib_present() } {
        return Err(KernelError::CudaUnavailable {
            reason: "the NVRTC library (libnvrtc.so.13) is not on the loader path; \
                     add its folder to LD_LIBRARY_PATH"
                .into(),
        });
    }
    Ok(())
}

/// Number of CUDA GPUs.
///
/// # Errors
/// [`KernelError::CudaUnavailable`] if the libraries are missing,
/// [`KernelError::Cuda`] if the driver fails to initialise.
pub fn device_count() -> Result<usize> {
    libraries_present()?;
    let n = CudaContext::device_count().map_err(driver_err("counting devices"))?;
    Ok(usize::try_from(n).unwrap_or(0))
}

/// True when at least one GPU can be used.
pub fn is_available() -> bool {
    matches!(device_count(), Ok(n) if n > 0)
}

/// Waits until every op queued on GPU `ordinal` has finished.
///
/// # Errors
/// As [`device_count`], or [`KernelError::Cuda`].
pub fn synchronize(ordinal: usize) -> Result<()> {
    device(ordinal)?
        .stream
        .synchronize()
        .map_err(driver_err("synchronize"))
}

/// Compiles one kernel file to PTX for `arch` (e.g. `"compute_90"`), and
/// checks that every function the crate launches is in it.
///
/// # Errors
/// [`KernelError::CudaUnavailable`] if NVRTC is missing,
/// [`KernelError::NvrtcCompile`] with the compiler log.
pub fn compile_ptx(source: &KernelSource, arch: &str) -> Result<String> {
    // SAFETY: see `libraries_present`.
    if !unsafe { nvrtc::sys::is_culib_present() } {
        return Err(KernelError::CudaUnavailable {
            reason: "the NVRTC library is not on the loader path".into(),
        });
    }
    let opts = CompileOptions {
        options: vec![format!("--gpu-architecture={arch}"), "--std=c++17".into()],
        name: Some(source.file.to_owned()),
        ..Default::default()
    };
    let ptx = nvrtc::compile_ptx_with_opts(source.source, opts).map_err(|e| {
        KernelError::NvrtcCompile {
            module: source.name,
            log: match e {
                CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
                other => format!("{other:?}"),
            },
        }
    })?;
    let text = ptx.to_src();
    for f in source.functions {
        if !text.contains(&format!(".entry {f}(")) {
            return Err(KernelError::NvrtcCompile {
                module: source.name,
                log: format!("kernel {f} is missing from the PTX"),
            });
        }
    }
    Ok(text)
}

/// One GPU: its context, the stream every op is queued on, and loaded modules.
pub(crate) struct CudaDev {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    arch: String,
    max_blocks: u32,
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
}

/// Initialised devices, by ordinal.
fn registry() -> &'static Mutex<HashMap<usize, Arc<CudaDev>>> {
    static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<CudaDev>>>> = OnceLock::new();
    DEVICES.get_or_init(Default::default)
}

/// The device with this ordinal, initialised on first use.
pub(crate) fn device(ordinal: usize) -> Result<Arc<CudaDev>> {
    let mut map = lock(registry());
    if let Some(d) = map.get(&ordinal) {
        return Ok(d.clone());
    }
    let count = device_count()?;
    if ordinal >= count {
        return Err(KernelError::CudaUnavailable {
            reason: format!("no GPU {ordinal} ({count} present)"),
        });
    }
    let ctx = CudaContext::new(ordinal).map_err(driver_err("creating a context"))?;
    let (major, minor) = ctx
        .compute_capability()
        .map_err(driver_err("reading the compute capability"))?;
    let sms = ctx
        .attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(driver_err("reading the SM count"))?;
    let dev = Arc::new(CudaDev {
        ordinal,
        stream: ctx.default_stream(),
        ctx,
        arch: format!("compute_{major}{minor}"),
        max_blocks: u32::try_from(sms.max(1)).unwrap_or(1).saturating_mul(16),
        modules: Mutex::new(HashMap::new()),
    });
    tracing::debug!(ordinal, arch = %dev.arch, sms, "CUDA device initialised");
    map.insert(ordinal, dev.clone());
    Ok(dev)
}

/// Threads per block of every launch.
pub(crate) const THREADS: u32 = 256;

impl CudaDev {
    /// Looks a kernel up, compiling and loading its module on first use.
    pub(crate) fn function(
        &self,
        source: &KernelSource,
        name: &'static str,
    ) -> Result<CudaFunction> {
        let module = {
            let mut modules = lock(&self.modules);
            match modules.get(source.name) {
                Some(m) => m.clone(),
                None => {
                    let ptx = compile_ptx(source, &self.arch)?;
                    tracing::debug!(module = source.name, arch = %self.arch, "compiled CUDA module");
                    let m = self
                        .ctx
                        .load_module(Ptx::from_src(ptx))
                        .map_err(driver_err("loading a module"))?;
                    modules.insert(source.name, m.clone());
                    m
                }
            }
        };
        module
            .load_function(name)
            .map_err(driver_err("looking up a kernel"))
    }

    /// A launch covering `n` elements with a grid-stride loop.
    pub(crate) fn elementwise_cfg(&self, n: usize) -> LaunchConfig {
        let blocks = n
            .div_ceil(THREADS as usize)
            .clamp(1, self.max_blocks as usize);
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// A launch with one thread block per work item (`items` of them).
    pub(crate) fn per_item_cfg(&self, items: usize) -> LaunchConfig {
        let blocks = items.clamp(1, self.max_blocks as usize * 4);
        LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    pub(crate) fn alloc_zeros<T: Element>(self: &Arc<Self>, len: usize) -> Result<CudaStorage<T>> {
        let slice = if len == 0 {
            self.stream.null()
        } else {
            self.stream.alloc_zeros::<T>(len)
        }
        .map_err(driver_err("allocating"))?;
        Ok(CudaStorage {
            slice,
            dev: self.clone(),
        })
    }

    pub(crate) fn upload<T: Element>(self: &Arc<Self>, data: &[T]) -> Result<CudaStorage<T>> {
        let slice = if data.is_empty() {
            self.stream.null()
        } else {
            self.stream.clone_htod(data)
        }
        .map_err(driver_err("uploading"))?;
        Ok(CudaStorage {
            slice,
            dev: self.clone(),
        })
    }
}

/// A buffer's memory on one GPU.
pub(crate) struct CudaStorage<T: Element> {
    pub(crate) slice: CudaSlice<T>,
    pub(crate) dev: Arc<CudaDev>,
}

impl<T: Element> CudaStorage<T> {
    pub(crate) fn ordinal(&self) -> usize {
        self.dev.ordinal
    }
    pub(crate) fn len(&self) -> usize {
        self.slice.len()
    }
    pub(crate) fn download(&self) -> Result<Vec<T>> {
        if self.slice.is_empty() {
            return Ok(Vec::new());
        }
        self.dev
            .stream
            .clone_dtoh(&self.slice)
            .map_err(driver_err("downloading"))
    }
    pub(crate) fn overwrite(&mut self, src: &[T]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        self.dev
            .stream
            .memcpy_htod(src, &mut self.slice)
            .map_err(driver_err("uploading"))
    }
    pub(crate) fn try_clone(&self) -> Result<Self> {
        let slice = if self.slice.is_empty() {
            self.dev.stream.null()
        } else {
            self.dev.stream.clone_dtod(&self.slice)
        }
        .map_err(driver_err("copying on the device"))?;
        Ok(Self {
            slice,
            dev: self.dev.clone(),
        })
    }
}
