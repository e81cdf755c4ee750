//! The operators: each is a forward (batched: the batch is just another axis here) and a
//! backward (output cotangents to input cotangents), one family per file. [`forward`] and
//! [`backward`] are the only dispatch over [`Op`]; the engine never names an operator's
//! internals, and an operator never knows about examples or parameters (the per-example rules
//! live in [`crate::graph::per_example`]).

pub mod conv;
pub mod elementwise;
pub mod gather;
pub mod linalg;
pub mod norm;
pub mod reduce;
pub mod shape;
pub mod util;

use crate::error::{Error, Result};
use crate::graph::ir::{Data, ElemType, Node, Op, ReduceKind, Tensor};
use crate::scalar::Scalar;
use util::*;

/// What a forward keeps for its backward (beyond the node's inputs and outputs).
#[derive(Debug, Clone, Default)]
pub enum Saved<T> {
    /// Nothing.
    #[default]
    None,
    /// A convolution's patches, N × groups × K × L.
    Patches(Vec<T>),
    /// The input index of each output (max pooling, ReduceMax).
    Indices(Vec<usize>),
    /// An elementwise function's derivative at its input.
    Deriv(Vec<T>),
    /// A layer norm's x̂ and 1/σ per row.
    Norm {
        /// x̂.
        xh: Vec<T>,
        /// 1/σ per normalized row.
        inv: Vec<T>,
    },
}

/// The constant integer list of input `i` (axes, sizes) or the attribute's.
fn list_or<T>(
    node: &Node,
    ins: &[Option<&Tensor<T>>],
    i: usize,
    attr: &Option<Vec<i64>>,
) -> Result<Option<Vec<i64>>> {
    match int_list(node, ins, i)? {
        Some(v) => Ok(Some(v)),
        None => Ok(attr.clone()),
    }
}

/// The reduced axes and output shape of a Reduce node on input `x`.
pub fn reduce_plan<T>(
    node: &Node,
    ins: &[Option<&Tensor<T>>],
    x: &[usize],
) -> Result<(Vec<usize>, Vec<usize>)> {
    match &node.op {
        Op::Reduce {
            axes,
            keepdims,
            noop_with_empty_axes,
            ..
        } => {
            let ax = list_or(node, ins, 1, axes)?;
            reduce::reduce_axes(node, x, ax.as_deref(), *keepdims, *noop_with_empty_axes)
        }
        Op::GlobalAveragePool => {
            let ax: Vec<i64> = (2..x.len() as i64).collect();
            reduce::reduce_axes(node, x, Some(&ax), true, false)
        }
        _ => Err(Error::Unsupported(format!(
            "{} is not a reduction",
            node.describe()
        ))),
    }
}

/// The (starts, ends, axes, steps) of a Slice node.
#[allow(clippy::type_complexity)]
fn slice_args<T>(
    node: &Node,
    ins: &[Option<&Tensor<T>>],
    attrs: &Option<crate::graph::ir::SliceAttrs>,
) -> Result<(Vec<i64>, Vec<i64>, Option<Vec<i64>>, Option<Vec<i64>>)> {
    if let Some((s, e, a)) = attrs {
        return Ok((s.clone(), e.clone(), a.clone(), None));
    }
    let need = |i| {
        int_list(node, ins, i)?.ok_or_else(|| {
            Error::Unsupported(format!("{}: input {i} is required", node.describe()))
        })
    };
    Ok((
        need(1)?,
        need(2)?,
        int_list(node, ins, 3)?,
        int_list(node, ins, 4)?,
    ))
}

/// The slice plan of a Slice node on input shape `x`.
pub fn slice_of<T>(
    node: &Node,
    ins: &[Option<&Tensor<T>>],
    x: &[usize],
) -> Result<Vec<(i64, i64, usize)>> {
    let Op::Slice { attrs } = &node.op else {
        return Err(Error::Unsupported(format!(
            "{} is not a Slice",
            node.describe()
        )));
    };
    let (s, e, a, st) = slice_args(node, ins, attrs)?;
    shape::slice_plan(node, x, &s, &e, a.as_deref(), st.as_deref())
}

