//! Σ = (U S Uᵀ + D + λI)⁻¹: the top-k eigenpairs (U, S) of the mean empirical Fisher F, a
//! diagonal D that restores F's diagonal (D = max(diag F − diag(U S Uᵀ), 0), or D = 0), and the
//! damping λ, inverted through Woodbury. Memory O(k·P) for the result; building it holds what
//! the chosen eigensolver needs ([`LowRankMethod`]).
//!
//! With W = U S^½ and A = D + λI (diagonal, positive):
//! Σ = A⁻¹ − A⁻¹ W (I + Wᵀ A⁻¹ W)⁻¹ Wᵀ A⁻¹, a k×k Cholesky. Without D the form is exact and
//! free of cancellation: gᵀΣg = ‖g − U Uᵀg‖²/λ + Σⱼ (uⱼᵀg)²/(sⱼ + λ).
//!
//! When k reaches the rank of F (rank F ≤ min(N, P)) and D = 0, Σ equals the exact
//! (F + λI)⁻¹.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use faer::dyn_stack::{MemBuffer, MemStack, StackReq};
use faer::linalg::triangular_solve::solve_lower_triangular_in_place;
use faer::matrix_free::eigen::{
    partial_self_adjoint_eigen, partial_self_adjoint_eigen_scratch, PartialEigenParams,
};
use faer::{Mat, MatMut, MatRef, Par, Side};

use super::solver::gaussian_matrix;
use super::{check_block, finish, SigmaOp};
use crate::engine::gradients::GradientMatrix;
use crate::error::{check_finite, Error, Result};
use crate::fisher::FisherSource;

/// How the top-k eigenpairs of F are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LowRankMethod {
    /// Dense when P ≤ 1024, Gram when N ≤ 1024 and the source has per-example gradients,
    /// Lanczos otherwise.
    Auto,
    /// Form the P×P Fisher and take its full eigendecomposition: O(P²) memory, O(P³) time.
    Dense,
    /// Eigendecompose the N×N Gram matrix K = G Gᵀ: F = GᵀG/N has eigenvalues λ(K)/N and
    /// eigenvectors Gᵀv/‖Gᵀv‖. Exact; O(N²) memory and the gradient operator.
    Gram,
    /// Thick-restart Lanczos (faer's Krylov–Schur `partial_self_adjoint_eigen`) over the
    /// implicit F·v, one column per product: O(P·max(4k, 128)) memory and the gradient
    /// operator; never anything P×P or N×N.
    Lanczos,
}

impl std::str::FromStr for LowRankMethod {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Self::Auto),
            "dense" => Ok(Self::Dense),
            "gram" => Ok(Self::Gram),
            "lanczos" => Ok(Self::Lanczos),
            _ => Err(Error::invalid(
                "low-rank eigensolver",
                s,
                "expected auto, dense, gram or lanczos",
            )),
        }
    }
}

/// Options of the low-rank Σ.
#[derive(Debug, Clone)]
pub struct LowRankOptions {
    /// k, the number of eigenpairs kept (capped at min(N, P), the rank bound of F).
    pub rank: usize,
    /// Add the diagonal correction D. Default true.
    pub diagonal: bool,
    /// The eigensolver. Default [`LowRankMethod::Auto`].
    pub method: LowRankMethod,
    /// Lanczos: an eigenpair is converged when its Ritz residual ‖F u − s u‖ is below
    /// `tol`·trace(F). Default 1e-10.
    pub tol: f64,
    /// Lanczos restarts before giving up. Default 1000.
    pub max_restarts: usize,
    /// Lanczos: keep the eigenpairs that converged (fewer than k) instead of an error.
    /// Default false.
    pub accept_unconverged: bool,
    /// Bytes the eigensolver may hold. Default [`crate::fisher::DEFAULT_MEMORY_BUDGET`].
    pub memory_budget: u64,
}

impl LowRankOptions {
    /// Rank k with every other option at its default.
    pub fn rank(rank: usize) -> Self {
        Self {
            rank,
            diagonal: true,
            method: LowRankMethod::Auto,
            tol: 1e-10,
            max_restarts: 1000,
            accept_unconverged: false,
            memory_budget: crate::fisher::DEFAULT_MEMORY_BUDGET,
        }
    }
}

