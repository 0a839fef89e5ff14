//! Weighted accumulation of one reducer's span across senders.
//!
//! Senders deliver their parts in order; part `p` is complete when every sender
//! that is still in the round has delivered it. A banned sender keeps its
//! contribution to the parts it already delivered and is left out of the rest,
//! as in the reference's `TensorPartReducer.on_sender_failed`.

use std::ops::Range;

use colony_kernels::cpu as kernels;

use crate::{
    error::PeerFault,
    robust::{Aggregation, aggregate},
};

/// Accumulator for the parts of one span.
#[derive(Debug)]
pub struct PartReducer {
    parts: Vec<Range<usize>>,
    acc: Vec<f32>,
    weight_sum: Vec<f64>,
    delivered: Vec<usize>,
    banned: Vec<bool>,
    finalized: usize,
    overflowed: usize,
    /// With a robust aggregation: each sender's parts kept apart until the
    /// part is complete.
    robust: Option<Robust>,
}

/// Per-sender copies of the span for an aggregation that needs every
/// input at once (memory: one span per sender).
#[derive(Debug)]
struct Robust {
    agg: Aggregation,
    inputs: Vec<Vec<f32>>,
    weights: Vec<f32>,
    scratch: Vec<f32>,
    failed: usize,
}

/// The outcome of a completed part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartResult {
    /// The weighted mean is available through [`PartReducer::part`].
    Averaged,
    /// No weight reached this part (every contributing sender was banned or had
    /// weight 0): receivers keep their local values.
    Empty,
}

impl PartReducer {
    /// A reducer for `parts` (ranges relative to the start of the span, contiguous
    /// from 0) and `senders` senders.
    pub fn new(parts: Vec<Range<usize>>, senders: usize) -> Self {
        let len = parts.last().map_or(0, |p| p.end);
        Self::with_buffer(parts, senders, vec![0.0; len])
    }

    /// Like [`Self::new`], accumulating into `acc` (resized to the span and
    /// zeroed), so callers can reuse allocations across rounds.
    pub fn with_buffer(parts: Vec<Range<usize>>, senders: usize, mut acc: Vec<f32>) -> Self {
        let len = parts.last().map_or(0, |p| p.end);
        acc.truncate(len);
        acc.fill(0.0);
        acc.resize(len, 0.0);
        Self {
            acc,
            weight_sum: vec![0.0; parts.len()],
            delivered: vec![0; senders],
            banned: vec![false; senders],
            finalized: 0,
            overflowed: 0,
            robust: None,
            parts,
        }
    }

    /// Like [`Self::with_buffer`], combining each part with `agg`
    /// ([`Aggregation::WeightedMean`] streams as before; the robust rules
    /// keep one copy of the span per sender until each part completes).
    pub fn with_aggregation(
        parts: Vec<Range<usize>>,
        senders: usize,
        acc: Vec<f32>,
        agg: Aggregation,
    ) -> Self {
        let mut r = Self::with_buffer(parts, senders, acc);
        if agg.needs_all_inputs() {
            r.robust = Some(Robust {
                agg,
                inputs: vec![Vec::new(); senders],
                weights: vec![0.0; senders],
                scratch: Vec::new(),
                failed: 0,
            });
        }
        r
    }

    /// Parts a robust aggregation could not combine (too few inputs for its
    /// trim), returned empty.
    pub fn robust_failures(&self) -> usize {
        self.robust.as_ref().map_or(0, |r| r.failed)
    }

    /// Where `sender`'s values for part `part` go: its own copy under a
    /// robust aggregation (zero-filled on first use), else `None`.
    fn robust_slot(&mut self, sender: usize, part: usize, weight: f32) -> Option<&mut [f32]> {
        let len = self.acc.len();
        let range = self.parts[part].clone();
        let r = self.robust.as_mut()?;
        let buf = &mut r.inputs[sender];
        if buf.len() != len {
            buf.resize(len, 0.0);
        }
        r.weights[sender] = weight;
        Some(&mut buf[range])
    }

    /// Number of parts.
    pub fn num_parts(&self) -> usize {
        self.parts.len()
    }

    /// Number of values in part `p`.
    pub fn part_len(&self, p: usize) -> usize {
        self.parts.get(p).map_or(0, |r| r.len())
    }

    /// Whether `sender` has been banned.
    pub fn is_banned(&self, sender: usize) -> bool {
        self.banned.get(sender).copied().unwrap_or(true)
    }

