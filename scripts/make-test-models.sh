#!/usr/bin/env bash
# Writes the synthetic GGUFs host/tests/oracle.rs checks wisp against llama.cpp on: each
# family's released per-layer shapes and real tokenizer with seeded random weights, cut to
# two layers, quantized by llama-quantize (scripts/make-gguf.py). Made once into a cache
# keyed by the generator's and this list's contents (a change makes new files; the old
# directory is removed), linked into models/synthetic/. ~3.3 GB; ~4 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${WISPBENCH_CACHE:-$HOME/.cache/wisp-bench}
key=$(cat scripts/make-gguf.py scripts/make-test-models.sh | sha256sum | cut -c1-12)
dir="$CACHE/synthetic-$key"
mkdir -p "$dir" models
scripts/build-llama.sh llama-quantize >/dev/null
py=.venv/bin/python
[ -x "$py" ] || py=python3

# name family type [extra make-gguf.py flags]
while read -r name family type extra; do
  [ -z "$name" ] && continue
  out="$dir/$name.gguf"
  if [ ! -s "$out" ]; then
    echo "synthetic: $name" >&2
    # shellcheck disable=SC2086 # $extra is a list of flags
    "$py" scripts/make-gguf.py "$family" "$out.tmp" --layers 2 --type "$type" $extra >/dev/null
    mv "$out.tmp" "$out"
  fi
done <<'LIST'
qwen3-Q8_0 qwen3 Q8_0
qwen3-tied-Q8_0 qwen3 Q8_0 --tied
qwen3-Q4_K_M qwen3 Q4_K_M
qwen2-Q4_K_M qwen2 Q4_K_M
llama3-Q8_0 llama3 Q8_0
llama3-Q4_K_M llama3 Q4_K_M
phi3-Q8_0 phi3 Q8_0
phi3-Q4_K_M phi3 Q4_K_M
phi4-Q4_K_M phi4 Q4_K_M --small-ctx 256
mistral3-Q8_0 mistral3 Q8_0 --small-ctx 16
mistral3-Q4_K_M mistral3 Q4_K_M --small-ctx 16
LIST
ln -sfn "$dir" models/synthetic
# Earlier generations' files.
for old in "$CACHE"/synthetic-*; do
  [ "$old" = "$dir" ] || rm -rf "$old"
done
echo "models/synthetic -> $dir"
