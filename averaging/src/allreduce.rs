//! One butterfly all-reduce round over the data plane, for an explicit group.
//!
//! Every member reduces the span the balancer gives it. Each sender opens one
//! connection per remote reducer and streams its parts of that reducer's span
//! while, on the same connection, reading back the averages of the parts the
//! reducer has finished: sending, reducing and receiving overlap. All
//! connections of a round are driven by one task.
//!
//! Faults: a reducer bans a sender that stalls or misbehaves and averages the
//! remaining parts without it. A sender that loses a reducer keeps its local
//! values for the parts of that span it did not get back. We chose keep-local over
//! re-reducing the slice among survivors: re-reduction needs the survivors to
//! agree on who failed and a second exchange inside the same deadline, while
//! keep-local is always finite, bounded in time, and the next round (or the next
//! Moshpit group) averages those values anyway.

use std::{
    ops::Range,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use futures::{StreamExt, stream::FuturesUnordered};
use tokio::{
    io::AsyncWriteExt,
    net::{
        TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::watch,
};

use crate::{
    compression::{Compression, all_finite},
    crypto::{FrameCipher, RoundKeyPair, TAG_LEN},
    dataplane::{BufferPool, BytePool, DataPlane, Incoming},
    error::{AveragingError, PeerFault, Result},
    group::{AllreduceConfig, AssembledGroup, AveragingMode, schema_hash},
    load_balancing::load_balance_peers,
    partition::{TensorLayout, part_ranges, spans_from_sizes},
    reducer::{PartReducer, PartResult},
    wire::{self, FrameBuf, Hello, Kind, Preamble},
};

/// Results of one span as received by this peer.
#[derive(Debug, Clone)]
pub struct SpanResult {
    /// Reducer position in the group.
    pub reducer: usize,
    /// The span in the flat vector.
    pub span: Range<usize>,
    parts: Vec<Range<usize>>,
    /// The averages: `f32` values, or with `wire` set, the opened wire
    /// payloads of that codec, part after part (in an `f32` buffer for
    /// alignment and pooling), decoded straight into the tensors by `apply`.
    values: Vec<f32>,
    wire: Option<Compression>,
    /// With `wire`: byte offset of each part's payload, one more than parts.
    wire_offsets: Vec<usize>,
    averaged: Vec<bool>,
}

impl SpanResult {
    /// The wire payload of part `p` (wire form only).
    fn wire_part(&self, p: usize) -> &[u8] {
        let bytes = bytemuck::cast_slice::<f32, u8>(&self.values);
        &bytes[self.wire_offsets[p]..self.wire_offsets[p + 1]]
    }

    /// [`Self::wire_part`], writable.
    fn wire_part_mut(&mut self, p: usize) -> &mut [u8] {
        let (start, end) = (self.wire_offsets[p], self.wire_offsets[p + 1]);
        &mut bytemuck::cast_slice_mut::<f32, u8>(&mut self.values)[start..end]
    }

    /// Number of elements of this span that were averaged.
    pub fn averaged_elements(&self) -> usize {
        self.parts
            .iter()
            .zip(&self.averaged)
            .filter(|(_, a)| **a)
            .map(|(p, _)| p.len())
            .sum()
    }
}

/// What a round produced; apply it with [`RoundOutcome::apply`]. Its buffers
/// go back to the data plane's pool when it is dropped.
#[derive(Debug, Clone)]
pub struct RoundOutcome {
    pool: Option<Arc<BufferPool>>,
    /// This peer's position in the group.
    pub my_index: usize,
    /// Elements each member reduced.
    pub span_sizes: Vec<usize>,
    /// Per reducer span, what came back (empty for auxiliary peers).
    pub spans: Vec<SpanResult>,
    /// Reducers this peer gave up on, with the reason.
    pub failed_reducers: Vec<(usize, PeerFault)>,
    /// Senders this peer (as reducer) banned, with the reason.
    pub banned_senders: Vec<(usize, PeerFault)>,
    /// Bytes this peer wrote to the data plane.
    pub bytes_sent: u64,
}

impl Drop for RoundOutcome {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            for s in self.spans.drain(..) {
                pool.give(s.values);
            }
        }
    }
}