/// The top eigenpairs of the mean Fisher F, largest first, with the residual of each.
#[derive(Debug, Clone)]
pub struct FisherEigenpairs {
    /// U: P × k, orthonormal columns.
    pub vectors: Mat<f64>,
    /// S: the k eigenvalues, descending, ≥ 0.
    pub values: Vec<f64>,
    /// ‖F uⱼ − sⱼ uⱼ‖₂ for each pair, recomputed from one F·U after the solve.
    pub residuals: Vec<f64>,
    /// The eigensolver that ran (never `Auto`).
    pub method: LowRankMethod,
    /// Products F·v the solver used (0 for the dense and Gram routes), not counting the
    /// residual check.
    pub matvecs: usize,
    /// trace(F), the scale the tolerances refer to.
    pub trace: f64,
}

impl FisherEigenpairs {
    /// The residuals relative to the largest eigenvalue: ‖F uⱼ − sⱼ uⱼ‖ / s₁.
    pub fn relative_residuals(&self) -> Vec<f64> {
        let s1 = self.values.first().copied().unwrap_or(0.0);
        self.residuals
            .iter()
            .map(|r| if s1 > 0.0 { r / s1 } else { *r })
            .collect()
    }
}

/// What a low-rank Σ reports: the eigenpairs' values and residuals (for JSON output).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LowRankReport {
    /// k, the eigenpairs kept.
    pub rank: usize,
    /// The eigensolver (`dense`, `gram`, `lanczos`).
    pub eigensolver: String,
    /// Whether the diagonal correction D is in use.
    pub diagonal: bool,
    /// The eigenvalues of F kept, descending.
    pub eigenvalues: Vec<f64>,
    /// ‖F uⱼ − sⱼ uⱼ‖ / s₁ for each pair.
    pub relative_residuals: Vec<f64>,
    /// Products F·v the eigensolver used.
    pub matvecs: usize,
}

impl LowRankMethod {
    /// The name in reports.
    pub fn name(&self) -> &'static str {
        match self {
            LowRankMethod::Auto => "auto",
            LowRankMethod::Dense => "dense",
            LowRankMethod::Gram => "gram",
            LowRankMethod::Lanczos => "lanczos",
        }
    }
}

/// F·V through a gradient operator (Gᵀ(GV)/N) or a dense mean Fisher.
enum FisherOperator<'a> {
    Gradients(Arc<dyn GradientMatrix + 'a>),
    Dense(Mat<f64>),
}

impl FisherOperator<'_> {
    fn apply(&self, v: MatRef<'_, f64>) -> Result<Mat<f64>> {
        match self {
            FisherOperator::Gradients(g) => {
                let n = g.num_examples();
                if n == 0 {
                    return Ok(Mat::zeros(v.nrows(), v.ncols()));
                }
                let mut out = g.jtu(g.jv(v)?.as_ref())?;
                out *= faer::Scale(1.0 / n as f64);
                Ok(out)
            }
            FisherOperator::Dense(f) => Ok(f * v),
        }
    }
}

/// faer's operator view of F: errors of a product are kept and reported after the solve
/// (faer's `LinOp::apply` cannot fail), and products are counted.
struct KrylovOp<'o, 'a> {
    f: &'o FisherOperator<'a>,
    p: usize,
    error: Mutex<Option<Error>>,
    count: AtomicUsize,
}

impl std::fmt::Debug for KrylovOp<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fisher operator ({} parameters)", self.p)
    }
}

impl faer::matrix_free::LinOp<f64> for KrylovOp<'_, '_> {
    fn apply_scratch(&self, _rhs_ncols: usize, _par: Par) -> StackReq {
        StackReq::EMPTY
    }
    fn nrows(&self) -> usize {
        self.p
    }
    fn ncols(&self) -> usize {
        self.p
    }
    fn apply(&self, mut out: MatMut<'_, f64>, rhs: MatRef<'_, f64>, _: Par, _: &mut MemStack) {
        self.count.fetch_add(rhs.ncols(), Ordering::Relaxed);
        let mut err = self.error.lock().unwrap_or_else(|e| e.into_inner());
        if err.is_some() {
            out.fill(0.0);
            return;
        }
        match self.f.apply(rhs) {
            Ok(m) => out.copy_from(&m),
            Err(e) => {
                *err = Some(e);
                out.fill(0.0);
            }
        }
    }
    fn conj_apply(&self, out: MatMut<'_, f64>, rhs: MatRef<'_, f64>, par: Par, s: &mut MemStack) {
        self.apply(out, rhs, par, s)
    }
}

