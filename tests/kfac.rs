//! K-FAC Σ: exact for one example (Ā ⊗ Ḡ = g gᵀ per layer), equal to the explicit dense
//! inverse of the damped Kronecker blocks otherwise, and refusing bad input.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use deltavar::engine::GraphEngine;
use deltavar::model::{SeqSpec, Sequential, Transformer};
use deltavar::sigma::*;
use deltavar::*;
use faer::Mat;

fn eo() -> FactoredOptions {
    FactoredOptions {
        batch_size: 3,
        threads: 2,
    }
}

/// The flat indices of a factored layer in the Kronecker order (o major, then the inputs and
/// the bias last).
fn kron_indices(l: &KfacLayer) -> Vec<usize> {
    let mut v = vec![];
    for o in 0..l.out {
        for i in 0..l.inp {
            v.push(l.w_off + o * l.inp + i);
        }
        if let Some(b) = l.b_off {
            v.push(b + o);
        }
    }
    v
}

fn dense_inverse(m: &Mat<f64>) -> Mat<f64> {
    let rows = to_rows(m.as_ref());
    let inv = gauss_jordan_inverse(&rows);
    Mat::from_fn(m.nrows(), m.ncols(), |i, j| inv[i][j])
}

#[test]
fn kfac_is_exact_for_one_example() {
    let spec: SeqSpec = "seq:linear(3,5),tanh,layernorm(5),linear(5,2)"
        .parse()
        .unwrap();
    let model = Sequential::init(spec, &[3], DType::F64, 2).unwrap();
    let params = model.params().unwrap();
    let x = random_tensor(1, 3, 1);
    let y = random_tensor(1, 2, 2);
    let data = TensorDataset::new(x, y).unwrap();
    let lik = Likelihood::gaussian(0.7);
    let engine = GraphEngine::from_sequential(&model).unwrap();
    let f = engine.kfac_factors(&lik, &data, &eo()).unwrap();
    assert_eq!(f.layers.len(), 2);
    // the layer norm's weight and bias, each its own diagonal block
    assert_eq!(f.diagonal.len(), 2);
    assert_eq!(f.diagonal.iter().map(|(_, d)| d.len()).sum::<usize>(), 10);
    let lam = 0.3;
    let s = KfacSigma::new(&f, lam).unwrap();
    // the reference: block-diagonal (g_l g_lᵀ + λI)⁻¹ over each layer's indices, (g² + λ)⁻¹ on
    // the norm's diagonal
    let g = GenericFisher::new(&params, lik.of(&model), &data, GenericOptions::default())
        .per_example_gradients(0, 1)
        .unwrap();
    let p = params.num_params();
    let mut reference = Mat::<f64>::zeros(p, p);
    for l in &f.layers {
        let idx = kron_indices(l);
        let block = Mat::from_fn(idx.len(), idx.len(), |a, b| {
            g[(idx[a], 0)] * g[(idx[b], 0)] + if a == b { lam } else { 0.0 }
        });
        let inv = dense_inverse(&block);
        for (a, &ia) in idx.iter().enumerate() {
            for (b, &ib) in idx.iter().enumerate() {
                reference[(ia, ib)] = inv[(a, b)];
            }
        }
    }
    for (off, d) in &f.diagonal {
        for (i, di) in d.iter().enumerate() {
            assert!((di - g[(off + i, 0)].powi(2)).abs() < 1e-12);
            reference[(off + i, off + i)] = 1.0 / (g[(off + i, 0)].powi(2) + lam);
        }
    }
    let v = Mat::from_fn(p, 4, |i, j| ((i * 7 + j * 3) % 11) as f64 - 5.0);
    let got = s.apply(v.as_ref()).unwrap();
    let want = &reference * &v;
    assert!(
        mat_rel_err(&got, &want) < 1e-10,
        "{}",
        mat_rel_err(&got, &want)
    );
}

