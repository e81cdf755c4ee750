//! The empirical Fisher of any candle closure, on the generic engine.

use std::sync::Arc;

use candle_core::Tensor;

use super::{FisherDense, FisherDiag, FisherSource};
use crate::engine::gradients::{DenseGradients, GradientMatrix, StreamedGradients};
use crate::engine::GenericGradients;
use crate::error::Result;

/// The empirical Fisher of a user log-likelihood closure over a dataset, by the generic path: the
/// per-example gradients themselves, [`GenericGradients`], are the [`FisherSource`]
/// (one candle forward and backward per example).
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
pub type GenericFisher<'a, L> = GenericGradients<'a, L>;

impl<L> FisherSource for GenericGradients<'_, L>
where
    L: Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor> + Sync,
{
    fn num_params(&self) -> usize {
        GenericGradients::num_params(self)
    }

    fn num_examples(&self) -> usize {
        GenericGradients::num_examples(self)
    }

    fn fisher_diag(&self) -> Result<FisherDiag> {
        FisherDiag::from_sums(self.sum_sq()?, self.num_examples())
    }

    fn fisher_dense(&self, memory_budget: u64) -> Result<FisherDense> {
        let (p, n) = (self.num_params(), self.num_examples());
        super::dense_from_blocks(p, n, self.options().batch_size, memory_budget, |s, l| {
            self.per_example_gradients(s, l)
        })
    }

    fn gradient_operator_bytes(&self, memory_budget: u64) -> u64 {
        let full = (self.num_examples() * self.num_params() * 8) as u64;
        if full <= memory_budget / 2 {
            full
        } else {
            (self.options().batch_size as u64)
                .saturating_mul(self.num_params() as u64)
                .saturating_mul(8)
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
                self.per_example_gradients(0, n)?,
            )));
        }
        Ok(Arc::new(StreamedGradients::from_generic(self)))
    }
}
