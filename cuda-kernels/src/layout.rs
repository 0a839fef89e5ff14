//! Where each named tensor of a model sits inside one flat buffer.

use std::{collections::HashSet, ops::Range};

use crate::{KernelError, Result};

/// Default alignment of tensors inside a packed layout, in elements: 16 `f32`
/// are one 64-byte cache line, so no two tensors share a line.
pub const DEFAULT_ALIGNMENT: usize = 16;

/// One named tensor inside a [`Layout`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    /// Tensor name (unique within the layout).
    pub name: String,
    /// Shape; the element count is the product (an empty shape is a scalar).
    pub shape: Vec<usize>,
    /// First element, counted from the start of the flat buffer.
    pub offset: usize,
}

impl TensorSpec {
    /// Creates a spec.
    pub fn new(name: impl Into<String>, shape: impl Into<Vec<usize>>, offset: usize) -> Self {
        Self {
            name: name.into(),
            shape: shape.into(),
            offset,
        }
    }
}

/// A validated tensor: its spec plus its element count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    spec: TensorSpec,
    len: usize,
}

impl TensorEntry {
    /// Tensor name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }
    /// Tensor shape.
    pub fn shape(&self) -> &[usize] {
        &self.spec.shape
    }
    /// First element in the flat buffer.
    pub fn offset(&self) -> usize {
        self.spec.offset
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }
    /// True for a tensor with no elements (a zero in its shape).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The tensor's element range in the flat buffer.
    pub fn range(&self) -> Range<usize> {
        self.spec.offset..self.spec.offset + self.len
    }
}

/// Names, shapes and offsets of many tensors packed into one flat buffer, so a
/// whole model is one allocation and one launch per op.
///
/// Invariants (checked by every constructor): names are unique, tensors do not
/// overlap, each starts at a multiple of `alignment`, and each ends within
/// `total_len`. Gaps (padding) are allowed; elementwise ops run over them too,
/// so keep them zero (buffers start zeroed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Sorted by offset.
    tensors: Vec<TensorEntry>,
    total_len: usize,
    alignment: usize,
}

impl Layout {
    /// Validates explicit offsets.
    ///
    /// # Errors
    /// [`KernelError::InvalidAlignment`], [`KernelError::ShapeOverflow`],
    /// [`KernelError::DuplicateTensor`], [`KernelError::MisalignedTensor`],
    /// [`KernelError::TensorOutOfBounds`] or [`KernelError::OverlappingTensors`].
    pub fn new(specs: Vec<TensorSpec>, total_len: usize, alignment: usize) -> Result<Self> {
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(KernelError::InvalidAlignment { alignment });
        }
        let mut names = HashSet::with_capacity(specs.len());
        let mut tensors = Vec::with_capacity(specs.len());
        for spec in specs {
            if !names.insert(spec.name.clone()) {
                return Err(KernelError::DuplicateTensor { name: spec.name });
            }
            let len = element_count(&spec.name, &spec.shape)?;
            if spec.offset % alignment != 0 {
                return Err(KernelError::MisalignedTensor {
                    name: spec.name,
                    offset: spec.offset,
                    alignment,
                });
            }
            match spec.offset.checked_add(len) {
                Some(end) if end <= total_len => {}
                end => {
                    return Err(KernelError::TensorOutOfBounds {
                        end: end.unwrap_or(usize::MAX),
                        name: spec.name,
                        total: total_len,
                    });
                }
            }
            tensors.push(TensorEntry { spec, len });
        }
        tensors.sort_by_key(|t| (t.offset(), t.len));
        // Empty tensors own no elements and cannot overlap anything; compare
        // each non-empty tensor with the previous non-empty one.
        let mut prev: Option<&TensorEntry> = None;
        for b in tensors.iter().filter(|t| !t.is_empty()) {
            if let Some(a) = prev
                && b.offset() < a.range().end
            {
                return Err(KernelError::OverlappingTensors {
                    first: a.name().to_owned(),
                    second: b.name().to_owned(),
                });
            }
            prev = Some(b);
        }
        Ok(Self {
            tensors,
            total_len,
            alignment,
        })
    }

    /// Packs tensors in the given order, each starting at the next multiple of
    /// `alignment` elements.
    ///
    /// # Errors
    /// As [`Layout::new`]; also [`KernelError::ShapeOverflow`] if the total overflows.
    pub fn packed<N, S>(tensors: impl IntoIterator<Item = (N, S)>, alignment: usize) -> Result<Self>
    where
        N: Into<String>,
        S: Into<Vec<usize>>,
    {
        if alignment == 0 || !alignment.is_power_of_two() {
            return Err(KernelError::InvalidAlignment { alignment });
        }
        let mut specs = Vec::new();
        let mut next = 0usize;
        for (name, shape) in tensors {
            let name = name.into();
            let shape = shape.into();
            let len = element_count(&name, &shape)?;
            let end = next.checked_add(len);
            let overflow = || KernelError::ShapeOverflow {
                name: name.clone(),
                shape: shape.clone(),
            };
            let end = end.ok_or_else(overflow)?;
            let aligned = end
                .checked_next_multiple_of(alignment)
                .ok_or_else(overflow)?;
            specs.push(TensorSpec {
                name,
                shape,
                offset: next,
            });
            next = aligned;
        }
        Self::new(specs, next, alignment)
    }

    /// Tensors, sorted by offset.
    pub fn tensors(&self) -> &[TensorEntry] {
        &self.tensors
    }
    /// Number of tensors.
    pub fn num_tensors(&self) -> usize {
        self.tensors.len()
    }
    /// Length of the flat buffer this layout describes, in elements.
    pub fn total_len(&self) -> usize {
        self.total_len
    }
    /// Alignment of every tensor's offset, in elements.
    pub fn alignment(&self) -> usize {
        self.alignment
    }
    /// Looks a tensor up by name.
    pub fn get(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.iter().find(|t| t.name() == name)
    }
    /// Number of elements that belong to some tensor (excludes padding).
    pub fn num_params(&self) -> usize {
        self.tensors.iter().map(TensorEntry::len).sum()
    }
}

