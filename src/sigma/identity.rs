use faer::{Mat, MatRef};

use super::{check_block, col_sum_sq, finish, SigmaOp};
use crate::error::Result;

/// Σ = I: the delta variance is ‖g‖². Holds nothing but P.
#[derive(Debug, Clone)]
pub struct IdentitySigma {
    dim: usize,
}

impl IdentitySigma {
    /// The identity on P parameters.
    pub fn new(dim: usize) -> Self {
        Self { dim }
    }
}

impl SigmaOp for IdentitySigma {
    fn dim(&self) -> usize {
        self.dim
    }
    fn name(&self) -> String {
        "identity".into()
    }
    fn apply(&self, g: MatRef<'_, f64>) -> Result<Mat<f64>> {
        check_block(&self.name(), self.dim, g)?;
        Ok(g.to_owned())
    }
    fn diagonal(&self) -> Option<std::borrow::Cow<'_, [f64]>> {
        Some(std::borrow::Cow::Owned(vec![1.0; self.dim]))
    }
    fn quad_forms(&self, g: MatRef<'_, f64>) -> Result<Vec<f64>> {
        check_block(&self.name(), self.dim, g)?;
        finish("identity", col_sum_sq(g))
    }
}
