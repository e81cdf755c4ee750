//! Stage 4 of the pipeline: Σ, the parameter covariance, as a linear operator.
//!
//! Solvers and the delta variance only see the [`SigmaOp`] trait. One file per Σ kind:
//!
//! | type | Σ | memory held |
//! |---|---|---|
//! | [`IdentitySigma`] | I | O(1) |
//! | [`DiagonalSigma`] | diag(d), user vector | O(P) |
//! | [`DenseSigma`] | user P×P matrix | O(P²) (the caller's matrix) |
//! | [`CustomSigma`] | user closure g ↦ gᵀΣg | whatever the closure holds |
//! | [`InverseDiagonalFisher`] | diag(F + λ)⁻¹ | O(P) |
//! | [`InverseFullFisher`] | (F + λI)⁻¹ as a Cholesky factor (the "dense" method) | O(P²) |
//! | [`KernelInverseFisher`] | (F + λI)⁻¹ exactly, via the N×N kernel (Woodbury): a Cholesky factor, or the stored system solved by CG (`iterative`, the kernel-cg method) | N²/2 f64 resident + the gradient operator (kernel-cg: + N·rank f64) |
//! | [`CgInverseFisher`] | (F + λI)⁻¹ by preconditioned CG ([`solver`]), all right-hand sides at once | O(P·M) + the preconditioner (O(P·rank) Nyström, O(P) Jacobi) + the gradient operator |
//! | [`LowRankInverseFisher`] | (U S Uᵀ + D + λI)⁻¹ from F's top-k eigenpairs (block Lanczos, Gram or dense) and a diagonal correction, by Woodbury | O(k·P); block Lanczos holds 2·P·(products) while building |
//! | [`KfacSigma`] | (Ā⊗Ḡ + λI)⁻¹ per layer (K-FAC) | Σ_l (in+1)² + out² |
//! | [`ScaledSigma`] | c·Σ (for example the paper's 1/N) | the inner operator's |
//!
//! All arithmetic is f64. Every quadratic form checks its result is finite.

mod cg;
mod custom;
mod dense;
mod diagonal;
mod full;
mod identity;
mod inverse_fisher;
mod kernel;
mod kfac;
mod lowrank;
mod pivoted;
mod scaled;
pub mod solver;

pub use cg::{default_nystrom_rank, CgInverseFisher, CgOptions, CgPreconditioner};
pub use custom::CustomSigma;
pub use dense::DenseSigma;
pub use diagonal::DiagonalSigma;
pub use full::{
    choose_full_method, FullMethod, MethodChoice, ASSUMED_FLOP_RATE, CG_ASSUMED_ITERATIONS,
    KERNEL_CG_ASSUMED_ITERATIONS,
};
pub use identity::IdentitySigma;
pub(crate) use inverse_fisher::inverse_fim_diagonal as inverse_fisher_diag_values;
pub use inverse_fisher::{InverseDiagonalFisher, InverseFullFisher};
pub use kernel::{default_kernel_cg_rank, KernelInverseFisher, KernelPrecision};
pub use kfac::{KfacFactors, KfacLayer, KfacSigma};
pub use lowrank::{
    fisher_top_eigenpairs, FisherEigenpairs, LowRankInverseFisher, LowRankMethod, LowRankOptions,
    LowRankReport,
};
pub use scaled::ScaledSigma;
pub use solver::CgReport;

use faer::reborrow::ReborrowMut;
use faer::{Mat, MatRef};

use crate::error::{check_finite, Error, Result};

/// A parameter covariance Σ (P×P, symmetric positive semi-definite in all built-in kinds),
/// seen only through its action on gradients.
///
/// A block of M gradients is a P×M [`faer`] matrix, one gradient per column.
pub trait SigmaOp: Send + Sync {
    /// The dimension P.
    fn dim(&self) -> usize;

    /// A short name for reports (for example `"inverse_full_empirical_fim"`).
    fn name(&self) -> String;

