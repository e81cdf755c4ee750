//! `nn.Sequential` models on the graph engine (`GraphEngine::from_sequential`), checked in f64
//! against the generic path (one candle backward per example through `deltavar::nn` layers) and
//! the capture engine; the generic oracle against central finite differences on the layers new
//! here (batch norm, a Linear on the last axis of an image, layer norm over rows, avg pooling).

mod common;

use candle_core::{DType, Device, Module, Tensor};
use common::*;
use deltavar::engine::GraphEngine;
use deltavar::model::{SeqSpec, Sequential};
use deltavar::sigma::*;
use deltavar::*;

/// Every layer kind: strided non-square conv, tanh, max-pool, batch norm, a dilated conv without
/// bias, avg-pool with stride 1, GELU, a Linear on the last axis (6 rows per example), layer norm
/// over those rows, flatten, dropout, Linear.
const ZOO: &str = "seq:conv2d(2,4,3,stride=2,padding=1),tanh,maxpool2d(2),batchnorm2d(4),\
conv2d(4,3,2,padding=1,dilation=2,bias=false),avgpool2d(2,stride=1),gelu,linear(1,4),\
layernorm(4),flatten,dropout,linear(24,3)";

fn zoo() -> (Sequential, TensorDataset, Tensor) {
    let spec: SeqSpec = ZOO.parse().unwrap();
    let model = Sequential::init(spec, &[2, 11, 9], DType::F64, 3).unwrap();
    let n = 11;
    let x = Tensor::from_vec(pseudo_random(n * 198, 5), (n, 2, 11, 9), &Device::Cpu).unwrap();
    let data = TensorDataset::new(x, random_labels(n, 3, 6)).unwrap();
    let q = Tensor::from_vec(pseudo_random(4 * 198, 7), (4, 2, 11, 9), &Device::Cpu).unwrap();
    (model, data, q)
}

fn eo(bs: usize) -> FactoredOptions {
    FactoredOptions {
        batch_size: bs,
        threads: 2,
    }
}

#[test]
fn spec_parses_pytorch_arguments_and_names_every_mistake() {
    let s: SeqSpec = ZOO.parse().unwrap();
    assert_eq!(s.layers.len(), 12);
    assert_eq!(s.output_shape(&[2, 11, 9]).unwrap(), vec![3]);
    // round trip through Display
    let again: SeqSpec = s.to_string().parse().unwrap();
    assert_eq!(again, s);
    assert_eq!(
        s.param_names("")[..3],
        ["0.weight".to_string(), "0.bias".into(), "3.weight".into()]
    );
    let lenet = "seq:conv2d(1,16,5,padding=2),relu,maxpool2d(2),conv2d(16,32,5,padding=2),relu,\
                 maxpool2d(2),flatten,linear(1568,128),relu,linear(128,10)";
    let s: SeqSpec = lenet.parse().unwrap();
    assert_eq!(s.num_params(), 215_370);
    for (bad, needle) in [
        ("seq:conv2d(1,16,5,pad=2)", "unknown keyword 'pad'"),
        ("seq:conv3d(1,16,5)", "unknown layer 'conv3d'"),
        ("seq:linear(3)", "takes 2 positional"),
        ("seq:linear(3,0)", "not a valid size"),
        ("seq:relu(2)", "takes no arguments"),
        ("seq:linear(3,4", "unbalanced"),
        ("mlp:3,4:relu", "expected seq:"),
    ] {
        let e = bad.parse::<SeqSpec>().unwrap_err().to_string();
        assert!(e.contains(needle), "{bad}: {e}");
    }
    // an input the network cannot take names the module where it breaks
    let e = s.shapes(&[1, 28, 20]).unwrap_err().to_string();
    assert!(e.contains("module 7 (linear(1568,128))"), "{e}");
    let e = s.shapes(&[3, 28, 28]).unwrap_err().to_string();
    assert!(e.contains("module 0"), "{e}");
}

