//! What a graph does with its batch and its parameters, decided once per graph and input shape:
//!
//! - **Batch axes.** The graph is run on zeros at batch sizes 2 and 3; a value whose shape
//!   differs in exactly one axis (2 against 3) has its batch axis there, a value whose shape does
//!   not change has none. A value that depends on the data but has no batch axis, or whose
//!   shape changes otherwise (the batch merged into another axis), mixes examples: an error
//!   naming the node. Operators that act along an axis check it is not the batch axis (softmax,
//!   normalization, convolution channels, matmul contraction, gather axes).
//! - **Dependence.** Which values depend on the data (through anything but Shape/Size) and
//!   which on the parameters; which need a cotangent for the parameters (and for the input, in
//!   rollouts).
//! - **Parameter uses.** Each parameter is held one way: *rows* when every use is a
//!   MatMul/Gemm/Conv reading it (or its transpose) as an out×in weight — the per-example gradient
//!   is then Σₜ δₜ x̃ₜᵀ over the use's rows (a bias added right after pairs as x̃ = [x; 1]);
//!   *tokens* when every use is a Gather of its rows by batched ids (an embedding); *dense*
//!   otherwise (per-example gradients materialised: norms, biases, tied weights, anything read
//!   through other operators).

use std::collections::HashMap;

use super::exec::{self, Sources};
use super::ir::{Data, ElemType, Graph, Op, Tensor};
use super::ops::util::axis as norm_axis;
use crate::error::{Error, Result};
use crate::scalar::Scalar;

/// How a rows use reads its weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowsKind {
    /// x·Wᵀ (MatMul with the weight's transpose on the right): rows of x.
    MatRight,
    /// W·x (MatMul with the weight on the left): columns of x.
    MatLeft,
    /// Gemm with the out×in weight as B (transB, or B = Wᵀ).
    Gemm,
    /// Convolution: patches.
    Conv,
}

/// A parameter group of the per-example gradients (one layer of [`crate::engine::LayeredGradients`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Group {
    /// g = Σₜ δₜ x̃ₜᵀ over `t` rows per example (weight rows `g·out .. (g+1)·out` of a grouped
    /// convolution's weight).
    Rows {
        /// The weight parameter.
        param: usize,
        /// The group (convolutions with groups > 1), else 0.
        group: usize,
        /// Input width (conv: Cin/groups · kernel).
        k: usize,
        /// Outputs of this group.
        out: usize,
        /// Rows per example, over all uses.
        t: usize,
        /// The paired bias parameter.
        bias: Option<usize>,
    },
    /// An embedding: rows of the table scattered by id.
    Tokens {
        /// The table parameter.
        param: usize,
        /// Rows of the table.
        vocab: usize,
        /// Width of a row.
        out: usize,
        /// Ids per example, over all uses.
        t: usize,
    },
    /// Per-example gradients materialised.
    Dense {
        /// The parameter.
        param: usize,
    },
}

/// What the backward pass does where a parameter-derived value without a batch axis meets
/// the batch (keyed by node and input slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    /// Record rows for group `group` (the first of `groups` for a grouped convolution), at row
    /// `row` of each example's `t` rows.
    Rows {
        /// First group index.
        group: usize,
        /// Groups.
        groups: usize,
        /// Row offset of this use.
        row: usize,
        /// How the weight is read.
        kind: RowsKind,
    },
    /// Record ids and signal rows for an embedding group.
    Tokens {
        /// Group index.
        group: usize,
        /// Row offset of this use.
        row: usize,
    },
    /// A bias paired with a rows group (its gradient comes from the recorded signals).
    Covered,
    /// Materialise the per-example cotangent of the input.
    Materialise,
}

