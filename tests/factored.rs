//! An MLP on the graph engine (its Linear layers' factored fast paths) against the generic path (candle autograd, one backward per example) and
//! explicit dense products, in f64: every quantity within 1e-10 relative.

mod common;

use std::sync::Arc;

use candle_core::{DType, Tensor};
use common::*;
use deltavar::engine::QueryGradients;
use deltavar::seed::*;
use deltavar::sigma::*;
use deltavar::*;
use faer::Mat;

const TOL: f64 = 1e-10;

fn matmul(a: &Mat<f64>, b: &Mat<f64>) -> Mat<f64> {
    Mat::from_fn(a.nrows(), b.ncols(), |i, j| {
        (0..a.ncols()).map(|k| a[(i, k)] * b[(k, j)]).sum()
    })
}

struct Problem {
    mlp: Mlp,
    params: Params,
    data: TensorDataset,
    lik: Likelihood,
    queries: Tensor,
    _vm: candle_nn::VarMap,
}

fn problem(act: Activation, categorical: bool, seed: u64) -> Problem {
    let sizes = [4, 7, 5, 3];
    let (mlp, vm, params) = random_mlp(&sizes, act, seed);
    let n = 29;
    let x = random_tensor(n, 4, seed + 1);
    let (y, lik) = if categorical {
        (random_labels(n, 3, seed + 2), Likelihood::Categorical)
    } else {
        (
            random_tensor(n, 3, seed + 2),
            Likelihood::Gaussian {
                sigma: vec![0.5, 1.0, 2.0],
            },
        )
    };
    Problem {
        mlp,
        params,
        data: TensorDataset::new(x, y).unwrap(),
        lik,
        queries: random_tensor(6, 4, seed + 3),
        _vm: vm,
    }
}

