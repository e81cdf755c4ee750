//! Per-layer factors (X, Δ) of a set of examples and the products they give without the N×P
//! gradient matrix G (row i of G is example i's gradient, in the MLP's flat layout).

use faer::linalg::matmul::matmul;
use faer::{Accum, Mat, MatRef, Par};

use super::layer_offsets;
use crate::error::{Error, Result};
use crate::sigma::SigmaOp;

/// One Linear layer's factors for N examples: inputs X (N×in) and signals Δ (N×out), f64.
#[derive(Debug, Clone)]
pub struct LayerFactors {
    /// Layer inputs, one row per example.
    pub x: Mat<f64>,
    /// Back-propagated signals ∂uᵢ/∂zᵢ, one row per example.
    pub d: Mat<f64>,
}

/// The factors of N examples for every layer. Memory: N·Σ_l(in_l + out_l) f64.
#[derive(Debug, Clone)]
pub struct Factors {
    layers: Vec<LayerFactors>,
    sizes: Vec<usize>,
    n: usize,
}

fn par() -> Par {
    Par::rayon(0)
}

impl Factors {
    pub(crate) fn zeros(sizes: &[usize], n: usize) -> Self {
        let layers = sizes
            .windows(2)
            .map(|w| LayerFactors { x: Mat::zeros(n, w[0]), d: Mat::zeros(n, w[1]) })
            .collect();
        Self { layers, sizes: sizes.to_vec(), n }
    }

    pub(crate) fn write_rows(&mut self, l: usize, start: usize, xs: &[f64], inp: usize, ds: &[f64], out: usize) {
        let lf = &mut self.layers[l];
        for (r, row) in xs.chunks_exact(inp).enumerate() {
            for (j, v) in row.iter().enumerate() {
                lf.x[(start + r, j)] = *v;
            }
        }
        for (r, row) in ds.chunks_exact(out).enumerate() {
            for (j, v) in row.iter().enumerate() {
                lf.d[(start + r, j)] = *v;
            }
        }
    }

    /// N.
    pub fn num_examples(&self) -> usize {
        self.n
    }

    /// P.
    pub fn num_params(&self) -> usize {
        self.sizes.windows(2).map(|w| w[0] * w[1] + w[1]).sum()
    }

    /// The per-layer factors.
    pub fn layers(&self) -> &[LayerFactors] {
        &self.layers
    }

    /// Bytes held.
    pub fn bytes(&self) -> u64 {
        (self.n * self.sizes.windows(2).map(|w| w[0] + w[1]).sum::<usize>() * 8) as u64
    }

    fn check_rows(&self, what: &str, rows: usize, want: usize) -> Result<()> {
        if rows != want {
            return Err(Error::shape(what, format!("{want} rows"), format!("{rows} rows")));
        }
        Ok(())
    }

    /// Σᵢ gᵢ∘gᵢ: per layer (Δ∘Δ)ᵀ(X∘X) and Σᵢ δᵢ².
    pub fn diag_sums(&self) -> Vec<f64> {
        let mut out = vec![0.0; self.num_params()];
        for (lf, &(w_off, b_off, inp, o)) in self.layers.iter().zip(&layer_offsets(&self.sizes)) {
            let sqx = Mat::from_fn(self.n, inp, |i, j| lf.x[(i, j)] * lf.x[(i, j)]);
            let sqd = Mat::from_fn(self.n, o, |i, j| lf.d[(i, j)] * lf.d[(i, j)]);
            let mut prod = Mat::<f64>::zeros(o, inp);
            matmul(prod.as_mut(), Accum::Replace, sqd.transpose(), sqx.as_ref(), 1.0, par());
            for r in 0..o {
                for c in 0..inp {
                    out[w_off + r * inp + c] = prod[(r, c)];
                }
                out[b_off + r] = (0..self.n).map(|i| sqd[(i, r)]).sum();
            }
        }
        out
    }

