//! The reducer side of a round: this peer's span, reduced from every
//! sender's parts, with the averages streamed back as they finish.

use std::{
    ops::Range,
    sync::{Arc, Mutex},
};

use futures::{FutureExt, StreamExt, stream::FuturesUnordered};
use tokio::{io::AsyncWriteExt, sync::watch};

use crate::{
    compression::{Compression, all_finite},
    conn::{DataPath, DataReadHalf, DataWriteHalf},
    crypto::FrameCipher,
    dataplane::{BufferPool, Incoming, PooledBytes, RejectedConnection},
    error::{AveragingError, PeerFault, Result},
    group::AveragingMode,
    reducer::{PartReducer, PartResult},
    wire::{self, FrameBuf, Hello, Kind},
};

use super::Ctx;

/// Add this peer's own part `p` of its span (`parts` relative to `span`) to
/// its reducer, checking it for NaN/inf first (then it is accumulated while
pub(super) fn add_own_part<T: AsRef<[f32]> + Sync>(
    ctx: &Ctx<'_, T>,
    red: &mut PartReducer,
    span: &Range<usize>,
    parts: &[Range<usize>],
    p: usize,
) -> Result<()> {
    let r = &parts[p];
    let flat = span.start + r.start..span.start + r.end;
    let pieces = ctx
        .layout
        .pieces(flat)
        .map(|(i, local, _)| &ctx.tensors[i].as_ref()[local]);
    if !pieces.clone().all(all_finite) {
        ctx.withdraw();
        red.ban(ctx.me);
        return Ok(());
    }
    red.accumulate_finite_pieces(ctx.me, p, pieces, ctx.weight)
        .map_err(|fault| AveragingError::Peer {
            peer: ctx.me,
            fault,
        })
}

/// What serving this peer's span did.
#[derive(Default)]
pub(super) struct Served {
    /// Senders banned, with the reason.
    pub(super) banned: Vec<(usize, PeerFault)>,
    /// Bytes written back.
    pub(super) bytes: u64,
    /// The compressed averages, when the codec compresses.
    pub(super) encoded: Option<EncodedAverages>,
    /// The path each connected sender came by.
    pub(super) paths: Vec<(usize, DataPath)>,
    /// Senders whose weight was clipped: `(sender, declared, used)`.
    pub(super) clipped: Vec<(usize, f32, f32)>,
    /// Connections that claimed a slot and did not authenticate.
    pub(super) impostors: Vec<RejectedConnection>,
}

/// Connections at once that may try to authenticate for one sender slot:
/// the real sender plus a few impostors; more are dropped unread.
const CANDIDATES_PER_SLOT: usize = 4;
/// Impostor connections reported per round.
const MAX_IMPOSTORS: usize = 32;

/// A connection whose first frame opened under its sender's key.
struct Authed {
    s: usize,
    path: DataPath,
    rd: DataReadHalf,
    wr: DataWriteHalf,
    up: FrameCipher,
    down: FrameCipher,
    buf: PooledBytes,
    /// What the first frame said: `Ok(Some(weight))` for a hello,
    /// `Ok(None)` for a withdrawal, `Err` for an authenticated frame that
    /// breaks the protocol (the sender's own fault).
    hello: std::result::Result<Option<f32>, PeerFault>,
}

/// Why a connection never took its slot.
struct Unauthenticated {
    s: usize,
    rejected: RejectedConnection,
}

