//! Shared helpers for the integration tests: the parity fixtures and small random models.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Module, Tensor};
use deltavar::*;
use serde_json::Value;

/// The parity fixtures: `../shared/fixtures/deltavar-parity` when present, else the copy in
/// `tests/data/deltavar-parity`.
pub fn fixtures_dir() -> PathBuf {
    let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/deltavar-parity");
    if shared.join("README.md").exists() {
        shared
    } else {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/deltavar-parity")
    }
}

pub const CASES: [&str; 4] = [
    "seed-readme-linear-10-1",
    "seed-mlp-3-5-2-relu",
    "tanh-4-16-16-3",
    "cls-6-12-4-tanh",
];

pub struct Case {
    pub name: String,
    pub dir: PathBuf,
    pub meta: Value,
    pub expected: Value,
}

impl Case {
    pub fn load(name: &str) -> Case {
        let dir = fixtures_dir().join(name);
        let read = |f: &str| -> Value {
            serde_json::from_str(&std::fs::read_to_string(dir.join(f)).unwrap()).unwrap()
        };
        Case {
            name: name.into(),
            meta: read("case.json"),
            expected: read("expected.json"),
            dir,
        }
    }
    pub fn act(&self) -> Activation {
        self.meta["act"].as_str().unwrap().parse().unwrap()
    }
    pub fn likelihood(&self) -> Likelihood {
        match self.meta["lik"].as_str().unwrap() {
            "gaussian" => Likelihood::gaussian(self.meta["sigma"].as_f64().unwrap()),
            _ => Likelihood::Categorical,
        }
    }
    pub fn qoi(&self) -> Qoi {
        self.meta["qoi"].as_str().unwrap().parse().unwrap()
    }
    pub fn damping(&self) -> f64 {
        self.meta["damping"].as_f64().unwrap()
    }
    pub fn vec(&self, key: &str) -> Vec<f64> {
        self.expected[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect()
    }
    pub fn model(&self, dtype: DType) -> (Mlp, candle_nn::VarMap) {
        Mlp::load_safetensors(
            self.dir.join("model.safetensors"),
            self.act(),
            dtype,
            &Device::Cpu,
            "",
            None,
        )
        .unwrap()
    }
    pub fn npy(&self, f: &str, dtype: Option<DType>) -> Tensor {
        let t = Tensor::read_npy(self.dir.join(f)).unwrap();
        match dtype {
            Some(d) => t.to_dtype(d).unwrap(),
            None => t,
        }
    }
    pub fn data(&self, dtype: DType) -> TensorDataset {
        let x = self.npy("train_x.npy", Some(dtype));
        let y = self.npy("train_y.npy", None);
        let y = if y.dtype() == DType::I64 {
            y
        } else {
            y.to_dtype(dtype).unwrap()
        };
        TensorDataset::new(x, y).unwrap()
    }
}

/// The larger of two numbers, NaN if either is NaN (`f64::max` drops a NaN, which would let
/// a NaN result pass an error check).
pub fn nan_max(a: f64, b: f64) -> f64 {
    if a.is_nan() || b.is_nan() {
        f64::NAN
    } else {
        a.max(b)
    }
}

/// max_i |a_i - b_i| / max(|b_i|, floor); NaN when any entry is NaN.
pub fn max_rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1e-300))
        .fold(0.0, nan_max)
}

/// Relative error in the max-norm of the whole vector: max |a-b| / max |b|; NaN when any
/// entry is NaN.
pub fn norm_rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let scale = b.iter().fold(0.0f64, |m, v| nan_max(m, v.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, nan_max)
        / scale
}

/// Log-likelihood closure of an MLP with a built-in likelihood.
pub fn ll_closure<'a>(
    mlp: &'a Mlp,
    lik: &'a Likelihood,
) -> impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor> + Sync + 'a {
    move |x, y| {
        lik.log_likelihood(&mlp.forward(x)?, y)
            .map_err(candle_core::Error::wrap)
    }
}

/// A deterministic pseudo-random f64 vector (xorshift), values in [-1, 1).
pub fn pseudo_random(n: usize, seed: u64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f64 / (1u64 << 52) as f64 - 1.0
        })
        .collect()
}

