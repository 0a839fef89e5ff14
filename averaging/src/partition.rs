//! Splitting the flattened tensors into reducer spans and wire parts.

use std::ops::Range;

use crate::error::{AveragingError, Result};

/// The concatenation of several flat buffers viewed as one vector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorLayout {
    lengths: Vec<usize>,
    offsets: Vec<usize>,
    total: usize,
}

impl TensorLayout {
    /// Layout of buffers with the given lengths, in order.
    pub fn new(lengths: &[usize]) -> Self {
        let mut offsets = Vec::with_capacity(lengths.len());
        let mut total = 0;
        for len in lengths {
            offsets.push(total);
            total += len;
        }
        Self {
            lengths: lengths.to_vec(),
            offsets,
            total,
        }
    }

    /// Total number of elements.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Lengths of the buffers.
    pub fn lengths(&self) -> &[usize] {
        &self.lengths
    }

    /// Check that `buffers` match this layout.
    ///
    /// # Errors
    /// [`AveragingError::LayoutMismatch`] when counts or lengths differ.
    pub fn check<T: AsRef<[f32]>>(&self, buffers: &[T]) -> Result<()> {
        let got: usize = buffers.iter().map(|b| b.as_ref().len()).sum();
        if buffers.len() != self.lengths.len()
            || buffers
                .iter()
                .zip(&self.lengths)
                .any(|(b, l)| b.as_ref().len() != *l)
        {
            return Err(AveragingError::LayoutMismatch {
                expected: self.total,
                got,
            });
        }
        Ok(())
    }

    /// The pieces `(buffer index, range in buffer, range in the flat vector)` that
    /// cover `flat` (which must lie within `0..total`).
    pub fn pieces(
        &self,
        flat: Range<usize>,
    ) -> impl Iterator<Item = (usize, Range<usize>, Range<usize>)> + Clone + '_ {
        self.offsets
            .iter()
            .zip(&self.lengths)
            .enumerate()
            .filter_map(move |(i, (&off, &len))| {
                let start = flat.start.max(off);
                let end = flat.end.min(off + len);
                (start < end).then(|| (i, start - off..end - off, start..end))
            })
    }

    /// Copy the flat range `flat` of `buffers` into `out` (`out.len() == flat.len()`).
    pub fn gather<T: AsRef<[f32]>>(&self, buffers: &[T], flat: Range<usize>, out: &mut [f32]) {
        let base = flat.start;
        for (i, local, global) in self.pieces(flat) {
            out[global.start - base..global.end - base]
                .copy_from_slice(&buffers[i].as_ref()[local]);
        }
    }

    /// Apply `f(dst, src)` over the flat range `flat` of `buffers`, with `src` the
    /// matching slice of `values`.
    pub fn zip_mut<T: AsMut<[f32]>>(
        &self,
        buffers: &mut [T],
        flat: Range<usize>,
        values: &[f32],
        mut f: impl FnMut(&mut [f32], &[f32]),
    ) {
        let base = flat.start;
        for (i, local, global) in self.pieces(flat) {
            f(
                &mut buffers[i].as_mut()[local],
                &values[global.start - base..global.end - base],
            );
        }
    }
}

/// Contiguous spans `[start, end)` of the flat vector from per-peer sizes.
pub fn spans_from_sizes(sizes: &[usize]) -> Vec<Range<usize>> {
    let mut start = 0;
    sizes
        .iter()
        .map(|s| {
            let r = start..start + s;
            start += s;
            r
        })
        .collect()
}

/// The parts of `span`, each at most `part_len` elements, in order.
pub fn part_ranges(span: Range<usize>, part_len: usize) -> Vec<Range<usize>> {
    let part_len = part_len.max(1);
    let mut out = Vec::with_capacity(span.len().div_ceil(part_len));
    let mut start = span.start;
    while start < span.end {
        let end = (start + part_len).min(span.end);
        out.push(start..end);
        start = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_and_parts_cover_exactly() {
        let spans = spans_from_sizes(&[3, 0, 7]);
        assert_eq!(spans, vec![0..3, 3..3, 3..10]);
        assert_eq!(part_ranges(3..10, 3), vec![3..6, 6..9, 9..10]);
        assert!(part_ranges(3..3, 3).is_empty());
    }

    #[test]
    fn gather_and_scatter_cross_buffer_boundaries() {
        let layout = TensorLayout::new(&[2, 3, 1]);
        let mut bufs = vec![vec![0.0f32, 1.0], vec![2.0, 3.0, 4.0], vec![5.0]];
        let mut out = vec![0.0; 4];
        layout.gather(&bufs, 1..5, &mut out);
        assert_eq!(out, vec![1.0, 2.0, 3.0, 4.0]);
        layout.zip_mut(&mut bufs, 1..6, &[10.0, 20.0, 30.0, 40.0, 50.0], |d, s| {
            for (d, s) in d.iter_mut().zip(s) {
                *d += s;
            }
        });
        assert_eq!(
            bufs,
            vec![vec![0.0, 11.0], vec![22.0, 33.0, 44.0], vec![55.0]]
        );
        assert!(layout.check(&bufs).is_ok());
        assert!(layout.check(&[vec![0.0f32; 6]]).is_err());
    }
}
