use faer::{Mat, MatRef};

use super::{check_block, SigmaOp};
use crate::error::{Error, Result};

/// The closure type of a [`CustomSigma`]: flat gradient (length P) ↦ gᵀΣg.
pub type QuadFormFn = dyn Fn(&[f64]) -> f64 + Send + Sync;

/// Σ given only through its quadratic form: a user closure `f(flat_grad) -> gᵀΣg`
/// (the seed's `Callable` strategy). A non-finite return is an error.
///
/// ```
/// use deltavar::sigma::{CustomSigma, SigmaOp};
/// let s = CustomSigma::new(3, |g| 2.0 * g.iter().map(|x| x * x).sum::<f64>());
/// assert_eq!(s.quad_form(&[1.0, 0.0, 1.0]).unwrap(), 4.0);
/// ```
pub struct CustomSigma {
    dim: usize,
    f: Box<QuadFormFn>,
}

impl CustomSigma {
    /// A custom Σ on P parameters.
    pub fn new(dim: usize, f: impl Fn(&[f64]) -> f64 + Send + Sync + 'static) -> Self {
        Self {
            dim,
            f: Box::new(f),
        }
    }
}

impl std::fmt::Debug for CustomSigma {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CustomSigma")
            .field("dim", &self.dim)
            .finish_non_exhaustive()
    }
}

impl SigmaOp for CustomSigma {
    fn dim(&self) -> usize {
        self.dim
    }
    fn name(&self) -> String {
        "custom".into()
    }
    fn apply(&self, _g: MatRef<'_, f64>) -> Result<Mat<f64>> {
        Err(Error::Unsupported(
            "a custom Sigma defines only the quadratic form g -> g^T Sigma g; it cannot be applied to a vector \
             (use quad_form / quad_forms, or give Sigma as a dense or diagonal matrix)"
                .into(),
        ))
    }
    fn quad_forms(&self, g: MatRef<'_, f64>) -> Result<Vec<f64>> {
        check_block(&self.name(), self.dim, g)?;
        let mut col = vec![0.0; g.nrows()];
        let mut out = Vec::with_capacity(g.ncols());
        for j in 0..g.ncols() {
            for (i, c) in col.iter_mut().enumerate() {
                *c = g[(i, j)];
            }
            let v = (self.f)(&col);
            if !v.is_finite() {
                return Err(Error::NonFinite {
                    what: "custom Sigma function".into(),
                    detail: format!(
                        "it returned {v} for gradient {j}; it must return a finite scalar g^T Sigma g"
                    ),
                });
            }
            out.push(v);
        }
        Ok(out)
    }
}
