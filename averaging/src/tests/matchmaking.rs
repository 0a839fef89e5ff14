//! Matchmaking over real DHT swarms, with a view of the averagers' internals so
//! that races can be staged deterministically.

use std::time::Duration;

use colony_dht::{Dht, DhtConfig, dht_time};

use crate::{AveragerConfig, DecentralizedAverager};

pub(super) async fn swarm(n: usize) -> Vec<Dht> {
    let cfg = || DhtConfig {
        query_timeout: Duration::from_secs(3),
        ..DhtConfig::default()
    };
    let first = Dht::new(cfg()).await.unwrap();
    let initial = first.listen_addrs();
    let mut nodes = vec![first];
    for _ in 1..n {
        nodes.push(
            Dht::new(DhtConfig {
                initial_peers: initial.clone(),
                ..cfg()
            })
            .await
            .unwrap(),
        );
    }
    nodes
}

pub(super) fn config(prefix: &str) -> AveragerConfig {
    let mut c = AveragerConfig::new(prefix);
    c.min_matchmaking_time = Duration::from_secs(2);
    c.request_timeout = Duration::from_secs(1);
    c.allreduce.part_size_bytes = 1024;
    c.allreduce.sender_timeout = Duration::from_secs(2);
    c.allreduce.reducer_timeout = Duration::from_secs(4);
    c.allreduce.allreduce_timeout = Duration::from_secs(20);
    c
}

/// Regression: a peer that already leads a follower must keep looking for a
/// better leader. B and D pair up first (one leads the other); then A and C
/// arrive with earlier deadlines, so they outrank B and D. Before the fix the
/// leader of the first pair stopped searching once it had a follower, and the
/// four peers split into two groups of two; now it joins the better leader
/// and redirects its follower there, and all four average together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_with_followers_moves_to_a_better_leader() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let nodes = swarm(4).await;
        let mut avgs = Vec::new();
        for (i, n) in nodes.iter().enumerate() {
            let mut c = config("better");
            c.target_group_size = Some(4);
            c.min_matchmaking_time = Duration::from_secs(10);
            avgs.push(
                DecentralizedAverager::new(n.clone(), vec![vec![i as f32; 64]], c)
                    .await
                    .unwrap(),
            );
        }
        let (b, d) = (avgs[1].clone(), avgs[3].clone());
        let first = [
            tokio::spawn(async move { b.step(None, Duration::from_secs(30)).await }),
            tokio::spawn(async move { d.step(None, Duration::from_secs(30)).await }),
        ];
        // Wait (bounded) until one of B and D leads the other.
        let mut leader_expiration = None;
        for _ in 0..1000 {
            for a in [&avgs[1], &avgs[3]] {
                if let (1, Some(e), true) = a.leader_state().await {
                    leader_expiration = Some(e);
                }
            }
            if leader_expiration.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let leader_expiration = leader_expiration.expect("B and D paired up");
        // A and C get deadlines before that leader's expiration: they lead.
        let window = leader_expiration - dht_time() - 1.5;
        assert!(window > 2.0, "pairing took too long to stage the race");
        let later: Vec<_> = [avgs[0].clone(), avgs[2].clone()]
            .into_iter()
            .map(|a| {
                tokio::spawn(async move { a.step(None, Duration::from_secs_f64(window)).await })
            })
            .collect();
        for h in first.into_iter().chain(later) {
            let out = h.await.unwrap().unwrap();
            assert_eq!(out.group.members.len(), 4);
        }
        let mean = (0..4).map(|i| i as f32).sum::<f32>() / 4.0;
        for a in &avgs {
            assert!(a.tensors().await[0].iter().all(|v| (v - mean).abs() < 1e-6));
        }
    })
    .await
    .expect("test timed out");
}

/// Cancelling a step in the middle of matchmaking stops it: joins are refused
/// and the declaration is dropped; the next step starts cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_step_leaves_matchmaking() {
    tokio::time::timeout(Duration::from_secs(60), async {
        let nodes = swarm(1).await;
        let a = DecentralizedAverager::new(nodes[0].clone(), vec![vec![1.0; 8]], config("cancel"))
            .await
            .unwrap();
        let stepping = a.clone();
        let h = tokio::spawn(async move { stepping.step(None, Duration::from_secs(30)).await });
        let mut declared = false;
        for _ in 0..1000 {
            if let (_, Some(_), true) = a.leader_state().await {
                declared = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(declared, "the step never started matchmaking");
        h.abort();
        assert!(h.await.unwrap_err().is_cancelled());
        assert_eq!(a.leader_state().await, (0, None, false));
        let res = a.step(None, Duration::from_millis(500)).await;
        assert!(
            matches!(res, Err(crate::AveragingError::NoGroupFound { .. })),
            "{res:?}"
        );
    })
    .await
    .expect("test timed out");
}
