//! Per-example gradients held layer by layer, each layer in the cheaper of two forms: what the
//! kernel method's Gram matrix and the CG products of a CNN or any captured model need.
//!
//! A layer that reads rows (Linear, a convolution's patches, a layer used at T positions or
//! rollout steps) has the per-example gradient gᵢ = Σₜ δᵢₜ x̃ᵢₜᵀ (x̃ = [x; 1] when it has a bias).
//! Between two examples,
//!
//! ⟨gᵢ, gⱼ⟩ = Σₜ,ₛ (x̃ᵢₜ·x̃ⱼₛ)(δᵢₜ·δⱼₛ),
//!
//! which costs T²·(in + 1 + out) per pair against (in + 1)·out for the materialised gradients.
//! [`LayerRoute::Auto`] keeps each layer in the cheaper form: a LeNet's Linear layers (T = 1)
//! factored — 1,568 + 1 + 128 against 200,832 per pair — and its convolutions (T = 784 and
//! 196 positions) materialised. Embedding rows compare token ids (T²·out against vocab·out);
//! norms and other layers keep explicit per-example vectors.
//!
//! Memory: N·(P_m + Σ_factored T·(in + 1 + out)) f64, P_m the parameters of the materialised
//! layers; the Gram matrix costs N²·(P_m + Σ_factored T²·(in + 1 + out)) multiply-adds.
//! Everything is f64, whatever the model's precision.

use faer::linalg::matmul::matmul;
use faer::linalg::matmul::triangular::BlockStructure;
use faer::reborrow::{Reborrow, ReborrowMut};
use faer::{Accum, Mat, MatMut, MatRef, Par};

use crate::error::{Error, Result};

/// How each layer's per-example gradients are held for the Gram matrix and the products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LayerRoute {
    /// Per layer, the cheaper form per pair of examples: factored when
    /// T²·(in + 1 + out) < (in + 1)·out (rows) or T² < vocab (tokens), materialised otherwise.
    #[default]
    Auto,
    /// Every layer's per-example gradients materialised (the N×P matrix, by layer).
    Materialise,
    /// Every layer that reads rows or tokens factored; the others materialised.
    Factor,
}

/// What a layer's per-example gradient is built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LayerKind {
    /// gᵢᵂ = Σₜ δᵢₜ xᵢₜᵀ (weight out×in, row-major), gᵢᵇ = Σₜ δᵢₜ.
    Rows { t: usize, inp: usize, out: usize },
    /// Embedding: gᵢ[v] = Σ_{t: idᵢₜ = v} δᵢₜ (weight vocab×out).
    Tokens { t: usize, vocab: usize, out: usize },
    /// Explicit per-example vectors (norms and the like).
    Explicit,
}

/// A layer with parameters: its kind and where its weight and bias sit in the flat layout.
#[derive(Debug, Clone)]
pub(crate) struct LayerShape {
    pub name: String,
    pub kind: LayerKind,
    pub w_off: usize,
    pub w_len: usize,
    pub b_off: Option<usize>,
    pub b_len: usize,
}

impl LayerShape {
    fn bias(&self) -> bool {
        self.b_off.is_some()
    }

    /// Whether this layer is held factored under `route`.
    fn factored(&self, route: LayerRoute) -> bool {
        match (self.kind, route) {
            (LayerKind::Explicit, _) | (_, LayerRoute::Materialise) => false,
            (_, LayerRoute::Factor) => true,
            (LayerKind::Rows { t, inp, out }, LayerRoute::Auto) => {
                let k = inp + usize::from(self.bias());
                ((t * t) as f64) * ((k + out) as f64) < ((k * out) as f64)
            }
            (LayerKind::Tokens { t, vocab, .. }, LayerRoute::Auto) => t * t < vocab,
        }
    }

    /// f64 values held per example.
    fn per_example(&self, route: LayerRoute) -> usize {
        match (self.factored(route), self.kind) {
            (true, LayerKind::Rows { t, inp, out }) => t * (inp + usize::from(self.bias()) + out),
            (true, LayerKind::Tokens { t, out, .. }) => t * (out + 1),
            _ => self.w_len + self.b_len,
        }
    }
}

/// How one layer is held.
#[derive(Debug, Clone)]
enum Stored {
    /// Rows `row .. row + w_len + b_len` of every example's dense part (weight, then bias).
    Dense { row: usize },
    /// x̃ (N·T × k, row-major, k = in + bias) and Δ (N·T × out, row-major).
    Rows {
        x: Vec<f64>,
        d: Vec<f64>,
        t: usize,
        k: usize,
        out: usize,
    },
    /// Token ids (N·T) and Δ (N·T × out).
    Tokens {
        ids: Vec<usize>,
        d: Vec<f64>,
        t: usize,
        out: usize,
    },
}

