//! Test doubles shared by the driver tests: an in-memory board, an in-process averaging
//! hub that groups peers averaging at the same time (as matchmaking does), a
//! least-squares problem, and a helper that takes one global step.

#![allow(clippy::unwrap_used, dead_code, unreachable_pub)] // test helpers

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use colony_optim::{
    AveragingError, CollaborativeOptimizer, Layout, LocalOptimizer, LocalOptimizerKind, LrSchedule,
    OptimConfig, OptimError, PeerRecord, PeerState, ProgressBoard, Result, Sgd, StepOutcome,
    SwarmAverager, TrainingProgress,
};
use tokio::sync::Notify;

pub fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

pub type Records = Arc<Mutex<BTreeMap<Vec<u8>, (Option<TrainingProgress>, f64)>>>;

#[derive(Clone)]
pub struct MemoryBoard {
    pub me: Vec<u8>,
    pub records: Records,
    /// Whether this peer has lost the swarm (its link is cut).
    pub cut_off: Arc<std::sync::atomic::AtomicBool>,
}

impl ProgressBoard for MemoryBoard {
    fn self_key(&self) -> Vec<u8> {
        self.me.clone()
    }
    fn peer_id(&self) -> String {
        String::from_utf8_lossy(&self.me).into_owned()
    }
    fn now(&self) -> f64 {
        now()
    }
    async fn publish(&self, progress: Option<TrainingProgress>, expiration: f64) -> Result<()> {
        self.records
            .lock()
            .unwrap()
            .insert(self.me.clone(), (progress, expiration));
        Ok(())
    }
    async fn is_isolated(&self) -> bool {
        self.cut_off.load(std::sync::atomic::Ordering::Relaxed)
    }
    async fn fetch(&self) -> Result<Vec<PeerRecord>> {
        let t = now();
        Ok(self
            .records
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, (_, e))| *e > t)
            .map(|(k, (p, e))| PeerRecord {
                key: k.clone(),
                progress: p.clone(),
                expiration: *e,
            })
            .collect())
    }
}

/// One averaging round: the peers that call `average` while it is open, as matchmaking
/// groups them in production. It closes when `expected` peers joined or `WINDOW` after
/// its first arrival, and averages what it has; a later caller opens the next round.
pub struct Round {
    /// Who joined, with what tensors and weight.
    parts: Vec<(String, Vec<f32>, f64)>,
    first: Instant,
    result: Option<Vec<f32>>,
    members: usize,
}

/// Rounds in the order they opened; at most the last one is open.
#[derive(Default)]
pub struct Rounds {
    pub all: Vec<Round>,
}

#[derive(Default)]
pub struct Hub {
    pub rounds: Mutex<Rounds>,
    pub states: Mutex<BTreeMap<String, PeerState>>,
    pub changed: Notify,
    pub expected: Mutex<usize>,
}

pub struct MemoryAverager {
    pub name: String,
    pub hub: Arc<Hub>,
}

pub const WINDOW: Duration = Duration::from_secs(3);

fn no_group(waited: Duration) -> OptimError {
    OptimError::Averaging {
        op: "round",
        source: AveragingError::NoGroupFound { waited },
    }
}

impl MemoryAverager {
    /// Joins the open round (or opens one) and returns its index.
    fn join(&self, tensors: &[f32], weight: f64) -> usize {
        let mut rounds = self.hub.rounds.lock().unwrap();
        let open =
            (rounds.all.len().checked_sub(1)).filter(|&last| rounds.all[last].result.is_none());
        let index = match open {
            Some(index) => index,
            None => {
                rounds.all.push(Round {
                    parts: Vec::new(),
                    first: Instant::now(),
                    result: None,
                    members: 0,
                });
                rounds.all.len() - 1
            }
        };
        rounds.all[index]
            .parts
            .push((self.name.clone(), tensors.to_vec(), weight));
        index
    }
}

