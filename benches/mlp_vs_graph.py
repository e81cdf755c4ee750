"""An MLP written `--arch mlp:` against the same MLP written `--arch seq:...` (both on the graph
engine since the MLP engine was retired), through the CLI on the peers' MLP workloads (W-diag,
W-queries, W-full, W-cg), interleaved; with BASE_BINARY (say a build of cbdc73f, the last commit
with the MLP engine, whose `mlp:` runs it) the retirement's before and after.

    THREADS=2 /tmp/peers-venv/bin/python ../shared/bench/peers.py /tmp/dv-workloads diag queries full cg
    cargo build --release --bin deltavar
    python3 benches/mlp_vs_graph.py /tmp/dv-workloads diag,queries 15 [BASE_BINARY]
    python3 benches/mlp_vs_graph.py /tmp/dv-workloads full,cg 2 [BASE_BINARY]

Prints per workload the median and fastest wall time of each (binary, engine), the per-round
median ratios (seq/mlp; this binary/BASE_BINARY when given) and the largest relative ΔVar
difference against the first binary's `mlp:` run. Only the standard library is needed.
"""
import json
import statistics as st
import subprocess
import sys
import time

W = sys.argv[1]
WORKLOADS = sys.argv[2].split(",")
ROUNDS = int(sys.argv[3])
BINS = {"new": "target/release/deltavar"}
if len(sys.argv) > 4:
    BINS = {"base": sys.argv[4], **BINS}
ARCH = {
    "mlp": ("mlp:784,256,256,10:relu", "mlp:16,64,64,1:tanh"),
    "seq": (
        "seq:linear(784,256),relu,linear(256,256),relu,linear(256,10)",
        "seq:linear(16,64),tanh,linear(64,64),tanh,linear(64,1)",
    ),
}


def cmd(binary, engine, w):
    big, small = ARCH[engine]
    data = [f"--weights={W}/{w}/model.safetensors", f"--train-x={W}/{w}/train_x.npy",
            f"--train-y={W}/{w}/train_y.npy", "--json"]
    if w == "diag":
        return [binary, "fim", "--arch", big, "--likelihood", "categorical",
                "--out", "/tmp/mlp_vs_graph.fim", *data]
    query = [f"--queries={W}/{w}/queries.npy", "--damping", "1e-3"]
    if w == "queries":
        return [binary, "variance", "--arch", big, "--likelihood", "categorical", "--qoi",
                "output:3", "--sigma", "diag-fim", *query, *data]
    if w == "full":
        return [binary, "variance", "--arch", small, "--likelihood", "gaussian", "--qoi", "sum",
                "--sigma", "full-fim", "--method", "kernel", *query, *data]
    return [binary, "variance", "--arch", big, "--likelihood", "categorical", "--qoi",
            "output:3", "--sigma", "full-fim", "--method", "kernel", *query, *data]


times, outs = {}, {}
for _ in range(ROUNDS):
    for w in WORKLOADS:
        for b, binary in BINS.items():
            for e in ARCH:
                t = time.perf_counter()
                p = subprocess.run(cmd(binary, e, w), capture_output=True, check=True, text=True)
                times.setdefault((w, b, e), []).append(time.perf_counter() - t)
                outs[(w, b, e)] = p.stdout


def ratio(x, y):
    return st.median(a / b for a, b in zip(times[x], times[y]))


for w in WORKLOADS:
    cells = [f"{b}/{e} median {st.median(times[(w, b, e)]):.4f} s, fastest {min(times[(w, b, e)]):.4f} s"
             for b in BINS for e in ARCH]
    print(f"{w}: " + " | ".join(cells))
    for b in BINS:
        print(f"   {b}: seq/mlp {ratio((w, b, 'seq'), (w, b, 'mlp')):.3f}")
    if "base" in BINS:
        for e in ARCH:
            print(f"   {e}: new/base {ratio((w, 'new', e), (w, 'base', e)):.3f}")
    if w != "diag":
        ref = json.loads(outs[(w, next(iter(BINS)), "mlp")])["delta_variance"]
        for b in BINS:
            for e in ARCH:
                d = json.loads(outs[(w, b, e)])["delta_variance"]
                err = max(abs(x - y) / abs(y) for x, y in zip(d, ref))
                print(f"   {b}/{e}: max relative ΔVar difference {err:.2e}")
