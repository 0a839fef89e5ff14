use std::time::Duration;

use crate::{
    AllreduceConfig, AssembledGroup, AveragingMode, Compression, GroupMember, RoundOutcome,
    TensorLayout,
    round::{DataPlane, RoundKeyPair, run_allreduce},
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
                signed: None,
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
    run_some(peers, group, 0..peers.len(), cfg).await
}

/// Run one round on the peers at positions `which` at once (the others are
/// driven by the test); returns their outcomes in that order.
pub(super) async fn run_some(
    peers: &[Peer],
    group: &AssembledGroup,
    which: impl IntoIterator<Item = usize>,
    cfg: &AllreduceConfig,
) -> Vec<crate::Result<RoundOutcome>> {
    // The peers' own tensor shapes (LENGTHS unless a test replaced them).
    let lengths: Vec<usize> = peers[0].tensors.iter().map(Vec::len).collect();
    let layout = TensorLayout::new(&lengths);
    let futs = which.into_iter().map(|i| {
        let (p, layout) = (&peers[i], &layout);
        async move {
            run_allreduce(
                &p.plane, group, i, &p.keys, layout, &p.tensors, p.weight, cfg,
            )
            .await
        }
    });
    futures::future::join_all(futs).await
}

/// Weighted mean over the senders among `peers` (f64).
pub(super) fn weighted_mean(peers: &[Peer], include: &[usize]) -> Vec<Vec<f64>> {
    let wsum: f64 = include.iter().map(|&i| f64::from(peers[i].weight)).sum();
    peers[include[0]]
        .tensors
        .iter()
        .enumerate()
        .map(|(t, tensor)| {
            (0..tensor.len())
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

/// Asserts every member applied the very values member 0 did.
pub(super) fn assert_bit_identical(applied: &[Vec<Vec<f32>>], what: &str) {
    for (i, mine) in applied.iter().enumerate().skip(1) {
        assert!(
            mine.iter()
                .flatten()
                .zip(applied[0].iter().flatten())
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "{what}: peer {i} differs from peer 0"
        );
    }
}

pub(super) fn max_err(a: &[Vec<f32>], b: &[Vec<f64>]) -> f64 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (f64::from(*x) - y).abs())
        .fold(0.0, f64::max)
}

/// The parts of reducer `r`'s span for the default test layout and config.
pub(super) fn span_parts(group: &AssembledGroup, r: usize) -> Vec<std::ops::Range<usize>> {
    let cfg = test_config(Compression::None);
    let layout = TensorLayout::new(&LENGTHS);
    let sizes = crate::round::balance_spans(layout.total(), &group.bandwidths(), 0).unwrap();
    let spans = crate::round::spans_from_sizes(&sizes);
    crate::partition::part_ranges(spans[r].clone(), cfg.part_len())
}

/// A hand-driven sender's connection from peer `me` to reducer `r`: connects,
/// writes the preamble naming `group_id`, and derives the connection's two
/// ciphers (sender → reducer, reducer → sender) from the real group keys.
pub(super) async fn connect_as_sender(
    group: &AssembledGroup,
    peers: &[Peer],
    me: usize,
    r: usize,
    group_id: [u8; 32],
) -> (
    tokio::net::TcpStream,
    crate::round::FrameCipher,
    crate::round::FrameCipher,
) {
    use tokio::io::AsyncWriteExt;
    let addr = group.members[r].data_addr.unwrap();
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let pre = crate::wire::Preamble {
        group_id,
        sender: me as u32,
        reducer: r as u32,
    };
    stream.write_all(&pre.encode()).await.unwrap();
    let (up, down) = connection_ciphers(group, peers, me, me, r);
    (stream, up, down)
}

/// The two ciphers (sender → reducer, reducer → sender) of the connection from
/// `sender` to `reducer`, derived with the keys of `holder` (one of the two).
pub(super) fn connection_ciphers(
    group: &AssembledGroup,
    peers: &[Peer],
    holder: usize,
    sender: usize,
    reducer: usize,
) -> (crate::round::FrameCipher, crate::round::FrameCipher) {
    let other = if holder == sender { reducer } else { sender };
    let keys = peers[holder]
        .keys
        .connection_keys(
            &group.members[other].round_public_key,
            &group.digest(),
            sender as u32,
            reducer as u32,
            holder == sender,
        )
        .unwrap();
    (
        crate::round::FrameCipher::new(&keys.up).unwrap(),
        crate::round::FrameCipher::new(&keys.down).unwrap(),
    )
}
