//! `deltavar`: the command line over the library (see the README's CLI section).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use clap::{Parser, Subcommand};
use deltavar::data::{NpyArray, RowsRef};
use deltavar::model::{MlpSpec, SeqSpec};
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
    /// The model's state dict as safetensors (required for mlp: and seq:; for onnx: the source of
    /// truth of the parameters, checked against the graph; without it the file's own initializers).
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Architecture: onnx:PATH (any model exported from PyTorch, see scripts/export_torch.py --onnx),
    /// seq:LAYER,LAYER,... (one entry per nn.Sequential module: linear(in,out[,bias=false]),
    /// conv1d/conv2d(in,out,k[,stride=s][,padding=p][,dilation=d][,bias=false]), maxpool2d(k[,stride=s]),
    /// avgpool2d(k[,stride=s]), flatten, layernorm(d), batchnorm2d(c), dropout, relu, tanh, ...;
    /// the input shape comes from the .npy), or mlp:IN,H1,...,OUT:ACT with ACT one of identity,
    /// relu, tanh, sigmoid, gelu, gelu-tanh, silu, softplus.
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
    /// Examples per batch (default 256 for mlp:, 64 for seq:, 32 for onnx:).
    #[arg(long)]
    batch_size: Option<usize>,
}

#[derive(Subcommand)]
enum Command {
    /// Delta variances of a QoI at query points.
    Variance(VarianceArgs),
    /// An offline Fisher pass over training data, saved for later.
    Fim(FimArgs),
    /// Merges the shards of a Fisher pass.
    Merge(MergeArgs),
    /// How well variances rank and size errors: correlations, removal curve, fitted Gaussian NLL.
    Metrics(MetricsArgs),
    /// ΔVar on held-out data (the `variance` options, --val-x as the queries) against the errors
    /// of the QoI: the metrics and a PNG.
    Evaluate(EvaluateArgs),
    /// Fits one Σ scale per layer on held-out data (the `variance` options, --val-x as the
    /// queries) by the Gaussian likelihood of the errors, and writes them for
    /// `variance --calibration`.
    Calibrate(CalibrateArgs),
    /// Trains a small MLP on built-in data with a gap and shows its delta variance.
    Demo(DemoArgs),
}

#[derive(clap::Args)]
struct VarianceArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Query inputs, .npy: (M, IN) for an MLP, (M, C, H, W) or any (M, ...) the seq: model takes
    /// (required by `variance`; `evaluate` uses --val-x).
    #[arg(long)]
    queries: Option<PathBuf>,
    /// sum | output:K | prob:K | outputs (every output: adds the K×K covariance per query)
    #[arg(long, default_value = "sum")]
    qoi: String,
    /// identity | diag-fim | full-fim | kfac | lowrank:K (top-K eigenpairs of F plus its
    /// diagonal) | lowrank:K:nodiag
    #[arg(long, default_value = "full-fim")]
    sigma: String,
    /// auto | dense | kernel | kernel-cg | cg (full-fim only)
    #[arg(long, default_value = "auto")]
    method: String,
    /// The kernel method's factorization: auto (f64) | f64 | mixed (an f32 factor refined in f64).
    #[arg(long, default_value = "auto")]
    kernel_precision: String,
    /// The iterative methods' (cg, kernel-cg) relative residual per query.
    #[arg(long, default_value_t = 1e-10)]
    cg_tol: f64,
    /// The iterative methods' iteration cap; past it the solve is an error naming its residual.
    #[arg(long, default_value_t = 2000)]
    cg_max_iter: usize,
    /// none | jacobi | nystrom | nystrom:RANK (cg); for kernel-cg the rank of its pivoted
    /// Cholesky (nystrom: 1024 or N), none for none.
    #[arg(long, default_value = "nystrom")]
    cg_preconditioner: String,
    /// Training inputs, .npy: (N, IN), or (N, C, H, W) etc. for a seq: model.
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
    /// Read the QoI after K applications of the network (a step function whose input and
    /// output shapes agree); the Fisher stays one-step (pairs in --train-x/--train-y).
    #[arg(long, default_value_t = 1)]
    rollout: usize,
    /// Damping λ.
    #[arg(long, default_value_t = 1e-5)]
    damping: f64,
    /// Divide Σ by N (the paper's F⁻¹/N).
    #[arg(long)]
    posterior_scale: bool,
    /// Learned per-layer Σ scales from `deltavar calibrate`: ΔVar = Σ_l s_l·ΔVar_l.
    #[arg(long)]
    calibration: Option<PathBuf>,
    /// Memory budget in bytes for dense work (default: 80% of the memory available, at least
    /// 4 GiB; 4 GiB where the available memory cannot be read).
    #[arg(long)]
    memory_budget: Option<u64>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// No progress lines (an iterative solve reports each stage and iteration on stderr: a
    /// bar on a terminal, a plain line otherwise).
    #[arg(long)]
    quiet: bool,
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
struct EvaluateArgs {
    #[command(flatten)]
    v: VarianceArgs,
    /// Held-out inputs, .npy (shaped like --queries would be).
    #[arg(long)]
    val_x: PathBuf,
    /// Held-out targets, .npy: (M, OUT) floats for output:K and sum, (M,) int64 labels for prob:K.
    #[arg(long)]
    val_y: PathBuf,
    /// The PNG to draw: |error| against sqrt(ΔVar) and the removal curves.
    #[arg(long, default_value = "evaluation.png")]
    plot: PathBuf,
}

