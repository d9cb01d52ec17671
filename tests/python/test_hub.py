"""Models by repo id, through hf-hub, against a mock hub on 127.0.0.1 (tests/python/mock_hub.py)."""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from airllm_rs import AirLLMError, AutoModel, pull
from conftest import CHAT_MODEL, GGUF, SHARDED_MODEL, run_cli

COMMIT = "0123456789abcdef0123456789abcdef01234567"
NEEDED = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "model.safetensors.index.json"} | {f"model-{i:05}-of-00017.safetensors" for i in range(1, 18)}


def test_pull_fetches_only_what_the_model_needs_into_the_hf_cache_layout(hub, airllm_bin):
    hub.add_folder("tiny/qwen2", SHARDED_MODEL, commit=COMMIT)
    out = run_cli(airllm_bin, "pull", "tiny/qwen2").stdout.strip()
    repo = hub.cache / "models--tiny--qwen2"
    snap = repo / "snapshots" / COMMIT
    assert out == str(snap)
    assert (repo / "refs" / "main").read_text().strip() == COMMIT
    assert {p.name for p in snap.iterdir()} == NEEDED  # not reference.json / reference.safetensors
    for p in snap.iterdir():
        assert p.is_symlink() and os.readlink(p).startswith("../../blobs/"), p
        assert p.read_bytes() == (SHARDED_MODEL / p.name).read_bytes()
    assert not list((repo / "blobs").glob("*.part"))
    fetched = {r[0].rsplit("/", 1)[1] for r in hub.requests if "/resolve/" in r[0]}
    assert fetched == NEEDED


def test_a_second_run_uses_no_network(hub, airllm_bin, monkeypatch):
    hub.add_folder("tiny/chat", CHAT_MODEL, commit=COMMIT)
    first = run_cli(airllm_bin, "run", "-m", "tiny/chat", "-p", "Hello", "-n", "4",
                    "--temperature", "0", "--json").stdout
    seen = len(hub.requests)
    assert seen > 0
    again = run_cli(airllm_bin, "run", "-m", "tiny/chat", "-p", "Hello", "-n", "4",
                    "--temperature", "0", "--json").stdout
    assert again == first
    m = AutoModel.from_pretrained("tiny/chat", max_memory="64MiB", progress=False)
    assert m.path == str(hub.cache / "models--tiny--chat" / "snapshots" / COMMIT)
    assert len(hub.requests) == seen, hub.requests[seen:]
    # Offline, with the hub gone, the cache still serves it.
    hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert run_cli(airllm_bin, "pull", "tiny/chat").stdout.strip().endswith(COMMIT)
    e = run_cli(airllm_bin, "pull", "tiny/other", check=False)
    assert e.returncode != 0
    assert e.stderr.strip().splitlines() == [
        f"error: tiny/other: not in the cache {hub.cache} at revision `main`, and HF_HUB_OFFLINE is set; unset it to download"
    ]


def test_a_download_cut_off_resumes_where_it_stopped(hub, airllm_bin):
    hub.add_folder("tiny/qwen2", SHARDED_MODEL, commit=COMMIT)
    shard = "model-00003-of-00017.safetensors"
    hub.cut[shard] = 1000
    run_cli(airllm_bin, "pull", "tiny/qwen2")
    assert [r[1] for r in hub.downloads(shard)] == ["bytes=0-", "bytes=1000-"]
    snap = hub.cache / "models--tiny--qwen2" / "snapshots" / COMMIT
    assert (snap / shard).read_bytes() == (SHARDED_MODEL / shard).read_bytes()


