//! The empirical Fisher of any candle closure, on the generic engine.

use std::sync::Arc;

use candle_core::Tensor;
use faer::Mat;

use super::{dense_fisher_bytes, FisherDense, FisherDiag, FisherSource};
use crate::data::Dataset;
use crate::engine::gradients::{DenseGradients, GradientMatrix, StreamedGradients};
use crate::engine::{GenericGradients, GenericOptions};
use crate::error::{Error, Result};
use crate::params::Params;

/// The empirical Fisher of a user log-likelihood closure over a dataset, by the generic path
/// (one candle forward and backward per example, [`GenericGradients`]).
///
/// The closure `log_lik(x, y)` runs the model on a batch (B, …) and returns the per-example
/// log-likelihoods, shape (B,). It is called with B = 1.
///
/// Memory: diag F O(threads·P); dense F O(P² + batch_size·P); the gradient operator for the
/// kernel and CG methods holds G (N·P f64) when that takes at most half the budget, and
/// otherwise recomputes it in chunks on every product.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use deltavar::{FisherSource, GenericFisher, GenericOptions, Params, TensorDataset};
/// // one parameter w, model f(x) = w x, gaussian log-likelihood -(y - w x)^2 / 2
/// let w = Var::from_tensor(&Tensor::new(&[2.0f64], &Device::Cpu).unwrap()).unwrap();
/// let params = Params::from_vars(vec![("w".into(), w.clone())]).unwrap();
/// let x = Tensor::new(&[[1.0f64], [2.0]], &Device::Cpu).unwrap();
/// let y = Tensor::new(&[[3.0f64], [3.0]], &Device::Cpu).unwrap();
/// let data = TensorDataset::new(x, y).unwrap();
/// let ll = |x: &Tensor, y: &Tensor| {
///     let r = (y - x.broadcast_mul(w.as_tensor())?)?;
///     (r.sqr()? * -0.5)?.sum(1)
/// };
/// let fisher = GenericFisher::new(&params, ll, &data, GenericOptions::default());
/// // g_i = (y - w x) x: 1 and -2, so F = (1 + 4) / 2
/// assert_eq!(fisher.fisher_diag().unwrap().mean(), vec![2.5]);
/// ```
pub struct GenericFisher<'a, L> {
    grads: GenericGradients<'a, L>,
}

impl<'a, L> GenericFisher<'a, L>
where
    L: Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor> + Sync,
{
    /// The generic Fisher of `log_lik` over `data` with respect to `params`.
    pub fn new(
        params: &'a Params,
        log_lik: L,
        data: &'a dyn Dataset,
        opts: GenericOptions,
    ) -> Self {
        Self {
            grads: GenericGradients::new(params, log_lik, data, opts),
        }
    }

    /// The per-example gradients behind it.
    pub fn gradients(&self) -> &GenericGradients<'a, L> {
        &self.grads
    }

    /// The per-example gradients of examples `start .. start+len` as a P×len matrix (one
    /// column per example). O(P·len) memory: for tests and small problems.
    pub fn per_example_gradients(&self, start: usize, len: usize) -> Result<Mat<f64>> {
        self.grads.per_example_gradients(start, len)
    }
}

impl<L> FisherSource for GenericFisher<'_, L>
where
    L: Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor> + Sync,
{
    fn num_params(&self) -> usize {
        self.grads.num_params()
    }

    fn num_examples(&self) -> usize {
        self.grads.num_examples()
    }

    fn fisher_diag(&self) -> Result<FisherDiag> {
        FisherDiag::from_sums(self.grads.sum_sq()?, self.num_examples())
    }

    fn fisher_dense(&self, memory_budget: u64) -> Result<FisherDense> {
        let (p, n) = (self.num_params(), self.num_examples());
        let bs = self.grads.options().batch_size;
        let needed = dense_fisher_bytes(p) + 2 * (bs.min(n.max(1)) * p * 8) as u64;
        if needed > memory_budget {
            return Err(Error::MemoryBudget {
                what: format!("the dense {p}×{p} empirical Fisher"),
                needed,
                budget: memory_budget,
                hint: "use the diagonal Fisher, raise the memory budget, or (for the full inverse) a matrix-free method".into(),
            });
        }
        FisherDense::from_lower_sum(self.grads.outer_sum_lower()?, n)
    }

    fn gradient_operator_bytes(&self, memory_budget: u64) -> u64 {
        let full = (self.num_examples() * self.num_params() * 8) as u64;
        if full <= memory_budget / 2 {
            full
        } else {
            (self.grads.options().batch_size * self.num_params() * 8) as u64
        }
    }

    /// G in memory (P×N f64) when it takes at most half the budget; otherwise recomputed in
    /// chunks of `batch_size` examples on every product.
    fn has_gradient_operator(&self) -> bool {
        true
    }

    fn gradient_matrix(&self, memory_budget: u64) -> Result<Arc<dyn GradientMatrix + '_>> {
        let n = self.num_examples();
        let full = (n * self.num_params() * 8) as u64;
        if full <= memory_budget / 2 {
            return Ok(Arc::new(DenseGradients::new(
                self.grads.per_example_gradients(0, n)?,
            )));
        }
        Ok(Arc::new(StreamedGradients::new(
            &self.grads,
            self.grads.options().batch_size,
        )))
    }
}
