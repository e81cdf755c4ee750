//! Regression tests for issue 8 ("Foundation"): each defect found by hostile inputs and a review
//! has a test here that failed before its fix (the npy header one is in tests/datasets.rs).

mod common;

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use common::*;
use deltavar::sigma::*;
use deltavar::*;
use faer::Mat;

fn small_factored_problem() -> (Mlp, VarMap, TensorDataset) {
    let (mlp, vm, _) = random_mlp(&[3, 6, 2], Activation::Tanh, 5);
    let data = TensorDataset::new(random_tensor(30, 3, 6), random_tensor(30, 2, 7)).unwrap();
    (mlp, vm, data)
}

/// Defect 2: with the posterior scale, a diagonal Σ keeps its Jacobian-free path, the kernel Σ
/// its factored path, and CG its report.
#[test]
fn posterior_scale_keeps_the_fast_paths_and_the_report() {
    let (mlp, _vm, data) = small_factored_problem();
    let lik = Likelihood::gaussian(0.5);
    let fisher = mlp_fisher(&mlp, lik.clone(), &data, FactoredOptions::default());
    let (q, _) = mlp_engine(&mlp)
        .query_layered_gradients(
            &Qoi::Sum,
            &random_tensor(4, 3, 8),
            1,
            &FactoredOptions::default(),
            LayerRoute::Factor,
        )
        .unwrap();
    let n = data.len() as f64;
    for (strategy, method, path) in [
        (
            SigmaStrategy::DiagonalEmpiricalFim,
            FullMethod::Auto,
            QueryPath::DiagonalFactored,
        ),
        (
            SigmaStrategy::InverseFullEmpiricalFim,
            FullMethod::Kernel,
            QueryPath::Factored,
        ),
        (
            SigmaStrategy::InverseFullEmpiricalFim,
            FullMethod::Cg,
            QueryPath::Gradients,
        ),
    ] {
        let is_cg = method == FullMethod::Cg;
        let name = format!("{} {method:?}", strategy.name());
        let base = |scale: bool| SigmaOptions {
            damping: 1e-2,
            posterior_scale: scale,
            full_method: method,
            ..Default::default()
        };
        let strategy2 = match strategy {
            SigmaStrategy::DiagonalEmpiricalFim => SigmaStrategy::DiagonalEmpiricalFim,
            _ => SigmaStrategy::InverseFullEmpiricalFim,
        };
        let (plain, _) = build_sigma(strategy, fisher.num_params(), &base(false), Some(&fisher))
            .unwrap()
            .into_parts();
        let (scaled, _) = build_sigma(strategy2, fisher.num_params(), &base(true), Some(&fisher))
            .unwrap()
            .into_parts();
        let (a, pa) = query_delta_variances_reported(&q, &*plain).unwrap();
        let (b, pb) = query_delta_variances_reported(&q, &*scaled).unwrap();
        assert_eq!((pa, pb), (path, path), "{name}");
        assert_eq!(b.cg.is_some(), is_cg, "{name}: report forwarded");
        let want: Vec<f64> = a.values.iter().map(|v| v / n).collect();
        assert!(max_rel_err(&b.values, &want) < 1e-13, "{name}");
    }
    // and end to end through mlp_delta_variances
    let out = mlp_delta_variances(
        &mlp,
        Qoi::Sum,
        &random_tensor(4, 3, 8),
        SigmaStrategy::InverseFullEmpiricalFim,
        &SigmaOptions {
            damping: 1e-2,
            posterior_scale: true,
            full_method: FullMethod::Cg,
            ..Default::default()
        },
        Some((&data, lik)),
        &FactoredOptions::default(),
    )
    .unwrap();
    assert!(out.cg.unwrap().converged);
}