#[test]
fn loading_checks_every_tensor_against_the_architecture() {
    let spec: SeqSpec = "seq:linear(3,4),relu,linear(4,2)".parse().unwrap();
    let dev = Device::Cpu;
    let mut t = std::collections::HashMap::new();
    t.insert(
        "0.weight".to_string(),
        Tensor::zeros((4, 3), DType::F32, &dev).unwrap(),
    );
    t.insert(
        "0.bias".to_string(),
        Tensor::zeros(4, DType::F32, &dev).unwrap(),
    );
    t.insert(
        "2.weight".to_string(),
        Tensor::zeros((2, 5), DType::F32, &dev).unwrap(),
    );
    t.insert(
        "2.bias".to_string(),
        Tensor::zeros(2, DType::F32, &dev).unwrap(),
    );
    let e = Sequential::from_tensors(spec.clone(), &[3], &t, "", DType::F32, "m.safetensors")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("'2.weight'") && e.contains("[2, 5]") && e.contains("[2, 4]"),
        "{e}"
    );
    t.insert(
        "2.weight".to_string(),
        Tensor::zeros((2, 4), DType::F32, &dev).unwrap(),
    );
    t.insert(
        "4.weight".to_string(),
        Tensor::zeros((2, 2), DType::F32, &dev).unwrap(),
    );
    let e = Sequential::from_tensors(spec.clone(), &[3], &t, "", DType::F32, "m.safetensors")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("4.weight") && e.contains("used by no module"),
        "{e}"
    );
    t.remove("4.weight");
    t.remove("0.bias");
    let e = Sequential::from_tensors(spec.clone(), &[3], &t, "", DType::F32, "m.safetensors")
        .unwrap_err()
        .to_string();
    assert!(e.contains("'0.bias'") && e.contains("missing"), "{e}");
    t.insert(
        "0.bias".to_string(),
        Tensor::zeros(4, DType::F32, &dev).unwrap(),
    );
    let m = Sequential::from_tensors(spec, &[3], &t, "", DType::F32, "m.safetensors").unwrap();
    assert_eq!(m.num_params(), 26);
    assert_eq!(
        m.param_names(),
        ["0.weight", "0.bias", "2.weight", "2.bias"]
    );
}

#[test]
fn native_engine_matches_the_generic_path_on_every_layer_kind() {
    let (model, data, q) = zoo();
    let params = model.params().unwrap();
    let lik = Likelihood::Categorical;
    let generic = GenericFisher::new(&params, lik.of(&model), &data, GenericOptions::default());
    let engine = GraphEngine::from_sequential(&model).unwrap();
    assert_eq!(engine.num_params(), params.num_params());
    let want = generic.fisher_diag().unwrap();
    for bs in [1, 4, 11, 64] {
        let got = engine.sum_sq(&lik, &data, &eo(bs)).unwrap();
        let err = max_rel_err(&got, want.sums());
        assert!(err < 1e-10, "diag, batch {bs}: {err:e}");
    }
    let g = engine
        .per_example_gradients(&lik, &data, 2, 8, &eo(3))
        .unwrap();
    let gw = generic.per_example_gradients(2, 8).unwrap();
    assert!(mat_rel_err(&g, &gw) < 1e-10, "{}", mat_rel_err(&g, &gw));
    let (qg, qv) = engine
        .query_gradients(&Qoi::Prob(1), &q, 1, &eo(3))
        .unwrap();
    let (qgw, qvw) = qoi_gradients(
        &params,
        &q,
        Qoi::Prob(1).of(&model),
        &GenericOptions::default(),
    )
    .unwrap();
    assert!(mat_rel_err(&qg, &qgw) < 1e-10);
    assert!(max_rel_err(&qv, &qvw) < 1e-12);
    // the capture engine agrees too (its BatchNorm2d use included)
    let cap = CaptureEngine::new(&model, &params)
        .sum_sq(&lik, &data, &CaptureOptions::default())
        .unwrap();
    assert!(max_rel_err(&cap, want.sums()) < 1e-10);
    // ΔVar through the native Fisher source under every strategy and method
    let native = GraphFisher::with_engine(
        GraphEngine::from_sequential(&model).unwrap(),
        lik.clone(),
        &data,
        eo(4),
    );
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
        let name = strategy.name();
        let same = match &strategy {
            SigmaStrategy::Identity => SigmaStrategy::Identity,
            SigmaStrategy::DiagonalEmpiricalFim => SigmaStrategy::DiagonalEmpiricalFim,
            _ => SigmaStrategy::InverseFullEmpiricalFim,
        };
        let a = build_sigma(same, params.num_params(), &o, Some(&native)).unwrap();
        let b = build_sigma(strategy, params.num_params(), &o, Some(&generic)).unwrap();
        let va = a.quad_forms(qg.as_ref()).unwrap();
        let vb = b.quad_forms(qgw.as_ref()).unwrap();
        let err = max_rel_err(&va, &vb);
        assert!(err < 1e-9, "{name} {method:?}: {err:e}");
    }
}

