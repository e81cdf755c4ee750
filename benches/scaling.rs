//! Scaling of the factored diagonal Fisher: P from 10k to 10M parameters, N from 1k to 100k
//! examples, each point in its own process so its peak resident memory (VmHWM) is its own.
//!
//!     cargo bench --bench scaling               # the whole grid (about 2 minutes on 2 cores)
//!     cargo bench --bench scaling -- --quick    # P ≤ 1M, N ≤ 10k
//!
//! Prints a Markdown table: P, N, seconds, examples/s, peak RSS, the data's own size, and what
//! the O(·) bound predicts: data + weights (the candle model and the engine's snapshot) + the
//! total's P f64 sums + threads × (P f64 accumulator + the largest layer product + one batch of
//! activations).

mod common;
use common::{lcg, peak_rss_bytes};

use std::process::Command;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use deltavar::*;

const ARCHS: [(&str, [usize; 4]); 4] = [
    ("10k", [64, 64, 64, 10]),
    ("100k", [256, 256, 128, 10]),
    ("1M", [784, 1024, 256, 10]),
    ("10M", [1024, 2048, 4096, 10]),
];

fn point(arch: usize, n: usize) {
    let sizes = ARCHS[arch].1;
    let vm = VarMap::new();
    let mlp = Mlp::new(
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        &sizes,
        Activation::Relu,
        None,
    )
    .expect("mlp");
    let x = Tensor::from_vec(lcg(n * sizes[0], 1), (n, sizes[0]), &Device::Cpu).expect("x");
    let y: Vec<i64> = lcg(n, 2)
        .iter()
        .map(|v| ((v + 1.0) * 4.99) as i64)
        .collect();
    let data =
        TensorDataset::new(x, Tensor::from_vec(y, n, &Device::Cpu).expect("y")).expect("data");
    let engine = GraphEngine::from_mlp(&mlp).expect("engine");
    let lik: Likelihood = Likelihood::Categorical;
    let opts = FactoredOptions::default();
    let t = Instant::now();
    let d = engine.sum_sq(&lik, &data, &opts).expect("diag");
    let secs = t.elapsed().as_secs_f64();
    let s: f64 = d.iter().sum();
    println!(
        "{{\"P\":{},\"N\":{n},\"seconds\":{secs:.4},\"peak_rss\":{},\"data_bytes\":{},\"check\":{s:.3e}}}",
        engine.num_params(),
        peak_rss_bytes(),
        n * (sizes[0] * 4 + 8)
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--point") {
        let arch: usize = args[i + 1].parse().expect("arch");
        let n: usize = args[i + 2].parse().expect("n");
        point(arch, n);
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let exe = std::env::current_exe().expect("exe");
    println!("| P | N | seconds | examples/s | peak RSS (MiB) | data (MiB) | predicted: data + 2·weights (f32) + 8P (the total) + 2 threads × (8P + layer + batch) (MiB) |");
    println!("|---|---|---|---|---|---|---|");
    for (a, (_, sizes)) in ARCHS.iter().enumerate() {
        for n in [1_000usize, 10_000, 100_000] {
            if quick && (a > 2 || n > 10_000) {
                continue;
            }
            let out = Command::new(&exe)
                .args(["--point", &a.to_string(), &n.to_string()])
                .output()
                .expect("child");
            let line = String::from_utf8_lossy(&out.stdout);
            let v: serde_json::Value = match serde_json::from_str(line.trim()) {
                Ok(v) => v,
                Err(_) => {
                    eprintln!(
                        "point {a} {n} failed: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                    continue;
                }
            };
            let p = v["P"].as_u64().unwrap_or(0) as f64;
            let secs = v["seconds"].as_f64().unwrap_or(f64::NAN);
            let mib = |b: f64| b / (1u64 << 20) as f64;
            // model (candle) + engine snapshot, f32; the total's P f64 sums; per thread: P f64
            // accumulator, the largest out×in product, and a batch of 256 activations, signals
            // and squares; plus the data
            let batch_acts = (256 * sizes.iter().sum::<usize>() * 4 * 4) as f64;
            let max_layer = sizes.windows(2).map(|w| w[0] * w[1]).max().unwrap_or(0) as f64;
            let bound = 2.0 * p * 4.0
                + p * 8.0
                + 2.0 * (p * 8.0 + max_layer * 4.0 + batch_acts)
                + v["data_bytes"].as_f64().unwrap_or(0.0);
            println!(
                "| {} | {n} | {secs:.3} | {:.0} | {:.0} | {:.0} | {:.0} |",
                p as u64,
                n as f64 / secs,
                mib(v["peak_rss"].as_f64().unwrap_or(0.0)),
                mib(v["data_bytes"].as_f64().unwrap_or(0.0)),
                mib(bound)
            );
        }
    }
}
