//! The capture engine: per-example gradients of any candle network built from
//! [`crate::nn`] layers, from ONE batched forward and backward pass per batch.
//!
//! During the forward pass every `nn` layer with parameters records each use: its input rows
//! (unfolded patches for a convolution) and a zero probe on its output ([`crate::nn::capture`]).
//! After one backward of Σᵢ uᵢ (uᵢ: example i's log-likelihood, or the QoI at query i) the
//! probes' gradients are the output signals δ of every example and use. A layer used T times in
//! an example (output pixels, sequence positions, rollout steps) has the per-example gradient
//! gᵢᵂ = Σₜ δᵢₜ xᵢₜᵀ, gᵢᵇ = Σₜ δᵢₜ; uses of the same layer within one pass are stacked, so shared
//! weights sum over their uses.
//!
//! - [`CaptureEngine::sum_sq`]: Σᵢ gᵢ∘gᵢ per layer — (Δ∘Δ)ᵀ(X∘X) for T = 1, per-example gᵢ
//!   materialised in chunks (a batched matmul, 2·T·in·out per example) and squared otherwise —
//!   accumulated in f64. Memory: one batch of activations + O(P).
//! - [`CaptureEngine::per_example_gradients`]: the P×len block of gradients of a range of
//!   examples (O(P·len)): what the dense, kernel and CG methods use for now.
//! - [`CaptureEngine::query_gradients`]: QoI gradients of M queries from one pass per batch.
//! - [`CaptureEngine::kfac_factors`]: the K-FAC factors (Ā, Ḡ per layer reading rows, exact
//!   diagonal for embeddings and norms) from one pass.
//!
//! Examples in a batch must be independent (no batch statistics such as BatchNorm in training
//! mode). Every parameter of the set must belong to a captured layer: one that does not (a
//! candle-nn layer, a free `Var`) is an error naming it.

use std::collections::HashMap;

use candle_core::{DType, Module, Tensor, TensorId};
use faer::Mat;

use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::likelihood::Likelihood;
use crate::nn::capture::{CaptureGuard, UseInput, UseRecord};
use crate::params::Params;
use crate::qoi::Qoi;

/// Options of the capture engine.
#[derive(Debug, Clone)]
pub struct CaptureOptions {
    /// Examples per batched forward/backward. Results do not depend on it. Default 256.
    pub batch_size: usize,
    /// Largest per-example gradient block materialised at once (elements), for layers used
    /// several times per example. Default 2²⁴.
    pub chunk_elements: usize,
}

impl Default for CaptureOptions {
    fn default() -> Self {
        Self {
            batch_size: 256,
            chunk_elements: 1 << 24,
        }
    }
}

/// What a layer's stacked uses read.
enum Kind {
    /// Input rows X (B, T, in).
    Rows(Tensor),
    /// Token ids (B·T, row-major), T per example.
    Tokens { ids: Vec<usize>, t: usize },
    /// Normalised inputs x̂ (B, T, d).
    Scale(Tensor),
}

/// One layer's stacked uses in one batch: what they read, Δ (B, T, out), and where its weight
/// and bias sit in the flat layout (`inp`·`out` weight entries: in for rows, the vocabulary for
/// tokens, 1 for a scale).
struct LayerBatch {
    kind: Kind,
    d: Tensor,
    w_off: usize,
    b_off: Option<usize>,
    inp: usize,
    out: usize,
}

/// The capture engine over a model and its parameters.
pub struct CaptureEngine<'a, M> {
    model: &'a M,
    params: &'a Params,
    by_id: HashMap<TensorId, usize>,
    chunk_elements: usize,
}

impl<M> Clone for CaptureEngine<'_, M> {
    fn clone(&self) -> Self {
        Self {
            model: self.model,
            params: self.params,
            by_id: self.by_id.clone(),
            chunk_elements: self.chunk_elements,
        }
    }
}

impl<'a, M: Module> CaptureEngine<'a, M> {
    /// The engine for `model`, whose parameters (in the flat layout) are `params`. Every
    /// parameter must be the weight or bias of an [`crate::nn`] layer the model uses.
    pub fn new(model: &'a M, params: &'a Params) -> Self {
        let by_id = params
            .entries()
            .iter()
            .enumerate()
            .map(|(i, e)| (e.var.as_tensor().id(), i))
            .collect();
        Self {
            model,
            params,
            by_id,
            chunk_elements: CaptureOptions::default().chunk_elements,
        }
    }

    /// The [`CaptureOptions::chunk_elements`] used where the engine runs with
    /// [`super::FactoredOptions`] (as an [`super::ExampleGradients`] or [`super::QueryGradients`] engine).
    pub fn with_chunk_elements(mut self, chunk_elements: usize) -> Self {
        self.chunk_elements = chunk_elements;
        self
    }

