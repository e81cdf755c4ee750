//! Running a graph on a batch: the sources (parameters and constants in the run's precision) and
//! the forward pass over every live node, keeping what the backward pass ([`super::backward`])
//! reads.

use std::collections::HashMap;

use super::ir::{Binary, Data, Graph, Op, Tensor, ValueId};
use super::ops::{self, Saved};
use super::records::Record;
use crate::error::{Error, Result};
use crate::scalar::Scalar;

/// The values a pass reads without computing them: parameters and constants, in the run's
/// precision.
pub struct Sources<T> {
    /// Parameter tensors, in the graph's parameter order.
    pub params: Vec<Tensor<T>>,
    /// Constants by value.
    pub consts: HashMap<ValueId, Tensor<T>>,
    /// Parameter index by value.
    pub param_at: HashMap<ValueId, usize>,
    /// Per batch size, the values that do not depend on the data (shape arithmetic, masks,
    /// index tensors, constant tensors expanded to the batch, and transforms of the parameters
    /// such as a Linear's Transpose(W), which stay fixed for the sources' life): computed by
    /// the first pass of that size, reused by the others.
    folded: std::sync::Mutex<HashMap<usize, Folded<T>>>,
}

/// The folded values of one batch size.
pub type Folded<T> = std::sync::Arc<HashMap<ValueId, Tensor<T>>>;

/// A parameter's values in `T`, and whether they give the f64 values back exactly.
fn param_in<T: Scalar>(p: &super::ir::Param) -> (Tensor<T>, bool) {
    let v: Vec<T> = p.data.iter().map(|x| T::of(*x)).collect();
    let exact = v.iter().zip(&p.data).all(|(a, b)| a.f64() == *b);
    let t = Tensor {
        shape: p.shape.clone(),
        data: super::ir::Data::F(v),
    };
    (t, exact)
}

impl<T: Scalar> Sources<T> {
    /// Converts the graph's parameters and constants to `T`.
    pub fn new(g: &Graph) -> Self {
        let params = g.params.iter().map(|p| param_in::<T>(p).0).collect();
        Self::with_params(g, params)
    }

    /// [`Sources::new`], freeing each parameter's f64 values in the graph as soon as its copy
    /// in `T` gives them back exactly: the weights end up held once, in the run's precision, and
    /// the two copies never coexist whole (peak 8P bytes, not 8P + 4P, for an f32 run).
    pub fn take(g: &mut Graph) -> Self {
        let params = g
            .params
            .iter_mut()
            .map(|p| {
                let (t, exact) = param_in::<T>(p);
                if exact {
                    p.data = Vec::new();
                }
                t
            })
            .collect();
        Self::with_params(g, params)
    }

    fn with_params(g: &Graph, params: Vec<Tensor<T>>) -> Self {
        let conv = |t: &Tensor<f64>| Tensor {
            shape: t.shape.clone(),
            data: match &t.data {
                super::ir::Data::F(v) => super::ir::Data::F(v.iter().map(|x| T::of(*x)).collect()),
                super::ir::Data::I(v) => super::ir::Data::I(v.clone()),
                super::ir::Data::B(v) => super::ir::Data::B(v.clone()),
            },
        };
        Self {
            params,
            consts: g.consts.iter().map(|(k, v)| (*k, conv(v))).collect(),
            param_at: g
                .params
                .iter()
                .enumerate()
                .map(|(i, p)| (p.value, i))
                .collect(),
            folded: std::sync::Mutex::new(HashMap::new()),
        }
    }

    fn folded_for(&self, b: usize) -> Option<Folded<T>> {
        self.folded.lock().ok()?.get(&b).cloned()
    }

    fn store_folded(&self, b: usize, f: Folded<T>) {
        if let Ok(mut m) = self.folded.lock() {
            // a handful of batch sizes per run (full, last, queries); bounded all the same
            if m.len() < 64 {
                m.entry(b).or_insert(f);
            }
        }
    }
}