/// The analysis of a graph for one per-example input shape (see the module docs).
#[derive(Debug, Clone)]
pub struct Analysis {
    /// Nodes that feed the output.
    pub live: Vec<bool>,
    /// Live readers (node input slots) of each value.
    pub uses: Vec<usize>,
    /// Live nodes whose outputs do not depend on the data (constants, shape arithmetic,
    /// transforms of the parameters): computed once per batch size.
    pub fold: Vec<bool>,
    /// Live nodes whose outputs are parameter-derived without a batch axis.
    pub chain_node: Vec<bool>,
    /// Values depending on the data.
    pub dd: Vec<bool>,
    /// Values depending on the parameters.
    pub pd: Vec<bool>,
    /// Float values.
    pub float: Vec<bool>,
    /// The batch axis of each value.
    pub bax: Vec<Option<usize>>,
    /// Values needing a cotangent: `[0]` for the parameters, `[1]` also for the input.
    pub ng: [Vec<bool>; 2],
    /// Parameter groups, in parameter order.
    pub groups: Vec<Group>,
    /// Per-example rules at (node, input slot).
    pub rules: HashMap<(usize, usize), Rule>,
    /// Flat offset of each parameter.
    pub offsets: Vec<usize>,
    /// P.
    pub num_params: usize,
    /// One example's input shape.
    pub input_shape: Vec<usize>,
    /// One example's output shape.
    pub output_shape: Vec<usize>,
    /// The output's batch axis.
    pub output_axis: usize,
}

fn diff_slot(op: &Op, slot: usize) -> bool {
    match op {
        Op::Logic(_) | Op::Shape { .. } | Op::Size | Op::Range | Op::ConstantOfShape { .. } => {
            false
        }
        Op::Cast { to } => *to == ElemType::Float && slot == 0,
        Op::Where => slot > 0,
        Op::Gather { .. } | Op::GatherNd { .. } => slot == 0,
        Op::ScatterNd { .. } | Op::ScatterElements { .. } => slot != 1,
        Op::Concat { .. } | Op::Binary(_) => true,
        Op::Gemm { .. } | Op::Conv { .. } | Op::LayerNorm { .. } => slot <= 2,
        Op::MatMul => slot <= 1,
        Op::BatchNorm { .. } => slot <= 4,
        _ => slot == 0,
    }
}

fn shape_err(g: &Graph, k: usize, detail: String) -> Error {
    Error::Unsupported(format!(
        "{}: {detail}; the graph engine needs every example computed on its own (one batch axis, no operator across it)",
        g.nodes[k].describe()
    ))
}

impl Analysis {
    /// Analyses `g` for examples of shape `input_shape` (its probes run in f32 on a copy of
    /// the parameters; [`Analysis::with_sources`] reuses an engine's).
    pub fn new(g: &Graph, input_shape: &[usize]) -> Result<Self> {
        Self::with_sources(g, input_shape, &Sources::<f32>::new(g))
    }