    /// The gradients of examples `start..start+len` as a P×len block (one column each).
    pub fn gradients(&self, start: usize, len: usize) -> Result<Mat<f64>> {
        crate::data::check_range(self.n, start, len)?;
        let mut g = Mat::<f64>::zeros(self.num_params(), len);
        for (lf, &(w_off, b_off, inp, o)) in self.layers.iter().zip(&layer_offsets(&self.sizes)) {
            for j in 0..len {
                let i = start + j;
                for r in 0..o {
                    let d = lf.d[(i, r)];
                    for c in 0..inp {
                        g[(w_off + r * inp + c, j)] = d * lf.x[(i, c)];
                    }
                    g[(b_off + r, j)] = d;
                }
            }
        }
        Ok(g)
    }

    /// J·V = G V for a P×k block V: (N×k). Per layer one matmul X·[V_W1ᵀ … V_Wkᵀ].
    pub fn jv(&self, v: MatRef<'_, f64>) -> Result<Mat<f64>> {
        self.check_rows("V in J·V (P rows)", v.nrows(), self.num_params())?;
        let k = v.ncols();
        let mut out = Mat::<f64>::zeros(self.n, k);
        for (lf, &(w_off, b_off, inp, o)) in self.layers.iter().zip(&layer_offsets(&self.sizes)) {
            // S (in × k·out): column c·out + r is row r of column c's weight block
            let s = Mat::from_fn(inp, k * o, |j, cr| v[(w_off + (cr % o) * inp + j, cr / o)]);
            let mut t = Mat::<f64>::zeros(self.n, k * o);
            matmul(t.as_mut(), Accum::Replace, lf.x.as_ref(), s.as_ref(), 1.0, par());
            for c in 0..k {
                for i in 0..self.n {
                    let mut acc = 0.0;
                    for r in 0..o {
                        acc += lf.d[(i, r)] * (t[(i, c * o + r)] + v[(b_off + r, c)]);
                    }
                    out[(i, c)] += acc;
                }
            }
        }
        Ok(out)
    }

    /// Jᵀ·U = Gᵀ U for an N×k block U: (P×k). Per layer one matmul [Δ∘u₁ … Δ∘u_k]ᵀ X.
    pub fn jtu(&self, u: MatRef<'_, f64>) -> Result<Mat<f64>> {
        self.check_rows("U in Jᵀ·U (N rows)", u.nrows(), self.n)?;
        let k = u.ncols();
        let mut out = Mat::<f64>::zeros(self.num_params(), k);
        for (lf, &(w_off, b_off, inp, o)) in self.layers.iter().zip(&layer_offsets(&self.sizes)) {
            let a = Mat::from_fn(self.n, k * o, |i, cr| lf.d[(i, cr % o)] * u[(i, cr / o)]);
            let mut r = Mat::<f64>::zeros(k * o, inp);
            matmul(r.as_mut(), Accum::Replace, a.transpose(), lf.x.as_ref(), 1.0, par());
            for c in 0..k {
                for row in 0..o {
                    for j in 0..inp {
                        out[(w_off + row * inp + j, c)] = r[(c * o + row, j)];
                    }
                    out[(b_off + row, c)] = (0..self.n).map(|i| a[(i, c * o + row)]).sum();
                }
            }
        }
        Ok(out)
    }

    /// F·V = Gᵀ(G V)/N, the MEAN empirical Fisher applied to a P×k block (zero when N = 0).
    pub fn fisher_apply(&self, v: MatRef<'_, f64>) -> Result<Mat<f64>> {
        let mut out = self.jtu(self.jv(v)?.as_ref())?;
        let inv = if self.n == 0 { 0.0 } else { 1.0 / self.n as f64 };
        for j in 0..out.ncols() {
            for i in 0..out.nrows() {
                out[(i, j)] *= inv;
            }
        }
        Ok(out)
    }

