//! How well delta variances rank and size the errors of a model on held-out data: correlations,
//! the removal curve, and a calibrated Gaussian likelihood (the paper's evaluation).
//!
//! Inputs: the errors eᵢ = yᵢ − f(xᵢ) and the variances vᵢ ≥ 0 of M points.
//!
//! - `pearson`: Pearson correlation of |e| and √v; `spearman`: Spearman correlation of |e| and v
//!   (tied values get the average of their ranks). `None` when a side is constant (undefined).
//! - `removal_auc`: sort the points by v descending (ties by index); for k = 0..M−1, MSE_k is the
//!   mean of e² over the points left after removing the first k; removal_auc = (1/M) Σ_k
//!   MSE_k / mean(e²) (≈ 1 for an uninformative v, lower is better). `removal_auc_oracle`: the
//!   same for the order by e² (the best any v can do).
//! - `alpha`, `beta` ≥ 0 minimising the mean Gaussian NLL ½ log(2π(αv+β)) + e²/(2(αv+β)), and
//!   that minimum `nll`. For a fixed ratio α : β the best scale has a closed form, so the fit
//!   is a one-dimensional search over the ratio (a grid, then golden-section refinement).

use crate::error::{Error, Result};

/// The metrics of one set of errors and variances.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct UncertaintyMetrics {
    /// M.
    pub m: usize,
    /// Pearson correlation of |e| and √v (`None` when either is constant).
    pub pearson: Option<f64>,
    /// Spearman correlation of |e| and v, average ranks for ties (`None` when either is
    /// constant).
    pub spearman: Option<f64>,
    /// Area under the normalised removal curve, points removed by v descending.
    pub removal_auc: f64,
    /// The same, points removed by e² descending (the oracle).
    pub removal_auc_oracle: f64,
    /// α ≥ 0 of the fitted variance αv + β.
    pub alpha: f64,
    /// β ≥ 0 of the fitted variance αv + β.
    pub beta: f64,
    /// The mean Gaussian NLL at (α, β).
    pub nll: f64,
}

/// One line: `M points: spearman …, pearson …, removal AUC … (oracle …), alpha …, beta …,
/// NLL …` (`undefined` for a correlation of a constant side).
impl std::fmt::Display for UncertaintyMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let opt = |x: Option<f64>| {
            x.map(|v| format!("{v:.4}"))
                .unwrap_or_else(|| "undefined".into())
        };
        write!(
            f,
            "{} points: spearman {}, pearson {}, removal AUC {:.4} (oracle {:.4}), alpha {:.4e}, beta {:.4e}, NLL {:.4}",
            self.m,
            opt(self.spearman),
            opt(self.pearson),
            self.removal_auc,
            self.removal_auc_oracle,
            self.alpha,
            self.beta,
            self.nll
        )
    }
}

fn check(errors: &[f64], variances: &[f64]) -> Result<()> {
    if errors.len() != variances.len() {
        return Err(Error::shape(
            "errors and variances (one each per point)",
            errors.len(),
            variances.len(),
        ));
    }
    if errors.is_empty() {
        return Err(Error::invalid("errors", "empty", "need at least one point"));
    }
    if let Some(i) = errors.iter().position(|e| !e.is_finite()) {
        return Err(Error::NonFinite {
            what: "errors".into(),
            detail: format!("point {i} is {}", errors[i]),
        });
    }
    if let Some(i) = variances.iter().position(|v| !v.is_finite() || *v < 0.0) {
        return Err(Error::invalid(
            format!("variance of point {i}"),
            variances[i],
            "variances must be finite and >= 0",
        ));
    }
    Ok(())
}

/// Pearson correlation, `None` when either side is constant.
fn pearson(a: &[f64], b: &[f64]) -> Option<f64> {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        let (dx, dy) = (x - ma, y - mb);
        sab += dx * dy;
        saa += dx * dx;
        sbb += dy * dy;
    }
    if saa <= 0.0 || sbb <= 0.0 {
        return None;
    }
    Some((sab / (saa.sqrt() * sbb.sqrt())).clamp(-1.0, 1.0))
}

/// Ranks 1..=M with ties given the average of their ranks.
pub fn average_ranks(x: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..x.len()).collect();
    order.sort_by(|&i, &j| x[i].total_cmp(&x[j]));
    let mut ranks = vec![0.0; x.len()];
    let mut k = 0;
    while k < order.len() {
        let mut e = k;
        while e + 1 < order.len() && x[order[e + 1]] == x[order[k]] {
            e += 1;
        }
        // positions k..=e (0-based) share the mean rank ((k+1) + (e+1)) / 2
        let r = (k + e) as f64 / 2.0 + 1.0;
        for &i in &order[k..=e] {
            ranks[i] = r;
        }
        k = e + 1;
    }
    ranks
}

