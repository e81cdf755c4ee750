//! Learned Σ scales (the paper's extension): one scale s_l ≥ 0 per parameter group (each layer),
//! Σ' = S^½ Σ S^½ with S = diag(s_l on group l), fitted on held-out data so that the residuals
//! eₘ = yₘ − f(xₘ) are best explained, by Gaussian likelihood, with variance
//!
//! vₘ = ΔVar'(xₘ) + β = Σ_{l,k} √(s_l s_k) · C_lk(xₘ) + β,   C_lk(x) = g_l(x)ᵀ Σ_lk g_k(x),
//!
//! where g_l is the QoI gradient restricted to group l and Σ_lk Σ's block for groups l and k
//! ([`group_delta_variances`]). s ≡ 1 is the uncalibrated ΔVar; for a block-diagonal Σ
//! (identity, diagonal, K-FAC) C is diagonal and vₘ = Σ_l s_l · ΔVar_l(xₘ) + β, linear in s.
//! Keeping the cross-group blocks matters for a full Σ: measured on the demo's MLP with the full
//! F⁻¹/N, each layer's own block gives ΔVar_l ≈ 10–200 where the whole ΔVar is ≈ 10⁻², the
//! blocks cancelling each other almost exactly.
//!
//! The fit minimises the mean negative log-likelihood (1/M) Σₘ ½ log(2π vₘ) + eₘ²/(2vₘ) over
//! u_l = √s_l ≥ 0 and β ≥ 0 by projected Fisher scoring (Newton steps with the expected Hessian
//! ½ Σₘ ∇vₘ∇vₘᵀ/vₘ², positive semi-definite, on the parameters not held at zero; an Armijo
//! search along the projection arc), in coordinates where the errors have unit RMS and each
//! group's ΔVar_l unit mean. It starts from the best single scale (α·ΔVar + β, as
//! [`crate::metrics`] fits it), so the per-layer fit is never worse than one scale on the points
//! it is fitted on, and stops when the projected gradient vanishes (the KKT conditions).
//! Memory O(M·L²).

use std::path::Path;

use faer::{Mat, MatRef};

use crate::error::{check_finite, Error, Result};
use crate::sigma::SigmaOp;

/// A group of consecutive parameters (a layer) in the flat layout.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ParamGroup {
    /// The group's name (a layer's state-dict prefix, for example `"0"` or `"layers.1"`).
    pub name: String,
    /// Offset of its first parameter in the flat layout.
    pub offset: usize,
    /// Number of parameters.
    pub len: usize,
}

/// Groups consecutive tensors of a flat layout by their name up to the last `.` (so `0.weight`
/// and `0.bias` form the group `0`): one group per layer.
///
/// ```
/// use deltavar::calibration::layer_groups;
/// let g = layer_groups(&[("0.weight", 6), ("0.bias", 2), ("2.weight", 2), ("2.bias", 1)]);
/// assert_eq!(g.len(), 2);
/// assert_eq!((g[1].name.as_str(), g[1].offset, g[1].len), ("2", 8, 3));
/// ```
pub fn layer_groups<S: AsRef<str>>(tensors: &[(S, usize)]) -> Vec<ParamGroup> {
    let mut out: Vec<ParamGroup> = Vec::new();
    let mut offset = 0;
    for (name, len) in tensors {
        let name = name.as_ref();
        let prefix = name.rsplit_once('.').map(|(p, _)| p).unwrap_or(name);
        match out.last_mut() {
            Some(g) if g.name == prefix => g.len += len,
            _ => out.push(ParamGroup {
                name: prefix.to_string(),
                offset,
                len: *len,
            }),
        }
        offset += len;
    }
    out
}

/// Checks that groups tile 0..P in order.
fn check_groups(groups: &[ParamGroup], p: usize) -> Result<()> {
    let mut at = 0;
    for g in groups {
        if g.offset != at || g.len == 0 {
            return Err(Error::invalid(
                format!("parameter group '{}'", g.name),
                format!("offset {}, length {}", g.offset, g.len),
                format!("groups must be non-empty and tile the parameters in order (expected offset {at})"),
            ));
        }
        at += g.len;
    }
    if at != p {
        return Err(Error::shape("parameter groups (total size)", p, at));
    }
    Ok(())
}