    /// G·Hᵀ for another set of factors H of the same model (N×M):
    /// Σ_l (X X_Hᵀ + 1)∘(Δ Δ_Hᵀ). With H = self this is the Gram matrix K = G Gᵀ.
    pub fn cross_gram(&self, other: &Factors) -> Result<Mat<f64>> {
        if other.sizes != self.sizes {
            return Err(Error::shape("factors of another model", format!("{:?}", self.sizes), format!("{:?}", other.sizes)));
        }
        let (n, m) = (self.n, other.n);
        let mut k = Mat::<f64>::zeros(n, m);
        let block = 512.max(1);
        let mut xx = Mat::<f64>::zeros(n, block.min(m.max(1)));
        let mut dd = Mat::<f64>::zeros(n, block.min(m.max(1)));
        for c0 in (0..m).step_by(block) {
            let w = block.min(m - c0);
            for (a, b) in self.layers.iter().zip(&other.layers) {
                matmul(xx.as_mut().subcols_mut(0, w), Accum::Replace, a.x.as_ref(), b.x.as_ref().subrows(c0, w).transpose(), 1.0, par());
                matmul(dd.as_mut().subcols_mut(0, w), Accum::Replace, a.d.as_ref(), b.d.as_ref().subrows(c0, w).transpose(), 1.0, par());
                for j in 0..w {
                    for i in 0..n {
                        k[(i, c0 + j)] += (xx[(i, j)] + 1.0) * dd[(i, j)];
                    }
                }
            }
        }
        Ok(k)
    }

    /// The N×N Gram matrix K = G Gᵀ = Σ_l (X Xᵀ + 1)∘(Δ Δᵀ). Memory O(N²).
    pub fn gram(&self) -> Mat<f64> {
        // same sizes by construction
        self.cross_gram(self).unwrap_or_else(|_| Mat::zeros(0, 0))
    }

    /// gᵢᵀ diag(s) gᵢ for every example, without forming gᵢ:
    /// Σ_l rowsum((Δ∘Δ)∘((X∘X) S_Wᵀ)) + (Δ∘Δ) s_b.
    pub fn quad_forms_diag(&self, s: &[f64]) -> Result<Vec<f64>> {
        if s.len() != self.num_params() {
            return Err(Error::shape("diagonal Sigma", self.num_params(), s.len()));
        }
        let mut out = vec![0.0; self.n];
        for (lf, &(w_off, b_off, inp, o)) in self.layers.iter().zip(&layer_offsets(&self.sizes)) {
            let sqx = Mat::from_fn(self.n, inp, |i, j| lf.x[(i, j)] * lf.x[(i, j)]);
            let sw = MatRef::from_row_major_slice(&s[w_off..w_off + o * inp], o, inp);
            let mut t = Mat::<f64>::zeros(self.n, o);
            matmul(t.as_mut(), Accum::Replace, sqx.as_ref(), sw.transpose(), 1.0, par());
            for (i, acc) in out.iter_mut().enumerate() {
                for r in 0..o {
                    let d = lf.d[(i, r)];
                    *acc += d * d * (t[(i, r)] + s[b_off + r]);
                }
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

    /// The M query gradients as a P×M block (O(P·M) memory).
    pub fn gradients(&self) -> Result<Mat<f64>> {
        self.factors.gradients(0, self.factors.num_examples())
    }

    /// ΔVarⱼ = qⱼᵀ Σ qⱼ for every query. A diagonal Σ (identity, diagonal, inverse diagonal
    /// Fisher, and their scalings) never forms the Jacobian; any other Σ gets the P×M block.
    pub fn delta_variances(&self, sigma: &dyn SigmaOp) -> Result<Vec<f64>> {
        if sigma.dim() != self.factors.num_params() {
            return Err(Error::shape(
                format!("Sigma '{}' (its size must equal the number of parameters P)", sigma.name()),
                format!("P = {}", self.factors.num_params()),
                format!("P = {}", sigma.dim()),
            ));
        }
        match sigma.diagonal() {
            Some(d) => {
                let out = self.factors.quad_forms_diag(&d)?;
                crate::sigma::finish(&sigma.name(), out)
            }
            None => sigma.quad_forms(self.gradients()?.as_ref()),
        }
    }
}
