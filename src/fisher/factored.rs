//! The empirical Fisher of a known MLP through the factored engine, as a [`FisherSource`].

use std::sync::Arc;

use super::{FisherDense, FisherDiag, FisherSource};
use crate::data::{Dataset, DatasetRange};
use faer::{Mat, MatRef};

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
    progress: crate::progress::Progress,
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
            progress: crate::progress::Progress::none(),
        })
    }

    /// A line per chunk of every streamed product ([`StreamedFactors`]: a product over
    /// millions of examples takes minutes). Default none.
    pub fn with_progress(mut self, progress: crate::progress::Progress) -> Self {
        self.progress = progress;
        self
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

    /// The factors of every example when they fit half the budget; one chunk's otherwise
    /// (the streamed operator, [`StreamedFactors`]).
    fn gradient_operator_bytes(&self, memory_budget: u64) -> u64 {
        let whole = (self.data.len() as u64)
            .saturating_mul(self.gram_width() as u64)
            .saturating_mul(8);
        if whole <= memory_budget / 2 {
            whole
        } else {
            (self.stream_chunk(memory_budget) * self.gram_width() * 8) as u64
        }
    }

    /// The factors of the whole dataset, O(N·Σ(in+1+out)) f64, or streamed chunk by chunk.
    fn has_gradient_operator(&self) -> bool {
        true
    }

    /// The factors of every example held in memory when they fit half of `memory_budget`;
    /// otherwise [`StreamedFactors`], which recomputes them chunk by chunk on every product
    /// (no N×P, no N·Σ(in+1+out): memory one chunk's factors plus the product's blocks).
    fn gradient_matrix(&self, memory_budget: u64) -> Result<Arc<dyn GradientMatrix + '_>> {
        let whole = (self.data.len() as u64)
            .saturating_mul(self.gram_width() as u64)
            .saturating_mul(8);
        if whole <= memory_budget / 2 {
            return Ok(Arc::new(self.layered_gradients()?));
        }
        let chunk = self.stream_chunk(memory_budget);
        if (chunk * self.gram_width() * 8) as u64 > memory_budget {
            return Err(Error::MemoryBudget {
                what: format!(
                    "the per-layer factors of one batch ({chunk} examples) of {}",
                    self.data.len()
                ),
                needed: (chunk * self.gram_width() * 8) as u64,
                budget: memory_budget,
                hint: "raise the memory budget, lower the batch size, or use the diagonal Fisher"
                    .into(),
            });
        }
        Ok(Arc::new(StreamedFactors {
            fisher: self,
            chunk,
        }))
    }
}

impl FactoredFisher<'_> {
    /// Examples per chunk of the streamed operator: an eighth of the budget's worth of
    /// factors, at least one batch.
    fn stream_chunk(&self, memory_budget: u64) -> usize {
        let per = (self.gram_width().max(1) * 8) as u64;
        let fit = ((memory_budget / 8) / per) as usize;
        fit.max(self.opts.batch_size.max(1))
            .min(self.data.len().max(1))
    }

    fn chunk_factors(&self, start: usize, len: usize) -> Result<LayeredGradients> {
        self.engine.layered_gradients(
            &self.lik,
            &DatasetRange::new(self.data, start, len)?,
            &self.opts,
        )
    }
}

/// The MLP's per-example gradients recomputed as per-layer factors chunk by chunk on every
/// product: the gradient operator when the factors of all N examples do not fit (N in the
/// millions, the data memory-mapped). Memory: one chunk's factors (chunk·Σ(in+1+out) f64) and
/// the product's blocks (N×k for G·V, P×k for Gᵀ·U); each product costs one forward and
/// backward pass over the data (Gᵀ(G·V) one pass, not two: [`GradientMatrix::jtjv`]). The
/// N×N Gram matrix is available but costs a pass per pair of chunks; the kernel methods are
/// meant for factors that fit.
pub struct StreamedFactors<'f, 'a> {
    fisher: &'f FactoredFisher<'a>,
    chunk: usize,
}

