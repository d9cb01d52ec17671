#!/usr/bin/env bash
# DeepSeek/GLM benchmark (issue 25): a synthetic SHAPE (deepseek-v3 by default) of LAYERS layers
# with EXPERTS routed experts, converted to QUANT GGUF by `airllm convert`, run by this project
# at its reported minimum budget (cold expert cache) in a cgroup of that budget + 512 MiB, and by
# llama.cpp in the same cgroup, with the page cache dropped before each run. Also checks that the
# greedy tokens at the minimum equal those at a large budget, and prints the byte bound of a
# token: every non-expert layer tensor, top_k/experts of the routed experts, and the head.
#
# usage: bench/deepseek.sh       (root is needed for the cgroup and for dropping caches)
# env:   SHAPE (deepseek-v3, glm-4.5-air, ...), LAYERS (5), EXPERTS (32), QUANT (q4_k_m), GEN (8),
#        PROMPT_LEN (16), WORK (/tmp/airllm-deepseek), LLAMA_PY (a Python with llama-cpp-python
#        and gguf, default .venv-llamacpp/bin/python)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHAPE=${SHAPE:-deepseek-v3}
LAYERS=${LAYERS:-5}
EXPERTS=${EXPERTS:-32}
QUANT=${QUANT:-q4_k_m}
GEN=${GEN:-8}
PROMPT_LEN=${PROMPT_LEN:-16}
WORK=${WORK:-/tmp/airllm-deepseek}
PY=${LLAMA_PY:-$ROOT/.venv-llamacpp/bin/python}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$CARGO_TARGET_DIR/release/airllm
PROMPT="The history of the printing press begins in the fifteenth century, when"

mkdir -p "$WORK"
GGUF=$WORK/$SHAPE-${LAYERS}l-${EXPERTS}e-$QUANT.gguf
if [ ! -f "$GGUF" ]; then
  "$BIN" synth --shape "$SHAPE" --layers "$LAYERS" --experts "$EXPERTS" --out "$WORK/hf"
  "$BIN" convert -m "$WORK/hf" -q "$QUANT" -o "$GGUF"
  rm -rf "$WORK/hf"
fi
RESULTS=$WORK/results.jsonl
: > "$RESULTS"
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

CTX=$((PROMPT_LEN + GEN))
# inspect refuses a 1 MiB budget, naming the minimum.
MIN=$( ("$BIN" inspect -m "$GGUF" -c "$CTX" -b "$PROMPT_LEN" --max-memory 1MiB 2>&1 || true) |
  grep -o 'minimum of [0-9.]* [KMG]iB' | awk '{print $3 $4}')
MIN_MIB=$("$PY" -c "import sys; v=sys.argv[1]; n=float(v[:-3]); print(int(n * {'KiB': 1/1024, 'MiB': 1, 'GiB': 1024}[v[-3:]]) + 1)" "$MIN")
CAP_MIB=$((MIN_MIB + 512))
echo "minimum $MIN -> budget ${MIN_MIB} MiB, cgroup ${CAP_MIB} MiB" >&2

"$PY" - "$GGUF" >&2 <<'PYEOF'
import sys, gguf
r = gguf.GGUFReader(sys.argv[1])
kv = {f.name: f for f in r.fields.values()}
arch = bytes(kv["general.architecture"].parts[-1]).decode()
val = lambda k: int(kv[f"{arch}.{k}"].parts[-1][0])
experts, top_k = val("expert_count"), val("expert_used_count")
layer = sum(int(t.n_bytes) for t in r.tensors if t.name.startswith("blk.") and "_exps" not in t.name)
routed = sum(int(t.n_bytes) for t in r.tensors if "_exps" in t.name)
head = sum(int(t.n_bytes) for t in r.tensors if t.name == "output.weight")
bound = layer + routed * top_k / experts + head
print(f"bound per token: layers without routed experts {layer/2**20:.1f} MiB + {top_k}/{experts} "
      f"of routed {routed/2**20:.1f} MiB + head {head/2**20:.1f} MiB = {bound/2**20:.1f} MiB")
PYEOF

OURS=("$BIN" bench -m "$GGUF" --prompt-len "$PROMPT_LEN" --gen "$GEN" --raw-bytes 2GiB --json)
run "airllm-rs at the minimum ${MIN_MIB} MiB (cold expert cache)" "$CAP_MIB" "${OURS[@]}" --max-memory "${MIN_MIB}MiB"
run "llama.cpp" "$CAP_MIB" "$PY" "$ROOT/bench/peers.py" llamacpp --model "$GGUF" --prompt "$PROMPT" --gen "$GEN"
run "airllm-rs at the minimum ${MIN_MIB} MiB (cold expert cache)" "$CAP_MIB" "${OURS[@]}" --max-memory "${MIN_MIB}MiB"
run "llama.cpp" "$CAP_MIB" "$PY" "$ROOT/bench/peers.py" llamacpp --model "$GGUF" --prompt "$PROMPT" --gen "$GEN"
# Both with memory to spare, for the compute side (llama.cpp needs the file's size and more).
run "airllm-rs at 8 GiB (resident)" none "${OURS[@]}" --max-memory 8GiB
run "llama.cpp, no cap" none "$PY" "$ROOT/bench/peers.py" llamacpp --model "$GGUF" --prompt "$PROMPT" --gen "$GEN"

# Greedy tokens at `run`'s own minimum (it counts the tokenizer and this prompt) and at a large
# budget; llama.cpp's are in its JSON line above.
RMIN=$( ("$BIN" run -m "$GGUF" -p "$PROMPT" -n "$GEN" --max-memory 1MiB 2>&1 || true) |
  grep -o 'minimum of [0-9.]* [KMG]iB' | awk '{print $3 $4}')
RMIN_MIB=$("$PY" -c "import sys; v=sys.argv[1]; n=float(v[:-3]); print(int(n * {'KiB': 1/1024, 'MiB': 1, 'GiB': 1024}[v[-3:]]) + 1)" "$RMIN")
A=$("$ROOT/bench/cgroup_run.sh" "$((RMIN_MIB + 512))" "$BIN" run -m "$GGUF" -p "$PROMPT" -n "$GEN" --temperature 0 --max-memory "${RMIN_MIB}MiB" 2>/dev/null)
B=$("$BIN" run -m "$GGUF" -p "$PROMPT" -n "$GEN" --temperature 0 --max-memory 20GiB 2>/dev/null)
if [ "$A" = "$B" ]; then echo "greedy tokens: identical at ${RMIN_MIB} MiB and at 20 GiB: $A" >&2; else
  printf 'greedy tokens differ:\n  minimum: %s\n  20 GiB:  %s\n' "$A" "$B" >&2; fi
cat "$RESULTS"
