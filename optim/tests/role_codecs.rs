//! Per-role wire codecs on the real stack (DHT nodes and averagers on
//! 127.0.0.1): AdamW with fp16 gradients and a raw optimizer state follows
//! the union-batch AdamW trajectory; with fp16 for everything, Adam's second
//! moments (below fp16's 6e-8) are flushed to zero every round and its steps
//! grow several times too large.

#![allow(clippy::unwrap_used)] // test code

mod common;

use std::time::Duration;

use colony_optim::{
    AdamW, AveragerConfig, CollaborativeOptimizer, Compression, Layout, LocalOptimizer,
    LocalOptimizerKind, LrSchedule, StepOutcome,
};
use common::{config, nodes, step_with_gradient};

const PEERS: usize = 2;
const DIM: usize = 8;
const STEPS: u64 = 12;
const LR: f64 = 1e-3;

fn adamw() -> AdamW {
    AdamW {
        weight_decay: 0.0,
        ..AdamW::default()
    }
}

fn local() -> LocalOptimizer {
    let layout = Layout::packed([("w", vec![DIM])], 1).unwrap();
    LocalOptimizer::new(LocalOptimizerKind::AdamW(adamw()), layout).unwrap()
}

/// Peer `p`'s gradient: constant, about 1e-4 (Adam's v about 1e-11).
fn grad(p: usize) -> Vec<f32> {
    (0..DIM)
        .map(|i| 1e-4 * (1.0 + 0.25 * (i as f32) + 0.5 * p as f32))
        .collect()
}

/// The parameters after `STEPS` AdamW steps on the peers' mean gradient,
/// in one process.
fn union_batch() -> Vec<f32> {
    let mut opt = local();
    let mut w = vec![0.0f32; DIM];
    let mean: Vec<f32> = (0..DIM)
        .map(|i| (0..PEERS).map(|p| grad(p)[i]).sum::<f32>() / PEERS as f32)
        .collect();
    for s in 0..STEPS {
        opt.step(&mut w, &mean, LR, s).unwrap();
    }
    w
}

/// Trains `PEERS` peers for `STEPS` global steps with these codecs; returns
/// each peer's parameters.
async fn swarm(prefix: &str, grads: Compression, state: Compression) -> Vec<Vec<f32>> {
    let dhts = nodes(PEERS).await;
    let mut handles = Vec::new();
    for (p, dht) in dhts.iter().enumerate() {
        let mut cfg = config(8 * PEERS as u64);
        cfg.prefix = prefix.into();
        cfg.averaging_timeout = 20.0;
        cfg.lr_schedule = LrSchedule::Constant { lr: LR };
        cfg.grad_compression = Some(grads);
        cfg.state_compression = Some(state);
        let mut acfg = AveragerConfig::new(cfg.averaging_prefix());
        acfg.target_group_size = Some(PEERS);
        acfg.min_matchmaking_time = Duration::from_secs(1);
        acfg.request_timeout = Duration::from_millis(800);
        let mut opt = CollaborativeOptimizer::join(dht.clone(), cfg, acfg, vec![0.0; DIM], local())
            .await
            .unwrap();
        handles.push(tokio::spawn(async move {
            for s in 0..STEPS {
                let outcome = step_with_gradient(&mut opt, &grad(p), 8).await;
                assert_eq!(
                    outcome,
                    StepOutcome::Stepped {
                        step: s + 1,
                        group_size: PEERS
                    },
                    "peer {p} step {s}"
                );
            }
            let params = opt.params().to_vec();
            opt.shutdown().await.unwrap();
            params
        }));
    }
    let finals = common::join_all(handles).await;
    for d in &dhts {
        d.shutdown().await;
    }
    finals
}

/// How far `w` is from `reference`, relative to how far the reference moved.
fn relative_error(w: &[f32], reference: &[f32]) -> f64 {
    let diff: f64 = w
        .iter()
        .zip(reference)
        .map(|(a, b)| f64::from(a - b).powi(2))
        .sum::<f64>()
        .sqrt();
    let moved: f64 = reference
        .iter()
        .map(|b| f64::from(*b).powi(2))
        .sum::<f64>()
        .sqrt();
    diff / moved
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adamw_with_fp16_gradients_follows_union_batch_adamw_and_fp16_state_does_not() {
    tokio::time::timeout(Duration::from_secs(240), async {
        let reference = union_batch();
        let per_role = swarm("codecs-role", Compression::Float16, Compression::None).await;
        let uniform = swarm("codecs-all", Compression::Float16, Compression::Float16).await;
        assert!(per_role.iter().all(|f| f == &per_role[0]), "peers differ");
        assert!(uniform.iter().all(|f| f == &uniform[0]), "peers differ");
        let good = relative_error(&per_role[0], &reference);
        let bad = relative_error(&uniform[0], &reference);
        eprintln!(
            "AdamW, {STEPS} steps, gradients about 1e-4: fp16 gradients + raw state off the \
             union-batch trajectory by {:.3} %, fp16 for everything by {:.1} %",
            100.0 * good,
            100.0 * bad
        );
        assert!(good < 0.01, "per-role codecs off by {good}");
        assert!(bad > 0.3, "fp16 state only off by {bad}");
    })
    .await
    .unwrap();
}