#[test]
fn kfac_equals_the_dense_damped_kronecker_inverse() {
    // a CNN (a conv used at every pixel: the expand reduction) and a Linear used on rows
    let spec: SeqSpec =
        "seq:conv2d(1,3,3,padding=1),relu,avgpool2d(2),flatten,linear(12,4),tanh,linear(4,3)"
            .parse()
            .unwrap();
    let model = Sequential::init(spec, &[1, 4, 4], DType::F64, 5).unwrap();
    let n = 7;
    let x = Tensor::from_vec(pseudo_random(n * 16, 3), (n, 1, 4, 4), &Device::Cpu).unwrap();
    let data = TensorDataset::new(x, random_labels(n, 3, 4)).unwrap();
    let engine = GraphEngine::from_sequential(&model).unwrap();
    let f = engine
        .kfac_factors(&Likelihood::Categorical, &data, &eo())
        .unwrap();
    assert_eq!(f.layers.len(), 3);
    let lam = 1e-2;
    let s = KfacSigma::new(&f, lam).unwrap();
    let p = model.num_params();
    let mut reference = Mat::<f64>::zeros(p, p);
    for l in &f.layers {
        let k = l.inp + usize::from(l.b_off.is_some());
        let idx = kron_indices(l);
        // vec order (o, i): (Ḡ ⊗ Ā)[(o,i),(o',i')] = Ḡ[o,o']·Ā[i,i']
        let block = Mat::from_fn(idx.len(), idx.len(), |r, c| {
            let (o, i) = (r / k, r % k);
            let (o2, i2) = (c / k, c % k);
            l.g[o * l.out + o2] * l.a[i * k + i2] + if r == c { lam } else { 0.0 }
        });
        let inv = dense_inverse(&block);
        for (a, &ia) in idx.iter().enumerate() {
            for (b, &ib) in idx.iter().enumerate() {
                reference[(ia, ib)] = inv[(a, b)];
            }
        }
    }
    let v = Mat::from_fn(p, 3, |i, j| ((i * 5 + j * 7) % 13) as f64 - 6.0);
    let got = s.apply(v.as_ref()).unwrap();
    let want = &reference * &v;
    assert!(
        mat_rel_err(&got, &want) < 1e-10,
        "{}",
        mat_rel_err(&got, &want)
    );
    // the factors' normalisation: Ḡ is the mean over examples of Σ_uses δδᵀ, so its trace
    // equals the mean over examples of Σ_uses |δ|²; Ā's last (bias) entry is 1
    let conv = &f.layers[0];
    let k = conv.inp + 1;
    assert!((conv.a[k * k - 1] - 1.0).abs() < 1e-14);
    // ΔVar under K-FAC through the usual quadratic forms: finite and positive
    let (qg, _) = engine
        .query_gradients(&Qoi::Prob(0), &random_query(), 1, &eo())
        .unwrap();
    let dv = s.quad_forms(qg.as_ref()).unwrap();
    assert!(dv.iter().all(|v| v.is_finite() && *v > 0.0));
}

fn random_query() -> Tensor {
    Tensor::from_vec(pseudo_random(2 * 16, 9), (2, 1, 4, 4), &Device::Cpu).unwrap()
}

#[test]
fn kfac_refuses_bad_input() {
    let f = KfacFactors {
        num_params: 3,
        layers: vec![KfacLayer {
            w_off: 0,
            b_off: Some(1),
            inp: 1,
            out: 1,
            a: vec![1.0, 0.5, 0.5, 1.0],
            g: vec![2.0],
        }],
        diagonal: vec![],
    };
    // parameter 2 is in no block
    assert!(KfacSigma::new(&f, 0.1).is_err());
    let mut ok = f.clone();
    ok.num_params = 2;
    assert!(KfacSigma::new(&ok, 0.0).is_err());
    assert!(KfacSigma::new(&ok, f64::NAN).is_err());
    let mut bad = ok.clone();
    bad.layers[0].a = vec![1.0, f64::NAN, 0.5, 1.0];
    assert!(KfacSigma::new(&bad, 0.1).is_err());
    bad.layers[0].a = vec![1.0];
    assert!(KfacSigma::new(&bad, 0.1).is_err());
    let s = KfacSigma::new(&ok, 0.1).unwrap();
    assert!(s.apply(Mat::<f64>::zeros(3, 1).as_ref()).is_err());
}

