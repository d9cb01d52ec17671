#!/usr/bin/env bash
# Gated DeltaNet hybrids (issue 27): a synthetic Qwen3-Next-80B-A3B with LAYERS layers (three
# linear to one full attention, bf16), streamed at the minimum budget its plan reports, with
# the page cache dropped before each of ROUNDS runs in a memory cgroup. Prints one JSON line
# per run (kept in $WORK/results.jsonl), then the bytes read per token and decode s/token
# against the bound the issue sets: everything a token must read once (linear and full
# attention, routers, shared experts, top_k/experts of the routed experts, the head), over
# the raw disk bandwidth measured in the same run. Then the delta rule's two forms and its two
# ways of taking guesses back, timed by examples/delta_bench.rs.
#
# usage: bench/hybrid.sh      (root is needed for the cgroup and for dropping caches)
# env:   SHAPE (qwen3-next-80b-a3b), LAYERS (4), GEN (8), PROMPT_LEN (16), ROUNDS (2),
#        CTX (2048), WORK (/tmp/airllm-hybrid)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SHAPE=${SHAPE:-qwen3-next-80b-a3b}
LAYERS=${LAYERS:-4}
GEN=${GEN:-8}
PROMPT_LEN=${PROMPT_LEN:-16}
ROUNDS=${ROUNDS:-2}
WORK=${WORK:-/tmp/airllm-hybrid}
CTX=${CTX:-2048}
PY=python3
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$CARGO_TARGET_DIR/release/airllm

(cd "$ROOT" && cargo build --release -q -p airllm-cli && cargo build --release -q -p airllm --example delta_bench)
mkdir -p "$WORK"
RESULTS=$WORK/results.jsonl
: > "$RESULTS"
# shellcheck source=bench/lib.sh
. "$ROOT/bench/lib.sh"

MODEL=$WORK/$SHAPE-${LAYERS}l
[ -d "$MODEL" ] || "$BIN" synth --shape "$SHAPE" --layers "$LAYERS" --dtype bf16 --out "$MODEL"

# The minimum budget the plan accepts for this workload, from its refusal of 1 MiB.
MIN=$({ "$BIN" inspect -m "$MODEL" -c "$CTX" -b "$PROMPT_LEN" --max-memory 1MiB 2>&1 || true; } | sed -n 's/.*minimum of \([0-9.]*\) MiB.*/\1/p')
BUDGET=$("$PY" -c "import math; print(math.ceil($MIN) + 1)")
CAP=$((BUDGET + 512))
echo "minimum budget ${MIN} MiB: running at ${BUDGET} MiB in a ${CAP} MiB cgroup" >&2
for round in $(seq "$ROUNDS"); do
  run "$SHAPE ${LAYERS} layers at ${BUDGET} MiB, round $round" "$CAP" \
    "$BIN" bench -m "$MODEL" -c "$CTX" -b "$PROMPT_LEN" --prompt-len "$PROMPT_LEN" --gen "$GEN" --raw-bytes 2GiB --json \
    --max-memory "${BUDGET}MiB"
done

"$PY" - "$RESULTS" "$MODEL" <<'PYEOF'
import glob, json, struct, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
model = sys.argv[2]
cfg = json.load(open(f"{model}/config.json"))
sizes = {}
for f in glob.glob(f"{model}/*.safetensors"):
    with open(f, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        for k, v in json.loads(fh.read(n)).items():
            if k != "__metadata__":
                sizes[k] = v["data_offsets"][1] - v["data_offsets"][0]
experts = sum(b for k, b in sizes.items() if ".mlp.experts." in k)
layers = sum(b for k, b in sizes.items() if k.startswith("model.layers.") and ".mlp.experts." not in k)
head = sizes.get("lm_head.weight", sizes["model.embed_tokens.weight"])
share = cfg["num_experts_per_tok"] / cfg["num_experts"]
need = layers + share * experts + head
print(f"per token the issue's bound reads {need / 2**20:.0f} MiB: layers without experts "
      f"{layers / 2**20:.0f} MiB, {cfg['num_experts_per_tok']}/{cfg['num_experts']} of the experts "
      f"{share * experts / 2**20:.0f} MiB, head {head / 2**20:.0f} MiB")
print("| run | bytes/token | ÷ bound | decode s/token | bound s/token | ratio | raw GB/s | expert hits |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    if "failed" in r:
        print(f"| {r['name']} | failed: {r['failed']} |")
        continue
    d = r.get("decode_s_per_token") or 0
    bpt = r.get("bytes_read_per_token") or 0
    raw = r.get("raw_read_bandwidth") or 1
    bound = need / raw
    print(f"| {r['name']} | {bpt / 2**20:.0f} MiB | {bpt / need:.3f} | {d:.3f} | {bound:.3f} | "
          f"{d / bound:.3f} | {raw / 1e9:.2f} | {r.get('expert_hit_rate', '-')} |")
PYEOF

"$CARGO_TARGET_DIR/release/examples/delta_bench" --tokens 2000 --guesses 8
