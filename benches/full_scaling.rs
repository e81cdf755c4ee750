//! The full inverse Fisher without P×P at scale: the kernel (exact) and CG methods on relu
//! classifiers up to P ≈ 1.9M, each point in its own process so its peak resident memory is its
//! own, printed next to the P²·8 bytes a dense Fisher would need.
//!
//!     cargo bench --bench full_scaling             # about 3 minutes on 2 cores
//!     cargo bench --bench full_scaling -- --quick  # the P ≈ 1.9M points only
//!     cargo bench --bench full_scaling -- --huge [K]   # P = 10M, 107M, 1.1B from a safetensors
//!                                                      # file, N = 10k, 16 queries (K: one point)
//!
//! `--huge` writes each model (f32, 1/√fan-in uniform weights) to a safetensors file under
//! `$DV_SCALE_DIR` (default the temp dir; the 1.1B model takes 4.4 GB of disk), then runs the
//! exact kernel ΔVar the way the CLI does: the weights memory-mapped and loaded once, the
//! factors of 10,000 examples, the Gram matrix, its Cholesky factor and 16 query gradients.

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

/// `n` LCG inputs with 10 LCG classes, and `m` LCG queries.
fn problem(n: usize, m: usize, inputs: usize) -> (TensorDataset, Tensor) {
    let x = Tensor::from_vec(lcg(n * inputs, 1), (n, inputs), &Device::Cpu).expect("x");
    let y: Vec<i64> = lcg(n, 2)
        .iter()
        .map(|v| ((v + 1.0) * 4.99) as i64)
        .collect();
    let data =
        TensorDataset::new(x, Tensor::from_vec(y, n, &Device::Cpu).expect("y")).expect("data");
    let queries = Tensor::from_vec(lcg(m * inputs, 3), (m, inputs), &Device::Cpu).expect("q");
    (data, queries)
}

/// The graph engine's Fisher of a classifier on `data`, default engine options.
fn categorical_fisher<'a>(mlp: &Mlp, data: &'a TensorDataset) -> GraphFisher<'a> {
    GraphFisher::with_engine(
        GraphEngine::from_mlp(mlp).expect("engine"),
        Likelihood::Categorical,
        data,
        FactoredOptions::default(),
    )
}

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
    let (data, queries) = problem(n, M, sizes[0]);
    let fisher = categorical_fisher(&mlp, &data);
    let (qf, _) = fisher
        .engine()
        .query_layered_gradients(
            &Qoi::Output(0),
            &queries,
            1,
            &FactoredOptions::default(),
            LayerRoute::Factor,
        )
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

const HUGE: [&[usize]; 3] = [
    &[784, 2048, 2048, 2048, 10],
    &[784, 8192, 8192, 4096, 10],
    &[784, 32768, 32768, 10],
];
const HUGE_N: usize = 10_000;
const HUGE_M: usize = 16;

