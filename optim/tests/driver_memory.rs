//! The driver against in-process implementations of the board and the averager: several
//! peers as tokio tasks in one process, no network. (The same driver over the real DHT
//! and averaging runs in the `colony` multi-process tests.)

#![allow(clippy::unwrap_used)] // test doubles: a poisoned lock is a test failure

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use colony_optim::{
    CollaborativeOptimizer, Layout, LocalOptimizer, LocalOptimizerKind, LrSchedule, OptimConfig,
    OptimError, PeerRecord, PeerState, ProgressBoard, Result, Sgd, StepOutcome, SwarmAverager,
    TrainingProgress,
};
use tokio::sync::Notify;

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

type Records = Arc<Mutex<BTreeMap<Vec<u8>, (Option<TrainingProgress>, f64)>>>;

#[derive(Clone)]
struct MemoryBoard {
    me: Vec<u8>,
    records: Records,
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

/// One averaging round per step: it closes when `expected` peers joined or `window`
/// after the first arrival, and averages what it has.
#[derive(Default)]
struct Round {
    parts: Vec<(Vec<f32>, f64)>,
    first: Option<Instant>,
    result: Option<Vec<f32>>,
    members: usize,
}

#[derive(Default)]
struct Hub {
    rounds: Mutex<BTreeMap<u64, Round>>,
    states: Mutex<BTreeMap<String, PeerState>>,
    changed: Notify,
    expected: Mutex<usize>,
}

struct MemoryAverager {
    name: String,
    hub: Arc<Hub>,
}

const WINDOW: Duration = Duration::from_secs(3);

impl SwarmAverager for MemoryAverager {
    async fn average(
        &mut self,
        tensors: &mut [f32],
        weight: f64,
        step: u64,
        timeout: Duration,
    ) -> Result<usize> {
        let deadline = Instant::now() + timeout;
        {
            let mut rounds = self.hub.rounds.lock().unwrap();
            let round = rounds.entry(step).or_default();
            if round.result.is_some() {
                return Err(OptimError::Averaging {
                    operation: "join",
                    message: "round closed".into(),
                });
            }
            round.first.get_or_insert_with(Instant::now);
            round.parts.push((tensors.to_vec(), weight));
        }
        self.hub.changed.notify_waiters();
        loop {
            let notified = self.hub.changed.notified();
            {
                let expected = *self.hub.expected.lock().unwrap();
                let mut rounds = self.hub.rounds.lock().unwrap();
                let round = rounds.get_mut(&step).expect("round exists");
                let full = round.parts.len() >= expected;
                let late = round.first.is_some_and(|f| f.elapsed() >= WINDOW);
                if round.result.is_none() && (full || late) {
                    let total: f64 = round.parts.iter().map(|(_, w)| w).sum();
                    let mut out = vec![0.0f64; tensors.len()];
                    for (part, w) in &round.parts {
                        for (o, v) in out.iter_mut().zip(part) {
                            *o += w / total * f64::from(*v);
                        }
                    }
                    round.members = round.parts.len();
                    round.result = Some(out.into_iter().map(|v| v as f32).collect());
                    self.hub.changed.notify_waiters();
                }
                if let Some(result) = &round.result {
                    tensors.copy_from_slice(result);
                    return Ok(round.members);
                }
            }
            if Instant::now() >= deadline {
                return Err(OptimError::Averaging {
                    operation: "round",
                    message: "timeout".into(),
                });
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), notified).await;
        }
    }
    async fn assist(&mut self, _len: usize, _step: u64, _timeout: Duration) -> Result<usize> {
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
    async fn load_state(&mut self, _timeout: Duration) -> Result<Option<PeerState>> {
        let states = self.hub.states.lock().unwrap();
        Ok(states.values().max_by_key(|s| s.step).cloned())
    }
    async fn shutdown(&mut self) {
        self.hub.states.lock().unwrap().remove(&self.name);
    }
}

struct Swarm {
    records: Records,
    hub: Arc<Hub>,
}

impl Swarm {
    fn new(expected: usize) -> Self {
        let hub = Arc::new(Hub::default());
        *hub.expected.lock().unwrap() = expected;
        Self {
            records: Records::default(),
            hub,
        }
    }