/// Accept the remote senders of this peer's span and serve them until every
/// part is finalized and sent back. A connection takes its sender's slot
/// only once its first frame opens under that sender's key: anything before
/// (the plaintext preamble) can be sent by anyone, so a connection that
/// fails or stalls before authenticating is dropped without banning the
/// sender it named.
pub(super) async fn serve_span<T: AsRef<[f32]> + Sync>(
    ctx: &Ctx<'_, T>,
    red: &Arc<Mutex<PartReducer>>,
    tx: &watch::Sender<usize>,
    rx: &mut tokio::sync::mpsc::Receiver<Incoming>,
    expected: &[usize],
) -> Served {
    let mut banned: Vec<(usize, PeerFault)> = Vec::new();
    let mut paths = Vec::new();
    let mut clipped = Vec::new();
    let mut impostors = Vec::new();
    let n = ctx.group.members.len();
    let mut connected = vec![false; n];
    let mut trying = vec![0usize; n];
    let mut pending = expected.len();
    // Compressed averages are encoded once, into one pooled span-sized buffer,
    // and copied into each recipient's frame (raw f32 "encoding" is already a
    // copy, so it is not cached).
    let encoded = Mutex::new(EncodedAverages::new(ctx, red, ctx.pool));
    let nparts = red.lock().map(|r| r.num_parts()).unwrap_or(0);
    let mut candidates = FuturesUnordered::new();
    let mut unresolved: Vec<(u64, RejectedConnection)> = Vec::new();
    let mut next_candidate = 0u64;
    let mut handlers = FuturesUnordered::new();
    let mut bytes = 0u64;
    let deadline = tokio::time::Instant::now() + ctx.cfg.sender_timeout;
    let ban = |sender: usize, fault: PeerFault, banned: &mut Vec<(usize, PeerFault)>| {
        tracing::warn!(
            sender,
            peer = %crate::averager::peer_label(&ctx.group.members[sender].peer_id),
            %fault,
            "averaging: banning sender"
        );
        if let Ok(mut r) = red.lock() {
            r.ban(sender);
            tx.send_replace(r.advance());
        }
        banned.push((sender, fault));
    };
    loop {
        let accepting = pending > 0;
        if !accepting && handlers.is_empty() {
            break;
        }
        tokio::select! {
            inc = rx.recv(), if accepting => {
                let Some(inc) = inc else { pending = 0; continue };
                let s = inc.preamble.sender as usize;
                let valid = inc.preamble.reducer as usize == ctx.me
                    && expected.contains(&s)
                    && !connected[s]
                    && trying[s] < CANDIDATES_PER_SLOT;
                if !valid {
                    tracing::warn!(
                        sender = s,
                        remote = ?inc.remote,
                        addr = ?inc.addr,
                        "averaging: unexpected connection for this round"
                    );
                    continue;
                }
                trying[s] += 1;
                let id = next_candidate;
                next_candidate += 1;
                unresolved.push((id, RejectedConnection {
                    peer: inc.remote,
                    path: inc.stream.path(),
                    claimed_sender: Some(s),
                    fault: PeerFault::Stalled { timeout: ctx.cfg.request_timeout },
                }));
                candidates.push(authenticate(ctx, inc, nparts).map(move |r| (id, r)));
            }
            Some((id, res)) = candidates.next(), if !candidates.is_empty() => {
                unresolved.retain(|(i, _)| *i != id);
                match res {
                Ok(authed) => {
                    let s = authed.s;
                    trying[s] -= 1;
                    if connected[s] {
                        // The sender's own second connection (or a replay of
                        // its first frame): one per round.
                        continue;
                    }
                    connected[s] = true;
                    pending = pending.saturating_sub(1);
                    paths.push((s, authed.path));
                    let weight = match authed.hello {
                        Err(fault) => {
                            ban(s, fault, &mut banned);
                            continue;
                        }
                        Ok(None) => None,
                        Ok(Some(declared)) => {
                            let cap = ctx.weight_caps[s];
                            if declared > cap {
                                tracing::warn!(
                                    sender = s,
                                    peer = %crate::averager::peer_label(&ctx.group.members[s].peer_id),
                                    declared,
                                    cap,
                                    "averaging: clipping a sender's weight"
                                );
                                clipped.push((s, declared, cap));
                            }
                            Some(declared.min(cap))
                        }
                    };
                    handlers.push(serve_sender(ctx, red, tx, &encoded, authed, weight, nparts));
                }
                Err(Unauthenticated { s, rejected }) => {
                    trying[s] -= 1;
                    tracing::warn!(
                        claimed_sender = s,
                        remote = ?rejected.peer,
                        fault = %rejected.fault,
                        "averaging: dropping a connection that did not authenticate as the sender it named"
                    );
                    if impostors.len() < MAX_IMPOSTORS {
                        impostors.push(rejected);
                    }
                }
            }},
            _ = tokio::time::sleep_until(deadline), if accepting => {
                for &s in expected {
                    if !connected[s] {
                        connected[s] = true;
                        ban(s, PeerFault::Stalled { timeout: ctx.cfg.sender_timeout }, &mut banned);
                    }
                }
                pending = 0;
            }
            Some((s, res, written)) = handlers.next(), if !handlers.is_empty() => {
                bytes += written;
                if let Err(fault) = res {
                    let already = red.lock().map(|r| r.is_banned(s)).unwrap_or(true);
                    if !already {
                        ban(s, fault, &mut banned);
                    } else if !banned.iter().any(|(b, _)| *b == s) {
                        tracing::warn!(sender = s, %fault, "averaging: banned sender");
                        banned.push((s, fault));
                    }
                }
            }
        }
    }
    drop(handlers);
    drop(candidates);
    // Connections still trying to authenticate when the span finished
    // never did.
    for (_, r) in unresolved {
        if impostors.len() < MAX_IMPOSTORS {
            impostors.push(r);
        }
    }
    Served {
        banned,
        bytes,
        encoded: encoded.into_inner().ok(),
        paths,
        clipped,
        impostors,
    }
}