/// Defect 3a: a pass's fingerprint is that of the weights it summed over.
#[test]
fn fisher_pass_fingerprints_the_summed_weights() {
    let (mlp, vm, data) = small_factored_problem();
    let art = fisher_pass(
        &mlp_engine(&mlp),
        Likelihood::gaussian(0.5),
        "gaussian:0.5",
        &data,
        &PassOptions::default(),
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(
        art.meta.weights_fingerprint,
        tensors_fingerprint(&mlp.named_tensors()).unwrap()
    );
    assert_eq!(art.meta.param_names, mlp.param_names());
    art.check_model(&mlp.params(&vm).unwrap()).unwrap();
    art.check_tensors(&mlp.named_tensors()).unwrap();
    // other weights of the same shapes are refused
    let (other, ovm, _) = random_mlp(&[3, 6, 2], Activation::Tanh, 99);
    let e = art.check_model(&other.params(&ovm).unwrap()).unwrap_err();
    assert!(e.to_string().contains("other weights"), "{e}");
}

/// Defect 3b: one shard of three is not silently the whole Fisher.
#[test]
fn an_incomplete_fisher_artifact_is_refused_unless_allowed() {
    let (mlp, _vm, data) = small_factored_problem();
    let shard = |i| {
        fisher_pass(
            &mlp_engine(&mlp),
            Likelihood::gaussian(0.5),
            "gaussian:0.5",
            &data,
            &PassOptions {
                shard: Some((i, 3)),
                ..Default::default()
            },
            &mut |_, _| {},
        )
        .unwrap()
    };
    let s0 = shard(0);
    assert_eq!(s0.missing_ranges(), vec![(10, 30)]);
    let e = s0.fisher_diag().unwrap_err();
    assert!(
        e.to_string().contains("10..30") && e.to_string().contains("allow"),
        "{e}"
    );
    let p = s0.num_params();
    assert!(build_sigma(
        SigmaStrategy::DiagonalEmpiricalFim,
        p,
        &SigmaOptions::default(),
        Some(&s0)
    )
    .is_err());
    // shards 0 and 2: the middle is missing
    let two = FisherArtifact::merge(&[s0.clone(), shard(2)]).unwrap();
    assert_eq!(two.missing_ranges(), vec![(10, 20)]);
    assert!(two.fisher_diag().is_err());
    // allowed: a warning with the fraction covered
    let partial = s0.with_partial_allowed(true);
    let w = partial.check_complete().unwrap().unwrap();
    assert!(w.contains("10 of 30") && w.contains("33.3%"), "{w}");
    assert_eq!(partial.fisher_diag().unwrap().num_examples(), 10);
    // complete: no warning
    let all = FisherArtifact::merge(&[two, shard(1)]).unwrap();
    assert!(all.is_complete() && all.check_complete().unwrap().is_none());
}

/// Defect 4: a parameter upstream of an op without a backward pass (candle-nn's fused layer
/// norm) is an error naming it, never a silent zero; an explicit opt-out lists the allowed ones.
#[test]
fn missing_gradients_are_errors_naming_the_parameters() {
    // candle-nn's fused layer norm runs in f32 only (and has no backward)
    let dev = Device::Cpu;
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let l1 = candle_nn::linear(3, 4, vb.pp("l1")).unwrap();
    let ln = candle_nn::layer_norm(4, 1e-5, vb.pp("ln")).unwrap();
    let l2 = candle_nn::linear(4, 1, vb.pp("l2")).unwrap();
    let names: Vec<String> = [
        "l1.weight",
        "l1.bias",
        "ln.weight",
        "ln.bias",
        "l2.weight",
        "l2.bias",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let params = Params::from_varmap(&vm, ParamOrder::Explicit(names.clone())).unwrap();
    let fused = |z: &Tensor| l2.forward(&ln.forward(&l1.forward(z)?.tanh()?)?)?.sum_all();
    let z = random_tensor(1, 3, 3).to_dtype(DType::F32).unwrap();
    let e = qoi_gradient(&params, &z, fused).unwrap_err();
    let msg = e.to_string();
    for n in ["l1.weight", "l1.bias", "ln.weight", "ln.bias"] {
        assert!(msg.contains(n), "{n} not named: {msg}");
    }
    assert!(
        !msg.contains("l2.weight") && msg.contains("layer_norm_slow"),
        "{msg}"
    );
    // the generic Fisher too
    let data = TensorDataset::new(
        random_tensor(5, 3, 4).to_dtype(DType::F32).unwrap(),
        random_tensor(5, 1, 5).to_dtype(DType::F32).unwrap(),
    )
    .unwrap();
    let lik = Likelihood::gaussian(1.0);
    let ll = |x: &Tensor, y: &Tensor| {
        let f = l2.forward(&ln.forward(&l1.forward(x)?.tanh()?)?)?;
        lik.log_likelihood(&f, y).map_err(candle_core::Error::wrap)
    };
    let fisher = GenericFisher::new(&params, ll, &data, GenericOptions::default());
    assert!(fisher
        .fisher_diag()
        .unwrap_err()
        .to_string()
        .contains("ln.bias"));
    assert!(fisher
        .fisher_dense(DEFAULT_MEMORY_BUDGET)
        .unwrap_err()
        .to_string()
        .contains("l1.weight"));
    // opting out: the listed parameters get zeros, others are still checked
    let allowed = params
        .clone()
        .allow_unused(&["l1.weight", "l1.bias", "ln.weight", "ln.bias"])
        .unwrap();
    let g = qoi_gradient(&allowed, &z, fused).unwrap();
    assert!(g.flat[..24].iter().all(|v| *v == 0.0));
    assert!(g.flat[24..].iter().any(|v| *v != 0.0));
    let partly = params.clone().allow_unused(&["l1.weight"]).unwrap();
    let e = qoi_gradient(&partly, &z, fused).unwrap_err().to_string();
    assert!(e.contains("l1.bias") && !e.contains("\"l1.weight\""), "{e}");
    assert!(params.clone().allow_unused(&["nope"]).is_err());

    // the differentiable layer norm (f64) gives every parameter its gradient, and it matches
    // central finite differences
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F64, &dev);
    let l1 = candle_nn::linear(3, 4, vb.pp("l1")).unwrap();
    let ln = candle_nn::layer_norm(4, 1e-5, vb.pp("ln")).unwrap();
    let l2 = candle_nn::linear(4, 1, vb.pp("l2")).unwrap();
    let params = Params::from_varmap(&vm, ParamOrder::Explicit(names)).unwrap();
    let slow = |z: &Tensor| {
        let h = l1.forward(z)?.tanh()?;
        let h = candle_nn::ops::layer_norm_slow(&h, ln.weight(), ln.bias().unwrap(), 1e-5)?;
        l2.forward(&h)?.sum_all()
    };
    let z = random_tensor(1, 3, 3);
    let g = qoi_gradient(&params, &z, slow).unwrap();
    assert!(g.flat.iter().take(16).any(|v| *v != 0.0));
    let theta = params.flat_values().unwrap();
    for k in [0, 5, 13, 17, 21] {
        let h = 1e-6;
        let mut tp = theta.clone();
        tp[k] += h;
        params.set_flat_values(&tp).unwrap();
        let up = qoi_gradient(&params, &z, slow).unwrap().value;
        tp[k] -= 2.0 * h;
        params.set_flat_values(&tp).unwrap();
        let down = qoi_gradient(&params, &z, slow).unwrap().value;
        params.set_flat_values(&theta).unwrap();
        let fd = (up - down) / (2.0 * h);
        assert!(
            (fd - g.flat[k]).abs() <= 1e-6 * (1.0 + fd.abs()),
            "entry {k}: {fd} vs {}",
            g.flat[k]
        );
    }
}

/// Defect 5: the generic path never touches the process environment.
#[test]
fn the_generic_path_leaves_the_environment_alone() {
    let before = std::env::var_os("RAYON_NUM_THREADS");
    let w = Var::from_tensor(&Tensor::new(&[2.0f64], &Device::Cpu).unwrap()).unwrap();
    let params = Params::from_vars(vec![("w".into(), w.clone())]).unwrap();
    let x = random_tensor(64, 1, 1);
    let y = random_tensor(64, 1, 2);
    let data = TensorDataset::new(x, y).unwrap();
    let seen = std::sync::Mutex::new(Vec::new());
    let ll = |x: &Tensor, y: &Tensor| {
        seen.lock()
            .unwrap()
            .push(std::env::var_os("RAYON_NUM_THREADS"));
        let r = (y - x.broadcast_mul(w.as_tensor())?)?;
        (r.sqr()? * -0.5)?.sum(1)
    };
    let fisher = GenericFisher::new(&params, ll, &data, GenericOptions::default());
    let d = fisher.fisher_diag().unwrap();
    assert_eq!(d.num_examples(), 64);
    assert!(seen.lock().unwrap().iter().all(|v| *v == before));
    assert_eq!(std::env::var_os("RAYON_NUM_THREADS"), before);
}

/// Defect 8: on the 4-16-16-3 fixture with the default damping 1e-5, CG converges with the
/// default (Nyström) preconditioner; when a solve does not converge the error names the method
/// that would answer.
#[test]
fn cg_on_small_damping_converges_with_the_default_preconditioner() {
    let case = Case::load("tanh-4-16-16-3");
    let (mlp, _vm) = case.model(DType::F64);
    let data = case.data(DType::F64);
    let fisher = mlp_fisher(&mlp, case.likelihood(), &data, FactoredOptions::default());
    let g = fisher.gradient_matrix(DEFAULT_MEMORY_BUDGET).unwrap();
    let (q, _) = mlp_engine(&mlp)
        .query_layered_gradients(
            &case.qoi(),
            &case.npy("queries.npy", Some(DType::F64)),
            1,
            &FactoredOptions::default(),
            LayerRoute::Factor,
        )
        .unwrap();
    let qg = q.to_dense();
    let lam = 1e-5;
    let kernel = KernelInverseFisher::new(g.clone(), lam).unwrap();
    let want = kernel.quad_forms(qg.as_ref()).unwrap();
    let cg = CgInverseFisher::new(g.clone(), lam, CgOptions::default()).unwrap();
    let r = cg.quad_forms_reported(qg.as_ref()).unwrap();
    let report = r.cg.unwrap();
    eprintln!(
        "CG λ=1e-5 on tanh-4-16-16-3 ({}): {} iterations, worst residual {:.1e}",
        report.preconditioner,
        report.iterations,
        report.worst_residual()
    );
    assert!(report.converged && report.iterations <= 10, "{report:?}");
    assert!(max_rel_err(&r.values, &want) < 1e-6);
    // at the fixture's own damping, the reference package's numbers
    let cg = CgInverseFisher::new(g.clone(), case.damping(), CgOptions::default()).unwrap();
    let got = cg.quad_forms(qg.as_ref()).unwrap();
    assert!(max_rel_err(&got, &case.vec("inverse_full_empirical_fim")) < 1e-6);
    // the Jacobi preconditioner does not converge here in 2000 iterations: the error says
    // which method answers
    let jacobi = CgInverseFisher::new(
        g,
        lam,
        CgOptions {
            preconditioner: CgPreconditioner::Jacobi,
            ..Default::default()
        },
    )
    .unwrap();
    let e = jacobi.quad_forms(qg.as_ref()).unwrap_err().to_string();
    assert!(
        e.contains("kernel method") && e.contains("200×200") && e.contains("dense method"),
        "{e}"
    );
}

/// The Nyström preconditioner is an SPD approximation: with a rank at least rank(F) it makes
/// CG converge in a few iterations; with a smaller rank it still gives the same answer.
#[test]
fn nystrom_rank_trades_iterations_for_memory() {
    let (mlp, _vm, _p) = random_mlp(&[4, 16, 3], Activation::Relu, 31);
    let data = TensorDataset::new(random_tensor(60, 4, 1), random_labels(60, 3, 2)).unwrap();
    let f = mlp_fisher(
        &mlp,
        Likelihood::Categorical,
        &data,
        FactoredOptions::default(),
    );
    let g = f.gradient_matrix(DEFAULT_MEMORY_BUDGET).unwrap();
    let q = Mat::from_fn(f.num_params(), 3, |i, j| {
        pseudo_random(400, 9)[(i * 3 + j) % 400]
    });
    let want = KernelInverseFisher::new(g.clone(), 1e-4)
        .unwrap()
        .quad_forms(q.as_ref())
        .unwrap();
    let mut iters = vec![];
    for rank in [5, 20, 60] {
        let cg = CgInverseFisher::new(
            g.clone(),
            1e-4,
            CgOptions {
                preconditioner: CgPreconditioner::Nystrom { rank },
                max_iter: 5000,
                ..Default::default()
            },
        )
        .unwrap();
        let r = cg.quad_forms_reported(q.as_ref()).unwrap();
        assert!(max_rel_err(&r.values, &want) < 1e-7, "rank {rank}");
        iters.push(r.cg.unwrap().iterations);
    }
    eprintln!("Nyström ranks 5, 20, 60: {iters:?} iterations");
    assert!(iters[2] <= 10 && iters[2] <= iters[0], "{iters:?}");
    assert_eq!(default_nystrom_rank(1000, 60, DEFAULT_MEMORY_BUDGET), 60);
    assert_eq!(default_nystrom_rank(1000, 6000, DEFAULT_MEMORY_BUDGET), 256);
    assert_eq!(default_nystrom_rank(1 << 30, 6000, 1 << 30), 0);
}

/// The Fisher operator: F·V from every source equals the dense mean Fisher times V.
#[test]
fn fisher_apply_matches_the_dense_fisher_on_every_source() {
    let (mlp, vm, data) = small_factored_problem();
    let params = mlp.params(&vm).unwrap();
    let lik = Likelihood::gaussian(0.5);
    let factored = mlp_fisher(&mlp, lik.clone(), &data, FactoredOptions::default());
    let generic = GenericFisher::new(&params, lik.of(&mlp), &data, GenericOptions::default());
    let art = fisher_pass(
        &mlp_engine(&mlp),
        lik.clone(),
        "gaussian:0.5",
        &data,
        &PassOptions {
            kind: PassKind::Dense,
            ..Default::default()
        },
        &mut |_, _| {},
    )
    .unwrap();
    let p = factored.num_params();
    let v = Mat::from_fn(p, 3, |i, j| pseudo_random(3 * p, 11)[i * 3 + j]);
    let f = factored.fisher_dense(DEFAULT_MEMORY_BUDGET).unwrap().mean();
    let want = &f * &v;
    for (name, src) in [
        ("factored", &factored as &dyn FisherSource),
        ("generic", &generic as &dyn FisherSource),
        ("artifact", &art as &dyn FisherSource),
    ] {
        let got = src.fisher_apply(v.as_ref(), DEFAULT_MEMORY_BUDGET).unwrap();
        let err = mat_rel_err(&got, &want);
        assert!(err < 1e-12, "{name}: {err:e}");
    }
    assert!(factored
        .fisher_apply(Mat::<f64>::zeros(p + 1, 1).as_ref(), DEFAULT_MEMORY_BUDGET)
        .is_err());
}
