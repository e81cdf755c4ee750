//! Criterion benches of the factored engine on a synthetic 784-256-256-10 relu classifier
//! (P = 269,322), N = 2048 training examples, f32 model.
//!
//!     cargo bench --bench engine

mod common;
use common::lcg;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use criterion::{criterion_group, criterion_main, Criterion};
use deltavar::sigma::DiagonalSigma;
use deltavar::*;
use faer::Mat;

fn setup(n: usize) -> (Mlp, VarMap, TensorDataset) {
    let vm = VarMap::new();
    let mlp = Mlp::new(
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        &[784, 256, 256, 10],
        Activation::Relu,
        None,
    )
    .expect("mlp");
    let x = Tensor::from_vec(lcg(n * 784, 1), (n, 784), &Device::Cpu).expect("x");
    let y: Vec<i64> = lcg(n, 2)
        .iter()
        .map(|v| ((v + 1.0) * 4.99) as i64)
        .collect();
    let y = Tensor::from_vec(y, n, &Device::Cpu).expect("y");
    (mlp, vm, TensorDataset::new(x, y).expect("data"))
}

fn benches(c: &mut Criterion) {
    let n = 2048;
    let (mlp, _vm, data) = setup(n);
    let engine = FactoredMlp::new(&mlp).expect("engine");
    let lik: Likelihood = Likelihood::Categorical;
    let opts = FactoredOptions::default();
    let p = engine.num_params();

    let mut g = c.benchmark_group("factored-784-256-256-10-N2048");
    g.sample_size(10);
    g.bench_function("diag F (streamed)", |b| {
        b.iter(|| engine.sum_sq(&lik, &data, &opts).expect("diag"))
    });
    g.bench_function("factors (X, Δ) of the dataset", |b| {
        b.iter(|| engine.factors(&lik, &data, &opts).expect("factors"))
    });
    let factors = engine.factors(&lik, &data, &opts).expect("factors");
    for k in [1usize, 16] {
        let v = Mat::from_fn(p, k, |i, j| ((i * 31 + j * 17) % 101) as f64 / 101.0 - 0.5);
        g.bench_function(format!("F·V k={k}"), |b| {
            b.iter(|| factors.fisher_apply(v.as_ref()).expect("fv"))
        });
    }
    g.bench_function("Gram N×N", |b| b.iter(|| factors.gram()));
    let queries = Tensor::from_vec(lcg(256 * 784, 3), (256, 784), &Device::Cpu).expect("q");
    let sigma = DiagonalSigma::new(vec![0.5; p]).expect("sigma");
    let qoi: Qoi = Qoi::Output(3);
    g.bench_function("256 queries, diagonal Σ", |b| {
        b.iter(|| {
            let q = engine.query_factors(&qoi, &queries, &opts).expect("q");
            query_delta_variances(&q, &sigma).expect("dv")
        })
    });
    g.finish();

    // the full inverse Fisher, each method, on a 16-64-64-1 tanh regression (P = 5313), N = 1024
    let vm = VarMap::new();
    let small = Mlp::new(
        VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu),
        &[16, 64, 64, 1],
        Activation::Tanh,
        None,
    )
    .expect("mlp");
    let x = Tensor::from_vec(lcg(1024 * 16, 5), (1024, 16), &Device::Cpu)
        .expect("x")
        .to_dtype(DType::F64)
        .expect("x");
    let y = Tensor::from_vec(lcg(1024, 6), (1024, 1), &Device::Cpu)
        .expect("y")
        .to_dtype(DType::F64)
        .expect("y");
    let data = TensorDataset::new(x, y).expect("data");
    let q = Tensor::from_vec(lcg(64 * 16, 7), (64, 16), &Device::Cpu)
        .expect("q")
        .to_dtype(DType::F64)
        .expect("q");
    let mut g = c.benchmark_group("full-inverse-16-64-64-1-N1024-M64");
    g.sample_size(10);
    for method in [
        deltavar::sigma::FullMethod::Dense,
        deltavar::sigma::FullMethod::Kernel,
        deltavar::sigma::FullMethod::Cg,
    ] {
        let opts = SigmaOptions {
            damping: 1e-2,
            full_method: method,
            ..Default::default()
        };
        g.bench_function(format!("{method:?}"), |b| {
            b.iter(|| {
                mlp_delta_variances(
                    &small,
                    Qoi::Sum,
                    &q,
                    SigmaStrategy::InverseFullEmpiricalFim,
                    &opts,
                    Some((&data, Likelihood::gaussian(1.0))),
                    &FactoredOptions::default(),
                )
                .expect("full")
            })
        });
    }
    g.finish();
}

criterion_group!(engine_benches, benches);
criterion_main!(engine_benches);
