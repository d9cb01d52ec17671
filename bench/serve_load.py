#!/usr/bin/env python3
"""Throughput of `airllm serve` under concurrent clients, on a model streamed from disk.

Starts the server with the given budget, then runs the same closed loop of streamed completion
requests with 1 client and with N clients (default 8): each client sends its next request when
the last one ends. Reports completion tokens per second for each, the ratio, and time to first
token (p50, p95) under load, with the disk's raw read speed measured in the same run (dd,
O_DIRECT). Needs the `openai` client (scripts/test_serve.sh makes target/test-venv with it).

  target/test-venv/bin/python bench/serve_load.py --model M.gguf --max-memory 300MiB \\
      [--clients 8] [--requests 3] [--prompt-len 32] [--max-tokens 32] [--json]
"""
import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time

import openai

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def raw_read(path, limit=2 << 30):
    """The disk's sequential O_DIRECT read speed on `path`, in bytes per second."""
    count = max(1, min(os.path.getsize(path), limit) // (16 << 20))
    out = subprocess.run(
        ["dd", f"if={path}", "of=/dev/null", "bs=16M", f"count={count}", "iflag=direct"],
        capture_output=True, text=True, check=True,
    ).stderr
    m = re.search(r"(\d+) bytes .* copied, ([\d.]+) s", out)
    return int(m.group(1)) / float(m.group(2))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start(args, port):
    cmd = [args.airllm, "serve", "--port", str(port), "--parallel", str(args.clients),
           "--max-memory", args.max_memory, "--ctx-size", str(args.ctx_size)]
    if args.model:
        cmd += ["--model", args.model]
    log = open(os.path.join(args.work, "serve_load.log"), "w")
    proc = subprocess.Popen(cmd, stderr=log)
    deadline = time.time() + 600
    while time.time() < deadline:
        with open(log.name) as f:
            text = f.read()
        if "listening on" in text:
            return proc, text
        if proc.poll() is not None:
            sys.exit("serve_load: the server stopped:\n" + text)
        time.sleep(0.5)
    proc.kill()
    sys.exit("serve_load: the server did not start")


def load(client, model, clients, requests, prompts, max_tokens):
    """Runs `clients` closed loops of `requests` streamed requests each. Returns the wall time,
    completion tokens, and each request's time to first token."""
    ttft, tokens, errors = [], [], []

    def loop(c):
        for r in range(requests):
            t0 = time.time()
            first = None
            try:
                s = client.completions.create(
                    model=model, prompt=prompts[(c * requests + r) % len(prompts)],
                    max_tokens=max_tokens, temperature=0, stream=True,
                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
                )
                n = 0
                for ch in s:
                    if ch.choices and ch.choices[0].text and first is None:
                        first = time.time() - t0
                    if ch.usage is not None:
                        n = ch.usage.completion_tokens
                tokens.append(n)
                ttft.append(first if first is not None else time.time() - t0)
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(repr(e))

    threads = [threading.Thread(target=loop, args=(c,)) for c in range(clients)]
    t = time.time()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    wall = time.time() - t
    if errors:
        sys.exit(f"serve_load: {len(errors)} requests failed: {errors[:3]}")
    return wall, sum(tokens), ttft


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--airllm", default=os.path.join(ROOT, "target/release/airllm"))
    ap.add_argument("--model", help="default: the default model")
    ap.add_argument("--max-memory", required=True)
    ap.add_argument("--ctx-size", type=int, default=256)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=3, help="requests per client")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--work", default="/tmp")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    model_file = args.model or os.path.join(
        os.environ.get("AIRLLM_MODELS", os.path.expanduser("~/.cache/airllm/models")),
        "gemma-3-270m-q4_k_m.gguf")
    raw = raw_read(model_file)
    port = free_port()
    proc, log = start(args, port)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none",
                               max_retries=0, timeout=3600)
        model = client.models.list().data[0].id
        # Fixed prompts of token ids (same length for every request), distinct per request.
        prompts = [[1000 + 37 * i + j for j in range(args.prompt_len)] for i in range(64)]
        load(client, model, 1, 1, prompts, 4)  # warm up: page tables, first reads
        w1, n1, t1 = load(client, model, 1, args.requests, prompts, args.max_tokens)
        wn, nn, tn = load(client, model, args.clients, args.requests, prompts, args.max_tokens)
    finally:
        proc.terminate()
        proc.wait()
    plan = "\n".join(l for l in log.splitlines() if l.startswith(("plan", "  ")))
    r = {
        "model": model_file, "max_memory": args.max_memory, "clients": args.clients,
        "requests_per_client": args.requests, "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens, "raw_read_bytes_per_s": raw,
        "one_client_tokens_per_s": n1 / w1, "n_clients_tokens_per_s": nn / wn,
        "speedup": (nn / wn) / (n1 / w1),
        "ttft_one_client_p50_s": pct(t1, 50),
        "ttft_p50_s": pct(tn, 50), "ttft_p95_s": pct(tn, 95), "plan": plan,
    }
    if args.json:
        print(json.dumps(r))
        return
    print(plan)
    print(f"raw disk read (dd, O_DIRECT): {raw / 1e9:.2f} GB/s")
    print(f"1 client:  {r['one_client_tokens_per_s']:.2f} tokens/s (first token p50 {r['ttft_one_client_p50_s']:.2f} s)")
    print(f"{args.clients} clients: {r['n_clients_tokens_per_s']:.2f} tokens/s = {r['speedup']:.2f}x "
          f"(first token p50 {r['ttft_p50_s']:.2f} s, p95 {r['ttft_p95_s']:.2f} s)")


main()
