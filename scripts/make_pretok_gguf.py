#!/usr/bin/env python3
"""Vocabulary-only GGUF files that differ only in `tokenizer.ggml.pre`, with llama.cpp's token ids
of test strings, for the pre-tokenizers of DeepSeek (`deepseek-llm`, `deepseek-v3`) and GLM
(`glm4`). Real DeepSeek-V2/V3 and GLM-4/4.5 GGUF files declare these; the tiny fixtures, made
from a small byte-level BPE, declare `gpt-2`. Each file is the tiny deepseek2 fixture's metadata
with no tensors (llama.cpp loads it with vocab_only), and a byte-level BPE vocabulary learnt
from the test strings as the GPT-2 and the DeepSeek-V3 pre-tokenizers split them (with the
`regex` module, pinned below): each of those pieces becomes a whole token, so the token ids
show where each pre-tokenizer splits.

    .venv-llamacpp/bin/python scripts/make_pretok_gguf.py
writes tests/fixtures/gguf/pretok/<pre>.gguf and <pre>.json (versions in
scripts/requirements-llamacpp.txt).
"""
import json
import os

import gguf
import regex  # regex==2024.11.6
from llama_cpp import Llama

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "..", "tests", "fixtures", "gguf", "tiny", "deepseek2-v3-f32.gguf")
OUT = os.path.join(HERE, "..", "tests", "fixtures", "gguf", "pretok")
PRES = ["deepseek-v3", "deepseek-llm", "glm4", "kimi-k2"]
TEXTS = [
    "Hello world, it's 2026: 1234567 apples and 3.14159 pies!",
    "  leading spaces\tand tabs\n\nnew lines\r\nend  ",
    "東京は日本の首都です。ひらがなとカタカナ、한국어도.",
    "x=a+b*(c-d)/e; // C'est l'été, don't WE'LL",
    "München ÄÖÜ naïve façade — “quotes” … ¿qué? ¡sí!",
    "emoji 😊👍 and symbols ©®™ $100 €20 ¥3000",
]


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def learn(texts, n_merges=5000):
    """Greedy byte-level BPE over the raw texts (no pre-tokenizer): the most frequent adjacent
    pair is merged, ties by first occurrence."""
    b2u = bytes_to_unicode()
    seqs = [[b2u[b] for b in t.encode()] for t in texts]
    tokens = [b2u[b] for b in range(256)]
    merges = []
    for _ in range(n_merges):
        counts = {}
        for s in seqs:
            for a, b in zip(s, s[1:]):
                counts[(a, b)] = counts.get((a, b), 0) + 1
        if not counts:
            break
        best = max(counts.items(), key=lambda kv: kv[1])
        if best[1] < 2:
            break
        a, b = best[0]
        merges.append(f"{a} {b}")
        tokens.append(a + b)
        for s in seqs:
            i = 0
            while i < len(s) - 1:
                if s[i] == a and s[i + 1] == b:
                    s[i:i + 2] = [a + b]
                i += 1
    return tokens, merges


def main():
    os.makedirs(OUT, exist_ok=True)
    r = gguf.GGUFReader(SRC)
    gpt2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
    pieces = []
    for t in TEXTS:
        pieces += regex.findall(gpt2, t)
        # DeepSeek-V3's three splits, applied one after another.
        parts = [t]
        for rx in [r"\p{N}{1,3}", r"[一-龥぀-ゟ゠-ヿ]+",
                   r"[!\"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"]:
            nxt = []
            for p in parts:
                at = 0
                for m in regex.finditer(rx, p):
                    if m.start() > at:
                        nxt.append(p[at:m.start()])
                    nxt.append(m.group())
                    at = m.end()
                if at < len(p):
                    nxt.append(p[at:])
            parts = nxt
        pieces += parts
    # Twice each piece, so that every pair merges, until each piece is one token.
    tokens, merges = learn(pieces * 2)
    replace = {
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [1] * len(tokens),
        "tokenizer.ggml.merges": merges,
    }
    for pre in PRES:
        path = os.path.join(OUT, f"{pre}.gguf")
        arch = bytes(r.fields["general.architecture"].parts[-1]).decode()
        w = gguf.GGUFWriter(path, arch)
        for f in r.fields.values():
            if f.name.startswith("GGUF.") or f.name == "general.architecture":
                continue
            if f.name == "tokenizer.ggml.pre":
                w.add_string(f.name, pre)
                continue
            if f.name in replace:
                w.add_array(f.name, replace[f.name])
                continue
            if f.name.startswith("tokenizer.ggml.") and f.name.endswith("_token_id"):
                continue  # the ids of the fixture's own vocabulary
            if f.name.endswith(".vocab_size"):
                w.add_uint32(f.name, len(tokens))
                continue
            t = f.types[0]
            if t == gguf.GGUFValueType.ARRAY:
                sub = f.types[-1]
                if sub == gguf.GGUFValueType.STRING:
                    vals = [bytes(f.parts[i]).decode() for i in f.data]
                else:
                    vals = [f.parts[i].tolist()[0] for i in f.data]
                w.add_array(f.name, vals)
            elif t == gguf.GGUFValueType.STRING:
                w.add_string(f.name, bytes(f.parts[-1]).decode())
            else:
                w.add_key_value(f.name, f.parts[-1].tolist()[0], t)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        w.close()
        llm = Llama(model_path=path, vocab_only=True, verbose=False)
        ref = {"pre": pre, "tokenize": [
            {"text": s, "ids": llm.tokenize(s.encode(), add_bos=False, special=False)} for s in TEXTS]}
        del llm
        with open(os.path.join(OUT, f"{pre}.json"), "w") as fo:
            json.dump(ref, fo, ensure_ascii=False, indent=1)
        print(pre, [len(c["ids"]) for c in ref["tokenize"]])


if __name__ == "__main__":
    main()
