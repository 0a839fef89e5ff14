use super::support::*;
use crate::{AllreduceConfig, AveragingError, AveragingMode, Compression, TensorLayout};

fn modes(clients: usize, aux: usize) -> Vec<AveragingMode> {
    (0..4)
        .map(|i| {
            if i < clients {
                AveragingMode::Client
            } else if i < clients + aux {
                AveragingMode::Aux
            } else {
                AveragingMode::Node
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_peers_every_mode_mix_reach_the_weighted_mean() {
    for clients in 0..=2 {
        for aux in 0..=1 {
            let modes = modes(clients, aux);
            let weights = [1.0, 2.5, 0.5, 3.0];
            let peers = make_peers(&modes, &weights).await;
            let bandwidths = [None, Some(2.0), None, Some(1.0)];
            let group = group_of(&peers, [clients as u8 * 2 + aux as u8; 32], &bandwidths);
            let cfg = test_config(Compression::None);
            let outcomes = run_all(&peers, &group, &cfg).await;
            let senders: Vec<usize> = (0..4).filter(|&i| modes[i] != AveragingMode::Aux).collect();
            let expected = weighted_mean(&peers, &senders);
            let layout = TensorLayout::new(&LENGTHS);
            for (i, (peer, out)) in peers.iter().zip(outcomes).enumerate() {
                let out = out.unwrap_or_else(|e| panic!("peer {i} ({clients}c/{aux}a): {e}"));
                assert!(out.failed_reducers.is_empty(), "{:?}", out.failed_reducers);
                assert!(out.banned_senders.is_empty(), "{:?}", out.banned_senders);
                for (m, size) in modes.iter().zip(&out.span_sizes) {
                    if *m == AveragingMode::Client {
                        assert_eq!(*size, 0);
                    }
                }
                let mut mine = peer.tensors.clone();
                out.apply(&layout, &mut mine, 1.0).unwrap();
                if peer.mode == AveragingMode::Aux {
                    assert_eq!(mine, peer.tensors, "aux peers receive nothing");
                    continue;
                }
                let err = max_err(&mine, &expected);
                assert!(err < 1e-6, "peer {i} ({clients}c/{aux}a): err {err}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_rounds_stay_within_codec_error() {
    for (compression, tol) in [
        (Compression::Float16, 2e-3),
        // 8 significant bits, rounded up and down: < 2 · 2^-9 on values in [-1, 1].
        (Compression::BFloat16, 4e-3),
        (Compression::Blockwise8Bit, 3e-2),
    ] {
        let modes = modes(1, 0);
        let peers = make_peers(&modes, &[1.0, 1.0, 2.0, 1.0]).await;
        let group = group_of(&peers, [9; 32], &[]);
        let outcomes = run_all(&peers, &group, &test_config(compression)).await;
        let expected = weighted_mean(&peers, &[0, 1, 2, 3]);
        let layout = TensorLayout::new(&LENGTHS);
        let mut applied = Vec::new();
        for (peer, out) in peers.iter().zip(outcomes) {
            let mut mine = peer.tensors.clone();
            out.unwrap().apply(&layout, &mut mine, 1.0).unwrap();
            let err = max_err(&mine, &expected);
            assert!(err < tol, "{compression:?}: err {err}");
            assert!(err > 0.0, "{compression:?} should be lossy on random data");
            applied.push(mine);
        }
        // Every member applies the same decoded bytes, reducers included for
        // their own spans: all end bit-identical.
        assert_bit_identical(&applied, &format!("{compression:?}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_bit_parts_of_several_blocks_apply_across_tensor_boundaries() {
    // Spans of ~10 K values in one part each (3 blocks of 4096), with tensor
    // boundaries inside blocks: results are staged in wire form and decoded
    // into each tensor from the middle of a block.
    const BIG: [usize; 4] = [20_000, 3, 17_001, 4_100];
    let mut peers = make_peers(&modes(0, 0), &[1.0, 3.0, 1.0, 1.0]).await;
    for (i, p) in peers.iter_mut().enumerate() {
        p.tensors = tensors_for(i, &BIG);
    }
    let group = group_of(&peers, [5; 32], &[]);
    let cfg = AllreduceConfig {
        part_size_bytes: 3 * 4100,
        ..test_config(Compression::Blockwise8Bit)
    };
    let outcomes = run_all(&peers, &group, &cfg).await;
    let expected = weighted_mean(&peers, &[0, 1, 2, 3]);
    let layout = TensorLayout::new(&BIG);
    for (peer, out) in peers.iter().zip(outcomes) {
        let out = out.unwrap();
        assert_eq!(out.averaged_elements(), layout.total());
        let mut mine = peer.tensors.clone();
        out.apply(&layout, &mut mine, 1.0).unwrap();
        let err = max_err(&mine, &expected);
        assert!(err < 3e-2 && err > 0.0, "err {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpha_moves_part_of_the_way() {
    // fp32 results are staged as values, compressed ones in wire form: both.
    for (compression, tol) in [
        (Compression::None, 1e-6),
        (Compression::Float16, 2e-3),
        (Compression::BFloat16, 4e-3),
        (Compression::Blockwise8Bit, 3e-2),
    ] {
        let peers = make_peers(&modes(0, 0), &[1.0; 4]).await;
        let group = group_of(&peers, [3; 32], &[]);
        let outcomes = run_all(&peers, &group, &test_config(compression)).await;
        let expected = weighted_mean(&peers, &[0, 1, 2, 3]);
        let layout = TensorLayout::new(&LENGTHS);
        let out = outcomes.into_iter().next().unwrap().unwrap();
        let mut mine = peers[0].tensors.clone();
        out.apply(&layout, &mut mine, 0.5).unwrap();
        let halfway: Vec<Vec<f64>> = expected
            .iter()
            .zip(&peers[0].tensors)
            .map(|(e, l)| {
                e.iter()
                    .zip(l)
                    .map(|(e, l)| 0.5 * (e + f64::from(*l)))
                    .collect()
            })
            .collect();
        let err = max_err(&mine, &halfway);
        assert!(err < tol, "{compression:?}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_nan_withdraws_and_still_reduces_its_span() {
    // Peer 1's tensors hold NaN or inf in the first part of its own span
    // (peer 0 is a client, which reduces nothing), so peer 1 finds it before
    // it sends anything and withdraws from every reducer in place of its
    // hello: nobody waits for its parts (a wait would end in a Stalled ban
    // after sender_timeout), and it still reduces its own span. The others
    // average everything over the three finite peers.
    for (bad, compression) in [
        (f32::NAN, Compression::None),
        (f32::INFINITY, Compression::Float16),
    ] {
        let mut peers = make_peers(&modes(1, 0), &[1.0, 5.0, 2.0, 1.0]).await;
        peers[1].tensors[0][5] = bad;
        let group = group_of(&peers, [6; 32], &[]);
        assert!(span_parts(&group, 1)[0].contains(&5));
        let outcomes = run_all(&peers, &group, &test_config(compression)).await;
        let expected = weighted_mean(&peers, &[0, 2, 3]);
        for (i, mine) in applied_around_withdrawn(&peers, outcomes, 1) {
            let err = max_err(&mine, &expected);
            assert!(
                err < tol_of(compression),
                "peer {i} {compression:?}: err {err}"
            );
        }
    }
}

fn tol_of(compression: Compression) -> f64 {
    if compression == Compression::None {
        1e-6
    } else {
        2e-3
    }
}

/// Checks that peer `withdrawn` ended in `NonFiniteLocal` and every other
/// peer's round fully averaged with no ban and no failed reducer (withdrawing
/// is not a fault); returns the others' tensors with their results applied.
fn applied_around_withdrawn(
    peers: &[Peer],
    outcomes: Vec<crate::Result<crate::RoundOutcome>>,
    withdrawn: usize,
) -> Vec<(usize, Vec<Vec<f32>>)> {
    let layout = TensorLayout::new(&LENGTHS);
    let mut applied = Vec::new();
    for (i, (peer, out)) in peers.iter().zip(outcomes).enumerate() {
        if i == withdrawn {
            assert!(
                matches!(out, Err(AveragingError::NonFiniteLocal)),
                "{out:?}"
            );
            continue;
        }
        let out = out.unwrap();
        assert!(out.banned_senders.is_empty(), "{:?}", out.banned_senders);
        assert!(out.failed_reducers.is_empty(), "{:?}", out.failed_reducers);
        assert_eq!(out.averaged_elements(), layout.total(), "peer {i}");
        let mut mine = peer.tensors.clone();
        out.apply(&layout, &mut mine, 1.0).unwrap();
        applied.push((i, mine));
    }
    applied
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nan_found_mid_stream_withdraws_from_the_remaining_parts() {
    // Peer 1's poison sits in the last reducer's span, so peer 1 finds it only
    // when it encodes that part, after it has contributed its own span (and
    // perhaps parts of the other spans). Every part's average is then the
    // weighted mean over either all four peers or the three others, never
    // anything poisoned; the poisoned part's is over the three others.
    // Also with the poison in the last part of peer 1's own span (flat 2000 of
    // 1005..2010), found by its own-contribution pass while parts stream.
    for (compression, bad) in [
        (Compression::None, (2, LENGTHS[2] - 2)),
        (Compression::Float16, (2, LENGTHS[2] - 2)),
        (Compression::None, (2, 2000 - 1017)),
    ] {
        let mut peers = make_peers(&modes(0, 0), &[1.0, 5.0, 2.0, 1.0]).await;
        peers[1].tensors[bad.0][bad.1] = f32::NAN;
        let group = group_of(&peers, [8; 32], &[]);
        let outcomes = run_all(&peers, &group, &test_config(compression)).await;
        let mut clean = peers.iter().map(|p| p.tensors.clone()).collect::<Vec<_>>();
        clean[1][bad.0][bad.1] = 0.0;
        let without = weighted_mean(&peers, &[0, 2, 3]);
        let tol = tol_of(compression);
        for (i, mine) in applied_around_withdrawn(&peers, outcomes, 1) {
            // The mean over all four, with peer 1's finite values.
            let wsum: f64 = peers.iter().map(|p| f64::from(p.weight)).sum();
            for (t, tensor) in mine.iter().enumerate() {
                for (j, v) in tensor.iter().enumerate() {
                    let with: f64 = peers
                        .iter()
                        .zip(&clean)
                        .map(|(p, c)| f64::from(p.weight) * f64::from(c[t][j]))
                        .sum::<f64>()
                        / wsum;
                    let v = f64::from(*v);
                    assert!(v.is_finite(), "peer {i}: ({t}, {j}) not finite");
                    let near_without = (v - without[t][j]).abs() < tol;
                    assert!(
                        near_without || (v - with).abs() < tol,
                        "peer {i} {compression:?}: ({t}, {j}) = {v} is neither mean"
                    );
                    if (t, j) == bad {
                        assert!(near_without, "the poisoned part must leave peer 1 out");
                    }
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nan_in_an_unreachable_reducers_span_is_still_reported() {
    // Reducer 3 refuses connections, so peer 0 never encodes (nor checks) its
    // parts of span 3, where its poison sits: the check after the round
    // still reports NonFiniteLocal instead of results for poisoned tensors.
    let mut peers = make_peers(&modes(0, 0), &[1.0; 4]).await;
    peers[0].tensors[2][LENGTHS[2] - 2] = f32::NAN;
    let mut group = group_of(&peers, [0x31; 32], &[]);
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    group.members[3].data_addr = Some(closed.local_addr().unwrap());
    drop(closed);
    let outcomes = run_some(&peers, &group, 0..3, &test_config(Compression::None)).await;
    let mut outcomes = outcomes.into_iter();
    let first = outcomes.next().unwrap();
    assert!(
        matches!(first, Err(AveragingError::NonFiniteLocal)),
        "{first:?}"
    );
    for out in outcomes {
        let out = out.unwrap();
        assert!(out.failed_reducers.iter().any(|(r, _)| *r == 3));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_local_input_and_config_are_typed_errors() {
    let peers = make_peers(&modes(0, 0), &[1.0; 4]).await;
    let group = group_of(&peers, [4; 32], &[]);
    let layout = TensorLayout::new(&LENGTHS);
    let cfg = test_config(Compression::None);
    let p = &peers[0];
    let res =
        crate::round::run_allreduce(&p.plane, &group, 7, &p.keys, &layout, &p.tensors, 1.0, &cfg)
            .await;
    assert!(matches!(res, Err(AveragingError::InvalidGroup { .. })));
    let bad_cfg = crate::AllreduceConfig {
        reducer_timeout: cfg.sender_timeout,
        ..cfg.clone()
    };
    let res = crate::round::run_allreduce(
        &p.plane,
        &group,
        1,
        &p.keys,
        &layout,
        &peers[1].tensors,
        1.0,
        &bad_cfg,
    )
    .await;
    assert!(matches!(res, Err(AveragingError::InvalidConfig { .. })));
    let wrong = vec![vec![0.0f32; 5]];
    let res =
        crate::round::run_allreduce(&p.plane, &group, 1, &p.keys, &layout, &wrong, 1.0, &cfg).await;
    assert!(matches!(res, Err(AveragingError::LayoutMismatch { .. })));
}

/// A codec per tensor: the first travels raw (exact mean, tiny values
/// kept), the second in fp16, the third in 8-bit; every member applies the
/// same values bit for bit, and no part mixes two codecs (parts of 1 KiB
/// cut every span, and the spans cross tensor boundaries).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_tensor_travels_in_its_own_codec_and_members_agree_bit_for_bit() {
    let modes = modes(1, 0);
    let weights = [1.0, 2.5, 0.5, 3.0];
    let mut peers = make_peers(&modes, &weights).await;
    // Values fp16 flushes to zero (its smallest subnormal is 6e-8).
    for (i, p) in peers.iter_mut().enumerate() {
        for (j, v) in p.tensors[0].iter_mut().enumerate() {
            *v = 1e-10 * (1.0 + (i * 7 + j % 13) as f32);
        }
    }
    let group = group_of(&peers, [0x61; 32], &[None, Some(1.0), None, Some(3.0)]);
    let cfg = AllreduceConfig {
        tensor_compression: vec![
            Compression::None,
            Compression::Float16,
            Compression::Blockwise8Bit,
        ],
        ..test_config(Compression::Float16)
    };
    let outcomes = run_all(&peers, &group, &cfg).await;
    let layout = TensorLayout::new(&LENGTHS);
    let expected = weighted_mean(&peers, &[0, 1, 2, 3]);
    let mut applied = Vec::new();
    for (i, out) in outcomes.iter().enumerate() {
        let out = out.as_ref().unwrap_or_else(|e| panic!("peer {i}: {e}"));
        assert!(out.banned_senders.is_empty() && out.failed_reducers.is_empty());
        assert_eq!(out.averaged_elements(), layout.total(), "peer {i}");
        let mut mine = peers[i].tensors.clone();
        out.apply(&layout, &mut mine, 1.0).unwrap();
        // Raw: the mean to f32 rounding, tiny values and all.
        let exact = max_err(&mine[..1], &expected[..1]);
        assert!(exact < 1e-14, "peer {i}: raw tensor off by {exact}");
        assert!(
            mine[0].iter().all(|v| *v > 0.0),
            "peer {i}: a tiny value was lost"
        );
        // fp16 and 8-bit: within their rounding.
        let half = max_err(&mine[1..2], &expected[1..2]);
        assert!(half < 2e-3, "peer {i}: fp16 tensor off by {half}");
        let q8 = max_err(&mine[2..], &expected[2..]);
        assert!(q8 < 2e-2, "peer {i}: 8-bit tensor off by {q8}");
        applied.push(mine);
    }
    assert_bit_identical(&applied, "per-tensor codecs");
    // The same round in fp16 for everything loses the tiny values.
    let uniform = test_config(Compression::Float16);
    let group = group_of(&peers, [0x62; 32], &[None, Some(1.0), None, Some(3.0)]);
    let outcomes = run_all(&peers, &group, &uniform).await;
    let mut mine = peers[0].tensors.clone();
    outcomes[0]
        .as_ref()
        .unwrap()
        .apply(&layout, &mut mine, 1.0)
        .unwrap();
    assert!(
        mine[0].iter().all(|v| *v == 0.0),
        "fp16 kept values below 6e-8"
    );
}

#[test]
fn codecs_cut_parts_at_tensor_boundaries_only_where_codecs_change() {
    let layout = TensorLayout::new(&[10, 5, 7]);
    let cfg = AllreduceConfig {
        part_size_bytes: 16,
        tensor_compression: vec![Compression::None, Compression::None, Compression::Float16],
        ..AllreduceConfig::default()
    };
    let codecs = crate::group::Codecs::new(&layout, &cfg).unwrap();
    assert_eq!(codecs.uniform(), None);
    assert_eq!(codecs.hello_code(), u8::MAX);
    assert_eq!(codecs.at(14), Compression::None);
    assert_eq!(codecs.at(15), Compression::Float16);
    // Raw parts of 4 values run across the first boundary (same codec);
    // fp16 parts of 8 values start at 15.
    assert_eq!(
        codecs.parts(2..22),
        vec![2..6, 6..10, 10..14, 14..15, 15..22]
    );
    // One codec for all: the parts of a plain round.
    let plain = crate::group::Codecs::new(&layout, &AllreduceConfig::default()).unwrap();
    let cfg0 = AllreduceConfig::default();
    assert_eq!(
        plain.parts(3..22),
        crate::partition::part_ranges(3..22, cfg0.part_len())
    );
    assert_eq!(plain.hello_code(), Compression::None.code());
    // A list for another number of tensors is refused up front.
    let wrong = AllreduceConfig {
        tensor_compression: vec![Compression::None],
        ..AllreduceConfig::default()
    };
    assert!(matches!(
        crate::group::Codecs::new(&layout, &wrong),
        Err(AveragingError::InvalidConfig {
            field: "tensor_compression",
            ..
        })
    ));
    // Codecs are part of the schema: peers with other codecs never average.
    assert_ne!(
        crate::group::schema_hash_with(&layout, &cfg),
        crate::group::schema_hash(&layout)
    );
    assert_eq!(
        crate::group::schema_hash_with(&layout, &AllreduceConfig::default()),
        crate::group::schema_hash(&layout)
    );
    // So is the caller's tag (the optimizer's update scheme).
    let tagged = AllreduceConfig {
        schema_tag: "local-updates:h=8".into(),
        ..AllreduceConfig::default()
    };
    assert_ne!(
        crate::group::schema_hash_with(&layout, &tagged),
        crate::group::schema_hash(&layout)
    );
    let too_long = AllreduceConfig {
        schema_tag: "x".repeat(257),
        ..AllreduceConfig::default()
    };
    assert!(matches!(
        too_long.validate(),
        Err(AveragingError::InvalidConfig {
            field: "schema_tag",
            ..
        })
    ));
}