#[derive(clap::Args)]
struct CalibrateArgs {
    #[command(flatten)]
    v: VarianceArgs,
    /// Held-out inputs, .npy (shaped like --queries would be).
    #[arg(long)]
    val_x: PathBuf,
    /// Held-out targets, .npy: (M, OUT) floats for output:K and sum, (M,) int64 labels for prob:K.
    #[arg(long)]
    val_y: PathBuf,
    /// Where to write the scales (JSON).
    #[arg(long, default_value = "calibration.json")]
    out: PathBuf,
}

#[derive(clap::Args)]
struct MetricsArgs {
    /// Errors e = y − f(x) of M held-out points, .npy (M,) or (M, 1), float.
    #[arg(long)]
    errors: PathBuf,
    /// Their variances (ΔVar), .npy (M,) or (M, 1), float, >= 0.
    #[arg(long)]
    variances: PathBuf,
    /// Print one JSON object.
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

/// The model the CLI runs: an MLP (`mlp:`), any `nn.Sequential` (`seq:`) or a graph (`onnx:`).
enum Model {
    Mlp(Mlp),
    Graph(GraphEngine),
}

impl Model {
    fn num_params(&self) -> usize {
        match self {
            Model::Mlp(m) => m.num_params(),
            Model::Graph(g) => g.num_params(),
        }
    }
    fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        Ok(match self {
            Model::Mlp(m) => m.named_tensors(),
            Model::Graph(g) => g.named_tensors()?,
        })
    }
    fn input_shape(&self) -> Vec<usize> {
        match self {
            Model::Mlp(m) => vec![m.sizes()[0]],
            Model::Graph(g) => g.input_shape().to_vec(),
        }
    }
    /// Whether the inputs are integers (token ids).
    fn int_input(&self) -> bool {
        matches!(self, Model::Graph(g) if g.graph().input_type != deltavar::graph::ElemType::Float)
    }
}

fn check_exists(p: &Path) -> Result<()> {
    if !p.exists() {
        return Err(Error::Io {
            path: p.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
        });
    }
    Ok(())
}

/// The per-example shape of an .npy file's rows.
fn row_shape(path: &Path) -> Result<Vec<usize>> {
    let a = NpyArray::open(path)?;
    Ok(match a.shape() {
        [] | [_] => vec![1],
        s => s[1..].to_vec(),
    })
}

/// The batch size: as given, else 256 for an MLP and 32 for a graph (`seq:` and `onnx:`; their
/// fastest on the peers' workloads: a convolution's patches of 256 examples fall out of cache).
fn batch_size(m: &ModelArgs, net: &Model) -> usize {
    m.batch_size.unwrap_or(match net {
        Model::Mlp(_) => 256,
        Model::Graph(_) => 32,
    })
}

