//! `deltavar_rs._native`: the Python package's extension module. It converts Python values to
//! the library's and back and calls `deltavar::pipeline`, the same functions the CLI calls; it
//! implements nothing of its own. The Pythonic API (defaults, NumPy results, the progress bar,
//! `from_torch`) is `deltavar_rs/__init__.py`.
//!
//! Every library error becomes a Python exception from `deltavar_rs._errors` with the CLI's
//! one-line message; long calls run with the GIL released and stop at their next progress
//! point on Ctrl-C (KeyboardInterrupt).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use deltavar::calibration::{Calibration, CalibrationOptions};
use deltavar::data::{MmapNpyDataset, NpyArray, RowsBuf};
use deltavar::pipeline::{
    self, machine_memory_budget, parse_dtype, row_shape, FisherInput, ModelSpec, Network,
    VarianceRequest,
};
use deltavar::{Error, FisherArtifact, PassOptions, Progress, SigmaOptions};
use deltavar::{FactoredOptions, SigmaStrategy};
use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyKeyboardInterrupt;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyString};

/// A library error as the package's exception: `DeltavarIOError` (an `OSError`) for files,
/// `DeltavarMemoryError` for the memory budget, `DeltavarValueError` (a `ValueError`) for the
/// rest; `KeyboardInterrupt` when a stop check fired.
fn to_py(e: Error) -> PyErr {
    let kind = match &e {
        Error::Interrupted(_) => return PyKeyboardInterrupt::new_err(e.to_string()),
        Error::Io { .. } | Error::BadFile { .. } => "DeltavarIOError",
        Error::MemoryBudget { .. } => "DeltavarMemoryError",
        _ => "DeltavarValueError",
    };
    let msg = e.to_string();
    Python::attach(|py| {
        let made = py
            .import("deltavar_rs._errors")
            .and_then(|m| m.getattr(kind))
            .and_then(|cls| cls.call1((msg.clone(),)));
        match made {
            Ok(v) => PyErr::from_value(v),
            Err(err) => err,
        }
    })
}

/// One of the package's progress objects: `update(done, total)` for passes, `line(text)` for
/// the stages and iterations of a solve.
#[derive(Clone)]
struct Reporter {
    target: Option<Arc<Py<PyAny>>>,
    /// The KeyboardInterrupt (or other error) raised while checking signals, re-raised after.
    raised: Arc<Mutex<Option<PyErr>>>,
}

impl Reporter {
    fn new(target: Option<Py<PyAny>>) -> Self {
        Self {
            target: target.map(Arc::new),
            raised: Arc::new(Mutex::new(None)),
        }
    }

    /// The library's progress sink: lines to `line(text)`, and Python's signal handlers asked
    /// at every progress point (Ctrl-C stops the call there).
    fn progress(&self) -> Progress {
        let raised = self.raised.clone();
        let stop = move || {
            Python::attach(|py| match py.check_signals() {
                Ok(()) => false,
                Err(e) => {
                    if let Ok(mut r) = raised.lock() {
                        *r = Some(e);
                    }
                    true
                }
            })
        };
        match &self.target {
            Some(t) => {
                let t = t.clone();
                Progress::new(move |line| {
                    Python::attach(|py| {
                        let _ = t.call_method1(py, "line", (line,));
                    })
                })
                .with_stop(stop)
            }
            None => Progress::none().with_stop(stop),
        }
    }

    /// The `(done, total)` callback of an offline pass.
    fn update(&self, done: usize, total: usize) {
        if let Some(t) = &self.target {
            Python::attach(|py| {
                let _ = t.call_method1(py, "update", (done, total));
            })
        }
    }