    /// P.
    pub fn num_params(&self) -> usize {
        self.params.num_params()
    }

    /// The capture options of `opts`: its batch size, this engine's chunk.
    fn options(&self, opts: &super::FactoredOptions) -> CaptureOptions {
        CaptureOptions {
            batch_size: opts.batch_size,
            chunk_elements: self.chunk_elements,
        }
    }

    fn dtype(&self) -> DType {
        self.params.dtype().unwrap_or(DType::F32)
    }

    /// One captured forward + backward of Σ u over a batch; returns u's values and the layers.
    fn pass(
        &self,
        x: &Tensor,
        objective: impl FnOnce(&Tensor) -> Result<Tensor>,
        first_row: usize,
    ) -> Result<(Vec<f64>, Vec<LayerBatch>)> {
        // float inputs run in the model's precision; integer inputs (token ids) stay as they are
        let x = if x.dtype().is_float() {
            x.to_dtype(self.dtype())?
        } else {
            x.clone()
        };
        let b = x.dims().first().copied().unwrap_or(0);
        let (out, records) = {
            let guard = CaptureGuard::begin()?;
            let out = self.model.forward(&x)?;
            (out, guard.take())
        };
        let u = objective(&out)?;
        if u.dims() != [b] {
            return Err(Error::shape(
                "objective values (one per example)",
                format!("[{b}]"),
                format!("{:?}", u.dims()),
            ));
        }
        let values = u.to_dtype(DType::F64)?.to_vec1::<f64>()?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::NonFinite {
                what: "objective (log-likelihood or QoI)".into(),
                detail: format!("example {} gives {}", first_row + i, values[i]),
            });
        }
        let grads = u.sum_all()?.backward()?;
        let layers = self.group(records, &grads)?;
        Ok((values, layers))
    }

    /// Stacks the uses of each layer (by its weight) and maps them to the flat layout; fails
    /// naming the parameters no captured layer owns.
    fn group(
        &self,
        records: Vec<UseRecord>,
        grads: &candle_core::backprop::GradStore,
    ) -> Result<Vec<LayerBatch>> {
        let mut order: Vec<usize> = vec![];
        let mut uses: HashMap<usize, Vec<(UseInput, Tensor)>> = HashMap::new();
        let mut bias_of: HashMap<usize, Option<usize>> = HashMap::new();
        for r in records {
            let w = *self.by_id.get(&r.weight.id()).ok_or_else(|| {
                Error::Parameter(
                    "a captured layer's weight is not in the parameter set: build the Params \
                     from the same VarMap as the model"
                        .into(),
                )
            })?;
            let b = match &r.bias {
                Some(t) => Some(*self.by_id.get(&t.id()).ok_or_else(|| {
                    Error::Parameter(
                        "a captured layer's bias is not in the parameter set: build the Params \
                         from the same VarMap as the model"
                            .into(),
                    )
                })?),
                None => None,
            };
            let d = match grads.get(r.probe.as_tensor()) {
                Some(g) => g.clone(),
                // this use does not reach the objective
                None => r.probe.as_tensor().zeros_like()?,
            };
            if !uses.contains_key(&w) {
                order.push(w);
            }
            bias_of.insert(w, b);
            uses.entry(w).or_default().push((r.input, d));
        }
        let mut covered = vec![false; self.params.entries().len()];
        let mut out = Vec::with_capacity(order.len());
        let entries = self.params.entries();
        for w in order {
            let list = uses.remove(&w).unwrap_or_default();
            let b = bias_of.get(&w).copied().flatten();
            covered[w] = true;
            if let Some(b) = b {
                covered[b] = true;
            }
            let name = &entries[w].name;
            let ds: Vec<Tensor> = list.iter().map(|(_, d)| d.clone()).collect();
            let d = Tensor::cat(&ds, 1)?;
            let o = d.dim(2)?;
            let (kind, inp) = match &list[0].0 {
                UseInput::Rows(_) => {
                    let xs = same_kind(&list, name, |u| match u {
                        UseInput::Rows(x) => Some(Ok(x.clone())),
                        _ => None,
                    })?;
                    let x = Tensor::cat(&xs, 1)?;
                    let inp = x.dim(2)?;
                    (Kind::Rows(x), inp)
                }
                UseInput::Scale(_) => {
                    let xs = same_kind(&list, name, |u| match u {
                        UseInput::Scale(x) => Some(Ok(x.clone())),
                        _ => None,
                    })?;
                    (Kind::Scale(Tensor::cat(&xs, 1)?), 1)
                }
                UseInput::Tokens { vocab, .. } => {
                    let vocab = *vocab;
                    let ids = same_kind(&list, name, |u| match u {
                        UseInput::Tokens { ids, .. } => Some(ids.to_dtype(DType::I64)),
                        _ => None,
                    })?;
                    let ids = Tensor::cat(&ids, 1)?;
                    let t = ids.dim(1)?;
                    let ids = ids
                        .flatten_all()?
                        .to_vec1::<i64>()?
                        .into_iter()
                        .map(|v| {
                            usize::try_from(v)
                                .ok()
                                .filter(|v| *v < vocab)
                                .ok_or_else(|| {
                                    Error::invalid(
                                        format!("token id for '{name}'"),
                                        v,
                                        format!("must lie in 0..{vocab}"),
                                    )
                                })
                        })
                        .collect::<Result<Vec<_>>>()?;
                    (Kind::Tokens { ids, t }, vocab)
                }
            };
            if entries[w].numel != inp * o {
                return Err(Error::shape(
                    format!("captured layer '{name}'"),
                    entries[w].numel,
                    inp * o,
                ));
            }
            out.push(LayerBatch {
                kind,
                d,
                w_off: entries[w].offset,
                b_off: b.map(|b| entries[b].offset),
                inp,
                out: o,
            });
        }
        let missing: Vec<&str> = self
            .params
            .entries()
            .iter()
            .zip(&covered)
            .filter(|(e, c)| !**c && !self.params.allowed_unused().contains(&e.name))
            .map(|(e, _)| e.name.as_str())
            .collect();
        if !missing.is_empty() {
            return Err(Error::Parameter(format!(
                "parameter(s) {missing:?} belong to no captured layer: build the model from \
                 deltavar::nn layers (linear, conv2d, ...), or use the generic path"
            )));
        }
        Ok(out)
    }

    fn batches(&self, n: usize, bs: usize) -> Result<Vec<(usize, usize)>> {
        if bs == 0 {
            return Err(Error::invalid("batch_size", 0, "must be at least 1"));
        }
        Ok((0..n).step_by(bs).map(|s| (s, bs.min(n - s))).collect())
    }

    /// Σᵢ gᵢ∘gᵢ of the log-likelihood over `data` (length P), in f64.
    pub fn sum_sq(
        &self,
        lik: &Likelihood,
        data: &dyn Dataset,
        opts: &CaptureOptions,
    ) -> Result<Vec<f64>> {
        let mut acc = vec![0.0f64; self.num_params()];
        for (start, len) in self.batches(data.len(), opts.batch_size)? {
            let (x, y) = data.get(start, len)?;
            let (_, layers) = self.pass(&x, |f| lik.log_likelihood(f, &y), start)?;
            data.release(start, len);
            for l in &layers {
                add_sum_sq(l, opts, &mut acc)?;
            }
        }
        crate::error::check_finite("Fisher diagonal sums (capture engine)", &acc)?;
        Ok(acc)
    }

    /// The log-likelihood gradients of examples `start .. start + len` of `data` as a P×len
    /// matrix (one column per example). O(P·len) memory.
    pub fn per_example_gradients(
        &self,
        lik: &Likelihood,
        data: &dyn Dataset,
        start: usize,
        len: usize,
        opts: &CaptureOptions,
    ) -> Result<Mat<f64>> {
        crate::data::check_range(data.len(), start, len)?;
        let mut g = Mat::<f64>::zeros(self.num_params(), len);
        for (s, l) in self.batches(len, opts.batch_size)? {
            let (x, y) = data.get(start + s, l)?;
            let (_, layers) = self.pass(&x, |f| lik.log_likelihood(f, &y), start + s)?;
            write_gradients(&layers, &mut g, s, opts)?;
        }
        Ok(g)
    }

    /// The layers' shapes, read from a captured pass over the first example of `data`.
    pub(crate) fn layer_shapes(
        &self,
        lik: &Likelihood,
        data: &dyn Dataset,
    ) -> Result<Vec<super::layered::LayerShape>> {
        if data.is_empty() {
            return Ok(vec![]);
        }
        let (x, y) = data.get(0, 1)?;
        let (_, layers) = self.pass(&x, |f| lik.log_likelihood(f, &y), 0)?;
        layers.iter().map(|l| self.shape_of(l)).collect()
    }

    fn shape_of(&self, l: &LayerBatch) -> Result<super::layered::LayerShape> {
        use super::layered::{LayerKind, LayerShape};
        let entries = self.params.entries();
        let name = entries
            .iter()
            .find(|e| e.offset == l.w_off)
            .map(|e| e.name.clone())
            .unwrap_or_default();
        let t = l.d.dim(1)?;
        let (kind, w_len) = match &l.kind {
            Kind::Rows(_) => (
                LayerKind::Rows {
                    t,
                    inp: l.inp,
                    out: l.out,
                },
                l.inp * l.out,
            ),
            Kind::Tokens { .. } => (
                LayerKind::Tokens {
                    t,
                    vocab: l.inp,
                    out: l.out,
                },
                l.inp * l.out,
            ),
            Kind::Scale(_) => (LayerKind::Explicit, l.out),
        };
        Ok(LayerShape {
            name,
            kind,
            w_off: l.w_off,
            w_len,
            b_off: l.b_off,
            b_len: if l.b_off.is_some() { l.out } else { 0 },
        })
    }

    /// The log-likelihood gradients of every example of `data`, held layer by layer
    /// ([`super::LayeredGradients`]): each layer factored (its inputs and output signals) or
    /// materialised, as `route` says. Memory `LayeredGradients::bytes`; fails with
    /// [`Error::MemoryBudget`] when that exceeds `memory_budget`.
    pub fn layered_gradients(
        &self,
        lik: &Likelihood,
        data: &dyn Dataset,
        opts: &CaptureOptions,
        route: super::LayerRoute,
        memory_budget: u64,
    ) -> Result<super::LayeredGradients> {
        let (g, _) = self.layered_with(data.len(), opts, route, memory_budget, |start, len| {
            let (x, y) = data.get(start, len)?;
            let r = self.pass(&x, |f| lik.log_likelihood(f, &y), start);
            data.release(start, len);
            r
        })?;
        Ok(g)
    }

    /// The QoI gradients at the M queries (the rows of `queries`) held layer by layer under
    /// `route`, and the QoI values: the kernel Σ takes them pair by pair without forming the
    /// P×M block ([`crate::sigma::SigmaOp::quad_forms_layered`]).
    pub fn query_layered_gradients(
        &self,
        qoi: &Qoi,
        queries: &Tensor,
        opts: &CaptureOptions,
        route: super::LayerRoute,
        memory_budget: u64,
    ) -> Result<(super::LayeredGradients, Vec<f64>)> {
        let m = *queries
            .dims()
            .first()
            .ok_or_else(|| Error::shape("queries (one per row)", "rank >= 1", "a scalar"))?;
        self.layered_with(m, opts, route, memory_budget, |s, l| {
            self.pass(&queries.narrow(0, s, l)?, |f| qoi.eval(f), s)
        })
    }

    /// Runs `run(start, len)` (a captured pass) over `n` examples into a layered store.
    fn layered_with(
        &self,
        n: usize,
        opts: &CaptureOptions,
        route: super::LayerRoute,
        memory_budget: u64,
        mut run: impl FnMut(usize, usize) -> Result<(Vec<f64>, Vec<LayerBatch>)>,
    ) -> Result<(super::LayeredGradients, Vec<f64>)> {
        use super::layered::LayeredGradients;
        let shapes = if n == 0 {
            vec![]
        } else {
            let (_, layers) = run(0, 1)?;
            layers
                .iter()
                .map(|l| self.shape_of(l))
                .collect::<Result<Vec<_>>>()?
        };
        let need = LayeredGradients::bytes_for(&shapes, n, route);
        super::layered::check_budget(need, memory_budget, "capture", "StreamedGradients")?;
        let mut store = LayeredGradients::new(shapes, self.num_params(), n, route)?;
        let mut values = Vec::with_capacity(n);
        for (start, len) in self.batches(n, opts.batch_size)? {
            let (v, layers) = run(start, len)?;
            values.extend(v);
            if layers.len() != store.shapes().len() {
                return Err(Error::Unsupported(format!(
                    "the model used {} captured layers on examples {start}..{} and {} on the \
                     first: the layered gradients need the same layers for every example",
                    layers.len(),
                    start + len,
                    store.shapes().len()
                )));
            }
            for (li, l) in layers.iter().enumerate() {
                if self.shape_of(l)?.kind != store.shapes()[li].kind {
                    return Err(Error::Unsupported(format!(
                        "layer '{}' changed shape between batches",
                        store.shapes()[li].name
                    )));
                }
                store_layer(l, li, start, &mut store, opts)?;
            }
        }
        store.check_finite()?;
        Ok((store, values))
    }

    /// The gradients of a QoI at the M queries (the rows of `queries`) as a P×M block, and the
    /// values.
    pub fn query_gradients(
        &self,
        qoi: &Qoi,
        queries: &Tensor,
        opts: &CaptureOptions,
    ) -> Result<(Mat<f64>, Vec<f64>)> {
        let m = *queries
            .dims()
            .first()
            .ok_or_else(|| Error::shape("queries (one per row)", "rank >= 1", "a scalar"))?;
        let mut g = Mat::<f64>::zeros(self.num_params(), m);
        let mut values = Vec::with_capacity(m);
        for (s, l) in self.batches(m, opts.batch_size)? {
            let z = queries.narrow(0, s, l)?;
            let (v, layers) = self.pass(&z, |f| qoi.eval(f), s)?;
            write_gradients(&layers, &mut g, s, opts)?;
            values.extend(v);
        }
        Ok((g, values))
    }
}