/// The split sizes of a Split node with `k` outputs on input shape `x` along axis `a`.
pub fn split_of<T>(
    node: &Node,
    ins: &[Option<&Tensor<T>>],
    x: &[usize],
    a: usize,
    k: usize,
) -> Result<Vec<usize>> {
    let Op::Split { split, .. } = &node.op else {
        return Err(Error::Unsupported(format!(
            "{} is not a Split",
            node.describe()
        )));
    };
    let sizes = list_or(node, ins, 1, split)?;
    shape::split_sizes(node, x, a, sizes.as_deref(), k)
}

fn one<T>(t: Tensor<T>) -> (Vec<Tensor<T>>, Saved<T>) {
    (vec![t], Saved::None)
}

/// Whether [`forward_owned`] runs `op` in the buffer of its input 0, which its backward then
/// no longer reads (a softmax, ReLU, tanh and sigmoid read their output, a GELU its kept
/// derivative).
pub fn runs_in_place(op: &Op) -> bool {
    matches!(
        op,
        Op::Softmax { .. }
            | Op::Unary(
                crate::graph::ir::Unary::Gelu { .. }
                    | crate::graph::ir::Unary::Relu
                    | crate::graph::ir::Unary::Tanh
                    | crate::graph::ir::Unary::Sigmoid
            )
    )
}

/// [`forward`] of a node for which [`runs_in_place`] holds, on its input 0 given up by the
/// caller (`x`; the other inputs in `ins`).
pub fn forward_owned<T: Scalar>(
    node: &Node,
    x: Tensor<T>,
    ins: &[Option<&Tensor<T>>],
) -> Result<(Vec<Tensor<T>>, Saved<T>)> {
    match &node.op {
        Op::Softmax { axis, log, legacy } => Ok(one(norm::softmax_forward_owned(
            node, x, *axis, *log, *legacy,
        )?)),
        Op::Unary(u) => {
            let (y, d) = elementwise::unary_forward_owned(node, *u, x)?;
            Ok((vec![y], d.map_or(Saved::None, Saved::Deriv)))
        }
        _ => {
            let mut all: Vec<Option<&Tensor<T>>> = ins.to_vec();
            if let Some(first) = all.first_mut() {
                *first = Some(&x);
            }
            forward(node, &all)
        }
    }
}