def test_an_interrupted_pull_resumes_from_its_part_file(hub, airllm_bin):
    hub.add_folder("tiny/qwen2", SHARDED_MODEL, commit=COMMIT)
    shard = "model-00001-of-00017.safetensors"
    hub.stall[shard] = 3000
    p = subprocess.Popen([airllm_bin, "pull", "-q", "tiny/qwen2"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    blobs = hub.cache / "models--tiny--qwen2" / "blobs"
    deadline = time.time() + 60
    while time.time() < deadline:
        parts = list(blobs.glob("*.part")) if blobs.exists() else []
        if parts and parts[0].stat().st_size == 3000:
            break
        time.sleep(0.05)
    else:
        p.kill()
        raise AssertionError("the download never stalled at 3000 bytes")
    p.send_signal(signal.SIGKILL)
    p.wait()
    # A partial snapshot is not taken for the model: offline it is refused, online completed.
    off = dict(os.environ, HF_HUB_OFFLINE="1")
    e = run_cli(airllm_bin, "run", "-m", "tiny/qwen2", "-p", "x", "-n", "2", env=off, check=False)
    assert "not in the cache" in e.stderr and e.returncode != 0
    run_cli(airllm_bin, "run", "-m", "tiny/qwen2", "-p", "x", "-n", "2")
    assert [r[1] for r in hub.downloads(shard)] == ["bytes=0-", "bytes=3000-"]
    snap = hub.cache / "models--tiny--qwen2" / "snapshots" / COMMIT
    assert (snap / shard).read_bytes() == (SHARDED_MODEL / shard).read_bytes()
    assert not list(blobs.glob("*.part"))


def test_a_missing_repo_or_revision_gets_one_line(hub, airllm_bin):
    hub.add_folder("tiny/chat", CHAT_MODEL, commit=COMMIT)
    e = run_cli(airllm_bin, "pull", "nobody/none", check=False)
    assert e.returncode != 0
    assert e.stderr.strip().splitlines() == [
        f"error: nobody/none: no such model at {hub.url} (check the id; a private repo needs HF_TOKEN)"
    ]
    e = run_cli(airllm_bin, "run", "-m", "tiny/chat", "--revision", "v9", "-p", "x", check=False)
    assert e.stderr.strip().splitlines() == ["error: tiny/chat: has no revision `v9`"]
    with pytest.raises(AirLLMError, match=r"^nobody/none: no such model at "):
        AutoModel.from_pretrained("nobody/none", progress=False)
    assert not (hub.cache / "models--nobody--none" / "snapshots").exists()


def test_a_gated_repo_says_what_to_do_and_opens_with_a_token(hub, airllm_bin, monkeypatch):
    hub.add_folder("org/gated", CHAT_MODEL, commit=COMMIT, gated_token="hf_secret")
    e = run_cli(airllm_bin, "pull", "org/gated", check=False)
    assert e.returncode != 0
    assert e.stderr.strip().splitlines() == [
        f"error: org/gated: is gated: accept its terms at {hub.url}/org/gated while logged in, then set HF_TOKEN to a token of that account"
    ]
    # The token file `hf auth login` writes, then HF_TOKEN, then from_pretrained(hf_token=...).
    token_file = Path(os.environ["HF_HOME"]) / "token"
    token_file.parent.mkdir(parents=True, exist_ok=True)
    token_file.write_text("hf_secret\n")
    assert run_cli(airllm_bin, "pull", "org/gated").stdout.strip().endswith(COMMIT)
    assert hub.requests[-1][2] == "Bearer hf_secret"
    token_file.unlink()
    shutil.rmtree(hub.cache)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    path = pull("org/gated", progress=False)
    assert path.endswith(COMMIT)
    assert hub.requests[-1][2] == "Bearer hf_secret"
    monkeypatch.delenv("HF_TOKEN")
    shutil.rmtree(hub.cache)
    m = AutoModel.from_pretrained("org/gated", hf_token="hf_secret", revision=COMMIT, progress=False)
    assert m.path.endswith(COMMIT) and "HF_TOKEN" not in os.environ
    assert not (hub.cache / "models--org--gated" / "refs" / COMMIT).exists()


def test_one_gguf_file_by_its_type(hub, airllm_bin):
    hub.add("tiny/gguf", {"m-Q8_0.gguf": GGUF / "qwen3-q8_0.gguf",
                          "m-F32.gguf": GGUF / "qwen3-f32.gguf",
                          "README.md": CHAT_MODEL / "config.json"}, commit=COMMIT)
    e = run_cli(airllm_bin, "pull", "tiny/gguf", check=False)
    assert "holds several GGUF files; name one as tiny/gguf:QUANT" in e.stderr
    out = run_cli(airllm_bin, "pull", "tiny/gguf:q8_0").stdout.strip()
    assert out.endswith(f"snapshots/{COMMIT}/m-Q8_0.gguf")
    fetched = {r[0].rsplit("/", 1)[1] for r in hub.requests if "/resolve/" in r[0]}
    assert fetched == {"m-Q8_0.gguf"}
    m = AutoModel.from_pretrained("tiny/gguf/m-Q8_0.gguf", progress=False)
    assert m.path == out
    assert len(m.generate([1, 2, 3], max_new_tokens=3)) == 6


def test_a_new_commit_reuses_unchanged_files_and_moves_main(hub, airllm_bin):
    hub.add_folder("tiny/qwen2", SHARDED_MODEL, commit=COMMIT)
    run_cli(airllm_bin, "pull", "tiny/qwen2")
    new = "fedcba9876543210fedcba9876543210fedcba98"
    files = {n: SHARDED_MODEL / n for n in NEEDED}
    files["tokenizer_config.json"] = CHAT_MODEL / "tokenizer_config.json"  # one file changed
    hub.add("tiny/qwen2", files, commit=new)
    seen = len(hub.requests)
    out = run_cli(airllm_bin, "pull", "tiny/qwen2").stdout.strip()
    repo = hub.cache / "models--tiny--qwen2"
    assert out == str(repo / "snapshots" / new)
    assert (repo / "refs" / "main").read_text() == new
    assert not (repo / "refs" / new).exists()
    bodies = [r for r in hub.requests[seen:] if "/resolve/" in r[0] and r[1] != "bytes=0-0"]
    assert [r[0].rsplit("/", 1)[1] for r in bodies] == ["tokenizer_config.json"]
    assert {p.name for p in (repo / "snapshots" / new).iterdir()} == NEEDED
    assert (repo / "snapshots" / new / "tokenizer_config.json").read_bytes() == files["tokenizer_config.json"].read_bytes()
    run_cli(airllm_bin, "run", "-m", "tiny/qwen2", "-p", "x", "-n", "2")


def test_a_gguf_in_a_subfolder_is_found_in_the_cache(hub, airllm_bin):
    hub.add("tiny/sub", {"Q8_0/m-Q8_0.gguf": GGUF / "qwen3-q8_0.gguf"}, commit=COMMIT)
    out = run_cli(airllm_bin, "pull", "tiny/sub:Q8_0").stdout.strip()
    assert out.endswith(f"snapshots/{COMMIT}/Q8_0/m-Q8_0.gguf")
    seen = len(hub.requests)
    for spec in ("tiny/sub:Q8_0", "tiny/sub", "tiny/sub/Q8_0/m-Q8_0.gguf"):
        run_cli(airllm_bin, "run", "-m", spec, "-p", "x", "-n", "2")
    assert len(hub.requests) == seen


def test_a_repo_without_tokenizer_json_is_refused_before_downloading(hub, airllm_bin):
    hub.add("tiny/notok", {"config.json": CHAT_MODEL / "config.json",
                           "model.safetensors": CHAT_MODEL / "model.safetensors"}, commit=COMMIT)
    e = run_cli(airllm_bin, "pull", "tiny/notok", check=False)
    assert e.stderr.strip().splitlines() == [
        "error: tiny/notok: has no tokenizer.json (airllm reads tokenizers in that form; a repo with only tokenizer.model needs converting, or use a GGUF of the model)"
    ]
    assert not [r for r in hub.requests if "/resolve/" in r[0]]
