//! The whole pipeline behind one call, for front ends: a model from its files, a Fisher source
//! (training data or a saved pass), Σ, ΔVar, reported as one JSON object. The CLI's
//! subcommands and the Python package (`python/`) only parse their options and call this
//! module, so both give the same numbers and the same messages.
//!
//! * [`Network::load`] — an `mlp:`, `seq:` or `onnx:` architecture with its weights
//!   ([`ModelSpec`]);
//! * [`Network::queries`] — query inputs checked against the model (from an `.npy` file or an
//!   array in memory, [`NpyArray`]);
//! * [`Network::fisher_pass`] — an offline Fisher pass ([`FisherArtifact`]);
//! * [`variances`] — ΔVar (or the output covariances, or the per-layer split) for a
//!   [`VarianceRequest`], as a [`VarianceReport`] whose [`VarianceReport::to_json`] is the CLI's
//!   `--json` output;
//! * [`calibrate`] — per-layer Σ scales fitted on held-out data.
//!
//! ```
//! use deltavar::data::NpyArray;
//! use deltavar::pipeline::{self, FisherInput, ModelSpec, Network, VarianceRequest};
//! use deltavar::{Likelihood, MmapNpyDataset};
//! # fn main() -> deltavar::Result<()> {
//! let dir = "tests/data/deltavar-parity/tanh-4-16-16-3";
//! let queries = NpyArray::open(format!("{dir}/queries.npy"))?; // or NpyArray::from_rows
//! let spec = ModelSpec::new("mlp:4,16,16,3:tanh", Some(format!("{dir}/model.safetensors").into()));
//! let net = Network::load(&spec, Some(&pipeline::row_shape(&queries)))?;
//! let data = MmapNpyDataset::open(format!("{dir}/train_x.npy"), format!("{dir}/train_y.npy"))?;
//! let report = pipeline::variances(
//!     &net,
//!     &net.queries(&queries)?,
//!     VarianceRequest {
//!         qoi: "output:1".parse()?,
//!         sigma: "full-fim".parse()?,
//!         fisher: FisherInput::Data { data: &data, likelihood: Likelihood::gaussian(1.0) },
//!         ..Default::default()
//!     },
//! )?;
//! assert_eq!(report.result.delta_variance.len(), 8);
//! assert!(report.result.delta_variance.iter().all(|v| *v > 0.0));
//! assert_eq!(report.to_json(0.0)["method"], "kernel"); // the CLI's --json object
//! # Ok(())
//! # }
//! ```

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::calibration::{Calibration, CalibrationOptions, ParamGroup};
use crate::data::{MmapNpyDataset, NpyArray, RowsRef};
use crate::delta::{
    engine_delta_covariances_with, engine_delta_variances_with, engine_group_delta_variances_with,
    named_groups, DeltaCovariances, DeltaRequest, DeltaVariances, SigmaOptions, SigmaStrategy,
};
use crate::engine::{FactoredOptions, GraphEngine};
use crate::error::{Error, Result};
use crate::fisher::{fisher_pass, FisherArtifact, FisherSource, GraphFisher, PassOptions};
use crate::likelihood::Likelihood;
use crate::metrics::{held_out_errors, uncertainty_metrics, UncertaintyMetrics};
use crate::model::{MlpSpec, SeqSpec};
use crate::qoi::Qoi;

/// How to load a model: what the CLI's `--arch`, `--weights`, `--prefix`, `--layer-names` and
/// `--dtype` say.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// `onnx:PATH`, `seq:LAYER,...` or `mlp:IN,H,...,OUT:ACT`.
    pub arch: String,
    /// The state dict as safetensors: required for `mlp:` and `seq:`; for `onnx:` the source of
    /// truth of the parameters, checked against the graph (without it, the file's own
    /// initializers).
    pub weights: Option<PathBuf>,
    /// Prefix of the tensor names (for example `"model."`); for `mlp:` and `seq:` only the
    /// tensors under it are read.
    pub prefix: String,
    /// Names of an `mlp:`'s Linear layers (default `0, 2, 4, …`, nn.Sequential's).
    pub layer_names: Option<Vec<String>>,
    /// Precision of the forward and backward passes (sums and solves are always f64).
    pub dtype: DType,
}

