//! The capture engine on networks built from `deltavar::nn` layers, checked in f64 against the
//! generic path (one candle backward per example through the same differentiable layers), and
//! the generic path against central finite differences (it is the oracle here).

mod common;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::*;
use deltavar::nn::{self, Conv2dConfig};
use deltavar::sigma::*;
use deltavar::*;

/// conv(1→3, k3, stride 2, pad 1) → relu → maxpool 2 → conv(3→4, k2, dilation 2... ) → flatten →
/// linear(→ 3 classes): a small CNN with stride, padding, dilation and pooling.
struct Cnn {
    c1: nn::Conv2d,
    c2: nn::Conv2d,
    fc: nn::Linear,
}

impl Cnn {
    fn new(vb: VarBuilder) -> Cnn {
        let c1 = nn::conv2d(
            1,
            3,
            3,
            Conv2dConfig {
                padding: 1,
                stride: 2,
                dilation: 1,
            },
            vb.pp("0"),
        )
        .unwrap();
        let c2 = nn::conv2d(
            3,
            4,
            2,
            Conv2dConfig {
                padding: 1,
                stride: 1,
                dilation: 2,
            },
            vb.pp("3"),
        )
        .unwrap();
        // 1×10×10 → c1 5×5 → pool(2, stride 1) 4×4 → c2 (pad 1, dil 2) 4×4 → 4·4·4 = 64
        let fc = nn::linear(64, 3, vb.pp("6")).unwrap();
        Cnn { c1, c2, fc }
    }
}

impl Module for Cnn {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.c1.forward(x)?.relu()?;
        let h = nn::max_pool2d(&h, 2, 1)?;
        let h = self.c2.forward(&h)?.tanh()?;
        self.fc.forward(&h.flatten_from(1)?)
    }
}

fn cnn_problem() -> (Cnn, VarMap, Params, TensorDataset, Tensor) {
    let vm = VarMap::new();
    let cnn = Cnn::new(VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu));
    let params = Params::from_varmap(&vm, ParamOrder::Natural).unwrap();
    let n = 13;
    let x = Tensor::from_vec(pseudo_random(n * 100, 7), (n, 1, 10, 10), &Device::Cpu).unwrap();
    let data = TensorDataset::new(x, random_labels(n, 3, 8)).unwrap();
    let q = Tensor::from_vec(pseudo_random(5 * 100, 9), (5, 1, 10, 10), &Device::Cpu).unwrap();
    (cnn, vm, params, data, q)
}

fn opts(bs: usize) -> CaptureOptions {
    CaptureOptions {
        batch_size: bs,
        chunk_elements: 50,
    }
}

#[test]
fn cnn_capture_matches_the_generic_path() {
    let (cnn, _vm, params, data, q) = cnn_problem();
    let lik = Likelihood::Categorical;
    let generic = GenericFisher::new(&params, lik.of(&cnn), &data, GenericOptions::default());
    let engine = CaptureEngine::new(&cnn, &params);
    // diag F, for several batch sizes (chunked per-example products included)
    let want = generic.fisher_diag().unwrap();
    for bs in [1, 4, 13, 64] {
        let got = engine.sum_sq(&lik, &data, &opts(bs)).unwrap();
        let err = max_rel_err(&got, want.sums());
        assert!(err < 1e-10, "diag, batch {bs}: {err:e}");
    }
    // per-example gradients
    let g = engine
        .per_example_gradients(&lik, &data, 2, 9, &opts(4))
        .unwrap();
    let gw = generic.per_example_gradients(2, 9).unwrap();
    assert!(mat_rel_err(&g, &gw) < 1e-10);
    // query gradients (QoI: probability of class 1)
    let (qg, qv) = engine.query_gradients(&Qoi::Prob(1), &q, &opts(3)).unwrap();
    let (qgw, qvw) = qoi_gradients(
        &params,
        &q,
        Qoi::Prob(1).of(&cnn),
        &GenericOptions::default(),
    )
    .unwrap();
    assert!(mat_rel_err(&qg, &qgw) < 1e-10);
    assert!(max_rel_err(&qv, &qvw) < 1e-12);
    // ΔVar under identity / diagonal / kernel / CG / dense through the captured Fisher source
    let captured = CapturedFisher::new(&cnn, &params, lik.clone(), &data, opts(5));
    for (strategy, method) in [
        (SigmaStrategy::Identity, FullMethod::Auto),
        (SigmaStrategy::DiagonalEmpiricalFim, FullMethod::Auto),
        (SigmaStrategy::InverseFullEmpiricalFim, FullMethod::Dense),
        (SigmaStrategy::InverseFullEmpiricalFim, FullMethod::Kernel),
        (SigmaStrategy::InverseFullEmpiricalFim, FullMethod::Cg),
    ] {
        let name = format!("{} {method:?}", strategy.name());
        let o = SigmaOptions {
            damping: 1e-3,
            full_method: method,
            ..Default::default()
        };
        let same = |s: &SigmaStrategy| match s {
            SigmaStrategy::Identity => SigmaStrategy::Identity,
            SigmaStrategy::DiagonalEmpiricalFim => SigmaStrategy::DiagonalEmpiricalFim,
            _ => SigmaStrategy::InverseFullEmpiricalFim,
        };
        let a = build_sigma(same(&strategy), params.num_params(), &o, Some(&captured)).unwrap();
        let b = build_sigma(strategy, params.num_params(), &o, Some(&generic)).unwrap();
        let va = a.quad_forms(qg.as_ref()).unwrap();
        let vb = b.quad_forms(qgw.as_ref()).unwrap();
        let err = max_rel_err(&va, &vb);
        assert!(err < 1e-10, "{name}: {err:e}");
    }
}

