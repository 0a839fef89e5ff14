//! Collaborative optimizer costs.
//!
//! * `optim_overhead`: one `step()` call when no global step is due (accumulate the
//!   gradient, update the throughput estimate, hand progress to the reporter, check
//!   readiness), for the demo's model (4 810 parameters) and a 1 M-parameter model. The
//!   target is < 1% of a 10 ms training step (100 µs); printed beside it, measured in the
//!   same run by timing it alternately with `step()`: the floor, one accumulate pass
//!   (`acc += grad`, the kernel `step()` uses) over a gradient of the same size. Both are
//!   medians of per-call times.
//! * `optim_step_latency`: 4 peers, each with its own DHT node on 127.0.0.1: the time from
//!   the moment the swarm reaches the target batch size (the last contributing `step()`
//!   call) to every peer having taken the global step, with the all-reduce transfer left
//!   out (the averager returns at once). Target < 100 ms. Printed beside it, sampled on
//!   the same swarm after each round: the floor, one DHT store (a peer publishing) plus
//!   one DHT get of the run's progress key with `latest` (a peer reading the board).

#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::{
    hint::black_box,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use colony_dht::{Dht, DhtConfig};
use colony_optim::{
    CollaborativeOptimizer, DhtProgressBoard, Layout, LocalOptimizer, LocalOptimizerKind,
    OptimConfig, PeerRecord, PeerState, ProgressBoard, Result, Sgd, StepOutcome, SwarmAverager,
    TrainingProgress,
};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

use colony_benches::{Summary, ms, us};

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A board that keeps records in memory (for the overhead bench: no network).
#[derive(Clone, Default)]
struct LocalBoard(Arc<Mutex<Option<TrainingProgress>>>);

impl ProgressBoard for LocalBoard {
    fn self_key(&self) -> Vec<u8> {
        b"me".to_vec()
    }
    fn peer_id(&self) -> String {
        "me".into()
    }
    fn now(&self) -> f64 {
        now()
    }
    async fn publish(&self, progress: Option<TrainingProgress>, _expiration: f64) -> Result<()> {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = progress;
        Ok(())
    }
    async fn fetch(&self) -> Result<Vec<PeerRecord>> {
        Ok(Vec::new())
    }
}

/// An averager that moves no data: a round completes when every member has joined (as a
/// real group would), so the latency bench measures coordination, not the transfer.
struct InstantAverager {
    group: usize,
    barrier: Option<Arc<tokio::sync::Barrier>>,
}

impl SwarmAverager for InstantAverager {
    async fn average(&mut self, _: &mut [&mut [f32]], _: f64, _: Duration) -> Result<usize> {
        const WAIT: Duration = Duration::from_secs(10);
        if let Some(b) = &self.barrier
            && tokio::time::timeout(WAIT, b.wait()).await.is_err()
        {
            return Err(colony_optim::OptimError::Averaging {
                op: "bench round",
                source: colony_optim::AveragingError::NoGroupFound { waited: WAIT },
            });
        }
        Ok(self.group)
    }
    async fn assist(&mut self, _: Duration) -> Result<usize> {
        Ok(self.group)
    }
    async fn share_state(&mut self, _: PeerState) -> Result<()> {
        Ok(())
    }
    async fn load_state(&mut self, _: Duration, _: u64) -> Result<Option<PeerState>> {
        Ok(None)
    }
    async fn shutdown(&mut self) {}
}

fn local(n: usize) -> LocalOptimizer {
    let layout = Layout::packed([("w", vec![n])], 1).expect("layout");
    LocalOptimizer::new(LocalOptimizerKind::Sgd(Sgd::default()), layout).expect("optimizer")
}