/// C_lk(zₘ) = g_l(zₘ)ᵀ Σ_lk g_k(zₘ) for every query (column of the P×M block `qoi_gradients`)
/// and pair of groups: M row-major L×L matrices (symmetric; their entries sum to ΔVar(zₘ), the
/// diagonal holds each group's own ΔVar_l). Costs L applications of Σ to P×M blocks (L
/// quadratic forms for a diagonal Σ, whose cross blocks are zero). Needs [`SigmaOp::apply`]
/// for a non-diagonal Σ (a [`crate::sigma::CustomSigma`] only has quadratic forms).
pub fn group_delta_variances(
    qoi_gradients: MatRef<'_, f64>,
    sigma: &dyn SigmaOp,
    groups: &[ParamGroup],
) -> Result<Vec<Vec<f64>>> {
    let (p, m) = (qoi_gradients.nrows(), qoi_gradients.ncols());
    check_groups(groups, p)?;
    let l = groups.len();
    let mut out = vec![vec![0.0; l * l]; m];
    let masked = |g: &ParamGroup| {
        Mat::from_fn(p, m, |i, j| {
            if i >= g.offset && i < g.offset + g.len {
                qoi_gradients[(i, j)]
            } else {
                0.0
            }
        })
    };
    let diagonal = sigma.diagonal().is_some();
    for (a, ga) in groups.iter().enumerate() {
        let ma = masked(ga);
        if diagonal {
            let v = sigma.quad_forms(ma.as_ref())?;
            for (row, x) in out.iter_mut().zip(v) {
                row[a * l + a] = x;
            }
            continue;
        }
        let sa = sigma.apply(ma.as_ref())?;
        for (j, row) in out.iter_mut().enumerate() {
            for (b, gb) in groups.iter().enumerate() {
                let c: f64 = (gb.offset..gb.offset + gb.len)
                    .map(|i| qoi_gradients[(i, j)] * sa[(i, j)])
                    .sum();
                // each cross entry is computed twice (from a's and from b's side): average
                if b == a {
                    row[a * l + a] = c;
                } else {
                    row[b * l + a] += 0.5 * c;
                    row[a * l + b] += 0.5 * c;
                }
            }
        }
    }
    for (j, row) in out.iter().enumerate() {
        check_finite(&format!("per-group delta variances of query {j}"), row)?;
    }
    Ok(out)
}

/// Σ_lk √(s_l s_k) C_lk for one L×L block.
fn scaled_form(c: &[f64], u: &[f64]) -> f64 {
    let l = u.len();
    let mut v = 0.0;
    for a in 0..l {
        for b in 0..l {
            v += u[a] * u[b] * c[a * l + b];
        }
    }
    v
}

/// The fitted scales, as `calibrate` writes them (JSON).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Calibration {
    /// The groups, in the model's parameter order.
    pub groups: Vec<ParamGroup>,
    /// s_l ≥ 0, one per group.
    pub scales: Vec<f64>,
    /// β ≥ 0, the variance no group explains.
    pub beta: f64,
    /// The mean NLL at the fit.
    pub nll: f64,
    /// Held-out points it was fitted on.
    pub num_points: usize,
    /// The Σ it was fitted for (its report name).
    pub sigma: String,
    /// EM iterations run.
    pub iterations: usize,
    /// Whether the fit met its tolerance (false: stopped at the iteration cap).
    pub converged: bool,
}

impl Calibration {
    /// Σ_lk √(s_l s_k) C_lk for each query's L×L block from [`group_delta_variances`]: the
    /// calibrated delta variance, gᵀ S^½ Σ S^½ g (β is not added, see
    /// [`Calibration::predictive_variances`]).
    pub fn apply(&self, blocks: &[Vec<f64>]) -> Result<Vec<f64>> {
        let l = self.scales.len();
        let u: Vec<f64> = self.scales.iter().map(|s| s.sqrt()).collect();
        blocks
            .iter()
            .enumerate()
            .map(|(m, c)| {
                if c.len() != l * l {
                    return Err(Error::shape(
                        format!("per-group delta variances of query {m} (L×L)"),
                        l * l,
                        c.len(),
                    ));
                }
                Ok(scaled_form(c, &u).max(0.0))
            })
            .collect()
    }

    /// The calibrated delta variance + β: the variance of a held-out residual under the fit.
    pub fn predictive_variances(&self, blocks: &[Vec<f64>]) -> Result<Vec<f64>> {
        Ok(self
            .apply(blocks)?
            .into_iter()
            .map(|v| v + self.beta)
            .collect())
    }

