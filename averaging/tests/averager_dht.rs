//! `DecentralizedAverager` over real `colony-dht` swarms in one process.

use std::time::Duration;

use colony_averaging::{AveragerConfig, AveragingError, DecentralizedAverager};
use colony_dht::{Dht, DhtConfig, dht_time};

const T: Duration = Duration::from_secs(90);

async fn swarm(n: usize) -> Vec<Dht> {
    let first = Dht::new(DhtConfig {
        query_timeout: Duration::from_secs(3),
        ..DhtConfig::default()
    })
    .await
    .expect("first dht node");
    let initial = first.listen_addrs();
    let mut nodes = vec![first];
    for _ in 1..n {
        nodes.push(
            Dht::new(DhtConfig {
                initial_peers: initial.clone(),
                query_timeout: Duration::from_secs(3),
                ..DhtConfig::default()
            })
            .await
            .expect("dht node"),
        );
    }
    nodes
}

fn config(prefix: &str) -> AveragerConfig {
    let mut c = AveragerConfig::new(prefix);
    c.min_matchmaking_time = Duration::from_secs(2);
    c.request_timeout = Duration::from_secs(1);
    c.allreduce.part_size_bytes = 4096;
    c.allreduce.sender_timeout = Duration::from_secs(2);
    c.allreduce.reducer_timeout = Duration::from_secs(4);
    c.allreduce.allreduce_timeout = Duration::from_secs(20);
    c
}

/// An averager on `node` whose tensors (the layout of [`values`]) are all
/// zero: a joiner that has no state yet.
async fn blank(node: &Dht, cfg: AveragerConfig) -> DecentralizedAverager {
    DecentralizedAverager::new(node.clone(), vec![vec![0.0; 3000], vec![0.0; 5]], cfg)
        .await
        .expect("blank averager")
}

fn values(i: usize) -> Vec<Vec<f32>> {
    vec![
        (0..3000).map(|j| (i * 31 + j % 97) as f32 * 0.01).collect(),
        vec![i as f32; 5],
    ]
}

fn max_dev(all: &[Vec<Vec<f32>>], mean: &[Vec<f64>]) -> f64 {
    all.iter()
        .flat_map(|t| t.iter().zip(mean).flat_map(|(a, m)| a.iter().zip(m)))
        .map(|(a, m)| (f64::from(*a) - m).abs())
        .fold(0.0, f64::max)
}