    /// The call's result, with a signal's exception raised in its place.
    fn finish<T>(&self, r: deltavar::Result<T>) -> PyResult<T> {
        if let Some(t) = &self.target {
            Python::attach(|py| {
                let _ = t.call_method0(py, "close");
            })
        }
        match r {
            Ok(v) => Ok(v),
            Err(e @ Error::Interrupted(_)) => {
                let raised = self.raised.lock().ok().and_then(|mut r| r.take());
                Err(raised.unwrap_or_else(|| to_py(e)))
            }
            Err(e) => Err(to_py(e)),
        }
    }
}

/// A NumPy array (anything with the buffer protocol: float32, float64 or int64, any shape) as
/// the library's in-memory array, `name` standing in for a file name in errors. One copy.
fn array(py: Python<'_>, name: &str, obj: &Bound<'_, PyAny>) -> PyResult<NpyArray> {
    let (shape, rows) = if let Ok(b) = PyBuffer::<f32>::get(obj) {
        (b.shape().to_vec(), RowsBuf::F32(b.to_vec(py)?))
    } else if let Ok(b) = PyBuffer::<f64>::get(obj) {
        (b.shape().to_vec(), RowsBuf::F64(b.to_vec(py)?))
    } else if let Ok(b) = PyBuffer::<i64>::get(obj) {
        (b.shape().to_vec(), RowsBuf::I64(b.to_vec(py)?))
    } else {
        return Err(to_py(Error::invalid(
            name,
            obj.get_type().name()?.to_string(),
            "expected a float32, float64 or int64 array (numpy.ndarray or a buffer)",
        )));
    };
    NpyArray::from_rows(name, &shape, rows).map_err(to_py)
}

/// A file path (`str` or `os.PathLike`), or `None` for anything else.
fn path_of(obj: &Bound<'_, PyAny>) -> Option<PathBuf> {
    if obj.is_instance_of::<PyString>() || obj.hasattr("__fspath__").unwrap_or(false) {
        obj.extract::<PathBuf>().ok()
    } else {
        None
    }
}

/// An array argument: a path to an `.npy` file (memory-mapped) or an array.
fn array_arg(py: Python<'_>, name: &str, obj: &Bound<'_, PyAny>) -> PyResult<NpyArray> {
    match path_of(obj) {
        Some(p) => NpyArray::open(p).map_err(to_py),
        None => array(py, name, obj),
    }
}

/// Training data: two `.npy` paths (memory-mapped) or two arrays.
fn dataset(py: Python<'_>, x: &Bound<'_, PyAny>, y: &Bound<'_, PyAny>) -> PyResult<MmapNpyDataset> {
    MmapNpyDataset::from_arrays(array_arg(py, "x", x)?, array_arg(py, "y", y)?).map_err(to_py)
}

/// A model: its specification, and the engines built from it, one per input shape (an `onnx:`
/// or `seq:` model takes its input shape from the data it first sees).
#[pyclass(frozen, module = "deltavar_rs._native")]
struct NativeModel {
    spec: ModelSpec,
    built: Mutex<Vec<Built>>,
}

/// An engine built for rows of a shape.
struct Built {
    shape: Vec<usize>,
    net: Arc<Network>,
}

impl NativeModel {
    /// The engine for rows of `shape` (rolled out or not: every model is a graph); built once, with the
    /// GIL released. Nothing Python runs while the lock is held (an error becomes an exception
    /// only after it is released), so another thread waiting on it cannot deadlock with us.
    fn network(&self, py: Python<'_>, shape: &[usize]) -> PyResult<Arc<Network>> {
        py.detach(|| self.build(shape)).map_err(to_py)
    }

    fn build(&self, shape: &[usize]) -> deltavar::Result<Arc<Network>> {
        let mut built = self
            .built
            .lock()
            .map_err(|_| Error::Unsupported("a previous call panicked".into()))?;
        if let Some(b) = built.iter().find(|b| b.shape == shape) {
            return Ok(b.net.clone());
        }
        let net = Arc::new(Network::load(&self.spec, Some(shape))?);
        built.push(Built {
            shape: shape.to_vec(),
            net: net.clone(),
        });
        Ok(net)
    }
}

