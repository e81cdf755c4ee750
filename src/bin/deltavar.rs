//! `deltavar`: the command line over the library (see the README's CLI section).

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use candle_core::Tensor;
use clap::{Parser, Subcommand};
use deltavar::data::NpyArray;
use deltavar::pipeline::{
    self, machine_memory_budget, parse_dtype, row_shape, FisherInput, ModelSpec, Network,
    VarianceRequest,
};
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
    /// Prefix of the tensor names (for example "model."): the model inside a larger state dict;
    /// only the tensors under it are read.
    #[arg(long, default_value = "")]
    prefix: String,
    /// Names of the Linear layers, comma separated (default 0,2,4,...).
    #[arg(long)]
    layer_names: Option<String>,
    /// Precision of the forward and backward passes (sums and solves are always f64).
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Examples per batch (default 256 for mlp: and for a graph whose weights are each read once
    /// per example, such as an MLP written as seq: or exported to ONNX; 32 for the others).
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
    #[command(flatten)]
    run: RunArgs,
}

/// The flags every computing subcommand shares.
#[derive(clap::Args)]
struct RunArgs {
    /// Memory budget in bytes for dense work (default: 80% of the memory available, at least
    /// 4 GiB; 4 GiB where the available memory cannot be read).
    #[arg(long)]
    memory_budget: Option<u64>,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    /// No progress lines (a pass or an iterative solve reports on stderr: a bar on a
    /// terminal, a plain line otherwise).
    #[arg(long)]
    quiet: bool,
}

impl RunArgs {
    /// The memory budget: the flag, or 80% of the memory available (at least 4 GiB).
    fn budget(&self) -> u64 {
        self.memory_budget.unwrap_or_else(machine_memory_budget)
    }
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
    #[command(flatten)]
    run: RunArgs,
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

/// The held-out data of `evaluate` and `calibrate`.
#[derive(clap::Args)]
struct HeldOutArgs {
    /// Held-out inputs, .npy (shaped like --queries would be).
    #[arg(long)]
    val_x: PathBuf,
    /// Held-out targets, .npy: (M, OUT) floats for output:K and sum, (M,) int64 labels for prob:K.
    #[arg(long)]
    val_y: PathBuf,
}

#[derive(clap::Args)]
struct EvaluateArgs {
    #[command(flatten)]
    v: VarianceArgs,
    #[command(flatten)]
    held: HeldOutArgs,
    /// The PNG to draw: |error| against sqrt(ΔVar) and the removal curves.
    #[arg(long, default_value = "evaluation.png")]
    plot: PathBuf,
}

#[derive(clap::Args)]
struct CalibrateArgs {
    #[command(flatten)]
    v: VarianceArgs,
    #[command(flatten)]
    held: HeldOutArgs,
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

impl ModelArgs {
    fn spec(&self) -> Result<ModelSpec> {
        Ok(ModelSpec {
            arch: self.arch.clone(),
            weights: self.weights.clone(),
            prefix: self.prefix.clone(),
            layer_names: self
                .layer_names
                .as_ref()
                .map(|s| s.split(',').map(|x| x.trim().to_string()).collect()),
            dtype: parse_dtype(&self.dtype)?,
        })
    }
}

/// The per-example shape of an .npy file's rows.
fn file_row_shape(path: &Path) -> Result<Vec<usize>> {
    Ok(row_shape(&NpyArray::open(path)?))
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

/// The library's request for the `variance` options, with the model and the queries; `split`
/// asks for the per-layer split (`calibrate`).
fn request<'a>(
    a: VarianceArgs,
    split: bool,
    data: &'a mut Option<MmapNpyDataset>,
    saved: &'a mut Option<FisherArtifact>,
) -> Result<(Network, Tensor, VarianceRequest<'a>, bool)> {
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
        run,
        rollout,
    } = a;
    let RunArgs { json, quiet, .. } = run;
    let queries = queries
        .ok_or_else(|| Error::invalid("--queries", "missing", "give the query inputs (.npy)"))?;
    let queries = NpyArray::open(&queries)?;
    let net = Network::load(&model.spec()?, Some(&row_shape(&queries)))?;
    let q = net.queries(&queries)?;
    let sigma_choice: SigmaStrategy = sigma.parse()?;
    let missing = |what: &str| Error::MissingInput {
        strategy: sigma.clone(),
        missing: what.into(),
    };
    let mut options = SigmaOptions {
        damping,
        posterior_scale,
        full_method: method.parse()?,
        kernel_precision: kernel_precision.parse()?,
        memory_budget: run.budget(),
        ..Default::default()
    };
    options.cg.progress = solve_progress(quiet);
    options.cg.tol = cg_tol;
    options.cg.max_iter = cg_max_iter;
    options.cg.preconditioner = cg_preconditioner.parse()?;
    let data = match (train_x, train_y) {
        (Some(x), Some(y)) => Some(&*data.insert(MmapNpyDataset::open(x, y)?)),
        (None, None) => None,
        _ => return Err(missing("both --train-x and --train-y")),
    };
    let saved = match fisher {
        Some(f) => {
            Some(&*saved.insert(FisherArtifact::load(f)?.with_partial_allowed(allow_partial)))
        }
        None => None,
    };
    let fisher = FisherInput::choose(saved, data, likelihood.as_deref(), &sigma)?;
    let calibration = match calibration {
        Some(f) => Some((
            deltavar::calibration::Calibration::load(&f)?,
            f.display().to_string(),
        )),
        None => None,
    };
    let req = VarianceRequest {
        qoi: qoi.parse()?,
        sigma: sigma_choice,
        options,
        fisher,
        rollout,
        batch_size: model.batch_size,
        split,
        calibration,
    };
    Ok((net, q, req, json))
}

fn variance(a: VarianceArgs) -> Result<()> {
    let t0 = Instant::now();
    let (mut data, mut saved) = (None, None);
    let (net, q, req, json) = request(a, false, &mut data, &mut saved)?;
    let r = pipeline::variances(&net, &q, req)?;
    for w in &r.warnings {
        eprintln!("{w}");
    }
    let seconds = t0.elapsed().as_secs_f64();
    if json {
        println!("{}", r.to_json(seconds));
        return Ok(());
    }
    let out = &r.result;
    println!(
        "sigma {}{}  P = {}  N = {}  ({seconds:.3} s)",
        r.sigma,
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
        run,
    } = a;
    let json = run.json;
    let t0 = Instant::now();
    let net = Network::load(&model.spec()?, Some(&file_row_shape(&train_x)?))?;
    let data = MmapNpyDataset::open(&train_x, &train_y)?;
    let opts = PassOptions {
        kind: kind.parse()?,
        shard: shard
            .as_deref()
            .map(deltavar::fisher::parse_shard)
            .transpose()?,
        engine: FactoredOptions {
            batch_size: model.batch_size.unwrap_or(net.default_batch_size()),
            threads: 0,
        },
        memory_budget: run.budget(),
        ..Default::default()
    };
    let pb = progress_bar(data.len(), run.quiet || json);
    let mut progress = |done: usize, total: usize| {
        pb.set_length(total as u64);
        pb.set_position(done as u64);
    };
    let art = net.fisher_pass(&likelihood, &data, &opts, &mut progress)?;
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
        v,
        held: HeldOutArgs { val_x, val_y },
        plot,
    } = a;
    let t0 = Instant::now();
    let (mut data, mut saved) = (None, None);
    let (net, q, req, json) = held_out(v, val_x, "evaluate", &mut data, &mut saved)?;
    let (m, e, r) = pipeline::evaluate(&net, &q, &NpyArray::open(&val_y)?, req)?;
    deltavar::demo::evaluation_plot(&plot, &e, &r.result.delta_variance, &m)?;
    let seconds = t0.elapsed().as_secs_f64();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "metrics": m,
                "sigma": r.sigma,
                "damping": r.damping,
                "posterior_scale": r.posterior_scale,
                "plot": plot.display().to_string(),
                "seconds": seconds,
            })
        );
        return Ok(());
    }
    println!(
        "sigma {}, held out {m}  ({seconds:.3} s) -> {}",
        r.sigma,
        plot.display()
    );
    Ok(())
}