/// Read `inc`'s first frame under its claimed sender's key, within one
/// request timeout.
async fn authenticate<T: AsRef<[f32]> + Sync>(
    ctx: &Ctx<'_, T>,
    inc: Incoming,
    nparts: usize,
) -> std::result::Result<Authed, Unauthenticated> {
    let s = inc.preamble.sender as usize;
    let path = inc.stream.path();
    let refuse = |fault: PeerFault| Unauthenticated {
        s,
        rejected: RejectedConnection {
            peer: inc.remote,
            path,
            claimed_sender: Some(s),
            fault,
        },
    };
    let peer_key = &ctx.group.members[s].round_public_key;
    let keys = ctx
        .keys
        .connection_keys(peer_key, &ctx.digest, s as u32, ctx.me as u32, false)
        .map_err(|_| {
            refuse(PeerFault::ProtocolViolation {
                reason: "bad round public key",
            })
        })?;
    let bad_key = |_| refuse(PeerFault::ProtocolViolation { reason: "bad key" });
    let mut up = FrameCipher::new(&keys.up).map_err(bad_key)?;
    let down = FrameCipher::new(&keys.down).map_err(bad_key)?;
    let (mut rd, wr) = inc.stream.into_split();
    let mut buf = ctx.bytes.take();
    let (kind, _, payload) = wire::read_frame(
        &mut rd,
        &mut up,
        &mut buf,
        ctx.codecs.max_frame_len(),
        ctx.cfg.request_timeout,
    )
    .await
    .map_err(refuse)?;
    // From here on the frame is the sender's own: faults are its own.
    let hello = (|| {
        if kind == Kind::Withdraw {
            return Ok(None);
        }
        if kind != Kind::Hello {
            return Err(PeerFault::ProtocolViolation {
                reason: "first frame is not hello",
            });
        }
        let hello = Hello::decode(&buf[payload])?;
        if hello.schema_hash != ctx.schema {
            return Err(PeerFault::BadSchemaHash);
        }
        if hello.compression != ctx.codecs.hello_code() {
            return Err(PeerFault::ProtocolViolation {
                reason: "compression differs",
            });
        }
        if hello.num_parts as usize != nparts {
            return Err(PeerFault::UnexpectedPart {
                expected: nparts,
                got: hello.num_parts as usize,
                count: nparts,
            });
        }
        if !hello.weight.is_finite() || hello.weight < 0.0 {
            return Err(PeerFault::BadWeight {
                weight: hello.weight,
            });
        }
        Ok(Some(hello.weight))
    })();
    Ok(Authed {
        s,
        path,
        rd,
        wr,
        up,
        down,
        buf,
        hello,
    })
}

/// Byte offset of each part's encoding when parts of `lens` values are laid
/// end to end in `codec`'s wire form; one more entry than parts (the total).
pub(super) fn wire_offsets(parts: impl Iterator<Item = (Compression, usize)>) -> Vec<usize> {
    let mut offsets = vec![0];
    let mut at = 0;
    for (codec, len) in parts {
        at += codec.encoded_len(len);
        offsets.push(at);
    }
    offsets
}

