//! The generic per-example path: works for ANY candle closure.
//!
//! Each example's gradient comes from its own forward and backward pass (candle has no `vmap`),
//! run on a dedicated rayon pool. Measured here (2 cores, see ARCHITECTURE.md): running the
//! examples on our own pool while candle's inner matmul threading is set to 1 is the fastest
//! arrangement, because candle parallelises even one-row products.
//!
//! Memory: diag F holds one P-vector accumulator and one P-vector gradient buffer per worker,
//! O(threads·P); dense F holds the P×P matrix plus one chunk of `batch_size` gradients,
//! O(P² + batch_size·P). The N×P matrix is never formed.

use candle_core::backprop::GradStore;
use candle_core::Tensor;
use faer::linalg::matmul::triangular::{matmul as tri_matmul, BlockStructure};
use faer::{Accum, Mat, Par};
use rayon::prelude::*;

use std::sync::Arc;

use crate::data::Dataset;
use crate::engine::gradients::{DenseGradients, GradientMatrix, StreamedGradients};
use crate::error::{Error, Result};
use crate::fisher::{dense_fisher_bytes, FisherDense, FisherDiag, FisherSource};
use crate::params::Params;

/// Options of the generic path.
///
/// Speed note: candle 0.11 decides the threading of every CPU matmul by reading the
/// `RAYON_NUM_THREADS` environment variable, and when it is unset it parses `/proc/cpuinfo` on
/// every call. This path runs many tiny per-example products, so it is about 1.4× faster when
/// the process starts with `RAYON_NUM_THREADS=1` set (in the shell, or at the top of `main`
/// before any thread starts; it also sizes rayon's global pool, which this crate does not use).
/// The library itself never reads or changes the environment: there is no scoped way to
/// change candle's matmul threading, and changing the environment while other threads run
/// races with them.
#[derive(Debug, Clone)]
pub struct GenericOptions {
    /// Examples loaded from the dataset at a time (the seed's `vmap_batch_size`). Results do not
    /// depend on it. Default 64.
    pub batch_size: usize,
    /// Worker threads; 0 means one per available core. Default 0.
    pub threads: usize,
}

impl Default for GenericOptions {
    fn default() -> Self {
        Self {
            batch_size: 64,
            threads: 0,
        }
    }
}

impl GenericOptions {
    pub(crate) fn validate(&self) -> Result<()> {
        if self.batch_size == 0 {
            return Err(Error::invalid("batch_size", 0, "must be at least 1"));
        }
        Ok(())
    }
}

fn non_finite_grad(example: usize, entry: usize, value: f64) -> Error {
    Error::NonFinite {
        what: "per-example gradient".into(),
        detail: format!("training example {example}, parameter entry {entry} is {value}"),
    }
}

/// Maps `f` over 0..n in parallel on the options' pool, keeping order.
pub(crate) fn map_examples<T: Send>(
    n: usize,
    opts: &GenericOptions,
    f: impl Fn(usize) -> Result<T> + Sync,
) -> Result<Vec<T>> {
    opts.validate()?;
    super::pool::map_indices(n, opts.threads, f)
}

