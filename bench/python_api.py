"""Decode speed through the Python API against `airllm run` on the same model, budget and prompt
(greedy, the same tokens), to show what the binding costs per token, with the disk's raw read
bandwidth (dd, O_DIRECT, on the model file) measured in the same run. Run with the wheel
installed (scripts/test_python.sh installs it into target/test-venv):

    target/test-venv/bin/python bench/python_api.py [--model M] [--max-memory 160MiB] [--gen 64]
"""

import argparse
import json
import re
import subprocess
import time

from airllm_rs import AutoModel

PROMPT = "The three most important inventions of the twentieth century were"

ap = argparse.ArgumentParser()
ap.add_argument("--model", default=None)
ap.add_argument("--max-memory", default="160MiB")
ap.add_argument("--gen", type=int, default=64)
ap.add_argument("--bin", default="target/release/airllm")
ap.add_argument("--runs", type=int, default=3)
a = ap.parse_args()

cli_args = [a.bin, "run", "-p", PROMPT, "-n", str(a.gen), "--temperature", "0",
            "--json", "--max-memory", a.max_memory, "-c", "128", "-b", "16"]
if a.model:
    cli_args += ["-m", a.model]
m = AutoModel.from_pretrained(a.model, max_memory=a.max_memory, max_seq_len=128, batch_size=16,
                               progress=False)
ids = m.tokenizer(PROMPT)["input_ids"]
dd = subprocess.run(["dd", f"if={m.path}", "of=/dev/null", "bs=8M", "iflag=direct"],
                    capture_output=True, text=True)
print(json.dumps({"model": m.path, "max_memory": a.max_memory,
                  "raw_disk": dd.stderr.strip().splitlines()[-1]}))
for run in range(a.runs):
    p = subprocess.run(cli_args, capture_output=True, text=True, check=True)
    cli = json.loads(p.stdout.splitlines()[0])
    step = float(re.search(r"decode ([0-9.]+) s/step", p.stderr).group(1))
    t = time.perf_counter()
    out = m.generate(ids, max_new_tokens=a.gen)
    py_s = time.perf_counter() - t
    new = out[len(ids):]
    assert new[: len(cli["token_ids"])] == cli["token_ids"], "the Python API and the CLI disagree"
    print(json.dumps({"run": run, "cli_decode_s_per_token": step,
                      "python_total_s": round(py_s, 3),
                      "python_s_per_token_incl_prefill": round(py_s / a.gen, 4)}))