    /// Checks these scales were fitted for a model with the same groups.
    pub fn check_groups(&self, groups: &[ParamGroup]) -> Result<()> {
        if self.groups != groups {
            let show = |g: &[ParamGroup]| {
                g.iter()
                    .map(|g| format!("{}:{}", g.name, g.len))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            return Err(Error::invalid(
                "calibration groups",
                show(&self.groups),
                format!(
                    "the model's groups are {}; fit the calibration for this model",
                    show(groups)
                ),
            ));
        }
        Ok(())
    }

    /// Writes the calibration as JSON.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let s = serde_json::to_string_pretty(self)
            .map_err(|e| Error::Unsupported(format!("serialising the calibration: {e}")))?;
        std::fs::write(path, s).map_err(|e| Error::Io {
            path: path.display().to_string(),
            source: e,
        })
    }

    /// Reads a calibration written by [`Calibration::save`], checking its values.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let s = std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        let bad = |detail: String| Error::BadFile {
            path: path.display().to_string(),
            detail,
        };
        let c: Calibration =
            serde_json::from_str(&s).map_err(|e| bad(format!("not a calibration file: {e}")))?;
        if c.scales.len() != c.groups.len() {
            return Err(bad(format!(
                "{} scales for {} groups",
                c.scales.len(),
                c.groups.len()
            )));
        }
        if let Some(v) = c
            .scales
            .iter()
            .chain([&c.beta])
            .find(|v| !(v.is_finite() && **v >= 0.0))
        {
            return Err(bad(format!(
                "scales and beta must be finite and ≥ 0, found {v}"
            )));
        }
        let total = c.groups.iter().map(|g| g.len).sum::<usize>();
        check_groups(&c.groups, total).map_err(|e| bad(e.to_string()))?;
        Ok(c)
    }
}

/// Options of [`fit_calibration`].
#[derive(Debug, Clone)]
pub struct CalibrationOptions {
    /// Converged when the projected gradient of the mean NLL (errors scaled to unit RMS, each
    /// group's ΔVar to unit mean) is below √tol/100 in every coordinate. Default 1e-12 (1e-8).
    pub tol: f64,
    /// Iteration cap (scoring steps). Default 500.
    pub max_iter: usize,
}

impl Default for CalibrationOptions {
    fn default() -> Self {
        Self {
            tol: 1e-12,
            max_iter: 500,
        }
    }
}

/// The fit in normalised coordinates: errors divided by their RMS, each group's block scaled
/// so that its own ΔVar_l has unit mean. Parameters θ = (u_1..u_L, β).
struct Problem {
    sq: Vec<f64>,
    /// M row-major L×L blocks, normalised.
    c: Vec<Vec<f64>>,
    l: usize,
}

impl Problem {
    fn var(&self, th: &[f64], m: usize) -> f64 {
        scaled_form(&self.c[m], &th[..self.l]) + th[self.l]
    }

    fn nll(&self, th: &[f64]) -> f64 {
        let mut s = 0.0;
        for (m, e2) in self.sq.iter().enumerate() {
            let v = self.var(th, m);
            if v <= 0.0 {
                if *e2 == 0.0 {
                    continue;
                }
                return f64::INFINITY;
            }
            s += 0.5 * (2.0 * std::f64::consts::PI * v).ln() + e2 / (2.0 * v);
        }
        s / self.sq.len() as f64
    }

    /// The gradient and the Fisher information (the expected Hessian, positive semi-definite)
    /// of the mean NLL: ∂v/∂u = 2Cu, ∂v/∂β = 1.
    fn grad_info(&self, th: &[f64]) -> (Vec<f64>, Mat<f64>) {
        let (l, w) = (self.l, self.l + 1);
        let mut g = vec![0.0; w];
        let mut h = Mat::<f64>::zeros(w, w);
        let mut dv = vec![0.0; w];
        for (m, e2) in self.sq.iter().enumerate() {
            let v = self.var(th, m);
            if v <= 0.0 {
                continue;
            }
            let c = &self.c[m];
            for a in 0..l {
                dv[a] = 2.0 * (0..l).map(|b| c[a * l + b] * th[b]).sum::<f64>();
            }
            dv[l] = 1.0;
            let cg = 0.5 / v - 0.5 * e2 / (v * v);
            let ch = 0.5 / (v * v);
            for j in 0..w {
                g[j] += dv[j] * cg;
                for k in 0..=j {
                    h[(j, k)] += dv[j] * dv[k] * ch;
                }
            }
        }
        let inv = 1.0 / self.sq.len() as f64;
        for j in 0..w {
            g[j] *= inv;
            for k in 0..=j {
                h[(j, k)] *= inv;
                h[(k, j)] = h[(j, k)];
            }
        }
        (g, h)
    }
}

