use std::sync::{Arc, Mutex};

use faer::{Mat, MatRef};

use super::{check_block, finish, SigmaOp};
use crate::engine::gradients::GradientMatrix;
use crate::error::{Error, Result};

/// The preconditioner of [`CgInverseFisher`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgPreconditioner {
    /// None.
    Identity,
    /// Jacobi: diag(F + λI)⁻¹ from the Fisher diagonal (cheap: one pass over the factors).
    Jacobi,
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
    /// Default Jacobi.
    pub preconditioner: CgPreconditioner,
}

impl Default for CgOptions {
    fn default() -> Self {
        Self {
            tol: 1e-10,
            max_iter: 2000,
            accept_unconverged: false,
            preconditioner: CgPreconditioner::Jacobi,
        }
    }
}

/// How a CG solve went.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CgReport {
    /// Iterations (each applies F once to the block of columns not yet converged).
    pub iterations: usize,
    /// Final relative residual ‖(F+λI)xⱼ − qⱼ‖/‖qⱼ‖ of each right-hand side, recomputed from
    /// the solution.
    pub rel_residuals: Vec<f64>,
    /// Whether every residual is within the tolerance.
    pub converged: bool,
    /// The preconditioner used.
    pub preconditioner: String,
}

/// F + λI over a gradient operator: (Gᵀ(G V))/N + λV.
struct DampedFisherOp<'g, 'a> {
    g: &'g (dyn GradientMatrix + 'a),
    damping: f64,
}

impl DampedFisherOp<'_, '_> {
    fn apply(&self, rhs: MatRef<'_, f64>) -> Result<Mat<f64>> {
        let n = self.g.num_examples();
        let inv = if n == 0 { 0.0 } else { 1.0 / n as f64 };
        let mut out = if n == 0 {
            Mat::zeros(rhs.nrows(), rhs.ncols())
        } else {
            self.g.jtu(self.g.jv(rhs)?.as_ref())?
        };
        for j in 0..rhs.ncols() {
            for i in 0..rhs.nrows() {
                out[(i, j)] = out[(i, j)] * inv + self.damping * rhs[(i, j)];
            }
        }
        Ok(out)
    }
}

/// Σ = (F + λI)⁻¹ applied by preconditioned conjugate gradients, all right-hand sides at once,
/// over the implicit operator F·V = Gᵀ(GV)/N + λV. Holds the gradient operator and, for
/// Jacobi, the inverse damped Fisher diagonal (O(P)); a solve holds a handful of P×M blocks.
/// Never anything P×P or N×N.
///
/// The iteration is preconditioned CG with one operator application per iteration for the
/// block of still-active columns and scalar recurrences per column (a converged column is
/// frozen). faer 0.24.4's block CG was tried first: with a zero initial guess it leaves its
/// residual uninitialised, and its block recurrences diverged on nearly dependent right-hand
/// sides in our tests.
///
/// When a column's recursive residual reaches the tolerance its true residual is recomputed; if
/// rounding made the two drift apart (ill-conditioned F + λI), the column restarts from its
/// current solution with the true residual (residual replacement, at most 20 times).
///
/// Every solve is checked column by column: the residual is recomputed from the solution and
/// reported ([`CgInverseFisher::last_report`]); a column above the tolerance is an
/// [`Error::NotConverged`] unless `accept_unconverged` is set.
pub struct CgInverseFisher<'a> {
    g: Arc<dyn GradientMatrix + 'a>,
    jacobi: Option<Vec<f64>>,
    damping: f64,
    opts: CgOptions,
    last: Mutex<Option<CgReport>>,
}

impl<'a> CgInverseFisher<'a> {
    /// The CG Σ over `g` with damping λ > 0.
    pub fn new(g: Arc<dyn GradientMatrix + 'a>, damping: f64, opts: CgOptions) -> Result<Self> {
        if !(damping.is_finite() && damping > 0.0) {
            return Err(Error::invalid(
                "damping",
                damping,
                "the CG method needs a finite damping > 0",
            ));
        }
        if !(opts.tol.is_finite() && opts.tol > 0.0) {
            return Err(Error::invalid(
                "cg tolerance",
                opts.tol,
                "must be finite and > 0",
            ));
        }
        if opts.max_iter == 0 {
            return Err(Error::invalid("cg max_iter", 0, "must be at least 1"));
        }
        let jacobi = match opts.preconditioner {
            CgPreconditioner::Jacobi => {
                let n = g.num_examples().max(1) as f64;
                Some(
                    g.diag_sums()?
                        .iter()
                        .map(|s| 1.0 / (s / n + damping))
                        .collect(),
                )
            }
            CgPreconditioner::Identity => None,
        };
        Ok(Self {
            g,
            jacobi,
            damping,
            opts,
            last: Mutex::new(None),
        })
    }

    /// The report of the most recent solve.
    pub fn last_report(&self) -> Option<CgReport> {
        self.last.lock().ok().and_then(|r| r.clone())
    }

    fn precondition(&self, r: &Mat<f64>, cols: &[usize]) -> Mat<f64> {
        Mat::from_fn(r.nrows(), cols.len(), |i, c| {
            let v = r[(i, cols[c])];
            match &self.jacobi {
                Some(inv) => inv[i] * v,
                None => v,
            }
        })
    }