/// One batch's pass: values, what the backward keeps, cotangents and per-example records.
pub struct Pass<T: Scalar> {
    /// Examples in the batch.
    pub b: usize,
    /// Node outputs and the input, by value.
    pub vals: Vec<Option<Tensor<T>>>,
    /// Per node.
    pub saved: Vec<Saved<T>>,
    /// Cotangents of batched values.
    pub cot: Vec<Option<Vec<T>>>,
    /// Per-example cotangents (B × elements) of unbatched parameter-derived values; at a
    /// parameter: its per-example gradients (materialised parameters).
    pub pe: Vec<Option<Vec<T>>>,
    /// Factored per-example gradients recorded at the parameters' uses.
    pub records: Vec<Record<T>>,
    /// The values folded for this batch size (see [`Sources`]).
    folded: Option<Folded<T>>,
}

impl<T: Scalar> Pass<T> {
    /// The value `v` (computed, parameter, constant).
    pub fn value<'a>(&'a self, src: &'a Sources<T>, v: ValueId) -> Option<&'a Tensor<T>> {
        if let Some(Some(t)) = self.vals.get(v) {
            return Some(t);
        }
        if let Some(t) = self.folded.as_ref().and_then(|f| f.get(&v)) {
            return Some(t);
        }
        if let Some(p) = src.param_at.get(&v) {
            return src.params.get(*p);
        }
        src.consts.get(&v)
    }

    /// The values of `ids` (a node's inputs or outputs; `None` where absent or not held).
    pub(crate) fn values<'a>(
        &'a self,
        src: &'a Sources<T>,
        ids: &[Option<ValueId>],
    ) -> Vec<Option<&'a Tensor<T>>> {
        ids.iter()
            .map(|i| i.and_then(|v| self.value(src, v)))
            .collect()
    }

    pub(crate) fn add_cot(&mut self, v: ValueId, g: Vec<T>) {
        match &mut self.cot[v] {
            Some(acc) => acc.iter_mut().zip(&g).for_each(|(a, x)| *a += *x),
            slot => *slot = Some(g),
        }
    }

    /// Adds per-example cotangents into `pe[v]`.
    pub fn add_pe(&mut self, v: ValueId, g: Vec<T>) {
        match &mut self.pe[v] {
            Some(acc) => acc.iter_mut().zip(&g).for_each(|(a, x)| *a += *x),
            slot => *slot = Some(g),
        }
    }
}

impl<T: Scalar> Drop for Pass<T> {
    /// Hands the pass's float buffers to this thread's pool for the next batch
    /// ([`crate::scalar::pool`]).
    fn drop(&mut self) {
        use super::records::{Record, Src};
        use crate::scalar::pool::recycle;
        crate::scalar::pool::turn::<T>();
        for t in self.vals.drain(..).flatten() {
            if let Data::F(v) = t.data {
                recycle(v);
            }
        }
        for s in self.saved.drain(..) {
            match s {
                Saved::Patches(v) | Saved::Deriv(v) => recycle(v),
                Saved::Norm { xh, inv } => {
                    recycle(xh);
                    recycle(inv);
                }
                Saved::None | Saved::Indices(_) => {}
            }
        }
        for v in self.cot.drain(..).chain(self.pe.drain(..)).flatten() {
            recycle(v);
        }
        for r in self.records.drain(..) {
            match r {
                Record::Rows { x, d, .. } => {
                    for s in [x.src, d.src] {
                        if let Src::Owned(v) = s {
                            recycle(v);
                        }
                    }
                }
                Record::Tokens { d, .. } => {
                    if let Src::Owned(v) = d.src {
                        recycle(v);
                    }
                }
            }
        }
    }
}

/// What a forward pass may skip or reuse: the number of live readers of each value and which
/// nodes do not depend on the data (see [`super::Analysis`]).
pub struct Reuse<'a> {
    /// Live readers (input slots) of each value.
    pub uses: &'a [usize],
    /// Nodes whose outputs are folded per batch size.
    pub fold: &'a [bool],
}

