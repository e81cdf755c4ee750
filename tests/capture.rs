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

/// The layered gradient operator, under every route, equals the dense block `g` (P×N): G·V,
/// Gᵀ·U, the Gram matrix and the squared sums.
fn check_layered<M: Module + Sync>(
    engine: &CaptureEngine<'_, M>,
    lik: &Likelihood,
    data: &dyn Dataset,
    g: &faer::Mat<f64>,
    queries: &Tensor,
    bs: usize,
) {
    use deltavar::engine::LayerRoute;
    let (qg, qv) = engine
        .query_gradients(&Qoi::Sum, queries, &opts(bs))
        .unwrap();
    let (p, n) = (g.nrows(), g.ncols());
    let v = faer::Mat::from_fn(p, 2, |i, j| pseudo_random(2 * p, 81)[i * 2 + j]);
    let u = faer::Mat::from_fn(n, 3, |i, j| pseudo_random(3 * n, 82)[i * 3 + j]);
    let sq: Vec<f64> = (0..p)
        .map(|i| (0..n).map(|j| g[(i, j)] * g[(i, j)]).sum())
        .collect();
    let mut factored_somewhere = false;
    for route in EVERY_ROUTE {
        let lg = engine
            .layered_gradients(lik, data, &opts(bs), route, 1 << 30)
            .unwrap();
        let routes = lg.layer_routes();
        factored_somewhere |= routes.iter().any(|(_, f)| *f);
        if route == LayerRoute::Materialise {
            assert!(routes.iter().all(|(_, f)| !*f));
        }
        assert!(
            mat_rel_err(&lg.jv(v.as_ref()).unwrap(), &(g.transpose() * &v)) < 1e-12,
            "{route:?}"
        );
        assert!(
            mat_rel_err(&lg.jtu(u.as_ref()).unwrap(), &(g * &u)) < 1e-12,
            "{route:?}"
        );
        assert!(
            mat_rel_err(&lg.gram().unwrap(), &(g.transpose() * g)) < 1e-12,
            "{route:?}"
        );
        assert!(
            norm_rel_err(&lg.diag_sums().unwrap(), &sq) < 1e-12,
            "{route:?}"
        );
        // the queries held the same way: values, gradients and G·q pair by pair
        let (ql, values) = engine
            .query_layered_gradients(&Qoi::Sum, queries, &opts(bs), route, 1 << 30)
            .unwrap();
        assert!(max_rel_err(&values, &qv) < 1e-14);
        assert!(mat_rel_err(&ql.to_dense(), &qg) < 1e-12, "{route:?}");
        let cross = lg.cross_gram_layered(&ql).unwrap().unwrap();
        assert!(
            mat_rel_err(&cross, &(g.transpose() * &qg)) < 1e-12,
            "{route:?}"
        );
        let norms: Vec<f64> = (0..qg.ncols())
            .map(|j| (0..p).map(|i| qg[(i, j)] * qg[(i, j)]).sum())
            .collect();
        assert!(max_rel_err(&ql.sq_norms(), &norms) < 1e-12, "{route:?}");
    }
    assert!(factored_somewhere);
    // too small a budget is an error naming it, not an allocation failure
    let err = engine
        .layered_gradients(lik, data, &opts(bs), LayerRoute::Auto, 16)
        .err()
        .unwrap();
    assert!(err.to_string().contains("memory budget"), "{err}");
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
    let p = params.num_params();
    // every conv weight and bias entry of the first conv, a spread of the rest
    assert_matches_fd(
        &params,
        (0..30).chain((30..p).step_by(7)),
        |k| g[(k, 0)],
        || {
            lik.log_likelihood(&cnn.forward(&x).unwrap(), &y)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()[0]
        },
        "cnn",
    );
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

/// A tiny transformer block classifier: token + position embeddings, pre-LayerNorm multi-head
/// attention and GELU MLP with residuals, final layer norm, mean-pool, linear head.
struct Tiny {
    emb: nn::Embedding,
    pos: nn::Embedding,
    ln1: nn::Norm,
    qkv: nn::Linear,
    proj: nn::Linear,
    ln2: nn::Norm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    lnf: nn::Norm,
    head: nn::Linear,
    heads: usize,
}

impl Tiny {
    fn new(vb: VarBuilder, v: usize, t: usize, d: usize, heads: usize, c: usize) -> Tiny {
        Tiny {
            emb: nn::embedding(v, d, vb.pp("emb")).unwrap(),
            pos: nn::embedding(t, d, vb.pp("pos")).unwrap(),
            ln1: nn::layer_norm(d, 1e-5, vb.pp("ln1")).unwrap(),
            qkv: nn::linear(d, 3 * d, vb.pp("qkv")).unwrap(),
            proj: nn::linear(d, d, vb.pp("proj")).unwrap(),
            ln2: nn::layer_norm(d, 1e-5, vb.pp("ln2")).unwrap(),
            fc1: nn::linear(d, 2 * d, vb.pp("fc1")).unwrap(),
            fc2: nn::linear(2 * d, d, vb.pp("fc2")).unwrap(),
            lnf: nn::rms_norm(d, 1e-5, vb.pp("lnf")).unwrap(),
            head: nn::linear(d, c, vb.pp("head")).unwrap(),
            heads,
        }
    }
}

impl Module for Tiny {
    fn forward(&self, tok: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t) = tok.dims2()?;
        let pos_ids = Tensor::arange(0u32, t as u32, tok.device())?
            .unsqueeze(0)?
            .broadcast_as((b, t))?
            .contiguous()?;
        let x = (self.emb.forward(tok)? + self.pos.forward(&pos_ids)?)?;
        let d = x.dim(2)?;
        let hd = d / self.heads;
        let qkv = self.qkv.forward(&self.ln1.forward(&x)?)?;
        let split = |i: usize| -> candle_core::Result<Tensor> {
            qkv.narrow(2, i * d, d)?
                .reshape((b, t, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        let att = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
        let att = candle_nn::ops::softmax(&att, candle_core::D::Minus1)?;
        let y = att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?;
        let x = (x + self.proj.forward(&y)?)?;
        let h = self.fc1.forward(&self.ln2.forward(&x)?)?.gelu_erf()?;
        let x = (&x + self.fc2.forward(&h)?)?;
        self.head.forward(&self.lnf.forward(&x)?.mean(1)?)
    }
}

#[test]
fn transformer_capture_matches_the_generic_path_and_finite_differences() {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu);
    let (v, t, d, c) = (11, 5, 8, 3);
    let model = Tiny::new(vb, v, t, d, 2, c);
    // non-trivial norm parameters
    let params = Params::from_varmap(&vm, ParamOrder::Natural).unwrap();
    let theta: Vec<f64> = params
        .flat_values()
        .unwrap()
        .iter()
        .zip(pseudo_random(params.num_params(), 31))
        .map(|(a, r)| a + 0.1 * r)
        .collect();
    params.set_flat_values(&theta).unwrap();
    let n = 9;
    let ids: Vec<u32> = (0..n * t).map(|i| ((i * 7 + i / 3) % v) as u32).collect();
    let tok = Tensor::from_vec(ids, (n, t), &Device::Cpu).unwrap();
    let data = TensorDataset::new(tok.clone(), random_labels(n, c, 3)).unwrap();
    let lik = Likelihood::Categorical;
    let engine = CaptureEngine::new(&model, &params);
    let generic = GenericFisher::new(&params, lik.of(&model), &data, GenericOptions::default());
    let want = generic.fisher_diag().unwrap();
    for bs in [1, 4, 9] {
        let got = engine.sum_sq(&lik, &data, &opts(bs)).unwrap();
        // norm-wise: the key bias of attention has an exactly zero gradient (softmax is shift
        // invariant), so entrywise relative errors there compare rounding noise
        let err = norm_rel_err(&got, want.sums());
        assert!(err < 1e-12, "diag, batch {bs}: {err:e}");
        for e in params.entries() {
            let a = &got[e.offset..e.offset + e.numel];
            let b = &want.sums()[e.offset..e.offset + e.numel];
            let diff: f64 = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).powi(2))
                .sum::<f64>()
                .sqrt();
            let scale: f64 = want.sums().iter().map(|y| y * y).sum::<f64>().sqrt();
            assert!(diff <= 1e-12 * scale, "{}: {diff:e}", e.name);
        }
    }
    let g = engine
        .per_example_gradients(&lik, &data, 0, n, &opts(4))
        .unwrap();
    let gw = generic.per_example_gradients(0, n).unwrap();
    assert!(mat_rel_err(&g, &gw) < 1e-10, "{}", mat_rel_err(&g, &gw));
    check_layered(&engine, &lik, &data, &g, &tok, 4);
    let (qg, _) = engine
        .query_gradients(&Qoi::Prob(1), &tok, &opts(4))
        .unwrap();
    let (qgw, _) = qoi_gradients(
        &params,
        &tok,
        Qoi::Prob(1).of(&model),
        &GenericOptions::default(),
    )
    .unwrap();
    assert!(mat_rel_err(&qg, &qgw) < 1e-10);
    // the generic oracle against central finite differences (embeddings, norms, attention)
    let (x, y) = data.get(2, 1).unwrap();
    let g2 = generic.per_example_gradients(2, 1).unwrap();
    assert_matches_fd(
        &params,
        (0..params.num_params()).step_by(13),
        |k| g2[(k, 0)],
        || {
            lik.log_likelihood(&model.forward(&x).unwrap(), &y)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()[0]
        },
        "transformer",
    );
    // a candle-nn fused layer norm in the same place would give no gradient: an error, not zeros
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let l1 = nn::linear(4, 4, vb.pp("a")).unwrap();
    let fused = candle_nn::layer_norm(4, 1e-5, vb.pp("ln")).unwrap();
    let params = Params::from_varmap(&vm, ParamOrder::Natural).unwrap();
    struct WithFused<'a>(&'a nn::Linear, &'a candle_nn::LayerNorm);
    impl Module for WithFused<'_> {
        fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
            self.1.forward(&self.0.forward(x)?)
        }
    }
    let m = WithFused(&l1, &fused);
    let data = TensorDataset::new(
        random_tensor(3, 4, 1).to_dtype(DType::F32).unwrap(),
        random_tensor(3, 4, 2).to_dtype(DType::F32).unwrap(),
    )
    .unwrap();
    let e = CaptureEngine::new(&m, &params)
        .sum_sq(
            &Likelihood::gaussian(1.0),
            &data,
            &CaptureOptions::default(),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("ln.weight"), "{e}");
}