impl RoundOutcome {
    /// Elements that were averaged (the rest keep local values).
    pub fn averaged_elements(&self) -> usize {
        self.spans.iter().map(SpanResult::averaged_elements).sum()
    }

    /// Apply `local += alpha · (average − local)` on every averaged element.
    ///
    /// # Errors
    /// [`AveragingError::LayoutMismatch`] if `buffers` do not match `layout`.
    pub fn apply<T: AsRef<[f32]> + AsMut<[f32]>>(
        &self,
        layout: &TensorLayout,
        buffers: &mut [T],
        alpha: f32,
    ) -> Result<()> {
        layout.check(buffers)?;
        for s in &self.spans {
            for (p, (part, averaged)) in s.parts.iter().zip(&s.averaged).enumerate() {
                if !*averaged {
                    continue;
                }
                if let Some(codec) = s.wire {
                    // Wire form: decode straight into the tensors.
                    let bytes = s.wire_part(p);
                    for (i, local, global) in layout.pieces(part.clone()) {
                        let in_part = global.start - part.start..global.end - part.start;
                        let dst = &mut buffers[i].as_mut()[local];
                        codec.apply_wire(bytes, part.len(), in_part, dst, alpha)?;
                    }
                    continue;
                }
                let local = part.start - s.span.start..part.end - s.span.start;
                let values = &s.values[local];
                layout.zip_mut(buffers, part.clone(), values, |dst, avg| {
                    if alpha == 1.0 {
                        dst.copy_from_slice(avg);
                    } else {
                        for (d, a) in dst.iter_mut().zip(avg) {
                            *d += alpha * (a - *d);
                        }
                    }
                });
            }
        }
        Ok(())
    }
}

struct Ctx<'a, T> {
    group: &'a AssembledGroup,
    me: usize,
    keys: &'a RoundKeyPair,
    layout: &'a TensorLayout,
    tensors: &'a [T],
    weight: f32,
    cfg: &'a AllreduceConfig,
    bytes: &'a Arc<BytePool>,
    pool: &'a BufferPool,
    schema: [u8; 32],
    spans: Vec<Range<usize>>,
    /// Set once a part of this sender's tensors is found not finite: from
    /// then on it withdraws from every reducer (see [`Ctx::withdraw`]).
    withdrawn: AtomicBool,
}

impl<T> Ctx<'_, T> {
    fn is_withdrawn(&self) -> bool {
        self.withdrawn.load(Ordering::Relaxed)
    }

    /// This sender's tensors hold NaN/inf: it stops contributing. Parts it
    /// already delivered were finite and stay in their averages (a reducer
    /// treats a remote sender's poisoned part the same way); every reducer
    /// gets a `Withdraw` frame instead of its next part; the round still
    /// reduces this peer's own span for the others, and ends in
    /// [`AveragingError::NonFiniteLocal`].
    fn withdraw(&self) {
        if !self.withdrawn.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "averaging: local tensors hold NaN/inf; withdrawing from this round and only reducing"
            );
        }
    }
}

