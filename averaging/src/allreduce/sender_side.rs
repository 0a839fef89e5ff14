//! The sender side of a round: this peer's parts of every remote reducer's
//! span, streamed out while the averages stream back.

use std::ops::Range;

use tokio::{io::AsyncWriteExt, net::TcpStream};

use crate::{
    compression::{Compression, all_finite},
    conn::{DataPath, DataStream, DataWriteHalf},
    crypto::FrameCipher,
    dataplane::DataPlane,
    error::{AveragingError, PeerFault},
    wire::{self, FrameBuf, Hello, Kind, Preamble},
};

use super::{
    Ctx,
    reducer_side::wire_offsets,
    results::{SpanResult, read_results},
};

/// Stream this peer's parts of reducer `r`'s span and collect the averages.
/// Returns the results, the bytes written, the reducer's fault if any, how
/// many leading parts were encoded (and so checked for NaN/inf), and the
/// path the connection took (`None` if none was made).
pub(super) async fn send_to_reducer<T: AsRef<[f32]> + Sync>(
    plane: &DataPlane,
    ctx: &Ctx<'_, T>,
    r: usize,
) -> (SpanResult, u64, Option<PeerFault>, usize, Option<DataPath>) {
    let span = ctx.spans[r].clone();
    let parts = ctx.codecs.parts(span.clone());
    // Compressed results stay in wire form (a half or a quarter of the
    // staging memory, and `apply` decodes once instead of decoding and then
    // copying).
    let wire = (ctx.codecs.uniform() != Some(Compression::None)).then(|| ctx.codecs.clone());
    let (wire_offsets, staged) = if wire.is_some() {
        let offsets = wire_offsets(parts.iter().map(|p| (ctx.codecs.at(p.start), p.len())));
        let bytes = offsets[parts.len()];
        (offsets, bytes.div_ceil(4))
    } else {
        (Vec::new(), span.len())
    };
    let mut result = SpanResult {
        reducer: r,
        span: span.clone(),
        averaged: vec![false; parts.len()],
        values: plane.take_buffer(staged),
        wire,
        wire_offsets,
        parts,
    };
    let mut bytes = 0u64;
    let mut checked = 0;
    let mut path = None;
    // A reducer returns every average by this peer's reducer budget, or
    // this peer keeps its local values for the parts still missing: a slow
    // reducer cannot spend the round deadline (and with it every other
    // span's results). Cancelling the exchange is safe: a part counts as
    // averaged only once all of it has arrived.
    let exchanged = tokio::time::timeout_at(
        ctx.reducer_deadline,
        exchange(
            plane,
            ctx,
            r,
            &mut result,
            &mut bytes,
            &mut checked,
            &mut path,
        ),
    )
    .await;
    let fault = match exchanged {
        Ok(res) => res.err(),
        Err(_) => Some(PeerFault::TooSlow {
            delivered: result.averaged.iter().filter(|a| **a).count(),
            parts: result.averaged.len(),
            budget: ctx.cfg.reducer_budget(),
        }),
    };
    (result, bytes, fault, checked, path)
}

/// Connect to reducer `r` within `request_timeout`: its data address first
/// (unless it failed recently), then, when this plane has a libp2p side,
/// a data stream on the DHT connection. With a fallback available the
/// direct try gets a third of the budget, so a black-holed address leaves
/// the stream two thirds.
async fn connect(
    plane: &DataPlane,
    ctx: &Ctx<'_, impl Sync>,
    r: usize,
) -> std::result::Result<DataStream, PeerFault> {
    let member = &ctx.group.members[r];
    let budget = ctx.cfg.request_timeout;
    let start = tokio::time::Instant::now();
    let p2p = plane.p2p.as_ref();
    if let Some(addr) = member.data_addr
        && !p2p.is_some_and(|p| p.direct_failed(&member.peer_id, addr))
    {
        let direct = if p2p.is_some() { budget / 3 } else { budget };
        let fault = match tokio::time::timeout(direct, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                let _ = s.set_nodelay(true);
                return Ok(DataStream::Tcp(s));
            }
            Ok(Err(e)) => PeerFault::Disconnected {
                reason: e.to_string(),
            },
            Err(_) => PeerFault::Stalled { timeout: direct },
        };
        match p2p {
            Some(p) => p.note_direct_failure(&member.peer_id, addr, &fault),
            None => return Err(fault),
        }
    }
    let Some(p) = p2p else {
        return Err(PeerFault::ProtocolViolation {
            reason: "reducer has no data address",
        });
    };
    p.open(&member.peer_id, budget.saturating_sub(start.elapsed()))
        .await
}

