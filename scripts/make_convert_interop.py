#!/usr/bin/env python3
"""Records what llama.cpp does with the GGUF files `airllm convert` writes, for the interop
test (crates/airllm/tests/all/convert.rs).

For each tiny transformers fixture, the test converts it (to Q8_0, or F32 for MoE) with
`airllm convert`; this
script runs llama.cpp (through llama-cpp-python, pinned in scripts/requirements-llamacpp.txt) on
the same conversion and writes tests/fixtures/gguf/convert/<fixture>-<type>.json with:
  - the file's size and FNV-1a 64 hash, so the test knows llama.cpp saw the very bytes it made;
  - llama.cpp's tokenization of the prompts, and 24 greedy tokens per prompt with the margin
    between the top two logits at each step.

Run after `cargo build --release`:
    .venv-llamacpp/bin/python scripts/make_convert_interop.py
"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
from llama_cpp import Llama

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..")
HF = os.path.join(ROOT, "tests", "fixtures", "hf")
OUT = os.path.join(ROOT, "tests", "fixtures", "gguf", "convert")
BIN = os.environ.get("AIRLLM_BIN") or os.path.join(
    os.environ.get("CARGO_TARGET_DIR") or os.path.join(ROOT, "target"), "release", "airllm")

# mistral-sliding-window is left out: llama.cpp runs the `llama` architecture without a sliding
# window, so past the window it computes a different function from transformers (and us).
# The later conversions are checked in F32: the llama-cpp-python build of the machine that made
# their references stops on an illegal instruction in Q8_0 files. qwen3moe-sparse stands for
# Qwen3-MoE, whose dense layers llama.cpp's qwen3moe cannot hold.
FIXTURES = [
    ("llama-gqa2-llama3rope", "q8_0"),
    ("llama-mqa-tied-linear-bf16", "q8_0"),
    ("qwen2-bias-mha-sharded", "q8_0"),
    ("qwen3-qknorm-headdim", "q8_0"),
    ("gemma3-sliding-global", "q8_0"),
    ("mixtral-moe", "f32"),
    ("qwen2moe-shared-expert", "f32"),
    ("qwen3moe-sparse", "f32"),
    ("phi-three-longrope-partial", "f32"),
    # DeepSeek as llama.cpp's deepseek2 (split attn_k_b/attn_v_b), the FP8 one widened to F32;
    # GLM-4. Left out: deepseek-v2-mla-grouped (llama.cpp needs q_lora_rank unless a deepseek2
    # has 27 layers, and scores V2's groups by their best two experts, not their best one) and
    # glm4moe-partial-rotary (llama.cpp's glm4moe departs from transformers; see gguf_tiny.rs).
    ("deepseek-v2-lite-27l", "f32"),
    ("deepseek-v3-mla-noaux-yarn", "f32"),
    ("deepseek-v3-fp8-block", "f32"),
    ("glm4-dense", "f32"),
]
PROMPTS = ["Hello world, this is", "The quick brown fox jumps over"]
STEPS = 24


def fnv1a64(path):
    h = 0xCBF29CE484222325
    data = open(path, "rb").read()
    # Vectorised FNV would be nicer; the files are a few hundred KB.
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def main():
    os.makedirs(OUT, exist_ok=True)
    only = set(sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        for name, quant in FIXTURES:
            if only and name not in only:
                continue
            path = os.path.join(tmp, f"{name}-{quant}.gguf")
            subprocess.run([BIN, "convert", "-m", os.path.join(HF, name), "-q", quant, "-o", path],
                           check=True)
            llm = Llama(model_path=path, n_ctx=256, n_batch=256, n_threads=2, logits_all=True,
                        flash_attn=False, type_k=0, type_v=0, verbose=False)
            ref = {"bytes": os.path.getsize(path), "fnv1a64": str(fnv1a64(path)),
                   "prompts": PROMPTS, "prompt_token_ids": [], "greedy": [], "margins": []}
            for p in PROMPTS:
                ids = llm.tokenize(p.encode(), add_bos=True, special=True)
                ref["prompt_token_ids"].append(ids)
                llm.reset()
                llm.eval(ids)
                out, margins = [], []
                for _ in range(STEPS):
                    row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
                    top = np.argsort(-row, kind="stable")[:2]
                    margins.append(float(row[top[0]] - row[top[1]]))
                    out.append(int(top[0]))
                    llm.eval([int(top[0])])
                ref["greedy"].append(out)
                ref["margins"].append(margins)
            del llm
            with open(os.path.join(OUT, f"{name}-{quant}.json"), "w") as f:
                json.dump(ref, f)
            print(f"{name}: min greedy margin {min(min(m) for m in ref['margins']):.4f}",
                  file=sys.stderr)


if __name__ == "__main__":
    main()
