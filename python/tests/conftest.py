"""Shared pieces of the package's tests: the repository's fixtures and the CLI binary."""

import json
import os
import pathlib
import shutil
import subprocess

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PARITY = ROOT / "tests" / "data" / "deltavar-parity"
GRAPH = ROOT / "tests" / "data" / "graph"
CASES = ["seed-readme-linear-10-1", "seed-mlp-3-5-2-relu", "tanh-4-16-16-3", "cls-6-12-4-tanh"]


class Case:
    """A seed parity fixture (tests/data/deltavar-parity, made with torch by the seed)."""

    def __init__(self, name):
        self.name = name
        self.dir = PARITY / name
        self.meta = json.loads((self.dir / "case.json").read_text())
        self.expected = json.loads((self.dir / "expected.json").read_text())

    @property
    def arch(self):
        return "mlp:" + ",".join(str(s) for s in self.meta["sizes"]) + ":" + self.meta["act"]

    @property
    def likelihood(self):
        if self.meta["lik"] == "gaussian":
            return f"gaussian:{self.meta['sigma']}"
        return "categorical"

    def path(self, f):
        return str(self.dir / f)

    def array(self, f):
        return np.load(self.dir / f)


def parity_tol(case, quantity, method="direct"):
    """The CLI's tolerances against the seed (tests/common/mod.rs `parity_tol`)."""
    if quantity != "inverse_full_empirical_fim":
        return 1e-13
    if case == "seed-readme-linear-10-1" and method == "kernel":
        return 5e-9
    return {"seed-mlp-3-5-2-relu": 5e-10, "tanh-4-16-16-3": 2e-11}.get(case, 5e-13)


def max_rel_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.isfinite(a).all(), a
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


def cli_binary():
    """The `deltavar` binary built beside the package (cargo test --release or cargo build
    --release builds it), or the one on PATH; None when there is none."""
    env = os.environ.get("DELTAVAR_BIN")
    if env:
        return env
    for p in [ROOT / "target" / "release" / "deltavar", ROOT / "target" / "debug" / "deltavar"]:
        if p.exists():
            return str(p)
    return shutil.which("deltavar")


@pytest.fixture
def cli():
    """Runs the CLI with --json and returns its object; skips when no binary was built."""
    b = cli_binary()
    if b is None:
        pytest.skip("no deltavar binary: run `cargo build --release` first")

    def run(*args):
        out = subprocess.run([b, *map(str, args), "--json"], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    return run


@pytest.fixture(params=CASES)
def case(request):
    return Case(request.param)