    /// Σ·G for a P×M block G. Fails with [`Error::Unsupported`] for Σ kinds that only define
    /// the quadratic form ([`CustomSigma`]).
    fn apply(&self, g: MatRef<'_, f64>) -> Result<Mat<f64>>;

    /// The quadratic forms gⱼᵀ Σ gⱼ for each column gⱼ of the P×M block G (M values).
    fn quad_forms(&self, g: MatRef<'_, f64>) -> Result<Vec<f64>> {
        let sg = self.apply(g)?;
        let out: Vec<f64> = (0..g.ncols())
            .map(|j| (0..g.nrows()).map(|i| g[(i, j)] * sg[(i, j)]).sum())
            .collect();
        finish(&self.name(), out)
    }

    /// Σ's diagonal when Σ IS diagonal (identity, diagonal, inverse diagonal Fisher, their
    /// scalings); `None` otherwise. Engines use it to skip forming gradients.
    fn diagonal(&self) -> Option<std::borrow::Cow<'_, [f64]>> {
        None
    }

    /// The quadratic forms for query gradients held layer by layer, when this Σ can use them
    /// without forming the gradients (the kernel Σ over a layered gradient operator of the
    /// same layout); `None` otherwise.
    fn quad_forms_layered(&self, _q: &crate::engine::LayeredGradients) -> Option<Result<Vec<f64>>> {
        None
    }

    /// [`SigmaOp::quad_forms`] with the report of the iterative solve behind them, for Σ kinds
    /// that iterate (CG); `cg` is `None` for the others.
    fn quad_forms_reported(&self, g: MatRef<'_, f64>) -> Result<QuadForms> {
        Ok(QuadForms {
            values: self.quad_forms(g)?,
            cg: None,
        })
    }

    /// For a Σ that solves iteratively inside its quadratic forms (the kernel system by CG):
    /// the report of its last solve; `None` for the other kinds.
    fn solve_report(&self) -> Option<CgReport> {
        None
    }

    /// For a low-rank Σ: its eigenpairs' values and residuals; `None` for the other kinds.
    fn lowrank_report(&self) -> Option<LowRankReport> {
        None
    }

    /// The quadratic form gᵀ Σ g for one flat gradient of length P.
    fn quad_form(&self, g: &[f64]) -> Result<f64> {
        let m = MatRef::from_column_major_slice(g, g.len(), 1);
        Ok(self.quad_forms(m)?[0])
    }
}

/// Quadratic forms gⱼᵀΣgⱼ and, for an iterative Σ, the report of the solve that gave them.
#[derive(Debug, Clone, PartialEq)]
pub struct QuadForms {
    /// One value per column.
    pub values: Vec<f64>,
    /// The CG report, for the CG Σ.
    pub cg: Option<CgReport>,
}

/// Checks that a gradient block has P rows and finite entries.
pub(crate) fn check_block(sigma: &str, p: usize, g: MatRef<'_, f64>) -> Result<()> {
    if g.nrows() != p {
        return Err(Error::shape(
            format!("gradient block for the {sigma} Sigma (its rows must equal its size P)"),
            format!("{p} rows"),
            format!("{} rows", g.nrows()),
        ));
    }
    for j in 0..g.ncols() {
        for i in 0..g.nrows() {
            let v = g[(i, j)];
            if !v.is_finite() {
                return Err(Error::NonFinite {
                    what: "QoI gradient".into(),
                    detail: format!("entry {i} of gradient {j} is {v}"),
                });
            }
        }
    }
    Ok(())
}

/// Checks the quadratic forms are finite.
pub(crate) fn finish(name: &str, out: Vec<f64>) -> Result<Vec<f64>> {
    check_finite(&format!("delta variance under Sigma '{name}'"), &out)?;
    Ok(out)
}

/// The column-wise sums of squares of a matrix.
pub(crate) fn col_sum_sq(m: MatRef<'_, f64>) -> Vec<f64> {
    (0..m.ncols())
        .map(|j| (0..m.nrows()).map(|i| m[(i, j)] * m[(i, j)]).sum())
        .collect()
}

/// λ·100, or for λ = 0 a small multiple of the matrix's scale: the damping an error suggests.
pub(crate) fn suggest_damping(damping: f64, scale: f64) -> f64 {
    if damping > 0.0 {
        damping * 100.0
    } else {
        (1e-6 * scale).max(1e-8)
    }
}

