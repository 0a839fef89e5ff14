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
//!
//! Files by role: `reducer_side` (serving this peer's span to every sender),
//! `sender_side` (streaming parts to every reducer), `results` (what comes
//! back, and applying it).

mod reducer_side;
mod results;
mod sender_side;

use std::{
    ops::Range,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use futures::{StreamExt, stream::FuturesUnordered};
use tokio::sync::watch;

use crate::{
    compression::{Compression, all_finite},
    crypto::RoundKeyPair,
    dataplane::{BufferPool, BytePool, DataPlane},
    error::{AveragingError, Result},
    group::{AllreduceConfig, AssembledGroup, AveragingMode},
    load_balancing::balance_spans,
    partition::{TensorLayout, spans_from_sizes},
    reducer::{PartReducer, PartResult},
};

pub use self::results::{RoundOutcome, SpanResult};
use self::{
    reducer_side::{Served, add_own_part, serve_span},
    sender_side::send_to_reducer,
};

struct Ctx<'a, T> {
    group: &'a AssembledGroup,
    me: usize,
    keys: &'a RoundKeyPair,
    layout: &'a TensorLayout,
    tensors: &'a [T],
    weight: f32,
    /// Per member, the largest weight its parts may carry here (already
    /// including `cfg.max_weight`).
    weight_caps: Vec<f32>,
    cfg: &'a AllreduceConfig,
    /// Each tensor's wire codec, and the parts spans are cut into.
    codecs: crate::group::Codecs,
    bytes: &'a Arc<BytePool>,
    pool: &'a BufferPool,
    schema: [u8; 32],
    /// [`AssembledGroup::digest`]: the salt of every connection key.
    digest: [u8; 32],
    spans: Vec<Range<usize>>,
    /// [`AllreduceConfig::sender_budget`], and when it ends for this round.
    sender_budget: std::time::Duration,
    sender_deadline: tokio::time::Instant,
    /// When this peer stops waiting for a reducer's results.
    reducer_deadline: tokio::time::Instant,
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
    run_allreduce_capped(
        plane,
        group,
        my_index,
        keys,
        layout,
        tensors,
        weight,
        cfg,
        &[],
    )
    .await
}

/// [`run_allreduce`] where this peer, as a reducer, clips member `i`'s
/// weight to `weight_caps[i]` (and every weight to
/// [`AllreduceConfig::max_weight`]); members past the end of `weight_caps`
/// get `max_weight` only. A clipped weight is not a fault (an honest peer
/// may have counted a few samples more than others saw): it is logged and
/// reported in [`RoundOutcome::clipped_weights`].
///
/// # Errors
/// As [`run_allreduce`].
#[allow(clippy::too_many_arguments)]
pub async fn run_allreduce_capped<T: AsRef<[f32]> + Sync>(
    plane: &DataPlane,
    group: &AssembledGroup,
    my_index: usize,
    keys: &RoundKeyPair,
    layout: &TensorLayout,
    tensors: &[T],
    weight: f32,
    cfg: &AllreduceConfig,
    weight_caps: &[f32],
) -> Result<RoundOutcome> {
    let started = tokio::time::Instant::now();
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
    let weight_caps: Vec<f32> = (0..group.members.len())
        .map(|i| {
            let cap = weight_caps.get(i).copied().unwrap_or(f32::INFINITY);
            // A NaN cap is no cap at all; max_weight still holds.
            if cap.is_nan() {
                cfg.max_weight
            } else {
                cap.clamp(0.0, cfg.max_weight)
            }
        })
        .collect();
    // This peer's own weight obeys the same caps as everyone's.
    let weight = weight.min(weight_caps[my_index]);
    // Local tensors are checked for NaN/inf part by part as they are encoded
    // (while each part is in cache), not in a separate pass over the whole
    // buffer up front; a poisoned part makes this peer withdraw (`Ctx::withdraw`).
    let sizes = balance_spans(layout.total(), &group.bandwidths(), cfg.min_vector_size)?;
    let codecs = crate::group::Codecs::new(layout, cfg)?;
    let ctx = Ctx {
        group,
        me: my_index,
        keys,
        layout,
        tensors,
        weight,
        weight_caps,
        cfg,
        codecs,
        bytes: &plane.bytes,
        pool: &plane.pool,
        schema: crate::group::schema_hash_with(layout, cfg),
        digest: group.digest(),
        spans: spans_from_sizes(&sizes),
        sender_budget: cfg.sender_budget(),
        sender_deadline: started + cfg.sender_budget(),
        reducer_deadline: started + cfg.reducer_budget(),
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
    // Reducer side: this peer's span, with the first part of its own
    // contribution added up front (parts relative to the span).
    let own_parts: Vec<_> = ctx
        .codecs
        .parts(my_span.clone())
        .into_iter()
        .map(|r| r.start - my_span.start..r.end - my_span.start)
        .collect();
    let reducer_side = if my_span.is_empty() {
        None
    } else {
        let parts = &own_parts;
        let mut red = PartReducer::with_aggregation(
            parts.clone(),
            n,
            plane.take_buffer(my_span.len()),
            ctx.cfg.aggregation,
        );
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
            let mut r = reducer_side::lock(red);
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
    let members: Vec<Vec<u8>> = ctx
        .group
        .members
        .iter()
        .map(|m| m.peer_id.clone())
        .collect();
    let route = reducer_side
        .as_ref()
        .map(|_| plane.register(ctx.group.group_id, members, n));

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
                let served = serve_span(ctx, red, tx, &mut route.rx, &remote_senders).await;
                (served, route.rejected())
            }
            _ => (Served::default(), Vec::new()),
        }
    };
    let send = async {
        let futs: FuturesUnordered<_> = remote_reducers
            .iter()
            .map(|&r| send_to_reducer(plane, ctx, r))
            .collect();
        futs.collect::<Vec<_>>().await
    };
    let (own, (served, rejected), sent) = tokio::join!(own, serve, send);
    own?;
    let Served {
        banned: banned_senders,
        bytes: served_bytes,
        mut encoded,
        paths: served_paths,
        clipped: clipped_weights,
        impostors,
    } = served;

    let mut spans = Vec::new();
    let mut failed_reducers = Vec::new();
    let mut bytes_sent = served_bytes;
    let mut any_remote_result = false;
    let mut sent_paths = Vec::new();
    for (result, bytes, fault, checked, path) in sent {
        bytes_sent += bytes;
        if let Some(path) = path {
            sent_paths.push((result.reducer, path));
        }
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
            let parts = ctx.codecs.parts(my_span.clone());
            let averaged: Vec<bool> = (0..parts.len())
                .map(|p| matches!(red.part(p), Some((PartResult::Averaged, _))))
                .collect();
            let compressed = encoded
                .take()
                .filter(|_| ctx.codecs.uniform() != Some(Compression::None));
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
                        wire: Some(ctx.codecs.clone()),
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
        sent_paths,
        served_paths,
        rejected,
        clipped_weights,
        impostors,
    })
}