    /// [`Analysis::new`] probing with `src`, the graph's parameters and constants already
    /// converted (an engine's own; the probes read only shapes, element types and integers).
    pub fn with_sources<T: Scalar>(
        g: &Graph,
        input_shape: &[usize],
        src: &Sources<T>,
    ) -> Result<Self> {
        if let Some(dims) = &g.input_dims {
            let ok = dims.len() == input_shape.len()
                && dims
                    .iter()
                    .zip(input_shape)
                    .all(|(d, s)| d.is_none_or(|d| d == *s));
            if !ok {
                return Err(Error::shape(
                    format!(
                        "one example of the input '{}' of {}",
                        g.value_name(g.input),
                        g.source
                    ),
                    format!(
                        "{:?} (the model's declared input after the batch axis; ? = any)",
                        dims.iter()
                            .map(|d| d.map_or("?".to_string(), |v| v.to_string()))
                            .collect::<Vec<_>>()
                    ),
                    format!("{input_shape:?} (the data's rows)"),
                ));
            }
        }
        let nv = g.values.len();
        let nn = g.nodes.len();
        // consumers and liveness
        let mut consumers: Vec<Vec<(usize, usize)>> = vec![vec![]; nv];
        for (k, n) in g.nodes.iter().enumerate() {
            for (s, i) in n.inputs.iter().enumerate() {
                if let Some(v) = i {
                    consumers[*v].push((k, s));
                }
            }
        }
        let mut live = vec![false; nn];
        let mut used = vec![false; nv];
        used[g.output] = true;
        for (k, n) in g.nodes.iter().enumerate().rev() {
            if n.outputs.iter().flatten().any(|o| used[*o]) {
                live[k] = true;
                for i in n.inputs.iter().flatten() {
                    used[*i] = true;
                }
            }
        }
        for c in consumers.iter_mut() {
            c.retain(|(k, _)| live[*k]);
        }
        // dependence
        let mut dd = vec![false; nv];
        let mut pd = vec![false; nv];
        dd[g.input] = true;
        for p in &g.params {
            pd[p.value] = true;
        }
        for n in &g.nodes {
            let shape_only = matches!(n.op, Op::Shape { .. } | Op::Size);
            let d = !shape_only && n.inputs.iter().flatten().any(|i| dd[*i]);
            let q = !shape_only && n.inputs.iter().flatten().any(|i| pd[*i]);
            for o in n.outputs.iter().flatten() {
                dd[*o] = d;
                pd[*o] = q;
            }
        }
        // probes (only shapes, element types and integer values are read)
        let probe = |b: usize| -> Result<exec::Pass<T>> {
            let mut shape = vec![b];
            shape.extend_from_slice(input_shape);
            let n: usize = shape.iter().product();
            let data = match g.input_type {
                ElemType::Float => Data::F(vec![T::of(0.0); n]),
                ElemType::Int => Data::I(vec![0; n]),
                ElemType::Bool => Data::B(vec![false; n]),
            };
            exec::forward(g, &live, None, src, Tensor { shape, data })
        };
        let p2 = probe(2)?;
        let p3 = probe(3)?;
        let shape_of = |p: &exec::Pass<T>, v: usize| p.value(src, v).map(|t| t.shape.clone());
        let mut bax = vec![None; nv];
        let mut float = vec![false; nv];
        let producer: HashMap<usize, usize> = g
            .nodes
            .iter()
            .enumerate()
            .flat_map(|(k, n)| n.outputs.iter().flatten().map(move |o| (*o, k)))
            .collect();
        for v in 0..nv {
            let (Some(s2), Some(s3)) = (shape_of(&p2, v), shape_of(&p3, v)) else {
                continue;
            };
            float[v] = p2
                .value(src, v)
                .is_some_and(|t| t.elem_type() == ElemType::Float);
            let k = producer.get(&v).copied();
            let culprit = |detail: String| match k {
                Some(k) => shape_err(g, k, detail),
                None => Error::Unsupported(detail),
            };
            if s2.len() != s3.len() {
                return Err(culprit(format!(
                    "output '{}' has rank {} at batch 2 and {} at batch 3",
                    g.values[v],
                    s2.len(),
                    s3.len()
                )));
            }
            let diff: Vec<usize> = (0..s2.len()).filter(|i| s2[*i] != s3[*i]).collect();
            match diff.as_slice() {
                [] => {
                    if dd[v] {
                        return Err(culprit(format!(
                            "output '{}' depends on the data but has no batch axis (shape {s2:?} at every batch size): it reduces over or mixes the examples",
                            g.values[v]
                        )));
                    }
                }
                [a] if s2[*a] == 2 && s3[*a] == 3 => bax[v] = Some(*a),
                _ => {
                    return Err(culprit(format!(
                        "output '{}' has shape {s2:?} at batch 2 and {s3:?} at batch 3: the batch axis is merged with another axis",
                        g.values[v]
                    )))
                }
            }
        }
        if bax[g.input] != Some(0) {
            return Err(Error::Unsupported("the input has no batch axis".into()));
        }
        let output_axis = bax[g.output].ok_or_else(|| {
            Error::Unsupported(format!(
                "the output '{}' has no batch axis (it does not depend on the input)",
                g.value_name(g.output)
            ))
        })?;
        if !float[g.output] {
            return Err(Error::Unsupported(format!(
                "the output '{}' is not a float tensor",
                g.value_name(g.output)
            )));
        }
        let mut output_shape = shape_of(&p2, g.output).unwrap_or_default();
        output_shape.remove(output_axis);
        // operators that act along an axis must not act along the batch axis
        for (k, n) in g.nodes.iter().enumerate() {
            if live[k] {
                check_axes(g, k, &bax, &p2, src)?;
            }
            let _ = n;
        }
        // cotangents needed
        let mut reach = vec![false; nv];
        reach[g.output] = true;
        for (k, n) in g.nodes.iter().enumerate().rev() {
            if !live[k] || !n.outputs.iter().flatten().any(|o| reach[*o]) {
                continue;
            }
            for (s, i) in n.inputs.iter().enumerate() {
                if let Some(i) = i {
                    if diff_slot(&n.op, s) {
                        reach[*i] = true;
                    }
                }
            }
        }
        let ng0: Vec<bool> = (0..nv).map(|v| float[v] && reach[v] && pd[v]).collect();
        let ng1: Vec<bool> = (0..nv)
            .map(|v| float[v] && reach[v] && (pd[v] || dd[v]))
            .collect();
        for p in &g.params {
            if float[p.value] && !reach[p.value] && !consumers[p.value].is_empty() {
                // read, but only through non-differentiable inputs (shapes, indices, conditions)
                let (k, s) = consumers[p.value][0];
                return Err(Error::Unsupported(format!(
                    "parameter '{}' is read by {} as its input {s}, through which no gradient flows",
                    p.name,
                    g.nodes[k].describe()
                )));
            }
        }
        let chain_node: Vec<bool> = g
            .nodes
            .iter()
            .enumerate()
            .map(|(k, n)| {
                live[k]
                    && n.outputs
                        .iter()
                        .flatten()
                        .any(|o| pd[*o] && bax[*o].is_none())
            })
            .collect();
        let mut offsets = Vec::with_capacity(g.params.len());
        let mut off = 0;
        for p in &g.params {
            offsets.push(off);
            off += p.numel();
        }
        let uses: Vec<usize> = consumers.iter().map(|c| c.len()).collect();
        let fold: Vec<bool> = g
            .nodes
            .iter()
            .enumerate()
            .map(|(k, n)| live[k] && n.outputs.iter().flatten().all(|o| !dd[*o]))
            .collect();
        let mut an = Analysis {
            uses,
            fold,
            live,
            chain_node,
            dd,
            pd,
            float,
            bax,
            ng: [ng0, ng1],
            groups: vec![],
            rules: HashMap::new(),
            offsets,
            num_params: off,
            input_shape: input_shape.to_vec(),
            output_shape,
            output_axis,
        };
        an.plan_uses(g, &consumers, &p2, src)?;
        Ok(an)
    }

