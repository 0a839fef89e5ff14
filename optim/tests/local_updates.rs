//! Local updates (DiLoCo-style, `OptimConfig::local_updates`): each peer
//! applies every micro-batch's gradient at once (inner steps), and after H
//! of them the swarm averages the parameter deltas and takes an outer
//! Nesterov SGD step. In-process doubles check the arithmetic against a
//! hand-built reference and the delayed variant; real averagers on
//! 127.0.0.1 check that a peer of another update scheme is refused.

#![allow(clippy::unwrap_used)] // test code

mod common;

use std::time::Duration;

use colony_kernels::cpu;
use colony_optim::{
    AveragerConfig, CollaborativeOptimizer, Layout, LocalOptimizer, LocalOptimizerKind,
    LocalUpdates, OptimError, Sgd, StepOutcome,
};
use common::{Swarm, config, dataset, gradient, loss, nodes};

const DIM: usize = 4;
const BATCH: usize = 8;
const H: u64 = 4;

/// Rows of peer `p`'s `k`-th micro-batch (each peer has its own shard).
fn rows(data: &[(Vec<f32>, f32)], peers: usize, p: usize, k: usize) -> &[(Vec<f32>, f32)] {
    let batches = data.len() / BATCH;
    let b = (k * peers + p) % batches;
    &data[b * BATCH..(b + 1) * BATCH]
}

/// The same outer steps built by hand: every peer's H inner SGD steps from
/// the anchor, the mean delta, one outer Nesterov step on it.
fn reference(data: &[(Vec<f32>, f32)], peers: usize, rounds: usize) -> Vec<f32> {
    let lu = LocalUpdates::every(H);
    let mut anchor = vec![0.0f32; DIM];
    let mut momentum = vec![0.0f32; DIM];
    let mut k = vec![0usize; peers];
    for _ in 0..rounds {
        let mut delta = vec![0.0f64; DIM];
        for (p, kp) in k.iter_mut().enumerate() {
            let mut w = anchor.clone();
            for _ in 0..H {
                let g = gradient(&w, rows(data, peers, p, *kp));
                *kp += 1;
                for (wi, gi) in w.iter_mut().zip(g) {
                    *wi -= 0.1 * gi;
                }
            }
            for ((d, a), wi) in delta.iter_mut().zip(&anchor).zip(&w) {
                *d += f64::from(a - wi) / peers as f64;
            }
        }
        let delta: Vec<f32> = delta.into_iter().map(|d| d as f32).collect();
        cpu::sgd_step(&mut anchor, &delta, &mut momentum, &lu.outer_sgd()).unwrap();
    }
    anchor
}

/// Runs `peers` peers for `rounds` outer steps; returns each one's global
/// parameters, working parameters and the inner steps between its rounds.
async fn train(
    peers: usize,
    rounds: u64,
    delay: bool,
    data: &[(Vec<f32>, f32)],
) -> Vec<(Vec<f32>, Vec<f32>, Vec<u64>)> {
    let swarm = Swarm::new(peers);
    let mut handles = Vec::new();
    for p in 0..peers {
        let mut cfg = config(H * (BATCH * peers) as u64);
        cfg.local_updates = Some(LocalUpdates::every(H));
        cfg.delay_updates = delay;
        let mut opt = swarm.peer(&format!("peer{p}"), cfg, vec![0.0; DIM]).await;
        let data = data.to_vec();
        handles.push(tokio::spawn(async move {
            let (mut k, mut landed, mut since, mut between) = (0usize, 0u64, 0u64, Vec::new());
            for _ in 0..20_000 {
                if landed == rounds {
                    break;
                }
                let g = gradient(opt.params(), rows(&data, peers, p, k));
                k += 1;
                since += 1;
                opt.grads_mut().copy_from_slice(&g);
                let outcome = opt.step(Some(BATCH as u64)).await.unwrap();
                if k == 1 {
                    // Each peer is ready on its own after H inner steps: it
                    // must see the others first, or it steps alone.
                    for _ in 0..200 {
                        if opt.collaboration_state().num_peers == peers {
                            break;
                        }
                        opt.state_changed(Duration::from_millis(50)).await;
                    }
                    assert_eq!(opt.collaboration_state().num_peers, peers, "peer {p}");
                }
                match outcome {
                    // Compute takes time: the round in flight runs meanwhile.
                    StepOutcome::Accumulated if delay => {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    StepOutcome::Accumulated => {}
                    StepOutcome::Scheduled { .. } if delay => {
                        between.push(since);
                        since = 0;
                    }
                    StepOutcome::Stepped { group_size, .. } => {
                        assert_eq!(group_size, peers, "peer {p}");
                        landed += 1;
                        if !delay {
                            between.push(since);
                            since = 0;
                        }
                    }
                    other => panic!("peer {p}: {other:?}"),
                }
            }
            assert_eq!(landed, rounds, "peer {p}: bounded loop ran out");
            opt.settle().await.unwrap();
            (opt.global_params().to_vec(), opt.params().to_vec(), between)
        }));
    }
    common::join_all(handles).await
}

/// Three peers, H = 4, three outer steps: each outer step comes after
/// exactly H inner steps, every peer ends with the same global parameters,
/// and those are the hand-built DiLoCo result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_h_inner_steps_the_peers_average_deltas_and_take_one_outer_step() {
    const PEERS: usize = 3;
    const ROUNDS: usize = 3;
    let data = dataset(PEERS * BATCH * 16, DIM);
    let finals = train(PEERS, ROUNDS as u64, false, &data).await;
    let expected = reference(&data, PEERS, ROUNDS);
    for (p, (global, working, between)) in finals.iter().enumerate() {
        assert_eq!(between, &vec![H; ROUNDS], "peer {p}: inner steps per round");
        // Right after an outer step the working parameters are the anchor.
        assert_eq!(global, working, "peer {p}");
        assert_eq!(global, &finals[0].0, "peer {p} differs from peer 0");
        for (g, e) in global.iter().zip(&expected) {
            assert!(
                (g - e).abs() <= 1e-5 * e.abs().max(1.0),
                "{global:?} vs {expected:?}"
            );
        }
    }
    let (start, end) = (loss(&data, &[0.0; DIM]), loss(&data, &finals[0].0));
    eprintln!("local updates (H = {H}): loss {start:.4} -> {end:.4} in {ROUNDS} outer steps");
    assert!(end < 0.75 * start, "loss {start} -> {end}");
}

