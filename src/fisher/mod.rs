//! Stage 3: the empirical Fisher F = (1/N) Σᵢ gᵢ gᵢᵀ, accumulated in f64.
//!
//! Results keep the SUMS and N (so passes over shards of a dataset can be merged exactly) and
//! give the MEAN through `mean()`. An empty dataset gives F = 0 (and so Σ = I/λ under the inverse
//! strategies, as in the seed).
//!
//! | result | memory |
//! |---|---|
//! | [`FisherDiag`] | O(P) |
//! | [`FisherDense`] | O(P²): formed only when asked, under a memory budget |

pub mod artifact;
mod generic;
mod native;
pub mod offline;

pub use artifact::{
    shard_range, tensors_fingerprint, weights_fingerprint, FisherArtifact, FisherMeta,
};
pub use generic::GenericFisher;
pub use native::{CapturedFisher, GraphFisher, NativeFisher};
pub use offline::{fisher_pass, parse_shard, PassKind, PassOptions};

use faer::{Mat, MatRef};

use crate::engine::gradients::GradientMatrix;
use crate::error::{check_finite, Error, Result};

pub use crate::engine::batch::DEFAULT_MEMORY_BUDGET;

/// The bytes a native engine's gradient operator holds under `memory_budget`: the gradients
/// held layer by layer (`layered`) when they fit half of it, else G (N·P f64) when that fits,
/// else one streamed chunk of `chunk` examples' gradients.
pub(crate) fn operator_bytes(
    layered: Option<u64>,
    (n, p, chunk): (usize, usize, usize),
    memory_budget: u64,
) -> u64 {
    let half = memory_budget / 2;
    if let Some(b) = layered.filter(|b| *b <= half) {
        return b;
    }
    let f64s = |rows: usize| (rows as u64).saturating_mul(p as u64).saturating_mul(8);
    if f64s(n) <= half {
        f64s(n)
    } else {
        f64s(chunk)
    }
}

/// Bytes of a dense P×P f64 matrix.
pub fn dense_fisher_bytes(p: usize) -> u64 {
    (p as u64).saturating_mul(p as u64).saturating_mul(8)
}

/// Σᵢ gᵢgᵢᵀ of N examples from P×len gradient blocks of consecutive ranges of `bs` examples
/// (`block(start, len)`), the lower triangle accumulated with faer's triangular matmul; refused
/// (with [`Error::MemoryBudget`]) when the P×P sum and two blocks exceed `memory_budget`.
/// Memory O(P² + bs·P).
pub(crate) fn dense_from_blocks(
    p: usize,
    n: usize,
    bs: usize,
    memory_budget: u64,
    block: impl Fn(usize, usize) -> Result<Mat<f64>>,
) -> Result<FisherDense> {
    use faer::linalg::matmul::triangular::{matmul as tri_matmul, BlockStructure};
    let bs = bs.max(1);
    let needed = dense_fisher_bytes(p) + (2 * bs.min(n.max(1)) * p * 8) as u64;
    if needed > memory_budget {
        return Err(Error::MemoryBudget {
            what: format!("the dense {p}×{p} empirical Fisher"),
            needed,
            budget: memory_budget,
            hint: "use the diagonal Fisher, raise the memory budget, or a matrix-free method for the full inverse".into(),
        });
    }
    let mut sum = Mat::<f64>::zeros(p, p);
    for start in (0..n).step_by(bs) {
        let len = bs.min(n - start);
        let g = block(start, len)?;
        tri_matmul(
            sum.as_mut(),
            BlockStructure::TriangularLower,
            faer::Accum::Add,
            g.as_ref(),
            BlockStructure::Rectangular,
            g.as_ref().transpose(),
            BlockStructure::Rectangular,
            1.0,
            faer::Par::rayon(0),
        );
    }
    FisherDense::from_lower_sum(sum, n)
}

/// Anything that can produce the empirical Fisher of a model over a dataset.
pub trait FisherSource: Sync {
    /// P.
    fn num_params(&self) -> usize;
    /// N.
    fn num_examples(&self) -> usize;
    /// Σᵢ gᵢ∘gᵢ and N.
    fn fisher_diag(&self) -> Result<FisherDiag>;
    /// Σᵢ gᵢgᵢᵀ and N, refusing (with [`Error::MemoryBudget`]) when it would need more than
    /// `memory_budget` bytes.
    fn fisher_dense(&self, memory_budget: u64) -> Result<FisherDense>;
    /// Σ_l(in + out) for a factored source (the cost of one Gram entry); P otherwise.
    fn gram_width(&self) -> usize {
        self.num_params()
    }
    /// Whether [`FisherSource::gradient_matrix`] can give an operator (the kernel and CG
    /// methods need one; a saved Fisher has none, so `auto` picks the dense method for it).
    fn has_gradient_operator(&self) -> bool {
        false
    }
    /// Bytes the gradient operator of [`FisherSource::gradient_matrix`] would hold.
    fn gradient_operator_bytes(&self, _memory_budget: u64) -> u64 {
        0
    }
    /// F·V with the MEAN Fisher F for a P×k block: Gᵀ(G V)/N through the gradient operator
    /// when the source has one (never forming F), otherwise through the dense Fisher.
    fn fisher_apply(&self, v: MatRef<'_, f64>, memory_budget: u64) -> Result<Mat<f64>> {
        let (p, n) = (self.num_params(), self.num_examples());
        if v.nrows() != p {
            return Err(Error::shape("V in F·V (P rows)", p, v.nrows()));
        }
        if n == 0 {
            return Ok(Mat::zeros(p, v.ncols()));
        }
        match self.gradient_matrix(memory_budget) {
            Ok(g) => {
                let mut out = g.jtu(g.jv(v)?.as_ref())?;
                out *= faer::Scale(1.0 / n as f64);
                Ok(out)
            }
            Err(Error::Unsupported(_)) => Ok(self.fisher_dense(memory_budget)?.mean() * v),
            Err(e) => Err(e),
        }
    }
    /// The per-example gradient matrix G as an operator (for the kernel and CG methods),
    /// within `memory_budget`. Sources that cannot provide one say so.
    fn gradient_matrix(
        &self,
        _memory_budget: u64,
    ) -> Result<std::sync::Arc<dyn GradientMatrix + '_>> {
        Err(Error::Unsupported(
            "this Fisher source has no per-example gradient operator; use the dense method".into(),
        ))
    }
    /// The K-FAC factors (for [`crate::SigmaStrategy::KfacEmpiricalFim`]); `None` when the
    /// source has none (a saved Fisher, the generic engine).
    fn kronecker_factors(&self) -> Option<Result<crate::engine::kfac::KfacFactors>> {
        None
    }
}

