//! Gradients against central finite differences in f64: (u(θ + h e) − u(θ − h e)) / 2h.

mod common;

use candle_core::{Module, Tensor};
use common::*;
use deltavar::*;

fn fd_gradient(params: &Params, f: &dyn Fn() -> f64) -> Vec<f64> {
    let theta = params.flat_values().unwrap();
    let h = 1e-6;
    (0..theta.len())
        .map(|i| {
            let mut t = theta.clone();
            t[i] += h;
            params.set_flat_values(&t).unwrap();
            let up = f();
            t[i] -= 2.0 * h;
            params.set_flat_values(&t).unwrap();
            let down = f();
            params.set_flat_values(&theta).unwrap();
            (up - down) / (2.0 * h)
        })
        .collect()
}

fn scalar(t: Tensor) -> f64 {
    t.to_vec0::<f64>().unwrap()
}

#[test]
fn qoi_gradients_match_finite_differences() {
    for (k, act) in Activation::ALL.iter().enumerate() {
        let (mlp, _vm, params) = random_mlp(&[3, 6, 5, 3], *act, 300 + k as u64);
        let z = random_tensor(1, 3, 400 + k as u64);
        for qoi in [Qoi::Sum, Qoi::Output(2), Qoi::Prob(0)] {
            let q = |z: &Tensor| -> candle_core::Result<Tensor> {
                qoi.eval(&mlp.forward(z)?)
                    .map_err(candle_core::Error::wrap)?
                    .sum_all()
            };
            let g = qoi_gradient(&params, &z, q).unwrap();
            let fd = fd_gradient(&params, &|| scalar(q(&z).unwrap()));
            let err = norm_rel_err(&g.flat, &fd);
            assert!(err < 1e-7, "{} {qoi:?}: relative error {err:e}", act.name());
        }
    }
}

#[test]
fn per_example_log_likelihood_gradients_match_finite_differences() {
    for (k, act) in Activation::ALL.iter().enumerate() {
        for categorical in [false, true] {
            let (mlp, _vm, params) = random_mlp(&[2, 4, 3], *act, 500 + k as u64);
            let n = 3;
            let x = random_tensor(n, 2, 600 + k as u64);
            let (y, lik) = if categorical {
                (random_labels(n, 3, 7), Likelihood::Categorical)
            } else {
                (random_tensor(n, 3, 8), Likelihood::gaussian(0.8))
            };
            let data = TensorDataset::new(x.clone(), y.clone()).unwrap();
            let fisher = GenericFisher::new(
                &params,
                ll_closure(&mlp, &lik),
                &data,
                GenericOptions::default(),
            );
            let g = fisher.per_example_gradients(0, n).unwrap();
            for i in 0..n {
                let (xi, yi) = (x.narrow(0, i, 1).unwrap(), y.narrow(0, i, 1).unwrap());
                let fd = fd_gradient(&params, &|| {
                    scalar(
                        lik.log_likelihood(&mlp.forward(&xi).unwrap(), &yi)
                            .unwrap()
                            .sum_all()
                            .unwrap(),
                    )
                });
                let got: Vec<f64> = (0..params.num_params()).map(|r| g[(r, i)]).collect();
                let err = norm_rel_err(&got, &fd);
                assert!(
                    err < 1e-7,
                    "{} categorical={categorical} example {i}: {err:e}",
                    act.name()
                );
            }
        }
    }
}
