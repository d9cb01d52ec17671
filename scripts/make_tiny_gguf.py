#!/usr/bin/env python3
"""Converts the tiny transformers fixtures to GGUF with llama.cpp's own converter, in F32 and
Q8_0, and records llama.cpp's outputs on each into tests/fixtures/gguf/tiny/.

Needs the llama.cpp source that llama-cpp-python 0.3.36 vendors (for convert_hf_to_gguf.py and
its gguf-py), given as LLAMA_CPP_DIR, e.g. the `vendor/llama.cpp` folder of the unpacked
llama_cpp_python-0.3.36.tar.gz sdist from PyPI; plus the packages in
scripts/requirements-llamacpp.txt and scripts/requirements-fixtures.txt, and sentencepiece==0.2.3.
The converter may run from another environment (CONVERT_PYTHON). Names on the command line
(e.g. `gemma2`) limit the run to those models.

Our fixtures use a small byte-level BPE tokenizer the converter does not know by hash; it is
declared as llama.cpp's `gpt-2` pre-tokenizer, which is the regex it was trained with.
"""
import json
import os
import runpy
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
HF = os.path.join(HERE, "..", "tests", "fixtures", "hf")
OUT = os.path.join(HERE, "..", "tests", "fixtures", "gguf", "tiny")

# (gguf name, transformers fixture). Mistral is stored as llama, as llama.cpp's converter does.
# llama.cpp's converter cannot write Qwen3-MoE's dense layers, so its GGUF fixture comes from the
# all-sparse transformers fixture.
MODELS = [
    ("llama", "llama-gqa2-llama3rope"),
    ("mistral-as-llama", "mistral-sliding-window"),
    ("qwen2", "qwen2-bias-mha-sharded"),
    ("qwen3", "qwen3-qknorm-headdim"),
    ("gemma3", "gemma3-sliding-global"),
    ("gemma2", "gemma2-softcap-alternating"),
    ("mixtral", "mixtral-moe"),
    ("qwen2moe", "qwen2moe-shared-expert"),
    ("qwen3moe", "qwen3moe-sparse"),
    ("phi3", "phi-three-longrope-partial"),
    ("deepseek2-lite", "deepseek-v2-lite-27l"),
    ("deepseek2-v3", "deepseek-v3-mla-noaux-yarn"),
    ("glm4moe", "glm4moe-partial-rotary"),
    ("glm4", "glm4-dense"),
    # GPT-OSS: MXFP4 experts as the converter repacks them, and all-F32 from the dequantized form.
    ("gpt-oss-mxfp4", "gpt-oss-mxfp4"),
    ("gpt-oss", "gpt-oss-bf16-experts"),
]

# The later fixtures get F32 only: the llama-cpp-python build of the machine that made them stops
# on an illegal instruction in Q8_0 files (the earlier Q8_0 fixtures came from another machine).
F32_ONLY = {"gemma2", "mixtral", "qwen2moe", "qwen3moe", "phi3", "deepseek2-lite", "deepseek2-v3",
            "glm4moe", "glm4", "gpt-oss-mxfp4", "gpt-oss"}

TOKENIZE = [
    "Hello world",
    "  two leading spaces and\ttabs\nnew lines",
    "digits 0123456789, punctuation!? (brackets)",
    "Café naïve 東京 😊",
]

CONVERT = """
import runpy, sys
L = sys.argv[1]
sys.path[:0] = [L + "/gguf-py", L]
import conversion.base as b
b.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
# Gemma 2's converter knows only SentencePiece; without a tokenizer.model, take the BPE path
# its Gemma 3 converter takes.
import conversion.gemma as gm
_g2_vocab = gm.Gemma2Model.set_vocab
gm.Gemma2Model.set_vocab = lambda self: (
    _g2_vocab(self) if (self.dir_model / "tokenizer.model").is_file() else self._set_vocab_gpt2())
# Phi-3's converter takes the BPE path only for a GPT2Tokenizer; ours is a BPE tokenizer.json.
import conversion.phi as ph
_p3_vocab = ph.Phi3MiniModel.set_vocab
ph.Phi3MiniModel.set_vocab = lambda self: (
    _p3_vocab(self) if (self.dir_model / "tokenizer.model").is_file() else self._set_vocab_gpt2())
# GLM's converters look up GLM's own special tokens, which the fixtures' tokenizer lacks.
import conversion.glm as gl
gl.Glm4Model.set_vocab = lambda self: self._set_vocab_gpt2()
gl.Glm4MoeModel.set_vocab = lambda self: self._set_vocab_gpt2()
# transformers 5 picks Qwen2Tokenizer for a qwen2 folder, which adds tokens of its own; the
# fixture's tokenizer.json is the whole truth.
import os, transformers
transformers.AutoTokenizer.from_pretrained = staticmethod(
    lambda d, **k: transformers.PreTrainedTokenizerFast(
        tokenizer_file=os.path.join(d, "tokenizer.json"), bos_token="<s>", eos_token="</s>", pad_token="<pad>"))
sys.argv = [L + "/convert_hf_to_gguf.py"] + sys.argv[2:]
runpy.run_path(L + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def convert(src, dst, outtype):
    lcpp = os.environ["LLAMA_CPP_DIR"]
    # The converter needs torch and transformers; they may live in another environment than
    # llama-cpp-python (CONVERT_PYTHON names its interpreter).
    python = os.environ.get("CONVERT_PYTHON", sys.executable)
    subprocess.run(
        [python, "-c", CONVERT, lcpp, src, "--outtype", outtype, "--outfile", dst],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def main():
    from llama_cpp import Llama

    os.makedirs(OUT, exist_ok=True)
    only = set(sys.argv[1:])
    for name, fixture in MODELS:
        if only and name not in only:
            continue
        src = os.path.join(HF, fixture)
        prompts = json.load(open(os.path.join(src, "reference.json")))["prompts"]
        for outtype in ["f32"] if name in F32_ONLY else ["f32", "q8_0"]:
            path = os.path.join(OUT, f"{name}-{outtype}.gguf")
            convert(src, path, outtype)
            llm = Llama(model_path=path, n_ctx=256, n_batch=256, n_threads=2, logits_all=True,
                        flash_attn=False, type_k=0, type_v=0, verbose=False)
            ref = {"tokenize": [], "prompts": prompts, "prompt_token_ids": [], "logits": [],
                   "greedy": [], "margins": []}
            for s in TOKENIZE:
                ref["tokenize"].append({"text": s, "ids": llm.tokenize(s.encode(), add_bos=True, special=True)})
            for p in prompts:
                ids = llm.tokenize(p.encode(), add_bos=True, special=True)
                ref["prompt_token_ids"].append(ids)
                llm.reset()
                llm.eval(ids)
                ref["logits"].append([float(x) for x in llm.scores[len(ids) - 1]])
                out, margins = [], []
                for _ in range(32):
                    row = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
                    top = np.argsort(-row, kind="stable")[:2]
                    margins.append(float(row[top[0]] - row[top[1]]))
                    out.append(int(top[0]))
                    llm.eval([int(top[0])])
                ref["greedy"].append(out)
                ref["margins"].append(margins)
            del llm
            with open(path[:-5] + ".json", "w") as f:
                json.dump(ref, f)
            print(f"{name} {outtype}: min greedy margin {min(min(m) for m in ref['margins']):.4f}", file=sys.stderr)


if __name__ == "__main__":
    main()
