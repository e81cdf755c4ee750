//! `deltavar`: the command line over the library (see the README's CLI section).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use clap::{Parser, Subcommand};
use deltavar::data::{NpyArray, RowsRef};
use deltavar::model::MlpSpec;
use deltavar::*;

#[derive(Parser)]
#[command(
    name = "deltavar",
    version,
    about = "Delta Variance: the epistemic variance of a trained network's predictions"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ModelArgs {
    /// Weights of a PyTorch nn.Sequential MLP (safetensors).
    #[arg(long)]
    weights: PathBuf,
    /// Architecture: mlp:IN,H1,...,OUT:ACT with ACT one of identity, relu, tanh, sigmoid, gelu, gelu-tanh, silu, softplus.
    #[arg(long)]
    arch: String,
    /// Prefix of the tensor names (for example "model.").
    #[arg(long, default_value = "")]
    prefix: String,
    /// Names of the Linear layers, comma separated (default 0,2,4,...).
    #[arg(long)]
    layer_names: Option<String>,
    /// Precision of the forward and backward passes (sums and solves are always f64).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Examples per batch.
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
}

#[derive(Subcommand)]
enum Command {
    /// Delta variances of a QoI at query points.
    Variance(VarianceArgs),
    /// An offline Fisher pass over training data, saved for later.
    Fim(FimArgs),
    /// Merges the shards of a Fisher pass.
    Merge(MergeArgs),
    /// Trains a small MLP on built-in data with a gap and shows its delta variance.
    Demo(DemoArgs),
}

#[derive(clap::Args)]
struct VarianceArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Query inputs (M, IN), .npy.
    #[arg(long)]
    queries: PathBuf,
    /// sum | output:K | prob:K
    #[arg(long, default_value = "sum")]
    qoi: String,
    /// identity | diag-fim | full-fim
    #[arg(long, default_value = "full-fim")]
    sigma: String,
    /// auto | dense | kernel | cg (full-fim only)
    #[arg(long, default_value = "auto")]
    method: String,
    /// Training inputs (N, IN), .npy.
    #[arg(long)]
    train_x: Option<PathBuf>,
    /// Training targets, .npy: (N, OUT) floats or (N,) int64 labels.
    #[arg(long)]
    train_y: Option<PathBuf>,
    /// gaussian[:SIGMA] | categorical
    #[arg(long)]
    likelihood: Option<String>,
    /// A saved Fisher pass (from `deltavar fim`) instead of training data.
    #[arg(long)]
    fisher: Option<PathBuf>,
    /// Use a Fisher file that covers only part of its dataset (prints the fraction covered).
    #[arg(long)]
    allow_partial: bool,
    /// Damping λ.
    #[arg(long, default_value_t = 1e-5)]
    damping: f64,
    /// Divide Σ by N (the paper's F⁻¹/N).
    #[arg(long)]
    posterior_scale: bool,
    /// Memory budget in bytes for dense work.
    #[arg(long)]
    memory_budget: Option<u64>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct FimArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    train_x: PathBuf,
    #[arg(long)]
    train_y: PathBuf,
    /// gaussian[:SIGMA] | categorical
    #[arg(long)]
    likelihood: String,
    /// diag | dense
    #[arg(long, default_value = "diag")]
    kind: String,
    /// Only shard I of N (I/N, 0-based).
    #[arg(long)]
    shard: Option<String>,
    #[arg(long)]
    out: PathBuf,
    /// Memory budget in bytes for a dense pass.
    #[arg(long)]
    memory_budget: Option<u64>,
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

#[derive(clap::Args)]
struct MergeArgs {
    /// Shard files.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    #[arg(long)]
    out: PathBuf,
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
struct DemoArgs {
    /// Where to write delta_variance.png.
    #[arg(long, default_value = "deltavar-demo")]
    out: PathBuf,
}

fn dtype(s: &str) -> Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "f64" => Ok(DType::F64),
        _ => Err(Error::invalid("--dtype", s, "expected f32 or f64")),
    }
}

