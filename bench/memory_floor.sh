#!/usr/bin/env bash
# The memory-floor benchmarks (issue 9): a 70B-shaped bf16 model of 4 layers under a 1 GiB budget
# in a 1.5 GiB memory cgroup, a 16-layer 1.4 GB bf16 model under 256 MiB in a 768 MiB cgroup,
# greedy tokens against a large budget, and the reported minimums. Each bench prints the raw
# disk bandwidth measured in the same run. Needs root (cgroups, dropping the page cache) and
# about 13 GB of disk in $WORK.
#
# usage: bench/memory_floor.sh        env: WORK (/tmp/airllm-floor), ROUNDS (2)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-/tmp/airllm-floor}
ROUNDS=${ROUNDS:-2}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$CARGO_TARGET_DIR/release/airllm
(cd "$ROOT" && cargo build --release -q)
mkdir -p "$WORK"
L70=$WORK/llama70b-4layers
M16=$WORK/llama-16layers
[ -d "$L70" ] || "$BIN" synth --shape llama-70b --layers 4 --out "$L70"
[ -d "$M16" ] || "$BIN" synth --shape tiny --layers 16 --hidden 2048 --intermediate 4096 \
  --heads 16 --kv-heads 4 --vocab 32000 --out "$M16"
drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }

echo "== reported minimums"
"$BIN" inspect -m "$L70" --max-memory 1TiB | grep -E "^plan|layers:"
"$BIN" inspect -m "$L70" --max-memory 1TiB -c 512 -b 64 | grep -E "^plan"
"$BIN" inspect -m "$M16" --max-memory 1TiB | grep -E "^plan"

greedy() { "$BIN" run -m "$1" -p "The capital of France is" -n 6 --temperature 0 --ignore-eos --json "${@:2}" 2>/dev/null | tail -1; }
echo "== greedy tokens, streamed against resident"
for m in "$L70" "$M16"; do
  budget=1GiB; cap=1536
  [ "$m" = "$M16" ] && { budget=256MiB; cap=768; }
  drop
  a=$("$ROOT/bench/cgroup_run.sh" "$cap" "$BIN" run -m "$m" -p "The capital of France is" -n 6 \
      --temperature 0 --ignore-eos --json --max-memory "$budget" 2>/dev/null | tail -1)
  b=$(greedy "$m" --max-memory 16GiB)
  ta=$(echo "$a" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token_ids"])')
  tb=$(echo "$b" | python3 -c 'import json,sys; print(json.load(sys.stdin)["token_ids"])')
  echo "$(basename "$m"): $budget $ta, 16GiB $tb: $([ "$ta" = "$tb" ] && echo identical || echo DIFFERENT)"
done

echo "== streaming speed and memory"
for r in $(seq "$ROUNDS"); do
  drop
  "$ROOT/bench/cgroup_run.sh" 1536 "$BIN" bench -m "$L70" --max-memory 1GiB --gen 4 --prompt-len 8 \
    --raw-bytes 4GiB --json
  drop
  "$ROOT/bench/cgroup_run.sh" 768 "$BIN" bench -m "$M16" --max-memory 256MiB --gen 8 --prompt-len 8 \
    --raw-bytes 1GiB --json
done
