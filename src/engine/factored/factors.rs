//! Per-layer factors (X, Δ) of a set of examples and the products they give without the N×P
//! gradient matrix G (row i of G is example i's gradient, in the MLP's flat layout).

use crate::engine::gram::{check_gram_out, mirror_lower};
use faer::linalg::matmul::matmul;
use faer::reborrow::{Reborrow, ReborrowMut};
use faer::{Accum, Mat, MatMut, MatRef, Par};

use crate::error::{Error, Result};
use crate::model::{gram_width, layer_offsets, num_params_of};

/// One Linear layer's factors for N examples: inputs X (N×in) and signals Δ (N×out), f64,
/// stored row-major (one example per row).
#[derive(Debug, Clone)]
pub struct LayerFactors {
    x: Vec<f64>,
    d: Vec<f64>,
    inp: usize,
    out: usize,
}

impl LayerFactors {
    /// Layer inputs X (N×in), one row per example.
    pub fn x(&self) -> MatRef<'_, f64> {
        MatRef::from_row_major_slice(&self.x, self.x.len() / self.inp.max(1), self.inp)
    }
    /// Back-propagated signals Δ (N×out), ∂uᵢ/∂zᵢ, one row per example.
    pub fn d(&self) -> MatRef<'_, f64> {
        MatRef::from_row_major_slice(&self.d, self.d.len() / self.out.max(1), self.out)
    }
    fn x_row(&self, i: usize) -> &[f64] {
        &self.x[i * self.inp..(i + 1) * self.inp]
    }
    fn d_row(&self, i: usize) -> &[f64] {
        &self.d[i * self.out..(i + 1) * self.out]
    }
}

/// The factors of N examples for every layer. Memory: N·Σ_l(in_l + out_l) f64.
#[derive(Debug, Clone)]
pub struct Factors {
    layers: Vec<LayerFactors>,
    sizes: Vec<usize>,
    n: usize,
}

/// Edge of the Gram matrix's tiles: a 128×128 f64 tile and its two per-layer products (3 ×
/// 128 KiB) stay in L2 while the layers are summed into it.
const GRAM_TILE: usize = 128;

fn par() -> Par {
    Par::rayon(0)
}

