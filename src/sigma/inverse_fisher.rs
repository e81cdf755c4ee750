use faer::linalg::triangular_solve::solve_lower_triangular_in_place;
use faer::{Mat, MatRef, Par};

use super::{check_block, col_sum_sq, finish, DiagonalSigma, SigmaOp};
use crate::error::{check_finite, Error, Result};

fn check_damping(damping: f64) -> Result<()> {
    if !(damping.is_finite() && damping >= 0.0) {
        return Err(Error::invalid(
            "damping",
            damping,
            "must be finite and >= 0 (the seed's default is 1e-5)",
        ));
    }
    Ok(())
}

use super::suggest_damping as suggest;

/// Σ = diag(F + λ)⁻¹, the inverse of the damped diagonal empirical Fisher (the seed's
/// `diagonal_empirical_fim` strategy). Holds O(P).
#[derive(Debug, Clone)]
pub struct InverseDiagonalFisher {
    inner: DiagonalSigma,
    damping: f64,
}

impl InverseDiagonalFisher {
    /// diag(F + λ)⁻¹ of a Fisher source's mean diagonal.
    pub fn from_fisher(fisher: &dyn crate::fisher::FisherSource, damping: f64) -> Result<Self> {
        Self::new(&fisher.fisher_diag()?.mean(), damping)
    }

    /// From the MEAN Fisher diagonal F_ii (length P) and the damping λ ≥ 0.
    /// Fails if some F_ii + λ is not positive (λ = 0 and an unused parameter), naming it.
    pub fn new(fisher_diag: &[f64], damping: f64) -> Result<Self> {
        Ok(Self {
            inner: DiagonalSigma::new(inverse_fim_diagonal(fisher_diag, damping)?)?,
            damping,
        })
    }

    /// The diagonal 1/(F_ii + λ).
    pub fn diag(&self) -> &[f64] {
        self.inner.diag()
    }

    /// The damping λ.
    pub fn damping(&self) -> f64 {
        self.damping
    }
}

/// diag(F + λ)⁻¹ entry-wise, with the checks of [`InverseDiagonalFisher::new`].
pub(crate) fn inverse_fim_diagonal(fisher_diag: &[f64], damping: f64) -> Result<Vec<f64>> {
    check_damping(damping)?;
    check_finite("Fisher diagonal", fisher_diag)?;
    let mut out = Vec::with_capacity(fisher_diag.len());
    for (i, &f) in fisher_diag.iter().enumerate() {
        let d = f + damping;
        if d <= 0.0 {
            return Err(Error::NotPositiveDefinite {
                what: format!("diagonal Fisher + damping (entry {i}: F_ii = {f:e})"),
                pivot: i,
                dim: fisher_diag.len(),
                damping,
                suggestion: suggest(damping, 1.0),
            });
        }
        out.push(1.0 / d);
    }
    Ok(out)
}

impl SigmaOp for InverseDiagonalFisher {
    fn dim(&self) -> usize {
        self.inner.dim()
    }
    fn name(&self) -> String {
        "diagonal_empirical_fim".into()
    }
    fn apply(&self, g: MatRef<'_, f64>) -> Result<Mat<f64>> {
        self.inner.apply(g)
    }
    fn diagonal(&self) -> Option<std::borrow::Cow<'_, [f64]>> {
        self.inner.diagonal()
    }
    fn quad_forms(&self, g: MatRef<'_, f64>) -> Result<Vec<f64>> {
        finish("diagonal_empirical_fim", self.inner.quad_forms(g)?)
    }
}

/// Σ = (F + λI)⁻¹ held as the Cholesky factor L of F + λI = LLᵀ (faer, lower), the seed's
/// `inverse_full_empirical_fim` strategy. No explicit inverse is formed unless
/// [`InverseFullFisher::to_dense`] is called.
///
/// Memory O(P²) (the factor); factorization O(P³/3); a block of M quadratic forms costs one
/// triangular solve, O(P²M): gᵀ(LLᵀ)⁻¹g = ‖L⁻¹g‖².
#[derive(Debug, Clone)]
pub struct InverseFullFisher {
    l: Mat<f64>,
    damping: f64,
}

