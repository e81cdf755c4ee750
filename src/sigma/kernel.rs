use std::sync::Arc;

use faer::linalg::triangular_solve::{
    solve_lower_triangular_in_place, solve_upper_triangular_in_place,
};
use faer::{Mat, MatRef, Par};

use super::{check_block, col_sum_sq, finish, SigmaOp};
use crate::engine::gradients::GradientMatrix;
use crate::error::{Error, Result};

/// The precision of the kernel system's factorization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelPrecision {
    /// f64 Cholesky factor.
    F64,
    /// f32 Cholesky factor (about twice as fast as f64 here) with iterative refinement against
    /// the f64 system to a relative residual of 1e-14 per column; falls back to the f64 factor
    /// when the f32 factorization fails or refinement stalls (κ·ε₃₂ ≳ 1). Holds the f64 system
    /// (N² f64) besides the f32 factor (N² f32).
    Mixed,
    /// f64 today: on W-full (N = 4096, 256 queries) the refinement's f64 residual products
    /// (2·N²·M flop per step) cost more than the f32 factorization saves (through the CLI,
    /// 0.96–1.12 s mixed against 0.49–0.56 s f64, measured); `Mixed` is there to opt in for
    /// few right-hand sides.
    Auto,
}

impl std::str::FromStr for KernelPrecision {
    type Err = Error;
    /// `auto`, `f64` or `mixed` (the CLI's `--kernel-precision`).
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "auto" => Ok(KernelPrecision::Auto),
            "f64" => Ok(KernelPrecision::F64),
            "mixed" => Ok(KernelPrecision::Mixed),
            other => Err(Error::invalid(
                "kernel precision",
                other,
                "expected auto, f64 or mixed",
            )),
        }
    }
}

/// Relative residual the mixed-precision refinement reaches per column.
const REFINE_TOL: f64 = 1e-14;
const REFINE_MAX: usize = 40;

/// Σ = (F + λI)⁻¹ exactly, through the N×N kernel (Woodbury), F = GᵀG/N:
///
/// (F + λI)⁻¹ = (1/λ)(I − Gᵀ(NλI + K)⁻¹G),  K = GGᵀ,
/// so gᵀΣg = (‖g‖² − (Gg)ᵀ(NλI + K)⁻¹(Gg)) / λ.
///
/// Holds the Cholesky factor of NλI + K and the gradient operator (for the factored engine, the
/// per-layer factors, O(N·Σ(in+out))); never anything P×P. The f64 factor is one N×N buffer:
/// the lower triangle of the system is written into it tile by tile
/// ([`GradientMatrix::gram_lower_into`]) and factored in place, so the pages above the diagonal
/// are never touched (about N²/2 f64 resident). [`KernelPrecision::Mixed`] holds the whole f64
/// system and an f32 factor instead (N² f64 + N² f32). Building costs the Gram matrix
/// (N²/2·Σ(in+out) multiply-adds factored) and one N×N Cholesky (N³/3).
///
/// Accuracy: when λ is tiny next to F the two terms nearly cancel; all of it is f64 (the mixed
/// route refines its solves to f64 accuracy), and the result keeps about
/// 16 − log10(‖g‖²/(λ·gᵀΣg)) significant digits (tested against the dense solve down to
/// λ = 1e-6).
pub struct KernelInverseFisher<'a> {
    g: Arc<dyn GradientMatrix + 'a>,
    factor: Factor,
    damping: f64,
}

/// An N×N column-major f64 matrix in a zero-initialised buffer of which only the lower triangle
/// is used. `vec![0.0; n²]` asks the allocator for zeroed memory (for large sizes, fresh pages
/// nobody has written), so the pages only the strict upper triangle would use are never touched:
/// a factor stored in place costs about N²/2 f64 of resident memory, not N².
struct Square {
    data: Vec<f64>,
    n: usize,
}