impl ModelSpec {
    /// `arch` with `weights`, no prefix, default layer names, f32.
    pub fn new(arch: impl Into<String>, weights: Option<PathBuf>) -> Self {
        Self {
            arch: arch.into(),
            weights,
            prefix: String::new(),
            layer_names: None,
            dtype: DType::F32,
        }
    }
}

/// Parses a precision name: `f32` or `f64`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s.trim() {
        "f32" => Ok(DType::F32),
        "f64" => Ok(DType::F64),
        _ => Err(Error::invalid("--dtype", s, "expected f32 or f64")),
    }
}

/// A model loaded for the graph engine: `mlp:`, `seq:` and `onnx:` architectures all become
/// a [`GraphEngine`] (an MLP's Linear layers take its fast paths: one product per layer for diag F,
/// the diagonal-Σ forms inside the pass).
#[derive(Debug, Clone)]
pub struct Network {
    engine: GraphEngine,
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

/// The per-example shape of an array's rows: `[1]` for a vector.
pub fn row_shape(a: &NpyArray) -> Vec<usize> {
    match a.shape() {
        [] | [_] => vec![1],
        s => s[1..].to_vec(),
    }
}

impl Network {
    /// Loads the model `spec` names. A `seq:` or `onnx:` model takes its per-example input
    /// shape from `input_shape` (the rows of the data it will see); an `mlp:` model's is its
    /// input width. Rollouts need nothing at load time: every model is a graph.
    pub fn load(spec: &ModelSpec, input_shape: Option<&[usize]>) -> Result<Self> {
        let dt = spec.dtype;
        let arch = spec.arch.trim_start();
        if let Some(path) = arch.strip_prefix("onnx:") {
            let path = Path::new(path.trim());
            check_exists(path)?;
            if let Some(w) = &spec.weights {
                check_exists(w)?;
            }
            let shape = input_shape.ok_or_else(|| {
                Error::invalid(
                    "--arch",
                    &spec.arch,
                    "an onnx: model needs data to take its input shape from",
                )
            })?;
            let g = crate::graph::Graph::from_onnx(path, spec.weights.as_deref())?;
            return Ok(Self::from_engine(GraphEngine::new(g, shape, dt)?));
        }
        let weights = spec.weights.as_ref().ok_or_else(|| {
            Error::invalid(
                "--weights",
                "missing",
                "mlp: and seq: architectures read their weights from a safetensors state dict",
            )
        })?;
        check_exists(weights)?;
        // only the tensors under the prefix are converted (a model inside a larger checkpoint)
        let prefix = match spec.prefix.as_str() {
            "" => String::new(),
            p if p.ends_with('.') => p.to_string(),
            p => format!("{p}."),
        };
        let read = |path: &Path| -> Result<crate::graph::build::Weights> {
            let w = crate::graph::build::Weights::from_safetensors_where(path, |n| {
                n.starts_with(&prefix)
            })?;
            if w.names().is_empty() && !prefix.is_empty() {
                let all = std::cell::RefCell::new(vec![]);
                crate::graph::build::read_safetensors(
                    path,
                    |n| {
                        all.borrow_mut().push(n.to_string());
                        false
                    },
                    |_, _, _, _| Ok(()),
                )?;
                return Err(Error::BadFile {
                    path: path.display().to_string(),
                    detail: format!(
                        "no float tensor under the prefix '{prefix}' (tensors: {:?}); check --prefix",
                        all.into_inner()
                    ),
                });
            }
            Ok(w)
        };
        if !arch.starts_with("seq:") {
            let mlp: MlpSpec = spec.arch.parse()?;
            let g = crate::graph::models::mlp_state_dict(
                &mlp,
                read(weights)?,
                &spec.prefix,
                spec.layer_names.as_deref(),
            )?;
            let width = mlp.sizes.first().copied().unwrap_or(0);
            return Ok(Self::from_engine(GraphEngine::new(g, &[width], dt)?));
        }
        let seq: SeqSpec = spec.arch.parse()?;
        let shape = input_shape.ok_or_else(|| {
            Error::invalid(
                "--arch",
                &spec.arch,
                "a seq: model needs data to take its input shape from",
            )
        })?;
        let g = crate::graph::models::seq(&seq, read(weights)?.with_prefix(&spec.prefix), shape)?;
        Ok(Self::from_engine(GraphEngine::new(g, shape, dt)?))
    }

