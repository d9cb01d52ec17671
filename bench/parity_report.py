#!/usr/bin/env python3
"""Turns bench/parity.sh's JSON lines into the ratio table, prints it, and with --docs writes it
between the parity markers of docs/benchmarks.md (replacing the previous run's table)."""
import argparse
import datetime
import json
import os
import platform
import re

BEGIN = "<!-- parity:begin -->"
END = "<!-- parity:end -->"


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--prompt-len", type=int)
    ap.add_argument("--gen", type=int)
    ap.add_argument("--batch-prompt-len", type=int)
    ap.add_argument("--batch-gen", type=int)
    ap.add_argument("--stream-fraction", type=float)
    ap.add_argument("--commit")
    ap.add_argument("--docs")
    a = ap.parse_args()
    rows = [json.loads(l) for l in open(a.results) if l.strip()]
    get = {(r["case"], r["peer"]): r for r in rows}

    def val(case, peer, key):
        r = get.get((case, peer))
        if r is None or key not in r:
            return None
        return r[key]

    def prefill_s(case, peer):
        r = get.get((case, peer))
        if r is None or "prefill_tokens_per_s" not in r:
            return None
        return r["prompt_len"] * r["batch"] / r["prefill_tokens_per_s"]

    def fmt(x, unit):
        if x is None:
            return "failed"
        return f"{x * 1e3:.1f} ms" if unit == "ms" else f"{x:.3f} s"

    def ratio(a_, b_):
        return None if a_ is None or b_ is None or b_ == 0 else a_ / b_

    def rfmt(x, target):
        if x is None:
            return "–"
        ok = "" if target is None else (" ✓" if x <= target else " ✗")
        return f"{x:.2f}×{ok}"

    names = {
        "default": "Gemma 3 270M Q4_K_M (default model)",
        "seven": f"7B-shaped synthetic, {a.layers} layers, Q4_K_M",
    }
    lines = [
        "| model | measure | airllm-rs | llama.cpp | airllm-rs / llama.cpp |",
        "|---|---|---|---|---|",
    ]
    stream = [
        "| model | batch-1 sweep | batch-8 sweep | batch 8 / batch 1 | resident: batch 8 / batch 1 | read per sweep | raw disk read |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in ("default", "seven"):
        n = names[m]
        pf = (prefill_s(f"{m}/single", "airllm"), prefill_s(f"{m}/single", "llamacpp"))
        dc = (val(f"{m}/single", "airllm", "decode_s_per_token"),
              val(f"{m}/single", "llamacpp", "decode_s_per_token"))
        b8 = (val(f"{m}/batch8", "airllm", "decode_s_per_token"),
              val(f"{m}/batch8", "llamacpp", "decode_s_per_token"))
        lines.append(f"| {n} | prefill, {a.prompt_len} tokens | {fmt(pf[0], 's')} | {fmt(pf[1], 's')} | {rfmt(ratio(*pf), 1.25)} |")
        lines.append(f"| {n} | decode, per token ({a.gen} tokens) | {fmt(dc[0], 'ms')} | {fmt(dc[1], 'ms')} | {rfmt(ratio(*dc), 1.25)} |")
        lines.append(f"| {n} | batch-8 decode sweep | {fmt(b8[0], 'ms')} | {fmt(b8[1], 'ms')} | {rfmt(ratio(*b8), None)} |")
        s1 = val(f"{m}/streamed1", "airllm", "decode_s_per_token")
        s8 = val(f"{m}/streamed8", "airllm", "decode_s_per_token")
        r1 = val(f"{m}/batch1", "airllm", "decode_s_per_token")
        read = val(f"{m}/streamed8", "airllm", "bytes_read_per_token")
        raw = val(f"{m}/streamed8", "airllm", "raw_read_bandwidth")
        stream.append(
            f"| {n} | {fmt(s1, 'ms')} | {fmt(s8, 'ms')} | {rfmt(ratio(s8, s1), 1.3)} | "
            f"{rfmt(ratio(b8[0], r1), None)} | "
            f"{'–' if read is None else f'{read / 2**20:.0f} MiB'} | "
            f"{'–' if raw is None else f'{raw / 1e9:.2f} GB/s'} |")
    machine = f"{cpu_name()}, {os.cpu_count()} cores"
    text = "\n".join([
        BEGIN,
        f"### Compute parity with llama.cpp (`bench/parity.sh`)",
        "",
        f"Run {datetime.date.today()} at commit {a.commit}, on {machine}; llama.cpp is "
        f"llama-cpp-python {val('default/single', 'llamacpp', 'llama_cpp_python')} built for this "
        "CPU, two threads. Same prompt ids and token counts on both sides; prefill computes the "
        f"last position's logits only. Batch rows: 8 sequences of {a.batch_prompt_len}-token "
        f"prompts, {a.batch_gen} sweeps. Targets: prefill and decode within 1.25× (✓/✗).",
        "",
        *lines,
        "",
        f"Streamed (ours), at {a.stream_fraction:g} of the model's size as `--max-memory`; target: "
        "a batch-8 sweep within 1.3× a batch-1 sweep. The raw read is the disk's, measured in "
        "the same run.",
        "",
        *stream,
        END,
    ])
    print(text)
    if a.docs:
        doc = open(a.docs).read()
        if BEGIN in doc and END in doc:
            doc = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: text, doc, flags=re.S)
        else:
            doc = doc.rstrip() + "\n\n" + text + "\n"
        tmp = a.docs + ".part"
        with open(tmp, "w") as f:
            f.write(doc)
        os.replace(tmp, a.docs)


if __name__ == "__main__":
    main()
