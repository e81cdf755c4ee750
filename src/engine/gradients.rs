//! The per-example gradient matrix G (N×P, row i = gᵢ) as an operator, never formed unless it
//! fits: what the matrix-free full-Fisher methods (kernel, CG) need.

use candle_core::Tensor;
use faer::linalg::matmul::matmul;
use faer::reborrow::Reborrow;
use faer::{Accum, Mat, MatMut, MatRef, Par};

use super::generic::GenericGradients;
use super::gram::check_gram_out;
use crate::error::{Error, Result};

/// G, the N×P matrix of per-example log-likelihood gradients, seen through its products.
pub trait GradientMatrix: Send + Sync {
    /// P.
    fn num_params(&self) -> usize;
    /// N.
    fn num_examples(&self) -> usize;
    /// G V for a P×k block (N×k).
    fn jv(&self, v: MatRef<'_, f64>) -> Result<Mat<f64>>;
    /// Gᵀ U for an N×k block (P×k).
    fn jtu(&self, u: MatRef<'_, f64>) -> Result<Mat<f64>>;
    /// Gᵀ(G V) for a P×k block (P×k): the Fisher's product without the 1/N. The default is
    /// two products; a source that recomputes G streams it once ([`GradientMatrix::jtu`] of
    /// each chunk's [`GradientMatrix::jv`]).
    fn jtjv(&self, v: MatRef<'_, f64>) -> Result<Mat<f64>> {
        self.jtu(self.jv(v)?.as_ref())
    }
    /// K = G Gᵀ (N×N).
    fn gram(&self) -> Result<Mat<f64>>;
    /// Adds the lower triangle of K = G Gᵀ (diagonal included) into `out` (N×N) and leaves the
    /// entries above the diagonal as they are: what a Cholesky factorization in place reads.
    /// The default forms [`GradientMatrix::gram`]; the factored sources write it tile by tile.
    fn gram_lower_into(&self, mut out: MatMut<'_, f64>) -> Result<()> {
        let n = self.num_examples();
        check_gram_out(out.rb(), n)?;
        let k = self.gram()?;
        for j in 0..n {
            for i in j..n {
                out[(i, j)] += k[(i, j)];
            }
        }
        Ok(())
    }
    /// Σᵢ gᵢ∘gᵢ (length P).
    fn diag_sums(&self) -> Result<Vec<f64>>;
    /// Σ_layers (in + out) for factored sources (the kernel's cost per Gram entry); P otherwise.
    fn gram_width(&self) -> usize {
        self.num_params()
    }
    /// Bytes this representation holds.
    fn bytes(&self) -> u64;
    /// G·q for query gradients held layer by layer in the same layout (N×M), without forming
    /// them; `None` when this operator cannot.
    fn cross_gram_layered(&self, _q: &super::LayeredGradients) -> Option<Result<Mat<f64>>> {
        None
    }
}

impl GradientMatrix for super::LayeredGradients {
    fn num_params(&self) -> usize {
        super::LayeredGradients::num_params(self)
    }
    fn num_examples(&self) -> usize {
        super::LayeredGradients::num_examples(self)
    }
    fn jv(&self, v: MatRef<'_, f64>) -> Result<Mat<f64>> {
        super::LayeredGradients::jv(self, v)
    }
    fn jtu(&self, u: MatRef<'_, f64>) -> Result<Mat<f64>> {
        super::LayeredGradients::jtu(self, u)
    }
    fn gram(&self) -> Result<Mat<f64>> {
        super::LayeredGradients::gram(self)
    }
    fn gram_lower_into(&self, out: MatMut<'_, f64>) -> Result<()> {
        super::LayeredGradients::gram_lower_into(self, out)
    }
    fn cross_gram_layered(&self, q: &super::LayeredGradients) -> Option<Result<Mat<f64>>> {
        super::LayeredGradients::cross_gram_layered(self, q)
    }
    fn diag_sums(&self) -> Result<Vec<f64>> {
        super::LayeredGradients::diag_sums(self)
    }
    fn gram_width(&self) -> usize {
        super::LayeredGradients::gram_width(self)
    }
    fn bytes(&self) -> u64 {
        super::LayeredGradients::bytes(self)
    }
}

/// G held in memory as a P×N matrix (one column per example): the generic path when N·P·8
/// bytes fit the budget.
#[derive(Debug, Clone)]
pub struct DenseGradients {
    gt: Mat<f64>,
}

impl DenseGradients {
    /// From Gᵀ (P×N, one column per example).
    pub fn new(gt: Mat<f64>) -> Self {
        Self { gt }
    }
}

fn check(what: &str, rows: usize, want: usize) -> Result<()> {
    if rows != want {
        return Err(Error::shape(
            what,
            format!("{want} rows"),
            format!("{rows} rows"),
        ));
    }
    Ok(())
}

impl GradientMatrix for DenseGradients {
    fn num_params(&self) -> usize {
        self.gt.nrows()
    }
    fn num_examples(&self) -> usize {
        self.gt.ncols()
    }
    fn jv(&self, v: MatRef<'_, f64>) -> Result<Mat<f64>> {
        check("V in G·V (P rows)", v.nrows(), self.gt.nrows())?;
        Ok(crate::scalar::product(self.gt.transpose(), v))
    }
    fn jtu(&self, u: MatRef<'_, f64>) -> Result<Mat<f64>> {
        check("U in Gᵀ·U (N rows)", u.nrows(), self.gt.ncols())?;
        Ok(crate::scalar::product(self.gt.as_ref(), u))
    }
    fn gram(&self) -> Result<Mat<f64>> {
        Ok(crate::scalar::product(
            self.gt.transpose(),
            self.gt.as_ref(),
        ))
    }
    fn diag_sums(&self) -> Result<Vec<f64>> {
        Ok((0..self.gt.nrows())
            .map(|i| {
                (0..self.gt.ncols())
                    .map(|j| self.gt[(i, j)] * self.gt[(i, j)])
                    .sum()
            })
            .collect())
    }
    fn bytes(&self) -> u64 {
        (self.gt.nrows() * self.gt.ncols() * 8) as u64
    }
}

/// A block of per-example gradients: the P×len gradients of examples `start .. start + len`.
type BlockFn<'a> = dyn Fn(usize, usize) -> Result<Mat<f64>> + Send + Sync + 'a;

/// G recomputed chunk by chunk on every product: the gradient operator of any engine when N·P
/// does not fit in memory. Memory O(chunk·P); each product costs one pass over the data.
pub struct StreamedGradients<'a> {
    p: usize,
    n: usize,
    chunk: usize,
    block: Box<BlockFn<'a>>,
    sum_sq: Box<dyn Fn() -> Result<Vec<f64>> + Send + Sync + 'a>,
    progress: crate::progress::Progress,
}

impl<'a> StreamedGradients<'a> {
    /// A native engine's gradients of `lik` over `data` ([`ExampleGradients`]: the graph and
    /// capture engines), in chunks of `opts.batch_size` × workers.
    pub fn from_engine<E: ExampleGradients>(
        engine: &'a E,
        lik: &'a crate::likelihood::Likelihood,
        data: &'a dyn crate::data::Dataset,
        opts: super::FactoredOptions,
    ) -> Self {
        let chunk = (opts.batch_size.max(1)).saturating_mul(super::batch::rayon_threads(&opts));
        let sq_opts = opts.clone();
        Self {
            p: engine.num_params(),
            n: data.len(),
            chunk,
            block: Box::new(move |s, l| engine.per_example_gradients(lik, data, s, l, &opts)),
            sum_sq: Box::new(move || engine.sum_sq(lik, data, &sq_opts)),
            progress: crate::progress::Progress::none(),
        }
    }