/// The empirical Fisher of a user log-likelihood closure over a dataset, by the generic path.
///
/// The closure `log_lik(x, y)` runs the model on a batch (B, …) and returns the per-example
/// log-likelihoods, shape (B,). It is called with B = 1.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use deltavar::{FisherSource, GenericFisher, GenericOptions, Params, TensorDataset};
/// // one parameter w, model f(x) = w x, gaussian log-likelihood -(y - w x)^2 / 2
/// let w = Var::from_tensor(&Tensor::new(&[2.0f64], &Device::Cpu).unwrap()).unwrap();
/// let params = Params::from_vars(vec![("w".into(), w.clone())]).unwrap();
/// let x = Tensor::new(&[[1.0f64], [2.0]], &Device::Cpu).unwrap();
/// let y = Tensor::new(&[[3.0f64], [3.0]], &Device::Cpu).unwrap();
/// let data = TensorDataset::new(x, y).unwrap();
/// let ll = |x: &Tensor, y: &Tensor| {
///     let r = (y - x.broadcast_mul(w.as_tensor())?)?;
///     (r.sqr()? * -0.5)?.sum(1)
/// };
/// let fisher = GenericFisher::new(&params, ll, &data, GenericOptions::default());
/// // g_i = (y - w x) x: 1 and -2, so F = (1 + 4) / 2
/// assert_eq!(fisher.fisher_diag().unwrap().mean(), vec![2.5]);
/// ```
pub struct GenericFisher<'a, L> {
    params: &'a Params,
    log_lik: L,
    data: &'a dyn Dataset,
    opts: GenericOptions,
}

impl<'a, L> GenericFisher<'a, L>
where
    L: Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor> + Sync,
{
    /// The generic Fisher of `log_lik` over `data` with respect to `params`.
    pub fn new(
        params: &'a Params,
        log_lik: L,
        data: &'a dyn Dataset,
        opts: GenericOptions,
    ) -> Self {
        Self {
            params,
            log_lik,
            data,
            opts,
        }
    }

    /// Backward pass of example `i` (local index `i` of the chunk `x`, `y`).
    fn example_backward(
        &self,
        x: &Tensor,
        y: &Tensor,
        i: usize,
        global: usize,
    ) -> Result<GradStore> {
        let xi = x.narrow(0, i, 1)?;
        let yi = y.narrow(0, i, 1)?;
        let ll = (self.log_lik)(&xi, &yi)?;
        if ll.elem_count() != 1 {
            return Err(Error::NotScalar {
                what: "log-likelihood closure (it must return shape (B,), one value per example)"
                    .into(),
                shape: format!("{:?} for a batch of 1", ll.dims()),
            });
        }
        let v = ll
            .flatten_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_vec1::<f64>()?[0];
        if !v.is_finite() {
            return Err(Error::NonFinite {
                what: "log-likelihood".into(),
                detail: format!("training example {global} has log-likelihood {v}"),
            });
        }
        Ok(ll.sum_all()?.backward()?)
    }

    /// Gradient of example `i` (local index `i` of the chunk `x`, `y`) into `out`.
    fn example_grad(
        &self,
        x: &Tensor,
        y: &Tensor,
        i: usize,
        global: usize,
        out: &mut [f64],
    ) -> Result<()> {
        let grads = self.example_backward(x, y, i, global)?;
        self.params.flatten_grads_into(&grads, out)?;
        if let Some(k) = out.iter().position(|g| !g.is_finite()) {
            return Err(non_finite_grad(global, k, out[k]));
        }
        Ok(())
    }

    /// The per-example gradients of examples `start .. start+len` as a P×len matrix (one
    /// column per example). O(P·len) memory: for tests and small problems.
    pub fn per_example_gradients(&self, start: usize, len: usize) -> Result<Mat<f64>> {
        self.opts.validate()?;
        let p = self.params.num_params();
        let (x, y) = self.data.get(start, len)?;
        let cols = map_examples(len, &self.opts, |i| {
            let mut g = vec![0.0; p];
            self.example_grad(&x, &y, i, start + i, &mut g)?;
            Ok(g)
        })?;
        Ok(Mat::from_fn(p, len, |i, j| cols[j][i]))
    }
}