#[test]
fn the_generic_oracle_matches_finite_differences_on_the_zoo() {
    let (model, data, _) = zoo();
    let params = model.params().unwrap();
    let lik = Likelihood::Categorical;
    let generic = GenericFisher::new(&params, lik.of(&model), &data, GenericOptions::default());
    let g = generic.per_example_gradients(5, 1).unwrap();
    let (x, y) = data.get(5, 1).unwrap();
    let p = params.num_params();
    assert_matches_fd(
        &params,
        (0..p).step_by(3),
        |k| g[(k, 0)],
        || {
            lik.log_likelihood(&model.forward(&x).unwrap(), &y)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()[0]
        },
        "zoo",
    );
}

#[test]
fn conv1d_and_regression_match_the_generic_path() {
    let spec: SeqSpec =
        "seq:conv1d(3,4,3,stride=2,padding=1,dilation=2),silu,conv1d(4,2,2),flatten,linear(6,2)"
            .parse()
            .unwrap();
    let model = Sequential::init(spec, &[3, 9], DType::F64, 11).unwrap();
    assert_eq!(model.output_shape(), [2]);
    let params = model.params().unwrap();
    let n = 9;
    let x = Tensor::from_vec(pseudo_random(n * 27, 1), (n, 3, 9), &Device::Cpu).unwrap();
    let y = random_tensor(n, 2, 2);
    let data = TensorDataset::new(x, y).unwrap();
    let lik = Likelihood::gaussian(0.7);
    let generic = GenericFisher::new(&params, lik.of(&model), &data, GenericOptions::default());
    let engine = GraphEngine::from_sequential(&model).unwrap();
    let got = engine.sum_sq(&lik, &data, &eo(4)).unwrap();
    let want = generic.fisher_diag().unwrap();
    assert!(max_rel_err(&got, want.sums()) < 1e-10);
    let g = engine
        .per_example_gradients(&lik, &data, 0, n, &eo(2))
        .unwrap();
    assert!(mat_rel_err(&g, &generic.per_example_gradients(0, n).unwrap()) < 1e-10);
}

#[test]
fn rollouts_flow_through_every_step() {
    let spec: SeqSpec = "seq:linear(3,8),tanh,linear(8,3)".parse().unwrap();
    let model = Sequential::init(spec, &[3], DType::F64, 4).unwrap();
    let params = model.params().unwrap();
    let z = random_tensor(6, 3, 21);
    let engine = GraphEngine::from_sequential(&model).unwrap();
    for k in [1, 2, 5] {
        let roll = model.rollout(k).unwrap();
        let (g, v) = engine
            .query_gradients(&Qoi::Output(2), &z, k, &eo(4))
            .unwrap();
        let (gw, vw) = qoi_gradients(
            &params,
            &z,
            Qoi::Output(2).of(&roll),
            &GenericOptions::default(),
        )
        .unwrap();
        assert!(
            mat_rel_err(&g, &gw) < 1e-10,
            "K = {k}: {}",
            mat_rel_err(&g, &gw)
        );
        assert!(max_rel_err(&v, &vw) < 1e-12);
    }
    // a network whose output is not its input cannot be rolled out
    let spec: SeqSpec = "seq:linear(3,2)".parse().unwrap();
    let m2 = Sequential::init(spec, &[3], DType::F64, 4).unwrap();
    assert!(m2.rollout(2).is_err());
    let e = GraphEngine::from_sequential(&m2)
        .unwrap()
        .query_gradients(&Qoi::Sum, &z, 2, &eo(4))
        .unwrap_err()
        .to_string();
    assert!(e.contains("rolled-out"), "{e}");
}

#[test]
fn f32_models_agree_with_f64_to_single_precision() {
    let (model, data, _) = zoo();
    let lik = Likelihood::Categorical;
    let want = GraphEngine::from_sequential(&model)
        .unwrap()
        .sum_sq(&lik, &data, &eo(4))
        .unwrap();
    let named: std::collections::HashMap<String, Tensor> = model
        .named_tensors()
        .into_iter()
        .chain([
            (
                "3.running_mean".to_string(),
                Tensor::zeros(4, DType::F64, &Device::Cpu).unwrap(),
            ),
            (
                "3.running_var".to_string(),
                Tensor::ones(4, DType::F64, &Device::Cpu).unwrap(),
            ),
        ])
        .collect();
    // same weights, BatchNorm statistics reset: compare f32 with f64 on the same tensors
    let m64 = Sequential::from_tensors(
        model.spec().clone(),
        &[2, 11, 9],
        &named,
        "",
        DType::F64,
        "t",
    )
    .unwrap();
    let m32 = Sequential::from_tensors(
        model.spec().clone(),
        &[2, 11, 9],
        &named,
        "",
        DType::F32,
        "t",
    )
    .unwrap();
    let a = GraphEngine::from_sequential(&m64)
        .unwrap()
        .sum_sq(&lik, &data, &eo(4))
        .unwrap();
    let b = GraphEngine::from_sequential(&m32)
        .unwrap()
        .sum_sq(&lik, &data, &eo(4))
        .unwrap();
    assert_eq!(
        GraphEngine::from_sequential(&m32).unwrap().dtype(),
        DType::F32
    );
    assert!(norm_rel_err(&b, &a) < 1e-4, "{}", norm_rel_err(&b, &a));
    assert_eq!(want.len(), a.len());
}