/// Loads the model; a `seq:` model takes its per-example input shape from `input_shape` (the
/// rows of the data it will see). With `rollout` > 1 an `mlp:` architecture is run as the
/// equivalent `seq:` model (its default nn.Sequential names).
fn load_model(m: &ModelArgs, input_shape: Option<&[usize]>, rollout: usize) -> Result<Model> {
    let dt = dtype(&m.dtype)?;
    if let Some(path) = m.arch.trim_start().strip_prefix("onnx:") {
        let path = Path::new(path.trim());
        check_exists(path)?;
        if let Some(w) = &m.weights {
            check_exists(w)?;
        }
        let shape = input_shape.ok_or_else(|| {
            Error::invalid(
                "--arch",
                &m.arch,
                "an onnx: model needs data to take its input shape from",
            )
        })?;
        let g = deltavar::graph::Graph::from_onnx(path, m.weights.as_deref())?;
        return Ok(Model::Graph(GraphEngine::new(g, shape, dt)?));
    }
    let weights = m.weights.as_ref().ok_or_else(|| {
        Error::invalid(
            "--weights",
            "missing",
            "mlp: and seq: architectures read their weights from a safetensors state dict",
        )
    })?;
    check_exists(weights)?;
    let spec: SeqSpec = if m.arch.trim_start().starts_with("seq:") {
        m.arch.parse()?
    } else {
        let arch: MlpSpec = m.arch.parse()?;
        if rollout <= 1 {
            return load_mlp(m, &arch, dt).map(Model::Mlp);
        }
        if m.layer_names.is_some() {
            return Err(Error::invalid(
                "--layer-names",
                m.layer_names.as_deref().unwrap_or_default(),
                "a rollout of an mlp: architecture uses the default nn.Sequential names; write it as seq:linear(..),ACT,... instead",
            ));
        }
        arch.to_seq()
    };
    let shape = input_shape.ok_or_else(|| {
        Error::invalid(
            "--arch",
            &m.arch,
            "a seq: model needs data to take its input shape from",
        )
    })?;
    let seq = Sequential::load_safetensors(weights, spec, shape, dt, &m.prefix)?;
    Ok(Model::Graph(GraphEngine::from_sequential(&seq)?))
}

fn load_mlp(m: &ModelArgs, arch: &MlpSpec, dt: DType) -> Result<Mlp> {
    let names: Option<Vec<String>> = m
        .layer_names
        .as_ref()
        .map(|s| s.split(',').map(|x| x.trim().to_string()).collect());
    let weights = m.weights.as_ref().ok_or_else(|| {
        Error::invalid(
            "--weights",
            "missing",
            "an mlp: architecture reads its weights from a safetensors state dict",
        )
    })?;
    let (mlp, _varmap) = Mlp::load_safetensors(
        weights,
        arch.activation,
        dt,
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
                weights.display(),
                mlp.sizes()
            ),
        ));
    }
    Ok(mlp)
}

/// The queries as a tensor of shape (M, *shape) in `dt` (int64 for a model with integer inputs),
/// checked finite.
fn read_queries(path: &Path, shape: &[usize], dt: DType, int_input: bool) -> Result<Tensor> {
    let a = NpyArray::open(path)?;
    let width: usize = shape.iter().product();
    if a.shape().len() < 2 || a.shape()[1..] != *shape {
        return Err(Error::BadFile {
            path: path.display().to_string(),
            detail: format!(
                "queries must have shape (M, {}) for this model, got {:?}",
                shape
                    .iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                a.shape()
            ),
        });
    }
    let rows = a.rows();
    let mut full = vec![rows];
    full.extend_from_slice(shape);
    let t = match a.rows_ref(0, rows)? {
        RowsRef::I64(v) if int_input => {
            return Ok(Tensor::from_slice(v, full.as_slice(), &Device::Cpu)?)
        }
        RowsRef::F32(v) => Tensor::from_slice(v, full.as_slice(), &Device::Cpu)?,
        RowsRef::F64(v) => Tensor::from_slice(v, full.as_slice(), &Device::Cpu)?,
        RowsRef::I64(_) => {
            return Err(Error::BadFile {
                path: path.display().to_string(),
                detail: "queries must be float32 or float64".into(),
            })
        }
    };
    if int_input {
        return Ok(t.to_dtype(DType::I64)?);
    }
    let vals = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    if let Some(k) = vals.iter().position(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            what: format!("queries {}", path.display()),
            detail: format!("row {}, element {} is {}", k / width, k % width, vals[k]),
        });
    }
    Ok(t.to_dtype(dt)?)
}

