//! Σ = (F_KFAC + λI)⁻¹: the Kronecker-factored approximation of the empirical Fisher, per layer
//! F_l ≈ Ā ⊗ Ḡ with Ā the mean of [x; 1][x; 1]ᵀ over the layer's inputs and Ḡ the mean over
//! examples of Σ_uses δδᵀ (the "expand" reduction for layers used several times per example:
//! convolution pixels, sequence positions — Ā averages over every use, Ḡ sums the uses of an
//! example), as curvlinops' `KFACLinearOperator` and laplace-torch's `kron` do. For one example
//! and one use it is exact: Ā ⊗ Ḡ = g gᵀ.
//!
//! Inverted exactly through the eigendecompositions Ā = U_A Λ_A U_Aᵀ, Ḡ = U_G Λ_G U_Gᵀ:
//! (Ā⊗Ḡ + λI)⁻¹ vec(V) = vec(U_G [(U_Gᵀ V U_A) ⊘ (λ_G λ_Aᵀ + λ)] U_Aᵀ), with V the layer's
//! gradient as out × (in + 1) (weight columns, then the bias). Parameters outside a
//! Kronecker-factored layer (norm scales) get the exact diagonal block (F_ii + λ)⁻¹.
//! Memory: Σ_l (in + 1)² + out² f64 and the diagonal blocks; applying it costs
//! O(Σ_l out·(in+1)·(out + in + 1)) per column.

use faer::{Mat, MatRef, Side};

use super::{check_block, SigmaOp};
pub use crate::engine::kfac::{KfacFactors, KfacLayer};
use crate::error::{check_finite, Error, Result};

struct Eig {
    u: Mat<f64>,
    s: Vec<f64>,
}

fn eig(m: &[f64], n: usize, what: &str) -> Result<Eig> {
    check_finite(what, m)?;
    let a = MatRef::from_row_major_slice(m, n, n).to_owned();
    let e = a.self_adjoint_eigen(Side::Lower).map_err(|e| {
        Error::Unsupported(format!(
            "eigendecomposition of the K-FAC factor {what} failed: {e:?}"
        ))
    })?;
    let s: Vec<f64> = e.S().column_vector().iter().map(|v| v.max(0.0)).collect();
    Ok(Eig {
        u: e.U().to_owned(),
        s,
    })
}

struct Layer {
    w_off: usize,
    b_off: Option<usize>,
    inp: usize,
    out: usize,
    a: Eig,
    g: Eig,
}

/// Σ = (F_KFAC + λI)⁻¹ (see the module docs).
///
/// ```
/// use deltavar::sigma::{KfacFactors, KfacLayer, KfacSigma, SigmaOp};
/// // one Linear 1 → 1 with bias, one example: Ā = [x;1][x;1]ᵀ, Ḡ = δ², exact
/// let (x, d) = (2.0, 0.5);
/// let f = KfacFactors { num_params: 2, layers: vec![KfacLayer {
///     w_off: 0, b_off: Some(1), inp: 1, out: 1,
///     a: vec![x * x, x, x, 1.0], g: vec![d * d] }], diagonal: vec![] };
/// let s = KfacSigma::new(&f, 0.1).unwrap();
/// let g = [d * x, d];                        // the example's own gradient
/// let gg = g[0] * g[0] + g[1] * g[1];
/// // gᵀ(ggᵀ + λI)⁻¹g = |g|²/(|g|² + λ)
/// assert!((s.quad_form(&g).unwrap() - gg / (gg + 0.1)).abs() < 1e-12);
/// ```
pub struct KfacSigma {
    p: usize,
    damping: f64,
    layers: Vec<Layer>,
    diagonal: Vec<(usize, Vec<f64>)>,
}

impl KfacSigma {
    /// From the factors and the damping λ > 0.
    pub fn new(f: &KfacFactors, damping: f64) -> Result<Self> {
        if !(damping.is_finite() && damping > 0.0) {
            return Err(Error::invalid(
                "damping",
                damping,
                "K-FAC needs λ > 0 (its factors are often singular)",
            ));
        }
        let mut layers = Vec::with_capacity(f.layers.len());
        for (i, l) in f.layers.iter().enumerate() {
            let k = l.inp + usize::from(l.b_off.is_some());
            if l.a.len() != k * k || l.g.len() != l.out * l.out {
                return Err(Error::shape(
                    format!("K-FAC factors of layer {i}"),
                    format!("A {k}², G {}²", l.out),
                    format!("A {}, G {}", l.a.len(), l.g.len()),
                ));
            }
            let end = l.w_off + l.out * l.inp;
            if end > f.num_params || l.b_off.is_some_and(|b| b + l.out > f.num_params) {
                return Err(Error::shape(
                    format!("K-FAC layer {i} (inside the P parameters)"),
                    f.num_params,
                    end,
                ));
            }
            layers.push(Layer {
                w_off: l.w_off,
                b_off: l.b_off,
                inp: l.inp,
                out: l.out,
                a: eig(&l.a, k, &format!("A of layer {i}"))?,
                g: eig(&l.g, l.out, &format!("G of layer {i}"))?,
            });
        }
        let mut covered = vec![false; f.num_params];
        for l in &f.layers {
            covered[l.w_off..l.w_off + l.out * l.inp].fill(true);
            if let Some(b) = l.b_off {
                covered[b..b + l.out].fill(true);
            }
        }
        for (off, d) in &f.diagonal {
            check_finite("K-FAC diagonal block", d)?;
            if off + d.len() > f.num_params {
                return Err(Error::shape(
                    "K-FAC diagonal block",
                    f.num_params,
                    off + d.len(),
                ));
            }
            covered[*off..off + d.len()].fill(true);
        }
        if let Some(i) = covered.iter().position(|c| !c) {
            return Err(Error::Parameter(format!(
                "parameter {i} is in no K-FAC layer or diagonal block"
            )));
        }
        Ok(Self {
            p: f.num_params,
            damping,
            layers,
            diagonal: f.diagonal.clone(),
        })
    }
}

impl SigmaOp for KfacSigma {
    fn dim(&self) -> usize {
        self.p
    }
    fn name(&self) -> String {
        "kfac".into()
    }
    fn apply(&self, g: MatRef<'_, f64>) -> Result<Mat<f64>> {
        check_block(&self.name(), self.p, g)?;
        let mut out = Mat::<f64>::zeros(self.p, g.ncols());
        for j in 0..g.ncols() {
            for l in &self.layers {
                let k = l.inp + usize::from(l.b_off.is_some());
                let v = Mat::from_fn(l.out, k, |o, i| {
                    if i < l.inp {
                        g[(l.w_off + o * l.inp + i, j)]
                    } else {
                        g[(l.b_off.unwrap_or(0) + o, j)]
                    }
                });
                let mut t = l.g.u.transpose() * &v * &l.a.u;
                for o in 0..l.out {
                    for i in 0..k {
                        t[(o, i)] /= l.g.s[o] * l.a.s[i] + self.damping;
                    }
                }
                let r = &l.g.u * &t * l.a.u.transpose();
                for o in 0..l.out {
                    for i in 0..l.inp {
                        out[(l.w_off + o * l.inp + i, j)] = r[(o, i)];
                    }
                    if let Some(b) = l.b_off {
                        out[(b + o, j)] = r[(o, l.inp)];
                    }
                }
            }
            for (off, d) in &self.diagonal {
                for (i, di) in d.iter().enumerate() {
                    out[(off + i, j)] = g[(off + i, j)] / (di + self.damping);
                }
            }
        }
        Ok(out)
    }
}