/// Column `j` of a matrix as a contiguous slice (copying when it is not).
fn col_vec(m: MatRef<'_, f64>, j: usize) -> std::borrow::Cow<'_, [f64]> {
    match m.col(j).try_as_col_major() {
        Some(c) => std::borrow::Cow::Borrowed(c.as_slice()),
        None => std::borrow::Cow::Owned((0..m.nrows()).map(|i| m[(i, j)]).collect()),
    }
}

impl Factors {
    pub(crate) fn zeros(sizes: &[usize], n: usize) -> Self {
        let layers = sizes
            .windows(2)
            .map(|w| LayerFactors {
                x: vec![0.0; n * w[0]],
                d: vec![0.0; n * w[1]],
                inp: w[0],
                out: w[1],
            })
            .collect();
        Self {
            layers,
            sizes: sizes.to_vec(),
            n,
        }
    }

    pub(crate) fn write_rows(
        &mut self,
        l: usize,
        start: usize,
        xs: &[f64],
        inp: usize,
        ds: &[f64],
        out: usize,
    ) {
        let lf = &mut self.layers[l];
        lf.x[start * inp..start * inp + xs.len()].copy_from_slice(xs);
        lf.d[start * out..start * out + ds.len()].copy_from_slice(ds);
    }

    /// N.
    pub fn num_examples(&self) -> usize {
        self.n
    }

    /// P.
    pub fn num_params(&self) -> usize {
        num_params_of(&self.sizes)
    }

    /// The per-layer factors.
    pub fn layers(&self) -> &[LayerFactors] {
        &self.layers
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        (self.n * gram_width(&self.sizes) * 8) as u64
    }

    fn check_rows(&self, what: &str, rows: usize, want: usize) -> Result<()> {
        if rows != want {
            return Err(Error::shape(
                what,
                format!("{want} rows"),
                format!("{rows} rows"),
            ));
        }
        Ok(())
    }

    /// Σᵢ gᵢ∘gᵢ: per layer (Δ∘Δ)ᵀ(X∘X) and Σᵢ δᵢ².
    pub fn diag_sums(&self) -> Vec<f64> {
        let mut out = vec![0.0; self.num_params()];
        for (lf, &(w_off, b_off, inp, o)) in self.layers.iter().zip(&layer_offsets(&self.sizes)) {
            let sqx: Vec<f64> = lf.x.iter().map(|v| v * v).collect();
            let sqd: Vec<f64> = lf.d.iter().map(|v| v * v).collect();
            matmul(
                MatMut::from_row_major_slice_mut(&mut out[w_off..w_off + o * inp], o, inp),
                Accum::Replace,
                MatRef::from_row_major_slice(&sqd, self.n, o).transpose(),
                MatRef::from_row_major_slice(&sqx, self.n, inp),
                1.0,
                par(),
            );
            let bias = &mut out[b_off..b_off + o];
            for row in sqd.chunks_exact(o) {
                bias.iter_mut().zip(row).for_each(|(b, v)| *b += v);
            }
        }
        out
    }

    /// The gradients of examples `start..start+len` as a P×len block (one column each).
    pub fn gradients(&self, start: usize, len: usize) -> Result<Mat<f64>> {
        crate::data::check_range(self.n, start, len)?;
        let p = self.num_params();
        let mut g = Mat::<f64>::zeros(p, len);
        let offsets = layer_offsets(&self.sizes);
        for j in 0..len {
            let col = g.col_as_slice_mut(j);
            for (lf, &(w_off, b_off, inp, o)) in self.layers.iter().zip(&offsets) {
                let (x, d) = (lf.x_row(start + j), lf.d_row(start + j));
                for (r, dr) in d.iter().enumerate() {
                    col[w_off + r * inp..w_off + (r + 1) * inp]
                        .iter_mut()
                        .zip(x)
                        .for_each(|(c, xv)| *c = dr * xv);
                }
                col[b_off..b_off + o].copy_from_slice(d);
            }
        }
        Ok(g)
    }

    /// J·V = G V for a P×k block V: (N×k). Per layer and column one matmul X·V_Wᵀ (N×in·in×out).
    pub fn jv(&self, v: MatRef<'_, f64>) -> Result<Mat<f64>> {
        self.check_rows("V in J·V (P rows)", v.nrows(), self.num_params())?;
        let k = v.ncols();
        let mut out = Mat::<f64>::zeros(self.n, k);
        let offsets = layer_offsets(&self.sizes);
        let max_out = offsets.iter().map(|o| o.3).max().unwrap_or(0);
        let mut t = vec![0.0; self.n * max_out];
        for c in 0..k {
            let vc = col_vec(v, c);
            let oc = out.col_as_slice_mut(c);
            for (lf, &(w_off, b_off, inp, o)) in self.layers.iter().zip(&offsets) {
                let t = &mut t[..self.n * o];
                matmul(
                    MatMut::from_row_major_slice_mut(t, self.n, o),
                    Accum::Replace,
                    lf.x(),
                    MatRef::from_row_major_slice(&vc[w_off..w_off + o * inp], o, inp).transpose(),
                    1.0,
                    par(),
                );
                let vb = &vc[b_off..b_off + o];
                for (i, acc) in oc.iter_mut().enumerate() {
                    let (tr, dr) = (&t[i * o..(i + 1) * o], lf.d_row(i));
                    *acc += dr
                        .iter()
                        .zip(tr)
                        .zip(vb)
                        .map(|((d, t), b)| d * (t + b))
                        .sum::<f64>();
                }
            }
        }
        Ok(out)
    }

    /// Jᵀ·U = Gᵀ U for an N×k block U: (P×k). Per layer and column one matmul (Δ∘u)ᵀ X.
    pub fn jtu(&self, u: MatRef<'_, f64>) -> Result<Mat<f64>> {
        self.check_rows("U in Jᵀ·U (N rows)", u.nrows(), self.n)?;
        let k = u.ncols();
        let mut out = Mat::<f64>::zeros(self.num_params(), k);
        let offsets = layer_offsets(&self.sizes);
        let max_out = offsets.iter().map(|o| o.3).max().unwrap_or(0);
        let mut a = vec![0.0; self.n * max_out];
        for c in 0..k {
            let uc = col_vec(u, c);
            let oc = out.col_as_slice_mut(c);
            for (lf, &(w_off, b_off, inp, o)) in self.layers.iter().zip(&offsets) {
                let a = &mut a[..self.n * o];
                for (i, ui) in uc.iter().enumerate() {
                    a[i * o..(i + 1) * o]
                        .iter_mut()
                        .zip(lf.d_row(i))
                        .for_each(|(a, d)| *a = d * ui);
                }
                matmul(
                    MatMut::from_row_major_slice_mut(&mut oc[w_off..w_off + o * inp], o, inp),
                    Accum::Replace,
                    MatRef::from_row_major_slice(a, self.n, o).transpose(),
                    lf.x(),
                    1.0,
                    par(),
                );
                let bias = &mut oc[b_off..b_off + o];
                bias.fill(0.0);
                for row in a.chunks_exact(o) {
                    bias.iter_mut().zip(row).for_each(|(b, v)| *b += v);
                }
            }
        }
        Ok(out)
    }

    /// F·V = Gᵀ(G V)/N, the MEAN empirical Fisher applied to a P×k block (zero when N = 0).
    pub fn fisher_apply(&self, v: MatRef<'_, f64>) -> Result<Mat<f64>> {
        let mut out = self.jtu(self.jv(v)?.as_ref())?;
        let inv = if self.n == 0 {
            0.0
        } else {
            1.0 / self.n as f64
        };
        for j in 0..out.ncols() {
            for i in 0..out.nrows() {
                out[(i, j)] *= inv;
            }
        }
        Ok(out)
    }

    /// G·Hᵀ for another set of factors H of the same model (N×M):
    /// Σ_l (X X_Hᵀ + 1)∘(Δ Δ_Hᵀ). With H = self this is the Gram matrix K = G Gᵀ.
    /// Memory: the N×M result plus two N×512 blocks.
    pub fn cross_gram(&self, other: &Factors) -> Result<Mat<f64>> {
        if other.sizes != self.sizes {
            return Err(Error::shape(
                "factors of another model",
                format!("{:?}", self.sizes),
                format!("{:?}", other.sizes),
            ));
        }
        let (n, m) = (self.n, other.n);
        let mut k = Mat::<f64>::zeros(n, m);
        let block = 512;
        let mut xx = Mat::<f64>::zeros(n, block.min(m.max(1)));
        let mut dd = Mat::<f64>::zeros(n, block.min(m.max(1)));
        for c0 in (0..m).step_by(block) {
            let w = block.min(m - c0);
            for (a, b) in self.layers.iter().zip(&other.layers) {
                matmul(
                    xx.as_mut().subcols_mut(0, w),
                    Accum::Replace,
                    a.x(),
                    b.x().subrows(c0, w).transpose(),
                    1.0,
                    par(),
                );
                matmul(
                    dd.as_mut().subcols_mut(0, w),
                    Accum::Replace,
                    a.d(),
                    b.d().subrows(c0, w).transpose(),
                    1.0,
                    par(),
                );
                for j in 0..w {
                    let (kc, xc, dc) = (
                        k.col_as_slice_mut(c0 + j),
                        xx.col_as_slice(j),
                        dd.col_as_slice(j),
                    );
                    kc.iter_mut()
                        .zip(xc)
                        .zip(dc)
                        .for_each(|((k, x), d)| *k += (x + 1.0) * d);
                }
            }
        }
        Ok(k)
    }

    /// The N×N Gram matrix K = G Gᵀ = Σ_l (X Xᵀ + 1)∘(Δ Δᵀ). Memory O(N²) plus two 128×128
    /// tiles per thread. Only the lower triangle is computed ([`Factors::gram_lower_into`]);
    /// the upper is mirrored.
    pub fn gram(&self) -> Mat<f64> {
        let mut k = Mat::<f64>::zeros(self.n, self.n);
        self.add_gram_lower(k.as_mut());
        mirror_lower(k.as_mut());
        k
    }

    /// Adds the lower triangle of K = G Gᵀ (diagonal included) into `out` (N×N); the entries
    /// above the diagonal are not touched. Work: N²/2·Σ_l(in_l + out_l) multiply-adds, in
    /// 128×128 tiles over the rayon pool; no memory beyond `out` but two tiles per thread.
    pub fn gram_lower_into(&self, out: MatMut<'_, f64>) -> Result<()> {
        check_gram_out(out.rb(), self.n)?;
        self.add_gram_lower(out);
        Ok(())
    }

    fn add_gram_lower(&self, k: MatMut<'_, f64>) {
        use rayon::prelude::*;
        let n = self.n;
        let t = GRAM_TILE;
        // one task per block of t columns, tile by tile down the lower triangle: a tile and its
        // two per-layer products stay in cache, and the tasks write disjoint columns
        k.par_col_chunks_mut(t)
            .enumerate()
            .with_max_len(1)
            .for_each(|(bj, mut kc)| {
                let (c0, w) = (bj * t, kc.ncols());
                let mut xx = Mat::<f64>::zeros(t, w);
                let mut dd = Mat::<f64>::zeros(t, w);
                for r0 in (c0..n).step_by(t) {
                    let h = t.min(n - r0);
                    for lf in &self.layers {
                        let (x, d) = (lf.x(), lf.d());
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
                                .for_each(|((k, x), d)| *k += (x + 1.0) * d);
                        }
                    }
                }
            });
    }

    /// gᵢᵀ diag(s) gᵢ for every example, without forming gᵢ:
    /// Σ_l rowsum((Δ∘Δ)∘((X∘X) S_Wᵀ)) + (Δ∘Δ) s_b.
    pub fn quad_forms_diag(&self, s: &[f64]) -> Result<Vec<f64>> {
        if s.len() != self.num_params() {
            return Err(Error::shape("diagonal Sigma", self.num_params(), s.len()));
        }
        let mut out = vec![0.0; self.n];
        for (lf, &(w_off, b_off, inp, o)) in self.layers.iter().zip(&layer_offsets(&self.sizes)) {
            let sqx: Vec<f64> = lf.x.iter().map(|v| v * v).collect();
            let sw = MatRef::from_row_major_slice(&s[w_off..w_off + o * inp], o, inp);
            let mut t = vec![0.0; self.n * o];
            matmul(
                MatMut::from_row_major_slice_mut(&mut t, self.n, o),
                Accum::Replace,
                MatRef::from_row_major_slice(&sqx, self.n, inp),
                sw.transpose(),
                1.0,
                par(),
            );
            let sb = &s[b_off..b_off + o];
            for (i, acc) in out.iter_mut().enumerate() {
                let (tr, dr) = (&t[i * o..(i + 1) * o], lf.d_row(i));
                *acc += dr
                    .iter()
                    .zip(tr)
                    .zip(sb)
                    .map(|((d, t), b)| d * d * (t + b))
                    .sum::<f64>();
            }
        }
        Ok(out)
    }
}

/// Query gradients from one batched pass: the factors of M query points and their QoI values.
#[derive(Debug, Clone)]
pub struct QueryFactors {
    pub(crate) factors: Factors,
    pub(crate) values: Vec<f64>,
}

impl QueryFactors {
    /// The QoI values q(θ, zⱼ).
    pub fn values(&self) -> &[f64] {
        &self.values
    }

    /// The factors.
    pub fn factors(&self) -> &Factors {
        &self.factors
    }

    /// ‖qⱼ‖² for every query: Σ_l ‖δⱼ‖²(‖xⱼ‖² + 1).
    pub fn sq_norms(&self) -> Vec<f64> {
        let f = &self.factors;
        (0..f.n)
            .map(|i| {
                f.layers
                    .iter()
                    .map(|l| {
                        let d: f64 = l.d_row(i).iter().map(|v| v * v).sum();
                        let x: f64 = l.x_row(i).iter().map(|v| v * v).sum();
                        d * (x + 1.0)
                    })
                    .sum()
            })
            .collect()
    }

    /// The M query gradients as a P×M block (O(P·M) memory).
    pub fn gradients(&self) -> Result<Mat<f64>> {
        self.factors.gradients(0, self.factors.num_examples())
    }
}