    /// The generic engine's gradients, in chunks of its batch size.
    pub fn from_generic<L>(grads: &'a GenericGradients<'a, L>) -> Self
    where
        L: Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor> + Sync,
    {
        Self {
            p: grads.num_params(),
            n: grads.num_examples(),
            chunk: grads.options().batch_size.max(1),
            block: Box::new(|s, l| grads.per_example_gradients(s, l)),
            sum_sq: Box::new(|| grads.sum_sq()),
            progress: crate::progress::Progress::none(),
        }
    }

    /// A line per chunk of every product (a product over a large dataset takes minutes).
    pub fn with_progress(mut self, progress: crate::progress::Progress) -> Self {
        self.progress = progress;
        self
    }

    fn chunks(&self) -> Vec<(usize, usize)> {
        let (n, c) = (self.n, self.chunk);
        (0..n).step_by(c).map(|s| (s, c.min(n - s))).collect()
    }

    fn block(&self, s: usize, l: usize) -> Result<Mat<f64>> {
        self.progress
            .report(|| format!("streamed gradients: examples {s}..{} of {}", s + l, self.n))?;
        (self.block)(s, l)
    }

    fn chunked<T>(&self, f: impl FnOnce(Chunked<'_>) -> Result<T>) -> Result<T> {
        f(Chunked::new(self.p, self.n, &self.chunks()))
    }
}

impl GradientMatrix for StreamedGradients<'_> {
    fn num_params(&self) -> usize {
        self.p
    }
    fn num_examples(&self) -> usize {
        self.n
    }
    fn jv(&self, v: MatRef<'_, f64>) -> Result<Mat<f64>> {
        self.chunked(|c| c.jv(v, |s, l| self.block(s, l)))
    }
    fn jtu(&self, u: MatRef<'_, f64>) -> Result<Mat<f64>> {
        self.chunked(|c| c.jtu(u, |s, l| self.block(s, l)))
    }
    fn gram(&self) -> Result<Mat<f64>> {
        self.chunked(|c| c.gram(|s, l| self.block(s, l)))
    }
    fn diag_sums(&self) -> Result<Vec<f64>> {
        (self.sum_sq)()
    }
    fn bytes(&self) -> u64 {
        (self.chunk as u64)
            .saturating_mul(self.p as u64)
            .saturating_mul(8)
    }
}

/// The products of a gradient matrix G recomputed chunk by chunk (`block(start, len)` gives the
/// P×len gradients of a range): what every streamed operator shares. Memory: one or two blocks.
pub(crate) struct Chunked<'c> {
    p: usize,
    n: usize,
    chunks: &'c [(usize, usize)],
}