/// Runs every live node (`live[k]`) on `input` (B examples along axis 0). With `reuse`, a node
/// that is the only reader of a computed value takes its buffer instead of allocating one: a
/// reshaping node (Reshape, Flatten, Squeeze, Unsqueeze, Identity) keeps its elements, a
/// softmax, GELU, ReLU, tanh or sigmoid runs in its input's buffer, an Add or Sub whose operand
/// has the output's shape updates it in place (their backward passes and per-example rules need
/// only the shapes, which stay); and the nodes that do not depend on the data run once per batch
/// size (their outputs kept in the sources). Float buffers come from, and go back to, the
/// thread's pool ([`crate::scalar::pool`]).
pub fn forward<T: Scalar>(
    g: &Graph,
    live: &[bool],
    reuse: Option<&Reuse<'_>>,
    src: &Sources<T>,
    input: Tensor<T>,
) -> Result<Pass<T>> {
    let uses = reuse.map(|r| r.uses);
    let b = input.shape.first().copied().unwrap_or(0);
    let nv = g.values.len();
    let mut pass = Pass {
        b,
        vals: (0..nv).map(|_| None).collect(),
        saved: (0..g.nodes.len()).map(|_| Saved::None).collect(),
        cot: vec![None; nv],
        pe: vec![None; nv],
        records: vec![],
        folded: None,
    };
    let fold = reuse.map(|r| r.fold);
    let producers: Vec<Option<usize>> = if uses.is_some() {
        let mut p = vec![None; nv];
        for (k, n) in g.nodes.iter().enumerate() {
            for o in n.outputs.iter().flatten() {
                p[*o] = Some(k);
            }
        }
        p
    } else {
        vec![]
    };
    pass.folded = fold.and_then(|_| src.folded_for(b));
    let have_folded = pass.folded.is_some();
    pass.vals[g.input] = Some(input);
    for (k, node) in g.nodes.iter().enumerate() {
        if !live[k] {
            continue;
        }
        if have_folded && fold.is_some_and(|f| f[k]) {
            continue;
        }
        let reshaping = node.op.is_reshape();
        let additive = matches!(node.op, Op::Binary(Binary::Add | Binary::Sub));
        // a computed value read by this node alone, whose producer's backward does not read it
        let movable = |pass: &Pass<T>, v: ValueId| {
            !fold.is_some_and(|f| f[k])
                && producers.get(v).copied().flatten().is_some_and(|p| {
                    // the producer's backward must not read its output's elements, and a
                    // folded output is kept for the next passes
                    !output_read_by_backward(&g.nodes[p].op) && !fold.is_some_and(|f| f[p])
                })
                && v != g.input
                && v != g.output
                && uses.is_some_and(|u| u[v] == 1)
                && pass.vals[v].is_some()
        };
        // the slot whose buffer this node takes: a reshape's input (its backward needs only
        // the shape), a softmax's or GELU's input (their backward reads the output or the kept
        // derivative), or an Add/Sub operand of the output's shape (their backward and
        // per-example rules read shapes and the cotangent only), updated in place
        let take_slot = if reshaping || ops::runs_in_place(&node.op) {
            node.input(0).filter(|v| movable(&pass, *v)).map(|_| 0)
        } else if additive && node.inputs.len() == 2 {
            // Add takes either operand, Sub its minuend; the shapes are read only for a
            // candidate
            let slots: &[usize] = if matches!(node.op, Op::Binary(Binary::Add)) {
                &[0, 1]
            } else {
                &[0]
            };
            let shape_of = |s: usize| {
                node.input(s)
                    .and_then(|v| pass.value(src, v))
                    .filter(|t| t.floats().is_some())
                    .map(|t| t.shape.as_slice())
            };
            slots.iter().copied().find(|&s| {
                node.input(s).is_some_and(|v| movable(&pass, v))
                    && match (shape_of(0), shape_of(1)) {
                        (Some(a), Some(b)) => ops::util::broadcast(node, a, b)
                            .is_ok_and(|out| out.as_slice() == if s == 0 { a } else { b }),
                        _ => false,
                    }
            })
        } else {
            None
        };
        let taken = take_slot.and_then(|slot| {
            let v = node.input(slot)?;
            let t = pass.vals[v].take()?;
            // a placeholder that keeps the shape (and element type) for the backward pass
            let empty = match &t.data {
                Data::F(_) => Data::F(vec![]),
                Data::I(_) => Data::I(vec![]),
                Data::B(_) => Data::B(vec![]),
            };
            pass.vals[v] = Some(Tensor {
                shape: t.shape.clone(),
                data: empty,
            });
            Some((slot, t))
        });
        let (outs, saved) = {
            let ins = pass.values(src, &node.inputs);
            if let Some((slot, _)) = node
                .inputs
                .iter()
                .enumerate()
                .find(|(s, i)| i.is_some() && ins[*s].is_none())
            {
                return Err(Error::Unsupported(format!(
                    "{}: input {slot} was not computed",
                    node.describe()
                )));
            }
            match (taken, &node.op) {
                (Some((slot, t)), Op::Binary(op)) => {
                    let other = ops::util::input(node, &ins, 1 - slot)?;
                    let y = ops::elementwise::binary_in_place(node, *op, t, slot, other)?;
                    (vec![y], Saved::None)
                }
                (Some((_, t)), op) if ops::runs_in_place(op) => ops::forward_owned(node, t, &ins)?,
                (Some((_, t)), _) => {
                    // a reshape: its output's shape, the taken elements
                    let (outs, saved) = ops::forward(node, &ins)?;
                    let outs = outs
                        .into_iter()
                        .next()
                        .map(|o| Tensor {
                            shape: o.shape,
                            data: t.data,
                        })
                        .into_iter()
                        .collect();
                    (outs, saved)
                }
                (None, _) => ops::forward(node, &ins)?,
            }
        };
        pass.saved[k] = saved;
        for (o, t) in node.outputs.iter().zip(outs) {
            if let Some(o) = o {
                pass.vals[*o] = Some(t);
            }
        }
    }
    if let (Some(f), false) = (fold, have_folded) {
        let mut kept = HashMap::new();
        for (k, node) in g.nodes.iter().enumerate() {
            if live[k] && f[k] {
                for o in node.outputs.iter().flatten() {
                    if let Some(t) = pass.vals[*o].take() {
                        kept.insert(*o, t);
                    }
                }
            }
        }
        let kept = std::sync::Arc::new(kept);
        src.store_folded(b, kept.clone());
        pass.folded = Some(kept);
    }
    Ok(pass)
}