/// The options of a `delta_variance` / `calibrate` / `evaluate` call, from the dict the Python
/// layer fills (every key present).
struct Options<'py> {
    d: Bound<'py, PyDict>,
}

impl<'py> Options<'py> {
    /// The option `key` (every call's dict has every key; a missing one is the Python layer's bug).
    fn item(&self, key: &str) -> PyResult<Bound<'py, PyAny>> {
        self.d
            .get_item(key)?
            .ok_or_else(|| to_py(Error::invalid(key, "missing", "an option the call needs")))
    }
    fn get<T: for<'a> FromPyObject<'a, 'py>>(&self, key: &str) -> PyResult<T> {
        self.item(key)?.extract::<T>().map_err(Into::into)
    }
    fn any(&self, key: &str) -> PyResult<Option<Bound<'py, PyAny>>> {
        Ok(self.d.get_item(key)?.filter(|v| !v.is_none()))
    }
}

/// Σ from the `sigma` option: a name (`identity`, `diag-fim`, `full-fim`, `kfac`,
/// `lowrank:K`), or a float64 array (a 1-D diagonal Σ, or a P×P matrix).
fn sigma_choice(py: Python<'_>, v: &Bound<'_, PyAny>) -> PyResult<SigmaStrategy> {
    if let Ok(s) = v.extract::<String>() {
        return s.parse().map_err(to_py);
    }
    let b = PyBuffer::<f64>::get(v).map_err(|_| {
        to_py(Error::invalid(
            "sigma",
            "an object",
            "give a name (identity, diag-fim, full-fim, kfac, lowrank:K) or a float64 array",
        ))
    })?;
    let shape = b.shape().to_vec();
    let data = b.to_vec(py)?;
    Ok(match shape.as_slice() {
        [_] => SigmaStrategy::Diagonal(data),
        [r, c] if r == c => {
            let n = *r;
            SigmaStrategy::Dense(faer::Mat::from_fn(n, n, |i, j| data[i * n + j]))
        }
        _ => {
            return Err(to_py(Error::invalid(
                "sigma",
                format!("an array of shape {shape:?}"),
                "a Σ array is 1-D (its diagonal) or square (P×P)",
            )))
        }
    })
}

/// What a call works on: the engine for the queries' rows, the queries checked, the training
/// data and the saved Fisher its options name.
struct Prepared {
    net: Arc<Network>,
    queries: candle_core::Tensor,
    data: Option<MmapNpyDataset>,
    saved: Option<Py<NativeFisher>>,
}

/// The library's request from the options (`fisher` a `NativeFisher` or `None`; `x`, `y`,
/// `likelihood` training data).
fn request<'a>(
    py: Python<'_>,
    o: &Options<'_>,
    p: &'a Prepared,
    reporter: &Reporter,
) -> PyResult<VarianceRequest<'a>> {
    let saved = p.saved.as_ref().map(|f| &f.get().art);
    let sigma = sigma_choice(py, &o.item("sigma")?)?;
    let mut options = SigmaOptions {
        damping: o.get("damping")?,
        posterior_scale: o.get("posterior_scale")?,
        full_method: o.get::<String>("method")?.parse().map_err(to_py)?,
        kernel_precision: o
            .get::<String>("kernel_precision")?
            .parse()
            .map_err(to_py)?,
        memory_budget: o
            .get::<Option<u64>>("memory_budget")?
            .unwrap_or_else(machine_memory_budget),
        ..Default::default()
    };
    options.cg.progress = reporter.progress();
    options.cg.tol = o.get("cg_tol")?;
    options.cg.max_iter = o.get("cg_max_iter")?;
    options.cg.preconditioner = o
        .get::<String>("cg_preconditioner")?
        .parse()
        .map_err(to_py)?;
    let lik: Option<String> = o.get("likelihood")?;
    let fisher =
        FisherInput::choose(saved, p.data.as_ref(), lik.as_deref(), sigma.name()).map_err(to_py)?;
    let calibration = match o.any("calibration")? {
        None => None,
        Some(c) => {
            let p: PathBuf = c.extract()?;
            Some((
                Calibration::load(&p).map_err(to_py)?,
                p.display().to_string(),
            ))
        }
    };
    Ok(VarianceRequest {
        qoi: o.get::<String>("qoi")?.parse().map_err(to_py)?,
        sigma,
        options,
        fisher,
        rollout: o.get("rollout")?,
        batch_size: o.get("batch_size")?,
        split: o.get("split")?,
        calibration,
    })
}