const SMALL: usize = 1024;

/// Eigenpairs (descending) of a symmetric matrix.
fn sym_eigen(m: MatRef<'_, f64>, what: &str) -> Result<(Mat<f64>, Vec<f64>)> {
    let e = m.self_adjoint_eigen(Side::Lower).map_err(|e| {
        Error::Unsupported(format!("the eigendecomposition of {what} failed: {e:?}"))
    })?;
    let n = m.nrows();
    // faer returns ascending eigenvalues
    let s = e.S().column_vector();
    let u = e.U();
    let vals: Vec<f64> = (0..n).rev().map(|i| s[i]).collect();
    let vecs = Mat::from_fn(n, n, |i, j| u[(i, n - 1 - j)]);
    Ok((vecs, vals))
}

/// The top-k eigenpairs of the mean empirical Fisher of `src` (see [`LowRankMethod`] for the
/// routes and what each holds). Eigenvalues at or below P·ε·s₁ (numerically zero) are
/// dropped, so fewer than k pairs come back when F's rank is lower.
pub fn fisher_top_eigenpairs(
    src: &dyn FisherSource,
    opts: &LowRankOptions,
) -> Result<FisherEigenpairs> {
    let (p, n) = (src.num_params(), src.num_examples());
    if opts.rank == 0 {
        return Err(Error::invalid(
            "low-rank Sigma rank k",
            0,
            "must be ≥ 1 (use diag-fim for a diagonal Σ)",
        ));
    }
    if !(opts.tol.is_finite() && opts.tol > 0.0) {
        return Err(Error::invalid(
            "low-rank tolerance",
            opts.tol,
            "must be finite and > 0",
        ));
    }
    let k = opts.rank.min(p).min(n);
    if k == 0 {
        return Ok(FisherEigenpairs {
            vectors: Mat::zeros(p, 0),
            values: vec![],
            residuals: vec![],
            method: LowRankMethod::Dense,
            matvecs: 0,
            trace: 0.0,
        });
    }
    let has_g = src.has_gradient_operator();
    let method = match opts.method {
        LowRankMethod::Auto if p <= SMALL || !has_g => LowRankMethod::Dense,
        LowRankMethod::Auto if n <= SMALL => LowRankMethod::Gram,
        LowRankMethod::Auto => LowRankMethod::Lanczos,
        m => m,
    };
    let (op, vectors, values, matvecs, trace) = match method {
        LowRankMethod::Dense => {
            let f = src.fisher_dense(opts.memory_budget)?.mean();
            let trace: f64 = (0..p).map(|i| f[(i, i)]).sum();
            let (u, s) = sym_eigen(f.as_ref(), "the dense Fisher")?;
            let u = u.subcols(0, k).to_owned();
            (FisherOperator::Dense(f), u, s[..k].to_vec(), 0, trace)
        }
        LowRankMethod::Gram => {
            let g = src.gradient_matrix(opts.memory_budget)?;
            let gram_bytes = (n as u64).pow(2) * 8 * 3;
            if gram_bytes > opts.memory_budget {
                return Err(Error::MemoryBudget {
                    what: format!("the {n}×{n} Gram matrix and its eigendecomposition"),
                    needed: gram_bytes,
                    budget: opts.memory_budget,
                    hint: "use the Lanczos eigensolver".into(),
                });
            }
            let kmat = g.gram()?;
            let trace: f64 = (0..n).map(|i| kmat[(i, i)]).sum::<f64>() / n as f64;
            let (v, lam) = sym_eigen(kmat.as_ref(), "the Gram matrix G Gᵀ")?;
            let mut u = g.jtu(v.subcols(0, k))?;
            let mut values = Vec::with_capacity(k);
            for (j, &l) in lam.iter().take(k).enumerate() {
                let l = l.max(0.0);
                // ‖Gᵀv‖² = vᵀKv = λ(K)
                let inv = if l > 0.0 { 1.0 / l.sqrt() } else { 0.0 };
                u.col_mut(j).iter_mut().for_each(|x| *x *= inv);
                values.push(l / n as f64);
            }
            (FisherOperator::Gradients(g), u, values, 0, trace)
        }
        _ => {
            let g = src.gradient_matrix(opts.memory_budget)?;
            let trace = src.fisher_diag()?.mean().iter().sum::<f64>();
            let op = FisherOperator::Gradients(g);
            let (u, s, count) = lanczos(&op, p, k, trace, opts)?;
            (op, u, s, count, trace)
        }
    };
    check_finite("Fisher eigenvalues", &values)?;
    // drop the numerically zero eigenvalues (F's rank can be below k)
    let s1 = values.first().copied().unwrap_or(0.0).max(0.0);
    let keep = values
        .iter()
        .take_while(|&&s| s > (p.max(n) as f64) * f64::EPSILON * s1 && s1 > 0.0)
        .count();
    let vectors = vectors.subcols(0, keep).to_owned();
    let values: Vec<f64> = values[..keep].to_vec();
    let fu = op.apply(vectors.as_ref())?;
    let residuals: Vec<f64> = (0..keep)
        .map(|j| {
            (0..p)
                .map(|i| {
                    let r = fu[(i, j)] - values[j] * vectors[(i, j)];
                    r * r
                })
                .sum::<f64>()
                .sqrt()
        })
        .collect();
    check_finite("Fisher eigenpair residuals", &residuals)?;
    Ok(FisherEigenpairs {
        vectors,
        values,
        residuals,
        method,
        matvecs,
        trace,
    })
}

