//! The backward pass of the summed objective Σᵢ uᵢ over a batch run by [`super::exec`]. Because
//! no node mixes examples ([`super::Analysis`] checks it), the batched cotangent of every batched
//! value holds each example's own signal; where a parameter-derived value without a batch axis
//! meets the batch, the node's per-example rule ([`super::per_example`]) keeps the per-example
//! gradient — as factors (rows, tokens) for the parameters held factored, materialised otherwise
//! — and the unbatched chains from the parameters (Transpose(W), Gather(wpe, arange)) carry
//! per-example cotangents back to them.

use super::analysis::Analysis;
use super::exec::{Pass, Sources};
use super::ir::{Binary, Graph, Op};
use super::ops;
use super::per_example;
use crate::error::{Error, Result};
use crate::scalar::Scalar;

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
        if pass_through(g, an, k, &need, &boundary, pass)
            || unary_in_place(g, k, &need, &boundary, src, pass)?
        {
            continue;
        }
        let grads = {
            let (ins, outs) = (
                pass.values(src, &node.inputs),
                pass.values(src, &node.outputs),
            );
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
    let reshaping = node.op.is_reshape()
        || matches!(
            node.op,
            Op::CastLike
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

/// A unary node (ReLU, tanh, …) whose input needs its cotangent takes the output's cotangent
/// buffer, read by no one after its producer (as in [`pass_through`]), scales it by f' in
/// place and hands it on: no new buffer per node and batch. Returns whether it was handled.
fn unary_in_place<T: Scalar>(
    g: &Graph,
    k: usize,
    need: &[bool],
    boundary: &[usize],
    src: &Sources<T>,
    pass: &mut Pass<T>,
) -> Result<bool> {
    let node = &g.nodes[k];
    let (Op::Unary(u), [Some(out)], [Some(v)], [true], []) = (
        &node.op,
        node.outputs.as_slice(),
        node.inputs.as_slice(),
        need,
        boundary,
    ) else {
        return Ok(false);
    };
    let Some(mut gv) = pass.cot[*out].take() else {
        return Ok(false);
    };
    let d = match &pass.saved[k] {
        ops::Saved::Deriv(d) => Some(d.as_slice()),
        _ => None,
    };
    let (Some(x), Some(y)) = (pass.value(src, *v), pass.value(src, *out)) else {
        return Err(Error::Unsupported(format!(
            "{}: its input or output was not kept for the backward pass",
            node.describe()
        )));
    };
    ops::elementwise::unary_backward_in_place(node, *u, x, y, d, &mut gv)?;
    pass.add_cot(*v, gv);
    Ok(true)
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
            let (ins, outs) = (
                pass.values(src, &node.inputs),
                pass.values(src, &node.outputs),
            );
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