/// Images (N, C, H, W) and token ids (N, T) int64 memory-mapped: rows come back with their
/// trailing shape, and the capture engine gives the same sums as on in-memory tensors.
#[test]
fn memory_mapped_images_and_token_ids() {
    use deltavar::data::{write_npy, RowsRef};
    let dir = std::env::temp_dir().join(format!("deltavar-capture-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (cnn, _vm, params, data, _q) = cnn_problem();
    let (x, y) = data.get(0, data.len()).unwrap();
    let xv: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
    let yv: Vec<i64> = y.to_dtype(DType::I64).unwrap().to_vec1().unwrap();
    write_npy(dir.join("x.npy"), x.dims(), RowsRef::F64(&xv)).unwrap();
    write_npy(dir.join("y.npy"), &[yv.len()], RowsRef::I64(&yv)).unwrap();
    let mm = MmapNpyDataset::open(dir.join("x.npy"), dir.join("y.npy")).unwrap();
    assert_eq!(mm.get(2, 3).unwrap().0.dims(), &[3, 1, 10, 10]);
    let lik = Likelihood::Categorical;
    let engine = CaptureEngine::new(&cnn, &params);
    let a = engine.sum_sq(&lik, &mm, &opts(4)).unwrap();
    let b = engine.sum_sq(&lik, &data, &opts(4)).unwrap();
    assert_eq!(a, b);
    // token ids as int64
    let ids: Vec<i64> = (0..6 * 5).map(|i| (i * 3 % 11) as i64).collect();
    write_npy(dir.join("tok.npy"), &[6, 5], RowsRef::I64(&ids)).unwrap();
    write_npy(dir.join("lab.npy"), &[6], RowsRef::I64(&[0, 1, 2, 0, 1, 2])).unwrap();
    let mm = MmapNpyDataset::open(dir.join("tok.npy"), dir.join("lab.npy")).unwrap();
    let (t, _) = mm.get(1, 2).unwrap();
    assert_eq!((t.dims(), t.dtype()), (&[2usize, 5][..], DType::I64));
    let vm = VarMap::new();
    let model = Tiny::new(
        VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu),
        11,
        5,
        8,
        2,
        3,
    );
    let params = Params::from_varmap(&vm, ParamOrder::Natural).unwrap();
    let mem = TensorDataset::new(
        Tensor::from_vec(ids, (6, 5), &Device::Cpu).unwrap(),
        Tensor::new(&[0i64, 1, 2, 0, 1, 2], &Device::Cpu).unwrap(),
    )
    .unwrap();
    let e = CaptureEngine::new(&model, &params);
    let a = e.sum_sq(&lik, &mm, &opts(4)).unwrap();
    let b = e.sum_sq(&lik, &mem, &opts(4)).unwrap();
    assert_eq!(a, b);
}

/// Offline passes of a captured model: three shards merge to the whole pass, the artifact is
/// checked against the parameters it summed, and serves the diagonal strategy.
#[test]
fn offline_passes_and_shards_for_a_captured_model() {
    let (cnn, _vm, params, data, q) = cnn_problem();
    let lik = Likelihood::Categorical;
    let pass = |shard, kind| {
        fisher_pass(
            &CaptureEngine::new(&cnn, &params),
            lik.clone(),
            "categorical",
            &data,
            &PassOptions {
                kind,
                shard,
                engine: FactoredOptions {
                    batch_size: 4,
                    threads: 0,
                },
                ..Default::default()
            },
            &mut |_, _| {},
        )
        .unwrap()
    };
    let whole = pass(None, PassKind::Diag);
    let shards: Vec<FisherArtifact> = (0..3).map(|i| pass(Some((i, 3)), PassKind::Diag)).collect();
    let merged = FisherArtifact::merge(&shards).unwrap();
    assert!(merged.is_complete());
    assert!(max_rel_err(merged.diag.sums(), whole.diag.sums()) < 1e-12);
    merged.check_model(&params).unwrap();
    let direct = CaptureEngine::new(&cnn, &params)
        .sum_sq(&lik, &data, &opts(5))
        .unwrap();
    assert!(max_rel_err(whole.diag.sums(), &direct) < 1e-12);
    // the dense pass serves the full inverse; equal to the captured Fisher's
    let dense = pass(None, PassKind::Dense);
    let o = SigmaOptions {
        damping: 1e-2,
        full_method: FullMethod::Dense,
        ..Default::default()
    };
    let (qg, _) = CaptureEngine::new(&cnn, &params)
        .query_gradients(&Qoi::Output(0), &q, &opts(5))
        .unwrap();
    let a = build_sigma(
        SigmaStrategy::InverseFullEmpiricalFim,
        params.num_params(),
        &o,
        Some(&dense),
    )
    .unwrap()
    .quad_forms(qg.as_ref())
    .unwrap();
    let captured = CapturedFisher::new(&cnn, &params, lik.clone(), &data, opts(5));
    let b = build_sigma(
        SigmaStrategy::InverseFullEmpiricalFim,
        params.num_params(),
        &o,
        Some(&captured),
    )
    .unwrap()
    .quad_forms(qg.as_ref())
    .unwrap();
    assert!(max_rel_err(&a, &b) < 1e-10);
}

/// conv1d (stride, padding, dilation) → tanh → conv1d → flatten → linear, against the generic
/// path and finite differences.
#[test]
fn conv1d_capture_matches_the_generic_path() {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu);
    let c1 = nn::conv1d(
        2,
        3,
        3,
        Conv2dConfig {
            padding: 2,
            stride: 2,
            dilation: 2,
        },
        vb.pp("0"),
    )
    .unwrap();
    let c2 = nn::conv1d(3, 4, 2, Conv2dConfig::default(), vb.pp("2")).unwrap();
    // L = 12 → c1: (12 + 4 − 5)/2 + 1 = 6 → c2: 5 → 4·5 = 20
    let fc = nn::linear(20, 2, vb.pp("4")).unwrap();
    struct Net<'a>(&'a nn::Conv1d, &'a nn::Conv1d, &'a nn::Linear);
    impl Module for Net<'_> {
        fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
            let h = self.1.forward(&self.0.forward(x)?.tanh()?)?.tanh()?;
            self.2.forward(&h.flatten_from(1)?)
        }
    }
    let net = Net(&c1, &c2, &fc);
    let params = Params::from_varmap(&vm, ParamOrder::Natural).unwrap();
    let n = 7;
    let x = Tensor::from_vec(pseudo_random(n * 24, 41), (n, 2, 12), &Device::Cpu).unwrap();
    let data = TensorDataset::new(x.clone(), random_tensor(n, 2, 42)).unwrap();
    let lik = Likelihood::gaussian(0.5);
    let generic = GenericFisher::new(&params, lik.of(&net), &data, GenericOptions::default());
    let engine = CaptureEngine::new(&net, &params);
    let got = engine.sum_sq(&lik, &data, &opts(3)).unwrap();
    let want = generic.fisher_diag().unwrap();
    let g = engine
        .per_example_gradients(&lik, &data, 0, n, &opts(3))
        .unwrap();
    let gw = generic.per_example_gradients(0, n).unwrap();
    // the oracle against finite differences
    let (x1, y1) = data.get(4, 1).unwrap();
    assert_matches_fd(
        &params,
        (0..params.num_params()).step_by(3),
        |k| gw[(k, 4)],
        || {
            lik.log_likelihood(&net.forward(&x1).unwrap(), &y1)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()[0]
        },
        "conv1d",
    );
    assert!(max_rel_err(&got, want.sums()) < 1e-10);
    assert!(mat_rel_err(&g, &gw) < 1e-10);
    check_layered(&engine, &lik, &data, &g, &x.narrow(0, 1, 4).unwrap(), 3);
}