async fn exchange<T: AsRef<[f32]> + Sync>(
    plane: &DataPlane,
    ctx: &Ctx<'_, T>,
    r: usize,
    result: &mut SpanResult,
    bytes: &mut u64,
    checked: &mut usize,
    path: &mut Option<DataPath>,
) -> std::result::Result<(), PeerFault> {
    let member = &ctx.group.members[r];
    let keys = ctx
        .keys
        .connection_keys(
            &member.round_public_key,
            &ctx.digest,
            ctx.me as u32,
            r as u32,
            true,
        )
        .map_err(|_| PeerFault::ProtocolViolation {
            reason: "bad round public key",
        })?;
    let bad_key = |_| PeerFault::ProtocolViolation { reason: "bad key" };
    let mut up = FrameCipher::new(&keys.up).map_err(bad_key)?;
    let mut down = FrameCipher::new(&keys.down).map_err(bad_key)?;
    let stream = connect(plane, ctx, r).await?;
    *path = Some(stream.path());
    let (rd, mut wr) = stream.into_split();
    let preamble = Preamble {
        group_id: ctx.group.group_id,
        sender: ctx.me as u32,
        reducer: r as u32,
    };
    if ctx.is_withdrawn() {
        let mut frame = preamble.encode().to_vec();
        let mut withdraw = Vec::new();
        wire::begin_frame(&mut withdraw, Kind::Withdraw, 0);
        up.seal_frame(&mut withdraw).map_err(bad_key_seal)?;
        frame.extend_from_slice(&withdraw);
        wire::write_all_timeout(&mut wr, &frame, ctx.cfg.request_timeout).await?;
        *bytes += frame.len() as u64;
        let _ = wr.shutdown().await;
        return Ok(());
    }
    let mut frame = Vec::with_capacity(ctx.codecs.max_frame_len() + 64);
    frame.extend_from_slice(&preamble.encode());
    let mut hello = Vec::new();
    wire::begin_frame(&mut hello, Kind::Hello, 0);
    Hello {
        schema_hash: ctx.schema,
        compression: ctx.codecs.hello_code(),
        weight: ctx.weight,
        num_parts: result.parts.len() as u32,
    }
    .encode(&mut hello);
    up.seal_frame(&mut hello).map_err(bad_key_seal)?;
    frame.extend_from_slice(&hello);
    wire::write_all_timeout(&mut wr, &frame, ctx.cfg.request_timeout).await?;
    *bytes += frame.len() as u64;

    let parts = result.parts.clone();
    let writer = write_parts(ctx, &parts, &mut up, &mut wr, checked);
    let reader = read_results(ctx, rd, &mut down, result);
    let (w, rres) = tokio::join!(writer, reader);
    match w {
        Ok(n) => *bytes += n,
        Err(f) => {
            tracing::debug!(reducer = r, fault = %f, "averaging: sending parts failed");
        }
    }
    // A direct connection closed or silent before any average came back may have
    // reached someone else's data plane (a wrong or lying address): the
    // frames cannot be replayed on another path (their nonces are spent),
    // but the next rounds reach this reducer over libp2p.
    if let (
        Err(f @ (PeerFault::Disconnected { .. } | PeerFault::Stalled { .. })),
        Some(DataPath::Direct),
        Some(p2p),
        Some(addr),
    ) = (&rres, *path, plane.p2p.as_ref(), member.data_addr)
        && !result.averaged.iter().any(|a| *a)
    {
        p2p.note_direct_failure(&member.peer_id, addr, f);
    }
    rres
}

fn bad_key_seal(_: AveragingError) -> PeerFault {
    PeerFault::ProtocolViolation {
        reason: "seal failed",
    }
}

