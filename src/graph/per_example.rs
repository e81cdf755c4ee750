//! Per-example rules where a parameter-derived value without a batch axis (u) meets the batch:
//! the backward pass of Σᵢ uᵢ gives each example's signal in the batched cotangent, and here it
//! becomes each example's gradient with respect to u.
//!
//! - **Records** (parameters held factored): a MatMul/Gemm/Conv use keeps, per example, its
//!   input rows X (T×k; a convolution's patches) and output signal rows Δ (T×out), so that
//!   g = Δᵀ X̃; a Gather from an embedding table keeps the ids and the signal rows. Records
//!   borrow the pass's buffers where the rows of an example are evenly strided, and hold a
//!   permuted copy otherwise.
//! - **Materialised**: the per-example cotangent of u as a B × |u| block — elementwise ops and
//!   the norms' scale and bias by summing the contribution over the broadcast axes except the
//!   batch axis; MatMul/Gemm/Conv by a product per example; Gather by scattering per example.

use faer::MatRef;

use super::analysis::{Analysis, RowsKind, Rule};
use super::exec::Pass;
use super::ir::{Node, Op, Tensor};
use super::ops::linalg::gemm_into;
use super::ops::util::*;
use super::ops::{self, Saved};
use crate::error::{Error, Result};
use crate::scalar::Scalar;

pub use super::records::{view, Layout, Out, Record, RowsData, Src};

impl<T: Scalar> RowsData<T> {
    /// Example `e`'s rows as a matrix (rows × cols).
    pub fn mat<'a>(&'a self, pass: &'a Pass<T>, e: usize) -> Result<MatRef<'a, T>> {
        let buf: &[T] = match &self.src {
            Src::Value(v) => pass.vals[*v]
                .as_ref()
                .and_then(|t| t.floats())
                .unwrap_or(&[]),
            Src::Cot(v) => pass.cot[*v].as_deref().unwrap_or(&[]),
            Src::Patches(k) => match &pass.saved[*k] {
                Saved::Patches(p) => p,
                _ => &[],
            },
            Src::Owned(v) => v,
        };
        view(buf, &self.layout, e)
    }
}

impl<T: Scalar> RowsData<T> {
    /// The rows of all `b` examples as one contiguous B·rows × cols row-major slice, when they
    /// are laid out so.
    pub fn contiguous<'a>(&'a self, pass: &'a Pass<T>, b: usize) -> Option<&'a [T]> {
        let l = self.layout;
        if l.cs != 1 || l.rs != l.cols || l.ex != l.rows * l.cols {
            return None;
        }
        let buf: &[T] = match &self.src {
            Src::Value(v) => pass.vals[*v].as_ref().and_then(|t| t.floats())?,
            Src::Cot(v) => pass.cot[*v].as_deref()?,
            Src::Patches(_) => return None,
            Src::Owned(v) => v,
        };
        buf.get(l.base..l.base + b * l.ex)
    }
}

/// The node at hand during the backward pass.
pub struct Ctx<'a, T> {
    /// The node.
    pub node: &'a Node,
    /// Its index.
    pub k: usize,
    /// The analysis.
    pub an: &'a Analysis,
    /// Its inputs.
    pub ins: &'a [Option<&'a Tensor<T>>],
    /// Its outputs.
    pub outs: &'a [Option<&'a Tensor<T>>],
    /// What its forward kept.
    pub saved: &'a Saved<T>,
    /// The cotangent of its (first) output.
    pub g: &'a [T],
    /// Examples in the batch.
    pub b: usize,
    /// Rollout step.
    pub step: usize,
}

