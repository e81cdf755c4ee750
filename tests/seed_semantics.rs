//! The cases of the seed's own tests (test_core.py / test_sigma.py semantics), plus error cases.

mod common;

use candle_core::{Device, Tensor, Var};
use common::*;
use deltavar::seed::*;
use deltavar::sigma::{CustomSigma, InverseFullFisher};
use deltavar::*;
use faer::Mat;

/// The 1-parameter linear model f(x) = w x with log-likelihood -(y - w x)²/2.
struct Linear1 {
    w: Var,
    params: Params,
    data: TensorDataset,
    xs: Vec<f64>,
    ys: Vec<f64>,
}

fn linear1(xs: &[f64], ys: &[f64], w0: f64) -> Linear1 {
    let dev = Device::Cpu;
    let w = Var::from_tensor(&Tensor::new(&[w0], &dev).unwrap()).unwrap();
    let params = Params::from_vars(vec![("weight".into(), w.clone())]).unwrap();
    let x = Tensor::from_slice(xs, (xs.len(), 1), &dev).unwrap();
    let y = Tensor::from_slice(ys, (ys.len(), 1), &dev).unwrap();
    Linear1 {
        w,
        params,
        data: TensorDataset::new(x, y).unwrap(),
        xs: xs.to_vec(),
        ys: ys.to_vec(),
    }
}

impl Linear1 {
    fn ll(&self) -> impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor> + Sync + '_ {
        move |x, y| ((y - x.broadcast_mul(self.w.as_tensor())?)?.sqr()? * -0.5)?.sum(1)
    }
    fn analytic_fim(&self, w: f64) -> f64 {
        let n = self.xs.len() as f64;
        self.xs
            .iter()
            .zip(&self.ys)
            .map(|(x, y)| ((y - w * x) * x).powi(2))
            .sum::<f64>()
            / n
    }
}

#[test]
fn linear_model_analytic_fim_diagonal_full_and_inverses() {
    let m = linear1(&[1.0, 2.0, -0.5, 3.0], &[0.5, 2.5, 1.0, 2.0], 0.7);
    let fisher = GenericFisher::new(&m.params, m.ll(), &m.data, GenericOptions::default());
    let f = m.analytic_fim(0.7);
    let diag = calculate_empirical_fim_diagonal(&fisher).unwrap();
    assert!((diag[0] - f).abs() < 1e-14 * f);
    let full = calculate_empirical_fim_full(&fisher, DEFAULT_MEMORY_BUDGET).unwrap();
    assert_eq!((full.nrows(), full.ncols()), (1, 1));
    assert!((full[(0, 0)] - f).abs() < 1e-14 * f);
    let lam = 1e-5;
    let inv_diag = calculate_inverse_fim_diagonal(&fisher, lam).unwrap();
    assert!((inv_diag[0] - 1.0 / (f + lam)).abs() < 1e-14 / f);
    let inv_full = calculate_inverse_fim_full(&fisher, lam, DEFAULT_MEMORY_BUDGET)
        .unwrap()
        .to_dense();
    assert!((inv_full[(0, 0)] - 1.0 / (f + lam)).abs() < 1e-14 / f);
    // ΔVar of q = w z at z = 2: gradient 2, so ΔVar = 4 / (F + λ) under both FIM strategies
    let g = qoi_gradient(
        &m.params,
        &Tensor::new(&[2.0f64], &Device::Cpu).unwrap(),
        |z| z.broadcast_mul(m.w.as_tensor())?.sum_all(),
    )
    .unwrap();
    assert_eq!(g.flat, vec![2.0]);
    assert!((g.value - 1.4).abs() < 1e-15);
    let opts = SigmaOptions {
        damping: lam,
        ..Default::default()
    };
    for s in [
        SigmaStrategy::DiagonalEmpiricalFim,
        SigmaStrategy::InverseFullEmpiricalFim,
    ] {
        let dv = calculate_delta_variance(&g.flat, s, &opts, Some(&fisher)).unwrap();
        assert!((dv - 4.0 / (f + lam)).abs() < 1e-12 * dv);
    }
    let dv = calculate_delta_variance(&g.flat, SigmaStrategy::Identity, &opts, None).unwrap();
    assert_eq!(dv, 4.0);
}

