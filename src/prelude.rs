//! The common path in one import: `use deltavar::prelude::*;`.
//!
//! Model and parameters, data, the two engines' Fisher sources, Σ options and strategies, and
//! the delta-variance entry points.
//!
//! ```
//! use deltavar::prelude::*;
//! let g = [1.0, 2.0];
//! let sigma = build_sigma(SigmaStrategy::Identity, 2, &SigmaOptions::default(), None).unwrap();
//! assert_eq!(sigma.quad_form(&g).unwrap(), 5.0);
//! ```

pub use crate::data::{Dataset, MmapNpyDataset, TensorDataset};
pub use crate::delta::{
    build_sigma, delta_variances, engine_delta_variances_with, mlp_delta_variances,
    query_delta_variances, DeltaRequest, SigmaOptions, SigmaStrategy,
};
pub use crate::engine::{
    qoi_gradient, qoi_gradients, ExampleGradients, FactoredOptions, GenericOptions, GraphEngine,
    QueryGradients,
};
pub use crate::error::{Error, Result};
pub use crate::fisher::{FisherArtifact, FisherSource, GenericFisher, GraphFisher};
pub use crate::graph::Graph;
pub use crate::likelihood::Likelihood;
pub use crate::model::{Activation, Mlp};
pub use crate::params::{ParamOrder, Params};
pub use crate::qoi::Qoi;
pub use crate::sigma::{FullMethod, SigmaOp};