/// candle 0.11.1's conv1d backward is wrong for every example of a batch but the first; ours
/// (through conv2d) gives each example the gradient it gets alone.
#[test]
fn conv1d_input_gradients_are_per_example_in_a_batch() {
    let x = Tensor::from_vec(pseudo_random(3 * 3 * 6, 51), (3, 3, 6), &Device::Cpu).unwrap();
    let w = Tensor::from_vec(pseudo_random(4 * 3 * 2, 52), (4, 3, 2), &Device::Cpu).unwrap();
    let r = Tensor::from_vec(pseudo_random(3 * 4 * 5, 53), (3, 4, 5), &Device::Cpu).unwrap();
    let ours = nn::Conv1d::new(w.clone(), None, Conv2dConfig::default());
    let grad_of = |f: &dyn Fn(&Tensor) -> Tensor, x: &Tensor, r: &Tensor| -> Tensor {
        let v = candle_core::Var::from_tensor(x).unwrap();
        let g = (f(v.as_tensor()) * r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        g.get(v.as_tensor()).unwrap().clone()
    };
    let ours_f = |t: &Tensor| ours.forward(t).unwrap();
    let candle_f = |t: &Tensor| t.conv1d(&w, 0, 1, 1, 1).unwrap();
    let maxdiff = |a: Tensor, b: Tensor| -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    };
    let gb = grad_of(&ours_f, &x, &r);
    let gc = grad_of(&candle_f, &x, &r);
    let mut candle_wrong = 0.0f64;
    for i in 0..3 {
        let xi = x.narrow(0, i, 1).unwrap();
        let ri = r.narrow(0, i, 1).unwrap();
        let alone = grad_of(&ours_f, &xi, &ri);
        let d = maxdiff(alone.clone(), gb.narrow(0, i, 1).unwrap());
        assert!(d < 1e-12, "ours, example {i}: {d}");
        candle_wrong = candle_wrong.max(maxdiff(alone, gc.narrow(0, i, 1).unwrap()));
    }
    // the trap we avoid (if candle fixes it, this documents the fix)
    assert!(
        candle_wrong > 1e-3,
        "candle's conv1d batch backward now agrees: {candle_wrong}"
    );
    // the values agree with candle's conv1d
    assert!(maxdiff(ours_f(&x), candle_f(&x)) < 1e-12);
}