#[test]
fn offline_passes_of_a_sequential_model_serve_every_method() {
    let (model, data, q) = zoo();
    let lik = Likelihood::Categorical;
    let engine = GraphEngine::from_sequential(&model).unwrap();
    let (qg, _) = engine
        .query_gradients(&Qoi::Prob(1), &q, 1, &eo(4))
        .unwrap();
    let live = GraphFisher::with_engine(
        GraphEngine::from_sequential(&model).unwrap(),
        lik.clone(),
        &data,
        eo(4),
    );
    let mut opts = PassOptions {
        kind: PassKind::Dense,
        engine: eo(4),
        ..Default::default()
    };
    let art = fisher_pass(
        &GraphEngine::from_sequential(&model).unwrap(),
        lik.clone(),
        "categorical",
        &data,
        &opts,
        &mut |_, _| {},
    )
    .unwrap();
    assert_eq!(art.meta.param_names, model.param_names());
    art.check_tensors(&model.named_tensors()).unwrap();
    // N = 11 < P: auto would pick the kernel method for live data; a saved Fisher has no
    // per-example gradients, so auto takes the dense method for it
    let o = SigmaOptions {
        damping: 1e-3,
        ..Default::default()
    };
    let a = build_sigma(
        SigmaStrategy::InverseFullEmpiricalFim,
        model.num_params(),
        &o,
        Some(&art),
    )
    .unwrap();
    assert_eq!(a.method.as_ref().map(|m| m.method), Some(FullMethod::Dense));
    let b = build_sigma(
        SigmaStrategy::InverseFullEmpiricalFim,
        model.num_params(),
        &o,
        Some(&live),
    )
    .unwrap();
    assert_eq!(
        b.method.as_ref().map(|m| m.method),
        Some(FullMethod::Kernel)
    );
    let err = max_rel_err(
        &a.quad_forms(qg.as_ref()).unwrap(),
        &b.quad_forms(qg.as_ref()).unwrap(),
    );
    assert!(err < 1e-9, "{err:e}");
    // shards of the diagonal pass merge to the whole
    opts.kind = PassKind::Diag;
    let whole = fisher_pass(
        &GraphEngine::from_sequential(&model).unwrap(),
        lik.clone(),
        "categorical",
        &data,
        &opts,
        &mut |_, _| {},
    )
    .unwrap();
    let parts: Vec<FisherArtifact> = (0..3)
        .map(|i| {
            let o = PassOptions {
                shard: Some((i, 3)),
                ..opts.clone()
            };
            fisher_pass(
                &GraphEngine::from_sequential(&model).unwrap(),
                lik.clone(),
                "categorical",
                &data,
                &o,
                &mut |_, _| {},
            )
            .unwrap()
        })
        .collect();
    let merged = FisherArtifact::merge(&parts).unwrap();
    assert!(max_rel_err(merged.diag.sums(), whole.diag.sums()) < 1e-13);
}

