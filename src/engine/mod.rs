//! Stage 2: the per-example engine — per-example log-likelihood gradients gᵢ = ∇θ log p(yᵢ|xᵢ,θ)
//! and query gradients, without ever storing the N×P gradient matrix. It sees parameters, data
//! and models (stage 1) only; the Fisher (stage 3) is built on it.
//!
//! - [`generic`]: any candle closure; one forward+backward per example, run in parallel
//!   ([`GenericGradients`], [`qoi_gradient`], [`qoi_gradients`]).
//!   Memory O(threads·P) for the squared sums, O(batch·P) extra for the outer-product sum.
//! - [`graph`]: any model as a graph ([`crate::graph`]: an ONNX file, or a network written with
//!   [`crate::graph::build::GraphBuilder`], including the `mlp:` and `seq:` models); a native batched
//!   forward/backward keeps each weight's input rows (patches) and output signals, and the
//!   per-example gradients follow per use and example; no candle autograd.
//! - [`capture`]: any candle network built from [`crate::nn`] layers; one batched candle
//!   forward/backward with probes per batch.
//! - [`gradients`]: the N×P gradient matrix G as an operator ([`GradientMatrix`]): the factors,
//!   G in memory, or G recomputed in chunks.
//! - [`layered`]: G held layer by layer, each layer materialised or factored, whichever makes
//!   the Gram matrix cheaper ([`LayeredGradients`], [`LayerRoute`]).

pub mod batch;
pub mod capture;
pub mod generic;
pub mod gradients;
pub(crate) mod gram;
pub mod graph;
pub mod kfac;
pub mod layered;
pub(crate) mod pool;
pub(crate) mod signals;

pub use batch::FactoredOptions;
pub use capture::{CaptureEngine, CaptureOptions};
pub use generic::{
    candle_single_threaded_matmuls, qoi_gradient, qoi_gradients, GenericGradients, GenericOptions,
    QoiGradient,
};
pub use gradients::ExampleGradients;
pub use gradients::{DenseGradients, GradientMatrix, QueryGradients, StreamedGradients};
pub use graph::GraphEngine;
pub use layered::{LayerRoute, LayeredGradients};