fn load_model(m: &ModelArgs) -> Result<Mlp> {
    let arch: MlpSpec = m.arch.parse()?;
    if !m.weights.exists() {
        return Err(Error::Io {
            path: m.weights.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    let names: Option<Vec<String>> = m
        .layer_names
        .as_ref()
        .map(|s| s.split(',').map(|x| x.trim().to_string()).collect());
    let (mlp, _varmap) = Mlp::load_safetensors(
        &m.weights,
        arch.activation,
        dtype(&m.dtype)?,
        &Device::Cpu,
        &m.prefix,
        names.as_deref(),
    )?;
    if mlp.sizes() != arch.sizes.as_slice() {
        return Err(Error::invalid(
            "--arch",
            &m.arch,
            format!(
                "the weights in {} have layer widths {:?}",
                m.weights.display(),
                mlp.sizes()
            ),
        ));
    }
    Ok(mlp)
}

fn read_queries(path: &Path, width: usize, dt: DType) -> Result<Tensor> {
    let a = NpyArray::open(path)?;
    if a.shape().len() != 2 || a.row_len() != width {
        return Err(Error::BadFile {
            path: path.display().to_string(),
            detail: format!(
                "queries must have shape (M, {width}) for this model, got {:?}",
                a.shape()
            ),
        });
    }
    let rows = a.rows();
    let t = match a.rows_ref(0, rows)? {
        RowsRef::F32(v) => Tensor::from_slice(v, (rows, width), &Device::Cpu)?,
        RowsRef::F64(v) => Tensor::from_slice(v, (rows, width), &Device::Cpu)?,
        RowsRef::I64(_) => {
            return Err(Error::BadFile {
                path: path.display().to_string(),
                detail: "queries must be float32 or float64".into(),
            })
        }
    };
    let vals = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    if let Some(k) = vals.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            what: format!("queries {}", path.display()),
            detail: format!("row {}, column {} is {}", k / width, k % width, vals[k]),
        });
    }
    Ok(t.to_dtype(dt)?)
}

fn progress_bar(total: usize, quiet: bool) -> indicatif::ProgressBar {
    if quiet || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let pb = indicatif::ProgressBar::new(total as u64);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{bar:40} {pos}/{len} examples  {per_sec}  eta {eta}",
    ) {
        pb.set_style(style);
    }
    pb
}

/// `variance`: Σ from the training data or a saved Fisher, query factors, ΔVar.
fn variance(a: VarianceArgs) -> Result<()> {
    let VarianceArgs {
        model,
        queries,
        qoi,
        sigma,
        method,
        train_x,
        train_y,
        likelihood,
        fisher,
        allow_partial,
        damping,
        posterior_scale,
        memory_budget,
        json,
    } = a;
    let t0 = Instant::now();
    let mlp = load_model(&model)?;
    let qoi: Qoi = qoi.parse()?;
    let strategy: SigmaStrategy = sigma.parse()?;
    let sigma_name = strategy.name();
    let q = read_queries(&queries, mlp.sizes()[0], dtype(&model.dtype)?)?;
    let mut opts = SigmaOptions {
        damping,
        posterior_scale,
        full_method: method.parse()?,
        ..Default::default()
    };
    if let Some(b) = memory_budget {
        opts.memory_budget = b;
    }
    let eo = FactoredOptions {
        batch_size: model.batch_size,
        threads: 0,
    };
    let needs_fisher = !matches!(strategy, SigmaStrategy::Identity);
    let missing = |what: &str| Error::MissingInput {
        strategy: sigma.clone(),
        missing: what.into(),
    };
    // the Fisher source: a saved pass, or the training data on the factored engine; both
    // then run the same pipeline
    let data;
    let source: Option<Box<dyn FisherSource + '_>> =
        match (fisher, train_x, train_y) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                return Err(Error::invalid(
                    "--fisher",
                    "with --train-x/--train-y",
                    "give either a saved Fisher or training data, not both",
                ))
            }
            _ if !needs_fisher => None,
            (Some(f), None, None) => {
                let art = FisherArtifact::load(f)?.with_partial_allowed(allow_partial);
                art.check_tensors(&mlp.named_tensors())?;
                if let Some(w) = art.check_complete()? {
                    eprintln!("{w}");
                }
                Some(Box::new(art))
            }
            (None, Some(x), Some(y)) => {
                let lik: Likelihood = likelihood
                    .as_deref()
                    .ok_or_else(|| {
                        missing("--likelihood gaussian[:SIGMA]|categorical with the training data")
                    })?
                    .parse()?;
                data = MmapNpyDataset::open(x, y)?;
                Some(Box::new(FactoredFisher::new(&mlp, lik, &data, eo.clone())?))
            }
            (None, Some(_), None) | (None, None, Some(_)) => {
                return Err(missing("both --train-x and --train-y"))
            }
            (None, None, None) => return Err(missing(
                "training data (--train-x, --train-y, --likelihood) or a saved Fisher (--fisher)",
            )),
        };
    let out = mlp_delta_variances_with(&mlp, qoi, &q, strategy, &opts, source.as_deref(), &eo)?;
    let seconds = t0.elapsed().as_secs_f64();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "delta_variance": out.delta_variance,
                "qoi": out.qoi,
                "sigma": sigma_name,
                "method": out.method.as_ref().map(|m| m.method.name()),
                "method_reason": out.method.as_ref().map(|m| m.reason.clone()),
                "cg": out.cg,
                "path": out.path,
                "num_params": out.num_params,
                "num_train": out.num_train,
                "damping": damping,
                "posterior_scale": posterior_scale,
                "seconds": seconds,
            })
        );
        return Ok(());
    }
    println!(
        "sigma {sigma_name}{}  P = {}  N = {}  ({seconds:.3} s)",
        out.method
            .as_ref()
            .map(|m| format!(" ({})", m.method.name()))
            .unwrap_or_default(),
        out.num_params,
        out.num_train
    );
    println!(
        "{:>6}  {:>14}  {:>14}  {:>12}",
        "query", "qoi", "delta_var", "std"
    );
    for (i, (q, v)) in out.qoi.iter().zip(&out.delta_variance).enumerate() {
        println!("{i:>6}  {q:>14.6e}  {v:>14.6e}  {:>12.4e}", v.sqrt());
    }
    Ok(())
}

