//! Criterion benches of the graph engine on a synthetic 784-256-256-10 relu classifier
//! (P = 269,322; its Linear layers' factored fast paths), N = 2048 training examples, f32
//! model, on a LeNet-style CNN, and the full-inverse methods.
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
    let engine = GraphEngine::from_mlp(&mlp).expect("engine");
    let lik: Likelihood = Likelihood::Categorical;
    let opts = FactoredOptions::default();
    let p = engine.num_params();

    let mut g = c.benchmark_group("factored-784-256-256-10-N2048");
    g.sample_size(10);
    g.bench_function("diag F (streamed)", |b| {
        b.iter(|| engine.sum_sq(&lik, &data, &opts).expect("diag"))
    });
    g.bench_function("factors (X, Δ) of the dataset", |b| {
        b.iter(|| {
            engine
                .layered_gradients(&lik, &data, &opts, LayerRoute::Factor, u64::MAX)
                .expect("factors")
        })
    });
    let factors = engine
        .layered_gradients(&lik, &data, &opts, LayerRoute::Factor, u64::MAX)
        .expect("factors");
    for k in [1usize, 16] {
        let v = Mat::from_fn(p, k, |i, j| ((i * 31 + j * 17) % 101) as f64 / 101.0 - 0.5);
        g.bench_function(format!("F·V k={k}"), |b| {
            b.iter(|| {
                let gv = factors.jv(v.as_ref()).expect("gv");
                factors.jtu(gv.as_ref()).expect("fv")
            })
        });
    }
    g.bench_function("Gram N×N", |b| b.iter(|| factors.gram().expect("gram")));
    let queries = Tensor::from_vec(lcg(256 * 784, 3), (256, 784), &Device::Cpu).expect("q");
    let sigma = DiagonalSigma::new(vec![0.5; p]).expect("sigma");
    let qoi: Qoi = Qoi::Output(3);
    g.bench_function("256 queries, diagonal Σ", |b| {
        b.iter(|| {
            let (q, _) = engine
                .query_layered_gradients(&qoi, &queries, 1, &opts, LayerRoute::Factor)
                .expect("q");
            query_delta_variances(&q, &sigma).expect("dv")
        })
    });
    g.finish();

    // a LeNet-style CNN (W-cnn's architecture, P = 215,370) on N = 1024 synthetic 28×28 images
    let spec: SeqSpec = "seq:conv2d(1,16,5,padding=2),relu,maxpool2d(2),conv2d(16,32,5,padding=2),\
                         relu,maxpool2d(2),flatten,linear(1568,128),relu,linear(128,10)"
        .parse()
        .expect("spec");
    let cnn = Sequential::init(spec, &[1, 28, 28], DType::F32, 1).expect("cnn");
    let n_img = 1024;
    let x = Tensor::from_vec(lcg(n_img * 784, 8), (n_img, 1, 28, 28), &Device::Cpu).expect("x");
    let y: Vec<i64> = lcg(n_img, 9)
        .iter()
        .map(|v| ((v + 1.0) * 4.99) as i64)
        .collect();
    let images =
        TensorDataset::new(x, Tensor::from_vec(y, n_img, &Device::Cpu).expect("y")).expect("data");
    let cnn_engine = GraphEngine::from_sequential(&cnn).expect("engine");
    let mut g = c.benchmark_group("sequential-lenet-N1024");
    g.sample_size(10);
    for bs in [32, 64, 256] {
        let o = FactoredOptions {
            batch_size: bs,
            threads: 0,
        };
        g.bench_function(format!("diag F, batch {bs}"), |b| {
            b.iter(|| cnn_engine.sum_sq(&lik, &images, &o).expect("diag"))
        });
    }
    let qs = Tensor::from_vec(lcg(256 * 784, 10), (256, 1, 28, 28), &Device::Cpu).expect("q");
    g.bench_function("256 query gradients (P×M block)", |b| {
        b.iter(|| {
            cnn_engine
                .query_gradients(&Qoi::Output(3), &qs, 1, &opts)
                .expect("q")
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