/// The lower Cholesky factor of the symmetric matrix `a` (lower triangle read), or
/// [`Error::NotPositiveDefinite`] naming `what`, the pivot, λ and a larger λ to try. faer only
/// rejects pivots ≤ 0; a pivot that survives by rounding on a numerically singular matrix would
/// give meaningless, huge variances, so pivots below dim·ε·max(diag) are refused too. The one
/// place that maps a failed factorization to an error (dense and kernel Σ both use it).
pub(crate) fn cholesky_lower(mut a: Mat<f64>, what: &str, damping: f64) -> Result<Mat<f64>> {
    cholesky_lower_in_place(a.as_mut(), what, damping)?;
    zero_strict_upper(a.as_mut());
    Ok(a)
}

/// [`cholesky_lower`] in place: the lower triangle of `a` becomes L, the strict upper triangle
/// is neither read nor written.
pub(crate) fn cholesky_lower_in_place(
    mut a: faer::MatMut<'_, f64>,
    what: &str,
    damping: f64,
) -> Result<()> {
    let p = a.nrows();
    let trace: f64 = (0..p).map(|i| a[(i, i)]).sum();
    let scale = if p > 0 { trace / p as f64 } else { 1.0 };
    let max_diag = (0..p).map(|i| a[(i, i)]).fold(0.0f64, f64::max);
    let fail = |pivot: usize, singular: bool| Error::NotPositiveDefinite {
        what: if singular {
            format!("{what} (numerically singular)")
        } else {
            what.to_string()
        },
        pivot,
        dim: p,
        damping,
        suggestion: suggest_damping(damping, scale),
    };
    llt_in_place(a.rb_mut()).map_err(|index| fail(index, false))?;
    let tol = (p.max(1) as f64) * f64::EPSILON * max_diag;
    if let Some(i) = (0..p).find(|&i| a[(i, i)] * a[(i, i)] <= tol) {
        return Err(fail(i, true));
    }
    Ok(())
}

/// Refuses a damping that is not finite and > 0 for `method` (the kernel and CG methods need
/// λ > 0: with λ = 0 and N < P their systems are singular).
pub(crate) fn check_damping(damping: f64, method: &str) -> Result<()> {
    if !(damping.is_finite() && damping > 0.0) {
        return Err(Error::invalid(
            "damping",
            damping,
            format!("{method} needs a finite damping > 0"),
        ));
    }
    Ok(())
}

/// faer's blocked Cholesky factorization in place (the lower triangle of `a` becomes L; the
/// strict upper triangle is left as it was), or the index of the first non-positive pivot.
/// In place, it saves the two N×N copies `Mat::llt` + `L().to_owned()` make (measured: n = 4096,
/// 0.54 s through `llt` against 0.30 s in place on this machine's 2 cores); blocks of 512 columns
/// keep the trailing updates compute-bound.
pub(crate) fn llt_in_place<T: faer::traits::RealField>(
    a: faer::MatMut<'_, T>,
) -> std::result::Result<(), usize> {
    use faer::dyn_stack::{MemBuffer, MemStack};
    use faer::linalg::cholesky::llt::factor::{
        cholesky_in_place, cholesky_in_place_scratch, LltError, LltParams,
    };
    let n = a.nrows();
    let par = faer::Par::rayon(0);
    let mut params: LltParams = faer::Auto::<T>::auto();
    params.block_size = 512;
    params.recursion_threshold = 128;
    let mut mem = MemBuffer::new(cholesky_in_place_scratch::<T>(n, par, params.into()));
    cholesky_in_place(
        a,
        Default::default(),
        par,
        MemStack::new(&mut mem),
        params.into(),
    )
    .map(|_| ())
    .map_err(|e| {
        let LltError::NonPositivePivot { index } = e;
        index
    })
}

/// Sets the entries above the diagonal to zero (a factor stored in place is then a clean L).
pub(crate) fn zero_strict_upper<T: Copy + Default>(mut a: faer::MatMut<'_, T>) {
    for j in 1..a.ncols() {
        let top = j.min(a.nrows());
        for i in 0..top {
            a[(i, j)] = T::default();
        }
    }
}