/// `fim`: an offline Fisher pass (whole or one shard), saved.
fn fim(a: FimArgs) -> Result<()> {
    let FimArgs {
        model,
        train_x,
        train_y,
        likelihood,
        kind,
        shard,
        out,
        memory_budget,
        json,
        quiet,
    } = a;
    let t0 = Instant::now();
    let mlp = load_model(&model)?;
    let lik: Likelihood = likelihood.parse()?;
    let data = MmapNpyDataset::open(&train_x, &train_y)?;
    let mut opts = PassOptions {
        kind: kind.parse()?,
        shard: shard
            .as_deref()
            .map(deltavar::fisher::parse_shard)
            .transpose()?,
        engine: FactoredOptions {
            batch_size: model.batch_size,
            threads: 0,
        },
        ..Default::default()
    };
    if let Some(b) = memory_budget {
        opts.memory_budget = b;
    }
    let pb = progress_bar(data.len(), quiet || json);
    let art = fisher_pass(&mlp, lik, &likelihood, &data, &opts, &mut |done, total| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    })?;
    pb.finish_and_clear();
    art.save(&out)?;
    let seconds = t0.elapsed().as_secs_f64();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "num_params": mlp.num_params(),
                "num_train": art.meta.num_examples,
                "kind": art.meta.kind,
                "ranges": art.meta.ranges,
                "seconds": seconds,
                "out": out.display().to_string(),
            })
        );
    } else {
        println!(
            "{} Fisher over {} examples (P = {}) in {seconds:.3} s -> {}",
            art.meta.kind,
            art.meta.num_examples,
            mlp.num_params(),
            out.display()
        );
    }
    Ok(())
}

/// `merge`: sums the shards of one pass.
fn merge(a: MergeArgs) -> Result<()> {
    let MergeArgs { inputs, out, json } = a;
    let parts = inputs
        .iter()
        .map(FisherArtifact::load)
        .collect::<Result<Vec<_>>>()?;
    let merged = FisherArtifact::merge(&parts)?;
    merged.save(&out)?;
    if json {
        println!(
            "{}",
            serde_json::json!({
                "num_params": merged.diag.sums().len(),
                "num_train": merged.meta.num_examples,
                "complete": merged.is_complete(),
                "missing": merged.missing_ranges(),
                "out": out.display().to_string(),
            })
        );
    } else {
        println!(
            "merged {} files: {} examples{} -> {}",
            parts.len(),
            merged.meta.num_examples,
            if merged.is_complete() {
                ""
            } else {
                " (not the whole dataset yet)"
            },
            out.display()
        );
    }
    Ok(())
}

/// `demo`: the built-in example.
fn demo(a: DemoArgs) -> Result<()> {
    let report = deltavar::demo::run_demo(Some(&a.out))?;
    print!("{}", deltavar::demo::demo_table(&report));
    if let Some(p) = &report.png {
        println!("plot: {}  ({:.1} s)", p.display(), report.seconds);
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Variance(a) => variance(a),
        Command::Fim(a) => fim(a),
        Command::Merge(a) => merge(a),
        Command::Demo(a) => demo(a),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
