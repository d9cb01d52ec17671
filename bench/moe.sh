#!/usr/bin/env bash
# Mixture-of-experts benchmark: a synthetic model of SHAPE (mixtral-8x7b by default; bf16, LAYERS
# layers) as one GGUF file, run by this project at two budgets below its size (the minimum, where the expert
# cache has only its two working slots, and BUDGET_MIB, where it holds more) and by llama.cpp, all
# in the same memory cgroup with the page cache dropped before each run. Prints one JSON line per
# run (and keeps them in $WORK/results.jsonl).
#
# usage: bench/moe.sh            (root is needed for the cgroup and for dropping caches)
# env:   SHAPE (mixtral-8x7b, or qwen3-30b-a3b), LAYERS (4), GEN (8), PROMPT_LEN (16), CAP_MIB (4608), BUDGET_MIB (4096),
#        MIN_MIB (1280), WORK (/tmp/airllm-moe), LLAMA_PY (a Python with llama-cpp-python,
#        default bench/.venv-peers/bin/python as bench/compare.sh makes it)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHAPE=${SHAPE:-mixtral-8x7b}
LAYERS=${LAYERS:-4}
GEN=${GEN:-8}
PROMPT_LEN=${PROMPT_LEN:-16}
CAP_MIB=${CAP_MIB:-4608}
BUDGET_MIB=${BUDGET_MIB:-4096}
MIN_MIB=${MIN_MIB:-1280}
WORK=${WORK:-/tmp/airllm-moe}
PY=${LLAMA_PY:-$ROOT/bench/.venv-peers/bin/python}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$CARGO_TARGET_DIR/release/airllm
PROMPT="The history of the printing press begins in the fifteenth century, when"

(cd "$ROOT" && cargo build --release -q)
mkdir -p "$WORK"
GGUF=$WORK/$SHAPE-${LAYERS}l-bf16.gguf
if [ ! -f "$GGUF" ]; then
  "$BIN" synth --shape "$SHAPE" --layers "$LAYERS" --dtype bf16 --out "$WORK/hf" --gguf "$GGUF"
  rm -rf "$WORK/hf"
fi
RESULTS=$WORK/results.jsonl
: > "$RESULTS"
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

OURS=("$BIN" bench -m "$GGUF" --prompt-len "$PROMPT_LEN" --gen "$GEN" --raw-bytes 2GiB --json)
run "airllm-rs, ${MIN_MIB} MiB (cold expert cache)" "$CAP_MIB" "${OURS[@]}" --max-memory "${MIN_MIB}MiB"
run "airllm-rs, ${BUDGET_MIB} MiB" "$CAP_MIB" "${OURS[@]}" --max-memory "${BUDGET_MIB}MiB"
run "llama.cpp" "$CAP_MIB" "$PY" "$ROOT/bench/peers.py" llamacpp --model "$GGUF" --prompt "$PROMPT" --gen "$GEN"
cat "$RESULTS"
