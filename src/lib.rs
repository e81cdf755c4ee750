//! # deltavar
//!
//! The Delta Variance (arXiv 2502.14698) of a trained candle model: the epistemic variance
//! ΔVar(z) = ∇θq(z)ᵀ Σ ∇θq(z) of any scalar quantity of interest q(θ, z), with Σ an
//! approximation of the parameter covariance, usually the damped inverse empirical Fisher.
//!
//! The pipeline, one module per stage; each imports only the stages before it:
//!
//! 1. [`params`], [`data`], [`model`], [`likelihood`], [`qoi`] — the parameters θ and their flat
//!    layout, training data, the models the fast engine knows, and the objectives;
//! 2. [`engine`] — per-example log-likelihood gradients and QoI gradients (generic: any candle
//!    closure; factored: per-layer factors, never the N×P matrix);
//! 3. [`fisher`] — the empirical Fisher F as one operator ([`FisherSource`]), summed in f64;
//! 4. [`sigma`] — Σ as a linear operator ([`SigmaOp`]), the full inverse by dense Cholesky, the
//!    exact N×N kernel, or preconditioned CG;
//! 5. [`delta`] — ΔVar for blocks of query gradients or query factors;
//! 6. [`seed`] — the Python package's functions by their names; [`prelude`] — the common imports;
//! 7. [`pipeline`] — the whole pipeline behind one call (a model from its files, ΔVar as one
//!    report), what the CLI and the Python package (`python/`) call.
//!
//! The `cli` feature (default) adds the `deltavar` binary and the demo.
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use deltavar::*;
//! use deltavar::seed::calculate_delta_variance;
//!
//! // a small regression MLP (weights from candle-nn's initialiser)
//! let dev = Device::Cpu;
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F64, &dev);
//! let mlp = Mlp::new(vb, &[2, 8, 1], Activation::Tanh, None).unwrap();
//! let params = mlp.params(&varmap).unwrap();
//!
//! // training data and its Fisher (generic path: any candle closure works)
//! let x = Tensor::randn(0f64, 1., (32, 2), &dev).unwrap();
//! let y = Tensor::randn(0f64, 1., (32, 1), &dev).unwrap();
//! let data = TensorDataset::new(x, y).unwrap();
//! let lik = Likelihood::gaussian(1.0);
//! let ll = |x: &Tensor, y: &Tensor| {
//!     lik.log_likelihood(&mlp.forward(x)?, y).map_err(candle_core::Error::wrap)
//! };
//! let fisher = GenericFisher::new(&params, ll, &data, GenericOptions::default());
//!
//! // the QoI gradient at z, and its delta variance under Σ = (F + λI)⁻¹
//! let z = Tensor::new(&[[0.5f64, -1.0]], &dev).unwrap();
//! let g = qoi_gradient(&params, &z, |z| mlp.forward(z)?.sum_all()).unwrap();
//! let opts = SigmaOptions { damping: 1e-3, ..Default::default() };
//! let dv = calculate_delta_variance(&g.flat, SigmaStrategy::InverseFullEmpiricalFim, &opts, Some(&fisher)).unwrap();
//! assert!(dv > 0.0);
//! ```

#![warn(missing_docs)]

pub mod calibration;
pub mod data;
pub mod delta;
#[cfg(feature = "cli")]
pub mod demo;
pub mod engine;
pub mod error;
pub mod fisher;
pub mod graph;
pub mod likelihood;
pub mod metrics;
pub mod model;
pub mod nn;
pub mod params;
pub mod pipeline;
pub mod prelude;
pub mod progress;
pub mod qoi;
pub mod scalar;
pub mod seed;
pub mod sigma;

pub use data::{BatchList, BatchView, Dataset, DatasetRange, MmapNpyDataset, TensorDataset};
pub use delta::{
    build_sigma, delta_covariances, delta_variances, engine_delta_covariances_with,
    engine_delta_variances_with, engine_group_delta_variances_with, mlp_delta_variances,
    query_delta_variances, query_delta_variances_reported, BuiltSigma, DeltaCovariances,
    DeltaRequest, DeltaVariances, GroupDeltaVariances, QueryPath, SigmaOptions, SigmaStrategy,
};
pub use engine::{
    qoi_gradient, qoi_gradients, CaptureEngine, CaptureOptions, ExampleGradients, FactoredOptions,
    GenericGradients, GenericOptions, GraphEngine, LayerRoute, LayeredGradients, QoiGradient,
    QueryGradients,
};
pub use error::{Error, Result};
pub use fisher::{
    fisher_pass, tensors_fingerprint, weights_fingerprint, CapturedFisher, FisherArtifact,
    FisherDense, FisherDiag, FisherSource, GenericFisher, GraphFisher, PassKind, PassOptions,
    DEFAULT_MEMORY_BUDGET,
};
pub use likelihood::Likelihood;
pub use model::{Activation, Mlp, SeqSpec, Sequential, Transformer, TransformerConfig};
pub use params::{ParamOrder, Params};
pub use progress::Progress;
pub use qoi::Qoi;
pub use sigma::{FullMethod, SigmaOp};
