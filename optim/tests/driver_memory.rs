//! The driver against in-process implementations of the board and the averager: several
//! peers as tokio tasks in one process, no network. (The same driver over the real DHT
//! and averaging runs in the `colony` multi-process tests.)

#![allow(clippy::unwrap_used)] // test doubles: a poisoned lock is a test failure

mod common;

use std::time::Duration;

use colony_optim::{AveragingMode, OptimError, StepOutcome};
use common::{Swarm, config, dataset, gradient, one_global_step};

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
    let finals = common::join_all(handles).await;
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

/// A peer cut off from the swarm it trained with does not step alone (its
/// "global" steps would run ahead of the swarm): it keeps its samples and
/// steps once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_cut_off_from_the_swarm_does_not_step_alone() {
    let swarm = Swarm::new(1);
    let (mut opt, cut_off) = swarm.peer_with_link("p", config(4), vec![1.0, 1.0]).await;
    cut_off.store(true, std::sync::atomic::Ordering::Relaxed);
    opt.grads_mut().copy_from_slice(&[1.0, -1.0]);
    assert_eq!(opt.step(Some(4)).await.unwrap(), StepOutcome::Isolated);
    assert_eq!(opt.params(), &[1.0, 1.0]);
    assert_eq!(opt.local_step(), 0);
    assert_eq!(opt.local_samples(), 4);
    // Still cut off: still no step, samples kept.
    opt.grads_mut().copy_from_slice(&[0.0, 0.0]);
    assert_eq!(opt.step(Some(4)).await.unwrap(), StepOutcome::Isolated);
    assert_eq!(opt.local_samples(), 8);
    cut_off.store(false, std::sync::atomic::Ordering::Relaxed);
    opt.grads_mut().copy_from_slice(&[0.0, 0.0]);
    let outcome = opt.step(Some(4)).await.unwrap();
    assert_eq!(
        outcome,
        StepOutcome::Stepped {
            step: 1,
            group_size: 1
        }
    );
    // The mean gradient of the 12 samples: (4 * [1, -1]) / 12.
    let g = 4.0 / 12.0;
    let want = [1.0 - 0.1 * g, 1.0 + 0.1 * g];
    for (p, w) in opt.params().iter().zip(want) {
        assert!((p - w).abs() < 1e-6, "{:?} vs {want:?}", opt.params());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goodbye_removes_a_peer_and_clients_contribute_samples() {
    let swarm = Swarm::new(2);
    let mut a = swarm.peer("a", config(1000), vec![0.0; 2]).await;
    let mut client_config = config(1000);
    client_config.role = AveragingMode::Client;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auxiliary_peer_follows_the_swarm_and_assists_when_it_is_ready() {
    let swarm = Swarm::new(1);
    let mut a = swarm.peer("a", config(8), vec![0.0; 2]).await;
    let mut aux_config = config(8);
    aux_config.role = AveragingMode::Aux;
    let mut aux = swarm.peer("aux", aux_config, vec![0.0; 2]).await;
    assert!(matches!(
        aux.step(Some(1)).await,
        Err(OptimError::InvalidConfig { .. })
    ));
    assert!(matches!(
        a.step_aux().await,
        Err(OptimError::InvalidConfig { .. })
    ));
    // Nothing accumulated yet: the auxiliary peer waits.
    assert_eq!(aux.step_aux().await.unwrap(), StepOutcome::Accumulated);
    // The trainer accumulates most of the target; once the auxiliary peer sees it
    // reached (ETA passed or samples at the target), it assists and moves on.
    a.grads_mut().copy_from_slice(&[1.0, 1.0]);
    assert_eq!(a.step(Some(4)).await.unwrap(), StepOutcome::Accumulated);
    a.grads_mut().copy_from_slice(&[1.0, 1.0]);
    assert_eq!(
        a.step(Some(4)).await.unwrap(),
        StepOutcome::Stepped {
            step: 1,
            group_size: 1
        }
    );
    let mut outcome = StepOutcome::Accumulated;
    for _ in 0..200 {
        aux.state_changed(Duration::from_millis(50)).await;
        outcome = aux.step_aux().await.unwrap();
        if aux.local_step() >= 1 {
            break;
        }
    }
    // It followed the swarm to step 1 (and never ran ahead of it).
    assert_eq!(aux.local_step(), 1, "{outcome:?}");
}

/// Delayed updates: each global step's round and update run in the
/// background while the peers compute their next gradients on the previous
/// parameters. Every update lands once, the peers end bit-identical, and
/// the least-squares loss falls as without the delay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_updates_land_once_and_leave_every_peer_identical() {
    const PEERS: usize = 4;
    const BATCH: usize = 8;
    const DIM: usize = 5;
    const STEPS: usize = 12;
    let data = dataset(PEERS * BATCH * STEPS, DIM);
    let swarm = Swarm::new(PEERS);
    let mut handles = Vec::new();
    for p in 0..PEERS {
        let mut cfg = config((PEERS * BATCH) as u64);
        cfg.delay_updates = true;
        let mut opt = swarm.peer(&format!("peer{p}"), cfg, vec![0.0; DIM]).await;
        let data = data.clone();
        handles.push(tokio::spawn(async move {
            // Micro-batch after micro-batch: each global step is scheduled,
            // then lands while later micro-batches compute.
            let (mut scheduled, mut landed, mut batch) = (0u64, 0u64, 0usize);
            for _ in 0..20_000 {
                if landed == STEPS as u64 {
                    break;
                }
                let start = ((batch % STEPS) * PEERS + p) * BATCH;
                batch += 1;
                let g = gradient(opt.params(), &data[start..start + BATCH]);
                opt.grads_mut().copy_from_slice(&g);
                match opt.step(Some(BATCH as u64)).await.unwrap() {
                    StepOutcome::Scheduled { step } => {
                        scheduled += 1;
                        assert_eq!(step, landed + 1, "peer {p}");
                    }
                    StepOutcome::Stepped { step, group_size } => {
                        landed += 1;
                        assert_eq!((step, group_size), (landed, PEERS), "peer {p}");
                        assert_eq!(scheduled, landed, "peer {p}: landed unscheduled");
                    }
                    StepOutcome::Accumulated => {
                        opt.state_changed(Duration::from_millis(10)).await;
                    }
                    other => panic!("peer {p}: {other:?}"),
                }
            }
            assert_eq!(landed, STEPS as u64, "peer {p}: bounded loop ran out");
            opt.settle().await.unwrap();
            (opt.params().to_vec(), opt.delayed_updates())
        }));
    }
    let finals = common::join_all(handles).await;
    for (params, delayed) in &finals {
        assert_eq!(params, &finals[0].0, "peers differ");
        assert_eq!(delayed.applied, STEPS as u64, "{delayed:?}");
        assert_eq!(delayed.averaged, STEPS as u64, "{delayed:?}");
        assert_eq!(delayed.last_group_size, PEERS);
    }
    let loss = |w: &[f32]| common::loss(&data, w);
    // The same number of undelayed full-batch steps, for comparison.
    let mut w = vec![0.0f32; DIM];
    for _ in 0..STEPS {
        let g = gradient(&w, &data);
        for (wi, gi) in w.iter_mut().zip(g) {
            *wi -= 0.1 * gi;
        }
    }
    let (start, end, undelayed) = (loss(&[0.0; DIM]), loss(&finals[0].0), loss(&w));
    eprintln!(
        "delayed updates: loss {start:.4} -> {end:.4} after {STEPS} steps \
         ({undelayed:.4} without the delay, full batches)"
    );
    // Staleness 1 costs little at this learning rate: the loss falls by at
    // least half as much as without the delay.
    assert!(
        start - end >= 0.5 * (start - undelayed),
        "loss {start} -> {end} vs {undelayed}"
    );
}

/// A delayed round that finds no group: the update proceeds on the peer's
/// own gradient (applied once, reported as local), and the next step goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_delayed_round_steps_on_local_gradients_once() {
    const DIM: usize = 3;
    let data = dataset(16, DIM);
    // The hub waits for a second peer that never comes.
    let swarm = Swarm::new(2);
    let mut cfg = config(8);
    cfg.delay_updates = true;
    cfg.averaging_timeout = 0.3;
    let mut opt = swarm.peer("alone", cfg, vec![0.0; DIM]).await;
    let rows = &data[..8];
    let g = gradient(&[0.0; DIM], rows);
    let outcome = one_global_step(&mut opt, rows).await;
    assert_eq!(outcome, StepOutcome::Scheduled { step: 1 });
    opt.settle().await.unwrap();
    assert_eq!(opt.local_step(), 1);
    let delayed = opt.delayed_updates();
    assert_eq!(
        (delayed.applied, delayed.local, delayed.averaged),
        (1, 1, 0)
    );
    let expected: Vec<f32> = g.iter().map(|gi| -0.1 * gi).collect();
    assert_eq!(
        opt.params(),
        &expected[..],
        "the local update, applied once"
    );
    // Settling again applies nothing more.
    opt.settle().await.unwrap();
    assert_eq!(opt.params(), &expected[..]);
    assert_eq!(opt.delayed_updates().applied, 1);
}
