#!/usr/bin/env python3
"""Runs one peer on one model and prints one JSON line of timings, for bench/compare.sh.

  peers.py airllm   --model HF_FOLDER --prompt TEXT --gen N [--shards DIR]
  peers.py llamacpp --model FILE.gguf --prompt TEXT --gen N

Both decode greedily. Timings: `prefill_s` is the time to the first new token, `decode_s_per_token`
the mean time of each token after it. `peak_rss_mib` is the process's VmHWM.
"""
import argparse
import json
import os
import time


def vmhwm_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def run_airllm(a):
    import torch
    from airllm import AutoModel

    torch.set_num_threads(os.cpu_count() or 1)
    t = time.time()
    # AirLLM's defaults, on the CPU. On first use it splits the checkpoint into one file per
    # layer under `layer_shards_saving_path` (a full copy); that time is reported as setup.
    model = AutoModel.from_pretrained(a.model, device="cpu", layer_shards_saving_path=a.shards)
    setup = time.time() - t
    ids = model.tokenizer(a.prompt, return_tensors="pt")["input_ids"]

    def gen(n):
        t = time.time()
        out = model.generate(ids, max_new_tokens=n, use_cache=True, return_dict_in_generate=True)
        return time.time() - t, out

    t1, _ = gen(1)
    tn, out = gen(a.gen)
    new = out.sequences[0, ids.shape[1]:].tolist()
    return {"setup_s": setup, "prompt_tokens": int(ids.shape[1]), "prefill_s": t1,
            "decode_s_per_token": (tn - t1) / max(a.gen - 1, 1), "tokens": new}


def run_llamacpp(a):
    import numpy as np
    from llama_cpp import Llama

    t = time.time()
    # Default mmap; two threads, as the machine has two cores.
    # logits_all keeps a row per position, so the last prompt position's logits can be read.
    llm = Llama(model_path=a.model, n_ctx=512, n_batch=512, n_threads=os.cpu_count() or 1,
                logits_all=True, verbose=False)
    setup = time.time() - t
    ids = llm.tokenize(a.prompt.encode(), add_bos=True, special=True)
    t = time.time()
    llm.eval(ids)
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    prefill = time.time() - t
    new = [tok]
    t = time.time()
    for _ in range(a.gen - 1):
        llm.eval([tok])
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        new.append(tok)
    decode = (time.time() - t) / max(a.gen - 1, 1)
    return {"setup_s": setup, "prompt_tokens": len(ids), "prefill_s": prefill,
            "decode_s_per_token": decode, "tokens": new}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("peer", choices=["airllm", "llamacpp"])
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--gen", type=int, default=8)
    p.add_argument("--shards", default=None)
    a = p.parse_args()
    r = run_airllm(a) if a.peer == "airllm" else run_llamacpp(a)
    r["peer"] = a.peer
    r["peak_rss_mib"] = vmhwm_mib()
    print(json.dumps(r))


if __name__ == "__main__":
    main()