/// Run one all-reduce round for `group` as member `my_index`, reading `tensors`
/// (never writing them) and returning the averages to apply.
///
/// # Errors
/// Typed errors for an invalid group or config, non-finite local tensors, the
/// round deadline ([`AveragingError::AllreduceTimeout`]) and the loss of every
/// remote reducer ([`AveragingError::AllReducersFailed`]). Misbehaving peers are
/// reported in the outcome, not as errors.
///
/// # Cancel safety
/// Cancel safe: dropping the future closes this round's connections and leaves
/// the tensors untouched.
#[allow(clippy::too_many_arguments)]
pub async fn run_allreduce<T: AsRef<[f32]> + Sync>(
    plane: &DataPlane,
    group: &AssembledGroup,
    my_index: usize,
    keys: &RoundKeyPair,
    layout: &TensorLayout,
    tensors: &[T],
    weight: f32,
    cfg: &AllreduceConfig,
) -> Result<RoundOutcome> {
    cfg.validate()?;
    group.validate()?;
    layout.check(tensors)?;
    let me_member = group
        .members
        .get(my_index)
        .ok_or_else(|| AveragingError::InvalidGroup {
            reason: format!("my index {my_index} is outside the group"),
        })?;
    if !weight.is_finite() || weight < 0.0 {
        return Err(AveragingError::InvalidConfig {
            field: "weight",
            reason: format!("{weight} is not a finite non-negative number"),
        });
    }
    let weight = if me_member.mode == AveragingMode::Aux {
        0.0
    } else {
        weight
    };
    // Local tensors are checked for NaN/inf part by part as they are encoded
    // (while each part is in cache), not in a separate pass over the whole
    // buffer up front; a poisoned part makes this peer withdraw (`Ctx::withdraw`).
    let sizes = load_balance_peers(layout.total(), &group.bandwidths(), cfg.min_vector_size)?;
    let ctx = Ctx {
        group,
        me: my_index,
        keys,
        layout,
        tensors,
        weight,
        cfg,
        bytes: &plane.bytes,
        pool: &plane.pool,
        schema: schema_hash(layout),
        spans: spans_from_sizes(&sizes),
        withdrawn: AtomicBool::new(false),
    };
    let timeout = cfg.allreduce_timeout;
    match tokio::time::timeout(timeout, run_round(plane, &ctx)).await {
        // The outcome holds nothing to apply; its buffers go back to the pool.
        Ok(_) if ctx.is_withdrawn() => Err(AveragingError::NonFiniteLocal),
        Ok(res) => res.map(|mut out| {
            out.span_sizes = sizes;
            out
        }),
        Err(_) => Err(AveragingError::AllreduceTimeout { timeout }),
    }
}

