//! The native sequential engine: per-example gradients of a [`Sequential`] model (convolutions,
//! pooling, Linear, norms, activations) from one native batched forward and backward pass per
//! batch, without candle's autograd.
//!
//! A batch's pass keeps, per layer with parameters, its input (the unfolded patches of a
//! convolution) and its output signal Δ; example i's gradient then follows per layer:
//! a convolution's Δᵢ (out×L) times its patches Pᵢᵀ (L×K), a Linear layer's Δᵢᵀ Xᵢ, a norm's
//! Σ δ∘x̂ — one small matmul per example and layer, in the model's precision.
//!
//! - [`FactoredSeq::sum_sq`]: Σᵢ gᵢ∘gᵢ accumulated in f64 (a Linear layer used once per
//!   example: one matmul (Δ∘Δ)ᵀ(X∘X) per batch). Memory per worker: one batch of activations
//!   (patches included) and an O(P) accumulator.
//! - [`FactoredSeq::per_example_gradients`]: the P×len block of a range of examples (O(P·len)),
//!   what the dense, kernel and CG methods consume.
//! - [`FactoredSeq::query_gradients`]: QoI gradients of M queries, through a rollout of K
//!   applications of the network if asked (each layer used K times: the gradients sum over the
//!   steps).
//!
//! Batches run in parallel (one per worker, matmuls single-threaded inside); results do not
//! depend on the batch size or the number of workers beyond float rounding.

mod native;

use candle_core::{DType, Tensor};
use faer::Mat;
use rayon::prelude::*;

use super::factored::{rayon_threads, Batch, FactoredOptions, Rows, Scalar, Target};
use super::layered::{LayerKind, LayerRoute, LayerShape, LayeredGradients};
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::likelihood::Likelihood;
use crate::model::Sequential;
use crate::qoi::Qoi;
use native::{NativeSeq, SeqWorkspace};

#[derive(Debug, Clone)]
enum Inner {
    F32(NativeSeq<f32>),
    F64(NativeSeq<f64>),
}

macro_rules! dispatch {
    ($self:expr, $m:ident => $body:expr) => {
        match &$self.inner {
            Inner::F32($m) => $body,
            Inner::F64($m) => $body,
        }
    };
}

/// The native engine for a [`Sequential`] model: a snapshot of its weights in the model's
/// precision (f64 for f64 models, f32 otherwise). Rebuild it after changing the model's variables.
///
/// Its flat parameter layout is the model's state-dict order ([`Sequential::param_names`]).
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use deltavar::{engine::FactoredSeq, model::Sequential, FactoredOptions, Likelihood, TensorDataset};
/// let spec = "seq:conv2d(1,4,3,padding=1),relu,maxpool2d(2),flatten,linear(64,3)".parse().unwrap();
/// let model = Sequential::init(spec, &[1, 8, 8], DType::F64, 0).unwrap();
/// let x = Tensor::randn(0f64, 1., (16, 1, 8, 8), &Device::Cpu).unwrap();
/// let y = Tensor::new(&[0i64, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 0], &Device::Cpu).unwrap();
/// let data = TensorDataset::new(x, y).unwrap();
/// let engine = FactoredSeq::new(&model).unwrap();
/// let s = engine.sum_sq(&Likelihood::Categorical, &data, &FactoredOptions::default()).unwrap();
/// assert_eq!(s.len(), model.num_params());
/// ```
#[derive(Debug, Clone)]
pub struct FactoredSeq {
    inner: Inner,
    input_shape: Vec<usize>,
    output_shape: Vec<usize>,
}

/// Per-worker state of a Fisher-diagonal pass.
struct DiagState<T> {
    ws: SeqWorkspace<T>,
    acc: Vec<f64>,
    s1: Vec<T>,
    s2: Vec<T>,
    s3: Vec<T>,
}