/// Deterministic token ids in 0..vocab as an (n, t) int64 tensor.
pub fn token_ids(n: usize, t: usize, vocab: i64, seed: u64) -> Tensor {
    let v: Vec<i64> = pseudo_random(n * t, seed)
        .iter()
        .map(|x| ((x.abs() * 1000.0) as i64) % vocab)
        .collect();
    Tensor::from_vec(v, (n, t), &Device::Cpu).unwrap()
}

/// Dense matrix as Vec<Vec<f64>> (row-major) from a faer matrix.
pub fn to_rows(m: faer::MatRef<'_, f64>) -> Vec<Vec<f64>> {
    (0..m.nrows())
        .map(|i| (0..m.ncols()).map(|j| m[(i, j)]).collect())
        .collect()
}

/// Inverse by Gauss-Jordan elimination with partial pivoting (an oracle independent of faer).
pub fn gauss_jordan_inverse(a: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let n = a.len();
    let mut m: Vec<Vec<f64>> = a.to_vec();
    let mut inv: Vec<Vec<f64>> = (0..n)
        .map(|i| (0..n).map(|j| if i == j { 1.0 } else { 0.0 }).collect())
        .collect();
    for c in 0..n {
        let p = (c..n)
            .max_by(|&i, &j| m[i][c].abs().partial_cmp(&m[j][c].abs()).unwrap())
            .unwrap();
        m.swap(c, p);
        inv.swap(c, p);
        let d = m[c][c];
        for j in 0..n {
            m[c][j] /= d;
            inv[c][j] /= d;
        }
        for i in 0..n {
            if i != c {
                let f = m[i][c];
                if f != 0.0 {
                    for j in 0..n {
                        m[i][j] -= f * m[c][j];
                        inv[i][j] -= f * inv[c][j];
                    }
                }
            }
        }
    }
    inv
}

/// xᵀ A y for row-major A.
pub fn bilinear(x: &[f64], a: &[Vec<f64>], y: &[f64]) -> f64 {
    a.iter()
        .zip(x)
        .map(|(row, xi)| xi * row.iter().zip(y).map(|(aij, yj)| aij * yj).sum::<f64>())
        .sum()
}

/// A small random MLP in f64 with its parameters; weights from a deterministic generator.
pub fn random_mlp(sizes: &[usize], act: Activation, seed: u64) -> (Mlp, candle_nn::VarMap, Params) {
    let dev = Device::Cpu;
    let varmap = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F64, &dev);
    let mlp = Mlp::new(vb, sizes, act, None).unwrap();
    let params = mlp.params(&varmap).unwrap();
    let vals: Vec<f64> = pseudo_random(params.num_params(), seed)
        .iter()
        .map(|v| 0.8 * v)
        .collect();
    params.set_flat_values(&vals).unwrap();
    (mlp, varmap, params)
}

/// Random inputs (n, d) in f64.
pub fn random_tensor(n: usize, d: usize, seed: u64) -> Tensor {
    Tensor::from_vec(pseudo_random(n * d, seed), (n, d), &Device::Cpu).unwrap()
}

/// Random class labels (n,) as i64 in 0..c.
pub fn random_labels(n: usize, c: usize, seed: u64) -> Tensor {
    let v: Vec<i64> = pseudo_random(n, seed)
        .iter()
        .map(|u| (((u + 1.0) / 2.0 * c as f64) as i64).min(c as i64 - 1))
        .collect();
    Tensor::from_vec(v, n, &Device::Cpu).unwrap()
}

/// Tolerance for an f64 result against the reference package's fixture: about 100× the
/// error measured on this machine (so a regression shows). `method` is "direct" (identity,
/// diagonal, dense Cholesky, and everything that is not the full inverse), "kernel" or "cg".
///
/// Measured (max relative error): identity / diagonal / fim_diagonal / gradients / QoI values
/// ≤ 1.3e-15 on every case. The full inverse, dense and CG (Nyström, tol 1e-10): 6.6e-16
/// (seed-readme-linear), 3.9e-12 (seed-mlp-3-5-2-relu: n < P with λ = 1e-5, ill-conditioned
/// on purpose), 2.0e-13 (tanh-4-16-16-3), 1.8e-15 (cls-6-12-4-tanh). The kernel method
/// subtracts two nearly equal terms when λ is small next to F: 4.5e-11 on seed-readme-linear
/// (N = 500 ≫ P = 11), otherwise as dense.
pub fn parity_tol(case: &str, quantity: &str, method: &str) -> f64 {
    if quantity != "inverse_full_empirical_fim" {
        return 1e-13;
    }
    match (case, method) {
        ("seed-readme-linear-10-1", "kernel") => 5e-9,
        ("seed-mlp-3-5-2-relu", _) => 5e-10,
        ("tanh-4-16-16-3", _) => 2e-11,
        _ => 5e-13,
    }
}

