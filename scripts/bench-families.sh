#!/usr/bin/env bash
# Every architecture at the size users run, beside llama.cpp: for each family a synthetic
# GGUF (scripts/make-gguf.py) with the released per-layer shapes of its smallest model of
# >= 1B parameters, layers cut only where the file would pass 2 GB, quantized to each type
# asked (default Q4_K_M, the most used; gpt-oss in its released MXFP4), then one table from scripts/bench-quants.sh
# (wisp bench beside llama-bench, same threads, one run). Files are kept in
# $WISPBENCH_CACHE/families.
#
# Usage: scripts/bench-families.sh [THREADS] [TYPE...]
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${1:-2}
shift || true
types=("$@")
[ ${#types[@]} -eq 0 ] && types=(Q4_K_M)
CACHE=${WISPBENCH_CACHE:-$HOME/.cache/wisp-bench}
mkdir -p "$CACHE/families"
py=.venv/bin/python
[ -x "$py" ] || py=python3

files=()
# name family layers (0: as released) [the type it ships in, instead of the ones asked]
while read -r name family layers own; do
  file_types=("${types[@]}")
  [ -n "$own" ] && file_types=("$own")
  for type in "${file_types[@]}"; do
    out="$CACHE/families/$name.$type.gguf"
    if [ ! -s "$out" ]; then
      echo "bench: making $out" >&2
      "$py" scripts/make-gguf.py "$family" "$out" --layers "$layers" --type "$type" >/dev/null
    fi
    files+=("$out")
  done
done <<'LIST'
llama-3.2-1b llama3 0
qwen2.5-1.5b qwen2-1.5b 0
qwen3-1.7b qwen3-1.7b 0
phi-3.5-mini-20of32 phi3 20
phi-4-mini-20of32 phi4 20
ministral-3-3b-18of26 mistral3 18
qwen3-30b-a3b-4of48 qwen3moe 4
gpt-oss-20b-2of24 gpt-oss 2 MXFP4_MOE
gemma-4-e2b-15of35 gemma4 15
qwen3.5-4b-16of32 qwen35-4b 16
qwen3.5-35b-a3b-2of40 qwen35moe 2
gemma-4-26b-a4b-2of30 gemma4-moe 2
LIST
scripts/bench-quants.sh "$THREADS" "${files[@]}"