/// faer's Krylov–Schur over F·v: (U, S, products used).
fn lanczos(
    op: &FisherOperator<'_>,
    p: usize,
    k: usize,
    trace: f64,
    opts: &LowRankOptions,
) -> Result<(Mat<f64>, Vec<f64>, usize)> {
    // faer's subspace: between max(32, k) and max(64, 2k) vectors; it needs fewer than P
    let max_dim = (2 * k).max(64);
    if max_dim >= p {
        return Err(Error::invalid(
            "low-rank Sigma rank k with the Lanczos eigensolver",
            k,
            format!(
                "Lanczos needs a Krylov space of max(64, 2k) = {max_dim} vectors, below P = {p}; \
                 use the dense eigensolver for this small model"
            ),
        ));
    }
    let needed = (p as u64) * (2 * max_dim as u64 + 2 + k as u64) * 8;
    if needed > opts.memory_budget {
        return Err(Error::MemoryBudget {
            what: format!(
                "the Lanczos basis ({max_dim} + 1 vectors of length {p}) and its workspace"
            ),
            needed,
            budget: opts.memory_budget,
            hint: "lower the rank k or raise the memory budget".into(),
        });
    }
    let kop = KrylovOp {
        f: op,
        p,
        error: Mutex::new(None),
        count: AtomicUsize::new(0),
    };
    let params = PartialEigenParams {
        max_restarts: opts.max_restarts,
        ..Default::default()
    };
    let par = Par::rayon(0);
    let mut buf = MemBuffer::new(partial_self_adjoint_eigen_scratch(&kop, k, par, params));
    let v0 = gaussian_matrix(p, 1, 0x2545_f491_4f6c_dd1d);
    let mut u = Mat::<f64>::zeros(p, k);
    let mut s = vec![0.0f64; k];
    let info = partial_self_adjoint_eigen(
        u.as_mut(),
        &mut s,
        &kop,
        v0.col(0),
        opts.tol * trace.max(f64::MIN_POSITIVE),
        par,
        MemStack::new(&mut buf),
        params,
    );
    if let Some(e) = kop.error.lock().unwrap_or_else(|e| e.into_inner()).take() {
        return Err(e);
    }
    let count = kop.count.load(Ordering::Relaxed);
    let c = info.n_converged_eigen.min(k);
    if c < k && !opts.accept_unconverged {
        return Err(Error::NotConverged {
            what: format!("Lanczos (faer Krylov–Schur) for the top {k} Fisher eigenpairs"),
            iterations: count,
            residual: f64::INFINITY,
            tol: opts.tol,
            hint: format!(
                "only {c} of {k} eigenpairs reached the tolerance (relative to trace F); lower the rank, raise max_restarts"
            ),
        });
    }
    // descending (faer sorts by magnitude; F is PSD, clamp rounding below zero)
    let s: Vec<f64> = s[..c].iter().map(|v| v.max(0.0)).collect();
    Ok((u.subcols(0, c).to_owned(), s, count))
}

