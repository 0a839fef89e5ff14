//! What the optimizer needs from the averaging layer: the [`SwarmAverager`] trait.

use std::{future::Future, time::Duration};

use crate::error::Result;

/// A peer's training state as shared with late joiners and stragglers.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerState {
    /// The donor's local step.
    pub step: u64,
    /// Its parameters, flat.
    pub params: Vec<f32>,
    /// Its local optimizer state, flat.
    pub optimizer_state: Vec<f32>,
}

/// How a peer takes part in averaging.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AveragingRole {
    /// Sends its tensors and reduces a slice.
    Node,
    /// Sends its tensors and receives results, reduces nothing (no inbound connections).
    Client,
    /// Reduces only, weight 0, gets no results.
    Auxiliary,
}

/// The averaging layer as the optimizer uses it: one weighted all-reduce per global step
/// over one flat buffer, and state sharing.
///
/// `colony-averaging`'s `DecentralizedAverager` is adapted to this trait; tests use
/// in-process implementations.
pub trait SwarmAverager: Send + 'static {
    /// Averages `tensors` in place with the peers that reached step `step`, weighting this
    /// peer by `weight`. Returns the group size (1 when no group formed is an error, not a
    /// success). On error `tensors` must be left as they were.
    fn average(
        &mut self,
        tensors: &mut [f32],
        weight: f64,
        step: u64,
        timeout: Duration,
    ) -> impl Future<Output = Result<usize>> + Send;

    /// Joins the round of step `step` as an auxiliary peer (reduces without contributing)
    /// for tensors of `len` values. Returns the group size.
    fn assist(
        &mut self,
        len: usize,
        step: u64,
        timeout: Duration,
    ) -> impl Future<Output = Result<usize>> + Send;

    /// Makes `state` downloadable by other peers (replacing the previous one).
    fn share_state(&mut self, state: PeerState) -> impl Future<Output = Result<()>> + Send;

    /// Downloads the most advanced state a peer offers, `None` if nobody offers one.
    fn load_state(
        &mut self,
        timeout: Duration,
    ) -> impl Future<Output = Result<Option<PeerState>>> + Send;

    /// Stops taking part in averaging and state sharing.
    fn shutdown(&mut self) -> impl Future<Output = ()> + Send;
}
