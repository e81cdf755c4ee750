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

use std::sync::Arc;

use faer::linalg::triangular_solve::solve_lower_triangular_in_place;
use faer::{Mat, MatRef, Par, Side};

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
    /// Block Lanczos: a block Krylov space (blocks of k + 8 columns, full reorthogonalisation)
    /// with Rayleigh–Ritz over the implicit F·V, grown until the top-k residuals meet the
    /// tolerance: O(P·products) memory (the basis and its products) and the gradient operator;
    /// never anything P×P or N×N. (faer 0.24's Krylov–Schur `partial_self_adjoint_eigen`,
    /// tried first, reorthogonalises one vector at a time in a loop: at P = 269k and k = 128 it
    /// ran for over 20 minutes in that loop, measured here.)
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
    /// Lanczos: converged when every Ritz residual ‖F u − θ u‖ is below `tol`·θ₁.
    /// Default 1e-6 (the error of ΔVar from a finite k is far larger; see benches/README.md).
    pub tol: f64,
    /// Lanczos: columns per block (0: k/4 clamped to 8..32). Smaller blocks need fewer
    /// products (a higher polynomial degree per product: k = 32 at P = 269k took 304 products
    /// with blocks of 8 and 680 with blocks of 40, measured); larger ones fewer, bigger steps.
    pub block: usize,
    /// Lanczos: products F·v allowed (the basis holds as many vectors). Default 20·k + 256.
    pub max_products: usize,
    /// Lanczos: take the Ritz pairs reached within `max_products` instead of an error.
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
            tol: 1e-6,
            block: 0,
            max_products: 20 * rank + 256,
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
    /// ‖F uⱼ − sⱼ uⱼ‖₂ for each pair: from one F·U after the dense and Gram solves, from the
    /// products the Lanczos solve stored (no extra product).
    pub residuals: Vec<f64>,
    /// The eigensolver that ran (never `Auto`).
    pub method: LowRankMethod,
    /// Products F·v the solver used (0 for the dense and Gram routes), not counting the
    /// residual check.
    pub matvecs: usize,
    /// trace(F).
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
                let mut out = g.jtjv(v)?;
                out *= faer::Scale(1.0 / n as f64);
                Ok(out)
            }
            FisherOperator::Dense(f) => Ok(f * v),
        }
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
    top_eigenpairs(src, opts, None)
}

