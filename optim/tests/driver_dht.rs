//! The driver over real `colony-dht` nodes on 127.0.0.1 (progress records signed,
//! schema-checked, pushed over gossipsub), with the in-process averaging hub.

#![allow(clippy::unwrap_used)] // test code

mod common;

use std::{sync::Arc, time::Duration};

use colony_dht::dht_time;
use colony_optim::{
    AveragerConfig, CollaborativeOptimizer, DhtProgressBoard, Layout, LocalOptimizer,
    LocalOptimizerKind, ProgressBoard, Sgd, StepOutcome, TrainingProgress,
};
use common::{Hub, MemoryAverager, config, dataset, gradient, nodes, one_global_step};
use tokio::sync::mpsc;

const T: Duration = Duration::from_secs(90);

fn record(peer: &str, step: u64) -> TrainingProgress {
    TrainingProgress {
        peer_id: peer.into(),
        step,
        samples_accumulated: 5,
        samples_per_second: 2.0,
        time: dht_time(),
        client_mode: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_records_are_signed_validated_pushed_and_withdrawn() {
    tokio::time::timeout(T, async {
        let dhts = nodes(3).await;
        let (wake_tx, mut wake_rx) = mpsc::channel(4);
        let a = DhtProgressBoard::new(dhts[1].clone(), "run", None)
            .await
            .unwrap();
        let b = DhtProgressBoard::new(dhts[2].clone(), "run", Some(wake_tx))
            .await
            .unwrap();
        let _bootstrap = DhtProgressBoard::new(dhts[0].clone(), "run", None)
            .await
            .unwrap();
        // Gossipsub needs a moment to build its mesh; records also go through the DHT.
        let expiration = dht_time() + 30.0;
        let a_id = a.peer_id();
        a.publish(Some(record(&a_id, 3)), expiration).await.unwrap();
        let mut seen = None;
        for _ in 0..100 {
            let records = b.fetch().await.unwrap();
            if let Some(r) = records.iter().find(|r| r.key == a.self_key()) {
                seen = Some(r.clone());
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let seen = seen.expect("b reads a's record");
        assert_eq!(seen.progress.as_ref().unwrap().step, 3);
        assert!((seen.expiration - expiration).abs() < 1e-6);

        // The push reaches b once the mesh exists: re-publish until it does (bounded).
        let mut pushed = false;
        for i in 0..40 {
            a.publish(Some(record(&a_id, 4)), expiration + 1.0 + f64::from(i))
                .await
                .unwrap();
            if tokio::time::timeout(Duration::from_millis(250), wake_rx.recv())
                .await
                .is_ok()
            {
                pushed = true;
                break;
            }
        }
        assert!(pushed, "b is woken by a's pushed record");

        // Nobody can write under a's subkey: the DHT refuses to sign for a foreign owner.
        let forged = colony_schema::to_msgpack(&record("mallory", 1_000_000)).unwrap();
        assert!(
            dhts[2]
                .store(
                    b"run_progress",
                    Some(&a.self_key()),
                    forged,
                    expiration + 100.0
                )
                .await
                .is_err()
        );

        // Records that break the schema are refused (negative step, unknown field).
        #[derive(serde::Serialize)]
        struct Bad {
            peer_id: String,
            step: i64,
            samples_accumulated: u64,
            samples_per_second: f64,
            time: f64,
            client_mode: bool,
        }
        let negative = colony_schema::to_msgpack(&Bad {
            peer_id: "b".into(),
            step: -5,
            samples_accumulated: 0,
            samples_per_second: 0.0,
            time: dht_time(),
            client_mode: false,
        })
        .unwrap();
        let own = dhts[2].owner_subkey();
        assert!(
            dhts[2]
                .store(b"run_progress", Some(&own), negative, expiration)
                .await
                .is_err()
        );

        // b lies about its peer id (it claims to be a) in a record it signs itself: the
        // DHT stores it and gossip delivers it (neither can know), but the board drops
        // it, and a's own record is unaffected.
        b.publish(Some(record(&a_id, 99)), expiration)
            .await
            .unwrap();
        let mut served = false;
        for _ in 0..100 {
            let raw = dhts[1].get(b"run_progress", true).await.unwrap();
            if let Some(colony_dht::DhtValue::Dictionary(entries)) = raw
                && entries.contains_key(&b.self_key())
            {
                served = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(served, "the DHT serves b's record");
        let records = a.fetch().await.unwrap();
        assert!(
            records.iter().all(|r| r.key != b.self_key()),
            "a record naming another peer is dropped: {records:?}"
        );
        let own = records.iter().find(|r| r.key == a.self_key()).unwrap();
        assert_eq!(own.progress.as_ref().unwrap().peer_id, a_id);

        // A goodbye (nil) withdraws a's progress for every reader.
        a.publish(None, expiration + 200.0).await.unwrap();
        let mut gone = false;
        for _ in 0..100 {
            let records = b.fetch().await.unwrap();
            if records
                .iter()
                .any(|r| r.key == a.self_key() && r.progress.is_none())
            {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(gone, "b sees a's goodbye");
        for d in &dhts {
            d.shutdown().await;
        }
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_peers_over_the_dht_match_union_batch_sgd() {
    tokio::time::timeout(T, async {
        const PEERS: usize = 3;
        const BATCH: usize = 4;
        const STEPS: usize = 4;
        const DIM: usize = 3;
        let data = dataset(PEERS * BATCH * STEPS, DIM);
        let dhts = nodes(PEERS).await;
        let hub = Arc::new(Hub::default());
        *hub.expected.lock().unwrap() = PEERS;
        let mut handles = Vec::new();
        for (p, dht) in dhts.iter().enumerate() {
            let mut cfg = config((PEERS * BATCH) as u64);
            cfg.prefix = "equiv".into();
            let layout = Layout::packed([("w", vec![DIM])], 1).unwrap();
            let sgd = Sgd {
                momentum: 0.0,
                ..Sgd::default()
            };
            let local = LocalOptimizer::new(LocalOptimizerKind::Sgd(sgd), layout).unwrap();
            let averager = MemoryAverager {
                name: format!("p{p}"),
                hub: hub.clone(),
            };
            let mut opt = CollaborativeOptimizer::join_with(
                dht.clone(),
                cfg,
                vec![0.0; DIM],
                local,
                averager,
            )
            .await
            .unwrap();
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
                let params = opt.params().to_vec();
                opt.shutdown().await.unwrap();
                params
            }));
        }
        let finals = common::join_all(handles).await;
        let mut w = vec![0.0f32; DIM];
        for s in 0..STEPS {
            let g = gradient(&w, &data[s * PEERS * BATCH..(s + 1) * PEERS * BATCH]);
            for (wi, gi) in w.iter_mut().zip(g) {
                *wi -= 0.1 * gi;
            }
        }
        for params in &finals {
            for (a, b) in params.iter().zip(&w) {
                assert!((a - b).abs() <= 1e-5, "{params:?} vs {w:?}");
            }
        }
        for d in &dhts {
            d.shutdown().await;
        }
    })
    .await
    .unwrap();
}

/// The acceptance equivalence test on the real stack: 4 peers, each with its own DHT node
/// and `colony-averaging` averager (matchmaking, encrypted all-reduce) on 127.0.0.1, fixed
/// data shards, plain SGD: after 10 global steps every peer holds the parameters of one
/// process doing SGD on the union batch (within 1e-5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_peers_with_real_averaging_match_union_batch_sgd_after_10_steps() {
    tokio::time::timeout(Duration::from_secs(150), async {
        const PEERS: usize = 4;
        const BATCH: usize = 8;
        const STEPS: usize = 10;
        const DIM: usize = 6;
        let data = dataset(PEERS * BATCH * STEPS, DIM);
        let dhts = nodes(PEERS).await;
        let mut handles = Vec::new();
        for (p, dht) in dhts.iter().enumerate() {
            let mut cfg = config((PEERS * BATCH) as u64);
            cfg.prefix = "realavg".into();
            cfg.averaging_timeout = 30.0;
            let layout = Layout::packed([("w", vec![DIM])], 1).unwrap();
            let sgd = Sgd {
                momentum: 0.0,
                ..Sgd::default()
            };
            let local = LocalOptimizer::new(LocalOptimizerKind::Sgd(sgd), layout).unwrap();
            let mut acfg = AveragerConfig::new(cfg.averaging_prefix());
            acfg.target_group_size = Some(PEERS);
            acfg.min_matchmaking_time = Duration::from_secs(3);
            acfg.request_timeout = Duration::from_millis(1500);
            let mut opt =
                CollaborativeOptimizer::join(dht.clone(), cfg, acfg, vec![0.0; DIM], local)
                    .await
                    .unwrap();
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
        let mut w = vec![0.0f32; DIM];
        for s in 0..STEPS {
            let g = gradient(&w, &data[s * PEERS * BATCH..(s + 1) * PEERS * BATCH]);
            for (wi, gi) in w.iter_mut().zip(g) {
                *wi -= 0.1 * gi;
            }
        }
        for params in &finals {
            for (a, b) in params.iter().zip(&w) {
                assert!((a - b).abs() <= 1e-5, "{params:?} vs {w:?}");
            }
        }
        // The all-reduce hands every member the same averaged values: bit-identical.
        assert!(finals.iter().all(|f| f == &finals[0]));
        for d in &dhts {
            d.shutdown().await;
        }
    })
    .await
    .unwrap();
}

/// A peer whose averaging prefix is not its run's would never meet the others
/// and train alone without an error: `join` refuses it before starting anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_refuses_an_averaging_prefix_of_another_run() {
    let dht = nodes(1).await.remove(0);
    let cfg = config(8);
    let layout = Layout::packed([("w", vec![4])], 1).unwrap();
    let local = LocalOptimizer::new(LocalOptimizerKind::Sgd(Sgd::default()), layout).unwrap();
    let other = AveragerConfig::new(format!("{}x", cfg.averaging_prefix()));
    let res = CollaborativeOptimizer::join(dht.clone(), cfg, other, vec![0.0; 4], local).await;
    assert!(
        matches!(
            res,
            Err(colony_optim::OptimError::InvalidConfig {
                field: "averaging.prefix",
                ..
            })
        ),
        "{:?}",
        res.err()
    );
    dht.shutdown().await;
}
