//! The state server (serves this peer's tensors to late joiners) and the
//! download side of [`DecentralizedAverager::load_state_from_peers`].

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use colony_dht::{DhtValue, PeerId, Stream};
use rand::seq::SliceRandom;
use tokio::sync::Semaphore;
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
        *inner.lock_tensors().await = state.tensors;
        Ok(state.metadata)
    }
}

/// Most state requests served at once; one more is refused (the joiner
/// tries its next donor). Every one in flight shares one snapshot.
pub const MAX_STATE_REQUESTS: usize = 4;

impl Inner {
    /// The state as it is now, shared by the requests served at once while
    /// the tensors and the metadata stay as they are: N slow readers hold
    /// one copy, not N, and none is kept once the last of them is done.
    async fn state_snapshot(&self) -> Arc<SharedState> {
        // Held across the copy, so requests arriving together share it.
        let mut cached = self.snapshot.lock().await;
        let generation = self.state_generation.load(Ordering::Acquire);
        if cached.0 == generation
            && let Some(snapshot) = cached.1.upgrade()
        {
            return snapshot;
        }
        let tensors = self.tensors.lock().await.clone();
        let snapshot = Arc::new(SharedState {
            metadata: self
                .state_metadata
                .lock()
                .map(|m| m.clone())
                .unwrap_or_default(),
            tensors,
        });
        *cached = (generation, Arc::downgrade(&snapshot));
        snapshot
    }
}

pub(super) async fn accept_state_requests(
    inner: std::sync::Weak<Inner>,
    mut rx: tokio::sync::mpsc::Receiver<(PeerId, Stream)>,
) {
    let permits = Arc::new(Semaphore::new(MAX_STATE_REQUESTS));
    while let Some((peer, stream)) = rx.recv().await {
        let Some(inner) = inner.upgrade() else { return };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!(%peer, limit = MAX_STATE_REQUESTS, "refusing a state request: serving the most at once");
            drop(stream);
            continue;
        };
        tokio::spawn(async move {
            let _permit = permit;
            let state = inner.state_snapshot().await;
            // The copy goes when the last request reading it is done.
            let mut s = stream.compat();
            if let Err(e) = serve_state(&mut s, &state, inner.cfg.allreduce.sender_timeout).await {
                tracing::debug!(%peer, error = %e, "serving state failed");
            }
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut s).await;
        });
    }
}
