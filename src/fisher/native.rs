//! The empirical Fisher on an engine with per-example gradients: the graph engine (any graph:
//! ONNX files, `seq:` models, the transformer and other networks written with the graph
//! builder) and the capture engine (candle code built from `deltavar::nn`).

use std::sync::Arc;

use faer::Mat;

use super::{FisherDense, FisherDiag, FisherSource};
use crate::data::Dataset;
use crate::engine::gradients::{
    DenseGradients, ExampleGradients, GradientMatrix, StreamedGradients,
};
use crate::engine::{CaptureEngine, CaptureOptions, FactoredOptions, LayerRoute};
use crate::error::Result;
use crate::likelihood::Likelihood;

/// The empirical Fisher of a model on an engine `E` ([`GraphFisher`], [`CapturedFisher`]) and a
/// likelihood over a dataset.
///
/// Memory: diag F O(P) + one batch of activations per worker; dense F O(P² + chunk·P). The
/// gradient operator for the kernel and CG methods holds the gradients layer by layer
/// ([`crate::engine::LayeredGradients`]: each Linear, convolution or embedding factored or
/// materialised, whichever makes the Gram matrix cheaper) when that takes at most half the
/// budget, else G (N·P f64) when that does; otherwise it recomputes G in chunks on every
/// product ([`StreamedGradients`]).
pub struct NativeFisher<'a, E> {
    engine: E,
    lik: Likelihood,
    data: &'a dyn Dataset,
    opts: FactoredOptions,
    route: LayerRoute,
    progress: crate::progress::Progress,
}

/// The empirical Fisher of a graph model ([`crate::graph::Graph`]) on the graph engine: build it
/// with [`NativeFisher::with_engine`].
pub type GraphFisher<'a> = NativeFisher<'a, crate::engine::GraphEngine>;

/// The empirical Fisher of any network built from [`crate::nn`] layers on the capture engine
/// (one batched forward and backward per batch): build it with [`CapturedFisher::new`]. The
/// gradient operator holds the captured layers' gradients layer by layer
/// ([`crate::engine::LayeredGradients`]) when they fit half the budget, as for a graph.
pub type CapturedFisher<'a, M> = NativeFisher<'a, CaptureEngine<'a, M>>;

impl<'a, M: candle_core::Module + Sync> CapturedFisher<'a, M> {
    /// The Fisher of `lik` on `model`'s outputs over `data`, with respect to `params` (which
    /// must all belong to `nn` layers of the model), batches of `opts.batch_size`.
    pub fn new(
        model: &'a M,
        params: &'a crate::params::Params,
        lik: Likelihood,
        data: &'a dyn Dataset,
        opts: CaptureOptions,
    ) -> Self {
        let engine = CaptureEngine::new(model, params).with_chunk_elements(opts.chunk_elements);
        let opts = FactoredOptions {
            batch_size: opts.batch_size,
            threads: 1,
        };
        Self::with_engine(engine, lik, data, opts)
    }
}

impl<'a, E: ExampleGradients> NativeFisher<'a, E> {
    /// From an engine already built.
    pub fn with_engine(
        engine: E,
        lik: Likelihood,
        data: &'a dyn Dataset,
        opts: FactoredOptions,
    ) -> Self {
        Self {
            engine,
            lik,
            data,
            opts,
            route: LayerRoute::Auto,
            progress: crate::progress::Progress::none(),
        }
    }

    /// How the gradient operator holds each layer (default [`LayerRoute::Auto`]).
    pub fn with_layer_route(mut self, route: LayerRoute) -> Self {
        self.route = route;
        self
    }

    /// A line per chunk of every streamed product ([`StreamedGradients`], when the gradients do
    /// not fit). Default none.
    pub fn with_progress(mut self, progress: crate::progress::Progress) -> Self {
        self.progress = progress;
        self
    }

    /// The engine.
    pub fn engine(&self) -> &E {
        &self.engine
    }

    /// The per-example gradients of examples `start .. start+len` (P×len).
    pub fn per_example_gradients(&self, start: usize, len: usize) -> Result<Mat<f64>> {
        self.engine
            .per_example_gradients(&self.lik, self.data, start, len, &self.opts)
    }

    /// Bytes the layered gradient operator would hold (`None`: the engine has none).
    fn layered_bytes(&self) -> Result<Option<u64>> {
        self.engine.layered_bytes(&self.lik, self.data, self.route)
    }

    fn block_size(&self) -> usize {
        (self.opts.batch_size.max(1))
            .saturating_mul(crate::engine::pool::resolve_threads(self.opts.threads))
    }
}

impl<E: ExampleGradients> FisherSource for NativeFisher<'_, E> {
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
            self.block_size(),
            memory_budget,
            |start, len| self.per_example_gradients(start, len),
        )
    }

    fn has_gradient_operator(&self) -> bool {
        true
    }

    fn kronecker_factors(&self) -> Option<Result<crate::engine::kfac::KfacFactors>> {
        self.engine
            .kronecker_factors(&self.lik, self.data, &self.opts)
    }

    fn gradient_operator_bytes(&self, memory_budget: u64) -> u64 {
        super::operator_bytes(
            self.layered_bytes().ok().flatten(),
            (self.num_examples(), self.num_params(), self.block_size()),
            memory_budget,
        )
    }

    fn gradient_matrix(&self, memory_budget: u64) -> Result<Arc<dyn GradientMatrix + '_>> {
        let n = self.num_examples();
        let half = memory_budget / 2;
        if self.layered_bytes()?.is_some_and(|b| b <= half) {
            if let Some(g) = self
                .engine
                .layered_gradients(&self.lik, self.data, &self.opts, self.route, half)
            {
                return Ok(Arc::new(g?));
            }
        }
        if ((n * self.num_params() * 8) as u64) <= memory_budget / 2 {
            return Ok(Arc::new(DenseGradients::new(
                self.per_example_gradients(0, n)?,
            )));
        }
        Ok(Arc::new(
            StreamedGradients::from_engine(&self.engine, &self.lik, self.data, self.opts.clone())
                .with_progress(self.progress.clone()),
        ))
    }
}
