#!/usr/bin/env bash
# Side-by-side benchmark of this project, AirLLM and llama.cpp on the same synthetic model, the
# same prompt and number of new tokens, inside the same memory cgroup (page cache included).
# Writes docs/compare.md (table, machine, commands) and docs/compare.png (chart).
#
# usage: bench/compare.sh            (root is needed for the cgroup and for dropping caches)
# env:   CAP_MIB (1536), GEN (8), LAYERS (40), HIDDEN (2048), INTERMEDIATE (5632), HEADS (16),
#        VOCAB (32000), WORK (/tmp/airllm-compare), PEERS_VENV (bench/.venv-peers: created and
#        filled from bench/requirements-peers.txt when it lacks the peers)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
CAP_MIB=${CAP_MIB:-1536}
GEN=${GEN:-8}
LAYERS=${LAYERS:-40}
HIDDEN=${HIDDEN:-2048}
INTERMEDIATE=${INTERMEDIATE:-5632}
HEADS=${HEADS:-16}
VOCAB=${VOCAB:-32000}
WORK=${WORK:-/tmp/airllm-compare}
VENV=${PEERS_VENV:-$ROOT/bench/.venv-peers}
PROMPT="The history of the printing press begins in the fifteenth century, when"
OUR_BUDGET_MIB=$((CAP_MIB - 320))
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$CARGO_TARGET_DIR/release/airllm

(cd "$ROOT" && cargo build --release -q)
if ! "$VENV/bin/python" -c "import airllm, llama_cpp, matplotlib" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q -r "$ROOT/bench/requirements-peers.txt"
fi
PY=$VENV/bin/python

mkdir -p "$WORK"
MODEL=$WORK/model
GGUF=$WORK/model-bf16.gguf
[ -d "$MODEL" ] || "$BIN" synth --shape tiny --layers "$LAYERS" --hidden "$HIDDEN" --gguf "$GGUF" \
  --intermediate "$INTERMEDIATE" --heads "$HEADS" --kv-heads "$HEADS" --vocab "$VOCAB" \
  --dtype bf16 --out "$MODEL"
[ -f "$GGUF" ] || "$BIN" convert -m "$MODEL" -q bf16 -o "$GGUF"
RESULTS=$WORK/results.jsonl
: > "$RESULTS"
# The prompt length in tokens, for `airllm bench`, which feeds that many token ids.
PLEN=$("$PY" -c "
import json,sys
from tokenizers import Tokenizer
print(len(Tokenizer.from_file('$MODEL/tokenizer.json').encode(sys.argv[1]).ids))" "$PROMPT")

# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

OURS=("$BIN" bench -m "$MODEL" --prompt-len "$PLEN" --gen "$GEN" --raw-bytes 2GiB --json)
run "airllm-rs, batch 1" "$CAP_MIB" "${OURS[@]}" --max-memory "${OUR_BUDGET_MIB}MiB"
run "airllm-rs, batch 8" "$CAP_MIB" "${OURS[@]}" --max-memory "${OUR_BUDGET_MIB}MiB" --batch 8
run "airllm-rs --f16, batch 1" "$CAP_MIB" "${OURS[@]}" --max-memory "${OUR_BUDGET_MIB}MiB" --f16
run "llama.cpp" "$CAP_MIB" "$PY" "$ROOT/bench/peers.py" llamacpp --model "$GGUF" --prompt "$PROMPT" --gen "$GEN"
rm -rf "$WORK/airllm-shards"
run "AirLLM" "$CAP_MIB" "$PY" "$ROOT/bench/peers.py" airllm --model "$MODEL" --prompt "$PROMPT" --gen "$GEN" --shards "$WORK/airllm-shards"
rm -rf "$WORK/airllm-shards"
# Fully resident, no cap: the compute speed on the same bf16 weights.
run "airllm-rs, resident" none "${OURS[@]}" --max-memory 16GiB --keep-page-cache
run "airllm-rs --f16, resident" none "${OURS[@]}" --max-memory 16GiB --keep-page-cache --f16
run "llama.cpp, resident" none "$PY" "$ROOT/bench/peers.py" llamacpp --model "$GGUF" --prompt "$PROMPT" --gen "$GEN"

"$PY" "$ROOT/bench/compare_report.py" "$RESULTS" "$ROOT/docs" \
  "bench/compare.sh (CAP_MIB=$CAP_MIB GEN=$GEN LAYERS=$LAYERS HIDDEN=$HIDDEN INTERMEDIATE=$INTERMEDIATE HEADS=$HEADS VOCAB=$VOCAB)" \
  "$(du -sb "$MODEL" | cut -f1)" "$PLEN" "$OUR_BUDGET_MIB"
