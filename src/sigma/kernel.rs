use std::sync::Arc;

use faer::linalg::triangular_solve::{
    solve_lower_triangular_in_place, solve_upper_triangular_in_place,
};
use faer::{Mat, MatRef, Par};

use super::pivoted::PivotedCholesky;
use super::solver::{conjugate_gradient_with_product, CgReport, CgSettings, LinOp};
use super::{check_block, col_sum_sq, finish, CgOptions, CgPreconditioner, QuadForms, SigmaOp};
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
/// Holds the Cholesky factor of NλI + K and the gradient operator (for the graph engine, the
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
/// is used. The buffer is fresh zero pages nobody has written (from the allocator for small
/// sizes; above [`MAPPED_BYTES`] an anonymous mapping made without reserving swap, so that the
/// kernel's overcommit check does not refuse an N² buffer of which only half will ever be
/// touched), so the pages only the strict upper triangle would use are never touched: a system
/// stored in place costs about N²/2 f64 of resident memory, not N².
struct Square {
    buf: Buffer,
    n: usize,
}

/// Sizes from which [`Square`] maps its buffer instead of allocating it: 64 MiB.
const MAPPED_BYTES: usize = 64 << 20;

enum Buffer {
    Heap(Vec<f64>),
    Mapped(memmap2::MmapMut),
}

impl Square {
    /// A zero matrix whose lower triangle's pages are touched once, by this thread. Measured on
    /// this project's 2-core VM (n = 4096): faulting them in serially takes 37–40 ms and the
    /// Gram tiles after it 65 ms, while letting the parallel tiles fault them in takes 220 ms.
    fn zeros_lower(n: usize) -> Result<Self> {
        let len = n.checked_mul(n).filter(|l| l.checked_mul(8).is_some());
        let len = len.ok_or_else(|| {
            Error::invalid("kernel system size", n, "N² f64 does not fit in memory")
        })?;
        let buf = if len * 8 < MAPPED_BYTES {
            Buffer::Heap(vec![0.0; len])
        } else {
            let map = memmap2::MmapOptions::new()
                .len(len * 8)
                .no_reserve_swap()
                .map_anon()
                .map_err(|e| Error::MemoryBudget {
                    what: format!("the {n}×{n} kernel system (about half of it resident)"),
                    needed: (len as u64) * 4,
                    budget: 0,
                    hint: format!(
                        "the system could not be mapped ({e}); use fewer examples, or the cg \
                         or low-rank methods"
                    ),
                })?;
            Buffer::Mapped(map)
        };
        let mut sq = Self { buf, n };
        const PAGE: usize = 4096 / std::mem::size_of::<f64>();
        let data = sq.slice_mut();
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
        Ok(sq)
    }
    fn slice(&self) -> &[f64] {
        match &self.buf {
            Buffer::Heap(v) => v,
            // SAFETY: the mapping is page-aligned (so f64-aligned), n²·8 bytes long, zero-filled
            // by the kernel (every bit pattern is a valid f64), and lives as long as `self`
            Buffer::Mapped(m) => unsafe {
                std::slice::from_raw_parts(m.as_ptr().cast::<f64>(), m.len() / 8)
            },
        }
    }
    fn slice_mut(&mut self) -> &mut [f64] {
        match &mut self.buf {
            Buffer::Heap(v) => v,
            // SAFETY: as in `slice`, and `&mut self` makes the borrow exclusive
            Buffer::Mapped(m) => unsafe {
                std::slice::from_raw_parts_mut(m.as_mut_ptr().cast::<f64>(), m.len() / 8)
            },
        }
    }
    fn as_ref(&self) -> MatRef<'_, f64> {
        MatRef::from_column_major_slice(self.slice(), self.n, self.n)
    }
    fn as_mut(&mut self) -> faer::MatMut<'_, f64> {
        let n = self.n;
        faer::MatMut::from_column_major_slice_mut(self.slice_mut(), n, n)
    }
}

