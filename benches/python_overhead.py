#!/usr/bin/env python3
"""The Python package's overhead over the CLI's in-process time, same machine, interleaved runs.

For W-diag (784-256-256-10 MLP, N = 8,192, diagonal Fisher pass) and W-cnn (the peers' LeNet,
N = 8,192, diagonal Fisher pass; as `seq:` and as ONNX) it times, round after round:

  * the CLI: `deltavar fim ... --json`, its own "seconds" (in-process: loading, the pass, saving);
  * the package on the same .npy files (memory-mapped, as the CLI reads them): a new `Model`,
    `model.fisher(...)` and `save`, timed together (the model's weights are read inside, as the
    CLI's time includes them);
  * the same on NumPy arrays already in memory (one copy into the library).

and prints medians and ratios. Needs the workloads of benches/peers.py (`--dir`, default
/tmp/dv-workloads), the release binary (`cargo build --release`) and the package installed
(`maturin develop --release -m python/Cargo.toml` or the wheel).

    python benches/python_overhead.py --rounds 7
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

import deltavar_rs as dv

CNN_SEQ = ("seq:conv2d(1,16,5,padding=2),relu,maxpool2d(2),conv2d(16,32,5,padding=2),relu,maxpool2d(2),"
           "flatten,linear(1568,128),relu,linear(128,10)")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/dv-workloads")
    ap.add_argument("--bin", default=os.path.join(os.path.dirname(__file__), "..", "target", "release", "deltavar"))
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args()
    out = tempfile.mkdtemp(prefix="dv-py-overhead-")
    work = {
        "W-diag (mlp:)": (os.path.join(a.dir, "diag"), "mlp:784,256,256,10:relu", None),
        "W-cnn (seq:)": (os.path.join(a.dir, "cnn"), CNN_SEQ, None),
        "W-cnn (onnx:)": (os.path.join(a.dir, "cnn"), None, "model.onnx"),
    }
    rows = []
    for name, (d, arch, onnx) in work.items():
        w = os.path.join(d, "model.safetensors")
        xp, yp = os.path.join(d, "train_x.npy"), os.path.join(d, "train_y.npy")
        arch_s = f"onnx:{os.path.join(d, onnx)}" if onnx else arch

        def load():
            # a new model each time: its engine is built (weights read) inside the timed call,
            # as the CLI's in-process time includes loading
            if onnx:
                return dv.Model.from_onnx(os.path.join(d, onnx), weights=w)
            return dv.Model.from_safetensors(w, arch)
        x, y = np.load(xp), np.load(yp)
        cli, py_files, py_arrays = [], [], []
        for r in range(a.rounds + 1):  # round 0 warms the caches
            f = os.path.join(out, "cli.fim")
            o = subprocess.run([a.bin, "fim", "--arch", arch_s, "--weights", w, "--train-x", xp, "--train-y", yp,
                                "--likelihood", "categorical", "--out", f, "--json"],
                               capture_output=True, text=True, check=True)
            c = json.loads(o.stdout)["seconds"]
            t0 = time.perf_counter()
            fi = load().fisher(xp, yp, likelihood="categorical", progress=False)
            fi.save(os.path.join(out, "py.fim"))
            pf = time.perf_counter() - t0
            t0 = time.perf_counter()
            fa = load().fisher(x, y, likelihood="categorical", progress=False)
            fa.save(os.path.join(out, "pya.fim"))
            pa = time.perf_counter() - t0
            if r == 0:
                a_diag = dv.Fisher.load(f).diagonal
                for k, v in fi.diagonal.items():
                    assert np.array_equal(v, a_diag[k]), k
                    assert np.array_equal(v, fa.diagonal[k]), k
                continue
            cli.append(c)
            py_files.append(pf)
            py_arrays.append(pa)
        mc, mf, ma = (statistics.median(v) for v in (cli, py_files, py_arrays))
        rows.append((name, mc, mf, ma))
        print(f"{name}: CLI in-process {mc:.4f} s | package on the files {mf:.4f} s ({mf / mc:.3f}x) | "
              f"package on arrays {ma:.4f} s ({ma / mc:.3f}x)  [medians of {a.rounds}; "
              f"CLI {min(cli):.4f}-{max(cli):.4f}, files {min(py_files):.4f}-{max(py_files):.4f}, "
              f"arrays {min(py_arrays):.4f}-{max(py_arrays):.4f}]", flush=True)
    print("identical Fisher diagonals (CLI file vs package, files and arrays): yes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