/// The per-example gradients of N examples held layer by layer (see the module docs): the
/// gradient operator of a captured or sequential model for the kernel and CG methods, in
/// N·(P_m + Σ_factored T·(in + 1 + out)) f64 instead of N·P.
#[derive(Debug, Clone)]
pub struct LayeredGradients {
    p: usize,
    n: usize,
    shapes: Vec<LayerShape>,
    stored: Vec<Stored>,
    /// N × pm, row-major: example j's materialised gradients at `j * pm`.
    dense: Vec<f64>,
    pm: usize,
}

/// Fails with [`Error::MemoryBudget`] when a layered store of `need` bytes exceeds the budget;
/// `engine` names the engine, `streamed` the operator that recomputes G instead.
pub(crate) fn check_budget(need: u64, budget: u64, engine: &str, streamed: &str) -> Result<()> {
    if need > budget {
        return Err(Error::MemoryBudget {
            what: format!("per-example gradients held layer by layer ({engine} engine)"),
            needed: need,
            budget,
            hint: format!(
                "raise the memory budget, or let the gradient operator stream ({streamed})"
            ),
        });
    }
    Ok(())
}

/// Examples per block of the factored Gram: about this many rows per side.
const BLOCK_ROWS: usize = 1024;

impl LayeredGradients {
    /// Bytes held for `n` examples of these layers under `route`.
    pub(crate) fn bytes_for(shapes: &[LayerShape], n: usize, route: LayerRoute) -> u64 {
        shapes
            .iter()
            .map(|s| s.per_example(route) as u64)
            .sum::<u64>()
            .saturating_mul(n as u64)
            .saturating_mul(8)
    }

    /// An empty store for `n` examples (zeros), laid out by `route`. The shapes must cover
    /// disjoint parts of the P parameters.
    pub(crate) fn new(
        shapes: Vec<LayerShape>,
        p: usize,
        n: usize,
        route: LayerRoute,
    ) -> Result<Self> {
        Self::with_steps(shapes, p, n, route, 1)
    }

    /// As [`LayeredGradients::new`] for examples that apply the network `steps` times (a
    /// rollout): each factored layer holds `steps`·T rows per example. The route is decided on
    /// the one-step shapes, so the result pairs with a one-step store of the same layers.
    pub(crate) fn with_steps(
        shapes: Vec<LayerShape>,
        p: usize,
        n: usize,
        route: LayerRoute,
        steps: usize,
    ) -> Result<Self> {
        let steps = steps.max(1);
        let mut pm = 0;
        let mut stored = Vec::with_capacity(shapes.len());
        for s in &shapes {
            let ends = [s.w_off + s.w_len, s.b_off.map_or(0, |b| b + s.b_len)];
            if ends.iter().any(|e| *e > p) {
                return Err(Error::shape(
                    format!("parameters of layer '{}'", s.name),
                    format!("inside the {p} parameters"),
                    format!("ending at {}", ends[0].max(ends[1])),
                ));
            }
            if let LayerKind::Rows { inp, out, .. } = s.kind {
                if s.w_len != inp * out || (s.bias() && s.b_len != out) {
                    return Err(Error::shape(
                        format!("layer '{}' (weight out×in, bias out)", s.name),
                        format!("{} and {}", inp * out, out),
                        format!("{} and {}", s.w_len, s.b_len),
                    ));
                }
            }
            stored.push(match (s.factored(route), s.kind) {
                (true, LayerKind::Rows { t, inp, out }) => {
                    let k = inp + usize::from(s.bias());
                    let t = t * steps;
                    Stored::Rows {
                        x: vec![0.0; n * t * k],
                        d: vec![0.0; n * t * out],
                        t,
                        k,
                        out,
                    }
                }
                (true, LayerKind::Tokens { t, out, .. }) => Stored::Tokens {
                    ids: vec![0; n * t * steps],
                    d: vec![0.0; n * t * steps * out],
                    t: t * steps,
                    out,
                },
                _ => {
                    let row = pm;
                    pm += s.w_len + s.b_len;
                    Stored::Dense { row }
                }
            });
        }
        Ok(Self {
            p,
            n,
            shapes,
            stored,
            dense: vec![0.0; n * pm],
            pm,
        })
    }

    /// Whether layer `l` is held factored.
    pub(crate) fn is_factored(&self, l: usize) -> bool {
        !matches!(self.stored[l], Stored::Dense { .. })
    }

    /// The layers' shapes.
    pub(crate) fn shapes(&self) -> &[LayerShape] {
        &self.shapes
    }

    /// Example `j`'s materialised gradient of layer `l` (weight, then bias), to write.
    pub(crate) fn dense_mut(&mut self, l: usize, j: usize) -> &mut [f64] {
        let len = self.shapes[l].w_len + self.shapes[l].b_len;
        match self.stored[l] {
            Stored::Dense { row } => {
                let at = j * self.pm + row;
                &mut self.dense[at..at + len]
            }
            _ => &mut [],
        }
    }

