//! The graph engine: per-example gradients of any model given as a [`Graph`] (an ONNX file, or
//! built in Rust), from one batched forward and one backward pass per batch on the graph's own
//! operators (faer matmuls, no candle autograd), in f32 or f64.
//!
//! A batch's backward pass of Σᵢ uᵢ (uᵢ example i's log-likelihood or QoI) leaves, at every use
//! of every parameter, what that example's gradient is made of ([`crate::graph::per_example`]):
//! rows (input rows and output signals of a MatMul/Gemm/Conv weight, a convolution's patches),
//! tokens (ids and signal rows of an embedding) or materialised per-example gradients (norms,
//! biases, tied weights). From them:
//!
//! - `sum_sq` ([`super::ExampleGradients`]): Σᵢ gᵢ∘gᵢ in f64 (a weight used once per example with one row:
//!   one (Δ∘Δ)ᵀ(X∘X) matmul per batch; otherwise Δᵢᵀ X̃ᵢ per example);
//! - `per_example_gradients` (the same trait): the P×len block of a range;
//! - [`GraphEngine::layered_gradients`]: every example held layer by layer
//!   ([`LayeredGradients`]: rows and tokens groups factored or materialised by cost) for the
//!   kernel and CG methods;
//! - `query_gradients` ([`super::QueryGradients`]) / [`GraphEngine::query_layered_gradients`]: QoI
//!   gradients through a rollout of K applications of the graph (output fed back as input);
//! - [`GraphEngine::kfac_factors`]: K-FAC factors of the rows groups, the exact diagonal of the
//!   others.
//!
//! Outputs of any per-example shape: `categorical` is taken over the last axis with one integer
//! label per leading position (a classifier's (C,) with one label, a language model's (T, V)
//! with T labels), `gaussian` elementwise with targets shaped like the output; the QoIs index
//! the flattened output (`prob:K`: softmax over the last axis, then flattened).
//!
//! Memory per worker: one batch's values, cotangents and records (a convolution's patches
//! included) and the accumulator of the pass; the weights once per precision.

use candle_core::{DType, Tensor as CTensor};
use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatMut, MatRef, Par};
use rayon::prelude::*;

use super::batch::{
    rayon_threads, run_in_pool, sum_over_batches, Batch, FactoredOptions, Rows, Target,
};
use super::layered::{LayerKind, LayerRoute, LayerShape, LayeredGradients};
use crate::data::{Dataset, RowsRef};
use crate::error::{Error, Result};
use crate::graph::analysis::Group;
use crate::graph::exec::{self, Pass, Sources};
use crate::graph::ir::{Data, ElemType, Graph, Tensor};
use crate::graph::ops::util::permute;
use crate::graph::per_example::{Record, RowsData};
use crate::graph::Analysis;
use crate::likelihood::Likelihood;
use crate::qoi::Qoi;
use crate::scalar::Scalar;

#[derive(Clone)]
enum Inner {
    F32(std::sync::Arc<Sources<f32>>),
    F64(std::sync::Arc<Sources<f64>>),
}

macro_rules! dispatch {
    ($self:expr, $s:ident => $body:expr) => {
        match &$self.inner {
            Inner::F32($s) => $body,
            Inner::F64($s) => $body,
        }
    };
}

/// The graph engine for one graph and one per-example input shape (see the module docs).
///
/// ```no_run
/// use deltavar::{engine::GraphEngine, graph::Graph, ExampleGradients, FactoredOptions};
/// use deltavar::{Likelihood, MmapNpyDataset};
/// let g = Graph::from_onnx("model.onnx", Some("model.safetensors".as_ref())).unwrap();
/// let data = MmapNpyDataset::open("train_x.npy", "train_y.npy").unwrap();
/// let engine = GraphEngine::new(g, &[3, 32, 32], candle_core::DType::F32).unwrap();
/// let s = engine.sum_sq(&Likelihood::Categorical, &data, &FactoredOptions::default()).unwrap();
/// assert_eq!(s.len(), engine.num_params());
/// ```
#[derive(Clone)]
pub struct GraphEngine {
    graph: std::sync::Arc<Graph>,
    an: std::sync::Arc<Analysis>,
    inner: Inner,
}

impl std::fmt::Debug for GraphEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GraphEngine {{ source: {}, P: {}, input: {:?}, output: {:?}, dtype: {:?} }}",
            self.graph.source,
            self.an.num_params,
            self.an.input_shape,
            self.an.output_shape,
            self.dtype()
        )
    }
}

impl GraphEngine {
    /// Analyses `graph` for examples of shape `input_shape` and converts its weights to
    /// `dtype` (f64 runs in f64, anything else in f32).
    pub fn new(mut graph: Graph, input_shape: &[usize], dtype: DType) -> Result<Self> {
        // the analysis probes with the engine's own copy of the parameters; the parameters are
        // held once, in the run's precision: a graph parameter whose values the engine's copy
        // gives back exactly (every parameter of an f32 model, all of an f64 run) drops its f64
        // copy as it is converted, and named_tensors reads it from the engine's copy
        let (an, inner) = match dtype {
            DType::F64 => {
                let src = Sources::take(&mut graph);
                (
                    Analysis::with_sources(&graph, input_shape, &src)?,
                    Inner::F64(std::sync::Arc::new(src)),
                )
            }
            _ => {
                let src = Sources::take(&mut graph);
                (
                    Analysis::with_sources(&graph, input_shape, &src)?,
                    Inner::F32(std::sync::Arc::new(src)),
                )
            }
        };
        Ok(Self {
            graph: std::sync::Arc::new(graph),
            an: std::sync::Arc::new(an),
            inner,
        })
    }

    /// An `nn.Sequential` model ([`crate::graph::models::sequential`]) in its own precision.
    pub fn from_sequential(m: &crate::model::Sequential) -> Result<Self> {
        Self::new(
            crate::graph::models::sequential(m)?,
            m.input_shape(),
            m.dtype(),
        )
    }

    /// The transformer classifier on sequences of `len` tokens
    /// ([`crate::graph::models::transformer`]) in its own precision.
    pub fn from_transformer(m: &crate::model::Transformer, len: usize) -> Result<Self> {
        Self::new(
            crate::graph::models::transformer(m, len)?,
            &[len],
            m.dtype(),
        )
    }

    /// An MLP ([`crate::graph::models::mlp`]) in its own precision.
    pub fn from_mlp(m: &crate::model::Mlp) -> Result<Self> {
        let dt = m
            .layers()
            .first()
            .map(|l| l.weight().dtype())
            .unwrap_or(DType::F32);
        let width = m.sizes().first().copied().unwrap_or(0);
        Self::new(crate::graph::models::mlp(m)?, &[width], dt)
    }

    /// P.
    pub fn num_params(&self) -> usize {
        self.an.num_params
    }

