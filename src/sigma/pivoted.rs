//! The kernel system's preconditioner: a randomly pivoted partial Cholesky factor K ≈ F Fᵀ
//! (N×r) of the Gram matrix, giving M = F Fᵀ + μI for K + μI and, by Woodbury,
//!
//! M⁻¹ R = (R − F (μI + FᵀF)⁻¹ Fᵀ R) / μ.
//!
//! Pivots are drawn in blocks with probability proportional to the residual diagonal
//! (block RPCholesky: Chen, Epperly, Tropp and Webber, "Randomly pivoted Cholesky", 2023),
//! then accepted inside each block greedily, largest residual pivot first, so that a block
//! never takes a direction already explained. Cost: r columns of K, N·r² multiply-adds, and
//! the r×r Cholesky of μI + FᵀF; memory N·r f64. Written here because no maintained Rust crate
//! has a partial (pivoted, low-rank) Cholesky over a matrix seen through its columns.

use faer::linalg::matmul::matmul;
use faer::linalg::triangular_solve::{
    solve_lower_triangular_in_place, solve_upper_triangular_in_place,
};
use faer::{Accum, Mat, MatRef, Par};

use super::solver::Preconditioner;
use crate::error::{Error, Result};

/// M⁻¹ for K + μI from a partial Cholesky factor of K.
pub(crate) struct PivotedCholesky {
    f: Mat<f64>,
    /// Cholesky factor of μI + FᵀF (r×r, lower).
    c: Mat<f64>,
    mu: f64,
}

/// Pivots drawn per block.
const BLOCK: usize = 64;

impl PivotedCholesky {
    /// Builds the factor from K's diagonal and a function writing column `j` of K into its
    /// buffer, stopping at `rank` columns or when the residual trace falls below `rel_tol` of
    /// the trace. `mu` > 0 is the shift of the system it preconditions.
    pub(crate) fn new(
        diag: &[f64],
        column: impl Fn(usize, &mut [f64]) + Sync,
        rank: usize,
        rel_tol: f64,
        mu: f64,
        seed: u64,
    ) -> Result<Self> {
        if !(mu.is_finite() && mu > 0.0) {
            return Err(Error::invalid(
                "preconditioner shift",
                mu,
                "must be finite and > 0",
            ));
        }
        let n = diag.len();
        let rank = rank.min(n);
        let mut d: Vec<f64> = diag.iter().map(|v| v.max(0.0)).collect();
        let trace0: f64 = d.iter().sum();
        let dmax0 = d.iter().cloned().fold(0.0, f64::max);
        let mut f = Mat::<f64>::zeros(n, rank);
        let mut k = 0usize;
        let mut uniform = super::solver::uniform_stream(seed);
        let mut g = Mat::<f64>::zeros(n, BLOCK.min(rank.max(1)));
        while k < rank {
            let total: f64 = d.iter().sum();
            if total.is_nan() || total <= rel_tol * trace0 || !total.is_finite() {
                break;
            }
            // pivots ∝ the residual diagonal (with replacement, then deduplicated)
            let mut cum = Vec::with_capacity(n);
            let mut acc = 0.0;
            for v in &d {
                acc += v;
                cum.push(acc);
            }
            let want = BLOCK.min(rank - k);
            let mut s: Vec<usize> = (0..want)
                .map(|_| {
                    let u = uniform() * acc;
                    cum.partition_point(|c| *c <= u).min(n - 1)
                })
                .collect();
            s.sort_unstable();
            s.dedup();
            // G = K[:, S] − F Fᵀ[:, S]
            let b = s.len();
            for (c, &j) in s.iter().enumerate() {
                column(j, g.col_as_slice_mut(c));
            }
            if k > 0 {
                let fs = Mat::from_fn(b, k, |i, q| f[(s[i], q)]);
                matmul(
                    g.as_mut().subcols_mut(0, b),
                    Accum::Add,
                    f.as_ref().subcols(0, k),
                    fs.transpose(),
                    -1.0,
                    Par::rayon(0),
                );
            }
            // inside the block: greedy pivots on the candidates' residual diagonal
            let mut left: Vec<usize> = (0..b).collect();
            let before = k;
            while k < rank && !left.is_empty() {
                let (pos, piv) = left
                    .iter()
                    .enumerate()
                    .map(|(p, &c)| (p, g[(s[c], c)]))
                    .fold((0, f64::NEG_INFINITY), |a, x| if x.1 > a.1 { x } else { a });
                if piv.is_nan() || piv <= 64.0 * f64::EPSILON * dmax0 {
                    break;
                }
                let c = left.swap_remove(pos);
                let inv = 1.0 / piv.sqrt();
                let fk = f.col_as_slice_mut(k);
                fk.iter_mut()
                    .zip(g.col_as_slice(c))
                    .for_each(|(a, b)| *a = b * inv);
                let fk = f.col_as_slice(k);
                for &c2 in &left {
                    let w = fk[s[c2]];
                    g.col_as_slice_mut(c2)
                        .iter_mut()
                        .zip(fk)
                        .for_each(|(a, b)| *a -= b * w);
                }
                d.iter_mut()
                    .zip(fk)
                    .for_each(|(dv, l)| *dv = (*dv - l * l).max(0.0));
                d[s[c]] = 0.0;
                k += 1;
            }
            if k == before {
                // no candidate left a residual above rounding: K is exhausted
                break;
            }
        }
        let f = f.as_ref().subcols(0, k).to_owned();
        let mut c = crate::scalar::product(f.transpose(), f.as_ref());
        for i in 0..k {
            c[(i, i)] += mu;
        }
        super::llt_in_place(c.as_mut()).map_err(|pivot| Error::NotPositiveDefinite {
            what: "μI + FᵀF of the kernel preconditioner".into(),
            pivot,
            dim: k,
            damping: mu,
            suggestion: mu * 10.0,
        })?;
        Ok(Self { f, c, mu })
    }