/// Local and delayed updates together: the outer round runs while inner
/// steps go on; the peers still end with identical global parameters, the
/// inner progress made meanwhile is kept (the working parameters are not
/// the anchor), and the loss falls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_outer_rounds_keep_the_inner_steps_taken_meanwhile() {
    const PEERS: usize = 3;
    const ROUNDS: u64 = 4;
    let data = dataset(PEERS * BATCH * 16, DIM);
    let finals = train(PEERS, ROUNDS, true, &data).await;
    for (p, (global, working, between)) in finals.iter().enumerate() {
        assert_eq!(global, &finals[0].0, "peer {p} differs from peer 0");
        // Each round was scheduled after H inner steps (the first) or after
        // at least H (later ones wait for the previous round to land).
        assert!(between.iter().all(|&s| s >= H), "peer {p}: {between:?}");
        assert_ne!(global, working, "peer {p}: inner progress lost");
    }
    let (start, end) = (loss(&data, &[0.0; DIM]), loss(&data, &finals[0].0));
    eprintln!("delayed local updates (H = {H}): loss {start:.4} -> {end:.4}");
    assert!(end < 0.75 * start, "loss {start} -> {end}");
}

/// A lone peer whose round finds no group steps on its own delta once; with
/// a bad H the optimizer does not start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_without_a_group_applies_the_own_delta_and_h_zero_is_refused() {
    let data = dataset(64, DIM);
    let swarm = Swarm::new(2);
    let mut cfg = config(1 << 20);
    cfg.local_updates = Some(LocalUpdates::every(2));
    cfg.averaging_timeout = 0.3;
    let mut opt = swarm.peer("alone", cfg.clone(), vec![0.0; DIM]).await;
    let mut w = [0.0f32; DIM];
    for k in 0..2 {
        let g = gradient(opt.params(), &data[k * BATCH..(k + 1) * BATCH]);
        for (wi, gi) in w.iter_mut().zip(&g) {
            *wi -= 0.1 * gi;
        }
        opt.grads_mut().copy_from_slice(&g);
        let outcome = opt.step(Some(BATCH as u64)).await.unwrap();
        let expected = if k == 0 {
            StepOutcome::Accumulated
        } else {
            StepOutcome::Stepped {
                step: 1,
                group_size: 1,
            }
        };
        assert_eq!(outcome, expected, "micro-batch {k}");
    }
    // Its own delta, one outer step.
    let mut anchor = vec![0.0f32; DIM];
    let delta: Vec<f32> = w.iter().map(|wi| -wi).collect();
    let mut momentum = vec![0.0f32; DIM];
    let outer = LocalUpdates::every(2).outer_sgd();
    cpu::sgd_step(&mut anchor, &delta, &mut momentum, &outer).unwrap();
    assert_eq!(opt.global_params(), &anchor[..]);
    assert_eq!(opt.params(), &anchor[..]);
    assert_eq!(opt.inner_steps(), Some(0));

    cfg.local_updates = Some(LocalUpdates::every(0));
    let layout = Layout::packed([("w", vec![DIM])], 1).unwrap();
    let local = LocalOptimizer::new(LocalOptimizerKind::Sgd(Sgd::default()), layout).unwrap();
    let board = common::MemoryBoard {
        me: b"h0".to_vec(),
        records: swarm.records.clone(),
        cut_off: Default::default(),
    };
    let averager = common::MemoryAverager {
        name: "h0".into(),
        hub: swarm.hub.clone(),
    };
    let refused =
        CollaborativeOptimizer::new(cfg, vec![0.0; DIM], local, board, averager, None).await;
    assert!(
        matches!(
            refused,
            Err(OptimError::InvalidConfig {
                field: "local_updates.inner_steps",
                ..
            })
        ),
        "{:?}",
        refused.err()
    );
}

