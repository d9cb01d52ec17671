#!/usr/bin/env bash
# Builds the airllm_rs Python wheel (abi3: one wheel for CPython 3.9 and later) into
# target/wheels, with maturin from PyPI in a venv of its own (target/maturin-venv), and prints
# the wheel's path. Needs only cargo and python3 with venv and pip. Arguments go to
# `maturin build` (e.g. --features cuda, with the toolkit that scripts/build_cuda.sh sets up).
set -euo pipefail
cd "$(dirname "$0")/.."
MATURIN_VERSION=1.16.0
VENV=target/maturin-venv
if [ "$("$VENV/bin/maturin" --version 2>/dev/null)" != "maturin $MATURIN_VERSION" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "maturin==$MATURIN_VERSION"
fi
rm -f target/wheels/airllm_rs-*.whl
"$VENV/bin/maturin" build --release --quiet -m crates/airllm-py/Cargo.toml --out target/wheels "$@" >&2
ls target/wheels/airllm_rs-*.whl
