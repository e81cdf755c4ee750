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

pub const CASES: [&str; 4] = ["seed-readme-linear-10-1", "seed-mlp-3-5-2-relu", "tanh-4-16-16-3", "cls-6-12-4-tanh"];

pub struct Case {
    pub name: String,
    pub dir: PathBuf,
    pub meta: Value,
    pub expected: Value,
}

impl Case {
    pub fn load(name: &str) -> Case {
        let dir = fixtures_dir().join(name);
        let read = |f: &str| -> Value { serde_json::from_str(&std::fs::read_to_string(dir.join(f)).unwrap()).unwrap() };
        Case { name: name.into(), meta: read("case.json"), expected: read("expected.json"), dir }
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
        self.expected[key].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect()
    }
    pub fn model(&self, dtype: DType) -> (Mlp, candle_nn::VarMap) {
        Mlp::load_safetensors(self.dir.join("model.safetensors"), self.act(), dtype, &Device::Cpu, "", None).unwrap()
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
        let y = if y.dtype() == DType::I64 { y } else { y.to_dtype(dtype).unwrap() };
        TensorDataset::new(x, y).unwrap()
    }
}

/// max_i |a_i - b_i| / max(|b_i|, floor)
pub fn max_rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs() / y.abs().max(1e-300)).fold(0.0, f64::max)
}

/// Relative error in the max-norm of the whole vector: max |a-b| / max |b|.
pub fn norm_rel_err(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max) / scale
}

/// Log-likelihood closure of an MLP with a built-in likelihood.
pub fn ll_closure<'a>(mlp: &'a Mlp, lik: &'a Likelihood) -> impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor> + Sync + 'a {
    move |x, y| lik.log_likelihood(&mlp.forward(x)?, y).map_err(candle_core::Error::wrap)
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
