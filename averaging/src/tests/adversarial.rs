use std::time::{Duration, Instant};

use tokio::{io::AsyncWriteExt, sync::oneshot};

use super::support::*;
use crate::{
    AssembledGroup, AveragingMode, Compression, PeerFault, TensorLayout,
    round::TAG_LEN,
    schema_hash,
    wire::{self, Hello, Kind},
};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Bad {
    WrongPartSize,
    WrongGroupId,
    TooManyParts,
    OutOfOrderPart,
    NonFinite,
    Garbage,
    SchemaHash,
    StallAfterFirstPart,
    DieAfterFirstPart,
    NanWeight,
    InfWeight,
    NegativeWeight,
}

/// A client-mode sender (position `me`) that misbehaves towards reducer `r`.
async fn bad_sender(
    group: &AssembledGroup,
    peers: &[Peer],
    me: usize,
    r: usize,
    bad: Bad,
    hold: oneshot::Receiver<()>,
) {
    let layout = TensorLayout::new(&LENGTHS);
    let parts = span_parts(group, r);
    let gid = if bad == Bad::WrongGroupId {
        [0xEE; 32]
    } else {
        group.group_id
    };
    let (mut stream, mut up, _down) = connect_as_sender(group, peers, me, r, gid).await;
    if bad == Bad::Garbage {
        let _ = stream.write_all(&[0x17; 4096]).await;
        let _ = hold.await;
        return;
    }
    let mut frame = Vec::new();
    wire::begin_frame(&mut frame, Kind::Hello, 0);
    let mut schema = schema_hash(&layout);
    if bad == Bad::SchemaHash {
        schema[0] ^= 1;
    }
    let extra = u32::from(bad == Bad::TooManyParts);
    Hello {
        schema_hash: schema,
        compression: 0,
        weight: match bad {
            Bad::NanWeight => f32::NAN,
            Bad::InfWeight => f32::INFINITY,
            Bad::NegativeWeight => -1.0,
            _ => peers[me].weight,
        },
        num_parts: parts.len() as u32 + extra,
    }
    .encode(&mut frame);
    up.seal_frame(&mut frame).unwrap();
    let _ = stream.write_all(&frame).await;
    let data = &peers[me].tensors;
    let mut values = vec![0.0f32; parts[0].len()];
    layout.gather(data, parts[0].clone(), &mut values);
    match bad {
        Bad::WrongPartSize => values.push(1.0),
        Bad::NonFinite => values[1] = f32::INFINITY,
        _ => {}
    }
    let index = if bad == Bad::OutOfOrderPart { 1 } else { 0 };
    wire::begin_frame(&mut frame, Kind::Part, index);
    Compression::None.encode(&values, &mut frame);
    up.seal_frame(&mut frame).unwrap();
    let _ = stream.write_all(&frame).await;
    if bad == Bad::DieAfterFirstPart {
        drop(stream);
        let _ = hold.await;
        return;
    }
    // Keep the connection open (stalled) until the test is over.
    let _ = hold.await;
    drop(stream);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_senders_are_banned_and_honest_peers_finish() {
    use AveragingMode::{Client, Node};
    let cases = [
        (Bad::WrongPartSize, "wrong size"),
        (Bad::WrongGroupId, "group id"),
        (Bad::TooManyParts, "too many"),
        (Bad::OutOfOrderPart, "order"),
        (Bad::NonFinite, "nan"),
        (Bad::Garbage, "garbage"),
        (Bad::SchemaHash, "schema"),
        (Bad::StallAfterFirstPart, "stall"),
        (Bad::DieAfterFirstPart, "killed sender"),
        (Bad::NanWeight, "nan weight"),
        (Bad::InfWeight, "inf weight"),
        (Bad::NegativeWeight, "negative weight"),
    ];
    for (n, (bad, name)) in cases.into_iter().enumerate() {
        let peers = make_peers(&[Node, Node, Node, Client], &[1.0, 2.0, 1.5, 4.0]).await;
        let group = group_of(&peers, [0x40 + n as u8; 32], &[]);
        let cfg = test_config(Compression::None);
        let layout = TensorLayout::new(&LENGTHS);
        let (hold_tx, holds): (Vec<_>, Vec<_>) = (0..3).map(|_| oneshot::channel::<()>()).unzip();
        let started = Instant::now();
        let honest = async {
            let out = run_some(&peers, &group, 0..3, &cfg).await;
            drop(hold_tx);
            out
        };
        let liar = futures::future::join_all(
            holds
                .into_iter()
                .enumerate()
                .map(|(r, hold)| bad_sender(&group, &peers, 3, r, bad, hold)),
        );
        let (outcomes, _) = tokio::join!(honest, liar);
        assert!(
            started.elapsed() < cfg.allreduce_timeout,
            "{name}: took too long"
        );
        let without = weighted_mean(&peers, &[0, 1, 2]);
        let with = weighted_mean(&peers, &[0, 1, 2, 3]);
        for (i, out) in outcomes.into_iter().enumerate() {
            let out = out.unwrap_or_else(|e| panic!("{name}: peer {i} failed: {e}"));
            assert!(
                out.failed_reducers.is_empty(),
                "{name}: {:?}",
                out.failed_reducers
            );
            let fault = &out
                .banned_senders
                .iter()
                .find(|(s, _)| *s == 3)
                .unwrap_or_else(|| panic!("{name}: liar not banned by peer {i}"))
                .1;
            let kind_ok = match bad {
                Bad::WrongPartSize => matches!(fault, PeerFault::WrongPartSize { .. }),
                Bad::TooManyParts | Bad::OutOfOrderPart => {
                    matches!(fault, PeerFault::UnexpectedPart { .. })
                }
                Bad::NonFinite => matches!(fault, PeerFault::NonFinite { .. }),
                // Garbage before any frame authenticated could come from
                // anyone: the connection is dropped as an impostor's and the
                // sender, never heard from, is banned at its deadline.
                Bad::WrongGroupId | Bad::Garbage | Bad::StallAfterFirstPart => {
                    matches!(fault, PeerFault::Stalled { .. })
                }
                Bad::SchemaHash => matches!(fault, PeerFault::BadSchemaHash),
                Bad::DieAfterFirstPart => matches!(fault, PeerFault::Disconnected { .. }),
                Bad::NanWeight | Bad::InfWeight | Bad::NegativeWeight => {
                    matches!(fault, PeerFault::BadWeight { .. })
                }
            };
            assert!(kind_ok, "{name}: unexpected fault {fault:?}");
            if bad == Bad::Garbage && out.span_sizes[i] > 0 {
                assert!(
                    out.impostors.iter().any(|r| r.claimed_sender == Some(3)),
                    "{name}: the garbage connection is not reported: {:?}",
                    out.impostors
                );
            }
            let mut mine = peers[i].tensors.clone();
            out.apply(&layout, &mut mine, 1.0).unwrap();
            let partial = matches!(bad, Bad::StallAfterFirstPart | Bad::DieAfterFirstPart);
            for (t, buf) in mine.iter().enumerate() {
                for (j, v) in buf.iter().enumerate() {
                    let v = f64::from(*v);
                    let ok = (v - without[t][j]).abs() < 1e-6
                        || (partial && (v - with[t][j]).abs() < 1e-6);
                    assert!(ok, "{name}: peer {i} tensor {t}[{j}] = {v}");
                }
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum BadReducer {
    DiesAfterFirstPart,
    NeverAnswers,
    /// Answers part 0 with a correctly sealed frame of NaN averages.
    SendsNan,
    /// Answers part 0 with a frame whose payload was altered after sealing.
    SendsTampered,
}

/// Member `me` (a node) accepts its senders, reads a little, then dies or stalls.
async fn bad_reducer(
    peers: &[Peer],
    group: &AssembledGroup,
    me: usize,
    senders: usize,
    how: BadReducer,
    hold: oneshot::Receiver<()>,
) {
    let members = group.members.iter().map(|m| m.peer_id.clone()).collect();
    let mut route = peers[me].plane.register(group.group_id, members, 8);
    let mut conns = Vec::new();
    for _ in 0..senders {
        let Some(inc) = route.rx.recv().await else {
            break;
        };
        conns.push((inc.preamble.sender as usize, inc.stream));
    }
    if matches!(how, BadReducer::SendsNan | BadReducer::SendsTampered) {
        let parts = span_parts(group, me);
        let mut writers = Vec::new();
        for (s, stream) in conns {
            let (_, mut down) = connection_ciphers(group, peers, me, s, me);
            let value = if how == BadReducer::SendsNan {
                f32::NAN
            } else {
                1.0
            };
            let mut frame = Vec::new();
            wire::begin_frame(&mut frame, Kind::Averaged, 0);
            Compression::None.encode(&vec![value; parts[0].len()], &mut frame);
            down.seal_frame(&mut frame).unwrap();
            if how == BadReducer::SendsTampered {
                let i = frame.len() - TAG_LEN - 1;
                frame[i] ^= 1;
            }
            let (mut rd, mut wr) = stream.into_split();
            let _ = wr.write_all(&frame).await;
            // Keep reading the sender's parts so it is never blocked on us.
            tokio::spawn(async move {
                let mut b = vec![0u8; 1 << 16];
                while let Ok(n) = tokio::io::AsyncReadExt::read(&mut rd, &mut b).await {
                    if n == 0 {
                        break;
                    }
                }
            });
            writers.push(wr);
        }
        let _ = hold.await;
        drop(writers);
    } else if how == BadReducer::DiesAfterFirstPart {
        for (_, c) in &mut conns {
            let mut buf = vec![0u8; 2048];
            let _ = tokio::io::AsyncReadExt::read(c, &mut buf).await;
        }
        drop(conns);
        let _ = hold.await;
    } else {
        let _ = hold.await;
        drop(conns);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_or_silent_reducer_leaves_finite_averaged_or_local_values() {
    use AveragingMode::Node;
    for (n, how) in [
        BadReducer::DiesAfterFirstPart,
        BadReducer::NeverAnswers,
        BadReducer::SendsNan,
        BadReducer::SendsTampered,
    ]
    .into_iter()
    .enumerate()
    {
        let peers = make_peers(&[Node; 4], &[1.0, 2.0, 1.0, 1.0]).await;
        let group = group_of(&peers, [0x70 + n as u8; 32], &[]);
        let cfg = test_config(Compression::None);
        let layout = TensorLayout::new(&LENGTHS);
        let (hold_tx, hold_rx) = oneshot::channel::<()>();
        let started = Instant::now();
        let honest = async {
            let out = run_some(&peers, &group, 0..3, &cfg).await;
            drop(hold_tx);
            out
        };
        let (outcomes, _) = tokio::join!(honest, bad_reducer(&peers, &group, 3, 3, how, hold_rx));
        assert!(started.elapsed() < cfg.allreduce_timeout + Duration::from_secs(1));
        let avg = weighted_mean(&peers, &[0, 1, 2]);
        for (i, out) in outcomes.into_iter().enumerate() {
            let out = out.unwrap_or_else(|e| panic!("{how:?}: peer {i}: {e}"));
            assert_eq!(out.failed_reducers.len(), 1, "{how:?}");
            assert_eq!(out.failed_reducers[0].0, 3);
            match (how, &out.failed_reducers[0].1) {
                (BadReducer::SendsNan, PeerFault::NonFinite { part: 0 })
                | (BadReducer::SendsTampered, PeerFault::Garbage { .. })
                | (BadReducer::DiesAfterFirstPart | BadReducer::NeverAnswers, _) => {}
                (how, fault) => panic!("{how:?}: unexpected fault {fault}"),
            }
            assert!(out.banned_senders.iter().any(|(s, _)| *s == 3));
            let mut mine = peers[i].tensors.clone();
            out.apply(&layout, &mut mine, 1.0).unwrap();
            let mut averaged = 0usize;
            let mut local = 0usize;
            for (t, buf) in mine.iter().enumerate() {
                for (j, v) in buf.iter().enumerate() {
                    assert!(v.is_finite());
                    if (f64::from(*v) - avg[t][j]).abs() < 1e-6 {
                        averaged += 1;
                    } else {
                        assert_eq!(
                            *v, peers[i].tensors[t][j],
                            "{how:?}: neither averaged nor local"
                        );
                        local += 1;
                    }
                }
            }
            // Three of four spans are averaged; the dead reducer's quarter is local.
            assert!(
                averaged > local * 2,
                "{how:?}: averaged {averaged}, local {local}"
            );
        }
    }
}
