//! The peers' W-transformer workload: `TinyTransformer` of `../shared/bench/peers.py` (token +
//! position embeddings, 2 pre-LayerNorm blocks with 4-head attention and a GELU MLP, final
//! LayerNorm, mean-pool, linear head) loaded from its PyTorch state dict, on the graph engine:
//! `deltavar::Transformer` written with the graph builder (the default, batch 16; `--engine
//! graph` or `native` name it too) or DIR/model.onnx (`--engine onnx`); or on the capture engine
//! (`--engine capture`: the same network built from `deltavar::nn` layers, batch 128). The query
//! gradients and `--full` use the same engine.
//!
//!     /tmp/peers-venv/bin/python ../shared/bench/peers.py /tmp/dv-workloads transformer
//!     cargo run --release --example tiny_transformer -- --dir /tmp/dv-workloads/transformer [--engine graph|onnx|capture] [--batch-size B] [--repeat R] [--full kernel|cg] [--out FILE] [--json]
//!
//! Same outputs as `examples/cnn.rs`: the mean diagonal empirical Fisher (categorical) over
//! DIR/train_x.npy (int64 tokens) and DIR/train_y.npy, written to FILE per parameter, compared
//! with DIR/diag_reference.safetensors (opacus), ΔVar of p(class 0) at DIR/queries.npy under the
//! diagonal Σ, and with `--json` one object with `seconds` (the Fisher pass alone; with
//! `--repeat R` the fastest of R passes in one process).

mod common;

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{VarBuilder, VarMap};
use deltavar::nn;
use deltavar::prelude::*;
use deltavar::{CaptureEngine, CaptureOptions, Params};

struct Block {
    ln1: nn::Norm,
    qkv: nn::Linear,
    proj: nn::Linear,
    ln2: nn::Norm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    heads: usize,
}

impl Block {
    fn new(d: usize, heads: usize, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            ln1: nn::layer_norm(d, 1e-5, vb.pp("ln1"))?,
            qkv: nn::linear(d, 3 * d, vb.pp("qkv"))?,
            proj: nn::linear(d, d, vb.pp("proj"))?,
            ln2: nn::layer_norm(d, 1e-5, vb.pp("ln2"))?,
            fc1: nn::linear(d, 4 * d, vb.pp("fc1"))?,
            fc2: nn::linear(4 * d, d, vb.pp("fc2"))?,
            heads,
        })
    }
}

