//! Uncertainty-quality metrics against their direct formulas on small arrays: ties, zero
//! variances, the oracle order, the Gaussian fit against a brute-force grid, bad inputs, and the
//! `deltavar metrics` command.

mod common;

use deltavar::metrics::{average_ranks, uncertainty_metrics};

fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va * vb).sqrt()
}

/// rank_i = 1 + #{x_j < x_i} + (#{x_j = x_i} − 1)/2
fn ranks_direct(x: &[f64]) -> Vec<f64> {
    x.iter()
        .map(|xi| {
            let less = x.iter().filter(|y| *y < xi).count() as f64;
            let same = x.iter().filter(|y| *y == xi).count() as f64;
            1.0 + less + (same - 1.0) / 2.0
        })
        .collect()
}

fn removal_direct(e: &[f64], key: &[f64]) -> f64 {
    let m = e.len();
    let mut order: Vec<usize> = (0..m).collect();
    // descending, ties by index
    order.sort_by(|&i, &j| key[j].partial_cmp(&key[i]).unwrap().then(i.cmp(&j)));
    let mean_all = e.iter().map(|x| x * x).sum::<f64>() / m as f64;
    let mut s = 0.0;
    for k in 0..m {
        let left = &order[k..];
        let mse = left.iter().map(|&i| e[i] * e[i]).sum::<f64>() / left.len() as f64;
        s += mse / mean_all;
    }
    s / m as f64
}

fn nll(e: &[f64], v: &[f64], a: f64, b: f64) -> f64 {
    e.iter()
        .zip(v)
        .map(|(ei, vi)| {
            let s = a * vi + b;
            0.5 * (2.0 * std::f64::consts::PI * s).ln() + ei * ei / (2.0 * s)
        })
        .sum::<f64>()
        / e.len() as f64
}

fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * (1.0 + b.abs())
}

#[test]
fn metrics_match_the_direct_formulas_with_ties_and_zero_variances() {
    let e = [0.3, -1.2, 0.3, 2.5, -0.05, 0.8, -0.8, 1.7, 0.0, -0.3];
    let v = [0.1, 1.0, 0.1, 0.0, 0.01, 0.5, 0.5, 2.0, 0.0, 0.1];
    let m = uncertainty_metrics(&e, &v).unwrap();
    let abs: Vec<f64> = e.iter().map(|x: &f64| x.abs()).collect();
    let sd: Vec<f64> = v.iter().map(|x: &f64| x.sqrt()).collect();
    assert_eq!(average_ranks(&abs), ranks_direct(&abs));
    assert_eq!(average_ranks(&v), ranks_direct(&v));
    assert!(close(m.pearson.unwrap(), pearson(&abs, &sd), 1e-12));
    assert!(close(
        m.spearman.unwrap(),
        pearson(&ranks_direct(&abs), &ranks_direct(&v)),
        1e-12
    ));
    assert!(close(m.removal_auc, removal_direct(&e, &v), 1e-12));
    let sq: Vec<f64> = e.iter().map(|x| x * x).collect();
    assert!(close(m.removal_auc_oracle, removal_direct(&e, &sq), 1e-12));
    assert!(m.removal_auc_oracle <= m.removal_auc + 1e-12);
    // the fit: (α, β) ≥ 0 and no point of a fine grid does better
    assert!(m.alpha >= 0.0 && m.beta >= 0.0);
    assert!(close(m.nll, nll(&e, &v, m.alpha, m.beta), 1e-12));
    let mut best = f64::INFINITY;
    for i in 0..=300 {
        for j in 1..=300 {
            let a = if i == 0 {
                0.0
            } else {
                10f64.powf(-4.0 + 6.0 * i as f64 / 300.0)
            };
            let b = 10f64.powf(-4.0 + 6.0 * j as f64 / 300.0);
            best = best.min(nll(&e, &v, a, b));
        }
    }
    assert!(m.nll <= best + 1e-9, "fit {} vs grid {best}", m.nll);
}

#[test]
fn calibrated_variances_fit_alpha_near_one_and_rank_the_errors() {
    // e ~ N(0, v) with v spread over two decades
    let z = common::pseudo_random(4000, 3);
    let n = 2000;
    let v: Vec<f64> = (0..n)
        .map(|i| 0.01 + 2.0 * (i as f64 / n as f64).powi(2))
        .collect();
    // Box–Muller from pairs of uniforms in (0, 1)
    let u = |x: f64| (x.abs().fract()).clamp(1e-9, 1.0 - 1e-9);
    let e: Vec<f64> = (0..n)
        .map(|i| {
            let (u1, u2) = (u(z[2 * i] * 7.31), u(z[2 * i + 1] * 3.17));
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * v[i].sqrt()
        })
        .collect();
    let m = uncertainty_metrics(&e, &v).unwrap();
    assert!((m.alpha - 1.0).abs() < 0.15, "alpha {}", m.alpha);
    assert!(m.beta < 0.05, "beta {}", m.beta);
    assert!(m.spearman.unwrap() > 0.3);
    assert!(m.removal_auc < 0.8);
    // shuffled variances are uninformative: removal AUC near 1
    let rev: Vec<f64> = v.iter().rev().cloned().collect();
    let w = uncertainty_metrics(&e, &rev).unwrap();
    assert!(w.removal_auc > 1.0 && w.spearman.unwrap() < 0.0);
}