#[test]
fn hostile_architectures_and_inputs_are_errors() {
    use deltavar::model::{ConvArgs, SeqLayer};
    let conv = |stride, k, dilation| SeqSpec {
        layers: vec![SeqLayer::Conv2d(ConvArgs {
            inp: 1,
            out: 2,
            k,
            stride,
            padding: 0,
            dilation,
            bias: true,
        })],
    };
    for (s, needle) in [
        (conv(0, 3, 1), "stride = 0"),
        (conv(1, 0, 1), "kernel_size = 0"),
        (conv(1, 3, 0), "dilation = 0"),
        (conv(1, usize::MAX, 1), "kernel_size"),
        (conv(1, 3, 1 << 30), "dilation"),
    ] {
        let e = s.shapes(&[1, 8, 8]).unwrap_err().to_string();
        assert!(e.contains(needle), "{e}");
    }
    let s = SeqSpec {
        layers: vec![SeqLayer::MaxPool2d { k: 0, stride: 1 }],
    };
    assert!(s.shapes(&[1, 4, 4]).is_err());
    let s = SeqSpec {
        layers: vec![SeqLayer::BatchNorm2d { c: 1, eps: 0.0 }],
    };
    assert!(s
        .shapes(&[1, 4, 4])
        .unwrap_err()
        .to_string()
        .contains("eps"));
    // an input too large to address
    let s: SeqSpec = "seq:conv2d(1,4096,3,padding=1)".parse().unwrap();
    assert!(s.shapes(&[1, 1 << 20, 1 << 20]).is_err());
    // NaN in the data and in the weights: errors naming them
    let (model, data, _) = zoo();
    let engine = GraphEngine::from_sequential(&model).unwrap();
    let (x, y) = data.get(0, data.len()).unwrap();
    let mut v = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    v[200] = f64::NAN;
    let bad = TensorDataset::new(Tensor::from_vec(v, x.dims(), &Device::Cpu).unwrap(), y).unwrap();
    let e = engine
        .sum_sq(&Likelihood::Categorical, &bad, &eo(4))
        .unwrap_err()
        .to_string();
    assert!(e.contains("row 1"), "{e}");
    let mut named: std::collections::HashMap<String, Tensor> =
        model.named_tensors().into_iter().collect();
    named.insert(
        "3.running_mean".into(),
        Tensor::zeros(4, DType::F64, &Device::Cpu).unwrap(),
    );
    named.insert(
        "3.running_var".into(),
        Tensor::new(&[1.0f64, -1.0, 1.0, 1.0], &Device::Cpu).unwrap(),
    );
    let e = Sequential::from_tensors(
        model.spec().clone(),
        &[2, 11, 9],
        &named,
        "",
        DType::F64,
        "f",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("running_var") && e.contains("-1"), "{e}");
    named.insert(
        "3.running_var".into(),
        Tensor::ones(4, DType::F64, &Device::Cpu).unwrap(),
    );
    named.insert(
        "0.bias".into(),
        Tensor::new(&[0.0f64, f64::INFINITY, 0.0, 0.0], &Device::Cpu).unwrap(),
    );
    let m = Sequential::from_tensors(
        model.spec().clone(),
        &[2, 11, 9],
        &named,
        "",
        DType::F64,
        "f",
    )
    .unwrap();
    let e = GraphEngine::from_sequential(&m).unwrap_err().to_string();
    assert!(e.contains("'0.bias'") && e.contains("of f"), "{e}");
    // zero queries, zero examples, zero batch size
    let z = Tensor::zeros((0, 2, 11, 9), DType::F64, &Device::Cpu).unwrap();
    let (g, v) = engine.query_gradients(&Qoi::Sum, &z, 1, &eo(4)).unwrap();
    assert_eq!((g.ncols(), v.len()), (0, 0));
    let empty = DatasetRange::new(&data, 3, 0).unwrap();
    let s = engine
        .sum_sq(&Likelihood::Categorical, &empty, &eo(4))
        .unwrap();
    assert!(s.iter().all(|v| *v == 0.0));
    assert!(engine
        .sum_sq(&Likelihood::Categorical, &data, &eo(0))
        .is_err());
    // queries of the wrong shape
    let z = Tensor::zeros((2, 3, 11, 9), DType::F64, &Device::Cpu).unwrap();
    assert!(engine.query_gradients(&Qoi::Sum, &z, 1, &eo(4)).is_err());
}

/// `engine_delta_variances_with` with the kernel Σ of a `GraphFisher` over `data`: the queries take
/// the layered route and give `want` (≤ 1e-8).
#[allow(clippy::too_many_arguments)]
fn kernel_pipeline_takes_the_layered_route(
    model: &Sequential,
    data: &TensorDataset,
    lik: &Likelihood,
    qoi: Qoi,
    q: &Tensor,
    steps: usize,
    lam: f64,
    want: &[f64],
) {
    let fisher = GraphFisher::with_engine(
        GraphEngine::from_sequential(model).unwrap(),
        lik.clone(),
        data,
        eo(3),
    );
    let out = engine_delta_variances_with(
        &GraphEngine::from_sequential(model).unwrap(),
        DeltaRequest::new(q, SigmaStrategy::InverseFullEmpiricalFim)
            .fisher(&fisher)
            .qoi(qoi)
            .rollout(steps)
            .options(SigmaOptions {
                damping: lam,
                full_method: FullMethod::Kernel,
                ..Default::default()
            })
            .engine_options(eo(3)),
    )
    .unwrap();
    assert_eq!(out.path, QueryPath::Factored);
    assert!(max_rel_err(&out.delta_variance, want) < 1e-8);
}

