//! Running a graph on a batch: the forward pass over every live node, and the backward pass of
//! the summed objective Σᵢ uᵢ. Because no node mixes examples ([`super::Analysis`] checks it),
//! the batched cotangent of every batched value holds each example's own signal; where a
//! parameter-derived value without a batch axis meets the batch, the node's per-example rule
//! ([`super::per_example`]) keeps the per-example gradient — as factors (rows, tokens) for the
//! parameters held factored, materialised otherwise — and the unbatched chains from the
//! parameters (Transpose(W), Gather(wpe, arange)) carry per-example cotangents back to them.

use std::collections::HashMap;

use super::analysis::Analysis;
use super::ir::{Binary, Data, Graph, Op, Tensor, ValueId};
use super::ops::{self, Saved};
use super::per_example::{self, Record};
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
    /// Per batch size, the values that depend on neither the data nor the parameters (shape
    /// arithmetic, masks, index tensors, constant tensors expanded to the batch): computed by
    /// the first pass of that size, reused by the others.
    folded: std::sync::Mutex<HashMap<usize, Folded<T>>>,
}

/// The folded values of one batch size.
pub type Folded<T> = std::sync::Arc<HashMap<ValueId, Tensor<T>>>;

impl<T: Scalar> Sources<T> {
    /// Converts the graph's parameters and constants to `T`.
    pub fn new(g: &Graph) -> Self {
        let conv = |t: &Tensor<f64>| Tensor {
            shape: t.shape.clone(),
            data: match &t.data {
                super::ir::Data::F(v) => super::ir::Data::F(v.iter().map(|x| T::of(*x)).collect()),
                super::ir::Data::I(v) => super::ir::Data::I(v.clone()),
                super::ir::Data::B(v) => super::ir::Data::B(v.clone()),
            },
        };
        Self {
            params: g
                .params
                .iter()
                .map(|p| Tensor {
                    shape: p.shape.clone(),
                    data: super::ir::Data::F(p.data.iter().map(|x| T::of(*x)).collect()),
                })
                .collect(),
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
pub struct Pass<T> {
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

    fn add_cot(&mut self, v: ValueId, g: Vec<T>) {
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

/// What a forward pass may skip or reuse: the number of live readers of each value and which
/// nodes depend on neither the data nor the parameters (see [`super::Analysis`]).
pub struct Reuse<'a> {
    /// Live readers (input slots) of each value.
    pub uses: &'a [usize],
    /// Nodes whose outputs are folded per batch size.
    pub fold: &'a [bool],
}

/// Runs every live node (`live[k]`) on `input` (B examples along axis 0). With `reuse`, a
/// reshaping node (Reshape, Flatten, Squeeze, Unsqueeze, Identity) that is the only reader of
/// a computed value takes its elements instead of copying them (its backward needs only the
/// shape, which stays), and the nodes that depend on neither the data nor the parameters run
/// once per batch size (their outputs kept in the sources).
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
        let reshaping = matches!(
            node.op,
            Op::Reshape { .. }
                | Op::Flatten { .. }
                | Op::Squeeze { .. }
                | Op::Unsqueeze { .. }
                | Op::Identity
        );
        let movable = node.input(0).filter(|v| {
            reshaping
                && !fold.is_some_and(|f| f[k])
                && producers.get(*v).copied().flatten().is_some_and(|p| {
                    // the producer's backward must not read its output's elements
                    !output_read_by_backward(&g.nodes[p].op)
                })
                && *v != g.input
                && *v != g.output
                && uses.is_some_and(|u| u[*v] == 1)
                && pass.vals[*v].is_some()
        });
        let taken = movable.and_then(|v| {
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
            Some(t.data)
        });
        let (outs, saved) = {
            let ins: Vec<Option<&Tensor<T>>> = node
                .inputs
                .iter()
                .map(|i| i.and_then(|v| pass.value(src, v)))
                .collect();
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
            ops::forward(node, &ins)?
        };
        let outs = match taken {
            Some(data) => outs
                .into_iter()
                .next()
                .map(|o| Tensor {
                    shape: o.shape,
                    data,
                })
                .into_iter()
                .collect(),
            None => outs,
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

/// The backward pass of the objective whose output cotangent is `gout` (shaped like the
/// output): batched cotangents, per-example records at the parameters' uses, per-example
/// cotangents along the unbatched chains down to the parameters. With `to_input` the input's
/// cotangent is computed too (`cot[input]`, for rollouts).
pub fn backward<T: Scalar>(
    g: &Graph,
    an: &Analysis,
    src: &Sources<T>,
    pass: &mut Pass<T>,
    gout: Vec<T>,
    to_input: bool,
    step: usize,
) -> Result<()> {
    let ng = &an.ng[usize::from(to_input)];
    if !ng[g.output] {
        return Ok(());
    }
    pass.add_cot(g.output, gout);
    // batched nodes, in reverse
    for (k, node) in g.nodes.iter().enumerate().rev() {
        if !an.live[k] || an.chain_node[k] {
            continue;
        }
        if !node
            .outputs
            .iter()
            .any(|o| o.is_some_and(|v| pass.cot[v].is_some()))
        {
            continue;
        }
        let need: Vec<bool> = node
            .inputs
            .iter()
            .map(|i| i.is_some_and(|v| ng[v] && an.bax[v].is_some()))
            .collect();
        let boundary: Vec<usize> = node
            .inputs
            .iter()
            .enumerate()
            .filter(|(_, i)| i.is_some_and(|v| ng[v] && an.bax[v].is_none()))
            .map(|(s, _)| s)
            .collect();
        if pass_through(g, an, k, &need, &boundary, pass) {
            continue;
        }
        let grads = {
            let ins: Vec<Option<&Tensor<T>>> = node
                .inputs
                .iter()
                .map(|i| i.and_then(|v| pass.value(src, v)))
                .collect();
            let outs: Vec<Option<&Tensor<T>>> = node
                .outputs
                .iter()
                .map(|o| o.and_then(|v| pass.value(src, v)))
                .collect();
            let grefs: Vec<Option<&[T]>> = node
                .outputs
                .iter()
                .map(|o| o.and_then(|v| pass.cot[v].as_deref()))
                .collect();
            let grads = if need.iter().any(|x| *x) {
                ops::backward(node, &ins, &outs, &pass.saved[k], &grefs, &need)?
            } else {
                vec![]
            };
            let mut pe_out = vec![];
            let mut recs = vec![];
            for s in boundary {
                let rule = an.rules.get(&(k, s)).ok_or_else(|| {
                    Error::Unsupported(format!(
                        "{}: no per-example rule for its input {s}",
                        node.describe()
                    ))
                })?;
                let ctx = per_example::Ctx {
                    node,
                    k,
                    an,
                    ins: &ins,
                    outs: &outs,
                    saved: &pass.saved[k],
                    g: grefs.first().copied().flatten().unwrap_or(&[]),
                    b: pass.b,
                    step,
                };
                match per_example::apply(&ctx, s, rule)? {
                    per_example::Out::None => {}
                    per_example::Out::Pe(v) => {
                        if let Some(u) = node.input(s) {
                            pe_out.push((u, v));
                        }
                    }
                    per_example::Out::Records(r) => recs.extend(r),
                }
            }
            (grads, pe_out, recs)
        };
        let (grads, pe_out, recs) = grads;
        for (slot, gr) in grads.into_iter().enumerate() {
            if let (Some(gr), Some(v)) = (gr, node.input(slot)) {
                if need.get(slot).copied().unwrap_or(false) {
                    pass.add_cot(v, gr);
                }
            }
        }
        for (u, v) in pe_out {
            pass.add_pe(u, v);
        }
        pass.records.extend(recs);
    }
    chain_backward(g, an, src, pass)
}

/// Whether the backward (or a per-example rule) of `op` reads the elements of its own output:
/// such an output must stay in place (not be taken by a reshape that reads it).
fn output_read_by_backward(op: &Op) -> bool {
    use super::ir::Unary;
    match op {
        Op::Unary(u) => matches!(
            u,
            Unary::Sqrt | Unary::Exp | Unary::Sigmoid | Unary::Tanh | Unary::Reciprocal
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

/// For operators that pass their output cotangent on unchanged (reshapes, identities, float
/// casts, and Add/Sub to inputs of the output's shape), hands the buffer itself to the input
/// instead of copying it: the output cotangent is read by no one after its producer, and no
/// record refers to it (records keep the cotangents of MatMul/Gemm/Conv/Gather outputs).
/// Returns whether the node was handled.
fn pass_through<T: Scalar>(
    g: &Graph,
    an: &Analysis,
    k: usize,
    need: &[bool],
    boundary: &[usize],
    pass: &mut Pass<T>,
) -> bool {
    let node = &g.nodes[k];
    let reshaping = matches!(
        node.op,
        Op::Reshape { .. }
            | Op::Flatten { .. }
            | Op::Squeeze { .. }
            | Op::Unsqueeze { .. }
            | Op::Identity
            | Op::CastLike
            | Op::Cast {
                to: super::ir::ElemType::Float
            }
    );
    let additive = matches!(node.op, Op::Binary(Binary::Add) | Op::Binary(Binary::Sub));
    if !(reshaping || additive) || node.outputs.len() != 1 {
        return false;
    }
    // parameter inputs must be biases whose gradient comes from a record
    if boundary
        .iter()
        .any(|s| an.rules.get(&(k, *s)) != Some(&super::analysis::Rule::Covered))
    {
        return false;
    }
    let Some(out) = node.outputs[0] else {
        return false;
    };
    let out_shape = match pass.vals[out].as_ref() {
        Some(t) => t.shape.clone(),
        None => return false,
    };
    let shape_of = |pass: &Pass<T>, v: usize| pass.vals[v].as_ref().map(|t| t.shape.clone());
    if reshaping {
        if !need.first().copied().unwrap_or(false) {
            return false;
        }
        let (Some(v), Some(gv)) = (node.input(0), pass.cot[out].take()) else {
            return false;
        };
        pass.add_cot(v, gv);
        return true;
    }
    // Add / Sub: every needed input must be batched (a computed value) for its shape
    let slots: Vec<(usize, usize)> = node
        .inputs
        .iter()
        .enumerate()
        .filter(|(s, _)| need.get(*s).copied().unwrap_or(false))
        .filter_map(|(s, v)| v.map(|v| (s, v)))
        .collect();
    if slots.is_empty() || slots.iter().any(|(_, v)| shape_of(pass, *v).is_none()) {
        return false;
    }
    let Some(gv) = pass.cot[out].take() else {
        return false;
    };
    // inputs broadcast to the output first (they read the buffer), then the same-shaped ones,
    // the last of which takes the buffer itself
    type Slots = Vec<(usize, usize)>;
    let (same, other): (Slots, Slots) = slots
        .into_iter()
        .partition(|(_, v)| shape_of(pass, *v).as_ref() == Some(&out_shape));
    let neg = |s: usize, part: &mut Vec<T>| {
        if s == 1 && matches!(node.op, Op::Binary(Binary::Sub)) {
            part.iter_mut().for_each(|x| *x = -*x);
        }
    };
    for (s, v) in other {
        let shape = shape_of(pass, v).unwrap_or_default();
        let mut part = super::ops::util::reduce_to(&gv, &out_shape, &shape);
        neg(s, &mut part);
        pass.add_cot(v, part);
    }
    let mut owned = Some(gv);
    let n_same = same.len();
    for (i, (s, v)) in same.into_iter().enumerate() {
        let mut part = if i + 1 == n_same {
            owned.take().unwrap_or_default()
        } else {
            owned.as_deref().unwrap_or(&[]).to_vec()
        };
        neg(s, &mut part);
        pass.add_cot(v, part);
    }
    true
}

/// Per-example cotangents through the unbatched chains (nodes whose outputs carry no batch
/// axis but depend on parameters), example by example, down to the parameters.
fn chain_backward<T: Scalar>(
    g: &Graph,
    an: &Analysis,
    src: &Sources<T>,
    pass: &mut Pass<T>,
) -> Result<()> {
    let b = pass.b;
    for (k, node) in g.nodes.iter().enumerate().rev() {
        if !an.live[k] || !an.chain_node[k] {
            continue;
        }
        let pes: Vec<Option<Vec<T>>> = node
            .outputs
            .iter()
            .map(|o| o.and_then(|v| pass.pe[v].take()))
            .collect();
        if pes.iter().all(|x| x.is_none()) {
            continue;
        }
        let need: Vec<bool> = node
            .inputs
            .iter()
            .map(|i| i.is_some_and(|v| an.pd[v] && an.ng[0][v]))
            .collect();
        let mut acc: Vec<Option<Vec<T>>> = vec![None; node.inputs.len()];
        {
            let ins: Vec<Option<&Tensor<T>>> = node
                .inputs
                .iter()
                .map(|i| i.and_then(|v| pass.value(src, v)))
                .collect();
            let outs: Vec<Option<&Tensor<T>>> = node
                .outputs
                .iter()
                .map(|o| o.and_then(|v| pass.value(src, v)))
                .collect();
            let sizes: Vec<usize> = outs.iter().map(|t| t.map_or(0, |t| t.numel())).collect();
            for e in 0..b {
                let grefs: Vec<Option<&[T]>> = pes
                    .iter()
                    .zip(&sizes)
                    .map(|(p, n)| p.as_ref().map(|v| &v[e * n..(e + 1) * n]))
                    .collect();
                let grads = ops::backward(node, &ins, &outs, &pass.saved[k], &grefs, &need)?;
                for (slot, gr) in grads.into_iter().enumerate() {
                    if let Some(gr) = gr {
                        if !need[slot] {
                            continue;
                        }
                        let n = gr.len();
                        let a = acc[slot].get_or_insert_with(|| vec![T::of(0.0); n * b]);
                        a[e * n..(e + 1) * n]
                            .iter_mut()
                            .zip(&gr)
                            .for_each(|(x, y)| *x += *y);
                    }
                }
            }
        }
        for (slot, a) in acc.into_iter().enumerate() {
            if let (Some(a), Some(v)) = (a, node.input(slot)) {
                pass.add_pe(v, a);
            }
        }
    }
    Ok(())
}
