#!/usr/bin/env bash
# W-transformer: the peers (opacus, deltavar 0.1.1, the torch epoch) and this crate's Fisher pass
# interleaved round by round, so that every ratio comes from one round on one machine (the
# machine's speed drifts by 10-30% within minutes). Prints the peers' JSON lines, then one line
# per binary: the fastest of REPEAT passes in one process (`tiny_transformer --repeat`).
#
#   cargo build --release --example tiny_transformer
#   bash benches/transformer_vs_opacus.sh /tmp/dv-workloads [ROUNDS] [REPEAT] [BINARY ...]
#
# BINARY defaults to target/release/examples/tiny_transformer; give two (say a copy built at an
# earlier commit, then this one) for a before/after in the same rounds. The peers rewrite their
# workload under WORKLOADS_DIR-peers (same seed, same data) so that the timed one stays put.
set -euo pipefail
dir=${1:?usage: transformer_vs_opacus.sh WORKLOADS_DIR [ROUNDS] [REPEAT] [BINARY ...]}
rounds=${2:-5}
repeat=${3:-5}
shift $(( $# < 3 ? $# : 3 ))
bins=("$@")
[ ${#bins[@]} -gt 0 ] || bins=("$(dirname "$0")/../target/release/examples/tiny_transformer")
py=${PEERS_PYTHON:-/tmp/peers-venv/bin/python}
export MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=536870912 MALLOC_ARENA_MAX=1
for r in $(seq "$rounds"); do
  echo "== round $r"
  THREADS=2 "$py" "$(dirname "$0")/../../shared/bench/peers.py" "$dir-peers" transformer 2>/dev/null \
    | grep '"seconds"' || true
  for b in "${bins[@]}"; do
    s=$("$b" --dir "$dir/transformer" --batch-size 16 --repeat "$repeat" --json \
      | python3 -c "import json,sys; print(json.load(sys.stdin)['seconds'])")
    echo "$b: $s s"
  done
done
