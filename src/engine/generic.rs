//! The generic per-example path: works for ANY candle closure.
//!
//! Each example's gradient comes from its own forward and backward pass (candle has no `vmap`),
//! run on a dedicated rayon pool. [`GenericGradients`] gives the per-example log-likelihood
//! gradients of a dataset (their squared sums, their outer-product sum, or a chunk of them);
//! [`qoi_gradient`] / [`qoi_gradients`] the gradients of a quantity of interest.
//!
//! Memory: the squared sums hold one P-vector accumulator per worker, O(threads·P); the
//! outer-product sum holds the P×P matrix plus one chunk of `batch_size` gradients,
//! O(P² + batch_size·P). The N×P matrix is never formed.

use candle_core::backprop::GradStore;
use candle_core::Tensor;
use faer::Mat;
use rayon::prelude::*;

use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::params::Params;

/// Options of the generic path.
///
/// Speed note: candle 0.11 decides the threading of every CPU matmul by reading the
/// `RAYON_NUM_THREADS` environment variable, and when it is unset it parses `/proc/cpuinfo` on
/// every call. This path runs many tiny per-example products, so it is about 4.6× faster when
/// the process runs with `RAYON_NUM_THREADS=1` (W-diag: 2.7 s instead of 12.7 s on this
/// project's machine). Library calls never read or change the environment (no scoped way to
/// change candle's matmul threading exists, and changing the environment while other threads
/// run races with them): set it in the shell, or call [`candle_single_threaded_matmuls`] at the
/// top of `main`, before any other thread starts.
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

/// Sets `RAYON_NUM_THREADS=1` for the whole process (if it is not set already), so candle's CPU
/// matmuls skip their per-call thread-count probe: the generic path's per-example products run
/// about 4.6× faster. The variable also sizes rayon's global pool, so faer work run outside this
/// crate's own pools (for example a kernel Σ applied from the main thread) becomes
/// single-threaded; the engines' passes use pools of their own size and are unaffected.
///
/// # Safety
///
/// Changing the environment while another thread reads or writes it is a data race. Call this
/// at the top of `main`, before any other thread is started (and before rayon's global pool is
/// first used).
pub unsafe fn candle_single_threaded_matmuls() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
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

/// Per-example log-likelihood gradients gᵢ = ∇θ log p(yᵢ|xᵢ, θ) of a user closure over a
/// dataset, by the generic path (one candle backward per example). [`crate::GenericFisher`] is
/// the empirical Fisher built on it.
///
/// The closure `log_lik(x, y)` runs the model on a batch (B, …) and returns the per-example
/// log-likelihoods, shape (B,). It is called with B = 1.
pub struct GenericGradients<'a, L> {
    params: &'a Params,
    log_lik: L,
    data: &'a dyn Dataset,
    opts: GenericOptions,
}

