//! The state server (serves this peer's declared state to late joiners) and
//! the download side of [`DecentralizedAverager::load_state_from_peers`]:
//! which state to trust (the root most donors vouch for) and the parallel,
//! verified download from them (see [`crate::state`]).

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex as StdMutex},
    time::Duration,
};

use colony_dht::{DhtValue, PeerId};
use rand::seq::SliceRandom;
use tokio::sync::Semaphore;
use tokio_util::compat::FuturesAsyncReadCompatExt;

use super::{DecentralizedAverager, Inner, state_protocol};
use crate::{
    error::{AveragingError, Result},
    state::{DownloadLimits, DownloadReport, download_vouched, serve_requests},
};

/// Most state streams served at once; one more is refused (the joiner
/// downloads from its other donors). All of them read one shared copy.
pub const MAX_STATE_REQUESTS: usize = 8;
/// Most state streams one peer may hold open on this donor at once.
const MAX_STATE_REQUESTS_PER_PEER: usize = 2;

/// A donor's declaration, as read from the DHT.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Declared {
    pub(crate) peer: PeerId,
    pub(crate) priority: f64,
    pub(crate) root: [u8; 32],
}

/// The state a joiner chose to trust.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Vouched {
    pub(crate) priority: f64,
    pub(crate) root: [u8; 32],
    pub(crate) donors: Vec<PeerId>,
    /// Distinct donors declared (live), and how many had to vouch.
    pub(crate) live: usize,
    pub(crate) needed: usize,
}

/// The root to download among `declared`: vouched for by at least
/// `min(vouchers, a majority of the live donors)` distinct donors, priority
/// at most `max_priority`; the highest priority wins, then the most
/// vouchers. A donor's claim about its own state (priority, step, hash)
/// counts for nothing on its own.
///
/// # Errors
/// [`AveragingError::NoStateDonor`] (none tried) when no donor is declared,
/// [`AveragingError::NoVouchedState`] when no root qualifies.
pub(crate) fn choose_vouched(
    declared: &[Declared],
    vouchers: usize,
    max_priority: f64,
) -> Result<Vouched> {
    let live: BTreeSet<PeerId> = declared.iter().map(|d| d.peer).collect();
    if live.is_empty() {
        return Err(AveragingError::NoStateDonor { tried: 0 });
    }
    let needed = vouchers.min(live.len() / 2 + 1).max(1);
    let mut classes: HashMap<(u64, [u8; 32]), BTreeSet<PeerId>> = HashMap::new();
    for d in declared {
        if d.priority.is_finite() {
            classes
                .entry((d.priority.to_bits(), d.root))
                .or_default()
                .insert(d.peer);
        }
    }
    let best_vouchers = classes.values().map(BTreeSet::len).max().unwrap_or(0);
    classes
        .into_iter()
        .filter(|((p, _), peers)| f64::from_bits(*p) <= max_priority && peers.len() >= needed)
        .max_by(|((pa, ra), a), ((pb, rb), b)| {
            f64::from_bits(*pa)
                .total_cmp(&f64::from_bits(*pb))
                .then(a.len().cmp(&b.len()))
                .then(rb.cmp(ra))
        })
        .map(|((p, root), peers)| Vouched {
            priority: f64::from_bits(p),
            root,
            donors: peers.into_iter().collect(),
            live: live.len(),
            needed,
        })
        .ok_or(AveragingError::NoVouchedState {
            donors: live.len(),
            best_vouchers,
            needed,
        })
}

/// A state downloaded from peers and not installed yet.
#[derive(Debug, Clone, PartialEq)]
pub struct DownloadedState {
    /// The donors' metadata.
    pub metadata: Vec<u8>,
    /// The tensors, in this averager's layout.
    pub tensors: Vec<Vec<f32>>,
    /// The priority the donors declared it with (the optimizer's step).
    pub priority: f64,
    /// How many distinct donors vouched for it.
    pub vouchers: usize,
    /// Verified chunks per donor, and the donors dropped (with why).
    pub donors: Vec<(PeerId, usize)>,
}

impl DecentralizedAverager {
    /// Downloads the state that the most donors vouch for (see
    /// [`download_state_from_peers`](Self::download_state_from_peers), with
    /// no bound on the priority) and installs its tensors. Returns the
    /// donors' metadata.
    ///
    /// # Errors
    /// As [`download_state_from_peers`](Self::download_state_from_peers).
    pub async fn load_state_from_peers(&self, timeout: Duration) -> Result<Vec<u8>> {
        let state = self
            .download_state_from_peers(timeout, f64::INFINITY)
            .await?;
        self.install_state(state.tensors).await?;
        Ok(state.metadata)
    }

