//! Flat, device-resident buffers.

use std::fmt;

use half::f16;

use crate::{Device, KernelError, Result};

mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    impl Sealed for half::f16 {}
    impl Sealed for half::bf16 {}
    impl Sealed for i8 {}
}

/// Element types a [`Buffer`] can hold: `f32` (parameters, gradients, state),
/// `f16` and `bf16` (the 16-bit codecs) and `i8` (8-bit codes).
#[cfg(feature = "cuda")]
pub trait Element:
    sealed::Sealed
    + Copy
    + Default
    + fmt::Debug
    + Send
    + Sync
    + 'static
    + cudarc::driver::DeviceRepr
    + cudarc::driver::ValidAsZeroBits
{
}

/// Element types a [`Buffer`] can hold: `f32` (parameters, gradients, state),
/// `f16` and `bf16` (the 16-bit codecs) and `i8` (8-bit codes).
#[cfg(not(feature = "cuda"))]
pub trait Element: sealed::Sealed + Copy + Default + fmt::Debug + Send + Sync + 'static {}

impl Element for f32 {}
impl Element for f16 {}
impl Element for half::bf16 {}
impl Element for i8 {}

pub(crate) enum Storage<T: Element> {
    Host(Vec<T>),
    #[cfg(feature = "cuda")]
    Cuda(crate::cuda::CudaStorage<T>),
}

/// A flat array of `T` on one [`Device`]: a whole model's parameters,
/// gradients or optimizer state (with a [`Layout`](crate::Layout) naming the
/// tensors inside), or an encoded form of one.
///
/// Ops take buffers by reference and run where the buffers live; mixing
/// devices in one op is a [`KernelError::DeviceMismatch`].
pub struct Buffer<T: Element> {
    pub(crate) storage: Storage<T>,
}

impl<T: Element> fmt::Debug for Buffer<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Buffer")
            .field("device", &self.device())
            .field("len", &self.len())
            .field("dtype", &std::any::type_name::<T>())
            .finish()
    }
}

impl<T: Element> Buffer<T> {
    /// A zero-filled buffer of `len` elements on `device`.
    ///
    /// # Errors
    /// For CUDA devices: [`KernelError::NotCompiledWithCuda`],
    /// [`KernelError::CudaUnavailable`] or [`KernelError::Cuda`].
    pub fn zeros(len: usize, device: Device) -> Result<Self> {
        let storage = match device {
            Device::Cpu => Storage::Host(vec![T::default(); len]),
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => Storage::Cuda(crate::cuda::device(n)?.alloc_zeros(len)?),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => return Err(KernelError::NotCompiledWithCuda),
        };
        Ok(Self { storage })
    }

    /// Copies `data` into a new buffer on `device`.
    ///
    /// # Errors
    /// As [`Buffer::zeros`].
    pub fn from_slice(data: &[T], device: Device) -> Result<Self> {
        let storage = match device {
            Device::Cpu => Storage::Host(data.to_vec()),
            #[cfg(feature = "cuda")]
            Device::Cuda(n) => Storage::Cuda(crate::cuda::device(n)?.upload(data)?),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda(_) => return Err(KernelError::NotCompiledWithCuda),
        };
        Ok(Self { storage })
    }

    /// Wraps a host vector without copying.
    pub fn from_vec(data: Vec<T>) -> Self {
        Self {
            storage: Storage::Host(data),
        }
    }

