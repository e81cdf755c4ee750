//! `deltavar`: the command line over the library (see the README's CLI section).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use clap::{Parser, Subcommand};
use deltavar::data::{NpyArray, RowsRef};
use deltavar::sigma::FullMethod;
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
    Variance {
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
    },
    /// An offline Fisher pass over training data, saved for later.
    Fim {
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
    },
    /// Merges the shards of a Fisher pass.
    Merge {
        /// Shard files.
        #[arg(required = true)]
        inputs: Vec<PathBuf>,
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Trains a small MLP on built-in data with a gap and shows its delta variance.
    Demo {
        /// Where to write delta_variance.png.
        #[arg(long, default_value = "deltavar-demo")]
        out: PathBuf,
    },
}

struct Arch {
    sizes: Vec<usize>,
    act: Activation,
}

fn parse_arch(s: &str) -> Result<Arch> {
    let bad = || {
        Error::invalid(
            "--arch",
            s,
            "expected mlp:IN,H1,...,OUT:ACT, for example mlp:784,256,10:relu",
        )
    };
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 3 || parts[0] != "mlp" {
        return Err(bad());
    }
    let sizes = parts[1]
        .split(',')
        .map(|w| w.trim().parse::<usize>().map_err(|_| bad()))
        .collect::<Result<Vec<_>>>()?;
    if sizes.len() < 2 || sizes.contains(&0) {
        return Err(bad());
    }
    Ok(Arch {
        sizes,
        act: parts[2].parse()?,
    })
}

fn parse_likelihood(s: &str) -> Result<Likelihood> {
    let bad = || {
        Error::invalid(
            "--likelihood",
            s,
            "expected gaussian, gaussian:SIGMA or categorical",
        )
    };
    match s.split_once(':') {
        None if s == "gaussian" => Ok(Likelihood::gaussian(1.0)),
        None if s == "categorical" => Ok(Likelihood::Categorical),
        Some(("gaussian", sig)) => {
            let v: f64 = sig.parse().map_err(|_| bad())?;
            if !(v.is_finite() && v > 0.0) {
                return Err(bad());
            }
            Ok(Likelihood::gaussian(v))
        }
        _ => Err(bad()),
    }
}

fn dtype(s: &str) -> Result<DType> {
    match s {
        "f32" => Ok(DType::F32),
        "f64" => Ok(DType::F64),
        _ => Err(Error::invalid("--dtype", s, "expected f32 or f64")),
    }
}

