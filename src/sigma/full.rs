//! Choosing how to apply the full Σ = (F + λI)⁻¹: dense Cholesky, the exact N×N kernel, or CG.

use crate::error::{Error, Result};

/// A method for the full inverse Fisher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FullMethod {
    /// Choose from the cost and memory model ([`choose_full_method`]).
    Auto,
    /// F formed in f64 (P×P), Cholesky, triangular solves. Exact.
    Dense,
    /// Woodbury through K = GGᵀ (N×N). Exact.
    Kernel,
    /// Preconditioned CG on the implicit F + λI, all right-hand sides at once (per-column
    /// recurrences). Iterative, residual reported.
    Cg,
    /// Woodbury through K = GGᵀ like `Kernel`, the N×N system solved by CG with a pivoted
    /// partial Cholesky preconditioner instead of factored: no N³ work, for large N.
    /// Iterative (to the CG tolerance, f64), residual reported.
    KernelCg,
}

impl std::str::FromStr for FullMethod {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(FullMethod::Auto),
            "dense" => Ok(FullMethod::Dense),
            "kernel" => Ok(FullMethod::Kernel),
            "cg" => Ok(FullMethod::Cg),
            "kernel-cg" => Ok(FullMethod::KernelCg),
            _ => Err(Error::invalid(
                "method",
                s,
                "expected auto, dense, kernel, kernel-cg or cg",
            )),
        }
    }
}

impl FullMethod {
    /// The lower-case name.
    pub fn name(&self) -> &'static str {
        match self {
            FullMethod::Auto => "auto",
            FullMethod::Dense => "dense",
            FullMethod::Kernel => "kernel",
            FullMethod::Cg => "cg",
            FullMethod::KernelCg => "kernel-cg",
        }
    }
}

/// The cost-model estimate of one method.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MethodEstimate {
    /// The method.
    pub method: FullMethod,
    /// Estimated floating-point operations.
    pub flops: f64,
    /// The expected time: `flops` at [`ASSUMED_FLOP_RATE`].
    pub seconds: f64,
    /// Estimated peak bytes.
    pub bytes: u64,
    /// Whether `bytes` fits the memory budget.
    pub fits: bool,
}

/// The method used and why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MethodChoice {
    /// The method.
    pub method: FullMethod,
    /// One line saying why.
    pub reason: String,
    /// The estimates behind the choice.
    pub estimates: Vec<MethodEstimate>,
}

/// Iterations the cost model assumes for CG (Jacobi-preconditioned CG on damped Fishers of MLPs
/// took 50–400 iterations to 1e-10 in this project's benchmarks).
pub const CG_ASSUMED_ITERATIONS: f64 = 200.0;

/// Iterations the cost model assumes for CG on the kernel system with its pivoted-Cholesky
/// preconditioner: twice the 11 that W-mnist took to 1e-10 at N = 8,192, 16,384 and 60,000
/// with rank 1024 (benches/README.md).
pub const KERNEL_CG_ASSUMED_ITERATIONS: f64 = 20.0;

/// The flop rate the expected times assume: what this project's 2-core machine reaches on the
/// work these estimates count (Gram tiles about 60 GFLOP/s; the f64 Cholesky 51, counted
/// twice; W-mnist's kernel-cg at N = 60,000 and 64 queries is estimated 1.6e13 flop, 330 s,
/// and took 249 s).
pub const ASSUMED_FLOP_RATE: f64 = 5e10;

/// How much slower per flop a Cholesky factorization runs than a matrix product here (faer
/// 0.24, 2 cores: 51 against about 100 GFLOP/s in f64, N = 8000).
const CHOLESKY_FLOP_WEIGHT: f64 = 2.0;