    /// A model already on the graph engine.
    pub fn from_engine(engine: GraphEngine) -> Self {
        Self { engine }
    }

    /// The engine.
    pub fn engine(&self) -> &GraphEngine {
        &self.engine
    }

    /// P, the number of parameters.
    pub fn num_params(&self) -> usize {
        self.engine.num_params()
    }

    /// The parameters by name, in flat order.
    pub fn named_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        self.engine.named_tensors()
    }

    /// The per-example input shape.
    pub fn input_shape(&self) -> Vec<usize> {
        self.engine.input_shape().to_vec()
    }

    /// The precision the model runs in.
    pub fn dtype(&self) -> DType {
        self.engine.dtype()
    }

    /// Whether the inputs are integers (token ids).
    pub fn int_input(&self) -> bool {
        self.engine.graph().input_type != crate::graph::ElemType::Float
    }

    /// The default examples per batch ([`GraphEngine::default_batch_size`]: 256 when every
    /// weight is read once per example, an MLP's Linear layers say, else 32).
    pub fn default_batch_size(&self) -> usize {
        self.engine.default_batch_size()
    }

    /// The queries in `a` as a tensor of shape (M, *input shape) in the model's precision
    /// (int64 for a model with integer inputs), checked: rows of the model's input shape,
    /// every value finite.
    pub fn queries(&self, a: &NpyArray) -> Result<Tensor> {
        let shape = self.input_shape();
        let path = a.path().display().to_string();
        let width: usize = shape.iter().product();
        if a.shape().len() < 2 || a.shape()[1..] != *shape {
            return Err(Error::BadFile {
                path,
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
        full.extend_from_slice(&shape);
        let int_input = self.int_input();
        let non_finite = |k: usize, v: f64| Error::NonFinite {
            what: format!("queries {path}"),
            detail: format!("row {}, element {} is {v}", k / width, k % width),
        };
        let t = match a.rows_ref(0, rows)? {
            RowsRef::I64(v) if int_input => {
                return Ok(Tensor::from_slice(v, full.as_slice(), &Device::Cpu)?)
            }
            RowsRef::F32(v) => {
                if let Some(k) = v.iter().position(|x| !x.is_finite()) {
                    return Err(non_finite(k, v[k] as f64));
                }
                Tensor::from_slice(v, full.as_slice(), &Device::Cpu)?
            }
            RowsRef::F64(v) => {
                if let Some(k) = v.iter().position(|x| !x.is_finite()) {
                    return Err(non_finite(k, v[k]));
                }
                Tensor::from_slice(v, full.as_slice(), &Device::Cpu)?
            }
            RowsRef::I64(_) => {
                return Err(Error::BadFile {
                    path,
                    detail: "queries must be float32 or float64".into(),
                })
            }
        };
        // token ids given as floats become int64 (finite, checked above)
        Ok(t.to_dtype(if int_input { DType::I64 } else { self.dtype() })?)
    }

    /// Checks that the training inputs' rows have the model's input shape.
    pub fn check_data(&self, data: &MmapNpyDataset) -> Result<()> {
        let xs = row_shape(data.x());
        let want = self.input_shape();
        if xs != want {
            return Err(Error::BadFile {
                path: data.x().path().display().to_string(),
                detail: format!(
                    "training inputs have rows of shape {xs:?}, the model (and the queries) take {want:?}"
                ),
            });
        }
        Ok(())
    }

    /// An offline Fisher pass (whole or one shard, [`PassOptions`]) of `likelihood` (its name
    /// as `gaussian[:SIGMA]` or `categorical`, recorded in the artifact) over `data`, calling
    /// `progress(done, total)` as examples are processed.
    pub fn fisher_pass(
        &self,
        likelihood: &str,
        data: &MmapNpyDataset,
        opts: &PassOptions,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<FisherArtifact> {
        self.check_data(data)?;
        let lik: Likelihood = likelihood.parse()?;
        fisher_pass(&self.engine, lik, likelihood, data, opts, progress)
    }

    /// The Fisher of `lik` over `data` on this model's engine, computed as Σ needs it.
    fn fisher_source<'a>(
        &'a self,
        lik: Likelihood,
        data: &'a MmapNpyDataset,
        engine: &FactoredOptions,
        progress: &crate::progress::Progress,
    ) -> Result<Box<dyn FisherSource + 'a>> {
        self.check_data(data)?;
        Ok(Box::new(
            GraphFisher::with_engine(self.engine.clone(), lik, data, engine.clone())
                .with_progress(progress.clone()),
        ))
    }
}

/// The quantity of interest of a [`VarianceRequest`]: a scalar (`sum`, `output:K`, `prob:K`) or
/// every output (`outputs`: the K×K covariance per query).
#[derive(Debug, Clone)]
pub enum QoiRequest {
    /// One scalar per query.
    Scalar(Qoi),
    /// Every output: the covariances Jₘ Σ Jₘᵀ.
    Outputs,
}

impl std::str::FromStr for QoiRequest {
    type Err = Error;
    /// `outputs`, or a [`Qoi`].
    fn from_str(s: &str) -> Result<Self> {
        if s.trim() == "outputs" {
            return Ok(QoiRequest::Outputs);
        }
        Ok(QoiRequest::Scalar(s.parse()?))
    }
}

/// Where the Fisher comes from.
#[derive(Debug, Default)]
pub enum FisherInput<'a> {
    /// None (only Σ = identity needs none).
    #[default]
    None,
    /// A saved pass ([`Network::fisher_pass`], the CLI's `fim`), checked against the model.
    Saved(&'a FisherArtifact),
    /// Training data and the likelihood of its targets.
    Data {
        /// The examples (files or arrays in memory).
        data: &'a MmapNpyDataset,
        /// `gaussian[:SIGMA]` or `categorical`.
        likelihood: Likelihood,
    },
}

impl<'a> FisherInput<'a> {
    /// The Fisher a caller names: a saved pass, or training data with the `likelihood` of its
    /// targets (`gaussian[:SIGMA]` or `categorical`), or neither. Both is an error, and so is
    /// training data without a likelihood (`strategy` names the Σ that asked for it).
    pub fn choose(
        saved: Option<&'a FisherArtifact>,
        data: Option<&'a MmapNpyDataset>,
        likelihood: Option<&str>,
        strategy: &str,
    ) -> Result<Self> {
        Ok(match (saved, data) {
            (Some(_), Some(_)) => {
                return Err(Error::invalid(
                    "fisher",
                    "with training data",
                    "give either a saved Fisher or training data (x, y), not both",
                ))
            }
            (Some(a), None) => FisherInput::Saved(a),
            (None, Some(data)) => FisherInput::Data {
                data,
                likelihood: likelihood
                    .ok_or_else(|| Error::MissingInput {
                        strategy: strategy.into(),
                        missing: "the likelihood of the training targets (gaussian[:SIGMA] or categorical)".into(),
                    })?
                    .parse()?,
            },
            (None, None) => FisherInput::None,
        })
    }
}

/// What [`variances`] computes: the CLI's `variance` options.
#[derive(Debug)]
pub struct VarianceRequest<'a> {
    /// The quantity of interest.
    pub qoi: QoiRequest,
    /// Σ.
    pub sigma: SigmaStrategy,
    /// Damping, posterior scale, method, memory budget, CG settings (and their progress).
    pub options: SigmaOptions,
    /// The Fisher.
    pub fisher: FisherInput<'a>,
    /// Read the QoI after this many applications of the network (≥ 1).
    pub rollout: usize,
    /// Examples per batch (`None`: [`Network::default_batch_size`]).
    pub batch_size: Option<usize>,
    /// Also split ΔVar by layer ([`VarianceReport::layers`]).
    pub split: bool,
    /// Per-layer Σ scales (from [`calibrate`]): ΔVar becomes Σ_l s_l·ΔVar_l. `String` names
    /// where they came from, for errors.
    pub calibration: Option<(Calibration, String)>,
}

impl Default for VarianceRequest<'_> {
    fn default() -> Self {
        Self {
            qoi: QoiRequest::Scalar(Qoi::Sum),
            sigma: SigmaStrategy::InverseFullEmpiricalFim,
            options: SigmaOptions::default(),
            fisher: FisherInput::None,
            rollout: 1,
            batch_size: None,
            split: false,
            calibration: None,
        }
    }
}