/// ‖A − B‖_F / ‖B‖_F for two matrices of the same shape.
pub fn mat_rel_err(a: &faer::Mat<f64>, b: &faer::Mat<f64>) -> f64 {
    assert_eq!((a.nrows(), a.ncols()), (b.nrows(), b.ncols()));
    norm_rel_err(&to_rows(a.as_ref()).concat(), &to_rows(b.as_ref()).concat())
}

/// Checks a gradient against central finite differences of `value()` (evaluated at the current
/// parameters) for the given flat entries: |fd − g| ≤ 1e-6·(1 + |fd|) with step 1e-6. The
/// parameters are restored afterwards.
pub fn assert_matches_fd(
    params: &Params,
    entries: impl IntoIterator<Item = usize>,
    grad: impl Fn(usize) -> f64,
    value: impl Fn() -> f64,
    label: &str,
) {
    let theta = params.flat_values().unwrap();
    let at = |t: &[f64]| {
        params.set_flat_values(t).unwrap();
        let v = value();
        params.set_flat_values(&theta).unwrap();
        v
    };
    for k in entries {
        let h = 1e-6;
        let (mut up, mut dn) = (theta.clone(), theta.clone());
        up[k] += h;
        dn[k] -= h;
        let fd = (at(&up) - at(&dn)) / (2.0 * h);
        let g = grad(k);
        assert!(
            (fd - g).abs() <= 1e-6 * (1.0 + fd.abs()),
            "{label}: entry {k}: finite differences {fd} vs gradient {g}"
        );
    }
}

/// Checks `gram_lower_into` on an N×N matrix of ones below and on the diagonal and sevens above
/// it (`fill` runs it): the lower triangle must come back as 1 + K (K = `want`), the upper one
/// untouched.
pub fn assert_adds_lower_triangle(
    want: &faer::Mat<f64>,
    fill: impl FnOnce(faer::MatMut<'_, f64>),
    label: &str,
) {
    let n = want.nrows();
    let mut out = faer::Mat::from_fn(n, n, |i, j| if i >= j { 1.0 } else { 7.0 });
    fill(out.as_mut());
    for j in 0..n {
        for i in 0..n {
            if i >= j {
                let e = (out[(i, j)] - 1.0 - want[(i, j)]).abs();
                assert!(
                    e <= 1e-12 * want[(j, j)].max(1.0),
                    "{label} ({i}, {j}): {e:e}"
                );
            } else {
                assert_eq!(out[(i, j)], 7.0, "{label} ({i}, {j}) above the diagonal");
            }
        }
    }
}

/// Every layer route of the layered gradient operator, for tests that run under each.
pub const EVERY_ROUTE: [deltavar::engine::LayerRoute; 3] = [
    deltavar::engine::LayerRoute::Auto,
    deltavar::engine::LayerRoute::Materialise,
    deltavar::engine::LayerRoute::Factor,
];

/// Runs a CLI command that must succeed and print one JSON object; returns it.
pub fn run_ok(cmd: &mut std::process::Command) -> Value {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.trim().lines().count(),
        1,
        "one JSON object: {stdout}"
    );
    serde_json::from_str(stdout.trim()).unwrap()
}

/// Runs a CLI command that must fail with one line on stderr (no panic); returns the line.
pub fn run_err(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        !out.status.success(),
        "expected a failure: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    err
}

/// A JSON array of numbers.
pub fn vec_of(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

/// An MLP on the graph engine (its one native engine).
pub fn mlp_engine(m: &Mlp) -> GraphEngine {
    GraphEngine::from_mlp(m).unwrap()
}

/// The graph engine's Fisher of an MLP over `data`.
pub fn mlp_fisher<'a>(
    m: &Mlp,
    lik: Likelihood,
    data: &'a dyn Dataset,
    opts: FactoredOptions,
) -> GraphFisher<'a> {
    GraphFisher::with_engine(mlp_engine(m), lik, data, opts)
}