#[test]
fn batch_size_does_not_change_the_fisher() {
    let (mlp, _vm, params) = random_mlp(&[3, 5, 2], Activation::Tanh, 3);
    let data = TensorDataset::new(random_tensor(23, 3, 4), random_tensor(23, 2, 5)).unwrap();
    let lik = Likelihood::gaussian(0.7);
    let reference = {
        let f = GenericFisher::new(
            &params,
            ll_closure(&mlp, &lik),
            &data,
            GenericOptions {
                batch_size: 1,
                ..Default::default()
            },
        );
        (
            f.fisher_diag().unwrap().mean(),
            f.fisher_dense(DEFAULT_MEMORY_BUDGET).unwrap().mean(),
        )
    };
    for bs in [2, 5, 16, 23, 64] {
        for threads in [1, 2] {
            let f = GenericFisher::new(
                &params,
                ll_closure(&mlp, &lik),
                &data,
                GenericOptions {
                    batch_size: bs,
                    threads,
                },
            );
            let d = f.fisher_diag().unwrap().mean();
            assert!(max_rel_err(&d, &reference.0) < 1e-13, "batch {bs}");
            let full = f.fisher_dense(DEFAULT_MEMORY_BUDGET).unwrap().mean();
            let a: Vec<f64> = to_rows(full.as_ref()).concat();
            let b: Vec<f64> = to_rows(reference.1.as_ref()).concat();
            assert!(norm_rel_err(&a, &b) < 1e-13, "batch {bs}");
        }
    }
}

#[test]
fn batch_list_matches_one_tensor_dataset() {
    let (mlp, _vm, params) = random_mlp(&[3, 4, 2], Activation::Relu, 8);
    let x = random_tensor(10, 3, 1);
    let y = random_tensor(10, 2, 2);
    let one = TensorDataset::new(x.clone(), y.clone()).unwrap();
    let list = BatchList::new(vec![
        (x.narrow(0, 0, 4).unwrap(), y.narrow(0, 0, 4).unwrap()),
        (x.narrow(0, 4, 3).unwrap(), y.narrow(0, 4, 3).unwrap()),
        (x.narrow(0, 7, 3).unwrap(), y.narrow(0, 7, 3).unwrap()),
    ])
    .unwrap();
    let lik = Likelihood::gaussian(1.0);
    let opts = GenericOptions {
        batch_size: 5,
        ..Default::default()
    };
    let a = GenericFisher::new(&params, ll_closure(&mlp, &lik), &one, opts.clone())
        .fisher_diag()
        .unwrap();
    let b = GenericFisher::new(&params, ll_closure(&mlp, &lik), &list, opts)
        .fisher_diag()
        .unwrap();
    assert!(max_rel_err(b.sums(), a.sums()) < 1e-14);
    assert_eq!(b.num_examples(), 10);
}

#[test]
fn empty_dataset_gives_zero_fisher_and_identity_over_damping() {
    let m = linear1(&[], &[], 0.3);
    let fisher = GenericFisher::new(&m.params, m.ll(), &m.data, GenericOptions::default());
    assert_eq!(
        calculate_empirical_fim_diagonal(&fisher).unwrap(),
        vec![0.0]
    );
    assert_eq!(
        calculate_empirical_fim_full(&fisher, DEFAULT_MEMORY_BUDGET).unwrap()[(0, 0)],
        0.0
    );
    let lam = 1e-2;
    let opts = SigmaOptions {
        damping: lam,
        ..Default::default()
    };
    let g = [3.0];
    for s in [
        SigmaStrategy::DiagonalEmpiricalFim,
        SigmaStrategy::InverseFullEmpiricalFim,
    ] {
        let dv = calculate_delta_variance(&g, s, &opts, Some(&fisher)).unwrap();
        assert!((dv - 9.0 / lam).abs() < 1e-10);
    }
    // posterior scaling needs N > 0
    let opts = SigmaOptions {
        damping: lam,
        posterior_scale: true,
        ..Default::default()
    };
    let e = calculate_delta_variance(
        &g,
        SigmaStrategy::DiagonalEmpiricalFim,
        &opts,
        Some(&fisher),
    )
    .unwrap_err();
    assert!(e.to_string().contains("empty"), "{e}");
}

