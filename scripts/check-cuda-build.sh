#!/usr/bin/env bash
# Proves that wisp compiles with `--features cuda` from nothing, on a machine with no GPU and
# no CUDA install: a CUDA 13.0 toolchain (nvcc, its headers, the runtime, cuBLAS, cuRAND and
# NVRTC libraries) comes from PyPI's NVIDIA wheels into a cache outside the clone, once; a
# stub libcuda.so (the driver library, which only a GPU machine has) is made for the link; and
# cargo builds the release binary in its own target dir. The first run builds every crate
# from scratch, candle's CUDA kernels included (nvcc; the quantized-matmul ones take most of it).
#
# Usage: scripts/check-cuda-build.sh
# WISP_CUDA_CACHE sets the cache (default ~/.cache/wisp-cuda), WISP_CUDA_TARGET_DIR the cargo
# target dir (default $WISP_CUDA_CACHE/target), CUDA_COMPUTE_CAP the GPU the kernels are built
# for (default 90: H100/H200; e.g. 80 for A100, 89 for L4/L40S).
# The binary runs on a GPU machine whose NVIDIA driver supports CUDA 13 (>= 580), with
# LD_LIBRARY_PATH=$WISP_CUDA_CACHE/cuda/lib (the wheels' libraries; libcuda comes from the driver).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${WISP_CUDA_CACHE:-$HOME/.cache/wisp-cuda}
TARGET=${WISP_CUDA_TARGET_DIR:-$CACHE/target}
# PyPI's `cuda-toolkit` metapackage pins one CUDA release's wheels. 13.0: CUDA 12's wheels ship
# no nvcc, and cudarc 0.19 (candle's) knows CUDA up to 13.4.
CUDA_TOOLKIT=13.0.3.0
SPEC="cuda-toolkit[nvcc,crt,nvvm,cudart,cccl,nvrtc,cublas,curand]==$CUDA_TOOLKIT"
VENV="$CACHE/venv"
CUDA="$CACHE/cuda" # a CUDA_HOME laid over the wheels' tree (site-packages/nvidia/cu13)
STAMP="$CACHE/cuda.ready"

if [ "$(cat "$STAMP" 2>/dev/null)" != "$SPEC" ] || [ ! -x "$CUDA/bin/nvcc" ]; then
  rm -f "$STAMP"
  mkdir -p "$CACHE"
  if [ "$(cat "$VENV/.wisp-spec" 2>/dev/null)" != "$SPEC" ]; then
    echo "cuda: installing $SPEC from PyPI into $VENV (about 1.2 GB, once)"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$SPEC"
    echo "$SPEC" >"$VENV/.wisp-spec"
  fi
  wheels=("$VENV"/lib/python3*/site-packages/nvidia/cu13)
  [ -x "${wheels[0]}/bin/nvcc" ] || { echo "cuda: no nvcc in ${wheels[0]}" >&2; exit 1; }
  echo "cuda: laying out $CUDA"
  rm -rf "$CUDA"
  mkdir -p "$CUDA/lib/stubs"
  for d in bin include nvvm; do ln -s "${wheels[0]}/$d" "$CUDA/$d"; done
  ln -s "${wheels[0]}"/lib/* "$CUDA/lib/"
  # The wheels ship only the versioned sonames; the linker's -lNAME wants libNAME.so
  # (cudarc links cudart, nvrtc, curand, cublas, cublasLt; candle-kernels cudart).
  for name in cudart nvrtc curand cublas cublasLt; do
    so=("$CUDA/lib/lib$name.so."[0-9]*)
    [ -e "${so[0]}" ] || { echo "cuda: no lib$name.so.* in the wheels" >&2; exit 1; }
    ln -s "$(basename "${so[0]}")" "$CUDA/lib/lib$name.so"
  done
  # cudarc links -lcuda too (candle turns on its dynamic-linking): a stub with the driver API's
  # names and the driver's soname, as the CUDA toolkit's lib/stubs has. At run time the
  # binary asks for libcuda.so.1, which only the driver provides.
  echo "cuda: making a stub libcuda.so (the driver API's names from cuda.h)"
  {
    grep -ohE '\bcu[A-Z][A-Za-z0-9_]*' "$CUDA/include/cuda.h"
    echo cuProfilerInitialize # cudaProfiler.h, not in these wheels
  } | sort -u | awk '{ print "int " $1 "(void) { return 34; } /* CUDA_ERROR_STUB_LIBRARY */" }' \
    >"$CACHE/libcuda-stub.c"
  "${CC:-cc}" -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$CUDA/lib/stubs/libcuda.so" "$CACHE/libcuda-stub.c"
  echo "$SPEC" >"$STAMP"
fi

# Only this toolkit: nvcc on PATH (candle-kernels' cudaforge and cudarc's version probe run
# it), CUDA_HOME for cudarc's link search ($CUDA_HOME/lib, lib/stubs); other CUDA roots unset.
unset CUDA_PATH CUDA_ROOT CUDA_TOOLKIT_ROOT_DIR CUDNN_LIB CUDARC_CUDA_VERSION
export CUDA_HOME="$CUDA" NVCC="$CUDA/bin/nvcc" PATH="$CUDA/bin:$PATH"
# No nvidia-smi here to ask: candle-kernels fails without it. 90 builds for sm_90a.
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CARGO_TARGET_DIR="$TARGET"

smoke=$(mktemp -d)
trap 'rm -rf "$smoke"' EXIT
cat >"$smoke/smoke.cu" <<'EOF'
#include <cuda_fp16.h>
#include <cuda_bf16.h>
extern "C" __global__ void add(const __half *a, const __nv_bfloat16 *b, float *out, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = __half2float(a[i]) + __bfloat162float(b[i]);
}
EOF
nvcc --ptx -arch=sm_80 -o "$smoke/smoke.ptx" "$smoke/smoke.cu" \
  || { echo "cuda: nvcc cannot compile a fp16/bf16 kernel" >&2; exit 1; }
echo "cuda: $(nvcc --version | grep -o 'release [0-9.]*, V[0-9.]*') compiles fp16/bf16 kernels"

# The web chat is embedded at compile time.
[ -d web/dist ] || scripts/build-web.sh
echo "cuda: cargo build --release --features cuda --bin wisp (CUDA_COMPUTE_CAP=$CUDA_COMPUTE_CAP, target dir $TARGET)"
cargo build --release --locked -p wisp --features cuda --bin wisp

bin="$TARGET/release/wisp"
echo "cuda: $bin needs $(readelf -d "$bin" | sed -n 's/.*NEEDED.*\[\(lib\(cu\|nvrtc\)[^]]*\)\]/\1/p' | paste -sd ' ')"
# Printing the version touches no GPU, but the loader wants libcuda.so.1: the stub stands in
# where no driver is installed.
libs="$CUDA/lib"
if [ "$(ldconfig -p 2>/dev/null | grep -c 'libcuda\.so\.1 ')" = 0 ]; then
  echo "cuda: no NVIDIA driver here: the stub libcuda stands in to print the version"
  ln -s "$CUDA/lib/stubs/libcuda.so" "$smoke/libcuda.so.1"
  libs="$libs:$smoke"
fi
LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" "$bin" --version
echo "cuda: ok"