/// MSE_k / mean(e²) for k = 0..M−1, the points removed in `order` (all 1 when every error is 0).
fn curve(sq: &[f64], order: &[usize]) -> Vec<f64> {
    let m = sq.len();
    let total: f64 = sq.iter().sum();
    if total <= 0.0 {
        return vec![1.0; m];
    }
    let mean_all = total / m as f64;
    let mut out = Vec::with_capacity(m);
    let mut left = total;
    for (k, &i) in order.iter().enumerate() {
        out.push(left / (m - k) as f64 / mean_all);
        left = (left - sq[i]).max(0.0);
    }
    out
}

/// (1/M) Σ_k MSE_k / mean(e²) with the points removed in `order`.
fn removal_auc(sq: &[f64], order: &[usize]) -> f64 {
    curve(sq, order).iter().sum::<f64>() / sq.len() as f64
}

/// Indices sorted by `key` descending, ties by index.
fn descending(key: &[f64]) -> Vec<usize> {
    let mut o: Vec<usize> = (0..key.len()).collect();
    o.sort_by(|&i, &j| key[j].total_cmp(&key[i]));
    o
}

/// The removal curves: MSE_k / mean(e²) for k = 0..M−1 with the points removed by `v`
/// descending, and by e² descending (the oracle). Their means are `removal_auc` and
/// `removal_auc_oracle`.
pub fn removal_curves(e: &[f64], v: &[f64]) -> Result<(Vec<f64>, Vec<f64>)> {
    check(e, v)?;
    let sq: Vec<f64> = e.iter().map(|x| x * x).collect();
    Ok((curve(&sq, &descending(v)), curve(&sq, &descending(&sq))))
}

/// The mean NLL of variances c·wᵢ with the best c = mean(e²/w), or None when some w is zero
/// with a nonzero error (infinite NLL).
fn profile_nll(sq: &[f64], w: &[f64]) -> Option<(f64, f64)> {
    let m = sq.len() as f64;
    let mut c = 0.0;
    for (s, wi) in sq.iter().zip(w) {
        if *wi <= 0.0 {
            if *s > 0.0 {
                return None;
            }
            continue;
        }
        c += s / wi;
    }
    c /= m;
    if c <= 0.0 {
        return None;
    }
    let mut nll = 0.0;
    for (s, wi) in sq.iter().zip(w) {
        let var = c * wi;
        if var <= 0.0 {
            // a zero-error point at zero variance: its density is degenerate; leave it out
            continue;
        }
        nll += 0.5 * (2.0 * std::f64::consts::PI * var).ln() + s / (2.0 * var);
    }
    Some((nll / m, c))
}

/// Fits α, β ≥ 0 by the profile over ρ = the share of αv in the variance (see the module docs).
fn fit_gaussian(sq: &[f64], v: &[f64]) -> Result<(f64, f64, f64)> {
    if sq.iter().all(|s| *s == 0.0) {
        return Err(Error::invalid(
            "errors",
            "all zero",
            "the Gaussian likelihood has no minimum when every error is zero",
        ));
    }
    let vbar = v.iter().sum::<f64>() / v.len() as f64;
    if vbar <= 0.0 {
        // every variance is zero: only β can explain the errors
        let (nll, c) = profile_nll(sq, &vec![1.0; sq.len()]).unwrap_or((f64::INFINITY, 0.0));
        return Ok((0.0, c, nll));
    }
    let at = |rho: f64| -> Option<(f64, f64)> {
        let w: Vec<f64> = v.iter().map(|vi| rho * vi / vbar + (1.0 - rho)).collect();
        profile_nll(sq, &w)
    };
    let score = |rho: f64| at(rho).map(|p| p.0).unwrap_or(f64::INFINITY);
    let grid = 200;
    let (mut best_k, mut best) = (0usize, f64::INFINITY);
    for k in 0..=grid {
        let s = score(k as f64 / grid as f64);
        if s < best {
            best = s;
            best_k = k;
        }
    }
    if !best.is_finite() {
        return Err(Error::invalid(
            "variances",
            "degenerate",
            "no α, β ≥ 0 give a finite likelihood",
        ));
    }
    // golden-section refinement around the best grid point
    let (mut lo, mut hi) = (
        (best_k.saturating_sub(1)) as f64 / grid as f64,
        ((best_k + 1).min(grid)) as f64 / grid as f64,
    );
    let g = (5f64.sqrt() - 1.0) / 2.0;
    let (mut a, mut b) = (hi - g * (hi - lo), lo + g * (hi - lo));
    let (mut fa, mut fb) = (score(a), score(b));
    for _ in 0..80 {
        if fa < fb {
            hi = b;
            b = a;
            fb = fa;
            a = hi - g * (hi - lo);
            fa = score(a);
        } else {
            lo = a;
            a = b;
            fa = fb;
            b = lo + g * (hi - lo);
            fb = score(b);
        }
    }
    let mut rho = best_k as f64 / grid as f64;
    for cand in [a, b] {
        if score(cand) < score(rho) {
            rho = cand;
        }
    }
    let (nll, c) = at(rho).ok_or_else(|| {
        Error::invalid(
            "variances",
            "degenerate",
            "the fitted likelihood is infinite",
        )
    })?;
    Ok((c * rho / vbar, c * (1.0 - rho), nll))
}

