"""Shared fixtures of the Python tests: the CLI binary, the tiny fixture models, and a mock
hub with its own cache. ``scripts/test_python.sh`` installs the wheel and runs these."""

import os
import pathlib
import subprocess

import pytest

from mock_hub import MockHub

ROOT = pathlib.Path(__file__).resolve().parents[2]
HF = ROOT / "tests" / "fixtures" / "hf"
GGUF = ROOT / "tests" / "fixtures" / "gguf" / "tiny"
# A model with a chat template, and a sharded one.
CHAT_MODEL = HF / "qwen3-qknorm-headdim"
SHARDED_MODEL = HF / "qwen2-bias-mha-sharded"
# Under the fixture's size with its tokenizer counted, so layers stream.
BUDGET = "4MiB"


@pytest.fixture(scope="session")
def airllm_bin():
    b = os.environ.get("AIRLLM_BIN", str(ROOT / "target" / "release" / "airllm"))
    assert os.access(b, os.X_OK), f"{b}: build it with cargo build --release -p airllm-cli"
    return b


def run_cli(airllm_bin, *args, env=None, check=True):
    """Runs ``airllm ARGS``; returns the completed process (stdout and stderr as text)."""
    p = subprocess.run([airllm_bin, *args], env=env, capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"airllm {' '.join(args)} failed: {p.stderr}")
    return p


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A mock hub on 127.0.0.1 and an empty HF cache, set in this process's environment (the
    native code and CLI subprocesses read it)."""
    h = MockHub().start()
    monkeypatch.setenv("HF_ENDPOINT", h.url)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    # No other cache, token or setting of the machine's may leak in.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for k in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_TOKEN_PATH", "HF_HUB_OFFLINE",
              "TRANSFORMERS_OFFLINE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(k, raising=False)
    h.cache = tmp_path / "hf-cache"
    yield h
    h.stop()
