use std::sync::Arc;

use faer::{Mat, MatRef};

use super::solver::{
    conjugate_gradient, CgReport, CgSettings, IdentityPreconditioner, JacobiPreconditioner, LinOp,
    NystromPreconditioner, Preconditioner,
};
use super::{check_block, finish, QuadForms, SigmaOp};
use crate::engine::gradients::GradientMatrix;
use crate::error::{Error, Result};

/// The preconditioner of [`CgInverseFisher`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgPreconditioner {
    /// None.
    Identity,
    /// Jacobi: diag(F + λI)⁻¹ from the Fisher diagonal (cheap: one pass over the factors).
    Jacobi,
    /// Randomized Nyström ([`NystromPreconditioner`]) of rank `rank` (0: min(N, P, 256, what
    /// fits a quarter of the memory budget), see [`default_nystrom_rank`]). Building it costs one F·V with `rank` columns and
    /// holds a P × rank block.
    Nystrom {
        /// The sketch's rank; 0 chooses automatically.
        rank: usize,
    },
}

impl CgOptions {
    /// Refuses a tolerance that is not finite and > 0, and an iteration cap of 0.
    pub(crate) fn check(&self) -> Result<()> {
        if !(self.tol.is_finite() && self.tol > 0.0) {
            return Err(Error::invalid(
                "cg tolerance",
                self.tol,
                "must be finite and > 0",
            ));
        }
        if self.max_iter == 0 {
            return Err(Error::invalid("cg max_iter", 0, "must be at least 1"));
        }
        Ok(())
    }
}

impl std::str::FromStr for CgPreconditioner {
    type Err = Error;
    /// `none`, `jacobi`, `nystrom` (automatic rank) or `nystrom:RANK` (the CLI's
    /// `--cg-preconditioner`; for the kernel-cg method the rank is its pivoted Cholesky's).
    fn from_str(s: &str) -> Result<Self> {
        let bad = || {
            Error::invalid(
                "cg preconditioner",
                s,
                "expected none, jacobi, nystrom or nystrom:RANK",
            )
        };
        match s.trim() {
            "none" => Ok(CgPreconditioner::Identity),
            "jacobi" => Ok(CgPreconditioner::Jacobi),
            "nystrom" => Ok(CgPreconditioner::Nystrom { rank: 0 }),
            t => match t.strip_prefix("nystrom:") {
                Some(r) => Ok(CgPreconditioner::Nystrom {
                    rank: r.trim().parse().map_err(|_| bad())?,
                }),
                None => Err(bad()),
            },
        }
    }
}

/// Options of the CG method.
#[derive(Debug, Clone)]
pub struct CgOptions {
    /// Stop when every column's relative residual ‖(F+λI)xⱼ − qⱼ‖/‖qⱼ‖ is below this. Default 1e-10.
    pub tol: f64,
    /// Iteration cap. Default 2000.
    pub max_iter: usize,
    /// Return the unconverged approximation (with its report) instead of an error. Default false.
    pub accept_unconverged: bool,
    /// Default Nyström with an automatic rank.
    pub preconditioner: CgPreconditioner,
    /// Bytes the preconditioner may hold (the Nyström sketch takes at most a quarter of it).
    /// Default [`crate::fisher::DEFAULT_MEMORY_BUDGET`].
    pub memory_budget: u64,
    /// A line per iteration (and per stage of the kernel CG's set-up). Default none.
    pub progress: crate::progress::Progress,
}

impl Default for CgOptions {
    fn default() -> Self {
        Self {
            tol: 1e-10,
            max_iter: 2000,
            accept_unconverged: false,
            preconditioner: CgPreconditioner::Nystrom { rank: 0 },
            memory_budget: crate::fisher::DEFAULT_MEMORY_BUDGET,
            progress: crate::progress::Progress::none(),
        }
    }
}

/// The Nyström rank used by default: min(N, P, 256), capped so that the sketch (about four
/// P × rank f64 blocks while building) fits a quarter of the budget.
///
/// Measured on the 4-16-16-3 parity fixture (P = 403, N = 200, 8 right-hand sides, tolerance
/// 1e-10), iterations at λ = 1e-5 / 1e-3 / 1e-2: Jacobi > 5000 / 825 / 329, none 2488 / 353 /
/// 132, Nyström rank 16: 1209 / 177 / 66, rank 64: 400 / 57 / 23, rank 128: 100 / 17 / 9,
/// rank 200 (= N): 3 / 2 / 2. Building costs one F·V with `rank` columns, about rank / M CG
/// iterations' worth.
pub fn default_nystrom_rank(p: usize, n: usize, memory_budget: u64) -> usize {
    let fit = (memory_budget / 4) / (4 * 8 * p.max(1) as u64);
    n.min(p).min(256).min(fit as usize)
}

/// F over a gradient operator: Gᵀ(G V)/N.
struct FisherOp<'g, 'a> {
    g: &'g (dyn GradientMatrix + 'a),
}

impl LinOp for FisherOp<'_, '_> {
    fn dim(&self) -> usize {
        self.g.num_params()
    }
    fn apply(&self, v: MatRef<'_, f64>) -> Result<Mat<f64>> {
        let n = self.g.num_examples();
        if n == 0 {
            return Ok(Mat::zeros(v.nrows(), v.ncols()));
        }
        let mut out = self.g.jtjv(v)?;
        out *= faer::Scale(1.0 / n as f64);
        Ok(out)
    }
}

/// F + λI.
struct DampedOp<'g, 'a> {
    f: FisherOp<'g, 'a>,
    damping: f64,
}

