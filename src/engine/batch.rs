//! What every native engine shares: the options ([`FactoredOptions`]), the worker pool, one
//! batch of a dataset (`Batch`, its rows as a tensor or a mapped view: `Rows`), the objective
//! a pass differentiates (`Target`: a likelihood or a QoI), and the checked copy of input rows
//! into the engine's precision. A leaf of `engine`: it imports no engine.

use candle_core::Tensor;

use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::likelihood::Likelihood;
use crate::params::{with_float_slice, FloatSlice};
use crate::qoi::Qoi;
use crate::scalar::{first_non_finite, Scalar};

/// The default memory budget for dense work (a P×P matrix, a block of gradients held in
/// memory): 4 GiB.
pub const DEFAULT_MEMORY_BUDGET: u64 = 4 << 30;

/// Options of the native engines (MLP, graph, transformer): batch size and worker threads.
#[derive(Debug, Clone)]
pub struct FactoredOptions {
    /// Examples per forward/backward batch. Default 256. Results do not depend on it.
    pub batch_size: usize,
    /// Worker threads (batches run in parallel); 0 means one per available core.
    pub threads: usize,
}

impl Default for FactoredOptions {
    fn default() -> Self {
        Self {
            batch_size: 256,
            threads: 0,
        }
    }
}

impl FactoredOptions {
    fn validate(&self) -> Result<()> {
        if self.batch_size == 0 {
            return Err(Error::invalid("batch_size", 0, "must be at least 1"));
        }
        Ok(())
    }
}

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

/// Σ over `data` of each batch's contribution to a length-`p` f64 accumulator (the native
/// engines' diagonal passes): the batches of `opts.batch_size` split into one contiguous run per
/// worker, each run with its own state from `init` and its own accumulator, the runs' sums
/// added. `step(state, acc, start, len, x, y)` gets each batch's rows; the batch is released
/// after it.
pub(crate) fn sum_over_batches<S>(
    opts: &FactoredOptions,
    data: &dyn Dataset,
    p: usize,
    init: impl Fn() -> S + Sync,
    step: impl Fn(&mut S, &mut [f64], usize, usize, Rows<'_>, Rows<'_>) -> Result<()> + Sync,
) -> Result<Vec<f64>> {
    use rayon::prelude::*;
    let n = data.len();
    let bs = opts.batch_size.max(1);
    let starts: Vec<usize> = (0..n).step_by(bs).collect();
    let per = starts.len().div_ceil(rayon_threads(opts).max(1)).max(1);
    let runs: Vec<&[usize]> = starts.chunks(per).collect();
    run_in_pool(opts, || {
        runs.par_iter()
            .map(|run| {
                let mut state = init();
                let mut acc = vec![0.0; p];
                for &start in run.iter() {
                    let len = bs.min(n - start);
                    let batch = Batch::load(data, start, len)?;
                    let (x, y) = batch.rows();
                    step(&mut state, &mut acc, start, len, x, y)?;
                    drop(batch);
                    data.release(start, len);
                }
                Ok::<_, Error>(acc)
            })
            .try_reduce(
                || vec![0.0; p],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                    Ok(a)
                },
            )
    })?
}

/// Runs `f` on a fresh pool of `opts.threads` workers after checking the options (the native
/// engines' one entry to parallel work).
pub(crate) fn run_in_pool<R: Send>(
    opts: &FactoredOptions,
    f: impl FnOnce() -> R + Send,
) -> Result<R> {
    opts.validate()?;
    crate::engine::pool::in_pool(opts.threads, f)
}

pub(crate) fn rayon_threads(opts: &FactoredOptions) -> usize {
    crate::engine::pool::resolve_threads(opts.threads)
}

/// Queries as (M, elements per example), checked against one example's `input_shape` (`model`
/// names the model in the error).
pub(crate) fn query_rows(queries: &Tensor, input_shape: &[usize], model: &str) -> Result<Tensor> {
    let m = *queries
        .dims()
        .first()
        .ok_or_else(|| Error::shape("queries (one per row)", "rank >= 1", "a scalar"))?;
    let per: usize = input_shape.iter().product();
    let rest = queries.dims().get(1..).unwrap_or(&[]);
    if queries.rank() < 2 || (rest != input_shape && rest != [per]) {
        return Err(Error::shape(
            format!("queries for {model} (one example per row)"),
            format!("(M, {input_shape:?}) or (M, {per})"),
            format!("{:?}", queries.dims()),
        ));
    }
    Ok(queries.reshape((m, per))?)
}

/// One batch: owned candle tensors, or a zero-copy view of a mapped dataset.
pub(crate) enum Batch<'a> {
    Owned(Tensor, Tensor),
    Inputs(Tensor),
    View(crate::data::BatchView<'a>),
}

impl<'a> Batch<'a> {
    pub(crate) fn load(data: &'a dyn Dataset, start: usize, len: usize) -> Result<Self> {
        match data.view(start, len) {
            Some(v) => Ok(Batch::View(v?)),
            None => {
                let (x, y) = data.get(start, len)?;
                Ok(Batch::Owned(x, y))
            }
        }
    }

    /// (inputs, targets); a query batch has no targets (its inputs stand in, unused).
    pub(crate) fn rows(&self) -> (Rows<'_>, Rows<'_>) {
        match self {
            Batch::Owned(x, y) => (Rows::Tensor(x), Rows::Tensor(y)),
            Batch::Inputs(x) => (Rows::Tensor(x), Rows::Tensor(x)),
            Batch::View(v) => (
                Rows::View(v.x, v.x_cols, v.rows),
                Rows::View(v.y, v.y_cols, v.rows),
            ),
        }
    }
}

pub(crate) enum Target<'a> {
    Likelihood(&'a Likelihood, Rows<'a>),
    Qoi(&'a Qoi),
}

impl Target<'_> {
    /// The objective's values (QoI only) and its signal ∂uᵢ/∂fᵢ (B×o, f64) at the model output
    /// `out` (B×o, the engine's precision); the targets must have one row per output row.
    pub(crate) fn signal<T: Scalar>(
        &self,
        out: &[T],
        b: usize,
        o: usize,
        first_row: usize,
    ) -> Result<(Vec<f64>, Vec<f64>)> {
        let f: Vec<f64> = out.iter().map(|v| v.f64()).collect();
        match self {
            Target::Likelihood(lik, y) => {
                if y.dims().0 != b {
                    return Err(Error::shape(
                        "targets y (one row per input row)",
                        b,
                        y.dims().0,
                    ));
                }
                Ok((Vec::new(), lik.signal(&f, b, o, *y, first_row)?))
            }
            Target::Qoi(q) => q.signal(&f, b, o, first_row),
        }
    }
}