/// Picks a method for P parameters, N examples, `gram_width` = Σ_l(in+out) for a factored model
/// (P for the generic path), M right-hand sides and a memory budget in bytes.
///
/// Model: dense holds 2·P²·8 bytes and costs N·P² + P³/3; kernel holds N²·8 (the system,
/// factored in place; about half of it resident) + the gradient operator and costs
/// N²·gram_width + 2·N³/3 (a Cholesky flop counted twice: it runs at half a product's rate
/// here); kernel-cg holds N²·4 (the lower half) + N·r·8 (its preconditioner, r =
/// [`super::default_kernel_cg_rank`]) + the gradient operator and costs N²·gram_width +
/// 2·N·r² + [`KERNEL_CG_ASSUMED_ITERATIONS`]·(2·N² + 4·N·r)·M; CG holds 6·P·M·8 + the
/// gradient operator and costs about [`CG_ASSUMED_ITERATIONS`]·4·N·P·M. `requested` other
/// than `Auto` is honoured (and refused if over the budget); `Auto` takes the cheapest exact
/// method (dense, kernel) that fits unless the cheapest iterative one (kernel-cg, CG) that
/// fits is at least 4× cheaper.
pub fn choose_full_method(
    requested: FullMethod,
    p: usize,
    n: usize,
    gram_width: usize,
    operator_bytes: u64,
    m: usize,
    memory_budget: u64,
) -> Result<MethodChoice> {
    let (pf, nf, mf) = (p as f64, n as f64, m.max(1) as f64);
    let est = |method: FullMethod, flops: f64, bytes: f64| {
        let bytes = bytes.min(u64::MAX as f64) as u64;
        MethodEstimate {
            method,
            flops,
            seconds: flops / ASSUMED_FLOP_RATE,
            bytes,
            fits: bytes <= memory_budget,
        }
    };
    let estimates = vec![
        est(
            FullMethod::Dense,
            nf * pf * pf + pf * pf * pf / 3.0,
            2.0 * pf * pf * 8.0,
        ),
        est(
            FullMethod::Kernel,
            nf * nf * gram_width as f64 + CHOLESKY_FLOP_WEIGHT * nf * nf * nf / 3.0,
            nf * nf * 8.0 + operator_bytes as f64,
        ),
        {
            let r = super::default_kernel_cg_rank(n, memory_budget) as f64;
            est(
                FullMethod::KernelCg,
                nf * nf * gram_width as f64
                    + 2.0 * nf * r * r
                    + KERNEL_CG_ASSUMED_ITERATIONS * (2.0 * nf * nf + 4.0 * nf * r) * mf,
                nf * nf * 4.0 + nf * r * 8.0 + 8.0 * nf * mf * 8.0 + operator_bytes as f64,
            )
        },
        est(
            FullMethod::Cg,
            CG_ASSUMED_ITERATIONS * 4.0 * nf * pf * mf,
            6.0 * pf * mf * 8.0 + operator_bytes as f64,
        ),
    ];
    let describe = |e: &MethodEstimate| {
        format!(
            "{} ~{:.1e} flop (~{} here), {:.1e} B",
            e.method.name(),
            e.flops,
            human_seconds(e.seconds),
            e.bytes as f64
        )
    };
    if requested != FullMethod::Auto {
        let e = estimates
            .iter()
            .find(|e| e.method == requested)
            .cloned()
            .ok_or_else(|| {
                Error::invalid(
                    "method",
                    requested.name(),
                    "expected dense, kernel, kernel-cg or cg",
                )
            })?;
        if !e.fits {
            return Err(Error::MemoryBudget {
                what: format!(
                    "the '{}' method for the full inverse Fisher (P = {p}, N = {n})",
                    requested.name()
                ),
                needed: e.bytes,
                budget: memory_budget,
                hint: "choose another method (auto picks one that fits) or raise the memory budget"
                    .into(),
            });
        }
        return Ok(MethodChoice {
            method: requested,
            reason: format!("requested: {}", describe(&e)),
            estimates,
        });
    }
    let fitting: Vec<&MethodEstimate> = estimates.iter().filter(|e| e.fits).collect();
    let best_exact = fitting
        .iter()
        .filter(|e| e.method == FullMethod::Dense || e.method == FullMethod::Kernel)
        .min_by(|a, b| a.flops.total_cmp(&b.flops));
    // the iterative methods, the kernel system's first (its iterations are N² each, not N·P)
    let cg = fitting
        .iter()
        .filter(|e| e.method == FullMethod::Cg || e.method == FullMethod::KernelCg)
        .min_by(|a, b| a.flops.total_cmp(&b.flops));
    let pick = match (best_exact, cg) {
        (Some(x), Some(c)) if c.flops * 4.0 < x.flops => *c,
        (Some(x), _) => *x,
        (None, Some(c)) => *c,
        (None, None) => {
            let least = estimates.iter().map(|e| e.bytes).min().unwrap_or(0);
            return Err(Error::MemoryBudget {
                what: format!("every method for the full inverse Fisher (P = {p}, N = {n})"),
                needed: least,
                budget: memory_budget,
                hint: "raise the memory budget or use the diagonal Fisher".into(),
            });
        }
    };
    let others: Vec<String> = estimates
        .iter()
        .filter(|e| e.method != pick.method)
        .map(|e| {
            format!(
                "{}{}",
                describe(e),
                if e.fits { "" } else { " (over budget)" }
            )
        })
        .collect();
    Ok(MethodChoice {
        method: pick.method,
        reason: format!(
            "auto: {} is the cheapest that fits {:.1e} B; others: {}",
            describe(pick),
            memory_budget as f64,
            others.join("; ")
        ),
        estimates,
    })
}

/// "0.3 s", "42 s", "7 min", "3.1 h": an expected time for a reason string.
fn human_seconds(s: f64) -> String {
    if !s.is_finite() {
        "forever".into()
    } else if s < 10.0 {
        format!("{s:.1} s")
    } else if s < 600.0 {
        format!("{s:.0} s")
    } else if s < 3.0 * 3600.0 {
        format!("{:.0} min", s / 60.0)
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}