/// The default memory budget: 80% of the memory available now (Linux `MemAvailable`), at least
/// the library's 4 GiB; the library's default where it cannot be read.
fn machine_memory_budget() -> u64 {
    let available = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find(|l| l.starts_with("MemAvailable:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
    });
    match available {
        Some(kb) => (kb.saturating_mul(1024) / 10 * 8).max(DEFAULT_MEMORY_BUDGET),
        None => DEFAULT_MEMORY_BUDGET,
    }
}

/// Where an iterative solve's progress lines go: a spinner line on a terminal, plain
/// `deltavar: ...` lines on stderr otherwise (a batch job's log), nowhere with `--quiet`.
fn solve_progress(quiet: bool) -> Progress {
    if quiet {
        return Progress::none();
    }
    if std::io::stderr().is_terminal() {
        let pb = indicatif::ProgressBar::new_spinner();
        pb.enable_steady_tick(std::time::Duration::from_millis(200));
        return Progress::new(move |line| pb.set_message(line.to_string()));
    }
    Progress::new(|line| eprintln!("deltavar: {line}"))
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
/// What `variance` computed, with the options its output reports.
struct Computed {
    out: MlpDeltaVariances,
    /// The delta variances by layer (for `calibrate` and `--calibration`), and the calibration
    /// applied to `out.delta_variance`.
    groups: Option<Groups>,
    /// `--qoi outputs`: the per-query output covariances.
    cov: Option<DeltaCovariances>,
    sigma_name: &'static str,
    damping: f64,
    posterior_scale: bool,
    rollout: usize,
    json: bool,
    t0: Instant,
}

/// The per-layer split of a `variance` run.
struct Groups {
    groups: Vec<deltavar::calibration::ParamGroup>,
    blocks: Vec<Vec<f64>>,
    calibration: Option<deltavar::calibration::Calibration>,
}

/// Applies `--calibration` (when given) to a per-layer split: the delta variances become
/// Σ_l s_l·ΔVar_l.
fn finish_groups(
    out: &mut MlpDeltaVariances,
    groups: Vec<deltavar::calibration::ParamGroup>,
    blocks: Vec<Vec<f64>>,
    file: Option<&Path>,
) -> Result<Groups> {
    let calibration = match file {
        None => None,
        Some(f) => {
            let c = deltavar::calibration::Calibration::load(f)?;
            c.check_groups(&groups)?;
            if c.sigma != out.sigma {
                return Err(Error::invalid(
                    "--calibration",
                    f.display(),
                    format!(
                        "its scales were fitted for Sigma '{}', this run uses '{}'; calibrate again with this Sigma",
                        c.sigma, out.sigma
                    ),
                ));
            }
            out.delta_variance = c.apply(&blocks)?;
            Some(c)
        }
    };
    Ok(Groups {
        groups,
        blocks,
        calibration,
    })
}

/// The `variance` pipeline: Σ from the training data or a saved Fisher, query gradients, ΔVar;
/// split by layer when `want_groups` or `--calibration`.
fn compute_variances(a: VarianceArgs, want_groups: bool) -> Result<Computed> {
    let VarianceArgs {
        model,
        queries,
        qoi,
        sigma,
        method,
        kernel_precision,
        cg_tol,
        cg_max_iter,
        cg_preconditioner,
        train_x,
        train_y,
        likelihood,
        fisher,
        allow_partial,
        damping,
        posterior_scale,
        calibration,
        memory_budget,
        json,
        rollout,
        quiet,
    } = a;
    let t0 = Instant::now();
    let split = want_groups || calibration.is_some();
    let queries = queries
        .ok_or_else(|| Error::invalid("--queries", "missing", "give the query inputs (.npy)"))?;
    let qshape = row_shape(&queries)?;
    let net = load_model(&model, Some(&qshape), rollout)?;
    // `outputs`: the covariance of every output (a vector QoI)
    let outputs = qoi.trim() == "outputs";
    let qoi: Qoi = if outputs { Qoi::Sum } else { qoi.parse()? };
    // `kfac`: the Kronecker-factored Σ on the graph engine (an MLP runs as its graph)
    let kfac = sigma.trim() == "kfac";
    let strategy: SigmaStrategy = if kfac {
        SigmaStrategy::Identity
    } else {
        sigma.parse()?
    };
    let sigma_name = if kfac { "kfac" } else { strategy.name() };
    let in_shape = net.input_shape();
    let q = read_queries(&queries, &in_shape, dtype(&model.dtype)?, net.int_input())?;
    let mut opts = SigmaOptions {
        damping,
        posterior_scale,
        full_method: method.parse()?,
        kernel_precision: kernel_precision.parse()?,
        memory_budget: memory_budget.unwrap_or_else(machine_memory_budget),
        ..Default::default()
    };
    opts.cg.progress = solve_progress(quiet);
    opts.cg.tol = cg_tol;
    opts.cg.max_iter = cg_max_iter;
    opts.cg.preconditioner = cg_preconditioner.parse()?;
    // the automatic method choice plans for the queries at hand
    opts.expected_queries = q.dim(0)?.max(1);
    let eo = FactoredOptions {
        batch_size: batch_size(&model, &net),
        threads: 0,
    };
    let missing = |what: &str| Error::MissingInput {
        strategy: sigma.clone(),
        missing: what.into(),
    };
    if kfac {
        if outputs {
            return Err(Error::invalid(
                "--qoi",
                "outputs",
                "--sigma kfac takes a scalar QoI (sum, output:K, prob:K)",
            ));
        }
        let (Some(x), Some(y), None) = (train_x, train_y, fisher.as_ref()) else {
            return Err(missing(
                "training data (--train-x, --train-y, --likelihood); a saved Fisher has no K-FAC factors",
            ));
        };
        let lik: Likelihood = likelihood
            .as_deref()
            .ok_or_else(|| missing("--likelihood gaussian[:SIGMA]|categorical"))?
            .parse()?;
        let data = MmapNpyDataset::open(x, y)?;
        // an MLP runs as its graph here (K-FAC factors come from the graph engine)
        let as_graph;
        let engine = match &net {
            Model::Graph(g) => g,
            Model::Mlp(m) => {
                as_graph = GraphEngine::from_mlp(m)?;
                &as_graph
            }
        };
        let groups = if split {
            Some(deltavar::delta::named_groups(&engine.named_tensors()?))
        } else {
            None
        };
        let g = kfac_delta_variances_with(
            engine,
            &lik,
            &data,
            qoi,
            &q,
            rollout,
            damping,
            posterior_scale,
            groups,
            &eo,
        )?;
        let mut out = g.result;
        let groups = if split {
            Some(finish_groups(
                &mut out,
                g.groups,
                g.blocks,
                calibration.as_deref(),
            )?)
        } else {
            None
        };
        return Ok(Computed {
            out,
            groups,
            cov: None,
            sigma_name,
            damping,
            posterior_scale,
            rollout,
            json,
            t0,
        });
    }
    let needs_fisher = !matches!(strategy, SigmaStrategy::Identity);
    // the Fisher source: a saved pass, or the training data on the model's engine; both then
    // run the same pipeline
    let data;
    let source: Option<Box<dyn FisherSource + '_>> = match (fisher, train_x, train_y) {
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
            art.check_tensors(&net.named_tensors()?)?;
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
            let xs = row_shape(&x)?;
            if xs != in_shape {
                return Err(Error::BadFile {
                        path: x.display().to_string(),
                        detail: format!(
                            "training inputs have rows of shape {xs:?}, the model (and the queries) take {in_shape:?}"
                        ),
                    });
            }
            data = MmapNpyDataset::open(x, y)?;
            match &net {
                Model::Mlp(m) => Some(Box::new(
                    FactoredFisher::new(m, lik, &data, eo.clone())?
                        .with_progress(opts.cg.progress.clone()),
                )),
                Model::Graph(g) => Some(Box::new(
                    GraphFisher::with_engine(g.clone(), lik, &data, eo.clone())
                        .with_progress(opts.cg.progress.clone()),
                )),
            }
        }
        (None, Some(_), None) | (None, None, Some(_)) => {
            return Err(missing("both --train-x and --train-y"))
        }
        (None, None, None) => {
            return Err(missing(
                "training data (--train-x, --train-y, --likelihood) or a saved Fisher (--fisher)",
            ))
        }
    };
    if outputs && split {
        return Err(Error::invalid(
            "--qoi",
            "outputs",
            "per-layer scales (calibrate, --calibration) take a scalar QoI (sum, output:K, prob:K)",
        ));
    }
    if outputs {
        let c = match &net {
            Model::Mlp(m) => {
                mlp_delta_covariances_with(m, &q, strategy, &opts, source.as_deref(), &eo)?
            }
            Model::Graph(g) => engine_delta_covariances_with(
                g,
                &q,
                rollout,
                strategy,
                &opts,
                source.as_deref(),
                &eo,
            )?,
        };
        let out = c.diagonal(source.as_ref().map(|f| f.num_examples()).unwrap_or(0))?;
        return Ok(Computed {
            out,
            groups: None,
            cov: Some(c),
            sigma_name,
            damping,
            posterior_scale,
            rollout,
            json,
            t0,
        });
    }
    if split {
        let g = match &net {
            Model::Mlp(m) => {
                mlp_group_delta_variances_with(m, qoi, &q, strategy, &opts, source.as_deref(), &eo)?
            }
            Model::Graph(g) => engine_group_delta_variances_with(
                g,
                deltavar::delta::named_groups(&g.named_tensors()?),
                qoi,
                &q,
                rollout,
                strategy,
                &opts,
                source.as_deref(),
                &eo,
            )?,
        };
        let mut out = g.result;
        let groups = finish_groups(&mut out, g.groups, g.blocks, calibration.as_deref())?;
        return Ok(Computed {
            out,
            groups: Some(groups),
            cov: None,
            sigma_name,
            damping,
            posterior_scale,
            rollout,
            json,
            t0,
        });
    }
    let out = match &net {
        Model::Mlp(m) => {
            mlp_delta_variances_with(m, qoi, &q, strategy, &opts, source.as_deref(), &eo)?
        }
        Model::Graph(g) => engine_delta_variances_with(
            g,
            qoi,
            &q,
            rollout,
            strategy,
            &opts,
            source.as_deref(),
            &eo,
        )?,
    };
    Ok(Computed {
        out,
        groups: None,
        cov: None,
        sigma_name,
        damping,
        posterior_scale,
        rollout,
        json,
        t0,
    })
}