impl SwarmAverager for MemoryAverager {
    async fn average(
        &mut self,
        parts: &mut [&mut [f32]],
        weight: f64,
        timeout: Duration,
    ) -> Result<usize> {
        let started = Instant::now();
        // The hub averages one flat vector: params ‖ grads ‖ state.
        let flat: Vec<f32> = parts.iter().flat_map(|p| p.iter().copied()).collect();
        let index = self.join(&flat, weight);
        self.hub.changed.notify_waiters();
        loop {
            let notified = self.hub.changed.notified();
            {
                let expected = *self.hub.expected.lock().unwrap();
                let mut rounds = self.hub.rounds.lock().unwrap();
                let round = &mut rounds.all[index];
                let full = round.parts.len() >= expected;
                let late = round.first.elapsed() >= WINDOW;
                if round.result.is_none() && (full || late) {
                    let total: f64 = round.parts.iter().map(|(_, _, w)| w).sum();
                    let mut out = vec![0.0f64; flat.len()];
                    for (_, part, w) in &round.parts {
                        for (o, v) in out.iter_mut().zip(part) {
                            *o += w / total * f64::from(*v);
                        }
                    }
                    round.members = round.parts.len();
                    round.result = Some(out.into_iter().map(|v| v as f32).collect());
                    self.hub.changed.notify_waiters();
                }
                if let Some(result) = &round.result {
                    let mut at = 0;
                    for part in parts.iter_mut() {
                        part.copy_from_slice(&result[at..at + part.len()]);
                        at += part.len();
                    }
                    return Ok(round.members);
                }
            }
            if started.elapsed() >= timeout {
                // Leave the round so that it never averages a peer that gave up.
                let mut rounds = self.hub.rounds.lock().unwrap();
                let round = &mut rounds.all[index];
                if round.result.is_none() {
                    round.parts.retain(|(name, _, _)| *name != self.name);
                }
                return Err(no_group(started.elapsed()));
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
        }
    }
    /// Auxiliary peers are not part of the in-memory rounds: they assist nobody.
    async fn assist(&mut self, _timeout: Duration) -> Result<usize> {
        Ok(1)
    }
    async fn share_state(&mut self, state: PeerState) -> Result<()> {
        self.hub
            .states
            .lock()
            .unwrap()
            .insert(self.name.clone(), state);
        Ok(())
    }
    async fn load_state(
        &mut self,
        _timeout: Duration,
        _max_step: u64,
    ) -> Result<Option<PeerState>> {
        let states = self.hub.states.lock().unwrap();
        Ok(states.values().max_by_key(|s| s.step).cloned())
    }
    async fn shutdown(&mut self) {
        self.hub.states.lock().unwrap().remove(&self.name);
    }
}

pub struct Swarm {
    pub records: Records,
    pub hub: Arc<Hub>,
}

impl Swarm {
    pub fn new(expected: usize) -> Self {
        let hub = Arc::new(Hub::default());
        *hub.expected.lock().unwrap() = expected;
        Self {
            records: Records::default(),
            hub,
        }
    }

    pub async fn peer(&self, name: &str, config: OptimConfig, params: Vec<f32>) -> Opt {
        self.peer_with_link(name, config, params).await.0
    }