async fn run_round<T: AsRef<[f32]> + Sync>(
    plane: &DataPlane,
    ctx: &Ctx<'_, T>,
) -> Result<RoundOutcome> {
    let n = ctx.group.members.len();
    let my_span = ctx.spans[ctx.me].clone();
    let me_sender = ctx.group.members[ctx.me].mode.is_sender();
    let part_len = ctx.cfg.part_len();

    // Reducer side: this peer's span, with the first part of its own
    // contribution added up front.
    let own_parts = part_ranges(0..my_span.len(), part_len);
    let reducer_side = if my_span.is_empty() {
        None
    } else {
        let parts = &own_parts;
        let mut red = PartReducer::with_buffer(parts.clone(), n, plane.take_buffer(my_span.len()));
        for (i, m) in ctx.group.members.iter().enumerate() {
            if !m.mode.is_sender() {
                red.ban(i);
            }
        }
        // The first own part is added before anything is sent (poison there
        // means withdrawing before any hello); the rest while parts stream.
        if me_sender && !parts.is_empty() {
            add_own_part(ctx, &mut red, &my_span, parts, 0)?;
        }
        let finalized = red.advance();
        let (tx, _) = watch::channel(finalized);
        Some((Arc::new(Mutex::new(red)), tx))
    };
    // This peer's own contribution to the rest of its span, part by part,
    // yielding between parts so the connections keep streaming meanwhile.
    let own = async {
        let Some((red, tx)) = reducer_side.as_ref().filter(|_| me_sender) else {
            return Ok(());
        };
        let parts = &own_parts;
        for p in 1..parts.len() {
            tokio::task::yield_now().await;
            let mut r = red.lock().map_err(|_| AveragingError::InvalidGroup {
                reason: "reducer state poisoned".into(),
            })?;
            // Withdrawn (poison found in any part) or failed: the reducer
            // stops waiting for this peer's remaining parts.
            let added = if ctx.is_withdrawn() {
                Ok(false)
            } else {
                add_own_part(ctx, &mut r, &my_span, parts, p).map(|()| !ctx.is_withdrawn())
            };
            if !matches!(added, Ok(true)) {
                r.ban(ctx.me);
            }
            tx.send_replace(r.advance());
            if !added? {
                break;
            }
        }
        Ok::<(), AveragingError>(())
    };
    let route = reducer_side
        .as_ref()
        .map(|_| plane.register(ctx.group.group_id, n));

    let remote_senders: Vec<usize> = (0..n)
        .filter(|&i| i != ctx.me && ctx.group.members[i].mode.is_sender())
        .collect();
    let remote_reducers: Vec<usize> = if me_sender {
        (0..n)
            .filter(|&r| r != ctx.me && !ctx.spans[r].is_empty())
            .collect()
    } else {
        Vec::new()
    };

    let serve = async {
        match (&reducer_side, route) {
            (Some((red, tx)), Some(mut route)) => {
                serve_span(ctx, red, tx, &mut route.rx, &remote_senders).await
            }
            _ => (Vec::new(), 0, None),
        }
    };
    let send = async {
        let futs: FuturesUnordered<_> = remote_reducers
            .iter()
            .map(|&r| send_to_reducer(plane, ctx, r))
            .collect();
        futs.collect::<Vec<_>>().await
    };
    let (own, (banned_senders, served_bytes, mut encoded), sent) = tokio::join!(own, serve, send);
    own?;

    let mut spans = Vec::new();
    let mut failed_reducers = Vec::new();
    let mut bytes_sent = served_bytes;
    let mut any_remote_result = false;
    for (result, bytes, fault, checked) in sent {
        bytes_sent += bytes;
        // Parts that were never encoded (the reducer failed first) were never
        // checked either: check them now, so NaN/inf anywhere in the local
        // tensors still ends the round in NonFiniteLocal.
        if !ctx.is_withdrawn() && checked < result.parts.len() {
            let poisoned = result.parts[checked..].iter().any(|part| {
                !ctx.layout
                    .pieces(part.clone())
                    .all(|(i, local, _)| all_finite(&ctx.tensors[i].as_ref()[local]))
            });
            if poisoned {
                ctx.withdraw();
            }
        }
        if result.averaged.iter().any(|a| *a) {
            any_remote_result = true;
        }
        if let Some(f) = fault {
            tracing::warn!(reducer = result.reducer, fault = %f, "averaging: reducer failed, keeping local values for the rest of its span");
            failed_reducers.push((result.reducer, f));
        }
        spans.push(result);
    }
    if let Some((red, _)) = reducer_side
        && me_sender
    {
        {
            let red = Arc::try_unwrap(red)
                .ok()
                .and_then(|m| m.into_inner().ok())
                .ok_or(AveragingError::InvalidGroup {
                    reason: "reducer state still shared after the round".into(),
                })?;
            let parts = part_ranges(my_span.clone(), part_len);
            let averaged: Vec<bool> = (0..parts.len())
                .map(|p| matches!(red.part(p), Some((PartResult::Averaged, _))))
                .collect();
            let compressed = encoded.take().filter(|e| e.codec != Compression::None);
            match compressed {
                // Compressed: this peer applies the very bytes it sent every
                // other peer, so all members end with identical values (the
                // reference applies the uncompressed average to the reducer's
                // own part, leaving it off by the codec's rounding).
                Some(mut enc) => {
                    for (p, _) in averaged.iter().enumerate().filter(|(_, a)| **a) {
                        if let Some((_, values)) = red.part(p) {
                            enc.part(p, values).map_err(|fault| AveragingError::Peer {
                                peer: ctx.me,
                                fault,
                            })?;
                        }
                    }
                    plane.pool.give(red.into_values());
                    spans.push(SpanResult {
                        reducer: ctx.me,
                        span: my_span.clone(),
                        parts,
                        values: enc.buf,
                        wire: Some(enc.codec),
                        wire_offsets: enc.offsets,
                        averaged,
                    });
                }
                None => spans.push(SpanResult {
                    reducer: ctx.me,
                    span: my_span.clone(),
                    parts,
                    values: red.into_values(),
                    wire: None,
                    wire_offsets: Vec::new(),
                    averaged,
                }),
            }
        }
    }
    if let Some(unused) = encoded {
        unused.release(&plane.pool);
    }
    if !remote_reducers.is_empty()
        && !any_remote_result
        && failed_reducers.len() == remote_reducers.len()
        && my_span.is_empty()
    {
        return Err(AveragingError::AllReducersFailed {
            failed: failed_reducers.len(),
        });
    }
    spans.sort_by_key(|s| s.span.start);
    Ok(RoundOutcome {
        pool: Some(plane.pool.clone()),
        my_index: ctx.me,
        span_sizes: Vec::new(),
        spans,
        failed_reducers,
        banned_senders,
        bytes_sent,
    })
}