fn variance(a: VarianceArgs) -> Result<()> {
    let Computed {
        out,
        groups,
        cov,
        sigma_name,
        damping,
        posterior_scale,
        rollout,
        json,
        t0,
    } = compute_variances(a, false)?;
    let seconds = t0.elapsed().as_secs_f64();
    if let (true, Some(c)) = (json, &cov) {
        let k = c.outputs.first().map(|o| o.len()).unwrap_or(0);
        let nested: Vec<Vec<Vec<f64>>> = c
            .covariance
            .iter()
            .map(|m| m.chunks(k.max(1)).map(|r| r.to_vec()).collect())
            .collect();
        let diag: Vec<Vec<f64>> = out
            .delta_variance
            .chunks(k.max(1))
            .map(|r| r.to_vec())
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "qoi": c.outputs,
                "delta_variance": diag,
                "covariance": nested,
                "sigma": sigma_name,
                "method": out.method.as_ref().map(|m| m.method.name()),
                "method_reason": out.method.as_ref().map(|m| m.reason.clone()),
                "num_params": out.num_params,
                "num_train": out.num_train,
                "damping": damping,
                "posterior_scale": posterior_scale,
                "rollout": rollout,
                "seconds": seconds,
            })
        );
        return Ok(());
    }
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
                "lowrank": out.lowrank,
                "calibration": groups.as_ref().and_then(|g| g.calibration.as_ref()).map(|c| serde_json::json!({
                    "scales": c.scales,
                    "groups": c.groups.iter().map(|g| g.name.clone()).collect::<Vec<_>>(),
                    "beta": c.beta,
                })),
                "predictive_variance": groups.as_ref().and_then(|g| g.calibration.as_ref()).map(|c| {
                    out.delta_variance.iter().map(|v| v + c.beta).collect::<Vec<_>>()
                }),
                "path": out.path,
                "num_params": out.num_params,
                "num_train": out.num_train,
                "damping": damping,
                "posterior_scale": posterior_scale,
                "rollout": rollout,
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
    let net = load_model(&model, Some(&row_shape(&train_x)?), 1)?;
    let lik: Likelihood = likelihood.parse()?;
    let data = MmapNpyDataset::open(&train_x, &train_y)?;
    let mut opts = PassOptions {
        kind: kind.parse()?,
        shard: shard
            .as_deref()
            .map(deltavar::fisher::parse_shard)
            .transpose()?,
        engine: FactoredOptions {
            batch_size: batch_size(&model, &net),
            threads: 0,
        },
        ..Default::default()
    };
    if let Some(b) = memory_budget {
        opts.memory_budget = b;
    }
    let pb = progress_bar(data.len(), quiet || json);
    let mut progress = |done: usize, total: usize| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    };
    let art = match &net {
        Model::Mlp(m) => fisher_pass(m, lik, &likelihood, &data, &opts, &mut progress)?,
        Model::Graph(g) => fisher_pass_graph(g, lik, &likelihood, &data, &opts, &mut progress)?,
    };
    pb.finish_and_clear();
    art.save(&out)?;
    let seconds = t0.elapsed().as_secs_f64();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "num_params": net.num_params(),
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
            net.num_params(),
            out.display()
        );
    }
    Ok(())
}

