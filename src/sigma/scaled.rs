use faer::{Mat, MatRef};

use super::SigmaOp;
use crate::error::{Error, Result};

/// c·Σ for an inner operator Σ and a positive finite factor c, for example the paper's
/// posterior scaling Σ = F⁻¹/N (c = 1/N). Holds the inner operator.
pub struct ScaledSigma<S> {
    inner: S,
    factor: f64,
}

impl<S: SigmaOp> ScaledSigma<S> {
    /// c·Σ. Fails unless c is finite and positive.
    pub fn new(inner: S, factor: f64) -> Result<Self> {
        if !(factor.is_finite() && factor > 0.0) {
            return Err(Error::invalid(
                "Sigma scale factor",
                factor,
                "must be finite and > 0",
            ));
        }
        Ok(Self { inner, factor })
    }

    /// The factor c.
    pub fn factor(&self) -> f64 {
        self.factor
    }
}

impl<S: SigmaOp> SigmaOp for ScaledSigma<S> {
    fn dim(&self) -> usize {
        self.inner.dim()
    }
    fn name(&self) -> String {
        self.inner.name()
    }
    fn lowrank_report(&self) -> Option<super::LowRankReport> {
        self.inner.lowrank_report()
    }
    fn apply(&self, g: MatRef<'_, f64>) -> Result<Mat<f64>> {
        let mut m = self.inner.apply(g)?;
        for j in 0..m.ncols() {
            for i in 0..m.nrows() {
                m[(i, j)] *= self.factor;
            }
        }
        Ok(m)
    }
    fn quad_forms(&self, g: MatRef<'_, f64>) -> Result<Vec<f64>> {
        Ok(self.scale(self.inner.quad_forms(g)?))
    }
    /// c·diag when the inner Σ is diagonal, so engines keep their Jacobian-free path.
    fn diagonal(&self) -> Option<std::borrow::Cow<'_, [f64]>> {
        let d = self.inner.diagonal()?;
        Some(std::borrow::Cow::Owned(
            d.iter().map(|v| v * self.factor).collect(),
        ))
    }
    /// The inner Σ's layered quadratic forms, scaled (the kernel Σ never forms query gradients).
    fn quad_forms_layered(&self, q: &crate::engine::LayeredGradients) -> Option<Result<Vec<f64>>> {
        Some(self.inner.quad_forms_layered(q)?.map(|v| self.scale(v)))
    }
    /// The inner solve's report, with the values scaled.
    fn quad_forms_reported(&self, g: MatRef<'_, f64>) -> Result<super::QuadForms> {
        let r = self.inner.quad_forms_reported(g)?;
        Ok(super::QuadForms {
            values: self.scale(r.values),
            cg: r.cg,
        })
    }
    fn solve_report(&self) -> Option<super::CgReport> {
        self.inner.solve_report()
    }
}

impl<S: SigmaOp> ScaledSigma<S> {
    fn scale(&self, v: Vec<f64>) -> Vec<f64> {
        v.into_iter().map(|x| x * self.factor).collect()
    }
}

impl SigmaOp for Box<dyn SigmaOp + '_> {
    fn dim(&self) -> usize {
        (**self).dim()
    }
    fn name(&self) -> String {
        (**self).name()
    }
    fn lowrank_report(&self) -> Option<super::LowRankReport> {
        (**self).lowrank_report()
    }
    fn apply(&self, g: MatRef<'_, f64>) -> Result<Mat<f64>> {
        (**self).apply(g)
    }
    fn quad_forms(&self, g: MatRef<'_, f64>) -> Result<Vec<f64>> {
        (**self).quad_forms(g)
    }
    fn diagonal(&self) -> Option<std::borrow::Cow<'_, [f64]>> {
        (**self).diagonal()
    }
    fn quad_forms_layered(&self, q: &crate::engine::LayeredGradients) -> Option<Result<Vec<f64>>> {
        (**self).quad_forms_layered(q)
    }
    fn quad_forms_reported(&self, g: MatRef<'_, f64>) -> Result<super::QuadForms> {
        (**self).quad_forms_reported(g)
    }
    fn solve_report(&self) -> Option<super::CgReport> {
        (**self).solve_report()
    }
}