/// A strided conv2d on a non-square input (9×10, stride 2): candle's conv backward fails on
/// the uneven width remainder unless the input is cropped to the span it reads; the capture
/// engine and the generic oracle agree, and the oracle matches finite differences.
#[test]
fn strided_conv2d_on_a_non_square_input() {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F64, &Device::Cpu);
    let c1 = nn::conv2d(
        1,
        2,
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
        2,
        2,
        2,
        Conv2dConfig {
            padding: 0,
            stride: 2,
            dilation: 1,
        },
        vb.pp("1"),
    )
    .unwrap();
    // 9×10 → c1 5×5 → c2 2×2 → 8
    let fc = nn::linear(8, 2, vb.pp("2")).unwrap();
    struct Net<'a>(&'a nn::Conv2d, &'a nn::Conv2d, &'a nn::Linear);
    impl Module for Net<'_> {
        fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
            let h = self.1.forward(&self.0.forward(x)?.tanh()?)?.tanh()?;
            self.2.forward(&h.flatten_from(1)?)
        }
    }
    let net = Net(&c1, &c2, &fc);
    let params = Params::from_varmap(&vm, ParamOrder::Natural).unwrap();
    let n = 5;
    let x = Tensor::from_vec(pseudo_random(n * 90, 61), (n, 1, 9, 10), &Device::Cpu).unwrap();
    let data = TensorDataset::new(x, random_tensor(n, 2, 62)).unwrap();
    let lik = Likelihood::gaussian(1.0);
    let generic = GenericFisher::new(&params, lik.of(&net), &data, GenericOptions::default());
    let g = CaptureEngine::new(&net, &params)
        .per_example_gradients(&lik, &data, 0, n, &opts(3))
        .unwrap();
    let gw = generic.per_example_gradients(0, n).unwrap();
    assert!(mat_rel_err(&g, &gw) < 1e-10);
    let (x1, y1) = data.get(3, 1).unwrap();
    assert_matches_fd(
        &params,
        0..params.num_params(),
        |k| gw[(k, 3)],
        || {
            lik.log_likelihood(&net.forward(&x1).unwrap(), &y1)
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()[0]
        },
        "strided conv2d",
    );
}

