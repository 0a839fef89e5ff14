//! The ports of the driver: what [`CollaborativeOptimizer`](crate::CollaborativeOptimizer)
//! needs from the network. [`ProgressBoard`] is where peers publish and read progress,
//! [`SwarmAverager`] averages with the peers that are averaging at the same time and
//! shares state. The adapters over `colony-dht` and `colony-averaging` live in the `net`
//! module ([`DhtProgressBoard`](crate::DhtProgressBoard),
//! [`NetworkAverager`](crate::NetworkAverager)); tests plug in in-memory doubles.

use std::{future::Future, time::Duration};

use crate::{error::Result, progress::TrainingProgress, tracker::PeerRecord};

/// A place where peers publish their progress and read everyone's.
///
/// Implementations must be cheap to clone (handles) and authenticate records: a record
/// under a peer's key was written by that peer.
pub trait ProgressBoard: Clone + Send + Sync + 'static {
    /// This peer's subkey (its owner marker).
    fn self_key(&self) -> Vec<u8>;
    /// This peer's network id (put in its records for averaging and monitoring).
    fn peer_id(&self) -> String;
    /// The swarm's clock (Unix seconds).
    fn now(&self) -> f64;
    /// Publishes this peer's progress (`None`: a goodbye) until `expiration`.
    fn publish(
        &self,
        progress: Option<TrainingProgress>,
        expiration: f64,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Reads every peer's latest record (own included).
    fn fetch(&self) -> impl Future<Output = Result<Vec<PeerRecord>>> + Send;
    /// Whether this peer has lost the swarm: it has seen other peers' records
    /// before and now has no connection to any peer at all (its link is cut,
    /// its network changed). Such a peer must not step alone: its "global"
    /// steps would run ahead of the swarm it belongs to. A peer that started
    /// the run alone is not isolated. Default: never.
    fn is_isolated(&self) -> impl Future<Output = bool> + Send {
        async { false }
    }
}

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

/// Caps on the weights peers declare in a round, computed by the optimizer
/// from the progress peers published ([`crate::tracker::weight_limits`]).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WeightLimits {
    /// The cap of a peer with no record for this step.
    pub default: f64,
    /// Caps by libp2p peer id (base58, as in [`crate::TrainingProgress::peer_id`]).
    pub per_peer: Vec<(String, f64)>,
}

/// The averaging layer as the optimizer uses it: one weighted all-reduce per global step
/// over the optimizer's own buffers, lent for the round (parameters, gradients,
/// optimizer state: no copy in or out), and state sharing.
///
/// A round groups the peers that are averaging at the same time (matchmaking), whatever
/// step each of them believes it is at; the driver calls [`average`](Self::average) only
/// when the swarm is ready for its global step, which is what lines the peers up.
/// `colony-averaging`'s `DecentralizedAverager` is adapted to this trait
/// ([`NetworkAverager`](crate::NetworkAverager)); tests use in-process implementations.
pub trait SwarmAverager: Send + 'static {
    /// Averages `tensors` (the parameters, the gradients and the optimizer
    /// state, in that order) in place with the peers averaging now, weighting
    /// this peer by `weight`. Returns the group size. No group formed is an
    /// error, not a success; on error `tensors` must be left as they were,
    /// and on success hold finite values.
    fn average(
        &mut self,
        tensors: &mut [&mut [f32]],
        weight: f64,
        timeout: Duration,
    ) -> impl Future<Output = Result<usize>> + Send;

    /// Limits the weight other peers' tensors may carry when this peer
    /// reduces them, from the next round on (see [`WeightLimits`]). The
    /// default ignores it, for averagers that reduce nothing.
    fn limit_weights(&mut self, limits: &WeightLimits) {
        let _ = limits;
    }

    /// Joins the current round as an auxiliary peer: reduces without contributing
    /// tensors (the averager knows their layout). Returns the group size.
    fn assist(&mut self, timeout: Duration) -> impl Future<Output = Result<usize>> + Send;

    /// Makes `state` downloadable by other peers (replacing the previous
    /// one). It is this peer's snapshot after a step: serve it as it is
    /// (no copy needed), it is not touched again.
    fn share_state(&mut self, state: PeerState) -> impl Future<Output = Result<()>> + Send;

    /// Downloads the most advanced state peers offer at a step of at most
    /// `max_step` (the swarm's step as the tracker sees it, plus its
    /// tolerance: no donor can lure a joiner past it), `None` if nobody
    /// offers one. A networked averager installs a state only when several
    /// donors vouch for it.
    fn load_state(
        &mut self,
        timeout: Duration,
        max_step: u64,
    ) -> impl Future<Output = Result<Option<PeerState>>> + Send;

    /// Stops taking part in averaging and state sharing.
    fn shutdown(&mut self) -> impl Future<Output = ()> + Send;

    /// Stops like [`shutdown`](Self::shutdown) but withdraws nothing this
    /// peer published: another node runs with its identity and owns those
    /// records. Default: `shutdown`.
    fn abandon(&mut self) -> impl Future<Output = ()> + Send {
        self.shutdown()
    }
}