    /// Parameter forms, groups and the per-example rule of every boundary input.
    fn plan_uses<T: Scalar>(
        &mut self,
        g: &Graph,
        consumers: &[Vec<(usize, usize)>],
        p2: &exec::Pass<T>,
        src: &Sources<T>,
    ) -> Result<()> {
        let param_at: HashMap<usize, usize> = g
            .params
            .iter()
            .enumerate()
            .map(|(i, p)| (p.value, i))
            .collect();
        let shape = |v: usize| {
            p2.value(src, v)
                .map(|t| t.shape.clone())
                .unwrap_or_default()
        };
        let batched = |v: Option<usize>| v.is_some_and(|v| self.bax[v].is_some());
        let is_param = |v: Option<usize>, want: &[usize]| -> Option<usize> {
            let v = v?;
            let p = *param_at.get(&v)?;
            let s = &g.params[p].shape;
            (s.as_slice() == want || (want.len() == 1 && s.as_slice() == [1, want[0]])).then_some(p)
        };
        // rows uses of each parameter: (node, slot, kind, k, out, groups, t, bias)
        #[derive(Clone)]
        struct Use {
            node: usize,
            slot: usize,
            kind: RowsKind,
            k: usize,
            out: usize,
            groups: usize,
            t: usize,
            bias: Option<(usize, usize, usize)>,
        }
        let rows_t = |v: usize, width: usize| -> usize {
            let n: usize = shape(v).iter().product();
            n / (2 * width.max(1))
        };
        // a use of a 2-D out×in weight `w` at (node, slot) reading the rows of value `x`
        let weight_use =
            |w: &[usize], node: usize, slot: usize, kind: RowsKind, x: usize, bias| Use {
                node,
                slot,
                kind,
                k: w[1],
                out: w[0],
                groups: 1,
                t: rows_t(x, w[1]),
                bias,
            };
        let mut forms: Vec<Option<std::result::Result<Vec<Use>, ()>>> = vec![None; g.params.len()];
        let mut tokens: Vec<Option<Vec<(usize, usize, usize)>>> = vec![None; g.params.len()];
        for (pi, p) in g.params.iter().enumerate() {
            let cons = &consumers[p.value];
            if cons.is_empty() || !self.ng[0][p.value] {
                continue;
            }
            let mut uses = vec![];
            let mut ok = true;
            let mut toks = vec![];
            let mut all_tokens = true;
            for &(k, s) in cons {
                let n = &g.nodes[k];
                let two_d = p.shape.len() == 2;
                // tokens
                let is_tok = matches!(n.op, Op::Gather { axis } if s == 0 && two_d
                    && norm_axis(n, axis, 2).ok() == Some(0)
                    && batched(n.input(1)));
                if is_tok {
                    let ids = n.input(1).unwrap_or(0);
                    toks.push((k, s, rows_t(ids, 1)));
                } else {
                    all_tokens = false;
                }
                let found: Vec<Use> = match &n.op {
                    Op::Transpose { perm }
                        if two_d && perm.as_deref().is_none_or(|q| q == [1, 0]) =>
                    {
                        let vt = n.outputs.first().copied().flatten();
                        let mut us = vec![];
                        for &(k2, s2) in vt.map(|v| consumers[v].as_slice()).unwrap_or(&[]) {
                            let n2 = &g.nodes[k2];
                            match &n2.op {
                                Op::MatMul if s2 == 1 && batched(n2.input(0)) => {
                                    let x = n2.input(0).unwrap_or(0);
                                    let vo = n2.outputs.first().copied().flatten();
                                    let bias = vo.and_then(|vo| match consumers[vo].as_slice() {
                                        [(ka, sa)]
                                            if matches!(
                                                g.nodes[*ka].op,
                                                Op::Binary(super::ir::Binary::Add)
                                            ) =>
                                        {
                                            let other = 1 - sa;
                                            is_param(g.nodes[*ka].input(other), &[p.shape[0]])
                                                .filter(|q| g.params[*q].shape.len() == 1)
                                                .map(|q| (q, *ka, other))
                                        }
                                        _ => None,
                                    });
                                    us.push(weight_use(
                                        &p.shape,
                                        k2,
                                        s2,
                                        RowsKind::MatRight,
                                        x,
                                        bias,
                                    ));
                                }
                                Op::Gemm {
                                    alpha,
                                    beta,
                                    trans_b: false,
                                    ..
                                } if s2 == 1 && *alpha == 1.0 && batched(n2.input(0)) => {
                                    let x = n2.input(0).unwrap_or(0);
                                    let bias = if *beta == 1.0 {
                                        is_param(n2.input(2), &[p.shape[0]]).map(|q| (q, k2, 2))
                                    } else {
                                        None
                                    };
                                    us.push(weight_use(&p.shape, k2, s2, RowsKind::Gemm, x, bias));
                                }
                                _ => ok = false,
                            }
                        }
                        us
                    }
                    Op::MatMul if s == 0 && two_d && batched(n.input(1)) => {
                        let x = n.input(1).unwrap_or(0);
                        vec![weight_use(&p.shape, k, s, RowsKind::MatLeft, x, None)]
                    }
                    Op::Gemm {
                        alpha,
                        beta,
                        trans_b: true,
                        ..
                    } if s == 1 && two_d && *alpha == 1.0 && batched(n.input(0)) => {
                        let x = n.input(0).unwrap_or(0);
                        let bias = if *beta == 1.0 {
                            is_param(n.input(2), &[p.shape[0]]).map(|q| (q, k, 2))
                        } else {
                            None
                        };
                        vec![weight_use(&p.shape, k, s, RowsKind::Gemm, x, bias)]
                    }
                    Op::Conv { group, .. } if s == 1 && batched(n.input(0)) => {
                        let groups = *group;
                        let kk: usize = p.shape[1..].iter().product();
                        let out = p.shape[0] / groups.max(1);
                        let y = n.outputs.first().copied().flatten().unwrap_or(0);
                        let bias = is_param(n.input(2), &[p.shape[0]]).map(|q| (q, k, 2));
                        vec![Use {
                            node: k,
                            slot: s,
                            kind: RowsKind::Conv,
                            k: kk,
                            out,
                            groups,
                            t: rows_t(y, p.shape[0]),
                            bias,
                        }]
                    }
                    _ => {
                        ok = false;
                        vec![]
                    }
                };
                uses.extend(found);
            }
            if all_tokens && !toks.is_empty() {
                tokens[pi] = Some(toks);
                continue;
            }
            let consistent = uses
                .windows(2)
                .all(|w| (w[0].k, w[0].out, w[0].groups) == (w[1].k, w[1].out, w[1].groups));
            forms[pi] = Some(if ok && !uses.is_empty() && consistent {
                Ok(uses)
            } else {
                Err(())
            });
        }
        // bias pairing: every use adds the same bias, which is read nowhere else
        let mut covered: HashMap<usize, usize> = HashMap::new(); // bias param -> weight param
        let mut bias_of: Vec<Option<usize>> = vec![None; g.params.len()];
        for (pi, f) in forms.iter().enumerate() {
            let Some(Ok(uses)) = f else { continue };
            let Some(Some((q, _, _))) = uses.first().map(|u| u.bias) else {
                continue;
            };
            let all_same = uses.iter().all(|u| u.bias.is_some_and(|b| b.0 == q));
            let slots: Vec<(usize, usize)> = uses
                .iter()
                .filter_map(|u| u.bias.map(|b| (b.1, b.2)))
                .collect();
            let mut cons = consumers[g.params[q].value].clone();
            cons.sort_unstable();
            let mut sl = slots.clone();
            sl.sort_unstable();
            if all_same
                && cons == sl
                && !covered.contains_key(&q)
                && !matches!(forms[q], Some(Ok(_)))
                && tokens[q].is_none()
            {
                covered.insert(q, pi);
                bias_of[pi] = Some(q);
                for (k, s) in slots {
                    self.rules.insert((k, s), Rule::Covered);
                }
            }
        }
        // groups in parameter order
        for (pi, p) in g.params.iter().enumerate() {
            if covered.contains_key(&pi) {
                continue;
            }
            if let Some(toks) = &tokens[pi] {
                let gi = self.groups.len();
                let mut row = 0;
                for &(k, s, t) in toks {
                    self.rules.insert((k, s), Rule::Tokens { group: gi, row });
                    row += t;
                }
                self.groups.push(Group::Tokens {
                    param: pi,
                    vocab: p.shape[0],
                    out: p.shape[1],
                    t: row,
                });
                continue;
            }
            match &forms[pi] {
                Some(Ok(uses)) => {
                    let gi = self.groups.len();
                    let (k, out, groups) = (uses[0].k, uses[0].out, uses[0].groups);
                    let mut row = 0;
                    for u in uses {
                        self.rules.insert(
                            (u.node, u.slot),
                            Rule::Rows {
                                group: gi,
                                groups,
                                row,
                                kind: u.kind,
                            },
                        );
                        row += u.t;
                    }
                    for gr in 0..groups {
                        self.groups.push(Group::Rows {
                            param: pi,
                            group: gr,
                            k,
                            out,
                            t: row,
                            bias: bias_of[pi],
                        });
                    }
                }
                _ => self.groups.push(Group::Dense { param: pi }),
            }
        }
        // every other boundary input materialises; check the operator has the rule
        for (k, n) in g.nodes.iter().enumerate() {
            if !self.live[k] || self.chain_node[k] {
                continue;
            }
            for (s, i) in n.inputs.iter().enumerate() {
                let Some(v) = i else { continue };
                if !(self.ng[0][*v] && self.bax[*v].is_none()) || self.rules.contains_key(&(k, s)) {
                    continue;
                }
                let two_d = shape(*v).len() == 2;
                let ok = match &n.op {
                    Op::Binary(b) => *b != super::ir::Binary::Pow,
                    Op::Where => s > 0,
                    Op::Expand => s == 0,
                    Op::MatMul => two_d,
                    Op::Gemm { .. } => s >= 1,
                    Op::Conv { .. } => s >= 1,
                    Op::Gather { .. } | Op::GatherNd { .. } => s == 0,
                    Op::LayerNorm { .. } | Op::BatchNorm { .. } => s == 1 || s == 2,
                    _ => false,
                };
                if !ok {
                    return Err(Error::Unsupported(format!(
                        "{} reads the parameter-derived value '{}' (input {s}) together with the batch, which has no per-example rule; \
                         parameters may meet the data in Add/Sub/Mul/Div, Where, Expand, MatMul and Gemm (2-D weights), Conv, Gather/GatherND \
                         and the scale and bias of the norms",
                        n.describe(),
                        g.values[*v]
                    )));
                }
                self.rules.insert((k, s), Rule::Materialise);
            }
        }
        Ok(())
    }
}