#[test]
fn posterior_scale_divides_by_n() {
    let m = linear1(&[1.0, 2.0, 3.0], &[1.0, 1.0, 1.0], 0.1);
    let fisher = GenericFisher::new(&m.params, m.ll(), &m.data, GenericOptions::default());
    let g = [1.5];
    for s in [
        || SigmaStrategy::DiagonalEmpiricalFim,
        || SigmaStrategy::InverseFullEmpiricalFim,
    ] {
        let plain =
            calculate_delta_variance(&g, s(), &SigmaOptions::default(), Some(&fisher)).unwrap();
        let opts = SigmaOptions {
            posterior_scale: true,
            ..Default::default()
        };
        let scaled = calculate_delta_variance(&g, s(), &opts, Some(&fisher)).unwrap();
        assert!((scaled - plain / 3.0).abs() < 1e-14 * plain);
    }
    let opts = SigmaOptions {
        posterior_scale: true,
        ..Default::default()
    };
    assert!(matches!(
        calculate_delta_variance(&g, SigmaStrategy::Identity, &opts, None),
        Err(Error::InvalidOption { .. })
    ));
}

#[test]
fn zero_gradient_gives_zero_variance_under_every_strategy() {
    let m = linear1(&[1.0, 2.0], &[0.0, 1.0], 0.5);
    let fisher = GenericFisher::new(&m.params, m.ll(), &m.data, GenericOptions::default());
    let g = [0.0];
    let opts = SigmaOptions::default();
    let strategies = vec![
        SigmaStrategy::Identity,
        SigmaStrategy::DiagonalEmpiricalFim,
        SigmaStrategy::InverseFullEmpiricalFim,
        SigmaStrategy::Diagonal(vec![2.0]),
        SigmaStrategy::Dense(Mat::from_fn(1, 1, |_, _| 3.0)),
        SigmaStrategy::Custom(CustomSigma::new(1, |g| 5.0 * g[0] * g[0])),
    ];
    for s in strategies {
        let name = s.name();
        assert_eq!(
            calculate_delta_variance(&g, s, &opts, Some(&fisher)).unwrap(),
            0.0,
            "{name}"
        );
    }
}

#[test]
fn user_sigmas_and_seed_apply_functions() {
    let g = [1.0, -2.0, 0.5];
    assert_eq!(apply_identity_sigma(&g).unwrap(), 5.25);
    assert!(
        (apply_diagonal_sigma(&g, &[0.1, 0.2, 0.4]).unwrap() - (0.1 + 0.8 + 0.1)).abs() < 1e-15
    );
    let s = Mat::from_fn(3, 3, |i, j| if i == j { 2.0 } else { 0.5 });
    let expect: f64 = (0..3)
        .map(|i| (0..3).map(|j| g[i] * s[(i, j)] * g[j]).sum::<f64>())
        .sum();
    assert!((apply_full_sigma(&g, s.as_ref()).unwrap() - expect).abs() < 1e-14);
    let custom = SigmaStrategy::Custom(CustomSigma::new(3, |g| {
        2.0 * g.iter().map(|v| v * v).sum::<f64>()
    }));
    assert_eq!(
        calculate_delta_variance(&g, custom, &SigmaOptions::default(), None).unwrap(),
        10.5
    );
}