impl<T: Scalar> Ctx<'_, T> {
    fn input(&self, s: usize) -> Result<&Tensor<T>> {
        input(self.node, self.ins, s)
    }

    fn out(&self) -> Result<&Tensor<T>> {
        self.outs
            .first()
            .copied()
            .flatten()
            .ok_or_else(|| Error::Unsupported(format!("{}: output not kept", self.node.describe())))
    }

    fn bax(&self, v: Option<usize>) -> Result<usize> {
        v.and_then(|v| self.an.bax[v]).ok_or_else(|| {
            Error::Unsupported(format!(
                "{}: an operand expected batched is not",
                self.node.describe()
            ))
        })
    }

    fn out_bax(&self) -> Result<usize> {
        self.bax(self.node.outputs.first().copied().flatten())
    }
}

/// The layout of example rows in a value of shape `shape` (batch axis `a`, row content along
/// axis `w`), borrowed when evenly strided.
fn rows_layout(shape: &[usize], a: usize, w: usize, b: usize) -> Option<Layout> {
    let st = strides(shape);
    let rest: Vec<usize> = (0..shape.len())
        .filter(|i| *i != a && *i != w && shape[*i] > 1)
        .collect();
    let rows: usize = rest.iter().map(|i| shape[*i]).product();
    for pair in rest.windows(2) {
        if st[pair[0]] != st[pair[1]] * shape[pair[1]] {
            return None;
        }
    }
    let rs = rest.last().map_or(shape[w].max(1), |i| st[*i]);
    let cs = st[w];
    if rs != 1 && cs != 1 {
        return None;
    }
    let _ = b;
    Some(Layout {
        base: 0,
        ex: st[a],
        rows,
        rs,
        cols: shape[w],
        cs,
    })
}

/// Example rows of `data`: the buffer itself when evenly strided, else a permuted copy
/// (example-major, rows contiguous).
fn rows_cow<'d, T: Scalar>(
    data: &'d [T],
    shape: &[usize],
    a: usize,
    w: usize,
    b: usize,
) -> (std::borrow::Cow<'d, [T]>, Layout) {
    if let Some(layout) = rows_layout(shape, a, w, b) {
        return (std::borrow::Cow::Borrowed(data), layout);
    }
    let mut perm = vec![a];
    perm.extend((0..shape.len()).filter(|i| *i != a && *i != w));
    perm.push(w);
    let owned = permute(data, shape, &perm);
    let width = shape[w];
    let rows = shape.iter().product::<usize>() / (b.max(1) * width.max(1));
    (
        std::borrow::Cow::Owned(owned),
        Layout {
            base: 0,
            ex: rows * width,
            rows,
            rs: width,
            cols: width,
            cs: 1,
        },
    )
}

/// Example rows kept for a record: borrowed from the pass (`src`) when evenly strided, else a
/// permuted copy.
fn rows_of<T: Scalar>(
    src: Src<T>,
    data: &[T],
    shape: &[usize],
    a: usize,
    w: usize,
    b: usize,
) -> RowsData<T> {
    match rows_cow(data, shape, a, w, b) {
        (std::borrow::Cow::Borrowed(_), layout) => RowsData { src, layout },
        (std::borrow::Cow::Owned(v), layout) => RowsData {
            src: Src::Owned(v),
            layout,
        },
    }
}

/// Sums `c` (shaped `out`, batch axis `a`) over every axis where `u` (aligned to `out`'s
/// rank, 1 where broadcast) is broadcast, except the batch axis: B × |u|.
pub fn pe_reduce<T: Scalar>(c: &[T], out: &[usize], a: usize, u: &[usize], b: usize) -> Vec<T> {
    let nu: usize = u.iter().product();
    // batch axis first: each example's block reduced on its own (a copy when u is its shape)
    if a == 0 && !out.is_empty() && u.len() == out.len() && u[0] == 1 {
        let m: usize = out[1..].iter().product();
        if m > 0 && c.len() == b * m && out[0] == b {
            if u[1..] == out[1..] {
                return c.to_vec();
            }
            let mut pe = Vec::with_capacity(b * nu);
            for blk in c.chunks_exact(m) {
                match sum_trailing(blk, &out[1..], &u[1..]) {
                    Some(v) => pe.extend(v),
                    None => {
                        pe.clear();
                        break;
                    }
                }
            }
            if pe.len() == b * nu {
                return pe;
            }
        }
    }
    let mut pe = vec![T::of(0.0); b * nu];
    let mut us = bstrides(u, out);
    us[a] = nu;
    let os = strides(out);
    for_each(out, [&os, &us], |_, [io, iu]| pe[iu] += c[io]);
    pe
}