fn element_count(name: &str, shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| KernelError::ShapeOverflow {
            name: name.to_owned(),
            shape: shape.to_vec(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_aligns_offsets() {
        let l = Layout::packed(
            [
                ("a", vec![3, 5]),
                ("b", vec![]),
                ("c", vec![0]),
                ("d", vec![17]),
            ],
            16,
        )
        .unwrap();
        let offs: Vec<_> = l
            .tensors()
            .iter()
            .map(|t| (t.name().to_owned(), t.offset()))
            .collect();
        assert_eq!(offs[0], ("a".into(), 0));
        assert_eq!(l.get("b").unwrap().offset(), 16);
        assert_eq!(l.get("b").unwrap().len(), 1);
        assert_eq!(l.get("d").unwrap().offset(), 32);
        assert_eq!(l.total_len(), 64);
        assert_eq!(l.num_params(), 15 + 1 + 17);
    }

    #[test]
    fn rejects_bad_layouts() {
        let overlap = Layout::new(
            vec![TensorSpec::new("a", [10], 0), TensorSpec::new("b", [4], 8)],
            32,
            8,
        );
        assert!(
            matches!(overlap, Err(KernelError::OverlappingTensors { .. })),
            "{overlap:?}"
        );
        // An empty tensor between two overlapping ones must not hide the overlap.
        let hidden = Layout::new(
            vec![
                TensorSpec::new("a", [10], 0),
                TensorSpec::new("e", [0], 4),
                TensorSpec::new("c", [4], 8),
            ],
            32,
            4,
        );
        assert!(
            matches!(hidden, Err(KernelError::OverlappingTensors { .. })),
            "{hidden:?}"
        );
        let mis = Layout::new(vec![TensorSpec::new("a", [10], 3)], 32, 4);
        assert!(matches!(
            mis,
            Err(KernelError::MisalignedTensor { offset: 3, .. })
        ));
        let oob = Layout::new(vec![TensorSpec::new("a", [10], 24)], 32, 8);
        assert!(matches!(
            oob,
            Err(KernelError::TensorOutOfBounds {
                end: 34,
                total: 32,
                ..
            })
        ));
        let dup = Layout::new(
            vec![TensorSpec::new("a", [1], 0), TensorSpec::new("a", [1], 8)],
            16,
            8,
        );
        assert!(matches!(dup, Err(KernelError::DuplicateTensor { .. })));
        let align = Layout::new(vec![], 16, 3);
        assert!(matches!(
            align,
            Err(KernelError::InvalidAlignment { alignment: 3 })
        ));
        let big = Layout::packed([("a", vec![usize::MAX, 2])], 1);
        assert!(matches!(big, Err(KernelError::ShapeOverflow { .. })));
        let huge_offset = Layout::new(vec![TensorSpec::new("a", [2], usize::MAX - 1)], 16, 1);
        assert!(matches!(
            huge_offset,
            Err(KernelError::TensorOutOfBounds { .. })
        ));
    }
}
