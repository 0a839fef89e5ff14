use std::time::Duration;

use crate::{
    AllreduceConfig, AssembledGroup, AveragingMode, Compression, DataPlane, GroupMember,
    RoundKeyPair, RoundOutcome, TensorLayout, run_allreduce,
};

pub(super) const LENGTHS: [usize; 3] = [1000, 17, 3003];

pub(super) struct Peer {
    pub(super) plane: DataPlane,
    pub(super) keys: RoundKeyPair,
    pub(super) tensors: Vec<Vec<f32>>,
    pub(super) weight: f32,
    pub(super) mode: AveragingMode,
}

/// Deterministic values in [-1, 1] per peer.
pub(super) fn tensors_for(peer: usize, lengths: &[usize]) -> Vec<Vec<f32>> {
    let mut state =
        0x9E37_79B9_7F4A_7C15u64 ^ (peer as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03);
    lengths
        .iter()
        .map(|&n| {
            (0..n)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    ((state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
                })
                .collect()
        })
        .collect()
}

pub(super) fn test_config(compression: Compression) -> AllreduceConfig {
    AllreduceConfig {
        part_size_bytes: 1024,
        compression,
        request_timeout: Duration::from_secs(2),
        sender_timeout: Duration::from_millis(700),
        reducer_timeout: Duration::from_millis(1500),
        allreduce_timeout: Duration::from_secs(20),
        ..AllreduceConfig::default()
    }
}

pub(super) async fn make_peers(modes: &[AveragingMode], weights: &[f32]) -> Vec<Peer> {
    let mut peers = Vec::new();
    for (i, (&mode, &weight)) in modes.iter().zip(weights).enumerate() {
        let plane = if mode == AveragingMode::Client {
            DataPlane::client()
        } else {
            DataPlane::bind("127.0.0.1:0".parse().unwrap(), Duration::from_secs(2))
                .await
                .unwrap()
        };
        peers.push(Peer {
            plane,
            keys: RoundKeyPair::generate().unwrap(),
            tensors: tensors_for(i, &LENGTHS),
            weight,
            mode,
        });
    }
    peers
}

pub(super) fn group_of(
    peers: &[Peer],
    group_id: [u8; 32],
    bandwidths: &[Option<f64>],
) -> AssembledGroup {
    AssembledGroup {
        group_id,
        members: peers
            .iter()
            .enumerate()
            .map(|(i, p)| GroupMember {
                peer_id: vec![i as u8],
                data_addr: p.plane.local_addr(),
                mode: p.mode,
                bandwidth: bandwidths.get(i).copied().flatten(),
                round_public_key: p.keys.public(),
            })
            .collect(),
    }
}

/// Run one round on every peer at once; returns each peer's outcome.
pub(super) async fn run_all(
    peers: &[Peer],
    group: &AssembledGroup,
    cfg: &AllreduceConfig,
) -> Vec<crate::Result<RoundOutcome>> {
    let layout = TensorLayout::new(&LENGTHS);
    let futs = peers.iter().enumerate().map(|(i, p)| {
        let layout = layout.clone();
        async move {
            run_allreduce(
                &p.plane, group, i, &p.keys, &layout, &p.tensors, p.weight, cfg,
            )
            .await
        }
    });
    futures::future::join_all(futs).await
}

/// Weighted mean over the senders among `peers` (f64).
pub(super) fn weighted_mean(peers: &[Peer], include: &[usize]) -> Vec<Vec<f64>> {
    let wsum: f64 = include.iter().map(|&i| f64::from(peers[i].weight)).sum();
    LENGTHS
        .iter()
        .enumerate()
        .map(|(t, &n)| {
            (0..n)
                .map(|j| {
                    include
                        .iter()
                        .map(|&i| f64::from(peers[i].weight) * f64::from(peers[i].tensors[t][j]))
                        .sum::<f64>()
                        / wsum
                })
                .collect()
        })
        .collect()
}

pub(super) fn max_err(a: &[Vec<f32>], b: &[Vec<f64>]) -> f64 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (f64::from(*x) - y).abs())
        .fold(0.0, f64::max)
}