fn load_model(m: &ModelArgs) -> Result<(Mlp, candle_nn::VarMap, Params)> {
    let arch = parse_arch(&m.arch)?;
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
    let (mlp, vm) = Mlp::load_safetensors(
        &m.weights,
        arch.act,
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
    let params = mlp.params(&vm)?;
    Ok((mlp, vm, params))
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

fn sigma_strategy(s: &str) -> Result<SigmaStrategy> {
    match s {
        "identity" => Ok(SigmaStrategy::Identity),
        "diag-fim" => Ok(SigmaStrategy::DiagonalEmpiricalFim),
        "full-fim" => Ok(SigmaStrategy::InverseFullEmpiricalFim),
        _ => Err(Error::invalid(
            "--sigma",
            s,
            "expected identity, diag-fim or full-fim",
        )),
    }
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

fn json_line(v: serde_json::Value) {
    println!("{v}");
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Variance {
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
        } => {
            let t0 = Instant::now();
            let (mlp, _vm, params) = load_model(&model)?;
            let qoi: Qoi = qoi.parse()?;
            let strategy = sigma_strategy(&sigma)?;
            let sigma_name = strategy.name();
            let q = read_queries(&queries, mlp.sizes()[0], dtype(&model.dtype)?)?;
            let mut opts = SigmaOptions {
                damping,
                posterior_scale,
                full_method: method.parse::<FullMethod>()?,
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
            let out = match (&fisher, &train_x, &train_y) {
                (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                    return Err(Error::invalid("--fisher", "with --train-x/--train-y", "give either a saved Fisher or training data, not both"))
                }
                (Some(f), None, None) if needs_fisher => {
                    let art = FisherArtifact::load(f)?.with_partial_allowed(allow_partial);
                    art.check_tensors(&mlp.named_tensors())?;
                    if let Some(w) = art.check_complete()? {
                        eprintln!("{w}");
                    }
                    let engine = FactoredMlp::new(&mlp)?;
                    let (s, choice) = build_sigma_reported(strategy, params.num_params(), &opts, Some(&art))?;
                    let qf = engine.query_factors(&qoi.clone(), &q, &eo)?;
                    let (forms, path) = query_delta_variances_reported(&qf, &*s)?;
                    MlpDeltaVariances {
                        qoi: qf.values().to_vec(),
                        delta_variance: forms.values,
                        sigma: s.name(),
                        method: choice,
                        cg: forms.cg,
                        path,
                        num_params: params.num_params(),
                        num_train: art.meta.num_examples,
                    }
                }
                (None, Some(x), Some(y)) if needs_fisher => {
                    let lik = parse_likelihood(likelihood.as_deref().ok_or_else(|| Error::MissingInput {
                        strategy: sigma.clone(),
                        missing: "--likelihood gaussian[:SIGMA]|categorical with the training data".into(),
                    })?)?;
                    let data = MmapNpyDataset::open(x, y)?;
                    mlp_delta_variances(&mlp, qoi, &q, strategy, &opts, Some((&data, lik.into())), &eo)?
                }
                (None, Some(_), None) | (None, None, Some(_)) if needs_fisher => {
                    return Err(Error::MissingInput { strategy: sigma.clone(), missing: "both --train-x and --train-y".into() })
                }
                _ if needs_fisher => {
                    return Err(Error::MissingInput {
                        strategy: sigma.clone(),
                        missing: "training data (--train-x, --train-y, --likelihood) or a saved Fisher (--fisher)".into(),
                    })
                }
                _ => mlp_delta_variances(&mlp, qoi, &q, strategy, &opts, None, &eo)?,
            };
            let seconds = t0.elapsed().as_secs_f64();
            if json {
                json_line(serde_json::json!({
                    "delta_variance": out.delta_variance,
                    "qoi": out.qoi,
                    "sigma": sigma_name,
                    "method": out.method.as_ref().map(|m| m.method.name()),
                    "method_reason": out.method.as_ref().map(|m| m.reason.clone()),
                    "cg": out.cg,
                    "num_params": out.num_params,
                    "num_train": out.num_train,
                    "damping": damping,
                    "posterior_scale": posterior_scale,
                    "seconds": seconds,
                }));
            } else {
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
            }
            Ok(())
        }
        Command::Fim {
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
        } => {
            let t0 = Instant::now();
            let (mlp, _vm, params) = load_model(&model)?;
            let lik = parse_likelihood(&likelihood)?;
            let data = MmapNpyDataset::open(&train_x, &train_y)?;
            let kind = match kind.as_str() {
                "diag" => PassKind::Diag,
                "dense" => PassKind::Dense,
                k => return Err(Error::invalid("--kind", k, "expected diag or dense")),
            };
            let shard = match shard {
                None => None,
                Some(s) => {
                    let bad = || Error::invalid("--shard", &s, "expected I/N with 0 <= I < N");
                    let (i, n) = s.split_once('/').ok_or_else(bad)?;
                    Some((i.parse().map_err(|_| bad())?, n.parse().map_err(|_| bad())?))
                }
            };
            let mut opts = PassOptions {
                kind,
                shard,
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
            let art = fisher_pass(
                &mlp,
                lik.into(),
                &likelihood,
                &data,
                &opts,
                &mut |done, total| {
                    pb.set_length(total as u64);
                    pb.set_position(done as u64);
                },
            )?;
            pb.finish_and_clear();
            art.save(&out)?;
            let seconds = t0.elapsed().as_secs_f64();
            if json {
                json_line(serde_json::json!({
                    "num_params": params.num_params(),
                    "num_train": art.meta.num_examples,
                    "kind": art.meta.kind,
                    "ranges": art.meta.ranges,
                    "seconds": seconds,
                    "out": out.display().to_string(),
                }));
            } else {
                println!(
                    "{} Fisher over {} examples (P = {}) in {seconds:.3} s -> {}",
                    art.meta.kind,
                    art.meta.num_examples,
                    params.num_params(),
                    out.display()
                );
            }
            Ok(())
        }
        Command::Merge { inputs, out, json } => {
            let parts = inputs
                .iter()
                .map(FisherArtifact::load)
                .collect::<Result<Vec<_>>>()?;
            let merged = FisherArtifact::merge(&parts)?;
            merged.save(&out)?;
            if json {
                json_line(serde_json::json!({
                    "num_params": merged.diag.sums().len(),
                    "num_train": merged.meta.num_examples,
                    "complete": merged.is_complete(),
                    "out": out.display().to_string(),
                }));
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
        Command::Demo { out } => {
            let report = deltavar::demo::run_demo(Some(&out))?;
            print!("{}", deltavar::demo::demo_table(&report));
            if let Some(p) = &report.png {
                println!("plot: {}  ({:.1} s)", p.display(), report.seconds);
            }
            Ok(())
        }
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