    /// Where the buffer lives.
    pub fn device(&self) -> Device {
        match &self.storage {
            Storage::Host(_) => Device::Cpu,
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => Device::Cuda(s.ordinal()),
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match &self.storage {
            Storage::Host(v) => v.len(),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => s.len(),
        }
    }

    /// True when the buffer has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The elements, for a host buffer.
    ///
    /// # Errors
    /// [`KernelError::NotOnHost`] for a GPU buffer.
    pub fn as_slice(&self) -> Result<&[T]> {
        match &self.storage {
            Storage::Host(v) => Ok(v),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => Err(KernelError::NotOnHost {
                device: Device::Cuda(s.ordinal()),
            }),
        }
    }

    /// The elements, mutably, for a host buffer.
    ///
    /// # Errors
    /// [`KernelError::NotOnHost`] for a GPU buffer.
    pub fn as_mut_slice(&mut self) -> Result<&mut [T]> {
        match &mut self.storage {
            Storage::Host(v) => Ok(v),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => Err(KernelError::NotOnHost {
                device: Device::Cuda(s.ordinal()),
            }),
        }
    }

    /// Copies the elements to a host vector (waits for pending GPU work).
    ///
    /// # Errors
    /// [`KernelError::Cuda`] if the download fails.
    pub fn to_vec(&self) -> Result<Vec<T>> {
        match &self.storage {
            Storage::Host(v) => Ok(v.clone()),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => s.download(),
        }
    }

    /// Overwrites the buffer with `src` (an upload for GPU buffers).
    ///
    /// # Errors
    /// [`KernelError::LengthMismatch`], or [`KernelError::Cuda`] if the upload fails.
    pub fn copy_from_slice(&mut self, src: &[T]) -> Result<()> {
        crate::error::check_len("copy_from_slice", "src", self.len(), src.len())?;
        match &mut self.storage {
            Storage::Host(v) => {
                v.copy_from_slice(src);
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => s.overwrite(src),
        }
    }

    /// A copy of this buffer on `device`.
    ///
    /// # Errors
    /// As [`Buffer::zeros`] and [`Buffer::to_vec`].
    pub fn to_device(&self, device: Device) -> Result<Self> {
        match &self.storage {
            Storage::Host(v) => Self::from_slice(v, device),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) if device == Device::Cuda(s.ordinal()) => Ok(Self {
                storage: Storage::Cuda(s.try_clone()?),
            }),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => Self::from_slice(&s.download()?, device),
        }
    }

    pub(crate) fn host(&self) -> Result<&[T]> {
        self.as_slice()
    }

    pub(crate) fn host_mut(&mut self) -> Result<&mut [T]> {
        self.as_mut_slice()
    }
}

/// A blockwise 8-bit encoding of `len` `f32` values on one device: one scale
/// per block and one signed code per value (see [`cpu::q8`](crate::cpu::q8)
/// for the codec and its error bound).
#[derive(Debug)]
pub struct Q8Buffer {
    pub(crate) scales: Buffer<f32>,
    pub(crate) codes: Buffer<i8>,
    pub(crate) block_size: usize,
}

impl Q8Buffer {
    /// An all-zero encoding of `len` values.
    ///
    /// # Errors
    /// [`KernelError::InvalidBlockSize`], or as [`Buffer::zeros`].
    pub fn zeros(len: usize, block_size: usize, device: Device) -> Result<Self> {
        crate::cpu::q8::check_block(block_size)?;
        Ok(Self {
            scales: Buffer::zeros(crate::cpu::q8::num_blocks(len, block_size), device)?,
            codes: Buffer::zeros(len, device)?,
            block_size,
        })
    }
    /// Number of encoded values.
    pub fn len(&self) -> usize {
        self.codes.len()
    }
    /// True when no values are encoded.
    pub fn is_empty(&self) -> bool {
        self.codes.is_empty()
    }
    /// Values per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }
    /// Where the encoding lives.
    pub fn device(&self) -> Device {
        self.codes.device()
    }
    /// Per-block scales (`absmax / 127`, NaN for a block with non-finite input).
    pub fn scales(&self) -> &Buffer<f32> {
        &self.scales
    }
    /// One code per value.
    pub fn codes(&self) -> &Buffer<i8> {
        &self.codes
    }
    /// The wire form ([`cpu::q8::encode`](crate::cpu::q8::encode)'s format), copied to the host.
    ///
    /// # Errors
    /// [`KernelError::Cuda`] if a download fails.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let scales = self.scales.to_vec()?;
        let codes = self.codes.to_vec()?;
        let mut out = Vec::with_capacity(4 * scales.len() + codes.len());
        for s in scales {
            out.extend_from_slice(&s.to_le_bytes());
        }
        out.extend_from_slice(bytemuck::cast_slice(&codes));
        Ok(out)
    }
}
