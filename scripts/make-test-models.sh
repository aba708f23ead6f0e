#!/usr/bin/env bash
# Writes the synthetic GGUFs host/tests/oracle.rs checks wisp against llama.cpp on: each
# family's released per-layer shapes and real tokenizer with seeded random weights, cut to
# two layers (one where a layer of experts is 600M weights; Gemma 4 ten, to reach its
# shared KV layers; Qwen 3.5 four, one of them attention), quantized by llama-quantize
# (scripts/make-gguf.py). Made once into a cache keyed by the generator's contents (a change
# makes new files and removes the old directory; a list entry whose flags change is made
# again), linked into models/synthetic/. ~8.5 GB; ~13 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${WISPBENCH_CACHE:-$HOME/.cache/wisp-bench}
key=$(sha256sum < scripts/make-gguf.py | cut -c1-12)
dir="$CACHE/synthetic-$key"
mkdir -p "$dir" models
scripts/build-llama.sh llama-quantize >/dev/null
py=.venv/bin/python
[ -x "$py" ] || py=python3

# name family type [extra make-gguf.py flags]
while read -r name family type extra; do
  [ -z "$name" ] && continue
  out="$dir/$name.gguf"
  args="--type $type --layers 2 $extra"
  if [ ! -s "$out" ] || [ "$(cat "$out.args" 2>/dev/null)" != "$family $args" ]; then
    echo "synthetic: $name" >&2
    # shellcheck disable=SC2086 # $args is a list of flags
    "$py" scripts/make-gguf.py "$family" "$out.tmp" $args >/dev/null
    mv "$out.tmp" "$out"
    echo "$family $args" > "$out.args"
  fi
done <<'LIST'
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
qwen3-IQ4_XS qwen3 IQ4_XS
llama3-IQ4_NL llama3 IQ4_NL
qwen3moe-Q4_K_M qwen3moe Q4_K_M --layers 1
gpt-oss-MXFP4_MOE gpt-oss MXFP4_MOE --layers 1 --window 16
gemma4-Q4_K_M gemma4 Q4_K_M --layers 10 --window 16
qwen35-Q4_K_M qwen35 Q4_K_M --layers 4
qwen35moe-Q4_K_M qwen35moe Q4_K_M --layers 2
gemma4-moe-Q4_K_M gemma4-moe Q4_K_M --layers 2
LIST
ln -sfn "$dir" models/synthetic
# Earlier generations' files.
for old in "$CACHE"/synthetic-*; do
  [ "$old" = "$dir" ] || rm -rf "$old"
done
echo "models/synthetic -> $dir"
