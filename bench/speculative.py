#!/usr/bin/env python3
"""Speculative decoding against plain streaming, at the same memory budget (docs/benchmarks.md).

The target is the default model's exact function: its Q4_K_M GGUF dequantized to an f32
folder (`airllm convert --dequantize`, about 1.07 GB), streamed at a budget well below that.
The draft is the Q4_K_M file itself, kept resident in the same budget. Greedy decoding; the
script checks that every speculative run gives the plain run's tokens, and reports decode
tokens/s, acceptance and tokens per sweep, with the disk's raw read bandwidth measured in the
same run (`airllm bench`). `--lookup` runs on the same prompts, one of them a rewriting task.

    python3 bench/speculative.py [--max-memory 640MiB] [-n 64] [--target DIR] [--draft GGUF]

Needs only the release binary (cargo build --release -p airllm-cli) and the default model.
"""
import argparse
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "airllm")
MODELS = os.environ.get("AIRLLM_MODELS") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "airllm", "models")
DEFAULT = os.path.join(MODELS, "gemma-3-270m-q4_k_m.gguf")

PROMPTS = {
    "story": "Write a short story about a robot who learns to paint. Once upon a time",
    "facts": "The three most important inventions of the twentieth century were",
    "rewrite": (
        "Rewrite the paragraph below with the spelling fixed.\n\n"
        "Paragraph: The comittee met on tuesday to discus the new libary. Every member agreed that "
        "the old bilding was to small for the growing town, and that the new one should have a "
        "reading room, a childrens corner and a garden.\n\n"
        "Fixed: The committee met on Tuesday to discuss the new library. Every member agreed that"
    ),
}


def run(model, prompt, n, budget, extra):
    cmd = [BIN, "run", "-m", model, "-p", prompt, "-n", str(n), "--temperature", "0",
           "--ignore-eos", "--json", "--max-memory", budget] + extra
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    m = re.search(r"generated (\d+) tokens in ([\d.]+)s: prefill ([\d.]+)s", p.stderr)
    gen, total, prefill = int(m.group(1)), float(m.group(2)), float(m.group(3))
    s = re.search(r"speculation: (\d+) of (\d+) guesses accepted \(([\d.]+)%\), ([\d.]+) tokens per sweep",
                  p.stderr)
    return {
        "ids": out["token_ids"],
        # The first token comes from the prefill; the rest from decode sweeps.
        "decode_tps": (gen - 1) / max(total - prefill, 1e-9),
        "accepted": s and f"{s.group(1)}/{s.group(2)} ({s.group(3)}%)",
        "per_sweep": s and float(s.group(4)),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-memory", default="640MiB")
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("--target", default="/tmp/airllm-spec/gemma-f32")
    ap.add_argument("--draft", default=DEFAULT)
    ap.add_argument("--lookup", type=int, default=10)
    a = ap.parse_args()
    if not os.path.exists(a.target):
        subprocess.run([BIN, "convert", "--dequantize", "-m", a.draft, "-o", a.target], check=True)
    bench = subprocess.run([BIN, "bench", "-m", a.target, "--max-memory", a.max_memory,
                            "--prompt-len", "8", "--gen", "2", "--json"],
                           capture_output=True, text=True, check=True)
    raw = json.loads(bench.stdout)["raw_read_bandwidth"]
    size = sum(os.path.getsize(os.path.join(a.target, f)) for f in os.listdir(a.target))
    print(f"target {a.target} ({size / 1e9:.2f} GB f32), draft {a.draft}, budget {a.max_memory}, "
          f"{a.n} greedy tokens; raw disk read {raw / 1e9:.2f} GB/s\n")
    print("| prompt | plain tok/s | --draft tok/s | speed-up | accepted | tokens/sweep "
          "| --lookup tok/s | speed-up | accepted | tokens/sweep | identical |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, prompt in PROMPTS.items():
        plain = run(a.target, prompt, a.n, a.max_memory, [])
        draft = run(a.target, prompt, a.n, a.max_memory, ["--draft", a.draft])
        look = run(a.target, prompt, a.n, a.max_memory, ["--lookup", str(a.lookup)])
        same = draft["ids"] == plain["ids"] and look["ids"] == plain["ids"]
        print(f"| {name} | {plain['decode_tps']:.2f} | {draft['decode_tps']:.2f} | "
              f"{draft['decode_tps'] / plain['decode_tps']:.2f}× | {draft['accepted']} | "
              f"{draft['per_sweep']:.2f} | {look['decode_tps']:.2f} | "
              f"{look['decode_tps'] / plain['decode_tps']:.2f}× | {look['accepted']} | "
              f"{look['per_sweep']:.2f} | {'yes' if same else 'NO'} |", flush=True)
        if not same:
            sys.exit("speculative output differs from plain greedy output")


main()
