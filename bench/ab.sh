#!/usr/bin/env bash
# Two builds of `airllm` on the same measurements, alternating run by run, so a change can be
# compared on a disk whose speed varies from minute to minute: the cases of bench/parity.sh that
# are ours (resident prefill and decode, a batch-8 sweep, streamed at half the model's size),
# ROUNDS times each, A then B. Prints one JSON line per run and a table of medians with B/A.
#
# Usage: bench/ab.sh OLD_BINARY NEW_BINARY [MODEL]   (default: the default model)
# Env:   ROUNDS (3), PROMPT_LEN (400), GEN (64), BATCH_PROMPT_LEN (32), BATCH_GEN (16)
set -euo pipefail
A=$1
B=$2
ROOT=$(cd "$(dirname "$0")/.." && pwd)
MODEL=${3:-$("$ROOT/scripts/fetch_default_model.sh" 2>&1 >/dev/null | sed -n 's/^default model: \(.*\) (cached)$/\1/p')}
[ -n "$MODEL" ] || MODEL=${AIRLLM_MODELS:-${XDG_CACHE_HOME:-$HOME/.cache}/airllm/models}/gemma-3-270m-q4_k_m.gguf
ROUNDS=${ROUNDS:-3}
PROMPT_LEN=${PROMPT_LEN:-400}
GEN=${GEN:-64}
BPL=${BATCH_PROMPT_LEN:-32}
BG=${BATCH_GEN:-16}
half=$(( $(stat -c %s "$MODEL") / 2 / 1048576 ))MiB
OUT=$(mktemp)
for r in $(seq "$ROUNDS"); do
  for side in A B; do
    bin=$A
    [ $side = B ] && bin=$B
    while read -r name args; do
      # shellcheck disable=SC2086
      line=$("$bin" bench -m "$MODEL" --json $args 2>/dev/null | tail -1)
      python3 -c 'import json,sys; r=json.loads(sys.argv[1]); r.update(case=sys.argv[2], side=sys.argv[3]); print(json.dumps(r))' \
        "$line" "$name" "$side" | tee -a "$OUT"
    done <<CASES
single --prompt-len $PROMPT_LEN --gen $GEN
batch8 --prompt-len $BPL --gen $BG --batch 8
streamed1 --prompt-len $BPL --gen $BG --max-memory $half
CASES
  done
done
python3 - "$OUT" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
cases = sorted({r["case"] for r in rows}, key=lambda c: ["single", "batch8", "streamed1"].index(c))
print("| case | metric | A (median) | B (median) | B/A |")
print("|---|---|---|---|---|")
for c in cases:
    for m, unit in [("prefill_tokens_per_s", "tokens/s"), ("decode_s_per_token", "s/step")]:
        a = statistics.median(r[m] for r in rows if r["case"] == c and r["side"] == "A")
        b = statistics.median(r[m] for r in rows if r["case"] == c and r["side"] == "B")
        print(f"| {c} | {m} ({unit}) | {a:.4g} | {b:.4g} | {b / a:.3f} |")
raw = [r["raw_read_bandwidth"] for r in rows]
print(f"raw disk read in the same runs: {min(raw)/1e9:.2f}–{max(raw)/1e9:.2f} GB/s")
PY
rm -f "$OUT"