/// Waits (bounded) until both optimizers count each other as live peers.
async fn see_each_other<B, A, C, D>(
    a: &mut CollaborativeOptimizer<B, A>,
    b: &mut CollaborativeOptimizer<C, D>,
) where
    B: colony_optim::ProgressBoard,
    A: colony_optim::SwarmAverager,
    C: colony_optim::ProgressBoard,
    D: colony_optim::SwarmAverager,
{
    for _ in 0..200 {
        if a.collaboration_state().num_peers == 2 && b.collaboration_state().num_peers == 2 {
            return;
        }
        tokio::join!(
            a.state_changed(Duration::from_millis(50)),
            b.state_changed(Duration::from_millis(50))
        );
    }
    panic!("the peers never saw each other");
}

/// On real averagers: a peer applying local updates and one averaging
/// gradients hold tensors of the same lengths (SGD's momentum, the outer
/// momentum), yet they never average together; two local-update peers do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_of_another_update_scheme_never_group() {
    const TARGET: u64 = 1 << 20;
    let dhts = nodes(3).await;
    let join = |i: usize, local_updates: Option<LocalUpdates>| {
        let dht = dhts[i].clone();
        async move {
            let mut cfg = config(TARGET);
            cfg.prefix = "scheme".into();
            cfg.local_updates = local_updates;
            cfg.averaging_timeout = 4.0;
            let mut acfg = AveragerConfig::new(cfg.averaging_prefix());
            acfg.target_group_size = Some(2);
            acfg.min_matchmaking_time = Duration::from_secs(1);
            acfg.request_timeout = Duration::from_millis(400);
            let layout = Layout::packed([("w", vec![DIM])], 1).unwrap();
            let local =
                LocalOptimizer::new(LocalOptimizerKind::Sgd(Sgd::default()), layout).unwrap();
            CollaborativeOptimizer::join(dht, cfg, acfg, vec![0.0; DIM], local)
                .await
                .unwrap()
        }
    };
    let g = vec![0.5f32; DIM];
    // One micro-batch each (not enough to step) publishes their progress.
    let mut sync = join(0, None).await;
    let mut local = join(1, Some(LocalUpdates::every(2))).await;
    sync.grads_mut().copy_from_slice(&g);
    assert_eq!(sync.step(Some(1)).await.unwrap(), StepOutcome::Accumulated);
    local.grads_mut().copy_from_slice(&g);
    assert_eq!(local.step(Some(1)).await.unwrap(), StepOutcome::Accumulated);
    see_each_other(&mut sync, &mut local).await;
    // Now both are ready at once and look for a group.
    let (a, b) = tokio::join!(
        async {
            sync.grads_mut().copy_from_slice(&g);
            sync.step(Some(TARGET)).await.unwrap()
        },
        async {
            local.grads_mut().copy_from_slice(&g);
            local.step(Some(1)).await.unwrap()
        },
    );
    // Each stepped alone: the round between the two schemes was refused.
    for (who, outcome) in [("sync", a), ("local", b)] {
        assert!(
            matches!(outcome, StepOutcome::Stepped { group_size: 1, .. }),
            "{who}: {outcome:?}"
        );
    }
    sync.shutdown().await.unwrap();
    let mut other = join(2, Some(LocalUpdates::every(2))).await;
    for opt in [&mut local, &mut other] {
        opt.grads_mut().copy_from_slice(&g);
        assert_eq!(opt.step(Some(1)).await.unwrap(), StepOutcome::Accumulated);
    }
    see_each_other(&mut local, &mut other).await;
    let (a, b) = tokio::join!(
        async {
            local.grads_mut().copy_from_slice(&g);
            local.step(Some(1)).await.unwrap()
        },
        async {
            other.grads_mut().copy_from_slice(&g);
            other.step(Some(1)).await.unwrap()
        },
    );
    for (who, outcome) in [("local", a), ("other", b)] {
        assert!(
            matches!(outcome, StepOutcome::Stepped { group_size: 2, .. }),
            "{who}: {outcome:?}"
        );
    }
    local.shutdown().await.unwrap();
    other.shutdown().await.unwrap();
    for d in &dhts {
        d.shutdown().await;
    }
}