/// One Kronecker-factored layer's running sums in [`CaptureEngine::kfac_factors`].
struct KfacSums {
    w_off: usize,
    b_off: Option<usize>,
    inp: usize,
    out: usize,
    a: Mat<f64>,
    g: Mat<f64>,
    uses: f64,
}

impl<M: Module> CaptureEngine<'_, M> {
    /// The K-FAC factors of the log-likelihood over `data` (see [`crate::sigma::KfacSigma`]) for
    /// any network built from [`crate::nn`] layers: per layer that reads input rows (Linear,
    /// convolution patches), Ā = the mean over every use of [x; 1][x; 1]ᵀ and Ḡ = the mean over
    /// examples of Σ_uses δδᵀ (the "expand" reduction: sequence positions, pixels, rollout steps
    /// and shared weights all count as uses); embeddings and norm scales get their exact mean EF
    /// diagonal. One captured pass; accumulated in f64 with matmuls over each batch's B·T rows;
    /// memory Σ_l (in + 1)² + out² + O(P) and one batch's rows in f64.
    pub fn kfac_factors(
        &self,
        lik: &Likelihood,
        data: &dyn Dataset,
        opts: &CaptureOptions,
    ) -> Result<crate::engine::kfac::KfacFactors> {
        use faer::linalg::matmul::matmul;
        let p = self.num_params();
        let n = data.len();
        let mut diag = vec![0.0f64; p];
        let mut diag_blocks: Vec<(usize, usize)> = vec![];
        let mut layers: Vec<KfacSums> = vec![];
        for (start, len) in self.batches(n, opts.batch_size)? {
            let (x, y) = data.get(start, len)?;
            let (_, batch) = self.pass(&x, |f| lik.log_likelihood(f, &y), start)?;
            data.release(start, len);
            for l in &batch {
                let Kind::Rows(xr) = &l.kind else {
                    add_sum_sq(l, opts, &mut diag)?;
                    if !diag_blocks.iter().any(|(o, _)| *o == l.w_off) {
                        diag_blocks.push((l.w_off, l.inp * l.out));
                        if let Some(b) = l.b_off {
                            diag_blocks.push((b, l.out));
                        }
                    }
                    continue;
                };
                let rows = xr.dim(0)? * xr.dim(1)?;
                let k = l.inp + usize::from(l.b_off.is_some());
                let xv = to_f64(xr)?;
                let dv = to_f64(&l.d)?;
                let xm =
                    Mat::<f64>::from_fn(
                        rows,
                        k,
                        |r, c| {
                            if c < l.inp {
                                xv[r * l.inp + c]
                            } else {
                                1.0
                            }
                        },
                    );
                let dm = faer::MatRef::from_row_major_slice(&dv, rows, l.out);
                let i = match layers.iter().position(|s| s.w_off == l.w_off) {
                    Some(i) => i,
                    None => {
                        layers.push(KfacSums {
                            w_off: l.w_off,
                            b_off: l.b_off,
                            inp: l.inp,
                            out: l.out,
                            a: Mat::zeros(k, k),
                            g: Mat::zeros(l.out, l.out),
                            uses: 0.0,
                        });
                        layers.len() - 1
                    }
                };
                let s = &mut layers[i];
                let par = faer::Par::rayon(0);
                matmul(
                    s.a.as_mut(),
                    faer::Accum::Add,
                    xm.transpose(),
                    xm.as_ref(),
                    1.0,
                    par,
                );
                matmul(s.g.as_mut(), faer::Accum::Add, dm.transpose(), dm, 1.0, par);
                s.uses += rows as f64;
            }
        }
        crate::error::check_finite("K-FAC diagonal sums (capture engine)", &diag)?;
        let nf = n.max(1) as f64;
        let flat = |m: &Mat<f64>, c: f64| -> Result<Vec<f64>> {
            let v: Vec<f64> = (0..m.nrows())
                .flat_map(|i| (0..m.ncols()).map(move |j| (i, j)))
                .map(|(i, j)| m[(i, j)] / c)
                .collect();
            crate::error::check_finite("K-FAC factors (capture engine)", &v)?;
            Ok(v)
        };
        let mut f = crate::engine::kfac::KfacFactors {
            num_params: p,
            ..Default::default()
        };
        for s in &layers {
            f.layers.push(crate::engine::kfac::KfacLayer {
                w_off: s.w_off,
                b_off: s.b_off,
                inp: s.inp,
                out: s.out,
                a: flat(&s.a, s.uses.max(1.0))?,
                g: flat(&s.g, nf)?,
            });
        }
        for (off, len) in diag_blocks {
            f.diagonal
                .push((off, diag[off..off + len].iter().map(|v| v / nf).collect()));
        }
        Ok(f)
    }
}