#[test]
fn degenerate_inputs_are_errors_or_undefined() {
    assert!(uncertainty_metrics(&[1.0, 2.0], &[1.0]).is_err());
    assert!(uncertainty_metrics(&[], &[]).is_err());
    assert!(uncertainty_metrics(&[f64::NAN, 1.0], &[1.0, 1.0]).is_err());
    assert!(uncertainty_metrics(&[1.0, 1.0], &[1.0, -1.0]).is_err());
    assert!(uncertainty_metrics(&[0.0, 0.0], &[1.0, 2.0]).is_err());
    // constant variances: the correlations are undefined, the rest is defined (β explains all)
    let m = uncertainty_metrics(&[1.0, -2.0, 0.5], &[0.3, 0.3, 0.3]).unwrap();
    assert_eq!((m.pearson, m.spearman), (None, None));
    assert!(m.nll.is_finite());
    // all variances zero: α = 0, β = mean(e²)
    let m = uncertainty_metrics(&[1.0, -2.0, 0.5], &[0.0, 0.0, 0.0]).unwrap();
    assert_eq!(m.alpha, 0.0);
    assert!(close(m.beta, (1.0 + 4.0 + 0.25) / 3.0, 1e-12));
}

#[cfg(feature = "cli")]
#[test]
fn the_metrics_command_prints_the_same_numbers() {
    use deltavar::data::{write_npy, RowsRef};
    let dir = std::env::temp_dir().join(format!("dv-metrics-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let e = [0.3f64, -1.2, 0.3, 2.5, -0.05, 0.8];
    let v = [0.1f32, 1.0, 0.1, 3.0, 0.01, 0.5];
    write_npy(dir.join("e.npy"), &[6], RowsRef::F64(&e)).unwrap();
    write_npy(dir.join("v.npy"), &[6, 1], RowsRef::F32(&v)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_deltavar"))
        .args(["metrics", "--json", "--errors"])
        .arg(dir.join("e.npy"))
        .arg("--variances")
        .arg(dir.join("v.npy"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let v64: Vec<f64> = v.iter().map(|x| *x as f64).collect();
    let m = uncertainty_metrics(&e, &v64).unwrap();
    assert_eq!(j["removal_auc"].as_f64().unwrap(), m.removal_auc);
    assert_eq!(j["spearman"].as_f64().unwrap(), m.spearman.unwrap());
    assert_eq!(j["m"].as_u64(), Some(6));
    // a negative variance: one line, exit 1
    write_npy(
        dir.join("bad.npy"),
        &[6],
        RowsRef::F64(&[0.1, -1.0, 0.1, 3.0, 0.01, 0.5]),
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_deltavar"))
        .args(["metrics", "--errors"])
        .arg(dir.join("e.npy"))
        .arg("--variances")
        .arg(dir.join("bad.npy"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim().lines().count(),
        1
    );
}

/// `deltavar evaluate`: ΔVar at held-out inputs through the `variance` pipeline, the errors of the
/// QoI against the targets, the same metrics as the library, and a PNG.
#[cfg(feature = "cli")]
#[test]
fn evaluate_equals_the_library_pipeline() {
    use candle_core::DType;
    use deltavar::*;
    let case = common::Case::load("tanh-4-16-16-3");
    let d = &case.dir;
    let png = std::env::temp_dir().join(format!("dv-eval-{}.png", std::process::id()));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_deltavar"))
        .args(["evaluate", "--arch", "mlp:4,16,16,3:tanh", "--weights"])
        .arg(d.join("model.safetensors"))
        .arg("--val-x")
        .arg(d.join("queries.npy"))
        .arg("--val-y")
        .arg(d.join("queries.npy")) // any (M, 4) floats serve as targets for output:1
        .args([
            "--qoi",
            "output:1",
            "--sigma",
            "full-fim",
            "--damping",
            "1e-3",
        ])
        .args([
            "--dtype",
            "f64",
            "--likelihood",
            "gaussian:0.5",
            "--json",
            "--train-x",
        ])
        .arg(d.join("train_x.npy"))
        .arg("--train-y")
        .arg(d.join("train_y.npy"))
        .arg("--plot")
        .arg(&png)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(std::fs::metadata(&png).unwrap().len() > 10_000);
    // the library: same ΔVar, errors y[:, 1] − f_1
    let (mlp, _vm) = case.model(DType::F64);
    let q = case.npy("queries.npy", Some(DType::F64));
    let data = case.data(DType::F64);
    let r = mlp_delta_variances(
        &mlp,
        Qoi::Output(1),
        &q,
        SigmaStrategy::InverseFullEmpiricalFim,
        &SigmaOptions {
            damping: 1e-3,
            ..Default::default()
        },
        Some((&data, Likelihood::gaussian(0.5))),
        &FactoredOptions::default(),
    )
    .unwrap();
    let qv: Vec<f64> = q.flatten_all().unwrap().to_vec1().unwrap();
    let e: Vec<f64> = (0..r.qoi.len()).map(|i| qv[i * 4 + 1] - r.qoi[i]).collect();
    let m = uncertainty_metrics(&e, &r.delta_variance).unwrap();
    let got = &j["metrics"];
    assert!(close(
        got["removal_auc"].as_f64().unwrap(),
        m.removal_auc,
        1e-9
    ));
    assert!(close(got["nll"].as_f64().unwrap(), m.nll, 1e-9));
    assert_eq!(got["m"].as_u64(), Some(8));
    // a target file of the wrong length is one clear line
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_deltavar"))
        .args(["evaluate", "--arch", "mlp:4,16,16,3:tanh", "--weights"])
        .arg(d.join("model.safetensors"))
        .arg("--val-x")
        .arg(d.join("queries.npy"))
        .arg("--val-y")
        .arg(d.join("train_y.npy"))
        .args(["--qoi", "output:1", "--sigma", "identity", "--plot"])
        .arg(&png)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("rows") && err.trim().lines().count() == 1,
        "{err}"
    );
}