/// `evaluate`: ΔVar at held-out inputs, the errors of the QoI, the metrics and a PNG.
fn evaluate(a: EvaluateArgs) -> Result<()> {
    let EvaluateArgs {
        mut v,
        val_x,
        val_y,
        plot,
    } = a;
    let qoi = held_out_queries(&mut v, val_x, "evaluate")?;
    let c = compute_variances(v, false)?;
    let e = deltavar::metrics::held_out_errors(&qoi, &val_y, &c.out.qoi)?;
    let m = deltavar::metrics::uncertainty_metrics(&e, &c.out.delta_variance)?;
    deltavar::demo::evaluation_plot(&plot, &e, &c.out.delta_variance, &m)?;
    let seconds = c.t0.elapsed().as_secs_f64();
    if c.json {
        println!(
            "{}",
            serde_json::json!({
                "metrics": m,
                "sigma": c.sigma_name,
                "damping": c.damping,
                "posterior_scale": c.posterior_scale,
                "plot": plot.display().to_string(),
                "seconds": seconds,
            })
        );
        return Ok(());
    }
    let opt = |x: Option<f64>| {
        x.map(|v| format!("{v:.4}"))
            .unwrap_or_else(|| "undefined".into())
    };
    println!(
        "{} held-out points, sigma {}: spearman {}, pearson {}, removal AUC {:.4} (oracle {:.4}), \
         alpha {:.4e}, beta {:.4e}, NLL {:.4}  ({seconds:.3} s) -> {}",
        m.m,
        c.sigma_name,
        opt(m.spearman),
        opt(m.pearson),
        m.removal_auc,
        m.removal_auc_oracle,
        m.alpha,
        m.beta,
        m.nll,
        plot.display()
    );
    Ok(())
}