fn to_f64(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.flatten_all()?.to_dtype(DType::F64)?.to_vec1::<f64>()?)
}

/// The inputs of every use of layer `name`, read by `of` (`None`: a use of another kind, an
/// error naming the layer).
fn same_kind<T, D>(
    list: &[(UseInput, D)],
    name: &str,
    of: impl Fn(&UseInput) -> Option<candle_core::Result<T>>,
) -> Result<Vec<T>> {
    list.iter()
        .map(|(u, _)| match of(u) {
            Some(r) => Ok(r?),
            None => Err(Error::Unsupported(format!(
                "layer '{name}' was used as two different kinds of layer in one pass"
            ))),
        })
        .collect()
}

/// Per-example weight gradients Δᵢᵀ Xᵢ of rows `s .. s + n` of a rows batch: (n, out, in).
fn example_grads(x: &Tensor, d: &Tensor, s: usize, n: usize) -> Result<Tensor> {
    let dt = d.narrow(0, s, n)?.transpose(1, 2)?.contiguous()?;
    let x = x.narrow(0, s, n)?.contiguous()?;
    Ok(dt.matmul(&x)?)
}

fn chunk_rows(l: &LayerBatch, opts: &CaptureOptions) -> usize {
    (opts.chunk_elements / (l.inp * l.out).max(1)).max(1)
}