/// `variance --sigma kfac` (an `mlp:` model runs as its graph) equals an independent dense
/// reference built from the generic path's per-example gradients.
#[cfg(feature = "cli")]
#[test]
fn the_cli_sigma_kfac_equals_a_dense_reference() {
    let case = Case::load("tanh-4-16-16-3");
    let d = &case.dir;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_deltavar"))
        .args(["variance", "--arch", "mlp:4,16,16,3:tanh", "--weights"])
        .arg(d.join("model.safetensors"))
        .arg("--queries")
        .arg(d.join("queries.npy"))
        .args(["--qoi", "output:1", "--sigma", "kfac", "--damping", "1e-3"])
        .args([
            "--dtype",
            "f64",
            "--json",
            "--likelihood",
            "gaussian:0.5",
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
    let got: Vec<f64> = j["delta_variance"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    // the reference, independent of the graph engine: each Linear layer's mean input and
    // signal outer products from the generic path's per-example gradients (g = δ ⊗ [a, 1]: the
    // bias gradient is δ, a weight column divided by δ is the input), the damped Kronecker
    // blocks inverted densely, and the generic QoI gradients
    let spec: SeqSpec = "seq:linear(4,16),tanh,linear(16,16),tanh,linear(16,3)"
        .parse()
        .unwrap();
    let model =
        Sequential::load_safetensors(d.join("model.safetensors"), spec, &[4], DType::F64, "")
            .unwrap();
    let params = model.params().unwrap();
    let data = case.data(DType::F64);
    let n = data.len();
    let lik = case.likelihood();
    let g = GenericFisher::new(&params, lik.of(&model), &data, GenericOptions::default())
        .per_example_gradients(0, n)
        .unwrap();
    let p = params.num_params();
    let lam = 1e-3;
    let mut reference = Mat::<f64>::zeros(p, p);
    let mut off = 0;
    for (inp, out) in [(4, 16), (16, 16), (16, 3)] {
        let (w_off, b_off) = (off, off + inp * out);
        off = b_off + out;
        let k = inp + 1;
        let (mut abar, mut gbar) = (vec![0.0; k * k], vec![0.0; out * out]);
        for e in 0..n {
            let delta: Vec<f64> = (0..out).map(|o| g[(b_off + o, e)]).collect();
            let o_max = (0..out)
                .max_by(|&x, &y| delta[x].abs().total_cmp(&delta[y].abs()))
                .unwrap();
            let mut a: Vec<f64> = (0..inp)
                .map(|i| g[(w_off + o_max * inp + i, e)] / delta[o_max])
                .collect();
            a.push(1.0);
            for (x, y) in (0..k * k).map(|r| (r / k, r % k)) {
                abar[x * k + y] += a[x] * a[y] / n as f64;
            }
            for (x, y) in (0..out * out).map(|r| (r / out, r % out)) {
                gbar[x * out + y] += delta[x] * delta[y] / n as f64;
            }
        }
        let idx = kron_indices(&KfacLayer {
            w_off,
            b_off: Some(b_off),
            inp,
            out,
            a: vec![],
            g: vec![],
        });
        let block = Mat::from_fn(idx.len(), idx.len(), |r, c| {
            let (o, i, o2, i2) = (r / k, r % k, c / k, c % k);
            gbar[o * out + o2] * abar[i * k + i2] + if r == c { lam } else { 0.0 }
        });
        let inv = dense_inverse(&block);
        for (x, &ix) in idx.iter().enumerate() {
            for (y, &iy) in idx.iter().enumerate() {
                reference[(ix, iy)] = inv[(x, y)];
            }
        }
    }
    assert_eq!(off, p);
    let q = case.npy("queries.npy", Some(DType::F64));
    let (qg, _) = qoi_gradients(
        &params,
        &q,
        Qoi::Output(1).of(&model),
        &GenericOptions::default(),
    )
    .unwrap();
    let sq = &reference * &qg;
    let want: Vec<f64> = (0..qg.ncols())
        .map(|j| (0..p).map(|i| qg[(i, j)] * sq[(i, j)]).sum())
        .collect();
    assert!(
        max_rel_err(&got, &want) < 1e-8,
        "{}",
        max_rel_err(&got, &want)
    );
    assert_eq!(j["sigma"].as_str(), Some("kfac"));
}

/// Issue 11, K-FAC for captured layers: the capture engine's factors of a CNN equal the native
/// graph engine's (two independent implementations: candle autograd with probes against
/// the native forward/backward).
#[test]
fn captured_kfac_factors_equal_the_sequential_engines() {
    let spec: SeqSpec = "seq:conv2d(2,3,3,stride=2,padding=1),relu,maxpool2d(2),flatten,\
                         linear(12,5),layernorm(5),tanh,linear(5,3)"
        .parse()
        .unwrap();
    let model = Sequential::init(spec, &[2, 8, 8], DType::F64, 9).unwrap();
    let params = model.params().unwrap();
    let n = 11;
    let x = Tensor::from_vec(pseudo_random(n * 128, 6), (n, 2, 8, 8), &Device::Cpu).unwrap();
    let data = TensorDataset::new(x, random_labels(n, 3, 7)).unwrap();
    let lik = Likelihood::Categorical;
    let native = GraphEngine::from_sequential(&model)
        .unwrap()
        .kfac_factors(&lik, &data, &eo())
        .unwrap();
    let cap = CaptureEngine::new(&model, &params)
        .kfac_factors(
            &lik,
            &data,
            &CaptureOptions {
                batch_size: 4,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(cap.num_params, native.num_params);
    assert_eq!(cap.layers.len(), 3);
    for (a, b) in cap.layers.iter().zip(&native.layers) {
        assert_eq!(
            (a.w_off, a.b_off, a.inp, a.out),
            (b.w_off, b.b_off, b.inp, b.out)
        );
        assert!(norm_rel_err(&a.a, &b.a) < 1e-12, "A at {}", a.w_off);
        assert!(norm_rel_err(&a.g, &b.g) < 1e-12, "G at {}", a.w_off);
    }
    // the norm's γ and β: the exact mean EF diagonal, as one block or two
    let flat = |f: &KfacFactors| {
        let mut d = vec![f64::NAN; f.num_params];
        for (off, v) in &f.diagonal {
            d[*off..*off + v.len()].copy_from_slice(v);
        }
        d
    };
    let (dc, dn) = (flat(&cap), flat(&native));
    let covered: Vec<usize> = (0..dc.len()).filter(|&i| !dn[i].is_nan()).collect();
    assert_eq!(covered.len(), 10);
    for i in covered {
        assert!(
            (dc[i] - dn[i]).abs() < 1e-12 * dn[i].abs().max(1e-12),
            "{i}"
        );
    }
}

/// The transformer through the capture engine: with one example of one token every Linear is
/// used once, so K-FAC is exact there (Ā ⊗ Ḡ = ggᵀ); the embeddings and norms get the exact
/// diagonal. With more examples and tokens Σ is the dense damped Kronecker inverse per layer.
#[test]
fn kfac_of_a_transformer_through_the_capture_engine() {
    let cfg = deltavar::model::TransformerConfig {
        vocab: 7,
        max_len: 4,
        d: 4,
        heads: 2,
        layers: 1,
        hidden: 6,
        classes: 3,
        eps: 1e-5,
    };
    let model = Transformer::init(cfg, DType::F64, 3).unwrap();
    let params = model.params().unwrap();
    let p = params.num_params();
    let lik = Likelihood::Categorical;
    let ids = |n: usize, t: usize, seed: u64| token_ids(n, t, 7, seed);
    // one example, one token
    let data = TensorDataset::new(ids(1, 1, 1), random_labels(1, 3, 2)).unwrap();
    let f = CaptureEngine::new(&model, &params)
        .kfac_factors(&lik, &data, &CaptureOptions::default())
        .unwrap();
    // qkv, proj, fc1, fc2, head
    assert_eq!(f.layers.len(), 5);
    let g = GraphEngine::from_transformer(&model, 1)
        .unwrap()
        .per_example_gradients(&lik, &data, 0, 1, &FactoredOptions::default())
        .unwrap();
    let g: Vec<f64> = (0..p).map(|i| g[(i, 0)]).collect();
    let lam = 0.2;
    let s = KfacSigma::new(&f, lam).unwrap();
    // reference: per Linear (g_l g_lᵀ + λI)⁻¹, elsewhere (g_i² + λ)⁻¹; check Σ·e for a vector e
    let e: Vec<f64> = (0..p).map(|i| ((i * 7) % 11) as f64 - 5.0).collect();
    let mut want: Vec<f64> = (0..p).map(|i| e[i] / (g[i] * g[i] + lam)).collect();
    for l in &f.layers {
        let mut idx: Vec<usize> = (l.w_off..l.w_off + l.out * l.inp).collect();
        if let Some(b) = l.b_off {
            idx.extend(b..b + l.out);
        }
        let gg: f64 = idx.iter().map(|&i| g[i] * g[i]).sum();
        let ge: f64 = idx.iter().map(|&i| g[i] * e[i]).sum();
        // (ggᵀ + λI)⁻¹e = (e − g·(gᵀe)/(λ + |g|²))/λ
        for &i in &idx {
            want[i] = (e[i] - g[i] * ge / (lam + gg)) / lam;
        }
    }
    let got = s
        .apply(faer::MatRef::from_column_major_slice(&e, p, 1))
        .unwrap();
    let got: Vec<f64> = (0..p).map(|i| got[(i, 0)]).collect();
    assert!(
        norm_rel_err(&got, &want) < 1e-10,
        "{}",
        norm_rel_err(&got, &want)
    );

    // several examples of several tokens: the diagonal blocks are the exact EF diagonal
    let data = TensorDataset::new(ids(6, 4, 3), random_labels(6, 3, 4)).unwrap();
    let f = CaptureEngine::new(&model, &params)
        .kfac_factors(
            &lik,
            &data,
            &CaptureOptions {
                batch_size: 4,
                ..Default::default()
            },
        )
        .unwrap();
    let graph = GraphEngine::from_transformer(&model, 4).unwrap();
    let exact = graph
        .sum_sq(&lik, &data, &FactoredOptions::default())
        .unwrap();
    for (off, v) in &f.diagonal {
        for (k, x) in v.iter().enumerate() {
            let w = exact[off + k] / 6.0;
            assert!((x - w).abs() <= 1e-12 * w.abs().max(1e-12), "{}", off + k);
        }
    }
    // Ā is a mean over the 6·4 uses (its bias corner is 1); the Σ is finite and positive on
    // queries
    for l in &f.layers {
        let k = l.inp + usize::from(l.b_off.is_some());
        assert!((l.a[k * k - 1] - 1.0).abs() < 1e-14);
    }
    let s = KfacSigma::new(&f, 1e-3).unwrap();
    let (qg, _) = CaptureEngine::new(&model, &params)
        .query_gradients(&Qoi::Prob(1), &ids(3, 4, 9), &CaptureOptions::default())
        .unwrap();
    let dv = s.quad_forms(qg.as_ref()).unwrap();
    assert!(dv.iter().all(|v| v.is_finite() && *v > 0.0), "{dv:?}");
    // an independent implementation: the graph engine's factors of the same transformer
    // written with the graph builder give the same Σ (every product) and the same ΔVar
    let fg = graph
        .kfac_factors(&lik, &data, &FactoredOptions::default())
        .unwrap();
    assert_eq!(fg.layers.len(), f.layers.len());
    let sg = KfacSigma::new(&fg, 1e-3).unwrap();
    let v = Mat::from_fn(p, 3, |i, j| ((i * 5 + j * 7) % 13) as f64 - 6.0);
    let (a, b) = (s.apply(v.as_ref()).unwrap(), sg.apply(v.as_ref()).unwrap());
    assert!(mat_rel_err(&a, &b) < 1e-10, "{}", mat_rel_err(&a, &b));
    let dg = sg.quad_forms(qg.as_ref()).unwrap();
    assert!(max_rel_err(&dv, &dg) < 1e-10, "{dv:?} {dg:?}");
}

/// K-FAC is a Σ strategy like the others: `engine_delta_variances_with` with
/// `SigmaStrategy::KfacEmpiricalFim` over a graph Fisher and over a captured Fisher equals the
/// quadratic forms of `KfacSigma` built from the engine's own factors (scaled by 1/N with the
/// posterior scale); its covariances' diagonal is that ΔVar; a Fisher without Kronecker
/// factors (the generic engine, a saved pass) is refused naming what is missing.
#[test]
fn kfac_is_a_sigma_strategy_of_the_one_entry_point() {
    let spec: SeqSpec = "seq:linear(3,8),tanh,linear(8,2)".parse().unwrap();
    let model = Sequential::init(spec, &[3], DType::F64, 5).unwrap();
    let params = model.params().unwrap();
    let x = Tensor::randn(0f64, 1., (20, 3), &Device::Cpu).unwrap();
    let y = Tensor::randn(0f64, 1., (20, 2), &Device::Cpu).unwrap();
    let data = TensorDataset::new(x, y).unwrap();
    let z = Tensor::randn(0f64, 1., (5, 3), &Device::Cpu).unwrap();
    let lik = Likelihood::gaussian(0.5);
    let engine = GraphEngine::from_sequential(&model).unwrap();
    let graph_fisher = GraphFisher::with_engine(engine.clone(), lik.clone(), &data, eo());
    let capture = CaptureEngine::new(&model, &params);
    let captured = CapturedFisher::new(
        &model,
        &params,
        lik.clone(),
        &data,
        CaptureOptions::default(),
    );
    let lam = 1e-2;
    let (qg, _) = engine
        .query_gradients(&Qoi::Output(1), &z, 1, &eo())
        .unwrap();
    for posterior_scale in [false, true] {
        let opts = SigmaOptions {
            damping: lam,
            posterior_scale,
            ..Default::default()
        };
        let f = engine.kfac_factors(&lik, &data, &eo()).unwrap();
        let scale = if posterior_scale { 1.0 / 20.0 } else { 1.0 };
        let want: Vec<f64> = KfacSigma::new(&f, lam)
            .unwrap()
            .quad_forms(qg.as_ref())
            .unwrap()
            .iter()
            .map(|v| v * scale)
            .collect();
        let sources: [(&dyn QueryGradients, &dyn FisherSource); 2] =
            [(&engine, &graph_fisher), (&capture, &captured)];
        for (qe, fisher) in sources {
            let out = engine_delta_variances_with(
                qe,
                DeltaRequest::new(&z, SigmaStrategy::KfacEmpiricalFim)
                    .fisher(fisher)
                    .qoi(Qoi::Output(1))
                    .options(opts.clone())
                    .engine_options(eo()),
            )
            .unwrap();
            assert_eq!(out.sigma, "kfac");
            assert!(
                max_rel_err(&out.delta_variance, &want) < 1e-10,
                "{:?} {want:?}",
                out.delta_variance
            );
        }
        let cov = engine_delta_covariances_with(
            &engine,
            DeltaRequest::new(&z, SigmaStrategy::KfacEmpiricalFim)
                .fisher(&graph_fisher)
                .options(opts.clone())
                .engine_options(eo()),
        )
        .unwrap();
        let diag: Vec<f64> = cov.covariance.iter().map(|c| c[3]).collect();
        assert!(max_rel_err(&diag, &want) < 1e-10);
    }
    let generic = GenericFisher::new(&params, lik.of(&model), &data, GenericOptions::default());
    let err = engine_delta_variances_with(
        &engine,
        DeltaRequest::new(&z, SigmaStrategy::KfacEmpiricalFim)
            .fisher(&generic)
            .qoi(Qoi::Output(1))
            .engine_options(eo()),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("Kronecker factors"), "{err}");
    assert_eq!(
        "kfac".parse::<SigmaStrategy>().unwrap().name(),
        SigmaStrategy::KfacEmpiricalFim.name()
    );
}
