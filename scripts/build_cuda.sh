#!/usr/bin/env bash
# Builds the CUDA binary (`--features cuda`) on a machine with no GPU and no CUDA toolkit.
#
# candle compiles its kernels with nvcc at build time, so the toolkit comes from PyPI wheels on the
# CUDA 13.0 line: the GPU machines we check on have driver 580 (CUDA 13.0), which refuses PTX from a
# newer nvcc. cudarc links libcuda dynamically and no wheel ships it, so a link-time stub is generated
# with the soname libcuda.so.1; at run time the driver's own library is loaded.
#
# Usage: scripts/build_cuda.sh            (prints the binary's path on its last line)
# Env:   AIRLLM_CUDA_ROOT   where the toolkit, stub and build go (default: target/cuda)
#        CUDA_COMPUTE_CAP   GPU generation to compile for (default 90: H100/H200)
#        CUDAFORGE_THREADS  parallel nvcc jobs (default: number of cores)
# A first build takes about 20 minutes on 2 cores (mostly candle's kernels); rebuilds take minutes.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
ROOT=${AIRLLM_CUDA_ROOT:-$REPO/target/cuda}
mkdir -p "$ROOT"
ROOT=$(cd "$ROOT" && pwd)

# 1. The CUDA 13.0 pieces.
if [ ! -x "$ROOT/venv/bin/python" ]; then python3 -m venv "$ROOT/venv"; fi
if [ ! -f "$ROOT/.wheels-13.0" ]; then
  "$ROOT/venv/bin/pip" install -q --no-deps \
    nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 \
    nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35 nvidia-cuda-nvrtc==13.0.88
  touch "$ROOT/.wheels-13.0"
fi
W=$("$ROOT/venv/bin/python" -c 'import nvidia,os;print(os.path.join(list(nvidia.__path__)[0],"cu13"))')

# 2. A CUDA root made of links; lib64 needs the unversioned names the linker asks for.
T="$ROOT/toolkit"
mkdir -p "$T/lib64/stubs"
ln -sfn "$W/bin" "$T/bin"
ln -sfn "$W/include" "$T/include"
ln -sfn "$W/nvvm" "$T/nvvm"
for f in "$W"/lib/*.so.*; do ln -sf "$f" "$T/lib64/"; done
for pair in libcublas:13 libcublasLt:13 libcudart:13 libcurand:10 libnvrtc:13 libnvvm:4; do
  ln -sf "${pair%%:*}.so.${pair##*:}" "$T/lib64/${pair%%:*}.so"
done

# 3. The libcuda stub: every cu* entry point cudarc declares, returning an error if ever called.
(cd "$REPO" && cargo fetch -q)
CUDARC=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.* | sort -V | tail -1)
if [ ! -f "$T/lib64/stubs/libcuda.so" ]; then
  grep -ohE '^ *pub unsafe fn cu[A-Za-z0-9_]+\(' "$CUDARC/src/driver/sys/"*.rs \
    | sed -E 's/^ *pub unsafe fn //; s/\($//' | sort -u \
    | awk '{print "int " $1 "(void) { return 999; }"}' >"$ROOT/libcuda_stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$T/lib64/stubs/libcuda.so" "$ROOT/libcuda_stub.c"
fi

# 4. Build. cudarc reads CUDA_ROOT and `nvcc --version`; candle-kernels reads CUDA_COMPUTE_CAP
# (there is no nvidia-smi to ask).
export PATH="$T/bin:$PATH"
export CUDA_ROOT="$T"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-$(nproc)}
export CARGO_TARGET_DIR="$ROOT/target"
cd "$REPO"
# The binary and the device checks of scripts/gpu_check.sh (a GPU machine has no toolchain to
# run the tests), in one invocation so both share one build of candle's kernels.
cargo build --release -p airllm-cli -p airllm --features airllm/cuda,airllm-cli/cuda \
  --bin airllm --example device_check >&2

# 5. Copies to carry to a GPU machine: stripped, and xz-compressed (candle's PTX makes the
# binaries ~60 MB; compressed they are ~8 MB). gpu_check.sh unpacks them.
mkdir -p "$REPO/dist/cuda"
strip -o "$REPO/dist/cuda/airllm" "$CARGO_TARGET_DIR/release/airllm"
strip -o "$REPO/dist/cuda/device_check" "$CARGO_TARGET_DIR/release/examples/device_check"
for b in airllm device_check; do xz -T0 -6 -f -k "$REPO/dist/cuda/$b"; done
echo "runtime needs libcuda.so.1 (driver) and libcublas.so.13, libcublasLt.so.13, libcurand.so.10," >&2
echo "libcudart.so.13 on LD_LIBRARY_PATH (PyPI wheels' nvidia/cu13/lib)" >&2
echo "$REPO/dist/cuda/airllm"