/// This reducer's averages in a compressed wire codec, each part encoded on
/// first request into one span-sized pooled buffer and reused for every
/// recipient: one encode per part, and no fresh pages per round.
pub(super) struct EncodedAverages {
    /// Each part's codec.
    pub(super) codecs: Vec<Compression>,
    /// Byte offset of each part's encoding; one more entry than parts.
    pub(super) offsets: Vec<usize>,
    /// The encodings (in an `f32` buffer, for pooling).
    pub(super) buf: Vec<f32>,
    pub(super) done: Vec<bool>,
}

impl EncodedAverages {
    pub(super) fn new<T>(
        ctx: &Ctx<'_, T>,
        red: &Arc<Mutex<PartReducer>>,
        pool: &BufferPool,
    ) -> Self {
        let span = &ctx.spans[ctx.me];
        let parts = ctx.codecs.parts(span.clone());
        let codecs: Vec<Compression> = parts.iter().map(|r| ctx.codecs.at(r.start)).collect();
        let lens: Vec<usize> = red
            .lock()
            .map(|r| (0..r.num_parts()).map(|p| r.part_len(p)).collect())
            .unwrap_or_default();
        let offsets = wire_offsets(codecs.iter().copied().zip(lens.iter().copied()));
        let total = offsets[offsets.len() - 1];
        let buf = if ctx.codecs.uniform() == Some(Compression::None) || total == 0 {
            Vec::new()
        } else {
            pool.take(total.div_ceil(4))
        };
        Self {
            codecs,
            offsets,
            buf,
            done: vec![false; lens.len()],
        }
    }

    /// The encoding of part `p`, whose averages are `values`.
    pub(super) fn part(
        &mut self,
        p: usize,
        values: &[f32],
    ) -> std::result::Result<&[u8], PeerFault> {
        let (start, end) = match (self.offsets.get(p), self.offsets.get(p + 1)) {
            (Some(&s), Some(&e)) => (s, e),
            _ => {
                return Err(PeerFault::ProtocolViolation {
                    reason: "part outside the span",
                });
            }
        };
        let bytes = &mut bytemuck::cast_slice_mut::<f32, u8>(&mut self.buf)[start..end];
        if !self.done[p] {
            self.codecs
                .get(p)
                .copied()
                .unwrap_or_default()
                .encode_into(values, bytes)
                .map_err(|_| PeerFault::ProtocolViolation {
                    reason: "averages do not encode",
                })?;
            self.done[p] = true;
        }
        Ok(bytes)
    }

    pub(super) fn release(self, pool: &BufferPool) {
        pool.give(self.buf);
    }
}

