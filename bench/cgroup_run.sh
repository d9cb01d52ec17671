#!/usr/bin/env bash
# Runs a command inside a fresh memory cgroup with a hard limit that includes the page cache,
# then reports the cgroup's peak usage and whether the kernel killed the process for memory.
# Works with cgroup v2 (unified) and v1 (memory controller). Needs root.
#
# usage: bench/cgroup_run.sh LIMIT_MIB command [args...]
# Prints to stderr: "cgroup: limit N MiB, peak M MiB, oom_kill K, exit E"; exits with the command's status.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 LIMIT_MIB command [args...]" >&2; exit 2; }
limit_mib=$1; shift
limit=$((limit_mib * 1024 * 1024))
name="airllm-bench-$$"
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
  cg=/sys/fs/cgroup/$name
  mkdir "$cg"
  echo "$limit" > "$cg/memory.max"
  [ -f "$cg/memory.swap.max" ] && echo 0 > "$cg/memory.swap.max"
  procs="$cg/cgroup.procs"
  peak_file="$cg/memory.peak"
  v=2
else
  cg=/sys/fs/cgroup/memory/$name
  mkdir "$cg"
  echo "$limit" > "$cg/memory.limit_in_bytes"
  [ -f "$cg/memory.memsw.limit_in_bytes" ] && echo "$limit" > "$cg/memory.memsw.limit_in_bytes" 2>/dev/null || true
  procs="$cg/tasks"
  peak_file="$cg/memory.max_usage_in_bytes"
  v=1
fi
cleanup() { rmdir "$cg" 2>/dev/null || true; }
trap cleanup EXIT
set +e
sh -c 'echo $$ > "$1"; shift; exec "$@"' sh "$procs" "$@"
status=$?
set -e
peak=$(cat "$peak_file" 2>/dev/null || echo 0)
if [ $v = 2 ]; then
  oom=$(awk '/^oom_kill /{print $2}' "$cg/memory.events" 2>/dev/null || echo 0)
else
  oom=$(awk '/^oom_kill /{print $2}' "$cg/memory.oom_control" 2>/dev/null || echo "?")
fi
echo "cgroup v$v: limit ${limit_mib} MiB, peak $((peak / 1048576)) MiB, oom_kill ${oom:-0}, exit $status" >&2
exit $status
