//! Client-mode senders get their results only after they sent every part.

use std::time::Duration;

use tokio::io::AsyncWriteExt;

use super::support::*;
use crate::{
    AveragingMode, Compression, TensorLayout,
    partition::part_ranges,
    schema_hash,
    wire::{self, Hello, Kind},
};

/// A hand-driven client (position `me`) talking to reducer `r`: sends all but
/// its last part, checks that no result arrives, sends the last part, then
/// reads every result and returns them (`None` for an empty part).
async fn client_to(
    group: &crate::AssembledGroup,
    peers: &[Peer],
    me: usize,
    r: usize,
    hold_back: bool,
) -> Vec<Option<Vec<f32>>> {
    let cfg = test_config(Compression::None);
    let layout = TensorLayout::new(&LENGTHS);
    let parts = span_parts(group, r);
    assert!(parts.len() >= 2, "the test needs several parts per span");
    let (stream, mut up, mut down) = connect_as_sender(group, peers, me, r, group.group_id).await;
    let (mut rd, mut wr) = stream.into_split();
    let mut frame = Vec::new();
    wire::begin_frame(&mut frame, Kind::Hello, 0);
    Hello {
        schema_hash: schema_hash(&layout),
        compression: 0,
        weight: peers[me].weight,
        num_parts: parts.len() as u32,
    }
    .encode(&mut frame);
    up.seal_frame(&mut frame).unwrap();
    wr.write_all(&frame).await.unwrap();
    let mut send_part = |p: usize, frame: &mut Vec<u8>| {
        let mut values = vec![0.0f32; parts[p].len()];
        layout.gather(&peers[me].tensors, parts[p].clone(), &mut values);
        wire::begin_frame(frame, Kind::Part, p as u32);
        Compression::None.encode(&values, frame);
        up.seal_frame(frame).unwrap();
    };
    let last = parts.len() - 1;
    for p in 0..last {
        send_part(p, &mut frame);
        wr.write_all(&frame).await.unwrap();
    }
    let mut buf = Vec::new();
    if hold_back {
        // The other senders are done, so the first parts are final: a node
        // would have them by now. A client must not get them yet.
        let early = wire::read_frame(
            &mut rd,
            &mut down,
            &mut buf,
            cfg.max_frame_len(),
            // Well inside the reducer's 700 ms per-part sender timeout.
            Duration::from_millis(250),
        )
        .await;
        assert!(
            matches!(early, Err(crate::PeerFault::Stalled { .. })),
            "a client got a result before it finished sending: {early:?}"
        );
    }
    send_part(last, &mut frame);
    wr.write_all(&frame).await.unwrap();
    let mut results = Vec::new();
    for p in 0..parts.len() {
        let (kind, index, payload) = wire::read_frame(
            &mut rd,
            &mut down,
            &mut buf,
            cfg.max_frame_len(),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        assert_eq!(index as usize, p);
        results.push(match kind {
            Kind::Averaged => Some(bytemuck::cast_slice::<u8, f32>(&buf[payload]).to_vec()),
            _ => None,
        });
    }
    results
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_results_wait_until_it_sent_everything() {
    use AveragingMode::{Client, Node};
    let peers = make_peers(&[Node, Node, Client], &[1.0, 2.0, 3.0]).await;
    let group = group_of(&peers, [0x77; 32], &[]);
    let cfg = test_config(Compression::None);
    let layout = TensorLayout::new(&LENGTHS);
    let nodes = run_some(&peers, &group, 0..2, &cfg);
    // The client holds back its last part to reducer 0 only.
    let client = futures::future::join(
        client_to(&group, &peers, 2, 0, true),
        client_to(&group, &peers, 2, 1, false),
    );
    let (outs, (from0, from1)) = tokio::time::timeout(Duration::from_secs(30), async {
        tokio::join!(nodes, client)
    })
    .await
    .expect("round timed out");
    // The delayed client still got exact averages for every part.
    let mean = weighted_mean(&peers, &[0, 1, 2]);
    let sizes = crate::round::balance_spans(layout.total(), &group.bandwidths(), 0).unwrap();
    let spans = crate::round::spans_from_sizes(&sizes);
    let mut flat_mean = Vec::new();
    for t in &mean {
        flat_mean.extend(t.iter().copied());
    }
    for (r, got) in [(0, from0), (1, from1)] {
        let parts = part_ranges(spans[r].clone(), cfg.part_len());
        for (part, values) in parts.iter().zip(got) {
            let values = values.expect("every part was averaged");
            for (v, m) in values.iter().zip(&flat_mean[part.clone()]) {
                assert!((f64::from(*v) - m).abs() < 1e-5);
            }
        }
    }
    for out in outs {
        let out = out.unwrap();
        assert!(out.banned_senders.is_empty() && out.failed_reducers.is_empty());
    }
}
