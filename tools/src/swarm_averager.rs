//! The averaging layer used by `colony train`: builds the [`SwarmAverager`] for a peer.

use colony_dht::Dht;
use colony_optim::{OptimConfig, OptimError, PeerState, Result, SwarmAverager};

/// A peer without an averaging layer: every round fails, so the optimizer steps on local
/// gradients. Used until `colony-averaging` provides `DecentralizedAverager`.
#[derive(Debug)]
pub(crate) struct NoAveraging;

impl SwarmAverager for NoAveraging {
    async fn average(
        &mut self,
        _: &mut [f32],
        _: f64,
        _: u64,
        _: std::time::Duration,
    ) -> Result<usize> {
        Err(OptimError::Averaging {
            operation: "average",
            message: "no averaging layer".into(),
        })
    }
    async fn assist(&mut self, _: usize, _: u64, _: std::time::Duration) -> Result<usize> {
        Err(OptimError::Averaging {
            operation: "assist",
            message: "no averaging layer".into(),
        })
    }
    async fn share_state(&mut self, _: PeerState) -> Result<()> {
        Ok(())
    }
    async fn load_state(&mut self, _: std::time::Duration) -> Result<Option<PeerState>> {
        Ok(None)
    }
    async fn shutdown(&mut self) {}
}

/// Builds this peer's averager.
pub(crate) async fn build(_dht: &Dht, _config: &OptimConfig) -> anyhow::Result<NoAveraging> {
    Ok(NoAveraging)
}
