//! Preconditioned conjugate gradients over a small operator trait, in the style of faer's
//! `operator` module: the solver sees only a [`LinOp`] (the SPD matrix A as its action on a
//! block) and a [`Preconditioner`] (M⁻¹ as its action), and returns its [`CgReport`] with the
//! solution.
//!
//! The iteration runs all right-hand sides at once: one operator application per iteration on
//! the block of still-active columns, scalar recurrences per column (a converged column is
//! frozen). faer 0.24.4's block CG was tried first and dropped: with a zero initial guess it
//! leaves its residual uninitialised, and its block recurrences diverged on nearly dependent
//! right-hand sides in our tests.

use faer::{Mat, MatRef};

use crate::error::{Error, Result};

/// A symmetric positive definite operator A (dim × dim), seen through A·X for a block X.
pub trait LinOp: Sync {
    /// The dimension.
    fn dim(&self) -> usize;
    /// A·X for a dim × k block.
    fn apply(&self, x: MatRef<'_, f64>) -> Result<Mat<f64>>;
}

/// A preconditioner: M⁻¹ (symmetric positive definite) as its action on a block.
pub trait Preconditioner: Send + Sync {
    /// A short name for reports.
    fn name(&self) -> String;
    /// M⁻¹·R for a dim × k block.
    fn apply(&self, r: MatRef<'_, f64>) -> Mat<f64>;
}

/// M = I.
#[derive(Debug, Clone, Copy, Default)]
pub struct IdentityPreconditioner;

impl Preconditioner for IdentityPreconditioner {
    fn name(&self) -> String {
        "identity".into()
    }
    fn apply(&self, r: MatRef<'_, f64>) -> Mat<f64> {
        r.to_owned()
    }
}

/// M = diag(A) (Jacobi), given as the inverse diagonal. Memory O(dim).
#[derive(Debug, Clone)]
pub struct JacobiPreconditioner {
    inv_diag: Vec<f64>,
}

impl JacobiPreconditioner {
    /// From diag(A); every entry must be finite and > 0.
    pub fn new(diag: &[f64]) -> Result<Self> {
        if let Some((i, d)) = diag
            .iter()
            .enumerate()
            .find(|(_, d)| !(d.is_finite() && **d > 0.0))
        {
            return Err(Error::invalid(
                format!("Jacobi preconditioner diagonal entry {i}"),
                d,
                "must be finite and > 0",
            ));
        }
        Ok(Self {
            inv_diag: diag.iter().map(|d| 1.0 / d).collect(),
        })
    }
}

impl Preconditioner for JacobiPreconditioner {
    fn name(&self) -> String {
        "jacobi".into()
    }
    fn apply(&self, r: MatRef<'_, f64>) -> Mat<f64> {
        Mat::from_fn(r.nrows(), r.ncols(), |i, j| self.inv_diag[i] * r[(i, j)])
    }
}

/// The randomized Nyström preconditioner of Frangella, Tropp & Udell ("Randomized Nyström
/// preconditioning", SIAM J. Matrix Anal. Appl. 2023) for A = F + μI with F positive
/// semi-definite: a rank-r sketch F ≈ U Λ Uᵀ from one application of F to r random vectors,
/// and M⁻¹ = (λ_r + μ) U (Λ + μI)⁻¹ Uᵀ + (I − U Uᵀ).
///
/// For an empirical Fisher F = GᵀG/N of N examples, rank(F) ≤ N: with r ≥ N the sketch is
/// F itself (up to rounding) and CG converges in a few iterations whatever the damping. With
/// r < N it removes the r largest eigenvalues from the condition number. Memory O(dim·r)
/// (U, plus two dim × r transients while building); building costs one F·V with r columns.
#[derive(Debug, Clone)]
pub struct NystromPreconditioner {
    u: Mat<f64>,
    /// (λ_r + μ)/(λ_i + μ) − 1 per kept eigenpair.
    scale: Vec<f64>,
    rank: usize,
}

/// Uniform deviates in (0, 1) from a fixed-seed xorshift generator: a reproducible stream for
/// sketches and pivot sampling (not for anything that needs statistical quality).
pub(crate) fn uniform_stream(seed: u64) -> impl FnMut() -> f64 {
    let mut s = seed.max(1);
    move || {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        ((s >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
}

/// Standard normal deviates from [`uniform_stream`] (Box–Muller).
pub(crate) fn gaussian_matrix(rows: usize, cols: usize, seed: u64) -> Mat<f64> {
    let mut uniform = uniform_stream(seed);
    Mat::from_fn(rows, cols, |_, _| {
        let (a, b) = (uniform(), uniform());
        (-2.0 * a.ln()).sqrt() * (2.0 * std::f64::consts::PI * b).cos()
    })
}

impl NystromPreconditioner {
    /// Sketches the PSD operator `f` (F, without the shift) with `rank` random vectors (capped
    /// at dim) and builds M⁻¹ for A = F + μI, μ = `shift` > 0.
    pub fn new(f: &dyn LinOp, rank: usize, shift: f64) -> Result<Self> {
        if !(shift.is_finite() && shift > 0.0) {
            return Err(Error::invalid(
                "Nyström preconditioner shift (damping)",
                shift,
                "must be finite and > 0",
            ));
        }
        let p = f.dim();
        let r = rank.min(p);
        if r == 0 {
            return Ok(Self {
                u: Mat::zeros(p, 0),
                scale: vec![],
                rank: 0,
            });
        }
        // orthonormal test matrix Ω (p × r) and Y = F Ω
        let omega = gaussian_matrix(p, r, 0x9e37_79b9_7f4a_7c15)
            .qr()
            .compute_thin_Q();
        let mut y = f.apply(omega.as_ref())?;
        if y.nrows() != p || y.ncols() != r {
            return Err(Error::shape(
                "F·Ω in the Nyström sketch",
                format!("{p}×{r}"),
                format!("{}×{}", y.nrows(), y.ncols()),
            ));
        }
        // a small shift ν keeps Ωᵀ(Y + νΩ) positive definite in floating point
        let norm = y.norm_l2();
        if !norm.is_finite() {
            return Err(Error::NonFinite {
                what: "Nyström sketch F·Ω".into(),
                detail: format!("its norm is {norm}"),
            });
        }
        let nu = (p as f64).sqrt() * f64::EPSILON * norm.max(f64::MIN_POSITIVE);
        for j in 0..r {
            for i in 0..p {
                y[(i, j)] += nu * omega[(i, j)];
            }
        }
        let mut core = omega.transpose() * &y;
        // symmetrize against rounding
        for j in 0..r {
            for i in 0..j {
                let v = 0.5 * (core[(i, j)] + core[(j, i)]);
                core[(i, j)] = v;
                core[(j, i)] = v;
            }
        }
        let llt = core.llt(faer::Side::Lower).map_err(|_| {
            Error::Unsupported(
                "the Nyström sketch's core matrix is not positive definite (the operator is not \
                 positive semi-definite?); use the Jacobi preconditioner"
                    .into(),
            )
        })?;
        // B = Y L⁻ᵀ, i.e. Bᵀ = L⁻¹ Yᵀ
        let mut bt = y.transpose().to_owned();
        faer::linalg::triangular_solve::solve_lower_triangular_in_place(
            llt.L(),
            bt.as_mut(),
            faer::Par::rayon(0),
        );
        let b = bt.transpose().to_owned();
        let svd = b.thin_svd().map_err(|_| {
            Error::Unsupported(
                "the SVD of the Nyström sketch did not converge; use the Jacobi preconditioner"
                    .into(),
            )
        })?;
        let s = svd.S().column_vector();
        // approximate eigenvalues of F, largest first; keep the clearly positive ones
        let lam: Vec<f64> = (0..s.nrows())
            .map(|i| (s[i] * s[i] - nu).max(0.0))
            .collect();
        let keep: Vec<usize> = (0..lam.len()).filter(|&i| lam[i] > nu).collect();
        if keep.is_empty() {
            return Ok(Self {
                u: Mat::zeros(p, 0),
                scale: vec![],
                rank: 0,
            });
        }
        let lam_min = keep.iter().map(|&i| lam[i]).fold(f64::INFINITY, f64::min);
        let u = Mat::from_fn(p, keep.len(), |i, c| svd.U()[(i, keep[c])]);
        let scale = keep
            .iter()
            .map(|&i| (lam_min + shift) / (lam[i] + shift) - 1.0)
            .collect();
        Ok(Self {
            u,
            scale,
            rank: keep.len(),
        })
    }

    /// The number of eigenpairs kept.
    pub fn rank(&self) -> usize {
        self.rank
    }
}

impl Preconditioner for NystromPreconditioner {
    fn name(&self) -> String {
        format!("nystrom(rank {})", self.rank)
    }
    fn apply(&self, r: MatRef<'_, f64>) -> Mat<f64> {
        if self.rank == 0 {
            return r.to_owned();
        }
        // r + U diag(scale) Uᵀ r
        let mut c = self.u.transpose() * r;
        for j in 0..c.ncols() {
            for (i, s) in self.scale.iter().enumerate() {
                c[(i, j)] *= s;
            }
        }
        let mut out = r.to_owned();
        out += &self.u * &c;
        out
    }
}

/// Stopping rules of [`conjugate_gradient`].
#[derive(Debug, Clone)]
pub struct CgSettings {
    /// Stop a column when ‖A xⱼ − bⱼ‖ ≤ tol·‖bⱼ‖ (checked on the true residual).
    pub tol: f64,
    /// Iteration cap.
    pub max_iter: usize,
    /// One line per iteration (the worst recursive residual of the active columns, how many
    /// are active, the time so far). Default none.
    pub progress: crate::progress::Progress,
}

/// How a CG solve went.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct CgReport {
    /// Iterations (each applies A once to the block of columns not yet converged).
    pub iterations: usize,
    /// Final relative residual ‖A xⱼ − bⱼ‖/‖bⱼ‖ of each right-hand side, recomputed from the
    /// solution.
    pub rel_residuals: Vec<f64>,
    /// Whether every residual is within the tolerance.
    pub converged: bool,
    /// The preconditioner used.
    pub preconditioner: String,
}

impl CgReport {
    /// The worst relative residual.
    pub fn worst_residual(&self) -> f64 {
        self.rel_residuals.iter().cloned().fold(0.0, f64::max)
    }
}

fn col_dot(a: MatRef<'_, f64>, ca: usize, b: MatRef<'_, f64>, cb: usize) -> f64 {
    (0..a.nrows()).map(|i| a[(i, ca)] * b[(i, cb)]).sum()
}

/// [`conjugate_gradient`]'s error with a non-positive pᵀAp renamed for the operator the caller
/// solved (`what`), with its damping and the damping to try; other errors as they are.
pub(crate) fn name_indefinite(e: Error, what: &str, damping: f64) -> Error {
    match e {
        Error::NotPositiveDefinite { pivot, dim, .. } => Error::NotPositiveDefinite {
            what: what.into(),
            pivot,
            dim,
            damping,
            suggestion: damping * 100.0,
        },
        e => e,
    }
}

/// Solves A X = B by preconditioned CG from X = 0, all columns at once. Returns X and the
/// report whether or not every column reached the tolerance (the caller decides what a miss
/// means). pᵀAp ≤ 0 is an [`Error::NotPositiveDefinite`].
///
/// When a column's recursive residual reaches the tolerance its true residual is recomputed; if
/// rounding made the two drift apart (ill-conditioned A), the column restarts from its current
/// solution with the true residual (residual replacement, at most 20 times per column).
pub fn conjugate_gradient(
    a: &dyn LinOp,
    pre: &dyn Preconditioner,
    b: MatRef<'_, f64>,
    settings: &CgSettings,
) -> Result<(Mat<f64>, CgReport)> {
    let (x, report, _) = conjugate_gradient_with_product(a, pre, b, settings)?;
    Ok((x, report))
}

/// [`conjugate_gradient`], also returning A·X: the product its final true residual was
/// computed from, for a caller that needs it (the kernel method's quadratic forms).
pub(crate) fn conjugate_gradient_with_product(
    a: &dyn LinOp,
    pre: &dyn Preconditioner,
    b: MatRef<'_, f64>,
    settings: &CgSettings,
) -> Result<(Mat<f64>, CgReport, Mat<f64>)> {
    let (p, k) = (b.nrows(), b.ncols());
    if p != a.dim() {
        return Err(Error::shape(
            "right-hand sides of CG (rows must equal the operator's dimension)",
            a.dim(),
            p,
        ));
    }
    let norms: Vec<f64> = (0..k).map(|j| col_dot(b, j, b, j).sqrt()).collect();
    let mut x = Mat::<f64>::zeros(p, k);
    let mut r = b.to_owned();
    let mut pdir = pre.apply(r.as_ref());
    let mut rz: Vec<f64> = (0..k)
        .map(|j| col_dot(r.as_ref(), j, pdir.as_ref(), j))
        .collect();
    let mut active: Vec<usize> = (0..k).filter(|&j| norms[j] > 0.0).collect();
    let mut iterations = 0usize;
    let mut restarts = vec![0usize; k];
    let cols = |m: &Mat<f64>, idx: &[usize]| Mat::from_fn(p, idx.len(), |i, c| m[(i, idx[c])]);
    let start = std::time::Instant::now();
    while !active.is_empty() && iterations < settings.max_iter {
        let pa = cols(&pdir, &active);
        let ap = a.apply(pa.as_ref())?;
        iterations += 1;
        let mut still = Vec::with_capacity(active.len());
        let mut done = Vec::new();
        for (c, &j) in active.iter().enumerate() {
            let pap = col_dot(pa.as_ref(), c, ap.as_ref(), c);
            if pap.is_nan() || pap <= 0.0 {
                return Err(Error::NotPositiveDefinite {
                    what: "the operator seen by CG (pᵀAp ≤ 0)".into(),
                    pivot: j,
                    dim: p,
                    damping: f64::NAN,
                    suggestion: f64::NAN,
                });
            }
            let alpha = rz[j] / pap;
            let mut rr = 0.0;
            for i in 0..p {
                x[(i, j)] += alpha * pa[(i, c)];
                r[(i, j)] -= alpha * ap[(i, c)];
                rr += r[(i, j)] * r[(i, j)];
            }
            if rr.sqrt() > settings.tol * norms[j] {
                still.push(j);
            } else {
                done.push(j);
            }
        }
        settings.progress.report(|| {
            let worst = active
                .iter()
                .map(|&j| col_dot(r.as_ref(), j, r.as_ref(), j).sqrt() / norms[j])
                .fold(0.0, f64::max);
            format!(
                "cg iteration {iterations}: worst relative residual {worst:.2e} (tolerance {:.0e}), \
                 {} of {k} right-hand sides active, {:.1} s",
                settings.tol,
                still.len(),
                start.elapsed().as_secs_f64()
            )
        })?;
        // columns whose recursive residual says "converged": check the true residual and
        // restart those that drifted (residual replacement)
        if !done.is_empty() && iterations < settings.max_iter {
            let axd = a.apply(cols(&x, &done).as_ref())?;
            let mut restart = Vec::new();
            for (c, &j) in done.iter().enumerate() {
                let mut rr = 0.0;
                for i in 0..p {
                    r[(i, j)] = b[(i, j)] - axd[(i, c)];
                    rr += r[(i, j)] * r[(i, j)];
                }
                if rr.sqrt() > settings.tol * norms[j] && restarts[j] < 20 {
                    restarts[j] += 1;
                    restart.push(j);
                }
            }
            if !restart.is_empty() {
                let z = pre.apply(cols(&r, &restart).as_ref());
                for (c, &j) in restart.iter().enumerate() {
                    for i in 0..p {
                        pdir[(i, j)] = z[(i, c)];
                    }
                    rz[j] = col_dot(r.as_ref(), j, z.as_ref(), c);
                }
            }
            let mut next = restart;
            next.extend(update_directions(pre, &r, &mut pdir, &mut rz, &still));
            next.sort_unstable();
            active = next;
        } else {
            active = update_directions(pre, &r, &mut pdir, &mut rz, &still);
        }
    }
    // the true residual of every column, recomputed from the solution
    let ax = a.apply(x.as_ref())?;
    let rel_residuals: Vec<f64> = (0..k)
        .map(|j| {
            if norms[j] > 0.0 {
                (0..p)
                    .map(|i| (ax[(i, j)] - b[(i, j)]).powi(2))
                    .sum::<f64>()
                    .sqrt()
                    / norms[j]
            } else {
                0.0
            }
        })
        .collect();
    let converged = rel_residuals.iter().all(|r| *r <= settings.tol);
    Ok((
        x,
        CgReport {
            iterations,
            rel_residuals,
            converged,
            preconditioner: pre.name(),
        },
        ax,
    ))
}

/// The next search directions of the columns in `cols`; returns them (still active).
fn update_directions(
    pre: &dyn Preconditioner,
    r: &Mat<f64>,
    pdir: &mut Mat<f64>,
    rz: &mut [f64],
    cols: &[usize],
) -> Vec<usize> {
    if cols.is_empty() {
        return vec![];
    }
    let p = r.nrows();
    let rs = Mat::from_fn(p, cols.len(), |i, c| r[(i, cols[c])]);
    let z = pre.apply(rs.as_ref());
    for (c, &j) in cols.iter().enumerate() {
        let rz_new = col_dot(rs.as_ref(), c, z.as_ref(), c);
        let beta = rz_new / rz[j];
        rz[j] = rz_new;
        for i in 0..p {
            pdir[(i, j)] = z[(i, c)] + beta * pdir[(i, j)];
        }
    }
    cols.to_vec()
}
