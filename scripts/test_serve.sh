#!/usr/bin/env bash
# `airllm serve` against the official OpenAI Python client (tests/serve/test_openai.py), on the
# default model streamed at part of its size. Makes the test venv (target/test-venv) on first
# use; needs python3 with venv and pip, and the release binary (scripts/test.sh builds it).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=target/test-venv
if ! "$VENV/bin/python" -c "import openai, httpx" 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check -r tests/serve/requirements.txt
fi
BIN=target/release/airllm
[ -x "$BIN" ] || cargo build --release -q -p airllm-cli
BUDGET_MIB=360
# What the server holds beyond its budget: the binary and libraries, the HTTP runtime's
# threads and buffers, and the allocator's slack (measured peak: see docs/benchmarks.md).
OVERHEAD_MIB=64
KEY=test-key-$$
LOG=$(mktemp)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$BIN" serve --max-memory ${BUDGET_MIB}MiB --ctx-size 512 --parallel 8 --port "$PORT" --api-key "$KEY" 2>"$LOG" &
PID=$!
trap 'kill $PID 2>/dev/null || true; rm -f "$LOG"' EXIT
for _ in $(seq 120); do
  if grep -q "listening on" "$LOG"; then break; fi
  if ! kill -0 $PID 2>/dev/null; then cat "$LOG" >&2; exit 1; fi
  sleep 0.5
done
ok=0
"$VENV/bin/python" tests/serve/test_openai.py "http://127.0.0.1:$PORT" "$KEY" $PID \
  $((BUDGET_MIB << 20)) $((OVERHEAD_MIB << 20)) "$BIN" || ok=$?
if ! kill -0 $PID 2>/dev/null; then
  echo "test_serve: the server died" >&2
  ok=1
fi
if [ $ok != 0 ]; then
  echo "--- server log" >&2
  tail -40 "$LOG" >&2
fi
exit $ok
