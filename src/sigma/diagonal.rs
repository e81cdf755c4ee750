use faer::{Mat, MatRef};

use super::{check_block, finish, SigmaOp};
use crate::error::{check_finite, Error, Result};

/// Σ = diag(d) for a user vector d (length P, finite, non-negative). Holds O(P).
///
/// ```
/// use deltavar::sigma::{DiagonalSigma, SigmaOp};
/// let s = DiagonalSigma::new(vec![0.5, 2.0]).unwrap();
/// assert_eq!(s.quad_form(&[2.0, 1.0]).unwrap(), 4.0);
/// ```
#[derive(Debug, Clone)]
pub struct DiagonalSigma {
    diag: Vec<f64>,
}

impl DiagonalSigma {
    /// Σ = diag(d). Fails on a non-finite or negative entry (a covariance has none).
    pub fn new(diag: Vec<f64>) -> Result<Self> {
        check_finite("diagonal Sigma", &diag)?;
        if let Some((i, v)) = diag.iter().enumerate().find(|(_, v)| **v < 0.0) {
            return Err(Error::invalid(
                format!("diagonal Sigma entry {i}"),
                v,
                "a covariance diagonal must be non-negative",
            ));
        }
        Ok(Self { diag })
    }

    /// The diagonal.
    pub fn diag(&self) -> &[f64] {
        &self.diag
    }
}

impl SigmaOp for DiagonalSigma {
    fn dim(&self) -> usize {
        self.diag.len()
    }
    fn name(&self) -> String {
        "diagonal".into()
    }
    fn apply(&self, g: MatRef<'_, f64>) -> Result<Mat<f64>> {
        check_block("diagonal", self.dim(), g)?;
        Ok(Mat::from_fn(g.nrows(), g.ncols(), |i, j| {
            self.diag[i] * g[(i, j)]
        }))
    }
    fn diagonal(&self) -> Option<std::borrow::Cow<'_, [f64]>> {
        Some(std::borrow::Cow::Borrowed(&self.diag))
    }
    fn quad_forms(&self, g: MatRef<'_, f64>) -> Result<Vec<f64>> {
        check_block("diagonal", self.dim(), g)?;
        let out = (0..g.ncols())
            .map(|j| {
                (0..g.nrows())
                    .map(|i| self.diag[i] * g[(i, j)] * g[(i, j)])
                    .sum()
            })
            .collect();
        finish("diagonal", out)
    }
}
