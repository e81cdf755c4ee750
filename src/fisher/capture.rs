//! The empirical Fisher of any network built from `deltavar::nn` layers, on the capture engine.

use std::sync::Arc;

use candle_core::Module;
use faer::Mat;

use super::{FisherDense, FisherDiag, FisherSource};
use crate::data::Dataset;
use crate::engine::capture::CapturedGradients;
use crate::engine::gradients::GradientMatrix;
use crate::engine::{CaptureEngine, CaptureOptions, LayerRoute, LayeredGradients};
use crate::error::Result;
use crate::likelihood::Likelihood;
use crate::params::Params;

/// The empirical Fisher of a model built from [`crate::nn`] layers and a likelihood over a
/// dataset, by the capture engine (one batched forward and backward per batch).
///
/// Memory: diag F O(P) + one batch of activations; dense F O(P² + batch·P). The gradient
/// operator for the kernel and CG methods holds the gradients layer by layer
/// ([`LayeredGradients`]: each layer factored or materialised, whichever makes the Gram matrix
/// cheaper; at most N·P f64) when that takes at most half the budget, and otherwise recomputes
/// G in chunks on every product.
pub struct CapturedFisher<'a, M> {
    engine: CaptureEngine<'a, M>,
    lik: Likelihood,
    data: &'a dyn Dataset,
    opts: CaptureOptions,
    route: LayerRoute,
}

impl<'a, M: Module + Sync> CapturedFisher<'a, M> {
    /// The Fisher of `lik` on `model`'s outputs over `data`, with respect to `params` (which
    /// must all belong to `nn` layers of the model).
    pub fn new(
        model: &'a M,
        params: &'a Params,
        lik: Likelihood,
        data: &'a dyn Dataset,
        opts: CaptureOptions,
    ) -> Self {
        Self {
            engine: CaptureEngine::new(model, params),
            lik,
            data,
            opts,
            route: LayerRoute::Auto,
        }
    }

    /// How the gradient operator holds each layer (default [`LayerRoute::Auto`]).
    pub fn with_layer_route(mut self, route: LayerRoute) -> Self {
        self.route = route;
        self
    }

    /// Bytes the layered gradient operator would hold (one captured pass over one example
    /// reads the layers).
    fn layered_bytes(&self) -> Result<u64> {
        let shapes = self.engine.layer_shapes(&self.lik, self.data)?;
        Ok(LayeredGradients::bytes_for(
            &shapes,
            self.num_examples(),
            self.route,
        ))
    }

    /// The engine.
    pub fn engine(&self) -> &CaptureEngine<'a, M> {
        &self.engine
    }

    /// The per-example gradients of examples `start .. start+len` (P×len).
    pub fn per_example_gradients(&self, start: usize, len: usize) -> Result<Mat<f64>> {
        self.engine
            .per_example_gradients(&self.lik, self.data, start, len, &self.opts)
    }
}

impl<M: Module + Sync> FisherSource for CapturedFisher<'_, M> {
    fn num_params(&self) -> usize {
        self.engine.num_params()
    }

    fn num_examples(&self) -> usize {
        self.data.len()
    }

    fn fisher_diag(&self) -> Result<FisherDiag> {
        FisherDiag::from_sums(
            self.engine.sum_sq(&self.lik, self.data, &self.opts)?,
            self.data.len(),
        )
    }

    fn fisher_dense(&self, memory_budget: u64) -> Result<FisherDense> {
        super::dense_from_blocks(
            self.num_params(),
            self.num_examples(),
            self.opts.batch_size,
            memory_budget,
            |start, len| self.per_example_gradients(start, len),
        )
    }

    fn gradient_operator_bytes(&self, memory_budget: u64) -> u64 {
        super::operator_bytes(
            self.layered_bytes().ok(),
            (self.num_examples(), self.num_params(), self.opts.batch_size),
            memory_budget,
        )
    }

    fn has_gradient_operator(&self) -> bool {
        true
    }

    fn gradient_matrix(&self, memory_budget: u64) -> Result<Arc<dyn GradientMatrix + '_>> {
        let half = memory_budget / 2;
        if self.layered_bytes()? <= half {
            return Ok(Arc::new(self.engine.layered_gradients(
                &self.lik, self.data, &self.opts, self.route, half,
            )?));
        }
        Ok(Arc::new(CapturedGradients::new(
            &self.engine,
            &self.lik,
            self.data,
            self.opts.clone(),
        )))
    }
}