/// Refuses operators acting along the batch axis of their input.
fn check_axes<T: Scalar>(
    g: &Graph,
    k: usize,
    bax: &[Option<usize>],
    p2: &exec::Pass<T>,
    src: &Sources<T>,
) -> Result<()> {
    let n = &g.nodes[k];
    let ax = |s: usize| n.input(s).and_then(|v| bax[v]);
    let rank = |s: usize| {
        n.input(s)
            .and_then(|v| p2.value(src, v))
            .map_or(0, |t| t.shape.len())
    };
    let along = |a: i64, s: usize, what: &str| -> Result<()> {
        if let Some(b) = ax(s) {
            if norm_axis(n, a, rank(s))? == b {
                return Err(shape_err(
                    g,
                    k,
                    format!("its {what} runs along the batch axis {b}"),
                ));
            }
        }
        Ok(())
    };
    match &n.op {
        Op::Conv { .. } | Op::MaxPool { .. } | Op::AveragePool { .. } | Op::GlobalAveragePool => {
            if let Some(b) = ax(0) {
                if b != 0 {
                    return Err(shape_err(
                        g,
                        k,
                        format!("its input has the batch axis at {b}, not at the N axis 0"),
                    ));
                }
            }
            if ax(1).is_some() {
                return Err(shape_err(g, k, "its weight depends on the data".into()));
            }
        }
        Op::BatchNorm { .. } if ax(0) == Some(1) => {
            return Err(shape_err(g, k, "the batch axis is its channel axis".into()));
        }
        Op::LayerNorm { axis, .. } => {
            if let Some(b) = ax(0) {
                if b >= norm_axis(n, *axis, rank(0))? {
                    return Err(shape_err(g, k, "it normalizes over the batch axis".into()));
                }
            }
        }
        Op::Softmax { axis, legacy, .. } => {
            if let Some(b) = ax(0) {
                let a = norm_axis(n, *axis, rank(0))?;
                if b == a || (*legacy && b > a) {
                    return Err(shape_err(g, k, "it normalizes over the batch axis".into()));
                }
            }
        }
        Op::MatMul => {
            if let Some(b) = ax(0) {
                if b + 1 == rank(0) {
                    return Err(shape_err(g, k, "it contracts over the batch axis".into()));
                }
            }
            if let Some(b) = ax(1) {
                if rank(1) >= 2 && b + 2 == rank(1) {
                    return Err(shape_err(g, k, "it contracts over the batch axis".into()));
                }
            }
        }
        Op::Gemm {
            trans_a, trans_b, ..
        } => {
            if let Some(b) = ax(0) {
                if b != usize::from(*trans_a) {
                    return Err(shape_err(g, k, "it contracts over the batch axis".into()));
                }
            }
            if let Some(b) = ax(1) {
                if b != usize::from(!*trans_b) {
                    return Err(shape_err(g, k, "it contracts over the batch axis".into()));
                }
            }
        }
        Op::Gather { axis } => along(*axis, 0, "gather")?,
        Op::ScatterElements { axis, .. } => along(*axis, 0, "scatter")?,
        Op::GatherNd { batch_dims } => {
            if let (Some(b), Some(q)) = (
                ax(0),
                n.input(1)
                    .and_then(|v| p2.value(src, v))
                    .and_then(|t| t.shape.last().copied()),
            ) {
                if b >= *batch_dims && b < batch_dims + q {
                    return Err(shape_err(g, k, "it indexes along the batch axis".into()));
                }
            }
        }
        Op::ScatterNd { .. } => {
            if let (Some(b), Some(q)) = (
                ax(0),
                n.input(1)
                    .and_then(|v| p2.value(src, v))
                    .and_then(|t| t.shape.last().copied()),
            ) {
                if b < q {
                    return Err(shape_err(g, k, "it scatters along the batch axis".into()));
                }
            }
        }
        Op::Trilu { .. } => {
            if let Some(b) = ax(0) {
                if b + 2 >= rank(0) {
                    return Err(shape_err(
                        g,
                        k,
                        "the batch axis is one of its matrix axes".into(),
                    ));
                }
            }
        }
        _ => {}
    }
    Ok(())
}
