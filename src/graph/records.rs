//! What the per-example rules ([`super::per_example`]) keep of a batch: the records of the
//! parameters held factored (input rows and output signals, token ids) and the layouts that view
//! an example's rows inside the pass's buffers. A leaf of `graph` beside the IR and operators.

use faer::MatRef;

use crate::error::{Error, Result};
use crate::scalar::Scalar;

/// Where a record's numbers live.
#[derive(Debug, Clone)]
pub enum Src<T> {
    /// A value of the pass.
    Value(usize),
    /// The cotangent of a value.
    Cot(usize),
    /// A convolution's saved patches (node index).
    Patches(usize),
    /// A copy, example-major.
    Owned(Vec<T>),
}

/// Example e's rows: element (t, c) at `base + e·ex + t·rs + c·cs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Offset of example 0.
    pub base: usize,
    /// Stride between examples.
    pub ex: usize,
    /// Rows per example.
    pub rows: usize,
    /// Row stride.
    pub rs: usize,
    /// Columns.
    pub cols: usize,
    /// Column stride.
    pub cs: usize,
}

/// Rows of every example of a batch.
#[derive(Debug, Clone)]
pub struct RowsData<T> {
    /// The buffer.
    pub src: Src<T>,
    /// Its layout.
    pub layout: Layout,
}

/// Example `e`'s rows of `buf` under `l` as a matrix.
pub fn view<'a, T: Scalar>(buf: &'a [T], l: &Layout, e: usize) -> Result<MatRef<'a, T>> {
    if l.rows == 0 || l.cols == 0 {
        return Ok(MatRef::from_row_major_slice(&buf[..0], l.rows, l.cols));
    }
    let start = l.base + e * l.ex;
    let end = start + (l.rows - 1) * l.rs + (l.cols - 1) * l.cs + 1;
    let s = buf.get(start..end).ok_or_else(|| {
        Error::Unsupported(format!(
            "per-example rows of example {e} lie outside their buffer ({end} > {})",
            buf.len()
        ))
    })?;
    Ok(if l.cs == 1 {
        MatRef::from_row_major_slice_with_stride(s, l.rows, l.cols, l.rs.max(l.cols))
    } else {
        MatRef::from_column_major_slice_with_stride(s, l.rows, l.cols, l.cs.max(l.rows))
    })
}

/// A factored per-example gradient recorded at one use of a parameter.
#[derive(Debug, Clone)]
pub enum Record<T> {
    /// Rows of group `group`: example e's gradient is D_eᵀ X̃_e.
    Rows {
        /// The group.
        group: usize,
        /// Row offset of this use among the group's rows.
        row: usize,
        /// Rollout step.
        step: usize,
        /// Inputs (T × k).
        x: RowsData<T>,
        /// Signals (T × out).
        d: RowsData<T>,
    },
    /// Ids and signal rows of an embedding group.
    Tokens {
        /// The group.
        group: usize,
        /// Row offset of this use.
        row: usize,
        /// Rollout step.
        step: usize,
        /// Ids, example-major (B × T).
        ids: Vec<usize>,
        /// Signals (T × out per example).
        d: RowsData<T>,
    },
}

/// What a rule produced.
pub enum Out<T> {
    /// Nothing (a covered bias).
    None,
    /// B × |u| per-example cotangents of the input.
    Pe(Vec<T>),
    /// Factored records (one per group of a grouped convolution).
    Records(Vec<Record<T>>),
}