    /// The examples per batch the CLI uses when none is given: 256 when every weight is read
    /// once per example (an MLP: small activations, and the diagonal pass's per-batch
    /// (Δ∘Δ)ᵀ(X∘X) products and their f64 sums amortise over more examples), else 32 (a
    /// convolution's patches or a sequence's rows of 256 examples fall out of cache).
    pub fn default_batch_size(&self) -> usize {
        let once = self.an.groups.iter().all(|g| match g {
            Group::Rows { t, .. } | Group::Tokens { t, .. } => *t == 1,
            Group::Dense { .. } => true,
        });
        if once {
            256
        } else {
            32
        }
    }

    /// The precision of the passes.
    pub fn dtype(&self) -> DType {
        match self.inner {
            Inner::F32(_) => DType::F32,
            Inner::F64(_) => DType::F64,
        }
    }

    /// The graph: its nodes, names and shapes. The parameters' values are held once, by the
    /// engine in its precision: a [`crate::graph::Param`]'s `data` is empty where the engine's
    /// copy gives it back exactly; read the values with [`GraphEngine::named_tensors`].
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// The analysis (batch axes, parameter groups).
    pub fn analysis(&self) -> &Analysis {
        &self.an
    }

    /// One example's input shape.
    pub fn input_shape(&self) -> &[usize] {
        &self.an.input_shape
    }

    /// One example's output shape.
    pub fn output_shape(&self) -> &[usize] {
        &self.an.output_shape
    }

    /// The parameters as named f64 tensors (flat-layout order): the graph's values (read from
    /// the engine's own copy where the graph's was dropped as an exact duplicate).
    pub fn named_tensors(&self) -> Result<Vec<(String, CTensor)>> {
        dispatch!(self, src => self
            .graph
            .params
            .iter()
            .zip(&src.params)
            .map(|(p, t)| {
                let data: Vec<f64> = match (&t.data, p.data.len() == p.numel()) {
                    (crate::graph::Data::F(v), false) => v.iter().map(|x| x.f64()).collect(),
                    _ => p.data.clone(),
                };
                let t = CTensor::from_vec(data, p.shape.as_slice(), &candle_core::Device::Cpu)?;
                Ok((p.name.clone(), t))
            })
            .collect())
    }

    /// How each parameter is held: (name, "rows" | "tokens" | "dense").
    pub fn parameter_forms(&self) -> Vec<(String, &'static str)> {
        let mut v = vec![];
        for g in &self.an.groups {
            let (p, f) = match g {
                Group::Rows {
                    param, group: 0, ..
                } => (*param, "rows"),
                Group::Rows { .. } => continue,
                Group::Tokens { param, .. } => (*param, "tokens"),
                Group::Dense { param } => (*param, "dense"),
            };
            v.push((self.graph.params[p].name.clone(), f));
            if let Group::Rows {
                bias: Some(q),
                group: 0,
                ..
            } = g
            {
                v.push((self.graph.params[*q].name.clone(), "rows (bias)"));
            }
        }
        v
    }

    /// The groups as the layered store sees them.
    fn shapes(&self) -> Vec<LayerShape> {
        let off = &self.an.offsets;
        let params = &self.graph.params;
        self.an
            .groups
            .iter()
            .map(|g| match *g {
                Group::Rows {
                    param,
                    group,
                    k,
                    out,
                    t,
                    bias,
                } => LayerShape {
                    name: if params[param].shape.first().is_some_and(|c| *c != out) {
                        format!("{} (group {group})", params[param].name)
                    } else {
                        params[param].name.clone()
                    },
                    kind: LayerKind::Rows { t, inp: k, out },
                    w_off: off[param] + group * out * k,
                    w_len: out * k,
                    b_off: bias.map(|q| off[q] + group * out),
                    b_len: if bias.is_some() { out } else { 0 },
                },
                Group::Tokens {
                    param,
                    vocab,
                    out,
                    t,
                } => LayerShape {
                    name: params[param].name.clone(),
                    kind: LayerKind::Tokens { t, vocab, out },
                    w_off: off[param],
                    w_len: vocab * out,
                    b_off: None,
                    b_len: 0,
                },
                Group::Dense { param } => LayerShape {
                    name: params[param].name.clone(),
                    kind: LayerKind::Explicit,
                    w_off: off[param],
                    w_len: params[param].numel(),
                    b_off: None,
                    b_len: 0,
                },
            })
            .collect()
    }