/// Whether the backward (or a per-example rule) of `op` reads the elements of its own output:
/// such an output must stay in place (not be taken by a reshape that reads it).
pub fn output_read_by_backward(op: &Op) -> bool {
    use super::ir::Unary;
    match op {
        Op::Unary(u) => matches!(
            u,
            Unary::Sqrt
                | Unary::Exp
                | Unary::Sigmoid
                | Unary::Tanh
                | Unary::Reciprocal
                | Unary::Relu
        ),
        Op::Binary(b) => matches!(b, Binary::Div | Binary::Pow),
        Op::Softmax { .. } => true,
        Op::Gemm { .. }
        | Op::MatMul
        | Op::Conv { .. }
        | Op::MaxPool { .. }
        | Op::AveragePool { .. }
        | Op::GlobalAveragePool
        | Op::BatchNorm { .. }
        | Op::LayerNorm { .. }
        | Op::Logic(_)
        | Op::Where
        | Op::Reduce { .. }
        | Op::Transpose { .. }
        | Op::Reshape { .. }
        | Op::Flatten { .. }
        | Op::Squeeze { .. }
        | Op::Unsqueeze { .. }
        | Op::Split { .. }
        | Op::Concat { .. }
        | Op::Slice { .. }
        | Op::Expand
        | Op::Gather { .. }
        | Op::GatherNd { .. }
        | Op::ScatterNd { .. }
        | Op::ScatterElements { .. }
        | Op::Identity
        | Op::Cast { .. }
        | Op::CastLike => false,
        _ => true,
    }
}
