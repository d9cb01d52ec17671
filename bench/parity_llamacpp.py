#!/usr/bin/env python3
"""llama.cpp's side of bench/parity.sh: the same measurements `airllm bench --json` makes, on
the same prompt, printed as one JSON line.

  parity_llamacpp.py MODEL.gguf --prompt-len N --gen N [--batch B]

The prompt is `airllm bench`'s: the same xorshift ids over the vocabulary. Prefill computes
logits for the last prompt token only (as ours does); decode feeds each greedy token back.
With --batch B, B sequences (each with its own prompt, as ours) are prefilled, then decoded
together, one llama_decode of B tokens per step; `decode_s_per_token` is then the time of one
such sweep. Two threads, since the machine has two cores.
"""
import argparse
import ctypes
import json
import os
import time

import numpy as np
import llama_cpp as L


def prompts(vocab, n, batch):
    x = 0x2545F4914F6CDD1D
    mask = (1 << 64) - 1
    out = []
    for _ in range(batch):
        p = []
        for _ in range(n):
            x ^= (x << 13) & mask
            x ^= x >> 7
            x ^= (x << 17) & mask
            p.append(x % vocab)
        out.append(p)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompt-len", type=int, default=400)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args()

    L.llama_backend_init()
    mp = L.llama_model_default_params()
    model = L.llama_model_load_from_file(a.model.encode(), mp)
    if not model:
        raise SystemExit(f"{a.model}: llama.cpp cannot load it")
    cp = L.llama_context_default_params()
    cp.n_ctx = (a.prompt_len + a.gen + 8) * a.batch
    cp.n_batch = 512
    cp.n_ubatch = 512
    cp.n_seq_max = a.batch
    cp.n_threads = a.threads
    cp.n_threads_batch = a.threads
    ctx = L.llama_init_from_model(model, cp)
    vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    ps = prompts(vocab, a.prompt_len, a.batch)
    batch = L.llama_batch_init(512, 0, a.batch)

    def decode(items):
        """items: (seq, pos, token, want_logits); returns the greedy token of each wanted row."""
        out = {}
        for s in range(0, len(items), 512):
            chunk = items[s:s + 512]
            batch.n_tokens = len(chunk)
            for i, (seq, pos, tok, want) in enumerate(chunk):
                batch.token[i] = tok
                batch.pos[i] = pos
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = seq
                batch.logits[i] = 1 if want else 0
            if L.llama_decode(ctx, batch) != 0:
                raise SystemExit("llama_decode failed")
            for i, (seq, _, _, want) in enumerate(chunk):
                if want:
                    row = L.llama_get_logits_ith(ctx, i)
                    out[seq] = int(np.argmax(np.ctypeslib.as_array(row, shape=(vocab,))))
        return out

    def run():
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        t = time.time()
        last = {}
        for seq, p in enumerate(ps):
            items = [(seq, i, tok, i == len(p) - 1) for i, tok in enumerate(p)]
            last.update(decode(items))
        prefill = time.time() - t
        t = time.time()
        for step in range(a.gen):
            pos = a.prompt_len + step
            last = decode([(s, pos, last[s], True) for s in range(a.batch)])
        return prefill, time.time() - t

    run()  # warm-up: page the model in, as ours holds it before timing
    prefill, dec = run()
    print(json.dumps({
        "model": a.model,
        "batch": a.batch,
        "prompt_len": a.prompt_len,
        "gen": a.gen,
        "prefill_tokens_per_s": a.prompt_len * a.batch / prefill,
        "prefill_s": prefill,
        "decode_s_per_token": dec / a.gen,
        "llama_cpp_python": L.__version__,
    }))
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)


if __name__ == "__main__":
    main()
