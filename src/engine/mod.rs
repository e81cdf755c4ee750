//! Stage 2: the per-example engine — per-example log-likelihood gradients gᵢ = ∇θ log p(yᵢ|xᵢ,θ)
//! and query gradients, without ever storing the N×P gradient matrix.
//!
//! - [`generic`]: any candle closure; one forward+backward per example, run in parallel.
//!   Memory O(threads·P) for diag F, O(batch·P) extra for dense F.

//! - [`factored`]: models it knows ([`crate::Mlp`]); a native batched forward/backward gives each
//!   layer's factors (X, Δ), from which diag F, F·V, J·V, Jᵀ·U, the Gram matrix and query
//!   gradients follow without the N×P matrix.

pub mod factored;
pub mod generic;
pub mod gradients;
mod pool;

pub use factored::{
    FactoredFisher, FactoredMlp, FactoredOptions, Factors, OutputLikelihood, OutputQoi,
    QueryFactors,
};
pub use generic::{GenericFisher, GenericOptions};
pub use gradients::{DenseGradients, GradientMatrix, StreamedGradients};
