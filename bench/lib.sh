# Helpers the benchmark scripts source: they expect ROOT (the checkout), PY (a Python with the
# standard library) and RESULTS (a JSON-lines file) to be set.

drop() { sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true; }

# run NAME CAP_MIB|none command...: drops the page cache, runs the command (in a cgroup unless
# none), and appends its JSON line with the cgroup's report.
run() {
  local name=$1 cap=$2; shift 2
  drop
  local out err
  out=$(mktemp); err=$(mktemp)
  local t0=$SECONDS
  if [ "$cap" = none ]; then
    "$@" > "$out" 2> "$err" || true
    echo "cgroup: none" >> "$err"
  else
    "$ROOT/bench/cgroup_run.sh" "$cap" "$@" > "$out" 2> "$err" || true
  fi
  "$PY" - "$name" "$cap" "$out" "$err" "$((SECONDS - t0))" >> "$RESULTS" <<'PYEOF'
import json, re, sys
name, cap, out, err, wall = sys.argv[1:6]
text = open(out).read().strip().splitlines()
e = open(err).read()
r = {"name": name, "cap_mib": None if cap == "none" else int(cap), "wall_s": int(wall)}
try:
    r.update(json.loads(text[-1]))
except Exception:
    r["failed"] = e.strip().splitlines()[-3:]
m = re.search(r"peak (\d+) MiB, oom_kill (\d+), exit (\d+)", e)
if m:
    r["cgroup_peak_mib"], r["oom_kill"], r["exit"] = map(int, m.groups())
print(json.dumps(r))
PYEOF
  tail -1 "$RESULTS" | cut -c1-300 >&2
  rm -f "$out" "$err"
}