/// The per-layer split of a [`VarianceReport`].
#[derive(Debug, Clone)]
pub struct LayerSplit {
    /// The layers, in parameter order.
    pub groups: Vec<ParamGroup>,
    /// M row-major L×L blocks (entries sum to ΔVar; the diagonal is each layer's own ΔVar_l).
    pub blocks: Vec<Vec<f64>>,
    /// The calibration applied to the result's delta variances, if any.
    pub calibration: Option<Calibration>,
}

/// What [`variances`] computed.
#[derive(Debug, Clone)]
pub struct VarianceReport {
    /// ΔVar and the QoI per query (for `outputs`: the covariances' diagonals, query-major),
    /// the method and its reason, CG and low-rank reports.
    pub result: DeltaVariances,
    /// The per-layer split (with `split` or a calibration).
    pub layers: Option<LayerSplit>,
    /// `outputs`: the per-query output covariances.
    pub covariance: Option<DeltaCovariances>,
    /// The Σ's name.
    pub sigma: &'static str,
    /// λ.
    pub damping: f64,
    /// Whether Σ was divided by N.
    pub posterior_scale: bool,
    /// The rollout length.
    pub rollout: usize,
    /// Things the caller should tell the user (a saved Fisher that covers part of its data).
    pub warnings: Vec<String>,
}