/// For the held-out subcommands: [`request`] with --val-x as the queries (--queries refused);
/// `calibrate` asks for the per-layer split.
fn held_out<'a>(
    mut v: VarianceArgs,
    val_x: PathBuf,
    cmd: &str,
    data: &'a mut Option<MmapNpyDataset>,
    saved: &'a mut Option<FisherArtifact>,
) -> Result<(Network, Tensor, VarianceRequest<'a>, bool)> {
    if v.queries.is_some() {
        return Err(Error::invalid(
            "--queries",
            "given",
            format!("{cmd} reads its queries from --val-x"),
        ));
    }
    v.queries = Some(val_x);
    request(v, cmd == "calibrate", data, saved)
}

/// `calibrate`: per-layer Σ scales fitted on held-out data, written as JSON.
fn calibrate(a: CalibrateArgs) -> Result<()> {
    let CalibrateArgs {
        v,
        held: HeldOutArgs { val_x, val_y },
        out,
    } = a;
    let t0 = Instant::now();
    let (mut data, mut saved) = (None, None);
    let (net, q, req, json) = held_out(v, val_x, "calibrate", &mut data, &mut saved)?;
    let c = pipeline::calibrate(
        &net,
        &q,
        &NpyArray::open(&val_y)?,
        req,
        &deltavar::calibration::CalibrationOptions::default(),
    )?;
    let (fit, one) = (&c.calibration, &c.one_scale);
    fit.save(&out)?;
    let seconds = t0.elapsed().as_secs_f64();
    if json {
        println!("{}", c.to_json(Some(&out), seconds));
        return Ok(());
    }
    println!(
        "{} held-out points, sigma {}: mean NLL {:.6} with one scale per layer, {:.6} with one scale (alpha {:.4e}){}  ({seconds:.3} s) -> {}",
        fit.num_points,
        c.variances.sigma,
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
    println!("{m}");
    println!("(removal AUC: 1 = uninformative, lower is better; alpha, beta: the Gaussian fit alpha*v + beta)");
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