    /// Solves (F + λI) X = Q for a P×M block; returns X and the report.
    pub fn solve(&self, q: MatRef<'_, f64>) -> Result<(Mat<f64>, CgReport)> {
        check_block(self.dim(), q)?;
        let (p, k) = (q.nrows(), q.ncols());
        let op = DampedFisherOp {
            g: &*self.g,
            damping: self.damping,
        };
        let norms: Vec<f64> = (0..k)
            .map(|j| (0..p).map(|i| q[(i, j)] * q[(i, j)]).sum::<f64>().sqrt())
            .collect();
        let mut x = Mat::<f64>::zeros(p, k);
        let mut r = q.to_owned();
        let all: Vec<usize> = (0..k).collect();
        let mut pdir = self.precondition(&r, &all);
        let mut rz: Vec<f64> = (0..k)
            .map(|j| (0..p).map(|i| r[(i, j)] * pdir[(i, j)]).sum())
            .collect();
        let mut active: Vec<usize> = (0..k).filter(|&j| norms[j] > 0.0).collect();
        let mut iterations = 0usize;
        let mut restarts = vec![0usize; k];
        while !active.is_empty() && iterations < self.opts.max_iter {
            let pa = Mat::from_fn(p, active.len(), |i, c| pdir[(i, active[c])]);
            let ap = op.apply(pa.as_ref())?;
            iterations += 1;
            let mut still = Vec::with_capacity(active.len());
            for (c, &j) in active.iter().enumerate() {
                let pap: f64 = (0..p).map(|i| pa[(i, c)] * ap[(i, c)]).sum();
                if pap.is_nan() || pap <= 0.0 {
                    return Err(Error::NotPositiveDefinite {
                        what: "F + λI seen by CG (pᵀAp ≤ 0)".into(),
                        pivot: j,
                        dim: p,
                        damping: self.damping,
                        suggestion: self.damping * 100.0,
                    });
                }
                let alpha = rz[j] / pap;
                let mut rr = 0.0;
                for i in 0..p {
                    x[(i, j)] += alpha * pa[(i, c)];
                    r[(i, j)] -= alpha * ap[(i, c)];
                    rr += r[(i, j)] * r[(i, j)];
                }
                if rr.sqrt() > self.opts.tol * norms[j] {
                    still.push(j);
                }
            }
            // columns whose recursive residual says "converged": check the true residual and
            // restart those that drifted (residual replacement), up to a few times each
            let done: Vec<usize> = active
                .iter()
                .copied()
                .filter(|j| !still.contains(j))
                .collect();
            if !done.is_empty() && iterations < self.opts.max_iter {
                let xd = Mat::from_fn(p, done.len(), |i, c| x[(i, done[c])]);
                let axd = op.apply(xd.as_ref())?;
                for (c, &j) in done.iter().enumerate() {
                    let mut rr = 0.0;
                    for i in 0..p {
                        r[(i, j)] = q[(i, j)] - axd[(i, c)];
                        rr += r[(i, j)] * r[(i, j)];
                    }
                    if rr.sqrt() > self.opts.tol * norms[j] && restarts[j] < 20 {
                        restarts[j] += 1;
                        let z = self.precondition(&r, &[j]);
                        let mut rz_new = 0.0;
                        for i in 0..p {
                            pdir[(i, j)] = z[(i, 0)];
                            rz_new += r[(i, j)] * z[(i, 0)];
                        }
                        rz[j] = rz_new;
                        still.push(j);
                    }
                }
            }
            let updating: Vec<usize> = still
                .iter()
                .copied()
                .filter(|j| !done.contains(j))
                .collect();
            if !updating.is_empty() {
                let z = self.precondition(&r, &updating);
                for (c, &j) in updating.iter().enumerate() {
                    let rz_new: f64 = (0..p).map(|i| r[(i, j)] * z[(i, c)]).sum();
                    let beta = rz_new / rz[j];
                    rz[j] = rz_new;
                    for i in 0..p {
                        pdir[(i, j)] = z[(i, c)] + beta * pdir[(i, j)];
                    }
                }
            }
            still.sort_unstable();
            active = still;
        }
        // the true residual of every column, recomputed from the solution
        let ax = op.apply(x.as_ref())?;
        let rel_residuals: Vec<f64> = (0..k)
            .map(|j| {
                if norms[j] > 0.0 {
                    (0..p)
                        .map(|i| (ax[(i, j)] - q[(i, j)]).powi(2))
                        .sum::<f64>()
                        .sqrt()
                        / norms[j]
                } else {
                    0.0
                }
            })
            .collect();
        let converged = rel_residuals.iter().all(|r| *r <= self.opts.tol);
        let report = CgReport {
            iterations,
            rel_residuals,
            converged,
            preconditioner: format!("{:?}", self.opts.preconditioner),
        };
        if let Ok(mut l) = self.last.lock() {
            *l = Some(report.clone());
        }
        if !converged && !self.opts.accept_unconverged {
            return Err(Error::NotConverged {
                what: "CG on F + λI".into(),
                iterations,
                residual: report.rel_residuals.iter().cloned().fold(0.0, f64::max),
                tol: self.opts.tol,
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
    fn solver_report(&self) -> Option<CgReport> {
        self.last_report()
    }
    fn quad_forms(&self, q: MatRef<'_, f64>) -> Result<Vec<f64>> {
        let (x, _) = self.solve(q)?;
        let out = (0..q.ncols())
            .map(|j| (0..q.nrows()).map(|i| q[(i, j)] * x[(i, j)]).sum())
            .collect();
        finish("inverse_full_empirical_fim (cg)", out)
    }
}