    async fn peer(&self, name: &str, config: OptimConfig, params: Vec<f32>) -> Opt {
        let layout = Layout::packed([("w", vec![params.len()])], 1).unwrap();
        let sgd = Sgd {
            momentum: 0.0,
            ..Sgd::default()
        };
        let local = LocalOptimizer::new(LocalOptimizerKind::Sgd(sgd), layout).unwrap();
        let board = MemoryBoard {
            me: name.as_bytes().to_vec(),
            records: self.records.clone(),
        };
        let averager = MemoryAverager {
            name: name.into(),
            hub: self.hub.clone(),
        };
        CollaborativeOptimizer::new(config, params, local, board, averager, None)
            .await
            .unwrap()
    }
}

type Opt = CollaborativeOptimizer<MemoryBoard, MemoryAverager>;

fn config(target: u64) -> OptimConfig {
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
fn gradient(w: &[f32], rows: &[(Vec<f32>, f32)]) -> Vec<f32> {
    let mut g = vec![0.0f32; w.len()];
    for (x, y) in rows {
        let err: f32 = w.iter().zip(x).map(|(a, b)| a * b).sum::<f32>() - y;
        for (gi, xi) in g.iter_mut().zip(x) {
            *gi += err * xi / rows.len() as f32;
        }
    }
    g
}

fn dataset(n: usize, dim: usize) -> Vec<(Vec<f32>, f32)> {
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

/// Contributes one micro-batch, then polls until the global step is taken.
async fn one_global_step(opt: &mut Opt, rows: &[(Vec<f32>, f32)]) -> StepOutcome {
    let g = gradient(opt.params(), rows);
    opt.grads_mut().copy_from_slice(&g);
    let mut outcome = opt.step(Some(rows.len() as u64)).await.unwrap();
    for _ in 0..500 {
        if !matches!(outcome, StepOutcome::Accumulated) {
            return outcome;
        }
        opt.state_changed(Duration::from_millis(50)).await;
        outcome = opt.poll_step().await.unwrap();
    }
    panic!("no global step within the bound");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_peers_match_single_process_sgd_on_the_union_batch() {
    const PEERS: usize = 4;
    const BATCH: usize = 8;
    const DIM: usize = 5;
    const STEPS: usize = 10;
    let data = dataset(PEERS * BATCH * STEPS, DIM);
    let swarm = Swarm::new(PEERS);
    let mut handles = Vec::new();
    for p in 0..PEERS {
        let mut opt = swarm
            .peer(
                &format!("peer{p}"),
                config((PEERS * BATCH) as u64),
                vec![0.0; DIM],
            )
            .await;
        let data = data.clone();
        handles.push(tokio::spawn(async move {
            for s in 0..STEPS {
                let start = (s * PEERS + p) * BATCH;
                let outcome = one_global_step(&mut opt, &data[start..start + BATCH]).await;
                assert_eq!(
                    outcome,
                    StepOutcome::Stepped {
                        step: s as u64 + 1,
                        group_size: PEERS
                    }
                );
            }
            opt.params().to_vec()
        }));
    }
    let mut finals = Vec::new();
    for h in handles {
        finals.push(h.await.unwrap());
    }
    // The same steps in one process on the union of the four micro-batches.
    let mut w = vec![0.0f32; DIM];
    for s in 0..STEPS {
        let union = &data[s * PEERS * BATCH..(s + 1) * PEERS * BATCH];
        let g = gradient(&w, union);
        for (wi, gi) in w.iter_mut().zip(g) {
            *wi -= 0.1 * gi;
        }
    }
    for params in &finals {
        for (a, b) in params.iter().zip(&w) {
            assert!((a - b).abs() <= 1e-5, "{params:?} vs {w:?}");
        }
    }
    assert!(
        w.iter().any(|v| v.abs() > 0.1),
        "training moved the weights: {w:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_joiner_loads_the_state_and_then_steps_in_sync() {
    let data = dataset(64, 3);
    let swarm = Swarm::new(2);
    let mut a = swarm.peer("a", config(16), vec![0.0; 3]).await;
    let mut b = swarm.peer("b", config(16), vec![0.0; 3]).await;
    let (ra, rb) = (data[..8].to_vec(), data[8..16].to_vec());
    let first = tokio::spawn(async move {
        for _ in 0..3 {
            one_global_step(&mut a, &ra).await;
        }
        a
    });
    for _ in 0..3 {
        one_global_step(&mut b, &rb).await;
    }
    let mut a = first.await.unwrap();
    assert_eq!((a.local_step(), b.local_step()), (3, 3));
    // A newcomer with different (wrong) parameters joins at step 3.
    *swarm.hub.expected.lock().unwrap() = 3;
    let mut c = swarm.peer("c", config(24), vec![9.0; 3]).await;
    // Its first view of the swarm: peers at step 3, so it is out of sync and loads state.
    for _ in 0..100 {
        if c.collaboration_state().optimizer_step == 3 {
            break;
        }
        c.state_changed(Duration::from_millis(50)).await;
    }
    assert_eq!(
        c.step(Some(8)).await.unwrap(),
        StepOutcome::LoadedState { step: 3 }
    );
    assert_eq!(c.params(), a.params());
    let rc = data[16..24].to_vec();
    let (ra, rb) = (data[24..32].to_vec(), data[32..40].to_vec());
    let ta = tokio::spawn(async move {
        let o = one_global_step(&mut a, &ra).await;
        (o, a)
    });
    let tb = tokio::spawn(async move {
        let o = one_global_step(&mut b, &rb).await;
        (o, b)
    });
    let oc = one_global_step(&mut c, &rc).await;
    let (oa, a) = ta.await.unwrap();
    let (ob, b) = tb.await.unwrap();
    for o in [oa, ob, oc] {
        assert_eq!(
            o,
            StepOutcome::Stepped {
                step: 4,
                group_size: 3
            }
        );
    }
    assert_eq!(a.params(), c.params());
    assert_eq!(b.params(), c.params());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_finite_gradients_are_refused_and_never_averaged() {
    let swarm = Swarm::new(1);
    let mut opt = swarm.peer("solo", config(4), vec![1.0, 1.0]).await;
    opt.grads_mut().copy_from_slice(&[f32::NAN, 0.0]);
    let err = opt.step(Some(2)).await.unwrap_err();
    assert!(matches!(
        err,
        OptimError::NonFiniteGradients { batch_size: 2 }
    ));
    assert_eq!(opt.local_samples(), 0);
    // The poisoned buffer was cleared; a good batch then steps normally.
    assert_eq!(opt.grads_mut(), &mut [0.0, 0.0]);
    opt.grads_mut().copy_from_slice(&[1.0, -1.0]);
    let outcome = opt.step(Some(4)).await.unwrap();
    assert_eq!(
        outcome,
        StepOutcome::Stepped {
            step: 1,
            group_size: 1
        }
    );
    assert_eq!(opt.params(), &[0.9, 1.1]);
    assert!(opt.params().iter().all(|v| v.is_finite()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goodbye_removes_a_peer_and_clients_contribute_samples() {
    let swarm = Swarm::new(2);
    let mut a = swarm.peer("a", config(1000), vec![0.0; 2]).await;
    let mut client_config = config(1000);
    client_config.client_mode = true;
    let mut c = swarm.peer("c", client_config, vec![0.0; 2]).await;
    c.grads_mut().copy_from_slice(&[1.0, 1.0]);
    assert_eq!(c.step(Some(30)).await.unwrap(), StepOutcome::Accumulated);
    a.grads_mut().copy_from_slice(&[1.0, 1.0]);
    assert_eq!(a.step(Some(10)).await.unwrap(), StepOutcome::Accumulated);
    let mut seen = None;
    for _ in 0..200 {
        let s = a.collaboration_state();
        if s.samples_accumulated == 40 {
            seen = Some(s);
            break;
        }
        a.state_changed(Duration::from_millis(50)).await;
    }
    let s = seen.expect("the client's samples are counted");
    assert_eq!((s.num_peers, s.num_clients), (2, 1));
    c.shutdown().await.unwrap();
    let mut gone = false;
    for _ in 0..200 {
        if a.collaboration_state().num_peers == 1 {
            gone = true;
            break;
        }
        a.state_changed(Duration::from_millis(50)).await;
    }
    assert!(gone, "the goodbye removed the client at once");
}
