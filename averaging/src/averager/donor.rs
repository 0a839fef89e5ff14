//! The state donor: this peer's `{prefix}.all_averagers` declaration, kept
//! alive by a background task and withdrawn on request or shutdown.

use std::{
    sync::{Arc, Mutex as StdMutex},
    time::Duration,
};

use colony_dht::{Dht, dht_time};
use tokio::sync::{Mutex, watch};

use super::DecentralizedAverager;
use crate::{
    error::{AveragingError, Result},
    state::{ServedState, SharedState},
};

fn keep_root(command: DonorCommand) -> [u8; 32] {
    match command {
        DonorCommand::Keep { root, .. } => root,
        DonorCommand::Idle | DonorCommand::Stop | DonorCommand::Abandon => [0; 32],
    }
}

/// What the state-donor task keeps in the DHT.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum DonorCommand {
    /// Nothing declared.
    Idle,
    /// Keep `priority` and the state's `root` declared; each declaration
    /// lives `ttl` seconds.
    Keep {
        priority: f64,
        root: [u8; 32],
        ttl: f64,
    },
    /// Withdraw the declaration and stop.
    Stop,
    /// Stop without withdrawing: the declaration is not this node's to
    /// withdraw (another node runs with its identity).
    Abandon,
}

/// Where this peer's donor record lives, shared with the re-declaring task.
#[derive(Debug, Clone)]
pub(super) struct DonorRecord {
    pub(super) dht: Dht,
    pub(super) key: Vec<u8>,
    pub(super) subkey: Vec<u8>,
    pub(super) peer_id: Vec<u8>,
    /// Latest expiration stored, so a withdrawal always supersedes it.
    pub(super) last_expiration: Arc<StdMutex<f64>>,
    /// Serializes stores, so a re-declaration never lands after a withdrawal.
    pub(super) stores: Arc<Mutex<()>>,
    /// How long a store waits for replicas before returning (see `store`).
    pub(super) store_budget: Duration,
}

impl DonorRecord {
    /// Store the declaration if `wanted()` still holds once it is this
    /// store's turn.
    async fn declare(
        &self,
        priority: f64,
        root: &[u8; 32],
        expiration: f64,
        wanted: impl Fn() -> bool,
    ) -> Result<()> {
        let _turn = self.stores.lock().await;
        if !wanted() {
            return Ok(());
        }
        let value = rmp_serde::to_vec(&(
            serde_bytes::Bytes::new(&self.peer_id),
            priority,
            serde_bytes::Bytes::new(root),
        ))
        .map_err(|_| AveragingError::Decode {
            reason: "cannot encode donor record",
        })?;
        if let Ok(mut last) = self.last_expiration.lock() {
            *last = last.max(expiration);
        }
        self.store(value, expiration, "declaring state").await
    }

    /// Stores under the donor key, waiting at most `store_budget` for the
    /// replicas: the node stores the record locally as soon as it takes the
    /// command, in order, and replication goes on in the background, so a
    /// replica that vanished mid-run (which holds a store until the DHT's
    /// query timeout) must not hold up the optimizer's step.
    async fn store(&self, value: Vec<u8>, expiration: f64, context: &'static str) -> Result<()> {
        let store = self
            .dht
            .store(&self.key, Some(&self.subkey), value, expiration);
        match tokio::time::timeout(self.store_budget, store).await {
            Ok(result) => result.map(|_| ()).map_err(AveragingError::dht(context)),
            Err(_) => {
                tracing::debug!(
                    context,
                    "stored locally; replication goes on in the background"
                );
                Ok(())
            }
        }
    }

    /// Store nil just after the latest declaration (nothing to do once it expired).
    async fn withdraw(&self) -> Result<()> {
        let _turn = self.stores.lock().await;
        let last = self.last_expiration.lock().map(|l| *l).unwrap_or(0.0);
        if last <= dht_time() {
            return Ok(());
        }
        if let Ok(mut l) = self.last_expiration.lock() {
            *l = last + 1e-3;
        }
        self.store(vec![0xc0], last + 1e-3, "withdrawing state")
            .await
    }
}

impl DecentralizedAverager {
    /// Advertise this peer as a state donor under `{prefix}.all_averagers` with
    /// `priority` (higher is preferred, e.g. the step) and `metadata` served
    /// with the tensors, until `expiration` (DHT time).
    ///
    /// The declaration is kept alive: a background task re-declares it every
    /// [`declare_state_period`](AveragerConfig::declare_state_period), or
    /// halfway through its lifetime if that is sooner, each time with the same
    /// lifetime (`expiration` − now), until [`withdraw_state`](Self::withdraw_state),
    /// [`shutdown`](Self::shutdown) or the averager is dropped; each of those
    /// withdraws it. A later call replaces priority, metadata and lifetime.
    /// Does nothing (successfully) on a peer that does not share state
    /// (client mode, or `allow_state_sharing` off).
    ///
    /// # Errors
    /// [`AveragingError::InvalidConfig`] for an expiration that is not in the
    /// future or a non-finite priority; DHT failures as [`AveragingError::Io`]
    /// (the re-declaring task still runs and retries).
    pub async fn declare_state(
        &self,
        priority: f64,
        metadata: Vec<u8>,
        expiration: f64,
    ) -> Result<()> {
        if !self.inner.sharing {
            tracing::debug!("not declaring state: this peer does not share state");
            return Ok(());
        }
        let tensors = self.inner.tensors.lock().await.clone();
        self.declare_state_with(priority, metadata, tensors, expiration)
            .await
    }

