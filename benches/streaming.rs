//! Streaming a memory-mapped dataset larger than the memory the pass may use.
//!
//!     cargo bench --bench streaming                  # writes a 6 GB x.npy under /tmp/dv-stream
//!     cargo bench --bench streaming -- --gb 1        # a smaller run
//!
//! Three child processes (so each peak RSS is its own), on a 784-256-256-10 relu classifier:
//! 1. the diagonal Fisher over the whole memory-mapped file (peak RSS, time);
//! 2. the same over the first 1 GB of rows, memory-mapped;
//! 3. the same 1 GB of rows loaded into memory first (in-memory throughput, equality of the sums).
//!
//! The page cache is dropped before each child when this process may (root), so the mapped
//! passes read from disk; `DV_WARM=1` keeps it (the file then comes from the page cache).

mod common;
use common::peak_rss_bytes;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use candle_core::{DType, Device};
use candle_nn::{VarBuilder, VarMap};
use deltavar::*;

const IN: usize = 784;

fn write_header(f: &mut impl Write, descr: &str, shape: &str) {
    let mut h = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    while (10 + h.len() + 1) % 64 != 0 {
        h.push(' ');
    }
    h.push('\n');
    f.write_all(b"\x93NUMPY\x01\x00").expect("write");
    f.write_all(&(h.len() as u16).to_le_bytes()).expect("write");
    f.write_all(h.as_bytes()).expect("write");
}

/// Writes x (n × 784 f32) and y (n int64 labels) chunk by chunk, never holding them.
fn make_files(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir).expect("dir");
    let mut fx = std::io::BufWriter::with_capacity(
        1 << 22,
        std::fs::File::create(dir.join("x.npy")).expect("x"),
    );
    let mut fy = std::io::BufWriter::new(std::fs::File::create(dir.join("y.npy")).expect("y"));
    write_header(&mut fx, "<f4", &format!("({n}, {IN})"));
    write_header(&mut fy, "<i8", &format!("({n},)"));
    let mut s = 0x2545F4914F6CDD1Du64;
    let mut row = vec![0u8; IN * 4];
    for _ in 0..n {
        for c in row.chunks_exact_mut(4) {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let v = ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
            c.copy_from_slice(&v.to_le_bytes());
        }
        fx.write_all(&row).expect("write");
        fy.write_all(&((s % 10) as i64).to_le_bytes())
            .expect("write");
    }
    fx.flush().expect("flush");
    fy.flush().expect("flush");
}

fn model() -> (Mlp, VarMap) {
    let vm = VarMap::new();
    let mlp = Mlp::new(
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        &[IN, 256, 256, 10],
        Activation::Relu,
        None,
    )
    .expect("mlp");
    let params = mlp.params(&vm).expect("params");
    let mut s = 7u64;
    let vals: Vec<f64> = (0..params.num_params())
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0) * 0.06
        })
        .collect();
    params.set_flat_values(&vals).expect("init");
    (mlp, vm)
}

fn child(dir: &Path, mode: &str, rows: usize) {
    let (mlp, _vm) = model();
    let engine = GraphEngine::from_mlp(&mlp).expect("engine");
    let lik: Likelihood = Likelihood::Categorical;
    let opts = FactoredOptions::default();
    let mm = MmapNpyDataset::open(dir.join("x.npy"), dir.join("y.npy")).expect("open");
    let rows = rows.min(mm.len());
    let (secs, sums) = match mode {
        "mmap" => {
            let range = DatasetRange::new(&mm, 0, rows).expect("range");
            let t = Instant::now();
            let d = engine.sum_sq(&lik, &range, &opts).expect("diag");
            (t.elapsed().as_secs_f64(), d)
        }
        _ => {
            let (x, y) = mm.get(0, rows).expect("load");
            drop(mm);
            let data = TensorDataset::new(x, y).expect("data");
            let t = Instant::now();
            let d = engine.sum_sq(&lik, &data, &opts).expect("diag");
            (t.elapsed().as_secs_f64(), d)
        }
    };
    let check: f64 = sums.iter().sum();
    let first: Vec<f64> = sums.iter().step_by(9973).copied().collect();
    println!(
        "{}",
        serde_json::json!({"mode": mode, "rows": rows, "seconds": secs, "peak_rss": peak_rss_bytes(), "check": check, "sample": first})
    );
}

fn drop_caches() -> bool {
    std::process::Command::new("sh")
        .args(["-c", "sync && echo 3 > /proc/sys/vm/drop_caches"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let dir =
        PathBuf::from(std::env::var("DV_STREAM_DIR").unwrap_or_else(|_| "/tmp/dv-stream".into()));
    if let Some(i) = args.iter().position(|a| a == "--child") {
        child(&dir, &args[i + 1], args[i + 2].parse().expect("rows"));
        return;
    }
    let gb: f64 = args
        .iter()
        .position(|a| a == "--gb")
        .map(|i| args[i + 1].parse().expect("gb"))
        .unwrap_or(6.0);
    let n = (gb * 1e9 / (IN * 4) as f64) as usize;
    let fits = (1e9 / (IN * 4) as f64) as usize;
    let t = Instant::now();
    let existing = MmapNpyDataset::open(dir.join("x.npy"), dir.join("y.npy"))
        .map(|d| d.len())
        .unwrap_or(0);
    if existing != n {
        make_files(&dir, n);
    }
    eprintln!(
        "data: {n} rows × {IN} f32 = {:.2} GB (ready in {:.1} s)",
        (n * IN * 4) as f64 / 1e9,
        t.elapsed().as_secs_f64()
    );
    let exe = std::env::current_exe().expect("exe");
    let mut results = Vec::new();
    for (mode, rows) in [("mmap", n), ("mmap", fits), ("memory", fits)] {
        let dropped = std::env::var("DV_WARM").is_err() && drop_caches();
        let out = Command::new(&exe)
            .args(["--child", mode, &rows.to_string()])
            .output()
            .expect("child");
        let v: serde_json::Value = serde_json::from_str(
            String::from_utf8_lossy(&out.stdout).trim(),
        )
        .unwrap_or_else(|_| panic!("child failed: {}", String::from_utf8_lossy(&out.stderr)));
        let rows = v["rows"].as_f64().unwrap_or(0.0);
        let secs = v["seconds"].as_f64().unwrap_or(f64::NAN);
        println!(
            "| {mode} | {} | {:.2} | {secs:.2} | {:.0} | {:.0} | {} |",
            rows as u64,
            rows * (IN * 4) as f64 / 1e9,
            rows / secs,
            v["peak_rss"].as_f64().unwrap_or(0.0) / (1u64 << 20) as f64,
            if dropped { "dropped" } else { "warm" }
        );
        results.push(v);
    }
    let same =
        results[1]["sample"] == results[2]["sample"] && results[1]["check"] == results[2]["check"];
    let ratio = (results[1]["rows"].as_f64().unwrap_or(0.0)
        / results[1]["seconds"].as_f64().unwrap_or(1.0))
        / (results[2]["rows"].as_f64().unwrap_or(0.0)
            / results[2]["seconds"].as_f64().unwrap_or(1.0));
    let big = (results[0]["rows"].as_f64().unwrap_or(0.0)
        / results[0]["seconds"].as_f64().unwrap_or(1.0))
        / (results[2]["rows"].as_f64().unwrap_or(0.0)
            / results[2]["seconds"].as_f64().unwrap_or(1.0));
    println!(
        "mmap vs in-memory on the same 1 GB: identical sums: {same}; throughput ratio {ratio:.3}"
    );
    println!("whole file vs in-memory throughput ratio {big:.3}");
}
