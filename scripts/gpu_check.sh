#!/usr/bin/env bash
# The GPU checks, for a machine with an NVIDIA GPU and no Rust toolchain, on the binaries that
# scripts/build_cuda.sh made (dist/cuda/, carried along). Runs in one go, in a few minutes:
#   1. the transformers fixtures on CUDA against their goldens (f32 logits within 1e-3,
#      identical greedy tokens), in four placements: all on the GPU, staged from host memory,
#      staged from disk, and mixed (one layer on the GPU, one in host memory, the rest on disk);
#   1b. random-weight f16 and bf16 models and a bf16 mixture of experts (tiny-moe, its experts
#       staged from host memory): CUDA's greedy tokens equal the CPU's;
#   2. the default model (Gemma 3 270M Q4_K_M) on CUDA: llama.cpp's Q4_K_M criteria, and the
#      CPU's greedy tokens;
#   3. `synth --shape llama-70b --layers 8` (bf16) at --gpu-memory 4GiB: decode s/token against
#      the bound (bytes moved host→GPU per token ÷ pinned host→GPU bandwidth, measured in the
#      same run; target ≤ 1.2×) and the GPU memory peak against the budget (target ≤ +5%).
# Env: AIRLLM_DEFAULT_MODEL (default ~/.cache/airllm/models/gemma-3-270m-q4_k_m.gguf),
#      GPU_CHECK_WORK (scratch, default /tmp/airllm-gpu-check; needs ~20 GB free).
# Prints one line per check; exits non-zero if any failed.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
D="$REPO/dist/cuda"
WORK=${GPU_CHECK_WORK:-/tmp/airllm-gpu-check}
mkdir -p "$WORK"
for b in airllm device_check; do
  if [ ! -x "$WORK/$b" ]; then
    if [ -f "$D/$b" ]; then cp "$D/$b" "$WORK/$b"
    elif [ -f "$D/$b.xz" ]; then xz -dc "$D/$b.xz" >"$WORK/$b"
    else echo "FAIL: $D/$b not found; build it with scripts/build_cuda.sh"; exit 1; fi
    chmod +x "$WORK/$b"
  fi
done
# cuBLAS, cuRAND and the CUDA runtime: from PyTorch's CUDA 13 wheels, or a toolkit.
LIBS=$(python3 -c 'import nvidia,os;print(os.path.join(list(nvidia.__path__)[0],"cu13","lib"))' 2>/dev/null || true)
export LD_LIBRARY_PATH="${LIBS:+$LIBS:}/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | sed 's/^/gpu: /'
fail=0

echo "== 1. transformers fixtures on CUDA"
"$WORK/device_check" --device cuda hf "$REPO"/tests/fixtures/hf/*/ || fail=1

echo "== 1b. f16 and bf16 models, and a bf16 mixture of experts (random weights): CUDA's greedy tokens = CPU's"
for case in tiny:f16 tiny:bf16 tiny-moe:bf16; do
  shape=${case%%:*} dt=${case##*:}
  S="$WORK/synth-$shape-$dt"
  [ -f "$S/config.json" ] || "$WORK/airllm" synth --shape "$shape" --layers 4 --dtype $dt --out "$S" >/dev/null
  dt="$shape-$dt"
  for d in cpu cuda; do
    "$WORK/airllm" run -m "$S" --device $d -p "The quick brown fox" -p "Once upon a time" -n 24 \
      --temperature 0 --ignore-eos --json 2>/dev/null | python3 -c 'import json,sys; print([json.loads(l)["token_ids"] for l in sys.stdin])' >"$WORK/$dt-$d.txt"
  done
  if [ -s "$WORK/$dt-cpu.txt" ] && cmp -s "$WORK/$dt-cpu.txt" "$WORK/$dt-cuda.txt"; then
    echo "PASS $dt: 2 prompts × 24 greedy tokens identical on CUDA and CPU"
  else
    echo "FAIL $dt: CPU $(cat "$WORK/$dt-cpu.txt") CUDA $(cat "$WORK/$dt-cuda.txt")"; fail=1
  fi
done

echo "== 2. the default model on CUDA"
MODEL=${AIRLLM_DEFAULT_MODEL:-$HOME/.cache/airllm/models/gemma-3-270m-q4_k_m.gguf}
if [ -f "$MODEL" ]; then
  "$WORK/device_check" --device cuda gguf "$MODEL" "$REPO/tests/fixtures/gguf/gemma3-270m-reference.json" || fail=1
else
  echo "SKIP default model: $MODEL not found (scripts/fetch_default_model.sh, or set AIRLLM_DEFAULT_MODEL)"
fi

echo "== 3. llama-70b shape, 8 layers, bf16, --gpu-memory 4GiB"
M="$WORK/l70x8"
[ -f "$M/config.json" ] || "$WORK/airllm" synth --shape llama-70b --layers 8 --out "$M" >/dev/null || fail=1
# A 512-token prompt: the prefill step is the largest the plan allows (--batch-size 512), so
# the memory peak covers it.
"$WORK/airllm" bench -m "$M" --device cuda --gpu-memory 4GiB --prompt-len 512 --gen 8 --json \
  >"$WORK/bench.json" 2>"$WORK/bench.err" || { cat "$WORK/bench.err"; fail=1; }
grep -E '^plan|^  ' "$WORK/bench.err"
python3 - "$WORK/bench.json" <<'PY' || fail=1
import json, sys
r = json.load(open(sys.argv[1]))
g = lambda b: f"{b / 2**30:.2f} GiB"
ratio, peak, budget = r["decode_vs_bound"], r["device_peak_bytes"], r["device_budget_bytes"]
print(f"pinned host→GPU {r['h2d_bandwidth_pinned'] / 1e9:.1f} GB/s; moved per token {g(r['bytes_moved_per_token'])} "
      f"(planned {g(r['planned_bytes_moved_per_token'])}); disk raw {r['raw_read_bandwidth'] / 1e9:.2f} GB/s")
ok1 = ratio <= 1.2
print(f"{'PASS' if ok1 else 'FAIL'} decode {r['decode_s_per_token']:.3f} s/token vs bound {r['decode_bound_s_per_token']:.3f} s = {ratio:.2f}× (≤ 1.2×)")
ok2 = peak <= budget * 1.05
print(f"{'PASS' if ok2 else 'FAIL'} GPU memory peak {g(peak)} of budget {g(budget)} = {peak / budget:.3f} (≤ 1.05); "
      f"allocator peak {g(r['device_pool_peak_bytes'] or 0)}, sampled {g(r['device_peak_sampled_bytes'] or 0)}")
print(json.dumps(r))
sys.exit(0 if ok1 and ok2 else 1)
PY
[ $fail = 0 ] && echo "gpu_check: all passed" || echo "gpu_check: FAILED"
exit $fail