impl<'c> Chunked<'c> {
    pub(crate) fn new(p: usize, n: usize, chunks: &'c [(usize, usize)]) -> Self {
        Self { p, n, chunks }
    }

    /// G·V, N×k.
    pub(crate) fn jv(
        &self,
        v: MatRef<'_, f64>,
        block: impl Fn(usize, usize) -> Result<Mat<f64>>,
    ) -> Result<Mat<f64>> {
        check("V in G·V (P rows)", v.nrows(), self.p)?;
        let mut out = Mat::zeros(self.n, v.ncols());
        for &(s, len) in self.chunks {
            let g = block(s, len)?;
            matmul(
                out.as_mut().subrows_mut(s, len),
                Accum::Replace,
                g.transpose(),
                v,
                1.0,
                Par::rayon(0),
            );
        }
        Ok(out)
    }

    /// Gᵀ·U, P×k.
    pub(crate) fn jtu(
        &self,
        u: MatRef<'_, f64>,
        block: impl Fn(usize, usize) -> Result<Mat<f64>>,
    ) -> Result<Mat<f64>> {
        check("U in Gᵀ·U (N rows)", u.nrows(), self.n)?;
        let mut out = Mat::zeros(self.p, u.ncols());
        for &(s, len) in self.chunks {
            let g = block(s, len)?;
            matmul(
                out.as_mut(),
                Accum::Add,
                g.as_ref(),
                u.subrows(s, len),
                1.0,
                Par::rayon(0),
            );
        }
        Ok(out)
    }

