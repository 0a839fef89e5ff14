//! The state server (serves this peer's tensors to late joiners) and the
//! download side of [`DecentralizedAverager::load_state_from_peers`].

use std::time::Duration;

use colony_dht::{DhtValue, PeerId, Stream};
use rand::seq::SliceRandom;
use tokio_util::compat::FuturesAsyncReadCompatExt;

use super::{DecentralizedAverager, Inner, state_protocol};
use crate::{
    error::{AveragingError, Result},
    state::{SharedState, download_from_donors, serve_state},
};

impl DecentralizedAverager {
    /// Download state from the best donor (highest priority first, falling back
    /// to the next on any failure), verify it (layout, finiteness, SHA-256) and
    /// install the tensors. Returns the donor's metadata.
    ///
    /// # Errors
    /// [`AveragingError::NoStateDonor`] when no donor delivered valid state.
    pub async fn load_state_from_peers(&self, timeout: Duration) -> Result<Vec<u8>> {
        let inner = &self.inner;
        let found = tokio::time::timeout(
            timeout,
            inner.dht.get_within(&inner.donor.key, true, timeout),
        )
        .await
        .map_err(|_| AveragingError::NoStateDonor { tried: 0 })?
        .map_err(AveragingError::dht("finding state donors"))?;
        let mut donors: Vec<(PeerId, f64)> = Vec::new();
        if let Some(DhtValue::Dictionary(d)) = found {
            for v in d.values() {
                let Ok((peer, priority)) =
                    rmp_serde::from_slice::<(serde_bytes::ByteBuf, f64)>(&v.value)
                else {
                    continue;
                };
                let Ok(peer) = PeerId::from_bytes(&peer) else {
                    continue;
                };
                if peer.to_bytes() != inner.peer_id && priority.is_finite() {
                    donors.push((peer, priority));
                }
            }
        }
        donors.shuffle(&mut rand::thread_rng());
        donors.sort_by(|a, b| b.1.total_cmp(&a.1));
        let protocol = state_protocol(&inner.cfg.prefix)?;
        let chunk_timeout = inner.cfg.allreduce.sender_timeout;
        let lengths = inner.layout.lengths().to_vec();
        let dht = inner.dht.clone();
        let donors_ref = &donors;
        let (_, state) = tokio::time::timeout(
            timeout,
            download_from_donors(
                donors.len(),
                |i| {
                    let dht = dht.clone();
                    let protocol = protocol.clone();
                    async move {
                        let s = dht
                            .open_stream(donors_ref[i].0, protocol)
                            .await
                            .map_err(AveragingError::dht("opening a state stream"))?;
                        Ok(s.compat())
                    }
                },
                Some(&lengths),
                chunk_timeout,
            ),
        )
        .await
        .map_err(|_| AveragingError::NoStateDonor {
            tried: donors.len(),
        })??;
        *inner.tensors.lock().await = state.tensors;
        Ok(state.metadata)
    }
}

pub(super) async fn accept_state_requests(
    inner: std::sync::Weak<Inner>,
    mut rx: tokio::sync::mpsc::Receiver<(PeerId, Stream)>,
) {
    while let Some((peer, stream)) = rx.recv().await {
        let Some(inner) = inner.upgrade() else { return };
        tokio::spawn(async move {
            let state = SharedState {
                metadata: inner
                    .state_metadata
                    .lock()
                    .map(|m| m.clone())
                    .unwrap_or_default(),
                tensors: inner.tensors.lock().await.clone(),
            };
            let mut s = stream.compat();
            if let Err(e) = serve_state(&mut s, &state, inner.cfg.allreduce.sender_timeout).await {
                tracing::debug!(%peer, error = %e, "serving state failed");
            }
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut s).await;
        });
    }
}
