#!/usr/bin/env bash
# The Python package's tests (tests/python): builds the wheel (scripts/build_wheel.sh), installs
# it with pytest and numpy into the test venv (target/test-venv), and runs pytest. The hub tests
# talk to a mock hub on 127.0.0.1; nothing else is reached. Needs the release binary
# (scripts/test.sh builds it) for the tests that compare with the CLI.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$PWD/target/test-venv
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
if ! "$VENV/bin/python" -c "import pytest, numpy" 2>/dev/null; then
  "$VENV/bin/pip" install -q --disable-pip-version-check -r tests/python/requirements.txt
fi
cargo build --release -q -p airllm-cli
WHEEL=$(./scripts/build_wheel.sh)
"$VENV/bin/pip" install -q --disable-pip-version-check --force-reinstall --no-deps "$WHEEL"
# Run from tests/python so `import airllm_rs` finds the installed wheel, not a source folder.
cd tests/python
AIRLLM_BIN="$PWD/../../target/release/airllm" "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