/// Encode, check, seal and send each part; counts the parts encoded (and
/// checked) in `checked`. A part that holds NaN/inf is not sent: this peer
/// withdraws (see [`Ctx::withdraw`]) and the reducer gets a `Withdraw` frame
/// in its place, as it does when another of this peer's parts was poisoned.
async fn write_parts<T: AsRef<[f32]> + Sync>(
    ctx: &Ctx<'_, T>,
    parts: &[Range<usize>],
    up: &mut FrameCipher,
    wr: &mut DataWriteHalf,
    checked: &mut usize,
) -> std::result::Result<u64, PeerFault> {
    let mut frame = FrameBuf::new(ctx.bytes.take());
    let mut scratch = Vec::new();
    let mut written = 0u64;
    let refused = |_| PeerFault::ProtocolViolation {
        reason: "local part does not encode",
    };
    for (p, range) in parts.iter().enumerate() {
        let at = p as u32;
        let compression = ctx.codecs.at(range.start);
        // The sealed frame's length, when the part is finite and sealed.
        let sealed_len = if ctx.is_withdrawn() {
            None
        } else {
            match compression {
                // Raw f32 is checked on the tensors, then encrypted straight
                // from them into the frame (the check first: a frame sealed
                // and then not sent would leave a gap in the nonce sequence).
                Compression::None => {
                    let pieces = || {
                        ctx.layout
                            .pieces(range.clone())
                            .map(|(i, local, _)| &ctx.tensors[i].as_ref()[local])
                    };
                    if pieces().all(all_finite) {
                        let bytes = pieces().map(bytemuck::cast_slice::<f32, u8>);
                        let len = 4 * range.len();
                        Some(frame.seal_from(Kind::Part, at, len, bytes, up)?.len())
                    } else {
                        None
                    }
                }
                // 16-bit codecs encode piece by piece straight into the frame
                // and are checked on what was just written (in cache): they
                // keep NaN/inf (finite overflow saturates).
                Compression::Float16 | Compression::BFloat16 => {
                    let payload = frame.start(Kind::Part, at, compression.encoded_len(range.len()));
                    let mut off = 0;
                    for (i, local, _) in ctx.layout.pieces(range.clone()) {
                        let n = compression.encoded_len(local.len());
                        compression
                            .encode_into(
                                &ctx.tensors[i].as_ref()[local],
                                &mut payload[off..off + n],
                            )
                            .map_err(refused)?;
                        off += n;
                    }
                    if compression.wire_all_finite(payload, range.len()) {
                        Some(frame.seal(up)?.len())
                    } else {
                        None
                    }
                }
                Compression::Blockwise8Bit => {
                    let payload = frame.start(Kind::Part, at, compression.encoded_len(range.len()));
                    // Blocks may straddle tensors: encode a part inside one
                    // tensor straight from it, gather the others first.
                    let mut pieces = ctx.layout.pieces(range.clone());
                    let src = match (pieces.next(), pieces.next()) {
                        (Some((i, local, _)), None) => &ctx.tensors[i].as_ref()[local],
                        _ => {
                            scratch.resize(range.len(), 0.0);
                            ctx.layout.gather(ctx.tensors, range.clone(), &mut scratch);
                            &scratch[..]
                        }
                    };
                    compression.encode_into(src, payload).map_err(refused)?;
                    // A block holding NaN/inf gets a NaN scale.
                    if compression.wire_all_finite(payload, range.len()) {
                        Some(frame.seal(up)?.len())
                    } else {
                        None
                    }
                }
            }
        };
        if !ctx.is_withdrawn() {
            *checked = p + 1;
        }
        let Some(len) = sealed_len else {
            // This part (or another of this peer's) is poisoned: withdraw.
            ctx.withdraw();
            frame.start(Kind::Withdraw, at, 0);
            let sealed = frame.seal(up)?;
            wire::write_all_timeout(wr, sealed, ctx.cfg.reducer_timeout).await?;
            return Ok(written + sealed.len() as u64);
        };
        let sealed = frame.sealed(len);
        wire::write_all_timeout(wr, sealed, ctx.cfg.reducer_timeout).await?;
        written += sealed.len() as u64;
    }
    Ok(written)
}
