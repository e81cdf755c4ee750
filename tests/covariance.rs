//! Vector QoIs: the output covariance J Σ Jᵀ per query under every Σ, its diagonal against the
//! per-output ΔVar, against an explicit dense product, through a rollout, and against
//! laplace-torch's GLM functional variance (tests/data/laplace, scripts/make_laplace_fixture.py).

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use common::*;
use deltavar::model::{SeqSpec, Sequential};
use deltavar::sigma::*;
use deltavar::*;

#[test]
fn covariance_diagonals_are_the_per_output_delta_variances() {
    let case = Case::load("tanh-4-16-16-3");
    let (mlp, _vm) = case.model(DType::F64);
    let data = case.data(DType::F64);
    let q = case.npy("queries.npy", Some(DType::F64));
    let fisher = mlp_fisher(&mlp, case.likelihood(), &data, FactoredOptions::default());
    let engine = mlp_engine(&mlp);
    let eo = FactoredOptions::default();
    for (strategy, method) in [
        (SigmaStrategy::Identity, FullMethod::Auto),
        (SigmaStrategy::DiagonalEmpiricalFim, FullMethod::Auto),
        (SigmaStrategy::InverseFullEmpiricalFim, FullMethod::Dense),
        (SigmaStrategy::InverseFullEmpiricalFim, FullMethod::Kernel),
        (SigmaStrategy::InverseFullEmpiricalFim, FullMethod::Cg),
    ] {
        let o = SigmaOptions {
            damping: 1e-3,
            full_method: method,
            ..Default::default()
        };
        let same = || match &strategy {
            SigmaStrategy::Identity => SigmaStrategy::Identity,
            SigmaStrategy::DiagonalEmpiricalFim => SigmaStrategy::DiagonalEmpiricalFim,
            _ => SigmaStrategy::InverseFullEmpiricalFim,
        };
        let req = |qoi| {
            DeltaRequest::new(&q, same())
                .fisher(&fisher)
                .qoi(qoi)
                .options(o.clone())
                .engine_options(eo.clone())
        };
        let c = engine_delta_covariances_with(&engine, req(Qoi::Sum)).unwrap();
        assert_eq!(c.covariance.len(), 8);
        for k in 0..3 {
            let d = engine_delta_variances_with(&engine, req(Qoi::Output(k))).unwrap();
            let diag: Vec<f64> = c.covariance.iter().map(|m| m[k * 3 + k]).collect();
            let err = max_rel_err(&diag, &d.delta_variance);
            assert!(
                err < 1e-9,
                "{} {method:?} output {k}: {err:e}",
                strategy.name()
            );
            let vals: Vec<f64> = c.outputs.iter().map(|o| o[k]).collect();
            assert!(max_rel_err(&vals, &d.qoi) < 1e-13);
        }
        // the off-diagonal entries, independently: Var(Σ_k f_k) = Σ_ab C_ab, the ΔVar of the
        // QoI `sum` computed on its own
        let total = engine_delta_variances_with(&engine, req(Qoi::Sum)).unwrap();
        let sums: Vec<f64> = c.covariance.iter().map(|m| m.iter().sum()).collect();
        let err = max_rel_err(&sums, &total.delta_variance);
        assert!(err < 1e-9, "{} {method:?} sum: {err:e}", strategy.name());
        for m in &c.covariance {
            // positive semi-definite: every 2×2 minor
            for a in 0..3 {
                for b in 0..3 {
                    assert!(m[a * 3 + b].powi(2) <= m[a * 3 + a] * m[b * 3 + b] * (1.0 + 1e-9));
                }
            }
        }
    }
}

/// The diagonal of a covariance result whose fields disagree is an error, not a panic.
#[test]
fn the_diagonal_of_inconsistent_covariances_is_an_error() {
    let good = DeltaCovariances {
        outputs: vec![vec![1.0, 2.0]],
        covariance: vec![vec![4.0, 1.0, 1.0, 9.0]],
        sigma: "identity".into(),
        method: None,
        num_params: 3,
    };
    let d = good.diagonal(5).unwrap();
    assert_eq!(
        (d.delta_variance, d.qoi, d.num_train),
        (vec![4.0, 9.0], vec![1.0, 2.0], 5)
    );
    let mut bad = good.clone();
    bad.covariance[0].pop();
    assert!(bad.diagonal(5).is_err());
    let mut bad = good;
    bad.outputs.push(vec![1.0]);
    assert!(bad.diagonal(5).is_err());
}