impl VarianceReport {
    /// The CLI's `variance --json` object (`seconds` as given).
    pub fn to_json(&self, seconds: f64) -> serde_json::Value {
        let out = &self.result;
        let mut v = if let Some(c) = &self.covariance {
            let k = c.outputs.first().map(|o| o.len()).unwrap_or(0).max(1);
            let nested: Vec<Vec<Vec<f64>>> = c
                .covariance
                .iter()
                .map(|m| m.chunks(k).map(|r| r.to_vec()).collect())
                .collect();
            let diag: Vec<Vec<f64>> = out.delta_variance.chunks(k).map(|r| r.to_vec()).collect();
            serde_json::json!({
                "qoi": c.outputs,
                "delta_variance": diag,
                "covariance": nested,
            })
        } else {
            let cal = self.layers.as_ref().and_then(|g| g.calibration.as_ref());
            serde_json::json!({
                "delta_variance": out.delta_variance,
                "qoi": out.qoi,
                "cg": out.cg,
                "lowrank": out.lowrank,
                "calibration": cal.map(|c| serde_json::json!({
                    "scales": c.scales,
                    "groups": c.groups.iter().map(|g| g.name.clone()).collect::<Vec<_>>(),
                    "beta": c.beta,
                })),
                "predictive_variance": cal.map(|c| {
                    out.delta_variance.iter().map(|v| v + c.beta).collect::<Vec<_>>()
                }),
                "path": out.path,
            })
        };
        let common = serde_json::json!({
            "sigma": self.sigma,
            "method": out.method.as_ref().map(|m| m.method.name()),
            "method_reason": out.method.as_ref().map(|m| m.reason.clone()),
            "num_params": out.num_params,
            "num_train": out.num_train,
            "damping": self.damping,
            "posterior_scale": self.posterior_scale,
            "rollout": self.rollout,
            "seconds": seconds,
        });
        if let (Some(o), serde_json::Value::Object(c)) = (v.as_object_mut(), common) {
            o.extend(c);
        }
        v
    }
}