impl LinOp for DampedOp<'_, '_> {
    fn dim(&self) -> usize {
        self.f.dim()
    }
    fn apply(&self, v: MatRef<'_, f64>) -> Result<Mat<f64>> {
        let mut out = self.f.apply(v)?;
        for j in 0..v.ncols() {
            for i in 0..v.nrows() {
                out[(i, j)] += self.damping * v[(i, j)];
            }
        }
        Ok(out)
    }
}

/// Σ = (F + λI)⁻¹ applied by preconditioned conjugate gradients ([`super::solver`]), all
/// right-hand sides at once, over the implicit operator F·V = Gᵀ(GV)/N + λV. Holds the gradient
/// operator and the preconditioner (Jacobi: O(P); Nyström: O(P·rank)); a solve holds a handful
/// of P×M blocks. Never anything P×P or N×N.
///
/// Every solve is checked column by column: the residual is recomputed from the solution and
/// returned with it ([`CgInverseFisher::solve`], [`SigmaOp::quad_forms_reported`]); a column
/// above the tolerance is an [`Error::NotConverged`] unless `accept_unconverged` is set.
pub struct CgInverseFisher<'a> {
    g: Arc<dyn GradientMatrix + 'a>,
    pre: Box<dyn Preconditioner>,
    damping: f64,
    opts: CgOptions,
}

impl<'a> CgInverseFisher<'a> {
    /// The CG Σ of a Fisher source, over its per-example gradient operator (within
    /// `opts.memory_budget`).
    pub fn from_fisher(
        fisher: &'a dyn crate::fisher::FisherSource,
        damping: f64,
        opts: CgOptions,
    ) -> Result<Self> {
        Self::new(fisher.gradient_matrix(opts.memory_budget)?, damping, opts)
    }

    /// The CG Σ over `g` with damping λ > 0 (builds the preconditioner).
    pub fn new(g: Arc<dyn GradientMatrix + 'a>, damping: f64, opts: CgOptions) -> Result<Self> {
        super::check_damping(damping, "the CG method")?;
        opts.check()?;
        let (p, n) = (g.num_params(), g.num_examples());
        let pre: Box<dyn Preconditioner> = match opts.preconditioner {
            CgPreconditioner::Identity => Box::new(IdentityPreconditioner),
            CgPreconditioner::Jacobi => {
                let nf = n.max(1) as f64;
                let d: Vec<f64> = g.diag_sums()?.iter().map(|s| s / nf + damping).collect();
                Box::new(JacobiPreconditioner::new(&d)?)
            }
            CgPreconditioner::Nystrom { rank } => {
                let rank = if rank == 0 {
                    default_nystrom_rank(p, n, opts.memory_budget)
                } else {
                    rank
                };
                Box::new(NystromPreconditioner::new(
                    &FisherOp { g: &*g },
                    rank,
                    damping,
                )?)
            }
        };
        Ok(Self {
            g,
            pre,
            damping,
            opts,
        })
    }

    /// The preconditioner's name (for example `nystrom(rank 64)`).
    pub fn preconditioner(&self) -> String {
        self.pre.name()
    }

    /// Solves (F + λI) X = Q for a P×M block; returns X and the report.
    pub fn solve(&self, q: MatRef<'_, f64>) -> Result<(Mat<f64>, CgReport)> {
        check_block(&self.name(), self.dim(), q)?;
        let op = DampedOp {
            f: FisherOp { g: &*self.g },
            damping: self.damping,
        };
        let settings = CgSettings {
            tol: self.opts.tol,
            max_iter: self.opts.max_iter,
            progress: self.opts.progress.clone(),
        };
        let (x, report) = conjugate_gradient(&op, &*self.pre, q, &settings).map_err(|e| {
            super::solver::name_indefinite(e, "F + λI seen by CG (pᵀAp ≤ 0)", self.damping)
        })?;
        if !report.converged && !self.opts.accept_unconverged {
            let (p, n) = (self.g.num_params(), self.g.num_examples());
            return Err(Error::NotConverged {
                what: format!(
                    "CG on F + λI (P = {p}, N = {n}, λ = {:e}, preconditioner {})",
                    self.damping, report.preconditioner
                ),
                iterations: report.iterations,
                residual: report.worst_residual(),
                tol: self.opts.tol,
                hint: format!(
                    "the kernel method solves this exactly through the {n}×{n} system \
                     (method kernel: a Cholesky; kernel-cg: CG on the stored system, \
                     for large N; or auto){}",
                    if p <= 4096 {
                        format!(", and so does the dense method ({p}×{p})")
                    } else {
                        String::new()
                    }
                ),
            });
        }
        Ok((x, report))
    }
}

impl SigmaOp for CgInverseFisher<'_> {
    fn dim(&self) -> usize {
        self.g.num_params()
    }
    fn name(&self) -> String {
        "inverse_full_empirical_fim".into()
    }
    fn apply(&self, q: MatRef<'_, f64>) -> Result<Mat<f64>> {
        Ok(self.solve(q)?.0)
    }
    fn quad_forms(&self, q: MatRef<'_, f64>) -> Result<Vec<f64>> {
        Ok(self.quad_forms_reported(q)?.values)
    }
    fn quad_forms_reported(&self, q: MatRef<'_, f64>) -> Result<QuadForms> {
        let (x, report) = self.solve(q)?;
        let out = (0..q.ncols())
            .map(|j| (0..q.nrows()).map(|i| q[(i, j)] * x[(i, j)]).sum())
            .collect();
        Ok(QuadForms {
            values: finish("inverse_full_empirical_fim (cg)", out)?,
            cg: Some(report),
        })
    }
}
