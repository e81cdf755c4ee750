//! The float types the native engine runs in (the model's dtype: f32 or f64).

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::params::{with_float_slice, FloatSlice};

/// f32 or f64: the model's own precision for forward and backward passes. Sums, solves and
/// quadratic forms are always f64.
pub trait Scalar: faer::traits::RealField + Copy + Send + Sync + Default + std::fmt::Debug + 'static {
    /// The matching candle dtype.
    const DTYPE: DType;
    /// From f64 (rounding for f32).
    fn of(v: f64) -> Self;
    /// To f64.
    fn f64(self) -> f64;
}

impl Scalar for f32 {
    const DTYPE: DType = DType::F32;
    #[inline]
    fn of(v: f64) -> Self {
        v as f32
    }
    #[inline]
    fn f64(self) -> f64 {
        self as f64
    }
}

impl Scalar for f64 {
    const DTYPE: DType = DType::F64;
    #[inline]
    fn of(v: f64) -> Self {
        v
    }
    #[inline]
    fn f64(self) -> f64 {
        self
    }
}

/// Copies a float tensor's elements (row-major) into `dst` as `T`, failing on a non-finite entry
/// (named by its row, counted from `first_row`, and column).
pub(crate) fn copy_rows<T: Scalar>(t: &Tensor, dst: &mut Vec<T>, what: &str, first_row: usize) -> Result<()> {
    let cols = if t.rank() <= 1 { 1 } else { t.elem_count() / t.dims()[0].max(1) };
    dst.clear();
    dst.reserve(t.elem_count());
    let bad = with_float_slice(t, |s| {
        let mut bad = None;
        match s {
            FloatSlice::F32(v) => {
                for (k, x) in v.iter().enumerate() {
                    if !x.is_finite() && bad.is_none() {
                        bad = Some((k, *x as f64));
                    }
                    dst.push(T::of(*x as f64));
                }
            }
            FloatSlice::F64(v) => {
                for (k, x) in v.iter().enumerate() {
                    if !x.is_finite() && bad.is_none() {
                        bad = Some((k, *x));
                    }
                    dst.push(T::of(*x));
                }
            }
        }
        bad
    })?;
    if let Some((k, v)) = bad {
        return Err(Error::NonFinite {
            what: what.into(),
            detail: format!("row {}, column {} is {v}", first_row + k / cols.max(1), k % cols.max(1)),
        });
    }
    Ok(())
}