    fn reuse(&self) -> exec::Reuse<'_> {
        exec::Reuse {
            uses: &self.an.uses,
            fold: &self.an.fold,
        }
    }

    fn check_rollout(&self, steps: usize) -> Result<()> {
        if steps == 0 {
            return Err(Error::invalid("rollout steps", 0, "must be at least 1"));
        }
        if steps > 1 && self.an.input_shape != self.an.output_shape {
            return Err(Error::shape(
                "a rolled-out step graph (its output is its next input)",
                format!("{:?}", self.an.input_shape),
                format!("output {:?}", self.an.output_shape),
            ));
        }
        if steps > 1 && self.graph.input_type != ElemType::Float {
            return Err(Error::Unsupported(
                "a rollout needs a float input (the output is fed back)".into(),
            ));
        }
        Ok(())
    }

    /// The batch as the graph's input tensor.
    fn input<T: Scalar>(&self, x: Rows<'_>, first_row: usize) -> Result<Tensor<T>> {
        let (b, cols) = x.dims();
        let per: usize = self.an.input_shape.iter().product();
        if cols != per {
            return Err(Error::shape(
                "inputs (one example per row)",
                format!("{:?} ({per} values)", self.an.input_shape),
                format!("{cols} values per row"),
            ));
        }
        let mut shape = vec![b];
        shape.extend_from_slice(&self.an.input_shape);
        let data = match self.graph.input_type {
            ElemType::Float => {
                let mut v: Vec<T> = vec![];
                x.copy_into(&mut v, "inputs x", first_row)?;
                Data::F(v)
            }
            ElemType::Int | ElemType::Bool => {
                let ids: Vec<i64> = match x {
                    Rows::View(RowsRef::I64(v), ..) => v.to_vec(),
                    Rows::Tensor(t) if t.dtype() == DType::I64 => {
                        t.flatten_all()?.to_vec1::<i64>()?
                    }
                    _ => {
                        let mut v: Vec<f64> = vec![];
                        x.copy_into(&mut v, "inputs x", first_row)?;
                        if let Some(k) = v.iter().position(|f| f.fract() != 0.0) {
                            return Err(Error::invalid(
                                "inputs x",
                                v[k],
                                format!(
                                    "the model takes integer inputs (row {})",
                                    first_row + k / per.max(1)
                                ),
                            ));
                        }
                        v.into_iter().map(|f| f as i64).collect()
                    }
                };
                if self.graph.input_type == ElemType::Bool {
                    Data::B(ids.into_iter().map(|i| i != 0).collect())
                } else {
                    Data::I(ids)
                }
            }
        };
        Ok(Tensor { shape, data })
    }

    /// The output of a pass as B rows of the flattened per-example output (f64).
    fn output_rows<T: Scalar>(&self, pass: &Pass<T>, src: &Sources<T>) -> Result<Vec<f64>> {
        let y = pass
            .value(src, self.graph.output)
            .ok_or_else(|| Error::Unsupported("the output was not computed".into()))?;
        let v = y
            .floats()
            .ok_or_else(|| Error::Unsupported("the output is not float".into()))?;
        let a = self.an.output_axis;
        let moved: Vec<T> = if a == 0 {
            v.to_vec()
        } else {
            let mut perm = vec![a];
            perm.extend((0..y.shape.len()).filter(|i| *i != a));
            permute(v, &y.shape, &perm)
        };
        Ok(moved.into_iter().map(|x| x.f64()).collect())
    }

    /// Example-major rows (B × o) back into the output's layout.
    fn to_output_layout<T: Scalar>(&self, rows: &[f64], b: usize) -> Vec<T> {
        let a = self.an.output_axis;
        let v: Vec<T> = rows.iter().map(|x| T::of(*x)).collect();
        if a == 0 {
            return v;
        }
        let mut moved_shape = vec![b];
        moved_shape.extend_from_slice(&self.an.output_shape);
        // moved axis order: [a, others...]; invert
        let r = moved_shape.len();
        let mut perm_fwd = vec![a];
        perm_fwd.extend((0..r).filter(|i| *i != a));
        let inv = crate::graph::ops::shape::inverse_perm(&perm_fwd);
        permute(&v, &moved_shape, &inv)
    }

    /// The objective's values and its signal for B example-major output rows.
    fn signal(
        &self,
        f: &[f64],
        b: usize,
        target: &Target<'_>,
        first_row: usize,
    ) -> Result<(Vec<f64>, Vec<f64>)> {
        let o: usize = self.an.output_shape.iter().product();
        let v = self.an.output_shape.last().copied().unwrap_or(1).max(1);
        let positions = o / v;
        match target {
            Target::Likelihood(Likelihood::Categorical, y) if positions != 1 => {
                let (yr, yc) = y.dims();
                if yr != b || yc != positions {
                    return Err(Error::shape(
                        "categorical targets y (one label per position of the output's leading axes)",
                        format!("[{b}, {positions}]"),
                        format!("[{yr}, {yc}]"),
                    ));
                }
                let flat;
                let rows = match y {
                    Rows::View(r, _, _) => Rows::View(*r, 1, b * positions),
                    Rows::Tensor(t) => {
                        flat = t.reshape(b * positions)?;
                        Rows::Tensor(&flat)
                    }
                };
                let s = Likelihood::Categorical.signal(f, b * positions, v, rows, first_row)?;
                Ok((vec![], s))
            }
            Target::Qoi(Qoi::Prob(k)) if positions != 1 => {
                if *k >= o {
                    return Err(Error::invalid(
                        "QoI output index",
                        k,
                        format!("the model has {o} outputs (0..{o}) per example"),
                    ));
                }
                let (row, class) = (k / v, k % v);
                let sub: Vec<f64> = (0..b)
                    .flat_map(|i| f[i * o + row * v..i * o + (row + 1) * v].to_vec())
                    .collect();
                let (values, s) = Qoi::Prob(class).signal(&sub, b, v, first_row)?;
                let mut full = vec![0.0; b * o];
                for i in 0..b {
                    full[i * o + row * v..i * o + (row + 1) * v]
                        .copy_from_slice(&s[i * v..(i + 1) * v]);
                }
                Ok((values, full))
            }
            _ => target.signal(f, b, o, first_row),
        }
    }

    /// One batch: `steps` forward passes (the output fed back as input), the objective's signal
    /// at the last output, and the backward passes. Returns the passes (with their records) and
    /// the QoI values.
    fn run_batch<T: Scalar>(
        &self,
        src: &Sources<T>,
        x: Rows<'_>,
        target: &Target<'_>,
        steps: usize,
        first_row: usize,
    ) -> Result<(Vec<Pass<T>>, Vec<f64>)> {
        let g = &*self.graph;
        let an = &*self.an;
        let input = self.input::<T>(x, first_row)?;
        let b = input.shape[0];
        let mut passes: Vec<Pass<T>> = Vec::with_capacity(steps);
        passes.push(exec::forward(g, &an.live, Some(&self.reuse()), src, input)?);
        for _ in 1..steps {
            let prev = passes
                .last()
                .ok_or_else(|| Error::Unsupported("no pass".into()))?;
            let rows = self.output_rows(prev, src)?;
            let mut shape = vec![b];
            shape.extend_from_slice(&an.input_shape);
            let next = Tensor {
                shape,
                data: Data::F(rows.into_iter().map(T::of).collect()),
            };
            passes.push(exec::forward(g, &an.live, Some(&self.reuse()), src, next)?);
        }
        let last = passes
            .last()
            .ok_or_else(|| Error::Unsupported("no pass".into()))?;
        let f = self.output_rows(last, src)?;
        let (values, signal) = self.signal(&f, b, target, first_row)?;
        let mut gout = self.to_output_layout::<T>(&signal, b);
        for k in (0..steps).rev() {
            let to_input = k > 0;
            crate::graph::backward::backward(g, an, src, &mut passes[k], gout, to_input, k)?;
            if to_input {
                let gi = passes[k].cot[g.input].take().unwrap_or_else(|| {
                    vec![T::of(0.0); b * an.input_shape.iter().product::<usize>()]
                });
                let rows: Vec<f64> = gi.iter().map(|v| v.f64()).collect();
                gout = self.to_output_layout::<T>(&rows, b);
            } else {
                gout = vec![];
            }
        }
        Ok((passes, values))
    }

    /// Example `e`'s gradient of group `gi` (weight then bias, f64), summed over the passes.
    fn group_grad<T: Scalar>(
        &self,
        passes: &[Pass<T>],
        gi: usize,
        e: usize,
        out: &mut [f64],
        tmp: &mut Mat<T>,
    ) -> Result<()> {
        out.iter_mut().for_each(|v| *v = 0.0);
        match self.an.groups[gi] {
            Group::Rows {
                k, out: o, bias, ..
            } => {
                if tmp.nrows() != o || tmp.ncols() != k {
                    *tmp = Mat::zeros(o, k);
                }
                for (pass, x, d, _, _) in rows_records(passes, gi) {
                    let xm = x.mat(pass, e)?;
                    let dm = d.mat(pass, e)?;
                    if xm.nrows() > 0 {
                        matmul(
                            tmp.as_mut(),
                            Accum::Replace,
                            dm.transpose(),
                            xm,
                            T::of(1.0),
                            Par::Seq,
                        );
                        for q in 0..o {
                            for i in 0..k {
                                out[q * k + i] += tmp[(q, i)].f64();
                            }
                        }
                    }
                    if bias.is_some() {
                        for t in 0..dm.nrows() {
                            for q in 0..o {
                                out[o * k + q] += dm[(t, q)].f64();
                            }
                        }
                    }
                }
            }
            Group::Tokens { out: o, .. } => {
                for (pass, ids, d, _, _) in tokens_records(passes, gi) {
                    let dm = d.mat(pass, e)?;
                    let t = dm.nrows();
                    for u in 0..t {
                        let id = ids[e * t + u];
                        for q in 0..o {
                            out[id * o + q] += dm[(u, q)].f64();
                        }
                    }
                }
            }
            Group::Dense { param } => {
                let v = self.graph.params[param].value;
                let n = self.graph.params[param].numel();
                for pass in passes {
                    if let Some(pe) = &pass.pe[v] {
                        for (a, x) in out.iter_mut().zip(&pe[e * n..(e + 1) * n]) {
                            *a += x.f64();
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes example `e`'s flat gradient (length P) into `col`.
    fn example_grad<T: Scalar>(
        &self,
        shapes: &[LayerShape],
        passes: &[Pass<T>],
        e: usize,
        col: &mut [f64],
        buf: &mut Vec<f64>,
        tmp: &mut Mat<T>,
    ) -> Result<()> {
        col.iter_mut().for_each(|v| *v = 0.0);
        for (gi, s) in shapes.iter().enumerate() {
            buf.resize(s.w_len + s.b_len, 0.0);
            self.group_grad(passes, gi, e, buf, tmp)?;
            col[s.w_off..s.w_off + s.w_len].copy_from_slice(&buf[..s.w_len]);
            if let Some(b) = s.b_off {
                col[b..b + s.b_len].copy_from_slice(&buf[s.w_len..]);
            }
        }
        Ok(())
    }

    fn sum_sq_t<T: Scalar>(
        &self,
        src: &Sources<T>,
        lik: &Likelihood,
        data: &dyn Dataset,
        opts: &FactoredOptions,
    ) -> Result<Vec<f64>> {
        let shapes = self.shapes();
        sum_over_batches(
            opts,
            data,
            self.num_params(),
            || (vec![], Mat::<T>::zeros(0, 0), Default::default()),
            |(buf, tmp, sq), acc, start, len, x, y| {
                let (passes, _) = self.run_batch(src, x, &Target::Likelihood(lik, y), 1, start)?;
                self.add_sum_sq(&shapes, &passes, len, acc, (buf, tmp, sq))
            },
        )
    }

    /// Adds Σ over the batch's examples of gᵢ∘gᵢ into `acc`.
    fn add_sum_sq<T: Scalar>(
        &self,
        shapes: &[LayerShape],
        passes: &[Pass<T>],
        b: usize,
        acc: &mut [f64],
        (buf, tmp, sq): (&mut Vec<f64>, &mut Mat<T>, &mut [Vec<T>; 3]),
    ) -> Result<()> {
        for (gi, s) in shapes.iter().enumerate() {
            if let Group::Rows { k, out, t, .. } = self.an.groups[gi] {
                let recs: Vec<(&Pass<T>, &RowsData<T>, &RowsData<T>)> = rows_records(passes, gi)
                    .map(|(p, x, d, _, _)| (p, x, d))
                    .collect();
                if recs.is_empty() {
                    continue;
                }
                // one row per example, one use, contiguous rows: (Δ∘Δ)ᵀ(X∘X) over the batch
                if t == 1 {
                    if let Some((xs, ds)) = single_row_factors(passes, gi, b) {
                        // the squares and the product in the worker's buffers, reused by
                        // every batch (no fresh pages per batch)
                        let [xx, dd, prod] = sq;
                        xx.clear();
                        xx.extend(xs.iter().map(|v| *v * *v));
                        dd.clear();
                        dd.extend(ds.iter().map(|v| *v * *v));
                        prod.resize(out * k, T::of(0.0));
                        let prod = &mut prod[..out * k];
                        matmul(
                            MatMut::from_row_major_slice_mut(prod, out, k),
                            Accum::Replace,
                            MatRef::from_row_major_slice(dd, b, out).transpose(),
                            MatRef::from_row_major_slice(xx, b, k),
                            T::of(1.0),
                            Par::Seq,
                        );
                        for (a, v) in acc[s.w_off..s.w_off + out * k].iter_mut().zip(prod.iter()) {
                            *a += v.f64();
                        }
                        if let Some(bo) = s.b_off {
                            for row in dd.chunks_exact(out) {
                                for (a, v) in acc[bo..bo + out].iter_mut().zip(row) {
                                    *a += v.f64();
                                }
                            }
                        }
                        continue;
                    }
                }
                // per example: G = Σ_uses Δᵀ X̃ in the run's precision, squared into f64 for
                // SQ_BLOCK examples at a time (the f64 sums read and written once per block);
                // the blocks in the worker's buffers, kept across batches (the products replace
                // every element they read back)
                let [gs, gbs, _] = &mut *sq;
                gs.resize(SQ_BLOCK * out * k, T::of(0.0));
                gbs.resize(SQ_BLOCK * out, T::of(0.0));
                let mut ones: Vec<T> = vec![];
                for e in 0..b {
                    let slot = e % SQ_BLOCK;
                    let g = &mut gs[slot * out * k..(slot + 1) * out * k];
                    let gb = &mut gbs[slot * out..(slot + 1) * out];
                    for (u, (pass, x, d)) in recs.iter().enumerate() {
                        let xm = x.mat(pass, e)?;
                        let dm = d.mat(pass, e)?;
                        let acc_mode = if u == 0 { Accum::Replace } else { Accum::Add };
                        matmul(
                            MatMut::from_row_major_slice_mut(g, out, k),
                            acc_mode,
                            dm.transpose(),
                            xm,
                            T::of(1.0),
                            Par::Seq,
                        );
                        if s.b_off.is_some() {
                            // the bias: Δᵀ·1
                            ones.resize(dm.nrows(), T::of(1.0));
                            matmul(
                                MatMut::from_column_major_slice_mut(gb, out, 1),
                                acc_mode,
                                dm.transpose(),
                                MatRef::from_column_major_slice(&ones, dm.nrows(), 1),
                                T::of(1.0),
                                Par::Seq,
                            );
                        }
                    }
                    if slot + 1 == SQ_BLOCK || e + 1 == b {
                        let filled = slot + 1;
                        let (w, wb) = (&gs[..filled * out * k], &gbs[..filled * out]);
                        T::add_squares(&mut acc[s.w_off..s.w_off + out * k], w);
                        if let Some(bo) = s.b_off {
                            T::add_squares(&mut acc[bo..bo + out], wb);
                        }
                    }
                }
                continue;
            }
            if let Group::Tokens { out, .. } = self.an.groups[gi] {
                // per example only the rows of the ids it reads: each row's signals summed in
                // f64 in the order of the general path, then squared (the other rows are 0)
                let recs: Vec<_> = tokens_records(passes, gi).collect();
                let mut hits: Vec<(usize, usize, usize)> = vec![];
                buf.resize(out, 0.0);
                for e in 0..b {
                    hits.clear();
                    let mats = recs
                        .iter()
                        .map(|(pass, _, d, _, _)| d.mat(pass, e))
                        .collect::<Result<Vec<_>>>()?;
                    for (r, ((_, ids, _, _, _), dm)) in recs.iter().zip(&mats).enumerate() {
                        let t = dm.nrows();
                        for u in 0..t {
                            hits.push((ids[e * t + u], r, u));
                        }
                    }
                    hits.sort_by_key(|h| h.0);
                    for run in hits.chunk_by(|a, b2| a.0 == b2.0) {
                        let id = run[0].0;
                        buf.iter_mut().for_each(|v| *v = 0.0);
                        for &(_, r, u) in run {
                            for (q, v) in buf.iter_mut().enumerate() {
                                *v += mats[r][(u, q)].f64();
                            }
                        }
                        let at = s.w_off + id * out;
                        for (a, v) in acc[at..at + out].iter_mut().zip(buf.iter()) {
                            *a += v * v;
                        }
                    }
                }
                continue;
            }
            buf.resize(s.w_len + s.b_len, 0.0);
            for e in 0..b {
                self.group_grad(passes, gi, e, buf, tmp)?;
                for (a, v) in acc[s.w_off..s.w_off + s.w_len]
                    .iter_mut()
                    .zip(&buf[..s.w_len])
                {
                    *a += v * v;
                }
                if let Some(bo) = s.b_off {
                    for (a, v) in acc[bo..bo + s.b_len].iter_mut().zip(&buf[s.w_len..]) {
                        *a += v * v;
                    }
                }
            }
        }
        Ok(())
    }

    /// A P×n block of per-example gradients of `n` examples from `get` (one column each), with
    /// the QoI values; `steps` applications of the graph per example.
    #[allow(clippy::too_many_arguments)]
    fn gradient_block<'d, T: Scalar>(
        &self,
        src: &Sources<T>,
        n: usize,
        steps: usize,
        opts: &FactoredOptions,
        get: impl Fn(usize, usize) -> Result<Batch<'d>> + Sync,
        lik: Option<&Likelihood>,
        qoi: Option<&Qoi>,
        offset: usize,
    ) -> Result<(Mat<f64>, Vec<f64>)> {
        let p = self.num_params();
        let bs = opts.batch_size.max(1);
        let starts: Vec<usize> = (0..n).step_by(bs).collect();
        let mut g = Mat::<f64>::zeros(p, n);
        let mut blocks = Vec::with_capacity(starts.len());
        let mut rest = g.as_mut();
        for &start in &starts {
            let (block, tail) = rest.split_at_col_mut(bs.min(n - start));
            blocks.push(block);
            rest = tail;
        }
        let shapes = self.shapes();
        let values = run_in_pool(opts, || {
            blocks
                .into_par_iter()
                .zip(starts.par_iter())
                .map(|(mut block, &start)| {
                    let len = bs.min(n - start);
                    let batch = get(start, len)?;
                    let (x, y) = batch.rows();
                    let target = match (lik, qoi) {
                        (Some(l), _) => Target::Likelihood(l, y),
                        (_, Some(q)) => Target::Qoi(q),
                        _ => return Err(Error::Unsupported("a pass without an objective".into())),
                    };
                    let (passes, v) = self.run_batch(src, x, &target, steps, offset + start)?;
                    let mut col = vec![0.0f64; p];
                    let mut buf = vec![];
                    let mut tmp = Mat::<T>::zeros(0, 0);
                    for j in 0..len {
                        self.example_grad(&shapes, &passes, j, &mut col, &mut buf, &mut tmp)?;
                        crate::error::check_finite("per-example gradients (graph engine)", &col)?;
                        block
                            .as_mut()
                            .col_mut(j)
                            .iter_mut()
                            .zip(&col)
                            .for_each(|(d, v)| *d = *v);
                    }
                    Ok(v)
                })
                .collect::<Result<Vec<_>>>()
        })??;
        Ok((g, values.into_iter().flatten().collect()))
    }

    /// The queries as (M, elements per example), checked against the input shape.
    fn query_rows(&self, queries: &CTensor) -> Result<CTensor> {
        super::batch::query_rows(queries, &self.an.input_shape, "the graph")
    }

    /// Bytes [`GraphEngine::layered_gradients`] holds for `n` examples under `route`.
    pub fn layered_bytes(&self, n: usize, route: LayerRoute) -> u64 {
        LayeredGradients::bytes_for(&self.shapes(), n, route)
    }

    /// The log-likelihood gradients of every example of `data` held layer by layer
    /// ([`LayeredGradients`]): rows groups (MatMul/Gemm/Conv weights) and embeddings factored
    /// or materialised as `route` says, the other parameters materialised. Fails with
    /// [`Error::MemoryBudget`] above `memory_budget`.
    pub fn layered_gradients(
        &self,
        lik: &Likelihood,
        data: &dyn Dataset,
        opts: &FactoredOptions,
        route: LayerRoute,
        memory_budget: u64,
    ) -> Result<LayeredGradients> {
        let need = self.layered_bytes(data.len(), route);
        super::layered::check_budget(need, memory_budget, "graph", "StreamedGradients")?;
        let (g, _) = dispatch!(self, src => self.layered_t(
            src,
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

    /// The QoI gradients at the M queries held layer by layer under `route` (a factored group
    /// keeps its rows of every step: steps·T per query), and the QoI values; they pair with the
    /// one-step layered gradients of the training data
    /// ([`crate::sigma::SigmaOp::quad_forms_layered`]).
    pub fn query_layered_gradients(
        &self,
        qoi: &Qoi,
        queries: &CTensor,
        steps: usize,
        opts: &FactoredOptions,
        route: LayerRoute,
    ) -> Result<(LayeredGradients, Vec<f64>)> {
        self.check_rollout(steps)?;
        let q = self.query_rows(queries)?;
        let m = q.dim(0)?;
        dispatch!(self, src => self.layered_t(
            src,
            m,
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
        &self,
        src: &Sources<T>,
        n: usize,
        opts: &FactoredOptions,
        route: LayerRoute,
        get: impl Fn(usize, usize) -> Result<Batch<'d>> + Sync,
        release: impl Fn(usize, usize) + Sync,
        objective: (Option<&Likelihood>, Option<&Qoi>),
        steps: usize,
    ) -> Result<(LayeredGradients, Vec<f64>)> {
        let shapes = self.shapes();
        let mut store =
            LayeredGradients::with_steps(shapes.clone(), self.num_params(), n, route, steps)?;
        let factored: Vec<bool> = (0..shapes.len()).map(|l| store.is_factored(l)).collect();
        let bs = opts.batch_size.max(1);
        let starts: Vec<usize> = (0..n).step_by(bs).collect();
        let threads = rayon_threads(opts).max(1);
        let mut values = Vec::with_capacity(n);
        for round in starts.chunks(threads) {
            let parts = run_in_pool(opts, || {
                round
                    .par_iter()
                    .map(|&start| {
                        let len = bs.min(n - start);
                        let batch = get(start, len)?;
                        let r = self.layered_batch(
                            src,
                            (&batch, start, len),
                            objective,
                            steps,
                            (&shapes, &factored),
                        );
                        drop(batch);
                        release(start, len);
                        let (parts, v) = r?;
                        Ok::<_, Error>((start, len, parts, v))
                    })
                    .collect::<Result<Vec<_>>>()
            })??;
            for (start, len, parts, v) in parts {
                values.extend(v);
                Self::store_parts(&mut store, start, len, parts);
            }
        }
        store.check_finite()?;
        Ok((store, values))
    }

    /// ΔVar under a diagonal Σ = diag(`s`) of the QoI at every query row of `q`, with the QoI
    /// values: each worker runs a batch, holds its layered store and takes its quadratic forms.
    fn diag_forms_t<T: Scalar>(
        &self,
        src: &Sources<T>,
        q: &CTensor,
        qoi: &Qoi,
        steps: usize,
        opts: &FactoredOptions,
        s: &[f64],
    ) -> Result<(Vec<f64>, Vec<f64>)> {
        let m = q.dim(0)?;
        let shapes = self.shapes();
        let bs = opts.batch_size.max(1);
        let starts: Vec<usize> = (0..m).step_by(bs).collect();
        let parts = run_in_pool(opts, || {
            starts
                .par_iter()
                .map(|&start| {
                    let len = bs.min(m - start);
                    let batch = Batch::Inputs(q.narrow(0, start, len)?);
                    let (x, _) = batch.rows();
                    let (passes, v) = self.run_batch(src, x, &Target::Qoi(qoi), steps, start)?;
                    if let Some(forms) = self.fused_diag_forms(&shapes, &passes, len, s) {
                        return Ok((v, forms));
                    }
                    let mut store = LayeredGradients::with_steps(
                        shapes.clone(),
                        self.num_params(),
                        len,
                        LayerRoute::Factor,
                        steps,
                    )?;
                    let factored: Vec<bool> =
                        (0..shapes.len()).map(|l| store.is_factored(l)).collect();
                    let parts = self.layer_parts(&shapes, &factored, &passes, len, steps)?;
                    Self::store_parts(&mut store, 0, len, parts);
                    store.check_finite()?;
                    Ok::<_, Error>((v, store.quad_forms_diag(s)?))
                })
                .collect::<Result<Vec<_>>>()
        })??;
        let (mut values, mut forms) = (Vec::with_capacity(m), Vec::with_capacity(m));
        for (v, f) in parts {
            values.extend(v);
            forms.extend(f);
        }
        Ok((values, forms))
    }

    /// A batch's gᵢᵀ diag(`s`) gᵢ straight from its pass when every group is a weight read once
    /// per example from one contiguous block (an MLP): Σ_l rowsum((Δ∘Δ)∘((X∘X) S_lᵀ + s_b)),
    /// S_l the weight's part of `s` read in place, no layered store. `None` otherwise, or when
    /// a form is not finite (the store's route then names the layer).
    fn fused_diag_forms<T: Scalar>(
        &self,
        shapes: &[LayerShape],
        passes: &[Pass<T>],
        b: usize,
        s: &[f64],
    ) -> Option<Vec<f64>> {
        let mut blocks = Vec::with_capacity(shapes.len());
        for (gi, sh) in shapes.iter().enumerate() {
            let Group::Rows { k, out, t: 1, .. } = self.an.groups[gi] else {
                return None;
            };
            let (xs, ds) = single_row_factors(passes, gi, b)?;
            let w = s.get(sh.w_off..sh.w_off + out * k)?;
            let bias = match sh.b_off {
                Some(o) => Some(s.get(o..o + out)?),
                None => None,
            };
            blocks.push((k, out, xs, ds, w, bias));
        }
        let mut forms = vec![0.0f64; b];
        let mut sqx: Vec<f64> = vec![];
        for (k, out, xs, ds, w, bias) in blocks {
            super::gradients::add_row_diag_forms(
                &mut forms,
                (xs, ds),
                (b, k, out),
                w,
                bias,
                &mut sqx,
            );
        }
        forms.iter().all(|f| f.is_finite()).then_some(forms)
    }

    /// One batch's pass and its contribution to the layered store (per group), with the
    /// objective's values.
    fn layered_batch<T: Scalar>(
        &self,
        src: &Sources<T>,
        (batch, start, len): (&Batch<'_>, usize, usize),
        objective: (Option<&Likelihood>, Option<&Qoi>),
        steps: usize,
        (shapes, factored): (&[LayerShape], &[bool]),
    ) -> Result<(Vec<Part>, Vec<f64>)> {
        let (x, y) = batch.rows();
        let target = match objective {
            (Some(l), _) => Target::Likelihood(l, y),
            (_, Some(q)) => Target::Qoi(q),
            _ => return Err(Error::Unsupported("a pass without an objective".into())),
        };
        let (passes, v) = self.run_batch(src, x, &target, steps, start)?;
        let parts = self.layer_parts(shapes, factored, &passes, len, steps)?;
        Ok((parts, v))
    }

    /// Copies a batch's parts into the store's examples `start..start + len`.
    fn store_parts(store: &mut LayeredGradients, start: usize, len: usize, parts: Vec<Part>) {
        for (l, part) in parts.into_iter().enumerate() {
            match part {
                Part::Dense(gs) => {
                    let w = gs.len() / len.max(1);
                    for i in 0..len {
                        store
                            .dense_mut(l, start + i)
                            .copy_from_slice(&gs[i * w..(i + 1) * w]);
                    }
                }
                Part::Rows(xs, ds, t, inp, out) => {
                    for i in 0..len {
                        let (xd, dd, k) = store.rows_mut(l, start + i);
                        for r in 0..t {
                            xd[r * k..r * k + inp]
                                .copy_from_slice(&xs[(i * t + r) * inp..(i * t + r + 1) * inp]);
                        }
                        dd.copy_from_slice(&ds[i * t * out..(i + 1) * t * out]);
                    }
                }
                Part::Tokens(ids, ds, t, out) => {
                    for i in 0..len {
                        let (id, dd) = store.tokens_mut(l, start + i);
                        id.copy_from_slice(&ids[i * t..(i + 1) * t]);
                        dd.copy_from_slice(&ds[i * t * out..(i + 1) * t * out]);
                    }
                }
            }
        }
    }

    /// One batch's contribution to the layered store, per group.
    fn layer_parts<T: Scalar>(
        &self,
        shapes: &[LayerShape],
        factored: &[bool],
        passes: &[Pass<T>],
        len: usize,
        steps: usize,
    ) -> Result<Vec<Part>> {
        let mut out = Vec::with_capacity(shapes.len());
        let mut tmp = Mat::<T>::zeros(0, 0);
        for (gi, s) in shapes.iter().enumerate() {
            if !factored[gi] {
                let w = s.w_len + s.b_len;
                let mut gs = vec![0.0f64; len * w];
                for e in 0..len {
                    self.group_grad(passes, gi, e, &mut gs[e * w..(e + 1) * w], &mut tmp)?;
                }
                out.push(Part::Dense(gs));
                continue;
            }
            match self.an.groups[gi] {
                Group::Rows { k, out: o, t, .. } => {
                    let tt = t * steps;
                    // one row per example read once, each factor one contiguous block
                    if tt == 1 {
                        if let Some((xs, ds)) = single_row_factors(passes, gi, len) {
                            let xs: Vec<f64> = xs.iter().map(|v| v.f64()).collect();
                            let ds: Vec<f64> = ds.iter().map(|v| v.f64()).collect();
                            out.push(Part::Rows(xs, ds, 1, k, o));
                            continue;
                        }
                    }
                    let mut xs = vec![0.0; len * tt * k];
                    let mut ds = vec![0.0; len * tt * o];
                    for (pass, x, d, row, step) in rows_records(passes, gi) {
                        for e in 0..len {
                            let xm = x.mat(pass, e)?;
                            let dm = d.mat(pass, e)?;
                            for u in 0..xm.nrows() {
                                let rr = e * tt + step * t + row + u;
                                for c in 0..k {
                                    xs[rr * k + c] = xm[(u, c)].f64();
                                }
                                for c in 0..o {
                                    ds[rr * o + c] = dm[(u, c)].f64();
                                }
                            }
                        }
                    }
                    out.push(Part::Rows(xs, ds, tt, k, o));
                }
                Group::Tokens { out: o, t, .. } => {
                    let tt = t * steps;
                    let mut ids = vec![0usize; len * tt];
                    let mut ds = vec![0.0; len * tt * o];
                    for (pass, rid, d, row, step) in tokens_records(passes, gi) {
                        for e in 0..len {
                            let dm = d.mat(pass, e)?;
                            let tu = dm.nrows();
                            for u in 0..tu {
                                let rr = e * tt + step * t + row + u;
                                ids[rr] = rid[e * tu + u];
                                for c in 0..o {
                                    ds[rr * o + c] = dm[(u, c)].f64();
                                }
                            }
                        }
                    }
                    out.push(Part::Tokens(ids, ds, tt, o));
                }
                Group::Dense { .. } => {
                    return Err(Error::Unsupported("a dense group held factored".into()))
                }
            }
        }
        Ok(out)
    }

    /// The K-FAC factors of the log-likelihood over `data` (see [`crate::sigma::KfacSigma`]):
    /// per rows group Ā = mean over all its rows of x̃x̃ᵀ (conv: patches) and Ḡ = mean over
    /// examples of Σ_rows δδᵀ; the other parameters get their exact mean EF diagonal.
    pub fn kfac_factors(
        &self,
        lik: &Likelihood,
        data: &dyn Dataset,
        opts: &FactoredOptions,
    ) -> Result<crate::engine::kfac::KfacFactors> {
        dispatch!(self, src => self.kfac_t(src, lik, data, opts))
    }

    fn kfac_t<T: Scalar>(
        &self,
        src: &Sources<T>,
        lik: &Likelihood,
        data: &dyn Dataset,
        opts: &FactoredOptions,
    ) -> Result<crate::engine::kfac::KfacFactors> {
        let n = data.len();
        let bs = opts.batch_size.max(1);
        let starts: Vec<usize> = (0..n).step_by(bs).collect();
        let shapes = self.shapes();
        // per group: (A sum, G sum, rows) for rows groups, a diagonal sum otherwise
        let zero = || -> Vec<(Vec<f64>, Vec<f64>, f64)> {
            self.an
                .groups
                .iter()
                .zip(&shapes)
                .map(|(g, s)| match g {
                    Group::Rows { k, out, bias, .. } => {
                        let kk = k + usize::from(bias.is_some());
                        (vec![0.0; kk * kk], vec![0.0; out * out], 0.0)
                    }
                    _ => (vec![0.0; s.w_len + s.b_len], vec![], 0.0),
                })
                .collect()
        };
        let sums = run_in_pool(opts, || {
            starts
                .par_iter()
                .map(|&start| {
                    let len = bs.min(n - start);
                    let batch = Batch::load(data, start, len)?;
                    let (x, y) = batch.rows();
                    let (passes, _) =
                        self.run_batch(src, x, &Target::Likelihood(lik, y), 1, start)?;
                    drop(batch);
                    data.release(start, len);
                    let mut acc = zero();
                    let mut buf = vec![];
                    let mut tmp = Mat::<T>::zeros(0, 0);
                    for (gi, s) in shapes.iter().enumerate() {
                        let (a, gg, rows) = &mut acc[gi];
                        match self.an.groups[gi] {
                            Group::Rows { k, out, bias, .. } => {
                                let kk = k + usize::from(bias.is_some());
                                for (pass, x, d, _, _) in rows_records(&passes, gi) {
                                    for e in 0..len {
                                        let xm = x.mat(pass, e)?;
                                        let dm = d.mat(pass, e)?;
                                        let t = xm.nrows();
                                        let xt = Mat::<f64>::from_fn(t, kk, |u, c| {
                                            if c < k {
                                                xm[(u, c)].f64()
                                            } else {
                                                1.0
                                            }
                                        });
                                        let dt =
                                            Mat::<f64>::from_fn(t, out, |u, c| dm[(u, c)].f64());
                                        add_gram(a, kk, xt.as_ref());
                                        add_gram(gg, out, dt.as_ref());
                                        *rows += t as f64;
                                    }
                                }
                            }
                            _ => {
                                buf.resize(s.w_len + s.b_len, 0.0);
                                for e in 0..len {
                                    self.group_grad(&passes, gi, e, &mut buf, &mut tmp)?;
                                    for (x, v) in a.iter_mut().zip(&buf) {
                                        *x += v * v;
                                    }
                                }
                            }
                        }
                    }
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
            num_params: self.num_params(),
            ..Default::default()
        };
        for ((g, s), (a, gg, rows)) in self.an.groups.iter().zip(&shapes).zip(sums) {
            match g {
                Group::Rows { k, out, .. } => f.layers.push(crate::engine::kfac::KfacLayer {
                    w_off: s.w_off,
                    b_off: s.b_off,
                    inp: *k,
                    out: *out,
                    a: a.iter().map(|v| v / rows.max(1.0)).collect(),
                    g: gg.iter().map(|v| v / nf).collect(),
                }),
                _ => f
                    .diagonal
                    .push((s.w_off, a.iter().map(|v| v / nf).collect())),
            }
        }
        Ok(f)
    }
}

/// One rows record of a group: the pass it lives in, its input rows, its signal rows, its row
/// offset among the group's rows and its rollout step.
type RowsRec<'p, T> = (&'p Pass<T>, &'p RowsData<T>, &'p RowsData<T>, usize, usize);

/// The rows records of group `gi` over the passes of a batch (every use and rollout step).
fn rows_records<T: Scalar>(passes: &[Pass<T>], gi: usize) -> impl Iterator<Item = RowsRec<'_, T>> {
    passes.iter().flat_map(move |p| {
        p.records.iter().filter_map(move |r| match r {
            Record::Rows {
                group,
                row,
                step,
                x,
                d,
            } if *group == gi => Some((p, x, d, *row, *step)),
            _ => None,
        })
    })
}

/// One tokens record of a group: the pass, the ids (B × T), the signal rows, row offset, step.
type TokensRec<'p, T> = (&'p Pass<T>, &'p [usize], &'p RowsData<T>, usize, usize);

/// The tokens records of group `gi` over the passes of a batch.
fn tokens_records<T: Scalar>(
    passes: &[Pass<T>],
    gi: usize,
) -> impl Iterator<Item = TokensRec<'_, T>> {
    passes.iter().flat_map(move |p| {
        p.records.iter().filter_map(move |r| match r {
            Record::Tokens {
                group,
                row,
                step,
                ids,
                d,
            } if *group == gi => Some((p, ids.as_slice(), d, *row, *step)),
            _ => None,
        })
    })
}

/// The factors X (b×k) and Δ (b×out) of rows group `gi` when the batch's passes read it once
/// per example (one record, at row 0 of step 0) and each factor is one contiguous block: the
/// shape of a Linear on per-example vectors, which the fast paths take whole.
fn single_row_factors<T: Scalar>(passes: &[Pass<T>], gi: usize, b: usize) -> Option<(&[T], &[T])> {
    let mut recs = rows_records(passes, gi);
    let (pass, x, d, 0, 0) = recs.next()? else {
        return None;
    };
    if recs.next().is_some() {
        return None;
    }
    Some((x.contiguous(pass, b)?, d.contiguous(pass, b)?))
}

/// Examples whose per-example gradients the diagonal pass squares into its f64 sums together.
const SQ_BLOCK: usize = 4;

/// acc (k×k, row-major) += mᵀ m.
fn add_gram(acc: &mut [f64], k: usize, m: MatRef<'_, f64>) {
    matmul(
        MatMut::from_row_major_slice_mut(acc, k, k),
        Accum::Add,
        m.transpose(),
        m,
        1.0,
        Par::Seq,
    );
}

/// One batch's part of one group in the layered store.
enum Part {
    /// len × (w_len + b_len) materialised gradients.
    Dense(Vec<f64>),
    /// x rows (len·T × in), Δ rows (len·T × out), T, in, out.
    Rows(Vec<f64>, Vec<f64>, usize, usize, usize),
    /// ids (len·T), Δ rows (len·T × out), T, out.
    Tokens(Vec<usize>, Vec<f64>, usize, usize),
}

impl super::ExampleGradients for GraphEngine {
    fn num_params(&self) -> usize {
        GraphEngine::num_params(self)
    }
    fn named_tensors(&self) -> Result<Vec<(String, CTensor)>> {
        GraphEngine::named_tensors(self)
    }
    fn sum_sq(
        &self,
        lik: &Likelihood,
        data: &dyn Dataset,
        opts: &FactoredOptions,
    ) -> Result<Vec<f64>> {
        let s = dispatch!(self, src => self.sum_sq_t(src, lik, data, opts))?;
        crate::error::check_finite("Fisher diagonal sums (graph engine)", &s)?;
        Ok(s)
    }
    fn per_example_gradients(
        &self,
        lik: &Likelihood,
        data: &dyn Dataset,
        start: usize,
        len: usize,
        opts: &FactoredOptions,
    ) -> Result<Mat<f64>> {
        crate::data::check_range(data.len(), start, len)?;
        let (g, _) = dispatch!(self, src => self.gradient_block(src, len, 1, opts, |s, l| {
            Batch::load(data, start + s, l)
        }, Some(lik), None, start))?;
        Ok(g)
    }
    fn layered_bytes(
        &self,
        _lik: &Likelihood,
        data: &dyn Dataset,
        route: LayerRoute,
    ) -> Result<Option<u64>> {
        Ok(Some(GraphEngine::layered_bytes(self, data.len(), route)))
    }
    fn layered_gradients(
        &self,
        lik: &Likelihood,
        data: &dyn Dataset,
        opts: &FactoredOptions,
        route: LayerRoute,
        memory_budget: u64,
    ) -> Option<Result<LayeredGradients>> {
        Some(GraphEngine::layered_gradients(
            self,
            lik,
            data,
            opts,
            route,
            memory_budget,
        ))
    }
    fn kronecker_factors(
        &self,
        lik: &Likelihood,
        data: &dyn Dataset,
        opts: &FactoredOptions,
    ) -> Option<Result<crate::engine::kfac::KfacFactors>> {
        Some(self.kfac_factors(lik, data, opts))
    }
}

impl super::gradients::QueryGradients for GraphEngine {
    fn num_params(&self) -> usize {
        GraphEngine::num_params(self)
    }
    fn num_outputs(&self, _queries: &candle_core::Tensor) -> Result<usize> {
        Ok(self.output_shape().iter().product())
    }
    /// Queries of shape (M, *input shape) or (M, elements per example); integer tensors for
    /// token inputs. With `steps` = K > 1 (input and output shapes equal) the gradients flow
    /// through every step.
    fn query_gradients(
        &self,
        qoi: &crate::qoi::Qoi,
        queries: &candle_core::Tensor,
        steps: usize,
        opts: &super::FactoredOptions,
    ) -> Result<(Mat<f64>, Vec<f64>)> {
        self.check_rollout(steps)?;
        let q = self.query_rows(queries)?;
        let m = q.dim(0)?;
        dispatch!(self, src => self.gradient_block(src, m, steps, opts, |s, l| {
            Ok(Batch::Inputs(q.narrow(0, s, l)?))
        }, None, Some(qoi), 0))
    }
    fn query_layered_gradients(
        &self,
        qoi: &crate::qoi::Qoi,
        queries: &candle_core::Tensor,
        steps: usize,
        opts: &super::FactoredOptions,
        route: super::LayerRoute,
    ) -> Option<Result<(super::LayeredGradients, Vec<f64>)>> {
        Some(GraphEngine::query_layered_gradients(
            self, qoi, queries, steps, opts, route,
        ))
    }
    /// A batch of queries per worker, every rows and tokens group factored: each worker holds
    /// its batch's layered store, never the P×M block.
    fn query_diag_forms(
        &self,
        qoi: &crate::qoi::Qoi,
        queries: &candle_core::Tensor,
        steps: usize,
        opts: &super::FactoredOptions,
        s: &[f64],
    ) -> Option<Result<(Vec<f64>, Vec<f64>)>> {
        Some(
            self.check_rollout(steps)
                .and_then(|()| self.query_rows(queries))
                .and_then(
                    |q| dispatch!(self, src => self.diag_forms_t(src, &q, qoi, steps, opts, s)),
                ),
        )
    }
}
