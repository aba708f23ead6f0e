#!/usr/bin/env bash
# wisp's engine beside llama.cpp's on every common quant type, both architectures, in one
# run, ending in one table with ratios against issue 17's goals (decode >= 1.0x, prompt
# >= 0.8x llama.cpp on the same GGUF, same threads).
#
# With no arguments it makes the variants itself: the default Gemma 3 GGUF and the
# SmolLM2 (llama architecture) GGUF requantized by llama.cpp's `llama-quantize` to Q4_0,
# Q4_1, Q4_K_M, Q5_K_M, Q6_K and Q8_0, kept in $WISPBENCH_CACHE/quants (speed only: a
# requantized file is no better than its source). A "Q4_K_M" file is a mix (rows that are
# not a multiple of 256 cannot be K-quants), so the table lists each file's types by share
# of the matrices' weights (scripts/gguf_types.py).
#
# Usage: scripts/bench-quants.sh [THREADS] [FILE.gguf...]
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${1:-2}
shift || true
PP=128
TG=64
REPS=3
CACHE=${WISPBENCH_CACHE:-$HOME/.cache/wisp-bench}
LLAMA_BIN=$(scripts/build-llama.sh llama-bench llama-quantize)
cargo build --release --bin wisp -q
WISP=$(realpath "${CARGO_TARGET_DIR:-target}/release/wisp")

files=("$@")
if [ ${#files[@]} -eq 0 ]; then
  mkdir -p "$CACHE/quants"
  for src in models/gemma-3-270m-q4_k_m.gguf models/SmolLM2-135M-Instruct.Q4_1.gguf; do
    [ -f "$src" ] || scripts/fetch-model.sh
    base=$(basename "$src" .gguf)
    for type in Q4_0 Q4_1 Q4_K_M Q5_K_M Q6_K Q8_0; do
      out="$CACHE/quants/$base.$type.gguf"
      [ -f "$out" ] || "$LLAMA_BIN/llama-quantize" --allow-requantize "$src" "$out" "$type" "$THREADS" >/dev/null 2>&1 \
        || { echo "bench: llama-quantize $type of $src failed"; exit 1; }
      files+=("$out")
    done
  done
fi

echo "bench: ${#files[@]} GGUFs, $THREADS threads, pp$PP / tg$TG, $REPS repetitions, $(date -u +%FT%TZ), load $(cut -d' ' -f1-3 /proc/loadavg)"
source scripts/bench-lib.sh
rows="$dir/rows"
for f in "${files[@]}"; do
  types=$(python3 scripts/gguf_types.py "$f")
  llama=$(llama_bench "$LLAMA_BIN" -m "$f" -t "$THREADS" -p "$PP" -n "$TG" -r "$REPS" | cut -d' ' -f2 | tr '\n' ' ')
  wisp=$(RAYON_NUM_THREADS=$THREADS wisp_bench "$WISP" --model "$f" --prompt-tokens "$PP" --gen-tokens "$TG" --reps "$REPS" \
    --batch 1 --device cpu | grep -E "^(pp$PP|tg$TG) " | cut -d' ' -f2 | tr '\n' ' ')
  echo "$(basename "$f")|$types|$llama|$wisp" | tee -a "$rows"
done
python3 - "$rows" "$PP" "$TG" <<'PY'
import sys
rows, pp, tg = sys.argv[1], sys.argv[2], sys.argv[3]
print()
print(f"| GGUF | matrix types (share of weights) | prompt pp{pp} llama.cpp t/s | wisp t/s | ratio (goal ≥ 0.8) | decode tg{tg} llama.cpp t/s | wisp t/s | ratio (goal ≥ 1.0) |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
for line in open(rows):
    name, types, llama, wisp = line.rstrip("\n").split("|")
    lp, lt = (float(x) for x in llama.split())
    wp, wt = (float(x) for x in wisp.split())
    mark = lambda r, goal: f"{r:.2f} {'✓' if r >= goal else '✗'}"
    print(f"| {name} | {types} | {lp:.1f} | {wp:.1f} | {mark(wp / lp, 0.8)} | {lt:.1f} | {wt:.1f} | {mark(wt / lt, 1.0)} |")
PY