    /// Downloads a state from the donors declared under
    /// `{prefix}.all_averagers` without installing it: the root (hash of the
    /// state's descriptor) that enough distinct donors vouch for
    /// ([`AveragerConfig::state_vouchers`](crate::AveragerConfig::state_vouchers),
    /// or a majority of the live donors when fewer), at a priority of at
    /// most `max_priority` (the optimizer passes the swarm's step, so no
    /// donor can lure joiners with a higher one), fetched in parallel from
    /// up to [`state_max_donors`](crate::AveragerConfig::state_max_donors)
    /// of its vouchers with every chunk verified.
    /// This peer's tensors are untouched; [`install_state`](Self::install_state)
    /// installs the result once the caller accepts it.
    ///
    /// # Errors
    /// [`AveragingError::NoVouchedState`] when no root is vouched for
    /// enough; [`AveragingError::NoStateDonor`] when its donors failed.
    pub async fn download_state_from_peers(
        &self,
        timeout: Duration,
        max_priority: f64,
    ) -> Result<DownloadedState> {
        let inner = &self.inner;
        let started = tokio::time::Instant::now();
        let found = tokio::time::timeout(
            timeout,
            inner.dht.get_within(&inner.donor.key, true, timeout),
        )
        .await
        .map_err(|_| AveragingError::NoStateDonor { tried: 0 })?
        .map_err(AveragingError::dht("finding state donors"))?;
        let mut declared = Vec::new();
        if let Some(DhtValue::Dictionary(d)) = found {
            for v in d.values() {
                let Ok((peer, priority, root)) =
                    rmp_serde::from_slice::<(serde_bytes::ByteBuf, f64, serde_bytes::ByteBuf)>(
                        &v.value,
                    )
                else {
                    continue;
                };
                let (Ok(peer), Ok(root)) =
                    (PeerId::from_bytes(&peer), <[u8; 32]>::try_from(&root[..]))
                else {
                    continue;
                };
                if peer.to_bytes() != inner.peer_id {
                    declared.push(Declared {
                        peer,
                        priority,
                        root,
                    });
                }
            }
        }
        let vouched = choose_vouched(&declared, inner.cfg.state_vouchers, max_priority)?;
        tracing::info!(
            priority = vouched.priority,
            root = %hex_prefix(&vouched.root),
            vouchers = vouched.donors.len(),
            needed = vouched.needed,
            live = vouched.live,
            "downloading the vouched state"
        );
        let mut donors = vouched.donors.clone();
        donors.shuffle(&mut rand::thread_rng());
        donors.truncate(inner.cfg.state_max_donors);
        let protocol = state_protocol(&inner.cfg.prefix)?;
        let limits = DownloadLimits {
            request_timeout: inner.cfg.request_timeout,
            min_rate: inner.cfg.state_min_rate,
        };
        let lengths = inner.layout.lengths().to_vec();
        let dht = inner.dht.clone();
        let donors_ref = &donors;
        let left = timeout.saturating_sub(started.elapsed());
        let (state, report) = tokio::time::timeout(
            left,
            download_vouched(
                donors.len(),
                |i| {
                    let dht = dht.clone();
                    let protocol = protocol.clone();
                    async move {
                        let s = dht
                            .open_stream(donors_ref[i], protocol)
                            .await
                            .map_err(AveragingError::dht("opening a state stream"))?;
                        Ok(s.compat())
                    }
                },
                vouched.root,
                &lengths,
                limits,
            ),
        )
        .await
        .map_err(|_| AveragingError::NoStateDonor {
            tried: donors.len(),
        })??;
        log_dropped(&donors, &report);
        Ok(DownloadedState {
            metadata: state.metadata,
            tensors: state.tensors,
            priority: vouched.priority,
            vouchers: vouched.donors.len(),
            donors: donors
                .iter()
                .zip(&report.chunks)
                .map(|(p, n)| (*p, *n))
                .collect(),
        })
    }

    /// Installs downloaded tensors (they must have this averager's layout).
    ///
    /// # Errors
    /// [`AveragingError::InvalidConfig`] for another layout.
    pub async fn install_state(&self, tensors: Vec<Vec<f32>>) -> Result<()> {
        let lengths = self.inner.layout.lengths();
        if tensors.len() != lengths.len() || tensors.iter().zip(lengths).any(|(t, &n)| t.len() != n)
        {
            return Err(AveragingError::InvalidConfig {
                field: "install_state",
                reason: "tensors do not have this averager's layout".into(),
            });
        }
        *self.inner.tensors.lock().await = tensors;
        Ok(())
    }
}

fn log_dropped(donors: &[PeerId], report: &DownloadReport) {
    for (i, fault) in &report.dropped {
        if let Some(peer) = donors.get(*i) {
            tracing::warn!(%peer, %fault, "state donor dropped during the download");
        }
    }
}

fn hex_prefix(root: &[u8; 32]) -> String {
    root[..6].iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) async fn accept_state_requests(
    inner: std::sync::Weak<Inner>,
    mut rx: colony_dht::InboundStreamQueue,
) {
    let permits = Arc::new(Semaphore::new(MAX_STATE_REQUESTS));
    let per_peer: Arc<StdMutex<HashMap<PeerId, usize>>> = Arc::default();
    while let Some((peer, stream)) = rx.recv().await {
        let Some(inner) = inner.upgrade() else { return };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            tracing::debug!(%peer, limit = MAX_STATE_REQUESTS, "refusing a state stream: serving the most at once");
            continue;
        };
        {
            let mut open = per_peer
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let n = open.entry(peer).or_default();
            if *n >= MAX_STATE_REQUESTS_PER_PEER {
                tracing::debug!(%peer, limit = MAX_STATE_REQUESTS_PER_PEER, "refusing a state stream: the peer holds the most at once");
                continue;
            }
            *n += 1;
        }
        let per_peer = per_peer.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let mut s = stream.compat();
            let find = |root: &[u8; 32]| {
                inner
                    .served
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .find(root)
            };
            let t = inner.cfg.allreduce.sender_timeout;
            if let Err(e) = serve_requests(&mut s, find, inner.cfg.request_timeout.max(t), t).await
            {
                tracing::debug!(%peer, error = %e, "serving state failed");
            }
            let _ = tokio::io::AsyncWriteExt::shutdown(&mut s).await;
            let mut open = per_peer
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(n) = open.get_mut(&peer) {
                *n -= 1;
                if *n == 0 {
                    open.remove(&peer);
                }
            }
        });
    }
}