impl Square {
    /// A zero matrix whose lower triangle's pages are touched once, by this thread. Measured on
    /// this project's 2-core VM (n = 4096): faulting them in serially takes 37–40 ms and the
    /// Gram tiles after it 65 ms, while letting the parallel tiles fault them in takes 220 ms.
    fn zeros_lower(n: usize) -> Self {
        let mut data = vec![0.0; n * n];
        const PAGE: usize = 4096 / std::mem::size_of::<f64>();
        for j in 0..n {
            let col = &mut data[j * n + j..(j + 1) * n];
            // volatile: the compiler knows the buffer is zero and could drop plain stores of 0
            // SAFETY: each `v` is a valid, aligned, exclusive reference into `data`
            col.iter_mut()
                .step_by(PAGE)
                .for_each(|v| unsafe { std::ptr::write_volatile(v, 0.0) });
            if let Some(v) = col.last_mut() {
                // SAFETY: as above
                unsafe { std::ptr::write_volatile(v, 0.0) };
            }
        }
        Self { data, n }
    }
    fn as_ref(&self) -> MatRef<'_, f64> {
        MatRef::from_column_major_slice(&self.data, self.n, self.n)
    }
    fn as_mut(&mut self) -> faer::MatMut<'_, f64> {
        faer::MatMut::from_column_major_slice_mut(&mut self.data, self.n, self.n)
    }
}

enum Factor {
    /// L in the lower triangle, zeros above
    F64(Square),
    Mixed {
        a: Mat<f64>,
        l32: Mat<f32>,
        /// the f64 factor, made on first need (refinement stalled)
        l64: std::sync::OnceLock<Result<Mat<f64>>>,
        refinements: std::sync::atomic::AtomicUsize,
        fallbacks: std::sync::atomic::AtomicUsize,
    },
}

impl<'a> KernelInverseFisher<'a> {
    /// The kernel Σ of a Fisher source, over its per-example gradient operator (within
    /// `memory_budget`), with [`KernelPrecision::Auto`].
    pub fn from_fisher(
        fisher: &'a dyn crate::fisher::FisherSource,
        damping: f64,
        memory_budget: u64,
    ) -> Result<Self> {
        Self::new(fisher.gradient_matrix(memory_budget)?, damping)
    }

    /// Builds the kernel factorization with [`KernelPrecision::Auto`]. Needs λ > 0 (with λ = 0
    /// and N < P the kernel system is singular); with N = 0 (no data, F = 0) Σ = I/λ.
    pub fn new(g: Arc<dyn GradientMatrix + 'a>, damping: f64) -> Result<Self> {
        Self::with_precision(g, damping, KernelPrecision::Auto)
    }

    /// Builds the kernel factorization in the given precision.
    pub fn with_precision(
        g: Arc<dyn GradientMatrix + 'a>,
        damping: f64,
        precision: KernelPrecision,
    ) -> Result<Self> {
        if !(damping.is_finite() && damping > 0.0) {
            return Err(Error::invalid(
                "damping",
                damping,
                "the kernel method needs a finite damping > 0",
            ));
        }
        let n = g.num_examples();
        // the lower triangle of NλI + K in a zeroed buffer: the factorization in place reads
        // and writes only that, so the pages above the diagonal are never touched
        let mut a = Square::zeros_lower(n);
        g.gram_lower_into(a.as_mut())?;
        for j in 0..n {
            for i in j..n {
                if !a.as_ref()[(i, j)].is_finite() {
                    return Err(Error::NonFinite {
                        what: "Gram matrix".into(),
                        detail: format!("entry ({i}, {j})"),
                    });
                }
            }
            a.as_mut()[(j, j)] += n as f64 * damping;
        }
        let what = "the kernel system N·λ·I + G Gᵀ";
        let mixed = match precision {
            KernelPrecision::F64 => false,
            KernelPrecision::Mixed => true,
            KernelPrecision::Auto => false,
        };
        let factor = match mixed.then(|| cholesky_f32(a.as_ref())).flatten() {
            Some(l32) => Factor::Mixed {
                // the whole symmetric system, for the refinement's residual products
                a: Mat::from_fn(n, n, |i, j| a.as_ref()[(i.max(j), i.min(j))]),
                l32,
                l64: std::sync::OnceLock::new(),
                refinements: 0.into(),
                fallbacks: 0.into(),
            },
            // f64 asked for, or the f32 factorization failed
            None => {
                super::cholesky_lower_in_place(a.as_mut(), what, damping)?;
                Factor::F64(a)
            }
        };
        Ok(Self { factor, g, damping })
    }