#[test]
fn covariance_equals_the_explicit_dense_product() {
    let case = Case::load("cls-6-12-4-tanh");
    let (mlp, vm) = case.model(DType::F64);
    let params = mlp.params(&vm).unwrap();
    let q = case.npy("queries.npy", Some(DType::F64));
    // Σ = a random symmetric positive definite P×P matrix
    let p = params.num_params();
    let r = pseudo_random(p * p, 4);
    let a = faer::Mat::from_fn(p, p, |i, j| r[i * p + j]);
    let s = &a * a.transpose() * faer::Scale(1.0 / p as f64) + faer::Mat::<f64>::identity(p, p);
    let sigma = DenseSigma::new(s.clone()).unwrap();
    let mut per_output = vec![];
    for k in 0..4 {
        let (g, _) = qoi_gradients(
            &params,
            &q,
            Qoi::Output(k).of(&mlp),
            &GenericOptions::default(),
        )
        .unwrap();
        per_output.push(g);
    }
    let c = delta_covariances(&per_output, &sigma).unwrap();
    for (m, cov) in c.iter().enumerate() {
        for a in 0..4 {
            for b in 0..4 {
                let ga = per_output[a].col(m);
                let gb = per_output[b].col(m);
                let want = ga.transpose() * (&s * gb);
                assert!(
                    (cov[a * 4 + b] - want).abs() <= 1e-10 * (1.0 + want.abs()),
                    "query {m} ({a},{b}): {} vs {want}",
                    cov[a * 4 + b]
                );
            }
        }
    }
    // mismatched blocks are an error, never a panic
    let short = faer::Mat::<f64>::zeros(p, 3);
    assert!(delta_covariances(&[per_output[0].clone(), short], &sigma).is_err());
}

#[test]
fn covariance_of_a_rollout_state() {
    let spec: SeqSpec = "seq:linear(3,8),tanh,linear(8,3)".parse().unwrap();
    let model = Sequential::init(spec, &[3], DType::F64, 4).unwrap();
    let z = random_tensor(5, 3, 21);
    let data = TensorDataset::new(random_tensor(30, 3, 1), random_tensor(30, 3, 2)).unwrap();
    let eo = FactoredOptions::default();
    let fisher = GraphFisher::with_engine(
        GraphEngine::from_sequential(&model).unwrap(),
        Likelihood::gaussian(0.3),
        &data,
        eo.clone(),
    );
    let o = SigmaOptions {
        damping: 1e-3,
        ..Default::default()
    };
    let c = engine_delta_covariances_with(
        &GraphEngine::from_sequential(&model).unwrap(),
        DeltaRequest::new(&z, SigmaStrategy::InverseFullEmpiricalFim)
            .fisher(&fisher)
            .rollout(4)
            .options(o.clone())
            .engine_options(eo.clone()),
    )
    .unwrap();
    for k in 0..3 {
        let d = engine_delta_variances_with(
            &GraphEngine::from_sequential(&model).unwrap(),
            DeltaRequest::new(&z, SigmaStrategy::InverseFullEmpiricalFim)
                .fisher(&fisher)
                .qoi(Qoi::Output(k))
                .rollout(4)
                .options(o.clone())
                .engine_options(eo.clone()),
        )
        .unwrap();
        let diag: Vec<f64> = c.covariance.iter().map(|m| m[k * 3 + k]).collect();
        assert!(max_rel_err(&diag, &d.delta_variance) < 1e-9);
    }
}

