//! The factored per-example engine for models it knows (the sequential [`Mlp`]).
//!
//! One native forward and backward pass per batch (faer matmuls in the model's precision) gives,
//! for every Linear layer, its input rows X (B×in) and the back-propagated signal Δ (B×out) of each
//! example's own objective. The example's gradient is then δᵢxᵢᵀ (weight) and δᵢ (bias), so:
//!
//! - diag F is one matmul per layer, (Δ∘Δ)ᵀ(X∘X), streamed over batches into f64
//!   (`FactoredMlp::fisher_diag`); memory: weights + one batch of activations + an O(P)
//!   accumulator per worker;
//! - J·V, Jᵀ·U, F·V, the N×N Gram matrix and per-example gradient rows come from the
//!   factors of the whole dataset held as [`LayeredGradients`] (every layer factored, read
//!   once per example; memory O(N·Σ(in+1+out)), never the N×P matrix);
//! - many query gradients come from one pass ([`FactoredMlp::query_layered_gradients`]), and
//!   ΔVar under a diagonal Σ never forms the M×P Jacobian.

pub(crate) mod native;
mod signals;

pub use super::batch::FactoredOptions;
use super::batch::{rayon_threads, run_in_pool, sum_over_batches, Batch, Rows, Target};
use super::layered::{LayerKind, LayerRoute, LayerShape, LayeredGradients};
pub use crate::scalar::Scalar;

use candle_core::{DType, Tensor};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatMut, MatRef, Par};
use rayon::prelude::*;

use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::likelihood::Likelihood;
use crate::model::{layer_offsets, Mlp};
use crate::qoi::Qoi;
use native::{NativeMlp, Workspace};

#[derive(Debug, Clone)]
enum Inner {
    F32(NativeMlp<f32>),
    F64(NativeMlp<f64>),
}

/// The factored engine for an [`Mlp`]: a snapshot of its weights in the model's precision (f64
/// for f64 models, f32 otherwise). Rebuild it after changing the model's variables.
///
/// Its flat parameter layout is the MLP's state-dict order ([`Mlp::param_names`]).
#[derive(Debug, Clone)]
pub struct FactoredMlp {
    inner: Inner,
    sizes: Vec<usize>,
}

macro_rules! dispatch {
    ($self:expr, $m:ident => $body:expr) => {
        match &$self.inner {
            Inner::F32($m) => $body,
            Inner::F64($m) => $body,
        }
    };
}

struct DiagState<T> {
    ws: Workspace<T>,
    sqx: Vec<T>,
    sqd: Vec<T>,
    prod: Vec<T>,
}

impl FactoredMlp {
    /// Snapshots the MLP's weights.
    pub fn new(mlp: &Mlp) -> Result<Self> {
        let dtype = mlp.layers()[0].weight().dtype();
        let inner = match dtype {
            DType::F64 => Inner::F64(NativeMlp::from_mlp(mlp)?),
            _ => Inner::F32(NativeMlp::from_mlp(mlp)?),
        };
        Ok(Self {
            inner,
            sizes: mlp.sizes().to_vec(),
        })
    }

    /// Layer widths `[in, h1, ..., out]`.
    pub fn sizes(&self) -> &[usize] {
        &self.sizes
    }

    /// P.
    pub fn num_params(&self) -> usize {
        dispatch!(self, m => m.num_params())
    }

    /// The precision the passes run in.
    pub fn dtype(&self) -> DType {
        match self.inner {
            Inner::F32(_) => DType::F32,
            Inner::F64(_) => DType::F64,
        }
    }

    fn pool<R: Send>(opts: &FactoredOptions, f: impl FnOnce() -> R + Send) -> Result<R> {
        run_in_pool(opts, f)
    }

    /// Runs forward, output signal and backward for one batch into `ws`; returns the objective
    /// values (QoI) when `qoi` is given.
    fn pass<T: Scalar>(
        m: &NativeMlp<T>,
        ws: &mut Workspace<T>,
        x: Rows<'_>,
        target: Target<'_>,
        first_row: usize,
    ) -> Result<Vec<f64>> {
        m.forward(x, ws, first_row)?;
        let b = ws.rows;
        let o = m.num_outputs();
        let (values, signal) = target.signal(m.output(ws), b, o, first_row)?;
        let nl = m.layers.len();
        let last = &mut ws.deltas[nl - 1];
        last.clear();
        last.extend(signal.iter().map(|v| T::of(*v)));
        m.backward(ws)?;
        Ok(values)
    }

