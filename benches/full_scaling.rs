//! The full inverse Fisher without P×P at scale: the kernel (exact) and CG methods on relu
//! classifiers up to P ≈ 1.9M, each point in its own process so its peak resident memory is its
//! own, printed next to the P²·8 bytes a dense Fisher would need.
//!
//!     cargo bench --bench full_scaling             # about 3 minutes on 2 cores
//!     cargo bench --bench full_scaling -- --quick  # the P ≈ 1.9M points only

mod common;
use common::{lcg, peak_rss_bytes};

use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use deltavar::sigma::{CgInverseFisher, CgOptions, KernelInverseFisher};
use deltavar::*;

const ARCHS: [[usize; 4]; 2] = [[256, 256, 128, 10], [784, 1024, 1024, 10]];
const M: usize = 4;
const DAMPING: f64 = 1e-1;

fn point(arch: usize, n: usize, method: &str) {
    let sizes = ARCHS[arch];
    let vm = VarMap::new();
    let mlp = Mlp::new(
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        &sizes,
        Activation::Relu,
        None,
    )
    .expect("mlp");
    // the same weights in every child process (candle-nn's initialiser draws from the thread RNG)
    let params = mlp.params(&vm).expect("params");
    let w: Vec<f64> = params
        .entries()
        .iter()
        .enumerate()
        .flat_map(|(k, e)| {
            let fan_in = if e.dims.len() == 2 { e.dims[1] } else { 1 };
            let s = 1.0 / (fan_in as f64).sqrt();
            lcg(e.numel, 11 + k as u64)
                .into_iter()
                .map(move |v| v as f64 * s)
        })
        .collect();
    params.set_flat_values(&w).expect("weights");
    let x = Tensor::from_vec(lcg(n * sizes[0], 1), (n, sizes[0]), &Device::Cpu).expect("x");
    let y: Vec<i64> = lcg(n, 2)
        .iter()
        .map(|v| ((v + 1.0) * 4.99) as i64)
        .collect();
    let data =
        TensorDataset::new(x, Tensor::from_vec(y, n, &Device::Cpu).expect("y")).expect("data");
    let queries = Tensor::from_vec(lcg(M * sizes[0], 3), (M, sizes[0]), &Device::Cpu).expect("q");
    let fisher = FactoredFisher::new(
        &mlp,
        Likelihood::Categorical,
        &data,
        FactoredOptions::default(),
    )
    .expect("fisher");
    let qf = fisher
        .engine()
        .query_factors(&Qoi::Output(0), &queries, &FactoredOptions::default())
        .expect("q");
    let t = Instant::now();
    let g = fisher
        .gradient_matrix(DEFAULT_MEMORY_BUDGET)
        .expect("factors");
    let (dv, iters) = match method {
        "kernel" => {
            let s = KernelInverseFisher::new(Arc::clone(&g), DAMPING).expect("kernel");
            (query_delta_variances(&qf, &s).expect("dv"), 0)
        }
        _ => {
            let s = CgInverseFisher::new(
                Arc::clone(&g),
                DAMPING,
                CgOptions {
                    tol: 1e-8,
                    max_iter: 500,
                    ..Default::default()
                },
            )
            .expect("cg");
            let (dv, _) = query_delta_variances_reported(&qf, &s).expect("dv");
            (dv.values, dv.cg.map(|r| r.iterations).unwrap_or(0))
        }
    };
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{{\"P\":{},\"N\":{n},\"method\":\"{method}\",\"seconds\":{secs:.3},\"iterations\":{iters},\"peak_rss\":{},\"dv\":{:?}}}",
        fisher.num_params(),
        peak_rss_bytes(),
        dv
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--point") {
        point(
            args[i + 1].parse().expect("arch"),
            args[i + 2].parse().expect("n"),
            &args[i + 3],
        );
        return;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let exe = std::env::current_exe().expect("exe");
    println!("| P | N | method | seconds | CG iterations | peak RSS (MiB) | dense P² f64 (GiB) | max rel. diff kernel vs CG |");
    println!("|---|---|---|---|---|---|---|---|");
    for (a, _) in ARCHS.iter().enumerate() {
        if quick && a == 0 {
            continue;
        }
        for n in [1024usize, 4096] {
            let mut values: Vec<Vec<f64>> = Vec::new();
            for method in ["kernel", "cg"] {
                let out = Command::new(&exe)
                    .args(["--point", &a.to_string(), &n.to_string(), method])
                    .output()
                    .expect("child");
                let v: serde_json::Value =
                    match serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()) {
                        Ok(v) => v,
                        Err(_) => {
                            eprintln!("point failed: {}", String::from_utf8_lossy(&out.stderr));
                            continue;
                        }
                    };
                let dv: Vec<f64> = v["dv"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|x| x.as_f64()).collect())
                    .unwrap_or_default();
                values.push(dv.clone());
                let diff = if values.len() == 2 {
                    format!(
                        "{:.1e}",
                        values[0]
                            .iter()
                            .zip(&values[1])
                            .map(|(a, b)| ((a - b) / a).abs())
                            .fold(0.0, f64::max)
                    )
                } else {
                    String::new()
                };
                let p = v["P"].as_f64().unwrap_or(0.0);
                println!(
                    "| {} | {n} | {method} | {:.2} | {} | {:.0} | {:.0} | {diff} |",
                    p as u64,
                    v["seconds"].as_f64().unwrap_or(f64::NAN),
                    v["iterations"].as_u64().unwrap_or(0),
                    v["peak_rss"].as_f64().unwrap_or(0.0) / (1u64 << 20) as f64,
                    p * p * 8.0 / (1u64 << 30) as f64,
                );
            }
        }
    }
}