    /// λ.
    pub fn damping(&self) -> f64 {
        self.damping
    }

    /// The precision of the factor in use: `F64`, or `Mixed` (an f32 factor that held).
    pub fn precision(&self) -> KernelPrecision {
        match self.factor {
            Factor::F64(_) => KernelPrecision::F64,
            Factor::Mixed { .. } => KernelPrecision::Mixed,
        }
    }

    /// Mixed precision: (refinement steps taken, columns that fell back to the f64 factor) over
    /// all solves so far; (0, 0) for the f64 factor.
    pub fn refinement_stats(&self) -> (usize, usize) {
        match &self.factor {
            Factor::F64(_) => (0, 0),
            Factor::Mixed {
                refinements,
                fallbacks,
                ..
            } => (
                refinements.load(std::sync::atomic::Ordering::Relaxed),
                fallbacks.load(std::sync::atomic::Ordering::Relaxed),
            ),
        }
    }

    /// (NλI + K)⁻¹ B for an N×k block, or with `half`, L⁻¹B for the f64 factor L (the
    /// quadratic forms need only ‖L⁻¹b‖² = bᵀ(NλI+K)⁻¹b); returns whether it is the half solve.
    fn solve(&self, b: Mat<f64>, half: bool) -> Result<(Mat<f64>, bool)> {
        match &self.factor {
            Factor::F64(l) => Ok((solve_f64(l.as_ref(), b, half), half)),
            Factor::Mixed {
                a,
                l32,
                l64,
                refinements,
                fallbacks,
            } => {
                let solve32 = |r: &Mat<f64>| -> Mat<f64> {
                    let mut r32 =
                        Mat::<f32>::from_fn(r.nrows(), r.ncols(), |i, j| r[(i, j)] as f32);
                    solve_lower_triangular_in_place(l32.as_ref(), r32.as_mut(), Par::rayon(0));
                    solve_upper_triangular_in_place(
                        l32.as_ref().transpose(),
                        r32.as_mut(),
                        Par::rayon(0),
                    );
                    Mat::from_fn(r.nrows(), r.ncols(), |i, j| r32[(i, j)] as f64)
                };
                let norms: Vec<f64> = col_sum_sq(b.as_ref()).iter().map(|v| v.sqrt()).collect();
                let mut x = solve32(&b);
                let mut last = f64::INFINITY;
                let mut ok = false;
                for _ in 0..REFINE_MAX {
                    // r = B − A X in f64
                    let mut r = b.clone();
                    faer::linalg::matmul::matmul(
                        r.as_mut(),
                        faer::Accum::Add,
                        a.as_ref(),
                        x.as_ref(),
                        -1.0,
                        Par::rayon(0),
                    );
                    let worst = col_sum_sq(r.as_ref())
                        .iter()
                        .zip(&norms)
                        .map(|(s, n)| if *n > 0.0 { s.sqrt() / n } else { 0.0 })
                        .fold(0.0, f64::max);
                    if !worst.is_finite() {
                        break;
                    }
                    if worst <= REFINE_TOL {
                        ok = true;
                        break;
                    }
                    if worst > 0.5 * last {
                        // stalled: κ·ε₃₂ is too large for refinement to contract
                        break;
                    }
                    last = worst;
                    let dx = solve32(&r);
                    x += &dx;
                    refinements.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                if ok {
                    return Ok((x, false));
                }
                fallbacks.fetch_add(b.ncols(), std::sync::atomic::Ordering::Relaxed);
                let l = l64
                    .get_or_init(|| {
                        super::cholesky_lower(
                            a.clone(),
                            "the kernel system N·λ·I + G Gᵀ",
                            self.damping,
                        )
                    })
                    .as_ref()
                    .map_err(|e| Error::Unsupported(e.to_string()))?;
                Ok((solve_f64(l.as_ref(), b, half), half))
            }
        }
    }

    /// (‖q‖² − (Gq)ᵀ(NλI+K)⁻¹(Gq))/λ from the squared norms and G·Q.
    fn finish_forms(&self, sq: Vec<f64>, gq: Mat<f64>) -> Result<Vec<f64>> {
        let (x, half) = self.solve(gq.clone(), true)?;
        let z: Vec<f64> = if half {
            col_sum_sq(x.as_ref())
        } else {
            (0..gq.ncols())
                .map(|j| (0..gq.nrows()).map(|i| gq[(i, j)] * x[(i, j)]).sum())
                .collect()
        };
        let out = sq
            .iter()
            .zip(&z)
            .map(|(s, z)| {
                let v = (s - z) / self.damping;
                // rounding can leave a tiny negative value where the exact one is ~0
                if v < 0.0 && -v <= 1e-12 * s / self.damping {
                    0.0
                } else {
                    v
                }
            })
            .collect();
        finish("inverse_full_empirical_fim (kernel)", out)
    }
}

/// L⁻¹B, or with `half` false L⁻ᵀL⁻¹B, for the f64 factor L.
fn solve_f64(l: MatRef<'_, f64>, mut b: Mat<f64>, half: bool) -> Mat<f64> {
    solve_lower_triangular_in_place(l, b.as_mut(), Par::rayon(0));
    if !half {
        solve_upper_triangular_in_place(l.transpose(), b.as_mut(), Par::rayon(0));
    }
    b
}

/// The f32 Cholesky factor of a (symmetric, lower triangle read) f64 matrix, or `None` when it
/// fails or a pivot is numerically zero in f32.
fn cholesky_f32(a: MatRef<'_, f64>) -> Option<Mat<f32>> {
    let n = a.nrows();
    let mut l = Mat::<f32>::from_fn(n, n, |i, j| if i >= j { a[(i, j)] as f32 } else { 0.0 });
    super::llt_in_place(l.as_mut()).ok()?;
    let max_diag = (0..n).map(|i| a[(i, i)]).fold(0.0f64, f64::max);
    let tol = (n.max(1) as f64) * f32::EPSILON as f64 * max_diag;
    if (0..n).any(|i| {
        let p = l[(i, i)] as f64;
        p.is_nan() || p * p <= tol
    }) {
        return None;
    }
    Some(l)
}

impl SigmaOp for KernelInverseFisher<'_> {
    fn dim(&self) -> usize {
        self.g.num_params()
    }
    fn name(&self) -> String {
        "inverse_full_empirical_fim".into()
    }
    fn apply(&self, q: MatRef<'_, f64>) -> Result<Mat<f64>> {
        check_block(self.dim(), q)?;
        let (x, _) = self.solve(self.g.jv(q)?, false)?;
        let corr = self.g.jtu(x.as_ref())?;
        Ok(Mat::from_fn(q.nrows(), q.ncols(), |i, j| {
            (q[(i, j)] - corr[(i, j)]) / self.damping
        }))
    }
    fn quad_forms(&self, q: MatRef<'_, f64>) -> Result<Vec<f64>> {
        check_block(self.dim(), q)?;
        self.finish_forms(col_sum_sq(q), self.g.jv(q)?)
    }
    fn quad_forms_layered(&self, q: &crate::engine::LayeredGradients) -> Option<Result<Vec<f64>>> {
        // G qⱼ pair by pair, layer by layer: the queries' gradients are never formed
        let gq = self.g.cross_gram_layered(q)?;
        Some(gq.and_then(|gq| self.finish_forms(q.sq_norms(), gq)))
    }
}