fn check(pb: &Problem, label: &str) {
    let opts = FactoredOptions {
        batch_size: 8,
        threads: 2,
    };
    let generic = GenericFisher::new(
        &pb.params,
        pb.lik.of(&pb.mlp),
        &pb.data,
        GenericOptions::default(),
    );
    let factored = mlp_fisher(&pb.mlp, pb.lik.clone(), &pb.data, opts.clone());
    let n = pb.data.len();
    let p = pb.params.num_params();

    // diag F (streamed) and dense F
    let dg = generic.fisher_diag().unwrap();
    let df = factored.fisher_diag().unwrap();
    assert!(
        max_rel_err(df.sums(), dg.sums()) < TOL,
        "{label}: diag F {:e}",
        max_rel_err(df.sums(), dg.sums())
    );
    let fg = generic.fisher_dense(DEFAULT_MEMORY_BUDGET).unwrap().mean();
    let ff = factored.fisher_dense(DEFAULT_MEMORY_BUDGET).unwrap().mean();
    assert!(mat_rel_err(&ff, &fg) < TOL, "{label}: dense F");

    // per-example rows
    let g = generic.per_example_gradients(0, n).unwrap(); // P×N
    let factors = factored
        .engine()
        .layered_gradients(&pb.lik, &pb.data, &opts, LayerRoute::Factor, u64::MAX)
        .unwrap();
    assert!(
        mat_rel_err(&factors.to_dense(), &g) < TOL,
        "{label}: gradient rows"
    );
    assert!(
        max_rel_err(&factors.diag_sums().unwrap(), dg.sums()) < TOL,
        "{label}: cached diag"
    );
    // gᵢᵀ diag(s) gᵢ from the factors against the formed gradients
    let s = pseudo_random(p, 12)
        .iter()
        .map(|v| v.abs() + 0.1)
        .collect::<Vec<f64>>();
    let want: Vec<f64> = (0..n)
        .map(|j| (0..p).map(|i| s[i] * g[(i, j)] * g[(i, j)]).sum())
        .collect();
    assert!(
        max_rel_err(&factors.quad_forms_diag(&s).unwrap(), &want) < TOL,
        "{label}: diagonal quadratic forms"
    );

    // J·V, Jᵀ·U, F·V, Gram
    let gt = g.transpose().to_owned(); // N×P
    for k in [1, 3] {
        let v = Mat::from_fn(p, k, |i, j| pseudo_random(p * k, 9)[i * k + j]);
        let u = Mat::from_fn(n, k, |i, j| pseudo_random(n * k, 10)[i * k + j]);
        assert!(
            mat_rel_err(&factors.jv(v.as_ref()).unwrap(), &matmul(&gt, &v)) < TOL,
            "{label}: J·V k={k}"
        );
        assert!(
            mat_rel_err(&factors.jtu(u.as_ref()).unwrap(), &matmul(&g, &u)) < TOL,
            "{label}: Jᵀ·U k={k}"
        );
        let fv = matmul(&fg, &v);
        let gv = factors.jv(v.as_ref()).unwrap();
        let jtu = factors.jtu(gv.as_ref()).unwrap();
        let got = Mat::from_fn(p, k, |i, j| jtu[(i, j)] / n as f64);
        assert!(mat_rel_err(&got, &fv) < TOL, "{label}: F·V k={k}");
    }
    let k = matmul(&gt, &g);
    assert!(
        mat_rel_err(&factors.gram().unwrap(), &k) < TOL,
        "{label}: Gram"
    );
    // the lower triangle a Cholesky in place reads; nothing above it touched
    let mut lower = Mat::from_fn(n, n, |_, _| 7.0);
    factors.gram_lower_into(lower.as_mut()).unwrap();
    let want = Mat::from_fn(n, n, |i, j| if i >= j { k[(i, j)] + 7.0 } else { 7.0 });
    assert!(mat_rel_err(&lower, &want) < TOL, "{label}: Gram lower");

    // queries: gradients and ΔVar under each Σ
    for qoi in [Qoi::Sum, Qoi::Output(1), Qoi::Prob(2)] {
        let (qg, qv) = qoi_gradients(
            &pb.params,
            &pb.queries,
            qoi.of(&pb.mlp),
            &GenericOptions::default(),
        )
        .unwrap();
        let (qf, qf_values) = factored
            .engine()
            .query_layered_gradients(&qoi.clone(), &pb.queries, 1, &opts, LayerRoute::Factor)
            .unwrap();
        assert!(
            max_rel_err(&qf_values[..], &qv) < TOL,
            "{label} {qoi:?}: values"
        );
        assert!(
            mat_rel_err(&qf.to_dense(), &qg) < TOL,
            "{label} {qoi:?}: query gradients"
        );
        let sigmas: Vec<Box<dyn SigmaOp>> = vec![
            Box::new(IdentitySigma::new(p)),
            Box::new(
                DiagonalSigma::new(pseudo_random(p, 11).iter().map(|v| v.abs()).collect()).unwrap(),
            ),
            Box::new(InverseDiagonalFisher::new(&dg.mean(), 1e-3).unwrap()),
            Box::new(
                ScaledSigma::new(InverseDiagonalFisher::new(&dg.mean(), 1e-3).unwrap(), 0.1)
                    .unwrap(),
            ),
            Box::new(InverseFullFisher::new(fg.as_ref(), 1e-3).unwrap()),
        ];
        for s in &sigmas {
            let want = s.quad_forms(qg.as_ref()).unwrap();
            let got = query_delta_variances(&qf, &**s).unwrap();
            assert!(
                max_rel_err(&got, &want) < TOL,
                "{label} {qoi:?}: ΔVar under {}",
                s.name()
            );
        }
    }
}

#[test]
fn factored_matches_generic_gaussian_every_activation() {
    for (k, act) in Activation::ALL.iter().enumerate() {
        check(
            &problem(*act, false, 700 + 10 * k as u64),
            &format!("gaussian {}", act.name()),
        );
    }
}

#[test]
fn factored_matches_generic_categorical_every_activation() {
    for (k, act) in Activation::ALL.iter().enumerate() {
        check(
            &problem(*act, true, 800 + 10 * k as u64),
            &format!("categorical {}", act.name()),
        );
    }
}