fn overhead(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut group = c.benchmark_group("optim_overhead");
    for n in [4_810usize, 1_000_000] {
        let config = OptimConfig {
            // Never due: the bench measures the accumulate-and-report path only.
            target_batch_size: u64::MAX / 2,
            batch_size_per_step: Some(32),
            ..OptimConfig::default()
        };
        let mut opt = rt
            .block_on(CollaborativeOptimizer::new(
                config,
                vec![0.0; n],
                local(n),
                LocalBoard::default(),
                InstantAverager {
                    group: 1,
                    barrier: None,
                },
                None,
            ))
            .expect("optimizer");
        opt.grads_mut().fill(1e-3);
        group.throughput(Throughput::Bytes((n * 4) as u64));
        group.bench_function(BenchmarkId::new("step_call", n), |b| {
            b.iter(|| {
                let outcome = rt.block_on(opt.step(None)).expect("step");
                assert_eq!(outcome, StepOutcome::Accumulated);
            })
        });
        // The floor: the one pass over memory a step() call cannot avoid, the accumulate
        // `acc += alpha * grad` (read the gradient, read-modify-write the accumulator),
        // with the kernel step() itself uses. Timed alternately with step() calls, the
        // same way, so both see the same machine load.
        let mut acc = vec![0.0f32; n];
        let grad = vec![1e-3f32; n];
        let (t_step, t_floor) = alternating(
            21,
            || {
                rt.block_on(opt.step(None)).expect("step");
            },
            || accumulate_floor(&mut acc, &grad),
        );
        let (per_call, floor) = (t_step.median(), t_floor.median());
        println!(
            "optim_overhead/{n}: step() {:.1} us per call (median of {} samples) = {:.3}% of a \
             10 ms training step (target < 1%); floor, same run, timed alternately: one \
             accumulate pass over the {} KiB gradient {:.1} us (median); step() = {:.1}x floor",
            us(per_call),
            t_step.len(),
            per_call.as_secs_f64() / 0.010 * 100.0,
            n * 4 / 1024,
            us(floor),
            per_call.as_secs_f64() / floor.as_secs_f64().max(1e-12),
        );
        black_box(&acc);
    }
    group.finish();
}

fn accumulate_floor(acc: &mut [f32], grad: &[f32]) {
    colony_kernels::cpu::accumulate(acc, black_box(grad), 1.0).expect("accumulate");
}

/// Per-call times of `a` and of `b`, `samples` samples each, taken in alternation (a, b,
/// a, b, ...) so that both see the same machine load. Each sample times the same number
/// of back-to-back calls of either, about 5 ms worth (sized from a warm-up call of each).
fn alternating(samples: usize, mut a: impl FnMut(), mut b: impl FnMut()) -> (Summary, Summary) {
    fn once(f: &mut impl FnMut()) -> f64 {
        let t = Instant::now();
        f();
        t.elapsed().as_secs_f64()
    }
    fn per_call(iters: usize, f: &mut impl FnMut()) -> f64 {
        let t = Instant::now();
        for _ in 0..iters {
            f();
        }
        t.elapsed().as_secs_f64() / iters as f64
    }
    let warm = once(&mut a).max(once(&mut b));
    let iters = ((5e-3 / warm.max(1e-9)).ceil() as usize).clamp(1, 100_000);
    let (ta, tb): (Vec<f64>, Vec<f64>) = (0..samples)
        .map(|_| (per_call(iters, &mut a), per_call(iters, &mut b)))
        .unzip();
    (Summary::from_secs(ta), Summary::from_secs(tb))
}

type Peer = CollaborativeOptimizer<DhtProgressBoard, InstantAverager>;

/// The latency swarm's `min_refresh_period` in seconds (as set in [`swarm`]).
const MIN_REFRESH_PERIOD: f64 = 0.01;

/// The latency swarm's progress key (run id "bench", as set in [`swarm`]).
const PROGRESS_KEY: &[u8] = b"bench_progress";

/// One floor sample on the latency swarm: peer 0 stores a record under its owner subkey
/// (a probe key, so the optimizers' records stay untouched), then peer `1 + i % 3` reads
/// the run's progress key with `latest`. Returns the two latencies.
async fn publish_and_read(dhts: &[Dht], i: usize) -> (Duration, Duration) {
    let writer = &dhts[0];
    let reader = &dhts[1 + i % (dhts.len() - 1)];
    let value = vec![0xc4, 8, 0, 1, 2, 3, 4, 5, 6, i as u8];
    let t = Instant::now();
    let stored = writer
        .store(
            b"floor_probe",
            Some(&writer.owner_subkey()),
            value,
            colony_dht::dht_time() + 60.0,
        )
        .await
        .expect("probe store");
    let store = t.elapsed();
    assert!(stored.is_stored(), "probe record stored");
    let t = Instant::now();
    let got = reader.get(PROGRESS_KEY, true).await.expect("progress get");
    let get = t.elapsed();
    assert!(got.is_some(), "progress records visible");
    (store, get)
}

async fn swarm(peers: usize, target: u64) -> (Vec<Dht>, Vec<Peer>) {
    let first = Dht::new(DhtConfig::default()).await.expect("dht");
    let bootstrap = first.listen_addrs();
    let mut dhts = vec![first];
    for _ in 1..peers {
        let config = DhtConfig {
            initial_peers: bootstrap.clone(),
            ..DhtConfig::default()
        };
        dhts.push(Dht::new(config).await.expect("dht"));
    }
    let mut opts = Vec::new();
    let barrier = Arc::new(tokio::sync::Barrier::new(peers));
    for dht in &dhts {
        let config = OptimConfig {
            batch_size_per_step: Some(target / peers as u64),
            min_refresh_period: 0.01,
            max_refresh_period: 1.0,
            default_refresh_period: 0.2,
            ..OptimConfig::new("bench", target)
        };
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let board = DhtProgressBoard::new(dht.clone(), "bench", Some(tx))
            .await
            .expect("board");
        let opt = CollaborativeOptimizer::new(
            config,
            vec![0.0; 4_810],
            local(4_810),
            board,
            InstantAverager {
                group: peers,
                barrier: Some(barrier.clone()),
            },
            Some(rx),
        )
        .await
        .expect("optimizer");
        opts.push(opt);
    }
    (dhts, opts)
}