/// Writes an MLP's weights (f32, uniform ±1/√fan-in from the LCG) as safetensors, streaming
/// each tensor so the writer never holds a whole layer.
fn write_model(path: &std::path::Path, sizes: &[usize]) -> std::io::Result<()> {
    use std::io::Write;
    let mut header = serde_json::Map::new();
    let mut off = 0usize;
    let mut parts: Vec<(usize, usize, f64)> = vec![];
    for l in 0..sizes.len() - 1 {
        let (inp, out) = (sizes[l], sizes[l + 1]);
        let scale = 1.0 / (inp as f64).sqrt();
        for (part, shape, n) in [
            ("weight", vec![out, inp], out * inp),
            ("bias", vec![out], out),
        ] {
            header.insert(
                format!("{}.{part}", 2 * l),
                serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [off, off + 4 * n]}),
            );
            off += 4 * n;
            parts.push((n, parts.len() + 11, scale));
        }
    }
    let mut h = serde_json::to_string(&header)?.into_bytes();
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut f = std::io::BufWriter::with_capacity(1 << 22, std::fs::File::create(path)?);
    f.write_all(&(h.len() as u64).to_le_bytes())?;
    f.write_all(&h)?;
    for (n, seed, scale) in parts {
        let mut s = (seed as u64)
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let mut buf = Vec::with_capacity(1 << 20);
        let mut left = n;
        while left > 0 {
            let k = left.min(1 << 18);
            buf.clear();
            for _ in 0..k {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let v = (((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0) as f64 * scale;
                buf.extend_from_slice(&(v as f32).to_le_bytes());
            }
            f.write_all(&buf)?;
            left -= k;
        }
    }
    f.flush()
}

/// One `--huge` point in this process: load, factors, Gram, Cholesky, queries; JSON out.
fn huge_point(path: &std::path::Path, k: usize) {
    let sizes = HUGE[k];
    let t = Instant::now();
    let (mlp, _vm) =
        Mlp::load_safetensors(path, Activation::Relu, DType::F32, &Device::Cpu, "", None)
            .expect("load");
    let load = t.elapsed().as_secs_f64();
    let (data, queries) = problem(HUGE_N, HUGE_M, sizes[0]);
    let fisher = categorical_fisher(&mlp, &data);
    let budget = 20u64 << 30;
    let g = fisher.gradient_matrix(budget).expect("factors");
    let factors = t.elapsed().as_secs_f64();
    let s = KernelInverseFisher::new(Arc::clone(&g), DAMPING).expect("kernel");
    let kernel = t.elapsed().as_secs_f64();
    let (qf, _) = fisher
        .engine()
        .query_layered_gradients(
            &Qoi::Output(0),
            &queries,
            1,
            &FactoredOptions::default(),
            LayerRoute::Factor,
        )
        .expect("q");
    let dv = query_delta_variances(&qf, &s).expect("dv");
    let secs = t.elapsed().as_secs_f64();
    println!(
        "{{\"P\":{},\"N\":{HUGE_N},\"seconds\":{secs:.1},\"load\":{load:.1},\"factors\":{:.1},\"gram_cholesky\":{:.1},\"peak_rss\":{},\"dv\":{:?}}}",
        fisher.num_params(),
        factors - load,
        kernel - factors,
        peak_rss_bytes(),
        &dv[..4]
    );
}

fn huge(args: &[String], exe: &std::path::Path) {
    let dir = std::env::var_os("DV_SCALE_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("deltavar-scale"));
    std::fs::create_dir_all(&dir).expect("scale dir");
    let only: Option<usize> = args
        .iter()
        .position(|a| a == "--huge")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok());
    println!("| P | N | queries | seconds (all) | load | factors | Gram + Cholesky | peak RSS (GiB) | model file (GB) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (k, sizes) in HUGE.iter().enumerate() {
        if only.is_some_and(|o| o != k) {
            continue;
        }
        let path = dir.join(format!("mlp-{k}.safetensors"));
        if !path.exists() {
            write_model(&path, sizes).expect("write model");
        }
        let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        let out = Command::new(exe)
            .arg("--huge-point")
            .arg(&path)
            .arg(k.to_string())
            .output()
            .expect("child");
        let v: serde_json::Value =
            match serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()) {
                Ok(v) => v,
                Err(_) => {
                    println!(
                        "| {sizes:?} | {HUGE_N} | {HUGE_M} | failed: {} | | | | | {:.1} |",
                        String::from_utf8_lossy(&out.stderr)
                            .trim()
                            .replace('\n', " "),
                        bytes as f64 / 1e9
                    );
                    continue;
                }
            };
        println!(
            "| {} | {HUGE_N} | {HUGE_M} | {} | {} | {} | {} | {:.2} | {:.2} |",
            v["P"],
            v["seconds"],
            v["load"],
            v["factors"],
            v["gram_cholesky"],
            v["peak_rss"].as_f64().unwrap_or(0.0) / (1u64 << 30) as f64,
            bytes as f64 / 1e9
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--huge-point") {
        huge_point(
            std::path::Path::new(&args[i + 1]),
            args[i + 2].parse().expect("point"),
        );
        return;
    }
    if args.iter().any(|a| a == "--huge") {
        huge(&args, &std::env::current_exe().expect("exe"));
        return;
    }
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