/// Runs `node` on `ins`: its outputs (in order; omitted outputs included as computed) and what
/// its backward needs.
pub fn forward<T: Scalar>(
    node: &Node,
    ins: &[Option<&Tensor<T>>],
) -> Result<(Vec<Tensor<T>>, Saved<T>)> {
    let x = |i| input(node, ins, i);
    Ok(match &node.op {
        Op::Gemm {
            alpha,
            beta,
            trans_a,
            trans_b,
        } => one(linalg::gemm_forward(
            node,
            x(0)?,
            x(1)?,
            ins.get(2).copied().flatten(),
            *alpha,
            *beta,
            *trans_a,
            *trans_b,
        )?),
        Op::MatMul => one(linalg::matmul_forward(node, x(0)?, x(1)?)?),
        Op::Conv { window, group } => {
            let (y, p) = conv::conv_forward(
                node,
                x(0)?,
                x(1)?,
                ins.get(2).copied().flatten(),
                window,
                *group,
            )?;
            (vec![y], Saved::Patches(p))
        }
        Op::MaxPool { window } => {
            let (y, arg) = conv::pool_forward(node, x(0)?, window, None)?;
            (vec![y], Saved::Indices(arg))
        }
        Op::AveragePool {
            window,
            count_include_pad,
        } => one(conv::pool_forward(node, x(0)?, window, Some(*count_include_pad))?.0),
        Op::GlobalAveragePool | Op::Reduce { .. } => {
            let kind = reduce_kind(&node.op);
            let xi = x(0)?;
            let (ax, out) = reduce_plan(node, ins, &xi.shape)?;
            let (y, arg) = reduce::reduce_forward(node, kind, xi, &ax, out)?;
            (vec![y], Saved::Indices(arg))
        }
        Op::BatchNorm { epsilon } => one(norm::batch_norm_forward(
            node,
            [x(0)?, x(1)?, x(2)?, x(3)?, x(4)?],
            *epsilon,
        )?),
        Op::LayerNorm { axis, epsilon } => {
            let (y, xh, inv) = norm::layer_norm_forward(
                node,
                x(0)?,
                ins.get(1).copied().flatten(),
                ins.get(2).copied().flatten(),
                *axis,
                *epsilon,
            )?;
            (vec![y], Saved::Norm { xh, inv })
        }
        Op::Unary(u) => {
            let (y, d) = elementwise::unary_forward(node, *u, x(0)?)?;
            (vec![y], d.map_or(Saved::None, Saved::Deriv))
        }
        Op::Binary(b) => one(elementwise::binary_forward(node, *b, x(0)?, x(1)?)?),
        Op::Logic(l) => one(elementwise::logic_forward(
            node,
            *l,
            x(0)?,
            ins.get(1).copied().flatten(),
        )?),
        Op::Where => one(elementwise::where_forward(node, x(0)?, x(1)?, x(2)?)?),
        Op::Softmax { axis, log, legacy } => {
            one(norm::softmax_forward(node, x(0)?, *axis, *log, *legacy)?)
        }
        Op::Transpose { perm } => {
            let xi = x(0)?;
            let p = shape::transpose_perm(node, xi.shape.len(), perm.as_deref())?;
            one(shape::transpose(xi, &p))
        }
        Op::Reshape { allowzero } => {
            let xi = x(0)?;
            let t = int_list(node, ins, 1)?.ok_or_else(|| {
                Error::Unsupported(format!("{}: no shape input", node.describe()))
            })?;
            let s = shape::reshape_shape(node, &xi.shape, &t, *allowzero)?;
            one(shape::reshaped(xi, s))
        }
        Op::Flatten { axis } => {
            let xi = x(0)?;
            one(shape::reshaped(
                xi,
                shape::flatten_shape(node, &xi.shape, *axis)?,
            ))
        }
        Op::Squeeze { axes } => {
            let xi = x(0)?;
            let ax = list_or(node, ins, 1, axes)?;
            one(shape::reshaped(
                xi,
                shape::squeeze_shape(node, &xi.shape, ax.as_deref())?,
            ))
        }
        Op::Unsqueeze { axes } => {
            let xi = x(0)?;
            let ax = list_or(node, ins, 1, axes)?
                .ok_or_else(|| Error::Unsupported(format!("{}: no axes", node.describe())))?;
            one(shape::reshaped(
                xi,
                shape::unsqueeze_shape(node, &xi.shape, &ax)?,
            ))
        }
        Op::Identity => one(x(0)?.clone()),
        Op::Split { axis, .. } => {
            let xi = x(0)?;
            let a = util::axis(node, *axis, xi.shape.len())?;
            let sizes = split_of(node, ins, &xi.shape, a, node.outputs.len())?;
            (shape::split(xi, a, &sizes), Saved::None)
        }
        Op::Concat { axis } => {
            let xs: Vec<&Tensor<T>> = ins.iter().flatten().copied().collect();
            one(shape::concat(node, &xs, *axis)?)
        }
        Op::Slice { .. } => {
            let xi = x(0)?;
            let plan = slice_of(node, ins, &xi.shape)?;
            let map = shape::slice_map(&xi.shape, &plan);
            one(Tensor {
                shape: plan.iter().map(|p| p.2).collect(),
                data: gather_data(&xi.data, &map),
            })
        }
        Op::Expand => {
            let xi = x(0)?;
            let t = int_list(node, ins, 1)?.ok_or_else(|| {
                Error::Unsupported(format!("{}: no shape input", node.describe()))
            })?;
            let out = shape::expand_shape(node, &xi.shape, &t)?;
            let map = shape::expand_map(&xi.shape, &out);
            one(Tensor {
                shape: out,
                data: gather_data(&xi.data, &map),
            })
        }
        Op::Gather { .. } | Op::GatherNd { .. } => {
            let d = x(0)?;
            let (s, map) = match &node.op {
                Op::Gather { axis } => gather::gather_map(node, &d.shape, x(1)?, *axis)?,
                Op::GatherNd { batch_dims } => {
                    gather::gather_nd_map(node, &d.shape, x(1)?, *batch_dims)?
                }
                _ => {
                    return Err(Error::Unsupported(format!(
                        "{} is not a gather",
                        node.describe()
                    )))
                }
            };
            one(Tensor {
                shape: s,
                data: gather_data(&d.data, &map),
            })
        }
        Op::ScatterNd { add } | Op::ScatterElements { add, .. } => {
            let (d, idx, u) = (x(0)?, x(1)?, x(2)?);
            let map = scatter_map(node, d, idx, u)?;
            let data = match (&d.data, &u.data) {
                (Data::F(dv), Data::F(uv)) => Data::F(scatter(dv, uv, &map, *add)),
                (Data::I(dv), Data::I(uv)) => Data::I(scatter(dv, uv, &map, *add)),
                _ => {
                    return Err(Error::Unsupported(format!(
                        "{}: data and updates of different or boolean types",
                        node.describe()
                    )))
                }
            };
            one(Tensor {
                shape: d.shape.clone(),
                data,
            })
        }
        Op::Shape { start, end } => {
            let s = &x(0)?.shape;
            let r = s.len() as i64;
            let clamp = |v: i64| (if v < 0 { v + r } else { v }).clamp(0, r) as usize;
            let (a, b) = (clamp(*start), clamp(end.unwrap_or(r)));
            let v: Vec<i64> = s[a..b.max(a)].iter().map(|d| *d as i64).collect();
            one(Tensor {
                shape: vec![v.len()],
                data: Data::I(v),
            })
        }
        Op::Size => one(Tensor {
            shape: vec![],
            data: Data::I(vec![x(0)?.numel() as i64]),
        }),
        Op::Range => one(shape::range(node, x(0)?, x(1)?, x(2)?)?),
        Op::Trilu { upper } => {
            let k = match ins.get(1).copied().flatten() {
                Some(t) => shape::scalar_of(node, t, "k")? as i64,
                None => 0,
            };
            one(shape::trilu(node, x(0)?, k, *upper)?)
        }
        Op::ConstantOfShape { value } => {
            let s = int_list(node, ins, 0)?.ok_or_else(|| {
                Error::Unsupported(format!("{}: no shape input", node.describe()))
            })?;
            let s = shape::shape_from(node, &s)?;
            let n: usize = s.iter().product();
            let data = match &value.data {
                Data::F(v) => Data::F(vec![T::of(v[0]); n]),
                Data::I(v) => Data::I(vec![v[0]; n]),
                Data::B(v) => Data::B(vec![v[0]; n]),
            };
            one(Tensor { shape: s, data })
        }
        Op::Cast { to } => one(elementwise::cast(node, x(0)?, *to)?),
        Op::CastLike => {
            let to = x(1)?.elem_type();
            one(elementwise::cast(node, x(0)?, to)?)
        }
    })
}

