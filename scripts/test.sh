#!/usr/bin/env bash
# The whole test suite: formatting, lints, and every test (unit, transformers fixtures, CLI).
# The fixtures are committed, so no Python or network beyond crates.io is needed.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all --check
cargo clippy --release --all-targets -- -D warnings
cargo test --release --workspace