/// Add this peer's own part `p` of its span (`parts` relative to `span`) to
/// its reducer, checking it for NaN/inf first (then it is accumulated while
/// still in cache); a poisoned part makes this peer withdraw instead.
fn add_own_part<T: AsRef<[f32]> + Sync>(
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

/// Accept the remote senders of this peer's span and serve them until every
/// part is finalized and sent back. Returns banned senders and bytes written.
async fn serve_span<T: AsRef<[f32]> + Sync>(
    ctx: &Ctx<'_, T>,
    red: &Arc<Mutex<PartReducer>>,
    tx: &watch::Sender<usize>,
    rx: &mut tokio::sync::mpsc::Receiver<Incoming>,
    expected: &[usize],
) -> (Vec<(usize, PeerFault)>, u64, Option<EncodedAverages>) {
    let mut banned: Vec<(usize, PeerFault)> = Vec::new();
    let mut connected = vec![false; ctx.group.members.len()];
    let mut pending = expected.len();
    // Compressed averages are encoded once, into one pooled span-sized buffer,
    // and copied into each recipient's frame (raw f32 "encoding" is already a
    // copy, so it is not cached).
    let encoded = Mutex::new(EncodedAverages::new(ctx.cfg.compression, red, ctx.pool));
    let mut handlers = FuturesUnordered::new();
    let mut bytes = 0u64;
    let deadline = tokio::time::Instant::now() + ctx.cfg.sender_timeout;
    let ban = |sender: usize, fault: PeerFault, banned: &mut Vec<(usize, PeerFault)>| {
        tracing::warn!(sender, %fault, "averaging: banning sender");
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
                    && !connected[s];
                if !valid {
                    tracing::warn!(sender = s, "averaging: unexpected connection for this round");
                    continue;
                }
                connected[s] = true;
                pending -= 1;
                handlers.push(serve_sender(ctx, red, tx, &encoded, inc));
            }
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
    (banned, bytes, encoded.into_inner().ok())
}

/// Byte offset of each part's encoding when parts of `lens` values are laid
/// end to end in `codec`'s wire form; one more entry than parts (the total).
fn wire_offsets(codec: Compression, lens: impl Iterator<Item = usize>) -> Vec<usize> {
    let mut offsets = vec![0];
    let mut at = 0;
    for len in lens {
        at += codec.encoded_len(len);
        offsets.push(at);
    }
    offsets
}

/// This reducer's averages in a compressed wire codec, each part encoded on
/// first request into one span-sized pooled buffer and reused for every
/// recipient: one encode per part, and no fresh pages per round.
struct EncodedAverages {
    codec: Compression,
    /// Byte offset of each part's encoding; one more entry than parts.
    offsets: Vec<usize>,
    /// The encodings (in an `f32` buffer, for pooling).
    buf: Vec<f32>,
    done: Vec<bool>,
}

impl EncodedAverages {
    fn new(codec: Compression, red: &Arc<Mutex<PartReducer>>, pool: &BufferPool) -> Self {
        let lens: Vec<usize> = red
            .lock()
            .map(|r| (0..r.num_parts()).map(|p| r.part_len(p)).collect())
            .unwrap_or_default();
        let offsets = wire_offsets(codec, lens.iter().copied());
        let total = offsets[offsets.len() - 1];
        let buf = if codec == Compression::None || total == 0 {
            Vec::new()
        } else {
            pool.take(total.div_ceil(4))
        };
        Self {
            codec,
            offsets,
            buf,
            done: vec![false; lens.len()],
        }
    }

    /// The encoding of part `p`, whose averages are `values`.
    fn part(&mut self, p: usize, values: &[f32]) -> std::result::Result<&[u8], PeerFault> {
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
            self.codec
                .encode_into(values, bytes)
                .map_err(|_| PeerFault::ProtocolViolation {
                    reason: "averages do not encode",
                })?;
            self.done[p] = true;
        }
        Ok(bytes)
    }

    fn release(self, pool: &BufferPool) {
        pool.give(self.buf);
    }
}

