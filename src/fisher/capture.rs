//! The empirical Fisher of any network built from `deltavar::nn` layers, on the capture engine.

use std::sync::Arc;

use candle_core::Module;
use faer::Mat;

use super::{FisherDense, FisherDiag, FisherSource};
use crate::data::Dataset;
use crate::engine::capture::CapturedGradients;
use crate::engine::gradients::{DenseGradients, GradientMatrix};
use crate::engine::{CaptureEngine, CaptureOptions};
use crate::error::Result;
use crate::likelihood::Likelihood;
use crate::params::Params;

/// The empirical Fisher of a model built from [`crate::nn`] layers and a likelihood over a
/// dataset, by the capture engine (one batched forward and backward per batch).
///
/// Memory: diag F O(P) + one batch of activations; dense F O(P² + batch·P); the gradient
/// operator for the kernel and CG methods holds G (N·P f64) when that takes at most half the
/// budget and otherwise recomputes it in chunks on every product.
pub struct CapturedFisher<'a, M> {
    engine: CaptureEngine<'a, M>,
    lik: Likelihood,
    data: &'a dyn Dataset,
    opts: CaptureOptions,
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
        }
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
        let full = (self.num_examples() * self.num_params() * 8) as u64;
        if full <= memory_budget / 2 {
            full
        } else {
            (self.opts.batch_size * self.num_params() * 8) as u64
        }
    }

    fn has_gradient_operator(&self) -> bool {
        true
    }

    fn gradient_matrix(&self, memory_budget: u64) -> Result<Arc<dyn GradientMatrix + '_>> {
        let n = self.num_examples();
        if ((n * self.num_params() * 8) as u64) <= memory_budget / 2 {
            return Ok(Arc::new(DenseGradients::new(
                self.per_example_gradients(0, n)?,
            )));
        }
        Ok(Arc::new(CapturedGradients::new(
            &self.engine,
            &self.lik,
            self.data,
            self.opts.clone(),
        )))
    }
}