    /// Example `j`'s rows of a factored rows layer, to write: x (T × in; the bias column is
    /// set here) and Δ (T × out).
    pub(crate) fn rows_mut(&mut self, l: usize, j: usize) -> (&mut [f64], &mut [f64], usize) {
        let inp = match self.shapes[l].kind {
            LayerKind::Rows { inp, .. } => inp,
            _ => 0,
        };
        match &mut self.stored[l] {
            Stored::Rows { x, d, t, k, out } => {
                let xs = &mut x[j * *t * *k..(j + 1) * *t * *k];
                if *k > inp {
                    xs.chunks_exact_mut(*k).for_each(|r| r[inp] = 1.0);
                }
                (xs, &mut d[j * *t * *out..(j + 1) * *t * *out], *k)
            }
            _ => (&mut [], &mut [], 0),
        }
    }

    /// Example `j`'s token ids (T) and Δ (T × out) of a factored embedding, to write.
    pub(crate) fn tokens_mut(&mut self, l: usize, j: usize) -> (&mut [usize], &mut [f64]) {
        match &mut self.stored[l] {
            Stored::Tokens { ids, d, t, out } => (
                &mut ids[j * *t..(j + 1) * *t],
                &mut d[j * *t * *out..(j + 1) * *t * *out],
            ),
            _ => (&mut [], &mut []),
        }
    }

    /// Fails naming the first layer that holds a NaN or an infinity.
    pub(crate) fn check_finite(&self) -> Result<()> {
        let bad = |v: &[f64]| v.iter().position(|x| !x.is_finite());
        for (s, st) in self.shapes.iter().zip(&self.stored) {
            let found = match st {
                Stored::Dense { row } => {
                    let len = s.w_len + s.b_len;
                    (0..self.n).find_map(|j| {
                        bad(&self.dense[j * self.pm + row..j * self.pm + row + len]).map(|_| j)
                    })
                }
                Stored::Rows { x, d, t, k, out } => bad(x)
                    .map(|i| i / (t * k))
                    .or_else(|| bad(d).map(|i| i / (t * out))),
                Stored::Tokens { d, t, out, .. } => bad(d).map(|i| i / (t * out)),
            };
            if let Some(j) = found {
                return Err(Error::NonFinite {
                    what: format!("per-example gradients of layer '{}'", s.name),
                    detail: format!("example {j}"),
                });
            }
        }
        Ok(())
    }

    fn dense_ref(&self) -> MatRef<'_, f64> {
        MatRef::from_row_major_slice(&self.dense, self.n, self.pm)
    }

    /// The flat indices of the dense part's rows, in order.
    fn dense_index(&self) -> Vec<usize> {
        let mut idx = Vec::with_capacity(self.pm);
        for (s, st) in self.shapes.iter().zip(&self.stored) {
            if let Stored::Dense { .. } = st {
                idx.extend(s.w_off..s.w_off + s.w_len);
                if let Some(b) = s.b_off {
                    idx.extend(b..b + s.b_len);
                }
            }
        }
        idx
    }

    /// How each layer is held: (name, factored).
    pub fn layer_routes(&self) -> Vec<(String, bool)> {
        self.shapes
            .iter()
            .enumerate()
            .map(|(l, s)| (s.name.clone(), self.is_factored(l)))
            .collect()
    }

    fn blocks(&self, t: usize) -> Vec<(usize, usize)> {
        let e = (BLOCK_ROWS / t.max(1)).max(1);
        (0..self.n)
            .step_by(e)
            .map(|s| (s, e.min(self.n - s)))
            .collect()
    }
}

impl LayeredGradients {
    /// Whether `other` holds the same layers the same way (then pairs of their examples can
    /// be taken factor by factor).
    fn same_layout(&self, other: &LayeredGradients) -> bool {
        self.p == other.p
            && self.pm == other.pm
            && self.shapes.len() == other.shapes.len()
            && self
                .shapes
                .iter()
                .zip(&other.shapes)
                .all(|(a, b)| a.kind == b.kind && a.w_off == b.w_off && a.b_off == b.b_off)
            && self
                .stored
                .iter()
                .zip(&other.stored)
                .all(|(a, b)| match (a, b) {
                    (Stored::Dense { row: r }, Stored::Dense { row: s }) => r == s,
                    (Stored::Rows { .. }, Stored::Rows { .. })
                    | (Stored::Tokens { .. }, Stored::Tokens { .. }) => true,
                    _ => false,
                })
    }