/// Applies a calibration (when given) to a per-layer split: the delta variances become
/// Σ_l s_l·ΔVar_l.
fn finish_layers(
    out: &mut DeltaVariances,
    groups: Vec<ParamGroup>,
    blocks: Vec<Vec<f64>>,
    calibration: Option<(Calibration, String)>,
) -> Result<LayerSplit> {
    let calibration = match calibration {
        None => None,
        Some((c, origin)) => {
            c.check_groups(&groups)?;
            if c.sigma != out.sigma {
                return Err(Error::invalid(
                    "--calibration",
                    origin,
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
    Ok(LayerSplit {
        groups,
        blocks,
        calibration,
    })
}

/// ΔVar of `req.qoi` at `queries` (from [`Network::queries`]) under `req.sigma`: the pipeline
/// of the CLI's `variance`. Split by layer when `req.split` or a calibration is given.
///
/// Memory: what the chosen Σ route holds (see `docs/library.md`) plus the query gradients of one
/// block of queries; the data are read batch by batch.
pub fn variances(
    net: &Network,
    queries: &Tensor,
    req: VarianceRequest<'_>,
) -> Result<VarianceReport> {
    let VarianceRequest {
        qoi,
        sigma: strategy,
        mut options,
        fisher,
        rollout,
        batch_size,
        split,
        calibration,
    } = req;
    let split = split || calibration.is_some();
    let sigma_name = strategy.name();
    // the automatic method choice plans for the queries at hand
    options.expected_queries = queries.dim(0)?.max(1);
    let eo = FactoredOptions {
        batch_size: batch_size.unwrap_or_else(|| net.default_batch_size()),
        threads: 0,
    };
    let missing = |what: &str| Error::MissingInput {
        strategy: sigma_name.into(),
        missing: what.into(),
    };
    let (damping, posterior_scale) = (options.damping, options.posterior_scale);
    let report = |result, layers, covariance, warnings| VarianceReport {
        result,
        layers,
        covariance,
        sigma: sigma_name,
        damping,
        posterior_scale,
        rollout,
        warnings,
    };
    // every output (the covariances) reads no scalar QoI
    let (scalar, outputs) = match qoi {
        QoiRequest::Scalar(q) => (q, false),
        QoiRequest::Outputs => (Qoi::Sum, true),
    };
    let needs_fisher = strategy.needs_fisher();
    let mut warnings = vec![];
    let from_data: Option<Box<dyn FisherSource + '_>>;
    let fisher: Option<&dyn FisherSource> = match fisher {
        _ if !needs_fisher => None,
        FisherInput::Saved(art) => {
            art.check_tensors(&net.named_tensors()?)?;
            if let Some(w) = art.check_complete()? {
                warnings.push(w);
            }
            Some(art)
        }
        FisherInput::Data { data, likelihood } => {
            from_data = Some(net.fisher_source(likelihood, data, &eo, &options.cg.progress)?);
            from_data.as_deref()
        }
        FisherInput::None => {
            return Err(missing(
                "training data (x, y and the likelihood) or a saved Fisher",
            ))
        }
    };
    let engine = net.engine();
    let req = DeltaRequest {
        qoi: scalar,
        queries,
        rollout,
        strategy,
        options,
        fisher,
        engine: eo,
    };
    if outputs {
        if split {
            return Err(Error::invalid(
                "--qoi",
                "outputs",
                "per-layer scales (calibrate, a calibration) take a scalar QoI (sum, output:K, prob:K)",
            ));
        }
        let c = engine_delta_covariances_with(engine, req)?;
        let out = c.diagonal(fisher.map(|f| f.num_examples()).unwrap_or(0))?;
        return Ok(report(out, None, Some(c), warnings));
    }
    if split {
        let groups = named_groups(&net.named_tensors()?);
        let g = engine_group_delta_variances_with(engine, groups, req)?;
        let mut out = g.result;
        let layers = finish_layers(&mut out, g.groups, g.blocks, calibration)?;
        return Ok(report(out, Some(layers), None, warnings));
    }
    let out = engine_delta_variances_with(engine, req)?;
    Ok(report(out, None, None, warnings))
}

/// What [`calibrate`] fitted.
#[derive(Debug, Clone)]
pub struct CalibrationReport {
    /// The per-layer scales (save them for [`VarianceRequest::calibration`]).
    pub calibration: Calibration,
    /// The one-scale fit (α·ΔVar + β) on the same points, to compare.
    pub one_scale: UncertaintyMetrics,
    /// The ΔVar run the fit used (split by layer).
    pub variances: VarianceReport,
}

impl CalibrationReport {
    /// The CLI's `calibrate --json` object: the fit, the one-scale fit beside it, the file
    /// written (`out`) and `seconds` as given.
    pub fn to_json(&self, out: Option<&Path>, seconds: f64) -> serde_json::Value {
        serde_json::json!({
            "calibration": self.calibration,
            "nll_one_scale": self.one_scale.nll,
            "alpha_one_scale": self.one_scale.alpha,
            "beta_one_scale": self.one_scale.beta,
            "out": out.map(|p| p.display().to_string()),
            "seconds": seconds,
        })
    }
}

/// Per-layer Σ scales fitted on held-out data: ΔVar at `val_x` (from [`Network::queries`]),
/// split by layer, scored against the errors of the QoI's values at `val_y` by the Gaussian
/// likelihood. `req.qoi` must be a scalar and `req.calibration` none.
pub fn calibrate(
    net: &Network,
    val_x: &Tensor,
    val_y: &NpyArray,
    mut req: VarianceRequest<'_>,
    opts: &CalibrationOptions,
) -> Result<CalibrationReport> {
    let QoiRequest::Scalar(qoi) = req.qoi.clone() else {
        return Err(Error::invalid(
            "--qoi",
            "outputs",
            "calibrate takes a scalar QoI (sum, output:K, prob:K)",
        ));
    };
    if let Some((_, origin)) = &req.calibration {
        return Err(Error::invalid(
            "--calibration",
            origin,
            "calibrate fits the scales; give a calibration to variance or evaluate",
        ));
    }
    req.split = true;
    let v = variances(net, val_x, req)?;
    let layers = v
        .layers
        .as_ref()
        .ok_or_else(|| Error::Unsupported("no per-layer split was computed".into()))?;
    let e = held_out_errors(&qoi, val_y, &v.result.qoi)?;
    let calibration = crate::calibration::fit_calibration(
        &e,
        &layers.blocks,
        &layers.groups,
        &v.result.sigma,
        opts,
    )?;
    let one_scale = uncertainty_metrics(&e, &v.result.delta_variance)?;
    Ok(CalibrationReport {
        calibration,
        one_scale,
        variances: v,
    })
}

/// ΔVar at held-out inputs `val_x` against the errors of the QoI's values at `val_y`: the
/// uncertainty metrics (the CLI's `evaluate`), with the errors and the run.
pub fn evaluate(
    net: &Network,
    val_x: &Tensor,
    val_y: &NpyArray,
    req: VarianceRequest<'_>,
) -> Result<(UncertaintyMetrics, Vec<f64>, VarianceReport)> {
    let QoiRequest::Scalar(qoi) = req.qoi.clone() else {
        return Err(Error::invalid(
            "--qoi",
            "outputs",
            "evaluate takes a scalar QoI (sum, output:K, prob:K)",
        ));
    };
    let v = variances(net, val_x, req)?;
    let e = held_out_errors(&qoi, val_y, &v.result.qoi)?;
    let m = uncertainty_metrics(&e, &v.result.delta_variance)?;
    Ok((m, e, v))
}

/// The default memory budget of a front end: 80% of the memory available now (Linux
/// `MemAvailable`), at least the library's [`crate::DEFAULT_MEMORY_BUDGET`]; that default where
/// it cannot be read.
pub fn machine_memory_budget() -> u64 {
    let available = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find(|l| l.starts_with("MemAvailable:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<u64>().ok())
    });
    let floor = crate::fisher::DEFAULT_MEMORY_BUDGET;
    match available {
        Some(kb) => (kb.saturating_mul(1024) / 10 * 8).max(floor),
        None => floor,
    }
}