#[test]
fn custom_closures_match_builtins() {
    let pb = problem(Activation::Tanh, true, 901);
    let opts = FactoredOptions::default();
    let builtin = mlp_fisher(&pb.mlp, Likelihood::Categorical, &pb.data, opts.clone());
    let lik = Likelihood::Categorical;
    let custom_lik = Likelihood::Custom(Arc::new(move |f: &Tensor, y: &Tensor| {
        lik.log_likelihood(f, y).map_err(candle_core::Error::wrap)
    }));
    let custom = mlp_fisher(&pb.mlp, custom_lik, &pb.data, opts.clone());
    let a = builtin.fisher_diag().unwrap();
    let b = custom.fisher_diag().unwrap();
    assert!(max_rel_err(b.sums(), a.sums()) < 1e-12);

    let engine = mlp_engine(&pb.mlp);
    let (q, q_values) = engine
        .query_layered_gradients(&Qoi::Prob(0), &pb.queries, 1, &opts, LayerRoute::Factor)
        .unwrap();
    let custom_q = Qoi::Custom(Arc::new(|f: &Tensor| {
        Qoi::Prob(0).eval(f).map_err(candle_core::Error::wrap)
    }));
    let (c, c_values) = engine
        .query_layered_gradients(&custom_q, &pb.queries, 1, &opts, LayerRoute::Factor)
        .unwrap();
    assert!(max_rel_err(&c_values[..], &q_values[..]) < 1e-14);
    assert!(mat_rel_err(&c.to_dense(), &q.to_dense()) < 1e-12);
}

#[test]
fn batch_size_and_threads_do_not_change_results() {
    let pb = problem(Activation::Gelu, false, 950);
    let reference = mlp_engine(&pb.mlp)
        .sum_sq(
            &pb.lik.clone(),
            &pb.data,
            &FactoredOptions {
                batch_size: 1,
                threads: 1,
            },
        )
        .unwrap();
    for bs in [2, 7, 29, 100] {
        for threads in [1, 2, 3] {
            let d = mlp_engine(&pb.mlp)
                .sum_sq(
                    &pb.lik.clone(),
                    &pb.data,
                    &FactoredOptions {
                        batch_size: bs,
                        threads,
                    },
                )
                .unwrap();
            assert!(
                max_rel_err(&d, &reference) < 1e-13,
                "bs {bs} threads {threads}"
            );
            assert_eq!(d.len(), reference.len());
        }
    }
}

#[test]
fn parity_fixtures_through_the_factored_engine() {
    for name in CASES {
        let case = Case::load(name);
        let (mlp, _vm) = case.model(DType::F64);
        let data = case.data(DType::F64);
        let fisher = mlp_fisher(
            &mlp,
            case.likelihood(),
            &data,
            FactoredOptions {
                batch_size: 64,
                threads: 0,
            },
        );
        let queries = case.npy("queries.npy", Some(DType::F64));
        let (qf, qf_values) = fisher
            .engine()
            .query_layered_gradients(
                &case.qoi(),
                &queries,
                1,
                &FactoredOptions::default(),
                LayerRoute::Factor,
            )
            .unwrap();
        assert!(
            norm_rel_err(&qf_values[..], &case.vec("qoi_value"))
                < parity_tol(name, "qoi_value", "direct"),
            "{name}: values"
        );
        let opts = SigmaOptions {
            damping: case.damping(),
            ..Default::default()
        };
        let p = fisher.num_params();
        for (strategy, key) in [
            (SigmaStrategy::Identity, "identity"),
            (
                SigmaStrategy::DiagonalEmpiricalFim,
                "diagonal_empirical_fim",
            ),
            (
                SigmaStrategy::InverseFullEmpiricalFim,
                "inverse_full_empirical_fim",
            ),
        ] {
            let sigma = build_sigma(strategy, p, &opts, Some(&fisher)).unwrap();
            let dv = query_delta_variances(&qf, &*sigma).unwrap();
            let err = max_rel_err(&dv, &case.vec(key));
            eprintln!("PARITY factored {name} {key}: {err:.1e}");
            assert!(
                err < parity_tol(name, key, "direct"),
                "{name} {key}: {err:e}"
            );
        }
        let diag = calculate_empirical_fim_diagonal(&fisher).unwrap();
        assert!(
            norm_rel_err(&diag, &case.vec("fim_diagonal"))
                < parity_tol(name, "fim_diagonal", "direct"),
            "{name}: fim_diagonal"
        );
        let g0: Vec<f64> = qf.to_dense().col_as_slice(0).to_vec();
        assert!(
            norm_rel_err(&g0, &case.vec("first_qoi_gradient"))
                < parity_tol(name, "first_qoi_gradient", "direct"),
            "{name}: gradient"
        );
    }
}