async fn serve_sender<T: AsRef<[f32]> + Sync>(
    ctx: &Ctx<'_, T>,
    red: &Arc<Mutex<PartReducer>>,
    tx: &watch::Sender<usize>,
    encoded: &Mutex<EncodedAverages>,
    inc: Incoming,
) -> (usize, std::result::Result<(), PeerFault>, u64) {
    let s = inc.preamble.sender as usize;
    let setup = || -> std::result::Result<_, PeerFault> {
        let peer_key = &ctx.group.members[s].round_public_key;
        let keys = ctx
            .keys
            .connection_keys(peer_key, &ctx.group.group_id, s as u32, ctx.me as u32)
            .map_err(|_| PeerFault::ProtocolViolation {
                reason: "bad round public key",
            })?;
        let up = FrameCipher::new(&keys.up)
            .map_err(|_| PeerFault::ProtocolViolation { reason: "bad key" })?;
        let down = FrameCipher::new(&keys.down)
            .map_err(|_| PeerFault::ProtocolViolation { reason: "bad key" })?;
        Ok((up, down))
    };
    let (mut up, mut down) = match setup() {
        Ok(k) => k,
        Err(f) => return (s, Err(f), 0),
    };
    let (mut rd, mut wr) = inc.stream.into_split();
    let mut buf = ctx.bytes.take();
    let nparts = red.lock().map(|r| r.num_parts()).unwrap_or(0);
    let hello = async {
        let (kind, _, payload) = wire::read_frame(
            &mut rd,
            &mut up,
            &mut buf,
            ctx.cfg.max_frame(),
            ctx.cfg.request_timeout,
        )
        .await?;
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
        if hello.compression != ctx.cfg.compression.code() {
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
            return Err(PeerFault::NonFinite { part: 0 });
        }
        Ok(Some(hello.weight))
    };
    let weight = match hello.await {
        Ok(Some(w)) => w,
        Ok(None) => {
            // Withdrawn: finish its parts without it; it wants no results.
            tracing::info!(sender = s, "averaging: sender withdrew from the round");
            if let Ok(mut r) = red.lock() {
                r.ban(s);
                tx.send_replace(r.advance());
            }
            return (s, Ok(()), 0);
        }
        Err(f) => return (s, Err(f), 0),
    };
    let compression = ctx.cfg.compression;
    let reader = async {
        let mut scratch = Vec::new();
        for _ in 0..nparts {
            let (kind, index, payload) = wire::read_frame(
                &mut rd,
                &mut up,
                &mut buf,
                ctx.cfg.max_frame(),
                ctx.cfg.sender_timeout,
            )
            .await?;
            if kind == Kind::Withdraw {
                // The sender found NaN/inf in its tensors: it contributes no
                // more parts (those delivered were finite and stay).
                tracing::info!(sender = s, "averaging: sender withdrew from the round");
                let mut r = red.lock().map_err(|_| PeerFault::ProtocolViolation {
                    reason: "reducer state poisoned",
                })?;
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
            let mut r = red.lock().map_err(|_| PeerFault::ProtocolViolation {
                reason: "reducer state poisoned",
            })?;
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
                    let r = red.lock().map_err(|_| PeerFault::ProtocolViolation {
                        reason: "reducer state poisoned",
                    })?;
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
            let len = {
                let r = red.lock().map_err(|_| PeerFault::ProtocolViolation {
                    reason: "reducer state poisoned",
                })?;
                let at = p as u32;
                match r.part(p) {
                    Some((PartResult::Averaged, values)) if compression == Compression::None => {
                        let bytes: &[u8] = bytemuck::cast_slice(values);
                        frame
                            .seal_from(Kind::Averaged, at, bytes.len(), [bytes], &mut down)?
                            .len()
                    }
                    Some((PartResult::Averaged, values)) => {
                        let mut enc = encoded.lock().map_err(|_| PeerFault::ProtocolViolation {
                            reason: "encoded averages poisoned",
                        })?;
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

/// Stream this peer's parts of reducer `r`'s span and collect the averages.
/// Returns the results, the bytes written, the reducer's fault if any, and
/// how many leading parts were encoded (and so checked for NaN/inf).
async fn send_to_reducer<T: AsRef<[f32]> + Sync>(
    plane: &DataPlane,
    ctx: &Ctx<'_, T>,
    r: usize,
) -> (SpanResult, u64, Option<PeerFault>, usize) {
    let span = ctx.spans[r].clone();
    let parts = part_ranges(span.clone(), ctx.cfg.part_len());
    // Compressed results stay in wire form (a half or a quarter of the
    // staging memory, and `apply` decodes once instead of decoding and then
    // copying).
    let codec = ctx.cfg.compression;
    let wire = (codec != Compression::None).then_some(codec);
    let (wire_offsets, staged) = if wire.is_some() {
        let offsets = wire_offsets(codec, parts.iter().map(|p| p.len()));
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
    let fault = exchange(ctx, r, &mut result, &mut bytes, &mut checked)
        .await
        .err();
    (result, bytes, fault, checked)
}

async fn exchange<T: AsRef<[f32]> + Sync>(
    ctx: &Ctx<'_, T>,
    r: usize,
    result: &mut SpanResult,
    bytes: &mut u64,
    checked: &mut usize,
) -> std::result::Result<(), PeerFault> {
    let member = &ctx.group.members[r];
    let addr = member.data_addr.ok_or(PeerFault::ProtocolViolation {
        reason: "reducer has no data address",
    })?;
    let keys = ctx
        .keys
        .connection_keys(
            &member.round_public_key,
            &ctx.group.group_id,
            ctx.me as u32,
            r as u32,
        )
        .map_err(|_| PeerFault::ProtocolViolation {
            reason: "bad round public key",
        })?;
    let bad_key = |_| PeerFault::ProtocolViolation { reason: "bad key" };
    let mut up = FrameCipher::new(&keys.up).map_err(bad_key)?;
    let mut down = FrameCipher::new(&keys.down).map_err(bad_key)?;
    let stream = match tokio::time::timeout(ctx.cfg.request_timeout, TcpStream::connect(addr)).await
    {
        Err(_) => {
            return Err(PeerFault::Stalled {
                timeout: ctx.cfg.request_timeout,
            });
        }
        Ok(Err(e)) => {
            return Err(PeerFault::Disconnected {
                reason: e.to_string(),
            });
        }
        Ok(Ok(s)) => s,
    };
    let _ = stream.set_nodelay(true);
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
    let mut frame = Vec::with_capacity(ctx.cfg.max_frame() + 64);
    frame.extend_from_slice(&preamble.encode());
    let mut hello = Vec::new();
    wire::begin_frame(&mut hello, Kind::Hello, 0);
    Hello {
        schema_hash: ctx.schema,
        compression: ctx.cfg.compression.code(),
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
    wr: &mut OwnedWriteHalf,
    checked: &mut usize,
) -> std::result::Result<u64, PeerFault> {
    let compression = ctx.cfg.compression;
    let mut frame = FrameBuf::new(ctx.bytes.take());
    let mut scratch = Vec::new();
    let mut written = 0u64;
    let refused = |_| PeerFault::ProtocolViolation {
        reason: "local part does not encode",
    };
    for (p, range) in parts.iter().enumerate() {
        let at = p as u32;
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

async fn read_results<T: AsRef<[f32]> + Sync>(
    ctx: &Ctx<'_, T>,
    mut rd: OwnedReadHalf,
    down: &mut FrameCipher,
    result: &mut SpanResult,
) -> std::result::Result<(), PeerFault> {
    let mut buf = ctx.bytes.take();
    let compression = ctx.cfg.compression;
    let timeout = ctx.cfg.reducer_timeout;
    let unauthentic = |_| PeerFault::Garbage {
        reason: "frame failed authentication",
    };
    for p in 0..result.parts.len() {
        let deadline = tokio::time::Instant::now() + timeout;
        let (len_bytes, body_len, header) =
            wire::read_head(&mut rd, ctx.cfg.max_frame(), deadline, timeout).await?;
        // Header fields pick the read path; they are authenticated when the
        // frame is opened, and a forged header fails there.
        let kind = Kind::from_u8(header[0]).ok_or(PeerFault::Garbage {
            reason: "unknown frame kind",
        })?;
        let index = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
        if index != p {
            return Err(PeerFault::UnexpectedPart {
                expected: p,
                got: index,
                count: result.parts.len(),
            });
        }
        let payload_len = body_len - wire::HEADER_LEN - TAG_LEN;
        let range = result.parts[p].clone();
        let local = range.start - result.span.start..range.end - result.span.start;
        let mut tag = [0u8; TAG_LEN];
        if kind == Kind::Averaged && result.wire.is_some() {
            // Compressed averages stay in wire form: read and open them in
            // place, and check them without decoding.
            if payload_len != compression.encoded_len(range.len()) {
                return Err(PeerFault::WrongPartSize {
                    part: p,
                    expected: range.len(),
                    got: (payload_len as f64 / compression.bytes_per_element()) as usize,
                });
            }
            let bytes = result.wire_part_mut(p);
            wire::read_exact_by(&mut rd, bytes, deadline, timeout).await?;
            wire::read_exact_by(&mut rd, &mut tag, deadline, timeout).await?;
            down.open_detached(len_bytes, &header, bytes, &tag)
                .map_err(unauthentic)?;
            if !compression.wire_all_finite(bytes, range.len()) {
                return Err(PeerFault::NonFinite { part: p });
            }
            result.averaged[p] = true;
            continue;
        }
        if kind == Kind::Averaged
            && compression == Compression::None
            && payload_len == 4 * range.len()
        {
            // Raw f32 averages: read and open the payload straight in the
            // staging buffer, with no copy.
            let out = &mut result.values[local];
            let bytes: &mut [u8] = bytemuck::cast_slice_mut(out);
            wire::read_exact_by(&mut rd, bytes, deadline, timeout).await?;
            wire::read_exact_by(&mut rd, &mut tag, deadline, timeout).await?;
            down.open_detached(len_bytes, &header, bytes, &tag)
                .map_err(unauthentic)?;
            if !all_finite(out) {
                return Err(PeerFault::NonFinite { part: p });
            }
            result.averaged[p] = true;
            continue;
        }
        if buf.len() < payload_len {
            buf.resize(payload_len, 0);
        }
        let payload = &mut buf[..payload_len];
        wire::read_exact_by(&mut rd, payload, deadline, timeout).await?;
        wire::read_exact_by(&mut rd, &mut tag, deadline, timeout).await?;
        down.open_detached(len_bytes, &header, payload, &tag)
            .map_err(unauthentic)?;
        match kind {
            Kind::Averaged => {
                let out = &mut result.values[local];
                let finite = compression.decode_into_checked(payload, out).map_err(|_| {
                    PeerFault::WrongPartSize {
                        part: p,
                        expected: range.len(),
                        got: (payload.len() as f64 / compression.bytes_per_element()) as usize,
                    }
                })?;
                if !finite {
                    return Err(PeerFault::NonFinite { part: p });
                }
                result.averaged[p] = true;
            }
            Kind::Empty => {}
            _ => {
                return Err(PeerFault::ProtocolViolation {
                    reason: "expected a result frame",
                });
            }
        }
    }
    Ok(())
}
