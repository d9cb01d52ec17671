#!/usr/bin/env python3
"""Records llama.cpp's outputs on the default model (Gemma 3 270M, Q4_K_M) into
tests/fixtures/gguf/gemma3-270m-reference.json, which the Rust tests compare against.

Two references, both from llama.cpp through llama-cpp-python (versions pinned in
scripts/requirements-llamacpp.txt):

  f32   The Q4_K_M file dequantized to an F32 GGUF with gguf's own dequantization, run by
        llama.cpp in plain F32 math (F32 KV cache, no flash attention). This is the exact
        function of the quantized file; the engine must match its greedy tokens and logits.
  q4km  The Q4_K_M file itself, batched prefill: top-5 logits per prompt, and greedy tokens
        with the margin between top-1 and top-2 at every step.

Plus the token ids of test strings. Run (after scripts/fetch_default_model.sh):
    python3 -m venv .venv-llamacpp && .venv-llamacpp/bin/pip install -r scripts/requirements-llamacpp.txt
    .venv-llamacpp/bin/python scripts/make_gguf_reference.py
"""
import json
import os
import sys

import numpy as np
import gguf
import llama_cpp
from llama_cpp import Llama

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "..", "tests", "fixtures", "gguf", "gemma3-270m-reference.json")
MODELS = os.environ.get("AIRLLM_MODELS") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "airllm", "models")
Q4 = os.path.join(MODELS, "gemma-3-270m-q4_k_m.gguf")
F32 = os.path.join(MODELS, "gemma-3-270m-f32-dequantized.gguf")

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Water boils at 100 degrees Celsius. At the top of Mount Everest, it boils at",
]

TOKENIZE = [
    "Hello world",
    " Hello world",
    "   three leading spaces",
    "several     spaces   inside",
    "line one\nline two\n\nline four",
    "tab\tseparated\tvalues\t",
    "digits 0123456789 and 3.14159, -42, 1e10",
    "Punctuation!? (brackets) [square] {curly} \"quotes\" 'single' — dash… ellipsis",
    "Accents: café, naïve, résumé, Ångström, São Paulo, Zürich",
    "CJK: 東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.",
    "Emoji: 😊👍🏽🚀 and 👨‍👩‍👧‍👦 family",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "<bos>literal specials<eos> inside text",
    "",
]


def dequantize(src, dst):
    """Writes the same model with every tensor dequantized to F32."""
    r = gguf.GGUFReader(src)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(dst, arch)
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        vt = f.types[0]
        v = f.contents()
        if vt == gguf.GGUFValueType.ARRAY:
            w.add_key_value(k, v, vt, sub_type=f.types[-1])
        else:
            w.add_key_value(k, v, vt)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for t in r.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w.add_tensor(t.name, data.reshape([int(x) for x in reversed(t.shape.tolist())]), raw_dtype=gguf.GGMLQuantizationType.F32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def load(path):
    return Llama(
        model_path=path,
        n_ctx=512,
        n_batch=512,
        n_threads=2,
        logits_all=True,
        flash_attn=False,
        type_k=0,  # GGML_TYPE_F32
        type_v=0,
        verbose=False,
    )


def prefill(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[len(ids) - 1], dtype=np.float64)


def greedy(llm, ids, n):
    llm.reset()
    llm.eval(ids)
    out, margins = [], []
    for _ in range(n):
        row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
        top = np.argsort(-row, kind="stable")[:2]
        margins.append(float(row[top[0]] - row[top[1]]))
        t = int(top[0])
        out.append(t)
        llm.eval([t])
    return out, margins


def main():
    if not os.path.exists(F32):
        print(f"dequantizing {Q4} -> {F32}", file=sys.stderr)
        dequantize(Q4, F32 + ".tmp")
        os.replace(F32 + ".tmp", F32)
    ref = {
        "llama_cpp_python": llama_cpp.__version__,
        "gguf": gguf.__version__ if hasattr(gguf, "__version__") else "0.19.0",
        "prompts": PROMPTS,
    }
    q4 = load(Q4)
    ref["tokenize"] = [
        {"text": s, "ids": q4.tokenize(s.encode(), add_bos=True, special=True)} for s in TOKENIZE
    ]
    prompt_ids = [q4.tokenize(p.encode(), add_bos=True, special=True) for p in PROMPTS]
    ref["prompt_token_ids"] = prompt_ids
    rng = np.random.default_rng(0)
    sample = sorted(int(x) for x in rng.choice(q4.n_vocab(), 256, replace=False))
    ref["sample_ids"] = sample
    ref["q4km"] = []
    for ids in prompt_ids:
        row = prefill(q4, ids)
        top = np.argsort(-row, kind="stable")[:5]
        toks, margins = greedy(q4, ids, 32)
        ref["q4km"].append({
            "top5_ids": [int(i) for i in top],
            "top5_logits": [float(row[i]) for i in top],
            "greedy": toks,
            "margins": margins,
        })
    del q4
    f32 = load(F32)
    ref["f32"] = []
    for ids in prompt_ids:
        row = prefill(f32, ids)
        top = np.argsort(-row, kind="stable")[:64]
        toks, margins = greedy(f32, ids, 32)
        ref["f32"].append({
            "top_ids": [int(i) for i in top],
            "top_logits": [float(row[i]) for i in top],
            "sample_logits": [float(row[i]) for i in sample],
            "greedy": toks,
            "margins": margins,
        })
    with open(OUT, "w") as f:
        json.dump(ref, f, indent=1)
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