#[test]
fn shape_errors_are_reported() {
    let g = [1.0, 2.0, 3.0];
    let e = apply_diagonal_sigma(&g, &[1.0, 2.0]).unwrap_err();
    assert!(
        matches!(e, Error::Shape { .. }) && e.to_string().contains("diagonal Sigma"),
        "{e}"
    );
    let e = calculate_delta_variance(
        &g,
        SigmaStrategy::Diagonal(vec![1.0; 4]),
        &SigmaOptions::default(),
        None,
    )
    .unwrap_err();
    assert!(e.to_string().contains("P = 3"), "{e}");
    let e = apply_full_sigma(&g, Mat::<f64>::zeros(2, 2).as_ref()).unwrap_err();
    assert!(
        matches!(e, Error::Shape { .. }) && e.to_string().contains("dense Sigma"),
        "{e}"
    );
    let e = calculate_delta_variance(
        &g,
        SigmaStrategy::Dense(Mat::zeros(3, 2)),
        &SigmaOptions::default(),
        None,
    )
    .unwrap_err();
    assert!(e.to_string().contains("square"), "{e}");
    let e = calculate_delta_variance(
        &g,
        SigmaStrategy::Custom(CustomSigma::new(2, |_| 1.0)),
        &SigmaOptions::default(),
        None,
    )
    .unwrap_err();
    assert!(matches!(e, Error::Shape { .. }), "{e}");
}

#[test]
fn custom_sigma_must_return_a_finite_scalar() {
    let e = calculate_delta_variance(
        &[1.0],
        SigmaStrategy::Custom(CustomSigma::new(1, |_| f64::NAN)),
        &SigmaOptions::default(),
        None,
    )
    .unwrap_err();
    assert!(
        matches!(e, Error::NonFinite { .. }) && e.to_string().contains("custom Sigma"),
        "{e}"
    );
    let s = CustomSigma::new(1, |g| g[0]);
    assert!(matches!(
        s.apply(Mat::zeros(1, 1).as_ref()),
        Err(Error::Unsupported(_))
    ));
}

#[test]
fn fim_strategies_without_data_are_missing_input() {
    for s in [
        SigmaStrategy::DiagonalEmpiricalFim,
        SigmaStrategy::InverseFullEmpiricalFim,
    ] {
        let e = calculate_delta_variance(&[1.0], s, &SigmaOptions::default(), None).unwrap_err();
        assert!(
            matches!(e, Error::MissingInput { .. }) && e.to_string().contains("Fisher source"),
            "{e}"
        );
    }
}

#[test]
fn fisher_source_with_other_parameters_is_a_shape_error() {
    let m = linear1(&[1.0], &[1.0], 0.5);
    let fisher = GenericFisher::new(&m.params, m.ll(), &m.data, GenericOptions::default());
    let e = calculate_delta_variance(
        &[1.0, 2.0],
        SigmaStrategy::DiagonalEmpiricalFim,
        &SigmaOptions::default(),
        Some(&fisher),
    )
    .unwrap_err();
    assert!(e.to_string().contains("2 parameters"), "{e}");
}

#[test]
fn non_finite_inputs_are_errors_not_nan_results() {
    let e = apply_identity_sigma(&[1.0, f64::NAN]).unwrap_err();
    assert!(e.to_string().contains("entry 1"), "{e}");
    let e = apply_diagonal_sigma(&[1.0], &[f64::INFINITY]).unwrap_err();
    assert!(matches!(e, Error::NonFinite { .. }), "{e}");
    let e = apply_diagonal_sigma(&[1.0], &[-1.0]).unwrap_err();
    assert!(e.to_string().contains("non-negative"), "{e}");
    // a training example whose log-likelihood is not finite names the example
    let m = linear1(&[1.0, f64::NAN, 2.0], &[1.0, 1.0, 1.0], 0.5);
    let fisher = GenericFisher::new(&m.params, m.ll(), &m.data, GenericOptions::default());
    let e = fisher.fisher_diag().unwrap_err();
    assert!(e.to_string().contains("training example 1"), "{e}");
}