#[pymethods]
impl NativeModel {
    #[new]
    #[pyo3(signature = (arch, weights=None, prefix=String::new(), layer_names=None, dtype="f32"))]
    fn new(
        arch: String,
        weights: Option<PathBuf>,
        prefix: String,
        layer_names: Option<Vec<String>>,
        dtype: &str,
    ) -> PyResult<Self> {
        Ok(Self {
            spec: ModelSpec {
                arch,
                weights,
                prefix,
                layer_names,
                dtype: parse_dtype(dtype).map_err(to_py)?,
            },
            built: Mutex::new(vec![]),
        })
    }

    /// The architecture string.
    #[getter]
    fn arch(&self) -> String {
        self.spec.arch.clone()
    }

    /// `(num_params, names, shapes)` of the model built for rows of `input_shape`.
    fn parameters(
        &self,
        py: Python<'_>,
        input_shape: Vec<usize>,
    ) -> PyResult<(usize, Vec<String>, Vec<Vec<usize>>)> {
        let net = self.network(py, &input_shape)?;
        let named = net.named_tensors().map_err(to_py)?;
        Ok((
            net.num_params(),
            named.iter().map(|(n, _)| n.clone()).collect(),
            named.iter().map(|(_, t)| t.dims().to_vec()).collect(),
        ))
    }