/// One global step, peers running concurrently: peers 1.. contribute first (a peer may
/// already enter the round on its ETA and wait there, as in a real swarm); peer 0's call
/// completes the target. Returns the time from that call to the last peer having stepped.
async fn one_round(opts: Vec<Peer>) -> (Vec<Peer>, Duration) {
    let step = opts[0].local_step();
    let start: Arc<std::sync::OnceLock<Instant>> = Arc::default();
    let tasks: Vec<_> = opts
        .into_iter()
        .enumerate()
        .map(|(i, mut opt)| {
            let start = start.clone();
            tokio::spawn(async move {
                let mut outcome = if i == 0 {
                    // Wait (bounded) until the others' samples are visible, so that this
                    // call is the one that completes the target.
                    for _ in 0..500 {
                        let s = opt.collaboration_state();
                        let mine = opt.config().batch_size_per_step.unwrap_or(0);
                        if s.samples_accumulated + mine >= s.target_batch_size {
                            break;
                        }
                        opt.state_changed(Duration::from_millis(20)).await;
                    }
                    let _ = start.set(Instant::now());
                    opt.step(None).await
                } else {
                    opt.step(None).await
                }
                .expect("step");
                let deadline = Instant::now() + Duration::from_secs(20);
                while !matches!(outcome, StepOutcome::Stepped { .. }) && Instant::now() < deadline {
                    opt.state_changed(Duration::from_millis(5)).await;
                    outcome = opt.poll_step().await.expect("poll");
                }
                (opt, Instant::now())
            })
        })
        .collect();
    let mut opts = Vec::new();
    let mut last = None::<Instant>;
    for t in tasks {
        let (opt, finished) = t.await.expect("peer task");
        last = Some(last.map_or(finished, |l| l.max(finished)));
        opts.push(opt);
    }
    assert!(
        opts.iter().all(|o| o.local_step() == step + 1),
        "every peer stepped"
    );
    let start = start.get().copied().unwrap_or_else(Instant::now);
    (
        opts,
        last.map_or(Duration::ZERO, |l| l.saturating_duration_since(start)),
    )
}

fn step_latency(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let (dhts, opts) = rt.block_on(swarm(4, 4 * 32));
    let mut slot = Some(opts);
    let mut group = c.benchmark_group("optim_step_latency");
    group.sample_size(10);
    group.throughput(Throughput::Bytes((4_810 * 4) as u64));
    group.bench_function("4_peers_loopback_no_transfer", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let (opts, latency) = rt.block_on(one_round(slot.take().expect("peers")));
                slot = Some(opts);
                total += latency;
            }
            total
        })
    });
    // Beside each round, the floor, measured on the same swarm the same way: the chain the
    // round cannot skip is one peer publishing its progress (a DHT store, as the board's
    // publish does) and another reading the board back (a DHT get of the run's progress
    // key with `latest`, as the board's fetch does).
    let mut rounds = Vec::new();
    let mut floors = Vec::new();
    for i in 0..20 {
        let (opts, latency) = rt.block_on(one_round(slot.take().expect("peers")));
        slot = Some(opts);
        rounds.push(latency);
        floors.push(rt.block_on(publish_and_read(&dhts, i)));
    }
    let rounds = Summary::new(rounds);
    let stores = Summary::new(floors.iter().map(|f| f.0));
    let gets = Summary::new(floors.iter().map(|f| f.1));
    let floor = Summary::new(floors.iter().map(|f| f.0 + f.1));
    println!(
        "optim_step_latency: median {:.1} ms, max {:.1} ms over {} rounds (target < 100 ms); \
         floor, same swarm and run, one sample after each round: publish + read back \
         {:.1} ms median (DHT store {:.1} ms + DHT get of the progress key {:.1} ms), \
         plus at most the configured {:.0} ms refresh rate limit",
        ms(rounds.median()),
        ms(rounds.max()),
        rounds.len(),
        ms(floor.median()),
        ms(stores.median()),
        ms(gets.median()),
        MIN_REFRESH_PERIOD * 1e3,
    );
    group.finish();
}

criterion_group!(benches, overhead, step_latency);
criterion_main!(benches);
