//! The float types the native engine runs in (the model's dtype: f32 or f64).

use candle_core::Tensor;

pub use crate::scalar::Scalar;

use crate::error::{Error, Result};
use crate::params::{with_float_slice, FloatSlice};

/// Rows of model inputs or targets: a candle tensor, or a zero-copy view of a mapped file.
#[derive(Clone, Copy)]
pub(crate) enum Rows<'a> {
    Tensor(&'a Tensor),
    /// data, columns per row, rows
    View(crate::data::RowsRef<'a>, usize, usize),
}

impl Rows<'_> {
    /// (rows, columns per row); a rank-1 tensor has one column.
    pub fn dims(&self) -> (usize, usize) {
        match self {
            Rows::Tensor(t) => {
                let rows = t.dims().first().copied().unwrap_or(1);
                (rows, t.elem_count().checked_div(rows).unwrap_or(0))
            }
            Rows::View(_, cols, rows) => (*rows, *cols),
        }
    }

    /// Copies the rows into `dst` as `T`, failing on a non-finite entry.
    pub fn copy_into<T: Scalar>(
        &self,
        dst: &mut Vec<T>,
        what: &str,
        first_row: usize,
    ) -> Result<()> {
        match self {
            Rows::Tensor(t) => copy_rows(t, dst, what, first_row),
            Rows::View(r, cols, _) => {
                dst.clear();
                let bad = match r {
                    crate::data::RowsRef::F32(v) => {
                        dst.extend(v.iter().map(|x| T::of(*x as f64)));
                        first_non_finite(v, |x| x as f64)
                    }
                    crate::data::RowsRef::F64(v) => {
                        dst.extend(v.iter().map(|x| T::of(*x)));
                        first_non_finite(v, |x| x)
                    }
                    crate::data::RowsRef::I64(v) => {
                        dst.extend(v.iter().map(|x| T::of(*x as f64)));
                        None
                    }
                };
                if let Some((k, v)) = bad {
                    return Err(Error::NonFinite {
                        what: what.into(),
                        detail: format!(
                            "row {}, column {} is {v}",
                            first_row + k / (*cols).max(1),
                            k % (*cols).max(1)
                        ),
                    });
                }
                Ok(())
            }
        }
    }

    /// As a candle tensor (copying a view).
    pub fn tensor(&self) -> Result<Tensor> {
        match self {
            Rows::Tensor(t) => Ok((*t).clone()),
            Rows::View(r, cols, rows) => {
                let dev = candle_core::Device::Cpu;
                let shape = (*rows, *cols);
                Ok(match r {
                    crate::data::RowsRef::F32(v) => Tensor::from_slice(v, shape, &dev)?,
                    crate::data::RowsRef::F64(v) => Tensor::from_slice(v, shape, &dev)?,
                    crate::data::RowsRef::I64(v) => Tensor::from_slice(v, shape, &dev)?,
                })
            }
        }
    }
}

/// Copies a float tensor's elements (row-major) into `dst` as `T`, failing on a non-finite entry
/// (named by its row, counted from `first_row`, and column).
/// The slice itself when it holds `T`.
pub(crate) fn cast_slice<T: Scalar>(s: FloatSlice<'_>) -> Option<&[T]> {
    match s {
        FloatSlice::F32(v) => T::from_f32_slice(v),
        FloatSlice::F64(v) => T::from_f64_slice(v),
    }
}

pub(crate) fn copy_rows<T: Scalar>(
    t: &Tensor,
    dst: &mut Vec<T>,
    what: &str,
    first_row: usize,
) -> Result<()> {
    let cols = if t.rank() <= 1 {
        1
    } else {
        t.elem_count() / t.dims()[0].max(1)
    };
    dst.clear();
    dst.reserve(t.elem_count());
    // convert first (vectorised), then test finiteness with one multiply-add per element:
    // Σ x·0 is NaN exactly when some x is NaN or ±Inf.
    let bad = with_float_slice(t, |s| match s {
        FloatSlice::F32(v) => {
            dst.extend(v.iter().map(|x| T::of(*x as f64)));
            first_non_finite(v, |x| x as f64)
        }
        FloatSlice::F64(v) => {
            dst.extend(v.iter().map(|x| T::of(*x)));
            first_non_finite(v, |x| x)
        }
    })?;
    if let Some((k, v)) = bad {
        return Err(Error::NonFinite {
            what: what.into(),
            detail: format!(
                "row {}, column {} is {v}",
                first_row + k / cols.max(1),
                k % cols.max(1)
            ),
        });
    }
    Ok(())
}

/// The first non-finite entry, found cheaply: Σ x·0 over 8 independent lanes (so it vectorises)
/// is NaN exactly when some x is NaN or ±Inf; only then is the slice searched.
fn first_non_finite<F: Copy>(v: &[F], to: impl Fn(F) -> f64) -> Option<(usize, f64)> {
    if !nan_probe(v, &to).is_nan() {
        return None;
    }
    v.iter()
        .position(|x| !to(*x).is_finite())
        .map(|k| (k, to(v[k])))
}

fn nan_probe<F: Copy>(v: &[F], to: impl Fn(F) -> f64) -> f64 {
    let mut lanes = [0f64; 8];
    let chunks = v.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (l, x) in lanes.iter_mut().zip(c) {
            *l += to(*x) * 0.0;
        }
    }
    lanes.iter().sum::<f64>() + rest.iter().map(|x| to(*x) * 0.0).sum::<f64>()
}