    /// K = G Gᵀ chunk pair by chunk pair: O((N/chunk)²/2) block recomputations.
    pub(crate) fn gram(
        &self,
        block: impl Fn(usize, usize) -> Result<Mat<f64>>,
    ) -> Result<Mat<f64>> {
        let mut k = Mat::zeros(self.n, self.n);
        for (a, &(sa, la)) in self.chunks.iter().enumerate() {
            let ga = block(sa, la)?;
            for &(sb, lb) in &self.chunks[..=a] {
                let gb = if sb == sa { ga.clone() } else { block(sb, lb)? };
                let blk = crate::scalar::product(ga.transpose(), gb.as_ref());
                for j in 0..lb {
                    for i in 0..la {
                        k[(sa + i, sb + j)] = blk[(i, j)];
                        k[(sb + j, sa + i)] = blk[(i, j)];
                    }
                }
            }
        }
        Ok(k)
    }
}

/// An engine's per-example log-likelihood gradients: what [`StreamedGradients`], the Fisher source
/// [`crate::fisher::NativeFisher`] and the offline pass [`crate::fisher::fisher_pass`] need (the
/// graph engine [`crate::engine::GraphEngine`] and the capture engine
/// [`crate::engine::CaptureEngine`]).
pub trait ExampleGradients: Sync {
    /// P.
    fn num_params(&self) -> usize;
    /// The parameters as named tensors in flat-layout order (an offline pass records their
    /// names, shapes and fingerprint).
    fn named_tensors(&self) -> Result<Vec<(String, Tensor)>>;
    /// Σᵢ gᵢ∘gᵢ over `data` (length P), f64.
    fn sum_sq(
        &self,
        lik: &crate::likelihood::Likelihood,
        data: &dyn crate::data::Dataset,
        opts: &super::FactoredOptions,
    ) -> Result<Vec<f64>>;
    /// The P×len block of examples `start .. start + len`.
    fn per_example_gradients(
        &self,
        lik: &crate::likelihood::Likelihood,
        data: &dyn crate::data::Dataset,
        start: usize,
        len: usize,
        opts: &super::FactoredOptions,
    ) -> Result<Mat<f64>>;
    /// Bytes the gradients of the examples of `data` take held layer by layer under `route`;
    /// `None` when the engine cannot hold them so.
    fn layered_bytes(
        &self,
        _lik: &crate::likelihood::Likelihood,
        _data: &dyn crate::data::Dataset,
        _route: super::LayerRoute,
    ) -> Result<Option<u64>> {
        Ok(None)
    }
    /// The gradients of every example held layer by layer ([`super::LayeredGradients`]);
    /// `None` when the engine cannot.
    fn layered_gradients(
        &self,
        _lik: &crate::likelihood::Likelihood,
        _data: &dyn crate::data::Dataset,
        _opts: &super::FactoredOptions,
        _route: super::LayerRoute,
        _memory_budget: u64,
    ) -> Option<Result<super::LayeredGradients>> {
        None
    }
    /// The K-FAC factors of `lik` over `data` ([`crate::sigma::KfacSigma`]); `None` when the
    /// engine has none.
    fn kronecker_factors(
        &self,
        _lik: &crate::likelihood::Likelihood,
        _data: &dyn crate::data::Dataset,
        _opts: &super::FactoredOptions,
    ) -> Option<Result<super::kfac::KfacFactors>> {
        None
    }
}