#[test]
fn the_generic_oracle_matches_finite_differences_on_the_cnn() {
    let (cnn, _vm, params, data, _q) = cnn_problem();
    let lik = Likelihood::Categorical;
    let generic = GenericFisher::new(&params, lik.of(&cnn), &data, GenericOptions::default());
    let g = generic.per_example_gradients(3, 1).unwrap();
    let (x, y) = data.get(3, 1).unwrap();
    let theta = params.flat_values().unwrap();
    let f = |t: &[f64]| {
        params.set_flat_values(t).unwrap();
        let v = lik
            .log_likelihood(&cnn.forward(&x).unwrap(), &y)
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()[0];
        params.set_flat_values(&theta).unwrap();
        v
    };
    let p = params.num_params();
    // every conv weight and bias entry of the first conv, a spread of the rest
    let idx: Vec<usize> = (0..30).chain((30..p).step_by(7)).collect();
    for k in idx {
        let h = 1e-6;
        let (mut up, mut dn) = (theta.clone(), theta.clone());
        up[k] += h;
        dn[k] -= h;
        let fd = (f(&up) - f(&dn)) / (2.0 * h);
        assert!(
            (fd - g[(k, 0)]).abs() <= 1e-6 * (1.0 + fd.abs()),
            "entry {k}: fd {fd} vs {}",
            g[(k, 0)]
        );
    }
}

#[test]
fn pooling_backward_matches_finite_differences_where_candle_nn_is_off() {
    let x = Tensor::from_vec(pseudo_random(2 * 3 * 7 * 7, 5), (2, 3, 7, 7), &Device::Cpu).unwrap();
    for (name, k, s) in [
        ("max 2/2", 2, 2),
        ("max 3/2", 3, 2),
        ("avg 2/2", 2, 2),
        ("avg 3/1", 3, 1),
    ] {
        let pool = |t: &Tensor| {
            if name.starts_with("max") {
                nn::max_pool2d(t, k, s)
            } else {
                nn::avg_pool2d(t, k, s)
            }
        };
        let var = candle_core::Var::from_tensor(&x).unwrap();
        let out = pool(var.as_tensor()).unwrap();
        let w = Tensor::from_vec(
            pseudo_random(out.elem_count(), 6),
            out.shape(),
            &Device::Cpu,
        )
        .unwrap();
        let loss = (out * &w).unwrap().sum_all().unwrap();
        let g = loss.backward().unwrap();
        let gx: Vec<f64> = g
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let xv: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
        let f = |v: &[f64]| {
            let t = Tensor::from_vec(v.to_vec(), (2, 3, 7, 7), &Device::Cpu).unwrap();
            (pool(&t).unwrap() * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        for k2 in (0..xv.len()).step_by(5) {
            let h = 1e-7;
            let (mut up, mut dn) = (xv.clone(), xv.clone());
            up[k2] += h;
            dn[k2] -= h;
            let fd = (f(&up) - f(&dn)) / (2.0 * h);
            assert!(
                (fd - gx[k2]).abs() < 1e-6,
                "{name} entry {k2}: fd {fd} vs {}",
                gx[k2]
            );
        }
        // the values equal candle's where candle's forward applies
        if k == s {
            let c = if name.starts_with("max") {
                x.max_pool2d(k).unwrap()
            } else {
                x.avg_pool2d(k).unwrap()
            };
            let ours = pool(&x).unwrap();
            let d: f64 = (c - ours)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap();
            assert!(d < 1e-12, "{name}: values differ from candle's");
        }
    }
    // candle 0.11.1's own max-pool backward is 4× too small for 2×2 windows (the trap we avoid)
    let var = candle_core::Var::from_tensor(&x.narrow(2, 0, 6).unwrap().narrow(3, 0, 6).unwrap())
        .unwrap();
    let g = var
        .as_tensor()
        .max_pool2d(2)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let total: f64 = g
        .get(var.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    let windows = (2 * 3 * 3 * 3) as f64;
    assert!(
        (total - windows / 4.0).abs() < 1e-9,
        "candle's max-pool backward changed: {total}"
    );
    let g = nn::max_pool2d(var.as_tensor(), 2, 2)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let total: f64 = g
        .get(var.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!((total - windows).abs() < 1e-9, "ours: {total}");
}

/// An MLP step function applied 8 times (the paper's rollout); the QoI reads the final state.
/// The layers are used 8 times per query: their per-example gradients sum over the uses.
#[test]
fn rollout_queries_match_the_generic_path() {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu);
    let l1 = nn::linear(3, 8, vb.pp("0")).unwrap();
    let l2 = nn::linear(8, 3, vb.pp("2")).unwrap();
    let params = Params::from_varmap(&vm, ParamOrder::Natural).unwrap();
    struct Rollout<'a> {
        l1: &'a nn::Linear,
        l2: &'a nn::Linear,
    }
    impl Module for Rollout<'_> {
        fn forward(&self, s: &Tensor) -> candle_core::Result<Tensor> {
            let mut s = s.clone();
            for _ in 0..8 {
                let h = self.l1.forward(&s)?.tanh()?;
                s = (&s + (self.l2.forward(&h)? * 0.5)?)?;
            }
            Ok(s)
        }
    }
    let model = Rollout { l1: &l1, l2: &l2 };
    let z = random_tensor(6, 3, 21);
    let engine = CaptureEngine::new(&model, &params);
    let (g, v) = engine
        .query_gradients(&Qoi::Output(2), &z, &opts(4))
        .unwrap();
    let (gw, vw) = qoi_gradients(
        &params,
        &z,
        Qoi::Output(2).of(&model),
        &GenericOptions::default(),
    )
    .unwrap();
    assert!(mat_rel_err(&g, &gw) < 1e-10, "{}", mat_rel_err(&g, &gw));
    assert!(max_rel_err(&v, &vw) < 1e-12);
    // one-step training pairs: diag F through the capture engine equals the generic one
    let data = TensorDataset::new(random_tensor(20, 3, 22), random_tensor(20, 3, 23)).unwrap();
    let step = Rollout1 { l1: &l1, l2: &l2 };
    let lik = Likelihood::gaussian(0.3);
    let a = CaptureEngine::new(&step, &params)
        .sum_sq(&lik, &data, &opts(7))
        .unwrap();
    let b = GenericFisher::new(&params, lik.of(&step), &data, GenericOptions::default())
        .fisher_diag()
        .unwrap();
    assert!(max_rel_err(&a, b.sums()) < 1e-10);
    struct Rollout1<'a> {
        l1: &'a nn::Linear,
        l2: &'a nn::Linear,
    }
    impl Module for Rollout1<'_> {
        fn forward(&self, s: &Tensor) -> candle_core::Result<Tensor> {
            let h = self.l1.forward(s)?.tanh()?;
            s + (self.l2.forward(&h)? * 0.5)?
        }
    }
}