/// [`fisher_top_eigenpairs`], reusing the mean Fisher diagonal when the caller has it (the
/// Lanczos route needs only its sum, the trace).
fn top_eigenpairs(
    src: &dyn FisherSource,
    opts: &LowRankOptions,
    mean_diag: Option<&[f64]>,
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
    // the Lanczos route brings its residuals (from the products it stored); the others get
    // them from one F·U below
    let (op, vectors, values, residuals, matvecs, trace) = match method {
        LowRankMethod::Dense => {
            let f = src.fisher_dense(opts.memory_budget)?.mean();
            let trace: f64 = (0..p).map(|i| f[(i, i)]).sum();
            let (u, s) = sym_eigen(f.as_ref(), "the dense Fisher")?;
            let u = u.subcols(0, k).to_owned();
            (FisherOperator::Dense(f), u, s[..k].to_vec(), None, 0, trace)
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
            (FisherOperator::Gradients(g), u, values, None, 0, trace)
        }
        _ => {
            let g = src.gradient_matrix(opts.memory_budget)?;
            let trace = match mean_diag {
                Some(d) => d.iter().sum::<f64>(),
                None => src.fisher_diag()?.mean().iter().sum::<f64>(),
            };
            let op = FisherOperator::Gradients(g);
            let r = lanczos(&op, p, k, opts)?;
            (op, r.u, r.theta, Some(r.res), r.products, trace)
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
    let residuals: Vec<f64> = match residuals {
        Some(r) => r[..keep].to_vec(),
        None => {
            let fu = op.apply(vectors.as_ref())?;
            (0..keep)
                .map(|j| {
                    (0..p)
                        .map(|i| {
                            let r = fu[(i, j)] - values[j] * vectors[(i, j)];
                            r * r
                        })
                        .sum::<f64>()
                        .sqrt()
                })
                .collect()
        }
    };
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

/// Orthogonalises the columns of `z` against the orthonormal `q` (twice: classical block
/// Gram–Schmidt with reorthogonalisation) and then among themselves (QR); columns that vanish
/// (the Krylov space is exhausted in their direction) are dropped.
fn orthonormal_block(q: MatRef<'_, f64>, mut z: Mat<f64>) -> Mat<f64> {
    let scale0: Vec<f64> = super::col_sum_sq(z.as_ref())
        .iter()
        .map(|v| v.sqrt())
        .collect();
    for _ in 0..2 {
        if q.ncols() > 0 {
            let c = q.transpose() * &z;
            z -= q * &c;
        }
    }
    // QR within the block (faer, level 3); a column whose R diagonal is negligible is
    // numerically dependent on the others and the space: dropped
    let qr = z.qr();
    let r = qr.thin_R();
    let qm = qr.compute_thin_Q();
    let keep: Vec<usize> = (0..r.ncols().min(r.nrows()))
        .filter(|&j| r[(j, j)].abs() > 1e-10 * scale0[j].max(f64::MIN_POSITIVE))
        .collect();
    let out = Mat::from_fn(z.nrows(), keep.len(), |i, j| qm[(i, keep[j])]);
    if keep.len() == z.ncols() {
        return out;
    }
    // after dropping, re-orthogonalise what is kept against the space once more
    let mut out = out;
    if q.ncols() > 0 {
        let c = q.transpose() * &out;
        out -= q * &c;
    }
    out.qr().compute_thin_Q()
}

/// What the block Lanczos returns: Ritz vectors, values, residuals and the products used.
struct Ritz {
    u: Mat<f64>,
    theta: Vec<f64>,
    res: Vec<f64>,
    products: usize,
}

/// Block Lanczos (a block Krylov space with full reorthogonalisation) and Rayleigh–Ritz over
/// F·V. The space grows by one block of b columns per step (one F·V of
/// b columns: the Fisher products cost the same per column in a block, so blocks buy level-3
/// orthogonalisation, not cheaper products); after each step the top-k Ritz pairs and their
/// residuals ‖F u − θ u‖ come from the stored F·Q without another product.
fn lanczos(op: &FisherOperator<'_>, p: usize, k: usize, opts: &LowRankOptions) -> Result<Ritz> {
    let b = if opts.block > 0 {
        opts.block
    } else {
        (k / 4).clamp(8, 32)
    }
    .min(p);
    // Q and F·Q, P × (space) each, plus a block of transients: the space is capped by the
    // budget as well as by max_products
    let fit = (opts.memory_budget / (16 * p.max(1) as u64)).saturating_sub(2 * b as u64) as usize;
    if fit < 2 * b.min(p) {
        return Err(Error::MemoryBudget {
            what: format!(
                "the block Lanczos basis and its products (two blocks of {b} vectors of length {p}, twice)"
            ),
            needed: (p as u64) * (6 * b as u64) * 8,
            budget: opts.memory_budget,
            hint: "lower the rank k or raise the memory budget".into(),
        });
    }
    let max_products = opts.max_products.max(b).min(fit);
    let mut q = orthonormal_block(
        Mat::<f64>::zeros(p, 0).as_ref(),
        gaussian_matrix(p, b, 0x2545_f491_4f6c_dd1d),
    );
    let mut w = op.apply(q.as_ref())?;
    let mut products = q.ncols();
    let mut last_len = q.ncols();
    loop {
        // Rayleigh–Ritz on span(Q): T = Qᵀ F Q (symmetrised)
        let m = q.ncols();
        let mut t = q.transpose() * &w;
        for j in 0..m {
            for i in 0..j {
                let v = 0.5 * (t[(i, j)] + t[(j, i)]);
                t[(i, j)] = v;
                t[(j, i)] = v;
            }
        }
        let (y, theta) = sym_eigen(t.as_ref(), "the Rayleigh–Ritz matrix QᵀFQ")?;
        let kk = k.min(m);
        let yk = y.subcols(0, kk);
        let u = &q * yk;
        let fu = &w * yk;
        let s1 = theta.first().copied().unwrap_or(0.0).max(0.0);
        let res: Vec<f64> = (0..kk)
            .map(|j| {
                (0..p)
                    .map(|i| (fu[(i, j)] - theta[j] * u[(i, j)]).powi(2))
                    .sum::<f64>()
                    .sqrt()
            })
            .collect();
        let worst = res.iter().copied().fold(0.0f64, f64::max);
        let exhausted = m >= p;
        if kk == k && worst <= opts.tol * s1.max(f64::MIN_POSITIVE) || exhausted || s1 == 0.0 {
            return Ok(Ritz {
                u,
                theta: theta[..kk].to_vec(),
                res,
                products,
            });
        }
        if products + b > max_products {
            if opts.accept_unconverged && kk == k {
                return Ok(Ritz {
                    u,
                    theta: theta[..kk].to_vec(),
                    res,
                    products,
                });
            }
            return Err(Error::NotConverged {
                what: format!("block Lanczos for the top {k} Fisher eigenpairs"),
                iterations: products,
                residual: worst / s1.max(f64::MIN_POSITIVE),
                tol: opts.tol,
                hint: format!(
                    "the largest residual ‖F u − θ u‖/θ₁ after {products} products (max_products {}, \
                     {fit} fit the memory budget); raise max_products or the memory budget, lower the rank, \
                     loosen the tolerance, or accept the Ritz approximation",
                    opts.max_products
                ),
            });
        }
        // the next block: F·(last block), orthogonal to the space
        let last = w.subcols(m - last_len, last_len).to_owned();
        let next = orthonormal_block(q.as_ref(), last);
        if next.ncols() == 0 {
            // an invariant subspace: the Ritz pairs are exact
            return Ok(Ritz {
                u,
                theta: theta[..kk].to_vec(),
                res,
                products,
            });
        }
        let wn = op.apply(next.as_ref())?;
        products += next.ncols();
        last_len = next.ncols();
        q = concat_cols(&q, &next);
        w = concat_cols(&w, &wn);
    }
}

fn concat_cols(a: &Mat<f64>, b: &Mat<f64>) -> Mat<f64> {
    let (ka, kb) = (a.ncols(), b.ncols());
    Mat::from_fn(a.nrows(), ka + kb, |i, j| {
        if j < ka {
            a[(i, j)]
        } else {
            b[(i, j - ka)]
        }
    })
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
        // one diagonal pass serves both the correction D and the Lanczos trace
        let diag = if opts.diagonal {
            Some(src.fisher_diag()?.mean())
        } else {
            None
        };
        let eig = top_eigenpairs(src, opts, diag.as_deref())?;
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
                let l = super::cholesky_lower(c, "the low-rank core I + Wᵀ(D+λI)⁻¹W", damping)?;
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
        check_block(&self.name(), self.dim(), g)?;
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
        check_block(&self.name(), self.dim(), g)?;
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