/// The diagonal of the empirical Fisher as Σᵢ gᵢ∘gᵢ over N examples.
#[derive(Debug, Clone, PartialEq)]
pub struct FisherDiag {
    sum_sq: Vec<f64>,
    n: usize,
}

impl FisherDiag {
    /// From the sums of squared gradients and N. Fails on a non-finite or negative sum.
    pub fn from_sums(sum_sq: Vec<f64>, n: usize) -> Result<Self> {
        check_finite("Fisher diagonal sums", &sum_sq)?;
        if let Some((i, v)) = sum_sq.iter().enumerate().find(|(_, v)| **v < 0.0) {
            return Err(Error::invalid(
                format!("Fisher diagonal sum entry {i}"),
                v,
                "must be >= 0",
            ));
        }
        Ok(Self { sum_sq, n })
    }
    /// The sums Σᵢ gᵢ².
    pub fn sums(&self) -> &[f64] {
        &self.sum_sq
    }
    /// N.
    pub fn num_examples(&self) -> usize {
        self.n
    }
    /// The MEAN diagonal Σᵢ gᵢ² / N (zeros when N = 0).
    pub fn mean(&self) -> Vec<f64> {
        let inv = if self.n == 0 {
            0.0
        } else {
            1.0 / self.n as f64
        };
        self.sum_sq.iter().map(|v| v * inv).collect()
    }
    /// Adds another partial result (for example another shard's) to this one.
    pub fn merge(&mut self, other: &FisherDiag) -> Result<()> {
        if other.sum_sq.len() != self.sum_sq.len() {
            return Err(Error::shape(
                "Fisher diagonal to merge",
                self.sum_sq.len(),
                other.sum_sq.len(),
            ));
        }
        for (a, b) in self.sum_sq.iter_mut().zip(&other.sum_sq) {
            *a += b;
        }
        self.n += other.n;
        Ok(())
    }
}

/// The dense empirical Fisher as Σᵢ gᵢgᵢᵀ (symmetric, both triangles filled) over N examples.
#[derive(Debug, Clone)]
pub struct FisherDense {
    sum: Mat<f64>,
    n: usize,
}

impl FisherDense {
    /// From a matrix whose LOWER triangle holds Σᵢ gᵢgᵢᵀ; the upper triangle is filled by symmetry.
    pub fn from_lower_sum(mut sum: Mat<f64>, n: usize) -> Result<Self> {
        let p = sum.nrows();
        if sum.ncols() != p {
            return Err(Error::shape(
                "dense Fisher sum",
                format!("{p}×{p}"),
                format!("{}×{}", p, sum.ncols()),
            ));
        }
        for j in 0..p {
            for i in j..p {
                let v = sum[(i, j)];
                if !v.is_finite() {
                    return Err(Error::NonFinite {
                        what: "dense Fisher sum".into(),
                        detail: format!("entry ({i}, {j}) is {v}"),
                    });
                }
                sum[(j, i)] = v;
            }
        }
        Ok(Self { sum, n })
    }
    /// The sum Σᵢ gᵢgᵢᵀ.
    pub fn sum(&self) -> MatRef<'_, f64> {
        self.sum.as_ref()
    }
    /// N.
    pub fn num_examples(&self) -> usize {
        self.n
    }
    /// The MEAN Fisher Σᵢ gᵢgᵢᵀ / N (zero when N = 0).
    pub fn mean(&self) -> Mat<f64> {
        let inv = if self.n == 0 {
            0.0
        } else {
            1.0 / self.n as f64
        };
        Mat::from_fn(self.sum.nrows(), self.sum.ncols(), |i, j| {
            self.sum[(i, j)] * inv
        })
    }
    /// The diagonal of the sum, as a [`FisherDiag`].
    pub fn diag(&self) -> FisherDiag {
        FisherDiag {
            sum_sq: (0..self.sum.nrows()).map(|i| self.sum[(i, i)]).collect(),
            n: self.n,
        }
    }
}