impl StreamedFactors<'_, '_> {
    fn chunks(&self) -> Vec<(usize, usize)> {
        let n = self.fisher.data.len();
        (0..n)
            .step_by(self.chunk.max(1))
            .map(|s| (s, self.chunk.min(n - s)))
            .collect()
    }

    /// The factors of chunk `c` of `of` (examples `s .. s + l`), reporting the product's progress.
    fn factors(
        &self,
        what: &str,
        c: usize,
        of: usize,
        (s, l): (usize, usize),
    ) -> Result<LayeredGradients> {
        self.fisher.progress.report(|| {
            format!(
                "{what} (streamed): chunk {} of {of}, examples {s}..{}",
                c + 1,
                s + l
            )
        })?;
        self.fisher.chunk_factors(s, l)
    }
}

impl GradientMatrix for StreamedFactors<'_, '_> {
    fn num_params(&self) -> usize {
        self.fisher.engine.num_params()
    }
    fn num_examples(&self) -> usize {
        self.fisher.data.len()
    }
    fn jv(&self, v: MatRef<'_, f64>) -> Result<Mat<f64>> {
        let mut out = Mat::<f64>::zeros(self.num_examples(), v.ncols());
        let chunks = self.chunks();
        for (c, &(s, l)) in chunks.iter().enumerate() {
            let gv = self.factors("G·V", c, chunks.len(), (s, l))?.jv(v)?;
            out.as_mut().subrows_mut(s, l).copy_from(gv.as_ref());
        }
        Ok(out)
    }
    fn jtu(&self, u: MatRef<'_, f64>) -> Result<Mat<f64>> {
        if u.nrows() != self.num_examples() {
            return Err(Error::shape(
                "U in Gᵀ·U (N rows)",
                self.num_examples(),
                u.nrows(),
            ));
        }
        let mut out = Mat::<f64>::zeros(self.num_params(), u.ncols());
        let chunks = self.chunks();
        for (c, &(s, l)) in chunks.iter().enumerate() {
            out += self
                .factors("Gᵀ·U", c, chunks.len(), (s, l))?
                .jtu(u.subrows(s, l))?;
        }
        Ok(out)
    }
    fn jtjv(&self, v: MatRef<'_, f64>) -> Result<Mat<f64>> {
        let mut out = Mat::<f64>::zeros(self.num_params(), v.ncols());
        let chunks = self.chunks();
        for (c, &(s, l)) in chunks.iter().enumerate() {
            let f = self.factors("Gᵀ(G·V)", c, chunks.len(), (s, l))?;
            out += f.jtu(f.jv(v)?.as_ref())?;
        }
        Ok(out)
    }
    fn gram(&self) -> Result<Mat<f64>> {
        let n = self.num_examples();
        let mut k = Mat::<f64>::zeros(n, n);
        let chunks = self.chunks();
        for (a, &(sa, la)) in chunks.iter().enumerate() {
            let fa = self.fisher.chunk_factors(sa, la)?;
            for &(sb, lb) in &chunks[..=a] {
                let fb = self.fisher.chunk_factors(sb, lb)?;
                let blk = fa.cross_gram_layered(&fb).ok_or_else(|| {
                    Error::Unsupported("chunks of the MLP's factors in two layouts".into())
                })??;
                for j in 0..lb {
                    for i in 0..la {
                        k[(sa + i, sb + j)] = blk[(i, j)];
                        k[(sb + j, sa + i)] = blk[(i, j)];
                    }
                }
            }
        }
        Ok(k)
    }
    fn diag_sums(&self) -> Result<Vec<f64>> {
        self.fisher
            .engine
            .sum_sq(&self.fisher.lik, self.fisher.data, &self.fisher.opts)
    }
    fn gram_width(&self) -> usize {
        self.fisher.gram_width()
    }
    fn bytes(&self) -> u64 {
        (self.chunk * self.fisher.gram_width() * 8) as u64
    }
}