    /// Parts delivered by `sender` so far.
    pub fn delivered(&self, sender: usize) -> usize {
        self.delivered.get(sender).copied().unwrap_or(0)
    }

    /// Validate a part before accumulating it: right index, right size.
    ///
    /// # Errors
    /// The [`PeerFault`] that gets the sender banned.
    pub fn check(&self, sender: usize, part: usize, len: usize) -> Result<(), PeerFault> {
        let expected = self.delivered(sender);
        if self.is_banned(sender) {
            return Err(PeerFault::ProtocolViolation {
                reason: "sender already banned",
            });
        }
        if part != expected || part >= self.parts.len() {
            return Err(PeerFault::UnexpectedPart {
                expected,
                got: part,
                count: self.parts.len(),
            });
        }
        if len != self.part_len(part) {
            return Err(PeerFault::WrongPartSize {
                part,
                expected: self.part_len(part),
                got: len,
            });
        }
        Ok(())
    }

    /// Add `weight · values` for `sender`'s next part, given as pieces that
    /// concatenate to the part (so local tensors need no gathering copy).
    ///
    /// # Errors
    /// As [`Self::accumulate`].
    pub fn accumulate_pieces<'a>(
        &mut self,
        sender: usize,
        part: usize,
        pieces: impl Iterator<Item = &'a [f32]> + Clone,
        weight: f32,
    ) -> Result<(), PeerFault> {
        if !pieces.clone().all(crate::compression::all_finite) {
            return Err(PeerFault::NonFinite { part });
        }
        self.accumulate_finite_pieces(sender, part, pieces, weight)
    }

    /// [`Self::accumulate_pieces`] for pieces the caller has already checked to
    /// be finite (a peer's own tensors, checked once at the start of a round).
    pub(crate) fn accumulate_finite_pieces<'a>(
        &mut self,
        sender: usize,
        part: usize,
        pieces: impl Iterator<Item = &'a [f32]> + Clone,
        weight: f32,
    ) -> Result<(), PeerFault> {
        let len: usize = pieces.clone().map(<[f32]>::len).sum();
        self.check(sender, part, len)?;
        if !weight.is_finite() || weight < 0.0 {
            return Err(PeerFault::NonFinite { part });
        }
        if let Some(slot) = self.robust_slot(sender, part, weight) {
            let mut at = 0;
            for piece in pieces {
                slot[at..at + piece.len()].copy_from_slice(piece);
                at += piece.len();
            }
            self.weight_sum[part] += f64::from(weight);
            self.delivered[sender] += 1;
            return Ok(());
        }
        let mut at = self.parts[part].start;
        for piece in pieces {
            let acc = &mut self.acc[at..at + piece.len()];
            // Lengths were checked above and the weight is finite: the only
            // conditions the kernel refuses.
            kernels::accumulate(acc, piece, weight).map_err(|_| PeerFault::NonFinite { part })?;
            at += piece.len();
        }
        self.weight_sum[part] += f64::from(weight);
        self.delivered[sender] += 1;
        Ok(())
    }

    /// Add `weight · values` for `sender`'s next part.
    ///
    /// # Errors
    /// As [`Self::check`], plus [`PeerFault::NonFinite`] for NaN/inf values or
    /// weight; the accumulator is untouched on error.
    pub fn accumulate(
        &mut self,
        sender: usize,
        part: usize,
        values: &[f32],
        weight: f32,
    ) -> Result<(), PeerFault> {
        if !crate::compression::all_finite(values) {
            return Err(PeerFault::NonFinite { part });
        }
        self.check(sender, part, values.len())?;
        if !weight.is_finite() || weight < 0.0 {
            return Err(PeerFault::NonFinite { part });
        }
        if let Some(slot) = self.robust_slot(sender, part, weight) {
            slot.copy_from_slice(values);
            self.weight_sum[part] += f64::from(weight);
            self.delivered[sender] += 1;
            return Ok(());
        }
        let range = self.parts[part].clone();
        kernels::accumulate(&mut self.acc[range], values, weight)
            .map_err(|_| PeerFault::NonFinite { part })?;
        self.weight_sum[part] += f64::from(weight);
        self.delivered[sender] += 1;
        Ok(())
    }

    /// Add `weight · decode(bytes)` for `sender`'s next part, straight from its
    /// wire encoding (fp16 is decoded and accumulated in one pass). `scratch`
    /// is grown for codecs that decode first.
    ///
    /// # Errors
    /// As [`Self::check`]; [`PeerFault::WrongPartSize`] if the bytes do not
    /// encode the part's length, [`PeerFault::NonFinite`] for NaN/inf values
    /// or weight. The accumulator is untouched on error.
    pub(crate) fn accumulate_encoded(
        &mut self,
        sender: usize,
        part: usize,
        bytes: &[u8],
        compression: crate::compression::Compression,
        weight: f32,
        scratch: &mut Vec<f32>,
    ) -> Result<(), PeerFault> {
        let len = self.part_len(part);
        if bytes.len() != compression.encoded_len(len) {
            // Report the size in values when the codec allows it.
            let got = (bytes.len() as f64 / compression.bytes_per_element()) as usize;
            self.check(sender, part, got)?;
            return Err(PeerFault::WrongPartSize {
                part,
                expected: len,
                got,
            });
        }
        self.check(sender, part, len)?;
        if !weight.is_finite() || weight < 0.0 {
            return Err(PeerFault::NonFinite { part });
        }
        if let Some(slot) = self.robust_slot(sender, part, weight) {
            let finite =
                compression
                    .decode_into_checked(bytes, slot)
                    .map_err(|_| PeerFault::Garbage {
                        reason: "undecodable part",
                    })?;
            if !finite {
                return Err(PeerFault::NonFinite { part });
            }
            self.weight_sum[part] += f64::from(weight);
            self.delivered[sender] += 1;
            return Ok(());
        }
        let range = self.parts[part].clone();
        let finite = compression
            .accumulate_checked(bytes, &mut self.acc[range], weight, scratch)
            .map_err(|_| PeerFault::Garbage {
                reason: "undecodable part",
            })?;
        if !finite {
            return Err(PeerFault::NonFinite { part });
        }
        self.weight_sum[part] += f64::from(weight);
        self.delivered[sender] += 1;
        Ok(())
    }

    /// Exclude `sender` from every part it has not delivered yet.
    pub fn ban(&mut self, sender: usize) {
        if let Some(b) = self.banned.get_mut(sender) {
            *b = true;
        }
    }

    /// Parts whose average overflowed to infinity and were returned empty.
    pub fn overflowed(&self) -> usize {
        self.overflowed
    }

    /// Number of parts completed and finalized so far.
    pub fn finalized(&self) -> usize {
        self.finalized
    }

    /// Finalize every part that is now complete; returns the new finalized count.
    pub fn advance(&mut self) -> usize {
        while self.finalized < self.parts.len() {
            let p = self.finalized;
            let ready = self
                .delivered
                .iter()
                .zip(&self.banned)
                .all(|(d, banned)| *banned || *d > p);
            if !ready {
                break;
            }
            if self.robust.is_some() {
                self.finalize_robust(p);
                self.finalized += 1;
                continue;
            }
            let w = self.weight_sum[p];
            if w > 0.0 {
                let inv = (1.0 / w) as f32;
                let values = &mut self.acc[self.parts[p].clone()];
                for a in values.iter_mut() {
                    *a *= inv;
                }
                // Every input was finite, but finite inputs can still sum
                // past f32::MAX (huge values, or weights near the cap): a
                // reducer checks its own averages and returns none rather
                // than infinities. Members keep their local values there.
                if !crate::compression::all_finite(values) {
                    tracing::warn!(
                        part = p,
                        "averaging: a part's average overflowed; returning it as empty"
                    );
                    self.weight_sum[p] = 0.0;
                    self.overflowed += 1;
                }
            }
            self.finalized += 1;
        }
        self.finalized
    }

    /// Combine part `p` from the senders that delivered it with the robust
    /// aggregation. Too few inputs for it (or an error) leave the part
    /// empty: members keep their local values there.
    fn finalize_robust(&mut self, p: usize) {
        let Some(r) = self.robust.as_mut() else {
            return;
        };
        let range = self.parts[p].clone();
        let mut inputs: Vec<&[f32]> = Vec::new();
        let mut weights: Vec<f32> = Vec::new();
        for (s, d) in self.delivered.iter().enumerate() {
            if *d > p && r.weights[s] > 0.0 {
                inputs.push(&r.inputs[s][range.clone()]);
                weights.push(r.weights[s]);
            }
        }
        let out = &mut self.acc[range];
        match aggregate(&r.agg, &inputs, &weights, out, &mut r.scratch) {
            Ok(true) => {}
            Ok(false) => self.weight_sum[p] = 0.0,
            Err(e) => {
                if r.failed == 0 {
                    tracing::warn!(part = p, error = %e, "averaging: robust aggregation could not combine a part; returning it empty");
                }
                r.failed += 1;
                self.weight_sum[p] = 0.0;
            }
        }
    }

    /// The result of finalized part `p` (`None` if not finalized yet).
    pub fn part(&self, p: usize) -> Option<(PartResult, &[f32])> {
        if p >= self.finalized {
            return None;
        }
        let values = &self.acc[self.parts[p].clone()];
        if self.weight_sum[p] > 0.0 {
            Some((PartResult::Averaged, values))
        } else {
            Some((PartResult::Empty, values))
        }
    }

    /// The accumulator (averages for finalized parts), consuming the reducer.
    pub fn into_values(self) -> Vec<f32> {
        self.acc
    }

    /// Whether every part is finalized.
    pub fn is_done(&self) -> bool {
        self.finalized == self.parts.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::partition::part_ranges;

    #[test]
    fn weighted_mean_across_senders() {
        let mut r = PartReducer::new(part_ranges(0..5, 2), 3);
        for (s, w) in [(0, 1.0), (1, 2.0), (2, 0.0)] {
            let base = s as f32;
            r.accumulate(s, 0, &[base, base], w).unwrap();
        }
        assert_eq!(r.advance(), 1);
        let (kind, v) = r.part(0).unwrap();
        assert_eq!(kind, PartResult::Averaged);
        assert_eq!(v, &[2.0 / 3.0, 2.0 / 3.0]);
        assert!(r.part(1).is_none());
    }

    #[test]
    fn banned_sender_keeps_delivered_parts_only() {
        let mut r = PartReducer::new(part_ranges(0..3, 1), 2);
        r.accumulate(0, 0, &[1.0], 1.0).unwrap();
        r.accumulate(1, 0, &[3.0], 1.0).unwrap();
        r.accumulate(0, 1, &[1.0], 1.0).unwrap();
        r.accumulate(0, 2, &[1.0], 1.0).unwrap();
        assert_eq!(r.advance(), 1);
        r.ban(1);
        assert_eq!(r.advance(), 3);
        assert_eq!(r.part(0).unwrap().1, &[2.0]);
        assert_eq!(r.part(1).unwrap().1, &[1.0]);
        assert!(r.is_done());
        assert!(r.accumulate(1, 1, &[5.0], 1.0).is_err());
    }

    #[test]
    fn bad_parts_are_rejected_without_touching_state() {
        let mut r = PartReducer::new(part_ranges(0..4, 2), 2);
        assert!(matches!(
            r.accumulate(0, 1, &[1.0, 1.0], 1.0),
            Err(PeerFault::UnexpectedPart { .. })
        ));
        assert!(matches!(
            r.accumulate(0, 0, &[1.0], 1.0),
            Err(PeerFault::WrongPartSize { .. })
        ));
        assert!(matches!(
            r.accumulate(0, 0, &[1.0, f32::NAN], 1.0),
            Err(PeerFault::NonFinite { part: 0 })
        ));
        r.accumulate(0, 0, &[1.0, 1.0], 1.0).unwrap();
        r.accumulate(0, 1, &[1.0, 1.0], 1.0).unwrap();
        assert!(matches!(
            r.accumulate(0, 2, &[1.0, 1.0], 1.0),
            Err(PeerFault::UnexpectedPart { .. })
        ));
        r.ban(1);
        assert_eq!(r.advance(), 2);
        assert_eq!(r.part(1).unwrap().1, &[1.0, 1.0]);
    }

    #[test]
    fn an_overflowing_average_is_returned_empty() {
        let mut r = PartReducer::new(part_ranges(0..2, 2), 2);
        // Finite inputs whose weighted sum passes f32::MAX.
        r.accumulate(0, 0, &[3e38, 1.0], 3.0).unwrap();
        r.accumulate(1, 0, &[3e38, 1.0], 3.0).unwrap();
        assert_eq!(r.advance(), 1);
        assert_eq!(r.part(0).unwrap().0, PartResult::Empty);
        assert_eq!(r.overflowed(), 1);
    }

    #[test]
    fn zero_total_weight_yields_empty_parts() {
        let mut r = PartReducer::new(part_ranges(0..2, 2), 1);
        r.accumulate(0, 0, &[4.0, 4.0], 0.0).unwrap();
        r.advance();
        assert_eq!(r.part(0).unwrap().0, PartResult::Empty);
    }
}
