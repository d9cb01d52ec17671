#!/usr/bin/env python3
"""Turns bench/compare.sh's results into docs/compare.md and docs/compare.png.

usage: compare_report.py RESULTS.jsonl DOCS_DIR COMMAND MODEL_BYTES PROMPT_TOKENS OUR_BUDGET_MIB
"""
import json
import os
import platform
import subprocess
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def machine():
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {mem:.0f} GiB RAM, Linux {platform.release()}"


def main():
    results, docs, command, model_bytes, plen, budget = sys.argv[1:7]
    rows = [json.loads(l) for l in open(results) if l.strip()]
    model_gb = int(model_bytes) / 1e9
    lines = [
        "# airllm-rs, AirLLM and llama.cpp side by side",
        "",
        f"Machine: {machine()}. Model: a Llama-shaped synthetic bf16 checkpoint of "
        f"{model_gb:.2f} GB (`airllm synth`); llama.cpp runs the same weights converted to a "
        f"bf16 GGUF by `airllm convert -q bf16`. Prompt: {plen} tokens; greedy decoding. "
        f"Page cache dropped before each run. airllm-rs gets `--max-memory {budget}MiB` inside "
        "the cap (the rest covers the binary, tokenizer and allocator); its bench feeds "
        "prompt-length random token ids, which costs the same compute as the text.",
        "",
        f"Command: `{command}`",
        "",
        "| run | memory cap (cgroup, page cache included) | prefill (s) | decode s/token | decode tokens/s | peak RSS (MiB) | cgroup peak (MiB) | OOM kill | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "failed" in r:
            lines.append(f"| {r['name']} | {r['cap_mib'] or 'none'} | | | | | {r.get('cgroup_peak_mib', '')} | {r.get('oom_kill', '')} | failed: {' / '.join(r['failed'])} |")
            continue
        if "decode_tokens_per_s" in r:  # ours
            tps = r["decode_tokens_per_s"]
            spt = r["decode_s_per_token"]
            prefill = r["prompt_len"] * r["batch"] / max(r["prefill_tokens_per_s"], 1e-9)
            rss = r["peak_rss_bytes"] / 2**20
            note = (f"batch {r['batch']}; "
                    f"{r['resident_layers']} layers resident, {r['streamed_layers']} streamed; "
                    f"{r['bytes_read_per_token'] / 1e9:.2f} GB read per sweep, raw disk "
                    f"{r['raw_read_bandwidth'] / 1e9:.2f} GB/s")
        else:
            spt = r["decode_s_per_token"]
            tps = 1 / max(spt, 1e-9)
            prefill = r["prefill_s"]
            rss = r["peak_rss_mib"]
            note = f"setup {r['setup_s']:.0f} s"
            if r["peer"] == "airllm":
                note += " (includes writing its per-layer copy of the checkpoint)"
        r["_tps"], r["_rss"] = tps, rss
        lines.append(
            f"| {r['name']} | {r['cap_mib'] or 'none'} | {prefill:.2f} | {spt:.3f} | {tps:.3f} | "
            f"{rss:.0f} | {r.get('cgroup_peak_mib', '')} | {r.get('oom_kill', '')} | {note} |")
    lines += ["", "![tokens/s and peak memory](compare.png)", ""]
    with open(os.path.join(docs, "compare.md"), "w") as f:
        f.write("\n".join(lines))

    ok = [r for r in rows if "_tps" in r]
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r["name"] for r in ok]
    ax[0].barh(names, [r["_tps"] for r in ok], color="#4477aa")
    ax[0].set_xscale("log")
    ax[0].set_xlabel("decode tokens/s (log scale, higher is better)")
    ax[1].barh(names, [r["_rss"] for r in ok], color="#cc6677", label="peak RSS")
    ax[1].barh(names, [r.get("cgroup_peak_mib") or 0 for r in ok], color="none",
               edgecolor="black", label="cgroup peak (incl. page cache)")
    ax[1].set_xlabel("MiB")
    ax[1].legend(loc="lower right", fontsize=8)
    for a in ax:
        a.invert_yaxis()
    fig.suptitle(f"{model_gb:.2f} GB bf16 model, {machine()}", fontsize=9)
    fig.tight_layout()
    fig.savefig(os.path.join(docs, "compare.png"), dpi=110)


if __name__ == "__main__":
    main()