/// Per example, the token rows Σ_{t: idₜ = v} δₜ: calls `f(example, v, row)` once per distinct
/// token of each example.
fn token_rows(
    ids: &[usize],
    t: usize,
    d: &[f64],
    out: usize,
    mut f: impl FnMut(usize, usize, &[f64]),
) {
    let b = ids.len().checked_div(t).unwrap_or(0);
    let mut order: Vec<usize> = Vec::with_capacity(t);
    let mut row = vec![0.0f64; out];
    for i in 0..b {
        order.clear();
        order.extend(0..t);
        order.sort_by_key(|&k| ids[i * t + k]);
        let mut k = 0;
        while k < t {
            let v = ids[i * t + order[k]];
            row.iter_mut().for_each(|r| *r = 0.0);
            while k < t && ids[i * t + order[k]] == v {
                let at = (i * t + order[k]) * out;
                row.iter_mut()
                    .zip(&d[at..at + out])
                    .for_each(|(r, x)| *r += x);
                k += 1;
            }
            f(i, v, &row);
        }
    }
}

fn add_sum_sq(l: &LayerBatch, opts: &CaptureOptions, acc: &mut [f64]) -> Result<()> {
    let b = l.d.dim(0)?;
    let io = l.inp * l.out;
    match &l.kind {
        Kind::Rows(x) => {
            let t = x.dim(1)?;
            let w = if t == 1 {
                let x2 = x.squeeze(1)?.sqr()?;
                let d2 = l.d.squeeze(1)?.sqr()?;
                to_f64(&d2.t()?.matmul(&x2)?)?
            } else {
                let mut sum = vec![0.0f64; io];
                let step = chunk_rows(l, opts);
                for s in (0..b).step_by(step) {
                    let n = step.min(b - s);
                    let part = to_f64(&example_grads(x, &l.d, s, n)?.sqr()?.sum(0)?)?;
                    sum.iter_mut().zip(&part).for_each(|(a, v)| *a += v);
                }
                sum
            };
            for (a, v) in acc[l.w_off..l.w_off + io].iter_mut().zip(&w) {
                *a += v;
            }
        }
        Kind::Scale(xhat) => {
            let g = to_f64(&(&l.d * xhat)?.sum(1)?.sqr()?.sum(0)?)?;
            for (a, v) in acc[l.w_off..l.w_off + l.out].iter_mut().zip(&g) {
                *a += v;
            }
        }
        Kind::Tokens { ids, t } => {
            let d = to_f64(&l.d)?;
            let (w_off, out) = (l.w_off, l.out);
            token_rows(ids, *t, &d, out, |_, v, row| {
                let dst = &mut acc[w_off + v * out..w_off + (v + 1) * out];
                dst.iter_mut().zip(row).for_each(|(a, r)| *a += r * r);
            });
        }
    }
    if let Some(bo) = l.b_off {
        let bias = to_f64(&l.d.sum(1)?.sqr()?.sum(0)?)?;
        for (a, v) in acc[bo..bo + l.out].iter_mut().zip(&bias) {
            *a += v;
        }
    }
    Ok(())
}