/// All the metrics of errors `e` and variances `v` (see the module docs).
///
/// ```
/// use deltavar::metrics::uncertainty_metrics;
/// let e = [0.1, -2.0, 0.5, 1.0];
/// let v = [0.02, 3.0, 0.2, 1.1];
/// let m = uncertainty_metrics(&e, &v).unwrap();
/// assert!(m.spearman.unwrap() > 0.99);            // v ranks |e| perfectly
/// assert!(m.removal_auc < 1.0);                   // removing high-v points lowers the error
/// assert!(m.alpha >= 0.0 && m.beta >= 0.0);
/// ```
pub fn uncertainty_metrics(e: &[f64], v: &[f64]) -> Result<UncertaintyMetrics> {
    check(e, v)?;
    let abs: Vec<f64> = e.iter().map(|x| x.abs()).collect();
    let sd: Vec<f64> = v.iter().map(|x| x.sqrt()).collect();
    let sq: Vec<f64> = e.iter().map(|x| x * x).collect();
    let spearman = pearson(&average_ranks(&abs), &average_ranks(v));
    let (alpha, beta, nll) = fit_gaussian(&sq, v)?;
    Ok(UncertaintyMetrics {
        m: e.len(),
        pearson: pearson(&abs, &sd),
        spearman,
        removal_auc: removal_auc(&sq, &descending(v)),
        removal_auc_oracle: removal_auc(&sq, &descending(&sq)),
        alpha,
        beta,
        nll,
    })
}

/// The held-out errors eᵢ = targetᵢ − QoI valueᵢ of a scalar QoI at M held-out points, the
/// targets read from `targets` (an `.npy` file or an array in memory): column K for `output:K`, the row's sum for
/// `sum`, 1[y = K] for `prob:K` (class labels, shape (M,)). What `evaluate` and `calibrate`
/// score ΔVar against.
pub fn held_out_errors(
    qoi: &crate::qoi::Qoi,
    targets: &crate::data::NpyArray,
    values: &[f64],
) -> Result<Vec<f64>> {
    let t = qoi_targets(qoi, targets, values.len())?;
    Ok(t.iter().zip(values).map(|(y, f)| y - f).collect())
}

/// The QoI's target per held-out point: y[:, k] for output:K, Σ_k y[:, k] for sum, 1[y = k] for
/// prob:K (class labels).
fn qoi_targets(qoi: &crate::qoi::Qoi, a: &crate::data::NpyArray, m: usize) -> Result<Vec<f64>> {
    use crate::data::RowsRef;
    let path = a.path();
    let bad = |detail: String| Error::BadFile {
        path: path.display().to_string(),
        detail,
    };
    if a.rows() != m {
        return Err(bad(format!(
            "{} rows, the held-out inputs have {m}",
            a.rows()
        )));
    }
    let w = a.row_len();
    if w == 0 {
        return Err(bad("rows of zero values: no targets".into()));
    }
    let vals: Vec<f64> = match a.rows_ref(0, a.rows())? {
        RowsRef::F32(v) => v.iter().map(|x| *x as f64).collect(),
        RowsRef::F64(v) => v.to_vec(),
        RowsRef::I64(v) => v.iter().map(|x| *x as f64).collect(),
    };
    if let Some(i) = vals.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            what: format!("targets {}", path.display()),
            detail: format!("row {}, column {} is {}", i / w, i % w, vals[i]),
        });
    }
    match qoi {
        crate::qoi::Qoi::Output(k) if *k < w => Ok((0..m).map(|i| vals[i * w + k]).collect()),
        crate::qoi::Qoi::Output(k) => Err(bad(format!(
            "output:{k} needs targets with more than {k} columns, these have {w}"
        ))),
        crate::qoi::Qoi::Sum => Ok(vals.chunks_exact(w).map(|r| r.iter().sum()).collect()),
        crate::qoi::Qoi::Prob(k) if w == 1 => Ok(vals
            .iter()
            .map(|y| if *y == *k as f64 { 1.0 } else { 0.0 })
            .collect()),
        crate::qoi::Qoi::Prob(_) => Err(bad(format!(
            "prob:K needs class labels (M,), these rows have {w} values"
        ))),
        crate::qoi::Qoi::Custom(_) => Err(Error::Unsupported(
            "evaluate: a custom QoI has no target".into(),
        )),
    }
}
