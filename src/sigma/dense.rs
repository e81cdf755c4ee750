use faer::{Mat, MatRef};

use super::{check_block, SigmaOp};
use crate::error::{Error, Result};

/// Σ = S for a user P×P matrix (finite entries). Holds the O(P²) matrix.
///
/// The quadratic form is gᵀ S g as written (S is not symmetrised), like the seed's
/// `apply_full_sigma`. S must be a covariance: a negative diagonal entry is refused when it is
/// built, and a quadratic form below zero beyond rounding (S not positive semi-definite) is an
/// error, not a negative variance.
#[derive(Debug, Clone)]
pub struct DenseSigma {
    mat: Mat<f64>,
}

impl DenseSigma {
    /// Σ = `mat`. Fails if it is not square or has a non-finite entry.
    pub fn new(mat: Mat<f64>) -> Result<Self> {
        if mat.nrows() != mat.ncols() {
            return Err(Error::shape(
                "dense Sigma (must be square P×P)",
                format!("{0}×{0}", mat.nrows()),
                format!("{}×{}", mat.nrows(), mat.ncols()),
            ));
        }
        for j in 0..mat.ncols() {
            for i in 0..mat.nrows() {
                if !mat[(i, j)].is_finite() {
                    return Err(Error::NonFinite {
                        what: "dense Sigma".into(),
                        detail: format!("entry ({i}, {j}) is {}", mat[(i, j)]),
                    });
                }
            }
        }
        if let Some(i) = (0..mat.nrows()).find(|&i| mat[(i, i)] < 0.0) {
            return Err(Error::invalid(
                format!("dense Sigma entry ({i}, {i})"),
                mat[(i, i)],
                "a covariance diagonal must be non-negative",
            ));
        }
        Ok(Self { mat })
    }

    /// The matrix.
    pub fn matrix(&self) -> MatRef<'_, f64> {
        self.mat.as_ref()
    }
}

impl SigmaOp for DenseSigma {
    fn dim(&self) -> usize {
        self.mat.nrows()
    }
    fn name(&self) -> String {
        "dense".into()
    }
    fn apply(&self, g: MatRef<'_, f64>) -> Result<Mat<f64>> {
        check_block("dense", self.dim(), g)?;
        Ok(crate::scalar::product(self.mat.as_ref(), g))
    }
    fn quad_forms(&self, g: MatRef<'_, f64>) -> Result<Vec<f64>> {
        let sg = self.apply(g)?;
        let mut out = Vec::with_capacity(g.ncols());
        for j in 0..g.ncols() {
            let (mut v, mut bound) = (0.0, 0.0);
            for i in 0..g.nrows() {
                v += g[(i, j)] * sg[(i, j)];
                bound += (g[(i, j)] * sg[(i, j)]).abs();
            }
            // rounding in gᵀ(Sg) is at most a few P·ε of the sum of magnitudes
            if v < -(g.nrows() as f64 + 4.0) * f64::EPSILON * bound {
                return Err(Error::invalid(
                    "dense Sigma",
                    format!("gᵀΣg = {v:e} at query {j}"),
                    "a quadratic form below zero: Sigma must be positive semi-definite (a covariance)",
                ));
            }
            out.push(v);
        }
        super::finish(&self.name(), out)
    }
}