/// For the held-out subcommands: --val-x becomes the queries (--queries refused) and the QoI
/// must be scalar; returns it.
fn held_out_queries(v: &mut VarianceArgs, val_x: PathBuf, cmd: &str) -> Result<Qoi> {
    if v.queries.is_some() {
        return Err(Error::invalid(
            "--queries",
            "given",
            format!("{cmd} reads its queries from --val-x"),
        ));
    }
    if v.qoi.trim() == "outputs" {
        return Err(Error::invalid(
            "--qoi",
            "outputs",
            format!("{cmd} takes a scalar QoI (sum, output:K, prob:K)"),
        ));
    }
    v.queries = Some(val_x);
    v.qoi.parse()
}

/// `calibrate`: per-layer Σ scales fitted on held-out data, written as JSON.
fn calibrate(a: CalibrateArgs) -> Result<()> {
    let CalibrateArgs {
        mut v,
        val_x,
        val_y,
        out,
    } = a;
    if v.calibration.is_some() {
        return Err(Error::invalid(
            "--calibration",
            "given",
            "calibrate fits the scales; give --calibration to variance or evaluate",
        ));
    }
    let qoi = held_out_queries(&mut v, val_x, "calibrate")?;
    let c = compute_variances(v, true)?;
    let g = c
        .groups
        .ok_or_else(|| Error::Unsupported("no per-layer split was computed".into()))?;
    let e = deltavar::metrics::held_out_errors(&qoi, &val_y, &c.out.qoi)?;
    let fit = deltavar::calibration::fit_calibration(
        &e,
        &g.blocks,
        &g.groups,
        &c.out.sigma,
        &deltavar::calibration::CalibrationOptions::default(),
    )?;
    // the one-scale fit (α·ΔVar + β) on the same points, to compare
    let one = deltavar::metrics::uncertainty_metrics(&e, &c.out.delta_variance)?;
    fit.save(&out)?;
    let seconds = c.t0.elapsed().as_secs_f64();
    if c.json {
        println!(
            "{}",
            serde_json::json!({
                "calibration": fit,
                "nll_one_scale": one.nll,
                "alpha_one_scale": one.alpha,
                "beta_one_scale": one.beta,
                "out": out.display().to_string(),
                "seconds": seconds,
            })
        );
        return Ok(());
    }
    println!(
        "{} held-out points, sigma {}: mean NLL {:.6} with one scale per layer, {:.6} with one scale (alpha {:.4e}){}  ({seconds:.3} s) -> {}",
        fit.num_points,
        c.sigma_name,
        fit.nll,
        one.nll,
        one.alpha,
        if fit.converged { "" } else { "; NOT converged" },
        out.display()
    );
    println!("{:>16}  {:>12}  {:>14}", "layer", "parameters", "scale");
    for (gr, sc) in fit.groups.iter().zip(&fit.scales) {
        println!("{:>16}  {:>12}  {:>14.6e}", gr.name, gr.len, sc);
    }
    println!("{:>16}  {:>12}  {:>14.6e}", "beta", "", fit.beta);
    Ok(())
}

