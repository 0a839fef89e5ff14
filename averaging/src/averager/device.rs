//! Averaging buffers that live on any `colony-kernels` device (CPU or CUDA).
//!
//! The all-reduce itself is host work: parts are sealed, sent, reduced and
//! opened by the CPU, and over the internet the network, not PCIe, is the
//! bottleneck. Device buffers are therefore staged through the averager's host
//! tensors: downloaded before the round, and uploaded back only when the round
//! succeeded, so a failed or cancelled round leaves the device buffers exactly as
//! they were.

use std::time::Duration;

use colony_kernels::Buffer;

use crate::{
    averager::{DecentralizedAverager, StepOutcome},
    error::{AveragingError, Result},
};

impl DecentralizedAverager {
    /// [`DecentralizedAverager::step`] over `buffers`, which may live on any
    /// device (one per tensor of the averager's layout, in order): their
    /// values replace the averager's tensors, a round averages them, and on
    /// success the averaged values are written back to `buffers`.
    ///
    /// # Errors
    /// [`AveragingError::LayoutMismatch`] when `buffers` do not match the
    /// layout; [`AveragingError::Device`] when a download or upload fails; the
    /// errors of [`DecentralizedAverager::step`] (then `buffers` are
    /// unchanged).
    ///
    /// # Cancel safety
    /// Cancelling before the round finished leaves `buffers` unchanged.
    pub async fn step_buffers(
        &self,
        buffers: &mut [Buffer<f32>],
        weight: Option<f32>,
        timeout: Duration,
    ) -> Result<StepOutcome> {
        self.stage_in(buffers).await?;
        let outcome = self.step(weight, timeout).await?;
        let host = self.tensors().await;
        for (b, h) in buffers.iter_mut().zip(host.iter()) {
            b.copy_from_slice(h)
                .map_err(device_error("uploading averaged values"))?;
        }
        Ok(outcome)
    }

    /// Copy `buffers` (any device) into the averager's tensors, for example
    /// before [`DecentralizedAverager::declare_state`] or a round driven
    /// elsewhere.
    ///
    /// # Errors
    /// As [`DecentralizedAverager::step_buffers`], before the round.
    pub async fn stage_in(&self, buffers: &[Buffer<f32>]) -> Result<()> {
        let lengths = self.layout().lengths();
        let got: usize = buffers.iter().map(Buffer::len).sum();
        if buffers.len() != lengths.len() || buffers.iter().zip(lengths).any(|(b, l)| b.len() != *l)
        {
            return Err(AveragingError::LayoutMismatch {
                expected: self.layout().total(),
                got,
            });
        }
        let mut host = self.tensors().await;
        for (h, b) in host.iter_mut().zip(buffers) {
            match b.as_slice() {
                Ok(values) => h.copy_from_slice(values),
                Err(_) => *h = b.to_vec().map_err(device_error("downloading a buffer"))?,
            }
        }
        Ok(())
    }

    /// Copy the averager's tensors into `buffers` (any device), for example
    /// after [`DecentralizedAverager::load_state_from_peers`].
    ///
    /// # Errors
    /// [`AveragingError::LayoutMismatch`] or [`AveragingError::Device`].
    pub async fn stage_out(&self, buffers: &mut [Buffer<f32>]) -> Result<()> {
        let host = self.tensors().await;
        let got: usize = buffers.iter().map(Buffer::len).sum();
        if buffers.len() != host.len()
            || buffers
                .iter()
                .zip(host.iter())
                .any(|(b, h)| b.len() != h.len())
        {
            return Err(AveragingError::LayoutMismatch {
                expected: self.layout().total(),
                got,
            });
        }
        for (b, h) in buffers.iter_mut().zip(host.iter()) {
            b.copy_from_slice(h)
                .map_err(device_error("uploading tensors"))?;
        }
        Ok(())
    }
}

fn device_error(context: &'static str) -> impl Fn(colony_kernels::KernelError) -> AveragingError {
    move |source| AveragingError::Device { context, source }
}