fn write_gradients(
    layers: &[LayerBatch],
    g: &mut Mat<f64>,
    col0: usize,
    opts: &CaptureOptions,
) -> Result<()> {
    for l in layers {
        let b = l.d.dim(0)?;
        match &l.kind {
            Kind::Rows(x) => {
                let step = chunk_rows(l, opts);
                let io = l.inp * l.out;
                for s in (0..b).step_by(step) {
                    let n = step.min(b - s);
                    let w = to_f64(&example_grads(x, &l.d, s, n)?)?;
                    for i in 0..n {
                        for (k, v) in w[i * io..(i + 1) * io].iter().enumerate() {
                            g[(l.w_off + k, col0 + s + i)] = *v;
                        }
                    }
                }
            }
            Kind::Scale(xhat) => {
                let w = to_f64(&(&l.d * xhat)?.sum(1)?)?;
                for i in 0..b {
                    for k in 0..l.out {
                        g[(l.w_off + k, col0 + i)] = w[i * l.out + k];
                    }
                }
            }
            Kind::Tokens { ids, t } => {
                let d = to_f64(&l.d)?;
                let (w_off, out) = (l.w_off, l.out);
                token_rows(ids, *t, &d, out, |i, v, row| {
                    for (k, r) in row.iter().enumerate() {
                        g[(w_off + v * out + k, col0 + i)] = *r;
                    }
                });
            }
        }
        if let Some(bo) = l.b_off {
            let bias = to_f64(&l.d.sum(1)?)?;
            for i in 0..b {
                for k in 0..l.out {
                    g[(bo + k, col0 + i)] = bias[i * l.out + k];
                }
            }
        }
    }
    Ok(())
}

