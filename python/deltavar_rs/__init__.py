"""deltavar_rs: the Delta Variance (arXiv 2502.14698) on deltavar's native Rust engine.

How uncertain is a trained network about a prediction? The delta variance
ΔVar(z) = ∇θq(z)ᵀ Σ ∇θq(z) of a quantity of interest q (an output, a class probability, their
sum), with Σ usually the damped inverse empirical Fisher of the training data.

    import deltavar_rs as dv
    model = dv.Model.from_torch(net, x_train[:2])          # or Model.from_onnx / from_safetensors
    result = model.delta_variance(x_query, qoi="prob:3", sigma="full-fim",
                                  fisher=(x_train, y_train), likelihood="categorical")
    result.delta_variance                                  # numpy, one value per query

Arrays in, NumPy out: inputs may be NumPy arrays, torch tensors (anything with `.numpy()` or
`__array__`) or paths to `.npy` files (memory-mapped, for data larger than RAM). Every call runs
the same library functions as the `deltavar` command line (`deltavar::pipeline`), with the GIL
released; Ctrl-C stops a long call at its next progress point. Errors are `DeltavarError`s with
the command line's one-line message.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

from . import _native
from ._errors import DeltavarError, DeltavarIOError, DeltavarMemoryError, DeltavarValueError

__version__ = _native.__version__

__all__ = [
    "Calibration",
    "DeltaVariance",
    "DeltavarError",
    "DeltavarIOError",
    "DeltavarMemoryError",
    "DeltavarValueError",
    "Fisher",
    "Model",
    "calibrate",
    "metrics",
]


def _array(a, name):
    """`a` as a C-contiguous float32 / float64 / int64 NumPy array, or a path (str) to an .npy
    file. Torch tensors are detached and moved to the CPU; integer and boolean values become
    int64, float64 stays float64, other floats become float32."""
    if isinstance(a, (str, os.PathLike)):
        return os.fspath(a)
    if hasattr(a, "detach") and hasattr(a, "numpy"):  # a torch tensor
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    if a.dtype.kind in "iub":
        return np.ascontiguousarray(a, dtype=np.int64)
    if a.dtype == np.float64:
        return np.ascontiguousarray(a)
    if a.dtype.kind == "f":
        return np.ascontiguousarray(a, dtype=np.float32)
    raise DeltavarValueError(
        f"invalid option {name} = an array of {a.dtype}: give float32, float64 or integer values"
    )


def _count(v, name, minimum=0):
    """An optional non-negative integer option, checked here so that a negative value is a
    DeltavarValueError like every other bad option (not an OverflowError of the conversion)."""
    if v is None:
        return None
    if isinstance(v, bool) or int(v) != v or int(v) < minimum:
        raise DeltavarValueError(f"invalid option {name} = {v}: expected an integer >= {minimum}")
    return int(v)


class _Progress:
    """The progress of one long call on stderr: a tqdm bar for passes over the data when tqdm
    is installed (a plain bar on a terminal otherwise) and the solver's stage and iteration
    lines (`deltavar: ...`, as the command line prints them)."""

    def __init__(self, desc):
        self.desc = desc
        self.bar = None
        self.tty = sys.stderr.isatty()
        self.t0 = time.monotonic()

    def update(self, done, total):
        if self.bar is None:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, desc=self.desc, unit="ex", leave=False)
            except ImportError:
                self.bar = False
        if self.bar:
            self.bar.total = total
            self.bar.n = done
            self.bar.refresh()
        elif self.tty and total:
            width = 30
            fill = width * done // total
            secs = time.monotonic() - self.t0
            sys.stderr.write(f"\r{self.desc} [{'#' * fill}{'.' * (width - fill)}] {done}/{total} examples  {secs:.1f} s")
            sys.stderr.flush()

    def line(self, text):
        if self.bar:
            self.bar.set_postfix_str(text, refresh=True)
        elif self.tty:
            sys.stderr.write("\r\x1b[2K" + "deltavar: " + text)
            sys.stderr.flush()
        else:
            sys.stderr.write("deltavar: " + text + "\n")

    def close(self):
        if self.bar:
            self.bar.close()
        elif self.tty:
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()
        self.bar = None


def _progress(progress, desc):
    return _Progress(desc) if progress else None


class Fisher:
    """An empirical Fisher pass over training data (what `deltavar fim` writes): the sums of
    gᵢ∘gᵢ (and of gᵢgᵢᵀ for a dense pass) over N examples, with the parameter names and shapes,
    the likelihood and the examples covered (a shard covers a range).

    Make one with `Model.fisher`, read one with `Fisher.load`, sum shards with `Fisher.merge`,
    write one with `save`; pass it to `Model.delta_variance(fisher=...)`."""

    def __init__(self, native):
        self._native = native
        self._meta = json.loads(native.meta())

    @classmethod
    def load(cls, path) -> "Fisher":
        """Reads a saved pass (from `save` or `deltavar fim`)."""
        return cls(_native.NativeFisher.load(os.fspath(path)))

    @classmethod
    def merge(cls, parts) -> "Fisher":
        """Sums the shards of one pass (`deltavar merge`)."""
        return cls(_native.NativeFisher.merge([p._native for p in parts]))

    def save(self, path) -> None:
        """Writes the pass in the format `deltavar fim` writes (`deltavar variance --fisher`
        reads it)."""
        self._native.save(os.fspath(path))

    def allow_partial(self) -> "Fisher":
        """This Fisher, usable even though it covers only part of its dataset (a warning then
        says how much)."""
        return Fisher(self._native.allow_partial())

    @property
    def diagonal(self) -> dict:
        """The mean diagonal (1/N) Σᵢ gᵢ∘gᵢ as {parameter name: array shaped like the
        parameter}."""
        flat = np.frombuffer(self._native.diagonal(), dtype=np.float64)
        out, k = {}, 0
        for name, shape in zip(self.param_names, self.param_shapes):
            n = int(np.prod(shape, dtype=np.int64))
            out[name] = flat[k : k + n].reshape(shape)
            k += n
        return out

    @property
    def dense(self):
        """The mean Fisher (1/N) Σᵢ gᵢgᵢᵀ (P×P) of a dense pass; None for a diagonal one."""
        b = self._native.dense()
        if b is None:
            return None
        p = self.num_params
        return np.frombuffer(b, dtype=np.float64).reshape(p, p)

    @property
    def param_names(self) -> list:
        """The parameter names, in flat order."""
        return list(self._meta["param_names"])

    @property
    def param_shapes(self) -> list:
        """The parameter shapes, in flat order."""
        return [tuple(s) for s in self._meta["param_shapes"]]

    @property
    def num_params(self) -> int:
        """P."""
        return int(sum(int(np.prod(s, dtype=np.int64)) for s in self.param_shapes))

    @property
    def num_examples(self) -> int:
        """N, the examples summed."""
        return int(self._meta["num_examples"])

    @property
    def kind(self) -> str:
        """"diag" or "dense"."""
        return self._meta["kind"]

    @property
    def likelihood(self) -> str:
        """The likelihood of the pass."""
        return self._meta["likelihood"]

    @property
    def ranges(self) -> list:
        """The example ranges [start, end) covered."""
        return [tuple(r) for r in self._meta["ranges"]]

    @property
    def complete(self) -> bool:
        """Whether the pass covers its whole dataset."""
        return bool(self._meta["complete"])

    def __repr__(self):
        return (
            f"Fisher(kind={self.kind!r}, likelihood={self.likelihood!r}, num_examples={self.num_examples}, "
            f"num_params={self.num_params}, complete={self.complete})"
        )


class DeltaVariance:
    """The result of `Model.delta_variance`: the command line's `--json` object, with its arrays
    as NumPy arrays.

    Attributes: `delta_variance` (M,) — or (M, K) for `qoi="outputs"`; `qoi` the QoI values;
    `std` the square roots; `covariance` (M, K, K) for `qoi="outputs"`, else None; `method` and
    `reason` (how the full inverse Fisher was applied and why); `cg` (iterations and residuals
    of an iterative solve); `lowrank`; `sigma`; `num_params`; `num_train`; `damping`;
    `posterior_scale`; `rollout`; `seconds`; `calibration` and `predictive_variance` with a
    calibration; `by_layer` ({"layers": names, "blocks": (M, L, L)} with `by_layer=True`);
    `json` the whole object."""

    def __init__(self, obj, blocks=None, layers=None):
        self.json = obj
        self.delta_variance = np.asarray(obj["delta_variance"], dtype=np.float64)
        self.qoi = np.asarray(obj["qoi"], dtype=np.float64)
        cov = obj.get("covariance")
        self.covariance = None if cov is None else np.asarray(cov, dtype=np.float64)
        self.method = obj.get("method")
        self.reason = obj.get("method_reason")
        self.cg = obj.get("cg")
        self.lowrank = obj.get("lowrank")
        self.sigma = obj.get("sigma")
        self.path = obj.get("path")
        self.num_params = obj.get("num_params")
        self.num_train = obj.get("num_train")
        self.damping = obj.get("damping")
        self.posterior_scale = obj.get("posterior_scale")
        self.rollout = obj.get("rollout")
        self.seconds = obj.get("seconds")
        self.calibration = obj.get("calibration")
        pv = obj.get("predictive_variance")
        self.predictive_variance = None if pv is None else np.asarray(pv, dtype=np.float64)
        self.by_layer = None
        if blocks is not None:
            m, nl = len(self.delta_variance), len(layers)
            self.by_layer = {
                "layers": list(layers),
                "blocks": np.frombuffer(blocks, dtype=np.float64).reshape(m, nl, nl),
            }

    @property
    def std(self):
        """sqrt(ΔVar)."""
        return np.sqrt(self.delta_variance)

    def __len__(self):
        return len(self.delta_variance)

    def __repr__(self):
        return (
            f"DeltaVariance(sigma={self.sigma!r}, method={self.method!r}, queries={len(self)}, "
            f"num_params={self.num_params}, num_train={self.num_train})"
        )


class Calibration:
    """Per-layer Σ scales fitted on held-out data (`Model.calibrate`, `deltavar calibrate`):
    ΔVar becomes Σ_l s_l·ΔVar_l (+ beta for the predictive variance). `json` holds the command
    line's object; `path` the file written (pass it as `calibration=` to `delta_variance`)."""

    def __init__(self, obj):
        self.json = obj
        c = obj["calibration"]
        self.scales = np.asarray(c["scales"], dtype=np.float64)
        self.layers = [g["name"] for g in c["groups"]]
        self.beta = c["beta"]
        self.nll = c["nll"]
        self.converged = c["converged"]
        self.nll_one_scale = obj["nll_one_scale"]
        self.path = obj.get("out")

    def __repr__(self):
        return f"Calibration(layers={len(self.layers)}, nll={self.nll:.6g}, nll_one_scale={self.nll_one_scale:.6g})"