async fn serve_sender<T: AsRef<[f32]> + Sync>(
    ctx: &Ctx<'_, T>,
    red: &Arc<Mutex<PartReducer>>,
    tx: &watch::Sender<usize>,
    encoded: &Mutex<EncodedAverages>,
    authed: Authed,
    weight: Option<f32>,
    nparts: usize,
) -> (usize, std::result::Result<(), PeerFault>, u64) {
    let Authed {
        s,
        mut rd,
        mut wr,
        mut up,
        mut down,
        mut buf,
        ..
    } = authed;
    let Some(weight) = weight else {
        // Withdrawn: finish its parts without it; it wants no results.
        tracing::info!(sender = s, "averaging: sender withdrew from the round");
        if let Ok(mut r) = red.lock() {
            r.ban(s);
            tx.send_replace(r.advance());
        }
        return (s, Ok(()), 0);
    };
    // A sender delivers its parts at a bounded pace: each within
    // `sender_timeout` of the last, and all of them by its budget (a share
    // of the round deadline), so a drip-feeding sender is banned while the
    // round can still finish for everyone else.
    let budget = ctx.sender_deadline;
    let part_codecs: Vec<Compression> = ctx
        .codecs
        .parts(ctx.spans[ctx.me].clone())
        .iter()
        .map(|r| ctx.codecs.at(r.start))
        .collect();
    let part_codec = |p: usize| part_codecs.get(p).copied().unwrap_or_default();
    let reader = async {
        let mut scratch = Vec::new();
        for p in 0..nparts {
            let left = budget.saturating_duration_since(tokio::time::Instant::now());
            let timeout = ctx.cfg.sender_timeout.min(left);
            let frame = wire::read_frame(
                &mut rd,
                &mut up,
                &mut buf,
                ctx.codecs.max_frame_len(),
                timeout,
            )
            .await;
            let (kind, index, payload) = match frame {
                Err(PeerFault::Stalled { .. }) if timeout < ctx.cfg.sender_timeout => {
                    return Err(PeerFault::TooSlow {
                        delivered: p,
                        parts: nparts,
                        budget: ctx.sender_budget,
                    });
                }
                other => other?,
            };
            if kind == Kind::Withdraw {
                // The sender found NaN/inf in its tensors: it contributes no
                // more parts (those delivered were finite and stay).
                tracing::info!(sender = s, "averaging: sender withdrew from the round");
                let mut r = lock(red);
                r.ban(s);
                tx.send_replace(r.advance());
                return Ok(());
            }
            if kind != Kind::Part {
                return Err(PeerFault::ProtocolViolation {
                    reason: "expected a part frame",
                });
            }
            let index = index as usize;
            let compression = part_codec(index);
            let mut r = lock(red);
            r.accumulate_encoded(s, index, &buf[payload], compression, weight, &mut scratch)?;
            tx.send_replace(r.advance());
        }
        Ok::<(), PeerFault>(())
    };
    // A client-mode sender gets results only once it has sent all its parts
    // (the reference's `should_delay_results`): on asymmetric links, results
    // flowing down while parts go up compress the sender's ACKs and slow both.
    let delay_results = ctx.group.members[s].mode == AveragingMode::Client;
    let writer = async {
        let mut rx = tx.subscribe();
        let mut frame = FrameBuf::new(ctx.bytes.take());
        let mut written = 0u64;
        for p in 0..nparts {
            // Wait until part p is finalized (or this sender is out of the round).
            loop {
                let (ready, gone) = {
                    let r = lock(red);
                    // A banned client gets what it delivered, then the writer ends.
                    let sent_all = !delay_results || r.delivered(s) == nparts || r.is_banned(s);
                    (
                        r.finalized() > p && sent_all,
                        r.is_banned(s) && r.delivered(s) <= p,
                    )
                };
                if gone {
                    return Ok(written);
                }
                if ready {
                    break;
                }
                if rx.changed().await.is_err() {
                    return Ok(written);
                }
            }
            // Averages are encrypted straight from the reducer (or the encoded
            // averages) into the frame: no plaintext copy per recipient.
            let compression = part_codec(p);
            let len = {
                let r = lock(red);
                let at = p as u32;
                match r.part(p) {
                    Some((PartResult::Averaged, values)) if compression == Compression::None => {
                        let bytes: &[u8] = bytemuck::cast_slice(values);
                        frame
                            .seal_from(Kind::Averaged, at, bytes.len(), [bytes], &mut down)?
                            .len()
                    }
                    Some((PartResult::Averaged, values)) => {
                        let mut enc = lock(encoded);
                        let bytes = enc.part(p, values)?;
                        frame
                            .seal_from(Kind::Averaged, at, bytes.len(), [bytes], &mut down)?
                            .len()
                    }
                    _ => {
                        frame.start(Kind::Empty, at, 0);
                        frame.seal(&mut down)?.len()
                    }
                }
            };
            let sealed = frame.sealed(len);
            wire::write_all_timeout(&mut wr, sealed, ctx.cfg.reducer_timeout).await?;
            written += sealed.len() as u64;
        }
        let _ = wr.shutdown().await;
        Ok::<u64, PeerFault>(written)
    };
    let reader = async {
        let res = reader.await;
        if res.is_err() {
            // Ban here, not after the join: this sender's own writer may be
            // waiting for a part that only the ban can complete.
            if let Ok(mut r) = red.lock() {
                r.ban(s);
                tx.send_replace(r.advance());
            }
        }
        res
    };
    let (read_res, write_res) = tokio::join!(reader, writer);
    let written = *write_res.as_ref().unwrap_or(&0);
    if let Err(f) = &write_res {
        tracing::debug!(sender = s, fault = %f, "averaging: could not return results");
    }
    (s, read_res, written)
}

/// The reducer's (or the encoded averages') state. Every connection of a round runs in one task, so a
/// panic while the lock is held unwinds the whole round: nothing can observe
/// a poisoned state, and recovering the guard never reads a torn update.
pub(super) fn lock<T>(state: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