/// The streamed gradient operator of a captured model (used when G does not fit the budget)
/// equals the in-memory one: G·V, Gᵀ·U, the Gram matrix and the squared sums.
#[test]
fn streamed_captured_gradients_match_the_block() {
    use deltavar::engine::{GradientMatrix, StreamedGradients};
    let (cnn, _vm, params, data, _q) = cnn_problem();
    let lik = Likelihood::Categorical;
    let engine = CaptureEngine::new(&cnn, &params);
    let g = engine
        .per_example_gradients(&lik, &data, 0, data.len(), &opts(4))
        .unwrap();
    let fo = FactoredOptions {
        batch_size: 4,
        threads: 1,
    };
    let streamed = StreamedGradients::from_engine(&engine, &lik, &data, fo);
    let p = params.num_params();
    let n = data.len();
    let v = faer::Mat::from_fn(p, 2, |i, j| pseudo_random(2 * p, 71)[i * 2 + j]);
    let u = faer::Mat::from_fn(n, 3, |i, j| pseudo_random(3 * n, 72)[i * 3 + j]);
    assert!(mat_rel_err(&streamed.jv(v.as_ref()).unwrap(), &(g.transpose() * &v)) < 1e-12);
    assert!(mat_rel_err(&streamed.jtu(u.as_ref()).unwrap(), &(&g * &u)) < 1e-12);
    assert!(mat_rel_err(&streamed.gram().unwrap(), &(g.transpose() * &g)) < 1e-12);
    let sq: Vec<f64> = (0..p)
        .map(|i| (0..n).map(|j| g[(i, j)] * g[(i, j)]).sum())
        .collect();
    assert!(max_rel_err(&streamed.diag_sums().unwrap(), &sq) < 1e-10);
    check_layered(&engine, &lik, &data, &g, &_q, 4);
}
