#!/usr/bin/env bash
# Compute speed against llama.cpp, in one run: this project (`airllm bench --json`) and
# llama.cpp (the pinned llama-cpp-python, bench/parity_llamacpp.py) on the same prompt ids and
# token counts, on two models:
#   - the default model (Gemma 3 270M Q4_K_M), fetched by scripts/fetch_default_model.sh;
#   - a 7B-shaped synthetic model (`airllm synth --shape llama-7b`, LAYERS layers) converted to
#     Q4_K_M by `airllm convert`.
# Measured, each resident: prefill of a PROMPT_LEN-token prompt, decode of GEN tokens, and a
# batch-8 decode sweep (8 sequences of BATCH_PROMPT_LEN-token prompts). Then ours streamed at
# STREAM_FRACTION of the model's size, batch 1 against batch 8. Prints the ratios and writes
# them, with the machine and the disk's raw read bandwidth from the same run, between the
# parity markers of docs/benchmarks.md.
#
# Environment: LAYERS (8), PROMPT_LEN (400), GEN (64), BATCH_PROMPT_LEN (32), BATCH_GEN (16),
#   STREAM_FRACTION (0.5), WORK (/tmp/airllm-parity), PARITY_VENV (bench/.venv-parity: made on
#   first use, with llama-cpp-python built from source for this CPU), DOCS (1: write the docs).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
LAYERS=${LAYERS:-8}
PROMPT_LEN=${PROMPT_LEN:-400}
GEN=${GEN:-64}
BATCH_PROMPT_LEN=${BATCH_PROMPT_LEN:-32}
BATCH_GEN=${BATCH_GEN:-16}
STREAM_FRACTION=${STREAM_FRACTION:-0.5}
WORK=${WORK:-/tmp/airllm-parity}
VENV=${PARITY_VENV:-$ROOT/bench/.venv-parity}
DOCS=${DOCS:-1}
mkdir -p "$WORK"

# llama.cpp's CPU options for the instruction sets this CPU reports. AMX stays off: a virtual
# machine may report AMX that its kernel has not enabled, and ggml's AMX path then stops with
# SIGILL (it did on the machine of the first run); -march=native would turn it on.
ggml_cpu_args() {
  local f args="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
  f=$(grep -m1 '^flags' /proc/cpuinfo)
  has() { [[ " $f " == *" $1 "* ]]; }
  has avx && args+=" -DGGML_AVX=ON"
  has avx2 && args+=" -DGGML_AVX2=ON"
  has fma && args+=" -DGGML_FMA=ON"
  has f16c && args+=" -DGGML_F16C=ON"
  has avx512f && args+=" -DGGML_AVX512=ON"
  has avx512vbmi && args+=" -DGGML_AVX512_VBMI=ON"
  has avx512_vnni && args+=" -DGGML_AVX512_VNNI=ON"
  has avx512_bf16 && args+=" -DGGML_AVX512_BF16=ON"
  has avx_vnni && args+=" -DGGML_AVX_VNNI=ON"
  echo "$args -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null; then
  echo "parity: making $VENV (llama-cpp-python built for this CPU; 20 minutes on 2 cores)" >&2
  python3 -m venv "$VENV"
  CMAKE_ARGS="$(ggml_cpu_args)" "$VENV/bin/pip" install -q --no-cache-dir \
    --no-binary llama-cpp-python -r "$ROOT/bench/requirements-parity.txt"
fi
PY="$VENV/bin/python"

cargo build --release -q -p airllm-cli
AIRLLM="$ROOT/target/release/airllm"
./scripts/fetch_default_model.sh >&2
DEFAULT="${AIRLLM_HOME:-$HOME/.cache/airllm}/models/gemma-3-270m-q4_k_m.gguf"
SEVEN="$WORK/llama-7b-${LAYERS}l-q4_k_m.gguf"
if [ ! -f "$SEVEN" ]; then
  rm -rf "$WORK/llama-7b-src"
  "$AIRLLM" synth --shape llama-7b --layers "$LAYERS" --out "$WORK/llama-7b-src" >&2
  "$AIRLLM" convert -m "$WORK/llama-7b-src" -q q4_k_m -o "$SEVEN.part" >&2
  mv "$SEVEN.part" "$SEVEN"
  rm -rf "$WORK/llama-7b-src"
fi

RESULTS="$WORK/results.jsonl"
: > "$RESULTS"
# one NAME MODEL PEER args...: runs one measurement and appends its JSON line, tagged.
one() {
  local name=$1 model=$2 peer=$3; shift 3
  local line
  if [ "$peer" = airllm ]; then
    line=$("$AIRLLM" bench -m "$model" --json "$@" 2>/dev/null | tail -1)
  else
    line=$("$PY" "$ROOT/bench/parity_llamacpp.py" "$model" "$@" 2>/dev/null | tail -1)
  fi
  "$PY" -c 'import json,sys; r=json.loads(sys.argv[1]); r.update(case=sys.argv[2], peer=sys.argv[3]); print(json.dumps(r))' \
    "$line" "$name" "$peer" >> "$RESULTS"
  echo "parity: $name $peer done" >&2
}

for M in default seven; do
  [ $M = default ] && F=$DEFAULT || F=$SEVEN
  bytes=$(stat -c %s "$F")
  stream_mib=$("$PY" -c "print(int($bytes * $STREAM_FRACTION / 2**20))")
  one "$M/single" "$F" airllm --prompt-len "$PROMPT_LEN" --gen "$GEN"
  one "$M/single" "$F" llamacpp --prompt-len "$PROMPT_LEN" --gen "$GEN"
  one "$M/batch8" "$F" airllm --prompt-len "$BATCH_PROMPT_LEN" --gen "$BATCH_GEN" --batch 8
  one "$M/batch8" "$F" llamacpp --prompt-len "$BATCH_PROMPT_LEN" --gen "$BATCH_GEN" --batch 8
  one "$M/batch1" "$F" airllm --prompt-len "$BATCH_PROMPT_LEN" --gen "$BATCH_GEN"
  one "$M/streamed1" "$F" airllm --prompt-len "$BATCH_PROMPT_LEN" --gen "$BATCH_GEN" --max-memory "${stream_mib}MiB"
  one "$M/streamed8" "$F" airllm --prompt-len "$BATCH_PROMPT_LEN" --gen "$BATCH_GEN" --batch 8 --max-memory "${stream_mib}MiB"
done

"$PY" "$ROOT/bench/parity_report.py" "$RESULTS" \
  --layers "$LAYERS" --prompt-len "$PROMPT_LEN" --gen "$GEN" \
  --batch-prompt-len "$BATCH_PROMPT_LEN" --batch-gen "$BATCH_GEN" \
  --stream-fraction "$STREAM_FRACTION" --commit "$(git rev-parse --short HEAD)" \
  $( [ "$DOCS" = 1 ] && echo --docs "$ROOT/docs/benchmarks.md" )