/// The target offsets of a scatter node's updates.
pub fn scatter_map<T>(
    node: &Node,
    d: &Tensor<T>,
    idx: &Tensor<T>,
    u: &Tensor<T>,
) -> Result<Vec<usize>> {
    match &node.op {
        Op::ScatterNd { .. } => gather::scatter_nd_map(node, &d.shape, idx, &u.shape),
        Op::ScatterElements { axis, .. } => {
            gather::scatter_elements_map(node, &d.shape, idx, &u.shape, *axis)
        }
        _ => Err(Error::Unsupported(format!(
            "{} is not a scatter",
            node.describe()
        ))),
    }
}

/// Writes an op's input cotangents into the result, as many as the node has inputs (an
/// optional trailing input such as a bias may be absent).
fn put<T, const K: usize>(res: &mut [Option<Vec<T>>], cotangents: [Option<Vec<T>>; K]) {
    for (slot, c) in res.iter_mut().zip(cotangents) {
        *slot = c;
    }
}

/// The input cotangents of `node` (for the inputs flagged in `need`) from its output
/// cotangents `g` (`None`: the output does not reach the objective).
pub fn backward<T: Scalar>(
    node: &Node,
    ins: &[Option<&Tensor<T>>],
    outs: &[Option<&Tensor<T>>],
    saved: &Saved<T>,
    g: &[Option<&[T]>],
    need: &[bool],
) -> Result<Vec<Option<Vec<T>>>> {
    let nin = ins.len();
    let mut res: Vec<Option<Vec<T>>> = vec![None; nin];
    let needs = |i: usize| need.get(i).copied().unwrap_or(false);
    let x = |i| input(node, ins, i);
    let out0 = || {
        outs.first()
            .copied()
            .flatten()
            .ok_or_else(|| not_kept(node, "output"))
    };
    let unsupported = |i: usize| {
        Err(Error::Unsupported(format!(
            "{}: no gradient flows through its input {i}; a parameter or the data may reach the output only through differentiable inputs",
            node.describe()
        )))
    };
    // every op but Split and Concat has one differentiable output
    let g0 = match g.first().copied().flatten() {
        Some(g0) => g0,
        None if matches!(node.op, Op::Split { .. }) => &[],
        None => return Ok(res),
    };
    match &node.op {
        Op::Gemm {
            alpha,
            beta,
            trans_a,
            trans_b,
        } => {
            let [a, b, c] = linalg::gemm_backward(
                node,
                x(0)?,
                x(1)?,
                ins.get(2).copied().flatten(),
                (*alpha, *beta, *trans_a, *trans_b),
                g0,
                [needs(0), needs(1), needs(2)],
            )?;
            put(&mut res, [a, b, c]);
        }
        Op::MatMul => {
            let (a, b) = linalg::matmul_backward(node, x(0)?, x(1)?, g0, (needs(0), needs(1)))?;
            res[0] = a;
            res[1] = b;
        }
        Op::Conv { window, group } => {
            let Saved::Patches(p) = saved else {
                return Err(not_kept(node, "patches"));
            };
            let [a, b, c] = conv::conv_backward(
                node,
                x(0)?,
                x(1)?,
                window,
                *group,
                p,
                g0,
                [needs(0), needs(1), needs(2)],
            )?;
            put(&mut res, [a, b, c]);
        }
        Op::MaxPool { window } => {
            let Saved::Indices(arg) = saved else {
                return Err(not_kept(node, "indices"));
            };
            res[0] = Some(conv::pool_backward(node, x(0)?, window, None, arg, g0)?);
        }
        Op::AveragePool {
            window,
            count_include_pad,
        } => {
            res[0] = Some(conv::pool_backward(
                node,
                x(0)?,
                window,
                Some(*count_include_pad),
                &[],
                g0,
            )?);
        }
        Op::GlobalAveragePool | Op::Reduce { .. } => {
            let kind = reduce_kind(&node.op);
            let xi = x(0)?;
            let (ax, _) = reduce_plan(node, ins, &xi.shape)?;
            let arg: &[usize] = match saved {
                Saved::Indices(a) => a,
                _ => &[],
            };
            res[0] = Some(reduce::reduce_backward(kind, &xi.shape, &ax, arg, g0));
        }
        Op::BatchNorm { epsilon } => {
            if needs(3) || needs(4) {
                return unsupported(if needs(3) { 3 } else { 4 });
            }
            let [a, b, c] = norm::batch_norm_backward(
                node,
                [x(0)?, x(1)?, x(2)?, x(3)?, x(4)?],
                *epsilon,
                g0,
                [needs(0), needs(1), needs(2)],
            )?;
            res[0] = a;
            res[1] = b;
            res[2] = c;
        }
        Op::LayerNorm { axis, .. } => {
            let Saved::Norm { xh, inv } = saved else {
                return Err(not_kept(node, "x̂"));
            };
            let [a, b, c] = norm::layer_norm_backward(
                node,
                x(0)?,
                ins.get(1).copied().flatten(),
                ins.get(2).copied().flatten(),
                *axis,
                xh,
                inv,
                g0,
                [needs(0), needs(1), needs(2)],
            )?;
            put(&mut res, [a, b, c]);
        }
        Op::Unary(u) => {
            let d = match saved {
                Saved::Deriv(d) => Some(d.as_slice()),
                _ => None,
            };
            res[0] = Some(elementwise::unary_backward(
                node,
                *u,
                x(0)?,
                out0()?,
                d,
                g0,
            )?);
        }
        Op::Binary(b) => {
            // each input's cotangent summed back to its shape
            let (xa, xb, y) = (x(0)?, x(1)?, out0()?);
            for (i, xi) in [xa, xb].into_iter().enumerate() {
                if needs(i) {
                    let full = elementwise::binary_contribution(node, *b, xa, xb, y, g0, i)?;
                    res[i] = Some(util::reduce_owned(full, &y.shape, &xi.shape));
                }
            }
        }
        Op::Where => {
            let out = &out0()?.shape;
            let c = x(0)?;
            for i in [1, 2] {
                if needs(i) {
                    let full = elementwise::where_contribution(node, c, g0, out, i)?;
                    res[i] = Some(reduce_owned(full, out, &x(i)?.shape));
                }
            }
        }
        Op::Softmax { axis, log, legacy } => {
            res[0] = Some(norm::softmax_backward(
                node,
                out0()?,
                *axis,
                *log,
                *legacy,
                g0,
            )?);
        }
        Op::Transpose { perm } => {
            let xi = x(0)?;
            let p = shape::transpose_perm(node, xi.shape.len(), perm.as_deref())?;
            let out_shape: Vec<usize> = p.iter().map(|a| xi.shape[*a]).collect();
            res[0] = Some(permute(g0, &out_shape, &shape::inverse_perm(&p)));
        }
        Op::Reshape { .. }
        | Op::Flatten { .. }
        | Op::Squeeze { .. }
        | Op::Unsqueeze { .. }
        | Op::Identity => {
            res[0] = Some(g0.to_vec());
        }
        Op::Cast {
            to: ElemType::Float,
        } => {
            res[0] = Some(g0.to_vec());
        }
        Op::CastLike => {
            res[0] = Some(g0.to_vec());
        }
        Op::Split { axis, .. } => {
            let xi = x(0)?;
            let a = util::axis(node, *axis, xi.shape.len())?;
            let sizes = split_of(node, ins, &xi.shape, a, node.outputs.len())?;
            let shapes: Vec<Vec<usize>> = sizes
                .iter()
                .map(|s| {
                    let mut v = xi.shape.clone();
                    v[a] = *s;
                    v
                })
                .collect();
            // the outputs' cotangents side by side along the axis (zeros for an unused one)
            let outer: usize = xi.shape[..a].iter().product();
            let inner: usize = xi.shape[a + 1..].iter().product();
            let mut dx = Vec::with_capacity(xi.numel());
            for o in 0..outer {
                for (k, s) in shapes.iter().enumerate() {
                    let w = s[a] * inner;
                    match g.get(k).copied().flatten() {
                        Some(gk) => dx.extend_from_slice(&gk[o * w..(o + 1) * w]),
                        None => dx.extend(std::iter::repeat_n(T::of(0.0), w)),
                    }
                }
            }
            res[0] = Some(dx);
        }
        Op::Concat { axis } => {
            let xs: Vec<&Tensor<T>> = ins.iter().flatten().copied().collect();
            let r = xs.first().map(|t| t.shape.len()).unwrap_or(0);
            let a = util::axis(node, *axis, r)?;
            let shapes: Vec<Vec<usize>> = xs.iter().map(|t| t.shape.clone()).collect();
            let parts = shape::concat_backward(g0, &shapes, a);
            // inputs may be omitted (None) in the node's list: map back by position
            let mut k = 0;
            for (i, slot) in ins.iter().enumerate() {
                if slot.is_some() {
                    if needs(i) {
                        res[i] = Some(parts[k].clone());
                    }
                    k += 1;
                }
            }
        }
        Op::Slice { .. } => {
            let xi = x(0)?;
            let plan = slice_of(node, ins, &xi.shape)?;
            let map = shape::slice_map(&xi.shape, &plan);
            res[0] = Some(scatter_add(g0, &map, xi.numel()));
        }
        Op::Expand => {
            let xi = x(0)?;
            res[0] = Some(reduce_to(g0, &out0()?.shape, &xi.shape));
        }
        Op::Gather { axis } => {
            if needs(1) {
                return unsupported(1);
            }
            let d = x(0)?;
            let (_, map) = gather::gather_map(node, &d.shape, x(1)?, *axis)?;
            res[0] = Some(scatter_add(g0, &map, d.numel()));
        }
        Op::GatherNd { batch_dims } => {
            if needs(1) {
                return unsupported(1);
            }
            let d = x(0)?;
            let (_, map) = gather::gather_nd_map(node, &d.shape, x(1)?, *batch_dims)?;
            res[0] = Some(scatter_add(g0, &map, d.numel()));
        }
        Op::ScatterNd { add } | Op::ScatterElements { add, .. } => {
            if needs(1) {
                return unsupported(1);
            }
            let (d, idx, u) = (x(0)?, x(1)?, x(2)?);
            let map = scatter_map(node, d, idx, u)?;
            if needs(0) {
                let mut gd = g0.to_vec();
                if !*add {
                    for t in &map {
                        gd[*t] = T::of(0.0);
                    }
                }
                res[0] = Some(gd);
            }
            if needs(2) {
                res[2] = Some(map.iter().map(|t| g0[*t]).collect());
            }
        }
        Op::Trilu { upper } => {
            let xi = x(0)?;
            let k = match ins.get(1).copied().flatten() {
                Some(t) => shape::scalar_of(node, t, "k")? as i64,
                None => 0,
            };
            let mask = shape::trilu_mask(&xi.shape, k, *upper);
            res[0] = Some(
                g0.iter()
                    .zip(&mask)
                    .map(|(v, m)| if *m { *v } else { T::of(0.0) })
                    .collect(),
            );
        }
        _ => {
            if let Some(i) = (0..nin).find(|i| needs(*i)) {
                return unsupported(i);
            }
        }
    }
    if let Some(i) = (0..nin).find(|i| needs(*i) && res[*i].is_none()) {
        return unsupported(i);
    }
    Ok(res)
}

/// `data` with `updates[k]` written (or added, `add`) at `map[k]`.
fn scatter<V: Copy + std::ops::AddAssign>(
    data: &[V],
    updates: &[V],
    map: &[usize],
    add: bool,
) -> Vec<V> {
    let mut o = data.to_vec();
    for (t, u) in map.iter().zip(updates) {
        if add {
            o[*t] += *u;
        } else {
            o[*t] = *u;
        }
    }
    o
}

/// The error of a backward rule whose forward value is gone.
pub(crate) fn not_kept(node: &Node, what: &str) -> Error {
    Error::Unsupported(format!(
        "{}: its {what} was not kept for the backward pass",
        node.describe()
    ))
}

/// The reduction of a Reduce node (a global average pool is a mean).
fn reduce_kind(op: &Op) -> ReduceKind {
    match op {
        Op::Reduce { kind, .. } => *kind,
        _ => ReduceKind::Mean,
    }
}
