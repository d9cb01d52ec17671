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
PID=
trap 'kill $PID 2>/dev/null || true; rm -f "$LOG"' EXIT

# serve_and_test "SERVER FLAGS" [CHECKS...]: starts a server with the flags, runs the checks
# (all when none are named) and stops it.
serve_and_test() {
  local flags=$1
  shift
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  # shellcheck disable=SC2086
  "$BIN" serve --max-memory ${BUDGET_MIB}MiB --ctx-size 512 --port "$port" --api-key "$KEY" $flags 2>"$LOG" &
  PID=$!
  for _ in $(seq 120); do
    if grep -q "listening on" "$LOG"; then break; fi
    if ! kill -0 $PID 2>/dev/null; then cat "$LOG" >&2; return 1; fi
    sleep 0.5
  done
  local ok=0
  "$VENV/bin/python" tests/serve/test_openai.py "http://127.0.0.1:$port" "$KEY" $PID \
    $((BUDGET_MIB << 20)) $((OVERHEAD_MIB << 20)) "$BIN" "$@" || ok=$?
  if ! kill -0 $PID 2>/dev/null; then
    echo "test_serve: the server died" >&2
    ok=1
  fi
  if [ $ok != 0 ]; then
    echo "--- server log ($flags)" >&2
    tail -40 "$LOG" >&2
  fi
  kill $PID 2>/dev/null || true
  wait $PID 2>/dev/null || true
  return $ok
}

serve_and_test "--parallel 8"
# Speculation (n-gram lookup) under the same clients: greedy text still equals plain `run`'s,
# and batches, streaming, sampling and disconnects work with guesses in the sweeps.
echo "with --lookup 8:"
serve_and_test "--parallel 4 --lookup 8" test_chat_stream test_seed_repeats \
  test_greedy_matches_run test_logprobs test_64_concurrent_clients test_disconnect_mid_stream
# GPT-OSS's harmony format (the tiny fixture): reasoning_content split out, streamed and whole.
echo "GPT-OSS (harmony):"
serve_and_test "-m tests/fixtures/hf/gpt-oss-mxfp4 --parallel 2" test_harmony_reasoning