    /// Σᵢ gᵢ∘gᵢ over `data` (the empirical Fisher diagonal's sum, length P), streamed: per
    /// batch and layer one matmul (Δ∘Δ)ᵀ(X∘X) in the model's precision, summed into f64.
    ///
    /// Memory per worker: one batch of activations and signals, one P-vector f64 accumulator,
    /// and one out×in product buffer.
    pub fn sum_sq(
        &self,
        lik: &Likelihood,
        data: &dyn Dataset,
        opts: &FactoredOptions,
    ) -> Result<Vec<f64>> {
        dispatch!(self, m => self.sum_sq_t(m, lik, data, opts))
    }

    /// Σ_l (in + 1 + out): the cost of one Gram entry from the factors (and the f64 values
    /// held per example).
    pub fn gram_width(&self) -> usize {
        crate::model::gram_width(&self.sizes)
    }

    fn sum_sq_t<T: Scalar>(
        &self,
        m: &NativeMlp<T>,
        lik: &Likelihood,
        data: &dyn Dataset,
        opts: &FactoredOptions,
    ) -> Result<Vec<f64>> {
        let offsets = layer_offsets(&self.sizes);
        let max_prod = offsets.iter().map(|o| o.2 * o.3).max().unwrap_or(0);
        sum_over_batches(
            opts,
            data,
            m.num_params(),
            || DiagState {
                ws: Workspace::default(),
                sqx: vec![],
                sqd: vec![],
                prod: vec![T::default(); max_prod],
            },
            |st, acc, start, len, x, y| {
                Self::pass(m, &mut st.ws, x, Target::Likelihood(lik, y), start)?;
                for (l, &(w_off, b_off, inp, out)) in offsets.iter().enumerate() {
                    let xs = &st.ws.acts[l];
                    let ds = &st.ws.deltas[l];
                    st.sqx.clear();
                    st.sqx.extend(xs.iter().map(|v| *v * *v));
                    st.sqd.clear();
                    st.sqd.extend(ds.iter().map(|v| *v * *v));
                    let prod = &mut st.prod[..out * inp];
                    matmul(
                        MatMut::from_row_major_slice_mut(prod, out, inp),
                        Accum::Replace,
                        MatRef::from_row_major_slice(&st.sqd, len, out).transpose(),
                        MatRef::from_row_major_slice(&st.sqx, len, inp),
                        T::of(1.0),
                        Par::Seq,
                    );
                    for (a, v) in acc[w_off..w_off + out * inp].iter_mut().zip(prod.iter()) {
                        *a += v.f64();
                    }
                    let accb = &mut acc[b_off..b_off + out];
                    for row in st.sqd.chunks_exact(out) {
                        for (a, v) in accb.iter_mut().zip(row) {
                            *a += v.f64();
                        }
                    }
                }
                Ok(())
            },
        )
    }

    /// The per-example gradients of the log-likelihood of every example of `data` as
    /// per-layer factors (X̃, Δ), in f64 ([`LayeredGradients`], every layer factored).
    /// Memory O(N·Σ(in+1+out)).
    pub fn layered_gradients(
        &self,
        lik: &Likelihood,
        data: &dyn Dataset,
        opts: &FactoredOptions,
    ) -> Result<LayeredGradients> {
        let n = data.len();
        let (f, _) = dispatch!(self, m => self.collect_factors(m, n, opts, |start, len| {
            Batch::load(data, start, len)
        }, Some(lik), None))?;
        Ok(f)
    }

    /// Gradients of a QoI at the M rows of `queries` from one batched pass, as per-layer
    /// factors (never the M×P Jacobian unless asked through
    /// [`LayeredGradients::to_dense`]), and the QoI values.
    pub fn query_layered_gradients(
        &self,
        qoi: &Qoi,
        queries: &Tensor,
        opts: &FactoredOptions,
    ) -> Result<(LayeredGradients, Vec<f64>)> {
        let m_rows = self.query_count(queries)?;
        dispatch!(self, m => self.collect_factors(m, m_rows, opts, |start, len| {
            Ok(Batch::Inputs(queries.narrow(0, start, len)?))
        }, None, Some(qoi)))
    }