    /// An offline Fisher pass (`deltavar fim`).
    #[pyo3(signature = (x, y, likelihood, kind, batch_size, shard, memory_budget, progress))]
    #[allow(clippy::too_many_arguments)]
    fn fisher(
        &self,
        py: Python<'_>,
        x: &Bound<'_, PyAny>,
        y: &Bound<'_, PyAny>,
        likelihood: String,
        kind: String,
        batch_size: Option<usize>,
        shard: Option<String>,
        memory_budget: Option<u64>,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<NativeFisher> {
        let data = dataset(py, x, y)?;
        let net = self.network(py, &row_shape(data.x()))?;
        let reporter = Reporter::new(progress);
        let mut opts = PassOptions {
            kind: kind.parse().map_err(to_py)?,
            shard: shard
                .as_deref()
                .map(deltavar::fisher::parse_shard)
                .transpose()
                .map_err(to_py)?,
            engine: FactoredOptions {
                batch_size: batch_size.unwrap_or(net.default_batch_size()),
                threads: 0,
            },
            progress: reporter.progress(),
            ..Default::default()
        };
        if let Some(b) = memory_budget {
            opts.memory_budget = b;
        }
        let r = py.detach(|| {
            let mut update = |done: usize, total: usize| reporter.update(done, total);
            net.fisher_pass(&likelihood, &data, &opts, &mut update)
        });
        Ok(NativeFisher {
            art: reporter.finish(r)?,
        })
    }

    /// ΔVar (`deltavar variance`): the CLI's JSON object as a string, and with `split` the
    /// per-layer blocks as float64 bytes (M × L × L) and the layer names.
    fn delta_variance(
        &self,
        py: Python<'_>,
        queries: &Bound<'_, PyAny>,
        opts: Bound<'_, PyDict>,
    ) -> PyResult<(String, Option<Py<PyBytes>>, Vec<String>)> {
        let t0 = Instant::now();
        let o = Options { d: opts };
        let reporter = Reporter::new(o.get("progress")?);
        let p = self.prepare(py, queries, &o)?;
        let req = request(py, &o, &p, &reporter)?;
        let r = py.detach(|| pipeline::variances(&p.net, &p.queries, req));
        let r = reporter.finish(r)?;
        for w in &r.warnings {
            warn(py, w)?;
        }
        let json = r.to_json(t0.elapsed().as_secs_f64()).to_string();
        let (blocks, names) = match &r.layers {
            Some(l) => (
                Some(f64_bytes(py, l.blocks.iter().flatten().copied())),
                l.groups.iter().map(|g| g.name.clone()).collect(),
            ),
            None => (None, vec![]),
        };
        Ok((json, blocks, names))
    }

    /// Per-layer Σ scales fitted on held-out data (`deltavar calibrate`): the CLI's JSON
    /// object as a string (written to `out` as well when given).
    #[pyo3(signature = (val_x, val_y, opts, out=None))]
    fn calibrate(
        &self,
        py: Python<'_>,
        val_x: &Bound<'_, PyAny>,
        val_y: &Bound<'_, PyAny>,
        opts: Bound<'_, PyDict>,
        out: Option<PathBuf>,
    ) -> PyResult<String> {
        let t0 = Instant::now();
        let o = Options { d: opts };
        let reporter = Reporter::new(o.get("progress")?);
        let p = self.prepare(py, val_x, &o)?;
        let targets = array_arg(py, "val_y", val_y)?;
        let req = request(py, &o, &p, &reporter)?;
        let r = py.detach(|| {
            pipeline::calibrate(
                &p.net,
                &p.queries,
                &targets,
                req,
                &CalibrationOptions::default(),
            )
        });
        let c = reporter.finish(r)?;
        if let Some(p) = &out {
            c.calibration.save(p).map_err(to_py)?;
        }
        Ok(c.to_json(out.as_deref(), t0.elapsed().as_secs_f64())
            .to_string())
    }

    /// ΔVar at held-out inputs scored against their errors (`deltavar evaluate`, without the
    /// plot): the metrics as a JSON string, with the errors and the delta variances.
    fn evaluate(
        &self,
        py: Python<'_>,
        val_x: &Bound<'_, PyAny>,
        val_y: &Bound<'_, PyAny>,
        opts: Bound<'_, PyDict>,
    ) -> PyResult<(String, Vec<f64>, Vec<f64>)> {
        let o = Options { d: opts };
        let reporter = Reporter::new(o.get("progress")?);
        let p = self.prepare(py, val_x, &o)?;
        let targets = array_arg(py, "val_y", val_y)?;
        let req = request(py, &o, &p, &reporter)?;
        let r = py.detach(|| pipeline::evaluate(&p.net, &p.queries, &targets, req));
        let (m, e, v) = reporter.finish(r)?;
        let json = serde_json::to_string(&m)
            .map_err(|e| to_py(Error::Unsupported(format!("metrics as JSON: {e}"))))?;
        Ok((json, e, v.result.delta_variance))
    }
}

impl NativeModel {
    /// The engine for the queries' rows, the queries checked, the training data named by the
    /// options, and the saved Fisher.
    fn prepare(
        &self,
        py: Python<'_>,
        queries: &Bound<'_, PyAny>,
        o: &Options<'_>,
    ) -> PyResult<Prepared> {
        let qa = array_arg(py, "queries", queries)?;
        let net = self.network(py, &row_shape(&qa))?;
        let q = net.queries(&qa).map_err(to_py)?;
        let data = match (o.any("x")?, o.any("y")?) {
            (Some(x), Some(y)) => Some(dataset(py, &x, &y)?),
            (None, None) => None,
            _ => {
                return Err(to_py(Error::invalid(
                    "fisher",
                    "one of x, y",
                    "training data needs both inputs and targets: fisher=(x, y)",
                )))
            }
        };
        let saved = match o.any("fisher")? {
            Some(f) => Some(f.extract::<Py<NativeFisher>>().map_err(|_| {
                to_py(Error::invalid(
                    "fisher",
                    "an object",
                    "give a Fisher (model.fisher(...) or Fisher.load(path)) or (x, y)",
                ))
            })?),
            None => None,
        };
        Ok(Prepared {
            net,
            queries: q,
            data,
            saved,
        })
    }
}

/// Values as float64 bytes (native order) for `numpy.frombuffer`.
fn f64_bytes(py: Python<'_>, v: impl Iterator<Item = f64>) -> Py<PyBytes> {
    let bytes: Vec<u8> = v.flat_map(f64::to_ne_bytes).collect();
    PyBytes::new(py, &bytes).unbind()
}

/// A Python `UserWarning`.
fn warn(py: Python<'_>, text: &str) -> PyResult<()> {
    let w = py.import("warnings")?;
    w.call_method1("warn", (text,))?;
    Ok(())
}

/// A Fisher pass (`deltavar fim`'s artifact).
#[pyclass(frozen, module = "deltavar_rs._native")]
struct NativeFisher {
    art: FisherArtifact,
}

#[pymethods]
impl NativeFisher {
    /// Reads a saved pass.
    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let art = py.detach(|| FisherArtifact::load(&path)).map_err(to_py)?;
        Ok(Self { art })
    }

