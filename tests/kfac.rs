//! K-FAC Σ: exact for one example (Ā ⊗ Ḡ = g gᵀ per layer), equal to the explicit dense
//! inverse of the damped Kronecker blocks otherwise, and refusing bad input.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use deltavar::engine::FactoredSeq;
use deltavar::model::{SeqSpec, Sequential};
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
    let engine = FactoredSeq::new(&model).unwrap();
    let f = engine.kfac_factors(&lik, &data, &eo()).unwrap();
    assert_eq!(f.layers.len(), 2);
    assert_eq!(f.diagonal.len(), 1);
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
    let engine = FactoredSeq::new(&model).unwrap();
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

/// `variance --sigma kfac` (an `mlp:` model runs as its nn.Sequential) equals the library.
#[cfg(feature = "cli")]
#[test]
fn the_cli_sigma_kfac_equals_the_library() {
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
    let spec: SeqSpec = "seq:linear(4,16),tanh,linear(16,16),tanh,linear(16,3)"
        .parse()
        .unwrap();
    let model =
        Sequential::load_safetensors(d.join("model.safetensors"), spec, &[4], DType::F64, "")
            .unwrap();
    let engine = FactoredSeq::new(&model).unwrap();
    let data = case.data(DType::F64);
    let f = engine
        .kfac_factors(&case.likelihood(), &data, &FactoredOptions::default())
        .unwrap();
    let s = KfacSigma::new(&f, 1e-3).unwrap();
    let q = case.npy("queries.npy", Some(DType::F64));
    let (qg, _) = engine
        .query_gradients(&Qoi::Output(1), &q, 1, &FactoredOptions::default())
        .unwrap();
    let want = s.quad_forms(qg.as_ref()).unwrap();
    assert!(
        max_rel_err(&got, &want) < 1e-10,
        "{}",
        max_rel_err(&got, &want)
    );
    assert_eq!(j["sigma"].as_str(), Some("kfac"));
}