/// A solve of the kernel system: X, whether it is the half solve L⁻¹B, and for an iterative
/// solve A·X (from the solver's last product).
struct Solved {
    x: Mat<f64>,
    half: bool,
    ax: Option<Mat<f64>>,
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
    /// The system itself (lower triangle) solved by preconditioned CG
    Iterative {
        a: Square,
        pre: PivotedCholesky,
        settings: CgSettings,
        accept_unconverged: bool,
        last: std::sync::Mutex<Option<CgReport>>,
    },
}

/// K + μI held as its lower triangle (a [`Square`]), applied as tril(A)·X + strict_tril(A)ᵀ·X:
/// the entries above the diagonal are never read.
struct LowerSymmetric<'a> {
    a: MatRef<'a, f64>,
}

impl LinOp for LowerSymmetric<'_> {
    fn dim(&self) -> usize {
        self.a.nrows()
    }
    fn apply(&self, x: MatRef<'_, f64>) -> Result<Mat<f64>> {
        use faer::linalg::matmul::triangular::{matmul, BlockStructure};
        let mut y = Mat::<f64>::zeros(self.a.nrows(), x.ncols());
        matmul(
            y.as_mut(),
            BlockStructure::Rectangular,
            faer::Accum::Replace,
            self.a,
            BlockStructure::TriangularLower,
            x,
            BlockStructure::Rectangular,
            1.0,
            Par::rayon(0),
        );
        matmul(
            y.as_mut(),
            BlockStructure::Rectangular,
            faer::Accum::Add,
            self.a.transpose(),
            BlockStructure::StrictTriangularUpper,
            x,
            BlockStructure::Rectangular,
            1.0,
            Par::rayon(0),
        );
        Ok(y)
    }
}

/// The default rank of the kernel CG's pivoted-Cholesky preconditioner: min(N, 1024), capped
/// so that its N×rank factor takes at most an eighth of the memory budget.
pub fn default_kernel_cg_rank(n: usize, memory_budget: u64) -> usize {
    let fit = (memory_budget / 8) / (8 * n.max(1) as u64);
    n.min(1024).min(fit as usize)
}