/// `u`'s shape right-aligned to rank `r`.
fn aligned(u: &[usize], r: usize) -> Vec<usize> {
    let mut v = vec![1; r.saturating_sub(u.len())];
    v.extend_from_slice(u);
    v
}

/// Scatters `g` (shaped `out`, batch axis `a`) by `map` (output element → element of u): B × nu.
fn pe_scatter<T: Scalar>(
    g: &[T],
    out: &[usize],
    a: usize,
    map: &[usize],
    nu: usize,
    b: usize,
) -> Vec<T> {
    let mut pe = vec![T::of(0.0); b * nu];
    let mut bs = vec![0; out.len()];
    bs[a] = nu;
    let os = strides(out);
    for_each(out, [&os, &bs], |io, [_, eb]| pe[eb + map[io]] += g[io]);
    pe
}

/// Applies the rule at input `s` of the node.
pub fn apply<T: Scalar>(c: &Ctx<'_, T>, s: usize, rule: &Rule) -> Result<Out<T>> {
    match *rule {
        Rule::Covered => Ok(Out::None),
        Rule::Materialise => materialise(c, s).map(Out::Pe),
        Rule::Tokens { group, row } => {
            let ids_t = c.input(1)?;
            let a = c.bax(c.node.input(1))?;
            let table = c.input(0)?;
            let vocab = table.shape[0];
            let raw = ids_t.ints().ok_or_else(|| {
                Error::Unsupported(format!("{}: indices must be integers", c.node.describe()))
            })?;
            let mut perm = vec![a];
            perm.extend((0..ids_t.shape.len()).filter(|i| *i != a));
            let ids = permute(raw, &ids_t.shape, &perm)
                .into_iter()
                .map(|i| index(c.node, i, vocab))
                .collect::<Result<Vec<_>>>()?;
            let y = c.out()?;
            let out_v = c.node.outputs.first().copied().flatten().unwrap_or(0);
            let w = y.shape.len() - 1;
            let d = rows_of(Src::Cot(out_v), c.g, &y.shape, a, w, c.b);
            Ok(Out::Records(vec![Record::Tokens {
                group,
                row,
                step: c.step,
                ids,
                d,
            }]))
        }
        Rule::Rows {
            group,
            groups,
            row,
            kind,
        } => {
            let out_v = c.node.outputs.first().copied().flatten().unwrap_or(0);
            let y = c.out()?;
            match kind {
                RowsKind::MatRight | RowsKind::Gemm => {
                    let (xs, trans_a) = match c.node.op {
                        Op::Gemm { trans_a, .. } => (0, trans_a),
                        _ => (0, false),
                    };
                    let xt = c.input(xs)?;
                    let xv = floats(c.node, xt, "A")?;
                    let a = c.bax(c.node.input(xs))?;
                    let r = xt.shape.len();
                    let w = if trans_a { 0 } else { r - 1 };
                    let x = rows_of(
                        Src::Value(c.node.input(xs).unwrap_or(0)),
                        xv,
                        &xt.shape,
                        a,
                        w,
                        c.b,
                    );
                    let ya = c.out_bax()?;
                    let d = rows_of(Src::Cot(out_v), c.g, &y.shape, ya, y.shape.len() - 1, c.b);
                    let _ = groups;
                    Ok(Out::Records(vec![Record::Rows {
                        group,
                        row,
                        step: c.step,
                        x,
                        d,
                    }]))
                }
                RowsKind::MatLeft => {
                    let xt = c.input(1)?;
                    let xv = floats(c.node, xt, "B")?;
                    let a = c.bax(c.node.input(1))?;
                    let r = xt.shape.len();
                    let x = rows_of(
                        Src::Value(c.node.input(1).unwrap_or(0)),
                        xv,
                        &xt.shape,
                        a,
                        r - 2,
                        c.b,
                    );
                    let ya = c.out_bax()?;
                    let d = rows_of(Src::Cot(out_v), c.g, &y.shape, ya, y.shape.len() - 2, c.b);
                    Ok(Out::Records(vec![Record::Rows {
                        group,
                        row,
                        step: c.step,
                        x,
                        d,
                    }]))
                }
                RowsKind::Conv => conv_records(c, rule).map(Out::Records),
            }
        }
    }
}