class Model:
    """A trained model on deltavar's native engine: an ONNX graph (any PyTorch model, exported
    by `from_torch` or `scripts/export_torch.py --onnx`), or an `nn.Sequential` / MLP state dict
    (`from_safetensors`).

    `dtype` is the precision of the forward and backward passes ("f32" or "f64"); Fisher sums
    and solves are always float64. `batch_size` is the examples per batch (default 256 for an
    MLP and for a graph whose weights are each read once per example, 32 for other graphs)."""

    def __init__(self, native, batch_size=None):
        self._native = native
        self.batch_size = batch_size

    @classmethod
    def from_onnx(cls, path, weights=None, dtype="f32", batch_size=None) -> "Model":
        """An ONNX file; `weights` (safetensors) is the source of truth of its parameters,
        checked against the graph (without it, the file's own initializers)."""
        w = None if weights is None else os.fspath(weights)
        return cls(_native.NativeModel(f"onnx:{os.fspath(path)}", w, "", None, dtype), batch_size)

    @classmethod
    def from_safetensors(cls, path, arch, prefix="", layer_names=None, dtype="f32", batch_size=None) -> "Model":
        """A state dict with its architecture: `mlp:IN,H,...,OUT:ACT` or `seq:LAYER,...` (the
        strings of the command line's `--arch`; `scripts/export_torch.py` writes them)."""
        names = None if layer_names is None else list(layer_names)
        return cls(_native.NativeModel(arch, os.fspath(path), prefix, names, dtype), batch_size)

    @classmethod
    def from_torch(cls, module, example_input, path=None, dtype="f32", batch_size=None) -> "Model":
        """Any torch `nn.Module`: exported to ONNX with every parameter kept under its
        state-dict name (the checked recipe of `scripts/export_torch.py --onnx`,
        `deltavar_rs.export_torch.export_onnx`), then loaded. `example_input` is a batch of at
        least 2 examples; `path` where to write `path.onnx` and `path.safetensors` (default a
        new temporary folder). Needs torch, onnx, onnxscript and safetensors (the extra
        `deltavar-rs[torch]`); without them an ImportError says which are missing."""
        import importlib.util
        import tempfile

        missing = [m for m in ("torch", "onnx", "onnxscript", "safetensors") if importlib.util.find_spec(m) is None]
        if missing:
            raise ImportError(
                "Model.from_torch needs torch, onnx, onnxscript and safetensors; missing: "
                + ", ".join(missing) + " (pip install " + " ".join(missing) + ")"
            )
        import torch

        from .export_torch import export_onnx

        if not isinstance(example_input, torch.Tensor):
            example_input = torch.as_tensor(np.asarray(example_input))
        if path is None:
            path = os.path.join(tempfile.mkdtemp(prefix="deltavar_rs-"), "model")
        path = os.fspath(path)
        export_onnx(module, example_input, path)
        stem = path[:-5] if path.endswith(".onnx") else path
        return cls.from_onnx(stem + ".onnx", stem + ".safetensors", dtype=dtype, batch_size=batch_size)

    @property
    def arch(self) -> str:
        """The architecture string (`onnx:PATH`, `seq:...`, `mlp:...`)."""
        return self._native.arch

    def parameters(self, input_shape) -> dict:
        """{name: shape} of the parameters, in flat order, of the model built for examples of
        `input_shape` (one example's shape, without the batch axis)."""
        _, names, shapes = self._native.parameters([int(d) for d in input_shape])
        return {n: tuple(s) for n, s in zip(names, shapes)}

    def num_params(self, input_shape) -> int:
        """P, for examples of `input_shape`."""
        return int(self._native.parameters([int(d) for d in input_shape])[0])

    def fisher(self, x, y, likelihood="categorical", kind="diag", batch_size=None, shard=None,
               memory_budget=None, progress=True) -> Fisher:
        """An offline Fisher pass over (x, y) (`deltavar fim`): `likelihood` "categorical"
        (y: int class labels) or "gaussian[:SIGMA]" (y: float targets); `kind` "diag" or
        "dense"; `shard` "I/N" for one shard of N (merge them with `Fisher.merge`)."""
        f = self._native.fisher(
            _array(x, "x"), _array(y, "y"), likelihood, kind,
            _count(batch_size if batch_size is not None else self.batch_size, "batch_size"),
            shard, _count(memory_budget, "memory_budget"), _progress(progress, "fisher"),
        )
        return Fisher(f)

    def _options(self, qoi, sigma, fisher, likelihood, damping, method, posterior_scale, rollout,
                 kernel_precision, cg_tol, cg_max_iter, cg_preconditioner, memory_budget,
                 calibration, batch_size, by_layer, progress, desc):
        x = y = saved = None
        if isinstance(fisher, Fisher):
            saved = fisher._native
        elif isinstance(fisher, (tuple, list)):
            if len(fisher) != 2:
                raise DeltavarValueError("invalid option fisher = a tuple: give (x, y), the training inputs and targets")
            x, y = _array(fisher[0], "x"), _array(fisher[1], "y")
        elif fisher is not None:
            raise DeltavarValueError(
                "invalid option fisher = " + type(fisher).__name__
                + ": give a Fisher (model.fisher(...), Fisher.load(path)) or (x, y)"
            )
        if not isinstance(sigma, str):
            sigma = np.ascontiguousarray(np.asarray(sigma, dtype=np.float64))
        return {
            "qoi": qoi,
            "sigma": sigma,
            "fisher": saved,
            "x": x,
            "y": y,
            "likelihood": likelihood,
            "damping": float(damping),
            "method": method,
            "posterior_scale": bool(posterior_scale),
            "rollout": _count(rollout, "rollout"),
            "kernel_precision": kernel_precision,
            "cg_tol": float(cg_tol),
            "cg_max_iter": _count(cg_max_iter, "cg_max_iter"),
            "cg_preconditioner": cg_preconditioner,
            "memory_budget": _count(memory_budget, "memory_budget"),
            "calibration": None if calibration is None else os.fspath(getattr(calibration, "path", None) or calibration),
            "batch_size": _count(batch_size if batch_size is not None else self.batch_size, "batch_size"),
            "split": bool(by_layer),
            "progress": _progress(progress, desc),
        }

    def delta_variance(self, queries, qoi="sum", sigma="full-fim", fisher=None, likelihood="categorical",
                       damping=1e-5, method="auto", posterior_scale=False, rollout=1, *,
                       kernel_precision="auto", cg_tol=1e-10, cg_max_iter=2000, cg_preconditioner="nystrom",
                       memory_budget=None, calibration=None, batch_size=None, by_layer=False,
                       progress=True) -> DeltaVariance:
        """ΔVar of the QoI at each query (`deltavar variance`).

        qoi: "sum" | "output:K" | "prob:K" | "outputs" (every output: the K×K covariance per
        query). sigma: "identity" | "diag-fim" | "full-fim" | "kfac" | "lowrank:K" |
        "lowrank:K:nodiag", or an array (a 1-D diagonal Σ or a P×P matrix). fisher: a `Fisher`
        or the training data (x, y) with their `likelihood` ("categorical" or
        "gaussian[:SIGMA]"). damping: λ. method (full-fim): "auto" | "dense" | "kernel" |
        "kernel-cg" | "cg". posterior_scale: Σ divided by N (the paper's F⁻¹/N). rollout: the
        QoI after that many applications of a step model. calibration: a `Calibration` or its
        file (per-layer scales). by_layer: also split ΔVar by layer. memory_budget: bytes for
        dense work (default 80% of the available memory)."""
        o = self._options(qoi, sigma, fisher, likelihood, damping, method, posterior_scale, rollout,
                          kernel_precision, cg_tol, cg_max_iter, cg_preconditioner, memory_budget,
                          calibration, batch_size, by_layer, progress, "delta variance")
        text, blocks, layers = self._native.delta_variance(_array(queries, "queries"), o)
        return DeltaVariance(json.loads(text), blocks, layers)

    def calibrate(self, val_x, val_y, qoi="sum", sigma="full-fim", fisher=None, likelihood="categorical",
                  damping=1e-5, method="auto", posterior_scale=False, rollout=1, *, out=None,
                  kernel_precision="auto", cg_tol=1e-10, cg_max_iter=2000, cg_preconditioner="nystrom",
                  memory_budget=None, batch_size=None, progress=True) -> Calibration:
        """Per-layer Σ scales fitted on held-out data (`deltavar calibrate`): ΔVar at `val_x`
        split by layer, scored against the errors of the QoI at the targets `val_y` by the
        Gaussian likelihood. `out`: where to write the scales (JSON) for
        `delta_variance(calibration=...)`. The other options are `delta_variance`'s."""
        o = self._options(qoi, sigma, fisher, likelihood, damping, method, posterior_scale, rollout,
                          kernel_precision, cg_tol, cg_max_iter, cg_preconditioner, memory_budget,
                          None, batch_size, True, progress, "calibrate")
        if out is None:
            import tempfile

            out = os.path.join(tempfile.mkdtemp(prefix="deltavar_rs-"), "calibration.json")
        text = self._native.calibrate(_array(val_x, "val_x"), _array(val_y, "val_y"), o, os.fspath(out))
        return Calibration(json.loads(text))

    def evaluate(self, val_x, val_y, qoi="sum", sigma="full-fim", fisher=None, likelihood="categorical",
                 damping=1e-5, method="auto", posterior_scale=False, rollout=1, *, calibration=None,
                 kernel_precision="auto", cg_tol=1e-10, cg_max_iter=2000, cg_preconditioner="nystrom",
                 memory_budget=None, batch_size=None, progress=True) -> dict:
        """ΔVar at held-out inputs against the errors of the QoI at the targets `val_y`
        (`deltavar evaluate`, without the plot): the metrics of `metrics`, plus "errors" and
        "delta_variance" arrays."""
        o = self._options(qoi, sigma, fisher, likelihood, damping, method, posterior_scale, rollout,
                          kernel_precision, cg_tol, cg_max_iter, cg_preconditioner, memory_budget,
                          calibration, batch_size, False, progress, "evaluate")
        text, errors, variances = self._native.evaluate(_array(val_x, "val_x"), _array(val_y, "val_y"), o)
        m = json.loads(text)
        m["errors"] = np.asarray(errors)
        m["delta_variance"] = np.asarray(variances)
        return m

    def __repr__(self):
        return f"Model({self.arch!r})"


def metrics(errors, variances) -> dict:
    """How well variances rank and size held-out errors (`deltavar metrics`): Pearson of |e| and
    sqrt(v), Spearman of |e| and v, the removal curve's AUC (and the oracle's), and the fitted
    Gaussian α·v + β with its mean NLL."""
    e = np.asarray(errors, dtype=np.float64).ravel()
    v = np.asarray(variances, dtype=np.float64).ravel()
    return json.loads(_native.metrics(e.tolist(), v.tolist()))


def calibrate(model, val_x, val_y, **options) -> Calibration:
    """`model.calibrate(val_x, val_y, **options)`."""
    return model.calibrate(val_x, val_y, **options)