    /// K[i, j] += ⟨gᵢ, g'ⱼ⟩ for i in self, j in `other` (same layout), as `pairs` says.
    fn add_pairs(&self, other: &LayeredGradients, mut kmat: MatMut<'_, f64>, pairs: Pairs) {
        let lower = pairs == Pairs::Lower;
        if self.pm > 0 && self.n > 0 && other.n > 0 {
            let (a, b) = (self.dense_ref(), other.dense_ref().transpose());
            if lower {
                // the materialised layers' G_m G_mᵀ: the lower half of the product
                faer::linalg::matmul::triangular::matmul(
                    kmat.rb_mut(),
                    BlockStructure::TriangularLower,
                    Accum::Add,
                    a,
                    BlockStructure::Rectangular,
                    b,
                    BlockStructure::Rectangular,
                    1.0,
                    Par::rayon(0),
                );
            } else {
                matmul(kmat.rb_mut(), Accum::Add, a, b, 1.0, Par::rayon(0));
            }
        }
        // factored layers read once per example (T = 1, an MLP's or a classifier head's
        // Linear): all of them in one tiled pass down the lower triangle
        let single: Vec<(MatRef<'_, f64>, MatRef<'_, f64>)> = if lower {
            self.stored
                .iter()
                .filter_map(|st| match st {
                    Stored::Rows { x, d, t: 1, k, out } => Some((
                        MatRef::from_row_major_slice(x, self.n, *k),
                        MatRef::from_row_major_slice(d, self.n, *out),
                    )),
                    _ => None,
                })
                .collect()
        } else {
            Vec::new()
        };
        if !single.is_empty() {
            add_lower_single_rows(&single, kmat.rb_mut());
        }
        for (sa_st, sb_st) in self.stored.iter().zip(&other.stored) {
            let (ta, o) = match sa_st {
                Stored::Dense { .. } => continue,
                Stored::Rows { t: 1, .. } if lower => continue,
                Stored::Rows { t, out, .. } | Stored::Tokens { t, out, .. } => (*t, *out),
            };
            let tb = match sb_st {
                Stored::Rows { t, .. } | Stored::Tokens { t, .. } => *t,
                Stored::Dense { .. } => continue,
            };
            let ba = self.blocks(ta);
            let bb = other.blocks(tb);
            for (a, &(sa, la)) in ba.iter().enumerate() {
                let b_list = if lower { &bb[..=a] } else { &bb[..] };
                for &(sb, lb) in b_list {
                    let (ra, rb) = (la * ta, lb * tb);
                    let (da, db) = match (sa_st, sb_st) {
                        (Stored::Rows { d: x, .. }, Stored::Rows { d: y, .. })
                        | (Stored::Tokens { d: x, .. }, Stored::Tokens { d: y, .. }) => (x, y),
                        _ => continue,
                    };
                    let da =
                        MatRef::from_row_major_slice(&da[sa * ta * o..(sa + la) * ta * o], ra, o);
                    let db =
                        MatRef::from_row_major_slice(&db[sb * tb * o..(sb + lb) * tb * o], rb, o);
                    let dd = crate::scalar::product(da, db.transpose());
                    let diagonal_block = lower && sa == sb;
                    match (sa_st, sb_st) {
                        (Stored::Rows { x: xa, k, .. }, Stored::Rows { x: xb, .. }) => {
                            let k = *k;
                            let xa = MatRef::from_row_major_slice(
                                &xa[sa * ta * k..(sa + la) * ta * k],
                                ra,
                                k,
                            );
                            let xb = MatRef::from_row_major_slice(
                                &xb[sb * tb * k..(sb + lb) * tb * k],
                                rb,
                                k,
                            );
                            let xx = crate::scalar::product(xa, xb.transpose());
                            add_block_sums(
                                kmat.rb_mut(),
                                &dd,
                                Some(&xx),
                                None,
                                (ta, tb),
                                (sa, la),
                                (sb, lb),
                                diagonal_block,
                            );
                        }
                        (Stored::Tokens { ids: ia, .. }, Stored::Tokens { ids: ib, .. }) => {
                            let ia = &ia[sa * ta..(sa + la) * ta];
                            let ib = &ib[sb * tb..(sb + lb) * tb];
                            add_block_sums(
                                kmat.rb_mut(),
                                &dd,
                                None,
                                Some((ia, ib)),
                                (ta, tb),
                                (sa, la),
                                (sb, lb),
                                diagonal_block,
                            );
                        }
                        _ => {}
                    }
                }
            }
        }
    }

