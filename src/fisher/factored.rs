//! The empirical Fisher of a known MLP through the factored engine, as a [`FisherSource`].

use std::sync::Arc;

use super::{FisherDense, FisherDiag, FisherSource};
use crate::data::{Dataset, DatasetRange};
use crate::engine::gradients::GradientMatrix;
use crate::engine::{FactoredMlp, FactoredOptions, LayeredGradients};
use crate::error::{Error, Result};
use crate::likelihood::Likelihood;
use crate::model::Mlp;

/// The empirical Fisher of an [`Mlp`] and a log-likelihood over a dataset, computed by the
/// factored engine. Use it wherever a [`FisherSource`] is taken (for example
/// [`crate::build_sigma`]): the seed's strategies then run on this engine.
///
/// ```
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{VarBuilder, VarMap};
/// use deltavar::*;
/// let vm = VarMap::new();
/// let mlp = Mlp::new(VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu), &[3, 8, 2], Activation::Tanh, None).unwrap();
/// let x = Tensor::randn(0f64, 1., (50, 3), &Device::Cpu).unwrap();
/// let y = Tensor::randn(0f64, 1., (50, 2), &Device::Cpu).unwrap();
/// let data = TensorDataset::new(x, y).unwrap();
/// let fisher = FactoredFisher::new(&mlp, Likelihood::gaussian(1.0), &data, FactoredOptions::default()).unwrap();
/// assert_eq!(fisher.fisher_diag().unwrap().sums().len(), 3 * 8 + 8 + 8 * 2 + 2);
/// ```
pub struct FactoredFisher<'a> {
    engine: FactoredMlp,
    lik: Likelihood,
    data: &'a dyn Dataset,
    opts: FactoredOptions,
}

impl<'a> FactoredFisher<'a> {
    /// Snapshots the MLP's weights and pairs them with a likelihood and a dataset.
    pub fn new(
        mlp: &Mlp,
        lik: Likelihood,
        data: &'a dyn Dataset,
        opts: FactoredOptions,
    ) -> Result<Self> {
        Ok(Self {
            engine: FactoredMlp::new(mlp)?,
            lik,
            data,
            opts,
        })
    }

    /// The engine.
    pub fn engine(&self) -> &FactoredMlp {
        &self.engine
    }

    /// The per-example gradients of the whole dataset as per-layer factors (memory
    /// O(N·Σ(in+1+out))), for J·V, Jᵀ·U, F·V and the Gram matrix.
    pub fn layered_gradients(&self) -> Result<LayeredGradients> {
        self.engine
            .layered_gradients(&self.lik, self.data, &self.opts)
    }
}

impl FisherSource for FactoredFisher<'_> {
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

    /// Streams chunks of per-example gradients built from the factors into the lower triangle
    /// of Σᵢ gᵢgᵢᵀ. Memory O(P² + batch·P).
    fn fisher_dense(&self, memory_budget: u64) -> Result<FisherDense> {
        super::dense_from_blocks(
            self.engine.num_params(),
            self.data.len(),
            self.opts.batch_size,
            memory_budget,
            |start, len| {
                Ok(self
                    .engine
                    .layered_gradients(
                        &self.lik,
                        &DatasetRange::new(self.data, start, len)?,
                        &self.opts,
                    )?
                    .to_dense())
            },
        )
    }

    fn gram_width(&self) -> usize {
        self.engine.gram_width()
    }

    fn gradient_operator_bytes(&self, _memory_budget: u64) -> u64 {
        (self.data.len() * self.gram_width() * 8) as u64
    }

    /// The factors of the whole dataset, O(N·Σ(in+out)) f64.
    fn has_gradient_operator(&self) -> bool {
        true
    }

    fn gradient_matrix(&self, memory_budget: u64) -> Result<Arc<dyn GradientMatrix + '_>> {
        let needed = self.gradient_operator_bytes(memory_budget);
        if needed > memory_budget {
            return Err(Error::MemoryBudget {
                what: format!("the per-layer factors of {} examples", self.data.len()),
                needed,
                budget: memory_budget,
                hint: "raise the memory budget or use the diagonal Fisher".into(),
            });
        }
        Ok(Arc::new(self.layered_gradients()?))
    }
}
