#!/usr/bin/env bash
# Expert look-ahead benchmark (issue 26): a synthetic SHAPE (mixtral-8x7b by default; bf16,
# LAYERS layers, one GGUF file) with random routing and with correlated routing (`synth
# --routing correlated`, the stand-in for real routing), each run with look-ahead off and on
# in alternating order, ROUNDS times, at a budget whose expert cache has its two working slots
# only (a cold cache), in a memory cgroup with the page cache dropped before each run. Prints
# one JSON line per run (kept in $WORK/results.jsonl), then a table of decode s/token against
# the disk's bound (bytes read / raw bandwidth measured in the same run) and the precision.
# A routing trace of each model is written to $WORK/trace-<routing>.jsonl for
# bench/expert_policy.py.
#
# usage: bench/lookahead.sh      (root is needed for the cgroup and for dropping caches)
# env:   SHAPE (mixtral-8x7b), LAYERS (4), GEN (8), PROMPT_LEN (16), BUDGET_MIB (1152),
#        CAP_MIB (1664), ROUNDS (2), ROUTINGS ("random correlated"), WORK (/tmp/airllm-lookahead)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHAPE=${SHAPE:-mixtral-8x7b}
LAYERS=${LAYERS:-4}
GEN=${GEN:-8}
PROMPT_LEN=${PROMPT_LEN:-16}
BUDGET_MIB=${BUDGET_MIB:-1152}
CAP_MIB=${CAP_MIB:-1664}
ROUNDS=${ROUNDS:-2}
ROUTINGS=${ROUTINGS:-random correlated}
WORK=${WORK:-/tmp/airllm-lookahead}
PY=python3
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$CARGO_TARGET_DIR/release/airllm

(cd "$ROOT" && cargo build --release -q -p airllm-cli)
mkdir -p "$WORK"
RESULTS=$WORK/results.jsonl
: > "$RESULTS"
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

for routing in $ROUTINGS; do
  GGUF=$WORK/$SHAPE-${LAYERS}l-$routing.gguf
  if [ ! -f "$GGUF" ]; then
    "$BIN" synth --shape "$SHAPE" --layers "$LAYERS" --dtype bf16 --routing "$routing" \
      --out "$WORK/hf-$routing" --gguf "$GGUF"
    rm -rf "$WORK/hf-$routing"
  fi
  OURS=("$BIN" bench -m "$GGUF" --prompt-len "$PROMPT_LEN" --gen "$GEN" --raw-bytes 2GiB --json
    --max-memory "${BUDGET_MIB}MiB")
  for round in $(seq "$ROUNDS"); do
    # Alternate which goes first, so a drift of the disk's speed favours neither.
    if [ $((round % 2)) = 1 ]; then order="off on"; else order="on off"; fi
    for la in $order; do
      flag=(); [ "$la" = off ] && flag=(--no-expert-lookahead)
      run "$routing routing, look-ahead $la" "$CAP_MIB" "${OURS[@]}" "${flag[@]}"
    done
  done
    # A routing trace for the cache-policy comparison, with the model resident (only the
  # routing matters here).
  "$BIN" run -m "$GGUF" --max-memory 16GiB -n 64 --temperature 0 \
    --trace-experts "$WORK/trace-$routing.jsonl" -p "The history of the printing press" \
    > /dev/null 2>&1 || echo "trace run failed" >&2
done

"$PY" - "$RESULTS" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print("| run | decode s/token | disk bound s/token | ratio | bytes/token | raw GB/s | precision | read ahead / wasted per token |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    if "failed" in r:
        print(f"| {r['name']} | failed: {r['failed']} |")
        continue
    d = r.get("decode_s_per_token") or 0
    bpt = r.get("bytes_read_per_token") or 0
    raw = r.get("raw_read_bandwidth") or 1
    bound = r.get("disk_bound_s_per_token") or 0
    p = r.get("lookahead_precision")
    print(f"| {r['name']} | {d:.3f} | {bound:.3f} | {d / bound if bound else 0:.3f} | "
          f"{bpt / 2**20:.0f} MiB | {raw / 1e9:.2f} | {'-' if p is None else f'{p:.1%}'} | "
          f"{(r.get('lookahead_bytes_read_per_token') or 0) / 2**20:.0f} / "
          f"{(r.get('lookahead_bytes_wasted_per_token') or 0) / 2**20:.0f} MiB |")
PYEOF