    /// Sums the shards of one pass.
    #[staticmethod]
    fn merge(parts: Vec<Py<NativeFisher>>) -> PyResult<Self> {
        let arts: Vec<FisherArtifact> = parts.iter().map(|p| p.get().art.clone()).collect();
        Ok(Self {
            art: FisherArtifact::merge(&arts).map_err(to_py)?,
        })
    }

    /// Writes the pass (the format `deltavar fim` writes).
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        py.detach(|| self.art.save(&path)).map_err(to_py)
    }

    /// Use this Fisher even when it covers only part of its dataset.
    fn allow_partial(&self) -> Self {
        Self {
            art: self.art.clone().with_partial_allowed(true),
        }
    }

    /// The metadata as a JSON string (names, shapes, examples, kind, likelihood, ranges,
    /// completeness).
    fn meta(&self) -> String {
        let m = &self.art.meta;
        serde_json::json!({
            "param_names": m.param_names,
            "param_shapes": m.param_shapes,
            "num_examples": m.num_examples,
            "dataset_len": m.dataset_len,
            "kind": m.kind,
            "likelihood": m.likelihood,
            "ranges": m.ranges,
            "complete": self.art.is_complete(),
            "missing": self.art.missing_ranges(),
            "source": self.art.source,
        })
        .to_string()
    }

    /// The mean diagonal (Σᵢ gᵢ∘gᵢ / N) in flat parameter order, float64 bytes.
    fn diagonal(&self, py: Python<'_>) -> Py<PyBytes> {
        f64_bytes(py, self.art.diag.mean().into_iter())
    }

    /// The mean dense Fisher (P×P, row-major float64 bytes) of a dense pass, else `None`.
    fn dense(&self, py: Python<'_>) -> Option<Py<PyBytes>> {
        self.art.dense.as_ref().map(|d| {
            let m = d.mean();
            let p = m.nrows();
            f64_bytes(py, (0..p * p).map(|k| m[(k / p, k % p)]))
        })
    }
}

/// The uncertainty metrics of held-out errors and their variances, as a JSON string.
#[pyfunction]
fn metrics(errors: Vec<f64>, variances: Vec<f64>) -> PyResult<String> {
    let m = deltavar::metrics::uncertainty_metrics(&errors, &variances).map_err(to_py)?;
    serde_json::to_string(&m).map_err(|e| to_py(Error::Unsupported(e.to_string())))
}

/// The extension module.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<NativeModel>()?;
    m.add_class::<NativeFisher>()?;
    m.add_function(wrap_pyfunction!(metrics, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