    /// The rank reached.
    pub(crate) fn rank(&self) -> usize {
        self.f.ncols()
    }
}

impl Preconditioner for PivotedCholesky {
    fn name(&self) -> String {
        format!("pivoted cholesky (rank {})", self.rank())
    }
    fn apply(&self, r: MatRef<'_, f64>) -> Mat<f64> {
        let (n, m) = (r.nrows(), r.ncols());
        let mut z = crate::scalar::product(self.f.transpose(), r);
        solve_lower_triangular_in_place(self.c.as_ref(), z.as_mut(), Par::rayon(0));
        solve_upper_triangular_in_place(self.c.as_ref().transpose(), z.as_mut(), Par::rayon(0));
        let mut out = r.to_owned();
        matmul(
            out.as_mut(),
            Accum::Add,
            self.f.as_ref(),
            z.as_ref(),
            -1.0,
            Par::rayon(0),
        );
        let inv = 1.0 / self.mu;
        for j in 0..m {
            for i in 0..n {
                out[(i, j)] *= inv;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// K = B Bᵀ of rank 5 (N = 40): the factor reaches rank 5 and reproduces K; the
    /// preconditioner is then the exact inverse of K + μI.
    #[test]
    fn low_rank_kernels_are_recovered_and_inverted() {
        let (n, r) = (40, 5);
        let b = Mat::from_fn(n, r, |i, j| ((i * 7 + j * 13) % 11) as f64 / 11.0 - 0.4);
        let k = &b * b.transpose();
        let diag: Vec<f64> = (0..n).map(|i| k[(i, i)]).collect();
        let col = |j: usize, out: &mut [f64]| {
            for (i, o) in out.iter_mut().enumerate() {
                *o = k[(i, j)];
            }
        };
        let mu = 0.3;
        let p = PivotedCholesky::new(&diag, col, 20, 1e-14, mu, 7).unwrap();
        assert_eq!(p.rank(), r);
        let ff = &p.f * p.f.transpose();
        let err = (0..n)
            .flat_map(|i| (0..n).map(move |j| (i, j)))
            .map(|(i, j)| (ff[(i, j)] - k[(i, j)]).abs())
            .fold(0.0, f64::max);
        assert!(err < 1e-12, "{err}");
        let mut a = k.clone();
        for i in 0..n {
            a[(i, i)] += mu;
        }
        let x = Mat::from_fn(n, 3, |i, j| (i + 2 * j) as f64 / 10.0 - 1.0);
        let y = p.apply((&a * &x).as_ref());
        let err = (0..n)
            .flat_map(|i| (0..3).map(move |j| (i, j)))
            .map(|(i, j)| (y[(i, j)] - x[(i, j)]).abs())
            .fold(0.0, f64::max);
        assert!(err < 1e-10, "{err}");
    }

    #[test]
    fn a_bad_shift_is_an_error() {
        let col = |_: usize, _: &mut [f64]| {};
        assert!(PivotedCholesky::new(&[1.0], col, 1, 0.0, 0.0, 1).is_err());
        assert!(PivotedCholesky::new(&[1.0], col, 1, 0.0, f64::NAN, 1).is_err());
    }
}