    /// The layers as the layered store sees them: Linear layers read once per example, in
    /// the MLP's flat layout.
    fn layer_shapes(&self) -> Vec<LayerShape> {
        layer_offsets(&self.sizes)
            .into_iter()
            .enumerate()
            .map(|(l, (w_off, b_off, inp, out))| LayerShape {
                name: format!("linear layer {l} ({inp} → {out})"),
                kind: LayerKind::Rows { t: 1, inp, out },
                w_off,
                w_len: inp * out,
                b_off: Some(b_off),
                b_len: out,
            })
            .collect()
    }

    /// The QoI values at the M queries (rows of `queries`) and the quadratic forms qⱼᵀ S qⱼ
    /// under a diagonal S (length P), straight from each batch's pass: per layer
    /// Σₒ δₒ²·((x∘x)·S_Wᵀ + s_b)ₒ in f64, without keeping the query factors (what
    /// [`LayeredGradients::quad_forms_diag`] computes from
    /// [`FactoredMlp::query_layered_gradients`], without their
    /// O(M·Σ(in+out)) memory and its copies). Memory per worker: one batch.
    pub fn query_diag_forms(
        &self,
        qoi: &Qoi,
        queries: &Tensor,
        opts: &FactoredOptions,
        s: &[f64],
    ) -> Result<(Vec<f64>, Vec<f64>)> {
        if s.len() != self.num_params() {
            return Err(Error::shape("diagonal Sigma", self.num_params(), s.len()));
        }
        let m_rows = self.query_count(queries)?;
        dispatch!(self, m => self.diag_forms_t(m, m_rows, opts, queries, qoi, s))
    }

    fn diag_forms_t<T: Scalar>(
        &self,
        m: &NativeMlp<T>,
        n: usize,
        opts: &FactoredOptions,
        queries: &Tensor,
        qoi: &Qoi,
        s: &[f64],
    ) -> Result<(Vec<f64>, Vec<f64>)> {
        let bs = opts.batch_size.max(1);
        let starts: Vec<usize> = (0..n).step_by(bs).collect();
        let offsets = layer_offsets(&self.sizes);
        let parts: Vec<(Vec<f64>, Vec<f64>)> = Self::pool(opts, || {
            starts
                .par_iter()
                .map_init(
                    || (Workspace::<T>::default(), Vec::<f64>::new()),
                    |(ws, sqx), &start| {
                        let len = bs.min(n - start);
                        let batch = Batch::Inputs(queries.narrow(0, start, len)?);
                        let (x, _) = batch.rows();
                        let values = Self::pass(m, ws, x, Target::Qoi(qoi), start)?;
                        let mut forms = vec![0.0f64; len];
                        for (l, &(w_off, b_off, inp, out)) in offsets.iter().enumerate() {
                            super::gradients::add_row_diag_forms(
                                &mut forms,
                                (&ws.acts[l], &ws.deltas[l]),
                                (len, inp, out),
                                &s[w_off..w_off + out * inp],
                                Some(&s[b_off..b_off + out]),
                                sqx,
                            );
                        }
                        Ok((values, forms))
                    },
                )
                .collect::<Result<Vec<_>>>()
        })??;
        let mut values = Vec::with_capacity(n);
        let mut forms = Vec::with_capacity(n);
        for (v, f) in parts {
            values.extend(v);
            forms.extend(f);
        }
        Ok((values, forms))
    }

    /// M, for queries shaped (M, inputs).
    fn query_count(&self, queries: &Tensor) -> Result<usize> {
        match queries.dims() {
            [m, w] if *w == self.sizes[0] => Ok(*m),
            d => Err(Error::shape(
                "queries for the MLP (one row per query)",
                format!("(M, {})", self.sizes[0]),
                format!("{d:?}"),
            )),
        }
    }