/// Solves H_FF d = −g_F on the free set, with a ridge if H_FF is singular.
fn newton_direction(h: &Mat<f64>, g: &[f64], free: &[usize]) -> Vec<f64> {
    let f = free.len();
    let mut d = vec![0.0; g.len()];
    if f == 0 {
        return d;
    }
    let tr: f64 = free.iter().map(|&j| h[(j, j)]).sum::<f64>() / f as f64;
    let mut ridge = 0.0;
    for _ in 0..30 {
        let hf = Mat::from_fn(f, f, |a, b| {
            h[(free[a], free[b])] + if a == b { ridge } else { 0.0 }
        });
        if let Ok(llt) = hf.llt(faer::Side::Lower) {
            let rhs = Mat::from_fn(f, 1, |a, _| -g[free[a]]);
            let x = faer::linalg::solvers::Solve::solve(&llt, &rhs);
            if (0..f).all(|a| x[(a, 0)].is_finite()) {
                for (a, &j) in free.iter().enumerate() {
                    d[j] = x[(a, 0)];
                }
                return d;
            }
        }
        ridge = if ridge == 0.0 {
            1e-12 * tr.max(f64::MIN_POSITIVE)
        } else {
            ridge * 10.0
        };
    }
    // steepest descent as the last resort
    for &j in free {
        d[j] = -g[j];
    }
    d
}

