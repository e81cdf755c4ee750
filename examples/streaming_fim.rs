//! A diagonal Fisher pass over a memory-mapped `.npy` dataset, saved as a Fisher file and used for
//! delta variances, with the library calls the `deltavar fim` command makes.
//!
//!     cargo run --release --example streaming_fim -- [ROWS]      # default 200000 rows (~630 MB)

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use deltavar::data::{write_npy, RowsRef};
use deltavar::*;

fn main() -> deltavar::Result<()> {
    let rows: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(200_000);
    let dir = std::env::temp_dir().join("deltavar-streaming-example");
    std::fs::create_dir_all(&dir).map_err(|e| Error::Io {
        path: dir.display().to_string(),
        source: e,
    })?;

    // a dataset on disk (written once; the pass below never loads it whole)
    let (x_path, y_path) = (dir.join("x.npy"), dir.join("y.npy"));
    let mut s = 1u64;
    let mut next = || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    };
    let x: Vec<f32> = (0..rows * 784).map(|_| next()).collect();
    let y: Vec<i64> = (0..rows).map(|i| (i % 10) as i64).collect();
    write_npy(&x_path, &[rows, 784], RowsRef::F32(&x))?;
    write_npy(&y_path, &[rows], RowsRef::I64(&y))?;
    drop(x);

    // the model (random weights here; load yours with Mlp::load_safetensors)
    let vm = VarMap::new();
    let mlp = Mlp::new(
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
        &[784, 256, 256, 10],
        Activation::Relu,
        None,
    )?;
    let params = mlp.params(&vm)?;

    // the streaming pass, with progress on stderr
    let data = MmapNpyDataset::open(&x_path, &y_path)?;
    let t = std::time::Instant::now();
    let engine = GraphEngine::from_mlp(&mlp)?;
    let artifact = fisher_pass(
        &engine,
        Likelihood::Categorical,
        "categorical",
        &data,
        &PassOptions::default(),
        &mut |done, total| eprint!("\r{done}/{total} examples"),
    )?;
    eprintln!();
    println!(
        "diag Fisher over {rows} examples in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    let path = dir.join("fisher.safetensors");
    artifact.save(&path)?;

    // later: load it (checked against the weights) and use it for delta variances
    let loaded = FisherArtifact::load(&path)?;
    loaded.check_model(&params)?;
    let sigma = build_sigma(
        SigmaStrategy::DiagonalEmpiricalFim,
        params.num_params(),
        &SigmaOptions::default(),
        Some(&loaded),
    )?;
    let queries = Tensor::randn(0f32, 1.0, (4, 784), &Device::Cpu)?;
    let (q, _) = engine.query_layered_gradients(
        &Qoi::Prob(3),
        &queries,
        1,
        &FactoredOptions::default(),
        LayerRoute::Factor,
    )?;
    println!(
        "ΔVar of p(class 3) at 4 random inputs: {:?}",
        query_delta_variances(&q, &*sigma)?
    );
    Ok(())
}