/// The dense f64 reference qⱼᵀ (GGᵀ/N + λI)⁻¹ qⱼ for gradients `g` (P×N) and queries `qg`
/// (P×M), by Gauss–Jordan inversion.
fn dense_kernel_reference(g: &faer::Mat<f64>, qg: &faer::Mat<f64>, lam: f64) -> Vec<f64> {
    let (p, n) = (g.nrows(), g.ncols());
    let mut f = g * g.transpose() * faer::Scale(1.0 / n as f64);
    for i in 0..p {
        f[(i, i)] += lam;
    }
    let inv = gauss_jordan_inverse(&to_rows(f.as_ref()));
    (0..qg.ncols())
        .map(|j| {
            let qj: Vec<f64> = (0..p).map(|i| qg[(i, j)]).collect();
            bilinear(&qj, &inv, &qj)
        })
        .collect()
}

/// The layered gradient operator (each Linear or convolution factored or materialised) equals
/// the dense block under every route: G·V, Gᵀ·U, the Gram matrix, the squared sums, the
/// queries' cross-Gram and norms; the kernel Σ through layered queries equals the kernel Σ on
/// formed query gradients and a dense f64 inverse.
#[test]
fn layered_gradients_match_the_dense_block_under_every_route() {
    use deltavar::engine::{DenseGradients, LayerRoute};
    use std::sync::Arc;
    let (model, data, q) = zoo();
    let engine = GraphEngine::from_sequential(&model).unwrap();
    let lik = Likelihood::Categorical;
    let n = data.len();
    let g = engine
        .per_example_gradients(&lik, &data, 0, n, &eo(3))
        .unwrap();
    let p = g.nrows();
    let (qg, qv) = engine
        .query_gradients(&Qoi::Prob(1), &q, 1, &eo(3))
        .unwrap();
    let v = faer::Mat::from_fn(p, 2, |i, j| pseudo_random(2 * p, 91)[i * 2 + j]);
    let u = faer::Mat::from_fn(n, 3, |i, j| pseudo_random(3 * n, 92)[i * 3 + j]);
    let sq: Vec<f64> = (0..p)
        .map(|i| (0..n).map(|j| g[(i, j)] * g[(i, j)]).sum())
        .collect();
    let qnorms: Vec<f64> = (0..qg.ncols())
        .map(|j| (0..p).map(|i| qg[(i, j)] * qg[(i, j)]).sum())
        .collect();
    let lam = 1e-3;
    let want = dense_kernel_reference(&g, &qg, lam);
    for route in EVERY_ROUTE {
        let lg = engine
            .layered_gradients(&lik, &data, &eo(3), route, 1 << 30)
            .unwrap();
        let factored = lg.layer_routes().iter().filter(|(_, f)| *f).count();
        match route {
            LayerRoute::Materialise => assert_eq!(factored, 0),
            // both convolutions, the Linear on rows and the last Linear
            LayerRoute::Factor => assert_eq!(factored, 4),
            LayerRoute::Auto => {}
        }
        assert!(mat_rel_err(&lg.jv(v.as_ref()).unwrap(), &(g.transpose() * &v)) < 1e-12);
        assert!(mat_rel_err(&lg.jtu(u.as_ref()).unwrap(), &(&g * &u)) < 1e-12);
        assert!(mat_rel_err(&lg.gram().unwrap(), &(g.transpose() * &g)) < 1e-12);
        assert!(norm_rel_err(&lg.diag_sums().unwrap(), &sq) < 1e-12);
        let (ql, values) = engine
            .query_layered_gradients(&Qoi::Prob(1), &q, 1, &eo(3), route)
            .unwrap();
        assert!(max_rel_err(&values, &qv) < 1e-14);
        assert!(mat_rel_err(&ql.to_dense(), &qg) < 1e-12);
        assert!(max_rel_err(&ql.sq_norms(), &qnorms) < 1e-12);
        let cross = lg.cross_gram_layered(&ql).unwrap().unwrap();
        assert!(mat_rel_err(&cross, &(g.transpose() * &qg)) < 1e-12);
        let kernel = KernelInverseFisher::new(Arc::new(lg), lam).unwrap();
        let layered = kernel.quad_forms_layered(&ql).unwrap().unwrap();
        assert!(max_rel_err(&layered, &kernel.quad_forms(qg.as_ref()).unwrap()) < 1e-10);
        assert!(max_rel_err(&layered, &want) < 1e-8, "{route:?}");
        let (forms, path) = query_delta_variances_reported(&ql, &kernel).unwrap();
        assert_eq!(path, QueryPath::Factored);
        assert!(max_rel_err(&forms.values, &layered) < 1e-14);
    }
    // queries laid out differently from the data: the kernel declines, the driver forms them
    let lg = engine
        .layered_gradients(&lik, &data, &eo(3), LayerRoute::Materialise, 1 << 30)
        .unwrap();
    let kernel = KernelInverseFisher::new(Arc::new(lg), lam).unwrap();
    let (ql, _) = engine
        .query_layered_gradients(&Qoi::Prob(1), &q, 1, &eo(3), LayerRoute::Factor)
        .unwrap();
    assert!(kernel.quad_forms_layered(&ql).is_none());
    let (forms, path) = query_delta_variances_reported(&ql, &kernel).unwrap();
    assert_eq!(path, QueryPath::Gradients);
    assert!(max_rel_err(&forms.values, &want) < 1e-8);
    // the dense operator declines layered queries too
    let dense = KernelInverseFisher::new(Arc::new(DenseGradients::new(g.clone())), lam).unwrap();
    assert!(dense.quad_forms_layered(&ql).is_none());
    // the Fisher source hands out the layered operator; the end-to-end kernel result matches
    kernel_pipeline_takes_the_layered_route(&model, &data, &lik, Qoi::Prob(1), &q, 1, lam, &want);
    // a budget too small for the layered store is an error that names it
    let err = engine
        .layered_gradients(&lik, &data, &eo(3), LayerRoute::Auto, 64)
        .err()
        .unwrap();
    assert!(err.to_string().contains("memory budget"), "{err}");
}