/// The records of a convolution use, one per group.
fn conv_records<T: Scalar>(c: &Ctx<'_, T>, rule: &Rule) -> Result<Vec<Record<T>>> {
    let Rule::Rows {
        group, groups, row, ..
    } = *rule
    else {
        return Ok(vec![]);
    };
    let (x, w) = (c.input(0)?, c.input(1)?);
    let Op::Conv { window, group: gs } = &c.node.op else {
        return Ok(vec![]);
    };
    let cs = ops::conv::conv_shape(c.node, &x.shape, &w.shape, window, *gs)?;
    let (k, l, og) = (cs.k, cs.g.l(), cs.cout / groups.max(1));
    let out_v = c.node.outputs.first().copied().flatten().unwrap_or(0);
    Ok((0..groups)
        .map(|gr| Record::Rows {
            group: group + gr,
            row,
            step: c.step,
            x: RowsData {
                src: Src::Patches(c.k),
                layout: Layout {
                    base: gr * k * l,
                    ex: groups * k * l,
                    rows: l,
                    rs: 1,
                    cols: k,
                    cs: l,
                },
            },
            d: RowsData {
                src: Src::Cot(out_v),
                layout: Layout {
                    base: gr * og * l,
                    ex: cs.cout * l,
                    rows: l,
                    rs: 1,
                    cols: og,
                    cs: l,
                },
            },
        })
        .collect())
}