/// `metrics`: the uncertainty-quality metrics of errors and variances.
fn metrics(a: MetricsArgs) -> Result<()> {
    let e = deltavar::data::read_vector(&a.errors)?;
    let v = deltavar::data::read_vector(&a.variances)?;
    let m = deltavar::metrics::uncertainty_metrics(&e, &v)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string(&m).map_err(|e| Error::Unsupported(e.to_string()))?
        );
        return Ok(());
    }
    let opt = |x: Option<f64>| {
        x.map(|v| format!("{v:.6}"))
            .unwrap_or_else(|| "undefined".into())
    };
    println!("points              {}", m.m);
    println!("pearson |e|, sqrt v {}", opt(m.pearson));
    println!("spearman |e|, v     {}", opt(m.spearman));
    println!(
        "removal AUC         {:.6}  (oracle {:.6}; 1 = uninformative, lower is better)",
        m.removal_auc, m.removal_auc_oracle
    );
    println!(
        "Gaussian fit        alpha {:.6e}  beta {:.6e}  mean NLL {:.6}",
        m.alpha, m.beta, m.nll
    );
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
        Command::Metrics(a) => metrics(a),
        Command::Evaluate(a) => evaluate(a),
        Command::Calibrate(a) => calibrate(a),
        Command::Demo(a) => demo(a),
    }
}

/// glibc returns every freed block above its (dynamic) mmap threshold to the kernel, so each
/// pass's buffers come back as fresh zeroed pages: on W-queries (1024 queries) a quarter of the
/// run was page faults and munmap. Keeping freed memory in the heap (blocks up to 32 MiB, the
/// largest threshold glibc takes; a trim only above 512 MiB of free top) measured 0.054 → 0.045 s
/// (median of 25 runs). The worker threads' own arenas grow in 64 MiB heaps that glibc unmaps as
/// soon as they empty, so a graph pass (one batch's values and cotangents, freed per batch) paid
/// page faults and TLB shootdowns on every batch: one arena (M_ARENA_MAX = 1) measured W-gpt
/// 1.29 → 0.70 s and W-resnet 5.7 → 3.3 s (batch 64). Affects only this process's allocator.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // SAFETY: mallopt only changes glibc's allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(1)
        }
    }
}