impl FactoredSeq {
    /// Snapshots the model's weights.
    pub fn new(model: &Sequential) -> Result<Self> {
        let dtype = model
            .named_tensors()
            .first()
            .map(|(_, t)| t.dtype())
            .unwrap_or(DType::F32);
        let inner = match dtype {
            DType::F64 => Inner::F64(NativeSeq::from_model(model)?),
            _ => Inner::F32(NativeSeq::from_model(model)?),
        };
        Ok(Self {
            inner,
            input_shape: model.input_shape().to_vec(),
            output_shape: model.output_shape().to_vec(),
        })
    }

    /// P.
    pub fn num_params(&self) -> usize {
        dispatch!(self, m => m.num_params)
    }

    /// The precision the passes run in.
    pub fn dtype(&self) -> DType {
        match self.inner {
            Inner::F32(_) => DType::F32,
            Inner::F64(_) => DType::F64,
        }
    }

    /// One example's input shape.
    pub fn input_shape(&self) -> &[usize] {
        &self.input_shape
    }

    /// One example's output shape.
    pub fn output_shape(&self) -> &[usize] {
        &self.output_shape
    }

    fn pool<R: Send>(opts: &FactoredOptions, f: impl FnOnce() -> R + Send) -> Result<R> {
        super::factored::run_in_pool(opts, f)
    }

    /// Forward through `wss.len()` applications of the network (a rollout when more than one),
    /// the objective's signal at the last output, and the backward pass through every
    /// application. Returns the objective values for a QoI.
    fn pass<T: Scalar>(
        m: &NativeSeq<T>,
        wss: &mut [SeqWorkspace<T>],
        x: Rows<'_>,
        target: Target<'_>,
        first_row: usize,
    ) -> Result<Vec<f64>> {
        let steps = wss.len();
        m.forward(x, &mut wss[0], first_row)?;
        let b = wss[0].rows;
        for k in 1..steps {
            let (prev, next) = wss.split_at_mut(k);
            let input = m.output(&prev[k - 1]).to_vec();
            m.forward_from(input, b, &mut next[0]);
        }
        let last = &wss[steps - 1];
        let (values, signal) = target.signal(m.output(last), b, m.num_outputs(), first_row)?;
        let nl = m.layers.len();
        for k in (0..steps).rev() {
            let sig: Vec<T> = if k + 1 == steps {
                signal.iter().map(|v| T::of(*v)).collect()
            } else {
                std::mem::take(&mut wss[k + 1].d_input)
            };
            let ws = &mut wss[k];
            ws.deltas[nl - 1] = sig;
            m.backward(ws, k > 0);
        }
        Ok(values)
    }

    /// Σᵢ gᵢ∘gᵢ of the log-likelihood over `data` (length P), in f64.
    pub fn sum_sq(
        &self,
        lik: &Likelihood,
        data: &dyn Dataset,
        opts: &FactoredOptions,
    ) -> Result<Vec<f64>> {
        let s = dispatch!(self, m => Self::sum_sq_t(m, lik, data, opts))?;
        crate::error::check_finite("Fisher diagonal sums (sequential engine)", &s)?;
        Ok(s)
    }

