//! The empirical Fisher on the graph engine (any graph: ONNX files, `seq:` models, the
//! transformer and other networks written with the graph builder).

use std::sync::Arc;

use faer::Mat;

use super::{FisherDense, FisherDiag, FisherSource};
use crate::data::Dataset;
use crate::engine::gradients::{DenseGradients, ExampleGradients, GradientMatrix, NativeStreamed};
use crate::engine::{FactoredOptions, LayerRoute};
use crate::error::Result;
use crate::likelihood::Likelihood;

/// The empirical Fisher of a model on a native engine `E` and a likelihood over a dataset.
///
/// Memory: diag F O(P) + one batch of activations per worker; dense F O(P² + chunk·P). The
/// gradient operator for the kernel and CG methods holds, when that takes at most half the
/// budget, the gradients layer by layer ([`crate::engine::LayeredGradients`]: each Linear or convolution
/// factored or materialised, whichever makes the Gram matrix cheaper — for the sequential
/// engine) or G (N·P f64); otherwise it recomputes G in chunks on every product.
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

    /// A line per chunk of every streamed product ([`NativeStreamed`], when the gradients do
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

    fn block_size(&self) -> usize {
        self.opts.batch_size.max(1) * crate::engine::pool::resolve_threads(self.opts.threads)
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

    fn gradient_operator_bytes(&self, memory_budget: u64) -> u64 {
        super::operator_bytes(
            self.engine.layered_bytes(self.num_examples(), self.route),
            (self.num_examples(), self.num_params(), self.block_size()),
            memory_budget,
        )
    }

    fn gradient_matrix(&self, memory_budget: u64) -> Result<Arc<dyn GradientMatrix + '_>> {
        let n = self.num_examples();
        let half = memory_budget / 2;
        if self
            .engine
            .layered_bytes(n, self.route)
            .is_some_and(|b| b <= half)
        {
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
            NativeStreamed::new(&self.engine, &self.lik, self.data, self.opts.clone())
                .with_progress(self.progress.clone()),
        ))
    }
}