/// Fits s_l, β ≥ 0 (see the module docs) to held-out errors `errors` (M) and the per-query
/// L×L blocks `blocks` of [`group_delta_variances`] for the groups `groups` of Σ `sigma_name`.
///
/// ```
/// use deltavar::calibration::{fit_calibration, layer_groups, CalibrationOptions};
/// // two groups, a block-diagonal Σ (diagonal blocks); the errors follow group 0's ΔVar ×4
/// let rows: Vec<Vec<f64>> = (0..400)
///     .map(|i| vec![0.1 + (i % 7) as f64, 0.0, 0.0, (i % 5) as f64]).collect();
/// let e: Vec<f64> = rows.iter().enumerate()
///     .map(|(i, r)| (4.0 * r[0]).sqrt() * if i % 2 == 0 { 1.0 } else { -1.0 }).collect();
/// let groups = layer_groups(&[("0.weight", 3), ("1.weight", 2)]);
/// let c = fit_calibration(&e, &rows, &groups, "diag", &CalibrationOptions::default()).unwrap();
/// assert!((c.scales[0] - 4.0).abs() < 1e-6 && c.scales[1] < 1e-6 && c.beta < 1e-6);
/// ```
pub fn fit_calibration(
    errors: &[f64],
    blocks: &[Vec<f64>],
    groups: &[ParamGroup],
    sigma_name: &str,
    opts: &CalibrationOptions,
) -> Result<Calibration> {
    let m = errors.len();
    let l = groups.len();
    if m == 0 {
        return Err(Error::invalid(
            "held-out errors",
            "empty",
            "the calibration needs at least one held-out point",
        ));
    }
    if blocks.len() != m {
        return Err(Error::shape(
            "per-group delta variances (one L×L block per held-out point)",
            m,
            blocks.len(),
        ));
    }
    check_finite("held-out errors", errors)?;
    for (i, c) in blocks.iter().enumerate() {
        if c.len() != l * l {
            return Err(Error::shape(
                format!("per-group delta variances of point {i} (L×L)"),
                l * l,
                c.len(),
            ));
        }
        check_finite(&format!("per-group delta variances of point {i}"), c)?;
        if let Some(a) = (0..l).find(|&a| c[a * l + a] < 0.0) {
            return Err(Error::invalid(
                format!("delta variance of group {a} at point {i}"),
                c[a * l + a],
                "must be ≥ 0 (Σ positive semi-definite)",
            ));
        }
    }
    let total: usize = groups.iter().map(|g| g.len).sum();
    check_groups(groups, total)?;
    let mean_sq = errors.iter().map(|e| e * e).sum::<f64>() / m as f64;
    if mean_sq == 0.0 {
        return Err(Error::invalid(
            "held-out errors",
            "all zero",
            "the Gaussian likelihood has no minimum when every error is zero",
        ));
    }
    // normalise: errors by their RMS, group a's rows and columns by √(mean C_aa)
    let mean_diag: Vec<f64> = (0..l)
        .map(|a| blocks.iter().map(|c| c[a * l + a]).sum::<f64>() / m as f64)
        .collect();
    let live: Vec<bool> = mean_diag.iter().map(|d| *d > 0.0).collect();
    let norm: Vec<f64> = mean_diag
        .iter()
        .map(|d| if *d > 0.0 { 1.0 / d.sqrt() } else { 0.0 })
        .collect();
    let pr = Problem {
        sq: errors.iter().map(|e| e * e / mean_sq).collect(),
        c: blocks
            .iter()
            .map(|c| {
                (0..l * l)
                    .map(|i| c[i] * norm[i / l] * norm[i % l])
                    .collect()
            })
            .collect(),
        l,
    };
    // start from the best single scale: u = √α·(1/norm), β (metrics' profile fit)
    let total_v: Vec<f64> = blocks
        .iter()
        .map(|c| c.iter().sum::<f64>().max(0.0))
        .collect();
    let (alpha, beta0) = match crate::metrics::uncertainty_metrics(errors, &total_v) {
        Ok(one) => (one.alpha / mean_sq, one.beta / mean_sq),
        Err(_) => (0.0, 0.5),
    };
    let mut th: Vec<f64> = (0..=l)
        .map(|j| match (j == l, j < l && live[j]) {
            (true, _) => beta0,
            (false, true) => alpha.sqrt() / norm[j],
            (false, false) => 0.0,
        })
        .collect();
    if th[..l].iter().all(|u| *u == 0.0) {
        // α = 0 is a saddle of the u-parametrisation (∂v/∂u = 2Cu = 0): step off it
        for j in 0..l {
            if live[j] {
                th[j] = 0.1;
            }
        }
        th[l] = th[l].max(0.5);
    }
    let width = l + 1;
    let free_ok = |j: usize| j == l || live[j];
    let mut f = pr.nll(&th);
    let mut converged = false;
    let mut it = 0;
    // projected Fisher scoring with an Armijo search along the projection arc
    while it < opts.max_iter {
        it += 1;
        let (g, h) = pr.grad_info(&th);
        let free: Vec<usize> = (0..width)
            .filter(|&j| free_ok(j) && (th[j] > 0.0 || g[j] < 0.0))
            .collect();
        // optimality: zero gradient on the free set, a non-negative one at the bound
        let kkt = (0..width)
            .filter(|&j| free_ok(j))
            .map(|j| {
                if th[j] > 0.0 {
                    g[j].abs()
                } else {
                    (-g[j]).max(0.0)
                }
            })
            .fold(0.0, f64::max);
        if kkt <= opts.tol.sqrt() * 1e-2 {
            converged = true;
            break;
        }
        let d = newton_direction(&h, &g, &free);
        let mut t = 1.0;
        let mut accepted = None;
        while t > 1e-20 {
            let cand: Vec<f64> = (0..width)
                .map(|j| {
                    if free_ok(j) {
                        (th[j] + t * d[j]).max(0.0)
                    } else {
                        0.0
                    }
                })
                .collect();
            let fc = pr.nll(&cand);
            let decrease: f64 = (0..width).map(|j| g[j] * (cand[j] - th[j])).sum();
            if fc.is_finite() && fc <= f + 1e-4 * decrease {
                accepted = Some((cand, fc));
                break;
            }
            t *= 0.5;
        }
        let Some((cand, fc)) = accepted else {
            // no descent left at this precision: the gradient test above is the honest report
            break;
        };
        th = cand;
        f = fc;
    }
    if !f.is_finite() {
        return Err(Error::invalid(
            "per-group delta variances",
            "degenerate",
            "no scales give a finite likelihood",
        ));
    }
    // undo the normalisation: s_a = (u_a·norm_a)²·mean_sq
    let scales: Vec<f64> = (0..l)
        .map(|a| {
            if live[a] {
                (th[a] * norm[a]).powi(2) * mean_sq
            } else {
                0.0
            }
        })
        .collect();
    Ok(Calibration {
        groups: groups.to_vec(),
        scales,
        beta: th[l] * mean_sq,
        nll: f + 0.5 * mean_sq.ln(),
        num_points: m,
        sigma: sigma_name.to_string(),
        iterations: it,
        converged,
    })
}

/// The mean Gaussian NLL of errors under the calibrated variances (+ β), to compare fits.
pub fn calibrated_nll(errors: &[f64], blocks: &[Vec<f64>], c: &Calibration) -> Result<f64> {
    let v = c.predictive_variances(blocks)?;
    if v.len() != errors.len() {
        return Err(Error::shape("errors", v.len(), errors.len()));
    }
    let mut s = 0.0;
    for (e, v) in errors.iter().zip(&v) {
        if *v <= 0.0 {
            if *e == 0.0 {
                continue;
            }
            return Ok(f64::INFINITY);
        }
        s += 0.5 * (2.0 * std::f64::consts::PI * v).ln() + e * e / (2.0 * v);
    }
    Ok(s / errors.len() as f64)
}