/// laplace-torch (`Laplace(..., "regression", hessian_structure="full", backend=CurvlinopsEF,
/// sigma_noise=1, prior_precision=δ)`, `la(x, pred_type="glm")`): its posterior covariance is
/// (H + δI)⁻¹ = deltavar's full-fim with damping δ/N and the posterior scale 1/N, where H is its
/// empirical Fisher. Convention: laplace-torch's regression EF is 2·Σᵢ gᵢgᵢᵀ with gᵢ the
/// gradient of log N(yᵢ | f, σ²) at σ = 1 (its squared-error loss EF times its Hessian factor;
/// measured here: H / Σ gᵢgᵢᵀ = 2.000 on every diagonal entry), which is the EF of a Gaussian
/// likelihood with σ⁴ = 1/2 — the likelihood used below.
#[test]
fn matches_laplace_torch_glm_functional_variance() {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/laplace");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("expected.json")).unwrap()).unwrap();
    let (mlp, _vm) = Mlp::load_safetensors(
        d.join("model.safetensors"),
        Activation::Tanh,
        DType::F64,
        &Device::Cpu,
        "",
        None,
    )
    .unwrap();
    let read = |f: &str| {
        Tensor::read_npy(d.join(f))
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
    };
    let data = TensorDataset::new(read("train_x.npy"), read("train_y.npy")).unwrap();
    let q = read("queries.npy");
    let n = 40.0;
    let delta = expected["prior_precision"].as_f64().unwrap();
    let eo = FactoredOptions::default();
    let sigma_match = 0.5f64.powf(0.25);
    let fisher = mlp_fisher(&mlp, Likelihood::gaussian(sigma_match), &data, eo.clone());
    let o = SigmaOptions {
        damping: delta / n,
        posterior_scale: true,
        ..Default::default()
    };
    let c = engine_delta_covariances_with(
        &mlp_engine(&mlp),
        DeltaRequest::new(&q, SigmaStrategy::InverseFullEmpiricalFim)
            .fisher(&fisher)
            .options(o.clone())
            .engine_options(eo.clone()),
    )
    .unwrap();
    let f_var = expected["f_var"].as_array().unwrap();
    let f_mu = expected["f_mu"].as_array().unwrap();
    let mut worst = 0.0f64;
    for (m, cov) in c.covariance.iter().enumerate() {
        for a in 0..2 {
            assert!((c.outputs[m][a] - f_mu[m][a].as_f64().unwrap()).abs() < 1e-12);
            for b in 0..2 {
                let want = f_var[m][a][b].as_f64().unwrap();
                worst = worst.max((cov[a * 2 + b] - want).abs() / want.abs().max(1e-300));
            }
        }
    }
    eprintln!("laplace-torch GLM functional variance: max relative error {worst:.2e}");
    assert!(worst < 1e-8, "{worst:e}");
}

/// `variance --qoi outputs`: the same laplace-torch case through the command line.
#[cfg(feature = "cli")]
#[test]
fn the_cli_prints_the_covariance_of_every_output() {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/laplace");
    let expected: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("expected.json")).unwrap()).unwrap();
    let sigma_match = 0.5f64.powf(0.25);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_deltavar"))
        .args(["variance", "--arch", "mlp:3,8,2:tanh", "--weights"])
        .arg(d.join("model.safetensors"))
        .arg("--queries")
        .arg(d.join("queries.npy"))
        .args([
            "--qoi",
            "outputs",
            "--sigma",
            "full-fim",
            "--posterior-scale",
        ])
        .args([
            "--damping",
            &(0.5 / 40.0f64).to_string(),
            "--dtype",
            "f64",
            "--json",
        ])
        .args([
            "--likelihood",
            &format!("gaussian:{sigma_match}"),
            "--train-x",
        ])
        .arg(d.join("train_x.npy"))
        .arg("--train-y")
        .arg(d.join("train_y.npy"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let cov = j["covariance"].as_array().unwrap();
    let want = expected["f_var"].as_array().unwrap();
    assert_eq!(cov.len(), 5);
    for (m, c) in cov.iter().enumerate() {
        for a in 0..2 {
            for b in 0..2 {
                let (g, w) = (c[a][b].as_f64().unwrap(), want[m][a][b].as_f64().unwrap());
                assert!(
                    (g - w).abs() <= 1e-8 * w.abs(),
                    "query {m} ({a},{b}): {g} vs {w}"
                );
            }
            assert_eq!(j["delta_variance"][m][a], c[a][a]);
        }
    }
}