#[test]
fn damping_zero_on_a_singular_fisher_is_not_positive_definite() {
    // two parameters that always get the same gradient: F is singular
    let dev = Device::Cpu;
    let a = Var::from_tensor(&Tensor::new(&[0.5f64], &dev).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::new(&[0.5f64], &dev).unwrap()).unwrap();
    let params = Params::from_vars(vec![("a".into(), a.clone()), ("b".into(), b.clone())]).unwrap();
    let data = TensorDataset::new(
        Tensor::new(&[[1.0f64], [2.0]], &dev).unwrap(),
        Tensor::new(&[[1.0f64], [0.0]], &dev).unwrap(),
    )
    .unwrap();
    let ll = |x: &Tensor, y: &Tensor| {
        let f = x.broadcast_mul(&(a.as_tensor() + b.as_tensor())?)?;
        ((y - f)?.sqr()? * -0.5)?.sum(1)
    };
    let fisher = GenericFisher::new(&params, ll, &data, GenericOptions::default());
    let opts = SigmaOptions {
        damping: 0.0,
        ..Default::default()
    };
    let e = calculate_delta_variance(
        &[1.0, 1.0],
        SigmaStrategy::InverseFullEmpiricalFim,
        &opts,
        Some(&fisher),
    )
    .unwrap_err();
    let msg = e.to_string();
    assert!(
        matches!(e, Error::NotPositiveDefinite { .. })
            && msg.contains("damping")
            && msg.contains("larger"),
        "{msg}"
    );
    let e = InverseFullFisher::new(Mat::from_fn(1, 1, |_, _| 1.0).as_ref(), -1.0).unwrap_err();
    assert!(e.to_string().contains("damping"), "{e}");
    // with damping it works
    let opts = SigmaOptions {
        damping: 1e-3,
        ..Default::default()
    };
    assert!(
        calculate_delta_variance(
            &[1.0, 1.0],
            SigmaStrategy::InverseFullEmpiricalFim,
            &opts,
            Some(&fisher)
        )
        .unwrap()
            > 0.0
    );
}

#[test]
fn dense_fisher_over_the_memory_budget_is_refused() {
    let m = linear1(&[1.0, 2.0], &[1.0, 1.0], 0.5);
    let fisher = GenericFisher::new(&m.params, m.ll(), &m.data, GenericOptions::default());
    let e = calculate_empirical_fim_full(&fisher, 4).unwrap_err();
    assert!(
        matches!(e, Error::MemoryBudget { .. }) && e.to_string().contains("budget"),
        "{e}"
    );
    let e = GenericFisher::new(
        &m.params,
        m.ll(),
        &m.data,
        GenericOptions {
            batch_size: 0,
            ..Default::default()
        },
    )
    .fisher_diag()
    .unwrap_err();
    assert!(e.to_string().contains("batch_size"), "{e}");
}

#[test]
fn qoi_closure_must_return_a_finite_scalar() {
    let m = linear1(&[1.0], &[1.0], 0.5);
    let z = Tensor::new(&[1.0f64, 2.0], &Device::Cpu).unwrap();
    let e = qoi_gradient(&m.params, &z, |z| z.broadcast_mul(m.w.as_tensor())).unwrap_err();
    assert!(
        matches!(e, Error::NotScalar { .. }) && e.to_string().contains("[2]"),
        "{e}"
    );
    let e = qoi_gradient(&m.params, &z, |z| {
        z.broadcast_mul(m.w.as_tensor())?.sum_all()? / 0.0
    })
    .unwrap_err();
    assert!(matches!(e, Error::NonFinite { .. }), "{e}");
    let e = m.params.unflatten(&[1.0, 2.0]).unwrap_err();
    assert!(matches!(e, Error::Shape { .. }), "{e}");
}

#[test]
fn qoi_gradient_per_tensor_view_follows_the_params() {
    let (mlp, _vm, params) = random_mlp(&[2, 3, 1], Activation::Silu, 9);
    let z = random_tensor(1, 2, 10);
    let g = qoi_gradient(&params, &z, |z| {
        candle_core::Module::forward(&mlp, z)?.sum_all()
    })
    .unwrap();
    let per = g.per_tensor(&params).unwrap();
    let names: Vec<&str> = per.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["0.weight", "0.bias", "2.weight", "2.bias"]);
    assert_eq!(per[0].1.dims(), &[3, 2]);
    let w = per[2].1.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    assert_eq!(w, g.flat[9..12].to_vec());
}