impl InverseFullFisher {
    /// (F + λI)⁻¹ of a Fisher source's dense mean Fisher (formed in f64, refused over
    /// `memory_budget`: the dense method).
    pub fn from_fisher(
        fisher: &dyn crate::fisher::FisherSource,
        damping: f64,
        memory_budget: u64,
    ) -> Result<Self> {
        Self::new(fisher.fisher_dense(memory_budget)?.mean().as_ref(), damping)
    }

    /// From the MEAN Fisher F (P×P; only its lower triangle is read) and the damping λ ≥ 0.
    /// Fails with [`Error::NotPositiveDefinite`] (naming λ and a larger one to try) if F + λI has
    /// a non-positive Cholesky pivot.
    pub fn new(fisher: MatRef<'_, f64>, damping: f64) -> Result<Self> {
        check_damping(damping)?;
        let p = fisher.nrows();
        if fisher.ncols() != p {
            return Err(Error::shape(
                "Fisher matrix (must be square)",
                format!("{p}×{p}"),
                format!("{}×{}", p, fisher.ncols()),
            ));
        }
        let mut a = Mat::<f64>::zeros(p, p);
        for j in 0..p {
            for i in j..p {
                let v = fisher[(i, j)];
                if !v.is_finite() {
                    return Err(Error::NonFinite {
                        what: "Fisher matrix".into(),
                        detail: format!("entry ({i}, {j}) is {v}"),
                    });
                }
                a[(i, j)] = v;
                a[(j, i)] = v;
            }
            a[(j, j)] += damping;
        }
        let l = super::cholesky_lower(a, "empirical Fisher + damping·I", damping)?;
        Ok(Self { l, damping })
    }

    /// The damping λ.
    pub fn damping(&self) -> f64 {
        self.damping
    }

    /// The lower Cholesky factor L of F + λI.
    pub fn cholesky_factor(&self) -> MatRef<'_, f64> {
        self.l.as_ref()
    }

    /// The explicit P×P matrix (F + λI)⁻¹ (O(P²) memory, O(P³) time): only for small P or
    /// when the matrix itself is wanted (the seed's `calculate_inverse_fim_full` returns it).
    pub fn to_dense(&self) -> Mat<f64> {
        let p = self.l.nrows();
        let mut id = Mat::<f64>::identity(p, p);
        solve_lower_triangular_in_place(self.l.as_ref(), id.as_mut(), Par::rayon(0));
        // inverse = L^{-T} L^{-1}; with Z = L^{-1}: Zᵀ Z.
        crate::scalar::product(id.as_ref().transpose(), id.as_ref())
    }
}

impl SigmaOp for InverseFullFisher {
    fn dim(&self) -> usize {
        self.l.nrows()
    }
    fn name(&self) -> String {
        "inverse_full_empirical_fim".into()
    }
    fn apply(&self, g: MatRef<'_, f64>) -> Result<Mat<f64>> {
        check_block(&self.name(), self.dim(), g)?;
        let mut z = g.to_owned();
        solve_lower_triangular_in_place(self.l.as_ref(), z.as_mut(), Par::rayon(0));
        faer::linalg::triangular_solve::solve_upper_triangular_in_place(
            self.l.as_ref().transpose(),
            z.as_mut(),
            Par::rayon(0),
        );
        Ok(z)
    }
    fn quad_forms(&self, g: MatRef<'_, f64>) -> Result<Vec<f64>> {
        check_block(&self.name(), self.dim(), g)?;
        let mut z = g.to_owned();
        solve_lower_triangular_in_place(self.l.as_ref(), z.as_mut(), Par::rayon(0));
        finish("inverse_full_empirical_fim", col_sum_sq(z.as_ref()))
    }
}