#[test]
fn factored_errors_name_the_culprit() {
    let pb = problem(Activation::Relu, true, 990);
    let engine = mlp_engine(&pb.mlp);
    let opts = FactoredOptions::default();
    // wrong input width
    let bad = TensorDataset::new(random_tensor(5, 3, 1), random_labels(5, 3, 2)).unwrap();
    let e = engine
        .sum_sq(&Likelihood::Categorical, &bad, &opts)
        .unwrap_err();
    assert!(
        matches!(e, Error::Shape { .. })
            && e.to_string().contains("[4]")
            && e.to_string().contains("got 3 values"),
        "{e}"
    );
    // label out of range
    let labels = Tensor::new(&[0i64, 1, 7, 2, 0], &candle_core::Device::Cpu).unwrap();
    let bad = TensorDataset::new(random_tensor(5, 4, 1), labels).unwrap();
    let e = engine
        .sum_sq(&Likelihood::Categorical, &bad, &opts)
        .unwrap_err();
    assert!(
        e.to_string().contains("example 2") && e.to_string().contains("0..3"),
        "{e}"
    );
    // NaN in the inputs names the row
    let mut xv = pseudo_random(20, 3);
    xv[13] = f64::NAN;
    let x = Tensor::from_vec(xv, (5, 4), &candle_core::Device::Cpu).unwrap();
    let bad = TensorDataset::new(x, random_labels(5, 3, 2)).unwrap();
    let e = engine
        .sum_sq(
            &Likelihood::Categorical,
            &bad,
            &FactoredOptions {
                batch_size: 2,
                threads: 1,
            },
        )
        .unwrap_err();
    assert!(
        matches!(e, Error::NonFinite { .. }) && e.to_string().contains("row 3"),
        "{e}"
    );
    // QoI index out of range
    let e = engine
        .query_layered_gradients(&Qoi::Output(5), &pb.queries, 1, &opts, LayerRoute::Factor)
        .unwrap_err();
    assert!(e.to_string().contains("3 outputs"), "{e}");
    // batch size 0
    let e = engine
        .sum_sq(
            &Likelihood::Categorical,
            &pb.data,
            &FactoredOptions {
                batch_size: 0,
                threads: 1,
            },
        )
        .unwrap_err();
    assert!(e.to_string().contains("batch_size"), "{e}");
    // Σ of the wrong size
    let (q, _) = engine
        .query_layered_gradients(&Qoi::Sum, &pb.queries, 1, &opts, LayerRoute::Factor)
        .unwrap();
    let e = query_delta_variances(&q, &IdentitySigma::new(3)).unwrap_err();
    assert!(e.to_string().contains("P = "), "{e}");
}

#[test]
fn f32_model_runs_in_f32_close_to_f64() {
    let case = Case::load("tanh-4-16-16-3");
    let (m64, _a) = case.model(DType::F64);
    let (m32, _b) = case.model(DType::F32);
    let d64 = case.data(DType::F64);
    let d32 = case.data(DType::F32);
    let lik: Likelihood = case.likelihood();
    let e64 = mlp_engine(&m64);
    let e32 = mlp_engine(&m32);
    assert_eq!(e32.dtype(), DType::F32);
    let a = e64.sum_sq(&lik, &d64, &FactoredOptions::default()).unwrap();
    let b = e32.sum_sq(&lik, &d32, &FactoredOptions::default()).unwrap();
    let err = norm_rel_err(&b, &a);
    assert!(err < 1e-5, "f32 engine vs f64: {err:e}");
}