/// Writes one batch of a layer into the layered store (examples `col0 ..`).
fn store_layer(
    l: &LayerBatch,
    li: usize,
    col0: usize,
    store: &mut super::LayeredGradients,
    opts: &CaptureOptions,
) -> Result<()> {
    let b = l.d.dim(0)?;
    let out = l.out;
    if store.is_factored(li) {
        let d = to_f64(&l.d)?;
        let t = l.d.dim(1)?;
        match &l.kind {
            Kind::Rows(x) => {
                let xv = to_f64(x)?;
                let inp = l.inp;
                for i in 0..b {
                    let (xs, ds, k) = store.rows_mut(li, col0 + i);
                    for r in 0..t {
                        xs[r * k..r * k + inp]
                            .copy_from_slice(&xv[(i * t + r) * inp..(i * t + r + 1) * inp]);
                    }
                    ds.copy_from_slice(&d[i * t * out..(i + 1) * t * out]);
                }
            }
            Kind::Tokens { ids, .. } => {
                for i in 0..b {
                    let (is, ds) = store.tokens_mut(li, col0 + i);
                    is.copy_from_slice(&ids[i * t..(i + 1) * t]);
                    ds.copy_from_slice(&d[i * t * out..(i + 1) * t * out]);
                }
            }
            Kind::Scale(_) => {}
        }
        return Ok(());
    }
    let wl = match &l.kind {
        Kind::Scale(_) => out,
        _ => l.inp * out,
    };
    match &l.kind {
        Kind::Rows(x) => {
            let step = chunk_rows(l, opts);
            for s in (0..b).step_by(step) {
                let n = step.min(b - s);
                let w = to_f64(&example_grads(x, &l.d, s, n)?)?;
                for i in 0..n {
                    store.dense_mut(li, col0 + s + i)[..wl]
                        .copy_from_slice(&w[i * wl..(i + 1) * wl]);
                }
            }
        }
        Kind::Scale(xhat) => {
            let w = to_f64(&(&l.d * xhat)?.sum(1)?)?;
            for i in 0..b {
                store.dense_mut(li, col0 + i)[..out].copy_from_slice(&w[i * out..(i + 1) * out]);
            }
        }
        Kind::Tokens { ids, t } => {
            let d = to_f64(&l.d)?;
            token_rows(ids, *t, &d, out, |i, v, row| {
                store.dense_mut(li, col0 + i)[v * out..(v + 1) * out].copy_from_slice(row);
            });
        }
    }
    if l.b_off.is_some() {
        let bias = to_f64(&l.d.sum(1)?)?;
        for i in 0..b {
            store.dense_mut(li, col0 + i)[wl..wl + out]
                .copy_from_slice(&bias[i * out..(i + 1) * out]);
        }
    }
    Ok(())
}