impl Module for Block {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let hd = d / self.heads;
        let qkv = self.qkv.forward(&self.ln1.forward(x)?)?;
        let split = |i: usize| -> candle_core::Result<Tensor> {
            qkv.narrow(2, i * d, d)?
                .reshape((b, t, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (split(0)?, split(1)?, split(2)?);
        let att = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
        // candle_nn::ops::softmax (differentiable), never softmax_last_dim (no backward)
        let att = candle_nn::ops::softmax(&att, D::Minus1)?;
        let y = att.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?;
        let x = (x + self.proj.forward(&y)?)?;
        // GELU composed from erf (candle 0.11.1's fused gelu_erf backward is ~1.6e-7 off)
        let h = Activation::Gelu.forward(&self.fc1.forward(&self.ln2.forward(&x)?)?)?;
        &x + self.fc2.forward(&h)?
    }
}

struct TinyTransformer {
    emb: nn::Embedding,
    pos: nn::Embedding,
    blocks: Vec<Block>,
    ln_f: nn::Norm,
    head: nn::Linear,
}

impl TinyTransformer {
    fn new(vb: VarBuilder) -> candle_core::Result<Self> {
        let (v, t, d, h, l, c) = (512, 32, 64, 4, 2, 4);
        Ok(Self {
            emb: nn::embedding(v, d, vb.pp("emb"))?,
            pos: nn::embedding(t, d, vb.pp("pos"))?,
            blocks: (0..l)
                .map(|i| Block::new(d, h, vb.pp(format!("blocks.{i}"))))
                .collect::<candle_core::Result<_>>()?,
            ln_f: nn::layer_norm(d, 1e-5, vb.pp("ln_f"))?,
            head: nn::linear(d, c, vb.pp("head"))?,
        })
    }
}

impl Module for TinyTransformer {
    fn forward(&self, tok: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t) = tok.dims2()?;
        // the position table read with ids broadcast to every example (one use per position)
        let pos = Tensor::arange(0u32, t as u32, tok.device())?
            .unsqueeze(0)?
            .broadcast_as((b, t))?
            .contiguous()?;
        let mut x = (self.emb.forward(tok)? + self.pos.forward(&pos)?)?;
        for blk in &self.blocks {
            x = blk.forward(&x)?;
        }
        self.head.forward(&self.ln_f.forward(&x)?.mean(1)?)
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
            "the folder peers.py wrote for the transformer workload",
        )
    })?);
    let json = args.iter().any(|a| a == "--json");
    let out = arg("--out").map(PathBuf::from);

    let mut vm = VarMap::new();
    let model = TinyTransformer::new(VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu))?;
    vm.load(dir.join("model.safetensors"))?;
    let params = Params::from_varmap(&vm, ParamOrder::Natural)?;
    let x = Tensor::read_npy(dir.join("train_x.npy"))?;
    let y = Tensor::read_npy(dir.join("train_y.npy"))?;
    let data = TensorDataset::new(x, y)?;
    let n = data.len();

    // the graph engine (the default; `native` names it too) or the capture engine
    let native = arg("--engine").as_deref() != Some("capture");
    let nat =
        deltavar::Transformer::load_safetensors(dir.join("model.safetensors"), 4, DType::F32, "")?;
    let fo = FactoredOptions {
        batch_size: arg("--batch-size")
            .and_then(|b| b.parse().ok())
            .unwrap_or(16),
        threads: 0,
    };
    let engine = CaptureEngine::new(&model, &params);
    let opts = CaptureOptions {
        batch_size: 128,
        ..Default::default()
    };
    let t0 = Instant::now();
    let t_len = data.get(0, 1)?.0.dims()[1];
    let graph_engine = if arg("--engine").as_deref() == Some("onnx") {
        let g = deltavar::graph::Graph::from_onnx(
            dir.join("model.onnx"),
            Some(&dir.join("model.safetensors")),
        )?;
        Some(GraphEngine::new(g, &[t_len], DType::F32)?)
    } else if native {
        Some(GraphEngine::from_transformer(&nat, t_len)?)
    } else {
        None
    };
    // --repeat R: the pass R times, the fastest reported (the first includes building the engine)
    let repeat: usize = arg("--repeat")
        .and_then(|r| r.parse().ok())
        .unwrap_or(1)
        .max(1);
    let mut times = vec![];
    let mut sums = vec![];
    let mut t0 = t0;
    for _ in 0..repeat {
        sums = if let Some(g) = &graph_engine {
            g.sum_sq(&Likelihood::Categorical, &data, &fo)?
        } else {
            engine.sum_sq(&Likelihood::Categorical, &data, &opts)?
        };
        times.push(t0.elapsed().as_secs_f64());
        t0 = Instant::now();
    }
    let seconds = times.iter().copied().fold(f64::INFINITY, f64::min);
    let layout = if native {
        nat.params()?
    } else {
        params.clone()
    };
    let mean: Vec<f64> = sums.iter().map(|s| s / n as f64).collect();

    let per_tensor = common::per_tensor_diag(&layout, &mean, out.as_deref())?;
    let worst = common::worst_vs_reference(
        &per_tensor,
        &dir.join("diag_reference.safetensors"),
        std::env::var("DV_VERBOSE").is_ok(),
    )?;

    let q = Tensor::read_npy(dir.join("queries.npy"))?;
    let (qg, qv) = if let Some(g) = &graph_engine {
        g.query_gradients(&Qoi::Prob(0), &q, 1, &fo)?
    } else {
        engine.query_gradients(&Qoi::Prob(0), &q, &opts)?
    };
    let sigma = deltavar::sigma::InverseDiagonalFisher::new(&mean, 1e-3)?;
    let dv = sigma.quad_forms(qg.as_ref())?;
    if let Some(method) = arg("--full") {
        let t = Instant::now();
        // the Fisher in the same flat layout as the query gradients
        let fisher: Box<dyn FisherSource + '_> = if let Some(g) = &graph_engine {
            Box::new(deltavar::GraphFisher::with_engine(
                g.clone(),
                Likelihood::Categorical,
                &data,
                fo.clone(),
            ))
        } else {
            Box::new(deltavar::CapturedFisher::new(
                &model,
                &params,
                Likelihood::Categorical,
                &data,
                opts.clone(),
            ))
        };
        common::full_report("transformer-full", &method, fisher.as_ref(), &qg, t)?;
    }
    if json {
        println!(
            "{}",
            serde_json::json!({
                "workload": "transformer",
                "seconds": seconds,
                "num_params": params.num_params(),
                "num_train": n,
                "max_rel_err_vs_reference": worst,
                "delta_variance_first": &dv[..dv.len().min(4)],
            })
        );
    } else {
        println!(
            "diag Fisher of the transformer over {n} sequences (P = {}) in {seconds:.3} s",
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