impl<L> FisherSource for GenericFisher<'_, L>
where
    L: Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor> + Sync,
{
    fn num_params(&self) -> usize {
        self.params.num_params()
    }

    fn num_examples(&self) -> usize {
        self.data.len()
    }

    fn fisher_diag(&self) -> Result<FisherDiag> {
        self.opts.validate()?;
        let p = self.params.num_params();
        let n = self.data.len();
        let bs = self.opts.batch_size;
        let mut total = vec![0.0f64; p];
        super::pool::in_pool(self.opts.threads, || -> Result<()> {
            for start in (0..n).step_by(bs) {
                let len = bs.min(n - start);
                let (x, y) = self.data.get(start, len)?;
                let part = (0..len)
                    .into_par_iter()
                    .try_fold(
                        || vec![0.0f64; p],
                        |mut acc, i| {
                            let grads = self.example_backward(&x, &y, i, start + i)?;
                            if let Some(k) = self.params.accumulate_sq_grads(&grads, &mut acc)? {
                                return Err(non_finite_grad(start + i, k, f64::NAN));
                            }
                            Ok::<_, Error>(acc)
                        },
                    )
                    .try_reduce(
                        || vec![0.0f64; p],
                        |mut a, b| {
                            for (x, y) in a.iter_mut().zip(&b) {
                                *x += y;
                            }
                            Ok(a)
                        },
                    )?;
                for (t, v) in total.iter_mut().zip(&part) {
                    *t += v;
                }
            }
            Ok(())
        })??;
        FisherDiag::from_sums(total, n)
    }

    fn fisher_dense(&self, memory_budget: u64) -> Result<FisherDense> {
        self.opts.validate()?;
        let p = self.params.num_params();
        let n = self.data.len();
        let bs = self.opts.batch_size;
        let needed = dense_fisher_bytes(p) + 2 * (bs.min(n.max(1)) * p * 8) as u64;
        if needed > memory_budget {
            return Err(Error::MemoryBudget {
                what: format!("the dense {p}×{p} empirical Fisher"),
                needed,
                budget: memory_budget,
                hint: "use the diagonal Fisher, raise the memory budget, or (for the full inverse) a matrix-free method".into(),
            });
        }
        let mut sum = Mat::<f64>::zeros(p, p);
        let mut gt = Mat::<f64>::zeros(p, bs.min(n.max(1)));
        super::pool::in_pool(self.opts.threads, || -> Result<()> {
            for start in (0..n).step_by(bs) {
                let len = bs.min(n - start);
                let (x, y) = self.data.get(start, len)?;
                let cols: Vec<Vec<f64>> = (0..len)
                    .into_par_iter()
                    .map(|i| {
                        let mut g = vec![0.0; p];
                        self.example_grad(&x, &y, i, start + i, &mut g)?;
                        Ok(g)
                    })
                    .collect::<Result<_>>()?;
                for (j, c) in cols.iter().enumerate() {
                    gt.col_mut(j).copy_from(faer::ColRef::from_slice(c));
                }
                let g = gt.as_ref().subcols(0, len);
                tri_matmul(
                    sum.as_mut(),
                    BlockStructure::TriangularLower,
                    Accum::Add,
                    g,
                    BlockStructure::Rectangular,
                    g.transpose(),
                    BlockStructure::Rectangular,
                    1.0,
                    Par::rayon(0),
                );
            }
            Ok(())
        })??;
        FisherDense::from_lower_sum(sum, n)
    }

    fn gradient_operator_bytes(&self, memory_budget: u64) -> u64 {
        let full = (self.data.len() * self.params.num_params() * 8) as u64;
        if full <= memory_budget / 2 {
            full
        } else {
            (self.opts.batch_size * self.params.num_params() * 8) as u64
        }
    }

    /// G in memory (P×N f64) when it takes at most half the budget; otherwise recomputed in
    /// chunks of `batch_size` examples on every product.
    fn gradient_matrix(&self, memory_budget: u64) -> Result<Arc<dyn GradientMatrix + '_>> {
        let n = self.data.len();
        let full = (n * self.params.num_params() * 8) as u64;
        if full <= memory_budget / 2 {
            return Ok(Arc::new(DenseGradients::new(
                self.per_example_gradients(0, n)?,
            )));
        }
        Ok(Arc::new(StreamedGradients::new(self, self.opts.batch_size)))
    }
}