/// The capture engine in the one delta-variance pipeline: the engine options' batch size is the
/// capture batch, the layered queries take the default memory budget.
impl<M: Module + Sync> super::gradients::QueryGradients for CaptureEngine<'_, M> {
    fn num_params(&self) -> usize {
        CaptureEngine::num_params(self)
    }
    fn num_outputs(&self, queries: &Tensor) -> Result<usize> {
        if queries.dims().first().copied().unwrap_or(0) == 0 {
            return Err(Error::invalid(
                "queries",
                "none",
                "the number of outputs is read from one query",
            ));
        }
        let y = self.model.forward(&queries.narrow(0, 0, 1)?)?;
        Ok(y.elem_count())
    }
    fn query_gradients(
        &self,
        qoi: &Qoi,
        queries: &Tensor,
        steps: usize,
        opts: &super::FactoredOptions,
    ) -> Result<(Mat<f64>, Vec<f64>)> {
        super::gradients::single_step(steps, "capture engine")?;
        CaptureEngine::query_gradients(self, qoi, queries, &self.options(opts))
    }
    fn query_layered_gradients(
        &self,
        qoi: &Qoi,
        queries: &Tensor,
        steps: usize,
        opts: &super::FactoredOptions,
        route: super::LayerRoute,
    ) -> Option<Result<(super::LayeredGradients, Vec<f64>)>> {
        Some(
            super::gradients::single_step(steps, "capture engine").and_then(|_| {
                CaptureEngine::query_layered_gradients(
                    self,
                    qoi,
                    queries,
                    &self.options(opts),
                    route,
                    crate::fisher::DEFAULT_MEMORY_BUDGET,
                )
            }),
        )
    }
    /// A batch of queries at a time, every rows and tokens layer factored: one batch's layered
    /// store, never the P×M block.
    fn query_diag_forms(
        &self,
        qoi: &Qoi,
        queries: &Tensor,
        steps: usize,
        opts: &super::FactoredOptions,
        s: &[f64],
    ) -> Option<Result<(Vec<f64>, Vec<f64>)>> {
        let run = || {
            super::gradients::single_step(steps, "capture engine")?;
            let o = self.options(opts);
            let m = queries.dim(0)?;
            super::gradients::chunked_diag_forms(m, opts.batch_size, s, |start, len| {
                CaptureEngine::query_layered_gradients(
                    self,
                    qoi,
                    &queries.narrow(0, start, len)?,
                    &o,
                    super::LayerRoute::Factor,
                    crate::fisher::DEFAULT_MEMORY_BUDGET,
                )
            })
        };
        Some(run())
    }
}

/// The capture engine as a per-example gradient engine: the Fisher source
/// [`crate::fisher::CapturedFisher`] and the offline pass [`crate::fisher::fisher_pass`] run on
/// it as on the graph engine. The options' batch size is the capture batch; the engine runs one
/// batch at a time (its threads are candle's).
impl<M: Module + Sync> super::gradients::ExampleGradients for CaptureEngine<'_, M> {
    fn num_params(&self) -> usize {
        CaptureEngine::num_params(self)
    }
    fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(self
            .params
            .entries()
            .iter()
            .map(|e| (e.name.clone(), e.var.as_tensor().clone()))
            .collect())
    }
    fn sum_sq(
        &self,
        lik: &Likelihood,
        data: &dyn Dataset,
        opts: &super::FactoredOptions,
    ) -> Result<Vec<f64>> {
        CaptureEngine::sum_sq(self, lik, data, &self.options(opts))
    }
    fn per_example_gradients(
        &self,
        lik: &Likelihood,
        data: &dyn Dataset,
        start: usize,
        len: usize,
        opts: &super::FactoredOptions,
    ) -> Result<Mat<f64>> {
        CaptureEngine::per_example_gradients(self, lik, data, start, len, &self.options(opts))
    }
    /// One captured pass over the first example reads the layers.
    fn layered_bytes(
        &self,
        lik: &Likelihood,
        data: &dyn Dataset,
        route: super::LayerRoute,
    ) -> Result<Option<u64>> {
        let shapes = self.layer_shapes(lik, data)?;
        Ok(Some(super::layered::LayeredGradients::bytes_for(
            &shapes,
            data.len(),
            route,
        )))
    }
    fn layered_gradients(
        &self,
        lik: &Likelihood,
        data: &dyn Dataset,
        opts: &super::FactoredOptions,
        route: super::LayerRoute,
        memory_budget: u64,
    ) -> Option<Result<super::LayeredGradients>> {
        Some(CaptureEngine::layered_gradients(
            self,
            lik,
            data,
            &self.options(opts),
            route,
            memory_budget,
        ))
    }
    fn kronecker_factors(
        &self,
        lik: &Likelihood,
        data: &dyn Dataset,
        opts: &super::FactoredOptions,
    ) -> Option<Result<crate::engine::kfac::KfacFactors>> {
        Some(self.kfac_factors(lik, data, &self.options(opts)))
    }
}