#[test]
fn layers_equal_candle_nn_outside_capture_and_foreign_parameters_are_named() {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu);
    let ours = nn::conv2d(
        2,
        3,
        3,
        Conv2dConfig {
            padding: 1,
            stride: 2,
            dilation: 1,
        },
        vb.pp("c"),
    )
    .unwrap();
    let theirs = candle_nn::Conv2d::new(
        ours.weight().clone(),
        ours.bias().cloned(),
        candle_nn::Conv2dConfig {
            padding: 1,
            stride: 2,
            dilation: 1,
            groups: 1,
            cudnn_fwd_algo: None,
        },
    );
    let x = Tensor::from_vec(pseudo_random(2 * 2 * 9 * 9, 3), (2, 2, 9, 9), &Device::Cpu).unwrap();
    let d: f64 = (ours.forward(&x).unwrap() - theirs.forward(&x).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(d < 1e-12, "conv2d differs from candle-nn's: {d}");
    let lin = nn::linear(5, 4, vb.pp("l")).unwrap();
    let cl = candle_nn::Linear::new(lin.weight().clone(), lin.bias().cloned());
    let x = random_tensor(3, 5, 4);
    let d: f64 = (lin.forward(&x).unwrap() - cl.forward(&x).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert!(d < 1e-14);
    // a model with a candle-nn layer: its parameters belong to no captured layer
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu);
    let a = nn::linear(3, 4, vb.pp("a")).unwrap();
    let b = candle_nn::linear(4, 2, vb.pp("b")).unwrap();
    let params = Params::from_varmap(&vm, ParamOrder::Natural).unwrap();
    struct Mixed<'a>(&'a nn::Linear, &'a candle_nn::Linear);
    impl Module for Mixed<'_> {
        fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
            self.1.forward(&self.0.forward(x)?.tanh()?)
        }
    }
    let m = Mixed(&a, &b);
    let data = TensorDataset::new(random_tensor(4, 3, 1), random_tensor(4, 2, 2)).unwrap();
    let e = CaptureEngine::new(&m, &params)
        .sum_sq(
            &Likelihood::gaussian(1.0),
            &data,
            &CaptureOptions::default(),
        )
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("b.weight") && e.contains("b.bias") && !e.contains("a.weight"),
        "{e}"
    );
}
