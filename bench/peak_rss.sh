#!/usr/bin/env bash
# Peak RSS of a streamed run against its --max-memory budget.
#
# Writes (once) a synthetic bf16 Llama-shaped model several times larger than the budget, runs
# `airllm run` on it under the budget, and reports peak RSS (VmHWM, via /usr/bin/time) against
# budget + 64 MiB, the fixed overhead we allow for the binary, tokenizer and allocator.
#
# usage: bench/peak_rss.sh [BUDGET_MIB=768] [MODEL_DIR=/tmp/airllm-rss-model]
set -euo pipefail
cd "$(dirname "$0")/.."
BUDGET_MIB=${1:-768}
MODEL=${2:-/tmp/airllm-rss-model}
BIN=${AIRLLM_BIN:-target/release/airllm}
OVERHEAD_MIB=64
[ -x "$BIN" ] || cargo build --release -q
if [ ! -d "$MODEL" ]; then
  "$BIN" synth --shape tiny --hidden 2048 --intermediate 5632 --layers 24 --heads 16 --kv-heads 16 \
    --vocab 32000 --dtype bf16 --out "$MODEL"
fi
size=$(du -sb "$MODEL" | cut -f1)
out=$(mktemp)
/usr/bin/time -f "%M" -o "$out.rss" "$BIN" run -m "$MODEL" -p "The quick brown fox jumps over the lazy dog" \
  -n 16 --temperature 0 --ignore-eos --max-memory "${BUDGET_MIB}MiB" --profile >/dev/null 2>"$out"
grep -E "^plan|layers:|bytes read|generated|total per step" "$out" || true
peak_kb=$(tail -1 "$out.rss")
peak_mib=$((peak_kb / 1024))
limit_mib=$((BUDGET_MIB + OVERHEAD_MIB))
echo "model on disk: $((size / 1048576)) MiB; budget: ${BUDGET_MIB} MiB; peak RSS: ${peak_mib} MiB; limit (budget + ${OVERHEAD_MIB} MiB): ${limit_mib} MiB"
rm -f "$out" "$out.rss"
if [ "$peak_mib" -le "$limit_mib" ]; then echo "PASS"; else echo "FAIL"; exit 1; fi