fn mean_of(init: &[Vec<Vec<f32>>], weights: &[f64]) -> Vec<Vec<f64>> {
    let ws: f64 = weights.iter().sum();
    (0..init[0].len())
        .map(|t| {
            (0..init[0][t].len())
                .map(|j| {
                    init.iter()
                        .zip(weights)
                        .map(|(v, w)| w * f64::from(v[t][j]))
                        .sum::<f64>()
                        / ws
                })
                .collect()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_averagers_find_each_other_and_average() {
    tokio::time::timeout(T, async {
        let nodes = swarm(4).await;
        let mut avgs = Vec::new();
        for (i, n) in nodes.iter().enumerate() {
            let mut c = config("four");
            c.target_group_size = Some(4);
            // The group assembles as soon as all four have joined; the long
            // window only matters on a loaded 2-core CI box, where a peer's
            // first DHT round trips can take seconds.
            c.min_matchmaking_time = Duration::from_secs(8);
            c.request_timeout = Duration::from_secs(3);
            avgs.push(
                DecentralizedAverager::new(n.clone(), values(i), c)
                    .await
                    .unwrap(),
            );
        }
        let weights = [1.0, 2.0, 3.0, 4.0];
        let init: Vec<_> = (0..4).map(values).collect();
        let outs = futures::future::join_all(
            avgs.iter()
                .zip(weights)
                .map(|(a, w)| a.step(Some(w as f32), Duration::from_secs(20))),
        )
        .await;
        for o in &outs {
            let o = o.as_ref().unwrap();
            assert_eq!(o.group.members.len(), 4);
            assert!(o.round.failed_reducers.is_empty() && o.round.banned_senders.is_empty());
        }
        let mean = mean_of(&init, &weights);
        let mut finals = Vec::new();
        for a in &avgs {
            finals.push(a.tensors().await.clone());
        }
        assert!(
            max_dev(&finals, &mean) < 1e-5,
            "dev {}",
            max_dev(&finals, &mean)
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moshpit_grid_of_eight_converges_to_the_global_mean() {
    tokio::time::timeout(Duration::from_secs(150), async {
        let nodes = swarm(8).await;
        let mut avgs = Vec::new();
        for (i, n) in nodes.iter().enumerate() {
            let mut c = config("grid");
            c.target_group_size = Some(2);
            c.initial_group_bits = format!("{:02b}", i % 4);
            avgs.push(
                DecentralizedAverager::new(n.clone(), values(i), c)
                    .await
                    .unwrap(),
            );
        }
        let init: Vec<_> = (0..8).map(values).collect();
        let mean = mean_of(&init, &[1.0; 8]);
        let mut devs = Vec::new();
        for _round in 0..3 {
            let outs = futures::future::join_all(
                avgs.iter().map(|a| a.step(None, Duration::from_secs(20))),
            )
            .await;
            for o in &outs {
                assert_eq!(o.as_ref().unwrap().group.members.len(), 2);
            }
            let mut finals = Vec::new();
            for a in &avgs {
                finals.push(a.tensors().await.clone());
            }
            devs.push(max_dev(&finals, &mean));
        }
        // Pairs, then fours, then everyone: exact after three rounds.
        assert!(devs[0] > devs[1] && devs[1] > devs[2], "{devs:?}");
        assert!(devs[2] < 1e-4, "{devs:?}");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alone_is_no_group_and_late_joiner_copies_state() {
    tokio::time::timeout(T, async {
        let nodes = swarm(4).await;
        let donor = DecentralizedAverager::new(nodes[0].clone(), values(7), config("state"))
            .await
            .unwrap();
        let res = donor.step(None, Duration::from_secs(3)).await;
        assert!(
            matches!(res, Err(AveragingError::NoGroupFound { .. })),
            "{res:?}"
        );

        let mut weak_cfg = config("state");
        weak_cfg.allow_state_sharing = Some(true);
        let weak = DecentralizedAverager::new(nodes[1].clone(), values(1), weak_cfg)
            .await
            .unwrap();
        donor
            .declare_state(10.0, b"step 10".to_vec(), dht_time() + 60.0)
            .await
            .unwrap();
        weak.declare_state(1.0, b"step 1".to_vec(), dht_time() + 60.0)
            .await
            .unwrap();

        // The two donors hold different states, so neither is vouched for
        // by two donors: a joiner with the default rule installs nothing...
        let picky = blank(&nodes[2], config("state")).await;
        let res = picky.load_state_from_peers(Duration::from_secs(20)).await;
        assert!(
            matches!(
                res,
                Err(AveragingError::NoVouchedState {
                    donors: 2,
                    best_vouchers: 1,
                    needed: 2
                })
            ),
            "{res:?}"
        );
        assert!(picky.tensors().await.iter().flatten().all(|&x| x == 0.0));
        picky.shutdown();
        // ...and one that trusts single donors takes the highest priority.
        let mut trusting = config("state");
        trusting.state_vouchers = 1;
        let late = blank(&nodes[3], trusting).await;
        let meta = late
            .load_state_from_peers(Duration::from_secs(20))
            .await
            .unwrap();
        assert_eq!(meta, b"step 10");
        let got = late.tensors().await.clone();
        let want = donor.tensors().await.clone();
        assert_eq!(got.len(), want.len());
        for (a, b) in got.iter().zip(&want) {
            assert!(a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()));
        }
        // A joiner with a different tensor layout accepts no one's state.
        let mut other_cfg = config("state");
        other_cfg.mode = colony_averaging::AveragingMode::Client;
        other_cfg.state_vouchers = 1;
        let other = DecentralizedAverager::new(nodes[2].clone(), vec![vec![0.0; 10]], other_cfg)
            .await
            .unwrap();
        let res = other.load_state_from_peers(Duration::from_secs(10)).await;
        assert!(
            matches!(res, Err(AveragingError::NoStateDonor { .. })),
            "{res:?}"
        );
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_and_aux_peers_join_through_the_dht() {
    use colony_averaging::AveragingMode::{Aux, Client, Node};
    tokio::time::timeout(T, async {
        let nodes = swarm(4).await;
        let modes = [Client, Aux, Node, Node];
        let mut avgs = Vec::new();
        for (i, (n, mode)) in nodes.iter().zip(modes).enumerate() {
            let mut c = config("modes");
            c.target_group_size = Some(4);
            c.mode = mode;
            avgs.push(
                DecentralizedAverager::new(n.clone(), values(i), c)
                    .await
                    .unwrap(),
            );
        }
        let init: Vec<_> = (0..4).map(values).collect();
        let weights = [2.0, 0.0, 1.0, 3.0];
        let outs = futures::future::join_all(
            avgs.iter()
                .zip(weights)
                .map(|(a, w)| a.step(Some(w as f32), Duration::from_secs(20))),
        )
        .await;
        let errs: Vec<String> = outs
            .iter()
            .enumerate()
            .filter_map(|(i, o)| o.as_ref().err().map(|e| format!("{i}: {e}")))
            .collect();
        assert!(errs.is_empty(), "{errs:?}");
        for o in &outs {
            let o = o.as_ref().unwrap();
            assert_eq!(o.group.members.len(), 4);
            let client = o
                .group
                .members
                .iter()
                .position(|m| m.mode == Client)
                .unwrap();
            assert_eq!(o.round.span_sizes[client], 0, "clients reduce nothing");
        }
        let mean = mean_of(&init, &weights);
        for (i, a) in avgs.iter().enumerate() {
            let got = a.tensors().await.clone();
            if modes[i] == Aux {
                assert_eq!(got, init[i], "aux peers keep their tensors");
            } else {
                assert!(max_dev(&[got], &mean) < 1e-5);
            }
        }
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_declaration_outlives_its_first_expiration_and_is_withdrawn_on_shutdown() {
    tokio::time::timeout(T, async {
        let nodes = swarm(2).await;
        let donor = DecentralizedAverager::new(nodes[0].clone(), values(3), config("redeclare"))
            .await
            .unwrap();
        // A 2 s lifetime: the donor re-declares every second (half of it).
        let first_expiration = dht_time() + 2.0;
        donor
            .declare_state(5.0, b"step 5".to_vec(), first_expiration)
            .await
            .unwrap();
        let late = blank(&nodes[1], config("redeclare")).await;
        // The passage of time is what is tested here: go past the moment the
        // first declaration expires.
        let past = first_expiration + 1.0 - dht_time();
        tokio::time::sleep(Duration::from_secs_f64(past.max(0.0))).await;
        let meta = late
            .load_state_from_peers(Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(meta, b"step 5");
        assert_eq!(*late.tensors().await, values(3));

        // Shutdown withdraws the declaration: the joiner soon finds no donor
        // at all (not a donor it cannot download from).
        donor.shutdown();
        let mut withdrawn = false;
        for _ in 0..100 {
            match late.load_state_from_peers(Duration::from_secs(5)).await {
                Err(AveragingError::NoStateDonor { tried: 0 }) => {
                    withdrawn = true;
                    break;
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        assert!(withdrawn, "the donor's declaration was not withdrawn");
    })
    .await
    .expect("test timed out");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn withdraw_state_removes_the_declaration_at_once() {
    tokio::time::timeout(T, async {
        let nodes = swarm(2).await;
        let donor = DecentralizedAverager::new(nodes[0].clone(), values(2), config("withdraw"))
            .await
            .unwrap();
        donor
            .declare_state(1.0, b"m".to_vec(), dht_time() + 60.0)
            .await
            .unwrap();
        let late = DecentralizedAverager::new(nodes[1].clone(), values(0), config("withdraw"))
            .await
            .unwrap();
        assert_eq!(
            late.load_state_from_peers(Duration::from_secs(10))
                .await
                .unwrap(),
            b"m"
        );
        donor.withdraw_state().await.unwrap();
        let res = late.load_state_from_peers(Duration::from_secs(10)).await;
        assert!(
            matches!(res, Err(AveragingError::NoStateDonor { tried: 0 })),
            "{res:?}"
        );
    })
    .await
    .expect("test timed out");
}

#[test]
fn announced_address_is_validated() {
    let with = |addr: &str, mode| {
        let mut c = config("announce");
        c.data_announce_addr = Some(addr.parse().unwrap());
        c.mode = mode;
        c.validate()
    };
    use colony_averaging::AveragingMode::{Client, Node};
    assert!(with("203.0.113.5:7000", Node).is_ok());
    for bad in [
        "0.0.0.0:7000",
        "203.0.113.5:0",
        "[::]:7000",
        "224.0.0.1:7000",
    ] {
        assert!(
            matches!(
                with(bad, Node),
                Err(AveragingError::InvalidConfig {
                    field: "data_announce_addr",
                    ..
                })
            ),
            "{bad}"
        );
    }
    assert!(with("203.0.113.5:7000", Client).is_err());
}

/// A peer behind "port forwarding" (a TCP forwarder on another port) announces
/// the forwarder's address; a peer bound to 0.0.0.0 announces a usable IP.
/// Group members get exactly those addresses and the round runs through them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_connect_to_the_announced_data_address() {
    use std::sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    };
    tokio::time::timeout(T, async {
        let nodes = swarm(2).await;
        let forwarder = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let public = forwarder.local_addr().unwrap();
        let mut ca = config("announce");
        ca.target_group_size = Some(2);
        ca.data_announce_addr = Some(public);
        let a = DecentralizedAverager::new(nodes[0].clone(), values(0), ca)
            .await
            .unwrap();
        assert_eq!(a.data_addr(), Some(public));
        let bound = a.data_listen_addr().unwrap();
        assert_ne!(bound, public);
        let forwarded = Arc::new(AtomicUsize::new(0));
        let count = forwarded.clone();
        let fwd = tokio::spawn(async move {
            loop {
                let (mut inbound, _) = forwarder.accept().await.unwrap();
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(bound).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
            }
        });

        let mut cb = config("announce");
        cb.target_group_size = Some(2);
        cb.data_listen_addr = "0.0.0.0:0".parse().unwrap();
        let b = DecentralizedAverager::new(nodes[1].clone(), values(1), cb)
            .await
            .unwrap();
        let b_addr = b.data_addr().unwrap();
        assert!(!b_addr.ip().is_unspecified(), "{b_addr}");
        assert!(b_addr.ip().is_loopback(), "the DHT listens on 127.0.0.1");
        assert_eq!(b_addr.port(), b.data_listen_addr().unwrap().port());

        let (oa, ob) = tokio::join!(
            a.step(None, Duration::from_secs(20)),
            b.step(None, Duration::from_secs(20))
        );
        let (oa, ob) = (oa.unwrap(), ob.unwrap());
        for o in [&oa, &ob] {
            let addr_of = |id: &[u8]| {
                o.group
                    .members
                    .iter()
                    .find(|m| m.peer_id == id)
                    .unwrap()
                    .data_addr
            };
            assert_eq!(addr_of(a.peer_id()), Some(public));
            assert_eq!(addr_of(b.peer_id()), Some(b_addr));
            assert!(o.round.failed_reducers.is_empty() && o.round.banned_senders.is_empty());
        }
        assert!(
            forwarded.load(Ordering::SeqCst) > 0,
            "b reached a through the announced address"
        );
        let mean = mean_of(&[values(0), values(1)], &[1.0, 1.0]);
        let finals = vec![a.tensors().await.clone(), b.tensors().await.clone()];
        assert!(max_dev(&finals, &mean) < 1e-5);
        fwd.abort();
    })
    .await
    .expect("test timed out");
}

/// A peer without the averager squats the matchmaking and donors' keys with
/// day-long regular values and declares a group slot and a state (priority
/// 1e300) in another peer's name. Matchmaking, the round and the state
/// download go on as if it were not there: storers let the peers' signed
/// subkeys replace the regular values, and every averager refuses both the
/// regular values and the entries that name someone other than their owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn squatted_keys_and_impersonating_entries_change_nothing() {
    tokio::time::timeout(T, async {
        let nodes = swarm(4).await;
        let squatter = &nodes[0];
        let victim = nodes[1].peer_id().to_bytes();
        let day = dht_time() + 86_000.0;
        let regular = rmp_serde::to_vec(&(serde_bytes::Bytes::new(&victim), false)).unwrap();
        for key in ["squat.0b", "squat.all_averagers"] {
            let out = squatter
                .store(key.as_bytes(), None, regular.clone(), day)
                .await
                .unwrap();
            assert!(out.accepted && out.replicas > 0, "{key}: {out:?}");
        }
        let slot = rmp_serde::to_vec(&(serde_bytes::Bytes::new(&victim), false)).unwrap();
        let me = squatter.owner_subkey();
        squatter
            .store(b"squat.0b", Some(&me), slot, dht_time() + 60.0)
            .await
            .unwrap();
        let donor = rmp_serde::to_vec(&(
            serde_bytes::Bytes::new(&victim),
            1e300,
            serde_bytes::Bytes::new(&[7; 32]),
        ))
        .unwrap();
        squatter
            .store(b"squat.all_averagers", Some(&me), donor, dht_time() + 600.0)
            .await
            .unwrap();

        let mut c = config("squat");
        c.target_group_size = Some(2);
        c.min_matchmaking_time = Duration::from_secs(4);
        let mut avgs = Vec::new();
        for (i, node) in nodes.iter().enumerate().take(3).skip(1) {
            avgs.push(
                DecentralizedAverager::new(node.clone(), values(i), c.clone())
                    .await
                    .unwrap(),
            );
        }
        let init: Vec<_> = (1..3).map(values).collect();
        let outs = futures::future::join_all(
            avgs.iter()
                .map(|a| a.step(Some(1.0), Duration::from_secs(20))),
        )
        .await;
        for o in &outs {
            let o = o.as_ref().unwrap();
            assert_eq!(o.group.members.len(), 2);
        }
        let mean = mean_of(&init, &[1.0, 1.0]);
        let mut finals = Vec::new();
        for a in &avgs {
            finals.push(a.tensors().await.clone());
        }
        assert!(max_dev(&finals, &mean) < 1e-5);

        avgs[0]
            .declare_state(3.0, b"honest".to_vec(), dht_time() + 60.0)
            .await
            .unwrap();
        let late = blank(&nodes[3], config("squat")).await;
        let meta = late
            .load_state_from_peers(Duration::from_secs(20))
            .await
            .unwrap();
        assert_eq!(meta, b"honest");
        let got = late.tensors().await.clone();
        assert_eq!(got, finals[0]);
    })
    .await
    .expect("test timed out");
}

/// Two honest peers that averaged together hold one state and vouch for it;
/// a third declares a backdoored one (finite values) with priority 1e300.
/// A joiner installs the honest state, downloaded from both honest donors;
/// beside a single honest donor, the liar's state is never installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backdoored_state_with_a_huge_priority_is_not_installed() {
    tokio::time::timeout(T, async {
        let nodes = swarm(5).await;
        let mut c = config("vouch");
        c.target_group_size = Some(2);
        let honest: Vec<_> = futures::future::join_all(
            (0..2).map(|i| DecentralizedAverager::new(nodes[i].clone(), values(i), c.clone())),
        )
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
        let outs = futures::future::join_all(
            honest
                .iter()
                .map(|a| a.step(Some(1.0), Duration::from_secs(20))),
        )
        .await;
        for o in &outs {
            assert_eq!(o.as_ref().unwrap().group.members.len(), 2);
        }
        let averaged = honest[0].tensors().await.clone();
        for a in &honest {
            a.declare_state(10.0, b"step 10".to_vec(), dht_time() + 60.0)
                .await
                .unwrap();
        }
        let backdoor = vec![vec![666.0; 3000], vec![666.0; 5]];
        let liar = DecentralizedAverager::new(nodes[2].clone(), backdoor, config("vouch"))
            .await
            .unwrap();
        liar.declare_state(1e300, b"step 1e300".to_vec(), dht_time() + 60.0)
            .await
            .unwrap();

        let joiner = blank(&nodes[3], config("vouch")).await;
        let started = std::time::Instant::now();
        let got = joiner
            .download_state_from_peers(Duration::from_secs(20), f64::INFINITY)
            .await
            .unwrap();
        eprintln!(
            "vouched download beside a 1e300 liar: {:.0} ms, chunks per donor {:?}",
            started.elapsed().as_secs_f64() * 1e3,
            got.donors
        );
        assert_eq!(got.metadata, b"step 10");
        assert_eq!(got.vouchers, 2);
        assert_eq!(got.tensors, averaged);
        assert!(got.donors.iter().all(|(p, _)| *p != nodes[2].peer_id()));
        // Nothing was installed: the caller decides.
        assert!(joiner.tensors().await.iter().flatten().all(|&x| x == 0.0));
        joiner.install_state(got.tensors).await.unwrap();
        assert_eq!(*joiner.tensors().await, averaged);

        // One honest donor beside the liar: two live donors disagree, so no
        // state is vouched for, and the joiner keeps its own tensors.
        honest[1].withdraw_state().await.unwrap();
        let second = blank(&nodes[4], config("vouch")).await;
        let res = second.load_state_from_peers(Duration::from_secs(20)).await;
        assert!(
            matches!(res, Err(AveragingError::NoVouchedState { donors: 2, .. })),
            "{res:?}"
        );
        assert!(second.tensors().await.iter().flatten().all(|&x| x == 0.0));
    })
    .await
    .expect("test timed out");
}

/// Peers whose wire codecs differ are refused at join (the codecs are part
/// of the schema): no round mixes two encodings of one tensor, and each
/// side's step fails with no group rather than mid-round. Two peers with
/// the same per-tensor codecs average.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_with_other_codecs_never_group_and_matching_ones_do() {
    use colony_averaging::Compression;
    tokio::time::timeout(T, async {
        let nodes = swarm(3).await;
        let with = |codecs: Vec<Compression>| {
            let mut c = config("codecs");
            c.target_group_size = Some(2);
            c.allreduce.tensor_compression = codecs;
            c
        };
        let raw_fp16 = vec![Compression::None, Compression::Float16];
        let a = DecentralizedAverager::new(nodes[0].clone(), values(0), with(raw_fp16.clone()))
            .await
            .unwrap();
        let b = DecentralizedAverager::new(
            nodes[1].clone(),
            values(1),
            with(vec![Compression::Float16, Compression::Float16]),
        )
        .await
        .unwrap();
        let (ra, rb) = tokio::join!(
            a.step(None, Duration::from_secs(6)),
            b.step(None, Duration::from_secs(6))
        );
        for r in [&ra, &rb] {
            assert!(
                matches!(r, Err(AveragingError::NoGroupFound { .. })),
                "{r:?}"
            );
        }
        assert_eq!(a.tensors().await.clone(), values(0), "nothing applied");
        b.shutdown();
        // A codec list for another number of tensors fails at start.
        let wrong =
            DecentralizedAverager::new(nodes[1].clone(), values(1), with(vec![Compression::None]))
                .await;
        assert!(
            matches!(
                wrong,
                Err(AveragingError::InvalidConfig {
                    field: "tensor_compression",
                    ..
                })
            ),
            "{:?}",
            wrong.err()
        );
        let c = DecentralizedAverager::new(nodes[2].clone(), values(1), with(raw_fp16))
            .await
            .unwrap();
        let (ra, rc) = tokio::join!(
            a.step(None, Duration::from_secs(20)),
            c.step(None, Duration::from_secs(20))
        );
        assert_eq!(ra.unwrap().group.members.len(), 2);
        assert_eq!(rc.unwrap().group.members.len(), 2);
        let (ta, tc) = (a.tensors().await.clone(), c.tensors().await.clone());
        assert!(
            ta.iter()
                .flatten()
                .zip(tc.iter().flatten())
                .all(|(x, y)| x.to_bits() == y.to_bits()),
            "members differ"
        );
        // The raw tensor holds the exact mean.
        let mean = mean_of(&[values(0), values(1)], &[1.0, 1.0]);
        let err = ta[0]
            .iter()
            .zip(&mean[0])
            .map(|(x, m)| (f64::from(*x) - m).abs())
            .fold(0.0, f64::max);
        assert!(err < 1e-5, "raw tensor off by {err}");
    })
    .await
    .expect("test timed out");
}
