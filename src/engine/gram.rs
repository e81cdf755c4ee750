//! Gram-matrix helpers every gradient source shares: the output check and the mirror of a
//! lower triangle. A leaf of `engine`.

use faer::{MatMut, MatRef};

use crate::error::{Error, Result};

/// Refuses a Gram matrix output that is not N×N.
pub(crate) fn check_gram_out(out: MatRef<'_, f64>, n: usize) -> Result<()> {
    if out.nrows() != n || out.ncols() != n {
        return Err(Error::shape(
            "Gram matrix output",
            format!("{n}×{n}"),
            format!("{}×{}", out.nrows(), out.ncols()),
        ));
    }
    Ok(())
}

/// Copies the lower triangle of a square matrix onto its upper triangle, in 64×64 blocks (both
/// the rows read and the columns written stay in cache).
pub(crate) fn mirror_lower(mut k: MatMut<'_, f64>) {
    let n = k.nrows();
    let b = 64;
    for j0 in (0..n).step_by(b) {
        let j1 = (j0 + b).min(n);
        for i0 in (0..j1).step_by(b) {
            let i1 = (i0 + b).min(n);
            for j in j0..j1 {
                for i in i0..i1.min(j) {
                    k[(i, j)] = k[(j, i)];
                }
            }
        }
    }
}