    /// A peer and the switch that cuts it off the swarm (`true`: isolated).
    pub async fn peer_with_link(
        &self,
        name: &str,
        config: OptimConfig,
        params: Vec<f32>,
    ) -> (Opt, Arc<std::sync::atomic::AtomicBool>) {
        let layout = Layout::packed([("w", vec![params.len()])], 1).unwrap();
        let sgd = Sgd {
            momentum: 0.0,
            ..Sgd::default()
        };
        let local = LocalOptimizer::new(LocalOptimizerKind::Sgd(sgd), layout).unwrap();
        let cut_off = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let board = MemoryBoard {
            me: name.as_bytes().to_vec(),
            records: self.records.clone(),
            cut_off: cut_off.clone(),
        };
        let averager = MemoryAverager {
            name: name.into(),
            hub: self.hub.clone(),
        };
        let opt = CollaborativeOptimizer::new(config, params, local, board, averager, None)
            .await
            .unwrap();
        (opt, cut_off)
    }
}

pub type Opt = CollaborativeOptimizer<MemoryBoard, MemoryAverager>;

pub fn config(target: u64) -> OptimConfig {
    OptimConfig {
        min_refresh_period: 0.02,
        max_refresh_period: 0.2,
        default_refresh_period: 0.1,
        averaging_timeout: 10.0,
        lr_schedule: LrSchedule::Constant { lr: 0.1 },
        ..OptimConfig::new("test", target)
    }
}

/// Linear least squares: loss = mean (w·x - y)^2 / 2; its gradient over `rows`.
pub fn gradient(w: &[f32], rows: &[(Vec<f32>, f32)]) -> Vec<f32> {
    let mut g = vec![0.0f32; w.len()];
    for (x, y) in rows {
        let err: f32 = w.iter().zip(x).map(|(a, b)| a * b).sum::<f32>() - y;
        for (gi, xi) in g.iter_mut().zip(x) {
            *gi += err * xi / rows.len() as f32;
        }
    }
    g
}

/// Every task's result, in order (a task that panicked fails the test).
pub async fn join_all<T>(handles: Vec<tokio::task::JoinHandle<T>>) -> Vec<T> {
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

/// The least-squares loss of `w` over `data`: mean (w·x - y)^2 / 2.
pub fn loss(data: &[(Vec<f32>, f32)], w: &[f32]) -> f64 {
    data.iter()
        .map(|(x, y)| {
            let e = w.iter().zip(x).map(|(a, b)| a * b).sum::<f32>() - y;
            f64::from(e * e) / 2.0
        })
        .sum::<f64>()
        / data.len() as f64
}

pub fn dataset(n: usize, dim: usize) -> Vec<(Vec<f32>, f32)> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    (0..n)
        .map(|_| {
            let x: Vec<f32> = (0..dim).map(|_| next()).collect();
            let y = x
                .iter()
                .enumerate()
                .map(|(i, v)| v * (i as f32 + 1.0))
                .sum::<f32>()
                + 0.1 * next();
            (x, y)
        })
        .collect()
}

/// `n` DHT nodes on 127.0.0.1, all bootstrapped from the first.
pub async fn nodes(n: usize) -> Vec<colony_dht::Dht> {
    use colony_dht::{Dht, DhtConfig};
    let first = Dht::new(DhtConfig::default()).await.unwrap();
    let bootstrap = first.listen_addrs();
    let mut out = vec![first];
    for _ in 1..n {
        let c = DhtConfig {
            initial_peers: bootstrap.clone(),
            ..DhtConfig::default()
        };
        out.push(Dht::new(c).await.unwrap());
    }
    out
}

/// Contributes one micro-batch, then polls until the global step is taken.
pub async fn one_global_step<B: ProgressBoard, A: SwarmAverager>(
    opt: &mut CollaborativeOptimizer<B, A>,
    rows: &[(Vec<f32>, f32)],
) -> StepOutcome {
    let g = gradient(opt.params(), rows);
    step_with_gradient(opt, &g, rows.len() as u64).await
}

/// One micro-batch of `batch` samples with gradient `g`, then polls until
/// the step is no longer only accumulating (bounded).
pub async fn step_with_gradient<B: ProgressBoard, A: SwarmAverager>(
    opt: &mut CollaborativeOptimizer<B, A>,
    g: &[f32],
    batch: u64,
) -> StepOutcome {
    opt.grads_mut().copy_from_slice(g);
    let mut outcome = opt.step(Some(batch)).await.unwrap();
    for _ in 0..500 {
        if !matches!(outcome, StepOutcome::Accumulated) {
            return outcome;
        }
        opt.state_changed(Duration::from_millis(50)).await;
        outcome = opt.poll_step().await.unwrap();
    }
    panic!("no global step within the bound");
}