    /// ‖gᵢ‖² of every example.
    pub fn sq_norms(&self) -> Vec<f64> {
        let mut out: Vec<f64> = (0..self.n)
            .map(|j| {
                self.dense[j * self.pm..(j + 1) * self.pm]
                    .iter()
                    .map(|v| v * v)
                    .sum()
            })
            .collect();
        for st in &self.stored {
            match st {
                Stored::Dense { .. } => {}
                Stored::Rows { x, d, t, k, out: o } => {
                    for (j, acc) in out.iter_mut().enumerate() {
                        for u in 0..*t {
                            let (xu, du) = (j * t + u, j * t + u);
                            for v in 0..*t {
                                let (xv, dv) = (j * t + v, j * t + v);
                                let xx: f64 = (0..*k).map(|c| x[xu * k + c] * x[xv * k + c]).sum();
                                let dd: f64 = (0..*o).map(|c| d[du * o + c] * d[dv * o + c]).sum();
                                *acc += xx * dd;
                            }
                        }
                    }
                }
                Stored::Tokens { ids, d, t, out: o } => {
                    for (j, acc) in out.iter_mut().enumerate() {
                        for u in 0..*t {
                            for v in 0..*t {
                                if ids[j * t + u] == ids[j * t + v] {
                                    *acc += (0..*o)
                                        .map(|c| d[(j * t + u) * o + c] * d[(j * t + v) * o + c])
                                        .sum::<f64>();
                                }
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// Forms each example's gradient of a factored rows layer (Δⱼᵀ X̃ⱼ, one small matmul) and
    /// calls `f(example, flat index, value)` for every entry.
    fn each_rows_gradient(
        &self,
        s: &LayerShape,
        (x, d, t, k, o): (&[f64], &[f64], usize, usize, usize),
        mut f: impl FnMut(usize, usize, f64),
    ) {
        let inp = k - usize::from(s.bias());
        let mut w = Mat::<f64>::zeros(o, k);
        for j in 0..self.n {
            let xj = MatRef::from_row_major_slice(&x[j * t * k..(j + 1) * t * k], t, k);
            let dj = MatRef::from_row_major_slice(&d[j * t * o..(j + 1) * t * o], t, o);
            matmul(
                w.as_mut(),
                Accum::Replace,
                dj.transpose(),
                xj,
                1.0,
                Par::Seq,
            );
            for q in 0..o {
                for i in 0..inp {
                    f(j, s.w_off + q * inp + i, w[(q, i)]);
                }
                if let Some(b) = s.b_off {
                    f(j, b + q, w[(q, inp)]);
                }
            }
        }
    }

    /// The gradients as a P×N matrix (one column per example): for a Σ that needs them formed.
    pub fn to_dense(&self) -> Mat<f64> {
        let mut g = Mat::<f64>::zeros(self.p, self.n);
        let idx = self.dense_index();
        for j in 0..self.n {
            for (r, &p) in idx.iter().enumerate() {
                g[(p, j)] = self.dense[j * self.pm + r];
            }
        }
        for (s, st) in self.shapes.iter().zip(&self.stored) {
            match st {
                Stored::Dense { .. } => {}
                Stored::Rows { x, d, t, k, out: o } => {
                    self.each_rows_gradient(s, (x, d, *t, *k, *o), |j, p, v| g[(p, j)] = v);
                }
                Stored::Tokens { ids, d, t, out: o } => {
                    for r in 0..self.n * t {
                        let base = s.w_off + ids[r] * o;
                        for q in 0..*o {
                            g[(base + q, r / t)] += d[r * o + q];
                        }
                    }
                }
            }
        }
        g
    }
}

/// Calls `f(flat index, value)` for each entry of a rows layer's `m` (out × k: the weight's
/// entries, then the bias column when the layer has one).
fn scatter_rows_layer(s: &LayerShape, m: &Mat<f64>, mut f: impl FnMut(usize, f64)) {
    let inp = m.ncols() - usize::from(s.bias());
    for q in 0..m.nrows() {
        for i in 0..inp {
            f(s.w_off + q * inp + i, m[(q, i)]);
        }
        if let Some(b) = s.b_off {
            f(b + q, m[(q, inp)]);
        }
    }
}

/// Which pairs [`LayeredGradients::add_pairs`] adds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pairs {
    /// every (i in self, j in other)
    Cross,
    /// other = self: the lower triangle only (diagonal included); nothing above it is touched
    Lower,
}

/// Σ over each example pair's ta×tb block of a ∘ b (both (la·ta) × (lb·tb)), added into
/// `k[(sa + i, sb + j)]`; on a `diagonal_block` (the same examples on both sides, lower
/// triangle wanted) only where i ≥ j.
#[allow(clippy::too_many_arguments)]
fn add_block_sums(
    mut k: MatMut<'_, f64>,
    a: &Mat<f64>,
    b: Option<&Mat<f64>>,
    mask: Option<(&[usize], &[usize])>,
    (ta, tb): (usize, usize),
    (sa, la): (usize, usize),
    (sb, lb): (usize, usize),
    diagonal_block: bool,
) {
    for j in 0..lb {
        for i in (if diagonal_block { j } else { 0 })..la {
            let mut s = 0.0;
            for v in 0..tb {
                let c = j * tb + v;
                let ac = a.col(c);
                for u in 0..ta {
                    let r = i * ta + u;
                    let w = match mask {
                        Some((ia, ib)) => {
                            if ia[r] != ib[c] {
                                continue;
                            }
                            1.0
                        }
                        None => b.map_or(1.0, |b| b[(r, c)]),
                    };
                    s += ac[r] * w;
                }
            }
            k[(sa + i, sb + j)] += s;
        }
    }
}

/// Edge of the tiles of [`add_lower_single_rows`]: a 128×128 f64 tile and its two per-layer
/// products (3 × 128 KiB) stay in L2 while the layers are summed into it.
const GRAM_TILE: usize = 128;

/// Adds Σ_l (X̃_l X̃_lᵀ)∘(Δ_l Δ_lᵀ) into the lower triangle of `k` (N×N, diagonal included) for
/// layers read once per example (`layers`: X̃ N×k with its bias column, Δ N×out). One task
/// per block of columns, tile by tile down the triangle, every layer summed into a tile while
/// it is in cache; the tasks write disjoint columns. Work N²/2·Σ_l(k_l + out_l), no memory
/// beyond two tiles per task.
fn add_lower_single_rows(layers: &[(MatRef<'_, f64>, MatRef<'_, f64>)], k: MatMut<'_, f64>) {
    use rayon::prelude::*;
    let n = k.nrows();
    let t = GRAM_TILE;
    k.par_col_chunks_mut(t)
        .enumerate()
        .with_max_len(1)
        .for_each(|(bj, mut kc)| {
            let (c0, w) = (bj * t, kc.ncols());
            let mut xx = Mat::<f64>::zeros(t, w);
            let mut dd = Mat::<f64>::zeros(t, w);
            for r0 in (c0..n).step_by(t) {
                let h = t.min(n - r0);
                for (x, d) in layers {
                    let mut xt = xx.as_mut().submatrix_mut(0, 0, h, w);
                    let mut dt = dd.as_mut().submatrix_mut(0, 0, h, w);
                    let (xi, xj) = (x.subrows(r0, h), x.subrows(c0, w));
                    matmul(
                        xt.rb_mut(),
                        Accum::Replace,
                        xi,
                        xj.transpose(),
                        1.0,
                        Par::Seq,
                    );
                    let (di, dj) = (d.subrows(r0, h), d.subrows(c0, w));
                    matmul(
                        dt.rb_mut(),
                        Accum::Replace,
                        di,
                        dj.transpose(),
                        1.0,
                        Par::Seq,
                    );
                    for j in 0..w {
                        // rows ≥ c0 + j of column c0 + j: the lower triangle only
                        let skip = (c0 + j).saturating_sub(r0).min(h);
                        let kcol = kc.rb_mut().col_mut(j).subrows_mut(r0 + skip, h - skip);
                        let xc = xt.rb().col(j).subrows(skip, h - skip);
                        let dc = dt.rb().col(j).subrows(skip, h - skip);
                        kcol.iter_mut()
                            .zip(xc.iter())
                            .zip(dc.iter())
                            .for_each(|((k, x), d)| *k += x * d);
                    }
                }
            }
        });
}

impl LayeredGradients {
    /// P.
    pub fn num_params(&self) -> usize {
        self.p
    }

    /// N.
    pub fn num_examples(&self) -> usize {
        self.n
    }

    /// G V for a P×k block (N×k), layer by layer.
    pub fn jv(&self, v: MatRef<'_, f64>) -> Result<Mat<f64>> {
        if v.nrows() != self.p {
            return Err(Error::shape("V in G·V (P rows)", self.p, v.nrows()));
        }
        let c = v.ncols();
        let mut out = if self.pm > 0 {
            let idx = self.dense_index();
            let vm = Mat::from_fn(self.pm, c, |r, j| v[(idx[r], j)]);
            crate::scalar::product(self.dense_ref(), vm.as_ref())
        } else {
            Mat::<f64>::zeros(self.n, c)
        };
        for (s, st) in self.shapes.iter().zip(&self.stored) {
            match st {
                Stored::Dense { .. } => {}
                Stored::Rows { x, d, t, k, out: o } => {
                    let (t, k, o) = (*t, *k, *o);
                    let inp = k - usize::from(s.bias());
                    let blocks = self.blocks(t);
                    let most = blocks.iter().map(|b| b.1).max().unwrap_or(0) * t;
                    let mut y = vec![0.0f64; most * o];
                    for col in 0..c {
                        // W̃ (k × out): column q holds weight row q and the bias entry
                        let w = Mat::from_fn(k, o, |i, q| {
                            if i < inp {
                                v[(s.w_off + q * inp + i, col)]
                            } else {
                                v[(s.b_off.unwrap_or(0) + q, col)]
                            }
                        });
                        for &(sa, la) in &blocks {
                            let (r0, ra) = (sa * t, la * t);
                            let xa = MatRef::from_row_major_slice(&x[r0 * k..(r0 + ra) * k], ra, k);
                            let ya = &mut y[..ra * o];
                            matmul(
                                MatMut::from_row_major_slice_mut(ya, ra, o),
                                Accum::Replace,
                                xa,
                                w.as_ref(),
                                1.0,
                                Par::rayon(0),
                            );
                            // example j: Σₜ δₜ·(X̃ₜ W̃), rows of Δ and of the product in step
                            let da = &d[r0 * o..(r0 + ra) * o];
                            for j in 0..la {
                                let rows = j * t * o..(j + 1) * t * o;
                                out[(sa + j, col)] += da[rows.clone()]
                                    .iter()
                                    .zip(&ya[rows])
                                    .map(|(a, b)| a * b)
                                    .sum::<f64>();
                            }
                        }
                    }
                }
                Stored::Tokens { ids, d, t, out: o } => {
                    for col in 0..c {
                        for j in 0..self.n {
                            let mut acc = 0.0;
                            for r in j * t..(j + 1) * t {
                                let base = s.w_off + ids[r] * o;
                                acc += (0..*o)
                                    .map(|q| d[r * o + q] * v[(base + q, col)])
                                    .sum::<f64>();
                            }
                            out[(j, col)] += acc;
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// Gᵀ U for an N×k block (P×k), layer by layer.
    pub fn jtu(&self, u: MatRef<'_, f64>) -> Result<Mat<f64>> {
        if u.nrows() != self.n {
            return Err(Error::shape("U in Gᵀ·U (N rows)", self.n, u.nrows()));
        }
        let c = u.ncols();
        let mut out = Mat::<f64>::zeros(self.p, c);
        if self.pm > 0 {
            let gm = crate::scalar::product(self.dense_ref().transpose(), u);
            for (r, &p) in self.dense_index().iter().enumerate() {
                for j in 0..c {
                    out[(p, j)] = gm[(r, j)];
                }
            }
        }
        for (s, st) in self.shapes.iter().zip(&self.stored) {
            match st {
                Stored::Dense { .. } => {}
                Stored::Rows { x, d, t, k, out: o } => {
                    let (t, k, o) = (*t, *k, *o);
                    let blocks = self.blocks(t);
                    let most = blocks.iter().map(|b| b.1).max().unwrap_or(0) * t;
                    let mut du = vec![0.0f64; most * o];
                    let mut g = Mat::<f64>::zeros(o, k);
                    for col in 0..c {
                        for &(sa, la) in &blocks {
                            let (r0, ra) = (sa * t, la * t);
                            let xa = MatRef::from_row_major_slice(&x[r0 * k..(r0 + ra) * k], ra, k);
                            // Δ's rows scaled by their example's u, row-major like Δ
                            let dua = &mut du[..ra * o];
                            for (r, (dst, src)) in dua
                                .chunks_exact_mut(o)
                                .zip(d[r0 * o..(r0 + ra) * o].chunks_exact(o))
                                .enumerate()
                            {
                                let w = u[(sa + r / t, col)];
                                dst.iter_mut().zip(src).for_each(|(a, b)| *a = b * w);
                            }
                            let acc = if sa == 0 { Accum::Replace } else { Accum::Add };
                            matmul(
                                g.as_mut(),
                                acc,
                                MatRef::from_row_major_slice(dua, ra, o).transpose(),
                                xa,
                                1.0,
                                Par::rayon(0),
                            );
                        }
                        if blocks.is_empty() {
                            continue;
                        }
                        scatter_rows_layer(s, &g, |p, v| out[(p, col)] += v);
                    }
                }
                Stored::Tokens { ids, d, t, out: o } => {
                    for col in 0..c {
                        for r in 0..self.n * t {
                            let w = u[(r / t, col)];
                            let base = s.w_off + ids[r] * o;
                            for q in 0..*o {
                                out[(base + q, col)] += w * d[r * o + q];
                            }
                        }
                    }
                }
            }
        }
        Ok(out)
    }

    /// K = G Gᵀ (N×N).
    pub fn gram(&self) -> Result<Mat<f64>> {
        let mut kmat = Mat::<f64>::zeros(self.n, self.n);
        self.add_pairs(self, kmat.as_mut(), Pairs::Lower);
        crate::engine::gram::mirror_lower(kmat.as_mut());
        Ok(kmat)
    }

    /// Adds the lower triangle of K = G Gᵀ into `out` (N×N), layer by layer.
    pub fn gram_lower_into(&self, out: MatMut<'_, f64>) -> Result<()> {
        crate::engine::gram::check_gram_out(out.rb(), self.n)?;
        self.add_pairs(self, out, Pairs::Lower);
        Ok(())
    }

    /// G·q for query gradients held layer by layer in the same layout (N×M); `None` when the layouts differ.
    pub fn cross_gram_layered(&self, q: &LayeredGradients) -> Option<Result<Mat<f64>>> {
        if !self.same_layout(q) {
            return None;
        }
        let mut kmat = Mat::<f64>::zeros(self.n, q.n);
        self.add_pairs(q, kmat.as_mut(), Pairs::Cross);
        Some(Ok(kmat))
    }

    /// Σᵢ gᵢ∘gᵢ (length P). A factored layer read once per example takes one matmul,
    /// (Δ∘Δ)ᵀ(X̃∘X̃); the others form each example's gradient of the layer in turn.
    pub fn diag_sums(&self) -> Result<Vec<f64>> {
        let mut acc = vec![0.0f64; self.p];
        let idx = self.dense_index();
        for j in 0..self.n {
            let row = &self.dense[j * self.pm..(j + 1) * self.pm];
            for (r, v) in row.iter().enumerate() {
                acc[idx[r]] += v * v;
            }
        }
        for (s, st) in self.shapes.iter().zip(&self.stored) {
            match st {
                Stored::Rows {
                    x,
                    d,
                    t: 1,
                    k,
                    out: o,
                } => {
                    let sq = |v: &[f64]| v.iter().map(|a| a * a).collect::<Vec<f64>>();
                    let (sqx, sqd) = (sq(x), sq(d));
                    let m = crate::scalar::product(
                        MatRef::from_row_major_slice(&sqd, self.n, *o).transpose(),
                        MatRef::from_row_major_slice(&sqx, self.n, *k),
                    );
                    scatter_rows_layer(s, &m, |p, v| acc[p] += v);
                }
                _ => self.each_factored_gradient(s, st, |_, p, v| acc[p] += v * v),
            }
        }
        Ok(acc)
    }

    /// gᵢᵀ diag(s) gᵢ for every example, without forming the gradients of a factored layer
    /// read once per example: Σ_l rowsum((Δ∘Δ)∘((X̃∘X̃) S̃_l)), S̃_l the layer's part of `s`
    /// (weight, then bias) as k×out. The other layers form each example's gradient in turn.
    pub fn quad_forms_diag(&self, s: &[f64]) -> Result<Vec<f64>> {
        if s.len() != self.p {
            return Err(Error::shape("diagonal Sigma", self.p, s.len()));
        }
        let idx = self.dense_index();
        let mut out: Vec<f64> = (0..self.n)
            .map(|j| {
                self.dense[j * self.pm..(j + 1) * self.pm]
                    .iter()
                    .zip(&idx)
                    .map(|(g, &p)| s[p] * g * g)
                    .sum()
            })
            .collect();
        for (shape, st) in self.shapes.iter().zip(&self.stored) {
            match st {
                Stored::Rows {
                    x,
                    d,
                    t: 1,
                    k,
                    out: o,
                } => {
                    let inp = k - usize::from(shape.bias());
                    let sw = Mat::from_fn(*k, *o, |i, q| {
                        if i < inp {
                            s[shape.w_off + q * inp + i]
                        } else {
                            s[shape.b_off.unwrap_or(0) + q]
                        }
                    });
                    let sqx: Vec<f64> = x.iter().map(|a| a * a).collect();
                    let tm = crate::scalar::product(
                        MatRef::from_row_major_slice(&sqx, self.n, *k),
                        sw.as_ref(),
                    );
                    for (j, f) in out.iter_mut().enumerate() {
                        let dr = &d[j * o..(j + 1) * o];
                        *f += dr
                            .iter()
                            .enumerate()
                            .map(|(q, dv)| dv * dv * tm[(j, q)])
                            .sum::<f64>();
                    }
                }
                _ => self.each_factored_gradient(shape, st, |j, p, v| out[j] += s[p] * v * v),
            }
        }
        Ok(out)
    }

    /// Calls `f(example, flat index, value)` for every gradient entry of a factored layer (rows
    /// or tokens), forming each example's gradient in turn; nothing for a materialised one.
    fn each_factored_gradient(
        &self,
        shape: &LayerShape,
        st: &Stored,
        f: impl FnMut(usize, usize, f64),
    ) {
        match st {
            Stored::Dense { .. } => {}
            Stored::Rows { x, d, t, k, out } => {
                self.each_rows_gradient(shape, (x, d, *t, *k, *out), f)
            }
            Stored::Tokens { ids, d, t, out } => {
                self.each_tokens_gradient(shape, (ids, d, *t, *out), f)
            }
        }
    }

    /// Forms each example's gradient of a factored embedding (the rows of Δ summed per token
    /// id) and calls `f(example, flat index, value)` for every row it touches.
    fn each_tokens_gradient(
        &self,
        s: &LayerShape,
        (ids, d, t, o): (&[usize], &[f64], usize, usize),
        mut f: impl FnMut(usize, usize, f64),
    ) {
        let mut order: Vec<usize> = Vec::with_capacity(t);
        let mut row = vec![0.0f64; o];
        for j in 0..self.n {
            let id = &ids[j * t..(j + 1) * t];
            order.clear();
            order.extend(0..t);
            order.sort_by_key(|&q| id[q]);
            let mut q = 0;
            while q < t {
                let v = id[order[q]];
                row.iter_mut().for_each(|r| *r = 0.0);
                while q < t && id[order[q]] == v {
                    let at = (j * t + order[q]) * o;
                    row.iter_mut()
                        .zip(&d[at..at + o])
                        .for_each(|(r, x)| *r += x);
                    q += 1;
                }
                let base = s.w_off + v * o;
                for (c, r) in row.iter().enumerate() {
                    f(j, base + c, *r);
                }
            }
        }
    }

    /// Σ over layers of the cost per Gram entry (in + out for a factored layer, its width otherwise).
    pub fn gram_width(&self) -> usize {
        self.pm
            + self
                .stored
                .iter()
                .map(|st| match st {
                    Stored::Dense { .. } => 0,
                    Stored::Rows { t, k, out, .. } => t * t * (k + out),
                    Stored::Tokens { t, out, .. } => t * t * out,
                })
                .sum::<usize>()
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        let mut b = self.dense.len() as u64 * 8;
        for st in &self.stored {
            b += match st {
                Stored::Dense { .. } => 0,
                Stored::Rows { x, d, .. } => (x.len() + d.len()) as u64 * 8,
                Stored::Tokens { ids, d, .. } => (ids.len() + d.len()) as u64 * 8,
            };
        }
        b
    }
}