/// An engine's QoI gradients at query points, what the delta-variance pipeline reads
/// ([`crate::delta::engine_delta_variances_with`] and its group and covariance forms): the
/// graph, transformer and capture engines.
pub trait QueryGradients: Sync {
    /// P.
    fn num_params(&self) -> usize;
    /// Outputs per example (the K of `--qoi outputs`) of the model at these queries.
    fn num_outputs(&self, queries: &Tensor) -> Result<usize>;
    /// The gradients of `qoi` at the rows of `queries`, read after `steps` applications of the
    /// model, as a P×M block, with the QoI values.
    fn query_gradients(
        &self,
        qoi: &crate::qoi::Qoi,
        queries: &Tensor,
        steps: usize,
        opts: &super::FactoredOptions,
    ) -> Result<(Mat<f64>, Vec<f64>)>;
    /// The same gradients held layer by layer under `route`, where the engine can (`None`:
    /// the pipeline forms the P×M block instead).
    fn query_layered_gradients(
        &self,
        _qoi: &crate::qoi::Qoi,
        _queries: &Tensor,
        _steps: usize,
        _opts: &super::FactoredOptions,
        _route: super::LayerRoute,
    ) -> Option<Result<(super::LayeredGradients, Vec<f64>)>> {
        None
    }
    /// The QoI values and the quadratic forms qⱼᵀ diag(s) qⱼ under a diagonal Σ (`s`, length
    /// P) straight from the query pass, without keeping the gradients, where the engine can
    /// (`None`: the pipeline forms them).
    fn query_diag_forms(
        &self,
        _qoi: &crate::qoi::Qoi,
        _queries: &Tensor,
        _steps: usize,
        _opts: &super::FactoredOptions,
        _s: &[f64],
    ) -> Option<Result<(Vec<f64>, Vec<f64>)>> {
        None
    }
}

/// The QoI values and the quadratic forms qⱼᵀ diag(s) qⱼ of `m` queries from their gradients
/// held layer by layer, `chunk` queries at a time (`layered(start, len)` gives a chunk's): one
/// chunk's store is held, never the P×M block, and the layers read once per query never form
/// their gradients ([`super::LayeredGradients::quad_forms_diag`]).
pub(crate) fn chunked_diag_forms(
    m: usize,
    chunk: usize,
    s: &[f64],
    layered: impl Fn(usize, usize) -> Result<(super::LayeredGradients, Vec<f64>)>,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let chunk = chunk.max(1);
    let mut values = Vec::with_capacity(m);
    let mut forms = Vec::with_capacity(m);
    for start in (0..m).step_by(chunk) {
        let (g, v) = layered(start, chunk.min(m - start))?;
        forms.extend(g.quad_forms_diag(s)?);
        values.extend(v);
    }
    Ok((values, forms))
}

/// Adds a layer read once per example to `forms`: gᵢᵀ diag(s) gᵢ of its gradients δᵢxᵢᵀ and
/// δᵢ, Σ_o δ²ᵢₒ ((X∘X) Wᵀ + s_b)ᵢₒ for the `b` rows of `xs` (b×k) and `ds` (b×out) in the run's
/// precision, `w` the weight's part of s (out×k, read in place) and `bias` the bias's; `sqx`
/// a scratch buffer. One matmul in f64, never a gradient.
pub(crate) fn add_row_diag_forms<T: crate::scalar::Scalar>(
    forms: &mut [f64],
    (xs, ds): (&[T], &[T]),
    (b, k, out): (usize, usize, usize),
    w: &[f64],
    bias: Option<&[f64]>,
    sqx: &mut Vec<f64>,
) {
    sqx.clear();
    sqx.extend(xs[..b * k].iter().map(|v| v.f64() * v.f64()));
    let mut t = Mat::<f64>::zeros(b, out);
    matmul(
        t.as_mut(),
        Accum::Replace,
        MatRef::from_row_major_slice(sqx, b, k),
        MatRef::from_row_major_slice(&w[..out * k], out, k).transpose(),
        1.0,
        Par::Seq,
    );
    for (i, f) in forms.iter_mut().enumerate().take(b) {
        let dr = &ds[i * out..(i + 1) * out];
        *f += dr
            .iter()
            .enumerate()
            .map(|(o, dv)| {
                let dv = dv.f64();
                dv * dv * (t[(i, o)] + bias.map_or(0.0, |sb| sb[o]))
            })
            .sum::<f64>();
    }
}

/// Refuses a rollout on an engine that runs its model once (wrap the model in a rollout module
/// for the capture engine instead).
pub(crate) fn single_step(steps: usize, engine: &str) -> Result<()> {
    if steps != 1 {
        return Err(Error::invalid(
            "rollout steps",
            steps,
            format!("the {engine} runs its model once; give 1 (or roll the model out inside it)"),
        ));
    }
    Ok(())
}