/// Σ = (U S Uᵀ + D + λI)⁻¹ (see the module docs).
///
/// ```
/// use deltavar::sigma::{FisherEigenpairs, LowRankInverseFisher, LowRankMethod, SigmaOp};
/// // F = 4·e₁e₁ᵀ in 2-D, rank one: with k = 1 and no diagonal Σ = (F + λI)⁻¹ exactly
/// let eig = FisherEigenpairs {
///     vectors: faer::mat![[1.0], [0.0]], values: vec![4.0], residuals: vec![0.0],
///     method: LowRankMethod::Dense, matvecs: 0, trace: 4.0 };
/// let s = LowRankInverseFisher::new(eig, None, 0.5).unwrap();
/// assert!((s.quad_form(&[1.0, 1.0]).unwrap() - (1.0 / 4.5 + 1.0 / 0.5)).abs() < 1e-12);
/// ```
pub struct LowRankInverseFisher {
    eig: FisherEigenpairs,
    /// W = U S^½.
    w: Mat<f64>,
    /// 1/(D + λ) when D is used.
    a_inv: Option<Vec<f64>>,
    /// Cholesky factor of I + Wᵀ A⁻¹ W when D is used.
    l: Option<Mat<f64>>,
    damping: f64,
}

impl LowRankInverseFisher {
    /// Builds the eigenpairs of `src`'s Fisher ([`fisher_top_eigenpairs`]) and, with
    /// `opts.diagonal`, the diagonal correction from its Fisher diagonal.
    pub fn from_fisher(
        src: &dyn FisherSource,
        damping: f64,
        opts: &LowRankOptions,
    ) -> Result<Self> {
        check_damping(damping)?;
        let eig = fisher_top_eigenpairs(src, opts)?;
        let diag = if opts.diagonal {
            Some(src.fisher_diag()?.mean())
        } else {
            None
        };
        Self::new(eig, diag.as_deref(), damping)
    }

    /// From eigenpairs of F, optionally F's diagonal (then D = max(diag F − diag(U S Uᵀ), 0)),
    /// and λ > 0.
    pub fn new(eig: FisherEigenpairs, fisher_diag: Option<&[f64]>, damping: f64) -> Result<Self> {
        check_damping(damping)?;
        let (p, k) = (eig.vectors.nrows(), eig.vectors.ncols());
        if eig.values.len() != k || eig.residuals.len() != k {
            return Err(Error::shape(
                "low-rank eigenpairs (one value and one residual per vector)",
                k,
                eig.values.len(),
            ));
        }
        check_finite("low-rank eigenvalues", &eig.values)?;
        if let Some((j, v)) = eig.values.iter().enumerate().find(|(_, v)| **v < 0.0) {
            return Err(Error::invalid(
                format!("low-rank eigenvalue {j}"),
                v,
                "must be ≥ 0 (F is positive semi-definite)",
            ));
        }
        for j in 0..k {
            for i in 0..p {
                if !eig.vectors[(i, j)].is_finite() {
                    return Err(Error::NonFinite {
                        what: "low-rank eigenvectors".into(),
                        detail: format!("entry {i} of vector {j}"),
                    });
                }
            }
        }
        let w = Mat::from_fn(p, k, |i, j| eig.vectors[(i, j)] * eig.values[j].sqrt());
        let (a_inv, l) = match fisher_diag {
            None => (None, None),
            Some(d) => {
                if d.len() != p {
                    return Err(Error::shape(
                        "Fisher diagonal for the low-rank Σ",
                        p,
                        d.len(),
                    ));
                }
                check_finite("Fisher diagonal for the low-rank Σ", d)?;
                let a_inv: Vec<f64> = (0..p)
                    .map(|i| {
                        let low: f64 = (0..k).map(|j| w[(i, j)] * w[(i, j)]).sum();
                        1.0 / ((d[i] - low).max(0.0) + damping)
                    })
                    .collect();
                let aw = Mat::from_fn(p, k, |i, j| a_inv[i] * w[(i, j)]);
                let mut c = w.transpose() * &aw;
                for j in 0..k {
                    c[(j, j)] += 1.0;
                }
                let l = super::cholesky_lower(
                    c.as_ref(),
                    "the low-rank core I + Wᵀ(D+λI)⁻¹W",
                    damping,
                )?;
                (Some(a_inv), Some(l))
            }
        };
        Ok(Self {
            eig,
            w,
            a_inv,
            l,
            damping,
        })
    }