/// The B × |u| per-example cotangent of input `s`.
fn materialise<T: Scalar>(c: &Ctx<'_, T>, s: usize) -> Result<Vec<T>> {
    let node = c.node;
    let y = c.out()?;
    let a = c.out_bax()?;
    let u = c.input(s)?;
    let nu = u.numel();
    let b = c.b;
    match &node.op {
        Op::Binary(crate::graph::ir::Binary::Pow) => Err(Error::Unsupported(format!(
            "{}: a parameter as an operand of Pow meeting the batch has no per-example rule",
            node.describe()
        ))),
        Op::Binary(op) => {
            let full = ops::elementwise::binary_contribution(
                node,
                *op,
                c.input(0)?,
                c.input(1)?,
                y,
                c.g,
                s,
            )?;
            Ok(pe_reduce(
                &full,
                &y.shape,
                a,
                &aligned(&u.shape, y.shape.len()),
                b,
            ))
        }
        Op::Where => {
            let full = ops::elementwise::where_contribution(node, c.input(0)?, c.g, &y.shape, s)?;
            Ok(pe_reduce(
                &full,
                &y.shape,
                a,
                &aligned(&u.shape, y.shape.len()),
                b,
            ))
        }
        Op::Expand => Ok(pe_reduce(
            c.g,
            &y.shape,
            a,
            &aligned(&u.shape, y.shape.len()),
            b,
        )),
        Op::LayerNorm { .. } => {
            let Saved::Norm { xh, .. } = c.saved else {
                return Err(Error::Unsupported(format!(
                    "{}: x̂ not kept",
                    node.describe()
                )));
            };
            let ua = aligned(&u.shape, y.shape.len());
            if s != 1 {
                // the bias: the cotangent itself, summed
                return Ok(pe_reduce(c.g, &y.shape, a, &ua, b));
            }
            let mut full = crate::scalar::pool::buffer(c.g.len());
            full.iter_mut()
                .zip(c.g.iter().zip(xh))
                .for_each(|(f, (g, h))| *f = *g * *h);
            let pe = pe_reduce(&full, &y.shape, a, &ua, b);
            crate::scalar::pool::recycle(full);
            Ok(pe)
        }
        Op::BatchNorm { epsilon } if a == 0 && y.shape.len() >= 2 => {
            // per example and channel: Σ over the spatial positions of g·x̂ (scale) or g (bias)
            let x = c.input(0)?;
            let xv = floats(node, x, "X")?;
            let mean = floats(node, c.input(3)?, "mean")?;
            let var = floats(node, c.input(4)?, "var")?;
            let (n, ch) = (y.shape[0], y.shape[1]);
            let sp: usize = y.shape[2..].iter().product();
            if nu != ch || mean.len() != ch || var.len() != ch {
                return Err(Error::shape(
                    format!("{} (per-channel parameters)", node.describe()),
                    ch,
                    nu,
                ));
            }
            let mut pe = vec![T::of(0.0); b * nu];
            for e in 0..n {
                for k in 0..ch {
                    let at = (e * ch + k) * sp;
                    let gs = &c.g[at..at + sp];
                    let gsum = sum(gs);
                    pe[e * nu + k] = if s == 1 {
                        // Σ g·(x − mean)/σ = (Σ g·x − mean·Σ g)/σ
                        let inv = T::of(1.0) / (var[k] + T::of(*epsilon)).sqrt();
                        (dot(gs, &xv[at..at + sp]) - mean[k] * gsum) * inv
                    } else {
                        gsum
                    };
                }
            }
            Ok(pe)
        }
        Op::BatchNorm { epsilon } => {
            let ins = [
                c.input(0)?,
                c.input(1)?,
                c.input(2)?,
                c.input(3)?,
                c.input(4)?,
            ];
            let full: Vec<T> = if s == 1 {
                let xh = ops::norm::batch_norm_xhat(node, ins, *epsilon)?;
                c.g.iter().zip(&xh).map(|(g, h)| *g * *h).collect()
            } else {
                c.g.to_vec()
            };
            let mut al = vec![1; y.shape.len()];
            al[1] = nu;
            Ok(pe_reduce(&full, &y.shape, a, &al, b))
        }
        Op::Gather { axis } => {
            let (_, map) = ops::gather::gather_map(node, &u.shape, c.input(1)?, *axis)?;
            Ok(pe_scatter(c.g, &y.shape, a, &map, nu, b))
        }
        Op::GatherNd { batch_dims } => {
            let (_, map) = ops::gather::gather_nd_map(node, &u.shape, c.input(1)?, *batch_dims)?;
            Ok(pe_scatter(c.g, &y.shape, a, &map, nu, b))
        }
        Op::MatMul => {
            let mut pe = vec![T::of(0.0); b * nu];
            if s == 1 {
                // x (…, m, k) · u (k, n): per example Xᵀ D
                let xt = c.input(0)?;
                let xa = c.bax(node.input(0))?;
                let x = rows_cow(floats(node, xt, "A")?, &xt.shape, xa, xt.shape.len() - 1, b);
                let d = rows_cow(c.g, &y.shape, a, y.shape.len() - 1, b);
                per_example_product((&x.0, &x.1), (&d.0, &d.1), &mut pe, b)?;
            } else {
                // u (m, k) · x (…, k, n): per example Dᵀ X over the columns
                let xt = c.input(1)?;
                let xa = c.bax(node.input(1))?;
                let x = rows_cow(floats(node, xt, "B")?, &xt.shape, xa, xt.shape.len() - 2, b);
                let d = rows_cow(c.g, &y.shape, a, y.shape.len() - 2, b);
                per_example_product((&d.0, &d.1), (&x.0, &x.1), &mut pe, b)?;
            }
            Ok(pe)
        }
        Op::Gemm {
            alpha,
            beta,
            trans_a,
            trans_b,
        } => {
            let mut pe = vec![T::of(0.0); b * nu];
            if s == 2 {
                let full: Vec<T> = c.g.iter().map(|v| *v * T::of(*beta)).collect();
                return Ok(pe_reduce(&full, &y.shape, a, &aligned(&u.shape, 2), b));
            }
            let at = c.input(0)?;
            let xa = c.bax(node.input(0))?;
            let x = rows_cow(
                floats(node, at, "A")?,
                &at.shape,
                xa,
                usize::from(!*trans_a),
                b,
            );
            let d = rows_cow(c.g, &y.shape, a, 1, b);
            if *trans_b {
                per_example_product((&d.0, &d.1), (&x.0, &x.1), &mut pe, b)?;
            } else {
                per_example_product((&x.0, &x.1), (&d.0, &d.1), &mut pe, b)?;
            }
            if *alpha != 1.0 {
                pe.iter_mut().for_each(|v| *v *= T::of(*alpha));
            }
            Ok(pe)
        }
        Op::Conv { window, group } => {
            let (x, w) = (c.input(0)?, c.input(1)?);
            let cs = ops::conv::conv_shape(node, &x.shape, &w.shape, window, *group)?;
            let (k, l, og, groups) = (cs.k, cs.g.l(), cs.cout / group, *group);
            let mut pe = vec![T::of(0.0); b * nu];
            if s == 2 {
                for e in 0..b {
                    for o in 0..cs.cout {
                        let mut acc = T::of(0.0);
                        for v in &c.g[(e * cs.cout + o) * l..(e * cs.cout + o + 1) * l] {
                            acc += *v;
                        }
                        pe[e * nu + o] = acc;
                    }
                }
                return Ok(pe);
            }
            let Saved::Patches(p) = c.saved else {
                return Err(Error::Unsupported(format!(
                    "{}: patches not kept",
                    node.describe()
                )));
            };
            for e in 0..b {
                for gr in 0..groups {
                    let pp = &p[(e * groups + gr) * k * l..(e * groups + gr + 1) * k * l];
                    let d = &c.g[(e * cs.cout + gr * og) * l..(e * cs.cout + (gr + 1) * og) * l];
                    gemm_into(
                        &mut pe[e * nu + gr * og * k..e * nu + (gr + 1) * og * k],
                        false,
                        d,
                        false,
                        pp,
                        true,
                        (og, l, k),
                        T::of(1.0),
                    );
                }
            }
            Ok(pe)
        }
        _ => Err(Error::Unsupported(format!(
            "{}: no per-example rule for input {s}",
            node.describe()
        ))),
    }
}

/// pe[e] (p × q, row-major) += L_eᵀ R_e for every example, L_e (T × p), R_e (T × q).
fn per_example_product<T: Scalar>(
    (lb, ll): (&[T], &Layout),
    (rb, rl): (&[T], &Layout),
    pe: &mut [T],
    b: usize,
) -> Result<()> {
    use faer::linalg::matmul::matmul;
    use faer::{Accum, MatMut, Par};
    let (p, q) = (ll.cols, rl.cols);
    if ll.rows != rl.rows || pe.len() != b * p * q {
        return Err(Error::Unsupported(format!(
            "per-example product: {}×{p} and {}×{q} rows for {} values",
            ll.rows,
            rl.rows,
            pe.len()
        )));
    }
    if ll.rows == 0 {
        return Ok(());
    }
    for e in 0..b {
        let le = view(lb, ll, e)?;
        let re = view(rb, rl, e)?;
        matmul(
            MatMut::from_row_major_slice_mut(&mut pe[e * p * q..(e + 1) * p * q], p, q),
            Accum::Add,
            le.transpose(),
            re,
            T::of(1.0),
            Par::Seq,
        );
    }
    Ok(())
}