    /// [`declare_state`](Self::declare_state) of `tensors` (the caller's
    /// snapshot, in the averager's layout) instead of a copy of the
    /// averager's own: the snapshot itself is served, without a copy.
    ///
    /// # Errors
    /// As [`declare_state`](Self::declare_state), and
    /// [`AveragingError::LayoutMismatch`] for tensors of another layout.
    pub async fn declare_state_with(
        &self,
        priority: f64,
        metadata: Vec<u8>,
        tensors: Vec<Vec<f32>>,
        expiration: f64,
    ) -> Result<()> {
        let inner = &self.inner;
        inner.layout.check(&tensors)?;
        if !inner.sharing {
            tracing::debug!("not declaring state: this peer does not share state");
            return Ok(());
        }
        if matches!(
            *inner.donor_cmd.borrow(),
            DonorCommand::Stop | DonorCommand::Abandon
        ) {
            tracing::debug!("not declaring state: the averager is shut down");
            return Ok(());
        }
        let now = dht_time();
        let ttl = expiration - now;
        if !ttl.is_finite() || ttl <= 0.0 || !priority.is_finite() {
            return Err(AveragingError::InvalidConfig {
                field: "declare_state",
                reason: "priority must be finite and expiration in the future".into(),
            });
        }
        // Peers refuse donor declarations that live longer (the re-declaring
        // task keeps a shorter one alive just as well).
        let ttl = ttl.min(crate::records::DONOR_MAX_TTL);
        let expiration = now + ttl;
        // What joiners will get: this snapshot, cut and hashed once (off the
        // runtime: SHA-256 over the whole state), served until the next
        // declaration, whatever the tensors do meanwhile.
        let snapshot = SharedState { metadata, tensors };
        let served = tokio::task::spawn_blocking(move || ServedState::new(snapshot))
            .await
            .map_err(|_| AveragingError::Internal {
                what: "hashing the declared state panicked",
            })??;
        let served = Arc::new(served);
        // The task refreshes from now on; this first store reports errors.
        let keep = DonorCommand::Keep {
            priority,
            root: served.root(),
            ttl,
        };
        inner
            .served
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .declare(served);
        inner.donor_cmd.send_replace(keep);
        let cmd = inner.donor_cmd.subscribe();
        inner
            .donor
            .declare(priority, &keep_root(keep), expiration, || {
                *cmd.borrow() == keep
            })
            .await
    }

    /// Stop advertising this peer as a state donor and withdraw its declaration.
    ///
    /// # Errors
    /// DHT failures as [`AveragingError::Io`].
    pub async fn withdraw_state(&self) -> Result<()> {
        let inner = &self.inner;
        inner.donor_cmd.send_if_modified(|c| {
            let was = *c;
            if !matches!(was, DonorCommand::Stop | DonorCommand::Abandon) {
                *c = DonorCommand::Idle;
            }
            was != *c
        });
        inner
            .served
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .withdraw();
        inner.donor.withdraw().await
    }
}

/// Re-declares this peer as a state donor until told to stop (or the averager
/// is dropped), then withdraws the declaration.
pub(super) async fn keep_state_declared(
    donor: DonorRecord,
    mut rx: watch::Receiver<DonorCommand>,
    period: Duration,
) {
    loop {
        let command = *rx.borrow_and_update();
        match command {
            DonorCommand::Idle => {
                if rx.changed().await.is_err() {
                    break;
                }
            }
            DonorCommand::Stop => break,
            DonorCommand::Abandon => return,
            DonorCommand::Keep {
                priority,
                root,
                ttl,
            } => {
                // `declare_state` has just stored it: refresh before it lapses.
                let half = Duration::try_from_secs_f64(ttl / 2.0).unwrap_or(period);
                let interval = period.min(half).max(Duration::from_millis(50));
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() { break },
                    () = tokio::time::sleep(interval) => {
                        let still = || *rx.borrow() == command;
                        if let Err(e) = donor.declare(priority, &root, dht_time() + ttl, still).await {
                            tracing::warn!(error = %e, "could not re-declare state");
                        }
                    }
                }
            }
        }
    }
    if let Err(e) = donor.withdraw().await {
        tracing::debug!(error = %e, "could not withdraw the state declaration");
    }
}