    /// The eigenpairs behind Σ, with their residuals.
    pub fn eigenpairs(&self) -> &FisherEigenpairs {
        &self.eig
    }

    /// λ.
    pub fn damping(&self) -> f64 {
        self.damping
    }

    /// Whether the diagonal correction D is in use.
    pub fn has_diagonal(&self) -> bool {
        self.a_inv.is_some()
    }
}

fn check_damping(damping: f64) -> Result<()> {
    if !(damping.is_finite() && damping > 0.0) {
        return Err(Error::invalid(
            "damping",
            damping,
            "the low-rank Σ needs a finite damping > 0 (F's low-rank part is singular)",
        ));
    }
    Ok(())
}

impl SigmaOp for LowRankInverseFisher {
    fn dim(&self) -> usize {
        self.w.nrows()
    }
    fn lowrank_report(&self) -> Option<LowRankReport> {
        Some(LowRankReport {
            rank: self.eig.values.len(),
            eigensolver: self.eig.method.name().into(),
            diagonal: self.has_diagonal(),
            eigenvalues: self.eig.values.clone(),
            relative_residuals: self.eig.relative_residuals(),
            matvecs: self.eig.matvecs,
        })
    }
    fn name(&self) -> String {
        "lowrank_empirical_fim".into()
    }
    fn apply(&self, g: MatRef<'_, f64>) -> Result<Mat<f64>> {
        check_block(self.dim(), g)?;
        let (p, m) = (g.nrows(), g.ncols());
        let lam = self.damping;
        match (&self.a_inv, &self.l) {
            (Some(a), Some(l)) => {
                // A⁻¹g − A⁻¹W C⁻¹ WᵀA⁻¹g
                let t = Mat::from_fn(p, m, |i, j| a[i] * g[(i, j)]);
                let mut z = self.w.transpose() * &t;
                let lr = l.as_ref();
                solve_lower_triangular_in_place(lr, z.as_mut(), Par::Seq);
                faer::linalg::triangular_solve::solve_upper_triangular_in_place(
                    lr.transpose(),
                    z.as_mut(),
                    Par::Seq,
                );
                let wz = &self.w * &z;
                Ok(Mat::from_fn(p, m, |i, j| t[(i, j)] - a[i] * wz[(i, j)]))
            }
            _ => {
                // g/λ + U (diag(1/(s+λ)) − 1/λ) Uᵀg
                let u = &self.eig.vectors;
                let mut c = u.transpose() * g;
                for (j, s) in self.eig.values.iter().enumerate() {
                    let f = 1.0 / (s + lam) - 1.0 / lam;
                    c.row_mut(j).iter_mut().for_each(|x| *x *= f);
                }
                let uc = u * &c;
                Ok(Mat::from_fn(p, m, |i, j| g[(i, j)] / lam + uc[(i, j)]))
            }
        }
    }
    fn quad_forms(&self, g: MatRef<'_, f64>) -> Result<Vec<f64>> {
        check_block(self.dim(), g)?;
        let (p, m) = (g.nrows(), g.ncols());
        let lam = self.damping;
        let out: Vec<f64> = match (&self.a_inv, &self.l) {
            (Some(a), Some(l)) => {
                let t = Mat::from_fn(p, m, |i, j| a[i] * g[(i, j)]);
                let mut z = self.w.transpose() * &t;
                solve_lower_triangular_in_place(l.as_ref(), z.as_mut(), Par::Seq);
                (0..m)
                    .map(|j| {
                        let base: f64 = (0..p).map(|i| g[(i, j)] * t[(i, j)]).sum();
                        let corr: f64 = z.col(j).iter().map(|v| v * v).sum();
                        (base - corr).max(0.0)
                    })
                    .collect()
            }
            _ => {
                let u = &self.eig.vectors;
                let c = u.transpose() * g;
                let r = g - u * &c;
                (0..m)
                    .map(|j| {
                        let perp: f64 = r.col(j).iter().map(|v| v * v).sum();
                        let low: f64 = self
                            .eig
                            .values
                            .iter()
                            .enumerate()
                            .map(|(q, s)| c[(q, j)] * c[(q, j)] / (s + lam))
                            .sum();
                        perp / lam + low
                    })
                    .collect()
            }
        };
        finish("lowrank_empirical_fim", out)
    }
}