/// The layered Gram matrix is built in example blocks (BLOCK_ROWS rows of a factor at a time):
/// with N = 1100 a Linear over 6 rows spans 7 blocks and the last Linear 2, so the lower-
/// triangle pairs, the diagonal blocks and the mirror are all exercised. Under every route the
/// Gram matrix equals G Gᵀ, `gram_lower_into` adds its lower triangle and leaves the upper one
/// alone, and the kernel ΔVar equals a dense f64 inverse.
#[test]
fn layered_gram_over_several_blocks_matches_the_dense_block() {
    use std::sync::Arc;
    let spec: SeqSpec = "seq:linear(3,4),tanh,flatten,linear(24,3)".parse().unwrap();
    let model = Sequential::init(spec, &[6, 3], DType::F64, 8).unwrap();
    let n = 1100;
    let x = Tensor::from_vec(pseudo_random(n * 18, 81), (n, 6, 3), &Device::Cpu).unwrap();
    let data = TensorDataset::new(x, random_labels(n, 3, 82)).unwrap();
    let q = Tensor::from_vec(pseudo_random(5 * 18, 83), (5, 6, 3), &Device::Cpu).unwrap();
    let engine = GraphEngine::from_sequential(&model).unwrap();
    let lik = Likelihood::Categorical;
    let g = engine
        .per_example_gradients(&lik, &data, 0, n, &eo(64))
        .unwrap();
    let want_k = g.transpose() * &g;
    let (qg, _) = engine
        .query_gradients(&Qoi::Prob(2), &q, 1, &eo(64))
        .unwrap();
    let lam = 1e-3;
    let want = dense_kernel_reference(&g, &qg, lam);
    for route in EVERY_ROUTE {
        let lg = engine
            .layered_gradients(&lik, &data, &eo(64), route, 1 << 30)
            .unwrap();
        let k = lg.gram().unwrap();
        assert!(mat_rel_err(&k, &want_k) < 1e-12, "{route:?}");
        assert_adds_lower_triangle(
            &want_k,
            |out| lg.gram_lower_into(out).unwrap(),
            &format!("{route:?}"),
        );
        let kernel = KernelInverseFisher::new(Arc::new(lg), lam).unwrap();
        let got = kernel.quad_forms(qg.as_ref()).unwrap();
        assert!(
            max_rel_err(&got, &want) < 1e-8,
            "{route:?}: {:e}",
            max_rel_err(&got, &want)
        );
    }
}