/// Fails naming the first entry of the Gram matrix's lower triangle that is not finite.
fn check_gram_finite(a: &Square) -> Result<()> {
    let n = a.n;
    for j in 0..n {
        if let Some(i) = a.slice()[j * n + j..(j + 1) * n]
            .iter()
            .position(|v| !v.is_finite())
        {
            return Err(Error::NonFinite {
                what: "Gram matrix".into(),
                detail: format!("entry ({}, {j})", i + j),
            });
        }
    }
    Ok(())
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
        super::check_damping(damping, "the kernel method")?;
        let n = g.num_examples();
        // the lower triangle of NλI + K in a zeroed buffer: the factorization in place reads
        // and writes only that, so the pages above the diagonal are never touched
        let mut a = Square::zeros_lower(n)?;
        g.gram_lower_into(a.as_mut())?;
        check_gram_finite(&a)?;
        for j in 0..n {
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

    /// The kernel system solved by preconditioned CG instead of a factorization (the
    /// `kernel-cg` method): the lower triangle of NλI + K is stored (about N²/2 f64 resident,
    /// the same as the Cholesky route, but no N³/3 factorization), a randomly pivoted partial
    /// Cholesky factor of K of rank `opts.preconditioner`'s rank (`Nystrom { rank: 0 }`: the
    /// [`default_kernel_cg_rank`]; `Identity`: none) preconditions it, and every solve runs
    /// CG on the stored system in f64 (2·N² multiply-adds per iteration and right-hand side)
    /// to `opts.tol`, reported through [`SigmaOp::solve_report`]. A solve that misses the
    /// tolerance is an [`Error::NotConverged`] unless `opts.accept_unconverged`.
    /// `opts.progress` gets a line per stage and per iteration.
    pub fn iterative(
        g: Arc<dyn GradientMatrix + 'a>,
        damping: f64,
        opts: &CgOptions,
    ) -> Result<Self> {
        super::check_damping(damping, "the kernel method")?;
        opts.check()?;
        let n = g.num_examples();
        let t = std::time::Instant::now();
        opts.progress.report(|| {
            format!(
                "kernel-cg: Gram matrix of {n} examples (lower half, {:.1} GB)",
                (n as f64) * (n as f64) * 4.0 / 1e9
            )
        })?;
        let mut a = Square::zeros_lower(n)?;
        g.gram_lower_into(a.as_mut())?;
        check_gram_finite(&a)?;
        opts.progress.report(|| {
            format!(
                "kernel-cg: Gram matrix done, {:.1} s",
                t.elapsed().as_secs_f64()
            )
        })?;
        let mu = n as f64 * damping;
        let rank = match opts.preconditioner {
            CgPreconditioner::Identity => 0,
            CgPreconditioner::Nystrom { rank: 0 } | CgPreconditioner::Jacobi => {
                default_kernel_cg_rank(n, opts.memory_budget)
            }
            CgPreconditioner::Nystrom { rank } => rank,
        };
        let data = a.slice();
        let diag: Vec<f64> = (0..n).map(|j| data[j * n + j]).collect();
        let column = |j: usize, out: &mut [f64]| {
            for (i, o) in out.iter_mut().enumerate() {
                *o = if i >= j {
                    data[j * n + i]
                } else {
                    data[i * n + j]
                };
            }
        };
        let pre = PivotedCholesky::new(
            &diag,
            column,
            rank,
            1e-14,
            mu.max(f64::MIN_POSITIVE),
            0x5eed,
        )?;
        opts.progress.report(|| {
            format!(
                "kernel-cg: preconditioner of rank {} ready, {:.1} s",
                pre.rank(),
                t.elapsed().as_secs_f64()
            )
        })?;
        for j in 0..n {
            a.as_mut()[(j, j)] += mu;
        }
        Ok(Self {
            factor: Factor::Iterative {
                a,
                pre,
                settings: CgSettings {
                    tol: opts.tol,
                    max_iter: opts.max_iter,
                    progress: opts.progress.clone(),
                },
                accept_unconverged: opts.accept_unconverged,
                last: std::sync::Mutex::new(None),
            },
            g,
            damping,
        })
    }

    /// How the kernel system is solved: `cholesky (f64)`, `cholesky (f32, refined to f64)` or
    /// `cg (pivoted cholesky (rank r))`.
    pub fn solver(&self) -> String {
        match &self.factor {
            Factor::F64(_) => "cholesky (f64)".into(),
            Factor::Mixed { .. } => "cholesky (f32, refined to f64)".into(),
            Factor::Iterative { pre, .. } => {
                format!("cg ({})", super::solver::Preconditioner::name(pre))
            }
        }
    }

    /// λ.
    pub fn damping(&self) -> f64 {
        self.damping
    }

    /// The precision of the factor in use: `F64`, or `Mixed` (an f32 factor that held).
    pub fn precision(&self) -> KernelPrecision {
        match self.factor {
            Factor::F64(_) | Factor::Iterative { .. } => KernelPrecision::F64,
            Factor::Mixed { .. } => KernelPrecision::Mixed,
        }
    }

    /// Mixed precision: (refinement steps taken, columns that fell back to the f64 factor) over
    /// all solves so far; (0, 0) for the f64 factor.
    pub fn refinement_stats(&self) -> (usize, usize) {
        match &self.factor {
            Factor::F64(_) | Factor::Iterative { .. } => (0, 0),
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
    /// quadratic forms need only ‖L⁻¹b‖² = bᵀ(NλI+K)⁻¹b).
    fn solve(&self, b: Mat<f64>, half: bool) -> Result<Solved> {
        let exact = |x: Mat<f64>, half: bool| Solved { x, half, ax: None };
        match &self.factor {
            Factor::F64(l) => Ok(exact(solve_f64(l.as_ref(), b, half), half)),
            Factor::Iterative {
                a,
                pre,
                settings,
                accept_unconverged,
                last,
            } => {
                let n = a.n;
                let (x, report, ax) = conjugate_gradient_with_product(
                    &LowerSymmetric { a: a.as_ref() },
                    pre,
                    b.as_ref(),
                    settings,
                )
                .map_err(|e| {
                    super::solver::name_indefinite(
                        e,
                        "the kernel system N·λ·I + G Gᵀ seen by CG (pᵀAp ≤ 0)",
                        self.damping,
                    )
                })?;
                if !report.converged && !accept_unconverged {
                    return Err(Error::NotConverged {
                        what: format!(
                            "CG on the {n}×{n} kernel system (λ = {:e}, preconditioner {})",
                            self.damping, report.preconditioner
                        ),
                        iterations: report.iterations,
                        residual: report.worst_residual(),
                        tol: settings.tol,
                        hint: "raise the iteration cap or the preconditioner's rank, or solve \
                               it exactly with the kernel method (a Cholesky factorization)"
                            .into(),
                    });
                }
                if let Ok(mut l) = last.lock() {
                    *l = Some(report);
                }
                Ok(Solved {
                    x,
                    half: false,
                    ax: Some(ax),
                })
            }
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
                    return Ok(exact(x, false));
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
                Ok(exact(solve_f64(l.as_ref(), b, half), half))
            }
        }
    }

    /// (‖q‖² − (Gq)ᵀ(NλI+K)⁻¹(Gq))/λ from the squared norms and G·Q.
    fn finish_forms(&self, sq: Vec<f64>, gq: Mat<f64>) -> Result<Vec<f64>> {
        let Solved { x, half, ax } = self.solve(gq.clone(), true)?;
        let z: Vec<f64> = if half {
            col_sum_sq(x.as_ref())
        } else if let Some(ax) = ax {
            // an approximate solve: 2bᵀx − xᵀAx = bᵀA⁻¹b − eᵀAe (e = A⁻¹b − x), whose error
            // is quadratic in the residual (‖r‖²/(Nλ) at most), where bᵀx's is linear; the
            // Woodbury form's cancellation ‖g‖²/(λ·ΔVar) multiplies whichever is left. A·x is
            // the product CG computed its final residual from.
            (0..gq.ncols())
                .map(|j| {
                    (0..gq.nrows())
                        .map(|i| x[(i, j)] * (2.0 * gq[(i, j)] - ax[(i, j)]))
                        .sum()
                })
                .collect()
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
        check_block(&self.name(), self.dim(), q)?;
        let x = self.solve(self.g.jv(q)?, false)?.x;
        let corr = self.g.jtu(x.as_ref())?;
        Ok(Mat::from_fn(q.nrows(), q.ncols(), |i, j| {
            (q[(i, j)] - corr[(i, j)]) / self.damping
        }))
    }
    fn quad_forms(&self, q: MatRef<'_, f64>) -> Result<Vec<f64>> {
        check_block(&self.name(), self.dim(), q)?;
        self.finish_forms(col_sum_sq(q), self.g.jv(q)?)
    }
    fn quad_forms_reported(&self, q: MatRef<'_, f64>) -> Result<QuadForms> {
        Ok(QuadForms {
            values: self.quad_forms(q)?,
            cg: self.solve_report(),
        })
    }
    fn solve_report(&self) -> Option<CgReport> {
        match &self.factor {
            Factor::Iterative { last, .. } => last.lock().ok().and_then(|l| l.clone()),
            _ => None,
        }
    }
    fn quad_forms_layered(&self, q: &crate::engine::LayeredGradients) -> Option<Result<Vec<f64>>> {
        // G qⱼ pair by pair, layer by layer: the queries' gradients are never formed
        let gq = self.g.cross_gram_layered(q)?;
        Some(gq.and_then(|gq| self.finish_forms(q.sq_norms(), gq)))
    }
}