impl<'a, L> GenericGradients<'a, L>
where
    L: Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor> + Sync,
{
    /// The gradients of `log_lik` over `data` with respect to `params`.
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

    /// P.
    pub fn num_params(&self) -> usize {
        self.params.num_params()
    }

    /// N.
    pub fn num_examples(&self) -> usize {
        self.data.len()
    }

    /// The options.
    pub fn options(&self) -> &GenericOptions {
        &self.opts
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
        scalar_value(
            &ll,
            "log-likelihood closure (it must return shape (B,), one value per example; here B = 1)",
            &format!("training example {global}"),
        )?;
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
    /// column per example). O(P·len) memory.
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

    /// Σᵢ gᵢ∘gᵢ over the dataset (length P), summed in f64. Memory O(threads·P).
    pub fn sum_sq(&self) -> Result<Vec<f64>> {
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
        Ok(total)
    }
}

/// A QoI value and its gradient with respect to every parameter.
#[derive(Debug, Clone)]
pub struct QoiGradient {
    /// q(θ, z).
    pub value: f64,
    /// ∇θ q in the flat layout of the [`Params`] it was taken against (length P).
    pub flat: Vec<f64>,
}

impl QoiGradient {
    /// The gradient per parameter tensor (name, f64 tensor shaped like the parameter), the
    /// seed's pytree form.
    pub fn per_tensor(&self, params: &Params) -> Result<Vec<(String, Tensor)>> {
        params.unflatten(&self.flat)
    }
}

/// Takes the scalar `q` returned by a closure (`what`) at `at` and checks it.
fn scalar_value(q: &Tensor, what: &str, at: &str) -> Result<f64> {
    if q.elem_count() != 1 {
        return Err(Error::NotScalar {
            what: what.into(),
            shape: format!("{:?}", q.dims()),
        });
    }
    let v = q
        .flatten_all()?
        .to_dtype(candle_core::DType::F64)?
        .to_vec1::<f64>()?[0];
    if !v.is_finite() {
        return Err(Error::NonFinite {
            what: format!("{what} output"),
            detail: format!("{at}: the value is {v}"),
        });
    }
    Ok(v)
}

/// ∇θ q(θ, z) for a user closure `qoi(z)` that runs the model (capturing it) and returns a scalar
/// tensor (a single element of any shape). The seed's `get_qoi_gradient(qoi_functional, params,
/// model, z)`.
///
/// Errors if the closure fails, its output is not a single element, or the value or gradient is
/// not finite. A parameter that receives no gradient is an error naming it (usually an op
/// without a backward pass upstream, such as candle-nn's fused `layer_norm`), unless it was
/// allowed with [`Params::allow_unused`].
///
/// ```
/// use candle_core::{Device, DType, Tensor, Var};
/// use deltavar::{qoi_gradient, Params};
/// let w = Var::from_tensor(&Tensor::new(&[[1.0f64, 2.0]], &Device::Cpu).unwrap()).unwrap();
/// let params = Params::from_vars(vec![("w".into(), w.clone())]).unwrap();
/// let z = Tensor::new(&[[3.0f64], [4.0]], &Device::Cpu).unwrap();
/// let g = qoi_gradient(&params, &z, |z| w.as_tensor().matmul(z)).unwrap();
/// assert_eq!(g.value, 11.0);
/// assert_eq!(g.flat, vec![3.0, 4.0]);
/// ```
pub fn qoi_gradient<F>(params: &Params, z: &Tensor, qoi: F) -> Result<QoiGradient>
where
    F: Fn(&Tensor) -> candle_core::Result<Tensor>,
{
    let q = qoi(z)?;
    let value = scalar_value(&q, "QoI closure", "the query")?;
    let grads = q.sum_all()?.backward()?;
    let flat = params.flatten_grads(&grads)?;
    crate::error::check_finite("QoI gradient", &flat)?;
    Ok(QoiGradient { value, flat })
}

/// Gradients of a QoI at M query points, the rows of `queries` (M, …), as a P×M block (one
/// column per query) plus the M values. Generic path: one forward/backward per query, in parallel
/// on `threads` workers (see [`GenericOptions`]). Memory O(P·M).
pub fn qoi_gradients<F>(
    params: &Params,
    queries: &Tensor,
    qoi: F,
    opts: &GenericOptions,
) -> Result<(Mat<f64>, Vec<f64>)>
where
    F: Fn(&Tensor) -> candle_core::Result<Tensor> + Sync,
{
    let m = *queries.dims().first().ok_or_else(|| {
        Error::shape(
            "queries (one row per query: the first dimension indexes the queries)",
            "a tensor of rank >= 1",
            "a scalar",
        )
    })?;
    let p = params.num_params();
    let cols = map_examples(m, opts, |j| {
        let z = queries.narrow(0, j, 1)?;
        let g = qoi_gradient(params, &z, &qoi).map_err(|e| match e {
            Error::NonFinite { what, detail } => Error::NonFinite {
                what,
                detail: format!("{detail} (query {j})"),
            },
            e => e,
        })?;
        Ok(g)
    })?;
    let mut mat = Mat::<f64>::zeros(p, m);
    let mut values = Vec::with_capacity(m);
    for (j, g) in cols.into_iter().enumerate() {
        for (i, v) in g.flat.into_iter().enumerate() {
            mat[(i, j)] = v;
        }
        values.push(g.value);
    }
    Ok((mat, values))
}
