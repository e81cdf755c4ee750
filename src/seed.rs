//! The seed package's functions (`deltavar` 0.1.1, PyTorch), by their seed names, with the
//! same meaning. Each is a thin call into the pipeline; for many queries or large models use
//! the pipeline directly ([`crate::build_sigma`], [`crate::delta_variances`],
//! [`crate::mlp_delta_variances`]).
//!
//! | seed (Python) | here |
//! |---|---|
//! | `get_qoi_gradient(qoi_functional, params, model, z)` | [`get_qoi_gradient`] |
//! | `calculate_empirical_fim_diagonal(...)` | [`calculate_empirical_fim_diagonal`] |
//! | `calculate_empirical_fim_full(...)` | [`calculate_empirical_fim_full`] |
//! | `calculate_inverse_fim_diagonal(..., damping)` | [`calculate_inverse_fim_diagonal`] |
//! | `calculate_inverse_fim_full(..., damping)` | [`calculate_inverse_fim_full`] |
//! | `apply_identity_sigma`, `apply_diagonal_sigma`, `apply_full_sigma` | the same names |
//! | `calculate_delta_variance(...)` | [`calculate_delta_variance`] |

use faer::{Mat, MatRef};

use crate::delta::{build_sigma, SigmaOptions, SigmaStrategy};
use crate::error::Result;
use crate::fisher::FisherSource;
use crate::params::Params;
use crate::sigma::{DenseSigma, DiagonalSigma, IdentitySigma, SigmaOp};

/// Seed counterpart of `get_qoi_gradient(qoi_functional, params, model, z)`: ∇θ q(θ, z) for a
/// closure that runs the model and returns a scalar (see [`crate::qoi_gradient`]).
pub fn get_qoi_gradient<F>(
    params: &Params,
    z: &candle_core::Tensor,
    qoi: F,
) -> Result<crate::QoiGradient>
where
    F: Fn(&candle_core::Tensor) -> candle_core::Result<candle_core::Tensor>,
{
    crate::qoi_gradient(params, z, qoi)
}

/// Seed counterpart of `calculate_empirical_fim_diagonal`: the MEAN Fisher diagonal (length P).
pub fn calculate_empirical_fim_diagonal(source: &dyn FisherSource) -> Result<Vec<f64>> {
    Ok(source.fisher_diag()?.mean())
}

/// Seed counterpart of `calculate_inverse_fim_diagonal(..., damping)`: 1/(F_ii + λ) (length P).
pub fn calculate_inverse_fim_diagonal(source: &dyn FisherSource, damping: f64) -> Result<Vec<f64>> {
    crate::sigma::inverse_fisher_diag_values(&source.fisher_diag()?.mean(), damping)
}

/// Seed counterpart of `calculate_empirical_fim_full`: the MEAN P×P Fisher (refused above
/// `memory_budget` bytes; see [`crate::fisher::DEFAULT_MEMORY_BUDGET`]).
pub fn calculate_empirical_fim_full(
    source: &dyn FisherSource,
    memory_budget: u64,
) -> Result<Mat<f64>> {
    Ok(source.fisher_dense(memory_budget)?.mean())
}

/// Seed counterpart of `calculate_inverse_fim_full(..., damping)`: (F + λI)⁻¹ as a
/// Cholesky-factored operator; call [`crate::sigma::InverseFullFisher::to_dense`] for the
/// explicit matrix the seed returns.
pub fn calculate_inverse_fim_full(
    source: &dyn FisherSource,
    damping: f64,
    memory_budget: u64,
) -> Result<crate::sigma::InverseFullFisher> {
    crate::sigma::InverseFullFisher::new(
        source.fisher_dense(memory_budget)?.mean().as_ref(),
        damping,
    )
}

/// Seed counterpart of `apply_identity_sigma(flat_grads)`: ‖g‖².
pub fn apply_identity_sigma(flat_grads: &[f64]) -> Result<f64> {
    IdentitySigma::new(flat_grads.len()).quad_form(flat_grads)
}

/// Seed counterpart of `apply_diagonal_sigma(flat_grads, diag_elements)`: Σᵢ dᵢ gᵢ².
/// Fails if the lengths differ.
pub fn apply_diagonal_sigma(flat_grads: &[f64], diag_elements: &[f64]) -> Result<f64> {
    DiagonalSigma::new(diag_elements.to_vec())?.quad_form(flat_grads)
}

/// Seed counterpart of `apply_full_sigma(flat_grads, sigma_matrix)`: gᵀ S g.
/// Fails if the matrix is not P×P.
pub fn apply_full_sigma(flat_grads: &[f64], sigma_matrix: MatRef<'_, f64>) -> Result<f64> {
    DenseSigma::new(sigma_matrix.to_owned())?.quad_form(flat_grads)
}

/// The seed's `calculate_delta_variance(qoi_gradient, sigma_strategy, sigma_options, ...)` for one
/// flat QoI gradient: builds Σ and returns gᵀΣg. To evaluate many queries, build Σ once with
/// [`build_sigma`] and call [`crate::delta_variances`].
///
/// ```
/// use deltavar::seed::calculate_delta_variance;
/// use deltavar::{SigmaOptions, SigmaStrategy};
/// let g = [1.0, 2.0];
/// let v = calculate_delta_variance(&g, SigmaStrategy::Identity, &SigmaOptions::default(), None).unwrap();
/// assert_eq!(v, 5.0);
/// let v = calculate_delta_variance(&g, SigmaStrategy::Diagonal(vec![0.1, 0.1]), &SigmaOptions::default(), None).unwrap();
/// assert!((v - 0.5).abs() < 1e-15);
/// ```
pub fn calculate_delta_variance(
    qoi_gradient: &[f64],
    strategy: SigmaStrategy,
    opts: &SigmaOptions,
    fisher: Option<&dyn FisherSource>,
) -> Result<f64> {
    let sigma = build_sigma(strategy, qoi_gradient.len(), opts, fisher)?;
    sigma.quad_form(qoi_gradient)
}