    fn sum_sq_t<T: Scalar>(
        m: &NativeSeq<T>,
        lik: &Likelihood,
        data: &dyn Dataset,
        opts: &FactoredOptions,
    ) -> Result<Vec<f64>> {
        let n = data.len();
        let p = m.num_params;
        let bs = opts.batch_size.max(1);
        let starts: Vec<usize> = (0..n).step_by(bs).collect();
        let threads = rayon_threads(opts);
        let per = starts.len().div_ceil(threads.max(1)).max(1);
        let runs: Vec<&[usize]> = starts.chunks(per).collect();
        Self::pool(opts, || {
            runs.par_iter()
                .map(|run| {
                    let mut st = DiagState {
                        ws: SeqWorkspace::default(),
                        acc: vec![0.0; p],
                        s1: vec![],
                        s2: vec![],
                        s3: vec![],
                    };
                    for &start in run.iter() {
                        let len = bs.min(n - start);
                        let batch = Batch::load(data, start, len)?;
                        let (x, y) = batch.rows();
                        Self::pass(
                            m,
                            std::slice::from_mut(&mut st.ws),
                            x,
                            Target::Likelihood(lik, y),
                            start,
                        )?;
                        drop(batch);
                        data.release(start, len);
                        for (l, layer) in m.layers.iter().enumerate() {
                            if layer.np == 0 {
                                continue;
                            }
                            m.add_sum_sq(
                                &st.ws,
                                l,
                                &mut st.acc[layer.off..layer.off + layer.np],
                                &mut st.s1,
                                &mut st.s2,
                                &mut st.s3,
                            );
                        }
                    }
                    Ok::<_, Error>(st.acc)
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

    /// Example `i`'s gradient (summed over the rollout steps) into `col` (length P).
    fn write_grads<T: Scalar>(
        m: &NativeSeq<T>,
        wss: &[SeqWorkspace<T>],
        i: usize,
        col: &mut [f64],
    ) {
        let mut g: Vec<T> = vec![];
        col.fill(0.0);
        for (l, layer) in m.layers.iter().enumerate() {
            if layer.np == 0 {
                continue;
            }
            g.resize(layer.np, T::default());
            for ws in wss {
                m.example_grad(ws, l, i, &mut g);
                col[layer.off..layer.off + layer.np]
                    .iter_mut()
                    .zip(&g)
                    .for_each(|(a, v)| *a += v.f64());
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn gradient_block<'d, T: Scalar>(
        m: &NativeSeq<T>,
        n: usize,
        steps: usize,
        opts: &FactoredOptions,
        get: impl Fn(usize, usize) -> Result<Batch<'d>> + Sync,
        lik: Option<&Likelihood>,
        qoi: Option<&Qoi>,
        offset: usize,
    ) -> Result<(Mat<f64>, Vec<f64>)> {
        let p = m.num_params;
        let bs = opts.batch_size.max(1);
        let starts: Vec<usize> = (0..n).step_by(bs).collect();
        // the P×n result, split into one column block per batch, written in parallel
        let mut g = Mat::<f64>::zeros(p, n);
        let mut blocks = Vec::with_capacity(starts.len());
        let mut rest = g.as_mut();
        for &start in &starts {
            let (block, tail) = rest.split_at_col_mut(bs.min(n - start));
            blocks.push(block);
            rest = tail;
        }
        let values = Self::pool(opts, || {
            blocks
                .into_par_iter()
                .zip(starts.par_iter())
                .map_init(
                    || {
                        (0..steps)
                            .map(|_| SeqWorkspace::default())
                            .collect::<Vec<_>>()
                    },
                    |wss, (mut block, &start)| {
                        let len = bs.min(n - start);
                        let batch = get(start, len)?;
                        let (x, y) = batch.rows();
                        let target = match (lik, qoi) {
                            (Some(l), _) => Target::Likelihood(l, y),
                            (_, Some(q)) => Target::Qoi(q),
                            _ => {
                                return Err(Error::Unsupported(
                                    "a pass without an objective".into(),
                                ))
                            }
                        };
                        let v = Self::pass(m, wss, x, target, offset + start)?;
                        let mut col = vec![0.0f64; p];
                        for j in 0..len {
                            Self::write_grads(m, wss, j, &mut col);
                            crate::error::check_finite(
                                "per-example gradients (sequential engine)",
                                &col,
                            )?;
                            block
                                .as_mut()
                                .col_mut(j)
                                .iter_mut()
                                .zip(&col)
                                .for_each(|(d, v)| *d = *v);
                        }
                        Ok(v)
                    },
                )
                .collect::<Result<Vec<_>>>()
        })??;
        Ok((g, values.into_iter().flatten().collect()))
    }

    /// The log-likelihood gradients of examples `start .. start + len` of `data` as a P×len
    /// matrix (one column per example). O(P·len) memory.
    pub fn per_example_gradients(
        &self,
        lik: &Likelihood,
        data: &dyn Dataset,
        start: usize,
        len: usize,
        opts: &FactoredOptions,
    ) -> Result<Mat<f64>> {
        crate::data::check_range(data.len(), start, len)?;
        let (g, _) = dispatch!(self, m => Self::gradient_block(m, len, 1, opts, |s, l| {
            Batch::load(data, start + s, l)
        }, Some(lik), None, start))?;
        Ok(g)
    }

    /// The gradients of a QoI at the M queries (the rows of `queries`, shape (M, *input shape)
    /// or (M, elements)) as a P×M block, and the QoI values. With `steps` = K > 1 the QoI is
    /// read after K applications of the network (its input and output shapes must agree) and the
    /// gradients flow through all of them.
    pub fn query_gradients(
        &self,
        qoi: &Qoi,
        queries: &Tensor,
        steps: usize,
        opts: &FactoredOptions,
    ) -> Result<(Mat<f64>, Vec<f64>)> {
        self.check_rollout(steps)?;
        let q = self.query_rows(queries)?;
        let m_rows = q.dim(0)?;
        dispatch!(self, m => Self::gradient_block(m, m_rows, steps, opts, |s, l| {
            Ok(Batch::Inputs(q.narrow(0, s, l)?))
        }, None, Some(qoi), 0))
    }
}

/// One batch of one layer, converted for the layered store.
enum LayerPart {
    None,
    /// len × (w_len + b_len) per-example gradients.
    Dense(Vec<f64>),
    /// x rows (len·T × in) and Δ rows (len·T × out).
    Rows(Vec<f64>, Vec<f64>),
}

impl FactoredSeq {
    /// The layers with parameters as the layered store sees them.
    fn shapes_t<T: Scalar>(m: &NativeSeq<T>) -> Vec<(usize, LayerShape)> {
        use native::NOp;
        m.layers
            .iter()
            .enumerate()
            .filter(|(_, l)| l.np > 0)
            .map(|(i, l)| {
                let rows = |t: usize, inp: usize, out: usize, bias: bool| LayerShape {
                    name: format!("module {i}"),
                    kind: LayerKind::Rows { t, inp, out },
                    w_off: l.off,
                    w_len: inp * out,
                    b_off: bias.then_some(l.off + inp * out),
                    b_len: if bias { out } else { 0 },
                };
                let shape = match &l.op {
                    NOp::Linear {
                        b,
                        inp,
                        out,
                        rows: t,
                        ..
                    } => rows(*t, *inp, *out, b.is_some()),
                    NOp::Conv { b, g, .. } => rows(g.l(), g.k(), g.cout, b.is_some()),
                    _ => LayerShape {
                        name: format!("module {i}"),
                        kind: LayerKind::Explicit,
                        w_off: l.off,
                        w_len: l.np,
                        b_off: None,
                        b_len: 0,
                    },
                };
                (i, shape)
            })
            .collect()
    }

    /// Bytes [`FactoredSeq::layered_gradients`] holds for `n` examples under `route`.
    pub fn layered_bytes(&self, n: usize, route: LayerRoute) -> u64 {
        let shapes: Vec<LayerShape> = dispatch!(self, m => Self::shapes_t(m))
            .into_iter()
            .map(|(_, s)| s)
            .collect();
        LayeredGradients::bytes_for(&shapes, n, route)
    }

    /// The log-likelihood gradients of every example of `data` held layer by layer
    /// ([`LayeredGradients`]): a Linear or convolution factored (its inputs or patches and its
    /// output signals, T·(in + 1 + out) per example) or materialised, as `route` says; norms
    /// materialised. Fails with [`Error::MemoryBudget`] above `memory_budget`.
    pub fn layered_gradients(
        &self,
        lik: &Likelihood,
        data: &dyn Dataset,
        opts: &FactoredOptions,
        route: LayerRoute,
        memory_budget: u64,
    ) -> Result<LayeredGradients> {
        let need = self.layered_bytes(data.len(), route);
        super::layered::check_budget(need, memory_budget, "sequential", "NativeStreamed")?;
        let (g, _) = dispatch!(self, m => Self::layered_t(
            m,
            data.len(),
            opts,
            route,
            |s, l| Batch::load(data, s, l),
            |s, l| data.release(s, l),
            (Some(lik), None),
            1,
        ))?;
        Ok(g)
    }

    /// The QoI gradients at the M queries (rows of `queries`, read after `steps` applications
    /// of the network as in [`FactoredSeq::query_gradients`]) held layer by layer under
    /// `route`, and the QoI values: the kernel Σ takes them pair by pair without forming the P×M
    /// block ([`crate::sigma::SigmaOp::quad_forms_layered`]). A factored layer keeps its rows
    /// of every step (steps·T per query); the route is decided on the one-step shapes, so the
    /// result pairs with the one-step layered gradients of the training data.
    pub fn query_layered_gradients(
        &self,
        qoi: &Qoi,
        queries: &Tensor,
        steps: usize,
        opts: &FactoredOptions,
        route: LayerRoute,
    ) -> Result<(LayeredGradients, Vec<f64>)> {
        self.check_rollout(steps)?;
        let q = self.query_rows(queries)?;
        let m_rows = q.dim(0)?;
        dispatch!(self, m => Self::layered_t(
            m,
            m_rows,
            opts,
            route,
            |s, l| Ok(Batch::Inputs(q.narrow(0, s, l)?)),
            |_, _| {},
            (None, Some(qoi)),
            steps,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn layered_t<'d, T: Scalar>(
        m: &NativeSeq<T>,
        n: usize,
        opts: &FactoredOptions,
        route: LayerRoute,
        get: impl Fn(usize, usize) -> Result<Batch<'d>> + Sync,
        release: impl Fn(usize, usize) + Sync,
        objective: (Option<&Likelihood>, Option<&Qoi>),
        steps: usize,
    ) -> Result<(LayeredGradients, Vec<f64>)> {
        use native::NOp;
        let with_idx = Self::shapes_t(m);
        let idx: Vec<usize> = with_idx.iter().map(|(i, _)| *i).collect();
        let shapes = with_idx.into_iter().map(|(_, s)| s).collect();
        let mut store = LayeredGradients::with_steps(shapes, m.num_params, n, route, steps)?;
        let factored: Vec<bool> = (0..idx.len()).map(|l| store.is_factored(l)).collect();
        let bs = opts.batch_size.max(1);
        let starts: Vec<usize> = (0..n).step_by(bs).collect();
        let threads = rayon_threads(opts).max(1);
        let mut values = Vec::with_capacity(n);
        for group in starts.chunks(threads) {
            let parts = Self::pool(opts, || {
                group
                    .par_iter()
                    .map(|&start| {
                        let len = bs.min(n - start);
                        let mut wss: Vec<SeqWorkspace<T>> =
                            (0..steps).map(|_| SeqWorkspace::default()).collect();
                        let batch = get(start, len)?;
                        let (x, y) = batch.rows();
                        let target = match objective {
                            (Some(l), _) => Target::Likelihood(l, y),
                            (_, Some(q)) => Target::Qoi(q),
                            _ => {
                                return Err(Error::Unsupported(
                                    "a pass without an objective".into(),
                                ))
                            }
                        };
                        let values = Self::pass(m, &mut wss, x, target, start)?;
                        drop(batch);
                        release(start, len);
                        let mut out = Vec::with_capacity(idx.len());
                        let mut g: Vec<T> = vec![];
                        for (li, &l) in idx.iter().enumerate() {
                            let layer = &m.layers[l];
                            out.push(match (&layer.op, factored[li]) {
                                (
                                    NOp::Linear {
                                        rows, inp, out: o, ..
                                    },
                                    true,
                                ) => {
                                    // example i's rows: those of step 0, then step 1, ...
                                    let (t, w) = (*rows, steps * rows);
                                    let mut xs = vec![0.0; len * w * inp];
                                    let mut ds = vec![0.0; len * w * o];
                                    for (k, ws) in wss.iter().enumerate() {
                                        let (a, d) = (&ws.acts[l], &ws.deltas[l]);
                                        for i in 0..len {
                                            let at = (i * w + k * t) * inp;
                                            xs[at..at + t * inp]
                                                .iter_mut()
                                                .zip(&a[i * t * inp..(i + 1) * t * inp])
                                                .for_each(|(x, v)| *x = v.f64());
                                            let at = (i * w + k * t) * o;
                                            ds[at..at + t * o]
                                                .iter_mut()
                                                .zip(&d[i * t * o..(i + 1) * t * o])
                                                .for_each(|(x, v)| *x = v.f64());
                                        }
                                    }
                                    LayerPart::Rows(xs, ds)
                                }
                                (NOp::Conv { g: geo, .. }, true) => {
                                    // patches K×L and Δ cout×L per example and step, as L rows
                                    let (k, ll, co) = (geo.k(), geo.l(), geo.cout);
                                    let w = steps * ll;
                                    let mut xs = vec![0.0; len * w * k];
                                    let mut ds = vec![0.0; len * w * co];
                                    for (st, ws) in wss.iter().enumerate() {
                                        for i in 0..len {
                                            let p = &ws.aux[l][i * k * ll..(i + 1) * k * ll];
                                            let d = &ws.deltas[l][i * co * ll..(i + 1) * co * ll];
                                            for t in 0..ll {
                                                let r = i * w + st * ll + t;
                                                for c in 0..k {
                                                    xs[r * k + c] = p[c * ll + t].f64();
                                                }
                                                for oo in 0..co {
                                                    ds[r * co + oo] = d[oo * ll + t].f64();
                                                }
                                            }
                                        }
                                    }
                                    LayerPart::Rows(xs, ds)
                                }
                                (_, true) => LayerPart::None,
                                (_, false) => {
                                    // summed over the steps
                                    g.resize(layer.np, T::default());
                                    let mut gs = vec![0.0f64; len * layer.np];
                                    for ws in &wss {
                                        for i in 0..len {
                                            m.example_grad(ws, l, i, &mut g);
                                            gs[i * layer.np..(i + 1) * layer.np]
                                                .iter_mut()
                                                .zip(&g)
                                                .for_each(|(a, v)| *a += v.f64());
                                        }
                                    }
                                    LayerPart::Dense(gs)
                                }
                            });
                        }
                        Ok::<_, Error>((start, len, out, values))
                    })
                    .collect::<Result<Vec<_>>>()
            })??;
            for (start, len, out, v) in parts {
                values.extend(v);
                for (li, part) in out.into_iter().enumerate() {
                    match part {
                        LayerPart::None => {}
                        LayerPart::Dense(gs) => {
                            let w = gs.len() / len.max(1);
                            for i in 0..len {
                                store
                                    .dense_mut(li, start + i)
                                    .copy_from_slice(&gs[i * w..(i + 1) * w]);
                            }
                        }
                        LayerPart::Rows(xs, ds) => {
                            let (inp, o) = match store.shapes()[li].kind {
                                LayerKind::Rows { inp, out, .. } => (inp, out),
                                _ => (0, 0),
                            };
                            let t = xs.len() / (len * inp).max(1);
                            for i in 0..len {
                                let (xd, dd, k) = store.rows_mut(li, start + i);
                                for r in 0..t {
                                    let at = (i * t + r) * inp;
                                    xd[r * k..r * k + inp].copy_from_slice(&xs[at..at + inp]);
                                }
                                dd.copy_from_slice(&ds[i * t * o..(i + 1) * t * o]);
                            }
                        }
                    }
                }
            }
        }
        store.check_finite()?;
        Ok((store, values))
    }
}

impl FactoredSeq {
    /// A rollout of `steps` applications needs steps ≥ 1 and, beyond one, equal input and
    /// output shapes.
    fn check_rollout(&self, steps: usize) -> Result<()> {
        if steps == 0 {
            return Err(Error::invalid("rollout steps", 0, "must be at least 1"));
        }
        if steps > 1 && self.input_shape != self.output_shape {
            return Err(Error::shape(
                "a rolled-out step network (its output is its next input)",
                format!("{:?}", self.input_shape),
                format!("output {:?}", self.output_shape),
            ));
        }
        Ok(())
    }

    /// The queries as (M, elements per example), checked against the input shape.
    fn query_rows(&self, queries: &Tensor) -> Result<Tensor> {
        super::factored::query_rows(queries, &self.input_shape, "the sequential model")
    }
}

impl super::ExampleGradients for FactoredSeq {
    fn num_params(&self) -> usize {
        FactoredSeq::num_params(self)
    }
    fn sum_sq(
        &self,
        lik: &Likelihood,
        data: &dyn Dataset,
        opts: &FactoredOptions,
    ) -> Result<Vec<f64>> {
        FactoredSeq::sum_sq(self, lik, data, opts)
    }
    fn per_example_gradients(
        &self,
        lik: &Likelihood,
        data: &dyn Dataset,
        start: usize,
        len: usize,
        opts: &FactoredOptions,
    ) -> Result<Mat<f64>> {
        FactoredSeq::per_example_gradients(self, lik, data, start, len, opts)
    }
    fn layered_bytes(&self, n: usize, route: LayerRoute) -> Option<u64> {
        Some(FactoredSeq::layered_bytes(self, n, route))
    }
    fn layered_gradients(
        &self,
        lik: &Likelihood,
        data: &dyn Dataset,
        opts: &FactoredOptions,
        route: LayerRoute,
        memory_budget: u64,
    ) -> Option<Result<LayeredGradients>> {
        Some(FactoredSeq::layered_gradients(
            self,
            lik,
            data,
            opts,
            route,
            memory_budget,
        ))
    }
}

impl FactoredSeq {
    /// The K-FAC factors of the log-likelihood over `data` (see [`crate::sigma::KfacSigma`]):
    /// per Linear and convolution Ā = mean over all uses of [x; 1][x; 1]ᵀ (conv: the patches)
    /// and Ḡ = mean over examples of Σ_uses δδᵀ; the norms' parameters get their exact mean
    /// EF diagonal. Accumulated in f64; memory Σ_l (in + 1)² + out² per worker.
    pub fn kfac_factors(
        &self,
        lik: &Likelihood,
        data: &dyn Dataset,
        opts: &FactoredOptions,
    ) -> Result<crate::engine::kfac::KfacFactors> {
        dispatch!(self, m => Self::kfac_t(m, lik, data, opts))
    }

    fn kfac_t<T: Scalar>(
        m: &NativeSeq<T>,
        lik: &Likelihood,
        data: &dyn Dataset,
        opts: &FactoredOptions,
    ) -> Result<crate::engine::kfac::KfacFactors> {
        use native::NOp;
        let n = data.len();
        let bs = opts.batch_size.max(1);
        let starts: Vec<usize> = (0..n).step_by(bs).collect();
        // per layer: (A sum, G sum, uses) or a diagonal sum
        let zero = || -> Vec<(Vec<f64>, Vec<f64>, f64)> {
            m.layers
                .iter()
                .map(|l| match &l.op {
                    NOp::Linear { b, inp, out, .. } => {
                        let k = inp + usize::from(b.is_some());
                        (vec![0.0; k * k], vec![0.0; out * out], 0.0)
                    }
                    NOp::Conv { b, g, .. } => {
                        let k = g.k() + usize::from(b.is_some());
                        (vec![0.0; k * k], vec![0.0; g.cout * g.cout], 0.0)
                    }
                    _ => (vec![0.0; l.np], vec![], 0.0),
                })
                .collect()
        };
        let sums = Self::pool(opts, || {
            starts
                .par_iter()
                .map(|&start| {
                    let len = bs.min(n - start);
                    let mut ws = SeqWorkspace::default();
                    let batch = Batch::load(data, start, len)?;
                    let (x, y) = batch.rows();
                    Self::pass(
                        m,
                        std::slice::from_mut(&mut ws),
                        x,
                        Target::Likelihood(lik, y),
                        start,
                    )?;
                    let mut acc = zero();
                    let mut g: Vec<T> = vec![];
                    for (l, layer) in m.layers.iter().enumerate() {
                        if layer.np == 0 {
                            continue;
                        }
                        let (a, gg, uses) = &mut acc[l];
                        // rows of inputs (with a trailing 1 for the bias) and signals
                        let mut add = |xr: &[T], dr: &[T], bias: bool| {
                            let k = xr.len() + usize::from(bias);
                            for i in 0..xr.len() {
                                let xi = xr[i].f64();
                                for j in 0..xr.len() {
                                    a[i * k + j] += xi * xr[j].f64();
                                }
                                if bias {
                                    a[i * k + k - 1] += xi;
                                    a[(k - 1) * k + i] += xi;
                                }
                            }
                            if bias {
                                a[k * k - 1] += 1.0;
                            }
                            let o = dr.len();
                            for i in 0..o {
                                let di = dr[i].f64();
                                for j in 0..o {
                                    gg[i * o + j] += di * dr[j].f64();
                                }
                            }
                            *uses += 1.0;
                        };
                        match &layer.op {
                            NOp::Linear { b, inp, out, .. } => {
                                let (xs, ds) = (&ws.acts[l], &ws.deltas[l]);
                                for (xr, dr) in xs.chunks_exact(*inp).zip(ds.chunks_exact(*out)) {
                                    add(xr, dr, b.is_some());
                                }
                            }
                            NOp::Conv { b, g: geo, .. } => {
                                let (k, ll) = (geo.k(), geo.l());
                                let mut col = vec![T::default(); k];
                                let mut dcol = vec![T::default(); geo.cout];
                                for i in 0..ws.rows {
                                    let p = &ws.aux[l][i * k * ll..(i + 1) * k * ll];
                                    let d = &ws.deltas[l][i * layer.n_out..(i + 1) * layer.n_out];
                                    for t in 0..ll {
                                        for (r, c) in col.iter_mut().enumerate() {
                                            *c = p[r * ll + t];
                                        }
                                        for (o, c) in dcol.iter_mut().enumerate() {
                                            *c = d[o * ll + t];
                                        }
                                        add(&col, &dcol, b.is_some());
                                    }
                                }
                            }
                            _ => {
                                g.resize(layer.np, T::default());
                                for i in 0..ws.rows {
                                    m.example_grad(&ws, l, i, &mut g);
                                    T::add_squares(a, &g);
                                }
                            }
                        }
                    }
                    data.release(start, len);
                    Ok::<_, Error>(acc)
                })
                .try_reduce(zero, |mut x, y| {
                    for (p, q) in x.iter_mut().zip(y) {
                        p.0.iter_mut().zip(&q.0).for_each(|(a, b)| *a += b);
                        p.1.iter_mut().zip(&q.1).for_each(|(a, b)| *a += b);
                        p.2 += q.2;
                    }
                    Ok(x)
                })
        })??;
        let nf = n.max(1) as f64;
        let mut f = crate::engine::kfac::KfacFactors {
            num_params: m.num_params,
            ..Default::default()
        };
        for (layer, (a, g, uses)) in m.layers.iter().zip(sums) {
            if layer.np == 0 {
                continue;
            }
            let (inp, out, bias) = match &layer.op {
                NOp::Linear { b, inp, out, .. } => (*inp, *out, b.is_some()),
                NOp::Conv { b, g: geo, .. } => (geo.k(), geo.cout, b.is_some()),
                _ => {
                    f.diagonal
                        .push((layer.off, a.iter().map(|v| v / nf).collect()));
                    continue;
                }
            };
            let u = uses.max(1.0);
            f.layers.push(crate::engine::kfac::KfacLayer {
                w_off: layer.off,
                b_off: bias.then_some(layer.off + out * inp),
                inp,
                out,
                a: a.iter().map(|v| v / u).collect(),
                g: g.iter().map(|v| v / nf).collect(),
            });
        }
        Ok(f)
    }
}