/// Rollout queries held layer by layer (every step's rows of a factored layer, norms summed
/// over the steps) equal the formed K-step query gradients under every route, pair with the
/// one-step layered data, and give the kernel ΔVar of a dense f64 inverse.
#[test]
fn layered_rollout_queries_match_the_formed_gradients() {
    use deltavar::engine::LayerRoute;
    use std::sync::Arc;
    let spec: SeqSpec = "seq:linear(3,6),tanh,layernorm(6),linear(6,3)"
        .parse()
        .unwrap();
    let model = Sequential::init(spec, &[3], DType::F64, 8).unwrap();
    let engine = GraphEngine::from_sequential(&model).unwrap();
    let n = 17;
    let x = Tensor::from_vec(pseudo_random(n * 3, 81), (n, 3), &Device::Cpu).unwrap();
    let data = TensorDataset::new(x, random_tensor(n, 3, 82)).unwrap();
    let lik = Likelihood::gaussian(0.7);
    let q = Tensor::from_vec(pseudo_random(5 * 3, 83), (5, 3), &Device::Cpu).unwrap();
    let steps = 4;
    let g = engine
        .per_example_gradients(&lik, &data, 0, n, &eo(3))
        .unwrap();
    let p = g.nrows();
    let (qg, qv) = engine
        .query_gradients(&Qoi::Output(1), &q, steps, &eo(3))
        .unwrap();
    let lam = 1e-2;
    let want = dense_kernel_reference(&g, &qg, lam);
    for route in EVERY_ROUTE {
        let lg = engine
            .layered_gradients(&lik, &data, &eo(3), route, 1 << 30)
            .unwrap();
        let (ql, values) = engine
            .query_layered_gradients(&Qoi::Output(1), &q, steps, &eo(3), route)
            .unwrap();
        assert!(max_rel_err(&values, &qv) < 1e-14);
        assert!(mat_rel_err(&ql.to_dense(), &qg) < 1e-12, "{route:?}");
        let norms: Vec<f64> = (0..qg.ncols())
            .map(|j| (0..p).map(|i| qg[(i, j)] * qg[(i, j)]).sum())
            .collect();
        assert!(max_rel_err(&ql.sq_norms(), &norms) < 1e-12, "{route:?}");
        let cross = lg.cross_gram_layered(&ql).unwrap().unwrap();
        assert!(
            mat_rel_err(&cross, &(g.transpose() * &qg)) < 1e-12,
            "{route:?}"
        );
        let kernel = KernelInverseFisher::new(Arc::new(lg), lam).unwrap();
        let got = kernel.quad_forms_layered(&ql).unwrap().unwrap();
        assert!(max_rel_err(&got, &want) < 1e-8, "{route:?}");
    }
    // end to end through the pipeline: the rollout takes the layered route
    kernel_pipeline_takes_the_layered_route(
        &model,
        &data,
        &lik,
        Qoi::Output(1),
        &q,
        steps,
        lam,
        &want,
    );
    // a convolutional step network (each step's patches stacked as rows)
    let spec: SeqSpec = "seq:conv2d(1,2,3,padding=1),tanh,conv2d(2,1,3,padding=1)"
        .parse()
        .unwrap();
    let conv = Sequential::init(spec, &[1, 5, 5], DType::F64, 9).unwrap();
    let ce = GraphEngine::from_sequential(&conv).unwrap();
    let cq = Tensor::from_vec(pseudo_random(3 * 25, 84), (3, 1, 5, 5), &Device::Cpu).unwrap();
    let (cg, _) = ce.query_gradients(&Qoi::Output(7), &cq, 3, &eo(2)).unwrap();
    for route in [LayerRoute::Materialise, LayerRoute::Factor] {
        let (cl, _) = ce
            .query_layered_gradients(&Qoi::Output(7), &cq, 3, &eo(2), route)
            .unwrap();
        assert!(mat_rel_err(&cl.to_dense(), &cg) < 1e-12, "{route:?}");
        let norms: Vec<f64> = (0..cg.ncols())
            .map(|j| (0..cg.nrows()).map(|i| cg[(i, j)] * cg[(i, j)]).sum())
            .collect();
        assert!(max_rel_err(&cl.sq_norms(), &norms) < 1e-12, "{route:?}");
    }
    // a rollout of a network whose output cannot be its input is refused
    let (zoo_model, _, zq) = zoo();
    let err = GraphEngine::from_sequential(&zoo_model)
        .unwrap()
        .query_layered_gradients(&Qoi::Sum, &zq, 2, &eo(3), LayerRoute::Auto)
        .err()
        .unwrap();
    assert!(err.to_string().contains("rolled-out"), "{err}");
}
