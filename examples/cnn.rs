//! The peers' W-cnn workload: a LeNet-style CNN loaded from the PyTorch state dict that
//! `../shared/bench/peers.py ... cnn` writes, on the graph engine (`--engine native`,
//! the default: a `Sequential` from its `seq:` architecture string, built as a graph) or the capture engine
//! (`--engine capture`: the same network built from `deltavar::nn` layers).
//!
//!     /tmp/peers-venv/bin/python ../shared/bench/peers.py /tmp/dv-workloads cnn
//!     cargo run --release --example cnn -- --dir /tmp/dv-workloads/cnn [--engine native|capture] [--full kernel|cg] [--out FILE] [--json]
//!
//! Computes the mean diagonal empirical Fisher (categorical) over DIR/train_x.npy and
//! DIR/train_y.npy, writes it to FILE (safetensors, one tensor per parameter, named and shaped as
//! in model.safetensors), compares it with DIR/diag_reference.safetensors (opacus) when present,
//! prints ΔVar of p(class 0) at DIR/queries.npy under the diagonal Σ, and with `--json` one object
//! with `seconds` (the Fisher pass alone, loading excluded), `num_params`, `num_train`.

mod common;

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{VarBuilder, VarMap};
use deltavar::nn::{self, Conv2dConfig};
use deltavar::prelude::*;
use deltavar::{CaptureEngine, CaptureOptions, Params, SeqSpec, Sequential};

/// The same network as an architecture string.
const ARCH: &str = "seq:conv2d(1,16,5,padding=2),relu,maxpool2d(2),conv2d(16,32,5,padding=2),relu,\
maxpool2d(2),flatten,linear(1568,128),relu,linear(128,10)";

/// `nn.Sequential(Conv2d(1,16,5,padding=2), ReLU, MaxPool2d(2), Conv2d(16,32,5,padding=2), ReLU,
/// MaxPool2d(2), Flatten, Linear(1568,128), ReLU, Linear(128,10))`, state-dict names 0, 3, 7, 9.
struct LeNet {
    c1: nn::Conv2d,
    c2: nn::Conv2d,
    f1: nn::Linear,
    f2: nn::Linear,
}

impl LeNet {
    fn new(vb: VarBuilder) -> candle_core::Result<Self> {
        let pad2 = Conv2dConfig {
            padding: 2,
            ..Default::default()
        };
        Ok(Self {
            c1: nn::conv2d(1, 16, 5, pad2, vb.pp("0"))?,
            c2: nn::conv2d(16, 32, 5, pad2, vb.pp("3"))?,
            f1: nn::linear(32 * 7 * 7, 128, vb.pp("7"))?,
            f2: nn::linear(128, 10, vb.pp("9"))?,
        })
    }
}

impl Module for LeNet {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = nn::max_pool2d(&self.c1.forward(x)?.relu()?, 2, 2)?;
        let h = nn::max_pool2d(&self.c2.forward(&h)?.relu()?, 2, 2)?;
        self.f2
            .forward(&self.f1.forward(&h.flatten_from(1)?)?.relu()?)
    }
}

