"""Type stubs of deltavar_rs (see __init__.py for the documentation)."""

import os
from typing import Any, Literal, Sequence

import numpy as np
import numpy.typing as npt

from ._errors import DeltavarError as DeltavarError
from ._errors import DeltavarIOError as DeltavarIOError
from ._errors import DeltavarMemoryError as DeltavarMemoryError
from ._errors import DeltavarValueError as DeltavarValueError

__version__: str
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

_ArrayIn = npt.ArrayLike | str | os.PathLike[str] | Any
"""A NumPy array, a torch tensor, anything with `__array__`, or the path of an .npy file."""

_PathIn = str | os.PathLike[str]

class Fisher:
    def __init__(self, native: Any) -> None: ...
    @classmethod
    def load(cls, path: _PathIn) -> Fisher: ...
    @classmethod
    def merge(cls, parts: Sequence[Fisher]) -> Fisher: ...
    def save(self, path: _PathIn) -> None: ...
    def allow_partial(self) -> Fisher: ...
    @property
    def diagonal(self) -> dict[str, npt.NDArray[np.float64]]: ...
    @property
    def dense(self) -> npt.NDArray[np.float64] | None: ...
    @property
    def param_names(self) -> list[str]: ...
    @property
    def param_shapes(self) -> list[tuple[int, ...]]: ...
    @property
    def num_params(self) -> int: ...
    @property
    def num_examples(self) -> int: ...
    @property
    def kind(self) -> Literal["diag", "dense"]: ...
    @property
    def likelihood(self) -> str: ...
    @property
    def ranges(self) -> list[tuple[int, int]]: ...
    @property
    def complete(self) -> bool: ...

class DeltaVariance:
    def __init__(self, obj: dict[str, Any], blocks: bytes | None = None, layers: Sequence[str] | None = None) -> None: ...
    json: dict[str, Any]
    delta_variance: npt.NDArray[np.float64]
    qoi: npt.NDArray[np.float64]
    covariance: npt.NDArray[np.float64] | None
    method: str | None
    reason: str | None
    cg: dict[str, Any] | None
    lowrank: dict[str, Any] | None
    sigma: str
    path: str | None
    num_params: int
    num_train: int
    damping: float
    posterior_scale: bool
    rollout: int
    seconds: float
    calibration: dict[str, Any] | None
    predictive_variance: npt.NDArray[np.float64] | None
    by_layer: dict[str, Any] | None
    @property
    def std(self) -> npt.NDArray[np.float64]: ...
    def __len__(self) -> int: ...

class Calibration:
    def __init__(self, obj: dict[str, Any]) -> None: ...
    json: dict[str, Any]
    scales: npt.NDArray[np.float64]
    layers: list[str]
    beta: float
    nll: float
    converged: bool
    nll_one_scale: float
    path: str | None

_Sigma = str | npt.ArrayLike
_FisherIn = Fisher | tuple[_ArrayIn, _ArrayIn] | None

class Model:
    batch_size: int | None
    def __init__(self, native: Any, batch_size: int | None = None) -> None: ...
    @classmethod
    def from_onnx(
        cls, path: _PathIn, weights: _PathIn | None = None, dtype: Literal["f32", "f64"] = "f32", batch_size: int | None = None
    ) -> Model: ...
    @classmethod
    def from_safetensors(
        cls,
        path: _PathIn,
        arch: str,
        prefix: str = "",
        layer_names: Sequence[str] | None = None,
        dtype: Literal["f32", "f64"] = "f32",
        batch_size: int | None = None,
    ) -> Model: ...
    @classmethod
    def from_torch(
        cls,
        module: Any,
        example_input: Any,
        path: _PathIn | None = None,
        dtype: Literal["f32", "f64"] = "f32",
        batch_size: int | None = None,
    ) -> Model: ...
    @property
    def arch(self) -> str: ...
    def parameters(self, input_shape: Sequence[int]) -> dict[str, tuple[int, ...]]: ...
    def num_params(self, input_shape: Sequence[int]) -> int: ...
    def fisher(
        self,
        x: _ArrayIn,
        y: _ArrayIn,
        likelihood: str = "categorical",
        kind: Literal["diag", "dense"] = "diag",
        batch_size: int | None = None,
        shard: str | None = None,
        memory_budget: int | None = None,
        progress: bool = True,
    ) -> Fisher: ...
    def delta_variance(
        self,
        queries: _ArrayIn,
        qoi: str = "sum",
        sigma: _Sigma = "full-fim",
        fisher: _FisherIn = None,
        likelihood: str = "categorical",
        damping: float = 1e-5,
        method: Literal["auto", "dense", "kernel", "kernel-cg", "cg"] = "auto",
        posterior_scale: bool = False,
        rollout: int = 1,
        *,
        kernel_precision: Literal["auto", "f64", "mixed"] = "auto",
        cg_tol: float = 1e-10,
        cg_max_iter: int = 2000,
        cg_preconditioner: str = "nystrom",
        memory_budget: int | None = None,
        calibration: Calibration | _PathIn | None = None,
        batch_size: int | None = None,
        by_layer: bool = False,
        progress: bool = True,
    ) -> DeltaVariance: ...
    def calibrate(
        self,
        val_x: _ArrayIn,
        val_y: _ArrayIn,
        qoi: str = "sum",
        sigma: _Sigma = "full-fim",
        fisher: _FisherIn = None,
        likelihood: str = "categorical",
        damping: float = 1e-5,
        method: str = "auto",
        posterior_scale: bool = False,
        rollout: int = 1,
        *,
        out: _PathIn | None = None,
        kernel_precision: str = "auto",
        cg_tol: float = 1e-10,
        cg_max_iter: int = 2000,
        cg_preconditioner: str = "nystrom",
        memory_budget: int | None = None,
        batch_size: int | None = None,
        progress: bool = True,
    ) -> Calibration: ...
    def evaluate(
        self,
        val_x: _ArrayIn,
        val_y: _ArrayIn,
        qoi: str = "sum",
        sigma: _Sigma = "full-fim",
        fisher: _FisherIn = None,
        likelihood: str = "categorical",
        damping: float = 1e-5,
        method: str = "auto",
        posterior_scale: bool = False,
        rollout: int = 1,
        *,
        calibration: Calibration | _PathIn | None = None,
        kernel_precision: str = "auto",
        cg_tol: float = 1e-10,
        cg_max_iter: int = 2000,
        cg_preconditioner: str = "nystrom",
        memory_budget: int | None = None,
        batch_size: int | None = None,
        progress: bool = True,
    ) -> dict[str, Any]: ...

def metrics(errors: npt.ArrayLike, variances: npt.ArrayLike) -> dict[str, Any]: ...
def calibrate(model: Model, val_x: _ArrayIn, val_y: _ArrayIn, **options: Any) -> Calibration: ...