    #[allow(clippy::type_complexity)]
    fn collect_factors<'d, T: Scalar>(
        &self,
        m: &NativeMlp<T>,
        n: usize,
        opts: &FactoredOptions,
        get: impl Fn(usize, usize) -> Result<Batch<'d>> + Sync,
        lik: Option<&Likelihood>,
        qoi: Option<&Qoi>,
    ) -> Result<(LayeredGradients, Vec<f64>)> {
        let bs = opts.batch_size.max(1);
        let starts: Vec<usize> = (0..n).step_by(bs).collect();
        let mut factors = LayeredGradients::new(
            self.layer_shapes(),
            self.num_params(),
            n,
            LayerRoute::Factor,
        )?;
        let mut values = Vec::with_capacity(n);
        // a few batches per worker at a time, written into the factors as they come: the f64
        // copies never exceed one round (not a second copy of every factor)
        let round = 2 * rayon_threads(opts).max(1);
        for group in starts.chunks(round) {
            let parts = self.factor_round(m, n, bs, group, opts, &get, lik, qoi)?;
            for (&start, (xs, ds, v)) in group.iter().zip(parts) {
                for (l, (x, d)) in xs.iter().zip(&ds).enumerate() {
                    factors.write_single_rows(l, start, x, d)?;
                }
                values.extend(v);
            }
        }
        Ok((factors, values))
    }

    /// One round of batches of [`FactoredMlp::collect_factors`], in parallel.
    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    fn factor_round<'d, T: Scalar>(
        &self,
        m: &NativeMlp<T>,
        n: usize,
        bs: usize,
        group: &[usize],
        opts: &FactoredOptions,
        get: &(impl Fn(usize, usize) -> Result<Batch<'d>> + Sync),
        lik: Option<&Likelihood>,
        qoi: Option<&Qoi>,
    ) -> Result<Vec<(Vec<Vec<f64>>, Vec<Vec<f64>>, Vec<f64>)>> {
        Self::pool(opts, || {
            group
                .par_iter()
                .map_init(Workspace::<T>::default, |ws, &start| {
                    let len = bs.min(n - start);
                    let batch = get(start, len)?;
                    let (x, y) = batch.rows();
                    let target = match (lik, qoi) {
                        (Some(l), _) => Target::Likelihood(l, y),
                        (_, Some(q)) => Target::Qoi(q),
                        _ => {
                            return Err(Error::Unsupported(
                                "factor pass without an objective".into(),
                            ))
                        }
                    };
                    let values = Self::pass(m, ws, x, target, start)?;
                    let xs = ws.acts[..m.layers.len()]
                        .iter()
                        .map(|a| a.iter().map(|v| v.f64()).collect())
                        .collect();
                    let ds = ws
                        .deltas
                        .iter()
                        .map(|d| d.iter().map(|v| v.f64()).collect())
                        .collect();
                    Ok((xs, ds, values))
                })
                .collect::<Result<Vec<_>>>()
        })?
    }
}

impl super::QueryGradients for FactoredMlp {
    fn num_params(&self) -> usize {
        FactoredMlp::num_params(self)
    }
    fn num_outputs(&self, queries: &Tensor) -> Result<usize> {
        self.query_count(queries)?;
        Ok(self.sizes.last().copied().unwrap_or(0))
    }
    fn query_gradients(
        &self,
        qoi: &Qoi,
        queries: &Tensor,
        steps: usize,
        opts: &FactoredOptions,
    ) -> Result<(Mat<f64>, Vec<f64>)> {
        super::gradients::single_step(steps, "MLP engine")?;
        let (g, values) = FactoredMlp::query_layered_gradients(self, qoi, queries, opts)?;
        Ok((g.to_dense(), values))
    }
    /// Every layer factored, whatever `route` says: the layout of
    /// [`FactoredMlp::layered_gradients`], which the kernel Σ pairs them with.
    fn query_layered_gradients(
        &self,
        qoi: &Qoi,
        queries: &Tensor,
        steps: usize,
        opts: &FactoredOptions,
        _route: LayerRoute,
    ) -> Option<Result<(LayeredGradients, Vec<f64>)>> {
        Some(
            super::gradients::single_step(steps, "MLP engine")
                .and_then(|_| FactoredMlp::query_layered_gradients(self, qoi, queries, opts)),
        )
    }
    fn query_diag_forms(
        &self,
        qoi: &Qoi,
        queries: &Tensor,
        steps: usize,
        opts: &FactoredOptions,
        s: &[f64],
    ) -> Option<Result<(Vec<f64>, Vec<f64>)>> {
        Some(
            super::gradients::single_step(steps, "MLP engine")
                .and_then(|_| FactoredMlp::query_diag_forms(self, qoi, queries, opts, s)),
        )
    }
}
