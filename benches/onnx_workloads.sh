#!/usr/bin/env bash
# The graph engine on the peers' ONNX workloads (W-cnn, W-transformer, W-resnet, W-gpt, W-gnn):
# the diagonal empirical Fisher through the CLI, loading included, as the peers are timed
# (`../shared/bench/peers.py`), and the exact full-Fisher ΔVar (kernel) of W-gpt and W-resnet at
# their 256 queries. Prints one line per run: workload, seconds, peak RSS.
#
#   /tmp/peers-venv/bin/python ../shared/bench/peers.py /tmp/dv-workloads cnn transformer resnet gpt gnn
#   cargo build --release
#   bash benches/onnx_workloads.sh /tmp/dv-workloads [ROUNDS] [--kernel]
#
# Run the peers and this script one after the other on a quiet machine and quote ratios from the
# same session (the machine's speed drifts by 10-20% between sessions).
set -euo pipefail
dir=${1:?usage: onnx_workloads.sh WORKLOADS_DIR [ROUNDS] [--kernel]}
rounds=${2:-3}
kernel=${3:-}
bin=$(dirname "$0")/../target/release/deltavar
[ -x "$bin" ] || { echo "build first: cargo build --release" >&2; exit 1; }
lik() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['lik'])" "$1/case.json"; }
for r in $(seq "$rounds"); do
  for w in cnn transformer resnet gpt gnn; do
    d=$dir/$w
    /usr/bin/time -f "$w fim(diag) round $r: %e s, peak RSS %M KB" "$bin" fim \
      --arch "onnx:$d/model.onnx" --weights "$d/model.safetensors" \
      --train-x "$d/train_x.npy" --train-y "$d/train_y.npy" --likelihood "$(lik "$d")" \
      --out "/tmp/onnx-bench-$w.fim" --json > /dev/null
  done
done
if [ "$kernel" = "--kernel" ]; then
  for w in gpt resnet; do
    d=$dir/$w
    /usr/bin/time -f "$w variance full-fim kernel, 256 queries: %e s, peak RSS %M KB" "$bin" variance \
      --arch "onnx:$d/model.onnx" --weights "$d/model.safetensors" \
      --train-x "$d/train_x.npy" --train-y "$d/train_y.npy" --likelihood "$(lik "$d")" \
      --queries "$d/queries.npy" --qoi prob:3 --sigma full-fim --method kernel --damping 1e-3 --json > /dev/null
  done
fi