fn main() -> deltavar::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let dir = PathBuf::from(arg("--dir").ok_or_else(|| {
        Error::invalid(
            "--dir",
            "missing",
            "the folder peers.py wrote for the cnn workload",
        )
    })?);
    let json = args.iter().any(|a| a == "--json");
    let out = arg("--out").map(PathBuf::from);

    let mut vm = VarMap::new();
    let model = LeNet::new(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
    vm.load(dir.join("model.safetensors"))?;
    let params = Params::from_varmap(&vm, ParamOrder::Natural)?;
    let x = Tensor::read_npy(dir.join("train_x.npy"))?.to_dtype(DType::F32)?;
    let y = Tensor::read_npy(dir.join("train_y.npy"))?;
    let data = TensorDataset::new(x, y)?;
    let n = data.len();

    let native = arg("--engine").as_deref() != Some("capture");
    // the native engine's precision (--dtype f64: a reference for the f32 run)
    let dt = if arg("--dtype").as_deref() == Some("f64") {
        DType::F64
    } else {
        DType::F32
    };
    let q = Tensor::read_npy(dir.join("queries.npy"))?.to_dtype(DType::F32)?;
    let full = arg("--full");
    let (sums, seconds, qg, qv, layout) = if native {
        let spec: SeqSpec = ARCH.parse()?;
        let seq = Sequential::load_safetensors(
            dir.join("model.safetensors"),
            spec,
            &[1, 28, 28],
            dt,
            "",
        )?;
        let fo = FactoredOptions {
            batch_size: arg("--batch-size")
                .and_then(|b| b.parse().ok())
                .unwrap_or(64),
            threads: 0,
        };
        let t0 = Instant::now();
        let engine = GraphEngine::from_sequential(&seq)?;
        let sums = engine.sum_sq(&Likelihood::Categorical, &data, &fo)?;
        let seconds = t0.elapsed().as_secs_f64();
        let (qg, qv) = engine.query_gradients(&Qoi::Prob(0), &q, 1, &fo)?;
        if let Some(method) = &full {
            // the exact (or CG) full-inverse ΔVar: the Fisher's layered gradient operator
            let t = Instant::now();
            let fisher = GraphFisher::with_engine(
                GraphEngine::from_sequential(&seq)?,
                Likelihood::Categorical,
                &data,
                fo.clone(),
            );
            common::full_report("cnn-full", method, &fisher, &qg, t)?;
        }
        (sums, seconds, qg, qv, seq.params()?)
    } else {
        let engine = CaptureEngine::new(&model, &params);
        let opts = CaptureOptions::default();
        let t0 = Instant::now();
        let sums = engine.sum_sq(&Likelihood::Categorical, &data, &opts)?;
        let seconds = t0.elapsed().as_secs_f64();
        let (qg, qv) = engine.query_gradients(&Qoi::Prob(0), &q, &opts)?;
        if let Some(method) = &full {
            let t = Instant::now();
            let fisher = deltavar::CapturedFisher::new(
                &model,
                &params,
                Likelihood::Categorical,
                &data,
                opts.clone(),
            );
            common::full_report("cnn-full", method, &fisher, &qg, t)?;
        }
        (sums, seconds, qg, qv, params.clone())
    };
    let mean: Vec<f64> = sums.iter().map(|s| s / n as f64).collect();

    // the mean diagonal per parameter, named and shaped as in the state dict
    let per_tensor = common::per_tensor_diag(&layout, &mean, out.as_deref())?;
    let worst = common::worst_vs_reference(
        &per_tensor,
        &dir.join("diag_reference.safetensors"),
        args.iter().any(|a| a == "--verbose"),
    )?;

    // ΔVar of p(class 0) at the queries under Σ = diag(F + λ)⁻¹
    let sigma = deltavar::sigma::InverseDiagonalFisher::new(&mean, 1e-3)?;
    let dv = sigma.quad_forms(qg.as_ref())?;

    if json {
        println!(
            "{}",
            serde_json::json!({
                "workload": "cnn",
                "engine": if native { "native" } else { "capture" },
                "seconds": seconds,
                "num_params": params.num_params(),
                "num_train": n,
                "max_rel_err_vs_reference": worst,
                "delta_variance_first": &dv[..dv.len().min(4)],
                "qoi_first": &qv[..qv.len().min(4)],
            })
        );
    } else {
        println!(
            "diag Fisher of the CNN over {n} images (P = {}) in {seconds:.3} s",
            params.num_params()
        );
        if let Some(w) = worst {
            println!("per-tensor relative error vs diag_reference.safetensors (opacus): {w:.2e}");
        }
        for (i, (v, d)) in qv.iter().zip(&dv).take(8).enumerate() {
            println!("query {i}: p(class 0) = {v:.4}, ΔVar = {d:.4e}");
        }
    }
    Ok(())
}
