#!/usr/bin/env bash
# The cost of wisp's proxy mode: llama-server (built from the PyPI sdist by
# scripts/build-llama.sh) on a GGUF, and wisp in front of it with wisp.toml's default plugin
# chain; scripts/proxy_bench.py alternates the same streamed requests between the two and
# prints TTFT and chunk gaps for each, and what wisp adds.
#
# Usage: scripts/bench-proxy.sh [MODEL.gguf] [PAIRS]
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:-models/gemma-3-270m-q4_k_m.gguf}
PAIRS=${2:-40}
LLAMA_BIN=$(scripts/build-llama.sh llama-server)
cargo build --release --bin wisp -q
target="${CARGO_TARGET_DIR:-target}"
WISP=$(realpath "$target/release/wisp")

dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$dir"; }
trap cleanup EXIT
wait_ready() {
  for _ in $(seq 1 300); do curl -sf "$1" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "bench: $1 never answered"; exit 1
}

"$LLAMA_BIN/llama-server" -m "$MODEL" -t 2 --port 18091 -np 4 -c 8192 --metrics >"$dir/llama.log" 2>&1 &
pids+=($!)
wait_ready http://127.0.0.1:18091/health

# The default chain of wisp.toml (rate limit, prompt guard, redaction), in front of llama-server.
dist="$(pwd)/plugins/dist"
{
  printf '[server]\nlisten = "127.0.0.1:18090"\n[store]\nurl = "sqlite://%s/wisp.db"\n' "$dir"
  printf '[[models]]\nid = "proxied"\nupstreams = ["http://127.0.0.1:18091/v1"]\n'
  sed -n '/^\[\[plugins\]\]/,$p' wisp.toml | sed "s|plugins/dist|$dist|"
} >"$dir/wisp.toml"
"$WISP" serve --config "$dir/wisp.toml" >"$dir/wisp.log" 2>&1 &
pids+=($!)
wait_ready http://127.0.0.1:18090/ready

echo "proxy: $(basename "$MODEL"), llama-server -t 2 -np 4; wisp with wisp.toml's plugins in front"
python3 scripts/proxy_bench.py --direct http://127.0.0.1:18091 --proxy http://127.0.0.1:18090 --model proxied --pairs "$PAIRS"
