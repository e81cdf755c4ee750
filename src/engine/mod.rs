//! Stage 2: the per-example engine — per-example log-likelihood gradients gᵢ = ∇θ log p(yᵢ|xᵢ,θ)
//! and query gradients, without ever storing the N×P gradient matrix.
//!
//! - [`generic`]: any candle closure; one forward+backward per example, run in parallel.
//!   Memory O(threads·P) for diag F, O(batch·P) extra for dense F.

pub mod generic;

pub use generic::{GenericFisher, GenericOptions};