/// The fused diagonal route (forms straight from each batch's pass) equals the factors' route
/// and the dense gᵀ S g of the formed gradients, for every batch size and thread count, in f64
/// and f32 models; a diagonal of the wrong length is an error.
#[test]
fn fused_diagonal_query_forms_match_the_factors() {
    let pb = problem(Activation::Tanh, true, 977);
    let engine = mlp_engine(&pb.mlp);
    let p = engine.num_params();
    let s: Vec<f64> = pseudo_random(p, 978)
        .iter()
        .map(|v| v.abs() + 0.1)
        .collect();
    let qoi = Qoi::Prob(1);
    let opts = FactoredOptions::default();
    let (q, q_values) = engine
        .query_layered_gradients(&qoi, &pb.queries, 1, &opts, LayerRoute::Factor)
        .unwrap();
    let want = q.quad_forms_diag(&s).unwrap();
    let g = q.to_dense();
    let dense: Vec<f64> = (0..g.ncols())
        .map(|j| (0..p).map(|i| g[(i, j)] * g[(i, j)] * s[i]).sum())
        .collect();
    assert!(max_rel_err(&want, &dense) < 1e-12);
    for (bs, threads) in [(1, 1), (2, 2), (3, 1), (256, 2)] {
        let o = FactoredOptions {
            batch_size: bs,
            threads,
        };
        let (values, forms) =
            QueryGradients::query_diag_forms(&engine, &qoi, &pb.queries, 1, &o, &s)
                .unwrap()
                .unwrap();
        assert!(max_rel_err(&forms, &want) < 1e-13, "batch {bs}");
        assert!(max_rel_err(&values, &q_values[..]) < 1e-14);
    }
    assert!(
        QueryGradients::query_diag_forms(&engine, &qoi, &pb.queries, 1, &opts, &s[1..])
            .unwrap()
            .is_err()
    );
    // through the pipeline: the diagonal Σ takes the fused route
    let out = mlp_delta_variances(
        &pb.mlp,
        qoi,
        &pb.queries,
        SigmaStrategy::DiagonalEmpiricalFim,
        &SigmaOptions {
            damping: 1e-3,
            ..Default::default()
        },
        Some((&pb.data, pb.lik.clone())),
        &opts,
    )
    .unwrap();
    assert_eq!(out.path, QueryPath::DiagonalFactored);
    let fisher = mlp_fisher(&pb.mlp, pb.lik.clone(), &pb.data, opts.clone());
    let diag = fisher.fisher_diag().unwrap();
    let sd: Vec<f64> = diag.mean().iter().map(|f| 1.0 / (f + 1e-3)).collect();
    let want = q.quad_forms_diag(&sd).unwrap();
    assert!(max_rel_err(&out.delta_variance, &want) < 1e-12);
}

/// The engine snapshots the model's weights: a model whose variables changed gives a new
/// engine with other sums (the old one keeps its snapshot), and a weight that became NaN is
/// refused when the engine is built, naming the tensor, never a NaN result.
#[test]
fn engine_snapshots_the_weights_and_refuses_non_finite_ones() {
    let pb = problem(Activation::Tanh, false, 1201);
    let opts = FactoredOptions::default();
    let engine = mlp_engine(&pb.mlp);
    let before = engine.sum_sq(&pb.lik, &pb.data, &opts).unwrap();
    let theta = pb.params.flat_values().unwrap();
    let moved: Vec<f64> = theta.iter().map(|v| v * 1.5 + 0.01).collect();
    pb.params.set_flat_values(&moved).unwrap();
    assert_eq!(engine.sum_sq(&pb.lik, &pb.data, &opts).unwrap(), before);
    let after = mlp_engine(&pb.mlp)
        .sum_sq(&pb.lik, &pb.data, &opts)
        .unwrap();
    assert!(max_rel_err(&after, &before) > 1e-3);
    // a NaN written into a weight: a new engine fails naming it
    let mut bad = moved.clone();
    bad[3] = f64::NAN;
    pb.params.set_flat_values(&bad).unwrap();
    let err = GraphEngine::from_mlp(&pb.mlp).err().unwrap();
    assert!(err.to_string().contains("0.weight"), "{err}");
    assert!(err.to_string().contains("element 3"), "{err}");
}
